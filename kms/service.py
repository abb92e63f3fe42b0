"""The KMS service core: key model, operations, authorization and Recipient release.

This layer knows nothing about HTTP. :meth:`KmsService.handle` takes a validated request
(:mod:`kms.api`) and the authenticated caller, and returns the JSON answer or raises
:class:`~kms.errors.KmsApiError`. Facts for the audit line (key, decision, denial reason,
recipient) are recorded on the :class:`Outcome` passed in, also when the call fails.

State lives in memory (:class:`_Key` objects holding one reusable AEAD per key version) and every
change is written through the :class:`~kms.storage.Storage` before it is applied in memory and
acknowledged. Storage calls run in a worker thread behind a one-thread limiter: a commit with
``synchronous=FULL`` waits for an fsync (milliseconds), which must not stall the event loop and
the other connections; reads never touch SQLite (the in-memory copy is authoritative), so the
hot path (Encrypt/Decrypt/GenerateDataKey) has no thread hop (~0.4 ms each, perf-baseline
§2.3). Mutations are serialised by one lock, so read-modify-write sequences cannot interleave.

Recipient requests are verified by ``attest``'s verifier inline on the event loop: an ES384
verification with a cached chain costs ~0.7 ms, less than moving it to a thread and back.
"""

from __future__ import annotations

import base64
import json
import struct
import uuid
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Protocol, TypeVar

import trio

from . import _wrap, ciphertext, cms
from .errors import CiphertextFormatError, KmsApiError, KmsError, PolicyError
from .policy import Decision, KeyPolicy, RequestContext, account_of, default_key_policy
from .storage import AliasRow, KeyRow, Storage, VersionRow

__all__ = [
    "Caller",
    "Outcome",
    "RecipientInfo",
    "RecipientVerifier",
    "RecipientRejected",
    "KmsService",
    "SeedKey",
    "MasterKey",
]

_T = TypeVar("_T")
_Params = dict[str, Any]
_Answer = dict[str, Any]
_DAY_S = 86400.0
#: Default deletion window (days) when ScheduleKeyDeletion gives none (AWS).
DEFAULT_PENDING_WINDOW_DAYS = 30
#: Default automatic rotation period (days, AWS).
DEFAULT_ROTATION_DAYS = 365
#: AWS allows at most 10 on-demand rotations per key (RotateKeyOnDemand quota).
MAX_ON_DEMAND_ROTATIONS = 10
_DATA_KEY_BYTES = {"AES_256": 32, "AES_128": 16}
_WRAP_AAD = b"enclave-kms/key-material/v1\x00"
_MASTER_CHECK_AAD = b"enclave-kms/master-check/v1"
_MASTER_CHECK = b"enclave-kms master key check"


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


class MasterKey:
    """The master key that wraps key material (AES-256-GCM, AAD = key id and version)."""

    def __init__(self, key: bytes) -> None:
        self._aead = _wrap.Aead(key)

    @staticmethod
    def _aad(key_id: str, version: int) -> bytes:
        return _WRAP_AAD + key_id.encode() + b"\x00" + struct.pack(">I", version)

    def wrap(self, key_id: str, version: int, material: bytes) -> bytes:
        """Encrypt key material for storage, bound to its key id and version."""
        return self._aead.seal(material, self._aad(key_id, version))

    def unwrap(self, key_id: str, version: int, wrapped: bytes) -> bytes:
        """Inverse of :meth:`wrap`; CiphertextFormatError if tampered or mislabelled."""
        return self._aead.open(wrapped, self._aad(key_id, version))

    def check_value(self) -> bytes:
        """A value stored beside the keys to recognise this master key at the next start."""
        return self._aead.seal(_MASTER_CHECK, _MASTER_CHECK_AAD)

    def matches(self, check: bytes) -> bool:
        """True if ``check`` was made by :meth:`check_value` with this master key."""
        try:
            return self._aead.open(check, _MASTER_CHECK_AAD) == _MASTER_CHECK
        except CiphertextFormatError:
            return False


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
class _Key:
    key_id: str
    arn: str
    meta: dict[str, Any]
    policy: KeyPolicy
    versions: dict[int, _wrap.Aead] = field(default_factory=dict)

    def row(self) -> KeyRow:
        return KeyRow(self.key_id, json.dumps(self.meta, sort_keys=True), self.policy.text)

    @property
    def state(self) -> str:
        return str(self.meta["KeyState"])

    @property
    def current_version(self) -> int:
        return int(self.meta["CurrentVersion"])


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


class KmsService:
    """All operations of the daemon over an in-memory key set backed by ``storage``.

    Use :meth:`open` (loads state, checks the master key, applies a seed).
    """

    def __init__(
        self,
        storage: Storage,
        master: MasterKey,
        *,
        region: str,
        account_id: str,
        recipient_verifier: RecipientVerifier | None,
        clock: Callable[[], float],
    ) -> None:
        self._storage = storage
        self._master = master
        self.region = region
        self.account_id = account_id
        self._verify_recipient = recipient_verifier
        self._clock = clock
        self._keys: dict[str, _Key] = {}
        self._aliases: dict[str, AliasRow] = {}
        self._write_lock = trio.Lock()
        self._limiter = trio.CapacityLimiter(1)
        self._next_deadline = float("inf")

    # ---------------------------------------------------------------- start-up

    @classmethod
    def open(
        cls,
        storage: Storage,
        master: MasterKey,
        *,
        region: str,
        account_id: str,
        recipient_verifier: RecipientVerifier | None,
        clock: Callable[[], float],
        seed: tuple[SeedKey, ...] = (),
    ) -> KmsService:
        """Load the key set synchronously (start-up, before serving). Raises on a wrong master."""
        from transport.errors import ConfigurationError

        check = storage.get_meta("master_check")
        if check is None:
            storage.set_meta("master_check", master.check_value())
        elif not master.matches(check):
            raise ConfigurationError("the master key does not match this key database")
        svc = cls(
            storage,
            master,
            region=region,
            account_id=account_id,
            recipient_verifier=recipient_verifier,
            clock=clock,
        )
        snap = storage.load()
        for row in snap.keys:
            meta = json.loads(row.meta)
            svc._keys[row.key_id] = _Key(
                row.key_id, svc._arn(row.key_id), meta, KeyPolicy.parse(row.policy)
            )
        for v in snap.versions:
            key = svc._keys.get(v.key_id)
            if key is not None:
                key.versions[v.version] = _wrap.Aead(master.unwrap(v.key_id, v.version, v.wrapped))
        for a in snap.aliases:
            svc._aliases[a.name] = a
        for s in seed:
            svc._apply_seed(s)
        svc._recompute_deadline()
        return svc

    def _apply_seed(self, s: SeedKey) -> None:
        now = self._clock()
        if s.key_id not in self._keys:
            policy = KeyPolicy.parse(s.policy or default_key_policy(self.account_id))
            meta = self._new_meta(now, s.description)
            meta["Enabled"] = s.enabled
            meta["KeyState"] = "Enabled" if s.enabled else "Disabled"
            if s.rotation_enabled:
                meta["RotationEnabled"] = True
                meta["NextRotationDate"] = now + DEFAULT_ROTATION_DAYS * _DAY_S
            meta["CurrentVersion"] = len(s.material)
            key = _Key(s.key_id, self._arn(s.key_id), meta, policy)
            rows = [
                VersionRow(s.key_id, i, self._master.wrap(s.key_id, i, material), now)
                for i, material in enumerate(s.material, start=1)
            ]
            self._storage.create_key(key.row(), rows)  # all versions in one transaction
            for i, material in enumerate(s.material, start=1):
                key.versions[i] = _wrap.Aead(material)
            self._keys[s.key_id] = key
        for alias in s.aliases:
            if alias not in self._aliases:
                row = AliasRow(alias, s.key_id, now, now)
                self._storage.put_alias(row)
                self._aliases[alias] = row

    def close(self) -> None:
        """Close the storage backend."""
        self._storage.close()

    # ---------------------------------------------------------------- helpers

    def _arn(self, key_id: str) -> str:
        return f"arn:aws:kms:{self.region}:{self.account_id}:key/{key_id}"

    def _alias_arn(self, name: str) -> str:
        return f"arn:aws:kms:{self.region}:{self.account_id}:{name}"

    @staticmethod
    def _new_meta(now: float, description: str) -> dict[str, Any]:
        return {
            "CreationDate": now,
            "Description": description,
            "Enabled": True,
            "KeyState": "Enabled",
            "KeyUsage": "ENCRYPT_DECRYPT",
            "KeySpec": "SYMMETRIC_DEFAULT",
            "Origin": "AWS_KMS",
            "CurrentVersion": 1,
            "RotationEnabled": False,
            "RotationPeriodInDays": DEFAULT_ROTATION_DAYS,
            "OnDemandRotations": 0,
            "Tags": [],
        }

    async def _write(self, fn: Callable[[], _T]) -> _T:
        return await trio.to_thread.run_sync(fn, limiter=self._limiter)

    def _not_found(self, key_id: str) -> KmsApiError:
        return KmsApiError("NotFoundException", f"Key '{self._display(key_id)}' does not exist")

    def _display(self, key_id: str) -> str:
        if key_id.startswith(("arn:", "alias/")):
            return key_id[:300]
        return self._arn(key_id[:64])

    def resolve(self, key_id: str, *, allow_alias: bool = True) -> _Key:
        """A key by id, key ARN, alias name or alias ARN (NotFoundException otherwise)."""
        name = key_id
        if key_id.startswith("arn:"):
            prefix = f"arn:aws:kms:{self.region}:{self.account_id}:"
            if not key_id.startswith(prefix):
                raise self._not_found(key_id)
            name = key_id[len(prefix) :]
            if name.startswith("key/"):
                name = name[4:]
            elif not name.startswith("alias/"):
                raise self._not_found(key_id)
        if name.startswith("alias/"):
            if not allow_alias:
                raise KmsApiError("ValidationException", "An alias is not allowed here.")
            alias = self._aliases.get(name)
            if alias is None:
                raise KmsApiError(
                    "NotFoundException", f"Alias {self._alias_arn(name)} is not found."
                )
            name = alias.key_id
        key = self._keys.get(name)
        if key is None:
            raise self._not_found(key_id)
        return key

    def _authorize(
        self,
        outcome: Outcome,
        caller: Caller,
        action: str,
        key: _Key,
        *,
        context: Mapping[str, str] | None = None,
        recipient: RecipientInfo | None = None,
    ) -> None:
        outcome.key_arn = key.arn
        ctx = RequestContext(
            principal_arn=caller.principal_arn,
            action=f"kms:{action}",
            resource=key.arn,
            conditions=self._conditions(caller, context, recipient),
        )
        decision = key.policy.evaluate(ctx)
        self._record(outcome, decision)
        if not decision.allowed:
            raise KmsApiError(
                "AccessDeniedException",
                f"User: {caller.principal_arn} is not authorized to perform: kms:{action} on "
                f"resource: {key.arn}",
            )

    @staticmethod
    def _record(outcome: Outcome, decision: Decision) -> None:
        outcome.decision = "allow" if decision.allowed else "deny"
        outcome.reason = decision.reason

    def _conditions(
        self,
        caller: Caller,
        context: Mapping[str, str] | None,
        recipient: RecipientInfo | None,
    ) -> dict[str, tuple[str, ...]]:
        account = account_of(caller.principal_arn) or ""
        cond: dict[str, tuple[str, ...]] = {
            "aws:principalarn": (caller.principal_arn,),
            "aws:principalaccount": (account,),
            "kms:calleraccount": (account,),
        }
        if context is not None:
            if context:
                cond["kms:encryptioncontextkeys"] = tuple(context)
            for k, v in context.items():
                cond[f"kms:encryptioncontext:{k.lower()}"] = (v,)
        if recipient is not None:
            cond["kms:recipientattestation:imagesha384"] = (recipient.image_sha384,)
            for index, value in recipient.pcrs.items():
                cond[f"kms:recipientattestation:pcr{index}"] = (value,)
        return cond

    @staticmethod
    def _require_usable(key: _Key) -> None:
        if key.state == "PendingDeletion":
            raise KmsApiError("KMSInvalidStateException", f"{key.arn} is pending deletion.")
        if key.state == "Disabled":
            raise KmsApiError("DisabledException", f"{key.arn} is disabled.")

    @staticmethod
    def _check_algorithm(alg: str | None) -> None:
        if alg not in (None, "SYMMETRIC_DEFAULT"):
            raise KmsApiError(
                "InvalidKeyUsageException",
                f"The encryption algorithm {alg} is not compatible with the type of key.",
            )

    def _recipient(
        self, params: Mapping[str, Any], outcome: Outcome, caller: Caller, action: str
    ) -> RecipientInfo | None:
        rec = params.get("Recipient")
        if rec is None:
            return None
        if self._verify_recipient is None:
            outcome.decision = "deny"
            outcome.reason = "Recipient request refused: no attestation trust roots configured"
            raise KmsApiError(
                "UnsupportedOperationException",
                "This KMS has no attestation trust roots configured; Recipient is unavailable.",
            )
        try:
            # Inline on the event loop: a cached-chain verification is one ES384 check (~0.4 ms
            # here). OpenSSL releases the GIL during it, but offloading to worker threads when
            # several clients are connected measured +0.15-0.25 ms of daemon CPU per request
            # (thread hand-off and wake-ups) and lower throughput on this 2-core machine, where
            # the load generator needs the other core; a single client would also pay the
            # hand-off in latency.
            info = self._verify_recipient(rec["AttestationDocument"], outcome)
        except RecipientRejected as exc:
            outcome.decision, outcome.reason = "deny", exc.reason
            if exc.malformed:
                raise KmsApiError(
                    "ValidationException",
                    "The Recipient's attestation document is not valid or has no RSA public key.",
                ) from None
            raise KmsApiError(
                "AccessDeniedException",
                f"User: {caller.principal_arn} is not authorized to perform: kms:{action}",
            ) from None
        outcome.recipient = {"module_id": info.module_id, "image_sha384": info.image_sha384}
        return info

    @staticmethod
    def _dry_run(params: Mapping[str, Any]) -> None:
        if params.get("DryRun"):
            raise KmsApiError(
                "DryRunOperationException",
                "The request would have succeeded, but the DryRun option is set.",
            )

    def _seal(self, key: _Key, plaintext: bytes, context: Mapping[str, str] | None) -> bytes:
        version = key.current_version
        return ciphertext.seal(key.versions[version], key.key_id, version, plaintext, context)

    def _metadata(self, key: _Key) -> dict[str, Any]:
        m = key.meta
        out: dict[str, Any] = {
            "AWSAccountId": self.account_id,
            "KeyId": key.key_id,
            "Arn": key.arn,
            "CreationDate": m["CreationDate"],
            "Enabled": m["Enabled"],
            "Description": m["Description"],
            "KeyUsage": m["KeyUsage"],
            "KeyState": m["KeyState"],
            "Origin": m["Origin"],
            "KeyManager": "CUSTOMER",
            "CustomerMasterKeySpec": m["KeySpec"],
            "KeySpec": m["KeySpec"],
            "EncryptionAlgorithms": ["SYMMETRIC_DEFAULT"],
            "MultiRegion": False,
        }
        if m.get("DeletionDate") is not None:
            out["DeletionDate"] = m["DeletionDate"]
            out["PendingDeletionWindowInDays"] = m["PendingWindowInDays"]
        return out

    async def _save(self, key: _Key, meta: dict[str, Any], policy: KeyPolicy | None = None) -> None:
        """Persist new metadata/policy for ``key``, then apply it in memory."""
        new = _Key(key.key_id, key.arn, meta, policy or key.policy, key.versions)
        await self._write(lambda: self._storage.update_key(new.row()))
        key.meta, key.policy = meta, new.policy
        self._recompute_deadline()

    def _recompute_deadline(self) -> None:
        deadline = float("inf")
        for key in self._keys.values():
            if key.meta.get("DeletionDate") is not None:
                deadline = min(deadline, float(key.meta["DeletionDate"]))
            if key.meta.get("RotationEnabled") and key.state == "Enabled":
                deadline = min(deadline, float(key.meta.get("NextRotationDate", deadline)))
        self._next_deadline = deadline

    async def _maintenance(self) -> None:
        """Delete keys whose deletion date passed; rotate keys whose rotation is due."""
        now = self._clock()
        if now < self._next_deadline:
            return
        async with self._write_lock:
            for key in list(self._keys.values()):
                deletion = key.meta.get("DeletionDate")
                if deletion is not None and now >= float(deletion):
                    await self._write(partial(self._storage.delete_key, key.key_id))
                    del self._keys[key.key_id]
                    for name in [n for n, a in self._aliases.items() if a.key_id == key.key_id]:
                        del self._aliases[name]
                elif (
                    key.meta.get("RotationEnabled")
                    and key.state == "Enabled"
                    and now >= float(key.meta.get("NextRotationDate", now + 1))
                ):
                    await self._rotate(key, on_demand=False)
            self._recompute_deadline()

    async def _rotate(self, key: _Key, *, on_demand: bool) -> None:
        now = self._clock()
        version = max(key.versions) + 1
        material = _wrap.random_bytes(_wrap.AES_KEY_BYTES)
        meta = dict(key.meta)
        meta["CurrentVersion"] = version
        meta["LastRotationDate"] = now
        if on_demand:
            meta["OnDemandRotations"] = int(meta.get("OnDemandRotations", 0)) + 1
        if meta.get("RotationEnabled"):
            meta["NextRotationDate"] = now + float(meta["RotationPeriodInDays"]) * _DAY_S
        new = _Key(key.key_id, key.arn, meta, key.policy)
        row = VersionRow(key.key_id, version, self._master.wrap(key.key_id, version, material), now)
        await self._write(lambda: self._storage.add_version(new.row(), row))
        key.versions[version] = _wrap.Aead(material)
        key.meta = meta

    # ---------------------------------------------------------------- dispatch

    async def handle(
        self, operation: str, params: dict[str, Any], caller: Caller, outcome: Outcome
    ) -> dict[str, Any]:
        """Run one validated operation. Raises :class:`KmsApiError`."""
        await self._maintenance()
        handler: Callable[[dict[str, Any], Caller, Outcome], Awaitable[dict[str, Any]]] = getattr(
            self, f"_op_{operation}"
        )
        return await handler(params, caller, outcome)

    # ---------------------------------------------------------------- key management

    def _lockout_check(self, policy: KeyPolicy, caller: Caller, arn: str, bypass: bool) -> None:
        if bypass:
            return
        ctx = RequestContext(
            caller.principal_arn, "kms:PutKeyPolicy", arn, self._conditions(caller, None, None)
        )
        if not policy.evaluate(ctx).allowed:
            raise KmsApiError(
                "MalformedPolicyDocumentException",
                "The new key policy will not allow you to update the key policy in the future.",
            )

    @staticmethod
    def _parse_policy(text: str) -> KeyPolicy:
        try:
            return KeyPolicy.parse(text)
        except PolicyError as exc:
            raise KmsApiError("MalformedPolicyDocumentException", str(exc)) from None

    async def _op_CreateKey(
        self, p: dict[str, Any], caller: Caller, out: Outcome
    ) -> dict[str, Any]:
        spec = p.get("KeySpec", p.get("CustomerMasterKeySpec", "SYMMETRIC_DEFAULT"))
        if (
            "KeySpec" in p
            and "CustomerMasterKeySpec" in p
            and p["KeySpec"] != p["CustomerMasterKeySpec"]
        ):
            raise KmsApiError("ValidationException", "KeySpec and CustomerMasterKeySpec differ.")
        usage = p.get("KeyUsage", "ENCRYPT_DECRYPT")
        if spec == "SYMMETRIC_DEFAULT" and usage != "ENCRYPT_DECRYPT":
            raise KmsApiError(
                "ValidationException",
                f"KeyUsage {usage} is not compatible with KeySpec SYMMETRIC_DEFAULT.",
            )
        if spec != "SYMMETRIC_DEFAULT":
            raise KmsApiError(
                "UnsupportedOperationException",
                f"KeySpec {spec} is not supported by this KMS (symmetric keys only).",
            )
        if p.get("Origin", "AWS_KMS") != "AWS_KMS" or "CustomKeyStoreId" in p or "XksKeyId" in p:
            raise KmsApiError(
                "UnsupportedOperationException", "Only Origin AWS_KMS keys are supported."
            )
        if p.get("MultiRegion"):
            raise KmsApiError(
                "UnsupportedOperationException", "Multi-Region keys are not supported."
            )
        key_id = str(uuid.uuid4())
        arn = self._arn(key_id)
        policy = self._parse_policy(p.get("Policy") or default_key_policy(self.account_id))
        self._lockout_check(policy, caller, arn, bool(p.get("BypassPolicyLockoutSafetyCheck")))
        out.key_arn = arn
        out.decision, out.reason = "allow", "CreateKey is not key-scoped (no IAM emulated)"
        now = self._clock()
        meta = self._new_meta(now, p.get("Description", ""))
        meta["Tags"] = p.get("Tags", [])
        key = _Key(key_id, arn, meta, policy)
        material = _wrap.random_bytes(_wrap.AES_KEY_BYTES)
        version = VersionRow(key_id, 1, self._master.wrap(key_id, 1, material), now)
        async with self._write_lock:
            await self._write(lambda: self._storage.create_key(key.row(), [version]))
            key.versions[1] = _wrap.Aead(material)
            self._keys[key_id] = key
        return {"KeyMetadata": self._metadata(key)}

    async def _op_DescribeKey(
        self, p: dict[str, Any], caller: Caller, out: Outcome
    ) -> dict[str, Any]:
        key = self.resolve(p["KeyId"])
        self._authorize(out, caller, "DescribeKey", key)
        return {"KeyMetadata": self._metadata(key)}

    @staticmethod
    def _page(
        items: list[_T], p: Mapping[str, Any], default_limit: int
    ) -> tuple[list[_T], dict[str, Any]]:
        marker = p.get("Marker", "0")
        if not marker.isdigit() or int(marker) > len(items):
            raise KmsApiError("InvalidMarkerException", "The marker is not valid.")
        start = int(marker)
        limit = int(p.get("Limit", default_limit))
        page = items[start : start + limit]
        more: dict[str, Any] = {"Truncated": start + limit < len(items)}
        if more["Truncated"]:
            more["NextMarker"] = str(start + limit)
        return page, more

    async def _op_ListKeys(self, p: _Params, caller: Caller, out: Outcome) -> _Answer:
        out.decision, out.reason = "allow", "ListKeys is not key-scoped (no IAM emulated)"
        keys = sorted(self._keys.values(), key=lambda k: k.key_id)
        page, more = self._page(keys, p, 1000)
        return {"Keys": [{"KeyId": k.key_id, "KeyArn": k.arn} for k in page], **more}

    def _check_alias_name(self, name: str) -> None:
        if not name.startswith("alias/") or len(name) <= len("alias/"):
            raise KmsApiError("ValidationException", 'Alias must start with the prefix "alias/".')
        if name.startswith("alias/aws/"):
            raise KmsApiError(
                "NotAuthorizedException", "Aliases beginning with alias/aws/ are reserved."
            )

    async def _op_CreateAlias(
        self, p: dict[str, Any], caller: Caller, out: Outcome
    ) -> dict[str, Any]:
        name = p["AliasName"]
        self._check_alias_name(name)
        key = self.resolve(p["TargetKeyId"], allow_alias=False)
        self._authorize(out, caller, "CreateAlias", key)
        if key.state == "PendingDeletion":
            raise KmsApiError("KMSInvalidStateException", f"{key.arn} is pending deletion.")
        async with self._write_lock:
            if name in self._aliases:
                raise KmsApiError(
                    "AlreadyExistsException",
                    f"An alias with the name {self._alias_arn(name)} already exists",
                )
            now = self._clock()
            row = AliasRow(name, key.key_id, now, now)
            await self._write(lambda: self._storage.put_alias(row))
            self._aliases[name] = row
        return {}

    async def _op_UpdateAlias(
        self, p: dict[str, Any], caller: Caller, out: Outcome
    ) -> dict[str, Any]:
        name = p["AliasName"]
        self._check_alias_name(name)
        key = self.resolve(p["TargetKeyId"], allow_alias=False)
        async with self._write_lock:
            old = self._aliases.get(name)
            if old is None:
                raise KmsApiError(
                    "NotFoundException", f"Alias {self._alias_arn(name)} is not found."
                )
            self._authorize(out, caller, "UpdateAlias", self._keys[old.key_id])
            self._authorize(out, caller, "UpdateAlias", key)
            row = AliasRow(name, key.key_id, old.created, self._clock())
            await self._write(lambda: self._storage.put_alias(row))
            self._aliases[name] = row
        return {}

    async def _op_DeleteAlias(
        self, p: dict[str, Any], caller: Caller, out: Outcome
    ) -> dict[str, Any]:
        name = p["AliasName"]
        async with self._write_lock:
            old = self._aliases.get(name)
            if old is None:
                raise KmsApiError(
                    "NotFoundException", f"Alias {self._alias_arn(name)} is not found."
                )
            self._authorize(out, caller, "DeleteAlias", self._keys[old.key_id])
            await self._write(lambda: self._storage.delete_alias(name))
            del self._aliases[name]
        return {}

    async def _op_ListAliases(
        self, p: dict[str, Any], caller: Caller, out: Outcome
    ) -> dict[str, Any]:
        aliases = sorted(self._aliases.values(), key=lambda a: a.name)
        if "KeyId" in p:
            key = self.resolve(p["KeyId"], allow_alias=False)
            self._authorize(out, caller, "ListAliases", key)
            aliases = [a for a in aliases if a.key_id == key.key_id]
        else:
            out.decision, out.reason = "allow", "ListAliases is not key-scoped (no IAM emulated)"
        page, more = self._page(aliases, p, 50)
        return {
            "Aliases": [
                {
                    "AliasName": a.name,
                    "AliasArn": self._alias_arn(a.name),
                    "TargetKeyId": a.key_id,
                    "CreationDate": a.created,
                    "LastUpdatedDate": a.updated,
                }
                for a in page
            ],
            **more,
        }

    async def _op_GetKeyPolicy(
        self, p: dict[str, Any], caller: Caller, out: Outcome
    ) -> dict[str, Any]:
        key = self.resolve(p["KeyId"], allow_alias=False)
        self._authorize(out, caller, "GetKeyPolicy", key)
        if p.get("PolicyName", "default") != "default":
            raise KmsApiError("NotFoundException", "No such policy exists")
        return {"Policy": key.policy.text, "PolicyName": "default"}

    async def _op_PutKeyPolicy(
        self, p: dict[str, Any], caller: Caller, out: Outcome
    ) -> dict[str, Any]:
        key = self.resolve(p["KeyId"], allow_alias=False)
        self._authorize(out, caller, "PutKeyPolicy", key)
        if p.get("PolicyName", "default") != "default":
            raise KmsApiError("NotFoundException", "No such policy exists")
        policy = self._parse_policy(p["Policy"])
        self._lockout_check(policy, caller, key.arn, bool(p.get("BypassPolicyLockoutSafetyCheck")))
        async with self._write_lock:
            await self._save(key, dict(key.meta), policy)
        return {}

    async def _set_enabled(
        self, p: dict[str, Any], caller: Caller, out: Outcome, op: str, on: bool
    ) -> dict[str, Any]:
        key = self.resolve(p["KeyId"], allow_alias=False)
        self._authorize(out, caller, op, key)
        async with self._write_lock:
            if key.state == "PendingDeletion":
                raise KmsApiError("KMSInvalidStateException", f"{key.arn} is pending deletion.")
            meta = dict(key.meta, Enabled=on, KeyState="Enabled" if on else "Disabled")
            await self._save(key, meta)
        return {}

    async def _op_EnableKey(
        self, p: dict[str, Any], caller: Caller, out: Outcome
    ) -> dict[str, Any]:
        return await self._set_enabled(p, caller, out, "EnableKey", True)

    async def _op_DisableKey(
        self, p: dict[str, Any], caller: Caller, out: Outcome
    ) -> dict[str, Any]:
        return await self._set_enabled(p, caller, out, "DisableKey", False)

    async def _op_ScheduleKeyDeletion(
        self, p: dict[str, Any], caller: Caller, out: Outcome
    ) -> dict[str, Any]:
        key = self.resolve(p["KeyId"], allow_alias=False)
        self._authorize(out, caller, "ScheduleKeyDeletion", key)
        days = int(p.get("PendingWindowInDays", DEFAULT_PENDING_WINDOW_DAYS))
        async with self._write_lock:
            if key.state == "PendingDeletion":
                raise KmsApiError("KMSInvalidStateException", f"{key.arn} is pending deletion.")
            when = self._clock() + days * _DAY_S
            meta = dict(
                key.meta,
                Enabled=False,
                KeyState="PendingDeletion",
                DeletionDate=when,
                PendingWindowInDays=days,
            )
            await self._save(key, meta)
        return {
            "KeyId": key.arn,
            "DeletionDate": when,
            "KeyState": "PendingDeletion",
            "PendingWindowInDays": days,
        }

    async def _op_CancelKeyDeletion(
        self, p: dict[str, Any], caller: Caller, out: Outcome
    ) -> dict[str, Any]:
        key = self.resolve(p["KeyId"], allow_alias=False)
        self._authorize(out, caller, "CancelKeyDeletion", key)
        async with self._write_lock:
            if key.state != "PendingDeletion":
                raise KmsApiError("KMSInvalidStateException", f"{key.arn} is not pending deletion.")
            meta = dict(key.meta, KeyState="Disabled", Enabled=False)
            meta.pop("DeletionDate", None)
            meta.pop("PendingWindowInDays", None)
            await self._save(key, meta)
        return {"KeyId": key.arn}

    async def _op_EnableKeyRotation(
        self, p: dict[str, Any], caller: Caller, out: Outcome
    ) -> dict[str, Any]:
        key = self.resolve(p["KeyId"], allow_alias=False)
        self._authorize(out, caller, "EnableKeyRotation", key)
        async with self._write_lock:
            self._require_usable(key)
            period = int(
                p.get(
                    "RotationPeriodInDays",
                    key.meta.get("RotationPeriodInDays", DEFAULT_ROTATION_DAYS),
                )
            )
            meta = dict(
                key.meta,
                RotationEnabled=True,
                RotationPeriodInDays=period,
                NextRotationDate=self._clock() + period * _DAY_S,
            )
            await self._save(key, meta)
        return {}

    async def _op_DisableKeyRotation(
        self, p: dict[str, Any], caller: Caller, out: Outcome
    ) -> dict[str, Any]:
        key = self.resolve(p["KeyId"], allow_alias=False)
        self._authorize(out, caller, "DisableKeyRotation", key)
        async with self._write_lock:
            self._require_usable(key)
            meta = dict(key.meta, RotationEnabled=False)
            meta.pop("NextRotationDate", None)
            await self._save(key, meta)
        return {}

    async def _op_GetKeyRotationStatus(
        self, p: dict[str, Any], caller: Caller, out: Outcome
    ) -> dict[str, Any]:
        key = self.resolve(p["KeyId"], allow_alias=False)
        self._authorize(out, caller, "GetKeyRotationStatus", key)
        m = key.meta
        ans: dict[str, Any] = {
            "KeyRotationEnabled": bool(m.get("RotationEnabled")),
            "KeyId": key.arn,
        }
        if m.get("RotationEnabled"):
            ans["RotationPeriodInDays"] = m["RotationPeriodInDays"]
            ans["NextRotationDate"] = m["NextRotationDate"]
        return ans

    async def _op_RotateKeyOnDemand(
        self, p: dict[str, Any], caller: Caller, out: Outcome
    ) -> dict[str, Any]:
        key = self.resolve(p["KeyId"], allow_alias=False)
        self._authorize(out, caller, "RotateKeyOnDemand", key)
        async with self._write_lock:
            self._require_usable(key)
            if int(key.meta.get("OnDemandRotations", 0)) >= MAX_ON_DEMAND_ROTATIONS:
                raise KmsApiError(
                    "LimitExceededException",
                    f"{key.arn} has reached the limit of {MAX_ON_DEMAND_ROTATIONS} on-demand "
                    "rotations.",
                )
            await self._rotate(key, on_demand=True)
            self._recompute_deadline()
        return {"KeyId": key.arn}

    # ---------------------------------------------------------------- cryptographic operations

    async def _op_Encrypt(self, p: _Params, caller: Caller, out: Outcome) -> _Answer:
        key = self.resolve(p["KeyId"])
        context = p.get("EncryptionContext")
        self._authorize(out, caller, "Encrypt", key, context=context or {})
        self._require_usable(key)
        self._check_algorithm(p.get("EncryptionAlgorithm"))
        self._dry_run(p)
        blob = self._seal(key, p["Plaintext"], context)
        return {
            "CiphertextBlob": _b64(blob),
            "KeyId": key.arn,
            "EncryptionAlgorithm": "SYMMETRIC_DEFAULT",
        }

    def _open(
        self,
        p: dict[str, Any],
        blob: bytes,
        key_id: str | None,
        context: Mapping[str, str] | None,
        caller: Caller,
        out: Outcome,
        action: str,
        recipient: RecipientInfo | None = None,
    ) -> tuple[_Key, bytes]:
        try:
            header = ciphertext.parse_header(blob)
        except CiphertextFormatError:
            raise KmsApiError("InvalidCiphertextException", "") from None
        key = self._keys.get(header.key_id)
        if key is None:
            out.reason = "ciphertext names an unknown key"
            raise KmsApiError(
                "AccessDeniedException",
                "The ciphertext refers to a customer master key that does not exist, does not "
                "exist in this region, or you are not allowed to access.",
            )
        if key_id is not None and self.resolve(key_id) is not key:
            out.key_arn = key.arn
            out.reason = "KeyId does not match the ciphertext's key"
            raise KmsApiError(
                "IncorrectKeyException",
                "The key ID in the request does not identify a CMK that can perform this "
                "operation.",
            )
        self._authorize(out, caller, action, key, context=context or {}, recipient=recipient)
        self._require_usable(key)
        aead = key.versions.get(header.key_version)
        if aead is None:
            raise KmsApiError("InvalidCiphertextException", "")
        try:
            plaintext = ciphertext.open_blob(aead, header, context)
        except CiphertextFormatError:
            out.decision, out.reason = (
                "error",
                "ciphertext or encryption context does not authenticate",
            )
            raise KmsApiError("InvalidCiphertextException", "") from None
        return key, plaintext

    async def _op_Decrypt(self, p: _Params, caller: Caller, out: Outcome) -> _Answer:
        self._check_algorithm(p.get("EncryptionAlgorithm"))
        recipient = self._recipient(p, out, caller, "Decrypt")
        key, plaintext = self._open(
            p,
            p["CiphertextBlob"],
            p.get("KeyId"),
            p.get("EncryptionContext"),
            caller,
            out,
            "Decrypt",
            recipient,
        )
        self._dry_run(p)
        ans: dict[str, Any] = {"KeyId": key.arn, "EncryptionAlgorithm": "SYMMETRIC_DEFAULT"}
        if recipient is not None:
            ans["CiphertextForRecipient"] = _b64(
                cms.build_enveloped_data(plaintext, recipient.public_key)
            )
        else:
            ans["Plaintext"] = _b64(plaintext)
        return ans

    async def _op_ReEncrypt(
        self, p: dict[str, Any], caller: Caller, out: Outcome
    ) -> dict[str, Any]:
        self._check_algorithm(p.get("SourceEncryptionAlgorithm"))
        self._check_algorithm(p.get("DestinationEncryptionAlgorithm"))
        src, plaintext = self._open(
            p,
            p["CiphertextBlob"],
            p.get("SourceKeyId"),
            p.get("SourceEncryptionContext"),
            caller,
            out,
            "ReEncryptFrom",
        )
        dst = self.resolve(p["DestinationKeyId"])
        context = p.get("DestinationEncryptionContext")
        self._authorize(out, caller, "ReEncryptTo", dst, context=context or {})
        self._require_usable(dst)
        self._dry_run(p)
        return {
            "CiphertextBlob": _b64(self._seal(dst, plaintext, context)),
            "SourceKeyId": src.arn,
            "KeyId": dst.arn,
            "SourceEncryptionAlgorithm": "SYMMETRIC_DEFAULT",
            "DestinationEncryptionAlgorithm": "SYMMETRIC_DEFAULT",
        }

    @staticmethod
    def _data_key_size(p: Mapping[str, Any]) -> int:
        if ("KeySpec" in p) == ("NumberOfBytes" in p):
            raise KmsApiError(
                "ValidationException", "Please specify either number of bytes or key spec."
            )
        return int(p["NumberOfBytes"]) if "NumberOfBytes" in p else _DATA_KEY_BYTES[p["KeySpec"]]

    async def _op_GenerateDataKey(
        self, p: dict[str, Any], caller: Caller, out: Outcome
    ) -> dict[str, Any]:
        size = self._data_key_size(p)
        recipient = self._recipient(p, out, caller, "GenerateDataKey")
        key = self.resolve(p["KeyId"])
        context = p.get("EncryptionContext")
        self._authorize(
            out, caller, "GenerateDataKey", key, context=context or {}, recipient=recipient
        )
        self._require_usable(key)
        self._dry_run(p)
        data_key = _wrap.random_bytes(size)
        ans: dict[str, Any] = {
            "CiphertextBlob": _b64(self._seal(key, data_key, context)),
            "KeyId": key.arn,
        }
        if recipient is not None:
            ans["CiphertextForRecipient"] = _b64(
                cms.build_enveloped_data(data_key, recipient.public_key)
            )
        else:
            ans["Plaintext"] = _b64(data_key)
        return ans

    async def _op_GenerateDataKeyWithoutPlaintext(
        self, p: dict[str, Any], caller: Caller, out: Outcome
    ) -> dict[str, Any]:
        size = self._data_key_size(p)
        key = self.resolve(p["KeyId"])
        context = p.get("EncryptionContext")
        self._authorize(out, caller, "GenerateDataKeyWithoutPlaintext", key, context=context or {})
        self._require_usable(key)
        self._dry_run(p)
        blob = self._seal(key, _wrap.random_bytes(size), context)
        return {"CiphertextBlob": _b64(blob), "KeyId": key.arn}

    async def _op_GenerateDataKeyPair(self, p: _Params, caller: Caller, out: Outcome) -> _Answer:
        spec = p["KeyPairSpec"]
        if spec not in _wrap.KEY_PAIR_SPECS:
            raise KmsApiError(
                "UnsupportedOperationException", f"KeyPairSpec {spec} is not supported."
            )
        recipient = self._recipient(p, out, caller, "GenerateDataKeyPair")
        key = self.resolve(p["KeyId"])
        context = p.get("EncryptionContext")
        conditions_ctx = context or {}
        self._authorize(
            out, caller, "GenerateDataKeyPair", key, context=conditions_ctx, recipient=recipient
        )
        self._require_usable(key)
        self._dry_run(p)
        # RSA-3072/4096 generation takes up to a second: keep it off the event loop.
        private_der, public_der = await trio.to_thread.run_sync(_wrap.generate_key_pair, spec)
        ans: _Answer = {
            "PrivateKeyCiphertextBlob": _b64(self._seal(key, private_der, context)),
            "PublicKey": _b64(public_der),
            "KeyId": key.arn,
            "KeyPairSpec": spec,
        }
        if recipient is not None:
            envelope = cms.build_enveloped_data(private_der, recipient.public_key)
            ans["CiphertextForRecipient"] = _b64(envelope)
        else:
            ans["PrivateKeyPlaintext"] = _b64(private_der)
        return ans

    async def _op_GenerateDataKeyPairWithoutPlaintext(
        self, p: _Params, caller: Caller, out: Outcome
    ) -> _Answer:
        spec = p["KeyPairSpec"]
        if spec not in _wrap.KEY_PAIR_SPECS:
            raise KmsApiError(
                "UnsupportedOperationException", f"KeyPairSpec {spec} is not supported."
            )
        key = self.resolve(p["KeyId"])
        context = p.get("EncryptionContext")
        self._authorize(
            out, caller, "GenerateDataKeyPairWithoutPlaintext", key, context=context or {}
        )
        self._require_usable(key)
        self._dry_run(p)
        private_der, public_der = await trio.to_thread.run_sync(_wrap.generate_key_pair, spec)
        return {
            "PrivateKeyCiphertextBlob": _b64(self._seal(key, private_der, context)),
            "PublicKey": _b64(public_der),
            "KeyId": key.arn,
            "KeyPairSpec": spec,
        }

    async def _op_GenerateRandom(
        self, p: dict[str, Any], caller: Caller, out: Outcome
    ) -> dict[str, Any]:
        if "CustomKeyStoreId" in p:
            raise KmsApiError(
                "CustomKeyStoreNotFoundException", "Custom key stores are not supported."
            )
        n = p.get("NumberOfBytes")
        if n is None:
            raise KmsApiError("ValidationException", "NumberOfBytes is required.")
        recipient = self._recipient(p, out, caller, "GenerateRandom")
        out.decision = "allow"
        out.reason = "GenerateRandom is not key-scoped (no IAM emulated)"
        data = _wrap.random_bytes(int(n))
        if recipient is not None:
            return {
                "CiphertextForRecipient": _b64(cms.build_enveloped_data(data, recipient.public_key))
            }
        return {"Plaintext": _b64(data)}
