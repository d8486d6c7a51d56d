"""The audit configuration: everything needed to reproduce a run, saved as ``config.json``."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

MODELS = ("cnn", "resnet18")

CUTOFFS = ("auto", "threshold")
LOADERS = ("auto", "memory", "stream")
CORRUPTIONS = ("noise", "blur", "invert")


# Keys of a run's config.json that describe the prepared run rather than the audit settings.
RUN_KEYS = ("dataset_root", "dataset_info", "image_shape", "normalization", "origin")


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the option and a valid range."""


def torchvision_architectures() -> list[str]:
    """Every torchvision classification architecture (``torchvision.models.list_models(module=torchvision.models)``).

    Imports torchvision (and so PyTorch: seconds on a cold start) at its first call only: this module, and the
    dashboard's pages that import it through ``engine.ui``, load without PyTorch.
    """
    import torchvision

    return torchvision.models.list_models(module=torchvision.models)


@dataclass
class AuditConfig:
    dataset: str = "digits"
    noise: float = 0.0  # labels flipped on purpose to test the audit (only the demo sets it; never a user's data)
    noise_kind: str = "symmetric"
    image_size: int | None = None
    model: str = "cnn"  # cnn | resnet18 | torchvision:ARCH (any torchvision classification architecture)
    weights: str | None = None  # torchvision:ARCH only: a local state dict to start from (head replaced)
    weights_enum: str | None = None  # the torchvision weights enum of that file, e.g. ResNet18_Weights.IMAGENET1K_V1
    finetune: str = "all"  # all | head (with weights: train the new head only)
    epochs: int = 30
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 5e-3
    batch_size: int = 64
    augment: bool = True
    seed: int = 0
    device: str = "auto"
    loader: str = "auto"  # input pipeline: memory (whole dataset on the device), stream (DataLoader), auto (by size)
    workers: int | None = None  # DataLoader decoding processes when streaming image files (auto: spare cores, max 8)
    threshold_samples: bool = True
    threshold_runs: int = 2
    threshold_percentile: float = 99.0
    cutoff: str = "auto"
    aum_start: int | None = None  # first epoch (0-based) of the AUM window (auto: 1, or 0 for a 1-epoch run)
    aum_end: int | None = None
    el2n_epoch: int | None = None
    spectral_norm: float | None = None  # soft spectral normalisation coefficient (DDU), e.g. 3.0
    forward_correction: bool = True  # class-dependent noise: train on softmax @ T after correction_start (see loop.py)
    correction_start: int | None = None  # first epoch (0-based) of the corrected loss (auto: epochs / 6, at least 3)
    sat: str | None = None  # self-adaptive training: "paper" (Huang et al. 2020) or "incerto"
    sat_warmup: int = 5  # warm-up epochs: plain cross-entropy (paper form), alpha = sat_alpha_start (incerto form)
    sat_momentum: float = 0.9  # paper form: t <- m t + (1 - m) softmax
    sat_alpha_start: float = 0.0  # incerto form: alpha during warm-up, then linear towards end (incerto schedule)
    sat_alpha_end: float = 0.9
    holdout_classes: list[int | str] | None = None  # names or indices (parse_class_list); trained without, OoD
    ood_folder: str | None = None  # another image folder as an OoD set
    corruptions: list[str] | None = None  # noise, blur, invert of the held-out ID images as OoD sets
    eval_fraction: float | None = None  # ID samples held out of training for OoD / calibration (auto: 0.2 if any OoD set)

    def validate(self) -> AuditConfig:
        """Raise ``ConfigError`` on a value that cannot work; returns self."""
        if self.epochs < 1:
            raise ConfigError(f"epochs must be at least 1, got {self.epochs}")
        if self.batch_size < 1:
            raise ConfigError(f"batch size must be at least 1, got {self.batch_size}")
        if not self.lr > 0:
            raise ConfigError(f"learning rate must be positive, got {self.lr}")
        if not 0 <= self.noise < 1:
            raise ConfigError(f"noise must be in [0, 1), got {self.noise}")
        if self.model not in MODELS:
            self._validate_torchvision()
        elif self.weights or self.weights_enum:
            raise ConfigError(f"--weights is for torchvision:NAME models, not {self.model!r}")
        if self.finetune not in ("all", "head"):
            raise ConfigError(f"finetune must be all or head, got {self.finetune!r}")
        if self.finetune == "head" and not self.weights:
            raise ConfigError("finetune head trains only a new head on a pretrained network: give --weights PATH")
        if self.cutoff not in CUTOFFS:
            raise ConfigError(f"cutoff must be one of {', '.join(CUTOFFS)}, got {self.cutoff!r}")
        if self.threshold_runs < 1:
            raise ConfigError(f"threshold runs must be at least 1, got {self.threshold_runs}")
        if not 0 < self.threshold_percentile <= 100:
            raise ConfigError(f"threshold percentile must be in (0, 100], got {self.threshold_percentile}")
        if self.cutoff == "threshold" and not self.threshold_samples:
            raise ConfigError("cutoff 'threshold' needs threshold samples; turn them on or use cutoff 'auto'")
        start = self.aum_first_epoch
        if start < 0 or (self.aum_end is not None and self.aum_end <= start):
            raise ConfigError(f"AUM epoch window {start}..{self.aum_end} is empty")
        if start >= self.epochs:
            raise ConfigError(f"aum start {start} must be below the {self.epochs} epochs (epochs are 0-based); "
                              f"give --aum-start 0..{self.epochs - 1} or train longer")
        if self.correction_start is not None and not 1 <= self.correction_start < self.epochs:
            raise ConfigError(f"correction start {self.correction_start} must be in 1..{self.epochs - 1} (0-based, after "
                              "at least one epoch of plain cross-entropy that estimates the noise); or give "
                              "--no-forward-correction")
        if self.el2n_epoch is not None and not 0 <= self.el2n_epoch < self.epochs:
            raise ConfigError(f"el2n epoch {self.el2n_epoch} must be in 0..{self.epochs - 1} (0-based, below the "
                              f"{self.epochs} epochs)")
        if self.sat is not None and not 0 <= self.sat_warmup < self.epochs:
            raise ConfigError(f"sat warm-up {self.sat_warmup} must be in 0..{self.epochs - 1}: with {self.epochs} "
                              "epochs self-adaptive training would never start; lower --sat-warmup or train longer")
        if self.loader not in LOADERS:
            raise ConfigError(f"loader must be one of {', '.join(LOADERS)}, got {self.loader!r}")
        if self.workers is not None and not 0 <= self.workers <= 64:
            raise ConfigError(f"workers must be in [0, 64], got {self.workers}")
        if self.sat not in (None, "paper", "incerto"):
            raise ConfigError(f"sat must be 'paper' or 'incerto', got {self.sat!r}")
        if self.spectral_norm is not None and not self.spectral_norm > 0:
            raise ConfigError(f"spectral norm coefficient must be positive, got {self.spectral_norm}")
        bad = set(self.corruptions or []) - set(CORRUPTIONS)
        if bad:
            raise ConfigError(f"unknown corruption(s) {sorted(bad)}; choose from {', '.join(CORRUPTIONS)}")
        if self.eval_fraction is not None and not 0 <= self.eval_fraction < 0.9:
            raise ConfigError(f"eval fraction must be in [0, 0.9), got {self.eval_fraction}")
        if self.image_size is not None and not 4 <= self.image_size <= 512:
            raise ConfigError(f"image size must be in [4, 512], got {self.image_size}")
        return self

    def _validate_torchvision(self) -> None:
        """``torchvision:ARCH`` with an optional weights file whose keys fit ARCH (read once, before any run exists)."""
        if not self.model.startswith("torchvision:"):
            raise ConfigError(f"model must be one of {', '.join(MODELS)} or torchvision:NAME, got {self.model!r}")
        from engine.training.models import ModelError, TorchvisionClassifier, check_model_name, weights_enum

        try:
            check_model_name(self.model)
            weights_enum(self.weights_enum)
            if self.weights_enum and not self.weights:
                raise ModelError("--weights-enum names the transforms of a weights file; give the file with --weights "
                                 "PATH (nothing is downloaded)")
            if self.weights:
                TorchvisionClassifier(self.model.split(":", 1)[1], 3, 2, self.weights)
        except ModelError as exc:
            raise ConfigError(str(exc)) from exc

    @property
    def aum_first_epoch(self) -> int:
        """First epoch of the AUM window: ``aum_start`` as given, else 1 (0 for a 1-epoch run)."""
        if self.aum_start is not None:
            return self.aum_start
        return 1 if self.epochs > 1 else 0

    @property
    def correction_epoch(self) -> int | None:
        """First epoch of the forward-corrected loss, or None when there is none: ``forward_correction`` off,
        self-adaptive training on (it replaces the loss), or a run too short to estimate the noise first.
        ``correction_start`` as given, else ``max(3, round(epochs / 6))`` (epoch 5 of 30; at least two estimation
        epochs before it, see ``engine.training.correction``)."""
        if not self.forward_correction or self.sat is not None:
            return None
        start = self.correction_start if self.correction_start is not None else max(3, round(self.epochs / 6))
        return start if start < self.epochs else None

    @property
    def eval_share(self) -> float:
        """Fraction of ID samples held out: as configured, else 0.2 when any OoD set is asked for, else 0."""
        if self.eval_fraction is not None:
            return self.eval_fraction
        return 0.2 if (self.holdout_classes or self.ood_folder or self.corruptions) else 0.0

    @property
    def passes(self) -> int:
        """Training passes: one per disjoint threshold set, or a single pass without threshold samples."""
        return self.threshold_runs if self.threshold_samples else 1

    def n_outputs(self, n_classes: int) -> int:
        """Outputs of the model: one per class, plus the fake class of threshold samples when they are on."""
        return n_classes + 1 if self.threshold_samples else n_classes

    def to_dict(self) -> dict:
        return asdict(self)

    def run_dict(self) -> dict:
        """The config as ``config.json`` stores it: every field, with the automatic AUM and correction starts resolved."""
        corr = self.correction_epoch
        return self.to_dict() | {"aum_start": self.aum_first_epoch,
                                 "correction_start": corr if corr is not None else self.correction_start}

    @classmethod
    def from_run_config(cls, raw: dict) -> AuditConfig:
        """The ``AuditConfig`` of a run's ``config.json`` (run-level keys such as ``dataset_root`` left out)."""
        d = {k: v for k, v in raw.items() if k not in RUN_KEYS}
        d.setdefault("forward_correction", False)  # a run made before the correction existed trained without it
        return cls.from_dict(d)

    @classmethod
    def from_dict(cls, d: dict) -> AuditConfig:
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ConfigError(f"unknown config key(s): {sorted(unknown)}")
        return cls(**d)


def parse_class_list(text: str | list | tuple | None) -> list[int | str] | None:
    """``--holdout-classes`` as typed: ``8,9`` or ``cat,dog`` (class names, or indices; a name wins when a class is
    called ``8``). Resolved against the dataset's classes by ``engine.ood.evaluate.class_indices``."""
    if isinstance(text, list | tuple):  # engine.audit(..., holdout_classes=[8, 9] or ["cat"])
        text = ",".join(str(t) for t in text)
    if not text or not text.strip():
        return None
    return [int(t) if t.isdigit() else t for t in (t.strip() for t in text.split(",")) if t]
