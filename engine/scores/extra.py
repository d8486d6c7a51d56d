"""Scores that need more compute than the captured dynamics: run on demand, with progress, into scores.parquet.

``compute(run, names)`` is what ``python -m engine score RUN NAME...`` and the dashboard's
background job call. Each function returns one value per sample with its natural sign (the registry,
``engine.scores.registry.REGISTRY``, says which end is suspicious).
"""

from __future__ import annotations

import threading
from collections.abc import Callable

import numpy as np

from engine.capture.dynamics import trailing_streak
from engine.scores.registry import REGISTRY
from engine.store.runs import Run, atomic_write_parquet
from engine.training.config import AuditConfig

EXTRA = tuple(name for name, spec in REGISTRY.items() if spec.cost == "extra")
PD_REFERENCE_MAX = 100_000  # above this, prediction-depth k-NN probes search a seeded subsample of references

Progress = Callable[[float, str], None]


class ScoreError(ValueError):
    """A score cannot be computed for this run; the message says why."""


def _cfg(run: Run) -> AuditConfig:
    return AuditConfig.from_run_config(run.config())


def _dataset(run: Run):
    """The run's config and its trained samples (in ``Run.trained_rows`` order), with the run's normalisation."""
    from engine.data.pipeline import run_stats
    from engine.training.audit import load_run_dataset

    cfg = _cfg(run)
    ds = load_run_dataset(cfg).train
    ids = run.samples(["sample_id"])["sample_id"].to_numpy()[run.trained_rows()]
    if len(ids) != len(ds) or not (ds.sample_ids.astype(str) == ids).all():
        raise ScoreError(f"the dataset {cfg.dataset} changed since the run was made; audit it again")
    ds.stats = run_stats(run.config()) or ds.stats
    return cfg, ds


def random_score(n: int, seed: int = 0) -> np.ndarray:
    """aucurriculum Random: i.i.d. uniform [0, 1) per sample, seeded (the baseline any score must beat)."""
    return np.random.default_rng(seed).random(n)


def cross_validated_log_probs(run: Run, folds: int = 3, progress: Progress | None = None,
                              cancel: threading.Event | None = None) -> np.ndarray:
    """Out-of-sample log-probabilities of a run's trained samples (see ``out_of_sample_log_probs``)."""
    cfg, ds = _dataset(run)
    return out_of_sample_log_probs(cfg, ds, folds, progress, cancel, stats=ds.stats)


def log_probs(logits) -> np.ndarray:
    """``log_softmax`` of a batch of logits (a torch tensor), in float64: exact far into the tail, where
    ``log(softmax)`` in float32 underflows (``-log p`` of two very wrong samples would tie at ``-log(1e-12)``)."""
    import torch

    return torch.log_softmax(logits.double(), dim=1).cpu().numpy()


def out_of_sample_probs(cfg: AuditConfig, ds, folds: int = 3, progress: Progress | None = None,
                        cancel: threading.Event | None = None, stats: tuple | None = None) -> np.ndarray:
    """``exp`` of ``out_of_sample_log_probs``: ``(N, classes)`` softmax probabilities."""
    return np.exp(out_of_sample_log_probs(cfg, ds, folds, progress, cancel, stats))


def out_of_sample_log_probs(cfg: AuditConfig, ds, folds: int = 3, progress: Progress | None = None,
                            cancel: threading.Event | None = None, stats: tuple | None = None) -> np.ndarray:
    """k models, each trained on k-1 folds with the recipe of ``cfg`` (no threshold samples, no capture),
    predicting the held-out fold. Returns ``(N, classes)`` log-probabilities (``log_probs`` of the logits).
    ``stats``: the run's normalisation (None: each fold measures its own training images)."""
    from engine.data.datasets import take

    if folds < 2:
        raise ScoreError(f"cross-validation needs at least 2 folds, got {folds}")
    fold_of = np.random.default_rng(cfg.seed + 101).permutation(len(ds)) % folds
    logp = np.zeros((len(ds), ds.n_classes))
    for f in range(folds):
        if progress:
            progress(f / folds, f"fold {f + 1} of {folds}: training on {int((fold_of != f).sum())} samples")
        tr, te = fold_of != f, fold_of == f
        logp[te] = fit_predict_log(cfg, take(ds.images, tr), ds.labels[tr], take(ds.images, te), ds.n_classes,
                                   100 + f, cancel, stats)
    return logp


def fit_predict(cfg: AuditConfig, train_images, train_labels: np.ndarray, test_images, n_classes: int,
                pass_idx: int, cancel: threading.Event | None = None, stats: tuple | None = None) -> np.ndarray:
    """``exp`` of ``fit_predict_log``: the ``(len(test_images), n_classes)`` softmax probabilities."""
    return np.exp(fit_predict_log(cfg, train_images, train_labels, test_images, n_classes, pass_idx, cancel, stats))


def fit_predict_log(cfg: AuditConfig, train_images, train_labels: np.ndarray, test_images, n_classes: int,
                    pass_idx: int, cancel: threading.Event | None = None, stats: tuple | None = None) -> np.ndarray:
    """Train one model with the recipe of ``cfg`` (``train_pass`` without capture, the learning rate annealed to
    near 0 over the epochs: its last epoch's model is the one evaluated; ``pass_idx`` seeds it) on
    ``train_images`` / ``train_labels`` and return its ``(len(test_images), n_classes)`` log-probabilities
    (``log_probs`` of the logits), train and test images normalised with ``stats`` (None: the training
    images' own statistics)."""
    import torch

    from engine.data.pipeline import make_source, normalize, sequential
    from engine.training.loop import train_pass
    from engine.training.models import pick_device

    device = pick_device(cfg.device)
    with make_source(train_images, device, cfg.loader, cfg.workers, stats=stats, seed=cfg.seed) as train:
        model = train_pass(cfg, train, torch.from_numpy(np.asarray(train_labels)).to(device), n_classes,
                           n_classes, pass_idx, writer=None, capture=False, cancel=cancel, anneal=True)
        stats = (train.mean, train.std)
    model.eval()
    with make_source(test_images, device, cfg.loader, cfg.workers, stats=stats) as held, torch.inference_mode():
        out = [log_probs(model(normalize(x, held.mean, held.std)).float()) for _, x in sequential(held, 1024)]
    return np.concatenate(out)


def cv_loss(log_p: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """aucurriculum CVLoss: held-out cross-entropy ``-log p(y)`` from k-fold out-of-sample log-probabilities
    (``log_softmax`` of the logits: no clipping, no cap)."""
    return -log_p[np.arange(len(labels)), labels]


def self_confidence(log_p: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """cleanlab's self-confidence label quality ``p(y)`` on out-of-sample probabilities (low = suspicious)."""
    return np.exp(log_p[np.arange(len(labels)), labels])


def _probe_features(run: Run, progress: Progress | None = None):
    """Representations at each probe (input, after every block, output) of the run's final model, plus its predictions.

    Convolutional activations are global-average-pooled to one vector per sample and block, so
    the k-NN probes stay affordable (aucurriculum flattens them; pooling keeps memory bounded).
    """
    import torch

    from engine.data.pipeline import make_source, normalize, sequential
    from engine.training.loop import load_final_model
    from engine.training.models import SmallCNN, pick_device

    cfg, ds = _dataset(run)
    device = pick_device(cfg.device)
    n_out = cfg.n_outputs(ds.n_classes)
    with make_source(ds.images, device, cfg.loader, cfg.workers, stats=ds.stats, seed=cfg.seed) as source:
        model = load_final_model(run.path / "checkpoints", cfg, source.channels, n_out, device)
        if isinstance(model, SmallCNN):
            blocks = [m for m in model.body if isinstance(m, torch.nn.ReLU)]
        else:
            blocks = [model.net.layer1, model.net.layer2, model.net.layer3, model.net.layer4]
        captured: list[list[torch.Tensor]] = [[] for _ in blocks]
        hooks = [b.register_forward_hook(lambda m, i, o, k=k: captured[k].append(o.float().mean(dim=(2, 3)).cpu()))
                 for k, b in enumerate(blocks)]
        logits, pixels = [], []
        with torch.inference_mode():
            for _, x in sequential(source, 512):
                pixels.append(x.reshape(len(x), -1).float().cpu() / 255.0)
                logits.append(model(normalize(x, source.mean, source.std)).float().cpu())
        for h in hooks:
            h.remove()
    out = torch.cat(logits)
    probes = [torch.cat(pixels).numpy()]
    probes += [torch.cat(c).numpy() for c in captured]
    probes.append(out[:, : ds.n_classes].numpy())
    prediction = out[:, : ds.n_classes].argmax(1).numpy()
    return probes, prediction, ds.labels, cfg.seed


def knn_predictions(x: np.ndarray, labels: np.ndarray, k: int, leave_one_out: bool, n_classes: int,
                    reference: np.ndarray | None = None) -> np.ndarray:
    """Majority label of the k nearest (Euclidean) reference samples; with ``leave_one_out`` a sample is not its own neighbour."""
    from sklearn.neighbors import NearestNeighbors

    ref = np.arange(len(x)) if reference is None else reference
    nn = NearestNeighbors(n_neighbors=min(k + 1, len(ref))).fit(x[ref])
    _, idx = nn.kneighbors(x)
    neighbours = ref[idx]
    if leave_one_out:
        is_self = neighbours == np.arange(len(x))[:, None]
        # drop self where present, else the farthest, keeping k
        drop = np.where(is_self.any(axis=1), is_self.argmax(axis=1), neighbours.shape[1] - 1)
        keep = np.ones_like(neighbours, dtype=bool)
        keep[np.arange(len(x)), drop] = False
        neighbours = neighbours[keep].reshape(len(x), -1)[:, :k]
    else:
        neighbours = neighbours[:, :k]
    votes = np.zeros((len(x), n_classes), dtype=np.int32)
    np.add.at(votes, (np.repeat(np.arange(len(x)), neighbours.shape[1]), labels[neighbours].ravel()), 1)
    return votes.argmax(axis=1)


def prediction_depth_from(knn_preds: list[np.ndarray], prediction: np.ndarray) -> np.ndarray:
    """aucurriculum prediction depth: ``(P - length of the trailing run of probes agreeing with the model's
    prediction) / P`` over the P probes (Baldock et al. 2021: the depth after which every probe agrees)."""
    agree = np.stack([p == prediction for p in knn_preds])  # (P, N)
    p = agree.shape[0]
    return (p - trailing_streak(agree)) / p


def prediction_depth(run: Run, k: int = 30, leave_one_out: bool = True, progress: Progress | None = None) -> np.ndarray:
    """Prediction depth with k-NN probes (k=30, Euclidean) at the input, after each block and at the output.

    Leave-one-out by default: with the sample among its own references, its given label votes for
    itself at every probe, which pulls mislabeled samples towards "agrees early" and hides them.
    """
    probes, prediction, labels, seed = _probe_features(run, progress)
    n_classes = int(max(labels.max(), prediction.max())) + 1
    ref = None
    if len(labels) > PD_REFERENCE_MAX:
        ref = np.sort(np.random.default_rng(seed).choice(len(labels), PD_REFERENCE_MAX, replace=False))
    preds = []
    for i, x in enumerate(probes):
        if progress:
            progress(i / len(probes), f"k-NN probe {i + 1} of {len(probes)}")
        preds.append(knn_predictions(x, labels, k, leave_one_out, n_classes, ref))
    return prediction_depth_from(preds, prediction)


def transfer_teacher(run: Run, teacher: str = "self", seed: int = 0, progress: Progress | None = None,
                     folds: int = 5) -> np.ndarray:
    """aucurriculum TransferTeacher: an SVM on a teacher's embeddings, ``P(given label)`` (low = suspicious), for the trained
    samples (``Run.trained_rows`` order).

    teacher ``self`` = the run's own final model (``features.npy``); ``resnet18:/path/weights.pt`` (or another
    torchvision architecture) = that network with weights from a local file, its penultimate layer.
    One scheme at every size (no switch of model or calibration at some sample count): a linear SVM with
    sigmoid (Platt) calibration fitted by 3-fold CV, and each sample's probability is **out of fold** (seeded
    stratified ``folds``-fold: the SVM that scores a sample never saw it). Choices of ours: aucurriculum
    fits and scores the same samples; a linear kernel keeps the cost linear in N (an RBF SVC is quadratic).
    """
    rows = run.trained_rows()
    labels = run.samples(["label"])["label"].to_numpy()[rows]
    if teacher == "self":
        path = run.path / "features.npy"
        if not path.is_file():
            raise ScoreError("the run has no features.npy yet (it is written when the audit finishes)")
        emb = np.load(path)[rows].astype(np.float32)
    else:
        emb = _torchvision_embeddings(run, teacher)
    if progress:
        progress(0.2, f"fitting out-of-fold SVMs on {emb.shape[0]:,} x {emb.shape[1]} embeddings")
    return svm_out_of_fold(emb, labels, seed, folds)


def svm_out_of_fold(emb: np.ndarray, labels: np.ndarray, seed: int = 0, folds: int = 5) -> np.ndarray:
    """``P(given label)`` (low = suspicious) of each sample from a standardised linear SVM with sigmoid (Platt) calibration
    (3-fold internal CV) that never saw it: seeded stratified ``folds``-fold cross-fitting."""
    from sklearn.calibration import CalibratedClassifierCV
    from sklearn.model_selection import StratifiedKFold, cross_val_predict
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    from sklearn.svm import LinearSVC

    counts = np.bincount(labels)
    smallest = int(counts[counts > 0].min())
    if smallest < 3:
        raise ScoreError("transfer_teacher needs at least 3 samples of every trained class (out-of-fold SVM)")
    k = min(folds, smallest)
    inner = min(3, max(2, (smallest * (k - 1)) // k))
    clf = make_pipeline(StandardScaler(), CalibratedClassifierCV(LinearSVC(random_state=seed), method="sigmoid", cv=inner))
    proba = cross_val_predict(clf, emb, labels, cv=StratifiedKFold(k, shuffle=True, random_state=seed),
                              method="predict_proba")
    col = {c: i for i, c in enumerate(np.unique(labels))}
    return proba[np.arange(len(labels)), [col[y] for y in labels]]


def _torchvision_embeddings(run: Run, teacher: str) -> np.ndarray:
    import torch
    import torchvision.models as tvm

    arch, _, weights = teacher.partition(":")
    if not hasattr(tvm, arch) or not weights:
        raise ScoreError(f"teacher {teacher!r}: expected self or ARCH:/path/to/weights.pt with a torchvision ARCH")
    net = getattr(tvm, arch)(weights=None)
    try:
        state = torch.load(weights, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError) as exc:
        raise ScoreError(f"cannot load teacher weights {weights}: {exc}") from exc
    net.load_state_dict(state.get("state_dict", state) if isinstance(state, dict) else state)
    for attr in ("fc", "classifier", "heads"):
        if hasattr(net, attr):
            setattr(net, attr, torch.nn.Identity())
    net.eval()
    from engine.data.pipeline import StreamImages, sequential

    cfg, ds = _dataset(run)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    out = []
    with StreamImages(ds.images, torch.device("cpu"), cfg.workers, stats=(mean, std)) as source, torch.inference_mode():
        for _, x in sequential(source, 256):
            x = x.float() / 255
            if x.shape[1] == 1:
                x = x.repeat(1, 3, 1, 1)
            x = torch.nn.functional.interpolate(x, size=max(32, x.shape[-1]), mode="bilinear")
            out.append(net((x - mean) / std))
    return torch.cat(out).numpy()


def _stop_if(cancel: threading.Event | None) -> None:
    if cancel is not None and cancel.is_set():
        from engine.training.loop import Cancelled

        raise Cancelled()


def compute(run: Run, names: list[str], folds: int = 3, k: int = 30, teacher: str = "self",
            leave_one_out: bool = True, seed: int = 0, progress: Progress | None = None,
            cancel: threading.Event | None = None) -> list[str]:
    """Compute the named extra scores and add them to ``scores.parquet`` (atomically); returns the names written."""
    unknown = [n for n in names if n not in EXTRA]
    if unknown:
        raise ScoreError(f"unknown score(s) {unknown}; on-demand scores are {', '.join(EXTRA)} "
                         "(the others are computed with every audit)")
    table = run.scores()
    if table is None:
        raise ScoreError("the run has no scores yet; wait until its first epoch has finished")
    rows = run.trained_rows()  # every score below is one value per trained sample; the others stay NaN
    labels = run.samples(["label"])["label"].to_numpy()[rows]
    out: dict[str, np.ndarray] = {}
    if "random" in names:
        out["random"] = random_score(len(labels), seed)
    if {"cv_loss", "self_confidence"} & set(names):
        log_p = cross_validated_log_probs(run, folds, progress, cancel)
        if "cv_loss" in names:
            out["cv_loss"] = cv_loss(log_p, labels)
        if "self_confidence" in names:
            out["self_confidence"] = self_confidence(log_p, labels)
    if "prediction_depth" in names:
        _stop_if(cancel)
        out["prediction_depth"] = prediction_depth(run, k, leave_one_out, progress)
    if "transfer_teacher" in names:
        _stop_if(cancel)
        out["transfer_teacher"] = transfer_teacher(run, teacher, seed, progress)
    _stop_if(cancel)  # nothing is written when cancelled
    table = run.scores()  # re-read: training may have refreshed it meanwhile
    for name, values in out.items():
        column = np.full(len(table), np.nan)
        column[rows] = values
        table[name] = column
    atomic_write_parquet(run.path / "scores.parquet", table)
    if progress:
        progress(1.0, f"wrote {', '.join(out)}")
    return list(out)
