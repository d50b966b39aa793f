"""The outbox's age budget runs on the gateway's clock at queueing, not on a driver's or device's stamp.

A window whose samples a driver stamped hours behind (its wall time projected from a reading taken
before NTP stepped the clock forward, or a PLC whose clock is wrong) is as young as the moment it
was queued: an age budget of an hour must not drop it as hours old.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from test_e2e import _config as e2e_config

from drivers import REGISTRY
from gateway.anonymize import Anonymizer, Pseudonymizer
from gateway.config import Config, load
from gateway.contracts import Lane, StreamFeatures, WindowRecord
from gateway.outbox import AsyncOutbox, Outbox, OutItem
from gateway.runtime import Pipeline, budgets_for
from gateway.sample import MDC, Stream

SPO2 = Stream("bed7-monitor", "MRN-0048213-SMITH", "A4:C1:38:5B:20:7E", MDC["MDC_PULS_OXIM_SAT_O2"])
BEHIND_S = 3 * 3600.0


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
    with Outbox(db, budgets=budgets) as ob:
        ob.put_many([OutItem(Lane.FEATURES, "features/x", b"w" * 40)])
        ob.restamp(BEHIND_S)
        assert ob.expire() == 0
        age = ob.stats().lanes[Lane.FEATURES].oldest_age_s
        assert age is not None
        assert age < 60.0
    with Outbox(db, budgets=budgets) as ob:  # a restart, on the stepped wall clock
        assert ob.expire(now_wall=time.time() + BEHIND_S) == 0
        assert ob.stats().lanes[Lane.FEATURES].queued == 1
