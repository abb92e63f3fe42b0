"""The in-enclave init's launch parameters (issue 11, "Typed faces"): ``run`` takes a
:class:`LaunchParameters` TypedDict, and what arrives on ``ENCLAVE_INIT_FD`` is checked
against it before anything runs (a bad document: exit 127 and one line on stderr)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import typing
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import runtime.enclave_init as init
from runtime.enclave_init import INIT_FD_ENV, LaunchParameters

_TIMEOUT_S = 60


def test_the_typed_dict_names_the_wire_keys() -> None:
    assert "LaunchParameters" in init.__all__
    assert set(typing.get_type_hints(LaunchParameters)) == {"cmd", "cwd", "env"}
    assert LaunchParameters.__required_keys__ == frozenset({"cmd"})


def test_what_the_supervisor_sends_is_accepted_unchanged() -> None:
    sent = {"cmd": ["python3", "-m", "app"], "cwd": "/app"}
    assert init._parameters(json.loads(json.dumps(sent))) == sent
    full = {"cmd": ["/bin/true"], "cwd": "/", "env": {"A": "1"}}
    assert init._parameters(full) == full
    # null env / cwd: as if absent (the inherited environment, "/")
    assert init._parameters({"cmd": ["x"], "env": None, "cwd": None}) == {"cmd": ["x"]}


@pytest.mark.parametrize(
    "doc",
    [
        [],
        "cmd",
        {},
        {"cmd": "python3 -m app"},
        {"cmd": ["python3", 3]},
        {"cmd": ["x"], "cwd": 7},
        {"cmd": ["x"], "env": ["A=1"]},
        {"cmd": ["x"], "env": {"A": 1}},
        {"cmd": ["x"], "colour": "blue"},
    ],
)
def test_a_malformed_document_is_a_value_error(doc: object) -> None:
    with pytest.raises(ValueError, match="launch parameter"):
        init._parameters(doc)


_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=6),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner),
    max_leaves=12,
)


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(st.sampled_from(["cmd", "cwd", "env", "x"]), _JSON) | _JSON)
def test_any_json_document_is_parameters_or_a_value_error(doc: object) -> None:
    try:
        params = init._parameters(doc)
    except ValueError:
        return
    assert all(isinstance(a, str) for a in params["cmd"])
    assert isinstance(params.get("cwd", ""), str)
    assert all(isinstance(v, str) for v in params.get("env", {}).values())


def _init_with(document: bytes) -> subprocess.CompletedProcess[str]:
    r, w = os.pipe()
    try:
        os.write(w, document)
        os.close(w)
        env = {**os.environ, INIT_FD_ENV: str(r)}
        return subprocess.run(
            [sys.executable, "-P", "-m", "runtime.enclave_init"],
            env=env,
            pass_fds=(r,),
            capture_output=True,
            text=True,
            timeout=_TIMEOUT_S,
            cwd=Path(init.__file__).parents[2],
        )
    finally:
        os.close(r)


@pytest.mark.parametrize(
    "document", [b'{"cmd": "echo hi"}', b'{"cmd": ["echo"], "env": {"A": 1}}', b"[1]"]
)
def test_init_refuses_a_malformed_document_before_anything_runs(document: bytes) -> None:
    done = _init_with(document)
    assert done.returncode == 127
    assert done.stderr.startswith("enclave_init: bad launch parameters:")
    assert done.stdout == ""


def test_run_runs_the_typed_parameters(tmp_path: Path) -> None:
    code = (
        "import runtime.enclave_init as init\n"
        "params: init.LaunchParameters = {\n"
        f"    'cmd': [{sys.executable!r}, '-c', "
        "'import os; print(os.environ[\"GREETING\"], os.getcwd())'],\n"
        f"    'cwd': {str(tmp_path)!r},\n"
        "    'env': {'GREETING': 'hello'},\n"
        "}\n"
        "init.run(params, heartbeat=False)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=_TIMEOUT_S,
        cwd=Path(init.__file__).parents[2],
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["hello", str(tmp_path)]
