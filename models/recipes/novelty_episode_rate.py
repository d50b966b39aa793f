"""The novelty detector's threshold at a stated false-episode rate, against the commissioning-only limit, on TEP.

Run: ``python -m models.recipes.novelty_episode_rate --data /work/shared/data`` (allowed data only,
about two minutes); ``--held-out`` adds ``d00_te`` and the 14 held-out fault runs, frozen and
through the gateway's pipeline (several minutes more).  Writes nothing but ``--json``.

The limit shipped up to 1.5.0 (:func:`gateway.inference.novelty.episode_limit`) lets no out-of-fold block of
the commissioning raise an episode: after 25 h of ``d00`` that is "none in a day", which does not
bound the rate on new normal data near the aim of one a day.  The option
``false_episodes_per_day`` (:func:`gateway.inference.novelty.episode_rate_limit`) sets the
threshold where the tail of the out-of-fold run statistic, extrapolated, gives that rate at the
machine's own window rate, never below that limit (the default since 1.6.0).  Both are compared at the card's chosen
settings (nothing is chosen here), the option at ``PER_DAY``:

* allowed data (what the protocol may look at): the tuning faults' training runs (miss rate,
  frozen), the tuning runs before their faults (flagged share, false episodes per day, frozen),
  ``d00`` out of fold in 3 blocks of 8.3 h (:func:`models.recipes.novelty_tep.long_normal`), the
  generated slow drift then slow fault as the gateway adapts
  (:func:`models.recipes.novelty_tep.follows_drift`), and the gateway replays of
  :func:`models.recipes.novelty_tep_gateway.allowed` (alarms per case and column);
* ``--held-out``: the card's evaluation (per-fault miss rates on all 21 test runs, ``d00_te``'s
  flagged share and false episodes per day, the 14 held-out runs before their faults) frozen, and
  the gateway path with the option (episode_limit's is the 1.5.0 card's ``gateway_path``, BENCHMARKS.md).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from gateway.inference.novelty import PcaSpec, fit_pca
from models.recipes.common import MODELS_DIR
from models.recipes.novelty_tep import (
    F64,
    FAULT_AT_TRAIN,
    FAULTS,
    HELD,
    NAME,
    TUNE,
    evaluate,
    follows_drift,
    load,
    long_normal,
    mdr,
    normal_before_faults,
    novelty_scores,
    spec_of,
)
from models.recipes.novelty_tep_gateway import PERIOD_S, allowed
from models.recipes.novelty_tep_gateway import evaluate as gateway_evaluate

log = logging.getLogger(__name__)

#: The rate the option is evaluated at: half the aim of one false episode per machine-day.
PER_DAY = 0.5
#: The limits compared: episode_limit alone (0: the option off, 1.5.0's threshold) and the option at
#: PER_DAY (the default since 1.6.0).
RULES: tuple[float, ...] = (0.0, PER_DAY)
_KEYS = ("lags", "ewma", "ewma_slow", "var_keep", "cusum_k")


def rule_name(per_day: float | None) -> str:
    """How a rule is named in the tables."""
    return "episode_limit" if not per_day else f"{per_day:g} episodes/day"


def spec_at(card: dict[str, Any], per_day: float | None) -> PcaSpec:
    """The card's chosen settings, their threshold at ``per_day`` at TEP's 3-min windows (0: episode_limit alone)."""
    base = spec_of(card["chosen"])
    return PcaSpec(
        lags=base.lags,
        ewma=base.ewma,
        var_keep=base.var_keep,
        far=base.far,
        ewma_slow=base.ewma_slow,
        cusum_k=base.cusum_k,
        episodes_per_window=(per_day or 0.0) * PERIOD_S / 86_400.0,
    )


def frozen_allowed(runs: dict[str, F64], card: dict[str, Any], per_day: float | None) -> dict[str, Any]:
    """Frozen scoring on allowed data: tuning faults' misses, their runs before the faults, d00 in long blocks, drift."""
    spec = spec_at(card, per_day)
    fit = fit_pca(runs["d00"], spec)
    misses = {
        f"fault_{f:02d}": round(mdr(novelty_scores(fit, runs[f"d{f:02d}"]) > 1.0, FAULT_AT_TRAIN), 4)
        for f in TUNE
    }
    far, episodes = normal_before_faults(fit, runs, TUNE)
    settings: dict[str, Any] = {k: card["chosen"][k] for k in _KEYS}
    settings["false_episodes_per_day"] = per_day  # stated either way: the gateway's default is the option
    drift_far, kept = follows_drift(settings)
    return {
        "threshold": round(fit.threshold, 4),
        "tune_mdr": round(float(np.mean(list(misses.values()))), 4),
        "tune_mdr_per_fault": misses,
        "tune_far_before_faults": round(far, 4),
        "tune_false_episodes_per_day": round(episodes, 2),
        **(long_normal(spec, runs["d00"]) or {}),
        "drift_far": round(drift_far, 4),
        "drift_fault_kept": kept,
    }


def run(runs: dict[str, F64], card: dict[str, Any], tmp: Path, *, held_out: bool) -> dict[str, Any]:
    """Every figure of both rules (allowed data; with ``held_out`` the held-out ones too)."""
    out: dict[str, Any] = {}
    for per_day in RULES:
        name = rule_name(per_day)
        fig: dict[str, Any] = {"frozen_allowed": frozen_allowed(runs, card, per_day)}
        fig["gateway_allowed"] = allowed(runs, card, tmp / "allowed", per_day)
        log.info("%s: allowed data done", name)
        if held_out:
            fig["frozen_held_out"] = evaluate(runs, spec_at(card, per_day))["own_limits"]["novelty"]
            if per_day:  # episode_limit's held-out gateway figures: the 1.5.0 card's gateway_path
                fig["gateway_held_out"] = gateway_evaluate(runs, card, tmp / "held-out", per_day)
        out[name] = fig
    return out


def _row(label: str, cells: list[str]) -> str:
    return f"| {label} | " + " | ".join(cells) + " |"


def report(ev: dict[str, Any]) -> str:
    """Markdown tables of both rules side by side."""
    names = list(ev)
    rule = "|---" * (len(names) + 1) + "|"
    lines = [_row("allowed data, frozen", names), rule]
    frozen_keys = (
        "threshold",
        "tune_mdr",
        "tune_far_before_faults",
        "tune_false_episodes_per_day",
        "long_false_episodes_per_day",
        "long_max_held_windows",
        "long_far",
        "drift_far",
        "drift_fault_kept",
    )
    lines += [_row(key, [str(ev[n]["frozen_allowed"].get(key)) for n in names]) for key in frozen_keys]
    lines += ["", _row("allowed data, gateway: alarms raised at", names), rule]
    for case, cols in ev[names[0]]["gateway_allowed"].items():
        for col in cols:
            lines.append(
                _row(
                    f"{case}, {col}",
                    [str(ev[n]["gateway_allowed"][case][col]["alarm_windows"]) for n in names],
                )
            )
    if "frozen_held_out" in ev[names[0]]:
        held = [ev[n]["frozen_held_out"] for n in names]
        lines += ["", _row("held out, frozen", names), rule]
        for f in FAULTS:
            lines.append(
                _row(f"fault {f}{' T' if f in TUNE else ''}", [f"{h[f'fault_{f:02d}']:.3f}" for h in held])
            )
        lines.append(
            _row("mean, held-out", [f"{np.mean([h[f'fault_{f:02d}'] for f in HELD]):.3f}" for h in held])
        )
        for key in (
            "far_d00_te",
            "false_episodes_per_day",
            "far_before_faults",
            "false_episodes_per_day_before_faults",
        ):
            lines.append(_row(key, [str(h[key]) for h in held]))
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    """Print both rules' figures (allowed data; ``--held-out``: and held-out)."""
    ap = argparse.ArgumentParser(prog="python -m models.recipes.novelty_episode_rate", description=__doc__)
    ap.add_argument("--data", type=Path, default=Path("/work/shared/data"))
    ap.add_argument("--held-out", action="store_true", help="also d00_te and the 14 held-out fault runs")
    ap.add_argument("--json", type=Path, help="write every figure here")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("gateway").setLevel(logging.ERROR)
    card = json.loads((MODELS_DIR / f"{NAME}.detector.json").read_text("utf-8"))
    with tempfile.TemporaryDirectory() as tmp:
        ev = run(load(args.data), card, Path(tmp), held_out=args.held_out)
    sys.stdout.write(report(ev))
    if args.json is not None:
        args.json.write_text(json.dumps(ev, indent=1) + "\n", "utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
