"""Who is connecting: the CID of the enclave behind a connection a host listener accepted.

On Nitro, a parent-side ``accept()`` on ``AF_VSOCK`` returns the peer's ``(cid, port)``: the
hypervisor says which enclave connected, and no byte the enclave sends can change it. The
emulated fabric gives host listeners the same fact the same way, out of band: an enclave's
connects to the parent (CID 3) are made by its broker (``broker.py``), which knows the enclave's
CID, and which binds the connecting Unix socket to an abstract name carrying that CID before it
connects. The listener reads it with ``getpeername()`` (:func:`peer_cid`).

Why it can be trusted: abstract socket names belong to a network namespace, and every enclave
runs in a namespace of its own, so no enclave can bind a name in the host's; and the fabric's
socket files are 0600 in 0700 directories, so only the runtime's own user can connect to a host
listener at all (and that user is the operator: it can reach any enclave port directly anyway).
A connection without such a name (a host process's own) has no enclave CID: ``None``.

Pure apart from the ``bind``: no trio, no logging.
"""

from __future__ import annotations

import errno
import re
import secrets
import socket as _stdlib_socket
from typing import Final

from transport.fabric.addressing import MAX_ENCLAVE_CID, MIN_ENCLAVE_CID

__all__ = ["ORIGIN_PREFIX", "bind_origin", "origin_cid", "peer_cid"]

#: Abstract-namespace prefix of the names brokers bind (the leading NUL makes it abstract).
ORIGIN_PREFIX: Final = b"\0enclave-fabric-origin/"
#: ``<prefix><cid>/<16 hex>``: the CID, then random bits that keep concurrent names distinct.
_ORIGIN_RE: Final = re.compile(rb"\0enclave-fabric-origin/([0-9]{1,10})/[0-9a-f]{16}")
#: Attempts at a free name (a collision of 64 random bits: never, in practice).
_BIND_TRIES: Final = 4


def bind_origin(sock: _stdlib_socket.socket, cid: int) -> None:
    """Bind the not yet connected ``AF_UNIX`` ``sock`` to an origin name carrying ``cid``.

    Raises:
        ValueError: ``cid`` is not an enclave CID.
        OSError: the bind failed for another reason than a (vanishingly rare) name collision.
    """
    if not MIN_ENCLAVE_CID <= cid <= MAX_ENCLAVE_CID:
        raise ValueError(f"{cid} is not an enclave CID")
    for attempt in range(_BIND_TRIES):
        name = ORIGIN_PREFIX + b"%d/%s" % (cid, secrets.token_hex(8).encode())
        try:
            sock.bind(name)
            return
        except OSError as exc:
            if exc.errno != errno.EADDRINUSE or attempt == _BIND_TRIES - 1:
                raise


def origin_cid(peername: object) -> int | None:
    """The enclave CID in an ``AF_UNIX`` peer name bound by :func:`bind_origin`, else None."""
    if isinstance(peername, str):  # Python decodes some names; abstract ones stay bytes
        peername = peername.encode("utf-8", "surrogateescape")
    if not isinstance(peername, bytes):
        return None
    match = _ORIGIN_RE.fullmatch(peername)
    if match is None:
        return None
    cid = int(match.group(1))
    return cid if MIN_ENCLAVE_CID <= cid <= MAX_ENCLAVE_CID else None


def peer_cid(stream: object) -> int | None:
    """The CID of the enclave at the other end of an accepted connection, or None (a host
    process, or not a socket stream).

    Works on the emulated fabric (the broker's origin name) and on real ``AF_VSOCK`` (the
    kernel's peer address), so parent-side services written against it move to Nitro as is.
    """
    sock = getattr(stream, "socket", None)
    if sock is None:
        return None
    try:
        peer = sock.getpeername()
    except OSError:
        return None
    family = getattr(_stdlib_socket, "AF_VSOCK", None)
    if family is not None and sock.family == family:
        if isinstance(peer, tuple) and peer and isinstance(peer[0], int):
            cid = peer[0]
            return cid if MIN_ENCLAVE_CID <= cid <= MAX_ENCLAVE_CID else None
        return None
    if sock.family != _stdlib_socket.AF_UNIX:
        return None
    return origin_cid(peer)
