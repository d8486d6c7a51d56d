"""Detection quality on digits with known flipped labels, ours beside cleanlab and the paper's rule.

For each setting (20% / 40% symmetric, 20% asymmetric noise), one default audit
(`python -m engine audit --dataset digits --noise R [--noise-kind asymmetric]`) gives:
  * ours (auto cut-off): precision / recall / F1, and AUROC of the AUM ranking;
  * the paper's rule on the same run's AUM (Pleiss et al. 2020; the aum package's procedure:
    threshold samples, 99th percentile, flagged in both threshold runs);
  * cleanlab.filter.find_label_issues on 5-fold out-of-sample probabilities from the same
    network, settings and epochs (no threshold samples), with the same augmentation.
Also prints the wall time of the default demo audit (digits, 10% noise).
Usage: python bench/detection.py [--epochs 30]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench._common import machine  # noqa: E402
from engine.data.datasets import load_dataset  # noqa: E402
from engine.review.policy import Policy, decision_for  # noqa: E402
from engine.scores.extra import out_of_sample_probs  # noqa: E402
from engine.scores.metrics import detection_metrics  # noqa: E402
from engine.scores.registry import compute_scores, oriented  # noqa: E402
from engine.training import audit  # noqa: E402
from engine.training.config import AuditConfig  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--epochs", type=int, default=30)
    args = ap.parse_args()
    from cleanlab.filter import find_label_issues

    print(f"machine: {machine()}")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        run, ds = audit.prepare(AuditConfig(noise=0.1, epochs=args.epochs), tmp)
        audit.execute(run, ds)
        demo_wall = time.perf_counter() - t0
        for noise, kind in [(0.2, "symmetric"), (0.4, "symmetric"), (0.2, "asymmetric")]:
            cfg = AuditConfig(noise=noise, noise_kind=kind, epochs=args.epochs)
            run, ds = audit.prepare(cfg, tmp)
            audit.execute(run, ds)
            s = run.summary()
            errors = ds.labels != ds.true_labels
            table, info = compute_scores(run)
            rule, _ = decision_for(run, table, info, Policy("threshold"))  # the paper's rule, not saved
            paper = detection_metrics(rule.flagged, oriented(table["aum"].to_numpy(), "aum"), errors)
            oos_cfg = AuditConfig(noise=noise, noise_kind=kind, epochs=args.epochs, threshold_samples=False)
            oos_ds = load_dataset(oos_cfg.dataset, noise, kind, oos_cfg.seed)
            probs, labels = out_of_sample_probs(oos_cfg, oos_ds, folds=5), oos_ds.labels
            issues = find_label_issues(labels, probs)
            cl = detection_metrics(issues, 1 - probs[np.arange(len(labels)), labels], errors)
            rows.append((f"{noise:.0%} {kind}", s, paper, cl))
    print(f"default demo audit (digits, 10% noise, {args.epochs} epochs x 2 passes) wall time: {demo_wall:.1f} s")
    print("| setting | ours AUROC | ours P / R / F1 (auto) | paper rule P / R / F1 | cleanlab AUROC | cleanlab P / R / F1 |")
    print("|---|---|---|---|---|---|")
    for name, s, p, c in rows:
        print(f"| {name} | {s['auroc']:.4f} | {s['precision']:.3f} / {s['recall']:.3f} / {s['f1']:.3f} | "
              f"{p['precision']:.3f} / {p['recall']:.3f} / {p['f1']:.3f} | {c['auroc']:.4f} | "
              f"{c['precision']:.3f} / {c['recall']:.3f} / {c['f1']:.3f} |")


if __name__ == "__main__":
    main()
