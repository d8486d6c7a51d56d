"""The GPU paths, checked on a machine with CUDA: device choice, bf16 autocast, capture parity, no host sync.

Each check prints one line and never stops the others (a failed check prints FAIL and why):

1. ``--device auto`` picks the GPU (``pick_device``);
2. ``batch_capture`` on the GPU (float32 and bf16 logits, every class real and with a fake class) against
   its CPU path (tested against float64): the largest absolute difference per captured value;
3. the Recorder in a user's loop on the GPU makes no host sync in ``update``
   (``torch.cuda.set_sync_debug_mode("error")`` raises on any synchronising call), and ``finish`` makes a run
   whose scores open;
4. throughput: ``batch_capture`` and the margin alone at 512 x 10 and 1024 x 1000 (CUDA events, per call);
5. default audits on the digits with known flipped labels on the GPU (bf16 autocast, channels-last), epoch time and
   F1 / AUROC, to compare with the CPU table in bench/RESULTS.md (one seed per setting).

Usage: python bench/gpu_paths.py [--settings sym20,asym20] [--skip-audits]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from engine.capture.dynamics import batch_capture, pleiss_margin  # noqa: E402
from engine.training.models import pick_device  # noqa: E402


def check(name: str):
    def wrap(f):
        def run(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                f(*args, **kwargs)
            except Exception as e:  # a check that fails says why and lets the others run
                print(f"FAIL {name}: {type(e).__name__}: {e}")
                traceback.print_exc(limit=4)
            print(f"     ({name}: {time.perf_counter() - t0:.1f} s)", flush=True)
        return run
    return wrap


@check("device")
def device_choice() -> None:
    dev = pick_device("auto")
    print(f"ok   device auto -> {dev} ({torch.cuda.get_device_name(dev) if dev.type == 'cuda' else 'no GPU'}), "
          f"torch {torch.__version__}, bf16 supported: {torch.cuda.is_bf16_supported()}")
    assert dev.type == "cuda", "auto did not pick the GPU"


@check("capture parity")
def capture_parity() -> None:
    g = torch.Generator().manual_seed(0)
    for b, c, n_real, dtype in ((1024, 1000, 1000, torch.float32), (512, 11, 10, torch.float32),
                                (512, 10, 10, torch.bfloat16), (257, 101, 100, torch.bfloat16)):
        z = (torch.randn(b, c, generator=g) * 4).to(dtype)
        y = torch.randint(0, c, (b,), generator=g)
        got = vars(batch_capture(z.cuda(), y.cuda(), n_real))
        ref = vars(batch_capture(z, y, n_real))  # the CPU path, tested against float64 in tests/test_dynamics.py
        errs = {k: float((got[k].cpu().double() - v.double()).abs().nan_to_num(0).max()) for k, v in ref.items()}
        ok = all(v < 1e-4 for v in errs.values())
        print(f"{'ok  ' if ok else 'FAIL'} capture {b} x {c} ({n_real} real), {str(dtype)[6:]} logits, GPU vs CPU: "
              "max abs diff " + ", ".join(f"{k} {v:.1e}" for k, v in errs.items()))


@check("recorder")
def recorder_no_sync() -> None:
    from sklearn.datasets import load_digits
    from torch import nn

    from engine import Recorder
    from engine.store.runs import Run

    d = load_digits()
    x = torch.tensor(d.images[:, None] / 16.0, dtype=torch.float32, device="cuda")
    y = torch.tensor(d.target, device="cuda")
    net = nn.Sequential(nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(32 * 64, 10)).cuda()
    opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
    with tempfile.TemporaryDirectory() as tmp:
        rec = Recorder(tmp, [str(i) for i in range(len(y))], d.target, [str(k) for k in range(10)], epochs=4)
        g = torch.Generator(device="cuda").manual_seed(0)
        updates = 0
        for _ in range(4):
            for b in torch.randperm(len(y), generator=g, device="cuda").split(64):
                with torch.autocast("cuda", dtype=torch.bfloat16):
                    logits = net(x[b])
                loss = torch.nn.functional.cross_entropy(logits.float(), y[b])
                opt.zero_grad()
                loss.backward()
                opt.step()
                torch.cuda.set_sync_debug_mode("error")
                try:
                    rec.update(b, logits, y[b])
                finally:
                    torch.cuda.set_sync_debug_mode("default")
                updates += 1
            rec.end_epoch()
        run = Run(rec.finish())
        scores = run.scores()
        print(f"ok   recorder on cuda: {updates} update calls (bf16 logits) without a host sync; run {run.path.name}: "
              f"{len(scores)} rows, AUM range {scores['aum'].min():.2f}..{scores['aum'].max():.2f}")


@check("throughput")
def throughput() -> None:
    for b, c in ((512, 10), (1024, 1000)):
        zs = [torch.randn(b, c, device="cuda") * 4 for _ in range(20)]
        ys = [torch.randint(0, c, (b,), device="cuda") for _ in range(20)]
        out = {}
        for name, f in (("margin", lambda z, y: pleiss_margin(z, y)), ("full", lambda z, y: batch_capture(z, y))):
            for z, y in zip(zs, ys, strict=True):
                f(z, y)
            torch.cuda.synchronize()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(10):
                for z, y in zip(zs, ys, strict=True):
                    f(z, y)
            end.record()
            torch.cuda.synchronize()
            out[name] = start.elapsed_time(end) * 1000 / 200  # us per call
        print(f"ok   {b} x {c} on the GPU: margin {out['margin']:.0f} us, full capture {out['full']:.0f} us per call "
              f"= {out['full'] / out['margin']:.2f}x")


@check("audits")
def audits(settings: list[str]) -> None:
    from engine.training import audit
    from engine.training.config import AuditConfig

    kinds = {"sym": "symmetric", "asym": "asymmetric"}
    for s in settings:
        kind, pct = s.rstrip("0123456789"), int(s.lstrip("asym"))
        cfg = AuditConfig(dataset="digits", noise=pct / 100, noise_kind=kinds[kind], seed=0)
        with tempfile.TemporaryDirectory() as tmp:
            t0 = time.perf_counter()
            run, ds = audit.prepare(cfg, tmp)
            audit.execute(run, ds)
            seconds = time.perf_counter() - t0
            m, st = run.summary(), run.status()
            print(f"ok   audit {s} seed 0 on {st.get('input_pipeline', {}).get('device')}: {seconds:.1f} s for "
                  f"{cfg.epochs} epochs x {cfg.passes} passes; F1 {m['f1']:.3f} AUROC {m['auroc']:.4f} "
                  f"(P {m['precision']:.3f} R {m['recall']:.3f})", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--settings", default="sym20,asym20,asym40")
    ap.add_argument("--skip-audits", action="store_true")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA device: nothing to check here")
        return
    device_choice()
    capture_parity()
    recorder_no_sync()
    throughput()
    if not args.skip_audits:
        audits(args.settings.split(","))


if __name__ == "__main__":
    main()
