"""Time to open every dashboard page in a real browser for a run of N samples x E epochs, and the server's memory.

``render_pages.py`` times each page's script on the server (AppTest, a fresh process per page). This
script measures what a user waits for: one ``streamlit run app.py`` server (as ``make demo`` starts
it) holding the same synthetic run (``render_pages.make_run``), and headless Chromium opening the
app's URL, then every page by clicking its sidebar link (one browser session, as a user moves
through the app), then every page again. A page counts as shown when its script has run and
finished (``data-test-script-state`` went to ``running`` and back to ``notRunning``), every Plotly
chart has laid out and drawn its SVG and every image has loaded. After each page the server's
resident memory (VmRSS) and peak (VmHWM) are read from ``/proc``: one process serves every page,
so the caches of the pages visited so far add up.

Usage: python bench/browser_pages.py [--samples 1000000] [--epochs 30] [--runs DIR]
(``--runs DIR``: use the run already in DIR, e.g. one kept by ``render_pages.py --keep DIR``, instead of
building one; two versions of the app can then be timed on the same run, one after the other.)
Needs Debian's chromium (``make chromium``, as root) and the playwright package (``.[test]``).
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from render_pages import ROOT, make_run  # noqa: E402

CHROMIUM = os.environ.get("DIFFICULTY_AUDIT_CHROMIUM") or "/usr/bin/chromium"  # as the browser tests
PAGES = ["audit", "aum", "flagged", "scores", "datamap", "ood"]  # app.py's st.Page entries, in sidebar order
WATCH = """() => {  // records that a script run started after this point (page switches stay in one document)
  window.__ran = false;
  const app = document.querySelector('[data-testid="stApp"]');
  new MutationObserver(() => {
    if (app.getAttribute('data-test-script-state') === 'running') window.__ran = true;
  }).observe(app, {attributes: true});
}"""
SCRIPT_DONE = """() => {
  const app = document.querySelector('[data-testid="stApp"]');
  return !!app && window.__ran && app.getAttribute('data-test-script-state') === 'notRunning';
}"""
SHOWN = """() => {
  const app = document.querySelector('[data-testid="stApp"]');
  if (!app || !window.__ran || app.getAttribute('data-test-script-state') !== 'notRunning') return false;
  if (document.querySelector('[data-testid="stSkeleton"]')) return false;
  const plots = [...document.querySelectorAll('.js-plotly-plot')];
  if (!plots.every(p => p._fullLayout && p.querySelector('svg.main-svg'))) return false;
  return [...document.querySelectorAll('img')].every(i => i.complete);
}"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _memory_mb(pid: int) -> tuple[float, float]:
    """(VmRSS, VmHWM) of a process in MB."""
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
    return int(fields["VmRSS"].split()[0]) / 1024, int(fields["VmHWM"].split()[0]) / 1024


def start_server(runs: Path, app: Path = ROOT, env: dict | None = None, stderr=subprocess.DEVNULL,
                 timeout: float = 60) -> tuple[subprocess.Popen, str]:
    """``streamlit run app.py`` of the app folder ``app`` (as ``make demo`` starts it) on a free port, showing the
    runs folder ``runs`` (``env``: more environment variables); returns the process and its URL once healthy.
    The one server start of the browser benches."""
    port = _free_port()
    streamlit = shutil.which("streamlit", path=str(Path(sys.executable).parent)) or "streamlit"
    proc = subprocess.Popen(
        [streamlit, "run", "app.py", "--server.headless", "true", "--server.port", str(port), "--server.address",
         "127.0.0.1", "--server.fileWatcherType", "none", "--browser.gatherUsageStats", "false"],
        cwd=app, env=dict(os.environ, DIFFICULTY_AUDIT_RUNS=str(runs), **(env or {})), stdout=subprocess.DEVNULL,
        stderr=stderr,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            if urllib.request.urlopen(f"{url}/_stcore/health", timeout=2).read() == b"ok":
                return proc, url
        except OSError:
            time.sleep(0.3)
    proc.kill()
    raise SystemExit(f"streamlit did not answer on {url} (app {app})")


def open_url(page, url: str, timeout_ms: int = 120_000) -> float:
    """Go to ``url`` and wait until its first script run has started (so ``SCRIPT_DONE`` / ``SHOWN`` mean that
    run's end); returns the ``time.perf_counter()`` at which the page was asked for."""
    t0 = time.perf_counter()
    page.goto(url)
    page.wait_for_selector('[data-testid="stApp"][data-test-script-state="running"]', timeout=timeout_ms)
    page.evaluate("() => { window.__ran = true; }")
    return t0


def wait(page, t0: float) -> float:
    """Wait until the page is shown; returns the seconds from ``t0`` until its script had finished."""
    page.wait_for_function(SCRIPT_DONE, timeout=120_000, polling=20)
    done = time.perf_counter() - t0
    page.wait_for_function(SHOWN, timeout=120_000, polling=20)
    return done


def report(page, proc: subprocess.Popen, visit: str, name: str, done: float, shown: float) -> None:
    errors = page.locator('[data-testid="stException"]').count()
    charts = page.locator(".js-plotly-plot").count()
    images = page.locator("img").count()
    heap = page.evaluate("() => performance.memory ? performance.memory.usedJSHeapSize : 0") / 2**20
    rss, hwm = _memory_mb(proc.pid)
    flag = f" ({errors} EXCEPTION(S))" if errors else ""
    print(f"| {visit} | {name}{flag} | {done:.2f} | {shown:.2f} | {charts}, {images} | {rss:.0f} / {hwm:.0f} | {heap:.0f} |",
          flush=True)


def main() -> None:
    from playwright.sync_api import sync_playwright

    ap = argparse.ArgumentParser()
    ap.add_argument("--samples", type=int, default=1_000_000)
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--runs", default=None, help="a runs folder holding the run to show (default: build one)")
    args = ap.parse_args()
    if not Path(CHROMIUM).exists():
        raise SystemExit(f"{CHROMIUM} not found: install Debian's chromium (make chromium, as root)")
    with tempfile.TemporaryDirectory() as tmp:
        if args.runs:
            tmp = args.runs
            run_id = next(p.name for p in Path(tmp).iterdir() if (p / "status.json").is_file())
        else:
            run_id = make_run(Path(tmp), args.samples, args.epochs).name
        print(f"load average before: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
        proc, url = start_server(Path(tmp))
        print(f"server pid {proc.pid}, memory at start: {_memory_mb(proc.pid)[0]:.0f} MB")
        print("| visit | page | script done (s) | shown (s) | charts, images | server RSS / peak (MB) | browser JS heap (MB) |\n"
              "|---|---|---|---|---|---|---|")
        try:
            with sync_playwright() as pw:
                browser = pw.chromium.launch(executable_path=CHROMIUM,
                                             args=["--no-sandbox", "--disable-gpu", "--disable-background-networking"])
                page = browser.new_page(viewport={"width": 1400, "height": 1000})
                t0 = open_url(page, f"{url}/?run={run_id}", timeout_ms=60_000)
                done = wait(page, t0)
                report(page, proc, "open", "audit", done, time.perf_counter() - t0)
                for visit in ("first", "again"):
                    for name in PAGES[1:] if visit == "first" else PAGES:
                        page.evaluate(WATCH)
                        t0 = time.perf_counter()
                        page.locator('[data-testid="stSidebarNav"] a').nth(PAGES.index(name)).click()
                        done = wait(page, t0)
                        report(page, proc, visit, name, done, time.perf_counter() - t0)
                browser.close()
        finally:
            proc.terminate()
            proc.wait(timeout=30)
        print(f"load average after: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
