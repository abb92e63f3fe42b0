"""pytest plugin (registered through the ``pytest11`` entry point): fixtures for tests of code
built on enclave-runtime. Installing the package is all it takes; no ``conftest.py`` and no
pytest configuration are needed.

Fixtures:
    enclave_state_dir: a private, empty state directory for the test, also exported as
        ``ENCLAVE_STATE_DIR`` so CLI invocations and daemons started by the test use it.
    enclave_runtime: an open :class:`runtime.api.Runtime` on ``enclave_state_dir`` (zygote
        path); every enclave it started is terminated when the test ends.
    build_enclave_image: a factory ``build_enclave_image(app_dir, cmd, env=None, name=None)
        -> Path`` that builds a measured EIF (``runtime.eif.build_eif``) into the test's
        temporary directory.
    enclave_app: a factory ``enclave_app(source, cmd=None, *, files=None) -> Path``: writes
        ``source`` as ``main.py`` of a fresh app directory (plus ``files``) and returns its EIF,
        built with ``cmd`` (default ``python3 main.py``).
    kms_daemon: a real KMS daemon process (``python -m kms``) on a free loopback port, with its
        own state directory, two principals (:class:`KmsDaemon`: ``admin`` and ``enclave``) and
        the test's local CA (the one ``enclave_runtime``'s enclaves attest with) as its trust
        root; stopped after the test. A plain fixture: boto3 tests need no event loop.
    inference_stack: a :class:`runtime.stack.InferenceStack`: the bundled digits model sealed
        under a key only the server image may use, served from a real (not debug) enclave,
        reachable through an ingress.
    inference_client: an open, attested :class:`models.client.InferenceClient` to
        ``inference_stack`` (PCR0 and the model's PCR16 verified).

``enclave_runtime``, ``inference_stack`` and ``inference_client`` are trio fixtures (they need
pytest-trio, which the ``test`` extra installs). The plugin runs every ``async def`` test that
uses one of them under trio, so a project needs neither ``trio_mode`` nor ``@pytest.mark.trio``.
"""

from __future__ import annotations

import base64
import importlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from inspect import iscoroutinefunction
from pathlib import Path
from typing import TYPE_CHECKING, Final, TypeVar, cast

import pytest

from transport.paths import STATE_DIR_ENV, ensure_private_dir

if TYPE_CHECKING:
    from botocore.client import BaseClient

    from kms.client import Credentials, KmsClient
    from models.client import InferenceClient
    from runtime.api import Runtime
    from runtime.stack import InferenceStack

__all__ = [
    "enclave_state_dir",
    "enclave_runtime",
    "build_enclave_image",
    "enclave_app",
    "kms_daemon",
    "inference_stack",
    "inference_client",
    "KmsDaemon",
    "start_kms_daemon",
    "TRIO_FIXTURES",
]

BuildImage = Callable[..., Path]
#: The fixtures that run under trio; a coroutine test using one is marked ``trio``.
TRIO_FIXTURES: Final = frozenset({"enclave_runtime", "inference_stack", "inference_client"})
#: Time allowed for a KMS daemon process to listen (an interpreter start plus imports, ~1 s
#: idle; the margin is for a loaded machine).
KMS_START_TIMEOUT_S: Final = 60.0
#: How long a stopping KMS daemon may finish in-flight requests before it is killed.
KMS_STOP_TIMEOUT_S: Final = 15.0
#: The KMS fixture's account and principals.
KMS_ACCOUNT: Final = "111122223333"
KMS_ADMIN_ARN: Final = f"arn:aws:iam::{KMS_ACCOUNT}:user/key-admin"
KMS_ENCLAVE_ARN: Final = f"arn:aws:iam::{KMS_ACCOUNT}:role/enclave"
#: What ``enclave kms serve`` prints on stderr once listening.
_LISTENING = re.compile(rb"kms listening on (http://\S+)")
#: A polling interval while waiting for the daemon's line (seconds).
_POLL_S: Final = 0.05

_Fixture = TypeVar("_Fixture", bound=Callable[..., object])

try:
    # Imported by name: pytest-trio ships no type information.
    _pytest_trio = importlib.import_module("pytest_trio")
    _PYTEST_TRIO_FIXTURE: Callable[[Callable[..., object]], object] | None = (
        _pytest_trio.trio_fixture
    )
except ImportError:  # pragma: no cover - pytest-trio is in the test extra
    _PYTEST_TRIO_FIXTURE = None


def _trio_fixture(func: _Fixture) -> _Fixture:
    """A fixture that always runs under trio (pytest-trio's ``trio_fixture``); without
    pytest-trio, a fixture that fails with what to install."""
    if _PYTEST_TRIO_FIXTURE is not None:
        return cast("_Fixture", _PYTEST_TRIO_FIXTURE(func))

    def needs_pytest_trio() -> None:
        pytest.fail(
            f"the {func.__name__} fixture needs pytest-trio: pip install pytest-trio "
            "(or enclave-runtime[test])",
            pytrace=False,
        )

    return cast("_Fixture", pytest.fixture(name=func.__name__)(needs_pytest_trio))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Run every coroutine test that uses one of :data:`TRIO_FIXTURES` under trio."""
    if _PYTEST_TRIO_FIXTURE is None:
        return
    for item in items:
        if not isinstance(item, pytest.Function) or item.get_closest_marker("trio"):
            continue
        test = getattr(item.obj, "hypothesis", None)
        func = test.inner_test if test is not None else item.obj
        if iscoroutinefunction(func) and TRIO_FIXTURES & set(item.fixturenames):
            item.add_marker(pytest.mark.trio)


# --- state directory, runtime, images -----------------------------------------------------


@pytest.fixture
def enclave_state_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh state directory (mode 0700) exported as ``ENCLAVE_STATE_DIR``."""
    state = ensure_private_dir(tmp_path / "state")
    monkeypatch.setenv(STATE_DIR_ENV, str(state))
    return state


@_trio_fixture
async def enclave_runtime(enclave_state_dir: Path) -> AsyncIterator[Runtime]:
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


# --- the KMS daemon -----------------------------------------------------------------------


@dataclass(frozen=True)
class KmsDaemon:
    """A running KMS daemon process (see :func:`start_kms_daemon`)."""

    #: ``http://127.0.0.1:<port>``.
    endpoint: str
    #: Credentials of the key administrator (principal :data:`KMS_ADMIN_ARN`).
    admin: Credentials
    #: Credentials an enclave would use (principal :data:`KMS_ENCLAVE_ARN`).
    enclave: Credentials
    #: The daemon's state directory (``kms.sqlite3``, ``audit.jsonl``) and its stderr log.
    state_dir: Path
    log_path: Path
    pid: int
    region: str = "us-east-1"
    admin_arn: str = KMS_ADMIN_ARN
    enclave_arn: str = KMS_ENCLAVE_ARN
    #: The trust roots (PEM paths) Recipient documents are verified against.
    trust_roots: tuple[Path, ...] = field(default=())

    @property
    def audit_log(self) -> Path:
        """The daemon's hash-chained audit log (one JSON line per request)."""
        return self.state_dir / "audit.jsonl"

    def client(self, credentials: Credentials | None = None) -> KmsClient:
        """The project's async KMS client (``async with``), as the admin by default."""
        from kms.client import KmsClient

        return KmsClient(
            endpoint=self.endpoint, credentials=credentials or self.admin, region=self.region
        )

    def boto3_client(self, credentials: Credentials | None = None) -> BaseClient:
        """A boto3 KMS client for this daemon, as the admin by default (needs boto3)."""
        import boto3

        creds = credentials or self.admin
        return boto3.client(
            "kms",
            endpoint_url=self.endpoint,
            region_name=self.region,
            aws_access_key_id=creds.access_key_id,
            aws_secret_access_key=creds.secret_access_key,
        )


def _toml_string(value: str) -> str:
    return json.dumps(value)  # a JSON string is a valid TOML basic string


def _log_tail(path: Path, limit: int = 2000) -> str:
    try:
        return path.read_bytes()[-limit:].decode(errors="replace")
    except OSError:
        return ""


@contextmanager
def start_kms_daemon(
    directory: Path, *, trust_roots: Sequence[Path] = (), timeout_s: float = KMS_START_TIMEOUT_S
) -> Iterator[KmsDaemon]:
    """Run ``python -m kms`` with a config in ``directory`` until the block ends.

    The daemon listens on a free loopback port, keeps its state in ``directory/kms``, accepts
    two fresh credential pairs (admin and enclave) and verifies Recipient documents against
    ``trust_roots``.

    Raises:
        RuntimeError: the daemon exited or did not listen within ``timeout_s`` (with its log);
            also at the end of the block if the daemon died during it.
    """
    from kms.client import Credentials

    directory = ensure_private_dir(Path(directory))
    state = directory / "kms"
    admin = Credentials("AKIDTESTADMIN0000001", base64.b64encode(os.urandom(30)).decode())
    enclave = Credentials("AKIDTESTENCLAVE00001", base64.b64encode(os.urandom(30)).decode())
    lines = [
        'listen = "127.0.0.1:0"',
        f"state_dir = {_toml_string(str(state))}",
        f'account_id = "{KMS_ACCOUNT}"',
        f"trust_roots = [{', '.join(_toml_string(str(p)) for p in trust_roots)}]",
    ]
    for creds, arn in ((admin, KMS_ADMIN_ARN), (enclave, KMS_ENCLAVE_ARN)):
        lines += [
            "",
            "[[credentials]]",
            f"access_key_id = {_toml_string(creds.access_key_id)}",
            f"secret_access_key = {_toml_string(creds.secret_access_key)}",
            f"principal_arn = {_toml_string(arn)}",
        ]
    config = directory / "kms.toml"
    config.write_text("\n".join(lines) + "\n")
    config.chmod(0o600)  # it holds secrets
    log_path = directory / "kms.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("ENCLAVE_KMS_")}
    env.setdefault("ENCLAVE_LOG_LEVEL", "warning")
    # stderr to a file: a pipe nobody drains would fill up and block the daemon.
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "kms", "--config", str(config)],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            env=env,
        )
    try:
        deadline = time.monotonic() + timeout_s
        endpoint = None
        while endpoint is None:
            match = _LISTENING.search(log_path.read_bytes())
            if match:
                endpoint = match.group(1).decode()
            elif proc.poll() is not None:
                raise RuntimeError(
                    f"the KMS daemon exited with status {proc.returncode} at start:\n"
                    + _log_tail(log_path)
                )
            elif time.monotonic() > deadline:
                raise RuntimeError(
                    f"the KMS daemon did not listen within {timeout_s:g} s:\n" + _log_tail(log_path)
                )
            else:
                time.sleep(_POLL_S)
        yield KmsDaemon(
            endpoint=endpoint,
            admin=admin,
            enclave=enclave,
            state_dir=state,
            log_path=log_path,
            pid=proc.pid,
            trust_roots=tuple(trust_roots),
        )
        if proc.poll() is not None:
            raise RuntimeError(
                f"the KMS daemon died during the test (status {proc.returncode}):\n"
                + _log_tail(log_path)
            )
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(KMS_STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def _local_root(state_dir: Path) -> Path:
    """The state directory's local CA root (created if needed), as enclaves attest with it."""
    from attest.ca import LocalCA

    ca = LocalCA.load_or_create(state_dir / "ca")
    pem = state_dir / "ca" / "root.pem"
    if not pem.exists():
        pem.write_bytes(ca.root_pem)
    return pem


@pytest.fixture
def kms_daemon(tmp_path: Path, enclave_state_dir: Path) -> Iterator[KmsDaemon]:
    """A real KMS daemon process trusting the test's local CA; stopped after the test."""
    with start_kms_daemon(
        tmp_path / "kms-daemon", trust_roots=[_local_root(enclave_state_dir)]
    ) as daemon:
        yield daemon


# --- the inference stack ------------------------------------------------------------------


@contextmanager
def _short_private_dir() -> Iterator[Path]:
    """A short path (Unix socket paths are limited to 108 bytes), removed afterwards."""
    path = Path(tempfile.mkdtemp(prefix="er-"))
    try:
        yield path / "s"
    finally:
        shutil.rmtree(path, ignore_errors=True)


@_trio_fixture
async def inference_stack() -> AsyncIterator[InferenceStack]:
    """The bundled model served from a real enclave (see :mod:`runtime.stack`)."""
    from runtime.stack import open_inference_stack

    with _short_private_dir() as state_dir:
        async with open_inference_stack(state_dir) as served:
            yield served


@_trio_fixture
async def inference_client(inference_stack: InferenceStack) -> AsyncIterator[InferenceClient]:
    """An attested client to ``inference_stack`` (its PCR0 and PCR16 verified)."""
    from models.client import open_inference_client

    async with open_inference_client(
        inference_stack.endpoint, verifier=inference_stack.verifier()
    ) as client:
        yield client
