"""Deleting a run: only runs of the runs folder, never one a process owns or trains, atomically; admins only."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

from engine.jobs.access import ADMIN, REVIEWER, may
from engine.jobs.ownership import OWNER_FILE, claim, owner_of, release
from engine.store.runs import TRASH_PREFIX, Run, RunError, _boot_token, create_run, delete_run, list_runs
from engine.training.config import AuditConfig

ROOT = Path(__file__).resolve().parent.parent
APP = str(ROOT / "app.py")


def _ended_run(root: Path, state: str = "failed") -> Run:
    """A run directory as the dashboard leaves one whose dataset could not be read (no training needed)."""
    run = create_run(root, AuditConfig(dataset="digits", epochs=1).run_dict())
    run.update_status(state=state, error="the dataset could not be prepared: test")
    return run


def test_delete_removes_the_run_and_leaves_nothing_behind(tmp_path):
    root = tmp_path / "runs"
    keep, gone = _ended_run(root), _ended_run(root, "done")
    assert delete_run(gone.id, root) == gone.id  # by id, inside the runs folder
    assert not gone.path.exists() and [r.id for r in list_runs(root)] == [keep.id]
    assert sorted(p.name for p in root.iterdir()) == [keep.id]  # no trash folder left
    assert delete_run(keep.path, root) == keep.id  # by path
    assert list(root.iterdir()) == []


def test_a_half_deleted_run_is_never_listed(tmp_path):
    root = tmp_path / "runs"
    run = _ended_run(root)
    os.rename(run.path, root / f"{TRASH_PREFIX}{run.id}-abc")  # what a crash between rename and removal leaves
    assert list_runs(root) == []


def test_delete_refuses_runs_outside_the_runs_folder(tmp_path):
    root, elsewhere = tmp_path / "runs", tmp_path / "elsewhere"
    outside = _ended_run(elsewhere)
    with pytest.raises(RunError, match="not a run of the runs folder"):
        delete_run(outside.path, root)
    root.mkdir()
    (root / "link").symlink_to(outside.path, target_is_directory=True)
    with pytest.raises(RunError, match="not a run of the runs folder"):
        delete_run(root / "link", root)  # a symlink in the runs folder to a run elsewhere
    with pytest.raises(RunError, match="not a run of the runs folder"):
        delete_run(f"../elsewhere/{outside.id}", root)
    (root / "notes").mkdir()
    with pytest.raises(RunError, match="not a run directory"):
        delete_run(root / "notes", root)
    assert outside.path.is_dir() and (root / "notes").is_dir()


def test_delete_refuses_a_run_that_a_process_owns_or_trains(tmp_path):
    root = tmp_path / "runs"
    run = _ended_run(root, "cancelled")
    claim(run, "dashboard resume")  # queued here (the Resume button)
    with pytest.raises(RunError, match=f"owned by process {os.getpid()}"):
        delete_run(run.path, root)
    release(run)
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        time.sleep(0.2)
        owner = {"pid": other.pid, "host": socket.gethostname(), "boot": _boot_token(other.pid)}
        run.update_status(state="running", **owner)  # a CLI --resume training it
        with pytest.raises(RunError, match="is running; cancel it"):
            delete_run(run.path, root)
        run.update_status(state="cancelled")
        (run.path / OWNER_FILE).write_text(json.dumps(owner | {"purpose": "command line audit", "since": time.time()}))
        with pytest.raises(RunError, match=f"owned by process {other.pid}"):
            delete_run(run.path, root)
    finally:
        other.kill()
        other.wait()
    assert run.path.is_dir()
    delete_run(run.path, root)  # its owner is gone: the stale claim is taken over, the run deleted
    assert not run.path.exists() and owner_of(run) is None


def test_cli_delete(tmp_path):
    root = tmp_path / "runs"
    run = _ended_run(root)
    claim(run, "dashboard audit")

    def cli(*args):
        return subprocess.run([sys.executable, "-m", "engine", "delete", *args], cwd=ROOT, capture_output=True,
                              text=True, timeout=120)

    r = cli(run.id, "--out", str(root))
    assert r.returncode == 2 and r.stderr.startswith("error: cannot delete: run") and "Traceback" not in r.stderr
    release(run)
    r = cli(run.id, "--out", str(root))
    assert r.returncode == 0 and r.stdout.strip() == f"deleted run {run.id}" and not run.path.exists()


def test_only_admins_may_delete():
    assert may(ADMIN, "delete audits") and not may(REVIEWER, "delete audits")


def _audit_page(monkeypatch, root: Path, user: dict) -> AppTest:
    monkeypatch.setenv("DIFFICULTY_AUDIT_RUNS", str(root))
    at = AppTest.from_file(APP, default_timeout=60)
    at.user = user
    at.secrets = {"roles": {"admins": ["lead@example.com"], "reviewers": ["@example.com"]}}
    return at.run()


def test_the_audit_page_deletes_a_run_after_confirmation_and_a_reviewer_cannot(monkeypatch, tmp_path):
    root = tmp_path / "runs"
    older = _ended_run(root)
    time.sleep(0.01)
    run = _ended_run(root)
    at = _audit_page(monkeypatch, root, {"is_logged_in": True, "email": "ana@example.com"})  # a reviewer
    assert not at.exception, at.exception
    assert at.checkbox(key=f"delete-sure-{run.id}").disabled and at.button(key=f"delete-{run.id}").disabled
    assert any("only admins delete runs" in c.value for c in at.caption)
    at = _audit_page(monkeypatch, root, {"is_logged_in": True, "email": "lead@example.com"})
    assert at.button(key=f"delete-{run.id}").disabled  # not before the confirmation
    at.checkbox(key=f"delete-sure-{run.id}").check().run()
    at.button(key=f"delete-{run.id}").click().run()
    assert not at.exception, at.exception
    assert not run.path.exists() and [r.id for r in list_runs(root)] == [older.id]
    assert at.selectbox(key="run_picker").value == older.id  # the page moved on to the remaining run
