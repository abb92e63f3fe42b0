"""The one parser of ``HOST:PORT`` strings (flags, config files, endpoints), and its formatter.

Rules, the same for every caller:

- ``HOST:PORT``; an IPv6 host is bracketed, ``[::1]:5005`` (an unbracketed address with several
  colons is ambiguous and refused);
- ``PORT`` is decimal digits, 1 … 65535; 0 ("any free port") only where the caller listens and
  passes ``allow_port_zero=True``;
- with ``default_host``, ``:PORT`` and a bare ``PORT`` mean that host (listen flags);
- a URL (``http://host:port``) is refused with a message that says so: callers that want a URL
  (the KMS endpoint) parse it themselves, then check the authority with this function.

Every refusal is a :class:`transport.errors.AddressError` (a ``ConfigurationError``, so also a
``ValueError``) whose message quotes the value and says what was expected.
"""

from __future__ import annotations

from typing import Final

from transport.errors import AddressError

__all__ = ["parse_host_port", "format_host_port", "AddressError"]

#: Longest host name DNS allows (RFC 1035: 253 characters in text form).
MAX_HOST_LENGTH: Final = 253


def parse_host_port(
    value: str,
    *,
    default_host: str | None = None,
    allow_port_zero: bool = False,
    what: str = "address",
) -> tuple[str, int]:
    """Parse ``HOST:PORT`` (``[v6]:PORT``) into ``(host, port)``; brackets are removed.

    Args:
        value: the text to parse.
        default_host: if given, ``:PORT`` and ``PORT`` alone are accepted and mean this host.
        allow_port_zero: accept port 0 (listen on an ephemeral port).
        what: names the value in error messages (``"--listen"``, ``"endpoint"``...).

    Raises:
        AddressError: the value is not a valid ``HOST:PORT``.
    """
    if not isinstance(value, str):
        raise AddressError(f"{what} must be a string HOST:PORT, got {type(value).__name__}")
    text = value.strip()
    if "://" in text:
        raise AddressError(f"{what} {value!r}: expected HOST:PORT without a scheme")
    if text.startswith("["):
        close = text.find("]")
        if close < 0 or text[close + 1 : close + 2] != ":":
            raise AddressError(f"{what} {value!r}: expected [IPV6]:PORT")
        host, port_text = text[1:close], text[close + 2 :]
        if not host or ":" not in host:
            raise AddressError(f"{what} {value!r}: brackets are only for IPv6 addresses")
    else:
        host, sep, port_text = text.rpartition(":")
        if not sep:
            host, port_text = "", text
        if ":" in host:
            raise AddressError(f"{what} {value!r}: put an IPv6 address in brackets, [V6]:PORT")
    if not host:
        if default_host is None:
            raise AddressError(f"{what} {value!r}: expected HOST:PORT")
        host = default_host
    if len(host) > MAX_HOST_LENGTH or any(c.isspace() or c in "/?#@" for c in host):
        raise AddressError(f"{what} {value!r}: {host[:40]!r} is not a host name or address")
    if not port_text.isascii() or not port_text.isdigit() or len(port_text) > 5:
        raise AddressError(f"{what} {value!r}: expected HOST:PORT with a numeric PORT")
    port = int(port_text)
    low = 0 if allow_port_zero else 1
    if not low <= port <= 65535:
        raise AddressError(f"{what} {value!r}: port must be {low} … 65535")
    return host, port


def format_host_port(host: str, port: int) -> str:
    """The inverse of :func:`parse_host_port`: brackets an IPv6 host."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
