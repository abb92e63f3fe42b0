"""vsock addressing: Nitro's CID constants, :class:`VsockAddr`, the emulated fabric's layout.

Pure module: no trio, no sockets, no logging. It maps a ``(cid, port)`` address onto the Unix
socket path that stands in for it in the emulated fabric (``<fabric_dir>/<cid>/<port>``) and
checks everything that can be checked without I/O (32-bit ranges, ``sun_path`` length).

Nitro's address model (reference/nitro.md §8): CID 0 hypervisor, 1 local loopback, 2 host, 3 the
parent instance, 4 … 2**32-2 enclaves; ``VMADDR_CID_ANY`` / ``VMADDR_PORT_ANY`` are -1U wildcards.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from transport.errors import VsockError

__all__ = [
    "VMADDR_CID_ANY",
    "VMADDR_CID_HYPERVISOR",
    "VMADDR_CID_LOCAL",
    "VMADDR_CID_HOST",
    "VMADDR_CID_PARENT",
    "VMADDR_PORT_ANY",
    "MIN_ENCLAVE_CID",
    "MAX_ENCLAVE_CID",
    "U32_MAX",
    "VsockAddr",
    "InvalidVsockAddress",
    "is_enclave_cid",
    "FABRIC_DIR_ENV",
    "BACKEND_ENV",
    "FABRIC_FD_ENV",
    "ENCLAVE_CID_ENV",
    "MAX_SUN_PATH",
    "socket_path",
    "cid_dir",
    "parse_socket_name",
]

#: Largest value of a 32-bit unsigned CID or port.
U32_MAX: Final = 0xFFFF_FFFF
#: Bind wildcard (-1U); never an enclave's CID.
VMADDR_CID_ANY: Final = 0xFFFF_FFFF
#: Hypervisor services (the enclave console in debug mode lives there, port 10000 + CID).
VMADDR_CID_HYPERVISOR: Final = 0
#: Local loopback (Linux >= 5.6); not a valid enclave CID.
VMADDR_CID_LOCAL: Final = 1
#: The host; not a valid enclave CID.
VMADDR_CID_HOST: Final = 2
#: "The CID used by the parent instance is always 3" (Nitro user guide; nitro-cli's name).
VMADDR_CID_PARENT: Final = 3
#: Port wildcard (-1U): bind to any free port.
VMADDR_PORT_ANY: Final = 0xFFFF_FFFF
#: Smallest CID an enclave may have (0-3 are reserved, see above).
MIN_ENCLAVE_CID: Final = 4
#: Largest CID an enclave may have (2**32 - 1 is VMADDR_CID_ANY).
MAX_ENCLAVE_CID: Final = 0xFFFF_FFFE

#: Environment: directory of the emulated fabric (default ``default_state_dir()/vsock``).
FABRIC_DIR_ENV: Final = "ENCLAVE_VSOCK_DIR"
#: Environment: ``auto`` | ``emulated`` | ``native``.
BACKEND_ENV: Final = "ENCLAVE_VSOCK_BACKEND"
#: Environment (inside an emulated enclave): the inherited fd of the broker socket.
FABRIC_FD_ENV: Final = "ENCLAVE_FABRIC_FD"
#: Environment (inside an emulated enclave): the enclave's own CID.
ENCLAVE_CID_ENV: Final = "ENCLAVE_CID"

#: Linux ``sizeof(sockaddr_un.sun_path)`` is 108 bytes including the terminating NUL.
MAX_SUN_PATH: Final = 107


class InvalidVsockAddress(VsockError, ValueError):
    """A CID or port outside 0 … 2**32-1, or a wildcard where an address is needed.

    Misuse by the caller, so it is also a :class:`ValueError` (STYLE B3).
    """


def _check_u32(name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, not {type(value).__name__}")
    if not 0 <= value <= U32_MAX:
        raise InvalidVsockAddress(f"{name} {value} is not a 32-bit unsigned integer")


@dataclass(frozen=True, order=True, slots=True)
class VsockAddr:
    """A vsock address ``(cid, port)``, both 32-bit unsigned integers.

    Raises:
        TypeError: ``cid`` or ``port`` is not an ``int``.
        InvalidVsockAddress: a value is outside ``0 … 2**32-1`` (a VsockError and ValueError).
    """

    cid: int
    port: int

    def __post_init__(self) -> None:
        _check_u32("cid", self.cid)
        _check_u32("port", self.port)

    def __str__(self) -> str:
        return f"vsock:{self.cid}:{self.port}"

    def as_tuple(self) -> tuple[int, int]:
        """The ``(cid, port)`` tuple that Python's ``AF_VSOCK`` sockets take as an address."""
        return (self.cid, self.port)


def is_enclave_cid(cid: int) -> bool:
    """True if ``cid`` may be assigned to an enclave (4 … 2**32-2)."""
    return MIN_ENCLAVE_CID <= cid <= MAX_ENCLAVE_CID


def cid_dir(fabric_dir: Path, cid: int) -> Path:
    """The directory holding the listener sockets of ``cid`` in the emulated fabric."""
    _check_u32("cid", cid)
    if cid == VMADDR_CID_ANY:
        raise InvalidVsockAddress("VMADDR_CID_ANY is a bind wildcard, not an address")
    return fabric_dir / str(cid)


def socket_path(fabric_dir: Path, addr: VsockAddr) -> Path:
    """The Unix socket file standing in for ``addr``: ``<fabric_dir>/<cid>/<port>``.

    Raises:
        VsockError: a wildcard in ``addr``, or the path does not fit in ``sun_path``.
    """
    if addr.port == VMADDR_PORT_ANY:
        raise InvalidVsockAddress("VMADDR_PORT_ANY is a bind wildcard, not an address")
    path = cid_dir(fabric_dir, addr.cid) / str(addr.port)
    if len(os.fsencode(path)) > MAX_SUN_PATH:
        raise VsockError(
            f"fabric socket path {str(path)!r} is longer than {MAX_SUN_PATH} bytes; "
            f"use a shorter {FABRIC_DIR_ENV}"
        )
    return path


def parse_socket_name(name: str) -> int | None:
    """The port a fabric socket file name stands for, or None if it is not one."""
    if not name.isdigit() or (len(name) > 1 and name.startswith("0")) or len(name) > 10:
        return None
    port = int(name)
    return port if port < VMADDR_PORT_ANY else None
