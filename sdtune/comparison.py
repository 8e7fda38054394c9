"""Compare runs: one table (markdown and CSV), metric-vs-trainable-parameters and training-loss plots, and an image grid.

Each run folder gives its method and options and trainable-parameter count (the adapter's metadata),
the adapter's size on disk, the training speed and loss curve (metrics.jsonl) and, where `sdtune
evaluate` measured it, every metric of eval.json. The grid samples every run with the same prompts
and the same seed: rows = prompts, columns = runs.
"""

from __future__ import annotations

import collections
import csv
import io
import os
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .config import CompareConfig
from .errors import SdtuneError, shell_word, warn
from .evaluation import METRICS, format_metric, read_evaluation, stale_evaluation
from .fileio import human_bytes
from .tracking import METRICS_FILE, read_metrics_log

TABLE_FILE = "comparison.md"
CSV_FILE = "comparison.csv"
LOSS_PLOT = "training-loss-vs-step.png"
# the plots an earlier version wrote under other names: an earlier comparison's, removed with its other plots
OLD_PLOTS = ("loss.png", *(f"{name}-vs-parameters.png" for name in METRICS))
GRID_FILE = "grid.png"
# the grid's --prompts lines with their kohya-ss options (--n, --w, ...), in OUTPUT/samples: what every run's sample reads
GRID_PROMPTS_FILE = "grid-prompts.txt"
BASE_COLUMNS = (
    "run", "method", "variant", "settings", "model", "resolution", "trainable_parameters", "adapter_bytes", "train_seconds_per_step", "peak_memory_mb",
)


@dataclass
class RunSummary:
    """What one run folder says about itself."""

    name: str
    path: Path
    method: str
    variant: str
    num_parameters: int
    adapter_bytes: int
    seconds_per_step: float | None = None
    peak_memory_mb: float | None = None
    losses: list[tuple[int, float]] = field(default_factory=list)
    metrics: dict[str, float] = field(default_factory=dict)
    unavailable: dict[str, str] = field(default_factory=dict)
    eval_prompts: list[str] = field(default_factory=list)
    placeholder: str = ""
    placeholder_tokens: str | dict[str, str] | None = None  # each concept's token, for a run of several
    model: str = ""  # the base model the adapter was trained on
    resolution: int | None = None  # the run's --resolution; None: the model's own size
    stale_evaluation: str = ""  # why its eval.json's metrics were left out (they measured another adapter)
    unfinished: str = ""  # why the adapter is not the run's last ("step 16 of 40, training now (pid 7 on host)")
    settings: dict[str, Any] = field(default_factory=dict)  # its config.toml's training settings, defaults filled in
    differences: dict[str, str] = field(default_factory=dict)  # the settings the compared runs differ in, as shown

    def row(self) -> dict[str, Any]:
        """The CSV row: numbers as they are, blanks where nothing was logged or measured."""
        values: dict[str, Any] = {
            "run": self.name,
            "method": self.method,
            "variant": self.variant,
            "settings": ", ".join(self.differences.values()),
            "model": self.model,
            "resolution": self.resolution,
            "trainable_parameters": self.num_parameters,
            "adapter_bytes": self.adapter_bytes,
            # six digits: a median of two float times reads 0.0961, not 0.09609999999999999
            "train_seconds_per_step": None if self.seconds_per_step is None else float(f"{self.seconds_per_step:.6g}"),
            "peak_memory_mb": self.peak_memory_mb,
        }
        values.update({name: self.metrics.get(name) for name in METRICS})
        return {key: "" if value is None else value for key, value in values.items()}


@dataclass
class Comparison:
    output: Path
    runs: list[RunSummary]
    files: list[Path]
    table: str


def variant_of(method: str, options: dict[str, Any]) -> str:
    """The options that differ from the method's defaults, e.g. 'rank=8, targets=attn', or 'defaults'."""
    from . import methods

    try:
        changed = methods.create(method).changed_options(options)
    except SdtuneError:  # a method this sdtune does not know: every option is shown
        changed = dict(options)
    return ", ".join(f"{k}={v}" for k, v in sorted(changed.items())) or "defaults"


def summarize_run(path: str | Path) -> RunSummary:
    """A run folder, or one of its step files (adapter-step-N.safetensors: the run as it was at that save, named
    RUN-step-N, with its losses up to that step and its own eval-step-N.json)."""
    from .adapter import (ADAPTER_FILE, adapter_path, missing_adapter_reason, outputs_suffix, read_adapter_info, saved_step,
                          unfinished_run)
    from .evaluation import evaluation_file

    path = Path(path)
    step = saved_step(path)
    if step is not None and not path.exists():
        adapter_path(path)  # refused as sample and evaluate refuse it: not found, naming the step files there are
    step_file = step is not None and path.is_file()
    folder, adapter = (path.parent, path) if step_file else (path, path / ADAPTER_FILE)
    if not adapter.is_file():
        why = missing_adapter_reason(path) if path.is_dir() else ""
        raise SdtuneError(f"{path}: not a run folder (no {ADAPTER_FILE}" + (f"; {why})" if why else ")"))
    info = read_adapter_info(adapter)[0]
    records = read_metrics_log(folder / METRICS_FILE)
    seconds = [r["step_seconds"] for r in records if isinstance(r.get("step_seconds"), (int, float))]
    memory = [r["peak_memory_mb"] for r in records if isinstance(r.get("peak_memory_mb"), (int, float))]
    memory += [r["peak_memory_bytes"] / 2**20 for r in records if isinstance(r.get("peak_memory_bytes"), (int, float))]
    losses = [(int(r["step"]), float(r["loss"])) for r in records if "step" in r and "loss" in r]
    if step_file:  # the steps that made it
        losses = [(logged, loss) for logged, loss in losses if logged <= step]
    report = read_evaluation(folder, evaluation_file(adapter).name) or {}
    stale = stale_evaluation(report, folder, info.method, info.options, adapter.name) if report else ""
    if stale:  # another adapter's numbers would be read as this one's
        warn(f"{path}: {stale}; its metrics are left out (run `sdtune evaluate --run {shell_word(path)}` again)")
        report = {}
    return RunSummary(
        name=folder.name + outputs_suffix(adapter),  # castle-step-000200 beside castle: their samples' folders differ
        path=path,
        method=info.method,
        variant=variant_of(info.method, info.options),
        num_parameters=int(info.extra.get("num_parameters", 0)),
        adapter_bytes=adapter.stat().st_size,
        seconds_per_step=statistics.median(seconds) if seconds else None,  # the median skips the first step's warm-up
        peak_memory_mb=max(memory) if memory else None,
        losses=losses,
        metrics={k: float(v) for k, v in report.get("metrics", {}).items() if k in METRICS},
        unavailable=dict(report.get("unavailable", {})),
        eval_prompts=list(report.get("prompts", [])),
        placeholder=info.placeholder,
        placeholder_tokens=info.placeholder_tokens(),
        unfinished="" if step_file else unfinished_run(folder, info.extra.get("step", "")),  # a step file is a chosen step
        model=info.base_model,
        resolution=run_resolution(folder),
        stale_evaluation=stale,
        settings=run_settings(folder),
    )


def run_resolution(path: Path) -> int | None:
    """The run's --resolution from its config.toml; None where it trained at the model's own size (or says nothing)."""
    from .config import read_toml

    try:
        resolution = read_toml(path / "config.toml").get("resolution")
    except SdtuneError:
        return None
    return resolution if isinstance(resolution, int) and not isinstance(resolution, bool) and resolution > 0 else None


# Training settings the table does not tell runs apart by: those it shows in columns of their own, and those that change
# neither what a run learns nor what it draws (where it writes and logs, how often it saves, savers of time and memory)
UNCOMPARED_SETTINGS = frozenset({
    "method", "options", "model", "resolution", "output", "resume", "overwrite", "save_every", "keep_saves", "checkpoint_every",
    "keep_checkpoints", "gradient_checkpointing", "compile", "compile_mode", "cache_latents", "validate_every", "validation_prompts",
    "validation_dtype", "validation_width", "validation_height", "log_with", "tracker_project",
})


def train_defaults() -> dict[str, Any]:
    """TrainConfig's settings at their defaults (None where the run resolves one: the learning rate, the token...)."""
    import dataclasses

    from .config import TrainConfig

    return {spec.name: spec.default_factory() if spec.default_factory is not dataclasses.MISSING
            else None if spec.default is dataclasses.MISSING else spec.default for spec in dataclasses.fields(TrainConfig)}


def run_settings(path: Path) -> dict[str, Any]:
    """The run's training settings from its config.toml, each one it leaves out at TrainConfig's default (config.toml
    leaves out settings at their defaults, and an older one those that did not exist yet); {} without config.toml."""
    from .config import read_toml

    try:
        return with_defaults(read_toml(path / "config.toml"))
    except SdtuneError:
        return {}


def with_defaults(written: dict[str, Any]) -> dict[str, Any]:
    """Training settings as config.toml writes them (`TrainConfig.to_dict`), every one left out at its default."""
    settings = {**train_defaults(), **written}
    if isinstance(settings.get("concept"), str) and settings.get("token") == f"sks {settings['concept']}":
        settings["token"] = None  # the default token follows the concept, which is shown
    return settings


def differing_settings(settings: list[dict[str, Any]], uncompared: frozenset[str] = UNCOMPARED_SETTINGS) -> list[str]:
    """The training settings but `uncompared` whose values are not the same in every run's `settings` (config.toml's
    order)."""
    import json

    known = [values for values in settings if values]  # a run without config.toml tells nothing of its settings
    keys = list(dict.fromkeys(key for values in known for key in values if key not in uncompared))
    return [key for key in keys if len({json.dumps(values.get(key), sort_keys=True, default=str) for values in known}) > 1]


def short_paths(paths: list[str]) -> dict[str, str]:
    """Each path by as few of its last parts as tell the paths apart: a run's adapter.safetensors by its run folder
    (runs/lora-a/adapter.safetensors: lora-a; a/style.safetensors and b/style.safetensors: a/style.safetensors ...)."""
    from .adapter import ADAPTER_FILE

    def parts(path: str) -> list[str]:
        found = [part for part in Path(os.path.normpath(path)).parts if part not in ("", "/", ".")]
        return found[:-1] if len(found) > 1 and found[-1] == ADAPTER_FILE else found

    distinct = list(dict.fromkeys(paths))
    for depth in range(1, max((len(parts(path)) for path in distinct), default=1) + 1):
        names = {path: "/".join(parts(path)[-depth:]) for path in distinct}
        if len(set(names.values())) == len(distinct):
            return names
    return {path: path for path in distinct}


def _base_adapter_path(entry: str) -> str:
    """The file of a `FILE[:STRENGTH]` entry as config.toml holds it (the entry whole where it does not parse)."""
    from .config import parse_base_adapter

    try:
        return parse_base_adapter(entry).path
    except SdtuneError:  # a config.toml edited by hand: shown as it is rather than refusing the comparison
        return entry


def _setting_text(key: str, value: Any, short: dict[str, str], default: Any = None) -> str:
    """One setting as the table shows it: `clip_skip=2`, a flag by its name, files by their short names, base adapters
    at their strengths as given (`style.safetensors:0.5`); '' where it is off (no file, false, none) or at `default`."""
    from .config import PATH_SETTINGS

    if value is None or value is False or value == [] or value == {} or value == "" or value == default:
        return ""
    if value is True:
        return key
    if key == "base_adapters" and isinstance(value, list):
        shown = []
        for entry in map(str, value):
            path = _base_adapter_path(entry)
            shown.append(short.get(path, path) + entry[len(path):])  # the strength as written (":0.5"), if any
        return f"{key}={'+'.join(shown)}"
    if isinstance(value, list):
        return f"{key}={'+'.join(short.get(str(item), str(item)) if key in PATH_SETTINGS else str(item) for item in value)}"
    if key in PATH_SETTINGS and isinstance(value, str):
        return f"{key}={short.get(value, value)}"
    if isinstance(value, float):
        return f"{key}={value:g}"
    if isinstance(value, str) and (" " in value or "," in value or not value):
        return f'{key}="{value}"'
    return f"{key}={value}"


def setting_differences(settings: list[dict[str, Any]], uncompared: frozenset[str] = UNCOMPARED_SETTINGS) -> list[dict[str, str]]:
    """For each run's training settings (`with_defaults`'), the settings but `uncompared` the runs differ in, each as
    `_setting_text` writes it, where the run's is not sdtune's default (a learning rate always: its default is the
    method's)."""
    from .config import PATH_SETTINGS

    defaults = train_defaults()
    differences: list[dict[str, str]] = [{} for _ in settings]
    for key in differing_settings(settings, uncompared):
        paths: list[str] = []
        if key in PATH_SETTINGS and key != "model":  # a hub id is a name, not a path to cut short
            for values in settings:
                value = values.get(key)
                entries = value if isinstance(value, list) else [value] if isinstance(value, str) else []
                paths += [_base_adapter_path(str(entry)) if key == "base_adapters" else str(entry) for entry in entries]
        short = short_paths(paths)
        for values, shown in zip(settings, differences):
            text = _setting_text(key, values.get(key), short, defaults.get(key))
            if text:
                shown[key] = text
    return differences


def describe_differences(runs: list[RunSummary]) -> None:
    """Set each run's `differences`: the settings the runs differ in (init_weights, clip_skip, seed, lr ...) that the
    method, variant, model and resolution do not show (`setting_differences`)."""
    for run, differences in zip(runs, setting_differences([run.settings for run in runs])):
        run.differences = differences


def markdown_table(runs: list[RunSummary], metric_names: list[str]) -> str:
    """The runs' table, its columns padded to one width each (text left, numbers right), so that it reads aligned where
    it is printed as it is, and renders as any markdown table."""
    # the base model and training size are shown where the runs differ in them: a sweep's runs mostly share both
    settings = [("model", "model"), ("resolution", "px")]
    settings = [(key, title) for key, title in settings if len({getattr(run, key) for run in runs}) > 1]
    differ = any(run.differences for run in runs)  # what else tells the runs apart: init_weights, clip_skip, seed ...
    memory = any(run.peak_memory_mb is not None for run in runs)  # a column no run logged would stand empty
    header = ["run", "method", "variant", *(["settings"] if differ else []), *(title for _, title in settings),
              "trainable", "adapter", "s/step", *(["peak MB"] if memory else [])]
    header += [METRICS[name][0] for name in metric_names]
    texts = 3 + differ + len(settings)
    rows = []
    for run in runs:
        cells = [
            run.name + (" (unfinished)" if run.unfinished else ""),
            run.method,
            run.variant,
            *([", ".join(run.differences.values())] if differ else []),
            *(("native" if getattr(run, key) is None else str(getattr(run, key))) for key, _ in settings),
            f"{run.num_parameters:,}",
            human_bytes(run.adapter_bytes),
            f"{run.seconds_per_step:.3f}" if run.seconds_per_step is not None else "",
            *([f"{run.peak_memory_mb:,.0f}" if run.peak_memory_mb is not None else ""] if memory else []),
        ]
        cells += [format_metric(name, run.metrics[name]) if name in run.metrics else "" for name in metric_names]
        rows.append([cell.replace("|", "\\|") for cell in cells])
    widths = [max(3, len(title), *(len(row[column]) for row in rows)) for column, title in enumerate(header)]

    def line(cells: list[str]) -> str:
        return "| " + " | ".join(cell.ljust(width) if column < texts else cell.rjust(width)
                                 for column, (cell, width) in enumerate(zip(cells, widths))) + " |"

    rule = "|" + "|".join("-" * (width + 2) if column < texts else "-" * (width + 1) + ":" for column, width in enumerate(widths)) + "|"
    return "\n".join([line(header), rule, *(line(row) for row in rows)])


# ---------------------------------------------------------------------------------------------
# Plots (matplotlib, no display)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(figure, path: Path) -> Path:
    from .fileio import atomic_write

    with atomic_write(path) as tmp:
        figure.savefig(tmp, format="png", dpi=120, bbox_inches="tight")
    _pyplot().close(figure)
    return path


# What a run's metrics are measured against (CLIP-I, DINO, FID: its own reference images) and on: runs that differ in
# these are plotted in panels of their own, never on one axis where their values would read as comparable
REFERENCE_SETTINGS = ("dataset", "data_root", "split", "classes", "max_per_class", "concept", "images")
# each metric's axis: what its numbers are
METRIC_UNITS = {
    "clip_t": "CLIP score, 100 × cosine", "clip_i": "cosine similarity", "dino": "cosine similarity",
    "fid": "Fréchet distance", "kid": "MMD²", "kid_std": "MMD²", "diversity": "1 − mean cosine similarity within a prompt",
    "digit_fidelity": "feature cosine similarity", "style_fidelity": "share of gap closed", "preservation": "accuracy",
}
PARAMETERS_AXIS = "trainable parameters (count, log scale)"
LEGEND_WIDTH = 40  # characters a legend line wraps at: a long run name grows the legend downwards, not off the page


def metric_plot_name(metric: str) -> str:
    return f"{metric}-vs-trainable-parameters.png"


def _reference(run: RunSummary) -> dict[str, Any]:
    return {**{key: run.settings.get(key) for key in REFERENCE_SETTINGS}, "model": run.model}


def panels(runs: list[RunSummary]) -> list[tuple[str, list[RunSummary]]]:
    """The runs by what they are measured against and on (`REFERENCE_SETTINGS` and the model), first seen first, each
    group titled by those of its settings that differ between groups ('' where all runs share them)."""
    from .config import PATH_SETTINGS

    references = [_reference(run) for run in runs]
    keys = differing_settings(references, frozenset())
    paths = [str(item) for values in references for key in keys if key in PATH_SETTINGS and key != "model"
             for item in (values[key] if isinstance(values[key], list) else [values[key]] if values[key] else [])]
    short = short_paths(paths)
    groups: dict[str, list[RunSummary]] = {}
    for run, values in zip(runs, references):
        title = ", ".join(_setting_text(key, values[key], short) or f"{key}=none" for key in keys)
        groups.setdefault(title, []).append(run)
    return list(groups.items())


@dataclass
class SeedGroup:
    """Runs of one panel that differ only in their seed (or one run), shown as one point or curve."""

    label: str
    method: str
    runs: list[RunSummary]


def seed_groups(runs: list[RunSummary]) -> list[SeedGroup]:
    """The runs gathered by everything but their seed (a run without config.toml alone), each seed once in a group: a
    run of a seed its group holds already (a copied run folder, the same folder given twice) is a group of its own, as
    that seed counted twice would narrow the error bar and claim a seed more. Labelled by method, variant and the
    settings that tell the groups apart; where two groups would read alike, by their first run's name."""
    import json

    ignored = {"seed", *REFERENCE_SETTINGS}
    gathered: dict[str, list[list[RunSummary]]] = {}
    for run in runs:
        if run.settings:
            kept = {key: value for key, value in run.settings.items() if key not in ignored and key not in UNCOMPARED_SETTINGS}
            key = json.dumps([run.method, run.variant, run.model, kept], sort_keys=True, default=str)
        else:
            key = str(run.path.resolve()) + "\0" + run.name
        alike = gathered.setdefault(key, [])
        seed = run.settings.get("seed")
        free = next((members for members in alike if all(member.settings.get("seed") != seed for member in members)), None)
        if free is None:
            alike.append([run])
        else:
            free.append(run)
    groups = []
    for members in (members for alike in gathered.values() for members in alike):
        first = members[0]
        parts = [first.method, *([first.variant] if first.variant != "defaults" else []),
                 *(text for key, text in first.differences.items() if key not in ignored and key != "model")]
        groups.append(SeedGroup(", ".join(parts), first.method, members))
    counts = collections.Counter(group.label for group in groups)
    for group in groups:
        if counts[group.label] > 1:
            group.label = f"{group.runs[0].name} ({group.method})"
        if len(group.runs) > 1:
            group.label += f" [{len(group.runs)} seeds]"
    return groups


def _wrapped(label: str) -> str:
    import textwrap

    return "\n".join(textwrap.wrap(label, LEGEND_WIDTH, break_long_words=True, break_on_hyphens=True)) or label


def _panel_axes(plt, count: int, width: float, height: float):
    """A figure of `count` panels, two a row; the panels left over hidden."""
    columns = min(count, 2)
    rows = -(-count // columns)
    figure, grid = plt.subplots(rows, columns, figsize=(width * columns, height * rows), squeeze=False)
    flat = [axes for row in grid for axes in row]
    for spare in flat[count:]:
        spare.set_visible(False)
    return figure, flat[:count]


def _legend(figure, handles: dict[str, Any]) -> None:
    """One legend for every panel, right of them (a group in two panels has one entry): inside the saved figure,
    over no point or curve."""
    figure.legend(list(handles.values()), [_wrapped(label) for label in handles], fontsize=7, loc="upper left",
                  bbox_to_anchor=(1.0, 0.98), ncol=1 + len(handles) // 30, frameon=False)


def _group_styles(groups: list[SeedGroup], styles: tuple) -> dict[str, tuple[Any, Any]]:
    """Each group label's (colour, style): coloured by method, told apart within it by `styles`; alike in every panel."""
    plt = _pyplot()
    palette = plt.get_cmap("tab10")
    methods = sorted({group.method for group in groups})
    colours = {method: palette(i % 10) for i, method in enumerate(methods)}
    shown: dict[str, tuple[Any, Any]] = {}
    per_method: dict[str, int] = {}
    for group in groups:
        if group.label not in shown:
            index = per_method.get(group.method, 0)
            per_method[group.method] = index + 1
            shown[group.label] = (colours[group.method], styles[index % len(styles)])
    return shown


def _count_ticks(axes) -> None:
    """Parameter counts ticked at 1, 2 and 5 of each decade as plain numbers (20,000): the default minor labels
    (3×10⁴ 4×10⁴) run into each other."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    axes.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    axes.xaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:,.0f}"))
    axes.xaxis.set_minor_formatter(NullFormatter())


MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")


def plot_metric(runs: list[RunSummary], metric: str, path: Path) -> Path:
    """The metric against trainable parameters (log axis): one panel for each reference and model (`panels`), one
    point for each run, or mean ± sample standard deviation (an error bar) for runs that differ only in their seed;
    a legend beside the panels names them."""
    plt = _pyplot()
    plotted = [run for run in runs if metric in run.metrics and run.num_parameters > 0]
    sections = [(title, seed_groups(members)) for title, members in panels(plotted)]
    styles = _group_styles([group for _, groups in sections for group in groups], MARKERS)
    figure, panel_axes = _panel_axes(plt, max(len(sections), 1), 5.0, 3.6)
    handles: dict[str, Any] = {}
    name = METRICS[metric][0]
    for axes, (title, groups) in zip(panel_axes, sections):
        for group in groups:
            colour, marker = styles[group.label]
            values = [run.metrics[metric] for run in group.runs]
            count = statistics.fmean(run.num_parameters for run in group.runs)
            spread = statistics.stdev(values) if len(values) > 1 else None
            if spread is None:
                handle = axes.scatter([count], values, color=colour, marker=marker, s=40, zorder=3)
            else:
                handle = axes.errorbar([count], [statistics.fmean(values)], yerr=[spread], color=colour, marker=marker,
                                       markersize=6, capsize=4, linestyle="none", zorder=3)
            handles.setdefault(group.label, handle)
        axes.set_xscale("log")
        _count_ticks(axes)
        axes.set_xlabel(PARAMETERS_AXIS)
        axes.set_ylabel(f"{name} ({METRIC_UNITS.get(metric, 'value')})")
        axes.set_title(title or f"{name} vs trainable parameters", fontsize=9)
        axes.grid(True, which="both", alpha=0.3)
    if len(sections) > 1:
        figure.suptitle(f"{name} vs trainable parameters, by reference data and model")
    if any(len(group.runs) > 1 for _, groups in sections for group in groups):
        figure.text(0.0, -0.02, "error bars: ± sample standard deviation over seeds", fontsize=7)
    _legend(figure, handles)
    figure.tight_layout()
    return _save(figure, path)


LINE_STYLES = ("-", "--", ":", "-.")


def plot_losses(runs: list[RunSummary], path: Path) -> Path:
    """The training loss per step: one panel for each reference and model (`panels`); each run's, or for runs that
    differ only in their seed their mean at the steps all logged (the band: ± their standard deviation), raw values
    faint with a moving average on top. Coloured by method and told apart within it by line style; the legend stands
    beside the panels, where it hides no curve."""
    from matplotlib.ticker import MaxNLocator

    plt = _pyplot()
    logged = [run for run in runs if run.losses]
    sections = [(title, seed_groups(members)) for title, members in panels(logged)]
    styles = _group_styles([group for _, groups in sections for group in groups], LINE_STYLES)
    figure, panel_axes = _panel_axes(plt, max(len(sections), 1), 5.5, 3.6)
    handles: dict[str, Any] = {}
    for axes, (title, groups) in zip(panel_axes, sections):
        for group in groups:
            colour, style = styles[group.label]
            by_step = [dict(run.losses) for run in group.runs]
            steps = sorted(set.intersection(*(set(losses) for losses in by_step)))
            values = [statistics.fmean(losses[step] for losses in by_step) for step in steps]
            if len(group.runs) > 1 and steps:
                spread = [statistics.stdev(losses[step] for losses in by_step) for step in steps]
                axes.fill_between(steps, [v - s for v, s in zip(values, spread)], [v + s for v, s in zip(values, spread)],
                                  color=colour, alpha=0.12, linewidth=0)
            window = max(1, len(values) // 20)
            smooth = [statistics.fmean(values[max(0, k - window + 1): k + 1]) for k in range(len(values))]
            axes.plot(steps, values, color=colour, alpha=0.25, linewidth=0.8, linestyle=style)
            (line,) = axes.plot(steps, smooth, color=colour, linewidth=1.6, linestyle=style, label=group.label)
            handles.setdefault(group.label, line)
        axes.xaxis.set_major_locator(MaxNLocator(integer=True))  # steps are whole: no tick at step 2.5 of a short run
        axes.set_xlabel("training step")
        axes.set_ylabel("training loss (per-step mean)")
        axes.set_title(title or "training loss", fontsize=9)
        axes.grid(True, alpha=0.3)
    if len(sections) > 1:
        figure.suptitle("training loss, by reference data and model")
    _legend(figure, handles)
    figure.tight_layout()
    return _save(figure, path)


def grid_sample_configs(runs: list[RunSummary], lines: list, config: CompareConfig, output: Path) -> list:
    """Each run's sampling of the grid (`lines`: `grid_prompts`), checked against its model and the machine before
    anything is written: the prompts given as they are, a prompt file's lines with their options
    (`write_grid_prompts` writes them for `sample` to read)."""
    from .adapter import adapter_info
    from .config import SampleConfig
    from .limits import check_sample_fits
    from .models import DEFAULT_MODEL
    from .sampling import found_base_adapters, grid_size

    configs = []
    filed = any(line.where for line in lines)
    for run in runs:
        bases = found_base_adapters(run.path)  # a run trained on base adapters is drawn on them, as it trained
        sample_config = SampleConfig(
            adapter=[base.path for base in bases] + [str(run.path)],
            adapter_scale=[base.strength for base in bases] + [1.0] if bases else 1.0,
            prompt=[line.prompt for line in lines if not line.where],  # `sample` draws these first, as `grid_prompts` lists them
            prompts=str(output / "samples" / GRID_PROMPTS_FILE) if filed else None,
            output=str(output / "samples" / run.name),
            num_images=1,
            steps=config.steps,
            guidance=config.guidance,
            seed=config.seed,
            overwrite=True,  # the comparison's own folder, drawn again with it
        )
        sample_config.validate()
        model = adapter_info(run.path).base_model or DEFAULT_MODEL
        check_sample_fits(model, sample_config, len(lines), grid_size, lines)  # a line's --w, --h, --s: named by its file and line
        configs.append(sample_config)
    return configs


def write_grid_prompts(lines: list, output: Path) -> None:
    """The prompt file's lines of the grid, with their options, where every run's `sample` reads them."""
    from .data import prompt_line_text
    from .fileio import write_text_atomic

    filed = [prompt_line_text(line) for line in lines if line.where]
    if filed:
        (output / "samples").mkdir(parents=True, exist_ok=True)
        write_text_atomic(output / "samples" / GRID_PROMPTS_FILE, "\n".join(filed) + "\n")


def sample_grid(runs: list[RunSummary], lines: list, configs: list, output: Path, progress: bool) -> Path:
    """Sample every run on the same prompts with the same seed (a prompt line's --d, --w, ... its own, alike for every
    run); rows = prompts, columns = runs, each image keeping its aspect."""
    from PIL import Image

    from .fileio import atomic_write
    from .sampling import make_grid, sample

    write_grid_prompts(lines, output)
    prompts = [line.prompt for line in lines if not line.where] + [line.prompt for line in lines if line.where]
    columns = []
    for sample_config in configs:
        result = sample(sample_config, progress=progress)
        columns.append([Image.open(path).convert("RGB") for path in result.images])
    rows = [[column[r] for column in columns] for r in range(len(prompts))]
    labels = [f"{run.name} ({run.method}, {run.num_parameters:,})" for run in runs]
    path = output / GRID_FILE
    with atomic_write(path) as tmp:
        make_grid(rows, prompts, column_labels=labels).save(tmp, format="PNG")
    return path


# ---------------------------------------------------------------------------------------------
# The comparison


def _unique_names(runs: list[RunSummary]) -> None:
    """Runs of the same folder name (two sweeps' runs/lora-seed0) named by as many of their parent folders as tell
    them apart (sweep-a-runs-lora-seed0, sweep-b-runs-lora-seed0); the same folder given twice is numbered. A step file
    is named by its run folder's, then its step (sweep-a-runs-lora-seed0-step-000200)."""
    from .adapter import STEP_ADAPTER, outputs_suffix

    def folder_and_suffix(run: RunSummary) -> tuple[Path, str]:
        path = run.path.resolve()
        return (path.parent, outputs_suffix(path)) if STEP_ADAPTER.match(path.name) else (path, "")

    def name_of(run: RunSummary, depth: int) -> str:
        folder, suffix = folder_and_suffix(run)
        parts = [part for part in folder.parts if part not in ("", "/")]
        return "-".join(parts[-depth:]) + suffix

    seen: dict[str, list[RunSummary]] = {}
    for run in runs:
        seen.setdefault(run.name, []).append(run)
    for same in seen.values():
        if len(same) < 2:
            continue
        depth = deepest = max(len(folder_and_suffix(run)[0].parts) for run in same)
        for depth in range(2, deepest + 1):
            if len({name_of(run, depth) for run in same}) == len({run.path.resolve() for run in same}):
                break
        for run in same:
            run.name = name_of(run, depth)
    counts: dict[str, int] = {}
    for run in runs:  # still the same (the same folder given twice): number them
        counts[run.name] = counts.get(run.name, 0) + 1
        if counts[run.name] > 1:
            run.name = f"{run.name}-{counts[run.name]}"


def unavailable_notes(runs: list[RunSummary]) -> list[str]:
    """One line for each reason a metric was unavailable, naming its metrics and runs: a sweep's runs all miss the
    same models, which a line per metric and run would repeat dozens of times."""
    by_reason: dict[str, dict[str, list[str]]] = {}  # reason -> metric -> runs
    for run in runs:
        for metric, why in run.unavailable.items():
            if metric in METRICS:
                by_reason.setdefault(why, {}).setdefault(metric, []).append(run.name)
    lines = []
    for why, metrics in by_reason.items():
        by_runs: dict[tuple[str, ...], list[str]] = {}  # the metrics missed by the same runs share a line
        for metric in METRICS:
            if metric in metrics:
                by_runs.setdefault(tuple(metrics[metric]), []).append(METRICS[metric][0])
        for names, titles in by_runs.items():
            who = "every run" if len(runs) > 1 and len(names) == len(runs) else ", ".join(names)
            lines.append(f"- {', '.join(titles)} unavailable for {who}: {why}")
    return lines


def earlier_runs(out: Path) -> list[str]:
    """The runs of the comparison written into `out` before (its comparison.csv's run column): the names of the
    samples/<run> folders its grid drew."""
    try:
        with open(out / CSV_FILE, newline="", encoding="utf-8") as handle:
            return [row.get("run") or "" for row in csv.DictReader(handle)]
    except (OSError, csv.Error, UnicodeDecodeError):
        return []


def not_drawn_by_sample(folder: Path) -> list[str]:
    """What a run's samples folder holds that `sdtune sample` does not write (its images, grid, lock and temporaries),
    relative to the folder: a person's own files, which a comparison never removes."""
    from .fileio import LOCK_FILE, temporary_target
    from .sampling import GRID_FILE as SAMPLE_GRID, IMAGE_NAME

    def sampled(name: str, own) -> bool:
        return own(name) or own(temporary_target(name) or "")

    foreign = []
    for entry in sorted(folder.iterdir()):
        if entry.name == "images" and entry.is_dir() and not entry.is_symlink():
            foreign += [f"images/{image.name}" for image in sorted(entry.iterdir())
                        if image.is_dir() or not sampled(image.name, lambda name: bool(IMAGE_NAME.match(name)))]
        elif entry.is_dir() or not sampled(entry.name, lambda name: name in (SAMPLE_GRID, LOCK_FILE)):
            foreign.append(entry.name)
    return foreign


def own_outputs() -> list[str]:
    """The files a comparison writes into its folder but its table and CSV, relative to it: what a later one removes
    where it does not write them again."""
    return [GRID_FILE, LOSS_PLOT, f"samples/{GRID_PROMPTS_FILE}", *(metric_plot_name(name) for name in METRICS), *OLD_PLOTS]


def remove_stale_outputs(out: Path, drawn: set[str], written: set[str]) -> None:
    """Remove what the comparison written into `out` before wrote that this one does not write again (`drawn`: the runs
    whose samples/<run> it draws; `written`: the files it writes, relative to `out`): a dropped run's samples, a grid
    (--no-grid), the plot of a metric no run has now. Only compare's own outputs are removed, and only where `out`
    holds a comparison: a run's samples folder that holds anything `sdtune sample` did not write stays, with a warning."""
    from .fileio import remove_directory

    if not (out / CSV_FILE).is_file():  # no comparison here: nothing in `out` is known to be compare's
        return
    samples = out / "samples"
    for name in dict.fromkeys(earlier_runs(out)):
        folder = samples / name
        if name in drawn or name in ("", ".", "..") or Path(name).name != name or folder.is_symlink() or not folder.is_dir():
            continue
        foreign = not_drawn_by_sample(folder)
        if foreign:
            more = f" and {len(foreign) - 1} more" if len(foreign) > 1 else ""
            warn(f"{folder} is kept: an earlier comparison drew {name} there, but it also holds {foreign[0]}{more}, which "
                 f"compare did not write; {name} is not in this comparison")
            continue
        remove_directory(folder)
    for name in own_outputs():
        if name not in written and (out / name).is_file() and not (out / name).is_symlink():
            (out / name).unlink()
    if samples.is_dir() and not samples.is_symlink() and not any(samples.iterdir()):
        samples.rmdir()


def missing_evaluations(runs: list[RunSummary]) -> list[str]:
    """A line for each run that has no metrics (no eval.json, or one of an earlier adapter), naming what to run; one
    line where none of several runs was evaluated."""
    missing = [run for run in runs if not run.metrics and not run.unavailable]
    if len(runs) > 1 and len(missing) == len(runs) and not any(run.stale_evaluation for run in runs):
        return ["- No run was evaluated (no eval.json): run `sdtune evaluate --run RUN` on each to measure it."]
    return [f"- {run.name}: not evaluated (" + (f"{run.stale_evaluation}" if run.stale_evaluation else "no eval.json")
            + f"; run `sdtune evaluate --run {shell_word(run.path)}`)" for run in missing]


def remove_comparison(out: Path) -> None:
    """Remove the comparison written into `out` (what `remove_stale_outputs` removes, then its table): where nothing is
    left to compare (a sweep none of whose runs has finished with its plan's settings), an earlier one would be read as
    current."""
    if not (out / CSV_FILE).is_file():
        return
    remove_stale_outputs(out, set(), set())
    for name in (TABLE_FILE, CSV_FILE):
        (out / name).unlink(missing_ok=True)


def grid_prompts(config: CompareConfig, runs: list[RunSummary]) -> list:
    """The grid's prompts (`data.PromptLine`s): --prompt's as given, then --prompts' lines with their kohya-ss options
    (--n, --w, --h, --d, --s, --l, as `sdtune sample` reads them: every run draws a line alike), else the first run's
    evaluation prompts, else its training prompt (each concept's in turn, for a run of several)."""
    from .data import PromptLine, read_prompt_lines
    from .trained_prompts import run_prompts

    lines = [PromptLine(prompt) for prompt in config.prompt] + (read_prompt_lines(config.prompts) if config.prompts else [])
    if lines:
        return lines
    first = runs[0]
    return [PromptLine(prompt) for prompt in first.eval_prompts or run_prompts(first.path.parent if first.path.is_file() else first.path, first.placeholder or "<concept>", first.placeholder_tokens)]


def compare(runs: list[str], output: str, progress: bool = True, metrics_asked: bool = True, **options: Any) -> Comparison:
    """Summarise `runs` into `output`: comparison.md, comparison.csv, plots and (by default) grid.png. `metrics_asked`
    False (a sweep of `metrics = "none"`): the table says once that no metrics were asked for, not of every run that it
    was not evaluated."""
    from .fileio import OutputLock, ensure_writable_folder

    if isinstance(runs, (str, os.PathLike)):  # one run folder, not a list of one-letter names
        runs = [runs]
    config = CompareConfig.load(None, runs=[str(r) for r in runs], output=str(output), **options)
    summaries = [summarize_run(path) for path in config.runs]
    _unique_names(summaries)
    describe_differences(summaries)
    for run in summaries:
        if run.unfinished:
            warn(f"{run.name} is unfinished: its adapter is of {run.unfinished}; it is compared as it is now")
    out = Path(config.output)
    # Everything that can refuse is checked before the first file is written: an earlier comparison
    # in `out` stays whole.
    prompts = grid_prompts(config, summaries) if config.grid else []
    grid_configs = grid_sample_configs(summaries, prompts, config, out) if config.grid else []
    ensure_writable_folder(out)
    # one comparison at a time in `out`: another's would remove as stale the files this one is writing
    with OutputLock(out) as lock:
        ours = {TABLE_FILE, CSV_FILE, *own_outputs()}
        lock.sweep(lambda name: name in ours)  # what a killed comparison left half-written
        lock.sweep(lambda name: f"samples/{name}" in ours, out / "samples")
        return _write_comparison(config, summaries, prompts, grid_configs, out, progress, metrics_asked)


def _write_comparison(config: CompareConfig, summaries: list[RunSummary], prompts: list, grid_configs: list, out: Path,
                      progress: bool, metrics_asked: bool) -> Comparison:
    """Write the comparison of `summaries` into `out` (locked, and every input checked): its table, CSV, plots and grid."""
    from .fileio import write_text_atomic

    files: list[Path] = []
    metric_names = [name for name in METRICS if any(name in run.metrics for run in summaries)]
    plotted = [name for name in metric_names if name != "kid_std"]
    losses = any(run.losses for run in summaries)
    written = {CSV_FILE, TABLE_FILE, *(metric_plot_name(name) for name in plotted), *([LOSS_PLOT] if losses else [])}
    if config.grid:
        written |= {GRID_FILE, *([f"samples/{GRID_PROMPTS_FILE}"] if any(line.where for line in prompts) else [])}
    # before this comparison's first file: the earlier one's comparison.csv still names the runs whose samples it drew
    remove_stale_outputs(out, {run.name for run in summaries} if config.grid else set(), written)

    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(BASE_COLUMNS) + list(METRICS), lineterminator="\n")
    writer.writeheader()
    for run in summaries:
        writer.writerow(run.row())
    write_text_atomic(out / CSV_FILE, buffer.getvalue())
    files.append(out / CSV_FILE)

    plots = [plot_metric(summaries, name, out / metric_plot_name(name)) for name in plotted]
    if losses:
        plots.append(plot_losses(summaries, out / LOSS_PLOT))
    grid = sample_grid(summaries, prompts, grid_configs, out, progress) if config.grid else None

    table = markdown_table(summaries, metric_names)
    lines = ["# Comparison", "", table, ""]
    lines.append(
        "- Trainable: parameters the optimiser updates. Adapter: the adapter file's size. s/step: median training "
        "step time from metrics.jsonl." + (" Peak MB: peak memory, where the run logged it."
                                           if any(run.peak_memory_mb is not None for run in summaries) else "")
    )
    if any(run.differences for run in summaries):
        lines.append("- Settings: the training settings (config.toml's) the runs differ in, where a run's is not sdtune's "
                     "default (a learning rate always: its default is the method's).")
    lines += [f"- {METRICS[name][0]}: {METRICS[name][1]}." for name in metric_names]
    if not metrics_asked:
        lines.append('- Metrics: none were asked for (the sweep\'s metrics = "none")'
                     + ("; a run's are shown where `sdtune evaluate` measured it." if metric_names else "."))
    notes = unavailable_notes(summaries)
    unfinished = [f"- {run.name} is unfinished: its adapter is of {run.unfinished}." for run in summaries if run.unfinished]
    if unfinished:
        lines += ["", "## Unfinished runs", "", *unfinished]
    missing = missing_evaluations(summaries) if metrics_asked else []
    if notes or missing:
        lines += ["", "## Missing metrics", "", *missing, *notes]
    if plots:
        lines += ["", "## Plots", ""] + [f"![{plot.stem}]({plot.name})" for plot in plots]
    if grid is not None:
        lines += ["", f"## Samples (seed {config.seed}; rows = prompts, columns = runs)", "", f"![grid]({grid.name})"]
    write_text_atomic(out / TABLE_FILE, "\n".join(lines) + "\n")
    files += [out / TABLE_FILE, *plots] + ([grid] if grid else [])
    return Comparison(output=out, runs=summaries, files=files, table=table)
