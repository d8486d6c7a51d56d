"""Uploaded zips: a failed extraction leaves nothing behind; concurrent uploads of one zip do not collide."""

from __future__ import annotations

import io
import threading
import zipfile
from pathlib import Path

import pytest

from engine.data.datasets import DatasetError
from engine.data.uploads import extract_image_zip

FOLDER = Path(__file__).resolve().parent.parent / "sample_data" / "digits_folder"


def _zip(entries: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, data in entries.items():
            zf.writestr(name, data)
    return buf.getvalue()


def test_a_failed_extraction_leaves_nothing_and_says_why(tmp_path):
    png = (FOLDER / "0" / "digit_0048.png").read_bytes()
    data = _zip({"d/0/a.png": png, "d/0/a.png/b.png": png})  # the second needs the first file to be a folder
    with pytest.raises(DatasetError, match="cannot extract"):
        extract_image_zip(data, tmp_path / "uploads")
    assert list((tmp_path / "uploads").iterdir()) == []


def test_concurrent_uploads_of_one_zip_extract_once_and_completely(tmp_path):
    files = sorted(FOLDER.rglob("*.png"))
    data = _zip({f"digits/{p.parent.name}/{p.name}": p.read_bytes() for p in files})
    results, errors = [], []

    def upload():
        try:
            results.append(extract_image_zip(data, tmp_path / "uploads"))
        except Exception as exc:  # noqa: BLE001 - the test reports any failure
            errors.append(exc)

    threads = [threading.Thread(target=upload) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert len(set(results)) == 1
    (root,) = set(results)
    assert len(list(root.rglob("*.png"))) == len(files)
    assert [p.name for p in (tmp_path / "uploads").iterdir()] == [root.parent.name]  # no .partial left
