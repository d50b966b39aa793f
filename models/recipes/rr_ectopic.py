"""RR-interval ectopic-beat rule: evaluation on MIT-BIH record 100 and on synthetic bigeminy.

Run: ``python -m models.recipes.rr_ectopic --data /work/shared/data`` (seconds).

Nothing is trained: :mod:`gateway.inference.ectopic` fixes every parameter from physiology, and
record 100's reference annotations are read here for evaluation only.  RR intervals come from the
annotated beat times alone (what a BLE strap sends); a beat is ectopic in the reference when it is
annotated A, a, J, S (supraventricular premature) or V (ventricular premature).

Also measured: beats wrongly flagged and alarms per hour on the simulator's sinus rhythm, and
alarms per hour on synthetic bigeminy (every other beat premature), where the right answer is one
alarm when it starts.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from drivers.sim.protocol import RR, PatientGenerator
from gateway.inference import ectopic
from gateway.inference.ectopic import EctopicDetector, EctopyMonitor
from gateway.sample import MDC, Sample, Stream
from models.recipes.common import MODELS_DIR, rounded

log = logging.getLogger(__name__)

NAME = "rr_ectopic"
VERSION = "1.0.0"
FS = 360.0  # MIT-BIH sampling rate
# MIT annotation codes (ecgcodes.h): beats, and which of them are premature.
BEAT_CODES = {1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 25, 30, 31, 34, 35, 38}
PREMATURE_CODES = {4: "a", 5: "V", 7: "J", 8: "A", 9: "S"}
_SKIP, _NUM, _SUB, _CHN, _AUX = 59, 60, 61, 62, 63


def read_atr(path: Path) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]:
    """Sample positions and codes of the annotations in a WFDB MIT-format annotation file."""
    data = np.frombuffer(path.read_bytes(), dtype="<u2")
    t = 0
    times: list[int] = []
    codes: list[int] = []
    i = 0
    while i < len(data):
        word = int(data[i])
        code, value = word >> 10, word & 0x3FF
        i += 1
        if code == 0 and value == 0:
            break
        if code == _SKIP:
            hi, lo = int(data[i]), int(data[i + 1])
            skip = (hi << 16) | lo
            t += skip - (1 << 32) if skip >= 1 << 31 else skip
            i += 2
        elif code == _AUX:
            i += (value + 1) // 2
        elif code in (_NUM, _SUB, _CHN):
            pass
        else:
            t += value
            times.append(t)
            codes.append(code)
    return np.asarray(times, np.int64), np.asarray(codes, np.int64)


def scores(pred: npt.NDArray[np.bool_], truth: npt.NDArray[np.bool_]) -> dict[str, float]:
    """Precision, recall, F1 and counts of beat-level detections."""
    tp = int((pred & truth).sum())
    fp = int((pred & ~truth).sum())
    fn = int((~pred & truth).sum())
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"precision": precision, "recall": recall, "f1": f1, "tp": tp, "fp": fp, "fn": fn}


def classify(rr: npt.NDArray[np.float64]) -> npt.NDArray[np.bool_]:
    """Ectopic verdicts per interval (the beat that ends it) from the streaming detector."""
    det = EctopicDetector()
    out = np.zeros(len(rr), bool)
    for x in rr:
        for beat in det.feed(float(x)):
            out[beat.index] = beat.ectopic
    return out


def alarms(rr: npt.NDArray[np.float64]) -> int:
    """ANOMALY alarms the monitor raises over an RR series."""
    stream = Stream("sim", "bed", "strap", MDC[RR])
    mon = EctopyMonitor()
    t = np.cumsum(rr) / 1000.0
    return sum(
        mon.update(Sample(stream, float(ti), float(ti), float(x))) is not None
        for ti, x in zip(t, rr, strict=True)
    )


def sinus_rr(hours: float, seed: int) -> npt.NDArray[np.float64]:
    """The simulator's resting sinus RR series."""
    gen = PatientGenerator(seed=seed, rate_hz=1.0)
    return gen.generate(0.0, hours * 3600.0).series[RR].value


def bigeminy(
    rr: npt.NDArray[np.float64], start: int, coupling: float = 0.7
) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.bool_]]:
    """Every other beat from ``start`` on made premature with a compensatory pause."""
    out = rr.copy()
    truth = np.zeros(len(rr), bool)
    for i in range(start, len(rr) - 1, 2):
        sinus = out[i]
        out[i] = round(coupling * sinus)
        out[i + 1] = round(2 * sinus - out[i] + (out[i + 1] - sinus))
        truth[i] = True
    return out, truth


def main(argv: list[str] | None = None) -> int:
    """Evaluate the rule and write its card and report."""
    ap = argparse.ArgumentParser(prog="python -m models.recipes.rr_ectopic", description=__doc__)
    ap.add_argument("--data", type=Path, default=Path("/work/shared/data"))
    ap.add_argument("--out", type=Path, default=MODELS_DIR)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    times, codes = read_atr(args.data / "physio" / "mitdb_100" / "100.atr")
    beats = np.isin(codes, list(BEAT_CODES))
    bt, bc = times[beats], codes[beats]
    rr = np.diff(bt) / FS * 1000.0
    truth = np.isin(bc[1:], list(PREMATURE_CODES))
    pred = classify(rr)
    hours = (bt[-1] - bt[0]) / FS / 3600.0
    mit: dict[str, Any] = dict(scores(pred, truth))
    mit.update(
        beats=len(rr),
        premature_in_reference={
            PREMATURE_CODES[c]: int((bc[1:] == c).sum()) for c in PREMATURE_CODES if (bc[1:] == c).any()
        },
        false_beats_per_hour=mit["fp"] / hours,
        alarms=alarms(rr),
        hours=hours,
    )
    sinus = sinus_rr(4.0, seed=11)
    sinus_fp = int(classify(sinus).sum())
    big, big_truth = bigeminy(sinus_rr(1.0, seed=12), start=900)
    big_hours = float(big.sum()) / 3.6e6
    ev: dict[str, Any] = {
        "mitdb_100": mit,
        "sim_sinus_4h": {
            "beats": len(sinus),
            "false_beats": sinus_fp,
            "false_beats_per_hour": sinus_fp / 4.0,
            "alarms_per_hour": alarms(sinus) / 4.0,
        },
        "sim_bigeminy_1h": {**scores(classify(big), big_truth), "alarms": alarms(big), "hours": big_hours},
    }
    card = {
        "name": NAME,
        "version": VERSION,
        "kind": "rule",
        "task": "premature (ectopic) beats from RR intervals alone, and a frequent-ectopy alarm",
        "subject_kind": "medical",
        "inputs": [{"metric": "MDC_ECG_TIME_PD_RR_GL", "feature": "rr interval per beat (ms)"}],
        "runtime": "gateway.inference.ectopic.EctopyMonitor",
        "parameters": {
            "prematurity": ectopic.PREMATURITY,
            "pause_ratio": ectopic.PAUSE,
            "reference_beats": ectopic.REFERENCE_BEATS,
            "burden_beats": ectopic.BURDEN_BEATS,
            "alarm_burden": ectopic.ALARM_BURDEN,
            "clear_burden": ectopic.CLEAR_BURDEN,
        },
        "calibration": "none: every parameter fixed from physiology before record 100's labels were read; "
        "the labels are used for evaluation only",
        "training": {
            "recipe": "python -m models.recipes.rr_ectopic --data <shared data>",
            "data": "none (rule)",
        },
        "evaluation": ev,
    }
    card = rounded(card, 4)
    (args.out / f"{NAME}.card.json").write_text(
        json.dumps(card, indent=2, sort_keys=True) + "\n", encoding="utf-8"
    )
    m = card["evaluation"]["mitdb_100"]
    b = card["evaluation"]["sim_bigeminy_1h"]
    s = card["evaluation"]["sim_sinus_4h"]
    (args.out / f"{NAME}.eval.md").write_text(
        f"# {NAME} {VERSION}: ectopic beats from RR intervals alone\n\n"
        f"MIT-BIH 100 ({m['beats']} intervals, reference premature beats {m['premature_in_reference']}): "
        f"precision {m['precision']:.3f}, recall {m['recall']:.3f}, F1 {m['f1']:.3f} "
        f"(TP {m['tp']}, FP {m['fp']}, FN {m['fn']}); {m['false_beats_per_hour']:.1f} false beats/h; "
        f"{m['alarms']} frequent-ectopy alarms in {m['hours']:.2f} h.\n\n"
        f"Simulated sinus rhythm, 4 h: {s['false_beats_per_hour']:.2f} false beats/h, {s['alarms_per_hour']:.2f} alarms/h.\n\n"
        f"Simulated bigeminy (1 h, every other beat premature after beat 900): precision {b['precision']:.3f}, "
        f"recall {b['recall']:.3f}, {b['alarms']} alarm(s) in {b['hours']:.2f} h.\n",
        encoding="utf-8",
    )
    log.info("MIT-BIH 100: %s", {k: m[k] for k in ("precision", "recall", "f1", "tp", "fp", "fn")})
    log.info("sinus %s; bigeminy %s", s, {k: b[k] for k in ("precision", "recall", "alarms")})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
