"""The synthetic source: determinism, chunking, realism, injected events, config, real-time driver."""

from __future__ import annotations

import asyncio
import itertools
import math
import time
from collections.abc import Mapping, Sequence

import numpy as np
import numpy.typing as npt
import pytest
from peers import RecordingSink
from pydantic import ValidationError

from drivers.sim.config import SimConfig, SimEvent, StallSpec
from drivers.sim.driver import SimDriver, factory
from drivers.sim.protocol import (
    ACCEL1,
    ACCEL2,
    CURRENT,
    FLOW,
    HR,
    MOTOR_TEMP,
    PRESSURE,
    RESP,
    RR,
    SPO2,
    TEMP,
    Chunk,
    Label,
    Series,
    make_generator,
)
from gateway.contracts import Diagnostic, SourceInfo
from gateway.errors import ConfigError
from gateway.sample import Quality

PATIENT_EVENTS = (
    Label("desaturation", 200.0, 320.0),
    Label("bradycardia", 500.0, 590.0),
    Label("sensor_off", 800.0, 830.0),
    Label("disconnect", 1000.0, 1040.0),
)
PUMP_EVENTS = (
    Label("bearing_wear", 300.0, 1200.0),
    Label("valve_fault", 1500.0, 1700.0),
    Label("sensor_off", 1900.0, 1930.0),
    Label("disconnect", 2100.0, 2140.0),
)


def _gen(
    profile: str, seed: int = 5, events: Sequence[Label] = (), per_hour: float = 0.0, rate_hz: float = 1.0
) -> Chunk:
    return make_generator(
        profile, seed=seed, rate_hz=rate_hz, events=events, random_events_per_hour=per_hour
    ).generate(0.0, 2400.0)


def _concat(chunks: Sequence[Chunk]) -> dict[str, Series]:
    out: dict[str, Series] = {}
    for name in chunks[0].series:
        parts = [c.series[name] for c in chunks]
        out[name] = Series(
            np.concatenate([p.t for p in parts]),
            np.concatenate([p.value for p in parts]),
            np.concatenate([p.quality for p in parts]),
        )
    return out


def _assert_same(a: Mapping[str, Series], b: Mapping[str, Series]) -> None:
    assert a.keys() == b.keys()
    for name in a:
        np.testing.assert_array_equal(a[name].t, b[name].t, err_msg=name)
        np.testing.assert_array_equal(a[name].value, b[name].value, err_msg=name)
        np.testing.assert_array_equal(a[name].quality, b[name].quality, err_msg=name)


def _inside(s: Series, start: float, end: float) -> npt.NDArray[np.bool_]:
    return (s.t >= start) & (s.t < end)


# -- determinism and chunking -------------------------------------------------------------------


@pytest.mark.parametrize(("profile", "events"), [("patient", PATIENT_EVENTS), ("pump", PUMP_EVENTS)])
def test_same_seed_same_values_other_seed_differs(profile: str, events: Sequence[Label]) -> None:
    a = _gen(profile, seed=11, events=events, per_hour=3.0)
    b = _gen(profile, seed=11, events=events, per_hour=3.0)
    c = _gen(profile, seed=12, events=events, per_hour=3.0)
    _assert_same(a.series, b.series)
    assert a.labels == b.labels
    for name, s in a.series.items():
        other = c.series[name]
        n = min(len(s), len(other))
        assert n > 0
        assert not np.array_equal(s.value[:n], other.value[:n], equal_nan=True), name


@pytest.mark.parametrize(("profile", "events"), [("patient", PATIENT_EVENTS), ("pump", PUMP_EVENTS)])
@pytest.mark.parametrize("rate_hz", [1.0, 25.0])
def test_one_call_or_chunks_give_identical_values(
    profile: str, events: Sequence[Label], rate_hz: float
) -> None:
    shifted = [Label(lb.kind, lb.start_s / 25.0, lb.end_s / 25.0) for lb in events]  # inside [0, 100)
    whole = make_generator(profile, seed=3, rate_hz=rate_hz, events=shifted, random_events_per_hour=30.0)
    one = whole.generate(0.0, 100.0)
    # Ten chunks on one generator, then uneven driver-like ticks on a fresh one.
    chunked = make_generator(profile, seed=3, rate_hz=rate_hz, events=shifted, random_events_per_hour=30.0)
    ten = [chunked.generate(10.0 * i, 10.0 * (i + 1)) for i in range(10)]
    ticked = make_generator(profile, seed=3, rate_hz=rate_hz, events=shifted, random_events_per_hour=30.0)
    edges = [0.0, 0.1, 0.30000000000000004, 0.7, 3.3, 17.123, 50.0, 50.0, 99.95, 100.0]
    ticks = [ticked.generate(a, b) for a, b in itertools.pairwise(edges)]
    _assert_same(one.series, _concat(ten))
    _assert_same(one.series, _concat(ticks))
    assert one.labels == tuple(lb for c in ten for lb in c.labels)
    assert len(one.series[ACCEL1 if profile == "pump" else HR]) > 0


def test_rr_series_replays_when_asked_for_an_earlier_span() -> None:
    gen = make_generator("patient", seed=8, rate_hz=1.0)
    first = gen.generate(0.0, 60.0).series[RR]
    gen.generate(60.0, 300.0)
    again = gen.generate(0.0, 60.0).series[RR]
    later = gen.generate(120.0, 180.0).series[RR]  # skips ahead without emitting 60..120
    fresh = make_generator("patient", seed=8, rate_hz=1.0).generate(120.0, 180.0).series[RR]
    np.testing.assert_array_equal(first.value, again.value)
    np.testing.assert_array_equal(later.t, fresh.t)
    np.testing.assert_array_equal(later.value, fresh.value)


def test_noise_cache_stays_bounded_over_an_hour_and_old_spans_come_back_the_same() -> None:
    """The draws kept do not grow with running time; a span asked for again is drawn again, equal."""
    gen = make_generator("patient", seed=5, rate_hz=25.0)
    first = gen.generate(0.0, 10.0).series[SPO2].value
    held = []
    for i in range(1, 360):  # an hour, in 10 s ticks
        gen.generate(10.0 * i, 10.0 * (i + 1))
        held.append(gen._draws.cached_blocks())
    keys = len(gen._draws._cache)  # one per named draw (noise, drift, beat scatter): fixed names
    assert keys <= 3 * len(gen.signals)
    assert max(held) <= 4 * keys  # a few recent blocks per draw, however long it runs
    again = gen.generate(0.0, 10.0).series[SPO2].value
    np.testing.assert_array_equal(first, again)


# -- realism ------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_patient_at_rest_is_in_realistic_ranges(seed: int) -> None:
    s = _gen("patient", seed=seed).series
    hr, spo2, rr, resp, temp = s[HR].value, s[SPO2].value, s[RR].value, s[RESP].value, s[TEMP].value
    assert hr.min() >= 50
    assert hr.max() <= 100
    assert 58 <= hr.mean() <= 90
    assert spo2.min() >= 93
    assert spo2.max() <= 100
    np.testing.assert_array_equal(spo2, np.round(spo2))  # whole percent, like a real oximeter
    assert resp.min() >= 8
    assert resp.max() <= 25
    assert temp.min() >= 36.3
    assert temp.max() <= 37.5
    assert (len(s[HR]), len(s[RESP]), len(s[TEMP])) == (2400, 600, 240)
    rmssd = float(np.sqrt(np.mean(np.diff(rr) ** 2)))
    assert 15.0 <= rmssd <= 60.0, rmssd
    assert np.all(s[HR].quality == 0)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_rr_intervals_agree_with_heart_rate(seed: int) -> None:
    s = _gen("patient", seed=seed, events=PATIENT_EVENTS).series
    ok = np.isfinite(s[HR].value)
    expected = 60000.0 / float(np.mean(s[HR].value[ok]))
    got = float(np.mean(s[RR].value))
    assert abs(got - expected) / expected < 0.10, (got, expected)
    # Per beat: an RR interval is the time since the previous beat.
    gaps = np.diff(s[RR].t) * 1000.0
    same = np.isclose(gaps, s[RR].value[1:], atol=1e-6)
    assert same.mean() > 0.98  # only beats next to a sensor gap differ


def test_pump_is_in_realistic_ranges() -> None:
    s = _gen("pump", seed=4).series
    expect = {
        ACCEL1: (0.015, 0.05),
        ACCEL2: (0.025, 0.07),
        CURRENT: (1.0, 1.6),
        PRESSURE: (1.0, 1.4),
        MOTOR_TEMP: (65.0, 80.0),
        FLOW: (28.0, 36.0),
        "Pump1/Thermocouple": (24.0, 30.0),
        "Pump1/Voltage": (220.0, 240.0),
    }
    assert set(s) == set(expect)
    for name, (lo, hi) in expect.items():
        assert lo <= s[name].value.min(), name
        assert s[name].value.max() <= hi, name
        assert len(s[name]) == 2400


# -- injected events ----------------------------------------------------------------------------


def test_desaturation_lowers_spo2_and_raises_hr_only_inside_its_span() -> None:
    s = _gen("patient", seed=2, events=[Label("desaturation", 600.0, 720.0)]).series
    inside, outside = _inside(s[SPO2], 600.0, 720.0), ~_inside(s[SPO2], 600.0, 720.0)
    assert s[SPO2].value[inside].min() < 88
    assert s[SPO2].value[outside].min() > 92
    hold = _inside(s[HR], 640.0, 690.0)
    before = _inside(s[HR], 500.0, 600.0)
    assert s[HR].value[hold].mean() > s[HR].value[before].mean() + 3


def test_bradycardia_slows_hr_and_lengthens_rr_only_inside_its_span() -> None:
    s = _gen("patient", seed=2, events=[Label("bradycardia", 600.0, 700.0)]).series
    assert s[HR].value[_inside(s[HR], 600.0, 700.0)].min() < 46
    assert s[HR].value[~_inside(s[HR], 600.0, 700.0)].min() > 50
    rr_in = s[RR].value[_inside(s[RR], 630.0, 680.0)]
    rr_out = s[RR].value[~_inside(s[RR], 600.0, 710.0)]
    assert rr_in.mean() > 1250  # 60000 / 48
    assert rr_out.max() < 1250


def test_bearing_wear_raises_vibration_and_motor_temperature_progressively() -> None:
    s = _gen("pump", seed=6, events=[Label("bearing_wear", 600.0, 1800.0)]).series
    for name in (ACCEL1, ACCEL2):
        v = s[name].value
        early = v[_inside(s[name], 600.0, 800.0)].mean()
        late = v[_inside(s[name], 1600.0, 1800.0)].mean()
        outside = v[~_inside(s[name], 600.0, 1800.0)].mean()
        assert late > 1.4 * outside, name
        assert late > 1.3 * early, name  # progressive, not a step
        assert abs(v[_inside(s[name], 1800.0, 2400.0)].mean() / outside - 1) < 0.1
    temp = s[MOTOR_TEMP].value
    assert (
        temp[_inside(s[MOTOR_TEMP], 1700.0, 1800.0)].mean()
        > temp[_inside(s[MOTOR_TEMP], 0.0, 600.0)].mean() + 4
    )


def test_valve_fault_drops_pressure_and_flow_and_changes_current() -> None:
    span = (1000.0, 1200.0)
    s = _gen("pump", seed=6, events=[Label("valve_fault", *span)]).series
    core = (span[0] + 10.0, span[1] - 10.0)
    for name, factor in ((PRESSURE, 0.75), (FLOW, 0.8)):
        v = s[name].value
        assert v[_inside(s[name], *core)].mean() < factor * v[~_inside(s[name], *span)].mean(), name
        assert v[~_inside(s[name], *span)].min() > 0.9 * v[~_inside(s[name], *span)].mean(), name
    cur = s[CURRENT].value
    assert cur[_inside(s[CURRENT], *core)].mean() < 0.95 * cur[~_inside(s[CURRENT], *span)].mean()


@pytest.mark.parametrize(
    ("profile", "blanked", "kept", "flag"),
    [
        ("patient", (HR, SPO2), (RESP, TEMP), Quality.SENSOR_OFF),
        ("pump", (ACCEL1, ACCEL2), (PRESSURE, CURRENT), Quality.BAD_STATUS),
    ],
)
def test_sensor_off_gives_nan_with_the_fault_flag(
    profile: str, blanked: tuple[str, ...], kept: tuple[str, ...], flag: Quality
) -> None:
    s = _gen(profile, seed=1, events=[Label("sensor_off", 900.0, 960.0)]).series
    for name in blanked:
        inside = _inside(s[name], 900.0, 960.0)
        assert inside.sum() == 60
        assert np.all(np.isnan(s[name].value[inside]))
        assert np.all(s[name].quality[inside] == flag)
        assert np.all(np.isfinite(s[name].value[~inside]))
        assert np.all(s[name].quality[~inside] == 0)
    for name in kept:
        assert np.all(np.isfinite(s[name].value)), name
    if profile == "patient":
        assert not np.any(_inside(s[RR], 900.0, 960.0))  # no beats detected with the leads off
        assert np.any(_inside(s[RR], 962.0, 970.0))


@pytest.mark.parametrize("profile", ["patient", "pump"])
def test_disconnect_gives_no_samples_at_all(profile: str) -> None:
    s = _gen(profile, seed=1, events=[Label("disconnect", 900.0, 960.0)]).series
    for name, series in s.items():
        assert not np.any(_inside(series, 900.0, 960.0)), name
        assert np.all(np.isfinite(series.value)), name
        assert np.any(_inside(series, 0.0, 900.0)), name
        assert np.any(series.t >= 960.0), name


@pytest.mark.parametrize(
    ("profile", "kinds"),
    [
        ("patient", {"desaturation", "bradycardia", "sensor_off", "disconnect"}),
        ("pump", {"bearing_wear", "valve_fault", "sensor_off", "disconnect"}),
    ],
)
def test_random_events_are_seeded_labelled_and_of_the_profile(profile: str, kinds: set[str]) -> None:
    gen = make_generator(profile, seed=9, rate_hz=1.0, random_events_per_hour=4.0)
    labels = gen.labels(0.0, 20 * 3600.0)
    assert 40 <= len(labels) <= 130  # Poisson, mean 80
    assert {lb.kind for lb in labels} <= kinds
    assert len({lb.kind for lb in labels}) >= 3
    assert all(lb.end_s > lb.start_s for lb in labels)
    assert labels == make_generator(profile, seed=9, rate_hz=1.0, random_events_per_hour=4.0).labels(
        0.0, 72000.0
    )
    hourly = tuple(lb for h in range(20) for lb in gen.labels(h * 3600.0, (h + 1) * 3600.0))
    assert hourly == labels
    assert make_generator(profile, seed=9, rate_hz=1.0).labels(0.0, 72000.0) == ()


def test_configured_events_are_labelled_once() -> None:
    gen = make_generator("patient", seed=0, rate_hz=1.0, events=PATIENT_EVENTS)
    got = [lb for i in range(240) for lb in gen.generate(i * 10.0, (i + 1) * 10.0).labels]
    assert got == sorted(PATIENT_EVENTS, key=lambda lb: lb.start_s)


# -- config -------------------------------------------------------------------------------------


def test_config_defaults_and_events() -> None:
    cfg = SimConfig.model_validate(
        {
            "profile": "patient",
            "device": "A4:C1:38:12:34:56",
            "events": [{"kind": "desaturation", "at_s": 10, "duration_s": 30}],
        }
    )
    assert (cfg.seed, cfg.rate_hz, cfg.random_events_per_hour, cfg.stall_loop) == (0, 1.0, 0.0, None)
    assert cfg.events[0].label() == Label("desaturation", 10.0, 40.0)


@pytest.mark.parametrize(
    ("data", "needle"),
    [
        ({"profile": "patient", "device": "x", "colour": "red"}, "colour"),
        ({"profile": "patient", "device": "x", "name": "bed-1"}, "name"),
        (
            {
                "profile": "patient",
                "device": "x",
                "events": [{"kind": "desaturation", "at_s": 1, "duration_s": 5, "x": 1}],
            },
            "x",
        ),
        (
            {
                "profile": "patient",
                "device": "x",
                "events": [{"kind": "valve_fault", "at_s": 1, "duration_s": 5}],
            },
            "pump profile",
        ),
        (
            {
                "profile": "pump",
                "device": "x",
                "events": [{"kind": "bradycardia", "at_s": 1, "duration_s": 5}],
            },
            "patient profile",
        ),
        (
            {"profile": "pump", "device": "x", "events": [{"kind": "meltdown", "at_s": 1, "duration_s": 5}]},
            "kind",
        ),
        (
            {
                "profile": "pump",
                "device": "x",
                "events": [{"kind": "valve_fault", "at_s": -1, "duration_s": 5}],
            },
            "at_s",
        ),
        ({"profile": "pump", "device": "x", "rate_hz": 0}, "rate_hz"),
        ({"profile": "pump", "device": "x", "rate_hz": 5000}, "rate_hz"),
        ({"profile": "pump", "device": "x", "rate_hz": math.inf}, "rate_hz"),
        ({"profile": "pump", "device": ""}, "device"),
        ({"profile": "robot", "device": "x"}, "profile"),
        ({"profile": "pump"}, "device"),
    ],
)
def test_config_rejects(data: dict[str, object], needle: str) -> None:
    with pytest.raises(ValidationError, match=needle):
        SimConfig.model_validate(data)


def test_factory_rejects_a_kind_that_contradicts_the_profile() -> None:
    cfg = SimConfig(profile="pump", device="SN-503-99812")
    with pytest.raises(ConfigError, match='set kind = "industrial"'):
        factory(SourceInfo("pump-3", "plant-A/pump-3", "medical"), cfg)
    assert (
        factory(SourceInfo("pump-3", "plant-A/pump-3", "industrial"), cfg).streams[PRESSURE].kind
        == "industrial"
    )


# -- the real-time driver -----------------------------------------------------------------------


async def _run_for(driver: SimDriver, sink: RecordingSink, seconds: float, started: list[float]) -> None:
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(seconds):
            await driver.run(sink, started=lambda: started.append(time.monotonic()))


def test_driver_streams_in_real_time_with_the_configured_identities() -> None:
    info = SourceInfo("bed-7-monitor", "patient-MRN-0048213", "medical")
    cfg = SimConfig(
        profile="patient",
        device="A4:C1:38:5B:20:7E",
        seed=7,
        rate_hz=20.0,
        events=[SimEvent(kind="desaturation", at_s=0.2, duration_s=30.0)],
    )
    driver = factory(info, cfg)
    sink = RecordingSink()
    started: list[float] = []
    t0 = time.monotonic()
    asyncio.run(_run_for(driver, sink, 0.6, started))
    assert len(started) == 1
    assert started[0] - t0 < 0.3
    assert sink.blocks
    for arrived, block in sink.blocks:
        st = block.stream
        assert (st.source, st.subject, st.device, st.kind) == (
            "bed-7-monitor",
            "patient-MRN-0048213",
            "A4:C1:38:5B:20:7E",
            "medical",
        )
        assert block.t_mono.max() <= arrived  # nothing from the future
        assert np.all(np.diff(block.t_mono) > 0)
    hr = [b for _, b in sink.blocks if b.stream.metric.name == HR]
    t = np.concatenate([b.t_mono for b in hr])
    assert 6 <= len(t) <= 13  # 20 Hz for ~0.6 s, up to the last completed tick
    np.testing.assert_allclose(np.diff(t), 0.05, atol=1e-9)
    assert t[0] - t0 < 0.05
    assert {b.stream.rate_hz for b in hr} == {20.0}
    assert sink.diagnostics == [
        Diagnostic(
            "sim_label",
            "patient-MRN-0048213",
            sink.diagnostics[0].t_wall,
            {"event": "desaturation", "start_s": 0.2, "end_s": 30.2},
        )
    ]
    assert abs(sink.diagnostics[0].t_wall - (time.time() - 0.6 + 0.2)) < 0.3
    assert sink.samples == []
    assert sink.alarms == []


def test_stall_loop_blocks_the_event_loop_once() -> None:
    info = SourceInfo("pump-3-plc", "plant-A/pump-3", "industrial")
    cfg = SimConfig(
        profile="pump", device="SN-PLC-20931", rate_hz=10.0, stall_loop=StallSpec(at_s=0.1, duration_s=0.4)
    )
    driver = factory(info, cfg)
    sink = RecordingSink()
    beats: list[float] = []

    async def heartbeat() -> None:
        while True:
            beats.append(time.monotonic())
            await asyncio.sleep(0.02)

    async def main() -> None:
        hb = asyncio.create_task(heartbeat(), name="test-heartbeat")
        try:
            await _run_for(driver, sink, 1.0, [])
        finally:
            hb.cancel()

    asyncio.run(main())
    gaps = np.diff(beats)
    assert gaps.max() >= 0.38  # the loop froze ...
    assert (gaps > 0.3).sum() == 1  # ... once
    # After the stall the driver catches up: no sample is lost.
    v = np.concatenate([b.t_mono for _, b in sink.blocks if b.stream.metric.name == FLOW])
    np.testing.assert_allclose(np.diff(v), 0.1, atol=1e-9)
    assert len(v) >= 8
