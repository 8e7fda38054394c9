"""Merged pipelines: the base pipeline with an adapter's update baked into its weights (`sdtune merge`)."""

from __future__ import annotations

import contextlib
import json
import math
from dataclasses import dataclass
from pathlib import Path

from .config import MERGE_DTYPES
from .errors import SdtuneError
from .fileio import check_output_target, output_file_lock, write_folder, write_text_atomic
from .safetensors_checks import first_non_finite


@dataclass
class MergeResult:
    output: Path
    dtype: str
    method: str


def merge_adapter(
    source: str | Path, output: str | Path, dtype: str = "fp32", model: str | None = None, scale: float = 1.0,
    overwrite: bool = False,
) -> MergeResult:
    """A diffusers pipeline folder: the base pipeline with the adapter's update (times `scale`) baked into the UNet.

    `source` is an sdtune adapter (file or run folder) or a kohya-format file. Every component is
    saved with safetensors; `StableDiffusionPipeline.from_pretrained(output)` loads it with no sdtune
    installed. The folder is built beside `output` and renamed onto it. An existing `output` is
    refused unless `overwrite`; one that is, or holds, the adapter is refused always.
    """
    import torch

    from .adapter import adapter_info, adapter_path, load_adapter
    from .models import DEFAULT_MODEL, load_pipeline

    if dtype not in MERGE_DTYPES:
        raise SdtuneError(f"--dtype {dtype!r} is not available; choose: {', '.join(MERGE_DTYPES)}")
    if not math.isfinite(scale):
        raise SdtuneError(f"--scale must be a finite number, got {scale}")
    output = Path(output)
    path = adapter_path(source)
    check_output_target(output, [path], overwrite)
    info = adapter_info(source)
    with output_file_lock(output):
        pipe = load_pipeline(model or info.base_model or DEFAULT_MODEL)
        keys = set(pipe.unet.state_dict())
        load_adapter(source, pipe, merge=True, scale=scale)
        if set(pipe.unet.state_dict()) != keys or hasattr(pipe.unet, "peft_config"):
            raise RuntimeError("the merged UNet is not the base model's architecture")
        with quiet_diffusers():  # it warns, naming no module, that none must stay in float32
            pipe.to(dtype={"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[dtype])
        overflowed = first_non_finite(dict(pipe.unet.named_parameters()))
        if overflowed:  # a huge --scale, or an update too large for --dtype: refuse rather than write it
            raise SdtuneError(f"the merged weight {overflowed} overflows {dtype} at --scale {scale:g}; use a smaller --scale"
                              + (" or a wider --dtype" if dtype != "fp32" else ""))
        _write_pipeline(pipe, output, _provenance(source, info, scale, dtype), overwrite)
    return MergeResult(output, dtype, info.method)


def _provenance(source, info, scale: float, dtype: str) -> dict:
    """What sdtune_merge.json records: where the merged weights came from."""
    return {
        "merged_from": str(source),
        "method": info.method,
        "options": info.options,
        "base_model": info.base_model,
        "placeholder": info.placeholder,
        "token": info.token,
        "scale": scale,
        "dtype": dtype,
    }


@contextlib.contextmanager
def quiet_diffusers():
    """diffusers' logger at errors only, for a call whose warnings say nothing the user can act on."""
    from diffusers.utils import logging as diffusers_logging

    verbosity = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()
    try:
        yield
    finally:
        diffusers_logging.set_verbosity(verbosity)


def _write_pipeline(pipe, output: Path, provenance: dict, overwrite: bool) -> None:
    """The pipeline in diffusers layout, built beside `output` and renamed onto it."""

    def fill(folder: Path) -> None:
        with quiet_diffusers():
            pipe.save_pretrained(str(folder), safe_serialization=True)
        write_text_atomic(folder / "sdtune_merge.json", json.dumps(provenance, indent=2) + "\n")

    write_folder(output, fill, overwrite)
