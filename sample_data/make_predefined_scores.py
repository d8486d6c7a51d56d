"""Regenerate sample_data/predefined_scores.csv: two scores of the demo's digits computed without any network.

The labels are those of the default demo audit (digits, 10% symmetric noise, seed 0), so the file
joins to that run by sample_id. Run from the repository root: python sample_data/make_predefined_scores.py
"""

from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.neighbors import NearestNeighbors

from engine.data.datasets import load_digits_dataset


def main() -> None:
    ds = load_digits_dataset(noise=0.1, noise_kind="symmetric", seed=0)
    x = ds.images.reshape(len(ds), -1).astype(np.float64) / 255.0
    nn = NearestNeighbors(n_neighbors=11).fit(x)
    _, idx = nn.kneighbors(x)
    neighbour_labels = ds.labels[idx[:, 1:]]
    knn_disagreement = (neighbour_labels != ds.labels[:, None]).mean(axis=1)
    means = np.stack([x[ds.labels == c].mean(axis=0) for c in range(10)])
    distance = np.linalg.norm(x - means[ds.labels], axis=1)
    pd.DataFrame({
        "sample_id": ds.sample_ids,
        "label": ds.labels,
        "knn_disagreement": knn_disagreement.round(4),
        "pixel_distance_to_class_mean": distance.round(4),
    }).to_csv(Path(__file__).parent / "predefined_scores.csv", index=False)


if __name__ == "__main__":
    main()
