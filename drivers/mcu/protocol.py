"""Pure glue between the firmware bridge protocol and the gateway's samples.

No I/O and no clock: the link hands decoded messages in, this module turns sample batches into
:class:`~gateway.sample.SampleBlock` columns with gateway timestamps, finds gaps from the node's
sample counters, and counts lost frames from sequence numbers.  Missing samples stay missing:
nothing is interpolated, so the pipeline sees the gap as missing data.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from firmware_bridge.messages import SAMPLE_INVALID, Channel, Samples
from firmware_bridge.timesync import ClockSync, TickUnwrapper
from gateway.records.model import Shape
from gateway.sample import MDC, Metric, Quality, SampleBlock, Stream, industrial_metric

_SEQ_WRAP = 1 << 16
_SEQ_REPLAY = 2  # a frame this few numbers behind is a repeat on the line, not a restart


class NodeRestartedError(Exception):
    """The node's sample counter or clock went backwards: it rebooted (seen with or without a HELLO)."""


class SeqTracker:
    """Counts frames lost between consecutive sequence numbers (u16, wrapping)."""

    __slots__ = ("_next", "lost", "resets")

    def __init__(self) -> None:
        self._next: int | None = None
        self.lost = 0
        self.resets = 0

    def see(self, seq: int) -> int:
        """Record one received sequence number; return how many frames before it were lost."""
        expected = self._next
        self._next = (seq + 1) % _SEQ_WRAP
        if expected is None:
            return 0
        gap = (seq - expected) % _SEQ_WRAP
        if gap >= _SEQ_WRAP - _SEQ_REPLAY:
            self._next = expected  # a repeated frame: neither a loss nor a restart
            return 0
        if gap >= _SEQ_WRAP // 2:
            # Far behind: the node restarted its counter (a reboot), not 30,000 lost frames.
            self.resets += 1
            return 0
        self.lost += gap
        return gap

    def reset(self) -> None:
        """Start over (the node announced a reboot)."""
        self._next = None


@dataclass(frozen=True, slots=True)
class Gap:
    """Samples of one channel that never arrived."""

    channel: str
    first_index: int  # the node's (unwrapped) counter of the first missing sample
    missing: int


#: A channel sampled at least this fast carries a waveform (a phase current, a vibration), not a level.
WAVEFORM_MIN_HZ = 100.0


def metric_for(channel: Channel, mapping: Mapping[str, str]) -> Metric:
    """The gateway metric of a channel: a configured MDC or custom name, else the channel's name."""
    name = mapping.get(channel.name, channel.name)
    mdc = MDC.get(name)
    if mdc is not None:
        return mdc
    shape: Shape = "waveform" if channel.rate_hz >= WAVEFORM_MIN_HZ else "level"
    return industrial_metric(name, channel.unit, shape)


@dataclass(slots=True)
class _ChannelState:
    desc: Channel
    stream: Stream
    step_ticks: float
    scale: float
    offset: float
    index: TickUnwrapper
    first_index: int | None = None
    next_index: int | None = None
    last_t: float = float("-inf")
    last_tick: float = float("-inf")  # the latest batch's first tick, unwrapped
    delivered: int = 0
    missing: int = 0


class SampleAssembler:
    """Turns SAMPLES batches into sample blocks with gateway time, and reports gaps."""

    def __init__(self, channels: Mapping[int, tuple[Channel, Stream]], clock: ClockSync) -> None:
        self.clock = clock
        self._ch: dict[int, _ChannelState] = {}
        for number, (desc, stream) in channels.items():
            rate = desc.rate_hz
            if rate <= 0:
                raise ValueError(f"channel {desc.name}: rate must be positive, not {rate} Hz")
            self._ch[number] = _ChannelState(
                desc, stream, clock.tick_hz / rate, desc.scale, desc.offset, TickUnwrapper()
            )
        self.unknown_channel = 0
        self.duplicates = 0
        self.clock_steps = 0

    @property
    def delivered(self) -> dict[str, int]:
        """Samples handed on, by channel name."""
        return {c.desc.name: c.delivered for c in self._ch.values()}

    @property
    def ranges(self) -> dict[str, tuple[int, int]]:
        """Per channel name: the first sample counter seen and the one expected next."""
        return {
            c.desc.name: (c.first_index, c.next_index)
            for c in self._ch.values()
            if c.first_index is not None and c.next_index is not None
        }

    @property
    def missing(self) -> dict[str, int]:
        """Samples found missing, by channel name."""
        return {c.desc.name: c.missing for c in self._ch.values()}

    def add(self, batch: Samples, wall_offset: float) -> tuple[SampleBlock | None, Gap | None]:
        """The block of a batch (None if nothing new) and the gap before it (None if none).

        ``wall_offset`` is ``time.time() - time.monotonic()`` of the gateway, for ``t_wall``.
        Raises :class:`NodeRestartedError` when the batch's sample counter or clock went back
        further than a repeated batch could: the node rebooted, its clock must be learnt again.
        """
        st = self._ch.get(batch.channel)
        if st is None:
            self.unknown_channel += 1
            return None, None
        n = len(batch.raw)
        first = st.index(batch.first_index)
        tick = self.clock.unwrap(batch.first_tick)
        if st.next_index is not None and st.next_index - first > 2 * max(n, 1):
            raise NodeRestartedError(
                f"sample counter of {st.desc.name} went back from {st.next_index} to {first}"
            )
        if tick < st.last_tick - self.clock.tick_hz:
            back_s = (st.last_tick - tick) / self.clock.tick_hz
            raise NodeRestartedError(f"clock of {st.desc.name} went back {back_s:.1f} s")
        st.last_tick = max(st.last_tick, tick)
        gap: Gap | None = None
        skip = 0
        if st.next_index is not None:
            if first > st.next_index:
                gap = Gap(st.desc.name, st.next_index, first - st.next_index)
                st.missing += gap.missing
            elif first < st.next_index:
                skip = st.next_index - first  # overlap with what was delivered already
                if skip >= n:
                    self.duplicates += 1
                    return None, None
        if st.first_index is None:
            st.first_index = first
        st.next_index = first + n
        raw = np.asarray(batch.raw[skip:], np.int64)
        k = np.arange(skip, n, dtype=np.float64)
        ticks = tick + k * st.step_ticks
        t_mono = self.clock.to_gateway(ticks)
        if t_mono[0] <= st.last_t:
            # A refit of the clock moved time back a little: shift the batch, never reorder.
            t_mono = t_mono + (st.last_t - t_mono[0] + 1e-6)
            self.clock_steps += 1
        st.last_t = float(t_mono[-1])
        value = raw.astype(np.float64) * st.scale + st.offset
        invalid = raw == SAMPLE_INVALID
        quality = np.zeros(len(raw), np.uint8)
        if invalid.any():
            value[invalid] = np.nan
            quality[invalid] = int(Quality.BAD_STATUS)
        st.delivered += len(raw)
        return SampleBlock(st.stream, t_mono, t_mono + wall_offset, value, quality), gap
