#!/usr/bin/env python3
"""Compile the sans-IO cores (transport.accel.COMPILED_MODULES) with mypyc into the venv.

Run by scripts/_venv.sh (so by ./scripts/test and ./scripts/demo); quick when the build is
current. Without a C compiler or mypy it says so and exits 0: the interpreted cores are the
same code and are used instead (see transport/accel.py for why and how it stays safe).

    python scripts/build_accel.py          build if the sources changed
    python scripts/build_accel.py --force  rebuild
    python scripts/build_accel.py --clean  remove the build (interpreted cores from now on)
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ["ENCLAVE_PURE_PYTHON"] = "1"  # this process must not load what it replaces

from transport import accel  # noqa: E402

#: mypy settings for the build (the project's, minus what only the lint run needs).
MYPY_INI = """\
[mypy]
python_version = 3.11
strict = True
[mypy-msgpack.*]
ignore_missing_imports = True
"""

SETUP = """\
import sys
from mypyc.build import mypycify
from setuptools import setup

setup(
    name="enclave-accel",
    ext_modules=mypycify(sys.argv[1:], opt_level="3"),
    script_args=["build_ext", "--build-lib", "out", "--build-temp", "tmp"],
)
"""


def _compiler_version() -> str | None:
    try:
        from importlib.metadata import PackageNotFoundError, version
    except ImportError:  # pragma: no cover - stdlib since 3.8
        return None
    try:
        return "mypy " + version("mypy")
    except PackageNotFoundError:
        return None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--force", action="store_true", help="rebuild even if current")
    parser.add_argument("--clean", action="store_true", help="remove the build")
    args = parser.parse_args()
    target = accel.accel_directory()
    if args.clean:
        shutil.rmtree(target, ignore_errors=True)
        print(f"removed {target}", file=sys.stderr)
        return 0
    digest = accel.source_digest()
    compiler = _compiler_version()
    if compiler is None:
        print("note: no mypy (the test extra): the sans-IO cores run interpreted", file=sys.stderr)
        return 0
    stamp = target / accel.STAMP_NAME
    if not args.force and stamp.is_file():
        try:
            current = json.loads(stamp.read_text())
        except ValueError:
            current = {}
        if current == {**current, "digest": digest, "source_root": str(ROOT), "compiler": compiler}:
            return 0
    if shutil.which("cc") is None and shutil.which("gcc") is None:
        print("note: no C compiler: the sans-IO cores run interpreted", file=sys.stderr)
        shutil.rmtree(target, ignore_errors=True)
        return 0
    print("==> compiling the sans-IO cores with mypyc (~30 s)", file=sys.stderr)
    with tempfile.TemporaryDirectory(prefix="enclave-accel-") as tmp_name:
        tmp = Path(tmp_name)
        # A copy of the package, alone: mypyc's setuptools run must not read our pyproject.
        shutil.copytree(
            ROOT / "transport", tmp / "transport", ignore=shutil.ignore_patterns("__pycache__")
        )
        (tmp / "mypy.ini").write_text(MYPY_INI)
        (tmp / "setup.py").write_text(SETUP)
        sources = [rel for _, rel in accel.COMPILED_MODULES]
        env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
        result = subprocess.run(
            [sys.executable, "setup.py", *sources],
            cwd=tmp,
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )
        if result.returncode != 0:
            tail = "\n".join((result.stdout + result.stderr).strip().splitlines()[-15:])
            print(f"{tail}\nnote: mypyc failed: the sans-IO cores run interpreted", file=sys.stderr)
            shutil.rmtree(target, ignore_errors=True)
            return 0
        out = tmp / "out"
        modules: dict[str, str] = {}
        for so in sorted(out.rglob("*.so")):
            rel = so.relative_to(out)
            name = ".".join((*rel.parent.parts, rel.name.split(".", 1)[0]))
            modules[name] = rel.as_posix()
        missing = {name for name, _ in accel.COMPILED_MODULES} - set(modules)
        if missing:
            print(f"note: mypyc built no {sorted(missing)}: cores run interpreted", file=sys.stderr)
            return 0
        staging = target.with_name(target.name + ".new")
        shutil.rmtree(staging, ignore_errors=True)
        shutil.copytree(out, staging)
        (staging / accel.STAMP_NAME).write_text(
            json.dumps(
                {
                    "digest": digest,
                    "source_root": str(ROOT),
                    "compiler": compiler,
                    "modules": modules,
                },
                indent=1,
            )
        )
        shutil.rmtree(target, ignore_errors=True)
        staging.rename(target)  # the stamp appears with its modules, never before them
    print(f"==> compiled cores in {target}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
