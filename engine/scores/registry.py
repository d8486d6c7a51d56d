"""The score registry and the per-sample scores table of a run.

Every score column holds **the quantity its paper defines, with its natural sign** (``aum`` =
mean margin, low = suspicious, as the ``aum`` package writes it; ``confidence`` = mean
p(given label), low = suspicious). Which end of a column is suspicious lives here, in
``ScoreSpec.suspicious``; ``oriented`` turns values so that higher = more suspicious, for
sorting and ranking only (never store or show the turned values).

Scores of a sample are computed only from the training passes in which it kept its given
label (a threshold sample's margins in its own pass refer to the fake class).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from engine.capture import dynamics as dyn
from engine.store.runs import Run, trained_rows

SUSPICIOUS = ("low", "high")


@dataclass(frozen=True)
class ScoreSpec:
    name: str
    title: str  # what the column holds, in words
    paper: str
    suspicious: str  # "low" or "high": which end of the column is suspicious (mislabeled / hard / OoD)
    cost: str  # "free" (from captured dynamics) or "extra" (needs more compute)

    @property
    def direction(self) -> str:
        """``"low = suspicious"`` or ``"high = suspicious"``, for labels and exports."""
        return f"{self.suspicious} = suspicious"


REGISTRY: dict[str, ScoreSpec] = {
    s.name: s
    for s in [
        ScoreSpec("aum", "Area Under the Margin: mean margin z_y - max other logit over epochs", "Pleiss et al. 2020",
                  "low", "free"),
        ScoreSpec("aum_yang", "AUM, Yang variant: mean of z_y - max logit left after masking the argmax",
                  "Pleiss et al. 2020; peerannot", "low", "free"),
        ScoreSpec("confidence", "cartography confidence: mean p(given label) over epochs", "Swayamdipta et al. 2020",
                  "low", "free"),
        ScoreSpec("variability", "cartography variability: std of p(given label) over epochs",
                  "Swayamdipta et al. 2020", "high", "free"),
        ScoreSpec("cumulative_accuracy", "fraction of epochs predicted right (cartography correctness)",
                  "aucurriculum CumulativeAccuracy", "low", "free"),
        ScoreSpec("first_iteration", "(T - trailing correct streak) / T", "aucurriculum FirstIteration", "high", "free"),
        ScoreSpec("forgetting", "forgetting events (correct -> wrong) in one pass: the first pass where the sample kept "
                  "its label; never learned = T", "Toneva et al. 2019", "high", "free"),
        ScoreSpec("el2n", "EL2N ||softmax - onehot|| at an early epoch", "Paul et al. 2021", "high", "free"),
        ScoreSpec("ce_loss", "cross-entropy at the last epoch", "aucurriculum CELoss", "high", "free"),
        ScoreSpec("ood_density", "log feature density of the final model (DDU); low = unlike the training data",
                  "Mukhoti et al. 2021", "low", "free"),
        ScoreSpec("entropy", "softmax entropy of the final model", "Mukhoti et al. 2021", "high", "free"),
        ScoreSpec("sat_disagreement", "1 - self-adaptive target of the given label", "Huang et al. 2020", "high",
                  "free"),
        ScoreSpec("cv_loss", "held-out cross-entropy, k-fold", "aucurriculum CVLoss", "high", "extra"),
        ScoreSpec("self_confidence", "held-out p(given label) (cleanlab self-confidence label quality)",
                  "cleanlab rank (Northcutt et al. 2021)", "low", "extra"),
        ScoreSpec("prediction_depth", "prediction depth, k-NN probes", "Baldock et al. 2021; aucurriculum",
                  "high", "extra"),
        ScoreSpec("transfer_teacher", "teacher SVM P(given label)", "aucurriculum TransferTeacher", "low", "extra"),
        ScoreSpec("random", "seeded uniform noise (a baseline)", "aucurriculum Random", "high", "extra"),
    ]
}


def suspicious_end(name: str) -> str:
    """``"low"`` or ``"high"``: which end of score ``name`` is suspicious (registry scores only)."""
    spec = REGISTRY.get(name)
    if spec is None:
        raise KeyError(f"{name!r} is not a score of the registry ({', '.join(REGISTRY)})")
    return spec.suspicious


def oriented(values: np.ndarray, name: str, suspicious: str | None = None) -> np.ndarray:
    """``values`` of score ``name`` turned so that higher = more suspicious (negated when low is suspicious).

    For sorting and ranking only: never store or show the result. ``suspicious`` ("low" / "high")
    overrides the registry, for scores outside it (imported ``csv:`` columns, ensembles). NaN stays NaN.
    """
    end = suspicious or suspicious_end(name)
    if end not in SUSPICIOUS:
        raise ValueError(f"suspicious must be 'low' or 'high', got {end!r}")
    v = np.asarray(values, dtype=np.float64)
    return -v if end == "low" else v.copy()


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


def pass_scores(run: Run, p: int, window: tuple[int, int | None], targets: np.ndarray) -> dict[str, np.ndarray]:
    """The free scores of pass ``p`` alone, one value per sample (every sample of the run, threshold samples
    included), from its recorded epochs: AUM and the Yang AUM over the epochs ``window`` (``[lo, hi)``, from 0 when
    fewer than ``lo`` epochs are done), data-map statistics, first iteration and forgetting against ``targets`` (the
    targets this pass trained on), the last epoch's loss, EL2N at its epoch, and ``other`` (the largest other class
    per epoch of the window, for the suggested label). Empty when the pass has no finished epoch."""
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
    correct = pred == targets[None, :]
    conf, var, acc = dyn.cartography(prob, correct)
    return {
        "aum": dyn.area_under_margin(margin, lo_eff, hi),
        "aum_yang": dyn.area_under_margin(yang, lo_eff, hi),
        "confidence": conf,
        "variability": var,
        "cumulative_accuracy": acc,
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


PASS_AUM = "aum_pass{}"  # per-pass AUM columns of the scores table (NaN where the sample was a threshold sample)
# Averaged over the passes where a sample kept its label (NaN elsewhere). Counts are not averaged:
FIRST_KEPT_PASS_ONLY = ("forgetting",)


def compute_scores(run: Run) -> tuple[pd.DataFrame, dict]:
    """Scores table (one row per sample, natural values) and the cut-off details, from the finished epochs.

    Columns: the registry's free scores, ``aum_pass<p>`` (a pass's AUM for the samples that kept
    their label in it; what the threshold rule compares with that pass's own cut-off),
    ``threshold_aum`` (a threshold sample's AUM against its fake class: not a score),
    ``suggested_label``, and ``flagged`` / ``rank`` under the run's review policy
    (``engine.review.policy.apply_to_table``).

    A score seen in two passes is the mean of the passes where the sample kept its label, except
    ``forgetting``, a count: the events of the first pass in which the sample kept its label (so
    every sample's count is over one training of ``T`` epochs, and stays an integer).
    """
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
    first: dict[str, np.ndarray] = {}
    kept_any = np.zeros(n, dtype=bool)
    others = []
    auto_cutoffs: list[float] = []
    pass_aum: dict[int, np.ndarray] = {}
    threshold_aum = np.full(n, np.nan)
    for p in range(run.n_passes()):
        targets = labels.copy()
        in_thr = tpass == p
        targets[in_thr] = n_classes
        s = pass_scores(run, p, window, targets)
        if not s:
            continue
        kept = ~in_thr & trained
        auto_cutoffs.append(pass_cutoff(
            "auto",
            s["aum"][kept],
            s["aum"][in_thr] if in_thr.any() else None,
            float(cfg.get("threshold_percentile", 99.0)),
            int(cfg.get("seed", 0)),
        ))
        threshold_aum[in_thr] = s["aum"][in_thr]
        pass_aum[p] = np.where(kept, s["aum"], np.nan)
        for k in FIRST_KEPT_PASS_ONLY:
            take = kept & ~kept_any
            first.setdefault(k, np.full(n, np.nan))[take] = s[k][take]
        kept_any |= kept
        for k, v in s.items():
            if k in ("other", "epochs") or k in FIRST_KEPT_PASS_ONLY:
                continue
            acc.setdefault(k, []).append(np.where(kept, v, np.nan))
        others.append(np.where(kept[None, :], s["other"], -1))
    if not acc:
        raise ValueError("no finished epoch yet: nothing to score")
    combined = {k: mean_over_passes(np.stack(v)) if len(v) > 1 else v[0] for k, v in acc.items()}
    combined.update(first)
    other_all = np.concatenate(others, axis=0)
    sug = mode_ignoring(other_all, n_classes)
    table = pd.DataFrame({"sample_id": samples["sample_id"].to_numpy()})
    for name in ("aum", "aum_yang", "confidence", "variability", "cumulative_accuracy", "first_iteration", "forgetting",
                 "el2n", "ce_loss"):
        table[name] = combined[name]
    table["suggested_label"] = sug
    for p, v in pass_aum.items():
        table[PASS_AUM.format(p)] = v
    table["threshold_aum"] = threshold_aum  # not a score: a threshold sample's AUM against its fake class
    info = {
        "auto_pass_cutoffs": auto_cutoffs,
        "auto_cutoff": float(np.mean(auto_cutoffs)),
        "n_unscored": int((~kept_any).sum()),
    }
    from engine.review.policy import apply_to_table

    return table, info | apply_to_table(run, table, info)


def mean_over_passes(values: np.ndarray) -> np.ndarray:
    """Per sample (column), the mean of the passes (rows) that have a value: ``sum(v[finite]) / count``, NaN
    where no pass has one (a sample held out of training, or a threshold sample of a single threshold run).

    ``np.nanmean`` gives the same values but warns "Mean of empty slice" for every such column.
    """
    values = np.asarray(values)
    have = ~np.isnan(values)
    count = have.sum(axis=0)
    total = np.where(have, values, 0).sum(axis=0)
    return np.divide(total, count, out=np.full(total.shape, np.nan, dtype=total.dtype), where=count > 0)


def mode_ignoring(values: np.ndarray, n_classes: int) -> np.ndarray:
    """Most frequent class per column of ``values`` ignoring -1; -1 where a column has none."""
    counts = np.zeros((n_classes, values.shape[1]), dtype=np.int32)
    cols = np.broadcast_to(np.arange(values.shape[1]), values.shape)
    ok = values >= 0
    np.add.at(counts, (values[ok], cols[ok]), 1)
    out = counts.argmax(axis=0)
    out[counts.sum(axis=0) == 0] = -1
    return out
