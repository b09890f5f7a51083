"""``python -m normlab``: the same command line as ``normlab``."""

import sys

from normlab.cli import main

if __name__ == "__main__":
    sys.exit(main())
