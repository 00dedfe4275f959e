"""``python -m ptlab``: the main command end to end, and bad input rejected before anything runs."""

import json
import re

import pytest
from mlflow.tracking import MlflowClient
from omegaconf import OmegaConf

from ptlab.cli import compose_job, job_configs, job_override_sets, preflight
from tests.conftest import SMALL, run_cli


def test_main_command_runs_a_pipeline_into_the_start_directory(tmp_path):
    result = run_cli([*SMALL, "hydra.run.dir=out", "cache.dir=cache"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert set(summary) >= {"upstream", "transfer", "scratch", "mlflow"}
    assert "transfer - scratch test accuracy" in result.stdout
    assert summary["mlflow"]["tracking_uri"] == f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(summary["mlflow"]["tracking_uri"])
    parent = client.get_run(summary["mlflow"]["parent_run_id"])
    assert parent.info.status == "FINISHED"
    assert client.get_experiment(parent.info.experiment_id).name == "default"


BAD_INPUT = [
    ("transfer.alpha=1.5", "transfer.alpha=1.5 is not allowed: must be in [0, 1]"),
    ("transfer.alpha=-0.1", "transfer.alpha=-0.1 is not allowed: must be in [0, 1]"),
    ("task.d=0", "task.d=0 is not allowed: must be > 0"),
    ("model.width=0", "model.width=0 is not allowed: must be > 0"),
    ("task.n1=0", "task.n1=0 is not allowed: must be > 0"),
    ("task.n2=-3", "task.n2=-3 is not allowed: must be > 0"),
    ("train.upstream_steps=0", "train.upstream_steps=0 is not allowed: must be > 0"),
    ("train.downstream_steps=-1", "train.downstream_steps=-1 is not allowed: must be > 0"),
    ("noise.sigma_p2=-0.5", "noise.sigma_p2=-0.5 is not allowed: must be >= 0"),
    ("task.label_noise=0.5", "task.label_noise=0.5 is not allowed: must be in [0, 0.5)"),
    ("transfer.selection=best", "transfer.selection='best' is not allowed: must be one of random"),
    ("model=nope", "model=nope is not an option: choose one of"),
    ("transfer=some", "transfer=some is not an option: choose one of filters"),
    ("task.d=abc", "task.d: Value 'abc' of type 'str' could not be converted to Integer"),
    ("task.n1=2.5", "task.n1: Value '2.5' of type 'float' could not be converted to Integer"),
]


@pytest.mark.parametrize("override,message", BAD_INPUT)
def test_bad_input_gives_one_line_naming_the_key_and_what_is_allowed(override, message):
    error = preflight([override])
    assert error is not None and message in error
    assert "\n" not in error


def test_a_bad_value_inside_a_sweep_stops_the_whole_multirun():
    assert "transfer.alpha=2.0 is not allowed" in preflight(["-m", "transfer.alpha=0.5,2.0"])
    assert preflight(["-m", "transfer.alpha=0.0,0.5,1.0", "seed=0,1"]) is None


def test_bad_input_exits_nonzero_before_anything_is_tracked(tmp_path):
    result = run_cli(["transfer.alpha=1.5"], cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip() == "ptlab: transfer.alpha=1.5 is not allowed: must be in [0, 1]"
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "outputs").exists()
    unknown = run_cli(["model=resnet_nope"], cwd=tmp_path)
    assert unknown.returncode == 2 and len(unknown.stderr.strip().splitlines()) == 1
    assert "model=resnet_nope is not an option: choose one of" in unknown.stderr
    assert "toy_cnn" in unknown.stderr


def test_preset_sweeps_are_checked_with_their_own_params():
    assert preflight(["-m", "experiment=table1_digits"]) is None  # the preset sweeps +pair itself
    assert "seed=-1 is not allowed" in preflight(["-m", "experiment=table1_digits", "seed=-1"])
    assert "task.n1=-1 is not allowed" in preflight(["-m", "experiment=fig1a_small", "task.n1=5,-1"])


def test_a_model_that_does_not_fit_the_task_is_rejected():
    assert "model=toy_cnn is not allowed with task=digits: must be an image model" in preflight(["task=digits", "model=toy_cnn"])
    assert "is not allowed with task=synthetic: must be toy_cnn" in preflight(["model=resnet18"])
    assert preflight(["task=digits", "+pair=vgg16_small_vgg11_small"]) is None


def test_what_the_gram_engine_cannot_run_is_rejected_before_anything_runs():
    assert "transfer.kind='layers' is not allowed with engine=gram: must be one of none, filters" in preflight(
        ["engine=gram", "transfer=layers"]
    )
    assert "task=digits is not allowed with engine=gram: must be synthetic" in preflight(
        ["engine=gram", "task=digits", "+pair=vgg16_small_vgg11_small"]
    )
    assert "upstream_model.width=8 is not allowed with engine=gram: filter transfer needs equal weight shapes" in preflight(
        ["engine=gram", "upstream_model=toy_cnn", "upstream_model.width=8"]
    )
    assert "is not allowed with engine=gram" in preflight(["-m", "engine=lightning,gram", "transfer=layers"])
    assert preflight(["engine=gram", "transfer=none", "upstream_model=toy_cnn", "upstream_model.width=8"]) is None


def test_sweep_values_reuse_one_composition() -> None:
    """``job_configs`` gives every job of a value sweep the config a full Hydra compose gives it, and setting one
    job's values leaves the next job's untouched."""
    jobs = job_override_sets(["task.d=50,80,120", "seed=1,2", "transfer.alpha=0.25"])
    configs = list(job_configs(jobs, multirun=True))
    assert [cfg.task.d for cfg, _ in configs] == [50, 80, 120] and [cfg.seed for cfg, _ in configs] == [1, 2, 2]
    for (cfg, _), job in zip(configs, jobs):
        full, _ = compose_job(job, multirun=True)
        assert OmegaConf.to_container(cfg, resolve=True) == OmegaConf.to_container(full, resolve=True)


def test_a_bad_sweep_value_names_its_key_once() -> None:
    assert preflight(["-m", "task.d=50,abc"]) == "task.d: Value 'abc' of type 'str' could not be converted to Integer"


def test_a_run_composes_its_config_once_and_writes_what_hydra_main_writes(tmp_path, monkeypatch):
    """A plain run starts from the preflight's composition (``run_composed``); ``--config-name config`` takes
    ``@hydra.main``'s own path (two more compositions): the same run folder, ``.hydra/`` files, log and results."""
    import sys

    from hydra._internal.config_loader_impl import ConfigLoaderImpl

    import ptlab.cli

    args = [*SMALL, "logger=none", "cache.enabled=false", "seed=2"]
    counted = []
    original = ConfigLoaderImpl.load_configuration
    monkeypatch.setattr(
        ConfigLoaderImpl, "load_configuration", lambda self, *a, **k: counted.append(1) or original(self, *a, **k)
    )
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["ptlab", *args, "hydra.run.dir=composed"])
    ptlab.cli.main()
    assert len(counted) == 1
    hydra_path = run_cli(["--config-name", "config", *args, "hydra.run.dir=hydra_main"], cwd=tmp_path)
    assert hydra_path.returncode == 0, hydra_path.stderr[-2000:]

    def written(folder: str) -> dict:
        out = tmp_path / folder
        hydra = OmegaConf.load(out / ".hydra" / "hydra.yaml").hydra
        summary = json.loads((out / "summary.json").read_text())
        return {
            "config": OmegaConf.load(out / ".hydra" / "config.yaml"),
            "overrides": OmegaConf.load(out / ".hydra" / "overrides.yaml"),
            "hydra": {
                "mode": hydra.mode,
                "overrides": hydra.overrides.hydra[-1:],
                "job": hydra.job.name,
                "choices": hydra.runtime.choices,
                "callbacks": hydra.callbacks,
            },
            "log": [
                re.sub(r"\(\d+\.\d+ s\)", "(t s)", line.split(" - ", 1)[1])  # timings differ between runs
                for line in (out / "ptlab.log").read_text().splitlines()
                if " - " in line and " done in " not in line
            ],
            "results": {stage: summary[stage]["test_acc"] for stage in ("upstream", "transfer", "scratch")},
        }

    composed, hydra_main = written("composed"), written("hydra_main")
    assert composed == hydra_main
    assert list(composed["overrides"]) == args
    assert composed["hydra"]["overrides"] == ["hydra.mode=RUN"] and composed["log"]
