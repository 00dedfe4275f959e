"""Image tasks: CIFAR-format files through torchvision's loaders, class splits, sizes, balance, noise."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from ptlab.config import ConfigError
from ptlab.data.images import PIXEL_MAX, ImageDataModule, load_cifar, make_image_tasks
from ptlab.pipeline import run_pipeline
from tests.conftest import run_cli
from tests.images_fixtures import write_cifar10, write_cifar100


def test_cifar10_fixture_loads_through_torchvision(tmp_path: Path) -> None:
    written = write_cifar10(tmp_path)
    raw = load_cifar("cifar10", tmp_path)
    assert raw.num_classes == 10
    assert torch.equal(raw.train_x, torch.from_numpy(written["train_x"]).float())
    assert torch.equal(raw.train_y, torch.from_numpy(written["train_y"]))
    assert torch.equal(raw.test_x, torch.from_numpy(written["test_x"]).float())
    assert raw.train_x.shape == (60, 3, 32, 32) and raw.test_x.shape == (40, 3, 32, 32)


def test_cifar100_fixture_split_is_disjoint_balanced_and_sized(tmp_path: Path, make_cfg) -> None:
    written = write_cifar100(tmp_path)
    cfg = make_cfg(
        "task=cifar100", "noise=pixels", f"task.data_dir={tmp_path}", "task.n2=40", "task.k=20", "task.n1_ratio=1", small=False
    )
    tasks = make_image_tasks(cfg.task, cfg.noise, seed=3)
    assert tasks.task2.classes == list(range(20))
    assert len(tasks.task1.classes) == 20 and not set(tasks.task1.classes) & set(tasks.task2.classes)
    for task, n_train in ((tasks.task1, 40), (tasks.task2, 40)):
        assert len(task.train) == n_train
        assert torch.bincount(task.train.y, minlength=task.num_classes).tolist() == [n_train // task.num_classes] * 20
        assert torch.bincount(task.test.y, minlength=task.num_classes).tolist() == [1] * 20
        raw_labels = torch.from_numpy(written["train_y"])[task.train.source_index]
        assert torch.equal(raw_labels, torch.tensor(task.classes)[task.train.y])
    expected = (
        torch.from_numpy(written["train_x"][tasks.task2.train.source_index.numpy()]).float() / PIXEL_MAX
        - torch.tensor(cfg.task.mean).view(1, 3, 1, 1)
    ) / torch.tensor(cfg.task.std).view(1, 3, 1, 1)
    assert torch.allclose(tasks.task2.train.x, expected, atol=1e-6)


def test_missing_cifar_dir_is_one_line(tmp_path: Path, make_cfg) -> None:
    cfg = make_cfg(
        "task=cifar10",
        "noise=pixels",
        "+pair=vgg16_small_vgg11_small",
        "logger=none",
        f"task.data_dir={tmp_path / 'nowhere'}",
        small=False,
    )
    with pytest.raises(ConfigError) as err:
        run_pipeline(cfg, tmp_path / "out")
    message = str(err.value)
    assert "\n" not in message
    assert "task.data_dir" in message and "cifar-10-batches-py" in message and "task.download=true" in message


@pytest.mark.slow
def test_missing_cifar_dir_through_cli(tmp_path: Path) -> None:
    result = run_cli(
        ["task=cifar10", "noise=pixels", "+pair=vgg16_small_vgg11_small", "logger=none", f"task.data_dir={tmp_path / 'nowhere'}"],
        cwd=tmp_path,
        timeout=120,
    )
    assert result.returncode != 0
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("ptlab: task.data_dir=") and "task.download=true" in last


@pytest.mark.parametrize("ratio", [2, 3, 4])
def test_digits_split_sizes_and_task2_independent_of_ratio(make_cfg, ratio: int) -> None:
    cfg = make_cfg("task=digits", "noise=pixels", f"task.n1_ratio={ratio}", small=False)
    tasks = make_image_tasks(cfg.task, cfg.noise, seed=0)
    assert tasks.task2.classes == [3, 8] and len(tasks.task1.classes) == 8
    assert not set(tasks.task1.classes) & {3, 8}
    assert len(tasks.task2.train) == 40 and torch.bincount(tasks.task2.train.y).tolist() == [20, 20]
    n1 = 40 * ratio
    assert len(tasks.task1.train) == n1
    counts = torch.bincount(tasks.task1.train.y, minlength=8)
    assert counts.sum() == n1 and counts.max() - counts.min() <= 1
    assert tasks.image_size == 32 and tasks.task2.train.x.shape[1:] == (3, 32, 32)
    reference = make_image_tasks(OmegaConf.merge(cfg.task, {"n1_ratio": 2.0}), cfg.noise, seed=0)
    assert torch.equal(tasks.task2.train.source_index, reference.task2.train.source_index)
    assert torch.equal(tasks.task2.train.x, reference.task2.train.x)


def test_task1_classes_drawn_by_seed_never_overlap(make_cfg) -> None:
    cfg = make_cfg("task=digits", "noise=pixels", "task.k=3", "task.n2=20", "task.n1_ratio=1", small=False)
    draws = {tuple(make_image_tasks(cfg.task, cfg.noise, seed=s).task1.classes) for s in range(6)}
    assert len(draws) > 1
    assert all(len(d) == 3 and not set(d) & {3, 8} for d in draws)


def test_too_many_images_is_one_line(make_cfg) -> None:
    cfg = make_cfg("task=digits", "noise=pixels", "task.n2=1000", "task.n1_ratio=0.1", small=False)
    with pytest.raises(ConfigError, match=r"^task.n2=1000 needs 500 images of class 3"):
        make_image_tasks(cfg.task, cfg.noise, seed=0)


def test_noise_has_requested_std_and_is_fixed(make_cfg) -> None:
    clean_cfg = make_cfg("task=digits", "noise=pixels", small=False)
    noisy_cfg = make_cfg("task=digits", "noise=pixels", "noise.sigma_p2=10", small=False)
    clean = make_image_tasks(clean_cfg.task, clean_cfg.noise, seed=1)
    noisy = make_image_tasks(noisy_cfg.task, noisy_cfg.noise, seed=1)
    std = torch.tensor(clean_cfg.task.std).view(1, 3, 1, 1)
    for split in ("train", "test"):
        clean_set, noisy_set = getattr(clean.task2, split), getattr(noisy.task2, split)
        assert torch.equal(clean_set.source_index, noisy_set.source_index)
        noise = ((noisy_set.x - clean_set.x) * std * PIXEL_MAX).double()
        assert abs(noise.std().item() - 10.0) < 0.15 and abs(noise.mean().item()) < 0.15
    assert torch.equal(clean.task1.train.x, noisy.task1.train.x)  # sigma_p1 = 0: task 1 untouched
    again = make_image_tasks(noisy_cfg.task, noisy_cfg.noise, seed=1)
    assert torch.equal(again.task2.train.x, noisy.task2.train.x)

    data = ImageDataModule(noisy.task2.train, noisy.task2.test, batch_size=16, seed=0)
    epochs = [torch.cat([x for x, _ in data.train_dataloader()]) for _ in range(2)]
    assert not torch.equal(epochs[0], epochs[1])  # reshuffled ...
    for seen in epochs:  # ... but every image carries the same noise in every epoch
        key = seen.flatten(1).double().sum(1)
        reference = noisy.task2.train.x.flatten(1).double().sum(1)
        assert torch.equal(seen[key.argsort()], noisy.task2.train.x[reference.argsort()])


def test_digits_pixels_are_0_255_resized_and_gray() -> None:
    from ptlab.data.images import load_digits_images

    raw = load_digits_images(image_size=32)
    assert raw.train_x.shape[1:] == (3, 32, 32) and len(raw.train_x) + len(raw.test_x) == 1797
    assert raw.train_x.min() == 0 and raw.train_x.max() == PIXEL_MAX
    assert torch.equal(raw.train_x[:, 0], raw.train_x[:, 2])
    assert np.isclose(len(raw.test_x) / 1797, 0.3, atol=0.01)
