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
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from .errors import SdtuneError
from .fileio import fsync_directory, publish_directory, read_json, remove_directory, save_safetensors

CHECKPOINTS_DIR = "checkpoints"
STATE_FILE = "state.json"
TRAINABLE_FILE = "trainable.safetensors"
EMA_FILE = "ema.safetensors"
FORMAT = "sdtune-checkpoint-1"
_STEP_DIR = re.compile(r"^step-(\d+)$")


def checkpoints_root(output: str | Path) -> Path:
    return Path(output) / CHECKPOINTS_DIR


def list_checkpoints(output: str | Path) -> list[tuple[int, Path]]:
    """(step, folder) of every complete checkpoint of a run, oldest first."""
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


def resolve_resume(resume: str | None, output: str | Path) -> Path | None:
    """The checkpoint folder to resume from: `latest` (None when the run has none yet), a checkpoint
    folder, or a run folder (its newest checkpoint)."""
    if not resume:
        return None
    if resume == "latest":
        found = list_checkpoints(output)
        return found[-1][1] if found else None
    folder = Path(resume)
    if checkpoints_root(folder).is_dir() and not (folder / STATE_FILE).exists():
        found = list_checkpoints(folder)
        if not found:
            raise SdtuneError(f"{checkpoints_root(folder)} holds no complete checkpoint")
        return found[-1][1]
    read_state(folder)  # refuses anything but a complete checkpoint
    return folder


def read_state(folder: str | Path) -> dict[str, Any]:
    folder = Path(folder)
    state_path = folder / STATE_FILE
    if not folder.is_dir():
        raise SdtuneError(f"checkpoint folder not found: {folder}")
    state = read_json(state_path, missing=f"{folder} is not an sdtune checkpoint (no {STATE_FILE})", damaged="damaged checkpoint state")
    if state.get("format") != FORMAT or not (folder / TRAINABLE_FILE).is_file():
        raise SdtuneError(f"{folder} is not a complete sdtune checkpoint")
    return state


def save_checkpoint(accelerator, output: str | Path, step: int, state: dict[str, Any], parameters: list, ema, keep: int) -> Path:
    """Write the checkpoint of optimizer step `step` atomically; every process calls this."""
    root = checkpoints_root(output)
    final = root / f"step-{step}"
    staging = root / f".step-{step}.partial"
    if accelerator.is_main_process:
        remove_directory(staging)
        staging.mkdir(parents=True)
    accelerator.wait_for_everyone()
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
        for _, old in list_checkpoints(output)[:-keep]:
            remove_directory(old)
        fsync_directory(root)
    accelerator.wait_for_everyone()
    return final


def load_checkpoint(accelerator, folder: str | Path, parameters: list, ema, optimizer: str = "adamw") -> dict[str, Any]:
    """Restore what `save_checkpoint` wrote into the prepared objects; returns the state document."""
    from safetensors.torch import load_file

    folder = Path(folder)
    state = read_state(folder)
    saved_optimizer = state.get("config", {}).get("optimizer", "adamw")  # checkpoints from before the setting: AdamW
    if saved_optimizer != optimizer:
        raise SdtuneError(f"{folder} holds the state of --optimizer {saved_optimizer}; resume with it, not {optimizer}")
    accelerator.load_state(str(folder))
    _copy_numbered(load_file(str(folder / TRAINABLE_FILE)), parameters, folder / TRAINABLE_FILE)
    if ema is not None:
        ema_path = folder / EMA_FILE
        if not ema_path.is_file():
            raise SdtuneError(f"{folder} has no EMA weights ({EMA_FILE}); resume without --ema-decay or from a run with it")
        from safetensors import safe_open

        with safe_open(str(ema_path), framework="pt") as handle:
            counters = json.loads(handle.metadata()["counters"])
        ema.load_state_dict(counters)
        _copy_numbered(load_file(str(ema_path)), ema.shadow_params, ema_path)
    return state


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
