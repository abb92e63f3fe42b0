"""``python -m models``: the inference server (what the server image runs inside the enclave).

A separate ``__main__`` (rather than ``python -m models.server``) lets a pre-imported zygote hold
``models.server`` already without runpy re-executing it.
"""

from __future__ import annotations

import sys

from models.server import main

sys.exit(main())
