"""CLI commands of the OPC UA driver: ``edgetwin scan opcua``, ``edgetwin sim plc``, ``edgetwin opcua trust``.

Exit codes: 0 ok, 1 the server could not be reached or refused us, 2 usage, 78 configuration.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from pathlib import Path
from typing import Any

from drivers.opcua import plcsim
from drivers.opcua.config import DEFAULT_PKI_DIR, OpcUaConfig
from drivers.opcua.pki import Pki
from drivers.opcua.protocol import config_snippet, render_tree
from drivers.opcua.scan import model_use_snippet, scan, select
from drivers.opcua.security import ConnectOptions, Unreachable, quiet_asyncua
from gateway.errors import AuthError, ConfigError, CorruptDataError
from gateway.inference.build import default_models_dir
from gateway.inference.card import CARD_SUFFIX, load_card

EXIT_OK, EXIT_FAILURE, EXIT_USAGE, EXIT_CONFIG = 0, 1, 2, 78


def _err(text: str) -> None:
    print(text, file=sys.stderr)  # noqa: T201 - a CLI command reports on stderr


def cmd_scan(args: argparse.Namespace) -> int:
    """Browse a server and print its tree; optionally write a config snippet for chosen variables."""
    quiet_asyncua()
    policy, mode = args.security_policy, args.security_mode
    if (policy == "None") != (mode == "None"):
        _err(f"scan: --security-policy {policy} with --security-mode {mode}: None goes with None")
        return EXIT_USAGE
    password_file = args.password_file
    if (args.username is None) != (password_file is None):
        _err("scan: --username and --password-file go together")
        return EXIT_USAGE
    opts = ConnectOptions(
        "scan",
        args.endpoint,
        policy,
        mode,
        args.allow_insecure,
        args.pki_dir,
        None,
        args.username,
        password_file,
        args.timeout,
    )
    try:
        result = asyncio.run(scan(opts, max_depth=args.depth, max_nodes=args.max_nodes))
    except (AuthError, Unreachable) as exc:
        _err(f"scan {args.endpoint}: {exc}")
        return EXIT_FAILURE
    except ConfigError as exc:
        _err(str(exc))
        return EXIT_CONFIG
    chosen = select(result.variables, args.select)
    if args.json:
        payload: dict[str, Any] = {
            "endpoint": args.endpoint,
            "namespaces": list(result.namespaces),
            "truncated": result.truncated,
            "variables": [
                {
                    "browse_path": v.browse_path,
                    "node_id": v.node_id,
                    "data_type": v.data_type,
                    "numeric": v.numeric,
                    "unit": v.unit,
                    "value": v.value,
                }
                for v in chosen
            ],
        }
        print(json.dumps(payload, indent=2))  # noqa: T201
    else:
        print(f"{args.endpoint}: {len(result.nodes)} nodes, {len(result.variables)} variables")  # noqa: T201
        for i, uri in enumerate(result.namespaces):
            print(f"  ns={i}: {uri}")  # noqa: T201
        print(render_tree(result.nodes))  # noqa: T201
        if result.truncated:
            print(f"(stopped after {args.max_nodes} nodes: raise --max-nodes or lower --depth)")  # noqa: T201
    if args.write_config is not None:
        try:
            text = config_snippet(
                endpoint=args.endpoint,
                name=args.name,
                subject=args.subject,
                variables=chosen,
                security_policy=policy,
                security_mode=mode,
            )
        except ValueError as exc:
            _err(f"scan: {exc}: check --select")
            return EXIT_USAGE
        if args.model is not None:
            try:
                card = load_card(default_models_dir() / f"{args.model}{CARD_SUFFIX}")
            except (ConfigError, CorruptDataError) as exc:
                _err(f"scan --model {args.model}: {exc}")
                return EXIT_USAGE
            text += model_use_snippet(card.name, [i.metric for i in card.inputs], chosen)
        if str(args.write_config) == "-":
            print(text, end="")  # noqa: T201
        else:
            args.write_config.write_text(text, encoding="utf-8")
            _err(
                f"scan: wrote a [[sources]] table for {sum(v.numeric for v in chosen)} variable(s) to {args.write_config}"
            )
    return EXIT_OK


def cmd_trust(args: argparse.Namespace) -> int:
    """Move rejected server certificates into trusted/ (or list them)."""
    pki = Pki(args.pki_dir)
    rejected = pki.rejected()
    if args.list or (not args.certificates and not args.all):
        print(f"rejected server certificates in {pki.rejected_dir}:")  # noqa: T201
        for line in pki.describe(rejected) or ["(none)"]:
            print(f"  {line}")  # noqa: T201
        trusted = sorted(pki.trusted_dir.glob("*")) if pki.trusted_dir.is_dir() else []
        print(f"trusted in {pki.trusted_dir}:")  # noqa: T201
        for line in pki.describe(trusted) or ["(none)"]:
            print(f"  {line}")  # noqa: T201
        return EXIT_OK
    try:
        wanted = rejected if args.all else [pki.find_rejected(c) for c in args.certificates]
        for path in wanted:
            target = pki.trust(path)
            print(f"trusted {target.name} (now in {pki.trusted_dir})")  # noqa: T201
    except ConfigError as exc:
        _err(str(exc))
        return EXIT_CONFIG
    if not wanted:
        print("nothing to trust: no rejected certificates")  # noqa: T201
    return EXIT_OK


def add_commands(groups: dict[str, argparse._SubParsersAction[argparse.ArgumentParser]]) -> None:
    """Add ``scan opcua``, ``sim plc`` and ``opcua trust`` to the edgetwin CLI."""
    p = groups["scan"].add_parser("opcua", help="browse an OPC UA server: tree, data types, units")
    p.add_argument("endpoint", help="opc.tcp://host:port[/path]")
    p.add_argument(
        "--security-policy",
        default="None",
        choices=["None", *_policies()],
        help="the security policy to connect with",
    )
    p.add_argument(
        "--security-mode",
        default="None",
        choices=["None", "Sign", "SignAndEncrypt"],
        help="the message security mode (None goes with policy None)",
    )
    p.add_argument(
        "--allow-insecure", action="store_true", help="allow policy None to a server off this machine"
    )
    p.add_argument(
        "--pki-dir",
        type=Path,
        default=DEFAULT_PKI_DIR,
        help="the PKI folder: own certificate, trusted and rejected servers",
    )
    p.add_argument("--username", default=None, help="user login (with --password-file)")
    p.add_argument("--password-file", type=Path, default=None, help="a file holding the password (mode 0600)")
    p.add_argument("--depth", type=int, default=8, help="levels below Objects (default 8)")
    p.add_argument("--max-nodes", type=int, default=5000, help="stop browsing after this many nodes")
    p.add_argument("--timeout", type=float, default=5.0, help="seconds per request")
    p.add_argument(
        "--select", action="append", default=[], metavar="GLOB", help="browse paths to keep (repeatable)"
    )
    p.add_argument(
        "--write-config",
        type=Path,
        default=None,
        metavar="FILE",
        help="write a [[sources]] table ('-': stdout)",
    )
    p.add_argument("--name", default="plc", help="source name in the written config")
    p.add_argument(
        "--model", default=None, help="also write a [[models.use]] table mapping this model's inputs to nodes"
    )
    p.add_argument("--subject", default="machine-1", help="subject (machine id) in the written config")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(func=cmd_scan)

    p = groups["sim"].add_parser("plc", help="an OPC UA PLC simulator (pump/motor address space)")
    plcsim.build_parser(p)
    p.set_defaults(func=plcsim.run)

    top = groups["top"].add_parser("opcua", help="OPC UA certificates")
    sub = top.add_subparsers(dest="opcua_what", required=True)
    p = sub.add_parser("trust", help="trust a rejected server certificate (or list them)")
    p.add_argument("certificates", nargs="*", help="file, file name or thumbprint (8+ hex digits)")
    p.add_argument(
        "--pki-dir",
        type=Path,
        default=DEFAULT_PKI_DIR,
        help="the PKI folder: own certificate, trusted and rejected servers",
    )
    p.add_argument("--all", action="store_true", help="trust every rejected certificate")
    p.add_argument("--list", action="store_true", help="only list rejected and trusted certificates")
    p.set_defaults(func=cmd_trust)


def _policies() -> list[str]:
    field = OpcUaConfig.model_fields["security_policy"]
    return [p for p in getattr(field.annotation, "__args__", ()) if p != "None"]
