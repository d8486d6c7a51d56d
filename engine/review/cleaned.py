"""The cleaned dataset of a reviewed run: every sample of the dataset, relabels applied, removals dropped.

Three forms, one row set (``cleaned_rows``):

- a manifest ``path,label,sample_id`` (``cleaned_manifest``), machine-readable: plain CSV, no
  spreadsheet-formula quoting (a label ``-1`` stays ``-1``). For image files ``path`` is the source
  path relative to the dataset root (save it there); for array datasets (digits, torchvision) it
  points at the cleaned folder's PNG files (``<class>/<file>.png``), so ``--dataset`` reads it again
  once it sits in that folder;
- an image folder ``<class>/<file>`` plus that folder's ``manifest.csv`` (original sample ids kept)
  (``write_cleaned_folder``): image files are copied byte for byte, array images written as PNG once;
- the same folder as a zip (``cleaned_zip``), for the dashboard's download.

Every row of ``samples.parquet`` is a sample of the dataset (held-out and threshold samples too):
a sample leaves only by a *remove* decision.
"""

from __future__ import annotations

import io
import os
import re
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd

from engine.review.reviews import ReviewStore
from engine.store.runs import Run, RunError, atomic_write_bytes

MANIFEST_NAME = "manifest.csv"
_UNSAFE = re.compile(r"[^A-Za-z0-9._ -]+")


def is_array_dataset(run: Run) -> bool:
    """True for datasets held as arrays (digits, torchvision): their sources are ``name[i]``, not files."""
    spec = str(run.config().get("dataset", ""))
    return spec == "digits" or spec.startswith("torchvision:")


def safe_name(text: str, what: str = "name") -> str:
    """One path component from ``text``: characters other than letters, digits, ``._ -`` become ``_``;
    never empty, never ``.``/``..`` or hidden."""
    name = _UNSAFE.sub("_", str(text)).strip(" ")
    name = name.lstrip(".") or "_"
    return name


def cleaned_rows(run: Run) -> pd.DataFrame:
    """Kept samples in run order: ``row`` (samples.parquet row), ``sample_id``, ``source``, ``label`` (class name
    after review: *mislabeled* decisions relabelled, *remove* dropped) and ``file`` (``<class>/<file>`` in the
    cleaned folder, unique)."""
    samples = run.samples(["sample_id", "source", "label"])
    classes = run.classes()
    names = np.array(classes, dtype=object)
    dec = ReviewStore(run.path).current().set_index("sample_id")
    decision = dec["decision"].reindex(samples["sample_id"]).to_numpy()
    new_label = dec["new_label"].reindex(samples["sample_id"]).to_numpy()
    label = names[samples["label"].to_numpy()]
    relabel = decision == "mislabeled"
    label = np.where(relabel, new_label, label)
    keep = decision != "remove"
    out = pd.DataFrame({"row": np.flatnonzero(keep), "sample_id": samples["sample_id"].to_numpy()[keep],
                        "source": samples["source"].to_numpy()[keep], "label": label[keep]})
    class_dir = {c: safe_name(c) for c in dict.fromkeys(list(classes) + list(out["label"].unique()))}
    clash = pd.Series(class_dir).duplicated(keep=False)
    if clash.any():
        raise RunError(f"class names {sorted(pd.Series(class_dir)[clash].index)} give the same folder name; rename "
                       "them (letters, digits, . _ - and spaces are kept)")
    array = is_array_dataset(run)
    files = []
    taken: set[str] = set()
    for sid, src, lab in zip(out["sample_id"], out["source"], out["label"], strict=True):
        base = safe_name(sid) + ".png" if array else safe_name(Path(src).name)
        rel = f"{class_dir[lab]}/{base}"
        if rel in taken:  # two files of one name: the whole source path, flattened
            flat = safe_name(sid if array else src.replace("/", "__"))
            rel = f"{class_dir[lab]}/{flat}{'.png' if array else ''}"
            k = 1
            while rel in taken:
                stem, dot, ext = rel.rpartition(".")
                rel = f"{stem}-{k}.{ext}" if dot else f"{rel}-{k}"
                k += 1
        taken.add(rel)
        files.append(rel)
    out["file"] = files
    return out


def cleaned_manifest(run: Run) -> pd.DataFrame:
    """``path,label,sample_id`` for every sample not marked *remove*, *mislabeled* ones relabelled.

    ``path``: image files, relative to the dataset root (save the manifest there to audit it again);
    array datasets, the PNG in the cleaned folder (``<class>/<file>.png``; ``write_cleaned_folder`` writes
    the images and this manifest together).
    """
    rows = cleaned_rows(run)
    path = rows["file"] if is_array_dataset(run) else rows["source"]
    out = pd.DataFrame({"path": path.to_numpy(), "label": rows["label"].to_numpy(),
                        "sample_id": rows["sample_id"].to_numpy()})
    return out.sort_values("sample_id", kind="stable").reset_index(drop=True)


def manifest_bytes(df: pd.DataFrame) -> bytes:
    """A machine-readable CSV: every cell as written (no formula quoting; the reader is a program)."""
    buf = io.StringIO()
    df.to_csv(buf, index=False)
    return buf.getvalue().encode("utf-8")


def png_bytes(pixels: np.ndarray) -> bytes:
    """Lossless PNG of an image array at its native size (HxW grey, HxWx3 colour)."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.squeeze(np.asarray(pixels))).save(buf, format="PNG")
    return buf.getvalue()


def _files(run: Run, rows: pd.DataFrame):
    """(relative file in the cleaned folder, source file path or None, PNG bytes or None) per kept sample."""
    from engine.data.images import SampleImages

    if is_array_dataset(run):
        images = SampleImages(run)
        for rel, i in zip(rows["file"], rows["row"], strict=True):
            yield rel, None, png_bytes(images.image(int(i)))
        return
    root = Path(run.config().get("dataset_root") or "").resolve()
    for rel, src in zip(rows["file"], rows["source"], strict=True):
        path = (root / src).resolve()
        if not path.is_relative_to(root):
            raise RunError(f"{src} lies outside the dataset root {root}; not exported")
        if not path.is_file():
            raise RunError(f"{path} is missing: the dataset changed since the audit; restore it to export")
        yield rel, path, None


def write_cleaned_folder(run: Run, out: str | os.PathLike) -> int:
    """Write the cleaned dataset as ``out/<class>/<file>`` plus ``out/manifest.csv``; returns the image count.

    ``out`` must not exist or be an empty folder (nothing of the user's is overwritten). The folder is
    built beside ``out`` and renamed into place, so a failure leaves no half-written dataset.
    """
    dest = Path(out).expanduser()
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise RunError(f"{dest} already exists and is not an empty folder; choose a new folder for the cleaned dataset")
    rows = cleaned_rows(run)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.parent / f".{dest.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        for rel, src, data in _files(run, rows):
            target = tmp / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            if src is not None:
                shutil.copyfile(src, target)
            else:
                target.write_bytes(data)
        manifest = pd.DataFrame({"path": rows["file"], "label": rows["label"], "sample_id": rows["sample_id"]})
        (tmp / MANIFEST_NAME).write_bytes(manifest_bytes(manifest))
        if dest.exists():
            dest.rmdir()
        tmp.rename(dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return len(rows)


def cleaned_zip(run: Run) -> bytes:
    """The cleaned folder (``<class>/<file>`` and ``manifest.csv``) as zip bytes, for a download."""
    rows = cleaned_rows(run)
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_STORED) as z:  # images are compressed already
        for rel, src, data in _files(run, rows):
            if src is not None:
                z.write(src, rel)
            else:
                z.writestr(rel, data)
        manifest = pd.DataFrame({"path": rows["file"], "label": rows["label"], "sample_id": rows["sample_id"]})
        z.writestr(MANIFEST_NAME, manifest_bytes(manifest))
    return buf.getvalue()


def write_manifest(run: Run, out: str | os.PathLike) -> int:
    """``--manifest``: the cleaned manifest at ``out``; for an array dataset also its PNGs beside it
    (``<out folder>/<class>/<file>.png``, each written once: an existing file is kept)."""
    out = Path(out).expanduser()
    df = cleaned_manifest(run)
    if is_array_dataset(run):
        rows = cleaned_rows(run)
        for rel, _src, data in _files(run, rows[[not (out.parent / r).is_file() for r in rows["file"]]]):
            target = out.parent / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_bytes(target, data)
    atomic_write_bytes(out, manifest_bytes(df))
    return len(df)
