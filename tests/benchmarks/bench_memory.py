"""Resident memory of ``edgetwin run`` with the MQTT uplink, against the floor of its libraries.

Run from the repository with the project's virtual environment (mosquitto must be installed)::

    .venv/bin/python tests/benchmarks/bench_memory.py [--seconds 300] [--rate-hz 25]

Two gateways run one after the other as the service runs (``edgetwin run``, a local mosquitto
with TLS 1.3 and client certificates): **one** simulated patient without models, and **two**
sources (patient and pump) with both anomaly models.  Every 5 s the RSS, threads and open files of
the process are read from /proc; the table gives the RSS at the end, the peak, the slope over the
second half of the run (MB per hour; a leak shows here) and the threads and open files from the
middle of the run to its end (start-up is not growth).

Baseline in the same run: a Python process that imports only the libraries every gateway needs
(numpy, pydantic, paho-mqtt, ssl, sqlite3, cbor2) and sleeps - the floor no gateway gets under.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from gateway.uplink.broker import MosquittoBroker  # noqa: E402
from gateway.uplink.certs import DemoPKI, demo_pki  # noqa: E402

EDGETWIN = Path(sys.executable).with_name("edgetwin")
FLOOR = "import numpy, pydantic, paho.mqtt.client, ssl, sqlite3, cbor2, time; print('ready', flush=True); time.sleep(3600)"

# (name, subject, kind, profile, device) of each simulated source.
SOURCES = {
    "patient": ("bed1", "bed-1", "medical", "patient", "A4:C1:38:5B:20:7E"),
    "pump": ("pump1", "pump-1", "industrial", "pump", "SN-PLC-20931"),
}
CASES = {
    "one sim source, no models": ("", ("patient",)),
    "patient + pump, both anomaly models": (
        '{ name = "vitals_mimic" }, { name = "pump_skab" }',
        ("patient", "pump"),
    ),
    # The same, against the runtime the cards did not choose (they name LiteRT where installed).
    "patient + pump, both models on onnxruntime": (
        '{ name = "vitals_mimic", backend = "onnxruntime" }, { name = "pump_skab", backend = "onnxruntime" }',
        ("patient", "pump"),
    ),
}


@dataclass
class Trace:
    """What /proc said about one process, every few seconds."""

    t: list[float]
    rss_mb: list[float]
    threads: list[int]
    fds: list[int]
    peak_mb: float = 0.0

    def slope_mb_per_h(self) -> float:
        """Least-squares RSS slope over the second half of the run."""
        half = len(self.t) // 2
        ts, rs = self.t[half:], self.rss_mb[half:]
        if len(ts) < 2:
            return float("nan")
        mt, mr = sum(ts) / len(ts), sum(rs) / len(rs)
        den = sum((t - mt) ** 2 for t in ts)
        return sum((t - mt) * (r - mr) for t, r in zip(ts, rs, strict=True)) / den * 3600 if den else 0.0


def _status(pid: int) -> dict[str, str]:
    out = {}
    with open(f"/proc/{pid}/status", encoding="ascii") as f:
        for line in f:
            key, _, value = line.partition(":")
            out[key] = value.strip()
    return out


def watch(proc: subprocess.Popen[bytes], seconds: float, every: float = 5.0) -> Trace:
    """Sample RSS, threads and open files of ``proc`` until ``seconds`` pass or it ends."""
    trace = Trace([], [], [], [])
    start = time.monotonic()
    while time.monotonic() - start < seconds and proc.poll() is None:
        time.sleep(min(every, max(0.0, seconds - (time.monotonic() - start))))
        if proc.poll() is not None:
            break
        st = _status(proc.pid)
        trace.t.append(time.monotonic() - start)
        trace.rss_mb.append(int(st["VmRSS"].split()[0]) / 1024)
        trace.threads.append(int(st["Threads"]))
        trace.fds.append(len(os.listdir(f"/proc/{proc.pid}/fd")))
        trace.peak_mb = int(st["VmHWM"].split()[0]) / 1024
    return trace


def config(
    tmp: Path, pki: DemoPKI, broker: MosquittoBroker, models: str, sources: tuple[str, ...], rate: float
) -> Path:
    """A gateway config with the MQTT uplink to the local broker."""
    state = tmp / "state"
    state.mkdir(parents=True, exist_ok=True)
    path = tmp / "gateway.toml"
    mqtt = {
        "host": broker.host,
        "port": broker.port,
        "ca_file": pki.ca_file,
        "cert_file": pki.gateway.cert,
        "key_file": pki.gateway.key,
    }
    lines = ["[gateway]", 'name = "bench-memory"', f'state_dir = "{state}"', "[uplink]", 'kind = "mqtt"']
    lines += [
        "[uplink.mqtt]",
        *(f"{k} = {json.dumps(v if isinstance(v, int) else str(v))}" for k, v in mqtt.items()),
    ]
    lines += ["[models]", f"use = [{models}]", "[runtime]", "drain_deadline_s = 5.0"]
    for source in sources:
        name, subject, kind, profile, device = SOURCES[source]
        lines += ["[[sources]]", f'name = "{name}"', 'driver = "sim"', f'subject = "{subject}"']
        lines += [f'kind = "{kind}"', f'profile = "{profile}"', f'device = "{device}"', f"rate_hz = {rate}"]
    path.write_text("\n".join(lines) + "\n")
    return path


def run_gateway(cfg: Path, seconds: float, log: Path) -> Trace:
    """``edgetwin run`` for ``seconds``, watched; stopped with SIGTERM as the service manager does."""
    with log.open("w") as err:
        proc = subprocess.Popen(
            [str(EDGETWIN), "run", "--config", str(cfg)], stdout=subprocess.DEVNULL, stderr=err
        )
        try:
            trace = watch(proc, seconds)
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    if not trace.t:
        raise RuntimeError(f"bench memory: edgetwin run ended at once: see {log}:\n{log.read_text()[-2000:]}")
    return trace


def floor(seconds: float) -> Trace:
    """The baseline: the gateway's common libraries imported, nothing running."""
    proc = subprocess.Popen([sys.executable, "-c", FLOOR], stdout=subprocess.PIPE)
    try:
        assert proc.stdout is not None
        proc.stdout.readline()
        return watch(proc, seconds, every=1.0)
    finally:
        proc.kill()
        proc.wait()


def main() -> int:
    """Run both gateways and the floor; print the table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0] if __doc__ else None)
    parser.add_argument(
        "--seconds", type=float, default=300.0, help="how long each gateway runs (default 300)"
    )
    parser.add_argument(
        "--rate-hz", type=float, default=25.0, help="rate of every simulated stream (default 25)"
    )
    args = parser.parse_args()
    base = floor(3.0)
    results: dict[str, Trace] = {}
    with tempfile.TemporaryDirectory(prefix="bench-memory-") as tmp_name:
        tmp = Path(tmp_name)
        pki = demo_pki(tmp / "pki")
        broker = MosquittoBroker(tmp / "broker", pki)
        broker.start()
        try:
            for k, (name, (models, sources)) in enumerate(CASES.items()):
                cfg = config(tmp / f"gw{k}", pki, broker, models, sources, args.rate_hz)
                results[name] = run_gateway(cfg, args.seconds, tmp / f"gw{k}.log")
        finally:
            broker.stop()
    floor_mb = base.rss_mb[-1]
    print(
        f"edgetwin run with the MQTT uplink (mosquitto on loopback, TLS), {args.seconds:.0f} s each, "
        f"sim streams at {args.rate_hz:g} Hz; Python {sys.version.split()[0]}\n"
    )
    print("| gateway | RSS at end | peak | slope, 2nd half | threads | open files | vs floor |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, tr in results.items():
        h = len(tr.t) // 2  # from the middle of the run: start-up is not growth
        print(
            f"| {name} | {tr.rss_mb[-1]:.1f} MB | {tr.peak_mb:.1f} MB | {tr.slope_mb_per_h():+.1f} MB/h "
            f"| {tr.threads[h]} -> {tr.threads[-1]} | {tr.fds[h]} -> {tr.fds[-1]} | {tr.rss_mb[-1] / floor_mb:.2f}x |"
        )
    print(
        f"| **floor**: numpy, pydantic, paho-mqtt, ssl, sqlite3, cbor2 imported | {floor_mb:.1f} MB | | | | | 1.00x |"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
