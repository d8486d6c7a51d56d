"""The browser tests cannot pass unnoticed without a browser: skipped locally, failed under CI."""

from __future__ import annotations

import pytest
from conftest import CHROMIUM_ENV, chromium_path


def test_missing_browser_fails_under_ci_and_skips_elsewhere(tmp_path, monkeypatch):
    monkeypatch.setenv(CHROMIUM_ENV, str(tmp_path / "nope"))
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="CI is set"):
        chromium_path()
    monkeypatch.delenv("CI")
    with pytest.raises(pytest.skip.Exception, match="no Chromium at"):
        chromium_path()
    browser = tmp_path / "chromium"
    browser.write_text("")
    monkeypatch.setenv(CHROMIUM_ENV, str(browser))
    assert chromium_path() == str(browser)

