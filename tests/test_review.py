"""The review loop's numbers: natural score columns, the saved review policy, exports and the cleaned dataset.

Real audits (the session's ``small_run``: digits, 10% noise, 6 epochs x 2 passes), each mutating test on its
own copy of the run directory.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from engine.review.cleaned import write_cleaned_folder
from engine.review.export import export_bytes, export_csv, export_frame
from engine.review.policy import (
    Policy,
    PolicyError,
    decide,
    load_policy,
    make_policy,
    parse_cutoff,
    policy_history,
    save_policy,
)
from engine.review.reviews import ReviewStore
from engine.scores.registry import REGISTRY, forgetting_events, oriented
from engine.store.runs import Run
from engine.store.views import live_scores
from engine.training import audit
from engine.training.config import AuditConfig

ROOT = Path(__file__).resolve().parent.parent
APP = str(ROOT / "app.py")


def _copy(run: Run, tmp_path: Path) -> Run:
    dest = tmp_path / "runs" / run.id
    shutil.copytree(run.path, dest, ignore=shutil.ignore_patterns("reviews.sqlite*", "policy.json"))
    return Run(dest)  # without the decisions or policy other tests may have saved in the shared run


def _errors(run: Run) -> np.ndarray:
    s = run.samples()
    return (s["label"] != s["true_label"]).to_numpy()


# ---- one meaning per column --------------------------------------------------------------------


def test_registry_says_which_end_is_suspicious():
    assert {s.suspicious for s in REGISTRY.values()} == {"low", "high"}
    for name in ("aum", "aum_yang", "confidence", "cumulative_accuracy", "ood_density", "self_confidence",
                 "transfer_teacher"):
        assert REGISTRY[name].suspicious == "low", name
    for name in ("variability", "forgetting", "el2n", "ce_loss", "entropy", "cv_loss", "prediction_depth"):
        assert REGISTRY[name].suspicious == "high", name
    v = np.array([1.0, -2.0, np.nan])
    assert oriented(v, "aum").tolist()[:2] == [-1.0, 2.0] and np.isnan(oriented(v, "aum")[2])
    assert oriented(v, "ce_loss").tolist()[:2] == [1.0, -2.0]
    assert oriented(v, "csv:x", "low").tolist()[:2] == [-1.0, 2.0]
    with pytest.raises(KeyError):
        oriented(v, "no_such_score")


def test_aum_column_is_the_aum_package_mean_margin(small_run, tmp_path):
    """The run's captured margins through the `aum` package (logits z_y = m, others 0 give margin m) give the
    ``aum`` column exactly: same sign, same mean over the epochs of the AUM window, over the passes where the
    sample kept its label."""
    from aum import AUMCalculator

    calc = AUMCalculator(str(tmp_path), compressed=True)
    samples = small_run.samples()
    tpass = samples["threshold_pass"].to_numpy()
    labels = samples["label"].to_numpy()
    start = int(small_run.config()["aum_start"])
    n_classes = len(small_run.classes())
    for p in range(small_run.n_passes()):
        margins = np.asarray(small_run.dynamics(p, "margin"), dtype=np.float64)
        kept = np.flatnonzero(tpass != p)
        for e in range(start, margins.shape[0]):
            logits = torch.zeros(kept.size, n_classes, dtype=torch.float64)
            logits[torch.arange(kept.size), torch.from_numpy(labels[kept])] = torch.from_numpy(margins[e, kept])
            calc.update(logits, torch.from_numpy(labels[kept]), [int(i) for i in kept])
    ref = np.array([calc.sums[i] / calc.counts[i] for i in range(len(samples))])
    ours = small_run.scores()["aum"].to_numpy()
    np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-5)
    err = _errors(small_run)
    assert ours[err].mean() < 0 < ours[~err].mean()  # mislabeled samples: negative AUM, as in the paper


def test_columns_carry_their_papers_quantities(small_run):
    scores = small_run.scores()
    err = _errors(small_run)
    for name in ("confidence", "cumulative_accuracy"):
        v = scores[name].to_numpy()
        assert ((v >= 0) & (v <= 1)).all() and v[err].mean() < v[~err].mean(), name
    # forgetting: a count of one pass (the first where the sample kept its label), never an average
    f = scores["forgetting"].to_numpy()
    assert (f == np.round(f)).all() and f.max() <= small_run.config()["epochs"]
    tpass = small_run.samples()["threshold_pass"].to_numpy()
    labels = small_run.samples()["label"].to_numpy()
    first = np.where(tpass == 0, 1, 0)
    for p in (0, 1):
        cols = first == p
        correct = np.asarray(small_run.dynamics(p, "pred"))[:, cols] == labels[cols][None, :]
        np.testing.assert_array_equal(f[cols], forgetting_events(correct))
    # ood_density is the log density itself: its top (in-distribution) end is where the model is sure
    ok = np.isfinite(scores["ood_density"]) & np.isfinite(scores["confidence"])  # NaN: scored by no kept pass's model
    assert np.corrcoef(scores["ood_density"][ok], scores["confidence"][ok])[0, 1] > 0


# ---- the review policy -----------------------------------------------------------------------------


def test_cutoff_spellings():
    assert parse_cutoff("auto") == ("auto", None) and parse_cutoff("threshold:95") == ("threshold", 95.0)
    assert parse_cutoff("value:-0.5") == ("value", -0.5) and parse_cutoff("quantile:0.1") == ("quantile", 0.1)
    for bad, msg in [("quantile:2", "between 0 and 1"), ("value", "needs a number"), ("median", "not one of"),
                     ("value:abc", "not a number"), ("auto:3", "takes no number")]:
        with pytest.raises(PolicyError, match=msg):
            parse_cutoff(bad)
    assert make_policy("quantile:0.1", "ce_loss") == Policy("quantile", 0.1, "ce_loss")


def test_decide_by_hand():
    aum = np.array([-3.0, -1.0, 0.5, 2.0, np.nan])
    common = dict(aum=aum, pass_aum=[], pass_threshold_aum=[], auto_cutoff=0.0, percentile=99.0)
    d = decide(Policy("auto"), aum, "low", **common)
    assert d.flagged.tolist() == [True, True, False, False, False] and d.rank.tolist() == [1, 2, 3, 4, 5]
    d = decide(Policy("value", -2.0), aum, "low", **common)
    assert d.flagged.tolist() == [True, False, False, False, False]
    loss = np.array([0.1, 5.0, 2.0, np.nan, 0.3])
    d = decide(Policy("value", 1.0, "ce_loss"), loss, "high", **common)
    assert d.flagged.tolist() == [False, True, True, False, False] and d.rank.tolist() == [4, 1, 2, 5, 3]
    # quantile = peerannot's WAUM.cut_lowests: values <= nanquantile(values, alpha)
    rng = np.random.default_rng(0)
    v = rng.normal(size=1000)
    d = decide(Policy("quantile", 0.1), v, "low", **common | {"aum": v})
    np.testing.assert_array_equal(d.flagged, v <= np.nanquantile(v, 0.1))
    assert d.flagged.sum() == 100
    # threshold (Pleiss): below its own pass's cut-off in every pass where the sample kept its label
    pa0 = np.array([-1.0, -1.0, 1.0, np.nan])
    pa1 = np.array([-1.0, 1.0, -1.0, -1.0])
    thr0 = np.array([np.nan, np.nan, np.nan, 0.0])  # sample 3 is pass 0's threshold sample
    d = decide(Policy("threshold", 100.0), pa0, "low", aum=np.nanmean([pa0, pa1], axis=0), pass_aum=[pa0, pa1],
               pass_threshold_aum=[thr0, np.array([0.0, np.nan, np.nan, np.nan])], auto_cutoff=None, percentile=99.0)
    assert d.flagged.tolist() == [True, False, False, True] and d.pass_cutoffs == [0.0, 0.0]
    none = decide(Policy("auto"), aum, "low", **common | {"auto_cutoff": float("nan")})  # one group, no threshold
    assert not none.flagged.any() and "no cut-off found" in none.text and none.rank.tolist() == [1, 2, 3, 4, 5]


def test_threshold_policy_one_function_for_page_summary_and_export(monkeypatch, small_run, tmp_path):
    """Under the threshold rule the AUM page, summary.json, live_scores and the export flag the same samples:
    those below their own pass's cut-off in every pass where they kept their label (the page used to show
    mean AUM against the mean cut-off)."""
    from streamlit.testing.v1 import AppTest

    from engine.capture import dynamics as dyn

    run = _copy(small_run, tmp_path)
    save_policy(run, Policy("threshold"))
    samples = run.samples()
    tpass = samples["threshold_pass"].to_numpy()
    targets_fake = len(run.classes())
    expected = np.ones(len(samples), dtype=bool)
    start = int(run.config()["aum_start"])
    for p in range(run.n_passes()):
        a = dyn.area_under_margin(np.asarray(run.dynamics(p, "margin")), start)
        cut = dyn.threshold_cutoff(a[tpass == p], 99.0)
        expected &= np.where(tpass == p, True, a < cut)
    assert targets_fake == 10
    summary = run.summary()
    table, info = live_scores(run)
    assert summary["policy"]["rule"] == "threshold" and summary["n_flagged"] == int(expected.sum())
    np.testing.assert_array_equal(table["flagged"].to_numpy(), expected)
    np.testing.assert_array_equal(run.scores()["flagged"].to_numpy(), expected)
    assert len(export_frame(run, "flagged")) == expected.sum()
    monkeypatch.setenv("DIFFICULTY_AUDIT_RUNS", str(run.path.parent))
    at = AppTest.from_file(APP, default_timeout=60).run()
    at.switch_page("app_pages/aum.py").run()
    assert not at.exception, at.exception
    shown = next(m for m in at.metric if m.label == "Flagged").value
    assert shown.startswith(f"{int(expected.sum()):,} of"), shown
    assert f"{int(expected.sum()):,} flagged" in " ".join(c.value for c in at.sidebar.caption)


def test_policy_is_saved_with_history_and_used_everywhere(monkeypatch, small_run, tmp_path):
    from streamlit.testing.v1 import AppTest

    run = _copy(small_run, tmp_path)
    before = run.summary()["n_flagged"]
    save_policy(run, Policy("value", -2.0))
    save_policy(run, Policy("quantile", 0.05, "ce_loss"))
    saved = json.loads((run.path / "policy.json").read_text())
    assert load_policy(run) == Policy("quantile", 0.05, "ce_loss") and saved["saved_at"]
    hist = policy_history(run)
    assert [h["rule"] for h in hist] == ["auto", "value"] and hist[1]["saved_at"]
    loss = run.scores()["ce_loss"].to_numpy()
    expected = loss >= np.nanquantile(loss, 0.95)
    table, info = live_scores(run, with_ids=False)
    np.testing.assert_array_equal(table["flagged"].to_numpy(), expected)
    assert table["rank"].to_numpy()[np.argmax(loss)] == 1  # ranked by ce_loss, highest first
    assert run.summary()["n_flagged"] == expected.sum() != before
    exported = export_frame(run, "flagged")
    assert len(exported) == expected.sum() and exported["ce_loss"].is_monotonic_decreasing
    with pytest.raises(PolicyError, match="not a score"):
        save_policy(run, Policy("value", 1.0, "nope"))
    assert load_policy(run).score == "ce_loss"  # a refused policy leaves the saved one as it was
    # the page opens on the saved policy, in a fresh session, and saving from it persists
    monkeypatch.setenv("DIFFICULTY_AUDIT_RUNS", str(run.path.parent))
    at = AppTest.from_file(APP, default_timeout=60).run()
    at.switch_page("app_pages/aum.py").run()
    assert not at.exception, at.exception
    assert next(r for r in at.radio if r.label == "Cut-off").value == "quantile"
    next(r for r in at.radio if r.label == "Cut-off").set_value("auto").run()
    next(b for b in at.button if b.label == "Save as the run's policy").click().run()
    assert not at.exception, at.exception
    assert load_policy(run).rule == "auto"
    again = AppTest.from_file(APP, default_timeout=60).run()
    again.switch_page("app_pages/flagged.py").run()
    assert not again.exception, again.exception
    assert "(automatic)" in " ".join(c.value for c in again.sidebar.caption)


def test_cli_export_cutoff_rank_by_and_companion_json(small_run, tmp_path):
    run = _copy(small_run, tmp_path)
    ids = run.samples()["sample_id"].to_numpy()
    pd.DataFrame({"sample_id": ids, "mine": np.arange(len(ids), dtype=float)}).to_csv(tmp_path / "m.csv", index=False)
    from engine.scores.predefined import join_to_run, parse_csv, save_to_run, validate

    clean = validate(parse_csv((tmp_path / "m.csv").read_bytes()).frame, "sample_id", ["mine"], {"mine": False})
    save_to_run(run.path, join_to_run(clean, ids))
    out = tmp_path / "q.csv"
    r = subprocess.run([sys.executable, "-m", "engine", "export", str(run.path), "--all", "--cutoff", "quantile:0.1",
                        "--rank-by", "csv:mine", "--out", str(out)], capture_output=True, text=True, timeout=120,
                       cwd=ROOT)
    assert r.returncode == 0, r.stderr
    df = pd.read_csv(out)
    assert df["flagged"].mean() == pytest.approx(0.1, abs=0.01)
    assert (df["is_label_issue"] == df["flagged"]).all()
    assert df["csv:mine"].iloc[0] == 0.0 and df["rank"].iloc[0] == 1  # low is suspicious for this column
    assert df["label_quality"].iloc[0] == 0.0 and df["label_quality"].max() == 1.0
    assert df.loc[df["flagged"], "label_quality"].max() < df.loc[~df["flagged"], "label_quality"].min()
    meta = json.loads(Path(f"{out}.json").read_text())
    assert meta["columns"]["aum"]["direction"] == "low = suspicious" and meta["columns"]["aum"]["paper"]
    assert meta["columns"]["ce_loss"]["direction"] == "high = suspicious"
    assert meta["columns"]["csv:mine"]["direction"] == "low = suspicious"
    assert meta["policy"]["cutoff"] == "quantile:0.1" and meta["policy"]["score"] == "csv:mine"
    assert not (run.path / "policy.json").exists()  # an export's --cutoff is not saved
    bad = subprocess.run([sys.executable, "-m", "engine", "export", str(run.path), "--cutoff", "quantile:3",
                          "--out", str(tmp_path / "x.csv")], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert bad.returncode == 2 and "between 0 and 1" in bad.stderr


# ---- a cleaned dataset you can train on -----------------------------------------------------------


def test_cleaned_folder_round_trip(small_run, tmp_path):
    """Export the cleaned digits (array data) as a folder, audit it again: removed samples are gone, relabelled
    ones carry their new class, every other sample is there with its label."""
    run = _copy(small_run, tmp_path)
    ids = run.samples()["sample_id"].to_numpy()
    removed, relabelled = list(ids[:5]), list(ids[5:10])
    store = ReviewStore(run.path)
    store.record_many([(s, "remove", None) for s in removed] + [(s, "mislabeled", "3") for s in relabelled])
    n = write_cleaned_folder(run, tmp_path / "clean")
    assert n == len(ids) - 5 and len(list((tmp_path / "clean").rglob("*.png"))) == n
    manifest = (tmp_path / "clean" / "manifest.csv").read_text()
    assert "'" not in manifest  # machine-readable: no formula quoting (decisions only relabel to a run's class)
    again, ds = audit.prepare(AuditConfig(dataset=str(tmp_path / "clean" / "manifest.csv"), noise=0.0,
                                                          epochs=1, seed=0),
                              tmp_path / "runs2")
    got = dict(zip(ds.sample_ids, np.array(ds.classes)[ds.labels], strict=True))
    assert not set(removed) & set(got) and len(got) == len(ids) - 5
    assert all(got[s] == "3" for s in relabelled)
    given = dict(zip(ids, np.array(run.classes())[run.samples()["label"].to_numpy()], strict=True))
    assert all(got[s] == given[s] for s in ids[10:])
    with pytest.raises(Exception, match="not an empty folder"):
        write_cleaned_folder(run, tmp_path / "clean")  # nothing of the user's is overwritten


def test_manifest_of_array_data_is_readable_again(small_run, tmp_path):
    run = _copy(small_run, tmp_path)
    out = tmp_path / "m" / "manifest.csv"
    (tmp_path / "m").mkdir()
    assert export_csv(run, out, kind="manifest") == len(run.samples())
    df = pd.read_csv(out, dtype=str)
    assert not df["path"].str.contains(r"\[").any() and (tmp_path / "m" / df["path"].iat[0]).is_file()
    from engine.data.datasets import load_manifest

    ds = load_manifest(out)
    assert len(ds) == len(df) and ds.images.shape[1:3] == (8, 8)
    assert export_bytes(run, "manifest") == out.read_bytes()
