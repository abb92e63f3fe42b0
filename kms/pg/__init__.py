"""The key store on PostgreSQL: several daemons, one database (``--storage postgresql://...``).

* :mod:`kms.pg.storage`: :class:`~kms.storage.Storage` on PostgreSQL (serializable
  transactions retried on conflicts, a change counter bumped by every write);
* :mod:`kms.pg.coherence`: the write section and the per-request freshness check that keep
  every daemon's in-memory key set current;
* :mod:`kms.pg.audit`: the keyed audit chain in the database, one chain for every daemon;
* :mod:`kms.pg.schema`: the schema version and its forward-only migrations;
* :mod:`kms.pg._connect`: connections, bounded waits, error mapping, retries.

Importing this package needs psycopg (3); the SQLite default does not.
"""
