"""Given label vs suggested label: the counts behind the Flagged page's matrix and per-class table.

Pure numpy/pandas over a run's arrays (no Streamlit). The suggested label of a sample is the class its
model predicted most often (the scores table's ``suggested_label``; -1 when it has none).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd


def label_matrix(labels: np.ndarray, suggested: np.ndarray, flagged: np.ndarray, n_classes: int) -> np.ndarray:
    """``m[g, s]`` = number of flagged samples with given label ``g`` and suggested label ``s`` (no suggestion: left out).

    Examples
    --------
    >>> label_matrix(np.array([0, 0, 1]), np.array([1, 1, 1]), np.array([True, True, False]), 2).tolist()
    [[0, 2], [0, 0]]
    """
    g = np.asarray(labels)
    s = np.asarray(suggested)
    keep = np.asarray(flagged, dtype=bool) & (s >= 0) & (g >= 0)
    return np.bincount(g[keep] * n_classes + s[keep], minlength=n_classes * n_classes).reshape(n_classes, n_classes)


def per_class_table(labels: np.ndarray, suggested: np.ndarray, flagged: np.ndarray,
                    classes: Sequence[str]) -> pd.DataFrame:
    """One row per class: count, flagged, estimated noise rate and the class its flagged samples are most confused with.

    ``noise_rate`` = flagged / count, the share of the class the audit suspects (an estimate: it counts
    hard and ambiguous samples too). ``most_confused`` is the suggested label given most often to the
    class's flagged samples other than the class itself (empty when none), ``confused_count`` how often.
    """
    k = len(classes)
    g = np.asarray(labels)
    f = np.asarray(flagged, dtype=bool)
    count = np.bincount(g[g >= 0], minlength=k)
    n_flag = np.bincount(g[f & (g >= 0)], minlength=k)
    m = label_matrix(g, suggested, f, k)
    np.fill_diagonal(m, 0)
    top = m.argmax(axis=1)
    top_n = m[np.arange(k), top]
    names = np.array(list(classes), dtype=object)
    return pd.DataFrame({
        "class": names,
        "count": count,
        "flagged": n_flag,
        "noise_rate": np.divide(n_flag, count, out=np.zeros(k), where=count > 0),
        "most_confused": np.where(top_n > 0, names[top], ""),
        "confused_count": top_n,
    })
