"""First open of the dashboard on a fresh server, two versions of the app side by side.

    .venv/bin/python bench/first_open.py --apps /work/main . [--repeats 3] [--samples 20000]

For each repeat and each app folder in turn (alternating, so both see the same machine load), starts a
fresh ``streamlit run app.py`` from that folder (its own ``engine`` first on the path) on one synthetic
run (``render_pages.make_run``), opens the app's URL (the Audit page, the default) in a fresh Chromium
context and times, from the request: the script done (``data-test-script-state`` back to
``notRunning``) and the page shown (charts drawn, images loaded), as ``browser_pages.py`` does for its
"open audit" row. Prints each time, the medians, the ratio of the medians and the load average.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from browser_pages import CHROMIUM, open_url, start_server, wait  # noqa: E402
from render_pages import make_run  # noqa: E402


def _server(app: Path, runs: Path) -> tuple[subprocess.Popen, str]:
    """A fresh server of the app folder ``app`` (its own code first on the path) showing ``runs``."""
    return start_server(runs, app=app, env={"PYTHONPATH": str(app)}, timeout=120)


def _open(browser, url: str, run_id: str) -> tuple[float, float, int]:
    """(script done s, shown s, exceptions) of the first open of ``url``."""
    context = browser.new_context(viewport={"width": 1400, "height": 1000})  # empty cache: a first visit
    page = context.new_page()
    t0 = open_url(page, f"{url}/?run={run_id}")
    done = wait(page, t0)
    shown = time.perf_counter() - t0
    errors = page.locator('[data-testid="stException"]').count()
    context.close()
    return done, shown, errors


def main() -> None:
    from playwright.sync_api import sync_playwright

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--apps", nargs="+", required=True, help="folders holding app.py (e.g. /work/main and .)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--samples", type=int, default=20_000)
    ap.add_argument("--epochs", type=int, default=10)
    args = ap.parse_args()
    apps = [Path(a).resolve() for a in args.apps]
    with tempfile.TemporaryDirectory() as tmp:
        run_id = make_run(Path(tmp), args.samples, args.epochs).name
        times: dict[Path, list[tuple[float, float]]] = {a: [] for a in apps}
        print(f"load average before: {' '.join(f'{x:.2f}' for x in os.getloadavg())} on {os.cpu_count()} cores")
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=CHROMIUM,
                                         args=["--no-sandbox", "--disable-gpu", "--disable-background-networking"])
            for r in range(args.repeats):
                for app in apps:
                    proc, url = _server(app, Path(tmp))
                    try:
                        done, shown, errors = _open(browser, url, run_id)
                    finally:
                        proc.terminate()
                        proc.wait(timeout=30)
                    times[app].append((done, shown))
                    flag = f" ({errors} EXCEPTION(S))" if errors else ""
                    print(f"repeat {r + 1} {app}: script done {done:.2f} s, shown {shown:.2f} s{flag}", flush=True)
            browser.close()
        print(f"load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
        med = {a: (statistics.median(d for d, _ in t), statistics.median(s for _, s in t)) for a, t in times.items()}
        for a, (d, s) in med.items():
            print(f"median {a}: script done {d:.2f} s, shown {s:.2f} s ({args.repeats} fresh servers)")
        if len(apps) == 2:
            (d0, s0), (d1, s1) = med[apps[0]], med[apps[1]]
            print(f"ratio {apps[1].name} / {apps[0].name}: script done {d1 / d0:.2f}, shown {s1 / s0:.2f}")


if __name__ == "__main__":
    main()
