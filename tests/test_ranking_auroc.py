"""ranking_auroc (engine.scores.metrics) equals scikit-learn's roc_auc_score on identical inputs, ties and NaN included."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from engine.scores.metrics import ranking_auroc


@pytest.mark.parametrize("seed", range(5))
def test_equals_sklearn_with_ties(seed):
    rng = np.random.default_rng(seed)
    n = 2_000
    errors = rng.random(n) < 0.15
    score = np.round(rng.normal(errors * 1.0, 1.0), 1)  # rounded: many ties, inside and across the two groups
    assert ranking_auroc(score, errors) == pytest.approx(roc_auc_score(errors, score), abs=1e-12)


def test_nan_ranks_last_and_degenerate_inputs():
    score = np.array([0.9, np.nan, 0.2, 0.8, -np.inf, np.inf])
    errors = np.array([True, True, False, False, False, True])
    # NaN ranks with the least suspicious values (as -inf): the same as sklearn on the filled scores
    assert ranking_auroc(score, errors) == pytest.approx(roc_auc_score(errors, [0.9, -1e300, 0.2, 0.8, -1e300, 1e300]))
    assert np.isnan(ranking_auroc(score, np.ones(6, dtype=bool)))
    assert np.isnan(ranking_auroc(score, np.zeros(6, dtype=bool)))
    assert ranking_auroc([3, 2, 1], [True, False, False]) == 1.0 and ranking_auroc([1, 2, 3], [True, False, False]) == 0.0
