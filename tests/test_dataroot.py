"""The dashboard reads typed paths only under its data root and runs folder; parse errors quote no file content."""

from __future__ import annotations

from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

from engine.data.dataroot import DATA_ROOT_ENV, PathRefused, resolve_user_path
from engine.data.datasets import DatasetError, load_manifest
from engine.scores.predefined import PredefinedError, join_to_run, parse_csv, validate

APP = str(Path(__file__).resolve().parent.parent / "app.py")
SECRET = "SECRET-CELL-42"


@pytest.fixture
def roots(tmp_path, monkeypatch):
    root, runs, outside = tmp_path / "root", tmp_path / "runs", tmp_path / "outside"
    for d in (root, runs, outside):
        d.mkdir()
    (outside / "secret.csv").write_text(f"sample_id,score\n{SECRET},0.5\n")
    monkeypatch.setenv(DATA_ROOT_ENV, str(root))
    monkeypatch.setenv("DIFFICULTY_AUDIT_RUNS", str(runs))
    return root, runs, outside


def test_paths_under_the_data_root_or_runs_folder_are_allowed(roots):
    root, runs, _ = roots
    (root / "data").mkdir()
    assert resolve_user_path("data") == (root / "data").resolve()  # relative = under the data root
    assert resolve_user_path(str(root / "data" / "x.csv")) == (root / "data" / "x.csv").resolve()
    assert resolve_user_path(str(runs / "some-run")) == (runs / "some-run").resolve()


@pytest.mark.parametrize("how", ["absolute", "dotdot", "symlink", "symlinked-dir", "home"])
def test_paths_leading_out_are_refused_with_how_to_change_it(roots, how):
    root, _, outside = roots
    target = {
        "absolute": str(outside / "secret.csv"),
        "dotdot": "../outside/secret.csv",
        "home": "~/../../etc/passwd",
    }.get(how)
    if how == "symlink":
        (root / "link.csv").symlink_to(outside / "secret.csv")
        target = "link.csv"
    if how == "symlinked-dir":
        (root / "d").symlink_to(outside)
        target = str(root / "d" / "secret.csv")
    with pytest.raises(PathRefused, match=f"outside the folders.*{DATA_ROOT_ENV}"):
        resolve_user_path(target)


@pytest.mark.parametrize(
    "data",
    [
        f"{SECRET}:x:0:0\nmore\n",  # no delimiter (an /etc/passwd-like file)
        f"sample_id,{SECRET},{SECRET}\na,1,2\n",  # repeated header
        f"sample_id,s\na,{SECRET}\n",  # not a number
        f"sample_id,s\n{SECRET},1\n{SECRET},2\n",  # duplicated id
        f"sample_id,s,\na,1,{SECRET}\n",  # empty column name
        f"1,2\n{SECRET},3\n",  # looks like data
        f"sample_id,s\na,1,{SECRET},x\n",  # too many fields
    ],
)
def test_score_csv_errors_quote_no_cell(data):
    with pytest.raises(PredefinedError) as err:
        parsed = parse_csv(data.encode())
        validate(parsed.frame, "sample_id", ["s"])
    assert SECRET not in str(err.value)


def test_join_error_quotes_no_id_of_the_file():
    import numpy as np
    import pandas as pd

    with pytest.raises(PredefinedError) as err:
        join_to_run(pd.DataFrame({"sample_id": [SECRET], "s": [1.0]}), np.array(["digits[0]"]))
    assert SECRET not in str(err.value)


@pytest.mark.parametrize(
    "rows",
    [
        f"path,label\n{SECRET}.png,\n",  # empty label
        f"path,label\n../{SECRET}.png,a\n",  # outside the manifest folder
        f"path,label,sample_id\na.png,a,{SECRET}\nb.png,b,{SECRET}\n",  # duplicate id
        f"{SECRET},label\na.png,a\n",  # missing column
    ],
)
def test_manifest_errors_quote_no_cell(tmp_path, rows):
    (tmp_path / "m.csv").write_text(rows)
    with pytest.raises(DatasetError) as err:
        load_manifest(tmp_path / "m.csv")
    assert SECRET not in str(err.value)


def _page_text(at: AppTest) -> str:
    parts = list(at.markdown) + list(at.text) + list(at.code) + list(at.error) + list(at.warning) + list(at.caption)
    return " ".join(str(getattr(e, "value", "")) for e in parts) + " ".join(df.value.to_string() for df in at.dataframe)


PATH_FIELDS = {
    "app_pages/scores.py": [(None, "…or a path on this machine")],
    "app_pages/audit.py": [(None, "Another image folder"),
                           ("Image folder on this machine", "Image folder, laid out as root/<class>/<image>"),
                           ("CSV manifest on this machine", "CSV manifest with a header path,label[,sample_id]; "
                                                            "paths relative to the CSV's folder")],
}


@pytest.mark.parametrize("page,source,label", [(p, s, lab) for p, fields in PATH_FIELDS.items() for s, lab in fields])
def test_every_path_field_refuses_a_file_outside(roots, page, source, label):
    _, _, outside = roots
    for target in ("/etc/passwd", str(outside / "secret.csv"), str(outside)):
        at = AppTest.from_file(APP, default_timeout=60).run()
        at.switch_page(page).run()
        if source:
            at.radio(key="source").set_value(source).run()
        field = next(t for t in at.text_input if t.label == label)
        field.set_value(target).run()
        assert not at.exception, at.exception
        assert any("outside the folders this dashboard reads" in e.value for e in at.error), [e.value for e in at.error]
        text = _page_text(at)
        assert "root:x:0:0" not in text and SECRET not in text


def test_starting_an_audit_of_a_folder_outside_is_refused(roots):
    _, runs, outside = roots
    at = AppTest.from_file(APP, default_timeout=60).run()
    at.radio(key="source").set_value("Image folder on this machine").run()
    next(t for t in at.text_input if t.label.startswith("Image folder")).set_value(str(outside))
    next(b for b in at.button if b.label == "Start audit").click().run()
    assert any(e.value.startswith("Cannot start:") and DATA_ROOT_ENV in e.value.replace("\\", "") for e in at.error)
    assert not any(runs.iterdir())
