"""Screening of the two-stage noise estimate (issue 19, third screening round): pass 1's forward correction uses a
``T`` from pass 0's end-of-pass evidence (``engine.training.audit.earlier_pass_transition``, adopted as the
default) instead of its own early-epoch estimate; and the variants screened beside it (not in the engine: a
subclass of ``ForwardCorrection`` installed in the training loop here).

Pass 0 is trained once by the engine's default audit (``audit.prepare`` / ``execute``, stopped by the user's cancel
event after pass 0's last epoch; pass 0 never depends on a prior), then for each variant a copy of that run continues
(``execute(..., resume=True)``) with pass 1 only:

- ``default``: the engine's default (pass 0's ``T``, rows made dominant by ``PRIOR_MARGIN`` = 0.3)
- ``own``: the default before this change (pass 1 estimates its own ``T`` from epochs 2-4, no prior)
- ``prior``: pass 0's ``T`` as estimated, from the correction epoch on (pass 1's own stability guard still decides
  whether to correct)
- ``prior0``: pass 0's ``T`` from epoch 0 (no estimation epochs, no guard)
- ``priorS``: ``(1 - S) T + S I`` (S = 0.2, say ``prior0.2``)
- ``lastpred``, ``lastpredS``, ``lastpred_mM``: the same with pass 0's last 5 epochs' predictions as the evidence
  (the mode of the predicted class stands for the true class) instead of its AUM flags
- ``prior_mM``: each row mixed with the identity until ``T[j, j] - max_i T[j, i] >= M`` (``prior_m0.2``)

Printed per variant: F1 / AUROC / precision / recall of the run (automatic cut-off, mean AUM of both passes), AUROC of
pass 1's AUM alone and of weighted means ``w aum1 + (1 - w) aum0`` (pass 1's weight w; a sample scored in one pass
keeps that pass's AUM), and each pass's ``T`` against the true one (L1 per row, max abs, Frobenius, 5/6 swap).

Options for every pass (pass 0 included): ``--reestimate E`` (``T`` again at epoch E from the mode, ``--re-rule
majority`` / ``unanimous``, of the 5 epochs' predictions before, rows made dominant by ``--re-margin``), ``--reflag E``
(the first pass: ``T`` again at epoch E from its own AUM flags so far; ``--reflag-all``: every pass), ``--batch rule``
(batch size min(64, max(16, N / 25))).

Guards on the ``--reflag`` re-estimate (fourth screening round, none adopted; each logs its statistic on every re-estimate,
so a run with ``--reflag-guard -1`` records all of them): ``--reflag-guard M`` (identifiability: accepted only when, for
every given label, the samples estimated as truly that label outnumber those estimated as any other single class by M of
the label's samples), ``--reflag-drop D`` (refused when an off-diagonal entry falls below the pass's current ``T`` by
more than D), ``--reflag-keep R`` (refused when a (given, early class) cell of the early estimate's noise is flagged as
that class at less than R), ``--reflag-floor`` (no off-diagonal entry below the pass's current ``T``);
``--stop-after-reflag`` logs the re-estimate and stops.

Usage:
  python bench/detection_twostage.py --setting asym40 --seed 0 --variants own,default,prior,prior0
  python bench/detection_twostage.py --folder sample_data/digits_folder --size 16 --variants own,prior
  python bench/detection_twostage.py --half 0 --variants own,prior
  python bench/detection_twostage.py --setting asym40 --seed 2 --reflag 10 --reflag-guard 0.2 --variants default
"""

from __future__ import annotations

import argparse
import re
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


# ---------------------------------------------------------------- screening variants (not in the engine)

HOST: dict = {}
TRUTH: dict = {}  # the true T (injected noise), for the log


def install_screening(args):
    """The variants that were screened and not adopted, as a subclass of the engine's ``ForwardCorrection`` installed
    in the training loop (and a wrapped ``earlier_pass_transition``); the engine itself has only the adopted rule."""
    import torch

    from engine.scores.noise import estimated_joint, transition_matrix
    from engine.scores.registry import mode_ignoring, pass_cutoff
    from engine.training import audit, correction, loop

    base_gather = loop._CaptureBuffers.gather

    def gather(self):
        HOST.clear()
        HOST.update(base_gather(self))
        return dict(HOST)

    loop._CaptureBuffers.gather = gather
    original = audit.earlier_pass_transition

    def transition(run, cfg, p):
        """``lastpred``: the mode of pass p - 1's last 5 epochs' predictions stands for the true class."""
        t = original(run, cfg, p)
        if t is None or Screen.evidence != "lastpred":
            return t
        samples = run.samples()
        labels = samples["label"].to_numpy()
        kept = samples["threshold_pass"].to_numpy() != p - 1
        c = len(run.classes())
        pred = np.asarray(run.dynamics(p - 1, "pred"))[-5:]
        sug = mode_ignoring(np.where(kept[None, :] & (pred < c), pred, -1), c)
        return transition_matrix(estimated_joint(labels, kept & (sug >= 0) & (sug != labels), sug, c, kept))

    audit.earlier_pass_transition = transition

    class Screen(correction.ForwardCorrection):
        evidence, use_prior, shrink, from_start = "flags", True, 0.0, False
        reestimate_at, re_rule, re_margin = args.reestimate, args.re_rule, args.re_margin
        reflag_at, reflag_all, reflag_guard, reflag_floor = args.reflag, args.reflag_all, args.reflag_guard, args.reflag_floor
        reflag_drop, reflag_keep, stop_after_reflag = args.reflag_drop, args.reflag_keep, args.stop_after_reflag

        def __init__(self, cfg, n_outputs, n_real, device, prior=None):
            if prior is not None and not Screen.use_prior:
                prior = None
            if prior is not None and Screen.shrink:
                prior = (1 - Screen.shrink) * prior + Screen.shrink * np.eye(len(prior))
            super().__init__(cfg, n_outputs, n_real, device, prior)
            self.window, self.msum, self.votes = [], None, None
            if self.prior is not None and Screen.from_start:
                self.matrix = torch.as_tensor(self.prior, dtype=torch.float32, device=self.device)
                self.estimate_epochs = range(0)

        def end_epoch(self, epoch, pred, targets):
            self.reflag(epoch, np.asarray(targets))
            self.reestimate(epoch, pred, np.asarray(targets))
            super().end_epoch(epoch, pred, targets)

        def set_t(self, t):
            m = np.eye(self.n_outputs)
            m[: self.n_real, : self.n_real] = t
            self.matrix = torch.as_tensor(m, dtype=torch.float32, device=self.device)

        def reflag(self, epoch, y):
            """T again at ``reflag_at`` from the pass's own AUM (epochs 1..reflag_at-1) flags and suggested classes."""
            r = Screen.reflag_at
            if r is None or not 1 <= epoch < r or (self.prior is not None and not Screen.reflag_all):
                return
            if self.msum is None:
                self.msum, self.votes = np.zeros(len(y)), np.zeros((self.n_real, len(y)), dtype=np.int32)
            self.msum += HOST["margin"]
            other = np.asarray(HOST["other"], dtype=np.int64)
            ok = (other >= 0) & (other < self.n_real)
            np.add.at(self.votes, (other[ok], np.flatnonzero(ok)), 1)
            if epoch != r - 1 or self.matrix is None:
                return
            aum = self.msum / (r - 1)
            kept, thr = y < self.n_real, y >= self.n_real
            cut = pass_cutoff("auto", aum[kept], aum[thr] if thr.any() else None, 99.0, 0)
            joint = estimated_joint(np.where(kept, y, 0), kept & (aum < cut), self.votes.argmax(axis=0), self.n_real,
                                    kept)
            rows = joint / np.maximum(joint.sum(axis=1, keepdims=True), 1)
            # the early evidence's noise (unanimous other prediction over the estimation epochs): still flagged, and
            # suggested as that class, at the re-estimate? per (given, early class) cell with >= 5 samples
            early = kept & (self.streak >= len(self.estimate_epochs)) & (self.last < self.n_real) & (self.last != y)
            seen = kept & (aum < cut) & (self.votes.argmax(axis=0) == self.last)
            cells = {}
            for i, j in set(zip(y[early].tolist(), self.last[early].tolist(), strict=True)):
                m = early & (y == i) & (self.last == j)
                if m.sum() >= 5:
                    cells[(i, j)] = (float(seen[m].mean()), int(m.sum()))
            keep_min = min((v[0] for v in cells.values()), default=1.0)
            print(f"    reflag: early noise still seen {seen[early].mean() if early.any() else 1:.2f} overall, per cell "
                  + ", ".join(f"{i}->{j} {r:.2f} ({n})" for (i, j), (r, n) in sorted(cells.items()))
                  + f"; min {keep_min:.2f}", flush=True)
            if Screen.reflag_keep is not None and keep_min < Screen.reflag_keep:
                print(f"    reflag keep guard {Screen.reflag_keep:g}: refused, T kept", flush=True)
                return
            t_new = correction.dominant_rows(transition_matrix(joint), 0.3)
            if Screen.reflag_floor:  # no off-diagonal entry below the pass's current T (rows renormalised)
                cur = self.matrix.cpu().numpy().astype(np.float64)[: self.n_real, : self.n_real]
                eye = np.eye(self.n_real, dtype=bool)
                off = np.where(eye, 0.0, np.maximum(t_new, cur))
                t_new = off + np.diag(np.clip(1 - off.sum(axis=1), 0, None))
                t_new /= t_new.sum(axis=1, keepdims=True)
                t_new = correction.dominant_rows(t_new, 0.3)
            off = [f"{i}->{j} {rows[i, j]:.2f}" for i in range(len(rows)) for j in range(len(rows))
                   if i != j and rows[i, j] >= 0.05]
            print(f"    reflag epoch {epoch + 1}: P(true | given) off-diagonal >= 0.05: {', '.join(off)}; T "
                  + (t_errors(t_new, TRUTH.get("t")) if TRUTH.get("t") is not None else ""), flush=True)
            if TRUTH.get("t") is not None:
                d = np.abs(t_new - TRUTH["t"])
                j, i = np.unravel_index(d.argmax(), d.shape)
                print(f"    reflag T worst entry T[{j}, {i}] = {t_new[j, i]:.2f} (true {TRUTH['t'][j, i]:.2f})", flush=True)
            cur = self.matrix.cpu().numpy().astype(np.float64)[: self.n_real, : self.n_real]
            drop = np.where(np.eye(self.n_real, dtype=bool), -np.inf, cur - t_new)
            j, i = np.unravel_index(drop.argmax(), drop.shape)
            print(f"    reflag: largest off-diagonal fall against the pass's T: T[{j}, {i}] {cur[j, i]:.2f} -> "
                  f"{t_new[j, i]:.2f} ({drop[j, i]:+.2f})", flush=True)
            if Screen.reflag_drop is not None and drop[j, i] > Screen.reflag_drop:
                print(f"    reflag drop guard {Screen.reflag_drop:g}: refused, T kept", flush=True)
                return
            g = Screen.reflag_guard
            if g is not None:
                worst, row, other = column_dominance(joint)
                ok = worst > g
                print(f"    reflag epoch {epoch + 1} ({'prior' if self.prior is not None else 'own T'}): dominance "
                      f"margin {worst:.3f} (given {row}: true {row} vs {other}), guard {g:g}: "
                      f"{'accepted' if ok else 'refused, T kept'}", flush=True)
                if not ok:
                    return
            self.set_t(t_new)
            if Screen.stop_after_reflag:
                raise SystemExit(0)

        def reestimate(self, epoch, pred, y):
            """T again at ``reestimate_at`` from the mode (or majority, or unanimity) of the 5 epochs' predictions
            before it."""
            r = Screen.reestimate_at
            if r is None or pred is None or not r - 5 <= epoch < r:
                return
            self.window.append(np.asarray(pred, dtype=np.int64).copy())
            if epoch != r - 1 or self.matrix is None:
                return
            w = np.stack(self.window)
            real = y < self.n_real
            counts = np.zeros((self.n_real, len(y)), dtype=np.int64)
            ok = w < self.n_real
            np.add.at(counts, (np.where(ok, w, 0), np.broadcast_to(np.arange(len(y)), w.shape)), ok.astype(np.int64))
            mode = counts.argmax(axis=0)
            if Screen.re_rule == "majority":
                mode = np.where(counts.max(axis=0) * 2 > len(w), mode, y)
            if Screen.re_rule == "unanimous":
                mode = np.where((w == w[:1]).all(axis=0) & (w[0] < self.n_real), w[0], y)
            joint = np.zeros((self.n_real, self.n_real), dtype=np.int64)
            np.add.at(joint, (y[real], mode[real]), 1)
            self.set_t(correction.dominant_rows(transition_matrix(joint), Screen.re_margin))

    loop.ForwardCorrection = Screen
    return Screen


def column_dominance(joint: np.ndarray) -> tuple[float, int, int]:
    """The identifiability margin of an estimated joint ``joint[given, true]``: for each given label ``j``, the
    count estimated as truly ``j`` minus the largest count estimated as one other true class, as a fraction of the
    given label's samples; returns the smallest over the labels with samples, that label and its rival class."""
    worst, row, other = np.inf, -1, -1
    for j in range(len(joint)):
        n = joint[j].sum()
        if n == 0:
            continue
        rest = np.delete(joint[j], j)
        k = int(rest.argmax())
        gap = (joint[j, j] - rest[k]) / n
        if gap < worst:
            worst, row, other = float(gap), j, k + (k >= j)
    return worst, row, other


def set_variant(screen, variant: str) -> None:
    from engine.training import correction

    screen.use_prior = variant != "own"
    screen.from_start = variant == "prior0"
    screen.evidence = "lastpred" if variant.startswith("lastpred") else "flags"
    m = re.fullmatch(r"(?:prior|lastpred)(0\.\d+)", variant)
    screen.shrink = float(m.group(1)) if m else 0.0
    m = re.fullmatch(r"(?:prior|lastpred)_m(0\.\d+)", variant)
    correction.PRIOR_MARGIN = float(m.group(1)) if m else (DEFAULT_MARGIN if variant == "default" else 0.0)


DEFAULT_MARGIN = 0.3  # engine.training.correction.PRIOR_MARGIN as adopted


def t_errors(t: np.ndarray, truth: np.ndarray | None) -> str:
    off = (t.sum() - np.trace(t)) / len(t)
    if truth is None:
        return f"off/row {off:.3f}"
    d = t - truth
    swap = (t[5, 6] + t[6, 5]) / 2 if len(t) > 6 else float("nan")
    return (f"L1/row {np.abs(d).sum() / len(t):.3f} max {np.abs(d).max():.3f} frob {np.sqrt((d ** 2).sum()):.3f} "
            f"swap56 {swap:.3f} off/row {off:.3f}")


def main() -> None:
    import torch

    from bench.detection import SETTINGS, write_half
    from engine.scores.metrics import detection_metrics, ranking_auroc
    from engine.scores.noise import transition_matrix
    from engine.store.runs import Run
    from engine.training import audit
    from engine.training.config import AuditConfig
    from engine.training.loop import Cancelled

    ap = argparse.ArgumentParser()
    ap.add_argument("--setting", default="asym40")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--folder", default=None)
    ap.add_argument("--size", type=int, default=None)
    ap.add_argument("--half", type=int, default=None)
    ap.add_argument("--batch", default=None, help="batch size, or 'rule' = min(64, max(16, N / 25))")
    ap.add_argument("--variants", default="own,default")
    ap.add_argument("--reestimate", type=int, default=None, help="every pass: T again at this epoch (mode of the 5 "
                    "epochs' predictions before, margin 0.3)")
    ap.add_argument("--re-rule", default="mode", choices=["mode", "majority", "unanimous"])
    ap.add_argument("--re-margin", type=float, default=0.3)
    ap.add_argument("--reflag", type=int, default=None, help="first pass: T again at this epoch from its own AUM flags")
    ap.add_argument("--reflag-all", action="store_true", help="--reflag in every pass")
    ap.add_argument("--reflag-guard", type=float, default=None, help="--reflag's T only when every given label's "
                    "samples are estimated as truly that label by this margin (fraction of the label's samples) over "
                    "any other single class, else the pass keeps its T")
    ap.add_argument("--reflag-floor", action="store_true", help="--reflag's T keeps each off-diagonal entry at least "
                    "at the pass's current T")
    ap.add_argument("--reflag-drop", type=float, default=None, help="--reflag's T refused when one of its off-diagonal "
                    "entries is below the pass's current T by more than this")
    ap.add_argument("--reflag-keep", type=float, default=None, help="--reflag's T refused when, in some (given, early "
                    "class) cell of the early estimate's noise, fewer than this fraction is still flagged as that class")
    ap.add_argument("--stop-after-reflag", action="store_true", help="log the re-estimate, then stop (no figures)")
    ap.add_argument("--keep", default=None, help="copy each variant's run into this folder")
    args = ap.parse_args()
    torch.set_num_threads(1)
    screen = install_screening(args)
    with tempfile.TemporaryDirectory() as tmp:
        wrong = None
        if args.folder:
            folder = ROOT / args.folder
            wrong = set(re.findall(r"\| (\d/digit_\d+\.png) \|", (folder.parent / "WRONG_LABELS.md").read_text()))
            cfg = AuditConfig(dataset=str(folder), image_size=args.size, seed=args.seed)
            name = f"folder{args.size} seed {args.seed}"
        elif args.half is not None:
            path, wrong = write_half(Path(tmp) / "halves", args.half, 0.2, 0)
            cfg = AuditConfig(dataset=str(path), seed=args.seed)  # the noise injected into the half: seed 0
            name = f"half{args.half} seed {args.seed}"
        else:
            noise, kind = SETTINGS[args.setting]
            cfg = AuditConfig(noise=noise, noise_kind=kind, seed=args.seed)
            name = f"{args.setting} seed {args.seed}"
        if args.reflag is not None:
            name += f" reflag{args.reflag}" + (" all" if args.reflag_all else "")
            if args.reflag_floor:
                name += " floor"
            if args.reflag_keep is not None:
                name += f" keep{args.reflag_keep:g}"
            if args.reflag_drop is not None:
                name += f" drop{args.reflag_drop:g}"
            if args.reflag_guard is not None:
                name += f" guard{args.reflag_guard:g}"
        if args.reestimate is not None:
            name += f" re{args.reestimate} {args.re_rule} m{args.re_margin:g}"
        run0, ds = audit.prepare(cfg, Path(tmp) / "base")
        if args.batch:
            import json

            raw = json.loads((run0.path / "config.json").read_text())
            raw["batch_size"] = min(64, max(16, len(ds) // 25)) if args.batch == "rule" else int(args.batch)
            (run0.path / "config.json").write_text(json.dumps(raw))
            name += f" batch {raw['batch_size']}"
        samples = run0.samples()
        labels = samples["label"].to_numpy()
        if wrong is not None:
            err = samples["sample_id"].astype(str).isin(wrong).to_numpy()
            truth_t = None
        else:
            err = labels != samples["true_label"].to_numpy()
            c = len(run0.classes())
            counts = np.zeros((c, c))
            np.add.at(counts, (labels, samples["true_label"].to_numpy()), 1)
            truth_t = transition_matrix(counts)
            TRUTH["t"] = truth_t
        cancel = threading.Event()

        def stop_after_pass0(r):
            if r.pass_idx == 0 and r.epoch == cfg.epochs - 1:
                cancel.set()

        t0 = time.perf_counter()
        try:
            audit.execute(run0, ds, on_epoch=stop_after_pass0, cancel=cancel)
        except Cancelled:
            pass
        print(f"{name}: pass 0 trained [{time.perf_counter() - t0:.0f} s]", flush=True)
        for variant in args.variants.split(","):
            path = Path(tmp) / variant
            shutil.copytree(run0.path, path)
            run = Run(path)
            set_variant(screen, variant)
            t0 = time.perf_counter()
            audit.execute(run, ds, resume=True)
            table = run.scores()
            a0, a1 = table["aum_pass0"].to_numpy(), table["aum_pass1"].to_numpy()
            met = detection_metrics(table["flagged"].to_numpy(bool), -table["aum"].to_numpy(), err)
            line = (f"{name} {variant}: F1 {met['f1']:.3f} AUROC {met['auroc']:.4f} P {met['precision']:.3f} "
                    f"R {met['recall']:.3f} flagged {int(table['flagged'].sum())} errors {int(err.sum())}")
            for w in (1.0, 0.75, 0.67):
                comb = np.where(np.isfinite(a0) & np.isfinite(a1), w * a1 + (1 - w) * a0, np.where(np.isfinite(a1), a1, a0))
                line += f" | AUROC w1={w:g} {ranking_auroc(-comb, err):.4f}"
            print(line + f" [{time.perf_counter() - t0:.0f} s]", flush=True)
            for p in (0, 1):
                state = torch.load(path / "checkpoints" / f"pass{p}.pt", map_location="cpu", weights_only=True)
                t = state.get("correction_matrix")
                c = len(run.classes())
                if p == 1 and args.keep:
                    shutil.copytree(path, Path(args.keep) / f"{name.replace(' ', '_')}_{variant}", dirs_exist_ok=True)
                print(f"    T pass {p}: " + ("none (no correction)" if t is None else t_errors(t.numpy()[:c, :c], truth_t)),
                      flush=True)


if __name__ == "__main__":
    main()
