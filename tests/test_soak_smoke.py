"""The every-driver soak (``tests/benchmarks/bench_soak.py``) in two minutes: it runs, and data flows.

A campaign test (``pytest -m campaign``): one ``edgetwin run`` with every real driver at once (BLE
on the BlueZ emulator, two serial oximeters on ptys, the OPC UA PLC simulator, two C nodes) and
the MQTT uplink; the twin must see every subject's windows, no record lost or doubled, and the
gateway's threads and open files must not grow between the first sample after start-up and the
end.  The soak's figures come from the benchmark, not from here.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent / "benchmarks"))

from bench_soak import soak

pytestmark = pytest.mark.campaign


@pytest.mark.skipif(shutil.which("dbus-daemon") is None, reason="dbus-daemon is not installed")
def test_every_driver_at_once_delivers_without_loss_or_growth_of_threads_and_files(tmp_path: Path) -> None:
    args = argparse.Namespace(
        minutes=2.0, every=15.0, speed=4.0, no_models=False, csv=None, log=None, tracemalloc=None
    )
    trace, twin, tail = soak(args, tmp_path)
    sequences = list(twin.checker.gateways.values())
    assert len(sequences) == 1, tail
    seq = sequences[0]
    assert seq.missing == 0, seq.summary()
    assert seq.duplicates == 0, seq.summary()
    subjects = [s for gw in twin.view.gateways.values() for s in gw.subjects.values()]
    # bed 1 (oximeter + wearables), bed 2 (oximeter), the pump PLC, two motor nodes
    assert len(subjects) == 5, [(s.kind, sorted(s.streams)) for s in subjects]
    assert all(s.windows >= 2 for s in subjects), [(s.kind, s.windows) for s in subjects]
    streams = {m for s in subjects for m in s.streams}
    assert {"MDC_ECG_TIME_PD_RR_GL", "Pump1/Motor/Current", "vibration"} <= streams, streams
    assert max(trace.threads[1:]) == trace.threads[1], trace.threads
    assert max(trace.fds[1:]) == trace.fds[1], trace.fds
