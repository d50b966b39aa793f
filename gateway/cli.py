"""The ``edgetwin`` command: run the gateway, check its config, demo, scan and simulate devices.

Exit codes (also in the README):
  0   success, or an orderly stop on SIGTERM/SIGINT
  1   the gateway failed at run time (see the log)
  2   wrong command-line usage
  78  the configuration is invalid (EX_CONFIG; systemd does not restart on it)
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib
import logging
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TypeAlias

from gateway import __version__, demo, logs
from gateway.config import Config, load, validate
from gateway.errors import ConfigError, InvalidConfigError
from gateway.inference.coverage import check_coverage
from gateway.runtime import build_problems, check_sources, run_gateway
from gateway.supervisor import EXIT_CONFIG, EXIT_FAILURE, EXIT_OK

log = logging.getLogger("edgetwin")

#: A subcommand group's parsers; plugins add theirs with ``add_commands(groups)`` where groups maps
#: "top", "scan" and "sim" to these. Each parser sets ``func`` to a callable(args) -> exit code.
SubParsers: TypeAlias = "argparse._SubParsersAction[argparse.ArgumentParser]"

EXAMPLES = Path(__file__).parent / "examples"


def _registry() -> Any:
    # Imported here: the composition root is the only code that knows the drivers.
    from drivers import REGISTRY  # noqa: PLC0415

    return REGISTRY


def _load(path: Path) -> Config | None:
    try:
        return load(path, _registry())
    except InvalidConfigError as exc:
        print(str(exc), file=sys.stderr)
        return None


def cmd_check(args: argparse.Namespace) -> int:
    """Validate a config file and report every problem at once."""
    config = _load(args.config)
    if config is None:
        return EXIT_CONFIG
    # What only shows when parts are built: a driver refusing its settings, a model file.
    problems = build_problems(config, _registry())
    if problems:
        print(f"config {args.config}: {len(problems)} problem(s):", file=sys.stderr)
        for problem in problems:
            print(f"  {problem}", file=sys.stderr)
        return EXIT_CONFIG
    coverage, coverage_problems = check_coverage(config)
    if coverage_problems:
        _print_coverage(args.config, coverage, coverage_problems)
        return EXIT_CONFIG
    if config.core.uplink.mqtt is not None:
        from gateway.uplink.mqtt import check_certificates  # noqa: PLC0415 - the optional mqtt extra

        for line in check_certificates(config.core.uplink.mqtt):
            print(f"  {line}")
    sources = check_sources(config)
    print(f"config {args.config}: ok ({len(sources)} source(s): {', '.join(sources) or 'none'})")
    _print_coverage(args.config, coverage)
    return EXIT_OK


def _print_coverage(path: Path, lines: Sequence[str], problems: Sequence[str] = ()) -> None:
    """Which models score which subject and what watches it; the problems that fail the check."""
    for line in lines:
        print(f"  {line}")
    if problems:
        print(f"config {path}: {len(problems)} problem(s):", file=sys.stderr)
        for problem in problems:
            print(f"  {problem}", file=sys.stderr)


def cmd_run(args: argparse.Namespace) -> int:
    """Run the gateway until SIGTERM/SIGINT."""
    config = _load(args.config)
    if config is None:
        return EXIT_CONFIG
    cl = config.core.logging
    logs.setup(args.log_level or cl.level, args.log_format or cl.format, identities=cl.identities)
    log.info("edgetwin %s starting with %s", __version__, args.config)
    if cl.identities:
        log.warning(
            "config %s: logging.identities is on: logs carry raw subject ids, serial numbers and "
            "addresses: keep them on this gateway, and turn it off when the bench work is done",
            args.config,
        )
    try:
        return asyncio.run(run_gateway(config, _registry(), stop_after_s=args.duration))
    except Exception:
        log.exception("edgetwin stopped by an unexpected error (a bug; please report it with this trace)")
        return EXIT_FAILURE


def cmd_demo(args: argparse.Namespace) -> int:
    """Run simulated devices through the whole gateway, over TLS MQTT, to a twin that prints them."""
    logs.setup(args.log_level or "info", args.log_format or "text")
    duration = args.duration if args.duration > 0 else None
    with tempfile.TemporaryDirectory(prefix="edgetwin-demo-") as tmp, contextlib.ExitStack() as stack:
        data, notes = demo.compose(stack, Path(tmp))
        data["gateway"]["state_dir"] = str(args.state_dir or Path(tmp))
        try:
            from gateway.uplink.demo import demo_link  # noqa: PLC0415 - the optional mqtt extra

            link = stack.enter_context(demo_link(Path(tmp) / "link", sys.stdout, as_json=args.json))
        except (ImportError, ConfigError) as exc:
            path = f"the local view instead ({type(exc).__name__}: {exc})"
        else:
            data["uplink"] = {"kind": "mqtt", "mqtt": link.mqtt_config()}
            path = f"MQTT {link.protocol} over TLS with client certificates to a broker on {link.host}:{link.port}"
        config = validate(data, "<demo>", _registry())
        print(
            "edgetwin demo: simulated devices -> drivers -> windows -> features -> models -> anonymizer\n"
            f"-> durable outbox -> {path} -> the twin. Devices:\n" + "\n".join(notes) + "\n"
            "Each line below is a record as the twin receives and decodes it (pseudonyms only).\n"
            f"Stops after {args.duration:g} s (Ctrl-C stops earlier).\n",
            flush=True,
        )
        return asyncio.run(run_gateway(config, _registry(), pretty=not args.json, stop_after_s=duration))


def cmd_version(_args: argparse.Namespace) -> int:
    """Print the version."""
    print(f"edgetwin {__version__}")
    return EXIT_OK


def cmd_rotate_key(args: argparse.Namespace) -> int:
    """Start a new gateway identity: new site key, outbox and time base (nothing links old and new)."""
    config = _load(args.config)
    if config is None:
        return EXIT_CONFIG
    from gateway.rotation import rotate_identity  # noqa: PLC0415

    done = rotate_identity(config.core)
    print(
        f"new site key at {config.core.site_key_path}; the old key was kept as {done.retired_key}: "
        "delete it once nothing needs to link old pseudonyms."
    )
    if done.outbox_retired is not None:
        print(
            f"the outbox was set aside as {done.outbox_retired} with "
            f"{'an unknown number of' if done.undelivered is None else done.undelivered} undelivered "
            "record(s): they carry the old pseudonyms and are not sent."
        )
    renew = (
        f"have {done.csr} signed and install it with its key ('edgetwin provision import')"
        if done.csr is not None
        else f"renew its certificate ('edgetwin provision key --config {args.config} --force', then sign)"
    )
    print(f"the gateway is now {done.gateway_pseudonym} (MQTT client id, topics): {renew}; then restart it.")
    return EXIT_OK


def cmd_legend(args: argparse.Namespace) -> int:
    """Print which pseudonym is which gateway, bed, patient, machine or device (local only)."""
    config = _load(args.config)
    if config is None:
        return EXIT_CONFIG
    from gateway.legend import render  # noqa: PLC0415

    print(render(config))
    return EXIT_OK


def _add_plugin_commands(groups: dict[str, SubParsers]) -> None:
    # Driver packages add their own subcommands (scan, sim, ...). A plugin whose optional
    # dependencies are not installed is left out; its commands say so when missing.
    from drivers import COMMAND_MODULES  # noqa: PLC0415

    for module_name in ("gateway.uplink.commands", *COMMAND_MODULES):
        try:
            module = importlib.import_module(module_name)
        except ImportError as exc:
            log.debug("commands of %s unavailable: %s", module_name, exc)
            continue
        module.add_commands(groups)


def build_parser() -> argparse.ArgumentParser:
    """The command-line parser."""
    parser = argparse.ArgumentParser(prog="edgetwin", description=__doc__.split("\n")[0] if __doc__ else None)
    sub = parser.add_subparsers(dest="command", required=True)
    groups: dict[str, SubParsers] = {"top": sub}
    for name, text in (
        ("scan", "look for devices and list what they offer"),
        ("sim", "run a simulated device"),
    ):
        group = sub.add_parser(name, help=text)
        groups[name] = group.add_subparsers(dest=f"{name}_what", required=True)

    def logging_args(p: argparse.ArgumentParser) -> None:
        p.add_argument("--log-level", choices=["debug", "info", "warning", "error"])
        p.add_argument("--log-format", choices=["text", "json"])

    p = sub.add_parser("run", help="run the gateway (as the systemd service does)")
    p.add_argument("--config", type=Path, required=True)
    p.add_argument("--duration", type=float, default=None, help="stop after this many seconds")
    logging_args(p)
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("check", help="validate a config file, reporting every problem")
    p.add_argument("--config", type=Path, required=True)
    p.set_defaults(func=cmd_check)

    p = sub.add_parser("demo", help="simulated sources end to end, records shown locally")
    p.add_argument("--duration", type=float, default=90.0, help="seconds to run (0 = until Ctrl-C)")
    p.add_argument(
        "--state-dir", type=Path, default=None, help="keep the outbox and key here (default: temporary)"
    )
    p.add_argument("--json", action="store_true", help="print records as JSON lines")
    logging_args(p)
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("version", help="print the version")
    p.set_defaults(func=cmd_version)

    p = sub.add_parser("legend", help="which pseudonym is which bed, patient, machine or device (local)")
    p.add_argument("--config", type=Path, required=True)
    p.set_defaults(func=cmd_legend)

    p = sub.add_parser("rotate-key", help="start a new identity: site key, outbox, time base")
    p.add_argument("--config", type=Path, required=True)
    p.set_defaults(func=cmd_rotate_key)
    _add_plugin_commands(groups)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``edgetwin`` command."""
    args = build_parser().parse_args(argv)
    code: int = args.func(args)
    return code


if __name__ == "__main__":
    sys.exit(main())
