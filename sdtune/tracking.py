"""Training logs: Accelerate's trackers (TensorBoard by default; W&B, MLflow, ...) and the plain `metrics.jsonl`.

`metrics.jsonl` holds one JSON record a line, one line per optimiser step, flushed as it is written;
a run killed mid-line leaves a cut line that every reader skips.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterator

from .errors import SdtuneError, first_sentence
from .fileio import failures_named, write_text_atomic

# Accelerate's trackers, each named as its package is
TRACKERS = ("tensorboard", "wandb", "mlflow", "comet_ml", "aim", "clearml", "dvclive", "swanlab", "trackio")
LOGS_FOLDER = "logs"
PROJECT_NAME = "sdtune"  # the default project: TensorBoard runs go to OUTPUT/logs/PROJECT
METRICS_FILE = "metrics.jsonl"
WANDB_RUN_ID = "wandb-run-id"  # OUTPUT/logs/wandb-run-id: a resumed run goes on logging to the same W&B run
IMAGE_TRACKERS = ("tensorboard", "wandb")  # the trackers the validation grids go to


def tracker_names(log_with: str | None) -> list[str]:
    """The trackers in a `--log-with` value: comma-separated names, or none."""
    if log_with is None or log_with.strip() == "none":
        return []
    return [name.strip() for name in log_with.split(",")]


def check_log_with(log_with: str | None) -> None:
    """A `--log-with` value names known trackers, each once, or is `none`."""
    if log_with is None:
        return
    names = tracker_names(log_with) if isinstance(log_with, str) else [log_with]
    if any(name not in TRACKERS for name in names) or len(set(names)) != len(names):
        raise SdtuneError(
            f"--log-with takes none or comma-separated trackers out of {', '.join(TRACKERS)}, got {log_with!r}"
        )


def installed(package: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(package) is not None


def resolve_log_with(log_with: str | None) -> str:
    """The trackers as a comma-separated list: `tensorboard` by default when it is installed, else `none`.
    Each named tracker's package must be installed (checked before the model loads)."""
    if log_with is None:
        return "tensorboard" if installed("tensorboard") else "none"
    names = tracker_names(log_with)
    for name in names:
        if not installed(name):
            raise SdtuneError(f"--log-with {name} needs the {name} package (pip install {name.replace('_', '-')})")
    return ",".join(names) or "none"


def check_trackers_ready(log_with: str) -> None:
    """Before the model loads: W&B, unless offline or disabled, has an API key (`wandb login` asks for one on a
    terminal), so a run that cannot log fails in a second rather than after loading the model."""
    import os

    if "wandb" not in tracker_names(log_with) or os.environ.get("WANDB_MODE", "").lower() in ("offline", "disabled", "dryrun"):
        return
    if os.environ.get("RANK", "0") != "0":  # the other processes of a launch do not log
        return
    import wandb

    try:
        wandb.login(verify=False)
    except Exception as error:  # wandb's UsageError and kin: no key and no terminal to ask on
        raise SdtuneError(
            f"--log-with wandb: {first_sentence(error)}; run `wandb login`, set WANDB_API_KEY, or set WANDB_MODE=offline"
        ) from None


def logging_dir(output: Path) -> Path:
    return Path(output) / LOGS_FOLDER


def start_trackers(accelerator, config, output: Path) -> None:
    """Start the run's trackers under `config.tracker_project`. Trackers other than TensorBoard get the
    settings as the run's hyperparameters (TensorBoard's hparams would be another run folder; config.toml
    holds them); W&B runs are named after the output folder, and a resumed run logs to the same W&B run."""
    names = tracker_names(config.log_with)
    if not names:
        return
    init_kwargs = {}
    if "wandb" in names:
        init_kwargs["wandb"] = {
            "name": Path(output).name, "dir": str(logging_dir(output)), "id": wandb_run_id(output, accelerator),
            "resume": "allow",
        }
    with failures_named(logging_dir(output) / config.tracker_project):  # TensorBoard writes its first event as it starts
        accelerator.init_trackers(config.tracker_project, init_kwargs=init_kwargs)
    settings = hyperparameters(config)
    for tracker in accelerator.trackers if accelerator.is_main_process else []:
        if tracker.name != "tensorboard":
            with tracker_writes(tracker):
                tracker.store_init_configuration(settings)


def finish_trackers(accelerator) -> None:
    """End the run's trackers (not the process group, as `accelerator.end_training()` would: it belongs to the
    launched process, which may go on to sample). A tracker whose start an interrupt cut short is passed over:
    accelerate's trackers make their writer or run in `start()`, and finishing one without it would raise an
    AttributeError in place of the interrupt."""
    for tracker in accelerator.trackers:
        try:
            tracker.tracker  # the writer or run, once started
        except AttributeError:
            continue
        with tracker_writes(tracker):
            tracker.finish()


def tracker_writes(tracker):
    """A block that writes through `tracker`: TensorBoard's failed writes (a full disk) name its log folder and the
    room left, as every other file sdtune writes does. Its writer thread's own error is raised again in the next
    write, here (`cli` keeps that thread from printing it)."""
    import contextlib

    if tracker.name == "tensorboard":
        return failures_named(Path(tracker.writer.log_dir))
    return contextlib.nullcontext()


def wandb_run_id(output: Path, accelerator) -> str | None:
    """The W&B run id kept in OUTPUT/logs: made on the first start, read on a resume (main process only)."""
    if not accelerator.is_main_process:
        return None
    import uuid

    path = logging_dir(output) / WANDB_RUN_ID
    if path.is_file():
        kept = path.read_text(encoding="utf-8").strip()
        if kept.isalnum():
            return kept
    run_id = uuid.uuid4().hex[:16]
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, run_id + "\n")
    return run_id


def hyperparameters(config) -> dict[str, Any]:
    """The run's settings as flat values a tracker stores (lists and tables as text)."""
    flat = {}
    for name, value in config.to_dict().items():
        flat[name] = value if isinstance(value, (bool, int, float, str)) else json.dumps(value, default=str)
    return flat


def log_scalars(accelerator, values: dict[str, float], step: int) -> None:
    """The step's values to the trackers. TensorBoard's writer queues them for its own thread, which writes
    them every few steps (and when the run ends); Accelerate's `log` would wait for the file after each step."""
    for tracker in accelerator.trackers if accelerator.is_main_process else []:
        with tracker_writes(tracker):
            if tracker.name == "tensorboard":
                for name, value in values.items():
                    tracker.writer.add_scalar(name, value, global_step=step)
            else:
                tracker.log(values, step=step)


def log_image(accelerator, name: str, image, step: int) -> None:
    """One PIL image to the trackers that show images (TensorBoard, W&B); the others keep scalars only."""
    import numpy as np

    for tracker in accelerator.trackers if accelerator.is_main_process else []:
        with tracker_writes(tracker):
            if tracker.name == "tensorboard":
                tracker.log_images({name: np.asarray(image.convert("RGB"))[None]}, step=step, dataformats="NHWC")
            elif tracker.name in IMAGE_TRACKERS:
                tracker.log_images({name: [image.convert("RGB")]}, step=step)


# ---------------------------------------------------------------------------------------------
# metrics.jsonl


def metrics_lines(path: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    """Each record of a metrics.jsonl with its line; a line cut short by a kill is skipped."""
    if not path.is_file():
        return
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict):
            yield line, record


def read_metrics_log(path: Path) -> list[dict[str, Any]]:
    """The records of a metrics.jsonl."""
    return [record for _, record in metrics_lines(path)]


def metrics_until(path: Path, step: int) -> str:
    """The metrics.jsonl lines of steps 1..`step`, as they are."""
    if step == 0:
        return ""
    return "".join(
        line + "\n"
        for line, record in metrics_lines(path)
        if isinstance(record.get("step"), int) and record["step"] <= step
    )


class MetricsLog:
    """A run's metrics.jsonl, open for appending; a resumed run first drops the steps its checkpoint did not reach."""

    def __init__(self, output: Path, step: int):
        self.path = path = Path(output) / METRICS_FILE
        write_text_atomic(path, metrics_until(path, step))
        self._file = open(path, "a", encoding="utf-8")

    def write(self, record: dict[str, Any]) -> None:
        with failures_named(self.path):  # a full disk names this file and the room left
            self._file.write(json.dumps(record) + "\n")
            self._file.flush()

    def close(self) -> None:
        with failures_named(self.path):
            self._file.close()
