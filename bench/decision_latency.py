"""Time of one review decision on the Flagged page at N samples (target: under 150 ms on the server at 1,000,000).

Builds the synthetic run of ``render_pages.make_run`` (N samples x E epochs, 2 passes, samples pointing
at the real PNG files of ``sample_data/digits_folder``) and finalizes its scores with the engine. Then:

1. In process, the engine's share of one decision: ``ReviewStore.record_many`` of one sample plus
   ``DecisionArrays.sync`` (what the page's callback does), with an empty store and again after a
   bulk decision of every flagged sample (a history of that many rows).
2. In a real browser: one ``streamlit run app.py`` server (``DIFFICULTY_AUDIT_TIMINGS=1``: the page
   prints the server-side time of each decision, from the start of its callback to the end of the
   rerun it causes), headless Chromium on the Flagged page, then R decisions by keyboard (K = keep,
   U = unsure, alternating). Each is also timed from the key press until the browser sees the script
   run finished (``data-test-script-state`` went to ``running`` and back to ``notRunning``): server
   plus websocket round trip. Side by side, the same page's full rerun (key R), which is what a
   decision cost before the review fragment.

Usage: python bench/decision_latency.py [--samples 1000000] [--epochs 30] [--repeats 15]
Needs Debian's chromium (``make chromium``, as root) and the playwright package (``.[test]``).
"""

from __future__ import annotations

import argparse
import math
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import browser_pages  # noqa: E402
from browser_pages import CHROMIUM, SCRIPT_DONE, SHOWN, WATCH  # noqa: E402
from render_pages import make_run  # noqa: E402


def start_server(runs: Path, log: Path) -> tuple[subprocess.Popen, str]:
    """``streamlit run app.py`` as ``make demo`` starts it, with the page's decision timings on stderr (``log``)."""
    return browser_pages.start_server(runs, env={"DIFFICULTY_AUDIT_TIMINGS": "1"}, stderr=open(log, "w"))


def _stats(xs: list[float]) -> str:
    ms = sorted(1000 * x for x in xs)
    p90 = ms[math.ceil(0.9 * len(ms)) - 1]  # nearest rank (the index it replaced gave the minimum for 2 runs)
    return f"median {statistics.median(ms):.0f} ms, p90 {p90:.0f} ms, max {ms[-1]:.0f} ms"


def engine_share(run_path: Path, repeats: int) -> list[float]:
    """Seconds of record_many(one sample) + DecisionArrays.sync, as the page's callback runs them."""
    import pyarrow.parquet as pq

    from engine.review.reviews import DecisionArrays, ReviewStore

    ids = pq.read_table(run_path / "samples.parquet", columns=["sample_id"]).column("sample_id").to_pandas()
    classes = [str(c) for c in range(10)]
    store = ReviewStore(run_path)
    arr = DecisionArrays(store, ids.to_numpy(), classes)
    arr.sync()
    arr.index.get_indexer(ids.iloc[:1])  # the id index is built once per run and server
    times = []
    for k in range(repeats):
        t0 = time.perf_counter()
        store.record_many([(ids.iat[1000 + k], "correct" if k % 2 else "unsure", None)], session="bench", reviewer="bench")
        arr.sync()
        times.append(time.perf_counter() - t0)
    return times


def browser_decisions(url: str, run_id: str, repeats: int) -> tuple[list[float], list[float], float]:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM,
                                     args=["--no-sandbox", "--disable-gpu", "--disable-background-networking"])
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        t0 = browser_pages.open_url(page, f"{url}/flagged?run={run_id}&reviewer=bench")
        page.wait_for_function(SHOWN, timeout=300_000, polling=20)
        first = time.perf_counter() - t0
        page.get_by_role("heading", name="Flagged samples").click()  # keyboard focus on the page
        decisions, full = [], []
        for k in range(repeats + 1):
            page.evaluate(WATCH)
            t0 = time.perf_counter()
            page.keyboard.press("k" if k % 2 else "u")
            page.wait_for_function(SCRIPT_DONE, timeout=60_000, polling=5)
            if k:  # the first decision also warms the fragment's caches
                decisions.append(time.perf_counter() - t0)
            page.wait_for_function(SHOWN, timeout=60_000, polling=20)
        for _ in range(max(3, repeats // 3)):
            page.evaluate(WATCH)
            t0 = time.perf_counter()
            page.keyboard.press("r")  # Streamlit's own shortcut: rerun the whole page
            page.wait_for_function(SCRIPT_DONE, timeout=120_000, polling=5)
            full.append(time.perf_counter() - t0)
            page.wait_for_function(SHOWN, timeout=60_000, polling=20)
        assert page.locator('[data-testid="stException"]').count() == 0, "the page showed an exception"
        browser.close()
    return decisions, full, first


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--samples", type=int, default=1_000_000)
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--repeats", type=int, default=15)
    args = ap.parse_args()
    if not Path(CHROMIUM).exists():
        raise SystemExit(f"{CHROMIUM} not found: install Debian's chromium (make chromium, as root)")
    from engine.review.reviews import ReviewStore
    from engine.store.runs import Run
    from engine.training.audit import finalize

    with tempfile.TemporaryDirectory() as tmp:
        path = make_run(Path(tmp), args.samples, args.epochs, do_finalize=False)
        t0 = time.perf_counter()
        finalize(Run(path))
        print(f"synthetic run: {args.samples:,} samples x {args.epochs} epochs x 2 passes, finalized in "
              f"{time.perf_counter() - t0:.1f} s")
        print(f"engine share, empty store: {_stats(engine_share(path, args.repeats))}")
        run = Run(path)
        scores, samples = run.scores(["flagged"]), run.samples(["sample_id"])
        flagged_ids = samples["sample_id"].to_numpy()[scores["flagged"].to_numpy()]
        t0 = time.perf_counter()
        ReviewStore(path).record_many([(s, "unsure", None) for s in flagged_ids], session="bulk", reviewer="bulk")
        print(f"bulk decision of the {len(flagged_ids):,} flagged samples (one batch): {time.perf_counter() - t0:.1f} s")
        print(f"engine share, {len(flagged_ids):,} rows of history: {_stats(engine_share(path, args.repeats))}")

        log = Path(tmp) / "server.log"
        proc, url = start_server(Path(tmp), log)
        try:
            decisions, full, first = browser_decisions(url, path.name, args.repeats)
        finally:
            proc.terminate()
            proc.wait(timeout=30)
        found = re.findall(r"decision-ms ([0-9.]+) cpu-ms ([0-9.]+)", log.read_text())[1:]
        server, cpu = [float(w) / 1000 for w, _ in found], [float(c) / 1000 for _, c in found]
        print(f"first visit of the Flagged page (fresh server, shown): {first:.2f} s")
        print(f"one decision by key, server side (callback + fragment rerun), {len(server)} runs: {_stats(server)}")
        print(f"  of which CPU time of the script thread: {_stats(cpu)}")
        print(f"load average during the bench: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
        print(f"one decision by key, key press -> script done in the browser, {len(decisions)} runs: "
              f"{_stats(decisions)}")
        print(f"whole-page rerun (key R), {len(full)} runs: {_stats(full)}")
        print(f"ratio decision / whole page (medians): {np.median(decisions) / np.median(full):.2f}")


if __name__ == "__main__":
    main()
