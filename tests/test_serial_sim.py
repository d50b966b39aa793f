"""The pty oximeter simulator and the ``scan serial`` / ``sim oximeter`` commands."""

from __future__ import annotations

import json
import math
import os
import select
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from data_support import DATA
from peers import LoggedProcess

from drivers.serial import contec
from drivers.serial.formats import make_parser
from drivers.serial.protocol import LineSettings, Reading, Status
from drivers.serial.sim import (
    SIM_PROTOCOLS,
    Corruption,
    Corruptor,
    FrameSource,
    MimicNumerics,
    PtyOximeter,
    VitalsModel,
    uart_misread,
)
from gateway.cli import main as edgetwin

REPO = Path(__file__).resolve().parent.parent
MIMIC = DATA / "physio" / "mimic_numerics" / "s25047-2704-05-04-10-44n.hea"


def decode(protocol: str, data: bytes) -> list[Reading]:
    p = make_parser(protocol)
    return p.feed(data) + p.idle()


def test_vitals_model_has_desaturations_and_sensor_off_episodes() -> None:
    m = VitalsModel(
        1, desat_first_s=20, desat_every_s=100, desat_s=40, sensor_off_first_s=70, sensor_off_s=10
    )
    calm, dip = m.at(10.0), m.at(40.0)
    assert 95 <= calm.spo2 <= 100
    assert dip.spo2 < calm.spo2 - 8  # the trough of the desaturation
    assert dip.pulse > calm.pulse - 6
    off = m.at(75.0)
    assert math.isnan(off.spo2)
    assert off.status == Status.FINGER_OUT
    assert VitalsModel(1).at(33.3) == VitalsModel(1).at(33.3)


@pytest.mark.parametrize("protocol", SIM_PROTOCOLS)
def test_frame_source_speaks_each_protocol(protocol: str) -> None:
    vitals = VitalsModel(
        4, desat_first_s=5, desat_every_s=1000, desat_s=20, sensor_off_first_s=40, sensor_off_s=10
    )
    src = FrameSource(protocol, vitals, spot_every_s=5.0)
    data = b"".join(src.between(t / 10, (t + 1) / 10) for t in range(600))
    readings = decode(protocol, data)
    assert readings
    spo2 = [r.spo2 for r in readings if r.spo2 is not None and not math.isnan(r.spo2)]
    assert min(spo2) < 92 < max(spo2)  # the desaturation shows
    assert any(r.spo2 is not None and math.isnan(r.spo2) for r in readings)  # so does the sensor-off spell
    for r in readings:
        if r.pulse is not None and not math.isnan(r.pulse):
            assert 40 <= r.pulse <= 120


def test_uart_misread_is_identity_at_the_right_speed_and_garbage_otherwise() -> None:
    data = FrameSource("nonin2", VitalsModel(0)).between(0, 2)
    s = LineSettings(9600)
    assert uart_misread(data, s, s) == data
    odd = LineSettings(19200, 8, "O", 1)
    assert uart_misread(data[:50], odd, odd) == data[:50]
    wrong = uart_misread(data, LineSettings(19200), s)
    assert wrong != data
    assert decode("nonin2", wrong) == []
    slow = uart_misread(data, LineSettings(2400), s)
    assert decode("nonin2", slow) == []


def test_corruptor_is_seeded_and_does_what_it_says() -> None:
    data = bytes(range(256)) * 8
    clean = Corruptor(Corruption(), LineSettings(9600), seed=1)
    assert clean.apply(data) == data
    flips = Corruptor(Corruption(bit_flip=0.05), LineSettings(9600), seed=1).apply(data)
    assert len(flips) == len(data)
    diff = np.frombuffer(flips, np.uint8) ^ np.frombuffer(data, np.uint8)
    assert 40 < np.count_nonzero(diff) < 170
    assert all(int(d).bit_count() == 1 for d in diff[diff != 0])
    assert len(Corruptor(Corruption(drop=0.1), LineSettings(9600), seed=2).apply(data)) < len(data)
    assert len(Corruptor(Corruption(insert=0.1), LineSettings(9600), seed=2).apply(data)) > len(data)
    again = Corruptor(Corruption(bit_flip=0.05), LineSettings(9600), seed=1).apply(data)
    assert again == flips


def write_record(folder: Path) -> Path:
    """A tiny MIMIC-style numerics record: HR, SpO2 (gain 10), one sensor drop-out."""
    hr = [720, 730, 0, 750]
    spo2 = [970, 960, 0, 950]
    np.array([v for pair in zip(hr, spo2, strict=True) for v in pair], dtype="<i2").tofile(folder / "rec.dat")
    header = folder / "rec.hea"
    header.write_text(
        "rec 2 0.0166666666667/125 4\nrec.dat 16 10/bpm 16 0 0 0 0 HR\nrec.dat 16 10/% 16 0 0 0 0 SpO2\n",
        encoding="ascii",
    )
    return header


def test_mimic_numerics_replay(tmp_path: Path) -> None:
    rec = MimicNumerics(write_record(tmp_path), speed=60.0)
    assert rec.at(0.0).spo2 == pytest.approx(97.0)
    assert rec.at(0.0).pulse == pytest.approx(72.0)
    assert rec.at(0.5).spo2 == pytest.approx(96.5)  # half way to the next minute
    gone = rec.at(2.0)
    assert math.isnan(gone.spo2)
    assert gone.status == Status.FINGER_OUT


@pytest.mark.skipif(not MIMIC.exists(), reason=f"MIMIC numerics not found under {DATA} (set EDGETWIN_DATA)")
def test_mimic_numerics_from_the_shared_data() -> None:
    rec = MimicNumerics(MIMIC)
    values = [rec.at(t) for t in np.linspace(0, rec.duration_s, 50, endpoint=False)]
    spo2 = [v.spo2 for v in values if not math.isnan(v.spo2)]
    assert spo2
    assert all(0 <= v <= 100 for v in spo2)
    assert max(spo2) > 95  # mostly a well-saturated patient ...
    assert any(math.isnan(v.spo2) and v.status == Status.FINGER_OUT for v in values)  # ... with drop-outs


def is_streaming(sim: PtyOximeter) -> bool:
    return sim.streaming


def test_pty_oximeter_unplug_replug_and_start_command(tmp_path: Path) -> None:
    link = tmp_path / "ox"
    with PtyOximeter("cms50v46", link=link) as sim:
        first = os.path.realpath(link)
        assert first.startswith("/dev/pts/")
        assert not is_streaming(sim)
        fd = os.open(link, os.O_RDWR | os.O_NOCTTY)
        try:
            time.sleep(0.2)
            assert not select.select([fd], [], [], 0)[0]  # silent until asked
            os.write(fd, contec.START_COMMAND)
            got = b""
            deadline = time.monotonic() + 3
            while len(got) < 200 and time.monotonic() < deadline:
                if select.select([fd], [], [], 0.1)[0]:
                    got += os.read(fd, 4096)
            assert is_streaming(sim)
            assert sim.commands == [contec.START_COMMAND]
            assert decode("cms50v46", got)
        finally:
            os.close(fd)
        sim.unplug()
        assert not link.exists()
        sim.replug()
        assert link.exists()
        assert not is_streaming(sim)  # a replugged monitor waits for its start command again


def test_scan_serial_probes_only_what_it_is_told(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with PtyOximeter("masimo", link=tmp_path / "ox") as sim:
        assert edgetwin(["scan", "serial", "--probe", sim.path, "--probe-s", "3"]) == 0
        out = capsys.readouterr().out
        assert f"probe {sim.path}: masimo at 9600 8N1" in out
        assert "PATH" in out
        assert "BY-ID" in out
        assert edgetwin(["scan", "serial", "--port", sim.path, "--json"]) == 0
        listing = json.loads(capsys.readouterr().out)
        assert sim.path in [p["path"] for p in listing["ports"]]
        assert listing["probes"] == []


def test_scan_serial_reports_garbage_and_absence(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with PtyOximeter("nonin2", link=tmp_path / "ox", corruption=Corruption(wrong_speed=4800)) as sim:
        assert edgetwin(["scan", "serial", "--probe", sim.path, "--probe-s", "0.6", "--json"]) == 1
        (probe,) = json.loads(capsys.readouterr().out)["probes"]
        assert probe["protocol"] is None
        assert probe["result"].startswith("no recognisable frames at 9600 8N1, 19200 8O1 on ")
    assert edgetwin(["scan", "serial", "--probe", str(tmp_path / "gone"), "--probe-s", "0.2"]) == 1
    assert "port not found" in capsys.readouterr().out


def test_sim_oximeter_command_streams_on_its_link(tmp_path: Path) -> None:
    link = tmp_path / "oximeter"
    script = (
        "import sys, argparse\n"
        "from drivers.serial.commands import add_commands\n"
        "p = argparse.ArgumentParser(); sub = p.add_subparsers(dest='c', required=True)\n"
        "groups = {'top': sub, 'scan': sub.add_parser('scan').add_subparsers(dest='s'),"
        " 'sim': sub.add_parser('sim').add_subparsers(dest='m')}\n"
        "add_commands(groups); a = p.parse_args(sys.argv[1:]); sys.exit(a.func(a))\n"
    )
    proc = LoggedProcess(
        [
            sys.executable,
            "-c",
            script,
            "sim",
            "oximeter",
            "--protocol",
            "nonin2",
            "--link",
            str(link),
            "--duration",
            "4",
        ],
        log=tmp_path / "sim.log",
        cwd=REPO,
    )
    try:
        deadline = time.monotonic() + 60  # an interpreter's start-up: long on a loaded machine
        while not link.exists():
            assert proc.poll() is None, proc.err()
            assert time.monotonic() < deadline
            time.sleep(0.02)
        fd = os.open(link, os.O_RDWR | os.O_NOCTTY)
        got = b""
        try:
            deadline = time.monotonic() + 3
            while len(got) < 400 and time.monotonic() < deadline:
                if select.select([fd], [], [], 0.1)[0]:
                    got += os.read(fd, 4096)
        finally:
            os.close(fd)
        assert decode("nonin2", got)
        out, err = proc.communicate(timeout=10)
    finally:
        if proc.poll() is None:
            proc.terminate()
            proc.wait(timeout=5)
    assert proc.returncode == 0, err
    assert f"simulated nonin2 oximeter on {link}" in out
    assert not link.exists()
