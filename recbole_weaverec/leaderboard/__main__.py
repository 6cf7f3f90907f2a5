"""``python -m recbole_weaverec.leaderboard``: runs the command line (recbole_weaverec.leaderboard.cli)."""
import sys

from recbole_weaverec.leaderboard.cli import main

if __name__ == "__main__":
    sys.exit(main())
