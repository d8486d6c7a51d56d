"""Exports of a run, as CSV: the flagged list (worst first) with decisions, every sample, a cleaned
manifest (relabels applied, removals dropped) and the review decisions alone."""

from __future__ import annotations

import io
import os

import numpy as np
import pandas as pd

from .reviews import ReviewStore
from .runs import Run, RunError, atomic_write_bytes
from .scores import REGISTRY

KINDS = ("flagged", "all", "manifest", "decisions")

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


def with_decisions(run: Run, table: pd.DataFrame | None = None) -> pd.DataFrame:
    """``sample_table`` plus the current review decision of each sample (decision, new_label, decided_at)."""
    table = sample_table(run) if table is None else table
    dec = ReviewStore(run.path).current()
    dec["decided_at"] = pd.to_datetime(dec["decided_at"], unit="s", utc=True).dt.strftime("%Y-%m-%dT%H:%M:%SZ")
    return table.merge(dec, on="sample_id", how="left")


def cleaned_manifest(run: Run) -> pd.DataFrame:
    """``path,label,sample_id`` for every sample not marked *remove*, with *mislabeled* ones relabelled.

    ``path`` is relative to the dataset root (save the manifest there to audit it again).
    """
    df = with_decisions(run)
    keep = df[df["decision"].fillna("") != "remove"]
    label = keep["new_label"].where(keep["decision"] == "mislabeled", keep["label"])
    out = pd.DataFrame({"path": keep["source"], "label": label, "sample_id": keep["sample_id"]})
    return out.sort_values("sample_id", kind="stable").reset_index(drop=True)


def decisions_table(run: Run) -> pd.DataFrame:
    """The review decisions alone: sample_id, source, label, decision, new_label, decided_at."""
    df = with_decisions(run)
    df = df[df["decision"].notna()]
    return df[["sample_id", "source", "label", "decision", "new_label", "decided_at"]].reset_index(drop=True)


def export_frame(run: Run, kind: str = "flagged") -> pd.DataFrame:
    """The table of one export ``kind``: flagged | all | manifest | decisions."""
    if kind == "manifest":
        return cleaned_manifest(run)
    if kind == "decisions":
        return decisions_table(run)
    if kind not in KINDS:
        raise ValueError(f"unknown export {kind!r}; choose one of {', '.join(KINDS)}")
    df = with_decisions(run)
    return df if kind == "all" else df[df["flagged"]].reset_index(drop=True)


def to_csv_bytes(df: pd.DataFrame) -> bytes:
    """CSV with formula-looking text cells neutralised."""
    buf = io.StringIO()
    neutralize_formulas(df).to_csv(buf, index=False)
    return buf.getvalue().encode("utf-8")


def export_filename(run: Run, kind: str) -> str:
    """``<run id>-<kind>.csv``; a run that is not done says so: ``<run id>-PARTIAL-<state>-e<done>of<total>-<kind>.csv``."""
    st = run.status()
    if st.get("state") == "done":
        return f"{run.id}-{kind}.csv"
    done = sum(st.get("epochs_done") or [])
    total = int(st.get("epochs") or 0) * int(st.get("passes") or 1)
    return f"{run.id}-PARTIAL-{st.get('state')}-e{done}of{total}-{kind}.csv"


def export_csv(run: Run, out: str | os.PathLike, all_samples: bool = False, kind: str | None = None) -> int:
    """Write one export (default: the flagged samples) to ``out`` atomically; returns the row count."""
    df = export_frame(run, kind or ("all" if all_samples else "flagged"))
    atomic_write_bytes(out, to_csv_bytes(df))
    return len(df)
