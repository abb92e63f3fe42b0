"""A local certificate authority shaped like the AWS Nitro PKI (nitro.md §4.3).

::

    root      CN=<root_common_name>                       CA, no pathLen    (kept on disk)
    regional  CN=<16 hex>.<region>.<domain>               CA, pathLen 2     ~20 days
    zonal     CN=<16 hex>.zonal.<region>.<domain>         CA, pathLen 1     ~6 days
    instance  CN=<instance-id>.<region>.<domain>          CA, pathLen 0     ~1 day
    leaf      CN=<enclave-id>.<region>.aws                end entity        ~3 hours, per enclave

All keys are P-384, all signatures ecdsa-with-SHA384, key usages and basic constraints as §4.3.
The root is created once per directory and kept: ``root.key`` (PKCS#8 PEM, mode 0600) and
``root.pem``. Creation is atomic and safe against concurrent processes (an ``flock`` on
``.lock``, files written to a temporary name, fsynced and renamed into place). The intermediates
live in memory only and are re-issued when they would expire: only the root is a trust anchor,
like AWS's published root. ``enclave attest root`` prints ``root.pem``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import os
import secrets
import stat
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Final, TypedDict, Unpack, cast

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from attest.errors import CAError
from attest.signer import DocumentSigner
from transport.errors import ConfigurationError
from transport.paths import ensure_private_dir

__all__ = [
    "CAConfig",
    "CAOptions",
    "LocalCA",
    "ROOT_KEY_FILE",
    "ROOT_CERT_FILE",
    "DocumentSigner",
    "prepare_state_dir",
]

#: File names inside the CA directory.
ROOT_KEY_FILE: Final = "root.key"
ROOT_CERT_FILE: Final = "root.pem"
_LOCK_FILE: Final = ".lock"
#: X.509 upper bound for a CommonName (RFC 5280 ub-common-name), characters.
_CN_MAX: Final = 64
_DAY_S: Final = 86400.0
#: Intermediates are re-issued when less than this fraction of their life remains, so a chain
#: never holds a CA about to expire (the leaf is renewed separately by the signer).
_REISSUE_FRACTION: Final = 0.25


def prepare_state_dir(path: Path) -> Path:
    """Make ``path`` usable as a state directory holding a CA root key: created with mode
    0700 (missing parents too), and refused when it is not a directory of this user, or when
    other users can write to it (they could swap the CA directory inside it).

    Raises:
        CAError: not a directory, another user's, writable by group or others, or not
            creatable (the reason says which, and what to do).
    """
    path = Path(path)
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        try:
            _make_private_dirs(path)
        except OSError as exc:
            raise CAError(
                f"cannot create the state directory {path}: {exc.strerror or exc}"
            ) from exc
        return path
    except OSError as exc:
        raise CAError(f"cannot use the state directory {path}: {exc.strerror or exc}") from exc
    if not stat.S_ISDIR(st.st_mode):
        raise CAError(f"the state directory {path} is not a directory")
    if st.st_uid != os.getuid():
        raise CAError(f"the state directory {path} belongs to uid {st.st_uid}, not to this user")
    if st.st_mode & 0o022:
        raise CAError(
            f"the state directory {path} is writable by other users (mode "
            f"{stat.S_IMODE(st.st_mode):04o}): refusing to keep a CA root key there; "
            f"run `chmod 700 {path}` or choose another --state-dir"
        )
    return path


def _is_number(value: object) -> bool:
    """An int or a float, not a bool (``True`` is not one second)."""
    return isinstance(value, int | float) and not isinstance(value, bool)


def _make_private_dirs(path: Path) -> None:
    """mkdir -p with mode 0700 for every directory created (umask cannot widen it)."""
    missing: list[Path] = []
    p = path
    while not p.exists():
        missing.append(p)
        p = p.parent
    for d in reversed(missing):
        with contextlib.suppress(FileExistsError):
            d.mkdir(mode=0o700)
            os.chmod(d, 0o700)


@dataclass(frozen=True)
class CAConfig:
    """Names and lifetimes of the local CA (defaults follow the AWS chain of nitro.md §4.3)."""

    region: str = "local-1"
    domain: str = "aws.nitro-enclaves"
    root_common_name: str = "local.nitro-enclaves"
    organization: str = "enclave-runtime"
    organizational_unit: str = "Local Nitro Emulation"
    country: str = "US"
    root_validity_s: float = 30 * 365 * _DAY_S  # AWS root G1: 30 years
    regional_validity_s: float = 20 * _DAY_S  # AWS regional: ~20 days
    zonal_validity_s: float = 6 * _DAY_S  # AWS zonal: ~5-6 days
    instance_validity_s: float = 1 * _DAY_S  # AWS instance: ~1 day
    leaf_validity_s: float = 3 * 3600.0  # AWS leaf: ~3 hours
    #: Backdating of CA certificates' notBefore, tolerating a little clock skew (seconds).
    backdate_s: float = 60.0
    clock: Callable[[], float] = field(default=time.time, compare=False)

    def __post_init__(self) -> None:
        # Every field is checked here, so a mapping read from a file (from_mapping) can give
        # any value: a wrong type is a ConfigurationError, not a crash later in x509.
        for f in dataclasses.fields(self):
            if f.name.endswith("_validity_s"):
                value = getattr(self, f.name)
                if not _is_number(value) or value <= 0:
                    raise ConfigurationError(f"CA {f.name} must be a positive number of seconds")
        if not _is_number(self.backdate_s) or self.backdate_s < 0:
            raise ConfigurationError("CA backdate_s must be a number of seconds >= 0")
        if self.leaf_validity_s > self.instance_validity_s:
            raise ConfigurationError("CA leaf_validity_s must not exceed instance_validity_s")
        for name in (
            "region",
            "domain",
            "root_common_name",
            "organization",
            "organizational_unit",
            "country",
        ):
            if not isinstance(getattr(self, name), str) or not getattr(self, name):
                raise ConfigurationError(f"CA {name} must be a non-empty string")
        if len(self.country) != 2:
            raise ConfigurationError("CA country must be a two-letter code")
        if not callable(self.clock):
            raise ConfigurationError("CA clock must be a callable returning seconds")

    @classmethod
    def from_mapping(cls, m: Mapping[str, object]) -> CAConfig:
        """Build from keyword settings (checked by the constructor); unknown keys are a
        :class:`ConfigurationError`."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(m) - known
        if unknown:
            raise ConfigurationError(f"unknown CA settings: {sorted(unknown)}")
        return cls(**cast("CAOptions", dict(m)))  # every value is checked in __post_init__


class CAOptions(TypedDict, total=False):
    """:class:`CAConfig`'s fields as keyword options (:meth:`LocalCA.load_or_create`'s
    ``**config``); each one left out takes the :class:`CAConfig` default."""

    region: str
    domain: str
    root_common_name: str
    organization: str
    organizational_unit: str
    country: str
    root_validity_s: float
    regional_validity_s: float
    zonal_validity_s: float
    instance_validity_s: float
    leaf_validity_s: float
    backdate_s: float
    clock: Callable[[], float]


def _name(config: CAConfig, cn: str, *, locality: bool = False) -> x509.Name:
    attrs = [
        x509.NameAttribute(NameOID.COUNTRY_NAME, config.country),
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, config.organization),
        x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, config.organizational_unit),
        x509.NameAttribute(NameOID.COMMON_NAME, cn[:_CN_MAX]),
    ]
    if locality:
        attrs.insert(1, x509.NameAttribute(NameOID.STATE_OR_PROVINCE_NAME, "Local"))
        attrs.insert(2, x509.NameAttribute(NameOID.LOCALITY_NAME, "Localhost"))
    return x509.Name(attrs)


def _new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP384R1())


def _ca_usage(*, digital_signature: bool, crl_sign: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=digital_signature,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=True,
        crl_sign=crl_sign,
        encipher_only=False,
        decipher_only=False,
    )


_LEAF_USAGE: Final = x509.KeyUsage(
    digital_signature=True,
    content_commitment=True,  # "nonRepudiation", as the AWS leaf
    key_encipherment=False,
    data_encipherment=False,
    key_agreement=False,
    key_cert_sign=False,
    crl_sign=False,
    encipher_only=False,
    decipher_only=False,
)


def _build(
    *,
    subject: x509.Name,
    issuer: x509.Name,
    public_key: ec.EllipticCurvePublicKey,
    issuer_key: ec.EllipticCurvePrivateKey,
    not_before: datetime,
    not_after: datetime,
    ca: bool,
    path_length: int | None,
    usage: x509.KeyUsage,
    usage_critical: bool,
) -> x509.Certificate:
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=ca, path_length=path_length), critical=True)
        .add_extension(usage, critical=usage_critical)
    )
    if ca:
        builder = builder.add_extension(
            x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False
        )
        if subject != issuer:
            builder = builder.add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()),
                critical=False,
            )
    return builder.sign(issuer_key, hashes.SHA384())


def _floor(ts: float) -> datetime:
    # X.509 times have one-second precision: round down so "now" is inside the validity.
    return datetime.fromtimestamp(int(ts), tz=UTC)


@dataclass
class _Issued:
    key: ec.EllipticCurvePrivateKey
    cert: x509.Certificate

    def fresh_at(self, at: datetime) -> bool:
        c = self.cert
        life = c.not_valid_after_utc - c.not_valid_before_utc
        return c.not_valid_before_utc <= at <= c.not_valid_after_utc - life * _REISSUE_FRACTION


class LocalCA:
    """The state directory's CA: a persistent root and in-memory Nitro-shaped intermediates.

    Use :meth:`load_or_create`; the constructor takes an already loaded root.
    """

    def __init__(
        self,
        root_key: ec.EllipticCurvePrivateKey,
        root_certificate: x509.Certificate,
        config: CAConfig | None = None,
    ) -> None:
        if root_certificate.public_key() != root_key.public_key():
            raise CAError("root certificate does not match the root key")
        self.config = config or CAConfig()
        self._root_key = root_key
        self.root_certificate: x509.Certificate = root_certificate
        self.root_pem: bytes = root_certificate.public_bytes(serialization.Encoding.PEM)
        self._lock = threading.Lock()
        self._regional: _Issued | None = None
        self._zonal: _Issued | None = None
        self._instances: dict[str, _Issued] = {}

    # --- persistence -----------------------------------------------------------------------

    @classmethod
    def load_or_create(cls, directory: Path, **config: Unpack[CAOptions]) -> LocalCA:
        """Load the CA kept in ``directory``, creating its root on first use.

        Args:
            directory: the CA directory (normally ``<state dir>/ca``); created with mode 0700.
            **config: :class:`CAConfig` fields (``region=``, ``leaf_validity_s=``, ``clock=``...).

        Raises:
            ConfigurationError: unknown or invalid settings.
            CAError: the directory holds a key without a usable certificate or vice versa.
        """
        cfg = CAConfig.from_mapping(config)
        directory = Path(directory)
        ensure_private_dir(directory)
        with _locked(directory / _LOCK_FILE):
            key_path = directory / ROOT_KEY_FILE
            cert_path = directory / ROOT_CERT_FILE
            if key_path.exists():
                key = _load_key(key_path)
                if cert_path.exists():
                    cert = _load_cert(cert_path)
                else:  # crashed between the two renames: re-issue the certificate
                    cert = _self_signed_root(key, cfg)
                    _atomic_write(cert_path, cert.public_bytes(serialization.Encoding.PEM), 0o644)
            elif cert_path.exists():
                raise CAError(f"{cert_path} exists without its key {key_path}")
            else:
                key = _new_key()
                pem = key.private_bytes(
                    serialization.Encoding.PEM,
                    serialization.PrivateFormat.PKCS8,
                    serialization.NoEncryption(),
                )
                _atomic_write(key_path, pem, 0o600)
                cert = _self_signed_root(key, cfg)
                _atomic_write(cert_path, cert.public_bytes(serialization.Encoding.PEM), 0o644)
        return cls(key, cert, cfg)

    @staticmethod
    def load_root(directory: Path) -> x509.Certificate:
        """Read the root certificate of the CA in ``directory`` without touching its key.

        Raises:
            ConfigurationError: no CA has been created there yet.
        """
        path = Path(directory) / ROOT_CERT_FILE
        if not path.is_file():
            raise ConfigurationError(
                f"no local CA root at {path} (run `enclave attest root` to create one)"
            )
        return _load_cert(path)

    # --- issuing ---------------------------------------------------------------------------

    def _now(self) -> datetime:
        return datetime.fromtimestamp(self.config.clock(), tz=UTC)

    def _issue_ca(
        self,
        cn: str,
        parent_key: ec.EllipticCurvePrivateKey,
        parent_cert: x509.Certificate,
        at: datetime,
        validity_s: float,
        path_length: int,
        *,
        locality: bool,
        digital_signature: bool,
        crl_sign: bool,
    ) -> _Issued:
        key = _new_key()
        not_before = _floor(at.timestamp() - self.config.backdate_s)
        not_after = min(not_before + timedelta(seconds=validity_s), parent_cert.not_valid_after_utc)
        cert = _build(
            subject=_name(self.config, cn, locality=locality),
            issuer=parent_cert.subject,
            public_key=key.public_key(),
            issuer_key=parent_key,
            not_before=not_before,
            not_after=not_after,
            ca=True,
            path_length=path_length,
            usage=_ca_usage(digital_signature=digital_signature, crl_sign=crl_sign),
            usage_critical=True,
        )
        return _Issued(key, cert)

    def _instance_chain(self, instance_id: str, at: datetime) -> tuple[_Issued, _Issued, _Issued]:
        cfg = self.config
        with self._lock:
            if self._regional is None or not self._regional.fresh_at(at):
                self._regional = self._issue_ca(
                    f"{secrets.token_hex(8)}.{cfg.region}.{cfg.domain}",
                    self._root_key,
                    self.root_certificate,
                    at,
                    cfg.regional_validity_s,
                    2,
                    locality=False,
                    digital_signature=True,
                    crl_sign=True,
                )
                self._zonal = None
                self._instances.clear()
            regional = self._regional
            if self._zonal is None or not self._zonal.fresh_at(at):
                self._zonal = self._issue_ca(
                    f"{secrets.token_hex(8)}.zonal.{cfg.region}.{cfg.domain}",
                    regional.key,
                    regional.cert,
                    at,
                    cfg.zonal_validity_s,
                    1,
                    locality=True,
                    digital_signature=True,
                    crl_sign=True,
                )
                self._instances.clear()
            zonal = self._zonal
            instance = self._instances.get(instance_id)
            if instance is None or not instance.fresh_at(at):
                instance = self._issue_ca(
                    f"{instance_id}.{cfg.region}.{cfg.domain}",
                    zonal.key,
                    zonal.cert,
                    at,
                    cfg.instance_validity_s,
                    0,
                    locality=True,
                    digital_signature=False,
                    crl_sign=False,
                )
                self._instances[instance_id] = instance
            return regional, zonal, instance

    def issue_leaf(
        self, module_id: str, at: datetime | None = None
    ) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate, tuple[x509.Certificate, ...]]:
        """Issue a fresh short-lived leaf for ``module_id``.

        Returns:
            ``(leaf key, leaf certificate, cabundle root-first)``.
        """
        at = at or self._now()
        instance_id = module_id.split("-enc", 1)[0] or "i-0000000000000000"
        regional, zonal, instance = self._instance_chain(instance_id, at)
        key = _new_key()
        not_before = _floor(at.timestamp())
        not_after = min(
            not_before + timedelta(seconds=self.config.leaf_validity_s),
            instance.cert.not_valid_after_utc,
        )
        leaf = _build(
            subject=_name(self.config, f"{module_id}.{self.config.region}.aws", locality=True),
            issuer=instance.cert.subject,
            public_key=key.public_key(),
            issuer_key=instance.key,
            not_before=not_before,
            not_after=not_after,
            ca=False,
            path_length=None,
            usage=_LEAF_USAGE,
            usage_critical=False,
        )
        return key, leaf, (self.root_certificate, regional.cert, zonal.cert, instance.cert)

    def new_signer(self, module_id: str) -> DocumentSigner:
        """A :class:`DocumentSigner` for one enclave: a fresh P-384 leaf, renewed as it expires."""
        if not isinstance(module_id, str) or not module_id:
            raise ValueError("module_id must be a non-empty string")

        def renew(
            at: datetime,
        ) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate, tuple[x509.Certificate, ...]]:
            return self.issue_leaf(module_id, at)

        key, leaf, bundle = self.issue_leaf(module_id)
        return DocumentSigner(key, leaf, bundle, renew=renew)


# --- files ---------------------------------------------------------------------------------


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock


def _atomic_write(path: Path, data: bytes, mode: int) -> None:
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        os.fchmod(fd, mode)  # umask must not widen or narrow what we asked for
        with os.fdopen(fd, "wb", closefd=False) as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    finally:
        os.close(fd)
    try:
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def _load_key(path: Path) -> ec.EllipticCurvePrivateKey:
    st = path.stat()
    if st.st_mode & 0o077:
        raise CAError(f"{path} is readable by others (mode {st.st_mode & 0o777:o}); expected 0600")
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except (ValueError, TypeError) as exc:
        raise CAError(f"{path} is not a usable PEM private key") from exc
    if not isinstance(key, ec.EllipticCurvePrivateKey) or not isinstance(key.curve, ec.SECP384R1):
        raise CAError(f"{path} is not a P-384 private key")
    return key


def _load_cert(path: Path) -> x509.Certificate:
    try:
        return x509.load_pem_x509_certificate(path.read_bytes())
    except ValueError as exc:
        raise CAError(f"{path} is not a PEM certificate") from exc


def _self_signed_root(key: ec.EllipticCurvePrivateKey, config: CAConfig) -> x509.Certificate:
    now = config.clock()
    not_before = _floor(now - config.backdate_s)
    name = _name(config, config.root_common_name)
    return _build(
        subject=name,
        issuer=name,
        public_key=key.public_key(),
        issuer_key=key,
        not_before=not_before,
        not_after=not_before + timedelta(seconds=config.root_validity_s),
        ca=True,
        path_length=None,
        usage=_ca_usage(digital_signature=True, crl_sign=True),
        usage_critical=True,
    )
