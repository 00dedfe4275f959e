"""Fashion-MNIST: IDX files in the real format (gzipped and extracted) read exactly, the task protocol on
them, the one-line refusal of missing or broken files, and (slow) a pipeline on the real files."""

from __future__ import annotations

import gzip
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from ptlab.checks import check_data
from ptlab.config import ConfigError
from ptlab.data.idx import IDXError, check_idx_files, find_idx_files, read_idx, read_idx_header
from ptlab.data.images import PIXEL_MAX, load_fashion_mnist, make_image_tasks
from ptlab.pipeline import run_pipeline
from tests.conftest import run_cli
from tests.images_fixtures import idx_bytes, write_fashion_mnist

DEBIAN = Path("/usr/share/datasets/fashion-mnist")


@pytest.mark.parametrize("gz", [True, False])
def test_idx_files_read_back_exactly(tmp_path: Path, gz: bool) -> None:
    written = write_fashion_mnist(tmp_path / "d", gz=gz)
    files = find_idx_files(tmp_path / "d")
    assert files is not None and all(p.suffix == (".gz" if gz else "") for p in files.values())
    for role, array in written.items():
        assert np.array_equal(read_idx(files[role]), array)
    assert read_idx_header(files["train_x"]) == (60, 28, 28) and read_idx_header(files["test_y"]) == (30,)
    check_idx_files(files)


def test_torchvision_layout_is_found_below_data_dir(tmp_path: Path) -> None:
    write_fashion_mnist(tmp_path / "FashionMNIST" / "raw", gz=False)
    files = find_idx_files(tmp_path)
    assert files is not None and files["train_x"] == tmp_path / "FashionMNIST" / "raw" / "train-images-idx3-ubyte"


def test_loader_gives_the_pixels_labels_and_resize_of_the_files(tmp_path: Path) -> None:
    written = write_fashion_mnist(tmp_path)
    native = load_fashion_mnist(str(tmp_path), 28)
    assert native.num_classes == 10 and native.train_x.shape == (60, 3, 28, 28)
    for channel in range(3):
        assert torch.equal(native.train_x[:, channel], torch.from_numpy(written["train_x"]).float())
        assert torch.equal(native.test_x[:, channel], torch.from_numpy(written["test_x"]).float())
    assert native.train_y.tolist() == written["train_y"].tolist()
    assert native.test_y.tolist() == written["test_y"].tolist()
    resized = load_fashion_mnist(str(tmp_path), 32)
    expected = F.interpolate(
        torch.from_numpy(written["train_x"]).float()[:, None], size=(32, 32), mode="bilinear", align_corners=False
    ).clamp(0, PIXEL_MAX)
    assert torch.equal(resized.train_x[:, 2:3], expected)


def test_task_protocol_on_fashion_files(tmp_path: Path, make_cfg) -> None:
    written = write_fashion_mnist(tmp_path / "fm")
    cfg = make_cfg(
        "task=fashion_mnist",
        "noise=pixels",
        f"task.data_dir={tmp_path / 'fm'}",
        "task.n2=8",
        "task.n1_ratio=2",
        "task.k=4",
        "task.n_test=4",
        "task.image_size=28",
        small=False,
    )
    tasks = make_image_tasks(cfg.task, cfg.noise, seed=5)
    assert tasks.task2.classes == [0, 6] and len(tasks.task1.classes) == 4
    assert not set(tasks.task1.classes) & {0, 6}
    assert len(tasks.task2.train) == 8 and len(tasks.task1.train) == 16 and len(tasks.task2.test) == 4
    assert torch.bincount(tasks.task2.train.y).tolist() == [4, 4]
    raw_labels = torch.from_numpy(written["train_y"].astype(np.int64))[tasks.task2.train.source_index]
    assert torch.equal(raw_labels, torch.tensor([0, 6])[tasks.task2.train.y])
    pixels = torch.from_numpy(written["train_x"][tasks.task2.train.source_index.numpy()]).float()
    expected = (pixels / PIXEL_MAX - cfg.task.mean[0]) / cfg.task.std[0]
    assert torch.allclose(tasks.task2.train.x[:, 1], expected, atol=1e-6)


def test_missing_files_are_one_line_naming_the_package_and_download(tmp_path: Path) -> None:
    task = OmegaConf.create({"name": "fashion_mnist", "data_dir": str(tmp_path / "nowhere"), "download": False})
    with pytest.raises(ConfigError) as err:
        check_data(task)
    message = str(err.value)
    assert "\n" not in message and message.startswith("task.data_dir=")
    assert "apt-get install dataset-fashion-mnist" in message and "task.download=true" in message
    check_data(OmegaConf.merge(task, {"download": True}))  # may fetch: not refused here
    with pytest.raises(ConfigError, match="apt-get install dataset-fashion-mnist"):
        load_fashion_mnist(str(tmp_path / "nowhere2"), 32)


def test_broken_headers_are_refused_without_reading_the_images(tmp_path: Path) -> None:
    write_fashion_mnist(tmp_path)
    task = OmegaConf.create({"name": "fashion_mnist", "data_dir": str(tmp_path), "download": False})
    check_data(task)
    labels = tmp_path / "t10k-labels-idx1-ubyte.gz"
    labels.write_bytes(gzip.compress(idx_bytes(np.zeros(29, dtype=np.uint8))))  # 29 labels for 30 images
    with pytest.raises(ConfigError, match="holds 30 images but .* holds 29 labels"):
        check_data(task)
    labels.write_bytes(gzip.compress(b"\x08\x03\x00\x00garbage"))
    with pytest.raises(ConfigError, match="is not an IDX file"):
        check_data(task)
    labels.write_bytes(b"not gzip at all")
    with pytest.raises(ConfigError, match="cannot be read"):
        check_data(task)
    with pytest.raises(IDXError, match="holds 3 bytes of data"):
        short = tmp_path / "short"
        short.write_bytes(idx_bytes(np.zeros((2, 2), dtype=np.uint8))[:-1])
        read_idx(short)


def test_preflight_does_not_import_torch() -> None:
    import subprocess

    code = (
        "import sys; from omegaconf import OmegaConf; from ptlab.checks import check_data; "
        "check_data(OmegaConf.create({'name': 'fashion_mnist', 'data_dir': 'nowhere', 'download': True})); "
        "print('torch' in sys.modules)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "False"


def test_pipeline_on_fashion_files(make_cfg, tmp_path: Path) -> None:
    write_fashion_mnist(tmp_path / "fm", per_class_test=4)
    cfg = make_cfg(
        "experiment=table1_fashion",
        "+pair=vgg16_small_vgg11_small",
        f"task.data_dir={tmp_path / 'fm'}",
        "task.n2=6",
        "task.n1_ratio=2",
        "task.n_test=8",
        "train.upstream_epochs=1",
        "train.downstream_epochs=1",
        small=False,
    )
    summary = run_pipeline(cfg, tmp_path / "out")
    assert summary["data"]["n2"] == 6 and summary["data"]["n1"] == 12 and summary["data"]["n2_test"] == 8
    assert summary["data"]["task1_classes"] == [1, 2, 3, 4, 5, 7, 8, 9]
    for stage in ("upstream", "transfer", "scratch"):
        assert 0.0 <= summary[stage]["test_acc"] <= 1.0


@pytest.mark.slow
@pytest.mark.skipif(
    not (DEBIAN / "train-images-idx3-ubyte.gz").is_file(), reason="dataset-fashion-mnist not installed (make data)"
)
def test_real_fashion_mnist_pipeline_through_the_cli(tmp_path: Path) -> None:
    raw = load_fashion_mnist(str(DEBIAN), 32)
    assert raw.train_x.shape == (60000, 3, 32, 32) and raw.test_x.shape == (10000, 3, 32, 32)
    assert torch.bincount(raw.train_y).tolist() == [6000] * 10 and torch.bincount(raw.test_y).tolist() == [1000] * 10
    assert raw.train_y[:5].tolist() == [9, 0, 0, 3, 0]  # the data set's first labels: ankle boot, T-shirt, ...
    done = run_cli(
        [
            "task=fashion_mnist",
            "+pair=resnet34_small_resnet18_small",
            "task.n2=20",
            "task.n_test=50",
            "train.upstream_epochs=1",
            "train.downstream_epochs=1",
            "train.progress_bar=false",
            f"logger.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}",
            f"cache.dir={tmp_path / 'cache'}",
        ],
        cwd=tmp_path,
        timeout=900,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "transfer - scratch test accuracy" in done.stdout


def test_fashion_presets_compose_as_their_comments_say(make_cfg) -> None:
    from ptlab.config import validate
    from tests.conftest import REPO

    for pair, arch in (("resnet34_small_resnet18_small", "resnet18"), ("vgg16_small_vgg11_small", "vgg11")):
        cfg = make_cfg("experiment=table1_fashion", f"+pair={pair}", small=False)
        validate(cfg)
        assert (cfg.model.arch, cfg.model.width, cfg.upstream_model.width) == (arch, 0.125, 0.125)
        assert (cfg.task.name, list(cfg.task.task2_classes), cfg.task.n2, cfg.task.n_test) == ("fashion_mnist", [0, 6], 64, 1000)
    sweep = OmegaConf.load(REPO / "conf" / "experiment" / "table1_fashion.yaml").hydra.sweeper.params
    assert list(sweep) == ["seed", "+pair", "task.n1_ratio"]  # seed-major
    assert sweep["seed"] == "range(20)" and sweep["task.n1_ratio"] == "1,2,4,8"
    fig3 = make_cfg("experiment=fig3_fashion", "+pair=vgg16_small_vgg11_small", small=False)
    assert (fig3.task.n1_ratio, fig3.noise.sigma_p1, fig3.model.width) == (4.0, 0.0, 0.125)
    fig4 = make_cfg("experiment=fig4_fashion", small=False)
    validate(fig4)
    assert (fig4.model.name, fig4.model.depth, fig4.model.options.embed_dim, fig4.task.image_size) == ("deit_tiny", 12, 64, 28)
    assert list(fig4.transfer.layers) == [9, 10, 11] and fig4.task.n1_ratio == 10
