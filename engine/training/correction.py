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
PRIOR_SHRINK = 0.0  # a prior T from an earlier pass is used as (1 - s) T + s I (screening knob)
PRIOR_MARGIN = 0.0  # screening knob: rows of a prior T mixed with the identity until T[j, j] - max_i T[j, i] >= margin
PRIOR_FROM_START = False
REESTIMATE_AT: int | None = None  # screening knob: T again at this epoch from the mode of the 5 epochs' predictions before
REESTIMATE_MARGIN = 0.3  # screening knob: dominant_rows margin of the re-estimate
REFLAG_AT: int | None = None  # screening knob: T again at this epoch from the pass's own AUM flags so far (margin 0.3)
REFLAG_ALL = False  # screening knob: also in a pass that has a prior (else only in the first pass)
REESTIMATE_RULE = "mode"  # screening knob: "mode" of the window's predictions, or "unanimous" (else the given label)  # screening knob: use the prior T from epoch 0 (no estimation epochs, no guard)


def dominant_rows(t: np.ndarray, margin: float) -> np.ndarray:
    """Each row ``j`` of ``T`` mixed with the identity, ``(1 - s) T[j] + s e_j``, with the smallest ``s`` that makes
    ``T[j, j] - max_{i != j} T[j, i] >= margin``."""
    t = np.asarray(t, dtype=np.float64).copy()
    for j in range(len(t)):
        off = np.delete(t[j], j).max() if len(t) > 1 else 0.0
        gap = t[j, j] - off
        if gap < margin:
            s = (margin - gap) / (1 - gap)  # (1-s) gap + s = margin
            t[j] *= 1 - s
            t[j, j] += s
    return t


class ForwardCorrection:
    """The per-pass state of the correction: each sample's last prediction and how many estimation epochs in a
    row it has been the same, then the matrix ``T`` (``n_outputs`` square)."""

    def __init__(self, cfg: AuditConfig, n_outputs: int, n_real: int, device: torch.device,
                 prior: np.ndarray | None = None):
        self.start = cfg.correction_epoch
        self.n_outputs, self.n_real, self.device = n_outputs, n_real, device
        self.prior = None
        if prior is not None and self.start is not None:
            t = np.eye(n_outputs)
            t[:n_real, :n_real] = (1 - PRIOR_SHRINK) * np.asarray(prior, dtype=np.float64) + PRIOR_SHRINK * np.eye(n_real)
            if PRIOR_MARGIN > 0:
                t[:n_real, :n_real] = dominant_rows(t[:n_real, :n_real], PRIOR_MARGIN)
            self.prior = t
        first = max(1, (self.start or 0) - ESTIMATE_EPOCHS)
        self.estimate_epochs = range(first, self.start) if self.start is not None else range(0)
        self.last: np.ndarray | None = None
        self.streak: np.ndarray | None = None
        self.matrix: torch.Tensor | None = None
        self.stable_fraction: float | None = None  # set after the last estimation epoch
        if self.prior is not None and PRIOR_FROM_START:
            self.matrix = torch.as_tensor(self.prior, dtype=torch.float32, device=self.device)
            self.estimate_epochs = range(0)

    def observe(self, epoch: int, host: dict) -> None:
        """Screening: AUM over epochs 1..REFLAG_AT-1 and the votes of the largest other class; at REFLAG_AT - 1, T from
        those flags and suggested classes (``earlier_pass_transition``'s rule inside the pass)."""
        if REFLAG_AT is None or self.matrix is None and epoch >= self.start or not 1 <= epoch < REFLAG_AT:
            return
        if self.prior is not None and not REFLAG_ALL:
            return
        n = len(host["margin"])
        if not hasattr(self, "msum"):
            self.msum, self.votes = np.zeros(n), np.zeros((self.n_real, n), dtype=np.int32)
        self.msum += host["margin"]
        other = np.asarray(host["other"], dtype=np.int64)
        ok = (other >= 0) & (other < self.n_real)
        np.add.at(self.votes, (other[ok], np.flatnonzero(ok)), 1)
        if epoch != REFLAG_AT - 1 or self.matrix is None:
            return
        from engine.scores.noise import estimated_joint
        from engine.scores.registry import pass_cutoff

        y = self.targets_host
        aum = self.msum / (REFLAG_AT - 1)
        kept, thr = y < self.n_real, y >= self.n_real
        cut = pass_cutoff("auto", aum[kept], aum[thr] if thr.any() else None, 99.0, 0)
        flagged = kept & (aum < cut)
        joint = estimated_joint(np.where(kept, y, 0), flagged, self.votes.argmax(axis=0), self.n_real, kept)
        t = np.eye(self.n_outputs)
        t[: self.n_real, : self.n_real] = dominant_rows(transition_matrix(joint), 0.3)
        self.matrix = torch.as_tensor(t, dtype=torch.float32, device=self.device)

    def reestimate(self, epoch: int, pred: np.ndarray | None, targets: np.ndarray) -> None:
        """Screening: keep the predictions of the 5 epochs before ``REESTIMATE_AT``; then ``T`` from the (given, mode
        of those predictions) counts, when the pass corrects at all."""
        if REESTIMATE_AT is None or pred is None or not REESTIMATE_AT - 5 <= epoch < REESTIMATE_AT:
            return
        if not hasattr(self, "window"):
            self.window = []
        self.window.append(np.asarray(pred, dtype=np.int64).copy())
        if epoch != REESTIMATE_AT - 1 or self.matrix is None:
            return
        w = np.stack(self.window)
        y = np.asarray(targets, dtype=np.int64)
        real = y < self.n_real
        counts = np.zeros((self.n_real, len(y)), dtype=np.int64)
        ok = w < self.n_real
        np.add.at(counts, (np.where(ok, w, 0), np.broadcast_to(np.arange(len(y)), w.shape)), ok.astype(np.int64))
        mode = counts.argmax(axis=0)
        if REESTIMATE_RULE == "majority":  # more than half the window's epochs, else the given label
            mode = np.where(counts.max(axis=0) * 2 > len(w), mode, y)
        if REESTIMATE_RULE == "unanimous":
            mode = np.where((w == w[:1]).all(axis=0) & (w[0] < self.n_real), w[0], y)
        joint = np.zeros((self.n_real, self.n_real), dtype=np.int64)
        np.add.at(joint, (y[real], mode[real]), 1)
        t = np.eye(self.n_outputs)
        t[: self.n_real, : self.n_real] = dominant_rows(transition_matrix(joint), REESTIMATE_MARGIN)
        self.matrix = torch.as_tensor(t, dtype=torch.float32, device=self.device)

    def end_epoch(self, epoch: int, pred: np.ndarray | None, targets: np.ndarray) -> None:
        """Record an estimation epoch's captured predictions ``pred`` (one per sample); after the last one, ``T``
        from the counts of (given label, estimated true class) over the real-labelled samples, unless fewer than
        ``MIN_STABLE`` of them kept one prediction (then no correction: ``matrix`` stays None)."""
        self.reestimate(epoch, pred, targets)
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
