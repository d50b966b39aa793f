"""End to end: the SKAB fusion through ``edgetwin run`` against the PLC simulator over OPC UA.

A real gateway process reads the simulated pump, runs ``pump_skab`` (20 s windows) and the
novelty detector (5 s windows) with the settings ``fusion_skab`` was chosen with, and fuses them.
The twin, behind mosquitto with TLS, must see after commissioning: nothing during a healthy
stretch, then for an injected valve fault one ``anomaly`` of the fused verdict (none of its members)
whose explanation names inputs of both members, and its ``anomaly_cleared`` after the fault.

The fusion's windows and hop are the card's, so the story takes minutes of real time: the novelty
detector needs 49 windows (at the card's 1 s hop) to commission, and the pump's 20 s window holds
the fault for 20 s after it ends.  It is in the fault campaign (pytest -m campaign).  The same
story in compressed time runs by default: the simulator's pump model feeds the composed pipeline
on the simulated clock, with the fusion's members built as ``edgetwin run`` builds them.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from model_support import pump_1hz, pump_1hz_config
from peers import free_port, stop_process
from test_alarm_campaign import T0, WALL0, alarm_records
from test_fusion_verdict import NOVELTY
from test_novelty_e2e import INPUTS
from uplink_support import listener, mosquitto_pki, mqtt_toml, running_broker

from drivers.opcua.plcsim import PlcSimProcess
from drivers.sim.protocol import Label
from gateway import cli
from gateway.anonymize import Anonymizer, Pseudonymizer
from gateway.inference.build import build_models
from gateway.inference.fusion import build_fusions
from gateway.inference.novelty import build_novelty
from gateway.outbox import AsyncOutbox, Outbox
from gateway.records import AlarmRecord, FeaturesWindow, as_map
from gateway.runtime import Pipeline
from gateway.sample import SampleBlock
from gateway.twin.listen import Listener
from gateway.uplink.broker import MosquittoBroker
from gateway.uplink.certs import DemoPKI

ROOT = Path(__file__).resolve().parent.parent
SUBJECT = "plant-A/pump-3"
# Both members; the novelty detector needs at least 49 windows at 1 s.  60 s was enough while a
# start's partial windows counted towards commissioning and widened pump_skab's spreads; on 60
# whole 20 s windows (75 s of data) it flags the healthy pump at once and stays flagged (two runs
# of two), on 120 s it does not.
COMMISSION_S = 120.0
HEALTHY_S = 20.0  # scored by the fusion and normal before the fault
FAULT_S = 30.0
MEMBERS = ("pump_skab", "novelty")


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> DemoPKI:
    return mosquitto_pki(tmp_path_factory)


@pytest.fixture
def broker(tmp_path: Path, pki: DemoPKI) -> Iterator[MosquittoBroker]:
    yield from running_broker(tmp_path, pki)


def write_config(tmp: Path, sim: PlcSimProcess, broker: MosquittoBroker, pki: DemoPKI) -> Path:
    """The scanned PLC with pump_skab's input mapping, the novelty detector and the fusion as chosen."""
    snippet = tmp / "plc.toml"
    args = ["scan", "opcua", sim.endpoint, "--select", "Pump1/*/*", "--write-config", str(snippet)]
    args += ["--name", "pump-3-plc", "--subject", SUBJECT, "--model", "pump_skab"]
    assert cli.main(args) == 0
    scanned = snippet.read_text(encoding="utf-8").replace(
        'name = "pump_skab"', f'name = "pump_skab"\ncommissioning_s = {COMMISSION_S}'
    )
    path = tmp / "edgetwin.toml"
    path.write_text(
        f"""
[gateway]
name = "plant-A-gw"
state_dir = "{tmp / "state"}"
[pipeline]
window_s = 5.0
hop_s = 1.0
grace_s = 0.3
[runtime]
drain_deadline_s = 3.0
[alarms]
defaults = false  # the valve fault's limit alarms are not what this test is about
{mqtt_toml(broker, pki)}
[models.novelty]
window_s = 5
ewma = 0.5
var_keep = 0.95
features = ["mean", "std"]
spread_only = ["Temperature", "Thermocouple"]
commissioning_s = {COMMISSION_S}
# The process tags: not the status Booleans, which report only on change (and AnomalyLabel is the
# simulator's ground truth).
inputs = {json.dumps(list(INPUTS))}
[[models.fusion]]
name = "fusion_skab"
"""
        + scanned,
        encoding="utf-8",
    )
    (tmp / "state").mkdir(exist_ok=True)
    return path


def windows(twin: Listener) -> list[FeaturesWindow]:
    return [m.record for m in twin.records() if isinstance(m.record, FeaturesWindow)]


def alarms(twin: Listener) -> list[dict[str, Any]]:
    return [as_map(m.record) for m in twin.records() if isinstance(m.record, AlarmRecord)]


def fused(twin: Listener) -> list[FeaturesWindow]:
    return [w for w in windows(twin) if math.isfinite(w.scores.get("fusion_skab", math.nan))]


@pytest.mark.slow
@pytest.mark.campaign
def test_a_valve_fault_raises_one_fused_alarm_naming_both_members_inputs(
    tmp_path: Path, pki: DemoPKI, broker: MosquittoBroker, capsys: pytest.CaptureFixture[str]
) -> None:
    sim = PlcSimProcess(free_port(), "--rate-hz", "10", "--seed", "3")
    sim.start()
    twin = listener(broker, pki)
    proc: subprocess.Popen[str] | None = None
    try:
        path = write_config(tmp_path, sim, broker, pki)
        capsys.readouterr()
        assert cli.main(["check", "--config", str(path)]) == 0
        out = capsys.readouterr().out
        assert f"subject {SUBJECT} (industrial): model pump_skab scores it" in out
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        env.pop("NOTIFY_SOCKET", None)
        with (tmp_path / "gateway.log").open("w") as log:
            proc = subprocess.Popen(
                [sys.executable, "-m", "gateway.cli", "run", "--config", str(path)],
                env=env,
                stdout=subprocess.DEVNULL,
                stderr=log,
                text=True,
            )
        # Commissioned: both members judge the subject, so the fusion has a score.
        assert twin.wait_for(lambda t: bool(fused(t)), 20.0 + 3 * COMMISSION_S), "never fused"
        first_fused = fused(twin)[0].t
        assert twin.wait_for(lambda t: fused(t)[-1].t - first_fused >= HEALTHY_S, 3 * HEALTHY_S)
        before = alarms(twin)
        sim.command(f"fault valve_fault {FAULT_S:g}")
        injected = fused(twin)[-1].t

        def cleared(t: Listener) -> bool:
            return any(a["alarm"] == "anomaly_cleared" for a in alarms(t))

        assert twin.wait_for(cleared, 3 * FAULT_S + 60.0), alarms(twin)
        time.sleep(2.0)  # a straggler of a member would come now
    finally:
        if proc is not None:
            stop_process(proc)
        twin.stop()
        sim.stop()
    assert proc.returncode == 0, (tmp_path / "gateway.log").read_text()
    # The healthy stretch, commissioning included, raised nothing.
    assert before == [], before
    episode = [a for a in alarms(twin) if a["alarm"].startswith("anomaly")]
    assert [(a["alarm"], a["detail"]["model"]) for a in episode] == [
        ("anomaly", "fusion_skab"),
        ("anomaly_cleared", "fusion_skab"),
    ], episode
    raised = episode[0]
    assert raised["t"] >= injected
    assert raised["class"] == "process"
    # Its explanation: the pump model names its inputs by the card's names (Pressure.mean), the
    # novelty detector by the streams' paths (Pump1/Hydraulics/Pressure.mean): both are there.
    keys = list(raised["contrib"])
    assert any("/" in k for k in keys), keys
    assert any("/" not in k for k in keys), keys
    # The members' scores still travel with every window, beside the fusion's.
    assert all(set(MEMBERS) <= set(w.scores) for w in fused(twin))


def compressed(tmp: Path, seed: int, fault: Label, seconds: int) -> list[dict[str, Any]]:
    """The anomaly alarms of the simulated pump (1 Hz, as SKAB) under the fusion, on the simulated clock."""
    config = pump_1hz_config(
        tmp,
        {
            # Both members commission over the card's default half hour.
            "use": [{"name": "pump_skab"}],
            "novelty": NOVELTY | {"commissioning_s": 1800.0},
            "fusion": [{"name": "fusion_skab"}],
        },
    )
    core = config.core
    hop = core.pipeline.hop_s
    scored: list[Any] = [*build_models(core.models, hop_s=hop, state_dir=tmp, fault_alarms=False)]
    scored += build_novelty(core.models.novelty, hop_s=hop, state_dir=tmp)
    fusions = build_fusions(core.models.fusion, scored, None, hop_s=hop, window_s=core.pipeline.window_s)
    gen, streams = pump_1hz(seed, [fault])

    async def main() -> list[dict[str, Any]]:
        anon = Anonymizer(Pseudonymizer(b"f" * 32), time_mode="relative", start_wall=WALL0)
        async with AsyncOutbox(lambda: Outbox(tmp / "outbox.db")) as outbox:
            pipeline = Pipeline(config, anon, outbox, scored, fusions)
            for k in range(seconds):
                for name, series in gen.generate(float(k), k + 1.0).series.items():
                    if len(series):
                        block = SampleBlock(
                            streams[name], T0 + series.t, WALL0 + series.t, series.value, series.quality
                        )
                        pipeline.sink.put_block(block)
                await pipeline.step(now_mono=T0 + k + 1.0, now_wall=WALL0 + k + 1.0)
            return await alarm_records(outbox, pipeline)

    return [a for a in asyncio.run(main()) if a["alarm"].startswith("anomaly")]


FAULT = Label("valve_fault", 2100.0, 2220.0)  # five minutes after commissioning, two minutes long


def test_the_same_story_in_compressed_time(tmp_path: Path) -> None:
    episode = compressed(tmp_path, 7, FAULT, 2400)
    assert [(a["alarm"], a["detail"]["model"]) for a in episode] == [
        ("anomaly", "fusion_skab"),
        ("anomaly_cleared", "fusion_skab"),
    ], episode
    raised, cleared = episode
    assert FAULT.start_s <= raised["_t"] <= FAULT.start_s + 10.0  # none before: the fault's alarm
    assert FAULT.end_s <= cleared["_t"] <= FAULT.end_s + 30.0  # once the pump's 20 s window is clear
    # The pump model's inputs by the card's names, the novelty detector's by the streams' paths.
    keys = list(raised["contrib"])
    assert any("/" in k for k in keys), keys
    assert any("/" not in k for k in keys), keys


def test_no_false_episode_before_the_fault_with_another_seed(tmp_path: Path) -> None:
    # Seed 3 used to raise two fused episodes in these five healthy minutes (at 2055 and 2067 s):
    # the novelty member (5 s windows at a 1 s hop, EWMA 0.5: its T² has a lag-1 correlation of
    # about 0.9) flagged 6 % of them, up to 1.29 x its limit, while pump_skab stayed far below its
    # threshold.  Its limits were the 99 % quantiles of its out-of-fold commissioning scores, whose
    # top windows are runs: the half hour of commissioning held 8-11 runs of two or more above them
    # (seeds 0-3 and 7 alike).  Limits that let the commissioning raise none (episode_limit) end it.
    episode = compressed(tmp_path, 3, FAULT, 2100)
    assert episode == []
