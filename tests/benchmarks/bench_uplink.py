"""Uplink benchmarks against a local mosquitto with TLS 1.3 and client certificates.

Run from the repository with the project's virtual environment (mosquitto must be installed)::

    .venv/bin/python tests/benchmarks/bench_uplink.py [--n 20000] [--repeat 3]

Another revision's gateway is measured by putting it first on ``PYTHONPATH`` (e.g. from ``git
archive``); the header names the one imported.  Prints a markdown table.  Each figure is compared with a baseline measured in the same run:

* throughput: records/s from the durable outbox through TLS at QoS 1 (lease, publish, PUBACK,
  delete) against a bare paho-mqtt publish loop of the same payloads to the same broker;
* alarm latency: from the sample that raises a sensor-fault alarm, through pipeline, anonymizer,
  outbox (committed), uplink and broker, to the twin's decoded record (``--timing``: where each
  alarm's time went, from its commit's call and lock to the twin); beside it, how long the event
  loop was held (a probe's 1 ms sleeps, their overrun) and the process's CPU time per change;
* bytes on the wire per stream-hour (TLS records both ways, counted by a TCP relay) for the
  simulated patient and pump against one JSON message per sample;
* replay rate of a backlog after an outage, paced (the default) and unpaced.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import math
import os
import sqlite3
import ssl
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

ROOT = Path(__file__).resolve().parents[2]
# Behind PYTHONPATH when one is given, so another revision's gateway can be measured by this script.
sys.path.insert(0 if not os.environ.get("PYTHONPATH") else len(sys.path), str(ROOT))

from drivers.sim.config import SimConfig  # noqa: E402
from drivers.sim.driver import SimDriver  # noqa: E402
from gateway.anonymize import Anonymizer, Pseudonymizer  # noqa: E402
from gateway.config import validate  # noqa: E402
from gateway.contracts import Lane, SourceInfo  # noqa: E402
from gateway.outbox import AsyncOutbox, Outbox, OutItem  # noqa: E402
from gateway.records import FeaturesWindow, SeqMeta, StreamWindow, encode, wrap  # noqa: E402
from gateway.runtime import Pipeline  # noqa: E402
from gateway.sample import MDC, Quality, Sample, Stream, industrial_metric  # noqa: E402
from gateway.twin.listen import Listener, ListenOptions  # noqa: E402
from gateway.uplink.broker import MosquittoBroker  # noqa: E402
from gateway.uplink.certs import DemoPKI, demo_pki  # noqa: E402
from gateway.uplink.config import MqttSection  # noqa: E402
from gateway.uplink.mqtt import MqttUplink  # noqa: E402

GW = "gwbench000000000"


def window_payload(i: int) -> bytes:
    """A patient window of five streams, as the anonymizer builds it."""
    streams = [
        StreamWindow(
            name,
            MDC[name].unit,
            "devpseudonym0001",
            30,
            mdc=MDC[name].mdc,
            features={"mean": 71.3 + i % 7, "std": 1.27, "min": 69.0, "max": 74.5, "slope": -0.013},
        )
        for name in ("MDC_ECG_HEART_RATE", "MDC_PULS_OXIM_SAT_O2", "MDC_RESP_RATE", "MDC_TEMP_BODY")
    ]
    rr = MDC["MDC_ECG_TIME_PD_RR_GL"]
    streams.append(
        StreamWindow(
            rr.name,
            rr.unit,
            "devpseudonym0001",
            35,
            mdc=rr.mdc,
            features={"rmssd": 42.1, "sdnn": 51.7, "pnn50": 14.3},
        )
    )
    return encode(FeaturesWindow("subjpseudonym001", "medical", 10.0 * i, 30.0, tuple(streams), run=1))


def mqtt_cfg(broker: MosquittoBroker, pki: DemoPKI, **kw: Any) -> MqttSection:
    base: dict[str, Any] = {
        "host": broker.host,
        "port": broker.port,
        "ca_file": pki.ca_file,
        "cert_file": pki.gateway.cert,
        "key_file": pki.gateway.key,
        "replay_msgs_per_s": 1e9,
        "replay_bytes_per_s": 1e12,
        "max_inflight": 1024,
        "batch": 256,
    }
    base.update(kw)
    return MqttSection.model_validate(base)


def tls_ctx(pki: DemoPKI) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(pki.ca_file))
    ctx.load_cert_chain(pki.gateway.cert, pki.gateway.key)
    return ctx


# --- throughput --------------------------------------------------------------------------------------


@dataclass
class Rate:
    """Records/s of one run and the process's CPU time per record (every thread of it)."""

    per_s: float
    cpu_us: float


def bare_paho(broker: MosquittoBroker, pki: DemoPKI, payloads: list[bytes], port: int | None = None) -> Rate:
    """Records/s of a bare paho loop (its own thread, QoS 1, TLS) until every PUBACK."""
    c = paho.Client(CallbackAPIVersion.VERSION2, client_id="bare", protocol=paho.MQTTv5)
    c.tls_set_context(tls_ctx(pki))
    done = threading.Event()
    count = [0]

    def acked(*_: Any) -> None:
        count[0] += 1
        if count[0] == len(payloads):
            done.set()

    c.on_publish = acked
    connected = threading.Event()
    c.on_connect = lambda *_: connected.set()
    c.connect(broker.host, port or broker.port)
    c.loop_start()
    connected.wait(5)
    topic = f"edgetwin/v1/{GW}/features/subjpseudonym001"
    start, cpu = time.perf_counter(), time.process_time()
    for p in payloads:
        c.publish(topic, p, qos=1)
    if payloads:
        done.wait(120)
    took, cpu = time.perf_counter() - start, time.process_time() - cpu
    c.disconnect()
    c.loop_stop()
    return Rate(len(payloads) / took, cpu / max(1, len(payloads)) * 1e6)


async def uplink_drain(
    broker: MosquittoBroker, pki: DemoPKI, payloads: list[bytes], db: Path, **kw: Any
) -> Rate:
    """Records/s through outbox -> uplink -> broker for a backlog already in the outbox."""
    async with AsyncOutbox(lambda: Outbox(db, total_max_bytes=None)) as outbox:
        now = time.time()
        outbox.outbox.put_many(
            [OutItem(Lane.FEATURES, "features/subjpseudonym001", p, now) for p in payloads]
        )
        uplink = MqttUplink(outbox, mqtt_cfg(broker, pki, **kw), GW)
        task = asyncio.create_task(uplink.run(lambda: None), name="bench-uplink")
        while not uplink.connected:
            await asyncio.sleep(0.001)
        start, cpu = time.perf_counter(), time.process_time()
        while uplink.delivered < len(payloads):
            await asyncio.sleep(0.002)
        took, cpu = time.perf_counter() - start, time.process_time() - cpu
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    return Rate(len(payloads) / took, cpu / len(payloads) * 1e6)


# --- alarm latency -----------------------------------------------------------------------------------


RESTORE_S = 0.05  # the restore debounce of the alarm stage (the rule as configured, shortened)
LOAD_SUBJECTS, LOAD_STREAMS, LOAD_HZ = 50, 20, 10.0  # 1,000 items at 10 Hz: ~10 k changes/s
PROBE_S = 0.001  # the loop probe's sleep


class TimedOutbox(Outbox):
    """The outbox with its store calls timed (``--timing``): call, lock taken, done, alarms in it."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.puts: list[tuple[float, float, float, bool]] = []
        self.leases: list[tuple[float, float, float, bool]] = []
        self._locked = threading.local()

    def put_many(self, items: Any, **kw: Any) -> Any:
        called = time.perf_counter()
        got = super().put_many(items, **kw)
        alarm = any(it.lane is Lane.ALARMS for it in items)
        self.puts.append((called, self._locked.put, self._locked.done, alarm))
        return got

    def _put_many(self, items: Any) -> None:
        self._locked.put = time.perf_counter()
        super()._put_many(items)
        self._locked.done = time.perf_counter()

    def lease(self, n: int, *, after_id: int = 0, through_id: int | None = None) -> list[Any]:
        called = time.perf_counter()
        self._locked.lease = math.nan
        got = super().lease(n, after_id=after_id, through_id=through_id)
        alarm = any(r.lane is Lane.ALARMS for r in got)
        self.leases.append((called, self._locked.lease, time.perf_counter(), alarm))
        return got

    def _lease(self, n: int, after_id: int = 0, through_id: int | None = None) -> list[Any]:
        self._locked.lease = time.perf_counter()
        return super()._lease(n, after_id, through_id)


class TimedAsyncOutbox(AsyncOutbox):
    """When alarms reach the uplink on the loop (``--timing``): a lease's result, or handed over by their commit."""

    def __init__(self, factory: Any) -> None:
        super().__init__(factory)
        self.on_loop: list[float] = []

    async def lease(self, n: int, *, after_id: int = 0, through_id: int | None = None) -> list[Any]:
        got = await super().lease(n, after_id=after_id, through_id=through_id)
        if any(r.lane is Lane.ALARMS for r in got):
            self.on_loop.append(time.perf_counter())
        return got

    def hand_alarms_to(self, taker: Any) -> None:
        def timed(alarms: Any) -> None:
            self.on_loop.append(time.perf_counter())
            taker(alarms)

        super().hand_alarms_to(None if taker is None else timed)


TIMING_STEPS = (
    "sample -> commit called",
    "commit's lock wait",
    "commit",
    "commit -> lease called",
    "lease's lock wait",
    "lease",
    "-> on the loop",
    "-> twin",
)


def alarm_steps(
    sent: list[float], arrived: list[float], store: TimedOutbox, on_loop: list[float]
) -> tuple[list[list[float]], list[bool]]:
    """Each alarm's time in each of ``TIMING_STEPS`` (ms), and whether a commit was under way when it was raised.

    Matched by time: an alarm's commit is the first one with an alarm called after its sample,
    its lease the first lease of an alarm after that commit, its arrival on the loop the first
    after that.  An alarm its commit leased (no lease call) counts zero for the lease's steps.
    """
    puts = [p for p in store.puts if p[3]]
    leases = [le for le in store.leases if le[3]]
    out: list[list[float]] = []
    behind: list[bool] = []
    for s, a in zip(sent, arrived, strict=False):
        put = next((p for p in puts if p[0] >= s), None)
        if put is None or put[2] > a:
            continue
        loop_t = next((t for t in on_loop if put[2] <= t <= a), a)
        lease = next((le for le in leases if le[0] >= put[2] - 1e-4 and le[2] <= loop_t), None)
        if lease is None:
            lease = (put[2], put[2], put[2], True)
        points = (s, put[0], put[1], put[2], lease[0], lease[1], lease[2], loop_t, a)
        out.append([(points[i + 1] - points[i]) * 1000 for i in range(len(points) - 1)])
        behind.append(any(p[0] < s < p[2] for p in store.puts))
    return out, behind


def timing_rows(run: AlarmRun) -> str:
    """Where alarms' time went: the mean of each step over all, the median and the worst 1 %."""
    if not run.steps:
        return ""
    order = sorted(range(len(run.steps)), key=lambda i: sum(run.steps[i]))
    worst = order[-max(1, len(order) // 100) :]
    mid = order[len(order) // 2]
    under = "beside the load" if run.load_changes_per_s else "no other load"
    lines = [f"\n{under}: {len(run.steps)} alarms timed, {sum(run.behind)} raised while a commit ran"]
    lines.append("| step | mean | median alarm | worst 1 % (each) |")
    lines.append("|---|---|---|---|")
    for k, name in enumerate(TIMING_STEPS):
        mean = statistics.fmean(st[k] for st in run.steps)
        each = ", ".join(f"{run.steps[i][k]:.1f}" for i in worst)
        lines.append(f"| {name} | {mean:.2f} | {run.steps[mid][k]:.2f} | {each} |")
    each = ", ".join(f"{sum(run.steps[i]):.1f}{' (behind a commit)' if run.behind[i] else ''}" for i in worst)
    lines.append(f"| total | | {sum(run.steps[mid]):.2f} | {each} |")
    return "\n".join(lines)


@dataclass
class AlarmRun:
    """What the alarm stage measured."""

    latencies: list[float]  # seconds, one per alarm that arrived, in order
    injected: int
    wrong_kind: int  # arrivals whose kind was not the one injected (would mean a matching error)
    load_changes_per_s: float  # background samples handed to the pipeline per second, measured
    windows: int  # feature windows the pipeline closed meanwhile
    steps: list[list[float]] = field(default_factory=list)  # --timing: ms per step of TIMING_STEPS
    behind: list[bool] = field(default_factory=list)  # --timing: raised while a commit ran
    held: list[float] = field(default_factory=list)  # seconds the loop overran each 1 ms sleep of a probe
    cpu_s: float = 0.0  # the process's CPU time (every thread) while the alarms were timed
    changes: int = 0  # background samples handed to the pipeline meanwhile


async def alarm_latency(
    broker: MosquittoBroker,
    pki: DemoPKI,
    db: Path,
    n: int,
    load: bool = True,
    batch_s: float = 0.0,
    timing: bool = False,
) -> AlarmRun:
    """Seconds from the sample that raises an alarm to the decoded alarm at the twin.

    Every injected alarm is its own event under the windower's rules: a faulty sample raises a
    sensor fault; good samples for ``RESTORE_S`` (the restore debounce) raise the restore.  The
    next sample is sent only after the twin has the previous alarm, so arrivals match by order.
    Meanwhile 1,000 industrial streams at 10 Hz flow through the same pipeline (windows,
    features, outbox, uplink), with ``Pipeline.run`` closing windows on its timer.
    """
    arrivals: list[tuple[float, str]] = []
    lock = threading.Lock()
    loop = asyncio.get_running_loop()
    arrived = asyncio.Event()  # set from the twin's thread: the wait costs the loop nothing

    def on_message(msg: Any, _event: Any) -> None:
        if msg.kind == "alarms":
            with lock:
                arrivals.append((time.perf_counter(), str(msg.record.alarm)))
            loop.call_soon_threadsafe(arrived.set)

    twin = Listener(
        ListenOptions(
            host=broker.host,
            port=broker.port,
            ca_file=pki.ca_file,
            cert_file=pki.twin.cert,
            key_file=pki.twin.key,
        ),
        on_message,
        keep=False,
    )
    twin.start()
    config = validate(
        {
            "gateway": {"state_dir": str(db.with_suffix(".state"))},  # each run its own alarm state
            "pipeline": {"window_s": 30.0, "hop_s": 10.0, "sensor_restore_s": RESTORE_S},
        },
        "<bench>",
        {},
    )
    anon = Anonymizer(Pseudonymizer(b"k" * 32), time_mode="relative")
    stream = Stream("oxi", "bed-1", "AA:BB:CC:DD:EE:FF", MDC["MDC_PULS_OXIM_SAT_O2"], rate_hz=1.0)
    load_streams = [
        Stream(
            "plc",
            f"line-{m:02d}",
            f"plc-{m:02d}",
            industrial_metric(f"Press{m}/Tag{k}", "bar"),
            "industrial",
            10.0,
        )
        for m in range(LOAD_SUBJECTS)
        for k in range(LOAD_STREAMS)
    ]
    sent: list[float] = []
    expected: list[str] = []
    loaded = [0]

    async def background(sink: Any) -> None:
        # Every 10 ms a tenth of the items report (OPC UA publishes in batches like this).
        tick, i = 0.01, 0
        per_tick = round(len(load_streams) * LOAD_HZ * tick)
        next_t = time.monotonic()
        while True:
            now, wall = time.monotonic(), time.time()
            for _ in range(per_tick):
                s = load_streams[i % len(load_streams)]
                sink.put(Sample(s, now, wall, 5.0 + (i % 97) * 0.01))
                i += 1
            loaded[0] = i
            next_t += tick
            await asyncio.sleep(max(0.0, next_t - time.monotonic()))

    held: list[float] = []

    async def probe() -> None:
        # How long the loop was held: a 1 ms sleep's overrun is the turns that ran before it woke.
        while True:
            t = time.perf_counter()
            await asyncio.sleep(PROBE_S)
            held.append(time.perf_counter() - t - PROBE_S)

    async def wait_arrival(k: int) -> bool:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(2.0):
                while len(arrivals) <= k:
                    arrived.clear()
                    if len(arrivals) <= k:
                        await arrived.wait()
        return len(arrivals) > k

    stores: list[Outbox] = []

    def open_store() -> Outbox:
        stores.append(TimedOutbox(db) if timing else Outbox(db))
        return stores[-1]

    async with TimedAsyncOutbox(open_store) if timing else AsyncOutbox(open_store) as outbox:
        pipeline = Pipeline(config, anon, outbox)
        sink = pipeline.sink
        cfg = mqtt_cfg(broker, pki, replay_msgs_per_s=500.0, batch_s=batch_s)
        uplink = MqttUplink(outbox, cfg, GW)
        tasks = [
            asyncio.create_task(uplink.run(lambda: None), name="bench-uplink"),
            asyncio.create_task(pipeline.run(lambda: None), name="bench-pipeline"),
        ]
        while not uplink.connected:
            await asyncio.sleep(0.01)
        # The good first sample makes the stream known; the load warms up before timing starts.
        sink.put(Sample(stream, time.monotonic(), time.time(), 97.0))
        if load:
            tasks.append(asyncio.create_task(background(sink), name="bench-load"))
        await asyncio.sleep(1.0)
        tasks.append(asyncio.create_task(probe(), name="bench-loop-probe"))
        load_from, load_t0, cpu_t0 = loaded[0], time.monotonic(), time.process_time()
        windows_from = pipeline.submitted[Lane.FEATURES]
        while len(expected) < n:
            # A fault: raised on the faulty sample itself.
            sent.append(time.perf_counter())
            expected.append("sensor_fault")
            sink.put(Sample(stream, time.monotonic(), time.time(), math.nan, Quality.SENSOR_OFF))
            if not await wait_arrival(len(expected) - 1):
                break
            if len(expected) >= n:
                break
            # The restore: a good sample starts the hold, the first good one after it ends it.
            sink.put(Sample(stream, time.monotonic(), time.time(), 97.0))
            await asyncio.sleep(RESTORE_S + 0.005)
            sent.append(time.perf_counter())
            expected.append("sensor_restored")
            sink.put(Sample(stream, time.monotonic(), time.time(), 97.0))
            if not await wait_arrival(len(expected) - 1):
                break
            await asyncio.sleep(0.01)
        load_rate = (loaded[0] - load_from) / (time.monotonic() - load_t0)
        cpu_s, changes = time.process_time() - cpu_t0, loaded[0] - load_from
        windows = pipeline.submitted[Lane.FEATURES] - windows_from
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
    twin.stop()
    with lock:
        got = list(arrivals)
    wrong = sum(1 for (_, kind), want in zip(got, expected, strict=False) if kind != want)
    lat = [t - s for (t, _), s in zip(got, sent, strict=False)]
    run = AlarmRun(lat, len(expected), wrong, load_rate if load else 0.0, windows)
    run.held, run.cpu_s, run.changes = held, cpu_s, changes
    if timing and isinstance(stores[-1], TimedOutbox):
        on_loop = outbox.on_loop if isinstance(outbox, TimedAsyncOutbox) else []
        run.steps, run.behind = alarm_steps(sent, [t for t, _ in got], stores[-1], on_loop)
    return run


def bare_alarm_floor(broker: MosquittoBroker, pki: DemoPKI, db: Path, n: int) -> list[float]:
    """The floor of a durable alarm path, same broker and TLS: one SQLite commit (FULL) + one QoS 1
    publish by a bare paho client, to a bare paho subscriber; seconds from before the commit to arrival."""
    got = threading.Event()
    arrived: list[float] = []

    def on_message(*_: Any) -> None:
        arrived.append(time.perf_counter())
        got.set()

    clients = []
    for cid, cert in (("floor-sub", pki.twin), ("floor-pub", pki.gateway)):
        c = paho.Client(CallbackAPIVersion.VERSION2, client_id=cid, protocol=paho.MQTTv5)
        ctx = ssl.create_default_context(cafile=str(pki.ca_file))
        ctx.load_cert_chain(cert.cert, cert.key)
        c.tls_set_context(ctx)
        connected = threading.Event()
        c.on_connect = lambda *_a, ev=connected: ev.set()
        c.connect(broker.host, broker.port)
        c.loop_start()
        connected.wait(5)
        clients.append(c)
    sub, pub = clients
    subscribed = threading.Event()
    sub.on_subscribe = lambda *_: subscribed.set()
    sub.on_message = on_message
    sub.subscribe(f"edgetwin/v1/{GW}/floor", qos=1)
    subscribed.wait(5)
    conn = sqlite3.connect(db, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=FULL")
    conn.execute("CREATE TABLE r (id INTEGER PRIMARY KEY, payload BLOB)")
    payload = b"x" * 200
    out: list[float] = []
    try:
        for _ in range(n):
            got.clear()
            start = time.perf_counter()
            conn.execute("INSERT INTO r (payload) VALUES (?)", (payload,))
            pub.publish(f"edgetwin/v1/{GW}/floor", payload, qos=1)
            if got.wait(2.0):
                out.append(arrived[-1] - start)
            time.sleep(0.01)
    finally:
        conn.close()
        for c in clients:
            c.disconnect()
            c.loop_stop()
    return out


# --- bytes on the wire ---------------------------------------------------------------------------------


class CountingRelay:
    """A TCP relay on loopback that counts the bytes it forwards, both ways."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.bytes = 0
        self.server: asyncio.Server | None = None
        self.port = 0

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]

    async def _serve(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        ur, uw = await asyncio.open_connection("127.0.0.1", self.target_port)

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            with contextlib.suppress(ConnectionError):
                while data := await src.read(65536):
                    self.bytes += len(data)
                    dst.write(data)
                    await dst.drain()
            dst.close()

        # Connections still open when the run ends are cancelled with it: nothing to report.
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.gather(pipe(r, uw), pipe(ur, w))

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()


async def wire_bytes(
    broker: MosquittoBroker, pki: DemoPKI, tmp: Path, rate_hz: float, sim_s: float
) -> dict[str, float]:
    """Bytes per stream-hour: SenML windows through the uplink vs one JSON message per sample."""
    config = validate({"gateway": {"state_dir": str(tmp)}}, "<bench>", {})  # window 30 s, hop 10 s
    anon = Anonymizer(Pseudonymizer(b"k" * 32), time_mode="relative", start_wall=1.7e9)
    drivers = [
        SimDriver(
            SourceInfo("bed7-monitor", "MRN-0048213-SMITH", "medical"),
            SimConfig(profile="patient", device="A4:C1:38:5B:20:7E", rate_hz=rate_hz),
        ),
        SimDriver(
            SourceInfo("pump3-plc", "plant-A/pump-3", "industrial"),
            SimConfig(profile="pump", device="SN-PLC-20931", rate_hz=rate_hz),
        ),
    ]
    samples: list[tuple[Stream, float, float]] = []

    class Recorder:
        def __init__(self, inner: Any) -> None:
            self.inner = inner

        def put(self, s: Sample) -> None:
            samples.append((s.stream, s.t_wall, s.value))
            self.inner.put(s)

        def put_block(self, b: Any) -> None:
            samples.extend((b.stream, float(t), float(v)) for t, v in zip(b.t_wall, b.value, strict=True))
            self.inner.put_block(b)

        def alarm(self, a: Any) -> None:
            self.inner.alarm(a)

        def diagnostic(self, d: Any) -> None:
            self.inner.diagnostic(d)

    relay = CountingRelay(broker.port)
    await relay.start()
    db = tmp / "wire.db"
    async with AsyncOutbox(lambda: Outbox(db, total_max_bytes=None)) as outbox:
        pipeline = Pipeline(config, anon, outbox)
        sink = Recorder(pipeline.sink)
        start_mono, start_wall = 1000.0, 1.7e9
        gens = [d._generator() for d in drivers]
        t = 0.0
        while t < sim_s:
            for d, g in zip(drivers, gens, strict=True):
                d._emit(sink, g.generate(t, t + 1.0), start_mono, start_wall)
            t += 1.0
            await pipeline.step(start_mono + t, start_wall + t)
        await outbox.flush()
        # Alarms travel as their own records in either design (and the simulator's probe flaps at
        # high rates): the comparison is the data, so they are taken out before sending.
        held = await outbox.lease(10**7)
        await outbox.ack([r.id for r in held if r.lane is Lane.ALARMS])
        await outbox.release([r.id for r in held if r.lane is not Lane.ALARMS])
        payload_bytes = sum(len(r.payload) for r in held if r.lane is not Lane.ALARMS)
        records = (await outbox.stats()).queued
        if anon.dropped:
            raise RuntimeError(
                f"the anonymizer dropped {anon.dropped} record(s): the benchmark's names collide"
            )
        uplink = MqttUplink(outbox, mqtt_cfg(broker, pki, port=relay.port), GW)
        relay.bytes = 0
        task = asyncio.create_task(uplink.run(lambda: None), name="bench-uplink")
        while uplink.delivered < records:
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.2)
        senml_bytes = relay.bytes - await _idle_connection_bytes(broker, pki, relay, tmp)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    # The baseline: every sample its own JSON message (pseudonyms, relative time), QoS 1, same TLS.
    streams = {s for s, _, _ in samples}
    payloads = [
        json.dumps(
            {
                "subject": anon._subject(s.subject),
                "device": anon._device(s.device, s.source),
                "metric": s.metric.name,
                "unit": s.metric.unit,
                "t": round(tw - start_wall, 3),
                "v": round(v, 4),
            },
            separators=(",", ":"),
        ).encode()
        for s, tw, v in samples
    ]
    relay.bytes = 0
    await asyncio.to_thread(bare_paho, broker, pki, [], relay.port)
    handshake = relay.bytes
    relay.bytes = 0
    await asyncio.to_thread(bare_paho, broker, pki, payloads, relay.port)
    json_bytes = relay.bytes - handshake
    await relay.stop()
    hours = sim_s / 3600.0
    return {
        "streams": len(streams),
        "records": records,
        "payload_bytes": payload_bytes,
        "senml_bytes": senml_bytes,
        "samples": len(samples),
        "senml_per_stream_hour": senml_bytes / len(streams) / hours,
        "json_per_stream_hour": json_bytes / len(streams) / hours,
    }


async def _idle_connection_bytes(
    broker: MosquittoBroker, pki: DemoPKI, relay: CountingRelay, tmp: Path
) -> int:
    """Bytes of a connection that delivers nothing (handshake, status): not a cost per record."""
    before = relay.bytes
    async with AsyncOutbox(lambda: Outbox(tmp / "idle.db")) as outbox:
        uplink = MqttUplink(outbox, mqtt_cfg(broker, pki, port=relay.port), GW)
        task = asyncio.create_task(uplink.run(lambda: None), name="bench-idle")
        while not uplink.connected:
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.3)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await asyncio.sleep(0.1)
    return relay.bytes - before


# --- replay --------------------------------------------------------------------------------------------------


async def replay_rate(broker: MosquittoBroker, pki: DemoPKI, db: Path, n: int, paced: bool) -> float:
    """Records/s of a backlog replay (default pacing, or none)."""
    payloads = [window_payload(i) for i in range(n)]
    kw: dict[str, Any] = {} if not paced else {"replay_msgs_per_s": 500.0, "replay_bytes_per_s": 2_000_000.0}
    return (await uplink_drain(broker, pki, payloads, db, **kw)).per_s


def _pct(sorted_s: list[float], q: float) -> float:
    return sorted_s[min(len(sorted_s) - 1, int(len(sorted_s) * q))] * 1000 if sorted_s else math.nan


STAGES = ("throughput", "alarms", "wire", "replay")


def throughput_rows(ours: list[Rate], bare: list[Rate]) -> str:
    """Records/s and CPU per record against the bare loop: medians, spreads and the round ratios.

    A round is one bare run followed by one of ours; the ratio of each round is taken before the
    median, so a burst of load from elsewhere that hits one round does not decide the figure.
    """
    ratios = sorted(o.per_s / b.per_s for o, b in zip(ours, bare, strict=True))
    cpu = sorted(b.cpu_us / o.cpu_us for o, b in zip(ours, bare, strict=True))

    def spread(xs: list[float], fmt: str) -> str:
        return f"{format(statistics.median(xs), fmt)} ({format(min(xs), fmt)}-{format(max(xs), fmt)})"

    rounds = ", ".join(f"{o.per_s / b.per_s:.2f}" for o, b in zip(ours, bare, strict=True))
    return (
        f"| records/s, outbox (FULL sync) -> TLS -> QoS 1 -> delete, median (min-max) "
        f"| {spread([o.per_s for o in ours], ',.0f')} | bare paho loop {spread([b.per_s for b in bare], ',.0f')} "
        f"| {spread(ratios, '.2f')} (rounds {rounds}) |\n"
        f"| CPU per record, every thread of the process (records per CPU-second, as a ratio) "
        f"| {spread([o.cpu_us for o in ours], '.1f')} µs | {spread([b.cpu_us for b in bare], '.1f')} µs "
        f"| {spread(cpu, '.2f')} |"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0] if __doc__ else None)
    parser.add_argument("--n", type=int, default=20_000, help="records per throughput run")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--alarms", type=int, default=300)
    parser.add_argument("--sim-s", type=float, default=600.0, help="simulated seconds for the wire-bytes run")
    parser.add_argument("--only", choices=STAGES, action="append", help="run only these stages (repeatable)")
    parser.add_argument(
        "--batch-s",
        type=float,
        default=0.0,
        help="uplink.mqtt.batch_s for the alarm runs (windows held meanwhile)",
    )
    parser.add_argument(
        "--raw", type=Path, help="write every alarm's and the floor's latency (s) here as JSON"
    )
    parser.add_argument(
        "--timing",
        action="store_true",
        help="alarm runs: time each alarm's steps in the outbox and print them",
    )
    args = parser.parse_args()
    stages = set(args.only or STAGES)
    logging.basicConfig(level=logging.ERROR)
    ours: list[Rate] = []
    bare: list[Rate] = []
    runs: list[AlarmRun] = []
    floor: list[float] = []
    wires: dict[float, dict[str, float]] = {}
    paced = unpaced = math.nan
    with tempfile.TemporaryDirectory(prefix="bench-uplink-") as tmp_name:
        tmp = Path(tmp_name)
        pki = demo_pki(tmp / "pki")
        broker = MosquittoBroker(tmp / "broker", pki)
        broker.start()
        try:
            if "throughput" in stages:
                payloads = [wrap(window_payload(i), SeqMeta(i + 1, 1)) for i in range(args.n)]
                for k in range(args.repeat):
                    bare.append(bare_paho(broker, pki, payloads))
                    ours.append(
                        asyncio.run(
                            uplink_drain(
                                broker, pki, [window_payload(i) for i in range(args.n)], tmp / f"tp{k}.db"
                            )
                        )
                    )
            if "alarms" in stages:
                runs = [
                    asyncio.run(
                        alarm_latency(
                            broker, pki, tmp / f"lat{load}.db", args.alarms, load, args.batch_s, args.timing
                        )
                    )
                    for load in (False, True)
                ]
                floor = sorted(bare_alarm_floor(broker, pki, tmp / "floor.db", args.alarms))
            if "wire" in stages:
                wires = {
                    r: asyncio.run(wire_bytes(broker, pki, tmp / f"w{r}", r, args.sim_s)) for r in (1.0, 10.0)
                }
            if "replay" in stages:
                paced = asyncio.run(replay_rate(broker, pki, tmp / "rp.db", 3000, paced=True))
                unpaced = asyncio.run(replay_rate(broker, pki, tmp / "ru.db", 10000, paced=False))
        finally:
            broker.stop()
    print(
        f"Uplink benchmarks ({args.n} records x {args.repeat}, mosquitto on loopback, TLS 1.3 + client certs, QoS 1; "
        f"payload {len(window_payload(0))} bytes, a patient window of 5 streams)\n"
    )
    if args.raw is not None:
        args.raw.write_text(
            json.dumps(
                {
                    "alarms": {("load" if r.load_changes_per_s else "idle"): r.latencies for r in runs},
                    "steps": {("load" if r.load_changes_per_s else "idle"): r.steps for r in runs},
                    "floor": floor,
                    "held": {("load" if r.load_changes_per_s else "idle"): r.held for r in runs},
                }
            )
        )
    print(f"gateway imported from {Path(sys.modules['gateway'].__file__ or '?').parent}\n")
    print("| measure | edgetwin | baseline | ratio |")
    print("|---|---|---|---|")
    if ours:
        print(throughput_rows(ours, bare))
    for run in runs:
        lat = sorted(run.latencies)
        under = (
            f"while {run.load_changes_per_s:,.0f} changes/s flow ({run.windows} windows, batch_s {args.batch_s:g})"
            if run.load_changes_per_s
            else "no other load"
        )
        print(
            f"| alarm latency sample -> twin, p50 / p99 / max, {under} "
            f"| {_pct(lat, 0.5):.1f} / {_pct(lat, 0.99):.1f} / {_pct(lat, 1.0):.1f} ms "
            f"({len(lat)} of {run.injected} alarms, {run.wrong_kind} out of order) | aim p99 < 10 ms | |"
        )
    if floor:
        print(
            f"| **floor**: SQLite commit (FULL) + bare paho QoS 1 publish -> bare subscriber, p50 / p99 / max "
            f"| {_pct(floor, 0.5):.1f} / {_pct(floor, 0.99):.1f} / {_pct(floor, 1.0):.1f} ms ({len(floor)} messages) | | |"
        )
        for run in runs:
            lat = sorted(run.latencies)
            print(
                f"| alarm p50 / p99 over the floor's, {'with' if run.load_changes_per_s else 'without'} the load "
                f"| {_pct(lat, 0.5) / _pct(floor, 0.5):.1f}x / {_pct(lat, 0.99) / _pct(floor, 0.99):.1f}x | | |"
            )
    for run in runs:
        held = sorted(run.held)
        under = "with" if run.load_changes_per_s else "without"
        print(
            f"| event loop held (a {PROBE_S * 1e3:g} ms sleep's overrun), p50 / p99 / p99.9 / max, {under} the load "
            f"| {_pct(held, 0.5):.2f} / {_pct(held, 0.99):.2f} / {_pct(held, 0.999):.2f} / {_pct(held, 1.0):.1f} ms "
            f"({len(held)} sleeps) | | |"
        )
        if run.changes:
            print(
                f"| CPU per change while the alarms were timed, every thread (alarms, windows, uplink included) "
                f"| {run.cpu_s / run.changes * 1e6:.1f} µs ({run.cpu_s:.1f} s for {run.changes:,} changes) | | |"
            )
    for run in runs:
        if run.steps:
            print(timing_rows(run))
    for r, w in wires.items():
        print(
            f"| bytes on the wire per stream-hour (features), sim at {r:g} Hz ({w['streams']} streams, window 30 s / hop 10 s) "
            f"| {w['senml_per_stream_hour'] / 1024:,.1f} KiB | one JSON message per sample "
            f"{w['json_per_stream_hour'] / 1024:,.1f} KiB | {w['json_per_stream_hour'] / w['senml_per_stream_hour']:.0f}x fewer |"
        )
    if not math.isnan(paced):
        print(f"| backlog replay, default pacing (500 msgs/s) | {paced:,.0f} records/s | | |")
        print(f"| backlog replay, unpaced | {unpaced:,.0f} records/s | | |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
