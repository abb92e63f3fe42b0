"""The service's data model: callers, outcomes, Recipient facts, seed keys and in-memory keys."""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from functools import cached_property
from typing import Protocol, TypedDict, overload

from .. import _asym, _wrap
from ..errors import KmsError
from ..keyspecs import SpecInfo, spec_info
from ..policy import KeyPolicy
from ._record import KeyRecord, MaterialRecord

__all__ = [
    "Caller",
    "Outcome",
    "RecipientInfo",
    "RecipientRejected",
    "RecipientVerifier",
    "SeedKey",
    "Key",
    "KeyRecord",
    "MaterialRecord",
    "Grant",
    "Params",
    "GrantConstraints",
    "Answer",
    "DAY_S",
    "DEFAULT_PENDING_WINDOW_DAYS",
    "DEFAULT_ROTATION_DAYS",
    "MAX_ON_DEMAND_ROTATIONS",
]

#: An operation's JSON answer (what ``json.dumps`` sends).
Answer = dict[str, object]
DAY_S = 86400.0
#: Default deletion window (days) when ScheduleKeyDeletion gives none (AWS).
DEFAULT_PENDING_WINDOW_DAYS = 30
#: Default automatic rotation period (days, AWS).
DEFAULT_ROTATION_DAYS = 365
#: AWS allows at most 25 on-demand rotations per key (RotateKeyOnDemand's documentation; the
#: quota was 10 when the operation was introduced).
MAX_ON_DEMAND_ROTATIONS = 25


class GrantConstraints(TypedDict, total=False):
    """CreateGrant's validated ``Constraints`` member (kms.api: ``_constraints``)."""

    EncryptionContextEquals: dict[str, str]
    EncryptionContextSubset: dict[str, str]
    SourceArn: str


def _is_str_map(value: object) -> bool:
    return isinstance(value, dict) and all(
        isinstance(k, str) and isinstance(v, str) for k, v in value.items()
    )


def _is_str_list(value: object) -> bool:
    return isinstance(value, list) and all(isinstance(v, str) for v in value)


class Params(Mapping[str, object]):
    """A validated request (:func:`kms.api.validate`), read-only, with typed accessors.

    The validator has already checked every member against the AWS shape (and decoded blobs to
    bytes), so each accessor only confirms the type it promises: a member of another type, or a
    required one that is absent, is an internal error (:class:`KmsError` naming the member,
    answered as KMSInternalException), never a silent conversion. ``opt_*`` accessors answer
    None (or the ``default`` given) for an absent member. As a ``Mapping[str, object]`` it also
    iterates its members and answers ``"X" in params``.
    """

    __slots__ = ("_members",)
    _members: dict[str, object]

    def __init__(self, members: Mapping[str, object] | None = None) -> None:
        object.__setattr__(self, "_members", dict(members or {}))

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError("Params is read-only")

    # Mapping -----------------------------------------------------------------------------------
    def __getitem__(self, name: str) -> object:
        return self._members[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._members)

    def __len__(self) -> int:
        return len(self._members)

    def __repr__(self) -> str:
        return f"Params({sorted(self._members)})"  # names only: members may be secrets

    # the one check -----------------------------------------------------------------------------
    def _member(self, name: str, ok: bool, what: str) -> None:
        if not ok:
            got = type(self._members.get(name)).__name__
            raise KmsError(f"request member {name} is not {what} (got {got})")

    def _required(self, name: str) -> object:
        value = self._members.get(name)
        if value is None:
            raise KmsError(f"request member {name} is missing")
        return value

    # strings -----------------------------------------------------------------------------------
    def text(self, name: str) -> str:
        """A required string member."""
        value = self._required(name)
        self._member(name, isinstance(value, str), "a string")
        assert isinstance(value, str)
        return value

    @overload
    def opt_text(self, name: str) -> str | None: ...
    @overload
    def opt_text(self, name: str, default: str) -> str: ...
    def opt_text(self, name: str, default: str | None = None) -> str | None:
        """An optional string member (``default`` when absent)."""
        return self.text(name) if self._members.get(name) is not None else default

    # bytes (base64 on the wire, decoded by the validator) -------------------------------------
    def blob(self, name: str) -> bytes:
        """A required blob member, as bytes."""
        value = self._required(name)
        self._member(name, isinstance(value, bytes), "bytes")
        assert isinstance(value, bytes)
        return value

    def opt_blob(self, name: str) -> bytes | None:
        """An optional blob member, as bytes."""
        return self.blob(name) if self._members.get(name) is not None else None

    # numbers and flags -------------------------------------------------------------------------
    def integer(self, name: str) -> int:
        """A required integer member (a bool is not one)."""
        value = self._required(name)
        ok = isinstance(value, int) and not isinstance(value, bool)
        self._member(name, ok, "an integer")
        assert isinstance(value, int)
        return value

    @overload
    def opt_int(self, name: str) -> int | None: ...
    @overload
    def opt_int(self, name: str, default: int) -> int: ...
    def opt_int(self, name: str, default: int | None = None) -> int | None:
        """An optional integer member (``default`` when absent)."""
        return self.integer(name) if self._members.get(name) is not None else default

    def opt_bool(self, name: str) -> bool | None:
        """An optional boolean member."""
        value = self._members.get(name)
        if value is None:
            return None
        self._member(name, isinstance(value, bool), "a boolean")
        assert isinstance(value, bool)
        return value

    def flag(self, name: str) -> bool:
        """A boolean member, False when absent."""
        return self.opt_bool(name) is True

    def opt_timestamp(self, name: str) -> float | None:
        """An optional timestamp member (epoch seconds, a float after validation)."""
        value = self._members.get(name)
        if value is None:
            return None
        self._member(name, isinstance(value, float), "a timestamp")
        assert isinstance(value, float)
        return value

    # containers --------------------------------------------------------------------------------
    def text_list(self, name: str) -> list[str]:
        """A required list-of-strings member (a copy)."""
        value = self._required(name)
        self._member(name, _is_str_list(value), "a list of strings")
        assert isinstance(value, list)
        return list(value)

    @overload
    def opt_text_list(self, name: str) -> list[str] | None: ...
    @overload
    def opt_text_list(self, name: str, default: list[str]) -> list[str]: ...
    def opt_text_list(self, name: str, default: list[str] | None = None) -> list[str] | None:
        """An optional list-of-strings member (``default`` when absent)."""
        return self.text_list(name) if self._members.get(name) is not None else default

    def mapping(self, name: str) -> dict[str, str]:
        """A required string-to-string map member (EncryptionContext...; a copy)."""
        value = self._required(name)
        self._member(name, _is_str_map(value), "a map of strings")
        assert isinstance(value, dict)
        return dict(value)

    def opt_mapping(self, name: str) -> dict[str, str] | None:
        """An optional string-to-string map member."""
        return self.mapping(name) if self._members.get(name) is not None else None

    def tags(self, name: str) -> list[dict[str, str]]:
        """A required ``Tags`` member: TagKey/TagValue pairs (copies)."""
        value = self._required(name)
        ok = isinstance(value, list) and all(_is_str_map(t) for t in value)
        self._member(name, ok, "a list of tags")
        assert isinstance(value, list)
        return [dict(t) for t in value]

    @overload
    def opt_tags(self, name: str) -> list[dict[str, str]] | None: ...
    @overload
    def opt_tags(self, name: str, default: list[dict[str, str]]) -> list[dict[str, str]]: ...
    def opt_tags(
        self, name: str, default: list[dict[str, str]] | None = None
    ) -> list[dict[str, str]] | None:
        """An optional ``Tags`` member (``default`` when absent)."""
        return self.tags(name) if self._members.get(name) is not None else default

    def opt_record(self, name: str) -> Mapping[str, object] | None:
        """An optional structure member (``Recipient``), its members still to be read."""
        value = self._members.get(name)
        if value is None:
            return None
        ok = isinstance(value, dict) and all(isinstance(k, str) for k in value)
        self._member(name, ok, "a structure")
        assert isinstance(value, dict)
        return dict(value)

    def opt_constraints(self, name: str) -> GrantConstraints | None:
        """CreateGrant's optional ``Constraints`` member."""
        value = self._members.get(name)
        if value is None:
            return None
        ok = isinstance(value, dict) and all(
            (k in ("EncryptionContextEquals", "EncryptionContextSubset") and _is_str_map(v))
            or (k == "SourceArn" and isinstance(v, str))
            for k, v in value.items()
        )
        self._member(name, ok, "grant constraints")
        return _checked_constraints(value)


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
    constraints: GrantConstraints
    grantee_service: str | None = None
    retiring_service: str | None = None

    def record(self) -> str:
        """The stored form (canonical JSON: the tagged bytes are reproducible)."""
        return json.dumps(self.to_json(), sort_keys=True)

    def to_json(self) -> Answer:
        """ListGrants' GrantListEntry (without KeyId, which the caller adds as an ARN)."""
        out: Answer = {
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
            out["Constraints"] = _checked_constraints(self.constraints)  # a copy
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
            constraints=_checked_constraints(d.get("Constraints", {})),
            grantee_service=d.get("GranteeServicePrincipal"),
            retiring_service=d.get("RetiringServicePrincipal"),
        )


def _string_pairs(name: str, value: object) -> dict[str, str]:
    if not isinstance(value, dict) or not _is_str_map(value):
        raise TypeError(f"grant Constraints.{name}: not a map of strings")
    return dict(value)


def _checked_constraints(value: object) -> GrantConstraints:
    """A grant's ``Constraints`` (from a request, a stored grant or a grant), checked member
    by member and copied (TypeError if a member has the wrong type, ValueError for a member
    CreateGrant never stores)."""
    if not isinstance(value, dict):
        raise TypeError("grant Constraints: not an object")
    out: GrantConstraints = {}
    for name, member in value.items():
        if name == "SourceArn":
            if not isinstance(member, str):
                raise TypeError("grant Constraints.SourceArn: not a string")
            out["SourceArn"] = member
        elif name == "EncryptionContextEquals":
            out["EncryptionContextEquals"] = _string_pairs(name, member)
        elif name == "EncryptionContextSubset":
            out["EncryptionContextSubset"] = _string_pairs(name, member)
        else:
            raise ValueError(f"grant Constraints: unknown member {name!r}")
    return out


@dataclass
class Key:
    """One KMS key in memory: metadata, parsed policy, its material ready to use, its grants.

    ``meta`` is the record stored (and authenticated) as the key's row (:class:`KeyRecord`, read
    back by :func:`~kms.service._record.parse_key_record`); the policy is
    kept parsed, with its text, so evaluation never re-parses. ``meta["Materials"]`` describes
    every key material by version (id, rotation, import state), whether or not the material is
    present: symmetric material lives in ``versions`` (one reusable AEAD each), an asymmetric
    key's in ``asymmetric``, an HMAC key's in ``hmac``. Imported material that was deleted or
    expired is absent from them while its description stays.
    """

    key_id: str
    arn: str
    meta: KeyRecord
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

    def materials(self) -> dict[str, MaterialRecord]:
        """A copy of version (as a string: a JSON key) → the description of that material
        (edit the copy, then save new metadata: ``meta`` is the authenticated record)."""
        return {k: v.copy() for k, v in self.meta.get("Materials", {}).items()}

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
