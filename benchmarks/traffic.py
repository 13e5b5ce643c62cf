"""The byte counter (fastadapter/cli/traffic.py) as a script: ``python benchmarks/traffic.py --help``."""

import os
import sys

if __name__ == "__main__":
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
    from fastadapter.cli.traffic import main

    sys.exit(main())
