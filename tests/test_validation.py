"""Library defaults never change a user's data; bad settings raise, and what the engine changes is recorded."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from engine.training import audit
from engine.training.config import AuditConfig, ConfigError


def test_the_library_default_flips_no_label(tmp_path):
    """``AuditConfig()`` once flipped 10% of a user's labels (noise 0.1); only the demo sets noise now."""
    assert AuditConfig().noise == 0.0
    run, _ = audit.prepare(AuditConfig(epochs=1), tmp_path)
    s = run.samples()
    assert (s["label"] == s["true_label"]).all()
    assert run.config()["noise"] == 0.0


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"epochs": 3, "aum_start": 3}, "aum start 3 must be below the 3 epochs"),
        ({"epochs": 3, "aum_start": 5}, "aum start 5 must be below"),
        ({"epochs": 3, "el2n_epoch": 3}, "el2n epoch 3 must be in 0..2"),
        ({"epochs": 3, "el2n_epoch": -1}, "el2n epoch -1"),
        ({"epochs": 3, "sat": "paper", "sat_warmup": 3}, "sat warm-up 3 must be in 0..2"),
        ({"epochs": 4, "sat": "incerto", "sat_warmup": 9}, "would never start"),
    ],
)
def test_settings_out_of_range_raise_instead_of_being_rewritten(changes, message):
    cfg = AuditConfig(**changes)
    before = cfg.to_dict()
    with pytest.raises(ConfigError, match=message):
        cfg.validate()
    assert cfg.to_dict() == before  # nothing rewritten on the way


def test_the_automatic_aum_start_is_a_documented_rule_not_a_rewrite(tmp_path):
    assert AuditConfig(epochs=1).validate().aum_first_epoch == 0  # a 1-epoch run still gets an AUM
    assert AuditConfig(epochs=5).validate().aum_first_epoch == 1
    assert AuditConfig(epochs=5, aum_start=0).aum_first_epoch == 0
    run, _ = audit.prepare(AuditConfig(epochs=1), tmp_path)
    assert run.config()["aum_start"] == 0  # the run records the epoch it used


def _image(path, size, value):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full(size[::-1], value, np.uint8)).save(path)


def test_mixed_image_sizes_are_resized_with_a_warning_in_the_summary(tmp_path):
    root = tmp_path / "data"
    for i in range(6):
        _image(root / "a" / f"{i}.png", (8, 8), 20 * i)
        _image(root / "b" / f"{i}.png", (12, 10) if i % 2 else (8, 8), 200 - 20 * i)
    cfg = AuditConfig(dataset=str(root), epochs=1, threshold_samples=False)
    run, ds = audit.prepare(cfg, tmp_path / "runs")
    assert ds.images.shape[1:3] == (32, 32)
    summary = audit.execute(run, ds)
    assert summary["warnings"] == run.summary()["warnings"]
    (warning,) = summary["warnings"]
    assert "2 different sizes" in warning and "12x10" in warning and "resized to 32x32" in warning
    assert "--image-size" in warning
    same, ds2 = audit.prepare(AuditConfig(dataset=str(root), epochs=1, image_size=16, threshold_samples=False),
                              tmp_path / "runs")
    assert audit.execute(same, ds2)["warnings"] == []  # a size the user asked for is no surprise


def test_the_audit_page_shows_the_summary_warnings(tmp_path, monkeypatch):
    from pathlib import Path

    from streamlit.testing.v1 import AppTest

    root = tmp_path / "data"
    for i in range(4):
        _image(root / "a" / f"{i}.png", (8, 8), 20 * i)
        _image(root / "b" / f"{i}.png", (10, 10), 200 - 20 * i)
    run, ds = audit.prepare(AuditConfig(dataset=str(root), epochs=1, threshold_samples=False), tmp_path / "runs")
    audit.execute(run, ds)
    monkeypatch.setenv("DIFFICULTY_AUDIT_RUNS", str(tmp_path / "runs"))
    at = AppTest.from_file(str(Path(__file__).resolve().parent.parent / "app.py"), default_timeout=60)
    at.run()
    assert not at.exception, at.exception
    assert any("resized to 32x32" in w.value for w in at.warning), [w.value for w in at.warning]
