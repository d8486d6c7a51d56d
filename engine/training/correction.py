"""Forward loss correction for class-dependent label noise (Patrini et al. 2017), estimated during training.

Under class-dependent noise (annotators who confuse 3 with 8) a network trained on the given labels
learns the *noisy* posterior: a clean 3 keeps some probability of "8", a 2 labelled 7 reaches a
positive margin, and the AUM of clean and mislabeled samples of different classes overlap. Forward
correction trains on ``q = softmax(z) @ T`` instead, with ``T[j, i] = P(given i | true j)``, so that
``softmax(z)`` estimates the *clean* posterior and the captured margins (from ``z``) separate the
flipped samples again (bench/RESULTS.md, detection section).

``T`` comes from the run itself: during the ``ESTIMATE_EPOCHS`` epochs before ``cfg.correction_epoch``
the pass counts, per given label, the class the network predicts (plain cross-entropy, before it
memorises); at the end of the epoch before the correction starts, ``engine.scores.noise.
transition_matrix`` turns the counts into ``T``. Threshold samples (the fake class, targets ``>=
n_real``) are neither counted nor corrected: ``T`` is the identity on the fake class, so the threshold
samples' margins keep the meaning Pleiss et al. give them.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from engine.scores.noise import transition_matrix
from engine.training.config import AuditConfig

ESTIMATE_EPOCHS = 4  # epochs whose predictions estimate T (the last ones before the correction starts, not epoch 0)


class ForwardCorrection:
    """The per-pass state of the correction: prediction counts, then the matrix ``T`` (``n_outputs`` square)."""

    def __init__(self, cfg: AuditConfig, n_outputs: int, n_real: int, device: torch.device):
        self.start = cfg.correction_epoch
        self.n_outputs, self.n_real = n_outputs, n_real
        first = max(1, (self.start or 0) - ESTIMATE_EPOCHS)
        self.estimate_epochs = range(first, self.start) if self.start is not None else range(0)
        self.counts = torch.zeros((n_real, n_real), dtype=torch.float64, device=device)
        self.matrix: torch.Tensor | None = None

    @property
    def active(self) -> bool:
        return self.start is not None

    def observe(self, epoch: int, logits: torch.Tensor, y: torch.Tensor) -> None:
        """Count (given label, predicted real class) of the batch's real-labelled samples in an estimation epoch."""
        if epoch not in self.estimate_epochs:
            return
        with torch.no_grad():
            real = y < self.n_real
            pred = logits.detach()[real, : self.n_real].argmax(dim=1)
            flat = y[real] * self.n_real + pred
            self.counts += torch.bincount(flat, minlength=self.n_real**2).view(self.n_real, self.n_real).double()

    def end_epoch(self, epoch: int, distributed: bool) -> None:
        """After the last estimation epoch: ``T`` from the counts (summed over ranks under torchrun)."""
        if self.start is None or epoch != self.start - 1:
            return
        if distributed:
            import torch.distributed as dist

            dist.all_reduce(self.counts)
        t = np.eye(self.n_outputs)
        t[: self.n_real, : self.n_real] = transition_matrix(self.counts.cpu().numpy())
        self.matrix = torch.as_tensor(t, dtype=torch.float32, device=self.counts.device)

    def loss(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor | None:
        """``-log (softmax(z) @ T)[y]`` averaged over the batch, or None before ``T`` exists."""
        if self.matrix is None:
            return None
        q = torch.softmax(logits, dim=1) @ self.matrix
        return F.nll_loss(torch.log(q.clamp_min(1e-12)), y)

    def state(self) -> dict:
        """What a checkpoint keeps (counts and ``T``), so that a resumed pass trains on the same loss."""
        out = {"correction_counts": self.counts.cpu()}
        if self.matrix is not None:
            out["correction_matrix"] = self.matrix.cpu()
        return out

    def load_state(self, state: dict) -> None:
        if "correction_counts" in state:
            self.counts = state["correction_counts"].to(self.counts.device, torch.float64)
        if "correction_matrix" in state:
            self.matrix = state["correction_matrix"].to(self.counts.device)
