"""The noise a fused rate learns of each source survives a gateway restart; damaged state is relearnt."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
from durability import landed, synced_during

from gateway.contracts import Estimate
from gateway.estimation import Estimation, EstimatorsSection
from gateway.estimation.fusion import FusedRate
from gateway.estimation.stage import STATE_FILE
from gateway.sample import MDC, Stream

SUBJECT = "MRN-5150"
STRAP = Stream("strap", SUBJECT, "C0:FF:EE:00:51:50", MDC["MDC_ECG_HEART_RATE"], rate_hz=1.0)
OXI = Stream("oxi", SUBJECT, "SN-OX-51500", MDC["MDC_PULS_OXIM_PULS_RATE"], rate_hz=1.0)
OXI_LABEL = "MDC_PULS_OXIM_PULS_RATE"
WALL = 1.7e9
SECTION = EstimatorsSection.model_validate(
    {
        "fusion": [
            {
                "subject": SUBJECT,
                "sources": [{"metric": "MDC_ECG_HEART_RATE"}, {"metric": OXI_LABEL, "noise": 9.0}],
                "every_s": 1.0,
            }
        ]
    }
)


def _stage(state_dir: Path, now: float, out: list[Estimate]) -> tuple[Estimation, FusedRate]:
    stage = Estimation(
        SECTION,
        {SUBJECT: "medical"},
        out.append,
        lambda a: None,
        state_dir,
        now_mono=now,
        now_wall=WALL + now,
    )
    fused = stage.estimators[0]
    assert isinstance(fused, FusedRate)
    return stage, fused


def _learn(stage: Estimation, t0: float, seconds: int, rng: np.random.Generator) -> None:
    # The oximeter is three times noisier (SD 9 /min) than configured (SD 3): the filter finds out.
    from gateway.sample import Sample  # noqa: PLC0415

    for k in range(seconds):
        t = t0 + k
        stage.put(Sample(STRAP, t, WALL + t, 72.0 + rng.normal(0.0, 1.0)))
        stage.put(Sample(OXI, t + 0.5, WALL + t + 0.5, 72.0 + rng.normal(0.0, 9.0)))


def _oximeter_only(stage: Estimation, t0: float, rng: np.random.Generator) -> list[float]:
    from gateway.sample import Sample  # noqa: PLC0415

    out = []
    for k in range(20):
        stage.put(Sample(OXI, t0 + k, WALL + t0 + k, 72.0 + rng.normal(0.0, 9.0)))
        out.append(stage.estimators[0].filter.estimate(t0 + k).sd)
    return out


def test_learnt_source_noise_survives_a_restart_even_after_the_estimate_expired(tmp_path: Path) -> None:
    rng = np.random.default_rng(11)
    stage, fused = _stage(tmp_path, 0.0, [])
    _learn(stage, 0.0, 400, rng)
    learnt = fused.filter.noise[OXI_LABEL]
    assert learnt > 4.0 * 9.0  # found out: near 81, far above the configured 9
    assert fused.filter.noise["MDC_ECG_HEART_RATE"] < 4.0
    landed(stage.save(400.0, WALL + 400.0))
    saved = json.loads((tmp_path / STATE_FILE).read_text(encoding="utf-8"))
    assert saved["v"] == 1
    # An hour later: the estimate is far too old to resume, the oximeter's noise is not.
    later = 4000.0
    restarted, again = _stage(tmp_path, later, [])
    assert again.filter.noise[OXI_LABEL] == pytest.approx(learnt)
    assert again.filter.estimate(later) is None
    # With only the oximeter left, the restarted gateway states the wider interval at once; a
    # gateway that forgot would claim the configured noise until it relearnt it.
    fresh, _ = _stage(tmp_path / "none", later, [])
    rng_a, rng_b = np.random.default_rng(5), np.random.default_rng(5)
    kept, forgot = _oximeter_only(restarted, later, rng_a), _oximeter_only(fresh, later, rng_b)
    assert kept[0] == pytest.approx(np.sqrt(learnt))  # the first measurement, at its known noise
    assert forgot[0] == pytest.approx(3.0)  # the configured SD 3: three times too narrow
    assert np.mean(kept[:5]) > 1.5 * np.mean(forgot[:5])


@pytest.mark.parametrize(
    "damage",
    [
        "{not json",
        json.dumps({"v": 2, "t_wall": WALL, "estimators": {}}),
        json.dumps(
            {"v": 1, "t_wall": WALL, "estimators": {f"fusion/{SUBJECT}/hr": {"noise": {OXI_LABEL: -3}}}}
        ),
        json.dumps({"v": 1, "t_wall": WALL, "estimators": {f"fusion/{SUBJECT}/hr": {"noise": [1, 2]}}}),
    ],
    ids=["corrupt", "other-version", "out-of-range", "not-a-table"],
)
def test_damaged_state_is_relearnt_with_a_log_line(
    tmp_path: Path, damage: str, caplog: pytest.LogCaptureFixture
) -> None:
    (tmp_path / STATE_FILE).write_text(damage, encoding="utf-8")
    with caplog.at_level(logging.WARNING, logger="gateway.estimation"):
        stage, fused = _stage(tmp_path, 0.0, [])
    assert fused.filter.noise[OXI_LABEL] == 9.0  # the configured noise, to relearn from
    assert "relearn" in caplog.text
    assert SUBJECT not in caplog.text
    # Relearning works from there, and the next save replaces the damaged file.
    _learn(stage, 0.0, 300, np.random.default_rng(2))
    assert fused.filter.noise[OXI_LABEL] > 36.0
    landed(stage.save(300.0, WALL + 300.0))
    assert json.loads((tmp_path / STATE_FILE).read_text(encoding="utf-8"))["v"] == 1


def test_the_saved_state_is_on_disk_before_it_replaces_the_last_one_and_private(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A power cut right after a save must leave the old state or the new one, never an empty file:
    # the new data is synced before its rename, and the rename (the directory) after it.  The file
    # names subjects (its keys), so it is the owner's only.
    stage, _ = _stage(tmp_path, 0.0, [])
    synced = synced_during(monkeypatch, lambda: landed(stage.save(10.0, WALL + 10.0)))
    assert [p.name for p in synced] == [f".{STATE_FILE}.tmp", tmp_path.name]
    assert (tmp_path / STATE_FILE).stat().st_mode & 0o777 == 0o600
    assert json.loads((tmp_path / STATE_FILE).read_text(encoding="utf-8"))["v"] == 1
