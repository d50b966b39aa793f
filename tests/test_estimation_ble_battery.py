"""A wearable's own battery level (BLE Battery Level 0x2A19) as a battery estimate: SoC, drain, time left.

The radio part runs the real BLE driver (bleak on the emulated BlueZ) against a simulated strap;
the drain part feeds the estimator levels on a simulated clock.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from gateway.contracts import Alarm, AlarmKind, Estimate, SourceInfo
from gateway.estimation import Estimation, EstimatorsSection
from gateway.estimation.battery import BatteryState
from gateway.sample import Metric, Sample, Stream

BATTERY = "MDC_ATTR_VAL_BATT_CHARGE"
SUBJECT = "ward3-bed21"
WALL = 1.7e9


def _section(**extra: float) -> EstimatorsSection:
    return EstimatorsSection.model_validate(
        {"battery": [{"subject": SUBJECT, "level": BATTERY, "low_soc": 20.0, "every_s": 0.001, **extra}]}
    )


def test_reported_levels_give_the_drain_and_hours_left_across_a_restart(tmp_path: Path) -> None:
    stream = Stream("ble", SUBJECT, "C0:FF:EE:00:21:21", Metric(BATTERY, "%"), on_change=True)
    out: list[Estimate] = []
    stage = Estimation(_section(), {SUBJECT: "medical"}, out.append, lambda a: None, tmp_path)
    # 5 % an hour, reported in whole percent every 5 minutes for two hours.
    for k in range(25):
        t = 300.0 * k
        stage.put(Sample(stream, t, WALL + t, float(math.floor(90.0 - 5.0 * t / 3600.0))))
    last = out[-1]
    assert (last.name, last.state, last.value) == ("soc", "measured", 80.0)
    assert last.sd == pytest.approx(1.0 / math.sqrt(12.0))  # the rounding to whole percent
    assert last.detail["drain_pct_h"] == pytest.approx(5.0, abs=0.5)
    assert last.detail["hours_left"] == pytest.approx(80.0 / 5.0, rel=0.1)
    assert [s.metric.name for s, _ in last.sources] == [BATTERY]
    stage.save(7200.0, WALL + 7200.0)
    # After a restart (a new monotonic clock) one more level: the drain is still known.
    out.clear()
    again = Estimation(_section(), {SUBJECT: "medical"}, out.append, lambda a: None, tmp_path,
                       now_mono=50.0, now_wall=WALL + 7400.0)  # fmt: skip
    again.put(Sample(stream, 100.0, WALL + 7450.0, 75.0))
    assert out[-1].detail["drain_pct_h"] == pytest.approx(5.0, abs=0.5)
    # A charge (the level rises) restarts the drain: unknown until enough levels again.
    again.put(Sample(stream, 400.0, WALL + 7750.0, 100.0))
    assert "drain_pct_h" not in out[-1].detail
    est = again.estimators[0]
    assert isinstance(est, BatteryState)
    assert len(est.levels) == 1


def test_battery_spec_needs_a_pack_or_a_level() -> None:
    from pydantic import ValidationError  # noqa: PLC0415

    with pytest.raises(ValidationError, match="or the `level` the device reports"):
        EstimatorsSection.model_validate({"battery": [{"subject": "m", "voltage": "V"}]})
    with pytest.raises(ValidationError, match="or the `level` the device reports"):
        EstimatorsSection.model_validate({"battery": [{"subject": "m"}]})


# -- on the emulated radio -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def testbed() -> Iterator[object]:
    pytest.importorskip("bleak")
    pytest.importorskip("bluezoo")
    from drivers.ble.testbed.harness import Testbed  # noqa: PLC0415

    with Testbed(scan_interval_s=0.05, page_timeout_s=0.2) as tb:
        yield tb


@pytest.mark.slow
def test_a_wearables_battery_level_over_the_emulated_radio_becomes_a_soc_estimate_and_alarm(
    testbed: object,
) -> None:
    from peers import RecordingSink  # noqa: PLC0415

    from drivers.ble.config import BleConfig  # noqa: PLC0415
    from drivers.ble.driver import factory  # noqa: PLC0415
    from drivers.ble.testbed.harness import Testbed  # noqa: PLC0415

    assert isinstance(testbed, Testbed)
    strap = testbed.wearable("hr", "C0:FF:EE:00:21:01", rate=0, battery=64)
    drv = factory(
        SourceInfo("ble-ward3", SUBJECT, "medical"),
        BleConfig.model_validate(
            {
                "lost_after_s": 5.0,
                "reconnect_min_s": 0.1,
                "devices": [{"address": strap.address, "profile": "hr"}],
            }
        ),
    )
    estimates: list[Estimate] = []
    alarms: list[Alarm] = []
    stage = Estimation(_section(), {SUBJECT: "medical"}, estimates.append, alarms.append)

    class Feed(RecordingSink):
        def put(self, sample: Sample) -> None:
            super().put(sample)
            stage.put(sample)

    sink = Feed(blocks=False)

    async def until(cond: object, what: str) -> None:
        deadline = time.monotonic() + 10.0
        while not cond():  # type: ignore[operator]
            assert time.monotonic() < deadline, f"timed out waiting for {what}"
            await asyncio.sleep(0.02)

    async def send(line: str) -> None:
        deadline = time.monotonic() + 5.0
        while True:
            try:
                await asyncio.to_thread(strap.command, line)
                return
            except Exception as exc:  # the wearable answers "not subscribed" until the gateway is
                if "not subscribed" not in str(exc) or time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.02)

    async def scenario() -> None:
        started = asyncio.Event()
        task = asyncio.create_task(drv.run(sink, started=started.set), name="ble-battery-under-test")
        try:
            await until(lambda: any(e.value == 64.0 for e in estimates), "the level read on connect")
            await send("battery 12")
            await until(lambda: any(e.value == 12.0 for e in estimates), "the notified low level")
            await send("battery 90")
            await until(lambda: any(e.value == 90.0 for e in estimates), "the level after a charge")
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    try:
        asyncio.run(scenario())
    finally:
        strap.stop()
    socs = [e for e in estimates if e.name == "soc"]
    assert [e.value for e in socs][:1] == [64.0]
    assert all(e.state == "measured" and e.sources[0][0].device == strap.address for e in socs)
    stream = drv.battery_streams[strap.address]
    assert (stream.metric.name, stream.metric.unit, stream.on_change) == (BATTERY, "%", True)
    # The estimator's low-SoC alarm, raised at 12 % and cleared by the charge, beside the
    # driver's own technical low-battery alarm.
    mine = [(a.kind, a.detail.get("estimate")) for a in alarms]
    assert mine == [(AlarmKind.LIMIT, "soc"), (AlarmKind.LIMIT_CLEARED, "soc")]
    assert alarms[0].value == 12.0
    assert any(a.kind == AlarmKind.SENSOR_FAULT for a in sink.alarms)
