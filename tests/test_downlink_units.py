"""A config revision restarts only the units it changes: a real ``edgetwin run``, the real TLS mosquitto.

A revision that changes one source restarts that source alone (the other source, the outbox and
the uplink's session run on, records without a gap); one that adds a source that cannot start
rolls back that source alone; one that changes the limit alarms retunes them in place; one that
touches a process-level section still restarts the process; one that changes the broker
connection reconnects the uplink alone.  One whose metric names hold an identity is refused; one
that renames it, applied in place, clears it from status.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from downlink_support import ROOT, SHORT_DEADLINE_S, Site, applied, new_site, running, source
from uplink_support import listener, mosquitto_pki, running_broker

from gateway.downlink.signing import sign
from gateway.uplink.certs import DemoPKI

pytestmark = pytest.mark.slow

BED9 = source("bed9-sim", device="A4:C1:38:00:00:09")
# A source on a serial port that does not exist: it never becomes healthy.
BROKEN_BED8 = """
[[sources]]
name = "bed8-sim"
driver = "serial"
subject = "bed8-sim-subject"
port = "/dev/serial/by-id/usb-FTDI_FT232R_USB_UART_SN-EDGETWIN-BED8-if00-port0"
protocol = "nonin2"
"""


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> DemoPKI:
    return mosquitto_pki(tmp_path_factory)


@pytest.fixture
def site(tmp_path: Path, pki: DemoPKI) -> Iterator[Site]:
    for broker in running_broker(tmp_path, pki):
        s = new_site(tmp_path, pki, broker)
        s.config.write_text(s.text(source("bed7-sim") + BED9))
        try:
            yield s
        finally:
            s.stop()


def _signed(site: Site, version: int, text: str) -> bytes:
    expires = dt.datetime.now(dt.UTC) + dt.timedelta(hours=1)
    return sign(text.encode(), keys=[site.key], gateway=site.gateway, version=version, expires=expires)


def _log(site: Site) -> str:
    return (site.tmp / "gateway.log").read_text()


def test_only_the_changed_units_restart_and_a_process_section_restarts_the_process(site: Site) -> None:
    twin = listener(site.broker, site.pki)
    try:
        site.start()
        assert site.proc is not None
        pid = site.proc.pid
        before = site.reported(
            lambda r: running(site.unit("bed7-sim"))(r) and running(site.unit("bed9-sim"))(r), "up"
        )
        assert before["process"]["connects"] == 1

        # 1. One source's setting changed: that source alone restarts.
        changed = source("bed7-sim") + source("bed9-sim", "pump", "SN-PLC-9")
        site.publish(site.envelope(1, changed))
        rep = site.reported(applied(1), "v1 applied")
        assert rep["applied"]["applied_by"] == "units"
        assert rep["applied"]["restarted"] == [site.unit("bed9-sim")]
        assert rep["process"] == before["process"]  # same start, the uplink's session never reconnected
        assert site.proc.pid == pid
        assert site.config.read_text() == site.text(changed)
        log = _log(site)
        assert log.count("unit source:bed7-sim started") == 1
        assert log.count("unit source:bed9-sim started") == 2
        assert "unit source:bed9-sim stopped for a config revision" in log

        # 2. A new source that cannot start: rolled back alone, the others untouched.
        site.publish(site.envelope(2, changed + BROKEN_BED8, deadline_s=SHORT_DEADLINE_S))
        rep = site.reported(lambda r: (r.get("last_rollback") or {}).get("version") == 2, "v2 rolled back")
        assert rep["last_rollback"]["reason"] == "unhealthy"
        assert rep["last_rollback"]["units"] == [site.unit("bed8-sim")]
        assert rep["applied"]["version"] == 1
        assert site.config.read_text() == site.text(changed)
        rep = site.reported(
            lambda r: site.unit("bed8-sim") not in r["units"] and r["phase"] == "running", "bed8 gone"
        )
        assert rep["process"] == before["process"]
        assert [e["event"] for e in site.events()[-4:]] == ["received", "verified", "applying", "rolled-back"]
        log = _log(site)
        assert log.count("unit source:bed7-sim started") == 1
        assert log.count("unit source:bed9-sim started") == 2
        # bed7 ran throughout (started once, above), and no record of the gateway is missing.
        wanted = twin.records_received + 5
        assert twin.wait_for(lambda t: t.records_received > wanted, 20), "records after the revisions"
        (state,) = twin.checker.gateways.values()
        assert state.missing == 0, state.summary()

        # 3. Limit alarms and [status] changed: alarms retuned, the control socket's unit restarted.
        alarms = (
            "\n[alarms.limits.MDC_PULS_OXIM_SAT_O2]\nlow = 88.0\nlow_low = 80.0\n[status]\nrefresh_s = 0.5\n"
        )
        site.publish(_signed(site, 3, site.text(changed) + alarms))
        rep = site.reported(applied(3), "v3 applied")
        assert rep["applied"]["restarted"] == ["alarms", "status"]
        assert rep["process"] == before["process"]
        assert "limit alarms retuned for a config revision" in _log(site)
        # On site, 'edgetwin status' answers from the new socket unit, the same process, both sources.
        cli = [sys.executable, "-m", "gateway.cli", "status", "--config", str(site.config), "--json"]
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        env.pop("RUNTIME_DIRECTORY", None)
        done = subprocess.run(cli, capture_output=True, text=True, timeout=60, check=False, env=env)
        assert done.returncode == 0, done.stderr
        snap = json.loads(done.stdout)
        assert snap["pid"] == pid
        assert [s["name"] for s in snap["sources"]] == ["bed7-sim", "bed9-sim"]

        # 4. A process-level section ([runtime]) changed: the whole process restarts (same PID).
        text = site.text(changed).replace("drain_deadline_s = 3.0", "drain_deadline_s = 4.0")
        site.publish(_signed(site, 4, text))
        rep = site.reported(applied(4), "v4 applied")
        assert rep["applied"]["applied_by"] == "process"
        assert rep["applied"]["restarted"] == ["runtime"]
        assert rep["process"]["started_at"] != before["process"]["started_at"]
        # What people on site read without the twin: how the running revision was put in place.
        cli = [sys.executable, "-m", "gateway.cli", "downlink", "status", "--config", str(site.config)]
        shown = subprocess.run(cli, capture_output=True, text=True, timeout=60, check=False).stdout
        assert "revision 4 since " in shown
        assert ", by restarting the gateway (runtime)" in shown
        assert site.proc.pid == pid
        assert _log(site).count("edgetwin restarting (config v4)") == 1
        assert rep["process"]["connects"] == 1

        # 5. A connection key of [uplink.mqtt] changed: the uplink reconnects, nothing restarts.
        site.publish(_signed(site, 5, text.replace("connect_timeout_s = 2.0", "connect_timeout_s = 3.0")))
        rep = site.reported(applied(5), "v5 applied")
        assert rep["applied"]["applied_by"] == "units"
        assert rep["applied"]["restarted"] == ["uplink"]
        assert rep["process"]["connects"] == 2
        shown = subprocess.run(cli, capture_output=True, text=True, timeout=60, check=False).stdout
        assert ", in place: restarted uplink" in shown
        assert _log(site).count("unit source:bed7-sim started") == 2  # once per process start
    finally:
        twin.stop()


def _status(site: Site) -> dict[str, Any]:
    cli = [sys.executable, "-m", "gateway.cli", "status", "--config", str(site.config), "--json"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("RUNTIME_DIRECTORY", None)
    done = subprocess.run(cli, capture_output=True, text=True, timeout=60, check=False, env=env)
    assert done.stdout, done.stderr
    snap: dict[str, Any] = json.loads(done.stdout)
    return snap


def test_a_metric_name_holding_an_identity_is_refused_and_renaming_it_in_place_clears_status(
    site: Site,
) -> None:
    # The subject "pump-1" is in every tag of the pump profile ("Pump1/..."): all its windows drop.
    held = source("pump-sim", "pump", "SN-PLC-1").replace('"pump-sim-subject"', '"pump-1"')
    site.config.write_text(site.text(source("bed7-sim") + held))
    site.start()
    assert site.proc is not None
    pid = site.proc.pid
    site.reported(running(site.unit("pump-sim")), "up")
    before = _status(site)
    assert len(before["held_names"]) == 8
    assert before["health"] == "degraded"

    # A revision that keeps such a name fails the check: refused, as every other check failure.
    site.publish(site.envelope(1, source("bed7-sim") + held + BED9))
    rep = site.reported(lambda r: [x["version"] for x in r["refused"]] == [1], "v1 refused")
    assert rep["refused"][0]["reason"] == "invalid-config"

    # The subject renamed: the source restarts in place, and status no longer names the metrics.
    site.publish(site.envelope(2, source("bed7-sim") + source("pump-sim", "pump", "SN-PLC-1")))
    rep = site.reported(applied(2), "v2 applied")
    assert rep["applied"]["applied_by"] == "units"
    after = _status(site)
    assert after["pid"] == pid
    assert after["held_names"] == []
