"""AUM page: distribution with threshold samples and a movable cut-off, per class, margin trajectories."""

from __future__ import annotations

import numpy as np
import plotly.graph_objects as go
import streamlit as st

from app_pages.cleaning import noise_estimate_section
from app_pages.common import class_axis, detection_row, natural_aum, require_run, require_scores, stamp
from engine.metrics import flag_metrics, ranking_auroc
from engine.views import (
    common_edges,
    first_kept_pass,
    flags_at,
    histogram,
    label_errors,
    margin_bands,
    margin_sample,
    per_class,
)

st.title(":material/show_chart: Area Under the Margin")
run = require_run("The AUM page")
scores, info, samples, classes = require_scores(run, "the histogram")
state = run.status().get("state")
if state != "done":
    st.warning(f"This run is **{state}**: what you see comes from the epochs finished so far.")


@st.cache_resource(max_entries=4)
def sampled_margins(key: tuple) -> tuple[np.ndarray, np.ndarray]:
    from engine.runs import Run

    return margin_sample(Run(key[0]))


@st.cache_resource(max_entries=4)
def auroc(key: tuple, _score: np.ndarray, _errors: np.ndarray) -> float:
    """AUROC does not depend on the cut-off: once per run state."""
    return ranking_auroc(_score, _errors)


key = stamp(run)
aum = natural_aum(scores)
thr_aum = scores["threshold_aum"].to_numpy()
thr_aum = thr_aum[np.isfinite(thr_aum)]
auto_cut = float(info.get("cutoff") if info.get("cutoff") is not None else np.nan)

st.markdown(
    "AUM is a sample's margin (logit of its given label minus the largest other logit) averaged over epochs "
    "(Pleiss et al. 2020). **Low AUM = likely mislabeled.** Threshold samples were given a fake extra class on "
    "purpose: their AUM shows what a mislabeled sample looks like in this very run."
)

# ---- cut-off control ---------------------------------------------------------
modes = ["Automatic", "Percentile of threshold samples' AUM", "AUM value"]
if thr_aum.size == 0:
    modes.remove("Percentile of threshold samples' AUM")
c1, c2, c3 = st.columns([2, 3, 2])
mode = c1.radio("Cut-off", modes, key=f"cutmode-{run.id}")
finite = aum[np.isfinite(aum)]
if mode == "Automatic":
    cut = auto_cut
    c2.write(f"Automatic cut-off ({info.get('cutoff_method')}): **{cut:.3f}**")
elif mode == "AUM value":
    lo, hi = float(np.floor(finite.min())), float(np.ceil(finite.max()))
    default = float(np.clip(auto_cut if np.isfinite(auto_cut) else 0.0, lo, hi))
    cut = c2.slider("Flag samples with AUM below", lo, hi, default, 0.01, key=f"cutval-{run.id}")
else:
    pct = c2.slider("Percentile of the threshold samples' AUM (the paper uses 99)", 50.0, 100.0, 99.0, 0.5,
                    key=f"cutpct-{run.id}")
    cut = float(np.percentile(thr_aum, pct))
    c2.write(f"Cut-off: **{cut:.3f}**")
flagged = flags_at(aum, cut)
c3.metric("Flagged", f"{int(flagged.sum()):,} of {len(aum):,}")
c3.caption(f"{flagged.mean():.1%} of the samples")
errors = label_errors(samples)
if errors is not None and errors.any():
    m = flag_metrics(flagged, errors) | {"auroc": auroc(key, scores["aum"].to_numpy(), errors)}
    detection_row(m)
    st.caption(f"Against the {int(errors.sum())} labels known to be wrong (flipped on purpose), at this cut-off.")

# ---- histogram ---------------------------------------------------------------
edges = common_edges(aum, thr_aum, bins=70)
centers = (edges[:-1] + edges[1:]) / 2
width = edges[1] - edges[0]
fig = go.Figure()
if errors is not None:
    fig.add_bar(x=centers, y=histogram(aum[~errors], edges), width=width, name="label correct", marker_color="#4c78a8")
    fig.add_bar(x=centers, y=histogram(aum[errors], edges), width=width, name="label flipped (known)", marker_color="#e45756")
else:
    fig.add_bar(x=centers, y=histogram(aum, edges), width=width, name="samples", marker_color="#4c78a8")
if thr_aum.size:
    fig.add_bar(x=centers, y=histogram(thr_aum, edges), width=width, name="threshold samples (fake class)",
                marker_color="rgba(120,120,120,0.55)")
if np.isfinite(cut):
    fig.add_vline(x=cut, line_dash="dash", line_color="black", annotation_text=f"cut-off {cut:.2f}")
fig.update_layout(barmode="overlay", height=380, xaxis_title="AUM", yaxis_title="samples",
                  margin=dict(t=30, b=40), legend=dict(orientation="h", y=1.12))
st.plotly_chart(fig, width="stretch", key="aum-hist")

# ---- per class -----------------------------------------------------------------
st.subheader("Per given label")
pc = per_class(aum, samples["label"].to_numpy(), flagged, classes)
if not pc.empty:
    c1, c2 = st.columns([3, 2])
    box = go.Figure(go.Box(x=pc["class"], q1=pc["q1"], median=pc["median"], q3=pc["q3"], lowerfence=pc["p5"],
                           upperfence=pc["p95"], name="AUM", marker_color="#4c78a8"))
    if np.isfinite(cut):
        box.add_hline(y=cut, line_dash="dash", line_color="gray")
    box.update_layout(height=320, xaxis_title="given label", yaxis_title="AUM (box: quartiles, whiskers: 5-95%)",
                      margin=dict(t=20, b=40), xaxis=class_axis(pc["class"]))
    c1.plotly_chart(box, width="stretch", key="aum-class-box")
    bar = go.Figure(go.Bar(x=pc["class"], y=pc["flagged"], marker_color="#e45756",
                           text=[f"{f}/{n}" for f, n in zip(pc["flagged"], pc["n"], strict=True)]))
    bar.update_layout(height=320, xaxis_title="given label", yaxis_title="flagged", margin=dict(t=20, b=40),
                      xaxis=class_axis(pc["class"]))
    c2.plotly_chart(bar, width="stretch", key="aum-class-bar")

noise_estimate_section(run.summary())

# ---- margin trajectories ---------------------------------------------------------
st.subheader("Margin over epochs")
st.caption("Bands: median and 25–75% of the margin of flagged and of unflagged samples (as the AUM paper's figure). "
           "Lines: the samples you pick (default: the five lowest AUM).")
passes = first_kept_pass(run)
order = np.argsort(np.nan_to_num(aum, nan=np.inf), kind="stable")
ids = samples["sample_id"].to_numpy()
default_ids = [ids[i] for i in order[:5]]
picked = st.multiselect("Samples", options=ids[order[:2000]].tolist(), default=default_ids, key=f"traj-{run.id}",
                        help="The 2,000 lowest-AUM samples are listed; type to search.")
traj = go.Figure()
sample_idx, sample_margins = sampled_margins(key)
bands = margin_bands(sample_margins, {"unflagged": np.flatnonzero(~flagged[sample_idx]),
                                      "flagged": np.flatnonzero(flagged[sample_idx])})
colors = {"unflagged": "76,120,168", "flagged": "228,87,86"}
for name, g in bands.groupby("group") if not bands.empty else []:
    col = colors[name]
    traj.add_scatter(x=g["epoch"], y=g["q75"], line=dict(width=0), showlegend=False, hoverinfo="skip")
    traj.add_scatter(x=g["epoch"], y=g["q25"], fill="tonexty", fillcolor=f"rgba({col},0.2)", line=dict(width=0),
                     showlegend=False, hoverinfo="skip")
    traj.add_scatter(x=g["epoch"], y=g["median"], name=f"{name} (median)", line=dict(color=f"rgb({col})", width=3))
index = {ids[i]: i for i in order[:2000]}
for sid in picked:
    i = index[sid]
    p = int(passes[i])
    if p < 0:
        continue
    m = np.asarray(run.dynamics(p, "margin")[:, i])
    traj.add_scatter(x=np.arange(m.size), y=m, name=f"{sid} ({classes[samples['label'].iat[i]]})", mode="lines",
                     line=dict(width=1.5, dash="dot"))
traj.update_layout(height=380, xaxis_title="epoch", yaxis_title="margin", margin=dict(t=20, b=40))
st.plotly_chart(traj, width="stretch", key="aum-traj")
