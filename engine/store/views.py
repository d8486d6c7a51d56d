"""Plot-ready summaries of a run for the pages: binned, subsampled, never one point per sample.

Pure functions over numpy arrays and ``Run`` objects; no Streamlit, no Plotly.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from engine.scores.registry import compute_scores
from engine.store.runs import Run


def live_scores(run: Run, with_ids: bool = True) -> tuple[pd.DataFrame, dict]:
    """The scores table and cut-off info, ``flagged`` and ``rank`` under the run's saved review policy.

    From ``scores.parquet`` for a finished run, else computed from the finished epochs. ``info`` holds
    ``cutoff``, ``cutoff_method``, ``pass_cutoffs``, ``auto_cutoff``, ``n_unscored`` and ``policy`` (rule,
    value, score, text, n_flagged: ``engine.review.policy.caption`` makes the line every page shows).
    ``with_ids=False`` leaves out the ``sample_id`` column (rows are in run order, as ``samples``).
    """
    from engine.review.policy import apply_to_table, run_info

    if run.status().get("state") == "done" and (run.path / "scores.parquet").is_file():
        columns = None
        if not with_ids:
            import pyarrow.parquet as pq

            columns = [c for c in pq.read_schema(run.path / "scores.parquet").names if c != "sample_id"]
        table = run.scores(columns)
        info = run_info(run)
        return table, info | apply_to_table(run, table, info)
    table, info = compute_scores(run)
    return (table if with_ids else table.drop(columns="sample_id")), info


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


MARGIN_SAMPLE = "margin_sample.npz"


def margin_sample(run: Run, max_samples: int = 20_000, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Indices of a seeded random subset of samples and their ``(epochs, k)`` margins from their first kept pass.

    Finished runs keep it in ``margin_sample.npz`` (written by ``audit.finalize``), so a page never
    reads the full ``(epochs, samples)`` arrays to draw the median bands.
    """
    cached = run.path / MARGIN_SAMPLE
    if cached.is_file() and run.status().get("state") == "done":
        with np.load(cached, allow_pickle=False) as z:
            return z["idx"], z["margins"]
    n = len(run.samples(["label"]))
    idx = subsample(n, max_samples, seed)
    passes = first_kept_pass(run)[idx]
    done = min(run.epochs_done(p) for p in range(run.n_passes()) if run.epochs_done(p) > 0) if run.epochs_done(0) else 0
    margins = np.full((done, idx.size), np.nan, dtype=np.float32)
    for p in np.unique(passes[passes >= 0]):
        cols = passes == p
        margins[:, cols] = run.dynamics(int(p), "margin")[:done, idx[cols]]
    return idx, margins


def save_margin_sample(run: Run) -> None:
    """Write ``margin_sample.npz`` atomically (called when a run is finalized)."""
    import io

    from engine.store.runs import atomic_write_bytes

    idx, margins = margin_sample(run)
    buf = io.BytesIO()
    np.savez(buf, idx=idx, margins=margins)
    atomic_write_bytes(run.path / MARGIN_SAMPLE, buf.getvalue())


def margin_bands(margins: np.ndarray, groups: dict[str, np.ndarray]) -> pd.DataFrame:
    """Per epoch, the 25th/50th/75th percentile of the margins of each group of columns of ``margins``."""
    frames = []
    for name, cols in groups.items():
        if len(cols) == 0 or margins.shape[0] == 0:
            continue
        q = np.nanpercentile(np.asarray(margins[:, cols], dtype=np.float64), [25, 50, 75], axis=1)
        frames.append(pd.DataFrame({"epoch": np.arange(margins.shape[0]), "group": name, "q25": q[0], "median": q[1], "q75": q[2]}))
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def first_kept_pass(run: Run) -> np.ndarray:
    """For each sample, the first pass in which it kept its given label (its margins are about that label)."""
    tp = run.samples(["threshold_pass"])["threshold_pass"].to_numpy()
    return np.where(tp == 0, 1 if run.n_passes() > 1 else -1, 0)


def label_errors(samples: pd.DataFrame) -> np.ndarray | None:
    """Boolean mask of known label errors (given != true label), or None when true labels are unknown."""
    true = samples["true_label"].to_numpy()
    return samples["label"].to_numpy() != true if (true >= 0).all() else None


def nearest_neighbours(features: np.ndarray, candidates: np.ndarray, query: int, k: int = 5) -> np.ndarray:
    """Indices of the ``k`` samples among ``candidates`` closest to sample ``query`` (Euclidean, itself excluded)."""
    cand = np.asarray(candidates)
    cand = cand[cand != query]
    if cand.size == 0:
        return cand
    q = np.asarray(features[query], dtype=np.float32)
    d = ((np.asarray(features[cand], dtype=np.float32) - q) ** 2).sum(axis=1)
    take = min(k, cand.size)
    part = np.argpartition(d, take - 1)[:take]
    return cand[part[np.argsort(d[part], kind="stable")]]


def training_curves(run: Run, max_samples: int = 50_000, seed: int = 0) -> pd.DataFrame:
    """Per pass and finished epoch, the training loss and accuracy: columns ``pass, epoch, loss, accuracy, source``.

    ``source`` = ``history``: the values ``status.json`` recorded at the end of each epoch (our training loop,
    the ``Recorder`` and ``import-logits`` all write them: the mean loss of the epoch's samples and the share
    predicted as their training target). ``source`` = ``dynamics``: an epoch finished but missing from that
    history (a run written before the history existed, a run assembled by other tools) is read back from the
    dynamics arrays instead, as the mean of ``loss`` and the share of ``pred`` equal to the given label over a
    seeded subset of at most ``max_samples`` of the samples the pass trained on with their given label.
    Empty before the first finished epoch.
    """
    status = run.raw_status()
    done = [int(d) for d in status.get("epochs_done") or []]
    rows = [{"pass": int(h["pass"]), "epoch": int(h["epoch"]), "loss": float(h["loss"]),
             "accuracy": float(h["accuracy"]), "source": "history"}
            for h in status.get("history") or []
            if int(h["pass"]) < len(done) and int(h["epoch"]) < done[int(h["pass"])]]
    have = {(r["pass"], r["epoch"]) for r in rows}
    missing = [(p, e) for p, n in enumerate(done) for e in range(n) if (p, e) not in have]
    if missing:
        samples = run.samples(["label", "threshold_pass"])
        labels = samples["label"].to_numpy()
        tpass = samples["threshold_pass"].to_numpy()
        for p in sorted({p for p, _ in missing}):
            kept = np.flatnonzero(tpass != p)  # the pass's threshold samples trained on a fake class
            kept = kept[subsample(kept.size, max_samples, seed)]
            epochs = [e for q, e in missing if q == p]
            try:
                loss_arr, pred_arr = run.dynamics(p, "loss"), run.dynamics(p, "pred")
            except (FileNotFoundError, ValueError):
                continue  # no arrays for this pass (yet)
            for e in epochs:  # one epoch row at a time: never the whole (epochs, samples) array in memory
                loss = np.asarray(loss_arr[e][kept], dtype=np.float64)
                m = np.isfinite(loss)  # NaN: not trained on in this pass (held out)
                if m.any():
                    right = np.asarray(pred_arr[e][kept])[m] == labels[kept][m]
                    rows.append({"pass": p, "epoch": e, "loss": float(loss[m].mean()),
                                 "accuracy": float(right.mean()), "source": "dynamics"})
    frame = pd.DataFrame(rows, columns=["pass", "epoch", "loss", "accuracy", "source"])
    return frame.sort_values(["pass", "epoch"], kind="stable").reset_index(drop=True)
