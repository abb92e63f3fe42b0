"""Relying-party policy for verified documents (nitro.md §4.4 step 5), pure.

A :class:`Policy` accepts a document when *all* hold:

* **measurements**: some :class:`MeasurementSet` matches: every PCR it names equals the document's
  value (constant-time compare) and the verification time is inside its optional
  ``[not_before, not_after]`` window (for rotating images). ``any_measurement=True`` skips this
  check; a policy with no sets and ``any_measurement=False`` rejects everything (fail closed).
* **debug**: debug-mode documents (PCR0/1/2 zero) are rejected unless ``allow_debug``.
* **max_age_s**: the document's timestamp is at most this old (and not from the future beyond
  :data:`MAX_CLOCK_SKEW_S`).
* **nonce**: when set, the document's ``nonce`` equals it.

File format (JSON, or TOML with the same keys; unknown keys are errors)::

    {
      "measurements": [
        {"pcrs": {"0": "<96 hex>", "8": "<96 hex>"},
         "not_before": "2026-01-01T00:00:00Z", "not_after": null}
      ],
      "allow_debug": false,
      "max_age_s": 300,
      "nonce": null,
      "any_measurement": false
    }

PCR keys may be written ``"0"`` or ``"PCR0"``; values are hex (upper or lower case).
"""

from __future__ import annotations

import hmac
import json
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from types import MappingProxyType
from typing import Final

from attest.document import AttestationDocument
from transport.errors import ConfigurationError

__all__ = ["MAX_CLOCK_SKEW_S", "MeasurementSet", "Policy", "PolicyCheck"]

#: How far in the future a document's timestamp may be when ``max_age_s`` is enforced
#: (seconds): clocks of the NSM host and the verifier may differ slightly.
MAX_CLOCK_SKEW_S: Final = 60.0
#: Largest PCR index + 1 (the NSM has 32).
_MAX_PCRS: Final = 32
_PCR_LENGTHS: Final = frozenset({32, 48, 64})


@dataclass(frozen=True, slots=True)
class PolicyCheck:
    """Outcome of one policy check: ``name`` ∈ measurements/debug/max_age/nonce."""

    name: str
    ok: bool
    detail: str


def _parse_time(value: object, what: str) -> datetime | None:
    if value is None:
        return None
    if isinstance(value, datetime):
        dt = value
    elif isinstance(value, str):
        try:
            dt = datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError as exc:
            raise ConfigurationError(f"{what}: not an ISO 8601 time: {value!r}") from exc
    else:
        raise ConfigurationError(f"{what}: must be an ISO 8601 string")
    if dt.tzinfo is None:
        raise ConfigurationError(f"{what}: time must carry a timezone (e.g. 'Z')")
    return dt


def _parse_hex(value: object, what: str) -> bytes:
    if isinstance(value, bytes):
        return value
    if not isinstance(value, str):
        raise ConfigurationError(f"{what}: must be a hex string")
    try:
        return bytes.fromhex(value)
    except ValueError as exc:
        raise ConfigurationError(f"{what}: not valid hex") from exc


def _parse_index(key: object) -> int:
    text = str(key)
    if text.upper().startswith("PCR"):
        text = text[3:]
    try:
        index = int(text)
    except ValueError as exc:
        raise ConfigurationError(f"PCR key {key!r} is not an index") from exc
    if not 0 <= index < _MAX_PCRS:
        raise ConfigurationError(f"PCR index {index} is out of range 0..31")
    return index


@dataclass(frozen=True)
class MeasurementSet:
    """One allowed combination of PCR values, optionally valid only in a time window."""

    pcrs: Mapping[int, bytes]
    not_before: datetime | None = None
    not_after: datetime | None = None

    def __post_init__(self) -> None:
        if not self.pcrs:
            raise ConfigurationError("a measurement set must name at least one PCR")
        clean: dict[int, bytes] = {}
        for key, value in self.pcrs.items():
            index = _parse_index(key)
            raw = _parse_hex(value, f"PCR{index}")
            if len(raw) not in _PCR_LENGTHS:
                raise ConfigurationError(f"PCR{index} must be 32, 48 or 64 bytes")
            clean[index] = raw
        object.__setattr__(self, "pcrs", MappingProxyType(dict(sorted(clean.items()))))
        for name in ("not_before", "not_after"):
            object.__setattr__(self, name, _parse_time(getattr(self, name), name))
        if self.not_before and self.not_after and self.not_before > self.not_after:
            raise ConfigurationError("measurement set not_before is after not_after")

    @classmethod
    def from_mapping(cls, m: Mapping[str, object]) -> MeasurementSet:
        """Build from the policy file format's map (``pcrs``: index or ``"PCRn"`` -> hex;
        optional ISO 8601 ``not_before``/``not_after``); bad input is a ConfigurationError."""
        unknown = set(m) - {"pcrs", "not_before", "not_after"}
        if unknown:
            raise ConfigurationError(f"unknown measurement set keys: {sorted(unknown)}")
        pcrs = m.get("pcrs")
        if not isinstance(pcrs, Mapping):
            raise ConfigurationError("measurement set needs a 'pcrs' map")
        # __post_init__ parses the keys and hex values and checks their lengths
        return cls(
            pcrs,
            _parse_time(m.get("not_before"), "not_before"),
            _parse_time(m.get("not_after"), "not_after"),
        )

    def mismatch(self, doc: AttestationDocument, at: datetime) -> str | None:
        """Why this set does not match ``doc`` at ``at``, or None if it matches."""
        if self.not_before is not None and at < self.not_before:
            return f"not valid before {self.not_before.isoformat()}"
        if self.not_after is not None and at > self.not_after:
            return f"expired at {self.not_after.isoformat()}"
        differ = []
        for index, expected in self.pcrs.items():
            actual = doc.pcrs.get(index)
            if actual is None or not hmac.compare_digest(actual, expected):
                differ.append(f"PCR{index}")
        if differ:
            return f"{', '.join(differ)} differ"
        return None


@dataclass(frozen=True)
class Policy:
    """What a relying party accepts (see the module docstring)."""

    measurements: Sequence[MeasurementSet] = ()
    allow_debug: bool = False
    max_age_s: float | None = None
    nonce: bytes | None = None
    any_measurement: bool = False
    _sets: tuple[MeasurementSet, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        sets = tuple(self.measurements)
        if not all(isinstance(s, MeasurementSet) for s in sets):
            raise ConfigurationError("measurements must be MeasurementSet objects")
        object.__setattr__(self, "measurements", sets)
        object.__setattr__(self, "_sets", sets)
        if self.max_age_s is not None and not (
            isinstance(self.max_age_s, int | float) and self.max_age_s > 0
        ):
            raise ConfigurationError("max_age_s must be a positive number of seconds")

    @classmethod
    def from_mapping(cls, m: Mapping[str, object]) -> Policy:
        """Build from the file format's mapping; unknown keys are a ConfigurationError."""
        known = {"measurements", "allow_debug", "max_age_s", "nonce", "any_measurement"}
        unknown = set(m) - known
        if unknown:
            raise ConfigurationError(f"unknown policy keys: {sorted(unknown)}")
        raw_sets = m.get("measurements", [])
        if not isinstance(raw_sets, list):
            raise ConfigurationError("policy 'measurements' must be a list")
        sets = []
        for item in raw_sets:
            if not isinstance(item, Mapping):
                raise ConfigurationError("each measurement set must be a map")
            sets.append(MeasurementSet.from_mapping(item))
        for flag in ("allow_debug", "any_measurement"):
            if not isinstance(m.get(flag, False), bool):
                raise ConfigurationError(f"policy '{flag}' must be true or false")
        max_age = m.get("max_age_s")
        if max_age is not None and (
            isinstance(max_age, bool) or not isinstance(max_age, int | float)
        ):
            raise ConfigurationError("policy 'max_age_s' must be a number")
        nonce = m.get("nonce")
        return cls(
            measurements=sets,
            allow_debug=m.get("allow_debug", False) is True,
            max_age_s=None if max_age is None else float(max_age),
            nonce=None if nonce is None else _parse_hex(nonce, "nonce"),
            any_measurement=m.get("any_measurement", False) is True,
        )

    @classmethod
    def from_file(cls, path: Path) -> Policy:
        """Load a JSON (``.json`` or anything else) or TOML (``.toml``) policy file."""
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise ConfigurationError(f"cannot read policy file {path}: {exc}") from exc
        try:
            data = tomllib.loads(text) if path.suffix == ".toml" else json.loads(text)
        except (ValueError, tomllib.TOMLDecodeError) as exc:
            raise ConfigurationError(f"policy file {path} is not valid: {exc}") from exc
        if not isinstance(data, Mapping):
            raise ConfigurationError(f"policy file {path} must hold an object/table")
        return cls.from_mapping(data)

    def evaluate(self, doc: AttestationDocument, at: datetime) -> list[PolicyCheck]:
        """Run every check against ``doc`` at time ``at`` (aware) and report each outcome."""
        checks = [self._check_measurements(doc, at)]
        if doc.debug:
            checks.append(
                PolicyCheck(
                    "debug",
                    self.allow_debug,
                    "debug-mode document allowed"
                    if self.allow_debug
                    else "debug-mode document (PCR0/1/2 zero) and debug is not allowed",
                )
            )
        else:
            checks.append(PolicyCheck("debug", True, "production-mode document"))
        if self.max_age_s is not None:
            age = at.timestamp() - doc.timestamp / 1000
            if age > self.max_age_s:
                checks.append(
                    PolicyCheck(
                        "max_age", False, f"document is {age:.3f} s old (max {self.max_age_s} s)"
                    )
                )
            elif age < -MAX_CLOCK_SKEW_S:
                checks.append(
                    PolicyCheck(
                        "max_age", False, f"document timestamp is {-age:.3f} s in the future"
                    )
                )
            else:
                checks.append(PolicyCheck("max_age", True, f"document is {age:.3f} s old"))
        if self.nonce is not None:
            ok = doc.nonce is not None and hmac.compare_digest(doc.nonce, self.nonce)
            checks.append(
                PolicyCheck(
                    "nonce",
                    ok,
                    "nonce matches"
                    if ok
                    else ("document has no nonce" if doc.nonce is None else "nonce does not match"),
                )
            )
        return checks

    def _check_measurements(self, doc: AttestationDocument, at: datetime) -> PolicyCheck:
        if self.any_measurement:
            return PolicyCheck("measurements", True, "any measurement accepted by policy")
        if not self._sets:
            return PolicyCheck(
                "measurements", False, "policy has no measurement sets (fail closed)"
            )
        reasons = []
        for i, mset in enumerate(self._sets):
            why = mset.mismatch(doc, at)
            if why is None:
                return PolicyCheck("measurements", True, f"matches measurement set {i}")
            reasons.append(f"set {i}: {why}")
        return PolicyCheck(
            "measurements", False, "no measurement set matches (" + "; ".join(reasons) + ")"
        )


def now_utc() -> datetime:
    """The current time as an aware UTC datetime."""
    return datetime.now(tz=UTC)
