"""Flagged samples: browse the lowest-ranked samples with their images, decide, export."""

from __future__ import annotations

import uuid

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import streamlit as st

from app_pages.common import image_grid, natural_aum, require_run, require_scores, sample_images, stamp
from engine.export import export_filename, export_frame, to_csv_bytes
from engine.images import ImageError
from engine.reviews import ReviewStore
from engine.scores import REGISTRY
from engine.views import first_kept_pass, nearest_neighbours

DECISION_LABELS = {"mislabeled": "🔁 relabel", "correct": "✅ correct", "remove": "🗑️ remove", "unsure": "❔ unsure"}

st.title("🏷️ Flagged samples")
run = require_run("The flagged samples page")
scores, info, samples, classes = require_scores(run, "the flagged list")
key = stamp(run)
state = run.status().get("state")
if state != "done":
    st.warning(f"This run is **{state}**: ranks and flags come from the epochs finished so far, and exports say so.")
session = st.session_state.setdefault("review_session", uuid.uuid4().hex[:12])
store = ReviewStore(run.path)


@st.cache_resource(max_entries=2)
def features_of(run_key: tuple) -> np.ndarray | None:
    path = run.path / "features.npy"
    return np.load(path, mmap_mode="r") if path.is_file() else None


def decide(sample_ids: list[str], decision: str, labels: list[str | None]) -> None:
    store.record_many([(s, decision, lab) for s, lab in zip(sample_ids, labels, strict=True)], session=session)


# ---- the selection -----------------------------------------------------------------------
decisions = store.current().set_index("sample_id")
ids = samples["sample_id"].to_numpy()
labels = samples["label"].to_numpy()
suggested = scores["suggested_label"].to_numpy()
flagged = scores["flagged"].to_numpy()
reviewed = np.isin(ids, decisions.index.to_numpy()) if len(decisions) else np.zeros(len(ids), dtype=bool)

score_cols = [c for c in REGISTRY if c in scores.columns]
f = st.columns([2, 2, 2, 3, 3])
rank_by = f[0].selectbox("Rank by (higher = more suspicious)", score_cols, key="rank_by",
                         format_func=lambda c: f"{c}: {REGISTRY[c].title}")
show = f[1].selectbox("Show", ["flagged", "not flagged", "all"], key="flt_flagged")
review = f[2].selectbox("Review", ["all", "not reviewed", "reviewed"], key="flt_review")
given = f[3].multiselect("Given label", classes, key="flt_given")
sugg = f[4].multiselect("Suggested label", classes, key="flt_sugg")

mask = np.ones(len(ids), dtype=bool)
if show != "all":
    mask &= flagged if show == "flagged" else ~flagged
if review != "all":
    mask &= reviewed if review == "reviewed" else ~reviewed
if given:
    mask &= np.isin(labels, [classes.index(c) for c in given])
if sugg:
    mask &= np.isin(suggested, [classes.index(c) for c in sugg])
sel = np.flatnonzero(mask)
order_score = np.nan_to_num(scores[rank_by].to_numpy(dtype=np.float64)[sel], nan=-np.inf)
sel = sel[np.argsort(-order_score, kind="stable")]

# ---- progress ------------------------------------------------------------------------------
n_flagged = int(flagged.sum())
p = st.columns(3)
p[0].metric("Reviewed / flagged", f"{int((reviewed & flagged).sum()):,} / {n_flagged:,}")
p[1].metric("Decisions in total", f"{len(decisions):,}")
true = samples["true_label"].to_numpy()
if (true >= 0).all() and len(decisions):
    idx = pd.Index(ids).get_indexer(decisions.index)
    d = decisions["decision"].to_numpy()
    new = decisions["new_label"].to_numpy()
    wrong = labels[idx] != true[idx]
    true_names = np.array(classes)[true[idx]]
    agree = np.where(d == "correct", ~wrong, np.where(d == "remove", wrong,
                     np.where(d == "mislabeled", wrong & (new == true_names), False)))
    decided = d != "unsure"
    p[2].metric("Decisions agreeing with the known labels", f"{int(agree[decided].sum())} of {int(decided.sum())}")

# ---- paging --------------------------------------------------------------------------------
g = st.columns([1, 1, 2, 4])
view = g[0].radio("View", ["Cards", "Table"], key="view", horizontal=True)
per_page = g[1].selectbox("Per page", [12, 24, 48], key="per_page")
pages = max(1, -(-len(sel) // per_page))
page_no = g[2].number_input(f"Page (of {pages})", 1, pages, 1, key="page_no")
page_idx = sel[(page_no - 1) * per_page : page_no * per_page]
g[3].caption(f"{len(sel):,} samples match; showing {len(page_idx)} ranked by **{rank_by}**.")
if len(sel) == 0:
    st.info("No sample matches these filters. Widen them (Show: all, Review: all) to see more.")

aum = natural_aum(scores)
others = [c for c in score_cols if c not in ("aum",)]


def card_text(i: int) -> str:
    sug = classes[suggested[i]] if suggested[i] >= 0 else "?"
    lines = [f"**{ids[i]}**", f"label **{classes[labels[i]]}** → suggested **{sug}**",
             f"AUM {aum[i]:.2f} · rank {int(scores['rank'].iat[i]):,}" + (" · 🚩" if flagged[i] else "")]
    extra = " · ".join(f"{c} {scores[c].iat[i]:.2f}" for c in others[:3] if np.isfinite(scores[c].iat[i]))
    if extra:
        lines.append(f"<small>{extra}</small>")
    if ids[i] in decisions.index:
        row = decisions.loc[ids[i]]
        lines.append(f"decision: **{DECISION_LABELS[row['decision']]}**"
                     + (f" → {row['new_label']}" if row["decision"] == "mislabeled" else ""))
    return "  \n".join(lines)


images = sample_images(run)

if view == "Cards":
    cols_per_row = 4
    for start in range(0, len(page_idx), cols_per_row):
        row = st.columns(cols_per_row)
        for col, i in zip(row, page_idx[start : start + cols_per_row], strict=False):
            with col.container(border=True):
                try:
                    st.image(images.png(i, 112), width="stretch")
                except ImageError as exc:
                    st.caption(f"no image: {exc}")
                st.markdown(card_text(i), unsafe_allow_html=True)
                sid = ids[i]
                new_key = f"new-{sid}"
                default = int(suggested[i]) if suggested[i] >= 0 else int(labels[i])
                st.selectbox("Relabel to", classes, index=default, key=new_key, label_visibility="collapsed")
                b = st.columns(2)
                b[0].button("Relabel", key=f"mis-{sid}", on_click=lambda s=sid, k=new_key: decide(
                    [s], "mislabeled", [st.session_state[k]]))
                b[1].button("Correct", key=f"ok-{sid}", on_click=decide, args=([sid], "correct", [None]))
                b[0].button("Remove", key=f"rm-{sid}", on_click=decide, args=([sid], "remove", [None]))
                b[1].button("Unsure", key=f"un-{sid}", on_click=decide, args=([sid], "unsure", [None]))
else:
    table = pd.DataFrame({
        "sample_id": ids[sel], "label": np.array(classes)[labels[sel]],
        "suggested_label": np.array(classes + ["?"])[suggested[sel]], "aum (natural)": aum[sel],
        **{c: scores[c].to_numpy()[sel] for c in others}, "rank": scores["rank"].to_numpy()[sel],
        "flagged": flagged[sel], "decision": decisions["decision"].reindex(ids[sel]).to_numpy() if len(decisions) else None,
    })
    if len(table) > 10_000:
        st.caption(f"The table shows the first 10,000 of {len(table):,} rows.")
    st.dataframe(table.head(10_000), hide_index=True, width="stretch")

# ---- bulk -----------------------------------------------------------------------------------


def bulk_rows(indices: np.ndarray, decision: str) -> tuple[list[str], list[str | None]]:
    """Sample ids and new labels for a bulk decision (relabel = to each sample's suggested label, when it has one)."""
    if decision != "mislabeled":
        return [ids[i] for i in indices], [None] * len(indices)
    keep = [i for i in indices if suggested[i] >= 0]
    return [ids[i] for i in keep], [classes[suggested[i]] for i in keep]


if len(page_idx):
    b = st.columns([2, 2, 2])
    bulk = b[0].selectbox("Mark several samples as", list(DECISION_LABELS), key="bulk",
                          format_func=lambda d: DECISION_LABELS[d] + (" (to its suggested label)" if d == "mislabeled" else ""))
    on_page = bulk_rows(page_idx, bulk)
    b[1].button(f"Apply to the {len(on_page[0])} samples on this page", key="bulk-apply",
                on_click=decide, args=(*on_page[:1], bulk, on_page[1]))
    matching = bulk_rows(sel, bulk)
    b[2].button(f"Apply to all {len(matching[0]):,} matching the filters", key="bulk-apply-all",
                on_click=decide, args=(matching[0], bulk, matching[1]))

# ---- one sample, closer ----------------------------------------------------------------------
st.subheader("Look closer")
if len(page_idx):
    pick = st.selectbox("Sample", [ids[i] for i in page_idx], key="closer")
    i = int(page_idx[[ids[j] for j in page_idx].index(pick)])
    c1, c2 = st.columns([1, 2])
    try:
        c1.image(images.png(i, 256))
    except ImageError as exc:
        c1.caption(f"no image: {exc}")
    c1.markdown(card_text(i), unsafe_allow_html=True)
    kept = first_kept_pass(run)[i]
    if kept >= 0:
        m = np.asarray(run.dynamics(int(kept), "margin")[:, i])
        fig = go.Figure(go.Scatter(x=np.arange(m.size), y=m, mode="lines+markers", name="margin"))
        fig.add_hline(y=0, line_dash="dot")
        fig.update_layout(height=260, xaxis_title="epoch", yaxis_title="margin", margin=dict(t=10, b=30))
        c2.plotly_chart(fig, width="stretch", key="closer-margin")
    feats = features_of(key)
    if feats is None:
        st.caption("Nearest neighbours appear when the audit has finished (they use the final model's features).")
    else:
        for title, cls in [("Nearest samples labelled as its given class", labels[i]),
                           ("Nearest samples labelled as its suggested class", suggested[i])]:
            if cls < 0:
                continue
            nn = nearest_neighbours(feats, np.flatnonzero(labels == cls), i, k=6)
            st.caption(f"{title} (**{classes[cls]}**), by penultimate-layer features")
            image_grid(images, nn, [f"{ids[j]} · AUM {aum[j]:.1f}" for j in nn])

# ---- export ------------------------------------------------------------------------------------
st.subheader("Export")
if state != "done":
    st.warning(f"The run is {state}: exported files are marked PARTIAL in their names.")
e = st.columns(3)
for col, kind, label in [(e[0], "flagged", "Flagged list with scores and decisions"),
                         (e[1], "manifest", "Cleaned manifest (path,label)"),
                         (e[2], "decisions", "Decisions only")]:
    col.download_button(f"⬇️ {label}", data=lambda kind=kind: to_csv_bytes(export_frame(run, kind)),
                        file_name=export_filename(run, kind), mime="text/csv", key=f"dl-{kind}", on_click="ignore")
st.caption("Cleaned manifest: every sample not marked *remove*, with *relabel* decisions applied; paths are relative "
           "to the dataset root, so save it there and audit it again with `--dataset <root>/manifest.csv`.")
