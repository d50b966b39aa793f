"""The outbox's age budget runs on the gateway's clock at queueing, not on a driver's or device's stamp.

A window whose samples a driver stamped hours behind (its wall time projected from a reading taken
before NTP stepped the clock forward, or a PLC whose clock is wrong) is as young as the moment it
was queued: an age budget of an hour must not drop it as hours old.  A wall-clock step is an
injected wall clock (the real one plus a shift the test sets); the monotonic clock is the real one.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_e2e import _config as e2e_config

from drivers import REGISTRY
from gateway.anonymize import Anonymizer, Pseudonymizer
from gateway.config import Config, load
from gateway.contracts import Lane, StreamFeatures, WindowRecord
from gateway.errors import TransientError
from gateway.outbox import AsyncOutbox, Outbox, OutItem
from gateway.records import DiagnosticRecord, decode
from gateway.runtime import Pipeline, budgets_for
from gateway.sample import MDC, Stream
from gateway.timebase import TimeBase

SPO2 = Stream("bed7-monitor", "MRN-0048213-SMITH", "A4:C1:38:5B:20:7E", MDC["MDC_PULS_OXIM_SAT_O2"])
BEHIND_S = 3 * 3600.0


class Wall:
    """The real wall clock plus a shift the test sets: NTP stepping it."""

    def __init__(self) -> None:
        self.shift = 0.0

    def __call__(self) -> float:
        return time.time() + self.shift


def _stamps(db: Path) -> list[float]:
    with contextlib.closing(sqlite3.connect(db)) as conn:
        return [row[0] for row in conn.execute("SELECT t_wall FROM records ORDER BY id")]


@contextlib.contextmanager
def _write_locked(db: Path) -> Iterator[None]:
    """Another connection holds the database's write lock: the outbox's writes fail as busy."""
    conn = sqlite3.connect(db, isolation_level=None)
    try:
        conn.execute("BEGIN IMMEDIATE")
        yield
    finally:
        conn.execute("ROLLBACK")
        conn.close()


def _an_hour_s_budget(tmp: Path) -> Config:
    return load(e2e_config(tmp, sections="[outbox]\nfeature_max_age_h = 1.0\n"), REGISTRY)


def test_a_window_stamped_hours_behind_is_not_aged_out_of_an_hour_s_budget(tmp_path: Path) -> None:
    config = _an_hour_s_budget(tmp_path)

    async def main() -> tuple[int, int, float | None]:
        anon = Anonymizer(Pseudonymizer(b"a" * 32), time_mode="relative")
        db = tmp_path / "outbox.db"
        async with AsyncOutbox(lambda: Outbox(db, budgets=budgets_for(config))) as outbox:
            pipeline = Pipeline(config, anon, outbox)
            sf = StreamFeatures(SPO2, 10, 0.0, {"mean": 97.0})
            end = WindowRecord(
                SPO2.subject, "medical", 0, time.monotonic(), time.time() - BEHIND_S, 2.0, (sf,)
            )
            pipeline.window(end)
            await outbox.flush()
            dropped = await outbox.expire()
            lane = outbox.outbox.stats().lanes[Lane.FEATURES]
            return dropped, lane.queued, lane.oldest_age_s

    dropped, queued, age = asyncio.run(main())
    assert (dropped, queued) == (0, 1)
    assert age is not None
    assert age < 60.0


def test_a_step_reported_while_records_wait_neither_ages_them_now_nor_after_a_restart(tmp_path: Path) -> None:
    # NTP steps the wall clock three hours forward while a window waits; the time base reports it
    # and the outbox moves its clock and this run's stamps with it.  The next run reads the stepped
    # clock: the window is as old as it is, not three hours older.
    db = tmp_path / "outbox.db"
    budgets = budgets_for(_an_hour_s_budget(tmp_path))
    wall = Wall()
    with Outbox(db, budgets=budgets, wall=wall) as ob:
        ob.put_many([OutItem(Lane.FEATURES, "features/x", b"w" * 40)])
        wall.shift = BEHIND_S
        assert ob.restamp() == pytest.approx(BEHIND_S, abs=1.0)
        assert ob.restamp() == pytest.approx(0.0, abs=1.0)  # a second call moves nothing twice
        assert ob.expire() == 0
        age = ob.stats().lanes[Lane.FEATURES].oldest_age_s
        assert age is not None
        assert age < 60.0
    with Outbox(db, budgets=budgets, wall=wall) as ob:  # a restart, on the stepped wall clock
        assert ob.expire() == 0
        assert ob.stats().lanes[Lane.FEATURES].queued == 1


def test_a_step_taken_before_the_outbox_opened_is_not_counted_again(tmp_path: Path) -> None:
    # The Pi boots three hours behind; the time base opens on that clock; NTP steps it right before
    # the outbox opens (its open waits for a check and may be retried), so the outbox's clock
    # already has the step.  The time base then reports it: the outbox must not move by it again
    # (its clock three hours ahead: the previous run's window dropped as three hours old, this
    # run's stamped in the future).
    db = tmp_path / "outbox.db"
    budgets = budgets_for(_an_hour_s_budget(tmp_path))
    wall = Wall()
    with Outbox(db, budgets=budgets, wall=wall) as ob:  # the previous run, on a right clock
        ob.put_many([OutItem(Lane.FEATURES, "features/x", b"before" * 8)])
    wall.shift = -BEHIND_S
    timebase = TimeBase.open(tmp_path / "state", wall=wall)
    wall.shift = 0.0
    with Outbox(db, budgets=budgets, wall=wall) as ob:
        ob.put_many([OutItem(Lane.FEATURES, "features/x", b"this run" * 8)])
        (step,) = timebase.take_steps()
        assert step.step_s == pytest.approx(BEHIND_S, abs=1.0)
        ob.restamp()
        assert ob.clock() == pytest.approx(wall(), abs=1.0)
        assert ob.expire() == 0
        assert ob.stats().lanes[Lane.FEATURES].queued == 2
    now = wall()
    assert all(now - 60.0 < t <= now + 1.0 for t in _stamps(db)), (now, _stamps(db))


def test_a_failed_restamp_moves_nothing_and_its_clock_step_is_still_sent(tmp_path: Path) -> None:
    # The restamp's write fails (another writer holds the database): neither the outbox's clock
    # nor this run's stamps move, and the clock_step the time base reported is not lost - the next
    # step restamps once and sends it.
    config = _an_hour_s_budget(tmp_path)
    db = tmp_path / "outbox.db"
    wall = Wall()

    async def main() -> tuple[list[float], float, list[float], float, list[DiagnosticRecord]]:
        timebase = TimeBase.open(tmp_path / "state", wall=wall)
        anon = Anonymizer(Pseudonymizer(b"a" * 32), time_mode="relative", timebase=timebase)
        async with AsyncOutbox(lambda: Outbox(db, budgets=budgets_for(config), wall=wall)) as outbox:
            pipeline = Pipeline(config, anon, outbox)
            outbox.submit(OutItem(Lane.FEATURES, "features/x", b"w" * 40))
            await outbox.flush()
            wall.shift = BEHIND_S
            with _write_locked(db), pytest.raises(TransientError):
                await pipeline.step()
            after_failure = (_stamps(db), outbox.outbox.clock() - wall())
            await pipeline.step()
            after_retry = (_stamps(db), outbox.outbox.clock() - wall())
            await outbox.flush()
            items = await outbox.lease(1000)
        records = [decode(i.payload) for i in items if i.lane is Lane.DIAGNOSTICS]
        steps = [r for r in records if isinstance(r, DiagnosticRecord) and r.diag == "clock_step"]
        return *after_failure, *after_retry, steps

    before, off_before, after, off_after, steps = asyncio.run(main())
    assert off_before == pytest.approx(-BEHIND_S, abs=1.0)  # not moved by the failed restamp
    assert after[0] == pytest.approx(before[0] + BEHIND_S, abs=1.0)  # moved once, with the clock
    assert off_after == pytest.approx(0.0, abs=1.0)
    assert [round(float(s.detail["step_s"])) for s in steps] == [round(BEHIND_S)]
