"""An alarm on when the gateway stopped is judged after the restart as if it had never stopped.

The pipeline's own path (a real outbox, the anonymizer, the twin's view of the decoded records),
stopped with an alarm on and started again on the same state directory: when the data after the
start shows the condition over, the twin receives its ordinary ending (no ``ended`` reason, no
second raise); when the condition still holds, the twin receives nothing new.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from test_alarm_source_removed import BED7, SPO2, WALL, Site, config, spo2

from gateway.outbox import AsyncOutbox, Outbox
from gateway.runtime import Pipeline

Run = Callable[[Pipeline], Awaitable[None]]


def run(site: Site, tmp: Path, body: Run) -> list[dict[str, Any]]:
    """One run of bed 7's pipeline on ``tmp``'s state: ``body`` feeds it; the alarms the twin got."""
    before = len(site.alarms)

    async def main() -> None:
        async with AsyncOutbox(lambda: Outbox(tmp / "outbox.db")) as outbox:
            pipeline = Pipeline(config(tmp, BED7), site.anon, outbox)
            await pipeline.end_vanished(0.0, WALL)
            await body(pipeline)
            await outbox.flush()
            items = await outbox.lease(1000)
            site.take(items)
            await outbox.ack([i.id for i in items])

    asyncio.run(main())
    return site.alarms[before:]


def kinds(alarms: list[dict[str, Any]]) -> list[tuple[str, str | None]]:
    return [(a["alarm"], a["detail"].get("ended")) for a in alarms]


async def low(pipeline: Pipeline) -> None:
    await spo2(pipeline, SPO2, 86.0, 12, 100.0)  # below 90 % for over 10 s: a limit alarm


def test_a_limit_alarm_whose_value_came_back_while_down_clears_after_the_restart(tmp_path: Path) -> None:
    site = Site(tmp_path)
    assert kinds(run(site, tmp_path, low)) == [("limit", None)]

    async def back(pipeline: Pipeline) -> None:
        await spo2(pipeline, SPO2, 97.0, 20, 1000.0)  # normal again: the off-delay's worth and more

    after = run(site, tmp_path, back)
    assert kinds(after) == [("limit_cleared", None)]
    assert after[0]["detail"]["level"] == "low"
    assert after[0]["value"] == 97.0
    assert site.subject("ward3-bed7").active == {}


def test_a_limit_alarm_that_still_holds_after_the_restart_sends_nothing(tmp_path: Path) -> None:
    site = Site(tmp_path)
    assert kinds(run(site, tmp_path, low)) == [("limit", None)]

    async def still_low(pipeline: Pipeline) -> None:
        await spo2(pipeline, SPO2, 86.0, 20, 1000.0)

    assert run(site, tmp_path, still_low) == []
    assert len(site.subject("ward3-bed7").active) == 1

    async def back(pipeline: Pipeline) -> None:
        await spo2(pipeline, SPO2, 97.0, 20, 2000.0)

    assert kinds(run(site, tmp_path, back)) == [("limit_cleared", None)]  # and it still ends
    assert site.subject("ward3-bed7").active == {}
