"""Scores page: bring your own scores (CSV), compare every score by correlation and top-k overlap."""

from __future__ import annotations

import hashlib

import numpy as np
import pandas as pd
import plotly.express as px
import plotly.graph_objects as go
import streamlit as st

from app_pages.common import (
    current_run,
    follow_open,
    job_manager,
    load_scores,
    may_run_audits,
    md_escape,
    open_clicked,
    refuse_outside_root,
    stamp,
)
from engine.ui import (
    EXTRA,
    MAX_BYTES,
    METHODS,
    PREDEFINED_FILE,
    REGISTRY,
    PathRefused,
    PredefinedError,
    correlation_matrix,
    directions,
    guess_columns,
    join_to_run,
    load_from_run,
    oriented,
    parse_csv,
    resolve_user_path,
    save_to_run,
    subsample,
    topk_jaccard,
    validate,
)

NO_ID = "(none: match rows by position)"
CORRELATION_ROWS = 200_000  # rows the correlation matrix is computed over, at most

follow_open()
st.title(":material/functions: Scores")
st.write("Difficulty is not one number. Compare the scores of an audit with each other and with scores you "
         "computed elsewhere: a verdict is more trustworthy when independent scores agree.")
run = current_run()

# ---- bring your own scores ------------------------------------------------------------------
with st.expander("Import predefined scores from a CSV", expanded=run is None):
    st.caption(f"A CSV with a sample id column and one or more numeric score columns (up to {MAX_BYTES // 2**20} MB). "
               "Rows are matched to the run by sample id, never by position. Example: `sample_data/predefined_scores.csv`.")
    up = st.file_uploader("CSV file", type=["csv", "txt", "tsv"], key="predef_upload")
    path = st.text_input("…or a path on this machine", key="predef_path", placeholder="sample_data/predefined_scores.csv")
    data, source = None, None
    file_key = ""
    try:
        if up is not None:
            data, source = up.getvalue(), up.name
        elif path.strip():
            p = resolve_user_path(path)  # only under the data root or the runs folder
            if not p.is_file():
                raise PredefinedError(f"no file at {p}")
            if p.stat().st_size > MAX_BYTES:
                raise PredefinedError(f"{p} is {p.stat().st_size / 1e6:.0f} MB; the limit is {MAX_BYTES / 1e6:.0f} MB")
            data, source = p.read_bytes(), str(p)
        parsed = parse_csv(data) if data is not None else None
        file_key = hashlib.sha256(data).hexdigest()[:10] if data is not None else ""  # fresh mapping widgets per file
    except (PredefinedError, PathRefused) as exc:
        st.error(f"Cannot read {md_escape(source or 'the file')}: {md_escape(exc)}")
        parsed = None
    if parsed is not None:
        df = parsed.frame
        id_guess, label_guess, numeric = guess_columns(df)
        st.caption(f"{md_escape(source)}: {len(df):,} rows, {len(df.columns)} columns, read as {parsed.encoding} with "
                   f"{parsed.delimiter!r} between fields.")
        c1, c2 = st.columns(2)
        id_options = list(df.columns) + [NO_ID]
        id_col = c1.selectbox("Sample id column", id_options, index=id_options.index(id_guess) if id_guess else len(df.columns),
                              key=f"predef_id_{file_key}")
        cols = c2.multiselect("Score columns", [c for c in df.columns if c != id_col], default=numeric, key=f"predef_cols_{file_key}")
        harder = {c: st.checkbox(f"higher {c} = harder / more suspicious", value=True, key=f"predef_dir_{c}_{file_key}",
                                 help="Values are kept as in the file; this records which end is suspicious, for "
                                      "ranking and cut-offs.") for c in cols}
        label_col = None
        if run is None:
            label_opts = ["(none)"] + [c for c in df.columns if c not in cols and c != id_col]
            label_col = st.selectbox("Label column (optional)", label_opts,
                                     index=label_opts.index(label_guess) if label_guess in label_opts else 0, key=f"predef_label_{file_key}")
            label_col = None if label_col == "(none)" else label_col
            g1, g2 = st.columns(2)
            path_opts = ["(none)"] + [c for c in df.columns if c not in cols]
            path_col = g1.selectbox("Image path column (optional, for a gallery)", path_opts, key=f"predef_pathcol_{file_key}",
                                    index=path_opts.index(id_col) if id_col in path_opts else 0)
            image_root = g2.text_input("Folder the image paths are relative to", key=f"predef_root_{file_key}")
            with g2:
                refuse_outside_root(image_root)
        try:
            clean = validate(df, None if id_col == NO_ID else id_col, cols, harder)
            if run is not None:
                samples_ids = run.samples(["sample_id"])["sample_id"].to_numpy()
                joined = join_to_run(clean, samples_ids)
                if joined.by_position:
                    st.warning("No id column: rows are matched to samples by position. This is right only if the file "
                               "lists the samples in exactly the run's order.")
                ok = True
                if joined.n_unknown:
                    st.warning(f"{joined.n_unknown:,} id(s) of the file are not samples of this run "
                               f"(e.g. {md_escape(joined.unknown_examples)}); {joined.n_matched:,} match.")
                    ok = st.checkbox(f"Import the {joined.n_matched:,} that match", key=f"predef_overlap_{file_key}")
                if st.button("Import into this run", type="primary", disabled=not ok, key="predef_import"):
                    names = save_to_run(run.path, joined)
                    st.success(f"Imported {md_escape(', '.join(joined.values.columns))} for {joined.n_matched:,} samples "
                               f"(this run now has predefined scores: {', '.join(names)}).")
            else:
                if id_col == NO_ID:
                    raise PredefinedError("without a run the file needs an id column")
                if label_col:
                    clean["label"] = df[label_col].str.strip().to_numpy()
                if path_col != "(none)" and image_root.strip():
                    if not resolve_user_path(image_root).is_dir():
                        raise PredefinedError(f"image folder {image_root.strip()!r} not found")
                    clean["path"] = df[path_col].str.strip().to_numpy()
                st.session_state["csv_only"] = {"name": source, "frame": clean, "sha": file_key,
                                                "suspicious": dict(clean.attrs.get("suspicious", {})),
                                                "root": str(resolve_user_path(image_root)) if "path" in clean else None}
                st.success(f"Loaded {len(clean):,} samples with scores {md_escape(', '.join(cols))} (no run needed).")
        except (PredefinedError, PathRefused) as exc:
            st.error(f"Cannot import: {md_escape(exc)}")

# ---- the scores to compare --------------------------------------------------------------------
frames: dict[str, np.ndarray] = {}
ends: dict[str, str] = {}  # which end of each score is suspicious
flagged = None
labels = None
ids = None
if run is not None:
    loaded = load_scores(run)
    if loaded is not None:
        scores, info, samples, classes = loaded
        for c in REGISTRY:
            if c in scores.columns and np.isfinite(scores[c].to_numpy(dtype=np.float64)).any():
                frames[c] = scores[c].to_numpy(dtype=np.float64)
                ends[c] = REGISTRY[c].suspicious
        flagged = scores["flagged"].to_numpy()
        labels = np.array(classes)[samples["label"].to_numpy()]
        ids = samples["sample_id"].to_numpy()
    imported = load_from_run(run.path)
    imported_ends = directions(run.path)
    for c in imported.columns:
        frames[f"csv:{c}"] = imported[c].to_numpy(dtype=np.float64)
        ends[f"csv:{c}"] = imported_ends.get(c, "high")
elif "csv_only" in st.session_state:
    only = st.session_state["csv_only"]
    f = only["frame"]
    st.info(f"No run selected: showing the scores of **{md_escape(only['name'])}** alone.")
    for c in f.columns:
        if c not in ("sample_id", "label", "path"):
            frames[c] = f[c].to_numpy(dtype=np.float64)
            ends[c] = only.get("suspicious", {}).get(c, "high")
    ids = f["sample_id"].to_numpy()
    labels = f["label"].to_numpy() if "label" in f else None
else:
    st.info("Start an audit on the **Audit** page, or import a CSV of scores above to compare its columns.")
    st.stop()

if not frames:
    st.info("No scores yet: the run has no finished epoch. Come back after the first epoch.")
    st.stop()

table = pd.DataFrame(frames)
names = list(table.columns)


def label(name: str) -> str:
    """A score's name with its suspicious end, wherever it is plotted or ranked."""
    return f"{name} ({ends[name]} = suspicious)"


def turned(df: pd.DataFrame) -> pd.DataFrame:
    """Each column turned so that higher = more suspicious (``scores.oriented``): for top-k sets and ranking only."""
    return pd.DataFrame({c: oriented(df[c].to_numpy(), c, ends[c]) for c in df.columns})
if run is not None:  # what the table is made of: the run's state and its imported scores
    predefined = run.path / PREDEFINED_FILE
    data_key = (stamp(run), predefined.stat().st_mtime_ns if predefined.is_file() else 0)
else:
    data_key = int(pd.util.hash_pandas_object(table, index=False).sum())


@st.cache_data(max_entries=16, show_spinner="Correlating…")
def cached_correlation(key: tuple, _table: pd.DataFrame, method: str) -> tuple[pd.DataFrame, int]:
    """``correlation_matrix`` of ``_table``, cached under ``key`` (data, columns) so reruns reuse it; above
    ``CORRELATION_ROWS`` rows, of a seeded random subset of that many (the matrix shows two decimals: a 200,000-row
    sample moves a coefficient by about 0.002, and ranking a million rows per score takes seconds)."""
    if len(_table) > CORRELATION_ROWS:
        _table = _table.iloc[subsample(len(_table), CORRELATION_ROWS)]
    return correlation_matrix(_table, method)


@st.cache_data(max_entries=16, show_spinner=False)
def cached_jaccard(key: tuple, _table: pd.DataFrame, k: int) -> pd.DataFrame:
    """``topk_jaccard`` of ``_table``, cached under ``key`` (data, columns)."""
    return topk_jaccard(_table, k)


if run is not None:
    with st.expander("Compute more scores (background job)"):
        jobs = job_manager()
        job = jobs.job(f"{run.id}:scores")
        missing = [n for n in EXTRA if n not in names]
        st.caption("These need extra training or fitting: CVLoss and self-confidence (k-fold out-of-sample "
                   "probabilities), prediction depth (k-NN probes, leave-one-out), transfer teacher (SVM on the "
                   "final model's features), random (a baseline).")
        pick = st.multiselect("Scores to compute", missing, default=missing, key="extra_pick")
        e1, e2 = st.columns(2)
        folds = e1.number_input("Folds (CVLoss, self-confidence)", 2, 10, 3, key="extra_folds")
        knn = e2.number_input("k of the k-NN probes (prediction depth)", 1, 200, 30, key="extra_k")
        busy = job is not None and not job.done
        if st.button("Compute in the background", disabled=busy or not pick or run.status().get("state") != "done"
                     or not may_run_audits(),
                     key="extra_go"):
            try:
                jobs.start_scores(run, pick, folds=int(folds), k=int(knn))
            except ValueError as exc:  # the run is busy: training here, or owned by another process
                st.error(f"Cannot compute now: {md_escape(exc)}")
            else:
                st.rerun()

        @st.fragment(run_every=1.0 if busy else None)
        def score_progress() -> None:
            j = jobs.job(f"{run.id}:scores")
            if j is None:
                return
            if not j.done:
                st.progress(j.progress, text=j.message or "queued")
                if st.button("Cancel", key="extra_cancel") and jobs.cancel(f"{run.id}:scores"):
                    st.toast("Cancelling after the current step; the scores table stays as it was.")
            elif j.error:
                st.error(f"Computing scores failed: {md_escape(j.error)}")
            elif j.cancel.is_set():
                st.info("Computing scores was cancelled; the scores table is unchanged.")
            elif busy:
                st.rerun()
            else:
                st.success(f"Computed {', '.join(j.score_args['names'])}.")

        score_progress()

if run is None:  # CSV alone: distributions and the ranked table
    st.subheader("Distributions")
    pick = st.selectbox("Score", names, key="csv_hist", format_func=label)
    v = table[pick].to_numpy()
    counts, edges = np.histogram(v[np.isfinite(v)], bins=60)
    fig = go.Figure(go.Bar(x=(edges[:-1] + edges[1:]) / 2, y=counts, width=edges[1] - edges[0]))
    fig.update_layout(height=300, xaxis_title=label(pick), yaxis_title="samples", margin=dict(t=10))
    st.plotly_chart(fig, width="stretch", key="csv-hist")
    st.subheader(f"Ranked by {label(pick)}, most suspicious first")
    ranked = pd.DataFrame({"sample_id": ids, **({"label": labels} if labels is not None else {}), **frames})
    order = np.argsort(-np.nan_to_num(oriented(table[pick].to_numpy(), pick, ends[pick]), nan=-np.inf), kind="stable")
    st.dataframe(ranked.iloc[order[:1000]], hide_index=True, width="stretch")
    only = st.session_state["csv_only"]
    if only.get("root"):
        from engine.ui import ImageError, read_under_root, thumbnail_png

        st.subheader(f"Hardest by {pick}: images")
        top = order[:18]
        paths = only["frame"]["path"].to_numpy()
        row = st.columns(6)
        for n, i in enumerate(top):
            col = row[n % 6]
            try:
                col.image(thumbnail_png(read_under_root(only["root"], paths[i]), 96),
                          caption=f"{ids[i]} · {table[pick].iat[i]:.3g}")
            except ImageError as exc:
                col.caption(f"{ids[i]}: {exc}")

st.subheader("Correlation between scores")
c1, c2 = st.columns([3, 1])
# Every score by default; the user's choice is kept across reruns and visits ("corr_selection"), and a score
# imported or computed since starts out selected.
previous, known = st.session_state.get("corr_selection"), st.session_state.get("corr_known", [])
default = names if previous is None else [n for n in names if n in previous or n not in known]
chosen = c1.multiselect("Scores", names, default=default, format_func=label,
                        key=f"corr_scores_{hashlib.md5(str(names).encode()).hexdigest()[:8]}")
st.session_state["corr_selection"], st.session_state["corr_known"] = list(chosen), list(names)
method = c2.selectbox("Method", METHODS, key="corr_method", help="Spearman (rank) is the default, as aucurriculum")
if len(chosen) >= 2:
    corr, used = cached_correlation((data_key, tuple(chosen)), table[chosen], method)
    shown = corr.rename(index=label, columns=label)
    heat = px.imshow(shown, text_auto=".2f", zmin=-1, zmax=1, color_continuous_scale="RdBu", aspect="auto")
    heat.update_layout(height=120 + 45 * len(chosen), margin=dict(t=20))
    st.plotly_chart(heat, width="stretch", key="corr-heat")
    note = f"over the {used:,} samples where every chosen score exists"
    if used < len(table) and (method == "kendall" or len(table) > CORRELATION_ROWS):
        note += f" (a seeded random subset of the {len(table):,} samples)"
    st.caption(f"{method.capitalize()} correlation of the scores' own values {note}. Two scores that agree on "
               "which samples are suspicious correlate positively when their suspicious ends match (aum and "
               "confidence: both low) and negatively when they differ (aum low, ce_loss high).")

    st.markdown("**One pair, sample by sample** (the heatmap is not clickable: pick the pair here)")
    p1, p2 = st.columns(2)
    x_name = p1.selectbox("x", chosen, index=0, key="pair_x", format_func=label)
    y_name = p2.selectbox("y", chosen, index=1, key="pair_y", format_func=label)
    sel = subsample(len(table), 20_000)  # as the data map: more points draw more slowly, not more clearly
    scatter = go.Figure()
    groups = [("flagged", flagged[sel], "#e45756"), ("not flagged", ~flagged[sel], "#4c78a8")] if flagged is not None \
        else [("samples", np.ones(sel.size, dtype=bool), "#4c78a8")]
    for name, m, color in groups:
        idx = sel[m]
        # customdata: the sample's row, so that a click opens it on the Flagged page (with a run)
        scatter.add_trace(go.Scattergl(x=table[x_name].to_numpy()[idx], y=table[y_name].to_numpy()[idx], mode="markers",
                                       name=name, marker=dict(size=4, color=color, opacity=0.6), customdata=idx,
                                       hovertemplate="%{x:.4g}, %{y:.4g}" + ("<br>click to review" if run else "")
                                       + "<extra>" + name + "</extra>"))
    scatter.update_layout(height=420, xaxis_title=label(x_name), yaxis_title=label(y_name), margin=dict(t=10))
    if run is not None:
        st.plotly_chart(scatter, width="stretch", key="pair-scatter", on_select=lambda: open_clicked("pair-scatter"),
                        selection_mode="points")
        st.caption("Click a point to review that sample on the Flagged page.")
    else:
        st.plotly_chart(scatter, width="stretch", key="pair-scatter")
    if sel.size < len(table):
        st.caption(f"A random {sel.size:,} of {len(table):,} samples are drawn.")

    st.markdown("**Agreement of the most suspicious samples** (Jaccard overlap of the k most suspicious by each "
                "score, at its own suspicious end)")
    default_k = int(flagged.sum()) if flagged is not None and flagged.sum() else max(1, len(table) // 10)
    k = st.number_input("k", 1, len(table), min(default_k, len(table)), key="topk")
    jac = cached_jaccard((data_key, tuple(chosen)), turned(table[chosen]), int(k))
    jh = px.imshow(jac.rename(index=label, columns=label), text_auto=".2f", zmin=0, zmax=1, color_continuous_scale="Blues", aspect="auto")
    jh.update_layout(height=120 + 45 * len(chosen), margin=dict(t=20))
    st.plotly_chart(jh, width="stretch", key="jaccard-heat")
else:
    st.caption("Choose at least two scores.")
