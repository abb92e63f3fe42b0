"""``enclave kms serve|audit verify|enclave-policy``: the local KMS daemon, its audit-log
checker and a key-policy generator for enclave images."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import TYPE_CHECKING

from transport.errors import EnclaveError

if TYPE_CHECKING:
    from runtime.cli import SubParsers

__all__ = ["register", "run_enclave_policy"]


def register(subparsers: SubParsers) -> None:
    from kms.cli import (
        add_audit_verify_arguments,
        add_serve_arguments,
        one_line_errors,
        run_audit_verify,
        run_serve,
    )
    from runtime.cli import xks_proxy

    # Usage errors are one `error:` line (issue 10); no abbreviated flags (a script's --debug
    # must never silently mean something else).
    p = one_line_errors(
        subparsers.add_parser(
            "kms", help="local AWS KMS daemon with attested key release", allow_abbrev=False
        )
    )
    sub = p.add_subparsers(dest="kms_command", metavar="KMS_COMMAND")
    sub.required = True
    serve = one_line_errors(
        sub.add_parser(
            "serve", help="run the KMS daemon (AWS KMS JSON API, SigV4)", allow_abbrev=False
        )
    )
    add_serve_arguments(serve)
    serve.set_defaults(func=run_serve)
    audit = one_line_errors(sub.add_parser("audit", help="audit log tools", allow_abbrev=False))
    audit_sub = audit.add_subparsers(dest="audit_command", metavar="AUDIT_COMMAND")
    audit_sub.required = True
    verify = one_line_errors(
        audit_sub.add_parser(
            "verify",
            help="check the audit log's MAC chain (needs the daemon's master key)",
            allow_abbrev=False,
        )
    )
    add_audit_verify_arguments(verify)
    verify.set_defaults(func=run_audit_verify)
    policy = one_line_errors(
        sub.add_parser(
            "enclave-policy",
            help="print a key policy releasing keys only to an enclave image (by its PCRs)",
            allow_abbrev=False,
        )
    )
    policy.add_argument("--eif-path", type=Path, help="take PCR0/1/2(/8) from this EIF")
    policy.add_argument(
        "--pcr",
        action="append",
        default=[],
        metavar="N=HEX",
        help="a PCR value to require (repeatable; overrides the EIF's)",
    )
    policy.add_argument(
        "--admin",
        required=True,
        metavar="ARN",
        help="the key's administrator (kms:* unless --admin-action); must not be the enclave's "
        "principal or its account",
    )
    policy.add_argument(
        "--enclave", required=True, metavar="ARN", help="principal the enclave signs as"
    )
    policy.add_argument(
        "--admin-action",
        action="append",
        metavar="ACTION",
        help="actions the administrator may perform (repeatable; default kms:*)",
    )
    policy.add_argument(
        "--action",
        action="append",
        metavar="ACTION",
        help="actions released to the enclave (default kms:Decrypt, kms:GenerateDataKey)",
    )
    policy.set_defaults(func=run_enclave_policy)
    xks_proxy.add_subcommand(sub)


def run_enclave_policy(args: argparse.Namespace) -> int:
    """Print the policy JSON on stdout (nitro-cli style: JSON out, errors on stderr)."""
    from kms.policy import KeyPolicy, enclave_key_policy
    from transport.errors import ConfigurationError

    pcrs: dict[int, str] = {}
    if args.eif_path is not None:
        from runtime.eif import read_eif

        pcrs.update({i: v.hex() for i, v in read_eif(args.eif_path).pcrs.items()})
    for item in args.pcr:
        index, sep, value = item.partition("=")
        if not sep or not index.removeprefix("PCR").isdigit():
            raise ConfigurationError(f"--pcr wants N=HEX, got {item!r}")
        pcrs[int(index.removeprefix("PCR"))] = value
    actions = args.action or ["kms:Decrypt", "kms:GenerateDataKey"]
    try:
        policy = enclave_key_policy(
            admin_principal=args.admin,
            enclave_principal=args.enclave,
            pcrs=pcrs,
            actions=actions,
            admin_actions=args.admin_action or ["kms:*"],
        )
        text = json.dumps(policy, indent=2)
        KeyPolicy.parse(text)  # the daemon must accept what we print
    except (ValueError, EnclaveError) as exc:
        raise ConfigurationError(str(exc)) from None
    print(text)
    return 0
