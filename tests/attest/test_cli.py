"""``enclave attest verify|root`` through runtime.cli.main."""

from __future__ import annotations

import base64
import json
import os
import stat
from pathlib import Path

import pytest

from attest.ca import LocalCA
from attest.nsm import protocol as p
from attest.nsm.device import EnclaveIdentity, NsmDevice
from runtime.cli import main

from .helpers import FIXTURE_DEBUG, FIXTURE_PROD, MODULE_ID, PROD_PCRS, pcr

PROD_AT = "2024-09-07T14:37:39.545Z"


@pytest.fixture(autouse=True)
def _no_global_logging(monkeypatch: pytest.MonkeyPatch) -> None:
    # main() configures structlog for the process; keep that out of the other tests
    monkeypatch.setattr("runtime.cli.configure_logging", lambda *a, **k: None)


DEBUG_AT = "2024-09-07T14:38:06.508Z"


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, dict[str, object], str]:
    code = main(["attest", "verify", *argv])
    out, err = capsys.readouterr()
    return code, json.loads(out), err


def fixture(shared_dir: Path, name: str) -> str:
    return str(shared_dir / "nitro-fixtures" / name)


def test_prod_fixture_with_expected_pcrs(
    shared_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = [fixture(shared_dir, FIXTURE_PROD), "--root", "aws", "--at", PROD_AT]
    for i, value in PROD_PCRS.items():
        args += ["--expect-pcr", f"{i}={value}"]
    code, report, _ = run(capsys, *args, "--nonce", "01" * 1024, "--max-age", "5")
    assert code == 0
    assert report["ok"] is True
    assert report["failed_step"] is None
    assert report["module_id"] == "i-0a22e5c5f24d22174-enc0191cceb4289903f"
    assert report["timestamp"] == 1725719859545
    assert report["digest"] == "SHA384"
    assert report["pcrs"]["0"] == PROD_PCRS[0]  # type: ignore[index]
    assert report["nonce"] == "01" * 1024
    assert report["debug"] is False
    certs = report["certificates"]
    assert isinstance(certs, list)
    assert len(certs) == 5
    assert certs[-1]["subject"] == "CN=aws.nitro-enclaves,OU=AWS,O=Amazon,C=US"
    assert certs[0]["not_after"] == "2024-09-07T17:37:39Z"
    names = [(c["step"], c["ok"]) for c in report["checks"]]  # type: ignore[union-attr]
    assert ("chain", True) in names
    assert ("signature", True) in names
    assert all(ok for _, ok in names)


def test_prod_fixture_wrong_pcr(shared_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, report, err = run(
        capsys,
        fixture(shared_dir, FIXTURE_PROD),
        "--at",
        PROD_AT,
        "--expect-pcr",
        "PCR0=" + "00" * 48,
    )
    assert code == 6
    assert report["failed_step"] == "policy"
    assert "step policy" in err
    assert "PCR0" in err


def test_outside_window_is_a_chain_failure(
    shared_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, report, _err = run(
        capsys, fixture(shared_dir, FIXTURE_PROD), "--at", "2024-09-07T22:00:00Z"
    )
    assert code == 4
    assert report["failed_step"] == "chain"
    assert "expired" in str(report["reason"])
    assert report["module_id"] is not None
    assert len(report["certificates"]) == 5


def test_debug_fixture(shared_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = fixture(shared_dir, FIXTURE_DEBUG)
    code, report, _ = run(capsys, path, "--at", DEBUG_AT)
    assert code == 6
    assert report["failed_step"] == "policy"
    assert "debug" in str(report["reason"])
    code, report, err = run(capsys, path, "--at", DEBUG_AT, "--allow-debug")
    assert code == 0
    assert report["debug"] is True
    assert "PCR values were not checked" in err
    assert "note" in report


def test_raw_cbor_stdin_and_flipped(
    shared_dir: Path,
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    raw = base64.b64decode((shared_dir / "nitro-fixtures" / FIXTURE_PROD).read_bytes())
    raw_file = tmp_path / "doc.cbor"
    raw_file.write_bytes(raw)
    assert run(capsys, str(raw_file), "--at", PROD_AT)[0] == 0
    flipped = bytearray(raw)
    flipped[-1] ^= 1
    raw_file.write_bytes(bytes(flipped))
    code, report, _ = run(capsys, str(raw_file), "--at", PROD_AT)
    assert code == 5
    assert report["failed_step"] == "signature"

    import io
    import sys

    class _Stdin:
        buffer = io.BytesIO(base64.b64encode(raw))

    monkeypatch.setattr(sys, "stdin", _Stdin())
    assert run(capsys, "-", "--at", PROD_AT)[0] == 0


def test_garbage_is_a_parse_failure(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad"
    bad.write_bytes(b"not a document at all \x00\x01")
    code, report, _ = run(capsys, str(bad))
    assert code == 3
    assert report["failed_step"] == "parse"
    assert report["module_id"] is None


def test_policy_file_and_root_choice(
    shared_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    policy = tmp_path / "policy.json"
    policy.write_text(json.dumps({"measurements": [{"pcrs": {"PCR0": PROD_PCRS[0]}}]}))
    path = fixture(shared_dir, FIXTURE_PROD)
    assert run(capsys, path, "--at", PROD_AT, "--policy", str(policy))[0] == 0
    other = LocalCA.load_or_create(tmp_path / "ca")
    pem = tmp_path / "other.pem"
    pem.write_bytes(other.root_pem)
    code, report, _ = run(capsys, path, "--at", PROD_AT, "--root", str(pem))
    assert code == 4
    assert "trust root" in str(report["reason"])


def test_root_command_and_local_documents(
    enclave_state_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["attest", "root"]) == 0
    pem = capsys.readouterr().out
    assert pem.startswith("-----BEGIN CERTIFICATE-----")
    assert main(["attest", "root", "--state-dir", str(enclave_state_dir)]) == 0
    assert capsys.readouterr().out == pem  # created once, kept
    ca = LocalCA.load_or_create(enclave_state_dir / "ca")
    device = NsmDevice(
        EnclaveIdentity(MODULE_ID, {0: pcr(1), 1: pcr(2), 2: pcr(3)}), ca.new_signer(MODULE_ID)
    )
    doc = p.decode_response(device.handle(p.encode_request(p.Attestation(nonce=b"\xab"))))
    path = tmp_path / "local.doc"
    path.write_bytes(doc.document)  # type: ignore[union-attr]
    code, report, _ = run(
        capsys,
        str(path),
        "--root",
        "local",
        "--nonce",
        "ab",
        "--expect-pcr",
        f"0={pcr(1).hex()}",
        "--max-age",
        "60",
    )
    assert code == 0
    assert report["module_id"] == MODULE_ID
    code, report, _ = run(capsys, str(path))  # default roots: aws + local (state dir has a CA)
    assert code == 0
    code, report, _ = run(capsys, str(path), "--root", "aws")
    assert code == 4


def test_bad_flags(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    doc = tmp_path / "d"
    doc.write_bytes(b"\x84")
    assert main(["attest", "verify", str(doc), "--expect-pcr", "zero"]) == 1
    assert "N=HEX" in capsys.readouterr().err
    assert main(["attest", "verify", str(tmp_path / "missing")]) == 1
    with pytest.raises(SystemExit):
        main(["attest", "verify"])


def test_root_creates_its_state_directory_0700(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Issue 10 item 3: ``attest root`` created its state directory 0755 (the README says
    0700), parents included. Now every directory it creates is 0700, whatever the umask."""
    old = os.umask(0o022)
    try:
        state = tmp_path / "new" / "state"
        assert main(["attest", "root", "--state-dir", str(state)]) == 0
    finally:
        os.umask(old)
    assert capsys.readouterr().out.startswith("-----BEGIN CERTIFICATE-----")
    for d in (tmp_path / "new", state, state / "ca"):
        assert stat.S_IMODE(d.stat().st_mode) == 0o700, d


@pytest.mark.parametrize("mode", [0o775, 0o757, 0o777])
def test_root_refuses_a_state_directory_others_can_write(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], mode: int
) -> None:
    state = tmp_path / "shared"
    state.mkdir()
    state.chmod(mode)
    assert main(["attest", "root", "--state-dir", str(state)]) != 0
    err = capsys.readouterr().err
    assert err.startswith("error: the state directory")
    assert "writable by other users" in err
    assert "chmod 700" in err
    assert not (state / "ca").exists()  # no CA key was written there


def test_root_refuses_a_file_as_state_directory(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    f = tmp_path / "file"
    f.write_text("x")
    assert main(["attest", "root", "--state-dir", str(f)]) != 0
    assert capsys.readouterr().err.startswith("error: the state directory")
