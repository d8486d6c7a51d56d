"""Decoding workers started from a multi-threaded process (the dashboard) are not forked and do not re-run the script."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FOLDER = ROOT / "sample_data" / "digits_folder"


@pytest.mark.slow
def test_workers_of_a_threaded_dashboard_like_script_use_forkserver_and_skip_the_script(tmp_path):
    marker = tmp_path / "imports.txt"
    script = tmp_path / "app_like.py"
    script.write_text(
        "import importlib.machinery, multiprocessing, threading, time, torch\n"
        f"open({str(marker)!r}, 'a').write(multiprocessing.current_process().name + '\\n')\n"
        "__spec__ = importlib.machinery.ModuleSpec('__main__', None)  # what app.py does\n"
        "from engine.data.datasets import load_dataset\n"
        "from engine.data.pipeline import StreamImages, _start_method, sequential\n"
        "threading.Thread(target=time.sleep, args=(60,), daemon=True).start()  # a server's other threads\n"
        f"ds = load_dataset({str(FOLDER)!r}, lazy=True)\n"
        "with StreamImages(ds.images, torch.device('cpu'), workers=2) as src:\n"
        "    n = sum(len(x) for _, x in sequential(src, 64))\n"
        "assert n == 300, n\n"
        "print('start method', _start_method())\n"
    )
    import os

    env = dict(os.environ, PYTHONPATH=str(ROOT))  # this checkout's engine, whatever the venv has installed
    r = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300, cwd=ROOT, env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "start method forkserver" in r.stdout
    assert marker.read_text().split() == ["MainProcess"]
