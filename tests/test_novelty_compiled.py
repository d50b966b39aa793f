"""The novelty detector's T² and SPE of a window in one compiled call (gateway/_window.c, pca_row).

Against the numpy path (score_rows) within NOVELTY_TOLERANCE, relative, on rows near, at and far
beyond the limits, with lags and both smoothings, subspaces of one to all-but-one direction and a
loading matrix of any strides; the same verdicts; where the residual CUSUM is on, numpy scores.
"""

from __future__ import annotations

import numpy as np
import pytest

from gateway.compiled import compiled
from gateway.inference import novelty
from gateway.inference.novelty import NOVELTY_TOLERANCE, PcaSpec, fit_pca, prepare, score_row, score_rows
from models.recipes.novelty_tep import machine_rows


@pytest.mark.parametrize(
    "spec",
    [
        PcaSpec(ewma=0.2, var_keep=0.95),
        PcaSpec(lags=2, ewma=0.5, ewma_slow=0.1, var_keep=0.99),
        PcaSpec(var_keep=0.3),
    ],
)
def test_compiled_scores_equal_numpy_s_within_the_tolerance_and_verdicts_agree(spec: PcaSpec) -> None:
    pca_row = compiled("pca_row")
    assert pca_row is not None, "gateway/_window.c is not built here: bash .ci/setup test"
    rng = np.random.default_rng(3)
    fit = fit_pca(machine_rows(600, rng), spec)
    rows = prepare(machine_rows(400, rng), fit.mean, fit.std, spec)
    rows[::5] *= rng.uniform(0.5, 30.0, (len(rows[::5]), 1))  # some rows far beyond the limits
    got = np.array([score_row(fit, rows[i : i + 1]) for i in range(len(rows))])
    want = score_rows(fit, rows)[0]
    np.testing.assert_allclose(got, want, rtol=NOVELTY_TOLERANCE, atol=0.0)
    assert ((got > 1.0) == (want > 1.0)).all()
    assert 0 < int((want > 1.0).sum()) < len(want)
    # T² and SPE alone, on a C-ordered copy of the loading matrix too.
    t2, spe, _ = novelty._stats(rows, fit.center, fit.load, fit.eig)
    for i in range(0, len(rows), 7):
        for load in (fit.load, np.ascontiguousarray(fit.load)):
            a, b = pca_row(rows[i], fit.center, load, fit.eig)
            assert a == pytest.approx(t2[i], rel=NOVELTY_TOLERANCE)
            assert b == pytest.approx(spe[i], rel=NOVELTY_TOLERANCE)


def test_other_layouts_are_declined_and_the_cusum_scores_in_numpy() -> None:
    pca_row = compiled("pca_row")
    assert pca_row is not None, "gateway/_window.c is not built here: bash .ci/setup test"
    rng = np.random.default_rng(4)
    fit = fit_pca(machine_rows(600, rng), PcaSpec(cusum_k=0.5))
    row = prepare(machine_rows(1, rng), fit.mean, fit.std, fit.spec)
    assert pca_row(row.astype(np.float32), fit.center, fit.load, fit.eig) is None
    assert pca_row(row[:, :-1], fit.center, fit.load, fit.eig) is None
    assert pca_row(np.vstack([row, row]), fit.center, fit.load, fit.eig) is None
    assert pca_row(row, fit.center, fit.load[:, :0], fit.eig[:0]) is None
    # With the CUSUM on, the score continues its sums: numpy's path, the sums stepped once.
    sums, copy = novelty.CusumSums.zeros(row.shape[1]), novelty.CusumSums.zeros(row.shape[1])
    assert score_row(fit, row, sums) == float(score_rows(fit, row, copy)[0][0])
    assert sums.up.tolist() == copy.up.tolist()
    assert sums.up.any()
