"""``python -m ptlab.report EXPERIMENT``: redraw an experiment's figures and tables from MLflow.

``python -m ptlab.report calibrate EXPERIMENT...``: fit the theory's constants to those experiments'
runs and print the outcome agreement on held-out cells (ptlab.report.calibrate).

``python -m ptlab.report design --seed S --cells N --out FILE``: draw a random design over a box
(``ptlab.design``) as a cells file for ``hydra.sweeper.cells``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ptlab.report.registry import renderer_for
from ptlab.report.runs import ReportError, load_pipelines
from ptlab.tracking import make_tracker


def make_report(experiment: str, tracking_uri: str = "sqlite:///mlflow.db", out_dir: str | Path | None = None,
                log_to_mlflow: bool = True) -> list[Path]:
    """Render ``experiment`` into ``out_dir`` (default ``reports/<experiment>``) and log the files to a
    ``report`` run of the same MLflow experiment."""
    runs = load_pipelines(tracking_uri, experiment)
    out = Path(out_dir) if out_dir else Path("reports") / experiment
    out.mkdir(parents=True, exist_ok=True)
    paths = renderer_for(experiment)(runs, experiment, out)
    if log_to_mlflow:
        tracker = make_tracker("mlflow", tracking_uri, experiment, f"report {experiment}",
                               tags={"ptlab.stage": "report"})
        with tracker:
            tracker.set_tags({"ptlab.stage": "report", "ptlab.report.pipelines": len(runs)})
            for path in paths:
                tracker.log_artifact(path, "report")
    return paths


def calibrate_main(argv: list[str]) -> int:
    """``calibrate EXPERIMENT... [--write FILE]``: fit, print the agreement, write the tables and the YAML."""
    from ptlab.report.calibrate import agreement_text, calibrate, constants_yaml, load_cells, write_outputs

    parser = argparse.ArgumentParser(prog="python -m ptlab.report calibrate",
                                     description="Fit the theory's constants to synthetic experiments.")
    parser.add_argument("experiments", nargs="+", help="MLflow experiment names (e.g. fig1a fig1b fig1c fig2)")
    parser.add_argument("--tracking-uri", default="sqlite:///mlflow.db", help="default: %(default)s")
    parser.add_argument("--out", default="reports/calibration", help="output directory (default: %(default)s)")
    parser.add_argument("--write", default=None, metavar="FILE",
                        help="also write the fitted constants as a theory config (e.g. conf/theory/calibrated.yaml)")
    args = parser.parse_args(argv)
    try:
        result = calibrate(load_cells(args.experiments, args.tracking_uri))
    except ReportError as err:
        print(f"ptlab.report calibrate: {err}", file=sys.stderr)
        return 2
    print(agreement_text(result))
    for path in write_outputs(result, Path(args.out)):
        print(path)
    if args.write:
        Path(args.write).write_text(constants_yaml(result, args.experiments))
        print(args.write)
    return 0


def design_main(argv: list[str]) -> int:
    """``design --seed S --cells N [--seeds K] [--box FILE] --out FILE``: write a random design's cells file."""
    from ptlab.design import DesignError, design_yaml, draw_design, load_box

    parser = argparse.ArgumentParser(prog="python -m ptlab.report design",
                                     description="Draw cells at random over a box, each with its own run seeds.")
    parser.add_argument("--seed", type=int, required=True, help="the design's seed (also sets its run seeds)")
    parser.add_argument("--cells", type=int, required=True, help="number of cells")
    parser.add_argument("--seeds", type=int, default=16, help="run seeds a cell (default: %(default)s)")
    parser.add_argument("--box", default="conf/design/calibration.yaml", help="box file (default: %(default)s)")
    parser.add_argument("--out", required=True, help="the cells file to write")
    args = parser.parse_args(argv)
    try:
        box = load_box(args.box)
        design = draw_design(box, args.seed, args.cells, args.seeds)
    except (DesignError, OSError) as err:
        print(f"ptlab: {err}", file=sys.stderr)
        return 2
    command = (f"python -m ptlab.report design --seed {args.seed} --cells {args.cells} --seeds {args.seeds} "
               f"--box {args.box}")
    Path(args.out).write_text(design_yaml(design, box, args.seed, args.seeds, command))
    print(args.out)
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["design"]:
        return design_main(argv[1:])
    if argv[:1] == ["calibrate"]:
        return calibrate_main(argv[1:])
    parser = argparse.ArgumentParser(prog="python -m ptlab.report", description=__doc__)
    parser.add_argument("experiment", help="MLflow experiment name (the preset, e.g. fig1a_small)")
    parser.add_argument("--tracking-uri", default="sqlite:///mlflow.db", help="default: %(default)s")
    parser.add_argument("--out", default=None, help="output directory (default: reports/EXPERIMENT)")
    args = parser.parse_args(argv)
    try:
        paths = make_report(args.experiment, args.tracking_uri, args.out)
    except ReportError as err:
        print(f"ptlab.report: {err}", file=sys.stderr)
        return 2
    for path in paths:
        print(path)
    return 0
