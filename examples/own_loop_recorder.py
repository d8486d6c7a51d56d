"""Your own training loop, audited: a torchvision ResNet-18 fine-tuned from a weights file, recorded with
``engine.Recorder`` over the paper's two threshold passes.

    python examples/own_loop_recorder.py                       # demo: digits with 20% flipped labels
    python examples/own_loop_recorder.py --data FOLDER         # your images, laid out FOLDER/<class>/<image>
    python examples/own_loop_recorder.py --weights r18.pt      # start from your ImageNet-pretrained state dict

With no ``--weights`` the example saves a freshly initialised ResNet-18 state dict first and starts
from it (this machine has no internet to download pretrained weights): point ``--weights`` at a
real pretrained file for a real fine-tune. Then open the dashboard (``streamlit run app.py``,
runs folder ``--out``) and pick the run.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import torchvision

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from engine import Recorder, threshold_targets  # noqa: E402


def load_data(folder: str | None, limit: int | None, seed: int):
    """Images as float tensors in [0, 1] (N, C, H, W), labels, class names, ids, paths and the images root."""
    if folder is None:  # demo: scikit-learn's digits with 20% of the labels flipped on purpose
        from sklearn.datasets import load_digits

        d = load_digits()
        rng = np.random.default_rng(seed)
        labels = d.target.copy()
        flip = rng.random(len(labels)) < 0.2
        labels[flip] = (labels[flip] + rng.integers(1, 10, flip.sum())) % 10
        x = torch.tensor(d.images[:, None] / 16.0, dtype=torch.float32)
        ids = [f"digit-{i:04d}" for i in range(len(labels))]
        data = (x, labels, [str(c) for c in range(10)], ids, None, None, d.target)
    else:
        from PIL import Image

        root = Path(folder).resolve()
        classes = sorted(p.name for p in root.iterdir() if p.is_dir())
        paths = [p for c in classes for p in sorted((root / c).iterdir()) if p.is_file()]
        labels = np.array([classes.index(p.parent.name) for p in paths])
        x = torch.stack([torch.from_numpy(np.asarray(Image.open(p).convert("RGB").resize((64, 64)), dtype=np.float32)
                                          / 255.0).permute(2, 0, 1) for p in paths])
        rel = [str(p.relative_to(root)) for p in paths]
        data = (x, labels, classes, rel, rel, root, None)
    if limit:
        x, labels, classes, ids, rel, root, true = data
        keep = np.random.default_rng(seed).permutation(len(labels))[:limit]
        keep.sort()
        data = (x[keep], labels[keep], classes, [ids[i] for i in keep], [rel[i] for i in keep] if rel else None, root,
                true[keep] if true is not None else None)
    return data


def make_model(weights: Path, n_outputs: int) -> torch.nn.Module:
    """ResNet-18 from a state dict file (read with weights_only), its ImageNet head replaced for our classes."""
    model = torchvision.models.resnet18()
    model.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
    model.fc = torch.nn.Linear(model.fc.in_features, n_outputs)
    return model


def main(argv: list[str] | None = None) -> Path:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=None, help="image folder FOLDER/<class>/<image> (default: the digits demo)")
    ap.add_argument("--weights", default=None, help="ResNet-18 state dict to fine-tune from")
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--image-size", type=int, default=32)
    ap.add_argument("--limit", type=int, default=None, help="use only this many samples (a quick try)")
    ap.add_argument("--out", default="runs", help="runs folder")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    torch.manual_seed(args.seed)
    x, labels, classes, ids, paths, root, true = load_data(args.data, args.limit, args.seed)
    weights = Path(args.weights) if args.weights else Path(args.out) / "resnet18-init.pt"
    if not args.weights:  # no internet here: save a state dict to start from (use a pretrained one for real)
        weights.parent.mkdir(parents=True, exist_ok=True)
        torch.save(torchvision.models.resnet18().state_dict(), weights)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)  # ImageNet normalisation of pretrained weights
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)

    def prepare(batch: torch.Tensor) -> torch.Tensor:
        batch = batch.expand(-1, 3, -1, -1) if batch.shape[1] == 1 else batch
        batch = F.interpolate(batch, size=(args.image_size, args.image_size), mode="bilinear", align_corners=False)
        return (batch - mean) / std

    run_dir: Path | str = args.out
    for pass_index in (0, 1):  # two passes with disjoint threshold samples: every sample gets an AUM
        targets = torch.as_tensor(threshold_targets(labels, len(classes), pass_index, seed=args.seed))
        model = make_model(weights, len(classes) + 1)  # + the threshold samples' fake class
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
        rec = Recorder(run_dir, ids, labels, classes, args.epochs, sources=paths, images_root=root,
                       pass_index=pass_index, true_labels=true, name=args.data or "digits (own loop)")
        for epoch in range(args.epochs):
            model.train()
            for idx in torch.randperm(len(targets)).split(64):
                logits = model(prepare(x[idx]))
                loss = F.cross_entropy(logits, targets[idx])
                opt.zero_grad()
                loss.backward()
                opt.step()
                rec.update(idx, logits.detach(), targets[idx])  # any device; no host sync
            rec.end_epoch()
            print(f"pass {pass_index} epoch {epoch + 1}/{args.epochs} done", flush=True)
        run_dir = rec.finish()  # pass 1 records into the run directory pass 0 created
    from engine import Run

    s = Run(run_dir).summary()
    print(f"run: {run_dir}\nflagged {s['n_flagged']} of {s['n_samples']} samples")
    if "recall" in s:
        print(f"known label errors {s['n_label_errors']}: precision {s['precision']:.3f} recall {s['recall']:.3f} "
              f"AUROC {s['auroc']:.3f}")
    return Path(run_dir)


if __name__ == "__main__":
    main()
