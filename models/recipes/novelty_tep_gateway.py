"""Novelty on the Tennessee Eastman runs as it ships: through the gateway's pipeline, adapting.

Run: ``python -m models.recipes.novelty_tep_gateway --data /work/shared/data`` (a few minutes);
with ``--allowed`` it replays only the normal operation the protocol may look at (:func:`allowed`)
and prints its table, writing nothing (about half a minute).

:mod:`models.recipes.novelty_tep` scores each run with a detector fitted once on ``d00`` and then
frozen.  The gateway's detector is not frozen: after commissioning it adapts its inputs' means
on windows it judged normal (guarded), leaves the first windows after a start unjudged while its
smoothing settles, and its alarms come from the pipeline's episode logic.  Here every run goes
through that code, nothing re-implemented:

* each TEP sample (3 min apart) is one sample per variable (52 industrial streams of one subject,
  ``TEP/v01`` .. ``TEP/v52``) handed to :class:`gateway.runtime.Pipeline`, built from a config as
  ``edgetwin run`` builds it (``[pipeline] window_s = hop_s = 180``, so each window holds one
  sample of each stream), and :meth:`~gateway.runtime.Pipeline.step` closes each window on the
  simulated clock: windower, features, the novelty model in its worker thread, the episode
  logic (``[models] raise_after_windows`` / ``clear_after_windows``, the defaults), anonymizer
  and outbox;
* the detector is :class:`gateway.inference.novelty.NoveltyModel` built by
  :func:`~gateway.inference.novelty.build_novelty` from ``[models.novelty]``, commissioned on
  ``d00`` the way the card's protocol commissions it (all 500 samples: ``commissioning_s`` =
  500 x 180 s = 25 h, so the residual CUSUM is on by its default rule), its state kept in
  ``state_dir`` as the gateway keeps it;
* ``d00_te`` and each held-out fault's test run are then replayed from that commissioned state (a
  copy per run, as a gateway restarted onto the run; one run's adaptation does not carry into
  another), in time order, and so are the tuning faults' test runs up to their faults (the normal
  operation a choice made for the gateway path may look at);
* what is counted is what leaves the gateway: a window is flagged when the score it carries in its
  record is above 1, an alarm is an ``anomaly`` record of model ``novelty``.

One setting, fixed by the card (1.6.0, with its threshold at 0.5 false episodes per day; no setting is chosen here, and no held-out figure chose
anything): the gateway's defaults, which since 1.4.0 are the card's ``chosen`` settings (the
CUSUM on at the chosen allowance by ``gateway_cusum_default``); the recipe stops if they differ.
It is replayed twice: as shipped (``adapt_rate`` default) and with ``adapt_rate = 0``, and beside
them the recipe's own frozen scoring of the same settings in the same run, so the effect of
adaptation is told apart from the effect of the gateway's start-up.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import logging
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from drivers import REGISTRY
from gateway.alarms.episodes import EpisodeTracker
from gateway.anonymize import Anonymizer, Pseudonymizer
from gateway.config import Config, validate
from gateway.contracts import AlarmKind, Lane, ModelResult
from gateway.inference.build import ModelsSection
from gateway.inference.novelty import NoveltyUse, PcaSpec, build_novelty, fit_pca, gap_rows
from gateway.outbox import AsyncOutbox, Outbox
from gateway.records import as_map, decode
from gateway.runtime import Pipeline
from gateway.sample import SampleBlock, Stream, industrial_metric
from models.recipes.common import MODELS_DIR
from models.recipes.novelty_tep import (
    FAULT_AT_TE,
    HARD,
    HELD,
    HOURS_PER_SAMPLE,
    LONG_BLOCKS,
    NAME,
    TUNE,
    load,
    novelty_scores,
)

log = logging.getLogger(__name__)

B = npt.NDArray[np.bool_]

PERIOD_S = 180.0  # TEP's sample period
SUBJECT = "tep-plant"
T0 = PERIOD_S * 10_000  # monotonic start, on the hop grid
WALL = 1.7e9
MODEL = "novelty"
STREAMS = tuple(
    Stream("tep", SUBJECT, "TEP-SIM", industrial_metric(f"TEP/v{j:02d}", "1"), "industrial", 1.0 / PERIOD_S)
    for j in range(1, 53)
)
#: Settings replayed: the gateway's defaults (since 1.4.0 the card's choice: a site without settings
#: gets it; "card_choice" sets the same values in [models.novelty], kept for older cards).
SETTINGS = ("gateway_defaults",)
#: The runs replayed after commissioning: normal operation, then every held-out fault's test run.
RUNS = ("d00_te", *(f"d{f:02d}_te" for f in HELD))
#: And the tuning faults' test runs up to their faults: the normal operation a choice may look at.
TUNING = tuple(f"d{f:02d}_te" for f in TUNE)
_DRAIN = 1000  # records read back from the outbox at a time


@dataclass(frozen=True, slots=True)
class Replay:
    """What one run left the gateway with: per window, flagged or not (None: unjudged), and the raises."""

    flags: list[bool | None]
    raised: list[int]  # windows (= samples) whose record raised an anomaly alarm
    named: list[str] = field(default_factory=list)  # per raise, the input it names first


def novelty_table(
    card: dict[str, Any], setting: str, *, adapt: bool, rows: int = 500, per_day: float | None = None
) -> dict[str, Any]:
    """The ``[models.novelty]`` table of a setting, commissioned on ``rows`` windows (all of ``d00``).

    ``per_day``: its threshold at that many expected false episodes per day (``false_episodes_per_day``).
    """
    table: dict[str, Any] = {"commissioning_s": rows * PERIOD_S}
    if per_day is not None:
        table["false_episodes_per_day"] = per_day
    if setting == "card_choice":
        chosen = card["chosen"]
        keys = ("lags", "ewma", "ewma_slow", "var_keep", "false_alarm_rate", "false_episodes_per_day")
        table |= {k: chosen[k] for k in keys}
        # cusum_k stays unset: the default rule turns it on at the chosen allowance (checked below).
    if not adapt:
        table["adapt_rate"] = 0.0
    return table


def gateway_config(state_dir: Path, novelty: dict[str, Any]) -> Config:
    """The config of a gateway that runs the novelty detector alone on 3-min windows."""
    raw = {
        "gateway": {"state_dir": str(state_dir)},
        # One window per TEP sample; a stream silent for three periods is lost (never, here).
        "pipeline": {"window_s": PERIOD_S, "hop_s": PERIOD_S, "grace_s": 0.0, "sensor_lost_s": 3 * PERIOD_S},
        "outbox": {"synchronous": "normal"},  # nothing here survives a power cut anyway
        "alarms": {"defaults": False},  # TEP's variables carry no unit the limits know
        "models": {"ectopy": False, "streams": {"enabled": False}, "novelty": novelty},
    }
    return validate(raw, "<novelty_tep_gateway>", REGISTRY)


def spec_of_use(use: NoveltyUse) -> PcaSpec:
    """The detector settings the gateway builds from a ``[models.novelty]`` table (for the frozen baseline)."""
    (model,) = build_novelty(use, hop_s=PERIOD_S, state_dir=None)
    return model.spec


async def _drain(outbox: AsyncOutbox, into: list[dict[str, Any]]) -> None:
    await outbox.flush()
    while batch := await outbox.lease(_DRAIN):
        into += [as_map(decode(item.payload)) | {"lane": item.lane} for item in batch]
        await outbox.ack([item.id for item in batch])


async def _feed(config: Config, x: npt.NDArray[np.float64]) -> list[dict[str, Any]]:
    """Every record the gateway sends while it is fed the rows of ``x``, one window per row."""
    core = config.core
    state = core.gateway.state_dir
    models = build_novelty(core.models.novelty, hop_s=core.pipeline.hop_s, state_dir=state)
    anon = Anonymizer(Pseudonymizer(b"t" * 32), time_mode="relative", start_wall=WALL)
    records: list[dict[str, Any]] = []
    quality = np.zeros(1, np.uint8)
    async with AsyncOutbox(lambda: Outbox(state / "outbox.db", synchronous="NORMAL")) as outbox:
        pipeline = Pipeline(config, anon, outbox, models)
        for i, row in enumerate(x):
            t = np.array([T0 + (i + 0.5) * PERIOD_S])  # mid-window: window i + 1 holds sample i
            for stream, v in zip(STREAMS, row, strict=True):
                pipeline.sink.put_block(SampleBlock(stream, t, t + WALL, np.array([v]), quality))
            end = T0 + (i + 1) * PERIOD_S
            await pipeline.step(now_mono=end, now_wall=WALL + end)
            if i % 200 == 199:
                await _drain(outbox, records)
        await _drain(outbox, records)
    return records


def feed(config: Config, x: npt.NDArray[np.float64]) -> list[dict[str, Any]]:
    """:func:`_feed` on its own event loop."""
    return asyncio.run(_feed(config, x))


def commission(state_dir: Path, table: dict[str, Any], normal: npt.NDArray[np.float64]) -> Path:
    """Commission the detector on ``normal`` in ``state_dir``; the state file it keeps."""
    state_dir.mkdir(parents=True, exist_ok=True)
    feed(gateway_config(state_dir, table), normal)
    (path,) = (state_dir / "models").glob("novelty-*.json")
    if '"fit": {' not in path.read_text("utf-8"):
        raise SystemExit(f"novelty_tep_gateway {path}: not commissioned after {len(normal)} windows")
    return path


def replay(state: Path, table: dict[str, Any], x: npt.NDArray[np.float64], workdir: Path) -> Replay:
    """One run through a gateway started on the commissioned ``state`` (a copy); what it sent."""
    if workdir.exists():
        shutil.rmtree(workdir)
    (workdir / "models").mkdir(parents=True)
    shutil.copy2(state, workdir / "models" / state.name)
    records = feed(gateway_config(workdir, table), x)
    windows = sorted((r for r in records if r["type"] == "features"), key=lambda r: r["t"])
    if len(windows) != len(x):
        raise SystemExit(f"novelty_tep_gateway: {len(windows)} window records for {len(x)} samples")
    index = {w["t"]: i for i, w in enumerate(windows)}
    flags: list[bool | None] = [
        None if (s := w["scores"].get(MODEL)) is None else bool(s > 1.0) for w in windows
    ]
    raises = sorted(
        (index[a["t"]], max(a["contrib"], key=a["contrib"].get, default=""))
        for a in records
        if a["lane"] == Lane.ALARMS
        and a["alarm"] == AlarmKind.ANOMALY.value
        and a["detail"].get("model") == MODEL
        and a["detail"].get("episode") != "resumed"
    )
    return Replay(flags, [i for i, _ in raises], [name for _, name in raises])


def frozen(flags: B) -> Replay:
    """The recipe's frozen scoring of a run, through the gateway's episode logic (its defaults)."""
    m = ModelsSection()
    tracker = EpisodeTracker(m.clear_after_windows, m.raise_after_windows)
    raised = []
    for i, f in enumerate(flags):
        e = tracker.update((SUBJECT, MODEL), ModelResult(1.0 if f else 0.0, bool(f)))
        if e is not None and e.kind is AlarmKind.ANOMALY:
            raised.append(i)
    return Replay([bool(f) for f in flags], raised)


def fault_figures(r: Replay, start: int = FAULT_AT_TE) -> dict[str, Any]:
    """Missed-detection rate after ``start`` (an unjudged window is a miss) and the delays, in minutes."""
    after = [bool(f) for f in r.flags[start:]]
    first_flag = next((i for i, f in enumerate(after) if f), None)
    first_alarm = next((i - start for i in r.raised if i >= start), None)
    minutes = PERIOD_S / 60.0
    return {
        "mdr": round(1.0 - float(np.mean(after)), 4),
        "delay_flag_min": None if first_flag is None else first_flag * minutes,
        "delay_alarm_min": None if first_alarm is None else first_alarm * minutes,
        # An episode raised before the fault and still open at its start (a false one it rides on).
        "open_at_start": bool(any(i < start for i in r.raised) and _open_at(r, start)),
    }


def _open_at(r: Replay, start: int) -> bool:
    """True if the last raise before ``start`` was not cleared before it (the episode logic's clear)."""
    m = ModelsSection()
    last = max(i for i in r.raised if i < start)
    normal_run = 0
    for f in r.flags[last:start]:
        normal_run = normal_run + 1 if f is False else 0
        if normal_run >= m.clear_after_windows:
            return False
    return True


def normal_figures(replays: Sequence[Replay], stop: int | None = None) -> dict[str, Any]:
    """Flagged share and false episodes (raises) per day over normal runs (each up to ``stop``)."""
    flags = [[bool(f) for f in r.flags[:stop]] for r in replays]
    n = sum(len(f) for f in flags)
    raises = sum(sum(1 for i in r.raised if stop is None or i < stop) for r in replays)
    return {
        "far": round(float(np.mean(np.concatenate(flags))), 4),
        "false_episodes": raises,
        "hours": round(n * HOURS_PER_SAMPLE, 2),
        "false_episodes_per_day": round(raises * 24.0 / (n * HOURS_PER_SAMPLE), 2),
        "unjudged_windows": sum(1 for r in replays for f in r.flags[:stop] if f is None),
    }


def figures(replays: dict[str, Replay]) -> dict[str, Any]:
    """Per held-out fault, on d00_te, before the held-out and the tuning faults: what :func:`replay` counts."""
    out: dict[str, Any] = {f"fault_{f:02d}": fault_figures(replays[f"d{f:02d}_te"]) for f in HELD}
    out["mean_held_out_mdr"] = round(float(np.mean([out[f"fault_{f:02d}"]["mdr"] for f in HELD])), 4)
    out["d00_te"] = normal_figures([replays["d00_te"]]) | {"alarm_windows": replays["d00_te"].raised}
    out["before_faults"] = normal_figures([replays[f"d{f:02d}_te"] for f in HELD], FAULT_AT_TE)
    out["tuning_before_faults"] = normal_figures([replays[run] for run in TUNING])
    return out


def evaluate(
    runs: dict[str, npt.NDArray[np.float64]], card: dict[str, Any], tmp: Path, per_day: float | None = None
) -> dict[str, Any]:
    """Every setting through the gateway (adapting and not) and frozen, on the same runs."""
    result: dict[str, Any] = {}
    for setting in SETTINGS:
        table = novelty_table(card, setting, adapt=True, per_day=per_day)
        use = NoveltyUse.model_validate(table)
        spec = spec_of_use(use)
        chosen = card["chosen"]
        got = (spec.lags, spec.ewma, spec.ewma_slow, spec.var_keep, spec.cusum_k, use.false_episodes_per_day)
        want = tuple(
            chosen.get(k)
            for k in ("lags", "ewma", "ewma_slow", "var_keep", "cusum_k", "false_episodes_per_day")
        )
        if got != want:
            raise SystemExit(
                f"novelty_tep_gateway: {setting} builds {got} (lags, ewma, ewma_slow, var_keep, cusum_k, "
                "false_episodes_per_day), "
                f"not the card's choice {want}: the defaults and the card must say one thing"
            )
        fit = fit_pca(runs["d00"], spec)
        normal = {run: runs[run][:FAULT_AT_TE] for run in TUNING}
        scored = {run: runs[run] for run in RUNS} | normal
        columns: dict[str, Any] = {
            "frozen": figures({run: frozen(novelty_scores(fit, x) > 1.0) for run, x in scored.items()})
        }
        # Commissioning does not adapt: one commissioned state serves both replays.
        state = commission(tmp / setting / "commissioning", table, runs["d00"])
        for adapt in (False, True):
            t0 = time.monotonic()
            table = novelty_table(card, setting, adapt=adapt, per_day=per_day)
            replays = {run: replay(state, table, x, tmp / setting / "run") for run, x in scored.items()}
            columns["gateway_adapting" if adapt else "gateway_no_adaptation"] = figures(replays)
            log.info("%s, adaptation %s: %.0f s", setting, "on" if adapt else "off", time.monotonic() - t0)
        result[setting] = {
            "novelty": {k: v for k, v in table.items() if k != "adapt_rate"},
            "spec": {
                "lags": spec.lags,
                "ewma": spec.ewma,
                "ewma_slow": spec.ewma_slow,
                "var_keep": spec.var_keep,
                "cusum_k": spec.cusum_k,
                "cusum_clear": spec.cusum_clear,
                "adapt_rate": use.adapt_rate,
                "false_episodes_per_day": use.false_episodes_per_day,
            },
            **columns,
        }
    return result


def allowed(
    runs: dict[str, npt.NDArray[np.float64]], card: dict[str, Any], tmp: Path, per_day: float | None = None
) -> dict[str, Any]:
    """Normal operation the protocol may look at, as shipped, with ``adapt_rate = 0`` and frozen.

    ``d00`` out of fold in the long-operation guard's blocks (each replayed from a commissioning
    on the other blocks, the rows next to it left out) and the tuning runs' normal operation
    before their faults joined into one run (56 h from one commissioning on ``d00``, adaptation
    carried from run to run): whether adaptation or the gateway's start-up adds false episodes
    where nothing is held out.  Per case and column: flagged share, the windows the alarms were
    raised at, and the windows whose verdict differs from the frozen scoring's.  ``per_day``: see
    :func:`novelty_table`.
    """
    spec = spec_of_use(
        NoveltyUse.model_validate(novelty_table(card, SETTINGS[0], adapt=True, per_day=per_day))
    )
    d00 = runs["d00"]
    n, gap = len(d00), gap_rows(spec)
    cases: list[tuple[str, npt.NDArray[np.float64], npt.NDArray[np.float64]]] = []
    for lo, hi in itertools.pairwise(np.linspace(0, n, LONG_BLOCKS + 1).astype(int)):
        keep = np.r_[0 : max(lo - gap, 0), min(hi + gap, n) : n]
        cases.append((f"d00[{lo}:{hi}] out of fold", d00[keep], d00[lo:hi]))
    joined = np.concatenate([runs[run][:FAULT_AT_TE] for run in TUNING])
    cases.append((f"{len(TUNING)} tuning runs before their faults, joined", d00, joined))
    out: dict[str, Any] = {}
    for case, (name, normal, x) in enumerate(cases):
        base = frozen(novelty_scores(fit_pca(normal, spec), x) > 1.0)
        table = novelty_table(card, SETTINGS[0], adapt=True, rows=len(normal), per_day=per_day)
        state = commission(tmp / f"allowed-{case}", table, normal)
        replays = {"frozen": base} | {
            col: replay(
                state,
                novelty_table(card, SETTINGS[0], adapt=adapt, rows=len(normal), per_day=per_day),
                x,
                tmp / "allowed-run",
            )
            for col, adapt in (("gateway_no_adaptation", False), ("gateway_adapting", True))
        }
        out[name] = {
            col: {
                "hours": round(len(x) * HOURS_PER_SAMPLE, 2),
                "far": round(float(np.mean([bool(f) for f in r.flags])), 4),
                "alarm_windows": r.raised,
                "differ_from_frozen": [
                    i for i, (f, g) in enumerate(zip(r.flags, base.flags, strict=True)) if bool(f) != g
                ],
            }
            for col, r in replays.items()
        }
    return out


COLUMNS = (
    ("frozen", "frozen (recipe)"),
    ("gateway_no_adaptation", "gateway, adapt_rate 0"),
    ("gateway_adapting", "gateway as shipped"),
)


def _delay(v: float | None) -> str:
    return "never" if v is None else f"{v:g}"


def report(ev: dict[str, Any]) -> str:
    """The markdown tables of BENCHMARKS.md."""
    lines: list[str] = []
    for setting in SETTINGS:
        e = ev[setting]
        s = e["spec"]
        lines += [
            (
                f"**{setting}** (lags {s['lags']}, EWMA {s['ewma']}, slower EWMA {s['ewma_slow']}, variance "
                f"{s['var_keep']}, residual CUSUM {s['cusum_k']} clearing {s['cusum_clear']}, adapt_rate "
                f"{s['adapt_rate']}): missed-detection rate / minutes to the first flagged window / minutes to "
                "the alarm, after the fault starts:"
            ),
            "",
            "| fault | " + " | ".join(title for _, title in COLUMNS) + " |",
            "|---" * (len(COLUMNS) + 1) + "|",
        ]
        for f in HELD:
            cells = []
            for col, _ in COLUMNS:
                r = e[col][f"fault_{f:02d}"]
                open_ = " (open)" if r["open_at_start"] else ""
                cells.append(
                    f"{r['mdr']:.3f} / {_delay(r['delay_flag_min'])} / {_delay(r['delay_alarm_min'])}{open_}"
                )
            lines.append(f"| {f}{' *' if f in HARD else ''} | " + " | ".join(cells) + " |")
        lines.append(
            "| mean MDR, 14 held-out | "
            + " | ".join(f"{e[c]['mean_held_out_mdr']:.3f}" for c, _ in COLUMNS)
            + " |"
        )
        for key, what in (
            ("d00_te", "d00_te (48 h)"),
            ("before_faults", "14 held-out runs before their faults"),
            ("tuning_before_faults", "tuning side: 7 tuning runs before their faults"),
        ):
            cells = [
                f"{e[c][key]['far']:.3f} / {e[c][key]['false_episodes']} ({e[c][key]['false_episodes_per_day']:.2f}/day)"
                for c, _ in COLUMNS
            ]
            lines.append(f"| {what}: flagged / false episodes | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def allowed_report(ev: dict[str, Any]) -> str:
    """The table of :func:`allowed`: flagged share / alarm windows, and the windows differing from frozen."""
    lines = [
        "| normal operation | " + " | ".join(title for _, title in COLUMNS) + " |",
        "|---" * (len(COLUMNS) + 1) + "|",
    ]
    for name, cols in ev.items():
        cells = []
        for col, _ in COLUMNS:
            c = cols[col]
            differ = f"; differs from frozen at {c['differ_from_frozen']}" if c["differ_from_frozen"] else ""
            cells.append(f"{100 * c['far']:.1f} % / alarms at {c['alarm_windows']}{differ}")
        lines.append(f"| {name} ({cols['frozen']['hours']:g} h) | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    """Replays the runs and writes the ``gateway_path`` section of models/novelty.detector.json."""
    ap = argparse.ArgumentParser(prog="python -m models.recipes.novelty_tep_gateway", description=__doc__)
    ap.add_argument("--data", type=Path, default=Path("/work/shared/data"))
    ap.add_argument("--out", type=Path, default=MODELS_DIR)
    ap.add_argument(
        "--allowed",
        action="store_true",
        help="replay only the normal operation the protocol may look at (d00 out of fold, the tuning "
        "runs before their faults); print its table, write nothing (about 20 s)",
    )
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("gateway").setLevel(logging.ERROR)  # every anomaly is logged: thousands of lines
    runs = load(args.data)
    path = args.out / f"{NAME}.detector.json"
    card = json.loads(path.read_text("utf-8"))
    if args.allowed:
        with tempfile.TemporaryDirectory() as tmp:
            sys.stdout.write(allowed_report(allowed(runs, card, Path(tmp))))
        return 0
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory() as tmp:
        ev = evaluate(runs, card, Path(tmp))
    ev["seconds"] = round(time.monotonic() - t0, 1)
    ev["card_version"] = card["version"]
    ev["protocol"] = __doc__.split("Here every run")[1].split("One setting")[0].strip() if __doc__ else ""
    sys.stdout.write(report(ev))
    card["gateway_path"] = ev
    path.write_text(json.dumps(card, indent=1, sort_keys=True) + "\n", "utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
