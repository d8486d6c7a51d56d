"""The flagged-samples page and the review/export engine behind it, on real runs."""

from __future__ import annotations

import shutil
import threading
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from streamlit.testing.v1 import AppTest

from engine.review.export import export_filename, export_frame
from engine.review.reviews import ReviewStore
from engine.training import audit
from engine.training.config import AuditConfig

ROOT = Path(__file__).resolve().parent.parent
APP = str(ROOT / "app.py")


def _flagged_page(monkeypatch, run) -> AppTest:
    monkeypatch.setenv("DIFFICULTY_AUDIT_RUNS", str(run.path.parent))
    at = AppTest.from_file(APP, default_timeout=60)
    at.run()
    at.switch_page("app_pages/flagged.py").run()
    assert not at.exception, at.exception
    return at


def _card_rows(at: AppTest) -> list[int]:
    """Row numbers (in run order) of the cards on the page, in display order."""
    return [int(b.key[4:]) for b in at.button if b.key and b.key.startswith("cor-")]


def _card_ids(at: AppTest, run) -> list[str]:
    ids = run.samples()["sample_id"].to_numpy()
    return [ids[i] for i in _card_rows(at)]


def test_gallery_shows_images_and_pages(monkeypatch, small_run):
    at = _flagged_page(monkeypatch, small_run)
    first = _card_ids(at, small_run)
    assert len(first) == min(12, int(small_run.scores()["flagged"].sum()))
    assert len(at.get("image")) >= len(first)  # Streamlit 1.67 names the element "image" (not "imgs")
    scores = small_run.scores().set_index("sample_id")
    assert first == scores.loc[first].sort_values("aum", ascending=True).index.tolist()  # worst (lowest AUM) first
    at.selectbox(key="flt_flagged").set_value("all").run()
    at.number_input(key="page_no").set_value(2).run()
    second = _card_ids(at, small_run)
    assert len(second) == 12 and not set(second) & set(_card_ids(at.number_input(key="page_no").set_value(1).run(), small_run))


def test_filter_by_given_label(monkeypatch, small_run):
    at = _flagged_page(monkeypatch, small_run)
    at.selectbox(key="flt_flagged").set_value("all").run()
    at.multiselect(key="flt_given").set_value(["3"]).run()
    at.radio(key="view").set_value("Table").run()
    assert not at.exception, at.exception
    table = next(d.value for d in at.dataframe if "sample_id" in d.value.columns)  # the review table, not the per-class one
    samples = small_run.samples()
    assert len(table) == int((samples["label"] == 3).sum()) and set(table["label"]) == {"3"}


def test_table_view_leaves_unset_cells_empty(monkeypatch, own_small_run):
    """The table's cells with nothing set (no decision, no new label) are drawn empty: the grid draws a missing value
    as the word "None" unless the element's ``placeholder`` says otherwise."""
    run = own_small_run
    at = _flagged_page(monkeypatch, run)
    row = _card_rows(at)[0]
    at.button(key=f"rem-{row}").click().run()
    at.radio(key="view").set_value("Table").run()
    assert not at.exception, at.exception
    editor = next(d for d in at.dataframe if "sample_id" in d.value.columns)
    table = editor.value.set_index("sample_id")
    sid = run.samples()["sample_id"].iat[row]
    assert table.loc[sid, "decision"] == "remove"
    assert table.drop(index=sid)["decision"].isna().all() and table["new_label"].isna().all()  # missing values ...
    assert editor.proto.HasField("placeholder") and editor.proto.placeholder == ""  # ... drawn as empty cells


def test_decision_is_saved_at_once_and_survives_a_reload(monkeypatch, own_small_run):
    run = own_small_run  # its own copy: the decision stays in this test
    at = _flagged_page(monkeypatch, run)
    row = _card_rows(at)[1]
    sid = run.samples()["sample_id"].iat[row]
    at.button(key=f"rem-{row}").click().run()
    assert not at.exception, at.exception
    current = ReviewStore(run.path).current().set_index("sample_id")
    assert list(current.index) == [sid] and current.loc[sid, "decision"] == "remove"
    reloaded = _flagged_page(monkeypatch, run)  # a fresh session, as after a browser reload
    assert ":red-badge[:material/delete: Remove]" in [m.value for m in reloaded.markdown]
    assert "Reviewed / flagged" in [m.label for m in reloaded.metric]


def test_exports_row_by_row(own_small_run):
    small_run = own_small_run  # its own copy: the decisions stay in this test
    store = ReviewStore(small_run.path)
    table = export_frame(small_run, "all")
    a, b, c = table["sample_id"].iloc[:3]
    store.record(a, "mislabeled", "7")
    store.record(b, "remove")
    store.record(c, "correct")
    store.record(c, "unsure")  # last write wins
    flagged = export_frame(small_run, "flagged")
    scores = small_run.scores().set_index("sample_id")
    assert flagged["sample_id"].tolist() == scores[scores["flagged"]].sort_values("rank").index.tolist()
    np.testing.assert_allclose(flagged["aum"], scores.loc[flagged["sample_id"], "aum"])
    manifest = export_frame(small_run, "manifest").set_index("sample_id")
    samples = small_run.samples().set_index("sample_id")
    assert b not in manifest.index and len(manifest) == len(samples) - 1
    assert manifest.loc[a, "label"] == "7"
    untouched = manifest.index[~manifest.index.isin([a, b, c])]
    assert (manifest.loc[untouched, "label"] == samples.loc[untouched, "label"].astype(str)).all()
    # an array dataset's manifest points at the cleaned folder's PNGs (<class>/<sample_id>.png), readable again
    assert (manifest.loc[untouched, "path"] == samples.loc[untouched, "label"].astype(str) + "/" + untouched + ".png").all()
    assert manifest.loc[a, "path"] == f"7/{a}.png"
    decisions = export_frame(small_run, "decisions").set_index("sample_id")
    assert decisions.loc[[a, b, c], "decision"].tolist() == ["mislabeled", "remove", "unsure"]
    assert len(decisions) == 3 and len(store.history()) == 4
    assert export_filename(small_run, "flagged") == f"{small_run.id}-flagged.csv"


def test_concurrent_reviewers_lose_nothing(own_small_run):
    ids = own_small_run.samples()["sample_id"].tolist()[:500]

    def reviewer(name: str, decision: str) -> None:
        store = ReviewStore(own_small_run.path)
        for s in ids:
            store.record(s, decision, session=name)

    threads = [threading.Thread(target=reviewer, args=("tab1", "correct")),
               threading.Thread(target=reviewer, args=("tab2", "remove"))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    store = ReviewStore(own_small_run.path)
    hist = store.history()
    assert len(hist) == 1000 and hist.groupby("session").size().tolist() == [500, 500]
    current = store.current().set_index("sample_id")
    last = hist.sort_values("id").groupby("sample_id").tail(1).set_index("sample_id")
    assert (current.loc[ids, "decision"] == last.loc[ids, "decision"]).all()  # last write wins


@pytest.mark.slow
def test_cleaned_manifest_reaudit_flags_fewer(tmp_path):
    """A reviewer relabels the flagged samples to their suggestion; the same audit of the cleaned data flags fewer."""
    data = tmp_path / "digits_folder"
    shutil.copytree(ROOT / "sample_data" / "digits_folder", data)
    cfg = AuditConfig(dataset=str(data), noise=0.1, epochs=15, seed=1)  # 12 misfiled + 30 flipped on purpose
    run, ds = audit.prepare(cfg, tmp_path / "runs")
    first = audit.execute(run, ds)
    table = export_frame(run, "flagged")
    ReviewStore(run.path).record_many([(s, "mislabeled", lab) for s, lab in zip(table["sample_id"], table["suggested_label"], strict=True)])
    manifest = export_frame(run, "manifest")
    manifest.to_csv(data / "cleaned.csv", index=False)
    again, ds2 = audit.prepare(AuditConfig(dataset=str(data / "cleaned.csv"), epochs=15, seed=1), tmp_path / "runs")
    second = audit.execute(again, ds2)
    assert second["n_samples"] == first["n_samples"] == 300
    assert second["n_flagged"] < first["n_flagged"]
    assert (pd.read_csv(data / "cleaned.csv")["sample_id"] == sorted(ds.sample_ids)).all()


def test_bulk_decision_on_the_filtered_selection(monkeypatch, own_small_run):
    run = own_small_run  # its own copy: decisions stay local
    at = _flagged_page(monkeypatch, run)
    at.selectbox(key="flt_flagged").set_value("all").run()
    at.multiselect(key="flt_given").set_value(["5"]).run()
    at.selectbox(key="bulk").set_value("unsure").run()
    at.button(key="bulk-apply-all").click().run()
    assert not at.exception, at.exception
    assert ReviewStore(run.path).current().empty  # nothing saved before the confirmation
    fives = set(run.samples().query("label == 5")["sample_id"])
    assert any(f"Mark **{len(fives)}** samples as **Unsure**" in m.value for m in at.markdown)  # the count is asked
    at.button(key="bulk-confirm").click().run()
    assert not at.exception, at.exception
    current = ReviewStore(run.path).current()
    assert set(current.query("decision == 'unsure'")["sample_id"]) == fives
    at.button(key="key-undo").click().run()  # the whole bulk step is one undo
    assert not at.exception, at.exception
    assert ReviewStore(run.path).current().empty


def test_two_reviewers_show_agreement_on_the_card(monkeypatch, own_small_run):
    run = own_small_run
    at = _flagged_page(monkeypatch, run)
    a, b = _card_ids(at, run)[:2]
    store = ReviewStore(run.path)
    store.record_many([(a, "remove", None), (b, "correct", None)], reviewer="ann")
    store.record_many([(a, "correct", None), (b, "correct", None)], reviewer="bob")
    at = _flagged_page(monkeypatch, run)
    badges = [m.value for m in at.markdown]
    assert ":red-badge[:material/warning: 2 reviewers disagree]" in badges
    assert ":green-badge[:material/thumb_up: 2 reviewers agree]" in badges
    assert any("2 samples were decided by two or more reviewers: 1 agree, 1 disagree" in c.value for c in at.caption)


def test_rank_by_offers_and_applies_imported_csv_scores(monkeypatch, own_small_run):
    """'Rank by' lists the run's imported (csv:) scores with their suspicious end, and ranks the gallery by them."""
    from engine.scores.predefined import join_to_run, parse_csv, save_to_run, validate

    run = own_small_run
    frame = parse_csv((ROOT / "sample_data" / "predefined_scores.csv").read_bytes()).frame
    clean = validate(frame, "sample_id", ["knn_disagreement", "pixel_distance_to_class_mean"],
                     {"knn_disagreement": True, "pixel_distance_to_class_mean": False})
    save_to_run(run.path, join_to_run(clean, run.samples(["sample_id"])["sample_id"].to_numpy()))
    at = _flagged_page(monkeypatch, run)
    rank_by = at.selectbox(key="rank_by")
    shown = rank_by.options  # as the user reads them: name, suspicious end, what it is
    assert any(o.startswith("csv:knn_disagreement (high = suspicious)") for o in shown), shown
    assert any(o.startswith("csv:pixel_distance_to_class_mean (low = suspicious)") for o in shown), shown
    at.selectbox(key="flt_flagged").set_value("all").run()
    rank_by.set_value("csv:pixel_distance_to_class_mean").run()
    assert not at.exception, at.exception
    ids = run.samples(["sample_id"])["sample_id"].to_numpy()
    distance = pd.Series(frame["pixel_distance_to_class_mean"].astype(float).to_numpy(), index=frame["sample_id"])
    want = distance.reindex(ids).sort_values(kind="stable").index[:12].tolist()  # low = suspicious: lowest first
    assert _card_ids(at, run) == want
