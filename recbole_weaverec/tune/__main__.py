import sys

from recbole_weaverec.tune.cli import main

sys.exit(main())
