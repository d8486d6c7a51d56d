"""Review decisions of a run, in SQLite (WAL) inside the run directory, written as the user clicks.

Every decision is appended to ``history`` with its time, session, reviewer name and batch (one id per
call that recorded it: a bulk "apply to all" is one batch); the current decision of a sample is its
latest row (last write wins), so nothing a reviewer did is ever overwritten. Undoing a batch appends
rows too: each sample of the batch that nobody decided since gets back its decision from before it.
"""

from __future__ import annotations

import sqlite3
import threading
import time
import uuid
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

DECISIONS = ("mislabeled", "correct", "remove", "unsure", "cleared")
DB_NAME = "reviews.sqlite"

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
    """Decisions of one run. Safe to use from several threads and processes at once (one connection per call)."""

    def __init__(self, run_dir: str | Path):
        self.path = Path(run_dir) / DB_NAME
        with self._connect() as con:
            con.executescript(_SCHEMA)
            have = {row[1] for row in con.execute("PRAGMA table_info(history)")}
            for name, kind in _ADDED_COLUMNS.items():
                if name not in have:
                    con.execute(f"ALTER TABLE history ADD COLUMN {name} {kind}")
            con.executescript(_INDEXES)

    def _connect(self) -> sqlite3.Connection:
        con = sqlite3.connect(self.path, timeout=30, isolation_level=None)
        con.execute("PRAGMA journal_mode=WAL")
        con.execute("PRAGMA synchronous=NORMAL")
        con.execute("PRAGMA busy_timeout=30000")
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
        con = self._connect()
        try:
            con.execute("BEGIN IMMEDIATE")
            con.executemany(
                "INSERT INTO history (sample_id, decision, new_label, decided_at, session, reviewer, batch) "
                "VALUES (?, ?, ?, ?, ?, ?, ?)", clean
            )
            con.execute("COMMIT")
        except BaseException:
            con.execute("ROLLBACK")
            raise
        finally:
            con.close()
        return len(clean)

    def current(self) -> pd.DataFrame:
        """The latest decision of every reviewed sample (cleared ones omitted): sample_id, decision, new_label, decided_at."""
        con = self._connect()
        try:
            df = pd.read_sql_query(
                "SELECT h.sample_id, h.decision, h.new_label, h.decided_at FROM history h "
                "JOIN (SELECT sample_id, MAX(id) AS id FROM history GROUP BY sample_id) last ON h.id = last.id "
                "WHERE h.decision != 'cleared' ORDER BY h.sample_id",
                con,
            )
        finally:
            con.close()
        return df

    def history(self) -> pd.DataFrame:
        con = self._connect()
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
            con.execute("BEGIN IMMEDIATE")
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
            con.execute("ROLLBACK")
            raise
        finally:
            con.close()
        return len(rows)

    def last_id(self) -> int:
        """Id of the newest history row (0 when empty): a cheap "has anything changed" stamp."""
        con = self._connect()
        try:
            return int(con.execute("SELECT COALESCE(MAX(id), 0) FROM history").fetchone()[0])
        finally:
            con.close()

    def changes_since(self, after_id: int) -> pd.DataFrame:
        """History rows newer than ``after_id`` (id, sample_id, decision, new_label), oldest first."""
        con = self._connect()
        try:
            return pd.read_sql_query("SELECT id, sample_id, decision, new_label FROM history WHERE id > ? ORDER BY id",
                                     con, params=(int(after_id),))
        finally:
            con.close()

    def by_reviewer(self, sample_ids: Sequence[str] | None = None) -> pd.DataFrame:
        """The latest decision of each named reviewer on each sample: sample_id, reviewer, decision, new_label.

        Undo rows and decisions withdrawn by an undo do not count; a reviewer's ``cleared`` counts as no decision.
        """
        query = (
            "SELECT h.sample_id, h.reviewer, h.decision, h.new_label FROM history h JOIN ("
            " SELECT sample_id, reviewer, MAX(id) AS id FROM history r"
            " WHERE reviewer IS NOT NULL AND (batch IS NULL OR batch NOT LIKE 'undo:%')"
            "  AND NOT EXISTS (SELECT 1 FROM history u WHERE u.batch = 'undo:' || r.batch AND u.sample_id = r.sample_id)"
            "  {where} GROUP BY sample_id, reviewer) last ON h.id = last.id"
            " WHERE h.decision != 'cleared' ORDER BY h.sample_id, h.reviewer"
        )
        con = self._connect()
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
