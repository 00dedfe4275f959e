"""The selection study (experiments ``selection*``, docs/design.md section 7): strategies ranked by their paired
gain over ``random``, per setting.

A setting is every swept param but the strategy and the seed (e.g. alpha and ||u||). Within a setting, a
strategy's gain over random on seed s is its transfer test accuracy minus random's on seed s: the two runs
share the data, both inits and everything else, so the difference is the strategy's alone. The table gives
the mean gain, its 95% t interval (``paired_ci``), n (paired seeds) and the verdict; where the ``signal``
oracle ran (the synthetic model) also each strategy's paired gap to it and the share of the oracle's gain
over random that it reaches (only where the oracle's own gain has a CI above 0; elsewhere the share is noise).
Files: ``<experiment>.md`` (one ranked table per setting, with the winners) and
``<experiment>.csv`` (one row per setting and strategy).
"""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd

from ptlab.report.runs import ReportError, paired_ci, swept_params, verdict

TRANSFER, GAIN = "metrics.transfer_test_acc", "metrics.transfer_gain"
SELECTION, TARGET, SEED = "params.transfer.selection", "params.transfer.selection._target_", "params.seed"
STRATEGY = "strategy"
BASELINE, ORACLE = "random", "signal"


def with_strategy(runs: pd.DataFrame) -> pd.DataFrame:
    """``runs`` with a ``strategy`` column: ``transfer.selection``'s name, or its ``_target_``'s class name."""
    names = runs[SELECTION] if SELECTION in runs else pd.Series(math.nan, index=runs.index)
    if TARGET in runs:
        names = names.fillna(runs[TARGET].astype(str).str.rsplit(".", n=1).str[-1].where(runs[TARGET].notna()))
    if names.isna().all() or TRANSFER not in runs:
        raise ReportError("runs lack params.transfer.selection or metrics.transfer_test_acc: not filter-transfer pipelines")
    return runs.assign(**{STRATEGY: names.astype(str)})


def setting_columns(runs: pd.DataFrame) -> list[str]:
    """The swept params that define a setting: all but the strategy's own keys and the seed."""
    return [c for c in swept_params(runs) if not c.startswith(SELECTION) and c != SEED]


def paired_gains(runs: pd.DataFrame, setting: list[str], reference: str) -> pd.DataFrame:
    """Per run, its transfer accuracy minus that of ``reference`` on the same setting and seed (NaN when the
    reference did not run there)."""
    key = [*setting, SEED]
    ref = runs.loc[runs[STRATEGY] == reference, [*key, TRANSFER]].rename(columns={TRANSFER: "reference"})
    merged = runs.merge(ref, on=key, how="left")
    return merged.assign(gain=merged[TRANSFER].astype(float) - merged["reference"].astype(float))


def _numeric(column: pd.Series) -> pd.Series:
    try:
        return pd.to_numeric(column)
    except (TypeError, ValueError):
        return column


def gain_stats(gains: pd.DataFrame, by: list[str], prefix: str) -> pd.DataFrame:
    """Per group of ``by``: the mean paired ``gain``, its 95% t interval and n, as ``<prefix>``,
    ``<prefix>_ci_low``, ``<prefix>_ci_high``, ``<prefix>_n``."""
    rows = []
    for values, group in gains.groupby(by, sort=True, dropna=False):
        paired = group["gain"].dropna().astype(float)
        low, high = paired_ci(paired)
        rows.append(
            {
                **dict(zip(by, values if isinstance(values, tuple) else (values,))),
                prefix: float(paired.mean()) if len(paired) else math.nan,
                f"{prefix}_ci_low": low,
                f"{prefix}_ci_high": high,
                f"{prefix}_n": int(len(paired)),
            }
        )
    return pd.DataFrame(rows)


def rank_strategies(runs: pd.DataFrame) -> pd.DataFrame:
    """One row per setting and strategy, ranked within the setting by mean paired gain over random."""
    runs = with_strategy(runs)
    if BASELINE not in set(runs[STRATEGY]):
        raise ReportError(f"no {BASELINE!r} runs to pair with: add transfer.selection={BASELINE} to the sweep")
    setting = setting_columns(runs)
    runs = runs.assign(
        **{c: _numeric(runs[c]) for c in setting}, **{c: runs[c].astype(float) for c in (TRANSFER, GAIN) if c in runs}
    )
    by = [*setting, STRATEGY]
    table = runs.groupby(by, sort=True, dropna=False).agg(transfer_acc=(TRANSFER, "mean")).reset_index()
    if GAIN in runs:
        table["gain_over_scratch"] = runs.groupby(by, sort=True, dropna=False)[GAIN].mean().to_numpy()
    table = table.merge(gain_stats(paired_gains(runs, setting, BASELINE), by, "gain_over_random"), on=by)
    table["verdict"] = [
        BASELINE if name == BASELINE else verdict(low, high, n)
        for name, low, high, n in zip(
            table[STRATEGY], table["gain_over_random_ci_low"], table["gain_over_random_ci_high"], table["gain_over_random_n"]
        )
    ]
    if ORACLE in set(runs[STRATEGY]):
        table = table.merge(gain_stats(paired_gains(runs, setting, ORACLE), by, "gap_to_signal"), on=by)
        oracle = table.loc[table[STRATEGY] == ORACLE, [*setting, "gain_over_random", "gain_over_random_ci_low"]]
        oracle = oracle.assign(signal_gain=oracle["gain_over_random"].where(oracle.pop("gain_over_random_ci_low") > 0))
        oracle = oracle.drop(columns="gain_over_random")
        table = table.merge(oracle, on=setting) if setting else table.assign(signal_gain=float(oracle["signal_gain"].iloc[0]))
        table["share_of_signal_gain"] = table["gain_over_random"] / table.pop("signal_gain")
    table = table.sort_values(
        [*setting, "gain_over_random"], ascending=[True] * len(setting) + [False], kind="stable"
    ).reset_index(drop=True)
    table.attrs["setting"] = setting
    return table


def _ci(low: float, high: float) -> str:
    return "-" if math.isnan(low) else f"[{100 * low:+.1f}, {100 * high:+.1f}]"


def markdown(table: pd.DataFrame, experiment: str) -> str:
    """One ranked table per setting (gains in accuracy points), with the setting's winners."""
    setting = table.attrs.get("setting", [])
    lines = [
        f"# {experiment}: selection strategies ranked by paired gain over random",
        "",
        "Gains are test-accuracy points (x100), mean over seeds of the per-seed difference from `random` "
        "(same data and inits), with the 95% t interval and n paired seeds.",
        "",
    ]
    groups = table.groupby(setting, sort=False) if setting else [((), table)]
    oracle = "gap_to_signal" in table
    for values, group in groups:
        values = values if isinstance(values, tuple) else (values,)
        title = ", ".join(f"{c.rsplit('.', 1)[-1]}={v}" for c, v in zip(setting, values)) or "all runs"
        lines += [f"## {title}", ""]
        header = ["rank", "strategy", "transfer acc", "gain over random", "95% CI", "n", "verdict"]
        header += ["gap to signal", "gap CI", "share of signal's gain"] if oracle else []
        lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for rank, row in enumerate(group.itertuples(index=False), start=1):
            baseline = row.strategy == BASELINE
            cells = [
                str(rank),
                row.strategy,
                f"{100 * row.transfer_acc:.1f}",
                f"{100 * row.gain_over_random:+.2f}",
                "-" if baseline else _ci(row.gain_over_random_ci_low, row.gain_over_random_ci_high),
                str(row.gain_over_random_n),
                row.verdict,
            ]
            if oracle:
                share = row.share_of_signal_gain
                cells += [
                    f"{100 * row.gap_to_signal:+.2f}",
                    "-" if row.strategy == ORACLE else _ci(row.gap_to_signal_ci_low, row.gap_to_signal_ci_high),
                    "-" if not math.isfinite(share) else f"{share:.2f}",
                ]
            lines.append("| " + " | ".join(cells) + " |")
        better = group.loc[group["gain_over_random_ci_low"] > 0, STRATEGY].tolist()
        worse = group.loc[group["gain_over_random_ci_high"] < 0, STRATEGY].tolist()
        lines += [
            "",
            f"Better than random (CI above 0): {', '.join(better) or 'none'}; worse (CI below 0): {', '.join(worse) or 'none'}.",
            "",
        ]
    return "\n".join(lines)


def render_selection(runs: pd.DataFrame, experiment: str, out_dir: Path) -> list[Path]:
    """``<experiment>.md`` (ranked tables per setting) and ``<experiment>.csv``."""
    table = rank_strategies(runs)
    csv = out_dir / f"{experiment}.csv"
    table.rename(columns=lambda c: c.removeprefix("params.")).to_csv(csv, index=False)
    md = out_dir / f"{experiment}.md"
    md.write_text(markdown(table, experiment) + "\n")
    return [md, csv]
