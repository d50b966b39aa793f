"""The latest state of every twin: per gateway and subject, the newest features, alarm and status.

Pure: messages in, state and text out.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from gateway.estimation.text import estimate_text
from gateway.twin.decoder import TwinMessage


@dataclass(slots=True)
class SubjectState:
    """One subject (patient or machine) as the twin knows it."""

    subject: str
    kind: str | None = None
    t: float | None = None  # time of the newest window
    streams: dict[str, dict[str, Any]] = field(default_factory=dict)  # metric -> newest stream entry
    scores: dict[str, float] = field(default_factory=dict)
    last_alarm: Mapping[str, Any] | None = None
    alarms: int = 0
    windows: int = 0
    estimates: dict[str, dict[str, Any]] = field(default_factory=dict)  # name -> newest estimate


@dataclass(slots=True)
class GatewayState:
    """One gateway: its status and its subjects."""

    gateway: str
    status: Mapping[str, Any] = field(default_factory=dict)
    subjects: dict[str, SubjectState] = field(default_factory=dict)
    diagnostics: int = 0


class TwinView:
    """Keeps the newest state; a replayed (historical) window never overwrites a newer one."""

    def __init__(self) -> None:
        self.gateways: dict[str, GatewayState] = {}

    def update(self, msg: TwinMessage) -> None:
        """Fold one message into the state."""
        gw = self.gateways.setdefault(msg.gateway, GatewayState(msg.gateway))
        rec = msg.record
        if msg.kind == "status":
            gw.status = dict(rec)
            return
        if msg.kind == "diag":
            gw.diagnostics += 1
            return
        subject = str(rec.get("subject", "?"))
        state = gw.subjects.setdefault(subject, SubjectState(subject))
        t = float(rec.get("t", 0.0))
        if msg.kind == "features":
            state.windows += 1
            if state.t is not None and t < state.t:
                return  # an older window replayed after a newer one
            state.t = t
            state.kind = rec.get("kind")
            for s in rec.get("streams", []):
                state.streams[str(s.get("metric"))] = dict(s)
            state.scores.update(rec.get("scores", {}))
        elif msg.kind == "estimates":
            name = str(rec.get("est"))
            newest = state.estimates.get(name)
            if newest is None or t >= float(newest.get("t", -math.inf)):
                state.estimates[name] = dict(rec)
        elif msg.kind == "alarms":
            state.alarms += 1
            if state.last_alarm is None or t >= float(state.last_alarm.get("t", -math.inf)):
                state.last_alarm = rec

    def snapshot(self) -> dict[str, Any]:
        """The whole state as plain data (for JSON)."""
        return {
            gw.gateway: {
                "status": dict(gw.status),
                "diagnostics": gw.diagnostics,
                "subjects": {
                    s.subject: {
                        "kind": s.kind,
                        "t": s.t,
                        "windows": s.windows,
                        "alarms": s.alarms,
                        "streams": s.streams,
                        "scores": s.scores,
                        "estimates": s.estimates,
                        "last_alarm": dict(s.last_alarm) if s.last_alarm else None,
                    }
                    for s in gw.subjects.values()
                },
            }
            for gw in self.gateways.values()
        }

    def render(self) -> str:
        """A few lines per twin, for a terminal."""
        lines: list[str] = []
        for gw in self.gateways.values():
            status = gw.status.get("state", "unknown")
            dropped = gw.status.get("dropped")
            lines.append(
                f"gateway {gw.gateway}: {status}"
                + (f", dropped at the gateway: {dropped}" if dropped else "")
            )
            for s in gw.subjects.values():
                cells = []
                for metric, entry in s.streams.items():
                    name = metric.removeprefix("MDC_")
                    if entry.get("gap"):
                        cells.append(f"{name}=GAP")
                        continue
                    f = entry.get("f", {})
                    value = f.get("rmssd", f.get("mean"))
                    cells.append(
                        f"{name}={value:.4g}{entry.get('unit', '')}" if value is not None else f"{name}=?"
                    )
                lines.append(
                    f"  {s.kind or '?':<10} {s.subject} t={s.t if s.t is not None else '-'} "
                    f"windows={s.windows} alarms={s.alarms}"
                )
                if cells:
                    lines.append("    " + "  ".join(cells))
                lines.extend(f"    estimate {estimate_text(rec)}" for rec in s.estimates.values())
                if s.last_alarm is not None:
                    a = s.last_alarm
                    lines.append(
                        f"    last alarm: {a.get('alarm')} {a.get('metric', '')} at t={a.get('t')}".rstrip()
                    )
        return "\n".join(lines)


def describe(msg: TwinMessage) -> str:
    """One line for one message."""
    rec = msg.record
    seq = f"#{msg.seq}" if msg.seq is not None else "#-"
    hist = " H" if msg.historical else ""
    head = f"{msg.gateway[:8]} {seq:>7}{hist:<2} {msg.topic[:34]:<34}"
    if msg.kind == "status":
        return f"{head} STATUS {rec.get('state')}" + (
            f" dropped={rec['dropped']}" if rec.get("dropped") else ""
        )
    t = rec.get("t", 0.0)
    if msg.kind == "features":
        cells = []
        for s in rec.get("streams", []):
            name = str(s.get("metric", "?")).removeprefix("MDC_").rsplit("/", 1)[-1]
            if s.get("gap"):
                cells.append(f"{name}=GAP")
                continue
            f = s.get("f", {})
            value = f.get("rmssd", f.get("mean"))
            cells.append(f"{name}={value:.4g}" if value is not None else f"{name}=?")
        return f"{head} t={t:>8.1f} FEATURES " + " ".join(cells)
    if msg.kind == "estimates":
        return f"{head} t={t:>8.1f} ESTIMATE {estimate_text(rec)}"
    if msg.kind == "alarms":
        detail = " ".join(f"{k}={v}" for k, v in rec.get("detail", {}).items())
        return f"{head} t={t:>8.1f} ALARM {rec.get('alarm')} {rec.get('metric', '')} {detail}".rstrip()
    detail = " ".join(f"{k}={v}" for k, v in rec.get("detail", {}).items())
    return f"{head} t={t:>8.1f} DIAG {rec.get('diag')} {detail}".rstrip()
