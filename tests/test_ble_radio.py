"""The BLE driver on the emulated radio: real bleak and bleak-retry-connector code paths against the
emulated BlueZ on a private bus, with simulated wearables as separate processes."""

from __future__ import annotations

import argparse
import asyncio
import functools
import itertools
import math
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
from data_support import DATA

pytest.importorskip("bleak")
pytest.importorskip("bluezoo")

from peers import RecordingSink
from test_alarm_source_removed import Site, config

from drivers.ble.commands import add_commands, cmd_sim_wearable, format_scan, scan_ble
from drivers.ble.config import BleConfig
from drivers.ble.driver import BleDriver, factory
from drivers.ble.protocol import (
    BATTERY,
    BP_PULSE,
    DIA,
    HR,
    MEAN,
    PERF,
    PULSE,
    RR,
    SPO2,
    SYS,
    TEMP,
)
from drivers.ble.testbed.harness import Testbed, WearableProcess
from drivers.ble.testbed.wearables import load_record_beats
from gateway.anonymize import Anonymizer, Pseudonymizer
from gateway.contracts import Alarm, AlarmKind, SampleSink, SourceInfo
from gateway.errors import ConfigError, TransientError
from gateway.records import encode
from gateway.sample import Quality

pytestmark = pytest.mark.slow

_addresses = (f"C0:FF:EE:00:{i // 256:02X}:{i % 256:02X}" for i in itertools.count(1))


def new_address() -> str:
    return next(_addresses)


@pytest.fixture(scope="module")
def testbed() -> Iterator[Testbed]:
    with Testbed(scan_interval_s=0.05, page_timeout_s=0.2) as tb:
        yield tb


@pytest.fixture
def wearables(testbed: Testbed) -> Iterator[Callable[..., WearableProcess]]:
    started: list[WearableProcess] = []

    def start(profile: str, address: str | None = None, **kw: Any) -> WearableProcess:
        w = testbed.wearable(profile, address or new_address(), **kw)
        started.append(w)
        return w

    yield start
    for w in started:
        w.stop()


def driver(devices: list[dict[str, Any]], subject: str = "ward3-bed12", **cfg: Any) -> BleDriver:
    base: dict[str, Any] = {"lost_after_s": 5.0, "reconnect_min_s": 0.1, "reconnect_max_s": 1.0}
    return factory(
        SourceInfo("ble-ward3", subject, "medical"),
        BleConfig.model_validate({**base, **cfg, "devices": devices}),
    )


async def wait_for(cond: Callable[[], bool], timeout_s: float = 20.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s:g} s waiting for {what}")
        await asyncio.sleep(0.02)


@asynccontextmanager
async def running(drv: BleDriver, sink: SampleSink) -> AsyncIterator[None]:
    started = asyncio.Event()
    task = asyncio.create_task(drv.run(sink, started=started.set), name="ble-driver-under-test")
    try:
        async with asyncio.timeout(10):
            await started.wait()
        yield
    finally:
        task.cancel()
        async with asyncio.timeout(10):
            await asyncio.gather(task, return_exceptions=True)
    assert task.cancelled() or task.exception() is None


def state(drv: BleDriver, address: str) -> str:
    return drv.status()[address].state


async def send(w: WearableProcess, line: str) -> None:
    """A command that needs a subscriber: retried (bounded) until the gateway has subscribed."""
    deadline = time.monotonic() + 5
    while True:
        try:
            await asyncio.to_thread(w.command, line)
            return
        except TransientError as exc:
            if "not subscribed" not in str(exc) or time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.02)


def reconnected(sink: RecordingSink) -> list[Alarm]:
    """The restores of a device back in range (not of a battery good again)."""
    return [a for a in sink.alarms_of(AlarmKind.SENSOR_RESTORED) if a.detail["cause"] == "reconnected"]


def battery_alarms(sink: RecordingSink) -> list[tuple[str, int]]:
    """The low-battery alarms and their endings, in order: (kind, level)."""
    return [
        (a.kind.value, int(a.detail["battery"]))
        for a in sink.alarms
        if a.detail.get("cause") == "low_battery"
    ]


# -- scanning ---------------------------------------------------------------------------------------


def test_scan_lists_nearby_wearables_with_rssi_and_health_services(
    testbed: Testbed, wearables: Callable[..., WearableProcess]
) -> None:
    hr, plx = wearables("hr", rate=0), wearables("plx", rate=0)
    rows = asyncio.run(scan_ble("hci0", 0.4, everything=False))
    found = {r.address: r for r in rows}
    assert found[hr.address].profile == "hr"
    assert found[plx.address].profile == "plx"
    assert "heart_rate" in found[hr.address].services
    assert "pulse_oximeter" in found[plx.address].services
    assert all(-100 < r.rssi < 0 for r in rows)
    table = format_scan(rows, "hci0", 0.4)
    assert hr.address in table
    assert "pulse_oximeter" in table


def test_scan_and_sim_commands_are_wired(monkeypatch: pytest.MonkeyPatch) -> None:
    parser = argparse.ArgumentParser(prog="edgetwin")
    sub = parser.add_subparsers(dest="command", required=True)
    groups = {"top": sub}
    for name in ("scan", "sim"):
        groups[name] = sub.add_parser(name).add_subparsers(dest=f"{name}_what", required=True)
    add_commands(groups)
    args = parser.parse_args(["scan", "ble", "--seconds", "0.5", "--adapter", "hci1"])
    assert (args.seconds, args.adapter, args.all) == (0.5, "hci1", False)
    args = parser.parse_args(["sim", "wearable", "--profile", "plx"])
    monkeypatch.delenv("DBUS_SYSTEM_BUS_ADDRESS", raising=False)
    assert args.func(args) == 2  # no emulated radio to join, and no --testbed: a usage error
    assert args.func is cmd_sim_wearable


# -- profiles into samples ----------------------------------------------------------------------------

# The vectors of PROTOCOLS.md section 4, byte for byte.
HR_VECTORS = ["06 48", "16 4B 1A 03 20 03", "09 B4 00 E8 03"]
PLX_VECTORS = ["00 61 00 48 00", "1C 61 00 48 00 80 00 20 00 00 2D F0", "00 FF 07 FF 07"]
SPOT_VECTORS = ["01 61 00 48 00 E8 07 01 0F 0A 1E 00", "0C 61 00 48 00 00 20 00 08 00"]
TEMP_VECTORS = [
    "00 6E 01 00 FF",
    "06 6E 01 00 FF E8 07 01 0F 0A 1E 00 02",
    "01 DA 03 00 FF",
    "00 FF FF 7F 00",
]
BP_VECTORS = ["1E 78 00 50 00 5D 00 E8 07 01 0F 0A 1E 00 48 00 01 04 00", "01 A0 F0 64 F0 7B F0"]


def test_every_profile_delivers_its_test_vectors_as_samples(
    testbed: Testbed, wearables: Callable[..., WearableProcess]
) -> None:
    hr, plx, thermo, bp = (wearables(p, rate=0) for p in ("hr", "plx", "thermo", "bp"))
    drv = driver(
        [
            {"address": hr.address, "profile": "hr"},
            {"address": plx.address, "profile": "plx", "subject": "ward3-bed14"},
            {"address": thermo.address, "profile": "thermo"},
            {"address": bp.address, "profile": "bp"},
        ]
    )
    sink = RecordingSink(blocks=False)

    async def scenario() -> None:
        async with running(drv, sink):
            devices = (hr, plx, thermo, bp)
            await wait_for(
                lambda: all(state(drv, w.address) == "connected" for w in devices), 10, "four links"
            )
            for w, vectors, uuid in (
                (hr, HR_VECTORS, "2a37"), (plx, PLX_VECTORS, "2a5f"), (plx, SPOT_VECTORS, "2a5e"),
                (thermo, TEMP_VECTORS, "2a1c"), (bp, BP_VECTORS, "2a35"),
            ):  # fmt: skip
                for v in vectors:
                    await send(w, f"send {uuid} {v.replace(' ', '')}")
                if uuid == "2a5f":
                    # Two characteristics of one device are two notification streams with no order
                    # between them; the continuous readings are asserted first, so they go first.
                    await wait_for(
                        lambda: len(sink.of(plx.address, SPO2)) == 3, 20, "the continuous oximetry"
                    )
            await wait_for(lambda: len(sink.of(bp.address, SYS)) == 2, 20, "the blood pressures")
            await wait_for(lambda: len(sink.of(thermo.address, TEMP)) == 4, 20, "the temperatures")
            await wait_for(lambda: len(sink.of(plx.address, SPO2)) == 5, 20, "the oximetry")
            await wait_for(lambda: len(sink.of(hr.address, RR)) == 2, 20, "the RR intervals")
            await send(thermo, "battery 12")
            await wait_for(lambda: bool(sink.alarms_of(AlarmKind.SENSOR_FAULT)), 20, "the low-battery alarm")

    asyncio.run(scenario())

    def values(address: str, metric: str) -> list[float]:
        return [s.value for s in sink.of(address, metric)]

    assert values(hr.address, HR) == [72.0, 75.0, 180.0]
    assert values(hr.address, RR) == [775.390625, 781.25]
    rr = sink.of(hr.address, RR)
    assert rr[1].t_mono - rr[0].t_mono == pytest.approx(0.78125)  # each interval sits at its beat
    assert rr[0].stream.rate_hz is None
    spo2 = sink.of(plx.address, SPO2)
    assert [s.value for s in spo2[:2]] == [97.0, 97.0]
    assert spo2[1].quality == Quality.LOW_PERFUSION
    assert math.isnan(spo2[2].value)
    assert spo2[2].quality == Quality.BAD_STATUS
    assert [s.value for s in spo2[3:]] == [97.0, 97.0]  # spot checks, indicated
    assert spo2[4].quality == Quality.SENSOR_OFF  # sensor displaced
    assert values(plx.address, PERF) == [4.5, 8.0]
    assert values(plx.address, PULSE)[:2] == [72.0, 72.0]
    assert {s.stream.subject for s in sink.samples if s.stream.device == plx.address} == {"ward3-bed14"}
    temps = values(thermo.address, TEMP)
    assert temps[:3] == [36.6, 36.6, 37.0]
    assert math.isnan(temps[3])
    assert values(bp.address, SYS)[0] == 120.0
    assert values(bp.address, DIA)[0] == 80.0
    assert values(bp.address, MEAN)[0] == 93.0
    assert values(bp.address, BP_PULSE) == [72.0]
    assert values(bp.address, SYS)[1] == pytest.approx(120.00987, abs=1e-5)
    # Device timestamps of 2024 are far from the gateway clock: gateway time is used.
    assert all(abs(s.t_wall - time.time()) < 60 for s in sink.samples)
    for s in sink.samples:
        assert s.stream.device in {hr.address, plx.address, thermo.address, bp.address}
        assert s.stream.source == "ble-ward3"
    (low,) = sink.alarms_of(AlarmKind.SENSOR_FAULT)
    assert dict(low.detail) == {"cause": "low_battery", "battery": 12}
    assert low.stream is not None
    assert low.stream.metric.name == TEMP
    assert drv.counters["bad_values"] == 0
    # What leaves the gateway from this source carries no address, name or serial.
    anon = Anonymizer(Pseudonymizer(b"k" * 32), time_mode="relative", local_identities=[hr.address])
    for record in (low, *sink.diagnostics):
        build = (
            (lambda r=record: anon.alarm(r))
            if isinstance(record, Alarm)
            else (lambda r=record: anon.diagnostic(r))
        )
        sealed = anon.seal(build, encode)
        assert sealed is not None
        for w in (hr, plx, thermo, bp):
            assert w.address.encode() not in sealed[1]
            assert b"SIM-" not in sealed[1]


def test_a_low_battery_ends_once_charged_above_the_hysteresis_and_rearms(
    testbed: Testbed, wearables: Callable[..., WearableProcess]
) -> None:
    w = wearables("hr", rate=0)  # battery 87 at the start
    drv = driver([{"address": w.address, "profile": "hr"}], low_battery_pct=15)
    sink = RecordingSink(blocks=False)

    def levels() -> list[float]:
        return [s.value for s in sink.of(w.address, BATTERY)]

    async def level(n: int) -> None:
        await send(w, f"battery {n}")
        await wait_for(lambda: levels()[-1:] == [float(n)], 20, f"the battery level {n}")

    async def scenario() -> None:
        async with running(drv, sink):
            await wait_for(lambda: bool(levels()), 20, "the first battery reading")
            for n in (12, 10, 19, 16, 20, 60, 15):
                await level(n)

    asyncio.run(scenario())
    assert levels() == [87.0, 12.0, 10.0, 19.0, 16.0, 20.0, 60.0, 15.0]
    # The first reading of the run is good: it ends a low battery a previous run may have left on
    # (the pipeline sends it only then).  12: low; 19 and 16: inside the hysteresis, still low;
    # 20 (the limit + 5): good again; 15: low again, a new condition.
    assert battery_alarms(sink) == [
        ("sensor_restored", 87),
        ("sensor_fault", 12),
        ("sensor_restored", 20),
        ("sensor_fault", 15),
    ]
    restored = [a for a in sink.alarms_of(AlarmKind.SENSOR_RESTORED) if a.detail["cause"] == "low_battery"]
    assert dict(restored[1].detail) == {"after": "sensor_fault", "cause": "low_battery", "battery": 20}
    assert restored[1].stream is not None
    assert restored[1].stream.metric.name == HR  # the device's headline stream, as its raise


def test_a_low_battery_charged_while_the_gateway_was_down_ends_after_the_restart(
    testbed: Testbed, wearables: Callable[..., WearableProcess], tmp_path: Path
) -> None:
    address = new_address()
    source = {
        "name": "ble-ward3", "driver": "ble", "subject": "ward3-bed12", "kind": "medical",
        "devices": [{"address": address, "profile": "hr"}], "reconnect_min_s": 0.1, "reconnect_max_s": 1.0,
    }  # fmt: skip
    cfg = config(tmp_path, source)
    site = Site(tmp_path)

    def gateway_run(battery: int) -> list[dict[str, Any]]:
        """One start of the gateway, a fresh driver, until the battery level is read."""
        return site.restart(
            cfg, BleDriver, lambda d: d.status()[address].battery == battery, "the battery level"
        )

    w = wearables("hr", address, rate=0, battery=12)
    first = gateway_run(12)
    assert [(a["alarm"], a["detail"]["cause"]) for a in first] == [("sensor_fault", "low_battery")]
    assert len(site.subject("ward3-bed12").active) == 1
    w.stop()
    wearables("hr", address, rate=0, battery=87)  # charged while the gateway was down
    after = gateway_run(87)
    assert [(a["alarm"], a["detail"]) for a in after] == [
        ("sensor_restored", {"after": "sensor_fault", "cause": "low_battery", "battery": 87})
    ]
    assert site.subject("ward3-bed12").active == {}
    assert gateway_run(87) == []  # good again, nothing on: nothing sent


# -- link loss and recovery --------------------------------------------------------------------------


def test_forced_disconnect_reconnects(testbed: Testbed, wearables: Callable[..., WearableProcess]) -> None:
    w = wearables("hr", rate=20)
    drv = driver([{"address": w.address, "profile": "hr"}])
    sink = RecordingSink(blocks=False)

    async def scenario() -> None:
        async with running(drv, sink):
            await wait_for(lambda: len(sink.of(w.address, HR)) >= 3, 20, "heart rates")
            await asyncio.to_thread(testbed.disconnect_central, w.address)
            await wait_for(lambda: drv.status()[w.address].connections == 2, 20, "the reconnection")
            n = len(sink.samples)
            await wait_for(lambda: len(sink.samples) > n + 3, 20, "samples after reconnecting")

    asyncio.run(scenario())
    assert testbed.count("connect", w.address) == 2
    assert not sink.alarms_of(AlarmKind.SENSOR_LOST)  # back long before lost_after_s


def test_out_of_range_raises_device_lost_then_resumes(
    testbed: Testbed, wearables: Callable[..., WearableProcess]
) -> None:
    w = wearables("plx", rate=20)
    drv = driver([{"address": w.address, "profile": "plx"}], lost_after_s=0.6)
    sink = RecordingSink(blocks=False)

    async def scenario() -> None:
        async with running(drv, sink):
            await wait_for(lambda: len(sink.of(w.address, SPO2)) >= 3, 20, "oximetry")
            await asyncio.to_thread(w.command, "range out")
            await wait_for(lambda: bool(sink.alarms_of(AlarmKind.SENSOR_LOST)), 20, "the device-lost alarm")
            n = len(sink.of(w.address, SPO2))
            await asyncio.sleep(0.3)
            assert len(sink.of(w.address, SPO2)) == n  # nothing while away
            assert state(drv, w.address) in ("scanning", "backoff", "connecting")
            await asyncio.to_thread(w.command, "range in")
            await wait_for(lambda: bool(reconnected(sink)), 20, "the restore")
            await wait_for(lambda: len(sink.of(w.address, SPO2)) > n + 3, 20, "oximetry again")

    asyncio.run(scenario())
    (lost,) = sink.alarms_of(AlarmKind.SENSOR_LOST)
    assert dict(lost.detail) == {"cause": "out_of_range", "profile": "plx"}
    assert lost.subject == "ward3-bed12"
    assert lost.stream is not None
    assert lost.stream.device == w.address
    (back,) = reconnected(sink)
    assert back.t_mono > lost.t_mono


def test_wearable_powered_off_then_on_again(
    testbed: Testbed, wearables: Callable[..., WearableProcess]
) -> None:
    w = wearables("thermo", rate=10)
    drv = driver([{"address": w.address, "profile": "thermo"}], lost_after_s=0.6)
    sink = RecordingSink(blocks=False)

    async def scenario() -> None:
        async with running(drv, sink):
            await wait_for(lambda: len(sink.of(w.address, TEMP)) >= 2, 20, "temperatures")
            await asyncio.to_thread(w.power_off)
            await wait_for(lambda: state(drv, w.address) != "connected", 20, "the link to drop")
            await wait_for(lambda: bool(sink.alarms_of(AlarmKind.SENSOR_LOST)), 20, "the device-lost alarm")
            n = len(sink.of(w.address, TEMP))
            await asyncio.to_thread(wearables, "thermo", w.address, rate=10)
            await wait_for(lambda: len(sink.of(w.address, TEMP)) > n + 1, 20, "temperatures again")

    asyncio.run(scenario())
    assert dict(sink.alarms_of(AlarmKind.SENSOR_LOST)[0].detail)["cause"] == "out_of_range"
    assert len(reconnected(sink)) == 1


# -- allowlist, slots --------------------------------------------------------------------------------


def test_strangers_and_wrong_profiles_are_never_connected(
    testbed: Testbed, wearables: Callable[..., WearableProcess]
) -> None:
    mine = wearables("hr", rate=10, name="HRM-Strap")
    stranger = wearables("hr", rate=10, name="HRM-Strap")  # same name: names are not identities
    cuff_that_is_a_strap = wearables("hr", rate=10)
    drv = driver(
        [
            {"address": mine.address, "profile": "hr"},
            {"address": cuff_that_is_a_strap.address, "profile": "bp"},
        ],
        lost_after_s=0.5,
    )
    sink = RecordingSink(blocks=False)

    async def scenario() -> None:
        async with running(drv, sink):
            await wait_for(lambda: len(sink.of(mine.address, HR)) >= 3, 20, "the allowlisted strap")
            await wait_for(lambda: bool(sink.alarms_of(AlarmKind.SENSOR_LOST)), 20, "the lost alarm")

    asyncio.run(scenario())
    assert testbed.count("connect", stranger.address) == 0
    assert testbed.count("connect", cuff_that_is_a_strap.address) == 0
    assert {s.stream.device for s in sink.samples} == {mine.address}
    (lost,) = sink.alarms_of(AlarmKind.SENSOR_LOST)
    assert lost.stream is not None
    assert lost.stream.device == cuff_that_is_a_strap.address
    assert dict(lost.detail) == {"cause": "wrong_service", "profile": "bp"}


def test_slot_budget_makes_the_extra_device_wait_with_a_clear_status(
    testbed: Testbed, wearables: Callable[..., WearableProcess]
) -> None:
    a, b = wearables("hr", rate=10), wearables("plx", rate=10)
    drv = driver([{"address": a.address, "profile": "hr"}, {"address": b.address, "profile": "plx"}], slots=1)
    sink = RecordingSink(blocks=False)
    first: list[str] = []

    async def scenario() -> None:
        async with running(drv, sink):
            await wait_for(
                lambda: "connected" in (state(drv, a.address), state(drv, b.address)), 20, "one link"
            )
            # The other one waits once it has been heard advertising (later on a loaded machine);
            # both connected would never match and time out.
            await wait_for(
                lambda: {state(drv, a.address), state(drv, b.address)} == {"connected", "waiting_slot"},
                20,
                "one link and one device waiting for a slot",
            )
            holder = a if state(drv, a.address) == "connected" else b
            waiter = b if holder is a else a
            first.append(waiter.address)
            await asyncio.to_thread(holder.power_off)
            await wait_for(
                lambda: state(drv, waiter.address) == "connected", 20, "the waiter to get the slot"
            )

    asyncio.run(scenario())
    waits = [d for d in sink.diagnostics if d.detail.get("state") == "waiting_slot"]
    assert waits
    assert {"slots_used": 1, "slots": 1}.items() <= dict(waits[0].detail).items()
    assert testbed.count("connect", first[0]) == 1  # never tried before a slot was free


def _first_value_after(sink: RecordingSink, address: str, t: float) -> float | None:
    return next((s.t_mono for s in sink.samples if s.stream.device == address and s.t_mono > t), None)


def delivered_after(sink: RecordingSink, address: str, t: float) -> bool:
    return _first_value_after(sink, address, t) is not None


def not_connected(drv: BleDriver, address: str) -> bool:
    return state(drv, address) != "connected"


def slot_rotation(
    testbed: Testbed, wearables: Callable[..., WearableProcess], rounds: int, turn_s: float
) -> tuple[list[float], RecordingSink, list[str]]:
    """Three wearables, two slots: one at a time leaves and returns; time to its first value back."""
    ws = [wearables("hr", rate=10), wearables("plx", rate=10), wearables("thermo", rate=10)]
    addresses = [w.address for w in ws]
    drv = driver(
        [{"address": w.address, "profile": p} for w, p in zip(ws, ("hr", "plx", "thermo"), strict=True)],
        slots=2,
        slot_turn_s=turn_s,
        lost_after_s=1.0,
    )
    sink = RecordingSink(blocks=False)
    back: list[float] = []

    async def scenario() -> None:
        async with running(drv, sink):
            await wait_for(lambda: "waiting_slot" in {state(drv, a) for a in addresses}, 20, "a waiter")
            waiter = next(a for a in addresses if state(drv, a) == "waiting_slot")
            await wait_for(
                lambda: any(a.detail["cause"] == "waiting_slot" for a in sink.alarms), 20, "its alarm"
            )
            assert testbed.count("connect", waiter) == 0  # reported as waiting, not as failing
            for k in range(rounds):
                leaver = next(a for a in addresses if state(drv, a) == "connected")
                await asyncio.to_thread(testbed.set_in_range, leaver, False)
                await wait_for(functools.partial(not_connected, drv, leaver), 20, "the link to drop")
                await asyncio.sleep(1.5)  # long enough for its lost alarm and for the slot to go
                t_in = time.monotonic()
                await asyncio.to_thread(testbed.set_in_range, leaver, True)
                await wait_for(
                    functools.partial(delivered_after, sink, leaver, t_in),
                    turn_s + 6,
                    f"round {k}: data from the returning wearable",
                )
                first = _first_value_after(sink, leaver, t_in)
                assert first is not None
                back.append(first - t_in)
            # every wearable had its turn: all delivered values in the last few turns
            t = time.monotonic()
            await wait_for(
                lambda: all(_first_value_after(sink, a, t) is not None for a in addresses),
                3 * turn_s + 6,
                "every wearable to deliver again",
            )

    asyncio.run(scenario())
    return back, sink, addresses


def test_a_returning_wearable_gets_a_slot_in_bounded_time_with_fewer_slots_than_wearables(
    testbed: Testbed, wearables: Callable[..., WearableProcess]
) -> None:
    turn_s = 1.5
    back, sink, _ = slot_rotation(testbed, wearables, 2, turn_s)
    print(
        f"\nBLE, 3 wearables on 2 slots, turn {turn_s:g} s: first value {min(back):.2f}-{max(back):.2f} s after return"
    )
    assert max(back) < turn_s + 4.0, back
    causes = {str(a.detail["cause"]) for a in sink.alarms_of(AlarmKind.SENSOR_LOST)}
    assert "connect_failed" not in causes  # nobody failed: they were away or waiting
    assert {"out_of_range", "waiting_slot"} <= causes


@pytest.mark.campaign
def test_wearables_leaving_and_returning_campaign(
    testbed: Testbed, wearables: Callable[..., WearableProcess]
) -> None:
    turn_s = 5.0
    back, sink, _ = slot_rotation(testbed, wearables, 12, turn_s)
    print(f"\nBLE campaign, 12 returns, turn {turn_s:g} s: first value {min(back):.2f}-{max(back):.2f} s")
    assert max(back) < turn_s + 4.0, back
    assert "connect_failed" not in {str(a.detail["cause"]) for a in sink.alarms_of(AlarmKind.SENSOR_LOST)}


# -- injected BlueZ errors ---------------------------------------------------------------------------


def test_in_progress_is_cleared_by_removing_the_device(
    testbed: Testbed, wearables: Callable[..., WearableProcess]
) -> None:
    w = wearables("hr", rate=10)
    # Stale BlueZ state: every Connect says InProgress until the device is removed.
    testbed.inject_connect_fault(w.address, "org.bluez.Error.InProgress", "In Progress", count=0)
    drv = driver([{"address": w.address, "profile": "hr"}])
    sink = RecordingSink(blocks=False)

    async def scenario() -> None:
        async with running(drv, sink):
            await wait_for(lambda: len(sink.of(w.address, HR)) >= 2, 20, "heart rates after recovery")

    asyncio.run(scenario())
    assert testbed.count("remove", w.address) == 1
    assert testbed.count("connect", w.address) == 2
    assert drv.status()[w.address].attempts == 2


def test_failed_connects_make_bounded_attempts_per_cycle(
    testbed: Testbed, wearables: Callable[..., WearableProcess]
) -> None:
    w = wearables("hr", rate=10)
    testbed.inject_connect_fault(
        w.address, "org.bluez.Error.Failed", "Software caused connection abort", count=1000
    )
    drv = driver(
        [{"address": w.address, "profile": "hr"}],
        max_connect_attempts=3,
        connect_budget_s=5.0,
        reconnect_min_s=0.5,
    )
    sink = RecordingSink(blocks=False)
    seen: dict[str, Any] = {}

    async def scenario() -> None:
        async with running(drv, sink):
            await wait_for(lambda: drv.manager.devices[w.address].cycles_failed >= 1, 20, "a failed cycle")
            seen["connects"] = await asyncio.to_thread(testbed.count, "connect", w.address)
            seen["error"] = drv.status()[w.address].last_error
            await asyncio.to_thread(testbed.clear_faults, w.address)
            await wait_for(lambda: len(sink.of(w.address, HR)) >= 2, 20, "heart rates once BlueZ behaves")

    asyncio.run(scenario())
    assert seen["connects"] == 3
    assert seen["error"] == "failed"
    backoffs = [d for d in sink.diagnostics if d.detail.get("state") == "backoff"]
    assert backoffs
    assert backoffs[0].detail["attempts"] == 3


@pytest.mark.parametrize(
    ("message", "delay_s"),
    [
        ("hung", 3.0),  # BlueZ answers Connect only after 3 s
        # Answered at once, but bleak then waits for a Connected change that never comes.
        ("le-connection-abort-by-local", 0.0),
    ],
)
def test_connect_timeouts_are_bounded_in_total_time(
    testbed: Testbed, wearables: Callable[..., WearableProcess], message: str, delay_s: float
) -> None:
    w = wearables("hr", rate=10)
    # The budget allows 0.3 s per attempt and 1 s per cycle.
    testbed.inject_connect_fault(w.address, "org.bluez.Error.Failed", message, count=1000, delay_s=delay_s)
    drv = driver(
        [{"address": w.address, "profile": "hr"}],
        connect_timeout_s=0.3,
        max_connect_attempts=10,
        connect_budget_s=1.0,
        reconnect_min_s=5.0,
        reconnect_max_s=5.0,
    )
    sink = RecordingSink(blocks=False)

    async def scenario() -> None:
        async with running(drv, sink):
            await wait_for(lambda: drv.manager.devices[w.address].cycles_failed >= 1, 20, "a failed cycle")

    asyncio.run(scenario())
    testbed.clear_faults(w.address)
    changes = [(d.t_wall, d.detail["state"]) for d in sink.diagnostics]
    t_connecting = next(t for t, s in changes if s == "connecting")
    t_backoff = next(t for t, s in changes if s == "backoff")
    assert t_backoff - t_connecting <= 1.0 + 0.35  # the budget, plus at most one attempt's overrun
    dev = drv.manager.devices[w.address]
    assert 2 <= dev.attempts <= 4
    assert dev.last_error == "timeout"


def test_scan_watchdog_restarts_a_scan_gone_quiet(
    testbed: Testbed, wearables: Callable[..., WearableProcess]
) -> None:
    w = wearables("hr", rate=10)
    drv = driver([{"address": w.address, "profile": "hr"}], scan_watchdog_s=0.4)
    sink = RecordingSink(blocks=False)

    async def scenario() -> None:
        async with running(drv, sink):
            await wait_for(lambda: len(sink.of(w.address, HR)) >= 2, 20, "heart rates")
            restarts = drv.manager.watchdog.restarts
            # The scan stops reporting without an error, then the link drops: the device can
            # only be heard again once the scan is restarted.
            await asyncio.to_thread(testbed.silence_scan, True)
            await asyncio.to_thread(testbed.drop_link, w.address)
            await wait_for(lambda: drv.manager.watchdog.restarts > restarts, 20, "a scan restart")
            await wait_for(lambda: drv.status()[w.address].connections == 2, 20, "the reconnection")

    asyncio.run(scenario())
    assert not sink.alarms_of(AlarmKind.SENSOR_LOST)


# -- MIT-BIH record 100 --------------------------------------------------------------------------------

MITDB = DATA / "physio" / "mitdb_100"


@pytest.mark.skipif(
    not (MITDB / "100.atr").is_file(), reason=f"MIT-BIH record 100 not found under {DATA} (set EDGETWIN_DATA)"
)
def test_strap_replays_mit_bih_record_100_with_its_ectopic_beats(
    testbed: Testbed, wearables: Callable[..., WearableProcess]
) -> None:
    # 200 simulated seconds per second, so the record's premature beats come by quickly.
    w = wearables("hr", rate=200, data=MITDB)
    drv = driver([{"address": w.address, "profile": "hr"}])
    sink = RecordingSink(blocks=False)
    beats = load_record_beats(MITDB)
    ectopic = [i for i, b in enumerate(beats) if b.symbol != "N"]
    expected = [round(b.rr_ms * 1024 / 1000) * 125 / 128 for b in beats]

    def joined() -> int | None:
        got = [s.value for s in sink.of(w.address, RR)]
        return (
            next((i for i in range(len(beats) - 8) if expected[i : i + 8] == got[:8]), None)
            if len(got) >= 8
            else None
        )

    def past_an_ectopic_beat() -> bool:
        start = joined()
        n = len(sink.of(w.address, RR))
        return start is not None and any(start <= i < start + n for i in ectopic)

    async def scenario() -> None:
        async with running(drv, sink):
            await wait_for(past_an_ectopic_beat, 10, "an ectopic beat of record 100")

    asyncio.run(scenario())
    got = [s.value for s in sink.of(w.address, RR)]
    start = joined()
    assert start is not None
    # The gateway joined the record where the strap was; from there on every interval is the record's.
    assert got == expected[start : start + len(got)]
    covered = [beats[i].symbol for i in range(start, start + len(got))]
    assert set(covered) & {"A", "V"}


def test_factory_refuses_an_industrial_source() -> None:
    cfg = BleConfig.model_validate({"devices": [{"address": "C0:FF:EE:00:00:01", "profile": "hr"}]})
    with pytest.raises(ConfigError, match="medical"):
        factory(SourceInfo("x", "plant", "industrial"), cfg)


def test_demo_radio_brings_one_streaming_strap() -> None:
    from drivers.ble.testbed.harness import demo_radio  # noqa: PLC0415 - this test starts its own radio

    with demo_radio("patient-demo") as table:
        cfg = BleConfig.model_validate(
            {k: v for k, v in table.items() if k not in ("name", "driver", "subject", "kind")}
        )
        drv = factory(SourceInfo(table["name"], table["subject"], table["kind"]), cfg)
        sink = RecordingSink(blocks=False)

        async def scenario() -> None:
            async with running(drv, sink):
                await wait_for(lambda: len(sink.of("C2:00:00:00:00:01", HR)) >= 1, 20, "a heart rate")

        asyncio.run(scenario())
    assert sink.samples[0].stream.subject == "patient-demo"
