"""The connection manager: one scanner, a slot budget, and a self-healing loop per wearable.

Field experience with BlueZ (Home Assistant's Bluetooth stack runs into all of it) shapes the
policy:

* An adapter holds 5-7 connections in all; past that ``Connect`` fails in odd ways. The source
  takes at most ``slots`` of them and a device beyond the budget waits, saying so.  Waiting is
  bounded: a device that has waited ``slot_turn_s`` takes the slot of the device that has held
  one longest (at least ``slot_turn_s``), which queues in turn; so a wearable that left and came
  back while another took its slot is not shut out for the rest of the run.
* A connection cycle makes at most ``max_connect_attempts`` attempts (one BlueZ ``Connect`` and
  service discovery each, at most ``connect_timeout_s``) within ``connect_budget_s`` all told,
  through ``bleak-retry-connector``.
* ``org.bluez.Error.InProgress`` means BlueZ holds stale state for the device: only removing the
  device clears it, so the device is removed, heard again, and the attempt repeated.
* A scan can go quiet without an error: a watchdog restarts a scan that has reported nothing for
  ``scan_watchdog_s`` while a device is being looked for.
* A connected link can go quiet too (the wearable's notification loop stops, or BlueZ lost the
  subscription): a device that streams continuously and sent nothing for ``lost_after_s`` while
  connected has its link dropped, so it is connected and subscribed afresh.  Spot-check devices
  (thermometers, cuffs) speak only when measured: their silence is not a fault.
* Liveness: the watch loop, which enforces every bound above, beats the source's ``pulse`` each
  tick; starting and restarting the scan are declared waits (see ``gateway.liveness``).
* A lost link is retried as soon as the device is heard again, with capped, jittered exponential
  backoff between failed cycles; a device away for ``lost_after_s`` raises one SENSOR_LOST alarm,
  and SENSOR_RESTORED when it is back.

Adapter-level failures (adapter gone, BlueZ unreachable) are not retried here: they raise
:class:`~gateway.errors.TransientError` and the supervisor restarts the source.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import enum
import logging
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from bleak import BleakClient, BleakScanner
from bleak.backends.device import BLEDevice
from bleak.backends.scanner import AdvertisementData
from bleak.exc import BleakDBusError, BleakDeviceNotFoundError, BleakError
from bleak_retry_connector import (
    BleakClientWithServiceCache,
    BleakNotFoundError,
    calculate_backoff_time,
    establish_connection,
)
from dbus_fast import BusType, Message, MessageType
from dbus_fast.aio import MessageBus

from drivers.ble.config import BleConfig
from drivers.ble.protocol import Profile
from gateway.backoff import Backoff
from gateway.errors import TransientError
from gateway.liveness import Pulse

_LOGGER = logging.getLogger(__name__)

IN_PROGRESS = "org.bluez.Error.InProgress"
#: D-Bus errors that mean the adapter or BlueZ itself is unusable: the supervisor's business.
ADAPTER_ERRORS = frozenset(
    {
        "org.freedesktop.DBus.Error.ServiceUnknown",
        "org.freedesktop.DBus.Error.NoReply",
        "org.bluez.Error.NotReady",
    }
)
DISCONNECT_TIMEOUT_S = 5.0
SCANNER_TIMEOUT_S = 10.0
#: The watch loop ticks at most every second and the scan calls declare their bounds: 5 s with
#: neither is a manager stuck outside any known wait.
PULSE_STALE_S = 5.0


class DeviceState(enum.StrEnum):
    """Where a wearable is in its connection life; the values are status tokens."""

    SCANNING = "scanning"  # waiting to hear the device advertise
    WAITING_SLOT = "waiting_slot"  # heard, but every connection slot of the source is taken
    CONNECTING = "connecting"
    CONNECTED = "connected"
    BACKOFF = "backoff"  # a connection cycle failed; waiting before the next one
    STOPPED = "stopped"


# -- pure policy -----------------------------------------------------------------------------------


class ScanWatchdog:
    """Decides when a scan that reports nothing is to be restarted."""

    def __init__(self, timeout_s: float) -> None:
        self.timeout_s = timeout_s
        self.last_heard = time.monotonic()
        self.restarts = 0

    def heard(self, now: float) -> None:
        """The scan reported something."""
        self.last_heard = now

    def due(self, now: float, looking: bool) -> bool:
        """True when a device is being looked for and the scan has been quiet too long."""
        return looking and now - self.last_heard >= self.timeout_s

    def restarted(self, now: float) -> None:
        """The scan was restarted: the quiet spell is measured afresh."""
        self.restarts += 1
        self.last_heard = now


def root_error(exc: BaseException) -> BaseException:
    """The innermost cause of a wrapped connection error (bleak-retry-connector wraps BlueZ's)."""
    seen = 0
    while seen < 10:
        inner = exc.__cause__ or exc.__context__
        if inner is None or isinstance(inner, asyncio.CancelledError):
            return exc
        exc = inner
        seen += 1
    return exc


def dbus_error_name(exc: BaseException) -> str | None:
    """The BlueZ/D-Bus error name somewhere in the cause chain, if any."""
    e: BaseException | None = exc
    for _ in range(10):
        if e is None:
            return None
        if isinstance(e, BleakDBusError):
            return e.dbus_error
        e = e.__cause__ or e.__context__
    return None


def classify(exc: BaseException) -> str:
    """A failure token for a connection attempt: in_progress, timeout, not_found, adapter, failed."""
    name = dbus_error_name(exc)
    if name == IN_PROGRESS:
        return "in_progress"
    if name in ADAPTER_ERRORS:
        return "adapter"
    root = root_error(exc)
    if isinstance(exc, TimeoutError) or isinstance(root, TimeoutError):
        return "timeout"
    if isinstance(exc, (BleakNotFoundError, BleakDeviceNotFoundError)) or isinstance(
        root, (BleakNotFoundError, BleakDeviceNotFoundError)
    ):
        return "not_found"
    if isinstance(root, (EOFError, BrokenPipeError, ConnectionError)):
        return "adapter"
    return "failed"


#: Failures that say nothing answered: the device is away rather than refusing.
UNREACHABLE = frozenset({"timeout", "not_found", "page_timeout"})


class SlotBudget:
    """At most ``slots`` connections at once; waiters are served first come, first served."""

    def __init__(self, slots: int) -> None:
        self.slots = slots
        self.holders: set[str] = set()
        self.held_since: dict[str, float] = {}  # holder -> when it took its slot (monotonic)
        self._waiters: collections.OrderedDict[str, asyncio.Future[None]] = collections.OrderedDict()
        self._queued_at: dict[str, float] = {}

    def _hold(self, address: str) -> None:
        self.holders.add(address)
        self.held_since[address] = time.monotonic()

    def turn_due(self, now: float, turn_s: float) -> list[str]:
        """Holders that should give their slot to the first waiter now, longest holder first.

        Empty unless the first waiter has waited ``turn_s``; only holders that have held their
        slot ``turn_s`` or longer are listed.
        """
        if not self._waiters:
            return []
        first = next(iter(self._waiters))
        if now - self._queued_at.get(first, now) < turn_s:
            return []
        return sorted(
            (a for a in self.holders if now - self.held_since.get(a, now) >= turn_s),
            key=lambda a: self.held_since[a],
        )

    @property
    def used(self) -> int:
        """Slots in use."""
        return len(self.holders)

    @property
    def waiting(self) -> tuple[str, ...]:
        """Addresses waiting for a slot, first first."""
        return tuple(self._waiters)

    def try_acquire(self, address: str) -> bool:
        """Take a slot now if one is free and nobody waits ahead."""
        if address in self.holders:
            return True
        if len(self.holders) < self.slots and not self._waiters:
            self._hold(address)
            return True
        return False

    async def acquire(self, address: str) -> None:
        """Wait for a slot (cancellable)."""
        if self.try_acquire(address):
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters[address] = fut
        self._queued_at[address] = time.monotonic()
        try:
            await fut
        except BaseException:
            if self._waiters.get(address) is fut:
                del self._waiters[address]
                self._queued_at.pop(address, None)
            elif fut.done() and not fut.cancelled():
                # The slot was handed over just as we were cancelled: give it back.
                self.release(address)
            raise

    def release(self, address: str) -> None:
        """Give a slot back; the first waiter gets it."""
        if address not in self.holders:
            return
        self.holders.discard(address)
        self.held_since.pop(address, None)
        while self._waiters and len(self.holders) < self.slots:
            nxt, fut = self._waiters.popitem(last=False)
            self._queued_at.pop(nxt, None)
            if fut.done():
                continue
            self._hold(nxt)
            fut.set_result(None)


# -- the managed device ----------------------------------------------------------------------------


@dataclass
class ManagedDevice:
    """One allowlisted wearable and everything the manager knows about it (local only)."""

    address: str
    profile: Profile
    subject: str
    state: DeviceState = DeviceState.SCANNING
    since: float = field(default_factory=time.monotonic)
    down_since: float = field(default_factory=time.monotonic)
    heard_at: float | None = None
    rssi: int | None = None
    ble_device: BLEDevice | None = None
    attempts: int = 0  # Connect attempts in all
    cycles_failed: int = 0
    connections: int = 0
    last_error: str | None = None  # failure token of the last attempt
    lost: bool = False  # a SENSOR_LOST alarm is standing
    lost_as: str | None = None  # the cause that alarm named
    lost_told_at: float = 0.0  # when it (or its last cause update) was raised
    slot_warned: bool = False  # the first wait for a slot is a warning, the later ones are not
    info: dict[str, str] = field(default_factory=dict)  # Device Information: local only
    battery: int | None = None
    heard: asyncio.Event = field(default_factory=asyncio.Event)
    continuous: bool = True  # streams without being asked (False: spot checks, silence is normal)
    quiet_told: bool = False  # a quiet link was logged at WARNING; repeats go to DEBUG until data
    last_data: float = 0.0  # when its last measurement arrived (monotonic)
    connected_at: float = 0.0
    _path: str | None = None

    @property
    def label(self) -> str:
        """A local label for logs: profile and address (never sent)."""
        return f"{self.profile.name}@{self.address}"

    def lost_cause(self) -> str:
        """Why the device is away, as an alarm token."""
        if self.last_error == "wrong_service":
            return "wrong_service"
        if self.state == DeviceState.WAITING_SLOT:
            return "waiting_slot"  # heard and ready: it never tried, every slot is taken
        if self.heard_at is None or self.heard_at < self.down_since or self.last_error in UNREACHABLE:
            return "out_of_range"
        return "connect_failed"


class LinkHandler(Protocol):
    """What the driver does with the manager's devices."""

    async def session(self, dev: ManagedDevice, client: BleakClient) -> None:
        """Use a connected device until cancelled; raise WrongServiceError if it is not the wearable."""

    def changed(self, dev: ManagedDevice, slots_used: int, slots: int) -> None:
        """The device's state changed."""

    def lost(self, dev: ManagedDevice, cause: str) -> None:
        """The device has been away for ``lost_after_s``."""

    def restored(self, dev: ManagedDevice) -> None:
        """A lost device is connected again."""


class WrongServiceError(BleakError):
    """An allowlisted address does not offer its profile's service."""


@dataclass(frozen=True, slots=True)
class DeviceStatus:
    """A snapshot of one device for status displays (local only: it holds the address)."""

    address: str
    profile: str
    subject: str
    state: str
    for_s: float
    attempts: int
    connections: int
    last_error: str | None
    rssi: int | None
    battery: int | None
    lost: bool


# -- the manager -----------------------------------------------------------------------------------


class ConnectionManager:
    """Scanner, slot budget, watchdog and one connection loop per allowlisted device."""

    def __init__(
        self,
        cfg: BleConfig,
        devices: Sequence[ManagedDevice],
        handler: LinkHandler,
        *,
        name: str,
        rng: random.Random | None = None,
    ) -> None:
        self.cfg = cfg
        self.name = name
        self.devices = {d.address: d for d in devices}
        self.handler = handler
        self.slots = SlotBudget(cfg.slots)
        self.watchdog = ScanWatchdog(cfg.scan_watchdog_s)
        self._rng = rng or random.Random()
        self._scanner: BleakScanner | None = None
        self._clients: dict[str, BleakClient] = {}
        self._link_down: dict[str, asyncio.Event] = {}  # connected devices: set to end the link
        self._turn_over: set[str] = set()  # devices told to give their slot to a waiting one
        self._quiet: set[str] = set()  # connected devices whose link was dropped for silence
        self._bus: MessageBus | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._fatal: asyncio.Future[None] | None = None
        self._quiet_logged = False
        self._services = sorted({d.profile.service for d in devices})
        self.pulse = Pulse(stale_after_s=PULSE_STALE_S)

    # -- status ------------------------------------------------------------------------------------

    def status(self) -> dict[str, DeviceStatus]:
        """A snapshot of every device, by address."""
        now = time.monotonic()
        return {
            d.address: DeviceStatus(
                d.address,
                d.profile.name,
                d.subject,
                d.state.value,
                now - d.since,
                d.attempts,
                d.connections,
                d.last_error,
                d.rssi,
                d.battery,
                d.lost,
            )
            for d in self.devices.values()
        }

    def _set(self, dev: ManagedDevice, state: DeviceState) -> None:
        if dev.state == state:
            return
        dev.state = state
        dev.since = time.monotonic()
        if state == DeviceState.WAITING_SLOT:
            log = _LOGGER.debug if dev.slot_warned else _LOGGER.warning
            dev.slot_warned = True
            log(
                "ble %s: %s waits for a connection slot: %d of %d in use on %s; raise 'slots' if the "
                "adapter has room, or move devices to another adapter",
                self.name,
                dev.label,
                self.slots.used,
                self.slots.slots,
                self.cfg.adapter,
            )
        else:
            _LOGGER.debug("ble %s: %s is %s", self.name, dev.label, state.value)
        self.handler.changed(dev, self.slots.used, self.slots.slots)

    # -- scanning ----------------------------------------------------------------------------------

    def _on_advertisement(self, device: BLEDevice, adv: AdvertisementData) -> None:
        now = time.monotonic()
        self.watchdog.heard(now)
        self._quiet_logged = False
        dev = self.devices.get(device.address.upper())
        if dev is None:
            return  # never a stranger, whatever it calls itself
        if dev.profile.service not in {u.lower() for u in adv.service_uuids}:
            # The address is allowlisted but the advertisement lacks the profile's service.
            if dev.last_error != "wrong_service":
                _LOGGER.warning(
                    "ble %s: %s advertises no %s service: not connecting; check the address and profile",
                    self.name,
                    dev.label,
                    dev.profile.name,
                )
                dev.last_error = "wrong_service"
            return
        path = device.details.get("path") if isinstance(device.details, dict) else None
        # BlueZ repeats a device's properties on any change (a disconnect included); a fresh
        # advertisement shows as a new RSSI reading or a new device object.
        fresh = adv.rssi != dev.rssi or path != dev._path
        dev.ble_device = device
        dev._path = path
        dev.rssi = adv.rssi
        if fresh:
            dev.heard_at = now
            dev.heard.set()

    async def _start_scanner(self) -> None:
        scanner = BleakScanner(
            self._on_advertisement,
            service_uuids=self._services,
            scanning_mode="active",
            bluez={"adapter": self.cfg.adapter},
        )
        try:
            with self.pulse.waiting("starting the scan", SCANNER_TIMEOUT_S):
                async with asyncio.timeout(SCANNER_TIMEOUT_S):
                    await scanner.start()
        except (BleakError, TimeoutError, OSError, EOFError) as exc:
            raise TransientError(
                f"ble source {self.name} {self.cfg.adapter}: cannot scan: {exc or type(exc).__name__}: "
                "check that bluetoothd runs and the adapter is present and powered (bluetoothctl show)"
            ) from exc
        self._scanner = scanner

    async def _stop_scanner(self) -> None:
        scanner, self._scanner = self._scanner, None
        if scanner is None:
            return
        with contextlib.suppress(Exception), self.pulse.waiting("stopping the scan", SCANNER_TIMEOUT_S):
            async with asyncio.timeout(SCANNER_TIMEOUT_S):
                await scanner.stop()

    async def _watch(self) -> None:
        """Raise lost alarms on time and restart a scan gone quiet."""
        tick = max(0.05, min(1.0, self.cfg.lost_after_s / 4, self.cfg.scan_watchdog_s / 4))
        while True:
            self.pulse.beat()
            await asyncio.sleep(tick)
            now = time.monotonic()
            self._drop_quiet_links(now)
            for dev in self.devices.values():
                if (
                    dev.state != DeviceState.CONNECTED
                    and not dev.lost
                    and now - dev.down_since >= self.cfg.lost_after_s
                ):
                    dev.lost = True
                    cause = dev.lost_as = dev.lost_cause()
                    dev.lost_told_at = now
                    _LOGGER.warning(
                        "ble %s: %s lost for %.0f s (%s); still trying to reconnect",
                        self.name,
                        dev.label,
                        now - dev.down_since,
                        cause,
                    )
                    self.handler.lost(dev, cause)
                elif (
                    dev.lost
                    and dev.state != DeviceState.CONNECTED
                    and now - dev.lost_told_at >= self.cfg.lost_after_s
                    and (cause := dev.lost_cause()) != dev.lost_as
                    and DeviceState.WAITING_SLOT.value in (cause, dev.lost_as)
                ):
                    # Back in range but waiting for a slot (or the reverse): the standing alarm's
                    # cause is no longer true. At most one update per lost_after_s: no flapping.
                    _LOGGER.info(
                        "ble %s: %s still away, now %s (was %s)", self.name, dev.label, cause, dev.lost_as
                    )
                    dev.lost_as = cause
                    dev.lost_told_at = now
                    self.handler.lost(dev, cause)
            self._take_turns(now)
            looking = any(
                d.state in (DeviceState.SCANNING, DeviceState.BACKOFF) for d in self.devices.values()
            )
            if self.watchdog.due(now, looking):
                log = _LOGGER.debug if self._quiet_logged else _LOGGER.warning
                log(
                    "ble %s: the scan on %s reported nothing for %.0f s; restarting it",
                    self.name,
                    self.cfg.adapter,
                    now - self.watchdog.last_heard,
                )
                self._quiet_logged = True
                await self._stop_scanner()
                await self._start_scanner()
                self.watchdog.restarted(time.monotonic())

    def _drop_quiet_links(self, now: float) -> None:
        """Drop the link of a connected, continuously streaming device that sent nothing for lost_after_s."""
        for address, down in self._link_down.items():
            dev = self.devices[address]
            if not dev.continuous or down.is_set() or dev.state != DeviceState.CONNECTED:
                continue
            quiet = now - max(dev.last_data, dev.connected_at)
            if quiet < self.cfg.lost_after_s:
                if dev.last_data > dev.connected_at:
                    dev.quiet_told = False  # data flows on this connection: a new silence is news
                continue
            # Connected but mute: only a new connection and subscription can mend it.
            (_LOGGER.debug if dev.quiet_told else _LOGGER.warning)(
                "ble %s: %s connected but sent nothing for %.0f s; connecting it again",
                self.name,
                dev.label,
                quiet,
            )
            dev.quiet_told = True
            self._quiet.add(address)
            down.set()

    def _take_turns(self, now: float) -> None:
        """Give a long-waiting device the slot of the longest connected holder (see the module doc)."""
        if self._turn_over:
            return  # one hand-over at a time
        for address in self.slots.turn_due(now, self.cfg.slot_turn_s):
            down = self._link_down.get(address)
            if down is None:
                continue  # still connecting: never cut an attempt short
            waiter = self.devices[self.slots.waiting[0]]
            _LOGGER.info(
                "ble %s: %s gives its slot to %s, waiting %.0f s; it queues for the next free slot",
                self.name,
                self.devices[address].label,
                waiter.label,
                now - waiter.since,
            )
            self._turn_over.add(address)
            down.set()
            return

    # -- BlueZ housekeeping ------------------------------------------------------------------------

    async def _remove_device(self, dev: ManagedDevice) -> None:
        """Remove a device from BlueZ: the only cure for its stale state (InProgress)."""
        path = dev._path or f"/org/bluez/{self.cfg.adapter}/dev_{dev.address.replace(':', '_')}"
        try:
            async with asyncio.timeout(DISCONNECT_TIMEOUT_S):
                if self._bus is None:
                    self._bus = await MessageBus(bus_type=BusType.SYSTEM).connect()
                reply = await self._bus.call(
                    Message(
                        destination="org.bluez",
                        path=f"/org/bluez/{self.cfg.adapter}",
                        interface="org.bluez.Adapter1",
                        member="RemoveDevice",
                        signature="o",
                        body=[path],
                    )
                )
        except (TimeoutError, OSError, EOFError) as exc:
            _LOGGER.warning("ble %s: %s: could not remove the stale device: %r", self.name, dev.label, exc)
            return
        if reply is not None and reply.message_type == MessageType.ERROR:
            _LOGGER.warning("ble %s: %s: RemoveDevice refused: %s", self.name, dev.label, reply.error_name)
            return
        _LOGGER.info(
            "ble %s: %s: removed from BlueZ to clear a stuck connection (InProgress)", self.name, dev.label
        )
        dev.ble_device = None
        dev._path = None
        dev.heard.clear()

    # -- one device --------------------------------------------------------------------------------

    async def _wait_heard(self, dev: ManagedDevice, timeout_s: float | None = None) -> bool:
        if dev.heard.is_set() and dev.ble_device is not None:
            return True
        try:
            async with asyncio.timeout(timeout_s):
                await dev.heard.wait()
        except TimeoutError:
            return False
        return dev.ble_device is not None

    async def _connect(
        self, dev: ManagedDevice, disconnected: Callable[[BleakClient], None]
    ) -> BleakClient | None:
        """One connection cycle: bounded attempts within a bounded total time."""
        cfg = self.cfg
        deadline = time.monotonic() + cfg.connect_budget_s
        for attempt in range(1, cfg.max_connect_attempts + 1):
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not await self._wait_heard(dev, remaining):
                dev.last_error = dev.last_error or "not_found"
                break
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            ble_device = dev.ble_device
            assert ble_device is not None
            dev.attempts += 1
            try:
                async with asyncio.timeout(min(cfg.connect_timeout_s, remaining)):
                    client = await establish_connection(
                        BleakClientWithServiceCache,
                        ble_device,
                        dev.label,
                        disconnected_callback=disconnected,
                        max_attempts=1,
                        use_services_cache=False,
                    )
            except (BleakError, TimeoutError, EOFError, BrokenPipeError, OSError) as exc:
                kind = classify(exc)
                msg = str(root_error(exc))
                if kind == "failed" and "page timeout" in msg.lower():
                    kind = "page_timeout"
                dev.last_error = kind
                _LOGGER.debug(
                    "ble %s: %s: attempt %d failed: %s (%s)", self.name, dev.label, attempt, kind, msg
                )
                if kind == "adapter":
                    raise TransientError(
                        f"ble source {self.name} {cfg.adapter}: BlueZ failed while connecting {dev.profile.name}: "
                        f"{msg}: check bluetoothd and the adapter; the source restarts by itself"
                    ) from exc
                if kind == "in_progress":
                    await self._remove_device(dev)
                    continue
                if kind == "not_found":
                    dev.heard.clear()
                    continue
                root = root_error(exc)
                pause = min(
                    calculate_backoff_time(root if isinstance(root, Exception) else exc),
                    max(0.0, deadline - time.monotonic()),
                )
                await asyncio.sleep(pause)
                continue
            dev.last_error = None
            return client
        return None

    async def _run_device(self, dev: ManagedDevice) -> None:
        backoff = Backoff(self.cfg.reconnect_min_s, self.cfg.reconnect_max_s, self._rng)
        while True:
            self._set(dev, DeviceState.SCANNING)
            await self._wait_heard(dev)
            if not self.slots.try_acquire(dev.address):
                self._set(dev, DeviceState.WAITING_SLOT)
                await self.slots.acquire(dev.address)
            try:
                self._set(dev, DeviceState.CONNECTING)
                link_down = asyncio.Event()

                def on_disconnect(_client: BleakClient, down: asyncio.Event = link_down) -> None:
                    down.set()

                client = await self._connect(dev, on_disconnect)
                if client is not None:
                    backoff.reset()
                    await self._connected(dev, client, link_down)
                    delay = self._rng.uniform(0.0, min(0.5, self.cfg.reconnect_min_s))
                else:
                    dev.cycles_failed += 1
                    delay = backoff.next()
                    _LOGGER.info(
                        "ble %s: %s: could not connect (%s after %d attempt(s)); next try in %.1f s",
                        self.name,
                        dev.label,
                        dev.last_error,
                        self.cfg.max_connect_attempts,
                        delay,
                    )
            finally:
                self.slots.release(dev.address)
            if dev.last_error == "wrong_service":
                delay = self.cfg.reconnect_max_s
            self._set(dev, DeviceState.BACKOFF)
            await asyncio.sleep(delay)

    async def _connected(self, dev: ManagedDevice, client: BleakClient, link_down: asyncio.Event) -> None:
        """Run the driver's session until the link drops or the session fails."""
        self._clients[dev.address] = client
        self._link_down[dev.address] = link_down
        dev.connected_at = time.monotonic()
        dev.connections += 1
        self._set(dev, DeviceState.CONNECTED)
        if dev.lost:
            dev.lost = False
            _LOGGER.warning("ble %s: %s is back", self.name, dev.label)
            self.handler.restored(dev)
        else:
            _LOGGER.info("ble %s: %s connected", self.name, dev.label)
        session = asyncio.get_running_loop().create_task(
            self.handler.session(dev, client), name=f"ble-session:{self.name}:{dev.profile.name}"
        )
        down = asyncio.get_running_loop().create_task(link_down.wait(), name=f"ble-link:{self.name}")
        try:
            await asyncio.wait({session, down}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            down.cancel()
            if not session.done():
                session.cancel()
            with contextlib.suppress(asyncio.CancelledError, TimeoutError):
                async with asyncio.timeout(DISCONNECT_TIMEOUT_S):
                    await asyncio.gather(session, down, return_exceptions=True)
            dev.down_since = time.monotonic()
            dev.heard.clear()
            self._clients.pop(dev.address, None)
            self._link_down.pop(dev.address, None)
            await self._disconnect(client)
        if dev.address in self._turn_over:
            self._turn_over.discard(dev.address)
            dev.last_error = "slot_turn"
        elif dev.address in self._quiet:
            self._quiet.discard(dev.address)
            dev.last_error = "link_quiet"
        elif session.done() and not session.cancelled() and (exc := session.exception()) is not None:
            if isinstance(exc, WrongServiceError):
                dev.last_error = "wrong_service"
                _LOGGER.error(
                    "ble %s: %s does not offer the %s service: it is not the configured wearable; "
                    "check the address in the config",
                    self.name,
                    dev.label,
                    dev.profile.name,
                )
            else:
                dev.last_error = "session_failed"
                _LOGGER.warning("ble %s: %s: the session failed: %r; reconnecting", self.name, dev.label, exc)
        else:
            dev.last_error = "link_lost"
            _LOGGER.info("ble %s: %s disconnected; reconnecting when it is heard again", self.name, dev.label)

    async def _disconnect(self, client: BleakClient) -> None:
        with contextlib.suppress(Exception):
            async with asyncio.timeout(DISCONNECT_TIMEOUT_S):
                await client.disconnect()

    # -- lifecycle ---------------------------------------------------------------------------------

    async def run(self, started: Callable[[], None]) -> None:
        """Scan and keep every allowlisted device connected until cancelled."""
        loop = asyncio.get_running_loop()
        self._fatal = loop.create_future()
        try:
            await self._start_scanner()
            now = time.monotonic()
            self.watchdog.heard(now)
            for dev in self.devices.values():
                dev.down_since = now
            self._tasks = [
                loop.create_task(self._guard(self._watch()), name=f"ble-watch:{self.name}"),
                *(
                    loop.create_task(
                        self._guard(self._run_device(d)), name=f"ble-device:{self.name}:{d.profile.name}"
                    )
                    for d in self.devices.values()
                ),
            ]
            _LOGGER.info(
                "ble %s: scanning on %s for %d allowlisted device(s), %d connection slot(s)",
                self.name,
                self.cfg.adapter,
                len(self.devices),
                self.cfg.slots,
            )
            started()
            await self._fatal
        finally:
            await asyncio.shield(self._shutdown())

    async def _guard(self, coro: Any) -> None:
        try:
            await coro
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - any failure of a loop ends run() with it
            if self._fatal is not None and not self._fatal.done():
                self._fatal.set_exception(exc)

    async def _shutdown(self) -> None:
        tasks, self._tasks = self._tasks, []
        for t in tasks:
            t.cancel()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(DISCONNECT_TIMEOUT_S):
                await asyncio.gather(*tasks, return_exceptions=True)
        clients = list(self._clients.values())
        self._clients.clear()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(DISCONNECT_TIMEOUT_S):
                await asyncio.gather(*(self._disconnect(c) for c in clients), return_exceptions=True)
        await self._stop_scanner()
        if self._bus is not None:
            self._bus.disconnect()
            self._bus = None
        for dev in self.devices.values():
            dev.state = DeviceState.STOPPED
