"""The Python API: ``engine.audit(dataset, **options) -> Run``, as small as the CLI.

``options`` are the options of ``python -m engine audit``, spelled as Python names (``--image-size 32``
is ``image_size=32``, ``--no-threshold-samples`` is ``no_threshold_samples=True``); they go through
the CLI's own parser defaults and ``cli.config_from_args``, the one place that maps options to an
``AuditConfig``, so the API and the CLI cannot drift apart.

>>> import engine, tempfile
>>> tmp = tempfile.mkdtemp()
>>> run = engine.audit("digits", noise=0.1, epochs=2, threshold_runs=1, out=tmp, quiet=True)
>>> run.state
'done'
>>> table = run.scores()                  # every sample, rank 1 = most suspicious
>>> list(table.columns[:4]), len(table)
(['sample_id', 'source', 'label', 'suggested_label'], 1797)
>>> bool(run.flagged()["flagged"].all())
True
>>> run.export(f"{tmp}/flagged.csv") == len(run.flagged())     # the flagged samples, worst first
True
"""

from __future__ import annotations

import os
from pathlib import Path

import pandas as pd

from engine.store import runs as _runs
from engine.training.config import ConfigError


class Run:
    """A finished (or running) run directory, from ``engine.audit``, a ``Recorder`` or ``import-logits``.

    ``Run(path)`` opens an existing run directory. The tables come from ``engine.review.export`` (the
    same as the dashboard's downloads and ``python -m engine export``).
    """

    def __init__(self, path: str | os.PathLike | _runs.Run):
        self.store = path if isinstance(path, _runs.Run) else _runs.open_run(path)

    @property
    def path(self) -> Path:
        return self.store.path

    @property
    def id(self) -> str:
        return self.store.id

    @property
    def state(self) -> str:
        """``done``, ``running``, ``failed``, ``cancelled`` or ``interrupted``."""
        return self.store.status().get("state")

    def summary(self) -> dict | None:
        """``summary.json``: sample and flag counts, cut-off, detection metrics when true labels are known."""
        return self.store.summary()

    def __repr__(self) -> str:
        return f"engine.Run({str(self.path)!r})"

    def __fspath__(self) -> str:
        return str(self.path)

    def scores(self) -> pd.DataFrame:
        """Every sample with its scores, class names, ``rank`` (1 = most suspicious), ``flagged`` and review
        decisions, worst first (``export_frame(run, "all")``)."""
        from engine.review.export import export_frame

        return export_frame(self.store, "all")

    def flagged(self) -> pd.DataFrame:
        """The flagged samples only, worst first (``export_frame(run, "flagged")``)."""
        from engine.review.export import export_frame

        return export_frame(self.store, "flagged")

    def export(self, out: str | os.PathLike, kind: str = "flagged") -> int:
        """Write one export to the CSV ``out`` atomically; returns its row count.

        ``kind``: ``flagged`` (default), ``all``, ``manifest`` (cleaned ``path,label,sample_id``) or ``decisions``.
        """
        from engine.review.export import export_csv

        return export_csv(self.store, out, kind=kind)


def audit(dataset: str, **options) -> Run:
    """Audit ``dataset`` with our training loop, as ``python -m engine audit --dataset DATASET ...`` does.

    ``dataset``: ``digits``, an image folder, a ``path,label`` manifest CSV or ``torchvision:NAME:ROOT``.
    ``options``: the CLI's options as Python names, for example ``noise=0.1, epochs=20,
    model="torchvision:resnet18", weights="r18.pt", finetune="head", image_size=64, out="runs"``;
    ``quiet=False`` shows a progress bar. Returns the finished run; raises ``ConfigError`` (a bad option)
    or ``DatasetError`` before anything trains.
    """
    from tqdm import tqdm

    from engine.cli import _parser, config_from_args
    from engine.training import audit as audit_module

    args = _parser().parse_args(["audit", "--dataset", str(dataset)])
    known = set(vars(args)) - {"command", "dataset", "resume"}
    unknown = sorted(set(options) - known)
    if unknown:
        raise ConfigError(f"unknown option(s) {unknown}; engine.audit takes the options of `python -m engine audit` "
                          f"as Python names: {', '.join(sorted(known))}")
    for k, v in options.items():
        setattr(args, k, v)
    cfg = config_from_args(args)
    run, ds = audit_module.prepare(cfg, args.out or _runs.runs_root())
    bar = tqdm(total=cfg.epochs * cfg.passes, unit="epoch", disable=bool(args.quiet), desc=run.id)
    try:
        audit_module.execute(run, ds, on_epoch=lambda r: bar.update(1))
    finally:
        bar.close()
    return Run(run)
