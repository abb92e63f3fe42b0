"""Recipient (attested key release) against a real daemon with real NSM documents."""

from __future__ import annotations

import base64
import json
import time
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import structlog
import structlog.testing
import trio
import trio.testing
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from attest.ca import LocalCA
from attest.nsm.client import NsmClient
from attest.nsm.server import serve_nsm
from kms import _wrap, cms
from kms.app import build_app
from kms.client import AttestedKmsClient, Credentials, KmsClient
from kms.config import KmsConfig
from kms.daemon import _Connection, _Shutdown
from kms.errors import CiphertextFormatError, KmsApiError

from .conftest import boto_client
from .helpers import (
    ADMIN,
    ALL_CREDS,
    ENCLAVE,
    DaemonThread,
    FakeEnclave,
    enclave_policy,
    image_pcrs,
)

pytestmark = pytest.mark.timeout(60)


def _creds(entry: Any) -> Credentials:
    return Credentials(entry.access_key_id, entry.secret_access_key)


@pytest.fixture(scope="module")
def sealed(daemon: DaemonThread) -> dict[str, Any]:
    """A key whose policy releases to the enclave role only for image "server-image"."""
    admin = boto_client(daemon.endpoint, ADMIN)
    kid = admin.create_key(Policy=json.dumps(enclave_policy()))["KeyMetadata"]["KeyId"]
    blob = admin.encrypt(KeyId=kid, Plaintext=b"the model key", EncryptionContext={"m": "digits"})[
        "CiphertextBlob"
    ]
    return {"key_id": kid, "blob": blob, "admin": admin}


@pytest.fixture(scope="module")
def recipient_key() -> tuple[Any, bytes]:
    key = _wrap.generate_rsa_2048()
    return key, _wrap.spki_der(key.public_key())


def _recipient(document: bytes, alg: str = "RSAES_OAEP_SHA_256") -> dict[str, str]:
    return {
        "AttestationDocument": base64.b64encode(document).decode(),
        "KeyEncryptionAlgorithm": alg,
    }


async def test_generate_data_key_released_to_matching_enclave(
    daemon: DaemonThread, test_ca: LocalCA, sealed: dict[str, Any]
) -> None:
    enclave = FakeEnclave.create(test_ca)
    client = AttestedKmsClient(
        KmsClient(endpoint=daemon.endpoint, credentials=_creds(ENCLAVE)), enclave
    )
    client.prepare()
    with trio.fail_after(20):
        plaintext, blob = await client.generate_data_key(
            sealed["key_id"], encryption_context={"k": "v"}
        )
        await client.aclose()
    assert len(plaintext) == 32
    # The data key the enclave got is the one inside the CiphertextBlob (admin decrypts it).
    admin_view = sealed["admin"].decrypt(CiphertextBlob=blob, EncryptionContext={"k": "v"})
    assert admin_view["Plaintext"] == plaintext


async def test_decrypt_answer_has_only_ciphertext_for_recipient(
    daemon: DaemonThread,
    test_ca: LocalCA,
    sealed: dict[str, Any],
    recipient_key: Any,
    audit_path: Path,
) -> None:
    private_key, spki = recipient_key
    enclave = FakeEnclave.create(test_ca)
    async with KmsClient(endpoint=daemon.endpoint, credentials=_creds(ENCLAVE)) as client:
        with trio.fail_after(20):
            answer = await client.call(
                "Decrypt",
                {
                    "CiphertextBlob": base64.b64encode(sealed["blob"]).decode(),
                    "EncryptionContext": {"m": "digits"},
                    "Recipient": _recipient(enclave.document(spki)),
                },
            )
    assert "Plaintext" not in answer
    assert answer["KeyId"].endswith(sealed["key_id"])
    envelope = base64.b64decode(answer["CiphertextForRecipient"])
    assert cms.open_enveloped_data(envelope, private_key) == b"the model key"
    record = json.loads(audit_path.read_text().splitlines()[-1])
    assert record["operation"] == "Decrypt"
    assert record["decision"] == "allow"
    assert record["recipient"] == {
        "module_id": enclave.module_id,
        "image_sha384": image_pcrs()[0],
    }


async def test_attested_client_decrypt_and_random(
    daemon: DaemonThread, test_ca: LocalCA, sealed: dict[str, Any]
) -> None:
    client = AttestedKmsClient(
        KmsClient(endpoint=daemon.endpoint, credentials=_creds(ENCLAVE)),
        FakeEnclave.create(test_ca),
    )
    with trio.fail_after(20):
        got = await client.decrypt(
            sealed["blob"], encryption_context={"m": "digits"}, key_id=sealed["key_id"]
        )
        rnd = await client.generate_random(48)
        await client.aclose()
    assert got == b"the model key"
    assert len(rnd) == 48


def test_boto3_recipient_parameter(
    daemon: DaemonThread, test_ca: LocalCA, sealed: dict[str, Any], recipient_key: Any
) -> None:
    """boto3's own Recipient support works unchanged against the daemon."""
    private_key, spki = recipient_key
    enclave = boto_client(daemon.endpoint, ENCLAVE)
    doc = FakeEnclave.create(test_ca).document(spki)
    out = enclave.decrypt(
        CiphertextBlob=sealed["blob"],
        EncryptionContext={"m": "digits"},
        Recipient={"AttestationDocument": doc, "KeyEncryptionAlgorithm": "RSAES_OAEP_SHA_256"},
    )
    assert out.get("Plaintext") is None
    assert cms.open_enveloped_data(out["CiphertextForRecipient"], private_key) == b"the model key"


def _denials(ca: LocalCA) -> dict[str, FakeEnclave]:
    return {
        "wrong_pcr0": FakeEnclave.create(ca, image="other-image"),
        "debug": FakeEnclave.create(ca, debug=True),
        "expired": FakeEnclave.create(ca, clock=lambda: time.time() - 1000),
    }


@pytest.mark.parametrize("case", ["wrong_pcr0", "debug", "expired", "tampered", "other_key"])
async def test_release_denied(
    daemon: DaemonThread,
    test_ca: LocalCA,
    sealed: dict[str, Any],
    recipient_key: Any,
    audit_path: Path,
    case: str,
) -> None:
    _, spki = recipient_key
    key_id = sealed["key_id"]
    if case == "tampered":
        doc = bytearray(FakeEnclave.create(test_ca).document(spki))
        doc[-5] ^= 0x40  # inside the ES384 signature
        document = bytes(doc)
    elif case == "other_key":
        # A genuine document of "server-image", used on a key whose policy names another image.
        admin = sealed["admin"]
        key_id = admin.create_key(Policy=json.dumps(enclave_policy("billing-image")))[
            "KeyMetadata"
        ]["KeyId"]
        document = FakeEnclave.create(test_ca).document(spki)
    else:
        document = _denials(test_ca)[case].document(spki)
    async with KmsClient(endpoint=daemon.endpoint, credentials=_creds(ENCLAVE)) as client:
        with trio.fail_after(20), pytest.raises(KmsApiError) as err:
            await client.call(
                "GenerateDataKey",
                {"KeyId": key_id, "KeySpec": "AES_256", "Recipient": _recipient(document)},
            )
    assert err.value.type_name == "AccessDeniedException"
    assert "PCR" not in err.value.message
    assert "debug" not in err.value.message.lower()
    record = json.loads(audit_path.read_text().splitlines()[-1])
    assert record["decision"] == "deny"
    assert record["operation"] == "GenerateDataKey"
    expected_reason = {
        "wrong_pcr0": "kms:recipientattestation:",
        "debug": "kms:recipientattestation:",
        "other_key": "kms:recipientattestation:",
        "expired": "attestation document rejected at policy",
        "tampered": "attestation document rejected at signature",
    }[case]
    assert expected_reason in record["reason"]
    if case in ("wrong_pcr0", "debug", "other_key"):
        # A verified document that the policy refused: the audit names the enclave.
        image = image_pcrs("other-image")[0] if case == "wrong_pcr0" else image_pcrs()[0]
        if case == "debug":
            image = "00" * 48
        assert record["recipient"]["image_sha384"] == image
        assert record["recipient"]["module_id"].startswith("i-")
    else:
        assert "recipient" not in record  # unverified claims are not recorded as facts


@pytest.mark.parametrize("case", ["no_public_key", "ec_public_key", "garbage", "bad_algorithm"])
async def test_malformed_recipient(
    daemon: DaemonThread, test_ca: LocalCA, sealed: dict[str, Any], recipient_key: Any, case: str
) -> None:
    enclave = FakeEnclave.create(test_ca)
    alg = "RSAES_OAEP_SHA_256"
    if case == "no_public_key":
        doc = enclave.document(None)
    elif case == "ec_public_key":
        ec_key = ec.generate_private_key(ec.SECP256R1()).public_key()
        doc = enclave.document(
            ec_key.public_bytes(
                serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
            )
        )
    elif case == "garbage":
        doc = b"\x84not a cose document"
    else:
        doc, alg = enclave.document(recipient_key[1]), "RSAES_OAEP_SHA_1"
    async with KmsClient(endpoint=daemon.endpoint, credentials=_creds(ENCLAVE)) as client:
        with trio.fail_after(20), pytest.raises(KmsApiError) as err:
            await client.call(
                "GenerateDataKey",
                {
                    "KeyId": sealed["key_id"],
                    "KeySpec": "AES_256",
                    "Recipient": _recipient(doc, alg),
                },
            )
    assert err.value.type_name == "ValidationException"


async def test_document_with_someone_elses_key_is_useless(
    daemon: DaemonThread, test_ca: LocalCA, sealed: dict[str, Any], recipient_key: Any
) -> None:
    """A replayed document carries the *enclave's* public key: the answer is sealed to it."""
    victim_key, victim_spki = recipient_key
    attacker_key = _wrap.generate_rsa_2048()
    doc = FakeEnclave.create(test_ca).document(victim_spki)
    async with KmsClient(endpoint=daemon.endpoint, credentials=_creds(ENCLAVE)) as client:
        with trio.fail_after(20):
            answer = await client.call(
                "GenerateDataKey",
                {"KeyId": sealed["key_id"], "KeySpec": "AES_256", "Recipient": _recipient(doc)},
            )
    envelope = base64.b64decode(answer["CiphertextForRecipient"])
    with pytest.raises(CiphertextFormatError):
        cms.open_enveloped_data(envelope, attacker_key)
    assert len(cms.open_enveloped_data(envelope, victim_key)) == 32


async def test_in_memory_transport_and_real_nsm_client(tmp_path: Path, test_ca: LocalCA) -> None:
    """The whole enclave path without sockets: NsmClient over a stream served by serve_nsm,
    KmsClient over an injected in-memory connect to the daemon's HTTP connection handler."""
    root = tmp_path / "root.pem"
    root.write_bytes(test_ca.root_pem)
    config = KmsConfig(state_dir=tmp_path / "kms", credentials=ALL_CREDS, trust_roots=(str(root),))
    app = await trio.to_thread.run_sync(lambda: build_app(config, env={}))
    admin = KmsClient(connect=lambda: _serve(app, nursery), credentials=_creds(ADMIN))
    enclave = FakeEnclave.create(test_ca)
    try:
        with structlog.testing.capture_logs() as logs:
            async with trio.open_nursery() as nursery:
                with trio.fail_after(20):
                    made = await admin.call("CreateKey", {"Policy": json.dumps(enclave_policy())})
                    key_id = made["KeyMetadata"]["KeyId"]
                    nsm_host, nsm_enclave = trio.testing.memory_stream_pair()
                    nursery.start_soon(serve_nsm, nsm_host, enclave.device)
                    nsm = NsmClient.from_stream(nsm_enclave)
                    client = AttestedKmsClient(
                        KmsClient(
                            connect=lambda: _serve(app, nursery), credentials=_creds(ENCLAVE)
                        ),
                        nsm,
                    )
                    client.prepare()
                    plaintext, blob = await client.generate_data_key(key_id)
                    again = await client.decrypt(blob)
                    assert again == plaintext
                    assert len(plaintext) == 32
                    await client.aclose()
                    await admin.aclose()
                    await nsm.aclose()
                nursery.cancel_scope.cancel()
    finally:
        app.close()
    events = [e for e in logs if e["event"] == "kms_request"]
    assert {e["operation"] for e in events} >= {"CreateKey", "GenerateDataKey", "Decrypt"}
    assert any(e.get("recipient", {}).get("module_id") == enclave.module_id for e in events)
    flat = repr(logs)
    for secret in (
        plaintext,
        base64.b64encode(plaintext),
        plaintext.hex().encode(),
        ADMIN.secret_access_key.encode(),
        ENCLAVE.secret_access_key.encode(),
    ):
        assert secret.decode("latin-1") not in flat


async def test_no_trust_roots_refuses_recipient(tmp_path: Path, test_ca: LocalCA) -> None:
    config = KmsConfig(state_dir=tmp_path / "kms", credentials=ALL_CREDS)
    app = await trio.to_thread.run_sync(lambda: build_app(config, env={}))
    try:
        async with trio.open_nursery() as nursery:
            client = KmsClient(connect=lambda: _serve(app, nursery), credentials=_creds(ADMIN))
            with trio.fail_after(20):
                doc = FakeEnclave.create(test_ca).document(
                    _wrap.spki_der(_wrap.generate_rsa_2048().public_key())
                )
                with pytest.raises(KmsApiError) as err:
                    await client.call(
                        "GenerateRandom", {"NumberOfBytes": 8, "Recipient": _recipient(doc)}
                    )
                assert err.value.type_name == "UnsupportedOperationException"
                assert (await client.call("GenerateRandom", {"NumberOfBytes": 8}))["Plaintext"]
                await client.aclose()
            nursery.cancel_scope.cancel()
    finally:
        app.close()


async def _serve(app: Any, nursery: trio.Nursery) -> trio.abc.Stream:
    client_end, server_end = trio.testing.memory_stream_pair()
    nursery.start_soon(_Connection(server_end, app, _Shutdown()).serve)
    return client_end


async def test_attested_client_over_vsock_proxy(
    daemon: DaemonThread,
    test_ca: LocalCA,
    sealed: dict[str, Any],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Enclave path of the demo: KmsClient(vsock=(3, port)) → vsock-proxy → TCP daemon."""
    from transport.proxy import serve_vsock_proxy
    from transport.vsock import VMADDR_CID_PARENT, VMADDR_PORT_ANY, VsockAddr

    fabric = tmp_path / "vsock"
    monkeypatch.setenv("ENCLAVE_VSOCK_DIR", str(fabric))
    monkeypatch.setenv("ENCLAVE_VSOCK_BACKEND", "emulated")
    assert daemon.address is not None
    host, port = daemon.address
    async with trio.open_nursery() as nursery:
        with trio.fail_after(20):
            proxy_port = await nursery.start(
                partial(
                    serve_vsock_proxy,
                    VMADDR_PORT_ANY,
                    host,
                    port,
                    allowlist=[(host, port)],
                    fabric_dir=fabric,
                )
            )
            kms = KmsClient(
                vsock=VsockAddr(VMADDR_CID_PARENT, proxy_port), credentials=_creds(ENCLAVE)
            )
            client = AttestedKmsClient(kms, FakeEnclave.create(test_ca))
            client.prepare()
            got = await client.decrypt(sealed["blob"], encryption_context={"m": "digits"})
            assert got == b"the model key"
            await client.aclose()
        nursery.cancel_scope.cancel()


async def test_data_key_pair_released_to_enclave(
    daemon: DaemonThread, test_ca: LocalCA, sealed: dict[str, Any]
) -> None:
    from cryptography.hazmat.primitives import serialization

    admin = sealed["admin"]
    pair_policy = enclave_policy()
    pair_policy["Statement"][1]["Action"] = ["kms:GenerateDataKeyPair"]
    key_id = admin.create_key(Policy=json.dumps(pair_policy))["KeyMetadata"]["KeyId"]
    client = AttestedKmsClient(
        KmsClient(endpoint=daemon.endpoint, credentials=_creds(ENCLAVE)),
        FakeEnclave.create(test_ca),
    )
    with trio.fail_after(20):
        private_der, public_der, blob = await client.generate_data_key_pair(
            key_id, key_pair_spec="ECC_NIST_P384"
        )
        await client.aclose()
    private = serialization.load_der_private_key(private_der, password=None)
    assert (
        private.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        == public_der
    )
    assert admin.decrypt(CiphertextBlob=blob)["Plaintext"] == private_der


async def test_enclave_policy_cli_round_trip(
    daemon: DaemonThread,
    test_ca: LocalCA,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """`enclave kms enclave-policy` prints a policy that the daemon enforces as intended."""
    from runtime.cli import main

    monkeypatch.setattr("runtime.cli.configure_logging", lambda *a, **k: None)
    pcrs = image_pcrs()
    argv = [
        "kms",
        "enclave-policy",
        "--admin",
        ADMIN.principal_arn,
        "--enclave",
        ENCLAVE.principal_arn,
    ]
    for index, value in pcrs.items():
        argv += ["--pcr", f"{index}={value.upper()}"]
    assert main(argv) == 0
    policy = capsys.readouterr().out
    admin = boto_client(daemon.endpoint, ADMIN)
    key_id = admin.create_key(Policy=policy)["KeyMetadata"]["KeyId"]
    good = AttestedKmsClient(
        KmsClient(endpoint=daemon.endpoint, credentials=_creds(ENCLAVE)),
        FakeEnclave.create(test_ca),
    )
    debug = AttestedKmsClient(
        KmsClient(endpoint=daemon.endpoint, credentials=_creds(ENCLAVE)),
        FakeEnclave.create(test_ca, debug=True),
    )
    with trio.fail_after(20):
        plaintext, _ = await good.generate_data_key(key_id)
        assert len(plaintext) == 32
        with pytest.raises(KmsApiError) as err:
            await debug.generate_data_key(key_id)
        assert err.value.type_name == "AccessDeniedException"
        await good.aclose()
        await debug.aclose()
    assert (
        main(
            [
                "kms",
                "enclave-policy",
                "--admin",
                ADMIN.principal_arn,
                "--enclave",
                ENCLAVE.principal_arn,
                "--pcr",
                "8=abcd",
            ]
        )
        == 1
    )
