"""AUM page: distribution with threshold samples and a movable cut-off, per class, margin trajectories."""

from __future__ import annotations

import numpy as np
import plotly.graph_objects as go
import streamlit as st

from app_pages.cleaning import noise_estimate_section
from app_pages.common import class_axis, detection_row, policy_caption, require_run, require_scores, stamp
from engine.ui import (
    POLICY_FILE,
    Policy,
    PolicyError,
    available_scores,
    common_edges,
    decision_for,
    direction_label,
    first_kept_pass,
    flag_metrics,
    histogram,
    label_errors,
    load_policy,
    margin_bands,
    margin_sample,
    oriented,
    per_class,
    ranking_auroc,
    save_policy,
    score_values,
    suspicious_of,
)

st.title(":material/show_chart: Area Under the Margin")
run = require_run("The AUM page")
scores, info, samples, classes = require_scores(run, "the histogram")
state = run.status().get("state")
if state != "done":
    st.warning(f"This run is **{state}**: what you see comes from the epochs finished so far.")


@st.cache_resource(max_entries=4)
def sampled_margins(key: tuple) -> tuple[np.ndarray, np.ndarray]:
    from engine.ui import Run

    return margin_sample(Run(key[0]))


@st.cache_resource(max_entries=8)
def auroc(key: tuple, _score: np.ndarray, _errors: np.ndarray) -> float:
    """AUROC does not depend on the cut-off: once per run state."""
    return ranking_auroc(_score, _errors)


key = stamp(run)
aum = scores["aum"].to_numpy(dtype=np.float64)
thr_aum = scores["threshold_aum"].to_numpy()
thr_aum = thr_aum[np.isfinite(thr_aum)]

st.markdown(
    "AUM is a sample's margin (logit of its given label minus the largest other logit) averaged over epochs "
    "(Pleiss et al. 2020). **Low AUM = likely mislabeled.** Threshold samples were given a fake extra class on "
    "purpose: their AUM shows what a mislabeled sample looks like in this very run."
)

# ---- the review policy: cut-off rule and ranking score, saved with the run -----------------------
saved = load_policy(run)
st.info(policy_caption(run, info), icon=":material/rule:")
rules = ["auto", "threshold", "value", "quantile"]
if thr_aum.size == 0:
    rules.remove("threshold")
titles = {"auto": "Automatic", "threshold": "Percentile of threshold samples' AUM", "value": "Value",
          "quantile": "Lowest fraction (peerannot cut_lowests)"}
ver = (run.path / POLICY_FILE).stat().st_mtime_ns if (run.path / POLICY_FILE).is_file() else 0
wk = f"{run.id}-{ver}"  # widgets start from the saved policy after each save
names = available_scores(run, scores)
c1, c2, c3 = st.columns([2, 3, 2])
rule = c1.radio("Cut-off", rules, index=rules.index(saved.rule) if saved.rule in rules else 0, format_func=titles.get,
                key=f"pol-rule-{wk}")
score = c1.selectbox("Rank by (value / fraction cut it too)", names,
                     index=names.index(saved.score) if saved.score in names else 0, format_func=lambda n: direction_label(run, n),
                     key=f"pol-score-{wk}")
cut_score = "aum" if rule in ("auto", "threshold") else score
values = score_values(run, scores, cut_score)
finite = values[np.isfinite(values)]
value = None
if rule == "threshold":
    value = c2.slider("Percentile of the threshold samples' AUM (the paper uses 99)", 50.0, 100.0,
                      float(saved.value if saved.rule == "threshold" and saved.value else
                            run.config().get("threshold_percentile", 99.0)), 0.5, key=f"pol-pct-{wk}")
elif rule == "value":
    lo, hi = float(np.floor(finite.min())), float(np.ceil(finite.max()))
    start = saved.value if saved.rule == "value" and saved.score == score and saved.value is not None else \
        (info.get("auto_cutoff") if score == "aum" and info.get("auto_cutoff") is not None else float(np.median(finite)))
    value = c2.slider(f"Flag {direction_label(run, score)} beyond", lo, hi, float(np.clip(start, lo, hi)),
                      (hi - lo) / 1000 or 0.01, key=f"pol-val-{wk}")
elif rule == "quantile":
    value = c2.slider("Fraction at the suspicious end", 0.001, 0.5,
                      float(saved.value if saved.rule == "quantile" and saved.value else 0.1), 0.001, format="%.3f",
                      key=f"pol-q-{wk}")
if rule == "threshold" and not (saved.rule == "threshold" and saved.value) and \
        value == float(run.config().get("threshold_percentile", 99.0)):
    value = None  # the run's own percentile
candidate = Policy(rule, None if value is None else float(value), score)
if candidate == saved and info.get("policy") and not info["policy"].get("note"):  # the loaded table already holds its flags
    flagged, cutoff, fields = scores["flagged"].to_numpy(), info["cutoff"], info
else:
    try:
        decision, fields = decision_for(run, scores, info, candidate)
    except PolicyError as exc:
        st.error(f"This policy cannot be used: {exc}")
        st.stop()
    flagged, cutoff = decision.flagged, decision.cutoff
cut = cutoff if cut_score == "aum" else float("nan")  # drawn on the AUM axes only
c2.write(f"Flags: **{fields['policy']['text']}**")
c3.metric("Flagged", f"{int(flagged.sum()):,} of {len(aum):,}")
c3.caption(f"{flagged.mean():.1%} of the samples")
if candidate != saved:
    c2.warning("Not saved: the Flagged page, exports and summary still use the saved policy.", icon=":material/edit:")
    if c2.button("Save as the run's policy", type="primary", key=f"pol-save-{wk}"):
        try:
            save_policy(run, candidate)
        except PolicyError as exc:
            st.error(f"Not saved: {exc}")
        else:
            st.rerun()
else:
    c2.caption("This is the run's saved policy (its earlier ones are kept in policy.json's history).")
errors = label_errors(samples)
if errors is not None and errors.any():
    ranked = oriented(score_values(run, scores, score), score, suspicious_of(run, score))
    m = flag_metrics(flagged, errors) | {"auroc": auroc((key, score), ranked, errors)}
    detection_row(m)
    st.caption(f"Against the {int(errors.sum())} labels known to be wrong (flipped on purpose), at this cut-off; "
               f"AUROC of the ranking by {score}.")

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
fig.update_layout(barmode="overlay", height=380, xaxis_title="AUM (low = suspicious)", yaxis_title="samples",
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
    box.update_layout(height=320, xaxis_title="given label", yaxis_title="AUM, low = suspicious (box: quartiles, whiskers: 5-95%)",
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
