"""The Recorder in a user's own loop, threshold_targets, and parity with our training loop's capture."""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from sklearn.metrics import roc_auc_score
from torch import nn

from engine import Recorder, threshold_targets
from engine.store.runs import Run
from engine.training.config import ConfigError


def _noisy_digits(seed: int = 0, rate: float = 0.2):
    d = load_digits()
    rng = np.random.default_rng(seed)
    y = d.target.copy()
    flip = rng.random(len(y)) < rate
    y[flip] = (y[flip] + rng.integers(1, 10, flip.sum())) % 10
    x = torch.tensor(d.images[:, None] / 16.0, dtype=torch.float32)
    return x, y, flip, d.target


def _user_loop(rec: Recorder, x, targets: np.ndarray, epochs: int, n_out: int, seed: int = 0) -> None:
    """A plain PyTorch loop, written the way a user would (not ours)."""
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(32 * 64, 128), nn.ReLU(),
                        nn.Linear(128, n_out))
    opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    y = torch.as_tensor(targets)
    for _ in range(epochs):
        for b in torch.randperm(len(y)).split(64):
            logits = net(x[b])
            loss = F.cross_entropy(logits, y[b])
            opt.zero_grad()
            loss.backward()
            opt.step()
            rec.update(b, logits.detach(), y[b])
        rec.end_epoch()


@pytest.mark.slow
def test_user_loop_records_a_run_that_ranks_flipped_labels_and_opens_in_the_pages(tmp_path, monkeypatch):
    torch.set_num_threads(1)
    x, y, flip, true = _noisy_digits()
    ids = [f"img-{i:04d}" for i in range(len(y))]
    rec = Recorder(tmp_path / "runs", ids, y.tolist(), [str(c) for c in range(10)], 12, true_labels=true)
    _user_loop(rec, x, y, 12, 10)
    run = Run(rec.finish())
    assert run.status()["state"] == "done"
    scores = run.scores()
    assert list(scores["sample_id"]) == ids
    auroc = roc_auc_score(flip, -scores["rank"].to_numpy())
    assert auroc >= 0.99, auroc
    summary = run.summary()
    assert summary["n_label_errors"] == int(flip.sum()) and summary["recall"] > 0.8
    from streamlit.testing.v1 import AppTest

    monkeypatch.setenv("DIFFICULTY_AUDIT_RUNS", str(tmp_path / "runs"))
    at = AppTest.from_file(str(Path(__file__).resolve().parent.parent / "app.py"), default_timeout=60).run()
    for page in ("app_pages/aum.py", "app_pages/flagged.py", "app_pages/scores.py"):
        at.switch_page(page).run()
        assert not at.exception, (page, at.exception)


def test_two_threshold_passes_share_one_run(tmp_path):
    torch.set_num_threads(1)
    x, y, flip, _ = _noisy_digits(seed=1)
    x, y, flip = x[:600], y[:600], flip[:600]
    classes = [str(c) for c in range(10)]
    ids = [f"s{i}" for i in range(len(y))]
    t0 = threshold_targets(y, 10, 0, seed=5)
    t1 = threshold_targets(torch.as_tensor(y), 10, 1, seed=5)
    assert isinstance(t1, torch.Tensor)
    m0, m1 = t0 == 10, t1.numpy() == 10
    assert m0.sum() == m1.sum() == len(y) // 11 and not (m0 & m1).any()
    assert (t0[~m0] == y[~m0]).all()
    rec = Recorder(tmp_path / "runs", ids, y, classes, 3, pass_index=0)
    _user_loop(rec, x, t0, 3, 11)
    run_dir = rec.finish()
    with pytest.raises(ConfigError, match="already recorded"):
        Recorder(run_dir, ids, y, classes, 3, pass_index=0)
    rec1 = Recorder(run_dir, ids, y, classes, 3, pass_index=1)
    _user_loop(rec1, x, t1.numpy(), 3, 11, seed=1)
    assert rec1.finish() == run_dir
    run = Run(run_dir)
    samples = run.samples()
    assert (samples["threshold_pass"].to_numpy() == np.where(m0, 0, np.where(m1, 1, -1))).all()
    assert run.config()["threshold_samples"] and run.n_passes() == 2
    scores = run.scores()
    assert np.isfinite(scores["aum"]).all()  # every sample kept its label in one of the two passes
    assert run.summary()["n_unscored"] == 0 and len(run.summary()["pass_cutoffs"]) == 2


def test_later_pass_needs_the_run_directory_and_the_same_samples(tmp_path):
    ids, labels, classes = ["a", "b", "c", "d"], [0, 1, 0, 1], ["x", "y"]
    with pytest.raises(ConfigError, match="run directory"):
        Recorder(tmp_path / "runs", ids, labels, classes, 2, pass_index=1)
    rec = Recorder(tmp_path / "runs", ids, labels, classes, 2)
    with pytest.raises(ConfigError, match="other samples"):
        Recorder(rec.run.path, ["a", "b", "c", "e"], labels, classes, 2, pass_index=1)


def test_bad_inputs_are_clear_errors(tmp_path):
    with pytest.raises(ConfigError, match="unique"):
        Recorder(tmp_path, ["a", "a", "b"], [0, 1, 0], ["x", "y"], 2)
    with pytest.raises(ConfigError, match="labels"):
        Recorder(tmp_path, ["a", "b"], [0, 1, 0], ["x", "y"], 2)
    with pytest.raises(ConfigError, match="not among the classes"):
        Recorder(tmp_path, ["a", "b"], ["x", "z"], ["x", "y"], 2)
    rec = Recorder(tmp_path, ["a", "b", "c"], ["x", "y", "x"], ["x", "y"], 1)
    with pytest.raises(ConfigError, match="logits must be"):
        rec.update([0, 1], torch.zeros(2, 5), [0, 1])
    rec.update([0, 1, 2], torch.tensor([[2.0, 0.0], [0.0, 1.0], [0.0, 3.0]]), [0, 0, 0])
    with pytest.raises(ConfigError, match="targets must be the given labels"):
        rec.end_epoch()  # sample 1 (label y) trained on x


def test_recorder_captures_what_our_training_loop_captures(tmp_path):
    """Parity: feed the logits of our own loop's forward passes to a Recorder; the arrays are identical."""
    from engine.training import audit
    from engine.training.config import AuditConfig
    from engine.training.loop import batch_slices, epoch_generator

    torch.set_num_threads(1)
    cfg = AuditConfig(dataset="digits", noise=0.1, epochs=1, threshold_runs=1, augment=False, device="cpu")
    run, ds = audit.prepare(cfg, tmp_path / "ours")
    seen: list[torch.Tensor] = []
    hook = torch.nn.modules.module.register_module_forward_hook(
        lambda m, i, out: seen.append(out.detach().clone()) if type(m).__name__ == "SmallCNN" and m.training else None)
    try:
        audit.execute(run, ds)
    finally:
        hook.remove()
    samples = run.samples()
    n_real = ds.n_classes
    targets = samples["label"].to_numpy().copy()
    targets[samples["threshold_pass"].to_numpy() == 0] = n_real
    rec = Recorder(tmp_path / "rec", samples["sample_id"], samples["label"], run.classes(), cfg.epochs)
    batches = iter(seen)
    for epoch in range(cfg.epochs):
        perm = torch.randperm(len(ds), generator=epoch_generator(cfg.seed, 0, epoch))
        for sl in batch_slices(len(perm), cfg.batch_size):
            idx = perm[sl]
            rec.update(idx, next(batches), torch.from_numpy(targets)[idx])
        rec.end_epoch()
    mine = Run(rec.finish())
    for name in ("margin", "margin_yang", "prob", "loss", "el2n", "pred", "other"):
        np.testing.assert_array_equal(np.asarray(mine.dynamics(0, name)), np.asarray(run.dynamics(0, name)), name)
    assert (mine.samples()["threshold_pass"].to_numpy() == samples["threshold_pass"].to_numpy()).all()
    ours, theirs = run.scores(), mine.scores()
    np.testing.assert_allclose(theirs["aum"].to_numpy(), ours["aum"].to_numpy())


def test_batch_capture_matches_direct_formulas():
    """batch_capture against the textbook definitions, computed in float64 with full sorts."""
    from engine.capture.dynamics import batch_capture

    g = torch.Generator().manual_seed(0)
    for c, n_real in ((10, 10), (11, 10), (1000, 1000), (1001, 1000)):
        z = torch.randn(257, c, generator=g) * 4
        y = torch.randint(0, c, (257,), generator=g)
        cap = batch_capture(z, y, n_real)
        zd = z.double()
        zy = zd.gather(1, y.view(-1, 1)).squeeze(1)
        others = zd.scatter(1, y.view(-1, 1), float("-inf"))
        srt = zd.sort(dim=1, descending=True).values
        p = torch.softmax(zd, 1)
        np.testing.assert_allclose(cap.margin, zy - others.amax(1), rtol=1e-6, atol=1e-5)
        np.testing.assert_allclose(cap.margin_yang, zy - srt[:, 1], rtol=1e-6, atol=1e-5)
        np.testing.assert_array_equal(cap.other, others[:, :n_real].argmax(1))
        np.testing.assert_allclose(cap.loss, F.cross_entropy(zd, y, reduction="none"), rtol=1e-5, atol=1e-5)
        el2n = (p - F.one_hot(y, c).double()).norm(dim=1)
        prob, pred = p.gather(1, y.view(-1, 1)).squeeze(1), zd.argmax(1)
        if n_real < c:  # a threshold pass: a real-labelled sample's prob, EL2N and prediction over the real classes
            real, yr = y < n_real, y.clamp(max=n_real - 1)
            pr = torch.softmax(zd[:, :n_real], 1)
            prob = torch.where(real, pr.gather(1, yr.view(-1, 1)).squeeze(1), prob)
            el2n = torch.where(real, (pr - F.one_hot(yr, n_real).double()).norm(dim=1), el2n)
            pred = torch.where(real, zd[:, :n_real].argmax(1), pred)
        np.testing.assert_array_equal(cap.pred, pred)
        np.testing.assert_allclose(cap.prob, prob, rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(cap.el2n, el2n, rtol=1e-5, atol=1e-6)


def test_samples_table_keeps_sources_and_images_root(tmp_path):
    root = tmp_path / "imgs"
    root.mkdir()
    rec = Recorder(tmp_path / "runs", ["a", "b"], [0, 1], ["x", "y"], 1, sources=["x/a.png", "y/b.png"],
                   images_root=root)
    assert rec.run.config()["dataset_root"] == str(root.resolve())
    assert list(rec.run.samples()["source"]) == ["x/a.png", "y/b.png"]
    assert isinstance(rec.run.samples(), pd.DataFrame)


def test_a_recorded_run_is_not_resumable_by_our_loop(tmp_path, capsys):
    from engine.cli import main

    rec = Recorder(tmp_path / "runs", ["a", "b", "c"], [0, 1, 0], ["x", "y"], 2)
    rec.update([0, 1, 2], torch.tensor([[2.0, 0.0], [0.0, 1.0], [1.0, 0.0]]), [0, 1, 0])
    rec.end_epoch()
    rec.sync()
    rec.run.update_status(state="interrupted")  # the user's process died after one epoch
    assert main(["audit", "--resume", str(rec.run.path)]) == 2
    assert "not by our training loop" in capsys.readouterr().err


def test_doctests_of_the_recorder():
    import doctest

    import engine.capture.recorder

    result = doctest.testmod(engine.capture.recorder, raise_on_error=True)
    assert result.attempted >= 8 and result.failed == 0


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_dynamics_rows_sync_in_a_forked_child(tmp_path):
    """The run store syncs a run's arrays from a thread pool; a child forked after the pool started must not wait
    on the parent's threads (which do not exist in the child) forever."""
    import signal

    from engine.store import runs

    path = tmp_path / "a.npy"
    arr = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(2, 3))
    arr[0] = 1.0
    runs._sync_files([path])  # the pool exists in the parent
    pid = os.fork()
    if pid == 0:  # the child: sync and leave at once (no pytest teardown)
        arr[1] = 2.0
        runs._sync_files([path])
        os._exit(0)
    deadline = time.time() + 30
    while time.time() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        time.sleep(0.05)
    else:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        pytest.fail("the forked child hung syncing the dynamics files")
    assert os.waitstatus_to_exitcode(status) == 0
    assert np.load(path)[1].tolist() == [2.0, 2.0, 2.0]


def test_rows_are_counted_in_the_status_at_the_sync_interval_and_at_sync(tmp_path, monkeypatch):
    """Short epochs are made durable (and counted in status.json) every SYNC_SECONDS, not after each epoch;
    ``sync()`` and the last epoch always count every row written."""
    import engine.capture.recorder as recorder

    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0], [1.0, 0.0]])
    monkeypatch.setattr(recorder, "SYNC_SECONDS", 3600.0)
    rec = Recorder(tmp_path / "runs", ["a", "b", "c"], [0, 1, 0], ["x", "y"], 3)
    for _ in range(2):
        rec.update([0, 1, 2], logits, [0, 1, 0])
        rec.end_epoch()
    rec._wait()
    st = rec.run.raw_status()
    assert st["epochs_done"] == [0] and st["history"] == []  # written, not yet synced: not counted
    rec.sync()
    st = rec.run.raw_status()
    assert st["epochs_done"] == [2] and [h["epoch"] for h in st["history"]] == [0, 1]
    assert np.isfinite(np.load(rec.run.dynamics_path(0, "margin"))[:2]).all()
    rec.update([0, 1, 2], logits, [0, 1, 0])
    rec.end_epoch()  # the last epoch: synced and counted without sync()
    rec._wait()
    assert rec.run.raw_status()["epochs_done"] == [3]

    monkeypatch.setattr(recorder, "SYNC_SECONDS", 0.0)  # epochs longer than the interval: counted each epoch
    rec = Recorder(tmp_path / "runs2", ["a", "b", "c"], [0, 1, 0], ["x", "y"], 3)
    rec.update([0, 1, 2], logits, [0, 1, 0])
    rec.end_epoch()
    rec._wait()
    assert rec.run.raw_status()["epochs_done"] == [1]


def test_targets_must_be_the_labels_or_the_fake_class_and_stay_the_same(tmp_path):
    logits = torch.zeros(3, 3)
    rec = Recorder(tmp_path / "runs", ["a", "b", "c"], [0, 1, 0], ["x", "y"], 3)
    rec.update([0, 1, 2], logits, [0, 2, 0])  # b is a threshold sample (fake class 2)
    rec.end_epoch()
    rec.update([0, 1, 2], logits, [0, 2, 0])  # the same targets again: fine
    rec.end_epoch()
    rec.update([0, 1, 2], logits, [2, 1, 0])  # a became a threshold sample, b got its label back
    with pytest.raises(ConfigError, match="changed target between epochs"):
        rec.end_epoch()

    rec = Recorder(tmp_path / "runs2", ["a", "b", "c"], [0, 1, 0], ["x", "y"], 3)
    rec.update([0, 1, 2], logits, [0, 0, 0])  # b trained on a class that is neither its label nor the fake one
    with pytest.raises(ConfigError, match="sample 1 was trained on target 0 but its label is 1"):
        rec.end_epoch()


def _recorded_epoch(rec: Recorder, epoch: int = 0) -> dict[str, np.ndarray]:
    """One epoch's row of every dynamics array of a Recorder's run, once synced."""
    from engine.capture.recorder import CAPTURED

    rec.sync()
    return {name: np.asarray(rec.run.dynamics(rec.pass_index, name)[epoch]) for name in CAPTURED}


def _expected_epoch(z: torch.Tensor, y: torch.Tensor, n_real: int) -> dict[str, np.ndarray]:
    """``batch_capture`` of every sample's logits in one call, as the run store keeps them (sample order)."""
    from engine.capture.dynamics import batch_capture
    from engine.store.runs import DYNAMICS

    cap = vars(batch_capture(z, y, n_real))
    return {name: cap[name].numpy().astype(dt) for name, dt in DYNAMICS.items()}


def test_update_copies_the_batch_so_the_loop_may_reuse_or_free_its_tensors(tmp_path):
    """The Recorder keeps no reference to the loop's tensors after ``update``: a loop that writes each batch's
    logits into one reused output tensor (and overwrites it after the last batch) records each batch's values,
    and the logits' memory is freed when the loop drops them."""
    from torch.multiprocessing.reductions import StorageWeakRef

    n, c = 14, 3
    g = torch.Generator().manual_seed(0)
    z = torch.randn(n, c, generator=g) * 3
    y = torch.arange(n) % c
    rec = Recorder(tmp_path / "runs", [str(i) for i in range(n)], y.tolist(), ["a", "b", "c"], 1)
    out = torch.empty(4, c)  # the loop's one output tensor, reused for every batch
    for lo in range(0, 12, 4):
        out.copy_(z[lo : lo + 4])
        rec.update(torch.arange(lo, lo + 4), out, y[lo : lo + 4])
    out.fill_(-7.0)
    logits = z[12:].clone()
    storage = StorageWeakRef(logits.untyped_storage())
    rec.update(torch.tensor([12, 13]), logits, y[12:])
    del logits
    assert storage.expired()  # the batch's memory went back to the allocator
    rec.end_epoch()
    got = _recorded_epoch(rec)
    for name, want in _expected_epoch(z, y, c).items():
        np.testing.assert_array_equal(got[name], want, name)


@pytest.mark.parametrize(("n_out", "dtype"), [(10, torch.float64), (11, torch.bfloat16)])  # 11: a threshold pass
def test_batches_of_any_size_and_a_chunk_that_fills_mid_epoch_give_the_values_of_one_capture(tmp_path, monkeypatch,
                                                                                             n_out, dtype):
    """The chunk buffer fills in the middle of a batch and of the epoch (a chunk of 7 samples here, batches of
    1 to 23): every sample gets the values of ``batch_capture`` of all the epoch's logits in one call, in each of
    three epochs (the Recorder reuses its buffers from epoch to epoch). Float64 logits take numpy's copies, bfloat16
    ones torch's."""
    import engine.capture.recorder as recorder

    monkeypatch.setattr(recorder, "CHUNK_VALUES", 7 * n_out + 3)  # 7 rows
    n, epochs = 60, 3
    g = torch.Generator().manual_seed(1)
    labels = torch.randint(0, 10, (n,), generator=g)
    y = labels.clone()
    if n_out == 11:
        y[::5] = 10
    rec = Recorder(tmp_path / "runs", [str(i) for i in range(n)], labels.tolist(), [str(k) for k in range(10)],
                   epochs)
    z = (torch.randn(epochs, n, n_out, generator=g) * 4).to(dtype)  # captured as float32, as batch_capture does
    for epoch in range(epochs):
        perm = torch.randperm(n, generator=g)
        lo = 0
        for size in (1, 5, 23, 2, 7, 14, 8)[:: 1 if epoch % 2 == 0 else -1]:
            b = perm[lo : lo + size]
            rec.update(b.numpy(), z[epoch, b], y[b])  # idx as numpy, as a user's loader may give them
            lo += size
        assert lo == n
        rec.end_epoch()
    for epoch in range(epochs):
        got = _recorded_epoch(rec, epoch)
        for name, want in _expected_epoch(z[epoch].float(), y, 10).items():
            np.testing.assert_array_equal(got[name], want, f"{name}, epoch {epoch}")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_update_on_a_gpu_never_waits_for_the_device(tmp_path, monkeypatch):
    """On a GPU ``update`` only queues device work: torch's sync debug mode raises on any host sync, while batches
    (indices on the host, as a loader gives them) fill the chunk and it is captured mid-epoch. The values match a
    CPU Recorder's on the same logits (the GPU computes them with torch's kernels: equal to 1e-5)."""
    import engine.capture.recorder as recorder

    monkeypatch.setattr(recorder, "CHUNK_VALUES", 100 * 10)  # a 100-row chunk: captured three times per epoch
    n, c = 300, 10
    g = torch.Generator().manual_seed(2)
    z = torch.randn(n, c, generator=g) * 4
    labels = torch.randint(0, c, (n,), generator=g)
    batches = torch.randperm(n, generator=g).split(64)
    got = {}
    for device in ("cpu", "cuda"):
        rec = Recorder(tmp_path / device, [str(i) for i in range(n)], labels.tolist(), [str(k) for k in range(c)], 1)
        inputs = [(b, z[b].to(device), labels[b].to(device)) for b in batches]
        rec.update(*inputs[0])  # the first batch allocates the Recorder's buffers
        if device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("error")
        try:
            for b, logits, y in inputs[1:]:
                rec.update(b, logits, y)
        finally:
            if device == "cuda":
                torch.cuda.set_sync_debug_mode(0)
        rec.end_epoch()
        got[device] = _recorded_epoch(rec)
    for name in got["cpu"]:
        np.testing.assert_allclose(got["cuda"][name], got["cpu"][name], rtol=1e-5, atol=1e-6, err_msg=name)
