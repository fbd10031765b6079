"""``python -m pipeproc``: the command line (see :mod:`pipeproc.cli`)."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
