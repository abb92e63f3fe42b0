"""Builders for the XKS proxy tests: key files, configuration files, a proxy in the test's trio
loop, requests signed by botocore's own SigV4 signer (never ours) and sent by botocore's own
HTTP session, and a throw-away TLS PKI."""

from __future__ import annotations

import datetime as dt
import json
import os
import queue
import signal
import subprocess
import sys
import threading
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import trio
from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials
from botocore.httpsession import URLLib3Session
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from kms.xks import RunningProxy, XksCredential, XksProxyConfig, serve_xks_proxy
from kms.xks.codec import RequestMetadata

#: Credentials in the spec's formats (20-30 of A-Z2-7; 43-64 of Base64 characters).
CRED = XksCredential("AKIAXKSTESTACCESS2345", "c2VjcmV0c2VjcmV0c2VjcmV0c2VjcmV0c2VjcmV0MTI=")
CRED2 = XksCredential("AKIAXKSROTATEDKEY6777", "bmV3c2VjcmV0bmV3c2VjcmV0bmV3c2VjcmV0bmV3czI=")
URI_PATH = "/owner-a/kms/xks/v1"
REGION = "us-east-1"
PRINCIPAL = "arn:aws:iam::111122223333:user/alice"
KEY_ARN = "arn:aws:kms:us-east-1:111122223333:key/1234abcd-12ab-34cd-56ef-1234567890ab"
#: Hard bound on each test's I/O (loopback only).
IO_TIMEOUT_S = 30.0


def metadata(operation: str = "Encrypt", request_id: str = "req-1") -> dict[str, str]:
    """A requestMetadata object as KMS sends it for key operations."""
    return {
        "awsPrincipalArn": PRINCIPAL,
        "kmsKeyArn": KEY_ARN,
        "kmsOperation": operation,
        "kmsRequestId": request_id,
    }


def request_metadata(operation: str = "Encrypt") -> RequestMetadata:
    """The same, for our client."""
    return RequestMetadata("req-client", operation, PRINCIPAL, KEY_ARN)


def health_metadata() -> dict[str, str]:
    return {"kmsOperation": "KmsHealthCheck", "kmsRequestId": "req-health"}


def key_file(directory: Path, name: str, *, mode: int = 0o600, key: bytes | None = None) -> Path:
    """A key file of 32 random (or given) bytes at ``mode``."""
    path = directory / name
    path.write_bytes(key if key is not None else os.urandom(32))
    path.chmod(mode)
    return path


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str | Path):
        return json.dumps(str(value))
    if isinstance(value, Mapping):
        return "{ " + ", ".join(f"{k} = {_toml_value(v)}" for k, v in value.items()) + " }"
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(value)


def write_config(
    path: Path,
    keys: list[Mapping[str, Any]],
    *,
    credentials: tuple[XksCredential, ...] = (CRED,),
    tls: Mapping[str, Any] | None = None,
    **top: Any,
) -> Path:
    """Write a proxy configuration file (mode 0600: it holds the SigV4 secret inline)."""
    lines = [
        'listen = "127.0.0.1:0"',
        f"uri_path = {_toml_value(top.pop('uri_path', URI_PATH))}",
        f"region = {_toml_value(top.pop('region', REGION))}",
    ]
    lines += [f"{k} = {_toml_value(v)}" for k, v in top.items()]
    for c in credentials:
        lines += [
            "[[credentials]]",
            f'access_key_id = "{c.access_key_id}"',
            f'secret_access_key = "{c.secret_access_key}"',
        ]
    for k in keys:
        lines.append("[[keys]]")
        lines += [f"{name} = {_toml_value(v)}" for name, v in k.items()]
    if tls is not None:
        lines.append("[tls]")
        lines += [f"{name} = {_toml_value(v)}" for name, v in tls.items()]
    path.write_text("\n".join(lines) + "\n")
    path.chmod(0o600)
    return path


@asynccontextmanager
async def running_proxy(
    config: XksProxyConfig | Path, **kwargs: Any
) -> AsyncIterator[RunningProxy]:
    """A proxy serving in the current trio run; stopped gracefully on exit."""
    if isinstance(config, Path):
        config = XksProxyConfig.from_toml(config)
    shutdown = trio.Event()
    async with trio.open_nursery() as nursery:
        proxy: RunningProxy = await nursery.start(
            partial(serve_xks_proxy, config, shutdown=shutdown, **kwargs)
        )
        try:
            yield proxy
        finally:
            shutdown.set()


@dataclass
class Reply:
    status: int
    body: dict[str, Any]
    raw: bytes
    headers: dict[str, str]

    @property
    def error(self) -> str | None:
        return self.body.get("errorName")


def signed_request(
    url: str,
    body: bytes,
    *,
    credential: XksCredential = CRED,
    region: str = REGION,
    service: str = "kms-xks-proxy",
    method: str = "POST",
) -> AWSRequest:
    """A request signed by botocore's SigV4Auth (the independent signer)."""
    req = AWSRequest(method, url, data=body, headers={"Content-Type": "application/json"})
    creds = Credentials(credential.access_key_id, credential.secret_access_key)
    SigV4Auth(creds, service, region).add_auth(req)
    return req


def send(request: AWSRequest, *, verify: Any = True, client_cert: Any = None) -> Reply:
    """Send with botocore's own HTTP session (blocking; run it in a thread)."""
    session = URLLib3Session(verify=verify, client_cert=client_cert, timeout=IO_TIMEOUT_S)
    try:
        resp = session.send(request.prepare())
        raw = resp.content
    finally:
        session.close()
    try:
        body = json.loads(raw) if raw else {}
    except ValueError:
        body = {}
    return Reply(resp.status_code, body, raw, {k.lower(): v for k, v in resp.headers.items()})


async def call(
    proxy: RunningProxy | str,
    path: str,
    body: Mapping[str, Any] | bytes,
    **kwargs: Any,
) -> Reply:
    """POST ``body`` to ``path`` (under the endpoint), botocore-signed, from a worker thread."""
    endpoint = proxy if isinstance(proxy, str) else proxy.endpoint
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    send_kwargs = {k: kwargs.pop(k) for k in ("verify", "client_cert") if k in kwargs}
    request = signed_request(endpoint + path, raw, **kwargs)
    return await trio.to_thread.run_sync(partial(send, request, **send_kwargs))


# -- a throw-away PKI --------------------------------------------------------------------------


@dataclass
class Issued:
    cert: Path
    key: Path


class TestPki:
    """A CA that issues server and client certificates (ECDSA P-256) into a directory."""

    __test__ = False  # not a test class

    def __init__(self, directory: Path, name: str = "Test CA") -> None:
        self.dir = directory
        self._key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        now = dt.datetime.now(dt.UTC)
        self._cert = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(subject)
            .public_key(self._key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .sign(self._key, hashes.SHA256())
        )
        self.ca_path = directory / f"{name.replace(' ', '-')}.pem"
        self.ca_path.write_bytes(self._cert.public_bytes(serialization.Encoding.PEM))

    def issue(self, stem: str, common_name: str, *, server: bool) -> Issued:
        key = ec.generate_private_key(ec.SECP256R1())
        now = dt.datetime.now(dt.UTC)
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
            .issuer_name(self._cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.ExtendedKeyUsage(
                    [
                        x509.ExtendedKeyUsageOID.SERVER_AUTH
                        if server
                        else x509.ExtendedKeyUsageOID.CLIENT_AUTH
                    ]
                ),
                critical=False,
            )
        )
        if server:
            import ipaddress

            builder = builder.add_extension(
                x509.SubjectAlternativeName(
                    [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
                ),
                critical=False,
            )
        cert = builder.sign(self._key, hashes.SHA256())
        cert_path = self.dir / f"{stem}.pem"
        key_path = self.dir / f"{stem}.key"
        cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        key_path.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
        key_path.chmod(0o600)
        return Issued(cert_path, key_path)


#: Bound on waiting for the process to say something (start-up is ~1 s; the machine is shared).
WAIT_S = 30.0


class ProxyProcess:
    """The CLI in a child process; stderr lines collected by a thread."""

    def __init__(self, config: Path, uri_path: str = URI_PATH) -> None:
        self.uri_path = uri_path
        env = {k: v for k, v in os.environ.items() if k != "ENCLAVE_LOG_LEVEL"}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "runtime.cli", "kms", "xks-proxy", "--config", str(config),
             "--listen", "127.0.0.1:0"],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            text=True, env=env,
        )  # fmt: skip
        self.lines: queue.Queue[str] = queue.Queue()
        self.seen: list[str] = []
        assert self.proc.stderr is not None
        stderr = self.proc.stderr
        threading.Thread(target=lambda: [self.lines.put(x) for x in stderr], daemon=True).start()
        line = self.wait_for("xks-proxy listening on ")
        self.url = line.split("listening on ", 1)[1].strip()
        self.endpoint = self.url.removesuffix(self.uri_path)

    def wait_for(self, text: str) -> str:
        while True:
            try:
                line = self.lines.get(timeout=WAIT_S)
            except queue.Empty:
                raise AssertionError(f"{text!r} not seen in {WAIT_S} s: {self.seen}") from None
            self.seen.append(line)
            if text in line:
                return line

    def post(self, path: str, body: dict[str, object]) -> tuple[int, dict[str, object]]:
        reply = send(signed_request(self.endpoint + path, json.dumps(body).encode()))
        return reply.status, reply.body

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=WAIT_S)

    def reload(self) -> None:
        """SIGHUP: the proxy rereads its configuration (the owner's disable/enable)."""
        self.proc.send_signal(signal.SIGHUP)
        self.wait_for("xks_reloaded")

    def output(self) -> list[str]:
        """Every stderr line so far (waits for nothing)."""
        while True:
            try:
                self.seen.append(self.lines.get_nowait())
            except queue.Empty:
                return list(self.seen)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=WAIT_S)
