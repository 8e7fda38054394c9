"""Concept fidelity against knowledge preservation on the pretrained tiny model: a digits plan, then the table.

    python benchmarks/quality.py                                  # sweeps/digits-quality.toml: every method but full
    python benchmarks/quality.py --plan sweeps/digits-lr.toml     # the learning-rate evidence, seeds 0, 1, 2
    python benchmarks/quality.py --plan sweeps/digits-lr.toml --table-only   # the table of the runs finished so far

A thin wrapper over `sdtune sweep` (see the plans for the concept, the budget and the metrics; the digits
metric set is `sdtune.digits.DigitMetrics`): it runs the plan (finished runs are skipped, so it resumes),
then prints one markdown table of every finished run and, per method, the learning rate that learns most
(mean style fidelity over seeds) while keeping mean preservation within 10 points of the base model's
(`sdtune.digits.best_learning_rates`). The sweep's own report is OUTPUT/report/index.html.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--plan", default=str(ROOT / "sweeps" / "digits-quality.toml"))
    parser.add_argument("--output", default=None, help="the sweep's folder (default: the plan's)")
    parser.add_argument("--shard", default=None, help="i/N, as `sdtune sweep --shard`")
    parser.add_argument("--table-only", action="store_true", help="train nothing; the table of the finished runs")
    return parser.parse_args(argv)


def rows_of(plan) -> list[dict]:
    """One row per finished run: its settings (config.toml) and measures (eval.json)."""
    from sdtune.config import read_toml
    from sdtune.evaluation import read_evaluation

    rows = []
    for run in plan.runs:
        if run.state() != "finished":
            continue
        report = read_evaluation(run.folder) or {}
        if "preservation" not in report.get("metrics", {}):
            continue
        config = read_toml(run.folder / "config.toml")
        rows.append({
            "run": run.name, "method": config["method"], "lr": float(config["lr"]), "seed": config["seed"],
            "num_parameters": report.get("num_parameters", 0), **report["metrics"],
            "style": report.get("style", {}), "read_as": report.get("concept_read_as_digit"),
            "base_preservation": report["base_preservation"], "base_style": report.get("base_style", {}),
            "base_digit_fidelity": report.get("base_digit_fidelity"), "concept_style": report.get("concept_style", {}),
        })
    return rows


def markdown(rows: list[dict]) -> str:
    from sdtune.digits import PRESERVATION_FLOOR, best_learning_rates

    lines = [
        "| run | trainable | lr | seed | digit fidelity | style fidelity | slant | ink | read as the digit | preservation | Δ vs base |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    if rows:
        first = rows[0]
        lines.append(f"| concept images | | | | | 1.00 | {first['concept_style'].get('slant', 0):.3f} | "
                     f"{first['concept_style'].get('ink', 0):.3f} | | | |")
        lines.append(f"| base (no tuning) | 0 | | | {first['base_digit_fidelity']:.4f} | 0.00 | {first['base_style'].get('slant', 0):.3f} | "
                     f"{first['base_style'].get('ink', 0):.3f} | | {first['base_preservation']:.1%} | |")
    for row in rows:
        delta = 100 * (row["preservation"] - row["base_preservation"])
        read_as = f"{row['read_as']:.0%}" if row["read_as"] is not None else ""
        lines.append(
            f"| {row['run']} | {row['num_parameters']:,} | {row['lr']:.0e} | {row['seed']} | {row['digit_fidelity']:.4f} | "
            f"{row['style_fidelity']:.2f} | {row['style'].get('slant', 0):.3f} | {row['style'].get('ink', 0):.3f} | {read_as} | "
            f"{row['preservation']:.1%} | {delta:+.1f} pt |"
        )
    lines += ["", "Per method and learning rate, over seeds (each seed's value in brackets):", "",
              "| method | lr | seeds | style fidelity | preservation | Δ vs base |", "|---|---:|---:|---|---|---:|"]
    groups: dict[tuple[str, float], list[dict]] = {}
    for row in rows:
        groups.setdefault((row["method"], row["lr"]), []).append(row)
    for (method, lr), members in groups.items():
        style = [r["style_fidelity"] for r in members]
        kept = [r["preservation"] for r in members]
        delta = 100 * (sum(kept) / len(kept) - sum(r["base_preservation"] for r in members) / len(members))
        lines.append(f"| {method} | {lr:.0e} | {len(members)} | {sum(style) / len(style):.2f} ({', '.join(f'{v:.2f}' for v in style)}) | "
                     f"{sum(kept) / len(kept):.1%} ({', '.join(f'{v:.1%}' for v in kept)}) | {delta:+.1f} pt |")
    lines += ["", f"Best learning rate per method (most mean style fidelity over seeds with mean preservation ≥ base − "
                  f"{PRESERVATION_FLOOR:.0%}):", ""]
    for method, best in best_learning_rates(rows).items():
        if best is None:
            lines.append(f"- {method}: every learning rate lost more than {PRESERVATION_FLOOR:.0%} of preservation")
        else:
            lines.append(f"- {method}: lr {best['lr']:.0e} over {best['seeds']} seed(s): style fidelity {best['style_fidelity']:.2f}, "
                         f"preservation {best['preservation']:.1%} (base {best['base_preservation']:.1%})")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from sdtune.config import SweepConfig
    from sdtune.sweep import read_plan, run_sweep

    code = 0
    if not args.table_only:
        result = run_sweep(SweepConfig(plan=args.plan, output=args.output, shard=args.shard))
        code = result.exit_code
    table = markdown(rows_of(read_plan(args.plan, args.output)))
    print("\n" + table + "\n", flush=True)
    return code


if __name__ == "__main__":
    sys.exit(main())
