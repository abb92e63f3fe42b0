"""Authorization and key policies: GetKeyPolicy, PutKeyPolicy, and the policy lockout check.

The authorization step itself is the scaffold's (:meth:`KmsService.authorize`, run for every key
step), and Recipient verification is :meth:`KmsService.verify_recipient`; this family holds the
operations that read and replace the policy those steps evaluate.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..errors import KmsApiError, PolicyError
from ..policy import KeyPolicy, RequestContext
from ._model import Answer, Caller, Params
from ._scaffold import KeyStep, Operation, Request

if TYPE_CHECKING:
    from ._core import KmsService

__all__ = ["OPERATIONS", "lockout_check", "parse_policy"]


def parse_policy(text: str) -> KeyPolicy:
    """Parse a policy from a request (MalformedPolicyDocumentException)."""
    try:
        return KeyPolicy.parse(text)
    except PolicyError as exc:
        raise KmsApiError("MalformedPolicyDocumentException", str(exc)) from None


def lockout_check(
    svc: KmsService, policy: KeyPolicy, caller: Caller, arn: str, bypass: bool
) -> None:
    """AWS's policy lockout safety check: the caller must keep kms:PutKeyPolicy."""
    if bypass:
        return
    ctx = RequestContext(
        caller.principal_arn, "kms:PutKeyPolicy", arn, svc.conditions(caller, None, None)
    )
    if not policy.evaluate(ctx).allowed:
        raise KmsApiError(
            "MalformedPolicyDocumentException",
            "The new key policy will not allow you to update the key policy in the future.",
        )


def _check_policy_name(p: Params) -> None:
    if p.opt_text("PolicyName", "default") != "default":
        raise KmsApiError("NotFoundException", "No such policy exists")


async def _get_key_policy(svc: KmsService, r: Request) -> Answer:
    _check_policy_name(r.params)
    return {"Policy": r.key().policy.text, "PolicyName": "default"}


async def _put_key_policy(svc: KmsService, r: Request) -> Answer:
    p, key = r.params, r.key()
    _check_policy_name(p)
    policy = parse_policy(p.text("Policy"))
    lockout_check(svc, policy, r.caller, key.arn, p.flag("BypassPolicyLockoutSafetyCheck"))
    await svc.save(key, key.meta.copy(), policy)
    return {}


OPERATIONS = (
    Operation("GetKeyPolicy", _get_key_policy, keys=(KeyStep(),)),
    Operation("PutKeyPolicy", _put_key_policy, keys=(KeyStep(),), writes=True),
)
