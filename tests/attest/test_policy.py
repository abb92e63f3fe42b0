"""Policy construction and files (JSON and TOML)."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

import pytest

from attest.policy import MeasurementSet, Policy
from transport.errors import ConfigurationError

PCR0 = "ab" * 48


def test_json_file(tmp_path: Path) -> None:
    path = tmp_path / "policy.json"
    path.write_text(
        json.dumps(
            {
                "measurements": [
                    {
                        "pcrs": {"0": PCR0, "PCR8": "CD" * 48},
                        "not_before": "2026-01-01T00:00:00Z",
                        "not_after": None,
                    },
                ],
                "allow_debug": False,
                "max_age_s": 300,
                "nonce": "0011",
            }
        )
    )
    policy = Policy.from_file(path)
    (mset,) = policy.measurements
    assert mset.pcrs == {0: bytes.fromhex(PCR0), 8: bytes.fromhex("cd" * 48)}
    assert mset.not_before == datetime(2026, 1, 1, tzinfo=UTC)
    assert mset.not_after is None
    assert policy.max_age_s == 300.0
    assert policy.nonce == b"\x00\x11"
    assert not policy.allow_debug


def test_toml_file(tmp_path: Path) -> None:
    path = tmp_path / "policy.toml"
    path.write_text(f'allow_debug = true\n[[measurements]]\npcrs = {{ "2" = "{PCR0}" }}\n')
    policy = Policy.from_file(path)
    assert policy.allow_debug
    assert policy.measurements[0].pcrs == {2: bytes.fromhex(PCR0)}


@pytest.mark.parametrize(
    "mapping",
    [
        {"measurement": []},
        {"measurements": {}},
        {"measurements": [{"pcrs": {"0": PCR0}, "extra": 1}]},
        {"measurements": [{"pcrs": {}}]},
        {"measurements": [{"pcrs": {"32": PCR0}}]},
        {"measurements": [{"pcrs": {"x": PCR0}}]},
        {"measurements": [{"pcrs": {"0": "zz"}}]},
        {"measurements": [{"pcrs": {"0": "ab" * 47}}]},
        {"measurements": [{"pcrs": {"0": PCR0}, "not_before": "2026-01-01T00:00:00"}]},
        {
            "measurements": [
                {
                    "pcrs": {"0": PCR0},
                    "not_before": "2027-01-01T00:00:00Z",
                    "not_after": "2026-01-01T00:00:00Z",
                }
            ]
        },
        {"allow_debug": "yes"},
        {"max_age_s": -1},
        {"max_age_s": True},
        {"nonce": "xyz"},
    ],
)
def test_invalid_policies(mapping: dict[str, object]) -> None:
    with pytest.raises(ConfigurationError):
        Policy.from_mapping(mapping)


def test_unreadable_or_malformed_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError):
        Policy.from_file(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{")
    with pytest.raises(ConfigurationError):
        Policy.from_file(bad)
    arr = tmp_path / "arr.json"
    arr.write_text("[]")
    with pytest.raises(ConfigurationError):
        Policy.from_file(arr)


def test_direct_construction_accepts_bytes() -> None:
    mset = MeasurementSet({0: bytes(48)})
    assert Policy([mset]).measurements == (mset,)
