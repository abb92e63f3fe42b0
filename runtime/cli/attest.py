"""``enclave attest verify|root``: verify attestation documents, print the local CA root.

``enclave attest verify DOC`` reads DOC (a file with raw CBOR or base64, detected, or ``-`` for
stdin), verifies it (parse → chain → signature → policy) and prints a JSON report on stdout.
Exit status: 0 when every check holds; otherwise the failed step's code below, with the step
and reason on stderr and in the report.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import json
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from transport.errors import ConfigurationError

if TYPE_CHECKING:
    from runtime.cli import SubParsers

__all__ = ["register", "run_root", "run_verify", "build_report", "EXIT_CODES"]

#: Exit status per failed step (0 = verified; 2 stays argparse's usage error).
EXIT_CODES: Final = {"parse": 3, "chain": 4, "signature": 5, "policy": 6}
#: Largest DOC file read (bytes): base64 of the largest acceptable document with slack.
_MAX_INPUT: Final = 64 * 1024


def register(subparsers: SubParsers) -> None:
    p = subparsers.add_parser(
        "attest", help="verify attestation documents; print the local root", allow_abbrev=False
    )
    sub = p.add_subparsers(dest="attest_command", metavar="ACTION")
    sub.required = True

    v = sub.add_parser(
        "verify", help="verify an attestation document and print a JSON report", allow_abbrev=False
    )
    v.add_argument("document", metavar="DOC", help="document file (CBOR or base64), or - for stdin")
    v.add_argument(
        "--root",
        action="append",
        default=None,
        metavar="aws|local|PEM_PATH",
        help="trust root (repeatable); default: aws, plus local when the state dir has a CA",
    )
    v.add_argument("--at", metavar="ISO8601", help="verification time (default: now)")
    v.add_argument(
        "--expect-pcr",
        action="append",
        default=[],
        metavar="N=HEX",
        help="required PCR value (repeatable; all must match); replaces the policy file's sets",
    )
    v.add_argument("--policy", type=Path, metavar="FILE", help="policy file (JSON or TOML)")
    v.add_argument("--allow-debug", action="store_true", help="accept debug-mode documents")
    v.add_argument("--max-age", type=float, metavar="SECONDS", help="maximum document age")
    v.add_argument("--nonce", metavar="HEX", help="expected nonce")
    v.add_argument("--state-dir", type=Path, help="state directory for --root local")
    v.set_defaults(func=run_verify)

    r = sub.add_parser(
        "root", help="print the local CA root certificate (PEM), creating it", allow_abbrev=False
    )
    r.add_argument("--state-dir", type=Path, help="state directory (default: ENCLAVE_STATE_DIR)")
    r.set_defaults(func=run_root)


def _state_dir(args: argparse.Namespace) -> Path:
    from transport.paths import default_state_dir

    return Path(args.state_dir) if args.state_dir else default_state_dir()


def run_root(args: argparse.Namespace) -> int:
    """Print the state directory's CA root (created on first use, in a 0700 directory)."""
    from attest.ca import LocalCA, prepare_state_dir
    from attest.errors import CAError

    state = prepare_state_dir(_state_dir(args))
    try:
        ca = LocalCA.load_or_create(state / "ca")
    except OSError as exc:
        raise CAError(f"cannot use the CA in {state / 'ca'}: {exc.strerror or exc}") from exc
    sys.stdout.write(ca.root_pem.decode("ascii"))
    return 0


def _read_document(spec: str) -> bytes:
    if spec == "-":
        data = sys.stdin.buffer.read(_MAX_INPUT + 1)
    else:
        try:
            with open(spec, "rb") as f:
                data = f.read(_MAX_INPUT + 1)
        except OSError as exc:
            raise ConfigurationError(f"cannot read {spec}: {exc}") from exc
    if len(data) > _MAX_INPUT:
        raise ConfigurationError(f"{spec} is larger than {_MAX_INPUT} bytes")
    return _decode_input(data)


def _decode_input(data: bytes) -> bytes:
    """Raw CBOR starts with an array (0x84) or tag 18 (0xd2); anything else is tried as base64."""
    stripped = data.strip()
    if stripped[:1] in (b"\x84", b"\xd2"):
        return data
    try:
        text = b"".join(stripped.split())
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        return data  # not base64 either: let the parser report what is wrong


def _parse_time(text: str) -> datetime:
    try:
        at = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError as exc:
        raise ConfigurationError(f"--at: not an ISO 8601 time: {text!r}") from exc
    return at if at.tzinfo else at.replace(tzinfo=UTC)


def _build_policy(args: argparse.Namespace) -> tuple[Any, str | None]:
    import dataclasses

    from attest.policy import MeasurementSet, Policy

    policy = Policy.from_file(args.policy) if args.policy else None
    note = None
    if args.expect_pcr:
        pcrs: dict[int, str] = {}
        for item in args.expect_pcr:
            index, sep, value = item.partition("=")
            if not sep:
                raise ConfigurationError(f"--expect-pcr {item!r}: expected N=HEX")
            try:
                pcrs[int(index.upper().removeprefix("PCR"))] = value
            except ValueError as exc:
                raise ConfigurationError(f"--expect-pcr {item!r}: bad index") from exc
        mset = MeasurementSet.from_mapping({"pcrs": pcrs})
        policy = dataclasses.replace(
            policy or Policy(), measurements=(mset,), any_measurement=False
        )
    if policy is None:
        policy = Policy(any_measurement=True)
        note = "no --expect-pcr or --policy given: PCR values were not checked"
    changes: dict[str, Any] = {}
    if args.allow_debug:
        changes["allow_debug"] = True
    if args.max_age is not None:
        changes["max_age_s"] = args.max_age
    if args.nonce is not None:
        try:
            changes["nonce"] = bytes.fromhex(args.nonce)
        except ValueError as exc:
            raise ConfigurationError("--nonce: not valid hex") from exc
    return (dataclasses.replace(policy, **changes) if changes else policy), note


def _roots(args: argparse.Namespace) -> list[x509.Certificate]:
    from attest.ca import ROOT_CERT_FILE
    from attest.roots import load_roots

    state_dir = _state_dir(args)
    specs = args.root
    if not specs:
        specs = ["aws"]
        if (state_dir / "ca" / ROOT_CERT_FILE).is_file():
            specs.append("local")
    return load_roots(specs, state_dir=state_dir)


def _hex(value: bytes | None) -> str | None:
    return None if value is None else value.hex()


def _iso(dt: datetime) -> str:
    return dt.astimezone(UTC).isoformat().replace("+00:00", "Z")


def _cert_json(cert: x509.Certificate) -> dict[str, Any]:
    import hashlib

    return {
        "subject": cert.subject.rfc4514_string(),
        "issuer": cert.issuer.rfc4514_string(),
        "not_before": _iso(cert.not_valid_before_utc),
        "not_after": _iso(cert.not_valid_after_utc),
        "sha256": hashlib.sha256(cert.public_bytes(Encoding.DER)).hexdigest(),
    }


def build_report(report: Any, note: str | None) -> dict[str, Any]:
    """The JSON shape printed by ``enclave attest verify``."""
    doc = report.document
    out: dict[str, Any] = {
        "ok": report.ok,
        "failed_step": report.failed_step,
        "reason": report.reason,
        "verified_at": _iso(report.verified_at),
        "module_id": doc.module_id if doc else None,
        "timestamp": doc.timestamp if doc else None,
        "timestamp_iso": _iso(doc.issued_at) if doc else None,
        "digest": doc.digest if doc else None,
        "debug": doc.debug if doc else None,
        "pcrs": {str(i): v.hex() for i, v in doc.pcrs.items()} if doc else None,
        "certificates": None,
        "public_key": _hex(doc.public_key) if doc else None,
        "user_data": _hex(doc.user_data) if doc else None,
        "nonce": _hex(doc.nonce) if doc else None,
        "checks": [
            {"step": c.step, "name": c.name, "ok": c.ok, "detail": c.detail} for c in report.checks
        ],
    }
    if report.chain is not None:
        out["certificates"] = [_cert_json(c) for c in report.chain]
    elif doc is not None:  # chain failed: still show what the document carries, leaf first
        certs = []
        for der in (doc.certificate, *reversed(doc.cabundle)):
            try:
                certs.append(_cert_json(x509.load_der_x509_certificate(der)))
            except (ValueError, x509.InvalidVersion):  # InvalidVersion is no ValueError
                certs.append({"subject": None, "error": "not a DER certificate"})
        out["certificates"] = certs
    if note:
        out["note"] = note
    return out


def run_verify(args: argparse.Namespace) -> int:
    from attest.verify import Verifier

    document = _read_document(args.document)
    policy, note = _build_policy(args)
    verifier = Verifier(_roots(args), cache_chains=False)
    at = _parse_time(args.at) if args.at else None
    report = verifier.report(document, policy=policy, at=at)
    print(json.dumps(build_report(report, note), indent=2))
    if note:
        print(f"warning: {note}", file=sys.stderr)
    if report.ok:
        return 0
    print(f"verification failed at step {report.failed_step}: {report.reason}", file=sys.stderr)
    return EXIT_CODES.get(report.failed_step or "parse", 1)
