"""The review loop in a real browser: keyboard decisions, focus, undo, the label matrix, hostile dataset names.

Debian's Chromium driven by Playwright against `streamlit run app.py` on a random port, on real audits
(digits, 2 epochs; an image folder whose class and file names are hostile).
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
from test_browser import _browser_first, server  # noqa: F401  (fixtures: browser gate, a real server on a free port)

ROOT = Path(__file__).resolve().parent.parent
ARTIFACTS = ROOT / "test-artifacts"

pytestmark = pytest.mark.browser


@pytest.fixture
def browser(chromium):
    from playwright.sync_api import sync_playwright

    ARTIFACTS.mkdir(exist_ok=True)
    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=chromium,
                               args=["--no-sandbox", "--disable-gpu", "--disable-background-networking"])
        yield b
        b.close()


def _wait_idle(page, timeout: int = 60_000) -> None:
    """Until the app's script (or fragment) run has finished."""
    page.wait_for_selector("[data-testid='stApp'][data-test-script-state='notRunning']", timeout=timeout)
    page.wait_for_timeout(300)


def _focused_id(page) -> str:
    return page.locator(".st-key-focus-card [data-testid='stMarkdownContainer'] strong").first.inner_text()


def _poll(fn, timeout: float = 30.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = fn()
        if value:
            return value
        time.sleep(0.3)
    return fn()


def test_keyboard_review_and_matrix_journey(server, browser):  # noqa: F811
    """Decide by key, the next undecided sample is focused, undo by key; one matrix click filters the gallery."""
    from playwright.sync_api import expect

    from engine.review.reviews import ReviewStore
    from engine.scores.confusion import label_matrix
    from engine.training import audit
    from engine.training.config import AuditConfig

    url, runs = server
    run, ds = audit.prepare(AuditConfig(dataset="digits", noise=0.1, epochs=2, seed=5), runs)
    audit.execute(run, ds)
    samples, scores = run.samples(), run.scores()
    store = ReviewStore(run.path)

    page = browser.new_page(viewport={"width": 1400, "height": 1100})
    page.goto(f"{url}/flagged?run={run.id}&reviewer=ann")
    expect(page.get_by_text("Focused sample").first).to_be_visible(timeout=60_000)
    _wait_idle(page)
    assert page.locator("[data-testid='stException']").count() == 0
    expect(page.get_by_test_id("stSidebar").get_by_test_id("stTextInputField")).to_have_value("ann")
    first = _focused_id(page)
    by_id = {s: k for k, s in enumerate(samples["sample_id"])}
    assert first in by_id

    # X = remove: saved at once with the reviewer's name, the next undecided sample is focused.
    page.get_by_role("heading", name="Flagged samples").click()  # keyboard focus on the page, not in an input
    page.keyboard.press("x")
    saved = _poll(lambda: first in set(store.current()["sample_id"]))
    assert saved, "the key X did not save a decision"
    _wait_idle(page)
    expect(page.locator(".st-key-focus-card [data-testid='stMarkdownContainer'] strong").first).not_to_have_text(
        first, timeout=20_000)
    second = _focused_id(page)
    assert second not in set(store.current()["sample_id"])  # the focus went to an undecided sample
    hist = store.history()
    assert hist["decision"].iat[-1] == "remove" and hist["reviewer"].iat[-1] == "ann"
    card = page.locator(f".st-key-card-{by_id[first]}")
    expect(card.get_by_text("Remove")).to_be_visible(timeout=20_000)  # the decided card says so
    page.screenshot(path=ARTIFACTS / "review-01-after-key.png", full_page=True)

    # K = keep on the new focus, then Z twice: both decisions withdrawn, the focus back on the first.
    page.keyboard.press("k")
    assert _poll(lambda: second in set(store.current()["sample_id"]))
    _wait_idle(page)
    page.keyboard.press("z")
    assert _poll(lambda: second not in set(store.current()["sample_id"]))
    _wait_idle(page)
    page.keyboard.press("z")
    assert _poll(lambda: store.current().empty)
    _wait_idle(page)
    expect(page.locator(".st-key-focus-card [data-testid='stMarkdownContainer'] strong").first).to_have_text(
        first, timeout=20_000)
    expect(card.get_by_text("Not decided")).to_be_visible(timeout=20_000)

    # N = next, P = previous.
    page.keyboard.press("n")
    _wait_idle(page)
    expect(page.locator(".st-key-focus-card [data-testid='stMarkdownContainer'] strong").first).not_to_have_text(
        first, timeout=20_000)
    page.keyboard.press("p")
    _wait_idle(page)
    expect(page.locator(".st-key-focus-card [data-testid='stMarkdownContainer'] strong").first).to_have_text(
        first, timeout=20_000)

    # One click on a cell of the given-vs-suggested matrix filters the gallery to that cell.
    classes = run.classes()
    m = label_matrix(samples["label"].to_numpy(), scores["suggested_label"].to_numpy(), scores["flagged"].to_numpy(),
                     len(classes))
    g, s = (int(v[0]) for v in np.nonzero(m))  # the first point of the matrix trace
    point = page.locator(".st-key-label-matrix .scatterlayer .points path").first
    point.scroll_into_view_if_needed()
    box = point.bounding_box()  # Plotly's drag layer takes the click, as it does for a user's mouse
    page.mouse.click(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)
    metric = page.get_by_test_id("stMetric").filter(has_text="Matching the filters")
    expect(metric).to_contain_text(f"{m[g, s]:,}", timeout=30_000)
    expect(page.get_by_test_id("stMultiSelect").filter(has_text="Given label")).to_contain_text(classes[g])
    expect(page.get_by_test_id("stMultiSelect").filter(has_text="Suggested label")).to_contain_text(classes[s])
    focused = _focused_id(page)
    k = by_id[focused]
    assert samples["label"].iat[k] == g and scores["suggested_label"].iat[k] == s
    page.screenshot(path=ARTIFACTS / "review-02-matrix-filter.png", full_page=True)
    assert page.locator("[data-testid='stException']").count() == 0

    # A click on a point of the data map opens that sample, focused, on the Flagged page.
    page.get_by_role("link", name="Data map").click()
    page.wait_for_selector(".st-key-datamap .js-plotly-plot .main-svg", timeout=60_000)
    _wait_idle(page)
    x, y, idx = page.evaluate("""() => { const gd = document.querySelector('.st-key-datamap .js-plotly-plot');
      const fl = gd._fullLayout, t = gd._fullData[0], r = gd.getBoundingClientRect(), k = 7;
      return [r.left + fl._size.l + fl.xaxis.l2p(t.x[k]), r.top + fl._size.t + fl.yaxis.l2p(t.y[k]), t.customdata[k]]; }""")
    page.mouse.click(x, y)
    expect(page.locator(".st-key-focus-card [data-testid='stMarkdownContainer'] strong").first).to_have_text(
        samples["sample_id"].iat[int(idx)], timeout=30_000)
    assert page.url.split("?")[0].endswith("/flagged")

    # The same page in the dark theme (the browser's preference).
    dark = browser.new_page(viewport={"width": 1400, "height": 1100}, color_scheme="dark")
    dark.goto(f"{url}/flagged?run={run.id}&reviewer=ann")
    expect(dark.get_by_text("Focused sample").first).to_be_visible(timeout=60_000)
    dark.wait_for_selector(".st-key-label-matrix .main-svg", timeout=60_000)
    _wait_idle(dark)
    dark.wait_for_function("() => !document.querySelector('[data-testid=\"stSkeleton\"]') && "
                           "[...document.querySelectorAll('img')].every(i => i.complete)", timeout=60_000)
    dark.screenshot(path=ARTIFACTS / "review-03-dark.png", full_page=True)


HOSTILE_CLASSES = [
    '<img src=x onerror="document.title=1">',
    "<b id=pwn>bold",  # a folder name cannot hold a slash: no closing tag, still an element if parsed as HTML
    "[click](javascript:alert(1))",
    "=cmd|' \\C calc'!A0",
    "ünïcødé ✓ 名字",
    "L" * 180,
]
HOSTILE_FILES = ['<img src=x onerror="alert(2)">', "![x](x)", "javascript:alert(3)", "..\\..\\etc", "=HYPERLINK(1)",
                 "-1", "ok"]


def _hostile_folder(root: Path) -> None:
    from PIL import Image
    from sklearn.datasets import load_digits

    d = load_digits()
    for c, name in enumerate(HOSTILE_CLASSES):
        folder = root / name
        folder.mkdir(parents=True)
        idx = np.flatnonzero(d.target == c)[:25]
        for k, i in enumerate(idx):
            stem = HOSTILE_FILES[k % len(HOSTILE_FILES)]
            Image.fromarray((d.images[i] * 15).astype("uint8")).save(folder / f"{stem}{k}.png")


def test_hostile_class_and_file_names_are_shown_as_text(server, browser, tmp_path):  # noqa: F811
    """No element injected, no dialog, no script, no javascript: link; the names are displayed as typed."""
    from playwright.sync_api import expect

    from engine.training import audit
    from engine.training.config import AuditConfig

    url, runs = server
    _hostile_folder(tmp_path / "data")
    run, ds = audit.prepare(AuditConfig(dataset=str(tmp_path / "data"), epochs=2, seed=0), runs)
    audit.execute(run, ds)
    assert sorted(run.classes()) == sorted(HOSTILE_CLASSES)

    page = browser.new_page(viewport={"width": 1400, "height": 1100})
    dialogs: list[str] = []
    page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
    injected = "img[src='x'], #pwn, a[href^='javascript'], [onerror]"
    for name in ("flagged", "datamap", "ood", "aum"):
        page.goto(f"{url}/{name}?run={run.id}")
        page.wait_for_selector("[data-testid='stApp']", timeout=60_000)
        page.wait_for_timeout(1500)
        _wait_idle(page)
        assert page.locator("[data-testid='stException']").count() == 0, name
        if name == "flagged":
            focus = page.locator(".st-key-focus-card")
            expect(focus).to_be_visible(timeout=60_000)
            sid = _focused_id(page)
            k = list(run.samples()["sample_id"]).index(sid)
            label = run.classes()[run.samples()["label"].iat[k]]
            assert label in focus.inner_text()  # the class name, as typed
            page.screenshot(path=ARTIFACTS / "review-04-hostile-names.png", full_page=True)
            # every card's id is shown as text (the markdown of the cards does not eat brackets or tags)
            shown = page.locator("[data-testid='stVerticalBlock'] [data-testid='stMarkdownContainer'] strong").all_inner_texts()
            assert set(run.samples()["sample_id"]) & set(shown)
            assert any(("<img" in t or "![x](x)" in t or "javascript:" in t) for t in shown), shown[:12]
            page.get_by_role("heading", name="Flagged samples").click()
            page.keyboard.press("x")  # a decision: the status line quotes the hostile id, as text
            expect(page.locator(".st-key-review-status")).to_contain_text(f"Remove {sid}", timeout=30_000)
        count = page.evaluate(f"() => document.querySelectorAll({injected!r}).length")
        assert count == 0, f"{name}: {count} injected element(s)"
        assert page.title() not in ("1", "2"), f"{name}: a script from a name ran"
    assert not dialogs, dialogs


# The pixel position and row (customdata) of a point of a Plotly chart that no other point lies near, so that a
# click at it can only select that point: Plotly selects the point nearest to the mouse.
ISOLATED_POINT = """(key) => {
  const gd = document.querySelector(`.st-key-${key} .js-plotly-plot`);
  const fl = gd._fullLayout, r = gd.getBoundingClientRect(), pts = [];
  gd._fullData.forEach((t, c) => { if (t.visible !== true || !t.customdata) return;
    for (let k = 0; k < t.x.length; k++) {
      const px = fl.xaxis.l2p(t.x[k]), py = fl.yaxis.l2p(t.y[k]);
      if (isFinite(px) && isFinite(py) && px > 5 && py > 5 && px < fl._size.w - 5 && py < fl._size.h - 5)
        pts.push([r.left + fl._size.l + px, r.top + fl._size.t + py, Number(t.customdata[k])]); } });
  let best = null, gap = -1;
  for (const p of pts) { let d = Infinity;
    for (const q of pts) if (q !== p) d = Math.min(d, Math.hypot(p[0] - q[0], p[1] - q[1]));
    if (d > gap) { gap = d; best = p; } }
  return [best[0], best[1], best[2], gap]; }"""


def _click_isolated_point(page, key: str) -> int:
    """Click the most isolated point of chart ``key``; returns its row."""
    chart = page.locator(f".st-key-{key} .js-plotly-plot")
    chart.scroll_into_view_if_needed()
    page.wait_for_timeout(500)
    x, y, row, gap = page.evaluate(ISOLATED_POINT, key)
    assert gap > 6, f"no isolated point on {key} ({gap:.1f} px)"
    page.mouse.move(x, y)
    page.wait_for_timeout(300)
    page.mouse.click(x, y)
    return int(row)


def test_clicks_on_charts_and_neighbours_open_samples(server, browser):  # noqa: F811
    """Issue 15 item 5: a click on a point of the Scores page's scatter and of the OoD scatter opens that sample,
    focused, on the Flagged page; there, a nearest neighbour's Open button focuses the neighbour."""
    from playwright.sync_api import expect

    from engine.training import audit
    from engine.training.config import AuditConfig

    url, runs = server
    run, ds = audit.prepare(AuditConfig(dataset="digits", noise=0.1, epochs=2, seed=7), runs)
    audit.execute(run, ds)
    ids = run.samples(["sample_id"])["sample_id"]
    page = browser.new_page(viewport={"width": 1400, "height": 1100})
    focused = page.locator(".st-key-focus-card [data-testid='stMarkdownContainer'] strong").first

    for name, key in [("scores", "pair-scatter"), ("ood", "ood-scatter")]:
        page.goto(f"{url}/{name}?run={run.id}")
        page.wait_for_selector(f".st-key-{key} .js-plotly-plot .main-svg", timeout=60_000)
        _wait_idle(page)
        row = _click_isolated_point(page, key)
        expect(focused).to_have_text(ids.iat[row], timeout=30_000)
        assert page.url.split("?")[0].endswith("/flagged"), name
        assert page.locator("[data-testid='stException']").count() == 0, name
        page.screenshot(path=ARTIFACTS / f"review-05-opened-from-{name}.png", full_page=True)

    # The focused sample's nearest neighbours: Open focuses one of them.
    _wait_idle(page)
    neighbour = page.locator("[class*='st-key-nn-0-']").first  # the first neighbour of the given class
    neighbour.scroll_into_view_if_needed()
    nn_row = int(next(c for c in neighbour.get_attribute("class").split()
                      if c.startswith("st-key-nn-0-"))[len("st-key-nn-0-"):])
    neighbour.get_by_role("button", name="Open").click()
    expect(focused).to_have_text(ids.iat[nn_row], timeout=30_000)
    assert page.locator("[data-testid='stException']").count() == 0


def _flagged_page_of_new_run(server, browser, seed: int):  # noqa: F811
    """A fresh 2-epoch digits audit, its review store, and its Flagged page open and idle."""
    from engine.review.reviews import ReviewStore
    from engine.training import audit
    from engine.training.config import AuditConfig

    url, runs = server
    run, ds = audit.prepare(AuditConfig(dataset="digits", noise=0.1, epochs=2, seed=seed), runs)
    audit.execute(run, ds)
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    page.goto(f"{url}/flagged?run={run.id}")
    page.locator("[class*='st-key-cor-'] button").first.wait_for(timeout=60_000)
    _wait_idle(page)
    return ReviewStore(run.path), page


def test_clicks_during_reruns_are_all_saved(server, browser):  # noqa: F811
    """Issue 17 item 6 in the suite: decision buttons of the cards clicked one right after the other, each while the
    rerun of the one before may still run, give one review-history row per click (none coalesced away), and the
    page sees one click event per press (no button re-rendered under the pointer)."""
    import random
    import sys

    sys.path.insert(0, str(ROOT / "bench"))
    from load_test import INSTRUMENT

    store, page = _flagged_page_of_new_run(server, browser, seed=17)
    page.evaluate(INSTRUMENT)
    rng, clicks = random.Random(0), 0
    for _ in range(10):
        buttons = page.locator(f"[class*='st-key-{rng.choice(['cor', 'rem', 'uns', 'mis'])}-'] button >> visible=true")
        buttons.nth(rng.randrange(buttons.count())).click(timeout=30_000)
        clicks += 1
    assert _poll(lambda: len(store.history()) >= clicks, timeout=60), f"{len(store.history())} rows for {clicks} clicks"
    _wait_idle(page)
    presses, events = page.evaluate("() => [window.__decisionPresses, window.__decisionClicks]")
    assert (presses, events, len(store.history())) == (clicks, clicks, clicks)
    assert page.locator("[data-testid='stException']").count() == 0


def test_a_saved_decision_covers_no_button(server, browser):  # noqa: F811
    """A user's click on a card's button right after a decision is saved reaches it. The page said "saved" with a
    toast, which Streamlit pops up at the top right for 4 s, over the right-hand cards' buttons: a click there
    went to the toast and no decision was saved."""
    store, page = _flagged_page_of_new_run(server, browser, seed=19)
    target = page.locator("[class*='st-key-cor-'] button >> visible=true").nth(3)  # the first row's right-hand card
    to_top = """e => { e.scrollIntoView({block: 'start'});
      let p = e.parentElement; while (p && p.scrollTop === 0) p = p.parentElement;
      (p || document.scrollingElement).scrollBy(0, -90); }"""  # 90 px below the top, at the right: a toast's place
    page.get_by_role("heading", name="Flagged samples").click()  # keyboard focus on the page, not in an input
    target.evaluate(to_top)
    page.keyboard.press("u")  # decide the focused sample by key: saved, and said so
    assert _poll(lambda: len(store.history()) == 1)
    _wait_idle(page)
    target.evaluate(to_top)
    box = target.bounding_box()
    assert box["y"] < 150 and box["x"] > 1000, box
    page.mouse.click(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)  # where the user sees the button
    assert _poll(lambda: len(store.history()) == 2, timeout=30), "the click on the card's Keep button was lost"
    _wait_idle(page)
    assert page.get_by_test_id("stToast").count() == 0
    assert "Undo with Z" in page.locator(".st-key-review-status").inner_text()  # the step is said in the page
    page.screenshot(path=ARTIFACTS / "review-08-status-line.png")


def _edit_table_cell(page, row: int, column: int, text: str) -> None:
    """Type ``text`` into the selectbox cell at ``row`` (0 = first data row) and ``column`` (0 = sample_id) of the
    Flagged page's editable table: click the row's sample_id cell, move with the arrow keys, Enter opens the
    cell's editor, the typed option is chosen with Enter."""
    grid = page.locator("[data-testid='stDataFrame']").last  # the per-class table comes first
    grid.scroll_into_view_if_needed()
    box = grid.bounding_box()
    page.mouse.click(box["x"] + 120, box["y"] + 35 + 52 * row + 26)  # header 35 px, rows 52 px, image column ~75 px
    page.wait_for_timeout(300)
    for _ in range(column):
        page.keyboard.press("ArrowRight")
    page.keyboard.press("Enter")
    page.wait_for_timeout(500)
    page.keyboard.type(text)
    page.keyboard.press("Enter")


def test_table_edits_are_saved_as_decisions(server, browser):  # noqa: F811
    """Issue 15 item 4: the table view's decision and new-label cells save decisions into reviews.sqlite."""
    from playwright.sync_api import expect

    from engine.review.reviews import ReviewStore
    from engine.training import audit
    from engine.training.config import AuditConfig

    url, runs = server
    run, ds = audit.prepare(AuditConfig(dataset="digits", noise=0.1, epochs=2, seed=11), runs)
    audit.execute(run, ds)
    samples, scores, classes = run.samples(), run.scores(), run.classes()
    shown = np.flatnonzero(scores["flagged"].to_numpy())  # the table: flagged samples, most suspicious first
    shown = shown[np.argsort(scores["rank"].to_numpy()[shown], kind="stable")]
    first, second = (samples["sample_id"].iat[i] for i in shown[:2])
    given, suggested = samples["label"].iat[shown[1]], scores["suggested_label"].iat[shown[1]]
    new_class = next(c for k, c in enumerate(classes) if k not in (given, suggested))
    store = ReviewStore(run.path)

    page = browser.new_page(viewport={"width": 1400, "height": 1100})
    page.goto(f"{url}/flagged?run={run.id}&reviewer=tab")
    expect(page.get_by_text("Focused sample").first).to_be_visible(timeout=60_000)
    _wait_idle(page)
    page.get_by_text("Table", exact=True).click()
    _wait_idle(page)
    expect(page.get_by_text("Edit the decision and new label cells").first).to_be_visible(timeout=30_000)

    _edit_table_cell(page, 0, 3, "remove")  # sample_id, label, suggested_label, decision
    assert _poll(lambda: first in set(store.current()["sample_id"])), "the edited decision was not saved"
    _wait_idle(page)
    _edit_table_cell(page, 1, 3, "mislabeled")  # a relabel: to the suggested label until a new label is chosen
    assert _poll(lambda: second in set(store.current()["sample_id"]))
    _wait_idle(page)
    _edit_table_cell(page, 1, 4, new_class)  # the new label cell
    assert _poll(lambda: (store.current().set_index("sample_id").loc[second, "new_label"] == new_class))
    _wait_idle(page)
    page.screenshot(path=ARTIFACTS / "review-06-table-edits.png", full_page=True)

    now = store.current().set_index("sample_id")
    assert now.loc[first, "decision"] == "remove"
    assert now.loc[second, "decision"] == "mislabeled" and now.loc[second, "new_label"] == new_class
    assert set(now.index) == {first, second}
    hist = store.history()
    assert set(hist["reviewer"]) == {"tab"}  # the reviewer named in the URL
    assert list(hist["sample_id"]) == [first, second, second]  # the relabel's first step (to the suggestion) is kept
    assert hist["new_label"].iat[1] == classes[suggested]
    assert page.locator("[data-testid='stException']").count() == 0


@pytest.mark.slow
def test_cleaned_dataset_round_trip_in_the_browser(server, browser, tmp_path):  # noqa: F811
    """Issue 15 item 6 as a user does it: decide by key, download the cleaned dataset (zip), upload that zip on the
    Audit page and audit it: the removed sample is absent, the relabelled one sits in its new class."""
    from playwright.sync_api import expect

    from engine.review.reviews import ReviewStore
    from engine.store.runs import list_runs
    from engine.training import audit
    from engine.training.config import AuditConfig

    url, runs = server
    run, ds = audit.prepare(AuditConfig(dataset="digits", noise=0.1, epochs=2, seed=13), runs)
    audit.execute(run, ds)
    classes, n = run.classes(), len(run.samples(["sample_id"]))
    store = ReviewStore(run.path)

    page = browser.new_page(viewport={"width": 1400, "height": 1100})
    page.goto(f"{url}/flagged?run={run.id}&reviewer=ann")
    expect(page.get_by_text("Focused sample").first).to_be_visible(timeout=60_000)
    _wait_idle(page)
    page.get_by_role("heading", name="Flagged samples").click()  # keyboard focus on the page
    removed = _focused_id(page)
    page.keyboard.press("x")
    assert _poll(lambda: removed in set(store.current()["sample_id"]))
    _wait_idle(page)
    expect(page.locator(".st-key-focus-card [data-testid='stMarkdownContainer'] strong").first).not_to_have_text(
        removed, timeout=20_000)
    relabelled = _focused_id(page)
    page.keyboard.press("s")
    assert _poll(lambda: relabelled in set(store.current()["sample_id"]))
    new_label = store.current().set_index("sample_id").loc[relabelled, "new_label"]
    _wait_idle(page)

    with page.expect_download(timeout=120_000) as dl:
        page.get_by_role("button", name="Cleaned dataset (image folder, zip)").click()
    cleaned = tmp_path / "cleaned.zip"
    dl.value.save_as(cleaned)

    page.get_by_role("link", name="Audit", exact=True).click()
    page.get_by_text("Upload a zip of an image folder").click()
    page.get_by_test_id("stFileUploaderDropzoneInput").set_input_files(str(cleaned))
    expect(page.get_by_text("cleaned.zip")).to_be_visible(timeout=30_000)
    page.get_by_text("Training settings").click()
    epochs = page.get_by_label("Epochs")
    epochs.fill("1")
    epochs.press("Tab")
    page.get_by_role("button", name="Start audit").click()
    assert _poll(lambda: len(list_runs(runs)) == 2, timeout=120), "no second audit started"
    again = list_runs(runs)[0]
    expect(page.locator("h3").filter(has_text=again.id)).to_be_visible(timeout=60_000)  # the page follows it
    assert _poll(lambda: again.status()["state"] not in ("pending", "running"), timeout=600)
    assert again.status()["state"] == "done", again.status().get("error")
    expect(page.get_by_text("Done:")).to_be_visible(timeout=60_000)
    assert page.locator("[data-testid='stException']").count() == 0
    page.screenshot(path=ARTIFACTS / "review-07-round-trip-audit.png", full_page=True)

    samples = again.samples(["sample_id", "label"])
    label_of = {sid.rsplit("/", 1)[-1].removesuffix(".png"): again.classes()[k]
                for sid, k in zip(samples["sample_id"], samples["label"], strict=True)}
    assert len(label_of) == n - 1 and removed not in label_of  # every sample but the removed one
    assert label_of[relabelled] == new_label and new_label in classes
