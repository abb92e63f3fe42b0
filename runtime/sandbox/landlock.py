"""Landlock (Linux >= 5.13): unprivileged, stackable filesystem (and TCP, and scope) rules.

The enclave may read and execute beneath the allowed read-only paths, read and write beneath the
allowed writable ones, and nothing else; with ABI >= 4 it may not bind or connect any TCP port;
with ABI >= 6 abstract Unix sockets and signals are scoped to its own domain.
"""

from __future__ import annotations

import ctypes
import os
import struct
from collections.abc import Sequence

from . import _sys

__all__ = ["abi_version", "restrict"]

_CREATE, _ADD_RULE, _RESTRICT = 444, 445, 446
_CREATE_RULESET_VERSION = 1
_RULE_PATH_BENEATH = 1

_EXECUTE, _WRITE_FILE, _READ_FILE, _READ_DIR = 1 << 0, 1 << 1, 1 << 2, 1 << 3
#: all filesystem rights per ABI version (v1: bits 0-12, v2: +REFER, v3: +TRUNCATE, v5: +IOCTL_DEV)
_FS_BY_ABI = {1: (1 << 13) - 1, 2: (1 << 14) - 1, 3: (1 << 15) - 1, 4: (1 << 15) - 1}
_FS_ALL_V5 = (1 << 16) - 1
_NET_BIND_TCP, _NET_CONNECT_TCP = 1 << 0, 1 << 1
_SCOPE_ABSTRACT_UNIX, _SCOPE_SIGNAL = 1 << 0, 1 << 1
_READ_ONLY = _EXECUTE | _READ_FILE | _READ_DIR


def abi_version() -> int:
    """The kernel's Landlock ABI version, 0 when unavailable."""
    ret = _sys.syscall(_CREATE, None, 0, _CREATE_RULESET_VERSION)
    return max(ret, 0)


def _fs_all(abi: int) -> int:
    return _FS_BY_ABI.get(abi, _FS_ALL_V5)


def restrict(read_only: Sequence[str], writable: Sequence[str] = ()) -> int:
    """Restrict the calling process; returns the ABI used. Raises OSError when unavailable.

    Paths that do not exist are skipped. Needs no_new_privs (set here).
    """
    abi = abi_version()
    if abi < 1:
        raise OSError(38, "landlock unavailable")
    fs_all = _fs_all(abi)
    if abi >= 6:
        attr = struct.pack(
            "QQQ", fs_all, _NET_BIND_TCP | _NET_CONNECT_TCP, _SCOPE_ABSTRACT_UNIX | _SCOPE_SIGNAL
        )
    elif abi >= 4:
        attr = struct.pack("QQ", fs_all, _NET_BIND_TCP | _NET_CONNECT_TCP)
    else:
        attr = struct.pack("Q", fs_all)
    abuf = ctypes.create_string_buffer(attr, len(attr))
    rfd = _sys.check(_sys.syscall(_CREATE, abuf, len(attr), 0), "landlock_create_ruleset")
    try:
        for paths, access in ((read_only, _READ_ONLY), (writable, fs_all)):
            for p in paths:
                try:
                    fd = os.open(p, os.O_PATH | os.O_CLOEXEC)
                except OSError:
                    continue
                try:
                    acc = access
                    if not os.path.isdir(p):  # files accept only file rights
                        acc &= _EXECUTE | _WRITE_FILE | _READ_FILE | (1 << 14) | (1 << 15)
                    rule = struct.pack("=Qi", acc, fd)
                    rbuf = ctypes.create_string_buffer(rule, len(rule))
                    _sys.check(
                        _sys.syscall(_ADD_RULE, rfd, _RULE_PATH_BENEATH, rbuf, 0),
                        f"landlock_add_rule({p})",
                    )
                finally:
                    os.close(fd)
        _sys.prctl(_sys.PR_SET_NO_NEW_PRIVS, 1)
        _sys.check(_sys.syscall(_RESTRICT, rfd, 0), "landlock_restrict_self")
    finally:
        os.close(rfd)
    return abi
