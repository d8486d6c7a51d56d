"""AppTest of the Audit page: audits started one after the other from the page itself (real engine, 2 epochs)."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

from engine.store.runs import list_runs

APP = str(Path(__file__).resolve().parent.parent / "app.py")


def _start(at: AppTest) -> None:
    next(ni for ni in at.number_input if ni.label == "Epochs").set_value(2)
    next(b for b in at.button if b.label == "Start audit").click().run()


@pytest.mark.slow
def test_three_audits_in_a_row_switch_to_the_newest_run(monkeypatch, tmp_path):
    """Issue 15 item 1: the second start raised StreamlitWidgetAlreadyInstantiatedError and kept the old run."""
    root = tmp_path / "runs"
    monkeypatch.setenv("DIFFICULTY_AUDIT_RUNS", str(root))
    at = AppTest.from_file(APP, default_timeout=120).run()
    assert not at.exception, at.exception
    started: list[str] = []
    for _ in range(3):
        _start(at)
        assert not at.exception, at.exception
        newest = list_runs(root)[0].id
        assert newest not in started
        started.append(newest)
        assert at.selectbox(key="run_picker").value == newest  # the sidebar follows the new run
        assert at.query_params["run"] in (newest, [newest])
        assert any(newest in s.value for s in at.subheader)  # its live progress is on the page
    assert len(list_runs(root)) == 3
    from app_pages.common import (
        job_manager,  # the same process-wide manager the page used (st.cache_resource)
    )

    for run_id in started:  # free the shared CPU: the switch is what is tested, not the training
        job_manager().cancel(run_id)
    end = time.time() + 120
    while any(r.status()["state"] in ("pending", "running") for r in list_runs(root)) and time.time() < end:
        time.sleep(0.2)
    assert {r.status()["state"] for r in list_runs(root)} <= {"done", "cancelled"}


def test_finished_run_shows_its_training_curves_and_links_to_the_flagged_page(monkeypatch, small_run):
    """Issue 15 item 7: loss and accuracy per epoch and pass (the run's own numbers); a link to review the flags."""
    import json

    monkeypatch.setenv("DIFFICULTY_AUDIT_RUNS", str(small_run.path.parent))
    at = AppTest.from_file(APP, default_timeout=60).run()
    assert not at.exception, at.exception
    specs = [json.loads(c.proto.spec) for c in at.get("plotly_chart")]
    curves = next(s for s in specs if any("Training loss" in a.get("text", "") for a in s["layout"]["annotations"]))
    history = small_run.raw_status()["history"]
    passes = sorted({h["pass"] for h in history})
    assert len(curves["data"]) == 2 * len(passes)  # a loss and an accuracy line per pass
    for trace in curves["data"]:
        p = passes[[t["name"] for t in curves["data"][::2]].index(trace["name"])]
        mine = [h for h in history if h["pass"] == p]
        want = [h["loss" if trace["yaxis"] == "y" else "accuracy"] for h in mine]
        assert trace["x"] == [h["epoch"] + 1 for h in mine]
        assert trace["y"] == pytest.approx(want)
    links = [(ln.proto.page, ln.proto.label) for ln in at.get("page_link")]
    n = small_run.summary()["n_flagged"]
    assert any(page == "flagged" and f"Review the {n:,} flagged samples" == label for page, label in links), links
