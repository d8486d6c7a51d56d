"""Images of a run's samples, read from the dataset's own source: arrays for built-ins, files under the root.

A file is served only if it resolves inside the dataset root recorded in the run's config.
"""

from __future__ import annotations

import io
from functools import lru_cache
from pathlib import Path

import numpy as np

from engine.store.runs import Run


class ImageError(ValueError):
    """An image cannot be shown (missing file, outside the root, unreadable)."""


@lru_cache(maxsize=2)
def _digits_images() -> np.ndarray:
    from engine.data.datasets import digits_images

    return digits_images()[0]


@lru_cache(maxsize=1)
def _torchvision_images(spec: str) -> np.ndarray:
    from engine.data.datasets import load_dataset

    return load_dataset(spec).images


class SampleImages:
    """``image(i)`` gives sample i's pixels (uint8, HxW or HxWxC); ``png(i, size)`` a cached thumbnail."""

    def __init__(self, run: Run):
        cfg = run.config()
        self.spec = cfg["dataset"]
        self.root = Path(cfg["dataset_root"]).resolve() if cfg.get("dataset_root") else None
        import pyarrow.parquet as pq

        # One Arrow string array, not a million Python strings (about 20 instead of 90 bytes a path).
        self.sources = pq.read_table(run.path / "samples.parquet", columns=["source"]).column("source").combine_chunks()
        self._png = lru_cache(maxsize=4096)(self._make_png)

    def source(self, i: int) -> str:
        """Sample i's source: its path relative to the dataset root, or ``name[index]`` for array datasets."""
        return self.sources[int(i)].as_py()

    def image(self, i: int) -> np.ndarray:
        """Sample ``i``'s pixels; array datasets are indexed by the source's ``name[index]``, never by run row."""
        if self.spec == "digits":
            return _digits_images()[self._array_index(i)]
        if self.spec.startswith("torchvision:"):
            return _torchvision_images(self.spec)[self._array_index(i)]
        if self.root is None:
            raise ImageError("this run records no dataset root")
        return read_under_root(self.root, self.source(i))

    def _array_index(self, i: int) -> int:
        return int(self.source(i).rsplit("[", 1)[1].rstrip("]"))

    def png(self, i: int, size: int = 96) -> bytes:
        """PNG thumbnail, upscaled without smoothing when the image is small (8x8 digits stay crisp)."""
        return self._png(int(i), int(size))

    def _make_png(self, i: int, size: int) -> bytes:
        return thumbnail_png(self.image(i), size)


def read_under_root(root: str | Path, relative: str) -> np.ndarray:
    """Pixels of ``root / relative``, refused (``ImageError``) unless the file resolves inside ``root``."""
    from PIL import Image, UnidentifiedImageError

    base = Path(root).resolve()
    path = (base / relative).resolve()
    if not path.is_relative_to(base):
        raise ImageError(f"{relative} is outside the dataset root {base}; not served")
    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB") if im.mode not in ("L", "RGB") else im.copy())
    except (FileNotFoundError, UnidentifiedImageError, OSError, Image.DecompressionBombError) as exc:
        raise ImageError(f"cannot read {path}: {exc}") from exc


def thumbnail_png(pixels: np.ndarray, size: int = 96) -> bytes:
    """PNG thumbnail, upscaled without smoothing when the image is small (8x8 digits stay crisp)."""
    from PIL import Image

    im = Image.fromarray(np.squeeze(pixels))
    scale = size / max(im.size)
    im = im.resize((max(1, round(im.size[0] * scale)), max(1, round(im.size[1] * scale))),
                   Image.NEAREST if scale >= 2 else Image.BILINEAR)
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()
