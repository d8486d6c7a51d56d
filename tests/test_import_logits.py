"""python -m engine import-logits: saved per-epoch logits become a run; bad input is refused before any write."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from engine.capture.logits import LogitsError, import_logits, open_logits
from engine.cli import main
from engine.store.runs import Run, list_runs


def _data(tmp_path, epochs=4, n=120, c=3, seed=0, dtype=np.float32):
    """Logits of a 'model' that learns every sample's label except the flipped ones."""
    rng = np.random.default_rng(seed)
    true = rng.integers(0, c, n)
    labels = true.copy()
    flip = rng.random(n) < 0.2
    labels[flip] = (labels[flip] + 1) % c
    z = rng.normal(size=(epochs, n, c))
    for e in range(epochs):
        z[e, np.arange(n), true] += 1.0 + e  # the true class wins more and more
    np.save(tmp_path / "logits.npy", z.astype(dtype))
    pd.DataFrame({"sample_id": [f"s{i}" for i in range(n)], "label": labels}).to_csv(tmp_path / "labels.csv", index=False)
    return z, labels, flip


def test_import_single_file_ranks_flipped_labels_first(tmp_path, capsys):
    _, labels, flip = _data(tmp_path)
    assert main(["import-logits", "--logits", str(tmp_path / "logits.npy"), "--labels", str(tmp_path / "labels.csv"),
                 "--out", str(tmp_path / "runs")]) == 0
    (run,) = list_runs(tmp_path / "runs")
    assert run.status()["state"] == "done" and run.config()["origin"] == "imported logits"
    scores = run.scores()
    top = scores["rank"].to_numpy() <= flip.sum()
    assert (top == flip).mean() > 0.95
    assert run.classes() == ["0", "1", "2"]
    assert np.asarray(run.dynamics(0, "margin")).shape == (4, 120)
    assert "flagged" in capsys.readouterr().out


def test_folder_of_epochs_in_natural_order_and_class_names(tmp_path):
    z, labels, _ = _data(tmp_path, epochs=11, dtype=np.float16)
    folder = tmp_path / "epochs"
    folder.mkdir()
    for e in range(11):
        np.save(folder / f"epoch{e}.npy", z[e].astype(np.float16))
    (folder / "notes.txt").write_text("ignored")
    names = np.array(["cat", "dog", "eel"])
    pd.DataFrame({"sample_id": [f"s{i}" for i in range(len(labels))], "label": names[labels]}).to_csv(
        tmp_path / "named.csv", index=False)
    lg = open_logits(folder)
    assert lg.names[:3] == ["epoch0.npy", "epoch1.npy", "epoch2.npy"] and lg.names[-1] == "epoch10.npy"
    run = import_logits(folder, tmp_path / "named.csv", out=tmp_path / "runs")
    assert run.classes() == ["cat", "dog", "eel"]
    assert (run.samples()["label"].to_numpy() == labels).all()
    # epoch 10 is the 11th row, not the 3rd (name order would put epoch10 after epoch1)
    margin10 = np.asarray(run.dynamics(0, "margin"))[10]
    zz = z[10].astype(np.float16).astype(np.float32)
    zy = zz[np.arange(len(labels)), labels]
    zz[np.arange(len(labels)), labels] = -np.inf
    np.testing.assert_allclose(margin10, zy - zz.max(1), rtol=1e-6)


def test_images_root_lets_pages_show_images(tmp_path):
    _, labels, _ = _data(tmp_path, n=30)
    root = tmp_path / "imgs"
    root.mkdir()
    for i in range(30):
        Image.fromarray(np.full((8, 8), i * 8, dtype=np.uint8)).save(root / f"{i}.png")
    df = pd.read_csv(tmp_path / "labels.csv")
    df["path"] = [f"{i}.png" for i in range(30)]
    df.to_csv(tmp_path / "labels.csv", index=False)
    run = import_logits(tmp_path / "logits.npy", tmp_path / "labels.csv", out=tmp_path / "runs", images=root)
    from engine.data.images import SampleImages

    assert SampleImages(run).image(3)[0, 0] == 24


def _refused(tmp_path, message, **kw):
    args = {"logits": tmp_path / "logits.npy", "labels": tmp_path / "labels.csv", "out": tmp_path / "runs"} | kw
    with pytest.raises(LogitsError, match=message):
        import_logits(**args)
    assert not (tmp_path / "runs").exists(), "nothing may be written before the input is known to be good"


def test_bad_shape_is_refused_before_writing(tmp_path):
    _data(tmp_path)
    np.save(tmp_path / "flat.npy", np.zeros((120, 3), dtype=np.float32))
    _refused(tmp_path, r"shape \(120, 3\); give \(epochs, samples, classes\)", logits=tmp_path / "flat.npy")
    np.save(tmp_path / "one.npy", np.zeros((2, 120, 1), dtype=np.float32))
    _refused(tmp_path, "at least 2", logits=tmp_path / "one.npy")
    np.save(tmp_path / "int.npy", np.zeros((2, 120, 3), dtype=np.int64))
    _refused(tmp_path, "float16, float32 or float64", logits=tmp_path / "int.npy")
    folder = tmp_path / "mixed"
    folder.mkdir()
    np.save(folder / "e0.npy", np.zeros((120, 3), dtype=np.float32))
    np.save(folder / "e1.npy", np.zeros((119, 3), dtype=np.float32))
    _refused(tmp_path, "differ in shape", logits=folder)


def test_nan_and_inf_are_refused_before_writing(tmp_path):
    z, _, _ = _data(tmp_path)
    z[2, 7, 1] = np.nan
    np.save(tmp_path / "nan.npy", z.astype(np.float32))
    _refused(tmp_path, r"nan.npy\[2\]: sample row 7, class 1 is nan", logits=tmp_path / "nan.npy")
    z[2, 7, 1] = np.inf
    np.save(tmp_path / "inf.npy", z.astype(np.float32))
    _refused(tmp_path, "is inf", logits=tmp_path / "inf.npy")


def test_ids_that_do_not_match_and_duplicates_are_refused(tmp_path):
    _data(tmp_path)
    df = pd.read_csv(tmp_path / "labels.csv")
    df.iloc[:-1].to_csv(tmp_path / "short.csv", index=False)
    _refused(tmp_path, "119 rows but the logits hold 120 samples", labels=tmp_path / "short.csv")
    dup = df.copy()
    dup.loc[5, "sample_id"] = "s4"
    dup.to_csv(tmp_path / "dup.csv", index=False)
    _refused(tmp_path, r"unique; repeated: \['s4'\]", labels=tmp_path / "dup.csv")
    bad = df.copy()
    bad.loc[0, "label"] = 7
    bad.to_csv(tmp_path / "badlabel.csv", index=False)
    _refused(tmp_path, "label 7 is not a class index", labels=tmp_path / "badlabel.csv")
    df.rename(columns={"label": "target"}).to_csv(tmp_path / "nolabel.csv", index=False)
    _refused(tmp_path, r"lacks column\(s\) \['label'\]", labels=tmp_path / "nolabel.csv")


def test_empty_files_are_refused(tmp_path):
    _data(tmp_path)
    (tmp_path / "empty.npy").write_bytes(b"")
    _refused(tmp_path, "empty", logits=tmp_path / "empty.npy")
    (tmp_path / "empty.csv").write_text("")
    _refused(tmp_path, "empty", labels=tmp_path / "empty.csv")
    (tmp_path / "header.csv").write_text("sample_id,label\n")
    _refused(tmp_path, "no rows", labels=tmp_path / "header.csv")
    np.save(tmp_path / "zero.npy", np.zeros((0, 120, 3), dtype=np.float32))
    _refused(tmp_path, "no logits", logits=tmp_path / "zero.npy")
    (tmp_path / "none").mkdir()
    _refused(tmp_path, "no .npy files", logits=tmp_path / "none")


def test_paths_outside_the_images_root_are_refused(tmp_path):
    _data(tmp_path)
    (tmp_path / "imgs").mkdir()
    df = pd.read_csv(tmp_path / "labels.csv")
    df["path"] = "../secret.png"
    df.to_csv(tmp_path / "labels.csv", index=False)
    _refused(tmp_path, "stay inside it", images=tmp_path / "imgs")
    df["path"] = [f"{i}.png" for i in range(len(df))]
    df.to_csv(tmp_path / "labels.csv", index=False)
    _refused(tmp_path, "is not under --images", images=tmp_path / "imgs")


def test_cli_reports_bad_input_as_an_error(tmp_path, capsys):
    _data(tmp_path)
    np.save(tmp_path / "flat.npy", np.zeros((120, 3), dtype=np.float32))
    rc = main(["import-logits", "--logits", str(tmp_path / "flat.npy"), "--labels", str(tmp_path / "labels.csv"),
               "--out", str(tmp_path / "runs")])
    assert rc == 2 and "error:" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


def test_doctest_of_import_logits():
    import doctest

    import engine.capture.logits

    assert doctest.testmod(engine.capture.logits, raise_on_error=True).attempted > 0


def test_reads_one_block_at_a_time(tmp_path, monkeypatch):
    """A file wider than one block is read in blocks and gives the same run as one read."""
    import engine.capture.logits as lg

    _data(tmp_path, n=100)
    whole = import_logits(tmp_path / "logits.npy", tmp_path / "labels.csv", out=tmp_path / "a")
    monkeypatch.setattr(lg, "ROWS_PER_BLOCK", 7)
    blocks = import_logits(tmp_path / "logits.npy", tmp_path / "labels.csv", out=tmp_path / "b")
    for name in ("margin", "prob", "pred"):
        np.testing.assert_array_equal(np.asarray(Run(whole.path).dynamics(0, name)), np.asarray(blocks.dynamics(0, name)))
