"""The review decisions of a run as rows and as CSV, read and written without pandas.

``python -m engine export RUN --decisions`` is what a team's scripts poll (every second, beside the
reviewers' browser sessions, in ``bench/load_test.py``): it reads one SQLite snapshot of the current
decisions, joins the decided samples' source and given label from ``samples.parquet`` (pyarrow) and writes
the CSV with the standard library, so that it never pays for importing pandas. Every other consumer (the
Flagged page's download, ``export_frame(run, "decisions")``) goes through the same rows.
"""

from __future__ import annotations

import csv
import io
import os
import time
from pathlib import Path

from engine.review.reviews import ReviewStore
from engine.store.runs import Run, atomic_write_bytes, atomic_write_json

# Column -> meaning (the export's companion ``<csv>.json`` says these).
COLUMNS = {
    "sample_id": "the sample's id (file path relative to the dataset root, or name-index for array data)",
    "source": "where the image is: path relative to the dataset root, or name[index] for array datasets",
    "label": "given label (class name)",
    "decision": "review decision: mislabeled (relabel) | correct | remove | unsure",
    "new_label": "the class a mislabeled decision relabels to",
    "decided_at": "when the decision was recorded (UTC)",
}
FORMULA_PREFIXES = ("=", "+", "-", "@", "\t", "\r")


def decision_rows(run: Run) -> list[tuple]:
    """The current decision of every decided sample of ``run``, in run (``samples.parquet``) order: tuples of
    ``COLUMNS`` (``new_label`` None unless relabelled; ``decided_at`` as ``YYYY-MM-DDTHH:MM:SSZ``). Decisions of
    ids the run does not have are left out."""
    current = {r[0]: r for r in ReviewStore(run.path).current_rows()}  # one snapshot of the store
    if not current:
        return []
    import pyarrow.parquet as pq  # (ParquetFile, not read_table: that one loads pandas)

    table = pq.ParquetFile(run.path / "samples.parquet").read(columns=["sample_id", "source", "label"])
    ids = table.column("sample_id").to_pylist()
    at = [k for k, sid in enumerate(ids) if sid in current]
    if not at:
        return []
    sources, labels = table.column("source").to_pylist(), table.column("label").to_pylist()
    classes = run.classes()
    rows = []
    for k in at:
        _, decision, new_label, decided_at = current[ids[k]]
        label = classes[labels[k]] if 0 <= labels[k] < len(classes) else ""
        rows.append((ids[k], sources[k], label, decision, new_label,
                     time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(decided_at))))
    return rows


def neutral(cell):
    """A text cell starting with = + - @ (or tab/CR) gets a leading quote, so spreadsheets do not run it as a
    formula (the rule of ``export.neutralize_formulas``, for one cell); anything else is returned as is."""
    return "'" + cell if isinstance(cell, str) and cell.startswith(FORMULA_PREFIXES) else cell


def decisions_csv_bytes(rows: list[tuple]) -> bytes:
    """The decisions CSV (header ``COLUMNS``), formula-looking cells neutralised, as pandas' ``to_csv`` writes it."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(COLUMNS)
    w.writerows([tuple(neutral(c) for c in row) for row in rows])
    return buf.getvalue().encode("utf-8")


def write_decisions_csv(run: Run, out: str | os.PathLike) -> int:
    """Write the decisions export to ``out`` and its column description to ``<out>.json``, atomically (a reader
    sees the previous file or the new one, never a part); returns the row count."""
    rows = decision_rows(run)
    atomic_write_bytes(Path(out), decisions_csv_bytes(rows))
    atomic_write_json(Path(f"{os.fspath(out)}.json"), {
        "run": run.id, "kind": "decisions", "rows": len(rows), "policy": None,
        "columns": {c: {"meaning": m} for c, m in COLUMNS.items()}})
    return len(rows)
