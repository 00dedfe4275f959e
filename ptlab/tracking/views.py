"""The MLflow UI's view of ptlab's results: the runs table's shared view and its address. Here, not in
``ptlab.tracking.mlflow``, so that printing the address after a run does not load MLflow."""

from __future__ import annotations

RESULT_VIEW = "ptlab"
"""The shared view of the runs table that shows every pipeline's result: open the experiment with
``?viewStateShareKey=ptlab`` (MLflow's own "share view" feature; the view is an experiment tag)."""
RESULT_COLUMNS = (
    "metrics.`transfer_test_acc`",
    "metrics.`scratch_test_acc`",
    "metrics.`transfer_gain`",
    "params.`theory.predicted`",
    "metrics.`transferability/logme`",
    "metrics.`transferability/leep`",
)
SHARED_VIEW_TAG = "mlflow.sharedViewState."
WORKFLOW = "machine_learning"


def result_view_url(experiment_id: str, server: str = "http://127.0.0.1:5000") -> str:
    """The MLflow UI address of an experiment's runs table with the result columns shown, in MLflow 3's "Model
    training" mode (``workflowType=machine_learning``; the UI otherwise opens on its GenAI pages, whatever the
    experiment's ``mlflow.experimentKind``)."""
    return f"{server}/#/experiments/{experiment_id}/runs?viewStateShareKey={RESULT_VIEW}&workflowType={WORKFLOW}"
