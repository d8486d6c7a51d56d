import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from engine.data.datasets import DatasetError, inject_noise, load_dataset, load_digits_dataset

SAMPLE = Path(__file__).resolve().parent.parent / "sample_data" / "digits_folder"


def test_digits_noise_is_exact_seeded_and_recorded():
    a = load_digits_dataset(0.2, "symmetric", seed=5)
    b = load_digits_dataset(0.2, "symmetric", seed=5)
    assert len(a) == 1797 and a.images.shape == (1797, 8, 8, 1) and a.images.dtype == np.uint8
    assert (a.labels != a.true_labels).sum() == round(0.2 * 1797)
    assert (a.labels == b.labels).all()
    assert (load_digits_dataset(0.2, "symmetric", seed=6).labels != a.labels).any()
    assert len(set(a.sample_ids)) == len(a)


def test_asymmetric_noise_follows_the_class_map():
    ds = load_digits_dataset(0.2, "asymmetric", seed=0)
    flipped = ds.labels != ds.true_labels
    pairs = set(zip(ds.true_labels[flipped].tolist(), ds.labels[flipped].tolist(), strict=True))
    assert pairs == {(2, 7), (3, 8), (5, 6), (6, 5), (7, 1)}
    for c in (2, 3, 5, 6, 7):
        members = ds.true_labels == c
        assert flipped[members].sum() == round(0.2 * members.sum())


def test_inject_noise_rejects_bad_rate():
    with pytest.raises(DatasetError, match="noise"):
        inject_noise(np.zeros(10, dtype=int), 1.5, "symmetric", 3, 0)


def test_folder_dataset_ids_are_relative_paths():
    ds = load_dataset(str(SAMPLE))
    assert len(ds) == 300 and ds.classes == [str(c) for c in range(10)]
    assert ds.images.shape[1:] == (32, 32, 1)
    assert all(not Path(s).is_absolute() and s.count("/") == 1 for s in ds.sample_ids)


def _tiny_folder(root: Path) -> Path:
    for c in ("cat", "dog"):
        (root / c).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(np.full((6, 6, 3), 40 * i, np.uint8)).save(root / c / f"{i}.png")
    return root


def test_folder_errors_name_the_file(tmp_path):
    with pytest.raises(DatasetError, match="not found"):
        load_dataset(str(tmp_path / "nope"))
    root = _tiny_folder(tmp_path / "d")
    (root / "empty_class").mkdir()
    with pytest.raises(DatasetError, match="empty_class.*holds no images"):
        load_dataset(str(root))
    shutil.rmtree(root / "empty_class")
    (root / "cat" / "bad.png").write_bytes(b"not an image at all")
    with pytest.raises(DatasetError, match="bad.png"):
        load_dataset(str(root))
    (root / "cat" / "bad.png").write_bytes(b"")
    with pytest.raises(DatasetError, match="empty.*bad.png|bad.png.*0 bytes"):
        load_dataset(str(root))
    os.unlink(root / "cat" / "bad.png")
    outside = tmp_path / "outside.png"
    Image.fromarray(np.zeros((6, 6), np.uint8)).save(outside)
    os.symlink(outside, root / "dog" / "link.png")
    with pytest.raises(DatasetError, match="outside"):
        load_dataset(str(root))


def test_manifest_and_its_errors(tmp_path):
    root = _tiny_folder(tmp_path / "d")
    man = root / "m.csv"
    man.write_text("path,label\n" + "".join(f"{c}/{i}.png,{c}\n" for c in ("cat", "dog") for i in range(3)))
    ds = load_dataset(str(man))
    assert len(ds) == 6 and ds.classes == ["cat", "dog"] and ds.sample_ids[0] == "cat/0.png"
    man.write_text("path,label,sample_id\ncat/0.png,cat,a\ndog/0.png,dog,a\n")
    with pytest.raises(DatasetError, match="row 3.*duplicate sample_id"):
        load_dataset(str(man))
    man.write_text("path,label\ncat/0.png,cat\n../../etc/passwd,dog\n")
    with pytest.raises(DatasetError, match="row 3.*outside"):
        load_dataset(str(man))
    man.write_text("path,label\ncat/0.png,cat\ndog/0.png,\n")
    with pytest.raises(DatasetError, match="row 3.*empty label"):
        load_dataset(str(man))
    man.write_text("file,class\ncat/0.png,cat\n")
    with pytest.raises(DatasetError, match="missing column"):
        load_dataset(str(man))
    man.write_text("path,label\ncat/9.png,cat\ndog/0.png,dog\n")
    with pytest.raises(DatasetError, match="row 2.*not found"):
        load_dataset(str(man))


def test_torchvision_absent_is_a_clear_error(tmp_path):
    with pytest.raises(DatasetError, match="not found under"):
        load_dataset(f"torchvision:MNIST:{tmp_path}")
    with pytest.raises(DatasetError, match="no dataset named"):
        load_dataset(f"torchvision:NoSuchSet:{tmp_path}")
