"""difficulty-audit's engine. The public API, importable as ``from engine import ...``:

* ``audit(dataset, **options) -> Run``: an audit with our training loop (``engine.api.audit``);
* ``Recorder``, ``threshold_targets``: record a run from your own PyTorch loop (``engine.capture.recorder``);
* ``import_logits``: a run from per-epoch logits saved by any framework (``engine.capture.logits``);
* ``Run``: a run directory (``scores()``, ``flagged()``, ``export(...)``).

Names are loaded on first use, so ``import engine`` stays light for the dashboard.

The subpackages, one concept each: ``data`` (datasets, images, input pipeline, uploads, data root),
``training`` (config, models, our loop, the audit, retraining), ``capture`` (per-sample dynamics, the
Recorder, imported logits), ``scores`` (the score registry and every score), ``review`` (policy,
decisions, exports, cleaned dataset), ``store`` (run directories, plot-ready views), ``ood`` (DDU
densities, evaluation), ``jobs`` (background jobs, ownership, roles). The dashboard's pages import
``engine.ui`` (the page-facing layer) and nothing else of the engine.
"""

from __future__ import annotations

import importlib

_PUBLIC = {
    "Run": "engine.api",
    "audit": "engine.api",
    "Recorder": "engine.capture.recorder",
    "threshold_targets": "engine.capture.recorder",
    "import_logits": "engine.capture.logits",
}
__all__ = sorted(_PUBLIC)


def __getattr__(name: str):
    if name in _PUBLIC:
        return getattr(importlib.import_module(_PUBLIC[name]), name)
    raise AttributeError(f"module 'engine' has no attribute {name!r}")
