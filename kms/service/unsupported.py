"""The operations of AWS's KMS model this KMS does not serve, each with the reason it gives.

Every one answers ``UnsupportedOperationException`` with a message naming the operation, so a
client learns at once what is missing, not a generic "unknown operation". The request's
members are not validated: nothing would be done with them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, NoReturn

from ..errors import KmsApiError
from ._scaffold import Operation, Request, Run

if TYPE_CHECKING:
    from ._core import KmsService

__all__ = ["OPERATIONS", "REASONS"]

_MULTI_REGION = "multi-Region keys are not supported: this KMS serves one Region"

#: Operation → why this KMS does not serve it.
REASONS: dict[str, str] = {
    "ReplicateKey": _MULTI_REGION,
    "UpdatePrimaryRegion": _MULTI_REGION,
    "GetKeyLastUsage": "key last-usage tracking is not kept by this KMS",
}


def _refuse(name: str) -> Run:
    async def run(svc: KmsService, r: Request) -> NoReturn:
        raise KmsApiError(
            "UnsupportedOperationException",
            f"{name} is not supported by this KMS: {REASONS[name]}.",
        )

    return run


OPERATIONS = tuple(Operation(name, _refuse(name)) for name in sorted(REASONS))
