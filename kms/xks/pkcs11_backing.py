"""The PKCS#11 backing: AES-256-GCM done by a token (an HSM, or SoftHSM2 in tests) through
python-pkcs11; the key never leaves the token.

* A key is found by its label (``CKA_LABEL``) among the token's AES secret keys. It must be
  256 bits, allowed to encrypt and decrypt, *sensitive* and *not extractable* (``CKA_SENSITIVE``,
  ``CKA_EXTRACTABLE``): a key the token would hand out is refused at load, because the promise
  of holding one's own key is that it never leaves the key manager.
* The token generates the IV (``C_GenerateRandom``, 96 bits) and runs ``CKM_AES_GCM`` with the
  spec's AAD and a 128-bit tag; the token returns ``ciphertext ‖ tag``, which is split here
  (spec, Encrypt: "the XKS proxy MUST separate the two"). python-pkcs11's ``GCMParams`` takes
  IVs of up to 12 bytes, so a 16-byte IV is answered ``UnsupportedOperationException``.
* A tag mismatch comes back from SoftHSM2 as ``CKR_GENERAL_ERROR`` (other tokens say
  ``CKR_ENCRYPTED_DATA_INVALID``); both, and the other data-shaped refusals, are an invalid
  ciphertext. Session, device and token errors are internal errors of the key manager.
* Calls block in the token, so they run in a worker thread (``trio.to_thread``), one at a time
  per token (a :class:`trio.CapacityLimiter`), and one at a time per library (a lock): the
  library is initialised without ``CKF_OS_LOCKING_OK`` (python-pkcs11 passes no arguments to
  ``C_Initialize``), which allows no concurrent calls. Callers bound each call in time; an
  abandoned call keeps its token busy until the token answers, so later calls time out too,
  which is right for a hung key manager.
* ``C_Initialize`` is per process, so each library is loaded once per process, and a login is
  per application and token (a second ``C_Login`` fails with ``CKR_USER_ALREADY_LOGGED_IN``), so
  each token has one logged-in session per process, shared by every configuration that uses it
  (a reload opens the new keys on the same session) and closed when the last one lets go. A
  reload that gives a logged-in token another PIN is refused: a new PIN takes effect at the next
  start. (:data:`_LIBRARIES` and :data:`_SESSIONS`, the module-level state here, for these
  reasons.)

python-pkcs11 is imported only when a PKCS#11 key is configured (it is an optional dependency:
``pip install 'enclave-runtime[hsm]'``).
"""

from __future__ import annotations

import hashlib
import hmac
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import trio

from transport.errors import ConfigurationError

from .backing import IV_BYTES, require_own_iv
from .codec import TAG_SIZE
from .errors import InternalError, InvalidCiphertextError

__all__ = ["Pkcs11Token", "Pkcs11KeyBacking"]

_T = TypeVar("_T")

#: Loaded libraries by path, with the lock serialising calls into each (see module docstring).
_LIBRARIES: dict[str, tuple[Any, threading.Lock]] = {}
_LIBRARIES_LOCK = threading.Lock()


class _SharedSession:
    """A token's logged-in session and how many :class:`Pkcs11Token` objects use it."""

    def __init__(self, token: Any, session: Any, pin_digest: bytes) -> None:
        self.token = token
        self.session = session
        self.pin_digest = pin_digest
        self.users = 0


#: Logged-in sessions by (module, token label), under _LIBRARIES_LOCK.
_SESSIONS: dict[tuple[str, str], _SharedSession] = {}


def _import_pkcs11() -> Any:
    try:
        import pkcs11
    except ImportError:
        raise ConfigurationError(
            "PKCS#11 keys need python-pkcs11: pip install 'enclave-runtime[hsm]'"
        ) from None
    return pkcs11


def _library(module: Path) -> tuple[Any, threading.Lock]:
    p11 = _import_pkcs11()
    key = str(module)
    with _LIBRARIES_LOCK:
        if key not in _LIBRARIES:
            if not module.is_file():
                raise ConfigurationError(f"PKCS#11 module {module} does not exist")
            try:
                _LIBRARIES[key] = (p11.lib(key), threading.Lock())
            except p11.exceptions.PKCS11Error as exc:
                raise ConfigurationError(f"cannot load PKCS#11 module {module}: {exc}") from None
        return _LIBRARIES[key]


class Pkcs11Token:
    """One logged-in session on a token: a key manager of the proxy.

    Raises (constructor):
        ConfigurationError: no such module or token, wrong PIN, locked PIN.
    """

    def __init__(self, module: Path, token_label: str, pin: str) -> None:
        p11 = _import_pkcs11()
        self._p11 = p11
        #: The library's root error class (callers catch it around :meth:`call`).
        self.error_type: type[Exception] = p11.exceptions.PKCS11Error
        self._lib, self._lib_lock = _library(module)
        self._where = (str(module), token_label)
        shared = self._acquire(module, token_label, pin)
        token = shared.token
        self._session = shared.session
        serial = token.serial
        serial_text = serial.decode("ascii", "replace") if isinstance(serial, bytes) else serial
        self.label = token_label
        self._id = f"{token_label}:{serial_text.strip()}"
        self._model = f"{token.manufacturer_id.strip()} {token.model.strip()}".strip()
        self.limiter = trio.CapacityLimiter(1)
        self._closed = False

    def _acquire(self, module: Path, token_label: str, pin: str) -> _SharedSession:
        """The token's shared logged-in session (opened and logged in on first use)."""
        p11 = self._p11
        digest = hashlib.sha256(pin.encode()).digest()
        with _LIBRARIES_LOCK:
            shared = _SESSIONS.get(self._where)
            if shared is not None:
                if not hmac.compare_digest(shared.pin_digest, digest):
                    raise ConfigurationError(
                        f"PKCS#11 token {token_label!r} is logged in with another PIN; a new "
                        "PIN takes effect at the next start"
                    )
                shared.users += 1
                return shared
            try:
                with self._lib_lock:
                    token = self._lib.get_token(token_label=token_label)
                    session = token.open(user_pin=pin)
            except p11.exceptions.NoSuchToken:
                raise ConfigurationError(
                    f"no PKCS#11 token labelled {token_label!r} in {module}"
                ) from None
            except p11.exceptions.MultipleTokensReturned:
                raise ConfigurationError(
                    f"several PKCS#11 tokens are labelled {token_label!r} in {module}"
                ) from None
            except (p11.exceptions.PinIncorrect, p11.exceptions.PinInvalid):
                raise ConfigurationError(f"wrong PIN for PKCS#11 token {token_label!r}") from None
            except p11.exceptions.PKCS11Error as exc:
                raise ConfigurationError(
                    f"cannot open PKCS#11 token {token_label!r}: {type(exc).__name__}"
                ) from None
            shared = _SESSIONS[self._where] = _SharedSession(token, session, digest)
            shared.users = 1
            return shared

    def _release(self) -> None:
        """Let go of the shared session; the last user closes it (which logs out)."""
        with _LIBRARIES_LOCK:
            shared = _SESSIONS.get(self._where)
            if shared is None or shared.session is not self._session:
                return
            shared.users -= 1
            if shared.users > 0:
                return
            del _SESSIONS[self._where]
            with self._lib_lock:
                try:
                    self._session.close()
                except self.error_type:
                    pass

    @property
    def id(self) -> str:
        return self._id

    @property
    def model(self) -> str:
        return self._model

    def find_key(self, label: str) -> Any:
        """The token's AES-256 key labelled ``label`` (see the module docstring's rules).

        Raises:
            ConfigurationError: none, several, or one that breaks the rules.
        """
        p11 = self._p11
        attr = p11.Attribute
        try:
            with self._lib_lock:
                key = self._session.get_key(
                    object_class=p11.ObjectClass.SECRET_KEY,
                    key_type=p11.KeyType.AES,
                    label=label,
                )
                length = key[attr.VALUE_LEN]
                flags = {
                    name: bool(key[getattr(attr, name)])
                    for name in ("ENCRYPT", "DECRYPT", "SENSITIVE", "EXTRACTABLE")
                }
        except p11.exceptions.NoSuchKey:
            raise ConfigurationError(
                f"no AES key labelled {label!r} on PKCS#11 token {self.label!r}"
            ) from None
        except p11.exceptions.MultipleObjectsReturned:
            raise ConfigurationError(
                f"several AES keys are labelled {label!r} on PKCS#11 token {self.label!r}"
            ) from None
        except p11.exceptions.PKCS11Error as exc:
            raise ConfigurationError(
                f"cannot read key {label!r} on PKCS#11 token {self.label!r}: {type(exc).__name__}"
            ) from None
        where = f"key {label!r} on PKCS#11 token {self.label!r}"
        if length != 32:
            raise ConfigurationError(f"{where} is AES-{length * 8}, not AES-256")
        if not (flags["ENCRYPT"] and flags["DECRYPT"]):
            raise ConfigurationError(f"{where} must allow CKA_ENCRYPT and CKA_DECRYPT")
        if not flags["SENSITIVE"] or flags["EXTRACTABLE"]:
            raise ConfigurationError(
                f"{where} must be sensitive and not extractable (the key must never leave "
                "the token)"
            )
        return key

    async def call(self, fn: Callable[[], _T]) -> _T:
        """Run ``fn`` (a token call) in a worker thread, one at a time per token and library.
        Cancellable: an abandoned call finishes in its thread (the token stays busy until)."""

        def locked() -> _T:
            with self._lib_lock:
                return fn()

        return await trio.to_thread.run_sync(locked, limiter=self.limiter, abandon_on_cancel=True)

    def _gcm(self, iv: bytes, aad: bytes) -> Any:
        return self._p11.mechanisms.GCMParams(iv, aad or None, TAG_SIZE * 8)

    def encrypt(self, key: Any, plaintext: bytes, aad: bytes) -> tuple[bytes, bytes, bytes]:
        """(Blocking.) ``(iv, ciphertext, tag)`` under a token-made IV."""
        iv = self._session.generate_random(IV_BYTES * 8)
        out = key.encrypt(
            plaintext, mechanism=self._p11.Mechanism.AES_GCM, mechanism_param=self._gcm(iv, aad)
        )
        if len(out) != len(plaintext) + TAG_SIZE:
            raise self._p11.exceptions.GeneralError("unexpected AES-GCM output length")
        return iv, out[:-TAG_SIZE], out[-TAG_SIZE:]

    def decrypt(self, key: Any, iv: bytes, ciphertext: bytes, tag: bytes, aad: bytes) -> bytes:
        """(Blocking.) Inverse of :meth:`encrypt`."""
        return bytes(
            key.decrypt(
                ciphertext + tag,
                mechanism=self._p11.Mechanism.AES_GCM,
                mechanism_param=self._gcm(iv, aad),
            )
        )

    def _round_trip(self) -> bool:
        """(Blocking.) AES-GCM on a fresh session key (never stored, never a KMS key)."""
        p11 = self._p11
        key = self._session.generate_key(p11.KeyType.AES, 256, store=False)
        try:
            probe = self._session.generate_random(128)
            iv, ct, tag = self.encrypt(key, probe, b"health")
            return bool(self.decrypt(key, iv, ct, tag, b"health") == probe)
        finally:
            key.destroy()

    async def check_health(self) -> str:
        if self._closed:
            return "UNAVAILABLE"
        try:
            return "ACTIVE" if await self.call(self._round_trip) else "UNAVAILABLE"
        except self._p11.exceptions.PKCS11Error:
            return "UNAVAILABLE"

    async def aclose(self) -> None:
        """Let go of the session once this object's call in flight (if any) has ended. A hung
        token keeps this waiting: callers bound it in time."""
        if self._closed:
            return
        self._closed = True
        async with self.limiter:  # no call of ours is running in the token after this
            await trio.to_thread.run_sync(self._release, abandon_on_cancel=True)

    def close_now(self) -> None:
        """Let go of the session from synchronous code (a configuration that failed to load)."""
        if not self._closed:
            self._closed = True
            self._release()


#: Errors that say the data was wrong (decrypt): an invalid ciphertext, not a broken token.
_DATA_ERRORS = (
    "GeneralError",
    "EncryptedDataInvalid",
    "EncryptedDataLenRange",
    "DataInvalid",
    "DataLenRange",
    "ArgumentsBad",
    "MechanismParamInvalid",
)


class Pkcs11KeyBacking:
    """An AES-256 key inside a PKCS#11 token."""

    def __init__(self, token: Pkcs11Token, key_label: str) -> None:
        self._token = token
        self._label = key_label
        self._key = token.find_key(key_label)

    @property
    def manager(self) -> Pkcs11Token:
        return self._token

    @property
    def description(self) -> str:
        return f"pkcs11 token {self._token.label!r} key {self._label!r}"

    def __repr__(self) -> str:
        return f"Pkcs11KeyBacking({self._token.label!r}, {self._label!r})"

    async def encrypt(self, plaintext: bytes, aad: bytes) -> tuple[bytes, bytes, bytes]:
        try:
            return await self._token.call(lambda: self._token.encrypt(self._key, plaintext, aad))
        except self._token.error_type as exc:
            raise InternalError(reason=f"token encrypt failed: {type(exc).__name__}") from None

    async def decrypt(self, iv: bytes, ciphertext: bytes, tag: bytes, aad: bytes) -> bytes:
        require_own_iv(iv)
        try:
            return await self._token.call(
                lambda: self._token.decrypt(self._key, iv, ciphertext, tag, aad)
            )
        except self._token.error_type as exc:
            if type(exc).__name__ in _DATA_ERRORS:
                reason = f"token refused: {type(exc).__name__}"
                raise InvalidCiphertextError(reason=reason) from None
            raise InternalError(reason=f"token decrypt failed: {type(exc).__name__}") from None
