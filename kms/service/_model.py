"""The service's data model: callers, outcomes, Recipient facts, seed keys and in-memory keys."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, Protocol

from .. import _asym, _wrap
from ..errors import KmsError
from ..keyspecs import SpecInfo, spec_info
from ..policy import KeyPolicy

__all__ = [
    "Caller",
    "Outcome",
    "RecipientInfo",
    "RecipientRejected",
    "RecipientVerifier",
    "SeedKey",
    "Key",
    "Grant",
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
#: AWS allows at most 25 on-demand rotations per key (RotateKeyOnDemand's documentation; the
#: quota was 10 when the operation was introduced).
MAX_ON_DEMAND_ROTATIONS = 25


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
    #: The grant that allowed the request, when a grant (not the key policy) did.
    grant_id: str | None = None
    #: The request's id (``x-amzn-RequestId``, the audit line's): sent to an XKS proxy as
    #: ``kmsRequestId`` so the owner can match its log to ours. Made up when absent.
    request_id: str | None = None


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


@dataclass(frozen=True, slots=True)
class Grant:
    """One grant on a key (CreateGrant), as stored (``record``) and as evaluated.

    Attributes:
        operations: the grant operations it allows (``ReEncryptFrom``, ``Decrypt``...).
        constraints: ``EncryptionContextEquals`` / ``EncryptionContextSubset`` (a dict each)
            and ``SourceArn`` (a string).
    """

    grant_id: str
    key_id: str
    name: str | None
    created: float
    grantee: str | None
    retiring: str | None
    issuing_account: str
    operations: frozenset[str]
    constraints: Mapping[str, Any]
    grantee_service: str | None = None
    retiring_service: str | None = None

    def record(self) -> str:
        """The stored form (canonical JSON: the tagged bytes are reproducible)."""
        return json.dumps(self.to_json(), sort_keys=True)

    def to_json(self) -> dict[str, Any]:
        """ListGrants' GrantListEntry (without KeyId, which the caller adds as an ARN)."""
        out: dict[str, Any] = {
            "GrantId": self.grant_id,
            "CreationDate": self.created,
            "IssuingAccount": self.issuing_account,
            "Operations": sorted(self.operations),
        }
        for name, value in (
            ("Name", self.name),
            ("GranteePrincipal", self.grantee),
            ("RetiringPrincipal", self.retiring),
            ("GranteeServicePrincipal", self.grantee_service),
            ("RetiringServicePrincipal", self.retiring_service),
        ):
            if value is not None:
                out[name] = value
        if self.constraints:
            out["Constraints"] = {
                k: dict(v) if isinstance(v, Mapping) else v for k, v in self.constraints.items()
            }
        return out

    @classmethod
    def from_record(cls, grant_id: str, key_id: str, record: str) -> Grant:
        """Inverse of :meth:`record` (ValueError/KeyError/TypeError if it does not parse)."""
        d = json.loads(record)
        return cls(
            grant_id=grant_id,
            key_id=key_id,
            name=d.get("Name"),
            created=float(d["CreationDate"]),
            grantee=d.get("GranteePrincipal"),
            retiring=d.get("RetiringPrincipal"),
            issuing_account=str(d["IssuingAccount"]),
            operations=frozenset(d["Operations"]),
            constraints={
                k: dict(v) if isinstance(v, dict) else str(v)
                for k, v in d.get("Constraints", {}).items()
            },
            grantee_service=d.get("GranteeServicePrincipal"),
            retiring_service=d.get("RetiringServicePrincipal"),
        )


@dataclass
class Key:
    """One KMS key in memory: metadata, parsed policy, its material ready to use, its grants.

    ``meta`` is the JSON-able record stored (and authenticated) as the key's row; the policy is
    kept parsed, with its text, so evaluation never re-parses. ``meta["Materials"]`` describes
    every key material by version (id, rotation, import state), whether or not the material is
    present: symmetric material lives in ``versions`` (one reusable AEAD each), an asymmetric
    key's in ``asymmetric``, an HMAC key's in ``hmac``. Imported material that was deleted or
    expired is absent from them while its description stays.
    """

    key_id: str
    arn: str
    meta: dict[str, Any]
    policy: KeyPolicy
    versions: dict[int, _wrap.Aead] = field(default_factory=dict)
    asymmetric: _asym.AsymmetricKey | None = None
    hmac: _asym.HmacKey | None = None
    #: grant id → grant; and grantee principal → its grants on this key (authorization index).
    grants: dict[str, Grant] = field(default_factory=dict)
    grants_by_grantee: dict[str, list[Grant]] = field(default_factory=dict)

    @cached_property
    def spec(self) -> SpecInfo:
        """The key spec's table entry (a key's spec never changes)."""
        return spec_info(str(self.meta["KeySpec"]))

    @cached_property
    def key_conditions(self) -> dict[str, tuple[str, ...]]:
        """The policy condition keys the key itself gives (kms:KeySpec, KeyUsage, KeyOrigin:
        none of them ever changes)."""
        m = self.meta
        return {
            "kms:keyspec": (str(m["KeySpec"]),),
            "kms:keyusage": (str(m["KeyUsage"]),),
            "kms:keyorigin": (str(m["Origin"]),),
        }

    @property
    def usage(self) -> str:
        """The KeyUsage."""
        return str(self.meta["KeyUsage"])

    @property
    def origin(self) -> str:
        """``AWS_KMS`` or ``EXTERNAL``."""
        return str(self.meta["Origin"])

    def materials(self) -> dict[str, dict[str, Any]]:
        """A copy of version (as a string: a JSON key) → the description of that material
        (edit the copy, then save new metadata: ``meta`` is the authenticated record)."""
        return {k: dict(v) for k, v in self.meta.get("Materials", {}).items()}

    def material_id(self, version: int) -> str | None:
        """The KeyMaterialId of material ``version`` (None if unknown)."""
        meta = self.meta
        cached = self.__dict__.get("_ids")
        if cached is None or cached[0] is not meta:  # rebuilt when the record is replaced
            ids = {int(v): str(e["Id"]) for v, e in meta.get("Materials", {}).items()}
            cached = self.__dict__["_ids"] = (meta, ids)
        return cached[1].get(version)

    def add_grant(self, grant: Grant) -> None:
        """Index a grant (loaded or created)."""
        self.grants[grant.grant_id] = grant
        if grant.grantee is not None:
            self.grants_by_grantee.setdefault(grant.grantee, []).append(grant)

    def drop_grant(self, grant_id: str) -> Grant | None:
        """Forget a grant (retired or revoked)."""
        grant = self.grants.pop(grant_id, None)
        if grant is not None and grant.grantee is not None:
            rest = [g for g in self.grants_by_grantee.get(grant.grantee, []) if g is not grant]
            if rest:
                self.grants_by_grantee[grant.grantee] = rest
            else:
                self.grants_by_grantee.pop(grant.grantee, None)
        return grant

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
