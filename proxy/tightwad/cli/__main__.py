import sys

from tightwad.cli import main

sys.exit(main())
