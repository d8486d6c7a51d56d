"""A recorder for any PyTorch training loop: the same run directory our own ``audit`` writes.

::

    from engine import Recorder, threshold_targets

    rec = Recorder("runs", sample_ids, labels, classes, epochs)
    for epoch in range(epochs):
        for x, y, idx in loader:            # y: the targets the loss uses; idx: positions in sample_ids
            logits = model(x)
            rec.update(idx, logits, y)      # on any device, no host sync per batch
        rec.end_epoch()
    run_dir = rec.finish()                  # scores, cut-off, summary.json: a normal run

``update`` copies the batch's logits into a chunk buffer on their device and every few million logits (at the
latest at ``end_epoch``) calls ``engine.capture.dynamics.batch_capture`` (the function our training loop calls) on them
and scatters the values into one per-sample buffer on that device; ``end_epoch`` copies
them to the host once and writes one row of the run's ``(epochs, samples)`` arrays through the
run store (``engine.store.runs``); ``finish`` scores the run with ``engine.training.audit.finalize``, like an
audit of ours.

Threshold samples (Pleiss et al. 2020): train pass ``p`` on ``threshold_targets(labels,
n_classes, p, seed)`` with ``n_classes + 1`` outputs and record it with
``Recorder(..., pass_index=p)``. Two passes share one run directory: pass 0 creates it under
``runs_dir`` and ``finish()`` returns it; pass 1 is recorded by giving that run directory as
``runs_dir`` with ``pass_index=1``. Each ``finish()`` rescores the run from every pass recorded so
far, so after pass 1 every sample has an AUM from the pass in which it kept its label.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from engine.capture.dynamics import CHUNK_VALUES, batch_capture
from engine.store.runs import (
    DYNAMICS,
    DynamicsWriter,
    Run,
    atomic_write_json,
    atomic_write_parquet,
    create_run,
    owner_fields,
)
from engine.training.config import AuditConfig, ConfigError

if TYPE_CHECKING:
    import torch

FLOAT_NAMES = [k for k, dt in DYNAMICS.items() if np.issubdtype(dt, np.floating)]
INT_NAMES = [k for k in DYNAMICS if k not in FLOAT_NAMES]
CAPTURED = FLOAT_NAMES + INT_NAMES
# How often (seconds) the Recorder makes the rows written so far durable (fdatasync of the seven arrays) and counts
# them in status.json. Syncing after every epoch cost a loop with 65 ms epochs 7 ms of (kernel) CPU per epoch, more
# than everything else the Recorder does; a recorded run cannot be resumed, and the rows a crashed process wrote
# stay in the page cache, so only a crash of the machine loses more than before: the epochs of the last few seconds.
# An epoch longer than this is synced at its end, as our own loop does; ``sync()`` and ``finish()`` always sync.
SYNC_SECONDS = 2.0


def threshold_targets(labels: Any, n_classes: int, pass_index: int, seed: int = 0) -> Any:
    """The targets of threshold pass ``pass_index``: ``labels`` with ``N // (c + 1)`` samples moved to class ``c``.

    Pleiss et al. 2020: the moved samples ("threshold samples") are mislabeled by construction; the
    99th percentile of their AUM is the cut-off below which a real sample is flagged. Train the
    pass with ``n_classes + 1`` outputs. The sets of passes 0, 1, ... of one ``seed`` are disjoint
    (slices of one seeded permutation, the same sets our own ``audit`` uses), so two passes give
    every sample an AUM from a pass in which it kept its label.

    ``labels`` may be a list, a numpy array or a torch tensor; the result has the same kind
    (a tensor stays on its device).

    >>> import numpy as np
    >>> labels = np.arange(22) % 2                       # 22 samples, 2 classes: 22 // 3 = 7 moved per pass
    >>> t0, t1 = threshold_targets(labels, 2, 0), threshold_targets(labels, 2, 1)
    >>> int((t0 == 2).sum()), int((t1 == 2).sum()), bool(((t0 == 2) & (t1 == 2)).any())
    (7, 7, False)
    """
    from engine.training.audit import threshold_assignment

    if pass_index < 0:
        raise ConfigError(f"pass_index must be 0 or more, got {pass_index}")
    is_tensor = type(labels).__module__.startswith("torch")
    y = np.asarray(labels.detach().cpu() if is_tensor else labels, dtype=np.int64)
    if y.ndim != 1:
        raise ConfigError(f"labels must be one class index per sample, got shape {y.shape}")
    if y.size and (y.min() < 0 or y.max() >= n_classes):
        raise ConfigError(f"labels must be class indices in 0..{n_classes - 1}, got {y.min()}..{y.max()}")
    moved = threshold_assignment(len(y), n_classes, pass_index + 1, seed) == pass_index
    out = y.copy()
    out[moved] = n_classes
    if is_tensor:
        import torch

        return torch.as_tensor(out, device=labels.device)
    return out


def _label_indices(labels: Sequence, classes: list[str]) -> np.ndarray:
    """Labels as class indices: ints are taken as indices, strings as class names."""
    arr = np.asarray(labels.detach().cpu() if type(labels).__module__.startswith("torch") else labels)
    if arr.ndim != 1:
        raise ConfigError(f"labels must be one label per sample, got shape {arr.shape}")
    if arr.dtype.kind in "iu":
        y = arr.astype(np.int64)
    else:
        index = {c: i for i, c in enumerate(classes)}
        unknown = sorted({str(v) for v in arr if str(v) not in index})
        if unknown:
            raise ConfigError(f"labels {unknown[:5]} are not among the classes {classes[:20]}; give class indices "
                              "or names from `classes`")
        y = np.array([index[str(v)] for v in arr], dtype=np.int64)
    if y.size and (y.min() < 0 or y.max() >= len(classes)):
        raise ConfigError(f"labels must be class indices in 0..{len(classes) - 1}, got {y.min()}..{y.max()}")
    return y


def new_samples_table(sample_ids: Sequence, labels: np.ndarray, sources: Sequence | None = None,
                      true_labels: np.ndarray | None = None) -> pd.DataFrame:
    """The ``samples.parquet`` table of a run recorded outside our training loop (no threshold samples yet)."""
    ids = np.asarray([str(s) for s in sample_ids], dtype=object)
    n = len(ids)
    if n == 0:
        raise ConfigError("no samples: sample_ids is empty")
    if len(labels) != n:
        raise ConfigError(f"{len(labels)} labels for {n} sample ids; give one label per sample")
    _, first, counts = np.unique(ids.astype(str), return_index=True, return_counts=True)
    if (counts > 1).any():
        dup = ids[np.sort(first[counts > 1])][:5].tolist()
        raise ConfigError(f"sample ids must be unique; repeated: {dup}")
    src = ids if sources is None else np.asarray([str(s) for s in sources], dtype=object)
    if len(src) != n:
        raise ConfigError(f"{len(src)} sources for {n} sample ids; give one source (path) per sample")
    true = np.full(n, -1, dtype=np.int64) if true_labels is None else np.asarray(true_labels, dtype=np.int64)
    if len(true) != n:
        raise ConfigError(f"{len(true)} true labels for {n} sample ids")
    return pd.DataFrame({"sample_id": ids.astype(str), "source": src.astype(str), "label": labels,
                         "true_label": true, "threshold_pass": np.full(n, -1, dtype=np.int64),
                         "is_threshold": np.zeros(n, dtype=bool)})


def new_external_run(runs_dir: str | os.PathLike, samples: pd.DataFrame, classes: list[str], epochs: int,
                     name: str, origin: str, images_root: str | os.PathLike | None = None, **options) -> Run:
    """A run directory for dynamics produced outside our training loop (``Recorder``, ``import-logits``).

    The config is an ``AuditConfig`` (so every reader of ``config.json`` finds its keys) with
    ``model`` naming the origin; ``options`` are scoring options of ``AuditConfig`` (``cutoff``,
    ``aum_start``, ``threshold_percentile``, ``seed``, ...).
    """
    cfg = AuditConfig(dataset=name, noise=0.0, model=origin, epochs=int(epochs), threshold_samples=False,
                      threshold_runs=1, **options)
    if cfg.epochs < 1:
        raise ConfigError(f"epochs must be at least 1, got {epochs}")
    if cfg.cutoff not in ("auto", "threshold"):
        raise ConfigError(f"cutoff must be auto or threshold, got {cfg.cutoff!r}")
    if cfg.aum_start is not None and not 0 <= cfg.aum_start < cfg.epochs:
        raise ConfigError(f"aum start {cfg.aum_start} must be in 0..{cfg.epochs - 1} (0-based, below the {cfg.epochs} "
                          "epochs); leave it out for the automatic start (1, or 0 for a 1-epoch run)")
    root = None
    if images_root is not None:
        root = Path(images_root).expanduser().resolve()
        if not root.is_dir():
            raise ConfigError(f"images root {images_root} is not a folder")
    config = cfg.run_dict() | {"dataset_root": str(root) if root else None, "origin": origin}
    return create_run(runs_dir, config, samples, classes)


class Recorder:
    """Captures per-sample training dynamics from a user's own PyTorch loop into a run directory.

    Args:
        runs_dir: the runs folder in which a new run is created, or (for ``pass_index`` > 0) the
            run directory that ``finish()`` of pass 0 returned.
        sample_ids: one id per sample; ``idx`` given to ``update`` are positions in this list.
        labels: the given label of each sample (class indices, or names from ``classes``).
        classes: class names, index = label.
        epochs: epochs the loop will run (``end_epoch`` may be called at most this often).
        sources: file path of each sample relative to ``images_root`` (default: the sample id).
        images_root: folder the pages read images from (``sources`` are relative to it); none: no images.
        pass_index: which threshold pass this loop is (0 for a loop without threshold samples).
        true_labels: the clean labels when known (for example injected noise): precision / recall in the summary.
        name: dataset name shown by the pages.
        **options: scoring options of ``AuditConfig``: ``cutoff`` (auto | threshold), ``aum_start``,
            ``aum_end``, ``threshold_percentile``, ``el2n_epoch``, ``seed``.

    >>> import tempfile, torch
    >>> rec = Recorder(tempfile.mkdtemp(), ["a", "b", "c", "d"], [0, 1, 1, 0], ["cat", "dog"], epochs=2)
    >>> logits = torch.tensor([[2.0, -1.0], [-1.0, 2.0], [1.5, -0.5], [1.0, 0.0]])  # "c" looks like a cat
    >>> for epoch in range(2):
    ...     rec.update(torch.arange(4), logits, torch.tensor([0, 1, 1, 0]))
    ...     rec.end_epoch()
    >>> run_dir = rec.finish()
    >>> from engine import Run
    >>> Run(run_dir).scores()["sample_id"].iloc[0]               # rank 1: the most suspicious
    'c'
    """

    def __init__(self, runs_dir: str | os.PathLike, sample_ids: Sequence, labels: Sequence, classes: Sequence[str],
                 epochs: int, sources: Sequence | None = None, images_root: str | os.PathLike | None = None, *,
                 pass_index: int = 0, true_labels: Sequence | None = None, name: str = "own loop", **options):
        self.classes = [str(c) for c in classes]
        if len(self.classes) < 2:
            raise ConfigError(f"an audit needs at least 2 classes, got {len(self.classes)}")
        if pass_index < 0:
            raise ConfigError(f"pass_index must be 0 or more, got {pass_index}")
        self.labels = _label_indices(labels, self.classes)
        self.pass_index = int(pass_index)
        path = Path(runs_dir)
        if (path / "config.json").is_file():  # a later pass of an existing run
            self.run = Run(path)
            self._check_same_samples(sample_ids, epochs)
        else:
            if pass_index > 0:
                raise ConfigError(f"pass {pass_index} is recorded into the run of pass 0: give the run directory "
                                  "that pass 0's finish() returned as runs_dir")
            samples = new_samples_table(sample_ids, self.labels, sources, true_labels)
            self.run = new_external_run(runs_dir, samples, self.classes, epochs, name, "own loop (Recorder)",
                                        images_root, **options)
        self.n = len(self.labels)
        self.epochs = int(self.run.config()["epochs"])
        st = self.run.raw_status()
        passes = max(int(st.get("passes") or 1), self.pass_index + 1)
        done = list(st.get("epochs_done") or []) + [0] * passes
        done = done[:passes]
        if done[self.pass_index]:
            raise ConfigError(f"pass {self.pass_index} of run {self.run.id} is already recorded; use another pass_index")
        history = [h for h in (st.get("history") or []) if h["pass"] != self.pass_index]
        self.run.update_status(state="running", passes=passes, epochs=self.epochs, epochs_done=done, history=history,
                               pass_idx=self.pass_index, error=None, started_at=time.time(), world_size=1,
                               **owner_fields())
        self.writer = DynamicsWriter(self.run, self.pass_index, self.epochs, self.n)
        self.epoch = 0
        self._targets_seen: np.ndarray | None = None  # each sample's target in this pass (checked every epoch)
        self._buf = None
        # the chunk: logits, idx and targets of the batches not captured yet, copied into buffers owned by the
        # Recorder (allocated once; a new width reallocates them), rows 0.._fill filled
        self._z: torch.Tensor | None = None
        self._idx: torch.Tensor | None = None
        self._y: torch.Tensor | None = None
        self._zn = self._idxn = self._yn = None  # their numpy views on the CPU
        self._fill = 0
        self._pool = None  # one background thread writing finished epochs
        self._pending = None
        self._unsynced: list[dict] = []  # status history of epochs written but not yet synced
        self._synced_at = time.perf_counter()
        self._t0 = time.perf_counter()

    def _check_same_samples(self, sample_ids: Sequence, epochs: int) -> None:
        samples = self.run.samples(["sample_id", "label"])
        ids = np.asarray([str(s) for s in sample_ids])
        if len(ids) != len(samples) or not (ids == samples["sample_id"].to_numpy()).all():
            raise ConfigError(f"run {self.run.id} holds other samples: a later pass must give the same sample_ids "
                              "in the same order")
        if not (self.labels == samples["label"].to_numpy()).all():
            raise ConfigError(f"run {self.run.id} holds other labels: a later pass must give the same labels")
        if int(epochs) != int(self.run.config()["epochs"]):
            raise ConfigError(f"run {self.run.id} records {self.run.config()['epochs']} epochs per pass, not {epochs}")

    def _buffers(self, device: torch.device) -> None:
        import torch

        # one (values + target, n) buffer: the integer values (classes) are exact in float32 below 2^24,
        # so a batch costs one stack and one scatter, and an epoch one copy to the host
        self._buf = torch.empty((len(CAPTURED) + 1, self.n), dtype=torch.float32, device=device)
        # what end_epoch hands to the writer thread, allocated once and reused (a fresh block per epoch is memory the
        # allocator may give back to the OS and the next epoch fault in again): on the CPU the buffer itself, swapped
        # with a spare one; on another device a host copy, one of two (epoch e's is free again once epoch e + 1 ends,
        # after the writer of epoch e has finished)
        self._spare: torch.Tensor | None = None
        self._hosts: list = [None, None]
        self._th = [np.empty(self.n, dtype=np.int64) for _ in range(2)]  # each epoch's targets, likewise
        self._reset()

    def _reset(self) -> None:
        self._buf[: len(FLOAT_NAMES)] = float("nan")
        self._buf[len(FLOAT_NAMES) :] = -1

    def update(self, idx: Any, logits: torch.Tensor, targets: Any) -> None:
        """Capture one batch: ``idx`` are the samples' positions in ``sample_ids``, ``logits`` ``(B, C)`` the
        training forward pass's outputs, ``targets`` ``(B,)`` the class indices the loss used.

        ``C`` is the number of classes, or one more when the loop trains with threshold samples
        (``threshold_targets``). Works on any device; nothing is copied to the host. The batch is copied
        (a device-side copy) into a chunk buffer the Recorder owns, of up to ``CHUNK_VALUES`` logits, which is
        captured in one ``batch_capture`` call when full and at ``end_epoch``: the Recorder keeps no reference
        to the loop's tensors, which may be modified or freed as soon as ``update`` returns.
        """
        zn = self._zn
        if zn is not None and logits.ndim == 2 and logits.shape[1] == zn.shape[1]:
            # the CPU's way (every batch but the first): numpy copies into the chunk, half the cost of torch's per call
            # (what counts for a batch: an update costs about as much as keeping references to the batch's tensors
            # did); what numpy does not take (bfloat16, another device, other shapes) or a batch that fills the chunk
            # goes the general way below
            f = self._fill
            b = logits.shape[0]
            e = f + b
            try:
                if e < zn.shape[0] and len(idx) == b and len(targets) == b:
                    zn[f:e] = logits.detach().numpy()
                    self._idxn[f:e] = idx.numpy() if hasattr(idx, "numpy") else idx
                    self._yn[f:e] = targets.numpy() if hasattr(targets, "numpy") else targets
                    self._fill = e
                    return
            except (TypeError, RuntimeError, ValueError):
                pass
        import torch

        if logits.ndim != 2 or logits.shape[1] not in (len(self.classes), len(self.classes) + 1):
            raise ConfigError(f"logits must be (batch, {len(self.classes)}) or (batch, {len(self.classes) + 1}) with "
                              f"threshold samples, got {tuple(logits.shape)}")
        b, width = logits.shape
        idx = torch.as_tensor(idx).view(-1)
        y = torch.as_tensor(targets).view(-1)
        if idx.shape[0] != b or y.shape[0] != b:
            raise ConfigError(f"update got {idx.shape[0]} indices and {y.shape[0]} targets for {b} logits")
        if self._buf is None:
            self._buffers(logits.device)
        if self._z is None or self._z.shape[1] != width:
            self._capture_chunk()
            self._chunk_buffers(width)
        z = logits.detach()
        rows, f = self._z.shape[0], self._fill
        if b <= rows - f:  # the whole batch fits
            e = f + b
            self._z[f:e].copy_(z)
            self._idx[f:e].copy_(idx, non_blocking=self._staged(idx))
            self._y[f:e].copy_(y, non_blocking=self._staged(y))
            self._fill = e
            if e == rows:
                self._capture_chunk()
            return
        lo = 0
        while lo < b:  # the batch fills the chunk: fill it, capture it, go on with the rest of the batch
            f = self._fill
            k = min(b - lo, rows - f)
            self._z[f : f + k].copy_(z[lo : lo + k])
            self._idx[f : f + k].copy_(idx[lo : lo + k], non_blocking=self._staged(idx))
            self._y[f : f + k].copy_(y[lo : lo + k], non_blocking=self._staged(y))
            self._fill = f + k
            lo += k
            if self._fill == rows:
                self._capture_chunk()

    def _staged(self, src: torch.Tensor) -> bool:
        """Whether a copy of ``src`` into the chunk may be ``non_blocking``: from the host's pageable memory to a GPU
        the driver stages the data before ``copy_`` returns, without waiting for the device (a blocking copy waits for
        it); pinned memory could still change before the device reads it."""
        return not self._z.is_cpu and src.is_cpu and not src.is_pinned()

    def _chunk_buffers(self, width: int) -> None:
        """The chunk buffers on the Recorder's device: ``min(n, CHUNK_VALUES // width)`` rows of float32 logits
        (``batch_capture`` computes in float32: the copy of float16, bfloat16 or float64 logits rounds them as its
        own ``.float()`` does, so the values are the same), sample positions and targets."""
        import torch

        rows = max(1, min(self.n, CHUNK_VALUES // width))
        device = self._buf.device
        self._z = torch.empty((rows, width), dtype=torch.float32, device=device)
        self._idx = torch.empty(rows, dtype=torch.int64, device=device)
        self._y = torch.empty(rows, dtype=torch.int64, device=device)
        cpu = device.type == "cpu"
        self._zn, self._idxn, self._yn = (t.numpy() if cpu else None for t in (self._z, self._idx, self._y))
        self._fill = 0

    def _capture_chunk(self) -> None:
        """``batch_capture`` on the chunk's filled rows, as one block (its cost per call is mostly fixed for small
        class counts: one call per chunk instead of per batch), scattered into the per-sample buffer."""
        import torch

        f = self._fill
        if not f:
            return
        self._fill = 0
        idx, y = self._idx[:f], self._y[:f]
        # the chunk is the Recorder's own copy, refilled from row 0 after this: batch_capture may work in it
        c = vars(batch_capture(self._z[:f], y, len(self.classes), overwrite=True))
        if self._buf.is_cpu:  # numpy's stack and scatter: half of torch's time at a few thousand samples
            self._buf.numpy()[:, idx.numpy()] = np.stack([c[k].numpy() for k in CAPTURED] + [y.numpy()],
                                                         dtype=np.float32)
        else:
            self._buf[:, idx] = torch.stack([c[k].float() for k in CAPTURED] + [y.float()])

    def end_epoch(self) -> None:
        """Close the epoch: one copy of its values from the device (none on the CPU), then its row of every dynamics
        array and the status are written by a background thread while the loop goes on (one epoch at a time: the next
        ``end_epoch`` waits for it). Rows are synced and counted in ``status.json`` every ``SYNC_SECONDS`` (and
        at the last epoch, ``sync()`` and ``finish()``); a row is on disk before the status counts it."""
        if self.epoch >= self.epochs:
            raise ConfigError(f"end_epoch called more than the {self.epochs} epochs given to the Recorder")
        if self._buf is None:
            raise ConfigError("end_epoch before any update: call rec.update(idx, logits, y) for the epoch's batches")
        import torch

        self._capture_chunk()
        k = self.epoch % 2
        if self._buf.is_cpu:
            host = self._buf
        else:
            if self._hosts[k] is None:
                self._hosts[k] = torch.empty(self._buf.shape, dtype=self._buf.dtype)
            host = self._hosts[k].copy_(self._buf)  # the epoch's one copy from the device
        buf = host.numpy()
        th = self._th[k]
        np.copyto(th, buf[-1], casting="unsafe")
        self._check_targets(th)
        self._wait()  # the writer of the epoch before has finished: its buffers are free again
        self._pending = self._writer_thread().submit(self._write_epoch, self.epoch, buf, th,
                                                     time.perf_counter() - self._t0, self.epoch + 1 == self.epochs)
        self.epoch += 1
        self._t0 = time.perf_counter()
        if self._buf.is_cpu:  # the writer has this epoch's buffer: the next epoch fills the spare one
            spare = self._spare if self._spare is not None else torch.empty_like(self._buf)
            self._buf, self._spare = spare, self._buf
        self._reset()

    def _writer_thread(self):
        from concurrent.futures import ThreadPoolExecutor

        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="recorder")
        return self._pool

    def sync(self) -> None:
        """Wait until every finished epoch is on disk and counted in ``status.json`` (re-raises an error of the
        background write)."""
        self._wait()
        if self._unsynced:
            self._make_durable()

    def _wait(self) -> None:
        """Wait for the background write of the last finished epoch."""
        if self._pending is not None:
            pending, self._pending = self._pending, None
            pending.result()

    def _write_epoch(self, epoch: int, buf: np.ndarray, th: np.ndarray, seconds: float, last: bool) -> None:
        host = dict(zip(CAPTURED, buf[:-1], strict=True))
        self.writer.write_epoch(epoch, {k: v.astype(DYNAMICS[k], copy=False) for k, v in host.items()}, sync=False)
        seen = th >= 0
        real = seen & (th < len(self.classes))
        self._unsynced.append({"pass": self.pass_index, "epoch": epoch,
                               "loss": float(host["loss"][seen].mean()) if seen.any() else float("nan"),
                               "accuracy": float((host["pred"][real] == th[real]).mean()) if real.any()
                               else float("nan"),
                               "seconds": seconds})
        if last or time.perf_counter() - self._synced_at >= SYNC_SECONDS:
            self._make_durable()

    def _make_durable(self) -> None:
        """Sync the rows written so far, then count their epochs in ``status.json`` (a row is on disk before the
        status counts it, as in our loop)."""
        self.writer.sync()
        st = self.run.raw_status()
        done = list(st["epochs_done"])
        done[self.pass_index] = self._unsynced[-1]["epoch"] + 1
        history = list(st.get("history") or []) + self._unsynced
        self.run.update_status(epochs_done=done, history=history, pass_idx=self.pass_index)
        self._unsynced = []
        self._synced_at = time.perf_counter()

    def _check_targets(self, targets: np.ndarray) -> None:
        """Targets must be the given label or the fake class, and stay the same across the pass's epochs."""
        if self._targets_seen is not None and np.array_equal(targets, self._targets_seen):
            return  # the same targets as the epochs checked before (the usual case): nothing new to check
        seen = targets >= 0
        fake = len(self.classes)
        bad = seen & (targets != self.labels) & (targets != fake)
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise ConfigError(f"sample {i} was trained on target {targets[i]} but its label is {self.labels[i]}: "
                              f"targets must be the given labels, or class {fake} for threshold samples "
                              "(threshold_targets)")
        if self._targets_seen is None:
            self._targets_seen = np.full(self.n, -1, dtype=np.int64)
        prev = self._targets_seen
        changed = seen & (prev >= 0) & (prev != targets)
        if changed.any():
            raise ConfigError(f"{int(changed.sum())} samples changed target between epochs: a pass keeps its "
                              "threshold samples for all its epochs")
        prev[seen] = targets[seen]

    def finish(self) -> Path:
        """Score the run from every pass recorded so far; returns the run directory (state ``done``)."""
        from engine.training.audit import finalize

        if self.epoch == 0:
            raise ConfigError("finish before any end_epoch: no epoch was recorded")
        self.sync()
        if self._pool is not None:
            self._pool.shutdown()
            self._pool = None
        fake = len(self.classes)
        samples = self.run.samples()
        tp = samples["threshold_pass"].to_numpy().copy()
        mine = self._targets_seen == fake if self._targets_seen is not None else np.zeros(self.n, dtype=bool)
        tp[tp == self.pass_index] = -1
        if (mine & (tp >= 0)).any():
            raise ConfigError("threshold samples of this pass were threshold samples of another pass: use "
                              "threshold_targets with the same seed and a different pass_index")
        tp[mine] = self.pass_index
        if not (tp == samples["threshold_pass"].to_numpy()).all():
            samples["threshold_pass"] = tp
            samples["is_threshold"] = tp >= 0
            atomic_write_parquet(self.run.path / "samples.parquet", samples)
        config = self.run.config()
        st = self.run.raw_status()
        passes = int(st.get("passes") or 1)
        config.update(threshold_samples=bool((tp >= 0).any()), threshold_runs=passes)
        atomic_write_json(self.run.path / "config.json", config)
        try:
            finalize(self.run)
        except Exception as exc:
            self.run.update_status(state="failed", finished_at=time.time(), error=f"{type(exc).__name__}: {exc}")
            raise
        self.run.update_status(state="done", finished_at=time.time())
        return self.run.path
