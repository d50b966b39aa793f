"""Certificate renewal end to end with the wall clock jumped forward and back, over the real TLS mosquitto.

The gateway process runs with its renewal's wall clock jumped by the seconds in a file the test
writes (a ``sitecustomize`` on its path replaces the wall-clock reading of
:mod:`gateway.downlink.clock`, the way libfaketime would replace ``clock_gettime``; libfaketime
0.9.10 cannot step CLOCK_REALTIME and leave CLOCK_MONOTONIC alone without breaking
``time.sleep``).  TLS and the broker keep the real clock.  The client certificate lives for
about 100 s and falls due 60 s after it is made:

* forward by a day (past its end, so past the renewal window) while the gateway looks at it
  before it is due: no renewal before it is due;
* back by two hours (before the certificate was issued) when it falls due: the renewal is made
  on time all the same, and the renewed certificate is taken while the wall clock still reads
  before its start;
* the twin's sequence check shows no record lost across the switch.
"""

from __future__ import annotations

import datetime as dt
import time
from pathlib import Path
from typing import Any

import pytest
from downlink_support import (
    Site,
    assert_no_record_lost,
    broker_running,
    new_site,
    renew_with_the_twin_cli,
    renewal_pki,
    running,
)
from uplink_support import listener, require_mosquitto

from gateway.downlink.twin_link import send_command
from gateway.records.topics import DEFAULT_PREFIX

pytestmark = [pytest.mark.slow, pytest.mark.campaign]

RENEW_BEFORE_S = 43.2  # renew_before_days = 0.0005
DUE_IN_S = 60.0  # from making the certificate to the moment it is due (room for a slow start)

SITECUSTOMIZE = '''\
"""Test peer: the wall clock certificate renewal reads, jumped by the seconds in a file."""
import datetime as dt
import os
from pathlib import Path
from typing import Any

import gateway.downlink.clock as clock

_FILE = Path(os.environ["EDGETWIN_TEST_WALL_OFFSET_FILE"])


def _jumped() -> dt.datetime:
    try:
        offset = float(_FILE.read_text() or 0)
    except (OSError, ValueError):
        offset = 0.0
    return dt.datetime.now(dt.UTC) + dt.timedelta(seconds=offset)


clock._utc_now = _jumped
'''


def _events(site: Site) -> list[dict[str, Any]]:
    path = site.tmp / "state" / "downlink" / "audit.jsonl"
    return site.events() if path.exists() else []


def test_renewal_keeps_its_schedule_across_wall_clock_jumps(tmp_path: Path) -> None:
    require_mosquitto()
    made = dt.datetime.now(dt.UTC)
    made_mono = time.monotonic()
    ca, ca_key, pki = renewal_pki(
        tmp_path / "pki",
        valid_from=made - dt.timedelta(seconds=60),
        valid_until=made + dt.timedelta(seconds=DUE_IN_S + RENEW_BEFORE_S),
    )
    due_mono = made_mono + DUE_IN_S
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(SITECUSTOMIZE)
    offset = tmp_path / "wall-offset"
    offset.write_text("0")
    with broker_running(tmp_path, pki) as broker:
        site = new_site(tmp_path, pki, broker)
        site.config.write_text(
            site.config.read_text().replace(
                "settle_s = 1.0\n", "settle_s = 1.0\nrenew_before_days = 0.0005\n"
            )
        )
        site.env = {"PYTHONPATH": f"{hook}:{Path(__file__).resolve().parents[1]}"}
        site.env["EDGETWIN_TEST_WALL_OFFSET_FILE"] = str(offset)
        twin = listener(broker, pki)
        try:
            site.start()
            site.reported(running(site.unit("bed7-sim")), "running", timeout=30)
            assert time.monotonic() < due_mono - 25, "the gateway took too long to start for this scenario"
            offset.write_text(str(86400))  # a day ahead: past the certificate's end
            rep = site.reported(
                lambda r: (r.get("certificate") or {}).get("clock_step_s") == 86400,
                "the step seen",
                timeout=due_mono - 12 - time.monotonic(),  # it looks again at half the time left
            )
            assert rep["certificate"]["renewal"] is None  # judged by the kept time, not the jumped clock
            while time.monotonic() < due_mono - 12:  # the gateway looks again at half the time left
                time.sleep(0.5)
            assert "csr-made" not in [e["event"] for e in _events(site)], (
                "renewed early on a clock jumped forward"
            )
            offset.write_text(str(-7200))  # two hours back: before the certificate was issued
            rep = site.reported(
                lambda r: (r.get("certificate") or {}).get("renewal") == "csr sent", "CSR sent", timeout=40
            )
            csr_at = time.monotonic()
            assert csr_at >= due_mono - 1.0, f"CSR {due_mono - csr_at:.1f} s before it was due"
            assert rep["certificate"]["clock_step_s"] == -7200
            # Taken while the wall clock still reads two hours before the new certificate's start.
            renew_with_the_twin_cli(site, ca.ca_file, ca_key)
            offset.write_text("0")
            send_command(site.twin, f"{DEFAULT_PREFIX}/{site.gateway}/cmd", "report")  # looked at again now
            rep = site.reported(lambda r: r["certificate"]["clock_step_s"] is None, "clock back in step")
            assert_no_record_lost(site, twin)  # across the jumps and the switch
        finally:
            site.stop()
            twin.stop()
