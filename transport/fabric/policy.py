"""The broker's connect-time policy: which vsock addresses one enclave may reach (pure)."""

from __future__ import annotations

from dataclasses import dataclass, field

from transport.fabric.addressing import VMADDR_CID_PARENT, VsockAddr, is_enclave_cid

__all__ = ["FabricPolicy"]


@dataclass(frozen=True)
class FabricPolicy:
    """What one enclave may connect to through its broker.

    Attributes:
        cid: the enclave's own CID (4 … 2**32-2).
        parent_ports: ports on the parent (CID 3) it may connect to; ``None`` means any port.
            Ports served in-process by the broker's ``parent_handlers`` are always reachable.
        peer_cids: other enclaves it may reach (default: none, as on Nitro).

    The host network is unreachable by construction: the broker only ever connects to fabric
    socket files, never to an IP address.
    """

    cid: int
    parent_ports: frozenset[int] | None
    peer_cids: frozenset[int] = field(default_factory=frozenset)

    def __post_init__(self) -> None:
        VsockAddr(self.cid, 0)  # type/range check
        if not is_enclave_cid(self.cid):
            raise ValueError(f"{self.cid} is not a valid enclave CID (4 … 2**32-2)")
        if self.parent_ports is not None:
            for port in self.parent_ports:
                VsockAddr(VMADDR_CID_PARENT, port)
        for cid in self.peer_cids:
            if not is_enclave_cid(cid) or cid == self.cid:
                raise ValueError(f"peer CID {cid} is not another enclave's CID")

    def allows(self, addr: VsockAddr, *, handled_ports: frozenset[int] = frozenset()) -> bool:
        """True if this enclave may connect to ``addr``.

        ``handled_ports`` are the parent ports the broker serves in-process (always allowed).
        """
        if addr.cid == VMADDR_CID_PARENT:
            if addr.port in handled_ports:
                return True
            return self.parent_ports is None or addr.port in self.parent_ports
        return addr.cid in self.peer_cids
