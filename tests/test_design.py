"""Random designs (ptlab.design): reproducible from their seed, inside their box, no run seed shared by
two cells, bad boxes refused; the ptlab_batched sweeper runs a cells file crossed with the command line."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import yaml

from ptlab.design import (
    SEED_STRIDE,
    DesignError,
    Range,
    draw_design,
    load_box,
    parse_box,
    read_cells,
)
from tests.conftest import REPO, SMALL, run_cli

BOX = load_box(REPO / "conf" / "design" / "calibration.yaml")


def values(design: list[list[str]]) -> dict[str, list[float]]:
    out: dict[str, list[float]] = {}
    for cell in design:
        for override in cell[:-1]:
            key, value = override.split("=", 1)
            out.setdefault(key, []).append(float(value))
    return out


def test_a_design_is_reproducible_from_its_seed() -> None:
    assert draw_design(BOX, 7, 30) == draw_design(BOX, 7, 30)
    assert draw_design(BOX, 7, 30) != draw_design(BOX, 8, 30)
    # The first cells do not depend on how many follow.
    assert draw_design(BOX, 7, 30)[:10] == draw_design(BOX, 7, 10)


def test_cells_stay_in_the_box_and_follow_their_scales() -> None:
    drawn = values(draw_design(BOX, 3, 2000))
    for key, spec in BOX.items():
        assert spec.low <= min(drawn[key]) and max(drawn[key]) <= spec.high, key
    assert all(float(v).is_integer() for v in drawn["task.d"])
    # log-uniform d on [500, 6000]: the median is the geometric middle sqrt(500 * 6000) = 1732.
    assert np.median(drawn["task.d"]) == pytest.approx(math.sqrt(500 * 6000), rel=0.08)
    # ||u|| is exactly 0 with probability 0.15, else uniform on [0, 3].
    zeros = np.mean(np.array(drawn["task.u_norm"]) == 0.0)
    assert zeros == pytest.approx(0.15, abs=0.025)
    assert np.mean(drawn["alpha" if "alpha" in drawn else "transfer.alpha"]) == pytest.approx(0.55, abs=0.03)


def test_no_two_cells_share_a_run_seed() -> None:
    seeds = []
    for design_seed in (1, 2):
        for cell in draw_design(BOX, design_seed, 50, seeds=16):
            assert cell[-1].startswith("seed=range(")
            low, high = map(int, cell[-1][len("seed=range(") : -1].split(","))
            assert high - low == 16
            seeds += list(range(low, high))
    assert len(seeds) == len(set(seeds)) == 1600
    assert min(seeds) == SEED_STRIDE and max(seeds) < 3 * SEED_STRIDE


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({}, "the box is empty"),
        ({"task.d": {"low": 10}}, "a range has low, high"),
        ({"task.d": {"low": 0, "high": 5, "scale": "log"}}, "low > 0 with scale: log"),
        ({"task.d": {"low": 5, "high": 1}}, "need low <= high"),
        ({"task.d": {"low": 1, "high": 5, "scale": "cubic"}}, "scale is one of"),
        ({"task.d": {"low": 1, "high": 5, "p_low": 1.0}}, "a probability in"),
    ],
)
def test_bad_boxes_are_refused(raw: dict, message: str) -> None:
    with pytest.raises(DesignError, match=message):
        parse_box(raw)


def test_design_cli_writes_the_same_file_for_the_same_seed(tmp_path: Path) -> None:
    from ptlab.report.cli import main

    first, second = tmp_path / "a.yaml", tmp_path / "b.yaml"
    for out in (first, second):
        assert (
            main(
                ["design", "--seed", "5", "--cells", "6", "--box", str(REPO / "conf/design/calibration.yaml"), "--out", str(out)]
            )
            == 0
        )
    assert first.read_text() == second.read_text()
    data = yaml.safe_load(first.read_text())
    assert data["design_seed"] == 5 and data["seeds_per_cell"] == 16 and len(data["cells"]) == 6
    assert read_cells(first) == draw_design(BOX, 5, 6)
    assert main(["design", "--seed", "5", "--cells", "0", "--out", str(tmp_path / "c.yaml")]) == 2
    assert (
        main(["design", "--seed", "5", "--cells", "2", "--box", str(tmp_path / "none.yaml"), "--out", str(tmp_path / "c.yaml")])
        == 2
    )


def test_design_cli_finds_its_default_box_from_any_folder(tmp_path: Path, monkeypatch) -> None:
    """Run outside the repository (no ``conf/`` there), the default box is ptlab's own: the same cells as naming it."""
    from ptlab.report.cli import main

    monkeypatch.chdir(tmp_path)
    assert main(["design", "--seed", "5", "--cells", "3", "--out", "d.yaml"]) == 0
    assert read_cells(tmp_path / "d.yaml") == draw_design(BOX, 5, 3)


def test_range_rounds_integers_into_the_box() -> None:
    rng = np.random.default_rng(0)
    spec = Range(low=10, high=60, scale="log", type="int")
    assert all(10 <= spec.draw(rng) <= 60 for _ in range(200))


def test_the_sweeper_runs_a_cells_file_crossed_with_the_command_line(tmp_path: Path, tracking_uri: str) -> None:
    cells = tmp_path / "cells.yaml"
    cells.write_text("cells:\n- [task.u_norm=0.5, 'seed=range(10,12)']\n- [task.u_norm=2.0, seed=20]\n")
    common = [
        *SMALL,
        "train.upstream_steps=10",
        "train.downstream_steps=5",
        f"logger.tracking_uri={tracking_uri}",
        f"cache.dir={tmp_path / 'cache'}",
        "engine=gram",
        "hydra/launcher=ptlab_gram",
        "hydra/sweeper=ptlab_batched",
        f"hydra.sweeper.cells={cells}",
    ]
    done = run_cli(["-m", *common, "transfer.alpha=0.2,0.8", f"hydra.sweep.dir={tmp_path / 'sweep'}"], tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    jobs = sorted((json.loads(p.read_text())["seed"], p.parent.name) for p in (tmp_path / "sweep").glob("*/summary.json"))
    assert [seed for seed, _ in jobs] == [10, 10, 11, 11, 20, 20]
    from ptlab.report.runs import load_pipelines

    runs = load_pipelines(tracking_uri, "default")
    triples = sorted(
        zip(
            runs["params.seed"].astype(int), runs["params.task.u_norm"].astype(float), runs["params.transfer.alpha"].astype(float)
        )
    )
    assert triples == [(10, 0.5, 0.2), (10, 0.5, 0.8), (11, 0.5, 0.2), (11, 0.5, 0.8), (20, 2.0, 0.2), (20, 2.0, 0.8)]
    clash = run_cli(["-m", *common, "seed=0,1", f"hydra.sweep.dir={tmp_path / 'clash'}"], tmp_path)
    assert clash.returncode != 0 and "cell 0 sets seed, which the sweep's params or command line set too" in (
        clash.stdout + clash.stderr
    )
