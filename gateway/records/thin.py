"""Unchanged streams travel as markers, unchanged windows not at all, with a heartbeat (schema 3).

A stream whose features, at their resolution on the wire, are those of its last record that
carried features is sent as an *unchanged* marker (its name, sample count and missing fraction,
no features).  A window whose streams are all unchanged (and whose model scores and counts of
samples left out are too) is not sent, unless the subject's heartbeat is due: then the whole window goes with every feature, so a
consumer that joined late or lost a record has the values again within one heartbeat.  Every
window record states the heartbeat (``hb``, seconds): the next record of the subject follows
within it unless it is lost or the gateway stopped, so a consumer tells "unchanged" from "silent".

:class:`Thinner` is the gateway's side, :func:`carry` the reader's.  Pure: no I/O, no clock.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass, field

from gateway.records.codec import on_wire, wire_number
from gateway.records.model import FeaturesWindow, StreamWindow

#: A subject's whole window travels at least every this many windows.
HEARTBEAT_WINDOWS = 6
#: Missing fractions within this of the last sent one count as unchanged for skipping a window.
MISSING_TOLERANCE = 0.05


def _same(a: Mapping[str, float], b: Mapping[str, float]) -> bool:
    if a.keys() != b.keys():
        return False
    return all(a[k] == b[k] or (math.isnan(a[k]) and math.isnan(b[k])) for k in a)


def _same_left(a: StreamWindow, b: StreamWindow) -> bool:
    """Whether two windows of a stream left out as many samples (a window that did is news to the twin)."""
    return a.flagged == b.flagged and a.implausible == b.implausible


@dataclass(slots=True)
class _Subject:
    last_full_t: float
    streams: dict[str, StreamWindow] = field(default_factory=dict)  # metric -> last sent, on the wire
    scores: dict[str, float] = field(default_factory=dict)


class Thinner:
    """The gateway's side: which streams go as markers, which windows are not sent."""

    def __init__(self, hop_s: float, every: int = HEARTBEAT_WINDOWS) -> None:
        if not (hop_s > 0.0 and every >= 1):
            raise ValueError(
                f"records thinner: hop {hop_s!r} s, heartbeat every {every!r} windows: expected > 0"
            )
        self.hop_s = hop_s
        self.heartbeat_s = hop_s * every
        self._subjects: dict[str, _Subject] = {}
        self.skipped = 0  # windows not sent: unchanged
        self.markers = 0  # streams sent as unchanged markers

    def forget(self, subject: str) -> None:
        """Send the subject's next window whole (e.g. after its record was lost)."""
        self._subjects.pop(subject, None)

    def thin(self, window: FeaturesWindow) -> FeaturesWindow | None:
        """The window to send (with the heartbeat stated), or None when it is unchanged."""
        wire = on_wire(window)
        state = self._subjects.get(window.subject)
        # Due a little early rather than late: window times jitter around the hop.
        if state is None or window.t - state.last_full_t >= self.heartbeat_s - self.hop_s / 2:
            self._subjects[window.subject] = _Subject(
                window.t,
                {s.metric: s for s in wire.streams},
                {k: wire_number(v) for k, v in window.scores.items()},
            )
            return dataclasses.replace(window, hb=self.heartbeat_s)
        streams: list[StreamWindow] = []
        markers = 0
        skip = bool(window.streams) and len(window.streams) == len(state.streams)
        for raw, sent_form in zip(window.streams, wire.streams, strict=True):
            last = state.streams.get(raw.metric)
            if last is None or raw.gap or last.gap or not raw.features:
                streams.append(raw)
                state.streams[raw.metric] = sent_form
                skip = (
                    skip
                    and last is not None
                    and raw.gap == last.gap
                    and not raw.features
                    and _same_left(raw, last)
                )
                continue
            unchanged = (
                last.dev == raw.dev
                and last.shape == raw.shape
                and last.res == sent_form.res
                and last.unit == raw.unit
                and _same(last.features, sent_form.features)
            )
            if unchanged:
                streams.append(dataclasses.replace(raw, features={}, unchanged=True))
                markers += 1
                skip = skip and abs(raw.missing - last.missing) <= MISSING_TOLERANCE and _same_left(raw, last)
            else:
                streams.append(raw)
                state.streams[raw.metric] = sent_form
                skip = False
        scores = {k: wire_number(v) for k, v in window.scores.items()}
        if skip and _same(scores, state.scores):
            self.skipped += 1
            return None
        state.scores = scores
        self.markers += markers
        return dataclasses.replace(window, streams=tuple(streams), hb=self.heartbeat_s)


def carry(previous: Mapping[str, StreamWindow], window: FeaturesWindow) -> FeaturesWindow:
    """The reader's side: unchanged markers filled in with the features of ``previous`` (by metric).

    A marker whose stream has no earlier record here (a consumer that joined since) stays without
    features until the next heartbeat.
    """
    if not any(s.unchanged for s in window.streams):
        return window
    streams = []
    for s in window.streams:
        last = previous.get(s.metric)
        if s.unchanged and last is not None and last.features:
            streams.append(dataclasses.replace(s, features=last.features, res=last.res))
        else:
            streams.append(s)
    return dataclasses.replace(window, streams=tuple(streams))


__all__ = ["HEARTBEAT_WINDOWS", "Thinner", "carry"]
