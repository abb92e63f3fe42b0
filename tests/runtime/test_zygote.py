"""Warm start: the zygote path runs the measured image's code, with the same sandbox as the
fresh path, and both report the same environment."""

from __future__ import annotations

import json
import textwrap

import pytest
import trio

from runtime.api import open_runtime
from runtime.errors import NitroCliError
from tests.runtime._enclave_helpers import OP_TIMEOUT_S, _fresh_logging, console_json

pytestmark = pytest.mark.slow

WHO = textwrap.dedent("""
    import json, os, sys
    import runtime.enclave_init, transport
    print("RESULT " + json.dumps({
        "init": runtime.enclave_init.__file__,
        "transport": transport.__file__,
        "numpy_preloaded": "numpy" in sys.modules,
        "pythonpath": os.environ["PYTHONPATH"].split(":")[0],
        "threads": len(os.listdir("/proc/self/task")) if os.path.isdir("/proc/self/task") else None,
        "exe": sys.executable,
    }), flush=True)
    import time; time.sleep(120)
""")


@pytest.mark.parametrize("zygote", [True, False])
async def test_code_comes_from_the_verified_image(enclave_state_dir, enclave_app, zygote):
    eif = enclave_app(WHO)
    with trio.fail_after(OP_TIMEOUT_S):
        async with open_runtime(enclave_state_dir, zygote=zygote) as rt:
            info = await rt.run_enclave(eif, cpu_count=1, memory_mib=256, debug=True)
            res = await console_json(rt, info.enclave_id)
            images = enclave_state_dir / "images"
            assert res["pythonpath"].startswith(str(images))
            # init and the enclave-side packages are the image's bootstrap copies
            assert res["init"].startswith(res["pythonpath"] + "/runtime/enclave_init/")
            assert res["transport"].startswith(res["pythonpath"] + "/transport/")
            assert res["numpy_preloaded"] is zygote
            if zygote:
                second = await rt.run_enclave(eif, cpu_count=1, memory_mib=256, debug=True)
                res2 = await console_json(rt, second.enclave_id)
                assert res2["init"] == res["init"]
    print(json.dumps(res))
    assert not images.exists()  # the runtime's image cache is removed with it


async def test_tampered_cached_image_is_refused_before_the_app_runs(enclave_state_dir, enclave_app):
    eif = enclave_app("import time\nprint('RESULT {}', flush=True)\ntime.sleep(60)\n")
    with trio.fail_after(OP_TIMEOUT_S):
        async with open_runtime(enclave_state_dir) as rt:
            first = await rt.run_enclave(eif, cpu_count=1, memory_mib=256, debug=True)
            await rt.terminate(first.enclave_id)
            # tamper with the runtime's cached, verified tree (as root could)
            [main_py] = (enclave_state_dir / "images").glob("rt-*/*/app/rootfs/main.py")
            main_py.chmod(0o644)
            main_py.write_text("print('tampered code runs', flush=True)\n")
            with pytest.raises(NitroCliError) as ei:
                await rt.run_enclave(eif, cpu_count=1, memory_mib=256, debug=True)
            assert ei.value.code == "E36"
            assert rt.describe() == []


__all__ = ["_fresh_logging"]  # autouse fixture (re-exported on purpose)
