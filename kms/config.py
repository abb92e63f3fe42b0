"""Daemon configuration: one frozen :class:`KmsConfig`, loaded from TOML or a mapping.

Unknown keys are an error (STYLE B9). Durations are seconds (``_s``), sizes bytes. Example::

    listen = "127.0.0.1:4599"
    state_dir = "/var/lib/enclave/kms"
    region = "us-east-1"
    account_id = "111122223333"
    trust_roots = ["local"]              # "aws", "local" (the state dir's attest CA) or PEM paths
    max_document_age_s = 300.0
    seed_file = "seed.json"
    storage = "postgresql://kms@db.internal/kms"   # default: SQLite in state_dir

    [[credentials]]
    access_key_id = "AKIAEXAMPLE"
    secret_access_key = "..."
    principal_arn = "arn:aws:iam::111122223333:user/model-owner"

With no ``[[credentials]]``, the pair in ``ENCLAVE_KMS_ACCESS_KEY_ID`` /
``ENCLAVE_KMS_SECRET_ACCESS_KEY`` is used (principal ``arn:aws:iam::<account>:user/local``); with
neither, :meth:`KmsConfig.resolve_credentials` refuses (fail closed).
"""

from __future__ import annotations

import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, TypedDict, Unpack
from urllib.parse import urlsplit, urlunsplit

from transport.errors import ConfigurationError
from transport.hostport import parse_host_port
from transport.paths import default_state_dir

__all__ = [
    "DEFAULT_HOST",
    "DEFAULT_PORT",
    "DEFAULT_REGION",
    "DEFAULT_ACCOUNT_ID",
    "ACCESS_KEY_ENV",
    "SECRET_KEY_ENV",
    "MASTER_KEY_ENV",
    "MAX_WORKERS",
    "CredentialEntry",
    "KmsConfig",
    "KmsConfigChanges",
    "POSTGRES_SCHEMES",
    "redact_url",
]

DEFAULT_HOST = "127.0.0.1"
#: Near LocalStack's 4566 (the port KMS emulators are usually found on) but distinct, so both
#: can run side by side.
DEFAULT_PORT = 4599
DEFAULT_REGION = "us-east-1"
#: The documentation account id AWS uses in examples (local-kms uses it too).
DEFAULT_ACCOUNT_ID = "111122223333"
ACCESS_KEY_ENV = "ENCLAVE_KMS_ACCESS_KEY_ID"
SECRET_KEY_ENV = "ENCLAVE_KMS_SECRET_ACCESS_KEY"
#: Base64 of the 32-byte master key; overrides the state directory's ``master.key`` file.
MASTER_KEY_ENV = "ENCLAVE_KMS_MASTER_KEY"

#: Largest legal KMS request: a 256 KiB attestation document is 341.4 KiB in base64, plus a
#: 6 KiB ciphertext and small fields. 512 KiB leaves room and still bounds memory per request.
DEFAULT_MAX_BODY_BYTES = 512 * 1024
#: Attestation documents older than this are refused (AWS publishes no window; nitro.md §6.1).
DEFAULT_MAX_DOCUMENT_AGE_S = 300.0
#: In-flight requests get this long after SIGTERM (hypercorn's graceful_timeout).
DEFAULT_GRACEFUL_TIMEOUT_S = 10.0
#: Idle keep-alive connections are closed after this (AWS's front ends use ~60 s too).
DEFAULT_KEEP_ALIVE_TIMEOUT_S = 60.0
#: A request (head and body) must arrive within this of its first byte, and a fresh connection
#: must deliver its first request within it. A 512 KiB body needs 10 s only below ~50 KiB/s.
DEFAULT_REQUEST_TIMEOUT_S = 10.0
#: Connections one peer address may hold. A slot held by an unproven connection is given to a
#: newcomer when the cap is reached, so the cap bounds a flood without locking callers out.
DEFAULT_MAX_CONNECTIONS_PER_SOURCE = 128
#: Worker processes at most. Each holds a copy of the key set and a store connection, and the
#: work per request is CPU-bound: more processes than cores only adds switching.
MAX_WORKERS = 64

#: URL schemes naming a PostgreSQL store (libpq accepts both).
POSTGRES_SCHEMES = ("postgresql://", "postgres://")

_ACCOUNT_RE = re.compile(r"^\d{12}$")
_REGION_RE = re.compile(r"^[a-z]{2}(-[a-z]+)+-\d$")
_PRINCIPAL_RE = re.compile(r"^arn:aws:(iam|sts)::\d{12}:[\w+=,.@/-]+$")


def redact_url(url: str) -> str:
    """``url`` without its password (in the authority or as a ``password=`` parameter): what
    may be shown and logged."""
    try:
        parts = urlsplit(url)
        netloc = parts.netloc
        if "@" in netloc:
            user, _, host = netloc.rpartition("@")
            netloc = f"{user.split(':', 1)[0]}@{host}"
        query = "&".join(
            p for p in parts.query.split("&") if p and not p.lower().startswith("password=")
        )
        return urlunsplit((parts.scheme, netloc, parts.path, query, ""))
    except ValueError:
        return "(unparseable URL)"


@dataclass(frozen=True, slots=True)
class CredentialEntry:
    """One access key the daemon accepts, and the principal it authenticates as."""

    access_key_id: str
    secret_access_key: str = field(repr=False)
    principal_arn: str
    session_token: str | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if not self.access_key_id or not self.secret_access_key:
            raise ConfigurationError("credentials need access_key_id and secret_access_key")
        if not _PRINCIPAL_RE.match(self.principal_arn):
            raise ConfigurationError(f"principal_arn {self.principal_arn!r} is not an IAM ARN")


class KmsConfigChanges(TypedDict, total=False):
    """The fields of :class:`KmsConfig` that :meth:`KmsConfig.with_overrides` replaces (any
    subset; each with its field's type)."""

    host: str
    port: int
    state_dir: Path | None
    credentials: tuple[CredentialEntry, ...]
    trust_roots: tuple[str, ...]
    max_document_age_s: float
    seed_file: Path | None
    region: str
    account_id: str
    max_body_bytes: int
    graceful_timeout_s: float
    keep_alive_timeout_s: float
    request_timeout_s: float
    max_connections_per_source: int
    audit_fsync: bool
    clock_skew_s: float
    start_despite_broken_audit_chain: bool
    workers: int | None
    storage: str | None


@dataclass(frozen=True, slots=True)
class KmsConfig:
    """Configuration of one KMS daemon process.

    Attributes:
        host, port: where to listen (``port=0``: ephemeral; the actual one is reported).
        state_dir: database, master key and audit log; None = ``default_state_dir()/"kms"``.
        credentials: accepted access keys; empty = take them from the environment.
        trust_roots: attestation roots: ``"aws"``, ``"local"``, or PEM file paths. Empty: Recipient
            requests are refused (fail closed), everything else works.
        max_document_age_s: freshness window of Recipient attestation documents.
        seed_file: JSON/YAML seed (keys with fixed ids and material, aliases, policies).
        region, account_id: the ARNs this endpoint mints and the SigV4 scope it accepts.
        max_body_bytes: request bodies above this are refused with 413.
        graceful_timeout_s: SIGTERM grace for in-flight requests.
        keep_alive_timeout_s: idle timeout of connections that have authenticated.
        request_timeout_s: time for a whole request from its first byte (and for a fresh
            connection's first request from accept), and for the client to take a reply (an
            answer left unread that long closes the connection).
        max_connections_per_source: connections one peer address may hold at once.
        audit_fsync: an audit line is on disk (``fdatasync``) before the request's reply is
            sent; concurrent requests share syncs (group commit). False: written to the OS only,
            which survives a crash of the process but not of the machine.
        workers: worker processes sharing the listening socket and the store; None = one per
            CPU. 1 serves in the daemon's own process.
        clock_skew_s: accepted X-Amz-Date skew (AWS: 5 minutes).
        start_despite_broken_audit_chain: start even if the audit chain's tail does not verify
            (the broken log is moved aside untouched, a new chain records the break). A
            command-line decision for one start only: not accepted in a config file.
        storage: where keys, aliases, grants and the audit chain live: None (or ``"sqlite"``)
            = SQLite and a log file in ``state_dir``; a ``postgresql://`` URL = that database,
            shared by every daemon given it (:mod:`kms.pg`). Never shown with its password
            (:attr:`storage_shown`); libpq's ``PGPASSFILE``/``PGPASSWORD`` keep it out of the
            URL altogether. The master key stays in ``state_dir`` or the environment.
    """

    host: str = DEFAULT_HOST
    port: int = DEFAULT_PORT
    state_dir: Path | None = None
    credentials: tuple[CredentialEntry, ...] = ()
    trust_roots: tuple[str, ...] = ()
    max_document_age_s: float = DEFAULT_MAX_DOCUMENT_AGE_S
    seed_file: Path | None = None
    region: str = DEFAULT_REGION
    account_id: str = DEFAULT_ACCOUNT_ID
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    graceful_timeout_s: float = DEFAULT_GRACEFUL_TIMEOUT_S
    keep_alive_timeout_s: float = DEFAULT_KEEP_ALIVE_TIMEOUT_S
    request_timeout_s: float = DEFAULT_REQUEST_TIMEOUT_S
    max_connections_per_source: int = DEFAULT_MAX_CONNECTIONS_PER_SOURCE
    audit_fsync: bool = True
    clock_skew_s: float = 300.0
    start_despite_broken_audit_chain: bool = False
    workers: int | None = None
    storage: str | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.storage not in (None, "sqlite") and not str(self.storage).startswith(
            POSTGRES_SCHEMES
        ):
            raise ConfigurationError(
                'storage (--storage) must be "sqlite" or a postgresql:// URL, got '
                f"{redact_url(str(self.storage))!r}"
            )
        if not _ACCOUNT_RE.match(self.account_id):
            raise ConfigurationError(f"account_id must be 12 digits, got {self.account_id!r}")
        if not _REGION_RE.match(self.region):
            raise ConfigurationError(f"region {self.region!r} is not an AWS region name")
        if not 0 <= self.port <= 65535:
            raise ConfigurationError(f"port out of range: {self.port}")
        for name in (
            "max_document_age_s",
            "graceful_timeout_s",
            "keep_alive_timeout_s",
            "request_timeout_s",
            "clock_skew_s",
        ):
            if not getattr(self, name) > 0:
                raise ConfigurationError(f"{name} must be > 0")
        if not 1 <= self.max_connections_per_source <= 65536:
            raise ConfigurationError("max_connections_per_source must be within 1..65536")
        if not 4096 <= self.max_body_bytes <= 16 * 1024 * 1024:
            raise ConfigurationError("max_body_bytes must be within 4 KiB..16 MiB")
        if self.workers is not None and not 1 <= self.workers <= MAX_WORKERS:
            raise ConfigurationError(f"workers must be within 1..{MAX_WORKERS}, got {self.workers}")
        seen: set[str] = set()
        for c in self.credentials:
            if c.access_key_id in seen:
                raise ConfigurationError(f"duplicate access_key_id {c.access_key_id!r}")
            seen.add(c.access_key_id)

    @property
    def postgres_url(self) -> str | None:
        """The PostgreSQL URL when the store is PostgreSQL, else None (SQLite)."""
        if self.storage is None or self.storage == "sqlite":
            return None
        return self.storage

    @property
    def storage_shown(self) -> str:
        """The store as it may be shown and logged (no password)."""
        url = self.postgres_url
        return f"sqlite:{self.resolved_state_dir}" if url is None else redact_url(url)

    def __repr__(self) -> str:
        # The generated repr leaves ``storage`` out (repr=False); show it redacted instead.
        fields = ", ".join(
            f"{f}={getattr(self, f)!r}"
            for f in self.__dataclass_fields__
            if self.__dataclass_fields__[f].repr
        )
        return f"KmsConfig({fields}, storage={self.storage_shown!r})"

    @property
    def resolved_workers(self) -> int:
        """Worker processes actually run: ``workers``, else one per CPU this process may use
        (capped at :data:`MAX_WORKERS`)."""
        if self.workers is not None:
            return self.workers
        return max(1, min(MAX_WORKERS, len(os.sched_getaffinity(0))))

    @property
    def resolved_state_dir(self) -> Path:
        """The state directory actually used."""
        return self.state_dir if self.state_dir is not None else default_state_dir() / "kms"

    def resolve_credentials(
        self, env: Mapping[str, str] | None = None
    ) -> tuple[CredentialEntry, ...]:
        """The configured credentials, else the pair from the environment.

        Raises:
            ConfigurationError: none configured and none in the environment (fail closed).
        """
        if self.credentials:
            return self.credentials
        env = os.environ if env is None else env
        key_id, secret = env.get(ACCESS_KEY_ENV), env.get(SECRET_KEY_ENV)
        if not key_id or not secret:
            raise ConfigurationError(
                "no KMS credentials: add [[credentials]] to the config file or set "
                f"{ACCESS_KEY_ENV} and {SECRET_KEY_ENV}; the daemon does not run without "
                "authentication"
            )
        return (
            CredentialEntry(
                access_key_id=key_id,
                secret_access_key=secret,
                principal_arn=f"arn:aws:iam::{self.account_id}:user/local",
            ),
        )

    def with_overrides(self, **changes: Unpack[KmsConfigChanges]) -> KmsConfig:
        """A copy with the given fields replaced (CLI flags override file values); the new
        values are checked as at construction."""
        return replace(self, **changes)

    @classmethod
    def from_toml(cls, path: Path) -> KmsConfig:
        """Load a TOML file (relative paths in it are relative to the file's directory)."""
        try:
            data = tomllib.loads(Path(path).read_text(encoding="utf-8"))
        except OSError as exc:
            raise ConfigurationError(f"cannot read KMS config {path}: {exc.strerror}") from None
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise ConfigurationError(f"cannot read KMS config {path}: {exc}") from None
        return cls.from_mapping(data, base_dir=Path(path).resolve().parent)

    @classmethod
    def from_mapping(cls, m: Mapping[str, object], *, base_dir: Path | None = None) -> KmsConfig:
        """Build from a mapping with the TOML layout above (a document read from a file: every
        value's type is checked). Unknown keys are refused.

        Raises:
            ConfigurationError: an unknown key, a value of the wrong type, or an invalid value.
        """
        if not isinstance(m, Mapping):
            raise ConfigurationError(f"a KMS config is a table, got {type(m).__name__}")
        allowed = {
            "listen",
            "host",
            "port",
            "state_dir",
            "credentials",
            "trust_roots",
            "max_document_age_s",
            "seed_file",
            "region",
            "account_id",
            "max_body_bytes",
            "graceful_timeout_s",
            "keep_alive_timeout_s",
            "request_timeout_s",
            "max_connections_per_source",
            "audit_fsync",
            "clock_skew_s",
            "workers",
            "storage",
        }
        unknown = set(m) - allowed
        if unknown:
            raise ConfigurationError(f"unknown KMS config keys: {sorted(unknown)}")

        def path_of(v: object) -> Path:
            if not isinstance(v, str | Path):
                raise ConfigurationError(f"expected a path, got {v!r}")
            p = Path(v).expanduser()
            return p if p.is_absolute() or base_dir is None else base_dir / p

        kw: dict[str, Any] = {}
        if "listen" in m:
            if not isinstance(m["listen"], str):
                raise ConfigurationError("listen must be a HOST:PORT string")
            kw["host"], kw["port"] = parse_host_port(
                m["listen"], allow_port_zero=True, what="listen"
            )
        for name, typ in (("host", str), ("region", str), ("account_id", str)):
            if name in m:
                if not isinstance(m[name], typ):
                    raise ConfigurationError(f"{name} must be a string")
                kw[name] = m[name]
        for name in ("port", "max_body_bytes", "max_connections_per_source", "workers"):
            if name in m:
                if not isinstance(m[name], int) or isinstance(m[name], bool):
                    raise ConfigurationError(f"{name} must be an integer")
                kw[name] = m[name]
        for name in (
            "max_document_age_s",
            "graceful_timeout_s",
            "keep_alive_timeout_s",
            "request_timeout_s",
            "clock_skew_s",
        ):
            if name in m:
                seconds = m[name]
                if not isinstance(seconds, int | float) or isinstance(seconds, bool):
                    raise ConfigurationError(f"{name} must be a number of seconds")
                kw[name] = float(seconds)
        if "audit_fsync" in m:
            if not isinstance(m["audit_fsync"], bool):
                raise ConfigurationError("audit_fsync must be true or false")
            kw["audit_fsync"] = m["audit_fsync"]
        if "storage" in m:
            if not isinstance(m["storage"], str):
                raise ConfigurationError('storage must be "sqlite" or a postgresql:// URL')
            kw["storage"] = m["storage"]
        if "state_dir" in m:
            kw["state_dir"] = path_of(m["state_dir"])
        if "seed_file" in m:
            kw["seed_file"] = path_of(m["seed_file"])
        if "trust_roots" in m:
            roots = m["trust_roots"]
            if not isinstance(roots, list | tuple) or not all(isinstance(r, str) for r in roots):
                raise ConfigurationError("trust_roots must be a list of strings")
            kw["trust_roots"] = tuple(
                r if r in ("aws", "local") else str(path_of(r)) for r in roots
            )
        if "credentials" in m:
            creds = m["credentials"]
            if not isinstance(creds, list | tuple):
                raise ConfigurationError("credentials must be a list of tables")
            entries = []
            for c in creds:
                if not isinstance(c, Mapping):
                    raise ConfigurationError("each credentials entry must be a table")
                extra = set(c) - {
                    "access_key_id",
                    "secret_access_key",
                    "principal_arn",
                    "session_token",
                }
                if extra:
                    raise ConfigurationError(f"unknown credentials keys: {sorted(extra)}")
                for name in ("access_key_id", "secret_access_key"):
                    if name not in c:
                        raise ConfigurationError(f"credentials entry lacks {name}")
                # Strings only: a number or a list is a mistake in the file, never a key id.
                wrong = sorted(name for name, value in c.items() if not isinstance(value, str))
                if wrong:
                    raise ConfigurationError(f"credentials {wrong} must be strings")
                account = kw.get("account_id", DEFAULT_ACCOUNT_ID)
                entries.append(
                    CredentialEntry(
                        access_key_id=c["access_key_id"],
                        secret_access_key=c["secret_access_key"],
                        principal_arn=c.get("principal_arn", f"arn:aws:iam::{account}:user/local"),
                        session_token=c.get("session_token"),
                    )
                )
            kw["credentials"] = tuple(entries)
        return cls(**kw)
