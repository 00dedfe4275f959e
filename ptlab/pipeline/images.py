"""The image pipeline (every image task): upstream on task 1 -> transfer -> task 2, beside scratch.

Reusable API (any ``nn.Module`` classifier, e.g. a timm ViT, plugs in through Hydra ``instantiate``):

- ``build_image_tasks(spec) -> ImageTasks``: ``.task1`` / ``.task2`` (``ImageTask``: ``train``/``test``
  ``ImageSet`` with normalised ``x`` (N, 3, H, W) float32 and ``y`` (N,) in 0..C-1, ``classes``,
  ``num_classes``), ``.image_size``, ``.channels``. Data stay at their native size (32x32).
- ``build_image_model(spec, num_classes, stream) -> nn.Module``: ``instantiate`` of the stream's model config
  (``upstream_model`` or ``model``) with ``num_classes``, the init drawn from the ``stream`` sub-seed
  of ``spec.seed`` (``"upstream"``; ``"downstream"`` for transfer and scratch, so their fresh weights are
  identical). A model config that sets ``num_classes`` itself (e.g. a pretrained ImageNet upstream)
  keeps it.
- Image size hook: ``model_input_size(model)`` is ``model.input_size`` when the model has that
  attribute, else timm's ``model.patch_embed.img_size``, else ``None`` (native size). When set,
  ``ImageClassifier`` resizes every batch bilinearly on the device before the forward pass.
- ``fit_image_stage(spec, tracker, stage, model, task, epochs, callbacks) -> (ImageClassifier, result)``:
  one Lightning fit as the child run ``stage`` (curves logged live); ``result`` is a ``StageResult``
  whose ``final`` has ``train_acc``, ``test_acc``, ``train_loss``, ``test_loss``, ``epochs``
  (accuracies in eval mode after training), tracked by ``ptlab.pipeline.record.record_stage``.
- ``check_transfer_pair(spec, upstream, downstream)``: plans the transfer on the fresh models before
  any training; a pair with nothing to match stops the run with one ``ConfigError`` line.
- ``run_images(spec, engine, tracker)``: the image recipe registered in ``ptlab.pipeline.run.RECIPES``.
  ``train.upstream_epochs=0`` skips upstream training (the upstream model is used as built, e.g.
  from ``weights_path``). The transfer stage's ``plan`` is a list of ``PlanRow`` dicts, printed,
  logged as ``transfer_plan.json`` / ``transfer_plan.md`` on the transfer child run, and returned.

Budgets and optimisation come from ``train.*``: ``upstream_epochs``, ``downstream_epochs``,
``batch_size``, ``lr``, ``optimizer``, ``momentum``, ``weight_decay``, ``scheduler``, ``precision``
(``auto``: bf16-mixed, else 16-mixed, on a GPU; 32-true on a CPU), ``progress_bar``,
``eval_every_epochs``; ``scratch_budget`` (``matched``: scratch trains upstream + downstream epochs).
``transfer.control`` replaces the inherited filters after the copy (``ptlab.transfer.controls``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import pytorch_lightning as pl
import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from pytorch_lightning.callbacks import LearningRateMonitor
from tabulate import tabulate
from torch import nn

from ptlab.config import ConfigError, TrainSchema, scratch_length
from ptlab.data.images import ImageDataModule, ImageTask, ImageTasks, image_seed, make_image_tasks
from ptlab.engines.base import StageResult
from ptlab.engines.lightning import quiet_lightning
from ptlab.modules.callbacks import StageProgressBar
from ptlab.modules.image_classifier import ImageClassifier
from ptlab.modules.regularizers import Regularizer
from ptlab.pipeline import transferability
from ptlab.pipeline.checkpoints import stage_checkpointing
from ptlab.pipeline.record import record_stage
from ptlab.seeding import derive_seed, torch_seed
from ptlab.spec import PipelineSpec
from ptlab.tracking.base import Tracker
from ptlab.transfer.adapters import PlanRow, find_adapter
from ptlab.transfer.apply import Transfer
from ptlab.transfer.callback import ParameterTransfer
from ptlab.transfer.options import adapter_options
from ptlab.transfer.selection import SelectionInputs, build_strategy


def build_image_tasks(spec: PipelineSpec) -> ImageTasks:
    """Task 1 and task 2 of ``spec.task`` with ``spec.noise`` under ``spec.seed``."""
    return make_image_tasks(spec.task, spec.noise, spec.seed)


def build_image_model(spec: PipelineSpec, num_classes: int, stream: str) -> nn.Module:
    """``instantiate`` the model of ``stream`` (``PipelineSpec.model_config``) with ``num_classes`` and its init from
    the ``stream`` sub-seed; a ``ConfigError`` of the model factory (e.g. missing weights) comes out as one line."""
    node = spec.model_config(stream)
    extra = {} if node.get("num_classes") is not None else {"num_classes": num_classes}
    with torch_seed(derive_seed(spec.seed, stream)):
        try:
            return instantiate(node, **extra)
        except InstantiationException as err:
            if isinstance(err.__cause__, ConfigError):
                key = "upstream_model" if stream == "upstream" else "model"
                raise ConfigError(f"{key}.{err.__cause__}") from None
            raise


def model_input_size(model: nn.Module) -> int | None:
    """The square input size ``model`` needs (see the module docstring), or ``None`` for native size."""
    size = getattr(model, "input_size", None)
    if size is None:
        size = getattr(getattr(model, "patch_embed", None), "img_size", None)
    if isinstance(size, (tuple, list)):
        size = size[-1]
    return int(size) if size else None


def on_gpu(trainer: Mapping[str, Any]) -> bool:
    """Whether the trainer config runs on a CUDA device."""
    accelerator = str(trainer.get("accelerator", "cpu"))
    return accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available())


PRECISION_TAG = "ptlab.precision"
"""A stage run's tag: the precision Lightning trained it in, ``train.precision=auto`` resolved."""


def precision_for(precision: str, trainer: Mapping[str, Any]) -> str:
    """``train.precision``, with ``auto`` resolved to mixed precision on a GPU and 32-true on a CPU."""
    if precision != "auto":
        return precision
    if not on_gpu(trainer):
        return "32-true"
    return "bf16-mixed" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "16-mixed"


def make_classifier(
    train: TrainSchema, model: nn.Module, num_classes: int, regularizer: Regularizer | None = None
) -> ImageClassifier:
    """The ``ImageClassifier`` of ``model`` with the optimiser settings of ``train.*`` (and the transfer stage's
    ``regularizer``)."""
    return ImageClassifier(
        model,
        num_classes,
        lr=train.lr,
        optimizer=train.optimizer,
        momentum=train.momentum,
        weight_decay=train.weight_decay,
        scheduler=train.scheduler,
        warmup_epochs=train.warmup_epochs,
        label_smoothing=train.label_smoothing,
        input_size=model_input_size(model),
        regularizer=regularizer,
    )


def fit_image_stage(
    spec: PipelineSpec,
    tracker: Tracker,
    stage: str,
    model: nn.Module,
    task: ImageTask,
    epochs: int,
    callbacks: list[pl.Callback] | None = None,
) -> tuple[ImageClassifier, StageResult]:
    """Train ``model`` on ``task`` for ``epochs`` epochs as the child run ``stage``; return the module and
    the tracked stage. Transfer and scratch share the ``downstream`` batch order."""
    train = spec.train
    regularizer = Regularizer.from_config(spec.regularizer) if stage == "transfer" else None
    module = make_classifier(train, model, task.num_classes, regularizer)
    order = "upstream" if stage == "upstream" else "downstream"
    data = ImageDataModule(
        task.train, task.test, train.batch_size, seed=image_seed(spec.seed, f"batches/{order}"), pin_memory=on_gpu(spec.trainer)
    )
    logger = tracker.stage_logger(stage)
    monitors = [LearningRateMonitor(logging_interval="epoch")] if logger is not None else []
    checkpointing = stage_checkpointing(spec, stage)
    trainer: pl.Trainer = instantiate(
        dict(spec.trainer),
        max_epochs=epochs,
        logger=logger if logger is not None else False,
        callbacks=[
            *(callbacks or []),
            *monitors,
            *checkpointing.callbacks,
            *([StageProgressBar(stage)] if train.progress_bar else []),
        ],
        **checkpointing.trainer_kwargs,
        precision=precision_for(train.precision, spec.trainer),
        enable_progress_bar=train.progress_bar,
        num_sanity_val_steps=0,
        log_every_n_steps=1,
        check_val_every_n_epoch=train.eval_every_epochs,
    )
    trainer.fit(module, datamodule=data, ckpt_path=checkpointing.ckpt_path)
    tracker.set_tags({PRECISION_TAG: str(trainer.precision)}, stage=stage)  # what ran (train.precision may say auto)
    train_eval = module.evaluate(data.eval_dataloader(task.train))
    test_eval = module.evaluate(data.eval_dataloader(task.test))
    final = {
        "train_acc": train_eval["acc"],
        "test_acc": test_eval["acc"],
        "train_loss": train_eval["loss"],
        "test_loss": test_eval["loss"],
        "epochs": epochs,
    }
    plan = next((c.plan for c in callbacks or [] if isinstance(c, ParameterTransfer)), None)
    result = StageResult(stage, None, final, plan=plan, steps=trainer.global_step)
    record_stage(tracker, result)
    return module, result


def check_transfer_pair(spec: PipelineSpec, upstream: nn.Module, downstream: nn.Module) -> None:
    """Plan the transfer on the untrained models (shapes are all a plan needs, so the cheap ``first``
    selection stands in for the configured one); one-line ``ConfigError``
    naming the pair when no rule or no layer matches."""
    try:
        adapter = find_adapter(upstream, downstream)(**adapter_options(spec.resolved["transfer"]))
        adapter.plan(upstream, downstream, spec.transfer.alpha, build_strategy("first"), torch.Generator().manual_seed(0))
    except ValueError as err:
        pair = f"upstream_model={model_name(spec, 'upstream')} -> model={model_name(spec, 'downstream')}"
        raise ConfigError(f"{pair}: {err}") from None


def selection_inputs(spec: PipelineSpec, task2: ImageTask) -> SelectionInputs:
    """The task-2 batches a data-driven strategy reads (its ``batches`` option, of ``train.batch_size``
    images in a seeded order of their own, docs/design.md section 7); none for weight-only strategies."""
    strategy = build_strategy(spec.transfer.selection)
    if "batches" not in strategy.needs or spec.transfer.kind != "filters":
        return SelectionInputs()
    order = torch.randperm(len(task2.train), generator=torch.Generator().manual_seed(image_seed(spec.seed, "selection/batches")))
    size = spec.train.batch_size
    chunks = [order[i : i + size] for i in range(0, len(order), size)][: strategy.batches]
    return SelectionInputs(batches=[(task2.train.x[idx], task2.train.y[idx]) for idx in chunks])


def model_name(spec: PipelineSpec, stream: str) -> str:
    """The architecture the model of ``stream`` names (``arch``, ``name`` or its ``_target_``)."""
    node = spec.model_config(stream)
    return str(node.get("arch", node.get("name", node.get("_target_", "?"))))


def format_plan(plan: list[PlanRow]) -> str:
    """The plan as a text table: downstream layer, upstream layer, filters copied of total."""
    rows = [(row.target, row.source or "-", f"{row.copied}/{row.total}") for row in plan]
    return tabulate(rows, headers=("downstream layer", "upstream layer", "copied/total"), tablefmt="github")


def run_images(spec: PipelineSpec, engine: Any, tracker: Tracker) -> tuple[dict[str, StageResult], dict[str, Any]]:
    """Algorithms 1 and 2 on image tasks for one seed; returns the trained stages and the data sizes.
    (Image stages are Lightning fits of ``ImageClassifier``; ``engine`` is the Lightning engine.)"""
    quiet_lightning()
    tasks = build_image_tasks(spec)
    train, transfer_cfg = spec.train, spec.transfer
    extra = {
        "data": {
            "task1_classes": tasks.task1.classes,
            "task2_classes": tasks.task2.classes,
            "n1": len(tasks.task1.train),
            "n2": len(tasks.task2.train),
            "n1_test": len(tasks.task1.test),
            "n2_test": len(tasks.task2.test),
        }
    }
    results: dict[str, StageResult] = {}
    tracker.log_metrics({"data/n1": len(tasks.task1.train), "data/n2": len(tasks.task2.train)})
    device = transferability.score_device(on_gpu(spec.trainer))
    if transfer_cfg.kind != "none":
        upstream = build_image_model(spec, tasks.task1.num_classes, "upstream")
        downstream = build_image_model(spec, tasks.task2.num_classes, "downstream")
        check_transfer_pair(spec, upstream, downstream)
        if train.upstream_epochs > 0:
            _, results["upstream"] = fit_image_stage(spec, tracker, "upstream", upstream, tasks.task1, train.upstream_epochs)
        transfer = ParameterTransfer(
            Transfer(
                upstream,
                transfer_cfg.alpha,
                transfer_cfg.selection,
                derive_seed(spec.seed, "selection"),
                options=adapter_options(spec.resolved["transfer"]),
                inputs=selection_inputs(spec, tasks.task2),
                control=transfer_cfg.control,
                control_seed=derive_seed(spec.seed, "control"),
            )
        )
        if transferability.enabled(spec):
            extra["transferability"] = transferability.image_scores(
                spec,
                tracker,
                upstream,
                downstream,
                transfer.transfer,
                tasks.task2.train.x,
                tasks.task2.train.y,
                device,
                model_input_size,
            )
        _, results["transfer"] = fit_image_stage(
            spec, tracker, "transfer", downstream, tasks.task2, train.downstream_epochs, [transfer]
        )
        table = format_plan(transfer.plan)
        print(
            f"transfer plan ({model_name(spec, 'upstream')} -> {model_name(spec, 'downstream')}, "
            f"alpha={transfer_cfg.alpha}):\n{table}"
        )
        tracker.log_text(table + "\n", "transfer_plan.md", stage="transfer")
        copied = sum(row.copied for row in transfer.plan)
        tracker.log_metrics(
            {"transfer/filters_copied": copied, "transfer/layers_matched": sum(1 for row in transfer.plan if row.copied)}
        )
        results["transfer"].extra["regularizer"] = Regularizer.from_config(spec.regularizer).as_dict()
        results["transfer"].extra["control"] = transfer_cfg.control
        del upstream
    scratch = build_image_model(spec, tasks.task2.num_classes, "downstream")
    if transfer_cfg.kind == "none" and transferability.enabled(spec):
        extra["transferability"] = transferability.image_scores(
            spec, tracker, None, scratch, None, tasks.task2.train.x, tasks.task2.train.y, device, model_input_size
        )
    epochs = scratch_length(train.upstream_epochs, train.downstream_epochs, train.scratch_budget)
    _, results["scratch"] = fit_image_stage(spec, tracker, "scratch", scratch, tasks.task2, epochs)
    results["scratch"].extra["budget"] = train.scratch_budget
    return results, extra
