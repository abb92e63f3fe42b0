"""``enclave train --workers N --steps S``: confidential training across enclaves, end to end.

On a temporary local stack (CA, KMS, host store, relay): N workers of the training image
(``models/train_app``) train the MLP on the sealed synthetic data set over mutually attested
links, worker 0 seals checkpoints on the host; prints the test accuracy and the phase table
(``--json``: one JSON object). See the README's "Confidential training" section.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Final

if TYPE_CHECKING:
    from runtime.cli import SubParsers

__all__ = ["register", "run", "MAX_STEPS"]

#: Most steps one ``enclave train`` runs (about 15 ms each with 2 workers here).
MAX_STEPS: Final = 100_000


def register(subparsers: SubParsers) -> None:
    """Add ``enclave train``."""
    p = subparsers.add_parser(
        "train", help="train across enclaves: sealed data, attested all-reduce, sealed checkpoints"
    )
    p.add_argument("--workers", default="2", metavar="N", help="training enclaves (1..4)")
    p.add_argument("--steps", default="100", metavar="S", help=f"SGD steps (1..{MAX_STEPS})")
    p.add_argument("--json", action="store_true", help="print the result as one JSON object")
    p.set_defaults(func=run)


def _int_in(flag: str, text: str, lo: int, hi: int) -> int:
    from transport.errors import ConfigurationError

    text = str(text).strip()
    if not text.isascii() or not text.isdigit() or not lo <= int(text) <= hi:
        raise ConfigurationError(f"train: {flag} {text!r}: expected an integer in {lo}..{hi}")
    return int(text)


def run(args: argparse.Namespace) -> int:
    """Run the training (in this process); returns the exit status."""
    import trio

    from models.training.config import TrainConfig
    from models.training.host import TRAIN_APP_DIR, open_training
    from models.training.report import phase_table, result_json
    from runtime.stack import open_stack, size_pool_for
    from transport.logs import configure_logging

    shards = TrainConfig.from_file(TRAIN_APP_DIR / "train.toml").shards
    workers = _int_in("--workers", args.workers, 1, shards)
    steps = _int_in("--steps", args.steps, 1, MAX_STEPS)
    # Progress and the table are ours; service logs only when something is wrong, unless
    # ENCLAVE_LOG_LEVEL asks for more.
    configure_logging(None if "ENCLAVE_LOG_LEVEL" in os.environ else "error")
    root = Path(tempfile.mkdtemp(prefix="enclave-train-"))

    async def main() -> int:
        state = root / "s"
        state.mkdir(mode=0o700)
        size_pool_for(state, workers)
        print(f"starting {workers} training enclave(s)...", file=sys.stderr)
        async with (
            open_stack(state) as stack,
            open_training(stack, root / "w", workers=workers) as training,
        ):
            print(f"training {steps} steps...", file=sys.stderr)
            result = await training.run(steps)
        if args.json:
            print(json.dumps(result_json(result, steps=steps)))
        else:
            print(phase_table(result, steps=steps))
        return 0

    try:
        return trio.run(main)
    finally:
        shutil.rmtree(root, ignore_errors=True)
