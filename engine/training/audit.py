"""An audit from config to finished run directory: dataset -> threshold sets -> training passes -> scores.

``prepare`` validates everything and creates the run directory (nothing trains before the
dataset and config are known to be usable); ``execute`` trains and writes; ``finalize``
turns the captured dynamics into ``scores.parquet`` and ``summary.json``. The CLI, the
dashboard's job manager and ``--resume`` all go through these three functions.
"""

from __future__ import annotations

import os
import threading
import time
import traceback
from collections.abc import Callable

import numpy as np
import pandas as pd

from engine.data.datasets import IndexedDataset, load_dataset
from engine.data.pipeline import (
    choose_loader,
    is_lazy,
    make_source,
    materialize,
    normalization_stats,
    run_stats,
    stats_record,
    stats_sample,
)
from engine.scores.noise import noise_estimate
from engine.scores.registry import REGISTRY, compute_scores, mean_over_passes
from engine.store.runs import (
    DynamicsWriter,
    Run,
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_parquet,
    create_run,
    owner_fields,
    resume_problem,
    trained_rows,
    write_prepared,
)
from engine.training.config import AuditConfig, ConfigError
from engine.training.loop import Cancelled, EpochResult, train_pass
from engine.training.models import pick_device


def threshold_assignment(n: int, n_classes: int, passes: int, seed: int) -> np.ndarray:
    """Disjoint threshold sets of ``N // (c + 1)`` samples per pass (Pleiss et al. 2020); -1 = never."""
    m = n // (n_classes + 1)
    if m < 1:
        raise ConfigError(f"{n} samples are too few for threshold samples with {n_classes} classes; turn them off")
    if m * passes > n:
        raise ConfigError(
            f"{passes} threshold runs x {m} threshold samples exceed the {n} samples; use fewer threshold runs"
        )
    perm = np.random.default_rng(seed + 17).permutation(n)
    out = np.full(n, -1, dtype=np.int64)
    for p in range(passes):
        out[perm[p * m : (p + 1) * m]] = p
    return out


def check_dataset(ds: IndexedDataset, cfg: AuditConfig) -> None:
    """Reject datasets that cannot be audited, with a message that says how to fix it."""
    counts = np.bincount(ds.labels, minlength=ds.n_classes)
    present = int((counts > 0).sum())
    if present < 2:
        raise ConfigError(f"only one class has samples ({ds.classes[int(counts.argmax())]!r}); an audit needs at least 2 classes")
    if len(ds) < 4:
        raise ConfigError(f"{len(ds)} samples are too few to train on; give at least a few per class")


def load_run_dataset(cfg: AuditConfig):
    """The audit's dataset with each sample's role and its OoD evaluation sets (``ood_eval.RunData``): the one way
    to load a run's data.

    Image files are checked by header and decoded on demand (``FileImages``); ``engine.data.pipeline``
    decides whether they are then decoded once into memory or streamed.
    """
    from engine.ood.evaluate import split
    from engine.training.models import input_spec

    data = split(load_dataset(cfg.dataset, cfg.noise, cfg.noise_kind, cfg.seed, cfg.image_size, lazy=True), cfg)
    _, norm = input_spec(cfg.model, cfg.weights, cfg.weights_enum, data.full.images.shape[-1])
    if norm is not None:  # a pretrained network is fed its weights' normalisation, not the dataset's
        import torch

        data.train.stats = tuple(torch.tensor(v, dtype=torch.float32).view(1, -1, 1, 1) for v in norm)
    return data


def prepare(cfg: AuditConfig, root: str | os.PathLike | None = None) -> tuple[Run, IndexedDataset]:
    """Validate config and dataset, assign roles and threshold samples, decode the images (memory loader) and
    measure the normalisation statistics, then create the run directory. Returns the run and its training
    samples (``ds.stats`` set). The CLI and ``engine.audit`` call it: nothing is created for a bad dataset.
    """
    from engine.store.runs import runs_root

    cfg.validate()
    ds, samples, classes, config = _read_dataset(cfg)
    return create_run(runs_root(root), config, samples, classes), ds


def prepare_reserved(run: Run) -> IndexedDataset:
    """``prepare`` for a run created before its dataset was read (``JobManager.start``: the dashboard's request
    thread only checks the config): read the dataset (index, headers, decoding, normalisation statistics,
    roles) in the worker and write the run's sample table, classes and config. A dataset that cannot be read
    fails the run: its status says why (``error``), and nothing else is written."""
    run.update_status(state="running", phase="preparing", started_at=time.time(), **owner_fields())
    try:
        cfg = AuditConfig.from_run_config(run.config())
        ds, samples, classes, config = _read_dataset(cfg)
        write_prepared(run, config, samples, classes)
    except BaseException as exc:
        bad_input = isinstance(exc, ValueError)  # DatasetError, ConfigError: the message says what to fix
        run.update_status(state="failed", phase=None, finished_at=time.time(),
                          error=f"the dataset could not be prepared: {exc if bad_input else f'{type(exc).__name__}: {exc}'}",
                          traceback=None if bad_input else traceback.format_exc(limit=20))
        raise
    run.update_status(phase=None)
    return ds


def _read_dataset(cfg: AuditConfig) -> tuple[IndexedDataset, pd.DataFrame, list[str], dict]:
    """The one way to read an audit's dataset: its training samples (decoded when the loader keeps them in
    memory, ``stats`` measured), the run's sample table (every sample with its role and threshold pass), the
    class names and the run's config (``dataset_root``, ``dataset_info``, ``image_shape``, ``normalization``)."""
    data = load_run_dataset(cfg)
    ds = data.train
    check_dataset(ds, cfg)
    if is_lazy(ds.images) and choose_loader(cfg.loader, ds.images) == "memory":
        ds.images = materialize(ds.images, cfg.workers)  # a corrupt file found while decoding stops here
    if ds.stats is None:  # once, before training, for every loader (a streamed source decodes them here)
        ds.stats = normalization_stats(ds.images, cfg.workers, cfg.seed)
    n_trained_classes = int((np.bincount(ds.labels, minlength=ds.n_classes) > 0).sum())
    tpass_train = (
        threshold_assignment(len(ds), n_trained_classes, cfg.passes, cfg.seed)
        if cfg.threshold_samples
        else np.full(len(ds), -1, dtype=np.int64)
    )
    full = data.full
    tpass = np.full(len(full), -1, dtype=np.int64)
    tpass[data.trained] = tpass_train
    roles = np.where(tpass >= 0, "threshold", data.roles).astype(str)
    samples = pd.DataFrame(
        {
            "sample_id": full.sample_ids.astype(str),
            "source": full.sources.astype(str),
            "label": full.labels,
            "true_label": full.true_labels if full.true_labels is not None else np.full(len(full), -1),
            "threshold_pass": tpass,
            "is_threshold": tpass >= 0,
            "role": roles,
        }
    )
    config = cfg.run_dict() | {
        "dataset_root": full.root, "dataset_info": full.info, "image_shape": list(ds.images.shape[1:]),
        "normalization": stats_record(ds.stats, len(stats_sample(len(ds), cfg.seed))),
    }
    return ds, samples, full.classes, config


def execute(
    run: Run,
    ds: IndexedDataset | None = None,
    on_epoch: Callable[[EpochResult], None] | None = None,
    cancel: threading.Event | None = None,
    resume: bool = False,
) -> dict:
    """Train every pass of ``run`` (continuing from the last finished epoch when ``resume``) and finalize.

    The status record goes running -> done | cancelled | failed. On cancel or failure the
    finished epochs stay on disk and, when at least one epoch finished, scores and summary are
    written from them (marked ``partial``).
    """
    from engine.training.distributed import world

    rank, world_size = world()
    main = rank == 0  # under torchrun, rank 0 alone writes the run directory
    if resume and (problem := resume_problem(run, world_size)):
        raise ConfigError(problem)
    raw = run.config()
    cfg = AuditConfig.from_run_config(raw)
    ds, sets = _run_data(cfg, ds)
    samples = run.samples()
    rows = _check_same_dataset(run, cfg, samples, ds)
    stats = run_stats(raw) or ds.stats  # the run's own statistics, whatever the loader (also on --resume)
    epochs_done, history = _progress(run, cfg.passes, resume)
    status = run.update_status if main else (lambda **kw: None)
    status(
        state="running", passes=cfg.passes, epochs=cfg.epochs, epochs_done=epochs_done, history=history,
        pass_idx=0, error=None, started_at=time.time(), world_size=world_size, **owner_fields(),
    )
    device = pick_device(cfg.device)
    source = None
    n_out = cfg.n_outputs(ds.n_classes)
    tpass = samples["threshold_pass"].to_numpy()[rows]

    def record(r: EpochResult) -> None:
        epochs_done[r.pass_idx] = r.epoch + 1
        history.append({"pass": r.pass_idx, "epoch": r.epoch, "loss": r.loss, "accuracy": r.accuracy, "seconds": r.seconds})
        status(epochs_done=epochs_done, history=history, pass_idx=r.pass_idx)
        if on_epoch is not None:
            on_epoch(r)

    try:
        if stats is None:
            stats = _measure_missing_stats(run, raw, cfg, ds, main)
        source = make_source(ds.images, device, cfg.loader, cfg.workers, stats=stats, seed=cfg.seed)
        status(input_pipeline={"loader": source.kind, "workers": source.workers, "device": str(device)})
        for p in range(cfg.passes):
            if epochs_done[p] < cfg.epochs:
                _train_one_pass(run, cfg, ds, source, p, epochs_done[p], tpass, rows, len(samples), main, record, cancel)
        summary = {}
        if main:
            evaluate_final_model(run, cfg, ds, sets, tpass, source, n_out, rows, len(samples))
            summary = finalize(run)
            run.update_status(state="done", finished_at=time.time())
        _wait_for_all_ranks()  # torchrun: no rank tears down the process group while rank 0 still writes
        return summary
    except BaseException as exc:
        _stopped_early(run, main, status, exc)
        raise
    finally:
        if source is not None:
            source.close()


def _measure_missing_stats(run: Run, raw: dict, cfg: AuditConfig, ds: IndexedDataset, main: bool):
    """The normalisation statistics of a run prepared before they were recorded (its ``--resume``): measured once
    (a corrupt file fails the run here) and recorded in its config."""
    stats = normalization_stats(ds.images, cfg.workers, cfg.seed)
    if main:
        atomic_write_json(run.path / "config.json",
                          raw | {"normalization": stats_record(stats, len(stats_sample(len(ds), cfg.seed)))})
    return stats


def _stopped_early(run: Run, main: bool, status, exc: BaseException) -> None:
    """A run that stopped before the end: scores and summary from its finished epochs (``partial``), and its
    state: ``cancelled`` (the user), ``interrupted`` (Ctrl-C, or SIGTERM in the CLI: a scheduler ending the job;
    resumable) or ``failed`` (with the error and its traceback)."""
    if main:
        _finalize_partial(run)
    if isinstance(exc, Cancelled):
        status(state="cancelled", finished_at=time.time())
    elif isinstance(exc, KeyboardInterrupt):
        status(state="interrupted", finished_at=time.time())
    else:
        status(state="failed", finished_at=time.time(), error=f"{type(exc).__name__}: {exc}",
               traceback=traceback.format_exc(limit=20))


def _run_data(cfg: AuditConfig, ds: IndexedDataset | None):
    """The training samples (``ds`` when the caller has them) and the OoD evaluation sets of ``cfg``."""
    if ds is None or cfg.eval_share > 0 or cfg.ood_folder:  # (a second read only when OoD sets are asked for)
        data = load_run_dataset(cfg)
        return (data.train if ds is None else ds), data.sets
    from engine.ood.evaluate import EvalSets

    return ds, EvalSets()


def _check_same_dataset(run: Run, cfg: AuditConfig, samples: pd.DataFrame, ds: IndexedDataset) -> np.ndarray:
    """The trained samples' rows of ``samples`` (the columns of the dynamics arrays), after checking that they
    are still the dataset's training samples."""
    rows = trained_rows(samples)
    if len(rows) != len(ds) or not (samples["sample_id"].to_numpy()[rows] == ds.sample_ids.astype(str)).all():
        raise ConfigError(f"the dataset {cfg.dataset} changed since run {run.id} was created; start a new audit")
    return rows


def _progress(run: Run, passes: int, resume: bool) -> tuple[list[int], list[dict]]:
    """Epochs done per pass and the per-epoch history to continue from (none unless ``resume``)."""
    if not resume:
        return [0] * passes, []
    prev = run.raw_status()
    epochs_done = list(prev.get("epochs_done") or [0] * passes)
    # a kill between an epoch's checkpoint and its status update: the checkpoint is the truth
    epochs_done = [max(done, checkpoint_epoch(run, p) + 1) for p, done in enumerate(epochs_done)]
    history = [h for h in prev.get("history") or [] if h["epoch"] < epochs_done[h["pass"]]]
    return epochs_done, history


def _train_one_pass(run: Run, cfg: AuditConfig, ds: IndexedDataset, source, p: int, start: int, tpass: np.ndarray,
                    rows: np.ndarray, n_all: int, main: bool, record, cancel) -> None:
    """Pass ``p`` from epoch ``start``: its threshold samples relabelled to the fake class, dynamics written into
    the run's columns ``rows`` (rank 0 only), self-adaptive targets saved at the end."""
    import torch

    targets = ds.labels.copy()
    targets[tpass == p] = ds.n_classes
    prior = earlier_pass_transition(run, cfg, p) if p > 0 and cfg.correction_epoch is not None else None
    writer = DynamicsWriter(run, p, cfg.epochs, n_all, resume=start > 0, columns=rows) if main else None
    sat_out: dict = {}
    train_pass(
        cfg, source, torch.from_numpy(targets).to(source.device), cfg.n_outputs(ds.n_classes), ds.n_classes, p,
        writer, checkpoint=run.path / "checkpoints" / f"pass{p}.pt", start_epoch=start,
        on_epoch=record, cancel=cancel, sat_out=sat_out, prior=prior,
    )
    if "targets" in sat_out and main:
        save_sat_disagreement(run, p, sat_out["targets"], ds.labels, tpass, rows, n_all)


def earlier_pass_transition(run: Run, cfg: AuditConfig, p: int) -> np.ndarray | None:
    """The noise transition matrix ``T[true, given]`` from pass ``p - 1``'s end-of-pass evidence, for pass ``p``'s
    forward correction; None when that pass trained without the correction (``engine.training.correction``: an
    unfitted network, or the correction off), so that small data keeps its plain cross-entropy.

    Pass ``p - 1``'s AUM (its own epochs, window and cut-off rule, as ``compute_scores`` reads it) flags its
    samples; a flagged sample counts as truly of its suggested class (the mode of the largest other logit), every
    other sample as truly of its given label (``engine.scores.noise.estimated_joint``, the ``noise_estimate`` of
    one pass); ``transition_matrix`` turns those counts into ``T``. The pass's own threshold samples are not
    counted."""
    import torch

    from engine.scores.noise import estimated_joint, transition_matrix
    from engine.scores.registry import mode_ignoring, pass_cutoff, pass_scores

    _wait_for_all_ranks()  # torchrun: rank 0 has written the earlier pass's last epoch
    q = p - 1
    path = run.path / "checkpoints" / f"pass{q}.pt"
    if not path.is_file() or "correction_matrix" not in torch.load(path, map_location="cpu", weights_only=True):
        return None
    samples = run.samples()
    labels = samples["label"].to_numpy()
    thr = samples["threshold_pass"].to_numpy() == q
    trained = np.zeros(len(samples), dtype=bool)
    trained[trained_rows(samples)] = True
    n_classes = len(run.classes())
    targets = np.where(thr, n_classes, labels)
    raw = run.config()
    s = pass_scores(run, q, (int(raw.get("aum_start", 1)), raw.get("aum_end")), targets)
    if not s:
        return None
    kept = trained & ~thr
    cut = pass_cutoff(cfg.cutoff, s["aum"][kept], s["aum"][thr] if thr.any() else None, cfg.threshold_percentile,
                      cfg.seed)
    flagged = kept & (s["aum"] < cut)
    suggested = mode_ignoring(np.where(kept[None, :], s["other"], -1), n_classes)
    return transition_matrix(estimated_joint(labels, flagged, suggested, n_classes, kept))


def save_sat_disagreement(run: Run, pass_idx: int, targets: np.ndarray, labels: np.ndarray, tpass: np.ndarray,
                          rows: np.ndarray, n_all: int) -> None:
    """Self-adaptive training's mislabel score ``1 - t[given label]`` from a pass's final soft targets of the
    trained samples (at ``rows`` of the run; NaN for that pass's threshold samples and for samples not trained
    on), kept in ``sat.npy`` as ``(passes, samples)``."""
    import io

    path = run.path / "sat.npy"
    table = np.load(path) if path.is_file() else np.full((run.n_passes(), n_all), np.nan)
    table[pass_idx, rows] = np.where(tpass == pass_idx, np.nan, 1.0 - targets[np.arange(len(labels)), labels])
    buf = io.BytesIO()
    np.save(buf, table)
    atomic_write_bytes(path, buf.getvalue())


def checkpoint_epoch(run: Run, pass_idx: int) -> int:
    """Last epoch saved in the pass's checkpoint (its dynamics row is written before it), -1 if none."""
    import torch

    path = run.path / "checkpoints" / f"pass{pass_idx}.pt"
    if not path.is_file():
        return -1
    return int(torch.load(path, map_location="cpu", weights_only=True)["epoch"])


def evaluate_final_model(run: Run, cfg: AuditConfig, ds: IndexedDataset, sets, tpass: np.ndarray, source,
                         n_out: int, rows: np.ndarray, n_all: int) -> None:
    """Features of the final model (``features.npy``) and DDU densities / OoD report (``ood/``).

    The final model is the last pass's: its threshold samples were trained towards the fake class, so
    the Gaussians are fitted without them and their density and entropy are NaN (they kept their label
    only in a model of another pass, whose feature space is not this one).
    A density fit that fails (degenerate features) is recorded in ``ood/report.json`` without failing the audit.
    """
    from engine.ood.ddu import GDAError
    from engine.ood.evaluate import evaluate

    try:
        kept = tpass != cfg.passes - 1
        evaluate(run, cfg, source, ds.labels, kept, sets, n_out, ds.n_classes, rows=rows, n_all=n_all)
    except GDAError as exc:
        atomic_write_json(run.path / "ood" / "report.json", {"error": str(exc)})


def _wait_for_all_ranks() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _finalize_partial(run: Run) -> None:
    try:
        if run.epochs_done(0) > 0:
            finalize(run, partial=True)
    except Exception:  # a partial summary is a convenience; the original error is what matters
        pass


def run_warnings(run: Run) -> list[str]:
    """What the engine changed or assumed about the user's data (e.g. images resized), for ``summary.json``
    ``warnings``: recorded in the config's ``dataset_info`` when the run was prepared."""
    return [str(w) for w in (run.config().get("dataset_info") or {}).get("warnings", [])]


def finalize(run: Run, partial: bool = False) -> dict:
    """Write ``scores.parquet`` and ``summary.json`` from the captured dynamics; returns the summary."""
    table, info = compute_scores(run)
    from engine.ood.evaluate import load_report, load_results

    ood_results = load_results(run)
    if "train_log_density" in ood_results and len(ood_results["train_log_density"]) == len(table):
        table["ood_density"] = ood_results["train_log_density"]  # log density: low = unlike the training data
        table["entropy"] = ood_results["train_entropy"]
    if (run.path / "sat.npy").is_file():
        table["sat_disagreement"] = mean_over_passes(np.load(run.path / "sat.npy"))
    previous = run.scores()
    if previous is not None and len(previous) == len(table):  # keep scores computed on demand (engine.scores.extra)
        for name, spec in REGISTRY.items():
            if spec.cost == "extra" and name in previous.columns:
                table[name] = previous[name].to_numpy()
    from engine.review.policy import apply_to_table, summary_counts

    info = info | apply_to_table(run, table, info)  # the saved policy may rank by a score added above
    atomic_write_parquet(run.path / "scores.parquet", table)
    if not partial:
        from engine.store.views import save_margin_sample

        save_margin_sample(run)
    samples = run.samples()
    st = run.raw_status()
    rows = trained_rows(samples)
    summary = {
        "n_samples": int(len(table)),
        "n_trained": int(len(rows)),
        "n_flagged": int(table["flagged"].sum()),
        **info,
        "epochs_done": st.get("epochs_done"),
        "partial": partial,
        "warnings": run_warnings(run),
    }
    if "role" in samples:
        summary["roles"] = {str(k): int(v) for k, v in samples["role"].value_counts().sort_index().items()}
    summary.update(summary_counts(run, table, info["policy"]))  # n_flagged; P / R / F1 / AUROC over the trained rows
    true = samples["true_label"].to_numpy()[rows]
    if (true >= 0).all():
        is_error = samples["label"].to_numpy()[rows] != true
        aum = table["aum"].to_numpy()[rows]
        summary["n_label_errors"] = int(is_error.sum())
        summary["n_label_errors_scored"] = int((is_error & np.isfinite(aum)).sum())
    summary["noise_estimate"] = noise_estimate(  # over the trained samples (the others are never flagged)
        samples["label"].to_numpy()[rows], table["flagged"].to_numpy()[rows],
        table["suggested_label"].to_numpy()[rows], run.classes(),
        scored=np.isfinite(table["aum"].to_numpy()[rows]), true_labels=true if (true >= 0).all() else None,
    )
    report = load_report(run) or {}
    if report.get("ood"):
        summary["ood"] = report["ood"]
    if report.get("calibration"):
        cal = report["calibration"]
        summary["calibration"] = {k: cal[k] for k in ("temperature", "ece_before", "ece_after", "accuracy")}
    hist = st.get("history") or []
    if hist:
        summary["final_train_accuracy"] = hist[-1]["accuracy"]
        summary["train_seconds"] = float(sum(h["seconds"] for h in hist))
    atomic_write_json(run.path / "summary.json", summary)
    return summary
