"""attest: the emulated Nitro Security Module, Nitro-format attestation documents, a local CA,
and one verifier for local and real AWS documents.

Layers: document (pure CBOR/COSE + syntax) → verify (chain, signature) → policy (expectations);
nsm.protocol/device (sans-IO NSM) → nsm.server / nsm.client (trio); ca + signer (local PKI);
roots (bundled AWS root); channel (glue for transport.channel).
"""

from attest.ca import LocalCA as LocalCA
from attest.document import AttestationDocument as AttestationDocument
from attest.document import parse_document as parse_document
from attest.errors import AttestError as AttestError
from attest.errors import VerificationError as VerificationError
from attest.nsm import EnclaveIdentity as EnclaveIdentity
from attest.nsm import NsmClient as NsmClient
from attest.nsm import NsmDevice as NsmDevice
from attest.nsm import serve_nsm as serve_nsm
from attest.policy import MeasurementSet as MeasurementSet
from attest.policy import Policy as Policy
from attest.signer import DocumentSigner as DocumentSigner
from attest.verify import VerifiedDocument as VerifiedDocument
from attest.verify import Verifier as Verifier

__all__ = [
    "LocalCA",
    "AttestationDocument",
    "parse_document",
    "AttestError",
    "VerificationError",
    "EnclaveIdentity",
    "NsmClient",
    "NsmDevice",
    "serve_nsm",
    "MeasurementSet",
    "Policy",
    "DocumentSigner",
    "VerifiedDocument",
    "Verifier",
]
