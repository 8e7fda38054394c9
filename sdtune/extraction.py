"""Any adapter as a kohya LoRA/LoCon file of a chosen rank (`sdtune extract`), as kohya-ss'
`extract_lora_from_models.py` and `resize_lora.py` make them.

Each layer's update ΔW (an sdtune adapter's, on the base weights it was trained on with its base adapters merged
first where it trained on top of some and its update reads the weights, or a kohya-format file's: `take_update`,
what stacked adapters add up) is cut to its best rank-r approximation by a truncated SVD in float32 on the CPU,
ΔW ≈ U_r·diag(S_r)·V_rᵀ (Eckart–Young: no rank-r matrix is closer in Frobenius norm; the error is √Σ of the
discarded S²). Written as kohya-ss writes an extracted LoRA: `lora_up` = U_r·diag(S_r), `lora_down` = V_rᵀ (a 3×3 conv: a k×k conv down to
r channels, a 1×1 conv up, LoCon), `.alpha` = r, so alpha/rank = 1.

r is `rank` (3×3 convs: `conv_rank`), or with `dynamic` the smallest rank that meets `threshold`
(kohya-ss' `--dynamic_method`, with `rank` the most a layer takes): `sv_fro` keeps that fraction of
‖ΔW‖_F, `sv_cumulative` that fraction of Σ S, `sv_ratio` every S within 1/threshold of the largest.
A layer never takes more than min(out, in·k²), nor more than ΔW's numerical rank (the singular values
above S₀·max(shape)·ε, as `torch.linalg.matrix_rank` counts them): a rank-4 LoRA extracted at rank 16
stays rank 4. Layers whose ΔW is zero are left out; so are changes LoRA cannot hold (biases, norm
layers), which the summary names with their share of the update, unless `keep_biases` writes the biases
exactly as `.diff_b` beside (or without) the layer's LoRA keys, as ComfyUI reads them, and `keep_norms` the
norm layers' as LyCORIS' `.w_norm`/`.b_norm` (`kohya.bias_and_norm_state`). New token embeddings the source carries
are bundled in the file as `sdtune export --format kohya` bundles them (an sdtune adapter's also written to
`NAME_emb.safetensors` beside it), exactly: they are rows, not a weight update.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from .config import ExtractConfig
from .errors import SdtuneError, said_to_caller, shell_word, warn
from .fileio import check_output_target, output_file_lock, write_text_atomic, written_together
from .models import quiet_libraries
from .version import __version__


@dataclass
class LayerExtraction:
    """One layer's low-rank approximation: the rank it took, and how much of its ΔW that keeps."""

    key: str  # the kohya module name (`lora_unet_...`, `lora_te_...`)
    module: str  # the module's name in the pipeline (`text_encoder.` + its name for a text encoder's)
    shape: list[int]  # ΔW's shape (the weight's)
    rank: int
    max_rank: int  # min(out, in·k²)
    norm: float  # ‖ΔW‖_F
    kept: float  # ‖ΔW_r‖_F / ‖ΔW‖_F = √(Σ kept S² / Σ S²)
    error: float  # ‖ΔW − ΔW_r‖_F / ‖ΔW‖_F = √(Σ discarded S² / Σ S²)


@dataclass
class ExtractResult:
    """What `extract_lora` wrote: the LoRA file, its per-layer summary, and each layer's rank and kept fraction."""

    output: Path
    summary: Path  # the per-layer JSON beside the file
    layers: list[LayerExtraction]
    relative_error: float  # ‖all discarded‖ / ‖the whole update‖, left-out changes included
    left_out: list[dict] = field(default_factory=list)  # {"module", "parameter", "norm"} of changes LoRA cannot hold
    notes: list[str] = field(default_factory=list)
    kept: list[dict] = field(default_factory=list)  # {"module", "parameter", "key", "norm"} of biases and norms written exactly

    def __post_init__(self) -> None:
        self.notes = [said_to_caller(note) for note in self.notes]  # returned to Python: settings as it spells them


def summary_path(output: str | Path) -> Path:
    """Where the per-layer summary of the LoRA file `output` goes: `<name>.extract.json` beside it."""
    output = Path(output)
    return output.with_name(output.stem + ".extract.json")


def chosen_rank(singular_values, limit: int, dynamic: str | None = None, threshold: float | None = None) -> int:
    """The rank a layer with these singular values (descending) takes: `limit`, or with `dynamic` the
    smallest that meets `threshold`, at most `limit`; at least 1."""
    import torch

    s = singular_values.double()
    if dynamic is None:
        rank = limit
    elif dynamic == "sv_ratio":  # every S within 1/threshold of the largest
        rank = int((s >= s[0] / threshold).sum())
    else:
        values = s**2 if dynamic == "sv_fro" else s
        target = threshold**2 if dynamic == "sv_fro" else threshold
        fractions = torch.cumsum(values, 0) / values.sum()
        # the first rank whose kept fraction reaches the target (a hair's tolerance for the rounding of a sum)
        rank = int(torch.searchsorted(fractions, torch.tensor(target * (1 - 1e-12), dtype=fractions.dtype))) + 1
    return max(1, min(rank, limit, len(s)))


def low_rank(delta, limit: int, dynamic: str | None = None, threshold: float | None = None):
    """(lora_up, lora_down, rank, singular values) of ΔW's best approximation within rank `limit`, in float32:
    a conv's ΔW as its (out, in·k·k) matrix, lora_down a k×k conv and lora_up a 1×1 conv."""
    import torch

    out, shape = delta.shape[0], tuple(delta.shape)
    matrix = delta.detach().float().cpu().reshape(out, -1)
    u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    tolerance = s[0] * max(matrix.shape) * torch.finfo(torch.float32).eps
    numerical = max(1, int((s > tolerance).sum()))
    rank = chosen_rank(s, min(limit, numerical), dynamic, threshold)
    up = (u[:, :rank] * s[:rank]).contiguous()
    down = vh[:rank].contiguous()
    if len(shape) == 4:
        up, down = up.reshape(out, rank, 1, 1), down.reshape(rank, *shape[1:])
    return up, down, rank, s


def named_updates(adapter, pipeline) -> list[tuple[str, object, str, object]]:
    """(module name, module, parameter name, ΔW in float32) of every change the adapter makes, ΔW on the base weights
    it meets (`take_update`, at strength 1); text encoders' modules named `<component>.<name>`. The pipeline is left
    with the weights it had."""
    updates = adapter.take_update()
    names = {id(module): name for name, module in pipeline.unet.named_modules()}
    for component in ("text_encoder", "text_encoder_2"):
        encoder = getattr(pipeline, component, None)
        if encoder is not None:
            names.update({id(module): f"{component}.{name}" for name, module in encoder.named_modules()})
    return [(names[id(module)], module, attr, delta) for module, attr, delta in updates]


@quiet_libraries()
def extract_lora(config: ExtractConfig) -> ExtractResult:
    """Write `config.source`'s update as a kohya LoRA file at `config.output` (and its summary beside it)."""
    import torch
    from torch import nn

    from .adapter import (
        adapter_info, adapter_path, base_adapters_text, load_adapters, open_adapter, recorded_base_adapters, update_reads_weights,
    )
    from .kohya import bias_and_norm_state, kohya_layout, model_spec, norm_types, write_kohya
    from .merging import quiet_diffusers
    from .models import DEFAULT_MODEL, load_pipeline
    from .safetensors_checks import first_non_finite

    config.validate()
    output, summary = Path(config.output), summary_path(config.output)
    path = adapter_path(config.source)
    info = adapter_info(path)  # the file is read and checked before any model loads
    model = config.model or info.base_model or DEFAULT_MODEL
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[config.dtype]
    bases = extraction_base_adapters(config, path, info, model)
    inputs = [path, *(adapter_path(base.path) for base in bases)]
    for target in (output, summary):
        if target.is_dir():
            raise SdtuneError(f"--output {shell_word(target)} is a folder; a LoRA is one file, give a file name")
        check_output_target(target, inputs, config.overwrite)

    with output_file_lock(output):
        for target in (output, summary):
            check_output_target(target, inputs, config.overwrite)  # again, now that no other command writes it
        with quiet_diffusers():
            pipeline = load_pipeline(model)
        reads_weights = update_reads_weights(path, info)
        if bases and reads_weights:  # merged as training merged them: ΔW is what the adapter adds on the weights they leave
            # (an update that reads no weights, a LoRA's B·A, is the same on the plain ones: no merge to wait for)
            load_adapters([base.path for base in bases], pipeline, [base.strength for base in bases])
        layout = kohya_layout(pipeline.unet.config)
        state, layers, left_out, kept, exact = {}, [], [], [], {}
        keep = {"bias": config.keep_biases, "norm": config.keep_norms}
        adapter = open_adapter(path, pipeline)
        records = recorded_base_adapters(info)
        if records and not bases and reads_weights:
            warn(f"{path} was trained on top of base adapters that are not given: {base_adapters_text(records)}; its "
                 f"{info.method} update depends on the weights it is taken on, so the LoRA is taken on the plain base weights, "
                 "not what it drew on them: give them with --base-adapters FILE:S")
        for name, module, attr, delta in named_updates(adapter, pipeline):
            if not delta.any():
                continue
            if not (attr == "weight" and isinstance(module, (nn.Linear, nn.Conv2d))):
                change = {"module": name, "parameter": attr, "norm": float(delta.double().norm())}
                kind = "norm" if isinstance(module, norm_types()) else "bias" if attr == "bias" else None
                if keep.get(kind):
                    kept.append({**change, "key": layout.key(name), "kind": kind})
                    exact.setdefault(name, (module, {}))[1][attr] = delta
                else:
                    left_out.append({**change, "kind": kind})
                continue
            conv = delta.ndim == 4 and tuple(delta.shape[2:]) != (1, 1)
            limit = config.layer_conv_rank if conv else config.rank
            up, down, rank, s = low_rank(delta, limit, config.dynamic, config.threshold)
            key = layout.key(name)
            state[f"{key}.lora_up.weight"] = up.to(dtype)
            state[f"{key}.lora_down.weight"] = down.to(dtype)
            state[f"{key}.alpha"] = torch.tensor(float(rank), dtype=dtype)  # alpha/rank = 1
            squares = s.double() ** 2
            total = float(squares.sum())
            layers.append(LayerExtraction(
                key=key, module=name, shape=list(delta.shape), rank=rank, max_rank=min(delta.shape[0], delta[0].numel()),
                norm=math.sqrt(total), kept=math.sqrt(float(squares[:rank].sum()) / total),
                error=math.sqrt(float(squares[rank:].sum()) / total),
            ))
        for name, (module, deltas) in exact.items():
            state.update({key: tensor.to(dtype) for key, tensor in bias_and_norm_state(layout.key(name), module, deltas).items()})
        if not layers and not kept:
            what = "changes only biases or norm layers, which LoRA cannot hold" if left_out else "changes nothing"
            hint = f" ({_keep_hint(left_out)})" if _keep_hint(left_out) else ""
            raise SdtuneError(f"{path}: the adapter {what}; there is no LoRA to extract{hint}")
        overflowed = first_non_finite(state)
        if overflowed:  # an update beyond fp16's 65504
            raise SdtuneError(f"{overflowed} overflows {config.dtype}; use --dtype fp32 or bf16")
        relative_error = _relative_error(layers, left_out, kept)
        kinds = {id(item): item.pop("kind") for item in left_out + kept}  # for the notes; the summary lists the keys
        notes = _notes(layers, left_out, kept, kinds)
        if bases:
            shown = ", ".join(f"{base.path} at {base.strength:g}" for base in bases)
            notes.append(f"taken on its base adapters {shown}: stack the LoRA on them at those strengths, as the adapter trained")
        result = ExtractResult(output, summary, layers, relative_error, left_out, notes, kept)
        extra = _kohya_metadata(config, info, layout, layers, relative_error, bases)
        base = dataclasses.replace(info, base_model=info.base_model or model)
        bundles, bundle_metadata, rows = carried_tokens(adapter, path, info)
        spec = model_spec(pipeline.unet.config, pipeline.scheduler.config, pipeline.vae.config, output.stem)
        from .token_embeddings import embedding_file_path, write_embedding_file

        with written_together([output, summary] + ([embedding_file_path(output)] if rows else [])):
            write_kohya(output, {**dict(sorted(state.items())), **bundles}, base, {**extra, **spec, **bundle_metadata})
            if rows:
                write_embedding_file(embedding_file_path(output), info, rows)
                result.notes.append(f"new tokens {''.join(info.new_tokens)} bundled, and in {embedding_file_path(output)}")
            write_text_atomic(summary, json.dumps(_summary(config, path, model, result, bases), indent=2) + "\n")
    return result


def extraction_base_adapters(config: ExtractConfig, path: Path, info, model: str) -> list:
    """The base adapters (config.BaseAdapter) ΔW is taken on: those given (`--base-adapters`), which must be the ones
    the adapter records it trained on top of (by digest) at their strengths, else those its run folder's config.toml
    names where the files are the ones it recorded (`sampling.found_base_adapters`, as compare and evaluate find
    them); none for an adapter trained on none. Refused, in one line and before the model loads: other files."""
    from .adapter import adapter_info, base_adapters_text, recorded_base_adapters, stacked_base_adapters
    from .sampling import found_base_adapters
    from .starting_weights import check_base_adapters

    records, given = recorded_base_adapters(info), config.base_adapter_entries
    if not given:
        return found_base_adapters(path) if records else []
    check_base_adapters(given, model)
    paths, infos = [base.path for base in given] + [str(path)], [adapter_info(base.path) for base in given] + [info]
    beneath = stacked_base_adapters(paths, infos, [base.strength for base in given] + [1.0])[0][-1]
    if len(beneath) != len(given) or len(given) != len(records):
        trained = f"was trained on top of {base_adapters_text(records)}" if records else "was trained on no base adapters"
        raise SdtuneError(f"--base-adapters: {path} {trained}; give those files at those strengths (as it records them), "
                          "or none")
    return given


def carried_tokens(adapter, path: Path, info) -> tuple[dict, dict, dict]:
    """The new token embeddings a source carries: (kohya bundles, their metadata, an sdtune adapter's rows)."""
    from .adapter import read_adapter
    from .kohya import is_kohya_file
    from .token_embeddings import KOHYA_METADATA_KEY, kohya_bundles, split_state

    if is_kohya_file(path):  # bundles pass through as the opened file holds them
        bundles = adapter.bundled_embeddings
        return bundles, {k: v for k, v in info.extra.items() if bundles and k.startswith(KOHYA_METADATA_KEY)}, {}
    if not info.new_tokens:
        return {}, {}, {}
    rows = split_state(read_adapter(path)[1])[1]
    return *kohya_bundles(info, rows, len(rows) > 1), rows


def _relative_error(layers: list[LayerExtraction], left_out: list[dict], kept: list[dict] = ()) -> float:
    """‖what the file does not hold‖ / ‖the whole update‖, over every tensor the adapter changes (`kept`: held exactly)."""
    lost = sum((layer.error * layer.norm) ** 2 for layer in layers) + sum(item["norm"] ** 2 for item in left_out)
    whole = sum(layer.norm**2 for layer in layers) + sum(item["norm"] ** 2 for item in [*left_out, *kept])
    return math.sqrt(lost / whole) if whole else 0.0


def _keep_hint(left_out: list[dict]) -> str:
    """The flags that would write these left-out changes (`kind`: bias, norm, or None for neither)."""
    flags = [flag for kind, flag in (("bias", "--keep-biases"), ("norm", "--keep-norms")) if any(item["kind"] == kind for item in left_out)]
    return f"{' and '.join(flags)} write{'s' if len(flags) == 1 else ''} them exactly" if flags else ""


def _notes(layers: list[LayerExtraction], left_out: list[dict], kept: list[dict], kinds: dict[int, str | None]) -> list[str]:
    whole = sum(layer.norm**2 for layer in layers) + sum(item["norm"] ** 2 for item in [*left_out, *kept])
    notes = []
    if left_out:
        share = math.sqrt(sum(item["norm"] ** 2 for item in left_out) / whole)
        counts = _counts([(item, kinds[id(item)]) for item in left_out], "{} biases", "{} norm layers' changes")
        others = sum(kinds[id(item)] is None for item in left_out)
        counts += [f"{others} other tensors"] if others else []
        hint = _keep_hint([{"kind": kinds[id(item)]} for item in left_out])
        notes.append(f"left out: {' and '.join(counts)}, which LoRA cannot hold: {share:.2%} of the update's norm (in the relative error)"
                     + (f"; {hint}" if hint else ""))
    if kept:
        share = math.sqrt(sum(item["norm"] ** 2 for item in kept) / whole)
        held = {kinds[id(item)] for item in kept}
        counts = _counts([(item, kinds[id(item)]) for item in kept], "{} biases as .diff_b", "{} norm layers as .w_norm/.b_norm")
        readers = [text for kind, text in (
            ("bias", "sdtune and ComfyUI read .diff_b (LyCORIS ignores it, and fails on a layer holding it alone)"),
            ("norm", "sdtune, LyCORIS and ComfyUI read .w_norm/.b_norm"),
        ) if kind in held]
        notes.append(f"kept exactly: {' and '.join(counts)}, {share:.2%} of the update's norm; {'; '.join(readers)}; "
                     "diffusers' load_lora_weights refuses the file")
    return notes


def _counts(items: list[tuple[dict, str | None]], biases: str, norms: str) -> list[str]:
    """How many Linear/Conv2d biases and how many norm layers (a layer's weight and bias count once) `items` hold."""
    bias_count = sum(kind == "bias" for _, kind in items)
    norm_count = len({item["module"] for item, kind in items if kind == "norm"})
    return [text.format(count) for count, text in ((bias_count, biases), (norm_count, norms)) if count]


def _kohya_metadata(config: ExtractConfig, info, layout, layers: list[LayerExtraction], relative_error: float,
                    bases: list = ()) -> dict[str, str]:
    """kohya-ss' `ss_*` entries as its extract and resize scripts write them, and how the file was made."""
    convs = any(len(layer.shape) == 4 and layer.shape[2:] != [1, 1] for layer in layers)
    dim = "Dynamic" if config.dynamic else str(config.rank)
    network_args = {"conv_dim": str(config.layer_conv_rank), "conv_alpha": str(float(config.layer_conv_rank))} if convs else {}
    if config.dynamic and convs:
        network_args = {"conv_dim": "Dynamic", "conv_alpha": "Dynamic"}
    how = f"--dynamic {config.dynamic} --threshold {config.threshold:g}, at most rank {config.rank}" if config.dynamic else f"rank {config.rank}"
    if convs and config.conv_rank is not None:
        how += f", 3x3 convs {config.conv_rank}"
    return {
        "ss_base_model_version": layout.base_model_version,
        "ss_network_module": "networks.lora",
        "ss_network_dim": dim,
        "ss_network_alpha": dim if config.dynamic else str(float(config.rank)),
        "ss_network_args": json.dumps(network_args),
        "ss_training_comment": f"extracted by sdtune {__version__} from an adapter of method {info.method} at {how}; "
                               f"relative error {relative_error:.4g}",
        "sdtune_extraction": json.dumps({
            "rank": config.rank, "conv_rank": config.layer_conv_rank, "dynamic": config.dynamic,
            "threshold": config.threshold, "relative_error": relative_error,
            **{flag: True for flag in ("keep_biases", "keep_norms") if getattr(config, flag)},  # absent when off: the same bytes as before
            **({"base_adapters": [{"name": Path(base.path).name, "strength": base.strength} for base in bases]} if bases else {}),
        }, sort_keys=True),
    }


def _summary(config: ExtractConfig, path: Path, model: str, result: ExtractResult, bases: list = ()) -> dict:
    ranks = [layer.rank for layer in result.layers]  # none: BitFit with --keep-biases, biases alone
    return {
        "source": str(path),
        "output": str(result.output),
        "base_model": model,
        "rank": config.rank,
        "conv_rank": config.layer_conv_rank,
        "dynamic": config.dynamic,
        "threshold": config.threshold,
        "dtype": config.dtype,
        "base_adapters": [{"path": base.path, "strength": base.strength} for base in bases],  # ΔW taken on them
        "relative_error": result.relative_error,
        "ranks": {"min": min(ranks, default=None), "max": max(ranks, default=None), "total": sum(ranks)},
        "keep_biases": config.keep_biases,
        "keep_norms": config.keep_norms,
        "layers": [dataclasses.asdict(layer) for layer in result.layers],
        "kept": result.kept,
        "left_out": result.left_out,
    }
