"""Forward loss correction for class-dependent label noise (Patrini et al. 2017), estimated during training.

Under class-dependent noise (annotators who confuse 3 with 8) a network trained on the given labels
learns the *noisy* posterior: a clean 3 keeps some probability of "8", a 2 labelled 7 reaches a
positive margin, and the AUM of clean and mislabeled samples of different classes overlap. Forward
correction trains on ``q = softmax(z) @ T`` instead, with ``T[j, i] = P(given i | true j)``, so that
``softmax(z)`` estimates the *clean* posterior and the captured margins (from ``z``) separate the
flipped samples again (bench/RESULTS.md, detection section).

``T`` comes from the pass itself: in the ``ESTIMATE_EPOCHS`` epochs before ``cfg.correction_epoch``
(plain cross-entropy, before the network memorises) a sample counts as truly of class ``j`` when the
network predicted ``j`` in every one of those epochs, else as truly of its given label; at the end
of the epoch before the correction starts, ``engine.scores.noise.transition_matrix`` turns the
(given, estimated true) counts into ``T``. Requiring the same prediction in every estimation epoch
keeps a network that has not fitted the data yet (small data, large images: its predictions still
change from epoch to epoch) from inventing noise: its ``T`` stays close to the identity.
When fewer than ``MIN_STABLE`` (half) of the real-labelled samples kept one prediction through the
estimation epochs, the network has not fitted the data yet and no count is worth trusting: the pass
then keeps plain cross-entropy (``matrix`` stays None, as with ``--no-forward-correction``). The
fraction measured (bench/RESULTS.md, second screening round): 0.65-0.90 per pass on digits over
every noise setting and seed, 0.80-0.84 on each half of digits, and on the 300-image
``sample_data/digits_folder`` 0.54-0.62 at 8 px, 0.43 at 16 px and 0.24-0.29 at 32 px, where the
correction had cost F1 (0.733 -> 0.667 and 0.353 -> 0.295).
A later pass (``p >= 1``) does not estimate ``T`` from its own early epochs: it is handed ``prior``, the ``T`` of
pass ``p - 1``'s end-of-pass evidence (``engine.training.audit.earlier_pass_transition``: that pass's AUM flags,
each flagged sample counted as its suggested class, the ``noise_estimate`` of one pass), and trains on it from the
same correction epoch, when its own estimation epochs pass the same stability guard. That evidence has seen the
whole pass and the correction, where the early-epoch unanimity sees about half the noise under heavy noise (a
flipped sample's prediction still changes in epochs 2-4): on digits with 40% asymmetric noise the error of ``T``
(L1 per row against the truth) falls from 0.23-0.29 to 0.08-0.09, at 20% asymmetric from 0.04-0.06 to
0.007-0.02, at 40% symmetric from 0.18-0.20 to 0.06 (bench/RESULTS.md, third screening round). Each row of the
prior is first mixed with the identity until ``T[j, j] - max_i T[j, i] >= PRIOR_MARGIN`` (``dominant_rows``): a
swapped pair estimated at 50 / 50 (40% asymmetric, seed 0: 0.50) makes the two classes indistinguishable under
the corrected loss, the network merges them and the pass's ranking collapses (AUROC 0.979 -> 0.949); the margin
0.3 keeps such a pair at 0.65 / 0.35 and leaves rows with up to 35% noise into one class as estimated.
With it (``python bench/detection.py --seeds 3``, means of 3 seeds) F1 / AUROC went from 0.854 / 0.9792 to
0.901 / 0.9903 at 40% asymmetric and from 0.968 / 0.9993 to 0.973 / 0.9996 at 20% asymmetric; symmetric noise
stayed within a seed's spread (10 / 20 / 40%: F1 0.987 / 0.990 / 0.984 -> 0.986 / 0.988 / 0.985, AUROC unchanged).
Not adopted, and why: a prior from epoch 0 (worse), re-estimating ``T`` inside a pass (best on one seed, collapses
on another when a half-merged pair is read as noise): bench/RESULTS.md. A pass whose predecessor trained without
the correction (the guard above) gets no prior.
Threshold samples (the fake class, targets ``>= n_real``) are neither counted nor corrected: ``T``
is the identity on the fake class, so their margins keep the meaning Pleiss et al. give them.

The predictions are the captured ones (every rank holds all of them after the epoch's gather), so a
pass trained without capture (k-fold scores, ``retrain``) trains on plain cross-entropy.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from engine.scores.noise import transition_matrix
from engine.training.config import AuditConfig

ESTIMATE_EPOCHS = 3  # the epochs just before the correction starts whose predictions estimate T (never epoch 0)
MIN_STABLE = 0.5  # below this fraction of samples with one prediction over the estimation epochs: no correction
PRIOR_MARGIN = 0.3  # an earlier pass's T: each row made dominant by this much (dominant_rows) before it is used


def dominant_rows(t: np.ndarray, margin: float) -> np.ndarray:
    """Each row ``j`` of ``T`` mixed with the identity, ``(1 - s) T[j] + s e_j`` with the smallest ``s >= 0`` that
    makes ``T[j, j] - max_{i != j} T[j, i] >= margin`` (a row already that dominant is kept). The gap of the mixed
    row is ``(1 - s) gap + s``, hence ``s = (margin - gap) / (1 - gap)``; rows keep summing to 1."""
    t = np.asarray(t, dtype=np.float64).copy()
    for j in range(len(t)):
        gap = t[j, j] - (np.delete(t[j], j).max() if len(t) > 1 else 0.0)
        if gap < margin:
            s = (margin - gap) / (1 - gap)
            t[j] *= 1 - s
            t[j, j] += s
    return t


class ForwardCorrection:
    """The per-pass state of the correction: each sample's last prediction and how many estimation epochs in a
    row it has been the same, then the matrix ``T`` (``n_outputs`` square). ``prior``: an earlier pass's ``T``
    (``n_real`` square), used instead of the pass's own estimate (see the module docstring)."""

    def __init__(self, cfg: AuditConfig, n_outputs: int, n_real: int, device: torch.device,
                 prior: np.ndarray | None = None):
        self.start = cfg.correction_epoch
        self.n_outputs, self.n_real, self.device = n_outputs, n_real, device
        self.prior: np.ndarray | None = None
        if prior is not None:
            self.prior = np.eye(n_outputs)
            self.prior[:n_real, :n_real] = dominant_rows(prior, PRIOR_MARGIN)
        first = max(1, (self.start or 0) - ESTIMATE_EPOCHS)
        self.estimate_epochs = range(first, self.start) if self.start is not None else range(0)
        self.last: np.ndarray | None = None
        self.streak: np.ndarray | None = None
        self.matrix: torch.Tensor | None = None
        self.stable_fraction: float | None = None  # set after the last estimation epoch

    def end_epoch(self, epoch: int, pred: np.ndarray | None, targets: np.ndarray) -> None:
        """Record an estimation epoch's captured predictions ``pred`` (one per sample); after the last one, ``T``
        from the counts of (given label, estimated true class) over the real-labelled samples, or the earlier
        pass's ``prior``, unless fewer than ``MIN_STABLE`` of them kept one prediction (then no correction:
        ``matrix`` stays None)."""
        if epoch not in self.estimate_epochs or pred is None:
            return
        pred = np.asarray(pred, dtype=np.int64)
        if self.last is None:
            self.last, self.streak = pred.copy(), np.ones(len(pred), dtype=np.int64)
        else:
            self.streak = np.where(pred == self.last, self.streak + 1, 1)
            self.last = pred.copy()
        if epoch != self.start - 1:
            return
        y = np.asarray(targets, dtype=np.int64)
        real = y < self.n_real
        stable = (self.streak >= len(self.estimate_epochs)) & (self.last < self.n_real)
        self.stable_fraction = float(stable[real].mean()) if real.any() else 0.0
        if self.stable_fraction < MIN_STABLE:
            return
        if self.prior is not None:
            self.matrix = torch.as_tensor(self.prior, dtype=torch.float32, device=self.device)
            return
        true = np.where(stable, self.last, y)[real]
        counts = np.zeros((self.n_real, self.n_real), dtype=np.int64)
        np.add.at(counts, (y[real], true), 1)
        t = np.eye(self.n_outputs)
        t[: self.n_real, : self.n_real] = transition_matrix(counts)
        self.matrix = torch.as_tensor(t, dtype=torch.float32, device=self.device)

    def loss(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor | None:
        """``-log (softmax(z) @ T)[y]`` averaged over the batch, or None before ``T`` exists."""
        if self.matrix is None:
            return None
        q = torch.softmax(logits, dim=1) @ self.matrix
        return F.nll_loss(torch.log(q.clamp_min(1e-12)), y)

    def state(self) -> dict:
        """What a checkpoint keeps, so that a resumed pass trains on the same loss."""
        out = {}
        if self.last is not None:
            out["correction_last"] = torch.from_numpy(self.last.astype(np.int16))
            out["correction_streak"] = torch.from_numpy(self.streak.astype(np.int16))
        if self.matrix is not None:
            out["correction_matrix"] = self.matrix.cpu()
        return out

    def load_state(self, state: dict) -> None:
        if "correction_last" in state:
            self.last = state["correction_last"].cpu().numpy().astype(np.int64)
            self.streak = state["correction_streak"].cpu().numpy().astype(np.int64)
        if "correction_matrix" in state:
            self.matrix = state["correction_matrix"].to(self.device)
