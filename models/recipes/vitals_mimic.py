"""Vital-signs anomaly model: MIMIC numerics with injected, labelled events; fp32 and int8 ONNX.

Run: ``python -m models.recipes.vitals_mimic --data /work/shared/data`` (about a minute on 2 cores).

Data: two MIMIC numerics records at one value per minute (``physio/mimic_numerics``): s00001
(32 h, a calm adult) and s25047 (72 min, a restless one with unlabelled real desaturations and
long ECG drop-outs).  Heart rate is the ECG ``HR`` channel, then ``SpO2`` and ``RESP``; 0.0 is
a drop-out and becomes "no value".  MIMIC carries no body temperature: a temperature channel is
synthesised (36.8 Cel, a 0.25 Cel circadian swing, slow AR(1) wander, 0.1 Cel resolution) and
every figure that involves temperature says so.

Events: desaturation, bradycardia, tachycardia and fever are injected into the real baselines
with the physiology that goes with them (a desaturation raises heart and breathing rate a little;
a fever raises heart rate ~9 /min per Cel).  Each replica of a baseline is shifted by a random
offset per vital (heart rate -3..+30 /min and so on) so the model learns clinical ranges rather
than one patient's levels, and gets its own seeded event draws.  Events are placed only where
their key sensor reports (a desaturation under a probe that is off is a sensor case, not a model
case).

Split (held apart in time, patient and event instance): training uses record s00001 minutes
0-1199 (two halves, 12 replicas each); evaluation uses s00001 minutes 1200-1935 and all of s25047,
20 replicas each with events drawn from a different seed.  The threshold is chosen on
out-of-fold scores of the two training halves: the lowest threshold whose false alarms stay
within ``FA_BUDGET_PER_H``.  Leave-one-kind-out runs repeat everything with one event kind
removed from training and report the recall on that kind, which the model never saw.

Inputs: ``mean``, ``min``, ``max`` of each vital over a ``WINDOW_MIN``-minute window (the
gateway's own :func:`gateway.pipeline.features.basic_features_batch`), z-scored against fixed
population statistics.  ``std`` and ``slope`` are left out on purpose: over five one-minute
values they measure minute-to-minute change, over a 30 s window of 1 Hz samples they measure
sensor noise and breath-to-breath swings, so their scale depends on the sampling rate; the level
features do not.  Patients are not commissioned: a patient may already be desaturating at
admission, and a per-patient baseline would learn that as normal.

Model: a 12-16-1 ReLU network with a sigmoid output, trained by full-batch Adam on class- and
kind-balanced cross-entropy (deterministic); int8 by static QDQ quantization on training rows.

Also measured: event recall and false alarms per hour on the gateway's own 30 s windows of the
simulated patient (:mod:`drivers.sim`), to check that the one-per-minute training carries over to
1 Hz data.
"""

from __future__ import annotations

import argparse
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from drivers.sim.protocol import Label, PatientGenerator
from gateway.contracts import StreamFeatures, WindowRecord
from gateway.inference.plausibility import PlausibilityChecker
from gateway.pipeline.features import basic_features_batch
from gateway.pipeline.windows import Windower
from gateway.sample import MDC, SampleBlock, Stream
from models.recipes.common import (
    MODELS_DIR,
    binary_scores,
    export_fp32_int8,
    file_entry,
    latency_figures,
    rounded,
    run,
    session,
    write_card,
)
from models.recipes.dense import backend_card_fields, backends_report
from models.recipes.tflite import litert_report

log = logging.getLogger(__name__)

F64 = npt.NDArray[np.float64]
I64 = npt.NDArray[np.int64]
B = npt.NDArray[np.bool_]

NAME = "vitals_mimic"
VERSION = "1.0.0"
SEED = 20240917
VITALS = ("MDC_ECG_HEART_RATE", "MDC_PULS_OXIM_SAT_O2", "MDC_RESP_RATE", "MDC_TEMP_BODY")
MIMIC_SIGNALS = ("HR", "SpO2", "RESP")  # the fourth vital, temperature, is synthesised
FEATURES = ("mean", "min", "max")
INPUTS = tuple((m, f) for m in VITALS for f in FEATURES)
KINDS = ("desaturation", "bradycardia", "tachycardia", "fever")
KEY_VITAL = {"desaturation": 1, "bradycardia": 0, "tachycardia": 0, "fever": 3}
WINDOW_MIN = 5
TRAIN_RECORD = "s00001-2896-10-10-00-31n"
OTHER_RECORD = "s25047-2704-05-04-10-44n"
TRAIN_MINUTES = 1200
TRAIN_REPLICAS = 12
TEST_REPLICAS = 20
FA_BUDGET_PER_H = 0.2
HIDDEN = 16
STEPS = 1500
LR = 0.01
L2 = 1e-4
CLIP = 30.0
POS_ENVELOPE = 0.5  # a window is an event window when an event is at least half developed in it
SIM_WINDOW_S = 30.0
SIM_HOP_S = 10.0
#: Unlabelled real abnormality in a baseline (per minute, standard bedside alarm limits): alarms
#: there are reported apart from false alarms, and counted as false in the raw figure.
CLINICAL = {"spo2_below": 88.0, "hr_below": 40.0, "hr_above": 130.0, "resp_below": 6.0, "resp_above": 35.0}


# ---- reading ------------------------------------------------------------------------------


def read_numerics(header: Path) -> tuple[tuple[str, ...], F64, float]:
    """Names, values and start hour of day of a single-segment WFDB format-16 record.

    Values are rows x signals in physical units, NaN for WFDB's no-value code.
    """
    lines = [ln for ln in header.read_text(encoding="ascii").splitlines() if ln and not ln.startswith("#")]
    head = lines[0].split()
    n_sig, n_samp = int(head[1]), int(head[3])
    # Base time is [[HH:]MM:]SS; the numerics records start at 00:31:25 and 10:44:18.
    parts = [float(p) for p in head[4].split(":")] if len(head) > 4 else [0.0]
    parts = [0.0] * (3 - len(parts)) + parts
    names: list[str] = []
    gains: list[float] = []
    bases: list[float] = []
    dat = ""
    for ln in lines[1 : 1 + n_sig]:
        f = ln.split()
        if f[1] != "16":
            raise ValueError(f"{header}: signal format {f[1]}: only format 16 is read here")
        dat = f[0]
        gain_txt = f[2].split("/")[0]
        if "(" in gain_txt:
            gain_txt, base_txt = gain_txt.rstrip(")").split("(")
            base = float(base_txt)
        else:
            base = float(f[4])  # WFDB: baseline defaults to the ADC zero
        names.append(f[8])
        gains.append(float(gain_txt) or 200.0)
        bases.append(base)
    raw = np.fromfile(header.parent / dat, dtype="<i2")[: n_samp * n_sig].reshape(n_samp, n_sig)
    values = (raw.astype(np.float64) - np.asarray(bases)) / np.asarray(gains)
    values[raw == -32768] = np.nan
    return tuple(names), values, parts[0] + parts[1] / 60.0 + parts[2] / 3600.0


def load_vitals(data: Path, record: str) -> tuple[F64, float]:
    """HR, SpO2, RESP of one record (minutes x 3, NaN for drop-outs) and its start hour of day."""
    names, values, hour = read_numerics(data / "physio" / "mimic_numerics" / f"{record}.hea")
    out = np.column_stack([values[:, names.index(s)] for s in MIMIC_SIGNALS])
    out[~(out > 0.0)] = np.nan  # 0.0 is a sensor drop-out
    return out, hour


def synthetic_temperature(n: int, start_hour: float, rng: np.random.Generator) -> F64:
    """A plausible body temperature per minute: circadian swing, slow wander, 0.1 Cel resolution."""
    hours = start_hour + np.arange(n) / 60.0
    wander = np.empty(n)
    x = 0.0
    noise = rng.standard_normal(n)
    for i in range(n):
        x = 0.995 * x + 0.008 * noise[i]  # AR(1), stationary spread ~0.08 Cel, hours-long memory
        wander[i] = x
    circadian = 0.25 * np.sin(2.0 * math.pi * (hours - 10.0) / 24.0)  # highest late afternoon
    return np.round(36.8 + circadian + wander + 0.03 * rng.standard_normal(n), 1)


# ---- events -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Event:
    """One injected event: span in minutes, ramps and magnitudes."""

    kind: str
    start: float
    end: float
    ramp_in: float
    ramp_out: float
    level: float  # SpO2 nadir (%), heart-rate target (/min) or temperature peak (Cel)
    hr_rise: float  # /min added at full depth
    resp_rise: float  # /min added at full depth

    def envelope(self, t: F64) -> F64:
        """How far the event has developed, 0..1, at minutes ``t``."""
        up = np.clip((t - self.start) / self.ramp_in, 0.0, 1.0)
        down = np.clip((self.end - t) / self.ramp_out, 0.0, 1.0)
        x = np.minimum(up, down)
        x = x * x * (3.0 - 2.0 * x)
        return np.where((t >= self.start) & (t < self.end), x, 0.0)


def make_event(kind: str, start: float, rng: np.random.Generator, *, mild: bool = False) -> Event:
    """One event of ``kind`` starting at ``start`` with magnitudes drawn from physiology.

    ``mild`` events sit at the shallow end of the trained magnitudes or beyond it (borderline
    clinical cases): nadir 86-90 %, heart rate 42-48 or 105-115 /min, fever peak 38.0-38.3 Cel.
    """
    u = rng.random(6)
    if kind == "desaturation":
        dur, ri, ro = 2.0 + 10.0 * u[0], 0.5 + 2.5 * u[1], 0.5 + 2.5 * u[2]
        level, hr, resp = (86.0 + 4.0 * u[3]) if mild else (72.0 + 16.0 * u[3]), 15.0 * u[4], 6.0 * u[5]
    elif kind == "bradycardia":
        dur, ri, ro = 2.0 + 8.0 * u[0], 0.5 + 1.5 * u[1], 0.5 + 1.5 * u[2]
        level, hr, resp = (42.0 + 6.0 * u[3]) if mild else (30.0 + 15.0 * u[3]), 0.0, 0.0
    elif kind == "tachycardia":
        dur, ri, ro = 3.0 + 17.0 * u[0], 1.0 + 4.0 * u[1], 1.0 + 4.0 * u[2]
        level, hr, resp = (105.0 + 10.0 * u[3]) if mild else (115.0 + 45.0 * u[3]), 0.0, 5.0 * u[5]
    elif kind == "fever":
        dur, ri, ro = 90.0 + 210.0 * u[0], 20.0 + 40.0 * u[1], 30.0 + 60.0 * u[2]
        level = (38.0 + 0.3 * u[3]) if mild else (38.3 + 1.7 * u[3])
        hr, resp = 9.0 * (level - 37.0), 1.5 * (level - 37.0)
    else:
        raise ValueError(f"vitals recipe: event kind {kind!r}: unknown")
    if ri + ro > 0.8 * dur:
        s = 0.8 * dur / (ri + ro)
        ri, ro = ri * s, ro * s
    return Event(kind, start, start + dur, ri, ro, level, hr, resp)


def draw_events(v: F64, kinds: Sequence[str], rng: np.random.Generator, *, mild: bool = False) -> list[Event]:
    """Events in turn over the kinds, 60-180 min apart, each where its key sensor reports."""
    n = len(v)
    out: list[Event] = []
    order = [str(k) for k in rng.permutation(list(kinds))]
    t = float(rng.uniform(10.0, 60.0))
    k = 0
    while t < n - WINDOW_MIN:
        ev = make_event(order[k % len(order)], t, rng, mild=mild)
        if ev.end > n - 1:
            break
        lo, hi = math.floor(ev.start), math.ceil(ev.end)
        if np.isfinite(v[lo:hi, KEY_VITAL[ev.kind]]).mean() < 0.8:
            t += 30.0
            continue
        out.append(ev)
        k += 1
        t = ev.end + float(rng.uniform(60.0, 180.0))
    return out


def inject(v: F64, events: Sequence[Event]) -> F64:
    """The four vitals with the events laid over them (drop-outs stay drop-outs)."""
    t = np.arange(len(v), dtype=np.float64)
    hr, spo2, resp, temp = (v[:, j].copy() for j in range(4))
    for ev in events:
        env = ev.envelope(t)
        if ev.kind == "desaturation":
            spo2 += (ev.level - spo2) * env
        elif ev.kind in ("bradycardia", "tachycardia"):
            hr += (ev.level - hr) * env
        else:
            temp += (ev.level - temp) * env
        hr += ev.hr_rise * env
        resp += ev.resp_rise * env
    return np.column_stack([np.round(hr, 1), np.round(spo2, 1), np.round(resp, 1), np.round(temp, 1)])


def shift_baseline(v: F64, rng: np.random.Generator) -> F64:
    """A replica's baseline: the real one moved by one random offset per vital (another patient)."""
    d = np.array(
        [rng.uniform(-3.0, 30.0), rng.uniform(-2.5, 1.0), rng.uniform(-1.5, 6.0), rng.uniform(-0.35, 0.35)]
    )
    out: F64 = v + d
    out[:, 1] = np.minimum(out[:, 1], 100.0)
    return out


def clinical_minutes(v: F64) -> B:
    """Minutes of a baseline outside standard bedside alarm limits (unlabelled real events)."""
    c = CLINICAL
    with np.errstate(invalid="ignore"):
        out: B = (
            (v[:, 1] < c["spo2_below"])
            | (v[:, 0] < c["hr_below"])
            | (v[:, 0] > c["hr_above"])
            | (v[:, 2] < c["resp_below"])
            | (v[:, 2] > c["resp_above"])
        )
    return out


# ---- windows ------------------------------------------------------------------------------


_STREAMS = tuple(Stream("mimic", "patient", "monitor", MDC[m], "medical", 1.0 / 60.0) for m in VITALS)


@dataclass(frozen=True, slots=True)
class Scenario:
    """One baseline replica with its events, as windows ending at each minute ``WINDOW_MIN - 1..``."""

    name: str
    events: tuple[Event, ...]
    x: F64  # raw features, rows x inputs, NaN where absent
    present: I64  # inputs present per row
    plausible: B  # no plausibility rule broken (the runtime would score the row)
    label: npt.NDArray[np.int8]  # 1 event window, 0 normal, -1 ambiguous (an event's faint edge)
    kind: npt.NDArray[np.int8]  # index in KINDS of the event touching the row, -1 none
    clinical: B  # rows whose window holds a real (unlabelled) abnormal minute
    hours: float

    @property
    def rows(self) -> int:
        """Number of windows."""
        return len(self.x)


def window_features(v: F64) -> tuple[F64, I64, B]:
    """Raw gateway features of the trailing ``WINDOW_MIN``-minute windows, present counts, plausible."""
    n = len(v) - WINDOW_MIN + 1
    x = np.full((n, len(INPUTS)), np.nan)
    t = np.arange(len(v), dtype=np.float64) * 60.0
    tw = np.lib.stride_tricks.sliding_window_view(t, WINDOW_MIN)
    counts = np.full(n, WINDOW_MIN)
    checker = PlausibilityChecker()
    plausible = np.ones(n, np.bool_)
    for s, stream in enumerate(_STREAMS):
        vw = np.lib.stride_tricks.sliding_window_view(v[:, s], WINDOW_MIN)
        rows = basic_features_batch(tw, vw, counts)
        valid = np.isfinite(vw).sum(axis=1)
        for i, r in enumerate(rows):
            for j, f in enumerate(FEATURES):
                if f in r:
                    x[i, s * len(FEATURES) + j] = r[f]
            if (
                valid[i]
                and checker.window_violation(StreamFeatures(stream, int(valid[i]), 0.0, r)) is not None
            ):
                plausible[i] = False
    present = np.isfinite(x).sum(axis=1)
    return x, present, plausible


def scenario(name: str, base: F64, events: Sequence[Event]) -> Scenario:
    """Inject ``events`` into ``base`` (minutes x 4) and cut it into labelled windows."""
    v = inject(base, events)
    x, present, plausible = window_features(v)
    n = len(x)
    t = np.arange(len(v), dtype=np.float64)
    env = np.zeros((len(KINDS), len(v)))
    for ev in events:
        env[KINDS.index(ev.kind)] = np.maximum(env[KINDS.index(ev.kind)], ev.envelope(t))
    env_w = np.lib.stride_tricks.sliding_window_view(env, WINDOW_MIN, axis=1).max(axis=2)  # kinds x rows
    peak = env_w.max(axis=0)
    label = np.where(peak >= POS_ENVELOPE, 1, np.where(peak > 0.0, -1, 0)).astype(np.int8)
    kind = np.where(peak > 0.0, env_w.argmax(axis=0), -1).astype(np.int8)
    clin: B = np.asarray(
        np.lib.stride_tricks.sliding_window_view(clinical_minutes(base), WINDOW_MIN).any(axis=1), np.bool_
    )
    return Scenario(name, tuple(events), x, present, plausible, label, kind, clin, n / 60.0)


def build_scenarios(
    base: F64, name: str, replicas: int, seed_tag: int, *, shift_first: bool = True, mild: bool = False
) -> list[Scenario]:
    """``replicas`` shifted copies of one baseline, each with its own seeded events."""
    out = []
    for r in range(replicas):
        rng = np.random.default_rng((SEED, seed_tag, r))
        b = shift_baseline(base, rng) if (r > 0 or shift_first) else base.copy()
        out.append(scenario(f"{name}/r{r}", b, draw_events(b, KINDS, rng, mild=mild)))
    return out


def split(data: Path) -> tuple[list[list[Scenario]], list[Scenario], list[Scenario], list[Scenario]]:
    """Training halves (two lists); held-apart tests: s00001, s25047, s00001 with mild events."""
    rec1, hour1 = load_vitals(data, TRAIN_RECORD)
    rec2, hour2 = load_vitals(data, OTHER_RECORD)
    temp_rng = np.random.default_rng((SEED, 1))
    b1 = np.column_stack([rec1, synthetic_temperature(len(rec1), hour1, temp_rng)])
    b2 = np.column_stack([rec2, synthetic_temperature(len(rec2), hour2, temp_rng)])
    half = TRAIN_MINUTES // 2
    train = [
        build_scenarios(b1[:half], "s00001[0:600)", TRAIN_REPLICAS, 10),
        build_scenarios(b1[half:TRAIN_MINUTES], "s00001[600:1200)", TRAIN_REPLICAS, 11),
    ]
    test1 = build_scenarios(b1[TRAIN_MINUTES:], "s00001[1200:)", TEST_REPLICAS, 20, shift_first=False)
    test2 = build_scenarios(b2, "s25047", TEST_REPLICAS, 21, shift_first=False)
    mild = build_scenarios(b1[TRAIN_MINUTES:], "s00001[1200:) mild", TEST_REPLICAS, 22, mild=True)
    return train, test1, test2, mild


# ---- normalisation, model -----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Norm:
    """Fixed population statistics of the inputs."""

    mean: F64
    std: F64

    def z(self, sc: Scenario) -> tuple[F64, B]:
        """Clipped z-scores (absent inputs at 0, as in the runtime) and which rows the runtime scores."""
        z = (sc.x - self.mean) / self.std
        z[~np.isfinite(z)] = 0.0
        scored = sc.plausible & (2 * sc.present >= len(INPUTS))
        return np.clip(z, -CLIP, CLIP), scored


def population_norm(scenarios: Sequence[Scenario]) -> Norm:
    """Mean and spread of the normal windows of the (shifted) training replicas."""
    rows = np.vstack([sc.x[sc.label == 0] for sc in scenarios])
    mean = np.nanmean(rows, axis=0)
    std = np.maximum(np.nanstd(rows, axis=0), np.maximum(1e-3 * np.abs(mean), 1e-6))
    return Norm(mean, std)


Layers = list[tuple[F64, F64]]


def forward(z: F64, layers: Layers) -> F64:
    """Scores of the network (numpy, float64)."""
    (w0, b0), (w1, b1) = layers
    h = np.maximum(z @ w0 + b0, 0.0)
    return 1.0 / (1.0 + np.exp(-(h @ w1 + b1)[:, 0]))


def training_rows(scenarios: Sequence[Scenario], norm: Norm, drop_kind: int = -1) -> tuple[F64, F64, F64]:
    """Scored, unambiguous rows (without ``drop_kind``'s windows), targets and balanced weights."""
    zs, ys, ks = [], [], []
    for sc in scenarios:
        z, scored = norm.z(sc)
        keep = scored & (sc.label >= 0) & (sc.kind != drop_kind if drop_kind >= 0 else True)
        zs.append(z[keep])
        ys.append(sc.label[keep])
        ks.append(sc.kind[keep])
    z = np.vstack(zs)
    y = np.concatenate(ys).astype(np.float64)
    k = np.concatenate(ks)
    w = np.zeros(len(y))
    neg = y == 0
    w[neg] = 0.5 / max(int(neg.sum()), 1)
    pos_kinds = [c for c in range(len(KINDS)) if ((y == 1) & (k == c)).any()]
    for c in pos_kinds:
        m = (y == 1) & (k == c)
        w[m] = 0.5 / len(pos_kinds) / int(m.sum())  # each kind weighs the same, however long it lasts
    return z, y, w


def train_mlp(z: F64, y: F64, w: F64, seed: int) -> Layers:
    """Weighted cross-entropy + L2, full-batch Adam, fixed initialisation (deterministic)."""
    rng = np.random.default_rng((SEED, seed))
    d = z.shape[1]
    params = [
        rng.standard_normal((d, HIDDEN)) * math.sqrt(2.0 / d),
        np.full(HIDDEN, 0.01),
        rng.standard_normal((HIDDEN, 1)) * math.sqrt(1.0 / HIDDEN),
        np.zeros(1),
    ]
    m = [np.zeros_like(p) for p in params]
    s = [np.zeros_like(p) for p in params]
    for step in range(1, STEPS + 1):
        w0, b0, w1, b1 = params
        a = z @ w0 + b0
        h = np.maximum(a, 0.0)
        p = 1.0 / (1.0 + np.exp(-(h @ w1 + b1)[:, 0]))
        g = ((p - y) * w)[:, None]
        gw1 = h.T @ g + L2 * w1
        gb1 = g.sum(axis=0)
        gh = (g @ w1.T) * (a > 0.0)
        gw0 = z.T @ gh + L2 * w0
        gb0 = gh.sum(axis=0)
        for i, gr in enumerate((gw0, gb0, gw1, gb1)):
            m[i] = 0.9 * m[i] + 0.1 * gr
            s[i] = 0.999 * s[i] + 0.001 * gr * gr
            params[i] = params[i] - LR * (m[i] / (1 - 0.9**step)) / (np.sqrt(s[i] / (1 - 0.999**step)) + 1e-8)
    return [(params[0], params[1]), (params[2], params[3])]


# ---- event-level evaluation ---------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Outcome:
    """Alarm episodes of one scenario at one threshold, matched against its events."""

    detected: tuple[bool, ...]  # per event
    latency_min: tuple[float, ...]  # per detected event: first alarming window end - event start
    false_alarms: int  # episodes touching no event and no real abnormal minute
    clinical_alarms: int  # episodes on unlabelled real abnormal minutes only
    ignored_alarms: int  # episodes on events of an ignored kind
    hours: float


def event_rows(ev: Event, n: int) -> tuple[int, int]:
    """Rows ``[a, b)`` whose window (minutes ``i .. i + WINDOW_MIN - 1``) meets the event span."""
    first_min, last_min = math.ceil(ev.start), math.ceil(ev.end) - 1
    return max(first_min - WINDOW_MIN + 1, 0), min(last_min + 1, n)


def outcome(sc: Scenario, flag: B, ignore_kind: int = -1) -> Outcome:
    """Episodes (runs of alarming windows, as the pipeline raises them) against the events."""
    n = len(flag)
    touched = np.zeros(n, np.bool_)
    ignored = np.zeros(n, np.bool_)
    detected, latency = [], []
    for ev in sc.events:
        a, b = event_rows(ev, n)
        # An alarm within one window length after the event still belongs to it.
        b_late = min(b + WINDOW_MIN, n)
        if KINDS.index(ev.kind) == ignore_kind:
            ignored[a:b_late] = True
            continue
        touched[a:b_late] = True
        hit = np.flatnonzero(flag[a:b])
        detected.append(bool(hit.size))
        if hit.size:
            latency.append(float(a + hit[0] + WINDOW_MIN) - ev.start)
    padded = np.concatenate([[False], flag, [False]])
    edges = np.flatnonzero(padded[1:] != padded[:-1])
    fa = clin = ign = 0
    for s, e in zip(edges[::2], edges[1::2], strict=True):
        if touched[s:e].any():
            continue
        if ignored[s:e].any():
            ign += 1
        elif sc.clinical[s:e].any():
            clin += 1
        else:
            fa += 1
    return Outcome(tuple(detected), tuple(latency), fa, clin, ign, sc.hours)


def summarise(scs: Sequence[Scenario], flags: Sequence[B], ignore_kind: int = -1) -> dict[str, Any]:
    """Event recall (all and per kind), false alarms per patient-hour, median latency."""
    per_kind: dict[str, list[bool]] = {k: [] for k in KINDS}
    lat: dict[str, list[float]] = {k: [] for k in KINDS}
    fa = clin = 0
    hours = 0.0
    for sc, flag in zip(scs, flags, strict=True):
        o = outcome(sc, flag, ignore_kind)
        evs = [ev for ev in sc.events if KINDS.index(ev.kind) != ignore_kind]
        li = iter(o.latency_min)
        for ev, d in zip(evs, o.detected, strict=True):
            per_kind[ev.kind].append(d)
            if d:
                lat[ev.kind].append(next(li))
        fa += o.false_alarms
        clin += o.clinical_alarms
        hours += o.hours
    allhits = [d for v in per_kind.values() for d in v]
    return {
        "events": len(allhits),
        "recall": float(np.mean(allhits)) if allhits else math.nan,
        "false_alarms": fa,
        "false_alarms_per_h": fa / hours,
        "alarms_on_real_abnormal": clin,
        "false_alarms_per_h_raw": (fa + clin) / hours,
        "patient_hours": hours,
        "per_kind": {
            k: {
                "events": len(v),
                "recall": float(np.mean(v)) if v else math.nan,
                "median_latency_min": float(np.median(lat[k])) if lat[k] else math.nan,
            }
            for k, v in per_kind.items()
            if v
        },
    }


def flags_for(scs: Sequence[Scenario], scores: Sequence[F64], norm: Norm, thr: float) -> list[B]:
    """Alarming windows: scored by the runtime and above the threshold."""
    return [norm.z(sc)[1] & (s > thr) for sc, s in zip(scs, scores, strict=True)]


def choose_threshold(
    scs: Sequence[Scenario], scores: Sequence[F64], norm: Norm, ignore_kind: int = -1
) -> float:
    """The lowest threshold (highest recall) whose false alarms per hour stay within the budget."""
    pooled = np.concatenate(scores)
    grid = np.unique(np.concatenate([np.quantile(pooled, np.linspace(0.5, 0.999, 120)), [0.5]]))
    for thr in grid:
        res = summarise(scs, flags_for(scs, scores, norm, float(thr)), ignore_kind)
        if res["false_alarms_per_h_raw"] <= FA_BUDGET_PER_H:
            return float(thr)
    return float(grid[-1])


def fit(
    halves: Sequence[Sequence[Scenario]], drop_kind: int = -1
) -> tuple[Norm, Layers, float, dict[str, Any]]:
    """Population statistics, network and threshold (from out-of-fold scores of the two halves)."""
    every = [sc for h in halves for sc in h]
    norm = population_norm(every)
    oof_scs: list[Scenario] = []
    oof_scores: list[F64] = []
    for k in range(2):
        z, y, w = training_rows(halves[1 - k], norm, drop_kind)
        layers = train_mlp(z, y, w, 100 + k)
        for sc in halves[k]:
            oof_scs.append(sc)
            oof_scores.append(forward(norm.z(sc)[0], layers))
    thr = choose_threshold(oof_scs, oof_scores, norm, drop_kind)
    inner = summarise(oof_scs, flags_for(oof_scs, oof_scores, norm, thr), drop_kind)
    z, y, w = training_rows(every, norm, drop_kind)
    return norm, train_mlp(z, y, w, 200), thr, inner


# ---- the simulated patient through the gateway's own windows -----------------------------


def sim_windows(
    seed: int, seconds: float, events: Sequence[Label] = (), per_hour: float = 0.0
) -> tuple[list[WindowRecord], tuple[Label, ...]]:
    """The simulated patient's streams cut into the gateway's 30 s / 10 s windows by its Windower."""
    gen = PatientGenerator(seed=seed, rate_hz=1.0, events=events, random_events_per_hour=per_hour)
    w = Windower(
        window_s=SIM_WINDOW_S, hop_s=SIM_HOP_S, grace_s=0.0, lost_after_s=120.0, on_alarm=lambda _alarm: None
    )
    streams = {
        sig.metric.name: Stream("sim", f"bed-{seed}", "monitor", sig.metric, "medical", sig.rate_hz)
        for sig in gen.signals
    }
    records: list[WindowRecord] = []
    labels: list[Label] = []
    # Chunks of one minute, closing due windows after each, as the running gateway does.
    for t0 in np.arange(0.0, seconds, 60.0):
        t1 = min(float(t0) + 60.0, seconds)
        chunk = gen.generate(float(t0), t1)
        labels.extend(chunk.labels)
        for name, s in chunk.series.items():
            w.put_block(SampleBlock(streams[name], s.t + 100.0, s.t + 1.7e9, s.value, s.quality))
        records.extend(w.close_due(t1 + 100.0, t1 + 1.7e9))
    return records, tuple(labels)


def sim_check(card_dir: Path, precision: str, threshold: float, hours: float = 6.0) -> dict[str, Any]:
    """Event recall and false alarms per hour of the served model on simulated patients."""
    from gateway.inference.card import CARD_SUFFIX, load_card  # noqa: PLC0415
    from gateway.inference.runner import AnomalyModel  # noqa: PLC0415

    card = load_card(card_dir / f"{NAME}{CARD_SUFFIX}")
    hits: dict[str, list[bool]] = {"desaturation": [], "bradycardia": []}
    false_alarms = 0
    total_h = 0.0
    for seed in (1, 2, 3):
        records, labels = sim_windows(seed, hours * 3600.0, per_hour=3.0)
        model = AnomalyModel(card, card_dir, precision=precision, threshold=threshold)
        res = [r for i in range(0, len(records), 256) for r in model.score_batch(records[i : i + 256])]
        flag = np.array([r.anomaly for r in res])
        ends = np.array([r.end_mono - 100.0 for r in records])
        near = np.zeros(len(records), np.bool_)  # windows touching any labelled event (any kind)
        for lb in labels:
            m = (ends > lb.start_s) & (ends - SIM_WINDOW_S < lb.end_s + SIM_WINDOW_S)
            near |= m
            if lb.kind in hits:
                inside = (ends > lb.start_s) & (ends - SIM_WINDOW_S < lb.end_s)
                hits[lb.kind].append(bool(flag[inside].any()))
        padded = np.concatenate([[False], flag, [False]])
        edges = np.flatnonzero(padded[1:] != padded[:-1])
        false_alarms += sum(1 for s, e in zip(edges[::2], edges[1::2], strict=True) if not near[s:e].any())
        total_h += hours
    return {
        "protocol": f"3 simulated patients x {hours:g} h, 3 random events/h, gateway windows "
        f"{SIM_WINDOW_S:g} s every {SIM_HOP_S:g} s at 1 Hz",
        "per_kind": {
            k: {"events": len(v), "recall": float(np.mean(v)) if v else math.nan} for k, v in hits.items()
        },
        "false_alarms_per_h": false_alarms / total_h,
    }


# ---- export and evaluation ----------------------------------------------------------------


def calibration_rows(scenarios: Sequence[Scenario], norm: Norm) -> F64:
    """Up to 4,096 scored training rows (normal and event) for int8 ranges, fixed seed."""
    z = np.vstack([norm.z(sc)[0][norm.z(sc)[1]] for sc in scenarios])
    rng = np.random.default_rng((SEED, 3))
    return z[rng.choice(len(z), min(4096, len(z)), replace=False)]


def window_f1(scs: Sequence[Scenario], flags: Sequence[B]) -> dict[str, float]:
    """Window-level F1/FAR/MAR over unambiguous windows (unscored windows count as not alarming)."""
    pred = np.concatenate([f[sc.label >= 0] for sc, f in zip(scs, flags, strict=True)])
    truth = np.concatenate([sc.label[sc.label >= 0] == 1 for sc in scs])
    return binary_scores(pred, truth)


def main(argv: list[str] | None = None) -> int:
    """Train, evaluate on held-apart events, export, check on the simulator, write card and report."""
    ap = argparse.ArgumentParser(prog="python -m models.recipes.vitals_mimic", description=__doc__)
    ap.add_argument("--data", type=Path, default=Path("/work/shared/data"))
    ap.add_argument("--out", type=Path, default=MODELS_DIR)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    t_start = time.perf_counter()
    halves, test1, test2, mild = split(args.data)
    train_all = [sc for h in halves for sc in h]
    tests = test1 + test2
    norm, layers, thr, inner = fit(halves)
    log.info("threshold %.4f (out-of-fold: %s)", thr, rounded(inner))
    calib = calibration_rows(train_all, norm)
    fp32, int8 = export_fp32_int8(layers, calib, args.out, NAME, n_inputs=len(INPUTS))
    s32, s8 = session(fp32), session(int8)
    ev: dict[str, Any] = {
        "protocol": "train: s00001 minutes 0-1199 (2 halves x 12 shifted replicas with injected events); "
        "test: s00001 minutes 1200-1935 and s25047 (20 replicas each, events from another seed, replica 0 "
        f"unshifted); windows of {WINDOW_MIN} one-per-minute values every minute; an event is detected when "
        "a window meeting it alarms; a false alarm is an alarm episode touching no event (nor its next "
        f"{WINDOW_MIN} min) and no real abnormal minute",
        "threshold_out_of_fold": inner,
    }
    agree: list[B] = []
    max_abs = 0.0
    for prec, sess in (("fp32", s32), ("int8", s8)):
        scores = [run(sess, norm.z(sc)[0]) for sc in tests]
        flags = flags_for(tests, scores, norm, thr)
        ev[prec] = {
            "all": summarise(tests, flags),
            "s00001_held_apart": summarise(test1, flags[: len(test1)]),
            "s25047_other_patient": summarise(test2, flags[len(test1) :]),
            "unshifted_real_baselines": summarise([test1[0], test2[0]], [flags[0], flags[len(test1)]]),
            "window": window_f1(tests, flags),
        }
        agree.append(np.concatenate(flags))
        mild_scores = [run(sess, norm.z(sc)[0]) for sc in mild]
        ev[prec]["mild_events"] = summarise(mild, flags_for(mild, mild_scores, norm, thr))
        if prec == "fp32":
            ref = np.concatenate(scores)
        else:
            max_abs = float(np.abs(np.concatenate(scores) - ref).max())
    ev["f1_delta_int8_minus_fp32"] = ev["int8"]["window"]["f1"] - ev["fp32"]["window"]["f1"]
    ev["decision_agreement_int8_fp32"] = float(np.mean(agree[0] == agree[1]))
    ev["max_abs_score_diff_int8_fp32"] = max_abs
    ev["model_batch1_latency_us"] = latency_figures(s32, s8, calib[0])
    ev["bytes"] = {"fp32": fp32.stat().st_size, "int8": int8.stat().st_size}
    held_out = np.vstack([norm.z(sc)[0] for sc in tests])
    loko: dict[str, Any] = {}
    for c, kind in enumerate(KINDS):
        n_c, l_c, t_c, _ = fit(halves, drop_kind=c)
        scores = [forward(n_c.z(sc)[0], l_c) for sc in tests]
        res = summarise(tests, flags_for(tests, scores, n_c, t_c))
        loko[kind] = {
            "unseen_kind_recall": res["per_kind"][kind]["recall"],
            "other_kinds_recall": float(
                np.average(
                    [v["recall"] for k, v in res["per_kind"].items() if k != kind],
                    weights=[v["events"] for k, v in res["per_kind"].items() if k != kind],
                )
            ),
            "false_alarms_per_h": res["false_alarms_per_h"],
            "threshold": t_c,
        }
        log.info("leave out %s: %s", kind, rounded(loko[kind]))
    ev["leave_one_kind_out"] = loko
    card: dict[str, Any] = {
        "name": NAME,
        "version": VERSION,
        "task": "adult vital-signs anomaly (desaturation, brady/tachycardia, fever) from window features",
        "subject_kind": "medical",
        "window_s": float(WINDOW_MIN * 60),
        "inputs": [{"metric": m, "feature": f} for m, f in INPUTS],
        "input_name": "z",
        "output_name": "score",
        "output": "probability-like event score in [0, 1] (sigmoid); anomaly when score > threshold",
        "normalisation": {
            "kind": "fixed",
            "mean": norm.mean.tolist(),
            "std": norm.std.tolist(),
            "clip": CLIP,
        },
        "threshold": thr,
        "calibration": f"lowest threshold with at most {FA_BUDGET_PER_H} false alarms per patient-hour on "
        "out-of-fold scores of the two training halves; population z-scores (fixed statistics of the "
        "shifted training baselines), no per-patient commissioning",
        "files": {"fp32": file_entry(fp32), "int8": file_entry(int8)},
        "default_precision": "fp32",
        "tflite_files": {},
        "dense_files": {},
        "backend": "onnxruntime",
        "fallback": {"z": 8.0},
        "health": {
            "latency_budget_us": 1000.0,
            "overruns_to_demote": 3,
            "ood_z": 1000.0,
            "healthy_to_promote": 5,
        },
        "training": {
            "recipe": "python -m models.recipes.vitals_mimic --data <shared data>",
            "seed": SEED,
            "data": "MIMIC numerics (wfdb-python @ 6850ad1a sample-data/multi-segment): s00001 minutes "
            "0-1199 for training; HR (ECG), SpO2, RESP; temperature synthesised (MIMIC has none)",
            "events": "injected: desaturation (nadir 72-88 %, 2-12 min), bradycardia (30-45 /min, 2-10 min), "
            "tachycardia (115-160 /min, 3-20 min), fever (peak 38.3-40.0 Cel, 1.5-5 h)",
            "features": "mean, min, max per vital over the window; std and slope left out because their "
            "scale depends on the sampling rate (1/min numerics vs 1 Hz gateway streams)",
            "window": f"{WINDOW_MIN} min at 1/min in training; the gateway's shorter windows of 1 Hz data "
            "give the same level features (mean/min/max), checked on the simulator",
            "model": f"MLP {len(INPUTS)}-{HIDDEN}-1 (ReLU, sigmoid), class- and kind-balanced cross-entropy, "
            f"L2 {L2}, {STEPS} full-batch Adam steps",
            "quantization": "onnxruntime.quantization static QDQ, per-tensor, MinMax, uint8 act / int8 weights",
            "quantization_tflite": "",
        },
        "evaluation": ev,
    }
    write_card(rounded(card, 6), args.out)
    ev["simulator_30s_windows"] = sim_check(args.out, "fp32", thr)
    log.info("simulator: %s", rounded(ev["simulator_30s_windows"]))
    ev["recipe_seconds"] = time.perf_counter() - t_start
    served = backend_card_fields(fp32, int8, calib, held_out, card)
    for key in ("tflite_files", "dense_files", "backend"):
        card[key] = served[key]
    ev["litert"], ev["backends"] = served["litert"], served["backends"]
    card["training"]["quantization_tflite"] = served["quantization"]
    card = rounded(card, 6)
    write_card(card, args.out)
    (args.out / f"{NAME}.eval.md").write_text(report(card), encoding="utf-8")
    log.info("wrote %s (threshold %.4f) in %.0f s", args.out / NAME, thr, ev["recipe_seconds"])
    return 0


def _row(label: str, r: dict[str, Any]) -> str:
    return (
        f"| {label} | {r['events']} | {r['recall']:.3f} | {r['false_alarms_per_h']:.3f} | "
        f"{r['false_alarms_per_h_raw']:.3f} | {r['patient_hours']:.1f} |"
    )


def report(card: dict[str, Any]) -> str:
    """A short markdown report of the evaluation."""
    ev = card["evaluation"]
    f32, i8 = ev["fp32"], ev["int8"]
    lines = [
        f"# {card['name']} {card['version']}: MIMIC numerics with injected events, held-apart evaluation",
        "",
        "Temperature is synthesised (MIMIC numerics carry none); every event is injected into real",
        "baselines. Test events are other instances (another seed) on baselines held apart in time",
        "(s00001 hours 20-32) or from another patient (s25047). Patient-hours count replicas: 20",
        "copies of each held-apart baseline, each shifted by its own per-vital offset (replica 0",
        "unshifted) with its own events, so 13.4 h of real baseline make 267 patient-hours.",
        "",
        "| test set | events | event recall | false alarms / patient-h | incl. alarms on real abnormal minutes | patient-h |",
        "|---|---|---|---|---|---|",
        _row("all, fp32", f32["all"]),
        _row("all, int8", i8["all"]),
        _row("s00001 held apart, fp32", f32["s00001_held_apart"]),
        _row("s25047 other patient, fp32", f32["s25047_other_patient"]),
        _row("unshifted real baselines only, fp32", f32["unshifted_real_baselines"]),
        _row(
            "s00001 held apart, mild events (at or past the shallow end of training), fp32",
            f32["mild_events"],
        ),
        _row("same, int8", i8["mild_events"]),
        "",
        "| event kind (fp32) | events | recall | median latency (min) | mild: events | mild: recall |",
        "|---|---|---|---|---|---|",
    ]
    for k, v in f32["all"]["per_kind"].items():
        m = f32["mild_events"]["per_kind"].get(k, {"events": 0, "recall": math.nan})
        lines.append(
            f"| {k} | {v['events']} | {v['recall']:.3f} | {v['median_latency_min']:.1f} | "
            f"{m['events']} | {m['recall']:.3f} |"
        )
    lines += [
        "",
        "Leave one kind out (trained without it, threshold chosen without it):",
        "",
        "| kind never seen | its recall | recall on the other kinds | false alarms / patient-h |",
        "|---|---|---|---|",
    ]
    for k, v in ev["leave_one_kind_out"].items():
        lines.append(
            f"| {k} | {v['unseen_kind_recall']:.3f} | {v['other_kinds_recall']:.3f} | {v['false_alarms_per_h']:.3f} |"
        )
    sim = ev["simulator_30s_windows"]
    simk = ", ".join(f"{k} {v['recall']:.2f} of {v['events']}" for k, v in sim["per_kind"].items())
    lines += [
        "",
        (
            f"Window level: fp32 F1 {f32['window']['f1']:.3f}, int8 F1 {i8['window']['f1']:.3f} "
            f"(int8 - fp32 {ev['f1_delta_int8_minus_fp32']:+.4f}); decision agreement "
            f"{ev['decision_agreement_int8_fp32']:.4f}; sizes fp32 {ev['bytes']['fp32']} B, int8 "
            f"{ev['bytes']['int8']} B; batch-1 run() fp32 {ev['model_batch1_latency_us']['fp32']:.1f} us, "
            f"int8 {ev['model_batch1_latency_us']['int8']:.1f} us "
            f"({ev['model_batch1_latency_us']['int8_over_fp32']:.2f}x)."
        ),
        "",
        f"Simulator ({sim['protocol']}): recall {simk}; {sim['false_alarms_per_h']:.2f} false alarms/h.",
        "",
        litert_report(card) + " " + backends_report(card),
        "",
        (
            f"Shipped: trained on s00001 minutes 0-1199 only (the evaluated model), window "
            f"{card['window_s']:.0f} s, threshold {card['threshold']:.4f}, population normalisation, "
            f"default precision {card['default_precision']}."
        ),
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
