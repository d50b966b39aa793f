"""Publish-to-applied time of a signed config revision, against the gateway's own cold start.

A real ``edgetwin run`` with one simulated source, TLS mosquitto on loopback, the twin publishing
revisions that add a source each time.  Baseline: process start -> the twin sees the reported
state with every unit running (a cold start, as the twin sees it).  Measured: the broker's PUBACK
of the desired state -> the twin sees the revision applied (verify, check, write, orderly stop,
restart in place, probation with ``settle_s`` = 1 s).

Run: ``python tests/benchmarks/bench_downlink.py [--rounds 3]``
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from downlink_support import applied, new_site, running, source  # noqa: E402

from gateway.downlink.twin_link import publish_desired  # noqa: E402
from gateway.records.topics import DEFAULT_PREFIX  # noqa: E402
from gateway.uplink.broker import MosquittoBroker  # noqa: E402
from gateway.uplink.certs import demo_pki  # noqa: E402


def main() -> None:
    """Measure and print the table for BENCHMARKS.md."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-downlink-") as tmp_name:
        tmp = Path(tmp_name)
        pki = demo_pki(tmp / "pki")
        broker = MosquittoBroker(tmp / "broker", pki)
        broker.start()
        site = new_site(tmp, pki, broker)
        cold: list[float] = []
        apply: list[float] = []
        try:
            for _ in range(args.rounds):
                # Clear the retained reported state, so the twin waits for this start's own.
                publish_desired(site.twin, f"{DEFAULT_PREFIX}/{site.gateway}/reported", b"")
                t0 = time.monotonic()
                site.start()
                site.reported(running("source:bed7-sim"), "running")
                cold.append(time.monotonic() - t0)
                site.stop()
            site.start()
            site.reported(running("source:bed7-sim"), "running")
            sources = source("bed7-sim")
            for version in range(1, args.rounds + 1):
                sources += source(f"bed{version + 10}-sim", device=f"A4:C1:38:00:01:{version + 10}")
                envelope = site.envelope(version, sources)
                site.publish(envelope)  # returns on the broker's PUBACK
                t0 = time.monotonic()
                site.reported(applied(version), f"v{version} applied")
                apply.append(time.monotonic() - t0)
        finally:
            site.stop()
            broker.stop()
    base = statistics.median(cold)
    print("| path | median s | max s | vs cold start |")
    print("|---|---:|---:|---:|")
    print(f"| cold start -> reported running (baseline) | {base:.2f} | {max(cold):.2f} | 1.00x |")
    med = statistics.median(apply)
    print(f"| desired published -> reported applied | {med:.2f} | {max(apply):.2f} | {med / base:.2f}x |")


if __name__ == "__main__":
    main()
