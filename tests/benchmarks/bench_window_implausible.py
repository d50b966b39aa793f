"""What leaving implausible samples out of the windows costs the windower, per sample.

The windower of ``--before`` (``git show <rev>:...``) and today's take the same 1 Hz vitals
(``--streams`` streams of one bed, window 30 s, hop 10 s) in alternating rounds of one process, so
the ratios hold under load: with no sample left out, with ``--share`` of the samples flagged as
artifacts by the device, and (today's only) with that share marked out of a plausibility rule's
range (left out of the features and counted).

Timed: every sample's hand-off (``put``) and every ``close_due``, per sample handed off.

Run: ``.venv/bin/python tests/benchmarks/bench_window_implausible.py [--before HEAD] [--hops 2000]``
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
from gateway.sample import MDC, Quality, Sample, Stream

WINDOW_S, HOP_S = 30.0, 10.0
ARTIFACT, GOOD = Quality.ARTIFACT, Quality.GOOD
METRICS = ("MDC_PULS_OXIM_SAT_O2", "MDC_PULS_OXIM_PULS_RATE", "MDC_ECG_HEART_RATE", "MDC_TEMP_BODY")


def run(make: Any, hops: int, n_streams: int, share: float, mode: str) -> float:
    """Nanoseconds per sample of put and close_due over ``hops`` hops of 1 Hz samples.

    ``mode``: which ``share`` of the samples is left out: "artifact" (flagged by the device),
    "implausible" (marked by the plausibility rules), or "none".
    """
    w = make()
    streams = [
        Stream("mon", "bed-1", f"MON-{i}", MDC[METRICS[i % len(METRICS)]], rate_hz=1.0)
        for i in range(n_streams)
    ]
    rng = np.random.default_rng(1)
    per_hop = round(HOP_S)
    samples = 0
    spent = 0.0
    for h in range(hops):
        odd = (rng.random((n_streams, per_hop)) < share).tolist() if mode != "none" else None
        rows = [
            [
                Sample(
                    s,
                    h * HOP_S + k,
                    1.7e9 + h * HOP_S + k,
                    97.0,
                    ARTIFACT if mode == "artifact" and odd is not None and odd[i][k] else GOOD,
                )
                for k in range(per_hop)
            ]
            for i, s in enumerate(streams)
        ]
        t0 = time.perf_counter()
        if mode == "implausible" and odd is not None:
            for ss, flags in zip(rows, odd, strict=True):
                for sample, bad in zip(ss, flags, strict=True):
                    w.put(sample, bad)
        else:
            for ss in rows:
                for sample in ss:
                    w.put(sample)
        w.close_due((h + 1) * HOP_S, 1.7e9 + (h + 1) * HOP_S)
        spent += time.perf_counter() - t0
        samples += n_streams * per_hop
    return spent * 1e9 / samples


def main() -> None:
    """Alternate the windowers; print the median per-sample cost and the ratios."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hops", type=int, default=2000)
    ap.add_argument("--streams", type=int, default=8)
    ap.add_argument("--share", type=float, default=0.1, help="share of samples marked implausible")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--before", default="HEAD", help="revision of the windower before the change")
    args = ap.parse_args()
    old = module_at(args.before, "gateway/pipeline/windows.py").Windower
    # No loss within a round (lost after 60 s), no alarm to hand on: the windower's own cost only.
    common: dict[str, Any] = {"window_s": WINDOW_S, "hop_s": HOP_S, "grace_s": 0.0, "lost_after_s": 60.0}
    common["on_alarm"] = lambda a: None
    share = f"{args.share:.0%}"
    designs = {
        "before, none left out": (lambda: old(**common), "none"),
        "now, none left out": (lambda: Windower(**common), "none"),
        f"before, {share} flagged artifact": (lambda: old(**common), "artifact"),
        f"now, {share} flagged artifact": (lambda: Windower(**common), "artifact"),
        f"now, {share} implausible": (lambda: Windower(**common), "implausible"),
    }
    times = alternate(
        {
            name: partial(run, make, args.hops, args.streams, args.share, mode)
            for name, (make, mode) in designs.items()
        },
        args.repeat,
    )
    print(
        f"{args.streams} streams x 1 Hz, window {WINDOW_S:g} s, hop {HOP_S:g} s, {args.hops} hops, "
        f"median of {args.repeat} alternating rounds"
    )
    print_ratios(times, "before, none left out", "ns per sample (put + close_due)", 0)


if __name__ == "__main__":
    main()
