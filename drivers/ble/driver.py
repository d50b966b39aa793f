"""The BLE wearables source: bleak on BlueZ, the connection manager, readings into samples.

One driver instance serves the allowlisted devices of one ``[[sources]]`` table. Notifications
and indications arrive in bleak's callbacks on the event loop; each is decoded by the pure
parsers of :mod:`drivers.ble.protocol` and handed to the sink synchronously.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Mapping

from bleak import BleakClient
from bleak.backends.characteristic import BleakGATTCharacteristic
from bleak.exc import BleakError

from drivers.ble.config import BleConfig
from drivers.ble.manager import ConnectionManager, DeviceStatus, ManagedDevice, WrongServiceError
from drivers.ble.protocol import (
    BATTERY,
    BATTERY_LEVEL,
    DEVICE_INFORMATION,
    PROFILES,
    DateTime,
    GattFormatError,
    Reading,
    decode,
    parse_battery_level,
    parse_utf8,
)
from gateway.contracts import Alarm, AlarmKind, Diagnostic, SampleSink, SourceInfo
from gateway.errors import ConfigError
from gateway.logs import register_identity
from gateway.sample import MDC, Metric, Sample, Stream

_LOGGER = logging.getLogger(__name__)

#: Profiles whose device measures on demand (a spot check), not continuously.
_SPOT_PROFILES = frozenset({"thermo", "bp"})

#: A low battery ends (and re-arms) once the level is this much above the threshold again: a
#: cell's level read under load wobbles by a few points, which must not flap the alarm.
BATTERY_HYSTERESIS_PCT = 5
GATT_TIMEOUT_S = 10.0
#: Battery Level 0x2A19, percent (``BleDriver.battery_streams``).
BATTERY_METRIC = Metric(BATTERY, "%")


class _NullSink:
    """Placeholder until ``run`` is given the real sink."""

    def put(self, sample: Sample) -> None:
        """Drop."""

    def put_block(self, block: object) -> None:
        """Drop."""

    def alarm(self, alarm: Alarm) -> None:
        """Drop."""

    def diagnostic(self, diagnostic: Diagnostic) -> None:
        """Drop."""


class BleDriver:
    """Allowlisted BLE health wearables: HR straps, pulse oximeters, thermometers, BP cuffs."""

    def __init__(self, info: SourceInfo, cfg: BleConfig) -> None:
        self._info = info
        self._cfg = cfg
        self._sink: SampleSink = _NullSink()
        self._streams: dict[str, dict[str, Stream]] = {}
        self._battery_streams: dict[str, Stream] = {}
        devices = []
        for d in cfg.devices:
            profile = PROFILES[d.profile]
            subject = d.subject or info.subject
            devices.append(
                ManagedDevice(d.address, profile, subject, continuous=profile.name not in _SPOT_PROFILES)
            )
            self._streams[d.address] = {
                name: Stream(
                    source=info.name,
                    subject=subject,
                    device=d.address,
                    metric=MDC[name],
                    kind=info.kind,
                    rate_hz=profile.rates_hz[name],
                    # Thermometers and cuffs send a measurement when one is taken: no timeout.
                    on_change=profile.name in _SPOT_PROFILES,
                )
                for name in profile.metrics
            }
            # The battery level as a stream of its own (an estimator's input: the wearable's state of
            # charge); it is read every battery_poll_s or notified on change, so silence is no loss.
            self._battery_streams[d.address] = Stream(
                info.name, subject, d.address, BATTERY_METRIC, info.kind, None, on_change=True
            )
        self.manager = ConnectionManager(cfg, devices, self, name=info.name)
        self.pulse = self.manager.pulse  # the supervisor judges the manager's watch loop
        #: Counters for status displays and tests: values, bad values, missing (special) values.
        self.counters: dict[str, int] = {"values": 0, "samples": 0, "bad_values": 0, "missing": 0}
        # Battery state by address: True low (raised), False good; absent until this run reads it.
        self._battery_low: dict[str, bool] = {}
        self._bad_logged: set[str] = set()

    # -- introspection -----------------------------------------------------------------------------

    @property
    def streams(self) -> Mapping[str, Mapping[str, Stream]]:
        """Streams by device address, then by metric name."""
        return self._streams

    @property
    def battery_streams(self) -> Mapping[str, Stream]:
        """The battery level stream of each device, by address."""
        return self._battery_streams

    def status(self) -> dict[str, DeviceStatus]:
        """Every device's connection state (local only: holds addresses)."""
        return self.manager.status()

    # -- run ---------------------------------------------------------------------------------------

    async def run(self, sink: SampleSink, *, started: Callable[[], None]) -> None:
        """Scan, connect and stream until cancelled; ``started`` once the adapter is scanning."""
        self._sink = sink
        await self.manager.run(started)

    # -- LinkHandler -------------------------------------------------------------------------------

    def changed(self, dev: ManagedDevice, slots_used: int, slots: int) -> None:
        """Report a state change as a diagnostic (tokens and numbers only)."""
        detail: dict[str, float | str] = {
            "profile": dev.profile.name,
            "state": dev.state.value,
            "slots_used": slots_used,
            "slots": slots,
            "attempts": dev.attempts,
        }
        if dev.last_error:
            detail["error"] = dev.last_error
        self._sink.diagnostic(Diagnostic("ble_link", dev.subject, time.time(), detail))

    def lost(self, dev: ManagedDevice, cause: str) -> None:
        """SENSOR_LOST for the device's headline stream."""
        self._alarm(AlarmKind.SENSOR_LOST, dev, {"cause": cause, "profile": dev.profile.name})

    def restored(self, dev: ManagedDevice) -> None:
        """SENSOR_RESTORED for the device's headline stream."""
        self._alarm(AlarmKind.SENSOR_RESTORED, dev, {"cause": "reconnected", "profile": dev.profile.name})

    def _alarm(self, kind: AlarmKind, dev: ManagedDevice, detail: dict[str, float | str]) -> None:
        stream = self._streams[dev.address][dev.profile.metrics[0]]
        self._sink.alarm(Alarm(kind, dev.subject, time.monotonic(), time.time(), stream, detail))

    async def session(self, dev: ManagedDevice, client: BleakClient) -> None:
        """Check the service, read device information, subscribe, and poll the battery."""
        services = client.services
        if services.get_service(dev.profile.service) is None:
            raise WrongServiceError(f"{dev.profile.name} service missing")
        chars = [c for u in dev.profile.measurements if (c := services.get_characteristic(u)) is not None]
        if not chars:
            raise WrongServiceError(f"{dev.profile.name} measurement missing")
        await self._read_device_information(dev, client)
        for ch in chars:
            async with asyncio.timeout(GATT_TIMEOUT_S):
                await client.start_notify(ch, self._measurement_handler(dev, ch.uuid))
        battery = services.get_characteristic(BATTERY_LEVEL)
        if battery is not None and "notify" in battery.properties:
            async with asyncio.timeout(GATT_TIMEOUT_S):
                await client.start_notify(battery, lambda _c, data: self._battery(dev, bytes(data)))
        while True:
            if battery is not None and "read" in battery.properties:
                try:
                    async with asyncio.timeout(GATT_TIMEOUT_S):
                        self._battery(dev, bytes(await client.read_gatt_char(battery)))
                except (BleakError, TimeoutError) as exc:
                    _LOGGER.debug("ble %s: %s: battery read failed: %r", self._info.name, dev.label, exc)
            await asyncio.sleep(self._cfg.battery_poll_s)

    async def _read_device_information(self, dev: ManagedDevice, client: BleakClient) -> None:
        for field_name, uuid in DEVICE_INFORMATION.items():
            ch = client.services.get_characteristic(uuid)
            if ch is None or "read" not in ch.properties:
                continue
            with contextlib.suppress(BleakError, TimeoutError):
                async with asyncio.timeout(GATT_TIMEOUT_S):
                    dev.info[field_name] = parse_utf8(bytes(await client.read_gatt_char(ch)))
        if dev.info:
            # Names and serial numbers identify the device: never sent, and logged by source name
            # unless raw identities are enabled.
            if "serial" in dev.info:
                register_identity(dev.info["serial"], f"{self._info.name}.serial_number")
            _LOGGER.debug("ble %s: %s device information: %s", self._info.name, dev.label, dev.info)

    # -- values ------------------------------------------------------------------------------------

    def _battery(self, dev: ManagedDevice, data: bytes) -> None:
        try:
            level = parse_battery_level(data)
        except GattFormatError as exc:
            self._bad(dev, exc)
            return
        dev.battery = level
        self._sink.put(
            Sample(self._battery_streams[dev.address], time.monotonic(), time.time(), float(level))
        )
        self._judge_battery(dev, level)

    def _judge_battery(self, dev: ManagedDevice, level: int) -> None:
        """Raise a low battery at the threshold; end it once the level is back above it (hysteresis)."""
        was = self._battery_low.get(dev.address)
        limit = self._cfg.low_battery_pct
        if level <= limit and was is not True:
            self._battery_low[dev.address] = True
            _LOGGER.warning("ble %s: %s battery low: %d %%", self._info.name, dev.label, level)
            self._alarm(AlarmKind.SENSOR_FAULT, dev, {"cause": "low_battery", "battery": level})
        elif level >= limit + BATTERY_HYSTERESIS_PCT and was is not False:
            self._battery_low[dev.address] = False
            if was:
                _LOGGER.info("ble %s: %s battery good again: %d %%", self._info.name, dev.label, level)
            # Also at this run's first reading: a low battery a previous run left on (charged or
            # swapped while the gateway was down) ends here; the pipeline sends an ending only for
            # a condition that is on.
            detail: dict[str, float | str] = {
                "after": AlarmKind.SENSOR_FAULT.value,
                "cause": "low_battery",
                "battery": level,
            }
            self._alarm(AlarmKind.SENSOR_RESTORED, dev, detail)

    def _bad(self, dev: ManagedDevice, exc: GattFormatError) -> None:
        self.counters["bad_values"] += 1
        if dev.address in self._bad_logged:
            _LOGGER.debug("ble %s: %s: %s", self._info.name, dev.label, exc)
        else:
            self._bad_logged.add(dev.address)
            _LOGGER.warning(
                "ble %s: %s sent a malformed value (dropped): %s", self._info.name, dev.label, exc
            )

    def _measurement_handler(
        self, dev: ManagedDevice, uuid: str
    ) -> Callable[[BleakGATTCharacteristic, bytearray], None]:
        streams = self._streams[dev.address]
        sink = self._sink
        counters = self.counters
        skew = self._cfg.max_clock_skew_s

        def on_value(_char: BleakGATTCharacteristic, data: bytearray) -> None:
            counters["values"] += 1
            dev.last_data = time.monotonic()
            try:
                readings = decode(uuid, bytes(data))
            except GattFormatError as exc:
                self._bad(dev, exc)
                return
            now_mono = time.monotonic()
            now_wall = time.time()
            for r in readings:
                stream = streams.get(r.metric)
                if stream is None:
                    continue
                t_mono, t_wall = _times(r, now_mono, now_wall, skew)
                if r.missing is not None:
                    counters["missing"] += 1
                sink.put(Sample(stream, t_mono, t_wall, r.value, r.quality))
                counters["samples"] += 1

        return on_value


def _device_wall(ts: DateTime) -> float | None:
    if not ts.known:
        return None
    try:
        return time.mktime((*ts.as_tuple(), 0, 0, -1))
    except (OverflowError, ValueError):
        return None


def _times(r: Reading, now_mono: float, now_wall: float, skew_s: float) -> tuple[float, float]:
    """(t_mono, t_wall) of a reading: the device clock when it is within ``skew_s`` of ours."""
    if r.device_time is not None:
        dev_wall = _device_wall(r.device_time)
        if dev_wall is not None and abs(dev_wall - now_wall) <= skew_s:
            age = max(0.0, now_wall - dev_wall)
            return now_mono - age, dev_wall
    return now_mono + r.offset_s, now_wall + r.offset_s


def factory(info: SourceInfo, cfg: BleConfig) -> BleDriver:
    """Build a BLE wearables driver; wearables measure patients, so the source must be medical."""
    if info.kind != "medical":
        raise ConfigError(
            f"ble source {info.name}: kind {info.kind!r} does not fit: BLE health profiles measure "
            'patients: set kind = "medical"'
        )
    return BleDriver(info, cfg)
