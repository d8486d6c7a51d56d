"""OoD & uncertainty page: feature density (epistemic) vs softmax entropy (aleatoric), DDU (Mukhoti et al. 2021)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import streamlit as st

from app_pages.common import (
    fmt_num,
    follow_open,
    load_scores,
    md_escape,
    open_clicked,
    open_sample,
    require_run,
    sample_images,
    stamp,
)
from engine.ui import ImageError, common_edges, histogram, load_report, load_results, subsample

MAX_POINTS = 20_000  # as the data map: the browser draws more slowly, not more clearly, beyond that

follow_open()

st.title(":material/blur_on: Out of distribution & uncertainty")
run = require_run("The OoD page")
report = load_report(run) or {}
results = load_results(run)
if "train_log_density" not in results:
    msg = report.get("error") or "it is computed when the audit finishes"
    st.info(f"No feature densities for this run yet: {msg}.")
    st.stop()
st.markdown(
    "A Gaussian per class is fitted to the final model's penultimate features. A sample's **log density** "
    "under them is low when it looks like no training class (epistemic: out of distribution); its **softmax "
    "entropy** is high when the network hesitates between classes (aleatoric: ambiguous)."
)
sets = report.get("sets", {})
if not sets:
    st.caption("This audit evaluated no OoD set. Add held-out classes, another folder or corruptions when you start "
               "an audit (Audit page → Out-of-distribution sets, or `--holdout-classes 8,9`, `--ood FOLDER`, "
               "`--corruptions noise,blur,invert`).")

# ---- density per set ---------------------------------------------------------------------------
series = {"training": results["train_log_density"]}
for name, meta in sets.items():
    series[name] = results[f"{meta['key']}_log_density"]
edges = common_edges(*[np.clip(v, np.nanpercentile(series["training"], 0.5) - 200, None) for v in series.values()], bins=60)
fig = go.Figure()
for name, v in series.items():
    counts = histogram(v, edges)
    fig.add_scatter(x=(edges[:-1] + edges[1:]) / 2, y=counts / max(1, counts.sum()), mode="lines", name=name,
                    line=dict(width=3 if name == "training" else 2), line_shape="hvh")
fig.update_layout(height=360, xaxis_title="log feature density", yaxis_title="fraction of the set", margin=dict(t=20))
st.subheader("Feature density per set")
st.plotly_chart(fig, width="stretch", key="ood-density")

if report.get("ood"):
    rows = [{"OoD set": name, **{k: fmt_num(v) for k, v in e.items()}} for name, e in report["ood"].items()]
    st.dataframe(pd.DataFrame(rows), hide_index=True, width="stretch")
    st.caption("AUROC / AUPRC of telling the held-out ID test set from each OoD set, by low density, high entropy "
               "or low max-softmax.")

# ---- entropy vs density -------------------------------------------------------------------------
st.subheader("Entropy vs density (training samples)")
dens, ent = results["train_log_density"], results["train_entropy"]
loaded = load_scores(run)  # the cached tables (ids of a million samples are not read again on each rerun)
ids = (loaded[2] if loaded else run.samples(["sample_id"]))["sample_id"].to_numpy()
if loaded is not None and len(loaded[0]) == len(dens):
    flagged = loaded[0]["flagged"].to_numpy()
else:
    scores = run.scores(["flagged"])
    flagged = scores["flagged"].to_numpy() if scores is not None else np.zeros(len(dens), dtype=bool)


@st.cache_resource(max_entries=2, show_spinner=False)
def scatter_figure(run_key: tuple, _dens, _ent, _flagged) -> tuple[go.Figure, float, float, int, int]:
    """Entropy vs density of a seeded subsample of at most MAX_POINTS scored samples, built once per run state and
    shared (read-only); each point carries its row (customdata). Returns the figure, the 5th percentile of density,
    the 95th of entropy, the points drawn and the samples scored."""
    d_cut, e_cut = float(np.nanpercentile(_dens, 5)), float(np.nanpercentile(_ent, 95))  # NaN: not scored
    scored = np.flatnonzero(np.isfinite(_dens) & np.isfinite(_ent))
    sel = scored[subsample(scored.size, MAX_POINTS)]
    sc = go.Figure()
    for name, m, color in [("not flagged", ~_flagged[sel], "#4c78a8"), ("flagged", _flagged[sel], "#e45756")]:
        idx = sel[m]
        # No per-point text (a million names would dwarf the figure): the hover says how to open the sample.
        sc.add_trace(go.Scattergl(x=_dens[idx], y=_ent[idx], mode="markers", name=name, customdata=idx,
                                  hovertemplate="log density %{x:.1f}<br>entropy %{y:.3f}<br>click to review<extra></extra>",
                                  marker=dict(size=4, color=color, opacity=0.6)))
    sc.add_vline(x=d_cut, line_dash="dash")
    sc.add_hline(y=e_cut, line_dash="dash")
    x_hi, y_hi = float(np.nanmax(_dens)), float(np.nanmax(_ent)) or 1.0
    for text, x, y in [("confident", x_hi, 0), ("ambiguous", x_hi, y_hi), ("OoD", d_cut, 0),
                       ("OoD and ambiguous", d_cut, y_hi)]:
        sc.add_annotation(x=x, y=y, text=text, showarrow=False, xanchor="right", font=dict(size=13, color="gray"))
    sc.update_layout(height=420, xaxis_title="log feature density", yaxis_title="softmax entropy", margin=dict(t=20))
    return sc, d_cut, e_cut, int(sel.size), int(scored.size)


sc, d_cut, e_cut, drawn, n_scored = scatter_figure(stamp(run), dens, ent, flagged)
st.plotly_chart(sc, width="stretch", key="ood-scatter", on_select=lambda: open_clicked("ood-scatter"), selection_mode="points")
st.caption(f"Dashed lines: 5th percentile of density ({fmt_num(d_cut)}) and 95th percentile of entropy ({fmt_num(e_cut)}) "
           "over the training samples. Click a point to review that sample on the Flagged page."
           + (f" A random {fmt_num(drawn)} of the {fmt_num(n_scored)} samples are drawn." if drawn < n_scored else ""))

# ---- calibration and selective prediction ---------------------------------------------------------
cal = report.get("calibration")
if cal:
    st.subheader("Calibration on held-out in-distribution samples")
    c = st.columns(4)
    c[0].metric("Accuracy", fmt_num(cal["accuracy"]))
    c[1].metric("ECE (15 bins)", fmt_num(cal["ece_before"]))
    c[2].metric("ECE after temperature scaling", fmt_num(cal["ece_after"]))
    c[3].metric("Temperature", fmt_num(cal["temperature"]))
    rel = go.Figure()
    mids = (np.array(cal["reliability_before"]["edges"][:-1]) + np.array(cal["reliability_before"]["edges"][1:])) / 2
    for name, key in [("before", "reliability_before"), ("after temperature scaling", "reliability_after")]:
        rel.add_bar(x=mids, y=cal[key]["accuracy"], name=name, width=1 / 15 * 0.45)
    rel.add_scatter(x=[0, 1], y=[0, 1], mode="lines", name="perfect", line=dict(dash="dot", color="gray"))
    rel.update_layout(height=340, xaxis_title="confidence", yaxis_title="accuracy", barmode="group", margin=dict(t=20))
    c1, c2 = st.columns(2)
    c1.plotly_chart(rel, width="stretch", key="reliability")
    rc = report.get("risk_coverage")
    if rc:
        curve = go.Figure(go.Scatter(x=rc["coverage"], y=rc["risk"], mode="lines"))
        curve.update_layout(height=340, xaxis_title="coverage (most confident first)", yaxis_title="risk (error rate)",
                            margin=dict(t=20), title=f"AURC {fmt_num(rc['aurc'])}")
        c2.plotly_chart(curve, width="stretch", key="risk-coverage")

# ---- the least typical training samples --------------------------------------------------------------
st.subheader("Lowest-density training samples")
k = st.slider("How many", 6, 48, 12, 6, key="ood_k")
take = min(k, int(np.isfinite(dens).sum()))
low = np.argpartition(np.nan_to_num(dens, nan=np.inf), take)[:take] if 0 < take < len(dens) else np.arange(take)
low = low[np.lexsort((low, dens[low]))]  # lowest density first, ties in run order (NaN: never among them)
images = sample_images(run)
for start in range(0, len(low), 6):
    row = st.columns(6)
    for col, i in zip(row, low[start : start + 6], strict=False):
        with col:
            try:
                st.image(images.png(int(i), 96), output_format="PNG")
            except ImageError as exc:
                st.caption(f"no image: {md_escape(exc)}")
            st.caption(f"{md_escape(ids[i])} · log q {fmt_num(dens[i])} · H {fmt_num(ent[i])}")
            st.button("Open", key=f"ood-open-{i}", icon=":material/open_in_full:", on_click=open_sample, args=(int(i),))
