"""One real served stack for a whole test module: the inference server (digits and MiniLM) in a
real enclave, KMS, vsock-proxy, model store and ingress, run by a trio loop in a background
thread, so that every test of the module (each with its own trio loop) reaches it over TCP.

Starting a stack costs seconds (the MiniLM bundle is sealed, fetched over vsock, unsealed and
loaded in the enclave); one per module keeps the suite's added time small.
"""

from __future__ import annotations

import shutil
import tempfile
import threading
from pathlib import Path
from typing import Final

import trio

from runtime.stack import InferenceStack, open_inference_stack

#: Longest wait for the stack to come up (a loaded 2-core machine: seconds; the margin is load).
START_TIMEOUT_S: Final = 150.0


class ServedStack:
    """``with ServedStack(text=True) as served: served.stack.endpoint ...``."""

    def __init__(self, *, text: bool = True) -> None:
        self._text = text
        self._tmp = Path(tempfile.mkdtemp(prefix="er-served-"))
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._token: trio.lowlevel.TrioToken | None = None
        # Cancelled by __exit__: stops the stack whether it is serving or still starting.
        self._scope = trio.CancelScope()
        self._stack: InferenceStack | None = None
        self._thread = threading.Thread(target=self._main, name="served-stack", daemon=True)

    @property
    def stack(self) -> InferenceStack:
        """The running stack (between ``__enter__`` and ``__exit__``)."""
        if self._stack is None:
            raise RuntimeError("the stack is not running")
        return self._stack

    def _main(self) -> None:
        async def serve() -> None:
            self._token = trio.lowlevel.current_trio_token()
            with self._scope:
                async with open_inference_stack(self._tmp / "s", text=self._text) as stack:
                    self._stack = stack
                    self._ready.set()
                    await trio.sleep_forever()

        try:
            trio.run(serve)
        except BaseException as exc:  # reported to the test thread
            self._error = exc
        finally:
            self._ready.set()

    def __enter__(self) -> ServedStack:
        self._thread.start()
        if not self._ready.wait(START_TIMEOUT_S):
            self._stop()  # cancels the start-up
            raise TimeoutError(f"the served stack did not start within {START_TIMEOUT_S} s")
        if self._error is not None:
            self._stop()
            raise RuntimeError(f"the served stack failed to start: {self._error!r}")
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop()
        # A stack that failed while serving or stopping (an enclave or a service left behind)
        # fails the module's teardown instead of passing unnoticed.
        if self._thread.is_alive():
            raise TimeoutError("the served stack did not stop within 60 s")
        if self._error is not None:
            raise RuntimeError("the served stack failed while serving or stopping") from self._error

    def _stop(self) -> None:
        if self._token is not None:
            try:
                trio.from_thread.run_sync(self._scope.cancel, trio_token=self._token)
            except trio.RunFinishedError:
                pass
        self._thread.join(timeout=60)
        shutil.rmtree(self._tmp, ignore_errors=True)
