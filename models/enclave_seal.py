"""Seal outputs inside an enclave, keep them on the host, read them back: the enclave side.

An enclave app that must hand something out of the enclave (a training checkpoint, an
aggregate, a fine-tuned model) seals it in the sealed-model format (:mod:`models.sealed`:
chunked AES-256-GCM under a fresh KMS data key, a header with the SHA-384 of the plaintext)
under a KMS key whose policy releases data keys only to the image's measurement, and stores the
ciphertext on the host (:meth:`models.store.StoreClient.put`)::

    kms = AttestedKmsClient(KmsClient(vsock=..., credentials=...), nsm)
    sealed = await seal_output(state, kms=kms, key_id="alias/my-app", name="checkpoint")
    await store.put("checkpoint", sealed)
    ...
    state = await unseal_output(await store.fetch("checkpoint"), kms=kms, name="checkpoint")

The data key is generated with ``Recipient`` (the attested KMS client): KMS encrypts it to the
enclave's own key, so the host relaying the answer never sees it; the header keeps only its
KMS ciphertext. The encryption context marks the file as an enclave output of a series (a
provisioned model or shard has another context: KMS would release its key under that context
only, and :func:`unseal_output` refuses a file without the output marker), and the output's
name is in the header, which every chunk's AAD binds: the host cannot hand back another file
under that name. :class:`OutputSealer` seals a series (a run's checkpoints) under one data key.
Whoever can run the same image may unseal it (that is the point: a resumed run, a replica);
nobody else, the host included. The host can still withhold an output or hand back an older
one under the same name; an app that must rule that out keeps a counter inside what it seals.
"""

from __future__ import annotations

import hashlib
import io
from collections.abc import AsyncIterable, Mapping
from typing import Final, Protocol

import trio

from models import sealed
from models.errors import SealedFormatError
from models.sealing import CONTENT_CONTEXT_KEY, DataKeyDecrypter, unseal_model

__all__ = [
    "DataKeySource",
    "OutputSealer",
    "seal_output",
    "unseal_output",
    "OUTPUT_CONTENT",
    "SERIES_CONTEXT_KEY",
]

#: The content marker of an enclave output in its encryption context.
OUTPUT_CONTENT: Final = "enclave-output"
#: Outputs at least this large are sealed in a worker thread.
_THREAD_BYTES: Final = 1 << 20


class DataKeySource(Protocol):
    """Fresh data keys released to this enclave (``kms.client.AttestedKmsClient``)."""

    async def generate_data_key(
        self,
        key_id: str,
        *,
        key_spec: str = "AES_256",
        encryption_context: Mapping[str, str] | None = None,
    ) -> tuple[bytes, bytes]:
        """``(plaintext data key, its KMS ciphertext blob)``."""
        ...


#: The encryption-context key naming an output series (a run's checkpoints share one).
SERIES_CONTEXT_KEY: Final = "enclave-runtime:output-series"


class OutputSealer:
    """Seals a series of outputs (a run's checkpoints) under one data key, fetched once.

    Every output still gets its own file key (the sealed format derives it from the data key
    and a fresh random salt per file), so nonces never repeat; the output's name is in its
    header, which every chunk's AAD binds, and :func:`unseal_output` checks it. Sharing the
    data key saves a KMS round trip per output (a checkpoint every few seconds would otherwise
    pay one each time). The data key lives in this object's memory only.
    """

    def __init__(self, data_key: bytes, blob: bytes, *, key_id: str, context: dict[str, str]):
        self._data_key = data_key
        self._blob = blob
        self._key_id = key_id
        self._context = context

    @classmethod
    async def open(
        cls,
        *,
        kms: DataKeySource,
        key_id: str,
        series: str,
        encryption_context: Mapping[str, str] | None = None,
    ) -> OutputSealer:
        """Get a data key of ``key_id`` (released to this enclave only) for ``series``.

        Raises:
            kms.errors.KmsError: KMS refused the data key.
        """
        context = {
            **dict(encryption_context or {}),
            SERIES_CONTEXT_KEY: series,
            CONTENT_CONTEXT_KEY: OUTPUT_CONTENT,
        }
        data_key, blob = await kms.generate_data_key(key_id, encryption_context=context)
        return cls(data_key, blob, key_id=key_id, context=context)

    async def seal(
        self,
        data: bytes | bytearray | memoryview,
        *,
        name: str,
        chunk_size: int = sealed.DEFAULT_CHUNK_SIZE,
    ) -> bytes:
        """``data`` sealed as output ``name`` (a thread for large outputs).

        Raises:
            SealedFormatError: ``data`` is over the format's size bound.
        """
        view = memoryview(data).cast("B")
        if len(view) > sealed.MAX_MODEL_SIZE:
            raise SealedFormatError(f"an output of {len(view)} bytes is over the sealed bound")
        header = sealed.new_header(
            key_id=self._key_id,
            encrypted_data_key=self._blob,
            model_name=name,
            model_sha384=hashlib.sha384(view).digest(),
            total_size=len(view),
            encryption_context=self._context,
            chunk_size=chunk_size,
        )
        key = self._data_key

        def seal() -> bytes:
            out = io.BytesIO()
            sealed.seal_stream(io.BytesIO(view), out, data_key=key, header=header)
            return out.getvalue()

        if len(view) >= _THREAD_BYTES:
            return await trio.to_thread.run_sync(seal)
        return seal()


async def seal_output(
    data: bytes | bytearray | memoryview,
    *,
    kms: DataKeySource,
    key_id: str,
    name: str,
    encryption_context: Mapping[str, str] | None = None,
    chunk_size: int = sealed.DEFAULT_CHUNK_SIZE,
) -> bytes:
    """``data`` sealed as output ``name`` under a fresh data key of ``key_id`` (one KMS call;
    :class:`OutputSealer` seals a series under one).

    Raises:
        kms.errors.KmsError: KMS refused the data key (the key policy does not release it to
            this image, an unknown key...).
        SealedFormatError: ``data`` is over the format's size bound.
    """
    if len(memoryview(data).cast("B")) > sealed.MAX_MODEL_SIZE:
        raise SealedFormatError("an output is over the sealed format's size bound")
    sealer = await OutputSealer.open(
        kms=kms, key_id=key_id, series=name, encryption_context=encryption_context
    )
    return await sealer.seal(data, name=name, chunk_size=chunk_size)


async def unseal_output(
    data: bytes | bytearray | memoryview | AsyncIterable[bytes],
    *,
    kms: DataKeyDecrypter,
    name: str,
) -> bytearray:
    """The plaintext of an output sealed by :func:`seal_output` under ``name``.

    Raises:
        SealedFormatError / SealedIntegrityError: not a sealed output of that name, or tampered.
        ModelLoadError: it names another output.
        kms.errors.KmsError: KMS refused the data key (another image, another context).
    """
    header, plaintext = await unseal_model(data, kms=kms, expected_name=name)
    if header.encryption_context.get(CONTENT_CONTEXT_KEY) != OUTPUT_CONTENT:
        plaintext[:] = b"\0" * len(plaintext)
        raise SealedFormatError(f"{name!r} is not a sealed enclave output")
    return plaintext
