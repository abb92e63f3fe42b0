"""Shared builders for the kms tests: an in-process daemon thread, emulated enclaves, clients."""

from __future__ import annotations

import hashlib
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
from kms.config import CredentialEntry, KmsConfig
from kms.daemon import serve_kms

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
