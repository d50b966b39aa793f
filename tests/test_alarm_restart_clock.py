"""How long an alarm carried over a restart has held, whatever the wall clock did meanwhile.

A Pi without a real-time clock boots with its clock behind (or, set by hand, ahead) until NTP
steps it.  The pipeline's own path (a real outbox, the anonymizer on a time base over the state
directory, the decoded records) with both clocks injected: samples stamped with the wall clock
as it reads then, as a driver does.  A limit alarm raised before the stop clears after the
restart with the time held since its onset: the downtime counted once the clock is right, never 0
and never the clock's error.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from test_alarm_source_removed import BED7, SPO2, WALL, Site, config

from gateway.anonymize import Anonymizer, Pseudonymizer
from gateway.outbox import AsyncOutbox, Outbox
from gateway.runtime import Pipeline
from gateway.sample import SampleBlock
from gateway.timebase import TimeBase

DAYS_2 = 2 * 86400.0
DOWN_S = 3600.0  # the true downtime


class Clocks:
    """The wall and monotonic clocks of the gateway's machine, moved by the test."""

    def __init__(self) -> None:
        self.w = WALL
        self.m = 0.0

    def wall(self) -> float:
        return self.w

    def mono(self) -> float:
        return self.m


def run(
    site: Site, tmp: Path, c: Clocks, value: float, seconds: int, *, step_s: float = 0.0, step_at: int = 0
) -> list[dict[str, Any]]:
    """One start on ``tmp``'s state: ``seconds`` of SpO2 at ``value`` a second apart, the wall clock stepped by ``step_s`` before sample ``step_at``; the alarms the twin got."""
    timebase = TimeBase.open(tmp / "state", wall=c.wall, mono=c.mono)
    site.anon = Anonymizer(Pseudonymizer(b"s" * 32), time_mode="relative", timebase=timebase)
    before = len(site.alarms)

    async def main() -> None:
        async with AsyncOutbox(lambda: Outbox(tmp / "outbox.db")) as outbox:
            pipeline = Pipeline(config(tmp, BED7), site.anon, outbox)
            await pipeline.end_vanished(c.m, c.w)
            for k in range(seconds):
                if k == step_at:
                    c.w += step_s  # NTP sets the clock right
                c.m += 1.0
                c.w += 1.0
                t = np.array([c.m])
                pipeline.sink.put_block(
                    SampleBlock(SPO2, t, np.array([c.w]), np.array([value]), np.zeros(1, np.uint8))
                )
                await pipeline.step(now_mono=c.m, now_wall=c.w)
            await outbox.flush()
            items = await outbox.lease(1000)
            site.take(items)
            await outbox.ack([i.id for i in items])
        timebase.close()

    asyncio.run(main())
    return site.alarms[before:]


def down(c: Clocks, wall_error_s: float) -> None:
    """The machine is off for DOWN_S and boots with its wall clock ``wall_error_s`` off (its monotonic clock anew)."""
    c.w += DOWN_S + wall_error_s
    c.m = 0.0


def held_at_clearance(tmp: Path, wall_error_s: float, step_s: float) -> float:
    """The limit alarm's raise before the stop and clearance after it; the clearance's time held."""
    site, c = Site(tmp), Clocks()
    assert [a["alarm"] for a in run(site, tmp, c, 86.0, 20)] == ["limit"]  # below 90 % for over 10 s
    down(c, wall_error_s)
    (cleared,) = run(site, tmp, c, 97.0, 20, step_s=step_s)
    assert cleared["alarm"] == "limit_cleared"
    return float(cleared["held_s"])


@pytest.mark.parametrize(
    ("wall_error_s", "step_s", "downtime_counted"),
    [
        (-DAYS_2, 0.0, 0.0),  # booted two days behind, not yet synced: the downtime is not known yet
        (-DAYS_2, DAYS_2, DOWN_S),  # then NTP steps it: the downtime counts
        (DAYS_2, -DAYS_2, DOWN_S),  # booted two days ahead, stepped back: only the true downtime counts
    ],
)
def test_a_limit_alarm_left_on_clears_with_the_time_held_whatever_the_clock_read_at_the_start(
    tmp_path: Path, wall_error_s: float, step_s: float, downtime_counted: float
) -> None:
    right = held_at_clearance(tmp_path / "right", 0.0, 0.0)  # the same, on a clock that is right
    assert right >= DOWN_S + 19.0  # from the first low sample to the stop, and the downtime
    held = held_at_clearance(tmp_path / "wrong", wall_error_s, step_s)
    assert held == pytest.approx(right - DOWN_S + downtime_counted, abs=0.01)


def test_a_step_while_the_alarm_was_on_before_the_stop_does_not_count_after_the_restart(
    tmp_path: Path,
) -> None:
    right = held_at_clearance(tmp_path / "right", 0.0, 0.0)
    site, c = Site(tmp_path), Clocks()
    c.w -= DAYS_2  # the first start two days behind; NTP steps it after the alarm was raised
    assert [a["alarm"] for a in run(site, tmp_path, c, 86.0, 20, step_s=DAYS_2, step_at=15)] == ["limit"]
    down(c, 0.0)
    (cleared,) = run(site, tmp_path, c, 97.0, 20)
    assert cleared["held_s"] == pytest.approx(right, abs=0.01)  # not two days more


def test_an_alarm_raised_before_ntp_stepped_the_clock_counts_only_the_true_downtimes(tmp_path: Path) -> None:
    site, c = Site(tmp_path), Clocks()
    assert run(site, tmp_path, c, 97.0, 5) == []
    down(c, -DAYS_2)  # booted two days behind; the alarm is raised, then NTP steps the clock
    assert [a["alarm"] for a in run(site, tmp_path, c, 86.0, 20, step_s=DAYS_2, step_at=15)] == ["limit"]
    down(c, 0.0)
    (cleared,) = run(site, tmp_path, c, 97.0, 20)
    # From the first low sample to the stop (20 s), one downtime, the clearance a second after the start.
    assert cleared["held_s"] == pytest.approx(20.0 + DOWN_S, abs=1.01)
    assert cleared["held_s"] < 21.0 + DOWN_S  # not the first downtime too, which NTP's step made known
