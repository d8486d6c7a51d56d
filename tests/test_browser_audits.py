"""In a real browser: three audits started in a row from the Audit page (issue 15 item 1)."""

from __future__ import annotations

import time

import pytest
from test_browser import _browser_first, page, server  # noqa: F401  (fixtures: a real server on a free port, Chromium)

from engine.store.runs import list_runs

pytestmark = [pytest.mark.browser, pytest.mark.slow]


def test_three_audits_in_a_row_in_the_browser(server, page):  # noqa: F811
    from playwright.sync_api import expect

    url, runs = server
    page.goto(url)
    expect(page.get_by_role("button", name="Start audit")).to_be_visible(timeout=60_000)
    started: list[str] = []
    for i in range(3):
        epochs = page.get_by_label("Epochs")
        if not epochs.is_visible():
            page.get_by_text("Training settings").click()
        epochs.fill("2")
        epochs.press("Tab")
        page.get_by_role("button", name="Start audit").click()
        deadline = time.time() + 60
        while len(list_runs(runs)) < i + 1 and time.time() < deadline:
            time.sleep(0.2)
        newest = list_runs(runs)[0].id
        assert newest not in started
        started.append(newest)
        sidebar = page.get_by_test_id("stSidebar")
        expect(sidebar.get_by_role("combobox")).to_have_value(newest, timeout=30_000)
        expect(page.locator("h3").filter(has_text=newest)).to_be_visible(timeout=30_000)  # its live progress
        assert page.get_by_test_id("stException").count() == 0
    assert len(list_runs(runs)) == 3
    page.reload()  # the newest run stays chosen (it is in the URL) and its progress is still live
    expect(page.get_by_test_id("stSidebar").get_by_role("combobox")).to_have_value(started[-1], timeout=60_000)
    expect(page.locator("h3").filter(has_text=started[-1])).to_be_visible(timeout=60_000)
    assert page.get_by_test_id("stException").count() == 0
