"""``edgetwin scan serial`` and ``edgetwin sim oximeter``."""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

from drivers.serial.sim import (
    SIM_PROTOCOLS,
    Corruption,
    MimicNumerics,
    PtyOximeter,
    VitalsModel,
    VitalsSource,
)

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
BY_ID = Path("/dev/serial/by-id")


def _out(text: str = "") -> None:
    sys.stdout.write(text + "\n")


def _err(text: str) -> None:
    sys.stderr.write(text + "\n")


@dataclass(frozen=True, slots=True)
class PortInfo:
    """One serial port as the system lists it (local information: it may name the adapter's serial)."""

    path: str
    by_id: str
    vid_pid: str
    description: str


def by_id_links(folder: Path = BY_ID) -> dict[str, str]:
    """Stable ``/dev/serial/by-id`` link of each device node, by the node's real path."""
    links: dict[str, str] = {}
    if folder.is_dir():
        for link in sorted(folder.iterdir()):
            links.setdefault(str(link.resolve()), str(link))
    return links


def list_ports(extra: list[str]) -> list[PortInfo]:
    """Serial ports the system knows, plus the paths given (a pty link is not enumerated)."""
    from serial.tools import list_ports as lp  # noqa: PLC0415 - pyserial is an optional extra

    links = by_id_links()
    ports: list[PortInfo] = []
    for p in sorted(lp.comports(), key=lambda p: p.device):
        vid_pid = f"{p.vid:04x}:{p.pid:04x}" if p.vid is not None and p.pid is not None else "-"
        desc = p.description if p.description and p.description != "n/a" else "-"
        ports.append(PortInfo(p.device, links.get(str(Path(p.device).resolve()), "-"), vid_pid, desc))
    known = {p.path for p in ports}
    for path in extra:
        if path not in known:
            real = str(Path(path).resolve())
            ports.append(PortInfo(path, links.get(real, "-"), "-", f"given on the command line ({real})"))
    return ports


def cmd_scan_serial(args: argparse.Namespace) -> int:
    """List serial ports; probe the ports the operator names (listening only, unless allowed)."""
    try:
        from drivers.serial.detect import probe  # noqa: PLC0415 - needs pyserial
        from gateway.errors import EdgetwinError  # noqa: PLC0415
    except ImportError as exc:
        _err(f"edgetwin scan serial: {exc}: install the gateway's 'serial' extra")
        return EXIT_FAILURE
    ports = list_ports([*args.port, *args.probe])
    results: list[dict[str, Any]] = []
    code = EXIT_OK
    for path in args.probe:
        entry: dict[str, Any] = {"port": path}
        try:
            result = asyncio.run(
                probe(path, probe_s=args.probe_s, allow_start_command=args.allow_start_command, who="scan")
            )
        except EdgetwinError as exc:
            entry["error"] = str(exc)
            code = EXIT_FAILURE
        else:
            entry["protocol"] = result.protocol
            entry["settings"] = str(result.settings) if result.settings else None
            entry["result"] = result.describe()
            if result.bytes_seen == 0 and not args.allow_start_command:
                entry["result"] += ": a CMS50 with firmware 4.6 speaks only after --allow-start-command"
            entry["bytes"] = result.bytes_seen
            if result.protocol is None:
                code = EXIT_FAILURE
        results.append(entry)
    if args.json:
        _out(json.dumps({"ports": [vars_of(p) for p in ports], "probes": results}))
        return code
    if not ports:
        _out("no serial ports found")
    else:
        w_path = max(4, *(len(p.path) for p in ports))
        w_id = max(5, *(len(p.by_id) for p in ports))
        _out(f"{'PATH':<{w_path}}  {'BY-ID':<{w_id}}  {'VID:PID':<9}  DESCRIPTION")
        for p in ports:
            _out(f"{p.path:<{w_path}}  {p.by_id:<{w_id}}  {p.vid_pid:<9}  {p.description}")
    for entry in results:
        if "error" in entry:
            _out(f"probe {entry['port']}: {entry['error']}")
        else:
            _out(f"probe {entry['port']}: {entry['result']}")
    if not args.probe and ports:
        _out("\nadd --probe PATH to listen on a port for a known oximeter protocol (nothing is written)")
    return code


def vars_of(p: PortInfo) -> dict[str, str]:
    """A port as a JSON object."""
    return {"path": p.path, "by_id": p.by_id, "vid_pid": p.vid_pid, "description": p.description}


def cmd_sim_oximeter(args: argparse.Namespace) -> int:
    """Run a simulated pulse oximeter on a pty until Ctrl-C, SIGTERM or --duration."""
    vitals: VitalsSource
    if args.data is not None:
        try:
            vitals = MimicNumerics(args.data, speed=args.speed)
        except (OSError, ValueError, IndexError) as exc:
            _err(f"edgetwin sim oximeter: --data {args.data}: cannot read the record: {exc}")
            return EXIT_USAGE
    else:
        vitals = VitalsModel(args.seed)
    corruption = Corruption(args.bit_flips, args.drop_bytes, args.insert_bytes, args.wrong_speed)
    stop = threading.Event()

    def on_signal(_sig: int, _frame: FrameType | None) -> None:
        stop.set()

    previous = signal.signal(signal.SIGTERM, on_signal)
    sim = PtyOximeter(
        args.protocol,
        link=args.link,
        vitals=vitals,
        corruption=corruption,
        seed=args.seed,
        serial_number=args.serial_number,
    )
    try:
        sim.start()
    except OSError as exc:
        _err(f"edgetwin sim oximeter: cannot create the pty or link {args.link}: {exc}")
        return EXIT_FAILURE
    try:
        _out(f"simulated {args.protocol} oximeter on {sim.path}")
        if sim.needs_start:
            _out("it streams after the start command (allow_start_command = true in the source)")
        if corruption.active:
            _out(f"injecting faults: {corruption}")
        sys.stdout.flush()
        deadline = time.monotonic() + args.duration if args.duration > 0 else None
        while not stop.is_set():
            if deadline is not None and time.monotonic() >= deadline:
                break
            stop.wait(0.2)
    except KeyboardInterrupt:
        pass
    finally:
        sim.stop()
        signal.signal(signal.SIGTERM, previous)
    _out(f"stopped: {sim.written} bytes written, {sim.lost} not taken by the reader")
    return EXIT_OK


def _probability(text: str) -> float:
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"{text}: a probability between 0 and 1")
    return value


def add_commands(groups: dict[str, argparse._SubParsersAction]) -> None:  # type: ignore[type-arg]
    """Add ``scan serial`` and ``sim oximeter`` to the CLI."""
    p = groups["scan"].add_parser(
        "serial", help="list serial ports; probe named ones for a known pulse-oximeter protocol"
    )
    p.add_argument(
        "--probe", action="append", default=[], metavar="PATH", help="listen on this port (repeatable)"
    )
    p.add_argument("--port", action="append", default=[], metavar="PATH", help="also list this path")
    p.add_argument("--probe-s", type=float, default=4.0, help="seconds to listen per line setting")
    p.add_argument(
        "--allow-start-command",
        action="store_true",
        help="also try protocols that need a start command written to the device (CMS50 firmware 4.6)",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=cmd_scan_serial)

    p = groups["sim"].add_parser("oximeter", help="a simulated pulse oximeter on a pseudo-terminal")
    p.add_argument(
        "--protocol", choices=SIM_PROTOCOLS, required=True, help="the monitor protocol to simulate"
    )
    p.add_argument("--link", type=Path, default=None, help="keep a symlink to the pty here")
    p.add_argument("--data", type=Path, default=None, help="replay a MIMIC numerics record (.hea)")
    p.add_argument("--speed", type=float, default=60.0, help="record seconds per second with --data")
    p.add_argument("--seed", type=int, default=0, help="random seed of the simulated patient")
    p.add_argument("--serial-number", default="0000056661", help="the monitor's SN= (Masimo)")
    p.add_argument("--bit-flips", type=_probability, default=0.0, metavar="P", help="per byte")
    p.add_argument("--drop-bytes", type=_probability, default=0.0, metavar="P", help="per byte")
    p.add_argument("--insert-bytes", type=_probability, default=0.0, metavar="P", help="per byte")
    p.add_argument("--wrong-speed", type=int, default=None, metavar="BAUD", help="send at this speed instead")
    p.add_argument("--duration", type=float, default=0.0, help="seconds to run (0: until Ctrl-C)")
    p.set_defaults(func=cmd_sim_oximeter)
