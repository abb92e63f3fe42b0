"""The XKS proxy process: listeners (HTTP or HTTPS, optional mutual TLS), the service, reloads
and the owner's controls.

The owner's controls, all effective for every request that starts after them:

* **disable a key**: ``enabled = false`` on the key, then ``kill -HUP <pid>`` (reload):
  GetKeyMetadata reports ``keyStatus`` DISABLED, Encrypt and Decrypt answer
  InvalidStateException;
* **disconnect the key store**: ``disconnected = true`` and a reload: every request, health
  checks included, answers InvalidStateException; or stop the process (SIGTERM/SIGINT): the
  listeners close and idle keep-alive connections are closed at once, so every later request
  fails to connect (KMS: XksProxyUriUnreachableException);
* **a reload that fails** (the file is unreadable, invalid, a key file or token refuses) leaves
  the proxy refusing every request (InvalidStateException) until a reload succeeds: the owner
  asked for a change we cannot read, and it may have been a revocation, so we fail closed. The
  log says why (``xks_reload_failed``).

A reload re-reads the configuration file and re-opens every key (key files are read again,
tokens logged in again), then swaps it in whole; the replaced tokens are closed once their
calls in flight have ended. ``listen`` and ``[tls]`` take effect at the next start only (a
warning says so when a reload changes them).

Mutual TLS (spec, "Authentication"): with ``tls.client_ca`` the proxy requires a client
certificate chained to that CA; with ``tls.client_subject`` its subject common name must be
exactly that (``cks.kms.<region>.amazonaws.com`` for AWS KMS). Python's ``ssl`` has no hook
inside the handshake for the subject, so a certificate with another subject is refused right
after the handshake, before a byte of a request is read.
"""

from __future__ import annotations

import os
import signal
import ssl
import stat
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from functools import partial

import structlog
import trio

from transport.errors import ConfigurationError

from ._http import HttpLimits, serve_http
from .config import TlsConfig, XksProxyConfig
from .keyring import Keyring
from .service import XksProxyService

__all__ = ["RunningProxy", "serve_xks_proxy", "run_xks_proxy", "server_ssl_context"]

log = structlog.get_logger()

#: TLS 1.2 suites the spec lists (ECDHE with AES-256-GCM) plus ChaCha20 and AES-128-GCM, all
#: with forward secrecy; TLS 1.3 suites are OpenSSL's defaults (the spec's two among them).
_TLS12_CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20"


def server_ssl_context(tls: TlsConfig) -> ssl.SSLContext:
    """The server's TLS context (TLS 1.2 or later; client certificates if configured).

    Raises:
        ConfigurationError: unreadable files, a private key readable by others, a bad pair.
    """
    try:
        mode = stat.S_IMODE(os.stat(tls.private_key).st_mode)
    except OSError as exc:
        raise ConfigurationError(
            f"cannot read tls.private_key {tls.private_key}: {exc.strerror}"
        ) from None
    if mode & 0o077:
        raise ConfigurationError(
            f"tls.private_key {tls.private_key} is accessible to group or others "
            f"(mode {mode:04o}); chmod 600 it"
        )
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_ciphers(_TLS12_CIPHERS)
    ctx.set_alpn_protocols(["http/1.1"])
    try:
        ctx.load_cert_chain(tls.certificate, tls.private_key)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigurationError(
            f"cannot load tls.certificate {tls.certificate} with its private key: {exc}"
        ) from None
    if tls.client_ca is not None:
        ctx.verify_mode = ssl.CERT_REQUIRED
        try:
            ctx.load_verify_locations(cafile=tls.client_ca)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigurationError(f"cannot load tls.client_ca {tls.client_ca}: {exc}") from None
    return ctx


def _subject_check(
    subject: str,
) -> Callable[[trio.SSLStream[trio.SocketStream]], str | None]:
    def check(stream: trio.SSLStream[trio.SocketStream]) -> str | None:
        cert = stream.getpeercert()
        names = [
            value
            for rdn in (cert or {}).get("subject", ())
            for key, value in rdn
            if key == "commonName"
        ]
        if names != [subject]:
            return f"client certificate subject CN {names!r} is not {subject!r}"
        return None

    return check


@dataclass
class RunningProxy:
    """A started proxy (what :func:`serve_xks_proxy` reports when ready)."""

    host: str
    port: int
    scheme: str
    service: XksProxyService
    _nursery: trio.Nursery
    #: Keyrings replaced by reloads (closed in the background, and again at exit: idempotent).
    _retired: list[Keyring] = field(default_factory=list)

    @property
    def endpoint(self) -> str:
        """``http(s)://host:port`` (the XksProxyUriEndpoint, for local use)."""
        shown = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}://{shown}:{self.port}"

    async def reload(self) -> bool:
        """Re-read the configuration file and re-open its keys (SIGHUP does this).

        Returns:
            True if the new configuration is in force; False if it could not be used, and the
            proxy now refuses every request until a reload succeeds.
        """
        running = self.service.config
        if running.source is None:
            raise ConfigurationError("this proxy was not started from a file: nothing to reload")
        try:
            new = await trio.to_thread.run_sync(XksProxyConfig.from_toml, running.source)
            keyring = await trio.to_thread.run_sync(Keyring.load, new)
        except ConfigurationError as exc:
            self.service.refuse_all(str(exc))
            log.error(
                "xks_reload_failed",
                reason=str(exc),
                effect="every request is refused (InvalidStateException) until a reload succeeds",
            )
            return False
        if (new.host, new.port, new.tls) != (running.host, running.port, running.tls):
            log.warning("xks_reload_partial", reason="listen and [tls] change at the next start")
        new = replace(new, host=running.host, port=running.port, tls=running.tls)
        old = self.service.install(new, keyring)
        self._retired.append(old)
        self._nursery.start_soon(old.aclose)
        log.info(
            "xks_reloaded",
            keys=len(new.keys),
            disabled=[k.key_id for k in new.keys if not k.enabled],
            disconnected=new.disconnected,
        )
        return True


async def serve_xks_proxy(
    config: XksProxyConfig,
    *,
    shutdown: trio.Event | None = None,
    clock: Callable[[], float] = time.time,
    task_status: trio.TaskStatus[RunningProxy] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run the proxy until cancelled, or until ``shutdown`` is set (then drain and return).

    Args:
        config: the configuration (``source`` set if it came from a file: reloads re-read it).
        shutdown: setting it stops the proxy gracefully.
        clock: wall clock for SigV4 freshness (tests).
        task_status: receives the :class:`RunningProxy` once listening.

    Raises:
        ConfigurationError: a key, the TLS files or the address cannot be used.
    """
    ssl_context = server_ssl_context(config.tls) if config.tls is not None else None
    peer_check = None
    if config.tls is not None and config.tls.client_subject is not None:
        peer_check = _subject_check(config.tls.client_subject)
    keyring = await trio.to_thread.run_sync(Keyring.load, config)
    service = XksProxyService(config, keyring, clock=clock)
    retired: list[Keyring] = []
    try:
        try:
            listeners = await trio.open_tcp_listeners(config.port, host=config.host)
        except OSError as exc:
            raise ConfigurationError(
                f"cannot listen on {config.host}:{config.port}: {exc.strerror or exc}"
            ) from None
        sockname = listeners[0].socket.getsockname()
        host, port = str(sockname[0]), int(sockname[1])
        limits = HttpLimits(
            max_body_bytes=config.max_body_bytes,
            request_timeout_s=config.request_timeout_s,
            keep_alive_timeout_s=config.keep_alive_timeout_s,
            max_connections=config.max_connections,
            max_connections_per_source=config.max_connections_per_source,
            graceful_timeout_s=config.graceful_timeout_s,
        )
        async with trio.open_nursery() as nursery:
            scheme = "https" if ssl_context else "http"
            running = RunningProxy(host, port, scheme, service, nursery, retired)

            async def ready() -> None:
                log.info(
                    "xks_listening",
                    endpoint=running.endpoint,
                    uri_path=config.uri_path,
                    keys=len(config.keys),
                    mutual_tls=bool(config.tls and config.tls.client_ca),
                )
                task_status.started(running)

            await serve_http(
                service,
                listeners,
                limits,
                ssl_context=ssl_context,
                peer_check=peer_check,
                shutdown=shutdown,
                on_ready=ready,
            )
            nursery.cancel_scope.cancel()  # a closing keyring may still be waiting
    finally:
        # Every keyring lets go of its tokens (bounded by CLOSE_TIMEOUT_S each), even the ones
        # whose background close was cut short just above.
        with trio.CancelScope(shield=True):
            for keyring in (*retired, service.keyring):
                await keyring.aclose()


def run_xks_proxy(config: XksProxyConfig) -> int:
    """Blocking entry: serve until SIGTERM/SIGINT, reload on SIGHUP; the address goes to
    stderr when ready. Returns the exit status (0 after a graceful stop)."""

    async def main() -> None:
        shutdown = trio.Event()
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
            async with trio.open_nursery() as nursery:
                running: RunningProxy = await nursery.start(
                    partial(serve_xks_proxy, config, shutdown=shutdown)
                )
                print(
                    f"xks-proxy listening on {running.endpoint}{config.uri_path}",
                    file=sys.stderr,
                    flush=True,
                )
                async for signum in signals:
                    if signum == signal.SIGHUP:
                        await running.reload()
                        continue
                    log.info("xks_stopping", signal=signal.Signals(signum).name)
                    shutdown.set()
                    break

    # Start-up failures surface inside nursery groups; the CLI reports the single underlying
    # project error as its one line (runtime.cli picks it out of the group).
    trio.run(main)
    return 0
