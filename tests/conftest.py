"""Shared fixtures: real audits of real data, produced by the engine once per test session."""

from __future__ import annotations

import pytest

from engine import audit
from engine.config import AuditConfig


@pytest.fixture(autouse=True)
def _isolated_runs_root(tmp_path, monkeypatch):
    """No test writes into the developer's ./runs."""
    monkeypatch.setenv("DIFFICULTY_AUDIT_RUNS", str(tmp_path / "runs"))


@pytest.fixture(scope="session")
def digits_run(tmp_path_factory):
    """The documented headless audit: digits, 20% symmetric noise, 30 epochs, default settings."""
    cfg = AuditConfig(dataset="digits", noise=0.2, epochs=30)
    run, ds = audit.prepare(cfg, tmp_path_factory.mktemp("runs"))
    audit.execute(run, ds)
    return run


@pytest.fixture(scope="session")
def small_run(tmp_path_factory):
    """A short audit (6 epochs, 10% noise) for tests that need a finished run but not its quality."""
    cfg = AuditConfig(dataset="digits", noise=0.1, epochs=6, seed=3)
    run, ds = audit.prepare(cfg, tmp_path_factory.mktemp("runs"))
    audit.execute(run, ds)
    return run


@pytest.fixture
def own_small_run(small_run, tmp_path):
    """A copy of ``small_run`` in this test's runs root, for tests that write into a run (scores, decisions)."""
    import shutil

    from engine.runs import Run

    return Run(shutil.copytree(small_run.path, tmp_path / "runs" / small_run.id))
