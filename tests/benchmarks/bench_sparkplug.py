"""Sparkplug B edge node throughput against the SenML uplink and a bare paho loop, in one run.

Run from the repository with the project's virtual environment (mosquitto must be installed)::

    .venv/bin/python tests/benchmarks/bench_sparkplug.py [--n 5000] [--repeat 3]

The same backlog of patient windows (five streams, 23 feature values each) goes from the durable
outbox through TLS 1.3 at QoS 1 to a local mosquitto and is deleted on PUBACK, once encoded as
SenML-CBOR records and once as Sparkplug B DDATA (decode the pack, map to metrics, protobuf,
identity scan); the baseline is a bare paho publish loop of the SenML payloads.  Printed as
metrics/s (feature values per second; the Sparkplug path also sends each stream's ``missing``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parents[1]))

from bench_uplink import GW, bare_paho, mqtt_cfg, uplink_drain, window_payload  # noqa: E402

from gateway.anonymize import Anonymizer, Pseudonymizer  # noqa: E402
from gateway.contracts import Lane  # noqa: E402
from gateway.outbox import AsyncOutbox, Outbox, OutItem  # noqa: E402
from gateway.uplink.broker import MosquittoBroker  # noqa: E402
from gateway.uplink.certs import DemoPKI, demo_pki  # noqa: E402
from gateway.uplink.sparkplug.config import SparkplugSection  # noqa: E402
from gateway.uplink.sparkplug.node import SparkplugNode  # noqa: E402

VALUES_PER_RECORD = 23  # feature values in window_payload (4 streams x 5 + 3 HRV)


def _anonymizer() -> Anonymizer:
    """The anonymizer's scan, knowing the subject and its devices (the scan is measured too)."""
    anon = Anonymizer(Pseudonymizer(b"b" * 32), time_mode="relative", local_identities=("edgetwin",))
    for identity in ("MRN-0048213", "bed1-mon", "A4:C1:38:5B:20:7E", "SN-PLC-20931"):
        anon.register(identity)
    return anon


async def sparkplug_drain(broker: MosquittoBroker, pki: DemoPKI, payloads: list[bytes], tmp: Path) -> float:
    """Records/s through outbox -> Sparkplug node -> broker for a backlog already in the outbox."""
    async with AsyncOutbox(lambda: Outbox(tmp / "outbox.db", total_max_bytes=None)) as outbox:
        now = time.time()
        outbox.outbox.put_many(
            [OutItem(Lane.FEATURES, "features/subjpseudonym001", p, now) for p in payloads]
        )
        node = SparkplugNode(
            outbox,
            mqtt_cfg(broker, pki),
            SparkplugSection(group_id="bench"),
            GW,
            anonymizer=_anonymizer(),
            state_dir=tmp,
        )
        task = asyncio.create_task(node.run(lambda: None), name="bench-sparkplug")
        while not node.connected:
            await asyncio.sleep(0.001)
        start = time.perf_counter()
        while node.delivered < len(payloads):
            await asyncio.sleep(0.002)
        took = time.perf_counter() - start
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    return len(payloads) / took


def main() -> int:
    """Run the comparison and print a markdown table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=5000)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    payloads = [window_payload(i) for i in range(args.n)]
    rates: dict[str, list[float]] = {"bare": [], "senml": [], "sparkplug": []}
    with tempfile.TemporaryDirectory() as d:
        root = Path(d)
        pki = demo_pki(root / "pki")
        broker = MosquittoBroker(root / "broker", pki)
        broker.start()
        try:
            for r in range(args.repeat):
                rates["bare"].append(bare_paho(broker, pki, payloads).per_s)
                rates["senml"].append(
                    asyncio.run(uplink_drain(broker, pki, payloads, root / f"senml{r}.db")).per_s
                )
                tmp = root / f"sp{r}"
                tmp.mkdir()
                rates["sparkplug"].append(asyncio.run(sparkplug_drain(broker, pki, payloads, tmp)))
        finally:
            broker.stop()
    med = {k: statistics.median(v) * VALUES_PER_RECORD for k, v in rates.items()}
    print(f"n = {args.n} records x {VALUES_PER_RECORD} values, median of {args.repeat}")
    print("| path | metrics/s | records/s | ratio to bare paho |")
    print("|---|---|---|---|")
    for key, label in (
        ("bare", "bare paho publish loop (SenML payloads, QoS 1, TLS)"),
        ("senml", "SenML uplink: outbox -> QoS 1 -> delete on PUBACK"),
        ("sparkplug", "Sparkplug node: outbox -> decode -> protobuf DDATA -> QoS 1 -> delete"),
    ):
        print(
            f"| {label} | {med[key]:,.0f} | {med[key] / VALUES_PER_RECORD:,.0f} | {med[key] / med['bare']:.2f} |"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
