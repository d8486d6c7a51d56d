"""Out-of-distribution evaluation of an audit: the held-out sets, the final model's outputs on them, DDU.

``split(ds, cfg)`` is the one place that turns a loaded dataset into the training set and the
evaluation sets (held-out classes, an ID evaluation split, another folder, corruptions); every
code path that loads a run's dataset goes through it, so they all see the same samples.
``evaluate(run, ...)`` fits class-conditional Gaussians on the training features and writes
``ood/results.npz`` (per-set log densities, entropies, max-softmax), ``ood/report.json`` (AUROC /
AUPRC per set, calibration before/after temperature scaling, risk-coverage) and returns the
training samples' ``ood_density`` / ``entropy`` scores.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass, field

import numpy as np

from . import ood
from .config import AuditConfig, ConfigError
from .datasets import FileImages, IndexedDataset, load_folder, take
from .runs import Run, atomic_write_bytes, atomic_write_json


@dataclass
class EvalSets:
    id_images: np.ndarray | FileImages | None = None  # held-out in-distribution images (uint8 NHWC)
    id_labels: np.ndarray | None = None  # their labels (true labels when known)
    ood: dict[str, np.ndarray | FileImages | Corrupted] = field(default_factory=dict)  # name -> uint8 NHWC images


def _match_shape(images: np.ndarray, like: np.ndarray) -> np.ndarray:
    if images.shape[-1] == like.shape[-1]:
        return images
    if like.shape[-1] == 1:
        return images.mean(axis=-1, keepdims=True).astype(np.uint8)
    return np.repeat(images, like.shape[-1], axis=-1)


def corrupt(images: np.ndarray, kind: str, seed: int = 0) -> np.ndarray:
    """Synthetic shift of ID images: ``noise`` (Gaussian, sigma = 0.5 of the range), ``blur`` (Gaussian,
    sigma = 1/8 of the side), ``invert`` (255 - x)."""
    x = images.astype(np.float64)
    if kind == "noise":
        x = x + np.random.default_rng(seed).normal(0, 127.5, x.shape)
    elif kind == "blur":
        from scipy.ndimage import gaussian_filter

        s = max(1.0, images.shape[1] / 8)
        x = gaussian_filter(x, sigma=(0, s, s, 0))
    elif kind == "invert":
        x = 255.0 - x
    else:
        raise ConfigError(f"unknown corruption {kind!r}")
    return np.clip(np.round(x), 0, 255).astype(np.uint8)


class Corrupted:
    """``corrupt`` applied on demand to images read on demand (a uint8 NHWC array-like, for ``FileImages``).

    Noise is seeded per image (``seed``, index), so it does not depend on how the set is batched.
    """

    def __init__(self, base: FileImages, kind: str, seed: int):
        self.base, self.kind, self.seed = base, kind, seed
        self.shape, self.nbytes = base.shape, base.nbytes

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, key) -> np.ndarray:
        if isinstance(key, (int, np.integer)):
            return self[np.array([key])][0]
        idx = np.atleast_1d(np.arange(len(self.base))[key])
        return np.stack([corrupt(self.base[int(i) : int(i) + 1], self.kind, self.seed * 1_000_003 + int(i))[0] for i in idx])


def split(ds: IndexedDataset, cfg: AuditConfig) -> tuple[IndexedDataset, EvalSets]:
    """Training set and evaluation sets for ``cfg`` (holdout classes, ID eval split, OoD folder, corruptions)."""
    sets = EvalSets()
    if cfg.holdout_classes:
        bad = [c for c in cfg.holdout_classes if not 0 <= c < ds.n_classes]
        if bad or len(set(cfg.holdout_classes)) >= ds.n_classes - 1:
            raise ConfigError(f"--holdout-classes {cfg.holdout_classes}: give class indices in 0..{ds.n_classes - 1}, "
                              "leaving at least 2 classes to train on")
        basis = ds.true_labels if ds.true_labels is not None else ds.labels
        out = np.isin(basis, cfg.holdout_classes)
        sets.ood["held-out classes " + ",".join(ds.classes[c] for c in cfg.holdout_classes)] = take(ds.images, out)
        keep = ~out & ~np.isin(ds.labels, cfg.holdout_classes)  # a kept digit labelled as a held-out class: dropped
        kept_classes = [k for k in range(ds.n_classes) if k not in cfg.holdout_classes]
        remap = np.full(ds.n_classes, -1)
        remap[kept_classes] = np.arange(len(kept_classes))
        ds = ds.subset(keep)
        ds.labels = remap[ds.labels]
        if ds.true_labels is not None:
            ds.true_labels = remap[ds.true_labels]
        ds.classes = [ds.classes[k] for k in kept_classes]
        ds.info = ds.info | {"holdout_classes": cfg.holdout_classes, "n_noisy": int((ds.labels != ds.true_labels).sum())
                             if ds.true_labels is not None else None}
    share = cfg.eval_share
    if share > 0:
        rng = np.random.default_rng(cfg.seed + 202)
        held = np.zeros(len(ds), dtype=bool)
        for k in range(ds.n_classes):  # stratified by given label
            members = np.flatnonzero(ds.labels == k)
            held[rng.choice(members, int(round(share * members.size)), replace=False)] = True
        truth = ds.true_labels if ds.true_labels is not None else ds.labels
        sets.id_images, sets.id_labels = take(ds.images, held), truth[held]
        ds = ds.subset(~held)
        for kind in cfg.corruptions or []:
            lazy = isinstance(sets.id_images, FileImages)
            sets.ood[f"corrupted: {kind}"] = (Corrupted(sets.id_images, kind, cfg.seed) if lazy
                                              else corrupt(sets.id_images, kind, cfg.seed))
    if cfg.ood_folder:
        other = load_folder(cfg.ood_folder, image_size=ds.images.shape[1])
        sets.ood[f"folder {other.name}"] = _match_shape(other.images, ds.images)
    return ds, sets


def final_outputs(run: Run, cfg: AuditConfig, source, n_out: int, n_real: int,
                  batch: int = 512) -> tuple[np.ndarray, np.ndarray]:
    """Penultimate features and real-class logits of the last pass's final model on an image ``source``."""
    import torch

    from .pipeline import sequential
    from .training import load_final_model

    model = load_final_model(run.path / "checkpoints", cfg, source.channels, n_out, source.device)
    feats, logits = [], []
    with torch.inference_mode():
        for _, x in sequential(source, batch):
            f = model.features((x.float() / 255.0 - source.mean) / source.std)
            feats.append(f.float().cpu())
            logits.append(model.head(f).float().cpu()[:, :n_real])
    return torch.cat(feats).numpy(), torch.cat(logits).numpy()


def _outputs_on(run: Run, cfg: AuditConfig, images, train_source, n_out: int, n_real: int):
    """``final_outputs`` on another image set, normalised with the training set's statistics."""
    from .pipeline import make_source

    with make_source(images, train_source.device, cfg.loader, cfg.workers,
                     stats=(train_source.mean, train_source.std)) as src:
        return final_outputs(run, cfg, src, n_out, n_real)


def evaluate(run: Run, cfg: AuditConfig, train_source, train_labels: np.ndarray, fit_mask: np.ndarray,
             sets: EvalSets, n_out: int, n_real: int) -> dict:
    """DDU on the final model. Writes ``features.npy``, ``ood/results.npz``, ``ood/report.json``; returns the report.

    The Gaussians are fitted on the training samples in ``fit_mask`` (threshold samples of the last
    pass are left out: they were trained towards the fake class).
    """
    feats, logits = final_outputs(run, cfg, train_source, n_out, n_real)
    buf = io.BytesIO()
    np.save(buf, feats.astype(np.float16))
    atomic_write_bytes(run.path / "features.npy", buf.getvalue())
    id_test = None
    if sets.id_images is not None and len(sets.id_images):
        id_test = (*_outputs_on(run, cfg, sets.id_images, train_source, n_out, n_real), sets.id_labels)
    others = {name: _outputs_on(run, cfg, images, train_source, n_out, n_real) for name, images in sets.ood.items()}
    return write_report(run, feats, logits, train_labels, fit_mask, n_real, id_test, others)


def write_report(run: Run, feats: np.ndarray, logits: np.ndarray, train_labels: np.ndarray, fit_mask: np.ndarray,
                 n_real: int, id_test: tuple | None, others: dict[str, tuple[np.ndarray, np.ndarray]]) -> dict:
    """DDU from the final model's outputs: Gaussians on ``feats[fit_mask]``, densities and entropies of the
    training set, the ID test set ``(features, logits, labels)`` (calibration, risk-coverage) and each OoD
    set ``name -> (features, logits)`` (AUROC / AUPRC against the ID test set). Writes ``ood/``."""
    gda = ood.fit_gda(feats[fit_mask], train_labels[fit_mask], n_real)
    results = {"train_log_density": gda.log_density(feats), "train_entropy": ood.entropy(ood.softmax(logits)),
               "train_max_softmax": ood.softmax(logits).max(axis=1)}
    report: dict = {"jitter": gda.jitter, "sets": {}}
    named = {}
    if id_test is not None:
        f_id, l_id, y_id = id_test
        named["ID test"] = (f_id, l_id)
        p_id = ood.softmax(l_id)
        half = len(l_id) // 2
        t = ood.fit_temperature(l_id[:half], y_id[:half]) if half >= 10 else 1.0
        test = slice(half, None)
        before, diag_before = ood.ece(p_id[test], y_id[test])
        after, diag_after = ood.ece(ood.softmax(l_id[test], t), y_id[test])
        cov, risk, aurc = ood.risk_coverage(p_id.max(axis=1), p_id.argmax(axis=1) == y_id)
        report["calibration"] = {
            "temperature": t, "ece_before": before, "ece_after": after,
            "nll_before": ood.nll(l_id[test], y_id[test]), "nll_after": ood.nll(l_id[test], y_id[test], t),
            "reliability_before": diag_before, "reliability_after": diag_after,
            "accuracy": float((p_id.argmax(axis=1) == y_id).mean()), "n_validation": half,
            "n_test": len(l_id) - half,
        }
        step = max(1, len(cov) // 200)
        report["risk_coverage"] = {"coverage": cov[::step].tolist(), "risk": risk[::step].tolist(), "aurc": aurc}
    named.update(others)
    for i, (name, (f, lg)) in enumerate(named.items()):
        p = ood.softmax(lg)
        results[f"set{i}_log_density"] = gda.log_density(f)
        results[f"set{i}_entropy"] = ood.entropy(p)
        results[f"set{i}_max_softmax"] = p.max(axis=1)
        report["sets"][name] = {"key": f"set{i}", "n": len(f)}
    if "ID test" in named:
        k_id = report["sets"]["ID test"]["key"]
        report["ood"] = {}
        for name, meta in report["sets"].items():
            if name == "ID test":
                continue
            k = meta["key"]
            entry = {}
            for score, sign in (("log_density", -1), ("entropy", 1), ("max_softmax", -1)):
                auroc, auprc = ood.auroc_auprc(sign * results[f"{k_id}_{score}"], sign * results[f"{k}_{score}"])
                label = {"log_density": "density", "entropy": "entropy", "max_softmax": "max_softmax"}[score]
                entry[f"auroc_{label}"], entry[f"auprc_{label}"] = auroc, auprc
            report["ood"][name] = entry
    (run.path / "ood").mkdir(exist_ok=True)
    buf = io.BytesIO()
    np.savez(buf, **results)
    atomic_write_bytes(run.path / "ood" / "results.npz", buf.getvalue())
    atomic_write_json(run.path / "ood" / "report.json", report)
    return report


def load_report(run: Run) -> dict | None:
    p = run.path / "ood" / "report.json"
    return json.loads(p.read_text()) if p.is_file() else None


def load_results(run: Run) -> dict[str, np.ndarray]:
    p = run.path / "ood" / "results.npz"
    if not p.is_file():
        return {}
    with np.load(p, allow_pickle=False) as z:
        return {k: z[k] for k in z.files}
