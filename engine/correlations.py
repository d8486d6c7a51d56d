"""Agreement between difficulty scores: rank correlations, top-k overlap, rank normalisation, ensembles."""

from __future__ import annotations

import numpy as np
import pandas as pd

METHODS = ("spearman", "kendall", "pearson")
KENDALL_MAX = 50_000  # Kendall's tau on more rows is slow in pandas; a seeded subsample is used above this


def rank_and_normalize(scores: pd.Series) -> pd.Series:
    """aucurriculum's rank_and_normalize: ``rank(method="first")`` then min-max scaled to [0, 1]."""
    r = scores.rank(method="first")
    lo, hi = r.min(), r.max()
    return (r - lo) / (hi - lo) if hi > lo else r * 0.0


def correlation_matrix(scores: pd.DataFrame, method: str = "spearman", seed: int = 0) -> tuple[pd.DataFrame, int]:
    """Pairwise correlation of the columns over rows where all are finite; returns (matrix, rows used)."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    data = scores.replace([np.inf, -np.inf], np.nan).dropna()
    if method == "kendall" and len(data) > KENDALL_MAX:
        data = data.sample(KENDALL_MAX, random_state=seed)
    return data.corr(method=method), len(data)


def topk_jaccard(scores: pd.DataFrame, k: int) -> pd.DataFrame:
    """Jaccard overlap |A & B| / |A | B| of the k highest-scoring (hardest) samples of each pair of scores."""
    tops = {}
    for c in scores.columns:
        v = scores[c].to_numpy(dtype=np.float64)
        v = np.where(np.isfinite(v), v, -np.inf)
        kk = min(k, len(v))
        tops[c] = set(np.argpartition(-v, kk - 1)[:kk].tolist()) if kk else set()
    cols = list(scores.columns)
    m = np.ones((len(cols), len(cols)))
    for i, a in enumerate(cols):
        for j, b in enumerate(cols[:i]):
            union = len(tops[a] | tops[b])
            m[i, j] = m[j, i] = len(tops[a] & tops[b]) / union if union else 1.0
    return pd.DataFrame(m, index=cols, columns=cols)


def ensemble(tables: list[pd.DataFrame], score: str) -> pd.DataFrame:
    """The same score from several runs averaged per sample_id (samples missing from a run are skipped there).

    Returns ``sample_id, <score>, n_runs``; ``rank_and_normalize`` each run first when their scales differ.
    """
    stacked = pd.concat([t[["sample_id", score]] for t in tables], ignore_index=True)
    g = stacked.groupby("sample_id", sort=False)[score]
    return pd.DataFrame({score: g.mean(), "n_runs": g.count()}).reset_index()
