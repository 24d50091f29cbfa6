"""`python -m flowdistill`: the same CLI as the `flowdistill` console script."""
import sys

from flowdistill.cli import main

if __name__ == "__main__":
    sys.exit(main())
