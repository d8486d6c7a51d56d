"""The input pipeline: image files decoded on demand, streamed by DataLoader workers, same training as in memory."""

from __future__ import annotations

import csv
import json
import shutil
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from engine.data import pipeline
from engine.data.datasets import DatasetError, FileImages, load_dataset
from engine.ood.evaluate import Corrupted
from engine.store.runs import DYNAMICS
from engine.training import audit
from engine.training.config import AuditConfig, ConfigError
from engine.training.loop import Cancelled

FOLDER = Path(__file__).resolve().parent.parent / "sample_data" / "digits_folder"


def _copy_folder(tmp_path: Path) -> Path:
    root = tmp_path / "digits_folder"
    shutil.copytree(FOLDER, root)
    return root


def test_lazy_folder_and_manifest_decode_exactly_like_eager(tmp_path):
    eager, lazy = load_dataset(str(FOLDER)), load_dataset(str(FOLDER), lazy=True)
    assert isinstance(lazy.images, FileImages) and lazy.images.shape == eager.images.shape
    assert np.array_equal(lazy.images[:], eager.images)
    assert np.array_equal(lazy.images[7], eager.images[7])
    picked = np.array([299, 3, 150])
    assert np.array_equal(lazy.images[picked], eager.images[picked])
    sub = lazy.subset(lazy.labels == 4)  # stays lazy
    assert isinstance(sub.images, FileImages) and np.array_equal(sub.images[:], eager.images[eager.labels == 4])
    root = _copy_folder(tmp_path)  # a manifest over the same files, RGB-resized to 20 px
    with open(root / "m.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["path", "label"])
        for sid, lab in zip(eager.sample_ids, eager.labels, strict=True):
            w.writerow([sid, eager.classes[lab]])
    a, b = load_dataset(str(root / "m.csv"), image_size=20), load_dataset(str(root / "m.csv"), image_size=20, lazy=True)
    assert b.images.shape == (300, 20, 20, 1) and np.array_equal(b.images[:], a.images)


def test_header_check_rejects_empty_and_non_image_files_before_training(tmp_path):
    root = _copy_folder(tmp_path)
    (root / "3" / "empty.png").write_bytes(b"")
    with pytest.raises(DatasetError, match="empty.png.*empty"):
        load_dataset(str(root), lazy=True)
    (root / "3" / "empty.png").unlink()
    (root / "5" / "notes.png").write_text("not an image")
    with pytest.raises(DatasetError, match="notes.png"):
        load_dataset(str(root), lazy=True)


def test_channel_stats_are_exact_and_do_not_depend_on_batching():
    x = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (500, 3, 9, 9), dtype=np.uint8))
    mean, std = pipeline.channel_stats([x])
    ref = x.double().div(255).permute(1, 0, 2, 3).reshape(3, -1)
    assert torch.allclose(mean.flatten().double(), ref.mean(1), atol=1e-6)
    assert torch.allclose(std.flatten().double(), ref.std(1), atol=1e-6)
    m2, s2 = pipeline.channel_stats(x[s : s + 37] for s in range(0, 500, 37))
    assert torch.equal(mean, m2) and torch.equal(std, s2)


def test_auto_picks_stream_above_the_memory_limit(monkeypatch):
    images = load_dataset(str(FOLDER), lazy=True).images
    assert pipeline.choose_loader("auto", images) == "memory"
    monkeypatch.setattr(pipeline, "IN_MEMORY_LIMIT", images.nbytes - 1)
    assert pipeline.choose_loader("auto", images) == "stream"
    assert pipeline.choose_loader("memory", images) == "memory"
    # on a GPU, auto keeps at most a quarter of its free memory for the data
    gpu, limit = torch.device("cuda"), 4 * 1024**3
    monkeypatch.setattr(pipeline, "IN_MEMORY_LIMIT", limit)
    assert pipeline.in_memory_limit(gpu, free_bytes=80 * 1024**3) == limit
    assert pipeline.in_memory_limit(gpu, free_bytes=8 * 1024**3) == 2 * 1024**3
    assert pipeline.in_memory_limit(torch.device("cpu"), free_bytes=1) == limit
    with pytest.raises(ConfigError, match="loader must be one of"):
        AuditConfig(loader="disk").validate()
    with pytest.raises(ConfigError, match="workers"):
        AuditConfig(workers=-1).validate()


@pytest.mark.slow
def test_streamed_audit_with_worker_processes_equals_the_in_memory_audit(tmp_path, monkeypatch):
    """Same files, seed and batches: the DataLoader path (2 decoding processes) trains bit for bit like the tensor path."""
    runs = {}
    for name, limit in (("memory", pipeline.IN_MEMORY_LIMIT), ("stream", 0)):
        monkeypatch.setattr(pipeline, "IN_MEMORY_LIMIT", limit)  # loader auto decides by size
        cfg = AuditConfig(dataset=str(FOLDER), noise=0.0, epochs=3, workers=2, device="cpu")
        run, ds = audit.prepare(cfg, tmp_path / name)
        audit.execute(run, ds)
        runs[name] = run
    assert runs["memory"].status()["input_pipeline"]["loader"] == "memory"
    assert runs["stream"].status()["input_pipeline"] == {"loader": "stream", "workers": 2, "device": "cpu"}
    for p in range(2):
        for k in DYNAMICS:
            a, b = runs["memory"].dynamics(p, k), runs["stream"].dynamics(p, k)
            assert a.shape == (3, 300) and np.array_equal(a, b), (p, k)
    assert runs["memory"].scores()["aum"].equals(runs["stream"].scores()["aum"])
    assert np.array_equal(np.load(runs["memory"].path / "features.npy"), np.load(runs["stream"].path / "features.npy"))


@pytest.mark.slow
def test_a_file_corrupt_past_its_header_fails_the_streamed_run_with_its_name(tmp_path, monkeypatch):
    root = _copy_folder(tmp_path)
    files = sorted((root / "6").iterdir())
    bad = files[0]
    bad.write_bytes(bad.read_bytes()[:60])  # header intact, pixel data cut
    for loader in ("memory", "stream"):  # decoded (memory) or read for the normalisation (stream) before the run exists
        with pytest.raises(DatasetError, match=bad.name):
            audit.prepare(AuditConfig(dataset=str(root), loader=loader, workers=1), tmp_path / "runs")
        assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())
    # A file outside the normalisation sample is first read in training: the run fails naming it, epochs kept.
    monkeypatch.setattr(pipeline, "STATS_SAMPLES", 16)
    order = load_dataset(str(root), lazy=True).sources
    outside = next(i for i in range(len(order)) if i not in set(pipeline.stats_sample(len(order))))
    shutil.copy(files[1], bad)  # repair the first one, break one that the sample skips
    bad = root / order[outside]
    bad.write_bytes(bad.read_bytes()[:60])
    cfg = AuditConfig(dataset=str(root), noise=0.0, epochs=2, loader="stream", workers=1, device="cpu")
    run, ds = audit.prepare(cfg, tmp_path / "runs")
    with pytest.raises(DatasetError) as err:
        audit.execute(run, ds)
    assert bad.name in str(err.value) and "Traceback" not in str(err.value)
    assert run.status()["state"] == "failed" and bad.name in run.status()["error"]


@pytest.mark.slow
def test_cancel_while_streaming_then_resume_equals_an_uninterrupted_run(tmp_path):
    cfg = AuditConfig(dataset=str(FOLDER), noise=0.0, epochs=4, loader="stream", workers=1, device="cpu")
    run, ds = audit.prepare(cfg, tmp_path / "runs")
    cancel = threading.Event()

    def after(r):
        if r.epoch == 1:
            cancel.set()

    with pytest.raises(Cancelled):
        audit.execute(run, ds, on_epoch=after, cancel=cancel)
    st = run.status()
    assert st["state"] == "cancelled" and st["epochs_done"][0] == 2
    assert np.isfinite(run.dynamics(0, "margin")[:2]).all()
    audit.execute(run, None, resume=True)  # re-reads the folder, streams again from epoch 2
    whole, ds2 = audit.prepare(AuditConfig(dataset=str(FOLDER), noise=0.0, epochs=4, loader="memory", device="cpu"),
                               tmp_path / "whole")
    audit.execute(whole, ds2)
    assert run.status()["state"] == "done"
    for p in range(2):
        assert np.array_equal(run.dynamics(p, "margin"), whole.dynamics(p, "margin"))


def test_normalisation_is_measured_once_whatever_the_loader(tmp_path, monkeypatch):
    """A streamed source measured 4,096 images and an in-memory one all of them; now one rule, in the config."""
    stats = {}
    for loader in ("memory", "stream"):
        run, ds = audit.prepare(AuditConfig(dataset=str(FOLDER), loader=loader, workers=1), tmp_path / loader)
        stats[loader] = run.config()["normalization"]
    assert stats["memory"] == stats["stream"]
    pixels = load_dataset(str(FOLDER)).images.astype(np.float64) / 255.0  # 300 images: all are measured
    assert stats["memory"]["images"] == 300
    assert stats["memory"]["mean"] == pytest.approx([pixels.mean()], abs=1e-6)
    assert stats["memory"]["std"] == pytest.approx([pixels.std(ddof=1)], abs=1e-6)


@pytest.mark.slow
def test_resume_with_another_loader_keeps_the_runs_normalisation(tmp_path, monkeypatch):
    """``--loader auto`` may pick another source on resume (another GPU's free memory): the statistics stay the
    run's, so the resumed run trains exactly like the uninterrupted one."""
    monkeypatch.setattr(pipeline, "STATS_SAMPLES", 16)  # a sample's statistics differ from all images'
    cfg = dict(dataset=str(FOLDER), noise=0.0, epochs=3, loader="stream", workers=0, device="cpu")
    run, ds = audit.prepare(AuditConfig(**cfg), tmp_path / "runs")
    assert run.config()["normalization"]["images"] == 16
    cancel = threading.Event()
    with pytest.raises(Cancelled):
        audit.execute(run, ds, on_epoch=lambda r: cancel.set(), cancel=cancel)
    raw = run.config() | {"loader": "memory"}  # as if auto now chose the in-memory source
    (run.path / "config.json").write_text(json.dumps(raw))
    audit.execute(run, None, resume=True)
    assert run.status()["input_pipeline"]["loader"] == "memory"
    whole, ds2 = audit.prepare(AuditConfig(**cfg), tmp_path / "whole")
    audit.execute(whole, ds2)
    for p in range(2):
        assert np.array_equal(run.dynamics(p, "margin"), whole.dynamics(p, "margin"))


@pytest.mark.slow
def test_streamed_audit_with_corruption_sets_evaluates_them(tmp_path):
    images = load_dataset(str(FOLDER), lazy=True).images.select(np.arange(12))
    noisy = Corrupted(images, "noise", seed=4)  # per-image seeds: batching does not change the noise
    assert np.array_equal(noisy[np.arange(12)], np.stack([noisy[i] for i in range(12)]))
    assert not np.array_equal(noisy[0], images[0])
    cfg = AuditConfig(dataset=str(FOLDER), noise=0.0, epochs=3, loader="stream", workers=1, device="cpu",
                      corruptions=["noise", "invert"])
    run, ds = audit.prepare(cfg, tmp_path / "runs")
    held = 300 - len(ds)
    per_class = np.bincount(load_dataset(str(FOLDER)).labels)
    assert held == sum(round(0.2 * n) for n in per_class)  # 20% of each class held out for the OoD comparison
    audit.execute(run, ds)


    report = json.loads((run.path / "ood" / "report.json").read_text())
    assert {"ID test", "corrupted: noise", "corrupted: invert"} <= set(report["sets"])
    assert report["sets"]["ID test"]["n"] == report["sets"]["corrupted: noise"]["n"] == held
    from scipy.stats import mannwhitneyu

    from engine.ood.evaluate import load_results

    res = load_results(run)  # AUROC = Mann-Whitney U / (n_ood n_id) of low density meaning OoD
    k_id, k_noise = report["sets"]["ID test"]["key"], report["sets"]["corrupted: noise"]["key"]
    u = mannwhitneyu(-res[f"{k_noise}_log_density"], -res[f"{k_id}_log_density"]).statistic
    assert report["ood"]["corrupted: noise"]["auroc_density"] == pytest.approx(u / held**2, rel=1e-9)
    assert report["ood"]["corrupted: noise"]["auroc_density"] > 0.9  # Gaussian noise of half the range is far from digits


def test_decoding_workers_do_not_rerun_the_main_script(tmp_path):
    """Under Streamlit the main module is the unguarded dashboard script: workers must not import it again."""
    marker = tmp_path / "imports.txt"
    script = tmp_path / "app_like.py"
    script.write_text(
        "import multiprocessing, numpy as np, torch\n"
        f"open({str(marker)!r}, 'a').write(multiprocessing.current_process().name + '\\n')\n"
        "from engine.data.datasets import load_dataset\n"
        "from engine.data.pipeline import StreamImages, sequential\n"
        "if multiprocessing.current_process().name == 'MainProcess':\n"
        f"    ds = load_dataset({str(FOLDER)!r}, lazy=True)\n"
        "    with StreamImages(ds.images, torch.device('cpu'), workers=2) as src:\n"
        "        n = sum(len(x) for _, x in sequential(src, 64))\n"
        "    assert n == 300, n\n"
    )
    import subprocess
    import sys

    r = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300,
                       cwd=Path(__file__).resolve().parent.parent)
    assert r.returncode == 0, r.stderr[-2000:]
    assert marker.read_text().split() == ["MainProcess"]
