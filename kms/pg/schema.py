"""The key store's PostgreSQL schema and its migrations (forward only).

``kms_schema`` holds one row: the schema version. :func:`migrate` brings a database to
:data:`SCHEMA_VERSION` in ONE transaction (PostgreSQL's DDL is transactional: a failed
migration leaves the database as it was), under an advisory lock so that daemons starting
together against a new database migrate it once. A database whose version is newer than this
code's is refused: an older daemon must not write rows a newer one tagged or shaped differently.

Versions:

1. the key store: store-wide values (``kms_meta``: the master-key check), keys (metadata JSON
   text, policy text, tag), material versions (wrapped), aliases and grants (tagged), and
   ``kms_generation``, the change counter every write bumps (:mod:`kms.pg.coherence`).
2. the audit chain: ``kms_audit_log`` (one row per chain line, the line's canonical JSON as the
   file backend writes it) and ``kms_audit_head`` (the chain's current sequence number and MAC,
   the row appenders lock or compare-and-set; ``chain`` numbers a new chain started past a
   broken one).
3. custom key stores: ``kms_custom_key_stores`` (external key stores: a tagged JSON record and
   the proxy credential's secret, wrapped like key material), as SQLite's schema 4 holds them.

Rows hold text and bytes exactly as :mod:`kms.storage` defines them: tags and line MACs are
computed over those exact texts, so nothing is stored as ``jsonb`` (which would reorder keys).
"""

from __future__ import annotations

import psycopg
from psycopg.rows import TupleRow

from transport.errors import ConfigurationError

__all__ = ["SCHEMA_VERSION", "MIGRATIONS", "migrate", "schema_version"]

#: Advisory lock key (any 64-bit number unique to this purpose): held while migrating.
MIGRATION_LOCK = 0x6B6D735F6D696772  # "kms_migr"

_V1 = """
CREATE TABLE kms_schema (
    one boolean PRIMARY KEY DEFAULT true CHECK (one),
    version integer NOT NULL
);
CREATE TABLE kms_meta (name text PRIMARY KEY, value bytea NOT NULL);
CREATE TABLE kms_keys (
    key_id text PRIMARY KEY,
    meta text NOT NULL,
    policy text NOT NULL,
    mac bytea NOT NULL
);
CREATE TABLE kms_key_versions (
    key_id text NOT NULL REFERENCES kms_keys(key_id) ON DELETE CASCADE,
    version integer NOT NULL,
    wrapped bytea NOT NULL,
    created double precision NOT NULL,
    PRIMARY KEY (key_id, version)
);
CREATE TABLE kms_aliases (
    name text PRIMARY KEY,
    key_id text NOT NULL REFERENCES kms_keys(key_id) ON DELETE CASCADE,
    created double precision NOT NULL,
    updated double precision NOT NULL,
    mac bytea NOT NULL
);
CREATE INDEX kms_aliases_key ON kms_aliases (key_id);
CREATE TABLE kms_grants (
    grant_id text PRIMARY KEY,
    key_id text NOT NULL REFERENCES kms_keys(key_id) ON DELETE CASCADE,
    record text NOT NULL,
    mac bytea NOT NULL
);
CREATE INDEX kms_grants_key ON kms_grants (key_id);
CREATE TABLE kms_generation (
    one boolean PRIMARY KEY DEFAULT true CHECK (one),
    gen bigint NOT NULL
);
INSERT INTO kms_generation (gen) VALUES (0);
INSERT INTO kms_schema (version) VALUES (0);
"""

_V2 = """
CREATE TABLE kms_audit_head (
    one boolean PRIMARY KEY DEFAULT true CHECK (one),
    chain integer NOT NULL,
    seq bigint NOT NULL,
    mac text NOT NULL
);
CREATE TABLE kms_audit_log (
    chain integer NOT NULL,
    seq bigint NOT NULL,
    line text NOT NULL,
    PRIMARY KEY (chain, seq)
);
INSERT INTO kms_audit_head (chain, seq, mac) VALUES (1, 0, repeat('0', 64));
"""

_V3 = """
CREATE TABLE kms_custom_key_stores (
    store_id text PRIMARY KEY,
    record text NOT NULL,
    secret bytea NOT NULL,
    mac bytea NOT NULL
);
"""

#: (version reached, what it adds, SQL). Append only: never edit a released migration.
MIGRATIONS: tuple[tuple[int, str, str], ...] = (
    (1, "key store tables and the change counter", _V1),
    (2, "the audit chain in the database", _V2),
    (3, "custom key stores", _V3),
)
#: The version this code reads and writes.
SCHEMA_VERSION = MIGRATIONS[-1][0]


def schema_version(conn: psycopg.Connection[TupleRow]) -> int:
    """The database's schema version (0: no key store yet)."""
    row = conn.execute("SELECT to_regclass('kms_schema') IS NOT NULL").fetchone()
    if not row or not row[0]:
        return 0
    row = conn.execute("SELECT version FROM kms_schema").fetchone()
    return int(row[0]) if row else 0


def migrate(
    conn: psycopg.Connection[TupleRow], *, target: int = SCHEMA_VERSION, shown: str = ""
) -> tuple[int, int]:
    """Bring the database to ``target`` (default: this code's version), in one transaction.

    Returns:
        (version found, version now).

    Raises:
        ConfigurationError: the database's schema is newer than ``target`` (refused: migrations
            only go forward).
    """
    with conn.transaction():
        # READ COMMITTED whatever the session's default: each statement then reads what was
        # committed when it started, so the version is read AFTER the lock is granted. (Under
        # SERIALIZABLE the snapshot would be taken by the lock statement itself, before a
        # concurrent migration committed, and this one would migrate again.)
        conn.execute("SET TRANSACTION ISOLATION LEVEL READ COMMITTED")
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATION_LOCK,))
        found = schema_version(conn)
        if found > SCHEMA_VERSION or found > target:
            raise ConfigurationError(
                f"the key store {shown or 'database'} has schema {found}, newer than this "
                f"daemon's {SCHEMA_VERSION}: run the newer daemon (migrations only go forward)"
            )
        for version, _what, script in MIGRATIONS:
            if found < version <= target:
                conn.execute(script.encode())  # no parameters: the script's several statements
                conn.execute("UPDATE kms_schema SET version = %s", (version,))
        return found, max(found, target)
