"""``models.enclave_seal`` against the real KMS daemon (the pytest plugin's), with an attested
enclave identity from the test's local CA: outputs round-trip for the image the key is bound to;
a debug enclave gets no data key; a tampered, renamed or non-output file is refused."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import trio

from attest.ca import LocalCA
from kms.client import AttestedKmsClient
from kms.errors import KmsError
from kms.policy import enclave_key_policy
from models.enclave_seal import OutputSealer, seal_output, unseal_output
from models.errors import ModelLoadError, SealedFormatError, SealedIntegrityError
from runtime.testing import KmsDaemon
from tests.kms.helpers import FakeEnclave, image_pcrs

pytestmark = pytest.mark.slow


def _key(kms_daemon: KmsDaemon) -> str:
    policy = enclave_key_policy(
        admin_principal=kms_daemon.admin_arn,
        enclave_principal=kms_daemon.enclave_arn,
        pcrs=image_pcrs(),
        actions=("kms:Decrypt", "kms:GenerateDataKey"),
    )
    admin = kms_daemon.boto3_client()
    return str(admin.create_key(Policy=json.dumps(policy))["KeyMetadata"]["KeyId"])


async def test_outputs_round_trip_and_are_bound(
    kms_daemon: KmsDaemon, enclave_state_dir: Path
) -> None:
    key = _key(kms_daemon)
    ca = LocalCA.load_or_create(enclave_state_dir / "ca")
    data = bytes(range(256)) * 5000  # 1.28 MB: two sealed chunks of 1 MiB
    with trio.fail_after(60):
        async with kms_daemon.client(kms_daemon.enclave) as kms:
            enclave = AttestedKmsClient(kms, FakeEnclave.create(ca))
            sealed = await seal_output(data, kms=enclave, key_id=key, name="report-7")
            assert data not in sealed
            assert await unseal_output(sealed, kms=enclave, name="report-7") == data
            # Under another name: refused (the name is in the authenticated header).
            with pytest.raises(ModelLoadError):
                await unseal_output(sealed, kms=enclave, name="report-8")
            # A flipped byte: refused.
            bad = bytearray(sealed)
            bad[-100] ^= 1
            with pytest.raises(SealedIntegrityError):
                await unseal_output(bytes(bad), kms=enclave, name="report-7")
            # A series under one data key: each output its own file key, each bound to its name.
            sealer = await OutputSealer.open(kms=enclave, key_id=key, series="run-1")
            one = await sealer.seal(b"state 1", name="ckpt-1")
            two = await sealer.seal(b"state 1", name="ckpt-2")
            assert one[-40:] != two[-40:]  # a fresh salt: other ciphertext for the same bytes
            assert await unseal_output(two, kms=enclave, name="ckpt-2") == b"state 1"
            # A debug enclave (PCRs read as zeros) gets no data key, to seal or to unseal.
            debug = AttestedKmsClient(kms, FakeEnclave.create(ca, debug=True))
            with pytest.raises(KmsError, match="AccessDenied"):
                await seal_output(b"x", kms=debug, key_id=key, name="x")
            with pytest.raises(KmsError, match="AccessDenied"):
                await unseal_output(sealed, kms=debug, name="report-7")


async def test_a_sealed_file_that_is_not_an_output_is_refused(
    kms_daemon: KmsDaemon, enclave_state_dir: Path
) -> None:
    from models import sealed
    from models.sealing import MODEL_CONTEXT_KEY

    key = _key(kms_daemon)
    ca = LocalCA.load_or_create(enclave_state_dir / "ca")
    with trio.fail_after(60):
        async with kms_daemon.client(kms_daemon.enclave) as kms:
            enclave = AttestedKmsClient(kms, FakeEnclave.create(ca))
            # A provisioned model's context (no output marker), sealed with a key the enclave
            # may use: unseal_output must still say it is not an output.
            context = {MODEL_CONTEXT_KEY: "model"}
            data_key, blob = await enclave.generate_data_key(key, encryption_context=context)
            import hashlib
            import io

            header = sealed.new_header(
                key_id=key,
                encrypted_data_key=blob,
                model_name="model",
                model_sha384=hashlib.sha384(b"weights").digest(),
                total_size=7,
                encryption_context=context,
            )
            out = io.BytesIO()
            sealed.seal_stream(io.BytesIO(b"weights"), out, data_key=data_key, header=header)
            with pytest.raises(SealedFormatError, match="not a sealed enclave output"):
                await unseal_output(out.getvalue(), kms=enclave, name="model")
