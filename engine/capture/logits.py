"""Logits from anywhere: per-epoch outputs saved by any framework become a run directory.

``python -m engine import-logits --logits LOGITS --labels LABELS.csv [--images ROOT] --out runs/``

* ``LOGITS`` is one ``.npy`` file shaped ``(epochs, samples, classes)``, or a folder holding one
  ``(samples, classes)`` ``.npy`` per epoch. Folder files are taken in natural name order (digit runs
  compare as numbers: ``epoch2.npy`` before ``epoch10.npy``); other files are ignored. float16,
  float32 or float64; files are memory-mapped and read one epoch (and, for wide epochs, one block
  of rows) at a time, so a file larger than memory imports. They are the raw logits of each
  epoch's training forward pass (or of an evaluation pass over the training set after each epoch).
* ``LABELS`` is a CSV with columns ``sample_id,label[,path]``, one row per sample in the order
  of the logits' sample axis. Labels are class indices ``0..C-1`` (classes named ``"0"`` ..), or
  class names: then the classes are the distinct names in sorted order (as an image folder's
  subfolders), unless ``classes`` gives the order. ``path`` is the sample's image file relative
  to ``--images ROOT``, for the pages to show it.

Everything is checked before the run directory is created (shapes, dtypes, NaN/inf, counts,
unique ids, labels, paths); then every epoch goes through ``engine.capture.dynamics.batch_capture``, the
capture function of our own training loop, and the run is scored by ``engine.training.audit.finalize``.
"""

from __future__ import annotations

import os
import re
import time
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np
import pandas as pd

from engine.capture.recorder import FLOAT_NAMES, INT_NAMES, new_external_run, new_samples_table
from engine.store.runs import DYNAMICS, DynamicsWriter, Run
from engine.training.config import ConfigError

ROWS_PER_BLOCK = 65_536  # rows of one epoch read at a time (65,536 x 1,000 float32 = 256 MB)
MAX_CLASS_NAMES = 100_000


class LogitsError(ConfigError):
    """Imported logits or labels are unusable; the message says what is wrong and how to fix it."""


def _natural_key(name: str) -> list:
    return [int(t) if t.isdigit() else t.lower() for t in re.split(r"(\d+)", name)]


@dataclass
class Logits:
    """Per-epoch logits, each a memory-mapped ``(samples, classes)`` array."""

    epochs: list[np.ndarray]
    names: list[str]  # where each epoch came from, for messages

    @property
    def shape(self) -> tuple[int, int, int]:
        return (len(self.epochs), *self.epochs[0].shape)


def _load_npy(path: Path) -> np.ndarray:
    if path.stat().st_size == 0:
        raise LogitsError(f"{path} is empty (0 bytes); save the logits with numpy.save")
    try:
        return np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError) as exc:
        raise LogitsError(f"{path} is not a readable .npy array ({exc}); save the logits with numpy.save") from exc


def open_logits(path: str | os.PathLike) -> Logits:
    """Open ``path`` (one ``(E, N, C)`` .npy, or a folder of ``(N, C)`` .npy files in natural name order)."""
    p = Path(path).expanduser()
    if p.is_dir():
        files = sorted((f for f in p.iterdir() if f.suffix == ".npy" and f.is_file()), key=lambda f: _natural_key(f.name))
        if not files:
            raise LogitsError(f"{p} holds no .npy files; give one (epochs, samples, classes) .npy or a folder with "
                              "one (samples, classes) .npy per epoch")
        epochs = [_load_npy(f) for f in files]
        for f, a in zip(files, epochs, strict=True):
            if a.ndim != 2:
                raise LogitsError(f"{f} has shape {a.shape}; each per-epoch file must be (samples, classes)")
        shapes = {a.shape for a in epochs}
        if len(shapes) > 1:
            detail = ", ".join(f"{f.name}: {a.shape}" for f, a in zip(files, epochs, strict=True))
            raise LogitsError(f"the per-epoch files in {p} differ in shape ({detail}); every epoch must hold the "
                              "same samples and classes")
        out = Logits(epochs, [f.name for f in files])
    elif p.is_file():
        a = _load_npy(p)
        if a.ndim != 3:
            raise LogitsError(f"{p} has shape {a.shape}; give (epochs, samples, classes), e.g. "
                              "numpy.save(path, numpy.stack(per_epoch_logits))")
        out = Logits([a[e] for e in range(a.shape[0])], [f"{p.name}[{e}]" for e in range(a.shape[0])])
    else:
        raise LogitsError(f"{p} does not exist; give a .npy file or a folder of .npy files")
    e, n, c = out.shape if out.epochs else (0, 0, 0)
    if e == 0 or n == 0:
        raise LogitsError(f"{p} holds no logits (shape {(e, n, c)}); it needs at least one epoch and one sample")
    if c < 2:
        raise LogitsError(f"{p} has {c} class column(s); classification logits need at least 2")
    dtype = out.epochs[0].dtype
    if dtype not in (np.float16, np.float32, np.float64):
        raise LogitsError(f"{p} holds {dtype} values; logits must be float16, float32 or float64")
    return out


def check_finite(logits: Logits) -> None:
    """Raise on the first NaN or infinite logit (reading one block of rows of one epoch at a time)."""
    for name, arr in zip(logits.names, logits.epochs, strict=True):
        for lo in range(0, arr.shape[0], ROWS_PER_BLOCK):
            block = np.asarray(arr[lo : lo + ROWS_PER_BLOCK])
            bad = ~np.isfinite(block)
            if bad.any():
                r, k = np.argwhere(bad)[0]
                raise LogitsError(f"{name}: sample row {lo + r}, class {k} is {block[r, k]}; logits must be finite "
                                  "(a diverged epoch? leave it out)")


def read_labels(path: str | os.PathLike, n_classes: int, classes: list[str] | None = None) -> tuple[pd.DataFrame, list[str]]:
    """The LABELS CSV as ``sample_id``, class index ``label``, optional ``path``; and the class names."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise LogitsError(f"labels file {p} does not exist")
    if p.stat().st_size == 0:
        raise LogitsError(f"labels file {p} is empty; it needs a header sample_id,label[,path] and one row per sample")
    try:
        df = pd.read_csv(p, dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise LogitsError(f"cannot read {p} as CSV: {exc}") from exc
    df.columns = [str(c).strip() for c in df.columns]
    missing = [c for c in ("sample_id", "label") if c not in df.columns]
    if missing:
        raise LogitsError(f"{p} lacks column(s) {missing}; its header must be sample_id,label[,path] "
                          f"(found {list(df.columns)[:10]})")
    if len(df) == 0:
        raise LogitsError(f"{p} has a header but no rows")
    ids = df["sample_id"].str.strip()
    if (ids == "").any():
        raise LogitsError(f"{p}: row {int(np.flatnonzero(ids == '')[0]) + 2} has an empty sample_id")
    dup = ids[ids.duplicated()]
    if len(dup):
        raise LogitsError(f"{p}: sample ids must be unique; repeated: {dup.unique()[:5].tolist()}")
    raw = df["label"].str.strip()
    if (raw == "").any():
        raise LogitsError(f"{p}: row {int(np.flatnonzero(raw == '')[0]) + 2} has an empty label")
    if classes is not None:
        names = [str(c) for c in classes]
        if len(names) != n_classes:
            raise LogitsError(f"{len(names)} class names given for logits with {n_classes} classes")
        index = {c: i for i, c in enumerate(names)}
        numeric = False
    else:
        numeric = bool(raw.str.fullmatch(r"[0-9]+").all())
        if numeric:
            names = [str(i) for i in range(n_classes)]
        else:
            names = sorted(raw.unique())
            if len(names) != n_classes:
                raise LogitsError(f"{p} names {len(names)} classes but the logits have {n_classes} columns; give the "
                                  "classes in column order (--classes a,b,c) or use class indices as labels")
        index = {c: i for i, c in enumerate(names)}
    if numeric:
        y = raw.astype(np.int64).to_numpy()
        if y.max() >= n_classes:
            raise LogitsError(f"{p}: label {int(y.max())} is not a class index of logits with {n_classes} classes "
                              f"(0..{n_classes - 1})")
    else:
        unknown = sorted(set(raw) - set(index))
        if unknown:
            raise LogitsError(f"{p}: labels {unknown[:5]} are not among the classes {names[:10]}")
        y = raw.map(index).to_numpy(dtype=np.int64)
    out = pd.DataFrame({"sample_id": ids.to_numpy(), "label": y})
    if "path" in df.columns:
        out["path"] = df["path"].str.strip().to_numpy()
    return out, names


def check_paths(paths: pd.Series, root: Path) -> None:
    """Every ``path`` relative and inside ``root`` (checked as text), and the first ones present on disk."""
    for i, rel in enumerate(paths):
        pp = PurePosixPath(str(rel).replace("\\", "/"))
        if not str(rel) or pp.is_absolute() or ".." in pp.parts or re.match(r"^[A-Za-z]:", str(rel)):
            raise LogitsError(f"labels row {i + 2}: path {rel!r} must be relative to --images {root} and stay inside it")
    for rel in paths.iloc[:20]:
        if not (root / rel).is_file():
            raise LogitsError(f"image {rel!r} is not under --images {root}; paths in the labels file are relative to it")


def import_logits(logits: str | os.PathLike, labels: str | os.PathLike, out: str | os.PathLike = "runs",
                  images: str | os.PathLike | None = None, classes: list[str] | None = None,
                  name: str | None = None, **options) -> Run:
    """A finished run from saved per-epoch logits and a labels CSV (see the module docstring).

    ``options`` are scoring options of ``AuditConfig`` (``cutoff``, ``aum_start``, ``aum_end``,
    ``threshold_percentile``, ``el2n_epoch``, ``seed``). Nothing is written before every check passed.

    >>> import numpy as np, pandas as pd, tempfile, os
    >>> tmp = tempfile.mkdtemp()
    >>> rng = np.random.default_rng(0)
    >>> np.save(f"{tmp}/logits.npy", rng.normal(size=(3, 40, 4)).astype(np.float32))
    >>> pd.DataFrame({"sample_id": [f"s{i}" for i in range(40)], "label": rng.integers(0, 4, 40)}).to_csv(
    ...     f"{tmp}/labels.csv", index=False)
    >>> run = import_logits(f"{tmp}/logits.npy", f"{tmp}/labels.csv", out=f"{tmp}/runs")
    >>> run.status()["state"], len(run.scores())
    ('done', 40)
    """
    import torch

    from engine.capture.dynamics import batch_capture
    from engine.training.audit import finalize

    lg = open_logits(logits)
    n_epochs, n, c = lg.shape
    table, names = read_labels(labels, c, classes)
    if len(table) != n:
        raise LogitsError(f"the labels file has {len(table)} rows but the logits hold {n} samples; give one row per "
                          "sample, in the order of the logits' sample axis")
    root = None
    if images is not None:
        root = Path(images).expanduser().resolve()
        if not root.is_dir():
            raise LogitsError(f"--images {images} is not a folder")
        if "path" not in table.columns:
            raise LogitsError("--images needs a path column in the labels file (sample_id,label,path)")
        check_paths(table["path"], root)
    check_finite(lg)
    sources = table["path"] if "path" in table.columns else None
    samples = new_samples_table(table["sample_id"].tolist(), table["label"].to_numpy(), sources)
    run = new_external_run(out, samples, names, n_epochs, name or Path(logits).stem, "imported logits", root,
                           **options)
    run.update_status(state="running", passes=1, epochs=n_epochs, epochs_done=[0], history=[], pass_idx=0,
                      started_at=time.time(), world_size=1)
    try:
        writer = DynamicsWriter(run, 0, n_epochs, n)
        y_all = torch.tensor(table["label"].to_numpy(), dtype=torch.int64)
        history = []
        for e, arr in enumerate(lg.epochs):
            t0 = time.perf_counter()
            row = {k: np.empty(n, dtype=DYNAMICS[k]) for k in DYNAMICS}
            for lo in range(0, n, ROWS_PER_BLOCK):
                z = torch.from_numpy(np.array(arr[lo : lo + ROWS_PER_BLOCK], dtype=np.float32))  # one block in memory
                cap = vars(batch_capture(z, y_all[lo : lo + len(z)]))
                for k in FLOAT_NAMES + INT_NAMES:
                    row[k][lo : lo + len(z)] = cap[k].numpy()
            writer.write_epoch(e, row)
            history.append({"pass": 0, "epoch": e, "loss": float(row["loss"].mean()),
                            "accuracy": float((row["pred"] == table["label"].to_numpy()).mean()),
                            "seconds": time.perf_counter() - t0})
            run.update_status(epochs_done=[e + 1], history=history)
        finalize(run)
    except BaseException as exc:
        run.update_status(state="failed", finished_at=time.time(), error=f"{type(exc).__name__}: {exc}")
        raise
    run.update_status(state="done", finished_at=time.time())
    return run
