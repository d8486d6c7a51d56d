"""The runnable examples under examples/, run as a user runs them (small epochs)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from engine.store.runs import Run, list_runs

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_import_saved_logits_example(tmp_path):
    out = subprocess.run([sys.executable, "examples/import_saved_logits.py", "--out", str(tmp_path / "runs"),
                          "--epochs", "4"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    (run,) = list_runs(tmp_path / "runs")
    assert run.status()["state"] == "done" and len(run.samples()) == 1797
    assert "flipped labels are among" in out.stdout


@pytest.mark.slow
def test_own_loop_recorder_example(tmp_path):
    out = subprocess.run([sys.executable, "examples/own_loop_recorder.py", "--out", str(tmp_path / "runs"),
                          "--epochs", "1", "--limit", "300", "--image-size", "16"],
                         cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-2000:]
    assert (tmp_path / "runs" / "resnet18-init.pt").is_file()  # the weights file it started from
    (run,) = list_runs(tmp_path / "runs")
    run = Run(run.path)
    assert run.status()["state"] == "done" and run.n_passes() == 2
    assert (run.samples()["threshold_pass"] >= 0).sum() == 2 * (300 // 11)
    assert run.summary()["n_unscored"] == 0
