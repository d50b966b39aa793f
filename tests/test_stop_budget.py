"""The stop fits the unit: every bounded wait on the stop path forced to its maximum stays under TimeoutStopSec.

Units that swallow their cancellation, a drain that never ends and an outbox whose final commit
is stuck behind a held lock: each wait runs to its bound.  The default run does it with a short
stop budget; ``-m campaign`` with the shipped figures, against the shipped unit's TimeoutStopSec.
"""

from __future__ import annotations

import asyncio
import re
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from peers import ONE_AT_A_TIME

from gateway.cleanup import CANCEL_GRACE_S
from gateway.contracts import Lane
from gateway.notify import Notifier
from gateway.outbox import AsyncOutbox, Outbox, OutItem
from gateway.supervisor import STOP_BUDGET_S, Group, Supervisor, Unit

REPO = Path(__file__).resolve().parents[1]
MARGIN_S = 3.0
CLOSE_TIMEOUT_S = 5.0  # AsyncOutbox's default close timeout, as the runtime uses it

pytestmark = ONE_AT_A_TIME  # its bounds are a few tenths of a second of real time


def timeout_stop_s() -> float:
    text = (REPO / "systemd" / "edgetwin.service").read_text()
    found = re.search(r"^TimeoutStopSec=(\d+)s?$", text, re.MULTILINE)
    assert found, "TimeoutStopSec not found in the unit"
    return float(found.group(1))


def worst_stop(tmp_path: Path, stop_budget_s: float, close_timeout_s: float) -> float:
    """Seconds from the stop request to the outbox closed, with every wait run to its bound."""
    release = threading.Event()

    async def stubborn() -> None:
        # Swallows every cancellation until the test is over.
        while not release.is_set():
            try:
                await asyncio.sleep(0.05)
            except asyncio.CancelledError:
                continue

    async def unit(started: Callable[[], None]) -> None:
        started()
        await stubborn()

    async def drain(deadline: float) -> None:
        await stubborn()

    async def main() -> float:
        async with AsyncOutbox(lambda: Outbox(tmp_path / "o.db"), close_timeout_s=close_timeout_s) as outbox:
            sup = Supervisor(Notifier(None), start_timeout_s=5.0, stop_budget_s=stop_budget_s)
            for name, group in (("src", Group.SOURCES), ("pipe", Group.PIPELINE), ("up", Group.UPLINK)):
                sup.add(Unit(name, group, unit))
            sup.add(Unit("outbox", Group.OUTBOX, unit, critical=True))
            runner = asyncio.create_task(sup.run(drain, 25.0))
            while not sup.ready:
                await asyncio.sleep(0.01)
            store = outbox.outbox
            held = threading.Event()

            def hold() -> None:  # a commit that does not come back (a stuck disk)
                with store._lock:
                    held.set()
                    release.wait(120)

            holder = threading.Thread(target=hold)
            holder.start()
            held.wait(5)
            outbox.submit(OutItem(Lane.ALARMS, "t/last", b"x", time.time()))
            start = time.monotonic()
            sup.request_stop()
            await runner
        took = time.monotonic() - start
        release.set()
        holder.join(10)
        return took

    try:
        return asyncio.run(main())
    finally:
        release.set()


def test_every_wait_at_its_bound_fits_a_short_budget(tmp_path: Path) -> None:
    took = worst_stop(tmp_path, stop_budget_s=2.0, close_timeout_s=0.5)
    assert took <= 2.0 + 0.5 + CANCEL_GRACE_S + 0.7, took


def test_the_shipped_budget_fits_the_unit() -> None:
    assert timeout_stop_s() >= STOP_BUDGET_S + CLOSE_TIMEOUT_S + CANCEL_GRACE_S + MARGIN_S


@pytest.mark.campaign
def test_every_wait_at_its_bound_fits_the_units_timeout_stop_sec(tmp_path: Path) -> None:
    took = worst_stop(tmp_path, stop_budget_s=STOP_BUDGET_S, close_timeout_s=CLOSE_TIMEOUT_S)
    assert took <= timeout_stop_s() - MARGIN_S, took
