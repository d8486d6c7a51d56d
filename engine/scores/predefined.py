"""Predefined scores: a CSV the user computed elsewhere, validated whole before anything is imported.

A file is read as text only (never unpickled or evaluated), capped in size, its encoding and
delimiter detected; the chosen id column must be unique and the chosen score columns finite
numbers. Scores are joined to a run **by sample_id**, never by row position (a file without an
id column is accepted only when its row count equals the run's, and the caller must warn).
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

MAX_BYTES = 100 * 1024 * 1024
ID_CANDIDATES = ("sample_id", "id", "sample", "path", "file", "filename", "image")
LABEL_CANDIDATES = ("label", "class", "given_label", "target")
DELIMITERS = [",", ";", "\t", "|"]


class PredefinedError(ValueError):
    """The file cannot be imported; the message says what is wrong, where, and how to fix it."""


@dataclass
class ParsedCSV:
    frame: pd.DataFrame  # every cell as text
    delimiter: str
    encoding: str


def _rows(idx: np.ndarray, limit: int = 8) -> str:
    """File row numbers (header = row 1) of the first offending rows."""
    rows = [str(int(i) + 2) for i in idx[:limit]]
    return ", ".join(rows) + (f" and {len(idx) - limit} more" if len(idx) > limit else "")


def parse_csv(data: bytes, max_bytes: int = MAX_BYTES) -> ParsedCSV:
    """Read CSV bytes as text into a frame of strings; detect UTF-8 / UTF-16 / Latin-1 and , ; tab | delimiters."""
    if len(data) > max_bytes:
        raise PredefinedError(f"the file is {len(data) / 1e6:.1f} MB; the limit is {max_bytes / 1e6:.0f} MB. "
                              "Keep only the id and score columns, or split the file.")
    if not data.strip():
        raise PredefinedError("the file is empty; it needs a header row (e.g. sample_id,my_score) and one row per sample.")
    if data[:2] in (b"\xff\xfe", b"\xfe\xff"):
        encoding = "utf-16"
    else:
        encoding = "utf-8-sig"
    try:
        text = data.decode(encoding)
    except UnicodeDecodeError:
        try:
            text = data.decode("cp1252")
            encoding = "cp1252"
        except UnicodeDecodeError as exc:
            raise PredefinedError(f"the file is not text in UTF-8, UTF-16 or Windows-1252 (undecodable byte at offset "
                                  f"{exc.start}); save it as UTF-8 CSV.") from exc
    if "\x00" in text:
        raise PredefinedError("the file holds NUL bytes: it is binary, not a CSV. Export your scores as CSV text.")
    first = text.splitlines()[0] if text.splitlines() else ""
    counts = {d: first.count(d) for d in DELIMITERS}
    delimiter = max(counts, key=counts.get)
    if counts[delimiter] == 0:
        raise PredefinedError(
            "the first line has no delimiter (, ; tab or |): the file needs a header with at least "
            "an id column and a score column, e.g. sample_id,my_score."
        )
    csv.field_size_limit(max(max_bytes, 1 << 20))
    header = [h.strip() for h in next(csv.reader([first], delimiter=delimiter))]
    if len(set(header)) != len(header):
        dupes = [k + 1 for k, h in enumerate(header) if header.index(h) != k]
        raise PredefinedError(f"the header repeats a column name (column(s) {dupes}); give every column its own name.")
    try:
        df = pd.read_csv(io.StringIO(text), sep=delimiter, dtype=str, keep_default_na=False, engine="python",
                         skipinitialspace=True)
    except (pd.errors.ParserError, csv.Error, ValueError) as exc:
        raise PredefinedError(f"cannot parse the file as {delimiter!r}-separated CSV ({type(exc).__name__}"
                              f"{_line_of(exc)}); every row needs as many fields as the header.") from exc
    df.columns = [str(c).strip() for c in df.columns]
    if len(df.columns) < 2:
        raise PredefinedError("the file has a single column; it needs an id column and at least one score column.")
    if any(c == "" or c.startswith("Unnamed:") for c in df.columns):
        empty = [k + 1 for k, c in enumerate(df.columns) if c == "" or c.startswith("Unnamed:")]
        raise PredefinedError(f"the header has an empty column name (column(s) {empty}); is the first row a header?")
    if len(df) == 0:
        raise PredefinedError("the file has a header but no rows.")
    if all(_is_number(c) for c in df.columns):
        raise PredefinedError("the first row holds only numbers: it looks like data, not a header; add a header row.")
    return ParsedCSV(df, delimiter, encoding)


def _short(name: str, limit: int = 40) -> str:
    """A column name as a message may quote it: the chosen name, cut to ``limit`` characters."""
    name = str(name)
    return name if len(name) <= limit else name[: limit - 1] + "…"


def _line_of(exc: Exception) -> str:
    """``, line N`` when a parser error says which line (its text is never quoted: it may hold file content)."""
    import re

    m = re.search(r"line (\d+)", str(exc))
    return f", line {m.group(1)}" if m else ""


def _is_number(s: str) -> bool:
    try:
        float(s)
        return True
    except ValueError:
        return False


def guess_columns(df: pd.DataFrame) -> tuple[str | None, str | None, list[str]]:
    """Best guesses for (id column, label column, numeric score columns)."""
    lower = {c.lower(): c for c in df.columns}
    id_col = next((lower[c] for c in ID_CANDIDATES if c in lower), None)
    label_col = next((lower[c] for c in LABEL_CANDIDATES if c in lower), None)
    numeric = []
    for c in df.columns:
        if c in (id_col, label_col):
            continue
        vals = pd.to_numeric(df[c].str.strip(), errors="coerce")
        if vals.notna().mean() >= 0.5:  # mostly numbers: offered as a score, its bad cells reported by validate()
            numeric.append(c)
    return id_col, label_col, numeric


def validate(df: pd.DataFrame, id_col: str | None, score_cols: list[str], higher_is_harder: dict[str, bool] | None = None,
             ) -> pd.DataFrame:
    """A frame ``sample_id`` + one float column per score, values as in the file; or ``PredefinedError``.

    ``higher_is_harder[c]`` says which end of column ``c`` is suspicious (default: high); it is kept in
    ``out.attrs["suspicious"]`` ("high" / "low" per column), never applied to the values.
    ``id_col=None`` keeps row order (the caller joins by position only when the row counts match).
    """
    if not score_cols:
        raise PredefinedError("choose at least one score column.")
    missing = [c for c in ([id_col] if id_col else []) + score_cols if c not in df.columns]
    if missing:
        raise PredefinedError(f"column(s) {[_short(c) for c in missing]} not in the file ({len(df.columns)} columns).")
    out = pd.DataFrame()
    suspicious: dict[str, str] = {}
    if id_col is not None:
        ids = df[id_col].str.strip()
        empty = np.flatnonzero((ids == "").to_numpy())
        if empty.size:
            raise PredefinedError(f"{empty.size} row(s) have an empty {id_col!r}: rows {_rows(empty)}.")
        dup = ids.duplicated(keep=False).to_numpy()
        if dup.any():
            raise PredefinedError(f"{int(ids.duplicated().sum())} duplicated id(s) in {_short(id_col)!r} "
                                  f"(rows {_rows(np.flatnonzero(dup))}); each sample must appear once.")
        out["sample_id"] = ids.to_numpy()
    for c in score_cols:
        raw = df[c].str.strip()
        vals = pd.to_numeric(raw, errors="coerce").to_numpy(dtype=np.float64)
        bad_text = np.flatnonzero(np.isnan(vals) & ~raw.str.lower().isin(["nan", "", "inf", "-inf"]).to_numpy())
        if bad_text.size:
            raise PredefinedError(f"column {_short(c)!r}: {bad_text.size} value(s) are not numbers (rows {_rows(bad_text)}); "
                                  "a score column holds numbers only.")
        nonfinite = np.flatnonzero(~np.isfinite(vals))
        if nonfinite.size:
            raise PredefinedError(f"column {_short(c)!r}: {nonfinite.size} value(s) are empty, NaN or infinite "
                                  f"(rows {_rows(nonfinite)}); fill or drop those rows.")
        harder = True if higher_is_harder is None else higher_is_harder.get(c, True)
        out[c] = vals
        suspicious[c] = "high" if harder else "low"
    out.attrs["suspicious"] = suspicious
    return out


@dataclass
class Joined:
    values: pd.DataFrame  # one row per run sample (run order), NaN where the file has no value
    n_matched: int
    n_unknown: int  # ids in the file that the run does not have
    unknown_examples: list[str]
    by_position: bool
    suspicious: dict[str, str] = field(default_factory=dict)  # "high" / "low" = suspicious, per column


def join_to_run(scores: pd.DataFrame, run_ids: np.ndarray) -> Joined:
    """Align validated scores to the run's samples by sample_id (or by position when the file has no id column)."""
    cols = [c for c in scores.columns if c != "sample_id"]
    if "sample_id" not in scores.columns:
        if len(scores) != len(run_ids):
            raise PredefinedError(f"the file has no id column and {len(scores)} rows, the run {len(run_ids)} samples: "
                                  "without ids rows cannot be matched. Add a sample_id column.")
        return Joined(scores[cols].reset_index(drop=True), len(run_ids), 0, [], True, _ends(scores, cols))
    run_index = pd.Index(run_ids.astype(str))
    pos = run_index.get_indexer(scores["sample_id"])
    known = pos >= 0
    values = pd.DataFrame(np.nan, index=range(len(run_ids)), columns=cols)
    values.iloc[pos[known]] = scores.loc[known, cols].to_numpy()
    unknown = scores.loc[~known, "sample_id"]
    if known.sum() == 0:
        raise PredefinedError(f"none of the file's {len(scores)} ids is a sample of this run (the run's ids look like "
                              f"{run_ids[0]!r}); choose the right id column or run.")
    return Joined(values, int(known.sum()), int((~known).sum()), unknown.head(5).tolist(), False, _ends(scores, cols))


def _ends(scores: pd.DataFrame, cols: list[str]) -> dict[str, str]:
    ends = scores.attrs.get("suspicious", {})
    return {c: ends.get(c, "high") for c in cols}


PREDEFINED_FILE = "predefined.parquet"
DIRECTIONS_FILE = "predefined.json"  # {"suspicious": {column: "high" | "low"}}


def save_to_run(run_dir, joined: Joined) -> list[str]:
    """Merge the joined columns into ``<run>/predefined.parquet`` (same name replaces) and their suspicious ends
    into ``<run>/predefined.json``, atomically; returns all names. Values are stored as in the file."""
    from pathlib import Path

    from engine.store.runs import atomic_write_json, atomic_write_parquet

    path = Path(run_dir) / PREDEFINED_FILE
    current = pd.read_parquet(path) if path.is_file() else pd.DataFrame(index=range(len(joined.values)))
    ends = directions(run_dir)
    for c in joined.values.columns:
        current[c] = joined.values[c].to_numpy()
        ends[c] = joined.suspicious.get(c, "high")
    atomic_write_json(Path(run_dir) / DIRECTIONS_FILE, {"suspicious": {c: ends.get(c, "high") for c in current.columns}})
    atomic_write_parquet(path, current)
    return list(current.columns)


def directions(run_dir) -> dict[str, str]:
    """Which end ("high" / "low") of each imported column is suspicious; "high" for columns imported before this
    was recorded (they were stored turned to higher = harder)."""
    import json
    from pathlib import Path

    if run_dir is None:
        return {}
    imported = Path(run_dir) / PREDEFINED_FILE
    if imported.is_file():
        import pyarrow.parquet as pq

        names = [c for c in pq.read_schema(imported).names if not c.startswith("__")]
    else:
        names = []
    side = Path(run_dir) / DIRECTIONS_FILE
    saved = json.loads(side.read_text()).get("suspicious", {}) if side.is_file() else {}
    return {c: saved.get(c, "high") for c in names}


def load_from_run(run_dir) -> pd.DataFrame:
    """Imported predefined scores of a run (run order, NaN where a file had no value); empty frame if none."""
    from pathlib import Path

    path = Path(run_dir) / PREDEFINED_FILE
    return pd.read_parquet(path) if path.is_file() else pd.DataFrame()
