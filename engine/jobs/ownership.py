"""Who may write a run: an owner record (``owner.json``) in the run directory, one process at a time.

The dashboard queues and trains runs in its own process; ``python -m engine audit --resume`` and
``torchrun`` train in theirs. Two of them training one run would interleave their epochs in the same
arrays, so whoever queues, trains or scores a run first claims it: ``owner.json`` is created with
``O_CREAT | O_EXCL`` (atomic on local and NFSv3+ file systems) and holds the owner's pid, host,
process start time and purpose. A claim held by a process that no longer runs on this host is stale
and is taken over; a claim from another host is respected (its process cannot be checked from here),
so after a crash on another machine delete ``owner.json`` by hand (the refusal says so).
"""

from __future__ import annotations

import json
import os
import socket
import time

from engine.store.runs import Run, _boot_token, _pid_alive
from engine.training.config import ConfigError

OWNER_FILE = "owner.json"


class RunBusy(ConfigError):
    """Another live process (or this one, for another job) owns the run; the message says who."""


def _me(purpose: str) -> dict:
    pid = os.getpid()
    return {"pid": pid, "host": socket.gethostname(), "boot": _boot_token(pid), "purpose": purpose,
            "since": time.time()}


def _alive(rec: dict) -> bool:
    if rec.get("host") != socket.gethostname():
        return True  # cannot check another machine's processes: assume it still works
    pid = rec.get("pid")
    return pid is not None and _pid_alive(int(pid)) and rec.get("boot") == _boot_token(int(pid))


def owner_of(run: Run) -> dict | None:
    """The live owner record of ``run`` (pid, host, purpose, since), or None when nobody owns it."""
    try:
        rec = json.loads((run.path / OWNER_FILE).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    return rec if _alive(rec) else None


def is_mine(rec: dict | None) -> bool:
    """Whether an owner record is this process."""
    return bool(rec) and rec.get("pid") == os.getpid() and rec.get("host") == socket.gethostname()


def describe(rec: dict) -> str:
    """``process 1234 on host-a (dashboard audit, since 14:02)`` for messages."""
    since = time.strftime("%H:%M", time.localtime(rec.get("since") or 0))
    return f"process {rec.get('pid')} on {rec.get('host')} ({rec.get('purpose', '?')}, since {since})"


def claim(run: Run, purpose: str) -> None:
    """Make this process the owner of ``run``, or raise ``RunBusy`` naming the current owner."""
    path = run.path / OWNER_FILE
    body = json.dumps(_me(purpose)).encode()
    for _ in range(3):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:
                text = path.read_text()
                rec = json.loads(text)
            except FileNotFoundError:
                continue  # released meanwhile: try again
            except json.JSONDecodeError:
                rec, text = {}, None  # being written by its owner right now, or a torn file
                if time.time() - path.stat().st_mtime < 5:
                    time.sleep(0.1)
                    continue
            if rec and _alive(rec):
                raise RunBusy(f"run {run.id} is owned by {describe(rec)}; wait for it to end or cancel it there. "
                              f"If that process is gone (a crash on another machine), delete {path}.") from None
            try:  # stale: remove it only if it is still the record we judged
                if text is None or path.read_text() == text:
                    path.unlink()
            except FileNotFoundError:
                pass
            continue
        with os.fdopen(fd, "wb") as fh:
            fh.write(body)
            fh.flush()
            os.fsync(fh.fileno())
        return
    raise RunBusy(f"run {run.id}: could not claim {path} (another process keeps claiming it)")


def release(run: Run) -> None:
    """Give up ownership of ``run`` (only if this process holds it)."""
    path = run.path / OWNER_FILE
    try:
        rec = json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return
    if is_mine(rec):
        try:
            path.unlink()
        except FileNotFoundError:
            pass
