"""Classifiers: a small CNN for small images (default), ResNet-18 adapted to small inputs, and any
torchvision classification architecture (``torchvision:NAME``), optionally from a local weights file.

All expose ``features(x)`` (penultimate-layer features) and ``head`` (the last linear layer),
so out-of-distribution densities can be fitted on the same network that was audited.
"""

from __future__ import annotations

import torch
from torch import nn

from engine.training.config import MODELS, torchvision_architectures


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


TORCHVISION = "torchvision:"
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


class ModelError(ValueError):
    """A model or weights file cannot be used; the message says why and what to do."""


def check_model_name(name: str) -> None:
    """Raise ``ModelError`` unless ``name`` is ``cnn``, ``resnet18`` or ``torchvision:ARCH`` of a known ARCH."""
    if name in MODELS:
        return
    if name.startswith(TORCHVISION):
        arch = name[len(TORCHVISION):]
        known = torchvision_architectures()
        if arch not in known:
            raise ModelError(f"{arch!r} is not a torchvision classification architecture; choose one of "
                             f"{', '.join(known)}")
        return
    raise ModelError(f"unknown model {name!r}; choose {', '.join(MODELS)} or torchvision:NAME (e.g. torchvision:resnet18)")


def weights_enum(spec: str | None):
    """The torchvision weights enum named ``spec`` (``ResNet18_Weights.IMAGENET1K_V1``), or None."""
    if not spec:
        return None
    from torchvision.models import get_weight

    try:
        return get_weight(spec)
    except (ValueError, KeyError, AttributeError) as exc:
        raise ModelError(f"--weights-enum {spec!r} is not a torchvision weights enum (e.g. ResNet18_Weights.IMAGENET1K_V1)"
                         ) from exc


def input_spec(model: str, weights: str | None, enum: str | None, in_channels: int
               ) -> tuple[int | None, tuple[list[float], list[float]] | None]:
    """Input side and per-channel (mean, std) a model expects, when known.

    From the weights enum's ``transforms()`` (``crop_size``, ``mean``, ``std``) when one is named;
    else ImageNet's normalisation for a weights file (torchvision's and most published files are
    ImageNet-trained; name ``--weights-enum`` to use another); else nothing (a model trained from
    scratch is fed the dataset's own per-channel standardisation). One-channel data gets the mean
    of the three channels' values (its single channel is repeated for a 3-channel model).
    """
    if not model.startswith(TORCHVISION) or not weights:
        return None, None
    side, mean, std = None, list(IMAGENET_MEAN), list(IMAGENET_STD)
    w = weights_enum(enum)
    if w is not None:
        t = w.transforms()
        side = int(t.crop_size[0]) if getattr(t, "crop_size", None) else None
        mean, std = list(getattr(t, "mean", mean)), list(getattr(t, "std", std))
    if in_channels == 1:
        mean, std = [sum(mean) / len(mean)], [sum(std) / len(std)]
    return side, (mean, std)


class TorchvisionClassifier(nn.Module):
    """A torchvision classification network with its last linear layer as ``head`` (``n_classes`` outputs).

    ``features(x)`` is the network with the head replaced by an identity: the penultimate features
    (for DDU). Inputs are resized to ``input_size`` (when given) and a one-channel image is repeated
    to the three channels the architectures expect.
    """

    def __init__(self, arch: str, in_channels: int, n_classes: int, weights: str | None = None,
                 finetune: str = "all", input_size: int | None = None):
        super().__init__()
        import torchvision

        check_model_name(TORCHVISION + arch)
        kwargs = {"aux_logits": False, "init_weights": False} if arch in ("inception_v3", "googlenet") else {}
        net = torchvision.models.get_model(arch, weights=None, **kwargs)
        name, last = _last_linear(net, arch)
        if weights:
            state = load_state_dict(weights)
            out = state.get(f"{name}.weight")
            if out is not None and out.ndim == 2 and out.shape[0] != last.out_features:
                last = nn.Linear(last.in_features, out.shape[0])  # a file fine-tuned for another class count
                _set_module(net, name, last)
            missing, unexpected = _compare_keys(net, state)
            if missing or unexpected:
                raise ModelError(f"{weights} does not hold {arch} weights: missing {len(missing)} key(s) "
                                 f"{missing[:3]}, unexpected {len(unexpected)} {unexpected[:3]}. Give a state dict "
                                 f"saved from torchvision.models.{arch}(), or another --model")
            try:
                net.load_state_dict(state, strict=True)
            except RuntimeError as exc:
                raise ModelError(f"{weights} does not fit {arch}: {str(exc).splitlines()[-1].strip()}") from exc
        _set_module(net, name, nn.Identity())
        self.net = net
        self.head = nn.Linear(last.in_features, n_classes)
        self.in_channels = in_channels
        self.input_size = input_size
        if finetune == "head":
            for p in self.net.parameters():
                p.requires_grad_(False)
        elif finetune != "all":
            raise ModelError(f"finetune must be all or head, got {finetune!r}")

    def features(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        if self.input_size and x.shape[-1] != self.input_size:
            x = nn.functional.interpolate(x, size=(self.input_size, self.input_size), mode="bilinear",
                                          align_corners=False)
        return self.net(x).flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def _last_linear(net: nn.Module, arch: str) -> tuple[str, nn.Linear]:
    """Name and module of the classifier's last linear layer (the one that outputs the classes)."""
    found = [(n, m) for n, m in net.named_modules() if isinstance(m, nn.Linear)]
    if not found:
        raise ModelError(f"torchvision:{arch} ends without a linear layer (e.g. a convolutional classifier); "
                         "choose another architecture")
    return found[-1]


def _set_module(net: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(net.get_submodule(parent) if parent else net, leaf, module)


def _compare_keys(net: nn.Module, state: dict) -> tuple[list[str], list[str]]:
    want = set(net.state_dict())
    have = {k for k in state if not k.startswith(("AuxLogits.", "aux1.", "aux2."))}
    for k in set(state) - have:
        state.pop(k)
    return sorted(want - have), sorted(have - want)


def load_state_dict(path: str) -> dict:
    """A state dict from ``path`` with ``torch.load(weights_only=True)`` (no pickled code runs).

    Accepts a bare state dict or a checkpoint holding one under ``state_dict`` or ``model``; a
    ``module.`` prefix (DistributedDataParallel) is removed.
    """
    from pathlib import Path

    p = Path(path).expanduser()
    if not p.is_file():
        raise ModelError(f"weights file {p} does not exist; with no internet, save a state dict there first "
                         "(torch.save(model.state_dict(), path))")
    try:
        obj = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle errors, truncated zips, non-tensor objects refused by weights_only
        raise ModelError(f"cannot read weights {p}: {exc}. Save a state dict with torch.save(model.state_dict(), path)"
                         ) from exc
    for key in ("state_dict", "model"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ModelError(f"{p} does not hold a state dict (a mapping of names to tensors)")
    return {k.removeprefix("module."): v for k, v in obj.items()}


def build_model(name: str, in_channels: int, n_classes: int, spectral_norm: float | None = None,
                weights: str | None = None, finetune: str = "all", input_size: int | None = None) -> nn.Module:
    """Model by name: ``cnn`` (default), ``resnet18`` (small-input ResNet-18 from scratch) or ``torchvision:ARCH``
    (any torchvision classification architecture; ``weights``: a local state dict to start from, its head
    replaced for ``n_classes``; ``finetune="head"`` trains the new head only). ``spectral_norm=c`` adds soft
    spectral normalisation."""
    if name == "cnn":
        model = SmallCNN(in_channels, n_classes)
    elif name == "resnet18":
        model = SmallResNet18(in_channels, n_classes)
    elif name.startswith(TORCHVISION):
        model = TorchvisionClassifier(name[len(TORCHVISION):], in_channels, n_classes, weights, finetune, input_size)
    else:
        check_model_name(name)
        raise AssertionError(name)
    return apply_spectral_norm(model, spectral_norm) if spectral_norm else model


def model_for(cfg, in_channels: int, n_classes: int, pretrained: bool = True) -> nn.Module:
    """The model of an ``AuditConfig``; ``pretrained=False`` skips reading the weights file (a checkpoint follows)."""
    side, _ = input_spec(cfg.model, cfg.weights, cfg.weights_enum, in_channels)
    return build_model(cfg.model, in_channels, n_classes, cfg.spectral_norm, cfg.weights if pretrained else None,
                       cfg.finetune, cfg.image_size or side)


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
