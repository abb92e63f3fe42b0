"""The keys of one configuration with their backings opened (files read, tokens logged in).

Loading blocks (file reads, PKCS#11 logins): callers run :meth:`Keyring.load` in a worker
thread. A load either succeeds whole or opens nothing (tokens opened before a failure are
closed again), so a reload never leaves half a configuration in place.
"""

from __future__ import annotations

from dataclasses import dataclass

import trio

from transport.errors import ConfigurationError

from .backing import FileKeyBacking, FileKeyManager, KeyBacking, KeyManager
from .config import FileBackingSpec, Pkcs11BackingSpec, XksKeyConfig, XksProxyConfig

__all__ = ["LoadedKey", "Keyring"]

#: Bound on closing a replaced keyring (a hung token must not hold a task forever).
CLOSE_TIMEOUT_S = 30.0


@dataclass(frozen=True, slots=True)
class LoadedKey:
    """A configured key and its opened backing."""

    config: XksKeyConfig
    backing: KeyBacking


class Keyring:
    """Keys by external key id, and the key managers they live in."""

    def __init__(self, keys: dict[str, LoadedKey], managers: list[KeyManager]) -> None:
        self._keys = keys
        self.managers = managers

    @classmethod
    def load(cls, config: XksProxyConfig) -> Keyring:
        """Open every key of ``config`` (blocking).

        Raises:
            ConfigurationError: a key file or token key is unusable (named in the message).
        """
        from .pkcs11_backing import Pkcs11KeyBacking, Pkcs11Token

        files = FileKeyManager()
        tokens: dict[tuple[str, str], tuple[Pkcs11Token, str]] = {}
        keys: dict[str, LoadedKey] = {}
        try:
            for key in config.keys:
                spec = key.backing
                backing: KeyBacking
                if isinstance(spec, FileBackingSpec):
                    backing = FileKeyBacking.load(spec.path, files)
                else:
                    assert isinstance(spec, Pkcs11BackingSpec)
                    where = (str(spec.module), spec.token_label)
                    if where not in tokens:
                        token = Pkcs11Token(spec.module, spec.token_label, spec.pin)
                        tokens[where] = (token, spec.pin)
                    token, pin = tokens[where]
                    if pin != spec.pin:
                        raise ConfigurationError(
                            f"keys on token {spec.token_label!r} are given different PINs"
                        )
                    backing = Pkcs11KeyBacking(token, spec.key_label)
                keys[key.key_id] = LoadedKey(key, backing)
        except BaseException:
            for token, _ in tokens.values():
                token.close_now()
            raise
        managers: list[KeyManager] = []
        if any(isinstance(k.backing, FileBackingSpec) for k in config.keys):
            managers.append(files)
        managers.extend(token for token, _ in tokens.values())
        if not managers:  # no keys at all: report the (empty) key-file store
            managers.append(files)
        return cls(keys, managers)

    def get(self, key_id: str) -> LoadedKey | None:
        """The key with this external key id, if configured."""
        return self._keys.get(key_id)

    async def aclose(self) -> None:
        """Close every key manager (after its calls in flight), within :data:`CLOSE_TIMEOUT_S`."""
        with trio.move_on_after(CLOSE_TIMEOUT_S):
            for manager in self.managers:
                await manager.aclose()
