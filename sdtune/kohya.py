"""Kohya/LyCORIS-format files: the keys ComfyUI, AUTOMATIC1111 and kohya-ss/sd-scripts read, written and read.

One safetensors file; each changed module is named `lora_unet_<module name, dots as _>` (UNet) or
`lora_te_<module name>` (text encoder; SDXL: `lora_te1_`, `lora_te2_`), and its tensors are keys under that name, one
set per kind of update. Which names (`kohya_layout`, for writing and reading alike): SD 1.x and 2.x
files name the UNet's modules as diffusers does (`lora_unet_down_blocks_0_attentions_0_proj_in`), as
kohya-ss trains them on the diffusers UNet; SDXL files as the original code does
(`lora_unet_input_blocks_1_0_in_layers_2`, `sdtune.sgm_names`), as kohya-ss trains SDXL on that
UNet, with `lora_te1_`/`lora_te2_` for its two text encoders. Reading takes either UNet spelling
(as ComfyUI does).

* LoRA: `.lora_down.weight`, `.lora_up.weight` (+ `.lora_mid.weight`, a Tucker core), `.alpha`;
  ΔW = up·down·(alpha/rank), rank = lora_down's first dimension. peft's lora_A/lora_B are
  lora_down/lora_up (same shapes: a k×k conv down to r channels, then a 1×1 conv up) and peft's
  scale lora_alpha/r is the same, so sdtune's LoRA tensors are copied as they are.
* LoHa: `.hada_w1_a`, `.hada_w1_b`, `.hada_w2_a`, `.hada_w2_b` (+ `.hada_t1`, `.hada_t2` with
  tucker), `.alpha`; ΔW = (w1a·w1b) ⊙ (w2a·w2b)·alpha/rank. peft's LoHa is a port of LyCORIS'
  (same names, shapes and maths), so these are copied too.
* LoKr: `.lokr_w1` or `.lokr_w1_a`/`.lokr_w1_b`, `.lokr_w2` or `.lokr_w2_a`/`.lokr_w2_b`
  (+ `.lokr_t2`), `.alpha`; ΔW = w1 ⊗ w2 · alpha/rank where a factor is low-rank and · 1 where both
  are full (LyCORIS and ComfyUI ignore alpha then, peft does not: its alpha/rank is folded into w1).
* DoRA (LyCORIS' `dora_wd`), on any of the three above: `.dora_scale`, the magnitude m, beside the
  factors; W' = m·(W + ΔW)/‖W + ΔW‖, the norm per output channel when dora_scale has the shape
  (out, 1, …) (LyCORIS' `wd_on_output`, which sdtune writes from peft's magnitude), per input channel
  when (1, in, …) (LyCORIS' older default). Its ΔW is W' − W, so it needs the base weight: the
  reader gives ΔW and `decomposed_delta` applies the magnitude on the module's weight.
* full-weight differences: `.diff` (weight) and `.diff_b` (bias) on convolutions and linears (a
  3×3 conv's diff has its weight's shape), and `.w_norm`/`.b_norm` on GroupNorm/LayerNorm
  (LyCORIS' norm keys: its full-weight module takes only linears and convolutions). A `.diff_b`
  beside a LoRA's, LoHa's or LoKr's factors is that module's Δbias, as ComfyUI reads it (`sdtune
  extract --keep-biases` writes them; LyCORIS ignores it there, diffusers refuses the file).

Writing (`sdtune export --format kohya`): a method that has its own kohya tensors (LoRA, LoHa, LoKr:
`Method.kohya_tensors`) gives them, computed from its adapter alone; every other method (atoms,
DiffFit, BitFit, GIFT, full) is written as full-weight differences ΔW = merged − base of each changed
module, computed on the base model (`kohya_diff_state`). A module whose bias alone changed (BitFit,
DiffFit's biases) gets `.diff_b` alone: ComfyUI and sdtune read it; LyCORIS, AUTOMATIC1111 and
InvokeAI refuse a file holding one. `--full-diff` writes a zero `.diff` of the weight's shape beside
each (`missing_diffs`), which every loader reads, at the cost of those zeros. The metadata holds
kohya-ss' `ss_*` entries and sdtune's own (`sdtune_*`: method, options, base model, placeholder and
token), so sdtune reads the token back.

Reading (`load_kohya`, used by `sdtune.load_adapter` for files trained anywhere): each module's ΔW is
rebuilt from its keys by the reader of its kind (`KOHYA_READERS`, one small function per kind, as
ComfyUI and LyCORIS dispatch per algorithm) and added to the base weights. Why not peft: a file from
another trainer may mix ranks and alphas per layer, tucker cores (`lora_mid`, `hada_t1`, `lokr_t2`),
LoKr's full-factor scale rule and full-weight diffs, none of which needs a peft config guessed from
shapes this way; sampling merges anyway, so nothing is lost in speed, and the result is a plain UNet
that `sdtune merge` can save.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar, Mapping

from .adapter_info import BASE_ADAPTERS_KEY, CONCEPT_TOKENS, INIT_WEIGHTS_KEY, AdapterInfo
from .errors import SdtuneError, warn
from .safetensors_checks import (
    check_adapter_dtypes, first_non_finite, read_safetensors_header, read_tensors, warn_absurd_values,
)
from .sgm_names import SgmNames
from .token_embeddings import BUNDLE_PREFIX, add_bundled_tokens
from .version import __version__

UNET_PREFIX = "lora_unet"
TEXT_ENCODER_PREFIX = "lora_te"
KOHYA_PREFIXES = (UNET_PREFIX, TEXT_ENCODER_PREFIX, "lora_te1", "lora_te2")
KOHYA_FORMAT = "sdtune-kohya/1"

# every tensor name a kohya-format file may hold per module, by kind
KOHYA_KINDS = {
    "lora": {"lora_down.weight", "lora_up.weight", "lora_mid.weight", "alpha"},
    "loha": {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2", "alpha"},
    "lokr": {"lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2", "alpha"},
    "diff": {"diff", "diff_b"},
    "norm": {"w_norm", "b_norm"},
}


def norm_types() -> tuple[type, ...]:
    """The layers whose changes are written as LyCORIS' norm keys (`.w_norm`/`.b_norm`)."""
    from torch import nn

    return (nn.GroupNorm, nn.LayerNorm) + ((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ())


def kohya_name(prefix: str, module_name: str) -> str:
    """`lora_unet_down_blocks_0_resnets_0_conv1` for prefix `lora_unet`, module `down_blocks.0.resnets.0.conv1`."""
    return f"{prefix}_{module_name.replace('.', '_')}"


@dataclass(frozen=True)
class KohyaLayout:
    """How a kohya file names one model's modules: the UNet's, and each text encoder's prefix."""

    sgm: SgmNames | None  # the UNet by its original names (SDXL); None: by diffusers' names
    text_encoder_prefixes: dict  # pipeline component (`text_encoder`, `text_encoder_2`) → key prefix
    base_model_version: str  # kohya-ss' `ss_base_model_version`

    def key(self, module_name: str) -> str:
        """The kohya name of a UNet module (its diffusers name) or of a text encoder's
        (`text_encoder.<module>`, `text_encoder_2.<module>`), as kohya-ss writes it: CLIP's layers
        under `text_model.` as transformers 4 named them, the projection (`text_projection`) beside."""
        component, _, rest = module_name.partition(".")
        if component in self.text_encoder_prefixes:
            if not rest.startswith("text_model.") and rest != "text_projection":
                rest = "text_model." + rest
            return kohya_name(self.text_encoder_prefixes[component], rest)
        name = self.sgm.to_sgm(module_name) if self.sgm is not None else module_name
        if name is None:
            raise SdtuneError(f"UNet module {module_name} has no name in the original SDXL UNet; kohya files cannot hold it")
        return kohya_name(UNET_PREFIX, name)


def kohya_layout(unet_config: Mapping) -> KohyaLayout:
    """The kohya names of the model whose UNet has `unet_config`: SDXL's (added text/time conditioning)
    are the original model's with `lora_te1`/`lora_te2`, as kohya-ss writes them and SDXL loaders
    read them; SD 1.x/2.x's are diffusers' with `lora_te` (kohya-ss' version `sd_v2` for SD 2.x)."""
    if is_sdxl_unet(unet_config):
        return KohyaLayout(SgmNames(unet_config), {"text_encoder": "lora_te1", "text_encoder_2": "lora_te2"}, "sdxl_base_v1-0")
    return KohyaLayout(None, {"text_encoder": TEXT_ENCODER_PREFIX}, "sd_v2" if is_sd2_unet(unet_config) else "sd_v1")


def is_sdxl_unet(unet_config: Mapping) -> bool:
    return unet_config.get("addition_embed_type") == "text_time"  # SDXL's added text/time conditioning


def is_sd2_unet(unet_config: Mapping) -> bool:
    """SD 2.x: linear projections in its transformers (SD 1.x's are 1x1 convolutions), OpenCLIP ViT-H's width."""
    return not is_sdxl_unet(unet_config) and bool(
        unet_config.get("use_linear_projection") or unet_config.get("cross_attention_dim") == 1024
    )


def kohya_keys_only(keys) -> bool:
    """Whether every key is a kohya-format module key (`lora_unet_...`, `lora_te_...`, `lora_te1_...`, `lora_te2_...`)."""
    keys = list(keys)
    starts = tuple(prefix + "_" for prefix in KOHYA_PREFIXES)
    return bool(keys) and all(key.split(".", 1)[0].startswith(starts) for key in keys)


def is_kohya_file(path: Path) -> bool:
    """Whether `path` is a valid safetensors file of kohya-format module keys: not an sdtune adapter, and
    most keys kohya's (a stray other key is then reported by the kohya reader, by name)."""
    try:
        metadata, entries = read_safetensors_header(path)
    except (SdtuneError, OSError):
        return False  # the sdtune reader reports what is wrong with it
    if metadata.get("format", "").startswith("sdtune-adapter"):
        return False
    kohya = sum(kohya_keys_only([key]) for key in entries)
    return kohya > 0 and kohya * 2 > len(entries)


# ---------------------------------------------------------------------------------------------
# Writing


def kohya_state(modules: dict[str, dict[str, Any]], layout: KohyaLayout | None = None) -> dict:
    """A method's own kohya tensors (module name → {kohya suffix: tensor}) under their kohya keys
    (`layout.key`'s, text encoder modules too; diffusers' UNet names without a layout)."""
    state = {}
    for module, parts in modules.items():
        name = layout.key(module) if layout is not None else kohya_name(UNET_PREFIX, module)
        for suffix, tensor in parts.items():
            state[f"{name}.{suffix}"] = tensor.detach().cpu().contiguous()
    return state


def kohya_diff_state(unet, diffs: dict[tuple[str, str], Any], where: str | Path) -> tuple[dict, dict[str, str]]:
    """`.diff`/`.diff_b` (linears, convs) and `.w_norm`/`.b_norm` (norms) from ΔW ((module name,
    parameter name) → merged − base, the changed weights only) and the merged `unet`'s module types,
    named by the UNet's kohya layout (`unet`: the UNet, or the method's `models`, whose `get_submodule`
    finds the text encoders' modules too, by prefix)."""
    import torch
    from torch import nn

    layout = kohya_layout(getattr(unet, "unet", unet).config)
    state: dict[str, torch.Tensor] = {}
    for (name, attr), delta in diffs.items():
        module = unet.get_submodule(name)
        key = layout.key(name)
        if isinstance(module, (nn.Linear, nn.Conv2d)) and attr in ("weight", "bias"):
            state[f"{key}.{'diff' if attr == 'weight' else 'diff_b'}"] = delta.contiguous()
        elif isinstance(module, norm_types()) and attr in ("weight", "bias"):
            state[f"{key}.{'w_norm' if attr == 'weight' else 'b_norm'}"] = delta.contiguous()
            # LyCORIS finds a norm module by its w_norm: keep one, even when only the bias changed
            state.setdefault(f"{key}.w_norm", torch.zeros_like(module.weight, dtype=torch.float32))
        else:
            raise SdtuneError(f"{where}: the change of {name}.{attr} ({type(module).__name__}) has no kohya key")
    if not state:
        raise SdtuneError(f"{where}: the adapter does not change the base model; there is nothing to export")
    extra = {
        "ss_base_model_version": layout.base_model_version,
        "ss_network_module": "lycoris.kohya",
        "ss_network_args": json.dumps({"algo": "full"}),
    }
    return dict(sorted(state.items())), extra


def missing_diffs(unet, state: dict) -> dict[str, tuple[int, ...]]:
    """`<module>.diff` → the weight's shape, for every module of a diff `state` that has a `.diff_b`
    and no `.diff` (its bias alone changed). ComfyUI and sdtune read such a module; LyCORIS,
    AUTOMATIC1111 and InvokeAI find no update kind in it and refuse the whole file."""
    layout = kohya_layout(unet.config)
    names = {}
    for name, module in unet.named_modules():
        if name and hasattr(module, "weight") and (layout.sgm is None or layout.sgm.to_sgm(name)):
            names[layout.key(name)] = module
    missing = {}
    for key in state:
        module = key.removesuffix(".diff_b")
        if key.endswith(".diff_b") and f"{module}.diff" not in state:
            missing[f"{module}.diff"] = tuple(names[module].weight.shape)
    return missing


def with_zero_diffs(state: dict, missing: dict[str, tuple[int, ...]]) -> dict:
    """`state` with a float32 zero `.diff` for each of `missing` (`sdtune export --full-diff`)."""
    import torch

    return dict(sorted({**state, **{key: torch.zeros(shape) for key, shape in missing.items()}}.items()))


def kohya_model_hashes(state: dict, metadata: dict[str, str]) -> dict[str, str]:
    """`sshs_model_hash` and `sshs_legacy_hash`, as kohya-ss' `precalculate_safetensors_hashes` computes them for
    sd-webui-additional-networks: the SHA-256 of the safetensors bytes after the header, and the first 8 hex digits of
    the SHA-256 of 64 KiB at offset 1 MiB, of the file the tensors would make with the `ss_*` metadata alone.

    kohya-ss serialises the whole file in memory for this; here the tensors are hashed one at a time in the file's
    order, which safetensors itself gives for one-element stand-ins of the same names and dtypes, so a large export
    holds no second copy of its tensors. Files too small for that window, or whose header would not come out as the
    stand-ins' does, are serialised whole, as kohya-ss does."""
    import hashlib

    import torch
    from safetensors.torch import save

    kept = {key: value for key, value in metadata.items() if key.startswith("ss_")}
    tensors = {name: tensor.detach() for name, tensor in state.items()}
    sizes = {name: tensor.numel() * tensor.element_size() for name, tensor in tensors.items()}
    large = sum(sizes.values()) >= 0x100000 + 0x10000  # else no copy worth avoiding: no stand-ins either
    layout = _safetensors_layout(tensors, sizes, kept) if large else None
    window = (0x100000 - 8 - layout[1]) if layout else -1
    if window < 0 or 8 + layout[1] + sum(sizes.values()) < 0x100000 + 0x10000:
        data = save(state, kept)
        header = int.from_bytes(data[:8], "little")
        return {
            "sshs_model_hash": hashlib.sha256(data[8 + header :]).hexdigest(),
            "sshs_legacy_hash": hashlib.sha256(data[0x100000 : 0x100000 + 0x10000]).hexdigest()[:8],
        }
    model_hash, legacy, position = hashlib.sha256(), bytearray(), 0
    for name in layout[0]:
        raw = tensors[name].contiguous().cpu().reshape(-1).view(torch.uint8).numpy()
        model_hash.update(raw)
        low, high = max(window - position, 0), min(window + 0x10000 - position, len(raw))
        if low < high:
            legacy += raw[low:high].tobytes()
        position += len(raw)
    return {"sshs_model_hash": model_hash.hexdigest(), "sshs_legacy_hash": hashlib.sha256(legacy).hexdigest()[:8]}


def _safetensors_layout(tensors: dict, sizes: dict[str, int], metadata: dict[str, str]) -> tuple[list[str], int] | None:
    """The order safetensors writes `tensors` in and its header's length with `metadata` (None when the stand-ins'
    header is not the one this formula gives, so the caller serialises the file itself)."""
    import json

    import torch
    from safetensors.torch import save

    stand_ins = save({name: torch.zeros(1, dtype=tensor.dtype) for name, tensor in tensors.items()}, metadata)
    length = int.from_bytes(stand_ins[:8], "little")
    written = json.loads(stand_ins[8 : 8 + length])
    order = sorted((name for name in written if name != "__metadata__"), key=lambda name: written[name]["data_offsets"])

    def header_length(shapes: dict, sizes: dict) -> int:
        entries, offset = {"__metadata__": metadata}, 0  # written even when empty
        for name in order:
            entries[name] = {"dtype": written[name]["dtype"], "shape": shapes[name], "data_offsets": [offset, offset + sizes[name]]}
            offset += sizes[name]
        text = json.dumps(entries, separators=(",", ":"), ensure_ascii=False).encode()
        return len(text) + (8 - len(text) % 8) % 8

    ones = {name: [1] for name in order}
    if header_length(ones, {name: written[name]["data_offsets"][1] - written[name]["data_offsets"][0] for name in order}) != length:
        return None
    return order, header_length({name: list(tensors[name].shape) for name in order}, sizes)


def model_spec(unet_config: Mapping, scheduler_config: Mapping, vae_config: Mapping, title: str) -> dict[str, str]:
    """Stability AI's ModelSpec keys for a LoRA of the model with these configs, as kohya-ss' `sai_model_spec`
    writes them (ComfyUI, SwarmUI and model managers read the architecture from them)."""
    sdxl, v2 = is_sdxl_unet(unet_config), is_sd2_unet(unet_config)
    v_prediction = scheduler_config.get("prediction_type") == "v_prediction"
    if sdxl:
        architecture = "stable-diffusion-xl-v1-base"
    elif v2:
        architecture = "stable-diffusion-v2-768-v" if v_prediction else "stable-diffusion-v2-512"
    else:
        architecture = "stable-diffusion-v1"
    size = unet_config.get("sample_size", 64)
    size = size[0] if isinstance(size, (list, tuple)) else size
    pixels = int(size) * 2 ** (len(vae_config.get("block_out_channels", (0, 0, 0, 0))) - 1)
    return {
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": f"{architecture}/lora",
        "modelspec.implementation": "https://github.com/Stability-AI/generative-models" if sdxl else "diffusers",
        "modelspec.title": title,
        "modelspec.resolution": f"{pixels}x{pixels}",
        "modelspec.prediction_type": "v" if v_prediction else "epsilon",
    }


def write_kohya(output: Path, state: dict, info, extra: dict[str, str]) -> Path:
    """The file with kohya-ss' `ss_*` metadata (`extra`: the network's) and sdtune's own, keys sorted
    (the same adapter gives the same bytes)."""
    from .fileio import save_safetensors

    metadata = {
        "ss_base_model_version": "sd_v1",  # `extra` holds the layout's (kohya_layout)
        "ss_output_name": output.stem,
        "ss_sd_model_name": info.base_model,
        "ss_training_comment": f"exported by sdtune {__version__} from an adapter of method {info.method}",
        **extra,
        "sdtune_format": KOHYA_FORMAT,
        "sdtune_method": info.method,
        "sdtune_options": json.dumps(info.options, sort_keys=True),
        "sdtune_base_model": info.base_model,
        "sdtune_placeholder": info.placeholder,
        "sdtune_token": info.token,
        **{key: info.extra[key] for key in (CONCEPT_TOKENS,) if key in info.extra},  # several concepts' tokens
        # where training started (--init-weights, --base-adapters): kohya-ss records neither, so sdtune's own keys
        **{f"sdtune_{key}": info.extra[key] for key in (INIT_WEIGHTS_KEY, BASE_ADAPTERS_KEY) if key in info.extra},
    }
    metadata["ss_v2"] = str(metadata["ss_base_model_version"] == "sd_v2")
    if "modelspec.prediction_type" in metadata:  # kohya-ss' --v_parameterization, which model managers read too
        metadata["ss_v_parameterization"] = str(metadata["modelspec.prediction_type"] == "v")
    metadata.update(kohya_model_hashes(state, metadata))
    output.parent.mkdir(parents=True, exist_ok=True)
    save_safetensors(state, output, metadata)
    return output


# ---------------------------------------------------------------------------------------------
# Reading


def read_kohya(path: Path) -> tuple[dict[str, str], dict]:
    """Metadata and tensors, with the checks sdtune adapters get: a header checked against the file's
    size before anything is loaded, floating-point tensors only, and no NaN or infinite value."""
    metadata, entries = read_safetensors_header(path)
    check_adapter_dtypes(path, entries)
    tensors = read_tensors(path)
    bad = first_non_finite(tensors)
    if bad:
        raise SdtuneError(f"{path}: tensor {bad} holds NaN or infinite values")
    return metadata, tensors


def kohya_info(path: Path, metadata: dict[str, str]) -> AdapterInfo:
    """An AdapterInfo for a kohya-format file; sdtune's own exports carry the token and base model."""
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
        # sdtune_init_weights and sdtune_base_adapters (its export of an adapter's records) read back as those records
        extra={**metadata, **{key: metadata[f"sdtune_{key}"] for key in (INIT_WEIGHTS_KEY, BASE_ADAPTERS_KEY) if f"sdtune_{key}" in metadata}},
    )


@dataclass
class KohyaUpdate:
    """One module's ΔW and Δbias (float32, either may be None) from a kohya-format file."""

    name: str  # `text_encoder.` + the module name for the text encoder
    module: Any
    delta_weight: Any
    delta_bias: Any


@dataclass
class KohyaAdapter:
    """A kohya-format file's updates, checked against a pipeline's modules; they apply merged.

    The same strength, merge and unmerge as a method: `merge` adds scale·ΔW (and scale·Δbias) to
    the modules' weights, `unmerge` puts back the weights as they were.
    """

    info: AdapterInfo
    updates: list[KohyaUpdate]
    name: str = "kohya"
    updates_on_demand: ClassVar[bool] = False  # the file's ΔW are computed as it is read
    update_reads_weights: ClassVar[bool] = False  # fixed differences, the same on any weights
    scale: float = 1.0
    merged: bool = False
    _unmerged_weights: dict | None = None
    bundled_embeddings: dict = field(default_factory=dict)  # `bundle_emb.*` tensors (pivotal tuning), by key

    @property
    def target_names(self) -> list[str]:
        return [update.name for update in self.updates]

    def describe(self) -> str:
        return f"{self.info.method}: {len(self.target_names)} modules changed"

    def set_scale(self, scale: float) -> None:
        from .methods.base import checked_scale

        scale = checked_scale(scale)
        if self.merged:
            raise SdtuneError("kohya: merged; unmerge() before changing the scale")
        self.scale = scale

    def merge(self, keep_base: bool = True) -> None:
        import torch

        from .methods.base import copy_parameters, remember_base_samples

        if self.merged:
            return
        modules = {update.name: update.module for update in self.updates}
        remember_base_samples(modules.values())
        self._unmerged_weights = copy_parameters(modules, "cpu") if keep_base else None
        with torch.no_grad():
            for update in self.updates:
                module = update.module
                if update.delta_weight is not None:
                    module.weight += (update.delta_weight * self.scale).to(module.weight.device, module.weight.dtype)
                if update.delta_bias is not None:
                    module.bias += (update.delta_bias * self.scale).to(module.bias.device, module.bias.dtype)
        self.merged = True

    def take_update(self) -> list[tuple[Any, str, Any]]:
        """(module, parameter name, scale·ΔW) of every update, in float32 on the CPU; nothing is changed."""
        return [(module, attr, scaled()) for module, attr, scaled in self.pending_updates()]

    def pending_updates(self) -> list[tuple[Any, str, Any]]:
        """`take_update` with each update scaled when its function is called (as `Method.pending_updates`)."""
        if self.merged:
            raise RuntimeError("kohya: take_update() reads the updates of an unmerged file")
        return [
            (update.module, attr, lambda delta=delta: delta.float().cpu() * self.scale)
            for update in self.updates
            for attr, delta in (("weight", update.delta_weight), ("bias", update.delta_bias))
            if delta is not None
        ]

    def unmerge(self) -> None:
        import torch

        if not self.merged:
            return
        if self._unmerged_weights is None:
            from .methods.base import ONE_WAY_MERGE

            raise SdtuneError(f"kohya: {ONE_WAY_MERGE}")
        modules = {update.name: update.module for update in self.updates}
        with torch.no_grad():
            for (name, attr), value in self._unmerged_weights.items():
                getattr(modules[name], attr).copy_(value)
        self._unmerged_weights = None
        self.merged = False


DORA_SCALE = "dora_scale"  # DoRA's magnitude beside a LoRA, LoHa or LoKr update's factors
BIAS_DIFF = "diff_b"  # a Linear's or Conv2d's Δbias, alone or beside its weight's factors
DORA_KINDS = ("lora", "loha", "lokr")


def kohya_kind(parts: dict[str, Any], where: str) -> str:
    """Which update a module's tensors describe (`dora_scale` aside, and a `diff_b` beside LoRA, LoHa or LoKr
    factors, as ComfyUI reads it); refuses unknown or mixed names."""
    names = set(parts) - {DORA_SCALE}
    kinds = [kind for kind, known in KOHYA_KINDS.items() if names & (known - {"alpha"})]
    if len(kinds) == 2 and "diff" in kinds and "diff" not in names and set(kinds) - {"diff"} <= set(DORA_KINDS):
        kinds.remove("diff")  # the bias rides along with the weight's factors
    unknown = sorted(names - set().union(*KOHYA_KINDS.values()))
    if unknown or len(kinds) != 1:
        found = ", ".join(sorted(parts))
        raise SdtuneError(f"{where}: tensors {found} are no known update (LoRA, LoHa, LoKr, diff, norm; DoRA's dora_scale)")
    if DORA_SCALE in parts and kinds[0] not in DORA_KINDS:
        raise SdtuneError(f"{where}: dora_scale goes with a LoRA, LoHa or LoKr update, not with {kinds[0]} tensors")
    return kinds[0]


@dataclass
class KohyaModule:
    """One module's tensors in a kohya-format file, in float32, by suffix (`lora_down.weight`, `alpha`, …)."""

    tensors: dict[str, Any]
    kind: str
    where: str  # "<file>: <kohya module name>", for errors
    alpha: float | None  # the `.alpha` scalar, if the file has one

    def need(self, *names: str) -> list:
        """The named tensors; a one-line error naming those the file lacks."""
        missing = [name for name in names if name not in self.tensors]
        if missing:
            raise SdtuneError(f"{self.where}: {self.kind} update lacks {', '.join(missing)}")
        return [self.tensors[name] for name in names]


# Each reader gives (ΔW or None, Δbias or None, ΔW's natural shape or None: the weight's shape
# it must have exactly, where the kind knows it), as ComfyUI builds them.
Delta = tuple[Any, Any, "tuple[int, ...] | None"]


def read_lora(m: KohyaModule) -> Delta:
    """ΔW = up·down·alpha/rank; with `lora_mid` (Tucker), down is the 1×1 down through the k×k core."""
    import torch

    down, up = m.need("lora_down.weight", "lora_up.weight")
    rank = down.shape[0]
    if "lora_mid.weight" in m.tensors:  # Tucker core: 1x1 down, k×k mid, 1x1 up
        down = torch.einsum("abhw,bi->aihw", m.tensors["lora_mid.weight"], down.flatten(1))
    delta = up.flatten(1) @ down.flatten(1)
    scale = m.alpha / rank if m.alpha else 1.0
    return delta * scale, None, tuple(up.shape[:1]) + tuple(down.shape[1:])


def read_loha(m: KohyaModule) -> Delta:
    """ΔW = (w1a·w1b) ⊙ (w2a·w2b)·alpha/rank; with `hada_t1`/`hada_t2`, each product through its core."""
    import torch

    w1a, w1b, w2a, w2b = m.need("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")
    rank = w1b.shape[0]
    if "hada_t1" in m.tensors:
        t1, t2 = m.need("hada_t1", "hada_t2")
        m1 = torch.einsum("ijkl,jr,ip->prkl", t1, w1b, w1a)
        m2 = torch.einsum("ijkl,jr,ip->prkl", t2, w2b, w2a)
    else:
        m1, m2 = w1a @ w1b, w2a @ w2b
    scale = m.alpha / rank if m.alpha else 1.0
    return m1 * m2 * scale, None, None


def read_lokr(m: KohyaModule) -> Delta:
    """ΔW = w1 ⊗ w2 · alpha/rank, each factor full or low-rank (w2 through `lokr_t2`); scale 1 when both are full."""
    import torch

    t, dim = m.tensors, None
    if "lokr_w1" in t:
        w1 = t["lokr_w1"]
    else:
        w1a, w1b = m.need("lokr_w1_a", "lokr_w1_b")
        w1, dim = w1a @ w1b, w1b.shape[0]
    if "lokr_w2" in t:
        w2 = t["lokr_w2"]
    else:
        w2a, w2b = m.need("lokr_w2_a", "lokr_w2_b")
        dim = w2b.shape[0]
        if "lokr_t2" in t:
            w2 = torch.einsum("ijkl,ip,jr->prkl", t["lokr_t2"], w2a, w2b)
        else:
            w2 = w2a.flatten(1) @ w2b.flatten(1)
    scale = m.alpha / dim if m.alpha and dim else 1.0  # both factors full: scale 1
    if w2.ndim == 4:
        w1 = w1[:, :, None, None]
    return torch.kron(w1.contiguous(), w2.contiguous()) * scale, None, None


def read_diff(m: KohyaModule) -> Delta:
    """ΔW = `diff`, Δbias = `diff_b`, as they are."""
    delta = m.tensors.get("diff")
    return delta, m.tensors.get("diff_b"), tuple(delta.shape) if delta is not None else None


def read_norm(m: KohyaModule) -> Delta:
    """A norm layer's Δweight = `w_norm`, Δbias = `b_norm`, as they are."""
    delta = m.tensors.get("w_norm")
    return delta, m.tensors.get("b_norm"), tuple(delta.shape) if delta is not None else None


KOHYA_READERS: dict[str, Callable[[KohyaModule], Delta]] = {
    "lora": read_lora,
    "loha": read_loha,
    "lokr": read_lokr,
    "diff": read_diff,
    "norm": read_norm,
}


def decomposed_delta(weight, delta, dora_scale, where: str, module_name: str):
    """DoRA's ΔW = W' − W, W' = m·(W + ΔW)/‖W + ΔW‖ in float32 on the CPU (`dora_scale` m; `delta`: the
    low-rank ΔW in the weight's shape), the norm over each output channel for m shaped (out, 1, …), over
    each input channel for (1, in, …), as LyCORIS computes it (wd_on_output on or off)."""
    import torch

    from .methods.base import dora_weight

    base = weight.detach().float().cpu()
    ones = (1,) * (base.ndim - 2)
    m = dora_scale.float()
    with torch.no_grad():
        if tuple(m.shape) in ((base.shape[0], 1, *ones), (base.shape[0],)):
            return dora_weight(base, delta, m) - base
        if tuple(m.shape) == (1, base.shape[1], *ones):  # per input channel: the same with W's first two axes swapped
            return dora_weight(base.transpose(0, 1), delta.transpose(0, 1), m).transpose(0, 1) - base
    raise SdtuneError(
        f"{where}: dora_scale has shape {tuple(m.shape)}; {module_name}'s weight {tuple(base.shape)} wants "
        f"{(base.shape[0], 1, *ones)} (per output channel) or {(1, base.shape[1], *ones)} (per input channel)"
    )


def kohya_delta(parts: dict[str, Any], where: str) -> Delta:
    """(ΔW or None, Δbias or None, natural ΔW shape) of one module, in float32, by its kind's reader
    (DoRA's magnitude, `dora_scale`, is applied later, on the module's weight: `decomposed_delta`)."""
    kind = kohya_kind(parts, where)
    tensors = {key: value.float() for key, value in parts.items() if key != DORA_SCALE}
    alpha = tensors["alpha"].item() if "alpha" in tensors else None
    delta, delta_bias, shape = KOHYA_READERS[kind](KohyaModule(tensors, kind, where, alpha))
    return delta, tensors.get(BIAS_DIFF, delta_bias), shape


def bias_and_norm_state(key: str, module, deltas: Mapping[str, Any]) -> dict:
    """The keys of a module's bias and norm changes beside (or without) its weight's factors (`deltas`:
    parameter name → Δ): a Linear's or Conv2d's Δbias as `.diff_b` (ComfyUI reads it beside LoRA keys), a norm
    layer's Δweight and Δbias as LyCORIS' `.w_norm` and `.b_norm`, both written, the unchanged one as zeros
    (LyCORIS finds the module by w_norm, AUTOMATIC1111 wants both)."""
    import torch
    from torch import nn

    if isinstance(module, norm_types()):
        state = {f"{key}.w_norm": deltas.get("weight", torch.zeros_like(module.weight, dtype=torch.float32))}
        if module.bias is not None:
            state[f"{key}.b_norm"] = deltas.get("bias", torch.zeros_like(module.bias, dtype=torch.float32))
        return {name: tensor.contiguous() for name, tensor in state.items()}
    if isinstance(module, (nn.Linear, nn.Conv2d)) and set(deltas) == {"bias"}:
        return {f"{key}.{BIAS_DIFF}": deltas["bias"].contiguous()}
    raise SdtuneError(f"{key}: the change of {', '.join(sorted(deltas))} ({type(module).__name__}) has no kohya key")


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
    """Add a kohya-format file's updates (UNet `lora_unet_*`, text encoders `lora_te*_*`), times
    `multiplier`, to `pipeline`'s weights."""
    adapter = read_kohya_updates(path, pipeline)
    adapter.set_scale(multiplier)
    adapter.merge(keep_base=False)
    return adapter


def read_kohya_updates(path: str | Path, pipeline, rename: dict[str, str] | None = None) -> KohyaAdapter:
    """A kohya-format file's updates for `pipeline`'s UNet and text encoders, not yet added (`kohya_updates`);
    its bundled embeddings' tokens join the pipeline's (an sdtune export's under `rename`'s names where it has them)."""
    encoders = {name: getattr(pipeline, name, None) for name in ("text_encoder", "text_encoder_2")}
    updates = kohya_updates(path, pipeline.unet, {name: encoder for name, encoder in encoders.items() if encoder is not None})
    if updates.bundled_embeddings:  # embeddings bundled with the update (pivotal tuning): their tokens join the pipeline's
        add_bundled_tokens(pipeline, updates.info.extra, updates.bundled_embeddings, str(path), rename)
    return updates


def kohya_module_lookup(unet, text_encoders: Mapping[str, Any]) -> dict[str, tuple[str, str, Any]]:
    """kohya module name → (component, module name, module) for a UNet and its text encoders
    (component name → encoder), in every spelling the file may use: the UNet's diffusers and
    original names, and each text encoder's names with and without `text_model.`."""
    layout = kohya_layout(unet.config)
    sgm = layout.sgm or SgmNames(unet.config)
    lookup = {}
    for module_name, module in unet.named_modules():
        if module_name:
            lookup[kohya_name(UNET_PREFIX, module_name)] = ("unet", module_name, module)
            original = sgm.to_sgm(module_name)
            if original:
                lookup.setdefault(kohya_name(UNET_PREFIX, original), ("unet", module_name, module))
    for component, encoder in text_encoders.items():
        prefix = layout.text_encoder_prefixes.get(component)
        if prefix is None:
            continue
        for module_name, module in encoder.named_modules():
            if module_name:
                lookup[kohya_name(prefix, module_name)] = (component, module_name, module)
                if not hasattr(encoder, "text_model"):
                    # kohya names CLIP's layers as transformers 4 did, under `text_model.`
                    lookup[kohya_name(prefix, "text_model." + module_name)] = (component, module_name, module)
    return lookup


def kohya_updates(path: str | Path, unet, text_encoders: Mapping[str, Any]) -> KohyaAdapter:
    """A kohya-format file's updates for `unet` and `text_encoders` (pipeline component name, e.g.
    `text_encoder_2`, → encoder), not yet added.

    Every key is matched to a module and every ΔW checked against its weight; a key that matches
    no module, or an update whose shape does not fit, is a one-line error (naming the family a file of another
    family was made for).
    """
    path = Path(path)
    metadata, tensors = read_kohya(path)
    warn_absurd_values(path, tensors)
    bundled = {key: tensor for key, tensor in tensors.items() if key.startswith(BUNDLE_PREFIX)}  # embeddings: read_kohya_updates
    tensors = {key: tensor for key, tensor in tensors.items() if key not in bundled}
    if not kohya_keys_only(tensors):
        odd = next((key for key in tensors if not kohya_keys_only([key])), "")
        raise SdtuneError(f"{path}: key {odd!r} is not a kohya-format key (lora_unet_..., lora_te_..., lora_te1_... or lora_te2_...)")
    lookup, layout = kohya_module_lookup(unet, text_encoders), kohya_layout(unet.config)
    groups: dict[str, dict[str, Any]] = {}
    for key, tensor in tensors.items():
        lora_name, _, suffix = key.partition(".")
        groups.setdefault(lora_name, {})[suffix] = tensor

    made_for, model_is = model_family(metadata.get("ss_base_model_version", "")), model_family(layout.base_model_version)
    other_family = f"the file was made for {made_for}, this model is {model_is}" if made_for and made_for != model_is else ""
    try:
        updates = _module_updates(path, groups, lookup, layout)
    except SdtuneError as error:  # a file of another family fits nowhere: say which family it was made for
        if other_family:
            raise SdtuneError(f"{error} ({other_family})") from None
        raise
    if other_family:  # every module fits (small models can), yet its metadata names another family
        warn(f"{path}: {other_family}; its updates fit and are applied")
    return KohyaAdapter(kohya_info(path, metadata), updates, bundled_embeddings=bundled)


def model_family(base_model_version: str) -> str:
    """The model family a kohya `ss_base_model_version` names ("" where it names none)."""
    if base_model_version.startswith("sdxl"):
        return "SDXL"
    return {"sd_v1": "SD 1.x", "sd_v2": "SD 2.x"}.get(base_model_version, base_model_version)


def _module_updates(path: Path, groups: dict[str, dict[str, Any]], lookup: dict, layout: KohyaLayout) -> list:
    """Each kohya module's update (`KohyaUpdate`), checked against the module it names in `lookup`."""
    import torch

    updates, updated = [], set()
    for lora_name, parts in groups.items():
        where = f"{path}: {lora_name}"
        if lora_name not in lookup:
            prefix, prefixes = "_".join(lora_name.split("_", 2)[:2]), layout.text_encoder_prefixes.values()
            if prefix == UNET_PREFIX:
                what = "the UNet"
            elif prefix in prefixes:
                what = "the text encoder"
            else:
                what = f"this model's text encoders ({', '.join(p + '_' for p in prefixes)})"
            raise SdtuneError(f"{path}: key {lora_name}.{next(iter(parts))} matches no module of {what}")
        component, module_name, module = lookup[lora_name]
        weight, bias = getattr(module, "weight", None), getattr(module, "bias", None)
        if not isinstance(weight, torch.nn.Parameter):
            raise SdtuneError(f"{where}: {module_name} ({type(module).__name__}) has no weight to update")
        delta_weight, delta_bias, natural_shape = kohya_delta(parts, where)
        if delta_weight is not None:
            delta_weight = _fit(delta_weight, weight, natural_shape, where, module_name)
        if DORA_SCALE in parts:
            delta_weight = decomposed_delta(weight, delta_weight, parts[DORA_SCALE], where, module_name)
        if delta_bias is not None:
            if bias is None or tuple(delta_bias.shape) != tuple(bias.shape):
                have = tuple(bias.shape) if bias is not None else "no bias"
                raise SdtuneError(f"{where}: the bias update has shape {tuple(delta_bias.shape)}, {module_name} has {have}")
        name = module_name if component == "unet" else f"{component}.{module_name}"
        if id(module) in updated:
            raise SdtuneError(f"{where}: {name} is updated twice in the file (under two spellings of its name)")
        updated.add(id(module))
        updates.append(KohyaUpdate(name, module, delta_weight, delta_bias))
    return updates
