"""The enclave's filesystem: a private mount namespace with a minimal read-only root, and the
user namespace that maps the enclave's root to its own host uid.

The bind sources are opened while still real root and the tree is built before the user
namespace exists, so the mounts belong to a mount namespace the enclave's user namespace has no
power over (it cannot unmount or remount them). Runs in the child (standard library only).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import sys
from pathlib import Path

from . import _sys
from ._spec import SandboxSpec
from ._util import CLONE_NEWNS, CLONE_NEWUSER, DEV_NULL, mark

__all__ = [
    "TMP_SIZE",
    "ro_paths",
    "mount_point",
    "build_root",
    "write_id_maps",
    "private_root_then_userns",
]

#: Size of the enclave's private /tmp (charged to its memory cgroup).
TMP_SIZE = "16m"

_MS_RDONLY, _MS_NOSUID, _MS_NODEV, _MS_NOEXEC = 1, 2, 4, 8
_MS_REMOUNT, _MS_BIND, _MS_REC, _MS_PRIVATE = 32, 4096, 16384, 1 << 18
_MS_NOATIME, _MS_NODIRATIME, _MS_RELATIME = 1024, 2048, 1 << 21
_MNT_DETACH = 2
#: statvfs flags -> the mount flags a read-only remount must keep (locked by the kernel).
_ST_TO_MS = {
    1: _MS_RDONLY,
    2: _MS_NOSUID,
    4: _MS_NODEV,
    8: _MS_NOEXEC,
    1024: _MS_NOATIME,
    2048: _MS_NODIRATIME,
    4096: _MS_RELATIME,
}
_SYS_PIVOT_ROOT = 155


def ro_paths(spec: SandboxSpec) -> list[str]:
    paths = [
        spec.image_root,
        sys.base_prefix,
        sys.prefix,
        "/usr",
        "/etc/ld.so.cache",
        *spec.extra_ro,
    ]
    out: list[str] = []
    for p in paths:
        rp = os.path.realpath(p)
        if os.path.exists(rp) and rp not in out:
            out.append(rp)
    return out


def write_id_maps(pid: int, outside_uid: int) -> None:
    """(Parent, real root) map root of ``pid``'s user namespace to ``outside_uid`` (uid and gid),
    and nothing else: the enclave's files and processes belong to that uid alone."""
    Path(f"/proc/{pid}/uid_map").write_text(f"0 {outside_uid} 1\n")
    with contextlib.suppress(OSError):
        Path(f"/proc/{pid}/setgroups").write_text("deny")
    Path(f"/proc/{pid}/gid_map").write_text(f"0 {outside_uid} 1\n")


def private_root_then_userns(
    spec: SandboxSpec, bind_sources: list[str], sync_w: int, go_r: int
) -> dict[str, str]:  # pragma: no cover - runs in the child
    """Mount namespace + minimal root (as real root), /dev/null, then the user namespace
    (the parent writes the id maps between ``U`` and ``G``)."""
    layers: dict[str, str] = {}
    # The private mount tree is built while still real root (before NEWUSER): the binds can
    # reach /root and the 0700 state dir, and the resulting mounts belong to a mount ns that
    # the enclave's user ns has no power over (it cannot unmount or remount them).
    if _sys.libc.unshare(ctypes.c_int(CLONE_NEWNS)) == 0:
        try:
            build_root(spec, bind_sources)
            layers["mountns"] = "enforced (tmpfs root, read-only binds, no /proc)"
        except OSError as exc:
            layers["mountns"] = f"missing: minimal root failed: {exc}"
    else:
        layers["mountns"] = f"missing: unshare: {os.strerror(ctypes.get_errno())}"
    mark("mounts_done")
    DEV_NULL[:] = [os.open("/dev/null", os.O_RDWR | os.O_CLOEXEC)]
    userns = _sys.libc.unshare(ctypes.c_int(CLONE_NEWUSER)) == 0
    os.write(sync_w, b"U ok\n" if userns else b"U no\n")
    if os.read(go_r, 1) != b"G":
        os._exit(126)
    os.close(go_r)
    mark("id_maps_done")
    if userns:
        os.setresgid(0, 0, 0)
        os.setresuid(0, 0, 0)
        layers["userns"] = f"enforced (root inside = uid {spec.outside_uid} outside, its own)"
    else:
        layers["userns"] = "missing: unshare(CLONE_NEWUSER) refused"
    return layers


def _mount(
    src: str | None, target: str, fstype: str | None, flags: int, data: str | None = None
) -> None:
    ret = _sys.libc.mount(
        None if src is None else src.encode(),
        target.encode(),
        None if fstype is None else fstype.encode(),
        ctypes.c_ulong(flags),
        None if data is None else data.encode(),
    )
    _sys.check(ret, f"mount({src}, {target})")


def mount_point(spec: SandboxSpec) -> str:
    """An empty directory beside the image where the new root is assembled (private ns)."""
    return os.path.realpath(spec.image_root).rstrip("/") + ".root"


def build_root(spec: SandboxSpec, sources: list[str]) -> None:
    """Private mount tree: tmpfs root with read-only binds, then pivot_root into it."""
    _mount(None, "/", None, _MS_REC | _MS_PRIVATE)
    root = mount_point(spec)
    _mount("tmpfs", root, "tmpfs", _MS_NOSUID | _MS_NODEV, "mode=0755,size=1m")
    # /tmp first: binds of paths beneath /tmp (an image unpacked there) go on top of it.
    os.makedirs(root + "/tmp", exist_ok=True)
    _mount("tmpfs", root + "/tmp", "tmpfs", _MS_NOSUID | _MS_NODEV, f"mode=1777,size={TMP_SIZE}")
    for path in sources:
        target = root + path
        src = path
        if os.path.isdir(src):
            os.makedirs(target, exist_ok=True)
        else:
            os.makedirs(os.path.dirname(target), exist_ok=True)
            with open(target, "w"):
                pass
        flags = os.statvfs(src).f_flag
        _mount(src, target, None, _MS_BIND | _MS_REC)
        locked = 0
        for st, ms in _ST_TO_MS.items():
            if flags & st:
                locked |= ms
        _mount(
            None,
            target,
            None,
            _MS_REMOUNT | _MS_BIND | _MS_RDONLY | _MS_NOSUID | _MS_NODEV | locked,
        )
    for link, dest in (("lib", "usr/lib"), ("lib64", "usr/lib64"), ("bin", "usr/bin")):
        if not os.path.exists(root + "/" + link):
            os.symlink(dest, root + "/" + link)
    os.makedirs(root + "/dev", exist_ok=True)
    for dev in ("null", "zero", "urandom", "random"):
        with open(root + "/dev/" + dev, "w"):
            pass
        _mount("/dev/" + dev, root + "/dev/" + dev, None, _MS_BIND)
    os.makedirs(root + "/.oldroot", exist_ok=True)
    os.chdir(root)
    _sys.check(
        _sys.syscall(_SYS_PIVOT_ROOT, ctypes.c_char_p(b"."), ctypes.c_char_p(b".oldroot")),
        "pivot_root",
    )
    _sys.check(_sys.libc.umount2(b"/.oldroot", _MNT_DETACH), "umount2(oldroot)")
    os.rmdir("/.oldroot")
    _mount(None, "/", None, _MS_REMOUNT | _MS_BIND | _MS_RDONLY | _MS_NOSUID | _MS_NODEV)
    os.chdir("/")
