"""The one HOST:PORT parser: accepted forms, refusals, and round trips."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from transport.errors import AddressError, ConfigurationError
from transport.hostport import format_host_port, parse_host_port


@pytest.mark.parametrize(
    ("text", "kwargs", "expected"),
    [
        ("127.0.0.1:5005", {}, ("127.0.0.1", 5005)),
        ("localhost:1", {}, ("localhost", 1)),
        ("[::1]:65535", {}, ("::1", 65535)),
        (" kms.local:4599 ", {}, ("kms.local", 4599)),
        (":8080", {"default_host": "127.0.0.1"}, ("127.0.0.1", 8080)),
        ("8080", {"default_host": "127.0.0.1"}, ("127.0.0.1", 8080)),
        ("0.0.0.0:0", {"allow_port_zero": True}, ("0.0.0.0", 0)),
    ],
)
def test_accepted_forms(text: str, kwargs: dict[str, object], expected: tuple[str, int]) -> None:
    assert parse_host_port(text, **kwargs) == expected  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("http://127.0.0.1:4599", "without a scheme"),
        ("127.0.0.1", "expected HOST:PORT"),
        (":80", "expected HOST:PORT"),
        ("::1:80", "brackets"),
        ("[::1]80", "[IPV6]:PORT"),
        ("[127.0.0.1]:80", "only for IPv6"),
        ("host:0", "port must be 1"),
        ("host:65536", "port must be"),
        ("host:12a", "numeric PORT"),
        ("host:-1", "numeric PORT"),
        ("host:٣", "numeric PORT"),  # a non-ASCII digit
        ("a b:80", "not a host"),
        ("user@host:80", "not a host"),
        ("x" * 300 + ":80", "not a host"),
    ],
)
def test_refusals_name_the_problem(text: str, fragment: str) -> None:
    with pytest.raises(AddressError) as info:
        parse_host_port(text, what="--endpoint")
    assert fragment in str(info.value)
    assert "--endpoint" in str(info.value)
    assert isinstance(info.value, ConfigurationError)
    assert isinstance(info.value, ValueError)


def test_not_a_string_is_refused() -> None:
    with pytest.raises(AddressError):
        parse_host_port(5005)  # type: ignore[arg-type]


@given(
    host=st.one_of(
        st.ip_addresses().map(str),
        st.from_regex(r"[a-z][a-z0-9-]{0,20}(\.[a-z0-9-]{1,10}){0,3}", fullmatch=True),
    ),
    port=st.integers(1, 65535),
)
def test_format_then_parse_round_trips(host: str, port: int) -> None:
    assert parse_host_port(format_host_port(host, port)) == (host, port)


@given(st.text(max_size=80))
def test_arbitrary_text_parses_or_raises_address_error(text: str) -> None:
    try:
        host, port = parse_host_port(text, default_host="127.0.0.1", allow_port_zero=True)
    except AddressError:
        return
    assert 0 <= port <= 65535
    assert host
