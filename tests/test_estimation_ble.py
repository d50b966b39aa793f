"""Estimators fed by BLE wearables: a strap slipping off under the fused heart rate, and a wearable's
own battery level (Battery Level 0x2A19) as a battery estimate: SoC, drain, time left.

The radio parts run the real BLE driver (bleak on the emulated BlueZ) against simulated wearables;
the drain part feeds the estimator levels on a simulated clock.
"""

from __future__ import annotations

import asyncio
import math
import random
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from durability import landed

from gateway.contracts import Alarm, AlarmKind, Estimate, SampleSink, SourceInfo
from gateway.estimation import Estimation, EstimatorsSection
from gateway.estimation.battery import BatteryState
from gateway.sample import MDC, Metric, Quality, Sample, Stream

if TYPE_CHECKING:
    from drivers.ble.driver import BleDriver
    from drivers.ble.testbed.harness import WearableProcess

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
    landed(stage.save(7200.0, WALL + 7200.0))
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


async def _until(cond: Callable[[], bool], what: str, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.02)


def _strap_driver(address: str) -> BleDriver:
    from drivers.ble.config import BleConfig  # noqa: PLC0415
    from drivers.ble.driver import factory  # noqa: PLC0415

    cfg = {"lost_after_s": 5.0, "reconnect_min_s": 0.1, "devices": [{"address": address, "profile": "hr"}]}
    return factory(SourceInfo("ble-ward3", SUBJECT, "medical"), BleConfig.model_validate(cfg))


def _drive(
    drv: BleDriver, sink: SampleSink, wearable: WearableProcess, steps: Callable[[], Awaitable[None]]
) -> None:
    """Run the driver into ``sink`` while ``steps`` play out; stop the driver and the wearable after."""

    async def scenario() -> None:
        task = asyncio.create_task(drv.run(sink, started=lambda: None), name="ble-driver-under-test")
        try:
            await steps()
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    try:
        asyncio.run(scenario())
    finally:
        wearable.stop()


@pytest.mark.slow
def test_a_wearables_battery_level_over_the_emulated_radio_becomes_a_soc_estimate_and_alarm(
    testbed: object,
) -> None:
    from peers import RecordingSink  # noqa: PLC0415

    from drivers.ble.testbed.harness import Testbed  # noqa: PLC0415

    assert isinstance(testbed, Testbed)
    strap = testbed.wearable("hr", "C0:FF:EE:00:21:01", rate=0, battery=64)
    drv = _strap_driver(strap.address)
    estimates: list[Estimate] = []
    alarms: list[Alarm] = []
    stage = Estimation(_section(), {SUBJECT: "medical"}, estimates.append, alarms.append)

    class Feed(RecordingSink):
        def put(self, sample: Sample) -> None:
            super().put(sample)
            stage.put(sample)

    sink = Feed(blocks=False)

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

    async def steps() -> None:
        await _until(lambda: any(e.value == 64.0 for e in estimates), "the level read on connect")
        await send("battery 12")
        await _until(lambda: any(e.value == 12.0 for e in estimates), "the notified low level")
        await send("battery 90")
        await _until(lambda: any(e.value == 90.0 for e in estimates), "the level after a charge")

    _drive(drv, sink, strap, steps)
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


@pytest.mark.slow
def test_a_strap_slipping_off_is_flagged_and_the_fused_rate_carries_on_without_its_noise(
    testbed: object,
) -> None:
    from peers import RecordingSink  # noqa: PLC0415

    from drivers.ble.testbed.harness import Testbed  # noqa: PLC0415

    assert isinstance(testbed, Testbed)
    # Four notifications a second; contact lost 2 s after the strap starts, for 2 s.
    strap = testbed.wearable("hr", "C0:FF:EE:00:21:02", rate=4.0, interval=0.25, sensor_off=[(2.0, 2.0)])
    drv = _strap_driver(strap.address)
    fusion = {
        "subject": SUBJECT,
        "sources": [{"metric": "MDC_ECG_HEART_RATE"}, {"metric": "MDC_PULS_OXIM_PULS_RATE"}],
        "every_s": 0.1,
        "max_gap_s": 1.0,
        "stale_s": 1.0,
    }
    estimates: list[Estimate] = []
    stage = Estimation(
        EstimatorsSection.model_validate({"fusion": [fusion]}),
        {SUBJECT: "medical"},
        estimates.append,
        lambda a: None,
    )
    oximeter = Stream("oxi", SUBJECT, "SN-OX-2102", MDC["MDC_PULS_OXIM_PULS_RATE"], rate_hz=4.0)
    rng = random.Random(4)
    good: list[float] = []

    class Feed(RecordingSink):
        """The strap's samples to the stage, with a second sensor of the same heart beside them.

        The oximeter reads the strap's last good rate plus its own noise (SD 2 /min), and carries
        on at that rate while the strap is off.
        """

        def put(self, sample: Sample) -> None:
            super().put(sample)
            stage.put(sample)
            if sample.stream.metric.name == "MDC_ECG_HEART_RATE":
                if sample.quality == Quality.GOOD:
                    good.append(sample.value)
                if good:
                    pr = good[-1] + rng.gauss(0.0, 2.0)
                    stage.put(Sample(oximeter, sample.t_mono + 0.05, sample.t_wall + 0.05, pr))

    sink = Feed(blocks=False)

    def hr(flagged: bool) -> list[Sample]:
        return [
            s
            for s in sink.of(strap.address, "MDC_ECG_HEART_RATE")
            if (s.quality == Quality.SENSOR_OFF) == flagged
        ]

    async def steps() -> None:
        await _until(lambda: bool(hr(flagged=True)), "the strap to lose contact")
        off_at = hr(flagged=True)[0].t_mono
        await _until(lambda: any(s.t_mono > off_at + 1.0 for s in hr(flagged=False)), "contact again", 8.0)
        await asyncio.sleep(1.5)

    _drive(drv, sink, strap, steps)
    off = hr(flagged=True)
    on = hr(flagged=False)
    t_off, t_back = off[0].t_mono, off[-1].t_mono
    assert t_back - t_off > 1.0
    assert any(s.t_mono < t_off for s in on)  # on, off, on again
    # Off the skin the strap sends no RR intervals and rates that are noise, flagged by its contact bit.
    rr = sink.of(strap.address, "MDC_ECG_TIME_PD_RR_GL")
    assert not [s for s in rr if t_off + 0.3 < s.t_mono < t_back]
    assert max(abs(s.value - good[-1]) for s in off) > 20.0
    fused = [e for e in estimates if e.name == "hr"]
    # The fused rate never follows that noise: it stays with the heart, within its stated uncertainty.
    for e in fused:
        assert e.state == "measured"
        assert 35.0 < e.value < 150.0
    during = [e for e in fused if t_off + 1.2 < e.t_mono < t_back]
    assert during
    for e in during:
        # Only the oximeter feeds it while the strap is off (its last good sample is older than max_gap_s).
        assert [s.metric.name for s, _ in e.sources] == ["MDC_PULS_OXIM_PULS_RATE"]
        assert abs(e.value - good_before(on, t_off)) <= 3.0 * e.sd + 3.0
    # Back on the skin, the strap carries most of the weight again.
    last = fused[-1]
    share = {s.metric.name: w for s, w in last.sources}
    assert share["MDC_ECG_HEART_RATE"] > 0.6


def good_before(on: list[Sample], t: float) -> float:
    """The strap's last good rate before ``t``."""
    return [s.value for s in on if s.t_mono < t][-1]
