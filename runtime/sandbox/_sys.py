"""Raw Linux calls through ctypes (no libseccomp/liblandlock bindings in the venv)."""

from __future__ import annotations

import ctypes
import os
import platform

__all__ = ["libc", "syscall", "check", "prctl", "ARCH"]

libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long

#: Machine name used to pick syscall numbers (seccomp filter) and the audit arch.
ARCH = platform.machine()


def check(ret: int, what: str) -> int:
    """Raise OSError with errno when a libc call returned -1."""
    if ret == -1:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")
    return ret


def syscall(nr: int, *args: object) -> int:
    return int(libc.syscall(ctypes.c_long(nr), *args))


def prctl(option: int, arg2: int = 0, arg3: int = 0, arg4: int = 0, arg5: int = 0) -> int:
    return check(
        libc.prctl(
            ctypes.c_int(option),
            ctypes.c_ulong(arg2),
            ctypes.c_ulong(arg3),
            ctypes.c_ulong(arg4),
            ctypes.c_ulong(arg5),
        ),
        f"prctl({option})",
    )


# prctl options (linux/prctl.h)
PR_SET_PDEATHSIG = 1
PR_SET_DUMPABLE = 4
PR_SET_NO_NEW_PRIVS = 38
PR_SET_SECCOMP = 22
SECCOMP_MODE_FILTER = 2
