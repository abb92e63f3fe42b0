"""A daemon process's state on PostgreSQL: the store, the coherence, the write section and the
audit chain, opened in the order that keeps them consistent (used by :mod:`kms.app`).

The key set is loaded (and a seed applied) under the database's write-section lock, so a
daemon starting beside running ones reads a snapshot no write is half-way through and records
the change counter it was loaded at; from then on :class:`kms.coherence.WriteSection` keeps it
current before each request.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import structlog

from transport.errors import ConfigurationError

from ..coherence import WriteSection
from ..config import KmsConfig, redact_url
from ..errors import AuditChainError
from ..integrity import MasterKey
from ..service import KmsService, RecipientVerifier, SeedKey
from ..storage import StoreUnavailable
from ._connect import PgConnection, check_url
from .audit import PgAuditLog, read_head
from .coherence import PgCoherence
from .storage import PgStorage

__all__ = ["PgState", "open_pg_state", "open_pg_audit", "log_pg_audit_end"]

log = structlog.get_logger()


@dataclass
class PgState:
    """What :func:`open_pg_state` opened (the caller owns and closes it through the app)."""

    service: KmsService
    audit: PgAuditLog
    coherence: PgCoherence
    section: WriteSection


def open_pg_state(
    config: KmsConfig,
    master: MasterKey,
    *,
    recipient_verifier: RecipientVerifier | None,
    clock: Callable[[], float],
    seed: tuple[SeedKey, ...],
    despite_broken_chain: bool,
) -> PgState:
    """Open this process's view of the database (blocking; start-up).

    Raises:
        ConfigurationError: bad URL, the database unreachable or refusing us (wrong password,
            no such database), a schema newer than this code, a master key that does not
            match, or a broken audit chain (unless ``despite_broken_chain``).
    """
    url = config.postgres_url
    assert url is not None
    check_url(url)
    try:
        storage = PgStorage(url)
        try:
            coherence = PgCoherence(storage, url)
            try:
                coherence.acquire_blocking()
                try:
                    service = KmsService.open(
                        storage,
                        master,
                        region=config.region,
                        account_id=config.account_id,
                        recipient_verifier=recipient_verifier,
                        clock=clock,
                        seed=seed,
                    )
                    seen = coherence.generation()
                finally:
                    coherence.release_blocking()
                audit = open_pg_audit(
                    url,
                    master,
                    fsync=config.audit_fsync,
                    despite_broken_chain=despite_broken_chain,
                    clock=clock,
                )
            except BaseException:
                coherence.close()
                raise
        except BaseException:
            storage.close()
            raise
    except StoreUnavailable as exc:  # the database went away during start-up
        raise ConfigurationError(str(exc)) from None
    if storage.migrated_from is not None:
        log.warning(
            "kms_store_schema_migrated", store=storage.shown, previous=storage.migrated_from
        )
    section = WriteSection(service, coherence, seen)
    service.write_lock = section
    return PgState(service, audit, coherence, section)


def open_pg_audit(
    url: str,
    master: MasterKey,
    *,
    fsync: bool,
    despite_broken_chain: bool = False,
    clock: Callable[[], float],
) -> PgAuditLog:
    """The database's audit chain, its tail checked; a broken one is refused, or (when told)
    left as it is while a new chain, numbered one higher, starts with a line naming the break.

    Raises:
        ConfigurationError: the chain is broken and ``despite_broken_chain`` is not set.
    """
    try:
        return PgAuditLog(url, master, fsync=fsync)
    except AuditChainError as exc:
        if not despite_broken_chain:
            raise ConfigurationError(
                f"the audit chain in {redact_url(url)} is broken at line "
                f"{exc.line}: {exc.reason}. The daemon does not extend a broken chain: check "
                "it with `enclave kms audit verify --storage URL`, find out who wrote it, then "
                "either restore the rows or start with --start-despite-broken-audit-chain (the "
                "broken rows stay and a new chain starts that records the break)"
            ) from None
        broken = exc
    audit = PgAuditLog(url, master, fsync=fsync, check_tail=False)
    log.error(
        "kms_audit_chain_broken_started_anyway",
        chain=audit.chain,
        line=broken.line,
        reason=broken.reason,
        meaning="the broken chain's rows stay untouched and a new chain starts; investigate it",
    )
    start: Mapping[str, Any] = {
        "operation": "AuditChainRestart",
        "reason": f"previous chain broken at line {broken.line}: {broken.reason}",
        "time": datetime.fromtimestamp(clock(), tz=UTC).isoformat(),
        "decision": "allow",
    }
    audit.restart_chain(start)
    return audit


def log_pg_audit_end(url: str) -> None:
    """Log where the database's audit chain ends (``kms_audit_closed``); never raises."""
    db = PgConnection(url, "audit-end")
    try:
        head = db.run(read_head)
    except (StoreUnavailable, AuditChainError, ConfigurationError) as exc:
        log.error("kms_audit_end_unreadable", reason=str(exc))
        return
    finally:
        db.close()
    log.info("kms_audit_closed", chain=head.chain, last_hash=head.mac, lines=head.seq)
