"""OoD & uncertainty page: feature density (epistemic) vs softmax entropy (aleatoric), DDU (Mukhoti et al. 2021)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import streamlit as st

from app_pages.common import image_grid, load_scores, require_run, sample_images
from engine.ood_eval import load_report, load_results
from engine.views import common_edges, histogram, subsample

st.title("🌫️ Out of distribution & uncertainty")
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
edges = common_edges(*[np.clip(v, np.percentile(series["training"], 0.5) - 200, None) for v in series.values()], bins=60)
fig = go.Figure()
for name, v in series.items():
    counts = histogram(v, edges)
    fig.add_scatter(x=(edges[:-1] + edges[1:]) / 2, y=counts / max(1, counts.sum()), mode="lines", name=name,
                    line=dict(width=3 if name == "training" else 2), line_shape="hvh")
fig.update_layout(height=360, xaxis_title="log feature density", yaxis_title="fraction of the set", margin=dict(t=20))
st.subheader("Feature density per set")
st.plotly_chart(fig, width="stretch", key="ood-density")

if report.get("ood"):
    rows = [{"OoD set": name, **{k: round(v, 4) for k, v in e.items()}} for name, e in report["ood"].items()]
    st.dataframe(pd.DataFrame(rows), hide_index=True, width="stretch")
    st.caption("AUROC / AUPRC of telling the held-out ID test set from each OoD set, by low density, high entropy "
               "or low max-softmax.")

# ---- entropy vs density -------------------------------------------------------------------------
st.subheader("Entropy vs density (training samples)")
dens, ent = results["train_log_density"], results["train_entropy"]
d_cut, e_cut = float(np.percentile(dens, 5)), float(np.percentile(ent, 95))
sel = subsample(len(dens), 50_000)
scores = run.scores(["flagged"])
flagged = scores["flagged"].to_numpy() if scores is not None else np.zeros(len(dens), dtype=bool)
sc = go.Figure()
for name, m, color in [("not flagged", ~flagged[sel], "#4c78a8"), ("flagged by AUM", flagged[sel], "#e45756")]:
    idx = sel[m]
    sc.add_trace(go.Scattergl(x=dens[idx], y=ent[idx], mode="markers", name=name,
                              marker=dict(size=4, color=color, opacity=0.6)))
sc.add_vline(x=d_cut, line_dash="dash")
sc.add_hline(y=e_cut, line_dash="dash")
x_hi, y_hi = float(np.max(dens)), float(np.max(ent)) or 1.0
for text, x, y in [("confident", x_hi, 0), ("ambiguous", x_hi, y_hi), ("OoD", d_cut, 0), ("OoD and ambiguous", d_cut, y_hi)]:
    sc.add_annotation(x=x, y=y, text=text, showarrow=False, xanchor="right", font=dict(size=13, color="#555"))
sc.update_layout(height=420, xaxis_title="log feature density", yaxis_title="softmax entropy", margin=dict(t=20))
st.plotly_chart(sc, width="stretch", key="ood-scatter")
st.caption(f"Dashed lines: 5th percentile of density ({d_cut:.1f}) and 95th percentile of entropy ({e_cut:.2f}) "
           "over the training samples.")

# ---- calibration and selective prediction ---------------------------------------------------------
cal = report.get("calibration")
if cal:
    st.subheader("Calibration on held-out in-distribution samples")
    c = st.columns(4)
    c[0].metric("Accuracy", f"{cal['accuracy']:.3f}")
    c[1].metric("ECE (15 bins)", f"{cal['ece_before']:.3f}")
    c[2].metric("ECE after temperature scaling", f"{cal['ece_after']:.3f}")
    c[3].metric("Temperature", f"{cal['temperature']:.2f}")
    rel = go.Figure()
    mids = (np.array(cal["reliability_before"]["edges"][:-1]) + np.array(cal["reliability_before"]["edges"][1:])) / 2
    for name, key in [("before", "reliability_before"), ("after temperature scaling", "reliability_after")]:
        rel.add_bar(x=mids, y=cal[key]["accuracy"], name=name, width=1 / 15 * 0.45)
    rel.add_scatter(x=[0, 1], y=[0, 1], mode="lines", name="perfect", line=dict(dash="dot", color="black"))
    rel.update_layout(height=340, xaxis_title="confidence", yaxis_title="accuracy", barmode="group", margin=dict(t=20))
    c1, c2 = st.columns(2)
    c1.plotly_chart(rel, width="stretch", key="reliability")
    rc = report.get("risk_coverage")
    if rc:
        curve = go.Figure(go.Scatter(x=rc["coverage"], y=rc["risk"], mode="lines"))
        curve.update_layout(height=340, xaxis_title="coverage (most confident first)", yaxis_title="risk (error rate)",
                            margin=dict(t=20), title=f"AURC {rc['aurc']:.4f}")
        c2.plotly_chart(curve, width="stretch", key="risk-coverage")

# ---- the least typical training samples --------------------------------------------------------------
st.subheader("Lowest-density training samples")
k = st.slider("How many", 6, 48, 12, 6, key="ood_k")
low = np.argsort(dens, kind="stable")[:k]
loaded = load_scores(run)  # the cached samples table (ids of a million samples are not read again on each rerun)
ids = (loaded[2] if loaded else run.samples(["sample_id"]))["sample_id"].to_numpy()


image_grid(sample_images(run), low, [f"{ids[i]} · log q {dens[i]:.0f} · H {ent[i]:.2f}" for i in low])
