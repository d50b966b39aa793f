"""A removed source's alarms end at the twin, end to end: a real ``edgetwin run``, mosquitto over TLS, the twin.

Bed 7's simulated monitor has its probe off, so its streams are in ``sensor_fault`` at the twin.
Then bed 7's source leaves the configuration, by a signed revision applied live or by a restart
onto a file without it: the twin receives the end of every one of those alarms with
``ended: source_removed`` and shows nothing on for bed 7, while bed 8 runs on.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from downlink_support import Site, applied, running, running_site, source
from uplink_support import listener, mosquitto_pki

from drivers import REGISTRY
from gateway.anonymize import Anonymizer, Pseudonymizer, load_or_create_key
from gateway.config import load
from gateway.records import AlarmRecord
from gateway.twin.listen import Listener
from gateway.uplink.certs import DemoPKI

pytestmark = pytest.mark.slow

# The probe off from 1 s on, for longer than the test: its alarms are on when the source goes.
BED7 = source("bed7-sim") + 'events = [{ kind = "sensor_off", at_s = 1.0, duration_s = 600.0 }]\n'
BED8 = source("bed8-sim", device="A4:C1:38:00:00:08")


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> DemoPKI:
    return mosquitto_pki(tmp_path_factory)


@pytest.fixture
def site(tmp_path: Path, pki: DemoPKI) -> Iterator[Site]:
    yield from running_site(tmp_path, pki, BED7 + BED8)


def bed7(site: Site) -> str:
    """Bed 7's subject pseudonym, as the twin knows it."""
    config = load(site.config, REGISTRY)
    anon = Anonymizer(Pseudonymizer(load_or_create_key(config.core.site_key_path)), time_mode="relative")
    return anon.subject_pseudonym("bed7-sim-subject")


def active(twin: Listener, gateway: str, subject: str) -> dict[Any, AlarmRecord]:
    gw = twin.view.gateways.get(gateway)
    state = gw.subjects.get(subject) if gw is not None else None
    return {} if state is None else dict(state.active)


def endings(twin: Listener, subject: str) -> list[AlarmRecord]:
    return [
        m.record
        for m in twin.records()
        if isinstance(m.record, AlarmRecord) and m.record.subject == subject and "ended" in m.record.detail
    ]


def on_at_the_twin(site: Site, twin: Listener) -> tuple[str, dict[Any, AlarmRecord]]:
    """Start the gateway; bed 7's conditions once the twin shows them on."""
    subject = bed7(site)
    site.start()
    site.reported(running(site.unit("bed7-sim")), "running")
    assert twin.wait_for(lambda t: bool(active(t, site.gateway, subject)), 30), twin.view.render()
    on = active(twin, site.gateway, subject)
    assert {a.alarm for a in on.values()} <= {"sensor_fault", "device_lost", "sensor_lost"}, on
    return subject, on


def assert_ended(site: Site, twin: Listener, subject: str, on: dict[Any, AlarmRecord]) -> list[AlarmRecord]:
    assert twin.wait_for(lambda t: not active(t, site.gateway, subject), 30), twin.view.render()
    ended = endings(twin, subject)
    # Every condition that was on ended once, with the reason; the ending kinds a twin already knows.
    assert len(ended) >= len(on)
    assert {a.detail["ended"] for a in ended} == {"source_removed"}
    assert {a.alarm for a in ended} <= {"sensor_restored", "device_restored", "anomaly_cleared"}
    state = twin.view.gateways[site.gateway].subjects[subject]
    assert state.last_alarm is not None
    assert state.last_alarm.detail["ended"] == "source_removed"
    assert "ended: source_removed" in twin.view.render()
    return ended


def test_a_revision_that_removes_a_source_ends_its_alarms_at_the_twin(site: Site, pki: DemoPKI) -> None:
    twin = listener(site.broker, pki)
    try:
        subject, on = on_at_the_twin(site, twin)
        site.publish(site.envelope(1, BED8))
        site.reported(applied(1), "applied")
        assert_ended(site, twin, subject, on)
        # Bed 8 runs on, its windows still arriving.
        site.reported(running(site.unit("bed8-sim")), "bed 8 running")
    finally:
        twin.stop()


def test_a_restart_without_the_source_ends_the_alarms_it_left_on(site: Site, pki: DemoPKI) -> None:
    twin = listener(site.broker, pki)
    try:
        subject, on = on_at_the_twin(site, twin)
        first_run = next(iter(on.values())).run
        site.stop()
        assert active(twin, site.gateway, subject)  # an orderly stop ends nothing: still on
        site.config.write_text(site.text(BED8))
        site.start()
        ended = assert_ended(site, twin, subject, on)
        assert {a.run for a in ended} == {first_run + 1}  # sent by the new run, at its start
    finally:
        twin.stop()
