"""Merged pipelines: the base pipeline with an adapter's update baked into its weights (`sdtune merge`)."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from .config import MERGE_DTYPES
from .errors import SdtuneError
from .fileio import check_folder_free, write_folder, write_text_atomic
from .safetensors_checks import first_non_finite


@dataclass
class MergeResult:
    output: Path
    dtype: str
    method: str


def merge_adapter(
    source: str | Path, output: str | Path, dtype: str = "fp32", model: str | None = None, scale: float = 1.0
) -> MergeResult:
    """A diffusers pipeline folder: the base pipeline with the adapter's update (times `scale`) baked into the UNet.

    `source` is an sdtune adapter (file or run folder) or a kohya-format file. Every component is
    saved with safetensors; `StableDiffusionPipeline.from_pretrained(output)` loads it with no sdtune
    installed. The folder is built beside `output` and renamed onto it.
    """
    import torch
    from diffusers.utils import logging as diffusers_logging

    from .adapter import adapter_info, load_adapter
    from .models import DEFAULT_MODEL, load_pipeline

    if dtype not in MERGE_DTYPES:
        raise SdtuneError(f"--dtype {dtype!r} is not available; choose: {', '.join(MERGE_DTYPES)}")
    if not math.isfinite(scale):
        raise SdtuneError(f"--scale must be a finite number, got {scale}")
    output = Path(output)
    check_folder_free(output)
    info = adapter_info(source)
    pipe = load_pipeline(model or info.base_model or DEFAULT_MODEL)
    keys = set(pipe.unet.state_dict())
    load_adapter(source, pipe, merge=True, scale=scale)
    if set(pipe.unet.state_dict()) != keys or hasattr(pipe.unet, "peft_config"):
        raise RuntimeError("the merged UNet is not the base model's architecture")
    verbosity = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()  # its notice on casting a loaded model says nothing here
    try:
        pipe.to(dtype={"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[dtype])
    finally:
        diffusers_logging.set_verbosity(verbosity)
    overflowed = first_non_finite(dict(pipe.unet.named_parameters()))
    if overflowed:  # a huge --scale, or an update too large for --dtype: refuse rather than write it
        raise SdtuneError(f"the merged weight {overflowed} overflows {dtype} at --scale {scale:g}; use a smaller --scale"
                          + (" or a wider --dtype" if dtype != "fp32" else ""))
    provenance = {
        "merged_from": str(source),
        "method": info.method,
        "options": info.options,
        "base_model": info.base_model,
        "placeholder": info.placeholder,
        "token": info.token,
        "scale": scale,
        "dtype": dtype,
    }

    def fill(folder: Path) -> None:
        pipe.save_pretrained(str(folder), safe_serialization=True)
        write_text_atomic(folder / "sdtune_merge.json", json.dumps(provenance, indent=2) + "\n")

    write_folder(output, fill)
    return MergeResult(output, dtype, info.method)
