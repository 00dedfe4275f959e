"""The one driver's contract (``ptlab.pipeline.driver.drive``) on a scripted engine and recorder, and the gram engine's
pipeline interface (``GramEngine.run``) against its batched core."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import pytest

from ptlab.engines.base import PipelineJob, PipelineResult, StageResult
from ptlab.errors import DivergenceError
from ptlab.pipeline.driver import drive


def stages(acc: float) -> dict[str, StageResult]:
    return {name: StageResult(name, None, {"train_acc": acc, "test_acc": acc, "train_loss": 0.1}) for name in ("scratch",)}


class ScriptedEngine:
    """Yields the scripted results in batches of ``batch``; ``stop_after``: raise KeyboardInterrupt after that many."""

    name = "scripted"

    def __init__(self, results: dict[int, PipelineResult], batch: int = 2, stop_after: int | None = None) -> None:
        self.results, self.batch, self.stop_after = results, batch, stop_after
        self.seen: list[PipelineJob] = []

    def train_stage(self, stage: Any) -> StageResult:
        raise NotImplementedError

    def run(self, jobs: Sequence[PipelineJob], **options: Any) -> Iterator[list[tuple[int, PipelineResult]]]:
        self.seen = list(jobs)
        self.options = options
        out = [(i, self.results[job.spec]) for i, job in enumerate(jobs)]
        for start in range(0, len(out), self.batch):
            if self.stop_after is not None and start >= self.stop_after:
                raise KeyboardInterrupt
            yield out[start : start + self.batch]


class ListRecorder:
    def __init__(self, done: set[int]) -> None:
        self.done, self.events = done, []

    def finished(self, index: int) -> bool:
        return index in self.done

    def open(self, index: int) -> str:
        self.events.append(("open", index))
        return f"tracker{index}"

    def record(self, index: int, result: PipelineResult) -> None:
        self.events.append(("record", index, result.error is not None))

    def flush(self) -> None:
        self.events.append(("flush",))

    def abandon(self, status: str) -> None:
        self.events.append(("abandon", status))

    def close(self) -> None:
        self.events.append(("close",))


def test_drive_skips_finished_opens_records_flushes_and_closes() -> None:
    results = {i: PipelineResult(stages(0.5 + i / 10)) for i in range(5)}
    engine, recorder = ScriptedEngine(results), ListRecorder(done={1})
    jobs = [PipelineJob(i, recipe=None if i % 2 else (lambda *a: None)) for i in range(5)]
    assert drive(jobs, engine, recorder, history="last") == [0, 2, 3, 4]
    assert [job.spec for job in engine.seen] == [0, 2, 3, 4] and engine.options == {"history": "last"}
    # a recipe job gets its tracker (the recipe tracks live into it); a batched job none (recorded afterwards)
    assert [job.tracker for job in engine.seen] == ["tracker0", "tracker2", None, "tracker4"]
    assert recorder.events == [
        ("open", 0), ("open", 2), ("open", 3), ("open", 4),
        ("record", 0, False), ("record", 2, False), ("flush",),
        ("record", 3, False), ("record", 4, False), ("flush",),
        ("close",),
    ]  # fmt: skip


def test_a_diverged_pipeline_is_recorded_the_others_kept_and_the_command_fails_in_one_line() -> None:
    error = DivergenceError("stage transfer diverged at step 3: the loss is inf; lower train.lr", "transfer")
    results = {0: PipelineResult(stages(0.9)), 1: PipelineResult({}, error=error), 2: PipelineResult({}, error=error)}
    recorder = ListRecorder(done=set())
    with pytest.raises(SystemExit) as stop:
        drive([PipelineJob(i) for i in range(3)], ScriptedEngine(results, batch=3), recorder)
    assert str(stop.value.code) == f"ptlab: {error} (2 of 3 cells failed)"
    assert ("record", 0, False) in recorder.events and ("record", 1, True) in recorder.events
    assert recorder.events[-1] == ("close",)  # the layout wrote what it writes, failed cells included


def test_a_stopped_drive_abandons_the_open_records_as_killed() -> None:
    results = {i: PipelineResult(stages(0.5)) for i in range(4)}
    recorder = ListRecorder(done=set())
    with pytest.raises(KeyboardInterrupt):
        drive([PipelineJob(i) for i in range(4)], ScriptedEngine(results, batch=2, stop_after=2), recorder)
    assert recorder.events[-1] == ("abandon", "KILLED") and ("close",) not in recorder.events


def test_divergence_errors_cross_processes_with_their_stage() -> None:
    import pickle

    error = pickle.loads(pickle.dumps(DivergenceError("at step 2: the loss is nan", "upstream")))
    assert isinstance(error, DivergenceError) and error.stage == "upstream" and str(error) == "at step 2: the loss is nan"


def test_gram_engine_run_gives_the_batched_cells_results(make_cfg) -> None:
    """``GramEngine.run`` on spec jobs and on cell jobs (a grid's) equals ``run_cells``, stage by stage, in every
    history; workers make the same results."""
    from ptlab.engines.gram import GramCell, GramEngine, run_cells
    from ptlab.spec import parse

    specs = [parse(make_cfg("logger=none", f"seed={seed}", f"transfer.alpha={alpha}")) for seed, alpha in ((0, 0.5), (1, 0.25))]
    cells = [GramCell.from_spec(spec) for spec in specs]
    direct = run_cells(cells)
    for history in ("full", "last"):
        for jobs in ([PipelineJob(spec) for spec in specs], [PipelineJob(None, cell=cell) for cell in cells]):
            got = dict(pair for batch in GramEngine().run(jobs, history=history, workers=2) for pair in batch)
            assert sorted(got) == [0, 1]
            for index, result in got.items():
                assert result.error is None and not result.tracked
                assert result.scores == direct[index].transferability
                expected = direct[index].stage_results(history)
                assert result.stages.keys() == expected.keys()
                for name, stage in expected.items():
                    assert result.stages[name].final == stage.final and result.stages[name].curves == stage.curves


def test_every_engine_reports_a_divergence_with_the_same_line(make_cfg, tmp_path) -> None:
    """The Lightning and gram engines end a diverged single run with the same line (``engines.base.diverged``)."""
    from ptlab.pipeline import run_pipeline
    from ptlab.spec import parse

    lines = {}
    for engine in ("gram", "lightning"):
        spec = parse(make_cfg("logger=none", "cache.enabled=false", "noise.sigma_p1=1e30", f"engine={engine}"))
        with pytest.raises(DivergenceError) as err:
            run_pipeline(spec, tmp_path / engine)
        lines[engine] = str(err.value)
        assert err.value.stage == "upstream" and err.value.step is not None
    assert lines["gram"] == lines["lightning"] and lines["gram"].startswith("stage upstream diverged at step ")


@pytest.mark.slow
def test_a_resumed_batched_sweep_counts_and_describes_every_job(tmp_path) -> None:
    """A sweep grown by one value: the finished jobs are skipped, the new ones trained, and every job dir (skipped
    ones too) holds this sweep's overrides, so the summary line counts all of them (a skipped job once had only its
    summary.json, with an earlier sweep's overrides.yaml or none, and went uncounted)."""
    import yaml

    from ..conftest import SMALL, run_cli

    common = ["-m", "engine=gram", "hydra/launcher=ptlab_gram", "hydra/sweeper=ptlab_batched", *SMALL]
    common += [f"logger.tracking_uri=sqlite:///{tmp_path / 'm.db'}", f"hydra.sweep.dir={tmp_path / 'sweep'}", "seed=0,1"]
    first = run_cli([*common, "transfer.alpha=0.25,0.5"], tmp_path)
    assert first.returncode == 0, first.stderr
    second = run_cli([*common, "transfer.alpha=0.25,0.5,0.75"], tmp_path)
    assert second.returncode == 0, second.stderr
    assert "2 cells finished, 4 skipped (already finished), 0 failed" in second.stdout
    for job, (seed, alpha) in enumerate((s, a) for s in (0, 1) for a in (0.25, 0.5, 0.75)):
        overrides = yaml.safe_load((tmp_path / "sweep" / str(job) / ".hydra" / "overrides.yaml").read_text())
        assert f"seed={seed}" in overrides and f"transfer.alpha={alpha}" in overrides
