"""``python -m models.training``: the training worker (what the training image runs)."""

from __future__ import annotations

import sys

if __name__ == "__main__":  # importable (the package's export checks import every module)
    from models.training.worker import main

    sys.exit(main())
