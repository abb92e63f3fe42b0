"""Fixtures of the kms tests: a test CA, one daemon per module, boto3 clients per principal."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import pytest
from botocore.config import Config

from attest.ca import LocalCA
from kms.app import build_worker_app, prepare_state
from kms.config import CredentialEntry, KmsConfig
from tests.pg_server import pg_server, pg_url  # noqa: F401 - fixtures of tests/kms/test_pg*.py

from .helpers import ALL_CREDS, DaemonThread, root_pem_file


@pytest.fixture(scope="module")
def test_ca(tmp_path_factory: pytest.TempPathFactory) -> LocalCA:
    return LocalCA.load_or_create(tmp_path_factory.mktemp("ca"))


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory, test_ca: LocalCA) -> Iterator[DaemonThread]:
    base = tmp_path_factory.mktemp("kms")
    config = KmsConfig(
        host="127.0.0.1",
        port=0,
        state_dir=base / "state",
        credentials=ALL_CREDS,
        trust_roots=(str(root_pem_file(test_ca, base)),),
        max_document_age_s=120.0,
        max_body_bytes=64 * 1024,
    )
    with DaemonThread(config) as d:
        yield d


def boto_client(endpoint: str, cred: CredentialEntry, **config: Any) -> Any:
    return boto3.client(
        "kms",
        endpoint_url=endpoint,
        region_name="us-east-1",
        aws_access_key_id=cred.access_key_id,
        aws_secret_access_key=cred.secret_access_key,
        config=Config(retries={"max_attempts": 1, "mode": "standard"}, **config),
    )


@pytest.fixture(scope="module")
def audit_path(daemon: DaemonThread) -> Path:
    assert daemon.config.state_dir is not None
    return daemon.config.state_dir / "audit.jsonl"


#: The one credential of the worker apps of :func:`apps`.
COHERENCE_ENV = {
    "ENCLAVE_KMS_ACCESS_KEY_ID": "AKIDCOH",
    "ENCLAVE_KMS_SECRET_ACCESS_KEY": "coherence",
}


@pytest.fixture
def apps(tmp_path: Path) -> Iterator[Any]:
    """Two worker apps over one store, in this process: each has its own descriptors (as
    separate processes would), so the cross-process writer lock and the shared generation are
    the real ones."""
    config = KmsConfig(state_dir=tmp_path / "kms", audit_fsync=False)
    lock = prepare_state(config, env=COHERENCE_ENV)
    a = build_worker_app(config, env=COHERENCE_ENV)
    b = build_worker_app(config, env=COHERENCE_ENV)
    yield a, b
    a.close()
    b.close()
    lock.release()
