"""Platform Configuration Registers: the one PCR extend of the project.

A PCR is 48 bytes (SHA-384). Extending it with ``data`` replaces it with
``SHA384(old ‖ data)`` (``reference/nitro.md`` §3.4); a register starts as 48 zero bytes. The
EIF measurements (PCR0/1/2/8) are a zero register extended once with the SHA-384 of the
measured bytes (§2.6); the NSM extends PCR16.. with whatever the enclave sends (the inference
server: each model's digest).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from typing import Final

__all__ = ["PCR_SIZE", "ZERO_PCR", "pcr_extend", "pcr_from_bytes", "pcr_from_digests"]

#: Size of a PCR (SHA-384 output), bytes.
PCR_SIZE: Final = 48
#: A register's initial value.
ZERO_PCR: Final = bytes(PCR_SIZE)


def pcr_extend(old: bytes, data: bytes) -> bytes:
    """One NSM extend: ``SHA384(old ‖ data)``.

    Raises:
        ValueError: ``old`` is not 48 bytes.
    """
    if len(old) != PCR_SIZE:
        raise ValueError(f"a PCR is {PCR_SIZE} bytes, got {len(old)}")
    return hashlib.sha384(old + data).digest()


def pcr_from_bytes(data: bytes) -> bytes:
    """``SHA384(0^48 ‖ SHA384(data))``: a zero PCR extended with the digest of ``data``
    (what ``enclave pcr --input`` prints)."""
    return pcr_extend(ZERO_PCR, hashlib.sha384(data).digest())


def pcr_from_digests(digests: Iterable[bytes]) -> bytes:
    """A zero PCR extended with each of ``digests`` in turn (PCR16 over a model catalog)."""
    pcr = ZERO_PCR
    for digest in digests:
        pcr = pcr_extend(pcr, digest)
    return pcr
