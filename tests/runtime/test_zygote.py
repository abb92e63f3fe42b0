"""Warm start: the zygote path runs the measured image's code, with the same sandbox as the
fresh path, and both report the same environment."""

from __future__ import annotations

import importlib.machinery
import json
import sys
import textwrap
import types

import pytest
import trio

from runtime.api import open_runtime
from runtime.errors import NitroCliError
from tests.runtime.test_lifecycle_support import OP_TIMEOUT_S, _fresh_logging, console_json

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


LAZY = textwrap.dedent("""
    import importlib.util, json, os, sys
    import models, transport
    import models.client, transport.logs  # not pre-imported by the zygote: imported lazily here
    print("RESULT " + json.dumps({
        "app": APP,
        "pythonpath": os.environ["PYTHONPATH"].split(":")[0],
        "files": [m.__file__ for m in (models, transport, models.client, transport.logs)],
        "models_main": importlib.util.find_spec("models.__main__") is not None,
    }), flush=True)
    import time; time.sleep(120)
""")


async def test_zygote_outlives_the_enclave_it_was_started_for(enclave_state_dir, enclave_app):
    """Images sharing a bootstrap share a zygote; its bootstrap must not be the first
    enclave's tree, and each enclave imports lazily from its own verified tree."""
    x = enclave_app("APP = 'x'\n" + LAZY, name="x")
    y = enclave_app("APP = 'y'\n" + LAZY, name="y")
    with trio.fail_after(OP_TIMEOUT_S * 2):
        async with open_runtime(enclave_state_dir) as rt:
            a = await rt.run_enclave(x, cpu_count=1, memory_mib=256, debug=True)
            ra = await console_json(rt, a.enclave_id)
            zygote_dirs = sorted((enclave_state_dir / "zygotes").iterdir())
            await rt.terminate(a.enclave_id)
            b = await rt.run_enclave(y, cpu_count=1, memory_mib=256, debug=True)
            assert b.measurements["PCR1"] == a.measurements["PCR1"]
            assert b.measurements["PCR0"] != a.measurements["PCR0"]
            rb = await console_json(rt, b.enclave_id)
            await rt.terminate(b.enclave_id)
            c = await rt.run_enclave(x, cpu_count=1, memory_mib=256, debug=True)
            rc = await console_json(rt, c.enclave_id)
            # one zygote served all three
            assert sorted((enclave_state_dir / "zygotes").iterdir()) == zygote_dirs
    for res, app in ((ra, "x"), (rb, "y"), (rc, "x")):
        assert res["app"] == app
        assert res["models_main"] is True
        # every enclave-side module resolves in the enclave's own (verified) bootstrap
        assert all(f.startswith(res["pythonpath"] + "/") for f in res["files"]), res
    assert ra["pythonpath"] != rb["pythonpath"]  # each image has its own tree
    assert not (enclave_state_dir / "zygotes").exists() or not any(
        (enclave_state_dir / "zygotes").iterdir()
    )


def _fake_module(name: str, file: str | None, path: list[str] | None = None) -> types.ModuleType:
    mod = types.ModuleType(name)
    mod.__file__ = file
    spec = importlib.machinery.ModuleSpec(name, None, origin=file, is_package=path is not None)
    if path is not None:
        mod.__path__ = path
        spec.submodule_search_locations = path
    mod.__spec__ = spec
    return mod


def test_rebase_uses_the_zygotes_record_and_falls_back_when_modules_changed(tmp_path, monkeypatch):
    """The per-enclave rebase walks only the zygote's recorded bootstrap modules (not every
    pre-imported module), moves exactly what names the zygote's tree, and walks everything
    again when ``sys.modules`` no longer matches the record."""
    from runtime import _zygote_main as zm

    old, new = str(tmp_path / "zyg" / "bootstrap"), str(tmp_path / "enc" / "bootstrap")
    pkg = _fake_module("_zt_pkg", f"{old}/_zt_pkg/__init__.py", [f"{old}/_zt_pkg"])
    leaf = _fake_module("_zt_pkg.leaf", f"{old}/_zt_pkg/leaf.py")
    other = _fake_module("_zt_other", f"{old}-not/_zt_other.py")  # a sibling, not the tree
    for m in (pkg, leaf, other):
        monkeypatch.setitem(sys.modules, m.__name__, m)
    monkeypatch.setattr(zm, "_BOOTSTRAP_MODULES", None)

    zm._refresh_bootstrap_modules(old)
    recorded = zm._current_bootstrap_modules()
    assert recorded is not None
    assert {pkg, leaf} <= set(recorded)
    assert other not in recorded
    # the record is a small part of what is imported (this process: the whole test stack)
    assert len(recorded) < len(sys.modules) // 2

    zm.rebase_modules(old, new, recorded)
    assert pkg.__file__ == f"{new}/_zt_pkg/__init__.py"
    assert pkg.__path__ == [f"{new}/_zt_pkg"]
    assert pkg.__spec__.origin == pkg.__file__
    assert leaf.__file__ == f"{new}/_zt_pkg/leaf.py"
    assert other.__file__ == f"{old}-not/_zt_other.py"

    # a module imported after the record: the child no longer trusts it and walks everything
    late = _fake_module("_zt_pkg.late", f"{old}/_zt_pkg/late.py")
    monkeypatch.setitem(sys.modules, late.__name__, late)
    assert zm._current_bootstrap_modules() is None
    zm.rebase_modules(old, new, zm._current_bootstrap_modules())
    assert late.__file__ == f"{new}/_zt_pkg/late.py"
    zm._refresh_bootstrap_modules(old)  # the zygote re-records before its next fork
    assert zm._current_bootstrap_modules() is not None


def test_forget_finders_drops_only_the_zygotes_tree(tmp_path, monkeypatch):
    """The child keeps the other cached finders (marked stale by invalidate_caches, so they
    re-list as the enclave sees them) and loses every one of the zygote's tree."""
    from runtime import _zygote_main as zm

    old = str(tmp_path / "zyg" / "bootstrap")
    keep = str(tmp_path / "site-packages")
    for key in (old, f"{old}/models", f"{old}-not", keep):
        monkeypatch.setitem(sys.path_importer_cache, key, None)
    zm.forget_finders(old)
    assert old not in sys.path_importer_cache
    assert f"{old}/models" not in sys.path_importer_cache
    assert f"{old}-not" in sys.path_importer_cache
    assert keep in sys.path_importer_cache
