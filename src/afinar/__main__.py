import sys

from afinar.cli import main

sys.exit(main())
