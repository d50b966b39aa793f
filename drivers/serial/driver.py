"""The serial pulse-oximeter driver: a port, a parser, samples into the sink, and the device's health.

One run of :meth:`SerialOximeter.run` is one connection.  It ends with an error the supervisor
acts on:

* the port is absent or vanishes (unplugged): a ``sensor_lost`` alarm (cause ``absent`` /
  ``unplugged``) once per outage, then :class:`~drivers.serial.port.DeviceAbsentError` /
  :class:`~drivers.serial.port.DeviceLostError` (transient: retried with backoff);
* no valid frame for ``stale_after_s``: a ``sensor_lost`` alarm (cause ``stale``), then a
  transient error;
* bytes keep coming for ``detect_timeout_s`` but never form a frame: the line speed or format
  is wrong - :class:`~gateway.errors.ConfigError` ("no recognisable frames at 9600 8N1 on ...").

When data flows again after one of the driver's own ``sensor_lost`` alarms, it raises
``sensor_restored``.  Device status bits become sample quality flags; the core's windower turns
those into ``sensor_fault`` alarms.  A low battery is a device event: ``sensor_fault`` with cause
``low_battery`` at the first reading with the monitor's low-battery bit, ``sensor_restored`` once
the bit has stayed clear for ``BATTERY_GOOD_S`` (also in the first readings of the driver, which
ends one a previous run left on: charged while the gateway was down).  Formats without the bit
raise and end nothing.

Identity: ``Stream.device`` is the monitor's own serial number when it reports one (Masimo
``SN=``), else the configured ``device``, else the configured port path.  Those stay on the
gateway: the anonymizer replaces them before anything leaves.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

from drivers.serial.config import SerialConfig
from drivers.serial.detect import probe
from drivers.serial.formats import PARSERS, make_parser
from drivers.serial.port import CLOSE_DEADLINE_S, DeviceAbsentError, DeviceLostError, Link, open_link
from drivers.serial.protocol import LineSettings, Parser, Reading, Status
from gateway.contracts import Alarm, AlarmKind, Diagnostic, SampleSink, SourceInfo
from gateway.errors import ConfigError, TransientError
from gateway.liveness import Pulse
from gateway.logs import register_identity
from gateway.sample import FAULT_FLAGS, MDC, Metric, Quality, Sample, Stream

_LOGGER = logging.getLogger(__name__)

SPO2 = MDC["MDC_PULS_OXIM_SAT_O2"]
PULSE = MDC["MDC_PULS_OXIM_PULS_RATE"]
PI = MDC["MDC_PULS_OXIM_PERF_REL"]

DEFAULT_STALE_S = 10.0
TICK_S = 0.1  # how often timers (idle, stale, detect, keep-alive, diagnostics) are looked at
IDLE_S = 0.05  # silence after which a frame framed by silence (Nonin #8) is complete
#: Liveness: the timer loop that enforces stale_after_s beats every TICK_S, so 5 s without a beat
#: outside a declared wait is a driver stuck in code without a bound (a wedged open, a bug).
PULSE_STALE_S = 5.0
#: A low battery ends once the monitor's bit has stayed clear this long (hysteresis in time, as
#: the bit has no level): it follows the cell's voltage, which sags under a load (the LED drive, an
#: alarm tone) and recovers as it passes, so a bit clear for a moment is the same low battery.
#: A spot-check monitor (a reading per measurement) needs two good readings this far apart.
BATTERY_GOOD_S = 5.0
_MISSING_QUALITY = Quality.BAD_STATUS  # a "no value" the device gave without saying why
_FAULT = int(FAULT_FLAGS)


_MAX_STREAMS = 64  # streams remembered across runs (device identities x metrics x rates)


class SerialOximeter:
    """A pulse oximeter on a serial port (Nonin, Masimo, Contec)."""

    def __init__(self, info: SourceInfo, cfg: SerialConfig) -> None:
        self._info = info
        self._cfg = cfg
        self._port = str(cfg.port)
        self._who = f"serial source {info.name}"
        self._streams: dict[tuple[str, str, float | None], Stream] = {}
        self._serial_number: str | None = None
        self._detected: str | None = None  # protocol found by "auto", kept across runs
        self._lost_cause: str | None = None  # cause of our own sensor_lost alarm still standing
        # The battery: True low (raised), False good; None until this driver has judged it.
        self._battery_low: bool | None = None
        self._battery_clear_since: float | None = None  # first reading of a clear run of the bit
        self._connected_once = False
        # Nominal readings per second of the protocol (None until "auto" has found one).
        self._rate = None if cfg.protocol == "auto" else PARSERS[cfg.protocol].reading_rate_hz
        self.totals: dict[str, int] = {}  # parser counters summed over all runs
        self.pulse = Pulse(stale_after_s=PULSE_STALE_S)

    # ---- identities ------------------------------------------------------------------------------

    @property
    def detected(self) -> str | None:
        """The protocol ``auto`` recognised (kept across runs), or None."""
        return self._detected

    @property
    def battery_low(self) -> bool | None:
        """The monitor's battery as last judged: True low, False good, None not yet (or no battery bit)."""
        return self._battery_low

    @property
    def device(self) -> str:
        """The identity used as ``Stream.device`` (local only)."""
        return self._serial_number or self._cfg.device or self._port

    def stream(self, metric: Metric) -> Stream:
        """The stream of a metric for the current device identity (one object, reused across runs)."""
        key = (self.device, metric.name, self._rate)
        st = self._streams.get(key)
        if st is None:
            # A spot-check monitor (no reading rate) speaks only when measured: silence is no loss.
            st = Stream(
                self._info.name,
                self._info.subject,
                self.device,
                metric,
                "medical",
                self._rate,
                self._rate is None,
            )
            if len(self._streams) >= _MAX_STREAMS:
                # The identity comes from the device (its serial number): one that reports a new
                # one each time must not grow this map; the oldest entry goes.
                del self._streams[next(iter(self._streams))]
            self._streams[key] = st
        return st

    # ---- run -------------------------------------------------------------------------------------

    def _stale_after(self, parser: Parser) -> float:
        if self._cfg.stale_after_s is not None:
            return self._cfg.stale_after_s
        return 0.0 if parser.reading_rate_hz is None else DEFAULT_STALE_S

    def _settings(self, protocol: str) -> LineSettings:
        base = PARSERS[protocol].settings
        if self._cfg.baudrate is None:
            return base
        return LineSettings(self._cfg.baudrate, base.bytesize, base.parity, base.stopbits)

    async def _protocol(self, sink: SampleSink) -> str:
        if self._cfg.protocol != "auto":
            return self._cfg.protocol
        if self._detected is not None:
            return self._detected
        # The probe listens probe_s at each line setting (at most one per protocol), then closes.
        bound = len(PARSERS) * (self._cfg.probe_s + CLOSE_DEADLINE_S)
        try:
            with self.pulse.waiting("probing the line", bound):
                result = await probe(
                    self._port,
                    probe_s=self._cfg.probe_s,
                    allow_start_command=self._cfg.allow_start_command,
                    baudrate=self._cfg.baudrate,
                    who=self._who,
                )
        except DeviceAbsentError:
            self._raise_lost(sink, "absent" if not self._connected_once else "unplugged")
            raise
        if result.protocol is None:
            if result.bytes_seen:
                self._raise_lost(sink, "no_frames")
                raise ConfigError(
                    f"{self._who} {self._port}: {result.describe()}: no known protocol fits: "
                    "check the monitor's serial output settings, or name the protocol in the config"
                )
            hint = (
                ""
                if self._cfg.allow_start_command
                else " (a CMS50 with firmware 4.6 needs allow_start_command)"
            )
            self._raise_lost(sink, "stale")
            raise TransientError(
                f"{self._who} {self._port}: the device sent nothing while probed: is it switched on?{hint}: "
                "it is retried"
            )
        _LOGGER.info("%s %s: recognised %s", self._who, self._port, result.describe())
        self._detected = result.protocol
        self._rate = PARSERS[result.protocol].reading_rate_hz
        return result.protocol

    async def run(self, sink: SampleSink, *, started: Callable[[], None]) -> None:
        """Read the port until cancelled; raise the error that says why it stopped otherwise."""
        protocol = await self._protocol(sink)
        parser = make_parser(protocol)
        settings = self._settings(protocol)
        state = _Run(parser, sink, started, time.monotonic())
        self._battery_clear_since = None  # a clear battery is judged on one connection's readings
        try:
            link = await open_link(self._who, self._port, settings, lambda data: self._on_data(state, data))
        except DeviceAbsentError:
            self._raise_lost(sink, "absent" if not self._connected_once else "unplugged")
            raise
        if not self._connected_once:
            _LOGGER.info("%s %s: open at %s, reading %s", self._who, self._port, settings, protocol)
        self._connected_once = True
        state.opened = time.monotonic()
        try:
            await self._serve(state, link, settings)
        finally:
            with self.pulse.waiting("closing the port", CLOSE_DEADLINE_S):
                await link.aclose()
            for k, v in parser.counters().items():
                self.totals[k] = self.totals.get(k, 0) + v

    def _on_data(self, state: _Run, data: bytes) -> None:
        state.last_bytes = time.monotonic()
        state.idled = False
        self._handle(state, state.parser.feed(data))

    def _handle(self, state: _Run, readings: list[Reading]) -> None:
        if not readings:
            return
        t_mono = time.monotonic()
        t_wall = time.time()
        state.last_valid = t_mono
        self._restored(state.sink, t_mono, t_wall)
        for r in readings:
            self._emit(state.sink, r, t_mono, t_wall, battery=state.parser.reports_battery)
        if not state.is_started:
            state.is_started = True
            state.started()

    def _emit(self, sink: SampleSink, r: Reading, t_mono: float, t_wall: float, *, battery: bool) -> None:
        if r.serial is not None:
            self._identity(r.serial)
        if battery:  # a format without the bit says nothing about the battery
            self._battery(sink, bool(r.status & Status.LOW_BATTERY), t_mono, t_wall)
        q = r.quality
        for metric, value in ((SPO2, r.spo2), (PULSE, r.pulse), (PI, r.pi)):
            if value is None:
                continue
            quality = q
            if math.isnan(value) and not q & _FAULT:
                quality = q | _MISSING_QUALITY
            sink.put(Sample(self.stream(metric), t_mono, t_wall, value, quality))

    async def _serve(self, state: _Run, link: Link, settings: LineSettings) -> None:
        """Wait for the link to fail or a timer to fire; raise accordingly."""
        cfg = self._cfg
        parser = state.parser
        stale_after_s = self._stale_after(parser)
        if parser.start_command is not None:
            link.write(parser.start_command)
        if parser.reading_rate_hz is None and not state.is_started:
            # Spot-check monitors speak only after a measurement: an open port is a started source.
            state.is_started = True
            state.started()
        next_keepalive = time.monotonic() + parser.keepalive_s
        next_diag = time.monotonic() + cfg.diagnostics_every_s
        while True:
            # This loop enforces the data bounds below: while it turns, the driver is alive, and
            # a monitor that goes quiet is told by stale_after_s, not by the supervisor.
            self.pulse.beat()
            await asyncio.wait([link.lost], timeout=TICK_S)
            now = time.monotonic()
            if link.lost.done():
                if link.failure is not None:
                    raise link.failure
                self._diagnostic(state)
                self._raise_lost(state.sink, "unplugged")
                raise DeviceLostError(
                    f"{self._who} {self._port}: device lost: {link.lost.result() or 'port closed'}: "
                    "it is retried until it returns; check the cable"
                )
            if not state.idled and now - state.last_bytes >= IDLE_S:
                state.idled = True
                self._handle(state, parser.idle())
            if parser.keepalive_command is not None and now >= next_keepalive:
                link.write(parser.keepalive_command)
                next_keepalive = now + parser.keepalive_s
            if now >= next_diag:
                next_diag = now + cfg.diagnostics_every_s
                self._diagnostic(state)
            garbage_only = state.last_valid is None and parser.bytes_in > 0
            if garbage_only and now - state.opened >= cfg.detect_timeout_s:
                self._diagnostic(state)
                message = (
                    f"{self._who} {self._port}: no recognisable frames at {settings} on {self._port}: "
                    f"{parser.bytes_in} bytes in {now - state.opened:.0f} s, none formed a {parser.name} "
                    'frame: check the monitor\'s output format and speed, or set protocol = "auto"'
                )
                if cfg.protocol == "auto":
                    # What was detected no longer fits: probe again on the next run.
                    self._detected = None
                    raise TransientError(message)
                # Not retried, so say so on the alarm lane too: this oximeter is not being read.
                self._raise_lost(state.sink, "no_frames")
                raise ConfigError(message)
            since = state.last_valid if state.last_valid is not None else state.opened
            if stale_after_s > 0 and now - since >= stale_after_s and not garbage_only:
                self._diagnostic(state)
                self._raise_lost(state.sink, "stale")
                raise TransientError(
                    f"{self._who} {self._port}: stale data: no valid frame for {now - since:.0f} s "
                    f"({parser.bytes_in} bytes received): is the monitor on and sending?: it is retried"
                )

    def _diagnostic(self, state: _Run) -> None:
        detail: dict[str, float | str] = {"protocol": state.parser.name}
        detail.update(state.parser.counters())
        state.sink.diagnostic(Diagnostic("serial_link", self._info.subject, time.time(), detail))

    # ---- alarms ----------------------------------------------------------------------------------

    def _raise_lost(self, sink: SampleSink, cause: str) -> None:
        if self._lost_cause is not None:
            return
        self._lost_cause = cause
        _LOGGER.warning("%s %s: device lost (%s)", self._who, self._port, cause)
        sink.alarm(
            Alarm(
                AlarmKind.SENSOR_LOST,
                self._info.subject,
                time.monotonic(),
                time.time(),
                self.stream(SPO2),
                {"cause": cause},
            )
        )

    def _restored(self, sink: SampleSink, t_mono: float, t_wall: float) -> None:
        cause = self._lost_cause
        if cause is None:
            return
        self._lost_cause = None
        _LOGGER.info("%s %s: device back after %s", self._who, self._port, cause)
        sink.alarm(
            Alarm(
                AlarmKind.SENSOR_RESTORED,
                self._info.subject,
                t_mono,
                t_wall,
                self.stream(SPO2),
                {"after": AlarmKind.SENSOR_LOST.value, "cause": cause},
            )
        )

    def _battery(self, sink: SampleSink, low: bool, t_mono: float, t_wall: float) -> None:
        """Raise a low battery at the bit; end it once the bit has stayed clear ``BATTERY_GOOD_S``."""
        if low:
            self._battery_clear_since = None
            if self._battery_low is not True:
                self._battery_low = True
                _LOGGER.warning("%s %s: monitor battery low", self._who, self._port)
                self._battery_alarm(sink, AlarmKind.SENSOR_FAULT, {"cause": "low_battery"}, t_mono, t_wall)
            return
        if self._battery_low is False:
            return
        if self._battery_clear_since is None:
            self._battery_clear_since = t_mono
        if t_mono - self._battery_clear_since < BATTERY_GOOD_S:
            return
        if self._battery_low:
            _LOGGER.info("%s %s: monitor battery good again", self._who, self._port)
        self._battery_low = False
        # Also when this driver had not judged it yet: a low battery a previous run left on (charged
        # while the gateway was down) ends here; the pipeline sends an ending only for one that is on.
        detail: dict[str, float | str] = {"after": AlarmKind.SENSOR_FAULT.value, "cause": "low_battery"}
        self._battery_alarm(sink, AlarmKind.SENSOR_RESTORED, detail, t_mono, t_wall)

    def _battery_alarm(
        self, sink: SampleSink, kind: AlarmKind, detail: dict[str, float | str], t_mono: float, t_wall: float
    ) -> None:
        sink.alarm(Alarm(kind, self._info.subject, t_mono, t_wall, self.stream(SPO2), detail))

    def _identity(self, serial: str) -> None:
        if serial != self._serial_number:
            # Declared first, so the line names it by its source unless raw identities are enabled.
            register_identity(serial, f"{self._info.name}.serial_number")
            _LOGGER.info("%s %s: monitor serial number %s", self._who, self._port, serial)
            self._serial_number = serial


@dataclass(slots=True)
class _Run:
    """State of one connection."""

    parser: Parser
    sink: SampleSink
    started: Callable[[], None]
    opened: float
    is_started: bool = False
    last_valid: float | None = None
    last_bytes: float = 0.0
    idled: bool = True


def factory(info: SourceInfo, cfg: SerialConfig) -> SerialOximeter:
    """Build a serial oximeter driver; oximeters measure patients, so the source must be medical."""
    if info.kind != "medical":
        raise ConfigError(
            f"serial source {info.name}: kind {info.kind!r}: pulse oximeters produce medical streams: "
            'set kind = "medical"'
        )
    return SerialOximeter(info, cfg)
