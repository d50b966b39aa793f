"""``edgetwin status``: the running gateway's state, as text or JSON, with an exit code for scripts."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from gateway.errors import InvalidConfigError
from gateway.observe.control import StatusUnavailableError, query
from gateway.observe.status import EXIT_UNKNOWN, HEALTH_EXIT, render_text

DEFAULT_CONFIG = Path("/etc/edgetwin/edgetwin.toml")


def _socket_for(args: argparse.Namespace) -> Path:
    if args.socket is not None:
        return Path(args.socket)
    from drivers import REGISTRY  # noqa: PLC0415 - the composition root's registry
    from gateway.config import load  # noqa: PLC0415
    from gateway.observe.config import socket_path  # noqa: PLC0415

    config = load(args.config, REGISTRY)
    return socket_path(config.core.status, config.core.gateway.state_dir, client=True)


def cmd_status(args: argparse.Namespace) -> int:
    """Print the running gateway's state; exit 0 healthy, 1 degraded, 2 down, 3 unknown."""
    try:
        snap: dict[str, Any] = query(_socket_for(args), timeout_s=args.timeout)
    except InvalidConfigError as exc:
        sys.stderr.write(f"{exc}\n")
        return EXIT_UNKNOWN
    except StatusUnavailableError as exc:
        if args.json:
            sys.stdout.write(json.dumps({"health": "unknown", "error": str(exc)}) + "\n")
        sys.stderr.write(f"{exc}\n")
        return EXIT_UNKNOWN
    sys.stdout.write((json.dumps(snap, indent=2) if args.json else render_text(snap)) + "\n")
    return HEALTH_EXIT.get(str(snap.get("health")), EXIT_UNKNOWN)


def cmd_support_bundle(args: argparse.Namespace) -> int:
    """Write a support bundle with no secret and no identity in it."""
    from drivers import REGISTRY  # noqa: PLC0415
    from gateway.observe.bundle import write_bundle  # noqa: PLC0415

    output = args.output or Path(f"edgetwin-support-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}.tar.gz")
    path = write_bundle(
        args.config, REGISTRY, output, journal_lines=args.journal_lines, online=not args.offline
    )
    sys.stdout.write(
        f"support bundle written to {path} (mode 0600): identities are pseudonyms, secrets are left out; "
        "look inside with 'tar -tzf' before sending it\n"
    )
    return 0


def add_commands(groups: dict[str, Any]) -> None:
    """Add ``status`` and ``support-bundle``."""
    p = groups["top"].add_parser(
        "status",
        help="show the running gateway's state (exit 0 healthy, 1 degraded, 2 down, 3 unreachable)",
        description="Asks the running gateway over its control socket (root and the edgetwin group only).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument(
        "--config", type=Path, default=DEFAULT_CONFIG, help="the gateway's config (to find its socket)"
    )
    p.add_argument("--socket", type=Path, default=None, help="the control socket, instead of the config's")
    p.add_argument("--json", action="store_true", help="print the whole snapshot as JSON")
    p.add_argument("--timeout", type=float, default=5.0, help="seconds to wait for the answer")
    p.set_defaults(func=cmd_status)

    p = groups["top"].add_parser(
        "support-bundle",
        help="write one archive for support: versions, check --online, status, logs, redacted config",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--config", type=Path, default=DEFAULT_CONFIG, help="the gateway's config")
    p.add_argument(
        "--output",
        type=Path,
        default=None,
        help="archive to write (default: edgetwin-support-<time>.tar.gz here)",
    )
    p.add_argument("--journal-lines", type=int, default=2000, help="recent log lines to include")
    p.add_argument("--offline", action="store_true", help="leave out the online checks (no network traffic)")
    p.set_defaults(func=cmd_support_bundle)
