"""Bytes on the wire per stream-hour: SenML-CBOR windows of features against one JSON message per sample.

The same synthetic hour of a patient (heart rate, SpO2, respiration, temperature, RR intervals)
and a pump (current waveform, vibration, pressure, temperature) goes through the real pipeline
(windows, features, anonymizer, unchanged-stream thinning, codec) at the default window (30 s)
and hop (10 s); what is counted for each published message is its payload with the uplink's
sequence record plus its topic.  The baseline, measured on the same samples in the same run,
publishes every sample as a JSON object with pseudonyms, the metric, its unit, a time and the
value on a per-stream topic.

Two kinds of data: ``noisy`` (every level stream white noise around its level: no window is ever
unchanged at the metrics' resolution) and ``steady`` (the level streams as devices report them:
quantized to the device's step - SpO2, rates 1, temperature 0.1 - with a slow random walk of one
step about every two minutes; the RR intervals and the two waveforms stay as in ``noisy``).

Run: ``.venv/bin/python tests/benchmarks/bench_records.py [--hours 1]``
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import numpy as np

from drivers import REGISTRY
from gateway.anonymize import Anonymizer, Pseudonymizer
from gateway.config import validate
from gateway.outbox import AsyncOutbox, Outbox
from gateway.records import Joiner, SeqMeta, wrap
from gateway.runtime import Pipeline
from gateway.sample import MDC, SampleBlock, Stream, industrial_metric

PREFIX = "edgetwin/v1"
GW = "gwk3j2x7q9m4t8vb"  # a pseudonym's length
T0 = 10_000.0
WALL0 = 1.7e9
EPOCH = 123456789
BATCH_BYTES = 4096  # uplink.mqtt.batch_bytes, the default


def _streams(rate_hz: float) -> list[tuple[Stream, float, float]]:
    """(stream, level, noise) of one patient and one pump."""
    p, m = ("bed7-monitor", "PATIENT-1", "AA:BB:CC:DD:EE:01"), ("pump3-plc", "PUMP-3", "SN-PLC-1")
    return [
        (Stream(*p, MDC["MDC_ECG_HEART_RATE"], rate_hz=rate_hz), 72.0, 2.0),
        (Stream(*p, MDC["MDC_PULS_OXIM_SAT_O2"], rate_hz=rate_hz), 97.0, 0.6),
        (Stream(*p, MDC["MDC_RESP_RATE"], rate_hz=rate_hz), 15.0, 1.0),
        (Stream(*p, MDC["MDC_TEMP_BODY"], rate_hz=rate_hz), 37.1, 0.05),
        (Stream(*p, MDC["MDC_ECG_TIME_PD_RR_GL"], rate_hz=rate_hz), 830.0, 40.0),
        (
            Stream(*m, industrial_metric("Pump/Motor/Current", "A", "waveform"), "industrial", rate_hz),
            0.0,
            1.3,
        ),
        (Stream(*m, industrial_metric("Pump/Accel", "g", "waveform"), "industrial", rate_hz), 0.0, 0.05),
        (Stream(*m, industrial_metric("Pump/Pressure", "bar"), "industrial", rate_hz), 1.2, 0.05),
        (Stream(*m, industrial_metric("Pump/Motor/Temp", "Cel"), "industrial", rate_hz), 72.0, 0.3),
    ]


#: steady: the device's reporting step per level stream (None: the stream stays noisy).
_STEP = (1.0, 1.0, 1.0, 0.1, None, None, None, 0.01, 0.1)


def _samples(rate_hz: float, hours: float, steady: bool) -> list[tuple[Stream, np.ndarray, np.ndarray]]:
    """(stream, times, values) of the whole run; both sides count the same samples."""
    rng = np.random.default_rng(7)
    n = int(hours * 3600 * rate_hz)
    t = T0 + np.arange(n) / rate_hz
    out = []
    for index, (stream, level, noise) in enumerate(_streams(rate_hz)):
        step = _STEP[index]
        if stream.metric.shape == "waveform":
            v = noise * np.sqrt(2) * np.sin(2 * np.pi * min(50.0, rate_hz / 4) * (t - T0))
        elif not steady or step is None:
            v = level + noise * rng.standard_normal(n)
        else:
            # One step up or down about every 120 s of data, whatever the rate; as the device reports it.
            moves = (rng.random(n) < 1.0 / (120.0 * rate_hz)) * rng.choice((-1.0, 1.0), n) * step
            v = np.round((level + np.cumsum(moves)) / step) * step
        out.append((stream, t, v))
    return out


def _json_bytes(stream: Stream, t: np.ndarray, v: np.ndarray) -> int:
    """The baseline: one JSON message per sample (payload + topic), pseudonyms in place of ids."""
    subject, device = "s" * 16, "d" * 16
    topic = len(f"{PREFIX}/{GW}/samples/{subject}/{stream.metric.name}".encode())
    total = 0
    for ti, vi in zip(t, v, strict=True):
        body = {
            "device": device,
            "metric": stream.metric.name,
            "unit": stream.metric.unit,
            "t": round(float(ti) - T0, 3),
            "v": round(float(vi), 3),
        }
        total += topic + len(json.dumps(body, separators=(",", ":")).encode())
    return total


async def _ours(
    rate_hz: float, hours: float, data: list[tuple[Stream, np.ndarray, np.ndarray]], tmp: Path, batch_s: float
) -> tuple[int, int, int]:
    """(bytes, messages, windows) the real pipeline publishes for the same data.

    With ``batch_s`` the uplink's joining is replayed in data time: a subject's windows are held
    until the oldest is ``batch_s`` old, then go as one message (``gateway.records.Joiner``).
    """
    config = validate({"gateway": {"state_dir": str(tmp)}}, "<bench>", REGISTRY)
    anon = Anonymizer(Pseudonymizer(b"b" * 32), time_mode="relative", start_wall=WALL0)
    total = messages = windows = 0
    held: dict[str, tuple[float, Joiner]] = {}

    def send(topic: str, payload: bytes) -> None:
        nonlocal total, messages
        total += len(f"{PREFIX}/{GW}/{topic}".encode()) + len(payload)
        messages += 1

    async with AsyncOutbox(lambda: Outbox(tmp / "outbox.db")) as outbox:
        pipeline = Pipeline(config, anon, outbox, models=[])
        hop = config.core.pipeline.hop_s
        per_hop = int(hop * rate_hz)
        seq = 0
        for k in range(int(hours * 3600 / hop)):
            t0 = T0 + k * hop
            part = slice(k * per_hop, (k + 1) * per_hop)
            for stream, t, v in data:
                tt, vv = t[part], v[part]
                pipeline.sink.put_block(
                    SampleBlock(stream, tt, tt - T0 + WALL0, vv, np.zeros(tt.size, np.uint8))
                )
            await pipeline.step(now_mono=t0 + hop + 2.5, now_wall=WALL0 + k * hop + hop + 2.5)
            await outbox.flush()
            leased = await outbox.lease(10_000)
            for topic, (since, joiner) in list(held.items()):
                if t0 - since >= batch_s:
                    send(topic, joiner.payload())
                    del held[topic]
            for item in leased:
                if not item.topic.startswith("features/"):
                    continue
                seq += 1
                if not batch_s:
                    send(item.topic, wrap(item.payload, SeqMeta(seq, EPOCH)))
                    continue
                if item.topic in held:
                    since, joiner = held[item.topic]
                    if joiner.add(item.payload, seq):
                        continue
                    send(item.topic, joiner.payload())
                joiner = Joiner(EPOCH, historical=False, batch_s=batch_s, limit=BATCH_BYTES)
                if not joiner.add(item.payload, seq):
                    raise RuntimeError(f"window {seq} cannot be joined")
                held[item.topic] = (t0, joiner)
            await outbox.ack([i.id for i in leased])
        for topic, (_, joiner) in held.items():
            send(topic, joiner.payload())
        windows = seq + pipeline.thinner.skipped
    return total, messages, windows


def main() -> int:
    """Print the table for BENCHMARKS.md."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--hours", type=float, default=1.0)
    parser.add_argument(
        "--batch-s", type=float, action="append", help="uplink.mqtt.batch_s to measure (default: 0 and 60)"
    )
    args = parser.parse_args()
    batches = args.batch_s or [0.0, 60.0]
    print(
        f"records benchmark: {args.hours:g} h of data time, 9 streams (5 medical, 4 industrial), window 30 s, hop 10 s"
    )
    print()
    print(
        "| data | rate | batch_s | ours: B per stream-hour | messages / windows | JSON per sample: B per stream-hour "
        "| fewer bytes |"
    )
    print("|---|---|---:|---:|---:|---:|---:|")
    for kind in ("noisy", "steady"):
        for rate in (1.0, 10.0):
            data = _samples(rate, args.hours, kind == "steady")
            base = sum(_json_bytes(stream, t, v) for stream, t, v in data)
            per_base = base / len(data) / args.hours
            for batch_s in batches:
                with tempfile.TemporaryDirectory() as tmp:
                    ours, messages, windows = asyncio.run(_ours(rate, args.hours, data, Path(tmp), batch_s))
                per_ours = ours / len(data) / args.hours
                print(
                    f"| {kind} | {rate:g} Hz | {batch_s:g} | {per_ours:,.0f} | {messages} / {windows} "
                    f"| {per_base:,.0f} | {per_base / per_ours:.1f}x |"
                )
    return 0


if __name__ == "__main__":
    sys.exit(main())
