"""Exports of a run: the flagged list (worst first) or every sample, as CSV."""

from __future__ import annotations

import io
import os

import numpy as np
import pandas as pd

from .runs import Run, RunError, atomic_write_bytes
from .scores import REGISTRY

FORMULA_PREFIXES = ("=", "+", "-", "@", "\t", "\r")


def neutralize_formulas(df: pd.DataFrame) -> pd.DataFrame:
    """Prefix text cells starting with = + - @ (or tab/CR) with a quote so spreadsheets do not run them.

    Only text columns are touched; numbers (negative ones included) stay numbers.
    """
    out = df.copy()
    for col in out.columns:
        if out[col].dtype == object or pd.api.types.is_string_dtype(out[col]):
            s = out[col].astype("string")
            risky = s.str.startswith(FORMULA_PREFIXES).fillna(False)
            if risky.any():
                out[col] = s.where(~risky, "'" + s)
    return out


def sample_table(run: Run) -> pd.DataFrame:
    """Every sample with its scores, class names for labels, worst (rank 1) first."""
    scores = run.scores()
    if scores is None:
        raise RunError(f"run {run.id} has no scores yet (state: {run.status().get('state')}); wait for an epoch to finish")
    samples = run.samples()
    classes = np.array(run.classes() + [""], dtype=object)  # index -1 -> ""
    df = samples[["sample_id", "source"]].copy()
    df["label"] = classes[samples["label"].to_numpy()]
    df["suggested_label"] = classes[scores["suggested_label"].to_numpy()]
    for name in REGISTRY:
        if name in scores:
            df[name] = scores[name].to_numpy()
    df["rank"] = scores["rank"].to_numpy()
    df["flagged"] = scores["flagged"].to_numpy()
    df["is_threshold"] = samples["is_threshold"].to_numpy()
    true = samples["true_label"].to_numpy()
    if (true >= 0).all():
        df["true_label"] = classes[true]
    cols = ["sample_id", "source", "label", "suggested_label", "aum", "rank", "flagged"]
    df = df[cols + [c for c in df.columns if c not in cols]]
    return df.sort_values("rank", kind="stable").reset_index(drop=True)


def export_csv(run: Run, out: str | os.PathLike, all_samples: bool = False) -> int:
    """Write the flagged samples (or all with ``all_samples``) to ``out`` atomically; returns the row count."""
    df = sample_table(run)
    if not all_samples:
        df = df[df["flagged"]]
    buf = io.StringIO()
    neutralize_formulas(df).to_csv(buf, index=False)
    atomic_write_bytes(out, buf.getvalue().encode("utf-8"))
    return len(df)
