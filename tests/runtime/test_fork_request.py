"""The zygote's fork request is a :class:`runtime.sandbox.ForkRequest` (issue 11, "Typed
faces": ``prefork_spare``'s factory took ``dict[str, Any]``): its sandbox fields are
:class:`SandboxSpec`'s, and the zygote builds the enclave's spec from exactly those keys."""

from __future__ import annotations

import dataclasses
import json
import typing

from runtime import _zygote_main, sandbox
from runtime.sandbox import ForkRequest, ForkSandbox, SandboxSpec

REQUEST: ForkRequest = {
    "sandbox": {
        "enclave_id": "i-0123456789abcdef0-enc0123456789abcdef",
        "cpu_ids": [1, 3],
        "memory_mib": 256,
        "image_root": "/var/lib/enclave/img",
        "strict": True,
        "cwd": "/app",
        "outside_uid": 100017,
        "max_tasks": 64,
    },
    "env": {"A": "1"},
    "bootstrap_dir": "/var/lib/enclave/bootstrap",
    "console": True,
    "attach_cgroup": False,
}


def test_the_shapes_are_on_the_sandbox_face() -> None:
    assert {"ForkRequest", "ForkSandbox"} <= set(sandbox.__all__)
    assert typing.get_args(sandbox.SpareFactory)[0] == [ForkRequest, list[int]]


def test_fork_sandbox_names_sandbox_spec_fields() -> None:
    fields = {f.name for f in dataclasses.fields(SandboxSpec)}
    assert set(typing.get_type_hints(ForkSandbox)) <= fields


def test_the_zygote_builds_the_spec_from_the_typed_request() -> None:
    req = json.loads(json.dumps(REQUEST))  # as it arrives on the zygote's socket
    spec, child = _zygote_main._build(sandbox, req, [10, 11, 12, 13], "/zygote/bootstrap")
    assert callable(child)
    s = REQUEST["sandbox"]
    assert spec == SandboxSpec(
        enclave_id=s["enclave_id"],
        cpu_ids=(1, 3),
        memory_mib=s["memory_mib"],
        image_root=s["image_root"],
        fds={3: 10, 4: 11, 5: 12},
        console_fd=13,
        strict=True,
        cwd="/app",
        outside_uid=100017,
        max_tasks=64,
    )
