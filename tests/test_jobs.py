"""Jobs under concurrency: decoding in the worker, one job per run, score jobs, run ownership across processes."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

from engine.jobs.manager import JobManager
from engine.jobs.ownership import OWNER_FILE, RunBusy, claim, owner_of, release
from engine.store.runs import Run, resume_problem
from engine.training import audit
from engine.training.config import AuditConfig
from engine.training.loop import Cancelled

ROOT = Path(__file__).resolve().parent.parent
APP = str(ROOT / "app.py")


def _finished_run(root: Path) -> Run:
    run, ds = audit.prepare(AuditConfig(dataset="digits", noise=0.1, epochs=1, threshold_samples=False), root)
    audit.execute(run, ds)
    return run


def _busy_worker(jobs: JobManager, root: Path) -> Run:
    """Keep the single worker busy with a real audit so that the next job stays queued; every test cancels it.
    1000 epochs: on a GPU 30 epochs of the digits end within seconds, before the test has checked the queue
    (``test_cli_resume_refuses_a_run_the_dashboard_has_queued`` failed so on an H100)."""
    return jobs.start(AuditConfig(dataset="digits", noise=0.1, epochs=1000, threshold_samples=False), root)


def _wait_running(run: Run, timeout: float = 60) -> None:
    end = time.time() + timeout
    while run.raw_status().get("state") != "running" and time.time() < end:
        time.sleep(0.05)


def test_start_decodes_in_the_worker_not_the_request(tmp_path):
    """A corrupt image body (valid header) used to raise inside start(), i.e. while the page waited."""
    data = tmp_path / "data"
    shutil.copytree(ROOT / "sample_data" / "digits_folder", data)
    victim = sorted((data / "3").iterdir())[0]
    victim.write_bytes(victim.read_bytes()[: len(victim.read_bytes()) // 2])  # header intact, pixels cut
    jobs = JobManager(tmp_path / "runs")
    run = jobs.start(AuditConfig(dataset=str(data), epochs=1, threshold_samples=False, loader="memory"))
    job = jobs.wait(run.id, timeout=120)
    assert job.done and run.status()["state"] == "failed"
    assert victim.name in run.status()["error"]
    assert not (run.path / OWNER_FILE).exists()  # released when the job ended


def test_two_resumes_of_one_run_queue_once(tmp_path):
    jobs = JobManager(tmp_path)
    busy = _busy_worker(jobs, tmp_path)
    run = _finished_run(tmp_path)
    run.update_status(state="cancelled")
    results: list[object] = []

    def click():
        try:
            jobs.resume(run)
            results.append("queued")
        except RunBusy as exc:
            results.append(exc)

    tabs = [threading.Thread(target=click) for _ in range(2)]
    for t in tabs:
        t.start()
    for t in tabs:
        t.join()
    assert results.count("queued") == 1, results
    (refusal,) = [r for r in results if r != "queued"]
    assert "already queued" in str(refusal) or "owned by" in str(refusal)
    jobs.cancel(busy.id)
    jobs.cancel(run.id)
    jobs.wait(run.id, 120)


def test_cancelling_a_queued_score_job_leaves_the_finished_run_done(tmp_path):
    jobs = JobManager(tmp_path)
    busy = _busy_worker(jobs, tmp_path)
    run = _finished_run(tmp_path)
    before = run.scores()
    job_id = jobs.start_scores(run, ["random"])
    assert jobs.cancel(job_id)  # score jobs can be cancelled
    jobs.cancel(busy.id)
    job = jobs.wait(job_id, 120)
    assert job.done and job.error is None
    assert run.status()["state"] == "done"
    assert list(run.scores().columns) == list(before.columns)  # nothing written
    assert owner_of(run) is None


def test_a_cancelled_score_computation_writes_nothing(tmp_path):
    from engine.scores.extra import compute

    run = _finished_run(tmp_path)
    stop = threading.Event()
    stop.set()
    with pytest.raises(Cancelled):
        compute(run, ["random"], cancel=stop)
    assert "random" not in run.scores().columns


def test_scores_refused_while_the_run_trains_here(tmp_path):
    jobs = JobManager(tmp_path)
    busy = _busy_worker(jobs, tmp_path)
    with pytest.raises(RunBusy, match="already queued or training"):
        jobs.start_scores(busy, ["random"])
    jobs.cancel(busy.id)
    jobs.wait(busy.id, 120)


def test_cli_resume_refuses_a_run_the_dashboard_has_queued(tmp_path):
    jobs = JobManager(tmp_path)
    busy = _busy_worker(jobs, tmp_path)
    run = _finished_run(tmp_path)
    run.update_status(state="interrupted")
    jobs.resume(run)  # queued behind the busy audit, owned by this process
    out = subprocess.run([sys.executable, "-m", "engine", "audit", "--resume", str(run.path), "--quiet"],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2, out.stderr
    assert f"process {os.getpid()}" in out.stderr and "not resuming it twice" in out.stderr
    jobs.cancel(run.id)
    jobs.cancel(busy.id)
    jobs.wait(run.id, 120)


def test_state_of_tells_a_queued_audit_from_a_running_one(tmp_path):
    """The sidebar's state (JobManager.state_of): a job waiting in the queue is pending and says so, the one the
    worker trains is running, a queued resume is pending (not the state the run had before), a cancel is said."""
    jobs = JobManager(tmp_path)
    busy = _busy_worker(jobs, tmp_path)
    queued = jobs.start(AuditConfig(dataset="digits", epochs=1, threshold_samples=False), tmp_path)
    done = _finished_run(tmp_path)
    _wait_running(busy)
    assert jobs.state_of(busy)[0] == "running"
    assert jobs.state_of(queued) == ("pending", "queued, 1 job(s) ahead")
    done.update_status(state="interrupted")
    jobs.resume(done)
    assert jobs.state_of(done) == ("pending", "queued, 2 job(s) ahead")
    assert jobs.state_of(_finished_run(tmp_path)) == ("done", "")  # not a job of this process
    jobs.cancel(queued.id)
    assert jobs.state_of(queued) == ("pending", "cancelling")
    jobs.cancel(done.id)
    jobs.cancel(busy.id)
    for run in (busy, queued, done):
        jobs.wait(run.id, 120)
    assert jobs.state_of(queued) == ("cancelled", "")
    assert jobs.state_of(busy) == ("cancelled", "")


def test_a_claim_of_a_dead_process_is_taken_over_and_a_live_one_is_not(tmp_path):
    run = _finished_run(tmp_path)
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        import json
        import socket

        from engine.store.runs import _boot_token

        time.sleep(0.2)
        rec = {"pid": other.pid, "host": socket.gethostname(), "boot": _boot_token(other.pid), "purpose": "test"}
        (run.path / OWNER_FILE).write_text(json.dumps(rec))
        with pytest.raises(RunBusy, match=f"process {other.pid}"):
            claim(run, "dashboard resume")
    finally:
        other.kill()
        other.wait()
    claim(run, "dashboard resume")  # its owner is gone: stale, taken over
    assert owner_of(run)["pid"] == os.getpid()
    release(run)
    assert owner_of(run) is None


def test_cancel_button_names_the_owner_of_a_run_this_dashboard_does_not_train(tmp_path, monkeypatch):
    import json
    import socket

    from engine.store.runs import _boot_token

    run = _finished_run(tmp_path)
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        time.sleep(0.2)
        owner = {"pid": other.pid, "host": socket.gethostname(), "boot": _boot_token(other.pid)}
        run.update_status(state="running", **owner)
        (run.path / OWNER_FILE).write_text(json.dumps(owner | {"purpose": "command line audit", "since": time.time()}))
        monkeypatch.setenv("DIFFICULTY_AUDIT_RUNS", str(tmp_path))
        at = AppTest.from_file(APP, default_timeout=60).run()
        next(b for b in at.button if b.label == "Cancel").click().run()
        assert not at.exception, at.exception
        assert any(f"belongs to process {other.pid}" in w.value for w in at.warning), [w.value for w in at.warning]
        assert not at.toast or not any("Cancelling" in t.value for t in at.toast)
        assert run.raw_status()["state"] == "running"
    finally:
        other.kill()
        other.wait()


def _small_folder(root: Path, per_class: int = 12) -> Path:
    """Two classes of real digit images (a copy: tests change it)."""
    for c in ("0", "1"):
        (root / c).mkdir(parents=True)
        for f in sorted((ROOT / "sample_data" / "digits_folder" / c).iterdir())[:per_class]:
            shutil.copy(f, root / c / f.name)
    return root


@pytest.mark.slow
def test_start_reads_no_file_of_the_dataset_in_the_request(tmp_path):
    """start() used to list the folder and read every image header in the request thread (an unreadable header
    raised there, while the page waited). Now the request only checks the settings: with the worker busy, a
    folder holding a file that is not an image yet is accepted; the file is fixed and another one added after
    start() returned, and the run the worker prepares has both."""
    data = _small_folder(tmp_path / "data")
    late = data / "0" / "late.png"
    late.write_bytes(b"not an image yet")
    jobs = JobManager(tmp_path / "runs")
    busy = _busy_worker(jobs, tmp_path / "runs")  # the worker takes jobs in order: ours waits behind it
    run = jobs.start(AuditConfig(dataset=str(data), epochs=1, threshold_samples=False))
    assert run.raw_status()["state"] == "pending" and not run.prepared()
    assert not (run.path / "samples.parquet").exists()
    shutil.copy(ROOT / "sample_data" / "digits_folder" / "0" / "digit_0048.png", late)
    shutil.copy(ROOT / "sample_data" / "digits_folder" / "1" / sorted(os.listdir(ROOT / "sample_data" / "digits_folder" / "1"))[-1],
                data / "1" / "added.png")
    jobs.cancel(busy.id)
    job = jobs.wait(run.id, timeout=180)
    assert job.done and job.error is None, job.error
    assert run.status()["state"] == "done"
    ids = set(run.samples()["sample_id"])
    assert {"0/late.png", "1/added.png"} <= ids and len(ids) == 26
    assert run.config()["normalization"]["images"] == 26  # measured by the worker, recorded for --resume


def test_a_dataset_the_worker_cannot_read_fails_the_run_and_the_audit_page_says_why(tmp_path, monkeypatch):
    data = _small_folder(tmp_path / "data")
    (data / "1" / "broken.png").write_bytes(b"\x89PNG but not really")
    jobs = JobManager(tmp_path / "runs")
    run = jobs.start(AuditConfig(dataset=str(data), epochs=1, threshold_samples=False))  # accepted: nothing read
    job = jobs.wait(run.id, timeout=120)
    st = run.status()
    assert job.done and st["state"] == "failed" and not run.prepared()
    assert st["error"].startswith("the dataset could not be prepared: ") and "broken.png" in st["error"]
    assert st.get("traceback") is None  # bad input: the message says what to fix
    assert "start a new audit" in resume_problem(run, 1)
    assert not (run.path / OWNER_FILE).exists()
    monkeypatch.setenv("DIFFICULTY_AUDIT_RUNS", str(tmp_path / "runs"))
    at = AppTest.from_file(APP, default_timeout=60).run()
    assert not at.exception, at.exception
    (err,) = [e.value for e in at.error if "The audit failed" in e.value]
    assert "could not be prepared" in err and "broken.png" in err.replace("\\", "") and "epochs are kept" not in err
    assert not any(b.label.startswith("Resume") for b in at.button)
