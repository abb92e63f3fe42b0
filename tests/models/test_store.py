"""The host-side model store and its enclave-side client, over memory streams."""

from __future__ import annotations

from pathlib import Path

import pytest
import structlog
import trio
import trio.testing

from models.errors import ModelLoadError
from models.store import FETCH_CHUNK, HostCredentials, ModelStore, StoreClient
from transport.rpc import RpcError, open_rpc_client, serve_rpc

SECRET = "s3cr3t-access-key-value"


async def _with_store(store: ModelStore, fn: object) -> None:
    a, b = trio.testing.memory_stream_pair()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(serve_rpc, b, store.handle)
        async with open_rpc_client(a) as rpc:
            await fn(StoreClient(rpc))  # type: ignore[operator]
        nursery.cancel_scope.cancel()


async def test_store_round_trip(tmp_path: Path) -> None:
    big = tmp_path / "big.sealed"
    big.write_bytes(bytes(range(256)) * (3 * FETCH_CHUNK // 256 + 7))  # several chunks
    store = ModelStore(
        {"big": big},
        credentials=HostCredentials("AKIDEXAMPLE", SECRET, "tok", region="eu-west-1"),
    )

    async def check(client: StoreClient) -> None:
        creds = await client.credentials()
        assert creds.secret_access_key == SECRET
        assert creds.region == "eu-west-1"
        assert SECRET not in repr(creds)
        assert await client.fetch("big") == big.read_bytes()
        with pytest.raises(RpcError, match="no model"):
            await client.fetch("missing")
        with pytest.raises(ModelLoadError, match="bad size"):
            await client.fetch("big", max_size=10)
        await client.ready({"port": 5005, "error": None, "models": [{"name": "big"}]})

    with structlog.testing.capture_logs() as logs, trio.fail_after(10):
        await _with_store(store, check)
        report = await store.wait_report(0)
    assert report["port"] == 5005
    assert all(SECRET not in repr(entry) for entry in logs)


async def test_store_without_credentials_refuses(tmp_path: Path) -> None:
    store = ModelStore({}, credentials=None)

    async def check(client: StoreClient) -> None:
        with pytest.raises(RpcError) as info:
            await client.credentials()
        assert info.value.code == "permission_denied"

    with trio.fail_after(10):
        await _with_store(store, check)
