"""Per-gateway sequence checking: gaps (loss), duplicates, reorderings, replays, restarts, new epochs.

A gateway numbers its records with the outbox row id, within an *epoch* (a random id of its outbox
database).  Ids are per gateway, not per lane, and live records overtake the replayed backlog, so:

* a **gap** is a range of ids between the lowest and highest seen that has not arrived (yet): a
  replay may still fill it; what stays open is loss (e.g. records dropped by a budget);
* a **duplicate** is an id seen before (a PUBACK lost before the connection dropped);
* a **reordering** is an id lower than the last one of the same lane and the same class (live or
  historical): that order is what the gateway keeps;
* a **replay** is a record marked historical: queued while the gateway was offline, sent behind
  live data; counted, not a fault;
* a **restart** is a new run of the gateway (its process started again): ids go on in the same
  epoch, so a restart costs no ids and shows no gap;
* a **new epoch** means the gateway's sequence itself started again (its outbox was replaced, or
  its key rotated): ids start again, and gaps are counted per epoch.

Pure: no I/O, no clock.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field


class IntervalSet:
    """Disjoint, sorted, closed integer ranges."""

    __slots__ = ("_hi", "_lo")

    def __init__(self) -> None:
        self._lo: list[int] = []
        self._hi: list[int] = []

    def __contains__(self, x: int) -> bool:
        i = bisect.bisect_right(self._lo, x) - 1
        return i >= 0 and self._hi[i] >= x

    def add(self, x: int) -> bool:
        """Add ``x``; False if it was there already."""
        i = bisect.bisect_right(self._lo, x) - 1
        if i >= 0 and self._hi[i] >= x:
            return False
        joins_left = i >= 0 and self._hi[i] == x - 1
        joins_right = i + 1 < len(self._lo) and self._lo[i + 1] == x + 1
        if joins_left and joins_right:
            self._hi[i] = self._hi[i + 1]
            del self._lo[i + 1], self._hi[i + 1]
        elif joins_left:
            self._hi[i] = x
        elif joins_right:
            self._lo[i + 1] = x
        else:
            self._lo.insert(i + 1, x)
            self._hi.insert(i + 1, x)
        return True

    @property
    def first(self) -> int | None:
        """The lowest member."""
        return self._lo[0] if self._lo else None

    @property
    def last(self) -> int | None:
        """The highest member."""
        return self._hi[-1] if self._hi else None

    def holes(self) -> list[tuple[int, int]]:
        """The missing ranges between the lowest and the highest member."""
        return [(self._hi[i] + 1, self._lo[i + 1] - 1) for i in range(len(self._lo) - 1)]

    def __len__(self) -> int:
        return sum(h - lo + 1 for lo, h in zip(self._lo, self._hi, strict=True))


@dataclass(slots=True)
class GatewaySequence:
    """What one gateway's sequence looks like so far, in its current epoch."""

    gateway: str
    epoch: int
    seen: IntervalSet = field(default_factory=IntervalSet)
    received: int = 0
    duplicates: int = 0
    reordered: int = 0
    historical: int = 0
    epochs_before: int = 0  # epochs seen before this one
    runs: set[int] = field(default_factory=set)  # the gateway's runs (process starts) seen
    last_by_class: dict[tuple[str, bool], int] = field(default_factory=dict)

    @property
    def run(self) -> int:
        """The newest run seen (0: none stated)."""
        return max(self.runs, default=0)

    @property
    def restarts(self) -> int:
        """Process restarts seen: runs beyond the first, in whatever order they arrived."""
        return max(len(self.runs) - 1, 0)

    @property
    def gaps(self) -> list[tuple[int, int]]:
        """Ranges of ids not received (yet)."""
        return self.seen.holes()

    @property
    def missing(self) -> int:
        """How many ids the gaps hold."""
        return sum(hi - lo + 1 for lo, hi in self.gaps)

    def summary(self) -> str:
        """One line for the operator."""
        gaps = self.gaps
        shown = ", ".join(f"{lo}-{hi}" if hi > lo else str(lo) for lo, hi in gaps[:5])
        more = f" (+{len(gaps) - 5} more)" if len(gaps) > 5 else ""
        return (
            f"gateway {self.gateway} epoch {self.epoch}: {self.received} received "
            f"(seq {self.seen.first}..{self.seen.last}, {self.historical} replayed), "
            f"{self.missing} missing in {len(gaps)} gap(s){': ' + shown + more if gaps else ''}, "
            f"{self.duplicates} duplicate(s), {self.reordered} reordered, "
            f"{self.restarts} restart(s) (run {self.run})"
            + (f", {self.epochs_before} earlier epoch(s)" if self.epochs_before else "")
        )


@dataclass(frozen=True, slots=True)
class SeqEvent:
    """Something worth reporting about one message."""

    kind: str  # "duplicate", "gap", "reordered", "restart", "new_epoch"
    gateway: str
    seq: int
    detail: str = ""


class SequenceChecker:
    """Checks every gateway's sequence; see the module docstring for the terms."""

    def __init__(self) -> None:
        self.gateways: dict[str, GatewaySequence] = {}

    def observe(
        self, gateway: str, epoch: int, seq: int, lane: str, historical: bool, run: int = 0
    ) -> SeqEvent | None:
        """Account one message; return what is notable about it, if anything."""
        state = self.gateways.get(gateway)
        event: SeqEvent | None = None
        if state is None or state.epoch != epoch:
            before = 0 if state is None else state.epochs_before + 1
            if state is not None:
                event = SeqEvent("new_epoch", gateway, seq, f"epoch {state.epoch} -> {epoch}")
            state = GatewaySequence(gateway, epoch, epochs_before=before)
            self.gateways[gateway] = state
        if run and run not in state.runs:
            if state.runs and run > state.run:
                event = event or SeqEvent("restart", gateway, seq, f"run {state.run} -> {run}")
            state.runs.add(run)
        state.received += 1
        if historical:
            state.historical += 1
        last = state.seen.last
        if not state.seen.add(seq):
            state.duplicates += 1
            return SeqEvent("duplicate", gateway, seq)
        key = (lane, historical)
        previous = state.last_by_class.get(key)
        state.last_by_class[key] = seq if previous is None else max(previous, seq)
        if previous is not None and seq < previous:
            state.reordered += 1
            return event or SeqEvent("reordered", gateway, seq, f"after {previous} in {lane}")
        if last is not None and seq > last + 1:
            return event or SeqEvent("gap", gateway, seq, f"{last + 1}-{seq - 1} not received yet")
        return event

    def report(self) -> list[str]:
        """One line per gateway."""
        return [state.summary() for state in self.gateways.values()]
