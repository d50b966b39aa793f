"""A source removed or changed while its alarms are on: every one of them is ended, saying why.

The pipeline's own path (a real outbox, the anonymizer, the twin's view of the decoded records):
live, as a config revision retires a source, and across a restart whose configuration lost it.
The same through a real ``edgetwin run``, broker and twin: tests/test_alarm_source_removed_e2e.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import pytest

from drivers import REGISTRY
from gateway.alarms.ledger import FILE_NAME, AlarmLedger
from gateway.anonymize import Anonymizer, Pseudonymizer
from gateway.config import Config, validate
from gateway.contracts import Alarm, AlarmKind, AlarmPriority, Lane
from gateway.outbox import AsyncOutbox, Outbox
from gateway.records import AlarmRecord, as_map, decode
from gateway.runtime import Pipeline
from gateway.sample import MDC, Metric, SampleBlock, Stream
from gateway.twin.decoder import TwinMessage
from gateway.twin.view import TwinView

WALL = 1.7e9
D = TypeVar("D")
SPO2 = Stream("bed7-ox", "ward3-bed7", "00:1C:05:AA:BB:07", MDC["MDC_PULS_OXIM_SAT_O2"], rate_hz=1.0)
SPO2_9 = Stream("bed9-ox", "ward3-bed9", "00:1C:05:AA:BB:09", MDC["MDC_PULS_OXIM_SAT_O2"], rate_hz=1.0)


def source(name: str, subject: str, device: str) -> dict[str, Any]:
    """A source whose device (a node named ``device``) says which streams it has only once it runs.

    The tests feed streams of their own choosing; a source that declares its streams in its
    configuration (a simulator's profile) would have those outside it ended at a restart.
    """
    return {"name": name, "driver": "mcu", "subject": subject, "simulate": {"node_id": device}}


BED7 = source("bed7-ox", "ward3-bed7", "00:1C:05:AA:BB:07")
BED9 = source("bed9-ox", "ward3-bed9", "00:1C:05:AA:BB:09")


def config(tmp: Path, *sources: dict[str, Any], ectopy: bool = False, **sections: Any) -> Config:
    raw = {
        "gateway": {"state_dir": str(tmp / "state")},
        "pipeline": {"window_s": 4.0, "hop_s": 1.0, "grace_s": 0.0},
        "models": {"ectopy": ectopy, "streams": {"enabled": False}},
        **sections,
        "sources": list(sources),
    }
    return validate(raw, "<test>", REGISTRY)


class Site:
    """One pipeline over a real outbox; what it queued, decoded, and the twin's view of it."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.view = TwinView()
        self.alarms: list[dict[str, Any]] = []
        self.anon = Anonymizer(Pseudonymizer(b"s" * 32), time_mode="relative", start_wall=WALL)

    def take(self, items: list[Any]) -> None:
        for item in items:
            if item.lane != Lane.ALARMS:
                continue
            rec = decode(item.payload)
            assert isinstance(rec, AlarmRecord)
            self.alarms.append(as_map(rec))
            self.view.update(TwinMessage("gw", item.topic, "alarm", rec))

    def subject(self, raw: str) -> Any:
        return self.view.gateways["gw"].subjects[self.anon.subject_pseudonym(raw)]

    def restart(
        self, cfg: Config, kind: type[D], done: Callable[[D], bool], what: str
    ) -> list[dict[str, Any]]:
        """:meth:`start` in an event loop of its own."""
        return asyncio.run(self.start(cfg, kind, done, what))

    async def start(
        self, cfg: Config, kind: type[D], done: Callable[[D], bool], what: str, *, sent: int = 0
    ) -> list[dict[str, Any]]:
        """One start of the gateway: a fresh driver of ``cfg``'s only source until ``done(driver)``; the alarms sent.

        ``sent``: also until the pipeline has queued that many alarms.
        """
        (entry,) = cfg.sources
        drv = REGISTRY[entry.driver].factory(entry.info, entry.config)
        assert isinstance(drv, kind)
        before = len(self.alarms)
        async with AsyncOutbox(lambda: Outbox(self.tmp / "outbox.db")) as outbox:
            pipeline = Pipeline(cfg, self.anon, outbox)
            await pipeline.end_vanished()
            task = asyncio.create_task(drv.run(pipeline.sink, started=lambda: None), name="test:driver")
            try:
                deadline = time.monotonic() + 20.0
                while not (done(drv) and pipeline.submitted[Lane.ALARMS] >= sent):
                    assert not task.done(), f"the driver stopped before {what}: {task.exception()!r}"
                    assert time.monotonic() < deadline, f"timed out after 20 s waiting for {what}"
                    await asyncio.sleep(0.02)
            finally:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            await pipeline.step()  # which keeps the conditions on for the next start
            await outbox.flush()
            items = await outbox.lease(1000)
            self.take(items)
            await outbox.ack([i.id for i in items])
        return self.alarms[before:]


async def spo2(
    pipeline: Pipeline, stream: Stream, value: float, seconds: int, t0: float, flags: int = 0
) -> float:
    """``seconds`` of SpO2 at ``value`` (with quality ``flags``), one sample a second from ``t0``; the time after."""
    for k in range(seconds):
        t = np.array([t0 + k])
        pipeline.sink.put_block(
            SampleBlock(stream, t, t + WALL, np.array([value]), np.full(1, flags, np.uint8))
        )
        await pipeline.step(now_mono=t0 + k + 1.0, now_wall=WALL + t0 + k + 1.0)
    return t0 + seconds


def test_a_revision_that_removes_a_source_ends_its_alarms_and_a_restart_ends_the_rest(tmp_path: Path) -> None:
    site = Site(tmp_path)
    both = config(tmp_path, BED7, BED9)

    async def first_run() -> None:
        async with AsyncOutbox(lambda: Outbox(tmp_path / "outbox.db")) as outbox:
            pipeline = Pipeline(both, site.anon, outbox)
            t = await spo2(pipeline, SPO2, 86.0, 12, 100.0)  # below 90 % for over 10 s: a limit alarm
            await spo2(pipeline, SPO2_9, 84.0, 12, 100.0)
            # An anomaly episode of bed7 raised by some model, as the pipeline sends it.
            pipeline.alarm(Alarm(AlarmKind.ANOMALY, "ward3-bed7", t, WALL + t, detail={"model": "vitals"}))
            await outbox.flush()
            site.take(await outbox.lease(1000))
            assert len(site.subject("ward3-bed7").active) == 2
            # The revision: bed7's source is gone (bed9's stays, and stays on).
            await pipeline.retire_source("bed7-ox", config(tmp_path, BED9), t, WALL + t)
            await outbox.flush()
            site.take(await outbox.lease(1000))
            # Its streams ended by the configuration: silence is not a lost sensor (bed 9 stays low).
            await spo2(pipeline, SPO2_9, 84.0, 20, t)
            await outbox.flush()
            items = await outbox.lease(1000)
            assert [i for i in items if i.lane == Lane.ALARMS] == []
            await outbox.ack([i.id for i in items])

    asyncio.run(first_run())
    ended = [a for a in site.alarms if a["detail"].get("ended")]
    assert sorted((a["alarm"], a["detail"]["ended"]) for a in ended) == [
        ("anomaly_cleared", "source_removed"),
        ("limit_cleared", "source_removed"),
    ]
    limit = next(a for a in ended if a["alarm"] == "limit_cleared")
    assert limit["metric"] == "MDC_PULS_OXIM_SAT_O2"
    assert limit["detail"]["level"] in {"low", "low_low"}
    assert "priority" not in limit
    assert next(a for a in ended if a["alarm"] == "anomaly_cleared")["detail"]["model"] == "vitals"
    assert site.subject("ward3-bed7").active == {}  # the twin shows nothing on for bed 7
    assert len(site.subject("ward3-bed9").active) == 1  # bed 9's limit alarm is still on
    # The ledger on disk holds bed 9's alarm only.
    ledger = json.loads((tmp_path / "state" / FILE_NAME).read_text())
    assert [e["subject"] for e in ledger["on"]] == ["ward3-bed9"]

    # A restart whose configuration no longer has bed 9's source (renamed): its alarm ends at start.
    renamed = config(tmp_path, source("bed9-spo2", "ward3-bed9", "00:1C:05:AA:BB:09"))

    async def second_run() -> None:
        async with AsyncOutbox(lambda: Outbox(tmp_path / "outbox.db")) as outbox:
            pipeline = Pipeline(renamed, site.anon, outbox)
            await pipeline.end_vanished(200.0, WALL + 200.0)
            site.take(await outbox.lease(1000))

    asyncio.run(second_run())
    last = site.alarms[-1]
    assert (last["alarm"], last["detail"]["ended"]) == ("limit_cleared", "source_removed")
    assert site.subject("ward3-bed9").active == {}
    assert json.loads((tmp_path / "state" / FILE_NAME).read_text())["on"] == []


def test_a_changed_source_ends_its_alarms_and_raises_them_again_if_they_hold(tmp_path: Path) -> None:
    site = Site(tmp_path)
    cfg = config(tmp_path, BED7)

    async def main() -> None:
        async with AsyncOutbox(lambda: Outbox(tmp_path / "outbox.db")) as outbox:
            pipeline = Pipeline(cfg, site.anon, outbox)
            t = await spo2(pipeline, SPO2, 86.0, 12, 100.0)
            await pipeline.retire_source("bed7-ox", cfg, t, WALL + t)  # restarted with other settings
            await spo2(pipeline, SPO2, 86.0, 12, t)  # still low under the new settings
            await outbox.flush()
            site.take(await outbox.lease(1000))

    asyncio.run(main())
    kinds = [(a["alarm"], a["detail"].get("ended")) for a in site.alarms]
    assert kinds == [("limit", None), ("limit_cleared", "source_changed"), ("limit", None)]
    assert len(site.subject("ward3-bed7").active) == 1


def test_a_low_estimate_ended_with_its_changed_source_is_raised_again_while_it_holds(tmp_path: Path) -> None:
    site = Site(tmp_path)
    level = Stream(
        "bed7-ox", "ward3-bed7", "00:1C:05:AA:BB:07", Metric("MDC_ATTR_VAL_BATT_CHARGE", "%"), on_change=True
    )
    battery = {
        "battery": [{"subject": "ward3-bed7", "level": level.metric.name, "low_soc": 20.0, "every_s": 0.001}]
    }
    cfg = config(tmp_path, BED7, estimators=battery)

    async def charge(pipeline: Pipeline, t0: float, value: float) -> None:
        t = np.array([t0])
        pipeline.sink.put_block(SampleBlock(level, t, t + WALL, np.array([value]), np.zeros(1, np.uint8)))
        await pipeline.step(now_mono=t0 + 1.0, now_wall=WALL + t0 + 1.0)

    async def main() -> None:
        async with AsyncOutbox(lambda: Outbox(tmp_path / "outbox.db")) as outbox:
            pipeline = Pipeline(cfg, site.anon, outbox)
            await charge(pipeline, 100.0, 12.0)
            await pipeline.retire_source("bed7-ox", cfg, 200.0, WALL + 200.0)  # restarted, other settings
            await charge(pipeline, 300.0, 11.0)  # still low: the twin must see it on again
            await outbox.flush()
            site.take(await outbox.lease(1000))

    asyncio.run(main())
    kinds = [(a["alarm"], a["detail"].get("estimate"), a["detail"].get("ended")) for a in site.alarms]
    assert kinds == [
        ("limit", "soc", None),
        ("limit_cleared", "soc", "source_changed"),
        ("limit", "soc", None),
    ]
    assert len(site.subject("ward3-bed7").active) == 1


def test_an_unreadable_ledger_is_set_aside(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / FILE_NAME
    path.write_text("{not json", encoding="utf-8")
    ledger = AlarmLedger(path, {})
    assert len(ledger) == 0
    assert (tmp_path / "alarms.corrupt").exists()
    assert not path.exists()
    # What is lost with it, said once: every condition on, not only a removed source's.
    (said,) = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert "the alarms on before this start are unknown: one that ended while the gateway was down" in said


def test_a_ledger_entry_with_an_unknown_priority_sets_the_ledger_aside(tmp_path: Path) -> None:
    """As any other malformed entry: set aside at the load, not a crash when it is raised again."""
    path = tmp_path / FILE_NAME
    ledger = AlarmLedger(path, {"ward3-bed7": ["bed7-ox"]})
    ledger.note(
        Alarm(AlarmKind.LIMIT, "ward3-bed7", 1.0, WALL, SPO2, {"level": "low"}, priority=AlarmPriority.HIGH)
    )
    ledger.save()
    assert [e.raising(2.0, WALL).priority for e in AlarmLedger(path, {}).entries()] == [AlarmPriority.HIGH]
    raw = json.loads(path.read_text(encoding="utf-8"))
    raw["on"][0]["priority"] = "urgent"
    path.write_text(json.dumps(raw), encoding="utf-8")
    assert AlarmLedger(path, {}).entries() == []
    assert (tmp_path / "alarms.corrupt").exists()


def test_an_escalated_limit_alarm_ends_at_the_level_it_reached(tmp_path: Path) -> None:
    ledger = AlarmLedger(tmp_path / FILE_NAME, {"ward3-bed7": ["bed7-ox"]})
    for level in ("low", "low_low"):
        ledger.note(Alarm(AlarmKind.LIMIT, "ward3-bed7", 1.0, WALL, SPO2, {"level": level}))
    assert len(ledger) == 1  # one condition, escalated
    (ending,) = ledger.end_source("bed7-ox", [], 2.0, WALL + 2.0)
    assert ending.kind is AlarmKind.LIMIT_CLEARED
    assert dict(ending.detail) == {"level": "low_low", "ended": "source_removed"}
    assert ledger.end_source("bed7-ox", [], 3.0, WALL + 3.0) == []


def retired_by(tmp: Path, revised: dict[str, Any]) -> list[tuple[str, str | None]]:
    """Bed 7's alarms when a revision replaces its source by ``revised`` while its SpO2 alarm is on."""
    site = Site(tmp)

    async def main() -> None:
        async with AsyncOutbox(lambda: Outbox(tmp / "outbox.db")) as outbox:
            pipeline = Pipeline(config(tmp, BED7), site.anon, outbox)
            t = await spo2(pipeline, SPO2, 86.0, 12, 100.0)
            await pipeline.retire_source("bed7-ox", config(tmp, revised), t, WALL + t)
            await outbox.flush()
            site.take(await outbox.lease(1000))

    asyncio.run(main())
    return [(a["alarm"], a["detail"].get("ended")) for a in site.alarms]


def test_a_source_disabled_or_moved_to_another_subject_is_removed_for_its_old_one(tmp_path: Path) -> None:
    removed = [("limit", None), ("limit_cleared", "source_removed")]
    assert retired_by(tmp_path / "disabled", BED7 | {"enabled": False}) == removed
    assert retired_by(tmp_path / "moved", BED7 | {"subject": "ward3-bed12"}) == removed
