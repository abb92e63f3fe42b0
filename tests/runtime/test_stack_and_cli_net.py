"""Pure parts of the stack's building blocks (:mod:`runtime.stack`) and of the ``enclave``
command's safety net (:mod:`runtime.cli`): no processes, no event loop."""

from __future__ import annotations

import errno
import io
import json
from pathlib import Path

import pytest
import trio
from hypothesis import given
from hypothesis import strategies as st

from kms.policy import KeyPolicy, RequestContext
from runtime.cli import EXIT_INTERRUPTED, _report
from runtime.demo import Console, run_in_process
from runtime.errors import FileOperationError
from runtime.stack import (
    INSTANCE_ARN,
    OWNER_ARN,
    ModelStatus,
    ServerReport,
    key_policy_for_image,
)
from transport.errors import EnclaveError

_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=20,
)


@given(st.dictionaries(st.sampled_from(["error", "models", "port", "x"]) | st.text(), _JSON))
def test_server_report_reads_any_json_object(raw: dict[str, object]) -> None:
    """A report comes from the enclave: any JSON object reads, fields of the wrong type as
    absent, and only an explicit ``true`` counts as available."""
    report = ServerReport.from_json(raw)
    assert report.raw == raw
    assert all(isinstance(m, ModelStatus) for m in report.models)
    if report.ok:
        assert not raw.get("error")
        assert all(m.available for m in report.models)


def test_server_report_fields() -> None:
    report = ServerReport.from_json(
        {
            "error": None,
            "models": [
                {"name": "digits", "available": True, "reason": None},
                {"name": "vault", "available": "yes", "reason": "AccessDenied"},
                "junk",
            ],
        }
    )
    assert report.models == (
        ModelStatus("digits", True, None),
        ModelStatus("vault", False, "AccessDenied"),
    )
    assert not report.ok
    assert report.model("vault") == ModelStatus("vault", False, "AccessDenied")
    assert report.model("nope") is None
    assert ServerReport.from_json({"models": []}).ok


def _decrypt(policy: KeyPolicy, principal: str, image_sha384: str | None) -> bool:
    conditions = {}
    if image_sha384 is not None:
        conditions["kms:RecipientAttestation:ImageSha384"] = (image_sha384,)
    ctx = RequestContext(principal, "kms:Decrypt", "arn:aws:kms:us-east-1:1:key/k", conditions)
    return policy.evaluate(ctx).allowed


def test_model_key_policy_releases_only_to_the_image() -> None:
    """The one policy builder of the stack: the instance decrypts only with the image's PCR0
    (never without an attestation, never as a debug enclave); the owner never decrypts."""
    pcr0 = "AB" * 48
    policy = KeyPolicy.parse(json.dumps(key_policy_for_image(pcr0)))
    assert _decrypt(policy, INSTANCE_ARN, pcr0.lower())
    assert not _decrypt(policy, INSTANCE_ARN, None)
    assert not _decrypt(policy, INSTANCE_ARN, "0" * 96)
    assert not _decrypt(policy, OWNER_ARN, pcr0)


def _line(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err


def test_net_unwraps_groups(capsys: pytest.CaptureFixture[str]) -> None:
    """trio nurseries wrap what escapes them: the net reports the telling leaf."""
    group = BaseExceptionGroup(
        "nursery", [trio.Cancelled._create(), ExceptionGroup("inner", [EnclaveError("no key")])]
    )
    assert _report(group, "model seal", debug=False) == 1
    assert _line(capsys) == "error: no key\n"
    interrupted = BaseExceptionGroup("nursery", [ValueError("x"), KeyboardInterrupt()])
    assert _report(interrupted, "infer", debug=False) == EXIT_INTERRUPTED
    assert _line(capsys) == "error: interrupted\n"


def test_net_lines(capsys: pytest.CaptureFixture[str]) -> None:
    assert _report(FileOperationError("cannot read x"), "pcr", debug=False) == 19
    block = _line(capsys)
    assert block.startswith("[ E19 ] File operation failure.")
    assert "\ncannot read x\n" in block
    busy = OSError(errno.EADDRINUSE, "Address already in use")
    assert _report(busy, "ingress", debug=False) == 1
    assert _line(capsys).startswith("error: ingress: address already in use")
    missing = FileNotFoundError(errno.ENOENT, "No such file or directory", "/x/y")
    assert _report(missing, "attest root", debug=False) == 1
    assert _line(capsys) == "error: attest root: /x/y: No such file or directory\n"
    on_fd = IsADirectoryError(errno.EISDIR, "Is a directory", 3)  # an fd names nothing
    assert _report(on_fd, "pcr", debug=False) == 1
    assert _line(capsys) == "error: pcr: Is a directory\n"
    assert _report(EnclaveError("two\nlines"), "kms serve", debug=False) == 1
    assert _line(capsys) == "error: two; lines\n"
    assert _report(ValueError("bug"), "infer", debug=False) == 1
    assert _line(capsys) == (
        "error: internal error: infer: ValueError: bug (run with --debug for the traceback)\n"
    )
    with pytest.raises(ValueError) as raised:
        raise ValueError("bug")  # so that it has a traceback to show
    assert _report(raised.value, "infer", debug=True) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err
    assert err.endswith("error: internal error: infer: ValueError: bug\n")


def test_demo_failure_ends_with_one_error_line(tmp_path: Path) -> None:
    """A demo that cannot even start its stack says so on one ``error:`` line, status 1."""
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("")
    log = io.StringIO()
    assert run_in_process(blocker / "state", out=Console(log)) == 1
    lines = log.getvalue().splitlines()
    assert lines[-1].startswith("error: demo: ")
    assert "FAILED" in lines[-2]
    assert "Traceback" not in log.getvalue()
