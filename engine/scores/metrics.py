"""Detection quality of flags against known label errors."""

from __future__ import annotations

import numpy as np


def flag_metrics(flagged: np.ndarray, is_error: np.ndarray) -> dict[str, float]:
    """Precision = TP / flagged, recall = TP / errors, F1 = their harmonic mean (0 when undefined)."""
    f = np.asarray(flagged, dtype=bool)
    e = np.asarray(is_error, dtype=bool)
    tp = int((f & e).sum())
    precision = tp / f.sum() if f.sum() else 0.0
    recall = tp / e.sum() if e.sum() else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"precision": float(precision), "recall": float(recall), "f1": float(f1)}


def ranking_auroc(score: np.ndarray, is_error: np.ndarray) -> float:
    """AUROC of ``score`` (higher = more suspicious) for ``is_error``; NaN scores rank last.

    The Mann-Whitney form: AUROC = (R_err - n_err (n_err + 1) / 2) / (n_err n_ok), where R_err is the sum of the
    errors' ranks in ascending order of score and tied scores share their average rank (Hanley & McNeil 1982).
    Equal to ``sklearn.metrics.roc_auc_score(is_error, score)``, ties included (parity test), in one sort and
    without importing scikit-learn (the AUM page computes it for a million samples). NaN when ``is_error`` is
    all true or all false.
    """
    e = np.asarray(is_error, dtype=bool)
    s = np.asarray(score, dtype=np.float64)
    s = np.where(np.isnan(s), -np.inf, s)  # NaN ranks with -inf, below every value
    n, n_err = e.size, int(e.sum())
    if not 0 < n_err < n:
        return float("nan")
    order = np.argsort(s, kind="stable")
    ordered = s[order]
    starts = np.r_[0, np.flatnonzero(ordered[1:] != ordered[:-1]) + 1]  # first position of each run of ties
    ends = np.r_[starts[1:], n]
    rank = np.empty(n, dtype=np.float64)
    rank[order] = np.repeat((starts + ends + 1) / 2.0, ends - starts)  # 1-based average rank of each tie group
    return float((rank[e].sum() - n_err * (n_err + 1) / 2.0) / (n_err * (n - n_err)))


def detection_metrics(flagged: np.ndarray, score: np.ndarray, is_error: np.ndarray) -> dict[str, float]:
    """``flag_metrics`` of the flags and ``ranking_auroc`` of the score, in one dict."""
    return flag_metrics(flagged, is_error) | {"auroc": ranking_auroc(score, is_error)}
