"""``enclave demo`` as a real process, stopped by real signals (issue 10): Ctrl-C (SIGINT to
the terminal's whole foreground process group) and SIGTERM (to the demo's pid, as ``kill``
sends it) stop everything, print no traceback and leave no state directory (it holds the CA root
key, the KMS database and the sealed model), no enclave cgroup and no process behind. With
``--keep`` the demo prints one ready-to-run ``enclave infer`` line per served model."""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from runtime.sandbox import CGROUP_MEMORY_ROOT

pytestmark = pytest.mark.slow

#: Bound on any one phase of a demo run (start-up, a step, the shutdown) on a loaded machine.
PHASE_TIMEOUT_S = 90.0
_ENCLAVE_ID = re.compile(r"\benclave (i-[0-9a-f]+-enc[0-9a-f]+)\b")


class Demo:
    """A running ``enclave demo`` in a session (and process group) of its own, like a command
    in the foreground of a terminal; its stderr is collected line by line."""

    def __init__(self, *args: str) -> None:
        env = {k: v for k, v in os.environ.items() if k != "ENCLAVE_LOG_LEVEL"}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "runtime.cli", "demo", *args],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
            start_new_session=True,
        )
        self.lines: list[str] = []
        self.stdout = ""
        self._changed = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            with self._changed:
                self.lines.append(line.rstrip("\n"))
                self._changed.notify_all()
        with self._changed:
            self._changed.notify_all()

    @property
    def stderr(self) -> str:
        return "\n".join(self.lines)

    def wait_for(self, text: str) -> str:
        """The first stderr line containing ``text`` (waiting for it)."""
        deadline = time.monotonic() + PHASE_TIMEOUT_S
        with self._changed:
            while True:
                for line in self.lines:
                    if text in line:
                        return line
                if not self._reader.is_alive():
                    pytest.fail(f"the demo ended ({self.proc.returncode}):\n{self.stderr}")
                if time.monotonic() > deadline:
                    pytest.fail(f"no {text!r} within {PHASE_TIMEOUT_S} s:\n{self.stderr}")
                self._changed.wait(0.5)

    def state_dir(self) -> Path:
        return Path(self.wait_for("state directory ").split("state directory ", 1)[1].strip())

    def enclave_ids(self) -> set[str]:
        return {m.group(1) for line in self.lines for m in _ENCLAVE_ID.finditer(line)}

    def ctrl_c(self) -> None:
        """What a terminal does on Ctrl-C: SIGINT to the whole foreground process group."""
        os.killpg(self.proc.pid, signal.SIGINT)

    def finish(self) -> int:
        assert self.proc.stdout is not None
        self.stdout = self.proc.stdout.read()
        return self.proc.wait(PHASE_TIMEOUT_S)


@contextmanager
def demo(*args: str) -> Iterator[Demo]:
    d = Demo(*args)
    try:
        yield d
    finally:
        if d.proc.poll() is None:
            os.killpg(d.proc.pid, signal.SIGKILL)
            d.proc.wait()


def _session_processes(sid: int) -> list[str]:
    """Processes still in session ``sid`` (the demo's, since it was started in a new one)."""
    left = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # ended while we looked
        if int(fields[3]) == sid:
            left.append(stat.parent.name)
    return left


def _processes_naming(path: Path) -> list[str]:
    """Processes whose command line names ``path`` (the zygote, enclave helpers...)."""
    left = []
    needle = str(path).encode()
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if needle in cmdline.read_bytes():
                left.append(cmdline.parent.name)
        except OSError:
            continue
    return left


def _assert_nothing_left(d: Demo, state_dir: Path) -> None:
    assert "Traceback" not in d.stderr + d.stdout, d.stderr
    assert not state_dir.exists(), f"{state_dir} left behind"
    for enclave_id in d.enclave_ids():
        slot = enclave_id.rpartition("-enc")[2]
        assert not (CGROUP_MEMORY_ROOT / slot).exists(), f"cgroup of {enclave_id} left behind"
    # Processes may take a moment to be reaped after the demo's exit.
    deadline = time.monotonic() + 10
    while (left := _session_processes(d.proc.pid) + _processes_naming(state_dir)) and (
        time.monotonic() < deadline
    ):
        time.sleep(0.1)
    assert not left, f"processes left behind: {left}"


def test_keep_prints_a_working_infer_line_per_model_and_ctrl_c_stops_all() -> None:
    with demo("--keep") as d:
        state_dir = d.state_dir()
        d.wait_for("--keep: the stack stays up")
        d.wait_for("KMS at http://")  # the last of the instructions
        lines = [line.strip() for line in d.lines if " infer --endpoint " in line]
        served = re.findall(r"model '(\w+)' unsealed", d.stderr)
        assert served == ["digits", "minilm"]
        assert len(lines) == len(served)  # one per served model
        for line in lines:
            argv = shlex.split(line)
            assert Path(argv[0]).is_absolute()  # runs from any directory
            done = subprocess.run(
                argv, capture_output=True, text=True, timeout=PHASE_TIMEOUT_S, cwd="/"
            )
            assert done.returncode == 0, done.stderr
            answer = json.loads(done.stdout)
            assert answer["model"] == argv[argv.index("--model") + 1]
            assert answer["attestation"]["pcr16_matches_catalog"] is True
        assert len(d.enclave_ids()) == 2  # the server and the refused debug enclave
        d.ctrl_c()
        assert d.finish() == 130, d.stderr
    assert d.lines[-1].endswith("every service are gone"), d.stderr
    _assert_nothing_left(d, state_dir)


def test_sigterm_stops_the_demo_like_ctrl_c() -> None:
    with demo() as d:
        state_dir = d.state_dir()
        d.wait_for("client -> ingress")  # the server enclave is up
        assert d.enclave_ids()
        d.proc.send_signal(signal.SIGTERM)  # to the demo's pid only, as `kill PID` does
        assert d.finish() == 128 + signal.SIGTERM, d.stderr
    assert "SIGTERM: stopping everything" in d.stderr
    _assert_nothing_left(d, state_dir)


def test_ctrl_c_during_start_up() -> None:
    with demo() as d:
        state_dir = d.state_dir()  # the first line: services are starting
        d.ctrl_c()
        assert d.finish() == 130, d.stderr
    _assert_nothing_left(d, state_dir)
