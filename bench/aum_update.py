"""Margin + AUM update cost: our vectorised capture vs the `aum` package's AUMCalculator.update.

Both get the same batches of logits, targets and sample ids. Like for like: the Pleiss margin
of the batch written into the epoch's per-sample row (the run stores margins per epoch and AUM
is their mean, computed once at the end) vs AUMCalculator.update (compressed mode, running
sums in Python dicts). Also shown: our full capture (``dynamics.batch_capture``: margin, Yang
margin, p(y), pred, other, loss, EL2N) with running sums, and its cost as a multiple of the
margin alone (target <= 3x at 1,000 classes), the same capture with ``overwrite=True`` (what a caller that copied the
logits into a buffer of its own, like the Recorder's chunk buffer, may pass: the capture then works in that buffer;
the copies are made before the timed pass, from the same batches, and are not timed), and beside them the floor of
any capture that gives p(y), loss or EL2N: one exponential of every logit, alone. Each of our four sides is timed
``--repeats`` times
in rotating order and the fastest pass over all batches is kept; times are this thread's CPU time
(``time.thread_time``), so run with ``--threads 1`` on a shared machine.
Usage: python bench/aum_update.py [--repeats 5] [--threads N]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench._common import machine  # noqa: E402
from engine.capture.dynamics import batch_capture, pleiss_margin  # noqa: E402


def clock() -> float:
    """CPU time of this thread: on a shared machine, other processes' load does not count (with --threads 1 every
    side runs in this thread)."""
    return time.thread_time()


def bench(batch: int, classes: int, steps: int, repeats: int) -> tuple[float, float, float, float, float]:
    from aum import AUMCalculator

    g = torch.Generator().manual_seed(0)
    n = batch * 8
    data = [(torch.randn(batch, classes, generator=g), torch.randint(0, classes, (batch,), generator=g),
             torch.randint(0, n, (batch,), generator=g)) for _ in range(steps)]
    sums = torch.zeros(n)
    counts = torch.zeros(n)
    epoch_row = torch.full((n,), float("nan"))

    def full_capture() -> float:
        t0 = clock()
        for logits, y, ids in data:
            c = batch_capture(logits, y)
            sums.index_add_(0, ids, c.margin)
            counts.index_add_(0, ids, torch.ones_like(c.margin))
        return (clock() - t0) / steps

    def full_overwrite() -> float:
        copies = [logits.clone() for logits, _, _ in data]  # the caller's own buffers, not timed
        t0 = clock()
        for (_, y, ids), logits in zip(data, copies, strict=True):
            c = batch_capture(logits, y, overwrite=True)
            sums.index_add_(0, ids, c.margin)
            counts.index_add_(0, ids, torch.ones_like(c.margin))
        return (clock() - t0) / steps

    def margin_only() -> float:
        t0 = clock()
        for logits, y, ids in data:
            epoch_row[ids] = pleiss_margin(logits, y)  # what the loop stores; AUM = mean of rows at the end
        return (clock() - t0) / steps

    buf = torch.empty(batch, classes)

    def one_exp() -> float:  # the floor of any capture with p(y), loss or EL2N: one exponential of every logit
        t0 = clock()
        for logits, _, _ in data:
            np.exp2(logits.numpy(), out=buf.numpy())  # the fastest exp on this CPU (as in batch_capture)
        return (clock() - t0) / steps

    full, ours, exp, over = [], [], [], []
    sides = [(margin_only, ours), (full_capture, full), (one_exp, exp), (full_overwrite, over)]
    for r in range(repeats):  # rotate which side goes first
        for f, out in sides[r % 4 :] + sides[: r % 4]:
            out.append(f())
    full, ours, exp, over = min(full), min(ours), min(exp), min(over)
    with tempfile.TemporaryDirectory() as tmp:
        calc = AUMCalculator(tmp, compressed=True)
        t0 = clock()
        for logits, y, ids in data:
            calc.update(logits, y, ids.tolist())
        ref = (clock() - t0) / steps
    return ours, full, ref, exp, over


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"machine: {machine()}")
    for batch, classes, steps in [(512, 10, 300), (1024, 1000, 100)]:
        ours, full, ref, exp, over = bench(batch, classes, steps, args.repeats)
        print(f"{batch} x {classes}: aum.AUMCalculator.update {ref * 1e6:.0f} us/batch | ours, margin + AUM sums "
              f"(like for like: margin into the epoch row) {ours * 1e6:.0f} us -> {ref / ours:.1f}x faster"
              + ("  (target >= 50x)" if classes == 10 else "")
              + f" | ours, full capture (margin, Yang, p(y), pred, other, loss, EL2N) {full * 1e6:.0f} us -> "
              f"{ref / full:.1f}x faster than aum; full / margin alone = {full / ours:.2f}"
              + ("  (target <= 3)" if classes == 1000 else "")
              + f" | full capture with overwrite=True {over * 1e6:.0f} us = {over / ours:.2f} x margin"
              + f" | floor: one exp2 of every logit alone {exp * 1e6:.0f} us = {exp / ours:.2f} x margin")

if __name__ == "__main__":
    main()
