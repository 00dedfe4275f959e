"""task=image_folder: torchvision ImageFolder read into the image protocol (classes by folder name,
balanced N2, exact pixels), one-line errors for a missing, empty or mismatched folder, and a pipeline
run on a folder of PNGs written by the test."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ptlab.checks import check_paths
from ptlab.config import ConfigError
from ptlab.data.images import make_image_tasks, normalise
from ptlab.pipeline import run_pipeline

CLASSES = ("ant", "bee", "cat", "dog")
PER_CLASS = 10


def write_folder(root: Path) -> dict[str, list[np.ndarray]]:
    """PER_CLASS 32x32 RGB PNGs per class, each class a different mean colour; returns the pixels."""
    rng = np.random.default_rng(0)
    pixels: dict[str, list[np.ndarray]] = {}
    for c, name in enumerate(CLASSES):
        (root / name).mkdir(parents=True)
        for i in range(PER_CLASS):
            image = np.clip(rng.normal(60 * c + 40, 20, size=(32, 32, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(image).save(root / name / f"{i}.png")
            pixels.setdefault(name, []).append(image)
    return pixels


def folder_cfg(make_cfg, root: Path, *overrides: str):
    return make_cfg(
        "task=image_folder",
        f"task.root={root}",
        "task.task2_classes=[dog,ant]",
        "task.k=2",
        "task.n2=6",
        "task.n1_ratio=1",
        "noise=pixels",
        "model=resnet18_small",
        *overrides,
        small=False,
    )


def test_image_folder_tasks_follow_the_protocol(make_cfg, tmp_path: Path) -> None:
    pixels = write_folder(tmp_path / "images")
    cfg = folder_cfg(make_cfg, tmp_path / "images")
    tasks = make_image_tasks(cfg.task, cfg.noise, cfg.seed)
    assert tasks.task2.classes == [3, 0]  # dog, ant: ids of ImageFolder's sorted class folders
    assert sorted(tasks.task1.classes) == [1, 2]
    assert torch.bincount(tasks.task2.train.y).tolist() == [3, 3] and len(tasks.task1.train) == 6
    # 30% of 10 per class are test images; the test set holds every test image of the task's classes
    assert len(tasks.task2.test) == 6 and tasks.image_size == 32 and tasks.channels == 3
    train = tasks.task2.train
    x0 = train.x[0]  # sigma 0: the PNG's pixels, normalised with the task's mean and std
    label = CLASSES[tasks.task2.classes[int(train.y[0])]]
    candidates = [
        normalise(torch.tensor(p, dtype=torch.float32).permute(2, 0, 1)[None], cfg.task.mean, cfg.task.std)[0]
        for p in pixels[label]
    ]
    assert any(torch.allclose(x0, c, atol=1e-6) for c in candidates)


def test_bad_folders_are_one_line_errors(make_cfg, tmp_path: Path) -> None:
    write_folder(tmp_path / "images")
    (tmp_path / "empty" / "ant").mkdir(parents=True)
    cases = {
        str(tmp_path / "nope"): "no such folder",
        str(tmp_path / "empty"): "has no class subfolders with images",
    }
    for root, message in cases.items():
        with pytest.raises(ConfigError, match=f"^task.root='{root}' is not allowed: .*{message}") as err:
            check_paths(folder_cfg(make_cfg, Path(root)))
        assert "\n" not in str(err.value)
    with pytest.raises(
        ConfigError,
        match=r"^task.task2_classes=\['dog', 'eel'\] is not allowed: eel not among the "
        r"class folders .*\(ant, bee, cat, dog\)",
    ):
        check_paths(folder_cfg(make_cfg, tmp_path / "images", "task.task2_classes=[dog,eel]"))


@pytest.mark.slow
def test_image_folder_pipeline_end_to_end(make_cfg, tmp_path: Path) -> None:
    write_folder(tmp_path / "images")
    cfg = folder_cfg(
        make_cfg,
        tmp_path / "images",
        "train.upstream_epochs=1",
        "train.downstream_epochs=1",
        "train.batch_size=6",
        "train.progress_bar=false",
        "model.width=0.125",
    )
    summary = run_pipeline(cfg, tmp_path / "out")
    assert summary["data"]["task2_classes"] == [3, 0] and summary["data"]["n2"] == 6
    for stage in ("upstream", "transfer", "scratch"):
        assert 0.0 <= summary[stage]["test_acc"] <= 1.0
