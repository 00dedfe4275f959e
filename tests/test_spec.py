"""The typed spec: a composed config parsed once into read-only schema instances, equal on both of its paths."""

from __future__ import annotations

import ast
import dataclasses
from pathlib import Path

import pytest

from ptlab.cli import compose_config
from ptlab.config import LoggerSchema, SyntheticTaskSchema, TrainSchema, ViTSchema
from ptlab.errors import ConfigError
from ptlab.spec import PipelineSpec, from_resolved, parse, resolved_config, schema_types

PRESETS = [
    [],
    ["task=digits"],
    ["experiment=fig4_digits"],
    ["experiment=kou2023"],
    ["regularizer=l2sp"],
    ["transfer=none", "train.dtype=float64"],
]


@pytest.mark.parametrize("overrides", PRESETS, ids=lambda o: " ".join(o) or "default")
def test_parse_equals_the_resolved_path(overrides: list[str]) -> None:
    """``parse`` (the single run) and ``from_resolved`` (the batched launcher's templates) give equal specs, whose
    ``resolved`` is the config without hydra and whose groups hold what the config holds."""
    cfg = compose_config(["logger=none", *overrides])
    spec = parse(cfg)
    again = from_resolved(resolved_config(cfg), schema_types(cfg))
    assert spec == again and dict(spec.resolved) == dict(again.resolved)
    assert "hydra" not in spec.resolved and spec.seed == cfg.seed
    for group in ("task", "train", "transfer", "model", "logger"):
        assert dataclasses.asdict(getattr(spec, group)) == dict(spec.resolved[group]), group
    assert dict(spec.engine) == dict(spec.resolved["engine"]) and spec.engine_name == cfg.engine.name


def test_groups_are_their_schemas_and_read_only() -> None:
    spec = parse(compose_config(["logger=none", "task.d=321"]))
    assert isinstance(spec.task, SyntheticTaskSchema) and isinstance(spec.train, TrainSchema)
    assert isinstance(spec.logger, LoggerSchema) and spec.task.d == 321 and spec.synthetic
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.task.d = 5
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.seed = 3  # type: ignore[misc]
    with pytest.raises(TypeError):
        spec.engine["name"] = "lightning"  # type: ignore[index]
    assert isinstance(parse(compose_config(["logger=none", "experiment=fig4_digits"])).model, ViTSchema)


def test_schemas_stay_writable_while_hydra_composes() -> None:
    """Only a parsed instance is read-only: a fresh schema instance (what OmegaConf builds while it checks) is not."""
    task = SyntheticTaskSchema()
    task.d = 10
    assert task.d == 10


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("transfer.alpha", 1.5, "transfer.alpha=1.5 is not allowed: must be in [0, 1]"),
        ("task.d", 3, "task.d=3 is not allowed"),
        ("train.dtype", "float16", "train.dtype='float16' is not allowed"),
    ],
)
def test_from_resolved_refuses_a_bad_value_naming_its_key(key: str, value: object, message: str) -> None:
    cfg = compose_config(["logger=none"])
    resolved = resolved_config(cfg)
    group, leaf = key.split(".")
    resolved[group][leaf] = value
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        from_resolved(resolved, schema_types(cfg))


BELOW_THE_CLI = [
    "ptlab/pipeline/run.py",
    "ptlab/pipeline/synthetic.py",
    "ptlab/pipeline/images.py",
    "ptlab/pipeline/cache.py",
    "ptlab/pipeline/checkpoints.py",
    "ptlab/pipeline/resume.py",
    "ptlab/pipeline/transferability.py",
    "ptlab/pipeline/record.py",
    "ptlab/theory.py",
    "ptlab/devices.py",
    *sorted(
        str(p.relative_to(Path(__file__).parents[1])) for p in (Path(__file__).parents[1] / "ptlab" / "engines").rglob("*.py")
    ),
]


def test_nothing_below_the_cli_takes_a_config() -> None:
    """The driver, stage runners, engines, cache, checkpoints, resume, theory and devices take the spec or its parts:
    no parameter named ``cfg`` or typed ``DictConfig`` (``run_pipeline``, the boundary, also takes a composed config
    and parses it)."""
    root = Path(__file__).parents[1]
    found = []
    for name in BELOW_THE_CLI:
        for node in ast.walk(ast.parse((root / name).read_text())):
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) or node.name == "run_pipeline":
                continue
            for arg in [*node.args.args, *node.args.kwonlyargs]:
                annotation = ast.unparse(arg.annotation) if arg.annotation is not None else ""
                if arg.arg == "cfg" or "DictConfig" in annotation:
                    found.append(f"{name}:{node.lineno} {node.name}({arg.arg}: {annotation})")
    assert not found, found
    assert PipelineSpec.__dataclass_params__.frozen  # type: ignore[attr-defined]
