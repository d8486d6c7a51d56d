"""The score registry and the per-sample scores table of a run.

Every score column is oriented so that **higher = harder / more suspicious**. The registry
records, for each, the paper it comes from and its natural orientation before flipping (for
example AUM is low for mislabeled samples, so the ``aum`` column holds ``-AUM``).

Scores of a sample are computed only from the training passes in which it kept its given
label (a threshold sample's margins in its own pass refer to the fake class).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from . import dynamics as dyn
from .runs import Run, trained_rows


@dataclass(frozen=True)
class ScoreSpec:
    name: str
    title: str
    paper: str
    natural_orientation: str  # what a high raw value meant before flipping
    flipped: bool  # True when the column holds the negated / complemented raw value
    cost: str  # "free" (from captured dynamics) or "extra" (needs more compute)


REGISTRY: dict[str, ScoreSpec] = {
    s.name: s
    for s in [
        ScoreSpec("aum", "Area Under the Margin (Pleiss)", "Pleiss et al. 2020", "high = clean", True, "free"),
        ScoreSpec("aum_yang", "Area Under the Margin (Yang variant)", "Pleiss et al. 2020; peerannot", "high = clean", True, "free"),
        ScoreSpec("confidence", "1 - cartography confidence", "Swayamdipta et al. 2020", "high = easy", True, "free"),
        ScoreSpec("variability", "cartography variability", "Swayamdipta et al. 2020", "high = ambiguous", False, "free"),
        ScoreSpec("cumulative_accuracy", "1 - fraction of epochs predicted right", "aucurriculum", "high = easy", True, "free"),
        ScoreSpec("first_iteration", "(T - trailing correct streak) / T", "aucurriculum", "high = hard", False, "free"),
        ScoreSpec("forgetting", "forgetting events", "Toneva et al. 2019", "high = hard", False, "free"),
        ScoreSpec("el2n", "EL2N ||softmax - onehot|| at an early epoch", "Paul et al. 2021", "high = hard", False, "free"),
        ScoreSpec("ce_loss", "cross-entropy at the last epoch", "aucurriculum CELoss", "high = hard", False, "free"),
        ScoreSpec("ood_density", "-log feature density (DDU)", "Mukhoti et al. 2021", "high = in-distribution",
                  True, "free"),
        ScoreSpec("entropy", "softmax entropy of the final model", "Mukhoti et al. 2021", "high = ambiguous", False,
                  "free"),
        ScoreSpec("sat_disagreement", "1 - self-adaptive target of the given label", "Huang et al. 2020",
                  "high = mislabeled", False, "free"),
        ScoreSpec("cv_loss", "held-out cross-entropy, k-fold", "aucurriculum CVLoss", "high = hard", False, "extra"),
        ScoreSpec("self_confidence", "1 - held-out p(given label)", "cleanlab rank (Northcutt et al. 2021)",
                  "high = clean", True, "extra"),
        ScoreSpec("prediction_depth", "prediction depth, k-NN probes", "Baldock et al. 2021; aucurriculum",
                  "high = hard", False, "extra"),
        ScoreSpec("transfer_teacher", "1 - teacher SVM P(given label)", "aucurriculum TransferTeacher",
                  "high = hard", False, "extra"),
        ScoreSpec("random", "seeded uniform noise (a baseline)", "aucurriculum Random", "none", False, "extra"),
    ]
}


def el2n_epoch(cfg: dict) -> int:
    """Epoch (0-based) at which EL2N is read: ``el2n_epoch`` of the config, else 10% into training (Paul et al.
    score early, e.g. epoch 20 of 200)."""
    e = cfg.get("el2n_epoch")
    return int(e) if e is not None else max(1, round(0.1 * int(cfg.get("epochs", 10)))) - 1


def forgetting_events(correct: np.ndarray) -> np.ndarray:
    """Toneva et al. 2019: count of transitions correct -> incorrect over epochs.

    A sample never predicted right in any epoch counts as ``T`` events (the paper's
    "never learned" samples are the most forgettable).
    """
    c = np.asarray(correct, dtype=bool)
    events = (c[:-1] & ~c[1:]).sum(axis=0).astype(np.float64)
    events[~c.any(axis=0)] = c.shape[0]
    return events


def first_iteration(correct: np.ndarray) -> np.ndarray:
    """aucurriculum FirstIteration: ``(T - length of the trailing run of correct epochs) / T``."""
    t = np.shape(correct)[0]
    return (t - dyn.trailing_streak(correct)) / t


def _pass_scores(run: Run, p: int, window: tuple[int, int | None], targets_override=None) -> dict[str, np.ndarray]:
    lo, hi = window
    if run.epochs_done(p) == 0:
        return {}
    margin = np.asarray(run.dynamics(p, "margin"))
    done = margin.shape[0]
    if done == 0:
        return {}
    lo_eff = lo if lo < done else 0
    w = slice(lo_eff, hi)
    prob = np.asarray(run.dynamics(p, "prob"), dtype=np.float64)
    pred = np.asarray(run.dynamics(p, "pred"))
    loss = np.asarray(run.dynamics(p, "loss"), dtype=np.float64)
    other = np.asarray(run.dynamics(p, "other"))
    yang = np.asarray(run.dynamics(p, "margin_yang"))
    el2n = np.asarray(run.dynamics(p, "el2n"), dtype=np.float64)
    targets = targets_override
    correct = pred == targets[None, :]
    conf, var, acc = dyn.cartography(prob, correct)
    return {
        "aum_raw": dyn.area_under_margin(margin, lo_eff, hi),
        "aum_yang_raw": dyn.area_under_margin(yang, lo_eff, hi),
        "confidence": 1.0 - conf,
        "variability": var,
        "cumulative_accuracy": 1.0 - acc,
        "first_iteration": first_iteration(correct),
        "forgetting": forgetting_events(correct),
        "ce_loss": loss[-1],
        "el2n": el2n[min(el2n_epoch(run.config()), done - 1)],
        "other": other[w],
        "epochs": np.full(margin.shape[1], done),
    }


def pass_cutoff(method: str, aum_kept: np.ndarray, aum_threshold: np.ndarray | None, percentile: float, seed: int) -> float:
    """The AUM below which a sample is flagged in one pass.

    ``threshold``: Pleiss et al. 2020, the ``percentile`` of the threshold samples' AUM.
    ``auto``: ``dynamics.gmm_cutoff`` on the AUM of the samples that kept their label, bounded
    above by the threshold-sample rule when threshold samples exist (never flag more than
    the paper's rule would); when the mixture finds no second group, the threshold rule alone. The GMM alone over-flags under asymmetric noise, where mislabeled
    samples are partly learned and the two modes overlap (bench/RESULTS.md); the threshold
    samples alone have no answer when they are off. A sample is then flagged when its AUM
    averaged over the passes where it kept its label is below the mean of the pass cut-offs
    (averaging two runs' AUM ranks better than requiring both flags, bench/RESULTS.md).
    """
    thr = dyn.threshold_cutoff(aum_threshold, percentile) if aum_threshold is not None and aum_threshold.size else None
    if method == "threshold":
        if thr is None:
            raise ValueError("cutoff 'threshold' needs threshold samples")
        return thr
    cut = dyn.gmm_cutoff(aum_kept, seed=seed)
    if thr is None:
        return cut
    return thr if not np.isfinite(cut) else min(cut, thr)


def compute_scores(run: Run) -> tuple[pd.DataFrame, dict]:
    """Scores table (one row per sample) and the cut-off details, from the finished epochs of every pass."""
    cfg = run.config()
    samples = run.samples()
    n = len(samples)
    labels = samples["label"].to_numpy()
    tpass = samples["threshold_pass"].to_numpy()
    trained = np.zeros(n, dtype=bool)
    trained[trained_rows(samples)] = True  # held-out samples (roles id_eval, ood_holdout, ...) stay NaN, unflagged
    n_classes = len(run.classes())
    window = (int(cfg.get("aum_start", 1)), cfg.get("aum_end"))
    acc: dict[str, list[np.ndarray]] = {}
    flagged_all = np.ones(n, dtype=bool)
    kept_any = np.zeros(n, dtype=bool)
    others = []
    cutoffs = []
    threshold_aum = np.full(n, np.nan)
    for p in range(run.n_passes()):
        targets = labels.copy()
        in_thr = tpass == p
        targets[in_thr] = n_classes
        s = _pass_scores(run, p, window, targets)
        if not s:
            continue
        kept = ~in_thr & trained
        cut = pass_cutoff(
            cfg.get("cutoff", "auto"),
            s["aum_raw"][kept],
            s["aum_raw"][in_thr] if in_thr.any() else None,
            float(cfg.get("threshold_percentile", 99.0)),
            int(cfg.get("seed", 0)),
        )
        cutoffs.append(cut)
        threshold_aum[in_thr] = s["aum_raw"][in_thr]
        flagged_all &= np.where(kept, s["aum_raw"] < cut, True)
        kept_any |= kept
        for k, v in s.items():
            if k in ("other", "epochs"):
                continue
            acc.setdefault(k, []).append(np.where(kept, v, np.nan))
        others.append(np.where(kept[None, :], s["other"], -1))
    if not acc:
        raise ValueError("no finished epoch yet: nothing to score")
    with np.errstate(invalid="ignore"):
        combined = {k: np.nanmean(np.stack(v), axis=0) if len(v) > 1 else v[0] for k, v in acc.items()}
    other_all = np.concatenate(others, axis=0)
    sug = _mode_ignoring(other_all, n_classes)
    table = pd.DataFrame({"sample_id": samples["sample_id"].to_numpy()})
    table["aum"] = -combined["aum_raw"]
    table["aum_yang"] = -combined["aum_yang_raw"]
    for name in ("confidence", "variability", "cumulative_accuracy", "first_iteration", "forgetting", "el2n", "ce_loss"):
        table[name] = combined[name]
    method = cfg.get("cutoff", "auto")
    cutoff = float(np.mean(cutoffs))
    if method == "threshold":  # Pleiss et al.: flagged in every pass where the sample kept its label
        flagged = flagged_all & kept_any
    else:  # auto: mean AUM over those passes against the mean per-pass cut-off
        flagged = np.nan_to_num(combined["aum_raw"], nan=np.inf) < cutoff
    table["flagged"] = flagged
    table["suggested_label"] = sug
    order = (-table["aum"].fillna(-np.inf).to_numpy()).argsort(kind="stable")
    rank = np.empty(n, dtype=np.int64)
    rank[order] = np.arange(1, n + 1)
    table["rank"] = rank
    table["threshold_aum"] = threshold_aum  # not a score: a threshold sample's AUM against its fake class
    info = {
        "cutoff_method": method,
        "pass_cutoffs": cutoffs,
        "cutoff": cutoff,
        "n_unscored": int((~kept_any).sum()),
    }
    return table, info


def _mode_ignoring(values: np.ndarray, n_classes: int) -> np.ndarray:
    """Most frequent class per column of ``values`` ignoring -1; -1 where a column has none."""
    counts = np.zeros((n_classes, values.shape[1]), dtype=np.int32)
    cols = np.broadcast_to(np.arange(values.shape[1]), values.shape)
    ok = values >= 0
    np.add.at(counts, (values[ok], cols[ok]), 1)
    out = counts.argmax(axis=0)
    out[counts.sum(axis=0) == 0] = -1
    return out
