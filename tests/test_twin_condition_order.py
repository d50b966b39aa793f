"""The twin ends a condition with the ending that follows its raise, whatever the two records' times.

An alarm's record time is the time its raiser stamped it with: a driver stamps a fault's end with
the time of the sample that showed it over, and samples a device buffered over a link outage, or
a clock stepped back, can time an ending before its raise.  The gateway's sequence number (its
outbox id) is the order it queued them in; the twin's view orders a condition's alarms by it.
Two nodes of a source that never resolved (faults with no stream) are two conditions there, told
apart by the node's pseudonym (``node``), whatever their place in the source's list (``item``, all
a record of an older gateway has), as in the gateway's alarm ledger.  A limit escalated and
stepped down is one condition shown since its first raise, at the level and priority it has now.
Here the records leave a real pipeline and outbox, travel as the uplink wraps them (sequence
record, epoch, replay mark) and are decoded and folded by the twin's own decoder and view.
"""

from __future__ import annotations

import asyncio
from itertools import zip_longest
from pathlib import Path

import pytest
from test_alarm_source_removed import BED7, SPO2, WALL, Site, config, spo2

from gateway.contracts import Alarm, AlarmKind, Lane, Node
from gateway.outbox import AsyncOutbox, Leased, Outbox
from gateway.records import SeqMeta, wrap
from gateway.records.render import number
from gateway.runtime import Pipeline
from gateway.sample import Stream
from gateway.twin.decoder import decode_messages
from gateway.twin.view import TwinView

BAD: dict[str, float | str] = {"status": "bad_nodeidunknown"}
GOOD: dict[str, float | str] = {"after": "sensor_fault", "status": "good"}


def alarms(
    tmp: Path,
    site: Site,
    *raised: tuple[AlarmKind, float, dict[str, float | str]],
    stream: Stream | None = SPO2,
    nodes: tuple[Node, ...] = (),
) -> list[Leased]:
    """The driver raises ``raised`` (kind, time, detail) about bed 7's SpO2 (``stream``, or ``nodes``, one each) in this order; the alarm records queued."""

    async def main() -> list[Leased]:
        async with AsyncOutbox(lambda: Outbox(tmp / "outbox.db")) as outbox:
            pipeline = Pipeline(config(tmp, BED7), site.anon, outbox)
            for (kind, t, detail), node in zip_longest(raised, nodes[: len(raised)]):
                pipeline.driver_alarm(Alarm(kind, "ward3-bed7", t, WALL + t, stream, detail, node=node))
            await outbox.flush()
            return [i for i in await outbox.lease(100) if i.lane == Lane.ALARMS]

    return asyncio.run(main())


def deliver(view: TwinView, item: Leased, *, replayed: bool = False, epoch: int = 7) -> None:
    """One record as the uplink publishes it (in outbox epoch ``epoch``) and the twin decodes it."""
    payload = wrap(item.payload, SeqMeta(item.id, epoch, replayed))
    for msg in decode_messages(f"edgetwin/v1/gw/{item.topic}", payload):
        view.update(msg)


def test_an_ending_timed_before_its_raise_ends_it(tmp_path: Path) -> None:
    site = Site(tmp_path)
    # The node's fault seen at t=200; its end stamped with the time of the first good sample, 150.
    raised, ended = alarms(
        tmp_path, site, (AlarmKind.SENSOR_FAULT, 200.0, BAD), (AlarmKind.SENSOR_RESTORED, 150.0, GOOD)
    )
    view = TwinView()
    deliver(view, raised)
    deliver(view, ended)
    state = view.gateways["gw"].subjects[site.anon.subject_pseudonym("ward3-bed7")]
    assert state.alarms == 2
    assert state.last_alarm is not None
    assert (state.last_alarm.alarm, state.last_alarm.t) == ("sensor_restored", 150.0)  # before the raise
    assert state.active == {}


def test_a_replayed_ending_of_an_earlier_condition_does_not_end_a_newer_raise(tmp_path: Path) -> None:
    site = Site(tmp_path)
    first, ended, again = alarms(
        tmp_path,
        site,
        (AlarmKind.SENSOR_FAULT, 100.0, BAD),
        (AlarmKind.SENSOR_RESTORED, 110.0, GOOD),
        (AlarmKind.SENSOR_FAULT, 120.0, BAD),
    )
    view = TwinView()
    deliver(view, first)
    deliver(view, again)  # live, ahead of the backlog
    deliver(view, ended, replayed=True)
    state = view.gateways["gw"].subjects[site.anon.subject_pseudonym("ward3-bed7")]
    (on,) = state.active.values()  # the condition the newer raise holds on stays on
    assert on.alarm == "sensor_fault"
    assert state.alarms == 3


def test_a_new_epoch_numbering_from_one_again_is_newer(tmp_path: Path) -> None:
    site = Site(tmp_path)
    old, new = tmp_path / "old", tmp_path / "new"
    old.mkdir()
    new.mkdir()
    # The old outbox had queued more alarms: its raise carries sequence number 3.
    *_, raised = alarms(
        old,
        site,
        (AlarmKind.SENSOR_FAULT, 100.0, BAD),
        (AlarmKind.SENSOR_RESTORED, 110.0, GOOD),
        (AlarmKind.SENSOR_FAULT, 120.0, BAD),
    )
    # Its state directory wiped, the gateway numbers from 1 again, in an epoch the twin sees later.
    _, ended = alarms(
        new, site, (AlarmKind.SENSOR_FAULT, 300.0, BAD), (AlarmKind.SENSOR_RESTORED, 320.0, GOOD)
    )
    assert ended.id < raised.id
    view = TwinView()
    deliver(view, raised, epoch=7)
    deliver(view, ended, epoch=8)
    state = view.gateways["gw"].subjects[site.anon.subject_pseudonym("ward3-bed7")]
    assert state.active == {}
    assert state.last_alarm is not None
    assert state.last_alarm.alarm == "sensor_restored"


PRESSURE, CURRENT = Node("bed7-ox", "Pump1/Pressure"), Node("bed7-ox", "Pump1/Current")


@pytest.mark.parametrize(
    ("nodes", "ended_at"),
    [
        # Two nodes at items 1 and 2 are absent; after a restart with the list reordered, the
        # first one appears at item 2: its ending names the place it has now, and ends its own.
        ((PRESSURE, CURRENT, PRESSURE), 2),
        # Records of an older gateway (no ``node``): told apart by item; node 1 appears.
        ((), 1),
    ],
    ids=["by-node", "older-gateway-by-item"],
)
def test_two_nodes_never_resolved_are_two_conditions_at_the_twin(
    tmp_path: Path, nodes: tuple[Node, ...], ended_at: int
) -> None:
    site = Site(tmp_path)
    records = alarms(
        tmp_path,
        site,
        (AlarmKind.SENSOR_FAULT, 100.0, {"status": "bad_nomatch", "item": 1}),
        (AlarmKind.SENSOR_FAULT, 101.0, {"status": "bad_nomatch", "item": 2}),
        (AlarmKind.SENSOR_RESTORED, 110.0, {"after": "sensor_fault", "status": "good", "item": ended_at}),
        stream=None,
        nodes=nodes,
    )
    assert len(records) == 3
    view = TwinView()
    for item in records[:2]:
        deliver(view, item)
    state = view.gateways["gw"].subjects[site.anon.subject_pseudonym("ward3-bed7")]
    raised = {a.detail["item"]: a.detail for a in state.active.values()}
    assert sorted(raised) == [1, 2]
    assert [("node" in d) for d in raised.values()] == [bool(nodes)] * 2
    assert len({d.get("node") for d in raised.values()}) == (2 if nodes else 1)
    deliver(view, records[2])
    # The first node's ending ends its fault only: the one raised at item 2 stays on.
    (on,) = state.active.values()
    assert (on.alarm, on.detail) == ("sensor_fault", raised[2])
    assert (
        "on: sensor_fault item 2 (reported by the driver: bad_nomatch), low priority since t=101"
        in view.render()
    )


def test_a_limit_escalated_and_stepped_down_shows_its_newest_level_since_its_first_raise(
    tmp_path: Path,
) -> None:
    site = Site(tmp_path)

    async def main() -> list[Leased]:
        async with AsyncOutbox(lambda: Outbox(tmp_path / "outbox.db")) as outbox:
            pipeline = Pipeline(config(tmp_path, BED7), site.anon, outbox)
            t = 100.0
            # Falling and rising no faster than the plausibility rule's 4 %/s: a real desaturation.
            for value, seconds in ((97.0, 3), (94.0, 1), (91.0, 1), (88.0, 12), (86.0, 1), (83.0, 12)):
                t = await spo2(pipeline, SPO2, value, seconds, t)  # below 90 % 10 s: L; below 85 %: LL
            t = await spo2(pipeline, SPO2, 85.5, 1, t)  # within the deadband: still LL
            await spo2(pipeline, SPO2, 88.0, 5, t)  # back above 85 % and its deadband, still below 90 %
            await outbox.flush()
            return [i for i in await outbox.lease(100) if i.lane == Lane.ALARMS]

    records = asyncio.run(main())
    view = TwinView()
    subject = site.anon.subject_pseudonym("ward3-bed7")
    shown: list[tuple[str, str | None, float | None, float]] = []
    lines: list[str] = []
    for item in records:
        deliver(view, item)
        (on,) = view.snapshot()["gw"]["subjects"][subject]["active_alarms"]  # one condition
        shown.append((on["detail"]["level"], on.get("priority"), on.get("limit"), on["t"]))
        (line,) = [x.strip() for x in view.render().splitlines() if x.strip().startswith("on: ")]
        lines.append(line)
    assert view.gateways["gw"].subjects[subject].alarms == 3
    onset = shown[0][3]
    assert shown == [
        ("low", "medium", 90.0, onset),
        ("low_low", "high", 85.0, onset),
        ("low", "medium", 90.0, onset),
    ]
    since = f"since t={number(round(onset, 1))}"
    assert lines == [
        f"on: limit SpO2 88 (limit 90) low, medium priority {since}",
        f"on: limit SpO2 83 (limit 85) low_low, high priority {since}",
        f"on: limit SpO2 88 (limit 90) low, medium priority {since}",
    ]
