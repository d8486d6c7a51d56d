"""On-demand scores: hand-checked pieces, parity with cleanlab, and a real run end to end."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from engine import extra_scores as xs
from engine.audit import finalize


def test_self_confidence_matches_cleanlab():
    from cleanlab.rank import get_self_confidence_for_each_label

    rng = np.random.default_rng(0)
    probs = rng.dirichlet(np.ones(5), size=200)
    labels = rng.integers(0, 5, 200)
    np.testing.assert_allclose(xs.self_confidence(probs, labels), 1 - get_self_confidence_for_each_label(labels, probs))
    np.testing.assert_allclose(xs.cv_loss(probs, labels), -np.log(probs[np.arange(200), labels]))


def test_prediction_depth_by_hand():
    model = np.array([0, 0, 1, 1])
    probes = [np.array([1, 0, 1, 0]), np.array([0, 1, 1, 1]), np.array([0, 0, 1, 1])]
    # per sample, probes agreeing with the model: FTT -> trailing 2 -> 1/3; TFT -> 1 -> 2/3; TTT -> 0; FTT -> 1/3
    assert xs.prediction_depth_from(probes, model).tolist() == pytest.approx([1 / 3, 2 / 3, 0.0, 1 / 3])


def test_leave_one_out_knn_ignores_the_sample_itself():
    x = np.array([[0.0], [0.1], [0.2], [5.0], [5.1], [9.0]])
    labels = np.array([0, 0, 0, 1, 1, 2])
    loo = xs.knn_predictions(x, labels, k=1, leave_one_out=True, n_classes=3)
    assert loo.tolist() == [0, 0, 0, 1, 1, 1]  # the lone class-2 point takes its nearest other point's label
    assert xs.knn_predictions(x, labels, k=1, leave_one_out=False, n_classes=3)[5] == 2  # it votes for itself


def test_random_is_seeded():
    assert (xs.random_score(10, 3) == xs.random_score(10, 3)).all() and not (xs.random_score(10, 3) == xs.random_score(10, 4)).all()


def test_compute_on_a_real_run_and_finalize_keeps_them(small_run):
    written = xs.compute(small_run, ["random", "prediction_depth", "transfer_teacher"])
    table = small_run.scores()
    assert set(written) == {"random", "prediction_depth", "transfer_teacher"}
    assert table["prediction_depth"].between(0, 1).all() and table["transfer_teacher"].between(0, 1).all()
    samples = small_run.samples()
    err = (samples["label"] != samples["true_label"]).to_numpy()
    assert table["transfer_teacher"][err].mean() > table["transfer_teacher"][~err].mean() + 0.2
    finalize(small_run)  # a re-finalize (resume) must not drop scores computed on demand
    assert "transfer_teacher" in small_run.scores().columns


def test_cv_scores_on_a_real_run(small_run):
    xs.compute(small_run, ["cv_loss", "self_confidence"], folds=2)
    table = small_run.scores()
    samples = small_run.samples()
    err = (samples["label"] != samples["true_label"]).to_numpy()
    assert table["self_confidence"][err].mean() > table["self_confidence"][~err].mean()


def test_cli_score_rejects_unknown_names(small_run):
    r = subprocess.run([sys.executable, "-m", "engine", "score", str(small_run.path), "aum", "nope"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "on-demand scores are" in r.stderr


def test_scores_page_computes_in_the_background(monkeypatch, small_run, tmp_path):
    import shutil
    import time
    from pathlib import Path

    from streamlit.testing.v1 import AppTest

    from engine.runs import Run, atomic_write_parquet

    shutil.copytree(small_run.path, tmp_path / "runs" / small_run.id)  # a run of its own: other tests add scores
    small_run = Run(tmp_path / "runs" / small_run.id)
    table = small_run.scores()
    atomic_write_parquet(small_run.path / "scores.parquet", table.drop(columns=[c for c in xs.EXTRA if c in table]))
    monkeypatch.setenv("DIFFICULTY_AUDIT_RUNS", str(tmp_path / "runs"))
    at = AppTest.from_file(str(Path(__file__).resolve().parent.parent / "app.py"), default_timeout=60)
    at.run()
    at.switch_page("app_pages/scores.py").run()
    at.multiselect(key="extra_pick").set_value(["random"]).run()
    at.button(key="extra_go").click().run()
    assert not at.exception, at.exception
    end = time.time() + 60
    while "random" not in small_run.scores().columns and time.time() < end:
        time.sleep(0.2)
    at.run()
    assert "random" in next(m for m in at.multiselect if m.label == "Scores").options


def test_cli_ensemble_of_two_runs(small_run, tmp_path):
    import pandas as pd

    r = subprocess.run([sys.executable, "-m", "engine", "ensemble", str(small_run.path), str(small_run.path),
                        "--score", "aum", "--normalize", "--out", str(tmp_path / "e.csv")],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    e = pd.read_csv(tmp_path / "e.csv")
    assert len(e) == len(small_run.samples()) and (e["n_runs"] == 2).all() and e["aum"].between(0, 1).all()
