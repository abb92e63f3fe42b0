"""MiniLM served from a real enclave: the sealed bundle fetched over vsock, its key released by
the KMS against the enclave's attestation, unsealed, tokenized and run inside; the client
attested (PCR0, PCR16 binding both served models) over TCP ingress -> vsock -> channel -> RPC.

The in-memory tests (test_text_service.py) cover the service's logic; these check that the same
answers come out of the real path: the numbers equal the in-process embedder's, each limit is
refused by the enclave with its own error while a stream goes on, truncation is reported, and
the enclave's peak memory while unsealing the 86 MB bundle is accounted for.

One stack for the module (:class:`tests.models.served.ServedStack`): starting it costs seconds,
the calls then take a few more.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import trio

from models.client import BlockingInferenceClient, open_inference_client
from models.text.errors import (
    EmptyInputError,
    EmptyTextError,
    InvalidUtf8Error,
    RequestTooLargeError,
    TextInputError,
    TextTooLargeError,
    TooManyTextsError,
)
from runtime.bench.minilm import RSS_RATIO_BUDGET, peak_rss_mb, vm_hwm_mb
from runtime.stack import TEXT_MODEL, InferenceStack
from tests.models.minilm_support import minilm_bundle_path, minilm_embedder
from tests.models.served import START_TIMEOUT_S, ServedStack

# The stack's start-up runs in the first test's setup: its timeout covers it.
pytestmark = [pytest.mark.slow, pytest.mark.timeout(START_TIMEOUT_S + 60)]

#: Every call of the module is well within this on a loaded 2-core machine.
CALL_TIMEOUT_S = 60.0

TEXTS = [
    "The patient reports chest pain after climbing stairs.",
    "Invoice 4471 is overdue by thirty days.",
    "The tenant may terminate the lease with two months' notice.",
    "ok",
    "Ünïcödé, emoji 🙂 and CJK 漢字 are tokenized inside the enclave.",
]
#: Far over the 256-token cap: truncated, and the answer says so.
LONG = " ".join(["The loan agreement was signed in the presence of a notary."] * 40)

DOCUMENTS = [
    "Patient 0192 was prescribed 20 mg of atorvastatin for high cholesterol.",
    "The merger agreement requires approval by both boards before March.",
    "Wire transfer of 48,000 EUR to account DE44 flagged for manual review.",
    "The employee's performance review notes repeated missed deadlines.",
    "Biopsy results show a benign lesion; follow-up scan in six months.",
    "The supplier contract renews automatically unless cancelled in writing.",
]
#: Paraphrases of DOCUMENTS[2] and DOCUMENTS[0] that share almost none of their words.
QUERIES = {
    "a large money transfer abroad was held for a compliance check": 2,
    "a cholesterol medication was given to a patient": 0,
}


@dataclass(frozen=True)
class Served:
    stack: InferenceStack
    #: The server enclave's peak RSS (MB) right after it became ready: fetching, unsealing,
    #: loading both models; no request served yet.
    startup_peak_mb: float


@pytest.fixture(scope="module")
def served() -> Iterator[Served]:
    with ServedStack(text=True) as s:
        pid = s.stack.server.info.app_pid
        assert pid is not None
        yield Served(s.stack, vm_hwm_mb(pid))


async def test_the_enclave_embeds_as_the_in_process_embedder_does(served: Served) -> None:
    texts = [*TEXTS, LONG]
    with trio.fail_after(CALL_TIMEOUT_S):
        async with open_inference_client(
            served.stack.endpoint, verifier=served.stack.verifier()
        ) as client:
            catalog = {m.name: m for m in await client.list_models()}
            got = await client.embed(TEXT_MODEL, texts)
            streamed = [e async for e in client.embed_stream(TEXT_MODEL, [texts[:2], texts[2:]])]
    assert catalog[TEXT_MODEL].is_text
    want = minilm_embedder().embed(texts)
    assert got.vectors.shape == (len(texts), 384)
    assert got.vectors.dtype == np.float32
    np.testing.assert_allclose(got.vectors, want.vectors, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(got.vectors, axis=1), 1.0, atol=1e-5)
    # Truncation at the token cap is reported, per text, in the caller's order.
    assert got.truncated == (False,) * len(TEXTS) + (True,)
    assert [len(e) for e in streamed] == [2, len(texts) - 2]
    np.testing.assert_allclose(
        np.concatenate([e.vectors for e in streamed]), want.vectors, atol=1e-5
    )
    assert streamed[1].truncated[-1] is True


def test_a_paraphrase_finds_its_document_through_the_blocking_client(served: Served) -> None:
    with BlockingInferenceClient(
        served.stack.endpoint, verifier=served.stack.verifier(), timeout_s=CALL_TIMEOUT_S
    ) as client:
        docs = client.embed(TEXT_MODEL, DOCUMENTS)
        queries = client.embed(TEXT_MODEL, list(QUERIES))
    for query, want in zip(queries.vectors, QUERIES.values(), strict=True):
        scores = docs.vectors @ query
        assert int(np.argmax(scores)) == want, scores
        # A clear margin over the runner-up (0.28 and 0.5 measured), not a coin toss.
        assert scores[want] - np.sort(scores)[-2] > 0.1, scores


#: Each limit of models/text_app/server.toml, broken on its own (all checked by the enclave:
#: the client sends bytes as they are).
LIMIT_CASES: list[tuple[list[str | bytes], type[TextInputError]]] = [
    ([], EmptyInputError),
    (["a"] * 257, TooManyTextsError),  # max_texts = 256
    (["fine", "b" * 32769], TextTooLargeError),  # max_text_bytes = 32768
    (["c" * 30000] * 36, RequestTooLargeError),  # max_total_bytes = 1 MiB; under the RPC cap
    (["fine", b"secret \xff\xfe"], InvalidUtf8Error),
    (["fine", " \t\n"], EmptyTextError),
]


async def test_each_limit_is_its_own_error_while_a_stream_goes_on(served: Served) -> None:
    answered: list[int] = []
    with trio.fail_after(CALL_TIMEOUT_S):
        async with open_inference_client(
            served.stack.endpoint, verifier=served.stack.verifier()
        ) as client:
            # A stream on the same connection, paused between its batches while every limit
            # is broken beside it; it then goes on to the end.
            stream = client.embed_stream(TEXT_MODEL, [TEXTS[:2], TEXTS[2:], [LONG]], in_flight=1)
            first = await anext(stream)
            answered.append(len(first))
            for texts, error in LIMIT_CASES:
                with pytest.raises(TextInputError) as info:
                    await client.embed(TEXT_MODEL, texts)
                assert type(info.value) is error, (error, info.value)
                assert "secret" not in str(info.value)  # never echoes the text
            async for e in stream:
                answered.append(len(e))
            # The connection serves on after the refusals.
            assert len(await client.embed(TEXT_MODEL, ["still here"])) == 1
    assert answered == [2, len(TEXTS) - 2, 1]


def _enclave_cli(argv: list[str]) -> tuple[int, str, str]:
    """``enclave ARGV`` as a user runs it (its own process: its stdout is its own)."""
    done = subprocess.run(
        [sys.executable, "-m", "runtime.cli", *argv],
        capture_output=True,
        text=True,
        timeout=CALL_TIMEOUT_S,
        cwd="/",
    )
    return done.returncode, done.stdout, done.stderr


def test_infer_cli_embeds_texts_from_a_file_and_from_flags(served: Served, tmp_path: Path) -> None:
    stack = served.stack
    policy = tmp_path / "policy.json"
    policy.write_text(json.dumps({"measurements": [{"pcrs": {"0": stack.pcr0}}]}))
    base = ["infer", "--endpoint", stack.endpoint, "--root", str(stack.stack.ca_root_pem),
            "--policy", str(policy), "--model", TEXT_MODEL]  # fmt: skip
    texts = [TEXTS[0], LONG, TEXTS[4]]
    (tmp_path / "texts.txt").write_text("\n".join(texts) + "\n", encoding="utf-8")
    out = tmp_path / "embeddings.npy"
    code, stdout, stderr = _enclave_cli(
        [*base, "--input", str(tmp_path / "texts.txt"), "--json", "--output", str(out)]
    )
    assert code == 0, stderr
    want = minilm_embedder().embed(texts)
    (line,) = stdout.splitlines()  # --json: one line, every embedding in full
    result = json.loads(line)
    assert result["attestation"]["pcr16_matches_catalog"] is True
    np.testing.assert_allclose(np.array(result["embeddings"]), want.vectors, atol=1e-5)
    assert result["truncated"] == [False, True, False]
    assert "note: text 1 was longer than the model's 256 tokens" in stderr
    np.testing.assert_allclose(np.load(out), want.vectors, atol=1e-5)
    # Without --json: a summary (shape, the first dimensions of each row).
    code, stdout, stderr = _enclave_cli([*base, "--text", TEXTS[1], "--text", TEXTS[2]])
    assert code == 0, stderr
    summary = json.loads(stdout)["embeddings"]
    assert summary["shape"] == [2, 384]
    assert summary["elided_dims"] == 376
    np.testing.assert_allclose(
        np.array(summary["values"]), minilm_embedder().embed(TEXTS[1:3]).vectors[:, :8], atol=1e-5
    )


def test_unsealing_the_bundle_holds_no_extra_plaintext_copy(served: Served) -> None:
    """The memory account (README, "Where the memory goes"). The enclave receives the 86 MB
    bundle sealed, decrypts it piece by piece into one plaintext buffer and gives that up as
    onnxruntime takes the graph. A fresh process that reads the same bundle from disk and
    embeds peaks where onnxruntime creates the session; an enclave that held one more copy of
    the bundle (the sealed bytes, or a second plaintext) at that point would peak a bundle's
    size above it."""
    bundle_mb = minilm_bundle_path().stat().st_size / 2**20
    inproc_mb = peak_rss_mb(minilm_bundle_path(), threads=1, embed=False)
    extra_mb = served.startup_peak_mb - inproc_mb
    assert served.startup_peak_mb / inproc_mb <= RSS_RATIO_BUDGET, (served, inproc_mb)
    assert extra_mb < bundle_mb / 2, (served.startup_peak_mb, inproc_mb, bundle_mb)
