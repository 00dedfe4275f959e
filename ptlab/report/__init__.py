"""Reports: redraw the paper's figures and tables from the runs stored in MLflow."""

from ptlab.report.cli import make_report
from ptlab.report.registry import register
from ptlab.report.runs import ReportError, load_pipelines, seed_stats

__all__ = ["ReportError", "load_pipelines", "make_report", "register", "seed_stats"]
