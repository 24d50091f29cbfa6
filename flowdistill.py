"""`python -m flowdistill` entry point: the same CLI as the `flowdistill` console script."""
import sys

from shared.cli import main

if __name__ == "__main__":
    sys.exit(main())
