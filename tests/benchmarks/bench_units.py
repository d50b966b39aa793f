"""What unit-aware rules cost: process start and RSS of the gateway with and without pint loaded.

Each case runs in a fresh interpreter (imports are once per process).  Baseline: importing the
gateway runtime and building a plausibility checker whose streams use the rules' own units (no
pint).  Then: the same plus one stream in kPa, which loads pint and builds its registry.
Per-sample cost is unchanged either way: rules are converted once per stream and cached.

Run: ``python tests/benchmarks/bench_units.py``
"""

from __future__ import annotations

import json
import subprocess
import sys

CASE = """
import json, resource, time
t0 = time.perf_counter()
import gateway.runtime
from gateway.inference.plausibility import PlausibilityChecker
from gateway.sample import Stream, industrial_metric
chk = PlausibilityChecker()
chk.rule_for(Stream("s", "m", "d", industrial_metric("L/Pressure", "bar"), "industrial", 1.0))
t1 = time.perf_counter()
if {convert}:
    chk.rule_for(Stream("s", "m", "d", industrial_metric("L/Pressure", "kPa"), "industrial", 1.0))
t2 = time.perf_counter()
print(json.dumps({{"import_s": t1 - t0, "convert_s": t2 - t1,
                   "rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}}))
"""


def run(convert: bool) -> dict[str, float]:
    """One fresh interpreter's figures (the median of five)."""
    runs: list[dict[str, float]] = []
    for _ in range(5):
        out = subprocess.run(
            [sys.executable, "-c", CASE.format(convert=convert)], capture_output=True, text=True, check=True
        )
        runs.append(json.loads(out.stdout))
    runs.sort(key=lambda r: r["import_s"] + r["convert_s"])
    return runs[2]


def main() -> None:
    """Print the table of BENCHMARKS.md's units section."""
    base, conv = run(False), run(True)
    print("| case | start s | first conversion s | max RSS MB | RSS vs baseline |")
    print("|---|---|---|---|---|")
    for name, r in (
        ("baseline: rules in the streams' own units", base),
        ("one stream in kPa (pint loaded)", conv),
    ):
        print(
            f"| {name} | {r['import_s']:.3f} | {r['convert_s']:.3f} | {r['rss_mb']:.1f} | "
            f"{r['rss_mb'] / base['rss_mb']:.2f}x |"
        )


if __name__ == "__main__":
    main()
