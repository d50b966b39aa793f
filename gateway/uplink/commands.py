"""CLI commands of the uplink: ``edgetwin provision ...`` and ``edgetwin twin listen ...``.

Added to the ``edgetwin`` parser through :func:`add_commands`; also runnable on their own as
``python -m gateway.uplink.commands provision ...`` / ``... twin listen ...``.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import IO, Any, TypeAlias

from gateway.errors import ConfigError
from gateway.records.topics import DEFAULT_PREFIX
from gateway.twin.errors import TwinAuthError, TwinConfigError, TwinError
from gateway.twin.listen import ListenOptions, run_listen
from gateway.uplink import certs
from gateway.uplink.brokerconf import write_mosquitto_conf
from gateway.uplink.config import is_loopback

SubParsers: TypeAlias = "argparse._SubParsersAction[argparse.ArgumentParser]"

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_CONFIG = 78


def _say(*parts: object, file: IO[str] | None = None) -> None:
    """Write a line for the operator (stdout unless told otherwise)."""
    (file or sys.stdout).write(" ".join(str(p) for p in parts) + "\n")


def _gateway_pseudonym(config_path: Path) -> str:
    """The pseudonym of the gateway a config file describes (creates the site key if needed)."""
    from drivers import REGISTRY  # noqa: PLC0415
    from gateway.anonymize import Anonymizer, Pseudonymizer, load_or_create_key  # noqa: PLC0415
    from gateway.config import load  # noqa: PLC0415

    config = load(config_path, REGISTRY)
    key = load_or_create_key(config.core.site_key_path)
    anon = Anonymizer(Pseudonymizer(key), time_mode="relative")
    return anon.gateway_pseudonym(config.core.gateway.name)


def cmd_provision_key(args: argparse.Namespace) -> int:
    """Create the gateway's key (0600) and a CSR named by its pseudonym."""
    cn = args.cn or (_gateway_pseudonym(args.config) if args.config else None)
    if cn is None:
        _say(
            "provision key: give --config (the CSR is named by the gateway's pseudonym) or --cn",
            file=sys.stderr,
        )
        return EXIT_CONFIG
    key_path = args.out_dir / "gateway.key"
    csr_path = args.out_dir / "gateway.csr"
    certs.create_key_and_csr(key_path, csr_path, cn, force=args.force)
    _say(
        f"key {key_path} (mode 0600) and CSR {csr_path} for CN={cn}.\n"
        "Have the CSR signed by your fleet's CA (AWS IoT: CreateCertificateFromCsr; Azure IoT Hub: X.509 CA "
        f"enrollment with device id {cn}), save the certificate as {args.out_dir / 'gateway.crt'} and set "
        "uplink.mqtt.cert_file / key_file."
    )
    return EXIT_OK


def cmd_provision_import(args: argparse.Namespace) -> int:
    """Import an existing certificate and key (checked to belong together)."""
    cert, key = certs.import_pair(args.cert, args.key, args.out_dir, force=args.force)
    info = certs.cert_info(cert)
    _say(f"imported {cert} ({info.subject}, valid until {info.not_after:%Y-%m-%d}) and {key} (mode 0600)")
    return EXIT_OK


def cmd_provision_show(args: argparse.Namespace) -> int:
    """Show a certificate's subject and expiry; exit 1 when expired."""
    info = certs.cert_info(args.cert)
    found = certs.expiry_message(info)
    _say(f"{args.cert}: {info.subject}, valid {info.not_before:%Y-%m-%d} .. {info.not_after:%Y-%m-%d}")
    if found is not None:
        _say(found[1])
        return EXIT_FAILURE if found[0] else EXIT_OK
    return EXIT_OK


def cmd_provision_demo_ca(args: argparse.Namespace) -> int:
    """Create a throwaway CA with broker, gateway and twin certificates (demo and tests only)."""
    hosts = tuple(args.host or ("127.0.0.1", "localhost"))
    pki = certs.demo_pki(args.out_dir, gateway_cn=args.cn, hosts=hosts)
    conf, note = write_mosquitto_conf(pki, args.out_dir, port=args.port, listen=args.listen or "")
    _say(
        f"demo CA {pki.ca_file}\nbroker {pki.server.cert} (for {', '.join(hosts)})\n"
        f"gateway {pki.gateway.cert} / {pki.gateway.key}\ntwin {pki.twin.cert} / {pki.twin.key}\n"
        f"mosquitto configuration {conf}: start the broker with 'mosquitto -c {conf}'; {note}\n"
        "For demos and tests only: anyone with the CA key can impersonate the broker."
    )
    return EXIT_OK


def _broker(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep:
        return text, 8883
    try:
        return host.strip("[]"), int(port)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"{text!r}: expected HOST or HOST:PORT") from exc


def cmd_twin_listen(args: argparse.Namespace) -> int:
    """Subscribe, decode, check sequences and print; the twin's view at the end."""
    host, port = args.broker
    if args.no_tls and not is_loopback(host):
        _say(
            f"twin listen: --no-tls to {host}: plain TCP is for brokers on this machine only", file=sys.stderr
        )
        return EXIT_CONFIG
    if args.session_expiry and not args.client_id:
        _say(
            "twin listen: --session-expiry needs --client-id: the broker keeps a session by client id; "
            "give the same --client-id on every start",
            file=sys.stderr,
        )
        return EXIT_CONFIG
    options = ListenOptions(
        host=host,
        port=port,
        ca_file=args.ca,
        cert_file=args.cert,
        key_file=args.key,
        server_name=args.server_name,
        tls=not args.no_tls,
        protocol=args.protocol,
        prefix=args.prefix,
        group=args.group,
        client_id=args.client_id,
        session_expiry_s=args.session_expiry,
    )
    stop = threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGINT, signal.SIGTERM)}
    out = args.out.open("a", encoding="utf-8") if args.out else sys.stdout
    try:
        return run_listen(
            options,
            out=out,
            as_json=args.json,
            count=args.count,
            duration=args.duration,
            stop=stop,
            report=sys.stderr if args.json and args.out is None else sys.stdout,
        )
    except (TwinAuthError, TwinConfigError) as exc:
        _say(str(exc), file=sys.stderr)
        return EXIT_CONFIG if isinstance(exc, TwinConfigError) else EXIT_FAILURE
    except TwinError as exc:
        _say(str(exc), file=sys.stderr)
        return EXIT_FAILURE
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if out is not sys.stdout:
            out.close()


def _guard(func: Any) -> Any:
    def run(args: argparse.Namespace) -> int:
        try:
            code: int = func(args)
        except ConfigError as exc:
            _say(str(exc), file=sys.stderr)
            return EXIT_CONFIG
        return code

    return run


def add_commands(groups: dict[str, SubParsers]) -> None:
    """Add ``provision`` and ``twin`` to the ``edgetwin`` command."""
    top = groups["top"]
    prov = top.add_parser("provision", help="the gateway's TLS key, CSR and certificate")
    psub = prov.add_subparsers(dest="provision_what", required=True)

    p = psub.add_parser("key", help="create the gateway key (0600) and a CSR named by its pseudonym")
    p.add_argument("--config", type=Path, help="the gateway's config (names the CSR by its pseudonym)")
    p.add_argument("--cn", help="the CSR's common name instead (e.g. a device id given by the cloud)")
    p.add_argument(
        "--out-dir",
        type=Path,
        default=Path("/etc/edgetwin/tls"),
        help="where the key and CSR / the imported pair go",
    )
    p.add_argument("--force", action="store_true", help="replace an existing key")
    p.set_defaults(func=_guard(cmd_provision_key))

    p = psub.add_parser("import", help="import a certificate and its key (checked to match)")
    p.add_argument("--cert", type=Path, required=True, help="a PEM certificate")
    p.add_argument("--key", type=Path, required=True, help="its PEM private key")
    p.add_argument(
        "--out-dir",
        type=Path,
        default=Path("/etc/edgetwin/tls"),
        help="where the key and CSR / the imported pair go",
    )
    p.add_argument("--force", action="store_true", help="replace an existing key")
    p.set_defaults(func=_guard(cmd_provision_import))

    p = psub.add_parser("show", help="a certificate's subject and expiry")
    p.add_argument("--cert", type=Path, required=True, help="a PEM certificate")
    p.set_defaults(func=_guard(cmd_provision_show))

    p = psub.add_parser("demo-ca", help="a throwaway CA with broker and client certificates (demo, tests)")
    p.add_argument("--out-dir", type=Path, required=True, help="where the demo CA and certificates go")
    p.add_argument("--host", action="append", default=None, help="broker host name or address (repeatable)")
    p.add_argument("--cn", default="gateway", help="the gateway certificate's common name")
    p.add_argument("--port", type=int, default=8883, help="the port in the mosquitto configuration written")
    p.add_argument("--listen", default=None, help="the address mosquitto listens on (none: every address)")
    p.set_defaults(func=_guard(cmd_provision_demo_ca))

    twin = top.add_parser("twin", help="the cloud twin's side: listen to gateways")
    tsub = twin.add_subparsers(dest="twin_what", required=True)
    groups["twin"] = tsub  # the downlink's twin commands join these
    p = tsub.add_parser("listen", help="subscribe, decode, check sequences, show the latest state")
    p.add_argument("--broker", type=_broker, required=True, help="HOST[:PORT] (default port 8883)")
    p.add_argument("--ca", type=Path, help="CA bundle that signed the broker's certificate")
    p.add_argument("--cert", type=Path, help="client certificate")
    p.add_argument("--key", type=Path, help="its key")
    p.add_argument("--server-name", help="the name in the broker's certificate, if not the host")
    p.add_argument("--no-tls", action="store_true", help="plain TCP (loopback brokers only)")
    p.add_argument("--protocol", choices=["5", "3.1.1"], default="5", help="the MQTT protocol version")
    p.add_argument("--prefix", default=DEFAULT_PREFIX, help="topic prefix of the gateways")
    p.add_argument("--group", help="shared subscription group: listeners in one group split the stream")
    p.add_argument(
        "--client-id", help="a fixed client id (with --session-expiry: the broker keeps the session)"
    )
    p.add_argument(
        "--session-expiry",
        type=int,
        default=0,
        metavar="S",
        help="keep the session this many seconds after a disconnect: records published meanwhile are "
        "queued (QoS 1) and delivered on the next start, so only real gaps are reported",
    )
    p.add_argument("--json", action="store_true", help="one JSON line per message")
    p.add_argument("--out", type=Path, help="write messages to this file instead of stdout")
    p.add_argument("--count", type=int, help="stop after this many records")
    p.add_argument("--duration", type=float, help="stop after this many seconds")
    p.set_defaults(func=cmd_twin_listen)


def main(argv: Sequence[str] | None = None) -> int:
    """Run these commands without the rest of the ``edgetwin`` command."""
    parser = argparse.ArgumentParser(prog="edgetwin")
    sub = parser.add_subparsers(dest="command", required=True)
    add_commands({"top": sub})
    args = parser.parse_args(argv)
    code: int = args.func(args)
    return code


if __name__ == "__main__":
    sys.exit(main())
