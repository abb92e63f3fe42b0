"""nitro-cli surface: flags, rules, error codes and JSON shapes (no enclave needed here)."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest

from runtime.cli import main
from runtime.cli._common import load_config, parse_cid, parse_memory
from runtime.errors import NitroCliError
from runtime.records import EnclaveInfo
from runtime.state import Allocator, StateDir, parse_cpu_pool
from tests.runtime.test_lifecycle_support import _fresh_logging


@pytest.mark.parametrize(
    ("text", "mib"),
    [
        ("512", 512),
        ("512M", 512),
        ("512m", 512),
        ("2G", 2048),
        ("2g", 2048),
        ("1T", 1048576),
        ("0", 0),
    ],
)
def test_memory_grammar(text, mib):
    assert parse_memory(text) == mib


@pytest.mark.parametrize("text", ["", "M", "12K", "1.5G", "-1", "2GB", "0x10", "1 G"])
def test_memory_grammar_rejects(text):
    with pytest.raises(NitroCliError) as ei:
        parse_memory(text)
    assert ei.value.code == "E03"
    assert ei.value.exit_code == 3


def test_cid_rules(capsys):
    assert parse_cid("4") == 4
    assert parse_cid("4294967294") == 4294967294
    assert parse_cid("0") is None
    assert (
        "The enclave CID will be auto-generated as the provided CID is 0" in capsys.readouterr().err
    )
    for text, fragment in [
        ("1", "well-known CID"),
        ("2", "well-known CID"),
        ("4294967295", "well-known CID"),
        ("3", "CID of the parent VM"),
        ("4294967296", "higher than the maximum supported (u32 max)"),
        ("abc", "`enclave-cid` is not a number"),
        ("-5", "`enclave-cid` is not a number"),
    ]:
        with pytest.raises(NitroCliError) as ei:
            parse_cid(text)
        assert ei.value.code == "E03", text
        assert fragment in ei.value.message, text


_N = [0]


def _cfg(tmp_path: Path, obj: object, raw: str | None = None) -> str:
    _N[0] += 1
    p = tmp_path / f"cfg{_N[0]}.json"
    p.write_text(raw if raw is not None else json.dumps(obj))
    return str(p)


def test_config_rules(tmp_path):
    base = {"eif_path": "x.eif", "memory_mib": 256}
    r = load_config(
        _cfg(
            tmp_path,
            {**base, "cpu_count": 1, "enclave_cid": 10, "enclave_name": "n", "unknown_key": [1]},
        )
    )
    assert (r.launch.cpu_count, r.launch.cid, r.launch.name, r.launch.debug) == (1, 10, "n", False)
    r = load_config(_cfg(tmp_path, {**base, "cpu_ids": [0], "attach_console": True}))
    assert r.launch.cpu_ids == (0,)
    assert r.launch.debug
    assert r.attach_console
    r = load_config(_cfg(tmp_path, {**base, "cpu_count": 1, "strict_isolation": True}))
    assert r.launch.strict_isolation
    cases = [
        (_cfg(tmp_path, base), "E01"),
        (_cfg(tmp_path, {**base, "cpu_count": 1, "cpu_ids": [0]}), "E02"),
        (_cfg(tmp_path, None, raw="{not json"), "E17"),
        (_cfg(tmp_path, {"memory_mib": 1, "cpu_count": 1}), "E17"),
        (_cfg(tmp_path, {**base, "memory_mib": "1G", "cpu_count": 1}), "E17"),
        (_cfg(tmp_path, {**base, "cpu_count": 1, "enclave_cid": 3}), "E29"),
        (str(tmp_path / "missing.json"), "E19"),
        (str(tmp_path), "E19"),  # a directory: not a regular file
    ]
    for path, code in cases:
        with pytest.raises(NitroCliError) as ei:
            load_config(path)
        assert ei.value.code == code, (path, ei.value)


def test_config_attach_console_comes_from_the_json_only(tmp_path):
    """nitro-cli: with --config, --attach-console on the command line is accepted and
    ignored; the JSON's attach_console decides (and implies debug mode)."""
    from runtime.cli import build_parser
    from runtime.cli.run_enclave import request_from_args

    base = {"eif_path": "x.eif", "memory_mib": 256, "cpu_count": 1}
    plain = _cfg(tmp_path, base)
    args = build_parser().parse_args(["run-enclave", "--config", plain, "--attach-console"])
    req = request_from_args(args)
    assert not req.attach_console
    assert not req.launch.debug
    attached = _cfg(tmp_path, {**base, "attach_console": True})
    req = request_from_args(build_parser().parse_args(["run-enclave", "--config", attached]))
    assert req.attach_console
    assert req.launch.debug
    assert req.wait_ready_s is None
    # our --wait-ready is not a field of nitro-cli's JSON: it applies with --config
    argv = ["run-enclave", "--config", plain, "--wait-ready", "5"]
    assert request_from_args(build_parser().parse_args(argv)).wait_ready_s == 5.0


def test_run_enclave_usage_errors_exit_2(enclave_state_dir, tmp_path, capsys):
    eif = tmp_path / "a.eif"
    eif.write_bytes(b"x")
    cfg = _cfg(tmp_path, {"eif_path": str(eif), "memory_mib": 128, "cpu_count": 1})
    for argv in (
        ["run-enclave", "--eif-path", str(eif), "--memory", "128"],  # no cpu flag
        [
            "run-enclave",
            "--eif-path",
            str(eif),
            "--memory",
            "128",
            "--cpu-count",
            "1",
            "--cpu-ids",
            "0",
        ],  # both
        ["run-enclave", "--eif-path", str(eif), "--cpu-count", "1"],  # no memory
        ["run-enclave", "--memory", "128", "--cpu-count", "1"],  # no eif
        ["run-enclave", "--config", cfg, "--memory", "128"],  # config + flag
        ["run-enclave", "--config", cfg, "--debug-mode"],
    ):
        assert main(argv) == 2, argv
    assert "cannot be used with" in capsys.readouterr().err
    # --config with --attach-console is allowed (gets past usage; the 1-byte EIF is E35)
    assert main(["run-enclave", "--config", cfg, "--attach-console"]) == 35


def _run(eif: Path, *extra: str) -> int:
    return main(["run-enclave", "--eif-path", str(eif), *extra])


def test_run_enclave_error_codes_and_messages(enclave_state_dir, tmp_path, capsys):
    eif = tmp_path / "a.eif"
    eif.write_bytes(b"x" * 1024)
    assert _run(eif, "--memory", "12K", "--cpu-count", "1") == 3
    assert _run(eif, "--memory", "128", "--cpu-count", "1", "--enclave-cid", "3") == 3
    assert _run(eif, "--memory", "0", "--cpu-count", "1") == 26
    assert _run(tmp_path / "nope.eif", "--memory", "128", "--cpu-count", "1") == 19
    assert _run(eif, "--memory", "128", "--cpu-count", "64") == 22
    assert _run(eif, "--memory", "128", "--cpu-ids", "63") == 21
    assert _run(eif, "--memory", "128", "--cpu-ids", "0", "0") == 20
    assert _run(eif, "--memory", "9G", "--cpu-count", "1") == 27
    # a file that is not an EIF: the supervisor refuses it (E35) and nothing is left
    assert _run(eif, "--memory", "128", "--cpu-count", "1") == 35
    err = capsys.readouterr().err
    assert "[ E26 ] Insufficient memory requested." in err
    assert "Cannot start an enclave with no memory" in err
    assert "https://docs.aws.amazon.com/enclaves/latest/user/cli-errors.html#E26" in err
    assert "Start allocating memory..." in err
    assert "Traceback" not in err
    assert list((enclave_state_dir / "enclaves").glob("*.json")) == []


def test_memory_below_eif_ratio_is_e26_and_below_64_mib_is_e29(enclave_state_dir, tmp_path, capsys):
    """nitro-cli: less than 4x the EIF size is E26 (InsufficientMemoryRequested, naming both
    sizes); less than the driver's 64 MiB minimum is the driver's refusal, E29 (IoctlFailure)."""
    big = tmp_path / "big.eif"
    with open(big, "wb") as f:
        f.truncate(20 << 20)  # 20 MiB: 80 MiB needed
    assert _run(big, "--memory", "70", "--cpu-count", "1") == 26
    err = capsys.readouterr().err
    assert (
        "[ E26 ] Insufficient memory requested. User provided `memory` is 70 MB, but based on "
        "the EIF file size, the minimum memory should be 80 MB" in err
    )
    small = tmp_path / "small.eif"
    small.write_bytes(b"x" * 1024)
    assert _run(small, "--memory", "32", "--cpu-count", "1") == 29
    err = capsys.readouterr().err
    assert "\n[ E29 ] Ioctl failure." in err
    assert "at least 64 MiB" in err


@pytest.mark.parametrize(
    ("flags", "param", "value"),
    [
        (["--cpu-count", "1z"], "cpu-count", "1z"),  # nitro-cli's own `explain E03` example
        (["--cpu-ids", "0", "x"], "cpu-id", "x"),
        (["--cpu-count", "-1"], "cpu-count", "-1"),
    ],
)
def test_non_numeric_cpu_flags_are_e03(enclave_state_dir, tmp_path, capsys, flags, param, value):
    eif = tmp_path / "a.eif"
    eif.write_bytes(b"x")
    assert _run(eif, "--memory", "128", *flags) == 3
    err = capsys.readouterr().err
    assert err.startswith(
        f"[ E03 ] Invalid argument provided. The parameter `{param}` is not a valid integer "
        f"(`{value}`)"
    )
    assert "Traceback" not in err
    assert "usage:" not in err


def test_non_numeric_disconnect_timeout_is_e03(enclave_state_dir, capsys):
    argv = ["console", "--enclave-id", "i-0123456789abcdef0-enc0123456789abcdef"]
    assert main([*argv, "--disconnect-timeout", "soon"]) == 3
    assert "The parameter `disconnect-timeout` is not a valid integer (`soon`)" in (
        capsys.readouterr().err
    )


def test_describe_terminate_console_without_enclaves(enclave_state_dir, capsys):
    assert main(["describe-enclaves"]) == 0
    assert capsys.readouterr().out == "[]\n"
    assert main(["terminate-enclave", "--all"]) == 0
    assert capsys.readouterr().out == "[]\n"
    assert main(["terminate-enclave", "--enclave-name", "nobody"]) == 58
    err = capsys.readouterr().err
    assert err.startswith("[ E58 ] Naming error.")
    assert "No enclave matched the given name." in err
    assert main(["console", "--enclave-name", "nobody"]) == 58
    with pytest.raises(SystemExit) as se:  # exactly one of the three (argparse, like clap)
        main(["terminate-enclave", "--all", "--enclave-name", "x"])
    assert se.value.code == 2


def test_unknown_enclave_id_is_e11(enclave_state_dir, capsys):
    """nitro-cli cannot connect to the socket of an enclave process that does not exist:
    E11 (SocketError), for terminate-enclave and console alike."""
    unknown = "i-0123456789abcdef0-enc0123456789abcdef"
    assert main(["terminate-enclave", "--enclave-id", unknown]) == 11
    assert main(["console", "--enclave-id", unknown]) == 11
    err = capsys.readouterr().err
    assert err.count("[ E11 ] Socket error.") == 2
    assert unknown in err


def test_explain_prints_only_the_description(capsys):
    assert main(["explain", "--error-code", "E26"]) == 0
    captured = capsys.readouterr()
    assert captured.err.startswith("Insufficient memory requested.")
    assert "E26" not in captured.err
    assert "https://" not in captured.err
    assert main(["explain", "--error-code", "E03"]) == 0
    assert "--cpu-count 1z" in capsys.readouterr().err
    # an unknown code: nitro-cli's line, and still exit 0
    assert main(["explain", "--error-code", "E99"]) == 0
    assert capsys.readouterr().err == "No such error code E99\n"
    assert main(["explain", "--error-code", "banana"]) == 0
    assert capsys.readouterr().err == "No such error code banana\n"


def test_sign_eif_missing_arguments_are_e01(tmp_path, capsys):
    for argv in (
        ["sign-eif"],
        ["sign-eif", "--eif-path", "x.eif"],
        ["sign-eif", "--eif-path", "x.eif", "--signing-certificate", "c.pem"],
    ):
        assert main(argv) == 1, argv
        err = capsys.readouterr().err
        assert err.startswith("[ E01 ] Missing mandatory argument. User did not provide the `")
        assert "Traceback" not in err


def test_error_layout_is_description_message_link():
    """nitro-cli's layout: ``[ Exx ] <the code's fixed description>``, then (ours) the
    specific message, a blank line and the help link; the exit status is the code's number."""
    from runtime.errors import EnclaveBootError, InvalidArgumentError, error_for_code

    err = EnclaveBootError("Enclave boot failed: no heartbeat within 60 s")
    lines = err.cli_report().split("\n")
    assert lines[0].startswith("[ E36 ] Enclave boot failure. Such error appears when")
    assert lines[1] == "Enclave boot failed: no heartbeat within 60 s"
    assert lines[2] == ""
    assert lines[3] == "For more details, please visit " + (
        "https://docs.aws.amazon.com/enclaves/latest/user/cli-errors.html#E36"
    )
    assert err.exit_code == 36
    assert err.code == EnclaveBootError.code == "E36"
    bad = InvalidArgumentError("`cpu-count` is not a number", info=("cpu-count", "1z"))
    assert bad.cli_report().startswith(
        "[ E03 ] Invalid argument provided. The parameter `cpu-count` is not a valid integer (`1z`)"
    )
    assert isinstance(bad, ValueError)  # argument misuse from Python
    rebuilt = error_for_code("E36", "x")
    assert type(rebuilt) is EnclaveBootError


def test_enclave_id_and_names(enclave_state_dir, tmp_path):
    st = StateDir(Path(enclave_state_dir))
    iid = st.instance_id()
    assert re.fullmatch(r"i-[0-9a-f]{17}", iid)  # 17 hex digits, as real instance ids
    assert st.instance_id() == iid
    eid = st.new_enclave_id()
    m = re.fullmatch(r"(i-[0-9a-f]{17})-enc([0-9a-f]{16})", eid)
    assert m
    assert m.group(1) == iid
    import time

    ts_ms = int(m.group(2)[:12], 16)  # 48-bit ms timestamp + 16 random bits
    assert abs(ts_ms - time.time() * 1000) < 60_000
    eif = tmp_path / "server.eif"
    eif.write_bytes(b"x")
    names = []
    for _ in range(3):
        r = (
            st.reserve(
                eif_path=str(eif),
                memory_mib=65,
                cpu_count=None,
                cpu_ids=[0],
                cid=None,
                name=None,
                debug=False,
                owner_pid=os.getpid(),
            )
            if not names
            else None
        )
        if r is None:
            break
        names.append(r.enclave_name)
        assert r.memory_mib == 66  # rounded up to 2 MiB pages
    (enclave_state_dir / "instance-id").write_text("i-0123456789abcdef\n")  # an old 16-digit id
    assert re.fullmatch(r"i-[0-9a-f]{17}", StateDir(Path(enclave_state_dir)).instance_id())
    st2 = StateDir(Path(enclave_state_dir))
    (enclave_state_dir / "allocator.yaml").write_text("memory_mib: 4096\ncpu_pool: 0,0-1\n")
    r2 = st2.reserve(
        eif_path=str(eif),
        memory_mib=64,
        cpu_count=1,
        cpu_ids=None,
        cid=None,
        name=None,
        debug=False,
        owner_pid=os.getpid(),
    )
    assert [names[0], r2.enclave_name] == ["server", "server_1"]
    # records of a dead owner are stale and vanish
    st.write_record(r2, owner_pid=2**22 + 12345)
    assert [r.enclave_name for r in st.records()] == ["server"]


def test_allocator_yaml():
    assert parse_cpu_pool("2,3,6-9") == (2, 3, 6, 7, 8, 9)
    with pytest.raises(NitroCliError):
        Allocator.from_mapping({"cpu_count": 1, "cpu_pool": "0"})
    with pytest.raises(NitroCliError):
        Allocator.from_mapping({"memory": 1})
    a = Allocator.from_mapping({"memory_mib": 512, "cpu_count": 1})
    assert a.memory_mib == 512
    assert len(a.cpu_pool) == 1


def test_describe_json_shape():
    info = EnclaveInfo(
        "n",
        "i-00000000000000000-enc0000000000000001",
        42,
        16,
        (1, 3),
        1600,
        debug=True,
        measurements={"PCR0": "a" * 96, "PCR1": "b" * 96, "PCR2": "c" * 96, "PCR8": "d" * 96},
    )
    out = json.dumps([info.describe_json()], indent=2)
    assert out.startswith('[\n  {\n    "EnclaveName": "n",\n    "EnclaveID"')
    assert '"CPUIDs": [\n      1,\n      3\n    ],' in out
    assert '"HashAlgorithm": "Sha384 { ... }",' in out
    d = info.describe_json(metadata=True)
    assert list(d)[-5:] == ["ImageName", "ImageVersion", "Metadata", "Isolation", "AppStatus"]
    assert list(info.describe_json()) == [  # nitro-cli's keys only, without --metadata
        "EnclaveName",
        "EnclaveID",
        "ProcessID",
        "EnclaveCID",
        "NumberOfCPUs",
        "CPUIDs",
        "MemoryMiB",
        "State",
        "Flags",
        "Measurements",
    ]
    assert list(d["Measurements"]) == ["HashAlgorithm", "PCR0", "PCR1", "PCR2", "PCR8"]
    assert list(info.run_json()) == [
        "EnclaveName",
        "EnclaveID",
        "ProcessID",
        "EnclaveCID",
        "NumberOfCPUs",
        "CPUIDs",
        "MemoryMiB",
    ]


__all__ = ["_fresh_logging"]  # autouse fixture (re-exported on purpose)
