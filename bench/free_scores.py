"""All free scores (from the captured dynamics) for N samples x E epochs, one training pass.

Usage: python bench/free_scores.py [--samples 1000000] [--epochs 30]  (target: under 10 s at 1M x 30)
"""

from __future__ import annotations

import argparse
import resource
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.render_pages import make_run  # noqa: E402
from engine.scores.registry import compute_scores  # noqa: E402
from engine.store.runs import Run  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--samples", type=int, default=1_000_000)
    ap.add_argument("--epochs", type=int, default=30)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        run = Run(make_run(Path(tmp), args.samples, args.epochs, passes=1, do_finalize=False))
        t0 = time.perf_counter()
        table, _ = compute_scores(run)
        took = time.perf_counter() - t0
    print(f"free scores ({', '.join(c for c in table.columns if c not in ('sample_id',))}) for "
          f"{args.samples:,} x {args.epochs} epochs: {took:.1f} s (target < 10 s); "
          f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB")


if __name__ == "__main__":
    main()
