import json
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from engine.review.export import export_csv, neutralize_formulas
from engine.store.runs import DYNAMICS, list_runs, open_run
from engine.training import audit
from engine.training.config import AuditConfig, ConfigError
from engine.training.loop import Cancelled

ROOT = Path(__file__).resolve().parent.parent


def test_aum_finds_flipped_labels(digits_run):
    """20% symmetric noise on digits: 359 flipped labels among 1,797.

    A random ranking has AUROC 0.5 with a standard deviation of about 0.016 here, so a bound of
    0.95 cannot be met by luck; F1 0.9 of the automatic cut-off likewise.
    """
    s = digits_run.summary()
    assert s["n_samples"] == 1797 and s["n_label_errors"] == 359
    assert s["auroc"] > 0.95
    assert s["f1"] > 0.9
    assert s["n_unscored"] == 0  # two threshold runs: every sample scored from a run where it kept its label


def test_run_directory_contract(digits_run):
    st = digits_run.status()
    assert st["state"] == "done" and st["epochs_done"] == [30, 30]
    samples = digits_run.samples()
    assert list(samples.columns[:5]) == ["sample_id", "source", "label", "true_label", "threshold_pass"]
    tp = samples["threshold_pass"].to_numpy()
    assert (tp == 0).sum() == (tp == 1).sum() == 1797 // 11
    for name in DYNAMICS:
        arr = digits_run.dynamics(0, name)
        assert arr.shape == (30, 1797) and isinstance(arr, np.memmap)
    assert np.isfinite(digits_run.dynamics(1, "margin")).all()
    scores = digits_run.scores()
    assert scores["sample_id"].tolist() == samples["sample_id"].tolist()
    assert sorted(scores["rank"]) == list(range(1, 1798))
    assert (samples["role"] == np.where(tp >= 0, "threshold", "train")).all()  # nothing held out
    cfg = digits_run.config()
    assert AuditConfig.from_run_config(cfg) == AuditConfig(dataset="digits", noise=0.2, epochs=30, aum_start=1,
                                                          correction_start=5)  # automatic starts resolved
    assert cfg["normalization"]["images"] == 1797 and len(cfg["normalization"]["mean"]) == 1


def test_suggested_label_recovers_true_label(digits_run):
    samples, scores = digits_run.samples(), digits_run.scores()
    flagged_errors = scores["flagged"] & (samples["label"] != samples["true_label"])
    agree = (scores["suggested_label"] == samples["true_label"])[flagged_errors].mean()
    assert agree > 0.8  # chance is 1/9


def test_export_flagged_and_all(digits_run, tmp_path):
    out = tmp_path / "flagged.csv"
    n = export_csv(digits_run, out)
    df = pd.read_csv(out, dtype={"label": str, "suggested_label": str, "true_label": str})
    assert n == len(df) == digits_run.summary()["n_flagged"]
    for col in ["sample_id", "source", "label", "suggested_label", "aum", "rank", "flagged", "true_label"]:
        assert col in df.columns
    # rank 1 = most suspicious = lowest AUM (the natural mean margin)
    assert df["flagged"].all() and df["rank"].is_monotonic_increasing and df["aum"].is_monotonic_increasing
    scores = digits_run.scores().set_index("sample_id")
    np.testing.assert_allclose(df["aum"], scores.loc[df["sample_id"], "aum"])
    n_all = export_csv(digits_run, tmp_path / "all.csv", all_samples=True)
    assert n_all == 1797


def test_csv_formula_cells_are_neutralised():
    df = pd.DataFrame({"sample_id": ["=cmd|' /C calc'!A0", "+1", "ok", "@x"], "aum": [-1.5, 2.0, 0.0, 1.0]})
    out = neutralize_formulas(df)
    assert out["sample_id"].tolist() == ["'=cmd|' /C calc'!A0", "'+1", "ok", "'@x"]
    assert out["aum"].tolist() == [-1.5, 2.0, 0.0, 1.0]


@pytest.mark.slow
def test_cli_audit_and_export_from_a_fresh_folder(tmp_path):
    env = {"DIFFICULTY_AUDIT_RUNS": str(tmp_path / "runs"), "PATH": "/usr/bin:/bin"}
    r = subprocess.run(
        [sys.executable, "-m", "engine", "audit", "--dataset", str(ROOT / "sample_data" / "digits_folder"),
         "--epochs", "3", "--quiet"],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300,
    )
    assert r.returncode == 0, r.stderr
    assert "samples: 300" in r.stdout and "flagged:" in r.stdout
    (run,) = list_runs(tmp_path / "runs")
    summary = json.loads((run.path / "summary.json").read_text())
    assert summary["n_samples"] == 300 and "precision" not in summary  # no true labels for a folder
    r = subprocess.run([sys.executable, "-m", "engine", "export", str(run.path), "--out", "f.csv", "--all"],
                       capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)
    assert r.returncode == 0, r.stderr
    assert len(pd.read_csv(tmp_path / "f.csv")) == 300


def test_cli_bad_input_is_a_clear_error(tmp_path):
    r = subprocess.run([sys.executable, "-m", "engine", "audit", "--dataset", str(tmp_path / "missing"), "--quiet"],
                       capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert r.returncode == 2 and "dataset folder not found" in r.stderr and "Traceback" not in r.stderr
    r = subprocess.run([sys.executable, "-m", "engine", "audit", "--epochs", "0", "--quiet"],
                       capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert r.returncode == 2 and "epochs must be at least 1" in r.stderr
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


@pytest.mark.parametrize(
    "changes, message",
    [({"threshold_runs": 20}, "exceed"), ({"batch_size": 0}, "batch size"), ({"lr": -1}, "learning rate")],
)
def test_bad_configs_fail_before_training(changes, message, tmp_path):
    with pytest.raises(ConfigError, match=message):
        audit.prepare(AuditConfig(epochs=2, **changes), tmp_path)


@pytest.mark.slow
def test_cancel_keeps_epochs_and_resume_matches_uninterrupted(tmp_path):
    cfg = AuditConfig(noise=0.1, epochs=5, seed=11)
    full, ds = audit.prepare(cfg, tmp_path / "a")
    audit.execute(full, ds)

    run, ds = audit.prepare(cfg, tmp_path / "b")
    cancel = threading.Event()

    def stop_after_three(r):
        if r.pass_idx == 0 and r.epoch == 2:
            cancel.set()

    with pytest.raises(Cancelled):
        audit.execute(run, ds, on_epoch=stop_after_three, cancel=cancel)
    st = run.status()
    assert st["state"] == "cancelled" and st["epochs_done"] == [3, 0]
    assert np.isfinite(run.dynamics(0, "margin")).all() and run.dynamics(0, "margin").shape[0] == 3
    assert run.summary()["partial"] is True

    audit.execute(open_run(run.path), resume=True)
    assert run.status()["state"] == "done"
    # Same seed on the same machine: the resumed run reproduces the uninterrupted one exactly.
    for name in ("margin", "prob", "pred"):
        np.testing.assert_array_equal(run.dynamics(0, name), full.dynamics(0, name))
    pd.testing.assert_frame_equal(run.scores(), full.scores())


class _ExplodingEvent:
    """Stands in for the cancel event and raises inside the batch loop: a real mid-epoch exception."""

    def __init__(self, after_calls: int):
        self.calls, self.after = 0, after_calls

    def is_set(self) -> bool:
        self.calls += 1
        if self.calls > self.after:
            raise RuntimeError("simulated fault in the middle of an epoch")
        return False


@pytest.mark.slow
def test_exception_mid_epoch_marks_run_failed_and_keeps_finished_epochs(tmp_path):
    run, ds = audit.prepare(AuditConfig(noise=0.1, epochs=4), tmp_path)
    batches = len(range(0, 1797, 64))
    with pytest.raises(RuntimeError, match="simulated fault"):
        audit.execute(run, ds, cancel=_ExplodingEvent(2 * batches + 5))
    st = run.status()
    assert st["state"] == "failed" and "simulated fault" in st["error"]
    assert st["epochs_done"][0] == 2
    assert np.isfinite(run.dynamics(0, "margin")).all()
    assert run.scores() is not None  # partial scores from the finished epochs
