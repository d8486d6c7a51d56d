"""Review decisions of a run, in SQLite (WAL) inside the run directory, written as the user clicks.

Every decision is appended to ``history`` with its time, session, reviewer name and batch (one id per
call that recorded it: a bulk "apply to all" is one batch); the current decision of a sample is its
latest row (last write wins), so nothing a reviewer did is ever overwritten. Undoing a batch appends
rows too: each sample of the batch that nobody decided since gets back its decision from before it.
"""

from __future__ import annotations

import functools
import json
import sqlite3
import threading
import time
import uuid
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # pandas loads on first use: ``python -m engine export --decisions`` does not need it
    import pandas as pd

DECISIONS = ("mislabeled", "correct", "remove", "unsure", "cleared")
DB_NAME = "reviews.sqlite"
CURRENT_COLUMNS = ("sample_id", "decision", "new_label", "decided_at")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS history (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    sample_id TEXT NOT NULL,
    decision TEXT NOT NULL CHECK (decision IN ('mislabeled', 'correct', 'remove', 'unsure', 'cleared')),
    new_label TEXT,
    decided_at REAL NOT NULL,
    session TEXT,
    reviewer TEXT,
    batch TEXT
);
CREATE INDEX IF NOT EXISTS history_sample ON history (sample_id, id);
"""
# Columns added after the first release: a run reviewed before gets them on first open (NULL in old rows).
_ADDED_COLUMNS = {"reviewer": "TEXT", "batch": "TEXT"}
_INDEXES = "CREATE INDEX IF NOT EXISTS history_batch ON history (batch);"
UNDO_PREFIX = "undo:"


class ReviewError(ValueError):
    """A decision is malformed (unknown decision, relabel without a class)."""


class ReviewStore:
    """Decisions of one run. Safe to use from several threads and processes at once (one connection per call).

    Reading never creates the database (an export of a run nobody reviewed leaves the run directory as it
    was); the first decision does. Decisions are checked against the run's sample ids and class names.
    """

    def __init__(self, run_dir: str | Path, timeout: float = 30.0):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / DB_NAME
        self.timeout = float(timeout)
        self._ready = False

    def _connect(self, create: bool = True) -> sqlite3.Connection:
        """A connection to the database (created with its schema on first use when ``create``), or an
        empty in-memory one with the same schema when it does not exist yet and ``create`` is false."""
        if not create and not self.path.exists():
            con = sqlite3.connect(":memory:", isolation_level=None)
            con.executescript(_SCHEMA)
            return con
        con = sqlite3.connect(self.path, timeout=self.timeout, isolation_level=None)
        try:
            # WAL needs shared memory between the processes, which network file systems do not give.
            con.execute(f"PRAGMA journal_mode={'DELETE' if on_network_fs(self.path) else 'WAL'}")
            con.execute("PRAGMA synchronous=NORMAL")
            con.execute(f"PRAGMA busy_timeout={int(self.timeout * 1000)}")
            if not self._ready:  # the schema once per store object (the database may be new, or older)
                con.executescript(_SCHEMA)
                have = {row[1] for row in con.execute("PRAGMA table_info(history)")}
                for name, kind in _ADDED_COLUMNS.items():
                    if name not in have:
                        con.execute(f"ALTER TABLE history ADD COLUMN {name} {kind}")
                con.executescript(_INDEXES)
                self._ready = True
        except BaseException:
            con.close()
            raise
        return con

    def record(self, sample_id: str, decision: str, new_label: str | None = None, session: str | None = None,
               reviewer: str | None = None, batch: str | None = None) -> None:
        """Save one decision now. ``mislabeled`` needs ``new_label``; ``cleared`` withdraws the current one."""
        self.record_many([(sample_id, decision, new_label)], session, reviewer=reviewer, batch=batch)

    def record_many(self, rows: Iterable[tuple[str, str, str | None]], session: str | None = None,
                    reviewer: str | None = None, batch: str | None = None) -> int:
        """Save several decisions in one transaction, as one batch (``undo(batch)`` withdraws them); returns how many.

        ``batch`` defaults to a fresh id, so each call is one undo step; ``reviewer`` is who decided.
        """
        now = time.time()
        batch = batch or new_batch_id()
        clean = []
        for sample_id, decision, new_label in rows:
            if decision not in DECISIONS:
                raise ReviewError(f"unknown decision {decision!r}; use one of {', '.join(DECISIONS)}")
            if decision == "mislabeled" and not new_label:
                raise ReviewError(f"relabelling {sample_id!r} needs the new class")
            clean.append((str(sample_id), decision, new_label if decision == "mislabeled" else None, now, session,
                          reviewer or None, batch))
        self._check(clean)
        con = self._connect()
        try:
            _begin(con, self.timeout)
            try:
                con.executemany(
                    "INSERT INTO history (sample_id, decision, new_label, decided_at, session, reviewer, batch) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?)", clean
                )
                con.execute("COMMIT")
            except BaseException:
                if con.in_transaction:  # a failing ROLLBACK must not hide the error that caused it
                    con.execute("ROLLBACK")
                raise
        finally:
            con.close()
        return len(clean)

    def _check(self, rows: list[tuple]) -> None:
        """Every sample id must be one of the run's, every new label one of its class names."""
        ids, classes = _run_ids_and_classes(self.run_dir)
        if ids is not None and rows:
            asked = [r[0] for r in rows]
            unknown = [asked[k] for k in np.flatnonzero(ids.get_indexer(asked) < 0)]  # one hashed lookup for a bulk
            if unknown:
                raise ReviewError(f"{len(unknown)} sample id(s) are not samples of this run (e.g. {unknown[0][:80]!r})")
        if classes is not None:
            bad = [r[2] for r in rows if r[2] is not None and r[2] not in classes]
            if bad:
                raise ReviewError(f"new label {str(bad[0])[:80]!r} is not a class of this run; classes: "
                                  f"{', '.join(classes[:20])}{' …' if len(classes) > 20 else ''}")

    def current(self) -> pd.DataFrame:
        """The latest decision of every reviewed sample (cleared ones omitted): sample_id, decision, new_label, decided_at."""
        import pandas as pd

        return pd.DataFrame(self.current_rows(), columns=list(CURRENT_COLUMNS))

    def current_rows(self) -> list[tuple[str, str, str | None, float]]:
        """``current`` as plain tuples (sample_id, decision, new_label, decided_at), by sample id: one consistent
        snapshot (a single query), read without pandas."""
        con = self._connect(create=False)
        try:
            return con.execute(
                "SELECT h.sample_id, h.decision, h.new_label, h.decided_at FROM history h "
                "JOIN (SELECT sample_id, MAX(id) AS id FROM history GROUP BY sample_id) last ON h.id = last.id "
                "WHERE h.decision != 'cleared' ORDER BY h.sample_id"
            ).fetchall()
        finally:
            con.close()

    def history(self) -> pd.DataFrame:
        import pandas as pd

        con = self._connect(create=False)
        try:
            return pd.read_sql_query("SELECT * FROM history ORDER BY id", con)
        finally:
            con.close()

    # ---- undo, reviewers, incremental reads (the Flagged page's keyboard review) ----------------

    def undo(self, batch: str, session: str | None = None, reviewer: str | None = None) -> int:
        """Withdraw one batch: every sample whose latest decision is from ``batch`` gets back the one it had before.

        Appends rows (batch ``undo:<batch>``); a sample someone decided after the batch keeps that later
        decision. A restored decision keeps the name of the reviewer who made it. Returns how many samples changed.
        """
        con = self._connect()
        try:
            _begin(con, self.timeout)
            rows = con.execute(
                "WITH b AS (SELECT h.sample_id, (SELECT MIN(f.id) FROM history f WHERE f.batch = h.batch "
                "             AND f.sample_id = h.sample_id) AS first FROM history h "
                "           WHERE h.batch = ? AND h.id = (SELECT MAX(l.id) FROM history l WHERE l.sample_id = h.sample_id)), "
                "prev AS (SELECT b.sample_id, (SELECT MAX(p.id) FROM history p WHERE p.sample_id = b.sample_id "
                "          AND p.id < b.first) AS pid FROM b) "
                "SELECT prev.sample_id, p.decision, p.new_label, p.reviewer FROM prev LEFT JOIN history p ON p.id = prev.pid",
                (batch,),
            ).fetchall()
            now = time.time()
            con.executemany(
                "INSERT INTO history (sample_id, decision, new_label, decided_at, session, reviewer, batch) "
                "VALUES (?, ?, ?, ?, ?, ?, ?)",
                [(sid, dec or "cleared", lab if dec == "mislabeled" else None, now, session,
                  who if dec and dec != "cleared" else (reviewer or None), UNDO_PREFIX + batch)
                 for sid, dec, lab, who in rows],
            )
            con.execute("COMMIT")
        except BaseException:
            if con.in_transaction:
                con.execute("ROLLBACK")
            raise
        finally:
            con.close()
        return len(rows)

    def last_id(self) -> int:
        """Id of the newest history row (0 when empty): a cheap "has anything changed" stamp."""
        con = self._connect(create=False)
        try:
            return int(con.execute("SELECT COALESCE(MAX(id), 0) FROM history").fetchone()[0])
        finally:
            con.close()

    def changes_since(self, after_id: int) -> pd.DataFrame:
        """History rows newer than ``after_id`` (id, sample_id, decision, new_label), oldest first."""
        import pandas as pd

        con = self._connect(create=False)
        try:
            return pd.read_sql_query("SELECT id, sample_id, decision, new_label FROM history WHERE id > ? ORDER BY id",
                                     con, params=(int(after_id),))
        finally:
            con.close()

    def by_reviewer(self, sample_ids: Sequence[str] | None = None) -> pd.DataFrame:
        """The latest decision of each named reviewer on each sample: sample_id, reviewer, decision, new_label.

        Undo rows and decisions withdrawn by an undo do not count; a reviewer's ``cleared`` counts as no decision.
        """
        import pandas as pd

        query = (
            "SELECT h.sample_id, h.reviewer, h.decision, h.new_label FROM history h JOIN ("
            " SELECT sample_id, reviewer, MAX(id) AS id FROM history r"
            " WHERE reviewer IS NOT NULL AND (batch IS NULL OR batch NOT LIKE 'undo:%')"
            "  AND NOT EXISTS (SELECT 1 FROM history u WHERE u.batch = 'undo:' || r.batch AND u.sample_id = r.sample_id)"
            "  {where} GROUP BY sample_id, reviewer) last ON h.id = last.id"
            " WHERE h.decision != 'cleared' ORDER BY h.sample_id, h.reviewer"
        )
        con = self._connect(create=False)
        try:
            if sample_ids is None:
                return pd.read_sql_query(query.format(where=""), con)
            ids = [str(s) for s in sample_ids]
            parts = [pd.read_sql_query(query.format(where=f"AND sample_id IN ({','.join('?' * len(chunk))})"), con,
                                       params=chunk) for chunk in (ids[k:k + 500] for k in range(0, len(ids), 500))]
        finally:
            con.close()
        return pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(
            columns=["sample_id", "reviewer", "decision", "new_label"])


def new_batch_id() -> str:
    """A fresh id for one decision step (what one undo withdraws)."""
    return uuid.uuid4().hex[:16]


def agreement(by_reviewer: pd.DataFrame) -> pd.DataFrame:
    """Samples decided by two or more reviewers: sample_id, reviewers, agree, detail.

    ``agree`` is True when every reviewer made the same decision (and, for a relabel, chose the same class);
    ``detail`` reads ``alice: remove; bob: mislabeled → 7``.
    """
    import pandas as pd

    df = by_reviewer
    if df.empty:
        return pd.DataFrame(columns=["sample_id", "reviewers", "agree", "detail"])
    verdict = df["decision"] + np.where(df["decision"] == "mislabeled", " → " + df["new_label"].fillna("?"), "")
    df = df.assign(verdict=verdict, line=df["reviewer"] + ": " + verdict)
    g = df.groupby("sample_id", sort=True)
    out = pd.DataFrame({"reviewers": g.size(), "agree": g["verdict"].nunique() == 1, "detail": g["line"].agg("; ".join)})
    return out[out["reviewers"] >= 2].reset_index()


DECISION_CODES = {"mislabeled": 1, "correct": 2, "remove": 3, "unsure": 4}


class DecisionArrays:
    """The current decision of every sample of a run as arrays in run order, kept in step with a ``ReviewStore``.

    ``code[i]`` is 0 (no decision) or ``DECISION_CODES[decision]``; ``new_label[i]`` the class index of a relabel
    (-1 otherwise). ``sync()`` reads only the history rows added since the last call, so a page can check for
    other reviewers' decisions on every rerun at a million samples.
    """

    def __init__(self, store: ReviewStore, sample_ids: Sequence[str] | pd.Index, classes: Sequence[str]):
        import pandas as pd

        self.store = store
        self.index = sample_ids if isinstance(sample_ids, pd.Index) else pd.Index(sample_ids)
        self.classes = {c: k for k, c in enumerate(classes)}
        self.code = np.zeros(len(self.index), dtype=np.int8)
        self.new_label = np.full(len(self.index), -1, dtype=np.int32)
        self.seen = 0
        self._lock = threading.Lock()

    def sync(self) -> int:
        """Apply the store's new history rows; returns the id of the newest row applied."""
        with self._lock:
            new = self.store.changes_since(self.seen)
            if new.empty and self.seen and self.store.last_id() < self.seen:  # the store was replaced: read it all again
                self.code[:] = 0
                self.new_label[:] = -1
                self.seen = 0
                new = self.store.changes_since(0)
            if len(new):
                self.apply(new["sample_id"].to_numpy(), new["decision"].to_numpy(), new["new_label"].to_numpy())
                self.seen = int(new["id"].iat[-1])
            return self.seen

    def apply(self, sample_ids: np.ndarray, decisions: np.ndarray, new_labels: np.ndarray) -> None:
        """Set decisions in order (a later row of the same sample wins); unknown sample ids are skipped."""
        import pandas as pd

        idx = self.index.get_indexer(sample_ids)
        keep = idx >= 0
        # Last write wins: keep only the last row of each sample (numpy does not promise an order for repeats).
        rev = idx[::-1]
        _, first_in_rev = np.unique(rev, return_index=True)
        last = np.zeros(len(idx), dtype=bool)
        last[len(idx) - 1 - first_in_rev] = True
        keep &= last
        idx = idx[keep]
        dec = pd.Series(np.asarray(decisions, dtype=object)[keep])
        lab = pd.Series(np.asarray(new_labels, dtype=object)[keep])
        self.code[idx] = dec.map(DECISION_CODES).fillna(0).to_numpy(dtype=np.int8)
        self.new_label[idx] = np.where(dec == "mislabeled", lab.map(self.classes).fillna(-1), -1).astype(np.int32)


def _begin(con: sqlite3.Connection, timeout: float) -> None:
    """BEGIN IMMEDIATE, or a ``ReviewError`` saying the database stayed busy past ``timeout`` (nothing to roll back)."""
    try:
        con.execute("BEGIN IMMEDIATE")
    except sqlite3.OperationalError as exc:
        raise ReviewError(f"the review database is busy (another writer held it for {timeout:.0f} s); "
                          "the decision was not saved, try again") from exc

_IDS_CACHE: dict[tuple, tuple] = {}
NETWORK_FS = {"nfs", "nfs4", "cifs", "smb3", "smbfs", "9p", "fuse.sshfs", "afs", "ceph", "glusterfs",
              "fuse.glusterfs", "lustre", "gpfs", "beegfs", "fuse.s3fs"}


def _run_ids_and_classes(run_dir: Path) -> tuple[pd.Index | None, list[str] | None]:
    """The run's sample ids (a hashed index, cached per samples.parquet version) and class names; None when absent."""
    import pandas as pd

    samples, classes_p = run_dir / "samples.parquet", run_dir / "classes.json"
    classes = json.loads(classes_p.read_text()) if classes_p.is_file() else None
    if not samples.is_file():
        return None, classes
    st = samples.stat()
    key = (str(samples), st.st_mtime_ns, st.st_size)
    if key not in _IDS_CACHE:
        if len(_IDS_CACHE) >= 2:
            _IDS_CACHE.pop(next(iter(_IDS_CACHE)))
        _IDS_CACHE[key] = (pd.Index(pd.read_parquet(samples, columns=["sample_id"])["sample_id"].astype(str)),)
    return _IDS_CACHE[key][0], None if classes is None else [str(c) for c in classes]


def filesystem_type(path: str | Path, mounts: str | None = None) -> str | None:
    """The file system type of the mount holding ``path`` (longest mount point prefix in ``/proc/mounts``)."""
    if mounts is None:
        try:
            mounts = Path("/proc/mounts").read_text()
        except OSError:
            return None  # not Linux: assume local
    target = Path(path).resolve()
    best, kind = -1, None
    for line in mounts.splitlines():
        parts = line.split()
        if len(parts) < 3:
            continue
        point = Path(parts[1].replace("\\040", " "))
        if (target == point or point in target.parents) and len(str(point)) > best:
            best, kind = len(str(point)), parts[2]
    return kind


def on_network_fs(path: str | Path, mounts: str | None = None) -> bool:
    """Whether ``path`` lies on a network file system, where SQLite's WAL mode is unsafe (``journal_mode=DELETE``)."""
    if mounts is None:
        return _on_network_fs_cached(str(Path(path).parent))
    kind = filesystem_type(path, mounts)
    return kind is not None and kind.lower() in NETWORK_FS


@functools.lru_cache(maxsize=64)
def _on_network_fs_cached(folder: str) -> bool:
    kind = filesystem_type(folder)
    return kind is not None and kind.lower() in NETWORK_FS
