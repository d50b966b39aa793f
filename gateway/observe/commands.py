"""``edgetwin status``: the running gateway's state, as text or JSON, with an exit code for scripts."""

from __future__ import annotations

import argparse
import json
import sys
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
    return socket_path(config.core.status, config.core.gateway.state_dir)


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


def add_commands(groups: dict[str, Any]) -> None:
    """Add ``status``."""
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
