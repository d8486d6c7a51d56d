"""Predefined-score CSVs: every malformed case gets a clear message; valid ones join by sample_id."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from streamlit.testing.v1 import AppTest

from engine.scores.correlations import correlation_matrix, ensemble, rank_and_normalize, topk_jaccard
from engine.scores.predefined import (
    PredefinedError,
    guess_columns,
    join_to_run,
    load_from_run,
    parse_csv,
    validate,
)

ROOT = Path(__file__).resolve().parent.parent
SAMPLE = ROOT / "sample_data" / "predefined_scores.csv"


def _load(data: bytes, id_col="sample_id", cols=("s",)):
    return validate(parse_csv(data).frame, id_col, list(cols))


@pytest.mark.parametrize(
    "data, message",
    [
        (b"", "empty"),
        (b"   \n\n", "empty"),
        (b"sample_id,s\n", "no rows"),
        (b"0.1,0.2\n0.3,0.4\n", "looks like data"),
        (b"just one column\nvalue\n", "no delimiter"),
        (b"sample_id,s\na,1\na,2\n", "duplicated id"),
        (b"sample_id,s\na,1\nb,oops\nc,3\n", "not numbers.*rows 3"),
        (b"sample_id,s\na,1\nb,nan\nc,inf\n", "2 value\\(s\\) are empty, NaN or infinite.*rows 3, 4"),
        (b"sample_id,s\na,1\n,2\n", "empty 'sample_id'.*rows 3"),
        (b"\x89PNG\r\n\x1a\n\x00\x00\x00binary", "binary|not text"),
        (b"sample_id,s,s\na,1,2\n", "repeats a column"),
    ],
)
def test_malformed_files_say_what_is_wrong(data, message):
    with pytest.raises(PredefinedError, match=message):
        _load(data)


def test_missing_id_column_and_size_limit():
    with pytest.raises(PredefinedError, match="not in the file"):
        _load(b"name,s\na,1\n")
    with pytest.raises(PredefinedError, match="limit is"):
        parse_csv(b"sample_id,s\n" + b"a,1\n" * 100, max_bytes=50)


def test_other_delimiters_and_encodings_are_read():
    semi = parse_csv("sample_id;s\né;1.5\n".encode("cp1252"))
    assert semi.delimiter == ";" and semi.encoding == "cp1252" and semi.frame["sample_id"].iat[0] == "é"
    tab = parse_csv("sample_id\ts\na\t2\n".encode("utf-16"))
    assert tab.delimiter == "\t" and tab.frame["s"].iat[0] == "2"


def test_orientation_and_join_by_id():
    clean = validate(parse_csv(b"id,easy,hard\nb,1,5\na,2,7\nzz,3,9\n").frame, "id", ["easy", "hard"],
                     {"easy": False, "hard": True})
    joined = join_to_run(clean, np.array(["a", "b", "c"], dtype=object))
    # values stay as in the file; which end is suspicious is recorded beside them
    assert joined.values["easy"].tolist()[:2] == [2.0, 1.0] and np.isnan(joined.values["easy"].iat[2])
    assert joined.values["hard"].tolist()[:2] == [7.0, 5.0]
    assert joined.suspicious == {"easy": "low", "hard": "high"}
    assert joined.n_matched == 2 and joined.n_unknown == 1 and joined.unknown_examples == ["zz"]
    with pytest.raises(PredefinedError, match="none of the file's"):
        join_to_run(clean, np.array(["x", "y"], dtype=object))


def test_no_id_column_only_when_row_counts_match():
    clean = validate(parse_csv(b"a,b\n1,2\n3,4\n").frame, None, ["a", "b"])
    assert join_to_run(clean, np.array(["p", "q"], dtype=object)).by_position
    with pytest.raises(PredefinedError, match="cannot be matched"):
        join_to_run(clean, np.array(["p", "q", "r"], dtype=object))


@settings(max_examples=150, deadline=None)
@given(st.binary(max_size=2000))
def test_random_bytes_never_crash(data):
    try:
        parsed = parse_csv(data)
        id_col, _, cols = guess_columns(parsed.frame)
        validate(parsed.frame, id_col or parsed.frame.columns[0], cols or [parsed.frame.columns[-1]])
    except PredefinedError:
        pass


def test_huge_field_and_formula_ids_are_just_text():
    big = b"sample_id,s\n" + b"x" * 2_000_000 + b",1\n=cmd|' /C calc'!A0,2\n"
    clean = _load(big)
    assert clean["sample_id"].iat[1] == "=cmd|' /C calc'!A0" and clean["s"].tolist() == [1.0, 2.0]


def test_a_million_rows(tmp_path):
    n = 1_000_000
    data = ("sample_id,s\n" + "".join(f"s{i},{i % 97}\n" for i in range(n))).encode()
    clean = _load(data)
    joined = join_to_run(clean, np.array([f"s{i}" for i in range(n)], dtype=object))
    assert joined.n_matched == n and joined.values["s"].iat[-1] == (n - 1) % 97


def test_correlations_by_hand():
    df = pd.DataFrame({"a": [1.0, 2, 3, 4, 5], "b": [2.0, 4, 6, 8, 100], "c": [5.0, 4, 3, 2, 1]})
    corr, used = correlation_matrix(df, "spearman")
    assert used == 5 and corr.loc["a", "b"] == pytest.approx(1.0) and corr.loc["a", "c"] == pytest.approx(-1.0)
    assert correlation_matrix(df, "pearson")[0].loc["a", "b"] < 1.0
    jac = topk_jaccard(df, 2)
    assert jac.loc["a", "b"] == 1.0 and jac.loc["a", "c"] == 0.0
    assert rank_and_normalize(pd.Series([10.0, 30, 20, 20])).tolist() == [0.0, 1.0, 1 / 3, 2 / 3]
    e = ensemble([pd.DataFrame({"sample_id": ["x", "y"], "aum": [1.0, 3.0]}),
                  pd.DataFrame({"sample_id": ["y", "z"], "aum": [5.0, 7.0]})], "aum").set_index("sample_id")
    assert e.loc["y", "aum"] == 4.0 and e.loc["x", "n_runs"] == 1


def load_scores_names(at: AppTest) -> list[str]:
    """The score names behind the heatmap's options (options are shown as "name (low = suspicious)")."""
    return [o.rsplit(" (", 1)[0] for o in next(m for m in at.multiselect if m.label == "Scores").options]


def _scores_page(monkeypatch, root) -> AppTest:
    monkeypatch.setenv("DIFFICULTY_AUDIT_RUNS", str(root))
    at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=60)
    at.run()
    at.switch_page("app_pages/scores.py").run()
    assert not at.exception, at.exception
    return at


def test_import_sample_csv_into_a_run_and_see_correlations(monkeypatch, own_small_run):
    small_run = own_small_run  # its own copy: the import writes predefined.parquet into the run
    at = _scores_page(monkeypatch, small_run.path.parent)
    assert len(at.get("plotly_chart")) == 3  # heatmap, pair scatter, top-k overlap of the run's own scores
    at.text_input(key="predef_path").set_value(str(SAMPLE)).run()
    assert not at.exception, at.exception
    assert next(m for m in at.multiselect if m.label == "Score columns").value == ["knn_disagreement", "pixel_distance_to_class_mean"]
    at.button(key="predef_import").click().run()
    assert not at.exception, at.exception
    assert any("Imported" in s.value for s in at.success)
    imported = load_from_run(small_run.path)
    assert list(imported.columns) == ["knn_disagreement", "pixel_distance_to_class_mean"]
    reference = pd.read_csv(SAMPLE).set_index("sample_id")
    ids = small_run.samples()["sample_id"]
    np.testing.assert_allclose(imported["knn_disagreement"], reference.loc[ids, "knn_disagreement"])
    at.run()
    heat = next(m for m in at.multiselect if m.label == "Scores")
    assert "csv:knn_disagreement (high = suspicious)" in heat.options  # shown with its suspicious end
    assert heat.value == list(load_scores_names(at)), "every score is in the heatmap by default"
    heat.unselect("aum_yang").run()
    at.run()  # the user's selection survives reruns
    assert "aum_yang" not in next(m for m in at.multiselect if m.label == "Scores").value


def test_malformed_upload_shows_the_error(monkeypatch, small_run, tmp_path):
    bad = tmp_path / "bad.csv"
    bad.write_bytes(b"sample_id,s\ndigits-0001,1\ndigits-0001,2\n")
    monkeypatch.setenv("DIFFICULTY_AUDIT_DATA_ROOT", str(tmp_path))  # the page reads typed paths under it only
    at = _scores_page(monkeypatch, small_run.path.parent)
    at.text_input(key="predef_path").set_value(str(bad)).run()
    assert not at.exception, at.exception
    assert any("duplicated id" in e.value for e in at.error)


def test_csv_alone_without_a_run(monkeypatch, tmp_path):
    at = _scores_page(monkeypatch, tmp_path / "no-runs")
    at.text_input(key="predef_path").set_value(str(SAMPLE)).run()
    assert not at.exception, at.exception
    assert any("no run needed" in s.value for s in at.success)
    assert len(at.get("plotly_chart")) == 4  # histogram, heatmap, pair scatter, top-k overlap
    assert len(at.dataframe[0].value) == 1000


def test_csv_alone_with_image_paths_shows_a_gallery(monkeypatch, tmp_path):
    import shutil

    files = sorted(p.relative_to(ROOT / "sample_data" / "digits_folder").as_posix()
                   for p in (ROOT / "sample_data" / "digits_folder").rglob("*.png"))[:30]
    root = tmp_path / "images"  # under the data root, as the page requires
    for f in files:
        (root / f).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(ROOT / "sample_data" / "digits_folder" / f, root / f)
    monkeypatch.setenv("DIFFICULTY_AUDIT_DATA_ROOT", str(tmp_path))
    csv_path = tmp_path / "scores.csv"
    pd.DataFrame({"sample_id": files, "score": np.arange(30.0)}).to_csv(csv_path, index=False)
    at = _scores_page(monkeypatch, tmp_path / "no-runs")
    at.text_input(key="predef_path").set_value(str(csv_path)).run()
    key = next(w.key for w in at.text_input if w.key and w.key.startswith("predef_root_"))
    at.text_input(key=key).set_value(str(root)).run()
    assert not at.exception, at.exception
    assert len(at.get("image")) == 18  # the 18 highest scores, read from under the chosen folder only
