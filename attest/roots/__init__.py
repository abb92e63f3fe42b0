"""Trust roots: the bundled AWS Nitro Enclaves Root G1 and loaders for configured roots.

``aws_nitro_root_g1.pem`` is cabundle[0] of real AWS documents (the same certificate AWS
publishes in ``AWS_NitroEnclaves_Root-G1.zip``). Its DER SHA-256 fingerprint is checked at
import against :data:`AWS_NITRO_ROOT_G1_SHA256` (nitro.md §4.5), so a corrupted or swapped file
fails loudly instead of silently trusting something else.
"""

from __future__ import annotations

from attest.roots._bundle import AWS_NITRO_ROOT_G1 as AWS_NITRO_ROOT_G1
from attest.roots._bundle import AWS_NITRO_ROOT_G1_SHA256 as AWS_NITRO_ROOT_G1_SHA256
from attest.roots._bundle import fingerprint_sha256 as fingerprint_sha256
from attest.roots._bundle import load_pem_roots as load_pem_roots
from attest.roots._bundle import load_roots as load_roots

__all__ = [
    "AWS_NITRO_ROOT_G1",
    "AWS_NITRO_ROOT_G1_SHA256",
    "fingerprint_sha256",
    "load_roots",
    "load_pem_roots",
]
