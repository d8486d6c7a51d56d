"""Logits from anywhere: save per-epoch outputs of any model, then turn them into a run with import-logits.

    python examples/import_saved_logits.py [--out runs] [--epochs 12]

The "other framework" here is scikit-learn: a logistic-regression classifier trained by SGD on the
digits with 20% of the labels flipped, its decision function over the training set saved after
every epoch (``logits.npy``, shaped (epochs, samples, classes)) with ``labels.csv``
(``sample_id,label``). The same two files from PyTorch Lightning, JAX or Keras import the same way:

    python -m engine import-logits --logits logits.npy --labels labels.csv --out runs
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd


def save_outputs(folder: Path, epochs: int, seed: int = 1) -> np.ndarray:
    """Train, save ``logits.npy`` and ``labels.csv`` in ``folder``; returns which labels were flipped."""
    from sklearn.datasets import load_digits
    from sklearn.linear_model import SGDClassifier

    rng = np.random.default_rng(seed)
    d = load_digits()
    x, y = d.data / 16.0, d.target.copy()
    flip = rng.random(len(y)) < 0.2
    y[flip] = (y[flip] + rng.integers(1, 10, flip.sum())) % 10
    clf = SGDClassifier(loss="log_loss", alpha=1e-3, random_state=0)
    per_epoch = []
    for _ in range(epochs):
        clf.partial_fit(x, y, classes=np.arange(10))
        per_epoch.append(clf.decision_function(x))  # raw scores (logits) of every training sample
    folder.mkdir(parents=True, exist_ok=True)
    np.save(folder / "logits.npy", np.stack(per_epoch).astype(np.float32))
    pd.DataFrame({"sample_id": [f"digit-{i:04d}" for i in range(len(y))], "label": y}).to_csv(
        folder / "labels.csv", index=False)
    return flip


def main(argv: list[str] | None = None) -> Path:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs", help="runs folder")
    ap.add_argument("--epochs", type=int, default=12)
    args = ap.parse_args(argv)
    saved = Path(args.out) / "saved-outputs"
    flip = save_outputs(saved, args.epochs)
    root = Path(__file__).resolve().parent.parent
    cmd = [sys.executable, "-m", "engine", "import-logits", "--logits", str(saved / "logits.npy"),
           "--labels", str(saved / "labels.csv"), "--out", str(args.out)]
    print("$", " ".join(cmd[1:]), flush=True)
    subprocess.run(cmd, check=True, cwd=root)
    from engine.store.runs import list_runs

    run = next(r for r in list_runs(args.out) if r.config().get("origin") == "imported logits")
    ranked = run.scores()["rank"].to_numpy()
    top = ranked <= flip.sum()
    print(f"{(top & flip).sum()} of the {flip.sum()} flipped labels are among the {flip.sum()} most suspicious samples")
    return run.path


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    main()
