"""Does cleaning help? `engine retrain` over noise settings and audit seeds (issue 19 item 3).

For each setting (default: 20% and 40% symmetric, 20% asymmetric noise on digits) and each audit seed, one default
audit (`python -m engine audit --dataset digits --noise R [--noise-kind asymmetric] --seed S`), then
`engine.training.retrain.retrain(run, policy)` for each policy: the noisy, cleaned and oracle labels each train the
run's recipe (learning rate annealed, no threshold samples, no forward correction) with `--train-seeds` seeds, scored
on the run's trusted split (20% per true class, held out of every training). Printed per run and policy: test
accuracy noisy / cleaned / oracle (mean over the training seeds, and each seed) and `recovered` = (cleaned - noisy) /
(oracle - noisy); per setting and policy the mean over audit seeds, with the target (>= 90%) marked met or not on the
mean and on the worst audit seed.

Usage: python bench/retrain.py [--seeds 3] [--settings sym20,sym40,asym20] [--policies relabel] [--train-seeds 3]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from bench._common import machine  # noqa: E402
from engine.training import audit  # noqa: E402
from engine.training.config import AuditConfig  # noqa: E402
from engine.training.retrain import retrain  # noqa: E402

SETTINGS = {"sym20": (0.2, "symmetric"), "sym40": (0.4, "symmetric"), "asym20": (0.2, "asymmetric")}
TARGET = 0.9


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, default=3, help="audit seeds 0..N-1")
    ap.add_argument("--settings", default=",".join(SETTINGS))
    ap.add_argument("--policies", default="relabel", help="comma-separated: remove, relabel, both")
    ap.add_argument("--train-seeds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print("machine:", machine(), flush=True)
    policies = args.policies.split(",")
    rows = []
    with tempfile.TemporaryDirectory() as root:
        for name in args.settings.split(","):
            noise, kind = SETTINGS[name]
            for seed in range(args.seeds):
                t0 = time.time()
                run, ds = audit.prepare(AuditConfig(dataset="digits", noise=noise, noise_kind=kind, seed=seed), root)
                audit.execute(run, ds)
                for policy in policies:
                    r = retrain(run, policy, seeds=args.train_seeds)
                    acc = r["accuracy"]
                    rec = r["recovered"]
                    rows.append((name, seed, policy, rec))
                    print(f"{name} audit seed {seed} {policy}: noisy {r['accuracy_noisy']:.3f} cleaned "
                          f"{r['accuracy_cleaned']:.3f} oracle {r['accuracy_oracle']:.3f} -> recovered "
                          f"{'n/a' if rec is None else f'{rec:.0%}'} (per training seed: noisy "
                          f"{' '.join(f'{a:.3f}' for a in acc['noisy'])}, cleaned "
                          f"{' '.join(f'{a:.3f}' for a in acc['cleaned'])}, oracle "
                          f"{' '.join(f'{a:.3f}' for a in acc['oracle'])}; removed {r['n_removed']}, relabelled "
                          f"{r['n_relabelled']} of which right {r['n_relabelled_right']})", flush=True)
                print(f"  ({time.time() - t0:.0f} s)", flush=True)
    print("\n| setting | policy | recovered per audit seed | mean | >= 90% (mean; worst) |\n|---|---|---|---|---|")
    for name in args.settings.split(","):
        for policy in policies:
            recs = [r for s, _, p, r in rows if s == name and p == policy]
            vals = [r for r in recs if r is not None]
            mean, worst = (float(np.mean(vals)), min(vals)) if vals else (float("nan"), float("nan"))
            print(f"| {name} | {policy} | {' / '.join('n/a' if r is None else f'{r:.0%}' for r in recs)} | {mean:.0%} | "
                  f"{'met' if mean >= TARGET else 'NOT met'}; {'met' if worst >= TARGET else 'NOT met'} |")


if __name__ == "__main__":
    main()
