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
    """Jaccard overlap |A & B| / |A | B| of the k highest values of each pair of columns.

    Pass columns turned so that higher = more suspicious (``engine.scores.registry.oriented``) to compare the k
    most suspicious samples of each score.

    The top-k sets are indicator columns ``T`` (NaN never in a top set unless fewer than k are finite);
    all intersections at once are ``T' T``, unions ``|A| + |B| - |A & B|``.
    """
    cols = list(scores.columns)
    n = len(scores)
    kk = min(k, n)
    top = np.zeros((n, len(cols)), dtype=np.float32)
    for j, c in enumerate(cols):
        v = scores[c].to_numpy(dtype=np.float64)
        v = np.where(np.isfinite(v), v, -np.inf)
        if kk:
            top[np.argpartition(-v, kk - 1)[:kk], j] = 1.0
    inter = (top.T @ top).astype(np.float64)
    size = np.diag(inter)
    union = size[:, None] + size[None, :] - inter
    m = np.where(union > 0, inter / np.where(union > 0, union, 1), 1.0)
    return pd.DataFrame(m, index=cols, columns=cols)


def ensemble(tables: list[pd.DataFrame], score: str) -> pd.DataFrame:
    """The same score from several runs averaged per sample_id (samples missing from a run are skipped there).

    Returns ``sample_id, <score>, n_runs``; ``rank_and_normalize`` each run first when their scales differ.
    """
    stacked = pd.concat([t[["sample_id", score]] for t in tables], ignore_index=True)
    g = stacked.groupby("sample_id", sort=False)[score]
    return pd.DataFrame({score: g.mean(), "n_runs": g.count()}).reset_index()
