"""Fixtures for the end-to-end tests: a real KMS daemon, runtime, vsock-proxy, model store,
ingress and server enclave (subprocess) per test, in a short private state directory."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import trio

from runtime.demo import (
    ServerHandle,
    Stack,
    build_server_image,
    create_model_key,
    open_stack,
    seal_bundled_model,
    start_server,
)

_ENV = ("ENCLAVE_STATE_DIR", "ENCLAVE_VSOCK_DIR")


@pytest.fixture
def short_state_dir() -> Iterator[Path]:
    """A short path (Unix socket paths are limited to 108 bytes); env restored afterwards."""
    saved = {k: os.environ.get(k) for k in _ENV}
    path = Path(tempfile.mkdtemp(prefix="er-it-"))
    try:
        yield path / "s"
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        shutil.rmtree(path, ignore_errors=True)


@dataclass
class Served:
    """A stack with the digits server running and reachable through the ingress."""

    stack: Stack
    server: ServerHandle
    eif: Path
    pcr0: str
    digest: str
    key_arn: str
    endpoint: str

    def verifier(self, **policy: Any) -> Any:
        from models.client import make_verifier, policy_for

        policy.setdefault("pcr0", self.pcr0)
        policy.setdefault("model_digests", [self.digest])
        return make_verifier(self.stack.roots(), policy_for(**policy))


@pytest.fixture
async def served(short_state_dir: Path) -> AsyncIterator[Served]:
    sealed_path = short_state_dir / "models" / "digits.sealed"
    async with open_stack(short_state_dir, models={"digits": sealed_path}) as stack:
        with trio.fail_after(60):  # the set-up's own bound (the test body has its own)
            eif = short_state_dir / "server.eif"
            image = build_server_image(eif)
            pcr0 = image.pcrs[0].hex()
            key = await create_model_key(stack, pcr0)
            sealed = await seal_bundled_model(stack, key, sealed_path)
            server = await start_server(stack, eif)
            assert server.report.get("error") is None, server.report
            port = await stack.start_ingress(server.cid)
        yield Served(
            stack=stack,
            server=server,
            eif=eif,
            pcr0=pcr0,
            digest=sealed.header.model_sha384.hex(),
            key_arn=key,
            endpoint=f"127.0.0.1:{port}",
        )
