"""Fit experiments kept in several MLflow stores (docs/theory.md section 9): ``calibrate`` reads each from the
one store that holds it, and refuses an experiment that is in none of them or in two."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from ptlab.report.calibrate import FIT, cell_table, load_cells
from ptlab.report.runs import ReportError, experiment_stores
from ptlab.tracking.base import STAGE_TAG
from tests.report.test_calibrate import synthetic_runs


def _store(path: Path, experiments: dict[str, pd.DataFrame]) -> str:
    """A SQLite store holding each experiment's rows as finished pipeline runs."""
    uri = f"sqlite:///{path}"
    client = MlflowClient(uri)
    for name, rows in experiments.items():
        experiment_id = client.create_experiment(name)
        for row in rows.to_dict("records"):
            run = client.create_run(experiment_id, tags={STAGE_TAG: "pipeline"})
            for key, value in row.items():
                if key.startswith("params."):
                    client.log_param(run.info.run_id, key[len("params.") :], value)
                elif key.startswith("metrics."):
                    client.log_metric(run.info.run_id, key[len("metrics.") :], float(value))
            client.set_terminated(run.info.run_id, "FINISHED")
    return uri


@pytest.fixture(scope="module")
def stores(tmp_path_factory) -> tuple[str, str, dict[str, pd.DataFrame]]:
    root = tmp_path_factory.mktemp("stores")
    runs = {
        "a": synthetic_runs(seeds=3, d_grid=[250, 8000], u_grid=[0.0, 2.0]),
        "b": synthetic_runs(seeds=3, d_grid=[500, 4000], u_grid=[0.5, 2.5]),
        "c": synthetic_runs(seeds=3, d_grid=[1000], u_grid=[1.0]),
    }
    first = _store(root / "first.db", {"a": runs["a"], "c": runs["c"]})
    second = _store(root / "second.db", {"b": runs["b"], "c": runs["c"]})
    return first, second, runs


def test_each_experiment_is_read_from_the_store_that_holds_it(stores) -> None:
    first, second, runs = stores
    assert experiment_stores([first, second], ["a", "b"]) == {"a": first, "b": second}
    assert experiment_stores([first], ["a", "zzz"]) == {"a": first, "zzz": first}  # one store: no lookup
    cells, dropped = load_cells(["a", "b"], [], [first, second], min_seeds=3)
    assert dropped == 0 and list(cells["experiment"]).count("a") == 4 and list(cells["experiment"]).count("b") == 4
    # The same cells as the synthetic runs give directly: nothing lost or mixed between the stores.
    for name in ("a", "b"):
        direct = cell_table(runs[name], name, FIT)
        got = cells[cells["experiment"] == name].reset_index(drop=True)
        pd.testing.assert_series_equal(got["gain"], direct["gain"])
        assert list(got["measured"]) == list(direct["measured"]) and set(got["n_seeds"]) == {3}


def test_an_experiment_in_no_store_or_in_two_is_refused(stores, tmp_path: Path, capsys) -> None:
    from ptlab.report.cli import main

    first, second, _ = stores
    with pytest.raises(ReportError, match=r"experiment 'c' is in 2 \(.*first\.db and .*second\.db\) of these stores"):
        experiment_stores([first, second], ["a", "c"])
    with pytest.raises(ReportError, match="experiment 'nowhere' is in none of these stores"):
        load_cells(["a", "nowhere"], [], [first, second])
    with pytest.raises(ReportError, match="does not exist"):
        experiment_stores([first, f"sqlite:///{tmp_path / 'missing.db'}"], ["a"])
    out = tmp_path / "out"
    for store_args in (["--tracking-uri", first, "--tracking-uri", second], ["--tracking-uri", first, second]):
        assert main(["calibrate", "--fit", "a", "c", *store_args, "--out", str(out)]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "experiment 'c' is in 2" in err and "each experiment must be in exactly one" in err
    assert not out.exists()
