"""Key store: a small synchronous storage interface and its SQLite implementation.

The daemon keeps the whole key set in memory (it is small: metadata plus wrapped material) and
writes every change through :class:`Storage` before acknowledging it. Every mutating method is
one transaction, so a ``kill -9`` leaves either the old or the new state, never a mix.

Rows carry a ``mac`` made by the service (:mod:`kms.integrity`); the store keeps it and never
judges it. A backend holds only wrapped material and tagged rows, so a database operator learns
key ids, metadata, policies and aliases, and can neither read material nor change a row
unnoticed.

Schema versions (``PRAGMA user_version``) only go forward: 1 → 2 adds the ``mac`` columns and
marks the store ``legacy_rows`` until :meth:`Storage.finish_migration` has rewritten every row
(the service rewraps and tags them); 2 → 3 adds the ``grants`` table (tagged rows like the
others; key specs, tags, imported-material state and key material ids live in the key's
authenticated metadata record, so they needed no column); 3 → 4 adds ``custom_key_stores``
(external key stores: a tagged JSON record and the proxy credential's secret, wrapped like key
material). A newer schema than this code knows is refused.

The PostgreSQL store (:mod:`kms.pg`) implements this same protocol: each method is one
serializable transaction, retried on serialization failures, and every write also counts one
change in the database, which keeps the in-memory copy of every daemon sharing the database
current (:mod:`kms.coherence`; the copy is checked before each request). A backend that loses
its database mid-request raises :class:`StoreUnavailable`, which the daemon answers with AWS's
retryable ``KMSInternalException`` / ``DependencyTimeoutException``.

SQLite settings: WAL journal (readers never block the writer) and ``synchronous=FULL`` (the WAL
is fsynced at every commit, so an acknowledged write survives a crash of the process or of the
machine).
"""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from transport.errors import ConfigurationError

from .errors import KmsError

__all__ = [
    "StoreUnavailable",
    "KeyRow",
    "VersionRow",
    "AliasRow",
    "GrantRow",
    "KeyStoreRow",
    "Snapshot",
    "Storage",
    "SqliteStorage",
]


class StoreUnavailable(KmsError):
    """The key store's database could not be reached, or did not answer in time: nothing was
    changed by the failed call (a transaction is all or nothing), and the request may be
    retried. Never carries a secret or a database password.

    Attributes:
        timeout: the database answered too late (a lock or statement timeout) rather than not
            at all; AWS's DependencyTimeoutException then, else KMSInternalException.
    """

    def __init__(self, message: str, *, timeout: bool = False) -> None:
        super().__init__(message)
        self.timeout = timeout

    @property
    def aws_type(self) -> str:
        """The AWS error type the daemon answers with (both are retryable)."""
        return "DependencyTimeoutException" if self.timeout else "KMSInternalException"


@dataclass(frozen=True, slots=True)
class KeyRow:
    """A key's metadata (JSON text, see kms.service) and policy."""

    key_id: str
    meta: str
    policy: str
    mac: bytes = b""


@dataclass(frozen=True, slots=True)
class VersionRow:
    """One version of a key's material, wrapped by the master key."""

    key_id: str
    version: int
    wrapped: bytes
    created: float


@dataclass(frozen=True, slots=True)
class AliasRow:
    """An alias name and the key id it points at."""

    name: str
    key_id: str
    created: float
    updated: float
    mac: bytes = b""


@dataclass(frozen=True, slots=True)
class GrantRow:
    """A grant on a key: its JSON record (see kms.service.grants) and tag."""

    grant_id: str
    key_id: str
    record: str
    mac: bytes = b""


@dataclass(frozen=True, slots=True)
class KeyStoreRow:
    """A custom key store: its JSON record (see kms.keystores), the wrapped secret of its proxy
    credential, and the tag over both."""

    store_id: str
    record: str
    secret: bytes
    mac: bytes = b""


@dataclass(frozen=True, slots=True)
class Snapshot:
    """Everything stored, as loaded at start-up."""

    keys: Sequence[KeyRow]
    versions: Sequence[VersionRow]
    aliases: Sequence[AliasRow]
    grants: Sequence[GrantRow] = ()
    key_stores: Sequence[KeyStoreRow] = ()


class Storage(Protocol):
    """What the service needs from a backend. Each method is atomic and durable on return."""

    def load(self) -> Snapshot:
        """Every key, version and alias."""
        ...

    def get_meta(self, name: str) -> bytes | None:
        """A store-wide value (the master-key check), or None."""
        ...

    def set_meta(self, name: str, value: bytes) -> None:
        """Set a store-wide value."""
        ...

    def create_key(self, key: KeyRow, versions: Sequence[VersionRow]) -> None:
        """Insert a key with its material versions (one transaction)."""
        ...

    def update_key(self, key: KeyRow) -> None:
        """Replace a key's metadata and policy."""
        ...

    def add_version(self, key: KeyRow, version: VersionRow) -> None:
        """Add a material version and the key's new metadata (one transaction)."""
        ...

    def delete_version(self, key: KeyRow, key_id: str, version: int) -> None:
        """Delete one material version and store the key's new metadata (one transaction)."""
        ...

    def delete_key(self, key_id: str) -> None:
        """Delete a key, its versions, its aliases and its grants."""
        ...

    def put_grant(self, grant: GrantRow) -> None:
        """Insert a grant."""
        ...

    def delete_grant(self, grant_id: str) -> None:
        """Delete a grant (retired or revoked)."""
        ...

    def put_alias(self, alias: AliasRow) -> None:
        """Insert or replace an alias."""
        ...

    def put_key_store(self, store: KeyStoreRow) -> None:
        """Insert or replace a custom key store."""
        ...

    def delete_key_store(self, store_id: str) -> None:
        """Delete a custom key store (the service checks that no key names it)."""
        ...

    def delete_alias(self, name: str) -> None:
        """Delete an alias."""
        ...

    def finish_migration(self, snapshot: Snapshot, master_check: bytes) -> None:
        """Replace every row by ``snapshot``'s (same keys) and the master check, and clear the
        ``legacy_rows`` mark: one transaction."""
        ...

    def close(self) -> None:
        """Release the backend."""
        ...


_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS keys (
    key_id TEXT PRIMARY KEY,
    meta TEXT NOT NULL,
    policy TEXT NOT NULL,
    mac BLOB NOT NULL DEFAULT x''
);
CREATE TABLE IF NOT EXISTS key_versions (
    key_id TEXT NOT NULL REFERENCES keys(key_id) ON DELETE CASCADE,
    version INTEGER NOT NULL,
    wrapped BLOB NOT NULL,
    created REAL NOT NULL,
    PRIMARY KEY (key_id, version)
);
CREATE TABLE IF NOT EXISTS aliases (
    name TEXT PRIMARY KEY,
    key_id TEXT NOT NULL REFERENCES keys(key_id) ON DELETE CASCADE,
    created REAL NOT NULL,
    updated REAL NOT NULL,
    mac BLOB NOT NULL DEFAULT x''
);
CREATE TABLE IF NOT EXISTS grants (
    grant_id TEXT PRIMARY KEY,
    key_id TEXT NOT NULL REFERENCES keys(key_id) ON DELETE CASCADE,
    record TEXT NOT NULL,
    mac BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS custom_key_stores (
    store_id TEXT PRIMARY KEY,
    record TEXT NOT NULL,
    secret BLOB NOT NULL,
    mac BLOB NOT NULL
);
"""
#: Schema 3 → 4: custom key stores (their keys name them in the keys' authenticated records).
_MIGRATE_3_TO_4 = """
CREATE TABLE IF NOT EXISTS custom_key_stores (
    store_id TEXT PRIMARY KEY,
    record TEXT NOT NULL,
    secret BLOB NOT NULL,
    mac BLOB NOT NULL
);
"""
#: Schema 2 → 3: grants (CreateGrant); everything else new lives in the tagged key records.
_MIGRATE_2_TO_3 = """
CREATE TABLE IF NOT EXISTS grants (
    grant_id TEXT PRIMARY KEY,
    key_id TEXT NOT NULL REFERENCES keys(key_id) ON DELETE CASCADE,
    record TEXT NOT NULL,
    mac BLOB NOT NULL
);
"""
#: Schema 1 → 2: rows gain their tags (filled in by the service, see finish_migration).
_MIGRATE_1_TO_2 = """
ALTER TABLE keys ADD COLUMN mac BLOB NOT NULL DEFAULT x'';
ALTER TABLE aliases ADD COLUMN mac BLOB NOT NULL DEFAULT x'';
INSERT OR REPLACE INTO meta VALUES ('legacy_rows', x'31');
"""
#: Schema version stored in PRAGMA user_version; bump with a migration.
SCHEMA_VERSION = 4


class SqliteStorage:
    """:class:`Storage` on one SQLite file (WAL, synchronous=FULL).

    The connection may be used from any one thread at a time (the daemon serialises calls
    through a single-thread limiter), hence ``check_same_thread=False``.
    """

    def __init__(self, path: Path) -> None:
        # Created 0600 before SQLite opens it: SQLite would use the umask (0644), and it gives
        # the -wal and -shm files the database file's mode.
        os.close(os.open(path, os.O_RDWR | os.O_CREAT, 0o600))
        self._db = sqlite3.connect(
            str(path), isolation_level=None, check_same_thread=False, timeout=5.0
        )
        try:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.execute("PRAGMA foreign_keys=ON")
            version = self._db.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise ConfigurationError(
                    f"key store {path} has schema {version}, newer than this daemon's "
                    f"{SCHEMA_VERSION}: run the newer daemon (migrations only go forward)"
                )
            with self._tx():
                if version == 0:
                    self._script(_SCHEMA)
                if version == 1:
                    self._script(_MIGRATE_1_TO_2)
                if version in (1, 2):
                    self._script(_MIGRATE_2_TO_3)
                if version in (1, 2, 3):
                    self._script(_MIGRATE_3_TO_4)
                self._db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
        except sqlite3.DatabaseError as exc:
            self._db.close()
            raise ConfigurationError(f"cannot open the key store {path}: {exc}") from None
        except BaseException:
            self._db.close()
            raise

    def _script(self, script: str) -> None:
        for stmt in script.split(";"):
            if stmt.strip():
                self._db.execute(stmt)

    def _tx(self) -> _Transaction:
        return _Transaction(self._db)

    def load(self) -> Snapshot:
        keys = [
            KeyRow(r[0], r[1], r[2], bytes(r[3]))
            for r in self._db.execute("SELECT key_id, meta, policy, mac FROM keys")
        ]
        versions = [
            VersionRow(r[0], int(r[1]), bytes(r[2]), float(r[3]))
            for r in self._db.execute("SELECT key_id, version, wrapped, created FROM key_versions")
        ]
        aliases = [
            AliasRow(r[0], r[1], float(r[2]), float(r[3]), bytes(r[4]))
            for r in self._db.execute("SELECT name, key_id, created, updated, mac FROM aliases")
        ]
        grants = [
            GrantRow(r[0], r[1], r[2], bytes(r[3]))
            for r in self._db.execute("SELECT grant_id, key_id, record, mac FROM grants")
        ]
        stores = [
            KeyStoreRow(r[0], r[1], bytes(r[2]), bytes(r[3]))
            for r in self._db.execute(
                "SELECT store_id, record, secret, mac FROM custom_key_stores"
            )
        ]
        return Snapshot(keys, versions, aliases, grants, stores)

    def get_meta(self, name: str) -> bytes | None:
        row = self._db.execute("SELECT value FROM meta WHERE name=?", (name,)).fetchone()
        return bytes(row[0]) if row else None

    def set_meta(self, name: str, value: bytes) -> None:
        with self._tx():
            self._db.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (name, value))

    def create_key(self, key: KeyRow, versions: Sequence[VersionRow]) -> None:
        with self._tx():
            self._db.execute(
                "INSERT INTO keys VALUES (?, ?, ?, ?)", (key.key_id, key.meta, key.policy, key.mac)
            )
            for version in versions:
                self._insert_version(version)

    def _insert_version(self, v: VersionRow) -> None:
        self._db.execute(
            "INSERT INTO key_versions VALUES (?, ?, ?, ?)",
            (v.key_id, v.version, v.wrapped, v.created),
        )

    def _update_key(self, key: KeyRow) -> None:
        self._db.execute(
            "UPDATE keys SET meta=?, policy=?, mac=? WHERE key_id=?",
            (key.meta, key.policy, key.mac, key.key_id),
        )

    def update_key(self, key: KeyRow) -> None:
        with self._tx():
            self._update_key(key)

    def add_version(self, key: KeyRow, version: VersionRow) -> None:
        with self._tx():
            self._insert_version(version)
            self._update_key(key)

    def delete_version(self, key: KeyRow, key_id: str, version: int) -> None:
        with self._tx():
            self._db.execute(
                "DELETE FROM key_versions WHERE key_id=? AND version=?", (key_id, version)
            )
            self._update_key(key)

    def delete_key(self, key_id: str) -> None:
        with self._tx():
            self._db.execute("DELETE FROM keys WHERE key_id=?", (key_id,))

    def put_grant(self, grant: GrantRow) -> None:
        with self._tx():
            self._db.execute(
                "INSERT INTO grants VALUES (?, ?, ?, ?)",
                (grant.grant_id, grant.key_id, grant.record, grant.mac),
            )

    def delete_grant(self, grant_id: str) -> None:
        with self._tx():
            self._db.execute("DELETE FROM grants WHERE grant_id=?", (grant_id,))

    def _put_alias(self, alias: AliasRow) -> None:
        self._db.execute(
            "INSERT OR REPLACE INTO aliases VALUES (?, ?, ?, ?, ?)",
            (alias.name, alias.key_id, alias.created, alias.updated, alias.mac),
        )

    def put_alias(self, alias: AliasRow) -> None:
        with self._tx():
            self._put_alias(alias)

    def delete_alias(self, name: str) -> None:
        with self._tx():
            self._db.execute("DELETE FROM aliases WHERE name=?", (name,))

    def put_key_store(self, store: KeyStoreRow) -> None:
        with self._tx():
            self._db.execute(
                "INSERT OR REPLACE INTO custom_key_stores VALUES (?, ?, ?, ?)",
                (store.store_id, store.record, store.secret, store.mac),
            )

    def delete_key_store(self, store_id: str) -> None:
        with self._tx():
            self._db.execute("DELETE FROM custom_key_stores WHERE store_id=?", (store_id,))

    def finish_migration(self, snapshot: Snapshot, master_check: bytes) -> None:
        with self._tx():
            for key in snapshot.keys:
                self._update_key(key)
            for v in snapshot.versions:
                self._db.execute(
                    "UPDATE key_versions SET wrapped=? WHERE key_id=? AND version=?",
                    (v.wrapped, v.key_id, v.version),
                )
            for alias in snapshot.aliases:
                self._put_alias(alias)
            self._db.execute(
                "INSERT OR REPLACE INTO meta VALUES ('master_check', ?)", (master_check,)
            )
            self._db.execute("DELETE FROM meta WHERE name='legacy_rows'")

    def close(self) -> None:
        self._db.close()


class _Transaction:
    """``BEGIN IMMEDIATE`` … ``COMMIT`` (or ``ROLLBACK`` on error) in autocommit mode."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self._db = db

    def __enter__(self) -> None:
        self._db.execute("BEGIN IMMEDIATE")

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        self._db.execute("COMMIT" if exc_type is None else "ROLLBACK")
