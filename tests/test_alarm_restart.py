"""An alarm on when the gateway stopped is judged after the restart as if it had never stopped.

The pipeline's own path (a real outbox, the anonymizer, the twin's view of the decoded records),
stopped with an alarm on and started again on the same state directory: when the data after the
start shows the condition over, the twin receives its ordinary ending (no ``ended`` reason, no
second raise); when the condition still holds, the twin receives nothing new.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from test_alarm_episodes import A, N, Scripted, ind
from test_alarm_source_removed import BED7, SPO2, WALL, Site, config, source, spo2
from test_inference_runtime import pump_model, pump_window

from drivers.sim.protocol import RR
from gateway.anonymize import Pseudonymizer
from gateway.contracts import Alarm, AlarmKind, Node, StreamFeatures, WindowModel, WindowRecord
from gateway.inference.shadow import Slot
from gateway.legend import Entry as LegendEntry
from gateway.outbox import AsyncOutbox, Outbox
from gateway.outbox.aio import DEFAULT_MAX_PENDING_BYTES
from gateway.runtime import Pipeline
from gateway.sample import MDC, Metric, Quality, Sample, SampleBlock, Stream

Run = Callable[[Pipeline], Awaitable[None]]


def run(
    site: Site,
    tmp: Path,
    body: Run,
    models: Sequence[WindowModel] = (),
    *,
    ectopy: bool = False,
    start: float = 0.0,
    sources: Sequence[dict[str, Any]] = (BED7,),
    max_pending_bytes: int = DEFAULT_MAX_PENDING_BYTES,
    **sections: Any,
) -> list[dict[str, Any]]:
    """One run of bed 7's pipeline (or ``sources``') on ``tmp``'s state: ``body`` feeds it; the alarms the twin got."""
    before = len(site.alarms)
    cfg = config(tmp, *sources, ectopy=ectopy, **sections)

    async def main() -> None:
        async with AsyncOutbox(
            lambda: Outbox(tmp / "outbox.db"), max_pending_bytes=max_pending_bytes
        ) as outbox:
            pipeline = Pipeline(cfg, site.anon, outbox, models=models)
            await pipeline.end_vanished(start, WALL + start)
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


PULSE = Stream("bed7-ox", "ward3-bed7", "00:1C:05:AA:BB:07", MDC["MDC_PULS_OXIM_PULS_RATE"], rate_hz=1.0)


async def feed(
    pipeline: Pipeline, t0: float, seconds: int, streams: dict[Stream, tuple[float, int]]
) -> float:
    """``seconds`` of one sample a second per stream (value, quality), stepping the pipeline; the time after."""
    for k in range(seconds):
        t = np.array([t0 + k])
        for stream, (value, quality) in streams.items():
            q = np.full(1, quality, np.uint8)
            pipeline.sink.put_block(SampleBlock(stream, t, t + WALL, np.array([value]), q))
        await pipeline.step(now_mono=t0 + k + 1.0, now_wall=WALL + t0 + k + 1.0)
    return t0 + seconds


def feed_from(t0: float, streams: dict[Stream, tuple[float, int]], seconds: int = 5) -> Run:
    """:func:`feed` as a run's body."""

    async def body(pipeline: Pipeline) -> None:
        await feed(pipeline, t0, seconds, streams)

    return body


OFF = int(Quality.SENSOR_OFF)


async def probe_off(pipeline: Pipeline) -> None:
    await feed(pipeline, 100.0, 5, {SPO2: (0.0, OFF), PULSE: (0.0, OFF)})


def test_a_probe_off_before_the_restart_and_back_on_after_it_is_restored(tmp_path: Path) -> None:
    site = Site(tmp_path)
    assert kinds(run(site, tmp_path, probe_off)) == [("sensor_fault", None)] * 2

    async def still_off(pipeline: Pipeline) -> None:
        await feed(pipeline, 1000.0, 10, {SPO2: (0.0, OFF), PULSE: (0.0, OFF)})

    assert run(site, tmp_path, still_off) == []  # no second raise
    assert len(site.subject("ward3-bed7").active) == 2

    async def back_on(pipeline: Pipeline) -> None:
        await feed(pipeline, 2000.0, 10, {SPO2: (97.0, 0), PULSE: (72.0, 0)})

    after = run(site, tmp_path, back_on)
    assert kinds(after) == [("sensor_restored", None)] * 2
    assert {a["detail"]["after"] for a in after} == {"sensor_fault"}
    assert site.subject("ward3-bed7").active == {}


async def device_gone(pipeline: Pipeline) -> None:
    t = await feed(pipeline, 100.0, 5, {SPO2: (97.0, 0), PULSE: (72.0, 0)})
    await feed(pipeline, t, 20, {})  # both silent beyond sensor_lost_s: one device outage


def test_a_device_lost_before_the_restart_is_restored_by_its_data_after_it(tmp_path: Path) -> None:
    site = Site(tmp_path)
    assert kinds(run(site, tmp_path, device_gone)) == [("device_lost", None)]

    async def still_gone(pipeline: Pipeline) -> None:
        await feed(pipeline, 1000.0, 20, {})
        # The driver notices the device gone too: the same outage, not a second one.
        pipeline.driver_alarm(Alarm(AlarmKind.SENSOR_LOST, "ward3-bed7", 1020.0, WALL + 1020.0, PULSE))

    assert run(site, tmp_path, still_gone) == []
    assert len(site.subject("ward3-bed7").active) == 1

    async def back(pipeline: Pipeline) -> None:
        await feed(pipeline, 2000.0, 5, {PULSE: (72.0, 0)})  # the stream that was not its first

    after = run(site, tmp_path, back)
    assert kinds(after) == [("device_restored", None)]
    assert after[0]["detail"]["after"] == "device_lost"
    assert site.subject("ward3-bed7").active == {}


def test_a_lone_sensor_lost_before_the_restart_is_restored_by_its_data_after_it(tmp_path: Path) -> None:
    site = Site(tmp_path)

    async def spo2_gone(pipeline: Pipeline) -> None:
        t = await feed(pipeline, 100.0, 5, {SPO2: (97.0, 0), PULSE: (72.0, 0)})
        await feed(pipeline, t, 20, {PULSE: (72.0, 0)})

    assert kinds(run(site, tmp_path, spo2_gone)) == [("sensor_lost", None)]

    async def back(pipeline: Pipeline) -> None:
        await feed(pipeline, 2000.0, 5, {SPO2: (97.0, 0), PULSE: (72.0, 0)})

    assert kinds(run(site, tmp_path, back)) == [("sensor_restored", None)]
    assert site.subject("ward3-bed7").active == {}


def test_an_implausible_value_before_the_restart_is_restored_by_a_plausible_one_after_it(
    tmp_path: Path,
) -> None:
    site = Site(tmp_path)

    async def implausible(pipeline: Pipeline) -> None:
        await feed(pipeline, 100.0, 5, {SPO2: (0.0, 0)})  # 0 % with no flag: the probe, not the patient

    first = run(site, tmp_path, implausible)
    assert kinds(first) == [("sensor_fault", None)]
    assert first[0]["detail"]["rule"] == "range"

    async def still(pipeline: Pipeline) -> None:
        await feed(pipeline, 1000.0, 5, {SPO2: (0.0, 0)})

    assert run(site, tmp_path, still) == []

    async def plausible(pipeline: Pipeline) -> None:
        await feed(pipeline, 2000.0, 5, {SPO2: (97.0, 0)})

    after = run(site, tmp_path, plausible)
    assert kinds(after) == [("sensor_restored", None)]
    assert after[0]["detail"]["rule"] == "plausibility"
    assert site.subject("ward3-bed7").active == {}


def test_an_implausible_value_is_restored_by_the_stream_its_driver_rebuilt_before_and_after_a_restart(
    tmp_path: Path,
) -> None:
    # The driver rebuilds the stream under its key with another rate (a serial monitor switching
    # data format, an OPC UA server revising its interval): the same sensor, whose data end the fault.
    site = Site(tmp_path)
    faster = replace(SPO2, rate_hz=3.0)

    async def rebuilt(pipeline: Pipeline) -> None:
        t = await feed(pipeline, 100.0, 5, {SPO2: (0.0, 0)})
        await feed(pipeline, t, 5, {faster: (97.0, 0)})

    assert kinds(run(site, tmp_path, rebuilt)) == [("sensor_fault", None), ("sensor_restored", None)]
    assert site.subject("ward3-bed7").active == {}

    # Left on at the stop on the first object; the driver after the start delivers the other one.
    assert kinds(run(site, tmp_path, feed_from(1000.0, {SPO2: (0.0, 0)}))) == [("sensor_fault", None)]
    after = run(site, tmp_path, feed_from(2000.0, {faster: (97.0, 0)}))
    assert kinds(after) == [("sensor_restored", None)]
    assert site.subject("ward3-bed7").active == {}


def normal(t0: float) -> Run:
    """12 s of normal SpO2 from ``t0``: windows for the model to score."""

    async def body(pipeline: Pipeline) -> None:
        await spo2(pipeline, SPO2, 97.0, 12, t0)

    return body


def test_an_anomaly_episode_on_before_the_restart_ends_after_normal_windows_after_it(tmp_path: Path) -> None:
    site = Site(tmp_path)
    (raised,) = run(site, tmp_path, normal(100.0), [Scripted([A] * 100)])
    assert kinds([raised]) == [("anomaly", None)]
    onset = raised["t"] - raised["held_s"]  # the episode's first anomalous window
    # Still anomalous after the restart: the same episode, nothing new; unsure windows say so.
    still = run(site, tmp_path, normal(1000.0), [Scripted([A] * 5 + [ind("gap")] + [A] * 100)])
    assert kinds(still) == [("anomaly_indeterminate", None), ("anomaly", None)]
    assert still[1]["detail"]["episode"] == "resumed"
    assert len(site.subject("ward3-bed7").active) == 1
    # Held since that onset, before two stops: as the same alarms would say without them.
    assert [a["held_s"] for a in still] == [pytest.approx(a["t"] - onset, abs=0.01) for a in still]
    assert still[0]["held_s"] > 900.0

    after = run(site, tmp_path, normal(2000.0), [Scripted([N] * 100)])
    assert kinds(after) == [("anomaly_cleared", None)]  # after clear_after normal windows
    assert after[0]["detail"]["model"] == "scripted"
    assert after[0]["held_s"] == pytest.approx(after[0]["t"] - onset, abs=0.01)
    assert site.subject("ward3-bed7").active == {}


def test_a_limit_alarm_left_on_clears_with_the_time_held_since_its_onset_before_the_stop(
    tmp_path: Path,
) -> None:
    site = Site(tmp_path)
    (raised,) = run(site, tmp_path, low)
    onset = raised["t"] - raised["held_s"]

    async def back(pipeline: Pipeline) -> None:
        await spo2(pipeline, SPO2, 97.0, 20, 1000.0)

    (cleared,) = run(site, tmp_path, back)
    assert kinds([cleared]) == [("limit_cleared", None)]
    assert cleared["held_s"] == pytest.approx(cleared["t"] - onset, abs=0.01)  # the whole condition
    assert cleared["held_s"] >= 900.0  # from 100 s, before the stop, to 1000 s

    # Raised again in this run: its own tracker's time, not the old onset's.
    (again,) = run(site, tmp_path, low)
    assert 10.0 <= again["held_s"] < 12.0


def test_a_limit_alarm_left_at_low_low_steps_down_with_the_time_held_since_its_onset_before_the_stop(
    tmp_path: Path,
) -> None:
    site = Site(tmp_path)

    async def very_low(pipeline: Pipeline) -> None:
        await spo2(pipeline, SPO2, 80.0, 12, 100.0)  # below 85 % (and so 90 %) for over 10 s

    (raised,) = run(site, tmp_path, very_low)
    assert (raised["alarm"], raised["detail"]["level"]) == ("limit", "low_low")
    onset = raised["t"] - raised["held_s"]

    async def milder(pipeline: Pipeline) -> None:
        await spo2(pipeline, SPO2, 88.0, 5, 1000.0)  # out of LL by its deadband, still below 90 %

    (step,) = run(site, tmp_path, milder)
    assert (step["alarm"], step["detail"]["level"]) == ("limit", "low")
    # Below 90 % since the onset before the stop, the downtime included (as the twin was told),
    # not since the first sample after the start.
    assert step["held_s"] == pytest.approx(step["t"] - onset, abs=0.01)
    assert step["held_s"] >= 900.0


def test_a_condition_ended_by_the_configuration_carries_no_time_held(tmp_path: Path) -> None:
    site = Site(tmp_path)
    assert kinds(run(site, tmp_path, normal(100.0), [Scripted([A] * 100)])) == [("anomaly", None)]
    (ended,) = run(site, tmp_path, normal(1000.0), start=1000.0)
    assert kinds([ended]) == [("anomaly_cleared", "model_removed")]
    assert "held_s" not in ended


def test_an_episode_of_a_model_no_longer_run_is_ended_at_the_start(tmp_path: Path) -> None:
    site = Site(tmp_path)
    assert kinds(run(site, tmp_path, normal(100.0), [Scripted([A] * 100)])) == [("anomaly", None)]
    after = run(site, tmp_path, normal(1000.0), start=1000.0)  # nothing could ever end it: ended
    assert kinds(after) == [("anomaly_cleared", "model_removed")]
    assert after[0]["detail"]["model"] == "scripted"
    assert site.subject("ward3-bed7").active == {}


def test_a_limit_alarm_whose_rule_was_removed_is_ended_at_the_start(tmp_path: Path) -> None:
    site = Site(tmp_path)
    assert kinds(run(site, tmp_path, low)) == [("limit", None)]
    off = {"limits": {"MDC_PULS_OXIM_SAT_O2": {"enabled": False}}}
    after = run(site, tmp_path, normal(1000.0), alarms=off, start=1000.0)
    assert kinds(after) == [("limit_cleared", "rule_removed")]
    assert after[0]["detail"]["level"] == "low"
    assert site.subject("ward3-bed7").active == {}


RR_STREAM = Stream("bed7-ox", "ward3-bed7", "00:1C:05:AA:BB:07", MDC[RR])


def beats(t0: float, rr: list[float]) -> Run:
    """RR intervals (ms) from ``t0`` on, one block each, stepping the pipeline every second."""

    async def body(pipeline: Pipeline) -> None:
        t = t0
        for x in rr:
            t += x / 1000.0
            at = np.array([t])
            pipeline.sink.put_block(
                SampleBlock(RR_STREAM, at, at + WALL, np.array([x]), np.zeros(1, np.uint8))
            )
            await pipeline.step(now_mono=t, now_wall=WALL + t)

    return body


def test_a_rhythm_episode_on_before_the_restart_clears_after_sinus_rhythm_after_it(tmp_path: Path) -> None:
    site = Site(tmp_path)
    first = run(site, tmp_path, beats(100.0, [600.0, 1000.0] * 30), ectopy=True)
    assert kinds(first) == [("anomaly", None)]
    assert first[0]["detail"]["pattern"] == "bigeminy"
    # Still bigeminy after the restart: the same episode, nothing new.
    assert run(site, tmp_path, beats(1000.0, [600.0, 1000.0] * 30), ectopy=True) == []
    assert len(site.subject("ward3-bed7").active) == 1

    after = run(site, tmp_path, beats(2000.0, [800.0] * 40), ectopy=True)
    assert kinds(after) == [("anomaly_cleared", None)]
    assert after[0]["detail"]["pattern"] == "bigeminy"
    assert site.subject("ward3-bed7").active == {}


def test_a_model_input_fault_left_on_is_restored_by_the_next_window_in_range() -> None:
    # The pump model's own window check (the card's ranges), resumed as the pipeline resumes it.
    rng = np.random.default_rng(8)
    model = Slot(pump_model())  # as the gateway serves it
    good = pump_window(20, rng)
    rate = next(sf.stream for sf in good.streams if sf.stream.metric.name.endswith("RateRMS"))
    model.resume_fault(good.subject, rate.key)
    streams = [
        StreamFeatures(sf.stream, 20, 0.0, {"mean": 10.0, "std": 20.0, "min": -40.0, "max": 35.0})
        if sf.stream is rate
        else sf
        for sf in good.streams
    ]
    model.score_batch([replace(good, streams=tuple(streams))])
    assert model.drain_events() == []  # still out of range: no second raise
    model.score_batch([pump_window(21, rng)])
    (restored,) = model.drain_events()
    assert isinstance(restored, Alarm)
    assert (restored.kind, restored.stream) == (AlarmKind.SENSOR_RESTORED, rate)
    assert restored.detail["model"] == model.name


BATTERY = Stream(
    "bed7-ox", "ward3-bed7", "00:1C:05:AA:BB:07", Metric("MDC_ATTR_VAL_BATT_CHARGE", "%"), on_change=True
)
LOW_SOC = {
    "battery": [{"subject": "ward3-bed7", "level": BATTERY.metric.name, "low_soc": 20.0, "every_s": 0.001}]
}


def battery(t0: float, level: float) -> Run:
    """The monitor's battery level reported at ``t0``."""

    async def body(pipeline: Pipeline) -> None:
        t = np.array([t0])
        pipeline.sink.put_block(SampleBlock(BATTERY, t, t + WALL, np.array([level]), np.zeros(1, np.uint8)))
        await pipeline.step(now_mono=t0 + 1.0, now_wall=WALL + t0 + 1.0)

    return body


def test_a_low_battery_estimate_left_on_clears_when_charged_after_the_restart(tmp_path: Path) -> None:
    site = Site(tmp_path)
    first = run(site, tmp_path, battery(100.0, 12.0), estimators=LOW_SOC)
    assert [(a["alarm"], a["detail"]["estimate"]) for a in first] == [("limit", "soc")]
    assert run(site, tmp_path, battery(1000.0, 11.0), estimators=LOW_SOC) == []  # still low: nothing
    after = run(site, tmp_path, battery(2000.0, 90.0), estimators=LOW_SOC)  # charged while down
    assert [(a["alarm"], a["detail"]["estimate"]) for a in after] == [("limit_cleared", "soc")]
    assert "ended" not in after[0]["detail"]
    assert site.subject("ward3-bed7").active == {}


def driver_fault(
    t: float,
    detail: dict[str, float | str],
    stream: Stream | None = SPO2,
    node: Node | None = None,
    kind: AlarmKind = AlarmKind.SENSOR_FAULT,
) -> Run:
    """The source's driver reports SpO2's node (or device, or a ``node`` never resolved) at fault, or over (``kind``)."""

    async def body(pipeline: Pipeline) -> None:
        pipeline.driver_alarm(Alarm(kind, "ward3-bed7", t, WALL + t, stream, detail, node=node))
        await pipeline.step(now_mono=t + 1.0, now_wall=WALL + t + 1.0)

    return body


def test_a_node_fault_the_driver_raised_ends_with_the_nodes_data_after_the_restart(tmp_path: Path) -> None:
    site = Site(tmp_path)
    bad: dict[str, float | str] = {"status": "bad_nodeidunknown"}
    assert kinds(run(site, tmp_path, driver_fault(100.0, bad))) == [("sensor_fault", None)]
    # The driver, fresh after the restart, finds the node still bad: the same condition, not resent.
    assert run(site, tmp_path, driver_fault(1000.0, bad)) == []
    assert len(site.subject("ward3-bed7").active) == 1

    after = run(site, tmp_path, normal(2000.0))  # the node delivers again
    assert kinds(after) == [("sensor_restored", None)]
    assert after[0]["detail"] == {"after": "sensor_fault", "status": "good"}
    assert site.subject("ward3-bed7").active == {}


@pytest.mark.parametrize("blocks", [True, False], ids=["blocks", "samples"])
def test_a_node_fault_left_on_is_not_ended_by_an_implausible_value_after_the_restart(
    tmp_path: Path, blocks: bool
) -> None:
    # 0 % SpO2 with no flag is no reading of the node: it raises its own fault and leaves the
    # node's on; the first plausible value ends both, each by its own origin.
    site = Site(tmp_path)
    assert kinds(run(site, tmp_path, driver_fault(100.0, {"status": "bad_nodeidunknown"}))) == [
        ("sensor_fault", None)
    ]

    async def implausible_then_plausible(pipeline: Pipeline) -> None:
        for k, value in enumerate([0.0] * 5 + [97.0] * 2):
            t = 1000.0 + k
            if blocks:
                pipeline.sink.put_block(
                    SampleBlock(
                        SPO2, np.array([t]), np.array([t + WALL]), np.array([value]), np.zeros(1, np.uint8)
                    )
                )
            else:
                pipeline.sink.put(Sample(SPO2, t, t + WALL, value))
            await pipeline.step(now_mono=t + 1.0, now_wall=WALL + t + 1.0)

    after = run(site, tmp_path, implausible_then_plausible)
    assert [(a["alarm"], a["t"], a["detail"]) for a in after] == [
        ("sensor_fault", 1000.0, {"rule": "range", "value": 0.0, "limit": 50.0}),
        ("sensor_restored", 1005.0, {"after": "sensor_fault", "rule": "plausibility"}),
        ("sensor_restored", 1005.0, {"after": "sensor_fault", "status": "good"}),
    ]
    assert site.subject("ward3-bed7").active == {}


UNRESOLVED: dict[str, float | str] = {"status": "bad_nomatch", "item": 1}
NODE = Node("bed7-ox", "Bed7/SpO2")  # the configured address of the node at item 1


def test_a_node_still_unresolved_after_the_restart_is_not_raised_twice(tmp_path: Path) -> None:
    site = Site(tmp_path)
    first = run(site, tmp_path, driver_fault(100.0, UNRESOLVED, None, NODE))
    assert kinds(first) == [("sensor_fault", None)]
    # Named by the keyed pseudonym of its source and address, as a device is by its own.
    assert first[0]["detail"] == {**UNRESOLVED, "node": Pseudonymizer(b"s" * 32)("node", "bed7-ox/Bed7/SpO2")}
    assert (
        LegendEntry("node", "bed7-ox/Bed7/SpO2", "bed7-ox") in site.anon.legend.entries()
    )  # which it is, locally
    # The fresh driver finds the node still absent and raises it again: on at the twin already.
    assert run(site, tmp_path, driver_fault(1000.0, UNRESOLVED, None, NODE)) == []

    async def restarted(pipeline: Pipeline) -> None:  # so does a driver the supervisor restarted
        await driver_fault(2000.0, UNRESOLVED, None, NODE)(pipeline)
        await driver_fault(2010.0, UNRESOLVED, None, NODE)(pipeline)

    assert run(site, tmp_path, restarted) == []
    assert len(site.subject("ward3-bed7").active) == 1
    # Another node of the source is another condition, at whatever place in the list.
    pulse = Node("bed7-ox", "Bed7/Pulse")
    other = run(site, tmp_path, driver_fault(3000.0, UNRESOLVED, None, pulse))
    assert kinds(other) == [("sensor_fault", None)]
    assert other[0]["detail"]["node"] != first[0]["detail"]["node"]
    assert len(site.subject("ward3-bed7").active) == 2


def test_a_node_fault_never_recorded_is_raised_by_the_fresh_driver(tmp_path: Path) -> None:
    site = Site(tmp_path)
    # The outbox refuses the raise (its queue full): the twin never got it, the ledger has nothing.
    assert run(site, tmp_path, driver_fault(100.0, UNRESOLVED, None, NODE), max_pending_bytes=1) == []
    again = run(site, tmp_path, driver_fault(1000.0, UNRESOLVED, None, NODE))
    assert kinds(again) == [("sensor_fault", None)]
    assert {k: again[0]["detail"][k] for k in UNRESOLVED} == UNRESOLVED
    assert run(site, tmp_path, driver_fault(2000.0, UNRESOLVED, None, NODE)) == []  # now it is on
    assert len(site.subject("ward3-bed7").active) == 1


def test_a_node_fault_an_older_gateway_left_on_by_item_only_is_ended_and_raised_again_by_node(
    tmp_path: Path,
) -> None:
    site = Site(tmp_path)
    # Raised as a gateway did before alarms named the node: no stream, its place in the list only.
    assert kinds(run(site, tmp_path, driver_fault(100.0, UNRESOLVED, None))) == [("sensor_fault", None)]
    # Its place may not be its node's any more: ended at the start; the fresh driver's raise by
    # its node, the node still absent, is a condition of its own.
    again = run(site, tmp_path, driver_fault(1000.0, UNRESOLVED, None, NODE), start=1000.0)
    assert kinds(again) == [("sensor_restored", "source_changed"), ("sensor_fault", None)]
    assert "node" not in again[0]["detail"]  # as it was raised: the twin's condition by item
    (on,) = site.subject("ward3-bed7").active.values()
    assert on.detail == again[1]["detail"]
    assert "node" in on.detail


DENIED: dict[str, float | str] = {"status": "bad_useraccessdenied", "item": 1}


@pytest.mark.parametrize("where", ["unresolved", "stream"])
def test_a_node_fault_raised_again_after_the_restart_with_another_status_says_so(
    tmp_path: Path, where: str
) -> None:
    site = Site(tmp_path)
    # A node that never resolved (by its node), or one on its stream.
    stream, node = (None, NODE) if where == "unresolved" else (SPO2, None)
    absent: dict[str, float | str] = UNRESOLVED if node else {"status": "bad_nodeidunknown"}
    denied: dict[str, float | str] = DENIED if node else {"status": "bad_useraccessdenied"}
    assert kinds(run(site, tmp_path, driver_fault(100.0, absent, stream, node))) == [("sensor_fault", None)]
    # The fresh driver finds the node still bad, for another reason: the twin is told the new one.
    again = run(site, tmp_path, driver_fault(1000.0, denied, stream, node))
    assert kinds(again) == [("sensor_fault", None)]
    assert again[0]["detail"]["status"] == "bad_useraccessdenied"
    (on,) = site.subject("ward3-bed7").active.values()  # the same condition, since its raise
    assert on.detail["status"] == "bad_useraccessdenied"
    assert on.t == site.alarms[0]["t"]
    # Raised again with that status: nothing new.
    assert run(site, tmp_path, driver_fault(2000.0, denied, stream, node)) == []
    # The node delivers again (its first data, or the driver seeing it appear): it ends.
    good: dict[str, float | str] = {"after": "sensor_fault", "status": "good"}
    body = (
        normal(3000.0)
        if node is None
        else driver_fault(3000.0, {**good, "item": 1}, None, node, AlarmKind.SENSOR_RESTORED)
    )
    assert kinds(run(site, tmp_path, body)) == [("sensor_restored", None)]
    assert site.subject("ward3-bed7").active == {}


BED7_PLC = source("bed7-plc", "ward3-bed7", "00:1C:05:AA:BB:17")  # a second source of the subject


def test_two_sources_nodes_at_the_same_place_in_their_lists_are_two_conditions(tmp_path: Path) -> None:
    site = Site(tmp_path)
    plc = Node("bed7-plc", "Bed7/SpO2")  # the same address and item, in another source
    both = (BED7, BED7_PLC)

    async def raise_both(pipeline: Pipeline) -> None:
        await driver_fault(100.0, UNRESOLVED, None, NODE)(pipeline)
        await driver_fault(101.0, UNRESOLVED, None, plc)(pipeline)

    raised = run(site, tmp_path, raise_both, sources=both)
    assert kinds(raised) == [("sensor_fault", None)] * 2
    assert raised[0]["detail"]["node"] != raised[1]["detail"]["node"]
    assert len(site.subject("ward3-bed7").active) == 2

    # One source's node appears after a restart: its ending leaves the other source's fault on.
    good: dict[str, float | str] = {"after": "sensor_fault", "status": "good", "item": 1}
    ended = run(
        site, tmp_path, driver_fault(1000.0, good, None, NODE, AlarmKind.SENSOR_RESTORED), sources=both
    )
    assert kinds(ended) == [("sensor_restored", None)]
    assert ended[0]["detail"]["node"] == raised[0]["detail"]["node"]
    (on,) = site.subject("ward3-bed7").active.values()
    assert on.detail["node"] == raised[1]["detail"]["node"]

    # The first source's node faults again; the second source is removed: only its node's fault ends.
    assert kinds(run(site, tmp_path, driver_fault(2000.0, UNRESOLVED, None, NODE), sources=both)) == [
        ("sensor_fault", None)
    ]
    removed = run(site, tmp_path, lambda p: asyncio.sleep(0), start=3000.0)
    assert kinds(removed) == [("sensor_restored", "source_removed")]
    assert removed[0]["detail"]["node"] == raised[1]["detail"]["node"]
    (on,) = site.subject("ward3-bed7").active.values()
    assert on.detail["node"] == raised[0]["detail"]["node"]


def driver_restore(t: float, detail: dict[str, float | str]) -> Run:
    """The source's driver finds its own fault over (a BLE wearable's battery good again)."""

    async def body(pipeline: Pipeline) -> None:
        pipeline.driver_alarm(Alarm(AlarmKind.SENSOR_RESTORED, "ward3-bed7", t, WALL + t, SPO2, detail))
        await pipeline.step(now_mono=t + 1.0, now_wall=WALL + t + 1.0)

    return body


LOW_BATTERY: dict[str, float | str] = {"cause": "low_battery", "battery": 5.0}
GOOD_BATTERY: dict[str, float | str] = {"after": "sensor_fault", "cause": "low_battery", "battery": 90.0}


def test_a_low_battery_the_driver_raised_waits_for_the_driver_after_the_restart(tmp_path: Path) -> None:
    site = Site(tmp_path)
    assert kinds(run(site, tmp_path, driver_fault(100.0, LOW_BATTERY))) == [("sensor_fault", None)]
    assert run(site, tmp_path, normal(1000.0)) == []  # data say nothing about the battery
    assert run(site, tmp_path, driver_fault(2000.0, LOW_BATTERY)) == []  # still low: not resent
    assert len(site.subject("ward3-bed7").active) == 1


def test_a_low_battery_charged_while_down_ends_with_the_drivers_first_reading(tmp_path: Path) -> None:
    site = Site(tmp_path)
    assert kinds(run(site, tmp_path, driver_fault(100.0, LOW_BATTERY))) == [("sensor_fault", None)]

    async def charged_then_low(pipeline: Pipeline) -> None:
        await driver_restore(1000.0, GOOD_BATTERY)(pipeline)  # the fresh driver's first reading
        await driver_fault(1010.0, LOW_BATTERY)(pipeline)  # low again later: a new condition

    after = run(site, tmp_path, charged_then_low)
    assert kinds(after) == [("sensor_restored", None), ("sensor_fault", None)]
    assert after[0]["detail"] == GOOD_BATTERY
    assert len(site.subject("ward3-bed7").active) == 1


def test_a_good_battery_at_the_start_with_nothing_on_sends_nothing(tmp_path: Path) -> None:
    site = Site(tmp_path)
    # A fresh driver's first reading is good: no condition on, no ending sent.
    assert run(site, tmp_path, driver_restore(100.0, GOOD_BATTERY)) == []
    assert kinds(run(site, tmp_path, driver_fault(200.0, LOW_BATTERY))) == [("sensor_fault", None)]
    assert kinds(run(site, tmp_path, driver_restore(300.0, GOOD_BATTERY))) == [("sensor_restored", None)]
    assert site.subject("ward3-bed7").active == {}


def test_a_driver_fault_left_on_and_ended_with_its_source_is_raised_again_when_the_source_returns(
    tmp_path: Path,
) -> None:
    site = Site(tmp_path)
    bad: dict[str, float | str] = {"status": "bad_nodeidunknown"}
    assert kinds(run(site, tmp_path, driver_fault(100.0, bad))) == [("sensor_fault", None)]

    async def retired_and_back(pipeline: Pipeline) -> None:
        await pipeline.retire_source("bed7-ox", config(tmp_path), 1000.0, WALL + 1000.0)
        await pipeline.retire_source("bed7-ox", config(tmp_path, BED7), 1001.0, WALL + 1001.0)
        await driver_fault(1002.0, bad)(pipeline)  # a new fault of the source that came back

    assert kinds(run(site, tmp_path, retired_and_back)) == [
        ("sensor_restored", "source_removed"),
        ("sensor_fault", None),
    ]
    assert len(site.subject("ward3-bed7").active) == 1


PERF = Stream("bed7-ox", "ward3-bed7", "00:1C:05:AA:BB:07", MDC["MDC_PULS_OXIM_PERF_REL"], rate_hz=1.0)


ALL_BACK = {SPO2: (97.0, 0), PULSE: (72.0, 0), PERF: (5.0, 0)}  # SpO2's data first


async def spo2_then_the_rest(pipeline: Pipeline) -> float:
    t = await feed(pipeline, 100.0, 5, ALL_BACK)
    t = await feed(pipeline, t, 20, {PULSE: (72.0, 0), PERF: (5.0, 0)})  # SpO2 silent alone
    return await feed(pipeline, t, 20, {})  # then the whole monitor


def test_a_sensor_lost_before_its_device_was_is_restored_on_its_own(tmp_path: Path) -> None:
    site = Site(tmp_path)

    async def and_back(pipeline: Pipeline) -> None:
        t = await spo2_then_the_rest(pipeline)
        await feed(pipeline, t + 100.0, 5, ALL_BACK)

    got = kinds(run(site, tmp_path, and_back))
    assert got == [
        ("sensor_lost", None),
        ("device_lost", None),
        ("sensor_restored", None),
        ("device_restored", None),
    ]
    assert site.subject("ward3-bed7").active == {}


def test_a_sensor_lost_before_its_device_was_is_restored_on_its_own_after_the_restart(tmp_path: Path) -> None:
    site = Site(tmp_path)

    async def lost(pipeline: Pipeline) -> None:
        await spo2_then_the_rest(pipeline)

    assert kinds(run(site, tmp_path, lost)) == [("sensor_lost", None), ("device_lost", None)]
    after = run(site, tmp_path, feed_from(2000.0, ALL_BACK))
    assert kinds(after) == [("sensor_restored", None), ("device_restored", None)]
    assert site.subject("ward3-bed7").active == {}


def test_a_model_input_fault_of_a_retired_source_is_ended_once_and_forgotten(tmp_path: Path) -> None:
    # The pump model's own window check raised it; the source is retired by a revision, then comes back.
    site = Site(tmp_path)
    rng = np.random.default_rng(8)
    model = Slot(pump_model())
    plc = source("plc", "machine-7", "SN-1")
    good = pump_window(20, rng, subject="machine-7")
    rate = next(sf.stream for sf in good.streams if sf.stream.metric.name.endswith("RateRMS"))
    out_of_range = {"mean": 10.0, "std": 20.0, "min": -40.0, "max": 35.0}
    bad = replace(
        good,
        streams=tuple(
            StreamFeatures(sf.stream, 20, 0.0, out_of_range) if sf.stream is rate else sf
            for sf in good.streams
        ),
    )

    def score(pipeline: Pipeline, window: WindowRecord) -> None:
        model.score_batch([window])
        for event in model.drain_events():  # as the pipeline forwards a model's events
            if isinstance(event, Alarm):
                pipeline.alarm(event)

    async def retired_and_back(pipeline: Pipeline) -> None:
        score(pipeline, bad)
        await pipeline.retire_source("plc", config(tmp_path), 200.0, WALL + 200.0)
        await pipeline.retire_source("plc", config(tmp_path, plc), 201.0, WALL + 201.0)
        score(pipeline, pump_window(21, rng, subject="machine-7"))  # in range: nothing was on

    got = run(site, tmp_path, retired_and_back, [model], sources=(plc,))
    assert kinds(got) == [("sensor_fault", None), ("sensor_restored", "source_removed")]
    assert got[1]["metric"] == rate.metric.name
    assert site.subject("machine-7").active == {}
