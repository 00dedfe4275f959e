"""benchmarks/plain_loop.py, the plain PyTorch reference of benchmarks/bench_speed.py, is the default pipeline."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

from ptlab.pipeline import run_pipeline

REPO = Path(__file__).resolve().parent.parent


def plain_loop():
    spec = importlib.util.spec_from_file_location("plain_loop", REPO / "benchmarks" / "plain_loop.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["plain_loop"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("seed", [0, 3])
def test_plain_loop_gives_the_pipelines_accuracies(make_cfg, tmp_path: Path, seed: int) -> None:
    """Same data, inits and filter choice from the same seed: autograd GD and the gram engine end at the same
    accuracies (the losses agree to float32 rounding)."""
    loop = plain_loop()
    plain = loop.pipeline(loop.Settings(seed=seed, d=200, n1=40, n2=10, n_test=100, width=8, t1=60, t2=30, eval_every=10))
    summary = run_pipeline(make_cfg("logger=none", f"seed={seed}", "cache.enabled=false"), tmp_path / "out")
    for stage in ("upstream", "transfer", "scratch"):
        assert summary[stage]["train_acc"] == pytest.approx(plain[stage]["train_acc"], abs=1e-7)
        assert summary[stage]["test_acc"] == pytest.approx(plain[stage]["test_acc"], abs=1e-7)
        assert summary[stage]["train_loss"] == pytest.approx(plain[stage]["train_loss"], rel=1e-4)
