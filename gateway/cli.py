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

from gateway import __version__, demo, logs, memory
from gateway.anonymize import Pseudonymizer
from gateway.config import Config, load, validate
from gateway.errors import ConfigError, EdgetwinError, InvalidConfigError
from gateway.runtime import run_gateway
from gateway.supervisor import EXIT_CONFIG, EXIT_FAILURE, EXIT_OK

log = logging.getLogger("edgetwin")

#: A subcommand group's parsers; plugins add theirs with ``add_commands(groups)`` where groups maps
#: "top", "scan" and "sim" to these. Each parser sets ``func`` to a callable(args) -> exit code.
SubParsers: TypeAlias = "argparse._SubParsersAction[argparse.ArgumentParser]"

EXAMPLES = Path(__file__).parent / "examples"


class _Formatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each option's default, except on required options (they have none)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.required:
            return action.help
        return super()._get_help_string(action)


class _Parser(argparse.ArgumentParser):
    """Every command's --help shows each option's default."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", _Formatter)
        super().__init__(*args, **kwargs)


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
    """Check a config file, and with --online its environment; report every problem at once."""
    from gateway.observe.check import run_check  # noqa: PLC0415

    report = run_check(
        args.config,
        _registry(),
        with_online=args.online,
        client_id=_check_client_id(args.config),
        probes=_probes() if args.online else None,
    )
    print(report.render(verbose=not args.quiet))
    return report.exit_code()


def _probes() -> dict[str, Any]:
    # A driver may ship drivers/<name>/probe.py with probe(source name, config) for check --online.
    found: dict[str, Any] = {}
    for name in _registry():
        try:
            module = importlib.import_module(f"drivers.{name}.probe")
        except ImportError:
            continue
        found[name] = module.probe
    return found


def _check_client_id(path: Path) -> str:
    # The CONNACK probe must not take the running gateway's session over: its own client id.
    try:
        config = load(path, _registry())
        key = config.core.site_key_path.read_bytes()
    except (ConfigError, OSError):
        return "edgetwin-check"
    try:
        return Pseudonymizer(key)("gateway", config.core.gateway.name) + "-check"
    except (ValueError, EdgetwinError):
        return "edgetwin-check"


def cmd_run(args: argparse.Namespace) -> int:
    """Run the gateway until SIGTERM/SIGINT."""
    memory.fix_mmap_threshold()  # before the config's and the drivers' allocations
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
        code = asyncio.run(run_gateway(config, _registry(), stop_after_s=args.duration))
    except Exception:
        log.exception("edgetwin stopped by an unexpected error (a bug; please report it with this trace)")
        code = EXIT_FAILURE
    from gateway.downlink import restart  # noqa: PLC0415

    if restart.requested() is not None and code == EXIT_OK:
        restart.exec_again()  # onto a config the twin sent, or back to the previous one
    if code != EXIT_OK and config.core.downlink.trust_file is not None:
        from gateway.downlink.unit import roll_back_after_exit  # noqa: PLC0415

        if roll_back_after_exit(config, code):
            restart.exec_again()
    return code


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


def cmd_version(args: argparse.Namespace) -> int:
    """Print the version (with --verbose: Python, OS, kernel and every installed distribution)."""
    if args.verbose:
        from gateway.observe.bundle import versions  # noqa: PLC0415

        print(versions(), end="")
    else:
        print(f"edgetwin {__version__}")
    return EXIT_OK


#: rotate-key refused while a gateway runs on the state directory (EX_TEMPFAIL: stop it, try again).
EXIT_BUSY = 75


def cmd_rotate_key(args: argparse.Namespace) -> int:
    """Start a new gateway identity: new site key, outbox and time base (nothing links old and new)."""
    config = _load(args.config)
    if config is None:
        return EXIT_CONFIG
    from gateway.rotation import GatewayRunningError, rotate_identity  # noqa: PLC0415

    before = _pseudonym_of(config.core.site_key_path, config.core.gateway.name)
    try:
        done = rotate_identity(config.core)
    except GatewayRunningError as exc:
        print(exc, file=sys.stderr)
        return EXIT_BUSY
    print(
        f"new site key at {config.core.site_key_path}; the old key was kept as {done.retired_key}: "
        "delete it once nothing needs to link old pseudonyms.\n"
        "What changes: every subject and device pseudonym, the epoch, the sequence and the time base; "
        f"the gateway's pseudonym ({before or '-'} -> {done.gateway_pseudonym}), which is its MQTT client id, "
        "its topic root and the name its certificate must carry: run 'edgetwin provision key', have the new "
        "CSR signed and import it before restarting, or the broker may refuse the gateway; tell the twin's "
        "operators that records continue under new names."
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

    print(render(config, as_json=args.json))
    return EXIT_OK


def _pseudonym_of(key_path: Path, name: str) -> str:
    try:
        return Pseudonymizer(key_path.read_bytes())("gateway", name)
    except (OSError, ValueError):
        return ""


def _add_plugin_commands(groups: dict[str, SubParsers]) -> None:
    # Driver packages add their own subcommands (scan, sim, ...). A plugin whose optional
    # dependencies are not installed is left out; its commands say so when missing.
    from drivers import COMMAND_MODULES  # noqa: PLC0415

    for module_name in (
        "gateway.uplink.commands",
        "gateway.observe.commands",
        "gateway.downlink.commands",
        *COMMAND_MODULES,
    ):
        try:
            module = importlib.import_module(module_name)
        except ImportError as exc:
            log.debug("commands of %s unavailable: %s", module_name, exc)
            continue
        module.add_commands(groups)


def build_parser(*, plugins: bool = True) -> argparse.ArgumentParser:
    """The command-line parser (``plugins=False``: the core commands only)."""
    parser: argparse.ArgumentParser = _Parser(
        prog="edgetwin",
        description=__doc__.split("\n")[0] if __doc__ else None,
        epilog="Exit codes: 0 success, 1 run-time failure, 2 usage, 78 invalid config. "
        "'edgetwin <command> --help' shows each command's options with their defaults.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    groups: dict[str, SubParsers] = {"top": sub}
    for name, text in (
        ("scan", "look for devices and list what they offer"),
        ("sim", "run a simulated device"),
    ):
        group = sub.add_parser(name, help=text)
        groups[name] = group.add_subparsers(dest=f"{name}_what", required=True)

    def logging_args(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--log-level", choices=["debug", "info", "warning", "error"], help="overrides [logging] level"
        )
        p.add_argument("--log-format", choices=["text", "json"], help="overrides [logging] format")

    p = sub.add_parser(
        "run",
        help="run the gateway (as the systemd service does)",
        epilog="Example: edgetwin run --config /etc/edgetwin/edgetwin.toml",
    )
    p.add_argument("--config", type=Path, required=True, help="the gateway's TOML config file")
    p.add_argument(
        "--duration", type=float, default=None, help="stop after this many seconds (none: until SIGTERM)"
    )
    logging_args(p)
    p.set_defaults(func=cmd_run)

    p = sub.add_parser(
        "check",
        help="check a config file (and with --online its environment), reporting every problem at once",
        description="Exit codes: 0 no failure, 78 the config is wrong, 1 only the environment is.",
    )
    p.add_argument("--config", type=Path, required=True, help="the TOML config file to check")
    p.add_argument(
        "--online",
        action="store_true",
        help="also check DNS, the broker (TCP, TLS, CONNACK), clock, devices, disk, state directory",
    )
    p.add_argument("--quiet", action="store_true", help="show failures and warnings only, not the passes")
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
    p.add_argument(
        "--verbose", action="store_true", help="also Python, OS, kernel and every installed distribution"
    )
    p.set_defaults(func=cmd_version)

    p = sub.add_parser("legend", help="which pseudonym is which bed, patient, machine or device (local)")
    p.add_argument("--config", type=Path, required=True, help="the gateway's TOML config file")
    p.add_argument("--json", action="store_true", help="rows as JSON (for 'twin rollout-status --legend')")
    p.set_defaults(func=cmd_legend)

    p = sub.add_parser(
        "rotate-key",
        help="start a new identity: site key, outbox epoch, time base (the gateway's pseudonym and client id change)",
    )
    p.add_argument("--config", type=Path, required=True, help="the gateway's TOML config file")
    p.set_defaults(func=cmd_rotate_key)
    if plugins:
        _add_plugin_commands(groups)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``edgetwin`` command."""
    argv = sys.argv[1:] if argv is None else list(argv)
    # The service needs none of the plugins' commands, whose simulators and scanners would load
    # an OPC UA server, a D-Bus stack and more into it (~25 MB of a one-source gateway's RSS).
    args = build_parser(plugins=argv[:1] != ["run"]).parse_args(argv)
    code: int = args.func(args)
    return code


if __name__ == "__main__":
    sys.exit(main())
