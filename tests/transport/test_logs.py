from __future__ import annotations

import io
import json

import pytest
import structlog

from transport.logs import REDACTED, configure_logging, is_secret_key, redact_secrets


def test_secret_names_are_recognised() -> None:
    for name in [
        "plaintext",
        "data_key",
        "private_key",
        "recipient_private_key",
        "aws_secret_access_key",
        "session_token",
        "channel_secret",
        "Authorization",
    ]:
        assert is_secret_key(name), name
    for name in ["key_id", "module_id", "pcr0", "event", "digest"]:
        assert not is_secret_key(name), name


def test_redaction_hides_secret_fields_and_all_binary_values() -> None:
    secret = b"\x01" * 32
    out = redact_secrets(
        None,
        "info",
        {
            "event": "released",
            "data_key": "c2VjcmV0",
            "ciphertext": secret,
            "nested": {"private_key": "pem", "ok": 1, "blob": bytearray(3)},
            "key_id": "1234",
        },
    )
    assert out["data_key"] == REDACTED
    assert out["ciphertext"] == "<32 bytes>"
    assert out["nested"] == {"private_key": REDACTED, "ok": 1, "blob": "<3 bytes>"}
    assert out["key_id"] == "1234"


def test_configure_logging_json_lines_without_secrets() -> None:
    buf = io.StringIO()
    configure_logging("debug", json=True, stream=buf, cache=False)
    try:
        structlog.get_logger().info("key_released", plaintext=b"topsecret", key_id="k1")
        line = json.loads(buf.getvalue().strip())
        assert line["event"] == "key_released"
        assert line["key_id"] == "k1"
        assert line["plaintext"] == REDACTED
        assert "topsecret" not in buf.getvalue()
        assert line["level"] == "info"
        assert "timestamp" in line
    finally:
        structlog.reset_defaults()


def test_configure_logging_filters_by_level() -> None:
    buf = io.StringIO()
    configure_logging("warning", json=True, stream=buf, cache=False)
    try:
        structlog.get_logger().info("quiet")
        structlog.get_logger().warning("loud")
        assert "quiet" not in buf.getvalue()
        assert "loud" in buf.getvalue()
    finally:
        structlog.reset_defaults()


def test_default_stream_follows_sys_stderr(monkeypatch: pytest.MonkeyPatch) -> None:
    first, second = io.StringIO(), io.StringIO()
    monkeypatch.setattr("sys.stderr", first)
    configure_logging("info", json=True, cache=True)
    try:
        structlog.get_logger().info("one")
        first.close()  # as pytest's capsys does after a test
        monkeypatch.setattr("sys.stderr", second)
        structlog.get_logger().info("two")
        assert json.loads(second.getvalue())["event"] == "two"
    finally:
        structlog.reset_defaults()


@pytest.mark.parametrize("as_json", [True, False])
def test_tracebacks_never_show_local_variables(as_json: bool) -> None:
    buf = io.StringIO()
    configure_logging("info", json=as_json, stream=buf, cache=False)
    try:

        def unwrap(data_key: bytes) -> None:
            session = data_key.hex()  # a local holding secret material
            raise ValueError(f"bad length {len(session)}")

        try:
            unwrap(b"\xaa" * 16)
        except ValueError:
            structlog.get_logger().exception("unwrap_failed")
        text = buf.getvalue()
        assert "unwrap_failed" in text
        assert "ValueError" in text
        assert "aa" * 16 not in text
    finally:
        structlog.reset_defaults()
