"""How noisy is each class? An estimate of the label noise from an audit's flags and suggested labels.

The estimate is a count matrix in the spirit of cleanlab's confident joint (Northcutt et al. 2021,
``cleanlab.count.compute_confident_joint``): ``joint[i, j]`` counts the scored samples given label
``i`` whose true label is estimated to be ``j``. A sample that is not flagged is taken to be
right (``j = i``); a flagged sample is taken to belong to its suggested label (the class the
model preferred over the given one, the mode of the "largest other logit" over epochs).

We differ from cleanlab on purpose: cleanlab counts a sample in ``joint[i, j]`` when its
out-of-sample ``p(j)`` clears class ``j``'s average self-confidence and then calibrates the
matrix to the class counts; here the flags of the run's review policy decide (so the estimate
agrees with what the user sees flagged), and no calibration is applied. Both are estimates of
``P(given = i, true = j) * N``.
"""

from __future__ import annotations

import numpy as np


def estimated_joint(labels: np.ndarray, flagged: np.ndarray, suggested: np.ndarray, n_classes: int,
                    scored: np.ndarray | None = None) -> np.ndarray:
    """``(c, c)`` counts: ``joint[i, j]`` = scored samples given ``i`` estimated truly ``j``.

    ``joint[i, i]`` holds the unflagged samples of ``i`` and the flagged ones without a suggested
    label (``suggested < 0``); ``joint[i, j]``, ``j != i``, the flagged ones suggested ``j``.
    """
    y = np.asarray(labels, dtype=np.int64)
    ok = np.ones(len(y), dtype=bool) if scored is None else np.asarray(scored, dtype=bool)
    ok &= (y >= 0) & (y < n_classes)
    sug = np.asarray(suggested, dtype=np.int64)
    est = np.where(np.asarray(flagged, dtype=bool) & (sug >= 0) & (sug < n_classes), sug, y)
    joint = np.zeros((n_classes, n_classes), dtype=np.int64)
    np.add.at(joint, (y[ok], est[ok]), 1)
    return joint


def true_joint(labels: np.ndarray, true_labels: np.ndarray, n_classes: int,
               scored: np.ndarray | None = None) -> np.ndarray:
    """``(c, c)`` counts of samples given ``i`` whose known true label is ``j`` (injected noise)."""
    y = np.asarray(labels, dtype=np.int64)
    t = np.asarray(true_labels, dtype=np.int64)
    ok = np.ones(len(y), dtype=bool) if scored is None else np.asarray(scored, dtype=bool)
    ok &= (y >= 0) & (y < n_classes) & (t >= 0) & (t < n_classes)
    joint = np.zeros((n_classes, n_classes), dtype=np.int64)
    np.add.at(joint, (y[ok], t[ok]), 1)
    return joint


def noise_rates(joint: np.ndarray) -> np.ndarray:
    """Per given label ``i``: the fraction of its samples whose true label differs, ``1 - joint[i, i] / sum_j joint[i, j]``
    (NaN for a class without samples)."""
    n = joint.sum(axis=1).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(n > 0, 1.0 - np.diag(joint) / n, np.nan)


def most_likely_true(joint: np.ndarray) -> np.ndarray:
    """Per given label, the other class its wrong labels most often belong to; -1 when it has none."""
    off = joint.copy()
    np.fill_diagonal(off, 0)
    out = off.argmax(axis=1)
    out[off.sum(axis=1) == 0] = -1
    return out


def noise_estimate(labels: np.ndarray, flagged: np.ndarray, suggested: np.ndarray, classes: list[str],
                   scored: np.ndarray | None = None, true_labels: np.ndarray | None = None) -> dict:
    """The ``noise_estimate`` of ``summary.json``: the estimated joint, per-class noise rate and most likely
    true class and, when the true labels are known, the same from the truth and the estimate's errors.

    Errors: ``mae_noise_rate`` = mean over classes of |estimated - true noise rate|;
    ``joint_tv_error`` = total variation distance between the estimated and the true joint, both
    normalised to sum to 1 (0 = identical, 1 = disjoint); ``true_class_accuracy`` = fraction of the
    classes with wrong labels whose most likely true class is the truth's most common one.
    """
    c = len(classes)
    joint = estimated_joint(labels, flagged, suggested, c, scored)
    rates, likely = noise_rates(joint), most_likely_true(joint)
    n = joint.sum(axis=1)
    rows = [
        {"class": classes[i], "n": int(n[i]), "estimated_wrong": int(n[i] - joint[i, i]),
         "noise_rate": None if not np.isfinite(rates[i]) else float(rates[i]),
         "most_likely_true": classes[likely[i]] if likely[i] >= 0 else None}
        for i in range(c)
    ]
    out: dict = {
        "method": "flags of the review policy, suggested label as the true class (cleanlab-style joint, uncalibrated)",
        "classes": list(classes),
        "joint": joint.tolist(),
        "per_class": rows,
        "noise_rate": float(1.0 - np.trace(joint) / joint.sum()) if joint.sum() else None,
    }
    if true_labels is None:
        return out
    truth = true_joint(labels, true_labels, c, scored)
    t_rates, t_likely = noise_rates(truth), most_likely_true(truth)
    for i, row in enumerate(rows):
        row["true_noise_rate"] = None if not np.isfinite(t_rates[i]) else float(t_rates[i])
        row["true_most_likely"] = classes[t_likely[i]] if t_likely[i] >= 0 else None
    both = np.isfinite(rates) & np.isfinite(t_rates)
    noisy = t_likely >= 0
    out["true_joint"] = truth.tolist()
    out["true_noise_rate"] = float(1.0 - np.trace(truth) / truth.sum()) if truth.sum() else None
    out["mae_noise_rate"] = float(np.abs(rates[both] - t_rates[both]).mean()) if both.any() else None
    if joint.sum() and truth.sum():
        out["joint_tv_error"] = float(0.5 * np.abs(joint / joint.sum() - truth / truth.sum()).sum())
    out["true_class_accuracy"] = float((likely[noisy] == t_likely[noisy]).mean()) if noisy.any() else None
    return out


def transition_matrix(confusion: np.ndarray) -> np.ndarray:
    """Noise transition matrix ``T[j, i] = P(given label i | true class j)`` for forward correction.

    ``confusion[i, j]`` counts samples given label ``i`` that a network trained on the given labels
    predicts as ``j``; the prediction stands in for the true class, so ``T[j, i] = confusion[i, j] /
    sum_i' confusion[i', j]``. A class never predicted keeps the identity row (no noise assumed).
    Patrini et al. 2017 ("Making deep neural networks robust to label noise: a loss correction
    approach") train on ``softmax(z) @ T`` and estimate ``T`` from the same noisy-trained network at
    anchor points (its most confident sample per class); we differ on purpose: the confusion of the
    given labels with the network's early predictions (before it memorises) uses every sample, and
    needs no separate estimation run.
    """
    counts = np.asarray(confusion, dtype=np.float64)
    k = counts.shape[0]
    t = np.eye(k)
    col = counts.sum(axis=0)
    seen = col > 0
    t[seen] = (counts[:, seen] / col[seen]).T
    return t
