"""The alarms the twin was told are on, so that each one ends when its source goes away.

Every alarm that raises a condition (``limit``, ``sensor_fault``, ``sensor_lost``,
``device_lost``, ``anomaly``) is entered here once it is queued for the twin, and leaves when its
ending (``limit_cleared``, ``sensor_restored``, ``device_restored``, ``anomaly_cleared``) is.  A
source removed or reconfigured by a config revision takes its streams with it: nothing would ever
end the conditions it raised, and the twin would show them on for good.  So every entry of that
source is ended by the gateway itself, with the ordinary ending kind (a twin that does not know
the reason still clears it) and ``ended`` in its detail saying why: ``source_removed`` (the source
is gone from the configuration, or no longer feeds the subject) or ``source_changed`` (it was
restarted with other settings; a condition that still holds is raised again after its delay).
A restart ends more the same way: ``rule_removed`` (a limit level the new configuration no
longer has), ``model_removed`` (an episode of a model it no longer runs), ``stream_removed`` (a
stream its source, still configured, no longer delivers: an OPC UA node taken off its list, one
that never resolved included, a wearable's profile without that characteristic) and
``device_changed`` (the source reads another device now: another address in the configuration,
or, for a device that names itself, another serial number, server or node in the first data
after the start).

A stream's faults of different origins (its sample flags, a plausibility rule, its driver:
:func:`gateway.records.fault_origin`) are different conditions: one's ending leaves the others on.
A stream's alarm belongs to the stream's source; a subject's anomaly episode to every source that
fed the subject when it was raised.  The ledger is kept in ``state_dir/alarms.json`` so a restart
with a configuration that lost a source ends that source's alarms too, and so that the conditions
of the sources it still has are handed back to their trackers (:meth:`AlarmLedger.kept`), which
end them by their own rules when the data after the start show them over.  With a condition whose
raise said how long it had held (a limit, an episode) the ledger keeps its onset, so its ending
after a restart says how long it held since then (:meth:`AlarmLedger.held`), counted on the time
base's life clock (:meth:`gateway.timebase.TimeBase.life`): a restart with the wall clock behind or
ahead, or a step of it, does not make it 0 or days.  Pure bookkeeping: the
pipeline sends what :meth:`AlarmLedger.end_source` and :meth:`AlarmLedger.end_vanished` return.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from gateway.contracts import Alarm, AlarmKind, AlarmPriority, Node
from gateway.privatefile import WriteFailures, writer_of
from gateway.records import fault_origin
from gateway.sample import Metric, Stream

__all__ = ["FILE_NAME", "AlarmLedger", "Delivers", "EndReason", "Entry"]

log = logging.getLogger(__name__)

FILE_NAME = "alarms.json"
_VERSION = 1

EndReason = Literal[
    "source_removed", "source_changed", "rule_removed", "model_removed", "stream_removed", "device_changed"
]

#: What a source's configuration says it delivers: metric names by device.  A device key is one the
#: configuration names (an address); ``None`` stands for the one device a source reads that names
#: itself at run time (a serial number, a server).  Metric names ``None``: known only at run time.
Delivers = Mapping[str | None, frozenset[str] | None]

#: The kind that ends each raising kind.
_ENDS: dict[AlarmKind, AlarmKind] = {
    AlarmKind.LIMIT: AlarmKind.LIMIT_CLEARED,
    AlarmKind.SENSOR_FAULT: AlarmKind.SENSOR_RESTORED,
    AlarmKind.SENSOR_LOST: AlarmKind.SENSOR_RESTORED,
    AlarmKind.DEVICE_LOST: AlarmKind.DEVICE_RESTORED,
    AlarmKind.ANOMALY: AlarmKind.ANOMALY_CLEARED,
}
#: Detail keys an ending repeats from its raise, so the twin can tell which condition ended.
#: ``rule``, ``cause`` and ``status`` say who raised a sensor fault (a plausibility rule, the driver);
#: ``item`` a fault raised with no stream (a node never resolved) repeats: the node's place in its
#: source's list when it was raised (the condition is told apart by ``Entry.node``, its address).
_KEPT = ("level", "estimate", "model", "pattern", "rule", "cause", "status", "item")


@dataclass(frozen=True, slots=True)
class Entry:
    """One condition the twin holds on: how it was raised, and the sources it belongs to."""

    kind: AlarmKind  # the raising kind
    subject: str
    sources: tuple[str, ...]
    subject_kind: str | None = None
    stream: Stream | None = None
    detail: Mapping[str, float | str] = field(default_factory=dict)  # the kept keys only
    # Wall time the condition began, when its raise said how long it had held (a limit, an episode).
    onset: float | None = None
    node: Node | None = None  # with no stream: the configured node it is about
    # Wall time the twin was told (its raise), and the priority it was raised (or escalated) at.
    raised: float | None = None
    priority: str | None = None
    # Monotonic instant it is on since, for a condition raised in this run (never saved): how long
    # it has been on is counted on it, so a wall-clock step cannot add days to an alarm's age.
    since_mono: float | None = None
    # The time base's life clock at ``since``, for a condition a previous run left on (saved; one
    # raised in this run is saved with its ``since_mono`` on the life clock as it reads then).
    life: float | None = None

    @property
    def since(self) -> float | None:
        """Wall time since which the twin shows it on: its onset where known, else its raise."""
        return self.onset if self.onset is not None else self.raised

    def raising(self, t_mono: float, t_wall: float) -> Alarm:
        """The alarm that raised this condition as the ledger knows it (kept detail, priority), at its onset where known."""
        return Alarm(
            self.kind,
            self.subject,
            t_mono,
            self.since if self.since is not None else t_wall,
            self.stream,
            dict(self.detail),
            priority=None if self.priority is None else AlarmPriority(self.priority),
            subject_kind=self.subject_kind,
            node=self.node,
        )

    def ending(self, reason: EndReason, t_mono: float, t_wall: float) -> Alarm:
        """The alarm that ends this condition, saying why."""
        detail: dict[str, float | str] = {**self.detail, "ended": reason}
        if self.kind in (AlarmKind.SENSOR_FAULT, AlarmKind.SENSOR_LOST):
            detail["after"] = self.kind.value
        elif self.kind is AlarmKind.DEVICE_LOST:
            detail["after"] = AlarmKind.DEVICE_LOST.value
        return Alarm(
            _ENDS[self.kind],
            self.subject,
            t_mono,
            t_wall,
            self.stream,
            detail,
            subject_kind=self.subject_kind or (self.stream.kind if self.stream is not None else None),
            node=self.node,
        )


def _family(alarm: Alarm) -> AlarmKind | None:
    """The raising kind of the condition an alarm raises, continues or ends; None: no condition."""
    kind = alarm.kind
    if kind is AlarmKind.SENSOR_RESTORED:
        after = str(alarm.detail.get("after", AlarmKind.SENSOR_LOST.value))
        return AlarmKind.SENSOR_FAULT if after == AlarmKind.SENSOR_FAULT.value else AlarmKind.SENSOR_LOST
    return _FAMILY.get(kind)


_FAMILY: dict[AlarmKind, AlarmKind] = {
    **{k: k for k in _ENDS},
    **{v: k for k, v in _ENDS.items() if v is not AlarmKind.SENSOR_RESTORED},
    AlarmKind.ANOMALY_INDETERMINATE: AlarmKind.ANOMALY,
}


def _key(alarm: Alarm) -> tuple[str, ...] | None:
    """What one condition is: the alarms that raise, continue and end it share it."""
    family = _family(alarm)
    if family is None:
        return None
    s, d = alarm.stream, alarm.detail
    if s is None and alarm.node is not None:
        # A node that never resolved has no stream: its configured address tells it apart, wherever
        # it sits in its source's list after a restart (``item``, its place there, may change).
        return (family.value, alarm.subject, alarm.node.source, "", "", "", "", alarm.node.address)
    where = ("", "") if s is None else (s.source, s.device)
    if family is AlarmKind.DEVICE_LOST:
        return (family.value, alarm.subject, *where)
    if family is AlarmKind.ANOMALY:
        return (family.value, alarm.subject, str(d.get("model", "")))
    metric = "" if s is None else s.metric.name
    # A stream's faults by different judges (its flags, a plausibility rule, its driver) are apart.
    origin = fault_origin(d) if family is AlarmKind.SENSOR_FAULT else ""
    # ``item`` alone: a node's fault a gateway left on before its alarms named the node.
    return (
        family.value,
        alarm.subject,
        *where,
        metric,
        str(d.get("estimate", "")),
        str(d.get("item", "")),
        origin,
    )


class AlarmLedger:
    """The conditions on at the twin, by source; see the module docstring."""

    def __init__(
        self,
        path: Path | None,
        feeds: Mapping[str, Iterable[str]],
        life: Callable[[float], float] | None = None,
    ) -> None:
        """``life``: the time base's life clock (:meth:`gateway.timebase.TimeBase.life`); without it, the monotonic clock."""
        self._path = path
        self._life = life if life is not None else _same
        self._feeds: dict[str, tuple[str, ...]] = {}
        self.set_feeds(feeds)
        self._on: dict[tuple[str, ...], Entry] = {}
        self.dirty = False
        self._written: dict[str, Any] | None = None  # the body last written by this process
        self._writer = writer_of(path) if path is not None else None
        self._failures = WriteFailures(
            log,
            "alarm ledger",
            path,
            "alarms of a source removed before the next start will not be ended then; check the state directory",
        )
        if path is not None:
            self._on = _load(path)
        self._carried = set(self._on)  # the conditions a previous run left on, until they end

    def set_feeds(self, feeds: Mapping[str, Iterable[str]]) -> None:
        """Which sources feed each subject (from the configuration in force)."""
        self._feeds = {subject: tuple(sorted(set(srcs))) for subject, srcs in feeds.items()}

    def __len__(self) -> int:
        return len(self._on)

    def entries(self) -> list[Entry]:
        """The conditions on now."""
        return list(self._on.values())

    def holds(self, alarm: Alarm) -> bool:
        """True when the condition ``alarm`` raises, continues or ends is on at the twin."""
        key = _key(alarm)
        return key is not None and key in self._on

    def restates(self, alarm: Alarm) -> bool:
        """True when ``alarm`` raises a condition on at the twin with another ``status`` (a node's new reason)."""
        key = _key(alarm)
        known = None if key is None else self._on.get(key)
        status = alarm.detail.get("status")
        return known is not None and status is not None and known.detail.get("status") != status

    def note(self, alarm: Alarm) -> None:
        """Fold an alarm the twin was sent: a raise enters its condition, an ending removes it."""
        key = _key(alarm)
        if key is None:
            return
        if alarm.kind in _ENDS or alarm.kind is AlarmKind.ANOMALY_INDETERMINATE:
            known = self._on.get(key)
            if known is not None and alarm.kind is AlarmKind.ANOMALY_INDETERMINATE:
                return  # inside the episode: nothing the ending would say changed
            stream = alarm.stream
            # A stream's condition (a node's with no stream) is its source's; a subject's (an
            # episode, an estimate's limit) belongs to every source feeding it when it was raised.
            if stream is not None:
                sources: tuple[str, ...] = (stream.source,)
            elif alarm.node is not None:
                sources = (alarm.node.source,)
            else:
                sources = self._feeds.get(alarm.subject, ())
            if known is not None:
                sources = known.sources  # escalated (L -> LL) or resumed: the same condition
            kept = {k: alarm.detail[k] for k in _KEPT if k in alarm.detail}
            family = _family(alarm) or alarm.kind
            onset = known.onset if known is not None else _onset(alarm)
            raised = known.raised if known is not None else alarm.t_wall
            since_mono = known.since_mono if known is not None else _onset_mono(alarm)
            priority = alarm.priority.value if alarm.priority is not None else None
            if priority is None and known is not None:
                priority = known.priority
            entry = Entry(
                family,
                alarm.subject,
                sources,
                alarm.subject_kind,
                stream,
                kept,
                onset,
                alarm.node,
                raised,
                priority,
                since_mono,
                known.life if known is not None else None,
            )
            if entry == known:
                return
            self._on[key] = entry
        elif self._on.pop(key, None) is None:
            return
        else:
            self._carried.discard(key)
        self.dirty = True

    def held(self, alarm: Alarm) -> float | None:
        """How long the condition ``alarm`` continues or ends has held, for one a previous run left on.

        Counted from its onset before the stop (the downtime included: the twin held it on all
        along), as the same alarm would say without the restart.  None for a condition raised in
        this run (its tracker knows), one whose raise gave no time held, or an ending that says
        why (``ended``: carries no time held).
        """
        key = _key(alarm)
        if key is None or key not in self._carried or "ended" in alarm.detail:
            return None
        e = self._on[key]
        if e.onset is None or alarm.kind is AlarmKind.LIMIT:
            return None  # a limit's raise (escalation) says how long *its* level has held
        return round(self.held_for(e, alarm.t_mono, alarm.t_wall), 3)

    def held_for(self, e: Entry, t_mono: float, t_wall: float) -> float:
        """How long ``e``, a condition on since its ``since``, has held at monotonic instant ``t_mono``.

        ``t_wall``, the wall time of that instant, counts only for one a ledger written before the
        life clock left on: the wall clock is all there is then.
        """
        age = self.age(e, t_mono)
        if age is not None:
            return age
        return max(0.0, t_wall - (t_wall if e.since is None else e.since))

    def age(self, e: Entry, t_mono: float) -> float | None:
        """How long ``e`` has been on at monotonic instant ``t_mono``, on clocks that do not step; None when unknown."""
        if e.since_mono is not None:  # raised in this run
            return max(0.0, t_mono - e.since_mono)
        if e.life is not None:  # carried over a restart
            return max(0.0, self._life(t_mono) - e.life)
        return None

    def reframe(self) -> None:
        """The life clock was corrected (a wall-clock step): this run's conditions are written again on it."""
        self.dirty = self.dirty or any(e.since_mono is not None for e in self._on.values())

    def end_source(self, source: str, feeds_now: Iterable[str], t_mono: float, t_wall: float) -> list[Alarm]:
        """End every condition of ``source`` (its streams', its subjects' episodes); the alarms to send.

        ``feeds_now``: the subjects the source feeds in the configuration that replaces it (none when
        it is gone or disabled): a condition of one of them ends as ``source_changed``, of any
        other subject as ``source_removed``.
        """
        keeps = set(feeds_now)
        out: list[Alarm] = []
        for key in [k for k, e in self._on.items() if source in e.sources]:
            e = self._on.pop(key)
            self._carried.discard(key)
            reason: EndReason = "source_changed" if e.subject in keeps else "source_removed"
            out.append(e.ending(reason, t_mono, t_wall))
        self.dirty = self.dirty or bool(out)
        return out

    def _fed(self, e: Entry) -> bool:
        """True while every source of the condition still feeds its subject."""
        return set(e.sources) <= set(self._feeds.get(e.subject, ()))

    def kept(self) -> list[Entry]:
        """The conditions on whose sources all still feed their subject: the trackers resume them."""
        return [e for e in self._on.values() if self._fed(e)]

    def end_vanished(self, t_mono: float, t_wall: float) -> list[Alarm]:
        """End every condition whose sources no longer all feed its subject (a restart's new config)."""
        gone = [k for k, e in self._on.items() if not self._fed(e)]
        return self._end(gone, "source_removed", t_mono, t_wall)

    def undelivered(
        self, delivers: Mapping[str, Delivers], nodes: Mapping[str, frozenset[str]] | None = None
    ) -> list[tuple[Entry, EndReason]]:
        """The streams' conditions on that their source, still feeding the subject, can no longer end.

        ``delivers``: what each configured source delivers (a source missing from it is not judged).
        A condition of a device the source no longer names is ``device_changed``; of a metric the
        device no longer delivers, ``stream_removed``.  A stream still configured but silent keeps
        its condition: it may still hold.  ``nodes``: the node addresses each source configures; a
        fault of a node that never resolved (no stream) that its source no longer lists is
        ``stream_removed`` too.  One an older gateway left on, known by its place in the list
        (``item``) only, cannot be matched to its node: it is ``source_changed``, and the fresh
        driver raises it again, by its node, if the node is still absent.
        """
        out: list[tuple[Entry, EndReason]] = []
        for e in self._on.values():
            node = e.node
            if node is not None:
                listed = None if nodes is None else nodes.get(node.source)
                if listed is not None and node.address not in listed and self._fed(e):
                    out.append((e, "stream_removed"))
                continue
            if e.stream is None and "item" in e.detail and self._fed(e):
                out.append((e, "source_changed"))
                continue
            s = e.stream
            if s is None or s.source not in delivers or not self._fed(e):
                continue
            by_device = delivers[s.source]
            if None in by_device:
                metrics = by_device[None]
            elif s.device not in by_device:
                out.append((e, "device_changed"))
                continue
            else:
                metrics = by_device[s.device]
            if e.kind is not AlarmKind.DEVICE_LOST and metrics is not None and s.metric.name not in metrics:
                out.append((e, "stream_removed"))
        return out

    def other_devices(self, source: str, device: str) -> list[Entry]:
        """The conditions of ``source``'s streams on a device other than ``device``."""
        return [
            e
            for e in self._on.values()
            if e.stream is not None and e.stream.source == source and e.stream.device != device
        ]

    def end(self, entries: Iterable[Entry], reason: EndReason, t_mono: float, t_wall: float) -> list[Alarm]:
        """End these conditions now, saying why (nothing in the configuration judges them any more)."""
        keys = [k for k in map(_entry_key, entries) if k is not None and k in self._on]
        return self._end(keys, reason, t_mono, t_wall)

    def _end(
        self, keys: list[tuple[str, ...]], reason: EndReason, t_mono: float, t_wall: float
    ) -> list[Alarm]:
        out = [self._on.pop(k).ending(reason, t_mono, t_wall) for k in keys]
        self._carried.difference_update(keys)
        self.dirty = self.dirty or bool(out)
        return out

    def save(self) -> None:
        """Write the ledger when it changed, and wait for it (atomically, mode 0600: it names subjects and devices)."""
        written = self.keep()
        if written is not None:
            with contextlib.suppress(OSError):  # told by _kept
                written.result()

    def keep(self) -> Future[None] | None:
        """Have the ledger written by its file's worker thread when it changed and is not what the file holds; that write, or None."""
        if not self.dirty or self._writer is None:
            return None
        self.dirty = False
        body = {"version": _VERSION, "on": [_dump(e, self._life_of(e)) for e in self._on.values()]}
        # A condition raised and ended since (a flapping probe) leaves the file as it is: no fsync.
        if body == self._written:
            return None
        # What the file holds once the writes asked for are done: they are carried out in order.
        self._written = body
        return self._writer.submit(json.dumps(body).encode(), self._kept)

    def _life_of(self, e: Entry) -> float | None:
        """``e.life``; for a condition raised in this run, its ``since_mono`` on the life clock now."""
        return self._life(e.since_mono) if e.since_mono is not None else e.life

    def _kept(self, failed: Exception | None) -> None:
        """A write's outcome, in the writer's thread: a failure is told once and written again at the next keep."""
        if failed is not None:
            # The file still holds an older state; in this order, so that a keep on the loop
            # meanwhile that sees ``dirty`` compares against nothing.
            self._written = None
            self.dirty = True
        self._failures(failed)


def _same(t_mono: float) -> float:
    return t_mono


def _dump(e: Entry, life: float | None) -> dict[str, Any]:
    s = e.stream
    stream = None
    if s is not None:
        m = s.metric
        metric = {"name": m.name, "unit": m.unit, "mdc": m.mdc, "rr": m.rr, "shape": m.shape}
        stream = {
            "source": s.source,
            "subject": s.subject,
            "device": s.device,
            "metric": metric,
            "kind": s.kind,
            "rate_hz": s.rate_hz,
            "on_change": s.on_change,
        }
    return {
        "kind": e.kind.value,
        "subject": e.subject,
        "sources": list(e.sources),
        "subject_kind": e.subject_kind,
        "stream": stream,
        "detail": dict(e.detail),
        "onset": e.onset,
        "node": None if e.node is None else {"source": e.node.source, "address": e.node.address},
        "raised": e.raised,
        "priority": e.priority,
        "life": life,
    }


def _entry(raw: Mapping[str, Any]) -> Entry:
    s = raw.get("stream")
    stream = None
    if s is not None:
        stream = Stream(
            s["source"],
            s["subject"],
            s["device"],
            Metric(**s["metric"]),
            s["kind"],
            s["rate_hz"],
            s["on_change"],
        )
    n = raw.get("node")
    return Entry(
        AlarmKind(raw["kind"]),
        str(raw["subject"]),
        tuple(str(x) for x in raw["sources"]),
        raw.get("subject_kind"),
        stream,
        dict(raw.get("detail", {})),
        None if raw.get("onset") is None else float(raw["onset"]),
        None if n is None else Node(str(n["source"]), str(n["address"])),
        None if raw.get("raised") is None else float(raw["raised"]),
        # An unknown priority is a malformed entry (ValueError), not a crash when it is raised again.
        None if raw.get("priority") is None else AlarmPriority(str(raw["priority"])).value,
        life=None if raw.get("life") is None else float(raw["life"]),
    )


def _load(path: Path) -> dict[tuple[str, ...], Entry]:
    """The ledger a previous run left; an unreadable one is set aside (its alarms cannot be ended)."""
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        _set_aside(path, str(exc))
        return {}
    if not isinstance(raw, dict) or raw.get("version") != _VERSION:
        _set_aside(path, f"not a version {_VERSION} ledger")
        return {}
    try:
        entries = [_entry(e) for e in raw["on"]]
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        _set_aside(path, str(exc))
        return {}
    out: dict[tuple[str, ...], Entry] = {}
    for e in entries:
        key = _entry_key(e)
        if key is not None:
            out[key] = e
    return out


def _onset(alarm: Alarm) -> float | None:
    """When the condition a raise starts began: its time less the time held it reports."""
    held = alarm.held_s
    return None if held is None or not math.isfinite(held) else alarm.t_wall - held


def _onset_mono(alarm: Alarm) -> float:
    """The monotonic instant the condition a raise starts began (its raise where it gives no time held)."""
    held = alarm.held_s
    return alarm.t_mono - (held if held is not None and math.isfinite(held) else 0.0)


def _entry_key(e: Entry) -> tuple[str, ...] | None:
    return _key(e.ending("source_removed", 0.0, 0.0))


def _set_aside(path: Path, why: str) -> None:
    aside = path.with_suffix(".corrupt")
    # Every condition on before the start is unknown now, not only those of removed sources.
    log.error(
        "alarm ledger %s: unreadable (%s): set aside as %s; the alarms on before this start are "
        "unknown: one that ended while the gateway was down, or whose source was removed, stays on "
        "at the twin until acknowledged there, and one that still holds is raised again after its "
        "delay; check the twin's active alarms of this gateway",
        path,
        why,
        aside.name,
    )
    with contextlib.suppress(OSError):
        path.replace(aside)
