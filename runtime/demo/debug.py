"""Step 9 of the demo: the same server image run in debug mode. Its attestation reads PCR0 as
zeros, so the KMS must refuse it both model keys; the refusal is shown from the audit log, the
server's report and the enclave's own console."""

from __future__ import annotations

import json
from pathlib import Path

import trio

from runtime.demo.narration import Console
from runtime.demo.results import DemoFailure
from runtime.stack import (
    TEXT_MODEL,
    Stack,
    console_tail,
    format_exit_reason,
    read_audit,
    start_server,
)

__all__ = ["debug_enclave_refused"]


async def debug_enclave_refused(stack: Stack, eif_path: Path, out: Console) -> str:
    """Step 9: the same image in debug mode must be refused the model key; returns why.

    Raises:
        DemoFailure: the debug enclave was given a key, or the KMS recorded no denial.
    """
    out.step("same image in DEBUG mode: PCR0 reads as zeros, KMS must refuse the keys")
    audit_before = len(read_audit(stack.kms_state_dir))
    debug_server = await start_server(stack, eif_path, debug=True)
    model = debug_server.report.model("digits")
    if model is None or model.available:
        raise DemoFailure("the debug enclave was given the model key!")
    text_model = debug_server.report.model(TEXT_MODEL)
    if text_model is None or text_model.available:
        raise DemoFailure("the debug enclave was given the MiniLM key!")
    denials = [
        line
        for line in read_audit(stack.kms_state_dir)[audit_before:]
        if line.get("operation") == "Decrypt" and line.get("decision") != "allow"
    ]
    if not denials:
        raise DemoFailure("no KMS denial recorded for the debug enclave")
    denial = denials[-1]
    out.ok(f"KMS refused Decrypt: {denial.get('error') or denial.get('decision')}")
    out.info(f"audit log reason: {denial.get('reason')}")
    out.info(f"server reported: {model.reason}")
    for line in (await console_tail(debug_server)).splitlines():
        if "model_unavailable" in line:
            try:
                entry = json.loads(line)
                line = f"{entry['event']} model={entry['model']!r} ({entry['level']})"
            except (ValueError, KeyError, TypeError):
                line = line.strip()[:200]
            out.info(f"debug console (the enclave's own log): {line}")
    # The refused server exits once it has reported; bounded, so a stuck one cannot hold the
    # demo (the exit reason then says it is still running).
    with trio.move_on_after(10):
        await debug_server.wait_exited()
    out.info(
        f"debug enclave {debug_server.enclave_id}: {format_exit_reason(debug_server.exit_reason)}"
    )
    return str(denial.get("reason") or denial.get("error"))
