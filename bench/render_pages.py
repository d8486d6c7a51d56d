"""Time and peak memory to render each dashboard page for a synthetic run of N samples x E epochs.

Builds a run directory with memory-mapped dynamics (margins drawn so that 10% of samples look
mislabeled) whose samples point at the real image files of ``sample_data/digits_folder`` (cycled),
finalizes its scores with the engine, writes the OoD report with the engine's DDU code on synthetic
features (a Gaussian cluster per class; an ID test set and a shifted OoD set of 20,000 each), then
renders every page with Streamlit's AppTest in a fresh process per page and reports the wall time
of the first render (it fills the caches of a fresh server), of a rerun, and that process's peak
resident memory.
Usage: python bench/render_pages.py [--samples 1000000] [--epochs 30]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parent.parent
IMAGES = ROOT / "sample_data" / "digits_folder"
sys.path.insert(0, str(ROOT))

CHILD = r"""
import json, os, sys, time
from streamlit.testing.v1 import AppTest
page = sys.argv[1]
at = AppTest.from_file(os.path.join(sys.argv[2], "app.py"), default_timeout=600)
t0 = time.perf_counter(); at.run(); first = time.perf_counter() - t0
if page != "app_pages/audit.py":
    at.switch_page(page)
t0 = time.perf_counter(); at.run(); cold = time.perf_counter() - t0
t0 = time.perf_counter(); at.run(); warm = time.perf_counter() - t0
assert not at.exception, at.exception
assert not at.error, [e.value for e in at.error]
hwm = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM"))  # peak RSS, kB
print(json.dumps({"cold": cold, "warm": warm, "peak_rss_mb": hwm / 1024, "images": len(at.get("image")),
                  "charts": len(at.get("plotly_chart"))}))
"""


PAGES = ["app_pages/audit.py", "app_pages/aum.py", "app_pages/flagged.py", "app_pages/scores.py",
         "app_pages/datamap.py", "app_pages/ood.py"]


def make_run(root: Path, n: int, epochs: int, passes: int = 2, do_finalize: bool = True) -> Path:
    from engine.store.runs import DynamicsWriter, create_run
    from engine.training.audit import finalize

    rng = np.random.default_rng(0)
    classes = [str(c) for c in range(10)]
    labels = rng.integers(0, 10, n)
    files = sorted(p.relative_to(IMAGES).as_posix() for p in IMAGES.rglob("*.png"))
    noisy = rng.random(n) < 0.1
    tpass = np.full(n, -1)
    perm = rng.permutation(n)
    m = n // 11 if passes > 1 else 0
    tpass[perm[:m]], tpass[perm[m:2 * m]] = 0, 1
    samples = pd.DataFrame({"sample_id": [f"s{i:07d}" for i in range(n)], "source": [files[i % len(files)] for i in range(n)],
                            "label": labels, "true_label": np.where(noisy, (labels + 1) % 10, labels),
                            "threshold_pass": tpass, "is_threshold": tpass >= 0})
    cfg = {"dataset": str(IMAGES), "dataset_root": str(IMAGES), "noise": 0.1, "noise_kind": "symmetric", "model": "cnn", "epochs": epochs,
           "threshold_samples": passes > 1, "threshold_runs": max(passes, 1), "threshold_percentile": 99.0, "cutoff": "auto",
           "aum_start": 1, "aum_end": None, "seed": 0}
    run = create_run(root, cfg, samples, classes)
    bad = noisy | (tpass >= 0)
    history = []  # per epoch, as every door into a run directory records it (mean loss; accuracy of the real targets)
    for p in range(passes):
        w = DynamicsWriter(run, p, epochs, n)
        for e in range(epochs):
            learn = min(1.0, e / 10)
            margin = np.where(bad & (tpass != 1 - p), -2 + learn, 3 * learn) + rng.normal(0, 1, n)
            loss, pred = np.log1p(np.exp(-margin)), np.where(margin > 0, labels, (labels + 1) % 10)
            w.write_epoch(e, {"margin": margin, "margin_yang": margin, "prob": 1 / (1 + np.exp(-margin)),
                              "loss": loss, "el2n": np.abs(margin) / 5, "pred": pred, "other": (labels + 1) % 10})
            history.append({"pass": p, "epoch": e, "loss": float(loss.mean()),
                            "accuracy": float((pred == labels)[tpass != p].mean()), "seconds": 1.0})
    run.update_status(state="done", passes=passes, epochs=epochs, epochs_done=[epochs] * passes, history=history)
    if do_finalize:
        t0 = time.perf_counter()
        finalize(run)
        print(f"finalize (all free scores) for {n:,} x {epochs} x {passes} passes: {time.perf_counter() - t0:.1f} s")
        t0 = time.perf_counter()
        ood_report(run, labels, rng)
        print(f"DDU report (Gaussians fitted on {n:,} x 128 features): {time.perf_counter() - t0:.1f} s")
    return run.path


def ood_report(run, labels: np.ndarray, rng: np.random.Generator, dim: int = 128, m: int = 20_000) -> None:
    """``ood/`` written by the engine's DDU code from synthetic features: one Gaussian cluster per class."""
    from engine.ood.evaluate import write_report

    centres = rng.normal(0, 3, (10, dim)).astype(np.float32)

    def outputs(y: np.ndarray, shift: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
        f = centres[y] + rng.normal(0, 1, (len(y), dim)).astype(np.float32) + shift
        return f, (f @ centres.T / dim).astype(np.float32)

    feats, logits = outputs(labels)
    y_id = rng.integers(0, 10, m)
    f_id, l_id = outputs(y_id)
    write_report(run, feats, logits, labels, np.ones(len(labels), dtype=bool), 10, (f_id, l_id, y_id),
                 {"shifted": outputs(rng.integers(0, 10, m), shift=1.5)})


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--samples", type=int, default=1_000_000)
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--keep", default=None, help="build the run in this folder and keep it")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = args.keep or tmp
        Path(tmp).mkdir(parents=True, exist_ok=True)
        make_run(Path(tmp), args.samples, args.epochs)
        print("| page | first render (s) | rerun (s) | peak RSS of the process (MB) | images, charts shown |\n"
              "|---|---|---|---|---|")
        for page in PAGES:
            out = subprocess.run([sys.executable, "-c", CHILD, page, str(ROOT)], capture_output=True, text=True,
                                 env={"DIFFICULTY_AUDIT_RUNS": tmp, "PATH": "/usr/bin:/bin"}, cwd=ROOT)
            if out.returncode:
                print(page, "FAILED", out.stderr[-3000:])
                continue
            r = json.loads(out.stdout.strip().splitlines()[-1])
            print(f"| {page} | {r['cold']:.2f} | {r['warm']:.2f} | {r['peak_rss_mb']:.0f} | {r['images']}, {r['charts']} |")


if __name__ == "__main__":
    main()
