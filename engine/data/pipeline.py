"""The input pipeline: how training and the final model's passes get batches of images.

Two sources give the same uint8 NCHW batches for the same order of sample indices:

- ``DeviceImages`` holds the whole dataset as one uint8 tensor on the training device; a batch is a
  gather on the device and nothing crosses the host-device bus during training. Best while the
  decoded data is small (digits, CIFAR-sized arrays): ``--loader memory``.
- ``StreamImages`` reads batches from the host through a ``torch.utils.data.DataLoader``: from an
  array, a memory map, or image files (``datasets.FileImages``) decoded by worker processes while the
  model trains on the previous batches; pinned memory and non-blocking copies on CUDA. For data
  that does not fit in memory: ``--loader stream``.

``--loader auto`` (the default) streams when the decoded images would take more than
``IN_MEMORY_LIMIT`` bytes (on a GPU, more than a quarter of its free memory), else decodes
everything once (in parallel worker processes) and keeps it in memory. A run's channel statistics are
measured once when it is prepared (``normalization_stats``: exact integer sums over the same seeded
sample of at most ``STATS_SAMPLES`` images, whatever the loader), recorded in its config and given to
every source, so both sources normalise identically, train to the same model, and ``--resume`` with
another ``--loader`` keeps them.
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Iterator

import numpy as np
import torch

from engine.data.datasets import DatasetError
from engine.training.config import LOADERS

IN_MEMORY_LIMIT = 4 * 1024**3  # decoded bytes above which ``auto`` streams
SMALL_BYTES = 64 * 1024**2  # decoded bytes below which image files are decoded in the main process
STATS_SAMPLES = 4096  # images behind the normalisation statistics of a streamed dataset


def is_lazy(images) -> bool:
    """Whether ``images`` are decoded on demand (``FileImages`` or a view of them) rather than an array in memory."""
    return not isinstance(images, np.ndarray)


def default_workers(images) -> int:
    """Decoding worker processes: one per spare core (at most 8) for image files; none for arrays, nor for
    files under ``SMALL_BYTES`` decoded (starting a worker costs about a second, decoding them less)."""
    if not is_lazy(images) or images.nbytes < SMALL_BYTES:
        return 0
    return max(1, min(8, (os.cpu_count() or 2) - 1))


def in_memory_limit(device: torch.device | None = None, free_bytes: int | None = None) -> int:
    """Decoded bytes up to which ``auto`` keeps the dataset on ``device``: ``IN_MEMORY_LIMIT``, and on a
    GPU at most a quarter of its free memory (``free_bytes``, queried when not given), leaving the rest
    to the model, its activations and the optimiser."""
    if device is None or device.type != "cuda":
        return IN_MEMORY_LIMIT
    if free_bytes is None:
        free_bytes = torch.cuda.mem_get_info(device)[0]
    return min(IN_MEMORY_LIMIT, free_bytes // 4)


def choose_loader(requested: str, images, device: torch.device | None = None) -> str:
    """``memory`` or ``stream`` for ``--loader requested`` (``auto``: by the decoded size against
    ``in_memory_limit(device)``; without a device, against the host limit ``IN_MEMORY_LIMIT``)."""
    if requested not in LOADERS:
        raise ValueError(f"loader must be one of {', '.join(LOADERS)}, got {requested!r}")
    if requested != "auto":
        return requested
    return "stream" if images.nbytes > in_memory_limit(device) else "memory"


def channel_stats(batches) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and (unbiased) std in [0, 1] units over uint8 NCHW batches.

    Exact: integer sums of values and squares, so the result does not depend on the batching.
    """
    total = squares = None
    count = 0
    for x in batches:
        v = x.to(torch.int64)
        s, q = v.sum(dim=(0, 2, 3)).cpu(), (v * v).sum(dim=(0, 2, 3)).cpu()
        total, squares = (s, q) if total is None else (total + s, squares + q)
        count += v.shape[0] * v.shape[2] * v.shape[3]
    mean = total.double() / count
    var = (squares.double() / count - mean * mean) * count / max(1, count - 1)
    std = (var.clamp_min(0).sqrt() / 255.0).clamp_min(1e-3)
    return (mean / 255.0).float().view(1, -1, 1, 1), std.float().view(1, -1, 1, 1)


def stats_batch(shape: tuple) -> int:
    """Images per chunk of ``channel_stats``: about 16 MB of uint8 (128 MB once widened to int64)."""
    return max(1, min(4096, 2**24 // int(np.prod(shape[1:]))))


def stats_sample(n: int, seed: int = 0) -> np.ndarray:
    """Sorted indices of the images a streamed source measures its normalisation on: all of them up to
    ``STATS_SAMPLES``, else ``STATS_SAMPLES`` drawn with ``seed``."""
    if n <= STATS_SAMPLES:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, STATS_SAMPLES, replace=False))


def normalize(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """A uint8 NCHW batch as the model sees it: ``(x / 255 - mean) / std`` in float32 (the one place this is written)."""
    return (x.float() / 255.0 - mean) / std


def fixed_slices(n: int, size: int) -> list[slice]:
    return [slice(s, min(n, s + size)) for s in range(0, n, size)]


class DeviceImages:
    """The whole dataset as one uint8 tensor on ``device``, kept NHWC (no copy of a host array on CPU)."""

    kind, workers = "memory", 0

    def __init__(self, images: np.ndarray, device: torch.device, stats: tuple | None = None):
        self.data = torch.from_numpy(np.ascontiguousarray(images)).to(device)  # NHWC
        self.device = device
        self.n, self.side, _, self.channels = self.data.shape
        if stats is None:
            chunks = fixed_slices(self.n, stats_batch(self.data.shape))
            stats = channel_stats(self.data[sl].permute(0, 3, 1, 2) for sl in chunks)
        self.mean, self.std = (t.to(device) for t in stats)

    def batches(self, order: np.ndarray, slices: list[slice]) -> Iterator[torch.Tensor]:
        """uint8 NCHW batches ``images[order[sl]]`` for each slice, on the device (channels-last on CUDA)."""
        order_d = torch.as_tensor(np.asarray(order), dtype=torch.int64).to(self.device)
        cuda = self.device.type == "cuda"
        for sl in slices:
            x = self.data[order_d[sl]].permute(0, 3, 1, 2)
            yield x if cuda else x.contiguous()

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class _IndexBatches(torch.utils.data.Dataset):
    """``dataset[index_array]`` -> one uint8 NHWC batch (decoded in the worker for ``FileImages``)."""

    def __init__(self, images):
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, idx: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(self.images[np.asarray(idx)]))


class _Order(torch.utils.data.Sampler):
    """The batches of the current pass over the data; replaced before each pass (workers persist)."""

    def __init__(self):
        self.batches: list[np.ndarray] = []

    def __iter__(self):
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


def _start_method() -> str:
    """How decoding workers start: ``forkserver`` from a multi-threaded process whose main module is not
    re-imported by workers, else ``fork`` where the platform has it (PyTorch's default on Linux), else ``spawn``.

    Forking a process that runs other threads (the dashboard: Streamlit's server, sessions, the job worker)
    copies locks those threads may hold at that instant, and a child can hang on one. ``forkserver`` /
    ``spawn`` avoid that but re-import the main module in every worker, unless the module names itself
    ``__main__`` in its ``__spec__``: under Streamlit the main module is the dashboard script, and app.py
    sets that spec so it does not run again in each worker. A main module without such a spec (a plain
    script) keeps ``fork``.
    """
    import multiprocessing
    import threading

    methods = multiprocessing.get_all_start_methods()
    if "fork" not in methods or sys.platform == "darwin":
        return "spawn"
    if threading.active_count() > 1 and "forkserver" in methods and not _workers_rerun_main():
        return "forkserver"
    return "fork"


def _workers_rerun_main() -> bool:
    """Whether spawned / forkserver workers would import the main script again (it has a file and no spec name)."""
    main = sys.modules.get("__main__")
    if getattr(getattr(main, "__spec__", None), "name", None):
        return False  # started as a module (python -m ...), or a script that named itself __main__
    return bool(getattr(main, "__file__", None))


def _worker_error(exc: Exception) -> Exception:
    """A worker's ``DatasetError`` with its own message (the DataLoader wraps it in a traceback dump)."""
    if isinstance(exc, DatasetError):
        m = re.search(r"DatasetError: (.*)\s*$", str(exc))
        return DatasetError(m.group(1).strip() if m else str(exc))
    return exc


class StreamImages:
    """Batches read from host ``images`` (array, memmap or ``FileImages``) by a ``DataLoader``.

    ``workers`` processes decode ahead of the training loop (started as ``_start_method`` says);
    batches are pinned and copied without blocking on CUDA.
    """

    kind = "stream"

    def __init__(self, images, device: torch.device, workers: int | None = None, stats: tuple | None = None,
                 seed: int = 0):
        self.images, self.device = images, device
        self.n, h, _, c = images.shape
        self.channels, self.side = c, h
        self.workers = default_workers(images) if workers is None else int(workers)
        self._order = _Order()
        cuda = device.type == "cuda"
        kw = {}
        if self.workers > 0:
            import multiprocessing

            kw = dict(persistent_workers=True, prefetch_factor=4,
                      multiprocessing_context=multiprocessing.get_context(_start_method()))
        self.loader = torch.utils.data.DataLoader(
            _IndexBatches(images), sampler=self._order, batch_size=None, num_workers=self.workers, pin_memory=cuda, **kw
        )
        if stats is None:
            pick = stats_sample(self.n, seed)
            stats = channel_stats(self.batches(pick, fixed_slices(len(pick), stats_batch(images.shape))))
        self.mean, self.std = (t.to(device) for t in stats)

    def batches(self, order: np.ndarray, slices: list[slice]) -> Iterator[torch.Tensor]:
        """uint8 NCHW batches ``images[order[sl]]`` for each slice, on the device."""
        order = np.asarray(order)
        self._order.batches = [order[sl] for sl in slices]
        cuda = self.device.type == "cuda"
        it = iter(self.loader)
        while True:
            try:
                x = next(it)
            except StopIteration:
                return
            except Exception as exc:
                raise _worker_error(exc) from None
            x = x.to(self.device, non_blocking=cuda).permute(0, 3, 1, 2)  # NHWC on the device = channels-last NCHW
            yield x if cuda else x.contiguous()

    def close(self) -> None:
        it = getattr(self.loader, "_iterator", None)
        if it is not None and hasattr(it, "_shutdown_workers"):
            it._shutdown_workers()
        self.loader._iterator = None

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def materialize(images, workers: int | None = None) -> np.ndarray:
    """Every image decoded into one uint8 NHWC array (``FileImages`` in parallel worker processes)."""
    if not is_lazy(images):
        return images
    out = np.empty(images.shape, dtype=np.uint8)
    with StreamImages(images, torch.device("cpu"), workers, stats=(torch.zeros(1), torch.ones(1))) as src:
        slices = fixed_slices(len(images), 256)
        for sl, x in zip(slices, src.batches(np.arange(len(images)), slices), strict=True):
            out[sl] = x.permute(0, 2, 3, 1).numpy()
    return out


def normalization_stats(images, workers: int | None = None, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """The per-channel (mean, std) of a run, whatever its loader: exact over ``STATS_SAMPLES`` images drawn
    with ``seed`` (all of them when fewer), read by ``workers`` decoding processes. Measured once when the run
    is prepared (``audit.prepare``) and recorded in its config (``stats_record`` / ``run_stats``)."""
    with StreamImages(images, torch.device("cpu"), workers, seed=seed) as src:
        return src.mean, src.std


def stats_record(stats: tuple, n_images: int) -> dict:
    """The ``normalization`` entry of a run's config: per-channel mean and std (in [0, 1] units) and the number of
    images they were measured on."""
    mean, std = stats
    return {"mean": [float(v) for v in mean.flatten()], "std": [float(v) for v in std.flatten()], "images": int(n_images)}


def run_stats(config: dict) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The normalisation statistics a run recorded when it was prepared (None for a run made before they were)."""
    rec = config.get("normalization")
    if not rec:
        return None
    return (torch.tensor(rec["mean"], dtype=torch.float32).view(1, -1, 1, 1),
            torch.tensor(rec["std"], dtype=torch.float32).view(1, -1, 1, 1))


def make_source(images, device: torch.device, loader: str = "auto", workers: int | None = None,
                stats: tuple | None = None, seed: int = 0) -> DeviceImages | StreamImages:
    """The image source for ``--loader`` (see the module docstring); ``stats`` reuses a training set's normalisation."""
    if choose_loader(loader, images, device) == "stream":
        return StreamImages(images, device, workers, stats, seed)
    return DeviceImages(materialize(images, workers), device, stats)


def sequential(source, batch: int = 512) -> Iterator[tuple[slice, torch.Tensor]]:
    """``(slice, batch)`` over the source in dataset order, for inference passes."""
    slices = fixed_slices(source.n, batch)
    yield from zip(slices, source.batches(np.arange(source.n), slices), strict=True)
