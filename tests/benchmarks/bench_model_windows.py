"""What per-model windows cost the windower: close_due per subject-window with extra lengths.

Three windowers cut the same synthetic pump (8 streams at ``--rate`` Hz, window 20 s, hop 1 s)
in alternating rounds of one process, so the ratios hold under load:

* ``before``: the windower of the commit before per-model windows (``git show <rev>:...``), one length;
* ``one length``: today's windower, no model asking for another length;
* ``+5 s +40 s``: today's windower cutting a 5 s and a 40 s tail beside the 20 s window
  (the fusion's novelty and a 40 s pump model).

The timed part is ``close_due`` (ring reads, usable masks, features, records); the hand-off is
done before each hop and not timed.

Run: ``.venv/bin/python tests/benchmarks/bench_model_windows.py [--hops 3000] [--rate 1]``
"""

from __future__ import annotations

import argparse
import sys
import time
from functools import partial
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import numpy as np
from revisions import alternate, module_at, print_ratios

from gateway.pipeline.windows import Windower
from gateway.sample import SampleBlock, Stream, industrial_metric
from models.recipes.pump_skab import SIGNALS

WINDOW_S, HOP_S = 20.0, 1.0


def old_windower_class(rev: str) -> Any:
    """The Windower class of ``rev``'s gateway/pipeline/windows.py."""
    return module_at(rev, "gateway/pipeline/windows.py").Windower


def run(make: Any, hops: int, rate: float) -> float:
    """Microseconds of close_due per subject-window over ``hops`` hops."""
    w = make()
    streams = [
        Stream("plc", "pump-1", "PLC-1", industrial_metric(s, "1"), kind="industrial", rate_hz=rate)
        for s in SIGNALS
    ]
    per_hop = max(1, round(rate * HOP_S))
    rng = np.random.default_rng(1)
    spent = 0.0
    windows = 0
    for h in range(hops):
        t = h * HOP_S + np.arange(per_hop) / rate
        for s in streams:
            v = rng.normal(size=per_hop)
            w.put_block(SampleBlock(s, t, t + 1.7e9, v, np.zeros(per_hop, np.uint8)))
        t0 = time.perf_counter()
        windows += len(w.close_due((h + 1) * HOP_S, 1.7e9 + (h + 1) * HOP_S))
        spent += time.perf_counter() - t0
    return spent * 1e6 / max(windows, 1)


def main() -> None:
    """Alternate the three windowers; print the median per-window cost and the ratios."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hops", type=int, default=3000)
    ap.add_argument("--rate", type=float, default=1.0, help="Hz per stream (SKAB: 1)")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--before", default="HEAD~1", help="revision of the windower before per-model windows")
    args = ap.parse_args()
    old = old_windower_class(args.before)
    common: dict[str, Any] = {
        "window_s": WINDOW_S,
        "hop_s": HOP_S,
        "grace_s": 0.0,
        "lost_after_s": 60.0,
        "on_alarm": lambda a: None,
    }
    designs = {
        "before": lambda: old(**common),
        "one length": lambda: Windower(**common),
        "+5 s +40 s": lambda: Windower(**common, lengths={"industrial": [5.0, 40.0]}),
    }
    times = alternate(
        {name: partial(run, make, args.hops, args.rate) for name, make in designs.items()}, args.repeat
    )
    print(
        f"8 streams x {args.rate:g} Hz, window {WINDOW_S:g} s, hop {HOP_S:g} s, {args.hops} hops, median of {args.repeat} alternating rounds"
    )
    print_ratios(times, "before", "us per subject-window")


if __name__ == "__main__":
    main()
