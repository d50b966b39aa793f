"""What goes into and comes out of the outbox: records, lanes' budgets and policies, statistics."""

from __future__ import annotations

import enum
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from gateway.contracts import Lane

MiB = 1024 * 1024
_DAY_S = 86_400.0


class FullPolicy(enum.Enum):
    """What a lane does when it is over its byte or age budget."""

    NEVER_DROP = "never_drop"  # keep everything, even past the total budget (alarms)
    DROP_OLDEST = "drop_oldest"  # delete the oldest records that are not leased
    DROP_NEWEST = "drop_newest"  # refuse the newest incoming records


class DropReason(enum.StrEnum):
    """Why records left the outbox without an acknowledgement."""

    BUDGET = "budget"  # over the lane's byte budget or the outbox's total budget
    AGE = "age"  # older than the lane's age budget
    CORRUPT = "corrupt"  # in a database or log that was damaged, replaced or set aside
    DISK_FULL = "disk_full"  # refused while the disk was full (alarms are kept, never refused)
    QUEUE_FULL = "queue_full"  # refused because the in-memory queue was over its byte bound
    OVERSIZE = "oversize"  # larger than the broker or profile takes, and not moved to dead letters
    DEAD_LETTER = "dead_letter"  # moved to the dead-letter table: kept on disk for inspection


@dataclass(frozen=True, slots=True)
class OutItem:
    """A record going into the outbox."""

    lane: Lane
    topic: str  # relative topic, already anonymized, e.g. "features/k3j2..."
    payload: bytes
    # For the age budget (epoch s); None: stamped when committed, on the outbox's age clock
    # (Outbox.clock), as the gateway queues records.  Never a driver's or device's stamp, which
    # may be projected from before a clock step or be a PLC's.
    t_wall: float | None = None


@dataclass(frozen=True, slots=True)
class Leased:
    """A record handed to the uplink; it stays in the outbox until acknowledged."""

    id: int
    lane: Lane
    topic: str
    payload: bytes
    t_wall: float
    attempts: int  # how many times this process leased it before (0 on the first lease)


@dataclass(frozen=True, slots=True)
class LaneBudget:
    """How much one lane may hold and what happens beyond that."""

    max_bytes: int | None  # None = unbounded for this lane
    max_age_s: float | None  # None = never ages out
    policy: FullPolicy


DEFAULT_BUDGETS: Mapping[Lane, LaneBudget] = {
    Lane.ALARMS: LaneBudget(None, None, FullPolicy.NEVER_DROP),
    Lane.FEATURES: LaneBudget(192 * MiB, 7 * _DAY_S, FullPolicy.DROP_OLDEST),
    Lane.DIAGNOSTICS: LaneBudget(16 * MiB, 2 * _DAY_S, FullPolicy.DROP_NEWEST),
}
DEFAULT_TOTAL_MAX_BYTES = 256 * MiB


@dataclass(frozen=True, slots=True)
class LaneStats:
    """The state of one lane."""

    queued: int  # un-acknowledged records, leased ones included
    queued_bytes: int  # payload plus topic bytes
    oldest_age_s: float | None  # age of the lane's head record, None when the lane is empty
    leased: int
    dropped: Mapping[str, int]  # by DropReason, since this database file was created


@dataclass(frozen=True, slots=True)
class LossEvent:
    """A recovery that may have lost committed records: the sequence goes on in a new epoch."""

    prev_epoch: int
    epoch: int
    last_id: int  # the highest id the old epoch was known to have assigned (0 when unknown)
    lost: Mapping[str, int]  # records lost, by lane name (counted as "corrupt" drops too)
    why: str
    t_wall: float

    def as_dict(self) -> dict[str, object]:
        """The event as JSON-ready data (state file, status topic)."""
        return {
            "prev_ep": self.prev_epoch,
            "ep": self.epoch,
            "last": self.last_id,
            "lost": dict(self.lost),
            "why": self.why,
            "t": round(self.t_wall, 3),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, object]) -> LossEvent:
        """Read back what :meth:`as_dict` wrote (ValueError/TypeError/KeyError when it is not that)."""
        lost = data["lost"]
        if not isinstance(lost, Mapping):
            raise TypeError("lost is not a mapping")
        return cls(
            int(str(data["prev_ep"])),
            int(str(data["ep"])),
            int(str(data["last"])),
            {str(k): int(str(v)) for k, v in lost.items()},
            str(data["why"]),
            float(str(data["t"])),
        )


@dataclass(frozen=True, slots=True)
class LastDrop:
    """The newest counted loss: which lane, why, how many records, when (wall clock)."""

    lane: str  # lane name
    reason: str  # a DropReason value
    n: int  # records that loss took
    t_wall: float
    why: str | None = None  # for a recovery: what was found (a database set aside, a torn log)

    def as_dict(self) -> dict[str, object]:
        """The loss as JSON-ready data (state file)."""
        out: dict[str, object] = {
            "lane": self.lane,
            "reason": self.reason,
            "n": self.n,
            "t": round(self.t_wall, 3),
        }
        if self.why is not None:
            out["why"] = self.why
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, object]) -> LastDrop:
        """Read back what :meth:`as_dict` wrote (ValueError/TypeError/KeyError when it is not that)."""
        why = data.get("why")
        t_wall = float(str(data["t"]))
        if not math.isfinite(t_wall):
            raise ValueError(f"time {t_wall} is not finite")
        return cls(
            str(data["lane"]),
            str(DropReason(str(data["reason"]))),
            int(str(data["n"])),
            t_wall,
            None if why is None else str(why),
        )


@dataclass(frozen=True, slots=True)
class DropReport:
    """Every loss the outbox knows of, as the status topic, diagnostics and ``STATUS=`` all show it."""

    drops: Mapping[str, Mapping[str, int]]  # by lane name and reason: persisted and refused in memory
    degraded: str | None  # why lower lanes are refused (a full disk, failing writes), None when not
    last: LastDrop | None  # the newest counted loss
    epoch: int = 0
    recoveries: int = 0  # recoveries that lost records, as kept (the last few)

    @property
    def total(self) -> int:
        """Records dropped, every lane and reason."""
        return sum(sum(reasons.values()) for reasons in self.drops.values())

    @property
    def by_lane(self) -> dict[str, int]:
        """Records dropped per lane (lanes with none left out)."""
        return {lane: sum(r.values()) for lane, r in self.drops.items() if sum(r.values())}

    @property
    def degraded_token(self) -> str | None:
        """The degraded state as one plain token (``disk_full``, ``write_failing``), None when not."""
        if self.degraded is None:
            return None
        return "disk_full" if "full" in self.degraded.lower() else "write_failing"

    def headline(self) -> str:
        """``dropped N`` and, after a loss, what the last one was (for the ``STATUS=`` line)."""
        text = f"dropped {self.total}"
        if self.last is not None:
            text += f" (last {self.last.n} {self.last.lane} {self.last.reason})"
        return text


@dataclass(frozen=True)
class OutboxStats:
    """A snapshot of the outbox for health reports and tests."""

    lanes: Mapping[Lane, LaneStats]
    total_bytes: int
    recovered_from: tuple[Path, ...]  # files this process set aside as corrupt
    epoch: int = 0
    losses: tuple[LossEvent, ...] = ()  # recoveries that lost records, oldest first (the last few)
    degraded: str | None = None  # why the outbox is refusing lower lanes (a full disk), None when not
    dead_letters: int = 0  # records kept in the dead-letter table

    @property
    def queued(self) -> int:
        """Un-acknowledged records in all lanes."""
        return sum(s.queued for s in self.lanes.values())

    @property
    def dropped(self) -> Mapping[Lane, Mapping[str, int]]:
        """Dropped records per lane and reason."""
        return {lane: s.dropped for lane, s in self.lanes.items()}

    @property
    def dropped_total(self) -> int:
        """Dropped records of every lane and reason."""
        return sum(sum(s.dropped.values()) for s in self.lanes.values())


def record_size(item: OutItem) -> int:
    """The bytes a record counts against its budgets: payload plus UTF-8 topic."""
    return len(item.payload) + len(item.topic.encode())
