"""Hypothesis over the new parsers and over the whole service: whatever a peer sends, the answer
is a result or an AWS error of the right kind, never another exception, and the service keeps
serving."""

from __future__ import annotations

import base64
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trio
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from kms import _asym
from kms.api import OPERATIONS, UNSUPPORTED, FieldSpec, validate
from kms.app import KmsApp, build_app
from kms.config import KmsConfig
from kms.errors import CiphertextFormatError, KeyMaterialError, KmsApiError
from kms.integrity import MasterKey
from kms.keyspecs import SPECS
from kms.service import Caller, Outcome

from .helpers import ADMIN

_MASTER = MasterKey(os.urandom(32))


@settings(max_examples=300, deadline=None)
@given(blob=st.binary(max_size=600))
def test_import_token_parser(blob: bytes) -> None:
    with pytest.raises(CiphertextFormatError):
        _MASTER.open_import_token(blob)


@settings(max_examples=300, deadline=None)
@given(
    token=st.text(max_size=200)
    | st.binary(max_size=120).map(lambda b: base64.b64encode(b).decode())
)
def test_grant_token_parser(token: str) -> None:
    assert _MASTER.grant_of_token(token) is None


def test_grant_token_round_trip_and_tamper() -> None:
    grant_id = os.urandom(32).hex()
    token = _MASTER.grant_token(grant_id)
    assert _MASTER.grant_of_token(token) == grant_id
    assert _MASTER.grant_token(grant_id) != token  # a fresh token per CreateGrant answer
    assert MasterKey(os.urandom(32)).grant_of_token(token) is None  # another daemon's key
    flipped = token[:10] + ("A" if token[10] != "A" else "B") + token[11:]
    assert _MASTER.grant_of_token(flipped) is None


_WRAPPING_KEY = _asym.generate_wrapping_key(2048)


@settings(max_examples=100, deadline=None)
@given(
    algorithm=st.sampled_from(
        [
            "RSAES_OAEP_SHA_1",
            "RSAES_OAEP_SHA_256",
            "RSA_AES_KEY_WRAP_SHA_1",
            "RSA_AES_KEY_WRAP_SHA_256",
        ]
    ),
    blob=st.binary(max_size=700),
)
def test_unwrap_import_is_opaque(algorithm: str, blob: bytes) -> None:
    with pytest.raises(CiphertextFormatError):
        _asym.unwrap_import(_WRAPPING_KEY, algorithm, blob)


@settings(max_examples=100, deadline=None)
@given(
    spec=st.sampled_from(["RSA_2048", "ECC_NIST_P256", "ECC_SECG_P256K1", "ECC_NIST_EDWARDS25519"]),
    der=st.binary(max_size=300),
)
def test_material_loader(spec: str, der: bytes) -> None:
    with pytest.raises(KeyMaterialError):
        _asym.AsymmetricKey.load(SPECS[spec], der)


# --- the whole service -------------------------------------------------------------------------

_CALLER = Caller(ADMIN.principal_arn, ADMIN.access_key_id)


@pytest.fixture(scope="module")
def app(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[KmsApp, dict[str, str]]]:
    base: Path = tmp_path_factory.mktemp("fuzz")
    app = build_app(KmsConfig(state_dir=base / "kms", credentials=(ADMIN,)), env={})

    async def make() -> dict[str, str]:
        made: dict[str, str] = {}
        for name, params in {
            "sym": {},
            "rsa_enc": {"KeySpec": "RSA_2048", "KeyUsage": "ENCRYPT_DECRYPT"},
            "rsa_sign": {"KeySpec": "RSA_2048", "KeyUsage": "SIGN_VERIFY"},
            "ec_agree": {"KeySpec": "ECC_NIST_P256", "KeyUsage": "KEY_AGREEMENT"},
            "ed": {"KeySpec": "ECC_NIST_EDWARDS25519"},
            "hmac": {"KeySpec": "HMAC_256"},
            "external": {"Origin": "EXTERNAL"},
        }.items():
            answer = await app.service.handle("CreateKey", params, _CALLER, Outcome())
            made[name] = answer["KeyMetadata"]["KeyId"]
        return made

    keys = trio.run(make)
    try:
        yield app, keys
    finally:
        app.close()


def _member(name: str, spec: FieldSpec, keys: dict[str, str]) -> st.SearchStrategy[Any]:
    """Values shaped like the member (so requests get past validation), with junk mixed in."""
    junk = st.one_of(st.text(max_size=8), st.integers(-3, 3), st.booleans())
    b64 = st.binary(min_size=1, max_size=96).map(lambda b: base64.b64encode(b).decode())
    fitting: st.SearchStrategy[Any]
    if spec.enum is not None and spec.kind == "str":
        fitting = st.sampled_from([e for e in spec.enum if e not in ("RSA_3072", "RSA_4096")])
    elif spec.kind == "enumlist":
        assert spec.enum is not None
        fitting = st.lists(st.sampled_from(spec.enum), min_size=1, max_size=3)
    elif spec.kind == "str" and ("KeyId" in name or name in ("TargetKeyId",)):
        fitting = st.sampled_from([*keys.values(), "alias/fuzz", "arn:aws:kms:x", "nope"])
    elif spec.kind == "str" and "Principal" in name:
        fitting = st.sampled_from([ADMIN.principal_arn, "111122223333", "bad principal"])
    elif spec.kind == "str":
        if spec.min == spec.max == 64:  # KeyMaterialId: 64 hex digits
            fitting = st.binary(min_size=32, max_size=32).map(bytes.hex)
        else:
            fitting = st.text(
                alphabet="abcdefghijklmnopqrstuvwxyz0123456789/_-",
                min_size=spec.min or 0,
                max_size=max(min(spec.max or 20, 20), spec.min or 0),
            )
    elif spec.kind == "blob":
        fitting = b64
    elif spec.kind == "int":
        lo = spec.min or 0
        fitting = st.integers(lo, max(min(spec.max or 64, 64), lo))
    elif spec.kind == "bool":
        fitting = st.booleans()
    elif spec.kind == "map":
        fitting = st.dictionaries(st.text(min_size=1, max_size=4), st.text(max_size=4), max_size=3)
    elif spec.kind == "strlist":
        fitting = st.lists(st.text(min_size=1, max_size=8), max_size=3)
    elif spec.kind == "timestamp":
        fitting = st.floats(0, 4e9, allow_nan=False)
    elif spec.kind == "tags":
        fitting = st.lists(
            st.fixed_dictionaries(
                {"TagKey": st.text(min_size=1, max_size=4), "TagValue": st.text(max_size=4)}
            ),
            max_size=3,
        )
    elif spec.kind == "constraints":
        fitting = st.fixed_dictionaries(
            {},
            optional={
                "EncryptionContextSubset": st.dictionaries(
                    st.text(min_size=1, max_size=3), st.text(max_size=3), max_size=2
                ),
                "EncryptionContextEquals": st.dictionaries(
                    st.text(min_size=1, max_size=3), st.text(max_size=3), max_size=2
                ),
            },
        )
    else:  # recipient: covered by test_recipient
        return st.nothing()
    # Mostly well-formed, to get past validation and reach the service.
    return st.integers(0, 9).flatmap(lambda i: junk if i == 9 else fitting)


@settings(
    max_examples=400,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(data=st.data())
def test_service_answers_or_refuses(
    app: tuple[KmsApp, dict[str, str]], data: st.DataObject
) -> None:
    kms, keys = app
    op = data.draw(st.sampled_from(sorted(set(OPERATIONS) - UNSUPPORTED)))
    doc: dict[str, Any] = {}
    for name, spec in OPERATIONS[op].items():
        if spec.kind != "recipient" and (spec.required or data.draw(st.booleans())):
            doc[name] = data.draw(_member(name, spec, keys))
    try:
        params = validate(op, doc)
    except KmsApiError:
        event("refused by validation")
        return
    outcome = Outcome()
    error: KmsApiError | None = None
    try:
        answer = trio.run(kms.service.handle, op, params, _CALLER, outcome)
    except KmsApiError as exc:
        error = exc
    if error is not None:
        event(f"answered {error.type_name}")
        assert error.status in (400, 500)
        assert error.type_name.endswith("Exception")
        return
    event(f"{op} succeeded")
    json.dumps(answer)  # every answer is JSON
