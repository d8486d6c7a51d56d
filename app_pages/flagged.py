"""Flagged samples: see where the suspects are, review them at keyboard speed, export.

Values from the dataset (sample ids, class names, new labels) are shown as plain text: escaped markdown,
dataframe cells or Plotly text, never HTML. A decision reruns only the review fragment; the decisions of
every sample are arrays kept in step with the review store (``DecisionArrays``), so one decision costs
the same at a million samples as at a thousand (bench/decision_latency.py).
"""

from __future__ import annotations

import base64
import os
import sys
import time
import uuid

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import streamlit as st

from app_pages.common import (
    current_reviewer,
    fmt_num,
    md_escape,
    natural_aum,
    plot_text,
    require_run,
    require_scores,
    sample_images,
    stamp,
)
from engine.ui import (
    DECISION_CODES,
    REGISTRY,
    DecisionArrays,
    ImageError,
    ReviewStore,
    agreement,
    available_scores,
    cleaned_zip,
    direction_label,
    export_bytes,
    export_filename,
    first_kept_pass,
    label_matrix,
    nearest_neighbours,
    new_batch_id,
    oriented,
    per_class_table,
    score_values,
    suspicious_of,
    to_csv_bytes,
)

# decision -> (button label, badge colour, material icon, shortcut of the focused sample's button)
DECISIONS = {
    "mislabeled": ("Relabel", "orange", ":material/swap_horiz:", "S"),
    "correct": ("Keep", "green", ":material/check:", "K"),
    "remove": ("Remove", "red", ":material/delete:", "X"),
    "unsure": ("Unsure", "gray", ":material/help:", "U"),
}
CODE_NAMES = {code: name for name, code in DECISION_CODES.items()}
TABLE_ROWS = 200  # rows of the editable table (with thumbnails)

st.title(":material/flag: Flagged samples")
run = require_run("The flagged samples page")
scores, info, samples, classes = require_scores(run, "the flagged list")
key = stamp(run)
state = run.status().get("state")
if state != "done":
    st.warning(f"This run is **{state}**: ranks and flags come from the epochs finished so far, and exports say so.")
session = st.session_state.setdefault("review_session", uuid.uuid4().hex[:12])
store = ReviewStore(run.path)

ids = samples["sample_id"].to_numpy()
labels = samples["label"].to_numpy()
suggested = scores["suggested_label"].to_numpy()
flagged = scores["flagged"].to_numpy()
class_arr = np.array(classes, dtype=object)
aum = natural_aum(scores)
score_cols = [c for c in REGISTRY if c in scores.columns]
others = [c for c in score_cols if c != "aum"]
columns = {c: scores[c].to_numpy() for c in [*others, "rank"]}  # numpy views: a card reads a few values each


@st.cache_resource(max_entries=2)
def decision_arrays(run_key: tuple) -> DecisionArrays:
    """The current decision of every sample, shared by every session (``sync`` reads only new history rows)."""
    return DecisionArrays(ReviewStore(run_key[0]), pd.Index(ids), classes)


@st.cache_resource(max_entries=2)
def features_of(run_key: tuple) -> np.ndarray | None:
    path = run.path / "features.npy"
    return np.load(path, mmap_mode="r") if path.is_file() else None


@st.cache_resource(max_entries=2)
def kept_pass(run_key: tuple) -> np.ndarray:
    """For each sample, the pass whose margins are about its given label (read once per run state)."""
    return first_kept_pass(run)


@st.cache_data(max_entries=4, show_spinner=False)
def agreement_summary(run_path: str, last_id: int) -> pd.DataFrame:
    return agreement(ReviewStore(run_path).by_reviewer())


@st.cache_data(max_entries=4, show_spinner=False)
def ranking_choices(run_key: tuple) -> list[str]:
    """The scores 'Rank by' offers (``available_scores``): the registry's, then the run's imported ``csv:`` ones."""
    return available_scores(run, scores)


@st.cache_resource(max_entries=8, show_spinner=False)
def _suspicion(run_key: tuple, name: str) -> np.ndarray:
    values = score_values(run, scores, name)
    if values is None:
        return np.full(len(ids), -np.inf)
    return np.nan_to_num(oriented(values, name, suspicious_of(run, name)), nan=-np.inf)


def suspicion(name: str) -> np.ndarray:
    """Values of score ``name`` (a column or an imported ``csv:`` score) turned so that higher = more suspicious:
    the one place this page ranks (cached per run state: shared, read-only)."""
    return _suspicion(key, name)


def choice_label(name: str) -> str:
    spec = REGISTRY.get(name)
    return f"{name} ({spec.direction}): {spec.title}" if spec else f"{direction_label(run, name)}: imported from a CSV"


arr = decision_arrays((str(run.path), len(ids)))
arr.sync()


# ---- who is reviewing ----------------------------------------------------------------------------
def reviewer_name() -> str:
    """The signed-in user when sign-in is configured, else the name typed in the sidebar (kept in the URL)."""
    return current_reviewer(st.session_state.get("_reviewer", "")) or ""


def _keep_reviewer() -> None:
    st.session_state["_reviewer"] = st.session_state["reviewer"].strip()


if "_reviewer" not in st.session_state:
    st.session_state["_reviewer"] = st.query_params.get("reviewer", "")
if "reviewer" not in st.session_state:
    st.session_state["reviewer"] = st.session_state["_reviewer"]
with st.sidebar:
    st.text_input("Reviewer name", key="reviewer", on_change=_keep_reviewer, placeholder="your name",
                  help="Recorded with each decision, so the page can show where two reviewers agree.")
if reviewer_name():
    st.query_params["reviewer"] = reviewer_name()


# ---- decisions (callbacks: they run before the rerun they cause) -----------------------------------------------
def say(text: str, icon: str) -> None:
    """Said by the review panel's status line from its next run on (a callback must not draw elements itself).

    A line in the page, not a toast: Streamlit pops a toast up at the top right for 4 s, over the buttons of the
    gallery's right-hand cards, and a click meant for one of them went to the toast (the decision was lost).
    Errors are rare and must be seen wherever the reviewer is scrolled: they are also toasted.
    """
    st.session_state["_say"] = (str(run.path), md_escape(text), icon)
    if icon == ":material/error:":
        st.session_state["_say_toast"] = (md_escape(text), icon)


def record(indices: np.ndarray, decision: str, new_labels: list[str | None], what: str) -> None:
    """Save one step (a batch) and remember it for undo."""
    st.session_state["_decided_at"] = (time.perf_counter(), time.thread_time())
    batch = new_batch_id()
    try:
        n = store.record_many([(ids[i], decision, lab) for i, lab in zip(indices, new_labels, strict=True)],
                              session=session, reviewer=reviewer_name() or None, batch=batch)
    except ValueError as exc:  # ReviewError: the database stayed busy, an unknown id or class
        say(f"{what}: not saved ({exc})", ":material/error:")
        return
    arr.sync()
    st.session_state.setdefault("undo_stack", []).append((batch, what, int(indices[0]) if len(indices) else None))
    say(f"{what}: {fmt_num(n)} sample(s). Undo with Z.", ":material/done:")


def relabel_targets(indices: np.ndarray) -> tuple[np.ndarray, list[str]]:
    """Samples that have a suggested label, and that label (relabel-to-suggested skips the others)."""
    keep = indices[suggested[indices] >= 0]
    return keep, [classes[suggested[i]] for i in keep]


def decide_one(i: int, decision: str, new_label: str | None = None, advance: bool = True) -> None:
    if decision == "mislabeled" and new_label is None:
        if suggested[i] < 0:
            say("This sample has no suggested label: pick a class under Relabel to.", ":material/error:")
            return
        new_label = classes[suggested[i]]
    record(np.array([i]), decision, [new_label], f"{DECISIONS[decision][0]} {ids[i]}")
    if advance:
        focus_next_undecided(i)


def undo_last() -> None:
    stack = st.session_state.get("undo_stack", [])
    if not stack:
        say("Nothing to undo in this session.", ":material/info:")
        return
    batch, what, first = stack.pop()
    n = store.undo(batch, session=session, reviewer=reviewer_name() or None)
    arr.sync()
    if first is not None:
        set_focus(first)
    say(f"Undone: {what} ({fmt_num(n)} sample(s) restored).", ":material/undo:")


def set_focus(i: int) -> None:
    st.session_state["focus"] = int(i)
    sel = st.session_state.get("_sel")
    if sel is not None:
        pos = np.flatnonzero(sel == i)
        if pos.size:
            st.session_state["page_no"] = int(pos[0]) // st.session_state.get("per_page", 12) + 1


def focus_next_undecided(after: int) -> None:
    sel = st.session_state.get("_sel")
    if sel is None or sel.size == 0:
        return
    pos = np.flatnonzero(sel == after)
    start = int(pos[0]) + 1 if pos.size else 0
    order = np.concatenate([sel[start:], sel[:start]])
    todo = order[arr.code[order] == 0]
    set_focus(int(todo[0]) if todo.size else int(order[0]))


def step(delta: int) -> None:
    sel = st.session_state.get("_sel")
    if sel is None or sel.size == 0:
        return
    pos = np.flatnonzero(sel == st.session_state.get("focus", -1))
    set_focus(int(sel[(int(pos[0]) + delta) % sel.size]) if pos.size else int(sel[0]))


def filter_by_cell() -> None:
    """A click on a matrix cell filters the gallery to its given and suggested label."""
    points = st.session_state["label-matrix"]["selection"]["points"]
    if points:
        g, s = points[0]["y"], points[0]["x"]  # the matrix's axes are class indices (ticks show the names)
        st.session_state.update(flt_given=[classes[int(g)]], flt_sugg=[classes[int(s)]], flt_flagged="flagged",
                                page_no=1)


# ---- where the flagged samples come from -------------------------------------------------------------
n_flagged = int(flagged.sum())
k = len(classes)
with st.expander(f":material/grid_on: Given vs suggested label of the {fmt_num(n_flagged)} flagged samples",
                 expanded=True):
    m = label_matrix(labels, suggested, flagged, k)
    g_idx, s_idx = np.nonzero(m)
    c1, c2 = st.columns([3, 2])
    with c1:
        if g_idx.size == 0:
            st.info("No flagged sample has a suggested label yet.")
        else:
            counts = m[g_idx, s_idx]
            side = min(640, 140 + 32 * k)
            fig = go.Figure(go.Scatter(
                x=s_idx, y=g_idx, mode="markers+text" if k <= 20 else "markers",
                marker=dict(symbol="square", size=max(6, int((side - 120) / k * 0.9)), color=np.log1p(counts),
                            colorscale="Viridis", showscale=False, line=dict(width=0)),
                text=[fmt_num(int(c)) for c in counts],
                textfont=dict(size=11, color=np.where(np.log1p(counts) > 0.6 * np.log1p(counts.max()), "black", "white")),
                hovertext=[f"given {plot_text(classes[g])} → suggested {plot_text(classes[s])}: {fmt_num(int(c))}"
                           for g, s, c in zip(g_idx, s_idx, counts, strict=True)],
                hoverinfo="text",
            ))
            ticks = dict(tickmode="array", tickvals=list(range(k)), ticktext=[plot_text(c, 24) for c in classes],
                         range=[-0.5, k - 0.5], showgrid=False, zeroline=False)
            fig.update_layout(height=side, margin=dict(t=10, b=40, l=10, r=10), dragmode=False,
                              xaxis=dict(title="suggested label", **ticks), yaxis=dict(title="given label", autorange=None,
                                                                                      **{**ticks, "range": [k - 0.5, -0.5]}))
            st.plotly_chart(fig, width="stretch", key="label-matrix", on_select=filter_by_cell,
                            selection_mode="points", config={"displayModeBar": False})
            st.caption("Click a cell to show its samples in the gallery below.")
    with c2:
        table = per_class_table(labels, suggested, flagged, classes)
        st.dataframe(table, hide_index=True, width="stretch", height=min(420, 38 + 35 * k), column_config={
            "count": st.column_config.NumberColumn(format="localized"),
            "flagged": st.column_config.NumberColumn(format="localized"),
            "noise_rate": st.column_config.NumberColumn("est. noise rate", format="percent",
                                                        help="flagged / count: the share of the class the audit suspects"),
            "most_confused": st.column_config.TextColumn("most confused with"),
            "confused_count": st.column_config.NumberColumn("how often", format="localized"),
        })
        st.download_button(":material/download: Per-class table (CSV)", data=lambda t=table: to_csv_bytes(t),
                           file_name=f"{run.id}-per-class.csv", mime="text/csv", key="dl-per-class", on_click="ignore")

# ---- the selection -----------------------------------------------------------------------------------
f = st.columns([2, 2, 2, 3, 3])
rank_by = f[0].selectbox("Rank by (most suspicious first)", ranking_choices(key), key="rank_by", format_func=choice_label)
show = f[1].selectbox("Show", ["flagged", "not flagged", "all"], key="flt_flagged")
review = f[2].selectbox("Review", ["all", "not reviewed", "reviewed"], key="flt_review")
given = f[3].multiselect("Given label", classes, key="flt_given")
sugg = f[4].multiselect("Suggested label", classes, key="flt_sugg")

mask = np.ones(len(ids), dtype=bool)
if show != "all":
    mask &= flagged if show == "flagged" else ~flagged
if review != "all":
    mask &= (arr.code > 0) if review == "reviewed" else (arr.code == 0)
if given:
    mask &= np.isin(labels, [classes.index(c) for c in given])
if sugg:
    mask &= np.isin(suggested, [classes.index(c) for c in sugg])
sel = np.flatnonzero(mask)
sel = sel[np.argsort(-suspicion(rank_by)[sel], kind="stable")]
st.session_state["_sel"] = sel
signature = (key, rank_by, show, review, tuple(given), tuple(sugg))
if "_open" in st.session_state:  # a sample opened from another page (data map, OoD scatter)
    set_focus(st.session_state.pop("_open"))
    st.session_state["_sig"] = signature
elif st.session_state.get("_sig") != signature or "focus" not in st.session_state:
    st.session_state["_sig"] = signature
    todo = sel[arr.code[sel] == 0]
    if sel.size:
        set_focus(int(todo[0]) if todo.size else int(sel[0]))

agree = agreement_summary(str(run.path), arr.seen)
if len(agree):
    n_agree = int(agree["agree"].sum())
    st.caption(f":material/group: {fmt_num(len(agree))} samples were decided by two or more reviewers: "
               f"{fmt_num(n_agree)} agree, {fmt_num(len(agree) - n_agree)} disagree (their cards say who decided what).")


# ---- one card ------------------------------------------------------------------------------------------
def decision_badge(i: int) -> None:
    code = int(arr.code[i])
    if code == 0:
        st.badge("Not decided", icon=":material/radio_button_unchecked:", color="gray")
        return
    name = CODE_NAMES[code]
    label, color, icon, _ = DECISIONS[name]
    if name == "mislabeled":
        target = classes[arr.new_label[i]] if arr.new_label[i] >= 0 else "?"
        label = f"{label} → {md_escape(target)}"
    st.badge(label, icon=icon, color=color)


def agreement_of(sample_ids: list[str]) -> dict[str, tuple[int, bool, str]]:
    """For the samples shown: reviewers, agree, detail, where two or more named reviewers decided."""
    a = agreement(store.by_reviewer(sample_ids))
    return {s: (int(n), bool(ok), d) for s, n, ok, d in zip(a["sample_id"], a["reviewers"], a["agree"], a["detail"],
                                                           strict=True)}


def agreement_badge(agree: dict, i: int) -> None:
    if ids[i] not in agree:
        return
    n, ok, detail = agree[ids[i]]
    if ok:
        st.badge(f"{n} reviewers agree", icon=":material/thumb_up:", color="green", help=md_escape(detail))
    else:
        st.badge(f"{n} reviewers disagree", icon=":material/warning:", color="red", help=md_escape(detail))


def describe(i: int) -> str:
    sug = md_escape(classes[suggested[i]]) if suggested[i] >= 0 else "?"
    extra = " · ".join(f"{c} {fmt_num(columns[c][i])}" for c in others[:3] if np.isfinite(columns[c][i]))
    return (f"**{md_escape(ids[i])}**  \nlabel **{md_escape(classes[labels[i]])}** → suggested **{sug}**  \n"
            f"AUM {fmt_num(aum[i])} · rank {fmt_num(int(columns['rank'][i]))}" + (" · flagged" if flagged[i] else "")
            + (f"  \n{extra}" if extra else ""))


def show_image(images, i: int, size: int) -> None:
    try:
        st.image(images.png(i, size), width="stretch" if size < 200 else size, output_format="PNG")
    except ImageError as exc:
        st.caption(f"no image: {md_escape(exc)}")


def thumb_url(images, i: int) -> str | None:
    try:
        return "data:image/png;base64," + base64.b64encode(images.png(int(i), 48)).decode()
    except ImageError:
        return None


# ---- the review fragment: a decision reruns only this -------------------------------------------------------------
@st.fragment
def review_panel(sel: np.ndarray) -> None:
    images = sample_images(run)
    if "_say_toast" in st.session_state:
        text, icon = st.session_state.pop("_say_toast")
        st.toast(text, icon=icon)
    said = st.session_state.get("_say")
    with st.container(key="review-status"):  # one line, always there: the layout below does not move
        if said and said[0] == str(run.path):
            st.caption(f"{said[2]} {said[1]}")
        else:
            st.caption(":material/info: Each decision is saved as you click; Z undoes the last step.")
    reviewed = arr.code > 0
    p = st.columns(4)
    p[0].metric("Reviewed / flagged", f"{fmt_num(int(np.count_nonzero(reviewed & flagged)))} / {fmt_num(n_flagged)}")
    p[1].metric("Decisions in total", fmt_num(int(np.count_nonzero(reviewed))))
    p[2].metric("Matching the filters", fmt_num(int(sel.size)))
    true = samples["true_label"].to_numpy()
    if (true >= 0).all() and reviewed.any():
        d = arr.code[reviewed]
        wrong = (labels != true)[reviewed]
        right_new = arr.new_label[reviewed] == true[reviewed]
        ok = np.where(d == DECISION_CODES["correct"], ~wrong, np.where(d == DECISION_CODES["remove"], wrong,
                      np.where(d == DECISION_CODES["mislabeled"], wrong & right_new, False)))
        decided = d != DECISION_CODES["unsure"]
        p[3].metric("Agreeing with the known labels", f"{fmt_num(int(ok[decided].sum()))} of {fmt_num(int(decided.sum()))}")
    if sel.size == 0:
        st.info("No sample matches these filters. Widen them (Show: all, Review: all) to see more.")
        return

    focus = int(st.session_state.get("focus", sel[0]))
    # ---- the focused sample, large, with the keyboard ------------------------------------------------------------
    with st.container(border=True, key="focus-card"):
        pos = np.flatnonzero(sel == focus)
        where = f"{fmt_num(int(pos[0]) + 1)} of {fmt_num(sel.size)}" if pos.size else "not in the current filter"
        st.subheader(f":material/center_focus_strong: Focused sample ({where})")
        c1, c2 = st.columns([1, 2])
        with c1:
            show_image(images, focus, 256)
        with c2:
            decision_badge(focus)
            agreement_badge(agreement_of([ids[focus]]), focus)
            st.markdown(describe(focus))
            b = st.columns(4)
            for col, name in zip(b, DECISIONS, strict=True):
                label, _, icon, shortcut = DECISIONS[name]
                col.button(label, icon=icon, key=f"key-{name}", shortcut=shortcut, width="stretch",
                           help="Relabel to the suggested label" if name == "mislabeled" else None,
                           on_click=decide_one, args=(focus, name))
            b = st.columns(4)
            b[0].button("Previous", icon=":material/arrow_back:", key="key-prev", shortcut="P", width="stretch",
                        on_click=step, args=(-1,))
            b[1].button("Next", icon=":material/arrow_forward:", key="key-next", shortcut="N", width="stretch",
                        on_click=step, args=(1,))
            b[2].button("Undo", icon=":material/undo:", key="key-undo", shortcut="Z", width="stretch",
                        on_click=undo_last, disabled=not st.session_state.get("undo_stack"))
            r = st.columns([3, 2])
            default = int(suggested[focus]) if suggested[focus] >= 0 else int(labels[focus])
            target = r[0].selectbox("Relabel to", classes, index=default, key=f"relabel-to-{focus}")
            r[1].button("Relabel to this class", icon=":material/swap_horiz:", key="relabel-chosen", width="stretch",
                        on_click=lambda: decide_one(focus, "mislabeled", target))
            st.caption("Keys: S relabel to suggested · K keep · X remove · U unsure · N next · P previous · Z undo. "
                       "After a decision the next undecided sample is focused.")
        kept = kept_pass(key)[focus]
        if kept >= 0:
            mg = np.asarray(run.dynamics(int(kept), "margin")[:, focus])
            fig = go.Figure(go.Scatter(x=np.arange(mg.size), y=mg, mode="lines+markers", name="margin"), layout=dict(
                height=200, xaxis=dict(title="epoch", tickformat="d", dtick=max(1, mg.size // 10)),
                yaxis=dict(title="margin", zeroline=True, zerolinecolor="gray"),
                margin=dict(t=10, b=30)))
            st.plotly_chart(fig, width="stretch", key="focus-margin", config={"displayModeBar": False})
        if st.toggle("Nearest neighbours", key="show_nn", value=len(ids) <= 200_000,
                     help="Samples closest in the final model's penultimate features; click Open to focus one."):
            feats = features_of(key)
            if feats is None:
                st.caption("Nearest neighbours appear when the audit has finished (they use the final model's features).")
            else:
                for n_list, (title, cls) in enumerate([("labelled as its given class", labels[focus]),
                                                       ("labelled as its suggested class", suggested[focus])]):
                    if cls < 0:
                        continue
                    nn = nearest_neighbours(feats, np.flatnonzero(labels == cls), focus, k=6)
                    st.caption(f"Nearest samples {title} ({md_escape(classes[cls])})")
                    cols = st.columns(6)
                    for col, j in zip(cols, nn, strict=False):
                        with col:
                            show_image(images, int(j), 96)
                            st.caption(f"{md_escape(ids[j])} · AUM {fmt_num(aum[j])}")
                            st.button("Open", key=f"nn-{n_list}-{j}", icon=":material/open_in_full:",
                                      on_click=set_focus, args=(int(j),))

    # ---- the gallery -------------------------------------------------------------------------------------
    g = st.columns([1, 1, 2])
    view = g[0].radio("View", ["Cards", "Table"], key="view", horizontal=True)
    if view == "Cards":
        per_page = g[1].selectbox("Per page", [12, 24, 48], key="per_page")
        pages = max(1, -(-sel.size // per_page))
        if st.session_state.get("page_no", 1) > pages:
            st.session_state["page_no"] = pages
        page_no = g[2].number_input(f"Page (of {fmt_num(pages)})", 1, pages, key="page_no")
        page_idx = sel[(page_no - 1) * per_page : page_no * per_page]
        st.caption(f"Samples {fmt_num((page_no - 1) * per_page + 1)}–{fmt_num((page_no - 1) * per_page + len(page_idx))} "
                   f"of {fmt_num(sel.size)}, ranked by {md_escape(rank_by)}.")
        by = agreement_of([ids[i] for i in page_idx])
        for start in range(0, len(page_idx), 4):
            row = st.columns(4)
            for col, i in zip(row, page_idx[start : start + 4], strict=False):
                i = int(i)
                with col.container(border=True, key=f"card-{i}"):
                    if i == focus:
                        st.badge("Focused", icon=":material/center_focus_strong:", color="blue")
                    show_image(images, i, 112)
                    decision_badge(i)
                    agreement_badge(by, i)
                    st.markdown(describe(i))
                    b = st.columns(5)
                    for col_b, name in zip(b, DECISIONS, strict=False):
                        label, _, icon, _ = DECISIONS[name]
                        col_b.button("", icon=icon, key=f"{name[:3]}-{i}", help=label + (" to the suggested label"
                                     if name == "mislabeled" else ""), on_click=decide_one, args=(i, name, None, False))
                    b[4].button("", icon=":material/center_focus_strong:", key=f"focus-{i}", help="Focus",
                                on_click=set_focus, args=(i,))
        scope = page_idx
    else:
        rows = sel[:TABLE_ROWS]
        st.caption(f"The first {fmt_num(rows.size)} of {fmt_num(sel.size)} matching samples, sorted by "
                   f"{md_escape(rank_by)} (most suspicious first). Narrow the filters to see others. Edit the "
                   "decision and new label cells to decide.")
        code = arr.code[rows]
        base = pd.DataFrame({
            "image": [thumb_url(images, i) for i in rows],
            "sample_id": ids[rows], "label": class_arr[labels[rows]],
            "suggested_label": np.array(classes + ["?"], dtype=object)[suggested[rows]],
            "decision": [CODE_NAMES.get(int(c)) for c in code],
            "new_label": [classes[j] if j >= 0 else None for j in arr.new_label[rows]],
            "aum": aum[rows], **{c: columns[c][rows] for c in others}, "rank": columns["rank"][rows],
            "flagged": flagged[rows],
        })
        version = st.session_state.setdefault("editor_version", 0)
        st.data_editor(
            base, key=f"editor-{version}", hide_index=True, width="stretch", height=560, row_height=52,
            placeholder="",  # a cell with nothing set (no decision, no new label, no score) is empty, not "None"
            disabled=[c for c in base.columns if c not in ("decision", "new_label")],
            column_config={
                "image": st.column_config.ImageColumn("image", width="small"),
                "decision": st.column_config.SelectboxColumn("decision", options=list(DECISIONS)),
                "new_label": st.column_config.SelectboxColumn("new label", options=classes,
                                                              help="the class of a relabel (decision mislabeled)"),
            },
            on_change=apply_table_edits, args=(rows, base),
        )
        scope = rows

    # ---- bulk -------------------------------------------------------------------------------------------
    b = st.columns([2, 2, 2])
    bulk = b[0].selectbox("Mark several samples as", list(DECISIONS), key="bulk",
                          format_func=lambda d: DECISIONS[d][0] + (" (to its suggested label)" if d == "mislabeled" else ""))
    def how_many(indices: np.ndarray) -> int:  # relabel-to-suggested skips samples without a suggestion
        return int(np.count_nonzero(suggested[indices] >= 0)) if bulk == "mislabeled" else int(indices.size)

    b[1].button(f"Apply to the {fmt_num(how_many(scope))} samples shown", key="bulk-apply", on_click=bulk_apply,
                args=(scope, bulk))
    if b[2].button(f"Apply to all {fmt_num(how_many(sel))} matching…", key="bulk-apply-all"):
        confirm_bulk(sel, bulk, how_many(sel))
    _log_decision_time()


def bulk_apply(indices: np.ndarray, decision: str) -> None:
    if decision == "mislabeled":
        indices, new = relabel_targets(indices)
    else:
        new = [None] * len(indices)
    if len(indices):
        record(indices, decision, new, f"{DECISIONS[decision][0]} (bulk)")


def apply_table_edits(rows: np.ndarray, base: pd.DataFrame) -> None:
    """Save the cells edited in the table as one step, then show a fresh table built from the store."""
    version = st.session_state.get("editor_version", 0)
    edited = st.session_state[f"editor-{version}"]["edited_rows"]
    for r, change in edited.items():
        decision = change.get("decision", base["decision"].iat[r]) or None  # "" or None: not set
        new_label = change.get("new_label", base["new_label"].iat[r]) or None
        if decision is None:
            continue
        if decision == "mislabeled" and not new_label:
            new_label = base["suggested_label"].iat[r] if base["suggested_label"].iat[r] != "?" else None
            if new_label is None:
                say(f"{ids[rows[r]]}: a relabel needs a new label.", ":material/error:")
                continue
        record(np.array([rows[r]]), decision, [new_label if decision == "mislabeled" else None],
               f"{DECISIONS[decision][0]} {ids[rows[r]]}")
    st.session_state["editor_version"] = version + 1


@st.dialog("Apply to every matching sample?")
def confirm_bulk(sel: np.ndarray, decision: str, count: int) -> None:
    st.write(f"Mark **{fmt_num(count)}** samples as **{DECISIONS[decision][0]}**"
             + (" (each to its suggested label)" if decision == "mislabeled" else "") + "?")
    st.caption("This is one step: Undo (Z) withdraws all of it.")
    if st.session_state.pop("_bulk_done", False):
        st.rerun()  # close the dialog: the whole page shows the new decisions
    c = st.columns(2)
    c[0].button(f"Mark {fmt_num(count)} samples", key="bulk-confirm", type="primary", on_click=bulk_confirmed,
                args=(sel, decision))
    if c[1].button("Cancel", key="bulk-cancel"):
        st.rerun()


def bulk_confirmed(sel: np.ndarray, decision: str) -> None:
    bulk_apply(sel, decision)
    st.session_state["_bulk_done"] = True


st.session_state.pop("_bulk_done", None)  # a full run after the confirmation: the dialog is closed


def _log_decision_time() -> None:
    """With DIFFICULTY_AUDIT_TIMINGS=1, print the server-side time of a decision (callback + rerun) for the bench:
    wall-clock ms and CPU ms of the script thread (the second does not count waiting for a shared CPU)."""
    started = st.session_state.pop("_decided_at", None)
    if started is not None and os.environ.get("DIFFICULTY_AUDIT_TIMINGS"):
        wall, cpu = time.perf_counter() - started[0], time.thread_time() - started[1]
        print(f"decision-ms {1000 * wall:.1f} cpu-ms {1000 * cpu:.1f}", file=sys.stderr, flush=True)


review_panel(sel)



# ---- export ------------------------------------------------------------------------------------------------
st.subheader(":material/download: Export")
if state != "done":
    st.warning(f"The run is {state}: exported files are marked PARTIAL in their names.")
e = st.columns(4)
for col, kind, label in [(e[0], "flagged", "Flagged list with scores and decisions"),
                         (e[1], "manifest", "Cleaned manifest (path,label)"),
                         (e[2], "decisions", "Decisions only")]:
    col.download_button(label, icon=":material/download:", data=lambda kind=kind: export_bytes(run, kind),
                        file_name=export_filename(run, kind), mime="text/csv", key=f"dl-{kind}", on_click="ignore")
e[3].download_button("Cleaned dataset (image folder, zip)", icon=":material/download:", data=lambda: cleaned_zip(run),
                     file_name=export_filename(run, "cleaned").removesuffix(".csv") + ".zip", mime="application/zip",
                     key="dl-cleaned", on_click="ignore")
st.caption("Cleaned manifest and dataset: every sample of the dataset not marked *remove*, with *relabel* decisions "
           "applied. The zip is an image folder `<class>/<file>` with its own `manifest.csv`: unzip it and audit it "
           "again with `--dataset <folder>`. The manifest's paths are relative to the dataset root (array datasets: "
           "to the unzipped folder). Score columns hold their papers' values (aum: low = suspicious).")
_log_decision_time()
