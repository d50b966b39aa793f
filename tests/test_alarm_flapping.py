"""No alarm flapping faster than the restore delay: ``edgetwin run`` with an oximeter whose plug
goes in and out every fraction of a second (a loose USB connector), the pty simulator unplugged
and replugged, for 20 s.

The serial driver reports the device lost on every unplug and back on the first data after each
replug; the windower holds every restore until ``sensor_restore_s`` (2 s) after its loss, so the
alarms that leave the gateway alternate at most that fast, and the last one says the device is back.
"""

from __future__ import annotations

import itertools
import time
from pathlib import Path

import pytest
from test_e2e import NotifySocket, _records
from test_replug import BACK, Gateway, _config, notify, oximeter

from drivers.serial.sim import PtyOximeter

pytestmark = [pytest.mark.slow, pytest.mark.campaign]

__all__ = ["notify", "oximeter"]  # fixtures shared with test_replug

RESTORE_S = 2.0  # sensor_restore_s, the default
DEVICE_ALARMS = {"device_lost", "device_restored", "sensor_lost", "sensor_restored"}


# Out 0.3 s / in 0.3 s: too short for a frame, the driver's retries slow down (flap backoff).
# Out 0.5 s / in 1.0 s: data in every plugged phase; without the hold a restore followed its loss
# after 1.2 s (measured with sensor_restore_s = 0).
@pytest.mark.parametrize(("out_s", "in_s"), [(0.3, 0.3), (0.5, 1.0)])
def test_a_loose_plug_never_flaps_alarms_faster_than_the_restore_delay(
    tmp_path: Path, notify: NotifySocket, oximeter: PtyOximeter, out_s: float, in_s: float
) -> None:
    gw = Gateway(_config(tmp_path, Path(oximeter.path)), notify)
    try:
        gw.wait_line("open at", 0.0, 60)
        time.sleep(1.0)
        t_end = time.monotonic() + 20.0
        while time.monotonic() < t_end:
            oximeter.unplug()
            time.sleep(out_s)
            oximeter.replug()
            time.sleep(in_s)
        t_last = time.monotonic()
        gw.wait_line(BACK, t_last, 40)  # the flapping slowed its retries: it comes back in time
        time.sleep(RESTORE_S + 1.0)  # a held restore goes out once the hold is over
    finally:
        code = gw.stop()
    assert code == 0, "\n".join(line for _, line in gw.lines[-30:])
    alarms = [
        r["record"]
        for r in _records(tmp_path / "out.jsonl")
        if r["record"]["type"] == "alarm" and r["record"]["alarm"] in DEVICE_ALARMS
    ]
    kinds = [a["alarm"] for a in alarms]
    print(f"\n{len(kinds)} device alarms in 20 s of flapping: {kinds}")
    assert "device_lost" in kinds
    assert kinds[-1] == "device_restored"  # the device is back, and the last alarm says so
    for lost, back in itertools.pairwise(alarms):
        if lost["alarm"] == "device_lost":
            assert back["alarm"] == "device_restored", kinds  # one outage at a time
            assert back["t"] - lost["t"] >= RESTORE_S - 0.1, (lost, back)
