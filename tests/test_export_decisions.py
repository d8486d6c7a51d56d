"""The decisions export that scripts poll every second: a consistent snapshot, written without pandas or torch."""

from __future__ import annotations

import csv
import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd

from engine.review.decisions import decision_rows, decisions_csv_bytes, write_decisions_csv
from engine.review.export import decisions_table, export_bytes, export_frame, to_csv_bytes
from engine.review.reviews import ReviewStore
from engine.store.runs import Run, create_run

ROOT = Path(__file__).resolve().parent.parent
HOSTILE = ["=HYPERLINK(\"http://x\")", "+1", "-2", "@SUM(A1)", "a,b", 'q"uote', "new\nline", "ünï/cödé.png", "plain"]


def _run(tmp_path: Path) -> Run:
    """A run directory with its sample table and classes (what a decisions export reads; no training needed)."""
    n = len(HOSTILE) + 3
    ids = HOSTILE + [f"img-{k}" for k in range(3)]
    samples = pd.DataFrame({"sample_id": ids, "source": [f"src/{s}" for s in ids], "label": np.arange(n) % 3,
                            "true_label": -1, "threshold_pass": -1, "is_threshold": False, "role": "train"})
    return create_run(tmp_path / "runs", {"dataset": "hostile", "epochs": 1}, samples, ["=cls", "b", "c,d"])


def test_decisions_csv_is_what_pandas_writes_with_formulas_neutralised(tmp_path):
    run = _run(tmp_path)
    store = ReviewStore(run.path)
    store.record_many([(s, "remove", None) for s in HOSTILE[:5]])
    store.record_many([(HOSTILE[5], "mislabeled", "c,d"), (HOSTILE[6], "unsure", None), ("img-1", "correct", None)])
    store.record("img-1", "cleared")  # withdrawn: not exported
    rows = decision_rows(run)
    assert [r[0] for r in rows] == HOSTILE[:7]  # run order, decided samples only
    assert rows[5][2:5] == ("c,d", "mislabeled", "c,d") and rows[0][2] == "=cls"
    table = decisions_table(run)
    assert list(table.columns) == ["sample_id", "source", "label", "decision", "new_label", "decided_at"]
    body = decisions_csv_bytes(rows)
    assert body == to_csv_bytes(table)  # byte for byte what the pandas exports write
    assert body == export_bytes(run, "decisions")
    parsed = list(csv.DictReader(io.StringIO(body.decode())))
    assert [r["sample_id"] for r in parsed] == ["'" + s if s[0] in "=+-@" else s for s in HOSTILE[:7]]
    assert parsed[0]["label"] == "'=cls" and parsed[6]["sample_id"] == "new\nline"
    assert export_frame(run, "decisions").equals(table)


def test_cli_decisions_export_loads_neither_pandas_nor_torch(tmp_path):
    run = _run(tmp_path)
    ReviewStore(run.path).record("plain", "remove")
    out = tmp_path / "d.csv"
    code = ("import sys; from engine.cli import main; rc = main(['export', sys.argv[1], '--out', sys.argv[2], "
            "'--decisions']); print(sorted(m for m in ('pandas', 'torch') if m in sys.modules)); sys.exit(rc)")
    r = subprocess.run([sys.executable, "-c", code, str(run.path), str(out)], cwd=ROOT, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().splitlines()[-1] == "[]", r.stdout  # neither was imported
    assert out.read_text().splitlines()[1].startswith("plain,src/plain,\"c,d\",remove,,")
    meta = json.loads(Path(f"{out}.json").read_text())
    assert meta["kind"] == "decisions" and meta["rows"] == 1 and set(meta["columns"]) == {
        "sample_id", "source", "label", "decision", "new_label", "decided_at"}


def test_write_decisions_csv_replaces_the_file_atomically(tmp_path):
    run = _run(tmp_path)
    out = tmp_path / "d.csv"
    out.write_text("old")
    assert write_decisions_csv(run, out) == 0
    assert out.read_text() == "sample_id,source,label,decision,new_label,decided_at\n"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".d.csv")]  # no temporary file left behind
