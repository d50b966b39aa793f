"""The residual CUSUM's commissioning span: false novelty episodes on a healthy simulated pump.

Run: ``python tests/benchmarks/bench_novelty_span.py [--spans-h 1 2 4 6] [--seeds 5 1 2] [--allowances 1 0.5]``.

For each commissioning span and seed, the simulated pump of ``tests/test_stream_detector.py``
(hop 10 s, no fault) is commissioned for the span and then judged for six hours, with the residual
CUSUM off (``cusum_k`` 0: T² and SPE alone) and on at each allowance (default: ``CUSUM_AUTO_K``,
and 0.5, 1.4.0's, at which the six hours were first measured), alternated per seed in one process.  Printed per cell: false novelty episodes / hours in alarm (an alarm
still on at the run's end counted to it, marked ``+``).  The default turns the CUSUM on from
``CUSUM_AUTO_MIN_S`` of commissioning: the shortest span at which it adds no episode and no time in
alarm to T² and SPE's (BENCHMARKS.md, novelty).  No timing: the figures are counts.
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from test_stream_detector import PUMP, of, run  # noqa: E402

from gateway.inference.novelty import CUSUM_AUTO_K  # noqa: E402

JUDGED_S = 6 * 3600.0


def in_alarm(alarms: list[dict[str, Any]], end: float) -> tuple[int, float, bool]:
    """Episodes raised, hours in alarm and whether one is still on at ``end`` (simulated seconds)."""
    raised: float | None = None
    episodes, held = 0, 0.0
    for a in alarms:
        if a["alarm"] == "anomaly" and a["detail"].get("episode") != "resumed" and raised is None:
            episodes += 1
            raised = a["_t"]
        elif a["alarm"] == "anomaly_cleared" and raised is not None:
            held += a["_t"] - raised
            raised = None
    if raised is not None:
        held += end - raised
    return episodes, held / 3600.0, raised is not None


def cell(span_s: float, seed: int, cusum_k: float) -> str:
    """One run's false episodes / hours in alarm after ``span_s`` of commissioning."""
    models = {
        "novelty": {"subjects": [PUMP], "commissioning_s": span_s, "cusum_k": cusum_k},
        "streams": {"enabled": False},
    }
    with tempfile.TemporaryDirectory() as tmp:
        alarms = of(run(Path(tmp), span_s + JUDGED_S, models, [], seed=seed), "novelty")
    episodes, hours, open_ = in_alarm(alarms, span_s + JUDGED_S)
    return f"{episodes} / {hours:.2f}{'+' if open_ else ''}"


def main() -> None:
    """Print the table of BENCHMARKS.md's commissioning-span measurement."""
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--spans-h", type=float, nargs="+", default=[1.0, 2.0, 4.0, 6.0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[5, 1, 2])
    ap.add_argument("--allowances", type=float, nargs="+", default=[CUSUM_AUTO_K, 0.5])
    args = ap.parse_args()
    logging.basicConfig(level=logging.ERROR)  # every anomaly is logged
    t0 = time.monotonic()
    ks = [0.0, *args.allowances]
    print(
        "| commissioning | T² + SPE alone | " + " | ".join(f"with the CUSUM ({k:g})" for k in ks[1:]) + " |"
    )
    print("|---" * len(ks) + "|---|")
    for hours in args.spans_h:
        cells: dict[float, list[str]] = {k: [] for k in ks}
        for seed in args.seeds:
            for k in ks:  # alternated per seed
                cells[k].append(cell(hours * 3600.0, seed, k))
        print(f"| {hours:g} h | " + " | ".join(", ".join(cells[k]) for k in ks) + " |", flush=True)
    print(f"({time.monotonic() - t0:.0f} s)")


if __name__ == "__main__":
    main()
