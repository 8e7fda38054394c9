"""Merged pipelines: the base pipeline with an adapter's update baked into its weights (`sdtune merge`)."""

from __future__ import annotations

import contextlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from .config import MERGE_DTYPES, scales_text, spelled_for_python, strengths
from .errors import SdtuneError
from .fileio import check_output_target, output_file_lock, write_folder, write_text_atomic
from .models import quiet_libraries
from .safetensors_checks import first_non_finite


@dataclass
class MergeResult:
    """What `merge_adapter` wrote: the pipeline folder, its dtype, and what sampling it needs beyond the weights."""

    output: Path
    dtype: str
    method: str
    token_renames: list = field(default_factory=list)  # stacked: each adapter's renamed new tokens ({}: unchanged)
    # the flags each adapter read prompts with beyond a pipeline's own way (`--clip-skip 2`): weights cannot hold them
    reading_flags: dict = field(default_factory=dict)  # source → "--clip-skip 2 --max-token-length 150"
    # the adapters trained with --zero-terminal-snr: the folder's scheduler is then rescaled as sampling them is
    zero_terminal_snr: list = field(default_factory=list)


@spelled_for_python("merge")
@quiet_libraries()
def merge_adapter(
    source: str | Path | list, output: str | Path, dtype: str = "fp32", model: str | None = None,
    scale: float | list[float] = 1.0, overwrite: bool = False,
) -> MergeResult:
    """A diffusers pipeline folder: the base pipeline with the adapter's update (times `scale`) baked into the UNet.

    `source` is an sdtune adapter (file or run folder) or a kohya-format file, or a list of them, which stack:
    their updates are added (`adapter.load_adapters`), each at its own strength where `scale` is a list. Every component is
    saved with safetensors; `StableDiffusionPipeline.from_pretrained(output)` loads it with no sdtune
    installed. Where an adapter was trained with --zero-terminal-snr, the folder's scheduler is the one `sdtune sample`
    draws that adapter with (rescaled to SNR 0 at its last timestep, trailing timesteps): `sdtune sample` of the
    folder then draws what it draws of the adapter (diffusers: pass guidance_rescale=0.7 as it does). The folder is
    built beside `output` and renamed onto it. An existing `output` is refused unless `overwrite`; one that is, or
    holds, an adapter is refused always.
    """
    import torch

    from .adapter import adapter_info, adapter_path, load_adapter, load_adapters
    from .models import DEFAULT_MODEL, load_pipeline
    from .sampling import base_adapters_among, zero_snr_adapters, zero_snr_scheduler

    sources = list(source) if isinstance(source, (list, tuple)) else [source]
    scales = strengths(scale, len(sources))
    if dtype not in MERGE_DTYPES:
        raise SdtuneError(f"--dtype {dtype!r} is not available; choose: {', '.join(MERGE_DTYPES)}")
    if not sources or len(scales) != len(sources):
        raise SdtuneError(f"give one --scale for all adapters or one each: {len(sources)} adapters, {len(scales)} scales")
    if not all(isinstance(s, (int, float)) and not isinstance(s, bool) and math.isfinite(s) for s in scales):
        shown = scales_text(scales) if all(isinstance(s, (int, float)) for s in scales) else repr(scale)
        raise SdtuneError(f"--scale must be a finite number, got {shown}")
    scales = [float(s) for s in scales]
    output = Path(output)
    check_output_target(output, [adapter_path(s) for s in sources], overwrite)
    infos = [adapter_info(s) for s in sources]
    beneath = base_adapters_among(sources, infos)  # another of the stack trained on top of them, reading prompts its own way
    flags = {str(source): reading_flags(source, info) for index, (source, info) in enumerate(zip(sources, infos))
             if index not in beneath and reading_flags(source, info)}
    with output_file_lock(output):
        pipe = load_pipeline(model or infos[0].base_model or DEFAULT_MODEL)
        keys = set(pipe.unet.state_dict())
        renames = [{}]
        if len(sources) == 1:
            load_adapter(sources[0], pipe, merge=True, scale=scales[0])
        else:
            renames = load_adapters(sources, pipe, scales).renames
        if set(pipe.unet.state_dict()) != keys or hasattr(pipe.unet, "peft_config"):
            raise RuntimeError("the merged UNet is not the base model's architecture")
        zero_snr = zero_snr_adapters(sources, infos)
        if zero_snr:  # weights trained on a schedule ending at SNR 0 are drawn with it (sampling.zero_snr_scheduler)
            pipe.scheduler = zero_snr_scheduler(pipe.scheduler)
        with quiet_diffusers():  # it warns, naming no module, that none must stay in float32
            pipe.to(dtype={"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[dtype])
        overflowed = first_non_finite(dict(pipe.unet.named_parameters()))
        if overflowed:  # a huge --scale, or an update too large for --dtype: refuse rather than write it
            raise SdtuneError(f"the merged weight {overflowed} overflows {dtype} at --scale {scales_text(scales)}; use a smaller --scale"
                              + (" or a wider --dtype" if dtype != "fp32" else ""))
        provenance = [_provenance(*row, dtype) for row in zip(sources, infos, scales, renames)]
        _write_pipeline(pipe, output, provenance[0] if len(sources) == 1 else {"stacked": provenance, "dtype": dtype}, overwrite)
    return MergeResult(output, dtype, "+".join(info.method for info in infos), renames if len(sources) > 1 else [], flags,
                       zero_snr)


def _reading(source, info):
    """How the adapter was trained to read prompts (conditioning.PromptReading)."""
    from .sampling import adapters_reading

    return adapters_reading([source], [info])


def reading_flags(source, info) -> str:
    """The sample flags that read prompts as the adapter was trained to, where not a pipeline's own way ('' if none)."""
    return " ".join(f"--{name.replace('_', '-')} {value}" for name, value in _reading(source, info).metadata().items())


def _provenance(source, info, scale: float, rename: dict, dtype: str) -> dict:
    """What sdtune_merge.json records: where the merged weights came from (and, stacked, the names its new tokens
    have in the merged tokenizer where they are not their own)."""
    from .token_embeddings import renamed

    return {
        "merged_from": str(source),
        "method": info.method,
        "options": info.options,
        "base_model": info.base_model,
        "placeholder": info.placeholder,
        "token": renamed(info.token, rename),
        **({"concept_tokens": {name: renamed(token, rename) for name, token in tokens.items()}}  # several concepts: each one's
           if isinstance(tokens := info.placeholder_tokens(), dict) else {}),
        "scale": scale,
        "dtype": dtype,
        **({"renamed_tokens": rename} if rename else {}),
        **{name: int(value) for name, value in _reading(source, info).metadata().items()},  # clip_skip, max_token_length
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
