"""DDU on digits: train on classes 0-7, treat 8-9 (and corrupted ID images) as out of distribution.

Equivalent to `python -m engine audit --dataset digits --holdout-classes 8,9 --corruptions noise,blur,invert`.
Prints AUROC / AUPRC of feature density, softmax entropy and max-softmax, and calibration.
Target: density above max-softmax on the held-out classes, as in the DDU paper.
Usage: python bench/ood.py [--epochs 30] [--seeds 0 1 2]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench._common import machine  # noqa: E402
from engine.training import audit  # noqa: E402
from engine.training.config import AuditConfig  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    args = ap.parse_args()
    print(f"machine: {machine()}")
    print("| seed | OoD set | AUROC density | AUROC entropy | AUROC max-softmax | AUPRC density | AUPRC max-softmax |")
    print("|---|---|---|---|---|---|---|")
    cal = []
    with tempfile.TemporaryDirectory() as tmp:
        for seed in args.seeds:
            cfg = AuditConfig(holdout_classes=[8, 9], corruptions=["noise", "blur", "invert"], epochs=args.epochs,
                              noise=0.0, seed=seed)
            run, ds = audit.prepare(cfg, tmp)
            s = audit.execute(run, ds)
            for name, e in s["ood"].items():
                print(f"| {seed} | {name} | {e['auroc_density']:.3f} | {e['auroc_entropy']:.3f} | "
                      f"{e['auroc_max_softmax']:.3f} | {e['auprc_density']:.3f} | {e['auprc_max_softmax']:.3f} |")
            cal.append(s["calibration"])
    for seed, c in zip(args.seeds, cal, strict=True):
        print(f"seed {seed}: held-out ID accuracy {c['accuracy']:.3f}, ECE {c['ece_before']:.3f} -> "
              f"{c['ece_after']:.3f} after temperature scaling (T = {c['temperature']:.2f})")


if __name__ == "__main__":
    main()
