"""Values from datasets shown by the Audit page and the sidebar stay literal text (no markdown links, images, HTML)."""

from __future__ import annotations

import json
from pathlib import Path

from streamlit.testing.v1 import AppTest

from app_pages.common import md_escape
from engine.training import audit
from engine.training.config import AuditConfig

APP = str(Path(__file__).resolve().parent.parent / "app.py")
HOSTILE = "[x](javascript:alert(1)) ![t](http://evil.example/t.png) <img src=x onerror=alert(1)> **b** $x$"


def test_md_escape_escapes_every_markdown_character():
    assert md_escape("a_b [c](d)") == "a\\_b \\[c\\]\\(d\\)"
    assert md_escape("<img src=x>") == "\\<img src\\=x\\>"


def test_a_hostile_dataset_name_is_shown_as_text(monkeypatch, tmp_path):
    run, _ = audit.prepare(AuditConfig(dataset="digits", epochs=1), tmp_path / "runs")
    cfg = json.loads((run.path / "config.json").read_text())
    (run.path / "config.json").write_text(json.dumps(cfg | {"dataset": HOSTILE}))
    run.update_status(state="failed", error=f"DatasetError: class folder {HOSTILE} holds no images")
    monkeypatch.setenv("DIFFICULTY_AUDIT_RUNS", str(tmp_path / "runs"))
    at = AppTest.from_file(APP, default_timeout=60).run()
    assert not at.exception, at.exception
    shown = [c.value for c in at.sidebar.caption] + [e.value for e in at.error]
    assert any(md_escape(HOSTILE) in v for v in shown if v.startswith("Dataset")), shown
    assert any(md_escape(HOSTILE) in v for v in shown if v.startswith("The audit failed")), shown
    assert not any(HOSTILE in v for v in shown)  # never the raw markdown


def test_the_scores_page_shows_a_typed_path_as_text(monkeypatch, tmp_path):
    """The CSV path field's error message quotes the path: as text, not as a markdown link or image."""
    monkeypatch.setenv("DIFFICULTY_AUDIT_DATA_ROOT", str(tmp_path))
    monkeypatch.setenv("DIFFICULTY_AUDIT_RUNS", str(tmp_path / "runs"))
    at = AppTest.from_file(APP, default_timeout=60).run()
    at.switch_page("app_pages/scores.py").run()
    at.text_input(key="predef_path").set_value("![i](x.png) [a](javascript:alert(1)).csv").run()
    assert not at.exception, at.exception
    (error,) = at.error
    assert "\\[a\\]\\(javascript\\:alert\\(1\\)\\)" in error.value and "![i](x.png)" not in error.value, error.value
