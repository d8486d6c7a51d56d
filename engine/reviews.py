"""Review decisions of a run, in SQLite (WAL) inside the run directory, written as the user clicks.

Every decision is appended to ``history`` with its time and session; the current decision of a
sample is its latest row (last write wins), so nothing a reviewer did is ever overwritten.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Iterable
from pathlib import Path

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
    session TEXT
);
CREATE INDEX IF NOT EXISTS history_sample ON history (sample_id, id);
"""


class ReviewError(ValueError):
    """A decision is malformed (unknown decision, relabel without a class)."""


class ReviewStore:
    """Decisions of one run. Safe to use from several threads and processes at once (one connection per call)."""

    def __init__(self, run_dir: str | Path):
        self.path = Path(run_dir) / DB_NAME
        with self._connect() as con:
            con.executescript(_SCHEMA)

    def _connect(self) -> sqlite3.Connection:
        con = sqlite3.connect(self.path, timeout=30, isolation_level=None)
        con.execute("PRAGMA journal_mode=WAL")
        con.execute("PRAGMA synchronous=NORMAL")
        con.execute("PRAGMA busy_timeout=30000")
        return con

    def record(self, sample_id: str, decision: str, new_label: str | None = None, session: str | None = None) -> None:
        """Save one decision now. ``mislabeled`` needs ``new_label``; ``cleared`` withdraws the current one."""
        self.record_many([(sample_id, decision, new_label)], session)

    def record_many(self, rows: Iterable[tuple[str, str, str | None]], session: str | None = None) -> int:
        """Save several decisions in one transaction; returns how many."""
        now = time.time()
        clean = []
        for sample_id, decision, new_label in rows:
            if decision not in DECISIONS:
                raise ReviewError(f"unknown decision {decision!r}; use one of {', '.join(DECISIONS)}")
            if decision == "mislabeled" and not new_label:
                raise ReviewError(f"relabelling {sample_id!r} needs the new class")
            clean.append((str(sample_id), decision, new_label if decision == "mislabeled" else None, now, session))
        con = self._connect()
        try:
            con.execute("BEGIN IMMEDIATE")
            con.executemany(
                "INSERT INTO history (sample_id, decision, new_label, decided_at, session) VALUES (?, ?, ?, ?, ?)", clean
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
