import sys

from fastpref.cli import main

sys.exit(main())
