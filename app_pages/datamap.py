"""Data map page: dataset cartography (Swayamdipta et al. 2020)."""

from __future__ import annotations

import numpy as np
import plotly.graph_objects as go
import streamlit as st

from app_pages.common import fmt_num, follow_open, open_clicked, require_run, require_scores, stamp
from engine.ui import subsample

MAX_POINTS = 20_000  # points drawn; the browser draws more slowly, not more clearly, beyond that


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


@st.cache_resource(max_entries=2, show_spinner=False)
def map_figure(run_key: tuple, _scores) -> tuple[go.Figure, int, int]:
    """The map's figure, built once per run state and shared (read-only): a seeded subsample of at most
    ``MAX_POINTS`` samples, each point carrying its row (``customdata``) and no per-point text (a million-sample
    run would send every id to the browser). Returns the figure, the points drawn and the samples with a value."""
    conf, var = _scores["confidence"].to_numpy(), _scores["variability"].to_numpy()
    idx = np.flatnonzero(np.isfinite(conf))
    sel = idx[subsample(idx.size, MAX_POINTS)]
    fig = go.Figure(go.Scattergl(
        x=var[sel], y=conf[sel], mode="markers", customdata=sel,
        marker=dict(color=_scores["cumulative_accuracy"].to_numpy()[sel], colorscale="RdYlBu", cmin=0, cmax=1, size=5,
                    opacity=0.7, colorbar=dict(title="correctness")),
        hovertemplate="variability %{x:.3f}<br>confidence %{y:.3f}<br>correctness %{marker.color:.2f}"
                      "<br>click to review<extra></extra>",
    ))
    fig.update_layout(height=560, xaxis_title="variability", yaxis_title="confidence", margin=dict(t=20))
    return fig, int(sel.size), int(idx.size)


fig, drawn, finite = map_figure(stamp(run), scores)
if drawn < finite:
    st.caption(f"Showing a random {fmt_num(drawn)} of {fmt_num(finite)} samples (WebGL scatter; subsampled above "
               f"{fmt_num(MAX_POINTS)}).")
st.plotly_chart(fig, width="stretch", key="datamap", on_select=lambda: open_clicked("datamap"),
                selection_mode="points")
st.caption("Click a point to review that sample on the Flagged page.")
flagged = scores["flagged"].to_numpy()
c = st.columns(3)
c[0].metric("Hard to learn (confidence < 0.2)", fmt_num(int((confidence < 0.2).sum())))
c[1].metric("Ambiguous (variability > 0.2)", fmt_num(int((variability > 0.2).sum())))
c[2].metric("Flagged", fmt_num(int(flagged.sum())))
