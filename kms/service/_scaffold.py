"""The one scaffold every KMS operation runs through, and the declarations it reads.

Theory of operation. An operation is declared once, as an :class:`Operation`: which keys it
touches and how each is found (:class:`KeyStep`), what it must be allowed to do on each, what
state each key must be in, whether it accepts a ``Recipient``, honours ``DryRun`` or changes
state. Only what differs is code: an optional ``check`` of the parameters (before anything
else, as AWS validates first) and the ``run`` step that does the operation's own work.
:func:`run_operation` is the pipeline, in this order:

1. ``check(params)``: request-level validation (algorithms, sizes);
2. ``Recipient``: the attestation document is verified (:mod:`kms.recipient`), facts recorded;
3. for each key step: locate the key (by id/alias/ARN, by an alias's current target, or by the
   ciphertext's header), **authorize** (key policy; later also grants) with the request's
   encryption context and Recipient conditions, **require** the key's state, and for a
   ciphertext step open the blob;
4. ``DryRun``: stop here with AWS's ``DryRunOperationException``;
5. ``run(svc, request)``: the operation's own work, under the service's write lock when it
   ``writes``;
6. the answer: a :class:`Release` (secret bytes) becomes ``Plaintext`` (or the operation's own
   field) or, with a Recipient, ``CiphertextForRecipient`` (CMS to the document's RSA key) and
   no plaintext at all.

Key-less operations (CreateKey, ListKeys, GenerateRandom) declare no key step and are recorded
as allowed "not key-scoped (no IAM emulated)".

Grants are one more source consulted in the authorize step (:meth:`KmsService.authorize`),
so every operation gets them at once; grant tokens are checked first (step 1b), and an invalid
one fails the request whatever the policy says. Asymmetric and HMAC operations declare the
``KeyUsage`` their key must have (``usage``, checked after the state). A CIPHERTEXT step is
located by its ``KeyId`` instead of the blob's header when the ciphertext is an asymmetric one
(an RSAES algorithm is named) or when a dry run says ``IGNORE_CIPHERTEXT`` (nothing is opened).
Imported material changes where a key's material lives, not this pipeline. A key in an
external key store (:mod:`.external`) adds two things: a USABLE step also requires its store to
be CONNECTED, and its ciphertext is opened through the store's proxy, asynchronously, after
every key step has been authorized and a dry run has stopped (step 4b): the proxy is never
called for a request that is refused or only a dry run.
"""

from __future__ import annotations

import base64
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from enum import Enum
from typing import TYPE_CHECKING

from .. import cms
from ..errors import KmsApiError
from ..keyspecs import SYMMETRIC
from ..keystores.blob import XksBlob
from ..keystores.record import EXTERNAL_KEY_STORE_ORIGIN
from . import external
from ._model import Answer, Caller, Key, Outcome, Params, RecipientInfo

if TYPE_CHECKING:
    from ._core import KmsService

__all__ = [
    "Locate",
    "Require",
    "KeyStep",
    "Operation",
    "Request",
    "Release",
    "run_operation",
]


class Locate(Enum):
    """How a key step finds its key."""

    #: A key id, key ARN, alias name or alias ARN in the parameter.
    KEY_ID = "key_id"
    #: As KEY_ID, but aliases are refused (ValidationException), as AWS does for key management.
    KEY_ID_NO_ALIAS = "key_id_no_alias"
    #: The key an existing alias (named in the parameter) points at.
    ALIAS_TARGET = "alias_target"
    #: The key named in a CiphertextBlob's header (the parameter); ``key_id_param`` may name the
    #: key the caller expects (IncorrectKeyException if it differs).
    CIPHERTEXT = "ciphertext"


class Require(Enum):
    """The key state a step requires after authorization."""

    ANY = "any"
    #: Enabled (DisabledException / KMSInvalidStateException otherwise).
    USABLE = "usable"
    NOT_PENDING_DELETION = "not_pending_deletion"
    PENDING_DELETION = "pending_deletion"
    #: Enabled or Disabled (EnableKey, DisableKey: not pending deletion nor pending import).
    NOT_PENDING = "not_pending"


@dataclass(frozen=True, slots=True)
class KeyStep:
    """One key an operation touches: where it is named, which action is authorized on it.

    Attributes:
        param: the request member naming the key (or holding the ciphertext).
        locate: how the key is found.
        action: the ``kms:`` action authorized on it; None = the operation's name.
        context: the request member holding the EncryptionContext bound into the conditions.
        require: the state the key must be in.
        optional: an absent ``param`` means no key (and no authorization) for this step.
        key_id_param: for CIPHERTEXT steps, the member that may name the expected key.
        algorithm_param: for CIPHERTEXT steps, the member naming the encryption algorithm (an
            asymmetric one locates the key by ``key_id_param``).
        usage: the KeyUsage the key must have (InvalidKeyUsageException otherwise).
        symmetric: the key must be a symmetric encryption key (GenerateDataKey*).
    """

    param: str = "KeyId"
    locate: Locate = Locate.KEY_ID_NO_ALIAS
    action: str | None = None
    context: str | None = None
    require: Require = Require.ANY
    optional: bool = False
    key_id_param: str | None = None
    algorithm_param: str | None = None
    usage: str | None = None
    symmetric: bool = False


@dataclass(slots=True)
class Request:
    """One call as the ``run`` step sees it: parameters, caller and what the scaffold found.

    Attributes:
        keys: the located, authorized keys, one per declared key step (None for an optional
            step whose parameter was absent).
        plaintext: for a CIPHERTEXT step, the opened blob.
        recipient: the verified Recipient, if the request carried one.
        version: for a CIPHERTEXT step, the key material version that opened it (symmetric).
        operation: the operation's wire name (set by :func:`run_operation`).
        pending: a CIPHERTEXT step's blob of a key in an external key store, with its key
            and encryption context, opened through the proxy once every step is authorized.
    """

    params: Params
    caller: Caller
    outcome: Outcome
    keys: list[Key | None] = field(default_factory=list)
    plaintext: bytes | None = None
    recipient: RecipientInfo | None = None
    version: int | None = None
    operation: str = ""
    pending: tuple[Key, XksBlob, dict[str, str] | None] | None = None

    def key(self, index: int = 0) -> Key:
        """The key of step ``index`` (it must have been located)."""
        key = self.keys[index]
        assert key is not None, "optional key step without a key"
        return key


@dataclass(frozen=True, slots=True)
class Release:
    """A secret the answer carries: as ``field`` (base64) or, with a Recipient, only inside
    ``CiphertextForRecipient``."""

    secret: bytes
    answer: Answer
    field: str = "Plaintext"


Run = Callable[["KmsService", Request], Awaitable[Answer | Release]]


@dataclass(frozen=True, slots=True)
class Operation:
    """The declaration of one KMS operation (see the module docstring for the pipeline).

    Attributes:
        name: the wire name (``X-Amz-Target: TrentService.<name>``) and default action.
        run: the operation's own work.
        keys: the keys it touches, in the order AWS checks them.
        check: request validation run before anything else.
        recipient: accepts ``Recipient`` (attested release).
        dry_run: honours ``DryRun``.
        writes: changes state (runs under the service's write lock).
        conditions: request-specific policy condition keys (e.g. CreateGrant's
            ``kms:GrantOperations``), added to the authorization context.
    """

    name: str
    run: Run
    keys: tuple[KeyStep, ...] = ()
    check: Callable[[Params], None] | None = None
    recipient: bool = False
    dry_run: bool = False
    writes: bool = False
    conditions: Callable[[Params], dict[str, tuple[str, ...]]] | None = None


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


async def run_operation(svc: KmsService, op: Operation, request: Request) -> Answer:
    """Run ``op`` through the scaffold. Raises :class:`KmsApiError`."""
    params = request.params
    request.operation = op.name
    if op.check is not None:
        op.check(params)
    tokens = params.opt_text_list("GrantTokens")
    if tokens:
        svc.check_grant_tokens(tokens)
    recipient = params.opt_record("Recipient") if op.recipient else None
    if recipient is not None:
        request.recipient = svc.verify_recipient(recipient, request, op.name)
    if op.writes:
        async with svc.write_lock:
            _locate_and_authorize(svc, op, request)
            if request.pending is not None:
                await _open_pending(svc, request)
            result = await op.run(svc, request)
    else:
        _locate_and_authorize(svc, op, request)
        if request.pending is not None:
            await _open_pending(svc, request)
        result = await op.run(svc, request)
    out = request.outcome
    # No key located and the run decided nothing itself (RetireGrant does): not key-scoped.
    if out.decision == "error" and request.keys.count(None) == len(request.keys):
        out.decision, out.reason = "allow", f"{op.name} is not key-scoped (no IAM emulated)"
    if isinstance(result, Release):
        answer = result.answer
        if request.recipient is not None:
            envelope = cms.build_enveloped_data(result.secret, request.recipient.public_key)
            answer["CiphertextForRecipient"] = _b64(envelope)
        else:
            answer[result.field] = _b64(result.secret)
        return answer
    return result


async def _open_pending(svc: KmsService, request: Request) -> None:
    """Step 4b: open an external key store's blob through its proxy."""
    assert request.pending is not None
    key, parsed, context = request.pending
    request.plaintext = await external.open_blob(svc, key, parsed, context, request)


def _dry_run(op: Operation, params: Params) -> bool:
    return op.dry_run and params.flag("DryRun")


def _locate_and_authorize(svc: KmsService, op: Operation, request: Request) -> None:
    """Steps 3 and 4 (synchronous: every key step works on the in-memory key set)."""
    params = request.params
    extra = op.conditions(params) if op.conditions is not None else None
    dry_run = _dry_run(op, params)
    for step in op.keys:
        if step.optional and step.param not in params:
            request.keys.append(None)
            continue
        context = params.opt_mapping(step.context) if step.context else None
        locate = step.locate
        header = None
        asymmetric = None
        if locate is Locate.KEY_ID or locate is Locate.KEY_ID_NO_ALIAS:  # the common case first
            key = svc.resolve(params.text(step.param), allow_alias=locate is Locate.KEY_ID)
        elif locate is Locate.CIPHERTEXT:
            key_id = params.opt_text(step.key_id_param) if step.key_id_param else None
            algorithm = (
                params.opt_text(step.algorithm_param, SYMMETRIC)
                if step.algorithm_param
                else SYMMETRIC
            )
            ignore = dry_run and "IGNORE_CIPHERTEXT" in params.opt_text_list("DryRunModifiers", [])
            if not ignore and step.param not in params:
                raise KmsApiError(
                    "ValidationException",
                    f"1 validation error detected: Value null at '{step.param[0].lower()}"
                    f"{step.param[1:]}' failed to satisfy constraint: Member must not be null",
                )
            if algorithm != SYMMETRIC or ignore:
                if key_id is None:
                    why = "an asymmetric ciphertext" if not ignore else "IGNORE_CIPHERTEXT"
                    raise KmsApiError(
                        "ValidationException", f"{step.key_id_param} is required for {why}."
                    )
                key = svc.resolve(key_id)
                asymmetric = None if ignore else algorithm
            else:
                key, header = svc.locate_ciphertext(
                    params.blob(step.param), key_id, request.outcome
                )
        else:
            key = svc.alias_target(params.text(step.param))
        svc.authorize(
            request.outcome,
            request.caller,
            step.action or op.name,
            key,
            context=(context or {}) if step.context else None,
            recipient=request.recipient,
            params=params,
            extra=extra,
        )
        if step.require is not Require.ANY:
            _require(key, step.require)
            if step.require is Require.USABLE and key.meta["Origin"] == EXTERNAL_KEY_STORE_ORIGIN:
                external.require_connected(svc, key, request.outcome)
        usage = step.usage
        if (usage is not None and key.meta["KeyUsage"] != usage) or step.symmetric:
            _usage(key, step, step.action or op.name)
        if isinstance(header, XksBlob):
            request.pending = (key, header, context)
            request.version = header.key_version
        elif header is not None:
            request.plaintext = svc.open_ciphertext(key, header, context, request.outcome)
            request.version = header.key_version
        elif asymmetric is not None:
            if context:
                raise KmsApiError(
                    "ValidationException",
                    "EncryptionContext is not supported with asymmetric KMS keys.",
                )
            request.plaintext = svc.open_asymmetric(
                key, asymmetric, params.blob(step.param), request.outcome
            )
        request.keys.append(key)
    if dry_run:
        raise KmsApiError(
            "DryRunOperationException",
            "The request would have succeeded, but the DryRun option is set.",
        )


def _require(key: Key, require: Require) -> None:
    """AWS's key-state table for the states this KMS has."""
    state = key.state
    if state == "Enabled" or require is Require.ANY:
        if require is Require.PENDING_DELETION and state != "PendingDeletion":
            raise KmsApiError("KMSInvalidStateException", f"{key.arn} is not pending deletion.")
        return
    if require is Require.PENDING_DELETION:
        if state != "PendingDeletion":
            raise KmsApiError("KMSInvalidStateException", f"{key.arn} is not pending deletion.")
        return
    if state == "PendingDeletion":
        raise KmsApiError("KMSInvalidStateException", f"{key.arn} is pending deletion.")
    if state == "PendingImport" and require is not Require.NOT_PENDING_DELETION:
        raise KmsApiError("KMSInvalidStateException", f"{key.arn} is pending import.")
    if state == "Disabled" and require is Require.USABLE:
        raise KmsApiError("DisabledException", f"{key.arn} is disabled.")


def _usage(key: Key, step: KeyStep, action: str) -> None:
    """The key's usage (and spec) must fit the operation."""
    if step.symmetric and key.meta["KeySpec"] != SYMMETRIC:
        raise KmsApiError(
            "InvalidKeyUsageException",
            f"{key.arn} key spec is {key.meta['KeySpec']}, which is not valid for {action}: "
            "it needs a symmetric encryption KMS key.",
        )
    if step.usage is not None and key.usage != step.usage:
        raise KmsApiError(
            "InvalidKeyUsageException",
            f"{key.arn} key usage is {key.usage} which is not valid for {action}.",
        )
