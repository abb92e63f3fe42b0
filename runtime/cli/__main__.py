"""``python -m runtime.cli`` runs the ``enclave`` command."""

from __future__ import annotations

import sys

from runtime.cli import main

sys.exit(main())
