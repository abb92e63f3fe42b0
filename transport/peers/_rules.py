"""The relay's allowlist: which enclave may reach which port of which other enclave (pure).

A rule reads ``FROM=TO:PORT``. ``FROM`` and ``TO`` are a CID (digits) or an enclave name; a name
stands for every running enclave of that name: the name itself and the de-duplicated names the
runtime gives further enclaves started under it (``worker``, ``worker_1``, ``worker_2``...), so
one rule covers every replica of a group. ``PORT`` is the vsock port on ``TO``. There are no
wildcards and no default: what no rule allows is refused (and the relay logs it).

Examples: ``front=model:5005`` (any front replica may call any model replica's port 5005),
``worker=worker:6000`` (training workers reach each other), ``17=18:5005`` (by CID).

Identities come from the runtime, never from the enclave's bytes: the relay learns the source
CID from the fabric (``transport.fabric.origin``) and every name from the runtime's records.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Final

from transport.errors import ConfigurationError
from transport.fabric.addressing import MAX_ENCLAVE_CID, MIN_ENCLAVE_CID, U32_MAX

__all__ = [
    "EnclaveEntry",
    "EnclaveRef",
    "RelayRule",
    "RelayPolicy",
    "in_group",
    "parse_rule",
    "MAX_RULES",
]

#: Most rules one relay takes (an allowlist, not a database).
MAX_RULES: Final = 1024


def in_group(group: str, name: str) -> bool:
    """True if ``name`` is ``group`` or one of its de-duplicated names (``group_<n>``): the
    runtime names the enclaves started under one name so (replicas of one image)."""
    if name == group:
        return True
    prefix = group + "_"
    return name.startswith(prefix) and name[len(prefix) :].isdecimal()


@dataclass(frozen=True, slots=True)
class EnclaveEntry:
    """A running enclave as the runtime knows it: its CID and name (None if unknown)."""

    cid: int
    name: str | None


@dataclass(frozen=True, slots=True)
class EnclaveRef:
    """One side of a rule: exactly one of a CID or a (group) name."""

    cid: int | None = None
    name: str | None = None

    def __post_init__(self) -> None:
        if (self.cid is None) == (self.name is None):
            raise ConfigurationError("an enclave is named by exactly one of a CID or a name")
        if self.cid is not None and not MIN_ENCLAVE_CID <= self.cid <= MAX_ENCLAVE_CID:
            raise ConfigurationError(f"{self.cid} is not an enclave CID (4..4294967294)")
        if self.name is not None and (not self.name or not self.name.isprintable()):
            raise ConfigurationError(f"bad enclave name {self.name!r}")

    @classmethod
    def parse(cls, text: str) -> EnclaveRef:
        """Digits: a CID; anything else: a name."""
        text = text.strip()
        if text.isascii() and text.isdecimal():
            return cls(cid=int(text))
        return cls(name=text)

    def matches(self, entry: EnclaveEntry) -> bool:
        """True if this side of a rule names ``entry``."""
        if self.cid is not None:
            return entry.cid == self.cid
        assert self.name is not None
        return entry.name is not None and in_group(self.name, entry.name)

    def __str__(self) -> str:
        return str(self.cid) if self.cid is not None else str(self.name)


@dataclass(frozen=True, slots=True)
class RelayRule:
    """``source`` may connect to port ``port`` of ``target``."""

    source: EnclaveRef
    target: EnclaveRef
    port: int

    def __post_init__(self) -> None:
        if not 0 <= self.port < U32_MAX:
            raise ConfigurationError(f"port {self.port} is out of range 0..{U32_MAX - 1}")

    def allows(self, source: EnclaveEntry, target: EnclaveEntry, port: int) -> bool:
        """True if this rule lets ``source`` reach ``port`` of ``target``."""
        return port == self.port and self.source.matches(source) and self.target.matches(target)

    def __str__(self) -> str:
        return f"{self.source}={self.target}:{self.port}"


def parse_rule(text: str) -> RelayRule:
    """``FROM=TO:PORT`` -> :class:`RelayRule`.

    Raises:
        ConfigurationError: not of that form, or a bad CID, name or port (the message says
            which).
    """
    source, eq, rest = text.partition("=")
    target, colon, port_text = rest.rpartition(":")
    if not eq or not colon or not source.strip() or not target.strip():
        raise ConfigurationError(
            f"relay rule {text!r}: expected FROM=TO:PORT (e.g. front=model:5005)"
        )
    port_text = port_text.strip()
    if not port_text.isascii() or not port_text.isdecimal():
        raise ConfigurationError(f"relay rule {text!r}: the port must be a number")
    try:
        return RelayRule(EnclaveRef.parse(source), EnclaveRef.parse(target), int(port_text))
    except ConfigurationError as exc:
        raise ConfigurationError(f"relay rule {text!r}: {exc}") from None


class RelayPolicy:
    """An allowlist of :class:`RelayRule` (see the module docstring).

    Raises:
        ConfigurationError: more than :data:`MAX_RULES` rules.
    """

    def __init__(self, rules: Iterable[RelayRule | str]) -> None:
        parsed = tuple(r if isinstance(r, RelayRule) else parse_rule(r) for r in rules)
        if len(parsed) > MAX_RULES:
            raise ConfigurationError(f"at most {MAX_RULES} relay rules")
        self.rules = parsed

    def allowing(self, source: EnclaveEntry, target: EnclaveEntry, port: int) -> RelayRule | None:
        """The first rule that lets ``source`` reach ``port`` of ``target``, else None."""
        for rule in self.rules:
            if rule.allows(source, target, port):
                return rule
        return None

    def names_target(self, source: EnclaveEntry, name: str, port: int) -> bool:
        """True if some rule of ``source`` for ``port`` names enclaves called ``name``: a
        request for such a name that finds no enclave is "not found", any other "denied"
        (so a denied enclave learns nothing about which enclaves run)."""
        probe = EnclaveEntry(cid=0, name=name)
        return any(
            rule.port == port and rule.source.matches(source) and rule.target.matches(probe)
            for rule in self.rules
        )

    def __len__(self) -> int:
        return len(self.rules)
