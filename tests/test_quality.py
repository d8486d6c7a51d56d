"""Detection quality with default settings (forward correction), noise estimate (summary.json
``noise_estimate``) and ``engine retrain``: does cleaning help."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from engine.cli import main
from engine.scores.noise import (
    estimated_joint,
    most_likely_true,
    noise_estimate,
    noise_rates,
    transition_matrix,
    true_joint,
)
from engine.training import audit
from engine.training.config import AuditConfig, ConfigError
from engine.training.retrain import cleaned_labels

ROOT = Path(__file__).resolve().parent.parent


def test_transition_matrix_from_confusion_of_given_and_predicted():
    # confusion[given, predicted]: of the samples predicted 0, 8 were given 0 and 2 given 1 -> T[0] = [.8, .2, 0]
    confusion = np.array([[8, 0, 0], [2, 5, 0], [0, 0, 0]])
    t = transition_matrix(confusion)
    np.testing.assert_allclose(t, [[0.8, 0.2, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])  # class 2 never predicted
    np.testing.assert_allclose(t.sum(axis=1), 1.0)


def test_forward_correction_estimates_t_then_corrects_the_loss():
    """A sample counts as truly of the class the network predicted in every estimation epoch (else as its given
    label); T at the end of the last one, then ``-log (softmax(z) @ T)[y]``. The fake class of threshold
    samples is neither counted nor corrected."""
    import torch
    import torch.nn.functional as F

    from engine.training.correction import ForwardCorrection

    cfg = AuditConfig(epochs=30)
    assert cfg.correction_epoch == 5 and AuditConfig(epochs=30, forward_correction=False).correction_epoch is None
    assert AuditConfig(epochs=30, sat="paper").correction_epoch is None  # self-adaptive training owns the loss
    assert AuditConfig(epochs=3).correction_epoch is None  # too short to estimate first
    assert AuditConfig(epochs=12).correction_epoch == 3  # at least two estimation epochs (1, 2) before it
    corr = ForwardCorrection(cfg, n_outputs=3, n_real=2, device=torch.device("cpu"))
    assert list(corr.estimate_epochs) == [2, 3, 4]
    y = np.array([0, 1, 1, 1, 1, 2])  # the last is a threshold sample (fake class 2)
    corr.end_epoch(0, np.array([1, 1, 1, 1, 1, 1]), y)  # epoch 0 is not an estimation epoch
    assert corr.last is None
    corr.end_epoch(2, np.array([0, 0, 1, 0, 1, 2]), y)
    corr.end_epoch(3, np.array([0, 0, 1, 1, 1, 0]), y)
    assert corr.matrix is None
    logits = torch.tensor([[5.0, 0.0, 0.0], [5.0, 0.0, 0.0], [0.0, 5.0, 0.0]])
    assert corr.loss(logits, torch.tensor([0, 1, 1])) is None  # plain cross-entropy until T exists
    corr.end_epoch(4, np.array([0, 0, 1, 1, 0, 0]), y)
    # sample 1 (given 1) was predicted 0 in all three epochs: truly 0; samples 3 and 4 changed: their given label
    t = corr.matrix.numpy()
    np.testing.assert_allclose(t, [[0.5, 0.5, 0], [0, 1, 0], [0, 0, 1]])
    yb = torch.tensor([0, 1, 1])
    expected = F.nll_loss(torch.log(torch.softmax(logits, 1) @ corr.matrix), yb)
    assert torch.allclose(corr.loss(logits, yb), expected)
    resumed = ForwardCorrection(cfg, 3, 2, torch.device("cpu"))
    resumed.load_state(corr.state())  # a checkpoint keeps the predictions' streaks and T
    assert torch.equal(resumed.matrix, corr.matrix) and (resumed.streak == corr.streak).all()


def test_forward_correction_ignores_predictions_that_keep_changing():
    """An under-fitted network (its predictions still change every epoch) invents no noise: no correction."""
    import torch

    from engine.training.correction import ForwardCorrection

    corr = ForwardCorrection(AuditConfig(epochs=30), 4, 4, torch.device("cpu"))
    y = np.repeat(np.arange(4), 25)
    for epoch in (2, 3, 4):
        corr.end_epoch(epoch, (y + 1 + epoch % 2) % 4, y)  # wrong, and never the same two epochs in a row
    assert corr.matrix is None and corr.stable_fraction == 0.0
    assert corr.loss(torch.zeros((2, 4)), torch.tensor([0, 1])) is None  # plain cross-entropy


def test_forward_correction_stays_off_when_most_predictions_change():
    """When fewer than half the samples keep one prediction over the estimation epochs (a network that has not
    fitted small data yet), the few stable ones would make a T full of invented noise: the pass keeps plain
    cross-entropy. At half or more, T is estimated as before."""
    import torch

    from engine.training.correction import MIN_STABLE, ForwardCorrection

    y = np.repeat(np.arange(4), 25)
    for share, expect_t in ((0.4, False), (0.6, True)):
        corr = ForwardCorrection(AuditConfig(epochs=30), 4, 4, torch.device("cpu"))
        changing = np.arange(100) % 25 >= round(share * 25)  # the first `share` of each class keeps one prediction
        for epoch in (2, 3, 4):
            stable_pred = (y + 1) % 4  # the stable ones are always predicted as the next class
            corr.end_epoch(epoch, np.where(changing, (y + 1 + epoch % 2) % 4, stable_pred), y)
        assert corr.stable_fraction == pytest.approx(share)
        assert (corr.stable_fraction >= MIN_STABLE) == expect_t
        if expect_t:  # 15 of 25 per class counted as the next class
            np.testing.assert_allclose(np.diag(corr.matrix.numpy()), 0.4, atol=1e-6)
        else:
            assert corr.matrix is None


def test_forward_correction_options_and_old_runs():
    from engine.cli import _parser, config_from_args

    args = _parser().parse_args(["audit", "--no-forward-correction"])
    assert config_from_args(args).forward_correction is False
    args = _parser().parse_args(["audit", "--correction-start", "3"])
    assert config_from_args(args).correction_epoch == 3
    with pytest.raises(ConfigError, match="correction start"):
        AuditConfig(epochs=5, correction_start=5).validate()
    # a run saved before the correction existed keeps training (resume, retrain) without it
    old = {k: v for k, v in AuditConfig().run_dict().items() if k not in ("forward_correction", "correction_start")}
    assert AuditConfig.from_run_config(old).forward_correction is False
    assert AuditConfig(epochs=30).run_dict()["correction_start"] == 5


@pytest.mark.slow
@pytest.mark.parametrize("noise, kind, f1_bar, auroc_bar", [(0.2, "asymmetric", 0.94, 0.997),
                                                            (0.4, "symmetric", 0.97, 0.998)])
def test_default_audit_detects_flipped_digits(tmp_path, noise, kind, f1_bar, auroc_bar):
    """A default audit (30 epochs x 2 threshold runs, forward correction, automatic cut-off) on digits with
    injected noise: F1 and AUROC against the known flips clear a bar a little below what bench/detection.py
    measures over three seeds (the bench is the judge of the issue's targets; this catches a regression)."""
    run, ds = audit.prepare(AuditConfig(noise=noise, noise_kind=kind), tmp_path / "runs")
    audit.execute(run, ds)
    s = run.summary()
    assert s["n_label_errors"] == (ds.labels != ds.true_labels).sum() > 0
    assert s["f1"] >= f1_bar, s
    assert s["auroc"] >= auroc_bar, s


def test_estimated_joint_counts_flags_as_their_suggested_class():
    labels = np.array([0, 0, 0, 1, 1, 2])
    flagged = np.array([False, True, True, False, True, True])
    suggested = np.array([1, 2, -1, 0, 0, 1])
    joint = estimated_joint(labels, flagged, suggested, 3)
    # given 0: one unflagged, one flagged -> 2, one flagged without suggestion stays 0
    assert joint.tolist() == [[2, 0, 1], [1, 1, 0], [0, 1, 0]]
    np.testing.assert_allclose(noise_rates(joint), [1 / 3, 1 / 2, 1.0])
    assert most_likely_true(joint).tolist() == [2, 0, 1]


def test_noise_estimate_errors_against_known_truth():
    labels = np.array([0, 0, 0, 0, 1, 1, 1, 1])
    true = np.array([0, 0, 1, 1, 1, 1, 1, 1])  # class 0 has 50% wrong labels, class 1 none
    flagged = np.array([False, False, True, False, False, False, False, True])
    suggested = np.array([1, 1, 1, 1, 0, 0, 0, 0])
    est = noise_estimate(labels, flagged, suggested, ["a", "b"], true_labels=true)
    assert est["per_class"][0]["noise_rate"] == 0.25 and est["per_class"][0]["true_noise_rate"] == 0.5
    assert est["per_class"][1]["noise_rate"] == 0.25 and est["per_class"][1]["true_noise_rate"] == 0.0
    assert est["mae_noise_rate"] == 0.25
    assert est["per_class"][0]["most_likely_true"] == "b" and est["per_class"][0]["true_most_likely"] == "b"
    assert est["true_class_accuracy"] == 1.0  # class 0, the only one with wrong labels, points at b
    # joints normalised: est [[3,1],[1,3]]/8, truth [[2,2],[0,4]]/8 -> TV = (1+1+1+1)/8/2
    assert est["joint_tv_error"] == pytest.approx(0.25)
    assert true_joint(labels, true, 2).tolist() == [[2, 2], [0, 4]]


def test_cleaned_labels_policies_and_decisions():
    labels = np.array([0, 1, 2, 0])
    flagged = np.array([True, True, False, True])
    suggested = np.array([1, 0, 1, -1])
    agrees = np.array([True, False, False, False])
    y, keep = cleaned_labels(labels, flagged, suggested, "remove")
    assert y.tolist() == [0, 1, 2, 0] and keep.tolist() == [False, False, True, False]
    y, keep = cleaned_labels(labels, flagged, suggested, "relabel")
    assert y.tolist() == [1, 0, 2, 0] and keep.all()  # no suggestion: kept as given
    y, keep = cleaned_labels(labels, flagged, suggested, "both", agrees)
    assert y.tolist() == [1, 1, 2, 0] and keep.tolist() == [True, False, True, False]
    # a reviewer's decision wins over the policy: sample 0 "correct", sample 2 removed, sample 3 relabelled
    decided = {0: ("correct", None), 2: ("remove", None), 3: ("mislabeled", 2)}
    y, keep = cleaned_labels(labels, flagged, suggested, "remove", decided=decided)
    assert y.tolist() == [0, 1, 2, 2] and keep.tolist() == [True, False, False, True]
    with pytest.raises(ConfigError, match="--policy"):
        cleaned_labels(labels, flagged, suggested, "drop")


@pytest.mark.slow
def test_summary_noise_estimate_and_retrain_cli(tmp_path, capsys, monkeypatch):
    """A real audit of digits with 20% asymmetric noise estimates each class's noise and its true class;
    ``engine retrain`` then trains the three variants and writes retrain.json."""
    cfg = AuditConfig(dataset="digits", noise=0.2, noise_kind="asymmetric", epochs=12)
    run, ds = audit.prepare(cfg, tmp_path / "runs")
    audit.execute(run, ds)
    est = run.summary()["noise_estimate"]
    rows = {r["class"]: r for r in est["per_class"]}
    # asymmetric noise flips 2->7, 3->8, 5<->6, 7->1: the given 7s are partly 2s, the 8s partly 3s ...
    for given, true in [("7", "2"), ("8", "3"), ("5", "6"), ("6", "5"), ("1", "7")]:
        assert rows[given]["true_most_likely"] == true
        assert rows[given]["most_likely_true"] == true
    assert est["mae_noise_rate"] < 0.03
    assert abs(est["noise_rate"] - est["true_noise_rate"]) < 0.03

    assert main(["retrain", str(run.path), "--policy", "relabel", "--seeds", "1"]) == 0
    r = json.loads((run.path / "retrain.json").read_text())
    held = sum(max(1, round(0.2 * c)) for c in np.bincount(ds.true_labels))
    assert r["n_train"] == 1797 - held  # the trusted test split is held out of every training
    assert set(r["accuracy"]) == {"noisy", "cleaned", "oracle"}
    assert r["n_relabelled"] > 0.8 * (ds.labels != ds.true_labels).sum() * r["n_train"] / 1797
    # 20% asymmetric noise keeps the true class the majority of every given label: a converged model trained on the
    # noisy labels scores about as well as on the true ones (0.994 / 0.983 here, one seed), so there is little to
    # recover and "recovered" may be None; cleaning must not cost accuracy, and most relabels must be right
    # (cleaning helps under symmetric noise: bench/retrain.py, bench/RESULTS.md)
    assert r["accuracy_cleaned"] > r["accuracy_oracle"] - 0.03
    assert r["n_relabelled_right"] > 0.85 * r["n_relabelled"]
    assert "recovered" in r
    from engine.training.retrain import verdict

    assert verdict(r) in capsys.readouterr().out  # what the noise cost and what cleaning won back

    from streamlit.testing.v1 import AppTest

    monkeypatch.setenv("DIFFICULTY_AUDIT_RUNS", str(tmp_path / "runs"))
    at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=120).run()
    assert not at.exception
    assert "Does cleaning help?" in [s.value for s in at.subheader]
    at.switch_page("app_pages/aum.py").run()
    assert not at.exception
    assert "Estimated label noise per class" in [s.value for s in at.subheader]


def test_retrain_without_truth_needs_a_test_set(tmp_path, capsys):
    cfg = AuditConfig(dataset=str(ROOT / "sample_data" / "digits_folder"), noise=0.0, epochs=1, threshold_samples=False)
    run, ds = audit.prepare(cfg, tmp_path / "runs")
    audit.execute(run, ds)
    assert main(["retrain", str(run.path), "--seeds", "1"]) == 2
    assert "--test" in capsys.readouterr().err


def test_forward_correction_takes_t_from_an_earlier_pass():
    """Pass p >= 1 is handed pass p - 1's T (``prior``): when its own estimation epochs pass the stability guard it
    trains on that T, each row made diagonally dominant by ``PRIOR_MARGIN`` (a swapped pair estimated at 50 / 50
    would merge the two classes), not on its own early-epoch estimate; below the guard it keeps plain
    cross-entropy as before."""
    import torch

    from engine.training.correction import PRIOR_MARGIN, ForwardCorrection, dominant_rows

    prior = np.array([[0.9, 0.1, 0, 0], [0, 1, 0, 0], [0, 0, 0.5, 0.5], [0, 0, 0.45, 0.55]])
    t = dominant_rows(prior, 0.3)
    np.testing.assert_allclose(t[:2], prior[:2])  # rows already dominant by 0.3 or more are kept
    np.testing.assert_allclose(t.sum(axis=1), 1.0)
    np.testing.assert_allclose([t[2, 2] - t[2, 3], t[3, 3] - t[3, 2]], [0.3, 0.3])
    assert t[2, 3] > 0 and t[3, 2] > 0  # the pair keeps its noise, less of it

    y = np.repeat(np.arange(4), 25)
    for share, expect_t in ((0.4, False), (0.6, True)):
        corr = ForwardCorrection(AuditConfig(epochs=30), 5, 4, torch.device("cpu"), prior=prior)
        changing = np.arange(100) % 25 >= round(share * 25)
        for epoch in (2, 3, 4):
            corr.end_epoch(epoch, np.where(changing, (y + 1 + epoch % 2) % 4, y), y)
        if expect_t:
            expected = np.eye(5)
            expected[:4, :4] = dominant_rows(prior, PRIOR_MARGIN)
            np.testing.assert_allclose(corr.matrix.numpy(), expected, atol=1e-6)  # the prior, not the identity
        else:
            assert corr.matrix is None


@pytest.mark.slow
def test_second_pass_trains_on_the_first_pass_noise_estimate(tmp_path):
    """A real two-pass audit: pass 1's T is the one ``earlier_pass_transition`` reads from pass 0's flags and
    suggested classes (recomputed here from pass 0's dynamics on disk), and is closer to the injected noise than
    pass 0's own early-epoch estimate."""
    import torch

    from engine.capture.dynamics import area_under_margin
    from engine.scores.registry import pass_cutoff
    from engine.training.correction import PRIOR_MARGIN, dominant_rows

    cfg = AuditConfig(noise=0.3, noise_kind="asymmetric", epochs=12)
    run, ds = audit.prepare(cfg, tmp_path / "runs")
    audit.execute(run, ds)
    samples = run.samples()
    labels, tpass = samples["label"].to_numpy(), samples["threshold_pass"].to_numpy()
    margin = np.asarray(run.dynamics(0, "margin"))
    aum = area_under_margin(margin, 1)
    kept = tpass != 0
    cut = pass_cutoff("auto", aum[kept], aum[~kept], 99.0, 0)
    other = np.asarray(run.dynamics(0, "other"))[1:]
    votes = np.stack([(other == k).sum(axis=0) for k in range(10)])
    flagged = kept & (aum < cut)
    joint = estimated_joint(labels, flagged, votes.argmax(axis=0), 10, kept)
    t_prior = dominant_rows(transition_matrix(joint), PRIOR_MARGIN)
    t_pass = [torch.load(run.path / "checkpoints" / f"pass{p}.pt", weights_only=True)["correction_matrix"].numpy()[:10, :10]
              for p in (0, 1)]
    np.testing.assert_allclose(t_pass[1], t_prior, atol=1e-6)
    truth = transition_matrix(true_joint(labels, samples["true_label"].to_numpy(), 10))
    assert np.abs(t_pass[1] - truth).sum() < 0.5 * np.abs(t_pass[0] - truth).sum()


@pytest.mark.slow
def test_a_model_trained_to_be_evaluated_ends_converged_whatever_the_seed():
    """``engine retrain`` and the k-fold scores evaluate the last epoch's model, so it must not depend on where a
    constant learning rate happened to leave it: with the audit's constant 0.05 the same noisy-label training scored
    0.22-0.76 over three seeds (digits, 20% symmetric noise), which made "recovered" a measure of luck. Annealed,
    every seed lands near the others."""
    import dataclasses

    from engine.data.datasets import load_dataset, take
    from engine.scores.extra import fit_predict
    from engine.training.retrain import _trusted_split

    cfg = AuditConfig(dataset="digits", noise=0.2, epochs=12, threshold_samples=False, forward_correction=False)
    ds = load_dataset(cfg.dataset, cfg.noise, cfg.noise_kind, 0)
    held = _trusted_split(ds.true_labels, 0.2, 0)
    acc = []
    for s in range(3):
        probs = fit_predict(dataclasses.replace(cfg, seed=s), take(ds.images, ~held), ds.labels[~held],
                            take(ds.images, held), ds.n_classes, 200 + s)
        acc.append(float((probs.argmax(1) == ds.true_labels[held]).mean()))
    assert min(acc) > 0.85, acc
    assert max(acc) - min(acc) < 0.06, acc


def test_retrain_verdict_says_when_the_noise_cost_nothing():
    from engine.training.retrain import verdict

    assert verdict({"recovered": 0.97}) == "Cleaning recovered 97% of the accuracy lost to noise."
    r = {"recovered": None, "accuracy_noisy": 0.994, "accuracy_cleaned": 0.978, "accuracy_oracle": 0.983}
    assert verdict(r) == ("The noisy labels cost no test accuracy here (noisy 99.4%, oracle 98.3%): nothing to "
                          "recover; cleaning changed it by -1.6%.")
    assert verdict({"accuracy_noisy": 0.9, "accuracy_cleaned": 0.95}) is None  # a user's test set, no oracle
