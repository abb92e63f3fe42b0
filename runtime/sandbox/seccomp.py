"""A classic-BPF seccomp filter, assembled by hand (no libseccomp in the venv).

Theory of operation: the program loads ``seccomp_data.arch`` and kills the process on any other
architecture (so a 32-bit ABI cannot be used to dodge the syscall numbers), refuses the x32 ABI,
then compares ``seccomp_data.nr`` against the deny list and answers ``EPERM`` for a match.
``clone3`` answers ``ENOSYS`` (its flags live in memory BPF cannot read; glibc then falls back to
``clone``, whose flags register is checked: creating new namespaces is refused). ``socket`` and
``socketpair`` are allowed only for the families an enclave uses (:data:`ALLOWED_FAMILIES`:
``AF_UNIX`` carries the emulated vsock fabric and the NSM; ``AF_INET``/``AF_INET6`` reach only
the enclave's own loopback), anything else answers ``EAFNOSUPPORT``: above all ``AF_VSOCK``,
whose port space is the host's (an enclave could bind there, or two enclaves meet there outside
the fabric policy), and ``AF_NETLINK``/``AF_PACKET``. io_uring is denied outright: its
``IORING_OP_SOCKET`` creates sockets without the ``socket`` syscall. Everything else is
allowed. The filter is installed after the sandbox is set up (mounts done), with
``PR_SET_NO_NEW_PRIVS``, and survives ``execve``.
"""

from __future__ import annotations

import ctypes
import errno
import struct

from . import _sys

__all__ = ["install_filter", "supported", "DENIED", "ALLOWED_FAMILIES", "build_program"]

# BPF opcodes (linux/bpf_common.h)
_LD_W_ABS = 0x20
_JEQ_K = 0x15
_JGE_K = 0x35
_JSET_K = 0x45
_RET_K = 0x06
# seccomp return actions (linux/seccomp.h)
_RET_KILL_PROCESS = 0x80000000
_RET_ERRNO = 0x00050000
_RET_ALLOW = 0x7FFF0000
# offsets into struct seccomp_data
_OFF_NR, _OFF_ARCH, _OFF_ARG0 = 0, 4, 16
_AUDIT_ARCH_X86_64 = 0xC000003E
_X32_SYSCALL_BIT = 0x40000000
#: CLONE_NEWNS|NEWCGROUP|NEWUTS|NEWIPC|NEWUSER|NEWPID|NEWNET (sched.h)
_CLONE_NS_FLAGS = (
    0x00020000 | 0x02000000 | 0x04000000 | 0x08000000 | 0x10000000 | 0x20000000 | 0x40000000
)

#: Denied syscalls (x86_64 numbers), and why: cross-process access, kernel attack surface,
#: privilege and mount changes after setup, host-wide state.
_X86_64: dict[str, int] = {
    "ptrace": 101,
    "process_vm_readv": 310,
    "process_vm_writev": 311,
    "kcmp": 312,
    "pidfd_getfd": 438,
    "perf_event_open": 298,
    "bpf": 321,
    "userfaultfd": 323,
    "keyctl": 250,
    "add_key": 248,
    "request_key": 249,
    "mount": 165,
    "umount2": 166,
    "pivot_root": 155,
    "chroot": 161,
    "unshare": 272,
    "setns": 308,
    "open_tree": 428,
    "move_mount": 429,
    "fsopen": 430,
    "fsconfig": 431,
    "fsmount": 432,
    "fspick": 433,
    "mount_setattr": 442,
    "open_by_handle_at": 304,
    "name_to_handle_at": 303,
    "kexec_load": 246,
    "kexec_file_load": 320,
    "init_module": 175,
    "finit_module": 313,
    "delete_module": 176,
    "iopl": 172,
    "ioperm": 173,
    "swapon": 167,
    "swapoff": 168,
    "reboot": 169,
    "acct": 163,
    "settimeofday": 164,
    "clock_settime": 227,
    "adjtimex": 159,
    "clock_adjtime": 305,
    "syslog": 103,
    "quotactl": 179,
    "vhangup": 153,
    "lookup_dcookie": 212,
    "sched_setaffinity": 203,
    "personality": 135,
    # io_uring: IORING_OP_SOCKET (and friends) bypass the socket family check below
    "io_uring_setup": 425,
    "io_uring_enter": 426,
    "io_uring_register": 427,
}
_CLONE, _CLONE3 = 56, 435
_SOCKET, _SOCKETPAIR = 41, 53
#: Address families ``socket``/``socketpair`` may create (linux/socket.h), by name.
_FAMILIES: dict[str, int] = {"AF_UNIX": 1, "AF_INET": 2, "AF_INET6": 10}
#: Public view of the socket families an enclave may create.
ALLOWED_FAMILIES: tuple[str, ...] = tuple(_FAMILIES)
#: Public view of the deny list (names).
DENIED: tuple[str, ...] = tuple(sorted(_X86_64))


def supported() -> bool:
    return _sys.ARCH == "x86_64"


def _stmt(code: int, k: int) -> bytes:
    return struct.pack("HBBI", code, 0, 0, k & 0xFFFFFFFF)


def _jump(code: int, k: int, jt: int, jf: int) -> bytes:
    return struct.pack("HBBI", code, jt, jf, k & 0xFFFFFFFF)


def build_program() -> list[bytes]:
    """The filter as a list of 8-byte ``sock_filter`` instructions."""
    deny = sorted(set(_X86_64.values()))
    prog: list[bytes] = [
        _stmt(_LD_W_ABS, _OFF_ARCH),
        _jump(_JEQ_K, _AUDIT_ARCH_X86_64, 1, 0),
        _stmt(_RET_K, _RET_KILL_PROCESS),
        _stmt(_LD_W_ABS, _OFF_NR),
        _jump(_JGE_K, _X32_SYSCALL_BIT, 0, 1),
        _stmt(_RET_K, _RET_KILL_PROCESS),
    ]
    # clone: refuse namespace flags (low 32 bits of arg0 hold them).
    prog += [
        _jump(_JEQ_K, _CLONE, 0, 4),
        _stmt(_LD_W_ABS, _OFF_ARG0),
        _jump(_JSET_K, _CLONE_NS_FLAGS, 0, 1),
        _stmt(_RET_K, _RET_ERRNO | errno.EPERM),
        _stmt(_RET_K, _RET_ALLOW),
        _jump(_JEQ_K, _CLONE3, 0, 1),
        _stmt(_RET_K, _RET_ERRNO | errno.ENOSYS),
    ]
    # socket/socketpair: only the allowed families (arg0, the domain: an int, low 32 bits).
    # Layout: JEQ socket, JEQ socketpair, [LD arg0, JEQ fam_0..fam_n-1, RET EAFNOSUPPORT,
    # RET ALLOW]; a family match jumps to the ALLOW, other syscalls skip the block.
    fams = sorted(_FAMILIES.values())
    n_fam = len(fams)
    prog += [
        _jump(_JEQ_K, _SOCKET, 1, 0),
        _jump(_JEQ_K, _SOCKETPAIR, 0, n_fam + 3),
        _stmt(_LD_W_ABS, _OFF_ARG0),
    ]
    for i, fam in enumerate(fams):
        prog.append(_jump(_JEQ_K, fam, n_fam - i, 0))
    prog += [
        _stmt(_RET_K, _RET_ERRNO | errno.EAFNOSUPPORT),
        _stmt(_RET_K, _RET_ALLOW),
    ]
    n = len(deny)
    for i, nr in enumerate(deny):
        # on match jump to the EPERM return placed right after the list
        prog.append(_jump(_JEQ_K, nr, n - i, 0))
    prog.append(_stmt(_RET_K, _RET_ALLOW))
    prog.append(_stmt(_RET_K, _RET_ERRNO | errno.EPERM))
    return prog


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


def install_filter() -> None:
    """Install the filter on the calling thread (and its future children). Raises OSError."""
    if not supported():
        raise OSError(errno.ENOSYS, f"seccomp filter not written for {_sys.ARCH}")
    prog = build_program()
    buf = ctypes.create_string_buffer(b"".join(prog), len(prog) * 8)
    fprog = _SockFprog(len(prog), ctypes.cast(buf, ctypes.c_void_p))
    _sys.prctl(_sys.PR_SET_NO_NEW_PRIVS, 1)
    _sys.check(
        _sys.libc.prctl(
            ctypes.c_int(_sys.PR_SET_SECCOMP),
            ctypes.c_ulong(_sys.SECCOMP_MODE_FILTER),
            ctypes.byref(fprog),
            ctypes.c_ulong(0),
            ctypes.c_ulong(0),
        ),
        "prctl(PR_SET_SECCOMP)",
    )
