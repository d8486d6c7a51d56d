"""Exports of a run, as CSV: the flagged list (worst first) with decisions, every sample, a cleaned
manifest (relabels applied, removals dropped) and the review decisions alone.

Score columns hold their papers' natural values (``engine.scores.registry.REGISTRY`` says which end is
suspicious); ``rank``, ``flagged`` and the cleanlab-compatible ``is_label_issue`` / ``label_quality``
follow the run's review policy (``engine.review.policy``) or the one given for this export. ``export_csv``
writes a companion ``<csv>.json`` describing every column (meaning, paper, direction) and the policy.
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
import pandas as pd

from engine.review.cleaned import cleaned_manifest, manifest_bytes, write_manifest
from engine.review.decisions import COLUMNS as DECISION_COLUMNS
from engine.review.decisions import FORMULA_PREFIXES, decision_rows, decisions_csv_bytes, write_decisions_csv
from engine.review.policy import CSV_PREFIX, Policy, apply_to_table, current_table, suspicious_of
from engine.review.reviews import ReviewStore
from engine.scores.registry import REGISTRY
from engine.store.runs import Run, RunError, atomic_write_bytes, atomic_write_json

KINDS = ("flagged", "all", "manifest", "decisions")

# Columns that are not scores: what they hold (scores are described by the registry).
COLUMNS = DECISION_COLUMNS | {
    "suggested_label": "most frequent other class predicted over the epochs where the sample kept its label",
    "rank": "1 = most suspicious under the review policy (by its ranking score); unscored samples last",
    "flagged": "flagged under the review policy",
    "is_label_issue": "cleanlab-compatible: same as flagged",
    "label_quality": "cleanlab-compatible label quality in [0, 1], low = likely issue: (rank - 1) / (n_scored - 1) "
                     "over the samples the ranking score covers (rank-normalised); empty for unscored samples",
    "is_threshold": "was a threshold sample (relabelled to a fake class) in one training pass",
    "role": "the sample's split role in the run (train, threshold, held out ...)",
    "true_label": "true label before noise was injected (known only for injected noise)",
    "path": "image path (manifest): relative to the manifest's folder",
}


def neutralize_formulas(df: pd.DataFrame) -> pd.DataFrame:
    """Prefix text cells starting with = + - @ (or tab/CR) with a quote so spreadsheets do not run them.

    Only text columns are touched; numbers (negative ones included) stay numbers. For the human-facing
    exports only: the machine-readable manifest is written as is (``cleaned.manifest_bytes``).
    """
    out = df.copy()
    for col in out.columns:
        if out[col].dtype == object or pd.api.types.is_string_dtype(out[col]):
            s = out[col].astype("string")
            risky = s.str.startswith(FORMULA_PREFIXES).fillna(False)
            if risky.any():
                out[col] = s.where(~risky, "'" + s)
    return out


def scores_under(run: Run, policy: Policy | None = None) -> tuple[pd.DataFrame, dict]:
    """The run's scores table (with ``sample_id``) and info, ``flagged`` / ``rank`` under ``policy`` (default: the
    run's saved policy). A given policy is applied to a copy and not saved."""
    from engine.review.policy import PolicyError

    try:
        table, info = current_table(run)
    except PolicyError as exc:
        raise RunError(f"run {run.id} has no scores yet (state: {run.status().get('state')}); wait for an epoch to "
                       "finish") from exc
    table = table.copy()
    return table, info | apply_to_table(run, table, info, policy)


def label_quality(rank: np.ndarray, n_scored: int) -> np.ndarray:
    """cleanlab-style label quality in [0, 1], low = likely issue: ``(rank - 1) / (n_scored - 1)`` for ranks within
    the ``n_scored`` samples that have a value of the ranking score, NaN for the others (rank-normalised, as
    aucurriculum's rank_and_normalize, turned so that the most suspicious sample gets 0)."""
    r = np.asarray(rank, dtype=np.float64)
    q = (r - 1) / max(n_scored - 1, 1)
    return np.where(r <= n_scored, q, np.nan)


def sample_table(run: Run, policy: Policy | None = None) -> pd.DataFrame:
    """Every sample with its scores (natural values), class names for labels, worst (rank 1) first."""
    from engine.scores.predefined import load_from_run

    scores, info = scores_under(run, policy)
    samples = run.samples()
    classes = np.array(run.classes() + [""], dtype=object)  # index -1 -> ""
    df = samples[["sample_id", "source"]].copy()
    df["label"] = classes[samples["label"].to_numpy()]
    df["suggested_label"] = classes[scores["suggested_label"].to_numpy()]
    df["aum"] = scores["aum"].to_numpy()
    df["rank"] = scores["rank"].to_numpy()
    df["flagged"] = scores["flagged"].to_numpy()
    df["is_label_issue"] = df["flagged"]
    pol = info["policy"]
    ranked = scores[pol["score"]] if pol["score"] in scores else None
    if ranked is None:  # an imported csv: score
        imported = load_from_run(run.path)
        ranked = imported[pol["score"][len(CSV_PREFIX):]]
    df["label_quality"] = label_quality(df["rank"].to_numpy(), int(np.isfinite(ranked.to_numpy(dtype=np.float64)).sum()))
    for name in REGISTRY:
        if name in scores and name != "aum":
            df[name] = scores[name].to_numpy()
    if "forgetting" in df:  # a count
        df["forgetting"] = df["forgetting"].round().astype("Int64")
    imported = load_from_run(run.path)
    if len(imported) == len(df):
        for c in imported.columns:
            df[CSV_PREFIX + c] = imported[c].to_numpy()
    df["is_threshold"] = samples["is_threshold"].to_numpy()
    if "role" in samples:
        df["role"] = samples["role"].to_numpy()
    true = samples["true_label"].to_numpy()
    if (true >= 0).all():
        df["true_label"] = classes[true]
    df.attrs["policy"] = pol
    return df.sort_values("rank", kind="stable").reset_index(drop=True)


def with_decisions(run: Run, table: pd.DataFrame | None = None, policy: Policy | None = None) -> pd.DataFrame:
    """``sample_table`` plus the current review decision of each sample (decision, new_label, decided_at)."""
    table = sample_table(run, policy) if table is None else table
    dec = ReviewStore(run.path).current()
    dec["decided_at"] = pd.to_datetime(dec["decided_at"], unit="s", utc=True).dt.strftime("%Y-%m-%dT%H:%M:%SZ")
    out = table.merge(dec, on="sample_id", how="left")
    out.attrs["policy"] = table.attrs.get("policy")
    return out


def decisions_table(run: Run) -> pd.DataFrame:
    """The review decisions alone, in run order: sample_id, source, label, decision, new_label, decided_at
    (``engine.decisions.decision_rows``)."""
    return pd.DataFrame(decision_rows(run), columns=list(DECISION_COLUMNS))


def export_frame(run: Run, kind: str = "flagged", policy: Policy | None = None) -> pd.DataFrame:
    """The table of one export ``kind``: flagged | all | manifest | decisions (``policy``: see ``scores_under``)."""
    if kind == "manifest":
        return cleaned_manifest(run)
    if kind == "decisions":
        return decisions_table(run)
    if kind not in KINDS:
        raise ValueError(f"unknown export {kind!r}; choose one of {', '.join(KINDS)}")
    df = with_decisions(run, policy=policy)
    if kind == "all":
        return df
    out = df[df["flagged"]].reset_index(drop=True)
    out.attrs["policy"] = df.attrs.get("policy")
    return out


def to_csv_bytes(df: pd.DataFrame) -> bytes:
    """CSV with formula-looking text cells neutralised (the human-facing exports)."""
    buf = io.StringIO()
    neutralize_formulas(df).to_csv(buf, index=False)
    return buf.getvalue().encode("utf-8")


def export_bytes(run: Run, kind: str, policy: Policy | None = None) -> bytes:
    """The CSV bytes of one export: the manifest as plain machine-readable CSV, the others formula-guarded."""
    if kind == "decisions":
        return decisions_csv_bytes(decision_rows(run))
    df = export_frame(run, kind, policy)
    return manifest_bytes(df) if kind == "manifest" else to_csv_bytes(df)


def describe_columns(run: Run, df: pd.DataFrame) -> dict:
    """Per column of an export: ``meaning``, ``paper`` (scores) and ``direction`` ("low = suspicious" ...)."""
    out = {}
    for c in df.columns:
        if c in REGISTRY:
            spec = REGISTRY[c]
            out[c] = {"meaning": spec.title, "paper": spec.paper, "direction": spec.direction}
        elif c.startswith(CSV_PREFIX):
            out[c] = {"meaning": f"imported score {c[len(CSV_PREFIX):]!r} (predefined CSV), values as imported",
                      "paper": None, "direction": f"{suspicious_of(run, c)} = suspicious"}
        else:
            d = {"meaning": COLUMNS.get(c, c)}
            if c == "rank":
                d["direction"] = "low = suspicious"
            elif c == "label_quality":
                d["direction"] = "low = suspicious"
                d["paper"] = "cleanlab (Northcutt et al. 2021) label quality, here rank-normalised"
            elif c == "is_label_issue":
                d["paper"] = "cleanlab find_label_issues"
            out[c] = d
    return out


def companion(run: Run, df: pd.DataFrame, kind: str) -> dict:
    """The ``<csv>.json`` written next to a CSV export: run, kind, review policy and every column's meaning."""
    return {"run": run.id, "kind": kind, "rows": int(len(df)), "policy": df.attrs.get("policy"),
            "columns": describe_columns(run, df)}


def export_filename(run: Run, kind: str) -> str:
    """``<run id>-<kind>.csv``; a run that is not done says so: ``<run id>-PARTIAL-<state>-e<done>of<total>-<kind>.csv``."""
    st = run.status()
    if st.get("state") == "done":
        return f"{run.id}-{kind}.csv"
    done = sum(st.get("epochs_done") or [])
    total = int(st.get("epochs") or 0) * int(st.get("passes") or 1)
    return f"{run.id}-PARTIAL-{st.get('state')}-e{done}of{total}-{kind}.csv"


def export_csv(run: Run, out: str | os.PathLike, all_samples: bool = False, kind: str | None = None,
               policy: Policy | None = None) -> int:
    """Write one export (default: the flagged samples) to ``out`` and its column description to ``<out>.json``,
    atomically; returns the row count. ``policy`` applies to this export only (it is not saved)."""
    kind = kind or ("all" if all_samples else "flagged")
    if kind == "manifest":
        return write_manifest(run, out)
    if kind == "decisions":
        return write_decisions_csv(run, out)
    df = export_frame(run, kind, policy)
    atomic_write_bytes(out, to_csv_bytes(df))
    atomic_write_json(Path(f"{os.fspath(out)}.json"), companion(run, df, kind))
    return len(df)

