"""A sensor fault is not a patient event: invalid samples reach no patient or process judgement.

A sample its device flags (probe off) or the plausibility rules call implausible (SpO2 30 %) gives a
technical alarm; the limit alarms, the rhythm detector and the estimators do not see it - save a
value in range that only changed faster than the rate rule allows, which may be real: the limits
judge it (their on-delays filter a brief artifact).  An alarm on when the data turn invalid stays
on at its level; its delays pause over the invalid stretch (neither completed nor started over by
it) and carry on with the valid data after it.
Here a real pipeline, outbox and anonymizer judge the samples, one a second, as a monitor sends them.
"""

from __future__ import annotations

import asyncio
import json
import math
from pathlib import Path
from typing import Any

import pytest
from peers import logged
from test_alarm_source_removed import BED7, SPO2, WALL, Site, config, spo2
from test_limit_alarms_e2e import SinceOpened

from drivers import REGISTRY
from drivers.serial.protocol import Status
from drivers.serial.sim import PtyOximeter, Vitals
from gateway.config import validate
from gateway.contracts import Lane
from gateway.outbox import AsyncOutbox, Outbox
from gateway.records import as_map, decode, fault_origin
from gateway.runtime import Pipeline, run_gateway
from gateway.sample import MDC, Quality, Sample, Stream

OFF = int(Quality.SENSOR_OFF)
RR = Stream("bed7-ox", "ward3-bed7", "00:1C:05:AA:BB:07", MDC["MDC_ECG_TIME_PD_RR_GL"])


def feed(tmp: Path, parts: list[tuple[float, int, int]], **sections: Any) -> Site:
    """Bed 7's SpO2 from t = 1 s, one sample a second: (value, seconds, quality flags) in turn."""
    site = Site(tmp)

    async def main() -> None:
        async with AsyncOutbox(lambda: Outbox(tmp / "outbox.db")) as outbox:
            pipeline = Pipeline(config(tmp, BED7, **sections), site.anon, outbox)
            t = 1.0
            for value, seconds, flags in parts:
                t = await spo2(pipeline, SPO2, value, seconds, t, flags)
            await outbox.flush()
            site.take([i for i in await outbox.lease(1000) if i.lane == Lane.ALARMS])

    asyncio.run(main())
    return site


def beats(tmp: Path, rr: list[float]) -> Site:
    """Bed 7's RR intervals (ms), one sample a beat, through a pipeline with the rhythm detector."""
    site = Site(tmp)

    async def main() -> None:
        async with AsyncOutbox(lambda: Outbox(tmp / "outbox.db")) as outbox:
            pipeline = Pipeline(config(tmp, BED7, ectopy=True), site.anon, outbox)
            t = 1.0
            for x in rr:
                t += x / 1000.0 if math.isfinite(x) else 0.8  # one with no value still comes in time
                pipeline.sink.put(Sample(RR, t, t + WALL, x))
            await outbox.flush()
            site.take([i for i in await outbox.lease(1000) if i.lane == Lane.ALARMS])

    asyncio.run(main())
    return site


def limits(site: Site) -> list[tuple[str, str, float, float]]:
    """The limit alarms sent: (kind, level, time of the sample that decided it, held_s)."""
    return [
        (a["alarm"], a["detail"]["level"], a["t"], a["held_s"])
        for a in site.alarms
        if a["alarm"] in ("limit", "limit_cleared")
    ]


def test_an_implausible_spo2_raises_one_technical_alarm_and_no_limit_alarm(tmp_path: Path) -> None:
    """SpO2 30 % (below the plausible 50 %) for 20 s: a sensor fault, not a low-low desaturation."""
    site = feed(tmp_path, [(97.0, 3, 0), (30.0, 20, 0), (97.0, 5, 0)])
    assert limits(site) == []
    faults = [(a["alarm"], fault_origin(a["detail"])) for a in site.alarms]
    assert faults == [("sensor_fault", "rule"), ("sensor_restored", "rule")], faults
    assert site.alarms[0]["class"] == "technical"
    assert site.alarms[0]["detail"] == {"rule": "range", "value": 30.0, "limit": 50.0}
    assert "on: limit" not in site.view.render()


def test_a_fast_fall_within_the_plausible_range_reaches_the_limits_on_time(tmp_path: Path) -> None:
    """SpO2 97 % to 84 % at once (a rate the rule calls suspect): LL raised after its 10 s delay.

    The step may be a probe's artifact or a real desaturation; the sensor fault says it is suspect,
    and the on-delay, not the rate rule, keeps a brief artifact from the limits.
    """
    site = feed(tmp_path, [(97.0, 3, 0), (84.0, 15, 0), (97.0, 3, 0)])
    # Below LL from t 4: raised at 14 with 10 s held (not once the rate rule accepts the level).
    assert limits(site) == [("limit", "low_low", 14.0, 10.0), ("limit_cleared", "low_low", 19.0, 15.0)]
    technical = [(a["alarm"], a["detail"].get("rule")) for a in site.alarms if a["class"] == "technical"]
    assert ("sensor_fault", "rate") in technical, technical


def test_a_limit_on_when_the_probe_comes_off_is_judged_again_only_by_valid_data(tmp_path: Path) -> None:
    """L on; below LL for 4 s; probe off (flagged 97 %, then unflagged 30 %); LL again; back inside.

    With a 10 s off-delay.  The invalid stretches neither escalate the alarm (the 30 % values), nor
    complete the LL delay (4 s before + 6 s after, not 4 s + the probe-off), nor the off-delay.
    The values change by at most 3 % a second, which the plausibility rules accept.
    """
    section = {"limits": {"MDC_PULS_OXIM_SAT_O2": {"off_delay_s": 10.0}}}
    parts = [
        (89.0, 12, 0),  # t 1-12: below L 90 from 1, raised at 11 (10 s delay)
        (86.0, 1, 0),  # t 13
        (84.0, 4, 0),  # t 14-17: below LL 85, 4 s of its 10 until the probe comes off at 18
        (97.0, 8, OFF),  # t 18-25: the probe off, the device flags its values
        (30.0, 8, 0),  # t 26-33: ... and then sends implausible unflagged ones
        (84.0, 8, 0),  # t 34-41: LL held 4 s + 6 s of valid data at 40 (not at 34, nor at 26)
        (87.0, 1, 0),  # t 42: inside LL by its deadband: the off-delay starts
        (90.0, 1, 0),  # t 43
        (92.0, 2, 0),  # t 44-45: inside L too; 4 s of the 10 s off-delay by 46
        (92.0, 20, OFF),  # t 46-65: probe off again, flagged
        (92.0, 8, 0),  # t 66-73: cleared after 6 s more of valid data, at 72 (not at 66)
    ]
    site = feed(tmp_path, parts, alarms=section)
    got = limits(site)
    assert [(k, lv, t) for k, lv, t, _ in got] == [
        ("limit", "low", 11.0),
        ("limit", "low_low", 40.0),
        ("limit_cleared", "low_low", 72.0),
    ], got
    # A raise's held time is the valid time beyond its limit; the clearance's since the alarm's
    # onset (at 1 s), the invalid stretches included: it was on throughout.
    assert [h for *_, h in got] == [10.0, 10.0, 71.0], got
    escalation = next(a for a in site.alarms if a["alarm"] == "limit" and a["detail"]["level"] == "low_low")
    assert (escalation["value"], escalation["priority"]) == (84.0, "high")
    technical = [(a["alarm"], fault_origin(a["detail"])) for a in site.alarms if a["class"] == "technical"]
    assert ("sensor_fault", "quality") in technical, technical
    assert ("sensor_fault", "rule") in technical, technical


def test_an_implausible_beat_interval_makes_a_rhythm_episode_indeterminate_not_a_rhythm(
    tmp_path: Path,
) -> None:
    """Bigeminy on; three intervals of 120 ms (no heart's: a doubled detection); bigeminy again."""
    site = beats(tmp_path, [800.0] * 20 + [560.0, 1040.0] * 20 + [120.0] * 3 + [560.0, 1040.0] * 10)
    got = [(a["alarm"], a["detail"].get("reason") or a["detail"].get("rule")) for a in site.alarms]
    assert got == [
        ("anomaly", None),
        ("sensor_fault", "range"),
        ("anomaly_indeterminate", "implausible_input"),
        ("sensor_restored", "plausibility"),
        ("anomaly", None),
    ], got
    assert [a["detail"]["pattern"] for a in site.alarms if a["alarm"].startswith("anomaly")] == [
        "bigeminy"
    ] * 3
    assert site.alarms[-1]["detail"]["episode"] == "resumed"


def test_a_beat_with_no_value_makes_a_rhythm_episode_indeterminate(tmp_path: Path) -> None:
    """Bigeminy on; three intervals the device sends with no value, unflagged; bigeminy again.

    No value is no measurement, as a flagged one: the episode turns indeterminate (the device's
    data, ``sensor_quality``) and no plausibility rule is broken.
    """
    site = beats(tmp_path, [800.0] * 20 + [560.0, 1040.0] * 20 + [math.nan] * 3 + [560.0, 1040.0] * 10)
    got = [(a["alarm"], a["detail"].get("reason") or a["detail"].get("rule")) for a in site.alarms]
    assert got == [
        ("anomaly", None),
        ("anomaly_indeterminate", "sensor_quality"),
        ("anomaly", None),
    ], got
    assert site.alarms[-1]["detail"]["episode"] == "resumed"


@pytest.mark.parametrize(
    ("value", "flags"),
    [(30.0, 0), (70.0, int(Quality.IMPUTED))],
    ids=["implausible", "filled-in-by-the-device"],
)
def test_an_invalid_value_is_no_measurement_to_an_estimator(tmp_path: Path, value: float, flags: int) -> None:
    """A fused SpO2 (its own range 20-300 takes 30 % and 70 %): 30 % breaks the gateway's rule, 70 %
    is flagged imputed (filled in, not measured); neither enters the estimate."""
    fused = {"subject": "ward3-bed7", "name": "spo2", "unit": "%", "every_s": 1.0}
    sources = [{"metric": "MDC_PULS_OXIM_SAT_O2", "noise": 1.0}]
    site = Site(tmp_path)

    async def main() -> list[dict[str, Any]]:
        async with AsyncOutbox(lambda: Outbox(tmp_path / "outbox.db")) as outbox:
            cfg = config(tmp_path, BED7, estimators={"fusion": [{**fused, "sources": sources}]})
            pipeline = Pipeline(cfg, site.anon, outbox)
            t = await spo2(pipeline, SPO2, 97.0, 5, 1.0)
            await spo2(pipeline, SPO2, value, 15, t, flags)
            await outbox.flush()
            records = [as_map(decode(i.payload)) for i in await outbox.lease(1000)]
        return [r for r in records if r["type"] == "estimate"]

    estimates = [(e["t"], e["state"], e.get("value")) for e in asyncio.run(main())]
    assert estimates, "no estimate records"
    assert {state for t, state, _ in estimates if t <= 5.0} == {"measured"}, estimates
    # From 6 s on only invalid values: bridged at 97 %, then lost, never measured at 30 or 70 %.
    later = [(state, v) for t, state, v in estimates if t > 8.0]
    assert later, estimates
    assert all(state in ("bridged", "lost") for state, _ in later), estimates
    assert all(v is None or v > 90.0 for _, v in later), estimates
    assert later[-1][0] == "lost", estimates
    assert [state for _, state, _ in estimates].count("lost") == 1, estimates  # said once


class ProbeOff(SinceOpened):
    """SpO2 89 %, falling at 2.5 %/s to 84 % from 4 s after the port opened; the finger out 7.5-11.5 s."""

    def at(self, t: float) -> Vitals:
        since = self.since(t)
        if 7.5 <= since < 11.5:
            return Vitals(math.nan, math.nan, math.nan, int(Status.FINGER_OUT))
        return Vitals(max(84.0, 89.0 - 2.5 * max(0.0, since - 4.0)), 72.0, 3.5)


@pytest.mark.slow
def test_a_nonin_monitor_whose_finger_comes_out_below_ll_escalates_only_on_valid_data(tmp_path: Path) -> None:
    """A real serial driver on a pty through ``edgetwin run``, its limits' delay 3 s.

    L on; below LL for ~2 s of its 3; the finger out 4 s; below LL again: the escalation comes ~1 s
    after the finger is back, held ~3 s of valid data (at once, held ~6 s, if the probe-off counted).
    """
    out = tmp_path / "out.jsonl"
    config = validate(
        {
            "gateway": {"state_dir": str(tmp_path)},
            "pipeline": {"window_s": 2.0, "hop_s": 1.0, "grace_s": 0.1},
            "uplink": {"kind": "local", "path": str(out)},
            "runtime": {"drain_deadline_s": 2.0},
            "alarms": {"limits": {"MDC_PULS_OXIM_SAT_O2": {"on_delay_s": 3.0}}},
            "sources": [
                {
                    "name": "bed7-spo2",
                    "driver": "serial",
                    "subject": "bed-7",
                    "port": str(tmp_path / "ttyNONIN"),
                    "protocol": "nonin2",
                }
            ],
        },
        "<test>",
        REGISTRY,
    )
    pty = tmp_path / "ttyNONIN"
    with (
        logged("drivers.serial.driver", "open at") as opened,
        PtyOximeter("nonin2", link=pty, vitals=ProbeOff(opened)),
    ):
        code = asyncio.run(run_gateway(config, REGISTRY, stop_after_s=14.0, install_signal_handlers=False))
    assert opened.is_set()
    assert code == 0
    records = [json.loads(line)["record"] for line in out.read_text().splitlines()]
    alarms = [r for r in records if r["type"] == "alarm"]
    spo2 = [a for a in alarms if a.get("metric") == "MDC_PULS_OXIM_SAT_O2"]
    got = [(a["alarm"], a["detail"].get("level"), a["held_s"]) for a in spo2 if a["class"] != "technical"]
    assert [(kind, level) for kind, level, _ in got] == [("limit", "low"), ("limit", "low_low")], got
    assert 3.0 <= got[1][2] < 4.0, got  # the valid time below LL, not the probe-off's
    technical = [a["alarm"] for a in spo2 if a["class"] == "technical"]
    assert technical[:1] == ["sensor_fault"], technical  # the finger out: the device's flags


def test_a_sinus_pause_of_3_5_s_is_the_rhythm_detectors_not_a_sensor_fault(tmp_path: Path) -> None:
    """Sinus rhythm at 800 ms with one 3.5 s pause: a rhythm episode (pause), no technical alarm."""
    site = beats(tmp_path, [800.0] * 40 + [3500.0] + [800.0] * 40)
    got = [(a["alarm"], a["detail"].get("pattern")) for a in site.alarms]
    assert got == [("anomaly", "pause"), ("anomaly_cleared", "pause")], got
