"""Adapters in the formats other tools load: kohya/LyCORIS, diffusers and peft (`export_adapter`).

A method offers the formats its `Method.export_formats` name; the others are refused, naming the
methods that have them.

- `kohya`: one safetensors file with the keys ComfyUI, AUTOMATIC1111 and kohya-ss/sd-scripts read,
  as LyCORIS writes them (`sdtune.kohya` describes the keys and writes the file): the method's own
  kohya tensors where it has them (`Method.kohya_tensors`: LoRA, LoHa, LoKr), otherwise (OFT among them) the
  full-weight differences ΔW = merged − base of each changed module, computed on the base model.
  A module whose bias alone changed gets `.diff_b` alone, which ComfyUI and sdtune read; with
  `full_diff` a zero `.diff` goes beside it, for LyCORIS, AUTOMATIC1111 and InvokeAI (the result's
  notes say which applies, and what the zeros cost).
- `diffusers` (LoRA): `StableDiffusionPipeline.save_lora_weights`' layout (`unet.<module>.lora_A.weight`)
  for `load_lora_weights`. alpha/rank is folded into lora_B and the LoraConfig metadata says
  lora_alpha = r, so loaders that read the metadata and older ones that do not get the same update
  (`Lora.diffusers_lora_layers`; DoRA's magnitudes go as peft names them, with `use_dora`).
- `peft` (lora, loha, lokr, oft): a folder with `adapter_config.json` (`Method.to_peft_config`) and
  `adapter_model.safetensors`, as `PeftModel.save_pretrained` writes it for a UNet wrapped in
  `PeftModel` (keys start with `base_model.model.`); a trained text encoder's the same in `text_encoder/`.

A trained text encoder (`--train-text-encoder`) is written as kohya's `lora_te_` modules (`lora_te1_`,
`lora_te2_` for two encoders) and diffusers' `text_encoder.` layers. The adapter names CLIP's layers from its
transformer (`encoder.layers.0...`); the diffusers file writes them under `text_model.`, as diffusers' own
scripts do, and lets its target pattern match them with or without it (transformers 5's CLIPTextModel has no
`text_model`, its CLIPTextModelWithProjection, SDXL's second encoder, does); a peft folder must hold the
encoder's own module names, so it takes the installed transformers' (`clip_transformer_prefix`).

Whole pipelines with the update baked in are written by `sdtune.merging`.
"""

from __future__ import annotations

import math
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from .config import EXPORT_FORMATS as FORMATS
from .config import MERGE_DTYPES, spelled_for_python
from .errors import SdtuneError, said_to_caller, shell_word, warn
from .methods.base import exact_module_pattern
from .models import quiet_libraries
from .fileio import default_mode, failures_named, human_bytes, make_temp_folder, output_file_lock, temp_path, write_folder
from .kohya import (
    is_kohya_file, kohya_diff_state, kohya_layout, kohya_state, missing_diffs, with_zero_diffs, write_kohya,
)
from .token_embeddings import (
    EMBEDDING_FILE_KEYS, TENSOR_PREFIX, embedding_file_path, kohya_bundles, split_state, write_embedding_file,
)


@dataclass
class ExportResult:
    """What `export_adapter` wrote: the file or folder, its format, how many tensors, and notes on who reads it."""

    output: Path
    format: str
    tensors: int
    notes: list[str] = field(default_factory=list)  # what the command says about the file, a line each

    def __post_init__(self) -> None:
        self.notes = [said_to_caller(note) for note in self.notes]  # returned to Python: settings as it spells them


# sdtune's settings under the names kohya-ss' train_network.py records them (`ss_*`, each value as its str())
KOHYA_TRAINING_KEYS = {
    "lr": "ss_learning_rate", "steps": "ss_max_train_steps", "batch_size": "ss_batch_size_per_device",
    "gradient_accumulation_steps": "ss_gradient_accumulation_steps", "lr_scheduler": "ss_lr_scheduler",
    "lr_warmup_steps": "ss_lr_warmup_steps", "mixed_precision": "ss_mixed_precision",
    "seed": "ss_seed", "max_grad_norm": "ss_max_grad_norm", "gradient_checkpointing": "ss_gradient_checkpointing",
    "cache_latents": "ss_cache_latents", "noise_offset": "ss_noise_offset",
    "multires_noise_iterations": "ss_multires_noise_iterations", "multires_noise_discount": "ss_multires_noise_discount",
    "snr_gamma": "ss_min_snr_gamma", "debiased_estimation": "ss_debiased_estimation",
    "clip_skip": "ss_clip_skip", "max_token_length": "ss_max_token_length", "loss_type": "ss_loss_type", "huber_schedule": "ss_huber_schedule", "huber_c": "ss_huber_c",
    "zero_terminal_snr": "ss_zero_terminal_snr",
    "input_perturbation": "ss_ip_noise_gamma", "prior_loss_weight": "ss_prior_loss_weight",
    "caption_dropout": "ss_caption_dropout_rate", "shuffle_caption": "ss_shuffle_caption", "keep_tokens": "ss_keep_tokens",
    "caption_tag_dropout": "ss_caption_tag_dropout_rate",
    "random_flip": "ss_flip_aug", "buckets": "ss_enable_bucket",
}


def training_metadata(path: Path, info, native_resolution: str | None = None) -> dict[str, str]:
    """kohya-ss' training keys for the adapter file `path` (`info`: its header), as train_network.py writes them
    and AUTOMATIC1111's and Forge's LoRA metadata view and LoRA managers show them: the steps it was saved at, and
    the run's settings where its config.toml lies beside it (`native_resolution`, modelspec's "WxH": the size of a run
    that set none). Only settings sdtune has: no epochs or repeats."""
    from dataclasses import MISSING, fields
    from types import SimpleNamespace

    from .captions import TRAINING_IMAGES_KEYS
    from .config import TrainConfig, read_toml
    from .methods import method_class
    from .optimizers import kohya_optimizer_name

    step = str(info.extra.get("step", ""))
    metadata = {"ss_steps": step} if step.isdigit() else {}
    # the images it was trained on, as the adapter recorded them
    recorded = {kohya: info.extra[name] for name, kohya in TRAINING_IMAGES_KEYS.items() if name in info.extra}
    metadata.update(recorded)
    if not (path.parent / "config.toml").is_file():
        return metadata
    saved = read_toml(path.parent / "config.toml")
    defaults = {f.name: f.default for f in fields(TrainConfig) if f.default is not MISSING}
    settings = {**defaults, **{name: value for name, value in saved.items() if name in defaults}}
    metadata.update({key: str(settings[name]) for name, key in KOHYA_TRAINING_KEYS.items()})
    metadata["ss_unet_lr"] = metadata["ss_learning_rate"]
    weight_decay = method_class(info.method).weight_decay
    metadata["ss_optimizer"] = kohya_optimizer_name(SimpleNamespace(**settings), weight_decay)
    metadata["ss_total_batch_size"] = str(settings["batch_size"] * settings["gradient_accumulation_steps"])
    if info.extra.get("base_model_family") == "sdxl":  # SDXL reads its penultimate layers by design: kohya-ss writes None
        metadata["ss_clip_skip"] = "None"
    if settings["train_text_encoder"]:
        text_lr = settings["text_encoder_lr"]
        text_lr = settings["lr"] if text_lr is None else text_lr
        second_lr = settings["text_encoder_2_lr"]
        # SDXL's two rates as kohya's list of them
        metadata["ss_text_encoder_lr"] = str(text_lr if second_lr is None else [text_lr, second_lr])
    if settings["resolution"]:
        metadata["ss_resolution"] = str((settings["resolution"], settings["resolution"]))  # kohya's (width, height)
    elif native_resolution:  # trained at the model's own size (modelspec's "WxH")
        width, height = native_resolution.split("x")
        metadata["ss_resolution"] = str((int(width), int(height)))
    if not settings["dataset"] and not recorded:
        metadata.update(_training_images_metadata(TrainConfig, settings))
    return metadata


def _training_images_metadata(config_class, settings: dict) -> dict[str, str]:
    """For an adapter saved before adapters recorded their images: kohya-ss' `ss_tag_frequency`, `ss_dataset_dirs`
    and `ss_num_train_images` from the concept images the run's settings name, read again now; nothing where they
    are no longer there."""
    from .captions import TRAINING_IMAGES_KEYS, training_images_record
    from .training import concept_inputs

    try:
        found = concept_inputs(config_class(**settings))
    except (SdtuneError, OSError, TypeError, ValueError):
        return {}
    record = training_images_record([path for path, _, _ in found], [prompt for _, prompt, _ in found])
    return {TRAINING_IMAGES_KEYS[name]: value for name, value in record.items()}


@spelled_for_python("export")
def export_adapter(
    source: str | Path, format: str, output: str | Path, model: str | None = None, full_diff: bool = False,
    overwrite: bool = False, dtype: str = "fp32",
) -> ExportResult:
    """Write the sdtune adapter `source` (file or run folder) in another `format` to `output`.

    `dtype` (fp32, fp16, bf16): the written tensors' (a new token file's stay fp32). `model` overrides the base model that diff-style kohya exports compute ΔW on, and whose UNet
    config decides kohya key names (`kohya_layout`: SDXL's are the original model's) (default: the
    adapter's own base model). `full_diff` (kohya diffs): a zero `.diff` beside every `.diff_b` whose
    module's weight did not change, so that LyCORIS, AUTOMATIC1111 and InvokeAI read the file too.
    The method's export warnings (`Method.export_warnings`) are issued as Python warnings. An
    existing `output` is refused unless `overwrite`; one that is, or holds, the adapter is refused always.
    """
    from . import methods
    from .adapter import adapter_path, read_adapter
    from .fileio import check_output_target

    if format not in FORMATS:
        raise SdtuneError(f"--format {format!r} is not available; choose: {', '.join(FORMATS)}")
    if full_diff and format != "kohya":
        raise SdtuneError(f"--full-diff applies to --format kohya, not {format}")
    if dtype not in MERGE_DTYPES:
        raise SdtuneError(f"--dtype {dtype!r} is not available; choose: {', '.join(MERGE_DTYPES)}")
    output = Path(output)
    path = adapter_path(source)
    check_output_target(output, [path], overwrite)
    if is_kohya_file(path):
        raise SdtuneError(f"{path} already is a kohya-format file; export takes sdtune adapters")
    info, tensors = read_adapter(path)
    tensors, token_rows = split_state(tensors)  # new token embeddings: bundled (kohya) or a file beside
    method = methods.create(info.method, **info.options)
    if format not in method.export_formats:
        raise SdtuneError(_not_available(format, method))
    base_model = model or info.base_model
    # the base model's configs, read once for all the export asks of them (a hub id's are fetched, else read from
    # its cache); where they cannot be read, why not
    configs, unread = _read_configs(base_model) if method.needs_base_layers or format == "kohya" else (None, "")
    if method.needs_base_layers and configs is not None:  # what the tensors do not tell (which layers are 3x3 convs): the UNet config's shapes
        method.read_base_layers(_meta_unet(configs))
    if format in ("kohya", "diffusers"):
        _check_file_target(output)

    own = method.kohya_tensors(tensors) if format == "kohya" else None
    if own is not None and full_diff:
        raise SdtuneError(
            f"--full-diff applies to kohya files of full-weight differences; a {method.name} adapter is written "
            "as its own kohya tensors, which need no .diff"
        )
    for message in method.export_warnings(format, tensors):
        warn(message)

    with output_file_lock(output):
        check_output_target(output, [path], overwrite)  # again, now that no other command writes it
        if format == "kohya":
            layout, spec, notes = _kohya_layout_of(base_model, configs, unread, output.stem)
            if own is not None:
                if model and model != info.base_model and configs is not None:  # the file's names and metadata come from it
                    _check_fits(path, info, tensors, model, configs)
                modules, extra = own
                state, missing = kohya_state(modules, layout), None
                extra = {**extra, "ss_base_model_version": layout.base_model_version}
            else:
                models, diffs = _diffs_on_base_model(path, base_model, configs)
                state, extra = kohya_diff_state(models, diffs, path)
                missing = missing_diffs(models.unet, state)
                if full_diff:
                    state = with_zero_diffs(state, missing)
            bundles, bundle_metadata = kohya_bundles(info, token_rows, len(token_rows) > 1) if token_rows else ({}, {})
            trained = training_metadata(path, info, spec.get("modelspec.resolution"))
            if "ss_resolution" in trained:  # kohya-ss' modelspec.resolution is the training resolution too
                spec = {**spec, "modelspec.resolution": "x".join(re.findall(r"\d+", trained["ss_resolution"]))}
            write_kohya(output, in_dtype({**state, **bundles}, dtype), info, {**trained, **extra, **spec, **bundle_metadata})
            if missing is not None:
                notes = _full_diff_notes(missing, state, full_diff, output.stat().st_size)
            # only a LoRA's file is one diffusers would otherwise load
            bundled = [_bundle_note(output)] if bundles and "diffusers" in method.export_formats else []
            return ExportResult(output, format, len(state) + len(bundles), notes + _write_token_file(output, info, token_rows) + bundled)
        if format == "diffusers":
            count = write_diffusers_lora(output, method, tensors, info.text_encoders, dtype)
            return ExportResult(output, format, count, _write_token_file(output, info, token_rows))
        count = write_peft_folder(output, method, info, tensors, overwrite, dtype)
        return ExportResult(output, format, count, _write_token_file(output, info, token_rows, folder=True))


def in_dtype(state: dict, dtype: str) -> dict:
    """`state` with its floating tensors in `dtype` (fp32: as they are); refused where a value overflows it."""
    if dtype == "fp32":
        return state
    import torch

    from .precision import DTYPE_NAMES
    from .safetensors_checks import first_non_finite

    kind = getattr(torch, DTYPE_NAMES[dtype])
    cast = {key: tensor.to(kind) if tensor.is_floating_point() else tensor for key, tensor in state.items()}
    overflowed = first_non_finite(cast)
    if overflowed:  # an update beyond fp16's 65504
        raise SdtuneError(f"{overflowed} overflows {dtype}; export with --dtype fp32 or bf16")
    return cast


def _write_token_file(output: Path, info, rows: dict, folder: bool = False) -> list[str]:
    """The new tokens' embedding file beside the exported file (in the exported `folder`), and the note that says how
    to load it."""
    if not rows:
        return []
    path = embedding_file_path(output, folder)
    write_embedding_file(path, info, rows)
    encoders = [k.removeprefix(TENSOR_PREFIX) for k in rows]
    keys = [EMBEDDING_FILE_KEYS[encoder] for encoder in encoders]
    # each key goes into its own encoder and tokenizer, as the advanced scripts' model cards load them
    loads = "; ".join(
        f'pipe.load_textual_inversion(state["{key}"], token={list(info.new_tokens)}, text_encoder=pipe.{encoder}, '
        f"tokenizer=pipe.{encoder.replace('text_encoder', 'tokenizer')})"
        for encoder, key in zip(encoders, keys)
    )
    return [
        f"token embeddings of {''.join(info.new_tokens)}: {path} ({', '.join(keys)}); diffusers: state = "
        f"load_file(\"{path}\"); {loads}"
    ]


def _bundle_note(output: Path) -> str:
    """What diffusers makes of a kohya file with bundled token embeddings."""
    return (
        f"diffusers' load_lora_weights refuses a file with bundle_emb keys (it takes LoRA keys alone): give it "
        f"{output.name} without them, or export --format diffusers, and load the tokens from {embedding_file_path(output).name}"
    )


def _read_configs(model: str):
    """(`model`'s configs, "") or, where they cannot be read, (None, why not)."""
    from .models import read_model_configs

    try:
        return read_model_configs(model), ""
    except SdtuneError as error:
        return None, str(error)


def _kohya_layout_of(model: str, configs, unread: str, title: str):
    """The kohya layout of `model` from its UNet config (`configs`; SDXL's names differ), its ModelSpec keys
    (`kohya.model_spec`, the file's `title`), and a note where the configs could not be read (`unread` says why): then
    SD 1.x/2.x's names, as before sdtune knew SDXL's, and no ModelSpec keys."""
    from .kohya import model_spec

    if configs is not None:
        return kohya_layout(configs.unet), model_spec(configs.unet, configs.scheduler, configs.vae, title), []
    return kohya_layout({}), {}, [
        f"the UNet config of {model} could not be read ({unread}); the keys use SD 1.x/2.x's (diffusers') "
        "module names, where kohya-ss' SDXL loader wants the original model's; --model names a base model to read"
    ]


def _meta_unet(configs):
    """The UNet of a model's `configs` on the meta device (its architecture, no weights)."""
    import torch
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        return UNet2DConditionModel.from_config(configs.unet)


def _check_fits(path: Path, info, tensors: dict, model: str, configs) -> None:
    """Refuse a `--model` (its `configs`) whose UNet does not hold the adapter's UNet tensors (names and shapes, from an
    injection on the meta device): its kohya names and metadata would describe another model (an SDXL LoRA as SD 2.x's)."""
    from .adapter import expected_shapes
    from .methods.base import check_state_names, check_state_shapes

    unet = _meta_unet(configs)
    shapes = expected_shapes(info.method, info.options, unet)
    found = {key: tuple(tensor.shape) for key, tensor in tensors.items() if key.partition(".")[0] not in info.text_encoders}
    what = f"adapter {path} (trained on base model {info.base_model!r}), on --model {shell_word(model)},"
    check_state_names(shapes, found, what)
    check_state_shapes(shapes, found, what)


def _full_diff_notes(missing: dict[str, tuple[int, ...]], state: dict, full_diff: bool, file_bytes: int) -> list[str]:
    """What a full-weight-difference kohya file holds for the loaders that want a `.diff` in every module."""
    zeros = human_bytes(sum(math.prod(shape) for shape in missing.values()) * 4)
    if not missing:
        return ["--full-diff: every changed module has its .diff already; the file is the same as without it"] if full_diff else []
    if full_diff:
        return [f"--full-diff: {len(missing)} zero .diff tensors beside .diff_b ones, {zeros} of the file's "
                f"{human_bytes(file_bytes)}; LyCORIS, AUTOMATIC1111 and InvokeAI read it too"]
    modules = len({key.partition(".")[0] for key in state})
    return [
        f"{len(missing)} of {modules} modules changed their bias alone and carry .diff_b without .diff: ComfyUI and "
        f"sdtune read this file, LyCORIS, AUTOMATIC1111 and InvokeAI refuse it; --full-diff adds a zero .diff "
        f"beside each for them ({zeros} more)"
    ]


def _not_available(format: str, method) -> str:
    """Why `method` cannot be written in `format`: which methods can, and what this one can instead."""
    from . import methods

    having = [name for name in methods.available() if format in methods.method_class(name).export_formats]
    if len(having) == 1:
        holds = methods.method_class(having[0]).summary.split(":")[0]  # its name as its summary writes it
    else:
        holds = f"{format} methods ({', '.join(having)})"
    instead = [f"--format {other}" for other in method.export_formats]
    if len(instead) == 1:
        instead.append("`sdtune merge`")
    return f"--format {format} holds {holds}, not {method.name}; use {' or '.join(instead)}"


def _check_file_target(output: Path) -> None:
    if output.is_dir():
        raise SdtuneError(f"--output {shell_word(output)} is a folder; this format is one file, give a file name")


@quiet_libraries()
def _diffs_on_base_model(path: Path, model: str, configs=None):
    """The base model's UNet (and tuned text encoders: the method's `models`) with the adapter merged in,
    and ΔW of every weight the merge changed; `configs`: the model's, where already read."""
    from .adapter import open_adapter
    from .models import load_pipeline

    method = open_adapter(path, load_pipeline(model, configs=configs))
    return method.models, method.weight_diffs()


def tensors_by_model(tensors: dict, encoders: tuple[str, ...] | list[str]) -> dict[str, dict]:
    """An adapter's tensors split by the model they belong to: "unet", then each text encoder's (keys
    without the `<encoder>.` prefix)."""
    parts: dict[str, dict] = {"unet": {}, **{encoder: {} for encoder in encoders}}
    for key, tensor in tensors.items():
        prefix, _, rest = key.partition(".")
        if prefix in encoders:
            parts[prefix][rest] = tensor
        else:
            parts["unet"][key] = tensor
    return parts


@quiet_libraries()  # the pipelines' import pulls in transformers' image processors, which announce missing backends
def write_diffusers_lora(output: Path, method, tensors, encoders: tuple[str, ...] = (), dtype: str = "fp32") -> int:
    """`unet.<module>.lora_A/B.weight` (and `text_encoder.<module>...` for a trained text encoder) through
    diffusers' own writer, as the method gives them."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    arguments = {}
    for part, own in tensors_by_model(tensors, encoders).items():
        layers, metadata = method.diffusers_lora_layers(own, part)
        if part != "unet":
            # under `text_model.` as diffusers' scripts write them; the pattern takes either nesting, since
            # diffusers injects by it into the encoder as built (and maps the keys onto it itself)
            layers = {CLIP_TRANSFORMER + key: tensor for key, tensor in layers.items()}
            metadata = {**metadata, "target_modules": exact_module_pattern(peft_module_names(own), CLIP_TRANSFORMER)}
        arguments[f"{part}_lora_layers"], arguments[f"{part}_lora_adapter_metadata"] = in_dtype(layers, dtype), metadata
    writer = StableDiffusionXLPipeline if "text_encoder_2" in encoders else StableDiffusionPipeline
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(output)
    try:
        with failures_named(output):
            make_temp_folder(tmp)
            writer.save_lora_weights(tmp, weight_name=output.name, **arguments)
            written = tmp / output.name
            os.chmod(written, default_mode())
            os.replace(written, output)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return len(tensors)


CLIP_TRANSFORMER = "text_model."  # where transformers 4 put CLIP's transformer in every text encoder class


def clip_transformer_prefix(encoder: str) -> str:
    """The path of CLIP's transformer in `encoder` (a pipeline's `text_encoder`, `text_encoder_2`) as the
    installed transformers builds it: "" where its layers sit at the model's top (transformers 5's
    CLIPTextModel), `text_model.` otherwise (CLIPTextModelWithProjection, SDXL's second encoder; transformers 4's
    both). SD and SDXL pipelines hold a CLIPTextModel as `text_encoder`, a CLIPTextModelWithProjection as
    `text_encoder_2`; a one-layer model of the class on the meta device tells, weightless."""
    import torch
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    model_class = CLIPTextModelWithProjection if encoder == "text_encoder_2" else CLIPTextModel
    config = CLIPTextConfig(vocab_size=8, hidden_size=8, intermediate_size=8, num_hidden_layers=1,
                            num_attention_heads=1, max_position_embeddings=8, projection_dim=8,
                            bos_token_id=0, eos_token_id=1, pad_token_id=1)
    with torch.device("meta"):
        model = model_class(config)
    return CLIP_TRANSFORMER if hasattr(model, CLIP_TRANSFORMER.rstrip(".")) else ""


def peft_module_names(tensors) -> list[str]:
    """The modules a peft adapter's tensors belong to, in order. peft names a tensor `<module>.<adapter
    parameter>`, then `.weight` (or `.bias`) where that parameter is a layer (LoRA's lora_A, lora_B)."""
    modules = {key.removesuffix(".weight").removesuffix(".bias").rpartition(".")[0]: None for key in tensors}
    return list(modules)


def write_peft_folder(output: Path, method, info, tensors, overwrite: bool = False, dtype: str = "fp32") -> int:
    """adapter_config.json (the method's own peft config) + adapter_model.safetensors; a trained text
    encoder's in a subfolder of its name (`text_encoder/`), for `PeftModel.from_pretrained` on it."""
    from safetensors.torch import save_file

    def fill(folder: Path) -> None:
        for part, own in tensors_by_model(tensors, info.text_encoders).items():
            where = folder if part == "unet" else folder / part
            prefix = "" if part == "unet" else clip_transformer_prefix(part)  # peft loads only its exact names
            config = method.to_peft_config([prefix + name for name in peft_module_names(own)])
            config.base_model_name_or_path = info.base_model
            config.inference_mode = True
            config.save_pretrained(str(where))
            state = in_dtype({f"base_model.model.{prefix}{key}": tensor.contiguous() for key, tensor in own.items()}, dtype)
            save_file(state, str(where / "adapter_model.safetensors"), metadata={"format": "pt"})

    write_folder(output, fill, overwrite)
    return len(tensors)
