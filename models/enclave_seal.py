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
KMS ciphertext. The encryption context binds the output's ``name`` and marks it as an enclave
output, so the host cannot hand back another file under that name (another output, a
provisioned model): the context differs, KMS refuses the data key, or the name check fails.
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
from models.sealing import CONTENT_CONTEXT_KEY, MODEL_CONTEXT_KEY, DataKeyDecrypter, unseal_model

__all__ = ["DataKeySource", "seal_output", "unseal_output", "OUTPUT_CONTENT"]

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


def _context(name: str, extra: Mapping[str, str] | None) -> dict[str, str]:
    return {**dict(extra or {}), MODEL_CONTEXT_KEY: name, CONTENT_CONTEXT_KEY: OUTPUT_CONTENT}


async def seal_output(
    data: bytes | bytearray | memoryview,
    *,
    kms: DataKeySource,
    key_id: str,
    name: str,
    encryption_context: Mapping[str, str] | None = None,
    chunk_size: int = sealed.DEFAULT_CHUNK_SIZE,
) -> bytes:
    """``data`` sealed under a fresh data key of ``key_id``, bound to ``name``.

    Raises:
        kms.errors.KmsError: KMS refused the data key (the key policy does not release it to
            this image, an unknown key...).
        SealedFormatError: ``data`` is over the format's size bound.
    """
    view = memoryview(data).cast("B")
    if len(view) > sealed.MAX_MODEL_SIZE:
        raise SealedFormatError(f"an output of {len(view)} bytes is over the sealed bound")
    context = _context(name, encryption_context)
    data_key, blob = await kms.generate_data_key(key_id, encryption_context=context)
    header = sealed.new_header(
        key_id=key_id,
        encrypted_data_key=blob,
        model_name=name,
        model_sha384=hashlib.sha384(view).digest(),
        total_size=len(view),
        encryption_context=context,
        chunk_size=chunk_size,
    )

    def seal(key: bytes = data_key) -> bytes:
        out = io.BytesIO()
        sealed.seal_stream(io.BytesIO(view), out, data_key=key, header=header)
        return out.getvalue()

    del data_key
    if len(view) >= _THREAD_BYTES:
        return await trio.to_thread.run_sync(seal)
    return seal()


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
