"""Capture overhead: epoch time of the audit loop with per-sample capture vs the same loop without.

Same model, data, seed and batches; runs interleaved in ABBA order so drift hits both alike.
The capture side includes writing each epoch's row of the memory-mapped arrays to disk.
Wall time and the process's CPU time (every thread) are both reported; the CPU time is far less affected by
other processes on a shared machine.
Usage: python bench/capture_overhead.py [--epochs 10] [--repeats 3] [--dataset digits] [--device auto] [--threads N]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench._common import machine, seconds_per_epoch  # noqa: E402
from engine.data.datasets import load_dataset  # noqa: E402
from engine.data.pipeline import make_source  # noqa: E402
from engine.store.runs import create_run  # noqa: E402
from engine.training.config import AuditConfig  # noqa: E402
from engine.training.models import pick_device  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dataset", default="digits")
    ap.add_argument("--model", default="cnn")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = AuditConfig(dataset=args.dataset, epochs=args.epochs, model=args.model, device=args.device)
    ds = load_dataset(cfg.dataset)
    device = pick_device(cfg.device)
    source = make_source(ds.images, device, "memory")
    targets = torch.from_numpy(ds.labels).to(device)
    n = len(ds)
    with tempfile.TemporaryDirectory() as tmp:
        run = create_run(tmp, cfg.to_dict(), pd.DataFrame({"sample_id": ds.sample_ids.astype(str)}), ds.classes)
        times = {"plain": [], "capture": []}

        def timed(capture: bool) -> tuple[float, float]:
            """Wall and CPU (this process, every thread: insensitive to other processes) seconds per epoch."""
            c0 = time.process_time()
            wall = seconds_per_epoch(cfg, source, targets, ds.n_classes, run, capture)
            return wall, (time.process_time() - c0) / cfg.epochs

        timed(False)  # warm-up
        for r in range(args.repeats):  # ABBA order: neither side always runs first
            for capture in ((False, True) if r % 2 == 0 else (True, False)):
                times["capture" if capture else "plain"].append(timed(capture))
    plain, cap = np.median(times["plain"], axis=0), np.median(times["capture"], axis=0)
    print(f"machine: {machine()}, device {device}")
    print(f"dataset {args.dataset} ({n} samples), model {args.model}, {args.epochs} epochs x {args.repeats} repeats")
    print(f"epoch wall time  plain {plain[0] * 1000:.1f} ms   with capture {cap[0] * 1000:.1f} ms   "
          f"ratio {cap[0] / plain[0]:.3f}  (target <= 1.05)")
    print(f"epoch CPU time   plain {plain[1] * 1000:.1f} ms   with capture {cap[1] * 1000:.1f} ms   "
          f"ratio {cap[1] / plain[1]:.3f}")


if __name__ == "__main__":
    main()
