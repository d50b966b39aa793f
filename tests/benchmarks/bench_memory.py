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
import compileall
import contextlib
import csv
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
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
    # The same, against the runtimes the cards did not choose (they name numpy for both).
    "patient + pump, both models on onnxruntime": (
        '{ name = "vitals_mimic", backend = "onnxruntime" }, { name = "pump_skab", backend = "onnxruntime" }',
        ("patient", "pump"),
    ),
    "patient + pump, both models on LiteRT": (
        '{ name = "vitals_mimic", backend = "litert" }, { name = "pump_skab", backend = "litert" }',
        ("patient", "pump"),
    ),
}

# Run only when asked (--case two): both sources without models, to tell the models' share apart.
EXTRA_CASES = {"patient + pump, no models": ("", ("patient", "pump"))}
CASE_KEYS = dict(
    zip(("one", "models", "models-onnx", "models-litert", "two"), [*CASES, *EXTRA_CASES], strict=True)
)


@dataclass
class Trace:
    """What /proc said about one process, every few seconds."""

    t: list[float]
    rss_mb: list[float]
    threads: list[int]
    fds: list[int]
    peak_mb: float = 0.0
    by_file: list[tuple[str, float]] = field(default_factory=list)
    thread_names: list[str] = field(default_factory=list)

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


_ARENA_SPAN = 64 << 20  # glibc reserves each thread arena as one 64 MiB region (HEAP_MAX_SIZE)


def smaps(pid: int) -> dict[str, float]:
    """Memory of ``pid`` in MB by kind, from /proc/<pid>/smaps (no instrumentation inside)."""
    maps: list[tuple[int, int, str, str, dict[str, int]]] = []
    with open(f"/proc/{pid}/smaps", encoding="ascii", errors="replace") as f:
        for line in f:
            head = line.split(None, 5)
            if "-" in head[0] and len(head) >= 5 and not head[0].endswith(":"):
                lo, hi = (int(x, 16) for x in head[0].split("-"))
                maps.append((lo, hi, head[1], head[5].strip() if len(head) > 5 else "", {}))
            elif head[0].endswith(":") and maps and len(head) >= 2 and head[1].isdigit():
                maps[-1][4][head[0][:-1]] = int(head[1])
    out = dict.fromkeys(("rss", "pss", "uss", "anon", "heap", "arenas", "anon_other", "libs"), 0.0)
    for i, (lo, hi, perms, name, kb) in enumerate(maps):
        rss = kb.get("Rss", 0)
        out["rss"] += rss
        out["pss"] += kb.get("Pss", 0)
        out["uss"] += kb.get("Private_Clean", 0) + kb.get("Private_Dirty", 0)
        out["anon"] += kb.get("Anonymous", 0)
        if name == "[heap]":
            out["heap"] += rss
        elif name == "" and perms.startswith("rw"):
            nxt = maps[i + 1] if i + 1 < len(maps) else None
            # a thread arena: read-write at the start of a 64 MiB-aligned reservation whose rest is
            # still mapped without access (or fully used)
            whole = hi - lo == _ARENA_SPAN
            tail = nxt is not None and nxt[0] == hi and nxt[2].startswith("---") and nxt[3] == ""
            if lo % _ARENA_SPAN == 0 and (whole or (tail and nxt is not None and nxt[1] - lo == _ARENA_SPAN)):
                out["arenas"] += rss
            else:
                out["anon_other"] += rss
        elif name.startswith("/"):
            out["libs"] += rss
    return {k: v / 1024 for k, v in out.items()}


def smaps_by_file(pid: int) -> list[tuple[str, float]]:
    """Resident MB of ``pid`` per mapped file, and per kind of anonymous memory, largest first."""
    per: dict[str, int] = {}
    name = ""
    with open(f"/proc/{pid}/smaps", encoding="ascii", errors="replace") as f:
        for line in f:
            head = line.split(None, 5)
            if "-" in head[0] and len(head) >= 5 and not head[0].endswith(":"):
                name = head[5].strip() if len(head) > 5 else "[anon]"
                if "/site-packages/" in name:  # the library, not each of its files
                    name = name.split("/site-packages/", 1)[1].split("/", 1)[0].split(".libs")[0]
                elif name.startswith("/"):
                    name = Path(name).name
            elif head[0] == "Rss:":
                per[name] = per.get(name, 0) + int(head[1])
    return sorted(((k, v / 1024) for k, v in per.items()), key=lambda kv: -kv[1])


def thread_names(pid: int) -> list[str]:
    """The names of ``pid``'s threads (``/proc/<pid>/task/*/comm``)."""
    names = []
    for task in sorted(Path(f"/proc/{pid}/task").iterdir()):
        with contextlib.suppress(OSError):
            names.append((task / "comm").read_text().strip())
    return names


def unit_environment(unit: Path = ROOT / "systemd" / "edgetwin.service") -> dict[str, str]:
    """The ``Environment=`` settings of the systemd unit, so a benchmark runs the gateway as it runs."""
    env = {}
    for line in unit.read_text().splitlines():
        if line.startswith("Environment="):
            for item in line.removeprefix("Environment=").split():
                key, _, value = item.partition("=")
                env[key] = value
    return env


def compile_bytecode(env: Mapping[str, str]) -> None:
    """Compile the gateway's modules to bytecode, as ``pip install`` does, here and on ``PYTHONPATH``.

    An editable install run with ``PYTHONDONTWRITEBYTECODE`` has none, and then every start compiles
    the gateway's sources: memory the installed service does not spend (one sim source: 1.6 MB more
    RSS at 30 s, most of it returned by the first trim).  ``--source`` measures that way on purpose.
    """
    roots = [ROOT, *(Path(p) for p in env.get("PYTHONPATH", "").split(os.pathsep) if p)]
    for root in roots:
        for package in ("gateway", "drivers", "firmware_bridge"):
            if (root / package).is_dir():
                compileall.compile_dir(root / package, quiet=1)


def _cpu_s(pid: int) -> float:
    with open(f"/proc/{pid}/stat", encoding="ascii") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class CsvLog:
    """Detailed samples appended to a CSV file as they are taken (a soak that dies keeps its rows)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fields: list[str] | None = None

    def write(self, case: str, row: dict[str, float]) -> None:
        """Append one row, with the header before the first."""
        with self.path.open("a", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=["case", *row])
            if self._fields is None:
                self._fields = list(row)
                writer.writeheader()
            writer.writerow({"case": case, **{k: round(v, 3) for k, v in row.items()}})


def watch(
    proc: subprocess.Popen[bytes],
    seconds: float,
    every: float = 5.0,
    log: tuple[CsvLog, str] | None = None,
) -> Trace:
    """Sample RSS, threads and open files of ``proc`` until ``seconds`` pass or it ends.

    The trace keeps the last sample's memory per mapped file and the thread names.
    """
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
        with contextlib.suppress(OSError):
            trace.by_file, trace.thread_names = smaps_by_file(proc.pid), thread_names(proc.pid)
        if log is not None:
            row = {"t_s": trace.t[-1], **smaps(proc.pid), "cpu_s": _cpu_s(proc.pid)}
            row.update(threads=trace.threads[-1], fds=trace.fds[-1], load1=os.getloadavg()[0])
            log[0].write(log[1], row)
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


def run_gateway(
    cfg: Path,
    seconds: float,
    log: Path,
    *,
    every: float = 5.0,
    csv_log: tuple[CsvLog, str] | None = None,
    env: dict[str, str] | None = None,
) -> Trace:
    """``edgetwin run`` for ``seconds``, watched; stopped with SIGTERM as the service manager does."""
    with log.open("w") as err:
        proc = subprocess.Popen(
            [str(EDGETWIN), "run", "--config", str(cfg)],
            stdout=subprocess.DEVNULL,
            stderr=err,
            env={**os.environ, **unit_environment(), **(env or {})},
        )
        try:
            trace = watch(proc, seconds, every, csv_log)
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
    parser.add_argument("--minutes", type=float, help="a soak: how long each gateway runs, in minutes")
    parser.add_argument(
        "--rate-hz", type=float, default=25.0, help="rate of every simulated stream (default 25)"
    )
    parser.add_argument(
        "--case", choices=sorted(CASE_KEYS), action="append", help="run only this case (repeatable)"
    )
    parser.add_argument("--every", type=float, help="seconds between samples (default 5; 30 in a soak)")
    parser.add_argument("--csv", type=Path, help="write every sample (smaps detail) to this CSV file")
    parser.add_argument(
        "--env", action="append", default=[], metavar="KEY=VALUE", help="environment for the gateway"
    )
    parser.add_argument(
        "--source",
        action="store_true",
        help="do not compile bytecode first (pip compiles it when it installs the gateway)",
    )
    args = parser.parse_args()
    seconds = args.minutes * 60 if args.minutes else args.seconds
    every = args.every or (30.0 if args.minutes else 5.0)
    env = dict(item.split("=", 1) for item in args.env)
    every_case = {**CASES, **EXTRA_CASES}
    cases = {CASE_KEYS[k]: every_case[CASE_KEYS[k]] for k in args.case} if args.case else CASES
    csv_log = CsvLog(args.csv) if args.csv is not None else None
    if args.csv is not None:
        args.csv.unlink(missing_ok=True)
    if not args.source:
        compile_bytecode(env)
    base = floor(3.0)
    results: dict[str, Trace] = {}
    with tempfile.TemporaryDirectory(prefix="bench-memory-") as tmp_name:
        tmp = Path(tmp_name)
        pki = demo_pki(tmp / "pki")
        broker = MosquittoBroker(tmp / "broker", pki)
        broker.start()
        try:
            for k, (name, (models, sources)) in enumerate(cases.items()):
                cfg = config(tmp / f"gw{k}", pki, broker, models, sources, args.rate_hz)
                results[name] = run_gateway(
                    cfg,
                    seconds,
                    tmp / f"gw{k}.log",
                    every=every,
                    csv_log=None if csv_log is None else (csv_log, name),
                    env=env,
                )
        finally:
            broker.stop()
    floor_mb = base.rss_mb[-1]
    print(
        f"edgetwin run with the MQTT uplink (mosquitto on loopback, TLS), {seconds:.0f} s each, "
        f"sim streams at {args.rate_hz:g} Hz; Python {sys.version.split()[0]}"
        + (f"; environment {' '.join(args.env)}" if args.env else "")
        + ("; run from source (no bytecode)" if args.source else "; bytecode compiled as pip installs it")
        + "\n"
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
