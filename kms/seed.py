"""Seed files: keys with fixed ids and material, aliases and policies, created at start-up if
absent (like local-kms's seed). JSON or YAML::

    keys:
      - key_id: 5e0b4c0e-7f36-4a4b-9d43-0f3c8a9a1d11   # [A-Za-z0-9-]{1,64}, usually a UUID
        material: <base64 of 32 bytes>                # or a list: versions 1..n (rotated key)
        description: model sealing key
        enabled: true
        rotation_enabled: false
        policy: {Version: "2012-10-17", Statement: [...]}   # object or JSON string; default: AWS's
        aliases: [alias/models]
    aliases:
      - {name: alias/other, key_id: 5e0b4c0e-...}

Seeding is idempotent: existing keys and aliases are left as they are.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from pathlib import Path
from typing import Any

import yaml

from transport.errors import ConfigurationError

from .errors import PolicyError
from .policy import KeyPolicy
from .service import SeedKey

__all__ = ["load_seed", "parse_seed"]

_KEY_ID_RE = re.compile(r"^[A-Za-z0-9-]{1,64}$")
_ALIAS_RE = re.compile(r"^alias/[a-zA-Z0-9:/_-]{1,250}$")
#: Seed files are small; refuse anything larger than this (bytes).
MAX_SEED_BYTES = 4 * 1024 * 1024


def _material(value: Any, where: str) -> tuple[bytes, ...]:
    items = value if isinstance(value, list) else [value]
    out = []
    for item in items:
        try:
            raw = base64.b64decode(str(item), validate=True)
        except (binascii.Error, ValueError):
            raise ConfigurationError(f"{where}: material is not base64") from None
        if len(raw) != 32:
            raise ConfigurationError(f"{where}: material must be 32 bytes (AES-256)")
        out.append(raw)
    if not out:
        raise ConfigurationError(f"{where}: material is empty")
    return tuple(out)


def parse_seed(doc: Any) -> tuple[SeedKey, ...]:
    """Validate a decoded seed document. Raises :class:`ConfigurationError`."""
    if not isinstance(doc, dict) or set(doc) - {"keys", "aliases"}:
        raise ConfigurationError("seed must be an object with 'keys' and optional 'aliases'")
    keys: dict[str, dict[str, Any]] = {}
    for i, k in enumerate(doc.get("keys") or []):
        where = f"seed keys[{i}]"
        if not isinstance(k, dict):
            raise ConfigurationError(f"{where} must be an object")
        extra = set(k) - {
            "key_id",
            "material",
            "description",
            "enabled",
            "rotation_enabled",
            "policy",
            "aliases",
        }
        if extra:
            raise ConfigurationError(f"{where}: unknown fields {sorted(extra)}")
        key_id = str(k.get("key_id", ""))
        if not _KEY_ID_RE.match(key_id) or key_id in keys:
            raise ConfigurationError(f"{where}: key_id missing, invalid or duplicate")
        policy = k.get("policy")
        if isinstance(policy, dict):
            policy = json.dumps(policy, indent=2)
        if policy is not None:
            try:
                KeyPolicy.parse(str(policy))
            except PolicyError as exc:
                raise ConfigurationError(f"{where}: invalid policy: {exc}") from None
        aliases = k.get("aliases") or []
        if not isinstance(aliases, list):
            raise ConfigurationError(f"{where}: aliases must be a list")
        keys[key_id] = {
            "key_id": key_id,
            "material": _material(k.get("material"), where),
            "description": str(k.get("description", "")),
            "policy": policy,
            "enabled": bool(k.get("enabled", True)),
            "rotation_enabled": bool(k.get("rotation_enabled", False)),
            "aliases": [str(a) for a in aliases],
        }
    for j, a in enumerate(doc.get("aliases") or []):
        if not isinstance(a, dict) or set(a) != {"name", "key_id"}:
            raise ConfigurationError(f"seed aliases[{j}] must be {{name, key_id}}")
        if str(a["key_id"]) not in keys:
            raise ConfigurationError(f"seed aliases[{j}]: unknown key_id {a['key_id']!r}")
        keys[str(a["key_id"])]["aliases"].append(str(a["name"]))
    seen: set[str] = set()
    for k in keys.values():
        for name in k["aliases"]:
            if not _ALIAS_RE.match(name) or name.startswith("alias/aws/") or name in seen:
                raise ConfigurationError(f"seed alias {name!r} invalid or duplicate")
            seen.add(name)
    return tuple(
        SeedKey(
            key_id=k["key_id"],
            material=k["material"],
            description=k["description"],
            policy=k["policy"],
            enabled=k["enabled"],
            rotation_enabled=k["rotation_enabled"],
            aliases=tuple(k["aliases"]),
        )
        for k in keys.values()
    )


def load_seed(path: Path) -> tuple[SeedKey, ...]:
    """Read and validate a seed file (``.json``, or YAML for anything else)."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise ConfigurationError(f"cannot read seed file {path}: {exc.strerror}") from None
    if len(data) > MAX_SEED_BYTES:
        raise ConfigurationError(f"seed file {path} is larger than {MAX_SEED_BYTES} bytes")
    try:
        doc = json.loads(data) if str(path).endswith(".json") else yaml.safe_load(data)
    except (ValueError, yaml.YAMLError) as exc:
        raise ConfigurationError(f"seed file {path} is not valid JSON/YAML: {exc}") from None
    return parse_seed(doc)
