"""Adapter files: one safetensors file that is enough to rebuild a method on the right base model.

The file holds the method's tensors; its metadata (strings, as safetensors requires) holds the
method name and options, the base model's id, a fingerprint of the targeted layers' shapes and
weights, and the concept's placeholder and token.
"""

from __future__ import annotations

import base64
import contextlib
import json
import math
import os
import re
import threading
import time
from pathlib import Path
from typing import Any

from .adapter_info import BASE_ADAPTERS_KEY, INIT_WEIGHTS_KEY, AdapterInfo
from .errors import SdtuneError, TrainingFailed, warn
from .fileio import save_safetensors
from .kohya import is_kohya_file, kohya_info, read_kohya, read_kohya_updates
from .safetensors_checks import (
    TensorEntry, check_adapter_dtypes, first_non_finite, read_safetensors_header, read_tensors, warn_absurd_values,
)
from .version import __version__

DIGEST_WHOLE = 64 * 2**20  # adapters up to this size are hashed whole
DIGEST_WINDOWS, DIGEST_WINDOW = 64, 2**20  # larger ones (a full fine-tune's UNet) by this many evenly spaced windows
DIGESTS_KEPT = 1024  # file versions whose digest is remembered at most, the oldest forgotten first
# a file changed more recently than this is hashed again on every call: a rewrite in place of the same size within
# the file system's time granularity (a second, two on FAT) would keep its size, times and inode
DIGEST_SETTLED_S = 2.0

ADAPTER_FILE = "adapter.safetensors"
EMA_ADAPTER_FILE = "adapter-ema.safetensors"  # the moving average of the trained weights (--ema-decay)
# each --save-every save before the last, kept beside adapter.safetensors: adapter-step-000200.safetensors (and
# adapter-ema-step-000200.safetensors); six digits at least, so that a run's saves sort by step
STEP_ADAPTER = re.compile(r"^adapter(-ema)?-step-(\d+)\.safetensors$")
STEP_DIGITS = 6
FORMAT = "sdtune-adapter/1"
PICKLE_SUFFIXES = {".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle"}
REQUIRED_METADATA = ("method", "options", "base_model", "fingerprint", "structure", "weight_sample")
# a key of diffusers' own LoRA layout (`sdtune export --format diffusers`, diffusers' training scripts)
DIFFUSERS_LORA_KEY = re.compile(r"^(unet|text_encoder|text_encoder_2)\..+\.(lora_[AB]\.weight|lora_magnitude_vector)$")
KNOWN_METADATA = {"format", "sdtune_version", *REQUIRED_METADATA, "placeholder", "token", "text_encoders", "token_embeddings"}


def step_adapter_name(step: int, ema: bool = False) -> str:
    """The file name of a run's save at `step` (the EMA's with `ema`)."""
    return f"adapter{'-ema' if ema else ''}-step-{step:0{STEP_DIGITS}d}.safetensors"


def step_adapters(folder: Path) -> list[tuple[int, Path]]:
    """A run folder's step files (adapter-step-N and adapter-ema-step-N), as (step, path), by step."""
    found = [(int(match.group(2)), path) for path in folder.glob("adapter*-step-*.safetensors")
             if (match := STEP_ADAPTER.match(path.name)) and path.is_file()] if folder.is_dir() else []
    return sorted(found, key=lambda each: (each[0], each[1].name))


def saved_step(path: Path) -> int | None:
    """The step of a run's step file (adapter-step-N or adapter-ema-step-N), None for any other file."""
    match = STEP_ADAPTER.match(path.name)
    return int(match.group(2)) if match else None


def outputs_suffix(adapter: Path) -> str:
    """What the folders and files drawn or measured from an adapter add to their names so that a run's step files'
    never meet its adapter.safetensors' ("-step-000200" for adapter-step-000200.safetensors; "" for any other)."""
    return adapter.stem[len("adapter"):] if STEP_ADAPTER.match(adapter.name) else ""


def adapter_path(path: str | Path) -> Path:
    """The adapter file for a file path or a run folder; pickle-based formats are refused."""
    if not isinstance(path, (str, os.PathLike)):
        raise SdtuneError(f"an adapter is a file or run folder path, got {path!r}")
    path = Path(path)
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise SdtuneError(
            f"{path}: {path.suffix} files are pickles, which can run code when loaded; "
            "sdtune reads adapters only as safetensors"
        )
    folder = path if path.is_dir() else None
    if folder is not None:
        path = path / ADAPTER_FILE
    if not path.is_file():
        why = missing_adapter_reason(folder) if folder is not None else kept_saves_reason(path)
        raise SdtuneError(f"adapter not found: {path}" + (f" ({why})" if why else ""))
    return path


def kept_saves_reason(path: Path) -> str:
    """For a missing step file (a save --keep-saves pruned, or a step never saved): the run's step files there are."""
    if not STEP_ADAPTER.match(path.name):
        return ""
    try:
        kept = sorted(entry.name for entry in path.parent.iterdir() if STEP_ADAPTER.match(entry.name))
    except OSError:
        return ""
    return f"the run's step files: {', '.join(kept)}" if kept else "the run holds no step files"


def training_holder(path: Path) -> tuple[int, str] | None:
    """(pid, host) of the live process that holds the run folder's lock (a training run), or None."""
    from .fileio import LOCK_FILE, holder_alive, read_holder

    try:
        fd = os.open(path / LOCK_FILE, os.O_RDONLY)  # read, never locked: a run starting now must not be refused
    except OSError:
        return None
    try:
        holder = read_holder(fd)
    finally:
        os.close(fd)
    return holder if holder_alive(holder) else None


def unfinished_run(path: Path, adapter_step: str) -> str:
    """"" for a run whose adapter is of its last step; else its step of the run's --steps, and whether a
    training process holds the folder now (its lock's holder alive) or the run stopped early."""
    from .config import read_toml

    try:
        steps, step = read_toml(path / "config.toml").get("steps"), int(adapter_step)
    except (SdtuneError, ValueError):  # no config.toml, or an adapter without its step: nothing to tell
        return ""
    if not isinstance(steps, int) or step >= steps:
        return ""
    holder = training_holder(path)
    where = f"training now (pid {holder[0]} on {holder[1]})" if holder else "stopped early"
    return f"step {step} of {steps}, {where}"


def missing_adapter_reason(path: Path) -> str:
    """Why a folder without an adapter has none, where it tells: its sweep run failed, or it is training now."""
    from .fileio import read_json

    holder = training_holder(path)
    if holder:
        return f"it is training now (pid {holder[0]} on {holder[1]}) and has saved no adapter yet"
    if (path / "adapter_config.json").is_file():
        return ("it is a peft adapter folder, as `sdtune export --format peft` writes, which sdtune does not read: load it "
                "with peft's PeftModel.from_pretrained, or give the run folder or a kohya export")
    try:
        marker = read_json(path / "sweep-run.json")
    except (SdtuneError, OSError):  # a damaged or unreadable marker tells nothing
        marker = None
    if isinstance(marker, dict) and marker.get("state") == "failed":
        return f"its sweep run failed: {marker.get('error', 'no reason recorded')}"
    return ""


def adapter_bytes(method) -> int:
    """About the room an adapter of this injected method needs: its tensors, twice (an atomic
    rewrite keeps the previous file until the new one is complete)."""
    return 2 * sum(t.numel() * t.element_size() for t in method.state_dict().values())


def save_adapter(path: str | Path, method, base_model: str, placeholder: str = "", token: str = "",
                 token_embeddings: tuple[list[str], dict] | None = None, **extra: str) -> Path:
    """Write the method's state and metadata to `path` atomically; with `token_embeddings` (the new tokens, each
    text encoder's rows: token_embeddings.trained_rows) those too."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    metadata = {
        "format": FORMAT,
        "sdtune_version": __version__,
        "method": method.name,
        "options": json.dumps(method.options_dict(), sort_keys=True),
        "base_model": base_model,
        "fingerprint": method.base_fingerprint or "",
        "structure": method.base_structure or "",
        "weight_sample": base64.b64encode(method.base_sample.numpy().astype("<f4").tobytes()).decode(),
        "placeholder": placeholder,
        "token": token,
        "num_parameters": str(method.num_parameters()),
        **{k: str(v) for k, v in extra.items()},
    }
    if method.text_encoders:  # only then: adapters of the UNet alone keep their bytes
        metadata["text_encoders"] = ",".join(method.text_encoders)
    state = {k: v.detach().cpu().contiguous() for k, v in method.state_dict().items()}
    if token_embeddings:  # only then: adapters without new tokens keep their bytes
        from .token_embeddings import METADATA_KEY

        tokens, rows = token_embeddings
        metadata[METADATA_KEY] = json.dumps(list(tokens))
        metadata["num_parameters"] = str(method.num_parameters() + sum(r.numel() for r in rows.values()))
        state.update(rows)
    bad = first_non_finite(state)
    if bad:
        raise TrainingFailed(f"tensor {bad} holds NaN or infinite values; {path} not written")
    save_safetensors(state, path, metadata)  # atomic, and the same bytes for the same adapter
    return path


def read_adapter_info(path: str | Path) -> tuple[AdapterInfo, dict[str, TensorEntry]]:
    """What an sdtune adapter file says about itself and its tensors, checked; no tensor is loaded."""
    from . import methods

    path = adapter_path(path)
    metadata, entries = read_safetensors_header(path)
    if metadata.get("format") != FORMAT:
        if entries and all(DIFFUSERS_LORA_KEY.match(key) for key in entries):
            raise SdtuneError(f"{path}: a diffusers-format LoRA (as `sdtune export --format diffusers` writes), which sdtune does "
                              "not read: load it with diffusers' pipe.load_lora_weights, or give the run folder or a kohya export")
        raise SdtuneError(f"{path}: not an sdtune adapter (no '{FORMAT}' metadata)")
    missing = [key for key in REQUIRED_METADATA if key not in metadata]
    if missing:
        raise SdtuneError(f"{path}: damaged sdtune adapter metadata (no {', '.join(missing)})")
    if metadata["method"] not in methods.available():
        raise SdtuneError(
            f"{path}: made with method {metadata['method']!r}, which this sdtune does not have "
            f"({', '.join(methods.available())})"
        )
    try:
        options = json.loads(metadata["options"])
        sample = base64.b64decode(metadata["weight_sample"], validate=True)
    except ValueError as error:
        raise SdtuneError(f"{path}: damaged sdtune adapter metadata ({str(error).splitlines()[0][:120]})") from None
    if not isinstance(options, dict):
        raise SdtuneError(f"{path}: damaged sdtune adapter metadata (options are not a JSON object)")
    try:
        methods.create(metadata["method"], **options)
    except SdtuneError as error:
        raise SdtuneError(f"{path}: unusable method options: {error}") from None
    if len(sample) % 4:
        raise SdtuneError(f"{path}: damaged sdtune adapter metadata (weight_sample is not float32 values)")
    if not metadata.get("num_parameters", "0").isdecimal():  # compare and evaluate report it as a count
        raise SdtuneError(f"{path}: damaged sdtune adapter metadata (num_parameters {metadata['num_parameters']!r} is not a count)")
    check_adapter_dtypes(path, entries)
    from .token_embeddings import read_token_list

    new_tokens = read_token_list(path, metadata, entries)
    info = AdapterInfo(
        method=metadata["method"],
        options=options,
        base_model=metadata["base_model"],
        fingerprint=metadata["fingerprint"],
        structure=metadata["structure"],
        weight_sample=sample,
        placeholder=metadata.get("placeholder", ""),
        token=metadata.get("token", ""),
        text_encoders=tuple(name for name in metadata.get("text_encoders", "").split(",") if name),
        new_tokens=new_tokens,
        extra={k: v for k, v in metadata.items() if k not in KNOWN_METADATA},
    )
    return info, entries


def read_adapter(path: str | Path):
    """(AdapterInfo, tensors) from an sdtune adapter file; refuses anything else."""
    info, _ = read_adapter_info(path)
    return info, read_tensors(adapter_path(path))


def expected_shapes(method_name: str, options: dict[str, Any], unet, text_encoders=()) -> dict[str, tuple[int, ...]]:
    """The shape of every tensor the method's state holds on `unet` (and `text_encoders`), from an
    injection into copies of their architectures on the meta device: no memory is allocated, and the
    models are left untouched."""
    import torch

    from . import methods
    from .methods.base import text_encoder_layers

    with torch.device("meta"):
        skeleton = type(unet).from_config(unet.config)
        encoders = [type(layers)(layers.config) for layers in map(text_encoder_layers, text_encoders)]
    method = methods.create(method_name, **options)
    method.inject(skeleton, encoders)
    return {key: tuple(tensor.shape) for key, tensor in method.state_dict().items()}


def trained_text_encoders(path: Path, info: AdapterInfo, pipeline) -> list:
    """The pipeline's text encoders that the adapter trained, in order; refused where it has fewer."""
    from .methods.base import text_encoder_prefix
    from .models import text_encoders

    available = {text_encoder_prefix(i): encoder for i, encoder in enumerate(text_encoders(pipeline))}
    missing = [name for name in info.text_encoders if name not in available]
    if missing or list(info.text_encoders) != list(available)[: len(info.text_encoders)]:
        raise SdtuneError(f"adapter {path} trained {', '.join(info.text_encoders)}; this pipeline has {', '.join(available) or 'no text encoder'}")
    return [available[name] for name in info.text_encoders]


def adapter_info(path: str | Path) -> AdapterInfo:
    """What an sdtune adapter, or a kohya-format file (trained anywhere), says about itself."""
    path = adapter_path(path)
    if is_kohya_file(path):
        return kohya_info(path, read_kohya(path)[0])
    return read_adapter_info(path)[0]


def check_pipeline(pipeline) -> None:
    """Refuse, in one line, anything but a diffusers pipeline with a UNet (a model name, a bare UNet, None)."""
    import torch

    if not isinstance(getattr(pipeline, "unet", None), torch.nn.Module):
        raise SdtuneError("give a diffusers pipeline to load the adapter into (such as sdtune.models.load_pipeline(\"tiny\")), "
                          f"got {type(pipeline).__name__}")


def check_trained_base(info: AdapterInfo, parts, targets: list[str], what: str, model: str, as_merged: bool) -> None:
    """Refuse an sdtune adapter (`info`) trained on another base model than the one `parts` (a `ModelParts`) holds:
    other layer names or shapes, or other weights by the adapter's fingerprint of its `targets`, the same weights in
    another precision (fp16, bf16) accepted. The weights count as they were before any sdtune merge changed them, and,
    with `as_merged`, as they are now too. `what` and `model` name the file and the model in the message."""
    import numpy as np
    import torch

    from .methods.base import fingerprint_of, same_weights, structure_digest, weight_sample

    trained_on = f"{what} was trained on base model {info.base_model!r}"
    structure = structure_digest(parts, targets)
    if structure != info.structure:
        raise SdtuneError(f"{trained_on}; {model}'s layers have other names or shapes")
    samples = [weight_sample(parts, targets, base=not as_merged)]
    if fingerprint_of(structure, samples[0]) == info.fingerprint:
        return
    if as_merged:
        samples.append(weight_sample(parts, targets, base=True))
    expected = torch.from_numpy(np.frombuffer(info.weight_sample, dtype="<f4").copy())
    if not any(same_weights(expected, sample) for sample in samples):
        raise SdtuneError(f"{trained_on}; {model}'s weights differ")


def update_reads_weights(path: str | Path, info) -> bool:
    """Whether the adapter's update depends on the weights it is taken on (`Method.update_reads_weights`), from its
    file alone, before any model loads: a kohya file's differences, a LoRA's B·A, do not."""
    from . import methods

    if is_kohya_file(adapter_path(path)):
        return False
    return methods.create(info.method, **info.options).update_reads_weights


def open_adapter(path: str | Path, pipeline, rename: dict[str, str] | None = None):
    """The adapter at `path` bound to `pipeline`, at strength 1 and not merged; its new tokens (if any) join the
    pipeline's tokenizer(s), under the names `rename` gives where it does (a stack's `stack_new_tokens`).

    An sdtune adapter: its method injected into `pipeline.unet` (and the text encoders it trained) with
    its tensors loaded, so the UNet computes with it. Refused, with a clear message, for a base model whose targeted layers differ in
    names, shapes or weights; the same weights in another precision (fp16, bf16) are accepted.
    A kohya-format file (LoRA, LoHa, LoKr or full-weight diffs from sdtune or any other trainer):
    its updates, each checked against the module it changes, not yet added (they apply merged).
    Either has `set_scale`, `merge` and `unmerge`.
    """
    from . import methods
    from .methods.base import (
        ModelParts, check_no_unmerged_method, check_state_names, check_state_shapes, text_encoder_layers, text_encoder_prefix,
    )

    path = adapter_path(path)
    check_pipeline(pipeline)
    check_no_unmerged_method(pipeline.unet, f"loading {path}")
    if is_kohya_file(path):
        return read_kohya_updates(path, pipeline, rename)
    from .token_embeddings import add_tokens, split_state

    info, entries = read_adapter_info(path)
    entries, _ = split_state(entries)  # the new tokens' rows are no tensors of the method
    method = methods.create(info.method, **info.options)
    unet = pipeline.unet
    encoders = trained_text_encoders(path, info, pipeline) if info.text_encoders else []
    shapes = expected_shapes(info.method, info.options, unet, encoders)
    found = {key: entry.shape for key, entry in entries.items()}
    # first: other names mean another method's tensors, or another model (family) under the same method
    check_state_names(shapes, found, f"adapter {path} (trained on base model {info.base_model!r})")
    parts = ModelParts(unet, {text_encoder_prefix(i): text_encoder_layers(encoder) for i, encoder in enumerate(encoders)})
    targets = method.all_targets(unet, parts.text_encoders)
    # as they are, or as before an earlier adapter merged into them: adapters stack
    check_trained_base(info, parts, targets, f"adapter {path}", "the loaded model", as_merged=True)
    check_state_shapes(shapes, found, f"adapter {path}")
    tensors = read_tensors(path)
    bad = first_non_finite(tensors)
    if bad:
        raise SdtuneError(f"{path}: tensor {bad} holds NaN or infinite values")
    warn_absurd_values(path, tensors)
    tensors, rows = split_state(tensors)
    if info.new_tokens:  # before the method is injected: a clash leaves the pipeline as it was
        add_tokens(pipeline, [(rename or {}).get(t, t) for t in info.new_tokens], rows, f"adapter {path}")
    device = unet.device  # read once: diffusers walks every module to find it
    method.inject(unet, encoders)
    devices = {prefix: encoder.device for prefix, encoder in parts.text_encoders.items()}
    method.load_state_dict({k: v.to(devices.get(k.partition(".")[0], device)) for k, v in tensors.items()})
    return method


def warn_missing_base_adapters(paths: list) -> None:
    """Warn, once per adapter, where one of `paths` was trained on top of base adapters (`sdtune train
    --base-adapters`) that are not among `paths`: what it learned is drawn on another model without them."""

    for notice in stacked_base_adapters([str(p) for p in paths], [adapter_info(p) for p in paths])[1]:
        warn(notice)


def load_adapter(path: str | Path, pipeline, merge: bool = True, scale: float = 1.0):
    """Apply the adapter at `path` to `pipeline` at strength `scale` (W + scale·ΔW); merged by default.

    Merged, the UNet (and the text encoder, where the adapter changes it) is plain again, with the update in its
    weights; unmerged (`merge=False`, sdtune adapters only), the method's layers compute the update,
    and the returned method can be trained further, rescaled or merged. See `open_adapter`. A strength past 1 that
    makes a merged weight overflow its dtype raises SdtuneError, and the pipeline's weights are then not finite.
    """
    from .methods.base import checked_scale

    path = adapter_path(path)
    if not isinstance(merge, bool):  # merge="no" would merge
        raise SdtuneError(f"merge is True or False, got {merge!r}")
    if not merge and is_kohya_file(path):
        raise SdtuneError(f"{path}: kohya-format files are applied merged; merge=False is not available")
    scale = checked_scale(scale)  # before the adapter is bound: a refused scale leaves the pipeline as it was
    warn_missing_base_adapters([path])
    adapter = open_adapter(path, pipeline)
    if scale != 1.0:
        adapter.set_scale(scale)
    if merge:
        adapter.merge(keep_base=False)
        if abs(scale) > 1:  # only a strength past 1 can take an adapter's checked values past the dtype's range
            check_merged_weights_finite(pipeline, f"scale {scale:g}")
    return adapter


def _module_name(pipeline, module) -> str:
    """`module`'s name in the pipeline's UNet or text encoders (text encoders' with their attribute)."""
    from .models import TEXT_ENCODER_COMPONENTS

    for attribute in ("unet", *TEXT_ENCODER_COMPONENTS):
        model = getattr(pipeline, attribute, None)
        for name, candidate in model.named_modules() if model is not None else ():
            if candidate is module:
                return f"{attribute}.{name}"
    return type(module).__name__


def check_merged_weights_finite(pipeline, what: str) -> None:
    """Refuse, naming the first weight, a merge that left a weight infinite or NaN (a huge strength)."""
    from .models import text_encoders
    from .safetensors_checks import first_non_finite

    for part, model in (("unet", pipeline.unet), *(("text encoder", encoder) for encoder in text_encoders(pipeline))):
        overflowed = first_non_finite(dict(model.named_parameters()))
        if overflowed:
            raise SdtuneError(f"{what} makes the merged {part} weight {overflowed} overflow {str(model.dtype).removeprefix('torch.')}; "
                              "use a smaller scale")


def load_adapters(paths: list, pipeline, scales: list[float] | None = None):
    """Stack adapters onto `pipeline`, merged: W + Σ scaleᵢ·ΔWᵢ, each ΔWᵢ the update adapter i makes on the weights it
    was trained on (`scales`: one each, or one number for all; default 1). Returns the stack's `StackedTokens`:
    adapters' new tokens (--token-embeddings) named apart, each later adapter's under the next free names (<s2><s3> after
    another's <s0><s1>, said in one warning line), and what each `<name>` placeholder then becomes.

    Filter atoms, GIFT, OFT, DiffFit and the in-place methods derive their update from the weights they meet
    (`Method.update_reads_weights`). An adapter trained on base adapters (`sdtune train --base-adapters`) that are in
    the stack at the strengths it records has its update computed on the weights those leave: theirs first, then
    its own on top, as it was trained and validated. Every other update is computed on the base weights. The updates
    add up, which is what kohya loaders do with diffs and LoRAs, and what does not depend on the adapters' order. A
    low-rank update is the same on any weights: computed on the base weights, as always. `load_adapter` called
    again instead merges each adapter into the weights the ones before it left. A base adapter an adapter records
    that is missing from the stack, or in it at another strength, is warned of.

    Memory: about one layer's update at once. Every adapter is bound and checked first, leaving the model plain
    with its updates pending (`pending_updates`); then a layer at a time, each adapter's update of it is computed
    (on the base weight, or on it with the updates of its base adapters added), added up and written before the next
    layer's. Where an adapter stacks on its base adapters, that layer's base adapters' updates are held until the
    updates computed on them are. A refused adapter (another base model) is refused before any weight changes.
    Kohya files and methods that train weights in place hold their whole update from the start (the file's
    differences, the initial weights): those are added up as they are read, where no update computed on demand
    comes before them in the stack and no adapter stacks on another. One of them trained on base adapters of the
    stack is bound last, onto weights its base adapters' updates are added to for the while (a layer at a time, each
    weight they change copied to the CPU to be put back). Two adapters of the same concept where either brings new
    tokens are refused before any is bound. Strengths that make a merged weight overflow its dtype raise
    SdtuneError before that weight changes, with the layers before it merged.
    """

    import torch

    from . import methods
    from .methods.base import checked_scale, remember_base_samples

    if isinstance(paths, (str, os.PathLike)):  # one adapter, not a list of one-letter paths
        paths = [paths]
    check_pipeline(pipeline)
    if scales is None or not isinstance(scales, (list, tuple)):  # one strength for all (default 1)
        scales = [1.0 if scales is None else scales] * len(paths)
    scales = list(scales)
    if len(scales) != len(paths):
        raise SdtuneError(f"give one strength per adapter: {len(paths)} adapters, {len(scales)} strengths")
    scales = [checked_scale(scale) for scale in scales]
    stack = stacked_tokens(paths, pipeline)  # before any adapter is bound: a refusal leaves the pipeline as it was
    if stack.notice:
        warn(stack.notice)
    infos = [adapter_info(path) for path in paths]
    beneath, notices = stacked_base_adapters([str(p) for p in paths], infos, scales)
    for notice in notices:
        warn(notice)
    # bound after the others: a method's update held from the start is taken on the weights its base adapters leave
    # (a kohya file's differences, which may record base adapters too, are the same on any weights)
    held = {i for i, info in enumerate(infos) if beneath[i] and info.method in methods.available()
            and not methods.method_class(info.method).updates_on_demand}
    binding = [i for i in range(len(paths)) if i not in held] + [i for i in stacked_order(beneath) if i in held]
    # by weight: the module, the parameter name, and by adapter (its index in the stack) its update (a function) or,
    # where the first ones held theirs already (kohya files, weights trained in place) and no adapter stacks on
    # another, their sum so far (a tensor, under the first one's index)
    pending: dict[tuple[int, str], tuple] = {}
    reads: dict[int, bool] = {}  # by adapter, once bound: whether its update depends on the weights it is computed on

    def order() -> list[int]:  # what stacks on other adapters after them (an update the same on any weights: no need)
        return stacked_order([bases if reads.get(index, True) else [] for index, bases in enumerate(beneath)])

    summed_as_read = not any(beneath)
    for index in binding:
        merged_beneath = _base_adapters_added(pending, beneath[index], order(), beneath, reads) if index in held \
            else contextlib.nullcontext()
        with merged_beneath:
            adapter = open_adapter(paths[index], pipeline, stack.renames[index])
            if scales[index] != 1.0:
                adapter.set_scale(scales[index])
            updates = adapter.pending_updates()
        reads[index] = adapter.update_reads_weights
        for module, attr, update in updates:
            taken = pending.setdefault((id(module), attr), (module, attr, {}))[2]
            if not summed_as_read or adapter.updates_on_demand or any(callable(earlier) for earlier in taken.values()):
                taken[index] = update
            else:  # held already: added now, as the adapter's own copy can go
                delta = update()
                if delta is not None:
                    if taken:
                        next(iter(taken.values())).add_(delta)
                    else:
                        taken[index] = delta
                del delta
        del adapter, updates
    in_order = order()
    with torch.no_grad():
        while pending:
            module, attr, updates = pending.pop(next(iter(pending)))
            total = None
            # in the stack's order (base adapters before what stacks on them): the same sum, bit for bit
            for _, delta in _layer_updates(module, attr, updates, in_order, beneath, reads):
                if delta is not None:
                    total = delta if total is None else total.add_(delta)
                del delta
            updates.clear()
            if total is not None:
                remember_base_samples([module])  # its weights before this first change
                weight = getattr(module, attr)
                merged = weight + total.to(weight.device, weight.dtype)
                if not bool(merged.isfinite().all()):  # a huge strength: refused before this weight changes
                    raise SdtuneError(
                        f"strengths {', '.join(f'{s:g}' for s in scales)} make the merged weight {_module_name(pipeline, module)}."
                        f"{attr} overflow {str(weight.dtype).removeprefix('torch.')}; use smaller strengths")
                weight.copy_(merged)
                del merged
            del total
    return stack


def stacked_order(beneath: list[list[int]]) -> list[int]:
    """The stack's indices, each after the adapters it stacks on (`beneath`), else in the stack's order."""
    order: list[int] = []
    while len(order) < len(beneath):
        ready = [i for i in range(len(beneath)) if i not in order and all(j in order for j in beneath[i])]
        if not ready:  # recorded by digest, an adapter cannot stack on one that stacks on it
            raise RuntimeError(f"stacked adapters depend on each other: {beneath}")
        order.append(ready[0])
    return order


def _summed(deltas: list):
    """The sum of `deltas` in their order, as a new tensor where there are several (they stay as they are)."""
    total = deltas[0]
    for delta in deltas[1:]:
        total = total + delta
    return total


def _layer_updates(module, attr: str, updates: dict, order: list[int], beneath: list[list[int]], reads: dict[int, bool]):
    """(index, scale·ΔW or None) of each adapter's update of one weight (`updates`: by index, a function or a tensor), in
    `order`. An update computed on demand that depends on the weights (`reads`) is computed on the weight with its
    base adapters' updates of it added (`beneath`: those in the stack, as load_adapters adds them), the weight put
    back at once; any other on the weight as it is. The updates that others are computed on are kept for the while
    (copies: the caller sums into what it is given)."""
    import torch

    weight = getattr(module, attr)
    wanted = {j for i in updates if reads.get(i) and callable(updates[i]) for j in beneath[i]}
    kept: dict[int, torch.Tensor] = {}
    for index in order:
        if index not in updates:
            continue
        update = updates[index]
        under = [kept[j] for j in beneath[index] if j in kept] if callable(update) and reads.get(index) else []
        if under:
            with torch.no_grad():
                original = weight.detach().clone()
                weight.copy_(weight + _summed(under).to(weight.device, weight.dtype))
                try:
                    delta = update()
                finally:
                    weight.copy_(original)
                del original
        else:
            delta = update() if callable(update) else update
        if index in wanted and delta is not None:
            kept[index] = delta.clone()
        yield index, delta
        del delta


@contextlib.contextmanager
def _base_adapters_added(pending: dict, bases: list[int], order: list[int], beneath: list[list[int]], reads: dict[int, bool]):
    """While inside: every weight the adapters `bases` (indices, bound already: their updates in `pending`) change
    holds their updates added, as load_adapters adds them; each such weight is copied to the CPU first and put back
    after, exactly."""
    import torch

    from .methods.base import remember_base_samples

    needed, unseen = set(), list(bases)  # the base adapters, and those their updates are computed on, and so on
    while unseen:
        index = unseen.pop()
        if index not in needed:
            needed.add(index)
            unseen.extend(beneath[index])
    saved = []
    try:
        with torch.no_grad():
            for module, attr, updates in pending.values():
                if not any(j in updates for j in bases):
                    continue
                own = {j: update for j, update in updates.items() if j in needed}
                deltas = [delta for index, delta in _layer_updates(module, attr, own, order, beneath, reads)
                          if index in bases and delta is not None]
                if not deltas:
                    continue
                remember_base_samples([module])  # an adapter bound now is checked against the weights before the change
                weight = getattr(module, attr)
                saved.append((weight, weight.detach().to("cpu", copy=True)))
                weight.copy_(weight + _summed(deltas).to(weight.device, weight.dtype))
                del deltas
        yield
    finally:
        with torch.no_grad():
            for weight, value in saved:
                weight.copy_(value)


def stacked_tokens(paths: list, pipeline=None):
    """The stack's `StackedTokens` (token_embeddings.stack_new_tokens), read from the files' headers; with
    `pipeline`, the names its tokenizer(s) hold are taken."""
    from .token_embeddings import stack_new_tokens

    files = [adapter_path(path) for path in paths]
    infos = [kohya_info(f, read_safetensors_header(f)[0]) if is_kohya_file(f) else read_adapter_info(f)[0] for f in files]
    taken: set[str] = set()
    if pipeline is not None:
        from .models import tokenizers

        for tokenizer in tokenizers(pipeline):
            taken.update(tokenizer.get_vocab())
    return stack_new_tokens([str(f) for f in files], infos, taken)


_DIGESTS: dict[tuple, str] = {}  # by resolved path and the file's identity (size, times, inode): a version changed is hashed again
_DIGESTS_LOCK = threading.Lock()


def _file_version(path: Path, stat: os.stat_result) -> tuple:
    return (str(path), stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns, stat.st_ino, stat.st_dev)


def adapter_digest(path: Path) -> str:
    """What tells one training's adapter from another's (a run trained again, resumed or extended after it was
    measured): the sha256 of the file, whose bytes the same weights always give, or for a file over DIGEST_WHOLE
    of its size and DIGEST_WINDOWS windows spread over it, so that a full model's gigabytes are not read.

    Read once per process and file version (stacks, sweep fingerprints and the eval.json check ask for one file's
    several times): kept by resolved path, size, modification and change times and inode, so a file written again
    atomically (a new inode) or in place (new times) is hashed again; one changed within DIGEST_SETTLED_S is not kept."""
    path = Path(path).resolve()
    with _DIGESTS_LOCK:
        kept = _DIGESTS.get(_file_version(path, path.stat()))
    if kept is not None:
        return kept
    with open(path, "rb") as handle:
        before = os.fstat(handle.fileno())  # what was opened: a file renamed onto the path since is kept as itself
        digest = _read_digest(handle, before.st_size)
        after = os.fstat(handle.fileno())
    version = _file_version(path, before)
    changed_last = max(after.st_mtime_ns, after.st_ctime_ns)
    if version == _file_version(path, after) and time.time_ns() - changed_last >= DIGEST_SETTLED_S * 1e9:
        with _DIGESTS_LOCK:
            while len(_DIGESTS) >= DIGESTS_KEPT:
                del _DIGESTS[next(iter(_DIGESTS))]
            _DIGESTS[version] = digest
    return digest


def _read_digest(handle, size: int) -> str:
    import hashlib

    digest = hashlib.sha256()
    if size <= DIGEST_WHOLE:
        for block in iter(lambda: handle.read(DIGEST_WINDOW), b""):
            digest.update(block)
    else:
        digest.update(str(size).encode())
        for k in range(DIGEST_WINDOWS):
            handle.seek((size - DIGEST_WINDOW) * k // (DIGEST_WINDOWS - 1))
            digest.update(handle.read(DIGEST_WINDOW))
    return digest.hexdigest()[:32]


# ---------------------------------------------------------------------------------------------
# What a trained adapter records, read back


def recorded_base_adapters(info) -> list[dict[str, Any]]:
    """The base adapters an adapter was trained on top of (none for kohya files and older adapters)."""
    try:
        records = json.loads(info.extra.get(BASE_ADAPTERS_KEY, "[]"))
    except ValueError:
        return []
    def readable(record) -> bool:
        strength = record.get("strength", 1.0) if isinstance(record, dict) else None
        return isinstance(strength, (int, float)) and not isinstance(strength, bool) and math.isfinite(strength) and "name" in record

    return [r for r in records if readable(r)] if isinstance(records, list) else []


def recorded_init_weights(info) -> dict[str, str] | None:
    try:
        record = json.loads(info.extra.get(INIT_WEIGHTS_KEY, "null"))
    except ValueError:
        return None
    return record if isinstance(record, dict) and "name" in record else None


def base_adapters_text(records: list[dict[str, Any]]) -> str:
    return ", ".join(f"{r['name']} at {float(r.get('strength', 1.0)):g}" for r in records)


def stacked_base_adapters(paths: list, infos: list, scales: list[float] | None = None) -> tuple[list[list[int]], list[str]]:
    """For each adapter of `paths` (`infos`, at `scales`): the adapters of `paths` it was trained on top of (`sdtune
    train --base-adapters`, recorded by digest and strength) that are there at the recorded strength, by index; and
    one warning per adapter with base adapters that are not among `paths`, and one where they are at another
    strength. Without `scales` (an adapter loaded alone) strengths are not compared. Each record takes its own entry
    of `paths`: a file trained on twice (merged twice, as kohya-ss merges each --base_weights entry) is beneath it
    where the stack gives it twice."""
    beneath: list[list[int]] = []
    notices: list[str] = []
    digests = None
    for index, (path, info) in enumerate(zip(paths, infos)):
        records, found, missing, elsewhere, rest = recorded_base_adapters(info), [], [], [], []
        taken: set[int] = set()  # the stack's entries a record has taken
        if records and digests is None:
            digests = [adapter_digest(adapter_path(p)) for p in paths]

        def free(record) -> list[int]:  # the stack's entries that are the record's file, taken by no other record
            return [j for j, digest in enumerate(digests or []) if digest == record.get("digest") and j != index and j not in taken]

        for record in records:  # first each record the stack gives at its strength, then the others
            strength = float(record.get("strength", 1.0))
            at = [j for j in free(record) if scales is None or math.isclose(scales[j], strength, rel_tol=1e-9, abs_tol=1e-12)]
            if at:
                found.append(at[0])
                taken.add(at[0])
            else:
                rest.append(record)
        for record in rest:
            present = free(record)
            if present:
                taken.add(present[0])
                elsewhere.append(f"{record['name']} at {float(record.get('strength', 1.0)):g} (given at {scales[present[0]]:g})")
            else:
                missing.append(record)
        beneath.append(sorted(found))
        if missing:
            strengths = ",".join(f"{float(r.get('strength', 1.0)):g}" for r in missing)
            notices.append(f"{path} was trained on top of base adapters that are not loaded with it: {base_adapters_text(missing)}; "
                           f"stack them beneath it to draw what it learned (sdtune sample --adapter BASE --adapter THIS "
                           f"--adapter-scale {strengths},1)")
        if elsewhere:
            notices.append(f"{path} was trained on top of base adapters loaded with it at another strength: {', '.join(elsewhere)}; "
                           "give them at the strength it records to draw what it learned")
    return beneath, notices
