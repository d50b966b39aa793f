"""Ingest ceiling per driver kind: the offered rate at which the gateway's loop falls behind,
beside a minimal client reading the same peer in the same run.

Run: ``.venv/bin/python tests/benchmarks/bench_peers.py [--kinds serial,opcua,ble,peers] [--seconds 3]``

``--kinds peers`` is the OPC UA subscribe -> MQTT comparison on a node-opcua server: edgetwin
(``edgetwin run``) beside a bare asyncua client, a plain asyncua -> paho bridge and Node-RED with
node-red-contrib-opcua, each in its own process on one CPU (``opcua_peers.py`` says how).

The measured process is pinned to one CPU; the peer runs in its own process on another CPU where
there is one.  The offered rate rises step by step; at each step both readers get the same
offer, one after the other:

* serial: a writer process plays a Nonin #2 recording into a pty at the step's frame rate (a pty
  ignores the baud rate, so the offer can exceed any real line); ours is the serial driver feeding
  the pipeline's ``Windower`` (windows closed on a timer), the baseline an ``add_reader`` callback
  that only counts bytes (frames = bytes / 5).
* ble: bursts of Heart Rate notifications from a simulated strap on the emulated radio, flat out
  (the emulator sets the pace); ours is the BLE driver into the ``Windower``, the baseline a bare
  ``BleakClient.start_notify`` callback that counts (``bench_ble.py``'s two sides).
* opcua: the PLC simulator (asyncua server) updates N variables at the step's rate; ours is the
  OPC UA driver into the ``Windower``, the baseline a bare asyncua subscription handler that counts
  (``bench_opcua.py``'s two sides).

A reader keeps up at a step when it delivers at least 98 % of what the peer offered (a pty pushes
back, so a reader that falls behind shows as a lower delivered rate); its ceiling is the last step
it kept up with.  The p99 lateness of a 10 ms timer on the reader's loop is shown beside it.  Where the peer
itself cannot offer more (the Python OPC UA server saturates near 20-26 k changes/s), the table
says so: then the ceiling is the peer's, for both.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import subprocess
import sys
import time
import tty
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from drivers.ble.testbed.harness import Testbed
from drivers.opcua.plcsim import PlcSimProcess
from drivers.serial.config import SerialConfig
from drivers.serial.driver import factory as serial_factory
from drivers.serial.sim import FrameSource, VitalsModel
from gateway.contracts import Alarm, Diagnostic, SourceInfo
from gateway.pipeline.windows import Windower
from gateway.sample import Sample, SampleBlock

KEEP_UP = 0.98
NONIN2_FRAME = 5
#: Writer process: paces ``rate`` frames/s of a recording into the pty master it inherits.
WRITER = """
import os, sys, time
fd, rate, seconds, path = int(sys.argv[1]), float(sys.argv[2]), float(sys.argv[3]), sys.argv[4]
data = open(path, "rb").read()
tick = 0.005
per_tick = max(5, int(rate * 5 * tick)) // 5 * 5
t0 = time.monotonic()
sent = pos = 0
while time.monotonic() - t0 < seconds:
    due = int((time.monotonic() - t0) / tick) * per_tick
    while sent < due:
        chunk = data[pos : pos + min(per_tick, due - sent)]
        if not chunk:
            pos = 0
            continue
        try:
            n = os.write(fd, chunk)
        except BlockingIOError:
            time.sleep(0.0005)
            continue
        sent += n
        pos += n
    time.sleep(tick / 2)
print(sent)
"""


@dataclass
class Step:
    """One reader at one offered rate."""

    offered: float  # per second
    delivered: float  # per second
    lag_s: float  # p99 lateness of a 10 ms timer on the reader's loop
    cpu_per_item_us: float
    nominal: float = 0.0  # what the peer was asked to offer, where it may serve less
    sent: float = 0.0  # what a pty writer managed (less than nominal: pushed back, or its own limit)

    @property
    def kept_up(self) -> bool:
        """Delivered nearly all that was offered without the loop lagging."""
        return self.delivered >= KEEP_UP * self.offered


class _WindowSink:
    """The pipeline hand-off: samples into a real Windower; counts them."""

    def __init__(self) -> None:
        self.windower = Windower(
            window_s=10.0, hop_s=5.0, grace_s=1.0, lost_after_s=15.0, on_alarm=lambda a: None
        )
        self.samples = 0

    def put(self, sample: Sample) -> None:
        self.samples += 1
        self.windower.put(sample)

    def put_block(self, block: SampleBlock) -> None:
        self.samples += len(block)
        self.windower.put_block(block)

    def alarm(self, alarm: Alarm) -> None:
        pass

    def diagnostic(self, diagnostic: Diagnostic) -> None:
        pass


async def _lag_monitor(out: list[float]) -> None:
    """Lateness of a 10 ms sleep, appended to ``out``."""
    while True:
        t = time.monotonic()
        await asyncio.sleep(0.01)
        out.append(time.monotonic() - t - 0.01)


async def _windows(windower: Windower) -> None:
    while True:
        windower.close_due(time.monotonic(), time.time())
        await asyncio.sleep(0.5)


def _peer_cpu() -> set[int] | None:
    cpus = sorted(os.sched_getaffinity(0))
    return {cpus[-1]} if len(cpus) > 1 else None


async def serial_step(rate: float, seconds: float, recording: Path, ours: bool) -> Step:
    """One reader of a pty while the writer offers ``rate`` Nonin #2 frames per second."""
    master, slave = os.openpty()
    tty.setraw(slave)
    os.set_blocking(master, False)
    lag: list[float] = []
    tasks: list[asyncio.Task[None]] = [asyncio.create_task(_lag_monitor(lag), name="bench:lag")]
    drv = None
    sink = _WindowSink()
    got = [0]
    loop = asyncio.get_running_loop()
    try:
        if ours:
            drv = serial_factory(
                SourceInfo("bench", "bench-bed", "medical"),
                SerialConfig.model_validate({"port": os.ttyname(slave), "protocol": "nonin2"}),
            )
            # READY comes with the first good frame: the port is open and flushed after a moment.
            tasks.append(asyncio.create_task(drv.run(sink, started=lambda: None), name="bench:serial"))
            tasks.append(asyncio.create_task(_windows(sink.windower), name="bench:windows"))
        else:
            fd = os.dup(slave)
            os.set_blocking(fd, False)

            def readable() -> None:
                with contextlib.suppress(BlockingIOError):
                    got[0] += len(os.read(fd, 65536))

            loop.add_reader(fd, readable)
        await asyncio.sleep(0.5)
        lag.clear()
        c0 = time.process_time()
        writer = subprocess.Popen(
            [sys.executable, "-c", WRITER, str(master), str(rate), str(seconds), str(recording)],
            pass_fds=(master,),
            stdout=subprocess.PIPE,
            text=True,
        )
        cpu = _peer_cpu()
        if cpu is not None:
            os.sched_setaffinity(writer.pid, cpu)
        out, _ = await asyncio.to_thread(writer.communicate)
        await asyncio.sleep(0.2)  # what was written in the last instant
        sent_frames = int(out) / NONIN2_FRAME
        cpu_s = time.process_time() - c0
        if not ours:
            loop.remove_reader(fd)
            os.close(fd)
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        os.close(master)
        os.close(slave)
    # The driver adds its parser's counters up when a run ends (the cancel above).
    frames = drv.totals.get("frames", 0) if drv is not None else got[0] / NONIN2_FRAME
    # A pty pushes back: a reader that falls behind slows the writer, so what is delivered is
    # compared with the nominal offer (the baseline shows the writer can reach it).
    p99 = float(sorted(lag)[int(0.99 * (len(lag) - 1))]) if lag else 0.0
    return Step(rate, frames / seconds, p99, cpu_s / max(1.0, frames) * 1e6, rate, sent_frames / seconds)


def serial_sweep(seconds: float, rates: list[float]) -> list[tuple[Step, Step]]:
    """(baseline, ours) per offered rate until both fell behind."""
    recording = Path(f"/tmp/edgetwin-bench-peers-{os.getpid()}.nonin2")
    src = FrameSource("nonin2", VitalsModel(1), spot_every_s=1.0)
    recording.write_bytes(b"".join(src.between(t, t + 1.0) for t in range(600)))
    rows = []
    try:
        for rate in rates:
            base = asyncio.run(serial_step(rate, seconds, recording, ours=False))
            ours = asyncio.run(serial_step(rate, seconds, recording, ours=True))
            rows.append((base, ours))
            print(
                f"serial {rate:>9,.0f} frames/s offered: baseline {fmt(base)} | ours {fmt(ours)}", flush=True
            )
            if not base.kept_up and not ours.kept_up:
                break
    finally:
        recording.unlink(missing_ok=True)
    return rows


def opcua_sweep(seconds: float, steps: list[tuple[int, float]]) -> list[tuple[Step, Step]]:
    """(baseline, ours) per offered change rate (items x Hz) on the PLC simulator."""
    import bench_opcua  # noqa: PLC0415 - the two OPC UA sides live there

    rows = []
    for n, hz in steps:
        sim = PlcSimProcess(
            bench_opcua.free_port(), "--rate-hz", str(hz), "--extra", str(n), "--control", "none"
        )
        sim.start(timeout_s=60)
        try:
            cpu = _peer_cpu()
            if cpu is not None and sim.proc is not None:
                os.sched_setaffinity(sim.proc.pid, cpu)
            offered = n * hz
            b_rate, b_cpu = asyncio.run(bench_opcua.bare(sim.endpoint, n, seconds))
            d_rate, d_cpu, _, _ = asyncio.run(bench_opcua.driver(sim.endpoint, n, seconds, hz))
        finally:
            sim.stop()
        # The server's own output is not observable: when neither reader got the nominal offer,
        # the better of the two is what the server managed (the peer is the limit).  The loop
        # lag is not sampled here (bench_opcua's sides run their own loops).
        got = min(offered, max(b_rate, d_rate))
        base = Step(got, b_rate, 0.0, b_cpu * 1e6, offered)
        ours = Step(got, d_rate, 0.0, d_cpu * 1e6, offered)
        rows.append((base, ours))
        print(
            f"opcua {n} items x {hz:g} Hz = {offered:,.0f}/s offered: baseline {fmt(base)} | ours {fmt(ours)}",
            flush=True,
        )
        if got < KEEP_UP * offered:
            print("opcua: the server could not serve the nominal rate; stopping the sweep")
            break
    return rows


def ble_flat_out(n: int, runs: int) -> list[tuple[Step, Step]]:
    """(baseline, ours) for bursts of ``n`` notifications sent as fast as the emulated radio relays.

    The emulator (private dbus-daemon + emulated BlueZ + the strap, ``bench_ble.py``'s testbed)
    cannot be paced above what it relays, so there is one step: flat out, the served rate being the
    better reader's (median of ``runs`` bursts each).
    """
    import bench_ble  # noqa: PLC0415 - the two BLE sides and the testbed live there

    base: list[tuple[float, float]] = []
    ours: list[tuple[float, float]] = []
    timeout_s = max(30.0, n / 100)
    with Testbed(scan_interval_s=0.1) as tb:
        strap = tb.wearable("hr", bench_ble.ADDRESS, rate=0)
        for _ in range(runs):
            base.append(asyncio.run(bench_ble.baseline_run(n, strap, timeout_s)))
            ours.append(asyncio.run(bench_ble.ours_run(n, strap, timeout_s)))
    b_rate, o_rate = bench_ble.median(base, 0), bench_ble.median(ours, 0)
    served = max(b_rate, o_rate)
    b = Step(served, b_rate, 0.0, bench_ble.median(base, 1) * 1e6, float("inf"))
    o = Step(served, o_rate, 0.0, bench_ble.median(ours, 1) * 1e6, float("inf"))
    print(f"ble flat out ({n} per burst, median of {runs}): baseline {fmt(b)} | ours {fmt(o)}", flush=True)
    return [(b, o)]


def fmt(s: Step) -> str:
    """One reader's figures at one step."""
    return (
        f"{s.delivered:>10,.0f}/s ({s.delivered / s.offered:6.1%}) lag p99 {s.lag_s * 1e3:5.0f} ms "
        f"{s.cpu_per_item_us:5.1f} us CPU/item {'ok' if s.kept_up else 'BEHIND'}"
    )


def ceiling(rows: list[tuple[Step, Step]], side: int) -> float:
    """The highest offered rate one side kept up with (0 when none)."""
    if rows[0][side].nominal == float("inf"):  # flat out: what it took is its ceiling here
        return rows[0][side].delivered
    kept = [r[side].offered for r in rows if r[side].kept_up]
    return max(kept, default=0.0)


def main(argv: list[str] | None = None) -> int:
    """Sweep each kind and print the ceilings with their ratio."""
    ap = argparse.ArgumentParser(prog="bench_peers", description=__doc__)
    ap.add_argument("--kinds", default="serial,opcua,ble")
    ap.add_argument("--ble-n", type=int, default=3000, help="BLE notifications per burst")
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--items", type=int, default=1000, help="peers: OPC UA items on the node-opcua server")
    ap.add_argument("--period-ms", type=float, default=100.0, help="peers: how often every item changes")
    ap.add_argument("--peer-seconds", type=float, default=55.0, help="peers: measured window per subject")
    ap.add_argument(
        "--quota", type=float, help="peers: each subject under this CPU quota of its core (Pi profile: 0.35)"
    )
    ap.add_argument("--only", default="", help="peers: comma-separated words picking subjects by name")
    ap.add_argument("--models", help="peers: edgetwin's [models] use = [...] entries (default: pump_skab)")
    args = ap.parse_args(argv)
    if set(args.kinds.split(",")) == {"peers"}:
        return peers(args)
    cpus = sorted(os.sched_getaffinity(0))
    os.sched_setaffinity(0, {cpus[0]})
    print(f"gateway side pinned to CPU {cpus[0]}; load average {os.getloadavg()[0]:.1f}")
    table = []
    if "serial" in args.kinds:
        rates = [5_000.0, 20_000.0, 50_000.0, 100_000.0, 200_000.0, 400_000.0, 800_000.0]
        rows = serial_sweep(args.seconds, rates)
        table.append(("serial pty (Nonin #2 frames/s)", rows))
    if "opcua" in args.kinds:
        rows = opcua_sweep(args.seconds, [(1000, 5.0), (1000, 10.0), (1000, 20.0), (1000, 40.0)])
        table.append(("OPC UA (changes/s)", rows))
    if "ble" in args.kinds:
        table.append(("BLE heart rate (notifications/s)", ble_flat_out(args.ble_n, 3)))
    print()
    print("| driver kind | offered steps | baseline ceiling | edgetwin ceiling | ratio | note |")
    print("|---|---|---:|---:|---:|---|")
    for name, rows in table:
        b, o = ceiling(rows, 0), ceiling(rows, 1)
        flat = rows[0][0].nominal == float("inf")
        served_less = not flat and any(r[0].offered < KEEP_UP * r[0].nominal for r in rows)
        # A side that kept up at the last step was never pushed to its limit: its ceiling is higher.
        open_b, open_o = rows[-1][0].kept_up, rows[-1][1].kept_up
        note = ""
        if flat or served_less:
            # The peer is the limit: what each side took at the last step is all there is to say.
            b, o = rows[-1][0].delivered, rows[-1][1].delivered
            open_b = open_o = False
            note = (
                "flat out: the emulator sets the pace; rates as delivered"
                if flat
                else "the peer served less than asked (its ceiling); rates as delivered at the last step"
            )
        steps = ", ".join(
            f"{r[0].offered:,.0f}" if r[0].nominal != float("inf") else "flat out" for r in rows
        )
        ratio = (
            f"{'>= ' if open_o and not open_b else '<= ' if open_b and not open_o else ''}{o / b:.2f}"
            if b
            else "-"
        )
        print(
            f"| {name} | {steps} | {'>= ' if open_b else ''}{b:,.0f} | {'>= ' if open_o else ''}{o:,.0f} | "
            f"{ratio} | {note} |"
        )
    print(f"load average at end {os.getloadavg()[0]:.1f}")
    if "peers" in args.kinds.split(","):
        os.sched_setaffinity(0, set(cpus))  # the peers place their own processes on the CPUs
        print()
        return peers(args)
    return 0


def peers(args: argparse.Namespace) -> int:
    """OPC UA subscribe -> MQTT: edgetwin and its peers, one after another on a node-opcua server."""
    import tempfile  # noqa: PLC0415

    import opcua_peers  # noqa: PLC0415 - the peers and their processes live there

    print(f"load average {os.getloadavg()[0]:.1f}", flush=True)
    only = {w.strip().lower() for w in args.only.split(",") if w.strip()} or None
    with tempfile.TemporaryDirectory(prefix="bench-peers-") as tmp:
        results, server = opcua_peers.run(
            Path(tmp),
            args.items,
            args.period_ms,
            args.peer_seconds,
            args.models or opcua_peers.PUMP_MODEL,
            only,
            args.quota,
        )
    print()
    print(
        f"OPC UA, {args.items:,} items every {args.period_ms:g} ms ({server}), each subject "
        f"{args.peer_seconds:g} s after a {opcua_peers.WARMUP_S:g} s warm-up"
        + (f", under a CPU quota of {args.quota:g} of one core" if args.quota else ", one core each")
        + "; ratios against edgetwin"
    )
    print("\n".join(opcua_peers.table(results)))
    print(f"load average at end {os.getloadavg()[0]:.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
