"""Training checkpoints: everything needed to continue a run exactly, in `OUTPUT/checkpoints/step-N/`.

A checkpoint folder holds
- what `accelerator.save_state` writes: the optimizer (`optimizer.bin`), the learning-rate scheduler
  (`scheduler.bin`), the fp16 gradient scaler if any (`scaler.pt`) and each process's RNG states
  (`random_states_<i>.pkl`). Accelerate writes these with `torch.save` and reads them back with
  `torch.load(weights_only=True)` (accelerate 1.15's `load`), which refuses arbitrary pickled objects.
  The UNet itself is not saved there: its frozen weights come from the base model;
- `trainable.safetensors`: the trainable parameters, in the order the method returns them;
- `ema.safetensors`: the EMA of the trainable parameters, with its counters in the metadata (when enabled);
- `state.json`: the optimizer step, the number of micro-batches drawn, the resolved configuration.

The data order and every random draw of the loop derive from (seed, epoch) and (seed, step,
micro-batch), so the step counter is all the data position there is; the RNG files are kept for
completeness, exact resume does not depend on them.

A checkpoint is written under a hidden staging name, flushed to disk and renamed: a folder named
`step-N` is always complete. Only the newest `keep` checkpoints stay.

Nothing in a checkpoint is trusted before it is checked (`check_checkpoint`): every field of
`state.json` against the folder's name, its configuration, the trained tensors (count, dtype,
finiteness), the optimizer's and the EMA's state (the same count and shapes, finite, no step past
the checkpoint's) and the scheduler's step count; every file must be readable. A damaged checkpoint
raises `DamagedCheckpoint`, naming the file and what is wrong: `--resume latest` then falls back to
the newest intact one (`select_checkpoint`), an explicitly named one is refused. A checkpoint of
another method, optimizer or of more steps than the run asks for is refused by name
(`check_resumable`), and its tensors must have the shapes this run trains (`load_checkpoint`).
"""

from __future__ import annotations

import json
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import SdtuneError, warn
from .fileio import disk_full, fsync_directory, is_disk_full, publish_directory, read_json, remove_directory, save_safetensors

CHECKPOINTS_DIR = "checkpoints"
STATE_FILE = "state.json"
TRAINABLE_FILE = "trainable.safetensors"
EMA_FILE = "ema.safetensors"
OPTIMIZER_FILE = "optimizer.bin"
SCHEDULER_FILE = "scheduler.bin"
SCALER_FILE = "scaler.pt"
RNG_FILE = "random_states_{}.pkl"
FORMAT = "sdtune-checkpoint-1"
_STEP_DIR = re.compile(r"^step-(\d+)$")
# optimizer state entries that have their parameter's shape (AdamW/Adam, SGD's momentum)
PARAMETER_SHAPED_STATE = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq", "momentum_buffer")


class DamagedCheckpoint(SdtuneError):
    """A checkpoint whose files are missing, unreadable, or disagree with each other or with its folder's name."""


@dataclass
class Checkpoint:
    """A checkpoint that `check_checkpoint` found intact."""

    folder: Path
    state: dict[str, Any]  # state.json
    config: Any  # its TrainConfig
    shapes: list[tuple[int, ...]]  # the trained tensors' shapes, in order

    @property
    def step(self) -> int:
        return self.state["step"]


def checkpoints_root(output: str | Path) -> Path:
    return Path(output) / CHECKPOINTS_DIR


def list_checkpoints(output: str | Path) -> list[tuple[int, Path]]:
    """(step, folder) of every checkpoint folder of a run (named step-N), oldest first."""
    root = checkpoints_root(output)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := _STEP_DIR.match(p.name))]
    return sorted(found)


def remove_partial_checkpoints(output: str | Path) -> None:
    """Remove staging folders a killed run left behind (hidden names; never a `step-N`)."""
    root = checkpoints_root(output)
    if root.is_dir():
        for path in root.iterdir():
            if path.name.startswith(".") and path.is_dir():
                remove_directory(path)


# ---------------------------------------------------------------------------------------------
# Choosing and checking the checkpoint to resume from


def select_checkpoint(resume: str | None, output: str | Path, config) -> Checkpoint | None:
    """The checkpoint to resume from, checked: `latest` (None when the run has none yet), a checkpoint
    folder, or a run folder (its newest checkpoint). For `latest` and a run folder a damaged checkpoint
    is passed over, with a warning, for the newest intact one; a named checkpoint folder must be intact."""
    if not resume:
        return None
    if resume == "latest":
        candidates = [folder for _, folder in reversed(list_checkpoints(output))]
        if not candidates:
            return None
    else:
        folder = Path(resume)
        if not (checkpoints_root(folder).is_dir() and not (folder / STATE_FILE).exists()):
            checkpoint = check_checkpoint(folder)  # refuses anything but a complete, consistent checkpoint
            check_resumable(checkpoint, config)
            return checkpoint
        candidates = [folder for _, folder in reversed(list_checkpoints(folder))]
        if not candidates:
            raise SdtuneError(f"{checkpoints_root(folder)} holds no complete checkpoint")
    damaged: list[DamagedCheckpoint] = []
    for folder in candidates:
        try:
            checkpoint = check_checkpoint(folder)
        except DamagedCheckpoint as error:
            damaged.append(error)
            continue
        for error in damaged:
            warn(f"damaged checkpoint: {error}; resuming from {folder.name}")
        check_resumable(checkpoint, config)
        return checkpoint
    more = f" (and {len(damaged) - 1} older, also damaged)" if len(damaged) > 1 else ""
    raise DamagedCheckpoint(
        f"no intact checkpoint to resume from: {damaged[0]}{more}; resume from a checkpoint of another run, "
        "or start again with --overwrite"
    )


def check_checkpoint(folder: str | Path) -> Checkpoint:
    """The checkpoint in `folder` if every file is there, readable and consistent; else DamagedCheckpoint
    naming the file and what is wrong (a folder that is not a checkpoint at all: SdtuneError)."""
    from .config import TrainConfig

    folder = Path(folder)
    if not folder.is_dir():
        raise SdtuneError(f"checkpoint folder not found: {folder}")
    state = read_state(folder)
    state_path = folder / STATE_FILE

    def bad(problem: str, path: Path = state_path) -> DamagedCheckpoint:
        return DamagedCheckpoint(f"{path}: {problem}")

    step = state.get("step")
    if not _whole(step, 1):
        raise bad(f"step is {step!r}, not a whole number of at least 1")
    named = _STEP_DIR.match(folder.name)
    if named and int(named.group(1)) != step:
        raise bad(f"step {step} disagrees with the folder's name {folder.name}")
    for name, least in (("micro_batches", step), ("num_processes", 1)):
        if not _whole(state.get(name), least):
            raise bad(f"{name} is {state.get(name)!r}, not a whole number of at least {least}")
    if not isinstance(state.get("config"), dict):
        raise bad("it holds no run configuration")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            config = TrainConfig.load(None, **state["config"])
    except (SdtuneError, TypeError) as error:
        raise bad(f"its run configuration is not valid ({str(error).splitlines()[0][:160]})") from None
    if step > config.steps:
        raise bad(f"step {step} is past the run's {config.steps} steps")

    shapes = _check_tensors(folder / TRAINABLE_FILE, None)
    if config.ema_decay:
        _check_tensors(folder / EMA_FILE, shapes, step)
    _check_optimizer(folder / OPTIMIZER_FILE, shapes, step)
    scheduler = _load_torch_file(folder / SCHEDULER_FILE)
    last = scheduler.get("last_epoch") if isinstance(scheduler, dict) else None
    fp16 = config.mixed_precision == "fp16"
    if not _whole(last, 0) or (last < step and not fp16):  # under fp16 the scaler skips steps, and the scheduler with them
        raise bad(f"the learning-rate schedule is at step {last!r}, behind the checkpoint's step {step}", folder / SCHEDULER_FILE)
    if fp16:
        _load_torch_file(folder / SCALER_FILE)
    for process in range(state["num_processes"]):
        _load_torch_file(folder / RNG_FILE.format(process))
    return Checkpoint(folder, state, config, shapes)


def check_resumable(checkpoint: Checkpoint, config) -> None:
    """Refuse, by name, a checkpoint this run cannot continue: another method or optimizer, fewer
    steps asked for than it holds, an EMA asked for that it lacks."""
    saved, folder, step = checkpoint.config, checkpoint.folder, checkpoint.step
    if saved.method != config.method:
        raise SdtuneError(
            f"{folder} is a checkpoint of --method {saved.method}; this run trains {config.method}: "
            f"resume with --method {saved.method}, or choose another --output"
        )
    if saved.optimizer != config.optimizer:
        raise SdtuneError(f"{folder} holds the state of --optimizer {saved.optimizer}; resume with it, not {config.optimizer}")
    if config.steps < step:
        raise SdtuneError(
            f"{folder} has trained {step} steps; --steps {config.steps} asks for fewer: give --steps {step} or more "
            "(the finished run's adapter is kept)"
        )
    if (config.text_encoder_2_lr is None) != (saved.text_encoder_2_lr is None):  # the optimizer's groups differ
        given = "with" if saved.text_encoder_2_lr is not None else "without"
        raise SdtuneError(f"{folder} was trained {given} --text-encoder-2-lr (its own optimizer group); resume {given} it")
    if config.ema_decay and not saved.ema_decay:
        raise SdtuneError(f"{folder} has no EMA weights ({EMA_FILE}); resume without --ema-decay or from a run with it")


def read_state(folder: str | Path) -> dict[str, Any]:
    folder = Path(folder)
    state_path = folder / STATE_FILE
    if not folder.is_dir():
        raise SdtuneError(f"checkpoint folder not found: {folder}")
    try:
        state = read_json(state_path, missing=f"{folder} is not an sdtune checkpoint (no {STATE_FILE})", damaged="damaged checkpoint state")
    except SdtuneError as error:
        raise DamagedCheckpoint(str(error)) from None
    if not isinstance(state, dict) or state.get("format") != FORMAT or not (folder / TRAINABLE_FILE).is_file():
        raise DamagedCheckpoint(f"{folder} is not a complete sdtune checkpoint")
    return state


def _whole(value: Any, least: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= least


def _check_tensors(path: Path, shapes: list | None, step: int | None = None) -> list[tuple[int, ...]]:
    """The shapes of a checkpoint's numbered tensors (00000, 00001, ...): F32, finite, and `shapes` when given."""
    from .safetensors_checks import read_safetensors_header, read_tensors

    if not path.is_file():
        raise DamagedCheckpoint(f"{path}: missing")
    try:
        metadata, entries = read_safetensors_header(path)
    except (SdtuneError, OSError) as error:
        raise DamagedCheckpoint(str(error) if isinstance(error, SdtuneError) else f"{path}: {error}") from None
    if sorted(entries) != [f"{i:05d}" for i in range(len(entries))] or not entries:
        raise DamagedCheckpoint(f"{path}: its tensors are not numbered 00000 to {len(entries) - 1:05d}")
    found = [entries[f"{i:05d}"].shape for i in range(len(entries))]
    if shapes is not None and found != shapes:
        raise DamagedCheckpoint(f"{path}: {len(found)} tensors whose shapes differ from the {len(shapes)} trained ones")
    if any(entry.dtype != "F32" for entry in entries.values()):
        raise DamagedCheckpoint(f"{path}: trained tensors are F32, this file holds others")
    try:
        tensors = read_tensors(path)
    except SdtuneError as error:
        raise DamagedCheckpoint(str(error)) from None
    bad = next((key for key, tensor in tensors.items() if not bool(tensor.isfinite().all())), None)
    if bad is not None:
        raise DamagedCheckpoint(f"{path}: tensor {int(bad)} holds NaN or infinite values")
    if step is not None:  # the EMA's counters
        try:
            counters = json.loads(metadata["counters"])
            updates = counters["optimization_step"]
        except (KeyError, TypeError, ValueError):
            raise DamagedCheckpoint(f"{path}: no readable EMA counters in its metadata") from None
        if updates != step:
            raise DamagedCheckpoint(f"{path}: the EMA has {updates!r} updates, the checkpoint {step} steps")
    return found


def _load_torch_file(path: Path):
    """What accelerate's `load` (torch.load with weights_only=True) reads from `path`; DamagedCheckpoint if it cannot."""
    from accelerate.utils import load

    if not path.is_file():
        raise DamagedCheckpoint(f"{path}: missing")
    try:
        return load(str(path), map_location="cpu")
    except Exception as error:
        reason = (str(error).strip().splitlines() or [type(error).__name__])[0][:160]
        raise DamagedCheckpoint(f"{path}: unreadable ({reason})") from None


def _check_optimizer(path: Path, shapes: list, step: int) -> None:
    """The optimizer's state: one parameter per trained tensor, its moments of their shapes, finite, no step past `step`."""
    import torch

    state = _load_torch_file(path)

    def bad(problem: str) -> DamagedCheckpoint:
        return DamagedCheckpoint(f"{path}: {problem}")

    if not (isinstance(state, dict) and isinstance(state.get("state"), dict) and isinstance(state.get("param_groups"), list)):
        raise bad("not an optimizer state")
    ids = []
    for group in state["param_groups"]:
        if not isinstance(group, dict) or not isinstance(group.get("params"), list):
            raise bad("a parameter group without its parameters")
        ids += group["params"]
    if sorted(ids) != list(range(len(shapes))):
        raise bad(f"the state of {len(ids)} parameters, the checkpoint trains {len(shapes)}")
    for index, entries in state["state"].items():
        if index not in ids or not isinstance(entries, dict):
            raise bad(f"state of an unknown parameter {index!r}")
        for name, value in entries.items():
            if not isinstance(value, torch.Tensor):
                continue
            if value.is_floating_point() and not bool(value.isfinite().all()):
                raise bad(f"{name} of parameter {index} holds NaN or infinite values")
            if name in PARAMETER_SHAPED_STATE and tuple(value.shape) != shapes[index]:
                raise bad(f"{name} of parameter {index} has shape {tuple(value.shape)}, the tensor {shapes[index]}")
            if name == "step" and not (value.numel() == 1 and 0 <= float(value) <= step):
                raise bad(f"parameter {index} has taken {float(value) if value.numel() == 1 else '?'} steps, past the checkpoint's {step}")


# ---------------------------------------------------------------------------------------------
# Writing and loading


def save_checkpoint(accelerator, output: str | Path, step: int, state: dict[str, Any], parameters: list, ema, keep: int) -> Path:
    """Write the checkpoint of optimizer step `step` atomically; every process calls this."""
    if not (isinstance(step, int) and step >= 1):
        raise ValueError(f"a checkpoint is of an optimizer step of at least 1, not {step!r}")
    root = checkpoints_root(output)
    final = root / f"step-{step}"
    staging = root / f".step-{step}.partial"
    if accelerator.is_main_process:
        remove_directory(staging)
        staging.mkdir(parents=True)
    accelerator.wait_for_everyone()
    try:
        accelerator.save_state(str(staging), safe_serialization=True)
        accelerator.wait_for_everyone()  # every process's RNG file is in place before the folder is published
        if accelerator.is_main_process:
            save_safetensors(_numbered(parameters), staging / TRAINABLE_FILE, {"format": FORMAT})
            if ema is not None:
                counters = {k: v for k, v in ema.state_dict().items() if k != "shadow_params"}
                save_safetensors(_numbered(ema.shadow_params), staging / EMA_FILE, {"counters": json.dumps(counters)})
            document = {"format": FORMAT, "step": step, **state}
            (staging / STATE_FILE).write_text(json.dumps(document, indent=1, sort_keys=True) + "\n", encoding="utf-8")
            publish_directory(staging, final)
    except BaseException as error:  # an interrupt too: no staging folder is left behind
        full = disk_full(final) if isinstance(error, Exception) and is_disk_full(error, root) else None
        if accelerator.is_main_process:
            remove_directory(staging)
        if full is not None:
            raise full from None
        raise
    if accelerator.is_main_process:
        for _, old in list_checkpoints(output)[:-keep]:
            remove_directory(old)
        fsync_directory(root)
    accelerator.wait_for_everyone()
    return final


def load_checkpoint(accelerator, checkpoint: Checkpoint, parameters: list, ema) -> dict[str, Any]:
    """Restore a checked checkpoint into the prepared objects; returns the state document. Its tensors
    must be those this run trains (count and shapes); nothing is changed before that is known."""
    from safetensors.torch import load_file

    folder = checkpoint.folder
    needed = [tuple(p.shape) for p in parameters]
    if checkpoint.shapes != needed:
        saved, options = checkpoint.config.options, "the same method options"
        differ = next((i for i, (a, b) in enumerate(zip(checkpoint.shapes, needed)) if a != b), min(len(needed), len(checkpoint.shapes)))
        what = (
            f"{len(checkpoint.shapes)} trained tensors, this run trains {len(needed)}"
            if len(checkpoint.shapes) != len(needed)
            else f"tensor {differ} has shape {checkpoint.shapes[differ]}, this run needs {needed[differ]}"
        )
        raise SdtuneError(f"{folder / TRAINABLE_FILE}: {what}; resume with {options} as the checkpoint ({json.dumps(saved)})")
    accelerator.load_state(str(folder))
    _copy_numbered(load_file(str(folder / TRAINABLE_FILE)), parameters, folder / TRAINABLE_FILE)
    if ema is not None:
        from safetensors import safe_open

        ema_path = folder / EMA_FILE
        with safe_open(str(ema_path), framework="pt") as handle:
            counters = json.loads(handle.metadata()["counters"])
        ema.load_state_dict(counters)
        _copy_numbered(load_file(str(ema_path)), ema.shadow_params, ema_path)
    return checkpoint.state


def _numbered(tensors) -> dict:
    return {f"{i:05d}": t.detach().cpu().contiguous() for i, t in enumerate(tensors)}


def _copy_numbered(saved: dict, targets: list, path: Path) -> None:
    import torch

    if len(saved) != len(targets):
        raise SdtuneError(f"{path}: {len(saved)} tensors, this run trains {len(targets)}: not a checkpoint of this method")
    with torch.no_grad():
        for i, target in enumerate(targets):
            tensor = saved[f"{i:05d}"]
            if tensor.shape != target.shape:
                raise SdtuneError(f"{path}: tensor {i} has shape {tuple(tensor.shape)}, this run needs {tuple(target.shape)}")
            target.copy_(tensor)
