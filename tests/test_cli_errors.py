"""Bad input from the command line and the Audit page: one clear line, never a traceback or a raw int() error."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

from engine.ood.evaluate import class_indices
from engine.store.runs import list_runs
from engine.training import audit
from engine.training.config import AuditConfig, ConfigError, parse_class_list

ROOT = Path(__file__).resolve().parent.parent
APP = str(ROOT / "app.py")


def _cli(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-m", "engine", *args], capture_output=True, text=True, timeout=300,
                          cwd=ROOT, env=env)


def test_a_value_error_from_the_engine_is_one_line_and_exit_2(tmp_path):
    run, ds = audit.prepare(AuditConfig(dataset="digits", epochs=1, threshold_samples=False), tmp_path / "runs")
    audit.execute(run, ds)
    scores = run.path / "scores.parquet"
    scores.write_bytes(scores.read_bytes()[:100])  # a damaged scores table (pyarrow raises a ValueError)
    out = _cli("export", str(run.path), "--out", str(tmp_path / "x.csv"))
    assert out.returncode == 2, out.stderr
    assert "Traceback" not in out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ")


def test_holdout_class_names_that_do_not_exist_are_named_in_the_cli(tmp_path):
    out = _cli("audit", "--dataset", "digits", "--holdout-classes", "cat,dog", "--epochs", "1", "--out", str(tmp_path))
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert "'cat' is neither a class name nor an index" in out.stderr and "0, 1, 2" in out.stderr


def test_holdout_classes_by_name_or_index():
    assert parse_class_list(" dog, 0 ,") == ["dog", 0]
    assert class_indices(["dog", 0], ["bird", "cat", "dog"]) == [2, 0]
    assert class_indices(["8"], [str(i) for i in range(10)]) == [8]
    with pytest.raises(ConfigError, match="classes are bird, cat, dog"):
        class_indices(["fish"], ["bird", "cat", "dog"])


def test_the_audit_page_explains_a_bad_holdout_list(monkeypatch, tmp_path):
    monkeypatch.setenv("DIFFICULTY_AUDIT_RUNS", str(tmp_path / "runs"))
    at = AppTest.from_file(APP, default_timeout=120).run()
    at.text_input(key="ood_holdout").set_value("cat,dog")
    next(b for b in at.button if b.label == "Start audit").click().run()
    assert not at.exception, at.exception
    # The names are checked against the dataset's classes, which the background worker reads: the run fails
    # at once, and the Audit page says why.
    (run,) = list_runs(tmp_path / "runs")
    end = time.time() + 120
    while run.status()["state"] in ("pending", "running") and time.time() < end:
        time.sleep(0.2)
    at.run()
    assert not at.exception, at.exception
    errors = " ".join(e.value for e in at.error)
    assert "invalid literal" not in errors
    assert "'cat' is neither a class name nor an index" in errors.replace("\\", "")
    assert run.status()["state"] == "failed" and not run.prepared()  # nothing trained
