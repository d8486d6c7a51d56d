"""DDU math against references and hand-computed cases."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.special import logsumexp
from scipy.stats import multivariate_normal

from engine.ood import ddu as ood


def _blobs(seed=0, n=400, d=4):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 3, n)
    z = rng.normal(size=(n, d)) @ rng.normal(size=(d, d)) * 0.5 + y[:, None] * 3.0
    return z, y


def test_gda_matches_scipy_densities():
    z, y = _blobs()
    g = ood.fit_gda(z, y)
    assert g.jitter == 0.0
    ref = np.stack([multivariate_normal(z[y == k].mean(0), np.cov(z[y == k], rowvar=False, bias=True)).logpdf(z)
                    for k in range(3)], axis=1)
    np.testing.assert_allclose(g.class_log_likelihoods(z), ref, rtol=1e-9, atol=1e-9)
    priors = np.log(np.bincount(y) / len(y))
    np.testing.assert_allclose(g.log_density(z), logsumexp(ref + priors, axis=1), rtol=1e-9)


def test_gda_matches_sklearn_qda_means_covariances_and_priors():
    """Means, class covariances (maximum likelihood, 1/n) and priors of scikit-learn's QDA on the same data."""
    from sklearn.discriminant_analysis import QuadraticDiscriminantAnalysis

    z, y = _blobs(1)
    qda = QuadraticDiscriminantAnalysis(store_covariance=True).fit(z, y)
    g = ood.fit_gda(z, y)
    assert g.jitter == 0.0 and g.components is None
    np.testing.assert_allclose(g.means, qda.means_)
    for k in range(3):
        np.testing.assert_allclose(g.chol[k] @ g.chol[k].T, qda.covariance_[k], rtol=1e-10)
        np.testing.assert_allclose(qda.covariance_[k], np.cov(z[y == k], rowvar=False, bias=True), rtol=1e-10)
    np.testing.assert_allclose(np.exp(g.log_priors), qda.priors_)


def test_jitter_ladder_is_ddus_one_decade_ladder():
    j = np.array(ood.JITTERS)
    assert j[0] == 0.0 and j[1] == np.finfo(np.float64).tiny and j[2] == 1e-308 and j[-1] == 0.1
    np.testing.assert_allclose(j[3:] / j[2:-1], 10.0, rtol=1e-9)  # every decade, none skipped
    assert len(j) == 2 + 308


def test_singular_covariance_gets_the_smallest_working_jitter():
    z, y = _blobs(2)
    z = np.c_[z, z[:, 0]]  # a duplicated feature: every covariance is singular
    g = ood.fit_gda(z, y)
    assert g.jitter > 0
    smaller = [j for j in ood.JITTERS if j < g.jitter]
    covs = [np.cov(z[y == k], rowvar=False, bias=True) for k in range(3)]
    for j in smaller:  # none of the smaller rungs works
        with pytest.raises(np.linalg.LinAlgError):
            for c in covs:
                np.linalg.cholesky(c + j * np.eye(z.shape[1]))
    assert np.isfinite(g.log_density(z)).all()


def test_ece_by_hand():
    # two bins used: conf 0.9 (2 samples, 1 right) and conf 0.6 (2 samples, 2 right)
    probs = np.array([[0.9, 0.1], [0.9, 0.1], [0.6, 0.4], [0.4, 0.6]])
    labels = np.array([0, 1, 0, 1])
    value, diagram = ood.ece(probs, labels)
    assert value == pytest.approx(0.5 * abs(0.5 - 0.9) + 0.5 * abs(1.0 - 0.6))
    assert sum(diagram["count"]) == 4 and len(diagram["edges"]) == 16


def test_temperature_scaling_lowers_nll_on_held_out_data():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 5, 4000)
    logits = rng.normal(size=(4000, 5)) + 2.0 * np.eye(5)[y]
    logits *= 4.0  # over-confident
    val, test = slice(0, 2000), slice(2000, None)
    t = ood.fit_temperature(logits[val], y[val])
    assert t > 1.5
    assert ood.nll(logits[test], y[test], t) < ood.nll(logits[test], y[test], 1.0)
    assert ood.ece(ood.softmax(logits[test], t), y[test])[0] < ood.ece(ood.softmax(logits[test]), y[test])[0]


def test_entropy_auroc_and_risk_coverage_by_hand():
    assert ood.entropy(np.array([[0.5, 0.5], [1.0, 0.0]])).tolist() == pytest.approx([np.log(2), 0.0])
    assert ood.auroc_auprc(np.array([0.1, 0.2]), np.array([0.8, 0.9])) == (1.0, 1.0)
    cov, risk, aurc = ood.risk_coverage(np.array([0.9, 0.8, 0.7, 0.6]), np.array([1, 0, 1, 1]))
    assert cov.tolist() == [0.25, 0.5, 0.75, 1.0] and risk.tolist() == pytest.approx([0, 0.5, 1 / 3, 0.25])
    assert aurc == pytest.approx(np.mean([0, 0.5, 1 / 3, 0.25]))


def test_small_classes_are_projected_before_fitting():
    rng = np.random.default_rng(3)
    y = np.repeat(np.arange(3), 20)
    z = rng.normal(size=(60, 50)) + y[:, None]  # 20 samples per class in 50 dimensions
    g = ood.fit_gda(z, y)
    assert g.components.shape == (10, 50) and g.jitter == 0.0
    assert np.isfinite(g.log_density(z)).all()
    assert ood.fit_gda(z, y, max_dim=50).components is None


@pytest.mark.slow
def test_audit_with_held_out_classes_and_corruptions(tmp_path, monkeypatch):
    """The documented OoD audit end to end: summary.json gets one entry per OoD set; scores get density and entropy."""
    import json
    from pathlib import Path

    from streamlit.testing.v1 import AppTest

    from engine.training import audit
    from engine.training.config import AuditConfig

    cfg = AuditConfig(holdout_classes=[8, 9], corruptions=["invert"], epochs=8, noise=0.1)
    run, ds = audit.prepare(cfg, tmp_path)
    assert len(ds) < 0.8 * 0.85 * 1797 and not np.isin(ds.labels, [8, 9]).any()  # trained on classes 0-7 only
    assert len(run.samples()) == 1797  # the run still lists every sample (role column)
    summary = audit.execute(run, ds)
    assert set(summary["ood"]) == {"held-out classes 8,9", "corrupted: invert"}
    for entry in summary["ood"].values():
        assert set(entry) == {f"{m}_{s}" for m in ("auroc", "auprc") for s in ("density", "entropy", "max_softmax")}
    assert summary["ood"]["held-out classes 8,9"]["auroc_density"] > 0.8
    assert json.loads((run.path / "summary.json").read_text())["calibration"]["temperature"] > 0
    scores, samples = run.scores(), run.samples()
    scored = samples["role"].isin(["train", "threshold"]) & (samples["threshold_pass"] != run.n_passes() - 1)
    assert np.isfinite(scores["ood_density"][scored]).all() and (scores["entropy"][scored] >= 0).all()
    assert scores["ood_density"][~scored].isna().all() and scores["entropy"][~scored].isna().all()
    monkeypatch.setenv("DIFFICULTY_AUDIT_RUNS", str(tmp_path))
    at = AppTest.from_file(str(Path(__file__).resolve().parent.parent / "app.py"), default_timeout=60)
    at.run()
    at.switch_page("app_pages/ood.py").run()
    assert not at.exception, at.exception
    assert len(at.get("plotly_chart")) == 4  # densities, scatter, reliability, risk-coverage
    assert len(at.get("image")) == 12


def test_soft_spectral_norm_caps_only_layers_above_the_coefficient():
    import torch

    from engine.training.models import apply_spectral_norm

    torch.manual_seed(0)
    big, small = torch.nn.Linear(20, 20), torch.nn.Linear(20, 20)
    with torch.no_grad():
        big.weight.mul_(50)
        small.weight.mul_(0.01)
    before_small = torch.linalg.matrix_norm(small.weight, ord=2).item()
    net = apply_spectral_norm(torch.nn.Sequential(big, small), coeff=3.0)
    net.train()
    for _ in range(50):  # power iteration converges over training forwards
        net(torch.randn(4, 20))
    assert torch.linalg.matrix_norm(big.weight, ord=2).item() == pytest.approx(3.0, rel=0.02)
    assert torch.linalg.matrix_norm(small.weight, ord=2).item() == pytest.approx(before_small, rel=1e-6)


def test_self_adaptive_losses_by_hand():
    import torch

    from engine.training.config import AuditConfig
    from engine.training.loop import _loss, sat_alpha

    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0]])
    y = torch.tensor([0, 0])
    cfg = AuditConfig(sat="paper", sat_warmup=1, sat_momentum=0.9, epochs=10)
    t = torch.nn.functional.one_hot(y, 2).float()
    assert _loss(cfg, logits, y, torch.tensor([0, 1]), 0, t, 2).item() == pytest.approx(
        torch.nn.functional.cross_entropy(logits, y).item())  # warm-up: plain cross-entropy
    loss = _loss(cfg, logits, y, torch.tensor([0, 1]), 1, t, 2)
    p = torch.softmax(logits, 1)
    expect_t = 0.9 * torch.nn.functional.one_hot(y, 2).float() + 0.1 * p
    assert torch.allclose(t, expect_t)  # the per-sample targets moved towards the prediction
    w = expect_t.max(1).values
    per = -(expect_t * torch.log_softmax(logits, 1)).sum(1)
    assert loss.item() == pytest.approx(((w * per).sum() / w.sum()).item())
    inc = AuditConfig(sat="incerto", sat_warmup=2, sat_alpha_start=0.1, sat_alpha_end=0.9, epochs=10)
    # incerto's get_alpha: start during warm-up, then start + (end - start)(e - w)/(T - w), T = 10, w = 2
    assert [round(sat_alpha(inc, e), 6) for e in (0, 1, 2, 6, 9)] == [0.1, 0.1, 0.1, 0.5, 0.8]
    blend = 0.9 * torch.nn.functional.one_hot(y, 2).float() + 0.1 * p  # alpha_start = 0.1 applies in warm-up too
    assert _loss(inc, logits, y, torch.tensor([0, 1]), 0, None, 2).item() == pytest.approx(
        (-(blend * torch.log_softmax(logits, 1)).sum(1).mean()).item())


@pytest.mark.slow
def test_audits_with_self_adaptive_training(tmp_path):
    from engine.training import audit
    from engine.training.config import AuditConfig

    for form in ("paper", "incerto"):
        run, ds = audit.prepare(AuditConfig(noise=0.2, epochs=6, sat=form, sat_warmup=2), tmp_path)
        summary = audit.execute(run, ds)
        assert summary["auroc"] > 0.9
        scores = run.scores()
        assert ("sat_disagreement" in scores) == (form == "paper")
    err = (run.samples()["label"] != run.samples()["true_label"]).to_numpy()
    from engine.store.runs import list_runs

    (paper_run,) = [r for r in list_runs(tmp_path) if r.config()["sat"] == "paper"]
    paper = paper_run.scores()["sat_disagreement"]
    assert paper[err].mean() > paper[~err].mean()


def test_calibration_split_is_stratified_seeded_and_disjoint():
    """A folder's held-out set comes sorted by class: the first half would be classes 0-4, the second 5-9."""
    from engine.ood.evaluate import calibration_split

    y = np.repeat(np.arange(10), [30, 31, 29, 30, 30, 30, 30, 30, 30, 3])
    fit, test = calibration_split(y, seed=0)
    assert sorted(np.r_[fit, test].tolist()) == list(range(len(y)))  # a partition of the set
    for k in range(10):
        n_k = (y == k).sum()
        assert (y[fit] == k).sum() == n_k // 2 and (y[test] == k).sum() == n_k - n_k // 2
    again, _ = calibration_split(y, seed=0)
    other, _ = calibration_split(y, seed=1)
    assert (again == fit).all() and not (other == fit).all()
    assert not (fit == np.arange(len(fit))).all()  # not the first half by position


def test_temperature_is_fitted_on_every_class_of_a_sorted_set(tmp_path):
    """``write_report`` on a class-sorted ID set: fitting and ECE halves both hold all classes."""
    import pandas as pd

    from engine.ood.evaluate import write_report
    from engine.store.runs import create_run

    rng = np.random.default_rng(0)
    feats, labels = rng.normal(size=(60, 4)) + np.repeat(np.arange(3), 20)[:, None] * 3, np.repeat(np.arange(3), 20)
    logits = np.eye(3)[labels] * 2.0
    y_id = np.repeat(np.arange(3), 20)  # sorted by class
    l_id = np.eye(3)[y_id] * 3.0 + rng.normal(size=(60, 3))
    run = create_run(tmp_path, {"dataset": "x"}, pd.DataFrame({"sample_id": [str(i) for i in range(60)]}), ["a", "b", "c"])
    report = write_report(run, feats, logits, labels, np.ones(60, bool), 3, (feats, l_id, y_id), {})
    cal = report["calibration"]
    assert cal["n_validation"] == 30 and cal["n_test"] == 30
    assert cal["reliability_after"]["count"] and sum(cal["reliability_after"]["count"]) == 30
