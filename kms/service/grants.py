"""Grants: CreateGrant, ListGrants, ListRetirableGrants, RetireGrant, RevokeGrant.

A grant lets a grantee principal perform a set of grant operations on one key, optionally only
with a given encryption context (``EncryptionContextEquals``: exactly it;
``EncryptionContextSubset``: at least its pairs). Authorization consults grants after the key
policy (:meth:`KmsService.authorize`): a grant never overrides an explicit Deny. Grants take
effect when CreateGrant answers (this KMS has no eventual consistency), so a grant token is
only checked for authenticity.

Grants carry no attestation condition: a grant allowing Decrypt releases plaintext to its
grantee without a Recipient, exactly as in AWS. Keep ``kms:CreateGrant`` out of the hands of
anyone who must not release an attested key (the README says so).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import TYPE_CHECKING

from ..errors import KmsApiError
from ..policy import RequestContext, account_of
from ._model import Answer, Grant, GrantConstraints, Key, Params
from ._scaffold import KeyStep, Locate, Operation, Request, Require
from .management import page

if TYPE_CHECKING:
    from ._core import KmsService

__all__ = ["OPERATIONS", "constraints_hold", "MAX_GRANTS_PER_KEY"]

#: AWS's quota of grants per KMS key.
MAX_GRANTS_PER_KEY = 50000
#: Grant operations a constrained grant may list although they take no encryption context
#: (AWS does not apply the constraint to them).
_CONTEXTLESS_OK = frozenset({"DescribeKey", "RetireGrant", "CreateGrant"})
#: Grant operations whose requests carry an EncryptionContext (symmetric keys only).
_WITH_CONTEXT = frozenset(
    {
        "Decrypt",
        "Encrypt",
        "GenerateDataKey",
        "GenerateDataKeyWithoutPlaintext",
        "ReEncryptFrom",
        "ReEncryptTo",
        "GenerateDataKeyPair",
        "GenerateDataKeyPairWithoutPlaintext",
    }
)
_GRANT_ID_RE = re.compile(r"[0-9a-f]{64}")
_PRINCIPAL_ARN_RE = re.compile(r"arn:aws[a-z-]*:(?:iam|sts)::\d{12}:\S+")
_ACCOUNT_RE = re.compile(r"\d{12}")


def constraints_hold(grant: Grant, context: Mapping[str, str] | None) -> bool:
    """True if ``grant``'s constraints admit a request with encryption context ``context``
    (None: the operation takes no encryption context, and that constraint does not apply).

    A ``SourceArn`` constraint never holds: no request here is made on behalf of an AWS
    resource (there is no ``aws:SourceArn``), so such a grant allows nothing (fail closed).
    """
    c = grant.constraints
    if not c:
        return True
    if "SourceArn" in c:
        return False
    if context is None:
        return True
    equals = c.get("EncryptionContextEquals")
    if equals is not None and dict(context) != dict(equals):
        return False
    subset = c.get("EncryptionContextSubset")
    return subset is None or all(context.get(k) == v for k, v in subset.items())


def _principal(value: str, member: str) -> str:
    """A grantee/retiring principal: an IAM/STS ARN or an account id (InvalidArnException)."""
    if not (_PRINCIPAL_ARN_RE.fullmatch(value) or _ACCOUNT_RE.fullmatch(value)):
        raise KmsApiError("InvalidArnException", f"{member} {value[:256]} is not a valid ARN.")
    return value


def _check_create(p: Params) -> None:
    if p.opt_text("GranteePrincipal") is None and p.opt_text("GranteeServicePrincipal") is None:
        raise KmsApiError(
            "ValidationException", "Either GranteePrincipal or GranteeServicePrincipal is required."
        )
    for member in ("GranteePrincipal", "RetiringPrincipal"):
        value = p.opt_text(member)
        if value is not None:
            _principal(value, member)
    if not p.text_list("Operations"):
        raise KmsApiError("ValidationException", "Operations must name at least one operation.")
    constraints = p.opt_constraints("Constraints") or {}
    has_context = any(
        k in constraints for k in ("EncryptionContextEquals", "EncryptionContextSubset")
    )
    if has_context:
        bad = sorted(set(p.text_list("Operations")) - _WITH_CONTEXT - _CONTEXTLESS_OK)
        if bad:
            raise KmsApiError(
                "ValidationException",
                "Encryption context grant constraints are not supported for operations that "
                f"take no encryption context: {', '.join(bad)}.",
            )


def _conditions(p: Params) -> dict[str, tuple[str, ...]]:
    """CreateGrant's condition keys (kms:GrantOperations, kms:GranteePrincipal...)."""
    out: dict[str, tuple[str, ...]] = {"kms:grantoperations": tuple(p.text_list("Operations"))}
    if p.opt_text("GranteePrincipal"):
        out["kms:granteeprincipal"] = (p.text("GranteePrincipal"),)
    if p.opt_text("RetiringPrincipal"):
        out["kms:retiringprincipal"] = (p.text("RetiringPrincipal"),)
    constraints = p.opt_constraints("Constraints") or {}
    kinds = tuple(
        k for k in ("EncryptionContextEquals", "EncryptionContextSubset") if k in constraints
    )
    if kinds:
        out["kms:grantconstrainttype"] = kinds
    return out


def _at_least_as_strict(parent: Grant, new: GrantConstraints) -> bool:
    """AWS: a grant created under a constrained grant's CreateGrant permission must be equally
    strict or stricter."""
    equals = parent.constraints.get("EncryptionContextEquals")
    subset = parent.constraints.get("EncryptionContextSubset")
    new_equals = new.get("EncryptionContextEquals")
    new_subset = new.get("EncryptionContextSubset")
    if equals is not None:
        return new_equals is not None and dict(new_equals) == dict(equals)
    if subset is not None:
        pairs = new_equals if new_equals is not None else new_subset
        return pairs is not None and all(pairs.get(k) == v for k, v in subset.items())
    return True


def _same_request(grant: Grant, p: Params, constraints: GrantConstraints) -> bool:
    return (
        grant.grantee == p.opt_text("GranteePrincipal")
        and grant.retiring == p.opt_text("RetiringPrincipal")
        and grant.operations == frozenset(p.text_list("Operations"))
        and grant.constraints == constraints
        and grant.grantee_service == p.opt_text("GranteeServicePrincipal")
        and grant.retiring_service == p.opt_text("RetiringServicePrincipal")
    )


async def _create_grant(svc: KmsService, r: Request) -> Answer:
    key, p = r.key(), r.params
    constraints: GrantConstraints = p.opt_constraints("Constraints") or {}
    if r.outcome.grant_id is not None:  # authorized by a grant, not by the key policy
        parent = key.grants.get(r.outcome.grant_id)
        if parent is not None:
            if not set(p.text_list("Operations")) <= parent.operations:
                raise KmsApiError(
                    "AccessDeniedException",
                    f"User: {r.caller.principal_arn} is not authorized to grant operations "
                    "its own grant does not allow.",
                )
            if not _at_least_as_strict(parent, constraints):
                raise KmsApiError(
                    "AccessDeniedException",
                    f"User: {r.caller.principal_arn} may only create grants with an encryption "
                    "context constraint at least as strict as its own grant's.",
                )
    name = p.opt_text("Name")
    if name is not None:  # a retried request with the same name answers the same grant
        for grant in key.grants.values():
            if grant.name == name and _same_request(grant, p, constraints):
                return {
                    "GrantToken": svc.master.grant_token(grant.grant_id),
                    "GrantId": grant.grant_id,
                }
    if len(key.grants) >= MAX_GRANTS_PER_KEY:
        raise KmsApiError(
            "LimitExceededException", f"{key.arn} has reached {MAX_GRANTS_PER_KEY} grants."
        )
    from .. import _wrap

    account = account_of(r.caller.principal_arn) or svc.account_id
    grant = Grant(
        grant_id=_wrap.random_bytes(32).hex(),
        key_id=key.key_id,
        name=name,
        created=svc.clock(),
        grantee=p.opt_text("GranteePrincipal"),
        retiring=p.opt_text("RetiringPrincipal"),
        issuing_account=f"arn:aws:iam::{account}:root",
        operations=frozenset(p.text_list("Operations")),
        constraints=constraints,
        grantee_service=p.opt_text("GranteeServicePrincipal"),
        retiring_service=p.opt_text("RetiringServicePrincipal"),
    )
    await svc.put_grant(key, grant)
    return {"GrantToken": svc.master.grant_token(grant.grant_id), "GrantId": grant.grant_id}


def _entry(key: Key, grant: Grant) -> Answer:
    return {"KeyId": key.arn, **grant.to_json()}


def _check_grant_id(grant_id: str) -> None:
    if not _GRANT_ID_RE.fullmatch(grant_id):
        raise KmsApiError("InvalidGrantIdException", "The grant ID is not valid.")


async def _list_grants(svc: KmsService, r: Request) -> Answer:
    key, p = r.key(), r.params
    if p.opt_text("GrantId") is not None:
        _check_grant_id(p.text("GrantId"))
    chosen = [
        g
        for g in sorted(key.grants.values(), key=lambda g: (g.created, g.grant_id))
        if p.opt_text("GrantId") in (None, g.grant_id)
        and p.opt_text("GranteePrincipal") in (None, g.grantee)
        and p.opt_text("GranteeServicePrincipal") in (None, g.grantee_service)
    ]
    items, more = page(chosen, p, 50)
    return {"Grants": [_entry(key, g) for g in items], **more}


async def _list_retirable_grants(svc: KmsService, r: Request) -> Answer:
    p = r.params
    retiring = p.opt_text("RetiringPrincipal")
    service = p.opt_text("RetiringServicePrincipal")
    if retiring is None and service is None:
        raise KmsApiError(
            "ValidationException",
            "Either RetiringPrincipal or RetiringServicePrincipal is required.",
        )
    if retiring is not None:
        _principal(retiring, "RetiringPrincipal")
        # No IAM is emulated: a principal may list its own retirable grants, or those of a
        # principal of its own account (the account's IAM would decide; delegation granted).
        caller_account = account_of(r.caller.principal_arn)
        if retiring != r.caller.principal_arn and caller_account not in (
            retiring,
            account_of(retiring),
        ):
            r.outcome.decision = "deny"
            r.outcome.reason = "retiring principal of another account"
            raise KmsApiError(
                "AccessDeniedException",
                f"User: {r.caller.principal_arn} is not authorized to perform: "
                "kms:ListRetirableGrants",
            )
    found = [
        (key, g)
        for key in svc.all_keys()
        for g in key.grants.values()
        if (retiring is not None and g.retiring == retiring)
        or (service is not None and g.retiring_service == service)
    ]
    found.sort(key=lambda kg: (kg[1].created, kg[1].grant_id))
    items, more = page(found, p, 50)
    return {"Grants": [_entry(k, g) for k, g in items], **more}


def _find(svc: KmsService, r: Request) -> tuple[Key, Grant]:
    p = r.params
    token = p.opt_text("GrantToken")
    if token is not None:
        grant_id = svc.master.grant_of_token(token)
        if grant_id is None:
            raise KmsApiError("InvalidGrantTokenException", "The grant token is not valid.")
        for key in svc.all_keys():
            grant = key.grants.get(grant_id)
            if grant is not None:
                if p.opt_text("KeyId") is not None and svc.resolve(p.text("KeyId")) is not key:
                    break
                return key, grant
        raise KmsApiError("NotFoundException", "Grant not found.")
    if p.opt_text("KeyId") is None or p.opt_text("GrantId") is None:
        raise KmsApiError(
            "ValidationException", "Specify a GrantToken, or both a KeyId and a GrantId."
        )
    _check_grant_id(p.text("GrantId"))
    key = svc.resolve(p.text("KeyId"), allow_alias=False)
    grant = key.grants.get(p.text("GrantId"))
    if grant is None:
        raise KmsApiError("NotFoundException", "Grant not found.")
    return key, grant


async def _retire_grant(svc: KmsService, r: Request) -> Answer:
    """AWS: the retiring principal, the grantee if the grant allows RetireGrant, or the account
    that issued the grant may retire it. With no IAM emulated, "the account" is its root
    principal, or a principal the key policy allows kms:RetireGrant (an account-level grant of
    the permission, as IAM would give)."""
    key, grant = _find(svc, r)
    out, caller = r.outcome, r.caller.principal_arn
    out.key_arn = key.arn
    ctx = RequestContext(caller, "kms:RetireGrant", key.arn, svc.conditions(r.caller, None, None))
    if grant.retiring == caller:
        why = "the grant's retiring principal"
    elif grant.grantee == caller and "RetireGrant" in grant.operations:
        why = "the grantee, and the grant allows RetireGrant"
    elif caller == grant.issuing_account:
        why = "the account that issued the grant"
    elif key.policy.evaluate(ctx).allowed:
        why = "the key policy (kms:RetireGrant)"
    else:
        out.decision = "deny"
        out.reason = "not the retiring principal, nor a grantee allowed to retire, nor the issuer"
        raise KmsApiError(
            "AccessDeniedException",
            f"User: {caller} is not authorized to perform: kms:RetireGrant on resource: {key.arn}",
        )
    out.decision, out.reason = "allow", f"RetireGrant by {why}"
    if r.params.opt_bool("DryRun"):
        raise KmsApiError(
            "DryRunOperationException",
            "The request would have succeeded, but the DryRun option is set.",
        )
    await svc.delete_grant(key, grant.grant_id)
    return {}


async def _revoke_grant(svc: KmsService, r: Request) -> Answer:
    key = r.key()
    _check_grant_id(r.params.text("GrantId"))
    if r.params.text("GrantId") not in key.grants:
        raise KmsApiError("NotFoundException", "Grant not found.")
    await svc.delete_grant(key, r.params.text("GrantId"))
    return {}


OPERATIONS = (
    Operation(
        "CreateGrant",
        _create_grant,
        keys=(KeyStep(locate=Locate.KEY_ID_NO_ALIAS, require=Require.USABLE),),
        check=_check_create,
        dry_run=True,
        writes=True,
        conditions=_conditions,
    ),
    Operation("ListGrants", _list_grants, keys=(KeyStep(),)),
    Operation("ListRetirableGrants", _list_retirable_grants),
    # Authorized by the grant itself (retiring principal, grantee, issuing account).
    Operation("RetireGrant", _retire_grant, writes=True),
    Operation(
        "RevokeGrant",
        _revoke_grant,
        keys=(KeyStep(require=Require.ANY),),
        dry_run=True,
        writes=True,
    ),
)
