import sys

from p2v.cli import main

sys.exit(main())
