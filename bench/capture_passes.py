"""Where the full capture's time goes at 1024 x 1000: each pass over the logits, timed alone (issue 18).

Prints, as thread CPU time per batch (median over ``--batches`` fresh batches x 3 rounds, each batch read from memory
as in ``bench/aum_update.py``):

1. the margin alone (``pleiss_margin``) and ``batch_capture`` (default and ``overwrite=True``);
2. the passes of the capture as ``_top2_softmax_cpu`` runs them, default (floored copy into the workspace) and with
   ``overwrite=True`` (no copy: the floor in place), with the one-rounding shift and scale (``addcmul``);
3. the alternatives tried and not used: shift then scale in two passes; the shift written into the workspace with
   the second argmax on the shifted values and no floor (inexact and slow on wide rows, see 4); the passes in
   L2-sized blocks of rows;
4. ``np.exp2`` over arguments in [-43, 0] (what the floor keeps) and wider, with and without flush-to-zero
   (``torch.set_flush_denormal``), and ``np.exp`` (no scale pass needed).

Usage: python bench/capture_passes.py [--batches 60]   (run with OMP_NUM_THREADS=1)
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from engine.capture import dynamics as dyn  # noqa: E402

B, C = 1024, 1000
L = np.float32(dyn.LOG2E)
tt = time.thread_time_ns


class Laps:
    """Thread CPU time of consecutive statements, accumulated per name into ``table[(pipeline, name)]``."""

    def __init__(self, table: dict, name: str) -> None:
        self.table, self.name, self.acc, self.t = table, name, defaultdict(int), tt()

    def lap(self, key: str) -> None:
        t = tt()
        self.acc[key] += t - self.t
        self.t = tt()

    def done(self) -> None:
        for k, v in self.acc.items():
            self.table[(self.name, k)].append(v / 1000)
        self.table[(self.name, "total")].append(sum(self.acc.values()) / 1000)


def passes(x: torch.Tensor, table: dict, mode: str, work: np.ndarray, rows: int = B) -> None:
    """One batch through the capture's passes (``mode``: default, overwrite, two-step, shifted), ``rows`` at a time."""
    tm = Laps(table, mode if rows == B else f"{mode}, blocks of {rows} rows")
    row = torch.full((1, C), float(L))
    for lo_row in range(0, B, rows):
        xt = x[lo_row : lo_row + rows]
        xn = xt.numpy()
        w = xn if mode == "overwrite" else work[: len(xn)]
        wt = torch.from_numpy(w)
        flat = w.reshape(-1)
        base = np.arange(0, w.size, C)
        i1 = xn.argmax(axis=1)
        tm.lap("argmax of the logits (from memory)")
        top = base + i1
        v1 = xn.reshape(-1)[top]
        lo = v1 - np.float32(dyn.SOFTMAX_FLOOR)
        tm.lap("per-row operations")
        if mode == "shifted":  # copy and shift in one pass; no floor (inexact: z - top can tie two logits)
            torch.sub(xt, torch.from_numpy(v1).view(-1, 1), out=wt)
            tm.lap("shift into the workspace")
            flat[top] = -np.inf
            i2 = w.argmax(axis=1)
            flat[top] = 0.0
            tm.lap("second argmax")
            np.multiply(w, L, out=w)
            tm.lap("scale")
        else:
            if mode == "overwrite":
                flat[top] = -np.inf
                i2 = w.argmax(axis=1)
                tm.lap("second argmax")
                torch.maximum(wt, torch.from_numpy(lo).view(-1, 1), out=wt)
                tm.lap("floor in place")
            else:
                torch.maximum(xt, torch.from_numpy(lo).view(-1, 1), out=wt)
                tm.lap("floored copy")
                flat[top] = lo
                i2 = w.argmax(axis=1)
                tm.lap("second argmax")
            flat[top] = v1
            if mode == "two-step":
                wt.sub_(torch.from_numpy(v1).view(-1, 1))
                tm.lap("shift")
                np.multiply(w, L, out=w)
                tm.lap("scale")
            else:
                torch.addcmul(torch.from_numpy(v1 * -L).view(-1, 1), wt, row, out=wt)
                tm.lap("shift and scale (one addcmul)")
        v2 = flat[base + i2]
        tm.lap("per-row operations")
        np.exp2(w, out=w)
        tm.lap("exp2")
        flat[top] = 0.0
        tm.lap("per-row operations")
        wt.sum(dim=1)
        tm.lap("row sum")
        np.vecdot(w, w)
        tm.lap("row sum of squares")
        del v2
    tm.done()


def exp2_ranges() -> None:
    rng = np.random.default_rng(0)
    n = 1 << 20
    out = np.empty(n, np.float32)

    def med(f, reps: int = 30) -> float:
        v = []
        for _ in range(reps):
            t = tt()
            f()
            v.append((tt() - t) / 1000)
        return float(np.median(v))

    print("\nnp.exp2 of 1M float32 arguments (us), by range, flush-to-zero off / on; np.exp of the same / log2 e:")
    for lo in (-43.3, -125.0, -150.0, -300.0):
        src = rng.uniform(lo, 0, n).astype(np.float32)
        nat = src * np.float32(1 / L)
        got = []
        for ftz in (False, True):
            torch.set_flush_denormal(ftz)
            got.append(med(lambda src=src: np.exp2(src, out=out)))
        torch.set_flush_denormal(False)
        print(f"  [{lo:6.1f}, 0]  exp2 {got[0]:7.0f} / {got[1]:7.0f}   exp {med(lambda nat=nat: np.exp(nat, out=out)):6.0f}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batches", type=int, default=60)
    args = ap.parse_args()
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    data = [(torch.randn(B, C, generator=g), torch.randint(0, C, (B,), generator=g)) for _ in range(args.batches)]
    work = dyn._workspace(B, C)  # the capture's own (64-byte aligned) workspace
    print(f"addcmul rounds once on this build: {dyn._addcmul_rounds_once()}")
    table: dict = defaultdict(list)
    for _ in range(3):
        for x, y in data:
            t = tt()
            dyn.pleiss_margin(x, y)
            table[("whole calls", "pleiss_margin")].append((tt() - t) / 1000)
        for x, y in data:
            t = tt()
            dyn.batch_capture(x, y)
            table[("whole calls", "batch_capture")].append((tt() - t) / 1000)
        copies = [x.clone() for x, _ in data]
        for xc, (_, y) in zip(copies, data, strict=True):
            t = tt()
            dyn.batch_capture(xc, y, overwrite=True)
            table[("whole calls", "batch_capture(overwrite=True)")].append((tt() - t) / 1000)
        for mode, rows in [("default", B), ("overwrite", B), ("two-step", B), ("shifted", B), ("default", 256),
                           ("default", 128)]:
            copies = [x.clone() for x, _ in data] if mode == "overwrite" else [x for x, _ in data]
            for x in copies:
                passes(x, table, mode, work, rows)
    names = list(dict.fromkeys(n for n, _ in table))
    for n in names:
        print(f"\n{n} (us per 1024 x 1000 batch, median):")
        for (m, k), v in table.items():
            if m == n:
                print(f"  {k:38s} {np.median(v):7.0f}")
    exp2_ranges()


if __name__ == "__main__":
    main()
