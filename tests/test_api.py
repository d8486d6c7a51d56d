"""The Python API: engine.audit(dataset, **options) -> Run, with the CLI's options, and its doctest (trains 2 epochs: slow)."""

from __future__ import annotations

import doctest
from pathlib import Path

import pandas as pd
import pytest

import engine
from engine.training.config import ConfigError


@pytest.mark.slow
def test_doctests_of_the_python_api():
    import engine.api

    result = doctest.testmod(engine.api, raise_on_error=True)
    assert result.attempted >= 5 and result.failed == 0


def test_unknown_option_is_refused_with_the_list_of_options(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown option\(s\) \['epoch'\].*epochs"):
        engine.audit("digits", epoch=3, out=tmp_path)


def test_options_go_through_the_cli_mapping(tmp_path):
    """A bad value is refused by the same validation as the CLI's, before any run exists."""
    with pytest.raises(ConfigError, match="epochs must be at least 1"):
        engine.audit("digits", epochs=0, out=tmp_path / "runs")
    with pytest.raises(ConfigError, match="not a torchvision classification architecture"):
        engine.audit("digits", model="torchvision:nope", out=tmp_path / "runs")
    assert not (tmp_path / "runs").exists()


def test_run_wraps_a_recorded_run(tmp_path):
    import torch

    rec = engine.Recorder(tmp_path / "runs", ["a", "b", "c", "d"], [0, 1, 0, 1], ["x", "y"], 2)
    z = torch.tensor([[3.0, 0.0], [0.0, 3.0], [0.0, 2.0], [0.0, 3.0]])
    for _ in range(2):
        rec.update(torch.arange(4), z, torch.tensor([0, 1, 0, 1]))
        rec.end_epoch()
    run = engine.Run(rec.finish())
    table = run.scores()
    assert isinstance(table, pd.DataFrame) and table.iloc[0]["sample_id"] == "c"  # the one predicted wrong
    assert run.state == "done" and set(run.flagged()["sample_id"]) <= {"a", "b", "c", "d"}
    n = run.export(tmp_path / "all.csv", kind="all")
    assert n == 4 and len(pd.read_csv(tmp_path / "all.csv")) == 4


def test_engine_exports_the_public_api_and_nothing_else():
    import engine
    from engine import api

    assert engine.__all__ == ["Recorder", "Run", "audit", "import_logits", "threshold_targets"]
    assert engine.audit is api.audit and engine.Run is api.Run
    with pytest.raises(AttributeError):
        engine.prepare  # noqa: B018  (internals are reached through their subpackage, not the top level)


def test_pages_import_only_the_public_api_and_the_ui_layer():
    """The pages depend on ``engine`` and ``engine.ui`` only, so the subpackages can move without touching them."""
    import ast

    root = Path(__file__).resolve().parent.parent
    bad = []
    for f in [root / "app.py", *sorted((root / "app_pages").glob("*.py"))]:
        for node in ast.walk(ast.parse(f.read_text())):
            mods = [node.module] if isinstance(node, ast.ImportFrom) and node.level == 0 else (
                [a.name for a in node.names] if isinstance(node, ast.Import) else [])
            bad += [f"{f.name}: {m}" for m in mods if m and m.startswith("engine") and m not in ("engine", "engine.ui")]
    assert not bad, bad
