"""Review steps: batches and undo, reviewer names and agreement, incremental decision arrays, the label matrix."""

from __future__ import annotations

import sqlite3

import numpy as np
import pandas as pd

from engine.review.reviews import DecisionArrays, ReviewStore, agreement
from engine.scores.confusion import label_matrix, per_class_table


def _current(store: ReviewStore) -> dict[str, tuple[str, str | None]]:
    cur = store.current()
    return {s: (d, lab) for s, d, lab in zip(cur["sample_id"], cur["decision"], cur["new_label"], strict=True)}


def test_undo_withdraws_one_whole_batch(tmp_path):
    store = ReviewStore(tmp_path)
    store.record_many([("a", "correct", None)], reviewer="ann", batch="b1")
    store.record_many([("a", "remove", None), ("b", "mislabeled", "7"), ("c", "unsure", None)], reviewer="ann", batch="b2")
    store.record_many([("c", "correct", None)], reviewer="bob", batch="b3")  # decided after the bulk step
    assert store.undo("b2", reviewer="ann") == 2
    # a is back to its decision before the batch, b has none again, c keeps bob's later decision.
    assert _current(store) == {"a": ("correct", None), "c": ("correct", None)}
    assert store.undo("b2") == 0  # undoing twice changes nothing
    hist = store.history()
    assert len(hist) == 7 and set(hist["batch"]) == {"b1", "b2", "b3", "undo:b2"}
    restored = hist[(hist["batch"] == "undo:b2") & (hist["sample_id"] == "a")].iloc[0]
    assert restored["reviewer"] == "ann" and restored["decision"] == "correct"


def test_each_call_is_its_own_batch(tmp_path):
    store = ReviewStore(tmp_path)
    store.record("a", "remove")
    store.record("a", "unsure")
    assert store.history()["batch"].nunique() == 2


def test_a_store_written_before_reviewers_existed_opens_and_keeps_its_rows(tmp_path):
    con = sqlite3.connect(tmp_path / "reviews.sqlite")
    con.executescript("CREATE TABLE history (id INTEGER PRIMARY KEY AUTOINCREMENT, sample_id TEXT NOT NULL, "
                      "decision TEXT NOT NULL, new_label TEXT, decided_at REAL NOT NULL, session TEXT);"
                      "INSERT INTO history (sample_id, decision, new_label, decided_at, session) VALUES ('x', 'remove', NULL, 1.0, 's');")
    con.close()
    store = ReviewStore(tmp_path)
    store.record("y", "correct", reviewer="ann", batch="b")
    hist = store.history()
    assert hist["sample_id"].tolist() == ["x", "y"] and hist["reviewer"].tolist()[1] == "ann"
    assert pd.isna(hist["reviewer"].iloc[0])


def test_agreement_between_reviewers(tmp_path):
    store = ReviewStore(tmp_path)
    store.record_many([("a", "remove", None), ("b", "mislabeled", "3"), ("c", "correct", None)], reviewer="ann")
    store.record_many([("a", "remove", None), ("b", "mislabeled", "5")], reviewer="bob")
    store.record_many([("c", "unsure", None)], reviewer="bob", batch="oops")
    store.undo("oops", reviewer="bob")  # bob's decision on c is withdrawn: only ann decided c
    by = store.by_reviewer()
    agree = agreement(by).set_index("sample_id")
    assert agree.index.tolist() == ["a", "b"]
    assert bool(agree.loc["a", "agree"]) and not bool(agree.loc["b", "agree"])
    assert agree.loc["b", "detail"] == "ann: mislabeled → 3; bob: mislabeled → 5"
    assert store.by_reviewer(["c"])[["reviewer", "decision"]].values.tolist() == [["ann", "correct"]]


def test_decision_arrays_follow_the_store_incrementally(tmp_path):
    store = ReviewStore(tmp_path)
    ids = [f"s{i}" for i in range(6)]
    arr = DecisionArrays(store, ids, ["cat", "dog"])
    store.record_many([("s1", "mislabeled", "dog"), ("s2", "remove", None), ("s1", "correct", None)])
    arr.sync()
    assert arr.code.tolist() == [0, 2, 3, 0, 0, 0] and arr.new_label.tolist() == [-1] * 6
    store.record_many([("s4", "mislabeled", "dog"), ("zz", "remove", None)])  # an id of no sample is skipped
    seen = arr.sync()
    assert arr.code.tolist() == [0, 2, 3, 0, 1, 0] and arr.new_label[4] == 1
    store.record("s2", "cleared")
    assert arr.sync() > seen and arr.code[2] == 0
    fresh = DecisionArrays(store, ids, ["cat", "dog"])
    fresh.sync()
    assert (fresh.code == arr.code).all() and (fresh.new_label == arr.new_label).all()
    for f in tmp_path.glob("reviews.sqlite*"):  # the store deleted and started again: the arrays follow
        f.unlink()
    ReviewStore(tmp_path).record("s0", "remove")
    arr.sync()
    assert arr.code.tolist() == [3, 0, 0, 0, 0, 0]


def test_label_matrix_and_per_class_table_match_a_crosstab():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 4, 500)
    suggested = np.where(rng.random(500) < 0.1, -1, rng.integers(0, 4, 500))
    flagged = rng.random(500) < 0.3
    m = label_matrix(labels, suggested, flagged, 4)
    keep = flagged & (suggested >= 0)
    ref = pd.crosstab(labels[keep], suggested[keep]).reindex(index=range(4), columns=range(4), fill_value=0)
    assert (m == ref.to_numpy()).all()
    table = per_class_table(labels, suggested, flagged, ["a", "b", "c", "d"]).set_index("class")
    for k, name in enumerate("abcd"):
        row = table.loc[name]
        assert row["count"] == (labels == k).sum() and row["flagged"] == (flagged & (labels == k)).sum()
        assert np.isclose(row["noise_rate"], row["flagged"] / row["count"])
        off = ref.loc[k].drop(k)
        assert row["most_confused"] == "abcd"[off.idxmax()] and row["confused_count"] == off.max()


def test_dataset_values_are_literal_text_in_markdown_and_plotly():
    from app_pages.common import fmt_num, md_escape, plot_text

    hostile = '<img src=x onerror="alert(1)"> [a](javascript:alert(2)) ![i](x) :red[x] $x$ **b**\nline'
    escaped = md_escape(hostile)
    assert "\n" not in escaped
    # every markdown/HTML metacharacter is backslash-escaped, so CommonMark shows it as itself
    for ch in "<>[]()!*:$":
        assert all(escaped[k - 1] == "\\" for k, c in enumerate(escaped) if c == ch)
    assert "<" not in plot_text("<b id=pwn>") and plot_text("<b>") == "&lt;b&gt;"
    assert plot_text("x" * 40, 24) == "x" * 23 + "…"
    assert [fmt_num(v) for v in (1234567, 0.12345, 12.345, 1234.5, float("nan"), 0)] == ["1,234,567", "0.123", "12.3",
                                                                                          "1,234", "–", "0"]


def test_a_click_event_gives_the_row_of_the_clicked_sample():
    """The value st.plotly_chart(on_select=..., selection_mode="points") keeps for a click on a scatter point (the
    shape Streamlit's frontend sends: one point with its curve, index, coordinates and customdata)."""
    from app_pages.common import clicked_row

    click = {"selection": {"points": [{"curve_number": 1, "point_number": 3, "point_index": 3, "x": -0.42, "y": 1.7,
                                       "customdata": 1234, "legendgroup": ""}],
                           "point_indices": [3], "box": [], "lasso": []}}
    assert clicked_row(click) == 1234
    two_columns = {"selection": {"points": [{"point_index": 0, "customdata": [17, "digits-0017"]}]}}
    assert clicked_row(two_columns) == 17
    nothing = {"selection": {"points": [], "point_indices": [], "box": [], "lasso": []}}
    assert clicked_row(nothing) is None and clicked_row(None) is None and clicked_row({}) is None
    no_row = {"selection": {"points": [{"point_index": 2, "x": 1, "y": 2}]}}  # a trace without customdata
    assert clicked_row(no_row) is None
