"""Helpers shared by the benchmark scripts."""

from __future__ import annotations

import platform

import torch


def machine() -> str:
    dev = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads, {dev}, torch {torch.__version__}"
