"""Sealing and unsealing models with KMS data keys (the I/O around :mod:`models.sealed`).

* :func:`seal_model_file` (model owner, host side): check the ONNX file (or the text model
  bundle: graph + tokenizer + config, sealed and digested as one unit) loads, hash it, ask KMS
  ``GenerateDataKey`` for a 256-bit data key under ``key_id`` with an encryption context naming
  the model, seal in bounded memory to a temporary file and rename it into place. The plaintext
  data key lives only in this process's memory for the duration of the call.
* :func:`unseal_model` (enclave side): parse the header, get the data key back through
  ``Decrypt`` with ``Recipient`` (only an enclave whose attestation satisfies the key policy gets
  it, and only inside the CMS envelope for its own RSA key), unseal and check the digest.
"""

from __future__ import annotations

import base64
import os
import tempfile
from collections.abc import AsyncIterable, AsyncIterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Protocol

import trio

from models import sealed
from models._progress import ProgressBar
from models.errors import ModelLoadError, SealedFormatError

__all__ = [
    "MODEL_CONTEXT_KEY",
    "SealResult",
    "seal_model_file",
    "unseal_model",
    "check_onnx_loadable",
    "check_bundle_loadable",
    "check_model_loadable",
    "is_bundle",
    "CONTENT_CONTEXT_KEY",
    "TEXT_BUNDLE",
    "DataKeyDecrypter",
    "KmsCaller",
]

#: Encryption-context key naming the model: KMS binds the data key to it, so a sealed file of one
#: model cannot be passed off as another under the same key.
MODEL_CONTEXT_KEY: Final = "enclave-runtime:model"
#: Encryption-context key saying what a sealed file holds when it is not a plain ONNX graph
#: (``enclave model inspect`` shows it without any key; KMS binds the data key to it too).
CONTENT_CONTEXT_KEY: Final = "enclave-runtime:content"
#: Its value for a text model bundle (graph + tokenizer + config, ``models.text.bundle``).
TEXT_BUNDLE: Final = "text-bundle"
#: Models up to this size are checked from memory (``InferenceSession(bytes)``, exactly what the
#: server does); larger ones from their path so the check does not double their footprint.
_CHECK_IN_MEMORY_MAX: Final = 512 << 20


class KmsCaller(Protocol):
    """What sealing needs of :class:`kms.client.KmsClient`."""

    async def call(self, operation: str, payload: Mapping[str, Any]) -> dict[str, Any]: ...


class DataKeyDecrypter(Protocol):
    """What unsealing needs of :class:`kms.client.AttestedKmsClient`."""

    async def decrypt(
        self,
        ciphertext_blob: bytes,
        *,
        key_id: str | None = None,
        encryption_context: Mapping[str, str] | None = None,
    ) -> bytes: ...


@dataclass(frozen=True, slots=True)
class SealResult:
    """What :func:`seal_model_file` wrote."""

    path: Path
    header: sealed.SealedHeader


def is_bundle(path: Path) -> bool:
    """Whether ``path`` holds a text model bundle (by its prefix, ``models.text.bundle``)."""
    from models.text.bundle import PREFIX

    with Path(path).open("rb") as f:
        return f.read(len(PREFIX)) == PREFIX


def check_bundle_loadable(path: Path) -> None:
    """Raise unless ``path`` is a valid text bundle whose tokenizer and graph load and whose
    graph has the text-embedding signature (``models.text.embedder.Embedder``).

    Raises:
        BundleFormatError: malformed bundle.
        ModelLoadError: the graph does not load or is not a text-embedding graph.
    """
    from models.text.bundle import read_bundle
    from models.text.embedder import Embedder

    Embedder(read_bundle(path), threads=1)


def check_model_loadable(path: Path) -> None:
    """:func:`check_bundle_loadable` for a bundle, :func:`check_onnx_loadable` otherwise."""
    if is_bundle(path):
        check_bundle_loadable(path)
    else:
        check_onnx_loadable(path)


def check_onnx_loadable(path: Path) -> None:
    """Raise :class:`ModelLoadError` unless onnxruntime can load the model at ``path``."""
    from models.engine import create_session

    size = path.stat().st_size
    if size > sealed.MAX_MODEL_SIZE:
        raise ModelLoadError(f"{path}: {size} bytes exceeds {sealed.MAX_MODEL_SIZE}")
    if size <= _CHECK_IN_MEMORY_MAX:
        create_session(path.read_bytes())
        return
    import onnxruntime as ort

    try:
        ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises untyped exceptions
        raise ModelLoadError(f"not a loadable ONNX model: {exc}") from exc


def _seal_sync(
    model_path: Path,
    out_path: Path,
    *,
    data_key: bytes,
    header: sealed.SealedHeader,
) -> None:
    out_path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{out_path.name}.", dir=out_path.parent)
    tmp = Path(tmp_name)
    try:
        with model_path.open("rb") as src, os.fdopen(fd, "wb") as dst:
            bar = ProgressBar(f"sealing {model_path.name}", header.total_size)
            sealed.seal_stream(src, dst, data_key=data_key, header=header, progress=bar)
            dst.flush()
            os.fsync(dst.fileno())
        os.replace(tmp, out_path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


async def seal_model_file(
    model_path: Path,
    out_path: Path,
    *,
    kms: KmsCaller,
    key_id: str,
    name: str | None = None,
    encryption_context: Mapping[str, str] | None = None,
    chunk_size: int = sealed.DEFAULT_CHUNK_SIZE,
) -> SealResult:
    """Seal an ONNX model under a fresh KMS data key (see the module docstring).

    Raises:
        ModelLoadError: the file is not a loadable ONNX model.
        kms.errors.KmsApiError: KMS refused (unknown key, access denied...).
        SealedFormatError: a field is out of bounds, or the file changed while sealing.
    """
    model_path = Path(model_path)
    model_name = name or model_path.stem
    await trio.to_thread.run_sync(check_model_loadable, model_path)
    content = {CONTENT_CONTEXT_KEY: TEXT_BUNDLE} if is_bundle(model_path) else {}

    def _hash() -> tuple[bytes, int]:
        with model_path.open("rb") as f:
            return sealed.sha384_file(f)

    digest, size = await trio.to_thread.run_sync(_hash)
    context = {MODEL_CONTEXT_KEY: model_name, **content, **dict(encryption_context or {})}
    answer = await kms.call(
        "GenerateDataKey", {"KeyId": key_id, "KeySpec": "AES_256", "EncryptionContext": context}
    )
    try:
        data_key = base64.b64decode(answer["Plaintext"], validate=True)
        blob = base64.b64decode(answer["CiphertextBlob"], validate=True)
        resolved_key = str(answer.get("KeyId") or key_id)
    except (KeyError, TypeError, ValueError) as exc:
        raise SealedFormatError("GenerateDataKey answer is malformed") from exc
    header = sealed.new_header(
        key_id=resolved_key,
        encrypted_data_key=blob,
        model_name=model_name,
        model_sha384=digest,
        total_size=size,
        encryption_context=context,
        chunk_size=chunk_size,
    )
    await trio.to_thread.run_sync(
        lambda: _seal_sync(model_path, Path(out_path), data_key=data_key, header=header)
    )
    return SealResult(Path(out_path), header)


def inspect_sealed(path: Path) -> sealed.SealedHeader:
    """The header of a sealed file (no key needed)."""
    with Path(path).open("rb") as f:
        return sealed.read_header(f)[0]


async def unseal_model(
    data: bytes | bytearray | memoryview | AsyncIterable[bytes],
    *,
    kms: DataKeyDecrypter,
    expected_name: str | None = None,
) -> tuple[sealed.SealedHeader, bytearray]:
    """Get the data key through ``kms`` (attested Decrypt) and unseal the model into memory.

    ``data`` is the whole sealed file, or its bytes as they arrive (an async iterable of pieces
    of any size, such as :meth:`models.store.StoreClient.fetch_pieces`): pieces are unsealed as
    they come (:class:`models.sealed.Unsealer`), so the sealed file is never held whole and the
    plaintext exists once, in the returned buffer. Nothing is pulled from ``data`` while the
    key is being released.

    Raises:
        SealedFormatError / SealedIntegrityError: malformed, tampered or truncated file.
        ModelLoadError: the header names another model than ``expected_name``.
        kms.errors.KmsApiError: the key was not released (for example the attestation does not
            satisfy the key policy).
    """
    pieces = _pieces(data)
    unsealer = sealed.Unsealer()
    rest: memoryview | None = None
    async for piece in pieces:
        rest = unsealer.feed_header(piece)
        if rest is not None:
            break
    header = unsealer.header
    if rest is None or header is None:
        raise SealedFormatError("sealed model header is truncated")
    if expected_name is not None and header.model_name != expected_name:
        raise ModelLoadError(
            f"sealed file holds model {header.model_name!r}, expected {expected_name!r}"
        )
    if header.encryption_context.get(MODEL_CONTEXT_KEY, header.model_name) != header.model_name:
        raise ModelLoadError("sealed header's encryption context names another model")
    data_key = await kms.decrypt(
        header.encrypted_data_key,
        key_id=header.key_id,
        encryption_context=header.encryption_context,
    )
    try:
        unsealer.start(data_key)
    finally:
        del data_key
    try:
        await _feed(unsealer, rest)
        del rest
        async for piece in pieces:
            await _feed(unsealer, piece)
        return unsealer.finish()
    except BaseException:
        unsealer.abort()
        raise


#: Pieces at least this large are unsealed in a worker thread (AES-GCM + SHA-384 run at
#: roughly 1 GB/s here, so a 4 MiB piece blocks the event loop for a few ms at most).
_THREAD_PIECE_BYTES: Final = 4 << 20


async def _feed(unsealer: sealed.Unsealer, piece: bytes | bytearray | memoryview) -> None:
    if len(piece) >= _THREAD_PIECE_BYTES:
        await trio.to_thread.run_sync(unsealer.feed, piece)
    else:
        unsealer.feed(piece)
        await trio.lowlevel.checkpoint()


async def _one_piece(data: bytes | bytearray | memoryview) -> AsyncIterator[bytes | memoryview]:
    yield memoryview(data)


def _pieces(
    data: bytes | bytearray | memoryview | AsyncIterable[bytes],
) -> AsyncIterator[bytes | memoryview]:
    if isinstance(data, bytes | bytearray | memoryview):
        return _one_piece(data)
    return aiter(data)
