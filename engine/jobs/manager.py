"""Background audits for the dashboard: one worker thread, a FIFO queue, cancel by run id.

Audits run one at a time (queued, not concurrent): on a laptop CPU two trainings side by side
would each run at half speed and finish no sooner. The worker never touches Streamlit; pages
read progress from the run directory (``status.json``) and from ``JobManager.progress``.
"""

from __future__ import annotations

import os
import queue
import threading
import time
from dataclasses import dataclass, field

from engine.data.datasets import check_source
from engine.jobs.ownership import RunBusy, claim, release
from engine.store.runs import Run, create_run, owner_fields, resume_problem, runs_root
from engine.training.config import AuditConfig, ConfigError


@dataclass
class Job:
    run: Run
    prepare: bool = False  # a reserved run: the worker reads its dataset first (audit.prepare_reserved)
    resume: bool = False
    kind: str = "audit"  # or "scores" (engine.scores.extra.compute)
    score_args: dict = field(default_factory=dict)
    progress: float = 0.0
    message: str = ""
    cancel: threading.Event = field(default_factory=threading.Event)
    queued_at: float = field(default_factory=time.time)
    started_at: float | None = None
    done: bool = False
    error: str | None = None


class JobManager:
    """Thread-safe registry of audits started from this process."""

    def __init__(self, root: str | os.PathLike | None = None):
        self.root = root
        self._lock = threading.Lock()
        self._jobs: dict[str, Job] = {}
        self._queue: queue.Queue[Job] = queue.Queue()
        self._worker = threading.Thread(target=self._work, name="difficulty-audit-worker", daemon=True)
        self._worker.start()

    def start(self, cfg: AuditConfig, root: str | os.PathLike | None = None) -> Run:
        """Check the config and queue the audit; returns its run at once (``pending``). A bad value raises here.

        The request thread reads no file of the dataset (it only checks that its folder or manifest exists):
        the worker reads its index (file names, image headers), decodes the images and measures the
        normalisation statistics (``audit.prepare_reserved``), then trains. A dataset that cannot be read
        fails the run, its status saying why.
        """
        cfg.validate()  # (the training stack, torch, loads in the worker with the first audit)
        check_source(cfg.dataset)  # a mistyped path is said at once; a stat, the folder is not listed
        run = create_run(runs_root(root if root is not None else self.root), cfg.run_dict())  # not prepared yet
        claim(run, "dashboard audit")
        self._enqueue(Job(run, prepare=True))
        return run

    def _enqueue(self, job: Job, key: str | None = None) -> None:
        with self._lock:
            self._jobs[key or job.run.id] = job
        self._queue.put(job)

    def _refuse_if_busy(self, run: Run) -> None:
        """One job per run at a time (two tabs cannot queue two resumes, nor scores beside training); hold the lock."""
        busy = [j for j in self._jobs.values() if j.run.id == run.id and not j.done]
        if busy:
            what = "computing scores" if busy[0].kind == "scores" else "training"
            raise RunBusy(f"run {run.id} is already queued or {what} in this dashboard; wait for it to end or cancel it")

    def resume(self, run: Run) -> None:
        """Continue an interrupted, cancelled or failed run from its last finished epoch.

        Raises ``ConfigError`` (leaving the run as it is) when the run trained under torchrun with more
        processes than this one (``runs.resume_problem``).
        """
        problem = resume_problem(run, 1)
        if problem:
            raise ConfigError(problem)
        with self._lock:  # check and claim as one step: two tabs clicking Resume at once queue it once
            self._refuse_if_busy(run)
            claim(run, "dashboard resume")
            job = Job(run, resume=True)
            self._jobs[run.id] = job
        run.update_status(state="pending", error=None, **owner_fields())
        self._queue.put(job)

    def start_scores(self, run: Run, names: list[str], **kwargs) -> str:
        """Queue on-demand scores of ``run`` (see engine.scores.extra.compute); returns the job id."""
        job_id = f"{run.id}:scores"
        with self._lock:
            self._refuse_if_busy(run)
            claim(run, "dashboard scores")
            job = Job(run, kind="scores", score_args={"names": list(names), **kwargs})
            self._jobs[job_id] = job
        self._queue.put(job)
        return job_id

    def cancel(self, run_id: str) -> bool:
        """Ask a queued or running job of this process to stop (an audit at its next batch, finished epochs kept;
        scores between steps, the scores table untouched). ``run_id`` may also be a score job's id. False when
        this process has no such job: the run may belong to another process (``engine.jobs.ownership.owner_of``)."""
        with self._lock:
            job = self._jobs.get(run_id)
        if job is None or job.done:
            return False
        job.cancel.set()
        return True

    def job(self, run_id: str) -> Job | None:
        with self._lock:
            return self._jobs.get(run_id)

    def state_of(self, run: Run) -> tuple[str, str]:
        """What to show as ``run``'s state: ``(state, detail)``.

        ``state`` is the run's status (``Run.status``: pending, running, done, failed, cancelled, interrupted),
        except that a job of this process that the worker has started is ``running`` even before its status
        says so. ``detail`` tells a queued job from a started one: ``queued, N job(s) ahead`` for an audit
        still waiting in this process's queue, ``reading the dataset`` while the worker prepares a run, the
        state of a score job queued or running for a finished run, or ``cancelling`` once a cancel was asked;
        empty otherwise (e.g. a run pending in another process).
        """
        status = run.status()
        state, detail = str(status.get("state", "?")), ""
        with self._lock:
            jobs = [j for j in self._jobs.values() if j.run.id == run.id and not j.done]
            waiting = sorted((j for j in self._jobs.values() if not j.done), key=lambda j: j.queued_at)
        job = jobs[0] if jobs else None
        if job is not None and job.cancel.is_set():
            detail = "cancelling"
        elif job is not None and job.kind == "scores":
            detail = "computing scores" if job.started_at is not None else "scores queued"
        elif job is not None and job.started_at is None and state == "pending":
            ahead = sum(1 for j in waiting if j.queued_at < job.queued_at)
            state, detail = "pending", f"queued, {ahead} job(s) ahead" if ahead else "queued, next to start"
        elif job is not None and state == "pending":  # started: the worker reads the dataset of a resume
            state, detail = "running", "reading the dataset"
        elif state == "running" and status.get("phase") == "preparing":
            detail = "reading the dataset"
        return state, detail

    def active(self) -> list[Job]:
        """Queued or running jobs, oldest first."""
        with self._lock:
            return sorted((j for j in self._jobs.values() if not j.done), key=lambda j: j.queued_at)

    def wait(self, run_id: str, timeout: float = 600) -> Job:
        """Block until the job ends (for tests and scripts)."""
        end = time.time() + timeout
        job = self.job(run_id)
        while job is not None and not job.done and time.time() < end:
            time.sleep(0.05)
        return job

    def _work(self) -> None:
        while True:
            job = self._queue.get()
            from engine.training.audit import execute, prepare_reserved
            from engine.training.loop import Cancelled

            try:
                if job.cancel.is_set():  # cancelled while queued
                    if job.kind == "audit":  # a queued score job leaves its (finished) run as it is
                        job.run.update_status(state="cancelled", finished_at=time.time())
                    continue
                job.started_at = time.time()
                if job.kind == "scores":
                    self._run_scores(job)
                    continue
                try:
                    ds = prepare_reserved(job.run) if job.prepare else None  # failures go to the run's status
                    execute(job.run, ds, cancel=job.cancel, resume=job.resume)
                except Cancelled:
                    pass
                except BaseException as exc:  # the run's status.json records it as failed
                    job.error = f"{type(exc).__name__}: {exc}"
            finally:
                release(job.run)
                job.done = True

    @staticmethod
    def _run_scores(job: Job) -> None:
        from engine.scores.extra import compute

        def progress(frac: float, message: str) -> None:
            job.progress, job.message = frac, message

        from engine.training.loop import Cancelled

        try:
            compute(job.run, progress=progress, cancel=job.cancel, **job.score_args)
        except Cancelled:
            job.message = "cancelled; the scores table is unchanged"
        except BaseException as exc:  # shown by the page; the scores table is untouched (atomic write at the end)
            job.error = f"{type(exc).__name__}: {exc}"
