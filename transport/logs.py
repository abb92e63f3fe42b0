"""structlog configuration: done once per process, at its entry point.

Every process kind (the ``enclave`` CLI, the KMS daemon, a per-enclave supervisor, the code
inside an enclave) calls :func:`configure_logging` once, before ``trio.run``. Library modules
only do ``log = structlog.get_logger()`` and never configure anything.

Logs go to **stderr**: stdout belongs to nitro-cli-compatible JSON output. On a terminal they
are rendered for people; otherwise one JSON object per line.

Secrets never reach a log line. :func:`redact_secrets` runs before rendering and

* replaces the value of any key that names secret material (``plaintext``, ``data_key``,
  ``private_key``, ``secret_access_key``, ``channel_secret``...), whatever its type;
* replaces every ``bytes``/``bytearray``/``memoryview`` value, under any key, with its length
  (``<32 bytes>``): binary values in this code base are keys, ciphertexts, nonces or tensors,
  none of which belongs in a log. Log hex digests explicitly where an identifier is wanted.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Mapping, MutableMapping
from typing import Any, TextIO

import structlog
from structlog.tracebacks import ExceptionDictTransformer
from structlog.typing import EventDict, Processor, WrappedLogger

__all__ = ["configure_logging", "redact_secrets", "REDACTED", "is_secret_key"]

REDACTED = "<redacted>"

# Exact key names whose values are secret, whatever their type.
_SECRET_KEYS = frozenset(
    {
        "key",
        "data_key",
        "plaintext",
        "password",
        "secret",
        "session_key",
        "private_key",
        "secret_access_key",
        "aws_secret_access_key",
        "session_token",
        "channel_secret",
        "master_key",
        "authorization",
        "shared_secret",
        "cek",
    }
)
# Key name endings that mark secrets (``recipient_private_key``, ``enc_secret``...).
_SECRET_SUFFIXES = ("_secret", "_private_key", "_plaintext", "_password", "_token", "_master_key")


def is_secret_key(name: str) -> bool:
    """True if a log field called ``name`` must never show its value."""
    lowered = name.lower()
    return lowered in _SECRET_KEYS or lowered.endswith(_SECRET_SUFFIXES)


def _redact_value(value: Any) -> Any:
    if isinstance(value, bytes | bytearray | memoryview):
        return f"<{len(value)} bytes>"
    if isinstance(value, Mapping):
        return {
            k: (REDACTED if is_secret_key(str(k)) else _redact_value(v)) for k, v in value.items()
        }
    if isinstance(value, list | tuple):
        return [_redact_value(v) for v in value]
    return value


def redact_secrets(_logger: WrappedLogger, _name: str, event_dict: EventDict) -> EventDict:
    """structlog processor: hide secret-named fields and every binary value (see module doc)."""
    for k in list(event_dict.keys()):
        if k == "event":
            continue
        if is_secret_key(k):
            event_dict[k] = REDACTED
        else:
            event_dict[k] = _redact_value(event_dict[k])
    return event_dict


class _CurrentStderr:
    """A file-like object that writes to whatever ``sys.stderr`` is *now*.

    structlog's WriteLogger keeps the file it was given. Binding ``sys.stderr`` itself at
    configure time breaks when the stream is later swapped (pytest's capsys closes its capture
    file after each test), so the default stream resolves ``sys.stderr`` on every write.
    """

    def write(self, text: str) -> int:
        return sys.stderr.write(text)

    def flush(self) -> None:
        sys.stderr.flush()

    def isatty(self) -> bool:
        return sys.stderr.isatty()


def _processors(json: bool) -> list[Processor]:
    shared: list[Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        redact_secrets,
    ]
    if json:
        # Never render local variables of a traceback: they hold keys and plaintexts and would
        # bypass redact_secrets (structlog's dict_tracebacks shows locals by default).
        tracebacks = structlog.processors.ExceptionRenderer(
            ExceptionDictTransformer(show_locals=False)
        )
        return [*shared, tracebacks, structlog.processors.JSONRenderer()]
    # plain_traceback (the explicit default) prints frames and source lines, never locals.
    return [
        *shared,
        structlog.dev.ConsoleRenderer(
            colors=False, exception_formatter=structlog.dev.plain_traceback
        ),
    ]


def configure_logging(
    level: str | int | None = None,
    *,
    json: bool | None = None,
    stream: TextIO | None = None,
    cache: bool | None = None,
) -> None:
    """Configure structlog for this process. Call once, at the process entry point.

    Args:
        level: a level name (``"debug"``, ``"info"``...) or number; default from the
            ``ENCLAVE_LOG_LEVEL`` environment variable, else ``"info"``.
        json: force JSON lines (True) or console rendering (False); default JSON unless
            ``stream`` is a terminal.
        stream: where log lines go; default ``sys.stderr``.
        cache: cache loggers on first use (production default). ``ENCLAVE_LOG_CACHE=0`` in the
            environment turns it off: the test suite sets it so that
            ``structlog.testing.capture_logs`` still sees loggers first used after a CLI run.
    """
    out: TextIO | _CurrentStderr = stream if stream is not None else _CurrentStderr()
    if level is None:
        level = os.environ.get("ENCLAVE_LOG_LEVEL", "info")
    numeric = logging.getLevelNamesMapping()[level.upper()] if isinstance(level, str) else level
    if json is None:
        json = not out.isatty()
    if cache is None:
        cache = os.environ.get("ENCLAVE_LOG_CACHE", "1") != "0"
    structlog.configure(
        processors=_processors(json),
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        # WriteLogger writes "line\n" in ONE write (PrintLogger's print() makes two, and with
        # PYTHONUNBUFFERED each is a syscall: lines of processes sharing stderr interleaved).
        logger_factory=structlog.WriteLoggerFactory(file=out),  # type: ignore[arg-type]
        cache_logger_on_first_use=cache,
    )


def bound_fields(fields: MutableMapping[str, Any]) -> dict[str, Any]:
    """Return ``fields`` with secrets redacted, for code that builds records outside structlog
    (audit lines, describe output) and wants the same guarantees."""
    return dict(redact_secrets(None, "", dict(fields)))
