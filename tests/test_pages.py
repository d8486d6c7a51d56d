"""AppTest: every page rendered on a real finished run, the cut-off moved, an audit started and finished."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

from engine.store.runs import list_runs

APP = str(Path(__file__).resolve().parent.parent / "app.py")
PAGES = ["app_pages/audit.py", "app_pages/aum.py", "app_pages/datamap.py"]


def _app(monkeypatch, root) -> AppTest:
    monkeypatch.setenv("DIFFICULTY_AUDIT_RUNS", str(root))
    at = AppTest.from_file(APP, default_timeout=60)
    at.run()
    assert not at.exception, at.exception
    return at


def _text(at: AppTest) -> str:
    parts = [m.value for m in at.markdown] + [i.value for i in at.info] + [w.value for w in at.warning]
    parts += [s.value for s in at.success] + [e.value for e in at.error] + [t.value for t in at.title]
    return "\n".join(str(p) for p in parts)


@pytest.mark.parametrize("page", PAGES)
def test_pages_without_runs_say_what_to_do(monkeypatch, tmp_path, page):
    at = _app(monkeypatch, tmp_path / "empty")
    at.switch_page(page).run()
    assert not at.exception, at.exception
    assert "Start audit" in _text(at)


def test_every_page_renders_a_finished_run(monkeypatch, small_run):
    at = _app(monkeypatch, small_run.path.parent)
    assert "Done:" in _text(at)
    at.switch_page("app_pages/aum.py").run()
    assert not at.exception, at.exception
    assert len(at.get("plotly_chart")) == 4  # histogram, per-class box and bars, trajectories
    assert (small_run.path / "margin_sample.npz").is_file()
    at.switch_page("app_pages/datamap.py").run()
    assert not at.exception, at.exception
    assert len(at.get("plotly_chart")) == 1


def test_moving_the_cutoff_changes_the_flagged_count(monkeypatch, small_run):
    at = _app(monkeypatch, small_run.path.parent)
    at.switch_page("app_pages/aum.py").run()
    flagged = next(m for m in at.metric if m.label == "Flagged")
    auto = flagged.value
    next(r for r in at.radio if r.label == "Cut-off").set_value("value").run()
    slider = next(s for s in at.slider if s.label.startswith("Flag aum"))
    slider.set_value(slider.max).run()
    assert not at.exception, at.exception
    everything = next(m for m in at.metric if m.label == "Flagged").value
    assert everything != auto and everything.startswith(f"{len(small_run.samples()):,} of")
    precision = next(m for m in at.metric if m.label == "Precision").value
    assert 0.0 < float(precision) < 0.2  # flagging everything: precision = noise rate 0.1


@pytest.mark.slow
def test_start_an_audit_from_the_audit_page(monkeypatch, tmp_path):
    root = tmp_path / "runs"
    at = _app(monkeypatch, root)
    at.number_input[0].set_value(2)  # epochs
    at.button[0].click().run()  # the form's "Start audit"
    assert not at.exception, at.exception
    (run,) = list_runs(root)
    end = time.time() + 120
    while run.status()["state"] in ("pending", "running") and time.time() < end:
        time.sleep(0.5)
    assert run.status()["state"] == "done"
    at.run()
    assert "Done:" in _text(at)
    assert run.config()["epochs"] == 2 and run.config()["noise"] == 0.1


def test_bad_folder_path_says_what_to_fix(monkeypatch, tmp_path):
    monkeypatch.setenv("DIFFICULTY_AUDIT_DATA_ROOT", str(tmp_path))
    at = _app(monkeypatch, tmp_path / "runs")
    at.radio(key="source").set_value("Image folder on this machine").run()
    at.text_input[0].set_value(str(tmp_path / "no-such-folder"))
    at.button[0].click().run()
    assert not at.exception, at.exception
    (err,) = at.error
    assert "Cannot start" in err.value and "dataset folder not found" in err.value
    assert not list_runs(tmp_path / "runs")  # nothing was created


@pytest.mark.slow
def test_sample_folder_audit_from_the_page(monkeypatch, tmp_path):
    at = _app(monkeypatch, tmp_path / "runs")
    at.radio(key="source").set_value("Image folder on this machine").run()
    at.text_input[0].set_value(str(Path(APP).parent / "sample_data" / "digits_folder"))
    at.number_input[0].set_value(1)
    at.button[0].click().run()
    assert not at.exception, at.exception
    (run,) = list_runs(tmp_path / "runs")
    assert run.config()["dataset"].endswith("digits_folder")
    end = time.time() + 120
    while run.status()["state"] in ("pending", "running") and time.time() < end:
        time.sleep(0.5)
    assert run.status()["state"] == "done"
    assert len(run.samples()) == 300  # read by the background worker, not by the page


# Opens every page of the app on the runs folder argv[1] in a fresh interpreter and prints, after each, whether
# PyTorch / torchvision were imported (a cold import of PyTorch made the Audit page's first open take seconds).
_IMPORTS = """
import sys
from streamlit.testing.v1 import AppTest
at = AppTest.from_file(sys.argv[2], default_timeout=120).run()
assert not at.exception, at.exception
print("audit", "torch" in sys.modules, "torchvision" in sys.modules)
for page in ("aum", "flagged", "scores", "datamap", "ood"):
    at.switch_page(f"app_pages/{page}.py").run()
    assert not at.exception, (page, at.exception)
    print(page, "torch" in sys.modules, "torchvision" in sys.modules)
at.switch_page("app_pages/audit.py").run()
at.session_state["tv_open"] = True  # the torchvision expander opened: its content runs, the list needs torchvision
at.run()
assert not at.exception, at.exception
assert "resnet18" in at.selectbox(key="tv_arch").options
print("torchvision-list", "torch" in sys.modules, "torchvision" in sys.modules)
"""


def test_pages_open_without_importing_pytorch(small_run):
    import os
    import subprocess
    import sys

    env = dict(os.environ, DIFFICULTY_AUDIT_RUNS=str(small_run.path.parent))
    out = subprocess.run([sys.executable, "-c", _IMPORTS, str(small_run.path.parent), APP], env=env, cwd=Path(APP).parent,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    seen = {line.split()[0]: line.split()[1:] for line in out.stdout.splitlines() if line.strip()}
    for page in ("audit", "aum", "flagged", "scores", "datamap", "ood"):
        assert seen[page] == ["False", "False"], f"opening the {page} page imported PyTorch: {seen}"
    assert seen["torchvision-list"] == ["True", "True"]
