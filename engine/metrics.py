"""Detection quality of flags against known label errors."""

from __future__ import annotations

import numpy as np


def detection_metrics(flagged: np.ndarray, score: np.ndarray, is_error: np.ndarray) -> dict[str, float]:
    """Precision, recall, F1 of ``flagged`` and AUROC of ``score`` (higher = more suspicious) for ``is_error``.

    Samples with a NaN score are counted as not flagged and ranked last.
    """
    from sklearn.metrics import roc_auc_score

    f = np.asarray(flagged, dtype=bool)
    e = np.asarray(is_error, dtype=bool)
    tp = int((f & e).sum())
    precision = tp / f.sum() if f.sum() else 0.0
    recall = tp / e.sum() if e.sum() else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    s = np.nan_to_num(np.asarray(score, dtype=np.float64), nan=-1e300, neginf=-1e300, posinf=1e300)
    auroc = float(roc_auc_score(e, s)) if 0 < e.sum() < e.size else float("nan")
    return {"precision": float(precision), "recall": float(recall), "f1": float(f1), "auroc": auroc}
