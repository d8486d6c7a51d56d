"""--model torchvision:NAME with --weights PATH: head replaced, keys checked, grayscale in, features for DDU."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
import torchvision

from engine.training import audit
from engine.training.config import AuditConfig, ConfigError
from engine.training.models import ModelError, TorchvisionClassifier, build_model, input_spec, load_state_dict

SAMPLE = Path(__file__).resolve().parent.parent / "sample_data" / "digits_folder"


@pytest.fixture(scope="module")
def r18_file(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("w") / "r18.pt"
    torch.save(torchvision.models.resnet18().state_dict(), path)
    return path


def test_weights_file_is_loaded_and_head_replaced(r18_file):
    torch.set_num_threads(1)
    model = build_model("torchvision:resnet18", 1, 7, weights=str(r18_file), input_size=32)
    state = torch.load(r18_file, weights_only=True)
    assert torch.equal(model.net.conv1.weight, state["conv1.weight"])  # the file's weights, not a fresh init
    assert model.head.out_features == 7 and model.head.in_features == 512
    x = torch.rand(2, 1, 8, 8)  # grayscale, smaller than the model input: repeated to 3 channels, resized
    assert model.features(x).shape == (2, 512) and model(x).shape == (2, 7)


def test_keys_that_do_not_match_are_a_clear_error(r18_file, tmp_path):
    with pytest.raises(ModelError, match="does not hold resnet34 weights: missing"):
        TorchvisionClassifier("resnet34", 3, 2, str(r18_file))
    torch.save({"w": torch.zeros(2)}, tmp_path / "other.pt")
    with pytest.raises(ConfigError, match="does not hold resnet18 weights"):
        AuditConfig(model="torchvision:resnet18", weights=str(tmp_path / "other.pt")).validate()
    (tmp_path / "junk.pt").write_bytes(b"not a zip")
    with pytest.raises(ModelError, match="cannot read weights"):
        load_state_dict(str(tmp_path / "junk.pt"))
    with pytest.raises(ConfigError, match="does not exist"):
        AuditConfig(model="torchvision:resnet18", weights=str(tmp_path / "missing.pt")).validate()


def test_checkpoint_layouts_and_fine_tuned_heads_load(r18_file, tmp_path):
    state = torch.load(r18_file, weights_only=True)
    state["fc.weight"], state["fc.bias"] = torch.zeros(5, 512), torch.zeros(5)  # a file fine-tuned for 5 classes
    torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}, "epoch": 3}, tmp_path / "ckpt.pt")
    model = TorchvisionClassifier("resnet18", 3, 2, str(tmp_path / "ckpt.pt"))
    assert torch.equal(model.net.layer1[0].conv1.weight, state["layer1.0.conv1.weight"])


def test_unknown_architecture_and_bad_options_are_refused(r18_file):
    with pytest.raises(ConfigError, match="not a torchvision classification architecture"):
        AuditConfig(model="torchvision:resnet19").validate()
    with pytest.raises(ConfigError, match="torchvision:NAME models"):
        AuditConfig(model="cnn", weights=str(r18_file)).validate()
    with pytest.raises(ConfigError, match="give --weights"):
        AuditConfig(model="torchvision:resnet18", finetune="head").validate()
    with pytest.raises(ConfigError, match="not a torchvision weights enum"):
        AuditConfig(model="torchvision:resnet18", weights=str(r18_file), weights_enum="Nope.X").validate()


def test_finetune_head_trains_only_the_head(r18_file):
    model = build_model("torchvision:resnet18", 3, 4, weights=str(r18_file), finetune="head")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"head.weight", "head.bias"}


def test_input_size_and_normalisation_come_from_the_weights_enum(r18_file):
    side, (mean, std) = input_spec("torchvision:resnet18", str(r18_file), "ResNet18_Weights.IMAGENET1K_V1", 3)
    assert side == 224 and mean == [0.485, 0.456, 0.406] and std == [0.229, 0.224, 0.225]
    side, (mean, std) = input_spec("torchvision:resnet18", str(r18_file), None, 1)  # a file alone: ImageNet's
    assert side is None and mean == [pytest.approx(0.449)] and len(std) == 1
    assert input_spec("torchvision:resnet18", None, None, 3) == (None, None)  # from scratch: the dataset's own


def test_other_architecture_families_expose_features_and_head():
    torch.set_num_threads(1)
    for arch, width in (("mobilenet_v3_small", 1024), ("efficientnet_b0", 1280)):
        model = build_model(f"torchvision:{arch}", 3, 3, input_size=32).eval()
        assert model.head.in_features == width
        assert model(torch.rand(1, 3, 32, 32)).shape == (1, 3)


@pytest.mark.slow
def test_audit_with_a_weights_file_finishes_with_ood_features(r18_file, tmp_path):
    """A real audit (1 epoch) of a small image folder with torchvision:resnet18 started from a weights file."""
    torch.set_num_threads(1)
    data = tmp_path / "data"
    for cls in ("0", "1", "7"):
        (data / cls).mkdir(parents=True)
        for f in sorted((SAMPLE / cls).iterdir())[:12]:
            shutil.copy(f, data / cls / f.name)
    cfg = AuditConfig(dataset=str(data), model="torchvision:resnet18", weights=str(r18_file), image_size=32, epochs=1,
                      threshold_runs=1, batch_size=16, finetune="all")
    run, ds = audit.prepare(cfg, tmp_path / "runs")
    audit.execute(run, ds)
    assert run.status()["state"] == "done"
    assert len(run.scores()) == 36
    import numpy as np

    features = np.load(run.path / "features.npy")  # penultimate features of the final model, for DDU
    assert features.shape == (36, 512) and np.isfinite(features).all()


def test_audit_page_offers_torchvision_models_and_refuses_a_wrong_weights_file(monkeypatch, tmp_path):
    from streamlit.testing.v1 import AppTest

    from engine.store.runs import list_runs

    torch.save({"w": torch.zeros(2)}, tmp_path / "other.pt")
    monkeypatch.setenv("DIFFICULTY_AUDIT_RUNS", str(tmp_path / "runs"))
    monkeypatch.setenv("DIFFICULTY_AUDIT_DATA_ROOT", str(tmp_path))  # the weights file lies under the data root
    at = AppTest.from_file(str(Path(__file__).resolve().parent.parent / "app.py"), default_timeout=60).run()
    at.session_state["tv_open"] = True  # open the expander: its content (the list needs torchvision) runs only then
    at.run()
    assert "resnet18" in at.selectbox(key="tv_arch").options
    at.selectbox(key="tv_arch").set_value("resnet18")
    at.text_input(key="tv_weights").set_value(str(tmp_path / "other.pt"))
    at.button[0].click().run()
    assert not at.exception, at.exception
    assert any("Cannot start" in e.value and "does not hold resnet18 weights" in e.value for e in at.error)
    assert not list_runs(tmp_path / "runs")
