"""The fused verdict ([[models.fusion]]): one alarm per episode over its members, with both members' inputs."""

from __future__ import annotations

import asyncio
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from drivers import REGISTRY
from gateway.anonymize import Anonymizer, Pseudonymizer
from gateway.config import validate
from gateway.contracts import Lane, ModelResult, WindowRecord
from gateway.errors import ConfigError
from gateway.inference.build import FusionUse, ModelsSection, ModelUse, build_models, default_models_dir
from gateway.inference.fusion import FUSION_SUFFIX, FusionModel, build_fusions, load_fusion
from gateway.inference.novelty import NoveltyModel, NoveltyUse
from gateway.outbox import AsyncOutbox, Outbox
from gateway.records import as_map, decode
from gateway.runtime import Pipeline
from gateway.sample import SampleBlock, Stream, industrial_metric

WALL = 1.7e9
#: [models.novelty] as fusion_skab was chosen with (edgetwin check refuses other settings).
NOVELTY: dict[str, Any] = {
    "window_s": 5.0,
    "ewma": 0.5,
    "var_keep": 0.95,
    "features": ["mean", "std"],
    "spread_only": ["Temperature", "Thermocouple"],
}
FLOW = Stream("plc", "pump-1", "PLC-1", industrial_metric("RateRMS", "l/min"), kind="industrial", rate_hz=1.0)
AMPS = Stream("plc", "pump-1", "PLC-1", industrial_metric("Current", "A"), kind="industrial", rate_hz=1.0)


class Member:
    """A plug-in WindowModel (not our code) on its own window, with scripted scores per window end."""

    subject_kind = "industrial"

    def __init__(
        self, name: str, window_s: float, script: dict[float, float], key: str, normal: float
    ) -> None:
        self.name = name
        self.window_s = window_s
        self.script = script
        self.key = key
        self.normal = normal
        self.explain_all = False
        self.lengths: list[float] = []

    def applies_to(self, record: WindowRecord) -> bool:
        return record.kind == "industrial"

    def score_batch(self, records: Sequence[WindowRecord]) -> Sequence[ModelResult]:
        out = []
        for r in records:
            self.lengths.append(r.length_s)
            s = self.script.get(r.end_mono, self.normal)
            out.append(
                ModelResult(s, False, {self.key: 0.7, "Voltage.mean": 0.3} if self.explain_all else {})
            )
        return out


def write_card(directory: Path, tau: float = 0.0) -> Path:
    card = {
        "name": "duo",
        "version": "1.0.0",
        "subject_kind": "industrial",
        "members": [
            {
                "model": "alpha",
                "transform": "log_odds",
                "threshold": 0.5,
                "weight": 0.5,
                "scale": 1.0,
                "window_s": 6.0,
            },
            {"model": "beta", "transform": "log", "weight": 0.5, "scale": 1.0, "window_s": 2.0},
        ],
        "tau": tau,
        "hop_s": 1.0,
    }
    path = directory / f"duo{FUSION_SUFFIX}"
    path.write_text(json.dumps(card), encoding="utf-8")
    return path


def test_fuse_is_the_weighted_sum_of_member_scores(tmp_path: Path) -> None:
    fusion = FusionModel(load_fusion(write_card(tmp_path)))
    # alpha just over its threshold, beta at its limit: both on the fused scale's positive side.
    r = fusion.fuse(
        {
            "alpha": ModelResult(0.9, True, {"Current.mean": 1.0}),
            "beta": ModelResult(math.e, True, {"RateRMS.mean": 1.0}),
        }
    )
    assert r.score == pytest.approx(0.5 * math.log(9.0) + 0.5 * 1.0)
    assert r.anomaly
    assert set(r.contributions) == {"Current.mean", "RateRMS.mean"}
    # The pump alone over its threshold is outvoted by a detector well inside its limit.
    r = fusion.fuse({"alpha": ModelResult(0.6, True), "beta": ModelResult(0.2, False)})
    assert not r.anomaly
    assert r.verdict == "normal"
    # A member that cannot judge makes the fused verdict indeterminate, with its reason.
    r = fusion.fuse({"alpha": ModelResult(0.9, True), "beta": ModelResult(math.nan, False, reason="gap")})
    assert r.verdict == "indeterminate"
    assert r.reason == "gap"
    r = fusion.fuse(
        {"alpha": ModelResult(7.0, True, fallback=True, reason="demoted"), "beta": ModelResult(5.0, True)}
    )
    assert r.reason == "demoted"


def run(
    tmp_path: Path, members: list[Member], fusions: list[FusionModel], seconds: int
) -> list[dict[str, Any]]:
    config = validate(
        {
            "gateway": {"state_dir": str(tmp_path)},
            "pipeline": {"window_s": 4.0, "hop_s": 1.0, "grace_s": 0.0},
            "models": {
                "ectopy": False,
                "streams": {"enabled": False},
                "raise_after_windows": 2,
                "clear_after_windows": 3,
            },
            "alarms": {"defaults": False},
        },
        "<test>",
        REGISTRY,
    )

    async def main() -> list[dict[str, Any]]:
        anon = Anonymizer(Pseudonymizer(b"f" * 32), time_mode="relative", start_wall=WALL)
        async with AsyncOutbox(lambda: Outbox(tmp_path / "outbox.db")) as outbox:
            pipeline = Pipeline(config, anon, outbox, members, fusions)
            for k in range(seconds):
                t = np.array([100.0 + k])
                for s in (FLOW, AMPS):
                    pipeline.sink.put_block(
                        SampleBlock(s, t, t + WALL, np.array([20.0]), np.zeros(1, np.uint8))
                    )
                await pipeline.step(now_mono=101.0 + k, now_wall=WALL + 101.0 + k)
            await outbox.flush()
            return [as_map(decode(i.payload)) | {"lane": i.lane} for i in await outbox.lease(1000)]

    return asyncio.run(main())


def episode_members() -> list[Member]:
    # One episode: alpha flags 110-118, beta 112-121 (overlapping, as a valve fault shows in both).
    alpha = Member("alpha", 6.0, {float(t): 0.95 for t in range(110, 119)}, "Current.mean", 0.1)
    beta = Member("beta", 2.0, {float(t): 8.0 for t in range(112, 122)}, "RateRMS.std", 0.3)
    return [alpha, beta]


def test_one_fused_alarm_per_episode_with_both_members_inputs(tmp_path: Path) -> None:
    members = episode_members()
    fusions = build_fusions(
        [FusionUse(name="duo")],
        members,
        write_card(tmp_path).parent,
        hop_s=1.0,
        window_s=30.0,
    )
    assert all(m.explain_all for m in members)  # members explain every window for the fusion
    records = run(tmp_path, members, fusions, 40)
    alarms = [r for r in records if r["lane"] == Lane.ALARMS]
    kinds = [(a["alarm"], a["detail"]["model"]) for a in alarms]
    assert kinds == [("anomaly", "duo"), ("anomaly_cleared", "duo")]  # no alarm of alpha or beta
    contrib = alarms[0]["contrib"]
    assert {"Current.mean", "RateRMS.std"} <= set(contrib)  # inputs of both members
    # Each member is scored on its own window; the fused score goes out with the record.
    assert set(members[0].lengths) == {6.0}
    assert set(members[1].lengths) == {2.0}
    windows = [r for r in records if r["lane"] == Lane.FEATURES and "scores" in r]
    assert all({"alpha", "beta", "duo"} <= set(r["scores"]) for r in windows)


def test_without_the_fusion_each_member_alarms_on_its_own(tmp_path: Path) -> None:
    members = episode_members()

    class Flagging(Member):
        def score_batch(self, records: Sequence[WindowRecord]) -> Sequence[ModelResult]:
            return [
                ModelResult(r.score, r.score > (0.5 if self.name == "alpha" else 1.0))
                for r in super().score_batch(records)
            ]

    flagging = [Flagging(m.name, m.window_s, m.script, m.key, m.normal) for m in members]
    alarms = [r for r in run(tmp_path, list(flagging), [], 40) if r["lane"] == Lane.ALARMS]
    assert sorted(a["detail"]["model"] for a in alarms if a["alarm"] == "anomaly") == ["alpha", "beta"]


def test_members_must_be_configured_as_the_fusion_was_chosen(tmp_path: Path) -> None:
    shipped = default_models_dir()
    card = load_fusion(shipped / f"fusion_skab{FUSION_SUFFIX}")
    (pump,) = build_models(ModelsSection(use=[ModelUse(name="pump_skab")]), hop_s=1.0)
    novelty_member = next(m for m in card.members if m.model == "novelty")
    settings = novelty_member.settings
    good = NoveltyUse(
        window_s=novelty_member.window_s,
        ewma=float(settings["ewma"]),  # type: ignore[arg-type]
        var_keep=float(settings["var_keep"]),  # type: ignore[arg-type]
        features=list(settings["features"]),  # type: ignore[arg-type]
        spread_only=list(settings["spread_only"]),  # type: ignore[arg-type]
    )
    (fusion,) = build_fusions(
        [FusionUse(name="fusion_skab")],
        [pump, NoveltyModel(good, hop_s=1.0)],
        shipped,
        hop_s=1.0,
        window_s=30.0,
    )
    assert fusion.member_names == {"pump_skab", "novelty"}
    with pytest.raises(ConfigError, match="ewma"):
        build_fusions(
            [FusionUse(name="fusion_skab")],
            [pump, NoveltyModel(good.model_copy(update={"ewma": 0.2}), hop_s=1.0)],
            shipped,
            hop_s=1.0,
            window_s=30.0,
        )
    with pytest.raises(ConfigError, match="window_s = 5"):
        build_fusions(
            [FusionUse(name="fusion_skab")],
            [pump, NoveltyModel(good.model_copy(update={"window_s": None}), hop_s=1.0)],
            shipped,
            hop_s=1.0,
            window_s=30.0,
        )
    with pytest.raises(ConfigError, match="novelty not configured"):
        build_fusions([FusionUse(name="fusion_skab")], [pump], shipped, hop_s=1.0, window_s=30.0)
    with pytest.raises(ConfigError, match="no card"):
        build_fusions([FusionUse(name="nope")], [pump], shipped, hop_s=1.0, window_s=30.0)


def test_check_reports_a_fusion_whose_member_is_set_otherwise(tmp_path: Path) -> None:
    from gateway.runtime import build_problems  # noqa: PLC0415 - the composition root

    models: dict[str, Any] = {
        "use": [{"name": "pump_skab"}],
        "novelty": dict(NOVELTY),
        "fusion": [{"name": "fusion_skab"}],
    }
    raw: dict[str, Any] = {
        "gateway": {"state_dir": str(tmp_path)},
        "pipeline": {"window_s": 20.0, "hop_s": 1.0},
    }
    assert build_problems(validate(raw | {"models": models}, "<test>", REGISTRY), REGISTRY) == []
    models["novelty"]["var_keep"] = 0.9
    (problem,) = build_problems(validate(raw | {"models": models}, "<test>", REGISTRY), REGISTRY)
    assert "fusion_skab" in problem
    assert "var_keep" in problem


def test_a_site_names_its_own_spread_only_streams_and_a_name_matching_no_input_is_refused(
    tmp_path: Path,
) -> None:
    from gateway.runtime import build_problems  # noqa: PLC0415 - the composition root

    # The PLC simulator's fluid thermocouple is FluidTemperature: the card's spread_only names
    # (SKAB's Temperature, Thermocouple) do not cover it, so a site adds it beside them.
    plc = ["Pump1/Hydraulics/FluidTemperature", "Pump1/Motor/Temperature", "Pump1/Hydraulics/Pressure"]
    models: dict[str, Any] = {
        "use": [{"name": "pump_skab"}],
        "novelty": NOVELTY | {"spread_only": ["Temperature", "Thermocouple", "FluidTemperature"]},
        "fusion": [{"name": "fusion_skab"}],
    }
    raw: dict[str, Any] = {
        "gateway": {"state_dir": str(tmp_path)},
        "pipeline": {"window_s": 20.0, "hop_s": 1.0},
        "sources": [
            {
                "name": "plc",
                "driver": "opcua",
                "subject": "pump-3",
                "kind": "industrial",
                "endpoint": "opc.tcp://127.0.0.1:4840",
                "namespace_uri": "urn:edgetwin:plcsim",
                "nodes": [{"browse_path": p} for p in plc],
            }
        ],
    }

    def problems(novelty: dict[str, Any]) -> list[str]:
        config = validate(raw | {"models": models | {"novelty": novelty}}, "<test>", REGISTRY)
        return build_problems(config, REGISTRY)

    assert problems(models["novelty"]) == []
    # Taken by stream name: the fluid temperature's level is no input, its spread is.
    use = NoveltyUse.model_validate(models["novelty"])
    assert use.features_of("Pump1/Hydraulics/FluidTemperature") == ["std"]
    assert use.features_of("Pump1/Hydraulics/Pressure") == ["mean", "std"]
    # A name that matches none of the configured streams (no inputs listed) is refused, naming it.
    typo = models["novelty"] | {"spread_only": ["Temperature", "Thermocouple", "FluidTemprature"]}
    (problem,) = problems(typo)
    assert "fusion_skab" in problem
    assert "spread_only FluidTemprature: matches no input" in problem
    assert "the streams of the configured sources" in problem
    assert "Pump1/Hydraulics/FluidTemperature" in problem
    # With inputs listed, a name must match one of them (whole or last segments, either way round).
    listed = models["novelty"] | {"inputs": ["Pressure", "Pump1/Hydraulics/FluidTemperature"]}
    assert problems(listed) == []
    (problem,) = problems(listed | {"spread_only": ["Temperature", "Thermocouple", "Flow"]})
    assert "spread_only Flow: matches no input of the detector (its inputs: Pressure, " in problem
    # The card's own names must stay: leaving one out is still a setting the fusion was not chosen with.
    (problem,) = problems(models["novelty"] | {"spread_only": ["Temperature", "FluidTemperature"]})
    assert "spread_only may also name streams of this site" in problem
