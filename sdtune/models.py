"""Load Stable Diffusion pipelines (hub id, local folder or one of the embedded tiny models).

sdtune trains three families: SD 1.x and SD 2.x (`StableDiffusionPipeline`) and SDXL
(`StableDiffusionXLPipeline`); model_index.json names the class, and the resolution, prediction type and
text encoders come from the model's own configs. Every model goes through `from_pretrained`, the tiny
ones included:

- `tiny`: the tiny architecture pretrained on handwritten digits (prompts "This is a picture of the
  handwritten digit seven."), shipped as package data in `sdtune/resources/tiny-digits/` and made by
  `scripts/pretrain_tiny.py`;
- `tiny-random`: the same architecture with random weights, built once, deterministically and
  offline, saved in diffusers layout to the cache folder, and then loaded from there;
- `tiny-sd2-random`, `tiny-sdxl-random`: SD 2.x's architecture (v-prediction, linear attention
  projections, an OpenCLIP-style text encoder) and SDXL's (two text encoders, micro-conditioning) at
  tiny widths with random weights, built the same way.

`sd14`, `sd2-arch` and `sdxl-arch` name the full-size UNets (SD v1.4, SD 2.1, SDXL base 1.0), built
from their configs without weights, for counting (`sdtune methods --model sdxl-arch`).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Iterator

from .errors import SdtuneError, first_sentence, shell_word, warn
from .fileio import publish_directory

DEFAULT_MODEL = "CompVis/stable-diffusion-v1-4"
TINY = "tiny"
TINY_RANDOM = "tiny-random"
TINY_SD2_RANDOM = "tiny-sd2-random"
TINY_SDXL_RANDOM = "tiny-sdxl-random"
TINY_DIGITS_FOLDER = "tiny-digits"
# Bump when the tiny model's construction changes, so stale caches are not reused.
TINY_VERSION = 1
TINY_SEED = 0
SD14_RANDOM_VERSION = 1  # bump when build_sd14_pipeline changes
FAMILY_TINY_VERSION = 1  # bump when build_tiny_sd2_pipeline or build_tiny_sdxl_pipeline changes
PICKLE_WEIGHTS = {".bin", ".ckpt", ".pt", ".pth", ".pkl"}


@contextlib.contextmanager
def quiet_libraries() -> Iterator[None]:
    """Silence transformers' and diffusers' load-time chatter and progress bars while the block runs (sdtune
    shows its own); their verbosity and progress-bar settings are given back on the way out, also on an error,
    so a notebook's own `from_pretrained` afterwards warns and draws its bars as before."""
    import transformers
    from diffusers.utils import logging as diffusers_logging
    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

    verbosity = transformers.logging.get_verbosity()
    transformers_bars = transformers.logging.is_progress_bar_enabled()
    diffusers_bars = diffusers_logging.is_progress_bar_enabled()
    hub_bars_off = are_progress_bars_disabled()
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()  # the hub's bars too
    diffusers_logging.disable_progress_bar()
    try:
        yield
    finally:
        transformers.logging.set_verbosity(verbosity)
        (transformers.logging.enable_progress_bar if transformers_bars else transformers.logging.disable_progress_bar)()
        (diffusers_logging.enable_progress_bar if diffusers_bars else diffusers_logging.disable_progress_bar)()
        (disable_progress_bars if hub_bars_off else enable_progress_bars)()  # transformers' switch set the hub's too


def cache_dir() -> Path:
    """Where sdtune keeps built models and decompositions (`SDTUNE_CACHE` overrides)."""
    if os.environ.get("SDTUNE_CACHE"):
        return Path(os.environ["SDTUNE_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "sdtune"


def sd14_unet_config() -> dict:
    """SD v1.4's UNet config, shipped with the package so its architecture needs no download."""
    text = resources.files("sdtune.resources").joinpath("sd14_unet_config.json").read_text()
    return json.loads(text)


def build_sd14_unet(device: str = "meta"):
    """SD v1.4's UNet architecture with no weights (meta device) or random weights."""
    return build_arch_unet("sd14", device)


# The full-size UNets `sdtune methods` counts on without weights: name -> (config resource, description)
ARCHITECTURES = {
    "sd14": ("sd14_unet_config.json", "SD v1.4"),
    "sd2-arch": ("sd2_unet_config.json", "SD 2.1"),
    "sdxl-arch": ("sdxl_unet_config.json", "SDXL base 1.0"),
}


def build_arch_unet(name: str, device: str = "meta"):
    """A full-size UNet architecture (`ARCHITECTURES`) with no weights (meta device) or random weights."""
    return build_unet(_resource_config(ARCHITECTURES[name][0]), device)


def build_unet(config: dict, device: str = "meta"):
    """The UNet of `config` (a UNet2DConditionModel's config.json) with no weights (meta device) or random weights."""
    import torch
    from diffusers import UNet2DConditionModel

    with torch.device(device):
        return UNet2DConditionModel.from_config(config)


# ---------------------------------------------------------------------------------------------
# The embedded tiny model


def tiny_unet_config() -> dict:
    """SD v1.4's UNet block structure at tiny widths (same 52 3x3 convolutions)."""
    config = sd14_unet_config()
    config.update(
        block_out_channels=[32, 64, 64, 64],
        cross_attention_dim=32,
        attention_head_dim=8,
        sample_size=8,
    )
    config.pop("_diffusers_version")
    config.pop("_class_name")
    return config


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's map from bytes to printable characters (the base alphabet of their BPE)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(c) for c in chars)))


def _tiny_tokenizer_files() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """A byte-level BPE vocabulary in CLIP's format, built from a small fixed word list.

    Every byte has a token (alone and as the end of a word), so any text can be encoded; the merges
    make whole tokens of the words sdtune's prompts use most.
    """
    byte_chars = list(_bytes_to_unicode().values())
    vocab_list = byte_chars + [c + "</w>" for c in byte_chars]
    words = (
        "a an the of in on at with by and from to is this photo picture painting style sks "
        "castle canal dog cat house tree forest lake mountains snow river boat bridge water sky "
        "digit handwritten zero one two three four five six seven eight nine"
    ).split()
    merges: list[tuple[str, str]] = []
    seen = set(vocab_list)
    for word in words:
        parts = list(word[:-1]) + [word[-1] + "</w>"]
        current = parts[0]
        for part in parts[1:]:
            merged = current + part
            if merged not in seen:
                merges.append((current, part))
                vocab_list.append(merged)
                seen.add(merged)
            current = merged
    vocab_list += ["<|startoftext|>", "<|endoftext|>"]
    return {token: i for i, token in enumerate(vocab_list)}, merges


def _tiny_tokenizer():
    from transformers import CLIPTokenizer

    vocab, merges = _tiny_tokenizer_files()
    tokenizer = CLIPTokenizer(vocab=vocab, merges=merges)
    tokenizer.model_max_length = 77
    return tokenizer


def _sd14_scheduler():
    """SD v1.4's scheduler configuration."""
    from diffusers import PNDMScheduler

    return PNDMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        num_train_timesteps=1000,
        set_alpha_to_one=False,
        skip_prk_steps=True,
        steps_offset=1,
    )


@quiet_libraries()
def build_tiny_pipeline(seed: int = TINY_SEED):
    """Build the tiny SD-architecture pipeline in memory, deterministically from `seed`."""
    import torch
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel

    tokenizer = _tiny_tokenizer()

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**tiny_unet_config())
    vae = _tiny_vae(seed + 1)
    torch.manual_seed(seed + 2)
    text_encoder = CLIPTextModel(_tiny_text_encoder_config())
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=_sd14_scheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def _tiny_text_encoder_config(**changes):
    """The tiny CLIP text encoder's config (32 wide, 2 layers) with the tiny tokenizer's ids."""
    from transformers import CLIPTextConfig

    vocab, _ = _tiny_tokenizer_files()
    settings = dict(
        vocab_size=len(vocab),
        hidden_size=32,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=77,
        projection_dim=32,
        bos_token_id=vocab["<|startoftext|>"],
        eos_token_id=vocab["<|endoftext|>"],
        pad_token_id=vocab["<|endoftext|>"],
    )
    return CLIPTextConfig(**{**settings, **changes})


def _tiny_vae(seed: int, **changes):
    from diffusers import AutoencoderKL

    import torch

    torch.manual_seed(seed)
    settings = dict(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(32, 32, 64, 64),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=32,
        sample_size=64,
    )
    return AutoencoderKL(**{**settings, **changes})


def tiny_sd2_unet_config() -> dict:
    """SD 2.1's UNet block structure (linear proj_in/out, per-block head counts, upcast attention) at tiny widths."""
    config = _resource_config("sd2_unet_config.json")
    config.update(block_out_channels=[32, 64, 64, 64], attention_head_dim=[2, 4, 4, 4], cross_attention_dim=32, sample_size=8)
    return config


@quiet_libraries()
def build_tiny_sd2_pipeline(seed: int = TINY_SEED):
    """SD 2.x's architecture at tiny widths with random weights, deterministically from `seed`: a
    v-prediction DDIM schedule as SD 2.1's, and an OpenCLIP-style text encoder (gelu)."""
    import torch
    from diffusers import DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**tiny_sd2_unet_config())
    vae = _tiny_vae(seed + 1)
    torch.manual_seed(seed + 2)
    text_encoder = CLIPTextModel(_tiny_text_encoder_config(hidden_act="gelu"))
    scheduler = DDIMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False, set_alpha_to_one=False,
        steps_offset=1, num_train_timesteps=1000, prediction_type="v_prediction",
    )
    return StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=_tiny_tokenizer(), unet=unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )


def tiny_sdxl_unet_config() -> dict:
    """SDXL base's UNet block structure (DownBlock2D + CrossAttnDownBlock2D x2, more transformer layers
    deeper down, "text_time" added conditioning) at tiny widths, for two 32-wide text encoders."""
    config = _resource_config("sdxl_unet_config.json")
    config.update(
        block_out_channels=[32, 64, 64],
        attention_head_dim=[2, 4, 4],
        transformer_layers_per_block=[1, 1, 2],
        cross_attention_dim=64,  # the two encoders' hidden states side by side
        addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=6 * 8 + 32,  # six time ids + the pooled embedding
        sample_size=8,
    )
    return config


@quiet_libraries()
def build_tiny_sdxl_pipeline(seed: int = TINY_SEED):
    """SDXL's architecture at tiny widths with random weights, deterministically from `seed`: a CLIP text
    encoder and a second one with a projection (pooled embedding), SDXL's VAE scaling and Euler schedule."""
    import torch
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**tiny_sdxl_unet_config())
    vae = _tiny_vae(seed + 1, scaling_factor=0.13025, force_upcast=True)
    torch.manual_seed(seed + 2)
    text_encoder = CLIPTextModel(_tiny_text_encoder_config())
    torch.manual_seed(seed + 3)
    text_encoder_2 = CLIPTextModelWithProjection(_tiny_text_encoder_config(hidden_act="gelu"))
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
        steps_offset=1, timestep_spacing="leading", prediction_type="epsilon",
    )
    return StableDiffusionXLPipeline(
        vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=_tiny_tokenizer(),
        tokenizer_2=_tiny_tokenizer(), unet=unet, scheduler=scheduler, add_watermarker=False,
    )


def _resource_config(name: str) -> dict:
    config = json.loads(resources.files("sdtune.resources").joinpath(name).read_text())
    config.pop("_class_name", None)
    config.pop("_diffusers_version", None)
    return config


@quiet_libraries()
def build_sd14_pipeline(seed: int = TINY_SEED, device: str = "cpu"):
    """SD v1.4's architecture at full size with random weights, deterministically from `seed`: its UNet,
    KL VAE and CLIP ViT-L/14 text encoder built from their configs (shipped with the package), with the
    tiny model's offline tokenizer. It draws noise, at SD v1.4's cost in time and memory: for benchmarks.
    `device` is where the weights are initialised (a GPU does it in a moment)."""
    import torch
    from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    vocab, _ = _tiny_tokenizer_files()
    ids = dict(bos_token_id=vocab["<|startoftext|>"], eos_token_id=vocab["<|endoftext|>"], pad_token_id=vocab["<|endoftext|>"])
    with torch.device(device):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(**_resource_config("sd14_unet_config.json"))
        torch.manual_seed(seed + 1)
        vae = AutoencoderKL(**_resource_config("sd14_vae_config.json"))
        torch.manual_seed(seed + 2)
        text_encoder = CLIPTextModel(CLIPTextConfig(**{**_resource_config("sd14_text_encoder_config.json"), **ids}))
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=_tiny_tokenizer(),
        unet=unet,
        scheduler=_sd14_scheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def tiny_pretrained_path() -> Path:
    """The pretrained tiny model's folder (package data); a one-line error where it is not installed."""
    target = Path(str(resources.files("sdtune.resources").joinpath(TINY_DIGITS_FOLDER)))
    if not (target / "model_index.json").exists():
        raise SdtuneError(
            f"--model {TINY}: the pretrained tiny weights are not installed ({target}); "
            f"make them with scripts/pretrain_tiny.py, or use --model {TINY_RANDOM}"
        )
    return target


CACHE_MANIFEST = "sdtune-cache.json"  # the SHA-256 of every file of a cached model, written when it is built


def tiny_random_path() -> Path:
    """The random tiny model's folder in diffusers layout, built on first use."""
    return _built_pipeline_path(f"tiny-v{TINY_VERSION}", build_tiny_pipeline)


def tiny_sd2_random_path() -> Path:
    return _built_pipeline_path(f"tiny-sd2-v{FAMILY_TINY_VERSION}", build_tiny_sd2_pipeline)


def tiny_sdxl_random_path() -> Path:
    return _built_pipeline_path(f"tiny-sdxl-v{FAMILY_TINY_VERSION}", build_tiny_sdxl_pipeline)


def sd14_random_path(device: str = "cpu") -> Path:
    """A folder in diffusers layout holding `build_sd14_pipeline()` (4.3 GB in fp32), built on first use."""
    return _built_pipeline_path(f"sd14-random-v{SD14_RANDOM_VERSION}", lambda: build_sd14_pipeline(device=device))


def _built_pipeline_path(name: str, build) -> Path:
    """A built pipeline's cached folder. It is checked each time (every file against the digest
    written with it); a damaged one is rebuilt, with a warning."""

    from .fileio import make_temp_folder, sweep_dead_temporaries, temp_path

    target = cache_dir() / "models" / name
    target.parent.mkdir(parents=True, exist_ok=True)
    sweep_dead_temporaries(target.parent, lambda entry: entry == target.name)
    problem = cached_model_problem(target) if target.exists() else None
    if target.exists() and problem is None:
        return target
    if problem is not None:
        warn(f"cached model {target} is damaged ({problem}): rebuilt")
    staging = temp_path(target)
    try:
        make_temp_folder(staging)
        with quiet_libraries():  # diffusers' "Writing model shards" bar too
            build().save_pretrained(staging, safe_serialization=True)
        write_manifest(staging)
        try:
            publish_directory(staging, target, replace=problem is not None)
        except OSError:
            # Another process finished first; its copy is identical.
            if cached_model_problem(target) is not None:
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def _digest(path: Path) -> str:
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_manifest(folder: Path) -> None:
    """The digest of every file under `folder`, in `folder/sdtune-cache.json`."""
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.name != CACHE_MANIFEST)
    manifest = {str(p.relative_to(folder)): _digest(p) for p in files}
    (folder / CACHE_MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n", encoding="utf-8")


def cached_model_problem(folder: Path) -> str | None:
    """What is wrong with a cached model folder, or None: every file its manifest lists must be there
    with the same digest (a folder from before manifests: model_index.json and each component's
    safetensors weights with a sound header)."""
    from .safetensors_checks import read_safetensors_header

    if not (folder / "model_index.json").is_file():
        return "no model_index.json"
    manifest_path = folder / CACHE_MANIFEST
    if manifest_path.is_file():
        try:
            manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
            for name, digest in manifest.items():
                if not (folder / name).is_file():
                    return f"{name} is missing"
                if _digest(folder / name) != digest:
                    return f"{name} is not the file written"
        except (OSError, ValueError, AttributeError) as error:
            return f"unreadable {CACHE_MANIFEST} ({error})"
        return None
    for component in ("unet", "vae", "text_encoder"):
        weights = sorted((folder / component).glob("*.safetensors"))
        if not weights:
            return f"no {component} weights"
        try:
            read_safetensors_header(weights[0])
        except (SdtuneError, OSError) as error:
            return str(error)
    return None


# ---------------------------------------------------------------------------------------------
# Loading any model


def resolve_model(model: str) -> str:
    """The path or hub id that `from_pretrained` should read for `model`."""
    if model == TINY:
        return str(tiny_pretrained_path())
    if model == TINY_RANDOM:
        return str(tiny_random_path())
    if model == TINY_SD2_RANDOM:
        return str(tiny_sd2_random_path())
    if model == TINY_SDXL_RANDOM:
        return str(tiny_sdxl_random_path())
    return model


# The pipeline classes sdtune trains and samples (SD 1.x and 2.x; SDXL) and the components each needs.
# Others (SD3, Flux, ...) are refused by the name in their model_index.json before anything loads.
SD_COMPONENTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
SUPPORTED_PIPELINES = {
    "StableDiffusionPipeline": SD_COMPONENTS,
    "StableDiffusionXLPipeline": SD_COMPONENTS + ("text_encoder_2", "tokenizer_2"),
}
FAMILY_NAMES = {"StableDiffusionPipeline": "SD 1.x/2.x", "StableDiffusionXLPipeline": "SDXL"}
CONFIG_FILES = {"unet": "unet/config.json", "vae": "vae/config.json", "scheduler": "scheduler/scheduler_config.json"}
TEXT_ENCODER_COMPONENTS = ("text_encoder", "text_encoder_2")


@dataclass
class ModelConfigs:
    """A pipeline's configs, read without its weights: what sizes it takes is known before it loads."""

    pipeline: str  # model_index.json's _class_name
    unet: dict
    vae: dict
    scheduler: dict
    # (transformers class, config) of each text encoder whose config could be read, in pipeline order
    text_encoders: list = field(default_factory=list)

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.get("block_out_channels", [0] * 4)) - 1)

    @property
    def native_resolution(self) -> int:
        return int(self.unet.get("sample_size", 64)) * self.vae_scale_factor

    @property
    def is_sdxl(self) -> bool:
        return self.pipeline == "StableDiffusionXLPipeline"


def read_model_configs(model: str) -> ModelConfigs:
    """`model`'s model_index.json, UNet, VAE and scheduler configs, from its folder or the Hugging Face
    cache (the hub where it is online); a one-line error where the model cannot be found, is no
    diffusers pipeline, or is a pipeline sdtune cannot train."""
    source = resolve_model(model)
    path = Path(source)
    if path.exists():
        if not path.is_dir() or not (path / "model_index.json").is_file():
            raise SdtuneError(f"--model {shell_word(model)}: not a diffusers pipeline folder (no model_index.json)")
        index = _read_config(model, path / "model_index.json")
        check_pipeline_class(model, index)
        missing = [c for c in SUPPORTED_PIPELINES[index["_class_name"]] if not (path / c).is_dir()]
        if missing:
            raise SdtuneError(
                f"--model {shell_word(model)}: the folder lacks component(s) {', '.join(missing)}, which a "
                f"{index['_class_name']} needs"
            )
        # a folder of it that model_index.json does not name (`[null, null]`) is loaded as None
        unnamed = [c for c in SUPPORTED_PIPELINES[index["_class_name"]] if not _names_component(index.get(c))]
        if unnamed:
            raise SdtuneError(
                f"--model {shell_word(model)}: its model_index.json names no {', '.join(unnamed)}, which a "
                f"{index['_class_name']} needs"
            )
        files = {name: path / file for name, file in CONFIG_FILES.items()}
        read_optional = path.joinpath
    else:
        check_hub_id(model, source)
        fetch = _HubFiles(model, source)
        index = _read_config(model, fetch("model_index.json"))
        check_pipeline_class(model, index)
        missing = [c for c in SUPPORTED_PIPELINES[index["_class_name"]] if not _names_component(index.get(c))]
        if missing:
            raise SdtuneError(
                f"--model {shell_word(model)}: its model_index.json lacks component(s) {', '.join(missing)}, which a "
                f"{index['_class_name']} needs"
            )
        files = {name: fetch(file) for name, file in CONFIG_FILES.items()}
        read_optional = fetch
    configs = {name: _read_config(model, file) for name, file in files.items()}
    encoders = []
    for name in TEXT_ENCODER_COMPONENTS:
        if _names_component(index.get(name)):
            try:  # only for the memory estimate: loading the model says what is wrong with an encoder
                encoders.append((index[name][1], _read_config(model, read_optional(f"{name}/config.json"))))
            except SdtuneError:
                pass
    return ModelConfigs(index["_class_name"], **configs, text_encoders=encoders)


def _names_component(entry) -> bool:
    """Whether a model_index.json entry names a component (`[library, class]`, not `[null, null]`)."""
    return isinstance(entry, list) and len(entry) == 2 and entry[1] is not None


def check_pipeline_class(model: str, index: dict) -> None:
    """Refuse a pipeline sdtune cannot train (SD3, Flux, ...) by the class its model_index.json names."""
    name = index.get("_class_name")
    if not isinstance(name, str):
        raise SdtuneError(f"--model {shell_word(model)}: model_index.json names no pipeline class (_class_name)")
    if name not in SUPPORTED_PIPELINES:
        raise SdtuneError(
            f"--model {shell_word(model)} is a {name}, which sdtune does not support yet; it trains and samples "
            f"{' and '.join(SUPPORTED_PIPELINES)} models (SD 1.x, 2.x and SDXL)"
        )


def check_hub_id(model: str, source: str) -> None:
    """A model that is no folder is a hub id, ORG/NAME of the hub's characters (else huggingface_hub raises its own
    error, in a paragraph, as the cache is looked up)."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if source.startswith((".", "/", "~")) or source.count("/") != 1:
        raise SdtuneError(f"--model {shell_word(model)}: no such folder, and not a hub id; use --model tiny or a local folder")
    try:
        validate_repo_id(source)
    except HFValidationError:
        raise SdtuneError(f"--model {shell_word(model)}: no such folder, and not a hub id (ORG/NAME of letters, digits, '-', '_' "
                          "and '.', not '--' or '..', neither starting nor ending with '-' or '.'); use --model tiny or a "
                          "local folder") from None


BUILT_TINY_MODELS = (TINY_RANDOM, TINY_SD2_RANDOM, TINY_SDXL_RANDOM)  # built on first use: always there


def check_model_here(model: str) -> None:
    """What a run's plan (`read_model_configs`) refuses of `model` from this machine alone, never asking the hub: a
    name that is no tiny model, folder or hub id; a folder that is no pipeline sdtune trains; a hub id whose
    model_index.json, in the Hugging Face cache, names one it does not. A hub id not in the cache is left to the run
    (its own plan refuses it where the hub is offline, its loading where the hub lacks it): a sweep's plan is read,
    and dry-run, where its model is not."""
    from huggingface_hub import try_to_load_from_cache

    if model in BUILT_TINY_MODELS:
        return
    source = resolve_model(model)  # the pretrained tiny model: installed
    if Path(source).exists():
        read_model_configs(model)
        return
    check_hub_id(model, source)
    cached = try_to_load_from_cache(source, "model_index.json")
    if isinstance(cached, str):
        check_pipeline_class(model, _read_config(model, Path(cached)))


def _read_config(model: str, file: Path) -> dict:
    try:
        value = json.loads(Path(file).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise SdtuneError(f"--model {shell_word(model)}: {Path(file).parent.name}/{Path(file).name} is missing") from None
    except (OSError, ValueError) as error:
        raise SdtuneError(f"--model {shell_word(model)}: {Path(file).name} is not a readable JSON config ({type(error).__name__})") from None
    if not isinstance(value, dict):
        raise SdtuneError(f"--model {shell_word(model)}: {Path(file).name} is not a JSON object")
    return value


def hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")


def not_found(model: str, reason: str) -> str:
    """The one line for a hub id that is not on disk and cannot be fetched."""
    return f"--model {shell_word(model)}: not in the local Hugging Face cache, and {reason}; use --model tiny or a local folder"


class _HubFiles:
    """A hub model's small files: from the Hugging Face cache, else downloaded where the hub is online.

    The hub is asked about the model once first (`model_info`), which fails fast and clearly when it
    cannot be reached or has no such model; file downloads retry for half a minute before they fail.
    """

    def __init__(self, model: str, repo: str):
        self.model, self.repo, self.asked = model, repo, False

    def __call__(self, filename: str) -> Path:
        from huggingface_hub import hf_hub_download, model_info, try_to_load_from_cache

        cached = try_to_load_from_cache(self.repo, filename)
        if isinstance(cached, str):
            return Path(cached)
        if hub_offline():
            raise SdtuneError(not_found(self.model, "the hub is offline (HF_HUB_OFFLINE)"))
        try:
            if not self.asked:
                model_info(self.repo)
                self.asked = True
            return Path(hf_hub_download(self.repo, filename))
        except Exception as error:
            raise SdtuneError(not_found(self.model, hub_reason(error))) from None


def hub_reason(error: BaseException) -> str:
    """Why a hub download failed, in a few whole words (the libraries' messages run to paragraphs)."""
    kinds = {type_.__name__ for type_ in type(error).__mro__}
    cause = error.__cause__ or error.__context__
    if cause is not None and cause is not error:
        kinds |= {type_.__name__ for type_ in type(cause).__mro__}
    if "GatedRepoError" in kinds:
        return "it is gated on the hub: accept its licence there and log in (hf auth login)"
    if "RepositoryNotFoundError" in kinds:
        return "the hub has no such model (or it is private: log in with hf auth login)"
    if "RevisionNotFoundError" in kinds:
        return "the hub has no such revision of it"
    if kinds & {"ConnectError", "ConnectionError", "NetworkError", "TimeoutException", "Timeout", "TransportError",
                "LocalEntryNotFoundError", "OfflineModeIsEnabled"}:
        return "the hub could not be reached"
    if kinds & {"EntryNotFoundError", "RemoteEntryNotFoundError"}:
        return "the hub's copy lacks a file the pipeline needs"
    return first_sentence(error)


@quiet_libraries()
def load_pipeline(model: str = DEFAULT_MODEL, dtype=None, configs: ModelConfigs | None = None):
    """Load a Stable Diffusion pipeline from "tiny", "tiny-random", a hub id or a local diffusers folder.

    A hub id is read from the local Hugging Face cache first and downloaded only where that fails
    and the network is allowed. The safety checker and its feature extractor are not loaded.
    `configs`: `read_model_configs(model)`, where the caller read them already.
    """
    import diffusers
    import torch
    from diffusers.utils import logging as diffusers_logging

    if configs is None:
        configs = read_model_configs(model)  # a model that is missing, or not a pipeline sdtune trains, stops here
    pipeline_class = getattr(diffusers, configs.pipeline)
    source = resolve_model(model)
    path = Path(source)
    is_folder = path.exists()
    if is_folder:
        for component in ("unet", "vae") + tuple(c for c in SUPPORTED_PIPELINES[configs.pipeline] if c.startswith("text_encoder")):
            files = [p for p in (path / component).iterdir() if p.is_file()]
            pickled = [p.name for p in files if p.suffix in PICKLE_WEIGHTS]
            if pickled and not any(p.suffix == ".safetensors" for p in files):
                raise SdtuneError(
                    f"--model {shell_word(model)}: {component}/ holds only pickled weights ({pickled[0]}), which can run "
                    "code when loaded; sdtune reads safetensors only"
                )

    kwargs = dict(
        feature_extractor=None,
        dtype=dtype or torch.float32,
        use_safetensors=True,  # pickled weights (.bin, .ckpt) can run code when loaded: never read them
    )
    if is_folder and _fp16_variant_only(path, SUPPORTED_PIPELINES[configs.pipeline]):
        kwargs["variant"] = "fp16"  # diffusers then reads a component's plain weights where it has no variant
    if configs.is_sdxl:
        kwargs.update(image_encoder=None, add_watermarker=False)
    else:
        kwargs.update(safety_checker=None, requires_safety_checker=False)
    verbosity = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity(diffusers_logging.CRITICAL)  # failures become one SdtuneError line
    try:
        try:
            pipe = pipeline_class.from_pretrained(source, local_files_only=True, **kwargs)
        except Exception as local_error:
            if is_folder:
                raise SdtuneError(f"--model {shell_word(model)}: could not load the folder: {first_sentence(local_error)}") from None
            pipe = _cached_fp16_variant(pipeline_class, source, kwargs)
        if pipe is None:
            weights = f"--model {shell_word(model)}: its weights are not in the local Hugging Face cache, and"
            if hub_offline():
                raise SdtuneError(f"{weights} the hub is offline (HF_HUB_OFFLINE); use --model tiny or a local folder") from None
            try:
                pipe = pipeline_class.from_pretrained(source, **kwargs)
            except Exception as remote_error:
                raise SdtuneError(
                    f"{weights} they could not be downloaded: {hub_reason(remote_error)}; use --model tiny or a local folder"
                ) from None
    finally:
        diffusers_logging.set_verbosity(verbosity)
    pipe.set_progress_bar_config(disable=True)
    pipe.sdtune_model_id = model
    return pipe



def _cached_fp16_variant(pipeline_class, source: str, kwargs: dict):
    """The pipeline from a Hugging Face cache that holds its fp16 variant alone (what `from_pretrained(...,
    variant="fp16")`, as SDXL's model cards load it, downloads), or None."""
    try:
        return pipeline_class.from_pretrained(source, local_files_only=True, **{**kwargs, "variant": "fp16"})
    except Exception:
        return None


def _fp16_variant_only(path: Path, components) -> bool:
    """Whether some component of the folder holds its weights only as diffusers' fp16 variant
    (`model.fp16.safetensors`, sharded `...fp16-00001-of-00002...`), as a download of an SDXL repository's
    fp16 files leaves it: from_pretrained finds them only when asked for the variant."""
    import re

    for component in components:
        names = [p.name for p in (path / component).glob("*.safetensors")] if (path / component).is_dir() else []
        if names and all(re.search(r"\.fp16[.-]", name) for name in names):
            return True
    return False


# ---------------------------------------------------------------------------------------------
# What differs between families, seen from a loaded pipeline


def is_sdxl(pipe) -> bool:
    """Whether `pipe` conditions its UNet as SDXL does (two text encoders, pooled embedding, time ids)."""
    return getattr(pipe, "text_encoder_2", None) is not None


def text_encoders(pipe) -> list:
    """The pipeline's text encoders, in the order their hidden states are concatenated."""
    return [pipe.text_encoder] + ([pipe.text_encoder_2] if is_sdxl(pipe) else [])


def tokenizers(pipe) -> list:
    """The tokenizer of each of `text_encoders(pipe)`."""
    return [pipe.tokenizer] + ([pipe.tokenizer_2] if is_sdxl(pipe) else [])
