"""Sliding windows over per-stream rings, aligned per subject, with sensor alarms on the side.

:class:`Windower` is the sink drivers hand samples to.  The hand-off is synchronous and cheap:
one dict lookup, one ring append and one table lookup for the quality per sample; a block costs
a few numpy calls.  Nothing is windowed at hand-off time: :meth:`Windower.close_due`, called by
the owner on a timer, cuts every window that is due from the rings and computes its features.

Window grid: window ``k`` of every subject covers ``[k*hop - window, k*hop)`` in monotonic
seconds, so the streams of one subject (and of all subjects) share window ends whatever their
rates.  A window is due once ``k*hop + grace <= now``: the grace lets late transport deliver.
A stream with no usable sample in a window is reported as a gap (count 0, no features); nothing
is interpolated.

Alarms do not wait for windows: a sensor fault is reported on the sample that shows it, a lost
sensor by the next :meth:`Windower.close_due`, and a restore on the first good sample after a
loss.  After a fault the restore waits until good samples have kept coming for
``restore_after_s`` (a faulty one starts the wait over), so a flapping probe raises one fault and
one restore instead of a pair per flip.  A restore after a loss waits too: not before
``restore_after_s`` from the loss alarm (good data inside that hold restores nothing, a faulty
sample is a fault at once); the first good sample after the hold restores the stream.  The same
for a device its driver reports lost and back (:meth:`Windower.hold_device`, ``release_device``):
a "back" too soon after the loss is held, and the windower sends the restore once the hold is
over (with the device's next data, or at :meth:`Windower.close_due`), unless the device is lost
again first.  A device that comes and goes faster than that raises one loss and one restore per
``restore_after_s`` (plus the time to notice the loss) at most, never a pair per flip; after a
longer outage the hold is long over and the restore comes at once, as before.  Only state
changes raise alarms, never every faulty sample.  A silence its device explains raises nothing:
while another stream of the device reports a fault and keeps sending (a probe off flags SpO2 and
pulse, and no beat intervals come), the silent stream is not lost; its timeout starts over when
the device's last fault ends.

Per-model windows: a model trained on its own window length (``lengths``, per subject kind) is
scored on features of that length, all ending at the same window end on the subject's hop grid.
Rings then hold the longest length a subject needs; each window's rows are read once over the
longest span and each length's features are computed in one pass over its tail (``tails`` of the
record); a stream's gap and missing fraction are judged per length, so a gap in the long window
that the short tail does not see leaves the short model's inputs whole.

Memory: state is created per stream on first sight and kept for the life of the windower, so
memory is bounded by the configured streams (a few tens of kB per stream at 256 Hz).  A stream a
driver rebuilds under the same key (a server revised its rate, a unit changed) replaces the entry of
that key in place: one metric in the windows, no loss for the old object's silence, its condition
carried over; a new unit restarts the ring, a new rate keeps it.  So do the streams a device
delivered under its port before it named itself (:meth:`Windower.adopt_device`): under its name,
rows and condition kept.  A lost
stream keeps its ring and keeps producing gap windows: the twin sees the loss as gaps.
"""

from __future__ import annotations

import logging
import math
from bisect import bisect_left
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import replace
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

from gateway.contracts import Alarm, AlarmKind, StreamFeatures, WindowRecord
from gateway.errors import ConfigError
from gateway.pipeline.features import (
    basic_features_streams,
    hrv_features,
    missing_fraction,
    state_features,
    waveform_features,
)
from gateway.pipeline.ring import RingBuffer, in_order
from gateway.sample import FAULT_FLAGS, UNUSABLE_FLAGS, Quality, Sample, SampleBlock, Stream, valid_values

__all__ = ["Windower", "loss_time"]

log = logging.getLogger(__name__)

_FAULT = int(FAULT_FLAGS)
# Indexing a tuple costs ~15 ns; `quality & FAULT_FLAGS` on an IntFlag costs ~650 ns.
_IS_FAULT: tuple[bool, ...] = tuple(bool(q & _FAULT) for q in range(256))
# bytes.translate(None, these) deletes every quality byte that is not a fault (or is usable): an
# empty result answers "any fault in this block?" in ~0.1 us, where numpy takes ~1 us on short arrays.
_NOT_FAULT_BYTES = bytes(q for q in range(256) if not q & _FAULT)
#: A ring row's quality bit (above the device's flags) for a value a plausibility rule puts out of
#: range: left out of the window's features like a flagged row, and counted apart.
IMPLAUSIBLE = 1 << 7
_LEFT_OUT = UNUSABLE_FLAGS | IMPLAUSIBLE
_USABLE_BYTES = bytes(q for q in range(256) if not q & _LEFT_OUT)
_FLAGGED_BYTES = bytes(q for q in range(256) if q & _LEFT_OUT != IMPLAUSIBLE)

#: Ring capacity = rate x (window + grace + hop) x this, so a window is still held when it closes.
CAPACITY_SAFETY = 2.0
#: Rate assumed for sizing the ring of an event series (no nominal rate), e.g. RR intervals.
EVENT_RATE_HZ = 8.0
#: Longest RR interval taken for a rhythm (30 beats/min): an RR stream is lost only after three
#: such intervals without a beat, however short the gateway-wide timeout set for 1 Hz vitals.
RR_LONGEST_S = 2.0
MIN_CAPACITY = 64
#: A ring that loses rows not yet windowed doubles, up to this many rows (~6.5 MB).
MAX_CAPACITY = 1 << 18

F8 = npt.NDArray[np.float64]
U1 = npt.NDArray[np.uint8]

_OK, _FAULTED, _LOST = 0, 1, 2
_NO_ROWS: F8 = np.empty(0)


def loss_time(stream: Stream, lost_after_s: float) -> float:
    """How long ``stream`` may be silent before it is lost, given the gateway-wide ``lost_after_s``."""
    if stream.on_change:
        return math.inf  # a Boolean or a state reports only when it changes: silence is no loss
    # A slow stream (a temperature every 10 s) is lost only after three missed samples,
    # not after the gateway-wide timeout that suits 1 Hz vitals.
    if stream.rate_hz:
        return max(lost_after_s, 3.0 / stream.rate_hz)
    if stream.metric.rr:
        # Beat intervals come as the heart beats: a pause of a slow rhythm is no lost sensor.
        return max(lost_after_s, 3.0 * RR_LONGEST_S)
    return lost_after_s


#: What a device's quality flags say, in words for the log.
_FLAG_WORDS = (
    (Quality.SENSOR_OFF, "sensor off (probe off, electrode detached)"),
    (Quality.BAD_STATUS, "the device reports the value bad"),
    (Quality.ARTIFACT, "artifact"),
    (Quality.IMPUTED, "value filled in, not measured"),
    (Quality.LOW_PERFUSION, "low perfusion"),
    (Quality.UNCERTAIN, "value uncertain"),
)


def fault_words(quality: int) -> str:
    """A sample's quality flags in words, e.g. "sensor off (probe off, electrode detached)"."""
    return ", ".join(words for flag, words in _FLAG_WORDS if quality & int(flag)) or "no flag"


_STATUS_ALARM = {_FAULTED: AlarmKind.SENSOR_FAULT, _LOST: AlarmKind.SENSOR_LOST}
_RESUMED_STATUS = {kind: status for status, kind in _STATUS_ALARM.items()}


class _StreamState:
    __slots__ = (
        "aliases",
        "expected",
        "explained_by",
        "fault_quality",
        "faulted_at",
        "lost_after_s",
        "lost_rows",
        "restore_at",
        "revived_at",
        "ring",
        "rr",
        "shape",
        "status",
        "stream",
    )

    def __init__(self, stream: Stream, ring: RingBuffer, window_s: float, lost_after_s: float) -> None:
        self.bind(stream, window_s, lost_after_s)
        # When its device came back, or a fault its device reported ended: silence is counted from
        # here, not from its last sample.
        self.revived_at = -math.inf
        self.ring = ring
        self.status = _OK
        self.faulted_at = -math.inf  # when its current (or last) fault began
        self.fault_quality = 0  # the flags of the sample that began it
        # The stream of its device whose fault explains its silence (not raised as a loss), if any.
        self.explained_by: _StreamState | None = None
        # Equal Stream objects seen under other ids (and the streams it replaced under its key);
        # held so their ids cannot be reused.
        self.aliases: list[Stream] = []
        self.lost_rows = 0  # ring.overwritten when last looked at
        # While faulted: t_mono from which good samples restore the stream (first good sample of
        # the current unbroken good run + restore_after_s); None until a good sample comes.
        # While lost: the end of the hold after the loss alarm (None: a driver-reported outage).
        self.restore_at: float | None = None

    def bind(self, stream: Stream, window_s: float, lost_after_s: float) -> None:
        """Take the stream's rate, unit and shape: at creation, and when a driver rebuilds it."""
        self.stream = stream
        self.lost_after_s = loss_time(stream, lost_after_s)
        self.rr = stream.metric.rr
        self.shape = stream.metric.shape
        self.expected = window_s * stream.rate_hz if stream.rate_hz else None


class _SubjectState:
    __slots__ = ("emitted", "first_t", "kind", "lengths", "next_k", "span", "streams", "subject")

    def __init__(self, subject: str, kind: str, window_s: float, lengths: tuple[float, ...]) -> None:
        self.subject = subject
        self.kind = kind
        # Window lengths besides the pipeline's that this subject's models are scored on.
        self.lengths = lengths
        self.span = max(window_s, *lengths) if lengths else window_s  # the longest, what rings hold
        self.streams: list[_StreamState] = []
        self.next_k: int | None = None  # next window index to emit; None before any data
        self.emitted = False
        # Oldest t_mono any of its streams started with; rings may have overwritten it since.
        self.first_t = math.inf


class Windower:
    """Per-stream rings, per-subject aligned windows with features, and sensor alarms.

    Not thread-safe: call it from the event loop only.  ``on_alarm`` runs synchronously inside
    :meth:`put`, :meth:`put_block` and :meth:`close_due`, so it must be cheap and must not raise.
    """

    def __init__(
        self,
        *,
        window_s: float,
        hop_s: float,
        grace_s: float,
        lost_after_s: float,
        on_alarm: Callable[[Alarm], None],
        restore_after_s: float = 2.0,
        lengths: Mapping[str, Sequence[float]] | None = None,
    ) -> None:
        """``lengths``: per subject kind, the other window lengths (s) its models are scored on."""
        for name, value, zero_ok in (
            ("window_s", window_s, False),
            ("hop_s", hop_s, False),
            ("grace_s", grace_s, True),
            ("lost_after_s", lost_after_s, False),
            ("restore_after_s", restore_after_s, True),
        ):
            if not ((value >= 0 if zero_ok else value > 0) and math.isfinite(value)):
                raise ConfigError(
                    f"windower: {name}: got {value!r}: must be a finite number of seconds, "
                    f"{'>= 0' if zero_ok else '> 0'}: fix the pipeline settings"
                )
        self.window_s = float(window_s)
        self.hop_s = float(hop_s)
        self.grace_s = float(grace_s)
        self.lost_after_s = float(lost_after_s)
        self.restore_after_s = float(restore_after_s)
        self._on_alarm = on_alarm
        self._lengths: dict[str, tuple[float, ...]] = {}
        for kind, wanted in (lengths or {}).items():
            bad = [w for w in wanted if not (w > 0 and math.isfinite(w))]
            if bad:
                raise ConfigError(
                    f"windower: model window lengths for {kind} subjects: got {bad!r}: must be finite "
                    "numbers of seconds > 0: fix the models' window_s"
                )
            extra = sorted({float(w) for w in wanted if abs(w - self.window_s) > 1e-9})
            if extra:
                self._lengths[kind] = tuple(extra)
        ratio = self.window_s / self.hop_s
        # When the window is a whole number of hops, start = (k - m) * hop equals an earlier end
        # bit for bit, so adjacent windows neither share nor lose a sample to rounding.
        self._hops_per_window = round(ratio) if abs(ratio - round(ratio)) < 1e-9 else None
        self._by_id: dict[int, _StreamState] = {}
        self._by_stream: dict[Stream, _StreamState] = {}
        self._subjects: dict[str, _SubjectState] = {}
        # Devices whose streams went silent together: (source, device) -> those streams.
        self._device_lost: dict[tuple[str, str], list[_StreamState]] = {}
        # Devices whose data ended an outage before their driver said they were back.
        self._device_back: set[tuple[str, str]] = set()
        # Devices their driver said were back too soon after the loss: restored at this t_mono.
        self._release_due: dict[tuple[str, str], float] = {}
        # Conditions a previous run left on (:meth:`resume`), taken up by each stream when first seen:
        # a stream's fault or loss by its key; a device's outage by the group it started with.
        self._resumed: dict[str, int] = {}
        self._resumed_devices: dict[tuple[str, str], list[_StreamState]] = {}
        self._windows = 0
        self._gaps = 0
        self._alarms = 0

    def resume(self, kind: AlarmKind, stream: Stream) -> None:
        """A sensor fault, sensor loss or device loss a previous run left on for ``stream`` (or its device).

        The stream's data after the start judges it as if the gateway had never stopped: a fault
        ends after ``restore_after_s`` of good data and a loss with the first data (the loss is
        older than any hold), each with its ordinary restore; data still faulty sends nothing, and
        a driver reporting the device lost again repeats the same incident.  A device that never
        delivers again stays lost, which is true.  Call before the stream's first sample: a stream
        (or device) already here keeps its state, which this run's data have judged.
        """
        if any(st.stream.key == stream.key for st in self._by_stream.values()):
            return  # adopted from the port it delivered under (adopt_device)
        if kind is AlarmKind.DEVICE_LOST:
            key = (stream.source, stream.device)
            if key not in self._device_lost:
                self._device_lost[key] = self._resumed_devices[key] = []
        elif kind in _RESUMED_STATUS:
            self._resumed[stream.key] = _RESUMED_STATUS[kind]

    # ---- hand-off (hot path) -------------------------------------------------------------

    def put(self, sample: Sample, implausible: bool = False) -> None:
        """Accept one sample (out-of-order ones are dropped and counted); ``implausible``: out of a rule's range."""
        st = self._by_id.get(id(sample.stream))
        if st is None:
            st = self._adopt(sample.stream, sample.t_mono)
        q = int(sample.quality) | IMPLAUSIBLE if implausible else sample.quality
        if st.ring.append(sample.t_mono, sample.t_wall, sample.value, q):
            if _IS_FAULT[sample.quality]:
                if st.status != _FAULTED:
                    self._change(st, _FAULTED, sample.t_mono, sample.t_wall, int(sample.quality))
                else:
                    st.restore_at = None  # the stream has to prove itself again from scratch
            elif st.status:
                self._good_while_down(st, sample.t_mono, sample.t_wall, int(sample.quality))

    def _good_while_down(self, st: _StreamState, t_mono: float, t_wall: float, quality: int) -> None:
        """A good sample of a faulted or lost stream: restore only after the hold."""
        if st.status == _LOST:
            if st.restore_at is not None and t_mono < st.restore_at:
                return  # too soon after the loss alarm: a restore now could flap
        elif st.status == _FAULTED:
            due = st.restore_at
            if due is None:
                due = st.restore_at = t_mono + self.restore_after_s
            if t_mono < due:
                return
        self._change(st, _OK, t_mono, t_wall, quality)

    def put_block(self, block: SampleBlock, implausible: npt.NDArray[np.bool_] | None = None) -> None:
        """Accept many samples of one stream; state changes are evaluated row by row, in order.

        ``implausible``: which rows a plausibility rule puts out of range (None: none).
        """
        n = len(block)
        if n == 0:
            return
        st = self._by_id.get(id(block.stream))
        if st is None:
            finite = block.t_mono[np.isfinite(block.t_mono)]
            st = self._adopt(block.stream, float(finite[0]) if finite.size else math.nan)
        ring = st.ring
        before = ring.last_t_mono
        quality = block.quality
        if implausible is not None:
            quality = np.asarray(quality, np.uint8) | np.where(
                implausible, np.uint8(IMPLAUSIBLE), np.uint8(0)
            )
        stored = ring.extend(block.t_mono, block.t_wall, block.value, quality)
        if stored == 0:
            return
        tm, tw, q = block.t_mono, block.t_wall, np.asarray(block.quality, np.uint8)
        if stored != n:
            keep = in_order(tm, before)
            tm, tw, q = tm[keep], tw[keep], q[keep]
        if st.status == _LOST and st.restore_at is not None and tm[0] < st.restore_at:
            # Good rows inside the hold after a loss restore nothing; a faulty row is a fault at
            # once, and the first row after the hold decides as usual.
            i = int(np.searchsorted(tm, st.restore_at, side="left"))
            faulty = np.flatnonzero(q[:i] & _FAULT)
            if faulty.size:
                i = int(faulty[0])
            if i == tm.size:
                return
            tm, tw, q = tm[i:], tw[i:], q[i:]
        if st.status != _FAULTED and not q.tobytes().translate(None, _NOT_FAULT_BYTES):  # no faulty row
            if st.status:
                self._change(st, _OK, float(tm[0]), float(tw[0]), int(q[0]))
            return
        self._block_states(st, tm, tw, q)

    def _block_states(self, st: _StreamState, tm: F8, tw: F8, q: U1) -> None:
        """Raise the alarms :meth:`put` would raise for these rows, from their fault/good runs."""
        faulty = (q & _FAULT) != 0
        n = faulty.size
        edges = np.flatnonzero(faulty[1:] != faulty[:-1]) + 1
        starts = np.concatenate(([0], edges))
        ends = np.concatenate((edges, [n]))
        first_faulty = bool(faulty[0])
        # Runs alternate between faulty and good, so every other run is of one kind.
        fault_starts = starts[0 if first_faulty else 1 :: 2].tolist()
        good_starts = starts[1 if first_faulty else 0 :: 2]
        good_ends = ends[1 if first_faulty else 0 :: 2]
        # Each good run would restore a faulted stream at its first row at or after `due`; a
        # good first run continues the hold a faulted stream already started.
        due = tm[good_starts] + self.restore_after_s
        if not first_faulty and st.status == _FAULTED and st.restore_at is not None:
            due[0] = st.restore_at
        done = np.maximum(np.searchsorted(tm, due, side="left"), good_starts)
        restores = done[done < good_ends].tolist()
        # Walk the state changes only (fault -> next restore -> next fault ...), not the rows.
        status = st.status
        events: list[tuple[int, int]] = []
        after = 0
        if status == _LOST:  # any data ends a loss: a faulty row is a fault, a good one a restore
            status = _FAULTED if first_faulty else _OK
            events.append((0, status))
            after = 1
        while True:
            rows = restores if status == _FAULTED else fault_starts
            k = bisect_left(rows, after)
            if k == len(rows):
                break
            status = _OK if status == _FAULTED else _FAULTED
            events.append((rows[k], status))
            after = rows[k] + 1
        for i, new in events:
            self._change(st, new, float(tm[i]), float(tw[i]), int(q[i]))
        # A hold still running at the end of the block carries over into the next one.
        st.restore_at = float(due[-1]) if status == _FAULTED and not faulty[-1] else None

    def _adopt(self, stream: Stream, t_first: float) -> _StreamState:
        """State for a stream seen under a new object id: an equal stream's, its key's, or a fresh one."""
        st = self._by_stream.get(stream)
        if st is None:
            subj = self._subjects.get(stream.subject)
            same_key = next((s for s in subj.streams if s.stream.key == stream.key), None) if subj else None
            if same_key is not None:
                st = self._rebuilt(same_key, stream)
            else:
                if subj is None:
                    subj = self._subjects[stream.subject] = _SubjectState(
                        stream.subject, stream.kind, self.window_s, self._lengths.get(stream.kind, ())
                    )
                st = self._fresh(subj, stream, t_first)
        elif st.stream is not stream:
            if self._by_id.get(id(st.stream)) is st:
                st.aliases.append(stream)
            else:  # named by adopt_device, never delivered: the driver's own object from now on
                st.stream = stream
                self._by_stream[stream] = self._by_stream.pop(stream)
        self._by_id[id(stream)] = st
        return st

    def _fresh(self, subj: _SubjectState, stream: Stream, t_first: float) -> _StreamState:
        """State for a stream of ``subj`` never seen before (or a condition a previous run left on)."""
        ring = RingBuffer(self.capacity_for(stream, subj.span))
        st = _StreamState(stream, ring, self.window_s, self.lost_after_s)
        st.status = self._resumed.pop(stream.key, _OK)
        if st.status == _FAULTED:
            # A previous run's fault: this run knows it from its first data.
            st.faulted_at = t_first if math.isfinite(t_first) else -math.inf
        device = (stream.source, stream.device)
        group = self._device_lost.get(device)
        # Its device's outage is still the one a previous run reported; a stream lost on its
        # own before that outage stays out of it and is restored on its own, as without a stop.
        if st.status != _LOST and group is not None and group is self._resumed_devices.get(device):
            st.status = _LOST
            group.append(st)
        self._by_stream[stream] = st
        subj.streams.append(st)
        subj.streams.sort(key=lambda s: s.stream.key)
        if math.isfinite(t_first):
            subj.first_t = min(subj.first_t, t_first)
        log.debug("windower: new stream %s (ring of %d rows)", stream.key, st.ring.capacity)
        return st

    def _rebuilt(self, st: _StreamState, stream: Stream) -> _StreamState:
        """A driver rebuilt the stream of ``st`` under the same key (another rate or unit): it replaces it.

        The state is the same one, so the metric stays one stream in the subject's windows, the
        old object's silence is no loss, and a fault or loss it had (and its device outage) is
        ended by the new stream's data with the usual restore.  A new unit restarts the ring: rows
        in the old unit would be windowed with the new.  A new rate keeps the rows (the same
        quantity, only sampled otherwise) and grows the ring if the new rate needs more.
        """
        # A sample of the old object later (the driver went back to it) is adopted again and rebinds
        # the entry to it, so its rate and unit apply and rows of one unit are never windowed with another's.
        old = self._unlink(st)
        st.bind(stream, self.window_s, self.lost_after_s)
        self._by_stream[stream] = st
        span = self._subjects[stream.subject].span
        if old.metric.unit != stream.metric.unit:
            st.ring = RingBuffer(self.capacity_for(stream, span))
            st.lost_rows = 0
        elif (wanted := self.capacity_for(stream, span)) > st.ring.capacity:
            st.ring.resize(wanted)
        log.info(
            "windower: stream %s: rebuilt by its driver (%s at %s Hz, was %s at %s Hz)",
            stream.key,
            stream.metric.unit,
            stream.rate_hz,
            old.metric.unit,
            old.rate_hz,
        )
        return st

    def _unlink(self, st: _StreamState) -> Stream:
        """Its stream (and objects equal to it) no longer lead to ``st``; that stream."""
        old = st.stream
        del self._by_stream[old]
        for alias in (old, *st.aliases):
            if self._by_id.get(id(alias)) is st:
                del self._by_id[id(alias)]
        st.aliases.clear()
        return old

    def adopt_device(self, source: str, port: str, device: str, subject: str) -> int:
        """``source``'s streams of ``subject`` under ``port`` are its ``device``'s (it named itself): how many move.

        Their rings (the samples not windowed yet), status and outage go under the device's name, so
        its windows hold the port's samples with the device's, and a fault or loss raised under the
        port is ended by the device's data with the usual restore; no loss alarm is raised.  A stream
        of another subject, or whose name under the device is taken, ends as :meth:`forget_source` ends it.
        """
        taken = {st.stream.key for st in self._by_stream.values()}
        moved = 0
        for st in list(self._by_stream.values()):
            old = st.stream
            new = replace(old, device=device)
            if (old.source, old.device, old.subject) != (source, port, subject) or new.key in taken:
                continue
            self._unlink(st)
            st.stream = new
            self._by_stream[new] = st
            moved += 1
        if moved:
            self._subjects[subject].streams.sort(key=lambda s: s.stream.key)
        here, there = (source, port), (source, device)
        for table in (self._device_lost, self._resumed_devices):
            group = table.get(here)
            if group is not None and there not in table:
                # In place: an outage a previous run left on is the same list in both tables.
                group[:] = [st for st in group if st.stream.device == device]
                table[there] = table.pop(here)
        if here in self._release_due and there not in self._release_due:
            self._release_due[there] = self._release_due.pop(here)
        if here in self._device_back:
            self._device_back.add(there)
        prefix, to = f"{source}/{port}/", f"{source}/{device}/"
        for key in [k for k in self._resumed if k.startswith(prefix)]:
            self._resumed.setdefault(to + key.removeprefix(prefix), self._resumed.pop(key))
        self.forget_source(source, port)
        if moved:
            log.info(
                "windower: source %s: %d stream(s) of its port go under its device's own name", source, moved
            )
        return moved

    def capacity_for(self, stream: Stream, window_s: float | None = None) -> int:
        """Ring rows for a stream: its rate x (longest window + grace + hop) x a safety factor."""
        rate = stream.rate_hz or EVENT_RATE_HZ
        span = (window_s or self.window_s) + self.grace_s + self.hop_s
        return max(MIN_CAPACITY, math.ceil(rate * span * CAPACITY_SAFETY))

    def _change(self, st: _StreamState, status: int, t_mono: float, t_wall: float, quality: int) -> None:
        """Move a stream to a new sensor state and raise the alarm that says so."""
        old = st.status
        st.status = status
        # A loss is held for restore_after_s (see the module docstring); other states start clear.
        st.restore_at = t_mono + self.restore_after_s if status == _LOST else None
        stream = st.stream
        st.explained_by = None
        if status == _FAULTED:
            st.faulted_at = t_mono
            st.fault_quality = quality
        elif old == _FAULTED:
            self._fault_ended(st, t_mono)
        if old == _LOST and self._device_lost:
            device = (stream.source, stream.device)
            group = self._device_lost.get(device)
            # Only a stream of the outage ends it: one lost on its own before it is restored alone.
            if group is not None and st in group:
                del self._device_lost[device]
                self._device_back.add(device)
                self._device_restored(st, group, t_mono, t_wall)
                if status == _OK:
                    return
        if status == _OK:
            kind = AlarmKind.SENSOR_RESTORED
            detail: dict[str, float | str] = {"after": _STATUS_ALARM[old].value, "quality": quality}
            log.info("windower: stream %s: sensor restored after %s", stream.key, _STATUS_ALARM[old].value)
        elif status == _FAULTED:
            kind = AlarmKind.SENSOR_FAULT
            detail = {"quality": quality}
            log.warning(
                "windower: stream %s: sensor fault: %s (quality flags %d)",
                stream.key,
                fault_words(quality),
                quality,
            )
        else:
            kind = AlarmKind.SENSOR_LOST
            detail = {"silent_s": round(t_mono - st.ring.last_t_mono, 1)}
            log.warning(
                "windower: stream %s: sensor lost (no data for %.1f s)", stream.key, detail["silent_s"]
            )
        self._alarms += 1
        self._on_alarm(Alarm(kind, stream.subject, t_mono, t_wall, stream, detail))

    def _fault_ended(self, st: _StreamState, t_mono: float) -> None:
        """A stream's fault is over: once its device has none left, the silences it explained count from now.

        A probe off silences the streams the device derives from the beats (RR intervals) without
        flagging them; those not raised as lost meanwhile (:meth:`_find_lost`), or fallen silent
        since the fault began and not yet timed out, each get their own timeout from the end of
        the fault before their silence is a loss.
        """
        device = (st.stream.source, st.stream.device)
        siblings = [
            o
            for o in self._by_stream.values()
            if o is not st and (o.stream.source, o.stream.device) == device
        ]
        if any(o.status == _FAULTED for o in siblings):
            return
        for o in siblings:
            explained = o.explained_by is not None
            if o.status == _OK and (explained or o.ring.last_t_mono >= st.faulted_at - o.lost_after_s):
                o.revived_at = max(o.revived_at, t_mono)
            o.explained_by = None

    # ---- windows (timer path) ------------------------------------------------------------

    def _window_start(self, k: int) -> float:
        m = self._hops_per_window
        return (k - m) * self.hop_s if m is not None else k * self.hop_s - self.window_s

    def _start_of(self, k: int, length: float) -> float:
        """Start of the ``length``-second window ending at window ``k``'s end (exact on the grid)."""
        if abs(length - self.window_s) <= 1e-9:
            return self._window_start(k)
        ratio = length / self.hop_s
        m = round(ratio)
        return (k - m) * self.hop_s if abs(ratio - m) < 1e-9 else k * self.hop_s - length

    def _last_due(self, now_mono: float) -> int:
        """Largest k with ``k*hop + grace <= now`` (evaluated exactly as the due test reads)."""
        hop, grace = self.hop_s, self.grace_s
        k = math.floor((now_mono - grace) / hop)
        while (k + 1) * hop + grace <= now_mono:
            k += 1
        while k * hop + grace > now_mono:
            k -= 1
        return k

    def _first_after(self, t: float) -> int:
        """Smallest k whose window ends after ``t``."""
        hop = self.hop_s
        k = math.floor(t / hop) + 1
        while (k - 1) * hop > t:
            k -= 1
        while k * hop <= t:
            k += 1
        return k

    def close_due(self, now_mono: float, now_wall: float) -> list[WindowRecord]:
        """Cut every window due at ``now_mono`` (each once, in order) and report lost sensors."""
        records = [record for chunk in self.closing(now_mono, now_wall) for record in chunk]
        if len(self._subjects) > 1:
            records.sort(key=lambda r: r.index)  # stable: subjects keep their order within a window
        return records

    def closing(self, now_mono: float, now_wall: float) -> Iterator[list[WindowRecord]]:
        """As :meth:`close_due`, one subject's due windows at a time, not sorted across subjects.

        A caller may give the event loop a turn between subjects (a thousand streams take tens of
        ms to cut).  Each subject's state has moved on before its windows are handed out; a
        subject not reached when the caller stops is cut by the next call, so nothing is lost.
        """
        last_due = self._last_due(now_mono)
        if self._release_due:
            self._release_held(now_mono, now_wall)
        self._find_lost(now_mono, now_wall)
        for subj in list(self._subjects.values()):  # an alarm handler may hand over new streams
            if not subj.emitted:
                first = min(subj.first_t, *(st.ring.first_t_mono for st in subj.streams))
                if not math.isfinite(first):
                    continue
                # Until a window is out, a stream that joins with older data moves the start back.
                subj.next_k = self._first_after(first)
            next_k = subj.next_k
            if next_k is None or last_due < next_k:
                continue
            self._grow_short_rings(subj)
            offset = self._wall_offset(subj, now_mono, now_wall)
            chunk = [self._record(subj, k, offset) for k in range(next_k, last_due + 1)]
            subj.next_k = last_due + 1
            subj.emitted = True
            # Rows before the next window are consumed: overwriting them is no loss.
            keep_from = self._start_of(last_due + 1, subj.span)
            for st in subj.streams:
                st.ring.release(keep_from)
            yield chunk

    def _find_lost(self, now_mono: float, now_wall: float) -> None:
        """Streams silent beyond their timeout: one device alarm when a device's streams go together.

        A PLC or monitor that drops off takes all its streams with it; that is one incident and
        raises one ``device_lost`` naming how many streams it took down, not one alarm per stream.
        A lone silent stream is a ``sensor_lost`` of its own.  A silence its device explains is
        none: while another stream of the device reports a fault and keeps sending (a probe off,
        flagged on SpO2 and pulse), the beat intervals it cannot measure are not raised lost as a
        second alarm of the same incident; their timeout starts over when the fault ends
        (:meth:`_fault_ended`).  A fault explains only a silence that began no more than the
        stream's timeout before it: a node bad for hours does not hide another node's loss.
        """
        newly: dict[tuple[str, str], list[_StreamState]] = {}
        quiet: set[int] = set()
        for subj in list(self._subjects.values()):  # an alarm handler may hand over new streams
            for st in subj.streams:
                ring = st.ring
                if (
                    st.status != _LOST
                    and len(ring)
                    and now_mono - max(ring.last_t_mono, st.revived_at) > st.lost_after_s
                ):
                    newly.setdefault((st.stream.source, st.stream.device), []).append(st)
                    quiet.add(id(st))
        if newly:
            # The stream still sending whose fault began latest, per device: looked up only now,
            # when something fell silent.
            latest: dict[tuple[str, str], _StreamState] = {}
            for o in self._by_stream.values():
                if o.status == _FAULTED and id(o) not in quiet:
                    key = (o.stream.source, o.stream.device)
                    if key not in latest or o.faulted_at > latest[key].faulted_at:
                        latest[key] = o
            for key in latest.keys() & newly.keys():
                unexplained = []
                for st in newly[key]:
                    if latest[key].faulted_at >= st.ring.last_t_mono - st.lost_after_s:
                        st.explained_by = latest[key]
                    else:
                        unexplained.append(st)
                if unexplained:
                    newly[key] = unexplained
                else:
                    del newly[key]
        for key, group in newly.items():
            known = self._device_lost.get(key)
            if known is not None:  # a slower stream of a device already reported lost
                for st in group:
                    st.status, st.restore_at = _LOST, now_mono + self.restore_after_s
                known.extend(group)
            elif len(group) == 1:
                self._change(group[0], _LOST, now_mono, now_wall, 0)
            else:
                for st in group:
                    st.status, st.restore_at = _LOST, now_mono + self.restore_after_s
                self._device_lost[key] = group
                first = group[0]
                silent = round(now_mono - max(st.ring.last_t_mono for st in group), 1)
                log.warning(
                    "windower: device %s of source %s: lost (%d streams silent for %.1f s)",
                    key[1],
                    key[0],
                    len(group),
                    silent,
                )
                self._alarms += 1
                self._on_alarm(
                    Alarm(
                        AlarmKind.DEVICE_LOST,
                        first.stream.subject,
                        now_mono,
                        now_wall,
                        first.stream,
                        {"streams": len(group), "silent_s": silent},
                    )
                )

    def hold_device(self, stream: Stream, t_mono: float | None = None) -> int | None:
        """A driver reports the device of ``stream`` lost: its streams join one outage, silently.

        Returns how many streams the outage takes down, or None when the windower already
        reported this device lost (the driver's alarm then repeats the same incident).  With the
        loss's ``t_mono`` the outage is held for ``restore_after_s`` like the windower's own.
        """
        key = (stream.source, stream.device)
        self._device_back.discard(key)
        self._release_due.pop(key, None)  # lost again before a held restore was due: one outage
        if key in self._device_lost:
            return None
        group = [st for st in self._by_stream.values() if (st.stream.source, st.stream.device) == key]
        hold = None if t_mono is None else t_mono + self.restore_after_s
        for st in group:
            st.status, st.restore_at = _LOST, hold
        self._device_lost[key] = group
        return len(group)

    def release_device(self, stream: Stream, t_mono: float) -> int | Literal["repeat", "unknown", "held"]:
        """A driver reports the device back: how many streams return.

        ``"repeat"`` when its data already ended the outage (and the windower said so), ``"unknown"``
        when no outage of this device is known (the driver's alarm stands on its own), ``"held"``
        when it is too soon after the loss: the windower restores the device itself once the hold
        is over (its data or :meth:`close_due`), unless it is lost again first.
        """
        key = (stream.source, stream.device)
        group = self._device_lost.get(key)
        if group is None:
            if key in self._device_back:
                self._device_back.discard(key)
                return "repeat"
            return "unknown"
        due = max((st.restore_at for st in group if st.restore_at is not None), default=None)
        if due is not None and t_mono < due:
            self._release_due[key] = due
            return "held"
        del self._device_lost[key]
        for st in group:
            if st.status == _LOST:
                st.status, st.revived_at, st.restore_at = _OK, t_mono, None
        return len(group)

    def _release_held(self, now_mono: float, now_wall: float) -> None:
        """Restore devices their driver said were back, once the hold after the loss is over."""
        for key, due in list(self._release_due.items()):
            if now_mono < due:
                continue
            del self._release_due[key]
            group = self._device_lost.pop(key, None)
            if not group:
                continue  # its data restored it first, and the windower said so
            first = group[0]
            first.status, first.revived_at, first.restore_at = _OK, now_mono, None
            self._device_restored(first, group, now_mono, now_wall)

    def _device_restored(
        self, st: _StreamState, group: list[_StreamState], t_mono: float, t_wall: float
    ) -> None:
        """Data from a lost device again: one restore; its other streams get a fresh timeout."""
        for other in group:
            if other is not st and other.status == _LOST:
                other.status, other.revived_at, other.restore_at = _OK, t_mono, None
        log.info(
            "windower: device %s of source %s: restored (%d streams had gone)",
            st.stream.device,
            st.stream.source,
            len(group),
        )
        self._alarms += 1
        self._on_alarm(
            Alarm(
                AlarmKind.DEVICE_RESTORED,
                st.stream.subject,
                t_mono,
                t_wall,
                st.stream,
                {"after": AlarmKind.DEVICE_LOST.value, "streams": len(group)},
            )
        )

    def _grow_short_rings(self, subj: _SubjectState) -> None:
        """Double a ring that overwrote rows not yet windowed, so the loss does not recur."""
        for st in subj.streams:
            ring = st.ring
            if ring.overwritten > st.lost_rows:
                st.lost_rows = ring.overwritten
                if ring.capacity < MAX_CAPACITY:
                    # The stream runs faster than its nominal rate says, or close_due ran late.
                    new = min(MAX_CAPACITY, ring.capacity * 2)
                    log.warning(
                        "windower: stream %s: ring of %d rows overwrote data not yet windowed; growing to %d",
                        st.stream.key,
                        ring.capacity,
                        new,
                    )
                    ring.resize(new)

    @staticmethod
    def _wall_offset(subj: _SubjectState, now_mono: float, now_wall: float) -> float:
        """``t_wall - t_mono`` of the subject's newest sample, else of the gateway clock."""
        newest = max(subj.streams, key=lambda s: s.ring.last_t_mono).ring
        offset = newest.last_t_wall - newest.last_t_mono
        return offset if math.isfinite(offset) else now_wall - now_mono

    def _record(self, subj: _SubjectState, k: int, wall_offset: float) -> WindowRecord:
        """Features of every stream of ``subj`` over window ``k`` (and over each of its other lengths)."""
        end = k * self.hop_s
        start = self._window_start(k)
        first = self._start_of(k, subj.span) if subj.lengths else start
        ts: list[F8] = []
        vs: list[F8] = []
        # Per stream with rows left out: the times of its flagged rows and of its implausible ones,
        # and the implausible values (their counts and span are taken per length below).
        left: dict[int, tuple[F8, F8, F8]] = {}
        for j, st in enumerate(subj.streams):
            t, v, q = st.ring.peek(first, end)
            marked = q.tobytes().translate(None, _USABLE_BYTES)
            if marked or not math.isfinite(float(v.sum())):
                # Some row is flagged, implausible or not a number (a sum of finite values that
                # overflows also lands here, harmlessly): keep only the usable rows.
                if marked.translate(None, _FLAGGED_BYTES):  # an unflagged row marked implausible
                    odd = (q & _LEFT_OUT) == IMPLAUSIBLE
                    usable = valid_values(q, v, odd)
                    left[j] = (t[~(usable | odd)], t[odd], v[odd])
                else:
                    usable = valid_values(q, v)  # a row marked implausible here is flagged too
                    left[j] = (t[~usable], _NO_ROWS, _NO_ROWS)
                t = t[usable]
                v = v[usable]
            ts.append(t)
            vs.append(v)
        # Every length's tail of the rows read once, and one numpy pass for all their basic features
        # (the views are read before any write).
        lengths = (self.window_s, *subj.lengths)
        all_t: list[F8] = []
        all_v: list[F8] = []
        for length in lengths:
            if length == subj.span:
                all_t += ts
                all_v += vs
                continue
            lo = self._start_of(k, length)
            for t, v in zip(ts, vs, strict=True):
                i = int(t.searchsorted(lo))
                all_t.append(t[i:])
                all_v.append(v[i:])
        basics = basic_features_streams(all_t, all_v)
        n = len(ts)
        cut = [
            self._features(
                subj,
                all_v[j * n : (j + 1) * n],
                basics[j * n : (j + 1) * n],
                length / self.window_s,
                left,
                first if length == subj.span else self._start_of(k, length),
            )
            for j, length in enumerate(lengths)
        ]
        out = cut[0]
        tails = dict(zip(subj.lengths, cut[1:], strict=True))
        self._gaps += sum(1 for sf in out if sf.count == 0)
        self._windows += 1
        return WindowRecord(
            subject=subj.subject,
            kind=subj.kind,
            index=k,
            end_mono=end,
            end_wall=end + wall_offset,
            length_s=self.window_s,
            streams=out,
            tails=tails,
        )

    @staticmethod
    def _features(
        subj: _SubjectState,
        vs: list[F8],
        basics: list[dict[str, float]],
        scale: float,
        left: Mapping[int, tuple[F8, F8, F8]],
        lo: float,
    ) -> tuple[StreamFeatures, ...]:
        """Every stream's features over one length (``scale`` x the pipeline window's expected count).

        ``left``: per stream position, the times of its rows left out as flagged, of those left out
        as implausible, and the implausible values; counted from ``lo``, the length's start.
        """
        out: list[StreamFeatures] = []
        for j, (st, v, features) in enumerate(zip(subj.streams, vs, basics, strict=True)):
            count = v.size
            if count:
                if st.rr:
                    features.update(hrv_features(v))
                elif st.shape == "waveform":
                    features.update(waveform_features(v, st.stream.rate_hz))
                elif st.shape == "state":
                    features.update(state_features(v))
            expected = None if st.expected is None else st.expected * scale
            missing = missing_fraction(count, expected)
            rows = left.get(j)
            if rows is None:
                out.append(StreamFeatures(st.stream, count, missing, features))
                continue
            t_flagged, t_odd, v_odd = rows
            odd = v_odd[int(t_odd.searchsorted(lo)) :]
            span = (float(odd.min()), float(odd.max())) if odd.size else None
            flagged = t_flagged.size - int(t_flagged.searchsorted(lo))
            out.append(StreamFeatures(st.stream, count, missing, features, flagged, odd.size, span))
        return tuple(out)

    # ---- accounting ----------------------------------------------------------------------

    def forget_source(self, source: str, device: str | None = None) -> int:
        """Drop every stream of ``source`` (of its ``device`` only, when given); how many.

        Its streams end because the configuration says so (removed or replaced by a config
        revision), or because the source reads another device now, not because a sensor was lost:
        no loss alarm is raised for them and the status shows them no longer.
        """

        def mine(src: str, dev: str) -> bool:
            return src == source and (device is None or dev == device)

        prefix = f"{source}/" if device is None else f"{source}/{device}/"
        gone = {id(st) for st in self._by_stream.values() if mine(st.stream.source, st.stream.device)}
        self._by_stream = {k: st for k, st in self._by_stream.items() if id(st) not in gone}
        self._by_id = {k: st for k, st in self._by_id.items() if id(st) not in gone}
        for name, subj in list(self._subjects.items()):
            subj.streams = [st for st in subj.streams if id(st) not in gone]
            if not subj.streams:
                del self._subjects[name]
        for key in [k for k in self._device_lost if mine(*k)]:
            del self._device_lost[key]
        for key in [k for k in self._release_due if mine(*k)]:
            del self._release_due[key]
        self._device_back = {k for k in self._device_back if not mine(*k)}
        self._resumed = {k: v for k, v in self._resumed.items() if not k.startswith(prefix)}
        self._resumed_devices = {k: v for k, v in self._resumed_devices.items() if not mine(*k)}
        return len(gone)

    def stream_states(self, now_mono: float = math.inf) -> list[dict[str, Any]]:
        """Per stream: source, subject, metric, status (ok/silent/faulted/lost), what explains a silence, last sample time, ring counters."""
        names = {_OK: "ok", _FAULTED: "faulted", _LOST: "lost"}
        return [
            {
                "source": st.stream.source,
                "subject": st.stream.subject,
                "kind": st.stream.kind,
                "metric": st.stream.metric.name,
                "unit": st.stream.metric.unit,
                "status": "silent" if self._explained(st, now_mono) else names[st.status],
                "explained_by": self._explained(st, now_mono),
                "last_t_mono": st.ring.last_t_mono,
                "last_value": st.ring.last_value,
                "accepted": st.ring.accepted,
                "out_of_order": st.ring.out_of_order,
                "overwritten": st.ring.overwritten,
            }
            for st in self._by_stream.values()
        ]

    @staticmethod
    def _explained(st: _StreamState, now_mono: float) -> dict[str, str] | None:
        """The fault of its device's stream that explains a stream's silence now, or None when it is not silent."""
        by = st.explained_by
        # Still silent beyond its timeout (not delivering again), and the fault still on.
        if by is None or by.status != _FAULTED or st.status != _OK:
            return None
        if now_mono - max(st.ring.last_t_mono, st.revived_at) <= st.lost_after_s:
            return None
        # A fault resumed from a previous run is known by its state alone, not by its flags.
        fault = fault_words(by.fault_quality) if by.fault_quality else "sensor fault"
        return {"metric": by.stream.metric.name, "fault": fault}

    def counters(self) -> dict[str, int]:
        """Running totals: samples accepted, dropped out of order, overwritten, windows, gaps, alarms."""
        states = self._by_stream.values()
        return {
            "samples": sum(s.ring.accepted for s in states),
            "out_of_order": sum(s.ring.out_of_order for s in states),
            "overwritten": sum(s.ring.overwritten for s in states),
            "windows": self._windows,
            "gaps": self._gaps,
            "alarms": self._alarms,
            "streams": len(self._by_stream),
            "subjects": len(self._subjects),
        }
