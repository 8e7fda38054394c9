"""A sweep's report: one self-contained HTML file (report/index.html), readable with no network.

It holds the runs' table (click a header to sort), the plots `sdtune compare` draws, and for every
prompt the runs' images side by side, each linked to its run's config.toml. Images and plots are
inlined as data URIs so that the file is the whole report: images up to THUMBNAIL pixels a side are
inlined as the PNGs they are (the tiny models' 64 px images are a few KB), and so are the plots, whose
text a preview would blur; larger images (SD's 512 px) as THUMBNAIL-pixel JPEG previews, which keeps a
20-prompt, 30-run report near 10 MB; the full images stay in the run folders. With a seed axis, the runs
that differ only in their seed are gathered into one row each: mean ± standard deviation over the seeds.
Opened as `index.html?selftest=1` the page checks itself (every image decoded, the table sorts) and
writes the outcome into `#selftest`, which headless Chromium's `--dump-dom` reads in the tests.
"""

from __future__ import annotations

import base64
import html
import io
import json
import os
import time
from pathlib import Path
from typing import Any

REPORT_FILE = "index.html"
THUMBNAIL = 256

SCRIPT = r"""
(function () {
  function cellValue(row, column) {
    var cell = row.cells[column];
    return cell ? cell.getAttribute("data-value") : "";
  }
  function compare(a, b) {
    if (a === b) return 0;
    if (a === "" || a === null) return 1;
    if (b === "" || b === null) return -1;
    var x = parseFloat(a), y = parseFloat(b);
    if (!isNaN(x) && !isNaN(y) && String(x) === a.trim() && String(y) === b.trim()) return x - y;
    if (!isNaN(Number(a)) && !isNaN(Number(b))) return Number(a) - Number(b);
    return a.localeCompare(b, undefined, {numeric: true});  // axis labels: seed2 before seed10, lr3x before lr10x
  }
  function sortBy(header) {
    var table = header.closest("table"), body = table.tBodies[0];
    var column = Array.prototype.indexOf.call(header.parentNode.children, header);
    var ascending = header.getAttribute("aria-sort") !== "ascending";
    var rows = Array.prototype.slice.call(body.rows);
    rows.sort(function (r, s) {
      var a = cellValue(r, column), b = cellValue(s, column);
      if (a === "" && b !== "") return 1;
      if (b === "" && a !== "") return -1;
      var order = compare(a, b);
      return ascending ? order : -order;
    });
    rows.forEach(function (row) { body.appendChild(row); });
    Array.prototype.forEach.call(header.parentNode.children, function (th) { th.removeAttribute("aria-sort"); });
    header.setAttribute("aria-sort", ascending ? "ascending" : "descending");
  }
  Array.prototype.forEach.call(document.querySelectorAll("th.sortable"), function (th) {
    th.addEventListener("click", function () { sortBy(th); });
  });

  function columnValues(key) {
    var header = document.querySelector('th[data-key="' + key + '"]');
    var column = Array.prototype.indexOf.call(header.parentNode.children, header);
    return Array.prototype.map.call(document.querySelector("#runs").tBodies[0].rows, function (row) {
      return cellValue(row, column);
    });
  }
  function ordered(values, sign) {
    for (var i = 1; i < values.length; i++) {
      if (values[i - 1] === "" || values[i] === "") continue;
      if (sign * compare(values[i - 1], values[i]) > 0) return false;
    }
    return true;
  }
  function selftest() {
    var problems = [];
    var images = Array.prototype.slice.call(document.images);
    images.forEach(function (image) {
      if (!image.complete || image.naturalWidth === 0) problems.push("image not shown: " + image.alt);
    });
    ["run", "index"].forEach(function (key) {
      var header = document.querySelector('th[data-key="' + key + '"]');
      if (!header) { problems.push("no column " + key); return; }
      header.click();
      if (!ordered(columnValues(key), 1)) problems.push("not ascending by " + key + ": " + columnValues(key).join(","));
      header.click();
      if (!ordered(columnValues(key), -1)) problems.push("not descending by " + key + ": " + columnValues(key).join(","));
    });
    var result = document.getElementById("selftest");
    result.textContent = (problems.length ? "selftest FAIL " + problems.join("; ") : "selftest PASS") +
      " images=" + images.length + " rows=" + document.querySelector("#runs").tBodies[0].rows.length;
  }
  if (/[?&]selftest=1\b/.test(location.search)) {
    if (document.readyState === "complete") selftest(); else window.addEventListener("load", selftest);
  }
})();
"""

STYLE = """
body { font-family: system-ui, sans-serif; margin: 1.5em; color: #222; }
table { border-collapse: collapse; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.5em; text-align: left; vertical-align: top; }
th.sortable { cursor: pointer; background: #f3f3f3; user-select: none; }
th[aria-sort=ascending]::after { content: " \\25B2"; }
th[aria-sort=descending]::after { content: " \\25BC"; }
td.number { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
tr.failed td { background: #fde8e8; }
tr.pending td { color: #888; }
.plots img { max-width: 48%; margin: 0.3em; border: 1px solid #ddd; }
.prompt { margin: 1.2em 0; }
.prompt h3 { font-size: 1em; font-weight: normal; font-style: italic; }
.cells { display: flex; flex-wrap: wrap; gap: 0.6em; }
figure { margin: 0; text-align: center; font-size: 0.8em; }
figure img { width: 128px; height: 128px; image-rendering: pixelated; border: 1px solid #ddd; }
#selftest { color: #888; font-size: 0.8em; }
"""


def data_uri(path: Path, full: bool = False) -> str:
    """The image as a data URI: as it is when small (or `full`: a plot, whose text a preview would blur away),
    else a THUMBNAIL-pixel JPEG preview."""
    from PIL import Image

    with Image.open(path) as image:
        if (full or max(image.size) <= THUMBNAIL) and path.suffix.lower() == ".png":
            return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()
        preview = image.convert("RGB")
        preview.thumbnail((THUMBNAIL, THUMBNAIL))
        buffer = io.BytesIO()
        preview.save(buffer, format="JPEG", quality=85)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode()


def _img(path: Path, name: str) -> str:
    return f'<img src="{data_uri(path)}" alt="{html.escape(name)}: {html.escape(path.name)}">'


def _run_lr(folder: Path) -> Any:
    """The learning rate the run trained with (its config.toml), or blank."""
    import tomllib

    try:
        return tomllib.loads((folder / "config.toml").read_text(encoding="utf-8")).get("lr", "")
    except (OSError, ValueError):
        return ""


def _seconds(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) and value >= 0 else None


def duration(seconds: float) -> str:
    """'42.0 s', '12 min 05 s', '3 h 07 min': a training time as a person reads it."""
    if seconds < 60:
        return f"{seconds:.1f} s"
    whole = round(seconds)
    if whole < 3600:
        return f"{whole // 60} min {whole % 60:02d} s"
    return f"{whole // 3600} h {whole % 3600 // 60:02d} min"


def _number(key: str, value: Any) -> str:
    """A number of the run table as its column shows it: a count with thousands separators, a metric at its fixed
    precision (`format_metric`), s/step at SECONDS_DECIMALS places, the learning rate as config.toml writes it."""
    from .evaluation import METRICS, format_fixed, format_metric

    if value in ("", None) or isinstance(value, bool):
        return "" if value in ("", None) else str(value)
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if key in METRICS:
            return format_metric(key, value)
        if key == "train_seconds_per_step":
            return format_fixed(value, SECONDS_DECIMALS)
        return repr(value)  # the learning rate: 0.0001, 1e-05, as written
    return str(value)


SEEDS_FILE = "seeds.csv"


def across_seeds(runs: list[tuple[dict[str, Any], str, dict[str, Any]]], axes: list[str], keys: list[str]) -> list[dict[str, Any]]:
    """The runs (axis labels, state, values) grouped by every axis but `seed`, in plan order: for each group,
    its axis labels, how many of its seeds finished, their trainable-parameter counts (one, unless an option
    depends on the seed) and each key's mean and sample standard deviation (n − 1; None for one seed) over its
    finished runs' values."""
    import statistics

    others = [axis for axis in axes if axis != "seed"]
    groups: dict[tuple, dict[str, Any]] = {}
    for labels, state, values in runs:
        group = groups.setdefault(tuple(labels.get(axis, "") for axis in others),
                                  {"axes": {axis: labels.get(axis, "") for axis in others}, "seeds": 0, "finished": 0,
                                   "trainable": [], "values": {}})
        group["seeds"] += 1
        if state != "finished":
            continue
        group["finished"] += 1
        if isinstance(values.get("trainable_parameters"), int) and values["trainable_parameters"] not in group["trainable"]:
            group["trainable"].append(values["trainable_parameters"])
        for key in keys:
            if isinstance(values.get(key), (int, float)) and not isinstance(values.get(key), bool):
                group["values"].setdefault(key, []).append(float(values[key]))
    rows = []
    for group in groups.values():
        stats = {key: (statistics.fmean(found), statistics.stdev(found) if len(found) > 1 else None)
                 for key, found in group.pop("values").items()}
        rows.append({**group, "stats": stats})
    return rows


# how the across-seeds table shows a mean and its spread, said once on the page
SPREAD_RULE = ("Each mean is shown to its spread's second significant digit, but at most two decimal places finer than "
               "the run table shows the column; a spread too small for that is written in scientific notation, as is "
               "a value too small for the column's precision; one finished seed reads as the run table does.")
SECONDS_DECIMALS = 3  # s/step, in every table


def column_decimals(key: str) -> int:
    """The decimal places the run table shows `key` at: a metric's own, s/step's."""
    from .evaluation import metric_decimals

    return SECONDS_DECIMALS if key == "train_seconds_per_step" else metric_decimals(key)


def _mean_spread(mean: float, spread: float | None, decimals: int = 4) -> str:
    """'0.8751 ± 0.0012': the spread to two significant digits and the mean to the same decimal place, as a paper
    writes them, at most two places finer than the column's `decimals` (SPREAD_RULE); the mean alone as the run
    table shows it (`decimals` places) for one seed."""
    import math

    from .evaluation import format_fixed

    if spread is None or not math.isfinite(spread) or not math.isfinite(mean):
        return format_fixed(mean, decimals)
    if spread == 0:
        return f"{format_fixed(mean, decimals)} ± 0"
    places = min(max(0, 1 - math.floor(math.log10(spread))), decimals + 2)
    shown_mean = format_fixed(mean, decimals) if "e" in format_fixed(mean, decimals) else f"{mean:.{places}f}"
    shown_spread = f"{spread:.{places}f}" if spread >= 10 ** -places else f"{spread:.1e}"
    return f"{shown_mean} ± {shown_spread}"


def _clean(value: float) -> float:
    """`value` to 8 significant digits: a mean of floats written as 0.07598, not 0.07597999999999999."""
    return float(f"{value:.8g}")


def seeds_section(groups: list[dict[str, Any]], axes: list[str], keys: list[tuple[str, str]]) -> list[str]:
    """The across-seeds table of the HTML report."""
    head = "".join(f'<th class="sortable" data-key="{html.escape(axis)}">{html.escape(axis)}</th>' for axis in axes)
    head += '<th class="sortable" data-key="seeds">seeds</th><th class="sortable" data-key="trainable">trainable</th>'
    head += "".join(f'<th class="sortable" data-key="{html.escape(key)}">{html.escape(title)}</th>' for key, title in keys)
    body = []
    for group in groups:
        cells = [f'<td data-value="{html.escape(str(group["axes"][axis]))}">{html.escape(str(group["axes"][axis]))}</td>' for axis in axes]
        cells.append(f'<td class="number" data-value="{group["finished"]}">{group["finished"]} of {group["seeds"]}</td>')
        trainable = group["trainable"]
        cells.append(f'<td class="number" data-value="{trainable[0] if trainable else ""}">{", ".join(f"{n:,}" for n in trainable)}</td>')
        for key, _ in keys:
            mean, spread = group["stats"].get(key, (None, None))
            shown = "" if mean is None else _mean_spread(mean, spread, column_decimals(key))
            cells.append(f'<td class="number" data-value="{"" if mean is None else mean}">{html.escape(shown)}</td>')
        body.append(f'<tr>{"".join(cells)}</tr>')
    return [
        "<h2>Across seeds</h2><p>The runs that differ only in their seed, together: mean ± sample standard deviation "
        f"(n − 1) over the finished seeds; also in <code>{SEEDS_FILE}</code>. {html.escape(SPREAD_RULE)}</p>",
        f'<table id="seeds"><thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody></table>',
    ]


def seeds_csv(groups: list[dict[str, Any]], axes: list[str], keys: list[str]) -> str:
    """The across-seeds table as CSV: each key's mean and standard deviation in columns of their own."""
    import csv

    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow([*axes, "seeds", "finished", "trainable_parameters"] + [f"{key}_{part}" for key in keys for part in ("mean", "std")])
    for group in groups:
        stats = [group["stats"].get(key, (None, None)) for key in keys]
        trainable = " ".join(str(n) for n in group["trainable"])
        writer.writerow([*(group["axes"][axis] for axis in axes), group["seeds"], group["finished"], trainable]
                        + ["" if value is None else _clean(value) for pair in stats for value in pair])
    return buffer.getvalue()


def write_html_report(plan, comparison) -> Path:
    """Write plan.output/report/index.html (atomically: shards may write it at the same time)."""
    from .evaluation import METRICS
    from .fileio import write_text_atomic

    folder = plan.report_folder
    folder.mkdir(parents=True, exist_ok=True)
    axes = [axis for axis, _ in plan.axes]
    rows_by_folder = {}
    if comparison is not None:
        from .comparison import UNCOMPARED_SETTINGS, setting_differences

        # what tells the runs apart beside their axes' columns and the lr column (an init_weights or a resolution a
        # method axis's table sets, a clip_skip ...): the table has no model or size column of its own, as compare's has
        uncompared = frozenset(UNCOMPARED_SETTINGS - {"model", "resolution"})
        differences = setting_differences([summary.settings for summary in comparison.runs], uncompared)
        for summary, shown in zip(comparison.runs, differences):
            row = summary.row()
            row["settings"] = ", ".join(text for key, text in shown.items() if key not in axes and key != "lr")
            rows_by_folder[Path(summary.path).resolve()] = row
    metric_names = [name for name in METRICS if any(row.get(name) not in ("", None) for row in rows_by_folder.values())]

    def link(run) -> str:
        return html.escape(os.path.relpath(run.folder / "config.toml", folder).replace(os.sep, "/"))

    columns = [("index", "#", True), ("run", "run", False), ("state", "state", False)]
    columns += [(f"axis-{axis}", axis, False) for axis in axes]
    columns += [("variant", "variant", False)]
    differ = any(row["settings"] for row in rows_by_folder.values())
    columns += [("settings", "settings", False)] if differ else []
    columns += [("lr", "lr", True), ("trainable_parameters", "trainable", True),
                ("train_seconds_per_step", "s/step", True), ("train_seconds", "train time", True)]
    columns += [(name, METRICS[name][0], True) for name in metric_names]
    states = [run.state() for run in plan.runs]  # read once: a shard may finish a run while the page is written
    columns += [("error", "note", False)] if "failed" in states else []  # a failed run's reason; else it would stand empty
    head = "".join(f'<th class="sortable" data-key="{html.escape(key)}">{html.escape(title)}</th>' for key, title, _ in columns)
    body = []
    prompts: dict[str, list[tuple[Any, list[Path]]]] = {}
    counts = {"finished": 0, "failed": 0, "pending": 0}
    seeded: list[tuple[dict[str, Any], str, dict[str, Any]]] = []  # every run's axis labels, state and values
    trained: list[float] = []  # each run's training seconds, where its marker records them
    for run, state in zip(plan.runs, states):
        counts[state] = counts.get(state, 0) + 1
        marker = run.marker() or {}
        row = rows_by_folder.get(run.folder.resolve(), {}) if state == "finished" else {}
        seeded.append((run.axes, state, row))
        values: dict[str, Any] = {"index": run.index, "run": run.name, "state": state,
                                  "error": marker.get("error", "") if state == "failed" else ""}
        values.update({f"axis-{axis}": run.axes.get(axis, "") for axis in axes})
        values.update(row)
        if state == "finished":
            values["lr"] = _run_lr(run.folder)
        if state != "pending" and _seconds(marker.get("train_seconds")) is not None:  # a failed run's training counts too
            values["train_seconds"] = float(marker["train_seconds"])
            trained.append(values["train_seconds"])
        cells = []
        for key, _, numeric in columns:
            value = values.get(key, "")
            raw = "" if value in ("", None) else str(value)
            shown = _number(key, value) if numeric else raw  # as comparison.md shows them: one precision a column
            if key == "train_seconds" and isinstance(value, float):
                shown = duration(value)
            if key == "run" and state == "finished":
                shown_html = f'<a href="{link(run)}">{html.escape(shown)}</a>'
            else:
                shown_html = html.escape(shown)
            css = ' class="number"' if numeric else ""
            cells.append(f'<td{css} data-value="{html.escape(raw)}">{shown_html}</td>')
        body.append(f'<tr class="{state}" data-run="{html.escape(run.name)}">{"".join(cells)}</tr>')
        if state == "finished":
            for prompt, files in zip(marker.get("prompts", []), marker.get("images", [])):
                paths = [run.folder / name for name in files if (run.folder / name).is_file()]
                if paths:
                    prompts.setdefault(prompt, []).append((run, paths))

    for prompts_file in sorted(plan.output.glob("base/*/prompts.json")):  # the base model's draws (digits metrics)
        for index, prompt in enumerate(json.loads(prompts_file.read_text(encoding="utf-8"))):
            paths = sorted(prompts_file.parent.glob(f"images/{index:03d}-*.png"))
            if prompt in prompts and paths:
                prompts[prompt].insert(0, (None, paths))

    parts = [
        "<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
        f"<title>sweep {html.escape(plan.name)}</title><style>{STYLE}</style></head><body>",
        f"<h1>Sweep {html.escape(plan.name)}</h1>",
    ]
    if plan.description:
        parts.append(f"<p>{html.escape(plan.description)}</p>")
    parts.append(
        f"<p>{len(plan.runs)} runs: {counts['finished']} finished, {counts['failed']} failed, "
        f"{counts['pending']} pending. Written {time.strftime('%Y-%m-%d %H:%M:%S %Z')} from "
        f"<code>{html.escape(str(plan.path))}</code>. Click a column's header to sort by it."
        + (' No metrics were asked for (the plan\'s metrics = "none").' if plan.metrics == "none" else "") + "</p>"
    )
    if trained:
        parts.append(f"<p>Training took {duration(sum(trained))} in all, over {len(trained)} runs (train time: a run's "
                     "training over every invocation of it, resumes and extensions included, as the sweep recorded it; "
                     "s/step: the median training step).</p>")
    parts.append(f'<table id="runs"><thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody></table>')
    if differ:
        parts.append("<p>Settings: the training settings the runs differ in beside their axes and learning rate, each "
                     "where a run's is not sdtune's default.</p>")
    seed_values = dict(plan.axes).get("seed", [])
    if len(seed_values) > 1:  # a metric's spread over seeds is what tells a difference between methods from noise
        others = [axis for axis in axes if axis != "seed"]
        keys = [("train_seconds_per_step", "s/step")]
        keys += [(name, METRICS[name][0]) for name in metric_names]
        groups = across_seeds(seeded, axes, [key for key, _ in keys])
        parts += seeds_section(groups, others, keys)
        write_text_atomic(folder / SEEDS_FILE, seeds_csv(groups, others, [key for key, _ in keys]))
    else:  # an earlier plan's, with a seed axis this one has not: it would be read as this sweep's
        (folder / SEEDS_FILE).unlink(missing_ok=True)
    if metric_names:
        parts.append("<ul>" + "".join(f"<li>{html.escape(METRICS[n][0])}: {html.escape(METRICS[n][1])}</li>" for n in metric_names) + "</ul>")
    plots = [path for path in (comparison.files if comparison else []) if path.suffix == ".png" and path.is_file()]
    if plots:
        parts.append('<h2>Plots</h2><div class="plots">')
        parts += [f'<img src="{data_uri(path, full=True)}" alt="{html.escape(path.stem)}">' for path in plots]
        parts.append("</div>")
    if prompts:
        parts.append("<h2>Samples</h2><p>Each image links to its run's config.toml.</p>")
        for prompt, entries in prompts.items():
            parts.append(f'<div class="prompt"><h3>{html.escape(prompt)}</h3><div class="cells">')
            for run, paths in entries:
                name = run.name if run is not None else "base model"
                images = "".join(
                    (f'<a href="{link(run)}">{_img(path, name)}</a>' if run is not None else _img(path, name)) for path in paths
                )
                parts.append(f"<figure>{images}<figcaption>{html.escape(name)}</figcaption></figure>")
            parts.append("</div></div>")
    parts.append(f'<p id="selftest"></p><script>{SCRIPT}</script></body></html>')
    path = folder / REPORT_FILE
    write_text_atomic(path, "\n".join(parts) + "\n")
    return path
