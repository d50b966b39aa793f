"""A gateway whose clock is days behind meets a broker certificate that is not valid yet by it.

``edgetwin run`` under libfaketime (that process only: mosquitto and the twin keep the true time)
two days behind, publishing over TLS with client certificates to mosquitto.  The handshake fails
on the broker certificate's dates.  The gateway says why once (the clock's reading, the
certificate's start, NTP), in its log and in ``edgetwin status``'s uplink line; its records stay
in the outbox; once the clock is stepped to the true time in the same run, the uplink connects
by itself and the twin receives every record, none missing.
"""

from __future__ import annotations

import datetime as dt
import time
from pathlib import Path

import pytest
from test_clock_step_e2e import FAKETIME, faked, set_clock
from test_observe_status import SIM, Gateway, Notify, _broker, _config, notify
from uplink_support import listener, mqtt_toml

from gateway.uplink.expiry import read_cert_info

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not FAKETIME.exists(), reason=f"libfaketime not found at {FAKETIME}"),
]

BEHIND = "the clock is behind; check NTP/time sync"
__all__ = ["notify"]  # the fixture, used by name


def test_a_clock_days_behind_says_so_keeps_every_record_and_connects_once_set_right(
    tmp_path: Path, notify: Notify, capsys: pytest.CaptureFixture[str]
) -> None:
    broker, pki = _broker(tmp_path)
    twin = listener(broker, pki)
    offset = tmp_path / "faketime"
    set_clock(offset, "-2d")
    gw = Gateway(_config(tmp_path, mqtt_toml(broker, pki) + SIM), notify, faked(offset))
    try:
        snap = gw.wait(capsys, lambda s: BEHIND in s["uplink"]["last_error"], "the clock named as the cause")
        error = snap["uplink"]["last_error"]
        behind = dt.datetime.now(dt.UTC) - dt.timedelta(days=2)
        assert f"the gateway's clock reads {behind:%Y-%m-%d %H:%M}" in error, error
        valid_from = read_cert_info(pki.server.cert).not_before
        assert f"the broker certificate is valid from {valid_from:%Y-%m-%d %H:%M:%S} UTC" in error, error
        assert snap["uplink"]["state"] == "down"
        # Many attempts later (reconnect_max_s = 1 s), it was said once: a state change, not an attempt.
        time.sleep(8.0)
        snap = gw.wait(capsys, lambda s: True, "answering")
        queued = snap["outbox"]["queued"]
        assert queued > 0
        assert snap["uplink"]["delivered"] == 0
        assert gw.proc.err().count(BEHIND) == 1, gw.proc.err()
        assert twin.records() == []

        set_clock(offset, "+0")  # NTP sets the clock right
        gw.wait(capsys, lambda s: s["uplink"]["state"] == "connected", "connected after the step", 30.0)
        assert twin.wait_for(lambda t: len(t.records()) >= queued, timeout=30.0), len(twin.records())
        time.sleep(2.0)
    finally:
        err = gw.stop()
        twin.stop()
        broker.stop()
    assert gw.proc.returncode == 0, err
    assert "connected again after" in err
    (state,) = twin.checker.gateways.values()
    # Every record from the first: those held while the clock was behind included, none missing.
    assert (state.seen.first, state.missing) == (1, 0), state.summary()
