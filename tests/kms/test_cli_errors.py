"""Issue 10: every `enclave kms ...` user error is ONE `error:` line on stderr, no traceback, a
non-zero status: bad flags, missing files, a second daemon, a busy port, an unsafe policy."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import trio

pytestmark = [pytest.mark.slow, pytest.mark.timeout(90)]

PCR = "ab" * 48
OWNER = "arn:aws:iam::111122223333:user/model-owner"
ENCLAVE = "arn:aws:iam::111122223333:role/inference-enclave"


def _env(tmp_path: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        ENCLAVE_STATE_DIR=str(tmp_path / "global"),
        ENCLAVE_KMS_ACCESS_KEY_ID="AKIDCLI",
        ENCLAVE_KMS_SECRET_ACCESS_KEY="cli-secret",
        ENCLAVE_LOG_LEVEL="warning",
    )
    env.pop("ENCLAVE_KMS_MASTER_KEY", None)
    return env


def _enclave(argv: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "runtime.cli", *argv],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
    )


def _assert_one_error_line(out: subprocess.CompletedProcess[str], *needles: str) -> str:
    assert out.returncode != 0, out
    assert "Traceback" not in out.stderr, out.stderr
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, out.stderr
    assert lines[0].startswith("error: "), lines
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


@pytest.mark.parametrize(
    ("argv", "needles"),
    [
        (["kms"], ["KMS_COMMAND"]),
        (["kms", "serve", "--bogus"], ["--bogus"]),
        (["kms", "serve", "--list", "127.0.0.1:0"], ["--list"]),  # no abbreviations
        (["kms", "serve", "--listen", "nope"], ["--listen", "nope"]),
        (["kms", "serve", "--listen", "http://127.0.0.1:4599"], ["without a scheme"]),
        (["kms", "serve", "--config", "/nonexistent/kms.toml"], ["/nonexistent/kms.toml"]),
        (["kms", "serve", "--seed", "/nonexistent/seed.yaml"], ["/nonexistent/seed.yaml"]),
        (["kms", "serve", "--trust-root", "/nonexistent/root.pem"], ["/nonexistent/root.pem"]),
        (["kms", "audit", "verify", "/nonexistent/audit.jsonl"], ["/nonexistent/audit.jsonl"]),
        (["kms", "audit"], ["AUDIT_COMMAND"]),
        (["kms", "serve", "--workers", "0"], ["--workers", "1..64", "got 0"]),
        (["kms", "serve", "--workers", "65"], ["--workers", "got 65"]),
        (["kms", "serve", "--workers", "two"], ["--workers", "'two'"]),
        (["kms", "serve", "--workers", "-1"], ["--workers"]),
        (["kms", "serve", "--workers"], ["--workers", "expected one argument"]),
        (["kms", "enclave-policy", "--enclave", ENCLAVE, "--pcr", f"0={PCR}"], ["--admin"]),
        (
            ["kms", "enclave-policy", "--admin", OWNER, "--enclave", ENCLAVE, "--pcr", "0=zz"],
            ["PCR0"],
        ),
        (
            ["kms", "enclave-policy", "--admin", OWNER, "--enclave", ENCLAVE, "--pcr", "x"],
            ["--pcr"],
        ),
        (
            ["kms", "enclave-policy", "--admin", OWNER, "--enclave", ENCLAVE],
            ["PCR0"],
        ),
        # Issue 10 item 1: one principal for both roles releases the key without attestation.
        (
            ["kms", "enclave-policy", "--admin", ENCLAVE, "--enclave", ENCLAVE],
            ["also matches the enclave principal", "without attestation"],
        ),
        (
            [
                "kms",
                "enclave-policy",
                "--admin",
                "arn:aws:iam::111122223333:root",
                "--enclave",
                ENCLAVE,
                "--pcr",
                f"0={PCR}",
            ],
            ["also matches the enclave principal"],
        ),
    ],
)
def test_user_errors_are_one_line(tmp_path: Path, argv: list[str], needles: list[str]) -> None:
    if argv[:2] == ["kms", "enclave-policy"] and "--admin" in argv and ENCLAVE in argv[3:4]:
        argv = [*argv, "--pcr", f"0={PCR}"]
    _assert_one_error_line(_enclave(argv, _env(tmp_path)), *needles)


def test_enclave_policy_with_two_principals_prints_the_policy(tmp_path: Path) -> None:
    argv = ["kms", "enclave-policy", "--admin", OWNER, "--enclave", ENCLAVE, "--pcr", f"0={PCR}"]
    out = _enclave(argv, _env(tmp_path))
    assert out.returncode == 0, out.stderr
    assert ENCLAVE in out.stdout
    assert OWNER in out.stdout


async def _start(state: Path, env: dict[str, str], *extra: str) -> tuple[trio.Process, Path]:
    log_path = state.parent / f"daemon-{uuid.uuid4().hex}.log"
    with log_path.open("ab") as log_file:
        proc = await trio.lowlevel.open_process(
            [sys.executable, "-m", "kms", "--state-dir", str(state), *extra],
            env=env,
            stderr=log_file,
        )
    return proc, log_path


async def _wait_for(proc: trio.Process, log_path: Path, pattern: bytes) -> re.Match[bytes]:
    with trio.fail_after(30):
        while (m := re.search(pattern, log_path.read_bytes())) is None:
            if proc.poll() is not None:
                raise AssertionError(log_path.read_text())
            await trio.sleep(0.02)
    return m


async def test_second_daemon_on_the_same_state_dir_is_one_error_line(tmp_path: Path) -> None:
    env = _env(tmp_path)
    state = tmp_path / "kms"
    first, log_path = await _start(state, env, "--listen", "127.0.0.1:0")
    try:
        await _wait_for(first, log_path, rb"kms listening on ")
        second = await trio.run_process(
            [sys.executable, "-m", "runtime.cli", "kms", "serve", "--state-dir", str(state),
             "--listen", "127.0.0.1:0"],
            env=env, capture_stdout=True, capture_stderr=True, check=False,
        )  # fmt: skip
        out = subprocess.CompletedProcess(
            second.args, second.returncode, second.stdout.decode(), second.stderr.decode()
        )
        _assert_one_error_line(out, "in use by another KMS daemon", f"pid {first.pid}")
    finally:
        first.terminate()
        with trio.fail_after(20):
            await first.wait()
    assert first.returncode == 0


def test_busy_port_is_one_error_line(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        out = _enclave(
            ["kms", "serve", "--state-dir", str(tmp_path / "kms"), "--listen", f"127.0.0.1:{port}"],
            _env(tmp_path),
        )
    _assert_one_error_line(out, f"127.0.0.1:{port}")


def test_broken_audit_chain_is_one_error_line_and_the_flag_starts(tmp_path: Path) -> None:
    env = _env(tmp_path)
    state = tmp_path / "kms"

    async def run_once(*extra: str) -> None:
        proc, log_path = await _start(state, env, "--listen", "127.0.0.1:0", *extra)
        try:
            await _wait_for(proc, log_path, rb"kms listening on ")
        finally:
            proc.terminate()
            with trio.fail_after(20):
                await proc.wait()

    trio.run(run_once)
    audit = state / "audit.jsonl"
    audit.write_text(audit.read_text() + '{"seq": 99, "prev": "x", "mac": "00"}\n')
    out = _enclave(["kms", "serve", "--state-dir", str(state), "--listen", "127.0.0.1:0"], env)
    _assert_one_error_line(out, "audit log", "--start-despite-broken-audit-chain")
    trio.run(run_once, "--start-despite-broken-audit-chain")
    assert any(p.name.startswith("audit.broken-") for p in state.iterdir())


# ------------------------------------------------------------------ the one policy builder


def test_demo_model_key_policy_is_expressible_with_the_builder() -> None:
    """Issue 11: runtime/demo.py's model_key_policy is one call of kms.policy's builder."""
    from kms.policy import KeyPolicy, enclave_key_policy
    from runtime.stack import INSTANCE_ARN, OWNER_ARN, model_key_policy

    pcr0 = "cd" * 48
    built = enclave_key_policy(
        admin_principal=OWNER_ARN,
        enclave_principal=INSTANCE_ARN,
        pcrs={0: pcr0},
        actions=("kms:Decrypt",),
        admin_actions=(
            "kms:CreateAlias",
            "kms:DescribeKey",
            "kms:GenerateDataKey",
            "kms:GetKeyPolicy",
            "kms:PutKeyPolicy",
            "kms:EnableKey",
            "kms:DisableKey",
        ),
        admin_sid="ModelOwnerAdministersAndSeals",
        enclave_sid="OnlyTheAttestedServerImageMayDecrypt",
    )
    assert built == model_key_policy(pcr0)
    KeyPolicy.parse(json.dumps(built))


@pytest.mark.parametrize(
    ("admin", "admin_actions", "refused"),
    [
        (ENCLAVE, ("kms:*",), True),
        ("111122223333", ("kms:*",), True),  # an account principal matches every principal
        ("arn:aws:iam::111122223333:root", ("kms:Decrypt",), True),
        ("*", ("kms:*",), True),
        (ENCLAVE, ("kms:Describe*", "kms:PutKeyPolicy"), False),  # nothing released
        ("arn:aws:iam::444455556666:root", ("kms:*",), False),  # another account
        (OWNER, ("kms:*",), False),
    ],
)
def test_builder_refuses_an_admin_that_matches_the_enclave(
    admin: str, admin_actions: tuple[str, ...], refused: bool
) -> None:
    from kms.policy import enclave_key_policy

    def build() -> object:
        return enclave_key_policy(
            admin_principal=admin,
            enclave_principal=ENCLAVE,
            pcrs={0: PCR},
            admin_actions=admin_actions,
        )

    if refused:
        with pytest.raises(ValueError, match="without attestation"):
            build()
    else:
        build()


def test_workers_shared_file_unusable_is_one_error_line(tmp_path: Path) -> None:
    """The parent opens the workers' shared file before any worker starts: a state directory
    where it cannot be opened fails as one line, not as a worker's traceback."""
    state = tmp_path / "kms"
    (state / "kms.shared").mkdir(parents=True)
    state.chmod(0o700)
    argv = ["kms", "serve", "--listen", "127.0.0.1:0", "--state-dir", str(state)]
    out = _enclave([*argv, "--workers", "2"], _env(tmp_path))
    _assert_one_error_line(out, "kms.shared")
