"""Sweeps: one plan (TOML) of methods, concepts or datasets, learning rates and seeds, run as many runs.

A plan names the settings every run shares (`[train]`, `[sample]`, `[evaluate]`, all fields of the
config dataclasses) and the axes (`[axes]`) whose every combination is one run, named from its values
in axis order (`castle-atoms-seed0`). Each run trains into OUTPUT/runs/NAME, samples its prompts into
RUN/samples and is measured (eval.json); the report (OUTPUT/report/index.html and `sdtune compare`'s
table and plots) is written over whatever runs have finished.

Runs are found again, never redone: a run whose marker (RUN/sweep-run.json) holds the same settings is
skipped; a run whose training finished with the same settings is only sampled and measured again; one
interrupted with checkpoints of the same settings resumes from the latest; one whose plan only raised its steps is
extended from its latest checkpoint where training's rule (`training.continuation`) says it then ends as a run
trained to them in one go (a constant rate), and trained afresh otherwise. `--shard i/N` (i from 0)
takes the runs whose index in the expansion order is i modulo N, so N processes (GPUs, Slurm array
tasks) share a plan with no coordinator: every run writes only its own folder, and the report is
written atomically by whichever shard finishes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import itertools
import json
import math
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from .adapter import ADAPTER_FILE
from .config import (EvaluateConfig, SampleConfig, SweepConfig, TrainConfig, parse_shard, python_spelled, read_toml,
                     spelled_for_python)
from .errors import SdtuneError, error_line, shell_word, warn
from .fileio import LockHeld, OutputLock, check_no_file_in_the_way, counted, ensure_writable_folder

RUN_MARKER = "sweep-run.json"
RUN_LOCK = ".sdtune-sweep.lock"  # held by the sweep process working on a run, beside training's own lock
MARKER_FORMAT = "sdtune-sweep-run/1"
RUNS_FOLDER = "runs"
REPORT_FOLDER = "report"
BASE_FOLDER = "base"
SAMPLES_FOLDER = "samples"
PLAN_KEYS = ("name", "description", "output", "metrics", "train", "axes", "sample", "evaluate")
MAX_RUNS = 10_000  # every run trains a model: more is a plan typed wrong, and expanding it would take minutes
REPORT_TRIES = 3  # a report is written again while runs change state under it, at most this many times
REPORT_LOCK_WAIT = 120  # seconds a shard waits for another's report to be written before leaving the report to it
LR_SCALE_AXIS = "lr_scale"  # multiples of each run's method's own default learning rate
# what a plan's text settings may refer to as {name}; other braces ({token}, {class}) are left as they are
PLACEHOLDERS = ("concept", "dataset", "method", "seed", "sweep")
# what the plan sets per run, not in [train]
PER_RUN_TRAIN = ("output", "resume", "overwrite")
PER_RUN_SAMPLE = ("adapter", "output", "overwrite")
PER_RUN_EVALUATE = ("run", "images", "output")


# ---------------------------------------------------------------------------------------------
# Plans


@dataclass
class RunSpec:
    """One run of a plan: its stable name, its axis values and the configs that drive it."""

    index: int
    name: str
    axes: dict[str, Any]
    folder: Path
    train: TrainConfig
    sample: SampleConfig | None
    evaluate: dict[str, Any]
    fingerprint: str = ""
    # its training's seconds over every invocation of this training (resumes, extensions), once this one trained
    train_seconds: float | None = None

    def marker(self) -> dict[str, Any] | None:
        return read_marker(self.folder)

    def state(self) -> str:
        """finished, failed (with these settings), or pending."""
        marker = read_marker(self.folder)
        if marker is None or marker.get("fingerprint") != self.fingerprint:
            return "pending"
        return marker.get("state", "pending")


@dataclass
class Plan:
    path: Path
    name: str
    description: str
    output: Path
    metrics: str
    train: dict[str, Any]
    axes: list[tuple[str, list[Any]]]
    sample: dict[str, Any] | None
    evaluate: dict[str, Any]
    runs: list[RunSpec] = field(default_factory=list)

    @property
    def report_folder(self) -> Path:
        return self.output / REPORT_FOLDER


def read_plan(path: str | Path, output: str | None = None) -> Plan:
    """The plan at `path`, checked and expanded to its runs; a bad plan is one SdtuneError line."""
    from . import methods
    from .models import check_model_here

    path = Path(path)
    if not path.is_file():
        raise SdtuneError(f"plan {path}: {'a folder; give a TOML file' if path.is_dir() else 'no such file'}")
    values = read_toml(path)

    def bad(problem: str) -> SdtuneError:
        return SdtuneError(f"plan {path}: {problem}")

    unknown = sorted(set(values) - set(PLAN_KEYS))
    if unknown:
        raise bad(f"unknown key(s) {', '.join(unknown)}; a plan has {', '.join(PLAN_KEYS)}")
    for section in ("train", "axes", "sample", "evaluate"):
        if section in values and not isinstance(values[section], dict):
            raise bad(f"[{section}] must be a table")
    for key in ("name", "description", "output", "metrics"):
        if key in values and not isinstance(values[key], str):
            raise bad(f"{key} must be text")
    if not values:
        raise bad("empty; a plan has [train] settings and [axes] (see sweeps/*.toml)")
    if "name" in values and not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", values["name"]):
        raise bad(f"name must be a plain name (letters, digits, ., - or _), got {values['name']!r}")
    metrics = values.get("metrics", "standard")
    if metrics not in METRIC_SETS:
        raise bad(f"metrics {metrics!r} is not a metric set; choose: {', '.join(METRIC_SETS)}")
    train = dict(values.get("train", {}))
    _check_keys(bad, "train", train, TrainConfig, PER_RUN_TRAIN)
    sample = values.get("sample")
    if sample is not None:
        _check_keys(bad, "sample", sample, SampleConfig, PER_RUN_SAMPLE)
    evaluate = dict(values.get("evaluate", {}))
    _check_keys(bad, "evaluate", evaluate, EvaluateConfig, PER_RUN_EVALUATE)
    axes = list(values.get("axes", {}).items())
    train_fields = {f.name for f in dataclasses.fields(TrainConfig)} - set(PER_RUN_TRAIN)
    for axis, axis_values in axes:
        if axis not in train_fields and axis != LR_SCALE_AXIS:
            raise bad(f"unknown axis {axis!r}: an axis is a [train] setting (method, concept, dataset, lr, seed, "
                      f"steps, ...) or {LR_SCALE_AXIS}")
        if not isinstance(axis_values, list):
            raise bad(f"axis {axis} must be a list of values")
        if not axis_values:
            raise bad(f"axis {axis} has no values")
        if axis in train:
            raise bad(f"{axis} is both an axis and a [train] setting")
    count = math.prod(len(axis_values) for _, axis_values in axes)
    if count > MAX_RUNS:
        sizes = " x ".join(str(len(axis_values)) for _, axis_values in axes)
        raise bad(f"the axes make {count:,} runs ({sizes}); a plan runs at most {MAX_RUNS:,}: split it, or use fewer values")
    if any(axis == LR_SCALE_AXIS for axis, _ in axes) and ("lr" in train or any(axis == "lr" for axis, _ in axes)):
        raise bad(f"give lr or {LR_SCALE_AXIS}, not both")

    name = values.get("name") or path.stem
    root = Path(output or values.get("output") or Path("runs") / "sweeps" / name)
    plan = Plan(path, name, values.get("description", ""), root, metrics, train, axes, sample, evaluate)

    names: dict[str, tuple[int, tuple[int, ...]]] = {}  # each run's name: its index and its values' places on the axes
    models_checked: set[str] = set()
    for index, places in enumerate(itertools.product(*(range(len(axis_values)) for _, axis_values in axes))):
        combination = [axis_values[place] for (_, axis_values), place in zip(axes, places)]
        settings = dict(train)
        labels: list[str] = []
        axis_values: dict[str, Any] = {}
        for (axis, _), value in zip(axes, combination):
            label, changes = _axis_value(bad, axis, value, train_fields)
            labels.append(label)
            axis_values[axis] = label
            settings.update(changes)
        run_name = "-".join(labels) or "run"
        if run_name in names:
            first, earlier = names[run_name]
            raise bad(f"runs {first} and {index} are both named {run_name!r}; {_same_name_fix(axes, earlier, places)}")
        names[run_name] = index, places
        folder = root / RUNS_FOLDER / run_name
        try:
            plan.runs.append(_run_spec(plan, index, run_name, axis_values, folder, settings, methods))
            # a model no run could load, found now rather than as that run starts, after the runs before it trained
            spec = plan.runs[-1]
            if spec.train.model not in models_checked:
                check_model_here(spec.train.model)
                models_checked.add(spec.train.model)
            if spec.sample is not None and spec.sample.model and spec.sample.model not in models_checked:
                with _in_section("sample"):
                    check_model_here(spec.sample.model)
                models_checked.add(spec.sample.model)
        except SdtuneError as error:  # a flag's name (--lr) in the key the plan spells it by (lr)
            raise bad(f"run {run_name}: {python_spelled(str(error), 'train', toml=True)}") from None
    return plan


def _same_name_fix(axes: list[tuple[str, list[Any]]], first: tuple[int, ...], second: tuple[int, ...]) -> str:
    """What to change where two combinations of axis values (their places on the axes) name one run."""
    differing = [(axis, values[a], values[b]) for (axis, values), a, b in zip(axes, first, second) if a != b]
    if any(isinstance(value, dict) for _, *values in differing for value in values):
        return "give the tables a distinct name"
    if len(differing) == 1:
        axis, a, b = differing[0]
        if a == b:
            return f"axis {axis} lists {a!r} twice"
        return f"axis {axis}'s values {a!r} and {b!r} are labelled alike: drop one, or give it as a table with its own name"
    return "their values on the axes join into one name: give one as a table with its own name"


def _check_keys(bad, section: str, values: dict, config_class: type, per_run: tuple[str, ...]) -> None:
    known = {f.name for f in dataclasses.fields(config_class)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise bad(f"unknown [{section}] setting(s) {', '.join(unknown)}")
    fixed = sorted(set(values) & set(per_run))
    if fixed:
        raise bad(f"[{section}] {', '.join(fixed)} is set per run by the sweep")


def _axis_value(bad, axis: str, value: Any, train_fields: set[str]) -> tuple[str, dict[str, Any]]:
    """An axis value's label in run names and the [train] settings it makes. A table sets several
    settings at once (its `name` is its label): `{name = "m1", method = "atoms", options = {m1 = 4}}`."""
    if isinstance(value, dict):
        changes = dict(value)
        label = changes.pop("name", None)
        unknown = sorted(set(changes) - train_fields - {LR_SCALE_AXIS})
        if unknown:
            raise bad(f"axis {axis}: unknown setting(s) {', '.join(unknown)} in {value!r}")
        if label is None and any(isinstance(v, list) for v in changes.values()):
            # each part made safe alone, so that a list's "+" (castle+canal) stays; tables without one keep their names
            return "-".join(_safe_name(_label(k, v)) if not isinstance(v, list) else _label(k, v) for k, v in changes.items()), changes
        if label is None:
            label = "-".join(_label(k, v) for k, v in changes.items())
        if not isinstance(label, str) or not label:
            raise bad(f"axis {axis}: a table's name must be text, got {label!r}")
        return _safe_name(label), changes
    if isinstance(value, (list, dict)):
        raise bad(f"axis {axis}: values are numbers, text, true/false or tables, got {value!r}")
    return _safe_name(_label(axis, value)), {axis: value}


def _label(axis: str, value: Any) -> str:
    if axis == LR_SCALE_AXIS and isinstance(value, (int, float)) and not isinstance(value, bool):
        return f"lr{value:g}x"
    if isinstance(value, str):
        return value
    if isinstance(value, bool):
        return axis.replace("_", "") + ("" if value else "-off")
    if isinstance(value, float):
        return f"{axis.replace('_', '')}{value:g}"
    if isinstance(value, list):  # a table's several concepts: castle+canal, as the {concept} placeholder writes them
        return "+".join(_safe_name(str(item)) for item in value)
    if isinstance(value, dict):  # options tables inside a table
        return "-".join(f"{k}{v}" for k, v in value.items())
    return f"{axis.replace('_', '')}{value}"


def _safe_name(text: str) -> str:
    name = re.sub(r"[^A-Za-z0-9._=-]+", "_", text).strip("._")
    return name or "run"


def joined_names(value: Any) -> Any:
    """A run's several concepts as one word of a file or run name (castle+canal), not Python's list text."""
    return "+".join(str(item) for item in value) if isinstance(value, list) else value


def substitute(value: Any, names: dict[str, Any]) -> Any:
    """`{concept}`, `{dataset}`, ... in text settings replaced by the run's values; other braces kept."""
    if isinstance(value, str):
        return re.sub(r"\{(\w+)\}", lambda m: str(names[m.group(1)]) if m.group(1) in names else m.group(0), value)
    if isinstance(value, list):
        return [substitute(item, names) for item in value]
    if isinstance(value, dict):
        return {key: substitute(item, names) for key, item in value.items()}
    return value


def _run_spec(plan: Plan, index: int, name: str, axes: dict, folder: Path, settings: dict, methods) -> RunSpec:
    scale = settings.pop(LR_SCALE_AXIS, None)
    method = settings.get("method", TrainConfig.method)
    if not isinstance(method, str) or method not in methods.available():
        raise SdtuneError(f"unknown method {method!r}; available: {', '.join(methods.available())}")
    methods.create(method, **dict(settings.get("options", {})))  # unknown or bad options: one line now
    default_lr = methods.method_class(method).default_lr
    if scale is not None:
        if "lr" in settings:
            raise SdtuneError(f"give lr or {LR_SCALE_AXIS}, not both")
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not (scale > 0 and math.isfinite(scale)):
            raise SdtuneError(f"{LR_SCALE_AXIS} must be a positive number, got {scale!r}")
        settings["lr"] = default_lr * scale
    names = {key: settings.get(key, getattr(TrainConfig, key, None)) for key in PLACEHOLDERS if key != "sweep"}
    names.update(concept=joined_names(settings.get("concept", TrainConfig.concept)), method=method, sweep=str(plan.output))
    names["dataset"] = names["dataset"] or ""
    settings = substitute(settings, names)
    train = TrainConfig.load(None, **settings, output=str(folder))
    if plan.sample is None and plan.metrics != "none" and plan.metrics != "standard":
        raise SdtuneError(f"metrics {plan.metrics} measures the sampled images: give a [sample] section")
    sample = None
    if plan.sample is not None:
        sampled = substitute(plan.sample, names)
        if train.dataset and not any(sampled.get(key) for key in ("prompt", "prompts", "dataset")):
            # a run trained on a dataset samples its classes, one row each, as `sdtune sample --dataset` draws them
            sampled.update(dataset=train.dataset, data_root=train.data_root, classes=train.classes or None,
                           class_template=train.class_template)
        elif not any(sampled.get(key) for key in ("prompt", "prompts", "dataset")):
            # a concept run samples its training prompt, each concept's in turn, as `sdtune evaluate` measures it
            sampled.update(prompt=[train.template.format(token=f"<{name}>") for name in train.concepts])
        adapters: list[str] = [str(folder)]
        if train.base_adapters:
            adapters, sampled = _stacked_on_base_adapters(train, adapters, sampled)
        with _in_section("sample"):
            sample = SampleConfig.load(None, **sampled, adapter=adapters, output=str(folder / SAMPLES_FOLDER), overwrite=True)
    evaluate = substitute(plan.evaluate, names)
    with _in_section("evaluate"):
        EvaluateConfig.load(None, **evaluate, run=str(folder))
    resolved = train.resolved(default_lr)
    spec = RunSpec(index, name, axes, folder, train, sample, evaluate)
    spec.fingerprint = fingerprint(train_settings(resolved), sample, evaluate, plan.metrics, starting_digests(train))
    return spec


@contextlib.contextmanager
def _in_section(section: str):
    """A refused [sample] or [evaluate] setting says its section: `steps` is both a training and a sampling setting."""
    try:
        yield
    except SdtuneError as error:
        raise SdtuneError(f"[{section}] {python_spelled(str(error), section, toml=True)}") from None


def _stacked_on_base_adapters(train: TrainConfig, adapters: list[str], sampled: dict[str, Any]) -> tuple[list[str], dict[str, Any]]:
    """A run trained on base adapters is drawn on them, as its validation grids are: each stacked beneath it at its
    strength, and prompts read as training read them (the files may record other readings)."""
    scale = sampled.get("adapter_scale", SampleConfig.adapter_scale)
    if isinstance(scale, list):
        raise SdtuneError("[sample] adapter_scale sweeps one adapter's strength, and a run trained on base_adapters is "
                          "sampled with them stacked beneath it: give one strength")
    bases = train.base_adapter_entries
    sampled = {**sampled, "adapter_scale": [base.strength for base in bases] + [scale]}
    for name in ("clip_skip", "max_token_length"):
        if sampled.get(name) is None:
            sampled[name] = getattr(train, name)
    return [base.path for base in bases] + adapters, sampled


def as_trained(config: TrainConfig) -> TrainConfig:
    """The run's settings as training resolves them and config.toml records them: the method's default rate where
    none is set, and with init_weights the file's options where the plan sets none (a file that cannot be read yet:
    the plan's own, for training to refuse)."""
    from .methods import method_class

    if config.init_weights:
        from .starting_weights import init_weights_options

        try:
            config = dataclasses.replace(config, options=init_weights_options(config).options)
        except (SdtuneError, OSError):
            pass
    return config.resolved(method_class(config.method).default_lr)


def train_settings(config: TrainConfig) -> dict[str, Any]:
    """A resolved config's settings as config.toml holds them, less what may change between runs of one."""
    from .training import RUN_CONTROL

    return {k: v for k, v in _toml_round_trip(config.to_toml()).items() if k not in RUN_CONTROL}


def _toml_round_trip(text: str) -> dict[str, Any]:
    import tomllib

    return tomllib.loads(text)


def fingerprint(train: dict, sample: SampleConfig | None, evaluate: dict, metrics: str, starting: list | None = None) -> str:
    sampled = None
    if sample is not None:
        sampled = {k: v for k, v in sample.to_dict().items() if k not in PER_RUN_SAMPLE}
        if sample.prompts and Path(sample.prompts).is_file():  # an edited prompt file is a new setting
            sampled["prompts_text"] = Path(sample.prompts).read_text(encoding="utf-8", errors="replace")
    settings = {"train": train, "sample": sampled, "evaluate": evaluate, "metrics": metrics}
    if starting:  # a starting file written again is a new setting too (a plan without them keeps its fingerprints)
        settings["starting"] = starting
    if metrics == "standard":  # metrics measured otherwise than a run's eval.json holds: it is sampled and measured again
        from .evaluation import METRICS_VERSION

        settings["metrics_version"] = METRICS_VERSION
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:16]


def starting_digests(train: TrainConfig) -> list[tuple[str, str | None]]:
    """Each of the run's init_weights and base_adapters files, in that order, with its digest (None where it is not
    there yet)."""
    from .adapter import adapter_digest, adapter_path

    digests: list[tuple[str, str | None]] = []
    for path in ([train.init_weights] if train.init_weights else []) + [base.path for base in train.base_adapter_entries]:
        try:
            digests.append((path, adapter_digest(adapter_path(path))))
        except (SdtuneError, OSError):
            digests.append((path, None))
    return digests


def starting_files_changed(run: RunSpec) -> str:
    """The run's init_weights and base_adapters files that are not the ones its adapter records it trained on (written
    again since), in a few words; "" where none is, or there is no adapter to tell."""
    from .adapter import read_adapter_info, recorded_base_adapters, recorded_init_weights
    from .sampling import shown_name

    if not (run.train.init_weights or run.train.base_adapters) or not (run.folder / ADAPTER_FILE).is_file():
        return ""
    try:
        info = read_adapter_info(run.folder)[0]
    except SdtuneError:
        return ""
    start = recorded_init_weights(info) or {}
    recorded = ([start.get("digest")] if run.train.init_weights else []) + [r.get("digest") for r in recorded_base_adapters(info)]
    changed = {path for (path, digest), trained_on in zip(starting_digests(run.train), recorded) if digest != trained_on}
    # named short (a run's adapter file by its run), as the dry run's line cuts a long note
    return f"{', '.join(sorted(map(shown_name, changed)))} written again since it trained" if changed else ""


def shard_runs(runs: list[RunSpec], shard: tuple[int, int] | None) -> list[RunSpec]:
    if shard is None:
        return list(runs)
    i, n = shard
    return [run for run in runs if run.index % n == i]


# ---------------------------------------------------------------------------------------------
# Markers


def read_marker(folder: Path) -> dict[str, Any] | None:
    try:
        marker = json.loads((folder / RUN_MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return marker if isinstance(marker, dict) and marker.get("format") == MARKER_FORMAT else None


def write_marker(run: RunSpec, state: str, **extra: Any) -> None:
    from .fileio import write_text_atomic

    marker = {"format": MARKER_FORMAT, "name": run.name, "index": run.index, "state": state,
              "fingerprint": run.fingerprint, "axes": run.axes, **extra}
    write_text_atomic(run.folder / RUN_MARKER, json.dumps(marker, indent=2) + "\n")


# ---------------------------------------------------------------------------------------------
# Metric sets: what measures a run's images (chosen by the plan's `metrics`)


class StandardMetrics:
    """`sdtune evaluate`: CLIP-T, CLIP-I, DINO, FID, KID, diversity (each where its model is available)."""

    def prepare(self, plan: Plan, log: Callable[[str], None]) -> None:
        pass

    def measure(self, plan: Plan, run: RunSpec, samples, base) -> dict[str, Any]:
        from .evaluation import evaluate

        settings = dict(run.evaluate)
        if samples is not None:
            settings.update(images=str(samples.output / "images"), prompt=list(samples.prompts))
            settings.pop("prompts", None)
        result = evaluate(EvaluateConfig.load(None, **settings, run=str(run.folder)), progress=False)
        warn_unavailable(result.unavailable)
        return result.report


def warn_unavailable(unavailable: dict[str, str]) -> None:
    """A warning for each reason some metrics could not be measured (a model not in the cache, offline): the
    sweep shows each once, rather than leaving every run's metrics silently blank until the report."""
    from .evaluation import METRICS

    by_reason: dict[str, list[str]] = {}
    for name, why in unavailable.items():
        by_reason.setdefault(why, []).append(METRICS[name][0] if name in METRICS else name)
    for why, titles in by_reason.items():
        warn(f"{', '.join(titles)} unavailable: {why}")


class NoMetrics:
    def prepare(self, plan: Plan, log: Callable[[str], None]) -> None:
        pass

    def measure(self, plan: Plan, run: RunSpec, samples, base) -> dict[str, Any]:
        return {}


def _digit_metrics():
    from .digits import DigitMetrics

    return DigitMetrics()


METRIC_SETS: dict[str, Callable[[], Any]] = {"standard": StandardMetrics, "digits": _digit_metrics, "none": NoMetrics}


def base_samples(plan: Plan, run: RunSpec):
    """The base model's images for the run's sample settings (no adapter), drawn once per sweep into
    OUTPUT/base/<key>; shards that race both draw and the first to publish wins (same images)."""
    from .fileio import publish_once
    from .sampling import sample

    settings = {k: v for k, v in run.sample.to_dict().items() if k not in PER_RUN_SAMPLE and k != "adapter_scale"}
    settings["model"] = settings.get("model") or run.train.model
    key = hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:12]
    final = plan.output / BASE_FOLDER / key
    if not (final / "prompts.json").is_file():

        def fill(staging: Path) -> None:
            result = sample(SampleConfig.load(None, **settings, output=str(staging)), progress=False)
            (staging / "prompts.json").write_text(json.dumps(result.prompts) + "\n", encoding="utf-8")

        publish_once(final, fill)
    prompts = json.loads((final / "prompts.json").read_text(encoding="utf-8"))
    return prompts, final / "images"


# ---------------------------------------------------------------------------------------------
# Running


@dataclass
class SweepResult:
    plan: Plan
    ran: list[str]
    skipped: list[str]
    failed: dict[str, str]
    report: Path | None

    @property
    def exit_code(self) -> int:
        return 1 if self.failed else 0


# what a pending run's folder already holds, as the dry run says it; the run goes on from there
PENDING_STATES = {
    "trained": "its training finished with these settings; it is only sampled and measured",
    "partial": "its training stopped with checkpoints of these settings; it resumes from the latest",
    "extends": "trained before with fewer steps, under a rate that does not depend on the step count; it resumes from its "
               "latest checkpoint to the plan's steps, ending as a run trained to them in one go, and is sampled and measured again",
    "changed": "trained before with other settings; it is trained afresh, replacing that run",
}
WHY_WIDTH = 120  # the dry run's note on what changed, cut to this many characters


def pending_state(run: RunSpec) -> tuple[str, str]:
    """pending (nothing of it yet, or only a start without a checkpoint), trained, partial, extends or changed; and a
    few words on where an extension starts or why a changed run is trained afresh."""
    from .training import RUN_CONTROL

    progress, note = training_state(run)
    if progress == "trained":
        return "trained", ""
    if progress == "resumable":
        return "partial", ""
    if progress == "extendable":
        return "extends", note
    try:
        written = {k: v for k, v in read_toml(run.folder / "config.toml").items() if k not in RUN_CONTROL}
    except SdtuneError:  # no config.toml (nothing started), or not one to read: trained afresh either way
        return "pending", ""
    same = written == train_settings(as_trained(run.train)) and not note  # a note: why settings alike still retrain
    return ("pending", "") if same or not (run.folder / ADAPTER_FILE).is_file() else ("changed", note)


def dry_run_lines(plan: Plan, runs: list[RunSpec]) -> list[str]:
    """One line a run: index, name, state, and what it trains; then what the states other than pending,
    finished and failed mean."""
    from .comparison import UNCOMPARED_SETTINGS, setting_differences, with_defaults
    from .methods import method_class

    width = max((len(run.name) for run in runs), default=0)
    lines = []
    said: list[str] = []
    # what else tells the plan's runs apart (a clip_skip a method axis's table sets ...): its line names the rest
    named = {"method", "options", "concept", "dataset", "lr", "seed", "steps", "init_weights", "base_adapters"}
    uncompared = (UNCOMPARED_SETTINGS - {"model", "resolution"}) | named
    differences = setting_differences([with_defaults(run.train.to_dict()) for run in plan.runs], frozenset(uncompared))
    others = {run.index: ", ".join(shown.values()) for run, shown in zip(plan.runs, differences)}
    for run in runs:
        train = run.train
        options = ", ".join(f"{k}={v}" for k, v in train.options.items())
        # the rate it will train at: the method's (or the optimiser's) default where the plan sets none
        lr = f"lr {train.lr:g}" if train.lr else f"lr {train.resolved(method_class(train.method).default_lr).lr:g} (default)"
        what = train.dataset or (", ".join(train.concept) if isinstance(train.concept, list) else train.concept)
        state, note = run.state(), ""
        if state == "pending":
            state, note = pending_state(run)
            if state in PENDING_STATES and state not in said:
                said.append(state)
        if len(note) > WHY_WIDTH:
            note = note[:WHY_WIDTH - 3] + "..."
        # where its weights start, as training's dry run says: the file its tensors start from, the adapters beneath
        bases = ", ".join(f"{base.path} at {base.strength:g}" for base in train.base_adapter_entries)
        start = (f", starts from {train.init_weights}" if train.init_weights else "") + (f", on base adapters {bases}" if bases else "")
        lines.append(f"{run.index:>4}  {run.name.ljust(width)}  {state:<8}  {train.method}"
                     f"{' (' + options + ')' if options else ''}, {what}, {lr}, seed {train.seed}, {counted(train.steps, 'step')}"
                     + (f", {others[run.index]}" if others.get(run.index) else "") + start
                     + (f"; {note}" if note else ""))
    return lines + [f"{state}: {PENDING_STATES[state]}" for state in said]


@spelled_for_python("sweep")
def run_sweep(config: SweepConfig, log: Callable[[str], None] = print) -> SweepResult:
    """Run `config.plan`'s runs (the shard's), then write the report over every finished run."""
    config.validate()
    plan = read_plan(config.plan, config.output)
    shard = parse_shard(config.shard)
    runs = shard_runs(plan.runs, shard)
    result = SweepResult(plan, [], [], {}, None)
    if config.dry_run:
        where = f" (shard {config.shard}: {len(runs)})" if shard else ""
        log(f"plan {plan.name}: {len(plan.runs)} run{'' if len(plan.runs) == 1 else 's'}{where}, into {plan.output}")
        for line in dry_run_lines(plan, runs):
            log(line)
        return result
    check_no_file_in_the_way(plan.output, "the sweep's folder")
    main = True
    if not config.report_only:
        main = train_sample_and_measure(plan, runs, result, log)
    if main:
        result.report = write_report(plan, log)
    return result


def train_sample_and_measure(plan: Plan, runs: list[RunSpec], result: SweepResult, log: Callable[[str], None]) -> bool:
    """Train, sample and measure `runs` (skipping finished ones, and those another sweep process holds), recording each
    in `result`; whether this is the main process (the one that reports). transformers and diffusers are quiet meanwhile."""
    from .distributed import lock_on_main_process, process_state
    from .models import quiet_libraries

    with quiet_libraries():
        # under `accelerate launch` every process goes through the runs together (training and sampling
        # are shared out); the main one alone measures, marks and reports
        state = process_state()
        main = state.is_main_process
        log = log if main else (lambda message: None)
        metric_set = METRIC_SETS[plan.metrics]()
        # the runs of a sweep share their inputs, and so their warnings: each is shown once, from the checks below on
        with each_warning_once():
            if main:
                metric_set.prepare(plan, log)
                from .data import read_prompt_lines

                # a missing or empty prompt file, or a line's bad option, stops the sweep now, not after each run's training
                for prompts in sorted({run.sample.prompts for run in runs if run.sample is not None and run.sample.prompts}):
                    read_prompt_lines(prompts)
            for number, run in enumerate(runs, 1):
                prefix = f"[{number}/{len(runs)}] {run.name}"
                if run.state() == "finished" and (run.folder / ADAPTER_FILE).is_file():
                    log(f"{prefix}: finished earlier, skipped")
                    result.skipped.append(run.name)
                    continue
                lock = OutputLock(run.folder, RUN_LOCK, what=f"run {run.name}")
                try:  # taken inside the try: an interrupt just after it is taken still releases it
                    try:
                        run.folder.mkdir(parents=True, exist_ok=True)
                        lock_on_main_process(state, lock)
                    except SdtuneError:  # another sweep process is on this run: its run, not a failure here
                        log(f"{prefix}: in use by another sweep process, skipped")
                        result.skipped.append(run.name)
                        continue
                    try:
                        if run.state() == "finished":  # finished by another process while this one waited
                            log(f"{prefix}: finished by another process, skipped")
                            result.skipped.append(run.name)
                            continue
                        run_one(plan, run, metric_set, lambda message: log(f"{prefix}: {message}"), main=main)
                    except KeyboardInterrupt:
                        raise
                    except Exception as error:  # one run's failure is recorded; the others go on
                        message = error_line(error)
                        log(f"{prefix}: failed: {message}")
                        result.failed[run.name] = message
                        if main:
                            try:
                                write_marker(run, "failed", error=message, **training_time(run))
                            except OSError:
                                pass
                    else:
                        result.ran.append(run.name)
                finally:
                    lock.release()
    return main


@contextlib.contextmanager
def each_warning_once():
    """Show each distinct warning once: a sweep's runs read the same images and settings, which warn alike in
    every run (a skipped file, a small image); a warning that differs, as another folder's, is still shown."""
    import warnings

    shown: set = set()
    show = warnings.showwarning

    def show_new(message, category, filename, lineno, file=None, line=None):
        if (category, str(message)) not in shown:
            shown.add((category, str(message)))
            show(message, category, filename, lineno, file, line)

    warnings.showwarning = show_new
    try:
        yield
    finally:
        warnings.showwarning = show


def run_one(plan: Plan, run: RunSpec, metric_set, log: Callable[[str], None], main: bool = True) -> None:
    """Train (or find trained, or resume), sample, measure; then mark the run finished. Interrupted (Ctrl-C, SIGTERM)
    once it began training, the run is marked pending with the training seconds spent so far, this invocation's
    included, which the sweep that resumes it counts on from."""
    started = time.perf_counter()
    run.folder.mkdir(parents=True, exist_ok=True)
    state, note = training_state(run)
    run.train_seconds = earlier_train_seconds(run, state)
    try:
        finished = _run_one(plan, run, metric_set, log, main, state, note)
    except KeyboardInterrupt:
        if main and state != "trained":  # a run found trained spent no training time here
            with contextlib.suppress(OSError):
                write_marker(run, "pending", **training_time(run))
        raise
    if finished is not None:
        write_marker(run, "finished", **finished, seconds=round(time.perf_counter() - started, 1), **training_time(run))
        log(f"finished in {time.perf_counter() - started:.1f}s")


def _run_one(plan: Plan, run: RunSpec, metric_set, log: Callable[[str], None], main: bool, state: str,
             note: str) -> dict[str, Any] | None:
    """`run_one`'s work, with the run's training state and note (`training_state`) and the training seconds of its
    earlier invocations in `run.train_seconds`, which this one's training adds to: what the finished marker records
    of it (prompts, images, metrics), None on a process other than the main one."""
    from .training import train

    earlier = run.train_seconds
    measured = main and plan.metrics != "none"  # metrics = "none": nothing measured, so nothing said of it
    if state == "trained":
        after = [what for what, done in (("sampling", run.sample is not None), ("measuring", measured)) if done]
        log("trained earlier with these settings" + (f"; {' and '.join(after)}" if after else ""))
    else:
        resume = state in ("resumable", "extendable")
        if state == "extendable":
            log(f"extending its training to {run.train.steps} steps: {note}")
        else:
            log("resuming from its latest checkpoint" if resume else "training")
        config = dataclasses.replace(run.train, resume="latest" if resume else None, overwrite=not resume)
        training_started = time.perf_counter()
        try:
            train(config, progress=False)
        finally:  # a failed or interrupted invocation's time counts too: a resume goes on from its checkpoints
            run.train_seconds = round((earlier or 0.0) + time.perf_counter() - training_started, 1)
    samples = None
    if run.sample is not None:
        from .sampling import sample

        log("sampling")
        samples = sample(run.sample, progress=False)
    if not main:
        return None
    if measured:
        log("measuring")
    report = metric_set.measure(plan, run, samples, lambda: base_samples(plan, run)) or {}
    images = []
    if samples is not None:
        per_prompt = len(samples.images) // max(len(samples.prompts), 1)
        images = [[str(Path(p).relative_to(run.folder)) for p in samples.images[i * per_prompt:(i + 1) * per_prompt]]
                  for i in range(len(samples.prompts))]
    return {"prompts": list(samples.prompts) if samples else [], "images": images, "metrics": report.get("metrics", {})}


def earlier_train_seconds(run: RunSpec, state: str) -> float | None:
    """The training seconds the run folder's marker records of earlier invocations of the training this one goes on
    with (resumes it, extends it, or finds it trained); 0 for a fresh training; None where a training to go on with
    has no time recorded (trained before sweeps recorded it, or outside a sweep)."""
    if state == "fresh":
        return 0.0
    earlier = (read_marker(run.folder) or {}).get("train_seconds")
    return float(earlier) if isinstance(earlier, (int, float)) and not isinstance(earlier, bool) and earlier >= 0 else None


def training_time(run: RunSpec) -> dict[str, Any]:
    """The marker's `train_seconds`: the run's training seconds over every invocation (seconds: this invocation's
    training, sampling and measuring), where known."""
    return {} if run.train_seconds is None else {"train_seconds": run.train_seconds}


def training_state(run: RunSpec) -> tuple[str, str]:
    """trained (finished with these settings), resumable (checkpoints of these settings), extendable (checkpoints of
    these settings but fewer steps, see `extension`) or fresh; with extendable where it resumes, with fresh why a run
    trained before is not extended or kept ("" where there is none, or it differs in more than its steps)."""
    from .checkpoints import list_checkpoints
    from .tracking import METRICS_FILE, read_metrics_log

    config_path = run.folder / "config.toml"
    if not config_path.is_file():
        return "fresh", ""
    from .training import RUN_CONTROL

    try:
        written = {k: v for k, v in read_toml(config_path).items() if k not in RUN_CONTROL}
    except SdtuneError:
        return "fresh", ""
    changed = starting_files_changed(run)
    if changed:  # trained on other weights than the plan's files hold now: trained afresh, never resumed or extended
        return "fresh", changed
    if written != train_settings(as_trained(run.train)):
        extends, note = extension(run, written)
        return ("extendable" if extends else "fresh"), note
    records = read_metrics_log(run.folder / METRICS_FILE) if (run.folder / METRICS_FILE).is_file() else []
    last = max((r["step"] for r in records if isinstance(r.get("step"), int)), default=0)
    # the adapter's own step, not the log's: a run stopped after logging its last step but before writing its last
    # adapter holds an earlier checkpoint's adapter
    if last >= run.train.steps and adapter_step(run.folder) == run.train.steps:
        return "trained", ""
    return ("resumable" if list_checkpoints(run.folder) else "fresh"), ""


def extension(run: RunSpec, written: dict[str, Any]) -> tuple[bool, str]:
    """Whether resuming the run folder's run from its latest checkpoint with the plan's settings, more steps, ends as a
    run trained to them in one go: training's rule (`continuation`, as `sdtune train --resume` applies it) on the
    checkpoint's settings, else on config.toml's (`written`). With where it resumes, or why not in a few words."""
    from .checkpoints import DamagedCheckpoint, list_checkpoints, read_state
    from .training import continuation

    wanted = as_trained(run.train)
    saved, step = written, None
    for number, folder in reversed(list_checkpoints(run.folder)):  # the newest readable, as --resume latest takes
        try:
            state = read_state(folder)
        except DamagedCheckpoint:
            continue
        if isinstance(state.get("config"), dict):
            saved, step = state["config"], number
            break
    kind, changes = continuation(saved, wanted)
    if kind == "differs":
        return False, changes
    if kind == "resumes":  # the same settings as the checkpoint's, not as config.toml's: trained afresh to be sure
        return False, ""
    if step is None:
        return False, f"no checkpoint to extend its {counted(saved.get('steps', TrainConfig.steps), 'step')} from"
    return True, f"resumes at step {step}"


def adapter_step(folder: Path) -> int | None:
    """The step the run folder's adapter was saved at (its metadata), or None without a readable adapter."""
    from .adapter import read_adapter_info

    if not (folder / ADAPTER_FILE).is_file():
        return None
    try:
        return int(read_adapter_info(folder)[0].extra.get("step", ""))
    except (SdtuneError, ValueError):
        return None


# ---------------------------------------------------------------------------------------------
# The report


def write_report(plan: Plan, log: Callable[[str], None] = print) -> Path | None:
    """OUTPUT/report: `sdtune compare`'s table and plots over the finished runs, and index.html; None where another
    process has been writing it for over REPORT_LOCK_WAIT seconds (the report is left to it)."""
    # Shards finishing together take turns (the report folder's lock): one writing report/compare while another does
    # would remove the plots the other just wrote as stale
    folder = ensure_writable_folder(plan.report_folder, what=f"the sweep's report {plan.report_folder}")
    lock = OutputLock(folder, what=f"the sweep's report {folder}", wait=REPORT_LOCK_WAIT)
    try:
        lock.acquire()
    except LockHeld as held:
        log(f"report: not written: {held.holder} has been writing {folder} for over {REPORT_LOCK_WAIT:g} s, and it is "
            f"left to it (`sdtune sweep {shell_word(plan.path)} --report-only` writes it again)")
        return None
    try:
        return _write_report(plan, log)
    finally:
        lock.release()


def _write_report(plan: Plan, log: Callable[[str], None]) -> Path:
    from .report import write_html_report

    # Each shard writes the report as it ends, the last writer's staying: one that read the runs' states before another
    # shard's last run finished may write after that shard's report. Writing again while the states changed meanwhile
    # leaves the last report with every run finished before it was written.
    for _ in range(REPORT_TRIES):
        states = [run.state() for run in plan.runs]
        finished = [run for run, state in zip(plan.runs, states) if state == "finished"]
        comparison = None
        if not finished:  # an earlier report's comparison, of runs that are no longer finished with these settings
            from .comparison import remove_comparison

            remove_comparison(plan.report_folder / "compare")
        else:
            from .comparison import compare

            comparison = compare([str(run.folder) for run in finished], str(plan.report_folder / "compare"),
                                 progress=False, metrics_asked=plan.metrics != "none", grid=False)
        path = write_html_report(plan, comparison)
        if [run.state() for run in plan.runs] == states:
            break
    failed = states.count("failed")
    log(f"report: {len(finished)} of {len(plan.runs)} runs finished"
        + (f", {failed} failed" if failed else "") + f"; wrote {path}")
    return path
