"""A simulated pulse oximeter on a pseudo-terminal: any supported protocol, realistic values, faults.

Pieces, from pure to I/O:

* :class:`VitalsModel` - a seeded resting adult with injected desaturations and sensor-off
  episodes; :class:`MimicNumerics` - SpO2 and pulse replayed from a MIMIC numerics record
  (WFDB format 16, one sample a minute; 0 means the sensor dropped out);
* :class:`FrameSource` - the bytes a monitor of a protocol sends over a span of time, written with
  the protocol modules' own encoders;
* :class:`Corruptor` - bit flips, dropped and inserted bytes, and :func:`uart_misread`, what a
  receiver at one speed makes of characters sent at another (ptys ignore the baud setting, so a
  wrong speed is simulated on the bytes);
* :class:`PtyOximeter` - a background thread writing those bytes into a pty pair, with a stable
  link path that :meth:`~PtyOximeter.unplug` removes and :meth:`~PtyOximeter.replug` restores.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import math
import os
import select
import threading
import time
import tty
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Protocol, Self

import numpy as np
import numpy.typing as npt

from drivers.serial import contec, masimo, nonin
from drivers.serial.formats import PARSERS
from drivers.serial.protocol import LineSettings, Status

_LOGGER = logging.getLogger(__name__)

TICK_S = 0.02  # write period of the simulator thread
SIM_PROTOCOLS = ("nonin2", "nonin7", "nonin8", "nonin13", "nonin_ascii", "masimo", "cms50", "cms50v46")
_PULSE_TOP = {
    "nonin2": float(nonin.HR_MAX),
    "nonin7": float(nonin.HR_MAX),
    "nonin8": float(nonin.HR_MAX),
    "nonin13": float(nonin.HR_MAX),
    "nonin_ascii": float(nonin.HR_MAX),
    "masimo": float(masimo.PR_MAX),
    "cms50": float(contec.PR_MAX),
    "cms50v46": 126.0,  # seven bits, 127 meaning "no value"
}


@dataclass(frozen=True, slots=True)
class Vitals:
    """What the simulated monitor measures at one instant (NaN: no value)."""

    spo2: float
    pulse: float
    pi: float
    status: int = 0


class VitalsSource(Protocol):
    """Anything that says what the monitor measures at simulated time ``t`` (seconds)."""

    def at(self, t: float) -> Vitals:
        """The vitals at ``t``."""


def _episode(t: float, first_s: float, every_s: float, length_s: float) -> float | None:
    """Seconds into the current episode of a periodic schedule, or None outside every episode."""
    if every_s <= 0 or t < first_s:
        return None
    into = (t - first_s) % every_s
    return into if into < length_s else None


class VitalsModel:
    """A seeded resting adult: slow drift, periodic desaturations and sensor-off episodes."""

    def __init__(
        self,
        seed: int = 0,
        *,
        desat_every_s: float = 120.0,
        desat_s: float = 45.0,
        desat_first_s: float = 20.0,
        sensor_off_every_s: float = 180.0,
        sensor_off_s: float = 12.0,
        sensor_off_first_s: float = 80.0,
    ) -> None:
        rng = np.random.default_rng(seed)
        self._phase = rng.uniform(0, 2 * math.pi, 5)
        self._hr0 = float(rng.uniform(64, 80))
        self._spo2_0 = float(rng.uniform(96.5, 98.5))
        self._pi0 = float(rng.uniform(2.5, 5.0))
        self.desat = (desat_first_s, desat_every_s, desat_s)
        self.sensor_off = (sensor_off_first_s, sensor_off_every_s, sensor_off_s)

    def at(self, t: float) -> Vitals:
        """The vitals at ``t``."""
        p = self._phase
        hr = self._hr0 + 4 * math.sin(2 * math.pi * t / 47 + p[0]) + 2 * math.sin(2 * math.pi * t / 13 + p[1])
        spo2 = self._spo2_0 + 0.8 * math.sin(2 * math.pi * t / 61 + p[2])
        pi = self._pi0 + 0.6 * math.sin(2 * math.pi * t / 37 + p[3])
        first, every, length = self.desat
        into = _episode(t, first, every, length)
        if into is not None:
            # Falls over 12 s, holds, recovers over the last 12 s.
            depth = min(1.0, into / 12.0, (length - into) / 12.0)
            spo2 -= 13.0 * depth
            hr += 9.0 * depth
            pi -= 1.0 * depth
        if _episode(t, *self.sensor_off) is not None:
            return Vitals(math.nan, math.nan, math.nan, int(Status.FINGER_OUT))
        return Vitals(min(100.0, spo2), hr, max(0.2, pi))


class MimicNumerics:
    """SpO2 and pulse replayed from a MIMIC numerics record (a ``.hea`` header and its ``.dat``)."""

    def __init__(self, header: Path, *, speed: float = 60.0) -> None:
        self.speed = speed
        lines = [
            ln for ln in header.read_text(encoding="ascii").splitlines() if ln and not ln.startswith("#")
        ]
        head = lines[0].split()
        nsig = int(head[1])
        self.fs = float(head[2].split("/")[0])
        signals = [ln.split() for ln in lines[1 : 1 + nsig]]
        dat = header.parent / signals[0][0]
        raw = np.fromfile(dat, dtype="<i2")
        raw = raw[: len(raw) - len(raw) % nsig].reshape(-1, nsig)
        columns: dict[str, npt.NDArray[np.float64]] = {}
        for k, sig in enumerate(signals):
            if sig[1] != "16":
                raise ValueError(f"sim {header}: signal {sig[-1]} has WFDB format {sig[1]}: only 16 is read")
            gain = float(sig[2].split("/")[0].split("(")[0]) or 200.0
            baseline = int(sig[4]) if len(sig) > 4 else 0
            col = raw[:, k].astype(np.float64)
            values = (col - baseline) / gain
            # -32768 is WFDB's "no sample"; 0 is how the monitor logged a sensor drop-out.
            values[(raw[:, k] == -32768) | (raw[:, k] == 0)] = np.nan
            columns[sig[-1].upper()] = values
        if "SPO2" not in columns:
            raise ValueError(f"sim {header}: the record has no SpO2 signal")
        self._spo2 = columns["SPO2"]
        self._pulse = columns.get("PULSE", columns.get("HR", np.full(len(raw), np.nan)))
        self.duration_s = len(raw) / self.fs / self.speed

    def at(self, t: float) -> Vitals:
        """The vitals at ``t`` seconds of playback (record time = t x speed), looping."""
        n = len(self._spo2)
        x = (t * self.speed * self.fs) % n
        i = int(x)
        j = (i + 1) % n
        f = x - i
        spo2 = float(self._spo2[i] * (1 - f) + self._spo2[j] * f)
        pulse = float(self._pulse[i] * (1 - f) + self._pulse[j] * f)
        if math.isnan(spo2) or math.isnan(pulse):
            return Vitals(math.nan, math.nan, math.nan, int(Status.FINGER_OUT))
        return Vitals(min(100.0, spo2), pulse, 3.0 + math.sin(t / 20))


def _pleth_shape(phase: float) -> float:
    """One beat of a photoplethysmogram, 0..1: a systolic peak and a dicrotic wave."""
    x = phase % 1.0
    return min(1.0, math.exp(-(((x - 0.18) / 0.08) ** 2)) + 0.45 * math.exp(-(((x - 0.45) / 0.1) ** 2)))


class FrameSource:
    """The bytes a simulated monitor sends, span by span (call :meth:`between` with increasing times)."""

    def __init__(
        self,
        protocol: str,
        vitals: VitalsSource,
        *,
        serial_number: str = "0000056661",
        spot_every_s: float = 30.0,
        wall_start: float | None = None,
    ) -> None:
        if protocol not in SIM_PROTOCOLS:
            raise ValueError(f"sim: unknown protocol {protocol!r}: use one of {', '.join(SIM_PROTOCOLS)}")
        self.protocol = protocol
        self.vitals = vitals
        self.serial_number = serial_number
        self.spot_every_s = spot_every_s
        self.wall_start = time.time() if wall_start is None else wall_start
        self._phase = 0.0
        self._phase_t = 0.0
        self._packet: tuple[int, bytes] | None = None

    def _pleth(self, t: float, v: Vitals) -> float:
        if math.isnan(v.pulse):
            self._phase_t = t
            return 0.0
        self._phase += max(0.0, t - self._phase_t) * v.pulse / 60.0
        self._phase_t = t
        return _pleth_shape(self._phase)

    def _when(self, t: float) -> tuple[int, int, int, int, int, int]:
        tm = time.gmtime(self.wall_start + t)
        return (tm.tm_year, tm.tm_mon, tm.tm_mday, tm.tm_hour, tm.tm_min, tm.tm_sec)

    @staticmethod
    def _indices(t0: float, t1: float, rate: float, offset: float = 0.0) -> range:
        return range(math.ceil((t0 - offset) * rate), math.ceil((t1 - offset) * rate))

    def between(self, t0: float, t1: float) -> bytes:
        """Everything sent in ``[t0, t1)`` simulated seconds."""
        return self._between(t0, t1)

    def _vitals(self, t: float) -> Vitals:
        v = self.vitals.at(t)
        # A monitor shows at most its own range (a replayed record may hold more).
        top = _PULSE_TOP[self.protocol]
        return v if math.isnan(v.pulse) or v.pulse <= top else Vitals(v.spo2, top, v.pi, v.status)

    def _between(self, t0: float, t1: float) -> bytes:
        p = self.protocol
        out = bytearray()
        if p in ("nonin2", "nonin7"):
            fmt = 2 if p == "nonin2" else 7
            for j in self._indices(t0, t1, 75.0):
                k, slot = divmod(j, nonin.PACKET_FRAMES)
                if self._packet is None or self._packet[0] != k:
                    t = k / 3.0
                    v = self._vitals(t)
                    scale = 255 if fmt == 2 else 40000
                    pleth = [round(self._pleth(t + i / 75.0, v) * scale) for i in range(nonin.PACKET_FRAMES)]
                    self._packet = (k, nonin.encode_packet(fmt, v.pulse, v.spo2, v.status, pleth))
                out += self._packet[1][slot * 5 : slot * 5 + 5]
        elif p == "nonin8":
            for k in self._indices(t0, t1, 1.0):
                v = self._vitals(float(k))
                out += nonin.encode_df8(v.pulse, v.spo2, v.status)
        elif p == "nonin13":
            for k in self._indices(t0, t1, 1.0 / self.spot_every_s, offset=2.0):
                t = 2.0 + k * self.spot_every_s
                v = self._vitals(t)
                out += nonin.encode_df13(v.pulse, v.spo2, v.status, self._when(t))
        elif p == "nonin_ascii":
            if t0 <= 0.0 < t1:
                out += b"Nonin real-time data output, SpO2 and pulse rate once a second\r\n"
            for k in self._indices(t0, t1, 1.0):
                v = self._vitals(float(k))
                out += nonin.encode_ascii(v.pulse, v.spo2)
        elif p == "masimo":
            for k in self._indices(t0, t1, 1.0):
                v = self._vitals(float(k))
                exc = masimo.EXC_SET | (masimo.EXC_SENSOR_OFF if v.status else 0)
                out += masimo.encode_line(
                    self._when(float(k)), v.spo2, v.pulse, v.pi, exc, serial=self.serial_number
                )
        else:
            encode = contec.encode_legacy if p == "cms50" else contec.encode_v46
            for j in self._indices(t0, t1, 60.0):
                t = j / 60.0
                v = self._vitals(math.floor(t))  # the monitor updates its numbers once a second
                out += encode(v.pulse, v.spo2, v.status, round(self._pleth(t, v) * 100))
        return bytes(out)


# ---- corruption ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Corruption:
    """Faults to inject: per-byte probabilities, and a wrong transmit speed."""

    bit_flip: float = 0.0
    drop: float = 0.0
    insert: float = 0.0
    wrong_speed: int | None = None  # the device sends at this baud; the receiver keeps the protocol's

    @property
    def active(self) -> bool:
        """True when anything is injected."""
        return bool(self.bit_flip or self.drop or self.insert or self.wrong_speed)


def _char_bits(byte: int, s: LineSettings) -> list[int]:
    data = [(byte >> k) & 1 for k in range(s.bytesize)]
    bits = [0, *data]
    if s.parity != "N":
        ones = sum(data)
        # Odd parity makes the count of ones odd, even parity makes it even.
        bits.append((ones + 1) % 2 if s.parity == "O" else ones % 2)
    bits += [1] * s.stopbits
    return bits


def uart_misread(data: bytes, sent: LineSettings, heard: LineSettings) -> bytes:
    """What a UART set to ``heard`` receives when characters are sent with ``sent`` (back to back)."""
    if not data:
        return b""
    levels: list[int] = []
    for b in data:
        levels += _char_bits(b, sent)
    levels += [1, 1]
    lv = np.array(levels, dtype=np.int8)
    zeros = np.flatnonzero(lv == 0)
    t_tx = 1.0 / sent.baudrate
    t_rx = 1.0 / heard.baudrate
    n = len(lv)

    def level(t: float) -> int:
        i = int(t / t_tx)
        return int(lv[i]) if i < n else 1

    out = bytearray()
    t = 0.0
    parity_bits = 0 if heard.parity == "N" else 1
    while True:
        k = int(np.searchsorted(zeros, math.ceil(t / t_tx - 1e-9)))
        if k >= len(zeros):
            break
        start = zeros[k] * t_tx
        if level(start + 0.5 * t_rx) != 0:
            t = start + t_tx
            continue
        value = 0
        for bit in range(heard.bytesize):
            value |= level(start + (1.5 + bit) * t_rx) << bit
        stop_at = start + (1.5 + heard.bytesize + parity_bits) * t_rx
        # A framing error reads as NUL (the Linux default without IGNPAR or PARMRK).
        out.append(value if level(stop_at) == 1 else 0)
        t = stop_at + 0.5 * t_rx
    return bytes(out)


class Corruptor:
    """Applies a :class:`Corruption` to chunks of bytes, seeded."""

    def __init__(self, corruption: Corruption, settings: LineSettings, seed: int = 0) -> None:
        self.corruption = corruption
        self.settings = settings
        self._rng = np.random.default_rng(seed)

    def apply(self, data: bytes) -> bytes:
        """The chunk as the receiver gets it."""
        c = self.corruption
        if not data or not c.active:
            return data
        rng = self._rng
        arr = np.frombuffer(data, dtype=np.uint8).copy()
        if c.bit_flip:
            hit = rng.random(len(arr)) < c.bit_flip
            arr[hit] ^= (1 << rng.integers(0, 8, int(hit.sum()))).astype(np.uint8)
        if c.drop:
            arr = arr[rng.random(len(arr)) >= c.drop]
        if c.insert and len(arr):
            at = np.flatnonzero(rng.random(len(arr)) < c.insert)
            arr = np.insert(arr, at, rng.integers(0, 256, len(at)).astype(np.uint8))
        out = arr.tobytes()
        if c.wrong_speed:
            sent = LineSettings(
                c.wrong_speed, self.settings.bytesize, self.settings.parity, self.settings.stopbits
            )
            out = uart_misread(out, sent, self.settings)
        return out


# ---- the pty device ------------------------------------------------------------------------------


class PtyOximeter:
    """A simulated monitor writing into a pseudo-terminal from a background thread.

    ``path`` is what a driver opens: the ``link`` given (a symlink kept pointing at the current
    pty) or the pty's own name.  :meth:`unplug` closes the pty and removes the link, as pulling a
    USB adapter removes its ``/dev/serial/by-id`` link; :meth:`replug` makes a new pty under the
    same link.
    """

    def __init__(
        self,
        protocol: str,
        *,
        link: Path | str | None = None,
        vitals: VitalsSource | None = None,
        corruption: Corruption | None = None,
        seed: int = 0,
        serial_number: str = "0000056661",
        spot_every_s: float = 30.0,
        command_timeout_s: float = 10.0,
    ) -> None:
        self.protocol = protocol
        self.link = Path(link) if link is not None else None
        self.source = FrameSource(
            protocol, vitals or VitalsModel(seed), serial_number=serial_number, spot_every_s=spot_every_s
        )
        self.corruptor = Corruptor(corruption or Corruption(), PARSERS[protocol].settings, seed)
        self.command_timeout_s = command_timeout_s
        self.needs_start = PARSERS[protocol].start_command is not None
        self.written = 0  # bytes handed to the pty
        self.lost = 0  # bytes the pty would not take (nobody reading)
        self.commands: list[bytes] = []  # what the host wrote, for inspection
        self._lock = threading.Lock()
        self._master: int | None = None
        self._slave: int | None = None
        self._tty = ""
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._streaming = not self.needs_start
        self._last_command = 0.0
        self._inbox = b""

    @property
    def path(self) -> str:
        """The path a driver opens."""
        return str(self.link) if self.link is not None else self._tty

    @property
    def streaming(self) -> bool:
        """False while a CMS50 4.6 waits for its start command (or its keep-alives stopped)."""
        return self._streaming

    def _open_pty(self) -> None:
        master, slave = os.openpty()
        # Raw at once: no echo of host commands back to the host, no CR/LF rewriting.
        tty.setraw(slave)
        os.set_blocking(master, False)
        name = os.ttyname(slave)
        if self.link is not None:
            tmp = self.link.with_name(self.link.name + ".new")
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
            tmp.symlink_to(name)
            tmp.replace(self.link)
        self._master, self._slave, self._tty = master, slave, name
        self._streaming = not self.needs_start

    def _close_pty(self) -> None:
        for fd in (self._master, self._slave):
            if fd is not None:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self._master = self._slave = None
        if self.link is not None:
            with contextlib.suppress(FileNotFoundError):
                self.link.unlink()

    def start(self) -> Self:
        """Open the pty and start writing; returns self."""
        with self._lock:
            self._open_pty()
        self._thread = threading.Thread(target=self._run, name=f"pty-oximeter-{self.protocol}", daemon=True)
        self._thread.start()
        return self

    def unplug(self) -> None:
        """Close the pty and remove the link, as pulling the device out does."""
        with self._lock:
            self._close_pty()

    def replug(self) -> None:
        """A new pty under the same link, as plugging the device back in does."""
        with self._lock:
            if self._master is None:
                self._open_pty()

    def stop(self) -> None:
        """Stop the thread and close the pty."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5.0)
        with self._lock:
            self._close_pty()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def _read_commands(self, fd: int, now: float) -> None:
        try:
            ready, _, _ = select.select([fd], [], [], 0)
            if not ready:
                return
            data = os.read(fd, 4096)
        except OSError:
            return
        self._inbox = (self._inbox + data)[-64:]
        for cmd in (contec.START_COMMAND, contec.KEEPALIVE_COMMAND):
            if cmd in self._inbox:
                self.commands.append(cmd)
                self._last_command = now
                if cmd == contec.START_COMMAND:
                    self._streaming = True
        self._inbox = self._inbox[-8:]

    def _run(self) -> None:
        t0 = time.monotonic()
        done = 0.0
        while not self._stop.wait(TICK_S):
            now = time.monotonic() - t0
            data = self.source.between(done, now)
            done = now
            with self._lock:
                fd = self._master
                if fd is None:
                    continue
                if self.needs_start:
                    self._read_commands(fd, now)
                    if self._streaming and now - self._last_command > self.command_timeout_s:
                        self._streaming = False
                if not self._streaming:
                    continue
                data = self.corruptor.apply(data)
                if not data:
                    continue
                try:
                    n = os.write(fd, data)
                except BlockingIOError:
                    n = 0
                except OSError as exc:
                    if exc.errno != errno.EIO:
                        _LOGGER.warning("pty oximeter: write failed: %s", exc)
                    n = 0
                self.written += n
                self.lost += len(data) - n


def start_demo_oximeter(directory: Path, protocol: str = "nonin2", seed: int = 7) -> PtyOximeter:
    """A simulated monitor for the demo: desaturations and sensor-off episodes, link ``directory/oximeter``."""
    # Its clock starts with the pty, before the gateway: the first desaturation comes late enough
    # that a short demo run on a busy machine still ends before it (tests/test_demo.py).
    vitals = VitalsModel(seed, desat_first_s=30.0, desat_every_s=90.0, sensor_off_first_s=70.0)
    return PtyOximeter(protocol, link=directory / "oximeter", vitals=vitals, seed=seed).start()
