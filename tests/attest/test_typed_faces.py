"""The attest face's typed shapes (issue 11, "Typed faces"): ``describe_nsm`` answers an
:class:`NsmDescription`, ``LocalCA.load_or_create`` takes :class:`CAOptions`, and the policy
parsers take ``Mapping[str, object]`` documents, checking every value."""

from __future__ import annotations

import dataclasses
import json
import typing
from datetime import UTC, datetime
from pathlib import Path

import pytest

import attest
from attest import CAOptions, InProcessNsm, LocalCA, MeasurementSet, NsmDescription, Policy
from attest.ca import CAConfig
from transport.errors import ConfigurationError

from .helpers import pcr

PCR0 = "ab" * 48


def test_the_shapes_are_on_the_faces() -> None:
    for name in ("NsmDescription", "CAOptions"):
        assert name in attest.__all__
    assert "NsmDescription" in attest.nsm.__all__


async def test_describe_nsm_answers_exactly_the_typed_dict(local_ca: LocalCA) -> None:
    nsm = InProcessNsm.create(local_ca, pcrs={0: pcr(1), 1: pcr(2), 2: pcr(3)})
    info = await nsm.describe_nsm()
    assert list(info) == list(typing.get_type_hints(NsmDescription))
    # the JSON a caller would print: the values and their order pinned
    assert json.dumps(info) == json.dumps(
        {
            "version_major": info["version_major"],
            "version_minor": info["version_minor"],
            "version_patch": info["version_patch"],
            "module_id": info["module_id"],
            "max_pcrs": 32,
            "locked_pcrs": list(range(16)),
            "digest": "SHA384",
        }
    )
    assert isinstance(info["module_id"], str)
    assert info["module_id"]
    await nsm.aclose()


def test_ca_options_name_exactly_the_config_fields() -> None:
    assert set(typing.get_type_hints(CAOptions)) == {f.name for f in dataclasses.fields(CAConfig)}
    assert CAOptions.__required_keys__ == frozenset()  # every option has CAConfig's default


def test_ca_options_reach_the_config(tmp_path: Path) -> None:
    options: CAOptions = {"region": "eu-test-1", "leaf_validity_s": 600.0}
    ca = LocalCA.load_or_create(tmp_path / "ca", **options)
    assert ca.config.region == "eu-test-1"
    assert ca.config.leaf_validity_s == 600.0
    with pytest.raises(ConfigurationError, match="unknown CA settings"):
        LocalCA.load_or_create(tmp_path / "ca", colour="blue")  # type: ignore[call-arg]


@pytest.mark.parametrize(
    "mapping",
    [
        {"pcrs": {"0": PCR0}, "not_before": 5},
        {"pcrs": {"0": PCR0}, "not_after": ["2026-01-01T00:00:00Z"]},
        {"pcrs": {"0": 48}},
        {"pcrs": [PCR0]},
        {"pcrs": {"0": PCR0}, "colour": "blue"},
    ],
)
def test_measurement_set_rejects_values_of_the_wrong_type(mapping: dict[str, object]) -> None:
    with pytest.raises(ConfigurationError):
        MeasurementSet.from_mapping(mapping)


def test_measurement_set_parses_times_from_the_document() -> None:
    mset = MeasurementSet.from_mapping(
        {"pcrs": {"PCR0": PCR0}, "not_before": "2026-01-01T00:00:00Z", "not_after": None}
    )
    assert mset.not_before == datetime(2026, 1, 1, tzinfo=UTC)
    assert mset.not_after is None
    assert mset.pcrs == {0: bytes.fromhex(PCR0)}
    # a TOML document carries datetimes already parsed
    at = datetime(2027, 1, 1, tzinfo=UTC)
    assert MeasurementSet.from_mapping({"pcrs": {"0": PCR0}, "not_after": at}).not_after == at


@pytest.mark.parametrize(
    "mapping",
    [
        {"measurements": {"pcrs": {"0": PCR0}}},
        {"measurements": ["not a map"]},
        {"any_measurement": 1},
        {"allow_debug": None},
        {"max_age_s": "300"},
        {"nonce": 7},
    ],
)
def test_policy_rejects_values_of_the_wrong_type(mapping: dict[str, object]) -> None:
    with pytest.raises(ConfigurationError):
        Policy.from_mapping(mapping)


def test_policy_flags_come_through() -> None:
    policy = Policy.from_mapping({"allow_debug": True, "any_measurement": True, "max_age_s": 30})
    assert policy.allow_debug is True
    assert policy.any_measurement is True
    assert policy.max_age_s == 30.0
    assert Policy.from_mapping({}).allow_debug is False


@pytest.mark.parametrize(
    "settings",
    [
        {"organizational_unit": 5},  # was accepted, then failed inside x509
        {"organizational_unit": ""},
        {"backdate_s": "60"},  # was a TypeError from the comparison
        {"backdate_s": -1.0},
        {"root_validity_s": True},  # a bool is not one second
        {"leaf_validity_s": None},
        {"clock": 5},
        {"region": ["local-1"]},
        {"no_such_setting": 1},
    ],
)
def test_ca_config_from_mapping_refuses_wrong_values(settings: dict[str, object]) -> None:
    with pytest.raises(ConfigurationError):
        CAConfig.from_mapping(settings)


def test_ca_config_from_mapping_takes_good_values() -> None:
    config = CAConfig.from_mapping({"region": "eu-test-1", "backdate_s": 0, "leaf_validity_s": 60})
    assert (config.region, config.backdate_s, config.leaf_validity_s) == ("eu-test-1", 0, 60)
