"""Training throughput (images/s) of the image LightningModule against a plain PyTorch loop.

Same model (same init), same in-memory data and mini-batch loader (``ImageDataModule``), same SGD
settings; on a GPU both use bf16 autocast (else fp16) and channels_last. The first epoch of each is a
warm-up and is not timed. The Lightning path includes everything an image stage does per step
(torchmetrics accuracy, ``self.log``), without a logger or validation.

Run from the repo root: ``python benchmarks/bench_image_throughput.py [--arch resnet18 --width 0.5
--images 2048 --batch-size 64 --epochs 3 --device auto]``.
"""

from __future__ import annotations

import argparse
import logging
import time

import pytorch_lightning as pl
import torch
import torch.nn.functional as F

from ptlab.data.images import ImageDataModule, ImageSet
from ptlab.models import build_torchvision_cnn
from ptlab.modules.image_classifier import ImageClassifier
from ptlab.seeding import torch_seed

NUM_CLASSES = 10


class EpochTimer(pl.Callback):
    """Wall time of every training epoch after the first (synchronised on a GPU)."""

    def __init__(self) -> None:
        self.seconds: list[float] = []
        self._start = 0.0

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize()
        self._start = time.perf_counter()

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize()
        if trainer.current_epoch > 0:
            self.seconds.append(time.perf_counter() - self._start)


def make_model(args: argparse.Namespace) -> torch.nn.Module:
    with torch_seed(0):
        return build_torchvision_cnn(args.arch, NUM_CLASSES, width=args.width)


def amp_dtype() -> torch.dtype:
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def plain_loop(args: argparse.Namespace, data: ImageDataModule, device: torch.device) -> float:
    """Images/s of a hand-written loop: forward, cross-entropy, backward, SGD step."""
    model = make_model(args).to(device)
    cuda = device.type == "cuda"
    if cuda:
        model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, weight_decay=5e-4)
    scaler = torch.amp.GradScaler(enabled=cuda and amp_dtype() == torch.float16)
    model.train()
    seconds, images = 0.0, 0
    for epoch in range(args.epochs):
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        for x, y in data.train_dataloader():
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            if cuda:
                x = x.contiguous(memory_format=torch.channels_last)
            with torch.autocast(device.type, dtype=amp_dtype(), enabled=cuda):
                loss = F.cross_entropy(model(x), y)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            if epoch > 0:
                images += len(y)
        if cuda:
            torch.cuda.synchronize()
        if epoch > 0:
            seconds += time.perf_counter() - start
    return images / seconds


def lightning_loop(args: argparse.Namespace, data: ImageDataModule, device: torch.device) -> float:
    """Images/s of ``ImageClassifier`` under a Lightning ``Trainer`` on the same data."""
    module = ImageClassifier(make_model(args), NUM_CLASSES, lr=args.lr, scheduler="constant")
    timer = EpochTimer()
    cuda = device.type == "cuda"
    precision = ("bf16-mixed" if amp_dtype() == torch.bfloat16 else "16-mixed") if cuda else "32-true"
    trainer = pl.Trainer(
        accelerator="gpu" if cuda else "cpu",
        devices=1,
        max_epochs=args.epochs,
        logger=False,
        callbacks=[timer],
        precision=precision,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
    )
    trainer.fit(module, train_dataloaders=data.train_dataloader())
    return len(data.train_set) * len(timer.seconds) / sum(timer.seconds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="resnet18")
    parser.add_argument("--width", type=float, default=0.5)
    parser.add_argument("--images", type=int, default=2048)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=3, help="including one untimed warm-up epoch")
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--repeats", type=int, default=2, help="alternating runs of each path; best is kept")
    args = parser.parse_args()
    logging.getLogger("pytorch_lightning").setLevel(logging.WARNING)
    device = torch.device("cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available()) else "cpu")
    gen = torch.Generator().manual_seed(0)
    images = ImageSet(
        torch.randn(args.images, 3, 32, 32, generator=gen),
        torch.randint(0, NUM_CLASSES, (args.images,), generator=gen),
        torch.arange(args.images),
    )
    plain, lightning = [], []
    pin = device.type == "cuda"
    for _ in range(args.repeats):
        plain.append(plain_loop(args, ImageDataModule(images, images, args.batch_size, pin_memory=pin), device))
        lightning.append(lightning_loop(args, ImageDataModule(images, images, args.batch_size, pin_memory=pin), device))
    print(
        f"device={device.type} threads={torch.get_num_threads()} arch={args.arch} width={args.width} "
        f"batch={args.batch_size} images/epoch={args.images} timed epochs={args.epochs - 1} repeats={args.repeats}"
    )
    print(f"plain PyTorch loop : {max(plain):9.1f} images/s  (runs: {', '.join(f'{v:.1f}' for v in plain)})")
    print(f"Lightning module   : {max(lightning):9.1f} images/s  (runs: {', '.join(f'{v:.1f}' for v in lightning)})")
    print(f"Lightning / plain  : {max(lightning) / max(plain):.3f}x")


if __name__ == "__main__":
    main()
