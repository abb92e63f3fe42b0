"""The pytest plugin's KMS fixture (:mod:`runtime.testing`): a real daemon process with two
principals that trusts the test's local CA. (``inference_stack`` and ``inference_client`` serve
the end-to-end tests of this directory; the README's example runs in a fresh project in
``test_readme.py``.)"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import trio
from botocore.exceptions import ClientError

from attest.ca import LocalCA
from kms.client import AttestedKmsClient
from kms.errors import KmsError
from kms.policy import enclave_key_policy
from runtime.testing import KmsDaemon
from tests.kms.helpers import FakeEnclave, image_pcrs

pytestmark = pytest.mark.slow


def _key_for_image(kms_daemon: KmsDaemon) -> str:
    admin = kms_daemon.boto3_client()
    policy = enclave_key_policy(
        admin_principal=kms_daemon.admin_arn,
        enclave_principal=kms_daemon.enclave_arn,
        pcrs=image_pcrs(),
    )
    return str(admin.create_key(Policy=json.dumps(policy))["KeyMetadata"]["KeyId"])


def test_kms_daemon_principals(kms_daemon: KmsDaemon) -> None:
    """The admin administers the key; the enclave's principal gets nothing without an
    attestation, and the audit log says who asked."""
    key = _key_for_image(kms_daemon)
    admin = kms_daemon.boto3_client()
    blob = admin.encrypt(KeyId=key, Plaintext=b"model key")["CiphertextBlob"]
    assert admin.decrypt(CiphertextBlob=blob)["Plaintext"] == b"model key"
    enclave = kms_daemon.boto3_client(kms_daemon.enclave)
    with pytest.raises(ClientError) as info:
        enclave.decrypt(CiphertextBlob=blob)
    assert info.value.response["Error"]["Code"] == "AccessDeniedException"
    audit = [json.loads(line) for line in kms_daemon.audit_log.open()]
    denied = [r for r in audit if r["decision"] == "deny"]
    assert [r["principal"] for r in denied] == [kms_daemon.enclave_arn]
    assert os.stat(kms_daemon.state_dir).st_mode & 0o077 == 0


async def test_kms_daemon_trusts_the_tests_local_ca(
    kms_daemon: KmsDaemon, enclave_state_dir: Path
) -> None:
    """An enclave attesting with the state directory's CA (as the runtime's enclaves do) gets
    the key released to its PCRs; the same image in debug mode does not."""
    key = _key_for_image(kms_daemon)
    ciphertext = kms_daemon.boto3_client().encrypt(KeyId=key, Plaintext=b"model key")[
        "CiphertextBlob"
    ]
    ca = LocalCA.load_or_create(enclave_state_dir / "ca")
    with trio.fail_after(30):
        async with kms_daemon.client(kms_daemon.enclave) as kms:
            attested = AttestedKmsClient(kms, FakeEnclave.create(ca))
            assert await attested.decrypt(ciphertext) == b"model key"
            debug = AttestedKmsClient(kms, FakeEnclave.create(ca, debug=True))
            with pytest.raises(KmsError, match="AccessDenied"):
                await debug.decrypt(ciphertext)
