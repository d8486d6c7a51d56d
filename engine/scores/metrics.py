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
    """AUROC of ``score`` (higher = more suspicious) for ``is_error``; NaN scores rank last."""
    from sklearn.metrics import roc_auc_score

    e = np.asarray(is_error, dtype=bool)
    s = np.nan_to_num(np.asarray(score, dtype=np.float64), nan=-1e300, neginf=-1e300, posinf=1e300)
    return float(roc_auc_score(e, s)) if 0 < e.sum() < e.size else float("nan")


def detection_metrics(flagged: np.ndarray, score: np.ndarray, is_error: np.ndarray) -> dict[str, float]:
    """``flag_metrics`` of the flags and ``ranking_auroc`` of the score, in one dict."""
    return flag_metrics(flagged, is_error) | {"auroc": ranking_auroc(score, is_error)}
