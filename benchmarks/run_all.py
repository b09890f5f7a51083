"""Print the full benchmark table (the same cases as ``normlab bench``).

    python benchmarks/run_all.py [--quick] [--markdown] [--plot speed.png] [--case "layer norm"]
"""

import sys

from normlab.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", *sys.argv[1:]]))
