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
    assert (r.cpu_count, r.cid, r.name, r.debug) == (1, 10, "n", False)
    r = load_config(_cfg(tmp_path, {**base, "cpu_ids": [0], "attach_console": True}))
    assert r.cpu_ids == (0,)
    assert r.debug
    assert r.attach_console
    r = load_config(_cfg(tmp_path, {**base, "cpu_count": 1}), attach_console=True)
    assert r.debug
    r = load_config(_cfg(tmp_path, {**base, "cpu_count": 1, "strict_isolation": True}))
    assert r.strict_isolation
    cases = [
        (_cfg(tmp_path, base), "E01"),
        (_cfg(tmp_path, {**base, "cpu_count": 1, "cpu_ids": [0]}), "E02"),
        (_cfg(tmp_path, None, raw="{not json"), "E17"),
        (_cfg(tmp_path, {"memory_mib": 1, "cpu_count": 1}), "E17"),
        (_cfg(tmp_path, {**base, "memory_mib": "1G", "cpu_count": 1}), "E17"),
        (_cfg(tmp_path, {**base, "cpu_count": 1, "enclave_cid": 3}), "E29"),
        (str(tmp_path / "missing.json"), "E19"),
    ]
    for path, code in cases:
        with pytest.raises(NitroCliError) as ei:
            load_config(path)
        assert ei.value.code == code, (path, ei.value)


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


def test_run_enclave_error_codes_and_messages(enclave_state_dir, tmp_path, capsys):
    eif = tmp_path / "a.eif"
    eif.write_bytes(b"x" * 1024)
    assert main(["run-enclave", "--eif-path", str(eif), "--memory", "12K", "--cpu-count", "1"]) == 3
    assert (
        main(
            [
                "run-enclave",
                "--eif-path",
                str(eif),
                "--memory",
                "128",
                "--cpu-count",
                "1",
                "--enclave-cid",
                "3",
            ]
        )
        == 3
    )
    assert main(["run-enclave", "--eif-path", str(eif), "--memory", "32", "--cpu-count", "1"]) == 26
    assert main(["run-enclave", "--eif-path", str(eif), "--memory", "0", "--cpu-count", "1"]) == 26
    assert (
        main(
            [
                "run-enclave",
                "--eif-path",
                str(tmp_path / "nope.eif"),
                "--memory",
                "128",
                "--cpu-count",
                "1",
            ]
        )
        == 19
    )
    assert (
        main(["run-enclave", "--eif-path", str(eif), "--memory", "128", "--cpu-count", "64"]) == 22
    )
    assert main(["run-enclave", "--eif-path", str(eif), "--memory", "128", "--cpu-ids", "63"]) == 21
    assert (
        main(["run-enclave", "--eif-path", str(eif), "--memory", "128", "--cpu-ids", "0", "0"])
        == 20
    )
    assert main(["run-enclave", "--eif-path", str(eif), "--memory", "9G", "--cpu-count", "1"]) == 27
    # a file that is not an EIF: the supervisor refuses it (E35) and nothing is left
    assert (
        main(["run-enclave", "--eif-path", str(eif), "--memory", "128", "--cpu-count", "1"]) == 35
    )
    err = capsys.readouterr().err
    assert (
        "[ E26 ] Insufficient memory requested. User provided `memory` is 32 MB, but based "
        "on the EIF file size, the minimum memory should be 64 MB" in err
    )
    assert "[ E26 ] Cannot start an enclave with no memory" in err
    assert "https://docs.aws.amazon.com/enclaves/latest/user/cli-errors.html#E26" in err
    assert "Start allocating memory..." in err
    assert list((enclave_state_dir / "enclaves").glob("*.json")) == []


def test_describe_terminate_console_without_enclaves(enclave_state_dir, capsys):
    assert main(["describe-enclaves"]) == 0
    assert capsys.readouterr().out == "[]\n"
    assert main(["terminate-enclave", "--all"]) == 0
    assert capsys.readouterr().out == "[]\n"
    assert main(["terminate-enclave", "--enclave-name", "nobody"]) == 58
    assert "[ E58 ] No enclave matched the given name." in capsys.readouterr().err
    assert (
        main(["terminate-enclave", "--enclave-id", "i-0123456789abcdef-enc0123456789abcdef"]) == 39
    )
    assert main(["console", "--enclave-name", "nobody"]) == 58
    with pytest.raises(SystemExit) as se:  # exactly one of the three (argparse, like clap)
        main(["terminate-enclave", "--all", "--enclave-name", "x"])
    assert se.value.code == 2


def test_explain(capsys):
    assert main(["explain", "--error-code", "E26"]) == 0
    err = capsys.readouterr().err
    assert err.startswith("E26: Insufficient memory requested.")
    assert main(["explain", "--error-code", "E99"]) == 3


def test_enclave_id_and_names(enclave_state_dir, tmp_path):
    st = StateDir(Path(enclave_state_dir))
    iid = st.instance_id()
    assert re.fullmatch(r"i-[0-9a-f]{16}", iid)
    assert st.instance_id() == iid
    eid = st.new_enclave_id()
    m = re.fullmatch(r"(i-[0-9a-f]{16})-enc([0-9a-f]{16})", eid)
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
        "i-0000000000000000-enc0000000000000001",
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
    assert list(d)[-4:] == ["ImageName", "ImageVersion", "Metadata", "Isolation"]
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
