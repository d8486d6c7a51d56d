"""SQLite robustness of the review store: connections closed, busy database reported, reads create nothing,
decisions checked against the run, no WAL on network file systems."""

from __future__ import annotations

import sqlite3

import pytest

from engine.review.export import export_csv
from engine.review.reviews import DB_NAME, ReviewError, ReviewStore, on_network_fs
from engine.training import audit
from engine.training.config import AuditConfig


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    r, ds = audit.prepare(AuditConfig(dataset="digits", noise=0.1, epochs=1, threshold_samples=False),
                          tmp_path_factory.mktemp("runs"))
    audit.execute(r, ds)
    return r


def test_exporting_a_run_nobody_reviewed_creates_no_database(run, tmp_path):
    assert ReviewStore(run.path).current().empty
    assert ReviewStore(run.path).history().empty
    export_csv(run, tmp_path / "d.csv", kind="decisions")
    export_csv(run, tmp_path / "m.csv", kind="manifest")
    assert not (run.path / DB_NAME).exists()


def test_every_connection_is_closed(run, monkeypatch, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(run.path, copy)
    opened: list[sqlite3.Connection] = []
    real = sqlite3.connect

    def tracking(*a, **kw):
        con = real(*a, **kw)
        opened.append(con)
        return con

    monkeypatch.setattr(sqlite3, "connect", tracking)
    store = ReviewStore(copy)
    sid = run.samples(["sample_id"])["sample_id"].iat[0]
    store.record(sid, "remove")
    store.current()
    store.history()
    assert opened
    for con in opened:
        with pytest.raises(sqlite3.ProgrammingError):  # "Cannot operate on a closed database"
            con.total_changes  # noqa: B018


def test_a_busy_database_says_so_and_saves_nothing(run, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(run.path, copy)
    ids = run.samples(["sample_id"])["sample_id"]
    ReviewStore(copy).record(ids.iat[0], "remove")
    other = sqlite3.connect(copy / DB_NAME, isolation_level=None)
    other.execute("BEGIN EXCLUSIVE")
    try:
        with pytest.raises(ReviewError, match="busy"):
            ReviewStore(copy, timeout=0.2).record(ids.iat[1], "correct")
    finally:
        other.execute("ROLLBACK")
        other.close()
    assert list(ReviewStore(copy).current()["sample_id"]) == [ids.iat[0]]


def test_decisions_are_checked_against_the_run(run, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(run.path, copy)
    store = ReviewStore(copy)
    sid = run.samples(["sample_id"])["sample_id"].iat[0]
    with pytest.raises(ReviewError, match="not samples of this run"):
        store.record_many([(sid, "remove", None), ("no-such-sample", "remove", None)])
    with pytest.raises(ReviewError, match="not a class of this run"):
        store.record(sid, "mislabeled", "eleven")
    assert store.current().empty  # nothing of a refused batch was saved
    store.record(sid, "mislabeled", run.classes()[3])
    assert store.current()["new_label"].tolist() == [run.classes()[3]]


MOUNTS = """sysfs /sys sysfs rw 0 0
/dev/sda1 / ext4 rw,relatime 0 0
server:/export/runs /shared/runs nfs4 rw,vers=4.2 0 0
//nas/team /mnt/team cifs rw 0 0
/dev/sdb1 /shared/runs/local ext4 rw 0 0
"""


@pytest.mark.parametrize("path, network", [("/shared/runs/r1/reviews.sqlite", True), ("/mnt/team/x/reviews.sqlite", True),
                                           ("/home/me/runs/r1/reviews.sqlite", False),
                                           ("/shared/runs/local/r1/reviews.sqlite", False),
                                           ("/shared/runsx/r1/reviews.sqlite", False)])
def test_network_file_systems_are_detected_from_the_mount_table(path, network):
    assert on_network_fs(path, MOUNTS) is network
