"""The browser tests cannot pass unnoticed without a browser: skipped locally, failed under CI."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _run_browser_tests(tmp_path: Path, ci: bool) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "CI"} | {"DIFFICULTY_AUDIT_CHROMIUM": str(tmp_path / "nope")}
    if ci:
        env["CI"] = "true"
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_browser.py"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def test_missing_browser_fails_under_ci_and_skips_elsewhere(tmp_path):
    ci = _run_browser_tests(tmp_path, ci=True)
    assert ci.returncode == 1 and "2 errors" in ci.stdout and "CI is set" in ci.stdout, ci.stdout[-2000:]
    local = _run_browser_tests(tmp_path, ci=False)
    assert local.returncode == 0 and "2 skipped" in local.stdout, local.stdout[-2000:]
