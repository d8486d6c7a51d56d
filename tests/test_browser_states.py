"""In a real browser: the sidebar tells a queued audit from a running one, and follows both without a click."""

from __future__ import annotations

import time

import pytest
from test_browser import ARTIFACTS, _browser_first, page, server  # noqa: F401  (fixtures: a real server, Chromium)

from engine.store.runs import list_runs

pytestmark = [pytest.mark.browser, pytest.mark.slow]


def _start(pg, epochs: int) -> None:
    box = pg.get_by_label("Epochs")
    if not box.is_visible():
        pg.get_by_text("Training settings").click()
    box.fill(str(epochs))
    box.press("Tab")
    pg.get_by_role("button", name="Start audit").click()


def test_sidebar_says_queued_then_running_on_any_page(server, page):  # noqa: F811
    from playwright.sync_api import expect

    url, runs = server
    page.goto(url)
    expect(page.get_by_role("button", name="Start audit")).to_be_visible(timeout=60_000)
    _start(page, 20)  # the first audit keeps the single worker busy for a while ...
    deadline = time.time() + 60
    while len(list_runs(runs)) < 1 and time.time() < deadline:
        time.sleep(0.2)
    first = list_runs(runs)[0]
    sidebar = page.get_by_test_id("stSidebar")
    expect(sidebar.get_by_role("combobox")).to_have_value(first.id, timeout=30_000)
    _start(page, 2)  # ... so the second waits in the queue
    while len(list_runs(runs)) < 2 and time.time() < deadline:
        time.sleep(0.2)
    second = list_runs(runs)[0]
    expect(sidebar.get_by_role("combobox")).to_have_value(second.id, timeout=30_000)
    state = sidebar.get_by_test_id("stMarkdownContainer").filter(has_text="State:")
    expect(state).to_contain_text("pending · queued, 1 job(s) ahead", timeout=30_000)
    expect(page.locator("h3").filter(has_text=second.id)).to_contain_text("pending (queued, 1 job(s) ahead)")
    assert first.raw_status()["state"] in ("running", "pending"), "the first audit ended before the check"
    page.screenshot(path=ARTIFACTS / "states-01-queued.png", full_page=True)

    # On a page without progress polling (the AUM page), the sidebar follows the queued run as it starts and ends.
    page.get_by_role("link", name="AUM").click()
    expect(page.get_by_test_id("stMain").get_by_test_id("stHeading").first).to_contain_text("Area Under the Margin",
                                                                                 timeout=30_000)
    expect(state).to_contain_text("pending · queued", timeout=10_000)
    expect(state).not_to_contain_text("queued", timeout=300_000)  # the first audit ended: the second started
    expect(state).to_contain_text("done", timeout=300_000)
    all_runs = sidebar.get_by_test_id("stExpander").filter(has_text="All runs")
    all_runs.get_by_text("All runs").click()
    expect(all_runs.locator("li").filter(has_text=first.id)).to_contain_text("done", timeout=30_000)
    page.screenshot(path=ARTIFACTS / "states-02-done.png", full_page=True)
    assert page.get_by_test_id("stException").count() == 0
