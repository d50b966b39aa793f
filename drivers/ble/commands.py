"""``edgetwin scan ble`` and ``edgetwin sim wearable``.

The scan lists what the gateway's adapter hears, for writing the allowlist; it prints addresses and
advertised names on the local terminal only. The simulated wearable runs on the emulated radio
(the test bed): ``--testbed`` starts a private one, otherwise it joins the bus named by
``DBUS_SYSTEM_BUS_ADDRESS``.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from collections.abc import Iterable
from dataclasses import dataclass

EXIT_OK, EXIT_FAILURE, EXIT_USAGE = 0, 1, 2


def _say(text: str, *, error: bool = False) -> None:
    stream = sys.stderr if error else sys.stdout
    stream.write(text + "\n")
    stream.flush()


@dataclass(frozen=True, slots=True)
class Heard:
    """One device heard during a scan (local only)."""

    address: str
    rssi: int
    name: str
    services: tuple[str, ...]  # health service tokens
    profile: str  # the driver profile its services match, or "-"


def describe_services(uuids: Iterable[str]) -> tuple[tuple[str, ...], str]:
    """Health service tokens of advertised UUIDs, and the matching driver profile ("-" if none)."""
    from drivers.ble.protocol import HEALTH_SERVICES, PROFILE_BY_SERVICE, normalize_uuid  # noqa: PLC0415

    by_uuid = {v: k for k, v in HEALTH_SERVICES.items()}
    norm = [normalize_uuid(u) for u in uuids]
    tokens = tuple(sorted({by_uuid[u] for u in norm if u in by_uuid}))
    profile = next((PROFILE_BY_SERVICE[u] for u in norm if u in PROFILE_BY_SERVICE), "-")
    return tokens, profile


def format_scan(rows: Iterable[Heard], adapter: str, seconds: float) -> str:
    """The scan as a table, strongest signal first."""
    ordered = sorted(rows, key=lambda r: (-r.rssi, r.address))
    lines = [f"{len(ordered)} device(s) heard on {adapter} in {seconds:g} s"]
    if ordered:
        lines.append(
            f"{'ADDRESS':<17}  {'RSSI':>5}  {'PROFILE':<7}  {'HEALTH SERVICES':<40}  NAME (advertised, not an identity)"
        )
        for r in ordered:
            services = ",".join(r.services) or "-"
            lines.append(f"{r.address:<17}  {r.rssi:>5}  {r.profile:<7}  {services:<40}  {r.name or '-'}")
    return "\n".join(lines)


async def scan_ble(adapter: str, seconds: float, everything: bool) -> list[Heard]:
    """Scan for ``seconds``; devices advertising a health service (or all with ``everything``)."""
    from bleak import BleakScanner  # noqa: PLC0415
    from bleak.backends.device import BLEDevice  # noqa: PLC0415
    from bleak.backends.scanner import AdvertisementData  # noqa: PLC0415

    heard: dict[str, Heard] = {}

    def on_adv(device: BLEDevice, adv: AdvertisementData) -> None:
        services, profile = describe_services(adv.service_uuids)
        if services or everything:
            heard[device.address] = Heard(device.address, adv.rssi, adv.local_name or "", services, profile)

    scanner = BleakScanner(on_adv, bluez={"adapter": adapter})
    async with asyncio.timeout(10.0):
        await scanner.start()
    try:
        await asyncio.sleep(seconds)
    finally:
        async with asyncio.timeout(10.0):
            await scanner.stop()
    return list(heard.values())


def cmd_scan_ble(args: argparse.Namespace) -> int:
    """List nearby BLE devices with RSSI and the health services they advertise."""
    from bleak.exc import BleakError  # noqa: PLC0415

    try:
        rows = asyncio.run(scan_ble(args.adapter, args.seconds, args.all))
    except (BleakError, OSError, EOFError, TimeoutError) as exc:
        _say(
            f"edgetwin scan ble {args.adapter}: cannot scan: {exc or type(exc).__name__}: "
            "check that bluetoothd runs and the adapter is present (bluetoothctl show)",
            error=True,
        )
        return EXIT_FAILURE
    _say(format_scan(rows, args.adapter, args.seconds))
    return EXIT_OK


def cmd_sim_wearable(args: argparse.Namespace) -> int:
    """Run a simulated wearable; with ``--testbed`` on a private emulated radio of its own."""
    from drivers.ble.testbed import peripheral  # noqa: PLC0415
    from drivers.ble.testbed.harness import ENV, Testbed  # noqa: PLC0415

    if args.address is None:
        args.address = DEFAULT_ADDRESSES[args.profile]
    testbed: Testbed | None = None
    if args.testbed:
        testbed = Testbed(export_env=False)
        testbed.start()
        os.environ[ENV] = testbed.address
        _say(f"emulated radio up; point the gateway at it with:\n  export {ENV}='{testbed.address}'")
    elif not os.environ.get(ENV):
        _say(
            f"edgetwin sim wearable: no emulated radio: {ENV} is not set: "
            "add --testbed to start one, or set it to a running test bed's bus",
            error=True,
        )
        return EXIT_USAGE
    try:
        return asyncio.run(peripheral.run(args))
    except (RuntimeError, OSError, EOFError) as exc:
        _say(
            f"edgetwin sim wearable {args.profile}: cannot join the emulated radio: {exc}: "
            "is the test bed's emulator running on this bus?",
            error=True,
        )
        return EXIT_FAILURE
    finally:
        if testbed is not None:
            testbed.stop()


#: Default addresses of the simulated wearables (a locally administered range).
DEFAULT_ADDRESSES = {
    "hr": "C2:00:00:00:00:01",
    "plx": "C2:00:00:00:00:02",
    "thermo": "C2:00:00:00:00:03",
    "bp": "C2:00:00:00:00:04",
}


def add_commands(groups: dict[str, argparse._SubParsersAction[argparse.ArgumentParser]]) -> None:
    """Add ``scan ble`` and ``sim wearable``."""
    from drivers.ble.testbed.peripheral import build_parser  # noqa: PLC0415

    p = groups["scan"].add_parser(
        "ble", help="nearby BLE devices with RSSI and the health services they advertise"
    )
    p.add_argument("--adapter", default="hci0", help="the adapter to scan with (default hci0)")
    p.add_argument("--seconds", type=float, default=5.0, help="how long to listen (default 5)")
    p.add_argument("--all", action="store_true", help="also list devices without a health service")
    p.set_defaults(func=cmd_scan_ble)

    p = groups["sim"].add_parser(
        "wearable", help="a simulated BLE wearable (hr, plx, thermo, bp) on the emulated radio"
    )
    build_parser(p, address_required=False)
    p.add_argument("--testbed", action="store_true", help="start a private emulated radio for it")
    p.set_defaults(func=cmd_sim_wearable)
