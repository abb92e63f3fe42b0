"""The daemon's application object: state set-up (master key, store, seed, roots, audit) and
one request from HTTP pieces to HTTP pieces, independent of the socket adapter
(:mod:`kms.daemon`), so it is testable without sockets.

Per request: SigV4 (:mod:`kms.sigv4`) → JSON validation (:mod:`kms.api`) → the operation
(:mod:`kms.service`) → JSON or AWS error body; then exactly one audit line and one log line
(``kms_request``) with the operation, principal, key, decision and - for denials - the reason,
which never reaches the reply.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import structlog

from transport.errors import ConfigurationError

from . import _wrap
from ._http import HttpReply
from .api import parse_request
from .audit import AuditLog, AuditSink, is_legacy_audit_log, verify_legacy_audit_log
from .coherence import ConnectionShare, SharedGeneration, StoreCoherence, WriteSection
from .config import MASTER_KEY_ENV, CredentialEntry, KmsConfig
from .errors import AuditChainError, KmsApiError
from .integrity import MasterKey
from .service import Caller, KmsService, Outcome, RecipientVerifier, SeedKey
from .sigv4 import SecretEntry, SigV4Failure, verify_request
from .statedir import StateLock, prepare_state_dir, tighten_files
from .storage import SqliteStorage, StoreUnavailable

__all__ = [
    "KmsApp",
    "HttpReply",
    "build_app",
    "build_worker_app",
    "log_audit_end",
    "prepare_state",
    "load_master_key",
    "read_master_key",
    "open_audit_log",
    "MASTER_KEY_FILE",
    "DB_FILE",
    "AUDIT_FILE",
]

log = structlog.get_logger()

MASTER_KEY_FILE = "master.key"
DB_FILE = "kms.sqlite3"
AUDIT_FILE = "audit.jsonl"
CONTENT_TYPE = "application/x-amz-json-1.1"


def load_master_key(state_dir: Path, env: Mapping[str, str]) -> bytes:
    """The master key: env ``ENCLAVE_KMS_MASTER_KEY`` (base64), else ``<state>/master.key``.

    The file is created on first start with mode 0600, atomically (written to a temporary file,
    fsynced, then hard-linked into place so a concurrent or crashed start can never leave a
    partial key); an existing file readable by others is refused.
    """
    if not env.get(MASTER_KEY_ENV) and not (state_dir / MASTER_KEY_FILE).exists():
        _create_master_key_file(state_dir)
    return read_master_key(state_dir, env)


def read_master_key(state_dir: Path, env: Mapping[str, str]) -> bytes:
    """The master key as :func:`load_master_key` finds it, never creating one (tools such as
    ``enclave kms audit verify``).

    Raises:
        ConfigurationError: none in the environment and no readable ``master.key``.
    """
    if env.get(MASTER_KEY_ENV):
        try:
            key = base64.b64decode(env[MASTER_KEY_ENV], validate=True)
        except (binascii.Error, ValueError):
            raise ConfigurationError(f"{MASTER_KEY_ENV} is not base64") from None
        if len(key) != _wrap.AES_KEY_BYTES:
            raise ConfigurationError(f"{MASTER_KEY_ENV} must decode to 32 bytes")
        return key
    path = state_dir / MASTER_KEY_FILE
    try:
        st = path.stat()
        data = path.read_bytes()
    except FileNotFoundError:
        raise ConfigurationError(
            f"no master key: {path} does not exist and {MASTER_KEY_ENV} is not set"
        ) from None
    except OSError as exc:
        raise ConfigurationError(f"cannot read the master key {path}: {exc.strerror}") from None
    if st.st_mode & 0o077:
        raise ConfigurationError(f"{path} must not be accessible to group/others (chmod 600)")
    try:
        key = base64.b64decode(data.strip(), validate=True)
    except (binascii.Error, ValueError):
        raise ConfigurationError(f"{path} is not a base64 master key") from None
    if len(key) != _wrap.AES_KEY_BYTES:
        raise ConfigurationError(f"{path} must hold 32 bytes")
    return key


def _create_master_key_file(state_dir: Path) -> None:
    path = state_dir / MASTER_KEY_FILE
    if not path.exists():
        tmp = state_dir / f".{MASTER_KEY_FILE}.{os.getpid()}.{uuid.uuid4().hex}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.write(fd, base64.b64encode(_wrap.random_bytes(_wrap.AES_KEY_BYTES)) + b"\n")
            os.fsync(fd)
        finally:
            os.close(fd)
        try:
            os.link(tmp, path)  # fails if another process created it first: use theirs
        except FileExistsError:
            pass
        finally:
            os.unlink(tmp)
        dfd = os.open(state_dir, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)


@dataclass
class KmsApp:
    """Everything one daemon serves with; build with :func:`build_app`."""

    config: KmsConfig
    service: KmsService
    audit: AuditSink
    secrets: dict[str, SecretEntry]
    clock: Callable[[], float] = time.time
    recipient_enabled: bool = False
    #: The state directory's lock, when this process owns it (a single-process daemon; not a
    #: worker, whose parent holds it).
    lock: StateLock | None = None
    #: Worker processes: the cross-process write section keeping the key set current.
    coherence: WriteSection | None = None
    shared: StoreCoherence | None = None
    #: Worker processes on PostgreSQL: the machine-local file the connection share uses
    #: (``shared`` is then the database's coherence).
    local: SharedGeneration | None = None
    #: Worker processes: spreads connections over the siblings (see kms.coherence).
    connection_share: ConnectionShare | None = None
    _closed: bool = field(default=False, repr=False)

    def lookup(self, access_key_id: str) -> SecretEntry | None:
        """SigV4 credential lookup."""
        return self.secrets.get(access_key_id)

    async def handle(
        self, method: str, target: str, headers: Sequence[tuple[str, str]], body: bytes
    ) -> HttpReply:
        """Serve one complete HTTP request; always returns a reply and writes one audit line."""
        start = time.perf_counter()
        request_id = str(uuid.uuid4())
        hdr = {k.lower(): v for k, v in headers}
        target_hdr = hdr.get("x-amz-target")
        operation = (target_hdr or "").removeprefix("TrentService.")[:64] or None
        outcome = Outcome(request_id=request_id)
        principal: str | None = None
        authenticated = False
        status = 200
        error: str | None = None
        try:
            if method != "POST":
                raise KmsApiError("UnknownOperationException", "", status=405)
            try:
                verified = verify_request(
                    method=method,
                    target=target,
                    headers=headers,
                    body=body,
                    lookup=self.lookup,
                    region=self.config.region,
                    now=datetime.fromtimestamp(self.clock(), tz=UTC),
                    max_skew_s=self.config.clock_skew_s,
                )
            except SigV4Failure as exc:
                outcome.decision, outcome.reason = "deny", f"sigv4: {exc.reason}"
                raise KmsApiError(exc.type_name, exc.message) from None
            principal = verified.principal_arn
            authenticated = True
            op, params = parse_request(target_hdr, body)
            if self.coherence is not None:
                await self.coherence.refresh()  # another worker changed the store
            answer = await self.service.handle(
                op, params, Caller(principal, verified.access_key_id), outcome
            )
            payload = json.dumps(answer, separators=(",", ":")).encode()
        except KmsApiError as exc:
            status, error = exc.status, exc.type_name
            payload = json.dumps({"__type": exc.type_name, "message": exc.message}).encode()
        except StoreUnavailable as exc:
            # The database is gone or slow: a retryable AWS error; the detail stays in our log.
            log.warning("kms_store_unavailable", request_id=request_id, reason=str(exc))
            status, error = 500, exc.aws_type
            outcome.decision = "error"
            payload = _store_unavailable_body(exc)
        except Exception:
            log.exception("kms_internal_error", request_id=request_id, operation=operation)
            status, error = 500, "KMSInternalException"
            outcome.decision = "error"
            payload = json.dumps(
                {"__type": "KMSInternalException", "message": "An internal error occurred."}
            ).encode()
        record: dict[str, Any] = {
            "time": datetime.fromtimestamp(self.clock(), tz=UTC).isoformat(),
            "request_id": request_id,
            "principal": principal,
            "access_key_id": _access_key_of(hdr.get("authorization")),
            "operation": operation,
            "key_id": outcome.key_arn,
            "decision": outcome.decision,
            "reason": outcome.reason,
            "status": status,
            "error": error,
        }
        if outcome.recipient is not None:
            record["recipient"] = outcome.recipient
        try:
            await self.audit.commit(record)
        except StoreUnavailable as exc:
            # No audit line, no acknowledgement: the client sees a retryable error instead of
            # the answer (what the operation changed stays; AWS clients retry).
            log.error("kms_audit_not_committed", request_id=request_id, reason=str(exc))
            record["status"], record["error"] = 500, exc.aws_type
            status, payload = 500, _store_unavailable_body(exc)
        log_fields = {k: v for k, v in record.items() if k not in ("time",)}
        log_fields["duration_ms"] = round((time.perf_counter() - start) * 1000, 3)
        if outcome.decision == "deny":
            log.warning("kms_request_denied", **log_fields)
        else:
            log.info("kms_request", **log_fields)
        return HttpReply(
            status,
            [
                ("Content-Type", CONTENT_TYPE),
                ("x-amzn-RequestId", request_id),
            ],
            payload,
            authenticated,
        )

    def close(self) -> None:
        """Close the audit log (logging its final MAC when this process owns the state
        directory) and the store; release the state lock."""
        if not self._closed:
            self._closed = True
            if self.lock is not None:
                log.info(
                    "kms_audit_closed", last_hash=self.audit.last_hash, lines=self.audit.lines
                )
            self.audit.close()
            self.service.close()
            if self.shared is not None:
                self.shared.close()
            if self.local is not None:
                self.local.close()
            if self.lock is not None:
                self.lock.release()


def _store_unavailable_body(exc: StoreUnavailable) -> bytes:
    message = (
        "The key store did not answer in time; retry."
        if exc.timeout
        else "The key store is unavailable; retry."
    )
    return json.dumps({"__type": exc.aws_type, "message": message}).encode()


def _access_key_of(authorization: str | None) -> str | None:
    if not authorization:
        return None
    _, _, rest = authorization.partition("Credential=")
    key_id = rest.split("/", 1)[0]
    return key_id[:128] or None


def build_app(
    config: KmsConfig,
    *,
    env: Mapping[str, str] | None = None,
    clock: Callable[[], float] = time.time,
    recipient_verifier: RecipientVerifier | None = None,
    seed: tuple[SeedKey, ...] | None = None,
) -> KmsApp:
    """Set up state (blocking: run it in a thread from async code).

    Raises:
        ConfigurationError: no credentials, bad master key, unreadable roots or seed.
    """
    env = os.environ if env is None else env
    creds = config.resolve_credentials(env)
    state_dir = prepare_state_dir(config.resolved_state_dir)
    lock = StateLock.acquire(state_dir)  # before anything in the directory is read or written
    try:
        tighten_files(state_dir, (DB_FILE, f"{DB_FILE}-wal", f"{DB_FILE}-shm", AUDIT_FILE))
        master = MasterKey(load_master_key(state_dir, env))
        if recipient_verifier is None:
            recipient_verifier = _recipient_verifier(config)
        if seed is None:
            from .seed import load_seed

            seed = load_seed(config.seed_file) if config.seed_file is not None else ()
        if config.postgres_url is not None:
            from .pg.wiring import open_pg_state

            pg = open_pg_state(
                config,
                master,
                recipient_verifier=recipient_verifier,
                clock=clock,
                seed=seed,
                despite_broken_chain=config.start_despite_broken_audit_chain,
            )
            return KmsApp(
                config=config,
                service=pg.service,
                audit=pg.audit,
                secrets=_secrets(creds),
                clock=clock,
                recipient_enabled=recipient_verifier is not None,
                lock=lock,
                coherence=pg.section,
                shared=pg.coherence,
            )
        storage = SqliteStorage(state_dir / DB_FILE)
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
            audit = open_audit_log(
                state_dir / AUDIT_FILE,
                master,
                fsync=config.audit_fsync,
                despite_broken_chain=config.start_despite_broken_audit_chain,
                clock=clock,
                accept_legacy=service.migrated,
            )
        except BaseException:
            storage.close()
            raise
    except BaseException:
        lock.release()
        raise
    return KmsApp(
        config=config,
        service=service,
        audit=audit,
        secrets=_secrets(creds),
        clock=clock,
        recipient_enabled=recipient_verifier is not None,
        lock=lock,
    )


def prepare_state(
    config: KmsConfig,
    *,
    env: Mapping[str, str] | None = None,
    clock: Callable[[], float] = time.time,
) -> StateLock:
    """Everything a daemon with worker processes does once, in the parent, before the workers
    start: take the state directory's lock, create or check the master key, open (migrate,
    seed) the store, check the audit chain's tail (or move a broken one aside when told), load
    the trust roots, create the workers' shared file (:mod:`kms.coherence`). Returns the lock,
    which the parent holds for the daemon's life.

    Raises:
        ConfigurationError: as :func:`build_app`.
    """
    app = build_app(config, env=env, clock=clock)
    lock, app.lock = app.lock, None
    app.close()
    assert lock is not None
    try:
        SharedGeneration(config.resolved_state_dir).close()  # the workers' file opens
    except BaseException:
        lock.release()
        raise
    return lock


def log_audit_end(config: KmsConfig, env: Mapping[str, str] | None = None) -> None:
    """Log the audit chain's last MAC and line count (``kms_audit_closed``): what a daemon
    with worker processes records when its last worker has stopped. Never raises: the daemon
    is stopping, and a chain that no longer verifies is logged as such."""
    env = os.environ if env is None else env
    state_dir = config.resolved_state_dir
    if config.postgres_url is not None:
        from .pg.wiring import log_pg_audit_end

        log_pg_audit_end(config.postgres_url)
        return
    try:
        audit = AuditLog(state_dir / AUDIT_FILE, MasterKey(read_master_key(state_dir, env)))
    except (ConfigurationError, AuditChainError, OSError) as exc:
        log.error("kms_audit_end_unreadable", reason=str(exc))
        return
    log.info("kms_audit_closed", last_hash=audit.last_hash, lines=audit.lines)
    audit.close()


def build_worker_app(
    config: KmsConfig,
    *,
    env: Mapping[str, str] | None = None,
    clock: Callable[[], float] = time.time,
    index: int = 0,
    workers: int = 1,
) -> KmsApp:
    """The app of one worker process (its parent ran :func:`prepare_state` and holds the
    lock). The worker shares the store and the audit chain with its siblings: the key set is
    loaded under the cross-process writer lock and kept current by a
    :class:`~kms.coherence.WriteSection`; audit lines go through the shared append; worker
    ``index`` of ``workers`` takes its share of the connections
    (:class:`~kms.coherence.ConnectionShare`).

    Raises:
        ConfigurationError: the master key or the roots are unreadable, the store does not
            open (the parent checked them: only a change behind its back gets here).
    """
    env = os.environ if env is None else env
    creds = config.resolve_credentials(env)
    state_dir = config.resolved_state_dir
    master = MasterKey(read_master_key(state_dir, env))
    recipient_verifier = _recipient_verifier(config)
    if config.postgres_url is not None:
        return _build_pg_worker_app(
            config, creds, master, recipient_verifier, clock, index, workers
        )
    shared = SharedGeneration(state_dir)
    try:
        storage = SqliteStorage(state_dir / DB_FILE)
        try:
            with shared.locked():  # a consistent snapshot while siblings may be writing
                seen = shared.generation()
                service = KmsService.open(
                    storage,
                    master,
                    region=config.region,
                    account_id=config.account_id,
                    recipient_verifier=recipient_verifier,
                    clock=clock,
                )
            if service.migrated:  # the parent migrates before any worker starts
                raise ConfigurationError("the key store needed a migration in a worker")
            audit = AuditLog(state_dir / AUDIT_FILE, master, fsync=config.audit_fsync)
        except BaseException:
            storage.close()
            raise
    except BaseException:
        shared.close()
        raise
    section = WriteSection(service, shared, seen)
    service.write_lock = section
    return KmsApp(
        config=config,
        service=service,
        audit=audit,
        secrets=_secrets(creds),
        clock=clock,
        recipient_enabled=recipient_verifier is not None,
        coherence=section,
        shared=shared,
        connection_share=ConnectionShare(shared, index, workers) if workers > 1 else None,
    )


def _build_pg_worker_app(
    config: KmsConfig,
    creds: Sequence[CredentialEntry],
    master: MasterKey,
    recipient_verifier: RecipientVerifier | None,
    clock: Callable[[], float],
    index: int,
    workers: int,
) -> KmsApp:
    """A worker on PostgreSQL: the database keeps its key set current and orders its writes,
    as for any other daemon on it; the machine-local file only spreads connections."""
    from .pg.wiring import open_pg_state

    pg = open_pg_state(
        config,
        master,
        recipient_verifier=recipient_verifier,
        clock=clock,
        seed=(),  # the parent applied it
        despite_broken_chain=False,  # the parent checked (or restarted) the chain
    )
    local = SharedGeneration(config.resolved_state_dir) if workers > 1 else None
    return KmsApp(
        config=config,
        service=pg.service,
        audit=pg.audit,
        secrets=_secrets(creds),
        clock=clock,
        recipient_enabled=recipient_verifier is not None,
        coherence=pg.section,
        shared=pg.coherence,
        local=local,
        connection_share=ConnectionShare(local, index, workers) if local is not None else None,
    )


def _recipient_verifier(config: KmsConfig) -> RecipientVerifier | None:
    if not config.trust_roots:
        return None
    from attest.roots import load_roots

    from .recipient import AttestRecipientVerifier

    roots = load_roots(list(config.trust_roots), state_dir=None)
    return AttestRecipientVerifier(roots, max_document_age_s=config.max_document_age_s)


def _secrets(creds: Sequence[CredentialEntry]) -> dict[str, SecretEntry]:
    return {
        c.access_key_id: SecretEntry(c.secret_access_key, c.principal_arn, c.session_token)
        for c in creds
    }


def _aside(path: Path, tag: str, clock: Callable[[], float]) -> Path:
    stamp = datetime.fromtimestamp(clock(), tz=UTC).strftime("%Y%m%dT%H%M%SZ")
    target = path.with_name(f"{path.stem}.{tag}-{stamp}{path.suffix}")
    os.rename(path, target)
    return target


def open_audit_log(
    path: Path,
    master: MasterKey,
    *,
    fsync: bool,
    despite_broken_chain: bool = False,
    clock: Callable[[], float] = time.time,
    accept_legacy: bool = True,
) -> AuditLog:
    """Open the audit log for appending, after checking the end of its chain.

    * A schema-1 log (unkeyed hashes) is verified whole, moved aside as
      ``audit.v1-<time>.jsonl`` and a keyed chain starts, its first line naming the old file.
      Only when ``accept_legacy`` (the key store was migrated by this same start): beside a
      schema-2 store an unkeyed log is a replaced file, and treated as a broken chain.
    * A chain whose tail does not verify (an edit, a second writer) is refused, unless
      ``despite_broken_chain``: then the broken file is moved aside as
      ``audit.broken-<time>.jsonl``, untouched, and a new chain starts whose first line names it
      and the break. Nothing is appended to a broken chain, ever.

    Raises:
        ConfigurationError: the chain is broken and ``despite_broken_chain`` is not set.
    """
    start: dict[str, Any] | None = None
    if is_legacy_audit_log(path) and not accept_legacy:
        # Anyone can write a valid unkeyed chain: never let one replace a keyed log.
        exc = AuditChainError(1, "an unkeyed (schema 1) log beside a schema-2 key store")
        if not despite_broken_chain:
            raise _broken(path, exc)
    elif is_legacy_audit_log(path):
        try:
            lines, last = verify_legacy_audit_log(path)
        except AuditChainError as exc:
            if not despite_broken_chain:
                raise _broken(path, exc) from None
            lines, last = exc.line - 1, None
        aside = _aside(path, "v1", clock)
        start = {
            "operation": "AuditChainStart",
            "reason": "schema 1 log (unkeyed SHA-256 chain) moved aside; this chain is keyed",
            "previous_file": aside.name,
            "previous_lines": lines,
            "previous_last_hash": last,
        }
        log.warning("kms_audit_migrated", previous_file=str(aside), previous_lines=lines)
    try:
        audit = AuditLog(path, master, fsync=fsync)
    except AuditChainError as exc:
        if not despite_broken_chain:
            raise _broken(path, exc) from None
        aside = _aside(path, "broken", clock)
        log.error(
            "kms_audit_chain_broken_started_anyway",
            broken_file=str(aside),
            line=exc.line,
            reason=exc.reason,
            meaning="the broken log was moved aside untouched and a new chain starts; "
            "investigate it: it was edited, or written by two daemons",
        )
        start = {
            "operation": "AuditChainRestart",
            "reason": f"previous chain broken at line {exc.line}: {exc.reason}",
            "previous_file": aside.name,
        }
        audit = AuditLog(path, master, fsync=fsync)
    if start is not None:
        start["time"] = datetime.fromtimestamp(clock(), tz=UTC).isoformat()
        start["decision"] = "allow"
        audit.append(start)
    return audit


def _broken(path: Path, exc: AuditChainError) -> ConfigurationError:
    return ConfigurationError(
        f"the audit log {path} is broken at line {exc.line}: {exc.reason}. The daemon does not "
        "extend a broken chain: check it with `enclave kms audit verify`, find out who wrote "
        "it, then either restore it or start with --start-despite-broken-audit-chain (the "
        "broken file is kept aside and a new chain starts that records the break)"
    )
