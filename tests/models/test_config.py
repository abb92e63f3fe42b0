"""Server configuration: the shipped file, and every kind of bad value refused."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from models.config import ServerConfig
from models.server import expected_pcr16
from runtime.demo import SERVER_APP_DIR
from transport.errors import ConfigurationError


def test_shipped_config_loads() -> None:
    config = ServerConfig.from_file(SERVER_APP_DIR / "server.toml")
    assert config.listen_port == 5005
    assert [m.name for m in config.models] == ["digits"]
    assert config.models[0].source == "store"
    assert config.models[0].engine.max_batch == 512
    limits = config.service_limits()
    assert limits.connection_buffer_bytes == 16 << 20
    assert limits.server_buffer_bytes == 64 << 20
    assert limits.send_timeout_s == 30.0
    assert limits.idle_timeout_s == 60.0


def test_json_config(tmp_path: Path) -> None:
    path = tmp_path / "server.json"
    path.write_text(
        json.dumps({"models": [{"name": "a", "source": "image", "path": "m/a.sealed"}]})
    )
    config = ServerConfig.from_file(path)
    assert config.models[0].path == "m/a.sealed"


@pytest.mark.parametrize(
    ("mapping", "msg"),
    [
        ({"models": []}, "models"),
        ({"models": [{"name": "a"}], "listen_prot": 1}, "unknown server config"),
        ({"models": [{"name": "a", "batch": 3}]}, "unknown model config"),
        ({"models": [{"name": "a"}, {"name": "a"}]}, "unique"),
        ({"models": [{"name": "a/b"}]}, "model name"),
        ({"models": [{"name": "a", "source": "web"}]}, "source"),
        ({"models": [{"name": "a", "source": "image"}]}, "needs a path"),
        ({"models": [{"name": "a", "source": "image", "path": "../x"}]}, "inside the app"),
        ({"models": [{"name": "a", "source": "image", "path": "/etc/x"}]}, "inside the app"),
        ({"models": [{"name": "a", "path": "x"}]}, "only for source"),
        ({"models": [{"name": "a", "execution": "gpu"}]}, "execution"),
        ({"models": [{"name": "a", "timeout_s": 0}]}, "timeout_s"),
        ({"models": [{"name": "a"}], "listen_port": 0}, "port"),
        ({"models": [{"name": "a"}], "suites": ["RSA"]}, "suites"),
        ({"models": [{"name": "a"}], "max_connections": 0}, "positive"),
        ({"models": [{"name": "a"}], "handshake_timeout_s": -1}, "handshake"),
        ({"models": [{"name": "a"}], "idle_timeout_s": 0}, "idle_timeout_s"),
        ({"models": [{"name": "a"}], "send_timeout_s": True}, "send_timeout_s"),
        ({"models": [{"name": "a"}], "server_buffer_bytes": 1.5}, "positive"),
        ({"models": [{"name": "a"}], "connection_buffer_bytes": 1 << 30}, "nest"),
    ],
)
def test_bad_configs(mapping: dict[str, Any], msg: str) -> None:
    with pytest.raises(ConfigurationError, match=msg):
        ServerConfig.from_mapping(mapping)


def test_unreadable_config(tmp_path: Path) -> None:
    bad = tmp_path / "server.toml"
    bad.write_text("listen_port = [")
    with pytest.raises(ConfigurationError):
        ServerConfig.from_file(bad)
    with pytest.raises(ConfigurationError):
        ServerConfig.from_file(tmp_path / "missing.toml")


def test_expected_pcr16_is_the_nsm_extend_chain() -> None:
    import hashlib

    d1, d2 = hashlib.sha384(b"a").digest(), hashlib.sha384(b"b").digest()
    one = hashlib.sha384(bytes(48) + d1).digest()
    assert expected_pcr16([d1]) == one
    assert expected_pcr16([d1, d2]) == hashlib.sha384(one + d2).digest()
    assert expected_pcr16([d2, d1]) != expected_pcr16([d1, d2])  # order is measured
    assert expected_pcr16([]) == bytes(48)
