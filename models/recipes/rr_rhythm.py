"""RR rhythm patterns: evaluation on MIT-BIH record 100 and on the synthetic rhythm set.

Run: ``python -m models.recipes.rr_rhythm --data /work/shared/data`` (about a minute).

Nothing is trained: :mod:`gateway.inference.rhythm` fixes its thresholds from physiology and from
the synthetic set (development), and record 100's reference annotations are read for evaluation.
The synthetic set (:mod:`drivers.sim.rhythms`, fixed seeds): bigeminy and trigeminy of ventricular
(compensatory pause) and supraventricular (reset) origin at coupling ratios 0.75-0.95, couplets,
runs and pauses inside sinus rhythm; 20 h of sinus rhythm with respiratory sinus arrhythmia
(0.12-0.31 Hz, 6-2 % deep) and a gradual rate change; atrial fibrillation as a negative.
"""

from __future__ import annotations

import argparse
import json
import logging
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from drivers.sim import rhythms
from drivers.sim.protocol import RR
from gateway.contracts import AlarmKind
from gateway.inference import rhythm
from gateway.inference.rhythm import RhythmDetector, RhythmMonitor
from gateway.sample import MDC, Sample, Stream
from models.recipes.common import MODELS_DIR, rounded
from models.recipes.rr_ectopic import BEAT_CODES, FS, PREMATURE_CODES, read_atr, scores

log = logging.getLogger(__name__)

NAME = "rr_rhythm"
VERSION = "1.0.0"
COUPLINGS = (0.75, 0.8, 0.85, 0.9, 0.95)
SEEDS = range(8)


def classify(rr: npt.NDArray[np.float64]) -> npt.NDArray[np.bool_]:
    """Premature verdicts per interval (the beat that ends it) from the streaming detector."""
    det = RhythmDetector()
    out = np.zeros(len(rr), bool)
    for x in rr:
        out[list(det.feed(float(x)).premature)] = True
    return out


def episodes(rr: npt.NDArray[np.float64]) -> list[tuple[str, str, int]]:
    """The monitor's alarms over an RR series: (kind, pattern, interval index)."""
    stream = Stream("sim", "bed", "strap", MDC[RR])
    mon = RhythmMonitor()
    t = np.cumsum(rr) / 1000.0
    out = []
    for i, (ti, x) in enumerate(zip(t, rr, strict=True)):
        a = mon.update(Sample(stream, float(ti), float(ti), float(x)))
        if a is not None:
            out.append((str(a.kind), str(a.detail.get("pattern", "")), i))
    return out


def geminy_set(pattern: str, origin: str, coupling: float) -> dict[str, Any]:
    """Beat scores and episode naming over ``SEEDS`` records of sinus, ``pattern``, sinus."""
    pred: list[npt.NDArray[np.bool_]] = []
    truth: list[npt.NDArray[np.bool_]] = []
    named = cleared = 0
    lag: list[int] = []
    for seed in SEEDS:
        base = rhythms.sinus(600, 1000 + seed, hr_bpm=55.0 + 4.0 * seed, rsa=0.03, scatter_ms=15.0)
        r = rhythms.with_pattern(base, pattern, 200, 400, coupling=coupling, origin=origin)
        pred.append(classify(r.rr))
        truth.append(r.premature)
        eps = episodes(r.rr)
        raised = [e for e in eps if e[0] == AlarmKind.ANOMALY]
        named += len(raised) == 1 and raised[0][1] == pattern
        cleared += [e[0] for e in eps] == [AlarmKind.ANOMALY, AlarmKind.ANOMALY_CLEARED]
        if raised:
            lag.append(raised[0][2] - 200)
    s = scores(np.concatenate(pred), np.concatenate(truth))
    return {
        **s,
        "records": len(SEEDS),
        "one_alarm_named_right": named,
        "raised_then_cleared": cleared,
        "median_intervals_to_alarm": float(np.median(lag)) if lag else float("nan"),
    }


def event_set(pattern: str) -> dict[str, Any]:
    """Naming of single events (couplet, run, pause) in sinus rhythm, one per record."""
    named = cleared = 0
    for seed in SEEDS:
        base = rhythms.sinus(300, 2000 + seed, hr_bpm=60.0 + 3.0 * seed, rsa=0.03, scatter_ms=15.0)
        r = rhythms.with_pattern(base, pattern, 150, 160, coupling=0.7)
        eps = episodes(r.rr)
        raised = [e for e in eps if e[0] == AlarmKind.ANOMALY]
        named += len(raised) == 1 and raised[0][1] == pattern
        cleared += [e[0] for e in eps] == [AlarmKind.ANOMALY, AlarmKind.ANOMALY_CLEARED]
    return {"records": len(SEEDS), "one_alarm_named_right": named, "raised_then_cleared": cleared}


def negatives() -> dict[str, Any]:
    """False premature beats and alarms on sinus arrhythmia and pattern alarms on AF."""
    false_beats = 0
    hours = 0.0
    alarms: Counter[str] = Counter()
    for seed in range(20):
        b = rhythms.sinus(
            5000,
            100 + seed,
            hr_bpm=60.0 + seed,
            rsa=0.06 - 0.002 * seed,
            resp_hz=0.12 + 0.01 * seed,
            scatter_ms=12.0 + 0.5 * seed,
            hr_end_bpm=80.0,
        )
        false_beats += int(classify(b.rr).sum())
        hours += float(b.rr.sum()) / 3.6e6
        alarms.update(p for k, p, _ in episodes(b.rr) if k == AlarmKind.ANOMALY)
    af: Counter[str] = Counter()
    af_hours = 0.0
    for seed in range(5):
        a = rhythms.atrial_fibrillation(3000, 300 + seed)
        af_hours += float(a.rr.sum()) / 3.6e6
        af.update(p for k, p, _ in episodes(a.rr) if k == AlarmKind.ANOMALY)
    return {
        "sinus_arrhythmia": {
            "hours": hours,
            "false_beats": false_beats,
            "false_beats_per_hour": false_beats / hours,
            "alarms": dict(alarms),
        },
        "atrial_fibrillation": {"hours": af_hours, "alarms": dict(af)},
    }


def mitdb_100(data: Path) -> dict[str, Any]:
    """Premature-beat scores and alarms on MIT-BIH record 100 (RR from the reference beat times)."""
    times, codes = read_atr(data / "physio" / "mitdb_100" / "100.atr")
    beats = np.isin(codes, list(BEAT_CODES))
    bt, bc = times[beats], codes[beats]
    rr = np.diff(bt) / FS * 1000.0
    truth = np.isin(bc[1:], list(PREMATURE_CODES))
    hours = float(bt[-1] - bt[0]) / FS / 3600.0
    s: dict[str, Any] = dict(scores(classify(rr), truth))
    s.update(
        beats=len(rr),
        hours=hours,
        false_beats_per_hour=s["fp"] / hours,
        alarms=dict(Counter(p for k, p, _ in episodes(rr) if k == AlarmKind.ANOMALY)),
    )
    return s


def main(argv: list[str] | None = None) -> int:
    """Evaluate the detector and write its card."""
    ap = argparse.ArgumentParser(prog="python -m models.recipes.rr_rhythm", description=__doc__)
    ap.add_argument("--data", type=Path, default=Path("/work/shared/data"))
    ap.add_argument("--out", type=Path, default=MODELS_DIR)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    synthetic: dict[str, Any] = {}
    pooled: dict[str, list[int]] = {}
    for pattern in ("bigeminy", "trigeminy"):
        for origin in ("V", "S"):
            for c in COUPLINGS:
                r = geminy_set(pattern, origin, c)
                synthetic[f"{pattern}_{origin}_{c:.2f}"] = r
                acc = pooled.setdefault(pattern, [0, 0, 0])
                for j, key in enumerate(("tp", "fp", "fn")):
                    acc[j] += r[key]
                log.info("%s %s %.2f: P %.3f R %.3f", pattern, origin, c, r["precision"], r["recall"])
    for pattern, (tp, fp, fn) in pooled.items():
        p, rc = tp / (tp + fp), tp / (tp + fn)
        synthetic[f"{pattern}_pooled"] = {"precision": p, "recall": rc, "f1": 2 * p * rc / (p + rc)}
    for pattern in ("couplet", "run", "pause"):
        synthetic[pattern] = event_set(pattern)
    card = {
        "name": NAME,
        "version": VERSION,
        "kind": "rule",
        "task": "rhythm patterns from RR intervals: bigeminy, trigeminy, couplets, runs, pauses as alarm episodes",
        "runtime": "gateway.inference.rhythm.RhythmMonitor",
        "subject_kind": "medical",
        "inputs": [{"metric": "MDC_ECG_TIME_PD_RR_GL", "feature": "rr interval per beat (ms)"}],
        "parameters": {
            "cycles": rhythm.CYCLES,
            "margin": rhythm.MARGIN,
            "sign_misses": rhythm.SIGN_MISSES,
            "hold_cycles": rhythm.HOLD_CYCLES,
            "hold_prematurity": rhythm.HOLD_PREMATURITY,
            "irregular": rhythm.IRREGULAR,
            "irregular_beats": rhythm.IRREGULAR_BEATS,
            "min_prematurity": rhythm.MIN_PREMATURITY,
            "coupling_sd": rhythm.COUPLING_SD,
            "pause_cv": rhythm.PAUSE_CV,
            "pause_factor": rhythm.PAUSE_FACTOR,
            "pause_min_ms": rhythm.PAUSE_MIN_MS,
            "clear_cycles": rhythm.CLEAR_CYCLES,
        },
        "protocol": (
            "no training; thresholds chosen on the synthetic rhythm set (drivers.sim.rhythms, fixed "
            "seeds) and checked on MIT-BIH record 100; beat-level precision/recall of premature "
            "beats, one correctly named alarm and its cleared event per episode"
        ),
        "evaluation": {"mitdb_100": mitdb_100(args.data), "synthetic": synthetic, **negatives()},
        "limits": [
            "origin (ventricular or supraventricular) is not named: RR alone does not tell it reliably",
            "a pattern is named only when its median coupling ratio is at most 0.96: at 0.96 bigeminy F1 0.98 and trigeminy 0.74 (V, 8 records), at 0.97 nothing is found",
            "at coupling 0.95 (5 % premature) precision drops to 0.97-0.99: the first sinus beats after an episode are sometimes marked",
            "thresholds were chosen on the same synthetic generator they are scored on (other seeds in the tests); real records may differ",
            "breathing at exactly 2 or 3 beats per breath with RSA as deep as ectopy would look like a pattern",
            "atrial fibrillation is not named (no irregular-rhythm alarm here); premature beats are not judged inside it, nor in the first 16 beats of a stream",
            "a beat the strap misses doubles an interval and can be reported as a pause",
            "runs longer than three beats are a rate change to the rule (tachycardia is out of scope)",
        ],
        "compute": (
            "pure Python on at most 32 intervals per RR update: about 50 us per update on one core of "
            "the reference machine (2026-12-03, tests/benchmarks/bench_rhythm.py; 5-9x the single-beat "
            "monitor on a loaded machine), under 0.01 % of a core at 75 beats/min"
        ),
        "training": {
            "data": "none (rule)",
            "recipe": "python -m models.recipes.rr_rhythm --data <shared data>",
        },
    }
    path = args.out / f"{NAME}.card.json"
    path.write_text(json.dumps(rounded(card), indent=2, sort_keys=True) + "\n")
    log.info("wrote %s", path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
