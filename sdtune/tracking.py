"""Training logs: TensorBoard, through Accelerate's trackers, and the plain `metrics.jsonl`.

`metrics.jsonl` holds one JSON record a line, one line per optimiser step, flushed as it is written;
a run killed mid-line leaves a cut line that every reader skips.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterator

from .errors import SdtuneError
from .fileio import failures_named, write_text_atomic

LOG_WITH = ("tensorboard", "none")
LOGS_FOLDER = "logs"
PROJECT_NAME = "sdtune"  # TensorBoard runs go to OUTPUT/logs/sdtune
METRICS_FILE = "metrics.jsonl"


def tensorboard_installed() -> bool:
    import importlib.util

    return importlib.util.find_spec("tensorboard") is not None


def resolve_log_with(log_with: str | None) -> str:
    """`tensorboard` when asked or, by default, when it is installed; else `none`."""
    if log_with is None:
        return "tensorboard" if tensorboard_installed() else "none"
    if log_with == "tensorboard" and not tensorboard_installed():
        raise SdtuneError("--log-with tensorboard needs the tensorboard package (pip install tensorboard)")
    return log_with


def logging_dir(output: Path) -> Path:
    return Path(output) / LOGS_FOLDER


def log_scalars(accelerator, values: dict[str, float], step: int) -> None:
    """The step's values to the trackers. TensorBoard's writer queues them for its own thread, which writes
    them every few steps (and when the run ends); Accelerate's `log` would wait for the file after each step."""
    for tracker in accelerator.trackers if accelerator.is_main_process else []:
        if tracker.name == "tensorboard":
            for name, value in values.items():
                tracker.writer.add_scalar(name, value, global_step=step)
        else:
            tracker.log(values, step=step)


def log_image(accelerator, name: str, image, step: int) -> None:
    """Send one PIL image to the TensorBoard tracker, if there is one."""
    import numpy as np

    if "tensorboard" not in [tracker.name for tracker in accelerator.trackers]:
        return
    tracker = accelerator.get_tracker("tensorboard")
    tracker.log_images({name: np.asarray(image.convert("RGB"))[None]}, step=step, dataformats="NHWC")


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
