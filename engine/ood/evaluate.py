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

from engine.data.datasets import FileImages, IndexedDataset, load_folder, take
from engine.ood import ddu as ood
from engine.store.runs import Run, atomic_write_bytes, atomic_write_json
from engine.training.config import AuditConfig, ConfigError


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


def class_indices(wanted: list[int | str], classes: list[str]) -> list[int]:
    """Class indices for ``--holdout-classes`` entries: a class name, or an index (a number that is not a class name)."""
    out = []
    for c in wanted:
        name = str(c).strip()
        if name in classes:
            out.append(classes.index(name))
        elif name.lstrip("-").isdigit() and 0 <= int(name) < len(classes):
            out.append(int(name))
        else:
            shown = ", ".join(classes[:20]) + (" …" if len(classes) > 20 else "")
            raise ConfigError(f"--holdout-classes: {name[:80]!r} is neither a class name nor an index in "
                              f"0..{len(classes) - 1}; the classes are {shown}")
    return out


@dataclass
class RunData:
    """A run's dataset: every sample (``full``, in dataset order = ``samples.parquet`` order), each one's
    ``roles`` before threshold samples are drawn (``train``, ``id_eval``, ``ood_holdout``, ``holdout_label``)
    and the evaluation sets made from the held-out ones."""

    full: IndexedDataset
    roles: np.ndarray
    sets: EvalSets
    _train: IndexedDataset | None = None

    @property
    def trained(self) -> np.ndarray:
        """Mask of the samples the models train on."""
        return self.roles == "train"

    @property
    def train(self) -> IndexedDataset:
        """The training samples (same class list and label indices as ``full``)."""
        if self._train is None:
            self._train = self.full.subset(self.trained)
        return self._train


def assign_roles(ds: IndexedDataset, cfg: AuditConfig) -> np.ndarray:
    """Each sample's role for ``cfg``: ``ood_holdout`` (its class is held out: an OoD set), ``holdout_label``
    (given a held-out class as label but of a kept class, e.g. an injected flip: neither trained nor OoD),
    ``id_eval`` (a seeded stratified ``eval_share`` of the rest, held out for OoD / calibration), else ``train``."""
    roles = np.full(len(ds), "train", dtype=object)
    if cfg.holdout_classes:
        held = class_indices(cfg.holdout_classes, ds.classes)
        if len(set(held)) >= ds.n_classes - 1:
            raise ConfigError(f"--holdout-classes: holding out {len(set(held))} of {ds.n_classes} classes leaves fewer "
                              "than 2 to train on")
        basis = ds.true_labels if ds.true_labels is not None else ds.labels
        out = np.isin(basis, held)
        roles[out] = "ood_holdout"
        roles[~out & np.isin(ds.labels, held)] = "holdout_label"
    share = cfg.eval_share
    if share > 0:
        rng = np.random.default_rng(cfg.seed + 202)
        for k in range(ds.n_classes):  # stratified by given label
            members = np.flatnonzero((ds.labels == k) & (roles == "train"))
            if members.size:
                roles[rng.choice(members, int(round(share * members.size)), replace=False)] = "id_eval"
    return roles


def split(ds: IndexedDataset, cfg: AuditConfig) -> RunData:
    """Roles and evaluation sets for ``cfg`` (holdout classes, ID eval split, OoD folder, corruptions).

    Nothing is removed from ``ds``: held-out samples keep their row (``samples.parquet`` lists every
    sample of the dataset) and their class keeps its index (the model keeps an output for a held-out
    class that no training sample targets, so labels and class names mean the same in every table).
    """
    roles = assign_roles(ds, cfg)
    sets = EvalSets()
    if cfg.holdout_classes:
        name = "held-out classes " + ",".join(ds.classes[c] for c in class_indices(cfg.holdout_classes, ds.classes))
        sets.ood[name] = take(ds.images, roles == "ood_holdout")
    held = roles == "id_eval"
    if held.any():
        truth = ds.true_labels if ds.true_labels is not None else ds.labels
        sets.id_images, sets.id_labels = take(ds.images, held), truth[held]
        for kind in cfg.corruptions or []:
            lazy = isinstance(sets.id_images, FileImages)
            sets.ood[f"corrupted: {kind}"] = (Corrupted(sets.id_images, kind, cfg.seed) if lazy
                                              else corrupt(sets.id_images, kind, cfg.seed))
    if cfg.ood_folder:
        other = load_folder(cfg.ood_folder, image_size=ds.images.shape[1])
        sets.ood[f"folder {other.name}"] = _match_shape(other.images, ds.images)
    return RunData(ds, roles, sets)


def final_outputs(run: Run, cfg: AuditConfig, source, n_out: int, n_real: int,
                  batch: int = 512) -> tuple[np.ndarray, np.ndarray]:
    """Penultimate features and real-class logits of the last pass's final model on an image ``source``."""
    import torch

    from engine.data.pipeline import normalize, sequential
    from engine.training.loop import load_final_model

    model = load_final_model(run.path / "checkpoints", cfg, source.channels, n_out, source.device)
    feats, logits = [], []
    with torch.inference_mode():
        for _, x in sequential(source, batch):
            f = model.features(normalize(x, source.mean, source.std))
            feats.append(f.float().cpu())
            logits.append(model.head(f).float().cpu()[:, :n_real])
    return torch.cat(feats).numpy(), torch.cat(logits).numpy()


def _outputs_on(run: Run, cfg: AuditConfig, images, train_source, n_out: int, n_real: int):
    """``final_outputs`` on another image set, normalised with the training set's statistics."""
    from engine.data.pipeline import make_source

    with make_source(images, train_source.device, cfg.loader, cfg.workers,
                     stats=(train_source.mean, train_source.std)) as src:
        return final_outputs(run, cfg, src, n_out, n_real)


def evaluate(run: Run, cfg: AuditConfig, train_source, train_labels: np.ndarray, fit_mask: np.ndarray,
             sets: EvalSets, n_out: int, n_real: int, rows: np.ndarray | None = None, n_all: int | None = None) -> dict:
    """DDU on the final model. Writes ``features.npy``, ``ood/results.npz``, ``ood/report.json``; returns the report.

    The Gaussians are fitted on the training samples in ``fit_mask`` (threshold samples of the last
    pass are left out: they were trained towards the fake class). ``rows``: where the training samples
    sit among the run's ``n_all`` samples (every per-sample array written has one entry per run sample).
    """
    feats, logits = final_outputs(run, cfg, train_source, n_out, n_real)
    rows = np.arange(len(feats)) if rows is None else np.asarray(rows)
    n_all = len(feats) if n_all is None else n_all
    full = np.full((n_all, feats.shape[1]), np.nan, dtype=np.float16)
    full[rows] = feats.astype(np.float16)
    buf = io.BytesIO()
    np.save(buf, full)
    atomic_write_bytes(run.path / "features.npy", buf.getvalue())
    id_test = None
    if sets.id_images is not None and len(sets.id_images):
        id_test = (*_outputs_on(run, cfg, sets.id_images, train_source, n_out, n_real), sets.id_labels)
    others = {name: _outputs_on(run, cfg, images, train_source, n_out, n_real) for name, images in sets.ood.items()}
    return write_report(run, feats, logits, train_labels, fit_mask, n_real, id_test, others, rows, n_all, cfg.seed)


def calibration_split(labels: np.ndarray, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Indices of the temperature-fitting half and the ECE half of a labelled set: a seeded permutation within
    each class, its first ``floor(n_k / 2)`` samples to the fitting half, so both halves hold every class with
    at least 2 samples in the same proportions (never split by position: a folder's set is sorted by class)."""
    y = np.asarray(labels)
    rng = np.random.default_rng(seed + 303)
    fit, test = [], []
    for k in np.unique(y):
        members = rng.permutation(np.flatnonzero(y == k))
        half = len(members) // 2
        fit.append(members[:half])
        test.append(members[half:])
    return np.sort(np.concatenate(fit)).astype(np.int64), np.sort(np.concatenate(test)).astype(np.int64)


def _per_sample(values: np.ndarray, rows: np.ndarray, keep: np.ndarray, n_all: int) -> np.ndarray:
    """One value per run sample: ``values[keep]`` at ``rows[keep]``, NaN elsewhere."""
    out = np.full(n_all, np.nan)
    out[rows[keep]] = values[keep]
    return out


def write_report(run: Run, feats: np.ndarray, logits: np.ndarray, train_labels: np.ndarray, fit_mask: np.ndarray,
                 n_real: int, id_test: tuple | None, others: dict[str, tuple[np.ndarray, np.ndarray]],
                 rows: np.ndarray | None = None, n_all: int | None = None, seed: int = 0) -> dict:
    """DDU from the final model's outputs: Gaussians on ``feats[fit_mask]``, densities and entropies of the
    training set, the ID test set ``(features, logits, labels)`` (calibration on a stratified split,
    risk-coverage) and each OoD set ``name -> (features, logits)`` (AUROC / AUPRC against the ID test set).
    Writes ``ood/``. The training set's ``train_*`` arrays have one entry per run sample (``rows`` of
    ``n_all``, default: the training samples are the run), NaN outside ``fit_mask``: the final model
    trained those towards the fake class."""
    rows = np.arange(len(feats)) if rows is None else np.asarray(rows)
    n_all = len(feats) if n_all is None else n_all
    gda = ood.fit_gda(feats[fit_mask], train_labels[fit_mask], n_real)
    probs = ood.softmax(logits)
    keep = np.asarray(fit_mask, dtype=bool)
    results = {"train_log_density": _per_sample(gda.log_density(feats), rows, keep, n_all),
               "train_entropy": _per_sample(ood.entropy(probs), rows, keep, n_all),
               "train_max_softmax": _per_sample(probs.max(axis=1), rows, keep, n_all)}
    report: dict = {"jitter": gda.jitter, "sets": {}}
    named = {}
    if id_test is not None:
        f_id, l_id, y_id = id_test
        named["ID test"] = (f_id, l_id)
        p_id = ood.softmax(l_id)
        fit, test = calibration_split(y_id, seed)
        t = ood.fit_temperature(l_id[fit], y_id[fit]) if len(fit) >= 10 else 1.0
        before, diag_before = ood.ece(p_id[test], y_id[test])
        after, diag_after = ood.ece(ood.softmax(l_id[test], t), y_id[test])
        cov, risk, aurc = ood.risk_coverage(p_id.max(axis=1), p_id.argmax(axis=1) == y_id)
        report["calibration"] = {
            "temperature": t, "ece_before": before, "ece_after": after,
            "nll_before": ood.nll(l_id[test], y_id[test]), "nll_after": ood.nll(l_id[test], y_id[test], t),
            "reliability_before": diag_before, "reliability_after": diag_after,
            "accuracy": float((p_id.argmax(axis=1) == y_id).mean()), "n_validation": len(fit),
            "n_test": len(test),
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
