"""The emulated BlueZ: the ``bluezoo`` D-Bus emulator, started with the harness's fixes and controls.

Run as its own process on a private bus (``python -m drivers.ble.testbed.emulator -a ADDR ...``
with ``DBUS_SYSTEM_BUS_ADDRESS`` set); it prints ``ready`` once ``org.bluez`` is served. ``bluezoo``
(GPL-2.0) is a test and demo dependency that is imported here at run time and extended by
subclassing; none of its code is part of this project, and the gateway never imports this module.

Fixes over stock bluezoo 1.0.2 (see the design note on BLE testing):

1. disconnect removes the GATT objects of the link and clears ``ServicesResolved``, so a second
   connect can export them again;
2. the discovery task re-announces known devices (an RSSI change on every tick), as a radio that
   keeps hearing advertisements does;
3. connecting to a device that does not advertise (out of range, powered off) fails after a page
   timeout instead of succeeding;
4. the scan interval takes fractions of a second;
5. ``StartNotify`` towards a peripheral that has no ``AcquireNotify`` support always takes the
   ``PropertiesChanged`` path, whatever its ``Notifying`` says; notifications are not confirmed
   (only indications are), and the peripheral is told ``StopNotify`` when the link goes;
6. when a peripheral's bus connection goes away (process died), its links are dropped;
7. ``Connected=False`` is emitted after the reply to ``Disconnect``;
8. ``ManufacturerData`` is typed ``a{qv}`` as in BlueZ, and one bad advertisement never stops a scan.

Controls (``org.edgetwin.Testbed1`` at ``/org/edgetwin/testbed``): range, link drops, injected
``Connect`` faults (BlueZ error names, delays for timeouts), a scan that goes quiet until it is
restarted, and counters of what the central did.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import random
import signal
import sys
from collections import Counter
from dataclasses import dataclass
from typing import Any

import sdbus
from bluezoo import bluezoo as bz  # type: ignore[import-untyped]
from bluezoo import events
from bluezoo import exceptions as bzerr
from bluezoo.adapter import Adapter  # type: ignore[import-untyped]
from bluezoo.device import Device  # type: ignore[import-untyped]
from bluezoo.gatt import (  # type: ignore[import-untyped]
    GattCharacteristicClient,
    GattCharacteristicClientLink,
    GattDescriptorClient,
    GattDescriptorClientLink,
    GattServiceClient,
    GattServiceClientLink,
)
from bluezoo.interfaces.Device import DeviceInterface  # type: ignore[import-untyped]
from bluezoo.interfaces.LEAdvertisement import LEAdvertisementInterface  # type: ignore[import-untyped]
from bluezoo.utils import BluetoothAddress, BluetoothUUID  # type: ignore[import-untyped]

_LOGGER = logging.getLogger("edgetwin.testbed.emulator")

TESTBED_PATH = "/org/edgetwin/testbed"
TESTBED_INTERFACE = "org.edgetwin.Testbed1"

# Fix 8: BlueZ types manufacturer data as company id (uint16) -> bytes. Export vtables are built
# from these attributes when an object is exported, so setting them before any export suffices.
for _cls in (DeviceInterface, Device, LEAdvertisementInterface):
    _cls.ManufacturerData.property_signature = "a{qv}"
for _cls in (LEAdvertisementInterface,):
    _cls.ScanResponseManufacturerData.property_signature = "a{qv}"


def _error_class(name: str) -> type[Exception]:
    """The sdbus exception class that replies with D-Bus error ``name``."""
    for obj in vars(bzerr).values():
        if isinstance(obj, type) and getattr(obj, "dbus_error_name", None) == name:
            return obj
    cls = _DYNAMIC_ERRORS.get(name)
    if cls is None:
        cls = type(f"Injected{len(_DYNAMIC_ERRORS)}", (sdbus.DbusFailedError,), {"dbus_error_name": name})
        _DYNAMIC_ERRORS[name] = cls
    return cls


_DYNAMIC_ERRORS: dict[str, type[Exception]] = {}


@dataclass
class Fault:
    """An injected Connect failure: reply ``error`` after ``delay_s``; ``count`` 0 = until removed."""

    error: str
    message: str
    count: int
    delay_s: float


class Radio:
    """What the air between the adapters looks like: range, faults, counters."""

    def __init__(self, page_timeout_s: float) -> None:
        self.page_timeout_s = page_timeout_s
        self.out_of_range: set[str] = set()
        self.faults: dict[str, Fault] = {}
        self.silent: set[int] = set()
        self.counters: Counter[str] = Counter()

    def in_range(self, peer_adapter: Any) -> bool:
        """A peripheral can be heard: powered, advertising, not moved away."""
        return bool(
            peer_adapter.powered
            and peer_adapter.advertisements
            and peer_adapter.address not in self.out_of_range
        )

    async def before_connect(self, device: Any) -> None:
        """Apply injected faults and range to a Connect request."""
        addr = device.address
        self.counters[f"connect:{addr}"] += 1
        fault = self.faults.get(addr)
        if fault is not None:
            if fault.count > 0:
                fault.count -= 1
                if fault.count == 0:
                    del self.faults[addr]
            if fault.delay_s:
                await asyncio.sleep(fault.delay_s)
            self.counters[f"fault:{addr}"] += 1
            raise _error_class(fault.error)(fault.message)
        if not self.in_range(device.peer_adapter):
            await asyncio.sleep(self.page_timeout_s)
            self.counters[f"page_timeout:{addr}"] += 1
            raise bzerr.DBusBluezFailedError("Page Timeout")

    def removed(self, address: str) -> None:
        """The central removed a device: stale state is gone, so sticky faults go too."""
        self.counters[f"remove:{address}"] += 1
        fault = self.faults.get(address)
        if fault is not None and fault.count == 0:
            del self.faults[address]


RADIO = Radio(page_timeout_s=0.5)
_BACKGROUND: set[asyncio.Task[Any]] = set()


def _spawn(coro: Any, name: str) -> None:
    task = asyncio.get_running_loop().create_task(coro, name=name)
    _BACKGROUND.add(task)
    task.add_done_callback(_BACKGROUND.discard)


class CharacteristicLink(GattCharacteristicClientLink):  # type: ignore[misc]
    """Fix 5: relay values by PropertiesChanged; confirm indications only."""

    def __init__(self, client: Any, service: Any) -> None:
        super().__init__(client, service)
        self.subscribed = False

    @sdbus.dbus_method_async_override()
    async def StartNotify(self) -> None:  # noqa: N802 - D-Bus names
        if self.client.NotifyAcquired.get() is not None:
            await super().StartNotify()
            return
        if not self.subscribed:
            indicate = "indicate" in (self.client.Flags.get([]) or [])

            async def relay(properties: dict[str, Any]) -> None:
                if "Value" in properties:
                    await self.Value.set_async(properties["Value"])
                    if indicate:
                        with contextlib.suppress(Exception):
                            await self.client.Confirm()

            self.client_props_changed_subscription = events.subscribe(
                f"properties:changed:{id(self.client)}", relay
            )
            self.subscribed = True
        if not self.client.Notifying.get(False):
            await self.client.StartNotify()
        self.client.Notifying.cache(True)

    @sdbus.dbus_method_async_override()
    async def StopNotify(self) -> None:  # noqa: N802 - D-Bus names
        await self.unlink()

    async def unlink(self) -> None:
        """Stop relaying; tell the peripheral, which may already be gone."""
        if not self.subscribed:
            return
        self.client_props_changed_subscription.unsubscribe()
        self.subscribed = False
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.client.StopNotify(), 1.0)
        self.client.Notifying.cache(False)


class RadioDevice(Device):  # type: ignore[misc]
    """A remote device as the central sees it, with fixes 1, 3, 6 and 7."""

    def __init__(self, peer_adapter: Any, **kwargs: Any) -> None:
        super().__init__(peer_adapter, **kwargs)
        self.link_owners: set[str] = set()

    def attach_to_adapter(self, adapter: Any) -> None:
        self.peer = RadioDevice(adapter)
        self.adapter = adapter

    async def connect(self, uuid: str | None = None) -> None:  # noqa: ARG002 - the parent's signature
        await RADIO.before_connect(self)
        if self.connected:
            return
        mock = self.peer_adapter.mock
        await self.peer_adapter.add_device(self.peer)
        await self.peer.Connected.set_async(True)
        await self.Connected.set_async(True)
        self.link_owners = {sender for sender, _ in self.peer_adapter.gatt_apps}
        for app in list(self.peer_adapter.gatt_apps.values()):
            links: dict[str, Any] = {}
            for path in sorted(app.objects):
                obj = app.objects[path]
                if isinstance(obj, GattServiceClient):
                    link: Any = GattServiceClientLink(obj, self)
                elif isinstance(obj, GattCharacteristicClient):
                    link = CharacteristicLink(obj, links[obj.Service.get()])
                elif isinstance(obj, GattDescriptorClient):
                    link = GattDescriptorClientLink(obj, links[obj.Characteristic.get()])
                else:
                    continue
                mock.export_object(link.get_object_path(), link)
                self.services[link.get_object_path()] = link
                links[path] = link
        await self.peer.ServicesResolved.set_async(True)
        await self.ServicesResolved.set_async(True)
        RADIO.counters[f"connected:{self.address}"] += 1

    async def disconnect(self, uuid: str | None = None) -> None:  # noqa: ARG002 - the parent's signature
        self.connecting_task.cancel()
        was = self.connected
        if self.peer is not None and self.peer.connected:
            await self.peer.Connected.set_async(False)
        if self.connected:
            await self.Connected.set_async(False)
        if self.services_resolved:
            await self.ServicesResolved.set_async(False)
        if self.peer is not None and self.peer.services_resolved:
            await self.peer.ServicesResolved.set_async(False)
        mock = self.peer_adapter.mock
        # Children before parents: descriptors, characteristics, then services (longest paths first).
        for path in sorted(self.services, key=len, reverse=True):
            link = self.services.pop(path)
            if isinstance(link, CharacteristicLink):
                await link.unlink()
            with contextlib.suppress(KeyError):
                mock.remove_object(link)
        self.link_owners = set()
        if was:
            RADIO.counters[f"disconnected:{self.address}"] += 1

    @sdbus.dbus_method_async_override()
    async def Disconnect(self) -> None:  # noqa: N802 - D-Bus names
        # Fix 7: the reply goes out first, then the link goes down.
        async def later() -> None:
            await asyncio.sleep(0.005)
            await self.disconnect()

        _spawn(later(), "disconnect")

    @sdbus.dbus_property_async_override()
    def RSSI(self) -> int:  # noqa: N802 - D-Bus names
        return int(self.rssi)

    @RSSI.setter_private
    def _rssi_setter(self, value: int) -> None:
        self.rssi = value


class RadioAdapter(Adapter):  # type: ignore[misc]
    """An adapter whose RemoveDevice clears stale state and whose scan can be made to go quiet."""

    @sdbus.dbus_method_async_override()
    async def RemoveDevice(self, device: str) -> None:  # noqa: N802 - D-Bus names
        dev = self.devices.get(device)
        if dev is None:
            raise bzerr.DBusBluezDoesNotExistError("Does Not Exist")
        RADIO.removed(dev.address)
        await self.del_device(dev)

    @sdbus.dbus_method_async_override()
    async def StartDiscovery(self) -> None:  # noqa: N802 - D-Bus names
        RADIO.silent.discard(self.id)
        await super().StartDiscovery()


def _adv_props(adv: Any) -> dict[str, Any]:
    mdata = adv.ManufacturerData.get({}) or {}
    return {
        "name_": adv.LocalName.get(None),
        "appearance": adv.Appearance.get(0) or 0,
        "uuids": [BluetoothUUID(x) for x in adv.ServiceUUIDs.get([]) or []],
        "manufacturer_data": {int(k): v for k, v in mdata.items()},
        "service_data": {BluetoothUUID(k): v for k, v in (adv.ServiceData.get({}) or {}).items()},
        "tx_power": adv.TxPower.get(None),
    }


class RadioService(bz.BluezMockService):  # type: ignore[misc]
    """bluezoo's service with our adapters, discovery (fixes 2, 4, 8) and link loss (fix 6)."""

    def __init__(self, scan_interval_s: float) -> None:
        super().__init__(True, 1)
        self.scan_interval_s = scan_interval_s
        self.testbed = TestbedControl(self)
        self.testbed.export_to_dbus(TESTBED_PATH)

    async def add_adapter(self, id: int, address: str) -> Any:  # noqa: A002 - the parent's signature
        adapter = RadioAdapter(self, id, address)
        _LOGGER.info("adding adapter hci%d %s", id, address)
        self.export_object(adapter.get_object_path(), adapter)
        self.adapters[id] = adapter
        await adapter.Powered.set_async(True)
        return adapter

    async def _service_lost_task(self) -> None:
        async for _, old, new in self.dbus.name_owner_changed.catch():
            if old and not new:
                events.emit(f"service:lost:{old}")
                await self.drop_links_of(old)

    async def drop_links_of(self, owner: str) -> None:
        """Fix 6: the peripheral's process is gone, so are its links."""
        for adapter in list(self.adapters.values()):
            for dev in list(adapter.devices.values()):
                if owner in getattr(dev, "link_owners", set()):
                    _LOGGER.info("peripheral %s lost its bus: dropping the link to %s", owner, dev.address)
                    await dev.disconnect()

    def create_discovering_task(self, id: int) -> asyncio.Task[None]:  # noqa: A002 - the parent's signature
        scanner = self.adapters[id]

        async def tick() -> None:
            if id in RADIO.silent:
                return
            for other in list(self.adapters.values()):
                if other.id == id or not RADIO.in_range(other):
                    continue
                adv = next(iter(other.advertisements.values()))
                props = _adv_props(adv)
                path = f"{scanner.get_object_path()}/dev_{other.address.replace(':', '_')}"
                known = scanner.devices.get(path)
                if known is None:
                    dev = RadioDevice(other, is_le=True, **props)
                    dev.rssi = -50 - random.randint(0, 20)
                    await scanner.add_device(dev)
                    continue
                for key in ("uuids", "service_data", "manufacturer_data"):
                    if getattr(known, key) != props[key]:
                        await getattr(
                            known,
                            {"uuids": "UUIDs", "service_data": "ServiceData"}.get(key, "ManufacturerData"),
                        ).set_async(props[key])
                # Fix 2: a fresh reading of the signal announces the device again.
                rssi = -50 - random.randint(0, 20)
                if rssi == known.rssi:
                    rssi -= 1
                await known.RSSI.set_async(rssi)

        async def task() -> None:
            while True:
                try:
                    await tick()
                except asyncio.CancelledError:
                    raise
                except Exception:
                    _LOGGER.exception("scan tick on hci%d failed; scanning goes on", id)
                await asyncio.sleep(self.scan_interval_s)

        return asyncio.get_running_loop().create_task(task(), name=f"discovery-hci{id}")


class TestbedControl(sdbus.DbusInterfaceCommonAsync, interface_name=TESTBED_INTERFACE):
    """What a test can do to the air."""

    def __init__(self, service: RadioService) -> None:
        super().__init__()
        self.service = service

    def _devices(self, address: str) -> list[Any]:
        return [
            dev
            for adapter in self.service.adapters.values()
            for dev in adapter.devices.values()
            if dev.address == address
        ]

    @sdbus.dbus_method_async(input_signature="sb", flags=sdbus.DbusUnprivilegedFlag)
    async def SetInRange(self, address: str, in_range: bool) -> None:  # noqa: N802 - D-Bus names
        """Move a peripheral out of (or back into) range: out of range drops its links."""
        if in_range:
            RADIO.out_of_range.discard(address)
            return
        RADIO.out_of_range.add(address)
        for dev in self._devices(address):
            await dev.disconnect()

    @sdbus.dbus_method_async(input_signature="s", flags=sdbus.DbusUnprivilegedFlag)
    async def DropLink(self, address: str) -> None:  # noqa: N802 - D-Bus names
        """Drop every link to a peripheral, as a supervision timeout does."""
        for dev in self._devices(address):
            await dev.disconnect()

    @sdbus.dbus_method_async(input_signature="sssud", flags=sdbus.DbusUnprivilegedFlag)
    async def InjectConnectFault(  # noqa: N802 - D-Bus names
        self, address: str, error: str, message: str, count: int, delay_s: float
    ) -> None:
        """Fail the next ``count`` Connects (0: until the central removes the device)."""
        RADIO.faults[address] = Fault(error, message, count, delay_s)

    @sdbus.dbus_method_async(input_signature="s", flags=sdbus.DbusUnprivilegedFlag)
    async def ClearFaults(self, address: str) -> None:  # noqa: N802 - D-Bus names
        """Forget injected faults for a peripheral."""
        RADIO.faults.pop(address, None)

    @sdbus.dbus_method_async(input_signature="yb", flags=sdbus.DbusUnprivilegedFlag)
    async def SilenceScan(self, adapter_id: int, silent: bool) -> None:  # noqa: N802 - D-Bus names
        """Make discovery on an adapter report nothing until the scan is restarted."""
        if silent:
            RADIO.silent.add(adapter_id)
        else:
            RADIO.silent.discard(adapter_id)

    @sdbus.dbus_method_async(result_signature="a{su}", flags=sdbus.DbusUnprivilegedFlag)
    async def Counters(self) -> dict[str, int]:  # noqa: N802 - D-Bus names
        """What the central did: connect:<addr>, remove:<addr>, fault:<addr>, ..."""
        return dict(RADIO.counters)

    @sdbus.dbus_method_async(result_signature="", flags=sdbus.DbusUnprivilegedFlag)
    async def ResetCounters(self) -> None:  # noqa: N802 - D-Bus names
        """Start counting afresh."""
        RADIO.counters.clear()


async def _serve(adapters: list[str], scan_interval_s: float, stop: asyncio.Event) -> None:
    bus = sdbus.sd_bus_open_system()
    sdbus.set_default_bus(bus)
    await bus.request_name_async("org.bluez", 0)
    service = RadioService(scan_interval_s)
    for i, address in enumerate(adapters):
        await service.add_adapter(i, address)
    print("ready", flush=True)  # noqa: T201 - the parent waits for this line
    await stop.wait()
    with contextlib.suppress(Exception):
        await asyncio.wait_for(service.cleanup(), 2.0)
    bus.close()


def main(argv: list[str] | None = None) -> int:
    """Entry point: serve org.bluez on the bus in DBUS_SYSTEM_BUS_ADDRESS until SIGTERM."""
    parser = argparse.ArgumentParser(description="emulated BlueZ for the BLE test bed")
    parser.add_argument(
        "-a", "--adapter", dest="adapters", action="append", type=BluetoothAddress, default=[]
    )
    parser.add_argument("--scan-interval", type=float, default=0.2)
    parser.add_argument("--page-timeout", type=float, default=0.5)
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING,
        stream=sys.stderr,
        format="emulator %(levelname)s %(name)s: %(message)s",
    )
    RADIO.page_timeout_s = args.page_timeout
    loop = asyncio.new_event_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        loop.run_until_complete(_serve(list(args.adapters), args.scan_interval, stop))
    finally:
        loop.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
