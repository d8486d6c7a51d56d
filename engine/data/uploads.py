"""Uploaded archives: a zip of an image folder, extracted with limits and without path tricks."""

from __future__ import annotations

import hashlib
import io
import shutil
import stat
import tempfile
import zipfile
from pathlib import Path, PurePosixPath

from engine.data.datasets import DatasetError

MAX_ENTRIES = 50_000
MAX_TOTAL_BYTES = 2 * 1024**3
MAX_RATIO = 200  # a member expanding more than 200x is treated as a zip bomb


def _extract(zf: zipfile.ZipFile, infos: list[zipfile.ZipInfo], tmp: Path) -> None:
    for info in infos:
        if info.is_dir() or PurePosixPath(info.filename).name.startswith(".") or "__MACOSX" in info.filename:
            continue
        target = tmp / PurePosixPath(info.filename.replace("\\", "/"))
        target.parent.mkdir(parents=True, exist_ok=True)
        with zf.open(info) as src, open(target, "wb") as out:
            remaining = info.file_size + 1
            while chunk := src.read(1 << 20):
                remaining -= len(chunk)
                if remaining < 0:
                    raise DatasetError(f"the zip entry {info.filename!r} is larger than it declares")
                out.write(chunk)


def extract_image_zip(data: bytes, dest_root: Path) -> Path:
    """Extract ``data`` (a zip) under ``dest_root/<sha>/`` and return the dataset folder.

    Refuses absolute paths, ``..``, symlinks, more than ``MAX_ENTRIES`` entries, more than
    ``MAX_TOTAL_BYTES`` expanded, or a member that expands more than ``MAX_RATIO`` times. When the
    archive holds one top folder (``digits/<class>/...``), that folder is the dataset root.
    """
    try:
        zf = zipfile.ZipFile(io.BytesIO(data))
    except zipfile.BadZipFile as exc:
        raise DatasetError(f"the upload is not a zip archive ({exc}); zip a folder laid out as <class>/<image>") from exc
    infos = zf.infolist()
    if len(infos) > MAX_ENTRIES:
        raise DatasetError(f"the zip holds {len(infos)} entries; the limit is {MAX_ENTRIES}. Point to the folder by path instead.")
    total = 0
    for info in infos:
        name = PurePosixPath(info.filename.replace("\\", "/"))
        if name.is_absolute() or ".." in name.parts or (info.filename[1:2] == ":"):
            raise DatasetError(f"the zip entry {info.filename!r} has an absolute path or '..'; refusing to extract it")
        if stat.S_ISLNK(info.external_attr >> 16):
            raise DatasetError(f"the zip entry {info.filename!r} is a symbolic link; refusing to extract it")
        total += info.file_size
        if info.compress_size and info.file_size / max(info.compress_size, 1) > MAX_RATIO and info.file_size > 10_000_000:
            raise DatasetError(f"the zip entry {info.filename!r} expands {info.file_size / info.compress_size:.0f}x (zip bomb?)")
    if total > MAX_TOTAL_BYTES:
        raise DatasetError(f"the zip expands to {total / 1e9:.1f} GB; the limit is {MAX_TOTAL_BYTES / 1e9:.0f} GB")
    dest = Path(dest_root) / hashlib.sha256(data).hexdigest()[:16]
    if not dest.exists():
        # A private temporary sibling: a failed extraction leaves nothing behind, and two uploads of the same zip
        # at once each extract into their own folder; the first rename wins and the other is discarded.
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".partial", dir=dest.parent))
        try:
            _extract(zf, infos, tmp)
            try:
                tmp.rename(dest)
            except OSError:
                if not dest.is_dir():  # not a concurrent twin that got there first
                    raise
        except OSError as exc:
            raise DatasetError(f"cannot extract the zip into {dest.parent}: {exc.strerror or exc}") from exc
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    tops = [p for p in dest.iterdir() if not p.name.startswith(".")]
    if len(tops) == 1 and tops[0].is_dir() and all(c.is_dir() for c in tops[0].iterdir()):
        return tops[0]
    return dest
