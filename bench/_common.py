"""Helpers shared by the benchmark scripts."""

from __future__ import annotations

import platform

import torch


def machine() -> str:
    dev = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads, {dev}, torch {torch.__version__}"


def seconds_per_epoch(cfg, source, targets: torch.Tensor, n_classes: int, run, capture: bool) -> float:
    """Wall time per epoch of one training pass over ``source`` (capture into ``run``'s arrays, or none)."""
    import time

    from engine.store.runs import DynamicsWriter
    from engine.training.loop import train_pass

    writer = DynamicsWriter(run, 0, cfg.epochs, source.n) if capture else None
    if source.device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    train_pass(cfg, source, targets, n_classes, n_classes, 0, writer, capture=capture)
    if source.device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / cfg.epochs
