"""Training logs for TensorBoard, through Accelerate's trackers (`metrics.jsonl` is written as well)."""

from __future__ import annotations

from pathlib import Path

from .errors import SdtuneError

LOG_WITH = ("tensorboard", "none")
LOGS_FOLDER = "logs"
PROJECT_NAME = "sdtune"  # TensorBoard runs go to OUTPUT/logs/sdtune


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


def log_image(accelerator, name: str, image, step: int) -> None:
    """Send one PIL image to the TensorBoard tracker, if there is one."""
    import numpy as np

    if "tensorboard" not in [tracker.name for tracker in accelerator.trackers]:
        return
    tracker = accelerator.get_tracker("tensorboard")
    tracker.log_images({name: np.asarray(image.convert("RGB"))[None]}, step=step, dataformats="NHWC")
