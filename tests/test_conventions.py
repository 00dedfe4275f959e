"""Lightning's ``trainer.*`` keys reach the Trainer or are refused with ptlab's key; image tasks get a model."""

from __future__ import annotations

import pytest
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate

from ptlab.cli import compose_config, preflight
from ptlab.config import STAGE_TRAINER_KEYS, ConfigError, validate
from tests.conftest import run_cli


@pytest.mark.parametrize(
    "override,pointer",
    [
        ("+trainer.max_epochs=1", "train.upstream_epochs and train.downstream_epochs"),
        ("trainer.max_epochs=3", "train.upstream_epochs and train.downstream_epochs"),
        ("++trainer.max_steps=5", "train.upstream_steps and train.downstream_steps"),
        ("+trainer.precision=16-mixed", "train.precision"),
        ("trainer.enable_progress_bar=true", "train.progress_bar"),
        ("+trainer.logger=false", "logger=mlflow or logger=none"),
    ],
)
def test_a_trainer_key_ptlab_sets_per_stage_is_refused_with_ptlabs_key(override, pointer):
    key, _, value = override.lstrip("+").partition("=")
    error = preflight([override])
    assert error == f"{key}={value} is not allowed: ptlab sets it for each stage; use " + error.split("use ", 1)[1]
    assert pointer in error and "\n" not in error and "warmup" not in error


def test_a_config_file_setting_a_stage_trainer_key_is_refused_too():
    """A preset's ``trainer.max_epochs`` is checked on the composed config (``validate``), not only on argv."""
    assert "trainer.max_epochs=2 is not allowed" in preflight(["-m", "+trainer.max_epochs=2", "seed=0,1"])
    cfg = compose_config(["+trainer.max_epochs=2"])
    with pytest.raises(ConfigError, match=r"^trainer.max_epochs=2 is not allowed: ptlab sets it for each stage"):
        validate(cfg)
    assert set(STAGE_TRAINER_KEYS) >= {"max_epochs", "max_steps", "precision", "logger", "callbacks"}


def test_plus_trainer_max_epochs_exits_2_with_one_line_before_anything_runs(tmp_path):
    result = run_cli(["+trainer.max_epochs=1"], cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        (
            "ptlab: trainer.max_epochs=1 is not allowed: ptlab sets it for each stage; use train.upstream_epochs "
            "and train.downstream_epochs (image tasks) or train.upstream_steps and train.downstream_steps (synthetic)"
        )
    ]
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "outputs").exists()


def test_other_trainer_keys_reach_the_trainer():
    cfg = compose_config(["engine=lightning", "+trainer.gradient_clip_val=0.25", "+trainer.deterministic=true"])
    assert preflight(["engine=lightning", "+trainer.gradient_clip_val=0.25"]) is None
    trainer = instantiate(cfg.trainer, max_steps=1, logger=False, enable_progress_bar=False)
    assert trainer.gradient_clip_val == 0.25 and trainer.max_steps == 1


@pytest.mark.parametrize("task", ["digits", "cifar10", "cifar100", "image_folder"])
def test_an_image_task_alone_gets_a_default_image_model(task):
    cfg = compose_config([f"task={task}"])
    choices = HydraConfig.get().runtime.choices
    assert (choices.model, choices.upstream_model, choices.engine) == ("resnet18_small", "same", "lightning")
    assert cfg.model.arch == cfg.upstream_model.arch == "resnet18" and cfg.model.width == 0.25
    if task == "digits":
        assert preflight(["task=digits"]) is None


@pytest.mark.parametrize(
    "overrides,model,upstream",
    [
        (["task=digits", "model=vgg11_small"], "vgg11_small", "same"),
        (["task=digits", "+pair=vgg16_small_vgg11_small"], "vgg11_small", "vgg16_small"),
        (["task=digits", "upstream_model=resnet34_small"], "resnet18_small", "resnet34_small"),
        (["experiment=fig3_digits"], "resnet18_small", "same"),
        ([], "toy_cnn", "same"),
    ],
)
def test_a_named_model_pair_or_preset_wins_over_the_tasks_default(overrides, model, upstream):
    compose_config(overrides)
    choices = HydraConfig.get().runtime.choices
    assert (choices.model, choices.upstream_model) == (model, upstream)
