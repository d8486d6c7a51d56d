"""Classifiers: a small CNN for small images (default) and ResNet-18 adapted to small inputs.

Both expose ``features(x)`` (penultimate-layer features) and ``head`` (the last linear layer),
so out-of-distribution densities can be fitted on the same network that was audited.
"""

from __future__ import annotations

import torch
from torch import nn

from .config import MODELS


class SmallCNN(nn.Module):
    """Three 3x3 conv blocks (32, 64, 128 channels, BatchNorm, ReLU), global average pool, linear head."""

    def __init__(self, in_channels: int, n_classes: int, width: int = 32):
        super().__init__()
        w = width
        self.body = nn.Sequential(
            nn.Conv2d(in_channels, w, 3, padding=1, bias=False),
            nn.BatchNorm2d(w),
            nn.ReLU(inplace=True),
            nn.Conv2d(w, 2 * w, 3, padding=1, bias=False),
            nn.BatchNorm2d(2 * w),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            nn.Conv2d(2 * w, 4 * w, 3, padding=1, bias=False),
            nn.BatchNorm2d(4 * w),
            nn.ReLU(inplace=True),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.head = nn.Linear(4 * w, n_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


class SmallResNet18(nn.Module):
    """torchvision ResNet-18 from scratch with a 3x3 stride-1 stem and no max-pool (for 8-64 px images)."""

    def __init__(self, in_channels: int, n_classes: int):
        super().__init__()
        from torchvision.models import resnet18

        net = resnet18(weights=None, num_classes=n_classes)
        net.conv1 = nn.Conv2d(in_channels, 64, 3, stride=1, padding=1, bias=False)
        net.maxpool = nn.Identity()
        self.head = net.fc
        net.fc = nn.Identity()
        self.net = net

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def build_model(name: str, in_channels: int, n_classes: int) -> nn.Module:
    """Model by name: ``cnn`` (default) or ``resnet18``."""
    if name == "cnn":
        return SmallCNN(in_channels, n_classes)
    if name == "resnet18":
        return SmallResNet18(in_channels, n_classes)
    raise ValueError(f"unknown model {name!r}; choose one of {', '.join(MODELS)}")


def pick_device(requested: str = "auto") -> torch.device:
    """``auto`` picks CUDA, then MPS, then CPU; an explicit unavailable device is an error."""
    if requested == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", torch.cuda.current_device())  # torchrun: this rank's GPU
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    dev = torch.device(requested)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda requested but no CUDA device is available; use --device cpu or auto")
    return dev
