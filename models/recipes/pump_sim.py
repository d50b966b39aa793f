"""The shipped ``pump_skab`` card on the simulated healthy pump: flagged windows and false episodes.

Run: ``python -m models.recipes.pump_sim`` (about 30 s; needs no shared data; ``--data
../shared/data`` adds SKAB's anomaly-free recording judged the same way as one machine).

For each seed the pump simulator (``drivers.sim``, the demo's and the factory simulator's pump)
runs a commissioning span and then an hour; the gateway's own window features (20 s windows every
10 s), the runtime's :class:`gateway.inference.runner.Normaliser` and the shipped fp32 model score
it window by window, with the baseline frozen at commissioning (``pump_skab`` 1.0.0) or following
as the card says (1.1.0).  Episodes use the gateway's defaults: raised after 2 flagged windows,
cleared after 3 normal ones.  A second run injects a valve fault and bearing wear after
commissioning and counts the flagged windows inside each.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from drivers.sim.protocol import Label, make_generator
from gateway.inference.card import CARD_SUFFIX, load_card
from gateway.inference.runner import Normaliser, Tracking
from models.recipes.common import MODELS_DIR, run, session
from models.recipes.pump_skab import CLIP, INPUTS, MIN_STD_ABS, MIN_STD_REL, SIGNALS, window_features

log = logging.getLogger(__name__)

F64 = npt.NDArray[np.float64]
B = npt.NDArray[np.bool_]

HOP_S = 10
HOUR_S = 3600.0
SPANS = (400.0, 1800.0, 3600.0)


def episodes(flags: B, raise_after: int = 2, clear_after: int = 3) -> int:
    """Episodes the gateway's alarm logic would raise from per-window verdicts."""
    n = run_on = run_off = 0
    on = False
    for f in flags:
        run_on, run_off = (run_on + 1, 0) if f else (0, run_off + 1)
        if not on and run_on >= raise_after:
            on, n = True, n + 1
        elif on and run_off >= clear_after:
            on = False
    return n


def pump_windows(seed: int, seconds: float, events: tuple[Label, ...] = ()) -> tuple[F64, F64]:
    """Window features (one row every HOP_S seconds) and their end times for one simulated pump."""
    w = 20
    series = make_generator("pump", seed=seed, rate_hz=1.0, events=events).generate(0.0, seconds).series
    x = np.column_stack([series[f"Pump1/{s}"].value for s in SIGNALS])
    rows = np.arange(w - 1 + HOP_S - 1, len(x), HOP_S)
    return window_features(x, w)[rows], rows.astype(np.float64)


def served(f: F64, t: F64, span_s: float, sess: Any, thr: float, track: Tracking | None) -> tuple[B, F64]:
    """Verdicts of the windows after commissioning (and their times), as the runtime serves them."""
    comm = t < span_s
    norm = Normaliser.empty(f.shape[1], int(comm.sum()))
    for row, tt in zip(f[comm], t[comm], strict=True):
        norm.add(row, MIN_STD_REL, MIN_STD_ABS, t=float(tt), track=track)
    assert norm.level is not None
    assert norm.std is not None
    flags = np.zeros(int((~comm).sum()), bool)
    for k, (row, tt) in enumerate(zip(f[~comm], t[~comm], strict=True)):
        z = np.clip((row - norm.level) / norm.std, -CLIP, CLIP)
        flags[k] = run(sess, z.reshape(1, -1))[0] > thr
        norm.follow(row, bool(flags[k]), float(tt), track)
    return flags, t[~comm]


def main(argv: list[str] | None = None) -> int:
    """Log the tables of BENCHMARKS.md's simulated-pump section."""
    ap = argparse.ArgumentParser(prog="python -m models.recipes.pump_sim", description=__doc__)
    ap.add_argument("--seeds", type=int, default=16)
    ap.add_argument(
        "--data", type=Path, default=None, help="shared data folder: also judge SKAB's anomaly-free recording"
    )
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    card = load_card(MODELS_DIR / f"pump_skab{CARD_SUFFIX}")
    sess = session(MODELS_DIR / card.files["fp32"].path)
    assert len(card.inputs) == len(INPUTS)
    modes = {"frozen (1.0.0)": None, "following (1.1.0)": Tracking.of(card)}
    log.info(
        "| commissioning | baseline | windows flagged | false episodes / h (mean, max) | hours with any |"
    )
    log.info("|---|---|---|---|---|")
    for span in SPANS:
        data = [pump_windows(seed, span + HOUR_S) for seed in range(args.seeds)]
        for label, track in modes.items():
            flags = [served(f, t, span, sess, card.threshold, track)[0] for f, t in data]
            eps = [episodes(fl) for fl in flags]
            log.info(
                "| %.0f s | %s | %.4f | %.2f, %d | %d of %d |",
                span,
                label,
                np.mean([fl.mean() for fl in flags]),
                np.mean(eps),
                max(eps),
                sum(e > 0 for e in eps),
                len(eps),
            )
    span = float(card.normalisation.commissioning_s or 1800.0)
    valve = Label("valve_fault", span + 600.0, span + 800.0)
    wear = Label("bearing_wear", span + 1500.0, span + 3300.0)
    log.info("faults after %.0f s of commissioning (flagged windows inside each; episodes outside):", span)
    for label, track in modes.items():
        hits = []
        for seed in range(min(args.seeds, 8)):
            f, t = pump_windows(seed, span + 3400.0, (valve, wear))
            flagged, tt = served(f, t, span, sess, card.threshold, track)
            inside_v = (tt >= valve.start_s) & (tt < valve.end_s + 20.0)
            inside_w = (tt >= wear.start_s) & (tt < wear.end_s + 20.0)
            outside = ~(inside_v | inside_w)
            hits.append(
                f"{int(flagged[inside_v].sum())}/{int(inside_v.sum())}, "
                f"{int(flagged[inside_w].sum())}/{int(inside_w.sum())}, {episodes(flagged & outside)}"
            )
        log.info("  %s: %s", label, "; ".join(hits))
    if args.data is not None:
        skab_free(args.data, sess, card.threshold, modes)
    return 0


def skab_free(data: Path, sess: Any, thr: float, modes: dict[str, Tracking | None]) -> None:
    """Log flagged windows and episodes on SKAB's anomaly-free recording judged as one machine."""
    path = data / "industrial" / "skab" / "data" / "anomaly-free" / "anomaly-free.csv"
    x = np.genfromtxt(path, delimiter=";", skip_header=1, usecols=range(1, 9))
    w = 20
    rows = np.arange(w - 1 + HOP_S - 1, len(x), HOP_S)
    f, t = window_features(x, w)[rows], rows.astype(np.float64)
    log.info("SKAB anomaly-free recording (%.1f h) as one machine:", len(x) / 3600.0)
    for span in SPANS:
        for label, track in modes.items():
            flags, _ = served(f, t, span, sess, thr, track)
            log.info(
                "  %.0f s commissioning, %s: %.2f h judged, %.4f windows flagged, %d episodes",
                span,
                label,
                len(flags) * HOP_S / 3600.0,
                flags.mean(),
                episodes(flags),
            )


if __name__ == "__main__":
    raise SystemExit(main())
