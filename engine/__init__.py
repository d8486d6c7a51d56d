"""difficulty-audit's engine. The public API, importable as ``from engine import ...``:

* ``audit(dataset, **options) -> Run``: an audit with our training loop (``engine.api``);
* ``Recorder``, ``threshold_targets``: record a run from your own PyTorch loop (``engine.recorder``);
* ``import_logits``: a run from per-epoch logits saved by any framework (``engine.logits``);
* ``Run``: a run directory (``scores()``, ``flagged()``, ``export(...)``).

Names are loaded on first use, so ``import engine`` stays light for the dashboard.
"""

from __future__ import annotations

import importlib

_PUBLIC = {
    "audit": "engine.api",
    "Run": "engine.api",
    "open": "engine.api",
    "Recorder": "engine.recorder",
    "threshold_targets": "engine.recorder",
    "import_logits": "engine.logits",
}
__all__ = sorted(_PUBLIC)


def __getattr__(name: str):
    if name in _PUBLIC:
        return getattr(importlib.import_module(_PUBLIC[name]), name)
    raise AttributeError(f"module 'engine' has no attribute {name!r}")
