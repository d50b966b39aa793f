"""One snapshot of a running gateway's state, and what is read from it.

The :class:`StatusBoard` gathers the state of every part into one JSON-ready dict
(:meth:`StatusBoard.refresh`); ``edgetwin status`` (over the control socket), the systemd
``STATUS=`` line and the metrics are all read from that one snapshot, so they never disagree.

Subjects appear as the pseudonyms the twin sees, never as their local names; sources by their
config names.  The pure functions at the bottom (:func:`health`, :func:`headline`,
:func:`render_text`) work on the dict alone, so a client renders what a server sent.
"""

from __future__ import annotations

import math
import os
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from gateway import __version__
from gateway.contracts import AlarmKind, alarm_class

#: Exit codes of ``edgetwin status`` (the monitoring-plugin convention).
EXIT_HEALTHY, EXIT_DEGRADED, EXIT_DOWN, EXIT_UNKNOWN = 0, 1, 2, 3
HEALTH_EXIT = {"healthy": EXIT_HEALTHY, "degraded": EXIT_DEGRADED, "down": EXIT_DOWN}

#: The outbox is "near its budget" from this fraction of ``outbox.max_mb`` on.
NEAR_BUDGET = 0.8
#: Records per second are averaged over this long.
RATE_WINDOW_S = 10.0
#: The technical alarms that make a gateway degraded, as the headline words them.
_TECHNICAL = {"sensor_lost": "lost", "sensor_fault": "faulted", "device_lost": "device lost"}
#: A stream the windower finds ok shows the state of a condition on it that its driver raised.
_STREAM_ALARM = {AlarmKind.SENSOR_FAULT: "faulted", AlarmKind.SENSOR_LOST: "lost"}
#: Active alarms are listed by priority (IEC 60601-1-8: high first), then the oldest first.
_RANK = {"high": 0, "medium": 1, "low": 2}


@dataclass(slots=True)
class _Since:
    """When each tracked value last changed (monotonic time)."""

    values: dict[str, Any] = field(default_factory=dict)
    since: dict[str, float] = field(default_factory=dict)

    def see(self, key: str, value: Any, now: float) -> float:
        """Record ``value`` for ``key``; return how long it has held that value."""
        if key not in self.values or self.values[key] != value:
            self.values[key] = value
            self.since[key] = now
        return now - self.since[key]


class StatusBoard:
    """Collects the gateway's state into one snapshot (see the module docstring)."""

    def __init__(
        self,
        *,
        supervisor: Any,
        pipeline: Any,
        outbox: Any,
        uplink: Any,
        uplink_kind: str,
        models: Sequence[Any],
        sources: Sequence[tuple[str, str]],
        pseudonym: Callable[[str], str],
        budget_bytes: int,
        held_names: Sequence[str] = (),
    ) -> None:
        self._sup = supervisor
        self._pipeline = pipeline
        self._outbox = outbox
        self._uplink = uplink
        self._uplink_kind = uplink_kind
        self._models = tuple(models)
        self._sources = tuple(sources)  # (name, driver)
        self._pseudonym = pseudonym
        self._budget = budget_bytes
        # Metric names holding a configured identity, found at the start (gateway.held_names).
        self._held_names = list(held_names)
        self._since = _Since()
        self._started = time.monotonic()
        self._acked: deque[tuple[float, int]] = deque()  # (monotonic, acked) over the rate window
        self._stats: Any = None
        self.snapshot: dict[str, Any] | None = None

    def set_sources(self, sources: Sequence[tuple[str, str]], held_names: Sequence[str] = ()) -> None:
        """The sources (name, driver) and the names holding an identity of a config a revision applied in place."""
        self._sources = tuple(sources)
        self._held_names = list(held_names)

    async def refresh(self) -> dict[str, Any]:
        """Read the outbox's figures from its database, then :meth:`compose` a new snapshot."""
        self._stats = await self._outbox.stats()
        return self.compose()

    def compose(self) -> dict[str, Any]:
        """A new snapshot from the parts' state now and the outbox figures of the last refresh."""
        stats = self._stats
        now = time.monotonic()
        snap: dict[str, Any] = {
            "version": __version__,
            "pid": os.getpid(),
            "time": time.time(),
            "uptime_s": round(now - self._started, 1),
            "units": self._units(now),
            "sources": self._sources_state(now),
            "models": self._models_state(),
            "outbox": self._outbox_state(stats),
            "uplink": self._uplink_state(now, stats.queued if stats is not None else 0),
            "alarms": self._alarms(now),
            "pipeline": self._pipeline.counters(),
            "reports": self._reports(),
            "held_names": self._held_names,
        }
        snap["health"] = health(snap)
        snap["headline"] = headline(snap)
        self.snapshot = snap
        return snap

    # --- the parts ------------------------------------------------------------------------------

    def _units(self, now: float) -> list[dict[str, Any]]:
        out = []
        for unit in self._sup.units:
            state = str(unit.state)
            out.append(
                {
                    "name": unit.name,
                    "state": state,
                    "critical": unit.critical,
                    "since_s": round(self._since.see(f"unit:{unit.name}", state, now), 1),
                    "failures": unit.failures,
                    "last_error": unit.last_error,
                    # What an attempt is waiting for (a connect, a device), and why it counts as stalled.
                    "waiting": unit.pulse.wait if unit.attempting and unit.pulse is not None else None,
                    "stalled": unit.stale_reason(now) if hasattr(unit, "stale_reason") else None,
                }
            )
        return out

    def _streams(self) -> dict[str, list[dict[str, Any]]]:
        by_source: dict[str, list[dict[str, Any]]] = {}
        now = time.monotonic()
        # The windower judges a stream by its data; its driver's own verdict (an OPC UA node gone
        # or retyped, its held value no longer delivered) is the condition on at the twin.
        raised = {
            (s.source, s.subject, s.metric.name): _STREAM_ALARM[e.kind]
            for e in self._pipeline.alarms_on()
            if (s := e.stream) is not None and e.kind in _STREAM_ALARM
        }
        for st in self._pipeline.windower.stream_states(now):
            last = st["last_t_mono"]
            status = st["status"]
            if status == "ok":
                status = raised.get((st["source"], st["subject"], st["metric"]), status)
            by_source.setdefault(st["source"], []).append(
                {
                    "metric": st["metric"],
                    "unit": st["unit"],
                    "subject": self._pseudonym(st["subject"]),
                    "status": status,
                    # What a silent stream's device reports instead (a probe off): {metric, fault}.
                    "explained_by": st["explained_by"],
                    "last_sample_age_s": round(now - last, 1) if math.isfinite(last) else None,
                    "value": round(st["last_value"], 3) if math.isfinite(st["last_value"]) else None,
                    "samples": st["accepted"],
                    "dropped": {"out_of_order": st["out_of_order"], "overwritten": st["overwritten"]},
                }
            )
        return by_source

    def _sources_state(self, now: float) -> list[dict[str, Any]]:
        units = {u.name: u for u in self._sup.units}
        streams = self._streams()
        out = []
        for name, driver in self._sources:
            unit = units.get(f"source:{name}")
            link = "disabled" if unit is None else ("up" if str(unit.state) == "running" else str(unit.state))
            mine = streams.get(name, [])
            drops: dict[str, int] = {}
            for s in mine:
                for reason, n in s["dropped"].items():
                    drops[reason] = drops.get(reason, 0) + n
            out.append(
                {
                    "name": name,
                    "driver": driver,
                    "link": link,
                    "since_s": round(self._since.see(f"link:{name}", link, now), 1),
                    "last_error": unit.last_error if unit is not None else "",
                    "streams": mine,
                    "dropped": drops,
                }
            )
        return out

    def _models_state(self) -> list[dict[str, Any]]:
        out = []
        known = {(st["subject"], st["kind"]) for st in self._pipeline.windower.stream_states()}
        for model in self._models:
            states = model.subject_states(known) if hasattr(model, "subject_states") else {}
            stats: dict[str, Any] = model.stats() if hasattr(model, "stats") else {}
            coverage = getattr(model, "coverage", None)
            out.append(
                {
                    "name": model.name,
                    "state": "demoted" if getattr(model, "demoted", False) else "active",
                    "latency_p50_us": stats.get("latency_p50_us"),
                    # Windows not judged because an input held too little of its span (a start, an outage).
                    "partial_windows": coverage.partial_windows if coverage is not None else 0,
                    "subjects": [
                        {"subject": self._pseudonym(subject), "state": state}
                        for subject, state in sorted(states.items())
                    ],
                }
            )
        return out

    def _outbox_state(self, stats: Any) -> dict[str, Any]:
        # Drops as the outbox counts them now: persisted ones and those refused before a write.
        drops: dict[str, dict[str, int]] = (
            self._outbox.drop_counts() if hasattr(self._outbox, "drop_counts") else {}
        )
        lanes = {}
        for lane, ls in stats.lanes.items() if stats is not None else ():
            name = lane.name.lower()
            lanes[name] = {
                "queued": ls.queued,
                "bytes": ls.queued_bytes,
                "oldest_age_s": round(ls.oldest_age_s, 1) if ls.oldest_age_s is not None else None,
                "leased": ls.leased,
                "dropped": dict(drops.get(name, ls.dropped)),
            }
        return {
            "queued": stats.queued if stats is not None else 0,
            "bytes": stats.total_bytes if stats is not None else 0,
            "budget_bytes": self._budget,
            "pending_write": self._outbox.pending,
            "dropped": sum(sum(r.values()) for r in drops.values()),
            # Why it refuses lower lanes (a full disk, failing writes), or None.
            "degraded": self._outbox.health() if hasattr(self._outbox, "health") else None,
            "last_loss": _last_loss(self._outbox),
            "lanes": lanes,
        }

    def _uplink_state(self, now: float, queued: int) -> dict[str, Any]:
        up = self._uplink
        unit = next((u for u in self._sup.units if u.name == "uplink"), None)
        if self._uplink_kind == "none":
            state = "none"
        elif unit is not None and str(unit.state) != "running":
            state = str(unit.state)
        elif self._uplink_kind == "mqtt":
            state = "connected" if getattr(up, "connected", False) else "down"
        else:
            state = "connected"
        counters = getattr(up, "counters", None)
        acked = int(counters.acked) if counters is not None else int(getattr(up, "delivered", 0))
        self._acked.append((now, acked))
        while len(self._acked) > 2 and now - self._acked[1][0] >= RATE_WINDOW_S:
            self._acked.popleft()
        t0, n0 = self._acked[0]
        rate = max(0.0, (acked - n0) / (now - t0)) if now > t0 else 0.0
        session = getattr(up, "_session", None)
        replaying = bool(getattr(session, "replaying", False)) if state == "connected" else False
        # The uplink's own account of why it is not connected, else the unit's last failure.
        last_error = getattr(up, "problem", None) or (unit.last_error if unit is not None else "")
        if state == "connected":
            last_error = unit.last_error if unit is not None and unit.failures else ""
        latencies = sorted(getattr(up, "publish_latency_s", ()))
        p50 = round(latencies[len(latencies) // 2], 4) if latencies else None
        return {
            "kind": self._uplink_kind,
            "state": state,
            "since_s": round(self._since.see("uplink", state, now), 1),
            "last_error": last_error,
            "records_per_s": round(rate, 1),
            "delivered": acked,
            # Everything not yet acknowledged is what a reconnect replays.
            "replay_backlog": queued if state != "connected" or replaying else 0,
            "replaying": replaying,
            # Features windows held for their batch (uplink.mqtt.batch_s): durable, sent within batch_s.
            "held_windows": int(getattr(up, "held_windows", 0)),
            "publish_latency_p50_s": p50,  # publish to PUBACK, MQTT only
        }

    def _reports(self) -> list[dict[str, Any]]:
        """The latest link and health counters each driver and model reported (numbers only)."""
        out = []
        wall = time.time()
        for (kind, subject), diag in sorted(
            getattr(self._pipeline, "last_diagnostics", {}).items(), key=lambda kv: (kv[0][0], kv[0][1] or "")
        ):
            if kind in {"counters", "sim_label"}:
                continue  # the gateway's own counters are above; simulator labels are ground truth
            numbers = {k: v for k, v in diag.detail.items() if isinstance(v, int | float)}
            out.append(
                {
                    "kind": kind,
                    "subject": self._pseudonym(subject) if subject else "",
                    "age_s": round(max(0.0, wall - diag.t_wall), 1),
                    "counters": numbers,
                }
            )
        return out

    def _alarms(self, now: float) -> list[dict[str, Any]]:
        # What the twin was told is on (every kind, carried over a restart too), not what the
        # windower sees now: a limit alarm stays on at the twin while its probe is off.
        wall = time.time()
        out = []
        for e in self._pipeline.alarms_on():
            s = e.stream
            what = str(e.detail.get("model") or e.detail.get("estimate") or (s.metric.name if s else ""))
            if e.kind is AlarmKind.DEVICE_LOST:
                what = ""  # the device, with every stream it delivers
            where = "" if s is None else s.source
            since = e.since
            # On the monotonic clock, and across a restart on the time base's life clock: no step moves it.
            age = self._pipeline.alarm_age(e, now)
            if age is not None:
                since_s = age
            elif since is None:  # a ledger written before raises were timed
                since_s = self._since.see(f"alarm:{e.kind}/{where}/{what}/{e.subject}", True, now)
            else:  # a ledger written before the life clock: the wall clock is all there is
                since_s = max(0.0, wall - since)
            out.append(
                {
                    "kind": e.kind.value,
                    "class": alarm_class(e.kind, e.subject_kind or (s.kind if s else None)).value,
                    "priority": e.priority,
                    "level": str(e.detail.get("level", "")),
                    "source": where,
                    "subject": self._pseudonym(e.subject),
                    "metric": what,
                    "since_s": round(since_s, 1),
                }
            )
        out.sort(key=lambda a: (_RANK.get(a["priority"], 3), -a["since_s"]))
        return out


# --- reading a snapshot (pure) --------------------------------------------------------------------


def _problems(snap: Mapping[str, Any]) -> tuple[list[str], list[str]]:
    """(reasons it is down, reasons it is degraded), most important first."""
    down: list[str] = []
    degraded: list[str] = []
    down += [
        f"{u['name']} {u['state']}" + (f": {u['last_error']}" if u["last_error"] else "")
        for u in snap["units"]
        if u["critical"] and u["state"] not in {"running", "starting"}
    ]
    degraded += [f"{u['name']} stalled: {u['stalled']}" for u in snap["units"] if u.get("stalled")]
    starting = [u["name"] for u in snap["units"] if u["state"] == "starting"]
    if starting:
        degraded.append("starting: " + ", ".join(starting))
    if snap["outbox"].get("degraded"):
        # Capitals: a full disk or failing writes lose data; nothing else matters as much.
        degraded.append(f"OUTBOX DEGRADED: {snap['outbox']['degraded']}")
    # Records dropped as long as the config stands: a name to change, said until it is.
    degraded += snap.get("held_names", [])
    up = snap["uplink"]
    if up["state"] not in {"connected", "none"}:
        degraded.append(f"uplink {up['state']} {up['since_s']:.0f} s, {snap['outbox']['queued']} queued")
    sources = [
        f"{s['name']} link {s['link']} {s['since_s']:.0f} s"
        for s in snap["sources"]
        if s["link"] in {"failed", "retrying"}
    ]
    others = [
        f"{u['name']} {u['state']}"
        for u in snap["units"]
        if not u["critical"]
        and u["state"] in {"failed", "retrying"}
        and u["name"] != "uplink"
        and not u["name"].startswith("source:")
    ]
    ob = snap["outbox"]
    if ob["budget_bytes"] and ob["bytes"] >= NEAR_BUDGET * ob["budget_bytes"]:
        degraded.append(
            f"outbox at {100 * ob['bytes'] / ob['budget_bytes']:.0f}% of its {_size(ob['budget_bytes'])} budget, "
            f"{ob['queued']} queued"
        )
    degraded += sources + others
    # A patient's or a machine's alarm is not the gateway's trouble; a sensor or device one is.
    for alarm in snap["alarms"]:
        what = _TECHNICAL.get(alarm["kind"])
        if what is not None:
            where = " ".join(x for x in (alarm["source"], alarm["metric"]) if x)
            degraded.append(f"{where} {what} {alarm['since_s']:.0f} s")
    degraded += [f"model {m['name']} demoted" for m in snap["models"] if m["state"] == "demoted"]
    return down, degraded


def health(snap: Mapping[str, Any]) -> str:
    """``healthy``, ``degraded`` or ``down``."""
    down, degraded = _problems(snap)
    return "down" if down else "degraded" if degraded else "healthy"


def headline(snap: Mapping[str, Any]) -> str:
    """The one thing that matters most, for STATUS= and the first line of ``status``."""
    down, degraded = _problems(snap)
    problems = down + degraded
    dropped = snap["outbox"].get("dropped", 0)
    # Records lost undelivered are always worth the few characters, whatever else is said.
    lost = f", dropped {dropped}" if dropped else ""
    if problems:
        more = f" (+{len(problems) - 1} more)" if len(problems) > 1 else ""
        return ("down: " if down else "") + problems[0] + more + lost
    running = sum(1 for u in snap["units"] if u["state"] == "running")
    streams = sum(len(s["streams"]) for s in snap["sources"])
    up = snap["uplink"]
    uplink = "no uplink" if up["state"] == "none" else f"uplink {up['state']} {up['records_per_s']:g}/s"
    return (
        f"healthy: {running}/{len(snap['units'])} units running, {streams} stream(s), {uplink}, "
        f"{snap['outbox']['queued']} queued{lost}"
    )


def _size(n: float) -> str:
    for unit, scale in (("GB", 2**30), ("MB", 2**20), ("KB", 2**10)):
        if n >= scale:
            return f"{n / scale:.0f} {unit}"
    return f"{n:.0f} B"


def _age(value: float | None) -> str:
    if value is None:
        return "-"
    if value < 120:
        return f"{value:.0f} s"
    if value < 7200:
        return f"{value / 60:.0f} min"
    return f"{value / 3600:.1f} h"


def _drops(d: Mapping[str, int]) -> str:
    shown = [f"{k} {v}" for k, v in sorted(d.items()) if v]
    return ", ".join(shown) if shown else "none"


def render_text(snap: Mapping[str, Any]) -> str:
    """The snapshot as text for a person."""
    lines = [
        f"edgetwin {snap['version']} (PID {snap['pid']}, up {_age(snap['uptime_s'])}): {snap['health'].upper()}",
        f"  {snap['headline']}",
        "",
        "units:",
    ]
    for u in snap["units"]:
        err = f"  ({u['last_error']})" if u["last_error"] and u["state"] != "running" else ""
        if u.get("waiting"):
            err += f"  waiting: {u['waiting']}"
        if u.get("stalled"):
            err += f"  STALLED: {u['stalled']}"
        lines.append(f"  {u['name']:<24} {u['state']:<9} since {_age(u['since_s'])}{err}")
    lines += ["", "sources:"]
    for s in snap["sources"]:
        lines.append(
            f"  {s['name']} ({s['driver']}): link {s['link']} since {_age(s['since_s'])}, drops: {_drops(s['dropped'])}"
        )
        for st in s["streams"]:
            why = st.get("explained_by")
            lines.append(
                f"    {st['metric']:<28} {st['status']:<8} last sample {_age(st['last_sample_age_s'])} ago"
                f"  subject {st['subject']}"
                + (f"  (explained by {why['metric']}: {why['fault']})" if why else "")
            )
    held = snap.get("held_names", [])
    if held:
        lines += ["", "metric names holding an identity (records dropped; rename them):"]
        lines += [f"  {reason}" for reason in held]
    reports = snap.get("reports", [])
    if reports:
        lines += ["", "driver and model reports (latest):"]
        for r in reports:
            counters = ", ".join(f"{k} {v:g}" for k, v in sorted(r["counters"].items())) or "-"
            who = f" subject {r['subject']}" if r["subject"] else ""
            lines.append(f"  {r['kind']}{who} ({_age(r['age_s'])} ago): {counters}")
    if snap["models"]:
        lines += ["", "models:"]
        for m in snap["models"]:
            subjects = ", ".join(f"{x['subject']} {x['state']}" for x in m["subjects"]) or "no subject yet"
            partial = m.get("partial_windows", 0)
            held = f"; {partial} windows partial, not judged" if partial else ""
            lines.append(f"  {m['name']}: {m['state']}; {subjects}{held}")
    ob = snap["outbox"]
    lines += [
        "",
        f"outbox: {ob['queued']} queued, {_size(ob['bytes'])} of its {_size(ob['budget_bytes'])} budget, "
        f"{ob.get('dropped', 0)} dropped"
        # Records not on disk yet (a full disk keeps alarms here, first in line): not in any lane.
        + (f", {ob['pending_write']} waiting in memory to be written" if ob.get("pending_write") else "")
        + (f"; DEGRADED: {ob['degraded']}" if ob.get("degraded") else ""),
    ]
    for lane, ls in ob["lanes"].items():
        lines.append(
            f"  {lane:<12} {ls['queued']:>7} queued {ls['bytes']:>10} bytes  oldest {_age(ls['oldest_age_s'])}"
            f"  drops: {_drops(ls['dropped'])}"
        )
    up = snap["uplink"]
    lines += [
        "",
        f"uplink ({up['kind']}): {up['state']} since {_age(up['since_s'])}, {up['records_per_s']:g} records/s, "
        f"replay backlog {up['replay_backlog']}"
        + (f", {up['held_windows']} windows held for their batch" if up.get("held_windows") else "")
        + (f"; last error: {up['last_error']}" if up["last_error"] else ""),
        "",
        f"alarms active: {len(snap['alarms'])}",
    ]
    lines += [
        f"  {a['kind']:<13} {a.get('priority') or '-':<6} {a['source'] or '-':<16} "
        f"{(a['metric'] + ' ' + a.get('level', '')).strip() or '-':<28} subject {a['subject']} since {_age(a['since_s'])}"
        for a in snap["alarms"]
    ]
    return "\n".join(lines)


def _last_loss(outbox: Any) -> dict[str, object] | None:
    """The newest loss, as the status topic and the diagnostics name it (None when none)."""
    last = outbox.report().last if hasattr(outbox, "report") else None
    return None if last is None else last.as_dict()
