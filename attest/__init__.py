"""attest: the emulated Nitro Security Module, Nitro-format attestation documents, a local CA,
and one verifier for local and real AWS documents.

Layers: document (pure CBOR/COSE + syntax) → verify (chain, signature) → policy (expectations);
nsm.protocol/device (sans-IO NSM) → nsm.server / nsm.client (trio); ca + signer (local PKI);
roots (bundled AWS root); channel (glue for transport.channel); cose (the project's one
COSE_Sign1); pcrs (the one PCR extend). This face only re-exports.
"""

from __future__ import annotations

from attest.ca import CAOptions as CAOptions
from attest.ca import LocalCA as LocalCA
from attest.ca import prepare_state_dir as prepare_state_dir
from attest.document import AttestationDocument as AttestationDocument
from attest.document import parse_document as parse_document
from attest.errors import AttestError as AttestError
from attest.errors import VerificationError as VerificationError
from attest.nsm import EnclaveIdentity as EnclaveIdentity
from attest.nsm import InProcessNsm as InProcessNsm
from attest.nsm import NsmClient as NsmClient
from attest.nsm import NsmDescription as NsmDescription
from attest.nsm import NsmDevice as NsmDevice
from attest.nsm import serve_nsm as serve_nsm
from attest.pcrs import PCR_SIZE as PCR_SIZE
from attest.pcrs import pcr_extend as pcr_extend
from attest.pcrs import pcr_from_bytes as pcr_from_bytes
from attest.policy import MeasurementSet as MeasurementSet
from attest.policy import Policy as Policy
from attest.signer import DocumentSigner as DocumentSigner
from attest.verify import VerifiedDocument as VerifiedDocument
from attest.verify import Verifier as Verifier

__all__ = [
    "CAOptions",
    "LocalCA",
    "prepare_state_dir",
    "AttestationDocument",
    "parse_document",
    "AttestError",
    "VerificationError",
    "EnclaveIdentity",
    "InProcessNsm",
    "NsmClient",
    "NsmDescription",
    "NsmDevice",
    "serve_nsm",
    "PCR_SIZE",
    "pcr_extend",
    "pcr_from_bytes",
    "MeasurementSet",
    "Policy",
    "DocumentSigner",
    "VerifiedDocument",
    "Verifier",
]
