"""Input pipeline: what it delivers and what it holds, and the audit loop's throughput, in memory vs streamed.

Builds an image folder of real photographs (random crops of scikit-learn's two sample photos,
saved as JPEG, one class per photo). Then, side by side in one run:

1. pipeline alone (no model), a fresh process per setting: images/s delivered by ``--loader
   memory`` (decoded once, then gathered) and ``--loader stream`` with 0, 1, ... worker processes,
   and the peak resident memory of the main process and of each worker: a streamed audit does not
   hold the decoded dataset;
2. training epochs on a subset resized to 32 px (the small CNN's home ground): images/s in memory
   and streamed, and, streamed, with capture vs the same loop without capture (ABBA order; the
   ratio targets >= 0.95).

Usage: python bench/input_pipeline.py [--n 50000] [--size 64] [--train-n 6000] [--device auto]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
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


def make_folder(root: Path, n: int, size: int, seed: int = 0) -> None:
    """``n`` random ``size`` crops (random scale, flips) of the two sklearn sample photos, as JPEG files."""
    from PIL import Image
    from sklearn.datasets import load_sample_images

    photos = load_sample_images()
    rng = np.random.default_rng(seed)
    for name in photos.filenames:
        (root / Path(name).stem).mkdir(parents=True, exist_ok=True)
    for i in range(n):
        c = i % 2
        img = photos.images[c]
        side = int(rng.integers(size, 3 * size))
        y, x = rng.integers(0, img.shape[0] - side), rng.integers(0, img.shape[1] - side)
        crop = img[y : y + side, x : x + side]
        if rng.random() < 0.5:
            crop = crop[:, ::-1]
        Image.fromarray(np.ascontiguousarray(crop)).resize((size, size), Image.BILINEAR).save(
            root / Path(photos.filenames[c]).stem / f"{i:06d}.jpg", quality=90)


def _vm_hwm_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def child(folder: str, loader: str, workers: int, device: str) -> None:
    """One pass of the pipeline over every image of ``folder`` in shuffled order (no model); prints JSON."""
    from engine.data.pipeline import fixed_slices

    dev = pick_device(device)
    ds = load_dataset(folder, lazy=True)
    t0 = time.perf_counter()
    src = make_source(ds.images, dev, loader, workers)
    order = np.random.default_rng(0).permutation(len(ds))
    slices = fixed_slices(len(ds), 128)
    total = 0
    for x in src.batches(order, slices):
        total += int(x[:, :, 0, 0].sum())  # touch every batch on the device
    if dev.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    it = getattr(src.loader, "_iterator", None) if hasattr(src, "loader") else None
    worker_mb = [_vm_hwm_mb(w.pid) for w in getattr(it, "_workers", [])]
    print(json.dumps({"loader": loader, "workers": workers, "seconds": seconds, "images_per_s": len(ds) / seconds,
                      "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                      "worker_peak_rss_mb": max(worker_mb) if worker_mb else 0.0}))
    src.close()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=50000)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--train-n", type=int, default=6000)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--child", nargs=4, metavar=("FOLDER", "LOADER", "WORKERS", "DEVICE"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args.child[0], args.child[1], int(args.child[2]), args.child[3])
    device = pick_device(args.device)
    cores = os.cpu_count() or 2
    settings = [("memory", max(1, cores - 1))] + [("stream", w) for w in sorted({0, 1, max(1, cores - 1)})]
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "crops"
        t0 = time.perf_counter()
        make_folder(folder, args.n, args.size)
        t_make = time.perf_counter() - t0
        t0 = time.perf_counter()
        load_dataset(str(folder), lazy=True)
        t_headers = time.perf_counter() - t0
        delivered = []
        for loader, w in settings:
            r = subprocess.run([sys.executable, __file__, "--child", str(folder), loader, str(w), args.device],
                               capture_output=True, text=True, check=True)
            delivered.append(json.loads(r.stdout.strip().splitlines()[-1]))

        small = load_dataset(str(folder), image_size=32, lazy=True)
        keep = np.random.default_rng(1).permutation(len(small))[: args.train_n]
        small = small.subset(np.sort(keep))
        cfg = AuditConfig(dataset=str(folder), epochs=args.epochs, batch_size=128, device=args.device)
        targets = torch.from_numpy(small.labels).to(device)
        run = create_run(Path(tmp) / "runs", cfg.to_dict(),
                         pd.DataFrame({"sample_id": small.sample_ids.astype(str)}), small.classes)

        def epoch_rate(source, capture: bool) -> float:
            return len(small) / seconds_per_epoch(cfg, source, targets, small.n_classes, run, capture)

        rows = []
        for loader, w in settings:
            with make_source(small.images, device, loader, workers=w) as src:
                epoch_rate(src, True)  # warm-up (workers start, caches warm)
                rates = {"plain": [], "capture": []}
                for r in range(args.repeats):  # ABBA
                    for cap in ((False, True) if r % 2 == 0 else (True, False)):
                        rates["capture" if cap else "plain"].append(epoch_rate(src, cap))
                rows.append((loader, w, float(np.median(rates["capture"])), float(np.median(rates["plain"]))))
    decoded_mb = args.n * args.size * args.size * 3 / 1e6
    print(f"machine: {machine()}, device {device}, {cores} cores")
    print(f"{args.n} JPEG crops {args.size}x{args.size} RGB ({decoded_mb:.0f} MB decoded); written in {t_make:.1f} s; "
          f"header check of every file {t_headers:.2f} s")
    print("1. pipeline alone, one shuffled pass over every image (fresh process each):")
    for d in delivered:
        print(f"  --loader {d['loader']:6s} {d['workers']} worker(s): {d['images_per_s']:8.0f} img/s "
              f"({'incl. decoding everything first' if d['loader'] == 'memory' else 'incl. worker start'}), "
              f"peak RSS main {d['peak_rss_mb']:.0f} MB"
              + (f", each worker {d['worker_peak_rss_mb']:.0f} MB" if d["loader"] == "stream" and d["workers"] else ""))
    print(f"2. training epochs, {args.train_n} of them at 32x32, model cnn, batch 128, "
          f"{args.epochs} epoch(s) x {args.repeats} repeats, images/s:")
    for loader, w, cap, plain in rows:
        print(f"  --loader {loader:6s} {w} worker(s): with capture {cap:7.0f}   plain {plain:7.0f}   "
              f"capture/plain {cap / plain:.3f} (target >= 0.95)")
    best = max(rows[1:], key=lambda r: r[2])
    print(f"  best stream ({best[1]} worker(s)) / memory, with capture: {best[2] / rows[0][2]:.3f}")


if __name__ == "__main__":
    main()
