"""End to end in a real browser: Debian's Chromium driven by Playwright against `streamlit run app.py`."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
ARTIFACTS = ROOT / "test-artifacts"

pytestmark = pytest.mark.browser


@pytest.fixture(autouse=True)
def _browser_first(chromium):
    """Skip (or, under CI, fail) before a server starts when there is no browser (conftest ``chromium``)."""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def server(tmp_path):
    port = _free_port()
    env = dict(os.environ, DIFFICULTY_AUDIT_RUNS=str(tmp_path / "runs"))
    streamlit = shutil.which("streamlit", path=str(Path(sys.executable).parent)) or "streamlit"
    proc = subprocess.Popen(
        [streamlit, "run", "app.py", "--server.headless", "true", "--server.port", str(port),
         "--server.address", "127.0.0.1", "--server.fileWatcherType", "none", "--browser.gatherUsageStats", "false"],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 60
    while time.time() < deadline:
        try:
            if urllib.request.urlopen(f"{url}/_stcore/health", timeout=2).read() == b"ok":
                break
        except OSError:
            time.sleep(0.3)
    else:
        proc.kill()
        pytest.fail(f"streamlit did not answer on {url}: {proc.stdout.read().decode()[-2000:]}")
    yield url, tmp_path / "runs"
    proc.terminate()
    proc.wait(timeout=20)


@pytest.fixture
def page(chromium):
    from playwright.sync_api import sync_playwright

    ARTIFACTS.mkdir(exist_ok=True)
    with sync_playwright() as pw:
        browser = pw.chromium.launch(
            executable_path=chromium, args=["--no-sandbox", "--disable-gpu", "--disable-background-networking"]
        )
        pg = browser.new_page(viewport={"width": 1400, "height": 1000})
        yield pg
        browser.close()


def test_first_audit_journey(server, page):
    from playwright.sync_api import expect

    url, runs = server
    page.goto(url)
    expect(page.get_by_text("No audit yet")).to_be_visible(timeout=30_000)
    expect(page.get_by_text("Labels to flip on purpose")).to_be_visible(timeout=30_000)
    page.screenshot(path=ARTIFACTS / "01-first-visit.png", full_page=True)
    page.get_by_role("button", name="Start audit").click()
    expect(page.get_by_text("Done:")).to_be_visible(timeout=300_000)  # ~20 s on an idle 2-core machine
    page.screenshot(path=ARTIFACTS / "02-audit-done.png", full_page=True)
    assert any(runs.iterdir())

    page.get_by_role("link", name="AUM", exact=True).click()
    expect(page.get_by_text("Area Under the Margin").first).to_be_visible(timeout=30_000)
    expect(page.locator(".js-plotly-plot").first).to_be_visible(timeout=30_000)
    page.screenshot(path=ARTIFACTS / "03-aum.png", full_page=True)
    flagged_before = page.get_by_test_id("stMetric").filter(has_text="Flagged").inner_text()
    page.get_by_text("Value", exact=True).click()
    slider = page.get_by_role("slider").first
    slider.focus()
    for _ in range(40):
        page.keyboard.press("ArrowRight")
    expect(page.get_by_test_id("stMetric").filter(has_text="Flagged")).not_to_have_text(flagged_before, timeout=20_000)
    page.screenshot(path=ARTIFACTS / "04-aum-cutoff-moved.png", full_page=True)
    page.get_by_role("button", name="Save as the run's policy").click()  # the cut-off becomes the run's policy
    expect(page.get_by_text("This is the run's saved policy")).to_be_visible(timeout=20_000)

    page.get_by_role("link", name="Data map").click()
    expect(page.locator(".js-plotly-plot").first).to_be_visible(timeout=30_000)
    expect(page.get_by_text("(value)").first).to_be_visible(timeout=20_000)  # the saved policy, on every page
    page.screenshot(path=ARTIFACTS / "05-datamap.png", full_page=True)

    page.reload()  # a reload keeps the chosen run (it is in the URL)
    expect(page.locator(".js-plotly-plot").first).to_be_visible(timeout=30_000)


def test_review_and_export_journey(server, page, tmp_path):
    """Open a finished audit's flagged gallery, decide three samples, reload, download both exports."""
    import csv
    import re

    from playwright.sync_api import expect

    from engine.review.reviews import ReviewStore
    from engine.training import audit
    from engine.training.config import AuditConfig

    url, runs = server
    run, ds = audit.prepare(AuditConfig(noise=0.1, epochs=8), runs)
    audit.execute(run, ds)
    page.goto(f"{url}/flagged?run={run.id}")
    expect(page.get_by_text("Reviewed / flagged")).to_be_visible(timeout=30_000)
    cards = page.locator("[class*='st-key-card-']")  # a card: the container keyed card-<row>
    expect(cards.first).to_be_visible(timeout=30_000)
    page.screenshot(path=ARTIFACTS / "06-flagged.png", full_page=True)
    for n, action in enumerate(["mis", "rem", "cor"]):  # relabel to suggested, remove, keep: the card's buttons
        row = next(c[len("st-key-card-"):] for c in cards.nth(n).get_attribute("class").split()
                   if c.startswith("st-key-card-"))
        page.locator(f".st-key-{action}-{row} button").first.click()
        page.wait_for_timeout(1200)
    decided_cards = cards.filter(has_text=re.compile(r"Relabel →|Remove|Keep"))
    expect(decided_cards).to_have_count(3, timeout=10_000)  # each decided card carries its decision's badge
    decided = ReviewStore(run.path).current()
    assert sorted(decided["decision"]) == ["correct", "mislabeled", "remove"]

    page.reload()
    expect(decided_cards).to_have_count(3, timeout=30_000)
    page.screenshot(path=ARTIFACTS / "07-flagged-after-reload.png", full_page=True)

    with page.expect_download() as dl:
        page.get_by_role("button", name="Flagged list with scores and decisions").click()
    flagged_path = tmp_path / dl.value.suggested_filename
    dl.value.save_as(flagged_path)
    rows = list(csv.DictReader(open(flagged_path)))
    assert len(rows) == run.summary()["n_flagged"]
    assert sorted(r["decision"] for r in rows if r["decision"]) == ["correct", "mislabeled", "remove"]
    with page.expect_download() as dl:
        page.get_by_role("button", name="Cleaned manifest (path,label)").click()
    manifest = list(csv.DictReader(open(dl.value.path())))
    removed = decided.set_index("decision").loc["remove", "sample_id"]
    relabeled = decided.set_index("decision").loc[["mislabeled"]].iloc[0]
    assert len(manifest) == 1796 and removed not in {r["sample_id"] for r in manifest}
    assert next(r for r in manifest if r["sample_id"] == relabeled["sample_id"])["label"] == relabeled["new_label"]
    page.goto(f"{url}/flagged?run={run.id}")
    expect(page.get_by_text("Reviewed / flagged")).to_be_visible(timeout=30_000)

    # Bring your own scores: the sample CSV joins to this run; a malformed file is refused with a reason.
    page.get_by_role("link", name="Scores").click()
    expect(page.get_by_text("Correlation between scores")).to_be_visible(timeout=30_000)
    page.get_by_text("Import predefined scores from a CSV").click()
    with page.expect_file_chooser() as fc:
        page.get_by_test_id("stFileUploaderDropzone").get_by_test_id("stBaseButton-secondary").click()
    fc.value.set_files(str(ROOT / "sample_data" / "predefined_scores.csv"))
    expect(page.get_by_text("predefined_scores.csv: 1,797 rows")).to_be_visible(timeout=30_000)
    # as a user does: click once the page has settled (a button clicked while the upload's script run is still
    # going was seen, once in a full suite, to do nothing)
    page.wait_for_selector("[data-testid='stApp'][data-test-script-state='notRunning']", timeout=60_000)
    page.get_by_role("button", name="Import into this run").click()
    expect(page.get_by_text("Imported knn_disagreement")).to_be_visible(timeout=30_000)
    expect(page.get_by_text("csv:knn_disagreement").first).to_be_visible(timeout=30_000)
    page.get_by_text("Agreement of the most suspicious samples").scroll_into_view_if_needed()
    page.screenshot(path=ARTIFACTS / "09-scores-heatmap.png", full_page=True)
    bad = tmp_path / "malformed.csv"
    bad.write_text("sample_id,score\ndigits-0001,0.5\ndigits-0002,not-a-number\n")
    page.get_by_test_id("stFileUploaderDropzoneInput").set_input_files(str(bad))  # replaces the first file
    page.wait_for_timeout(3000)
    page.get_by_text("Import predefined scores from a CSV").scroll_into_view_if_needed()
    page.screenshot(path=ARTIFACTS / "10-malformed-csv.png", full_page=True)
    expect(page.get_by_text("not numbers")).to_be_visible(timeout=30_000)
