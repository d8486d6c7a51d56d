"""Training-dynamics math: margins, AUM, threshold cut-offs, cartography.

Two layers:

* ``batch_capture`` works on one batch of logits as torch tensors, on the device the
  model runs on; it is what the training loop calls on the logits of its own forward pass.
* every other function is pure numpy over ``(epochs, samples)`` arrays.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # torch is imported where a batch is captured, so the dashboard's read path stays light
    import torch


@dataclass
class BatchCapture:
    """Per-sample values of one batch, all 1-D tensors on the model's device."""

    margin: torch.Tensor  # Pleiss margin
    margin_yang: torch.Tensor  # Yang margin
    prob: torch.Tensor  # softmax probability of the target
    pred: torch.Tensor  # argmax class (over the real classes for a real target in a threshold pass)
    other: torch.Tensor  # largest logit among the real classes other than the target
    loss: torch.Tensor  # per-sample cross-entropy
    el2n: torch.Tensor  # ||softmax - onehot(target)||_2 (Paul et al. 2021)


SOFTMAX_FLOOR = 30.0  # see batch_capture


def row_argmax(x: torch.Tensor, block: int = 32) -> torch.Tensor:
    """Index of each row's maximum, like ``x.argmax(1)`` (the index of a maximum when there are ties).

    On the CPU ``argmax`` is a scalar loop (about 0.9 ns an element) while ``amax`` is vectorised,
    so wide rows are cut into ``block``-wide columns: the column holding the maximum comes from
    ``amax`` over the blocks, then an ``argmax`` over ``C / block`` values finds the block. 3-4x
    faster than ``argmax`` at 1,000 classes (bench/aum_update.py); elsewhere plain ``argmax``.
    """
    import torch

    b, c = x.shape
    if x.device.type != "cpu" or c < 8 * block:
        return x.argmax(dim=1)
    nb = c // block
    main = x[:, : nb * block].view(b, nb, block)
    col_max = main.amax(dim=1)  # (B, block): best value of each column position
    r = col_max.argmax(dim=1)
    idx = main.gather(2, r.view(b, 1, 1).expand(b, nb, 1)).squeeze(2).argmax(dim=1) * block + r
    if nb * block < c:  # the columns left over after the last full block
        tail_v, tail_i = x[:, nb * block :].max(dim=1)
        idx = torch.where(tail_v > col_max.gather(1, r.view(b, 1)).squeeze(1), tail_i + nb * block, idx)
    return idx


def batch_capture(logits: torch.Tensor, targets: torch.Tensor, n_real_classes: int | None = None) -> BatchCapture:
    """Margins, probability, prediction and loss of a batch, vectorised: the one capture function.

    Our training loop (``engine.training.loop``) and ``engine.capture.recorder.Recorder`` both call it on the
    logits of a training forward pass, so a user's loop and ours capture identical values.

    Pleiss et al. 2020 (Identifying Mislabeled Data using the Area Under the Margin
    Ranking, ``aum`` package): ``margin = z_y - max_{k != y} z_k``.

    Yang variant (peerannot's ``AUM``, ``AUM_yang``): mask the argmax logit and subtract the
    largest remaining one, i.e. ``margin_yang = z_y - z_(2)`` with ``z_(2)`` the second largest
    logit. It equals the Pleiss margin when ``y`` is the argmax, is 0 when ``y`` is the runner-up
    and is never below the Pleiss margin.

    ``prob = p(y) = exp(z_y - lse)`` and ``loss = lse - z_y`` (cross-entropy) with
    ``lse = log sum_k exp(z_k)``; ``el2n`` is the error L2 norm
    ``||softmax(z) - onehot(y)||_2 = sqrt(sum_{k != y} p_k^2 + (1 - p_y)^2)`` (Paul et al. 2021).

    In a threshold pass (``n_real_classes < C``) the scores a paper defines on a c-way classifier are
    read for a real-labelled sample from the softmax **renormalised over the real classes**
    (``softmax(z[:, :c])``): ``prob`` (cartography confidence), ``el2n`` and ``pred`` (cumulative
    accuracy, forgetting, first iteration: argmax over the real classes). ``loss`` stays the
    ``(c+1)``-way cross-entropy the pass trains on, and the margins compete with every logit, fake
    class included, as the ``aum`` package does. A threshold sample (target = the fake class) is
    read over all ``C`` outputs.

    ``other`` is the class with the largest logit among the first ``n_real_classes``
    classes other than the target (the threshold-sample fake class is excluded): the
    suggested relabel. ``pred`` is the argmax over all logits; a target tied with the largest
    other logit counts as predicted.

    Cost: the logits are read by one masked copy (``z`` with the target at ``-inf``), two
    ``amax``, one ``argmax`` and one ``softmax``; every captured value is a per-row gather or
    ``where`` on those (no top-k, no second exponential). Nothing is copied to the host.

    Args:
        logits: ``(B, C)`` raw logits (float32 or lower precision; computed in float32).
        targets: ``(B,)`` long targets the loss was computed against.
        n_real_classes: number of real classes (defaults to ``C``).
    """
    import torch

    z = logits.detach().float()
    c = z.shape[1]
    n_real = c if n_real_classes is None else n_real_classes
    y = targets.view(-1, 1)
    target_logit = z.gather(1, y).squeeze(1)
    masked = z.scatter(1, y, float("-inf"))  # every logit but the target's
    other = row_argmax(masked[:, :n_real])  # largest real class other than the target
    best_other = masked.gather(1, other.view(-1, 1)).squeeze(1)
    pred = torch.where(target_logit >= best_other, targets, other)
    if n_real < c:  # the fake class of threshold samples can be the largest other logit
        fake_v, fake_i = masked[:, n_real:].max(dim=1)
        fake_wins = fake_v > best_other
        best_other = torch.where(fake_wins, fake_v, best_other)
        pred = torch.where(target_logit >= best_other, targets, torch.where(fake_wins, fake_i + n_real, other))
    margin = target_logit - best_other
    # Yang: z_y - second largest logit. Target on top: the largest other (= Pleiss margin); else the
    # largest logit left after removing the argmax, which is the target itself or below it.
    second = masked.scatter_(1, pred.view(-1, 1), float("-inf")).amax(dim=1)
    margin_yang = torch.where(pred == targets, margin, (target_logit - second).clamp(max=0.0))
    top = torch.maximum(target_logit, best_other)  # the largest logit
    # On the CPU, logits more than FLOOR below the top are raised to top - FLOOR: their exp(-30) = 9e-14 share is
    # below float32 resolution next to the top class's (for fewer than a million classes), and no probability or
    # square of one becomes a subnormal float, which the CPU computes 10-100x slower (confident late epochs).
    # GPUs handle subnormals at full speed: no extra pass there.
    floored = torch.maximum(z, (top - SOFTMAX_FLOOR).unsqueeze(1)) if z.device.type == "cpu" else z
    p = torch.softmax(floored, dim=1)
    # lse from the top class's probability, which is >= 1/C and never underflows: p_top = exp(top - lse)
    lse = top - p.gather(1, pred.view(-1, 1)).squeeze(1).log()
    loss = lse - target_logit
    p_target = (-loss).exp()
    # EL2N^2 = sum_{k != y} p_k^2 + (1 - p_y)^2, each term without cancellation when p_y is near 1
    p_others = torch.linalg.vector_norm(p.scatter_(1, y, 0.0), dim=1)
    el2n = torch.hypot(p_others, -torch.expm1(-loss))
    pred_read = pred
    if n_real < c:  # a threshold pass: a real-labelled sample's c-way scores read over the real classes only
        real = targets < n_real
        yr = targets.clamp(max=n_real - 1).view(-1, 1)
        pr = torch.softmax(floored[:, :n_real], dim=1)
        pr_target = pr.gather(1, yr).squeeze(1)
        el2n_real = torch.hypot(torch.linalg.vector_norm(pr.scatter(1, yr, 0.0), dim=1), 1.0 - pr_target)
        pred_real = torch.where(target_logit >= z.gather(1, other.view(-1, 1)).squeeze(1), targets, other)
        p_target = torch.where(real, pr_target, p_target)
        el2n = torch.where(real, el2n_real, el2n)
        pred_read = torch.where(real, pred_real, pred)
    return BatchCapture(
        margin=margin,
        margin_yang=margin_yang,
        prob=p_target,
        pred=pred_read,
        other=other,
        loss=loss,
        el2n=el2n,
    )


def trailing_streak(flags: np.ndarray) -> np.ndarray:
    """Per column of a boolean ``(T, N)`` array, the length of the run of True at its end (0..T)."""
    rev = np.asarray(flags, dtype=bool)[::-1]
    return np.where(rev.all(axis=0), rev.shape[0], np.argmin(rev, axis=0))


def pleiss_margin(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Pleiss et al. 2020 margin alone, ``z_y - max_{k != y} z_k`` (the quantity the ``aum`` package tracks)."""
    z = logits.detach()
    y = targets.view(-1, 1)
    return (z.gather(1, y) - z.scatter(1, y, float("-inf")).amax(dim=1, keepdim=True)).squeeze(1)


def area_under_margin(margins: np.ndarray, start: int = 0, end: int | None = None) -> np.ndarray:
    """AUM of each sample: mean margin over epochs ``start..end`` (end exclusive).

    Pleiss et al. 2020, eq. 2: ``AUM(x, y) = 1/T sum_t M_t(x, y)``. ``margins`` is
    ``(epochs, samples)``; NaN epochs (not captured) are ignored.
    """
    window = np.asarray(margins, dtype=np.float64)[start:end]
    if window.shape[0] == 0:
        raise ValueError(f"empty AUM window: epochs {start}..{end} of {np.shape(margins)[0]}")
    if not np.isnan(window).any():
        return window.mean(axis=0)
    seen = (~np.isnan(window)).sum(axis=0)  # a sample never captured (not trained on) stays NaN, silently
    return np.where(seen > 0, np.nansum(window, axis=0) / np.maximum(seen, 1), np.nan)


def threshold_cutoff(threshold_aum: np.ndarray, percentile: float = 99.0) -> float:
    """Pleiss et al. 2020 cut-off: the ``percentile``-th percentile of the threshold samples' AUM.

    A sample whose AUM is below it is flagged as mislabeled.
    """
    values = np.asarray(threshold_aum, dtype=np.float64)
    values = values[np.isfinite(values)]
    if values.size == 0:
        raise ValueError("no threshold samples with a finite AUM: cannot compute the cut-off")
    return float(np.percentile(values, percentile))


def gmm_cutoff(aum: np.ndarray, seed: int = 0) -> float:
    """Cut-off from a two-component 1-D Gaussian mixture on AUM (as DivideMix, Li et al. 2020, on loss).

    Fits ``p(a) = pi N(a; mu_1, s_1) + (1 - pi) N(a; mu_2, s_2)`` by EM and returns the AUM
    below which the posterior of the low-mean component exceeds 1/2 (the Bayes decision
    point between "mislabeled" and "clean"). Returns ``-inf`` (flag nothing) when the data
    show no second group: the two-component fit does not beat one Gaussian on BIC, Ashman's
    separation ``D = sqrt(2) |mu_1 - mu_2| / sqrt(s_1^2 + s_2^2)`` is below 2 (Ashman et al.
    1994: D > 2 is needed for a clean split), or the low component holds < 0.5% of samples.
    """
    from sklearn.mixture import GaussianMixture

    x = np.asarray(aum, dtype=np.float64)
    x = x[np.isfinite(x)].reshape(-1, 1)
    if x.shape[0] < 10:
        return float("-inf")
    gm = GaussianMixture(2, random_state=seed, reg_covar=1e-4, n_init=2).fit(x)
    one = GaussianMixture(1, reg_covar=1e-4).fit(x)
    mu = gm.means_.ravel()
    sd = np.sqrt(gm.covariances_.ravel())
    low = int(np.argmin(mu))
    ashman = np.sqrt(2) * abs(mu[0] - mu[1]) / np.sqrt(sd[0] ** 2 + sd[1] ** 2)
    if gm.bic(x) >= one.bic(x) or ashman < 2 or gm.weights_[low] < 0.005:
        return float("-inf")
    grid = np.linspace(x.min(), x.max(), 4001).reshape(-1, 1)
    post = gm.predict_proba(grid)[:, low]
    mu_low, mu_high = sorted(gm.means_.ravel())
    between = (grid.ravel() >= mu_low) & (grid.ravel() <= mu_high)
    candidates = grid.ravel()[between & (post < 0.5)]
    if candidates.size == 0:
        return float(mu_high)
    return float(candidates.min())


def cartography(prob: np.ndarray, correct: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Dataset cartography (Swayamdipta et al. 2020).

    confidence = mean_e p_e(y), variability = population std_e p_e(y),
    correctness = mean_e [pred_e == y]; all over the epoch axis of ``(epochs, samples)``.
    """
    p = np.asarray(prob, dtype=np.float64)
    return p.mean(axis=0), p.std(axis=0), np.asarray(correct, dtype=np.float64).mean(axis=0)
