"""``python -m phoenix.cli <cmd> ...``: the ``phoenix`` command without the console script."""

import sys

from phoenix.cli import main

if __name__ == "__main__":
    sys.exit(main())
