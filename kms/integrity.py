"""The master key and the integrity of the state at rest (pure).

Theory of operation. Everything the daemon keeps on disk is either encrypted or authenticated
under keys derived from the one master key, which never touches the database or the audit log:

* key material: AES-256-GCM under the **wrap** subkey, the key id and version as AAD;
* each key record (metadata JSON and policy text) and each alias row: an HMAC-SHA256 tag under
  the **record** subkey, stored beside the row and checked when the daemon loads it;
* the audit log: each line's ``mac`` is an HMAC-SHA256 under the **audit** subkey over the
  previous line's ``mac`` and this line's canonical JSON (see :mod:`kms.audit`).

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

import json
import struct

from . import _wrap
from .errors import CiphertextFormatError

__all__ = [
    "MasterKey",
    "LABEL_WRAP",
    "LABEL_RECORD_MAC",
    "LABEL_AUDIT_MAC",
    "GENESIS_MAC",
]

#: HKDF info labels, one per purpose (changing one invalidates every stored value of that kind).
LABEL_WRAP = b"enclave-kms/v2/key-material-wrap"
LABEL_RECORD_MAC = b"enclave-kms/v2/record-mac"
LABEL_AUDIT_MAC = b"enclave-kms/v2/audit-chain-mac"
#: ``prev`` of the first line of an audit chain.
GENESIS_MAC = "0" * 64

_WRAP_AAD = b"enclave-kms/key-material/v1\x00"
_MASTER_CHECK_AAD = b"enclave-kms/master-check/v1"
_MASTER_CHECK = b"enclave-kms master key check"


def _canonical(value: object) -> bytes:
    """One unambiguous encoding of a tuple of strings/numbers (JSON array, sorted keys)."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


class MasterKey:
    """The master key: wraps key material and authenticates state rows and audit lines.

    Args:
        key: the 32-byte master key (``master.key`` or ``ENCLAVE_KMS_MASTER_KEY``).
    """

    __slots__ = ("_audit", "_legacy", "_records", "_wrap")

    def __init__(self, key: bytes) -> None:
        self._wrap = _wrap.Aead(_wrap.derive_subkey(key, LABEL_WRAP))
        self._records = _wrap.Mac(_wrap.derive_subkey(key, LABEL_RECORD_MAC))
        self._audit = _wrap.Mac(_wrap.derive_subkey(key, LABEL_AUDIT_MAC))
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
