"""Pure cores: request validation, policies, the ciphertext format, CMS, the audit chain,
configuration and the master key file."""

from __future__ import annotations

import base64
import json
import os
import shutil
import stat
import subprocess
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kms import _wrap, ciphertext, cms
from kms.api import OPERATIONS, parse_request
from kms.app import load_master_key
from kms.audit import AuditLog, verify_audit_log
from kms.config import KmsConfig
from kms.errors import AuditChainError, CiphertextFormatError, KmsApiError, PolicyError
from kms.integrity import MasterKey
from kms.policy import KeyPolicy, RequestContext, default_key_policy
from kms.seed import parse_seed
from transport.errors import ConfigurationError

# ------------------------------------------------------------------ request validation

_json = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**40), 2**40) | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4)
    ),
    max_leaves=12,
)
_member_values = st.one_of(_json, st.sampled_from(["eA==", "AES_256", "alias/x", "", "***"]))


@settings(max_examples=200, deadline=None)
@given(
    op=st.sampled_from(sorted(OPERATIONS)),
    doc=st.dictionaries(
        st.sampled_from([*sorted({m for specs in OPERATIONS.values() for m in specs}), "Junk"]),
        _member_values,
        max_size=6,
    ),
)
def test_validator_total(op: str, doc: dict[str, Any]) -> None:
    """Any JSON object yields validated params or an AWS client error, nothing else."""
    try:
        name, params = parse_request(f"TrentService.{op}", json.dumps(doc).encode())
    except KmsApiError as exc:
        error = exc
    else:
        error = None
    if error is not None:
        assert error.type_name in ("SerializationException", "ValidationException")
        assert error.status == 400
        return
    assert name == op
    assert set(params) <= set(OPERATIONS[op])
    for member, spec in OPERATIONS[op].items():
        if spec.required:
            assert member in params


@settings(max_examples=100, deadline=None)
@given(body=st.binary(max_size=200))
def test_validator_on_arbitrary_bytes(body: bytes) -> None:
    error: KmsApiError | None = None
    try:
        parse_request("TrentService.Decrypt", body)
    except KmsApiError as exc:
        error = exc
    if error is not None:
        assert error.type_name in ("SerializationException", "ValidationException")


def test_blob_decoding() -> None:
    _, p = parse_request("TrentService.Encrypt", b'{"KeyId": "k", "Plaintext": "aGVsbG8="}')
    assert p["Plaintext"] == b"hello"
    with pytest.raises(KmsApiError) as e:
        parse_request(
            "TrentService.Encrypt",
            json.dumps(
                {"KeyId": "k", "Plaintext": base64.b64encode(b"x" * 4097).decode()}
            ).encode(),
        )
    assert e.value.type_name == "ValidationException"


# ------------------------------------------------------------------ policies

P = "arn:aws:iam::111122223333:user/alice"
ARN = "arn:aws:kms:us-east-1:111122223333:key/k1"


def _ctx(action: str = "kms:Decrypt", principal: str = P, **cond: Any) -> RequestContext:
    return RequestContext(
        principal,
        action,
        ARN,
        {k.replace("__", ":"): (v,) if isinstance(v, str) else tuple(v) for k, v in cond.items()},
    )


def _policy(*statements: dict[str, Any]) -> KeyPolicy:
    return KeyPolicy.parse(json.dumps({"Version": "2012-10-17", "Statement": list(statements)}))


def _allow(**extra: Any) -> dict[str, Any]:
    return {"Effect": "Allow", "Principal": {"AWS": P}, "Action": "kms:*", "Resource": "*", **extra}


def test_default_policy_account_root() -> None:
    pol = KeyPolicy.parse(default_key_policy("111122223333"))
    assert pol.evaluate(_ctx()).allowed
    assert not pol.evaluate(_ctx(principal="arn:aws:iam::444455556666:user/x")).allowed


@pytest.mark.parametrize(
    ("statement", "ctx", "allowed"),
    [
        (_allow(Action="kms:Gen*"), _ctx("kms:GenerateDataKey"), True),
        (_allow(Action="kms:Gen*"), _ctx("kms:Decrypt"), False),
        (_allow(Action="KMS:decrypt"), _ctx("kms:Decrypt"), True),
        (_allow(NotAction="kms:Decrypt", Action=None), _ctx("kms:Encrypt"), True),
        (_allow(Resource=ARN), _ctx(), True),
        (_allow(Resource="arn:aws:kms:*:*:key/other"), _ctx(), False),
        (_allow(Principal="*"), _ctx(principal="arn:aws:iam::999999999999:user/z"), True),
        (_allow(Principal={"AWS": "111122223333"}), _ctx(), True),
        (
            _allow(Condition={"StringEquals": {"kms:EncryptionContext:app": "x"}}),
            _ctx(**{"kms__encryptioncontext__app": "x"}),
            True,
        ),
        (_allow(Condition={"StringEquals": {"kms:EncryptionContext:app": "x"}}), _ctx(), False),
        (
            _allow(Condition={"StringEqualsIfExists": {"kms:EncryptionContext:app": "x"}}),
            _ctx(),
            True,
        ),
        (
            _allow(Condition={"StringEqualsIgnoreCase": {"kms:RecipientAttestation:PCR0": "ABCD"}}),
            _ctx(**{"kms__recipientattestation__pcr0": "abcd"}),
            True,
        ),
        (
            _allow(Condition={"StringEquals": {"kms:RecipientAttestation:PCR0": "ABCD"}}),
            _ctx(**{"kms__recipientattestation__pcr0": "abcd"}),
            False,
        ),
        (
            _allow(Condition={"StringLike": {"aws:PrincipalArn": "arn:aws:iam::*:user/al*"}}),
            _ctx(**{"aws__principalarn": P}),
            True,
        ),
        (
            _allow(Condition={"Null": {"kms:RecipientAttestation:ImageSha384": "false"}}),
            _ctx(),
            False,
        ),
        (
            _allow(Condition={"Null": {"kms:RecipientAttestation:ImageSha384": "true"}}),
            _ctx(),
            True,
        ),
        (
            _allow(Condition={"Bool": {"aws:SecureTransport": True}}),
            _ctx(**{"aws__securetransport": "true"}),
            True,
        ),
        (
            _allow(
                Condition={"ForAllValues:StringEquals": {"kms:EncryptionContextKeys": ["a", "b"]}}
            ),
            _ctx(**{"kms__encryptioncontextkeys": ["a"]}),
            True,
        ),
        (
            _allow(Condition={"ForAllValues:StringEquals": {"kms:EncryptionContextKeys": ["a"]}}),
            _ctx(**{"kms__encryptioncontextkeys": ["a", "c"]}),
            False,
        ),
        (
            _allow(Condition={"ForAnyValue:StringEquals": {"kms:EncryptionContextKeys": ["c"]}}),
            _ctx(**{"kms__encryptioncontextkeys": ["a", "c"]}),
            True,
        ),
        (
            _allow(Condition={"ForAnyValue:StringEquals": {"kms:EncryptionContextKeys": ["c"]}}),
            _ctx(),
            False,
        ),
        (_allow(Condition={"StringNotEquals": {"kms:EncryptionContext:app": "x"}}), _ctx(), True),
    ],
)
def test_policy_table(statement: dict[str, Any], ctx: RequestContext, allowed: bool) -> None:
    statement = {k: v for k, v in statement.items() if v is not None}
    assert _policy(statement).evaluate(ctx).allowed is allowed


def test_explicit_deny_wins_and_reason() -> None:
    deny = {
        "Sid": "NoDebug",
        "Effect": "Deny",
        "Principal": "*",
        "Action": "kms:Decrypt",
        "Resource": "*",
    }
    d = _policy(_allow(), deny).evaluate(_ctx())
    assert not d.allowed
    assert "NoDebug" in d.reason
    cond = _allow(
        Sid="Enclave", Condition={"StringEquals": {"kms:RecipientAttestation:PCR0": "aa"}}
    )
    d = _policy(cond).evaluate(_ctx())
    assert not d.allowed
    assert "kms:recipientattestation:pcr0" in d.reason
    assert "Enclave" in d.reason


@pytest.mark.parametrize(
    "bad",
    [
        "not json",
        "[]",
        "{}",
        '{"Statement": []}',
        '{"Statement": [1]}',
        '{"Version": "2099-01-01", "Statement": {"Effect": "Allow", "Principal": "*",'
        ' "Action": "kms:*"}}',
        '{"Statement": {"Effect": "Allow", "Action": "kms:*"}}',
        '{"Statement": {"Effect": "Allow", "Principal": "*", "Action": "s3:*"}}',
        '{"Statement": {"Effect": "Allow", "Principal": "*", "Action": "kms:*", "Bogus": 1}}',
        '{"Statement": {"Effect": "Allow", "Principal": {"AWS": "bob"}, "Action": "kms:*"}}',
        '{"Statement": {"Effect": "Allow", "Principal": "*", "Action": "kms:*",'
        ' "Condition": {"DateLessThan": {"aws:CurrentTime": "2020"}}}}',
        '{"Statement": {"Effect": "Allow", "Principal": "*", "Action": "kms:*",'
        ' "Condition": {"Bool": {"aws:SecureTransport": "maybe"}}}}',
        json.dumps(
            {
                "Statement": {
                    "Effect": "Allow",
                    "Principal": "*",
                    "Action": "kms:*",
                    "Sid": "x" * 131072,  # the document passes 131,072 characters
                }
            }
        ),
    ],
)
def test_malformed_policies(bad: str) -> None:
    with pytest.raises(PolicyError):
        KeyPolicy.parse(bad)


_actions = st.sampled_from(["kms:Decrypt", "kms:Encrypt", "kms:GenerateDataKey", "kms:DescribeKey"])
_patterns = st.sampled_from(["kms:*", "kms:Decrypt", "kms:Gen*", "kms:?ncrypt", "kms:Describe*"])
_statement = st.fixed_dictionaries(
    {
        "Effect": st.sampled_from(["Allow", "Deny"]),
        "Principal": st.sampled_from(["*", {"AWS": P}, {"AWS": "444455556666"}]),
        "Action": st.lists(_patterns, min_size=1, max_size=3),
        "Resource": st.sampled_from(["*", ARN, "arn:aws:kms:*:*:key/zzz"]),
    }
)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(statements=st.lists(_statement, min_size=1, max_size=5), action=_actions)
def test_policy_properties(statements: list[dict[str, Any]], action: str) -> None:
    policy = _policy(*statements)
    decision = policy.evaluate(_ctx(action))
    # Default deny: without any Allow statement nothing is allowed.
    if all(s["Effect"] == "Deny" for s in statements):
        assert not decision.allowed
    # Explicit deny wins: adding a matching Deny always denies.
    deny = {"Effect": "Deny", "Principal": "*", "Action": action, "Resource": "*"}
    assert not _policy(*statements, deny).evaluate(_ctx(action)).allowed
    # Order independence.
    assert _policy(*reversed(statements)).evaluate(_ctx(action)).allowed is decision.allowed


# ------------------------------------------------------------------ ciphertext format


def test_ciphertext_round_trip_and_binding() -> None:
    aead = _wrap.Aead(os.urandom(32))
    blob = ciphertext.seal(aead, "key-1", 3, b"data", {"b": "2", "a": "1"})
    header = ciphertext.parse_header(blob)
    assert (header.key_id, header.key_version) == ("key-1", 3)
    assert ciphertext.open_blob(aead, header, {"a": "1", "b": "2"}) == b"data"
    for ctx in (None, {"a": "1"}, {"a": "1", "b": "3"}, {"a1": "", "b": "2"}):
        with pytest.raises(CiphertextFormatError):
            ciphertext.open_blob(aead, header, ctx)
    # Re-labelling the blob to another version breaks authentication.
    relabel = bytearray(blob)
    relabel[2 + len("key-1") + 3] ^= 1
    with pytest.raises(CiphertextFormatError):
        ciphertext.open_blob(aead, ciphertext.parse_header(bytes(relabel)), {"a": "1", "b": "2"})


def test_context_encoding_unambiguous() -> None:
    assert ciphertext.encode_context({"ab": "c"}) != ciphertext.encode_context({"a": "bc"})
    assert ciphertext.encode_context({}) == ciphertext.encode_context(None)


@settings(max_examples=100, deadline=None)
@given(data=st.binary(max_size=64), index=st.integers(min_value=0))
def test_ciphertext_tamper_detected(data: bytes, index: int) -> None:
    aead = _wrap.Aead(bytes(32))
    blob = bytearray(ciphertext.seal(aead, "k", 1, data, {"x": "y"}))
    blob[index % len(blob)] ^= 0x01
    with pytest.raises(CiphertextFormatError):
        ciphertext.open_blob(aead, ciphertext.parse_header(bytes(blob)), {"x": "y"})


# ------------------------------------------------------------------ CMS


def _fixture(shared_dir: Path) -> tuple[bytes, Any]:
    d = shared_dir / "kms-fixtures"
    data = base64.b64decode((d / "enclaver_ciphertext_for_recipient.b64").read_text())
    key = _wrap.load_pkcs8_private_key(
        base64.b64decode((d / "enclaver_recipient_key.pkcs8.b64").read_text())
    )
    return data, key


def test_cms_fixture_ber_indefinite(shared_dir: Path) -> None:
    data, key = _fixture(shared_dir)
    assert data[:4] == bytes.fromhex("30800609")  # BER, indefinite length
    assert cms.open_enveloped_data(data, key) == b"Hello, World"


def test_cms_fixture_wrong_key_and_truncation(shared_dir: Path) -> None:
    data, _ = _fixture(shared_dir)
    other = _wrap.generate_rsa_2048()
    with pytest.raises(CiphertextFormatError):
        cms.open_enveloped_data(data, other)
    _, key = _fixture(shared_dir)
    for cut in (1, 10, 100, len(data) - 3):
        with pytest.raises(CiphertextFormatError):
            cms.open_enveloped_data(data[:cut], key)


def test_cms_round_trip_layout() -> None:
    key = _wrap.generate_rsa_2048()
    der = cms.build_enveloped_data(b"k" * 32, key.public_key())
    assert cms.open_enveloped_data(der, key) == b"k" * 32
    from asn1crypto import cms as acms

    info = acms.ContentInfo.load(der)
    env = info["content"]
    assert env["version"].native == "v2"
    ktri = env["recipient_infos"][0].chosen
    assert ktri["rid"].name == "subject_key_identifier"
    assert ktri["rid"].chosen.native == cms.recipient_key_identifier(key.public_key())
    assert ktri["key_encryption_algorithm"]["algorithm"].native == "rsaes_oaep"
    params = ktri["key_encryption_algorithm"]["parameters"]
    assert params["hash_algorithm"]["algorithm"].native == "sha256"
    assert params["mask_gen_algorithm"]["parameters"]["algorithm"].native == "sha256"
    eci = env["encrypted_content_info"]
    assert eci["content_encryption_algorithm"]["algorithm"].native == "aes256_cbc"
    assert len(eci["content_encryption_algorithm"]["parameters"].native) == 16


@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl CLI not installed")
def test_cms_openssl_interop(tmp_path: Path) -> None:
    """OpenSSL's CMS implementation decrypts what we build (independent check)."""
    from cryptography.hazmat.primitives import serialization

    key = _wrap.generate_rsa_2048()
    (tmp_path / "k.pem").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    (tmp_path / "c.der").write_bytes(cms.build_enveloped_data(b"interop!", key.public_key()))
    out = subprocess.run(
        [
            "openssl",
            "cms",
            "-decrypt",
            "-inform",
            "DER",
            "-in",
            str(tmp_path / "c.der"),
            "-inkey",
            str(tmp_path / "k.pem"),
        ],
        capture_output=True,
        timeout=30,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout == b"interop!"


# ------------------------------------------------------------------ audit chain


def _master(tmp_path: Path) -> MasterKey:
    """The state directory's master key (created like the daemon does)."""
    return MasterKey(load_master_key(tmp_path, {}))


def _audit(tmp_path: Path, n: int = 5) -> Path:
    path = tmp_path / "audit.jsonl"
    log = AuditLog(path, _master(tmp_path))
    for i in range(n):
        log.append({"operation": "Decrypt", "i": i, "decision": "allow"})
    log.close()
    return path


def test_audit_chain_ok_and_resume(tmp_path: Path) -> None:
    path = _audit(tmp_path)
    assert verify_audit_log(path, _master(tmp_path)) == 5
    log = AuditLog(path, _master(tmp_path))  # resumes the chain after a restart
    log.append({"operation": "Encrypt"})
    log.close()
    assert verify_audit_log(path, _master(tmp_path)) == 6


@pytest.mark.parametrize("how", ["edit", "delete", "swap", "insert", "truncate-line"])
def test_audit_tamper_detected(tmp_path: Path, how: str) -> None:
    path = _audit(tmp_path)
    lines = path.read_text().splitlines(keepends=True)
    if how == "edit":
        lines[2] = lines[2].replace('"allow"', '"deny"')
    elif how == "delete":
        del lines[2]
    elif how == "swap":
        lines[2], lines[3] = lines[3], lines[2]
    elif how == "insert":
        lines.insert(2, lines[1])
    else:
        lines[-1] = lines[-1][:20]
    path.write_text("".join(lines))
    with pytest.raises(AuditChainError) as e:
        verify_audit_log(path, _master(tmp_path))
    assert e.value.line == (5 if how == "truncate-line" else 3)


def test_audit_verify_cli(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from runtime.cli import main

    # main() configures logging for the process; keep it from binding to capsys's stream.
    monkeypatch.setattr("runtime.cli.configure_logging", lambda *a, **k: None)

    path = _audit(tmp_path)
    assert main(["kms", "audit", "verify", str(path)]) == 0
    assert json.loads(capsys.readouterr().out) == {"ok": True, "lines": 5, "keyed": True}
    text = path.read_text().splitlines(keepends=True)
    text[3] = text[3].replace('"i":3', '"i":4')
    path.write_text("".join(text))
    assert main(["kms", "audit", "verify", str(path)]) == 1
    captured = capsys.readouterr()
    assert json.loads(captured.out)["line"] == 4
    assert "line 4" in captured.err


# ------------------------------------------------------------------ config, master key, seed


def test_config_from_mapping_and_unknown_keys(tmp_path: Path) -> None:
    cfg = KmsConfig.from_mapping(
        {
            "listen": "127.0.0.1:0",
            "trust_roots": ["local", "roots/r.pem"],
            "credentials": [{"access_key_id": "A", "secret_access_key": "S"}],
        },
        base_dir=tmp_path,
    )
    assert cfg.port == 0
    assert cfg.trust_roots == ("local", str(tmp_path / "roots/r.pem"))
    assert "S" not in repr(cfg)
    with pytest.raises(ConfigurationError):
        KmsConfig.from_mapping({"listne": "x"})
    with pytest.raises(ConfigurationError):
        KmsConfig.from_mapping({"credentials": [{"access_key_id": "A"}]})
    with pytest.raises(ConfigurationError):
        KmsConfig.from_mapping({"max_document_age_s": -1})


def test_credentials_fail_closed() -> None:
    with pytest.raises(ConfigurationError, match="ENCLAVE_KMS_ACCESS_KEY_ID"):
        KmsConfig().resolve_credentials({})
    (c,) = KmsConfig().resolve_credentials(
        {"ENCLAVE_KMS_ACCESS_KEY_ID": "A", "ENCLAVE_KMS_SECRET_ACCESS_KEY": "S"}
    )
    assert c.principal_arn == "arn:aws:iam::111122223333:user/local"


def test_master_key_file(tmp_path: Path) -> None:
    key = load_master_key(tmp_path, {})
    path = tmp_path / "master.key"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert len(key) == 32
    assert load_master_key(tmp_path, {}) == key
    assert [p.name for p in tmp_path.iterdir()] == ["master.key"]  # no temporary left behind
    path.chmod(0o644)
    with pytest.raises(ConfigurationError, match="chmod 600"):
        load_master_key(tmp_path, {})
    env_key = base64.b64encode(bytes(range(32))).decode()
    assert load_master_key(tmp_path, {"ENCLAVE_KMS_MASTER_KEY": env_key}) == bytes(range(32))
    with pytest.raises(ConfigurationError):
        load_master_key(tmp_path, {"ENCLAVE_KMS_MASTER_KEY": "c2hvcnQ="})


def test_seed_validation() -> None:
    material = base64.b64encode(bytes(32)).decode()
    keys = parse_seed(
        {
            "keys": [{"key_id": "k-1", "material": [material, material], "aliases": ["alias/a"]}],
            "aliases": [{"name": "alias/b", "key_id": "k-1"}],
        }
    )
    assert keys[0].aliases == ("alias/a", "alias/b")
    assert len(keys[0].material) == 2
    for bad in (
        {"keys": [{"key_id": "k", "material": "eA=="}]},
        {"keys": [{"key_id": "alias/k", "material": material}]},
        {"keys": [{"key_id": "k", "material": material, "policy": {"Statement": []}}]},
        {"keys": [{"key_id": "k", "material": material, "color": "red"}]},
        {"aliases": [{"name": "alias/x", "key_id": "nope"}]},
        {"keys": [{"key_id": "k", "material": material, "aliases": ["alias/aws/x"]}]},
    ):
        with pytest.raises(ConfigurationError):
            parse_seed(bad)
