"""A compressed soak through every real driver at once: RSS slope, threads and open files of ``edgetwin run``.

Run from the repository with the project's virtual environment (mosquitto, dbus-daemon, a C
compiler and make must be installed)::

    .venv/bin/python tests/benchmarks/bench_soak.py [--minutes 60] [--speed 4] [--no-models] [--csv F]
        [--backend card|numpy|litert|onnxruntime] [--trim-s 600] [--env KEY=VALUE ...] [--source]

One ``edgetwin run`` as the service runs, with the MQTT uplink to a local mosquitto (TLS 1.3, client
certificates), reads every real driver at once, each from the simulator the tests use on the
transport the driver really speaks:

* BLE: a heart-rate strap and a pulse oximeter (PLX) on the BlueZ D-Bus emulator (one adapter
  each, the gateway on ``hci0``), notifying ``--speed`` times a second instead of once;
* serial: two pulse oximeters on socat-style pseudo-terminals (Nonin #2 and Masimo), at the line
  rate their protocols fix (a pty cannot be sped up: two streams carry twice the data);
* OPC UA: the pump PLC simulator (asyncua server), 8 nodes, at ``10 * --speed`` updates/s;
* MCU: two C nodes on ptys (``simulate``), at the rates the firmware's channels fix (two nodes).

Both anomaly models are loaded unless ``--no-models`` (on the runtime their cards name, or on
``--backend``).  The gateway runs with the systemd unit's ``Environment=`` settings (``--env``
adds or overrides some, e.g. an allocator setting to compare).  Every 30 s the gateway's RSS (with its
``/proc/<pid>/smaps`` detail), threads and open files are read; a twin subscribed to the broker
counts the records that arrived and checks the gateway's sequence (nothing lost, nothing doubled).
The table gives RSS at 30 s, at the end, the peak, the least-squares slope over the whole run and
over its second half (MB per wall-clock hour), threads and open files from the first sample
after start-up to the end, and the hours of data each driver kind carried; then the resident
memory of the last sample per mapped library (and per kind of anonymous memory).

Baseline in the same run: the floor of ``bench_memory.py`` (the common libraries imported, idle).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_memory import EDGETWIN, CsvLog, Trace, compile_bytecode, floor, unit_environment, watch  # noqa: E402

from drivers.ble.testbed.harness import running_testbed  # noqa: E402
from drivers.opcua.plcsim import PlcSimProcess  # noqa: E402
from drivers.serial.sim import PtyOximeter, VitalsModel  # noqa: E402
from gateway.twin.listen import Listener, ListenOptions  # noqa: E402
from gateway.uplink.broker import MosquittoBroker, free_port  # noqa: E402
from gateway.uplink.certs import DemoPKI, demo_pki  # noqa: E402

PATIENT = "soak-bed-1"
PLC_NODES = [
    "Pump1/Vibration/Accelerometer1RMS",
    "Pump1/Vibration/Accelerometer2RMS",
    "Pump1/Motor/Current",
    "Pump1/Motor/Voltage",
    "Pump1/Motor/Temperature",
    "Pump1/Hydraulics/Pressure",
]


def _toml(value: Any) -> str:
    """One TOML value (strings, numbers, booleans, lists and inline tables of them)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{k} = {_toml(v)}" for k, v in value.items()) + " }"
    if isinstance(value, list):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    return json.dumps(str(value))


def plc_source(endpoint: str) -> dict[str, Any]:
    """The PLC's ``[[sources]]`` table (the pump model's inputs named as SKAB names them)."""
    nodes: list[dict[str, str]] = [{"browse_path": p} for p in PLC_NODES]
    nodes += [
        {"browse_path": "Pump1/Hydraulics/FluidTemperature", "name": "Pump1/Thermocouple"},
        {"browse_path": "Pump1/Hydraulics/Flow", "name": "Pump1/RateRMS"},
    ]
    return {
        "name": "pump-3-plc",
        "driver": "opcua",
        "subject": "plant-A/pump-3",
        "kind": "industrial",
        "endpoint": endpoint,
        "security_policy": "None",
        "security_mode": "None",
        "namespace_uri": "urn:edgetwin:plcsim",
        "nodes": nodes,
    }


@contextlib.contextmanager
def devices(tmp: Path, speed: float) -> Iterator[list[dict[str, Any]]]:
    """Every simulated device on its real transport; yields the ``[[sources]]`` tables."""
    tmp.mkdir(parents=True, exist_ok=True)
    with contextlib.ExitStack() as stack:
        sources: list[dict[str, Any]] = []
        for i, protocol in enumerate(("nonin2", "masimo")):
            vitals = VitalsModel(11 + i, desat_first_s=120.0, desat_every_s=600.0, sensor_off_first_s=900.0)
            ox = PtyOximeter(protocol, link=tmp / f"usb-oximeter-{i}", vitals=vitals, seed=11 + i).start()
            stack.callback(ox.stop)
            sources.append(
                {
                    "name": f"bed-{i + 1}-oximeter",
                    "driver": "serial",
                    "subject": f"soak-bed-{i + 1}",
                    "kind": "medical",
                    "port": str(ox.path),
                    "protocol": protocol,
                }
            )
        tb = stack.enter_context(running_testbed(scan_interval_s=0.2))  # sets DBUS_SYSTEM_BUS_ADDRESS
        wearables = (("hr", "A4:C1:38:50:AC:01"), ("plx", "A4:C1:38:50:AC:02"))
        for k, (profile, address) in enumerate(wearables):
            tb.wearable(profile, address, seed=21 + k, rate=speed)
        sources.append(
            {
                "name": "bed-1-wearables",
                "driver": "ble",
                "subject": PATIENT,
                "kind": "medical",
                "adapter": "hci0",
                "devices": [{"address": a, "profile": p} for p, a in wearables],
            }
        )
        server = PlcSimProcess(free_port(), "--rate-hz", f"{10 * speed:g}", "--control", "none")
        server.start()
        stack.callback(server.stop)
        sources.append(plc_source(server.endpoint))
        sources.extend(
            {
                "name": f"motor-{k + 1}-adc",
                "driver": "mcu",
                "subject": f"plant-A/motor-{k + 1}",
                "kind": "industrial",
                "simulate": {"node_id": f"SOAK-MOTOR-{k + 1}", "seed": 31 + k},
            }
            for k in range(2)
        )
        yield sources


def config(
    tmp: Path,
    pki: DemoPKI,
    broker: MosquittoBroker,
    sources: list[dict[str, Any]],
    models: bool,
    backend: str = "card",
    trim_s: float = 600.0,
) -> Path:
    """The gateway's config: every source, the MQTT uplink, both models (on ``backend``) unless told otherwise."""
    state = tmp / "state"
    state.mkdir(parents=True, exist_ok=True)
    mqtt = {
        "host": broker.host,
        "port": broker.port,
        "ca_file": str(pki.ca_file),
        "cert_file": str(pki.gateway.cert),
        "key_file": str(pki.gateway.key),
    }
    lines = ["[gateway]", 'name = "bench-soak"', f"state_dir = {_toml(str(state))}"]
    lines += ["[uplink]", 'kind = "mqtt"', "[uplink.mqtt]", *(f"{k} = {_toml(v)}" for k, v in mqtt.items())]
    use = '[{ name = "vitals_mimic" }, { name = "pump_skab", commissioning_s = 60.0 }]' if models else "[]"
    lines += [
        "[models]",
        f"backend = {_toml(backend)}",
        f"use = {use}",
        "[runtime]",
        f"memory_trim_s = {trim_s!r}",
        "drain_deadline_s = 5.0",
        "start_timeout_s = 30.0",
    ]
    for source in sources:
        lines += ["[[sources]]", *(f"{k} = {_toml(v)}" for k, v in source.items())]
    path = tmp / "gateway.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


# Run with --tracemalloc: the gateway under tracemalloc, a snapshot of its Python heap every few
# minutes (a thread of this wrapper; the figures of such a run are not the service's).
TRACED = """
import sys, threading, time, tracemalloc
tracemalloc.start(8)
out, every = sys.argv[1], float(sys.argv[2])
def snapshots():
    k = 0
    while True:
        time.sleep(every)
        tracemalloc.take_snapshot().dump(f"{out}/snap-{k:03d}.pickle")
        k += 1
threading.Thread(target=snapshots, name="bench:tracemalloc", daemon=True).start()
from gateway.cli import main
sys.exit(main(sys.argv[3:]))
"""


def traced_diff(directory: Path, top: int = 12) -> list[str]:
    """What grew in the Python heap from the second snapshot to the last, by line."""
    import tracemalloc  # noqa: PLC0415 - only for a traced run

    snaps = sorted(directory.glob("snap-*.pickle"))
    if len(snaps) < 3:
        return [f"tracemalloc: {len(snaps)} snapshot(s): too few to compare"]
    first, last = (tracemalloc.Snapshot.load(str(p)) for p in (snaps[1], snaps[-1]))
    drop = [tracemalloc.Filter(False, tracemalloc.__file__), tracemalloc.Filter(False, "<frozen *>")]
    stats = last.filter_traces(drop).compare_to(first.filter_traces(drop), "lineno")
    total = sum(s.size_diff for s in stats)
    lines = [f"tracemalloc: {snaps[1].name} -> {snaps[-1].name}: Python heap {total / 1024:+.0f} KiB"]
    lines += [
        f"  {s.size_diff / 1024:+8.1f} KiB {s.count_diff:+7d} blocks  {s.traceback}" for s in stats[:top]
    ]
    return lines


def slope(t: list[float], y: list[float]) -> float:
    """Least-squares slope of ``y`` per hour of ``t`` (seconds)."""
    if len(t) < 2:
        return float("nan")
    mt, my = sum(t) / len(t), sum(y) / len(y)
    den = sum((a - mt) ** 2 for a in t)
    return sum((a - mt) * (b - my) for a, b in zip(t, y, strict=True)) / den * 3600 if den else 0.0


def run_env(args: argparse.Namespace) -> dict[str, str]:
    """The systemd unit's Environment= settings with ``--env`` over them."""
    return {**unit_environment(), **dict(e.split("=", 1) for e in args.env)}


def soak(args: argparse.Namespace, tmp: Path) -> tuple[Trace, Listener, str]:
    """Start the devices, the broker, the twin and the gateway; watch the gateway for the run."""
    pki = demo_pki(tmp / "pki")
    broker = MosquittoBroker(tmp / "broker", pki)
    broker.start()
    twin = Listener(
        ListenOptions(
            host=broker.host,
            port=broker.port,
            ca_file=pki.ca_file,
            cert_file=pki.twin.cert,
            key_file=pki.twin.key,
        ),
        keep=False,
    )
    try:
        twin.start()
        with devices(tmp / "dev", args.speed) as sources:
            cfg = config(tmp / "gw", pki, broker, sources, not args.no_models, args.backend, args.trim_s)
            log = tmp / "gateway.log"
            csv_log = (CsvLog(args.csv), "every driver") if args.csv is not None else None
            argv = [str(EDGETWIN), "run", "--config", str(cfg)]
            if args.tracemalloc is not None:
                args.tracemalloc.mkdir(parents=True, exist_ok=True)
                argv = [sys.executable, "-c", TRACED, str(args.tracemalloc), str(args.every * 10), *argv[1:]]
            with log.open("w") as err:
                env = {**os.environ, **run_env(args)}
                proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=err, cwd=ROOT, env=env)
                try:
                    trace = watch(proc, args.minutes * 60, args.every, csv_log)
                finally:
                    proc.send_signal(signal.SIGTERM)
                    try:
                        code = proc.wait(60)
                    except subprocess.TimeoutExpired:
                        proc.kill()
                        code = proc.wait()
            tail = log.read_text(errors="replace")[-3000:]
            if args.log is not None:
                args.log.write_text(log.read_text(errors="replace"))
            if not trace.t or len(trace.t) * args.every < args.minutes * 60 * 0.9:
                raise RuntimeError(f"bench soak: edgetwin run ended early (exit {code}); its log:\n{tail}")
            if code != 0:
                print(f"bench soak: edgetwin run exited {code} on SIGTERM; its log:\n{tail}", file=sys.stderr)
            time.sleep(2.0)  # the last records' PUBLISH reach the twin
    finally:
        twin.stop()
        broker.stop()
    return trace, twin, tail


def main() -> int:
    """Run the soak and print the table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0] if __doc__ else None)
    parser.add_argument("--minutes", type=float, default=60.0, help="wall-clock length (default 60)")
    parser.add_argument(
        "--speed", type=float, default=4.0, help="BLE and OPC UA rate over their nominal rate (default 4)"
    )
    parser.add_argument("--every", type=float, default=30.0, help="seconds between samples (default 30)")
    parser.add_argument("--no-models", action="store_true", help="run without the two anomaly models")
    parser.add_argument("--csv", type=Path, help="write every sample (smaps detail) to this CSV file")
    parser.add_argument(
        "--tracemalloc", type=Path, metavar="DIR", help="trace the gateway's Python heap, snapshots into DIR"
    )
    parser.add_argument("--log", type=Path, help="keep the gateway's log in this file")
    parser.add_argument(
        "--backend", default="card", help="[models] backend: card (default), onnxruntime, litert or numpy"
    )
    parser.add_argument(
        "--env",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="environment of the gateway over the systemd unit's Environment= settings (repeatable)",
    )
    parser.add_argument(
        "--trim-s", type=float, default=600.0, help="[runtime] memory_trim_s (default 600; 0: off)"
    )
    parser.add_argument("--top", type=int, default=16, help="mappings listed by resident memory (default 16)")
    parser.add_argument(
        "--source",
        action="store_true",
        help="do not compile bytecode first (pip compiles it when it installs the gateway)",
    )
    args = parser.parse_args()
    if args.csv is not None:
        args.csv.unlink(missing_ok=True)
    if not args.source:
        compile_bytecode(run_env(args))
    base = floor(3.0)
    with tempfile.TemporaryDirectory(prefix="bench-soak-") as tmp_name:
        trace, twin, _ = soak(args, Path(tmp_name))
    hours = args.minutes / 60
    t, rss = trace.t, trace.rss_mb
    h = len(t) // 2
    first = 1 if len(t) > 2 else 0  # the first sample is start-up, not growth
    print(
        f"edgetwin run, every real driver at once, MQTT uplink (mosquitto on loopback, TLS), "
        f"{args.minutes:g} min, samples every {args.every:g} s, models {'off' if args.no_models else 'on'}"
        f" (backend {args.backend}, memory_trim_s {args.trim_s:g}); environment {' '.join(f'{k}={v}' for k, v in run_env(args).items())}; "
        f"{'run from source (no bytecode)' if args.source else 'bytecode compiled as pip installs it'}; "
        f"Python {sys.version.split()[0]}\n"
    )
    print("| driver kind | streams | data carried |")
    print("|---|---|---:|")
    print(
        f"| BLE (emulated BlueZ) | strap + PLX at {args.speed:g}x | {2 * hours * args.speed:.1f} device-h |"
    )
    print(f"| serial (pty) | Nonin #2 + Masimo at line rate | {2 * hours:.1f} device-h |")
    print(
        f"| OPC UA (asyncua server) | 8 nodes at {10 * args.speed:g}/s | {hours * args.speed:.1f} h at 10/s |"
    )
    print(f"| MCU (C node on a pty) | two nodes at firmware rate | {2 * hours:.1f} device-h |\n")
    print(
        "| RSS first sample | RSS end | peak | slope, whole run | slope, 2nd half | threads | open files "
        "| records at the twin | lost / doubled | vs floor |"
    )
    print("|---:|---:|---:|---:|---:|---|---|---:|---|---:|")
    seq = list(twin.checker.gateways.values())
    lost = sum(s.missing for s in seq)
    doubled = sum(s.duplicates for s in seq)
    print(
        f"| {rss[0]:.1f} MB | {rss[-1]:.1f} MB | {trace.peak_mb:.1f} MB | {slope(t[first:], rss[first:]):+.2f} MB/h "
        f"| {slope(t[h:], rss[h:]):+.2f} MB/h | {trace.threads[first]} -> {max(trace.threads[first:])} "
        f"-> {trace.threads[-1]} | {trace.fds[first]} -> {max(trace.fds[first:])} -> {trace.fds[-1]} "
        f"| {twin.records_received} | {lost} / {doubled} | {rss[-1] / base.rss_mb[-1]:.2f}x |"
    )
    print()
    for line in twin.checker.report():
        print(f"twin: {line}")
    for gw in twin.view.gateways.values():
        for sub in gw.subjects.values():
            metrics = sorted(sub.streams)
            print(
                f"twin: subject {sub.subject[:12]} ({sub.kind}): {sub.windows} windows, {sub.alarms} alarms, "
                f"{len(metrics)} streams: {', '.join(metrics)}"
            )
    print(f"floor: {base.rss_mb[-1]:.1f} MB")
    print(f"threads at the end: {', '.join(trace.thread_names)}")
    print(f"resident at the last sample, by mapping (top {args.top}):")
    for name, mb in trace.by_file[: args.top]:
        print(f"  {mb:7.2f} MB  {name}")
    if args.tracemalloc is not None:
        print("\n".join(traced_diff(args.tracemalloc)))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
