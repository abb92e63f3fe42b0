"""The README's recipes, run as written (issue 10), so the README cannot drift from the code.

A recipe is every fenced block that follows a ``<!-- recipe: NAME -->`` line, in README order.
Each recipe name has a runner here that executes the blocks with real processes in a temporary
directory and checks the outcome; a recipe without a runner, or a runner whose recipe is gone,
fails :func:`test_every_recipe_has_a_runner`.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
README = REPO / "README.md"
#: The whole path starts five services, three enclaves and a dozen CLI processes (the AWS CLI
#: alone takes seconds to start); this bounds the run on a loaded machine.
RECIPE_TIMEOUT_S = 400.0
_RECIPE = re.compile(r"^<!-- recipe: ([\w-]+) -->\n```(\w+)\n(.*?)^```$", re.S | re.M)
_OWNER = "arn:aws:iam::111122223333:user/model-owner"
_INSTANCE = "arn:aws:iam::111122223333:role/inference-enclave"
_DEBUG_PCR0 = "0" * 96


def recipes() -> dict[str, list[tuple[str, str]]]:
    """Recipe name -> its ``(language, code)`` blocks, in README order."""
    found: dict[str, list[tuple[str, str]]] = {}
    for name, lang, code in _RECIPE.findall(README.read_text()):
        found.setdefault(name, []).append((lang, code))
    return found


RUNNERS = {"whole-path", "pytest-plugin", "hyok", "kms-quickstart"}


def test_every_recipe_has_a_runner() -> None:
    assert set(recipes()) == RUNNERS


def _clean_env(tmp: Path) -> dict[str, str]:
    """The test's environment without anything a recipe sets itself; this interpreter's
    scripts (enclave, aws) first on PATH; no AWS configuration files."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("ENCLAVE_", "AWS_", "PYTEST_")) and k != "PYTHONPATH"
    }
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.update(TMPDIR=str(tmp), AWS_CONFIG_FILE=os.devnull, AWS_SHARED_CREDENTIALS_FILE=os.devnull)
    return env


@pytest.fixture
def short_tmp() -> Iterator[Path]:
    """A short private directory (Unix socket paths are limited to 108 bytes)."""
    path = Path(tempfile.mkdtemp(prefix="er-rd-"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def _can_isolate_network() -> bool:
    unshare = shutil.which("unshare")
    if unshare is None or os.geteuid() != 0:
        return False
    done = subprocess.run([unshare, "--net", "true"], capture_output=True, timeout=30)
    return done.returncode == 0


@pytest.mark.skipif(not _can_isolate_network(), reason="needs root and unshare --net")
@pytest.mark.skipif(shutil.which("jq") is None, reason="the recipe uses jq")
def test_whole_path_recipe(short_tmp: Path) -> None:
    """Two principals, a key policy from ``enclave kms enclave-policy``, a client policy with
    PCR16 from ``enclave pcr``: the server is given the model key and answers; the same image
    in debug mode is refused it."""
    blocks = recipes()["whole-path"]
    assert all(lang == "bash" for lang, _ in blocks)
    work = short_tmp / "w"
    work.mkdir()
    (work / "models").symlink_to(REPO / "models")  # the recipe runs from the checkout
    # The README's blocks as they are, after a prologue that fails fast and stops whatever
    # the recipe started. The recipe's fixed ports (4599, 5005) live in a network namespace of
    # this run's own (loopback only), so nothing else on the machine can collide with them.
    script = "\n".join(
        [
            "set -euo pipefail",
            "trap 'enclave terminate-enclave --all >/dev/null 2>&1 || true;"
            " kill $(jobs -p) 2>/dev/null || true; wait' EXIT",
            *(code for _, code in blocks),
        ]
    )
    (work / "recipe.sh").write_text(script + "\n")
    done = subprocess.run(
        ["unshare", "--net", "bash", "-c", "ip link set lo up && exec bash recipe.sh"],
        cwd=work,
        env=_clean_env(short_tmp),
        capture_output=True,
        text=True,
        timeout=RECIPE_TIMEOUT_S,
    )
    assert done.returncode == 0, f"{done.stdout}\n{done.stderr}"

    # The client verified the image and the model, and got every answer.
    measurements = json.loads((work / "build.json").read_text())["Measurements"]
    answer = json.loads((work / "answer.json").read_text())
    assert answer["model"] == "digits"
    assert answer["attestation"]["pcr0"] == measurements["PCR0"]
    assert answer["attestation"]["pcr16_matches_catalog"] is True
    assert answer["outputs"]["label"]["shape"] == [450]
    # The key policy names two principals, the enclave's one with the image's PCRs.
    statements = json.loads((work / "key-policy.json").read_text())["Statement"]
    principals = [s["Principal"]["AWS"] for s in statements]
    assert principals == [_OWNER, _INSTANCE]
    conditions = statements[1]["Condition"]["StringEqualsIgnoreCase"]
    assert conditions["kms:RecipientAttestation:ImageSha384"] == measurements["PCR0"].lower()
    # The audit log: the owner sealed, the instance's attested server got the key, the debug
    # enclave (PCR0 zeros) was refused it, and nobody decrypted without an attestation.
    (state_dir,) = short_tmp.glob("er-*")
    audit = [json.loads(line) for line in (state_dir / "kms" / "audit.jsonl").open()]
    decrypts = [r for r in audit if r["operation"] == "Decrypt"]
    sealing = [r for r in audit if r["operation"] == "GenerateDataKey"]
    assert [r["principal"] for r in sealing] == [_OWNER]
    assert [(r["principal"], r["decision"]) for r in decrypts] == [
        (_INSTANCE, "allow"),
        (_INSTANCE, "deny"),
    ]
    assert decrypts[0]["recipient"]["image_sha384"] == measurements["PCR0"].lower()
    assert decrypts[1]["recipient"]["image_sha384"] == _DEBUG_PCR0
    reports = [json.loads(line) for line in (work / "store.jsonl").open()][1:]
    assert reports[0]["error"] is None
    assert not reports[1]["models"][0]["available"]


def test_pytest_plugin_example_in_a_fresh_project(short_tmp: Path) -> None:
    """The README's plugin example, copied into an empty project (no conftest.py, no pytest
    configuration, no trio_mode), passes there."""
    ((lang, code),) = recipes()["pytest-plugin"]
    assert lang == "python"
    project = short_tmp / "project"
    project.mkdir()
    (project / "test_example.py").write_text(code + "\n")
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "test_example.py"],
        cwd=project,
        env=_clean_env(short_tmp),
        capture_output=True,
        text=True,
        timeout=RECIPE_TIMEOUT_S,
    )
    assert done.returncode == 0, f"{done.stdout}\n{done.stderr}"
    assert re.search(r"\b3 passed\b", done.stdout), done.stdout


@pytest.mark.skipif(not _can_isolate_network(), reason="needs root and unshare --net")
def test_hyok_recipe(short_tmp: Path) -> None:
    """The owner's XKS proxy and the KMS as the README starts them; the AWS CLI creates and
    connects an external key store, creates a key in it, encrypts and decrypts; the owner
    disables its key in its proxy and the next Decrypt is refused with AWS's error. The sealed
    file's outer layer opens with the owner's key file alone (checked here with
    ``cryptography``), the inner one never leaves the KMS."""
    import hashlib

    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    from kms.ciphertext import encode_context
    from kms.keystores import blob as xks_blob
    from kms.xks.codec import gcm_aad

    blocks = recipes()["hyok"]
    assert all(lang == "bash" for lang, _ in blocks)
    work = short_tmp / "w"
    work.mkdir()
    script = "\n".join(
        [
            "set -euo pipefail",
            "trap 'kill $(jobs -p) 2>/dev/null || true; wait' EXIT",
            *(code for _, code in blocks),
        ]
    )
    (work / "recipe.sh").write_text(script + "\n")
    done = subprocess.run(
        ["unshare", "--net", "bash", "-c", "ip link set lo up && exec bash recipe.sh"],
        cwd=work,
        env=_clean_env(short_tmp),
        capture_output=True,
        text=True,
        timeout=RECIPE_TIMEOUT_S,
    )
    assert done.returncode == 0, f"{done.stdout}\n{done.stderr}"
    assert (work / "state.txt").read_text().strip() == "CONNECTED"
    assert (work / "opened.txt").read_bytes() == (work / "plain.txt").read_bytes()
    assert "KMSInvalidStateException" in (work / "refused.txt").read_text()
    # The outer layer is the owner's AES-256-GCM under its key file; inside is KMS's layer.
    sealed = xks_blob.parse((work / "sealed.bin").read_bytes())
    context = {"app": "models"}
    aad = sealed.header + hashlib.sha256(encode_context(context)).digest()
    inner = AESGCM((work / "owner-key.bin").read_bytes()).decrypt(
        sealed.iv, sealed.ciphertext + sealed.tag, gcm_aad(aad, sealed.ciphertext_metadata)
    )
    assert len(inner) == 12 + len(b"model weights") + 16
    assert b"model weights" not in inner
    # The proxy saw each KMS request under its id, and said why it refused the last one.
    (state_dir,) = short_tmp.glob("er-*")
    audit = [json.loads(line) for line in (state_dir / "kms" / "audit.jsonl").open()]
    decrypts = [r for r in audit if r["operation"] == "Decrypt"]
    assert [r["status"] for r in decrypts] == [200, 400]
    assert decrypts[-1]["error"] == "KMSInvalidStateException"
    xks_log = (work / "xks.log").read_text()
    for record in decrypts:
        assert record["request_id"] in xks_log


@pytest.mark.skipif(not _can_isolate_network(), reason="needs root and unshare --net")
def test_kms_quickstart_recipe(short_tmp: Path) -> None:
    """ "Starting the daemon" and "Using it with the AWS CLI and boto3" as written: the config
    with two principals, the daemon, the AWS CLI's round trip of ``hello`` through Encrypt and
    Decrypt under an alias, and the boto3 snippet's data key. The daemon's start line runs in
    the background here (a user runs it in its own terminal); nothing else is changed."""
    blocks = recipes()["kms-quickstart"]
    assert [lang for lang, _ in blocks] == ["sh", "sh", "python"]
    (_, start), (_, cli), (_, snippet) = blocks
    serve = "enclave kms serve --config kms.toml"
    assert start.count(serve) == 1
    start = start.replace(serve, f"{serve} 2> kms.log &", 1)
    work = short_tmp / "w"
    work.mkdir()
    (work / "snippet.py").write_text(
        snippet + '\nassert len(dk["Plaintext"]) == 32, dk\nprint("data key ok")\n'
    )
    script = "\n".join(
        [
            "set -euo pipefail",
            "trap 'kill $(jobs -p) 2>/dev/null || true; wait' EXIT",
            start,
            "for _ in $(seq 600); do grep -qs 'kms listening' kms.log && break; sleep 0.1; done",
            cli.rstrip() + " > decrypted.txt",
            f"{sys.executable} snippet.py",
        ]
    )
    (work / "recipe.sh").write_text(script + "\n")
    env = _clean_env(short_tmp)
    env["ENCLAVE_STATE_DIR"] = str(short_tmp / "state")
    done = subprocess.run(
        ["unshare", "--net", "bash", "-c", "ip link set lo up && exec bash recipe.sh"],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
        timeout=RECIPE_TIMEOUT_S,
    )
    log = (work / "kms.log").read_text() if (work / "kms.log").exists() else ""
    assert done.returncode == 0, f"{done.stdout}\n{done.stderr}\n{log}"
    assert (work / "decrypted.txt").read_text() == "hello"
    assert "data key ok" in done.stdout
