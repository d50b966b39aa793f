"""Outbox throughput: durable records/s with group commit against one commit per record.

Run from the repository with the project's virtual environment::

    .venv/bin/python tests/benchmarks/bench_outbox.py [--n 100000] [--dir /var/lib/edgetwin]

Every figure is the median of ``--repeat`` runs on a fresh database file.  Absolute figures drift
between machines and runs, so the one to compare is the ratio against the baseline measured in
the same run (one commit, hence one fsync, per record).  Run it on the disk the gateway will use:
on a tmpfs an fsync costs nothing and the ratio means nothing.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Literal

from gateway.contracts import Lane
from gateway.outbox import Outbox, OutItem

Sync = Literal["FULL", "NORMAL"]


def make_items(n: int, payload_bytes: int) -> list[OutItem]:
    """Records shaped like encoded feature windows: a short topic and a ~120-byte payload."""
    t0 = time.time()
    pad = b"\xa5" * max(0, payload_bytes - 8)
    return [
        OutItem(
            Lane.FEATURES if i % 50 else Lane.ALARMS,
            f"features/k3j2{i % 64:02x}",
            i.to_bytes(8, "big") + pad,
            t0,
        )
        for i in range(n)
    ]


def fs_type(directory: Path) -> str:
    """The filesystem type holding ``directory`` (Linux), or "?"."""
    best, kind = "", "?"
    try:
        mounts = Path("/proc/self/mounts").read_text().splitlines()
    except OSError:
        return kind
    target = str(directory.resolve())
    for line in mounts:
        fields = line.split()
        if len(fields) >= 3 and target.startswith(fields[1]) and len(fields[1]) > len(best):
            best, kind = fields[1], fields[2]
    return kind


def bench_put(path: Path, items: list[OutItem], batch: int, sync: Sync) -> float:
    """Records/s of ``put_many`` in batches of ``batch`` (batch 1 = one commit per record)."""
    chunks = [items[i : i + batch] for i in range(0, len(items), batch)]
    with Outbox(path, synchronous=sync, total_max_bytes=None) as ob:
        start = time.perf_counter()
        if batch == 1:
            for it in items:
                ob.put(it)
        else:
            for chunk in chunks:
                ob.put_many(chunk)
        seconds = time.perf_counter() - start
    return len(items) / seconds


def bench_drain(path: Path, items: list[OutItem], batch: int, sync: Sync) -> tuple[float, float, int, int]:
    """Fill, then lease and ack everything in batches: (lease/s, ack/s, peak bytes, bytes after)."""
    with Outbox(path, synchronous=sync, total_max_bytes=None) as ob:
        for i in range(0, len(items), batch):
            ob.put_many(items[i : i + batch])
        wal = Path(f"{path}-wal")
        peak = path.stat().st_size + (wal.stat().st_size if wal.exists() else 0)
        lease_s = ack_s = 0.0
        while True:
            t0 = time.perf_counter()
            leased = ob.lease(batch)
            t1 = time.perf_counter()
            if not leased:
                break
            ob.ack([r.id for r in leased])
            lease_s += t1 - t0
            ack_s += time.perf_counter() - t1
    after = path.stat().st_size  # closing checkpoints the log into the file
    return len(items) / lease_s, len(items) / ack_s, peak, after


def main() -> None:
    """Run the benchmark and print a markdown table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=100_000, help="records per batched run (default 100000)")
    parser.add_argument(
        "--per-row-n", type=int, default=0, help="records in the commit-per-row baseline (n/25)"
    )
    parser.add_argument("--batch", type=int, default=100, help="records per put_many (default 100)")
    parser.add_argument("--payload", type=int, default=120, help="payload bytes (default 120)")
    parser.add_argument("--repeat", type=int, default=3, help="runs per figure, median reported (default 3)")
    parser.add_argument("--dir", type=Path, default=None, help="where the database files go (default: temp)")
    args = parser.parse_args()
    per_row_n = args.per_row_n or max(200, args.n // 25)
    items = make_items(args.n, args.payload)
    baseline_items = items[:per_row_n]

    with tempfile.TemporaryDirectory(prefix="bench-outbox-", dir=args.dir) as tmp:
        root = Path(tmp)
        runs = 0

        def fresh() -> Path:
            nonlocal runs
            runs += 1
            return root / f"run{runs}.db"

        def median(fn: Callable[[], float]) -> float:
            return statistics.median(fn() for _ in range(args.repeat))

        started = time.perf_counter()
        full_batch = median(lambda: bench_put(fresh(), items, args.batch, "FULL"))
        normal_batch = median(lambda: bench_put(fresh(), items, args.batch, "NORMAL"))
        full_row = median(lambda: bench_put(fresh(), baseline_items, 1, "FULL"))
        normal_row = median(lambda: bench_put(fresh(), baseline_items, 1, "NORMAL"))
        drains = [bench_drain(fresh(), items, args.batch, "FULL") for _ in range(args.repeat)]
        elapsed = time.perf_counter() - started
        kind = fs_type(root)

    lease_rate = statistics.median(d[0] for d in drains)
    ack_rate = statistics.median(d[1] for d in drains)
    peak = statistics.median(d[2] for d in drains)
    after = statistics.median(d[3] for d in drains)
    mib = 1024 * 1024

    print(
        f"outbox benchmark: n={args.n}, batch={args.batch}, payload={args.payload} B, "
        f"baseline n={per_row_n}, "
        f"median of {args.repeat}, filesystem {kind}, {elapsed:.1f} s in all\n"
    )
    rows = [
        (
            f"put_many, batches of {args.batch}, synchronous=FULL",
            f"{full_batch:,.0f} records/s",
            full_batch / full_row,
        ),
        (
            f"put_many, batches of {args.batch}, synchronous=NORMAL",
            f"{normal_batch:,.0f} records/s",
            normal_batch / full_row,
        ),
        ("**baseline**: one commit per record, FULL", f"{full_row:,.0f} records/s", 1.0),
        ("one commit per record, NORMAL", f"{normal_row:,.0f} records/s", normal_row / full_row),
        (f"lease, batches of {args.batch} (FULL)", f"{lease_rate:,.0f} records/s", None),
        (f"ack (delete), batches of {args.batch} (FULL)", f"{ack_rate:,.0f} records/s", None),
        (f"file size, peak with {args.n:,} queued (db + wal)", f"{peak / mib:.1f} MiB", None),
        ("file size, all acked then closed", f"{after / mib:.1f} MiB", None),
    ]
    print("| measure | figure | vs. baseline |")
    print("|---|---|---|")
    for name, figure, ratio in rows:
        print(f"| {name} | {figure} | {'' if ratio is None else f'{ratio:.1f}x'} |")
    if kind in ("tmpfs", "ramfs"):
        print("\nwarning: the files were on a RAM filesystem, where fsync is free: the ratio is meaningless")


if __name__ == "__main__":
    main()
