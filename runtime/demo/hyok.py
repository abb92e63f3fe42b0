"""The demo's third act, hold your own key: the digits model sealed again under a KMS key in an
external key store whose second layer is the owner's key in the owner's own XKS proxy (a real
``enclave kms xks-proxy`` process); an enclave unseals it; the owner disables its key in its
proxy; the next start of the enclave is refused with AWS's error
(``KMSInvalidStateException``)."""

from __future__ import annotations

import time
from pathlib import Path

from runtime.demo.narration import Console
from runtime.demo.results import DemoFailure
from runtime.stack import (
    Stack,
    create_xks_model_key,
    open_xks_proxy,
    read_audit,
    seal_bundled_model,
    start_server,
)

__all__ = ["hyok_owner_revokes"]


def _xks_message(reason: str) -> str:
    """The message AWS KMS answers for the proxy failure an audit reason names
    (``external key store proxy Decrypt: INVALID_STATE``)."""
    from kms.xks.failures import XksFailure

    name = reason.rsplit(": ", 1)[-1]
    failure = XksFailure.__members__.get(name)
    return failure.message if failure is not None else "?"


async def hyok_owner_revokes(
    stack: Stack, state_dir: Path, eif_path: Path, pcr0: str, out: Console
) -> str:
    """Run the act (see the module docstring) on ``stack`` with the server image ``eif_path``
    (PCR0 ``pcr0``). Returns the error the KMS answered once the owner revoked, and the audit
    log's reason. The store's "digits" file is the first act's again afterwards (``--keep``).

    Raises:
        DemoFailure: the enclave could not unseal the model before the revocation, was given
            the key after it, or the KMS recorded no refusal.
    """
    out.step("hold your own key: the owner's XKS proxy holds the second layer of the model key")
    first_act = stack.store.models["digits"]
    hyok_sealed = state_dir / "models" / "digits.hyok.sealed"
    async with open_xks_proxy(state_dir / "xks") as proxy:
        key_arn, store_id = await create_xks_model_key(
            stack, pcr0, proxy, alias="alias/hyok-models"
        )
        out.ok(f"external key store {store_id} CONNECTED to {proxy.endpoint}{proxy.uri_path}")
        out.ok(f"{key_arn}: KMS key material, then the owner's external key (double encryption)")
        await seal_bundled_model(stack, key_arn, hyok_sealed)
        stack.store.models["digits"] = hyok_sealed
        try:
            mark = proxy.mark()
            server = await start_server(stack, eif_path)
            if not server.report.ok:
                raise DemoFailure(f"the enclave could not unseal the model: {server.report.raw}")
            await proxy.wait_for("xks_request", since=mark)
            out.ok(f"enclave {server.enclave_id} unsealed it (the KMS asked the owner's proxy)")
            await stack.runtime.terminate(server.enclave_id)

            out.step("the owner revokes: disables its key in its own XKS proxy (SIGHUP reload)")
            await proxy.set_key_enabled(False)
            audit_before = len(read_audit(stack.kms_state_dir))
            t0 = time.monotonic()
            refused = await start_server(stack, eif_path)
            elapsed = time.monotonic() - t0
            model = refused.report.model("digits")
            if model is None or model.available:
                raise DemoFailure("the enclave was given the key after the owner revoked it!")
            denials = [
                line
                for line in read_audit(stack.kms_state_dir)[audit_before:]
                if line.get("operation") == "Decrypt" and line.get("error")
            ]
            if not denials:
                raise DemoFailure("no KMS refusal recorded after the owner revoked its key")
            error, reason = denials[-1].get("error"), denials[-1].get("reason")
            out.ok(
                f"next start: the KMS refused enclave {refused.enclave_id} the model key: "
                f"{error} (start to report {elapsed:.1f} s)"
            )
            out.info(f"AWS's message: {_xks_message(str(reason))}")
            out.info(f"audit log reason: {reason}")
            out.info(f"server reported: {model.reason}")
            # A server with other models still serves them: stop it (it may have exited).
            await stack.runtime.terminate(refused.enclave_id)
        finally:
            stack.store.models["digits"] = first_act
    return f"{error}: {reason}"
