"""Multi-process audits under ``torchrun``: DistributedDataParallel, exact per-sample capture across ranks.

Each rank trains on its shard of the epoch's shuffled order (as ``DistributedSampler``: the order is
padded by repeating its first indices so every rank gets as many samples). Padded repeats are
trained on but never captured, so every sample gets exactly one value per epoch; each rank writes
its captured values into full-length zero buffers and one ``all_reduce(SUM)`` per epoch gathers
them on every rank. Rank 0 alone writes the run directory, which is identical in format to a
single-process run's.
"""

from __future__ import annotations

import os

import numpy as np


def world() -> tuple[int, int]:
    """(rank, world size) of this process; (0, 1) when not launched by torchrun."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_main() -> bool:
    return world()[0] == 0


def init_from_env(device: str = "auto") -> bool:
    """Join the process group that torchrun describes in the environment (NCCL on CUDA, else gloo).

    Returns False (and does nothing) outside torchrun. On CUDA each rank takes GPU ``LOCAL_RANK``.
    """
    import torch
    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return dist.is_initialized()
    use_cuda = torch.cuda.is_available() and device in ("auto", "cuda")
    if use_cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return True


def shard(order: np.ndarray | list, rank: int, size: int) -> tuple[np.ndarray, np.ndarray]:
    """This rank's part of an epoch's order and, for each of its entries, whether to capture it.

    Mirrors ``DistributedSampler``: pad ``order`` to a multiple of ``size`` with its first entries, take
    every ``size``-th from ``rank``. The padded repeats are marked ``False`` (trained, not captured).
    """
    order = np.asarray(order)
    n = len(order)
    total = -(-n // size) * size
    padded = np.concatenate([order, order[: total - n]]) if total > n else order
    capture = np.arange(total) < n
    return padded[rank::size], capture[rank::size]


def broadcast_object(obj, src: int = 0):
    """Send a picklable object (a run directory path) from ``src`` to every rank; identity when single-process."""
    import torch.distributed as dist

    if not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]
