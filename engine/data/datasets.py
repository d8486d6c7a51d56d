"""Every dataset source becomes one ``IndexedDataset``: images, labels and a stable string sample_id.

Sources: scikit-learn's 8x8 digits (with seeded label noise), an image folder
``root/<class>/<file>``, a CSV manifest ``path,label[,sample_id]`` and a torchvision
classification dataset already on disk. Bad input raises ``DatasetError`` naming the file
and row before any training starts.
"""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".pgm", ".ppm"}
ASYMMETRIC_DIGITS = {2: 7, 3: 8, 5: 6, 6: 5, 7: 1}
MAX_IMAGE_PIXELS = 64_000_000
GREY_MODES = ("L", "1", "I", "I;16", "F")


class DatasetError(ValueError):
    """A dataset cannot be used; the message says which file or row and how to fix it."""


@dataclass
class IndexedDataset:
    """A classification dataset: labels and ids in memory, images in memory or read from disk on demand.

    ``images`` is uint8 ``(N, H, W, C)``: an array, or a ``FileImages`` for a ``lazy`` load; ``labels`` the given labels (possibly noisy);
    ``true_labels`` the clean labels when known (injected noise), else ``None``.
    """

    name: str
    sample_ids: np.ndarray  # object array of str, unique
    sources: np.ndarray  # object array of str: a file path relative to root, or "name[i]"
    labels: np.ndarray  # int64
    classes: list[str]
    images: np.ndarray | FileImages  # uint8 (N, H, W, C), in memory or decoded on demand
    root: str | None = None
    true_labels: np.ndarray | None = None
    info: dict = field(default_factory=dict)
    stats: tuple | None = None  # per-channel (mean, std) once measured (engine.data.pipeline.normalization_stats)

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    @property
    def n_classes(self) -> int:
        return len(self.classes)

    def subset(self, mask: np.ndarray) -> IndexedDataset:
        """The samples where ``mask`` is true (same classes, same ids)."""
        return IndexedDataset(
            name=self.name, sample_ids=self.sample_ids[mask], sources=self.sources[mask], labels=self.labels[mask],
            classes=list(self.classes), images=take(self.images, mask), root=self.root,
            true_labels=None if self.true_labels is None else self.true_labels[mask], info=dict(self.info),
        )


def inject_noise(labels: np.ndarray, rate: float, kind: str, n_classes: int, seed: int) -> np.ndarray:
    """Flip a seeded fraction of labels; returns the noisy labels (the input is left untouched).

    symmetric: exactly ``round(rate * N)`` samples chosen at random, each moved to a uniformly
    drawn *different* class. asymmetric (digits, after Patrini et al. 2017): within each source
    class of ``2->7, 3->8, 5<->6, 7->1``, exactly ``round(rate * n_class)`` samples are moved
    to its partner class.
    """
    if not 0.0 <= rate < 1.0:
        raise DatasetError(f"--noise must be in [0, 1), got {rate}")
    rng = np.random.default_rng(seed)
    noisy = np.asarray(labels, dtype=np.int64).copy()
    if rate == 0:
        return noisy
    if kind == "symmetric":
        flip = rng.choice(len(noisy), size=int(round(rate * len(noisy))), replace=False)
        shift = rng.integers(1, n_classes, size=flip.size)
        noisy[flip] = (noisy[flip] + shift) % n_classes
    elif kind == "asymmetric":
        original = noisy.copy()
        for src, dst in ASYMMETRIC_DIGITS.items():
            members = np.flatnonzero(original == src)
            flip = rng.choice(members, size=int(round(rate * members.size)), replace=False)
            noisy[flip] = dst
    else:
        raise DatasetError(f"--noise-kind must be 'symmetric' or 'asymmetric', got {kind!r}")
    return noisy


def digits_images() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's 8x8 digits as uint8 ``(1797, 8, 8)`` images (0..16 scaled to 0..255) and their labels."""
    from sklearn.datasets import load_digits

    d = load_digits()
    return np.clip(np.round(d.images * (255.0 / 16.0)), 0, 255).astype(np.uint8), d.target.astype(np.int64)


def load_digits_dataset(noise: float = 0.0, noise_kind: str = "symmetric", seed: int = 0) -> IndexedDataset:
    """scikit-learn's real 8x8 handwritten digits (1,797 images, 10 classes), with seeded noise."""
    pixels, true = digits_images()
    images = pixels[..., None]
    labels = inject_noise(true, noise, noise_kind, 10, seed)
    n = len(true)
    return IndexedDataset(
        name="digits",
        sample_ids=np.array([f"digits-{i:04d}" for i in range(n)], dtype=object),
        sources=np.array([f"digits[{i}]" for i in range(n)], dtype=object),
        labels=labels,
        classes=[str(c) for c in range(10)],
        images=images,
        true_labels=true,
        info={"noise": noise, "noise_kind": noise_kind, "n_noisy": int((labels != true).sum())},
    )


def _inside(root: Path, path: Path) -> bool:
    try:
        path.resolve().relative_to(root.resolve())
        return True
    except ValueError:
        return False


def _read_image(path: Path, where: str, header_only: bool = False):
    """The PIL image at ``path``, decoded; with ``header_only`` only its header is read (mode and size,
    no pixels). An unreadable file raises ``DatasetError`` naming ``where``."""
    from PIL import Image, UnidentifiedImageError

    Image.MAX_IMAGE_PIXELS = MAX_IMAGE_PIXELS
    if not path.is_file():
        raise DatasetError(f"{where}: image file not found: {path}")
    if path.stat().st_size == 0:
        raise DatasetError(f"{where}: image file is empty (0 bytes): {path}. Remove it or replace it.")
    try:
        with Image.open(path) as im:
            if header_only:
                return im  # mode and size stay readable once the file is closed
            im.load()
            return im.copy()
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError, SyntaxError) as exc:
        reason = str(exc).replace(f" '{path}'", "").replace(str(path), "the file")  # PIL repeats the path
        raise DatasetError(f"{where}: cannot read image {path}: {reason}. Remove it or replace it.") from exc


def _convert(im, mode: str, size: int) -> np.ndarray:
    """A PIL image converted to ``mode`` (L or RGB) and resized (bilinear) to ``size`` x ``size``, as uint8 HWC."""
    from PIL import Image

    im = im.convert(mode)
    if im.size != (size, size):
        im = im.resize((size, size), Image.BILINEAR)
    arr = np.asarray(im, dtype=np.uint8)
    return arr[..., None] if mode == "L" else arr


def _decode(path: Path, where: str, mode: str, size: int) -> np.ndarray:
    """One image file decoded as ``_convert`` does."""
    return _convert(_read_image(path, where), mode, size)


def resize_warning(sizes: set[tuple[int, int]], side: int) -> str | None:
    """The note recorded when images of other sizes than ``side`` x ``side`` are resized (None when none are)."""
    other = sorted(s for s in sizes if s != (side, side))
    if not other:
        return None
    shown = ", ".join(f"{w}x{h}" for w, h in other[:5]) + (f" and {len(other) - 5} more" if len(other) > 5 else "")
    return (f"images of {len(sizes)} different sizes ({shown}) were resized to {side}x{side} (bilinear); "
            "choose the size with --image-size, or give images of one square size")


def _common_format(modes: list[str], sizes: set[tuple[int, int]], image_size: int | None) -> tuple[str, int, list[str]]:
    """Common mode (L if all are grey, else RGB), square side (``image_size``, else the common square size, else 32)
    and the warnings to record (images resized without ``image_size`` asking for it)."""
    grey = all(m in GREY_MODES for m in modes)
    warnings = []
    if image_size is None:
        (w, h), = sizes if len(sizes) == 1 else {(32, 32)}
        image_size = w if w == h else 32
        if (note := resize_warning(sizes, image_size)) is not None:
            warnings.append(note)
    return ("L" if grey else "RGB"), image_size, warnings


def _stack_images(paths: list[Path], wheres: list[str], image_size: int | None) -> tuple[np.ndarray, list[str]]:
    """Decode, convert to a common mode and size, stack to uint8 NHWC; also the warnings of ``_common_format``."""
    imgs = [_read_image(p, w) for p, w in zip(paths, wheres, strict=True)]
    mode, size, warnings = _common_format([im.mode for im in imgs], {im.size for im in imgs}, image_size)
    out = np.empty((len(imgs), size, size, 1 if mode == "L" else 3), dtype=np.uint8)
    for i, im in enumerate(imgs):
        out[i] = _convert(im, mode, size)
    return out, warnings


def _headers(paths: list[Path], wheres: list[str]) -> tuple[list[str], set[tuple[int, int]]]:
    """Modes and sizes from the image headers only (no pixel decoding); unreadable files are reported here."""
    modes, sizes = [], set()
    for path, where in zip(paths, wheres, strict=True):
        im = _read_image(path, where, header_only=True)
        modes.append(im.mode)
        sizes.add(im.size)
    return modes, sizes


class FileImages:
    """Images on disk behaving like a read-only uint8 ``(N, H, W, C)`` array, decoded on demand.

    Indexing with an int returns one ``(H, W, C)`` image; with a slice, index array or boolean mask
    it decodes those images into a new array. ``select`` returns a lazy subset instead. Used for
    datasets too large to hold decoded in memory: the training loop reads them through a
    ``DataLoader`` whose worker processes do the decoding (``engine.data.pipeline``). A file that turns
    out to be corrupt only when decoded raises ``DatasetError`` naming it.
    """

    dtype = np.dtype(np.uint8)
    ndim = 4

    def __init__(self, paths: list[str] | np.ndarray, wheres: list[str] | np.ndarray, mode: str, size: int):
        self.paths = np.asarray(paths, dtype=object)
        self.wheres = np.asarray(wheres, dtype=object)
        self.mode, self.size = mode, int(size)

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return (len(self.paths), self.size, self.size, 1 if self.mode == "L" else 3)

    @property
    def nbytes(self) -> int:
        """Bytes the decoded images would take in memory."""
        return int(np.prod(self.shape))

    def __len__(self) -> int:
        return len(self.paths)

    def _indices(self, key) -> np.ndarray:
        return np.arange(len(self.paths))[key]

    def __getitem__(self, key) -> np.ndarray:
        if isinstance(key, (int, np.integer)):
            return _decode(Path(self.paths[key]), self.wheres[key], self.mode, self.size)
        idx = np.atleast_1d(self._indices(key))
        out = np.empty((len(idx), *self.shape[1:]), dtype=np.uint8)
        for j, i in enumerate(idx):
            out[j] = _decode(Path(self.paths[i]), self.wheres[i], self.mode, self.size)
        return out

    def select(self, key) -> FileImages:
        """A lazy subset (nothing decoded)."""
        idx = self._indices(key)
        return FileImages(self.paths[idx], self.wheres[idx], self.mode, self.size)

    def load(self) -> np.ndarray:
        """Every image decoded into one array."""
        return self[:]


def take(images, key):
    """``images[key]`` that stays lazy for ``FileImages`` (use it for subsets, not for pixels)."""
    return images.select(key) if isinstance(images, FileImages) else images[key]


def _image_array(paths: list[Path], wheres: list[str], image_size: int | None, lazy: bool):
    """Decoded uint8 NHWC images, or, when ``lazy``, a ``FileImages`` after checking every file's header;
    with the warnings to record in the dataset's ``info``."""
    if not lazy:
        return _stack_images(paths, wheres, image_size)
    modes, sizes = _headers(paths, wheres)
    mode, size, warnings = _common_format(modes, sizes, image_size)
    return FileImages([str(p) for p in paths], wheres, mode, size), warnings


def load_folder(root: str | os.PathLike, image_size: int | None = None, lazy: bool = False) -> IndexedDataset:
    """An image folder laid out as ``root/<class>/<file>``; sample_id = path relative to root.

    ``lazy``: check the headers only and decode on demand (``FileImages``).
    """
    root_p = _folder_path(root)
    class_dirs = sorted(p for p in root_p.iterdir() if p.is_dir() and not p.name.startswith("."))
    if len(class_dirs) < 2:
        raise DatasetError(
            f"{root_p}: found {len(class_dirs)} class folder(s); an audit needs at least 2 classes laid out as root/<class>/<image>."
        )
    paths: list[Path] = []
    labels: list[int] = []
    for ci, cdir in enumerate(class_dirs):
        files = sorted(
            p for p in cdir.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith(".")
        )
        if not files:
            raise DatasetError(f"class folder {cdir} holds no images ({', '.join(sorted(IMAGE_EXTENSIONS))}).")
        for f in files:
            if not _inside(root_p, f):
                raise DatasetError(f"{f} points outside the dataset folder {root_p} (symlink?); remove it.")
            paths.append(f)
            labels.append(ci)
    rel = [p.relative_to(root_p).as_posix() for p in paths]
    images, warnings = _image_array(paths, list(rel), image_size, lazy)
    return IndexedDataset(
        name=root_p.name,
        sample_ids=np.array(rel, dtype=object),
        sources=np.array(rel, dtype=object),
        labels=np.array(labels, dtype=np.int64),
        classes=[c.name for c in class_dirs],
        images=images,
        root=str(root_p.resolve()),
        info={"warnings": warnings} if warnings else {},
    )


def load_manifest(csv_path: str | os.PathLike, image_size: int | None = None, lazy: bool = False) -> IndexedDataset:
    """A CSV manifest with header ``path,label[,sample_id]``; paths relative to the CSV's folder (``lazy`` as ``load_folder``)."""
    csv_p = _manifest_path(csv_path)
    root = csv_p.parent.resolve()
    try:
        with open(csv_p, newline="", encoding="utf-8-sig") as fh:
            rows = list(csv.DictReader(fh))
            header = rows[0].keys() if rows else []
    except UnicodeDecodeError as exc:
        raise DatasetError(f"{csv_p}: not UTF-8 text (undecodable byte at offset {exc.start}); save the manifest as "
                           "UTF-8 CSV.") from exc
    if not rows:
        raise DatasetError(f"{csv_p}: no rows; the manifest needs a header path,label[,sample_id] and one row per image.")
    missing = {"path", "label"} - set(header)
    if missing:
        raise DatasetError(f"{csv_p}: missing column(s) {sorted(missing)}; the header must be path,label[,sample_id] (found {len(header)} column(s)).")
    paths, ids, label_names, wheres = [], [], [], []
    seen: dict[str, int] = {}
    for i, row in enumerate(rows, start=2):  # row 1 is the header
        where = f"{csv_p.name} row {i}"
        raw = (row.get("path") or "").strip()
        lab = (row.get("label") or "").strip()
        if not raw:
            raise DatasetError(f"{where}: empty path.")
        if not lab:
            raise DatasetError(f"{where}: empty label; every row needs a class label.")
        p = Path(raw)
        full = p if p.is_absolute() else root / p
        if not _inside(root, full):
            raise DatasetError(f"{where}: the path lies outside the manifest's folder {root}; move the image under it.")
        sid = (row.get("sample_id") or "").strip() or p.as_posix()
        if sid in seen:
            raise DatasetError(f"{where}: duplicate sample_id (first at row {seen[sid]}); sample ids must be unique.")
        seen[sid] = i
        paths.append(full)
        ids.append(sid)
        label_names.append(lab)
        wheres.append(f"{where} ({raw})")
    classes = sorted(set(label_names), key=lambda s: (len(s), s) if s.isdigit() else (0, s))
    if len(classes) < 2:
        raise DatasetError(f"{csv_p}: only one class ({classes[0]!r}); an audit needs at least 2 classes.")
    index = {c: k for k, c in enumerate(classes)}
    images, warnings = _image_array(paths, wheres, image_size, lazy)
    return IndexedDataset(
        name=csv_p.stem,
        sample_ids=np.array(ids, dtype=object),
        sources=np.array([Path(p).resolve().relative_to(root).as_posix() for p in paths], dtype=object),
        labels=np.array([index[c] for c in label_names], dtype=np.int64),
        classes=classes,
        images=images,
        root=str(root),
        info={"warnings": warnings} if warnings else {},
    )


def load_torchvision(name: str, root: str) -> IndexedDataset:
    """A torchvision classification dataset already on disk (``download=False``), train split."""
    import torchvision.datasets as tvd

    cls = getattr(tvd, name, None)
    if cls is None:
        raise DatasetError(f"torchvision has no dataset named {name!r} (try MNIST, FashionMNIST, CIFAR10, CIFAR100, SVHN).")
    try:
        try:
            ds = cls(root, train=True, download=False)
        except TypeError:
            ds = cls(root, split="train", download=False)
    except RuntimeError as exc:
        raise DatasetError(
            f"torchvision {name} not found under {root} ({exc}). Download it once elsewhere with "
            f"torchvision.datasets.{name}({root!r}, download=True) and copy the folder here."
        ) from exc
    data = getattr(ds, "data", None)
    targets = getattr(ds, "targets", None)
    if targets is None:
        targets = getattr(ds, "labels", None)
    if data is not None and targets is not None:
        images = np.asarray(data)
        if images.ndim == 3:
            images = images[..., None]
        elif images.ndim == 4 and images.shape[1] in (1, 3) and images.shape[-1] not in (1, 3):
            images = images.transpose(0, 2, 3, 1)  # SVHN stores NCHW
        images = images.astype(np.uint8)
        labels = np.asarray(targets, dtype=np.int64)
    else:
        pairs = [ds[i] for i in range(len(ds))]
        images = np.stack([np.asarray(im.convert("RGB")) for im, _ in pairs]).astype(np.uint8)
        labels = np.asarray([t for _, t in pairs], dtype=np.int64)
    classes = [str(c) for c in getattr(ds, "classes", range(int(labels.max()) + 1))]
    n = len(labels)
    return IndexedDataset(
        name=name,
        sample_ids=np.array([f"{name.lower()}-{i:06d}" for i in range(n)], dtype=object),
        sources=np.array([f"{name}[{i}]" for i in range(n)], dtype=object),
        labels=labels,
        classes=classes,
        images=images,
        root=str(Path(root).resolve()),
    )


def _folder_path(root: str | os.PathLike) -> Path:
    root_p = Path(root).expanduser()
    if not root_p.exists():
        raise DatasetError(f"dataset folder not found: {root_p}. Give an existing folder laid out as root/<class>/<image>.")
    if not root_p.is_dir():
        raise DatasetError(f"{root_p} is not a folder. Give a folder laid out as root/<class>/<image>, or a .csv manifest.")
    return root_p


def _manifest_path(csv_path: str | os.PathLike) -> Path:
    csv_p = Path(csv_path).expanduser()
    if not csv_p.is_file():
        raise DatasetError(f"manifest not found: {csv_p}. Give a CSV with columns path,label[,sample_id].")
    return csv_p


def _torchvision_parts(spec: str) -> tuple[str, str]:
    parts = spec.split(":", 2)
    if len(parts) != 3 or not parts[1] or not parts[2]:
        raise DatasetError(f"--dataset {spec!r}: expected torchvision:NAME:ROOT, e.g. torchvision:CIFAR10:./data")
    return parts[1], parts[2]


def check_source(spec: str) -> None:
    """The checks of ``load_dataset`` that read nothing of the dataset, for a request that must answer at once:
    the spec is well formed and its folder or manifest exists (one stat: no listing, no image opened)."""
    if spec == "digits":
        return
    if spec.startswith("torchvision:"):
        _torchvision_parts(spec)
    elif spec.lower().endswith(".csv"):
        _manifest_path(spec)
    else:
        _folder_path(spec)


def load_dataset(
    spec: str,
    noise: float = 0.0,
    noise_kind: str = "symmetric",
    seed: int = 0,
    image_size: int | None = None,
    lazy: bool = False,
) -> IndexedDataset:
    """One way to read a dataset: ``digits``, a folder path, a ``.csv`` manifest or ``torchvision:NAME:ROOT``.

    ``noise`` flips labels of any source (true labels are then recorded); for ``digits`` it is the
    way to get a benchmark with known errors. ``lazy``: image files (folder, manifest) are checked
    by header and decoded on demand instead of all at once; array sources load as usual.
    """
    if spec == "digits":
        ds = load_digits_dataset(noise, noise_kind, seed)
        return ds
    if spec.startswith("torchvision:"):
        ds = load_torchvision(*_torchvision_parts(spec))
    elif spec.lower().endswith(".csv"):
        ds = load_manifest(spec, image_size, lazy)
    else:
        ds = load_folder(spec, image_size, lazy)
    if noise > 0:
        if noise_kind == "asymmetric":
            raise DatasetError("--noise-kind asymmetric is defined for digits only (2->7, 3->8, 5<->6, 7->1).")
        ds.true_labels = ds.labels.copy()
        ds.labels = inject_noise(ds.labels, noise, noise_kind, ds.n_classes, seed)
        ds.info.update(noise=noise, noise_kind=noise_kind, n_noisy=int((ds.labels != ds.true_labels).sum()))
    return ds
