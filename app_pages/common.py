"""Shared pieces of the pages: the job manager, the run picker, cached reads of a run.

Not a page itself: app.py lists the pages with st.navigation.
"""

from __future__ import annotations

import html
import re

import numpy as np
import pandas as pd
import streamlit as st

from engine.ui import (
    NOBODY,
    POLICY_FILE,
    PREDEFINED_FILE,
    SIGNED_OUT,
    JobManager,
    PathRefused,
    Run,
    RunError,
    SampleImages,
    identity,
    list_runs,
    live_scores,
    may,
    resolve_user_path,
    reviewer_name,
    role_of,
    runs_root,
    sign_in_configured,
    summary_line,
)

STATE_ICONS = {"running": ":material/autorenew:", "pending": ":material/hourglass_empty:", "done": ":material/check_circle:",
               "failed": ":material/error:", "cancelled": ":material/stop_circle:", "interrupted": ":material/warning:"}


@st.cache_resource
def job_manager() -> JobManager:
    """One job manager per server process, shared by every session and rerun."""
    return JobManager()


# Markdown, HTML and Streamlit-directive metacharacters. Quotes are left alone: they only matter inside a link or
# an HTML tag, whose brackets are escaped, and an escaped quote would read as such in messages ('cat' is ...).
_MD_SPECIAL = re.compile(r"([\\`*_{}\[\]()#+\-.!|<>:~$&=^%@/])")


def md_escape(value: object) -> str:
    """``value`` as literal text inside Streamlit markdown (st.markdown, st.caption, st.error, labels, badges): no
    link, image, HTML, formula, colour directive or formatting.

    The one escape of the pages for markdown. Every markdown and HTML metacharacter is backslash-escaped
    (CommonMark shows it as itself); line breaks become spaces. Use it for anything a dataset, a file or a
    user chose: sample ids, class names, paths, and messages that quote them (errors).
    """
    return _MD_SPECIAL.sub(r"\\\1", " ".join(str(value).split()))


def _user() -> dict:
    """``st.user`` as a plain dict (empty outside a session)."""
    try:
        return dict(st.user)
    except Exception:  # no script context (bare mode)
        return {}


def _roles_config() -> dict | None:
    """The ``[roles]`` section of ``.streamlit/secrets.toml`` (engine.jobs.access), or None without one."""
    try:
        roles = st.secrets.get("roles")
    except Exception:  # no secrets file at all
        return None
    return dict(roles) if roles else None


def current_role() -> str:
    """The signed-in user's role (``engine.jobs.access.role_of``); ``admin`` in local mode (no sign-in configured)."""
    return role_of(_user(), _roles_config())


def may_run_audits() -> bool:
    """Whether this user may start, resume or cancel audits and compute scores (not a reviewer-only role)."""
    return may(current_role(), "run audits")


def current_reviewer(typed: str | None = None) -> str | None:
    """The reviewer name recorded with decisions: the signed-in user's email or name, else the name typed."""
    return reviewer_name(_user(), typed)


def require_access() -> None:
    """With sign-in configured: a sign-in screen for the signed out, a refusal for users listed in no role, and
    who is signed in (with a log-out button) in the sidebar. Nothing in local mode. app.py calls it first."""
    user = _user()
    if not sign_in_configured(user):
        return
    role = current_role()
    if role == SIGNED_OUT:
        st.title("difficulty-audit")
        st.write("Sign in to open the dashboard.")
        st.button("Sign in", type="primary", on_click=st.login)
        st.stop()
    if role == NOBODY:
        st.error(f"Signed in as {md_escape(identity(user))}, who is not listed in the dashboard's roles. Ask an admin to add "
                 "you to `[roles]` in `.streamlit/secrets.toml`.")
        st.button("Sign out", on_click=st.logout)
        st.stop()
    with st.sidebar:
        st.caption(f"Signed in as **{md_escape(identity(user))}** ({role})")
        st.button("Sign out", on_click=st.logout, key="sign-out")


def state_badge(run: Run) -> str:
    """``:material/hourglass_empty: pending · queued, 1 job(s) ahead``: the run's state as this dashboard knows it
    (``JobManager.state_of``: a job waiting in the queue is pending, one the worker started is running)."""
    state, detail = job_manager().state_of(run)
    return f"{STATE_ICONS.get(state, '')} {state}" + (f" · {detail}" if detail else "")


ACTIVE_STATES = ("running", "pending")
STATE_REFRESH_S = 2.0  # how often the sidebar reads the states again while a run is queued or running


def _sidebar_states(run: Run, runs: list[Run]) -> None:
    """The chosen run's state and the list of every run's, kept current: while any run is queued or running they
    are read again every ``STATE_REFRESH_S`` seconds (a fragment: only these lines rerun), on every page. When the
    chosen run leaves the state the page was drawn in for one that is not live any more, the whole page reruns
    (its content depends on it)."""
    live = any(r.status().get("state") in ACTIVE_STATES for r in runs)
    drawn = run.status().get("state")

    @st.fragment(run_every=STATE_REFRESH_S if live else None)
    def states() -> None:
        now = run.status().get("state")
        if now != drawn and now not in ACTIVE_STATES:  # (the whole run that follows draws it with drawn == now)
            st.rerun()
        st.markdown(f"State: **{state_badge(run)}**")
        with st.expander(f"All runs ({len(runs)})"):
            st.markdown("\n".join(f"- `{r.id}` {state_badge(r)}" for r in runs))

    states()


def current_run() -> Run | None:
    """The run chosen in the sidebar (kept in the URL as ?run=ID so a reload keeps it)."""
    return st.session_state.get("_current_run")


_PENDING = "_select_run_next"


def select_run(run_id: str) -> None:
    """Show ``run_id`` from the next rerun on (call ``st.rerun()`` after it).

    The sidebar's picker already exists when a page starts a run, and a widget's key cannot be set after
    the widget was drawn in the same run (``StreamlitWidgetAlreadyInstantiatedError``): the id waits
    here and ``sidebar_run_picker`` applies it before drawing the picker.
    """
    st.session_state[_PENDING] = run_id
    st.query_params["run"] = run_id


def sidebar_run_picker() -> Run | None:
    """Draw the sidebar (title, runs folder, run picker) and return the chosen run (app.py calls it before the page)."""
    runs = list_runs()
    with st.sidebar:
        st.title(":material/search: difficulty-audit")
        st.caption(f"Runs folder: `{runs_root()}`")
        if not runs:
            st.info("No audits yet. Start one on the **Audit** page.")
            st.session_state["_current_run"] = None
            return None
        ids = [r.id for r in runs]
        wanted = st.query_params.get("run")
        pending = st.session_state.pop(_PENDING, None)
        if pending in ids:  # a run just started on a page: switch to it before the widget exists
            st.session_state["run_picker"] = pending
        elif "run_picker" not in st.session_state or st.session_state["run_picker"] not in ids:
            st.session_state["run_picker"] = wanted if wanted in ids else ids[0]
        by_id = {r.id: r for r in runs}
        # Labels stay fixed while a run's state changes (a widget's options must not change under it).
        chosen = st.selectbox("Run (newest first)", ids, key="run_picker")
        st.query_params["run"] = chosen
        run = by_id[chosen]
        cfg = run.config()
        _sidebar_states(run, runs)
        st.caption(policy_caption(run), help="The review policy decides which samples are flagged and their rank on "
                   "every page and in every export. Change it on the AUM page.")
        noise = f", {cfg['noise']:.0%} {cfg['noise_kind']} noise injected" if cfg.get("noise") else ""
        st.caption(f"Dataset **{md_escape(cfg['dataset'])}**{noise} · model **{md_escape(cfg['model'])}** · "
                   f"{cfg['epochs']} epochs × {cfg['threshold_runs'] if cfg['threshold_samples'] else 1} pass(es)")
        st.session_state["_current_run"] = run
        return run


def refuse_outside_root(text: str) -> bool:
    """Under a path field: say why the typed path cannot be read (``engine.data.dataroot``); True when refused."""
    if not (text or "").strip():
        return False
    try:
        resolve_user_path(text)
    except PathRefused as exc:
        st.error(f"Not allowed: {md_escape(exc)}")
        return True
    return False


@st.cache_resource(max_entries=2)
def _images(path: str) -> SampleImages:
    return SampleImages(Run(path))


def sample_images(run: Run) -> SampleImages:
    """The run's images and thumbnails, one object per run shared by every page and session."""
    return _images(str(run.path))


def policy_caption(run: Run, info: dict | None = None) -> str:
    """``Policy: aum < -0.12 (automatic) - 177 flagged``: from a page's loaded scores info when given, else the
    run's summary (cheap: no scores are read)."""
    from engine.ui import caption

    if info and info.get("policy"):
        return caption(info["policy"])
    return summary_line(run)


def require_run(what: str) -> Run:
    """The current run, or an explanation of what to do next (and stop the page)."""
    run = current_run()
    if run is None:
        st.info(f"{what} needs an audit. Go to the **Audit** page and press **Start audit** "
                "(the default, digits with 10% flipped labels, takes under a minute).")
        st.page_link("app_pages/audit.py", label="Open the Audit page", icon=":material/rocket_launch:")
        st.stop()
    return run


def _stamp(run: Run) -> tuple:
    st_ = run.raw_status()
    return (str(run.path), st_.get("state"), tuple(st_.get("epochs_done") or ()), _mtime(run.path / "scores.parquet"),
            _mtime(run.path / POLICY_FILE), _mtime(run.path / PREDEFINED_FILE))


def _mtime(p) -> float:
    try:
        return p.stat().st_mtime
    except FileNotFoundError:
        return 0.0


@st.cache_resource(max_entries=4, show_spinner="Reading the run…")
def _load(stamp: tuple) -> tuple[pd.DataFrame, dict, pd.DataFrame, list[str]]:
    """Shared, not copied, between reruns and sessions (a million rows): callers must not modify them."""
    run = Run(stamp[0])
    scores, info = live_scores(run, with_ids=False)  # ids live in `samples` (same row order)
    samples = run.samples(["sample_id", "label", "true_label", "threshold_pass"])
    return scores, info, samples, run.classes()


def load_scores(run: Run) -> tuple[pd.DataFrame, dict, pd.DataFrame, list[str]] | None:
    """Scores, cut-off info, samples and class names (cached per run state, read-only); None before the first epoch."""
    if sum(run.raw_status().get("epochs_done") or [0]) == 0:
        return None
    try:
        return _load(_stamp(run))
    except (ValueError, FileNotFoundError, RunError) as exc:
        st.warning(f"This run cannot be scored yet: {md_escape(exc)}")
        return None


def require_scores(run: Run, what: str) -> tuple[pd.DataFrame, dict, pd.DataFrame, list[str]]:
    """``load_scores``, or a note that ``what`` appears after the first epoch (and stop the page)."""
    loaded = load_scores(run)
    if loaded is None:
        st.info(f"No finished epoch yet: {what} appears after the first epoch. Watch progress on the Audit page.")
        st.stop()
    return loaded


def natural_aum(scores: pd.DataFrame) -> np.ndarray:
    """The ``aum`` column as float64: it holds AUM itself (the paper's sign, low = suspicious)."""
    return scores["aum"].to_numpy(dtype=np.float64)


def stamp(run: Run) -> tuple:
    """Changes whenever the run's data changes: a cache key for anything derived from it."""
    return _stamp(run)


def fmt_seconds(s: float) -> str:
    s = int(round(s))
    return f"{s // 60}:{s % 60:02d}" if s >= 60 else f"{s} s"


def image_grid(images, indices, captions: list[str], cols: int = 6, size: int = 96) -> None:
    """A grid of sample thumbnails with captions (the flagged page's cards use the same thumbnails)."""
    from engine.ui import ImageError

    for start in range(0, len(indices), cols):
        row = st.columns(cols)
        for col, i, cap in zip(row, indices[start : start + cols], captions[start : start + cols], strict=False):
            try:
                col.image(images.png(int(i), size), caption=cap)
            except ImageError as exc:
                col.caption(f"{md_escape(cap)}: no image ({md_escape(exc)})")


def detection_row(m: dict) -> None:
    """Precision, recall, F1 and AUROC against the known label errors, as four metrics in a row."""
    cols = st.columns(4)
    for col, (label, key) in zip(cols, [("Precision", "precision"), ("Recall", "recall"), ("F1", "f1"),
                                        ("AUROC", "auroc")], strict=True):
        col.metric(label, f"{m[key]:.3f}")


# ---- values from datasets on the page, and one number format (issue 15 item 7, issue 17 item 1) ---------------

def plot_text(value: object, max_chars: int | None = None) -> str:
    """``value`` for Plotly hover text and tick labels, which understand a few HTML tags: escaped, shown as typed.

    Quotes stay as they are (Plotly shows ``&quot;`` literally and puts no text in attributes);
    ``max_chars`` shortens long names with an ellipsis (for tick labels; give the full name in the hover).
    """
    text = " ".join(str(value).split())
    if max_chars is not None and len(text) > max_chars:
        text = text[: max_chars - 1] + "…"
    return html.escape(text, quote=False)


def fmt_num(x: float | int | None, digits: int = 3) -> str:
    """The one number format of the pages: counts with thousands separators, other values with ``digits``
    significant digits (no exponent between 0.001 and 10^6), a dash when missing."""
    if x is None:
        return "–"
    if isinstance(x, (bool, np.bool_)):
        return "yes" if x else "no"
    if isinstance(x, (int, np.integer)):
        return f"{int(x):,}"
    x = float(x)
    if not np.isfinite(x):
        return "–"
    if x == 0:
        return "0"
    if abs(x) >= 10 ** (digits - 1):
        return f"{x:,.0f}"
    if abs(x) < 1e-3:
        return f"{x:.{digits - 1}e}"
    decimals = max(0, digits - 1 - int(np.floor(np.log10(abs(x)))))
    return f"{x:,.{decimals}f}"


def fmt_pct(x: float) -> str:
    """A share in [0, 1] as a percentage with one decimal."""
    return f"{100 * float(x):.1f}%" if np.isfinite(x) else "–"


def class_axis(names) -> dict:
    """Plotly axis settings for a per-class axis whose values are the class names: categorical (so "0".."9"
    are not read as numbers), every class labelled, names escaped and long ones shortened."""
    names = [str(n) for n in names]
    return dict(type="category", tickmode="array", tickvals=names, ticktext=[plot_text(n, 24) for n in names])


# ---- samples opened from a chart (issue 15 item 5) --------------------------------------------------------------

def clicked_row(event: object) -> int | None:
    """The run row of the first clicked point of a Plotly selection event, or None when nothing was clicked.

    ``event`` is the value ``st.plotly_chart(..., on_select=..., selection_mode="points")`` keeps in
    ``st.session_state[key]``: ``{"selection": {"points": [{"customdata": ROW, ...}, ...], ...}}``. The charts
    that open samples put each point's row (its position in the run's samples) in ``customdata``, as a
    number or as the first item of a list.
    """
    try:
        points = event["selection"]["points"]  # type: ignore[index]
    except (KeyError, TypeError):
        return None
    for point in points or []:
        data = point.get("customdata") if isinstance(point, dict) else None
        if isinstance(data, (list, tuple)):
            data = data[0] if data else None
        try:
            return int(data)
        except (TypeError, ValueError):
            continue
    return None


def open_sample(row: int) -> None:
    """Open the sample at ``row``, focused, on the Flagged page (from a callback; ``follow_open`` switches)."""
    st.session_state["_open"] = int(row)
    st.session_state["_switch_to_flagged"] = True


def open_clicked(chart_key: str) -> None:
    """``on_select`` callback of a chart whose points carry their row in ``customdata``: opens the clicked sample."""
    row = clicked_row(st.session_state.get(chart_key))
    if row is not None:
        open_sample(row)


def follow_open() -> None:
    """First thing on a page whose charts open samples: go to the Flagged page when a click just opened one."""
    if st.session_state.pop("_switch_to_flagged", False):
        st.switch_page("app_pages/flagged.py")
