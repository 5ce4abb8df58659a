import sys

from gistlib.cli import main

sys.exit(main())
