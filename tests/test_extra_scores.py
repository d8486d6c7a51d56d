"""On-demand scores: hand-checked pieces, parity with cleanlab, and a real run end to end."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from engine.scores import extra as xs
from engine.training.audit import finalize


def test_self_confidence_matches_cleanlab():
    from cleanlab.rank import get_self_confidence_for_each_label

    rng = np.random.default_rng(0)
    probs = rng.dirichlet(np.ones(5), size=200)
    labels = rng.integers(0, 5, 200)
    log_p = np.log(probs)
    np.testing.assert_allclose(xs.self_confidence(log_p, labels), get_self_confidence_for_each_label(labels, probs))
    np.testing.assert_allclose(xs.cv_loss(log_p, labels), -np.log(probs[np.arange(200), labels]))


def test_cv_loss_of_very_wrong_samples_is_not_capped():
    """``-log(clip(softmax, 1e-12))`` in float32 tied both at 27.6 nats; log_softmax of the logits gives 40 and 60."""
    import torch

    logits = torch.tensor([[0.0, 40.0], [0.0, 60.0], [3.0, 0.0]])
    loss = xs.cv_loss(xs.log_probs(logits), np.array([0, 0, 0]))
    np.testing.assert_allclose(loss, [40.0, 60.0, np.log1p(np.exp(-3.0))], rtol=1e-12)


def test_transfer_teacher_probabilities_are_out_of_fold():
    """On features carrying no information about the labels, an SVM scored on its own training samples
    believes their given labels; out of fold, P(given label) stays at chance (1/4 here)."""
    rng = np.random.default_rng(0)
    emb, labels = rng.normal(size=(400, 64)), rng.integers(0, 4, 400)
    p = xs.svm_out_of_fold(emb, labels, seed=0)
    assert abs(p.mean() - 0.25) < 0.03
    again = xs.svm_out_of_fold(emb, labels, seed=0)
    np.testing.assert_array_equal(p, again)  # seeded folds


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


@pytest.mark.slow
def test_compute_on_a_real_run_and_finalize_keeps_them(own_small_run):
    run = own_small_run
    written = xs.compute(run, ["random", "prediction_depth", "transfer_teacher"], seed=4)
    table = run.scores()
    assert set(written) == {"random", "prediction_depth", "transfer_teacher"}
    np.testing.assert_array_equal(table["random"], xs.random_score(len(table), 4))
    depth = table["prediction_depth"].to_numpy() * 5  # 5 probes (input, 3 blocks, output): depths are k / 5
    np.testing.assert_allclose(depth, np.round(depth), atol=1e-9)
    samples = run.samples()
    err = (samples["label"] != samples["true_label"]).to_numpy()
    # Depth tracks difficulty for the model (Baldock et al. 2021), not label errors: a mislabeled sample the model
    # does not memorise is predicted as its true class, which its neighbours' labels agree with at every probe
    # (depth 0). Samples the final model gets wrong sit deep (0.7-0.95 over seeds 0-3, against about 0.05).
    _, prediction, _, _ = xs._probe_features(run)
    wrong = prediction != samples["true_label"].to_numpy()
    assert wrong.sum() >= 10
    assert table["prediction_depth"][wrong].mean() > table["prediction_depth"][~wrong].mean() + 0.4
    assert table["transfer_teacher"][err].mean() < table["transfer_teacher"][~err].mean() - 0.2  # P(given label)
    finalize(run)  # a re-finalize (resume) must not drop scores computed on demand
    np.testing.assert_array_equal(run.scores()["transfer_teacher"], table["transfer_teacher"])


@pytest.mark.slow
def test_cv_scores_on_a_real_run(own_small_run):
    xs.compute(own_small_run, ["cv_loss", "self_confidence"], folds=2)
    table = own_small_run.scores()
    samples = own_small_run.samples()
    err = (samples["label"] != samples["true_label"]).to_numpy()
    assert table["self_confidence"][err].mean() < table["self_confidence"][~err].mean()  # p(given label): low = issue
    np.testing.assert_allclose(table["self_confidence"], np.exp(-table["cv_loss"]), rtol=1e-9)


def test_cli_score_rejects_unknown_names(small_run):
    r = subprocess.run([sys.executable, "-m", "engine", "score", str(small_run.path), "aum", "nope"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "on-demand scores are" in r.stderr


def test_scores_page_computes_in_the_background(monkeypatch, own_small_run, tmp_path):
    import time
    from pathlib import Path

    from streamlit.testing.v1 import AppTest

    from engine.store.runs import atomic_write_parquet

    small_run = own_small_run  # a run of its own: the page adds a score
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
    heat = next(m for m in at.multiselect if m.label == "Scores")
    assert "random (high = suspicious)" in heat.options and "random" in heat.value  # a new score starts selected


def test_cli_ensemble_of_two_runs(small_run, own_small_run, tmp_path):
    """Two runs whose ``aum`` rank the samples in opposite orders: rank-normalised, every sample averages to 0.5;
    a sample missing from one run keeps the other run's value."""
    import pandas as pd

    from engine.store.runs import atomic_write_parquet

    other = own_small_run.scores()
    other["aum"] = -other["aum"].rank(method="first")  # exactly the reverse order of the first run's ranks
    atomic_write_parquet(own_small_run.path / "scores.parquet", other.iloc[1:])  # and without the first sample
    r = subprocess.run([sys.executable, "-m", "engine", "ensemble", str(small_run.path), str(own_small_run.path),
                        "--score", "aum", "--normalize", "--out", str(tmp_path / "e.csv")],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    e = pd.read_csv(tmp_path / "e.csv").set_index("sample_id")
    first = small_run.scores()
    assert len(e) == len(first)
    missing = first["sample_id"].iloc[0]
    assert e.loc[missing, "n_runs"] == 1
    r1 = first["aum"].rank(method="first")
    expected = (r1 - 1) / (len(first) - 1)  # the first run's rank-normalised value
    assert e.loc[missing, "aum"] == pytest.approx(expected.iloc[0])
    both = e.drop(index=missing)
    assert (both["n_runs"] == 2).all()
    n2 = len(first) - 1  # the second run ranks the others in reverse: (r1' + r2') / 2 per sample
    r1_rest = first["aum"].iloc[1:].rank(method="first")
    want = ((expected.iloc[1:].to_numpy() + (n2 - r1_rest.to_numpy()) / (n2 - 1)) / 2)
    np.testing.assert_allclose(both.loc[first["sample_id"].iloc[1:], "aum"].to_numpy(), want, atol=1e-12)
