"""The run store: one directory per audit, the only contract between the engine and the pages.

Layout of ``<runs root>/<run id>/``::

    config.json              the AuditConfig (enough to reproduce the run)
    status.json              state, pass, epochs done, per-epoch metrics, error (rewritten atomically)
    samples.parquet          EVERY sample of the dataset, in dataset order: sample_id, source, label,
                             true_label (-1 unknown), threshold_pass (-1 never), is_threshold, role
    classes.json             class names of the whole dataset, index = label (held-out classes included)
    dynamics/pass<P>/<name>.npy  (epochs, samples) arrays, one row written per finished epoch; one
                             column per samples.parquet row (NaN / -1 for a sample not trained on)
    scores.parquet           sample_id + one column per score, one row per samples.parquet row, in the
                             same order (NaN where a sample was not scored; such a sample is never flagged)
    features.npy             penultimate features of the final model, one row per samples.parquet row
                             (NaN for samples not trained on)
    ood/results.npz          DDU densities / entropies: ``train_*`` one value per samples.parquet row (NaN
                             where not trained on, or a threshold sample of the final model's pass)
    summary.json             n_samples, n_trained, n_flagged, cutoff, ``warnings`` (list of strings: what
                             the engine changed or assumed, e.g. images resized) and, when true labels are
                             known, precision, recall, f1, auroc over the trained samples

``role`` (``ROLES``) says which part of the run a sample belongs to:

- ``train``: trained on with its given label in every pass;
- ``threshold``: a threshold sample (Pleiss et al. 2020) of pass ``threshold_pass`` (relabelled to the
  fake class there), trained with its given label in the other passes;
- ``id_eval``: in-distribution, held out of training (``eval_fraction``) for OoD evaluation and calibration;
- ``ood_holdout``: of a class held out of training (``holdout_classes``): an OoD set;
- ``holdout_label``: given a held-out class as label but not of one (e.g. an injected flip): neither
  trained on nor an OoD sample.

The per-epoch arrays are sized to every sample (not only the trained ones) so that row ``i`` of
``samples.parquet``, column ``i`` of the dynamics, row ``i`` of ``scores.parquet`` and of
``features.npy`` are the same sample for every consumer; the training loop itself works on the
trained samples and ``DynamicsWriter`` scatters its values into their columns (``trained_rows``).

``config.json`` also records ``normalization`` (``mean`` and ``std`` per channel, in [0, 1] units, and
the number of ``images`` measured): computed once when the run is prepared and reused by every image
source of the run and by ``--resume``.
    checkpoints/pass<P>.pt   model + optimizer state after the last finished epoch (resume)

Every file except the per-epoch arrays is written to a temporary name and renamed into place;
an epoch row of the arrays is flushed before ``status.json`` counts it, so a crash loses at
most the epoch in progress.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import socket
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # pandas loads on first use: a CLI command that reads no table does not pay for it
    import pandas as pd

RUNS_ENV = "DIFFICULTY_AUDIT_RUNS"
STATES = ("pending", "running", "done", "failed", "cancelled", "interrupted")
DYNAMICS = {
    "margin": np.float32,
    "margin_yang": np.float32,
    "prob": np.float32,
    "loss": np.float32,
    "el2n": np.float32,
    "pred": np.int16,
    "other": np.int16,
}
ROLES = ("train", "threshold", "id_eval", "ood_holdout", "holdout_label")
TRAINED_ROLES = ("train", "threshold")
_RUN_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


class RunError(ValueError):
    """A run directory is missing, unreadable or not a run; the message says which and why."""


def runs_root(override: str | os.PathLike | None = None) -> Path:
    """The runs folder: ``override``, else ``$DIFFICULTY_AUDIT_RUNS``, else ``./runs``."""
    return Path(override or os.environ.get(RUNS_ENV) or "runs").expanduser()


def _atomic_write(path: Path, write) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file and a rename."""
    _atomic_write(Path(path), lambda fh: fh.write(data))


def atomic_write_json(path: Path, obj) -> None:
    atomic_write_bytes(path, json.dumps(obj, indent=2, default=_json_default).encode())


def atomic_write_parquet(path: Path, df: pd.DataFrame) -> None:
    _atomic_write(Path(path), lambda fh: df.to_parquet(fh, index=False))


def _json_default(o):
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o)}")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class Run:
    """A run directory. Reading never needs the engine's training code or Streamlit."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not (self.path / "config.json").is_file():
            raise RunError(f"{self.path} is not a run directory (no config.json)")

    @property
    def id(self) -> str:
        return self.path.name

    def __repr__(self) -> str:
        return f"Run({str(self.path)!r})"

    # ---- metadata -------------------------------------------------------
    def config(self) -> dict:
        return json.loads((self.path / "config.json").read_text())

    def classes(self) -> list[str]:
        return json.loads((self.path / "classes.json").read_text())

    def raw_status(self) -> dict:
        try:
            return json.loads((self.path / "status.json").read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return {"state": "failed", "error": "status.json missing or unreadable"}

    def status(self) -> dict:
        """The status record, with ``state`` = ``interrupted`` for a run whose process is gone."""
        st = self.raw_status()
        if st.get("state") in ("running", "pending") and st.get("host") == socket.gethostname():
            pid = st.get("pid")
            if pid is not None and (not _pid_alive(int(pid)) or st.get("boot") != _boot_token(int(pid))):
                st["state"] = "interrupted"
        return st

    def update_status(self, **changes) -> dict:
        st = self.raw_status()
        st.update(changes)
        st["updated_at"] = time.time()
        atomic_write_json(self.path / "status.json", st)
        return st

    def summary(self) -> dict | None:
        p = self.path / "summary.json"
        return json.loads(p.read_text()) if p.is_file() else None

    # ---- per-sample tables ---------------------------------------------
    def samples(self, columns: list[str] | None = None) -> pd.DataFrame:
        """One row per sample, in run order; ``columns`` reads only those (a million ids cost memory)."""
        import pandas as pd

        return pd.read_parquet(self.path / "samples.parquet", columns=columns)

    def trained_rows(self) -> np.ndarray:
        """Row positions (in ``samples`` order) of the samples the models trained on (roles ``TRAINED_ROLES``)."""
        return trained_rows(self.samples(["role"] if "role" in self.sample_columns() else ["sample_id"]))

    def sample_columns(self) -> list[str]:
        import pyarrow.parquet as pq

        return pq.read_schema(self.path / "samples.parquet").names

    def scores(self, columns: list[str] | None = None) -> pd.DataFrame | None:
        """The scores table (same row order as ``samples``), or None before the first scoring."""
        import pandas as pd

        p = self.path / "scores.parquet"
        return pd.read_parquet(p, columns=columns) if p.is_file() else None

    # ---- dynamics -------------------------------------------------------
    def dynamics_path(self, pass_idx: int, name: str) -> Path:
        if name not in DYNAMICS:
            raise KeyError(f"unknown dynamics array {name!r}; known: {sorted(DYNAMICS)}")
        return self.path / "dynamics" / f"pass{pass_idx}" / f"{name}.npy"

    def epochs_done(self, pass_idx: int) -> int:
        done = self.raw_status().get("epochs_done") or []
        return int(done[pass_idx]) if pass_idx < len(done) else 0

    def dynamics(self, pass_idx: int, name: str, finished_only: bool = True) -> np.ndarray:
        """The ``(epochs, samples)`` array, memory-mapped read-only; only finished epochs by default."""
        arr = np.load(self.dynamics_path(pass_idx, name), mmap_mode="r")
        return arr[: self.epochs_done(pass_idx)] if finished_only else arr

    def prepared(self) -> bool:
        """Whether the run's dataset has been read (its sample table exists): a run the dashboard queued is not
        until its worker has read the dataset."""
        return (self.path / "samples.parquet").is_file()

    def n_passes(self) -> int:
        return int(self.raw_status().get("passes", 1))


def trained_rows(samples: pd.DataFrame) -> np.ndarray:
    """Positions of the trained samples in a samples table (every row for a run made before roles existed)."""
    if "role" not in samples:
        return np.arange(len(samples))
    return np.flatnonzero(samples["role"].isin(TRAINED_ROLES).to_numpy())


_BOOT_CACHE: dict[int, str | None] = {}


def _boot_token(pid: int) -> str | None:
    """Start time of process ``pid`` (Linux), so a reused pid is not mistaken for the run's owner."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def owner_fields() -> dict:
    """Status fields that identify the live process owning a run."""
    pid = os.getpid()
    return {"pid": pid, "host": socket.gethostname(), "boot": _boot_token(pid)}


def _slug(text: str) -> str:
    base = Path(text.rstrip("/\\")).name if not text.startswith("torchvision:") else text.split(":")[1]
    return re.sub(r"[^A-Za-z0-9]+", "-", base).strip("-").lower()[:40] or "data"


def new_run_id(dataset: str) -> str:
    return f"{time.strftime('%Y%m%d-%H%M%S')}-{_slug(dataset)}-{secrets.token_hex(2)}"


def create_run(root: str | os.PathLike, config: dict, samples: pd.DataFrame | None = None,
               classes: list[str] | None = None) -> Run:
    """Create a new run directory with its config and a ``pending`` status, and its sample table and classes
    when given; without them the run is not prepared yet (``Run.prepared``: the dashboard's worker reads the
    dataset later and calls ``write_prepared``)."""
    root_p = Path(root)
    path = root_p / new_run_id(config.get("dataset", "data"))
    try:
        root_p.mkdir(parents=True, exist_ok=True)
        path.mkdir()
    except OSError as exc:
        raise RunError(f"cannot create a run in {root_p}: {exc.strerror or exc}. Choose a writable runs folder "
                       f"(--out, or ${RUNS_ENV}).") from exc
    if samples is not None:
        atomic_write_json(path / "classes.json", list(classes))
        atomic_write_parquet(path / "samples.parquet", samples)
    atomic_write_json(
        path / "status.json",
        {"state": "pending", "created_at": time.time(), "updated_at": time.time(), **owner_fields()},
    )
    atomic_write_json(path / "config.json", config)  # last: its presence marks a run directory
    return Run(path)


def write_prepared(run: Run, config: dict, samples: pd.DataFrame, classes: list[str]) -> None:
    """Complete a run created without its dataset: classes, the full config, then the sample table (last: its
    presence marks the run as prepared)."""
    atomic_write_json(run.path / "classes.json", list(classes))
    atomic_write_json(run.path / "config.json", config)
    atomic_write_parquet(run.path / "samples.parquet", samples)


def open_run(ref: str | os.PathLike, root: str | os.PathLike | None = None) -> Run:
    """A run by directory path, or by id inside the runs root (an id cannot escape the root)."""
    p = Path(ref)
    if p.is_dir():
        return Run(p)
    ref = str(ref)
    if not _RUN_ID.match(ref):
        raise RunError(f"{ref!r} is neither a run directory nor a valid run id")
    base = runs_root(root).resolve()
    cand = (base / ref).resolve()
    if cand.parent != base or not cand.is_dir():
        raise RunError(f"no run {ref!r} in {base}")
    return Run(cand)


def list_runs(root: str | os.PathLike | None = None) -> list[Run]:
    """Runs in the runs root, newest first; folders that are not runs are skipped."""
    base = runs_root(root)
    if not base.is_dir():
        return []
    runs = []
    for p in base.iterdir():
        if not p.name.startswith(".") and p.is_dir() and (p / "config.json").is_file():  # not a run being deleted
            runs.append(Run(p))
    return sorted(runs, key=lambda r: (r.raw_status().get("created_at", 0), r.id), reverse=True)


TRASH_PREFIX = ".deleting-"


def delete_run(ref: str | os.PathLike | Run, root: str | os.PathLike | None = None) -> str:
    """Delete a run directory of the runs folder ``root`` (default ``runs_root()``) for good; returns its id.

    Refuses (``RunError``, nothing touched) a path that is not a run directly inside the runs folder (no
    symlink, no ``..``), and a run that a live process owns or trains: this process then claims it
    (``owner.json``, as a job would) so that no job can start on it meanwhile. The directory is renamed to a
    hidden ``.deleting-<id>-<token>`` sibling first (one atomic rename: pages and ``list_runs`` stop seeing the
    run at once, and a crash mid-way leaves no half run), then removed.
    """
    import shutil

    from engine.jobs.ownership import RunBusy, claim, release

    base = runs_root(root).resolve()
    given = Path(ref.path if isinstance(ref, Run) else ref)
    path = given if given.is_absolute() or given.exists() else base / given
    if path.is_symlink() or path.resolve().parent != base:
        raise RunError(f"{given} is not a run of the runs folder {base}; only runs inside it can be deleted "
                       "(give the runs folder with --out)")
    run = Run(path.resolve())  # RunError when it is not a run directory
    state = run.status().get("state")
    if state in ("pending", "running"):
        raise RunError(f"run {run.id} is {state}; cancel it (or wait for it to end) before deleting it")
    try:
        claim(run, "deleting the run")
    except RunBusy as exc:
        raise RunError(f"cannot delete: {exc}") from None
    trash = base / f"{TRASH_PREFIX}{run.id}-{secrets.token_hex(3)}"
    try:
        os.rename(run.path, trash)
    except OSError as exc:
        release(run)
        raise RunError(f"cannot delete run {run.id}: {exc.strerror or exc}") from exc
    shutil.rmtree(trash)
    return run.id


class DynamicsWriter:
    """Pre-allocated memory-mapped ``(epochs, samples)`` arrays of one pass, one epoch row at a time."""

    def __init__(self, run: Run, pass_idx: int, epochs: int, n_samples: int, resume: bool = False,
                 columns: np.ndarray | None = None):
        """``n_samples`` columns (every sample of the run); ``columns``: where the trained samples' values go
        (None: the values cover every column)."""
        self.columns = None if columns is None else np.asarray(columns)
        self.arrays: dict[str, np.memmap] = {}
        for name, dtype in DYNAMICS.items():
            path = run.dynamics_path(pass_idx, name)
            path.parent.mkdir(parents=True, exist_ok=True)
            if resume and path.is_file():
                self.arrays[name] = np.load(path, mmap_mode="r+")
            else:
                arr = np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=(epochs, n_samples))
                arr[:] = np.nan if np.issubdtype(dtype, np.floating) else -1
                self.arrays[name] = arr

    def write_epoch(self, epoch: int, values: dict[str, np.ndarray], sync: bool = True) -> None:
        """Write row ``epoch`` of every array and (``sync``) wait until it is on disk."""
        for name, arr in self.arrays.items():
            if self.columns is None:
                arr[epoch] = values[name]
            else:
                arr[epoch, self.columns] = values[name]
        if sync:
            self.sync()

    def sync(self) -> None:
        """Wait until every row written so far is on disk."""
        _sync_files([arr.filename for arr in self.arrays.values()])


_sync_pool: ThreadPoolExecutor | None = None
_sync_pool_lock = threading.Lock()


def _sync_files(paths: list) -> None:
    """``_sync_file`` of every path at once, from a small thread pool: the kernel merges concurrent flushes into
    about one flush of the device (seven dynamics arrays on the development machine's disk: 3-7 ms per epoch
    instead of 24-63 ms one after the other). Returns when all are on disk; raises the first error."""
    global _sync_pool
    with _sync_pool_lock:
        if _sync_pool is None:
            _sync_pool = ThreadPoolExecutor(max_workers=len(DYNAMICS), thread_name_prefix="fdatasync")
    list(_sync_pool.map(_sync_file, paths))


def _forget_sync_pool() -> None:
    """In a forked child the pool's threads do not exist: start a new pool there when one is needed."""
    global _sync_pool, _sync_pool_lock
    _sync_pool, _sync_pool_lock = None, threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_sync_pool)


def _sync_file(path: str | os.PathLike) -> None:
    """``fdatasync`` a file (its size never changes), writing its pages dirtied through a shared memory map too
    (Linux: ``msync(MS_SYNC)`` is an fsync of the range). Unlike ``np.memmap.flush`` (``mmap.flush``, which holds
    the GIL during the msync), it releases the GIL, so a background writer (``Recorder``) does not stop the
    training thread while the disk syncs."""
    fd = os.open(path, os.O_RDWR)
    try:
        getattr(os, "fdatasync", os.fsync)(fd)
    finally:
        os.close(fd)


def resume_command(run: Run, world_size: int) -> str:
    """The command that continues ``run`` with ``world_size`` processes."""
    if world_size > 1:
        return f"torchrun --nproc_per_node {world_size} -m engine audit --resume {run.path}"
    return f"python -m engine audit --resume {run.path}"


def resume_problem(run: Run, world_size: int) -> str | None:
    """Why ``run`` cannot continue in ``world_size`` processes, or ``None`` when it can.

    A run that finished epochs continues with as many processes as it trained with: the batch per
    process, each rank's shard and the effective batch depend on that count, so another count would
    train a different model than the uninterrupted run (and silently change its scores).
    """
    if not run.prepared():
        return (f"run {run.id} stopped before its dataset was read (nothing was trained): start a new audit "
                "(the run's status says why, e.g. a file that could not be read)")
    origin = run.config().get("origin")
    if origin:  # a Recorder in a user's loop, or import-logits: there is no training of ours to continue
        return f"run {run.id} was made by {origin}, not by our training loop: record or import it again"
    st = run.raw_status()
    trained = st.get("world_size")
    if trained is None or trained == world_size or not sum(st.get("epochs_done") or []):
        return None
    how = "under torchrun" if trained > 1 else "in one process"
    return (f"run {run.id} trained {how} with {trained} process(es); continuing it with {world_size} would train a "
            f"different model than the uninterrupted run. Continue with: {resume_command(run, trained)} "
            "(or start a new audit)")
