"""Key policies: the IAM JSON subset KMS key policies use, parsed and evaluated (pure).

Supported: ``Version``, ``Id``, ``Statement`` (object or list) with ``Sid``, ``Effect``
(Allow/Deny), ``Principal`` (``"*"`` or ``{"AWS": ...}``; ``Service``/``Federated`` entries are
accepted and never match a caller), ``Action``/``NotAction`` (wildcards ``*`` ``?``,
case-insensitive), ``Resource``/``NotResource`` (wildcards), and ``Condition`` with
``StringEquals``, ``StringNotEquals``, ``StringEqualsIgnoreCase``, ``StringNotEqualsIgnoreCase``,
``StringLike``, ``StringNotLike``, ``ArnEquals``, ``ArnLike``, ``ArnNotEquals``, ``ArnNotLike``,
``Bool``, ``Null``, each with the ``ForAnyValue:``/``ForAllValues:`` prefixes and the ``IfExists``
suffix. Anything else is a :class:`~kms.errors.PolicyError` (fail closed rather than ignore a
condition we cannot evaluate).

Evaluation follows IAM: an explicit Deny wins, then any Allow, else the implicit default deny.
Condition keys are case-insensitive. A principal entry naming an account
(``"111122223333"`` or ``"arn:aws:iam::111122223333:root"``) matches every principal of that
account: in AWS it delegates to the account's IAM policies, and this emulator has no IAM, so the
delegation is treated as granted. :class:`Decision` carries a reason for the operator's log;
it never goes into a reply.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from .errors import PolicyError

__all__ = [
    "MAX_POLICY_CHARS",
    "MAX_POLICY_BYTES",
    "RequestContext",
    "Decision",
    "KeyPolicy",
    "default_key_policy",
    "account_of",
    "enclave_key_policy",
]

#: The longest key policy, in characters, botocore's model allows (PolicyType max 131072).
MAX_POLICY_CHARS = 131072
#: Kept for callers of the previous name: the limit is now counted in characters, as the model
#: counts it (every policy character is at most U+00FF, so at most two UTF-8 bytes).
MAX_POLICY_BYTES = MAX_POLICY_CHARS
_VERSIONS = frozenset({"2012-10-17", "2008-10-17"})
_STATEMENT_KEYS = frozenset(
    {
        "Sid",
        "Effect",
        "Principal",
        "NotPrincipal",
        "Action",
        "NotAction",
        "Resource",
        "NotResource",
        "Condition",
    }
)
#: Operator → (match kind, negated).
_OPERATORS: dict[str, tuple[str, bool]] = {
    "stringequals": ("eq", False),
    "stringnotequals": ("eq", True),
    "stringequalsignorecase": ("ieq", False),
    "stringnotequalsignorecase": ("ieq", True),
    "stringlike": ("like", False),
    "stringnotlike": ("like", True),
    "arnequals": ("eq", False),
    "arnnotequals": ("eq", True),
    "arnlike": ("like", False),
    "arnnotlike": ("like", True),
    "bool": ("bool", False),
    "null": ("null", False),
}
_ACCOUNT_RE = re.compile(r"^\d{12}$")
_ARN_ACCOUNT_RE = re.compile(r"^arn:aws[\w-]*:(?:iam|sts)::(\d{12}):")


def account_of(principal_arn: str) -> str | None:
    """The 12-digit account of an IAM/STS ARN, or None."""
    m = _ARN_ACCOUNT_RE.match(principal_arn)
    return m.group(1) if m else None


@lru_cache(maxsize=1024)
def _glob(pattern: str, ignore_case: bool) -> re.Pattern[str]:
    parts = []
    for ch in pattern:
        parts.append(".*" if ch == "*" else "." if ch == "?" else re.escape(ch))
    return re.compile("".join(parts), re.DOTALL | (re.IGNORECASE if ignore_case else 0))


def _like(pattern: str, value: str, ignore_case: bool = False) -> bool:
    return _glob(pattern, ignore_case).fullmatch(value) is not None


@dataclass(frozen=True, slots=True)
class RequestContext:
    """What a request looks like to the policy evaluator.

    Attributes:
        principal_arn: the authenticated caller.
        action: ``"kms:<Operation>"``.
        resource: the key ARN.
        conditions: condition key (any case) → its values (empty tuple = present, no value).
    """

    principal_arn: str
    action: str
    resource: str
    conditions: Mapping[str, tuple[str, ...]]


@dataclass(frozen=True, slots=True)
class Decision:
    """The outcome: ``allowed`` and, for the operator, which statement decided and why.

    ``explicit`` marks a Deny statement's decision: grants cannot override it (an implicit,
    default deny they can).
    """

    allowed: bool
    reason: str
    explicit: bool = False


@dataclass(frozen=True, slots=True)
class _Condition:
    operator: str  # as written, for reasons
    kind: str
    negated: bool
    set_op: str | None  # "any" | "all" | None
    if_exists: bool
    key: str  # lower-case
    values: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class _Statement:
    sid: str
    effect: str
    principals: tuple[str, ...] | None  # None = "*"
    actions: tuple[str, ...]
    not_action: bool
    resources: tuple[str, ...]
    not_resource: bool
    conditions: tuple[_Condition, ...]


def _str_list(value: Any, what: str) -> tuple[str, ...]:
    if isinstance(value, str):
        return (value,)
    if isinstance(value, list) and value and all(isinstance(v, str) for v in value):
        return tuple(value)
    raise PolicyError(f"{what} must be a string or a non-empty list of strings")


def _parse_principal(value: Any) -> tuple[str, ...] | None:
    if value == "*":
        return None
    if not isinstance(value, dict) or not value:
        raise PolicyError('Principal must be "*" or an object such as {"AWS": ...}')
    out: list[str] = []
    for kind, entries in value.items():
        if kind not in ("AWS", "Service", "Federated", "CanonicalUser"):
            raise PolicyError(f"unsupported Principal type {kind!r}")
        names = _str_list(entries, f"Principal.{kind}")
        if kind == "AWS":
            if "*" in names:
                return None
            for n in names:
                if not (_ACCOUNT_RE.match(n) or _ARN_ACCOUNT_RE.match(n)):
                    raise PolicyError(f"invalid principal {n!r}")
            out.extend(names)
        # Service/Federated/CanonicalUser principals never match a SigV4 caller here.
    return tuple(out)


def _parse_conditions(value: Any) -> tuple[_Condition, ...]:
    if not isinstance(value, dict):
        raise PolicyError("Condition must be an object")
    out: list[_Condition] = []
    for op, block in value.items():
        if not isinstance(op, str) or not isinstance(block, dict) or not block:
            raise PolicyError("each Condition operator maps to a non-empty object")
        name = op
        set_op: str | None = None
        if name.lower().startswith("foranyvalue:"):
            set_op, name = "any", name[len("ForAnyValue:") :]
        elif name.lower().startswith("forallvalues:"):
            set_op, name = "all", name[len("ForAllValues:") :]
        if_exists = name.lower().endswith("ifexists") and name.lower() != "ifexists"
        base = name[: -len("IfExists")] if if_exists else name
        spec = _OPERATORS.get(base.lower())
        if spec is None:
            raise PolicyError(f"unsupported condition operator {op!r}")
        kind, negated = spec
        if kind == "null" and (if_exists or set_op):
            raise PolicyError("Null takes no IfExists or set prefix")
        for key, raw in block.items():
            if isinstance(raw, bool):
                raw = "true" if raw else "false"
            if isinstance(raw, list):
                raw = ["true" if v is True else "false" if v is False else v for v in raw]
            values = _str_list(raw, f"Condition {op} {key}")
            if kind in ("bool", "null") and any(v.lower() not in ("true", "false") for v in values):
                raise PolicyError(f"{op} values must be true or false")
            out.append(_Condition(op, kind, negated, set_op, if_exists, str(key).lower(), values))
    return tuple(out)


def _parse_statement(index: int, st: Any) -> _Statement:
    if not isinstance(st, dict):
        raise PolicyError(f"Statement {index} must be an object")
    unknown = set(st) - _STATEMENT_KEYS
    if unknown:
        raise PolicyError(f"Statement {index} has unsupported fields {sorted(unknown)}")
    if "NotPrincipal" in st:
        raise PolicyError("NotPrincipal is not supported")
    sid = st.get("Sid", f"#{index}")
    if not isinstance(sid, str):
        raise PolicyError("Sid must be a string")
    effect = st.get("Effect")
    if effect not in ("Allow", "Deny"):
        raise PolicyError(f"Statement {sid}: Effect must be Allow or Deny")
    if "Principal" not in st:
        raise PolicyError(f"Statement {sid}: key policies need a Principal")
    if ("Action" in st) == ("NotAction" in st):
        raise PolicyError(f"Statement {sid}: exactly one of Action / NotAction")
    if ("Resource" in st) and ("NotResource" in st):
        raise PolicyError(f"Statement {sid}: not both Resource and NotResource")
    actions = _str_list(st.get("Action", st.get("NotAction")), "Action")
    for a in actions:
        if a != "*" and not a.lower().startswith("kms:"):
            raise PolicyError(f"Statement {sid}: action {a!r} is not a kms: action")
    resources = _str_list(st.get("Resource", st.get("NotResource", "*")), "Resource")
    return _Statement(
        sid=sid,
        effect=effect,
        principals=_parse_principal(st["Principal"]),
        actions=tuple(a.lower() for a in actions),
        not_action="NotAction" in st,
        resources=resources,
        not_resource="NotResource" in st,
        conditions=_parse_conditions(st.get("Condition", {})),
    )


def _cond_holds(c: _Condition, ctx_values: tuple[str, ...] | None) -> bool:
    if c.kind == "null":
        want_absent = c.values[0].lower() == "true"
        return (ctx_values is None) == want_absent
    if ctx_values is None:
        if c.if_exists:
            return True
        if c.set_op == "all":
            return True  # ForAllValues over an empty set is vacuously true (IAM)
        return c.negated and c.set_op is None

    def match(v: str) -> bool:
        if c.kind == "eq":
            hit = any(v == p for p in c.values)
        elif c.kind == "ieq":
            hit = any(v.casefold() == p.casefold() for p in c.values)
        elif c.kind == "like":
            hit = any(_like(p, v) for p in c.values)
        else:  # bool
            hit = any(v.lower() == p.lower() for p in c.values)
        return not hit if c.negated else hit

    if c.set_op == "all":
        return all(match(v) for v in ctx_values)
    if c.set_op == "any":
        return any(match(v) for v in ctx_values)
    if c.negated:
        return all(match(v) for v in ctx_values)
    return any(match(v) for v in ctx_values)


class KeyPolicy:
    """A parsed, validated key policy. Build with :meth:`parse`."""

    __slots__ = ("_statements", "text")

    def __init__(self, text: str, statements: tuple[_Statement, ...]) -> None:
        self.text = text
        self._statements = statements

    @classmethod
    def parse(cls, text: str) -> KeyPolicy:
        """Parse and validate policy JSON. Raises :class:`PolicyError` on anything unsupported."""
        if not isinstance(text, str):
            raise PolicyError("policy must be a string")
        if len(text) > MAX_POLICY_CHARS:
            raise PolicyError(f"policy is longer than {MAX_POLICY_CHARS} characters")
        try:
            doc = json.loads(text)
        except json.JSONDecodeError as exc:
            raise PolicyError(f"policy is not valid JSON: {exc.msg}") from None
        if not isinstance(doc, dict):
            raise PolicyError("policy must be a JSON object")
        unknown = set(doc) - {"Version", "Id", "Statement"}
        if unknown:
            raise PolicyError(f"policy has unsupported fields {sorted(unknown)}")
        if "Version" in doc and doc["Version"] not in _VERSIONS:
            raise PolicyError("Version must be 2012-10-17 or 2008-10-17")
        raw = doc.get("Statement")
        if isinstance(raw, dict):
            raw = [raw]
        if not isinstance(raw, list) or not raw:
            raise PolicyError("Statement must be an object or a non-empty list")
        return cls(text, tuple(_parse_statement(i, st) for i, st in enumerate(raw)))

    def _principal_matches(self, st: _Statement, principal_arn: str) -> bool:
        if st.principals is None:
            return True
        caller_account = account_of(principal_arn)
        for p in st.principals:
            if p == principal_arn:
                return True
            if caller_account is not None and (
                p == caller_account or p == f"arn:aws:iam::{caller_account}:root"
            ):
                return True
        return False

    @staticmethod
    def _action_matches(st: _Statement, action: str) -> bool:
        hit = any(_like(a, action, ignore_case=True) for a in st.actions)
        return not hit if st.not_action else hit

    @staticmethod
    def _resource_matches(st: _Statement, resource: str) -> bool:
        hit = any(_like(r, resource) for r in st.resources)
        return not hit if st.not_resource else hit

    def evaluate(self, ctx: RequestContext) -> Decision:
        """Decide ``ctx`` (explicit deny > allow > default deny)."""
        conditions = {k.lower(): v for k, v in ctx.conditions.items()}
        allow_sid: str | None = None
        near_miss: str | None = None
        for st in self._statements:
            if not (
                self._principal_matches(st, ctx.principal_arn)
                and self._action_matches(st, ctx.action)
                and self._resource_matches(st, ctx.resource)
            ):
                continue
            failed = next(
                (c for c in st.conditions if not _cond_holds(c, conditions.get(c.key))), None
            )
            if failed is not None:
                if st.effect == "Allow" and near_miss is None:
                    near_miss = (
                        f"statement {st.sid!r}: condition {failed.operator} {failed.key} "
                        "not satisfied"
                    )
                continue
            if st.effect == "Deny":
                return Decision(False, f"explicit deny in statement {st.sid!r}", explicit=True)
            allow_sid = allow_sid or st.sid
        if allow_sid is not None:
            return Decision(True, f"allowed by statement {allow_sid!r}")
        if near_miss is not None:
            return Decision(False, f"no statement allows {ctx.action}; {near_miss}")
        return Decision(False, f"no statement allows {ctx.action} to {ctx.principal_arn}")


def default_key_policy(account_id: str) -> str:
    """The policy AWS attaches when CreateKey has none: the account root gets ``kms:*``."""
    return json.dumps(
        {
            "Version": "2012-10-17",
            "Id": "key-default-1",
            "Statement": [
                {
                    "Sid": "Enable IAM User Permissions",
                    "Effect": "Allow",
                    "Principal": {"AWS": f"arn:aws:iam::{account_id}:root"},
                    "Action": "kms:*",
                    "Resource": "*",
                }
            ],
        },
        indent=2,
    )


def _principal_covers(admin: str, enclave: str) -> bool:
    """True if a key policy naming ``admin`` also matches a caller authenticated as ``enclave``
    (the same ARN, or ``admin`` names the enclave principal's whole account: here, with no IAM,
    an account principal matches every principal of the account)."""
    if admin == "*" or admin == enclave:
        return True
    account = account_of(enclave)
    return account is not None and admin in (account, f"arn:aws:iam::{account}:root")


def enclave_key_policy(
    *,
    admin_principal: str,
    enclave_principal: str,
    pcrs: Mapping[int, str],
    actions: Sequence[str] = ("kms:Decrypt", "kms:GenerateDataKey"),
    admin_actions: Sequence[str] = ("kms:*",),
    admin_sid: str = "KeyAdministration",
    enclave_sid: str = "ReleaseToAttestedEnclave",
) -> dict[str, Any]:
    """THE builder of attested key policies: ``admin_principal`` may perform ``admin_actions``
    without conditions; ``enclave_principal`` may perform ``actions`` only with a Recipient
    whose attestation matches ``pcrs``.

    PCR0 is required through ``kms:RecipientAttestation:ImageSha384`` (AWS's examples do the
    same; it is the same measurement), every other PCR through
    ``kms:RecipientAttestation:PCR<n>``. Debug-mode enclaves (PCR0/1/2 read as zeros) never
    match a real image's PCR0.

    Args:
        admin_principal: the key's administrator (an IAM ARN, distinct from the enclave's).
        enclave_principal: the principal the enclave signs its requests as.
        pcrs: PCR index → 96 hex digits; must include 0.
        actions: what is released to the attested enclave.
        admin_actions: what the administrator may do (e.g. the model owner's list, without
            kms:Decrypt, for a key whose plaintext only the enclave ever sees).
        admin_sid, enclave_sid: the statements' Sids (they appear in denial reasons).

    Raises:
        ValueError: bad PCRs, or an administrator statement that would also match the enclave
            principal for a released action: that unconditioned statement would release the
            key without attestation and make the condition pointless (issue 10: a DEBUG
            enclave got the model key). Use two principals.
    """
    if 0 not in pcrs:
        raise ValueError("pcrs must include PCR0 (the image measurement)")
    for index, value in pcrs.items():
        if not 0 <= index < 32 or not re.fullmatch(r"[0-9a-fA-F]{96}", value):
            raise ValueError(f"PCR{index} must be 96 hex digits (SHA-384)")
    if not actions or not admin_actions:
        raise ValueError("actions and admin_actions must not be empty")
    released = [a for a in actions if any(_like(g, a, ignore_case=True) for g in admin_actions)]
    if released and _principal_covers(admin_principal, enclave_principal):
        raise ValueError(
            f"the admin principal {admin_principal} also matches the enclave principal "
            f"{enclave_principal}, and its statement grants {', '.join(released)} without any "
            "condition: the key would be released without attestation (to a debug-mode enclave "
            "too), making the attestation condition pointless. Give the enclave its own "
            "principal (its own credentials) distinct from the administrator's"
        )
    conditions = {"kms:RecipientAttestation:ImageSha384": pcrs[0].lower()}
    for index in sorted(pcrs):
        if index != 0:
            conditions[f"kms:RecipientAttestation:PCR{index}"] = pcrs[index].lower()
    return {
        "Version": "2012-10-17",
        "Statement": [
            {
                "Sid": admin_sid,
                "Effect": "Allow",
                "Principal": {"AWS": admin_principal},
                "Action": _one_or_list(admin_actions),
                "Resource": "*",
            },
            {
                "Sid": enclave_sid,
                "Effect": "Allow",
                "Principal": {"AWS": enclave_principal},
                "Action": _one_or_list(actions),
                "Resource": "*",
                "Condition": {"StringEqualsIgnoreCase": conditions},
            },
        ],
    }


def _one_or_list(items: Sequence[str]) -> str | list[str]:
    # One action is written as a string, as AWS's console and the demo's policy do.
    return items[0] if len(items) == 1 else list(items)


def context_values(values: Sequence[str] | str) -> tuple[str, ...]:
    """Normalise a condition value (helper for building :class:`RequestContext`)."""
    return (values,) if isinstance(values, str) else tuple(values)
