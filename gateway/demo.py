"""The demo: simulated devices on real transports -> the gateway -> what leaves it.

A composition root like the CLI's ``run``: it starts each device simulator on the transport its
driver really uses (a pseudo-terminal for the oximeter, an emulated BlueZ radio for the strap, an
OPC UA server for the PLC, a C node on a pty for the motor board) and adds the matching
``[[sources]]`` tables. A simulator that cannot run on this machine is left out with a note; the
synthetic ``sim`` patient always runs, so the demo never ends empty-handed.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

PATIENT = "patient-MRN-0048213"  # bed 7: a BLE heart-rate strap and a serial pulse oximeter
SHARED_MITDB = Path(__file__).resolve().parents[2] / "shared" / "data" / "physio" / "mitdb_100"

#: The part of the demo that needs nothing but this package.
BASE_CONFIG = """
[gateway]
name = "demo-gateway"

[privacy]
time = "relative"

[pipeline]
window_s = 10.0
hop_s = 5.0
grace_s = 1.0
sensor_lost_s = 8.0

[[sources]]
name = "bed-8-monitor"
driver = "sim"
subject = "patient-MRN-0051177"
kind = "medical"
profile = "patient"
device = "A4:C1:38:5B:20:7E"
seed = 7
events = [
  { kind = "desaturation", at_s = 20.0, duration_s = 40.0 },
  { kind = "sensor_off", at_s = 70.0, duration_s = 8.0 },
]

# Fused heart rate with its uncertainty and sources (README "Estimators"). Bed 7: the strap's HR and
# RR intervals and the oximeter's pulse rate - the strap slips off at 40 s for 15 s (its contact bit
# clears, its rate is noise): the oximeter carries the estimate on; bed 8: the monitor's HR and RR intervals - when the
# probe comes off at 70 s for 8 s its HR is blanked and no RR intervals come (no beat is seen):
# every source silent, the estimate is bridged with a widening interval until the probe is back.
[[estimators.fusion]]
subject = "patient-MRN-0048213"
sources = [
  { metric = "MDC_ECG_HEART_RATE" },
  { metric = "MDC_ECG_TIME_PD_RR_GL" },
  { metric = "MDC_PULS_OXIM_PULS_RATE" },
]
every_s = 5.0

[[estimators.fusion]]
subject = "patient-MRN-0051177"
sources = [{ metric = "MDC_ECG_HEART_RATE" }, { metric = "MDC_ECG_TIME_PD_RR_GL" }]
every_s = 5.0

# Bed 7's strap reports its own battery level (BLE Battery Level): SoC, drain, hours left.
[[estimators.battery]]
subject = "patient-MRN-0048213"
level = "MDC_ATTR_VAL_BATT_CHARGE"
low_soc = 15.0

# A turbofan wearing out, four operating cycles a second (this one fails after 176 cycles, at 44 s),
# and its remaining useful life with a 90 % interval from the C-MAPSS model (README "Estimators").
[[sources]]
name = "engine-2-sim"
driver = "sim"
subject = "plant-B/engine-2"
kind = "industrial"
profile = "engine"
device = "SN-FADEC-7741"
seed = 5
rate_hz = 4.0

[[estimators.rul]]
subject = "plant-B/engine-2"
prefix = "Engine/"
cycle_s = 0.25
grace_s = 0.5

[models]
# The pump model learns each machine's normal over its first 30 s (commissioning), then scores.
# Only the pump is a pump: without `subjects` the model would apply to every industrial subject
# (the engine, the motor) and report their streams as unmapped inputs.
use = [
  { name = "pump_skab", commissioning_s = 30.0, subjects = ["plant-A/pump-3"] },
  { name = "vitals_mimic" },
]
"""

#: The stand-in for the PLC when the OPC UA simulator cannot run.
SIM_PUMP: dict[str, Any] = {
    "name": "pump-3-sim",
    "driver": "sim",
    "subject": "plant-A/pump-3",
    "kind": "industrial",
    "profile": "pump",
    "device": "SN-PLC-20931",
    "seed": 3,
    "events": [{"kind": "valve_fault", "at_s": 45.0, "duration_s": 30.0}],
}

Starter = Callable[[contextlib.ExitStack, Path], list[dict[str, Any]]]


def oximeter(stack: contextlib.ExitStack, tmp: Path) -> list[dict[str, Any]]:
    """A Nonin oximeter (data format #2) on a pseudo-terminal, with desaturations and probe-off."""
    from drivers.serial.sim import start_demo_oximeter  # noqa: PLC0415 - optional extra

    ox = start_demo_oximeter(tmp)
    stack.callback(ox.stop)
    return [
        {
            "name": "bed-7-oximeter",
            "driver": "serial",
            "subject": PATIENT,
            "kind": "medical",
            "port": str(ox.path),
            "protocol": "nonin2",
        }
    ]


def strap(stack: contextlib.ExitStack, tmp: Path) -> list[dict[str, Any]]:
    """A BLE heart-rate strap on an emulated radio (MIT-BIH 100 RR intervals when available)."""
    del tmp
    if shutil.which("dbus-daemon") is None:
        raise RuntimeError("dbus-daemon is not installed")
    from drivers.ble.testbed.harness import demo_radio  # noqa: PLC0415 - optional extra

    table: dict[str, Any] = stack.enter_context(demo_radio(PATIENT, SHARED_MITDB))
    return [table]


def plc(stack: contextlib.ExitStack, tmp: Path) -> list[dict[str, Any]]:
    """A pump PLC: an OPC UA server with a process model and a valve fault at 45 s."""
    del tmp
    from drivers.opcua.plcsim import PlcSimProcess  # noqa: PLC0415 - optional extra
    from gateway.uplink.broker import free_port  # noqa: PLC0415 - optional extra

    port = free_port()
    server = PlcSimProcess(port, "--fault", "valve_fault:45:30")
    server.start()
    stack.callback(server.stop)
    nodes = [
        {"browse_path": "Pump1/Vibration/Accelerometer1RMS"},
        {"browse_path": "Pump1/Vibration/Accelerometer2RMS"},
        {"browse_path": "Pump1/Motor/Current"},
        {"browse_path": "Pump1/Motor/Voltage"},
        {"browse_path": "Pump1/Motor/Temperature"},
        {"browse_path": "Pump1/Hydraulics/Pressure"},
        # Named as the pump model's inputs are (SKAB's signal names).
        {"browse_path": "Pump1/Hydraulics/FluidTemperature", "name": "Pump1/Thermocouple"},
        {"browse_path": "Pump1/Hydraulics/Flow", "name": "Pump1/RateRMS"},
    ]
    return [
        {
            "name": "pump-3-plc",
            "driver": "opcua",
            "subject": "plant-A/pump-3",
            "kind": "industrial",
            "endpoint": server.endpoint,
            "security_policy": "None",
            "security_mode": "None",
            "namespace_uri": "urn:edgetwin:plcsim",
            "nodes": nodes,
        }
    ]


def motor_node(stack: contextlib.ExitStack, tmp: Path) -> list[dict[str, Any]]:
    """A microcontroller ADC board on a motor (C, built on first use) on a pseudo-terminal."""
    del stack, tmp
    if shutil.which("cc") is None or shutil.which("make") is None:
        raise RuntimeError("a C compiler and make are needed to build the simulated node")
    return [
        {
            "name": "motor-7-adc",
            "driver": "mcu",
            "subject": "plant-A/motor-7",
            "kind": "industrial",
            "simulate": {"node_id": "SIM-MOTOR-7", "seed": 7, "drift_ppm": 35.0},
        }
    ]


DEVICES: tuple[tuple[str, Starter], ...] = (
    ("serial pulse oximeter (Nonin #2 on a pty), bed 7", oximeter),
    ("BLE heart-rate strap (emulated BlueZ radio, slips off at 40 s), bed 7", strap),
    ("pump PLC (OPC UA server, valve fault at 45 s), pump 3", plc),
    ("microcontroller ADC board (C node on a pty), motor 7", motor_node),
)


def compose(stack: contextlib.ExitStack, tmp: Path) -> tuple[dict[str, Any], list[str]]:
    """The demo's config data with every device that could be started; notes for the banner."""
    data = tomllib.loads(BASE_CONFIG)
    notes = [
        "  + synthetic patient (sim driver: desaturation at 20 s, probe off at 70 s), bed 8",
        "  + synthetic turbofan wearing out, failing at 44 s (sim driver, engine profile), engine 2",
    ]
    for label, start in DEVICES:
        try:
            data["sources"].extend(start(stack, tmp))
        except Exception as exc:  # noqa: BLE001 - a simulator that cannot run here is left out, not fatal
            notes.append(f"  - {label}: left out ({type(exc).__name__}: {exc})")
            if start is plc:
                data["sources"].append(SIM_PUMP)
                notes.append("  + synthetic pump (sim driver) instead of the PLC, pump 3")
        else:
            notes.append(f"  + {label}")
    return data, notes
