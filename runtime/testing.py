"""pytest plugin (registered through the ``pytest11`` entry point): fixtures for tests of code
built on enclave-runtime.

Fixtures:
    enclave_state_dir: a private, empty state directory for the test, also exported as
        ``ENCLAVE_STATE_DIR`` so CLI invocations and daemons started by the test use it.
    enclave_runtime: an open :class:`runtime.api.Runtime` on ``enclave_state_dir`` (zygote
        path); every enclave it started is terminated when the test ends (async fixture, needs
        pytest-trio).
    build_enclave_image: a factory ``build_enclave_image(app_dir, cmd, env=None, name=None)
        -> Path`` that builds a measured EIF (``runtime.eif.build_eif``) into the test's
        temporary directory.
    enclave_app: a factory ``enclave_app(source, cmd=None, *, files=None) -> Path``: writes
        ``source`` as ``main.py`` of a fresh app directory (plus ``files``) and returns its EIF,
        built with ``cmd`` (default ``python3 main.py``).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from pathlib import Path

import pytest

from transport.paths import STATE_DIR_ENV, ensure_private_dir

__all__ = ["enclave_state_dir", "enclave_runtime", "build_enclave_image", "enclave_app"]

BuildImage = Callable[..., Path]


@pytest.fixture
def enclave_state_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh state directory (mode 0700) exported as ``ENCLAVE_STATE_DIR``."""
    state = ensure_private_dir(tmp_path / "state")
    monkeypatch.setenv(STATE_DIR_ENV, str(state))
    return state


@pytest.fixture
async def enclave_runtime(enclave_state_dir: Path) -> AsyncIterator[object]:
    """An open runtime in the test's state directory (torn down after the test)."""
    from runtime.api import open_runtime

    async with open_runtime(enclave_state_dir) as rt:
        yield rt


@pytest.fixture
def build_enclave_image(tmp_path: Path) -> BuildImage:
    """Factory: build an EIF from an app directory into the test's tmp dir."""
    from runtime.eif import build_eif

    counter = [0]

    def build(
        app_dir: Path,
        cmd: Sequence[str] | str,
        env: Mapping[str, str] | None = None,
        name: str | None = None,
    ) -> Path:
        counter[0] += 1
        out = tmp_path / "eifs" / f"{name or Path(app_dir).name}-{counter[0]}.eif"
        out.parent.mkdir(exist_ok=True)
        build_eif(app_dir=Path(app_dir), cmd=cmd, env=dict(env or {}), output=out, name=name)
        return out

    return build


@pytest.fixture
def enclave_app(tmp_path: Path, build_enclave_image: BuildImage) -> BuildImage:
    """Factory: an EIF whose app is ``source`` (as main.py)."""
    counter = [0]

    def make(
        source: str,
        cmd: Sequence[str] | str | None = None,
        *,
        files: Mapping[str, str] | None = None,
        env: Mapping[str, str] | None = None,
        name: str = "app",
    ) -> Path:
        counter[0] += 1
        app = tmp_path / "apps" / f"{name}{counter[0]}"
        app.mkdir(parents=True)
        (app / "main.py").write_text(source)
        for rel, text in (files or {}).items():
            (app / rel).parent.mkdir(parents=True, exist_ok=True)
            (app / rel).write_text(text)
        return build_enclave_image(app, cmd or ["python3", "main.py"], env, name)

    return make
