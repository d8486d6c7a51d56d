"""Regenerate sample_data/digits_folder: 300 real scikit-learn digits as 32x32 PNGs, 12 deliberately misfiled.

Run from the repository root: python sample_data/make_sample_data.py
"""

from pathlib import Path

import numpy as np
from PIL import Image
from sklearn.datasets import load_digits

OUT = Path(__file__).parent / "digits_folder"
N_PER_CLASS = 30
N_WRONG = 12


def main() -> None:
    d = load_digits()
    rng = np.random.default_rng(2020)
    chosen = np.concatenate([rng.choice(np.flatnonzero(d.target == c), N_PER_CLASS, replace=False) for c in range(10)])
    wrong = set(rng.choice(chosen, N_WRONG, replace=False).tolist())
    lines = []
    for i in sorted(chosen.tolist()):
        true = int(d.target[i])
        label = (true + int(rng.integers(1, 10))) % 10 if i in wrong else true
        img = Image.fromarray(np.uint8(np.round(d.images[i] * 255 / 16))).resize((32, 32), Image.BILINEAR)
        path = OUT / str(label) / f"digit_{i:04d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        img.save(path, optimize=True)
        if i in wrong:
            lines.append(f"| {label}/digit_{i:04d}.png | {label} | {true} |")
    (Path(__file__).parent / "WRONG_LABELS.md").write_text(
        "# Deliberately wrong labels in digits_folder\n\n"
        "Each of these images sits in the folder of a class it does not show.\n\n"
        "| sample_id | folder (given label) | digit shown (true label) |\n|---|---|---|\n" + "\n".join(lines) + "\n"
    )


if __name__ == "__main__":
    main()
