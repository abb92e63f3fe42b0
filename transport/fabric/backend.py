"""Which fabric backend this process uses (pure decision over the environment and a probe).

* ``ENCLAVE_VSOCK_BACKEND=emulated``: the emulated fabric; the enclave side when
  ``ENCLAVE_FABRIC_FD`` is set, the host side (socket files) otherwise.
* ``ENCLAVE_VSOCK_BACKEND=native``: real ``AF_VSOCK`` (an error if the platform lacks it).
* ``auto`` (default): the enclave side if ``ENCLAVE_FABRIC_FD`` is set; native only inside a
  real Nitro enclave (``AF_VSOCK`` works, ``/dev/nsm`` exists and the local CID is an enclave
  CID); the emulated host side otherwise. A plain VM with virtio-vsock, or a Nitro parent
  instance (CID 3), is *not* native: our enclaves are emulated and live in the fabric directory.
"""

from __future__ import annotations

import enum
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import cache
from typing import Final

from transport.errors import ConfigurationError
from transport.fabric.addressing import BACKEND_ENV, FABRIC_FD_ENV, is_enclave_cid
from transport.fabric.native import af_vsock_supported, local_cid

__all__ = ["Backend", "PlatformProbe", "probe_platform", "select_backend", "current_backend"]

#: The NSM device of a real Nitro enclave.
NSM_DEVICE: Final = "/dev/nsm"


class Backend(enum.Enum):
    """A fabric backend."""

    #: Inside an emulated enclave: requests to the broker over ENCLAVE_FABRIC_FD.
    ENCLAVE = "enclave"
    #: On the host: Unix socket files in the fabric directory.
    HOST = "host"
    #: Real AF_VSOCK.
    NATIVE = "native"


@dataclass(frozen=True, slots=True)
class PlatformProbe:
    """What the platform offers: AF_VSOCK sockets, this machine's CID, an NSM device."""

    af_vsock: bool
    local_cid: int | None
    nsm_device: bool


@cache
def probe_platform() -> PlatformProbe:
    """Probe this machine once per process (socket creation, one ioctl, one stat)."""
    supported = af_vsock_supported()
    return PlatformProbe(
        af_vsock=supported,
        local_cid=local_cid() if supported else None,
        nsm_device=os.path.exists(NSM_DEVICE),
    )


_MODES: Final = ("auto", "emulated", "native")


def select_backend(
    env: Mapping[str, str], probe: Callable[[], PlatformProbe] = probe_platform
) -> Backend:
    """Choose the backend for ``env`` (see the module docstring). ``probe`` is called lazily.

    Raises:
        ConfigurationError: an unknown ``ENCLAVE_VSOCK_BACKEND``, or ``native`` without
            ``AF_VSOCK`` support.
    """
    mode = env.get(BACKEND_ENV, "auto").strip().lower() or "auto"
    if mode not in _MODES:
        raise ConfigurationError(
            f"{BACKEND_ENV}={env[BACKEND_ENV]!r} is not one of {', '.join(_MODES)}"
        )
    in_emulated_enclave = bool(env.get(FABRIC_FD_ENV))
    if mode == "native":
        if not probe().af_vsock:
            raise ConfigurationError(f"{BACKEND_ENV}=native but AF_VSOCK is not available")
        return Backend.NATIVE
    if mode == "emulated" or in_emulated_enclave:
        return Backend.ENCLAVE if in_emulated_enclave else Backend.HOST
    found = probe()
    if (
        found.af_vsock
        and found.nsm_device
        and found.local_cid is not None
        and is_enclave_cid(found.local_cid)
    ):
        return Backend.NATIVE
    return Backend.HOST


def current_backend() -> Backend:
    """The backend this process uses now (from ``os.environ``)."""
    return select_backend(os.environ)
