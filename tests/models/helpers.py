"""Model builders for tests (onnx.helper, no downloads), and in-memory connections to a
service."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING

import numpy as np
import trio
import trio.testing

from models.client import InferenceClient
from transport.rpc import RpcClient, open_rpc_client, serve_rpc

if TYPE_CHECKING:
    from models.service import InferenceService


def slow_model(nodes: int = 300, width: int = 512) -> bytes:
    """x float32 [N, width] -> y: ``nodes`` chained MatMul+Tanh (slow at a large N)."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(
        (rng.standard_normal((width, width)) / np.sqrt(width)).astype(np.float32), "w"
    )
    graph_nodes = []
    prev = "x"
    for i in range(nodes):
        graph_nodes.append(helper.make_node("MatMul", [prev, "w"], [f"m{i}"]))
        out = "y" if i == nodes - 1 else f"t{i}"
        graph_nodes.append(helper.make_node("Tanh", [f"m{i}"], [out]))
        prev = out
    graph = helper.make_graph(
        graph_nodes,
        "slow",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", width])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", width])],
        initializer=[w],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return bytes(model.SerializeToString())


def fixed_model() -> bytes:
    """a float32 [2, 3] + b int64 [2, 3] (cast) -> y float32 [2, 3]; no dynamic dims."""
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [
            helper.make_node("Cast", ["b"], ["bf"], to=TensorProto.FLOAT),
            helper.make_node("Add", ["a", "bf"], ["y"]),
        ],
        "fixed",
        [
            helper.make_tensor_value_info("a", TensorProto.FLOAT, [2, 3]),
            helper.make_tensor_value_info("b", TensorProto.INT64, [2, 3]),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return bytes(model.SerializeToString())


def gather_model(rows: int = 4) -> bytes:
    """i int64 [N] -> y float32 [N, 2]: rows of a constant table (an index out of range is a
    kernel error that only the values reveal, past any signature check)."""
    from onnx import TensorProto, helper, numpy_helper

    table = numpy_helper.from_array(np.arange(rows * 2, dtype=np.float32).reshape(rows, 2), "t")
    graph = helper.make_graph(
        [helper.make_node("Gather", ["t", "i"], ["y"], axis=0)],
        "gather",
        [helper.make_tensor_value_info("i", TensorProto.INT64, ["N"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 2])],
        initializer=[table],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return bytes(model.SerializeToString())


@asynccontextmanager
async def raw_connection(service: InferenceService) -> AsyncIterator[RpcClient]:
    """An RPC client on its own in-memory connection to ``service`` (no channel; for clients
    that misbehave)."""
    client_stream, server_stream = trio.testing.memory_stream_pair()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(serve_rpc, server_stream, service.connection_handler())
        async with open_rpc_client(client_stream) as rpc:
            yield rpc
        nursery.cancel_scope.cancel()


@asynccontextmanager
async def connected(service: InferenceService) -> AsyncIterator[InferenceClient]:
    """An :class:`InferenceClient` on its own in-memory connection to ``service``."""
    async with raw_connection(service) as rpc:
        yield InferenceClient(rpc, channel=None)
