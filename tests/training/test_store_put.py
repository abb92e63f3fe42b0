"""The host store's ``put`` (enclave outputs kept on the host), over memory streams."""

from __future__ import annotations

from pathlib import Path

import pytest
import trio
import trio.testing

from models.store import FETCH_CHUNK, ModelStore, StoreClient
from transport.rpc import RpcError, open_rpc_client, serve_rpc


async def _with_store(store: ModelStore, fn: object) -> None:
    a, b = trio.testing.memory_stream_pair()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(serve_rpc, b, store.handle)
        async with open_rpc_client(a) as rpc:
            await fn(StoreClient(rpc))  # type: ignore[operator]
        nursery.cancel_scope.cancel()


async def test_an_output_is_kept_and_fetched_back(tmp_path: Path) -> None:
    model = tmp_path / "m.sealed"
    model.write_bytes(b"provisioned")
    store = ModelStore({"m": model}, credentials=None, outputs_dir=tmp_path / "out")
    data = bytes(range(256)) * (2 * FETCH_CHUNK // 256 + 3)  # several messages

    async def check(client: StoreClient) -> None:
        await client.put("ckpt-00000004", data)
        assert await client.fetch("ckpt-00000004") == data
        await client.put("ckpt-00000004", b"newer")  # an output may be replaced
        assert await client.fetch("ckpt-00000004") == b"newer"
        for bad in ("../escape", ".hidden", "a/b", "", "x" * 129):
            with pytest.raises(RpcError) as info:
                await client.put(bad, b"x")
            assert info.value.code == "invalid_argument"
        with pytest.raises(RpcError) as info:
            await client.put("m", b"overwrite a provisioned model")
        assert info.value.code == "permission_denied"
        assert await client.fetch("m") == b"provisioned"

    with trio.fail_after(10):
        await _with_store(store, check)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["ckpt-00000004"]


async def test_put_is_refused_without_an_outputs_dir_or_over_the_bound(tmp_path: Path) -> None:
    async def refused(client: StoreClient) -> None:
        with pytest.raises(RpcError) as info:
            await client.put("out", b"x")
        assert info.value.code == "permission_denied"

    async def too_big(client: StoreClient) -> None:
        with pytest.raises(RpcError) as info:
            await client.put("out", b"x" * 101)
        assert info.value.code == "invalid_argument"

    with trio.fail_after(10):
        await _with_store(ModelStore({}, credentials=None), refused)
        small = ModelStore({}, credentials=None, outputs_dir=tmp_path, max_output_bytes=100)
        await _with_store(small, too_big)
    assert list(tmp_path.iterdir()) == []  # nothing half-written left
