"""``python -m ptlab.report EXPERIMENT``: redraw an experiment's figures and tables from MLflow.

``python -m ptlab.report calibrate --fit EXP... --held-out EXP...``: fit the theory's constants and the
phase model to one random design's runs and score them on another's (ptlab.report.calibrate).

``python -m ptlab.report design --seed S --cells N --out FILE``: draw a random design over a box
(``ptlab.design``) as a cells file for ``hydra.sweeper.cells``.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from ptlab.errors import Terminated
from ptlab.paths import config_dir
from ptlab.report.registry import renderer_for
from ptlab.report.runs import ReportError, load_pipelines
from ptlab.tracking import make_tracker
from ptlab.tracking.faults import signals_as_interrupt

DEFAULT_BOX = "conf/design/calibration.yaml"
"""``--box`` of ``design`` and ``calibrate``: the calibration box (``box_file`` finds it from any folder)."""


def make_report(
    experiment: str, tracking_uri: str = "sqlite:///mlflow.db", out_dir: str | Path | None = None, log_to_mlflow: bool = True
) -> list[Path]:
    """Render ``experiment`` into ``out_dir`` (default ``reports/<experiment>``) and log the files to a
    ``report`` run of the same MLflow experiment."""
    runs = load_pipelines(tracking_uri, experiment)
    out = Path(out_dir) if out_dir else Path("reports") / experiment
    out.mkdir(parents=True, exist_ok=True)
    paths = renderer_for(experiment)(runs, experiment, out)
    if log_to_mlflow:
        tracker = make_tracker("mlflow", tracking_uri, experiment, f"report {experiment}", tags={"ptlab.stage": "report"})
        with tracker:
            tracker.set_tags({"ptlab.stage": "report", "ptlab.report.pipelines": len(runs)})
            for path in paths:
                tracker.log_artifact(path, "report")
    return paths


def calibrate_main(argv: list[str]) -> int:
    """``calibrate --fit EXP... --held-out EXP... [--write FILE] [--write-phase FILE]``: fit the theory's
    constants and the phase model on the fit experiments, score every predictor on the held-out ones.
    ``--phase-model FILE`` scores a frozen phase model instead of fitting one (``--write-phase`` then writes
    it back unchanged but for its provenance's held-out score); with ``--offsets`` (fit cells only, no
    ``--held-out``) it first fits class offsets to that model's scores on the fit cells and keeps them if their
    cross-validated agreement beats the model's own (``ptlab.report.calibrate.fit_offsets``)."""
    import datetime as dt
    from dataclasses import replace

    from ptlab.phase import load, save
    from ptlab.report.calibrate import (
        EXPECTED_SEEDS,
        FIT,
        HELD_OUT,
        MIN_SEEDS,
        N_AWARE_CANDIDATES,
        PHASE,
        PHASE_CANDIDATES,
        REFERENCE_CANDIDATES,
        by_confidence,
        calibrate,
        ceiling_lines,
        constants_yaml,
        cross_validated_offsets,
        features_of,
        fit_offsets,
        load_cells,
        report_text,
        with_offsets,
        write_outputs,
    )

    parser = argparse.ArgumentParser(
        prog="ptlab-report calibrate",
        description="Fit the theory's constants and the phase model to one random design and score them on another.",
    )
    parser.add_argument("--fit", nargs="+", required=True, help="MLflow experiments whose cells fit")
    parser.add_argument("--held-out", nargs="*", default=[], help="MLflow experiments whose cells only score")
    parser.add_argument(
        "--tracking-uri",
        action="extend",
        nargs="+",
        default=None,
        help="the store(s) of the experiments, given once or several times: each experiment is read from the one "
        "store that holds it (default: sqlite:///mlflow.db)",
    )
    parser.add_argument(
        "--held-out-tracking-uri", default=None, help="the store of the held-out experiments (default: --tracking-uri)"
    )
    parser.add_argument(
        "--ceiling",
        action="store_true",
        help="also print each split's noise ceiling (how often "
        "an oracle knowing each cell's mean gain could agree with its verdict)",
    )
    parser.add_argument(
        "--references",
        action="store_true",
        help="also cross-validate a random forest and "
        "gradient boosting beside the phase model's candidates (references only, never chosen)",
    )
    parser.add_argument(
        "--phase-model",
        default=None,
        metavar="FILE",
        help="score this frozen phase model (written earlier by --write-phase) instead of fitting one",
    )
    parser.add_argument(
        "--offsets",
        action="store_true",
        help="with --phase-model and no --held-out: fit class offsets of that model on the fit cells (kept if they "
        "beat it in cross-validation)",
    )
    parser.add_argument(
        "--n-aware",
        action="store_true",
        help="also cross-validate the n-aware phase models (ptlab.report.n_aware); one is chosen when within 1 point "
        "of the best other candidate",
    )
    parser.add_argument(
        "--seeds",
        type=int,
        default=None,
        metavar="N",
        help="the verdict's number of seeds an n-aware phase model predicts (default: the fit cells'); also for a "
        "frozen n-aware --phase-model",
    )
    parser.add_argument(
        "--ceiling-seeds",
        type=int,
        nargs="+",
        default=list(EXPECTED_SEEDS),
        metavar="N",
        help="with --ceiling: also the normal noise ceiling at these seed counts; with --n-aware: the n-aware "
        "candidates' expected agreement at them (default: %(default)s)",
    )
    parser.add_argument(
        "--min-seeds", type=int, default=MIN_SEEDS, help="cells with fewer seeds are left out (default: %(default)s)"
    )
    parser.add_argument(
        "--box", default=DEFAULT_BOX, help="the designs' box, recorded in the phase model's provenance (default: %(default)s)"
    )
    parser.add_argument("--out", default="reports/calibration", help="output directory (default: %(default)s)")
    parser.add_argument(
        "--write",
        default=None,
        metavar="FILE",
        help="also write the fitted constants as a theory config (e.g. conf/theory/calibrated.yaml)",
    )
    parser.add_argument(
        "--write-phase", default=None, metavar="FILE", help="also write the phase model (e.g. conf/phase_model.yaml)"
    )
    args = parser.parse_args(argv)
    args.tracking_uri = args.tracking_uri or ["sqlite:///mlflow.db"]
    command = (
        "python -m ptlab.report calibrate --fit "
        + " ".join(args.fit)
        + (" --held-out " + " ".join(args.held_out) if args.held_out else "")
        + (f" --phase-model {args.phase_model}" if args.phase_model else "")
        + (" --offsets" if args.offsets else "")
        + (" --n-aware" if args.n_aware else "")
        + (f" --seeds {args.seeds}" if args.seeds is not None else "")
    )
    bad_seeds = [n for n in [args.seeds, *args.ceiling_seeds] if n is not None and n < 2]
    if bad_seeds:
        print(f"ptlab: --seeds/--ceiling-seeds={bad_seeds[0]}: a paired t verdict needs >= 2 seeds", file=sys.stderr)
        return 2
    if args.offsets and (args.phase_model is None or args.held_out):
        print(
            f"ptlab: --offsets with --phase-model={args.phase_model} --held-out={' '.join(args.held_out) or None}: "
            "offsets need a frozen model and fit cells only (fit, write, then score the held-out cells)",
            file=sys.stderr,
        )
        return 2
    frozen = None
    if args.phase_model is not None:
        try:
            frozen = load(args.phase_model)
        except (OSError, ValueError, KeyError, TypeError) as err:
            print(f"ptlab: --phase-model={args.phase_model}: a file written by --write-phase ({err})", file=sys.stderr)
            return 2
    if args.offsets and frozen.kind != "logistic":
        print(
            f"ptlab: --offsets with --phase-model={args.phase_model} (kind {frozen.kind}): offsets need a logistic model",
            file=sys.stderr,
        )
        return 2
    candidates = [
        *PHASE_CANDIDATES,
        *(REFERENCE_CANDIDATES if args.references else ()),
        *(N_AWARE_CANDIDATES if args.n_aware else ()),
    ]
    expected: dict[str, dict[int, float]] = {}
    try:
        cells, dropped = load_cells(args.fit, args.held_out, args.tracking_uri, args.min_seeds, args.held_out_tracking_uri)
        offset_lines = []
        if args.offsets:
            fit = cells[(cells["split"] == FIT) & cells["measured"].notna()].reset_index(drop=True)
            x, labels = features_of(fit, frozen.features), fit["measured"].to_numpy(dtype=object).astype(str)
            cv, plain = cross_validated_offsets(frozen, x, labels)
            offsets, agreeing = fit_offsets(frozen, x, labels)
            adopted = bool(cv > plain)
            offset_lines = [
                f"class offsets on {len(fit)} fit cells: "
                + ", ".join(f"{c} {o:+.2f}" for c, o in zip(frozen.classes, offsets))
                + f" ({agreeing}/{len(fit)} agree; the frozen model {plain:.1%}; offsets cross-validated {cv:.1%}): "
                + ("kept" if adopted else "not kept")
            ]
            record = {
                "values": {c: round(float(o), 4) for c, o in zip(frozen.classes, offsets)},
                "fit_experiments": list(args.fit),
                "fit_cells": len(fit),
                "agreement_before": round(plain, 6),
                "cross_validated_agreement": round(cv, 6),
                "kept": adopted,
                "command": command,
                "date": dt.date.today().isoformat(),
            }
            # The earlier held-out score moves to earlier_held_out: it scored the model without these offsets.
            base = {k: v for k, v in frozen.provenance.items() if k not in ("held_out", "held_out_experiments")}
            if frozen.provenance.get("held_out"):
                base["earlier_held_out"] = [
                    *frozen.provenance.get("earlier_held_out", []),
                    {"experiments": frozen.provenance.get("held_out_experiments"), **frozen.provenance["held_out"]},
                ]
            frozen = with_offsets(frozen, offsets if adopted else 0 * offsets, {**base, "held_out": {}, "offsets": record})
        result = calibrate(
            cells, candidates=candidates, frozen=frozen, seeds=args.seeds, expected=expected, expected_seeds=args.ceiling_seeds
        )
    except ReportError as err:
        print(f"ptlab.report calibrate: {err}", file=sys.stderr)
        return 2
    expected_lines = [
        f"expected agreement of {key} (mean out-of-fold largest verdict probability): "
        + ", ".join(f"{n} seeds {value:.1%}" for n, value in by_n.items())
        for key, by_n in expected.items()
    ]
    text = "\n".join([report_text(result, dropped), *offset_lines, *expected_lines])
    if args.ceiling:
        text += "\n" + "\n".join(ceiling_lines(result.cells, seeds=args.ceiling_seeds))
    print(text)
    for path in write_outputs(result, Path(args.out), text):
        print(path)
    if args.write:
        Path(args.write).write_text(constants_yaml(result, command))
        print(args.write)
    if args.write_phase:
        import yaml

        box = box_file(args.box)
        held = result.scores.get(HELD_OUT, {})
        held_entry = (
            {
                "cells": held[PHASE].cells,
                "agreeing": held[PHASE].agreeing,
                "agreement": round(held[PHASE].agreement, 6),
                "wilson_95": [round(held[PHASE].low, 6), round(held[PHASE].high, 6)],
                "negative_precision": held[PHASE].negative_precision,
                "negative_recall": held[PHASE].negative_recall,
                "others": {name: round(s.agreement, 6) for name, s in held.items() if name != PHASE},
                "by_confidence": by_confidence(result.cells[result.cells["split"] == HELD_OUT]),
            }
            if held
            else {}
        )
        provenance = {
            "command": command,
            "date": dt.date.today().isoformat(),
            "box": (yaml.safe_load(box.read_text()) or {}).get("box") if box.is_file() else None,
            "fit_experiments": list(args.fit),
            "held_out_experiments": list(args.held_out),
            "fit_cells": int((result.cells["split"] == "fit").sum()),
            "seeds_per_cell": sorted({int(n) for n in result.cells["n_seeds"]}),
            "measured": "paired 95% t interval of transfer - scratch over the seeds (no minimum effect)",
            "cross_validated_agreement": result.phase_cv,
            **({"expected_agreement": expected} if expected else {}),
            "held_out": held_entry,
        }
        header = (
            f"# The fitted phase model (ptlab.phase, docs/theory.md): {result.phase.name}.\n"
            f"# Refit: {command} --write-phase <this file>\n"
        )
        if frozen is not None:  # the frozen model as it was fitted, with the score of this command
            earlier = [*frozen.provenance.get("earlier_held_out", [])]
            rescored = frozen.provenance.get("held_out_experiments") == list(args.held_out)
            if frozen.provenance.get("held_out") and held and not rescored:
                earlier.append({"experiments": frozen.provenance.get("held_out_experiments"), **frozen.provenance["held_out"]})
            provenance = {**frozen.provenance, **({"earlier_held_out": earlier} if earlier else {})}
            if held:
                provenance.update(
                    held_out_experiments=list(args.held_out),
                    held_out=held_entry,
                    scored_by=command,
                    scored_on=dt.date.today().isoformat(),
                )
            header = (
                f"# The fitted phase model (ptlab.phase, docs/theory.md): {result.phase.name}.\n"
                f"# Fitted: {frozen.provenance.get('command', 'unknown')} --write-phase <this file>\n"
                f"# Scored: {command}\n"
            )
        save(replace(result.phase, provenance=provenance), args.write_phase, header)
        print(args.write_phase)
    return 0


def box_file(given: str) -> Path:
    """``--box`` as given; the default, where the working folder has no such file, from ptlab's own configs
    (``ptlab.paths.config_dir``), so the commands run from any folder."""
    path = Path(given)
    if given == DEFAULT_BOX and not path.is_file():
        return Path(config_dir()) / "design" / "calibration.yaml"
    return path


def design_main(argv: list[str]) -> int:
    """``design --seed S --cells N [--seeds K] [--box FILE] --out FILE``: write a random design's cells file.
    With ``--near-boundary MODEL --max-confidence P``: only the drawn cells where that phase model's largest class
    probability is below P (fit cells near its boundary; each keeps the run seeds of its place in the draw)."""
    from ptlab.design import DesignError, design_yaml, draw_design, load_box

    parser = argparse.ArgumentParser(
        prog="python -m ptlab.report design", description="Draw cells at random over a box, each with its own run seeds."
    )
    parser.add_argument("--seed", type=int, required=True, help="the design's seed (also sets its run seeds)")
    parser.add_argument("--cells", type=int, required=True, help="number of cells")
    parser.add_argument("--seeds", type=int, default=16, help="run seeds a cell (default: %(default)s)")
    parser.add_argument("--box", default=DEFAULT_BOX, help="box file (default: %(default)s)")
    parser.add_argument("--out", required=True, help="the cells file to write")
    parser.add_argument(
        "--near-boundary", default=None, metavar="MODEL", help="keep only cells where this phase model file is unsure"
    )
    parser.add_argument(
        "--max-confidence",
        type=float,
        default=0.75,
        help="with --near-boundary: keep cells whose largest class probability is below this (default: %(default)s)",
    )
    args = parser.parse_args(argv)
    if not 0 < args.max_confidence <= 1:
        print(f"ptlab: --max-confidence={args.max_confidence}: a probability in (0, 1]", file=sys.stderr)
        return 2
    try:
        box = load_box(box_file(args.box))
        design = draw_design(box, args.seed, args.cells, args.seeds)
    except (DesignError, OSError) as err:
        print(f"ptlab: {err}", file=sys.stderr)
        return 2
    command = f"python -m ptlab.report design --seed {args.seed} --cells {args.cells} --seeds {args.seeds} --box {args.box}"
    if args.near_boundary is not None:
        from ptlab.phase import load
        from ptlab.report.calibrate import near_boundary

        try:
            design = near_boundary(design, load(args.near_boundary), args.max_confidence)
        except (OSError, ValueError, KeyError, TypeError, ReportError) as err:
            print(
                f"ptlab: --near-boundary={args.near_boundary}: a phase model file and a design of the theory's inputs ({err})",
                file=sys.stderr,
            )
            return 2
        if not design:
            print(f"ptlab: --max-confidence={args.max_confidence}: no drawn cell is below it; draw more cells", file=sys.stderr)
            return 2
        command += f" --near-boundary {args.near_boundary} --max-confidence {args.max_confidence:g}"
    Path(args.out).write_text(design_yaml(design, box, args.seed, args.seeds, command))
    print(args.out)
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    # MLflow draws a progress bar per artifact it downloads (a grid report reads one per grid run): its documented
    # switch turns them off unless the user set it
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    if argv[:1] == ["design"]:
        return design_main(argv[1:])
    if argv[:1] == ["calibrate"]:
        return calibrate_main(argv[1:])
    parser = argparse.ArgumentParser(prog="ptlab-report", description=__doc__)
    parser.add_argument("experiment", help="MLflow experiment name (the preset, e.g. fig1a_small)")
    parser.add_argument("--tracking-uri", default="sqlite:///mlflow.db", help="default: %(default)s")
    parser.add_argument("--out", default=None, help="output directory (default: reports/EXPERIMENT)")
    args = parser.parse_args(argv)
    try:
        with signals_as_interrupt():  # SIGTERM/SIGINT: the report run ends KILLED, exit 143/130 (as the pipeline)
            paths = make_report(args.experiment, args.tracking_uri, args.out)
    except ReportError as err:
        print(f"ptlab.report: {err}", file=sys.stderr)
        return 2
    except Terminated as err:
        print(f"ptlab.report: stopped by {err}; its MLflow run is marked KILLED", file=sys.stderr)
        return err.exit_code
    for path in paths:
        print(path)
    return 0
