"""Recorder overhead in a user's own loop: epoch time with ``rec.update`` / ``rec.end_epoch`` vs the same loop without.

The loop is a plain PyTorch loop (not ours): a small CNN on the digits (or random data of
``--classes`` classes), SGD, batches of 64. Same model init, data and batch order on both sides;
both loops train side by side, epoch by epoch in ABBA order, so drift of a shared machine hits both alike; per
repeat the summed epoch times are compared (the Recorder's periodic syncs included), then the median ratio over
repeats: wall time, and the CPU time of the process (all threads; insensitive to other processes).
The Recorder side includes writing (and syncing) each epoch's row of the memory-mapped arrays and the
status, the last epoch's included. Last, one more Recorder run times the Recorder's own methods
(``update`` and ``end_epoch`` in the loop's thread, the row writer in its background thread) with each
thread's CPU clock: its share of the epoch, measured directly rather than as a difference of two times.
The minor page faults of each side's epochs (``getrusage``: the loop's thread, and the whole process) show memory
that the allocator gave back to the OS and the next epoch faults in again.
Usage: python bench/recorder_overhead.py [--epochs 20] [--repeats 6] [--classes 10] [--device auto] [--threads N]
"""

from __future__ import annotations

import argparse
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench._common import machine  # noqa: E402
from engine.capture.recorder import Recorder  # noqa: E402
from engine.training.models import pick_device  # noqa: E402


def data(classes: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    if classes == 10:
        from sklearn.datasets import load_digits

        d = load_digits()
        return (torch.tensor(d.images[:, None] / 16.0, dtype=torch.float32, device=device),
                torch.tensor(d.target, device=device))
    g = torch.Generator().manual_seed(0)
    n = 4096
    return torch.rand(n, 1, 8, 8, generator=g).to(device), torch.randint(0, classes, (n,), generator=g).to(device)


class Loop:
    """A plain PyTorch training loop (not ours), one epoch at a time; with ``rec`` it calls the Recorder."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, classes: int, rec: Recorder | None):
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(32 * 64, 128),
                                 nn.ReLU(), nn.Linear(128, classes)).to(x.device)
        self.opt = torch.optim.SGD(self.net.parameters(), lr=0.05, momentum=0.9)
        self.g = torch.Generator().manual_seed(1)
        self.x, self.y, self.rec = x, y, rec
        self.sync = torch.cuda.synchronize if x.device.type == "cuda" else (lambda: None)

    def epoch(self, last: bool) -> tuple[float, float, int, int]:
        """Wall and CPU (this process, every thread) seconds of one epoch, and its minor page faults: of the loop's
        thread, and of the process (every thread: the Recorder's writer thread and torch's included)."""
        x, y, rec = self.x, self.y, self.rec
        self.sync()
        f0, p0 = faults()
        t0, c0 = time.perf_counter(), time.process_time()
        for b in torch.randperm(len(y), generator=self.g).to(x.device).split(64):
            yb = y[b]  # the batch's targets, as a loader gives them: the loss and the Recorder use the same tensor
            logits = self.net(x[b])
            loss = F.cross_entropy(logits, yb)
            self.opt.zero_grad()
            loss.backward()
            self.opt.step()
            if rec is not None:
                rec.update(b, logits, yb)
        if rec is not None:
            rec.end_epoch()
            if last:
                rec.sync()  # the last epoch's row on disk too
        self.sync()
        t, c = time.perf_counter() - t0, time.process_time() - c0
        f1, p1 = faults()
        return t, c, f1 - f0, p1 - p0


def faults() -> tuple[int, int]:
    """Minor page faults so far: of the calling thread (``RUSAGE_THREAD``, Linux) and of the whole process."""
    who = getattr(resource, "RUSAGE_THREAD", resource.RUSAGE_SELF)
    return resource.getrusage(who).ru_minflt, resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def epoch_seconds(x: torch.Tensor, y: torch.Tensor, classes: int, epochs: int, rec: Recorder | None
                  ) -> tuple[float, float]:
    """Wall and CPU (this process, every thread) seconds per epoch of one loop run alone."""
    loop = Loop(x, y, classes, rec)
    times = [loop.epoch(e == epochs - 1)[:2] for e in range(epochs)]
    return tuple(np.mean(times, axis=0))


def lockstep(x: torch.Tensor, y: torch.Tensor, classes: int, epochs: int, rec: Recorder) -> np.ndarray:
    """Both loops side by side, epoch by epoch (ABBA order per epoch, so drift of the machine hits both alike);
    returns ``(plain wall, plain CPU, recorder wall, recorder CPU, plain faults of the loop's thread, plain faults
    of the process, recorder thread faults, recorder process faults)`` summed over the epochs (sums, not medians:
    the Recorder's periodic syncs belong to its cost)."""
    plain, recorded = Loop(x, y, classes, None), Loop(x, y, classes, rec)
    total = np.zeros(8)
    for e in range(epochs):
        last = e == epochs - 1
        for side in ((plain, recorded) if e % 2 == 0 else (recorded, plain)):
            wall, cpu, fth, fproc = side.epoch(last)
            at = 0 if side is plain else 2
            total[at : at + 2] += wall, cpu
            total[4 + at : 4 + at + 2] += fth, fproc
    return total


def recorder_cpu(x: torch.Tensor, y: torch.Tensor, classes: int, epochs: int, rec: Recorder) -> dict[str, float]:
    """The Recorder's own CPU seconds per epoch, by method and thread (one more run, its methods timed with
    ``time.thread_time``: robust to other processes, unlike the difference of two epoch times)."""
    spent = {"update": 0.0, "end_epoch": 0.0, "writer thread": 0.0}

    def timed(name: str, f):
        def g(*args, **kwargs):
            t0 = time.thread_time()
            try:
                return f(*args, **kwargs)
            finally:
                spent[name] += time.thread_time() - t0
        return g

    rec.update = timed("update", rec.update)
    rec.end_epoch = timed("end_epoch", rec.end_epoch)
    rec._write_epoch = timed("writer thread", rec._write_epoch)
    epoch_seconds(x, y, classes, epochs, rec)
    return {k: v / epochs for k, v in spent.items()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=6)
    ap.add_argument("--classes", type=int, default=10)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = pick_device(args.device)
    x, y = data(args.classes, device)
    ids = [str(i) for i in range(len(y))]
    classes = [str(c) for c in range(args.classes)]
    sums = []
    with tempfile.TemporaryDirectory() as tmp:
        epoch_seconds(x, y, args.classes, 1, None)  # warm-up
        for _ in range(args.repeats):
            sums.append(lockstep(x, y, args.classes, args.epochs, Recorder(tmp, ids, y.cpu().numpy(), classes,
                                                                            args.epochs)))
        own = recorder_cpu(x, y, args.classes, args.epochs, Recorder(tmp, ids, y.cpu().numpy(), classes, args.epochs))
    sums = np.array(sums) / args.epochs
    faults_per_epoch = sums[:, 4:]
    sums = sums[:, :4]
    ratios = np.median(sums[:, 2:] / sums[:, :2], axis=0)  # per repeat, then the median over repeats
    plain, recd = np.median(sums[:, :2], axis=0), np.median(sums[:, 2:], axis=0)
    print(f"machine: {machine()}, device {device}")
    print(f"user loop: {len(y)} samples, {args.classes} classes, {args.epochs} epochs x {args.repeats} repeats, "
          "both loops in lockstep")
    print(f"epoch wall time  plain {plain[0] * 1000:.1f} ms   with Recorder {recd[0] * 1000:.1f} ms   "
          f"ratio {ratios[0]:.3f}  (target <= 1.05; per repeat: "
          + " ".join(f"{r:.3f}" for r in sums[:, 2] / sums[:, 0]) + ")")
    print(f"epoch CPU time   plain {plain[1] * 1000:.1f} ms   with Recorder {recd[1] * 1000:.1f} ms   "
          f"ratio {ratios[1]:.3f}  (per repeat: " + " ".join(f"{r:.3f}" for r in sums[:, 3] / sums[:, 1]) + ")")
    total = sum(own.values())
    print("the Recorder's own CPU time per epoch: " + ", ".join(f"{k} {v * 1000:.2f} ms" for k, v in own.items())
          + f"; total {total * 1000:.2f} ms = {total / plain[1]:.3f} of the plain epoch's CPU time")
    fp = faults_per_epoch
    print("minor page faults per epoch (loop's thread / process), per repeat: plain "
          + " ".join(f"{a:.0f}/{b:.0f}" for a, b in fp[:, :2]) + "   with Recorder "
          + " ".join(f"{a:.0f}/{b:.0f}" for a, b in fp[:, 2:]))

if __name__ == "__main__":
    main()
