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


class SoftSpectralNorm(nn.Module):
    """Parametrization ``W -> W / max(1, sigma(W) / coeff)`` (DDU's soft spectral normalisation, Mukhoti et al.
    2021, after Miyato et al. 2018): caps the layer's Lipschitz constant at ``coeff`` without shrinking layers
    already below it. ``sigma`` is estimated by power iteration (one step per training forward) on the weight
    flattened to a matrix, the usual approximation for convolutions."""

    def __init__(self, weight: torch.Tensor, coeff: float):
        super().__init__()
        self.coeff = coeff
        rows = weight.shape[0]
        g = torch.Generator().manual_seed(0)
        self.register_buffer("u", nn.functional.normalize(torch.randn(rows, generator=g), dim=0).to(weight.device))

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        w = weight.flatten(1)
        u = self.u
        if self.training:
            with torch.no_grad():
                v = nn.functional.normalize(w.t() @ u, dim=0)
                u = nn.functional.normalize(w @ v, dim=0)
                self.u.copy_(u)
        v = nn.functional.normalize(w.t() @ u, dim=0)
        sigma = torch.dot(u, w @ v)
        return weight / torch.clamp(sigma / self.coeff, min=1.0)


def apply_spectral_norm(model: nn.Module, coeff: float) -> nn.Module:
    """Soft spectral normalisation with coefficient ``coeff`` on every convolution and linear layer."""
    from torch.nn.utils import parametrize

    for module in model.modules():
        if isinstance(module, nn.Conv2d | nn.Linear):
            parametrize.register_parametrization(module, "weight", SoftSpectralNorm(module.weight, coeff))
    return model


def build_model(name: str, in_channels: int, n_classes: int, spectral_norm: float | None = None) -> nn.Module:
    """Model by name: ``cnn`` (default) or ``resnet18``; ``spectral_norm=c`` adds soft spectral normalisation."""
    if name == "cnn":
        model = SmallCNN(in_channels, n_classes)
    elif name == "resnet18":
        model = SmallResNet18(in_channels, n_classes)
    else:
        raise ValueError(f"unknown model {name!r}; choose one of {', '.join(MODELS)}")
    return apply_spectral_norm(model, spectral_norm) if spectral_norm else model


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
