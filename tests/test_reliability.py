"""Faults caused for real (a killed process, bad archives, bad configs) and the security boundaries."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from engine.data.datasets import DatasetError
from engine.data.images import ImageError, SampleImages
from engine.data.uploads import extract_image_zip
from engine.store.runs import RunError, list_runs, open_run
from engine.training import audit
from engine.training.config import AuditConfig, ConfigError


def _wait_for_epochs(root: Path, epochs: int, timeout: float = 120):
    """The run a headless audit creates under ``root``, once it has finished ``epochs`` epochs."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        runs = list_runs(root)
        if runs and sum(runs[0].raw_status().get("epochs_done") or [0]) >= epochs:
            return runs[0]
        time.sleep(0.05)
    raise AssertionError(f"the audit never reached epoch {epochs}")


@pytest.mark.slow
def test_sigkill_then_resume_reproduces_the_uninterrupted_run(tmp_path):
    """SIGKILL a headless audit mid-training; the run reads as interrupted and --resume finishes it identically.

    "Identically" on CPU: same machine, same thread count, same seed -> bitwise equal dynamics and scores.
    """
    import torch

    # the same thread count as the in-process run below (another test may have set it): bitwise equality needs it
    env = dict(os.environ, DIFFICULTY_AUDIT_RUNS=str(tmp_path / "killed"), OMP_NUM_THREADS=str(torch.get_num_threads()))
    args = [sys.executable, "-m", "engine", "audit", "--noise", "0.1", "--epochs", "12", "--seed", "5", "--quiet"]
    proc = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    run = _wait_for_epochs(tmp_path / "killed", 4)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    st = run.status()
    assert st["state"] == "interrupted"
    done = st["epochs_done"][0]
    assert done >= 4 and np.isfinite(run.dynamics(0, "margin")).all()  # finished epochs intact and readable
    r = subprocess.run([sys.executable, "-m", "engine", "audit", "--resume", str(run.path), "--quiet"],
                       env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert run.status()["state"] == "done"
    full, ds = audit.prepare(AuditConfig(noise=0.1, epochs=12, seed=5), tmp_path / "full")
    audit.execute(full, ds)
    for name in ("margin", "prob", "pred", "el2n"):
        np.testing.assert_array_equal(run.dynamics(1, name), full.dynamics(1, name))
    pd.testing.assert_frame_equal(run.scores(), full.scores())


@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
@pytest.mark.slow
def test_ctrl_c_or_sigterm_marks_the_run_interrupted_and_says_how_to_resume(tmp_path, sig, code):
    """Ctrl-C and a scheduler's SIGTERM stop a headless audit the same way: interrupted (not failed), partial
    scores from the finished epochs, the resume command printed; --resume then finishes it."""
    env = dict(os.environ, DIFFICULTY_AUDIT_RUNS=str(tmp_path))
    # a shell without job control starts background jobs with SIGINT ignored, and Python then installs no Ctrl-C
    # handler: restore the default so that this test means the same however the suite was started (`... &`)
    proc = subprocess.Popen([sys.executable, "-m", "engine", "audit", "--epochs", "8", "--quiet"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    run = _wait_for_epochs(tmp_path, 2)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == code, err
    raw = run.raw_status()
    assert raw["state"] == "interrupted" and not raw.get("error"), raw
    assert f"Continue with: python -m engine audit --resume {run.path}" in err and "Traceback" not in err
    assert run.summary()["partial"] and run.scores() is not None
    r = subprocess.run([sys.executable, "-m", "engine", "audit", "--resume", str(run.path), "--quiet"],
                       env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert run.status()["state"] == "done" and run.status()["epochs_done"] == [8, 8]


def _zip(entries: dict[str, bytes], symlink: str | None = None) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in entries.items():
            zf.writestr(name, data)
        if symlink:
            info = zipfile.ZipInfo(symlink)
            info.external_attr = (0o120777 << 16)
            zf.writestr(info, "/etc/passwd")
    return buf.getvalue()


def _png() -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


@pytest.mark.parametrize(
    "entries, symlink, message",
    [
        ({"/etc/evil.png": b"x"}, None, "absolute path"),
        ({"../../evil.png": b"x"}, None, "absolute path or '..'"),
        ({"a/ok.png": b"x"}, "a/link.png", "symbolic link"),
        ({"bomb/a/x.png": b"\0" * 60_000_000}, None, "zip bomb"),
    ],
)
def test_hostile_zips_are_refused(tmp_path, entries, symlink, message):
    with pytest.raises(DatasetError, match=message):
        extract_image_zip(_zip(entries, symlink), tmp_path)
    assert not any(tmp_path.rglob("*.png"))


def test_not_a_zip_and_a_good_zip(tmp_path):
    with pytest.raises(DatasetError, match="not a zip"):
        extract_image_zip(b"PK-but-not-really", tmp_path)
    root = extract_image_zip(_zip({f"data/{c}/{i}.png": _png() for c in "ab" for i in range(3)}), tmp_path)
    assert root.name == "data" and sorted(p.name for p in root.iterdir()) == ["a", "b"]


@pytest.mark.slow
def test_config_edge_cases(tmp_path):
    for bad, msg in [({"epochs": -3}, "epochs"), ({"noise": 1.0}, "noise"), ({"threshold_runs": 0}, "threshold runs")]:
        with pytest.raises(ConfigError, match=msg):
            audit.prepare(AuditConfig(**bad), tmp_path)
    # a batch larger than the dataset trains full-batch
    run, ds = audit.prepare(AuditConfig(epochs=2, batch_size=5000, noise=0.1), tmp_path)
    assert audit.execute(run, ds)["n_samples"] == 1797


def _folder(root: Path, counts: dict[str, int]) -> Path:
    for c, n in counts.items():
        (root / c).mkdir(parents=True)
        for i in range(n):
            Image.fromarray(np.full((8, 8), 30 * i % 255, np.uint8)).save(root / c / f"{i}.png")
    return root


def test_one_class_is_refused_and_a_class_of_one_sample_works(tmp_path):
    with pytest.raises(DatasetError, match="at least 2 classes"):
        audit.prepare(AuditConfig(dataset=str(_folder(tmp_path / "one", {"only": 5})), epochs=1), tmp_path / "r")
    cfg = AuditConfig(dataset=str(_folder(tmp_path / "two", {"many": 30, "single": 1})), epochs=2,
                      threshold_samples=False)
    run, ds = audit.prepare(cfg, tmp_path / "r")
    assert audit.execute(run, ds)["n_samples"] == 31


def test_images_are_served_only_from_the_dataset_root(tmp_path):
    data = _folder(tmp_path / "d", {"a": 4, "b": 4})
    run, ds = audit.prepare(AuditConfig(dataset=str(data), epochs=1, threshold_samples=False), tmp_path / "r")
    audit.execute(run, ds)
    assert SampleImages(run).png(0)[:4] == b"\x89PNG"
    (tmp_path / "secret.png").write_bytes(_png())
    samples = run.samples()
    samples.loc[1, "source"] = "../secret.png"  # a tampered samples table must not reach outside the root
    samples.to_parquet(run.path / "samples.parquet")
    with pytest.raises(ImageError, match="outside the dataset root"):
        SampleImages(run).image(1)


def test_run_ids_cannot_escape_the_runs_folder(tmp_path, monkeypatch):
    root = tmp_path / "runs"
    root.mkdir()
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "config.json").write_text(json.dumps({}))
    (tmp_path / "cwd" / "deep").mkdir(parents=True)
    monkeypatch.chdir(tmp_path / "cwd" / "deep")  # run ids below must not resolve as paths from here
    # (an explicit directory path, e.g. ../../elsewhere from here, is the CLI user opening a run by path)
    for run_id in ["..", "../elsewhere", "runs/../elsewhere", "../runs/../elsewhere", ".hidden", "a" * 200]:
        with pytest.raises(RunError):
            open_run(run_id, root)
    with pytest.raises(RunError, match="not a run directory"):
        open_run("/etc")


def test_checkpoints_load_with_weights_only(small_run):
    import torch

    state = torch.load(small_run.path / "checkpoints" / "pass0.pt", weights_only=True)
    # the forward correction's state (engine.training.correction) rides along as plain tensors
    assert set(state) == {"model", "optimizer", "epoch", "correction_last", "correction_streak", "correction_matrix"}
    assert all(isinstance(state[k], torch.Tensor) for k in ("correction_last", "correction_streak", "correction_matrix"))


def test_unwritable_runs_folder_is_a_clear_error(tmp_path):
    """A runs folder the OS refuses to write: mode 555 for a normal user; as root (which ignores modes), /sys."""
    if os.geteuid() == 0:
        target = Path("/sys/difficulty-audit-runs")  # sysfs refuses new directories even to root (EPERM)
    else:
        (tmp_path / "ro").mkdir()
        (tmp_path / "ro").chmod(0o555)
        target = tmp_path / "ro" / "runs"
    r = subprocess.run([sys.executable, "-m", "engine", "audit", "--epochs", "1", "--out", str(target), "--quiet"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 2, r.stderr[-2000:]
    assert "cannot create a run in" in r.stderr and "writable runs folder" in r.stderr and "Traceback" not in r.stderr
    assert not target.exists()


@pytest.mark.slow
def test_write_failure_mid_training_marks_the_run_failed(tmp_path):
    """A file-size limit makes the first checkpoint write fail for real (EFBIG, as a full disk would fail it)."""
    code = (
        "import resource, signal, sys\n"
        "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
        "resource.setrlimit(resource.RLIMIT_FSIZE, (250_000, 250_000))\n"
        "from engine.cli import main\n"
        f"sys.exit(main(['audit', '--epochs', '3', '--out', {str(tmp_path)!r}, '--quiet']))\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                       cwd=Path(__file__).resolve().parent.parent)
    assert r.returncode != 0
    (run,) = list_runs(tmp_path)
    st = run.status()
    assert st["state"] == "failed" and "File too large" in st["error"]
    assert run.samples()["sample_id"].size == 1797  # what was written before the fault is intact
    assert run.config()["epochs"] == 3
    assert not list(run.path.rglob("*.tmp"))  # no half-written file left behind


def test_csv_ids_with_separators_and_unicode_join_exactly(tmp_path):
    from engine.scores.predefined import join_to_run, parse_csv, validate

    ids = np.array(["a/b.png", "..\\\\c.png", "日本/猫.jpg", "=1+1", "x,y"], dtype=object)
    data = ("sample_id,s\n" + "".join(f'"{i}",{k}\n' for k, i in enumerate(ids))).encode("utf-8")
    joined = join_to_run(validate(parse_csv(data).frame, "sample_id", ["s"]), ids)
    assert joined.n_matched == 5 and joined.values["s"].tolist() == [0, 1, 2, 3, 4]
