"""The embedding API: the block owns everything; errors and cancellation leak nothing."""

from __future__ import annotations

import pytest
import trio

from runtime.api import ExitKind, open_runtime
from runtime.errors import NitroCliError
from tests.runtime._enclave_helpers import (
    OP_TIMEOUT_S,
    _fresh_logging,
    assert_no_leftovers,
    fabric_cids,
)

pytestmark = pytest.mark.slow


class _Boom(Exception):
    pass


async def test_error_in_block_terminates_enclaves(enclave_state_dir, enclave_app):
    eif = enclave_app("import time\ntime.sleep(120)\n")
    seen = []
    with (
        trio.fail_after(OP_TIMEOUT_S),
        pytest.RaisesGroup(_Boom, allow_unwrapped=True, flatten_subgroups=True),
    ):
        async with open_runtime() as rt:  # ENCLAVE_STATE_DIR from the fixture
            assert rt.state_dir == enclave_state_dir
            info = await rt.run_enclave(eif, cpu_count=1, memory_mib=128)
            seen.append(info)
            raise _Boom
    info = seen[0]
    assert info.app_pid is not None
    assert_no_leftovers(enclave_state_dir, info.enclave_id, [info.app_pid])
    assert fabric_cids(enclave_state_dir) == []


async def test_plugin_fixture_runtime(enclave_runtime, enclave_app):
    eif = enclave_app("print('bye')\n")
    with trio.fail_after(OP_TIMEOUT_S):
        info = await enclave_runtime.run_enclave(eif, cpu_count=1, memory_mib=128)
        reason = await enclave_runtime.wait_exited(info.enclave_id)
    assert (reason.kind, reason.code) == (ExitKind.EXITED, 0)
    with pytest.raises(NitroCliError) as ei:
        await enclave_runtime.wait_exited("i-0000000000000000-enc0000000000000000")
    assert ei.value.code == "E39"


__all__ = ["_fresh_logging"]  # autouse fixture (re-exported on purpose)
