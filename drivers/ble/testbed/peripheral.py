"""A simulated BLE wearable: a GATT server and an advertisement on its own emulated adapter.

It speaks BlueZ's peripheral API (``GattManager1.RegisterApplication``,
``LEAdvertisingManager1.RegisterAdvertisement``) with dbus-fast service objects, so the emulated
BlueZ relays its values to the gateway exactly as a real adapter relays a real wearable's.
Pushing a value is emitting ``PropertiesChanged(Value)`` on the characteristic.

Run as a process (``python -m drivers.ble.testbed.peripheral --profile hr --address ...``, or
``edgetwin sim wearable``); it prints ``ready`` and then takes commands, one per line, on stdin:

``range out`` / ``range in``    move out of / back into radio range
``sensor off`` / ``sensor on``  contact lost (strap) or probe disconnected (oximeter) and back
                                (``--sensor-off AT:SECONDS`` schedules it, e.g. a strap slipping off)
``battery N``                   set the battery level (notified to subscribers)
``send UUID HEX``               push one raw value (UUID short or long form, HEX the bytes)
``spot``                        push a PLX spot-check (oximeter)
``rate HZ``                     measurement rate; 0 pauses
``burst N``                     push N measurements back to back, answers ``burst N SECONDS``
``quit``                        stop
Every command is answered with one line (``ok``, ``burst ...`` or ``error ...``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import math
import signal
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any

from dbus_fast import BusType, Message, MessageType, Variant
from dbus_fast.aio import MessageBus
from dbus_fast.annotations import DBusSignature
from dbus_fast.constants import PropertyAccess
from dbus_fast.service import ServiceInterface, dbus_method, dbus_property

from drivers.ble.protocol import (
    BATTERY_LEVEL,
    BATTERY_SERVICE,
    DEVICE_INFORMATION,
    DEVICE_INFORMATION_SERVICE,
    PLX_FEATURES,
    PROFILES,
    TEMPERATURE_TYPE,
    normalize_uuid,
    uuid16,
)
from drivers.ble.testbed.wearables import PulseOximeter, Wearable, make_wearable

_LOGGER = logging.getLogger("edgetwin.testbed.peripheral")

BLUEZ = "org.bluez"
Str = Annotated[str, DBusSignature("s")]
Path_ = Annotated[str, DBusSignature("o")]
Bytes = Annotated[bytes, DBusSignature("ay")]
Bool = Annotated[bool, DBusSignature("b")]
StrList = Annotated[list[str], DBusSignature("as")]
Options = Annotated[dict[str, Variant], DBusSignature("a{sv}")]
ManufacturerData = Annotated[dict[int, Variant], DBusSignature("a{qv}")]
Void = Annotated[None, DBusSignature("")]


class Characteristic(ServiceInterface):
    """org.bluez.GattCharacteristic1 served by the wearable."""

    def __init__(self, path: str, uuid: str, service: str, flags: Sequence[str], value: bytes = b"") -> None:
        super().__init__("org.bluez.GattCharacteristic1")
        self.path = path
        self._uuid = uuid
        self._service = service
        self._flags = list(flags)
        self._value = value
        self.notifying = False
        self.sent = 0

    @dbus_property(access=PropertyAccess.READ)
    def UUID(self) -> Str:  # noqa: N802 - D-Bus names
        return self._uuid

    @dbus_property(access=PropertyAccess.READ)
    def Service(self) -> Path_:  # noqa: N802
        return self._service

    @dbus_property(access=PropertyAccess.READ)
    def Flags(self) -> StrList:  # noqa: N802
        return self._flags

    @dbus_property(access=PropertyAccess.READ)
    def Value(self) -> Bytes:  # noqa: N802
        return self._value

    @dbus_property(access=PropertyAccess.READ)
    def Notifying(self) -> Bool:  # noqa: N802
        return self.notifying

    @dbus_method()
    def ReadValue(self, options: Options) -> Bytes:  # noqa: N802, ARG002
        return self._value

    @dbus_method()
    def WriteValue(self, value: Bytes, options: Options) -> Void:  # noqa: N802, ARG002
        self._value = bytes(value)

    @dbus_method()
    def StartNotify(self) -> Void:  # noqa: N802
        if not self.notifying:
            self.notifying = True
            self.emit_properties_changed({"Notifying": True})

    @dbus_method()
    def StopNotify(self) -> Void:  # noqa: N802
        if self.notifying:
            self.notifying = False
            self.emit_properties_changed({"Notifying": False})

    @dbus_method()
    def Confirm(self) -> Void:  # noqa: N802
        return

    def push(self, value: bytes) -> bool:
        """Set the value; notify or indicate it when a central subscribed. True if sent."""
        self._value = value
        if not self.notifying:
            return False
        self.emit_properties_changed({"Value": value})
        self.sent += 1
        return True


class Service(ServiceInterface):
    """org.bluez.GattService1."""

    def __init__(self, path: str, uuid: str) -> None:
        super().__init__("org.bluez.GattService1")
        self.path = path
        self._uuid = uuid

    @dbus_property(access=PropertyAccess.READ)
    def UUID(self) -> Str:  # noqa: N802
        return self._uuid

    @dbus_property(access=PropertyAccess.READ)
    def Primary(self) -> Bool:  # noqa: N802
        return True


class Advertisement(ServiceInterface):
    """org.bluez.LEAdvertisement1: the services and a (non-identifying) name."""

    def __init__(self, uuids: list[str], name: str) -> None:
        super().__init__("org.bluez.LEAdvertisement1")
        self._uuids = uuids
        self._name = name

    @dbus_property(access=PropertyAccess.READ)
    def Type(self) -> Str:  # noqa: N802
        return "peripheral"

    @dbus_property(access=PropertyAccess.READ)
    def ServiceUUIDs(self) -> StrList:  # noqa: N802
        return self._uuids

    @dbus_property(access=PropertyAccess.READ)
    def LocalName(self) -> Str:  # noqa: N802
        return self._name

    @dbus_property(access=PropertyAccess.READ)
    def Discoverable(self) -> Bool:  # noqa: N802
        return True

    @dbus_property(access=PropertyAccess.READ)
    def ManufacturerData(self) -> ManufacturerData:  # noqa: N802
        # 0xFFFF is the SIG's id for tests; present so the emulator's a{qv} handling is exercised.
        return {0xFFFF: Variant("ay", b"\x01\x02")}

    @dbus_method()
    def Release(self) -> Void:  # noqa: N802
        return


async def _call(
    bus: MessageBus, path: str, interface: str, member: str, signature: str = "", body: Sequence[Any] = ()
) -> Any:
    reply = await bus.call(
        Message(
            destination=BLUEZ,
            path=path,
            interface=interface,
            member=member,
            signature=signature,
            body=list(body),
        )
    )
    assert reply is not None
    if reply.message_type == MessageType.ERROR:
        raise RuntimeError(f"{interface}.{member} on {path}: {reply.error_name}: {reply.body}")
    return reply.body


async def find_or_add_adapter(bus: MessageBus, address: str) -> str:
    """The emulated adapter with this address, added to the emulator when it is not there yet."""
    for _ in range(32):
        (objects,) = await _call(bus, "/", "org.freedesktop.DBus.ObjectManager", "GetManagedObjects")
        used: set[int] = set()
        for path, ifaces in objects.items():
            if "org.bluez.Adapter1" in ifaces:
                used.add(int(path.rsplit("hci", 1)[1]))
                if ifaces["org.bluez.Adapter1"]["Address"].value == address:
                    return str(path)
        free = next(i for i in range(1, 256) if i not in used)
        try:
            (path,) = await _call(
                bus, "/org/bluezoo", "org.bluezoo.Manager1", "AddAdapter", "ys", (free, address)
            )
            return str(path)
        except RuntimeError as exc:
            if "AlreadyExists" not in str(exc):
                raise
    raise RuntimeError(f"could not add an emulated adapter for {address}")


class Peripheral:
    """One wearable on the emulated radio."""

    def __init__(self, wearable: Wearable, address: str, name: str, serial: str, battery: int = 87) -> None:
        self.wearable = wearable
        self.address = address
        self.name = name
        self.serial = serial
        self.battery = battery
        self.rate_hz = 1.0 / wearable.period_s
        self.chars: dict[str, Characteristic] = {}
        self.bus: MessageBus | None = None
        self.adapter_path = ""
        self.app_path = f"/edgetwin/wearable{address.replace(':', '').lower()}"
        self._push_task: asyncio.Task[None] | None = None
        #: (seconds after the start, seconds) spans of lost contact: a strap slipping off
        self.sensor_off: list[tuple[float, float]] = []
        self._contact_task: asyncio.Task[None] | None = None

    def _build(self, bus: MessageBus) -> None:
        profile = PROFILES[self.wearable.profile]
        layout: list[tuple[str, list[tuple[str, list[str], bytes]]]] = [
            (profile.service, []),
            (BATTERY_SERVICE, [(BATTERY_LEVEL, ["read", "notify"], bytes([self.battery]))]),
            (
                DEVICE_INFORMATION_SERVICE,
                [
                    (DEVICE_INFORMATION["manufacturer"], ["read"], b"Edgetwin Testbed"),
                    (DEVICE_INFORMATION["model"], ["read"], f"SIM-{profile.name.upper()}".encode()),
                    (DEVICE_INFORMATION["serial"], ["read"], self.serial.encode()),
                ],
            ),
        ]
        measures = layout[0][1]
        for uuid in profile.measurements:
            # Heart rate and PLX continuous are notified; spot checks, temperatures and blood
            # pressures are indicated, as the profiles require.
            kind = "notify" if uuid in (uuid16(0x2A37), uuid16(0x2A5F)) else "indicate"
            measures.append((uuid, [kind], b""))
        if profile.name == "plx":
            measures.append((PLX_FEATURES, ["read"], b"\x00\x00"))
        if profile.name == "thermo":
            measures.append((TEMPERATURE_TYPE, ["read"], b"\x02"))
        for si, (suuid, chars) in enumerate(layout):
            spath = f"{self.app_path}/service{si}"
            bus.export(spath, Service(spath, suuid))
            for ci, (cuuid, flags, value) in enumerate(chars):
                cpath = f"{spath}/char{ci}"
                ch = Characteristic(cpath, cuuid, spath, flags, value)
                bus.export(cpath, ch)
                self.chars[cuuid] = ch

    async def start(self) -> None:
        """Connect to the bus, get an adapter, register the GATT application and advertise."""
        bus = await MessageBus(bus_type=BusType.SYSTEM).connect()
        self.bus = bus
        self.adapter_path = await find_or_add_adapter(bus, self.address)
        self._build(bus)
        profile = PROFILES[self.wearable.profile]
        adv_path = f"{self.app_path}/advertisement"
        bus.export(adv_path, Advertisement([profile.service], self.name))
        # The application root answers GetManagedObjects for everything exported below it.
        await _call(
            bus,
            self.adapter_path,
            "org.bluez.GattManager1",
            "RegisterApplication",
            "oa{sv}",
            (self.app_path, {}),
        )
        await _call(
            bus,
            self.adapter_path,
            "org.bluez.LEAdvertisingManager1",
            "RegisterAdvertisement",
            "oa{sv}",
            (adv_path, {}),
        )
        self._restart_pusher()
        if self.sensor_off:
            self._contact_task = asyncio.get_running_loop().create_task(
                self._contact_schedule(), name="wearable-contact"
            )

    async def _contact_schedule(self) -> None:
        """Lose and regain contact on the ``sensor_off`` spans (a ``sensor`` command still works between)."""
        t0 = time.monotonic()
        edges = sorted(
            [(at, False) for at, _ in self.sensor_off] + [(at + d, True) for at, d in self.sensor_off]
        )
        for at, on in edges:
            await asyncio.sleep(max(0.0, t0 + at - time.monotonic()))
            self.wearable.sensor_on = on
            _LOGGER.info("wearable %s: sensor contact %s", self.address, "back" if on else "lost")

    def _restart_pusher(self) -> None:
        if self._push_task is not None:
            self._push_task.cancel()
        if self.rate_hz > 0:
            self._push_task = asyncio.get_running_loop().create_task(self._pusher(), name="wearable-push")

    async def _pusher(self) -> None:
        period = 1.0 / self.rate_hz
        next_t = time.monotonic()
        while True:
            next_t += period
            await asyncio.sleep(max(0.0, next_t - time.monotonic()))
            for uuid, value in self.wearable.step():
                self.chars[uuid].push(value)

    async def radio(self, member: str, signature: str, body: Sequence[Any]) -> None:
        """Call the test bed's radio controls."""
        assert self.bus is not None
        await _call(self.bus, "/org/edgetwin/testbed", "org.edgetwin.Testbed1", member, signature, body)

    async def command(self, line: str) -> str:
        """Run one control command; return the answer line."""
        words = line.split()
        if not words:
            return "error empty command"
        cmd, args = words[0], words[1:]
        if cmd == "range" and args in (["out"], ["in"]):
            await self.radio("SetInRange", "sb", (self.address, args[0] == "in"))
        elif cmd == "sensor" and args in (["off"], ["on"]):
            self.wearable.sensor_on = args[0] == "on"
        elif cmd == "battery" and len(args) == 1:
            self.battery = max(0, min(100, int(args[0])))
            self.chars[BATTERY_LEVEL].push(bytes([self.battery]))
        elif cmd == "send" and len(args) == 2:
            uuid = normalize_uuid(args[0])
            if uuid not in self.chars:
                return f"error no characteristic {args[0]}"
            if not self.chars[uuid].push(bytes.fromhex(args[1])):
                return "error not subscribed"
        elif cmd == "spot" and isinstance(self.wearable, PulseOximeter):
            uuid, value = self.wearable.spot_check()
            self.chars[uuid].push(value)
        elif cmd == "rate" and len(args) == 1:
            self.rate_hz = float(args[0])
            self._restart_pusher()
        elif cmd == "burst" and len(args) == 1:
            return await self._burst(int(args[0]))
        elif cmd == "quit":
            return "bye"
        else:
            return f"error unknown command {line.strip()!r}"
        return "ok"

    async def _burst(self, n: int) -> str:
        ch = self.chars[self.wearable.measurement]
        values: list[bytes] = []
        for _ in range(64):
            values.extend(v for u, v in self.wearable.step() if u == self.wearable.measurement)
        if not values:
            return "error nothing to send"
        assert self.bus is not None
        ping = Message(
            destination="org.freedesktop.DBus",
            path="/org/freedesktop/DBus",
            interface="org.freedesktop.DBus.Peer",
            member="Ping",
        )
        t0 = time.perf_counter()
        for i in range(n):
            ch.push(values[i % len(values)])
            if i % 32 == 31:
                # A round trip to the bus daemon drains our socket: signals are sent without
                # waiting, and a full socket buffer would break the connection.
                await self.bus.call(ping)
        await _call(self.bus, "/", "org.freedesktop.DBus.Peer", "Ping")
        return f"burst {n} {time.perf_counter() - t0:.6f}"

    async def stop(self) -> None:
        """Stop pushing and leave the bus (the emulator drops the advertisement and links)."""
        for task in (self._push_task, self._contact_task):
            if task is not None:
                task.cancel()
        if self.bus is not None:
            self.bus.disconnect()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.bus.wait_for_disconnect(), 2.0)  # type: ignore[no-untyped-call]


async def _control(peripheral: Peripheral, exit_on_eof: bool, stop: asyncio.Event) -> None:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    try:
        await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    except (ValueError, OSError):
        await stop.wait()
        return
    while not stop.is_set():
        line = await reader.readline()
        if not line:
            if exit_on_eof:
                stop.set()
            return
        try:
            answer = await peripheral.command(line.decode("utf-8", "replace"))
        except Exception as exc:  # noqa: BLE001 - a bad command must not kill the wearable
            answer = f"error {type(exc).__name__}: {exc}"
        print(answer, flush=True)  # noqa: T201 - the control channel
        if answer == "bye":
            stop.set()


async def run(args: argparse.Namespace) -> int:
    """Start the wearable and serve commands until told to stop."""
    wearable = make_wearable(args.profile, args.seed, Path(args.data) if args.data else None)
    if args.interval is not None:
        wearable.period_s = args.interval
    name = args.name or f"SIM-{args.profile.upper()}"
    peripheral = Peripheral(
        wearable, args.address.upper(), name, args.serial or f"SN{args.seed:06d}", args.battery
    )
    if args.rate is not None:
        peripheral.rate_hz = args.rate
    peripheral.sensor_off = list(args.sensor_off)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await peripheral.start()
    print(f"ready {peripheral.adapter_path.rsplit('/', 1)[1]}", flush=True)  # noqa: T201 - the parent waits for this
    control = loop.create_task(_control(peripheral, args.exit_on_eof, stop), name="wearable-control")
    await stop.wait()
    control.cancel()
    await peripheral.stop()
    return 0


def _span(text: str) -> tuple[float, float]:
    """``AT:SECONDS`` as two non-negative numbers (argparse type)."""
    try:
        at, seconds = (float(x) for x in text.split(":"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected AT:SECONDS, e.g. 40:15") from None
    if not (at >= 0 and seconds > 0 and math.isfinite(at + seconds)):
        raise argparse.ArgumentTypeError(f"{text!r}: AT must be >= 0 and SECONDS > 0")
    return at, seconds


def build_parser(
    parser: argparse.ArgumentParser | None = None, *, address_required: bool = True
) -> argparse.ArgumentParser:
    """Arguments of a simulated wearable (shared with ``edgetwin sim wearable``)."""
    p = parser or argparse.ArgumentParser(description="a simulated BLE wearable on the emulated radio")
    p.add_argument("--profile", choices=sorted(PROFILES), required=True, help="the GATT profile to simulate")
    p.add_argument(
        "--address", required=address_required, help="the wearable's BLE address, e.g. C2:00:00:00:00:01"
    )
    p.add_argument("--name", help="advertised name (not an identity)")
    p.add_argument("--serial", help="Device Information serial number")
    p.add_argument("--seed", type=int, default=0, help="random seed of the simulated measurements")
    p.add_argument("--battery", type=int, default=87, help="battery level reported, in percent")
    p.add_argument("--rate", type=float, help="measurements per second (default: the profile's)")
    p.add_argument(
        "--interval", type=float, help="simulated seconds per measurement (default: the profile's)"
    )
    p.add_argument(
        "--sensor-off",
        type=_span,
        action="append",
        default=[],
        metavar="AT:SECONDS",
        help="lose sensor contact AT seconds after the start for SECONDS (repeatable): a strap "
        "slipping off clears the Heart Rate Measurement's contact bit, an oximeter's probe reports "
        "disconnected (default: never)",
    )
    p.add_argument("--data", help="directory of MIT-BIH record 100 (100.hea, 100.atr) for the strap's RR")
    p.add_argument("--exit-on-eof", action="store_true", help="stop when stdin closes")
    p.add_argument("-v", "--verbose", action="store_true", help="log what the wearable does")
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m drivers.ble.testbed.peripheral``."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING, stream=sys.stderr)
    return asyncio.run(run(args))


if __name__ == "__main__":
    sys.exit(main())
