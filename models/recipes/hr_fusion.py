"""Heart-rate fusion on MIMIC numerics: HR from the ECG and PULSE from the pleth, one corrupted.

Run: ``python -m models.recipes.hr_fusion --data /work/shared/data`` (a few seconds).

Data: the two MIMIC numerics records in ``physio/mimic_numerics`` (one value a minute; 0 is a
drop-out).  The reference is the *clean* series of the source that gets corrupted; the fused
estimate (``gateway.inference.kalman.HrFusion`` with the parameters below, as the running
gateway's ``[[estimators.fusion]]`` would be set for minute numerics) is scored against it next
to each single source, every source holding its last value for up to ``MAX_GAP_S`` as a monitor
display would.  Corruptions, seeded (``SEED``):

* ``ecg_dropped``: the ECG lead is off for 30 min every 2 h (25 % of the time);
* ``ecg_artifact``: 10 % of ECG minutes read 20-60 /min off, unflagged;
* ``ecg_artifact_flagged``: the same, flagged ``ARTIFACT`` by the device;
* ``ecg_noise``: Gaussian noise of 8 /min on every ECG minute;
* ``pulse_artifact``: 10 % of PULSE minutes 20-60 /min off, unflagged; reference the clean ECG.

Reported per scenario: RMSE and MAE (/min) against the reference, coverage (share of reference
minutes with a value), for the fused estimate the share within its stated 2 SD, and the CPU cost
of one filter update.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from gateway.inference.kalman import HrFusion
from gateway.sample import Quality

F64 = npt.NDArray[np.float64]
RECORDS = (("s00001-2896-10-10-00-31n", "3975656n.dat"), ("s25047-2704-05-04-10-44n", "3234460n.dat"))
SEED = 20
MAX_GAP_S = 600.0
PARAMS: dict[str, Any] = {"q_per_s": 0.1, "sources": {"ecg": 4.0, "pulse": 9.0}, "max_gap_s": MAX_GAP_S}


def read_numerics(root: Path, header: str) -> dict[str, F64]:
    """The HR and PULSE columns of one MIMIC numerics record (/min, NaN for a drop-out)."""
    lines = (root / f"{header}.hea").read_text(encoding="utf-8").splitlines()
    n_sig = int(lines[0].split()[1])
    names, gains = [], []
    for line in lines[1 : 1 + n_sig]:
        parts = line.split()
        names.append(parts[-1])
        gains.append(float(parts[2].split("/")[0]))
    raw = np.fromfile(root / lines[1].split()[0], dtype="<i2").reshape(-1, n_sig).astype(np.float64)
    out = {}
    for name in ("HR", "PULSE"):
        col = raw[:, names.index(name)] / gains[names.index(name)]
        col[(col <= 0) | (raw[:, names.index(name)] == -32768)] = np.nan
        out[name] = col
    return out


def corrupt(name: str, ecg: F64, pulse: F64, rng: np.random.Generator) -> tuple[F64, F64, F64, F64, F64]:
    """(ecg, ecg flags, pulse, pulse flags, reference) for one scenario."""
    ecg, pulse = ecg.copy(), pulse.copy()
    fe, fp = np.zeros(len(ecg)), np.zeros(len(pulse))
    ref = ecg.copy()
    minutes = np.arange(len(ecg))
    spikes = rng.random(len(ecg)) < 0.10
    offset = rng.choice([-1.0, 1.0], len(ecg)) * rng.uniform(20.0, 60.0, len(ecg))
    if name == "ecg_dropped":
        ecg[(minutes % 120) >= 90] = np.nan
    elif name == "ecg_artifact":
        ecg[spikes] += offset[spikes]
    elif name == "ecg_artifact_flagged":
        ecg[spikes] += offset[spikes]
        fe[spikes] = int(Quality.ARTIFACT)
    elif name == "ecg_noise":
        ecg += rng.normal(0.0, 8.0, len(ecg))
    elif name == "pulse_artifact":
        pulse[spikes] += offset[spikes]
    else:
        raise ValueError(f"hr fusion recipe: unknown scenario {name!r}")
    return ecg, fe, pulse, fp, ref


def held(x: F64, max_gap: int) -> F64:
    """``x`` with each value held for up to ``max_gap`` samples (a monitor's display)."""
    out = x.copy()
    last, age = np.nan, max_gap + 1
    for i, v in enumerate(x):
        if np.isfinite(v):
            last, age = v, 0
        else:
            age += 1
            out[i] = last if age <= max_gap else np.nan
    return out


def score(est: F64, ref: F64) -> dict[str, float]:
    """RMSE, MAE and coverage of ``est`` on the minutes where ``ref`` has a value."""
    valid = np.isfinite(ref)
    both = valid & np.isfinite(est)
    err = est[both] - ref[both]
    return {
        "rmse": float(np.sqrt(np.mean(err**2))),
        "mae": float(np.mean(np.abs(err))),
        "coverage": float(both.sum() / valid.sum()),
    }


def run_scenario(name: str, data: list[dict[str, F64]]) -> dict[str, Any]:
    """Fused and single-source errors of one scenario over every record."""
    rng = np.random.default_rng(SEED)
    fused_all, sd_all, ecg_all, pulse_all, ref_all = [], [], [], [], []
    updates, cpu = 0, 0.0
    for rec in data:
        ecg, fe, pulse, fp, ref = corrupt(name, rec["HR"], rec["PULSE"], rng)
        kf = HrFusion(**PARAMS)
        fused, sd = np.full(len(ref), np.nan), np.full(len(ref), np.nan)
        for i in range(len(ref)):
            t = 60.0 * i
            start = time.perf_counter()
            for source, x, flags in (("ecg", ecg, fe), ("pulse", pulse, fp)):
                if np.isfinite(x[i]):
                    kf.update(source, t, float(x[i]), int(flags[i]))
                    updates += 1
            cpu += time.perf_counter() - start
            r = kf.estimate(t)
            if r is not None:
                fused[i], sd[i] = r.hr, r.sd
        gap = int(MAX_GAP_S // 60)
        fused_all.append(fused)
        sd_all.append(sd)
        ecg_all.append(held(ecg, gap))
        pulse_all.append(held(pulse, gap))
        ref_all.append(ref)
    fused, sd, ref = np.concatenate(fused_all), np.concatenate(sd_all), np.concatenate(ref_all)
    ok = np.isfinite(fused) & np.isfinite(ref)
    return {
        "fused": score(fused, ref)
        | {"within_2sd": float(np.mean(np.abs(fused[ok] - ref[ok]) <= 2.0 * sd[ok]))},
        "ecg_alone": score(np.concatenate(ecg_all), ref),
        "pulse_alone": score(np.concatenate(pulse_all), ref),
        "update_us": 1e6 * cpu / max(updates, 1),
    }


SCENARIOS = ("ecg_dropped", "ecg_artifact", "ecg_artifact_flagged", "ecg_noise", "pulse_artifact")


def main(argv: list[str] | None = None) -> int:
    """Run every scenario; print a markdown table and write the JSON beside the models."""
    ap = argparse.ArgumentParser(prog="python -m models.recipes.hr_fusion", description=__doc__)
    ap.add_argument("--data", type=Path, required=True, help="the shared data directory")
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1])
    args = ap.parse_args(argv)
    root = args.data / "physio" / "mimic_numerics"
    data = [read_numerics(root, header) for header, _ in RECORDS]
    results = {name: run_scenario(name, data) for name in SCENARIOS}
    lines = [
        "# hr_fusion: fused HR against single sources on MIMIC numerics (one source corrupted)",
        "",
        f"Records {', '.join(h for h, _ in RECORDS)}; filter {json.dumps(PARAMS)}; seed {SEED}.",
        "",
        "| scenario | fused RMSE / MAE / coverage | within 2 SD | ECG alone | PULSE alone | update |",
        "|---|---|---|---|---|---|",
    ]
    for name, r in results.items():
        cells = [
            f"{r[k]['rmse']:.2f} / {r[k]['mae']:.2f} / {100 * r[k]['coverage']:.0f} %"
            for k in ("fused", "ecg_alone", "pulse_alone")
        ]
        lines.append(
            f"| {name} | {cells[0]} | {100 * r['fused']['within_2sd']:.0f} % | {cells[1]} | {cells[2]} | "
            f"{r['update_us']:.1f} µs |"
        )
    text = "\n".join(lines) + "\n"
    (args.out / "hr_fusion.eval.md").write_text(text, encoding="utf-8")
    (args.out / "hr_fusion.eval.json").write_text(
        json.dumps(results, indent=2, sort_keys=True) + "\n", encoding="utf-8"
    )
    sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
