"""The demo's steps in order (:func:`run_demo`): the stack, the image, the key, the sealed
models, the server enclave, the attested client and the three acts, each narrated on a
:class:`~runtime.demo.narration.Console`. The acts themselves live in their own modules
(:mod:`~runtime.demo.digits`, :mod:`~runtime.demo.text`, :mod:`~runtime.demo.debug`,
:mod:`~runtime.demo.hyok`); the building blocks in :mod:`runtime.stack`."""

from __future__ import annotations

import time
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

import trio

from runtime.demo import digits
from runtime.demo.debug import debug_enclave_refused
from runtime.demo.hyok import hyok_owner_revokes
from runtime.demo.keep import keep_instructions
from runtime.demo.narration import Console
from runtime.demo.results import DemoFailure, DemoResults
from runtime.demo.text import text_act
from runtime.stack import (
    KMS_PROXY_PORT,
    SERVER_PORT,
    STORE_PORT,
    TEXT_APP_DIR,
    TEXT_MODEL,
    build_server_image,
    create_model_key,
    describe_exit,
    open_stack,
    seal_bundled_model,
    seal_text_model,
    size_pool_for,
    start_replicas,
    start_server,
)

if TYPE_CHECKING:
    from models.client import ModelInfo

__all__ = ["run_demo"]


async def run_demo(
    state_dir: Path, *, keep: bool = False, out: Console | None = None, replicas: int = 1
) -> DemoResults:
    """Run every step (see :mod:`runtime.demo`) in ``state_dir``; returns the figures.

    With ``keep`` the stack stays up after the steps until this is cancelled. With
    ``replicas`` > 1 the server runs as that many replicas of the one image behind one
    ingress (least connections, health from the runtime; clients fail over).

    Raises:
        DemoFailure: a step's outcome was wrong (the message says which).
        runtime.stack.StackError, transport.errors.EnclaveError: a service failed.
    """
    from models.client import open_inference_client
    from models.text.minilm import ensure_minilm_bundle

    out = out or Console()
    sealed_path = state_dir / "models" / "digits.sealed"
    text_path = state_dir / "models" / f"{TEXT_MODEL}.sealed"
    out.step(f"state directory {state_dir}")
    size_pool_for(state_dir, replicas + 1)  # + the debug enclave of step 9
    models = {"digits": sealed_path, TEXT_MODEL: text_path}
    async with open_stack(state_dir, models=models) as stack:
        out.ok(f"local attestation root CA: {stack.ca_root_pem}")
        out.ok(f"KMS daemon (SQLite, audit log) at {stack.kms_endpoint}")
        out.ok(f"vsock-proxy (3, {KMS_PROXY_PORT}) -> KMS; model store on (3, {STORE_PORT})")

        out.step("building the inference server image (models/text_app: digits + MiniLM)")
        eif_path = state_dir / "server.eif"
        image = await trio.to_thread.run_sync(
            lambda: build_server_image(eif_path, app_dir=TEXT_APP_DIR)
        )
        pcr0 = image.pcrs[0].hex()
        out.ok(f"{eif_path.name}: {image.size} bytes")
        for i in (0, 1, 2):
            out.info(f"PCR{i} {image.pcrs[i].hex()}")

        out.step("creating the model key: Decrypt only for an enclave with that PCR0")
        key_arn = await create_model_key(stack, pcr0)
        out.ok(f"{key_arn} (alias/confidential-models)")
        out.info(f"condition kms:RecipientAttestation:ImageSha384 = {pcr0[:32]}...")

        out.step("sealing the bundled digits model (envelope encryption, owner credentials)")
        sealed = await seal_bundled_model(stack, key_arn, sealed_path)
        digest = sealed.header.model_sha384.hex()
        out.ok(
            f"{sealed_path.name}: {sealed_path.stat().st_size} bytes, "
            f"{sealed.header.chunk_count} chunk(s), model SHA-384 {digest[:32]}..."
        )
        out.step("sealing the MiniLM bundle: graph + tokenizer.json + config as one unit")
        text_sealed = await seal_text_model(stack, key_arn, text_path)
        text_digest = text_sealed.header.model_sha384.hex()
        out.ok(
            f"{text_path.name}: {text_path.stat().st_size:,} bytes, "
            f"{text_sealed.header.chunk_count} chunks, bundle SHA-384 {text_digest[:32]}..."
        )
        digests = (digest, text_digest)

        out.step("running the server enclave (not debug): attested key release, unseal")
        t0 = time.monotonic()
        server = await start_server(stack, eif_path)
        if not server.report.ok:
            detail = await describe_exit(server)
            raise DemoFailure(f"the server could not load its model: {server.report.raw}; {detail}")
        out.ok(
            f"enclave {server.enclave_id} CID {server.cid}: model 'digits' unsealed, model "
            f"'{TEXT_MODEL}' unsealed inside, PCR16 extended, listening on vsock {SERVER_PORT} "
            f"(start {time.monotonic() - t0:.1f} s)"
        )
        missing = server.info.isolation.missing
        if missing:
            out.info(f"sandbox layers missing on this host: {', '.join(missing)}")

        if replicas > 1:
            out.step(f"running {replicas - 1} more replica(s) of the same image")
            more = await start_replicas(stack, eif_path, replicas - 1)
            for replica in [server, *more]:
                out.info(
                    f"replica {replica.info.enclave_name}: enclave {replica.enclave_id} "
                    f"CID {replica.cid}"
                )
            ingress_port = await stack.start_group_ingress(server.info.enclave_name)
            endpoint = f"127.0.0.1:{ingress_port}"
            out.step(
                f"client -> ingress {endpoint} -> the least busy of {replicas} replicas "
                f"(group {server.info.enclave_name!r}, vsock port {SERVER_PORT})"
            )
        else:
            ingress_port = await stack.start_ingress(server.cid)
            endpoint = f"127.0.0.1:{ingress_port}"
            out.step(f"client -> ingress {endpoint} -> vsock ({server.cid}, {SERVER_PORT})")
        from models.client import make_verifier, policy_for
        from models.digits import load_test_split

        verifier = make_verifier(stack.roots(), policy_for(pcr0=pcr0, model_digests=list(digests)))
        x, y = load_test_split()
        async with open_inference_client(endpoint, verifier=verifier) as client:
            peer = client.attestation
            out.ok("attestation verified before sending any data:")
            out.info(f"module_id  {peer.module_id}")
            out.info(f"root       {stack.ca_root_pem} (local CA, chain + ES384 signature)")
            out.info(f"PCR0       {peer.pcrs[0].hex()}  (= the image built above)")
            out.info(f"PCR16      {peer.pcrs[16].hex()}  (= extend(extend(0, digits), MiniLM))")
            out.info(f"channel    {getattr(client._channel, 'suite', '?')}")
            catalog = await client.list_models()
            out.info("catalog    " + ", ".join(_describe(m) for m in catalog))
            out.step(f"streaming the test split ({len(y)} samples) through the enclave")
            figures = await digits.measure(client, x, y)
        module_id, pcr16 = str(peer.module_id), peer.pcrs[16].hex()
        digits.report(out, figures)
        async with open_inference_client(endpoint, verifier=verifier) as client:
            text = await text_act(
                client,
                out,
                model=TEXT_MODEL,
                bundle=await trio.to_thread.run_sync(ensure_minilm_bundle),
                enclave_cpus=server.info.cpu_ids,
            )

        denial = await debug_enclave_refused(stack, eif_path, out)
        hyok_refusal = await hyok_owner_revokes(stack, state_dir, eif_path, pcr0, out)

        if keep:
            out.step("--keep: the stack stays up (Ctrl-C to stop everything)")
            policy: dict[str, object] = {"measurements": [{"pcrs": {"0": pcr0, "16": pcr16}}]}
            keep_instructions(out, state_dir, stack, server, endpoint, policy, catalog, x)
            await trio.sleep_forever()
        out.step("stopping the enclave, ingress, model store, vsock-proxy and KMS")
    return DemoResults(
        **asdict(figures),
        pcr0=pcr0,
        model_sha384=digest,
        module_id=module_id,
        pcr16=pcr16,
        debug_denial=denial,
        model_digests=digests,
        text_matches=text.matches,
        text_enclave_ms=text.enclave_p50_ms,
        text_inproc_ms=text.inproc_p50_ms,
        hyok_refusal=hyok_refusal,
    )


def _describe(model: ModelInfo) -> str:
    """``digits (available, float32 [None, 64])``, ``minilm (available, text -> float32 ...)``."""
    state = "available" if model.available else "unavailable"
    if model.is_text and model.outputs:
        out = model.outputs[0]
        return f"{model.name} ({state}, text -> {out.dtype} {list(out.shape)})"
    if model.inputs:
        return f"{model.name} ({state}, {model.inputs[0].dtype} {list(model.inputs[0].shape)})"
    return f"{model.name} ({state})"
