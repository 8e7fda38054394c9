"""The loop and kernel targets, met or not, read from the tables a `gpu.sh` run wrote.

    python benchmarks/targets.py OUT_DIR            # prints the verdicts; gpu.sh writes them to OUT_DIR/targets.md

It reads OUT_DIR/loop.md (loop.py), speed.md (speed.py) and kernels.md (atom_kernels.py) as those scripts write
them, and checks, with the limits of a GPU run (`--cpu` for a CPU's, where they differ):

- the whole `sdtune train` step at most 1.10x the bare UNet step of the same method (1.05x on a CPU), every
  method and batch of the first training table in bf16 (not compiled);
- `sdtune sample` at most plain diffusers' time per image, and its start-up at most plain diffusers' + 3 s, at
  each dtype measured;
- filter atoms (the default route) at most 1.10x the floor and 0.85x peft LoRA r4, peak memory at most the
  floor's + 2 %, at batch 1 and 4 in bf16;
- the Triton kernel's bf16 gradients within tolerance (atom_kernels.py --check).

After the verdicts, every filter-atom route of every bf16 step table (compiled, autotuned, channels-last ones
included) against the filter-atom limits: which route and settings CUDA's default could take.

The filter-atom limits are a GPU's: a CPU run (`DEVICE=cpu ARCH=tiny`) checks that the tables are read.

A target whose table is missing (a run cut short by its budget) is reported as not measured, never as met.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

TABLE_FILES = ("loop.md", "speed.md", "kernels.md")


def tables(text: str) -> list[dict]:
    """Every Markdown table in `text`: its title (the last bold line above it), columns and rows (dicts by column)."""
    found, title, lines = [], "", text.splitlines()
    index = 0
    while index < len(lines):
        line = lines[index].strip()
        if line.startswith("**") and line.endswith("**"):
            title = line.strip("*")
        is_table = line.startswith("|") and index + 1 < len(lines) and lines[index + 1].strip().startswith("| ---")
        if not is_table:
            index += 1
            continue
        columns = cells(line)
        rows = []
        index += 2
        while index < len(lines) and lines[index].strip().startswith("|"):
            rows.append(dict(zip(columns, cells(lines[index]))))
            index += 1
        found.append({"title": title, "columns": columns, "rows": rows})
    return found


def cells(line: str) -> list[str]:
    return [cell.strip() for cell in line.strip().strip("|").split("|")]


def number(cell: str | None) -> float | None:
    try:
        return float(cell.replace(",", "")) if cell else None
    except ValueError:
        return None


def verdict(measured: float | None, limit: float, text: str | None = None) -> tuple[str, str]:
    if measured is None:
        return text or "not measured", "NOT MEASURED"
    return text or f"{measured:.3f}", "met" if measured <= limit else "NOT MET"


def loop_targets(found: list[dict], cpu: bool) -> list[tuple]:
    rows = []
    limit = 1.05 if cpu else 1.10
    training = [t for t in found if "whole ×bare" in t["columns"]]
    bf16 = [t for t in training if "mixed precision bf16" in t["title"] and "compiled" not in t["title"]]
    table = bf16[0] if bf16 else None
    for method in ("atoms", "lora"):
        for batch in ("1", "4"):
            row = next((r for r in table["rows"] if r["method"] == method and r["batch"] == batch), None) if table else None
            measured = number(row.get("whole ×bare")) if row else None
            failed = row.get("whole step s", "") if row and measured is None else None
            rows.append((f"whole train step ×bare, {method}, batch {batch}, bf16",
                         *verdict(measured, limit, failed), f"≤ {limit:.2f}"))
    sampling = [t for t in found if "per image s" in t["columns"]]
    dtypes = []
    for table in sampling:
        by_sampler = {r["sampler"]: r for r in table["rows"]}
        sdtune, plain = by_sampler.get("sdtune sample"), by_sampler.get("plain diffusers")
        dtype = (sdtune or plain or {}).get("dtype") or "?"
        if dtype in dtypes:
            continue
        dtypes.append(dtype)
        ratio = start = None
        if sdtune and plain and number(sdtune.get("per image s")) and number(plain.get("per image s")):
            ratio = number(sdtune["per image s"]) / number(plain["per image s"])
            start = number(sdtune["start-up s"]) - number(plain["start-up s"])
        rows.append((f"sampling time per image ×plain diffusers, {dtype}", *verdict(ratio, 1.0), "≤ 1.00"))
        rows.append((f"sampling start-up over plain diffusers', {dtype}",
                     *verdict(start, 3.0, f"{start:+.2f} s" if start is not None else None), "≤ +3.00 s"))
    if not dtypes:
        rows.append(("sampling time per image ×plain diffusers", *verdict(None, 1.0), "≤ 1.00"))
    return rows


# filter atoms' step against the floor and peft LoRA r4, and their peak memory against the floor's
ATOM_LIMITS = (("×floor", 1.10), ("×LoRA", 0.85), ("peak ×floor", 1.02))


def kernel_targets(found: list[dict], kernels_text: str) -> list[tuple]:
    rows = []
    for batch in ("1", "4"):
        # the first bf16 table at this batch with the default atoms row (not the variants' or other families' tables)
        atoms = next((row for table in found if "×floor" in table["columns"]
                      and re.search(rf"\bbatch {batch}, bf16\b", table["title"]) and not table["title"].startswith(("sdxl ", "sd2 "))
                      for row in table["rows"] if row.get("method") == "atoms"), None)
        for (column, limit), name in zip(ATOM_LIMITS, ("filter atoms' step ×floor", "filter atoms' step ×peft LoRA r4",
                                                       "filter atoms' peak memory ×floor")):
            measured = number(atoms.get(column)) if atoms else None
            rows.append((f"{name}, batch {batch}, bf16", *verdict(measured, limit), f"≤ {limit:.2f}"))
    check = None
    for block in kernels_text.split("== atom_kernels.py ")[1:]:
        if block.startswith("--check --dtype bf16") and "--per-channel" not in block.splitlines()[0]:
            check = next((line for line in block.splitlines() if line.startswith("check: ")), None)
            break
    if check is None:
        rows.append(("the Triton kernel's bf16 gradients against float64", "not measured", "NOT MEASURED", "PASS"))
    else:
        passed = check == "check: PASS"
        rows.append(("the Triton kernel's bf16 gradients against float64", check.removeprefix("check: ")[:120],
                     "met" if passed else "NOT MET", "PASS"))
    return rows


def route_candidates(found: list[dict]) -> list[str]:
    """Every filter-atom route of the bf16 step tables (the default and each `atoms[route]` row, not the variants'
    `atoms{...}` rows) against the three filter-atom limits, per table: which route CUDA's default could take, and
    under which settings (the tables' titles: compiled, cuDNN autotuned, channels-last, beside busy processes)."""
    lines = []
    for table in found:
        title = table["title"]
        batch = re.search(r"\bbatch (\d+), bf16\b", title)
        if "×floor" not in table["columns"] or not batch or title.startswith(("sdxl ", "sd2 ")):
            continue
        extras = [part.strip() for part in title.split(",") if part.strip().startswith(
            ("compiled", "cuDNN", "channels-last", "beside"))]
        where = f"batch {batch.group(1)}" + ("".join(f", {extra}" for extra in extras))
        for row in table["rows"]:
            method = row.get("method", "")
            if not (method == "atoms" or method.startswith("atoms[")) or "{" in method:
                continue
            measured = [number(row.get(column)) for column, _ in ATOM_LIMITS]
            meets = all(value is not None and value <= limit for value, (_, limit) in zip(measured, ATOM_LIMITS))
            cells = [f"{value:.2f}" if value is not None else "–" for value in measured]
            lines.append(f"| {where} | {method} | " + " | ".join(cells) + f" | {'yes' if meets else 'no'} |")
    if not lines:
        return []
    header = ["", "Filter atoms' routes against the same limits (≤ " + ", ≤ ".join(
        f"{limit:.2f} {column}" for column, limit in ATOM_LIMITS) + "), every bf16 step table:", "",
        "| table | route | " + " | ".join(column for column, _ in ATOM_LIMITS) + " | meets all |",
        "| --- | --- |" + " ---: |" * len(ATOM_LIMITS) + " --- |"]
    return header + lines


def report(folder: Path, cpu: bool = False) -> str:
    texts = {name: (folder / name).read_text(encoding="utf-8") if (folder / name).is_file() else "" for name in TABLE_FILES}
    found = tables(texts["loop.md"]) + tables(texts["speed.md"])
    rows = loop_targets(found, cpu) + kernel_targets(found, texts["kernels.md"])
    device = next((t["title"] for t in found if t["title"]), "no table found")
    lines = [f"Targets, from the tables in {folder} ({device}):", "",
             "| target | measured | limit | verdict |", "| --- | ---: | ---: | --- |"]
    lines += [f"| {name} | {measured} | {limit} | {outcome} |" for name, measured, outcome, limit in rows]
    met = sum(row[2] == "met" for row in rows)
    lines += ["", f"{met} of {len(rows)} targets met" + ("" if met == len(rows) else
              f"; {sum(row[2] == 'NOT MET' for row in rows)} not met, {sum(row[2] == 'NOT MEASURED' for row in rows)} not measured")]
    lines += route_candidates(tables(texts["speed.md"]))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", type=Path, help="the folder gpu.sh wrote (loop.md, speed.md, kernels.md)")
    parser.add_argument("--cpu", action="store_true", help="a CPU run's limits (whole step ≤ 1.05× bare)")
    parser.add_argument("--markdown", type=Path, help="also write the verdicts to this file")
    args = parser.parse_args(argv)
    text = report(args.folder, args.cpu)
    print(text)
    if args.markdown:
        args.markdown.write_text(text + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
