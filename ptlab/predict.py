"""``python -m ptlab.predict <overrides>``: what the theory and the fitted phase model say about a synthetic
config, without training (docs/theory.md).

Composes the config exactly as ``python -m ptlab <overrides>`` would, validates it, and prints the
theory's regimes, ratios and label and the phase model's prediction: the same values a run of that config
logs (``theory`` and ``prediction`` in ``summary.json`` and MLflow). ``--json`` prints them as one JSON
object. Imports neither torch nor MLflow, so it answers in well under a second.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from typing import Any

from hydra.errors import HydraException
from omegaconf.errors import OmegaConfBaseException

from ptlab.errors import ConfigError
from ptlab.phase import confidence_band, confidence_band_label


def prediction_for(overrides: list[str]) -> dict[str, Any]:
    """``{"setting", "theory", "prediction"}`` of the config composed from ``overrides``."""
    from dataclasses import asdict

    from ptlab.cli import compose_spec
    from ptlab.theory import predict_from_spec, setting_of

    spec = compose_spec(overrides)
    if not spec.synthetic:
        raise ConfigError(f"task={spec.task.name} is not allowed: the theory covers task=synthetic only")
    theory = predict_from_spec(spec)
    return {"setting": asdict(setting_of(spec)), "theory": theory.as_dict(), "prediction": theory.prediction}


def _number(value: Any) -> str:
    if isinstance(value, float):
        return "inf" if math.isinf(value) else f"{value:.4g}"
    return str(value)


def text(result: dict[str, Any]) -> str:
    """The human-readable lines of ``prediction_for``."""
    t, p = result["theory"], result["prediction"]
    setting = ", ".join(f"{k}={_number(v)}" for k, v in result["setting"].items())
    lines = [
        f"setting: {setting}",
        (
            f"theory: {t['predicted']} (rule: {t['rule']}); transfer {t['transfer_regime']} (d / D* = "
            f"{_number(t['d_over_threshold'])}), scratch {t['scratch_regime']} (d / (N2 S2^4 / s2^4) = "
            f"{_number(t['d_over_scratch_threshold'])})"
        ),
        (
            f"  Gamma = {_number(t['gamma'])}, S2^2 / U^2 = {_number(t['signal_ratio'])}, alpha N1 s2^2 / (N2 s1^2) = "
            f"{_number(t['source_strength'])}, negative-transfer chain: {t['negative_transfer_condition']}"
        ),
        (
            f"  Condition 4.1 (d >= max(n^2, n S^2 / s^2)): {'holds' if t['condition_4_1'] else 'broken'} "
            f"(ratio {_number(t['condition_4_1_ratio'])})"
        ),
    ]
    if p is None:
        lines.append("phase model: none (no conf/phase_model.yaml)")
    else:
        lines.append(
            f"phase model: {p['outcome']}, gain {p['gain']:+.2f} points [{p['gain_low']:+.2f}, "
            f"{p['gain_high']:+.2f}]; {p['model']}, held-out agreement "
            + ("unknown" if p["held_out_agreement"] is None else f"{p['held_out_agreement']:.1%}")
        )
        at = p.get("held_out_agreement_at_confidence")
        lines.append(
            f"  confidence {p['confidence']:.2f} (largest class probability); held-out cells of confidence "
            f"{confidence_band_label(confidence_band(p['confidence']))}: "
            + ("not recorded" if at is None else f"{at:.1%} agreed ({p['held_out_cells_at_confidence']} cells)")
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ptlab.predict", description=__doc__.split("\n\n")[0])
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, as for python -m ptlab")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    try:
        result = prediction_for(args.overrides)
    except ConfigError as err:
        print(f"ptlab: {err}", file=sys.stderr)
        return 2
    except (HydraException, OmegaConfBaseException) as err:  # a composition error: one line, as ptlab's CLI says it
        from ptlab.cli import describe_error

        print(f"ptlab: {describe_error(err)}", file=sys.stderr)
        return 2
    print(json.dumps(result, indent=2) if args.json else text(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
