"""``python -m runtime.demo``: the demo's child process (see :mod:`runtime.demo.process`)."""

import sys

from runtime.demo.process import child_main

if __name__ == "__main__":
    sys.exit(child_main())
