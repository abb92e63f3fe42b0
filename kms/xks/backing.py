"""Where an external key lives and who runs AES-GCM with it: the backing contract, and the
local key file backing.

A backing encrypts and decrypts with one AES-256 key and never hands the key out. Each backing
belongs to a *key manager* (a key-file store, a PKCS#11 token), the unit the health check
reports on (``ekmFleetDetails``).

Key files hold exactly 32 raw bytes and must be readable by their owner only (mode 0600 or
stricter): a file group or others can read is refused, as is anything but a regular file
(a symlink is not followed). The key is read once, when the configuration is loaded or
reloaded, and kept in memory.

IVs are 96-bit and random (``kms._wrap.Aead``): NIST SP 800-38D bounds a key at 2^32 such
encryptions, which at AWS's default XKS quota of 1800 requests a second is 27 years. A 16-byte
IV (allowed by the spec for ciphertexts other proxies made) is answered
``UnsupportedOperationException``: this proxy never makes one.
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path
from typing import Protocol

from transport.errors import ConfigurationError

from .. import _wrap
from ..errors import CiphertextFormatError
from .codec import TAG_SIZE
from .errors import InvalidCiphertextError, UnsupportedOperationError

__all__ = [
    "KeyBacking",
    "KeyManager",
    "FileKeyManager",
    "FileKeyBacking",
    "read_key_file",
    "read_secret_file",
    "require_own_iv",
    "IV_BYTES",
]

#: The IV length this proxy makes and decrypts with (96 bits, GCM's native size).
IV_BYTES = _wrap.GCM_NONCE_BYTES
#: Largest secret file read (a PIN or an access key secret): bounds the read.
_MAX_SECRET_FILE = 4096


class KeyManager(Protocol):
    """A key manager behind the proxy: one ``ekmFleetDetails`` entry."""

    @property
    def id(self) -> str:
        """Stable identifier (the token serial, ``"key-files"``)."""
        ...

    @property
    def model(self) -> str:
        """Product and version, for the operator."""
        ...

    async def check_health(self) -> str:
        """``"ACTIVE"``, ``"DEGRADED"`` or ``"UNAVAILABLE"`` after a real cryptographic round
        trip on a test key (never on a key KMS uses). Must not raise."""
        ...

    async def aclose(self) -> None:
        """Release sessions (after in-flight operations end)."""
        ...


class KeyBacking(Protocol):
    """One AES-256 key inside a key manager."""

    @property
    def manager(self) -> KeyManager:
        """The key manager holding the key."""
        ...

    @property
    def description(self) -> str:
        """Where the key is, for logs (no secret)."""
        ...

    async def encrypt(self, plaintext: bytes, aad: bytes) -> tuple[bytes, bytes, bytes]:
        """AES-256-GCM under a fresh IV: ``(iv, ciphertext, tag)``.

        Raises:
            InternalError: the key manager failed.
        """
        ...

    async def decrypt(self, iv: bytes, ciphertext: bytes, tag: bytes, aad: bytes) -> bytes:
        """Inverse of :meth:`encrypt`.

        Raises:
            InvalidCiphertextError: the tag does not verify (opaque: which part was wrong is
                unknowable by design).
            UnsupportedOperationError: an IV length this backing does not take.
            InternalError: the key manager failed.
        """
        ...


def require_own_iv(iv: bytes) -> None:
    """Refuse an IV length this proxy never makes (16 bytes: another proxy's ciphertext).

    Raises:
        UnsupportedOperationError: not 96 bits.
    """
    if len(iv) != IV_BYTES:
        raise UnsupportedOperationError(
            "This proxy decrypts with 12-byte initialization vectors only.",
            reason=f"IV of {len(iv)} bytes",
        )


def _read_private(path: Path, what: str, max_bytes: int) -> bytes:
    """Read a regular file readable by its owner only, without following a symlink; the mode
    is checked on the open descriptor (no race between check and read).

    Raises:
        ConfigurationError: missing, not a regular file, group/other-accessible, too large.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        if exc.errno == errno.ELOOP:  # O_NOFOLLOW met a symlink
            raise ConfigurationError(f"{what} {path} is a symlink (refused)") from None
        raise ConfigurationError(f"cannot read {what} {path}: {exc.strerror}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ConfigurationError(f"{what} {path} is not a regular file")
        if st.st_mode & 0o077:
            raise ConfigurationError(
                f"{what} {path} is accessible to group or others (mode "
                f"{stat.S_IMODE(st.st_mode):04o}); chmod 600 it"
            )
        if st.st_size > max_bytes:
            raise ConfigurationError(f"{what} {path} is larger than {max_bytes} bytes")
        with os.fdopen(fd, "rb", closefd=False) as f:
            return f.read(max_bytes + 1)
    finally:
        os.close(fd)


def read_key_file(path: Path) -> bytes:
    """The 32 raw key bytes of a key file (owner-only, regular file).

    Raises:
        ConfigurationError: anything else.
    """
    data = _read_private(path, "key file", _wrap.AES_KEY_BYTES)
    if len(data) != _wrap.AES_KEY_BYTES:
        raise ConfigurationError(
            f"key file {path} must hold exactly {_wrap.AES_KEY_BYTES} raw bytes "
            f"(it holds {len(data)}); make one with: head -c 32 /dev/urandom > FILE"
        )
    return data


def read_secret_file(path: Path, what: str) -> str:
    """A one-line secret (PIN, SigV4 secret) from an owner-only file, surrounding space
    stripped.

    Raises:
        ConfigurationError: unreadable, loose mode, empty, not UTF-8.
    """
    try:
        text = _read_private(path, what, _MAX_SECRET_FILE).decode("utf-8").strip()
    except UnicodeDecodeError:
        raise ConfigurationError(f"{what} {path} is not UTF-8 text") from None
    if not text:
        raise ConfigurationError(f"{what} {path} is empty")
    return text


class FileKeyManager:
    """The local key files, as one key manager."""

    id = "key-files"
    model = "enclave-runtime key files (AES-256-GCM, OpenSSL via cryptography)"

    async def check_health(self) -> str:
        # A round trip on a fresh test key: proves the cipher works, touches no KMS key.
        try:
            aead = _wrap.Aead(_wrap.random_bytes(_wrap.AES_KEY_BYTES))
            probe = _wrap.random_bytes(16)
            ok = aead.open(aead.seal(probe, b"health"), b"health") == probe
        except Exception:
            return "UNAVAILABLE"
        return "ACTIVE" if ok else "UNAVAILABLE"

    async def aclose(self) -> None:
        return None


class FileKeyBacking:
    """An AES-256 key read from a key file; GCM in this process."""

    def __init__(self, key: bytes, path: Path, manager: FileKeyManager) -> None:
        self._aead = _wrap.Aead(key)
        self._path = path
        self._manager = manager

    @classmethod
    def load(cls, path: Path, manager: FileKeyManager) -> FileKeyBacking:
        """Read ``path`` (see :func:`read_key_file`)."""
        return cls(read_key_file(path), path, manager)

    @property
    def manager(self) -> KeyManager:
        return self._manager

    @property
    def description(self) -> str:
        return f"file {self._path}"

    def __repr__(self) -> str:
        return f"FileKeyBacking({str(self._path)!r})"

    async def encrypt(self, plaintext: bytes, aad: bytes) -> tuple[bytes, bytes, bytes]:
        sealed = self._aead.seal(plaintext, aad)
        return sealed[:IV_BYTES], sealed[IV_BYTES:-TAG_SIZE], sealed[-TAG_SIZE:]

    async def decrypt(self, iv: bytes, ciphertext: bytes, tag: bytes, aad: bytes) -> bytes:
        require_own_iv(iv)
        try:
            return self._aead.open(iv + ciphertext + tag, aad)
        except CiphertextFormatError:
            raise InvalidCiphertextError(reason="tag did not verify") from None
