"""XKS proxy configuration: one frozen :class:`XksProxyConfig`, loaded from TOML.

Unknown keys are an error at every level (STYLE B9). Durations are seconds (``_s``), sizes
bytes; relative paths are relative to the configuration file. Example::

    listen = "127.0.0.1:4600"
    uri_path = "/owner-a/kms/xks/v1"        # the XksProxyUriPath given to KMS
    region = "us-east-1"                    # SigV4 scope: the KMS region calling the proxy
    # disconnected = true                   # refuse everything (InvalidStateException)

    [[credentials]]                         # SigV4 credentials KMS signs with (two while
    access_key_id = "BETWEEN20AND30CHARSA2"  # rotating them); the secret inline (config file
    secret_access_key_file = "sigv4.secret"  # then mode 0600) or in an owner-only file

    [tls]                                   # optional: HTTPS
    certificate = "proxy.pem"
    private_key = "proxy.key"               # mode 0600
    client_ca = "kms-ca.pem"                # optional: mutual TLS, client certs from this CA...
    client_subject = "cks.kms.us-east-1.amazonaws.com"   # ...with this subject CN

    [[keys]]
    id = "model-key"                        # the externalKeyId (XksKeyId)
    operations = "both"                     # "both", "encrypt", "decrypt" or "none"
    enabled = true                          # false: keyStatus DISABLED, crypto refused
    backing = { type = "file", path = "model-key.bin" }     # 32 raw bytes, mode 0600

    [[keys]]
    id = "hsm-key"
    backing = { type = "pkcs11", module = "/usr/lib/softhsm/libsofthsm2.so",
                token_label = "xks", key_label = "hsm-key", pin_file = "token.pin" }

Credentials follow the spec (Appendix A and "XKS proxy configuration in AWS KMS console"): an
access key id is 20-30 characters of ``A-Z`` and ``2-7``; a secret is 43-64 characters of
``A-Za-z0-9/+=``. Secrets (SigV4 secret, token PIN) come from owner-only files, or inline from
a configuration file that is itself owner-only.
"""

from __future__ import annotations

import enum
import re
import stat
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, TypedDict, Unpack

from transport.errors import ConfigurationError
from transport.hostport import parse_host_port

from .backing import read_secret_file
from .codec import validate_key_id, validate_uri_path

__all__ = [
    "DEFAULT_HOST",
    "DEFAULT_PORT",
    "DEFAULT_URI_PATH",
    "SIGV4_SERVICE",
    "KeyOperations",
    "XksCredential",
    "FileBackingSpec",
    "Pkcs11BackingSpec",
    "XksKeyConfig",
    "TlsConfig",
    "XksProxyConfig",
    "XksProxyConfigChanges",
]

DEFAULT_HOST = "127.0.0.1"
#: Next to the KMS daemon's 4599.
DEFAULT_PORT = 4600
DEFAULT_URI_PATH = "/kms/xks/v1"
#: The SigV4 service name of the XKS Proxy API (spec, Appendix A).
SIGV4_SERVICE = "kms-xks-proxy"

_ACCESS_KEY_RE = re.compile(r"^[A-Z2-7]{20,30}$")
_SECRET_RE = re.compile(r"^[A-Za-z0-9/+=]{43,64}$")
_REGION_RE = re.compile(r"^[a-z]{2}(-[a-z]+)+-\d$")
#: At most this many keys and credentials: bounds memory and start-up time.
_MAX_KEYS = 1000
_MAX_CREDENTIALS = 8


class KeyOperations(enum.Enum):
    """What a key may be used for."""

    BOTH = "both"
    ENCRYPT = "encrypt"
    DECRYPT = "decrypt"
    NONE = "none"

    @property
    def can_encrypt(self) -> bool:
        return self in (KeyOperations.BOTH, KeyOperations.ENCRYPT)

    @property
    def can_decrypt(self) -> bool:
        return self in (KeyOperations.BOTH, KeyOperations.DECRYPT)


@dataclass(frozen=True, slots=True)
class XksCredential:
    """A SigV4 credential the proxy accepts (and KMS holds as XksProxyAuthenticationCredential)."""

    access_key_id: str
    secret_access_key: str = field(repr=False)

    def __post_init__(self) -> None:
        if not _ACCESS_KEY_RE.match(self.access_key_id):
            raise ConfigurationError(
                f"access_key_id {self.access_key_id[:40]!r} must be 20-30 characters of A-Z "
                "and 2-7 (XKS spec, Appendix A)"
            )
        if not _SECRET_RE.match(self.secret_access_key):
            raise ConfigurationError(
                f"the secret of {self.access_key_id} must be 43-64 characters of A-Z, a-z, "
                "0-9, '/', '+' and '=' (e.g. 32 random bytes in Base64)"
            )


@dataclass(frozen=True, slots=True)
class FileBackingSpec:
    """A key in a local key file (32 raw bytes, mode 0600)."""

    path: Path


@dataclass(frozen=True, slots=True)
class Pkcs11BackingSpec:
    """A key in a PKCS#11 token, found by label."""

    module: Path
    token_label: str
    key_label: str
    pin: str = field(repr=False)


@dataclass(frozen=True, slots=True)
class XksKeyConfig:
    """One external key."""

    key_id: str
    backing: FileBackingSpec | Pkcs11BackingSpec
    operations: KeyOperations = KeyOperations.BOTH
    enabled: bool = True

    def __post_init__(self) -> None:
        try:
            validate_key_id(self.key_id)
        except ValueError as exc:
            raise ConfigurationError(str(exc)) from None


@dataclass(frozen=True, slots=True)
class TlsConfig:
    """HTTPS: the server's certificate chain and key; optionally mutual TLS."""

    certificate: Path
    private_key: Path
    client_ca: Path | None = None
    client_subject: str | None = None

    def __post_init__(self) -> None:
        if self.client_subject is not None and self.client_ca is None:
            raise ConfigurationError("tls.client_subject needs tls.client_ca")


class XksProxyConfigChanges(TypedDict, total=False):
    """The fields of :class:`XksProxyConfig` that :meth:`XksProxyConfig.with_overrides` replaces
    (any subset; each with its field's type)."""

    credentials: tuple[XksCredential, ...]
    keys: tuple[XksKeyConfig, ...]
    host: str
    port: int
    uri_path: str
    region: str
    tls: TlsConfig | None
    disconnected: bool
    max_body_bytes: int
    request_timeout_s: float
    keep_alive_timeout_s: float
    max_connections: int
    max_connections_per_source: int
    graceful_timeout_s: float
    dependency_timeout_s: float
    health_cache_s: float
    clock_skew_s: float
    source: Path | None


@dataclass(frozen=True, slots=True)
class XksProxyConfig:
    """Configuration of one XKS proxy process.

    Attributes:
        host, port: where to listen (``port=0``: ephemeral; the actual one is reported).
        uri_path: the API's base path, ``[/<prefix>]/kms/xks/v1``.
        region: the SigV4 region accepted (the KMS region that calls the proxy).
        credentials: accepted SigV4 credentials (at least one).
        keys: the external keys.
        tls: serve HTTPS (None: plain HTTP, for loopback and tests).
        disconnected: answer every request InvalidStateException (the owner pulled the plug
            without stopping the process).
        max_body_bytes, request_timeout_s, keep_alive_timeout_s, max_connections,
        max_connections_per_source, graceful_timeout_s: HTTP bounds (see ``kms.xks._http``).
        dependency_timeout_s: time a key manager gets per operation (then
            DependencyTimeoutException).
        health_cache_s: a deep health check result is reused this long (spec: at most 60 s).
        clock_skew_s: accepted X-Amz-Date skew (spec: 5 minutes).
        source: the file this was loaded from (reloads read it again).
    """

    credentials: tuple[XksCredential, ...]
    keys: tuple[XksKeyConfig, ...] = ()
    host: str = DEFAULT_HOST
    port: int = DEFAULT_PORT
    uri_path: str = DEFAULT_URI_PATH
    region: str = "us-east-1"
    tls: TlsConfig | None = None
    disconnected: bool = False
    max_body_bytes: int = 64 * 1024
    request_timeout_s: float = 10.0
    keep_alive_timeout_s: float = 60.0
    max_connections: int = 1024
    max_connections_per_source: int = 128
    graceful_timeout_s: float = 5.0
    dependency_timeout_s: float = 2.0
    health_cache_s: float = 10.0
    clock_skew_s: float = 300.0
    source: Path | None = None

    def __post_init__(self) -> None:
        try:
            validate_uri_path(self.uri_path)
        except ValueError as exc:
            raise ConfigurationError(str(exc)) from None
        if not _REGION_RE.match(self.region):
            raise ConfigurationError(f"region {self.region!r} is not an AWS region name")
        if not 0 <= self.port <= 65535:
            raise ConfigurationError(f"port out of range: {self.port}")
        if not 1 <= len(self.credentials) <= _MAX_CREDENTIALS:
            raise ConfigurationError(
                f"the proxy needs 1 to {_MAX_CREDENTIALS} [[credentials]] (it never runs "
                "without authentication)"
            )
        if len({c.access_key_id for c in self.credentials}) != len(self.credentials):
            raise ConfigurationError("an access_key_id appears twice in [[credentials]]")
        if len(self.keys) > _MAX_KEYS:
            raise ConfigurationError(f"at most {_MAX_KEYS} keys")
        ids = [k.key_id for k in self.keys]
        if len(set(ids)) != len(ids):
            raise ConfigurationError("a key id appears twice in [[keys]]")
        for name in (
            "request_timeout_s",
            "keep_alive_timeout_s",
            "graceful_timeout_s",
            "dependency_timeout_s",
            "clock_skew_s",
        ):
            if not getattr(self, name) > 0:
                raise ConfigurationError(f"{name} must be > 0")
        if not 0 <= self.health_cache_s <= 60:
            raise ConfigurationError("health_cache_s must be within 0..60 (spec: at most 1 min)")
        # The spec's sizes (4300-byte data, 8192-byte AAD, 2048-character ARNs) need ~26 KiB.
        if not 32 * 1024 <= self.max_body_bytes <= 1024 * 1024:
            raise ConfigurationError("max_body_bytes must be within 32 KiB..1 MiB")
        if not 1 <= self.max_connections_per_source <= self.max_connections <= 65536:
            raise ConfigurationError(
                "need 1 <= max_connections_per_source <= max_connections <= 65536"
            )

    def key(self, key_id: str) -> XksKeyConfig | None:
        """The key with this id, if configured."""
        return next((k for k in self.keys if k.key_id == key_id), None)

    def with_overrides(self, **changes: Unpack[XksProxyConfigChanges]) -> XksProxyConfig:
        """A copy with the given fields replaced (CLI flags override file values); the new
        values are checked as at construction."""
        return replace(self, **changes)

    @classmethod
    def from_toml(cls, path: Path) -> XksProxyConfig:
        """Load a TOML file. A file holding a secret inline must be owner-only.

        Raises:
            ConfigurationError: unreadable, not TOML, or any invalid value (named).
        """
        path = Path(path)
        try:
            raw = path.read_bytes()
            mode = stat.S_IMODE(path.stat().st_mode)
        except OSError as exc:
            raise ConfigurationError(
                f"cannot read XKS proxy config {path}: {exc.strerror}"
            ) from None
        try:
            data = tomllib.loads(raw.decode("utf-8"))
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise ConfigurationError(f"cannot read XKS proxy config {path}: {exc}") from None
        base = path.resolve().parent
        try:
            config = cls.from_mapping(data, base_dir=base, inline_secrets_ok=not mode & 0o077)
        except ConfigurationError as exc:
            raise ConfigurationError(f"{path}: {exc}") from None
        return replace(config, source=path.resolve())

    @classmethod
    def from_mapping(
        cls,
        m: Mapping[str, object],
        *,
        base_dir: Path | None = None,
        inline_secrets_ok: bool = True,
    ) -> XksProxyConfig:
        """Build from a mapping with the TOML layout above (a document read from a file: every
        value's type is checked). Unknown keys are refused.

        Args:
            inline_secrets_ok: whether secrets may appear inline (False when the file they
                came from is readable by others).
        """
        reader = _Reader(base_dir, inline_secrets_ok)
        _known(m, _TOP_KEYS, "")
        kw: dict[str, Any] = {}
        if "listen" in m:
            kw["host"], kw["port"] = parse_host_port(
                reader.string(m, "listen"), allow_port_zero=True, what="listen"
            )
        for name in ("uri_path", "region"):
            if name in m:
                kw[name] = reader.string(m, name)
        if "disconnected" in m:
            kw["disconnected"] = reader.boolean(m, "disconnected")
        for name in ("max_body_bytes", "max_connections", "max_connections_per_source"):
            if name in m:
                kw[name] = reader.integer(m, name)
        for name in _DURATIONS:
            if name in m:
                kw[name] = reader.seconds(m, name)
        kw["credentials"] = tuple(
            reader.credential(c, i) for i, c in enumerate(reader.tables(m, "credentials"))
        )
        kw["keys"] = tuple(reader.key(k, i) for i, k in enumerate(reader.tables(m, "keys")))
        if "tls" in m:
            kw["tls"] = reader.tls(m["tls"])
        return cls(**kw)


_DURATIONS = (
    "request_timeout_s",
    "keep_alive_timeout_s",
    "graceful_timeout_s",
    "dependency_timeout_s",
    "health_cache_s",
    "clock_skew_s",
)
_TOP_KEYS = frozenset(
    {
        "listen",
        "uri_path",
        "region",
        "disconnected",
        "credentials",
        "keys",
        "tls",
        "max_body_bytes",
        "max_connections",
        "max_connections_per_source",
        *_DURATIONS,
    }
)


def _known(m: Mapping[str, object], allowed: frozenset[str], where: str) -> None:
    unknown = set(m) - allowed
    if unknown:
        place = f" in {where}" if where else ""
        raise ConfigurationError(f"unknown keys{place}: {sorted(unknown)}")


class _Reader:
    """Typed reads from the TOML mapping, with paths and secrets resolved."""

    def __init__(self, base_dir: Path | None, inline_secrets_ok: bool) -> None:
        self.base_dir = base_dir
        self.inline_secrets_ok = inline_secrets_ok

    def string(self, m: Mapping[str, object], name: str, where: str = "") -> str:
        value = m.get(name)
        if not isinstance(value, str) or not value:
            raise ConfigurationError(f"{where}{name} must be a non-empty string")
        return value

    def boolean(self, m: Mapping[str, object], name: str, where: str = "") -> bool:
        value = m.get(name)
        if not isinstance(value, bool):
            raise ConfigurationError(f"{where}{name} must be true or false")
        return value

    def integer(self, m: Mapping[str, object], name: str) -> int:
        value = m.get(name)
        if not isinstance(value, int) or isinstance(value, bool):
            raise ConfigurationError(f"{name} must be an integer")
        return value

    def seconds(self, m: Mapping[str, object], name: str) -> float:
        value = m.get(name)
        if not isinstance(value, int | float) or isinstance(value, bool):
            raise ConfigurationError(f"{name} must be a number of seconds")
        return float(value)

    def path(self, m: Mapping[str, object], name: str, where: str) -> Path:
        p = Path(self.string(m, name, where)).expanduser()
        return p if p.is_absolute() or self.base_dir is None else self.base_dir / p

    def tables(self, m: Mapping[str, object], name: str) -> list[Mapping[str, object]]:
        value = m.get(name, [])
        if not isinstance(value, list) or not all(isinstance(t, Mapping) for t in value):
            raise ConfigurationError(f"{name} must be a list of tables ([[{name}]])")
        return value

    def secret(self, m: Mapping[str, object], name: str, where: str) -> str:
        """``name`` inline or ``name_file``: exactly one of them."""
        inline, file_key = m.get(name), f"{name}_file"
        if (inline is None) == (file_key not in m):
            raise ConfigurationError(f"{where}needs exactly one of {name} and {file_key}")
        if inline is not None:
            if not self.inline_secrets_ok:
                raise ConfigurationError(
                    f"{where}{name} is inline but the config file is readable by group or "
                    f"others: chmod 600 it, or use {file_key}"
                )
            return self.string(m, name, where)
        return read_secret_file(self.path(m, file_key, where), f"{where}{file_key}")

    def credential(self, c: Mapping[str, object], index: int) -> XksCredential:
        where = f"credentials[{index}]."
        _known(c, frozenset({"access_key_id", "secret_access_key", "secret_access_key_file"}),
               f"credentials[{index}]")  # fmt: skip
        return XksCredential(
            access_key_id=self.string(c, "access_key_id", where),
            secret_access_key=self.secret(c, "secret_access_key", where),
        )

    def key(self, k: Mapping[str, object], index: int) -> XksKeyConfig:
        where = f"keys[{index}]."
        _known(k, frozenset({"id", "operations", "enabled", "backing"}), f"keys[{index}]")
        operations = KeyOperations.BOTH
        if "operations" in k:
            text = self.string(k, "operations", where)
            try:
                operations = KeyOperations(text)
            except ValueError:
                raise ConfigurationError(
                    f"{where}operations must be one of both, encrypt, decrypt, none; got {text!r}"
                ) from None
        enabled = self.boolean(k, "enabled", where) if "enabled" in k else True
        backing = k.get("backing")
        if not isinstance(backing, Mapping):
            raise ConfigurationError(f"{where}backing must be a table (type = file or pkcs11)")
        return XksKeyConfig(
            key_id=self.string(k, "id", where),
            backing=self.backing(backing, f"{where}backing."),
            operations=operations,
            enabled=enabled,
        )

    def backing(self, b: Mapping[str, object], where: str) -> FileBackingSpec | Pkcs11BackingSpec:
        kind = b.get("type")
        if kind == "file":
            _known(b, frozenset({"type", "path"}), where.rstrip("."))
            return FileBackingSpec(self.path(b, "path", where))
        if kind == "pkcs11":
            _known(
                b,
                frozenset({"type", "module", "token_label", "key_label", "pin", "pin_file"}),
                where.rstrip("."),
            )
            return Pkcs11BackingSpec(
                module=self.path(b, "module", where),
                token_label=self.string(b, "token_label", where),
                key_label=self.string(b, "key_label", where),
                pin=self.secret(b, "pin", where),
            )
        raise ConfigurationError(f'{where}type must be "file" or "pkcs11", got {kind!r}')

    def tls(self, t: object) -> TlsConfig:
        if not isinstance(t, Mapping):
            raise ConfigurationError("tls must be a table")
        _known(t, frozenset({"certificate", "private_key", "client_ca", "client_subject"}), "tls")
        return TlsConfig(
            certificate=self.path(t, "certificate", "tls."),
            private_key=self.path(t, "private_key", "tls."),
            client_ca=self.path(t, "client_ca", "tls.") if "client_ca" in t else None,
            client_subject=(
                self.string(t, "client_subject", "tls.") if "client_subject" in t else None
            ),
        )
