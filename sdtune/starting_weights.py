"""Where a run's weights start: a trained adapter's tensors (`--init-weights`, kohya-ss' --network_weights) and
adapters merged into the frozen model before the method is injected (`--base-adapters`, kohya-ss' --base_weights
and --base_weights_multiplier).

Both differ from `--resume`: a resumed run goes on with its own optimizer and schedule; a run started from weights
is a new run (a fresh optimizer and schedule) whose trained tensors start from a file. The file is an sdtune
adapter of the run's method, or a kohya/LyCORIS file of an update kind the method holds exactly (its
`kohya_init_options` and `state_from_kohya` say which and how). The run's adapter records where it started and
what was merged beneath it (each file's name and digest), which `load_adapter` and the model card read.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .config import BaseAdapter
from .errors import SdtuneError, shell_word, warn


def file_record(path: str | Path) -> dict[str, str]:
    """What an adapter records of a file it depends on: its name and digest (adapter.adapter_digest)."""
    from .adapter import ADAPTER_FILE, adapter_digest, adapter_path

    path = adapter_path(path)
    name = f"{path.parent.name}/{path.name}" if path.name == ADAPTER_FILE else path.name  # a run's adapter: by its run
    return {"name": name, "digest": adapter_digest(path)}


def base_adapter_records(bases: list[BaseAdapter]) -> list[dict[str, Any]]:
    return [{**file_record(base.path), "strength": base.strength} for base in bases]


def check_base_adapters(bases: list[BaseAdapter], model: str | None = None) -> list[BaseAdapter]:
    """`bases` (a config's `base_adapter_entries`), each file read far enough to refuse what no loader takes (before
    the model loads): with `model`, also a kohya file recorded for another model family."""
    from .adapter import adapter_info, adapter_path
    from .kohya import is_kohya_file

    for base in bases:
        try:
            info = adapter_info(base.path)
            if model is not None and is_kohya_file(adapter_path(base.path)):
                check_kohya_family(info.extra, model, base.path)
        except SdtuneError as error:
            head, colon, _ = base.path.rpartition(":")  # FILE:abc, read as a file's name: say what it was taken for
            hint = (f" ({head} is there: the strength after ':' is a number, such as {head}:0.5)"
                    if colon and head and not Path(base.path).exists() and Path(head).exists() else "")
            raise SdtuneError(f"--base-adapters: {error}{hint}") from None
    return bases


def check_kohya_family(metadata: dict[str, str], model: str, where: str) -> None:
    """A kohya file recorded (`ss_base_model_version`) for another model family than `model`'s is refused."""
    from .kohya import kohya_layout
    from .models import read_model_configs

    recorded = metadata.get("ss_base_model_version", "")
    family = kohya_layout(read_model_configs(model).unet).base_model_version
    if recorded and recorded.split("_")[:2] != family.split("_")[:2]:  # sd_v1, sd_v2, sdxl_base...
        raise SdtuneError(f"{where} was trained on a {recorded} model; --model {shell_word(model)} is {family}")


def base_adapter_bytes(bases: list[BaseAdapter]) -> int:
    """The base adapters' files' sizes: what merging them reads whole (the memory check's lower bound)."""
    from .adapter import adapter_path

    return sum(adapter_path(base.path).stat().st_size for base in bases)


# ---------------------------------------------------------------------------------------------
# --init-weights


@dataclass
class KohyaHeader:
    """What a kohya/LyCORIS file says about its update without its tensors (but the `.alpha` scalars)."""

    kinds: set[str]  # its modules' update kinds, and "dora" where one has a dora_scale
    shapes: dict[str, dict[str, tuple[int, ...]]]  # kohya module name → {suffix: shape}
    alphas: dict[str, float]
    metadata: dict[str, str]


def read_kohya_header(path: Path) -> KohyaHeader:
    from safetensors import safe_open

    from .kohya import DORA_SCALE, kohya_kind
    from .safetensors_checks import check_adapter_dtypes, read_safetensors_header
    from .token_embeddings import BUNDLE_PREFIX

    metadata, entries = read_safetensors_header(path)
    check_adapter_dtypes(path, entries)
    if any(key.startswith(BUNDLE_PREFIX) for key in entries):
        raise SdtuneError(f"--init-weights {shell_word(path)}: the file bundles token embeddings, which a run cannot start from")
    shapes: dict[str, dict[str, tuple[int, ...]]] = {}
    for key, entry in entries.items():
        module, _, suffix = key.partition(".")
        shapes.setdefault(module, {})[suffix] = tuple(entry.shape)
    kinds = {kohya_kind(parts, f"{path}: {module}") for module, parts in shapes.items()}
    if any(DORA_SCALE in parts for parts in shapes.values()):
        kinds.add("dora")
    alphas = {}
    with safe_open(str(path), framework="pt") as handle:
        for module, parts in shapes.items():
            if "alpha" in parts:
                alphas[module] = float(handle.get_tensor(f"{module}.alpha").float().item())
    return KohyaHeader(kinds, shapes, alphas, metadata)


def network_args(metadata: dict[str, str]) -> dict[str, str]:
    try:
        args = json.loads(metadata.get("ss_network_args") or "{}")
    except ValueError:
        return {}
    return args if isinstance(args, dict) else {}


def describe_taken(taken: dict[str, Any], started_fresh: str = "") -> str:
    """What a run took from its `--init-weights` file (`StartingOptions.taken` and `.started_fresh`), for the dry run
    and the closing line ('' where nothing):
    'rank 3, alpha 1.5, targets locon; 246 of the run's 278 UNet layers (the other 32 start as in a fresh run)'."""
    options = ", ".join(f"{name} {value}" for name, value in taken.items())
    return "; ".join(part for part in (options, started_fresh) if part)


@dataclass
class StartingOptions:
    """The run's method options once `--init-weights` is read, which of them came from the file, and which of the
    run's layers the file leaves alone."""

    options: dict[str, Any]
    taken: dict[str, Any]  # the file's options the run did not set and that differ from what it would have without the file
    # how many of the UNet layers the run tunes the file holds, the others starting as in a fresh run (`fresh_layers`),
    # as a phrase; '' where it holds them all
    started_fresh: str = ""


def init_weights_options(config) -> StartingOptions:
    """The options the run trains with: the file's where `config.options` does not set them (kohya-ss'
    --dim_from_weights, for every option), the run's own where the file's tensors mean the same with either (the
    method's `training_only_options`). Refuses, in one line and before the model loads, a file of another
    method or update kind, another model family, or options that give its tensors another meaning."""
    from . import methods
    from .adapter import adapter_path, read_adapter_info
    from .kohya import TEXT_ENCODER_PREFIX, is_kohya_file

    method_class = methods.method_class(config.method)
    path = adapter_path(config.init_weights)
    where = f"--init-weights {shell_word(path)}"
    if is_kohya_file(path):
        header = read_kohya_header(path)
        check_kohya_family(header.metadata, config.model, where)
        if any(module.startswith(TEXT_ENCODER_PREFIX) for module in header.shapes) and not config.train_text_encoder:
            raise SdtuneError(f"{where} changes the text encoder too: add --train-text-encoder to start from all of it")
        try:
            file_options = method_class.kohya_init_options(header.kinds, header.shapes, header.alphas, network_args(header.metadata))
        except SdtuneError as error:
            raise SdtuneError(f"{where}: {error}") from None
        # the layers (targets): the smallest family holding the file's, as the rank is taken; the run's own where it chose them
        layers = kohya_unet_layers(config.model, header)
        layer_options = {name: value for name, value in kohya_layer_options(method_class, layers).items()
                         if name not in config.options}
    else:
        layers, layer_options = None, {}
        info = read_adapter_info(path)[0]
        if info.method != config.method:
            raise SdtuneError(f"{where} is a {info.method} adapter; start from it with --method {info.method}")
        if info.new_tokens:
            raise SdtuneError(f"{where} trained new token embeddings ({', '.join(info.new_tokens)}), which a run cannot start from")
        if bool(info.text_encoders) and not config.train_text_encoder:
            raise SdtuneError(f"{where} trained the text encoder too: add --train-text-encoder to start from all of it")
        file_options = dict(info.options)
    # an sdtune adapter records every option; a kohya file's tensors fix only those it gave (its layers: a run may tune more)
    judged = set(file_options) if is_kohya_file(path) else None

    def resolved(options: dict[str, Any]) -> dict[str, Any]:
        return dataclasses.asdict(method_class(**options).options)

    from_file, run, defaults = resolved(file_options), resolved({**file_options, **config.options}), resolved({})
    for name, value in run.items():
        if name not in method_class.training_only_options and (judged is None or name in judged) and value != from_file[name]:
            raise SdtuneError(f"{where} holds tensors of {name} {from_file[name]!r}; the run sets {value!r} "
                              f"(leave the option out to take the file's)")

    def without_file(name: str) -> Any:  # what the run would have for `name` had the file not given it
        return resolved({**{other: value for other, value in file_options.items() if other != name}, **config.options}).get(name)

    # against that, not the bare default: alpha 4 of a rank-8 file differs from the alpha 8 a rank-8 run defaults to
    taken = {name: value for name, value in file_options.items()
             if name not in config.options and from_file.get(name) != without_file(name)}
    taken.update({name: value for name, value in layer_options.items() if value != defaults.get(name)})
    options = {**file_options, **layer_options, **config.options}
    method = method_class(**options)
    if layers is not None:  # the file's UNet modules the run's own --targets leave out: refused before the model loads
        try:
            method.check_kohya_unet_modules(layers.unet, layers.modules)
        except SdtuneError as error:
            raise SdtuneError(f"{where}: {error}") from None
    return StartingOptions(options, taken, fresh_layers(method, layers))


def warn_other_prompt_reading(config) -> None:
    """Warn, once, where the run reads prompts another way (`--clip-skip`, `--max-token-length`) than its `--init-weights`
    file was trained with: an sdtune adapter records both (the defaults where it records neither); a kohya file
    `ss_clip_skip`/`ss_max_token_length`, where its metadata has them ('None': kohya-ss' default). Its tensors then
    start from what they learned on other text embeddings."""
    from .adapter import adapter_path, read_adapter_info
    from .kohya import is_kohya_file, kohya_info
    from .safetensors_checks import read_safetensors_header
    from .sampling import kohya_recorded

    path = adapter_path(config.init_weights)
    kohya = is_kohya_file(path)
    info = kohya_info(path, read_safetensors_header(path)[0]) if kohya else read_adapter_info(path)[0]
    run, differ = config.prompt_reading, []
    for setting in dataclasses.fields(run):
        name, flag = setting.name, "--" + setting.name.replace("_", "-")
        if kohya and f"ss_{name}" not in info.extra:  # another trainer's file that does not say
            continue
        recorded = kohya_recorded(info, name, setting.default) if kohya else str(info.extra.get(name, setting.default))
        if recorded.isdigit() and int(recorded) != getattr(run, name):
            differ.append((flag, int(recorded), getattr(run, name)))
    if differ:
        trained = " and ".join(f"{flag} {value}" for flag, value, _ in differ)
        reads = " and ".join(f"{flag} {value}" for flag, _, value in differ)
        warn(f"--init-weights {shell_word(path)} was trained with {trained}; the run reads prompts with {reads}: its tensors start "
             f"from what they learned on other text embeddings (give {trained} to read them as it did)")


@dataclass
class KohyaUnetLayers:
    """The UNet modules a kohya file changes (diffusers names), and the run's UNet (meta device) they are found on."""

    unet: Any
    modules: set[str]


def kohya_unet_layers(model: str, header: KohyaHeader) -> KohyaUnetLayers | None:
    """The file's UNet modules on `model`'s UNet built on the meta device; None where the UNet cannot be built, the file
    changes none of it, or a module matches none of its layers (loading the file names it)."""
    import torch
    from diffusers import UNet2DConditionModel

    from .kohya import UNET_PREFIX, kohya_module_lookup
    from .models import read_model_configs

    try:
        with torch.device("meta"):
            unet = UNet2DConditionModel.from_config(read_model_configs(model).unet)
    except Exception:  # loading the model says what is wrong with it
        return None
    lookup = kohya_module_lookup(unet, {})
    unet_modules = [module for module in header.shapes if module.startswith(UNET_PREFIX + "_")]
    if not unet_modules or any(module not in lookup for module in unet_modules):
        return None
    return KohyaUnetLayers(unet, {lookup[module][1] for module in unet_modules})


def kohya_layer_options(method_class, layers: KohyaUnetLayers | None) -> dict[str, Any]:
    """The method's options that choose the UNet layers the kohya file changes (`Method.kohya_layer_options`: for a
    layer family, the smallest that holds them all); none where the file's layers are unknown."""
    return method_class.kohya_layer_options(layers.unet, layers.modules) if layers is not None else {}


def fresh_layers(method, layers: KohyaUnetLayers | None) -> str:
    """Where `method` tunes UNet layers the kohya file leaves alone (a wider family, or a file that left some blocks
    out), how many: they start as in a fresh run. '' where the file holds them all, or holds others (which
    `init_weights_options` refuses, naming the families that hold them)."""
    if layers is None:
        return ""
    tuned = set(method.find_targets(layers.unet))
    if not layers.modules <= tuned or len(tuned) == len(layers.modules):
        return ""
    return f"{len(layers.modules)} of the run's {len(tuned)} UNet layers (the other {len(tuned) - len(layers.modules)} start as in a fresh run)"


def check_init_weights_base(path: str | Path, method, unet, text_encoders: list) -> None:
    """Before `method` is injected into `unet` (and `text_encoders`): refuse an sdtune adapter trained on another base
    model, by its fingerprint of the layers it tuned (the UNet's alone where it trained no text encoder, which the run
    may add), as `load_adapter` does; the weights before any base adapter was merged count (adapters stack). A kohya
    file's modules are checked by name and shape as they load (`load_init_weights`)."""
    from .adapter import adapter_path, check_trained_base, read_adapter_info
    from .kohya import is_kohya_file
    from .methods.base import ModelParts, text_encoder_layers, text_encoder_prefix

    path = adapter_path(path)
    if is_kohya_file(path):
        return
    info, _ = read_adapter_info(path)
    encoders = {text_encoder_prefix(i): text_encoder_layers(e) for i, e in enumerate(text_encoders)} if info.text_encoders else {}
    check_trained_base(info, ModelParts(unet, encoders), method.all_targets(unet, encoders), f"--init-weights {shell_word(path)}",
                       "this model", as_merged=False)


def load_init_weights(path: str | Path, method, pipeline) -> None:
    """Copy the file's tensors into the injected `method` (on `pipeline`'s UNet and the text encoders it trains): a
    kohya file's checked by module name and shape, an sdtune adapter's by shape (its base: `check_init_weights_base`)."""
    import torch

    from .adapter import adapter_path
    from .kohya import is_kohya_file, kohya_module_lookup, read_kohya
    from .methods.base import check_state_shapes
    from .models import TEXT_ENCODER_COMPONENTS
    from .safetensors_checks import first_non_finite, read_tensors

    path = adapter_path(path)
    where = f"--init-weights {shell_word(path)}"
    own = method.state_dict()
    if is_kohya_file(path):
        _, tensors = read_kohya(path)
        encoders = {name: getattr(pipeline, name) for name in TEXT_ENCODER_COMPONENTS if name in method.text_encoders}
        lookup = kohya_module_lookup(pipeline.unet, encoders)
        modules: dict[str, dict[str, torch.Tensor]] = {}
        for key, tensor in tensors.items():
            kohya_module, _, suffix = key.partition(".")
            if kohya_module not in lookup:
                raise SdtuneError(f"{where}: key {key} matches no module of this model")
            component, name, _ = lookup[kohya_module]
            if component != "unet":  # the method names a text encoder's modules from its transformer (text_model)
                name = f"{component}.{name.removeprefix('text_model.')}"
            modules.setdefault(name, {})[suffix] = tensor.float()
        try:
            state = method.state_from_kohya(modules)
        except SdtuneError as error:
            raise SdtuneError(f"{where}: {error}") from None
    else:
        from .token_embeddings import split_state

        state, _ = split_state(read_tensors(path))
        bad = first_non_finite(state)
        if bad:
            raise SdtuneError(f"{path}: tensor {bad} holds NaN or infinite values")
        extra = sorted(set(state) - set(own))
        if extra:
            raise SdtuneError(f"{where} holds tensor {extra[0]}, which this {method.name} run has no place for")
        state = {**{key: tensor.detach().clone() for key, tensor in own.items()}, **state}
    check_state_shapes({k: tuple(v.shape) for k, v in own.items()}, {k: tuple(v.shape) for k, v in state.items()}, where)
    method.load_state_dict({key: tensor.to(own[key].device, own[key].dtype) for key, tensor in state.items()})
