"""Does cleaning help? Retrain the audit's recipe on the noisy, the cleaned and the oracle-clean labels
and compare their accuracy on a trusted test set (``python -m engine retrain RUN``).

* noisy: the labels the audit was given;
* cleaned: the same samples with the run's review applied: the reviewers' decisions first
  (relabel, remove, correct), then, for undecided flagged samples, the ``--policy``:
  ``remove`` drops them, ``relabel`` gives them their suggested label, ``both`` relabels those
  whose suggested label is also what the model predicted at the end of training (the model
  agrees with the suggestion) and drops the rest;
* oracle: the true labels, when the run knows them (injected noise).

The trusted test set is ``test`` (any ``--dataset`` spec, with the run's class names), else, when
the run knows the true labels, a seeded 20% of the run's samples stratified by true label, held
out of all three trainings and scored against their true labels. Every variant trains the same
recipe (the run's model, epochs, optimiser, augmentation; no threshold samples, no forward
correction; the learning rate annealed, ``engine.training.loop.cosine_lr``, so that the last epoch's model, the
one scored, has converged) with the same seeds, so the differences come from the labels. Results go to ``retrain.json`` in the run
directory.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Callable

import numpy as np

from engine.store.runs import Run, atomic_write_json
from engine.training.config import ConfigError

POLICIES = ("remove", "relabel", "both")
RESULT = "retrain.json"


def cleaned_labels(labels: np.ndarray, flagged: np.ndarray, suggested: np.ndarray, policy: str,
                   model_agrees: np.ndarray | None = None, decided: dict[int, tuple[str, int | None]] | None = None
                   ) -> tuple[np.ndarray, np.ndarray]:
    """The cleaned training labels and the mask of samples kept.

    ``decided`` maps a sample's row to a reviewer's (decision, new label index): ``remove`` drops it,
    ``mislabeled`` relabels it, ``correct`` keeps it as given (the policy does not touch decided rows).
    """
    if policy not in POLICIES:
        raise ConfigError(f"--policy {policy!r}: choose one of {', '.join(POLICIES)}")
    y = np.asarray(labels, dtype=np.int64).copy()
    keep = np.ones(len(y), dtype=bool)
    act = np.asarray(flagged, dtype=bool).copy()
    has_sug = np.asarray(suggested) >= 0
    for row, (decision, new) in (decided or {}).items():
        act[row] = False
        if decision == "remove":
            keep[row] = False
        elif decision == "mislabeled" and new is not None:
            y[row] = new
    if policy == "remove":
        keep &= ~act
    else:
        relabel = act & has_sug
        if policy == "both":
            agrees = np.ones(len(y), dtype=bool) if model_agrees is None else np.asarray(model_agrees, dtype=bool)
            keep &= ~(act & ~(relabel & agrees))
            relabel &= agrees
        y[relabel] = np.asarray(suggested)[relabel]
    return y, keep


def _model_agrees(run: Run, suggested: np.ndarray) -> np.ndarray:
    """Per sample: the model predicted its suggested label at the last finished epoch of a pass where it kept its label."""
    from engine.store.views import first_kept_pass

    kept_pass = first_kept_pass(run)
    agrees = np.zeros(len(suggested), dtype=bool)
    for p in range(run.n_passes()):
        if run.epochs_done(p) == 0:
            continue
        last = np.asarray(run.dynamics(p, "pred")[-1])
        rows = kept_pass == p if run.n_passes() > 1 else np.ones(len(suggested), dtype=bool)
        agrees[rows] = last[rows] == suggested[rows]
    return agrees


def _decisions(run: Run, ids: np.ndarray, classes: list[str]) -> dict[int, tuple[str, int | None]]:
    from engine.review.reviews import DB_NAME, ReviewStore

    if not (run.path / DB_NAME).is_file():
        return {}
    row_of = {s: i for i, s in enumerate(ids)}
    index = {c: i for i, c in enumerate(classes)}
    out = {}
    for r in ReviewStore(run.path).current().itertuples():
        if r.sample_id in row_of and r.decision in ("remove", "mislabeled", "correct"):
            out[row_of[r.sample_id]] = (r.decision, index.get(r.new_label))
    return out


def _trusted_split(true_labels: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """Seeded test mask of ``fraction`` of every true class."""
    rng = np.random.default_rng(seed + 303)
    test = np.zeros(len(true_labels), dtype=bool)
    for k in np.unique(true_labels):
        members = np.flatnonzero(true_labels == k)
        test[rng.choice(members, max(1, int(round(fraction * members.size))), replace=False)] = True
    return test


def _test_set(spec: str, classes: list[str], image_shape: tuple):
    from engine.data.datasets import load_dataset

    ds = load_dataset(spec, image_size=int(image_shape[0]))
    missing = sorted(set(ds.classes) - set(classes))
    if missing:
        raise ConfigError(f"--test {spec}: classes {missing[:5]} are not classes of the run ({', '.join(classes[:10])})")
    if tuple(ds.images.shape[1:]) != tuple(image_shape):
        raise ConfigError(f"--test {spec}: images are {tuple(ds.images.shape[1:])}, the run's are {tuple(image_shape)}")
    remap = np.array([classes.index(c) for c in ds.classes])
    return ds.images, remap[ds.labels]


def retrain(run: Run, policy: str = "relabel", test: str | None = None, seeds: int = 3,
            test_fraction: float = 0.2, progress: Callable[[float, str], None] | None = None,
            cancel: threading.Event | None = None) -> dict:
    """Train noisy / cleaned / oracle variants (``seeds`` seeds each) and write ``retrain.json``; returns it."""
    from engine.data.datasets import take
    from engine.scores.extra import _dataset, fit_predict
    from engine.store.views import live_scores

    if seeds < 1:
        raise ConfigError(f"--seeds must be at least 1, got {seeds}")
    if policy not in POLICIES:
        raise ConfigError(f"--policy {policy!r}: choose one of {', '.join(POLICIES)}")
    scores, _ = live_scores(run)
    cfg, ds = _dataset(run)
    classes = run.classes()
    true = ds.true_labels
    flagged = scores["flagged"].to_numpy(dtype=bool)
    suggested = scores["suggested_label"].to_numpy()
    y_clean, keep = cleaned_labels(ds.labels, flagged, suggested, policy, _model_agrees(run, suggested),
                                   _decisions(run, ds.sample_ids.astype(str), classes))
    if test is not None:
        test_images, test_labels = _test_set(test, classes, tuple(ds.images.shape[1:]))
        train_mask = np.ones(len(ds), dtype=bool)
        test_desc = f"{test} ({len(test_labels)} samples, their own labels)"
    elif true is not None:
        held = _trusted_split(true, test_fraction, cfg.seed)
        test_images, test_labels, train_mask = take(ds.images, held), true[held], ~held
        test_desc = (f"{int(held.sum())} samples of the run ({test_fraction:.0%} per true class, seeded) with their "
                     "true labels, held out of every training")
    else:
        raise ConfigError("this run does not know the true labels: give a trusted test set with --test "
                          "(a folder, a manifest .csv or torchvision:NAME:ROOT with the run's class names)")
    variants = {"noisy": (ds.labels, train_mask), "cleaned": (y_clean, train_mask & keep)}
    if true is not None:
        variants["oracle"] = (true, train_mask)
    # the plain recipe for every variant: a forward correction estimated from the labels would partly clean the
    # noisy variant itself, and the comparison is about the labels (bench/RESULTS.md, retrain section)
    base = dataclasses.replace(cfg, threshold_samples=False, forward_correction=False)
    acc: dict[str, list[float]] = {k: [] for k in variants}
    total, done, t0 = len(variants) * seeds, 0, time.time()
    for s in range(seeds):
        for name, (labels, mask) in variants.items():
            if progress:
                progress(done / total, f"seed {s + 1} of {seeds}: training on the {name} labels ({int(mask.sum())} samples)")
            c = dataclasses.replace(base, seed=cfg.seed + s)
            probs = fit_predict(c, take(ds.images, mask), labels[mask], test_images, ds.n_classes, 200 + s, cancel)
            acc[name].append(float((probs.argmax(1) == test_labels).mean()))
            done += 1
    result = {
        "policy": policy,
        "test_set": test_desc,
        "seeds": [cfg.seed + s for s in range(seeds)],
        "n_train": int(train_mask.sum()),
        "n_removed": int((train_mask & ~keep).sum()),
        "n_relabelled": int((train_mask & keep & (y_clean != ds.labels)).sum()),
        "accuracy": acc,
        "seconds": round(time.time() - t0, 1),
    }
    for name, values in acc.items():
        result[f"accuracy_{name}"] = float(np.mean(values))
        result[f"accuracy_{name}_std"] = float(np.std(values))
    if true is not None:
        lost = result["accuracy_oracle"] - result["accuracy_noisy"]
        result["recovered"] = float((result["accuracy_cleaned"] - result["accuracy_noisy"]) / lost) if lost > 0 else None
        removed_right = train_mask & ~keep & (ds.labels == true)
        result["n_removed_correct"] = int(removed_right.sum())
        result["n_relabelled_right"] = int((train_mask & keep & (y_clean != ds.labels) & (y_clean == true)).sum())
    atomic_write_json(run.path / RESULT, result)
    return result


def verdict(r: dict) -> str | None:
    """One sentence on what cleaning won back, for the CLI and the Audit page; None without oracle labels.

    ``recovered = (cleaned - noisy) / (oracle - noisy)``; when the noisy labels cost no accuracy on the test set
    (oracle not above noisy: a class-dependent noise that leaves the true class the majority of every given label,
    learnt by a converged model) there is nothing to recover, and the sentence says so with cleaning's difference.
    """
    if r.get("recovered") is not None:
        return f"Cleaning recovered {r['recovered']:.0%} of the accuracy lost to noise."
    if "accuracy_oracle" not in r:
        return None
    diff = r["accuracy_cleaned"] - r["accuracy_noisy"]
    return (f"The noisy labels cost no test accuracy here (noisy {r['accuracy_noisy']:.1%}, oracle "
            f"{r['accuracy_oracle']:.1%}): nothing to recover; cleaning changed it by {diff:+.1%}.")


def load(run: Run) -> dict | None:
    """The run's ``retrain.json``, or None."""
    import json

    p = run.path / RESULT
    return json.loads(p.read_text()) if p.is_file() else None
