"""Plot-ready summaries of a run for the pages: binned, subsampled, never one point per sample.

Pure functions over numpy arrays and ``Run`` objects; no Streamlit, no Plotly.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from .runs import Run
from .scores import compute_scores


def live_scores(run: Run) -> tuple[pd.DataFrame, dict]:
    """The scores table and cut-off info: from ``scores.parquet`` for a finished run, else from the finished epochs."""
    if run.status().get("state") == "done" and (run.path / "scores.parquet").is_file():
        summary = run.summary() or {}
        return run.scores(), {k: summary.get(k) for k in ("cutoff", "cutoff_method", "pass_cutoffs", "n_unscored")}
    return compute_scores(run)


def histogram(values: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """Counts of finite ``values`` in the bins ``edges`` (np.histogram), for a go.Bar."""
    v = np.asarray(values, dtype=np.float64)
    return np.histogram(v[np.isfinite(v)], bins=edges)[0]


def common_edges(*arrays: np.ndarray, bins: int = 60) -> np.ndarray:
    finite = [a[np.isfinite(a)] for a in map(np.asarray, arrays) if np.isfinite(a).any()]
    lo = min(float(a.min()) for a in finite) if finite else 0.0
    hi = max(float(a.max()) for a in finite) if finite else 1.0
    if hi <= lo:
        hi = lo + 1.0
    return np.linspace(lo, hi, bins + 1)


def threshold_sample_aum(run: Run) -> np.ndarray:
    """AUM (natural units) of each pass's threshold samples, measured against the fake class in that pass."""
    from .dynamics import area_under_margin

    cfg = run.config()
    tp = run.samples()["threshold_pass"].to_numpy()
    out = []
    for p in range(run.n_passes()):
        members = np.flatnonzero(tp == p)
        done = run.epochs_done(p)
        if members.size == 0 or done == 0:
            continue
        start = int(cfg.get("aum_start", 1))
        margins = np.asarray(run.dynamics(p, "margin")[:, members])
        out.append(area_under_margin(margins, start if start < done else 0, cfg.get("aum_end")))
    return np.concatenate(out) if out else np.empty(0)


def flags_at(aum_natural: np.ndarray, cutoff: float) -> np.ndarray:
    """Flagged = AUM below the cut-off (unscored samples are never flagged)."""
    a = np.asarray(aum_natural, dtype=np.float64)
    return np.isfinite(a) & (a < cutoff)


def per_class(aum_natural: np.ndarray, labels: np.ndarray, flagged: np.ndarray, classes: list[str]) -> pd.DataFrame:
    """Quartiles of AUM, whisker ends (5th/95th percentile) and flagged count for each given label."""
    rows = []
    for k, name in enumerate(classes):
        a = aum_natural[(labels == k) & np.isfinite(aum_natural)]
        if a.size == 0:
            continue
        q = np.percentile(a, [5, 25, 50, 75, 95])
        rows.append({"class": name, "n": int((labels == k).sum()), "flagged": int(flagged[labels == k].sum()),
                     "p5": q[0], "q1": q[1], "median": q[2], "q3": q[3], "p95": q[4]})
    return pd.DataFrame(rows)


def subsample(n: int, max_points: int, seed: int = 0) -> np.ndarray:
    """Sorted indices of at most ``max_points`` of ``n`` samples (all when n <= max_points)."""
    if n <= max_points:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, max_points, replace=False))


def margin_bands(margins: np.ndarray, groups: dict[str, np.ndarray], max_samples: int = 20_000) -> pd.DataFrame:
    """Per epoch, the 25th/50th/75th percentile of the margin of each group of sample indices.

    ``margins`` is ``(epochs, samples)`` (memory-mapped is fine: only the needed columns are read).
    Large groups are subsampled to ``max_samples`` for speed.
    """
    frames = []
    for name, idx in groups.items():
        if len(idx) == 0:
            continue
        sel = np.sort(idx[subsample(len(idx), max_samples)])
        m = np.asarray(margins[:, sel], dtype=np.float64)
        q = np.nanpercentile(m, [25, 50, 75], axis=1)
        frames.append(pd.DataFrame({"epoch": np.arange(m.shape[0]), "group": name, "q25": q[0], "median": q[1], "q75": q[2]}))
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def first_kept_pass(run: Run) -> np.ndarray:
    """For each sample, the first pass in which it kept its given label (its margins are about that label)."""
    tp = run.samples()["threshold_pass"].to_numpy()
    return np.where(tp == 0, 1 if run.n_passes() > 1 else -1, 0)


def label_errors(samples: pd.DataFrame) -> np.ndarray | None:
    """Boolean mask of known label errors (given != true label), or None when true labels are unknown."""
    true = samples["true_label"].to_numpy()
    return samples["label"].to_numpy() != true if (true >= 0).all() else None
