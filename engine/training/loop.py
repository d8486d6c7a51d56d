"""The training loop, capturing per-sample dynamics from its own forward pass.

Every batch's logits go through ``dynamics.batch_capture`` (a few batches per call) and are scattered
into device-resident buffers of length N; at the end of an epoch the buffers are copied to the host
once and written as one row of the run's ``(epochs, samples)`` arrays.
"""

from __future__ import annotations

import io
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from engine.capture.dynamics import CHUNK_VALUES, batch_capture
from engine.data.pipeline import DeviceImages, StreamImages, normalize
from engine.store.runs import DYNAMICS, DynamicsWriter, atomic_write_bytes
from engine.training.config import AuditConfig
from engine.training.correction import ForwardCorrection
from engine.training.models import model_for

ImageSource = DeviceImages | StreamImages


class Cancelled(Exception):
    """Training was cancelled by the user; finished epochs are kept."""


@dataclass
class EpochResult:
    pass_idx: int
    epoch: int
    loss: float
    accuracy: float
    seconds: float


def batch_slices(n: int, batch_size: int) -> list[slice]:
    """Near-equal consecutive batches of about ``batch_size`` (never a lone sample, which BatchNorm rejects)."""
    k = max(1, int(round(n / batch_size)))
    bounds = np.linspace(0, n, k + 1).round().astype(int)
    return [slice(a, b) for a, b in zip(bounds[:-1], bounds[1:], strict=True) if b > a]


def random_shift(x: torch.Tensor, max_shift: int, gen: torch.Generator) -> torch.Tensor:
    """Translate each image by its own random offset in [-max_shift, max_shift]^2, zero-padded."""
    if max_shift <= 0:
        return x
    b, c, h, w = x.shape
    k = max_shift
    xp = F.pad(x, (k, k, k, k))
    off = torch.randint(0, 2 * k + 1, (2, b), generator=gen).to(x.device)
    rows = (off[0][:, None] + torch.arange(h, device=x.device))[:, None, :, None]
    cols = (off[1][:, None] + torch.arange(w, device=x.device))[:, None, None, :]
    bi = torch.arange(b, device=x.device)[:, None, None, None]
    ci = torch.arange(c, device=x.device)[None, :, None, None]
    return xp[bi, ci, rows, cols]


def epoch_generator(seed: int, pass_idx: int, epoch: int) -> torch.Generator:
    """Shuffling of one epoch depends only on (seed, pass, epoch), so a resumed run reshuffles identically."""
    return torch.Generator().manual_seed(seed * 1_000_003 + pass_idx * 10_007 + epoch)


def save_checkpoint(path: Path, model: torch.nn.Module, opt: torch.optim.Optimizer, epoch: int,
                    sat_targets: torch.Tensor | None = None, extra: dict | None = None) -> None:
    buf = io.BytesIO()
    state = {"model": model.state_dict(), "optimizer": opt.state_dict(), "epoch": epoch} | (extra or {})
    if sat_targets is not None:
        state["sat_targets"] = sat_targets.cpu()
    torch.save(state, buf)
    atomic_write_bytes(path, buf.getvalue())


def load_final_model(checkpoint_dir: Path, cfg: AuditConfig, in_channels: int, n_outputs: int,
                     device: torch.device) -> torch.nn.Module:
    """The last pass's model after its last finished epoch, in eval mode (checkpoint loaded with weights_only)."""
    model = model_for(cfg, in_channels, n_outputs, pretrained=False).to(device)  # the checkpoint holds the weights
    state = torch.load(Path(checkpoint_dir) / f"pass{cfg.passes - 1}.pt", map_location=device, weights_only=True)
    model.load_state_dict(state["model"])
    return model.eval()


def cosine_lr(lr: float, epoch: int, epochs: int) -> float:
    """Learning rate of ``epoch`` (0-based) of ``epochs`` under cosine annealing without restarts (Loshchilov &
    Hutter 2017, SGDR): ``lr (1 + cos(pi epoch / epochs)) / 2``; ``lr`` at epoch 0, near 0 at the last epoch.

    >>> cosine_lr(0.1, 0, 10), cosine_lr(0.1, 5, 10), round(cosine_lr(0.1, 9, 10), 5)
    (0.1, 0.05, 0.00245)
    """
    return lr * (1.0 + math.cos(math.pi * epoch / epochs)) / 2.0


def train_pass(
    cfg: AuditConfig,
    source: ImageSource,
    targets: torch.Tensor,
    n_outputs: int,
    n_real: int,
    pass_idx: int,
    writer: DynamicsWriter | None,
    checkpoint: Path | None = None,
    start_epoch: int = 0,
    on_epoch: Callable[[EpochResult], None] | None = None,
    cancel: threading.Event | None = None,
    capture: bool = True,
    sat_out: dict | None = None,
    prior: np.ndarray | None = None,
    anneal: bool = False,
) -> torch.nn.Module:
    """Train one model for ``cfg.epochs`` epochs from ``start_epoch``, capturing dynamics into ``writer``.

    The learning rate is ``cfg.lr`` throughout, as the audit needs it (AUM is read before any learning-rate drop,
    Pleiss et al. 2020); ``anneal=True`` decays it per epoch (``cosine_lr``), for a model trained to be evaluated
    (``engine retrain``, k-fold scores): at a constant 0.05 the last epoch's model of a noisy-label training
    scored 0.22-0.76 test accuracy over three seeds on digits with 20% symmetric noise, 0.90-0.93 annealed
    (bench/RESULTS.md, "Does cleaning help?").

    ``source`` (``engine.data.pipeline``) yields the uint8 NCHW batches on the training device, where
    ``targets`` live too. Raises ``Cancelled`` at the first batch after ``cancel`` is set; the epoch
    in progress is then discarded.

    Self-adaptive training (``cfg.sat``) after ``cfg.sat_warmup`` epochs of cross-entropy:
    ``paper`` (Huang et al. 2020): per-sample targets ``t <- m t + (1 - m) softmax(z)``, loss
    ``sum_i w_i CE(t_i, z_i) / sum_i w_i`` with ``w_i = max_k t_ik``; the final targets go to
    ``sat_out["targets"]``. ``incerto`` (incerto's SelfAdaptiveTraining): targets
    ``(1 - a) onehot + a softmax(z)`` of the batch with incerto's schedule ``a = sat_alpha(cfg, epoch)``
    (``sat_alpha_start`` during warm-up, then linear towards ``sat_alpha_end``), no per-sample memory.

    Forward correction (``cfg.correction_epoch``, on by default, off under self-adaptive training):
    from that epoch the loss is ``-log (softmax(z) @ T)[y]``, ``T`` estimated from the pass's own
    captured predictions just before (``engine.training.correction``; none without capture), or ``prior``, an
    earlier pass's ``T`` (``engine.training.audit.earlier_pass_transition``).
    """
    from engine.training.distributed import world

    rank, size = world()
    if cfg.sat == "paper" and size > 1:
        raise ValueError("self-adaptive training (paper form) keeps per-sample targets: run it in one process")
    run = _Pass(cfg, source, targets, n_outputs, n_real, pass_idx, rank, size, prior)
    if start_epoch > 0 and checkpoint is not None:
        run.sat_targets = _restore(checkpoint, start_epoch, run.model, run.opt, run.sat_targets, source.device,
                                   run.correction)
    for epoch in range(start_epoch, cfg.epochs):
        t0 = time.perf_counter()
        if anneal:
            for group in run.opt.param_groups:
                group["lr"] = cosine_lr(cfg.lr, epoch, cfg.epochs)
        run.train_epoch(epoch, capture, cancel)
        if capture:  # a pass without capture (k-fold scores) keeps no per-epoch record
            run.finish_epoch(epoch, writer, checkpoint, on_epoch, t0)
    if sat_out is not None and run.sat_targets is not None:
        sat_out["targets"] = run.sat_targets.cpu().numpy()
    return run.model


class _Pass:
    """The state of one training pass and its two steps per epoch: ``train_epoch`` (SGD over a seeded order,
    logits kept for capture) and ``finish_epoch`` (capture gathered, dynamics written, checkpoint, progress)."""

    def __init__(self, cfg: AuditConfig, source: ImageSource, targets: torch.Tensor, n_outputs: int, n_real: int,
                 pass_idx: int, rank: int, size: int, prior: np.ndarray | None = None):
        self.cfg, self.source, self.targets, self.n_outputs = cfg, source, targets, n_outputs
        self.pass_idx, self.rank, self.size = pass_idx, rank, size
        self.model, self.net, self.opt = _new_model(cfg, source, n_outputs, pass_idx, size)
        self.sat_targets = F.one_hot(targets, n_outputs).float() if cfg.sat == "paper" else None
        self.correction = ForwardCorrection(cfg, n_outputs, n_real, source.device, prior)
        self.buffers = _CaptureBuffers(source.n, source.device, n_real, distributed=size > 1)
        self.targets_host = targets.cpu().numpy()
        self.real_host = (targets < n_real).cpu().numpy()
        self.max_shift = max(1, source.side // 8) if cfg.augment else 0

    def epoch_order(self, epoch: int) -> tuple[torch.Generator, torch.Tensor, torch.Tensor | None]:
        """This epoch's sample order, seeded by (seed, pass, epoch) so a resumed run repeats it; under DDP this
        rank's share and which of its rows are captured (DistributedSampler pads with repeats)."""
        from engine.training.distributed import shard

        gen = epoch_generator(self.cfg.seed, self.pass_idx, epoch)
        perm = torch.randperm(self.source.n, generator=gen)
        keep = None
        if self.size > 1:
            mine, kept = shard(perm.numpy(), self.rank, self.size)
            perm, keep = torch.from_numpy(mine), torch.from_numpy(kept).to(self.source.device)
            self.buffers.zero()
        return gen, perm, keep

    def train_epoch(self, epoch: int, capture: bool, cancel: threading.Event | None) -> None:
        """One epoch of SGD; raises ``Cancelled`` at the first batch after ``cancel`` is set."""
        cfg, source, device = self.cfg, self.source, self.source.device
        use_cuda = device.type == "cuda"
        self.model.train()
        gen, perm, keep = self.epoch_order(epoch)
        slices = batch_slices(len(perm), cfg.batch_size)
        batches = source.batches(perm.numpy(), slices)
        perm = perm.to(device)
        for sl, xb in zip(slices, batches, strict=True):
            if cancel is not None and cancel.is_set():
                raise Cancelled()
            idx = perm[sl]
            x = random_shift(normalize(xb, source.mean, source.std), self.max_shift, gen)
            if use_cuda:
                x = x.contiguous(memory_format=torch.channels_last)
            y = self.targets[idx]
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_cuda):
                logits = self.net(x)
            loss = self.correction.loss(logits.float(), y)
            if loss is None:
                loss = _loss(cfg, logits.float(), y, idx, epoch, self.sat_targets, self.n_outputs)
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            self.opt.step()
            if capture:  # padded repeats of DistributedSampler are trained, not captured
                self.buffers.add(idx, logits, y, None if keep is None else keep[sl])

    def finish_epoch(self, epoch: int, writer: DynamicsWriter | None, checkpoint: Path | None,
                     on_epoch: Callable[[EpochResult], None] | None, t0: float) -> None:
        """Gather the epoch's captured values, update the forward correction, write the dynamics row, save the
        checkpoint (rank 0) and report progress (the epoch's seconds count from ``t0``, writing included)."""
        host = self.buffers.gather()
        self.correction.end_epoch(epoch, host["pred"], self.targets_host)
        if writer is not None:
            writer.write_epoch(epoch, {k: v.astype(DYNAMICS[k], copy=False) for k, v in host.items()})
        if checkpoint is not None and self.rank == 0:
            save_checkpoint(checkpoint, self.model, self.opt, epoch, self.sat_targets, extra=self.correction.state())
        if on_epoch is None:
            return
        r = self.real_host
        accuracy = float((host["pred"][r] == self.targets_host[r]).mean()) if r.any() else float("nan")
        on_epoch(EpochResult(pass_idx=self.pass_idx, epoch=epoch, loss=float(host["loss"].mean()), accuracy=accuracy,
                             seconds=time.perf_counter() - t0))


def _new_model(cfg: AuditConfig, source: ImageSource, n_outputs: int, pass_idx: int, world_size: int):
    """The pass's freshly initialised model (seeded by seed and pass), the module that trains it (wrapped in
    DistributedDataParallel under torchrun) and its SGD optimiser."""
    device = source.device
    torch.manual_seed(cfg.seed * 7919 + pass_idx)
    model = model_for(cfg, source.channels, n_outputs).to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    net = model
    if world_size > 1:  # torchrun: gradients averaged across ranks; `model` stays the unwrapped module
        from torch.nn.parallel import DistributedDataParallel

        net = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    return model, net, opt


def _restore(checkpoint: Path, start_epoch: int, model: torch.nn.Module, opt: torch.optim.Optimizer,
             sat_targets: torch.Tensor | None, device: torch.device,
             correction: ForwardCorrection | None = None) -> torch.Tensor | None:
    """Model, optimiser, self-adaptive targets and forward-correction state after epoch ``start_epoch - 1``
    (weights_only load, to the CPU: ``load_state_dict`` copies to the model's device; the correction's per-sample
    state is read as numpy, which a tensor on a GPU cannot be, and the first resume on a GPU failed on it)."""
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    if int(state["epoch"]) != start_epoch - 1:
        raise RuntimeError(f"checkpoint {checkpoint} holds epoch {state['epoch']}, not {start_epoch - 1}: cannot resume")
    model.load_state_dict(state["model"])
    opt.load_state_dict(state["optimizer"])
    if correction is not None:
        correction.load_state(state)
    return state["sat_targets"].to(device) if sat_targets is not None else None


class _CaptureBuffers:
    """Device buffers of length N for one epoch's captured values, copied to the host once per epoch.

    A batch's logits are kept (not copied) and captured with the next ones in one ``batch_capture`` call of up
    to ``CHUNK_VALUES`` logits (its cost per call is mostly fixed for few classes; the values of a sample do not
    depend on which others share its call), at the latest when the epoch's values are gathered.
    Under torchrun every rank holds its own samples' values and zeros elsewhere; ``gather`` sums them
    across ranks and checks that every sample was captured exactly once.
    """

    def __init__(self, n: int, device: torch.device, n_real: int, distributed: bool):
        self.float_names = [k for k, dt in DYNAMICS.items() if np.issubdtype(dt, np.floating)]
        self.int_names = [k for k in DYNAMICS if k not in self.float_names]
        self.n_real = n_real
        self.fbuf = torch.zeros((len(self.float_names), n), dtype=torch.float32, device=device)
        self.ibuf = torch.zeros((len(self.int_names), n), dtype=torch.int64, device=device)
        self.count = torch.zeros(n, dtype=torch.int32, device=device) if distributed else None
        self.pending: list[tuple] = []  # (idx, logits, targets, keep) of batches not captured yet
        self.pending_values = 0

    def zero(self) -> None:
        self.pending, self.pending_values = [], 0
        for t in (self.fbuf, self.ibuf, self.count):
            if t is not None:
                t.zero_()

    def add(self, idx: torch.Tensor, logits: torch.Tensor, y: torch.Tensor, keep: torch.Tensor | None) -> None:
        self.pending.append((idx, logits.detach(), y, keep))
        self.pending_values += logits.numel()
        if self.pending_values >= CHUNK_VALUES:
            self.capture()

    def capture(self) -> None:
        """``batch_capture`` of the kept batches in one call, scattered into the buffers."""
        if not self.pending:
            return
        idx, logits, y, keep = zip(*self.pending, strict=True)
        self.pending, self.pending_values = [], 0
        owned = len(logits) > 1  # torch.cat's result is ours: the capture may work in it (not in a model's output)
        idx, logits, y = (torch.cat(p) if len(p) > 1 else p[0] for p in (idx, logits, y))
        keep = None if keep[0] is None else torch.cat(keep)
        c = vars(batch_capture(logits, y, self.n_real, overwrite=owned))
        fvals = torch.stack([c[k] for k in self.float_names])
        ivals = torch.stack([c[k] for k in self.int_names])
        if keep is not None:
            idx, fvals, ivals = idx[keep], fvals[:, keep], ivals[:, keep]
            self.count[idx] += 1
        self.fbuf[:, idx] = fvals
        self.ibuf[:, idx] = ivals

    def gather(self) -> dict[str, np.ndarray]:
        self.capture()
        if self.count is not None:  # one sum gathers every rank's samples
            import torch.distributed as dist

            for t in (self.fbuf, self.ibuf, self.count):
                dist.all_reduce(t)
            if not bool((self.count == 1).all()):
                raise RuntimeError(f"distributed capture: {int((self.count != 1).sum())} samples not captured exactly once")
        fh, ih = self.fbuf.cpu().numpy(), self.ibuf.cpu().numpy()  # one transfer per epoch
        return dict(zip(self.float_names, fh, strict=True)) | dict(zip(self.int_names, ih, strict=True))


def sat_alpha(cfg: AuditConfig, epoch: int) -> float:
    """incerto's ``SelfAdaptiveTraining.get_alpha`` schedule: ``alpha_start`` during the ``w`` warm-up epochs,
    then ``alpha = start + (end - start) (e - w) / (T - w)`` (never above ``alpha_end``), with ``T`` the epochs."""
    w = cfg.sat_warmup
    if epoch < w:
        return cfg.sat_alpha_start
    alpha = cfg.sat_alpha_start + (cfg.sat_alpha_end - cfg.sat_alpha_start) * (epoch - w) / max(cfg.epochs - w, 1)
    return min(alpha, cfg.sat_alpha_end)


def _loss(cfg: AuditConfig, logits: torch.Tensor, y: torch.Tensor, idx: torch.Tensor, epoch: int,
          sat_targets: torch.Tensor | None, n_outputs: int) -> torch.Tensor:
    """Cross-entropy, or a self-adaptive training loss (see ``train_pass``): the paper form after warm-up,
    incerto's form at every epoch with ``sat_alpha`` (plain cross-entropy while alpha is 0)."""
    if cfg.sat is None or (cfg.sat == "paper" and epoch < cfg.sat_warmup):
        return F.cross_entropy(logits, y)
    if cfg.sat == "incerto" and sat_alpha(cfg, epoch) == 0.0:
        return F.cross_entropy(logits, y)
    probs = torch.softmax(logits.detach(), dim=1)
    logp = torch.log_softmax(logits, dim=1)
    if cfg.sat == "paper":
        t = cfg.sat_momentum * sat_targets[idx] + (1 - cfg.sat_momentum) * probs
        sat_targets[idx] = t
        w = t.max(dim=1).values
        return (w * -(t * logp).sum(dim=1)).sum() / w.sum()
    a = sat_alpha(cfg, epoch)
    t = (1 - a) * F.one_hot(y, n_outputs).float() + a * probs
    return -(t * logp).sum(dim=1).mean()
