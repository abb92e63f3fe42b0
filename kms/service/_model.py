"""The service's data model: callers, outcomes, Recipient facts, seed keys and in-memory keys."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from .. import _wrap
from ..errors import KmsError
from ..policy import KeyPolicy

__all__ = [
    "Caller",
    "Outcome",
    "RecipientInfo",
    "RecipientRejected",
    "RecipientVerifier",
    "SeedKey",
    "Key",
    "Params",
    "Answer",
    "DAY_S",
    "DEFAULT_PENDING_WINDOW_DAYS",
    "DEFAULT_ROTATION_DAYS",
    "MAX_ON_DEMAND_ROTATIONS",
]

#: A validated request's members (kms.api) and an operation's JSON answer.
Params = dict[str, Any]
Answer = dict[str, Any]
DAY_S = 86400.0
#: Default deletion window (days) when ScheduleKeyDeletion gives none (AWS).
DEFAULT_PENDING_WINDOW_DAYS = 30
#: Default automatic rotation period (days, AWS).
DEFAULT_ROTATION_DAYS = 365
#: AWS allows at most 10 on-demand rotations per key (RotateKeyOnDemand quota).
MAX_ON_DEMAND_ROTATIONS = 10


@dataclass(frozen=True, slots=True)
class Caller:
    """The authenticated principal of a request."""

    principal_arn: str
    access_key_id: str


@dataclass(slots=True)
class Outcome:
    """Audit facts gathered while handling one request (filled in as far as it got)."""

    key_arn: str | None = None
    decision: str = "error"  # "allow" | "deny" | "error"
    reason: str | None = None
    recipient: dict[str, str] | None = None


@dataclass(frozen=True, slots=True)
class RecipientInfo:
    """A verified Recipient: who the document says the enclave is, and its RSA key."""

    module_id: str
    image_sha384: str  # PCR0, lower-case hex
    pcrs: Mapping[int, str]  # lower-case hex
    public_key: _wrap.RSAPublicKey


class RecipientRejected(KmsError):
    """A Recipient's document was refused; ``reason`` is for the operator only.

    ``malformed``: the request is wrong (no/garbled document, no RSA key) -> ValidationException;
    otherwise (untrusted, tampered, expired) -> AccessDeniedException with the generic text.
    """

    def __init__(self, reason: str, *, malformed: bool) -> None:
        super().__init__(reason)
        self.reason = reason
        self.malformed = malformed


class RecipientVerifier(Protocol):
    """Verifies a Recipient's attestation document (adapter over attest.verify.Verifier).

    Raises :class:`RecipientRejected`; may record ``module_id``/``image_sha384`` on ``outcome``.
    """

    def __call__(self, document: bytes, outcome: Outcome) -> RecipientInfo: ...


@dataclass(frozen=True, slots=True)
class SeedKey:
    """A key to create at start if absent (seed files)."""

    key_id: str
    material: tuple[bytes, ...]  # versions 1..n, each 32 bytes
    description: str = ""
    policy: str | None = None
    enabled: bool = True
    rotation_enabled: bool = False
    aliases: tuple[str, ...] = ()


@dataclass
class Key:
    """One KMS key in memory: metadata, parsed policy, one reusable AEAD per material version.

    ``meta`` is the JSON-able record stored (and authenticated) as the key's row; the policy is
    kept parsed, with its text, so evaluation never re-parses.
    """

    key_id: str
    arn: str
    meta: dict[str, Any]
    policy: KeyPolicy
    versions: dict[int, _wrap.Aead] = field(default_factory=dict)

    def meta_text(self) -> str:
        """The stored form of ``meta`` (canonical JSON: the tagged bytes are reproducible)."""
        return json.dumps(self.meta, sort_keys=True)

    @property
    def state(self) -> str:
        """``Enabled`` | ``Disabled`` | ``PendingDeletion``."""
        return str(self.meta["KeyState"])

    @property
    def current_version(self) -> int:
        """The material version new ciphertexts use."""
        return int(self.meta["CurrentVersion"])
