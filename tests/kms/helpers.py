"""Shared builders for the kms tests: an in-process daemon thread, emulated enclaves, clients."""

from __future__ import annotations

import hashlib
import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any

import trio

from attest.ca import LocalCA
from attest.nsm.device import EnclaveIdentity, NsmDevice
from attest.nsm.local import InProcessNsm
from kms.app import KmsApp
from kms.config import CredentialEntry, KmsConfig
from kms.daemon import serve_kms
from kms.sigv4 import sign_headers

ACCOUNT = "111122223333"
ADMIN = CredentialEntry("AKIDADMIN", "admin-secret", f"arn:aws:iam::{ACCOUNT}:user/admin")
ENCLAVE = CredentialEntry("AKIDENCLAVE", "enclave-secret", f"arn:aws:iam::{ACCOUNT}:role/enclave")
OUTSIDER = CredentialEntry(
    "AKIDOUTSIDER", "outsider-secret", "arn:aws:iam::444455556666:user/mallory"
)
ALL_CREDS = (ADMIN, ENCLAVE, OUTSIDER)


def pcr(label: str) -> bytes:
    """A deterministic 48-byte PCR value for a label."""
    return hashlib.sha384(label.encode()).digest()


class DaemonThread:
    """``serve_kms`` in its own trio loop on a thread; graceful stop on exit."""

    def __init__(self, config: KmsConfig, env: dict[str, str] | None = None) -> None:
        self.config = config
        self.env = env if env is not None else {}
        self.address: tuple[str, int] | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._token: trio.lowlevel.TrioToken | None = None
        self._shutdown: trio.Event | None = None
        self._thread = threading.Thread(target=self._run, daemon=True)

    @property
    def endpoint(self) -> str:
        assert self.address is not None
        return f"http://{self.address[0]}:{self.address[1]}"

    def _run(self) -> None:
        try:
            trio.run(self._main)
        except BaseException as exc:  # surfaced by __enter__
            self._error = exc
            self._ready.set()

    async def _main(self) -> None:
        self._token = trio.lowlevel.current_trio_token()
        self._shutdown = trio.Event()
        async with trio.open_nursery() as nursery:
            self.address = await nursery.start(
                partial(serve_kms, self.config, shutdown=self._shutdown, env=self.env)
            )
            self._ready.set()

    def __enter__(self) -> DaemonThread:
        self._thread.start()
        if not self._ready.wait(20):
            raise TimeoutError("daemon did not start")
        if self._error is not None:
            raise self._error
        return self

    def __exit__(self, *exc: object) -> None:
        if self._token is not None and self._shutdown is not None:
            trio.from_thread.run_sync(self._shutdown.set, trio_token=self._token)
        self._thread.join(20)
        assert not self._thread.is_alive(), "daemon thread did not stop"


@contextmanager
def running_daemon(config: KmsConfig, env: dict[str, str] | None = None) -> Iterator[DaemonThread]:
    with DaemonThread(config, env) as d:
        yield d


@dataclass
class FakeEnclave:
    """An emulated enclave's NSM: documents signed by the test CA for given PCRs."""

    device: NsmDevice
    module_id: str

    @classmethod
    def create(
        cls,
        ca: LocalCA,
        *,
        image: str = "server-image",
        debug: bool = False,
        clock: Any = None,
        module_id: str = "i-0123456789abcdef0-enc0123456789abcdef",
    ) -> FakeEnclave:
        pcrs = {0: pcr(image + "/0"), 1: pcr(image + "/1"), 2: pcr(image + "/2"), 8: pcr("signer")}
        identity = EnclaveIdentity(module_id=module_id, pcrs=pcrs, debug=debug)
        kwargs = {"clock": clock} if clock is not None else {}
        return cls(NsmDevice(identity, ca.new_signer(module_id), **kwargs), module_id)

    def document(self, public_key: bytes | None) -> bytes:
        return InProcessNsm(self.device).document(public_key=public_key)

    async def attestation(
        self,
        *,
        user_data: bytes | None = None,
        nonce: bytes | None = None,
        public_key: bytes | None = None,
    ) -> bytes:
        """AttestationSource for AttestedKmsClient."""
        return self.document(public_key)


def image_pcrs(image: str = "server-image") -> dict[int, str]:
    return {
        0: pcr(image + "/0").hex(),
        1: pcr(image + "/1").hex(),
        2: pcr(image + "/2").hex(),
        8: pcr("signer").hex(),
    }


def enclave_policy(
    image: str = "server-image", *, extra: list[dict[str, Any]] | None = None
) -> dict[str, Any]:
    """Admin: everything; the enclave role: Decrypt/GenerateDataKey/... for that image only."""
    p = image_pcrs(image)
    return {
        "Version": "2012-10-17",
        "Statement": [
            {
                "Sid": "Admin",
                "Effect": "Allow",
                "Principal": {"AWS": ADMIN.principal_arn},
                "Action": "kms:*",
                "Resource": "*",
            },
            {
                "Sid": "EnclaveOnly",
                "Effect": "Allow",
                "Principal": {"AWS": ENCLAVE.principal_arn},
                "Action": ["kms:Decrypt", "kms:GenerateDataKey", "kms:DescribeKey"],
                "Resource": "*",
                "Condition": {
                    "StringEqualsIgnoreCase": {
                        "kms:RecipientAttestation:ImageSha384": p[0].upper(),
                        "kms:RecipientAttestation:PCR0": p[0],
                        "kms:RecipientAttestation:PCR8": p[8],
                    }
                },
            },
            *(extra or []),
        ],
    }


def now_utc() -> datetime:
    return datetime.now(UTC)


def root_pem_file(ca: LocalCA, directory: Path) -> Path:
    path = directory / "root.pem"
    path.write_bytes(ca.root_pem)
    return path


# --- the AWS CLI, in this process -------------------------------------------------------------

_CLI_LOCK = threading.Lock()


class _ThisThreadOnly:
    """A stand-in for sys.stdout/stderr: this thread's writes go to ``buffer``, other threads'
    (the in-process daemon's log lines) to the original stream."""

    def __init__(self, original: Any, buffer: Any) -> None:
        self._original, self._buffer = original, buffer
        self._owner = threading.current_thread()

    def _target(self) -> Any:
        return self._buffer if threading.current_thread() is self._owner else self._original

    def write(self, text: str) -> int:
        return int(self._target().write(text))

    def flush(self) -> None:
        self._target().flush()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._target(), name)


def aws_cli(endpoint: str, cred: CredentialEntry, *args: str) -> tuple[int, Any, str]:
    """Run ``aws --endpoint-url <endpoint> kms <args>`` with the AWS CLI's own driver, in this
    process (the CLI's argument parsing, shape conversion and output, without an interpreter
    start per call). Returns (exit code, parsed JSON output or None, stderr)."""
    import io
    import json
    import os
    import sys

    from awscli.clidriver import create_clidriver

    env = {
        "AWS_ACCESS_KEY_ID": cred.access_key_id,
        "AWS_SECRET_ACCESS_KEY": cred.secret_access_key,
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_CONFIG_FILE": os.devnull,
        "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
        "AWS_EC2_METADATA_DISABLED": "true",
        "AWS_MAX_ATTEMPTS": "1",
    }
    with _CLI_LOCK:  # the CLI reads os.environ: one call at a time
        saved = {k: os.environ.get(k) for k in env}
        os.environ.update(env)
        out, err = io.StringIO(), io.StringIO()
        stdout, stderr = sys.stdout, sys.stderr
        sys.stdout, sys.stderr = _ThisThreadOnly(stdout, out), _ThisThreadOnly(stderr, err)
        try:
            code = create_clidriver().main(
                ["--endpoint-url", endpoint, "--output", "json", "kms", *args]
            )
        finally:
            sys.stdout, sys.stderr = stdout, stderr
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
    text = out.getvalue().strip()
    return code, json.loads(text) if text else None, err.getvalue()


def openssl(*args: str, data: bytes | None = None) -> tuple[int, bytes, bytes]:
    """Run the system ``openssl`` (skips the calling test when it is not installed)."""
    import shutil
    import subprocess

    import pytest

    exe = shutil.which("openssl")
    if exe is None:
        pytest.skip("openssl is not installed")
    proc = subprocess.run([exe, *args], input=data, capture_output=True, timeout=60, check=False)
    return proc.returncode, proc.stdout, proc.stderr


async def app_call(
    app: KmsApp, env: dict[str, str], operation: str, payload: dict[str, Any]
) -> tuple[int, Any]:
    """``TrentService.<operation>`` straight to ``app`` (no HTTP), signed with the credentials
    of ``env`` (``ENCLAVE_KMS_ACCESS_KEY_ID``/``_SECRET_ACCESS_KEY``); (status, JSON body)."""
    body = json.dumps(payload).encode()
    headers = sign_headers(
        method="POST",
        host="kms.local",
        path="/",
        headers={
            "Content-Type": "application/x-amz-json-1.1",
            "X-Amz-Target": f"TrentService.{operation}",
        },
        body=body,
        access_key_id=env["ENCLAVE_KMS_ACCESS_KEY_ID"],
        secret_access_key=env["ENCLAVE_KMS_SECRET_ACCESS_KEY"],
        session_token=None,
        region="us-east-1",
        service="kms",
        now=datetime.now(UTC),
    )
    reply = await app.handle("POST", "/", list(headers.items()), body)
    return reply.status, json.loads(reply.body)
