"""``python -m kms``: the KMS daemon (same as ``enclave kms serve``)."""

from __future__ import annotations

import sys

from kms.cli import serve_main

if __name__ == "__main__":
    sys.exit(serve_main(sys.argv[1:]))
