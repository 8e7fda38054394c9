"""Adapters in the formats other tools load, kohya-format files trained elsewhere, and merged pipelines.

Export formats (`export_adapter`):

- `kohya`: one safetensors file with the keys ComfyUI, AUTOMATIC1111 and kohya-ss/sd-scripts read,
  as LyCORIS writes them. Each changed module is named `lora_unet_<module name, dots as _>`:

  * LoRA: `.lora_down.weight`, `.lora_up.weight`, `.alpha`; ΔW = up·down·(alpha/rank), rank =
    lora_down's first dimension. peft's lora_A/lora_B are lora_down/lora_up (same shapes: a k×k conv
    down to r channels, then a 1×1 conv up) and peft's scale lora_alpha/r is the same, so the
    tensors are copied as they are.
  * LoHa: `.hada_w1_a`, `.hada_w1_b`, `.hada_w2_a`, `.hada_w2_b` (+ `.hada_t1`, `.hada_t2` with
    tucker), `.alpha`; ΔW = (w1a·w1b) ⊙ (w2a·w2b)·alpha/rank. peft's LoHa is a port of LyCORIS'
    (same names, shapes and maths), so these are copied too.
  * LoKr: `.lokr_w1` or `.lokr_w1_a`/`.lokr_w1_b`, `.lokr_w2` or `.lokr_w2_a`/`.lokr_w2_b`
    (+ `.lokr_t2`), `.alpha`; ΔW = w1 ⊗ w2 · alpha/rank where a factor is low-rank and · 1 where both
    are full (LyCORIS and ComfyUI ignore alpha then, peft does not: its alpha/rank is folded into w1).
  * every other method (atoms, DiffFit, BitFit, GIFT, full): full-weight differences
    ΔW = merged − base of each changed module, computed on the base model: `.diff` (weight) and
    `.diff_b` (bias) on convolutions and linears (a 3×3 conv's diff has its weight's shape), and
    `.w_norm`/`.b_norm` on GroupNorm/LayerNorm (LyCORIS' norm keys: its full-weight module takes
    only linears and convolutions). A module whose bias alone changed (BitFit, DiffFit's biases)
    gets `.diff_b` alone: ComfyUI and sdtune read it; LyCORIS and AUTOMATIC1111 want a `.diff`
    beside it, which would cost a zero copy of the weight.

  The metadata holds kohya-ss' `ss_*` entries and sdtune's own (`sdtune_*`: method, options, base
  model, placeholder and token), so sdtune reads the token back.
- `diffusers` (LoRA): `StableDiffusionPipeline.save_lora_weights`' layout (`unet.<module>.lora_A.weight`)
  for `load_lora_weights`. alpha/rank is folded into lora_B and the LoraConfig metadata says
  lora_alpha = r, so loaders that read the metadata and older ones that do not get the same update.
- `peft` (lora, loha, lokr): a folder with `adapter_config.json` and `adapter_model.safetensors`, as
  `PeftModel.save_pretrained` writes it for a UNet wrapped in `PeftModel` (keys start with
  `base_model.model.`).

`merge_adapter` writes a whole diffusers pipeline folder with the update baked into the UNet.

Kohya-format files trained elsewhere (`load_kohya`, used by `sdtune.load_adapter`) are applied by
reconstructing each module's ΔW from its keys, one formula per kind as ComfyUI does, and adding it
to the base weights. Why not peft: a file from another trainer may mix ranks and alphas per layer,
tucker cores (`lora_mid`, `hada_t1`, `lokr_t2`), LoKr's full-factor scale rule and full-weight
diffs, none of which needs a peft config guessed from shapes this way; sampling merges anyway, so
nothing is lost in speed, and the result is a plain UNet that `sdtune merge` can save.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import SdtuneError

from .config import EXPORT_FORMATS as FORMATS
from .config import MERGE_DTYPES

PEFT_METHODS = ("lora", "loha", "lokr")
UNET_PREFIX = "lora_unet"
TEXT_ENCODER_PREFIX = "lora_te"
KOHYA_FORMAT = "sdtune-kohya/1"

# peft's adapter tensor names (after `<module>.`) and their kohya names
PEFT_TO_KOHYA = {
    "lora_A.weight": "lora_down.weight",
    "lora_B.weight": "lora_up.weight",
    **{name: name for name in ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2")},
    **{name: name for name in ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2")},
}
# every tensor name a kohya-format file may hold per module, by kind
KOHYA_KINDS = {
    "lora": {"lora_down.weight", "lora_up.weight", "lora_mid.weight", "alpha"},
    "loha": {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2", "alpha"},
    "lokr": {"lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2", "alpha"},
    "diff": {"diff", "diff_b"},
    "norm": {"w_norm", "b_norm"},
}


def kohya_name(prefix: str, module_name: str) -> str:
    """`lora_unet_down_blocks_0_resnets_0_conv1` for prefix `lora_unet`, module `down_blocks.0.resnets.0.conv1`."""
    return f"{prefix}_{module_name.replace('.', '_')}"


def split_peft_key(key: str) -> tuple[str, str]:
    """(`down_blocks.0.resnets.0.conv1`, `lora_A.weight`) from a peft adapter key."""
    for suffix in PEFT_TO_KOHYA:
        if key.endswith("." + suffix):
            return key[: -len(suffix) - 1], suffix
    raise SdtuneError(f"unexpected tensor {key!r} in a low-rank adapter")


def _group_by_module(tensors: dict[str, Any]) -> dict[str, dict[str, Any]]:
    groups: dict[str, dict[str, Any]] = {}
    for key, tensor in tensors.items():
        module, suffix = split_peft_key(key)
        groups.setdefault(module, {})[suffix] = tensor
    return groups


# ---------------------------------------------------------------------------------------------
# Writing files and folders atomically


def _write_folder(output: Path, fill) -> Path:
    """Build a folder with `fill(tmp)` beside `output`, then rename it onto `output` (absent or empty)."""
    from .fileio import publish_directory

    output.parent.mkdir(parents=True, exist_ok=True)
    _check_folder_free(output)
    tmp = Path(tempfile.mkdtemp(prefix=f".{output.name}.", suffix=".tmp", dir=output.parent))
    try:
        fill(tmp)
        if output.is_dir():
            output.rmdir()  # empty: checked above
        publish_directory(tmp, output, replace=False)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return output


def _check_folder_free(output: Path) -> None:
    if output.exists() and not (output.is_dir() and not any(output.iterdir())):
        raise SdtuneError(f"--output {output} already exists; give a new folder (or remove it)")


def _check_file_target(output: Path) -> None:
    if output.is_dir():
        raise SdtuneError(f"--output {output} is a folder; this format is one file, give a file name")


# ---------------------------------------------------------------------------------------------
# Export


@dataclass
class ExportResult:
    output: Path
    format: str
    tensors: int


def export_adapter(source: str | Path, format: str, output: str | Path, model: str | None = None) -> ExportResult:
    """Write the sdtune adapter `source` (file or run folder) in another `format` to `output`.

    `model` overrides the base model that diff-style kohya exports compute ΔW on (default: the
    adapter's own base model).
    """
    from .adapter import adapter_path, read_adapter

    if format not in FORMATS:
        raise SdtuneError(f"--format {format!r} is not available; choose: {', '.join(FORMATS)}")
    output = Path(output)
    path = adapter_path(source)
    if is_kohya_file(path):
        raise SdtuneError(f"{path} already is a kohya-format file; export takes sdtune adapters")
    info, tensors = read_adapter(path)
    if format in ("diffusers", "peft") and info.method not in PEFT_METHODS:
        detail = "LoRA" if format == "diffusers" else "peft methods (lora, loha, lokr)"
        raise SdtuneError(
            f"--format {format} holds {detail}, not {info.method}; use --format kohya or `sdtune merge`"
        )
    if format == "diffusers" and info.method != "lora":
        raise SdtuneError(f"--format diffusers holds LoRA, not {info.method}; use --format kohya or --format peft")

    if format == "kohya":
        _check_file_target(output)
        if info.method in PEFT_METHODS:
            state, extra = kohya_low_rank_state(info, tensors)
        else:
            state, extra = kohya_diff_state(path, info, model)
        write_kohya(output, state, info, extra)
        return ExportResult(output, format, len(state))
    if format == "diffusers":
        _check_file_target(output)
        count = write_diffusers_lora(output, info, tensors)
        return ExportResult(output, format, count)
    count = write_peft_folder(output, info, tensors)
    return ExportResult(output, format, count)


def kohya_low_rank_state(info, tensors) -> tuple[dict, dict[str, str]]:
    """The kohya-format tensors of a lora/loha/lokr adapter: peft's tensors renamed, plus `.alpha`."""
    import torch

    rank, alpha = info.options["rank"], float(info.options["alpha"])
    state: dict[str, torch.Tensor] = {}
    for module, parts in _group_by_module(tensors).items():
        name = kohya_name(UNET_PREFIX, module)
        if info.method == "lokr" and "lokr_w1" in parts and "lokr_w2" in parts:
            # both factors full: LyCORIS and ComfyUI use scale 1, peft alpha/rank; fold it into w1
            w1 = parts["lokr_w1"]
            parts = {**parts, "lokr_w1": (w1.float() * (alpha / rank)).to(w1.dtype)}
        for suffix, tensor in parts.items():
            state[f"{name}.{PEFT_TO_KOHYA[suffix]}"] = tensor.detach().cpu().contiguous()
        state[f"{name}.alpha"] = torch.tensor(alpha, dtype=torch.float32)
    convs = any(tensor.ndim == 4 for tensor in tensors.values())
    args: dict[str, str] = {}
    if info.method == "lora":
        module = "networks.lora"
    else:
        module = "lycoris.kohya"
        args["algo"] = info.method
        if info.options.get("tucker"):
            args["use_tucker"] = "True"
        if info.method == "lokr":
            args["factor"] = str(info.options.get("factor", -1))
            args["decompose_both"] = str(bool(info.options.get("decompose_both")))
    if convs:
        args.update(conv_dim=str(rank), conv_alpha=f"{alpha:g}")
    extra = {
        "ss_network_module": module,
        "ss_network_dim": str(rank),
        "ss_network_alpha": f"{alpha:g}",
        "ss_network_args": json.dumps(args),
    }
    return state, extra


def kohya_diff_state(path: Path, info, model: str | None) -> tuple[dict, dict[str, str]]:
    """`.diff`/`.diff_b` (linears, convs) and `.w_norm`/`.b_norm` (norms): merged − base per changed module."""
    import torch
    from torch import nn

    from . import methods
    from .adapter import load_adapter
    from .methods.base import own_parameters
    from .methods.difffit import NORM_TYPES
    from .models import load_pipeline

    pipe = load_pipeline(model or info.base_model)
    unet = pipe.unet
    before = own_parameters(unet, methods.create(info.method, **info.options).find_targets(unet))
    load_adapter(path, pipe, merge=True)
    state: dict[str, torch.Tensor] = {}
    for (name, attr), base in before.items():
        module = unet.get_submodule(name)
        delta = getattr(module, attr).detach().float() - base.float()
        if not delta.any():
            continue
        key = kohya_name(UNET_PREFIX, name)
        if isinstance(module, (nn.Linear, nn.Conv2d)) and attr in ("weight", "bias"):
            state[f"{key}.{'diff' if attr == 'weight' else 'diff_b'}"] = delta.contiguous()
        elif isinstance(module, NORM_TYPES) and attr in ("weight", "bias"):
            state[f"{key}.{'w_norm' if attr == 'weight' else 'b_norm'}"] = delta.contiguous()
            # LyCORIS finds a norm module by its w_norm: keep one, even when only the bias changed
            state.setdefault(f"{key}.w_norm", torch.zeros_like(module.weight, dtype=torch.float32))
        else:
            raise SdtuneError(f"{path}: the change of {name}.{attr} ({type(module).__name__}) has no kohya key")
    if not state:
        raise SdtuneError(f"{path}: the adapter does not change the base model; there is nothing to export")
    extra = {"ss_network_module": "lycoris.kohya", "ss_network_args": json.dumps({"algo": "full"})}
    return dict(sorted(state.items())), extra


def write_kohya(output: Path, state: dict, info, extra: dict[str, str]) -> Path:
    """The file with kohya-ss' `ss_*` metadata and sdtune's own."""
    from safetensors.torch import save_file

    from . import __version__
    from .fileio import atomic_write

    metadata = {
        "ss_base_model_version": "sd_v1",
        "ss_v2": "False",
        "ss_output_name": output.stem,
        "ss_sd_model_name": info.base_model,
        "ss_training_comment": f"exported by sdtune {__version__} from a {info.method} adapter",
        **extra,
        "sdtune_format": KOHYA_FORMAT,
        "sdtune_method": info.method,
        "sdtune_options": json.dumps(info.options, sort_keys=True),
        "sdtune_base_model": info.base_model,
        "sdtune_placeholder": info.placeholder,
        "sdtune_token": info.token,
    }
    output.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(output) as tmp:
        save_file(state, str(tmp), metadata=metadata)
    return output


def write_diffusers_lora(output: Path, info, tensors) -> int:
    """`unet.<module>.lora_A/B.weight` through diffusers' own writer, alpha/rank folded into lora_B."""
    from diffusers import StableDiffusionPipeline

    from .methods.lowrank import Lora

    scale = float(info.options["alpha"]) / info.options["rank"]
    layers = {}
    for key, tensor in tensors.items():
        module, suffix = split_peft_key(key)
        if suffix == "lora_B.weight":
            tensor = (tensor.float() * scale).to(tensor.dtype)
        layers[key] = tensor.contiguous()
    modules = list(_group_by_module(tensors))
    metadata = {"r": info.options["rank"], "lora_alpha": info.options["rank"], "target_modules": Lora._exact(modules)}
    output.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{output.name}.", dir=output.parent) as tmp:
        StableDiffusionPipeline.save_lora_weights(
            tmp, unet_lora_layers=layers, weight_name=output.name, unet_lora_adapter_metadata=metadata
        )
        os.replace(Path(tmp) / output.name, output)
    return len(layers)


def write_peft_folder(output: Path, info, tensors) -> int:
    """adapter_config.json (the method's own peft config) + adapter_model.safetensors."""
    from safetensors.torch import save_file

    from . import methods

    method = methods.create(info.method, **info.options)
    config = method.peft_config(list(_group_by_module(tensors)))
    config.base_model_name_or_path = info.base_model
    config.inference_mode = True
    state = {f"base_model.model.{key}": tensor.contiguous() for key, tensor in tensors.items()}

    def fill(folder: Path) -> None:
        config.save_pretrained(str(folder))
        save_file(state, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})

    _write_folder(output, fill)
    return len(state)


# ---------------------------------------------------------------------------------------------
# Merge


@dataclass
class MergeResult:
    output: Path
    dtype: str
    method: str


def merge_adapter(
    source: str | Path, output: str | Path, dtype: str = "fp32", model: str | None = None, scale: float = 1.0
) -> MergeResult:
    """A diffusers pipeline folder: the base pipeline with the adapter's update (times `scale`) baked into the UNet.

    Every component is saved with safetensors; `StableDiffusionPipeline.from_pretrained(output)`
    loads it with no sdtune installed. The folder is built beside `output` and renamed onto it.
    """
    import torch

    from .adapter import adapter_info, load_adapter
    from .fileio import write_text_atomic
    from .models import DEFAULT_MODEL, load_pipeline

    if dtype not in MERGE_DTYPES:
        raise SdtuneError(f"--dtype {dtype!r} is not available; choose: {', '.join(MERGE_DTYPES)}")
    if not math.isfinite(scale):
        raise SdtuneError(f"--scale must be a finite number, got {scale}")
    output = Path(output)
    _check_folder_free(output)
    info = adapter_info(source)
    pipe = load_pipeline(model or info.base_model or DEFAULT_MODEL)
    keys = set(pipe.unet.state_dict())
    load_adapter(source, pipe, merge=True, scale=scale)
    if set(pipe.unet.state_dict()) != keys or hasattr(pipe.unet, "peft_config"):
        raise RuntimeError("the merged UNet is not the base model's architecture")
    pipe.to(dtype={"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[dtype])
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

    _write_folder(output, fill)
    return MergeResult(output, dtype, info.method)


# ---------------------------------------------------------------------------------------------
# Reading kohya-format files


def kohya_keys_only(keys) -> bool:
    """Whether every key is a kohya-format module key (`lora_unet_...` or `lora_te_...`)."""
    keys = list(keys)
    return bool(keys) and all(key.split(".", 1)[0].startswith((UNET_PREFIX + "_", TEXT_ENCODER_PREFIX + "_")) for key in keys)


def is_kohya_file(path: Path) -> bool:
    """Whether `path` is a valid safetensors file whose keys are all kohya-format module keys."""
    from .adapter import read_safetensors_header

    try:
        metadata, entries = read_safetensors_header(path)
    except (SdtuneError, OSError):
        return False  # the sdtune reader reports what is wrong with it
    return kohya_keys_only(entries)


def read_kohya(path: Path) -> tuple[dict[str, str], dict]:
    """Metadata and tensors, with the checks sdtune adapters get: a header checked against the file's
    size before anything is loaded, floating-point tensors only, and no NaN or infinite value."""
    from .adapter import ADAPTER_DTYPES, first_non_finite, read_safetensors_header, read_tensors

    metadata, entries = read_safetensors_header(path)
    odd = next((f"{name} is {entry.dtype}" for name, entry in entries.items() if entry.dtype not in ADAPTER_DTYPES), None)
    if odd:
        raise SdtuneError(f"{path}: tensor {odd}; adapters hold {', '.join(sorted(ADAPTER_DTYPES))} tensors")
    tensors = read_tensors(path)
    bad = first_non_finite(tensors)
    if bad:
        raise SdtuneError(f"{path}: tensor {bad} holds NaN or infinite values")
    return metadata, tensors


def kohya_info(path: Path, metadata: dict[str, str]):
    """An AdapterInfo for a kohya-format file; sdtune's own exports carry the token and base model."""
    from .adapter import AdapterInfo

    try:
        options = json.loads(metadata.get("sdtune_options", "{}"))
    except ValueError:
        options = {}
    return AdapterInfo(
        method=f"kohya ({metadata.get('sdtune_method') or metadata.get('ss_network_module') or 'unknown trainer'})",
        options=options,
        base_model=metadata.get("sdtune_base_model", ""),
        fingerprint="",
        placeholder=metadata.get("sdtune_placeholder", ""),
        token=metadata.get("sdtune_token", ""),
        extra=dict(metadata),
    )


@dataclass
class KohyaAdapter:
    """What `load_kohya` applied: the file's info and the changed modules (`lora_unet_...` → module)."""

    info: Any
    target_names: list[str]
    name: str = "kohya"

    def describe(self) -> str:
        return f"{self.info.method}: {len(self.target_names)} modules changed"


def kohya_kind(parts: dict[str, Any], where: str) -> str:
    """Which update a module's tensors describe; refuses unknown or mixed names."""
    if "dora_scale" in parts:
        raise SdtuneError(f"{where}: DoRA (dora_scale) updates are not supported")
    kinds = [kind for kind, names in KOHYA_KINDS.items() if set(parts) & (names - {"alpha"})]
    unknown = sorted(set(parts) - set().union(*KOHYA_KINDS.values()))
    if unknown or len(kinds) != 1:
        found = ", ".join(sorted(parts))
        raise SdtuneError(f"{where}: tensors {found} are no known update (LoRA, LoHa, LoKr, diff, norm)")
    return kinds[0]


def kohya_delta(parts: dict[str, Any], where: str):
    """(ΔW or None, Δbias or None, natural ΔW shape) of one module, in float32, as ComfyUI builds it."""
    import torch

    kind = kohya_kind(parts, where)
    t = {key: value.float() for key, value in parts.items()}

    def need(*names: str) -> list:
        missing = [name for name in names if name not in t]
        if missing:
            raise SdtuneError(f"{where}: {kind} update lacks {', '.join(missing)}")
        return [t[name] for name in names]

    alpha = t["alpha"].item() if "alpha" in t else None
    if kind == "lora":
        down, up = need("lora_down.weight", "lora_up.weight")
        rank = down.shape[0]
        if "lora_mid.weight" in t:  # Tucker core: 1x1 down, k×k mid, 1x1 up
            down = torch.einsum("abhw,bi->aihw", t["lora_mid.weight"], down.flatten(1))
        delta = up.flatten(1) @ down.flatten(1)
        scale = alpha / rank if alpha else 1.0
        return delta * scale, None, tuple(up.shape[:1]) + tuple(down.shape[1:])
    if kind == "loha":
        w1a, w1b, w2a, w2b = need("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")
        rank = w1b.shape[0]
        if "hada_t1" in t:
            t1, t2 = need("hada_t1", "hada_t2")
            m1 = torch.einsum("ijkl,jr,ip->prkl", t1, w1b, w1a)
            m2 = torch.einsum("ijkl,jr,ip->prkl", t2, w2b, w2a)
        else:
            m1, m2 = w1a @ w1b, w2a @ w2b
        scale = alpha / rank if alpha else 1.0
        return m1 * m2 * scale, None, None
    if kind == "lokr":
        dim = None
        if "lokr_w1" in t:
            w1 = t["lokr_w1"]
        else:
            w1a, w1b = need("lokr_w1_a", "lokr_w1_b")
            w1, dim = w1a @ w1b, w1b.shape[0]
        if "lokr_w2" in t:
            w2 = t["lokr_w2"]
        else:
            w2a, w2b = need("lokr_w2_a", "lokr_w2_b")
            dim = w2b.shape[0]
            if "lokr_t2" in t:
                w2 = torch.einsum("ijkl,ip,jr->prkl", t["lokr_t2"], w2a, w2b)
            else:
                w2 = w2a.flatten(1) @ w2b.flatten(1)
        scale = alpha / dim if alpha and dim else 1.0  # both factors full: scale 1
        if w2.ndim == 4:
            w1 = w1[:, :, None, None]
        return torch.kron(w1.contiguous(), w2.contiguous()) * scale, None, None
    weight_key, bias_key = ("diff", "diff_b") if kind == "diff" else ("w_norm", "b_norm")
    delta = t.get(weight_key)
    return delta, t.get(bias_key), tuple(delta.shape) if delta is not None else None


def _fit(delta, weight, exact_shape, where: str, module_name: str):
    """ΔW reshaped to the weight's shape, or a one-line error when it cannot fit."""
    shape = tuple(weight.shape)
    fits = delta.shape[0] == shape[0] and delta.numel() == weight.numel()
    if exact_shape is not None and len(exact_shape) == len(shape):
        fits = fits and tuple(exact_shape) == shape
    if not fits:
        shown = tuple(exact_shape) if exact_shape is not None else tuple(delta.shape)
        raise SdtuneError(f"{where}: the update has shape {shown}, but {module_name}'s weight has shape {shape}")
    return delta.reshape(shape)


def load_kohya(path: str | Path, pipeline, multiplier: float = 1.0) -> KohyaAdapter:
    """Add a kohya-format file's updates (UNet `lora_unet_*`, text encoder `lora_te_*`) to `pipeline`'s weights.

    Every key is matched to a module and every ΔW checked against its weight before any weight
    changes; a key that matches no module, or an update whose shape does not fit, is a one-line error.
    """
    import torch

    path = Path(path)
    metadata, tensors = read_kohya(path)
    if not kohya_keys_only(tensors):
        odd = next((key for key in tensors if not kohya_keys_only([key])), "")
        raise SdtuneError(f"{path}: key {odd!r} is not a kohya-format key (lora_unet_... or lora_te_...)")
    components = {UNET_PREFIX: pipeline.unet, TEXT_ENCODER_PREFIX: getattr(pipeline, "text_encoder", None)}
    lookup = {}
    for prefix, component in components.items():
        if component is None:
            continue
        for module_name, module in component.named_modules():
            if module_name:
                lookup[kohya_name(prefix, module_name)] = (prefix, module_name, module)
                if prefix == TEXT_ENCODER_PREFIX and not hasattr(component, "text_model"):
                    # kohya names CLIP's layers as transformers 4 did, under `text_model.`
                    lookup[kohya_name(prefix, "text_model." + module_name)] = (prefix, module_name, module)
    groups: dict[str, dict[str, Any]] = {}
    for key, tensor in tensors.items():
        lora_name, _, suffix = key.partition(".")
        groups.setdefault(lora_name, {})[suffix] = tensor

    updates = []
    for lora_name, parts in groups.items():
        where = f"{path}: {lora_name}"
        if lora_name not in lookup:
            what = "UNet" if lora_name.startswith(UNET_PREFIX + "_") else "text encoder"
            raise SdtuneError(f"{path}: key {lora_name}.{next(iter(parts))} matches no module of the {what}")
        prefix, module_name, module = lookup[lora_name]
        weight, bias = getattr(module, "weight", None), getattr(module, "bias", None)
        if not isinstance(weight, torch.nn.Parameter):
            raise SdtuneError(f"{where}: {module_name} ({type(module).__name__}) has no weight to update")
        delta_weight, delta_bias, natural_shape = kohya_delta(parts, where)
        if delta_weight is not None:
            delta_weight = _fit(delta_weight, weight, natural_shape, where, module_name)
        if delta_bias is not None:
            if bias is None or tuple(delta_bias.shape) != tuple(bias.shape):
                have = tuple(bias.shape) if bias is not None else "no bias"
                raise SdtuneError(f"{where}: the bias update has shape {tuple(delta_bias.shape)}, {module_name} has {have}")
        updates.append((f"{'' if prefix == UNET_PREFIX else 'text_encoder.'}{module_name}", module, delta_weight, delta_bias))

    with torch.no_grad():
        for _, module, delta_weight, delta_bias in updates:
            if delta_weight is not None:
                module.weight += (delta_weight * multiplier).to(module.weight.device, module.weight.dtype)
            if delta_bias is not None:
                module.bias += (delta_bias * multiplier).to(module.bias.device, module.bias.dtype)
    return KohyaAdapter(kohya_info(path, metadata), [name for name, *_ in updates])
