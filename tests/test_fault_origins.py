"""Faults of one stream from different origins are different conditions: each ends only its own.

A stream's ``sensor_fault`` comes from three judges: the device's own sample flags (``quality``,
the windower), a plausibility rule of the gateway (``rule``: the sample check, or a model's window
check with its ``model``) and the driver's report on its device (``status``, ``cause``).  One
ending names its origin, and the gateway's alarm ledger (what ``edgetwin status`` lists) and the
twin's view end the condition of that origin only: the others on the stream stay on; the view
names each one's origin in words.
Here a real pipeline and outbox judge the samples, and the twin's view folds the decoded records.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

from test_alarm_source_removed import BED7, SPO2, WALL, Site, config, spo2

from gateway.alarms.ledger import FILE_NAME, AlarmLedger
from gateway.contracts import Alarm, AlarmKind, Lane
from gateway.outbox import AsyncOutbox, Leased, Outbox
from gateway.records import fault_origin as origin
from gateway.runtime import Pipeline
from gateway.sample import Quality
from gateway.twin.decoder import decode_message
from gateway.twin.view import TwinView

OFF = int(Quality.SENSOR_OFF)


def run(tmp: Path, site: Site, *, driver_fault: bool) -> list[list[str]]:
    """Bed 7's SpO2 implausible (30 %), then also flagged off, then unflagged but still 30 %.

    With ``driver_fault`` the driver reports its device bad first, and the samples are all 99 %:
    a flagged stretch ends its quality fault only.  The origins on at the gateway after each part.
    """

    async def main() -> list[list[str]]:
        on: list[list[str]] = []
        async with AsyncOutbox(lambda: Outbox(tmp / "outbox.db")) as outbox:
            pipeline = Pipeline(config(tmp, BED7), site.anon, outbox)
            value = 99.0 if driver_fault else 30.0
            if driver_fault:
                pipeline.driver_alarm(
                    Alarm(
                        AlarmKind.SENSOR_FAULT, "ward3-bed7", 0.5, WALL + 0.5, SPO2, {"status": "bad_nodata"}
                    )
                )
            t = 1.0
            for flags, seconds in ((0, 5), (OFF, 5), (0, 8)):
                t = await spo2(pipeline, SPO2, value, seconds, t, flags)
                state = json.loads((tmp / "state" / FILE_NAME).read_text(encoding="utf-8"))
                on.append(sorted(origin(e["detail"]) for e in state["on"] if e["kind"] == "sensor_fault"))
            await outbox.flush()
            site.take([i for i in await outbox.lease(1000) if i.lane == Lane.ALARMS])
        return on

    return asyncio.run(main())


def test_a_quality_fault_ending_leaves_a_plausibility_fault_on(tmp_path: Path) -> None:
    site = Site(tmp_path)
    on = run(tmp_path, site, driver_fault=False)
    kinds = [(a["alarm"], origin(a.get("detail", {}))) for a in site.alarms]
    assert ("sensor_fault", "rule") in kinds
    assert ("sensor_fault", "quality") in kinds
    assert ("sensor_restored", "quality") in kinds, kinds
    assert ("sensor_restored", "rule") not in kinds, kinds  # still 30 %: implausible
    assert on == [["rule"], ["quality", "rule"], ["rule"]]
    state = site.subject("ward3-bed7")
    assert [origin(a.detail) for a in state.active.values() if a.alarm == "sensor_fault"] == ["rule"]
    assert "on: sensor_fault SpO2" in site.view.render()


def test_a_quality_fault_ending_leaves_the_drivers_fault_on(tmp_path: Path) -> None:
    site = Site(tmp_path)
    on = run(tmp_path, site, driver_fault=True)
    kinds = [(a["alarm"], origin(a.get("detail", {}))) for a in site.alarms]
    assert kinds[:1] == [("sensor_fault", "driver")]
    assert ("sensor_restored", "quality") in kinds, kinds
    assert on == [["driver"], ["driver", "quality"], ["driver"]]
    state = site.subject("ward3-bed7")
    assert [a.detail.get("status") for a in state.active.values() if a.alarm == "sensor_fault"] == [
        "bad_nodata"
    ]


def test_faults_of_two_origins_stay_two_conditions_across_a_restart(tmp_path: Path) -> None:
    path = tmp_path / FILE_NAME
    ledger = AlarmLedger(path, {"ward3-bed7": ["bed7-ox"]})
    for detail in ({"status": "bad_nodata"}, {"quality": 8}):
        ledger.note(Alarm(AlarmKind.SENSOR_FAULT, "ward3-bed7", 1.0, WALL, SPO2, detail))
    ledger.save()
    kept = AlarmLedger(path, {"ward3-bed7": ["bed7-ox"]})
    assert sorted(origin(e.detail) for e in kept.entries()) == ["driver", "quality"]
    # The windower's ending after the start ends the flags' fault only.
    kept.note(
        Alarm(
            AlarmKind.SENSOR_RESTORED, "ward3-bed7", 2.0, WALL, SPO2, {"after": "sensor_fault", "quality": 0}
        )
    )
    assert [e.detail for e in kept.entries()] == [{"status": "bad_nodata"}]


def test_the_twin_names_the_origin_of_each_fault_a_stream_holds(tmp_path: Path) -> None:
    """Implausible (30 %) and then also flagged off: two faults of SpO2, each line saying whose it is."""
    site = Site(tmp_path)

    async def main() -> list[Leased]:
        async with AsyncOutbox(lambda: Outbox(tmp_path / "outbox.db")) as outbox:
            pipeline = Pipeline(config(tmp_path, BED7), site.anon, outbox)
            t = await spo2(pipeline, SPO2, 30.0, 5, 1.0)
            await spo2(pipeline, SPO2, 30.0, 5, t, OFF)
            await outbox.flush()
            return [i for i in await outbox.lease(1000) if i.lane == Lane.ALARMS]

    view = TwinView()
    for item in asyncio.run(main()):
        msg = decode_message(f"edgetwin/v1/gw/{item.topic}", item.payload)  # as the twin reads it
        assert msg is not None
        view.update(msg)
    on = [x.strip() for x in view.render().splitlines() if x.strip().startswith("on: sensor_fault")]
    assert len(on) == 2, on
    assert on[0].startswith("on: sensor_fault SpO2 (implausible value (out of range))"), on
    assert on[1].startswith("on: sensor_fault SpO2 (flagged by the device)"), on
