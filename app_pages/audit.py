"""Audit page: choose data and settings, start an audit in the background, watch it, cancel or resume it."""

from __future__ import annotations

import time

import plotly.graph_objects as go
import streamlit as st
from plotly.subplots import make_subplots

from app_pages.cleaning import retrain_section
from app_pages.common import (
    current_role,
    current_run,
    detection_row,
    fmt_num,
    fmt_seconds,
    job_manager,
    may_run_audits,
    md_escape,
    refuse_outside_root,
    select_run,
)
from engine.ui import (
    LOADERS,
    MODELS,
    AuditConfig,
    ConfigError,
    DatasetError,
    Run,
    data_root,
    delete_run,
    describe,
    extract_image_zip,
    may,
    owner_of,
    parse_class_list,
    resolve_user_path,
    resume_problem,
    runs_root,
    torchvision_architectures,
    training_curves,
)

st.title(":material/rocket_launch: Audit")
st.write(
    "Train a classifier while recording every sample's margin at every epoch, then rank samples by "
    "their **Area Under the Margin**: mislabeled samples keep a low margin until the network memorises them."
)

SOURCES = ["Built-in digits (known errors injected)", "Image folder on this machine", "CSV manifest on this machine",
           "Upload a zip of an image folder"]
defaults = AuditConfig()

source = st.radio("Dataset", SOURCES, index=0, horizontal=True, key="source")
path = ""
if source in SOURCES[1:3]:  # outside the form: a path outside the data root is refused as soon as it is typed
    kind = "Image folder, laid out as root/<class>/<image>" if source == SOURCES[1] else \
        "CSV manifest with a header path,label[,sample_id]; paths relative to the CSV's folder"
    path = st.text_input(kind, placeholder="sample_data/digits_folder" if source == SOURCES[1] else "data/manifest.csv",
                         key=f"path-{source}",
                         help=f"Under the data root {data_root()} or the runs folder; a relative path starts at the data root")
    refuse_outside_root(path)
with st.expander("Out-of-distribution sets (optional)"):
    o1, o2, o3 = st.columns(3)
    holdout = o1.text_input("Hold out classes (names or indices, e.g. 8,9)", key="ood_holdout",
                            help="Trained without them; their images are evaluated as out of distribution.")
    corruptions = o2.multiselect("Corrupted copies of held-out ID images", ["noise", "blur", "invert"],
                                 key="ood_corrupt")
    ood_folder = o3.text_input("Another image folder", key="ood_folder")
    with o3:
        refuse_outside_root(ood_folder)
    st.caption("With any of these, 20% of the in-distribution samples are held out of training (not audited) "
               "for the OoD comparison and for calibration.")
@st.cache_resource(show_spinner="Listing torchvision's architectures (the first time, PyTorch loads: seconds)…")
def architectures() -> list[str]:
    return torchvision_architectures()


# Bring your own model (issue 18): any torchvision architecture, optionally from a weights file here. Listing the
# architectures imports torchvision and PyTorch (seconds on a fresh server), so the expander's content runs only
# while it is open (on_change="rerun"); its values are kept while it is closed (persist_state="page").
with st.expander("Model from torchvision (optional)", key="tv_open", on_change="rerun") as tv_box:
    if tv_box.open:
        g1, g2, g3, g4 = st.columns(4)
        g1.selectbox("…or a torchvision architecture", [""] + architectures(), key="tv_arch",
                     persist_state="page", help="Replaces the model of the training settings, e.g. resnet18; built "
                                                "by torchvision, nothing downloaded")
        g2.text_input("Weights file (state dict)", key="tv_weights", placeholder="/models/resnet18.pt",
                      persist_state="page", help="A local torch.save(model.state_dict()) of that architecture, under "
                      "the data root; its head is replaced for your classes. Empty: trained from scratch")
        with g2:  # outside the form: a path outside the data root is refused as soon as it is typed
            refuse_outside_root(st.session_state.get("tv_weights") or "")
        g3.text_input("Weights enum (optional)", key="tv_enum", placeholder="ResNet18_Weights.IMAGENET1K_V1",
                      persist_state="page", help="Names the file's torchvision weights: their image size and "
                      "normalisation are used (default for a file: ImageNet normalisation)")
        g4.selectbox("Fine-tune", ["all", "head"], key="tv_finetune", persist_state="page",
                     help="With a weights file: every layer (all) or only the new head (head)")
tv_arch = st.session_state.get("tv_arch") or ""
tv_weights = st.session_state.get("tv_weights") or ""
tv_enum = st.session_state.get("tv_enum") or ""
tv_finetune = st.session_state.get("tv_finetune") or "all"
if tv_arch and not tv_box.open:
    st.caption(f"Model: torchvision **{md_escape(tv_arch)}**"
               + (f" from {md_escape(tv_weights)}" if tv_weights.strip() else "") + " (open the expander to change it).")
with st.form("start"):
    noise, noise_kind, upload = 0.0, "symmetric", None
    c1, c2 = st.columns(2)
    if source == SOURCES[0]:
        noise = c1.slider("Labels to flip on purpose", 0.0, 0.5, 0.1, 0.05,
                          help="The audit should find them: precision and recall are reported against them.")
        noise_kind = c2.selectbox("Noise kind", ["symmetric", "asymmetric"],
                                  help="symmetric: to any other class; asymmetric: 2→7, 3→8, 5↔6, 7→1")
    elif source == SOURCES[3]:
        upload = st.file_uploader("Zip of an image folder laid out as <class>/<image>", type=["zip"])
    else:
        noise = c1.slider("Also flip labels on purpose (to test the audit)", 0.0, 0.5, 0.0, 0.05)
    with st.expander("Training settings"):
        d1, d2, d3, d4 = st.columns(4)
        model = d1.selectbox("Model", MODELS, index=MODELS.index(defaults.model))
        epochs = d2.number_input("Epochs", 1, 500, defaults.epochs)
        lr = d3.number_input("Learning rate", 1e-5, 10.0, defaults.lr, format="%.4f")
        batch = d4.number_input("Batch size", 1, 8192, defaults.batch_size)
        e1, e2, e3, e4 = st.columns(4)
        seed = e1.number_input("Seed", 0, 2**31 - 1, defaults.seed)
        thr = e2.checkbox("Threshold samples (Pleiss et al.)", value=defaults.threshold_samples)
        thr_runs = e3.number_input("Threshold runs", 1, 5, defaults.threshold_runs,
                                   help="2 runs with disjoint threshold sets give every sample an AUM")
        cutoff = e4.selectbox("Cut-off", ["auto", "threshold"], help="auto: mixture on AUM capped by the "
                              "threshold-sample rule; threshold: the paper's 99th percentile rule")
        f1, f2, _, _ = st.columns(4)
        loader = f1.selectbox("Input pipeline", LOADERS, index=LOADERS.index(defaults.loader),
                              help="memory: decode once and keep every image on the training device; stream: read "
                                   "batches from disk with DataLoader worker processes (data larger than memory); "
                                   "auto: stream above 4 GiB of decoded images, or a quarter of the GPU's free memory")
        workers = f2.number_input("Decoding workers", 0, 64, value=None, placeholder="auto",
                                  help="DataLoader worker processes for image files (auto: spare cores, at most 8)")
    allowed = may_run_audits()
    submitted = st.form_submit_button("Start audit", type="primary", disabled=not allowed)
    if not allowed:
        st.caption("Your role is reviewer: you can review and export runs, not start, resume or cancel audits.")

if submitted and may_run_audits():
    try:
        if source == SOURCES[0]:
            dataset = "digits"
        elif source == SOURCES[3]:
            if upload is None:
                raise DatasetError("choose a .zip file to upload first")
            dataset = str(extract_image_zip(upload.getvalue(), runs_root() / "uploads"))
        else:
            if not path.strip():
                raise DatasetError("type the path of an image folder or a .csv manifest")
            dataset = str(resolve_user_path(path))
            if source == SOURCES[2] and not dataset.lower().endswith(".csv"):
                raise DatasetError(f"{dataset!r} is not a .csv manifest; pick 'Image folder' for a folder")
        cfg = AuditConfig(
            dataset=dataset, noise=float(noise), noise_kind=noise_kind, model=model, epochs=int(epochs), lr=float(lr),
            batch_size=int(batch), seed=int(seed), threshold_samples=bool(thr), threshold_runs=int(thr_runs),
            cutoff=cutoff if thr else "auto", loader=loader, workers=None if workers is None else int(workers),
            corruptions=corruptions or None,
            ood_folder=str(resolve_user_path(ood_folder)) if ood_folder.strip() else None,
            holdout_classes=parse_class_list(holdout),
        )
        if tv_arch:
            cfg.model = f"torchvision:{tv_arch}"
            cfg.weights = str(resolve_user_path(tv_weights)) if tv_weights.strip() else None
            cfg.weights_enum, cfg.finetune = tv_enum.strip() or None, tv_finetune
        run = job_manager().start(cfg)  # checks the settings; the worker reads the dataset
    except ValueError as exc:  # ConfigError, DatasetError, PathRefused, RunBusy
        st.error(f"Cannot start: {md_escape(exc)}")
    else:
        select_run(run.id)
        st.rerun()

st.caption("Audits run one at a time in the background; a second one waits in the queue. "
           "You can switch pages or reload: the audit keeps going.")

run = current_run()
if run is None:
    st.info("No audit yet: press **Start audit** above (the defaults audit digits with 10% flipped labels).")
    st.stop()

jobs = job_manager()
active = run.status().get("state") in ("running", "pending")


# Mid-tone colours readable on the light and the dark theme's background.
PASS_COLORS = ["#4c78a8", "#f58518", "#54a24b", "#b279a2", "#e45756"]


@st.cache_data(max_entries=16, show_spinner=False)
def curves_of(path: str, epochs_done: tuple, n_history: int):
    """``training_curves`` of the run, read again only when an epoch finishes."""
    return training_curves(Run(path))


def curves_chart(status: dict) -> None:
    """Training loss and accuracy per epoch, one line per pass (live: the fragment redraws it as epochs finish)."""
    curves = curves_of(str(run.path), tuple(status.get("epochs_done") or ()), len(status.get("history") or []))
    if curves.empty:
        return
    fig = make_subplots(rows=1, cols=2, subplot_titles=("Training loss", "Training accuracy"), horizontal_spacing=0.08)
    passes = sorted(curves["pass"].unique())
    several = int(status.get("passes") or 1) > 1 or len(passes) > 1
    for p in passes:
        c = curves[curves["pass"] == p]
        epoch = (c["epoch"] + 1).tolist()  # plain lists: a few numbers, readable in the figure's JSON
        name = f"pass {p + 1}" if several else "training"
        color = PASS_COLORS[p % len(PASS_COLORS)]  # one colour per pass in both panels
        fig.add_trace(go.Scatter(x=epoch, y=c["loss"].tolist(), mode="lines+markers", name=name, legendgroup=name,
                                 line=dict(color=color),
                                 hovertemplate="epoch %{x}<br>loss %{y:.4f}<extra>" + name + "</extra>"), row=1, col=1)
        fig.add_trace(go.Scatter(x=epoch, y=c["accuracy"].tolist(), mode="lines+markers", name=name, legendgroup=name,
                                 line=dict(color=color),
                                 showlegend=False, hovertemplate="epoch %{x}<br>accuracy %{y:.1%}<extra>" + name
                                 + "</extra>"), row=1, col=2)
    fig.update_xaxes(title_text="epoch", tickformat="d", dtick=max(1, int(curves["epoch"].max() + 1) // 8))
    fig.update_yaxes(title_text="mean loss", rangemode="tozero", row=1, col=1)
    fig.update_yaxes(title_text="share predicted as its target", tickformat=".0%", row=1, col=2)
    fig.update_layout(height=300, margin=dict(t=30, b=40), legend=dict(orientation="h", y=-0.25))
    st.plotly_chart(fig, width="stretch", key=f"curves-{run.id}", config={"displayModeBar": False})
    if (curves["source"] == "dynamics").any():
        st.caption("Some epochs have no recorded history: their values are read back from the run's dynamics arrays "
                   "(mean loss, share predicted as the given label) over a subset of up to 50,000 trained samples.")
    elif several:
        st.caption("Each pass trains a fresh model with its own threshold samples (given a fake extra class): they count "
                   "in its loss; its accuracy is over the samples trained on their real class.")


@st.fragment(run_every=1.0 if active else None)
def progress() -> None:
    status = run.status()
    state = status.get("state")
    seen = f"seen-state-{run.id}"
    if st.session_state.setdefault(seen, state) != state:  # queued -> running: refresh the sidebar too
        st.session_state[seen] = state
        st.rerun()
    epochs, passes = int(status.get("epochs") or run.config()["epochs"]), int(status.get("passes") or 1)
    done = sum(status.get("epochs_done") or [])
    total = epochs * passes
    shown, detail = jobs.state_of(run)  # as the sidebar says it: a queued job is pending, a started one running
    st.subheader(f"Run `{run.id}`: {shown}" + (f" ({detail})" if detail else ""))
    st.progress(done / total if total else 0.0, text=f"{done} of {total} epochs ({passes} pass(es) × {epochs})")
    hist = status.get("history") or []
    if hist:
        last = hist[-1]
        elapsed = sum(h["seconds"] for h in hist)
        eta = elapsed / len(hist) * (total - done) if state == "running" else 0
        m = st.columns(5)
        m[0].metric("Pass", f"{last['pass'] + 1} / {passes}")
        m[1].metric("Epoch", f"{last['epoch'] + 1} / {epochs}")
        m[2].metric("Loss", f"{last['loss']:.3f}")
        m[3].metric("Train accuracy", f"{last['accuracy']:.1%}")
        m[4].metric("Elapsed · ETA", f"{fmt_seconds(elapsed)} · {fmt_seconds(eta)}")
        pipe = status.get("input_pipeline")
        if pipe:
            way = "streamed from disk" if pipe["loader"] == "stream" else "held in memory"
            st.caption(f"Images {way} on {pipe['device']}, {pipe['workers']} decoding worker(s).")
    curves_chart(status)
    if status.get("phase") == "preparing" or detail == "reading the dataset":
        st.info("Reading the dataset: file list, image headers, decoding and normalisation statistics…")
    elif shown == "pending" and detail != "cancelling":
        st.info("Queued: it starts when the audit before it ends." if detail.startswith("queued") else
                "Pending: the process that created this run has not started training it yet.")
    if state in ("running", "pending"):
        if st.button("Cancel", key=f"cancel-{run.id}", disabled=not may_run_audits()):
            if jobs.cancel(run.id):
                st.toast("Cancelling at the next batch; finished epochs are kept.")
            else:  # not a job of this dashboard process: say whose it is instead of pretending
                owner = owner_of(run)
                who = describe(owner) if owner else f"process {status.get('pid')} on {status.get('host')}"
                st.warning(f"This dashboard cannot cancel run {run.id}: it belongs to {md_escape(who)}. Stop it there "
                           "(Ctrl-C or `kill -TERM` of that process; finished epochs are kept).")
        if done:
            st.caption("The AUM page already shows the finished epochs.")
    elif active:  # it ended while we watched: refresh the whole page (sidebar state, summary)
        st.rerun()


progress()

status = run.status()
state = status.get("state")
if state == "failed":
    kept = " Finished epochs are kept and can be viewed." if sum(status.get("epochs_done") or []) else ""
    st.error(f"The audit failed: {md_escape(status.get('error'))}.{kept}")
    if status.get("traceback"):
        with st.expander("Traceback"):
            st.code(status["traceback"])
if state in ("interrupted", "cancelled", "failed"):
    if state == "interrupted":
        st.warning("This audit was interrupted (its process stopped while it trained: a server restart, Ctrl-C, "
                   "a scheduler's SIGTERM or a crash). Finished epochs are kept.")
    problem = resume_problem(run, 1)
    if problem:
        st.info(md_escape(problem))
    elif st.button("Resume from the last finished epoch", key=f"resume-{run.id}", disabled=not may_run_audits()):
        try:
            jobs.resume(run)
        except ConfigError as exc:  # queued already (another tab), or owned by another process
            st.error(f"Cannot resume: {md_escape(exc)}")
        else:
            time.sleep(0.2)
            st.rerun()
summary = run.summary()
if state == "done" and summary:
    st.success(f"Done: {fmt_num(summary['n_flagged'])} of {fmt_num(summary['n_samples'])} samples flagged as likely "
               "mislabeled.")
    if "precision" in summary and summary.get("n_label_errors"):
        detection_row(summary)
        st.caption(f"Against the {summary['n_label_errors']} labels that were flipped on purpose.")
    for warning in summary.get("warnings") or []:  # what the engine changed about the data (e.g. resized images)
        st.warning(warning, icon=":material/warning:")
    st.page_link("app_pages/flagged.py", label=f"Review the {fmt_num(summary['n_flagged'])} flagged samples",
                 icon=":material/flag:")
    st.page_link("app_pages/aum.py", label="See the AUM distribution and the cut-off", icon=":material/show_chart:")
    retrain_section(run)
if state not in ("running", "pending"):
    with st.expander("Delete this run", icon=":material/delete:"):
        allowed = may(current_role(), "delete audits")
        sure = st.checkbox(f"Delete run {run.id} for good, with its scores and review decisions",
                           key=f"delete-sure-{run.id}", disabled=not allowed)
        if st.button("Delete run", key=f"delete-{run.id}", disabled=not (allowed and sure)):
            try:
                delete_run(run.path, runs_root())
            except ValueError as exc:  # owned or trained by a process meanwhile, or not in the runs folder
                st.error(f"Cannot delete: {md_escape(exc)}")
            else:
                st.rerun()
        if not allowed:
            st.caption("Your role is reviewer: only admins delete runs.")
