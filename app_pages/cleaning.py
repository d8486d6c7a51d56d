"""Pieces the pages share about cleaning: the estimated label noise per class (AUM page) and the
retraining comparison (Audit page). Not a page itself: app.py lists the pages with st.navigation.
"""

from __future__ import annotations

import pandas as pd
import plotly.graph_objects as go
import streamlit as st

from engine.ui import Run, load_retrain, retrain_verdict


def noise_estimate_section(summary: dict | None) -> None:
    """Per class: samples, estimated wrong labels and noise rate, most likely true class (and the truth when known)."""
    est = (summary or {}).get("noise_estimate")
    if not est:
        return
    st.subheader("Estimated label noise per class")
    rows = pd.DataFrame(est["per_class"])
    names = {"class": "given label", "n": "samples", "estimated_wrong": "estimated wrong",
             "noise_rate": "estimated noise rate", "most_likely_true": "most likely true class",
             "true_noise_rate": "true noise rate", "true_most_likely": "true most common class"}
    rows = rows.rename(columns=names)
    pct = st.column_config.NumberColumn(format="percent")
    st.dataframe(rows, hide_index=True, width="stretch",
                 column_config={"estimated noise rate": pct, "true noise rate": pct})
    overall = est.get("noise_rate")
    line = f"Overall estimated noise rate {overall:.1%}" if overall is not None else "No scored samples"
    if est.get("true_noise_rate") is not None:
        line += (f" (true {est['true_noise_rate']:.1%}); mean absolute error per class "
                 f"{est['mae_noise_rate']:.1%}, total-variation error of the class-pair matrix "
                 f"{est.get('joint_tv_error', float('nan')):.3f}")
    st.caption(line + ". A flagged sample counts for its suggested class; the estimate follows the run's review "
               "policy (like cleanlab's confident joint, without its calibration).")


def retrain_section(run: Run) -> None:
    """Test accuracy of the recipe trained on the noisy, cleaned and oracle labels, when ``engine retrain`` ran."""
    r = load_retrain(run)
    if r is None:
        st.caption(f"Does cleaning help? `python -m engine retrain {run.path} --policy relabel` trains the same recipe "
                   "on the noisy and on the cleaned labels and shows the comparison here.")
        return
    st.subheader("Does cleaning help?")
    names = [n for n in ("noisy", "cleaned", "oracle") if f"accuracy_{n}" in r]
    means = [r[f"accuracy_{n}"] for n in names]
    stds = [r[f"accuracy_{n}_std"] for n in names]
    fig = go.Figure(go.Bar(x=[f"{n} labels" for n in names], y=means, error_y={"type": "data", "array": stds},
                           text=[f"{m:.1%}" for m in means], textposition="inside", insidetextanchor="end",
                           textfont={"color": "white"}))  # inside: above a bar near 100% the label was cut off
    lo = max(0.0, min(means) - 0.1)
    fig.update_layout(height=300, yaxis={"title": "test accuracy", "range": [lo, 1.0], "tickformat": ".0%"},
                      margin={"t": 10, "b": 10})
    st.plotly_chart(fig, width="stretch")
    st.text(f"Trusted test set: {r['test_set']}")  # a user's path: shown as text, never as markdown
    line = (f"Cleaning ({r['policy']}) removed {r['n_removed']:,} and relabelled {r['n_relabelled']:,} of "
            f"{r['n_train']:,} training samples; {len(r['seeds'])} seed(s) per variant.")
    if said := retrain_verdict(r):
        line += f" **{said}**"
    st.markdown(line)
