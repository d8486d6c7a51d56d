"""The run knows the whole dataset: a ``role`` per sample, one row per sample in every per-sample table."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from engine.data.images import SampleImages
from engine.review.export import export_frame
from engine.store.runs import DYNAMICS, ROLES
from engine.training import audit
from engine.training.config import AuditConfig


def test_holding_out_keeps_every_sample_with_its_role(tmp_path):
    """Preparing a run with held-out classes and an eval fraction lists all 1,797 digits (nothing trains)."""
    cfg = AuditConfig(holdout_classes=[8, 9], eval_fraction=0.2, noise=0.1, epochs=2)
    run, ds = audit.prepare(cfg, tmp_path)
    s = run.samples()
    assert len(s) == 1797 and s["sample_id"].tolist() == [f"digits-{i:04d}" for i in range(1797)]
    assert set(s["role"]) <= set(ROLES)
    true, label, role = s["true_label"].to_numpy(), s["label"].to_numpy(), s["role"].to_numpy()
    assert (role[np.isin(true, [8, 9])] == "ood_holdout").all()  # the held-out classes' images: OoD set
    kept = ~np.isin(true, [8, 9])
    assert (role[kept & np.isin(label, [8, 9])] == "holdout_label").all()  # flipped into a held-out class
    trained = np.isin(role, ["train", "threshold"])
    assert trained.sum() == len(ds) and (s["sample_id"].to_numpy()[trained] == ds.sample_ids.astype(str)).all()
    candidates = kept & ~np.isin(label, [8, 9])  # ID samples: 20% of each given class held out for evaluation
    for k in range(8):
        members = candidates & (label == k)
        assert (role[members] == "id_eval").sum() == round(0.2 * members.sum())
    assert ((role == "threshold") == (s["threshold_pass"].to_numpy() >= 0)).all()
    assert (role == "threshold").sum() == 2 * (trained.sum() // 9)  # N / (c + 1) per pass, c = 8 trained classes
    assert run.classes() == [str(c) for c in range(10)]  # class indices mean the same in every table
    from engine.data.datasets import digits_images

    pixels = digits_images()[0]
    images = SampleImages(run)
    for i in (0, *np.flatnonzero(role == "ood_holdout")[:3], *np.flatnonzero(role == "id_eval")[-3:]):
        assert (images.image(int(i)) == pixels[i]).all()  # a row's own image, whatever its role


@pytest.fixture(scope="module")
def held_out_run(tmp_path_factory):
    """The acceptance check's audit: digits with classes 8 and 9 held out, 6 epochs (about a minute on 2 cores)."""
    cfg = AuditConfig(holdout_classes=[8, 9], epochs=6)
    run, ds = audit.prepare(cfg, tmp_path_factory.mktemp("held"))
    audit.execute(run, ds)
    return run


@pytest.mark.slow
def test_every_table_has_one_row_per_sample_and_held_out_ones_are_nan(held_out_run):
    run = held_out_run
    s, scores = run.samples(), run.scores()
    n = len(s)
    trained = s["role"].isin(["train", "threshold"]).to_numpy()
    assert n == 1797 and scores["sample_id"].tolist() == s["sample_id"].tolist()
    assert np.isnan(scores["aum"].to_numpy()[~trained]).all() and not scores["flagged"].to_numpy()[~trained].any()
    assert np.isfinite(scores["aum"].to_numpy()[trained]).all()  # two threshold runs: every trained sample scored
    for name in DYNAMICS:
        arr = run.dynamics(0, name)
        assert arr.shape == (6, n)
    margin = np.asarray(run.dynamics(0, "margin"))
    assert np.isnan(margin[:, ~trained]).all() and np.isfinite(margin[:, trained]).all()
    assert np.load(run.path / "features.npy").shape[0] == n
    summary = run.summary()
    assert summary["n_samples"] == n and summary["n_trained"] == int(trained.sum())
    assert summary["roles"]["ood_holdout"] == int(np.isin(s["true_label"], [8, 9]).sum())
    assert summary["warnings"] == []
    every = export_frame(run, "all")
    assert len(every) == n and set(every["sample_id"]) == set(s["sample_id"])
    assert len(export_frame(run, "manifest")) == n  # a cleaned manifest never drops held-out samples
    images = SampleImages(run)
    from sklearn.datasets import load_digits

    digits = np.clip(np.round(load_digits().images * (255.0 / 16.0)), 0, 255).astype(np.uint8)
    for i in np.flatnonzero(~trained)[:5]:  # a held-out row shows its own image
        assert (images.image(int(i)) == digits[i]).all()


@pytest.mark.slow
def test_threshold_samples_do_not_crowd_either_end_of_ood_density(held_out_run):
    """They were 64% of the top 100 by ood_density (scored by a model trained to call them the fake class)."""
    s = held_out_run.samples()
    table = pd.DataFrame({"d": held_out_run.scores()["ood_density"], "thr": s["is_threshold"],
                          "tp": s["threshold_pass"], "role": s["role"]})
    last = held_out_run.n_passes() - 1
    assert table.loc[table["tp"] == last, "d"].isna().all()  # trained as the fake class by the final model
    assert table.loc[~table["role"].isin(["train", "threshold"]), "d"].isna().all()
    d = table.dropna(subset=["d"]).sort_values("d")
    assert len(d) == int((table["role"].isin(["train", "threshold"]) & (table["tp"] != last)).sum())
    assert d.head(100)["thr"].mean() <= 0.2 and d.tail(100)["thr"].mean() <= 0.2
    from engine.ood.evaluate import load_results

    dens = load_results(held_out_run)["train_log_density"]
    assert len(dens) == len(s) and np.isnan(dens[(table["tp"] == last).to_numpy()]).all()


@pytest.mark.slow
def test_every_page_renders_a_run_with_held_out_samples(held_out_run, monkeypatch):
    """NaN scores of held-out samples reach every page (histograms, data map, gallery, OoD grid, correlations)."""
    from pathlib import Path

    from streamlit.testing.v1 import AppTest

    monkeypatch.setenv("DIFFICULTY_AUDIT_RUNS", str(held_out_run.path.parent))
    at = AppTest.from_file(str(Path(__file__).resolve().parent.parent / "app.py"), default_timeout=90)
    at.run()
    assert not at.exception, at.exception
    for page in ("aum", "datamap", "flagged", "ood", "scores"):
        at.switch_page(f"app_pages/{page}.py").run()
        assert not at.exception, (page, at.exception)
    at.switch_page("app_pages/ood.py").run()
    assert len(at.get("image")) == 12  # the lowest-density grid is full: NaN (unscored) samples sort last


@pytest.mark.slow
def test_scores_of_never_scored_samples_are_nan_without_a_warning(held_out_run):
    """Held-out samples have no value in any pass: np.nanmean warned "Mean of empty slice" for each score."""
    import warnings

    from engine.scores.registry import compute_scores, mean_over_passes

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # any RuntimeWarning fails the test
        table, _ = compute_scores(held_out_run)
        both = mean_over_passes(np.array([[1.0, np.nan, np.nan], [3.0, 5.0, np.nan]], dtype=np.float32))
    held = (held_out_run.samples()["role"] == "ood_holdout").to_numpy()
    assert held.any() and table.loc[held, ["aum", "confidence", "el2n"]].isna().all().all()
    assert np.isfinite(table.loc[~held & table["aum"].notna(), "aum"]).all()
    np.testing.assert_array_equal(both, np.array([2.0, 5.0, np.nan], dtype=np.float32))
    assert both.dtype == np.float32
