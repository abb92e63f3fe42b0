""":class:`kms.storage.Storage` on PostgreSQL: several daemons, one database.

Each method is ONE serializable transaction (retried as a whole on a serialization failure or
a deadlock, :meth:`kms.pg._connect.PgConnection.transact`) and every write also bumps the
change counter ``kms_generation`` in the same transaction, so a daemon that reads the counter
knows whether its in-memory key set is current (:mod:`kms.pg.coherence`), and two writes that
raced would conflict on that row and be serialised by the database even if the daemons' own
write section did not order them.

What the database holds is what the SQLite store holds: key material wrapped (AES-256-GCM) by
the master key's wrap subkey, key records, aliases and grants tagged (HMAC) by its record
subkey. The master key itself never reaches the database.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import psycopg
from psycopg.rows import TupleRow

from ..storage import (
    AliasRow,
    GrantRow,
    KeyRow,
    KeyStoreRow,
    Snapshot,
    StoreUnavailable,
    VersionRow,
)
from ._connect import PgConnection
from .schema import migrate

__all__ = ["PgStorage", "StoreConflict"]

_Conn = psycopg.Connection[TupleRow]


class StoreConflict(StoreUnavailable):
    """A write was computed from a key set that another daemon has changed since (its
    compare-and-set on the change counter failed): rolled back, retryable."""


class PgStorage:
    """:class:`~kms.storage.Storage` on one PostgreSQL database (see the module docstring).

    Opening connects and migrates the schema forward (:func:`kms.pg.schema.migrate`).

    Args:
        url: the database URL.
        on_commit: called with the change counter's new value after each committed write
            (the coherence layer tracks it).

    Raises:
        ConfigurationError: the database cannot be reached, refuses us, or has a newer schema.
    """

    def __init__(self, url: str, *, on_commit: Callable[[int], None] | None = None) -> None:
        self._db = PgConnection(url, "store", serializable=True)
        self._db.connect()
        self.shown = self._db.shown
        self.on_commit = on_commit
        #: Set by the write section (:mod:`kms.pg.coherence`): the change counter the section
        #: loaded the key set at; a write commits only if the counter still holds it.
        self.expected: int | None = None
        try:
            found, now = self._db.run(lambda c: migrate(c, shown=self.shown))
        except BaseException:
            self._db.close()
            raise
        self.migrated_from = found if found != now else None

    # ------------------------------------------------------------ reads

    def load(self) -> Snapshot:
        return self.load_with_generation()[0]

    def load_with_generation(self) -> tuple[Snapshot, int]:
        """Every row and the change counter, from one snapshot."""

        def read(c: _Conn) -> tuple[Snapshot, int]:
            c.execute("SET TRANSACTION READ ONLY")
            keys = [
                KeyRow(str(r[0]), str(r[1]), str(r[2]), bytes(r[3]))
                for r in c.execute("SELECT key_id, meta, policy, mac FROM kms_keys")
            ]
            versions = [
                VersionRow(str(r[0]), int(r[1]), bytes(r[2]), float(r[3]))
                for r in c.execute("SELECT key_id, version, wrapped, created FROM kms_key_versions")
            ]
            aliases = [
                AliasRow(str(r[0]), str(r[1]), float(r[2]), float(r[3]), bytes(r[4]))
                for r in c.execute("SELECT name, key_id, created, updated, mac FROM kms_aliases")
            ]
            grants = [
                GrantRow(str(r[0]), str(r[1]), str(r[2]), bytes(r[3]))
                for r in c.execute("SELECT grant_id, key_id, record, mac FROM kms_grants")
            ]
            stores = [
                KeyStoreRow(str(r[0]), str(r[1]), bytes(r[2]), bytes(r[3]))
                for r in c.execute(
                    "SELECT store_id, record, secret, mac FROM kms_custom_key_stores"
                )
            ]
            gen = _one(c, "SELECT gen FROM kms_generation")
            return Snapshot(keys, versions, aliases, grants, stores), gen

        return self._db.transact(read, what="load the key set")

    def generation(self) -> int:
        """The change counter now (one statement)."""
        return self._db.run(lambda c: _one(c, "SELECT gen FROM kms_generation"))

    def get_meta(self, name: str) -> bytes | None:
        def read(c: _Conn) -> bytes | None:
            row = c.execute("SELECT value FROM kms_meta WHERE name = %s", (name,)).fetchone()
            return bytes(row[0]) if row else None

        return self._db.run(read)

    # ------------------------------------------------------------ writes

    def _write(self, what: str, fn: Callable[[_Conn], None]) -> None:
        expected = self.expected

        def tx(c: _Conn) -> int:
            fn(c)
            if expected is None:
                return _one(c, "UPDATE kms_generation SET gen = gen + 1 RETURNING gen")
            row = c.execute(
                "UPDATE kms_generation SET gen = gen + 1 WHERE gen = %s RETURNING gen",
                (expected,),
            ).fetchone()
            if row is None:  # rolls the transaction back
                raise StoreConflict(
                    f"{what}: another daemon changed the key store since this one loaded it; retry"
                )
            return int(row[0])

        gen = self._db.transact(tx, what=what)
        if self.on_commit is not None:
            self.on_commit(gen)

    def set_meta(self, name: str, value: bytes) -> None:
        self._write(
            "set a store value",
            lambda c: _exec(
                c,
                "INSERT INTO kms_meta VALUES (%s, %s) "
                "ON CONFLICT (name) DO UPDATE SET value = EXCLUDED.value",
                (name, value),
            ),
        )

    def create_key(self, key: KeyRow, versions: Sequence[VersionRow]) -> None:
        def tx(c: _Conn) -> None:
            c.execute(
                "INSERT INTO kms_keys VALUES (%s, %s, %s, %s)",
                (key.key_id, key.meta, key.policy, key.mac),
            )
            for v in versions:
                _insert_version(c, v)

        self._write("create a key", tx)

    def update_key(self, key: KeyRow) -> None:
        self._write("update a key", lambda c: _update_key(c, key))

    def add_version(self, key: KeyRow, version: VersionRow) -> None:
        def tx(c: _Conn) -> None:
            _insert_version(c, version)
            _update_key(c, key)

        self._write("add a key version", tx)

    def delete_version(self, key: KeyRow, key_id: str, version: int) -> None:
        def tx(c: _Conn) -> None:
            c.execute(
                "DELETE FROM kms_key_versions WHERE key_id = %s AND version = %s",
                (key_id, version),
            )
            _update_key(c, key)

        self._write("delete a key version", tx)

    def delete_key(self, key_id: str) -> None:
        self._write(
            "delete a key",
            lambda c: _exec(c, "DELETE FROM kms_keys WHERE key_id = %s", (key_id,)),
        )

    def put_grant(self, grant: GrantRow) -> None:
        self._write(
            "create a grant",
            lambda c: _exec(
                c,
                "INSERT INTO kms_grants VALUES (%s, %s, %s, %s)",
                (grant.grant_id, grant.key_id, grant.record, grant.mac),
            ),
        )

    def delete_grant(self, grant_id: str) -> None:
        self._write(
            "delete a grant",
            lambda c: _exec(c, "DELETE FROM kms_grants WHERE grant_id = %s", (grant_id,)),
        )

    def put_alias(self, alias: AliasRow) -> None:
        self._write("set an alias", lambda c: _put_alias(c, alias))

    def delete_alias(self, name: str) -> None:
        self._write(
            "delete an alias",
            lambda c: _exec(c, "DELETE FROM kms_aliases WHERE name = %s", (name,)),
        )

    def put_key_store(self, store: KeyStoreRow) -> None:
        """Insert or replace a custom key store."""
        self._write(
            "set a custom key store",
            lambda c: _exec(
                c,
                "INSERT INTO kms_custom_key_stores VALUES (%s, %s, %s, %s) "
                "ON CONFLICT (store_id) DO UPDATE SET record = EXCLUDED.record, "
                "secret = EXCLUDED.secret, mac = EXCLUDED.mac",
                (store.store_id, store.record, store.secret, store.mac),
            ),
        )

    def delete_key_store(self, store_id: str) -> None:
        """Delete a custom key store (the service checks that no key names it)."""
        self._write(
            "delete a custom key store",
            lambda c: _exec(
                c, "DELETE FROM kms_custom_key_stores WHERE store_id = %s", (store_id,)
            ),
        )

    def finish_migration(self, snapshot: Snapshot, master_check: bytes) -> None:
        # Schema-1 stores (untagged rows) exist only in SQLite; kept for the protocol.
        def tx(c: _Conn) -> None:
            for key in snapshot.keys:
                _update_key(c, key)
            for v in snapshot.versions:
                c.execute(
                    "UPDATE kms_key_versions SET wrapped = %s WHERE key_id = %s AND version = %s",
                    (v.wrapped, v.key_id, v.version),
                )
            for alias in snapshot.aliases:
                _put_alias(c, alias)
            c.execute(
                "INSERT INTO kms_meta VALUES ('master_check', %s) "
                "ON CONFLICT (name) DO UPDATE SET value = EXCLUDED.value",
                (master_check,),
            )
            c.execute("DELETE FROM kms_meta WHERE name = 'legacy_rows'")

        self._write("finish a migration", tx)

    def close(self) -> None:
        self._db.close()


def _one(c: _Conn, query: str) -> int:
    row = c.execute(query.encode()).fetchone()
    assert row is not None, query
    return int(row[0])


def _exec(c: _Conn, query: str, params: tuple[object, ...]) -> None:
    c.execute(query.encode(), params)


def _insert_version(c: _Conn, v: VersionRow) -> None:
    c.execute(
        "INSERT INTO kms_key_versions VALUES (%s, %s, %s, %s)",
        (v.key_id, v.version, v.wrapped, v.created),
    )


def _update_key(c: _Conn, key: KeyRow) -> None:
    c.execute(
        "UPDATE kms_keys SET meta = %s, policy = %s, mac = %s WHERE key_id = %s",
        (key.meta, key.policy, key.mac, key.key_id),
    )


def _put_alias(c: _Conn, alias: AliasRow) -> None:
    c.execute(
        "INSERT INTO kms_aliases VALUES (%s, %s, %s, %s, %s) ON CONFLICT (name) DO UPDATE SET "
        "key_id = EXCLUDED.key_id, created = EXCLUDED.created, updated = EXCLUDED.updated, "
        "mac = EXCLUDED.mac",
        (alias.name, alias.key_id, alias.created, alias.updated, alias.mac),
    )
