"""Headless entry point: ``python -m engine audit|export ...``."""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from pathlib import Path

from engine.data.datasets import DatasetError
from engine.jobs.ownership import RunBusy, claim, describe, owner_of, release
from engine.store.runs import RunError, open_run, resume_command, resume_problem, runs_root
from engine.training.config import CUTOFFS, LOADERS, MODELS, AuditConfig, ConfigError, parse_class_list


def _parser() -> argparse.ArgumentParser:
    d = AuditConfig()
    p = argparse.ArgumentParser(prog="python -m engine", description="difficulty-audit: find mislabeled samples with AUM")
    sub = p.add_subparsers(dest="command", required=True)

    a = sub.add_parser("audit", help="train with per-epoch capture and score every sample")
    a.add_argument("--dataset", default=d.dataset, help="digits | FOLDER | MANIFEST.csv | torchvision:NAME:ROOT")
    a.add_argument("--noise", type=float, default=0.0, help="fraction of labels to flip (seeded; true labels recorded)")
    a.add_argument("--noise-kind", choices=["symmetric", "asymmetric"], default=d.noise_kind)
    a.add_argument("--image-size", type=int, default=None, help="resize file images to SxS (default: native, else 32)")
    a.add_argument("--model", default=d.model, metavar="MODEL",
                   help=f"{' | '.join(MODELS)} | torchvision:NAME (any torchvision classification architecture, "
                        "e.g. torchvision:resnet18)")
    a.add_argument("--weights", default=None, metavar="PATH",
                   help="torchvision:NAME only: a local state dict to start from (read with weights_only; the head is "
                        "replaced for the dataset's classes). Inputs then get ImageNet normalisation unless --weights-enum")
    a.add_argument("--weights-enum", default=None, metavar="ENUM",
                   help="the torchvision weights enum of the --weights file, e.g. ResNet18_Weights.IMAGENET1K_V1: its "
                        "transforms give the image size and normalisation")
    a.add_argument("--finetune", choices=["all", "head"], default=d.finetune,
                   help="with --weights: train every layer (all) or only the new head (head)")
    a.add_argument("--epochs", type=int, default=d.epochs)
    a.add_argument("--lr", type=float, default=d.lr)
    a.add_argument("--batch-size", type=int, default=d.batch_size)
    a.add_argument("--seed", type=int, default=d.seed)
    a.add_argument("--device", default=d.device, help="auto | cpu | cuda | cuda:N | mps")
    a.add_argument("--loader", choices=LOADERS, default=d.loader,
                   help="input pipeline: memory (decode once, keep on the device), stream (DataLoader with worker "
                        "processes and pinned memory, for data larger than memory), auto (stream above 4 GiB "
                        "decoded, or a quarter of free GPU memory)")
    a.add_argument("--workers", type=int, default=None,
                   help="processes decoding image files (the DataLoader's when streaming; the one-off decode for memory). "
                        "Default: none below 64 MiB decoded, else one per spare core, at most 8")
    a.add_argument("--no-threshold-samples", action="store_true", help="train without threshold samples")
    a.add_argument("--threshold-runs", type=int, default=d.threshold_runs,
                   help="passes with disjoint threshold sets (2 gives every sample an AUM)")
    a.add_argument("--threshold-percentile", type=float, default=d.threshold_percentile)
    a.add_argument("--cutoff", choices=CUTOFFS, default=d.cutoff,
                   help="auto: two-component mixture on AUM, capped by the threshold rule; threshold: Pleiss et al.")
    a.add_argument("--aum-start", type=int, default=d.aum_start, help="first epoch of the AUM window (0-based)")
    a.add_argument("--aum-end", type=int, default=None, help="epoch after the AUM window (default: all)")
    a.add_argument("--no-forward-correction", action="store_true",
                   help="train on plain cross-entropy throughout (default: from --correction-start on, forward loss "
                        "correction with a noise matrix estimated from the run's own early predictions)")
    a.add_argument("--correction-start", type=int, default=d.correction_start,
                   help="first epoch (0-based) of the forward-corrected loss (default: epochs / 6, at least 3)")
    a.add_argument("--spectral-norm", type=float, default=None, metavar="COEFF",
                   help="soft spectral normalisation of every layer with this coefficient (DDU), e.g. 3")
    a.add_argument("--sat", choices=["paper", "incerto"], default=None,
                   help="self-adaptive training: paper (Huang et al. 2020, per-sample targets) or incerto (batch targets)")
    a.add_argument("--sat-warmup", type=int, default=d.sat_warmup)
    a.add_argument("--holdout-classes", default=None,
                   help="classes to leave out of training as an OoD set: names or indices, e.g. 8,9 or cat,dog")
    a.add_argument("--ood", default=None, metavar="FOLDER", help="another image folder to evaluate as out-of-distribution")
    a.add_argument("--corruptions", default=None, help="OoD sets made from held-out ID images: noise,blur,invert")
    a.add_argument("--eval-fraction", type=float, default=None,
                   help="ID samples held out for OoD / calibration (default 0.2 when an OoD set is asked for, else 0)")
    a.add_argument("--el2n-epoch", type=int, default=None, help="epoch (0-based) of the EL2N score (default 10%% in)")
    a.add_argument("--out", default=None, help="runs folder (default ./runs or $DIFFICULTY_AUDIT_RUNS)")
    a.add_argument("--resume", metavar="RUN_DIR", default=None, help="continue an interrupted run from its last finished epoch")
    a.add_argument("--quiet", action="store_true", help="no progress bar")

    e = sub.add_parser("export", help="write the flagged samples (worst first), with review decisions, to CSV; or the "
                       "cleaned dataset as an image folder",
                       description="Exports follow the run's saved review policy (set on the AUM page). --cutoff and "
                                   "--rank-by change this export only: they do not save the policy.")
    e.add_argument("run_dir", metavar="RUN_DIR")
    e.add_argument("--out", default=None, help="CSV file to write (a description of its columns goes to OUT.json)")
    what = e.add_mutually_exclusive_group()
    what.add_argument("--all", action="store_true", help="every sample, not only the flagged ones")
    what.add_argument("--manifest", action="store_true",
                      help="cleaned manifest path,label,sample_id of every sample: relabels applied, removed samples "
                           "dropped (array datasets: the PNG images are written beside OUT, once)")
    what.add_argument("--decisions", action="store_true", help="the review decisions alone")
    what.add_argument("--dataset-folder", metavar="OUT", default=None,
                      help="the cleaned dataset as an image folder OUT/<class>/<file> (+ OUT/manifest.csv): every "
                           "sample, relabels applied, removals dropped; audit it again with --dataset OUT")
    for flag, metavar, what in (  # this export's own review policy
        ("--cutoff", "RULE", "auto | threshold | value:V | quantile:Q (e.g. value:-0.5 flags AUM < -0.5; quantile:0.1 "
                             "the 10%% most suspicious by --rank-by)"),
        ("--rank-by", "SCORE", "score that ranks (and, with value:/quantile:, cuts): aum, confidence, ... or csv:NAME "
                               "of an imported score"),
    ):
        e.add_argument(flag, default=None, metavar=metavar, help=f"{what}. Default: the run's saved policy. Not saved")
    en = sub.add_parser("ensemble", help="average one score per sample over several runs (seeds) into a CSV")
    en.add_argument("run_dirs", metavar="RUN_DIR", nargs="+")
    en.add_argument("--score", default="aum")
    en.add_argument("--normalize", action="store_true", help="rank_and_normalize each run's score first")
    en.add_argument("--out", required=True)

    il = sub.add_parser("import-logits", help="a run from per-epoch logits saved by any framework (no training)")
    il.add_argument("--logits", required=True, metavar="LOGITS",
                    help="one (epochs, samples, classes) .npy, or a folder of one (samples, classes) .npy per epoch "
                         "taken in natural name order (epoch2 before epoch10); float16/32/64, memory-mapped")
    il.add_argument("--labels", required=True, metavar="LABELS.csv",
                    help="CSV sample_id,label[,path], one row per sample in the logits' sample order; labels are "
                         "class indices, or class names (classes then in sorted order unless --classes)")
    il.add_argument("--images", default=None, metavar="ROOT", help="folder the path column is relative to (the "
                    "pages show the images)")
    il.add_argument("--classes", default=None, help="class names in logit column order, comma-separated")
    il.add_argument("--name", default=None, help="dataset name shown by the pages (default: the logits file name)")
    il.add_argument("--cutoff", choices=CUTOFFS, default="auto")
    il.add_argument("--aum-start", type=int, default=d.aum_start, help="first epoch of the AUM window (0-based)")
    il.add_argument("--aum-end", type=int, default=None, help="epoch after the AUM window (default: all)")
    il.add_argument("--out", default=None, help="runs folder (default ./runs or $DIFFICULTY_AUDIT_RUNS)")

    sc = sub.add_parser("score", help="compute on-demand scores of a run (cv_loss, self_confidence, "
                        "prediction_depth, transfer_teacher, random) into its scores table")
    sc.add_argument("run_dir", metavar="RUN_DIR")
    sc.add_argument("names", metavar="NAME", nargs="+")
    sc.add_argument("--folds", type=int, default=3, help="k of the k-fold CVLoss / self-confidence (default 3)")
    sc.add_argument("--k", type=int, default=30, help="neighbours of the prediction-depth probes (default 30)")
    sc.add_argument("--no-leave-one-out", action="store_true", help="let a sample be its own probe neighbour")
    sc.add_argument("--teacher", default="self", help="self | ARCH:/path/weights.pt (torchvision ARCH)")
    sc.add_argument("--seed", type=int, default=0)
    rt = sub.add_parser("retrain", help="does cleaning help? test accuracy of the recipe trained on the noisy, "
                        "cleaned and (when known) true labels")
    rt.add_argument("run_dir", metavar="RUN_DIR")
    rt.add_argument("--policy", choices=["remove", "relabel", "both"], default="relabel",
                    help="what cleaning does to flagged samples without a review decision: drop them, give them "
                         "their suggested label, or relabel where the model agrees and drop the rest (default "
                         "relabel: it recovered the most accuracy over 20/40%% symmetric and 20%% asymmetric noise, "
                         "bench/RESULTS.md)")
    rt.add_argument("--test", metavar="TRUSTED_SET", default=None,
                    help="a trusted test set (folder, manifest .csv, torchvision:NAME:ROOT) with the run's class names; "
                         "default for runs with known true labels: 20%% of the run's samples, held out, true labels")
    rt.add_argument("--seeds", type=int, default=3, help="trainings per variant, seeds averaged (default 3)")
    de = sub.add_parser("delete", help="delete a run directory for good (refused while a process trains or owns it)")
    de.add_argument("run_dir", metavar="RUN", help="run id, or the run's directory inside the runs folder")
    de.add_argument("--out", default=None, help="runs folder the run is in (default ./runs or $DIFFICULTY_AUDIT_RUNS)")
    return p


def _percent_bar(desc: str):
    """A tqdm bar in percent and the ``progress(fraction, message)`` callback that moves it."""
    from tqdm import tqdm

    bar = tqdm(total=100, unit="%", desc=desc)

    def progress(frac: float, msg: str) -> None:
        bar.n = int(frac * 100)
        bar.set_postfix_str(msg)
        bar.refresh()

    return bar, progress


def _retrain(args: argparse.Namespace) -> int:
    from engine.training.retrain import retrain, verdict

    run = open_run(args.run_dir)
    bar, progress = _percent_bar("retraining")
    r = retrain(run, args.policy, args.test, args.seeds, progress=progress)
    bar.n = 100
    bar.close()
    print(f"trusted test set: {r['test_set']}")
    print(f"cleaning ({r['policy']}): {r['n_removed']} removed, {r['n_relabelled']} relabelled of {r['n_train']}")
    for name in ("noisy", "cleaned", "oracle"):
        if f"accuracy_{name}" in r:
            print(f"test accuracy, {name:>7} labels: {r[f'accuracy_{name}']:.4f} ± {r[f'accuracy_{name}_std']:.4f} "
                  f"({len(r['seeds'])} seed{'s' if len(r['seeds']) > 1 else ''})")
    if said := verdict(r):
        print(said)
    print(f"written to {run.path / 'retrain.json'}")
    return 0


def _ensemble(args: argparse.Namespace) -> int:
    from engine.review.export import to_csv_bytes
    from engine.scores.correlations import ensemble, rank_and_normalize
    from engine.scores.registry import REGISTRY
    from engine.store.runs import atomic_write_bytes, atomic_write_json

    tables = []
    for ref in args.run_dirs:
        run = open_run(ref)
        t = run.scores()
        if t is None or args.score not in t.columns:
            raise RunError(f"run {run.id} has no score {args.score!r}")
        t = t[["sample_id", args.score]].copy()
        if args.normalize:
            t[args.score] = rank_and_normalize(t[args.score])
        tables.append(t)
    out = ensemble(tables, args.score)
    atomic_write_bytes(args.out, to_csv_bytes(out))
    spec = REGISTRY.get(args.score)
    meaning = spec.title if spec else args.score
    atomic_write_json(Path(f"{args.out}.json"), {"kind": "ensemble", "runs": [str(r) for r in args.run_dirs], "columns": {
        "sample_id": {"meaning": "the sample's id"},
        args.score: {"meaning": f"mean over the runs of {meaning}" + (" after rank_and_normalize (rank in [0, 1])"
                                                                      if args.normalize else ""),
                     "paper": spec.paper if spec else None, "direction": spec.direction if spec else None},
        "n_runs": {"meaning": "runs that scored the sample"}}})
    print(f"wrote {len(out):,} samples: {args.score} averaged over {len(tables)} runs to {args.out}")
    return 0


def _score(args: argparse.Namespace) -> int:
    from engine.scores.extra import compute
    from engine.scores.registry import REGISTRY

    run = open_run(args.run_dir)
    bar, progress = _percent_bar("scoring")
    written = compute(run, args.names, folds=args.folds, k=args.k, teacher=args.teacher,
                      leave_one_out=not args.no_leave_one_out, seed=args.seed, progress=progress)
    bar.close()
    table = run.scores()
    for name in written:
        v = table[name]
        print(f"{name}: mean {v.mean():.4f}, min {v.min():.4f}, max {v.max():.4f} ({REGISTRY[name].direction})")
    return 0


def config_from_args(args: argparse.Namespace) -> AuditConfig:
    """The one mapping from the ``audit`` options (CLI flags, or ``engine.audit`` keywords) to an ``AuditConfig``."""
    return AuditConfig(
        dataset=args.dataset, noise=args.noise, noise_kind=args.noise_kind, image_size=args.image_size,
        model=args.model, weights=args.weights, weights_enum=args.weights_enum, finetune=args.finetune,
        epochs=args.epochs, lr=args.lr, batch_size=args.batch_size, seed=args.seed,
        device=args.device, loader=args.loader, workers=args.workers,
        threshold_samples=not args.no_threshold_samples, threshold_runs=args.threshold_runs,
        threshold_percentile=args.threshold_percentile, cutoff=args.cutoff, aum_start=args.aum_start,
        aum_end=args.aum_end, forward_correction=not args.no_forward_correction,
        correction_start=args.correction_start, el2n_epoch=args.el2n_epoch, spectral_norm=args.spectral_norm, sat=args.sat,
        sat_warmup=args.sat_warmup, ood_folder=args.ood, eval_fraction=args.eval_fraction,
        holdout_classes=parse_class_list(args.holdout_classes),
        corruptions=(list(args.corruptions) if isinstance(args.corruptions, list | tuple) else
                     [c.strip() for c in args.corruptions.split(",")] if args.corruptions else None),
    )


def format_summary(summary: dict, run_path: Path) -> str:
    rule = (summary.get("policy") or {}).get("text") or f"cut-off {summary['cutoff']:.3f}, {summary['cutoff_method']}"
    lines = [f"run: {run_path}", f"samples: {summary['n_samples']}", f"flagged: {summary['n_flagged']}  ({rule})"]
    if summary.get("n_unscored"):
        lines.append(f"unscored: {summary['n_unscored']} (held out of training, or threshold samples of a single "
                     "threshold run; see the role column of samples.parquet)")
    for warning in summary.get("warnings") or []:
        lines.append(f"warning: {warning}")
    for name, o in (summary.get("ood") or {}).items():
        lines.append(f"OoD '{name}': AUROC density {o['auroc_density']:.3f}, entropy {o['auroc_entropy']:.3f}, "
                     f"max-softmax {o['auroc_max_softmax']:.3f}")
    if summary.get("calibration"):
        c = summary["calibration"]
        lines.append(f"calibration (held-out ID): ECE {c['ece_before']:.3f} -> {c['ece_after']:.3f} at T={c['temperature']:.2f}")
    if "precision" in summary and summary.get("n_label_errors"):
        lines.append(
            f"known label errors: {summary['n_label_errors']}   precision {summary['precision']:.3f}  "
            f"recall {summary['recall']:.3f}  F1 {summary['f1']:.3f}  AUROC {summary['auroc']:.3f}"
        )
    if summary.get("train_seconds") is not None:
        lines.append(f"training time: {summary['train_seconds']:.1f} s")
    return "\n".join(lines)


def _audit(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from engine.training import audit
    from engine.training.distributed import broadcast_object, init_from_env, is_main, world
    from engine.training.loop import Cancelled

    if args.resume:
        run = open_run(args.resume, args.out)
        init_from_env(run.config().get("device", "auto"))
        st = run.status()
        if st.get("state") == "done":
            print(f"run {run.id} is already done; nothing to resume", file=sys.stderr)
            return 0
        problem = resume_problem(run, world()[1])  # audit.execute refuses it too; here before a progress bar shows
        if problem:
            raise ConfigError(problem)
        busy = None
        if is_main():  # rank 0 alone checks and claims the run (no rank sees its own rank 0's claim as a rival)
            rec = owner_of(run)
            if st.get("state") in ("running", "pending") or rec:  # e.g. queued or training in the dashboard
                who = describe(rec) if rec else f"process {st.get('pid')} on {st.get('host')}"
                busy = f"run {run.id} is {st.get('state')} in {who}; not resuming it twice"
            else:
                try:
                    claim(run, "command line --resume")
                except RunBusy as exc:  # claimed between the check and now
                    busy = str(exc)
        busy = broadcast_object(busy)
        if busy:
            if is_main():
                print(busy, file=sys.stderr)
            return 2
        ds = None
    else:
        cfg_obj = config_from_args(args)
        init_from_env(cfg_obj.device)
        created, error = None, None
        if is_main():  # rank 0 validates and creates the run; the others open it
            try:
                created, ds = audit.prepare(cfg_obj, args.out or runs_root())
            except (ConfigError, DatasetError) as exc:
                error = exc
        created_path, error_text = broadcast_object((str(created.path) if created else None, str(error) if error else None))
        if error is not None:
            raise error
        if error_text is not None:
            raise ConfigError(error_text)
        if not is_main():
            run, ds = open_run(created_path), None
        else:
            run = created
    cfg = run.config()
    passes = AuditConfig.from_run_config(cfg).passes
    total = cfg["epochs"] * passes
    initial = sum(run.raw_status().get("epochs_done") or []) if args.resume else 0
    bar = tqdm(total=total, initial=initial, unit="epoch", disable=args.quiet or not is_main(),
               desc=f"{run.id} ({passes} pass(es) x {cfg['epochs']} epochs)")

    def on_epoch(r):
        bar.set_postfix_str(f"pass {r.pass_idx + 1}/{passes} epoch {r.epoch + 1} loss {r.loss:.3f} acc {r.accuracy:.3f}",
                            refresh=False)
        bar.update(1)

    if is_main() and not args.resume:  # rank 0 owns the run while it trains (the dashboard refuses to resume it)
        claim(run, "command line audit")
    previous = signal.signal(signal.SIGTERM, _terminated) if threading.current_thread() is threading.main_thread() else None
    try:
        summary = audit.execute(run, ds, on_epoch=on_epoch, resume=bool(args.resume))
    except KeyboardInterrupt as exc:
        bar.close()
        if is_main():
            why = "terminated (SIGTERM)" if isinstance(exc, Terminated) else "interrupted"
            print(f"{why}; finished epochs are kept. Continue with: {resume_command(run, world()[1])}",
                  file=sys.stderr)
        return 143 if isinstance(exc, Terminated) else 130
    except Cancelled:
        bar.close()
        print(f"cancelled; finished epochs are kept in {run.path}", file=sys.stderr)
        return 1
    finally:
        bar.close()  # an error message starts on its own line, not after the bar
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
        release(run)
    if is_main():
        print(format_summary(summary, run.path))
    return 0


class Terminated(KeyboardInterrupt):
    """SIGTERM (a scheduler ending the job, ``kill``): handled like Ctrl-C, so the run is marked interrupted."""


def _terminated(signum, frame):
    raise Terminated()


def _import_logits(args: argparse.Namespace) -> int:
    from engine.capture.logits import import_logits

    run = import_logits(args.logits, args.labels, out=args.out or runs_root(), images=args.images,
                        classes=[c.strip() for c in args.classes.split(",")] if args.classes else None,
                        name=args.name, cutoff=args.cutoff, aum_start=args.aum_start, aum_end=args.aum_end)
    print(format_summary(run.summary(), run.path))
    return 0


def _export(args: argparse.Namespace) -> int:
    run = open_run(args.run_dir)
    state = run.status().get("state")
    note = "" if state == "done" else f"  WARNING: run is {state}, not done; scores cover its finished epochs only"
    if args.dataset_folder:
        if args.cutoff or args.rank_by or args.out:
            raise ConfigError("--dataset-folder takes no --out, --cutoff or --rank-by: the cleaned dataset follows the "
                              "review decisions (removals dropped, relabels applied), not the flags")
        from engine.review.cleaned import write_cleaned_folder

        n = write_cleaned_folder(run, args.dataset_folder)
        print(f"wrote {n} images (cleaned dataset) to {args.dataset_folder}{note}")
        return 0
    if not args.out:
        raise ConfigError("export needs --out FILE.csv (or --dataset-folder OUT for the cleaned image folder)")
    if args.decisions:  # what scripts poll: no policy, no scores, no pandas (engine.review.decisions)
        from engine.review.decisions import write_decisions_csv

        n = write_decisions_csv(run, args.out)
        print(f"wrote {n} rows (decisions) to {args.out}{note}")
        return 0
    from engine.review.export import export_csv
    from engine.review.policy import load_policy, make_policy

    policy = None
    if args.cutoff or args.rank_by:
        saved = load_policy(run)
        policy = make_policy(args.cutoff or saved.cutoff, args.rank_by or saved.score)
    kind = "all" if args.all else "manifest" if args.manifest else "flagged"
    n = export_csv(run, args.out, kind=kind, policy=policy)
    print(f"wrote {n} rows ({kind}) to {args.out}{note}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return _dispatch(args)
    finally:
        dist = sys.modules.get("torch.distributed")  # only when a command loaded torch (export does not)
        if dist is not None and dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()


def _dispatch(args: argparse.Namespace) -> int:
    try:
        if args.command == "audit":
            return _audit(args)
        if args.command == "score":
            return _score(args)
        if args.command == "ensemble":
            return _ensemble(args)
        if args.command == "import-logits":
            return _import_logits(args)
        if args.command == "retrain":
            return _retrain(args)
        if args.command == "delete":
            from engine.store.runs import delete_run

            print(f"deleted run {delete_run(args.run_dir, args.out)}")
            return 0
        return _export(args)
    except ValueError as exc:  # ConfigError, DatasetError, RunError, ScoreError and any other bad input: one line
        from engine.training.distributed import is_main

        if is_main():  # under torchrun every rank raises the same error: say it once
            print(f"error: {_one_line(exc)}", file=sys.stderr)
        return 2


def _one_line(exc: BaseException) -> str:
    """The message of ``exc`` on one line (with its type when it is not one of the engine's own errors)."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    own = type(exc).__module__.startswith("engine.")  # ConfigError, DatasetError, RunError, ScoreError, ...
    return text if own else f"{type(exc).__name__}: {text}"
