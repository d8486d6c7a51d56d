"""Data map page: dataset cartography (Swayamdipta et al. 2020)."""

from __future__ import annotations

import numpy as np
import plotly.graph_objects as go
import streamlit as st

from app_pages.common import fmt_num, follow_open, open_clicked, plot_text, require_run, require_scores
from engine.ui import subsample

MAX_POINTS = 50_000


follow_open()

st.title(":material/scatter_plot: Data map")
run = require_run("The data map")
scores, info, samples, classes = require_scores(run, "the map")
st.markdown(
    "Each point is a sample: **confidence** = mean probability of its given label over epochs, **variability** = "
    "its standard deviation, colour = fraction of epochs predicted right. Easy samples sit top-left, ambiguous "
    "ones in the middle (high variability), hard-to-learn and often mislabeled ones at the bottom."
)
confidence = scores["confidence"].to_numpy()
variability = scores["variability"].to_numpy()
correct = scores["cumulative_accuracy"].to_numpy()
ok = np.isfinite(confidence)
idx = np.flatnonzero(ok)
sel = idx[subsample(idx.size, MAX_POINTS)]
if sel.size < idx.size:
    st.caption(f"Showing a random {fmt_num(sel.size)} of {fmt_num(idx.size)} samples (WebGL scatter; subsampled above "
               f"{fmt_num(MAX_POINTS)}).")
ids = samples["sample_id"].to_numpy()
labels = np.array(classes)[samples["label"].to_numpy()]
fig = go.Figure(go.Scattergl(
    x=variability[sel], y=confidence[sel], mode="markers",
    marker=dict(color=correct[sel], colorscale="RdYlBu", cmin=0, cmax=1, size=5, opacity=0.7,
                colorbar=dict(title="correctness")),
    customdata=sel,
    text=[f"{plot_text(i)} · label {plot_text(lab)}" for i, lab in zip(ids[sel], labels[sel], strict=True)],
    hovertemplate="%{text}<br>variability %{x:.3f}<br>confidence %{y:.3f}<extra></extra>",
))
fig.update_layout(height=560, xaxis_title="variability", yaxis_title="confidence", margin=dict(t=20))
st.plotly_chart(fig, width="stretch", key="datamap", on_select=lambda: open_clicked("datamap"),
                selection_mode="points")
st.caption("Click a point to review that sample on the Flagged page.")
flagged = scores["flagged"].to_numpy()
c = st.columns(3)
c[0].metric("Hard to learn (confidence < 0.2)", fmt_num(int((confidence < 0.2).sum())))
c[1].metric("Ambiguous (variability > 0.2)", fmt_num(int((variability > 0.2).sum())))
c[2].metric("Flagged", fmt_num(int(flagged.sum())))
