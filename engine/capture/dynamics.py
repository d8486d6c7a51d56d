"""Training-dynamics math: margins, AUM, threshold cut-offs, cartography.

Two layers:

* ``batch_capture`` works on one batch of logits as torch tensors, on the device the
  model runs on; it is what the training loop calls on the logits of its own forward pass.
* every other function is pure numpy over ``(epochs, samples)`` arrays.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any

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


SOFTMAX_FLOOR = 30.0  # see _top2_softmax_cpu
LOG2E = 1.4426950408889634  # exp(x) = 2 ** (x log2 e): numpy's exp2 is 4x faster than torch's exp on the CPU
CHUNK_VALUES = 1 << 22  # logits kept (4M values, 16 MB in float32) by the loops before one batch_capture call
WORKSPACE_VALUES = 1 << 20  # logits per CPU capture step (one reused 4 MB float32 workspace per thread)
_workspaces = threading.local()


def _workspace(rows: int, cols: int) -> np.ndarray:
    """A ``(rows, cols)`` float32 CPU buffer owned by this thread and reused by every capture.

    A fresh 4 MB temporary per step is returned to the OS by glibc when freed, so the next one
    page-faults on every page: that made a 1024 x 1000 capture 2.5x slower than its arithmetic.
    The buffer starts on a 64-byte cache line, as torch's tensors do (numpy's ``empty`` gives 16 bytes): the
    AVX-512 passes over a buffer off the line are 5-25% slower here (``bench/RESULTS.md``).
    """
    buf = getattr(_workspaces, "buf", None)
    if buf is None or buf.size < rows * cols:
        size = max(rows * cols, 1 << 16)
        raw = np.empty(size + 16, dtype=np.float32)
        start = (-raw.ctypes.data % 64) // 4
        buf = raw[start : start + size]
        _workspaces.buf = buf
    return buf[: rows * cols].reshape(rows, cols)


def batch_capture(logits: torch.Tensor, targets: torch.Tensor, n_real_classes: int | None = None,
                  overwrite: bool = False) -> BatchCapture:
    """Margins, probability, prediction and loss of a batch, vectorised: the one capture function.

    Our training loop (``engine.training``) and ``engine.capture.recorder.Recorder`` both call it on the
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
    other logit counts as predicted. Ties among other classes go to the first index, as ``argmax``.

    Cost: every captured value comes from the top two logits of the real classes (value and
    index: two ``argmax``, the second on a copy with the first masked), one exponential of the real
    logits and two row sums (``lse`` and the norm for EL2N); the rest is per-row gathers and
    ``where``. On the CPU (``_top2_softmax_cpu``, numpy and torch kernels that are each vectorised) the
    work runs in steps of at most ``WORKSPACE_VALUES`` logits in one reused per-thread buffer (no large
    temporary; a fresh 4 MB one page-faults on every page) and the logits of a step are read 7 times:
    ``argmax`` of the logits (the one read from memory), the copy floored at top - ``SOFTMAX_FLOOR`` into
    the workspace, the masked second ``argmax``, shift and scale in one fused multiply-add (from 512 classes),
    ``exp2``, row sum and row sum of squares (BLAS dot); with ``overwrite=True`` the floor is made in the
    logits instead of a copy. When every class is real the per-row values (about 40 operations on batch-long
    vectors) are numpy's, 2-4x cheaper than torch's at this size (a threshold pass keeps torch's for the fake
    class). Measured at 1024 x 1000 (``bench/aum_update.py``, thread CPU time, ``bench/RESULTS.md``): about 3.0-3.4x
    the margin alone, of which the 7 passes alone are 2.8-3.0x; with ``overwrite=True`` 2.7-3.0x. On a GPU the
    same values come from torch operations: a fresh copy, no floor. Nothing is copied to the host.

    Args:
        logits: ``(B, C)`` raw logits (float32 or lower precision; computed in float32).
        targets: ``(B,)`` long targets the loss was computed against.
        n_real_classes: number of real classes (defaults to ``C``).
        overwrite: the caller's logits may be used as the workspace (their values are undefined after the call).
            Used on the CPU when they are a C-contiguous float32 tensor and every class is real: the copy into the
            workspace is skipped (about 100 us per 1M logits, ``bench/aum_update.py``); the values are the same.
            For a caller that copied the logits into a buffer of its own; never for a model's output still in use.
    """
    import torch

    z = logits.detach().float()
    y = targets.view(-1)
    n_real = z.shape[1] if n_real_classes is None else n_real_classes
    rows = max(1, WORKSPACE_VALUES // n_real)
    if z.device.type != "cpu" or z.shape[0] <= rows:
        return _capture(z, y, n_real, overwrite=overwrite)
    # rows are independent: a step's values do not depend on which other rows share it
    steps = [_capture(z[lo : lo + rows], y[lo : lo + rows], n_real, overwrite=overwrite)
             for lo in range(0, z.shape[0], rows)]
    return BatchCapture(**{f.name: torch.cat([getattr(s, f.name) for s in steps]) for f in fields(BatchCapture)})


def _top2_softmax_cpu(z: torch.Tensor, y: torch.Tensor, n_real: int, overwrite: bool = False) -> tuple[np.ndarray, ...]:
    """The CPU passes of ``_capture`` over the real logits ``x = z[:, :n_real]``, as numpy arrays.

    Returns ``zy`` (the target's logit, read first), ``i1, v1`` (first maximum), ``i2, v2`` (first maximum of the
    others), ``rest = sum_{k != i1} e_k`` and ``norm``, with ``e_k = exp(max(x_k, lo) - v1)`` and the floor ``lo = v1 - SOFTMAX_FLOOR``: ``norm`` is
    ``||e_k||`` over the real ``k != y`` for a real target, over every real ``k`` for a threshold sample.

    The floor: logits more than ``SOFTMAX_FLOOR`` below the top are raised to ``lo``; their exp(-30) = 9e-14 share
    is below float32 resolution next to the top class's (for fewer than a million classes), and numpy's ``exp2``
    stays in its fast range: an argument below -126 (a result that underflows) takes a slow path, 13-35x slower
    per 1M values, flush-to-zero set or not (``bench/capture_passes.py``). A row whose ``v1 - 30`` rounds to ``v1``
    (``|v1| > 2^29``) or whose top is infinite has no floor.

    Passes over the logits, each one vectorised call: numpy ``argmax`` of ``x`` (the one read of the batch from
    memory); the floored copy ``max(x, lo)`` into the workspace (torch: numpy's ``maximum`` is 2x slower; exact
    above the floor); ``argmax`` of the copy with the top masked by ``lo`` (exact whenever the runner-up is above
    the floor: a row whose other logits all lie at or below it is redone from ``x``); shift and scale in one
    fused multiply-add ``t_k = fl(w_k log2e - c)``, ``c = fl(v1 log2e)`` (torch's ``addcmul``, when
    ``_addcmul_rounds_once``; else torch's ``sub_`` then numpy's multiply); ``exp2`` (numpy's is 4x torch's
    ``exp``); row sum (torch: 3x numpy's pairwise sum) and row sum of squares (numpy ``vecdot``, a BLAS dot).

    The fused multiply-add (from ``FMA_MIN_CLASSES`` classes) rounds once, where subtracting then scaling rounds
    twice, and it shifts every ``t_k`` of a row by the same ``r = v1 log2e - c`` (``|r| <= 1/2`` ulp of ``c``): every
    ``e`` of the row is ``2^r`` times the exact one, the top's included (the top is put back before the shift), so
    ``rest`` and ``norm`` are divided by that ``e_top`` once per row. A row with ``|v1| >= FMA_MAX_TOP`` (where ``r``
    could exceed 1/2) or a non-finite top is shifted and scaled in two steps instead.

    ``overwrite=True`` (every class real and ``z`` a writable C-contiguous float32 array) works in ``z`` itself: the
    second ``argmax`` runs on ``z`` with the top masked by ``-inf`` (exact, nothing to redo), then ``z`` is floored in
    place; the values are those of the copy, bit for bit, and ``z`` is left holding the exponentials.
    """
    import torch

    zn = z.numpy()
    xt = z if n_real == z.shape[1] else z[:, :n_real]
    x = zn if n_real == z.shape[1] else xt.numpy()
    b, n = x.shape
    base = np.arange(0, b * n, n)  # row starts in the workspace
    yn = y.numpy()
    at_y = base + yn if n_real == z.shape[1] else None  # the targets in the workspace
    zy = (zn.reshape(-1)[at_y if at_y is not None else np.arange(0, b * z.shape[1], z.shape[1]) + yn]
          if zn.flags.c_contiguous else zn[np.arange(b), yn])  # read before the logits may be overwritten
    in_place = overwrite and n_real == z.shape[1] and zn.flags.c_contiguous and zn.flags.writeable
    work = x if in_place else _workspace(b, n)
    work_t = xt if in_place else torch.from_numpy(work)
    flat = work.reshape(-1)
    src, src_t = x, xt  # what the first argmax and the floored copy read (x stays the logits, for the redo)
    if not zn.flags.c_contiguous:  # numpy's argmax would copy the logits to a fresh array
        work_t.copy_(xt)
        src, src_t = work, work_t  # the floored copy below is made in place
    if src.flags.c_contiguous:
        i1 = src.argmax(axis=1)
        top = base + i1
        v1 = src.reshape(-1)[top]
    else:  # the real classes of a threshold pass: the argmax over all classes is theirs unless a fake class leads
        i1 = zn.argmax(axis=1)
        fake = np.flatnonzero(i1 >= n)
        if fake.size:
            i1[fake] = x[fake].argmax(axis=1)
        v1 = zn.reshape(-1)[np.arange(0, b * zn.shape[1], zn.shape[1]) + i1]
        top = base + i1
    regular = b == 0 or np.abs(v1).max() < FMA_MAX_TOP  # finite tops, none huge: no row needs the checks below
    lo = v1 - np.float32(SOFTMAX_FLOOR)
    if not regular and not (lo < v1).all():  # v1 - 30 rounds to v1 (|v1| > 2^29), an infinite or NaN top: no floor
        lo[~(lo < v1)] = -np.inf
    lo_t = torch.from_numpy(lo).view(-1, 1)
    if in_place:
        flat[top] = -np.inf  # the runner-up of the logits themselves: exact
        i2 = work.argmax(axis=1)
        v2 = flat[base + i2]  # -inf for a row of one finite logit (its top, masked), as the redo below gives
        torch.maximum(work_t, lo_t, out=work_t)  # the floor: the workspace of the copy
    else:
        torch.maximum(src_t, lo_t, out=work_t)  # numpy's maximum: 2x slower (NaN checks)
        flat[top] = lo  # masked: the top cannot win the second argmax unless every other logit is floored (redone)
        i2 = work.argmax(axis=1)
        v2 = flat[base + i2]  # exact above the floor
        redo = v2 <= lo
        if redo.any():  # the runner-up is floored: the copy cannot order the others
            r = np.flatnonzero(redo)
            xs = x[r]
            xs[np.arange(r.size), i1[r]] = -np.inf
            i2[r] = xs.argmax(axis=1)
            v2[r] = xs[np.arange(r.size), i2[r]]  # -inf for a row of one finite logit (its top, masked)
    flat[top] = v1  # the top back: e_top = 2^0 = 1 (two steps), 2^fl(r) (fused)
    fused = n >= FMA_MIN_CLASSES and _addcmul_rounds_once()  # per class count: a row's values never depend on b
    if fused:  # t = fl(w log2e - c), c = fl(v1 log2e): one rounding, every t of a row off by the same r = v1 log2e - c
        far = None if regular else np.flatnonzero(~(np.abs(v1) < FMA_MAX_TOP))  # r may exceed 1/2: two steps
        kept = work[far] if far is not None and far.size else None
        with np.errstate(over="ignore", invalid="ignore"):  # the far rows' c and inf - inf, silently as torch
            c = torch.from_numpy(v1 * np.float32(-LOG2E)).view(-1, 1)  # -fl(v1 log2e)
            torch.addcmul(c, work_t, _log2e_row(n), out=work_t)
            if kept is not None:
                work[far] = (kept - v1[far, None]) * np.float32(LOG2E)
    else:
        work_t.sub_(torch.from_numpy(v1).view(-1, 1))  # torch's sub_ of a column is 3x faster than numpy's
        np.multiply(work, np.float32(LOG2E), out=work)
    if not regular:
        flat[top[~np.isfinite(v1)]] = 0.0  # an infinite top (inf - inf): e_top = 1, its limits
    np.exp2(work, out=work)  # no -inf in it (the floor): exp2 is slower on a vector with one
    e_y = flat[at_y if at_y is not None else base + np.minimum(yn, n - 1)]  # e_top when y is the top
    if n_real < z.shape[1]:
        e_y[yn >= n] = 0.0  # a threshold sample: every real class counts in its norm
    e_top = flat[top] if fused else None
    flat[top] = 0.0
    rest = work_t.sum(dim=1).numpy()  # sum_{k != i1} e_k; torch's row sum is 3x numpy's (pairwise) here
    # sum_{k != y} e_k^2 = (sum_{k != i1} e_k^2) + e_top^2 - e_y^2
    if e_top is None:
        norm = np.sqrt(_row_dot(work) + (1 - e_y * e_y))
    else:  # every e of a row is 2^r times the exact one: divide by e_top = 2^r
        norm = np.sqrt(_row_dot(work) + (e_top * e_top - e_y * e_y)) / e_top
        rest /= e_top
    return zy, i1, v1, i2, v2, rest, norm


FMA_MIN_CLASSES = 512  # fewer classes: the pass the fused shift saves costs about its per-row work, or less
FMA_MAX_TOP = 2.0**22  # |v1| below it: |v1 log2e| < 2^23, fl(v1 log2e) has an ulp of at most 1, |r| <= 1/2
_fma: dict[str, bool] = {}
_log2e_rows: dict[int, torch.Tensor] = {}


def _log2e_row(n: int) -> torch.Tensor:
    """A ``(1, n)`` float32 tensor of ``log2 e`` (read-only, shared by threads)."""
    row = _log2e_rows.get(n)
    if row is None:
        import torch

        row = _log2e_rows[n] = torch.full((1, n), LOG2E)
    return row


def _addcmul_rounds_once() -> bool:
    """Whether torch's CPU ``addcmul(-c, w, log2e)`` computes ``w log2e - c`` with one rounding (a fused multiply-add,
    as its vectorised kernel does where the compiler contracts it); probed once, with the operands' shapes of the
    capture (a column, a full block, a row; 257 columns: the vector body and a tail), on values where one rounding
    and two differ. Without it the capture shifts and scales in two steps (two roundings)."""
    if "ok" not in _fma:
        import torch

        rng = np.random.default_rng(0)
        w = rng.uniform(2.0, 4.0, (4, 257)).astype(np.float32)  # w log2e - c is exact in float64 here
        c = (w.max(axis=1) * np.float32(LOG2E)).astype(np.float32)
        got = torch.addcmul(torch.from_numpy(-c).view(-1, 1), torch.from_numpy(w), torch.full((1, 257), LOG2E)).numpy()
        wide = w.astype(np.float64) * np.float64(np.float32(LOG2E))
        once = (wide - c[:, None]).astype(np.float32)
        twice = (wide.astype(np.float32).astype(np.float64) - c[:, None]).astype(np.float32)
        _fma["ok"] = bool(np.array_equal(got, once) and not np.array_equal(once, twice))
    return _fma["ok"]


def _row_dot(a: np.ndarray) -> np.ndarray:
    """``sum_k a_k^2`` of each row: numpy's ``vecdot`` (BLAS dot, numpy >= 2) is 3.5x ``einsum`` here."""
    if hasattr(np, "vecdot"):
        return np.vecdot(a, a)
    return np.einsum("ij,ij->i", a, a)


def _top2_softmax_torch(z: torch.Tensor, y: torch.Tensor, n_real: int) -> tuple[torch.Tensor, ...]:
    """``_top2_softmax_cpu`` in torch ops on the model's device (a GPU): a fresh copy and no floor (a GPU computes
    subnormal floats at full speed)."""
    import torch

    b = z.shape[0]
    x = z[:, :n_real]
    work = torch.empty((b, n_real), device=z.device)
    work.copy_(x)
    i1 = work.argmax(dim=1).view(-1, 1)
    v1 = work.gather(1, i1)
    work.scatter_(1, i1, float("-inf"))
    i2 = work.argmax(dim=1).view(-1, 1)
    v2 = work.gather(1, i2)
    work.scatter_(1, i1, v1)
    e = work.sub_(v1).exp_()
    e_top = e.gather(1, i1)  # 1
    rest = e.scatter_(1, i1, 0.0).sum(dim=1)
    e.scatter_(1, i1, e_top)
    yr = y.clamp(max=n_real - 1).view(-1, 1)
    real = (y < n_real).view(-1, 1)
    norm = torch.linalg.vector_norm(e.scatter_(1, yr, torch.where(real, 0.0, e.gather(1, yr))), dim=1)
    zy = z.gather(1, y.view(-1, 1)).squeeze(1)
    return zy, i1.squeeze(1), v1.squeeze(1), i2.squeeze(1), v2.squeeze(1), rest, norm


def _capture(z: torch.Tensor, y: torch.Tensor, n_real: int, torch_ops: bool | None = None,
             overwrite: bool = False) -> BatchCapture:
    """``batch_capture`` of float32 logits ``z`` (B, C) and targets ``y`` (B,); ``torch_ops`` (default: on any
    device but the CPU) takes the torch path a GPU runs, which a test also runs on the CPU; ``overwrite``: see
    ``batch_capture``."""
    import torch

    c = z.shape[1]
    cpu = z.device.type == "cpu" if torch_ops is None else not torch_ops
    # the two largest real logits: (v1, i1) the first maximum, (v2, i2) the first maximum of the rest; the
    # softmax of the real logits as e_k = exp(z_k - v1) (e = 1 at the top i1) and s = sum_k e_k = 1 + rest, where
    # rest sums every e_k but the top's: log s = log1p(rest) and 1 - p_top = rest / s keep their precision when
    # the top class takes almost all the mass (a confident network), where s itself rounds to 1
    if n_real == c:  # on the CPU in numpy: each operation on a batch-long vector costs 2-4x less than torch's
        xp = np if cpu else torch
        yv = y.numpy() if cpu else y
        parts = _top2_softmax_cpu(z, y, n_real, overwrite) if cpu else _top2_softmax_torch(z, y, n_real)
        with np.errstate(all="ignore"):  # infinite logits give inf - inf as torch does, silently
            values = _values_all_real(xp, yv, *parts)
        return BatchCapture(**{k: torch.from_numpy(v) for k, v in values.items()}) if cpu else BatchCapture(**values)
    parts = _top2_softmax_cpu(z, y, n_real) if cpu else _top2_softmax_torch(z, y, n_real)  # z is read below
    zy, i1, v1, i2, v2, rest, norm = (torch.from_numpy(a) for a in parts) if cpu else parts
    target_top = i1 == y  # never for a threshold sample (its target is not a real class)
    other = torch.where(target_top, i2, i1)  # largest real class other than the target
    best_real = torch.where(target_top, v2, v1)
    pred_real = torch.where(zy >= best_real, y, other)  # argmax over the real classes, the target winning ties
    # the fake class of threshold samples can be the largest other logit
    zf = z[:, n_real:]
    real = y < n_real
    fy = (y - n_real).clamp(min=0).view(-1, 1)
    others_f = zf.scatter(1, fy, torch.where(real.view(-1, 1), zf.gather(1, fy), float("-inf")))
    fake_v, fake_i = others_f.max(dim=1)
    fake_wins = fake_v > best_real
    best_other = torch.where(fake_wins, fake_v, best_real)
    pred = torch.where(zy >= best_other, y, torch.where(fake_wins, fake_i + n_real, other))
    f1 = zf.amax(dim=1)
    f2 = zf.topk(2, dim=1).values[:, 1] if zf.shape[1] > 1 else torch.full_like(f1, float("-inf"))
    second = torch.maximum(torch.minimum(v1, f1), torch.maximum(v2, f2))  # second largest of all C logits
    margin = zy - best_other
    # Yang: z_y - second largest logit; when y is not the argmax, the second largest is >= z_y
    margin_yang = torch.where(pred == y, margin, zy - second)
    s = 1.0 + rest
    # cross-entropy over the real classes: lse_real - z_y = (v1 - z_y) + log s
    loss_real = (v1 - zy) + torch.log1p(rest)
    # a real-labelled sample's c-way scores read over the real classes only
    real_others = norm / s
    # cross-entropy over all C outputs, from m = the largest of all logits: (m - z_y) + log1p(sum of exp(z_k - m)
    # over every k but one top class)
    m = torch.maximum(v1, f1)
    fake_top = (f1 > v1).view(-1, 1)
    ef = (zf - m.view(-1, 1)).exp()
    fi1 = zf.argmax(dim=1, keepdim=True)
    rest_all = (torch.where(fake_top.squeeze(1), s * (v1 - m).exp(), rest)
                + ef.scatter(1, fi1, torch.where(fake_top, 0.0, ef.gather(1, fi1))).sum(dim=1))
    loss = (m - zy) + torch.log1p(rest_all)
    # a threshold sample: EL2N over all C outputs, p_k = exp(z_k - m) / (1 + rest_all)
    total = 1.0 + rest_all
    p_real = real_others * s * (v1 - m).exp() / total  # its target is not a real class: ||p over the real classes||
    p_fake_others = torch.linalg.vector_norm((others_f - m.view(-1, 1)).exp(), dim=1) / total
    el2n_fake = torch.hypot(torch.hypot(p_real, p_fake_others), -torch.expm1(-loss))
    return BatchCapture(
        margin=margin,
        margin_yang=margin_yang,
        prob=torch.where(real, (-loss_real).exp(), (-loss).exp()),
        pred=torch.where(real, pred_real, pred),
        other=other,
        loss=loss,
        el2n=torch.where(real, torch.hypot(real_others, -torch.expm1(-loss_real)), el2n_fake),
    )


def _values_all_real(xp: Any, y: Any, zy: Any, i1: Any, v1: Any, i2: Any, v2: Any, rest: Any, norm: Any) -> dict:
    """The captured values when every class is real, from the parts of ``_top2_softmax_*``; ``xp`` is numpy (the
    CPU) or torch (another device): the same expressions for both."""
    target_top = i1 == y
    other = xp.where(target_top, i2, i1)  # largest class other than the target
    best = xp.where(target_top, v2, v1)
    pred = xp.where(zy >= best, y, other)  # the target wins a tie: predicted
    margin = zy - best
    # Yang: z_y - second largest logit; when y is not the argmax, the second largest is >= z_y
    margin_yang = xp.where(pred == y, margin, zy - v2)
    # cross-entropy: lse - z_y = (v1 - z_y) + log s
    loss = (v1 - zy) + xp.log1p(rest)
    # EL2N^2 = sum_{k != y} p_k^2 + (1 - p_y)^2, each term without cancellation when p_y is near 1
    neg = -loss
    el2n = xp.hypot(norm / (1 + rest), -xp.expm1(neg))
    return {"margin": margin, "margin_yang": margin_yang, "prob": xp.exp(neg), "pred": pred, "other": other,
            "loss": loss, "el2n": el2n}


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
