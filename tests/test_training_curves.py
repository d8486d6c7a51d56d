"""Training loss and accuracy per epoch (engine.store.views.training_curves): from the status history, or read back
from the dynamics arrays when the history is missing."""

from __future__ import annotations

import json

import numpy as np
import pytest

from engine.store.runs import Run
from engine.store.views import training_curves
from engine.training import audit
from engine.training.config import AuditConfig


@pytest.fixture(scope="module")
def plain_run(tmp_path_factory) -> Run:
    """Digits, 2 epochs, no threshold samples: every sample trains on its given label, so the loop's history and
    the arrays describe the same samples."""
    import torch

    torch.set_num_threads(1)
    run, ds = audit.prepare(AuditConfig(dataset="digits", noise=0.1, epochs=2, threshold_samples=False, seed=1),
                            tmp_path_factory.mktemp("runs"))
    audit.execute(run, ds)
    return run


def test_curves_are_the_recorded_history(plain_run):
    curves = training_curves(plain_run)
    hist = plain_run.raw_status()["history"]
    assert list(curves["epoch"]) == [0, 1] and set(curves["source"]) == {"history"}
    assert np.allclose(curves["loss"], [h["loss"] for h in hist])
    assert np.allclose(curves["accuracy"], [h["accuracy"] for h in hist])
    assert curves["loss"].iat[1] < curves["loss"].iat[0]  # it learns


def test_without_history_the_arrays_give_the_same_curves(plain_run, tmp_path):
    import shutil

    run = Run(shutil.copytree(plain_run.path, tmp_path / plain_run.id))
    status = run.raw_status()
    recorded = status.pop("history")
    (run.path / "status.json").write_text(json.dumps(status))
    curves = training_curves(run)
    assert set(curves["source"]) == {"dynamics"} and list(curves["epoch"]) == [0, 1]
    assert np.allclose(curves["loss"], [h["loss"] for h in recorded], rtol=1e-5)
    assert np.allclose(curves["accuracy"], [h["accuracy"] for h in recorded])
    # a subset of the samples: close to, not equal to, the whole epoch's values
    sub = training_curves(run, max_samples=500)
    assert np.allclose(sub["loss"], curves["loss"], rtol=0.25) and not np.allclose(sub["loss"], curves["loss"])


def test_no_finished_epoch_no_curves(plain_run, tmp_path):
    import shutil

    run = Run(shutil.copytree(plain_run.path, tmp_path / plain_run.id))
    run.update_status(epochs_done=[0], history=[])
    assert training_curves(run).empty
