"""The twin's latest state per gateway and subject, and how it is shown (``gateway.records.render``).

Records of one gateway are ordered by (epoch, run, t): epochs in the order the twin first saw
them, then the gateway's run (a new one per process start), then the record's time.  So a
restarted gateway's first window is shown at once, and a replayed backlog never overwrites a
newer value.

Alarms that raise and end one condition are ordered by their sequence number instead, where both
carry one, within an epoch: it is the order the gateway queued them in (its outbox ids, never
reused, higher in every later run and in an epoch that follows a recovery; a gateway whose whole
state directory was wiped numbers from 1 again in a new epoch), which their times need not be - record time is the wall clock with
``privacy.time = "exact"``, and a clock stepped back times an ending before its raise.  So an
ending that follows its raise ends it whatever its time, and a replayed older alarm (a lower
sequence number) never undoes a newer one.  Records without a sequence number fall back on
(epoch, run, t).  A stream's faults of different origins (its sample flags, a plausibility rule,
its driver) are different conditions, as in the gateway's alarm ledger (``condition_key``), and
each is shown with its origin in words.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

from gateway.records import (
    AlarmRecord,
    EstimateRecord,
    FeaturesWindow,
    StatusRecord,
    StreamWindow,
    as_map,
    condition_key,
    order_key,
    origin_words,
    status_map,
    stream_map,
)
from gateway.records.render import describe as describe_record
from gateway.records.render import estimate_line, number, stream_text, when
from gateway.records.thin import carry
from gateway.records.units import metric_label
from gateway.twin.decoder import TwinMessage

Order = tuple[int, int, float]  # (epoch rank, run, t)
Place = tuple[int | None, Order]  # an alarm's sequence number (None: not sent), and its order


def before(a: Place, b: Place) -> bool:
    """True when alarm ``a`` was queued before ``b``: by epoch, then sequence where both have one, else by order."""
    if a[0] is not None and b[0] is not None:
        # The epoch first: a gateway whose state directory was wiped numbers from 1 again in a new one.
        return (a[1][0], a[0]) < (b[1][0], b[0])
    return a[1] < b[1]


@dataclass(slots=True)
class SubjectState:
    """One subject (patient or machine) as the twin knows it."""

    subject: str
    kind: str | None = None
    newest: Order | None = None  # order of the newest window shown
    run: int = 0
    t: float | None = None  # time of the newest window
    hb: float | None = None  # heartbeat: the next window follows within this many seconds
    batch_s: float = 0.0  # and may be held back this long at the gateway (schema 4)
    win: float = 0.0  # the newest window's length
    received: float | None = None  # when the newest window arrived (the twin's monotonic clock)
    streams: dict[str, StreamWindow] = field(default_factory=dict)  # metric -> newest stream
    scores: dict[str, float] = field(default_factory=dict)
    last_alarm: AlarmRecord | None = None
    last_alarm_place: Place | None = None
    # The conditions on now (raised, not yet ended), by condition_key; each as its newest raise
    # says it is now, timed by its first (its onset).
    active: dict[tuple[str, ...], AlarmRecord] = field(default_factory=dict)
    active_place: dict[tuple[str, ...], Place] = field(default_factory=dict)
    alarms: int = 0
    windows: int = 0
    stale: int = 0  # windows older than the one shown (a replayed backlog), counted, not shown
    estimates: dict[str, EstimateRecord] = field(default_factory=dict)  # name -> newest estimate
    estimate_order: dict[str, Order] = field(default_factory=dict)


@dataclass(slots=True)
class GatewayState:
    """One gateway: its status and its subjects."""

    gateway: str
    status: StatusRecord | None = None
    subjects: dict[str, SubjectState] = field(default_factory=dict)
    diagnostics: int = 0
    epochs: list[int] = field(default_factory=list)  # in the order first seen

    def rank(self, epoch: int | None) -> int:
        """The epoch's place in the order first seen (a new one ranks above every earlier one)."""
        if epoch is None:
            return 0
        if epoch not in self.epochs:
            self.epochs.append(epoch)
        return self.epochs.index(epoch)


class TwinView:
    """Keeps the newest state; see the module docstring for what "newest" means."""

    def __init__(self) -> None:
        self.gateways: dict[str, GatewayState] = {}

    def update(self, msg: TwinMessage, received: float | None = None) -> None:
        """Fold one message into the state; ``received``: when it arrived (the twin's monotonic clock)."""
        gw = self.gateways.setdefault(msg.gateway, GatewayState(msg.gateway))
        rec = msg.record
        if isinstance(rec, StatusRecord):
            gw.status = rec
            gw.rank(rec.ep if rec.state == "online" else None)
            return
        if msg.kind == "diag":
            gw.diagnostics += 1
            return
        subject = rec.subject or "?"
        state = gw.subjects.setdefault(subject, SubjectState(subject))
        order: Order = (gw.rank(msg.epoch), *order_key(rec))
        if isinstance(rec, FeaturesWindow):
            state.windows += 1
            if state.newest is not None and order < state.newest:
                state.stale += 1
                return
            state.newest, state.run, state.t, state.kind = order, rec.run, rec.t, rec.kind
            state.hb, state.win, state.received = rec.hb, rec.win, received
            state.batch_s = msg.batch_s or 0.0
            # An unchanged stream keeps the values it last carried: it is current, not stale.
            rec = carry(state.streams, rec)
            for s in rec.streams:
                state.streams[s.metric] = s
            state.scores.update(rec.scores)
        elif isinstance(rec, EstimateRecord):
            newest = state.estimate_order.get(rec.est)
            if newest is None or order >= newest:
                state.estimates[rec.est], state.estimate_order[rec.est] = rec, order
        elif isinstance(rec, AlarmRecord):
            state.alarms += 1
            place: Place = (msg.seq, order)
            if state.last_alarm_place is None or not before(place, state.last_alarm_place):
                state.last_alarm, state.last_alarm_place = rec, place
            fold_condition(state, rec, place)

    def snapshot(self) -> dict[str, Any]:
        """The whole state as plain data (for JSON)."""
        return {
            gw.gateway: {
                "status": status_map(gw.status) if gw.status else {},
                "diagnostics": gw.diagnostics,
                "subjects": {
                    s.subject: {
                        "kind": s.kind,
                        "run": s.run,
                        "t": s.t,
                        "hb": s.hb,
                        "windows": s.windows,
                        "alarms": s.alarms,
                        "streams": {m: stream_map(x) for m, x in s.streams.items()},
                        "scores": s.scores,
                        "estimates": {name: as_map(e) for name, e in s.estimates.items()},
                        "last_alarm": as_map(s.last_alarm) if s.last_alarm else None,
                        "active_alarms": [as_map(a) for a in s.active.values()],
                    }
                    for s in gw.subjects.values()
                },
            }
            for gw in self.gateways.values()
        }

    def render(self, now: float | None = None) -> str:
        """A few lines per twin, for a terminal; with ``now``, subjects silent beyond their heartbeat are marked."""
        lines: list[str] = []
        for gw in self.gateways.values():
            st = gw.status
            lines.append(
                f"gateway {gw.gateway}: {st.state if st else 'unknown'}" + (status_text(st) if st else "")
            )
            for s in gw.subjects.values():
                t = number(round(s.t, 1)) if s.t is not None else "-"
                lines.append(
                    f"  {s.kind or '?':<10} {s.subject} run {s.run} t={t} windows={s.windows} alarms={s.alarms}"
                    + (f" (older, not shown: {s.stale})" if s.stale else "")
                    + silent(s, now)
                )
                lines.extend("    " + stream_text(stream) for stream in s.streams.values())
                lines.extend(f"    estimate {estimate_line(e)} at {when(e)}" for e in s.estimates.values())
                if s.last_alarm is not None:
                    a = s.last_alarm
                    ended = f" (ended: {a.detail['ended']})" if "ended" in a.detail else ""
                    lines.append(f"    last alarm: {alarm_what(a)} at t={number(round(a.t, 1))}{ended}")
                lines.extend(
                    f"    on: {alarm_what(a, model=True)}{urgency(a)} since t={number(round(a.t, 1))}"
                    for a in s.active.values()
                )
        return "\n".join(lines)


def alarm_what(a: AlarmRecord, *, model: bool = False) -> str:
    """What an alarm is about: its kind, its model (``model``), its metric or estimate, value and limit."""
    if a.metric:
        about = metric_label(a.metric)
    elif "item" in a.detail:
        about = f"item {a.detail['item']}"  # a node that never resolved: its place in its source's list
    else:
        about = str(a.detail.get("estimate", "")).upper()
    what = " ".join(x for x in (a.alarm, str(a.detail.get("model", "")) if model else "", about) if x)
    origin = origin_words(a)
    if origin is not None:  # a stream may hold faults of several origins at once: say whose this is
        what += f" ({origin})"
    if a.value is not None and a.limit is not None:
        what += f" {number(a.value)} (limit {number(a.limit)})"
    return what


def urgency(a: AlarmRecord) -> str:
    """A raise's level (a limit's) and priority: ``" low_low, high priority"``; empty when it has neither."""
    level = f" {a.detail['level']}" if "level" in a.detail else ""
    return level + (f", {a.priority} priority" if a.priority else "")


def fold_condition(state: SubjectState, rec: AlarmRecord, place: Place) -> None:
    """Keep the subject's conditions on: a raise enters one, its ending (whatever the reason) removes it."""
    found = condition_key(rec)
    if found is None:
        return
    key, raises = found
    newest = state.active_place.get(key)
    if newest is not None and before(place, newest):
        return  # a replayed older alarm of a condition already known further on
    state.active_place[key] = place
    if raises:
        known = state.active.get(key)
        if known is None:
            state.active[key] = rec
        elif rec.alarm != "anomaly_indeterminate":  # inside an episode: the episode is what is on
            # A limit escalated (L -> LL) or stepped down and still on, a driver's fault raised
            # again with another status: the same condition since its first raise (its onset),
            # shown as its newest raise says it is now - level, priority, value, limit, status.
            state.active[key] = replace(
                rec,
                t=known.t,
                run=known.run,
                clock=known.clock,
                detail={**known.detail, **rec.detail},
                priority=rec.priority or known.priority,
            )
    else:
        state.active.pop(key, None)


def silent(state: SubjectState, now: float | None) -> str:
    """A mark for a subject with no window for longer than its heartbeat (plus one window) allows.

    A subject whose streams are unchanged sends a window at least every heartbeat: a longer silence
    is a loss or a stopped gateway, never "unchanged".
    """
    if now is None or state.hb is None or state.received is None:
        return ""
    quiet = now - state.received
    if quiet <= state.hb + state.win + state.batch_s:
        return ""
    return f" SILENT {number(round(quiet))} s (heartbeat {number(state.hb)} s)"


def describe(msg: TwinMessage) -> str:
    """One line for one message."""
    seq = f"#{msg.seq}" if msg.seq is not None else "#-"
    hist = " H" if msg.historical else ""
    head = f"{msg.gateway[:8]} {seq:>7}{hist:<2} {msg.topic[:34]:<34}"
    rec = msg.record
    if isinstance(rec, StatusRecord):
        return f"{head} STATUS {rec.state}{status_text(rec)}"
    return f"{head} {describe_record(rec)}"


def status_text(status: StatusRecord) -> str:
    """What a status says beyond its state: run, degraded, drops by lane and reason, the newest loss."""
    out = f" run {status.run}" if status.run is not None else ""
    if status.degraded:
        out += f", DEGRADED ({status.degraded})"
    if status.dropped or status.drops:
        lanes = sorted({*status.dropped, *status.drops})
        out += ", dropped at the gateway: " + "; ".join(
            f"{lane} {status.dropped.get(lane, sum(status.drops.get(lane, {}).values()))}"
            + (
                " (" + ", ".join(f"{r} {n}" for r, n in sorted(status.drops[lane].items())) + ")"
                if lane in status.drops
                else ""
            )
            for lane in lanes
        )
    if status.loss is not None:
        loss = status.loss
        out += f", last loss {loss.n} {loss.lane} ({loss.reason}) at t={number(round(loss.t, 1))}"
    return out


__all__ = [
    "GatewayState",
    "SubjectState",
    "TwinView",
    "before",
    "describe",
    "fold_condition",
    "silent",
    "status_text",
    "urgency",
]
