"""Command line: python run_recbole_weaverec.py --model=NAME [--dataset=NAME] [--config_files="a.yaml b.yaml"]
[--key=value ...]. Extra --key=value arguments override config files, as with RecBole's run_recbole.py."""
import sys

from recbole_weaverec.cli import main

if __name__ == "__main__":
    sys.exit(main())
