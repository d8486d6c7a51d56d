"""Screening of detection levers under class-dependent noise (issue 19): one audit per (data, T estimator), the
raw material kept for post-hoc scores.

``run``: one real default audit (``audit.prepare`` / ``execute``, the engine's own code) with two screening hooks:
every training forward pass's logits are recorded per (pass, epoch, sample), and the forward correction's ``T``
can be replaced at the correction epoch by another estimator (``--estimator``: ``unanimous`` = the engine's,
``cj`` = cleanlab-style calibrated confident joint on the mean estimation-epoch probabilities, ``oracle`` = the
true T). Writes ``NAME.npz``: labels, true labels, threshold passes, logits ``(passes, epochs, N, C)`` (float16),
each pass's final-model features and eval logits, the estimated and true ``T``, and the summary figures.

``analyze``: post-hoc on the ``.npz`` files: T estimation errors of each estimator from the same epochs 2-4
(identical in every run of a seed: the correction starts after them), and the AUROC / best F1 of AUM, the
corrected posterior, deep-kNN label agreement (Bahri et al. 2020) and their combinations.

Usage:
  python bench/detection_screen.py run --setting asym20 --seed 0 --estimator cj --out /tmp/screen
  python bench/detection_screen.py run --folder sample_data/digits_folder --size 16 --estimator cj --out /tmp/screen
  python bench/detection_screen.py analyze /tmp/screen/*.npz
"""

from __future__ import annotations

import argparse
import re
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

REC: dict = {"pass": 0, "epoch": 0, "logits": None, "true": None, "T": {}}


def install_hooks(estimator: str, n: int, n_out: int, epochs: int, passes: int) -> None:
    import torch

    from engine.scores.noise import transition_matrix
    from engine.training import correction, loop

    REC["logits"] = np.zeros((passes, epochs, n, n_out), dtype=np.float32)
    orig_init, orig_train, orig_add = loop._Pass.__init__, loop._Pass.train_epoch, loop._CaptureBuffers.add
    orig_end = correction.ForwardCorrection.end_epoch

    def init(self, cfg, source, targets, n_outputs, n_real, pass_idx, rank, size):
        REC["pass"] = pass_idx
        orig_init(self, cfg, source, targets, n_outputs, n_real, pass_idx, rank, size)

    def train_epoch(self, epoch, capture, cancel):
        REC["epoch"] = epoch
        orig_train(self, epoch, capture, cancel)

    def add(self, idx, logits, y, keep):
        REC["logits"][REC["pass"], REC["epoch"], idx.cpu().numpy()] = logits.detach().float().cpu().numpy()
        orig_add(self, idx, logits, y, keep)

    def end_epoch(self, epoch, pred, targets):
        orig_end(self, epoch, pred, targets)
        if self.matrix is None or epoch != self.start - 1:
            return
        y = np.asarray(targets)
        real = y < self.n_real
        p = REC["pass"]
        if estimator != "unanimous":
            if estimator == "oracle":
                counts = np.zeros((self.n_real, self.n_real))
                np.add.at(counts, (y[real], REC["true"][real]), 1)
            else:
                z = REC["logits"][p, list(self.estimate_epochs)][:, real]
                base, shrink = SHRUNK.get(estimator, (estimator, 0.0))
                counts = ESTIMATORS[base](y[real], z, self.n_real)
            t = np.eye(self.n_outputs)
            t[: self.n_real, : self.n_real] = transition_matrix(counts)
            if estimator in SHRUNK:  # towards the identity: T <- (1 - s) T + s I
                t = (1 - shrink) * t + shrink * np.eye(self.n_outputs)
            self.matrix = torch.as_tensor(t, dtype=torch.float32, device=self.device)
        REC["T"][p] = self.matrix.cpu().numpy()[: self.n_real, : self.n_real]

    loop._Pass.__init__, loop._Pass.train_epoch, loop._CaptureBuffers.add = init, train_epoch, add
    correction.ForwardCorrection.end_epoch = end_epoch


def mean_probs(logits: np.ndarray, n_real: int) -> np.ndarray:
    """Mean over epochs of the softmax over the real classes: ``(E, N, C) -> (N, c)``."""
    z = logits[..., :n_real].astype(np.float64)
    z = z - z.max(axis=-1, keepdims=True)
    p = np.exp(z)
    p /= p.sum(axis=-1, keepdims=True)
    return p.mean(axis=0)


def cj_counts(labels: np.ndarray, logits: np.ndarray, c: int, stable: bool = False) -> np.ndarray:
    """cleanlab's calibrated confident joint (Northcutt et al. 2021, ``compute_confident_joint`` +
    ``calibrate_confident_joint``) on the mean estimation-epoch probabilities ``p``: thresholds ``t_j = mean p_j
    over samples given j``; a sample given ``i`` counts in ``C[i, j*]``, ``j* = argmax_{j: p_j >= t_j} p_j`` (not
    counted if no class clears its threshold); rows then scaled to the given-label counts. ``stable``: an
    off-diagonal count also needs the same prediction ``j*`` in every estimation epoch (else counted as ``i``)."""
    y = np.asarray(labels)
    probs = mean_probs(logits, c)
    t = np.array([probs[y == j, j].mean() if (y == j).any() else 1.0 for j in range(c)])
    above = probs >= t[None, :] - 1e-6
    masked = np.where(above, probs, -1.0)
    j = masked.argmax(axis=1)
    ok = above.any(axis=1)
    if stable:
        pred = logits[..., :c].argmax(axis=-1)
        j = np.where((pred == j[None, :]).all(axis=0), j, y)
    counts = np.zeros((c, c))
    np.add.at(counts, (y[ok], j[ok]), 1)
    n_given = np.bincount(y, minlength=c).astype(float)
    rows = counts.sum(axis=1, keepdims=True)
    return np.where(rows > 0, counts / np.maximum(rows, 1) * n_given[:, None], np.diag(n_given))


def argmax_counts(labels: np.ndarray, logits: np.ndarray, c: int) -> np.ndarray:
    """Given label vs argmax of the mean estimation-epoch probabilities (every sample counted)."""
    counts = np.zeros((c, c))
    np.add.at(counts, (labels, mean_probs(logits, c).argmax(axis=1)), 1)
    return counts


def unanimous_counts(labels: np.ndarray, logits: np.ndarray, c: int) -> np.ndarray:
    """The engine's rule: the class predicted in every estimation epoch, else the given label."""
    pred = logits[..., :c].argmax(axis=-1)
    same = (pred == pred[:1]).all(axis=0)
    counts = np.zeros((c, c))
    np.add.at(counts, (labels, np.where(same, pred[0], labels)), 1)
    return counts


def soft_counts(labels: np.ndarray, logits: np.ndarray, c: int) -> np.ndarray:
    """Expected confusion: per given label, the summed mean probabilities of its samples."""
    counts = np.zeros((c, c))
    np.add.at(counts, labels, mean_probs(logits, c))
    return counts


def anchor_counts(labels: np.ndarray, logits: np.ndarray, c: int, top: float = 3.0, own: bool = False) -> np.ndarray:
    """Patrini et al. 2017's anchor points: row ``j`` of ``T`` = the mean output over the samples in the top ``top``%
    by ``p_j`` (``own``: among the samples given ``j``). Returned as ``T.T``, which ``transition_matrix`` turns
    back into ``T``."""
    p = mean_probs(logits, c)
    t = np.eye(c)
    for j in range(c):
        pool = (labels == j) if own else np.ones(len(p), dtype=bool)
        if pool.any():
            t[j] = p[pool & (p[:, j] >= np.percentile(p[pool, j], 100 - top))].mean(axis=0)
    return t.T


ESTIMATORS = {"cj": cj_counts, "cjstable": lambda y, z, c: cj_counts(y, z, c, stable=True), "argmax": argmax_counts,
              "unanimous": unanimous_counts, "cj_last": lambda y, z, c: cj_counts(y, z[-1:], c), "soft": soft_counts,
              "anchor3": anchor_counts, "anchor1": lambda y, z, c: anchor_counts(y, z, c, 1.0),
              "anchor_own10": lambda y, z, c: anchor_counts(y, z, c, 10.0, own=True)}
SHRUNK = {"cjhalf": ("cj", 0.5)}  # estimator: (base estimator, weight of the identity)


def pass_features(run, cfg, ds, n_out: int, n_real: int):
    """Each pass's final model: penultimate features and real-class logits of every training sample (eval mode)."""
    import torch

    from engine.data.pipeline import make_source, normalize, run_stats, sequential
    from engine.training.models import model_for, pick_device

    device = pick_device(cfg.device)
    feats, logits = [], []
    with make_source(ds.images, device, cfg.loader, cfg.workers, stats=run_stats(run.config())) as src:
        for p in range(cfg.passes):
            model = model_for(cfg, src.channels, n_out, pretrained=False).to(device)
            state = torch.load(run.path / "checkpoints" / f"pass{p}.pt", map_location=device, weights_only=True)
            model.load_state_dict(state["model"])
            model.eval()
            f_all, z_all = [], []
            with torch.inference_mode():
                for _, x in sequential(src, 512):
                    f = model.features(normalize(x, src.mean, src.std))
                    f_all.append(f.float().cpu())
                    z_all.append(model.head(f).float().cpu())
            feats.append(torch.cat(f_all).numpy())
            logits.append(torch.cat(z_all).numpy())
    return np.stack(feats), np.stack(logits)


def cmd_run(args) -> None:
    import torch

    from bench.detection import SETTINGS, write_half
    from engine.training import audit
    from engine.training.config import AuditConfig

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        wrong = None
        if args.folder:
            folder = ROOT / args.folder
            wrong = set(re.findall(r"\| (\d/digit_\d+\.png) \|", (folder.parent / "WRONG_LABELS.md").read_text()))
            cfg = AuditConfig(dataset=str(folder), image_size=args.size)
            name = f"folder{args.size}"
        elif args.half is not None:
            path, wrong = write_half(Path(tmp) / "halves", args.half, 0.2, 0)
            cfg = AuditConfig(dataset=str(path))
            name = f"half{args.half}"
        else:
            noise, kind = SETTINGS[args.setting]
            cfg = AuditConfig(noise=noise, noise_kind=kind, seed=args.seed)
            name = f"{args.setting}_s{args.seed}"
        cfg.forward_correction = args.estimator != "off"
        if args.epochs:
            cfg.epochs = args.epochs
        if args.weight_decay is not None:
            cfg.weight_decay = args.weight_decay
        name += f"_{args.estimator}" + (f"_e{args.epochs}" if args.epochs else "")
        name += f"_wd{args.weight_decay:g}" if args.weight_decay is not None else ""
        run, ds = audit.prepare(cfg, tmp)
        samples = run.samples()
        if wrong is not None:
            err = samples["sample_id"].astype(str).isin(wrong).to_numpy()
            true = np.where(err, -1, samples["label"].to_numpy())  # unknown true class of a misfiled image
        else:
            true = samples["true_label"].to_numpy()
        REC["true"] = true
        n_out = cfg.n_outputs(ds.n_classes)
        install_hooks(args.estimator if args.estimator != "off" else "unanimous", len(ds), n_out, cfg.epochs,
                      cfg.passes)
        t0 = time.perf_counter()
        audit.execute(run, ds)
        seconds = time.perf_counter() - t0
        table = run.scores()
        labels = samples["label"].to_numpy()
        is_err = (labels != true)
        from engine.scores.metrics import detection_metrics

        m = detection_metrics(table["flagged"].to_numpy(bool), -table["aum"].to_numpy(), is_err)
        feats, eval_logits = pass_features(run, cfg, ds, n_out, ds.n_classes)
        c = ds.n_classes
        t_true = None
        if (true >= 0).all():
            from engine.scores.noise import transition_matrix

            counts = np.zeros((c, c))
            np.add.at(counts, (labels, true), 1)
            t_true = transition_matrix(counts)
        np.savez_compressed(
            Path(args.out) / f"{name}.npz", labels=labels, true=true, is_err=is_err,
            tpass=samples["threshold_pass"].to_numpy(), logits=REC["logits"].astype(np.float16),
            feats=feats.astype(np.float16), eval_logits=eval_logits, aum=table["aum"].to_numpy(),
            flagged=table["flagged"].to_numpy(bool), cutoff=run.summary()["cutoff"],
            T=np.stack([REC["T"][p] for p in sorted(REC["T"])]) if REC["T"] else np.zeros(0),
            T_true=t_true if t_true is not None else np.zeros(0), seconds=seconds, n_classes=c,
            correction_epoch=cfg.correction_epoch if cfg.correction_epoch is not None else -1,
        )
        print(f"{name}: F1 {m['f1']:.3f} AUROC {m['auroc']:.4f} P {m['precision']:.3f} R {m['recall']:.3f} "
              f"flagged {int(table['flagged'].sum())} errors {int(is_err.sum())} [{seconds:.0f} s]", flush=True)


# ---------------------------------------------------------------- post-hoc


def auroc(score: np.ndarray, err: np.ndarray) -> float:
    from engine.scores.metrics import ranking_auroc

    return ranking_auroc(score, err)


def best_f1(score: np.ndarray, err: np.ndarray) -> float:
    """Best F1 over every cut-off of a suspicion score (higher = more suspicious)."""
    ok = np.isfinite(score)
    s, e = score[ok], err[ok]
    order = np.argsort(-s, kind="stable")
    tp = np.cumsum(e[order])
    k = np.arange(1, len(s) + 1)
    f1 = 2 * tp / (k + e.sum())
    return float(f1.max())


def f1_of(flag: np.ndarray, err: np.ndarray) -> float:
    tp = (flag & err).sum()
    return float(2 * tp / (flag.sum() + err.sum())) if flag.sum() + err.sum() else 1.0


def softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=-1, keepdims=True)
    p = np.exp(z)
    return p / p.sum(axis=-1, keepdims=True)


def knn_agreement(feats: np.ndarray, labels: np.ndarray, use: np.ndarray, k: int) -> np.ndarray:
    """Deep kNN (Bahri et al. 2020): fraction of a sample's ``k`` nearest neighbours (cosine, among ``use``,
    itself excluded) that carry its given label."""
    f = feats.astype(np.float64)
    f /= np.linalg.norm(f, axis=1, keepdims=True) + 1e-12
    sim = f @ f[use].T
    cols = np.flatnonzero(use)
    sim[cols, np.arange(len(cols))] = -np.inf  # a sample is not its own neighbour
    nn = np.argpartition(-sim, k, axis=1)[:, :k]
    return (labels[cols[nn]] == labels[:, None]).mean(axis=1)


def rank01(x: np.ndarray) -> np.ndarray:
    """Rank of each value scaled to (0, 1], NaN kept."""
    out = np.full(len(x), np.nan)
    ok = np.isfinite(x)
    out[ok] = (np.argsort(np.argsort(x[ok], kind="stable"), kind="stable") + 1) / ok.sum()
    return out


def analyze_one(path: Path) -> dict:
    d = np.load(path)
    labels, err, tpass = d["labels"], d["is_err"], d["tpass"]
    c = int(d["n_classes"])
    passes = d["logits"].shape[0]
    aum = d["aum"]
    out = {"name": path.stem, "F1": f1_of(d["flagged"], err), "AUROC aum": auroc(-aum, err),
           "bestF1 aum": best_f1(-aum, err), "s": float(d["seconds"])}
    # corrected posterior p(given) of each pass's final model (eval mode), mean over kept passes
    pg, knn = [], {5: [], 10: [], 20: []}
    for p in range(passes):
        kept = tpass != p
        pr = softmax(d["eval_logits"][p][:, :c].astype(np.float64))
        pg.append(np.where(kept, pr[np.arange(len(labels)), labels], np.nan))
        for k in knn:
            a = knn_agreement(d["feats"][p], labels, kept, k)
            knn[k].append(np.where(kept, a, np.nan))
    pg = np.nanmean(np.stack(pg), axis=0)
    out["AUROC p_final"] = auroc(-pg, err)
    for k, v in knn.items():
        v = np.nanmean(np.stack(v), axis=0)
        out[f"AUROC knn{k}"] = auroc(-v, err)
        if k == 10:
            knn10 = v
    r_aum = rank01(-aum)
    out["AUROC aum+knn10"] = auroc(r_aum + rank01(-knn10), err)
    out["AUROC aum+p_final"] = auroc(r_aum + rank01(-pg), err)
    out["bestF1 aum+knn10"] = best_f1(r_aum + rank01(-knn10), err)
    # T errors: each estimator on the same estimation epochs (those before the correction)
    # per-epoch margin AUROC (mean over kept passes) and early windows
    margins = []
    for p in range(passes):
        z = d["logits"][p].astype(np.float64)[..., : c + (1 if z_has_fake(d, c) else 0)]
        zy = np.take_along_axis(z, labels[None, :, None], axis=2)[..., 0]
        zo = z.copy()
        np.put_along_axis(zo, labels[None, :, None], -np.inf, axis=2)
        margins.append(np.where((tpass != p)[None, :], zy - zo.max(axis=2), np.nan))
    m = np.nanmean(np.stack(margins), axis=0)  # (epochs, N)
    per_epoch = [auroc(-m[e], err) for e in range(m.shape[0])]
    out["AUROC best epoch"] = f"{max(per_epoch):.4f}@{int(np.argmax(per_epoch))}"
    for lo, hi in ((1, 10), (5, 15), (5, 30)):
        out[f"AUROC aum{lo}-{hi}"] = auroc(-m[lo:hi].mean(axis=0), err)
    # cut-off rules on the same AUM: the run's automatic one, AUM < 0, and a per-given-label mixture (the engine's
    # gmm_cutoff on each given label's AUM, bounded by the mean threshold-sample cut-off like the automatic rule)
    from engine.capture import dynamics as dyn

    thr, pass_aum = [], []
    for p in range(passes):
        z = d["logits"][p].astype(np.float64)
        kept = tpass != p
        tgt = np.where(kept, labels, c)
        zy = np.take_along_axis(z, tgt[None, :, None], axis=2)[..., 0]
        zo = z.copy()
        np.put_along_axis(zo, tgt[None, :, None], -np.inf, axis=2)
        a = (zy - zo.max(axis=2))[1:].mean(axis=0)
        thr.append(dyn.threshold_cutoff(a[~kept], 99.0))
        pass_aum.append(np.where(kept, a, np.nan))
    fin = np.isfinite(aum)
    flag = np.zeros(len(aum), dtype=bool)
    for i in range(c):
        g = fin & (labels == i)
        cut = dyn.gmm_cutoff(aum[g], seed=0) if g.sum() else -np.inf
        flag |= g & (aum < (min(cut, np.mean(thr)) if np.isfinite(cut) else -np.inf))
    out["F1 aum<0"] = f1_of(fin & (aum < 0), err)
    out["F1 per-class gmm"] = f1_of(flag, err)
    # T: each estimator on the same estimation epochs (those before the correction): L1 error per row against the
    # true T, and the off-diagonal mass per row (spurious noise on data with few wrong labels)
    start = int(d["correction_epoch"])
    if start > 0:
        est = list(range(max(1, start - 3), start))
        from engine.scores.noise import transition_matrix

        for p in range(passes):
            real = tpass != p
            z = d["logits"][p, est][:, real].astype(np.float32)
            ts = {nm: transition_matrix(fn(labels[real], z, c)) for nm, fn in ESTIMATORS.items()}
            ts["run"] = d["T"][p]
            for nm, t in ts.items():
                out.setdefault(f"Toff {nm}", []).append((t.sum() - np.trace(t)) / c)
                if d["T_true"].size:
                    out.setdefault(f"Terr {nm}", []).append(np.abs(t - d["T_true"]).sum() / c)
                    if d["T_true"][5, 6] > 0 and c > 6:  # the swapped pair of asymmetric digits noise
                        out.setdefault(f"T56 {nm}", []).append((t[5, 6] + t[6, 5]) / 2)
        if d["T_true"].size:
            t = d["T_true"]
            out["Toff true"] = (t.sum() - np.trace(t)) / c
        for k in [k for k in out if k.startswith(("Terr", "Toff", "T56")) and isinstance(out[k], list)]:
            out[k] = float(np.mean(out[k]))
    return out


def z_has_fake(d, c: int) -> bool:
    return d["logits"].shape[-1] > c


def cmd_pairs(args) -> None:
    """Per given label: samples, wrong labels, AUROC of AUM within the label, flags and misses at the run's cut-off,
    and the run's T row next to the true one (which pairs carry the errors)."""
    for path in args.files:
        d = np.load(path)
        labels, err, aum, flagged = d["labels"], d["is_err"], d["aum"], d["flagged"]
        c = int(d["n_classes"])
        print(f"\n{Path(path).stem}: cut-off {float(d['cutoff']):.3f}")
        print("| given | n | wrong | AUROC within | flagged right / wrong | missed | T[given, given] est / true |")
        print("|---|---|---|---|---|---|---|")
        for i in range(c):
            g = (labels == i) & np.isfinite(aum)
            e = err[g]
            a = auroc(-aum[g], e) if 0 < e.sum() < g.sum() else float("nan")
            t_est = float(np.mean([t[i, i] for t in d["T"]])) if d["T"].size else float("nan")
            t_true = float(d["T_true"][i, i]) if d["T_true"].size else float("nan")
            print(f"| {i} | {g.sum()} | {e.sum()} | {a:.4f} | {(flagged[g] & e).sum()} / {(flagged[g] & ~e).sum()} | "
                  f"{(~flagged[g] & e).sum()} | {t_est:.3f} / {t_true:.3f} |")


def cmd_analyze(args) -> None:
    rows = [analyze_one(Path(p)) for p in args.files]
    keys = list(dict.fromkeys(k for r in rows for k in r))
    print("| " + " | ".join(keys) + " |")
    print("|" + "---|" * len(keys))
    for r in rows:
        print("| " + " | ".join(f"{r[k]:.4f}" if isinstance(r.get(k), float) else str(r.get(k, "")) for k in keys) + " |")


def main() -> None:
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run")
    r.add_argument("--setting", default="asym20")
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--folder", default=None)
    r.add_argument("--size", type=int, default=None)
    r.add_argument("--half", type=int, default=None)
    r.add_argument("--epochs", type=int, default=None)
    r.add_argument("--weight-decay", type=float, default=None)
    r.add_argument("--estimator", default="unanimous", choices=["unanimous", "cj", "cjstable", "cjhalf", "argmax", "oracle", "off"])
    r.add_argument("--out", required=True)
    a = sub.add_parser("analyze")
    a.add_argument("files", nargs="+")
    pr = sub.add_parser("pairs")
    pr.add_argument("files", nargs="+")
    args = ap.parse_args()
    {"run": cmd_run, "analyze": cmd_analyze, "pairs": cmd_pairs}[args.cmd](args)


if __name__ == "__main__":
    main()
