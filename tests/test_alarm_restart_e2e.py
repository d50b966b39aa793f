"""An alarm left on by a stop is judged after the restart, end to end: `edgetwin run`, mosquitto, the twin.

Bed 7's simulated monitor has its probe off, so its streams are in ``sensor_fault`` at the twin.
The gateway stops and starts again with the probe still off: the twin receives nothing new.  It
stops once more and starts with the probe back on: the twin receives the ordinary restores (no
``ended`` reason) from the new run and shows nothing on for bed 7.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from downlink_support import Site, anew, running, running_site, source
from test_alarm_source_removed_e2e import active, bed7, on_at_the_twin
from uplink_support import listener, mosquitto_pki

from gateway.records import AlarmRecord
from gateway.twin.listen import Listener
from gateway.uplink.certs import DemoPKI

pytestmark = pytest.mark.slow

BED7_ON = source("bed7-sim")
BED7_OFF = BED7_ON + 'events = [{ kind = "sensor_off", at_s = 0.0, duration_s = 600.0 }]\n'
# The monitor sends for 2 s, then nothing (unplugged) for longer than the test.
BED7_GONE = BED7_ON + 'events = [{ kind = "disconnect", at_s = 2.0, duration_s = 600.0 }]\n'
# A start as slow as on a loaded two-core machine (seconds of imports before the run is counted).
SLOW_START = "import time\ntime.sleep(8.0)\n"


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> DemoPKI:
    return mosquitto_pki(tmp_path_factory)


@pytest.fixture
def site(tmp_path: Path, pki: DemoPKI) -> Iterator[Site]:
    yield from running_site(tmp_path, pki, BED7_OFF)


def alarms_of_run(twin: Listener, subject: str, run: int) -> list[AlarmRecord]:
    return [
        m.record
        for m in twin.records()
        if isinstance(m.record, AlarmRecord) and m.record.subject == subject and m.record.run == run
    ]


def restart(site: Site, sources: str) -> None:
    """Stop the gateway and start it with ``sources``; back once the new process reports bed 7 running."""
    before = site.retained()
    site.stop()
    site.config.write_text(site.text(sources))
    site.start()
    site.reported(anew(before, running(site.unit("bed7-sim"))), "running after the restart")


def test_a_restart_is_over_once_the_new_process_runs(site: Site, tmp_path: Path) -> None:
    """The last process's retained reported state is no sign that the new one runs (nor counted its run)."""
    site.start()
    site.reported(running(site.unit("bed7-sim")), "running")
    timebase = site.tmp / "state" / "timebase.json"
    first_run = json.loads(timebase.read_text())["boot"]
    hook = tmp_path / "slow-start"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(SLOW_START)
    site.env = {"PYTHONPATH": f"{hook}:{Path(__file__).resolve().parents[1]}"}
    restart(site, BED7_OFF)
    assert json.loads(timebase.read_text())["boot"] == first_run + 1


def test_a_probe_back_on_after_a_restart_ends_the_alarms_it_left_on(site: Site, pki: DemoPKI) -> None:
    twin = listener(site.broker, pki)
    try:
        subject, on = on_at_the_twin(site, twin)
        first_run = next(iter(on.values())).run

        restart(site, BED7_OFF)  # the probe still off
        time.sleep(5.0)  # well past the restore delay and the loss timeout: time to resend, if it did
        assert alarms_of_run(twin, subject, first_run + 1) == []  # no second raise, no clear
        assert active(twin, site.gateway, subject).keys() == on.keys()

        restart(site, BED7_ON)  # the probe back on
        assert twin.wait_for(lambda t: not active(t, site.gateway, subject), 30), twin.view.render()
        restored = alarms_of_run(twin, subject, first_run + 2)
        assert {a.alarm for a in restored} == {"sensor_restored"}
        assert len(restored) == len(on)
        assert all("ended" not in a.detail and a.detail["after"] == "sensor_fault" for a in restored)
    finally:
        twin.stop()


def test_a_monitor_plugged_back_in_while_the_gateway_was_down_is_restored_after_the_restart(
    site: Site, pki: DemoPKI
) -> None:
    twin = listener(site.broker, pki)
    try:
        restart(site, BED7_GONE)
        subject = bed7(site)

        def lost(t: Listener) -> bool:
            return "device_lost" in {a.alarm for a in active(t, site.gateway, subject).values()}

        assert twin.wait_for(lost, 30), twin.view.render()
        time.sleep(1.0)  # a slower stream (RR intervals) may be reported lost on its own first
        site.stop()
        on = active(twin, site.gateway, subject)
        assert {a.alarm for a in on.values()} <= {"device_lost", "sensor_lost"}, on
        first_run = next(iter(on.values())).run

        restart(site, BED7_ON)  # plugged back in while the gateway was down
        assert twin.wait_for(lambda t: not active(t, site.gateway, subject), 30), twin.view.render()
        restored = alarms_of_run(twin, subject, first_run + 1)
        assert sorted(a.alarm for a in restored) == sorted(
            "device_restored" if a.alarm == "device_lost" else "sensor_restored" for a in on.values()
        )
        assert all("ended" not in a.detail for a in restored)
    finally:
        twin.stop()


def test_a_monitor_replaced_by_another_while_the_gateway_was_down_starts_afresh(
    site: Site, pki: DemoPKI
) -> None:
    twin = listener(site.broker, pki)
    try:
        subject, on = on_at_the_twin(site, twin)  # the first monitor's probe is off
        first_run = next(iter(on.values())).run
        old_dev = {a.dev for a in on.values()}

        # Another monitor on bed 7 (its own serial number), its probe off too.
        restart(site, source("bed7-sim", device="A4:C1:38:00:00:99") + BED7_OFF[len(BED7_ON) :])

        def afresh(t: Listener) -> bool:
            now = active(t, site.gateway, subject)
            return len(now) == len(on) and not {a.dev for a in now.values()} & old_dev

        assert twin.wait_for(afresh, 30), twin.view.render()
        second = alarms_of_run(twin, subject, first_run + 1)
        ended = [a for a in second if "ended" in a.detail]
        assert sorted((a.alarm, a.detail["ended"], a.dev) for a in ended) == sorted(
            ("sensor_restored", "device_changed", a.dev) for a in on.values()
        )
        raised = [a for a in second if a.alarm == "sensor_fault"]
        assert len(raised) == len(on)  # the new monitor's own faults, raised by its own data
    finally:
        twin.stop()
