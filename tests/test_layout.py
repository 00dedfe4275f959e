"""The package layout: no import cycles, engines below the pipeline, light imports where promised,
one registry mechanism, and a ``Tracker`` interface that rejects misspelled calls."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from ptlab.registry import Registry, UnknownName
from ptlab.tracking.base import MemoryTracker, NullTracker, Tracker

PACKAGE = Path(__file__).resolve().parent.parent / "ptlab"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """Module -> the ptlab modules it imports (at module level or inside functions)."""
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        targets: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                candidates = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                candidates = [a.name for a in node.names]
            else:
                continue
            targets |= {c for c in candidates if c in modules and c != name}
        graph[name] = targets
    return graph


def test_no_module_imports_itself_back() -> None:
    graph = import_graph()
    # package __init__ files only re-export their own submodules; leave them out of the cycle search
    nodes = {n: {t for t in ts if not (n.startswith(t + ".") or t.startswith(n + "."))} for n, ts in graph.items()}
    state: dict[str, int] = {}
    cycle: list[str] = []

    def visit(node: str, path: list[str]) -> bool:
        state[node] = 1
        for target in nodes[node]:
            if state.get(target) == 1:
                cycle.extend(path[path.index(target) :] + [target] if target in path else [node, target])
                return True
            if state.get(target) is None and visit(target, path + [target]):
                return True
        state[node] = 2
        return False

    for start in nodes:
        if state.get(start) is None and visit(start, [start]):
            break
    assert not cycle, " -> ".join(cycle)


def test_engines_import_nothing_from_the_pipeline_or_tracking() -> None:
    for name, targets in import_graph().items():
        if name.startswith("ptlab.engines"):
            bad = {t for t in targets if t.startswith(("ptlab.pipeline", "ptlab.tracking", "ptlab.report"))}
            assert not bad, f"{name} imports {bad}"


@pytest.mark.parametrize(
    "package",
    [
        "ptlab.config",
        "ptlab.data",
        "ptlab.models",
        "ptlab.transfer",
        "ptlab.engines",
        "ptlab.tracking",
        "ptlab.pipeline",
        "ptlab.report",
        "ptlab.cli",
    ],
)
def test_each_subpackage_imports_alone(package: str) -> None:
    done = subprocess.run([sys.executable, "-c", f"import {package}"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]


def test_cli_and_gram_pipeline_load_no_lightning_timm_or_torchvision(tmp_path: Path) -> None:
    script = f"""
import sys
import ptlab.cli
heavy = ("torch", "pytorch_lightning", "mlflow", "timm", "torchvision")
assert not [m for m in heavy if m in sys.modules], [m for m in heavy if m in sys.modules]
from ptlab.cli import compose_config
from ptlab.pipeline.run import run_pipeline
cfg = compose_config(["task.d=50", "task.n1=20", "task.n2=10", "task.n_test=20", "train.upstream_steps=5",
                      "train.downstream_steps=5", "model.width=4", "logger.tracking_uri=sqlite:///{tmp_path}/m.db",
                      "cache.dir={tmp_path}/cache"])
run_pipeline(cfg, "{tmp_path}/out")
print(sorted(m for m in ("pytorch_lightning", "lightning", "timm", "torchvision") if m in sys.modules))
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == "[]"


def test_registry_lists_names_resolves_references_and_rejects_unknown_ones() -> None:
    registry: Registry[object] = Registry("thing.kind")
    registry.add("path", "pathlib:Path")

    @registry.register("own")
    def own() -> None:
        return None

    assert registry.names() == ("path", "own")
    assert registry.get("path") is Path and registry.get("own") is own
    with pytest.raises(UnknownName, match=r"thing.kind='other' is not allowed: must be one of path, own"):
        registry.get("other")


def test_schema_reads_selection_names_from_their_registry() -> None:
    from ptlab.config import ConfigError, TransferSchema
    from ptlab.transfer.selection import SELECTIONS

    SELECTIONS.add("test_only_selection", "ptlab.transfer.selection:First")
    try:
        TransferSchema(selection="test_only_selection")
        with pytest.raises(ConfigError, match="one of random, first, largest_norm, .*, task2_alignment, test_only_selection"):
            TransferSchema(selection="nope")
    finally:
        SELECTIONS._entries.pop("test_only_selection")


@pytest.mark.parametrize("tracker", [NullTracker(), MemoryTracker()])
def test_trackers_implement_the_protocol_and_reject_misspelled_calls(tracker: Tracker) -> None:
    assert isinstance(tracker, Tracker)
    with pytest.raises(AttributeError):
        tracker.log_metric({"a": 1.0})  # type: ignore[attr-defined]
    with pytest.raises(AttributeError):
        tracker.log_paramz({"a": 1})  # type: ignore[attr-defined]


def test_memory_tracker_keeps_binary_artifacts_and_statuses(tmp_path: Path) -> None:
    png = tmp_path / "figure.png"
    png.write_bytes(b"\x89PNG\r\n\x1a\n\x00\xff")
    tracker = MemoryTracker(run_name="cell")
    with pytest.raises(RuntimeError):
        with tracker:
            tracker.start_stage("upstream")
            tracker.log_curves({"train/loss": [(0, 1.0), (1, 0.5)]}, stage="upstream")
            tracker.end_stage("upstream")
            tracker.start_stage("transfer")
            tracker.log_artifact(png)
            raise RuntimeError("boom")
    assert tracker.parent.artifacts["figure.png"] == png.read_bytes()
    assert [(k, v, s) for k, v, _, s in tracker.stages["upstream"].metrics] == [("loss/train", 1.0, 0), ("loss/train", 0.5, 1)]
    assert {name: run.status for name, run in tracker.stages.items()} == {"upstream": "FINISHED", "transfer": "FAILED"}
    assert tracker.parent.status == "FAILED" and tracker.parent.tags["ptlab.error"] == "RuntimeError: boom"


LAYERS: dict[str, set[str]] = {
    # package: the ptlab packages it may import (docs/design.md section 6, "package | owns | may import")
    "ptlab.errors": set(),
    "ptlab.registry": set(),
    "ptlab.lazy": set(),
    "ptlab.paths": set(),
    "ptlab.seeding": set(),
    "ptlab.utils": set(),
    "ptlab.context": {"ptlab.errors"},
    "ptlab.processes": {"ptlab.errors"},
    "ptlab.models": {"ptlab.errors", "ptlab.registry", "ptlab.lazy", "ptlab.seeding"},
    "ptlab.folder_checks": {"ptlab.errors"},
    "ptlab.store_checks": {"ptlab.errors", "ptlab.folder_checks", "ptlab.paths"},
    "ptlab.build_checks": {"ptlab.errors", "ptlab.seeding", "ptlab.utils", "ptlab.data.idx"},
    "ptlab.phase": {"ptlab.paths"},
    "ptlab.design": set(),
    "ptlab.checks": {
        "ptlab.errors",
        "ptlab.utils",
        "ptlab.registry",
        "ptlab.paths",
        "ptlab.models.name_check",
        "ptlab.models.weights",
        "ptlab.folder_checks",
        "ptlab.store_checks",
        "ptlab.build_checks",
        "ptlab.data.idx",
    },
    "ptlab.config": {"ptlab.errors", "ptlab.registry", "ptlab.lazy", "ptlab.paths", "ptlab.checks", "ptlab.transfer.selection"},
    "ptlab.spec": {"ptlab.config", "ptlab.errors"},
    "ptlab.compose": {"ptlab.config", "ptlab.errors"},
    "ptlab.theory": {"ptlab.config", "ptlab.spec", "ptlab.errors", "ptlab.paths", "ptlab.phase"},
    "ptlab.data": {"ptlab.errors", "ptlab.registry", "ptlab.lazy", "ptlab.seeding", "ptlab.config"},
    "ptlab.transfer": {"ptlab.models", "ptlab.errors", "ptlab.registry", "ptlab.lazy", "ptlab.seeding"},
    "ptlab.modules": {"ptlab.data", "ptlab.models", "ptlab.errors", "ptlab.lazy", "ptlab.seeding"},
    "ptlab.engines": {
        "ptlab.data",
        "ptlab.models",
        "ptlab.modules",
        "ptlab.transfer",
        "ptlab.seeding",
        "ptlab.errors",
        "ptlab.registry",
        "ptlab.lazy",
        "ptlab.config",
        "ptlab.spec",
        "ptlab.processes",
    },
    "ptlab.tracking": {"ptlab.errors", "ptlab.lazy", "ptlab.utils", "ptlab.paths", "ptlab.processes"},
    "ptlab.report": {
        "ptlab.tracking",
        "ptlab.registry",
        "ptlab.errors",
        "ptlab.lazy",
        "ptlab.paths",
        "ptlab.theory",
        "ptlab.utils",
        "ptlab.config",
        "ptlab.phase",
        "ptlab.design",
    },
}
"""Everything else (``ptlab.pipeline``, ``ptlab.devices``, ``ptlab.distributed``, ``ptlab.cli``, the entry points) sits
above these and may import them; nothing here may import the pipeline, the CLI or the launchers."""


def package_of(module: str) -> str:
    return ".".join(module.split(".")[:2])


def allowed(source: str, target: str) -> bool:
    """Whether ``source`` may import ``target``: within its own package always; below the pipeline by ``LAYERS``;
    the report and the CLI only from themselves (and the CLI's entry points)."""
    if package_of(source) == package_of(target):
        return True
    if package_of(target) in ("ptlab.report", "ptlab.cli"):
        return package_of(source) in ("ptlab.cli", "ptlab.__main__", "ptlab.sweep_summary", "ptlab.predict")
    rule = LAYERS.get(package_of(source))
    return rule is None or any(target == p or target.startswith(p + ".") for p in rule)


def test_every_import_follows_the_layer_table() -> None:
    """docs/design.md's table, checked on the import graph (imports inside functions count): tracking is a leaf
    that imports nothing from config, engines or the pipeline; checks does not import tracking; the report never
    imports the pipeline."""
    bad = sorted(
        f"{source} -> {target}"
        for source, targets in import_graph().items()
        for target in targets
        if target != "ptlab" and not allowed(source, target)
    )
    assert not bad, "\n".join(bad)


def test_the_layer_table_is_the_design_documents() -> None:
    text = (PACKAGE.parent / "docs/design.md").read_text()
    for package in LAYERS:
        assert f"`{package}`" in text, package


def test_tests_mirror_the_package() -> None:
    """Each test folder is named after a ptlab subpackage (tests/engines/ tests ptlab/engines/, ...); tests of top-level
    modules (cli, config, spec, theory, ...) sit in tests/ itself."""
    tests = Path(__file__).resolve().parent
    folders = {p.name for p in tests.iterdir() if p.is_dir() and any(p.glob("test_*.py"))}
    packages = {p.name for p in PACKAGE.iterdir() if (p / "__init__.py").is_file()}
    assert folders and folders <= packages, f"test folders that are no ptlab subpackage: {sorted(folders - packages)}"
