"""Print the full benchmark table (the same cases as ``normlab bench``).

    python benchmarks/run_all.py [--quick] [--markdown] [--plot speed.png] [--case "layer norm"]
"""

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # this checkout's normlab, not an installed one


from normlab.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", *sys.argv[1:]]))
