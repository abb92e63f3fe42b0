"""The master key and the integrity of the state at rest (pure).

Theory of operation. Everything the daemon keeps on disk is either encrypted or authenticated
under keys derived from the one master key, which never touches the database or the audit log:

* key material: AES-256-GCM under the **wrap** subkey, the key id and version as AAD;
* each key record (metadata JSON and policy text) and each alias row: an HMAC-SHA256 tag under
  the **record** subkey, stored beside the row and checked when the daemon loads it;
* the audit log: each line's ``mac`` is an HMAC-SHA256 under the **audit** subkey over the
  previous line's ``mac`` and this line's canonical JSON (see :mod:`kms.audit`);
* each grant row: an HMAC-SHA256 tag under the **record** subkey, like key records;
* each custom key store row: the secret of its XKS proxy credential is AES-256-GCM under the
  **wrap** subkey (its own associated-data label and the store id, so it can never be opened
  as key material or as another store's secret), and the record (name, proxy URI, access key
  id, connection state) with the wrapped secret carries an HMAC-SHA256 tag under the
  **record** subkey;
* what the daemon hands out and takes back later without storing it: grant tokens (an
  HMAC-SHA256 under the **grant-token** subkey over the grant id and a fresh nonce) and import
  tokens (the BYOK wrapping private key, AES-256-GCM under the **import-token** subkey with the
  key id, algorithm and expiry as associated data).

The subkeys come from HKDF-SHA256 with one label per purpose, so no key serves two algorithms.
Someone who can write the state directory but does not hold the master key can therefore not
forge a row or a line: an edited policy, a re-enabled key or a rewritten ``deny`` is refused at
load (the key is quarantined, the audit chain is reported broken). What a MAC cannot show is a
*replay*: an older authentic row of the same key put back, or lines cut from the end of the
log. The README says so.

Schema 1 (before this module) wrapped material with the master key itself and kept no tags:
:meth:`MasterKey.unwrap_legacy` and :meth:`MasterKey.matches_legacy` read it once, when the
service migrates a state directory forward.
"""

from __future__ import annotations

import base64
import binascii
import json
import struct
from dataclasses import dataclass

from . import _wrap
from .errors import CiphertextFormatError

__all__ = [
    "MasterKey",
    "ImportToken",
    "LABEL_WRAP",
    "LABEL_RECORD_MAC",
    "LABEL_AUDIT_MAC",
    "GENESIS_MAC",
]

#: HKDF info labels, one per purpose (changing one invalidates every stored value of that kind).
LABEL_WRAP = b"enclave-kms/v2/key-material-wrap"
LABEL_RECORD_MAC = b"enclave-kms/v2/record-mac"
LABEL_AUDIT_MAC = b"enclave-kms/v2/audit-chain-mac"
LABEL_GRANT_TOKEN = b"enclave-kms/v3/grant-token-mac"
LABEL_IMPORT_TOKEN = b"enclave-kms/v3/import-token-seal"
#: ``prev`` of the first line of an audit chain.
GENESIS_MAC = "0" * 64

_WRAP_AAD = b"enclave-kms/key-material/v1\x00"
#: A custom key store's proxy secret: a label of its own under the same wrap subkey (the two
#: associated-data prefixes differ, so one kind of wrapped value can never open as the other).
_STORE_SECRET_AAD = b"enclave-kms/xks-proxy-credential/v1\x00"
_MASTER_CHECK_AAD = b"enclave-kms/master-check/v1"
_MASTER_CHECK = b"enclave-kms master key check"
_GRANT_TOKEN_VERSION = 1
#: Grant ids are 32 random bytes (64 hex digits, as AWS's); tokens add a 16-byte nonce so each
#: CreateGrant answer carries a token of its own, and a 32-byte tag.
_GRANT_ID_BYTES = 32
_GRANT_NONCE_BYTES = 16
_GRANT_TOKEN_BYTES = 1 + _GRANT_ID_BYTES + _GRANT_NONCE_BYTES + _wrap.Mac.TAG_BYTES
_IMPORT_TOKEN_VERSION = 1
_IMPORT_AAD = b"enclave-kms/import-token/v1\x00"
#: An import token's clear header is a few hundred bytes at most; refuse more before parsing.
_MAX_IMPORT_HEADER = 1024


@dataclass(frozen=True, slots=True)
class ImportToken:
    """What an import token carries: for which key, algorithm and wrapping key spec it was
    issued, until when (epoch seconds), and the wrapping private key (PKCS#8 DER)."""

    key_id: str
    algorithm: str
    wrapping_spec: str
    valid_to: float
    private_der: bytes

    def header(self) -> bytes:
        """The clear, authenticated part of the token."""
        return _canonical([self.key_id, self.algorithm, self.wrapping_spec, self.valid_to])


def _canonical(value: object) -> bytes:
    """One unambiguous encoding of a tuple of strings/numbers (JSON array, sorted keys)."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


class MasterKey:
    """The master key: wraps key material and authenticates state rows and audit lines.

    Args:
        key: the 32-byte master key (``master.key`` or ``ENCLAVE_KMS_MASTER_KEY``).
    """

    __slots__ = ("_audit", "_grant_tokens", "_import_tokens", "_legacy", "_records", "_wrap")

    def __init__(self, key: bytes) -> None:
        self._wrap = _wrap.Aead(_wrap.derive_subkey(key, LABEL_WRAP))
        self._records = _wrap.Mac(_wrap.derive_subkey(key, LABEL_RECORD_MAC))
        self._audit = _wrap.Mac(_wrap.derive_subkey(key, LABEL_AUDIT_MAC))
        self._grant_tokens = _wrap.Mac(_wrap.derive_subkey(key, LABEL_GRANT_TOKEN))
        self._import_tokens = _wrap.Aead(_wrap.derive_subkey(key, LABEL_IMPORT_TOKEN))
        # Schema 1 used the master key itself as the wrapping key; kept to migrate forward.
        self._legacy = _wrap.Aead(key)

    # ------------------------------------------------------------ key material

    @staticmethod
    def _aad(key_id: str, version: int) -> bytes:
        return _WRAP_AAD + key_id.encode() + b"\x00" + struct.pack(">I", version)

    def wrap(self, key_id: str, version: int, material: bytes) -> bytes:
        """Encrypt key material for storage, bound to its key id and version."""
        return self._wrap.seal(material, self._aad(key_id, version))

    def unwrap(self, key_id: str, version: int, wrapped: bytes) -> bytes:
        """Inverse of :meth:`wrap`; CiphertextFormatError if tampered or mislabelled."""
        return self._wrap.open(wrapped, self._aad(key_id, version))

    def unwrap_legacy(self, key_id: str, version: int, wrapped: bytes) -> bytes:
        """Open material wrapped by a schema-1 daemon (migration only)."""
        return self._legacy.open(wrapped, self._aad(key_id, version))

    def check_value(self) -> bytes:
        """A value stored beside the keys to recognise this master key at the next start."""
        return self._wrap.seal(_MASTER_CHECK, _MASTER_CHECK_AAD)

    def matches(self, check: bytes) -> bool:
        """True if ``check`` was made by :meth:`check_value` with this master key."""
        return self._opens(self._wrap, check)

    def matches_legacy(self, check: bytes) -> bool:
        """True if ``check`` is a schema-1 check value of this master key."""
        return self._opens(self._legacy, check)

    @staticmethod
    def _opens(aead: _wrap.Aead, check: bytes) -> bool:
        try:
            return aead.open(check, _MASTER_CHECK_AAD) == _MASTER_CHECK
        except CiphertextFormatError:
            return False

    # ------------------------------------------------------------ rows

    def key_record_tag(self, key_id: str, meta: str, policy: str) -> bytes:
        """The tag of one key record (its metadata JSON text and its policy text)."""
        return self._records.tag(_canonical(["key", key_id, meta, policy]))

    def key_record_ok(self, key_id: str, meta: str, policy: str, tag: bytes) -> bool:
        """True if ``tag`` authenticates this key record (constant time)."""
        return self._records.verify(_canonical(["key", key_id, meta, policy]), tag)

    def alias_tag(self, name: str, key_id: str, created: float, updated: float) -> bytes:
        """The tag of one alias row."""
        return self._records.tag(_canonical(["alias", name, key_id, created, updated]))

    def alias_ok(self, name: str, key_id: str, created: float, updated: float, tag: bytes) -> bool:
        """True if ``tag`` authenticates this alias row (constant time)."""
        return self._records.verify(_canonical(["alias", name, key_id, created, updated]), tag)

    def grant_tag(self, grant_id: str, key_id: str, record: str) -> bytes:
        """The tag of one grant row."""
        return self._records.tag(_canonical(["grant", grant_id, key_id, record]))

    def grant_ok(self, grant_id: str, key_id: str, record: str, tag: bytes) -> bool:
        """True if ``tag`` authenticates this grant row (constant time)."""
        return self._records.verify(_canonical(["grant", grant_id, key_id, record]), tag)

    def key_store_tag(self, store_id: str, record: str, secret: bytes) -> bytes:
        """The tag of one custom key store row (its record and its wrapped secret)."""
        return self._records.tag(_canonical(["key-store", store_id, record, secret.hex()]))

    def key_store_ok(self, store_id: str, record: str, secret: bytes, tag: bytes) -> bool:
        """True if ``tag`` authenticates this custom key store row (constant time)."""
        return self._records.verify(_canonical(["key-store", store_id, record, secret.hex()]), tag)

    def wrap_store_secret(self, store_id: str, secret: bytes) -> bytes:
        """Encrypt a custom key store's proxy secret for storage, bound to the store id."""
        return self._wrap.seal(secret, _STORE_SECRET_AAD + store_id.encode())

    def unwrap_store_secret(self, store_id: str, wrapped: bytes) -> bytes:
        """Inverse of :meth:`wrap_store_secret`; CiphertextFormatError if tampered."""
        return self._wrap.open(wrapped, _STORE_SECRET_AAD + store_id.encode())

    # ------------------------------------------------------------ tokens handed out

    def grant_token(self, grant_id: str) -> str:
        """A fresh token for grant ``grant_id`` (64 hex digits): unique per call, unforgeable."""
        raw = bytes([_GRANT_TOKEN_VERSION]) + bytes.fromhex(grant_id)
        raw += _wrap.random_bytes(_GRANT_NONCE_BYTES)
        return base64.urlsafe_b64encode(raw + self._grant_tokens.tag(raw)).decode().rstrip("=")

    def grant_of_token(self, token: str) -> str | None:
        """The grant id a token of :meth:`grant_token` names, or None if it is not one."""
        try:
            raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
        except (binascii.Error, ValueError):
            return None
        if len(raw) != _GRANT_TOKEN_BYTES or raw[0] != _GRANT_TOKEN_VERSION:
            return None
        body, tag = raw[: -_wrap.Mac.TAG_BYTES], raw[-_wrap.Mac.TAG_BYTES :]
        if not self._grant_tokens.verify(body, tag):
            return None
        return body[1 : 1 + _GRANT_ID_BYTES].hex()

    def seal_import_token(self, token: ImportToken) -> bytes:
        """The ImportToken blob: version, clear header, the wrapping key sealed under it."""
        header = token.header()
        sealed = self._import_tokens.seal(token.private_der, _IMPORT_AAD + header)
        return bytes([_IMPORT_TOKEN_VERSION]) + struct.pack(">H", len(header)) + header + sealed

    def open_import_token(self, blob: bytes) -> ImportToken:
        """Inverse of :meth:`seal_import_token`.

        Raises:
            CiphertextFormatError: not a token of this daemon (malformed or not authentic).
        """
        if len(blob) < 3 or blob[0] != _IMPORT_TOKEN_VERSION:
            raise CiphertextFormatError("not an import token")
        (n,) = struct.unpack_from(">H", blob, 1)
        if n > _MAX_IMPORT_HEADER or len(blob) < 3 + n:
            raise CiphertextFormatError("not an import token")
        header = blob[3 : 3 + n]
        private_der = self._import_tokens.open(blob[3 + n :], _IMPORT_AAD + header)
        try:
            key_id, algorithm, spec, valid_to = json.loads(header)
        except (ValueError, TypeError):  # authentic, so only a bug of ours gets here
            raise CiphertextFormatError("not an import token") from None
        return ImportToken(str(key_id), str(algorithm), str(spec), float(valid_to), private_der)

    # ------------------------------------------------------------ audit chain

    def audit_mac(self, prev: str, body: bytes) -> str:
        """The chain MAC of one audit line: hex HMAC over ``prev`` ‖ LF ‖ canonical body."""
        return self._audit.tag(prev.encode() + b"\n" + body).hex()

    def audit_mac_ok(self, prev: str, body: bytes, mac: str) -> bool:
        """True if ``mac`` (hex) is the chain MAC of this line (constant time)."""
        try:
            tag = bytes.fromhex(mac)
        except ValueError:
            return False
        return self._audit.verify(prev.encode() + b"\n" + body, tag)
