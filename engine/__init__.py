"""difficulty-audit's engine. The public API, importable as ``from engine import ...``:

* ``audit(dataset, **options) -> Run``: an audit with our training loop (``engine.api.audit``; the
  module ``engine/audit.py`` is callable so that ``engine.audit(...)`` works while the engine keeps
  importing ``prepare`` / ``execute`` / ``finalize`` from it);
* ``Recorder``, ``threshold_targets``: record a run from your own PyTorch loop (``engine.recorder``);
* ``import_logits``: a run from per-epoch logits saved by any framework (``engine.logits``);
* ``Run``: a run directory (``scores()``, ``flagged()``, ``export(...)``).

Names are loaded on first use, so ``import engine`` stays light for the dashboard.
"""

from __future__ import annotations

import importlib

_PUBLIC = {
    "Run": "engine.api",
    "Recorder": "engine.recorder",
    "threshold_targets": "engine.recorder",
    "import_logits": "engine.logits",
}
__all__ = sorted([*_PUBLIC, "audit"])


def __getattr__(name: str):
    if name == "audit":  # the module engine/audit.py, callable as engine.audit(dataset, **options)
        return importlib.import_module("engine.audit")
    if name in _PUBLIC:
        return getattr(importlib.import_module(_PUBLIC[name]), name)
    raise AttributeError(f"module 'engine' has no attribute {name!r}")
