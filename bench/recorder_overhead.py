"""Recorder overhead in a user's own loop: epoch time with ``rec.update`` / ``rec.end_epoch`` vs the same loop without.

The loop is a plain PyTorch loop (not ours): a small CNN on the digits (or random data of
``--classes`` classes), SGD, batches of 64. Same model init, data and batch order on both sides;
runs alternate in ABBA order so drift hits both alike, and the median epoch time is compared: wall
time, and the CPU time of the process (all threads; insensitive to other processes on a shared machine).
The Recorder side includes writing (and syncing) each epoch's row of the memory-mapped arrays and the
status, the last epoch's included. Last, one more Recorder run times the Recorder's own methods
(``update`` and ``end_epoch`` in the loop's thread, the row writer in its background thread) with each
thread's CPU clock: its share of the epoch, measured directly rather than as a difference of two times.
Usage: python bench/recorder_overhead.py [--epochs 5] [--repeats 4] [--classes 10] [--device auto] [--threads N]
"""

from __future__ import annotations

import argparse
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


def epoch_seconds(x: torch.Tensor, y: torch.Tensor, classes: int, epochs: int, rec: Recorder | None
                  ) -> tuple[float, float]:
    """Wall and CPU (this process, every thread) seconds per epoch."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(32 * 64, 128), nn.ReLU(),
                        nn.Linear(128, classes)).to(x.device)
    opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
    g = torch.Generator().manual_seed(1)
    sync = torch.cuda.synchronize if x.device.type == "cuda" else (lambda: None)
    sync()
    t0, c0 = time.perf_counter(), time.process_time()
    for _ in range(epochs):
        for b in torch.randperm(len(y), generator=g).to(x.device).split(64):
            logits = net(x[b])
            loss = F.cross_entropy(logits, y[b])
            opt.zero_grad()
            loss.backward()
            opt.step()
            if rec is not None:
                rec.update(b, logits.detach(), y[b])
        if rec is not None:
            rec.end_epoch()
    if rec is not None:
        rec.sync()  # the last epoch's row on disk too
    sync()
    return (time.perf_counter() - t0) / epochs, (time.process_time() - c0) / epochs


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
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=4)
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
    times: dict[str, list[tuple[float, float]]] = {"plain": [], "recorder": []}
    with tempfile.TemporaryDirectory() as tmp:
        epoch_seconds(x, y, args.classes, 1, None)  # warm-up
        for r in range(args.repeats):  # ABBA: neither side always runs first
            for with_rec in ((False, True) if r % 2 == 0 else (True, False)):
                rec = Recorder(tmp, ids, y.cpu().numpy(), classes, args.epochs) if with_rec else None
                times["recorder" if with_rec else "plain"].append(epoch_seconds(x, y, args.classes, args.epochs, rec))
        own = recorder_cpu(x, y, args.classes, args.epochs, Recorder(tmp, ids, y.cpu().numpy(), classes, args.epochs))
    plain, recd = np.median(times["plain"], axis=0), np.median(times["recorder"], axis=0)
    print(f"machine: {machine()}, device {device}")
    print(f"user loop: {len(y)} samples, {args.classes} classes, {args.epochs} epochs x {args.repeats} repeats")
    print(f"epoch wall time  plain {plain[0] * 1000:.1f} ms   with Recorder {recd[0] * 1000:.1f} ms   "
          f"ratio {recd[0] / plain[0]:.3f}  (target <= 1.05)")
    print(f"epoch CPU time   plain {plain[1] * 1000:.1f} ms   with Recorder {recd[1] * 1000:.1f} ms   "
          f"ratio {recd[1] / plain[1]:.3f}")
    total = sum(own.values())
    print("the Recorder's own CPU time per epoch: " + ", ".join(f"{k} {v * 1000:.2f} ms" for k, v in own.items())
          + f"; total {total * 1000:.2f} ms = {total / plain[1]:.3f} of the plain epoch's CPU time")

if __name__ == "__main__":
    main()
