"""Shared fixtures: real audits of real data, produced by the engine once per test session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from engine.training import audit
from engine.training.config import AuditConfig

# Tests that read a run trained for them are slow (``make test-fast`` leaves them out, ``make test`` runs them).
TRAINED_RUN_FIXTURES = {"digits_run", "small_run", "own_small_run", "held_out_run"}


def pytest_collection_modifyitems(config, items):
    for item in items:
        if TRAINED_RUN_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)


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


def copy_run(run, root: Path):
    """A copy of a finished run in the runs folder ``root`` (same id), for a test that writes into a run (decisions,
    policy, scores): the shared session runs must stay as the engine made them (``_shared_runs_stay_unchanged``)."""
    import shutil

    from engine.store.runs import Run

    return Run(shutil.copytree(run.path, Path(root) / run.id))


@pytest.fixture
def own_small_run(small_run, tmp_path):
    """A copy of ``small_run`` in this test's runs root, for tests that write into a run (scores, decisions)."""
    return copy_run(small_run, tmp_path / "runs")


SHARED_RUNS = ("small_run", "digits_run", "held_out_run")  # trained once, read by many tests


def _files(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*") if p.is_file()}


@pytest.fixture(autouse=True)
def _shared_runs_stay_unchanged(request):
    """Fail a test that writes into a shared run (a decision, a policy, a score, a new file): the tests after it
    would pass or fail by the order they run in. Such a test works on ``own_small_run`` or ``copy_run``."""
    runs = [request.getfixturevalue(name) for name in SHARED_RUNS if name in request.fixturenames]
    before = [_files(r.path) for r in runs]
    yield
    for run, was in zip(runs, before, strict=True):
        now = _files(run.path)
        changed = sorted(k for k in set(was) | set(now) if was.get(k) != now.get(k))
        assert not changed, f"the test changed the shared run {run.id}: {changed}; write into a copy (copy_run)"


CHROMIUM_ENV = "DIFFICULTY_AUDIT_CHROMIUM"  # the browser the end-to-end tests drive (default: Debian's)


@pytest.fixture(scope="session")
def chromium() -> str:
    """The browser for the end-to-end tests (``chromium_path``)."""
    return chromium_path()


def chromium_path() -> str:
    """Path of the Chromium for browser tests: ``$DIFFICULTY_AUDIT_CHROMIUM``, else /usr/bin/chromium.

    Missing, the test is skipped on a developer's machine but FAILS when ``CI`` is set (a CI without the
    browser must not pass by skipping every end-to-end test).
    """
    path = os.environ.get(CHROMIUM_ENV) or "/usr/bin/chromium"
    if not Path(path).is_file():
        msg = f"no Chromium at {path}: set ${CHROMIUM_ENV} or install Debian's (make chromium, as root)"
        if os.environ.get("CI"):
            pytest.fail(f"{msg}; CI is set, so a missing browser fails the browser tests")
        pytest.skip(msg)
    return path
