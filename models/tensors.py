"""Tensors on the wire, model signatures and input validation (pure: numpy only).

A tensor travels as the msgpack map ``{"dtype": "float32", "shape": [N, 64], "data": <bytes>}``
with ``data`` the raw little-endian C-order bytes. Decoding is zero-copy (``np.frombuffer``) and
every field is checked before use: known dtype name, bounded rank, non-negative dimensions, a byte
length that matches ``prod(shape) * itemsize``, and an overall size cap. The shapes on the wire are
typed (:class:`WireTensor`, :class:`WireSignature`); a decoder takes whatever the peer sent
(``object``) and checks it.

A :class:`ModelSignature` is what onnxruntime reports for a session's inputs and outputs; its
:meth:`ModelSignature.validate` checks a request (names, dtypes, ranks, fixed dimensions, size
caps) before anything reaches onnxruntime, with a message that says exactly what is wrong.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Final, Protocol, TypedDict

import numpy as np
import numpy.typing as npt

from models.errors import InvalidInputError

__all__ = [
    "NodeArg",
    "Session",
    "DTYPES",
    "ORT_TYPES",
    "MAX_RANK",
    "DEFAULT_MAX_TENSOR_BYTES",
    "Array",
    "WireTensor",
    "WireTensorSpec",
    "WireSignature",
    "TensorSpec",
    "ModelSignature",
    "encode_tensor",
    "decode_tensor",
    "encode_tensors",
    "decode_tensors",
]

#: Wire dtype names -> numpy dtypes (little-endian; bool is one byte).
DTYPES: Final[dict[str, np.dtype[np.generic]]] = {
    name: np.dtype(name).newbyteorder("<") if np.dtype(name).itemsize > 1 else np.dtype(name)
    for name in (
        "float16",
        "float32",
        "float64",
        "int8",
        "int16",
        "int32",
        "int64",
        "uint8",
        "uint16",
        "uint32",
        "uint64",
        "bool",
    )
}
#: numpy dtype -> wire name (a dict lookup is ~50x cheaper than ``dtype.name`` in numpy 2).
_NAME_OF: Final[dict[np.dtype[np.generic], str]] = {dt: name for name, dt in DTYPES.items()}
#: onnxruntime type strings -> wire dtype names.
ORT_TYPES: Final[dict[str, str]] = {
    "tensor(float16)": "float16",
    "tensor(float)": "float32",
    "tensor(double)": "float64",
    "tensor(int8)": "int8",
    "tensor(int16)": "int16",
    "tensor(int32)": "int32",
    "tensor(int64)": "int64",
    "tensor(uint8)": "uint8",
    "tensor(uint16)": "uint16",
    "tensor(uint32)": "uint32",
    "tensor(uint64)": "uint64",
    "tensor(bool)": "bool",
}
#: Largest rank accepted on the wire (ONNX models rarely exceed 6).
MAX_RANK: Final = 8
#: Default cap on one tensor's bytes (16 MiB; the server's config can lower or raise it).
DEFAULT_MAX_TENSOR_BYTES: Final = 16 << 20
#: Most tensors in one request map (a model has a handful of inputs).
MAX_TENSORS: Final = 64
MAX_NAME_LEN: Final = 256

#: An array of any dtype (what the wire carries; a model's signature says which dtype).
Array = npt.NDArray[np.generic]


class WireTensor(TypedDict):
    """A tensor on the wire: ``data`` is the raw little-endian C-order bytes of ``shape``."""

    dtype: str
    shape: list[int]
    data: bytes


class WireTensorSpec(TypedDict):
    """One input or output of a model in a catalog answer (``None``/str = dynamic dimension)."""

    name: str
    dtype: str
    shape: list[int | str | None]


class WireSignature(TypedDict):
    """A model's signature in a catalog answer."""

    inputs: list[WireTensorSpec]
    outputs: list[WireTensorSpec]


class NodeArg(Protocol):
    """An input or output as onnxruntime describes it (``onnxruntime.NodeArg``)."""

    @property
    def name(self) -> str: ...

    @property
    def type(self) -> str: ...

    @property
    def shape(self) -> Sequence[int | str | None]: ...


class Session(Protocol):
    """What models/ uses of an ``onnxruntime.InferenceSession`` (onnxruntime has no types)."""

    def get_inputs(self) -> Sequence[NodeArg]: ...

    def get_outputs(self) -> Sequence[NodeArg]: ...

    def run(
        self,
        output_names: Sequence[str] | None,
        input_feed: Mapping[str, Array],
        run_options: object = None,
    ) -> Sequence[Array]: ...


def encode_tensor(array: npt.ArrayLike) -> WireTensor:
    """The wire form of an array (converted to little-endian C order if needed)."""
    arr = np.asarray(array)
    name = _NAME_OF.get(arr.dtype)
    if name is None:  # e.g. big-endian input: normalise to the little-endian wire dtype
        name = arr.dtype.name
        if name not in DTYPES:
            raise InvalidInputError(
                f"unsupported dtype {arr.dtype} (supported: {', '.join(DTYPES)})"
            )
        arr = arr.astype(DTYPES[name])
    return {"dtype": name, "shape": list(arr.shape), "data": arr.tobytes()}


def decode_tensor(
    obj: object, *, what: str = "tensor", max_bytes: int = DEFAULT_MAX_TENSOR_BYTES
) -> Array:
    """Check and decode a wire tensor (zero-copy, read-only view over the message bytes).

    Raises:
        InvalidInputError: malformed map, unknown dtype, bad shape, wrong byte length, too big.
    """
    if not isinstance(obj, Mapping) or set(obj) != {"dtype", "shape", "data"}:
        raise InvalidInputError(f"{what}: expected a map with exactly dtype, shape and data")
    dtype_name, shape, data = obj["dtype"], obj["shape"], obj["data"]
    if not isinstance(dtype_name, str) or dtype_name not in DTYPES:
        raise InvalidInputError(f"{what}: unsupported dtype {dtype_name!r}")
    if not isinstance(shape, list | tuple) or len(shape) > MAX_RANK:
        raise InvalidInputError(f"{what}: shape must be a list of at most {MAX_RANK} dimensions")
    if not all(type(d) is int and d >= 0 for d in shape):
        raise InvalidInputError(f"{what}: dimensions must be non-negative integers")
    if not isinstance(data, bytes | bytearray | memoryview):
        raise InvalidInputError(f"{what}: data must be bytes")
    dtype = DTYPES[dtype_name]
    count = math.prod(shape)
    nbytes = count * dtype.itemsize
    if nbytes > max_bytes:
        raise InvalidInputError(f"{what}: {nbytes} bytes exceeds the limit of {max_bytes}")
    if len(data) != nbytes:
        raise InvalidInputError(
            f"{what}: data has {len(data)} bytes, shape {list(shape)} of {dtype_name} "
            f"needs {nbytes}"
        )
    return np.frombuffer(data, dtype=dtype, count=count).reshape(tuple(shape))


def encode_tensors(arrays: Mapping[str, npt.ArrayLike]) -> dict[str, WireTensor]:
    """Wire form of a name -> array map."""
    return {name: encode_tensor(a) for name, a in arrays.items()}


def decode_tensors(
    obj: object, *, max_bytes: int = DEFAULT_MAX_TENSOR_BYTES, what: str = "inputs"
) -> dict[str, Array]:
    """Decode a name -> wire tensor map, with the total size bounded by ``max_bytes``."""
    if not isinstance(obj, Mapping) or not 0 < len(obj) <= MAX_TENSORS:
        raise InvalidInputError(f"{what}: expected a non-empty map of tensors")
    out: dict[str, Array] = {}
    budget = max_bytes
    for name, wire in obj.items():
        if not isinstance(name, str) or not 0 < len(name) <= MAX_NAME_LEN:
            raise InvalidInputError(f"{what}: tensor names must be non-empty strings")
        arr = decode_tensor(wire, what=f"{what} {name!r}", max_bytes=budget)
        budget -= arr.nbytes
        out[name] = arr
    return out


Dim = int | str | None


@dataclass(frozen=True, slots=True)
class TensorSpec:
    """One input or output of a model: name, wire dtype and shape (``None``/str = dynamic)."""

    name: str
    dtype: str
    shape: tuple[Dim, ...]

    def to_wire(self) -> WireTensorSpec:
        """The spec as a catalog answer carries it."""
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}

    @classmethod
    def from_wire(cls, obj: object) -> TensorSpec:
        """Parse a spec from a catalog answer."""
        if not isinstance(obj, Mapping):
            raise InvalidInputError("tensor spec must be a map")
        shape = obj.get("shape")
        if not isinstance(shape, list):
            raise InvalidInputError("tensor spec shape must be a list")
        return cls(name=str(obj.get("name")), dtype=str(obj.get("dtype")), shape=tuple(shape))

    @property
    def batch_dynamic(self) -> bool:
        """True if the first dimension is dynamic (requests can be concatenated on it)."""
        return len(self.shape) >= 1 and not isinstance(self.shape[0], int)


@dataclass(frozen=True, slots=True)
class ModelSignature:
    """A model's inputs and outputs as onnxruntime reports them."""

    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]

    @classmethod
    def from_session(cls, session: Session) -> ModelSignature:
        """Read the signature of an ``onnxruntime.InferenceSession``."""

        def spec(arg: NodeArg) -> TensorSpec:
            dtype = ORT_TYPES.get(arg.type)
            if dtype is None:
                raise InvalidInputError(f"model uses unsupported type {arg.type} for {arg.name}")
            dims = tuple(d if isinstance(d, int) and d >= 0 else None for d in arg.shape)
            return TensorSpec(arg.name, dtype, dims)

        return cls(
            inputs=tuple(spec(a) for a in session.get_inputs()),
            outputs=tuple(spec(a) for a in session.get_outputs()),
        )

    @property
    def batchable(self) -> bool:
        """True if every input and output has a dynamic first dimension."""
        return all(s.batch_dynamic for s in (*self.inputs, *self.outputs))

    def validate(self, arrays: Mapping[str, Array], *, max_batch: int | None = None) -> int:
        """Check ``arrays`` against the inputs; return the batch size (first dim, or 1).

        Raises:
            InvalidInputError: missing or unknown input, wrong dtype, rank or fixed dimension,
                an empty input (zero rows), inconsistent batch sizes, or a batch above
                ``max_batch``.
        """
        expected = {s.name: s for s in self.inputs}
        unknown = sorted(set(arrays) - set(expected))
        if unknown:
            raise InvalidInputError(
                f"unknown input(s) {unknown}; the model takes {sorted(expected)}"
            )
        missing = sorted(set(expected) - set(arrays))
        if missing:
            raise InvalidInputError(f"missing input(s) {missing}")
        batch: int | None = None
        for name, spec in expected.items():
            arr = arrays[name]
            if arr.dtype != DTYPES.get(spec.dtype):
                raise InvalidInputError(
                    f"input {name!r}: dtype {arr.dtype.name}, the model expects {spec.dtype}"
                )
            if arr.ndim != len(spec.shape):
                raise InvalidInputError(
                    f"input {name!r}: rank {arr.ndim} (shape {list(arr.shape)}), the model "
                    f"expects rank {len(spec.shape)} {_fmt_shape(spec.shape)}"
                )
            for axis, (got, want) in enumerate(zip(arr.shape, spec.shape, strict=True)):
                if isinstance(want, int) and got != want:
                    raise InvalidInputError(
                        f"input {name!r}: dimension {axis} is {got}, the model expects {want} "
                        f"{_fmt_shape(spec.shape)}"
                    )
            if arr.size == 0:
                # onnxruntime answers an empty batch with a kernel error (an "internal" failure
                # to the client) or, worse, an empty result; it is the request that is wrong.
                raise InvalidInputError(
                    f"input {name!r} is empty (shape {list(arr.shape)}): send at least one row"
                )
            if spec.batch_dynamic:
                if batch is not None and arr.shape[0] != batch:
                    raise InvalidInputError("inputs disagree on the batch size")
                batch = arr.shape[0]
        n = 1 if batch is None else batch
        if max_batch is not None and n > max_batch:
            raise InvalidInputError(f"batch of {n} exceeds the limit of {max_batch}")
        return n

    def to_wire(self) -> WireSignature:
        """The signature as a catalog answer carries it."""
        return {
            "inputs": [s.to_wire() for s in self.inputs],
            "outputs": [s.to_wire() for s in self.outputs],
        }


def _fmt_shape(shape: Sequence[Dim]) -> str:
    return "[" + ", ".join("N" if not isinstance(d, int) else str(d) for d in shape) + "]"
