"""The KMS service: the key set in memory, its storage, authorization and the dispatch table.

This layer knows nothing about HTTP. :meth:`KmsService.handle` takes a validated request
(:mod:`kms.api`) and the authenticated caller, looks the operation up in :data:`OPERATIONS` (one
declaration per operation, by family: :mod:`.lifecycle`, :mod:`.authorization`,
:mod:`.management`, :mod:`.crypto`) and runs it through the scaffold (:mod:`._scaffold`). It
returns the JSON answer or raises :class:`~kms.errors.KmsApiError`. Facts for the audit line
(key, decision, denial reason, recipient) are recorded on the :class:`Outcome` passed in, also
when the call fails.

State lives in memory (:class:`Key` objects holding one reusable AEAD per key version) and every
change is written through the :class:`~kms.storage.Storage` before it is applied in memory and
acknowledged. Storage calls run in a worker thread behind a one-thread limiter: a commit with
``synchronous=FULL`` waits for an fsync (milliseconds), which must not stall the event loop and
the other connections; reads never touch SQLite (the in-memory copy is authoritative), so the
hot path (Encrypt/Decrypt/GenerateDataKey) has no thread hop (~0.4 ms each, perf-baseline
§2.3). Mutations are serialised by one lock, so read-modify-write sequences cannot interleave.

Rows are authenticated (:mod:`kms.integrity`): a key record or alias whose tag does not verify
at load is **quarantined**: it stays known (ListKeys shows it) but every use answers
``KeyUnavailableException`` and the operator's log says why; the daemon serves the other keys.

Recipient requests are verified by ``attest``'s verifier inline on the event loop: an ES384
verification with a cached chain costs ~0.7 ms, less than moving it to a thread and back.

External key stores (:mod:`kms.keystores`) live beside the keys: their records in
:attr:`KmsService.key_stores`, the secrets of their proxy credentials unwrapped in memory only,
and this process's clients of their proxies in :attr:`KmsService.proxies`. A store row that
fails its tag is quarantined like a key: its keys cannot be used.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractAsyncContextManager
from functools import partial
from typing import TypeVar

import structlog
import trio

from .. import _asym, _wrap, ciphertext
from ..errors import CiphertextFormatError, KmsApiError
from ..integrity import MasterKey
from ..keyspecs import HMAC_MAX_BYTES, MAC_ALGORITHMS, spec_info
from ..keystores import KeyStore, ProxyClients, ProxySettings
from ..keystores import blob as xks_blob
from ..keystores.record import EXTERNAL_KEY_STORE_ORIGIN, STORE_ID_PREFIX
from ..policy import Decision, KeyPolicy, RequestContext, account_of, default_key_policy
from ..storage import AliasRow, GrantRow, KeyRow, KeyStoreRow, Snapshot, Storage, VersionRow
from . import (
    asymmetric,
    authorization,
    byok,
    crypto,
    grants,
    keystores,
    lifecycle,
    management,
    metadata,
    unsupported,
)
from ._model import (
    DAY_S,
    DEFAULT_ROTATION_DAYS,
    Answer,
    Caller,
    Grant,
    Key,
    KeyRecord,
    MaterialRecord,
    Outcome,
    Params,
    RecipientInfo,
    RecipientRejected,
    RecipientVerifier,
    SeedKey,
)
from ._record import parse_key_record
from ._scaffold import Operation, Request, run_operation

__all__ = ["KmsService", "OPERATIONS"]

log = structlog.get_logger()

_T = TypeVar("_T")

#: Every operation the service serves, by wire name: the declared table (no getattr dispatch).
OPERATIONS: dict[str, Operation] = {
    op.name: op
    for family in (
        lifecycle,
        authorization,
        management,
        crypto,
        asymmetric,
        grants,
        metadata,
        byok,
        keystores,
        unsupported,
    )
    for op in family.OPERATIONS
}

#: A key or alias ARN of this KMS's form (partition, region, account, resource).
_KMS_ARN_RE = re.compile(r"arn:aws[a-z-]*:kms:[a-z0-9-]+:\d{12}:(?:key|alias)/\S+")
#: Request members that become policy condition keys (kms:<Member>) when present.
_PARAM_CONDITIONS = {
    "EncryptionAlgorithm": "kms:encryptionalgorithm",
    "SigningAlgorithm": "kms:signingalgorithm",
    "MessageType": "kms:messagetype",
    "MacAlgorithm": "kms:macalgorithm",
    "KeyAgreementAlgorithm": "kms:keyagreementalgorithm",
    "WrappingAlgorithm": "kms:wrappingalgorithm",
    "WrappingKeySpec": "kms:wrappingkeyspec",
    "ExpirationModel": "kms:expirationmodel",
}


class KmsService:
    """All operations of the daemon over an in-memory key set backed by ``storage``.

    Use :meth:`open` (loads state, checks the master key and every row's tag, applies a seed).
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
        proxy_settings: ProxySettings | None = None,
    ) -> None:
        self._storage = storage
        self.master = master
        self.region = region
        self.account_id = account_id
        self._verify_recipient = recipient_verifier
        self.clock = clock
        self._keys: dict[str, Key] = {}
        self.aliases: dict[str, AliasRow] = {}
        #: key id or alias name → why it is not trusted (tampered at rest).
        self.quarantined: dict[str, str] = {}
        #: True if this start migrated a schema-1 store (its audit log is then schema 1 too).
        self.migrated = False
        #: Serialises read-modify-write sequences. Worker processes sharing one store replace
        #: it by a cross-process section that also keeps the key set current
        #: (:class:`kms.coherence.WriteSection`).
        self.write_lock: AbstractAsyncContextManager[None] = trio.Lock()
        self._limiter = trio.CapacityLimiter(1)
        self._next_deadline = float("inf")
        #: External key stores by id, and their proxy secrets (wrapped as stored, and clear).
        self.key_stores: dict[str, KeyStore] = {}
        self._store_wrapped: dict[str, bytes] = {}
        self._store_secrets: dict[str, str] = {}
        #: This process's clients of the stores' proxies.
        self.proxies = ProxyClients(region, proxy_settings)
        #: Bumped whenever the store set is (re)loaded: the proxies are pruned at the next use.
        self._stores_loaded = 0
        self._stores_pruned = 0

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
        proxy_settings: ProxySettings | None = None,
    ) -> KmsService:
        """Load the key set synchronously (start-up, before serving).

        Raises:
            ConfigurationError: the master key does not match the database.
        """
        from transport.errors import ConfigurationError

        legacy = storage.get_meta("legacy_rows") is not None
        check = storage.get_meta("master_check")
        if check is None:
            storage.set_meta("master_check", master.check_value())
        elif not (master.matches_legacy(check) if legacy else master.matches(check)):
            raise ConfigurationError("the master key does not match this key database")
        svc = cls(
            storage,
            master,
            region=region,
            account_id=account_id,
            recipient_verifier=recipient_verifier,
            clock=clock,
            proxy_settings=proxy_settings,
        )
        snap = storage.load()
        if legacy:
            snap = svc._migrate_legacy(snap)
            svc.migrated = True
        svc._load(snap)
        for s in seed:
            svc._apply_seed(s)
        svc._recompute_deadline()
        return svc

    def _migrate_legacy(self, snap: Snapshot) -> Snapshot:
        """Schema 1 → 2: rewrap material under the wrap subkey and tag every row, in one
        transaction. The rows are trusted as found: there was nothing to check them against."""
        m = self.master
        versions = [
            VersionRow(
                v.key_id,
                v.version,
                m.wrap(v.key_id, v.version, m.unwrap_legacy(v.key_id, v.version, v.wrapped)),
                v.created,
            )
            for v in snap.versions
        ]
        keys = [
            KeyRow(k.key_id, k.meta, k.policy, m.key_record_tag(k.key_id, k.meta, k.policy))
            for k in snap.keys
        ]
        aliases = [
            AliasRow(
                a.name,
                a.key_id,
                a.created,
                a.updated,
                m.alias_tag(a.name, a.key_id, a.created, a.updated),
            )
            for a in snap.aliases
        ]
        new = Snapshot(keys, versions, aliases)
        self._storage.finish_migration(new, m.check_value())
        log.warning(
            "kms_state_migrated",
            keys=len(keys),
            aliases=len(aliases),
            note="schema 1 rows authenticated as found; from now on edits are refused at load",
        )
        return new

    def _load(self, snap: Snapshot) -> None:
        m = self.master
        for row in snap.keys:
            if not m.key_record_ok(row.key_id, row.meta, row.policy, row.mac):
                self._quarantine(row.key_id, "key record (metadata or policy) fails its tag")
                continue
            try:
                meta = parse_key_record(row.meta)
                policy = KeyPolicy.parse(row.policy)
                spec_info(meta["KeySpec"])
            except (ValueError, KeyError, KmsApiError) as exc:  # authentic but unreadable: a bug
                self._quarantine(row.key_id, f"key record does not parse: {exc}")
                continue
            self._keys[row.key_id] = Key(row.key_id, self._arn(row.key_id), meta, policy)
        # (key id, version) → (KeyMaterialId, creation time), for schema-2 records only.
        legacy: dict[tuple[str, int], tuple[str, float]] = {}
        for v in snap.versions:
            key = self._keys.get(v.key_id)
            if key is None:
                continue
            try:
                material = m.unwrap(v.key_id, v.version, v.wrapped)
                self.attach_material(key, v.version, material)
            except (CiphertextFormatError, _asym.KeyMaterialError) as exc:
                del self._keys[v.key_id]
                self._quarantine(v.key_id, f"material version {v.version} is refused: {exc}")
                continue
            if "Materials" not in key.meta:
                legacy[(v.key_id, v.version)] = (_asym.material_id(v.key_id, material), v.created)
        for key in self._keys.values():
            if "Materials" not in key.meta:  # a schema-2 record: describe its materials now
                key.meta = {**key.meta, "Materials": self._describe_legacy(key, legacy)}
        for a in snap.aliases:
            if not m.alias_ok(a.name, a.key_id, a.created, a.updated, a.mac):
                self._quarantine(a.name, "alias row fails its tag")
                continue
            self.aliases[a.name] = a
        for g in snap.grants:
            key = self._keys.get(g.key_id)
            if key is None:
                continue
            if not m.grant_ok(g.grant_id, g.key_id, g.record, g.mac):
                # A forged or edited grant must grant nothing; the key itself stays usable.
                log.error(
                    "kms_state_tampered",
                    name=f"grant {g.grant_id}",
                    reason="grant row fails its tag",
                    action="grant ignored",
                )
                continue
            try:
                key.add_grant(Grant.from_record(g.grant_id, g.key_id, g.record))
            except (ValueError, KeyError, TypeError) as exc:
                log.error("kms_grant_unreadable", grant_id=g.grant_id, reason=str(exc))
        self._load_key_stores(snap.key_stores)

    def _load_key_stores(self, rows: Sequence[KeyStoreRow]) -> None:
        """The external key stores; a row failing its tag (or its secret failing to unwrap)
        is quarantined: the store is unknown to every operation, its keys unusable."""
        m = self.master
        self.key_stores, self._store_wrapped, self._store_secrets = {}, {}, {}
        for row in rows:
            if not m.key_store_ok(row.store_id, row.record, row.secret, row.mac):
                self._quarantine(row.store_id, "custom key store row fails its tag")
                continue
            try:
                store = KeyStore.from_record(row.store_id, row.record)
                secret = m.unwrap_store_secret(row.store_id, row.secret).decode("ascii")
            except (ValueError, KeyError, TypeError, CiphertextFormatError) as exc:
                self._quarantine(row.store_id, f"custom key store row is refused: {exc}")
                continue
            self.key_stores[row.store_id] = store
            self._store_wrapped[row.store_id] = row.secret
            self._store_secrets[row.store_id] = secret
        self._stores_loaded += 1

    @staticmethod
    def _describe_legacy(
        key: Key, legacy: Mapping[tuple[str, int], tuple[str, float]]
    ) -> dict[str, MaterialRecord]:
        """Material descriptions of a key stored before they existed (symmetric AWS_KMS keys,
        every version present). They are written with the key's next change. Rotation dates are
        the versions' creation times; whether a rotation was automatic or on demand was not
        recorded, so RotationType stays absent."""
        out: dict[str, MaterialRecord] = {}
        current = key.current_version
        for version in sorted(key.versions):
            material_id, created = legacy[(key.key_id, version)]
            entry: MaterialRecord = {
                "Id": material_id,
                "State": "CURRENT" if version == current else "NON_CURRENT",
            }
            if version > 1:
                entry["RotationDate"] = created
            out[str(version)] = entry
        return out

    def attach_material(self, key: Key, version: int, material: bytes) -> None:
        """Make ``material`` usable as ``key``'s version ``version`` (by its spec).

        Raises:
            KeyMaterialError: the material does not fit the key's spec.
        """
        spec = key.spec
        if spec.kind == "symmetric":
            if len(material) != _wrap.AES_KEY_BYTES:
                raise _asym.KeyMaterialError("symmetric key material must be 256 bits")
            key.versions[version] = _wrap.Aead(material)
        elif spec.kind == "hmac":
            if not spec.size <= len(material) <= HMAC_MAX_BYTES[spec.name]:
                raise _asym.KeyMaterialError(
                    f"{spec.name} key material must be {spec.size} to "
                    f"{HMAC_MAX_BYTES[spec.name]} bytes"
                )
            key.hmac = _asym.HmacKey(MAC_ALGORITHMS[spec.name], material)
        else:
            key.asymmetric = _asym.AsymmetricKey.load(spec, material)

    def detach_material(self, key: Key, version: int) -> None:
        """Forget material ``version`` (imported material deleted or expired)."""
        key.versions.pop(version, None)
        if key.spec.kind == "hmac":
            key.hmac = None
        elif key.spec.asymmetric:
            key.asymmetric = None

    def reload(self, snap: Snapshot) -> None:
        """Make the in-memory key set ``snap``: another process changed the store.

        A key whose record, material versions and grants are unchanged keeps its parsed policy
        and its AEADs; only new or changed keys are checked, parsed and unwrapped again (with
        their grants, which live in their own table: a grant created through another worker
        takes effect here at once).
        """
        old = self._keys
        stored: dict[str, set[int]] = {}
        for v in snap.versions:
            stored.setdefault(v.key_id, set()).add(v.version)
        granted: dict[str, set[str]] = {}
        for g in snap.grants:
            granted.setdefault(g.key_id, set()).add(g.grant_id)
        unchanged = {
            row.key_id: old[row.key_id]
            for row in snap.keys
            if row.key_id in old
            and stored.get(row.key_id, set()) == old[row.key_id].versions.keys()
            and granted.get(row.key_id, set()) == old[row.key_id].grants.keys()
            and self.key_row(old[row.key_id]).mac == row.mac
        }
        changed = [row for row in snap.keys if row.key_id not in unchanged]
        versions = [v for v in snap.versions if v.key_id not in unchanged]
        grants = [g for g in snap.grants if g.key_id not in unchanged]
        self._keys, self.aliases, self.quarantined = {}, {}, {}
        self._load(Snapshot(changed, versions, snap.aliases, grants, snap.key_stores))
        self._keys.update(unchanged)
        self._recompute_deadline()

    def _quarantine(self, name: str, reason: str) -> None:
        self.quarantined[name] = reason
        log.error("kms_state_tampered", name=name, reason=reason, action="refused at load")

    def _apply_seed(self, s: SeedKey) -> None:
        now = self.clock()
        if s.key_id not in self._keys and s.key_id not in self.quarantined:
            policy = KeyPolicy.parse(s.policy or default_key_policy(self.account_id))
            meta = lifecycle.new_meta(now, s.description)
            meta["Enabled"] = s.enabled
            meta["KeyState"] = "Enabled" if s.enabled else "Disabled"
            if s.rotation_enabled:
                meta["RotationEnabled"] = True
                meta["NextRotationDate"] = now + DEFAULT_ROTATION_DAYS * DAY_S
            meta["CurrentVersion"] = len(s.material)
            meta["Materials"] = lifecycle.describe_materials(s.key_id, s.material, now)
            key = Key(s.key_id, self._arn(s.key_id), meta, policy)
            rows = [
                VersionRow(s.key_id, i, self.master.wrap(s.key_id, i, material), now)
                for i, material in enumerate(s.material, start=1)
            ]
            self._storage.create_key(self.key_row(key), rows)  # all versions in one transaction
            for i, material in enumerate(s.material, start=1):
                key.versions[i] = _wrap.Aead(material)
            self._keys[s.key_id] = key
        for alias in s.aliases:
            if alias not in self.aliases and alias not in self.quarantined:
                row = self.alias_row(alias, s.key_id, now, now)
                self._storage.put_alias(row)
                self.aliases[alias] = row

    def close(self) -> None:
        """Close the storage backend (the proxies' kept connections close with the process or
        with :meth:`aclose_proxies`)."""
        self._storage.close()

    async def aclose_proxies(self) -> None:
        """Close this process's connections to XKS proxies."""
        await self.proxies.aclose()

    # ---------------------------------------------------------------- rows and writes

    def key_row(self, key: Key) -> KeyRow:
        """The stored, tagged form of ``key``'s record."""
        meta = key.meta_text()
        return KeyRow(
            key.key_id,
            meta,
            key.policy.text,
            self.master.key_record_tag(key.key_id, meta, key.policy.text),
        )

    def alias_row(self, name: str, key_id: str, created: float, updated: float) -> AliasRow:
        """A tagged alias row."""
        tag = self.master.alias_tag(name, key_id, created, updated)
        return AliasRow(name, key_id, created, updated, tag)

    @property
    def storage(self) -> Storage:
        """The backend (write through :meth:`write`)."""
        return self._storage

    # ---------------------------------------------------------------- custom key stores

    def store_secret(self, store_id: str) -> str:
        """The secret of a store's proxy credential (never logged, never answered)."""
        return self._store_secrets[store_id]

    async def put_store(self, store: KeyStore, secret: str | None = None) -> None:
        """Persist a store's record (and a new secret, wrapped), then apply it in memory.

        Raises:
            KeyError: no ``secret`` for a store not stored before.
        """
        store_id = store.store_id
        wrapped = (
            self.master.wrap_store_secret(store_id, secret.encode("ascii"))
            if secret is not None
            else self._store_wrapped[store_id]
        )
        record = store.record()
        row = KeyStoreRow(
            store_id, record, wrapped, self.master.key_store_tag(store_id, record, wrapped)
        )
        await self.write(lambda: self._storage.put_key_store(row))
        self.key_stores[store_id] = store
        self._store_wrapped[store_id] = wrapped
        if secret is not None:
            self._store_secrets[store_id] = secret

    async def delete_store(self, store_id: str) -> None:
        """Delete a store's row; forget it and its proxy client."""
        await self.write(lambda: self._storage.delete_key_store(store_id))
        self.key_stores.pop(store_id, None)
        self._store_wrapped.pop(store_id, None)
        self._store_secrets.pop(store_id, None)
        await self.proxies.discard(store_id)

    async def prune_proxies(self) -> None:
        """Drop proxy clients of stores that changed since they were made (cheap when the
        store set was not reloaded since the last call)."""
        if self._stores_pruned != self._stores_loaded:
            self._stores_pruned = self._stores_loaded
            await self.proxies.prune(self.key_stores)

    def keys_in_store(self, store_id: str) -> list[Key]:
        """The keys (any state) of a custom key store."""
        return [k for k in self._keys.values() if k.meta.get("CustomKeyStoreId") == store_id]

    async def write(self, fn: Callable[[], _T]) -> _T:
        """Run one storage call in the storage thread (durable when it returns)."""
        return await trio.to_thread.run_sync(fn, limiter=self._limiter)

    async def save(self, key: Key, meta: KeyRecord, policy: KeyPolicy | None = None) -> None:
        """Persist new metadata/policy for ``key``, then apply it in memory."""
        new = Key(key.key_id, key.arn, meta, policy or key.policy, key.versions)
        row = self.key_row(new)
        await self.write(lambda: self._storage.update_key(row))
        key.meta, key.policy = meta, new.policy
        self._recompute_deadline()

    def add_key(self, key: Key) -> None:
        """Make a stored key visible."""
        self._keys[key.key_id] = key

    def keys_sorted(self) -> list[tuple[str, str]]:
        """(key id, ARN) of every key, quarantined ones included (ListKeys)."""
        ids = sorted(
            set(self._keys)
            | {k for k in self.quarantined if not k.startswith(("alias/", STORE_ID_PREFIX))}
        )
        return [(k, self._arn(k)) for k in ids]

    # ---------------------------------------------------------------- naming

    def _arn(self, key_id: str) -> str:
        return f"arn:aws:kms:{self.region}:{self.account_id}:key/{key_id}"

    def arn(self, key_id: str) -> str:
        """The ARN of a key id in this region and account."""
        return self._arn(key_id)

    def alias_arn(self, name: str) -> str:
        """The ARN of an alias name."""
        return f"arn:aws:kms:{self.region}:{self.account_id}:{name}"

    def _not_found(self, key_id: str) -> KmsApiError:
        return KmsApiError("NotFoundException", f"Key '{self._display(key_id)}' does not exist")

    def _display(self, key_id: str) -> str:
        if key_id.startswith(("arn:", "alias/")):
            return key_id[:300]
        return self._arn(key_id[:64])

    def _unavailable(self, name: str) -> KmsApiError:
        # The reason (tampering) is in the operator's log; the caller learns the key is unusable.
        shown = name if name.startswith("alias/") else self._arn(name)
        return KmsApiError("KeyUnavailableException", f"{shown} is unavailable.")

    def alias_missing(self, name: str) -> KmsApiError:
        """NotFoundException for an alias (AWS wording)."""
        return KmsApiError("NotFoundException", f"Alias {self.alias_arn(name)} is not found.")

    def resolve(self, key_id: str, *, allow_alias: bool = True) -> Key:
        """A key by id, key ARN, alias name or alias ARN (NotFoundException otherwise)."""
        name = key_id
        if key_id.startswith("arn:"):
            if not _KMS_ARN_RE.fullmatch(key_id):
                raise KmsApiError("InvalidArnException", f"{key_id[:300]} is not a valid ARN.")
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
            return self.alias_target(name)
        key = self._keys.get(name)
        if key is None:
            if name in self.quarantined:
                raise self._unavailable(name)
            raise self._not_found(key_id)
        return key

    def alias_target(self, name: str) -> Key:
        """The key alias ``name`` points at."""
        alias = self.aliases.get(name)
        if alias is None:
            if name in self.quarantined:
                raise self._unavailable(name)
            raise self.alias_missing(name)
        key = self._keys.get(alias.key_id)
        if key is None:
            raise self._unavailable(alias.key_id)
        return key

    def forget(self, key_id: str) -> None:
        """Drop a deleted key and its aliases from memory."""
        self._keys.pop(key_id, None)
        for name in [n for n, a in self.aliases.items() if a.key_id == key_id]:
            del self.aliases[name]

    # ---------------------------------------------------------------- authorization

    def authorize(
        self,
        outcome: Outcome,
        caller: Caller,
        action: str,
        key: Key,
        *,
        context: Mapping[str, str] | None = None,
        recipient: RecipientInfo | None = None,
        params: Mapping[str, object] | None = None,
        extra: Mapping[str, tuple[str, ...]] | None = None,
    ) -> None:
        """Allow ``caller`` to perform ``kms:<action>`` on ``key`` or raise AccessDenied.

        The one authorization point of every operation. As AWS evaluates: an explicit Deny in
        the key policy refuses; otherwise an Allow of the policy, or a grant on the key for the
        caller (with the action among its operations and its encryption-context constraint
        met), allows; otherwise the implicit deny refuses. ``params`` (the request's validated
        members) gives the condition keys of its members (kms:KeySpec of CreateKey...).
        """
        outcome.key_arn = key.arn
        cond = self.conditions(caller, context, recipient)
        cond.update(key.key_conditions)
        if params:
            for member in params:  # a request has a few members: cheaper than the table
                name = _PARAM_CONDITIONS.get(member)
                if name is not None:
                    cond[name] = (str(params[member]),)
        if extra:
            cond.update(extra)
        ctx = RequestContext(
            principal_arn=caller.principal_arn,
            action=f"kms:{action}",
            resource=key.arn,
            conditions=cond,
        )
        decision = key.policy.evaluate(ctx)
        if not decision.allowed and not decision.explicit and key.grants:
            grant = self.grant_allowing(key, caller, action, context)
            if grant is not None:
                decision = Decision(True, f"allowed by grant {grant.grant_id}")
                outcome.grant_id = grant.grant_id
        outcome.decision = "allow" if decision.allowed else "deny"
        outcome.reason = decision.reason
        if not decision.allowed:
            raise KmsApiError(
                "AccessDeniedException",
                f"User: {caller.principal_arn} is not authorized to perform: kms:{action} on "
                f"resource: {key.arn}",
            )

    @staticmethod
    def grant_allowing(
        key: Key, caller: Caller, action: str, context: Mapping[str, str] | None
    ) -> Grant | None:
        """A grant of ``key`` that lets ``caller`` perform ``action`` in this request, if any.

        A grant names its grantee by ARN or by account (which, with no IAM emulated, stands for
        every principal of that account, as key policies treat account principals). Encryption
        context constraints apply to operations that take an encryption context (``context``
        is not None); for the others a constrained grant may only list DescribeKey, RetireGrant
        and CreateGrant, where AWS does not apply them.
        """
        principal = caller.principal_arn
        account = account_of(principal)
        candidates = list(key.grants_by_grantee.get(principal, ()))
        if account is not None:
            candidates += key.grants_by_grantee.get(f"arn:aws:iam::{account}:root", ())
            candidates += key.grants_by_grantee.get(account, ())
        for grant in candidates:
            if action in grant.operations and grants.constraints_hold(grant, context):
                return grant
        return None

    def check_grant_tokens(self, tokens: Sequence[str]) -> None:
        """Every grant token must be one this KMS issued (InvalidGrantTokenException).

        Grants take effect at once here (there is no eventual consistency to bridge), so a
        valid token adds nothing to authorization; an invalid one fails the request, as in AWS.
        """
        for token in tokens:
            if self.master.grant_of_token(token) is None:
                raise KmsApiError("InvalidGrantTokenException", "The grant token is not valid.")

    @staticmethod
    def conditions(
        caller: Caller,
        context: Mapping[str, str] | None,
        recipient: RecipientInfo | None,
    ) -> dict[str, tuple[str, ...]]:
        """The condition keys of a request (principal, encryption context, attestation)."""
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

    def verify_recipient(
        self, rec: Mapping[str, object], request: Request, action: str
    ) -> RecipientInfo:
        """Verify a Recipient's attestation document (fail closed without trust roots).

        ``rec`` is the request's validated ``Recipient`` member (:mod:`kms.api`: its
        ``AttestationDocument`` decoded to bytes).

        Raises:
            KmsApiError: UnsupportedOperationException without trust roots; ValidationException
                for a Recipient without a document or a malformed one; AccessDeniedException
                for a document that does not verify.
        """
        out, caller = request.outcome, request.caller
        if self._verify_recipient is None:
            out.decision = "deny"
            out.reason = "Recipient request refused: no attestation trust roots configured"
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
            document = rec.get("AttestationDocument")
            if not isinstance(document, bytes):
                raise RecipientRejected("Recipient without an attestation document", malformed=True)
            info = self._verify_recipient(document, out)
        except RecipientRejected as exc:
            out.decision, out.reason = "deny", exc.reason
            if exc.malformed:
                raise KmsApiError(
                    "ValidationException",
                    "The Recipient's attestation document is not valid or has no RSA public key.",
                ) from None
            raise KmsApiError(
                "AccessDeniedException",
                f"User: {caller.principal_arn} is not authorized to perform: kms:{action}",
            ) from None
        out.recipient = {"module_id": info.module_id, "image_sha384": info.image_sha384}
        return info

    # ---------------------------------------------------------------- ciphertexts

    def locate_ciphertext(
        self, blob: bytes, key_id: str | None, outcome: Outcome
    ) -> tuple[Key, ciphertext.BlobHeader | xks_blob.XksBlob]:
        """The key a CiphertextBlob names (and, if ``key_id`` is given, that it is that key).

        A blob of a key in an external key store (format 2, :mod:`kms.keystores.blob`) is
        parsed as one; each format opens only under a key of its kind.
        """
        header: ciphertext.BlobHeader | xks_blob.XksBlob
        try:
            if xks_blob.is_external_blob(blob):
                header = xks_blob.parse(blob)
            else:
                header = ciphertext.parse_header(blob)
        except CiphertextFormatError:
            raise KmsApiError("InvalidCiphertextException", "") from None
        key = self._keys.get(header.key_id)
        if key is None:
            if header.key_id in self.quarantined:
                raise self._unavailable(header.key_id)
            outcome.reason = "ciphertext names an unknown key"
            raise KmsApiError(
                "AccessDeniedException",
                "The ciphertext refers to a customer master key that does not exist, does not "
                "exist in this region, or you are not allowed to access.",
            )
        if key_id is not None and self.resolve(key_id) is not key:
            outcome.key_arn = key.arn
            outcome.reason = "KeyId does not match the ciphertext's key"
            raise KmsApiError(
                "IncorrectKeyException",
                "The key ID in the request does not identify a CMK that can perform this "
                "operation.",
            )
        external = key.meta["Origin"] == EXTERNAL_KEY_STORE_ORIGIN
        if external != isinstance(header, xks_blob.XksBlob):
            outcome.key_arn = key.arn
            outcome.reason = "ciphertext format does not match its key's origin"
            raise KmsApiError("InvalidCiphertextException", "")
        return key, header

    @staticmethod
    def open_ciphertext(
        key: Key,
        header: ciphertext.BlobHeader,
        context: Mapping[str, str] | None,
        outcome: Outcome,
    ) -> bytes:
        """Open an authorized blob (InvalidCiphertextException if it does not authenticate)."""
        aead = key.versions.get(header.key_version)
        if aead is None:
            raise KmsApiError("InvalidCiphertextException", "")
        try:
            return ciphertext.open_blob(aead, header, context)
        except CiphertextFormatError:
            outcome.decision, outcome.reason = (
                "error",
                "ciphertext or encryption context does not authenticate",
            )
            raise KmsApiError("InvalidCiphertextException", "") from None

    @staticmethod
    def open_asymmetric(key: Key, algorithm: str, blob: bytes, outcome: Outcome) -> bytes:
        """Decrypt an RSAES-OAEP ciphertext with an authorized RSA ENCRYPT_DECRYPT key.

        Raises:
            KmsApiError: InvalidKeyUsageException (the algorithm is not one of the key's),
                InvalidCiphertextException (it does not decrypt: opaque).
        """
        asym = key.asymmetric
        if key.usage != "ENCRYPT_DECRYPT" or algorithm not in key.spec.encryption:
            raise KmsApiError(
                "InvalidKeyUsageException",
                f"The encryption algorithm {algorithm} is not compatible with {key.arn}.",
            )
        if asym is None:  # imported material absent: the state check refused already
            raise KmsApiError("KMSInvalidStateException", f"{key.arn} is pending import.")
        try:
            return asym.decrypt(algorithm, blob)
        except CiphertextFormatError:
            outcome.decision, outcome.reason = "error", "RSA ciphertext does not decrypt"
            raise KmsApiError("InvalidCiphertextException", "") from None

    @staticmethod
    def seal(key: Key, plaintext: bytes, context: Mapping[str, str] | None) -> bytes:
        """A CiphertextBlob under ``key``'s current version."""
        version = key.current_version
        return ciphertext.seal(key.versions[version], key.key_id, version, plaintext, context)

    # ---------------------------------------------------------------- scheduled work

    def _recompute_deadline(self) -> None:
        deadline = float("inf")
        for key in self._keys.values():
            meta = key.meta
            if meta.get("DeletionDate") is not None:
                deadline = min(deadline, float(meta["DeletionDate"]))
            if meta.get("RotationEnabled") and key.state == "Enabled":
                deadline = min(deadline, float(meta.get("NextRotationDate", deadline)))
            if meta["Origin"] == "EXTERNAL":
                for entry in meta.get("Materials", {}).values():
                    valid_to = entry.get("ValidTo")
                    if valid_to is not None and entry.get("ImportState") == "IMPORTED":
                        deadline = min(deadline, float(valid_to))
        self._next_deadline = deadline

    def recompute_deadline(self) -> None:
        """Re-derive when the next deletion, rotation or material expiry is due."""
        self._recompute_deadline()

    async def _maintenance(self) -> None:
        """Delete keys whose deletion date passed; rotate keys whose rotation is due; delete
        imported material whose ValidTo passed (the key becomes PendingImport, as in AWS)."""
        now = self.clock()
        async with self.write_lock:
            for key in list(self._keys.values()):
                deletion = key.meta.get("DeletionDate")
                if deletion is not None and now >= float(deletion):
                    await self.write(partial(self._storage.delete_key, key.key_id))
                    self.forget(key.key_id)
                    continue
                if (
                    key.meta.get("RotationEnabled")
                    and key.state == "Enabled"
                    and now >= float(key.meta.get("NextRotationDate", now + 1))
                ):
                    await self.rotate(key, on_demand=False)
                if key.origin == "EXTERNAL":
                    for version, entry in key.materials().items():
                        valid_to = entry.get("ValidTo")
                        if (
                            valid_to is not None
                            and entry.get("ImportState") == "IMPORTED"
                            and now >= float(valid_to)
                        ):
                            await byok.delete_material(self, key, int(version), reason="expired")
            self._recompute_deadline()

    async def rotate(self, key: Key, *, on_demand: bool) -> None:
        """Add a fresh material version and make it current (caller holds the write lock)."""
        now = self.clock()
        materials = key.materials()
        version = max([int(v) for v in materials] + list(key.versions)) + 1
        material = _wrap.random_bytes(_wrap.AES_KEY_BYTES)
        meta = key.meta.copy()
        meta["CurrentVersion"] = version
        meta["LastRotationDate"] = now
        if on_demand:
            meta["OnDemandRotations"] = int(meta.get("OnDemandRotations", 0)) + 1
        if meta.get("RotationEnabled"):
            meta["NextRotationDate"] = now + float(meta["RotationPeriodInDays"]) * DAY_S
        for entry in materials.values():
            if entry.get("State") == "CURRENT":
                entry["State"] = "NON_CURRENT"
        materials[str(version)] = {
            "Id": _asym.material_id(key.key_id, material),
            "State": "CURRENT",
            "RotationDate": now,
            "RotationType": "ON_DEMAND" if on_demand else "AUTOMATIC",
        }
        meta["Materials"] = materials
        new = Key(key.key_id, key.arn, meta, key.policy)
        row = VersionRow(key.key_id, version, self.master.wrap(key.key_id, version, material), now)
        key_row = self.key_row(new)
        await self.write(lambda: self._storage.add_version(key_row, row))
        key.versions[version] = _wrap.Aead(material)
        key.meta = meta

    # ---------------------------------------------------------------- grants

    async def put_grant(self, key: Key, grant: Grant) -> None:
        """Store a new grant, then make it effective (at once: no eventual consistency)."""
        record = grant.record()
        row = GrantRow(
            grant.grant_id,
            key.key_id,
            record,
            self.master.grant_tag(grant.grant_id, key.key_id, record),
        )
        await self.write(lambda: self._storage.put_grant(row))
        key.add_grant(grant)

    async def delete_grant(self, key: Key, grant_id: str) -> None:
        """Delete a grant (retired or revoked); it stops working before this returns."""
        await self.write(lambda: self._storage.delete_grant(grant_id))
        key.drop_grant(grant_id)

    def all_keys(self) -> list[Key]:
        """Every usable key in memory (ListRetirableGrants walks their grants)."""
        return list(self._keys.values())

    # ---------------------------------------------------------------- dispatch

    async def handle(
        self, operation: str, params: Mapping[str, object], caller: Caller, outcome: Outcome
    ) -> Answer:
        """Run one validated operation (its name is one of :data:`OPERATIONS`).

        ``params`` is :func:`kms.api.validate`'s result: the operations read it through the
        typed accessors of :class:`~kms.service._model.Params`.

        Raises:
            KmsApiError: the AWS error to answer with.
        """
        if self.clock() >= self._next_deadline:  # checked inline: the hot path has no await
            await self._maintenance()
        if self._stores_pruned != self._stores_loaded:  # another worker changed the stores
            await self.prune_proxies()
        op = OPERATIONS.get(operation)
        if op is None:  # kms.api validated the name: a table out of step with it is our bug
            raise KmsApiError("UnknownOperationException", "", status=400)
        return await run_operation(self, op, Request(Params(params), caller, outcome))
