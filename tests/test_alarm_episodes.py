"""Anomaly episodes from three-valued verdicts: table-driven, then through the composed pipeline."""

from __future__ import annotations

import asyncio
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from drivers import REGISTRY
from gateway.alarms.episodes import EpisodeTracker
from gateway.anonymize import Anonymizer, Pseudonymizer
from gateway.config import validate
from gateway.contracts import Lane, ModelResult, WindowRecord
from gateway.outbox import AsyncOutbox, Outbox
from gateway.records import as_map, decode
from gateway.runtime import Pipeline
from gateway.sample import MDC, SampleBlock, Stream

A = ModelResult(9.0, True, {"x.mean": 1.0})
N = ModelResult(0.1, False)


def ind(reason: str) -> ModelResult:
    return ModelResult(math.nan, False, reason=reason)


FALLBACK_A = ModelResult(7.0, True, {"x.mean": 1.0}, fallback=True, reason="demoted")
FALLBACK_N = ModelResult(1.0, False, fallback=True, reason="demoted")

# (name, verdicts, the alarms they raise as (kind, detail subset)), with clear_after = 2.
CASES: list[tuple[str, list[ModelResult], list[tuple[str, dict[str, Any]]]]] = [
    (
        "anomaly -> gap -> normal",
        [A, A, ind("gap"), ind("gap"), N, N],
        [("anomaly", {}), ("anomaly_indeterminate", {"reason": "gap"}), ("anomaly_cleared", {})],
    ),
    (
        "anomaly -> implausible -> anomaly",
        [A, ind("implausible_input"), A, A],
        [
            ("anomaly", {}),
            ("anomaly_indeterminate", {"reason": "implausible_input"}),
            ("anomaly", {"episode": "resumed"}),
        ],
    ),
    (
        "commissioning is silent, then an episode",
        [ind("commissioning"), ind("commissioning"), N, A, N, N],
        [("anomaly", {}), ("anomaly_cleared", {})],
    ),
    (
        "demotion mid-episode: the fallback's normal never clears",
        [A, FALLBACK_N, FALLBACK_N, FALLBACK_A, N, N],
        [
            ("anomaly", {}),
            ("anomaly_indeterminate", {"reason": "demoted"}),
            ("anomaly", {"episode": "resumed"}),
            ("anomaly_cleared", {}),
        ],
    ),
    (
        "hysteresis: one normal window does not clear",
        [A, N, A, N, N],
        [("anomaly", {}), ("anomaly_cleared", {})],
    ),
    (
        "an indeterminate window restarts the normal run",
        [A, N, ind("gap"), N, N],
        [("anomaly", {}), ("anomaly_indeterminate", {"reason": "gap"}), ("anomaly_cleared", {})],
    ),
    ("indeterminate outside an episode says nothing", [ind("gap"), N, ind("missing_inputs"), N], []),
]


@pytest.mark.parametrize(("name", "verdicts", "expected"), CASES, ids=[c[0] for c in CASES])
def test_episode_state_machine(
    name: str, verdicts: list[ModelResult], expected: list[tuple[str, dict[str, Any]]]
) -> None:
    tracker = EpisodeTracker(clear_after=2)
    got = [e for v in verdicts if (e := tracker.update(("bed", "m"), v)) is not None]
    assert [(e.kind.value, e.detail) for e in got] == [
        (kind, {**detail, **({"normal_windows": 2} if kind == "anomaly_cleared" else {})})
        for kind, detail in expected
    ], name


# ---- through the pipeline: the exact records that leave ---------------------------------------

SUBJECT = "MRN-31"
SPO2 = Stream("ox", SUBJECT, "OX-1", MDC["MDC_PULS_OXIM_SAT_O2"], rate_hz=1.0)


class Scripted:
    """A WindowModel whose verdicts are given in advance, one per window (a plug-in, not our code)."""

    name = "scripted"

    def __init__(self, verdicts: Sequence[ModelResult]) -> None:
        self.verdicts = list(verdicts)

    def applies_to(self, record: WindowRecord) -> bool:
        return True

    def score_batch(self, records: Sequence[WindowRecord]) -> Sequence[ModelResult]:
        return [self.verdicts.pop(0) for _ in records]


def run_pipeline(tmp: Path, verdicts: list[ModelResult]) -> list[dict[str, Any]]:
    config = validate(
        {
            "gateway": {"state_dir": str(tmp)},
            "pipeline": {"window_s": 1.0, "hop_s": 1.0, "grace_s": 0.0},
            "models": {"clear_after_windows": 2, "ectopy": False},
            "alarms": {"defaults": False},
        },
        "<test>",
        REGISTRY,
    )
    model = Scripted(verdicts)

    async def main() -> list[dict[str, Any]]:
        anon = Anonymizer(Pseudonymizer(b"e" * 32), time_mode="relative", start_wall=1.7e9)
        async with AsyncOutbox(lambda: Outbox(tmp / "outbox.db")) as outbox:
            pipeline = Pipeline(config, anon, outbox, models=[model])
            for k in range(len(verdicts)):
                t = np.array([100.0 + k])
                pipeline.sink.put_block(
                    SampleBlock(SPO2, t, t + 1.7e9, np.array([97.0]), np.zeros(1, np.uint8))
                )
                await pipeline.step(now_mono=101.0 + k, now_wall=1.7e9 + 101.0 + k)
            await outbox.flush()
            return [as_map(decode(i.payload)) for i in await outbox.lease(100) if i.lane == Lane.ALARMS]

    return asyncio.run(main())


def test_pipeline_sends_indeterminate_never_cleared_while_the_probe_is_off(tmp_path: Path) -> None:
    alarms = run_pipeline(tmp_path, [A, A, ind("gap"), ind("gap"), N, N])
    assert [a["alarm"] for a in alarms] == ["anomaly", "anomaly_indeterminate", "anomaly_cleared"]
    first, unsure, cleared = alarms
    assert first["detail"] == {"model": "scripted", "score": 9.0}
    assert first["contrib"] == {"x.mean": 1.0}
    assert (first["class"], first["priority"]) == ("physiological", "medium")
    assert unsure["detail"] == {"model": "scripted", "reason": "gap"}
    assert (unsure["class"], unsure["priority"]) == ("physiological", "low")
    assert cleared["detail"] == {"model": "scripted", "score": 0.1, "normal_windows": 2}
    # Raised on the second anomalous window (condition delay), held from the first one on.
    assert (first["held_s"], unsure["held_s"], cleared["held_s"]) == (1.0, 2.0, 5.0)
    assert "priority" not in cleared
    # The windows the model could not score carry no score, not a NaN.
    assert SUBJECT not in repr(alarms)


def test_alarm_condition_delay_needs_anomalous_windows_in_a_row() -> None:
    tracker = EpisodeTracker(clear_after=2, raise_after=2)
    verdicts = [A, N, A, ind("gap"), A, A, A, N, N]
    got = [
        (i, e.kind.value)
        for i, v in enumerate(verdicts)
        if (e := tracker.update(("pump", "m"), v)) is not None
    ]
    assert got == [(5, "anomaly"), (8, "anomaly_cleared")]  # single anomalous windows page nobody
