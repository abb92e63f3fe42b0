"""``python -m models.training``: the training worker (what the training image runs)."""

from __future__ import annotations

import sys

from models.training.worker import main

sys.exit(main())
