"""What a run's sizes need, checked against the model and the machine before the model loads.

`sdtune train` and `sdtune sample` (and evaluate, compare and explain, which sample) call these once
their settings are valid and before any weight is read, so a size the model or the machine cannot
take is one line and exit code 2, not a library error (or an hour of work) later. Everything here
reads the model's configs only (`models.read_model_configs`), never its weights:

- the smallest resolution (of a width × height drawing, its smaller side): below it some GroupNorm of the
  UNet or the VAE would see a single value per group at batch size 1, which torch refuses to normalise (the
  tiny model's 32 channels in 32 groups, downsampled to 1×1 at 16 px, reach that; SD v1.4's widths never do);
- denoising steps: at most the scheduler's training timesteps (1000 for SD), as diffusers'
  schedulers require;
- memory: a lower bound of what the run keeps at once (the UNet's and the VAE's weights, the trained parameters
  with their gradients and optimiser state, counted by injecting the method into the UNet built on
  the meta device, what the method forms for backward (`Method.backward_bytes`), the text encoders'
  activations where the backward runs through them (trained, or training new token rows), the batch with its
  class examples; apart from those, as they are never alive together: the VAE encoding one image, with its live
  full-resolution maps) against the memory of the device the run uses (the GPU, else the machine's RAM), and what stays
  in RAM either way (the training and class images, at their buckets' sizes and as often as buckets frame them, the fp32 VAE decoder fp16 training keeps for overflowing
  decodes, the images sampling keeps for its grid) against
  the RAM. The bound is never above what the run needs, so a refusal is certain; a run that passes
  may still run out;
- the number of micro-batches (steps × gradient accumulation) and the metrics log it writes
  (a line a step) against the output folder's free disk.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import SdtuneError
from .fileio import human_bytes
from .optimizers import OPTIMIZERS
from .token_embeddings import new_token_numbers

# The VAE decoder's last resnet keeps its input for the residual while each of its operations reads one
# full-resolution map and writes another: three at once (measured: the tiny VAE's 2048 px decode peaked at 5.3,
# benchmarks/RESULTS.md). Attention adds no map of tokens²: diffusers' default processor calls PyTorch's
# scaled_dot_product_attention, whose flash and memory-efficient kernels (CPU and CUDA) never form the scores.
DECODER_MAPS = 3
# The VAE encoder under no_grad keeps at most three of its full-resolution maps at once, as the decoder does: a resnet's
# input for the residual, an operation's input and output (measured: the tiny VAE's 1024 and 2048 px encodes peaked
# at 4.3 maps, the CPU convolutions' reordered copies on top, benchmarks/RESULTS.md).
ENCODER_MAPS = 3
METRICS_LINE_BYTES = 64  # metrics.jsonl: a step's line is longer than this
MAX_MICRO_BATCHES = 10**12  # over 30 years at a thousand micro-batches a second


# ---------------------------------------------------------------------------------------------
# What the model takes


def fewest_values_per_group(configs, resolution: int) -> tuple[int, str]:
    """The fewest values any GroupNorm of the UNet and the VAE (encoder and decoder) normalises per
    group for one image of `resolution` pixels, and where."""
    fewest = (math.inf, "")

    def norm(channels: int, groups: int | None, size: int, where: str) -> None:
        nonlocal fewest
        if groups:
            values = channels // groups * size * size
            fewest = min(fewest, (values, where))

    unet, vae = configs.unet, configs.vae
    widths = list(unet.get("block_out_channels", []))
    size = resolution // configs.vae_scale_factor
    for i, width in enumerate(widths):  # each down block's first resnet takes the previous block's channels
        norm(min(widths[max(i - 1, 0)], width), unet.get("norm_num_groups", 32), size, f"UNet block {i}")
        if i < len(widths) - 1:
            size = -(-size // 2)  # a stride-2 convolution with padding 1
    widths = list(vae.get("block_out_channels", []))
    groups = vae.get("norm_num_groups", 32)
    size = resolution
    for i, width in enumerate(widths):
        norm(min(widths[max(i - 1, 0)], width), groups, size, f"VAE encoder block {i}")
        if i < len(widths) - 1:
            size //= 2  # the VAE pads on one side only
    latent = resolution // configs.vae_scale_factor
    for i, width in enumerate(reversed(widths)):
        norm(width, groups, latent * 2**i, f"VAE decoder block {i}")
    return fewest


def smallest_resolution(configs) -> int:
    """The smallest resolution (a multiple of 8) at which every GroupNorm sees more than one value per group."""
    step = 8
    resolution = step
    while fewest_values_per_group(configs, resolution)[0] <= 1 and resolution < 4096:
        resolution += step
    return resolution


def drawn_size(width: int | None, height: int | None, resolution: int | None, native: int) -> tuple[int, int]:
    """The (width, height) sampling draws: --width and --height each where given, else --resolution's square,
    else the model's native size."""
    square = resolution or native
    return width or square, height or square


def check_resolution(model: str, configs, resolution: int | None) -> int:
    """The resolution a run uses (the model's native one by default); too small a one is refused."""
    return check_image_size(model, configs, resolution)[0]


def check_image_size(model: str, configs, resolution: int | None, width: int | None = None,
                     height: int | None = None, flags: tuple[str, str] = ("--width", "--height")) -> tuple[int, int]:
    """The (width, height) a drawing uses (`drawn_size`); too small a one is refused. The smaller side
    decides, named by the flag that set it (`flags`: those of the width and height): an image at least that side's
    square has at least that square's values in every GroupNorm group."""

    size = drawn_size(width, height, resolution, configs.native_resolution)
    least = smallest_resolution(configs)
    side = min(size)
    if side < least:
        given = width if size[0] == side else height
        flag = (flags[0] if size[0] == side else flags[1]) if given else "--resolution"
        _, where = fewest_values_per_group(configs, side)
        raise SdtuneError(
            f"{flag} {side} is too small for {model}: at least {least} (below it, a GroupNorm of the "
            f"{where} would normalise a single value per group)"
        )
    return size


def size_flags(resolution: int | None, width: int | None, height: int | None, size: tuple[int, int],
               names: tuple[str, str] = ("--width", "--height")) -> str:
    """The flags that set a drawing's size, as a message names them: `--width 64 --height 128`, `--resolution 512`
    (`names`: the width's and height's flags)."""
    flags = [f"{names[0]} {width}"] * bool(width) + [f"{names[1]} {height}"] * bool(height)
    if not (width and height) and (resolution or not flags):  # --resolution (or the model's own size) sets a side
        flags.append(f"--resolution {resolution or size[0]}")
    return " ".join(flags)


def check_sampling_steps(model: str, configs, steps: int) -> None:
    timesteps = int(configs.scheduler.get("num_train_timesteps", 1000))
    if steps > timesteps:
        raise SdtuneError(f"--steps {steps:,}: {model}'s scheduler has {timesteps} timesteps, so at most {timesteps} denoising steps")


def check_timestep_range(model: str, configs, least: int, most: int | None) -> None:
    """`--min-timestep`/`--max-timestep` within the scheduler's training timesteps."""
    timesteps = int(configs.scheduler.get("num_train_timesteps", 1000))
    has = f"{model}'s scheduler has {timesteps} timesteps (0 to {timesteps - 1})"
    if most is not None and most > timesteps:
        raise SdtuneError(f"--max-timestep {most}: {has}, so --max-timestep {timesteps} at most")
    if least >= timesteps:
        raise SdtuneError(f"--min-timestep {least}: {has}")


def check_zero_terminal_snr(model: str, configs) -> None:
    """`--zero-terminal-snr` needs a v-prediction model: at SNR 0 an ε or sample prediction has nothing to
    predict from, and DDIM/DDPM sampling divides by √ᾱ_T = 0 (Lin et al. 2023)."""
    prediction = configs.scheduler.get("prediction_type", "epsilon")
    if prediction != "v_prediction":
        raise SdtuneError(f"--zero-terminal-snr needs a v-prediction model (Lin et al. 2023); {model} predicts {prediction}")


def check_clip_skip(model: str, configs, clip_skip: int) -> None:
    """`--clip-skip k` names one of the text encoder's layers, on a one-encoder model: SDXL conditions on its
    encoders' penultimate layers by design (kohya-ss and AUTOMATIC1111 leave its clip skip aside)."""
    if clip_skip == 1:
        return
    if len(configs.text_encoders) > 1:
        raise SdtuneError(f"--clip-skip applies to SD 1.x and 2.x; {model} (SDXL) already conditions on its text encoders' penultimate layers")
    layers = configs.text_encoders[0][1].get("num_hidden_layers", 12)
    if clip_skip > layers:
        raise SdtuneError(f"--clip-skip {clip_skip} skips past the first of {model}'s {layers} text-encoder layers; give at most {layers}")


def check_debiased_estimation(model: str, configs, most: int | None, zero_terminal_snr: bool = False) -> None:
    """`--debiased-estimation`'s weights exist for the model's scheduler: ε- or v-prediction (sd-scripts' two),
    and under ε a finite 1/√SNR at every timestep drawn (a zero-terminal-SNR schedule's last has SNR 0)."""
    from .losses import DEBIASED_PREDICTION_TYPES

    prediction = configs.scheduler.get("prediction_type", "epsilon")
    if prediction not in DEBIASED_PREDICTION_TYPES:
        raise SdtuneError(f"--debiased-estimation weights ε- and v-prediction models; {model} predicts {prediction}")
    timesteps = int(configs.scheduler.get("num_train_timesteps", 1000))
    zero_snr = zero_terminal_snr or configs.scheduler.get("rescale_betas_zero_snr")
    if prediction == "epsilon" and zero_snr and (most or timesteps) == timesteps:
        raise SdtuneError(
            f"--debiased-estimation: 1/√SNR is infinite at {model}'s last timestep (its schedule ends at SNR 0); "
            f"add --max-timestep {timesteps - 1}"
        )


# ---------------------------------------------------------------------------------------------
# What the machine takes


def device_memory() -> tuple[int, str] | None:
    """The memory of the GPU this process would use (Accelerate picks it the same way), and how to
    name it; None where the run uses the CPU (its tensors live in RAM)."""
    import torch

    if not cpu_forced() and torch.cuda.is_available():
        index = int(os.environ.get("LOCAL_RANK", "0") or 0) % torch.cuda.device_count()
        props = torch.cuda.get_device_properties(index)
        return props.total_memory, f"the GPU ({props.name}) has {human_bytes(props.total_memory)}"
    return None


def training_device_type() -> str:
    """The device type a run computes on, as Accelerate picks it: "cuda", "mps" or "cpu" (`device_memory`'s choice)."""
    import torch

    if device_memory():
        return "cuda"
    return "mps" if not cpu_forced() and torch.backends.mps.is_available() else "cpu"


def cpu_forced() -> bool:
    """Whether Accelerate is told to run on the CPU (`accelerate launch --cpu`, ACCELERATE_USE_CPU)."""
    return os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes")


def ram_bytes() -> int:
    try:
        import psutil  # Accelerate's own requirement

        return int(psutil.virtual_memory().total)
    except ImportError:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def check_memory(on_device: list[tuple[str, str, int]], on_host: list[tuple[str, str, int]] = ()) -> None:
    """What a run keeps at once, each part (the setting behind it, what it is, its bytes): `on_device`
    where the run computes (the GPU's memory, or RAM on a CPU), `on_host` in RAM either way. Any part
    alone, or a memory's parts together, beyond that memory is a one-line refusal."""
    ram = (ram_bytes(), f"this machine has {human_bytes(ram_bytes())} of memory")
    gpu = device_memory()
    groups = [(list(on_device), gpu), (list(on_host), ram)] if gpu else [(list(on_device) + list(on_host), ram)]
    for parts, (available, device) in groups:
        if not parts:
            continue
        culprit, what, largest = max(parts, key=lambda part: part[2])
        if largest > available:
            raise SdtuneError(f"{culprit} needs more memory than there is: {human_bytes(largest)} for {what} alone, and {device}")
        total = sum(part[2] for part in parts)
        if total > available:
            listed = ", ".join(f"{what} {human_bytes(size)}" for _, what, size in parts if size)
            raise SdtuneError(f"this run needs at least {human_bytes(total)} of memory ({listed}), and {device}")


def vae_feature_map_bytes(configs, width: int, height: int, dtype_bytes: int, maps: int) -> int:
    """`maps` of the VAE's full-resolution feature maps for one image of `width` × `height`."""
    channels = int(configs.vae.get("block_out_channels", [128])[0])
    return maps * channels * width * height * dtype_bytes


def text_encoder_backward_bytes(configs, compute_bytes: int) -> int:
    """What the text encoders keep for backward per prompt when the gradient passes through them, to new token
    rows (--token-embeddings) or trained linears; their frozen weights keep nothing. Measured on CLIP with
    saved_tensors_hooks (benchmarks/RESULTS.md): per layer its two LayerNorms' inputs, attention's q, k, v and
    output, and the MLP activation's input (quick_gelu's sigmoid too); the final LayerNorm's input; each for
    every token of the padded prompt. Their per-token statistics (a few percent) are left out."""
    total = 0
    for _, config in configs.text_encoders:
        try:
            hidden, inner = int(config["hidden_size"]), int(config["intermediate_size"])
            layers, tokens = int(config["num_hidden_layers"]), int(config.get("max_position_embeddings", 77))
        except (KeyError, TypeError, ValueError):  # an encoder that cannot be read counts nothing: a lower bound
            continue
        activation = 2 if config.get("hidden_act", "quick_gelu") == "quick_gelu" else 1
        total += (layers * (6 * hidden + activation * inner) + hidden) * tokens * compute_bytes
    return total


def free_disk(folder: Path) -> tuple[int, Path]:
    """Free bytes where `folder` is (or would be created), and that existing folder."""
    existing = Path(folder).absolute()
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    return shutil.disk_usage(existing).free, existing


# ---------------------------------------------------------------------------------------------
# The checks the commands call


@dataclass
class MethodProbe:
    """A fresh copy of a method injected into the model built from its configs on the meta device."""

    method: Any  # None where the config builds no UNet (loading the model says what is wrong with it)
    unet_parameters: int
    text_encoder_parameters: int  # of the encoders that could be built
    text_encoder_tokens: int  # the prompt length of the encoders (CLIP's 77)
    trains_text_encoders: bool  # injected into the text encoders too

    def unet_counts(self) -> tuple[int, int]:
        trained = self.method.num_parameters() - self.text_trained() if self.method else 0
        return self.unet_parameters - trained, trained

    def text_trained(self) -> int:
        return sum(p.numel() for p in self.method.text_encoder_parameters()) if self.method else 0

    def text_counts(self) -> tuple[int, int]:
        """(frozen, trained) parameters of the text encoders; trained only where the method was injected into them."""
        trained = self.text_trained() if self.trains_text_encoders else 0
        return self.text_encoder_parameters - trained, trained


def vae_parameter_counts(configs) -> tuple[int, int]:
    """(all, decoder side) parameters of the VAE built from its config on the meta device; (0, 0) where it
    cannot be built (loading the model says what is wrong with it): a lower bound."""
    import torch
    from diffusers import AutoencoderKL

    from .precision import decoder_side_names

    try:
        with torch.device("meta"):
            vae = AutoencoderKL.from_config(configs.vae)
    except Exception:
        return 0, 0
    sizes = {name: parameter.numel() for name, parameter in vae.named_parameters()}
    return sum(sizes.values()), sum(sizes[name] for name in decoder_side_names(vae))


_PROBES: OrderedDict = OrderedDict()  # the last probes made: a sweep (or a notebook) checks run after run of one model
_KEPT_PROBES = 16


def probe_method(configs, method, train_text_encoder: bool = False) -> MethodProbe:
    """Inject a fresh copy of `method` into the UNet (and, with `train_text_encoder`, the text encoders whose
    configs were read) built on the meta device: nothing is allocated, whatever the options. What cannot be
    built is left out, so what is counted from it is a lower bound. Kept for the same configs, method and options
    (the probe is read, never changed)."""
    key = json.dumps([configs.unet, configs.text_encoders, method.name, method.options_dict(), train_text_encoder],
                     sort_keys=True, default=str)
    if key in _PROBES:
        _PROBES.move_to_end(key)
        return _PROBES[key]
    _PROBES[key] = probe = _probe_method(configs, method, train_text_encoder)
    if len(_PROBES) > _KEPT_PROBES:
        _PROBES.popitem(last=False)
    return probe


def _probe_method(configs, method, train_text_encoder: bool) -> MethodProbe:
    import torch
    import transformers
    from diffusers import UNet2DConditionModel

    from . import methods

    encoders, tokens = [], 0
    with torch.device("meta"):
        for class_name, config in configs.text_encoders:
            try:
                model_class = getattr(transformers, class_name)
                encoders.append(model_class(model_class.config_class.from_dict(config)))
                tokens = max(tokens, int(config.get("max_position_embeddings", 77)))
            except Exception:
                continue
        text_total = sum(p.numel() for encoder in encoders for p in encoder.parameters())
        try:
            unet = UNet2DConditionModel.from_config(configs.unet)
        except Exception:
            return MethodProbe(None, 0, text_total, tokens, False)
        if train_text_encoder and encoders:
            try:
                probe = methods.create(method.name, **method.options_dict())
                probe.inject(unet, encoders)
            except Exception:  # counted without them
                unet = UNet2DConditionModel.from_config(configs.unet)
            else:  # the parameters after injection: a wrapper's are the model's too
                text_total = sum(p.numel() for encoder in encoders for p in encoder.parameters())
                return MethodProbe(probe, sum(p.numel() for p in unet.parameters()), text_total, tokens, True)
        probe = methods.create(method.name, **method.options_dict())
        probe.inject(unet)
    return MethodProbe(probe, sum(p.numel() for p in unet.parameters()), text_total, tokens, False)


def count_parameters(configs, method) -> tuple[int, int]:
    """(frozen UNet parameters, trained parameters) for `method` injected into the UNet on the meta device
    (`probe_method`); (0, 0) where the config builds no UNet."""
    return probe_method(configs, method).unet_counts()


def count_text_encoder_parameters(configs, method, train: bool) -> tuple[int, int]:
    """(frozen, trained) parameters of the text encoders whose configs were read, built on the meta
    device; trained only where `train` (--train-text-encoder), by injecting a fresh copy of `method`
    into them with the UNet. (0, 0) for what cannot be built: this is a lower bound."""
    return probe_method(configs, method, train).text_counts()


def changed_options(method) -> str:
    """The method and the options that differ from its defaults: `gift (rank=100000)`."""
    changed = [f"{key}={value}" for key, value in method.changed_options().items()]
    return f"{method.name} ({', '.join(changed)})" if changed else method.name


@dataclass
class RunSizes:
    """A training run's sizes, as `check_run_fits` found them (lower bounds for the memory)."""

    resolution: int
    unet_frozen: int  # the UNet's parameters the method leaves frozen
    text_frozen: int  # the text encoders' frozen parameters
    trained: int  # parameters trained (UNet and, with --train-text-encoder, text encoders; new token rows)
    device_bytes: int  # at least this where the run computes (a GPU's memory, or RAM on a CPU): the larger of the two below
    host_bytes: int  # at least this of RAM besides
    step_bytes: int = 0  # what a training step's forward and backward keep there at once
    encoding_bytes: int = 0  # what the VAE's encoding of an image keeps there at once
    held_in_ram: tuple[str, ...] = ()  # what host_bytes holds


def check_run_fits(config, method, image_count: int = 0, class_count: int = 0, image_frames: list | None = None,
                   class_frames: dict | None = None, base_adapter_bytes: int = 0) -> RunSizes:
    """`sdtune train`'s sizes against the model and the machine (`config` resolved; `image_count` training and
    `class_count` class examples); what it found. `image_frames`: the (width, height) each training image is held at
    (its bucket's); `class_frames`: how many class examples are held at each (width, height) (`prior.class_frames`'s `frames`);
    without them, the resolution square. `base_adapter_bytes`: the --base-adapters files' sizes."""
    from .models import read_model_configs

    configs = read_model_configs(config.model)
    resolution = check_resolution(config.model, configs, config.resolution)
    check_timestep_range(config.model, configs, config.min_timestep, config.max_timestep)
    if config.zero_terminal_snr:
        check_zero_terminal_snr(config.model, configs)
    if config.debiased_estimation:
        check_debiased_estimation(config.model, configs, config.max_timestep, config.zero_terminal_snr)
    check_clip_skip(config.model, configs, config.clip_skip)
    if config.text_encoder_2_lr is not None and len(configs.text_encoders) < 2:
        raise SdtuneError(f"--text-encoder-2-lr sets SDXL's second text encoder's rate; {config.model} has one text encoder: use --text-encoder-lr")
    micro_batches = config.steps * config.gradient_accumulation_steps
    if micro_batches > MAX_MICRO_BATCHES:
        raise SdtuneError(
            f"--steps {config.steps:,} × --gradient-accumulation-steps {config.gradient_accumulation_steps:,} "
            f"is {micro_batches:.3g} micro-batches; sdtune runs at most 10^12 (over 30 years at a thousand a second)"
        )
    free, folder = free_disk(Path(config.output))
    if config.steps * METRICS_LINE_BYTES > free:
        raise SdtuneError(
            f"--steps {config.steps:,} writes a line a step to metrics.jsonl, at least "
            f"{human_bytes(config.steps * METRICS_LINE_BYTES)}; {folder} has {human_bytes(free)} free"
        )
    half = config.mixed_precision in ("fp16", "bf16")
    compute_bytes = 2 if half else 4
    probe = probe_method(configs, method, config.train_text_encoder)
    frozen, trained = probe.unet_counts()
    frozen_text, trained_text = probe.text_counts()
    trained += trained_text
    state = 4 + 4 + OPTIMIZERS[config.optimizer].state_bytes + (4 if config.ema_decay else 0)
    token_numbers = new_token_numbers(config, configs)
    token_state = state - (4 if config.ema_decay else 0)  # the new rows are trained beside the method, without its EMA
    pixels = 3 * resolution * resolution * 4  # one image as the dataset holds it (float32)
    # a concept's batches hold at most all its images (the loader says so and trains on them all)
    batch = min(config.batch_size, image_count) if image_count else config.batch_size
    # with prior preservation every batch holds as many class examples as concept ones (prior.collate_with_prior)
    examples = 2 * batch if class_count else batch
    in_batch = f"{batch:,} concept and {batch:,} class images" if class_count else f"{batch:,} images"
    weights = [
        (f"--model {config.model}", "the UNet's frozen weights", frozen * compute_bytes),
        (f"--model {config.model}", "the text encoders' frozen weights", frozen_text * compute_bytes),
    ]
    trained_part = (changed_options(method), f"its {trained:,} trained parameters with their gradients and {config.optimizer} state",
                    trained * state)
    rows_asked, rows = f"--token-embeddings {config.token_embeddings}", f"the new token rows' {token_numbers:,} numbers"
    token_part = (rows_asked, f"{rows} with their gradients and {config.optimizer} state", token_numbers * token_state)
    vae_parameters, decoder_parameters = vae_parameter_counts(configs)
    vae_bytes = 2 if half and not config.no_half_vae else 4
    vae_weights = (f"--model {config.model}", "the VAE's frozen weights", vae_parameters * vae_bytes)
    # the VAE encodes one image per call under no_grad: only its live full-resolution maps count (ENCODER_MAPS)
    encoder_maps = (f"--resolution {resolution}", "one image's first VAE encoder feature maps",
                    vae_feature_map_bytes(configs, resolution, resolution, vae_bytes, ENCODER_MAPS))
    if config.cache_latents:
        # before the loop, every image encoded while the trained parameters have neither gradients nor optimiser state;
        # the loop's batches then hold the latents' mean and log-variance, not the pixels
        encoding = [*weights, vae_weights, (changed_options(method), f"its {trained:,} trained parameters", trained * 4), encoder_maps,
                    (rows_asked, rows, token_numbers * 4)]
        latents = 2 * int(configs.vae.get("latent_channels", 4)) * (resolution // configs.vae_scale_factor) ** 2 * 4
        batch_part = (f"--resolution {resolution} and --batch-size {config.batch_size:,}", f"the latents of a batch of {in_batch}",
                      examples * latents)
    else:  # each step encodes its batch before the UNet runs, the gradients freed by the optimiser's step
        batch_part = (f"--resolution {resolution} and --batch-size {config.batch_size:,}", f"a batch of {in_batch}", examples * pixels)
        encoding = [*weights, vae_weights, (trained_part[0], f"its {trained:,} trained parameters with their {config.optimizer} state",
                               trained * (state - 4)), batch_part, encoder_maps,
                    (rows_asked, f"{rows} with their {config.optimizer} state", token_numbers * (token_state - 4))]
    on_device = [
        *weights,
        trained_part,
        token_part,
        (changed_options(method), "the weights it forms, kept for backward",
         probe.method.backward_bytes(compute_bytes, training_device_type(), half) if probe.method else 0),
        batch_part,
    ]
    if not config.cache_latents:  # the VAE stays beside the UNet to encode each batch (cached, it leaves the device)
        on_device.append(vae_weights)
    if probe.trains_text_encoders or config.token_embeddings:  # the backward runs through the text encoders
        tokens = probe.text_encoder_tokens
        per_prompt = text_encoder_backward_bytes(configs, compute_bytes)
        asked = "--train-text-encoder" if probe.trains_text_encoders else f"--token-embeddings {config.token_embeddings}"
        if probe.trains_text_encoders:  # and the trained linears' inputs, if they are more
            per_prompt = max(per_prompt, probe.method.text_encoder_activation_bytes(tokens, compute_bytes))
        on_device.append((f"{asked} with --batch-size {config.batch_size:,}",
                          f"the text encoders' activations kept for backward ({examples:,} prompts of {tokens} tokens)",
                          examples * per_prompt))
    image_area = sum(w * h for w, h in image_frames) if image_frames is not None else image_count * resolution * resolution
    class_area = sum(w * h * n for (w, h), n in class_frames.items()) if class_frames is not None else class_count * resolution * resolution
    on_host = [(f"--resolution {resolution} with {image_count} training images", "the training images", 3 * 4 * image_area)]
    if config.masked_loss:  # 8-bit, one a pixel
        on_host.append(("--masked-loss", "the training images' masks", image_area))
    if class_count:
        asked = f"--num-class-images {config.num_class_images:,}" if config.num_class_images else f"--class-images {config.class_images}"
        # with buckets a class image is framed into each bucket that draws on it: once, several times or not at all
        framed = f"{class_count:,} class examples (class images framed into the buckets that draw on them)"
        on_host.append((f"{asked} with --buckets" if config.buckets else asked,
                        framed if config.buckets else f"{class_count:,} class images", 3 * 4 * class_area))
    if base_adapter_bytes:  # read whole while they are merged into the frozen weights (adapter.load_adapters)
        on_host.append((f"--base-adapters ({len(config.base_adapters)})", "the base adapters' tensors while they are merged",
                        base_adapter_bytes))
    if config.mixed_precision == "fp16" and not config.no_half_vae:  # `precision.place_frozen_models`
        on_host.append(("--mixed-precision fp16", "the VAE decoder's fp32 weights (for overflowing fp16 decodes)",
                        decoder_parameters * 4))
    check_memory(encoding, on_host)  # first the VAE's encoding, whose maps are freed before the UNet runs
    check_memory(on_device, on_host)  # then the step's forward and backward
    step, encode = sum(part[2] for part in on_device), sum(part[2] for part in encoding)
    return RunSizes(resolution, frozen, frozen_text, trained + token_numbers, max(step, encode), sum(part[2] for part in on_host),
                    step, encode, tuple(part[1] for part in on_host if part[2]))


def check_sample_fits(model: str, config, prompts: int, grid_size, lines=(),
                      flags: tuple[str, str] = ("--width", "--height"), asked: str | None = None) -> tuple[int, int]:
    """`sdtune sample`'s sizes (`config`: a SampleConfig, for `prompts` prompts; `grid_size`: the size of
    its grid, as `sampling.grid_size`; `lines`: the prompts' `data.PromptLine`s, whose prompt-file options --w, --h
    and --s are checked each, naming its line) against the model and the machine; returns the (width, height) it
    draws at (with prompts of their own sizes, the widest width and tallest height: what the memory is checked for).
    `flags`: what sets `config.width` and `config.height`, `asked`: what asks for the images (`train --validate-every`
    draws as `sample` does)."""
    from .models import read_model_configs

    columns = config.num_images * len(config.adapter_scales)
    asked = asked or f"--num-images {config.num_images:,} for {prompts:,} prompt(s)"
    if len(config.adapter_scales) > 1:
        asked += f" at {len(config.adapter_scales)} strengths"
    own = [line for line in lines if line.width or line.height or line.steps]
    width, height, steps = config.width, config.height, config.steps
    if own:
        configs = read_model_configs(model)
        sizes = []
        if len(own) < len(lines) or any(not (line.width and line.height) for line in own):  # some draw at the default size
            sizes.append(check_image_size(model, configs, config.resolution, config.width, config.height, flags))
        for line in own:
            try:
                sizes.append(check_image_size(model, configs, config.resolution, line.width or config.width, line.height or config.height))
                check_sampling_steps(model, configs, line.steps or config.steps)
            except SdtuneError as error:
                raise SdtuneError(f"{line.where}: {error}") from None
        # every image as large as the largest, and the grid's every row as tall as the tallest: a bound from above
        width, height = max(size[0] for size in sizes), max(size[1] for size in sizes)
        steps = max(line.steps or config.steps for line in lines)

    def grid_bytes(width: int, height: int) -> int:
        grid_width, grid_height = grid_size(rows=prompts, columns=columns, image_size=(width, height), header=True)
        return grid_width * grid_height * 3

    return check_drawing_fits(model, config.resolution, steps, prompts * columns, asked, grid_bytes, width=width, height=height,
                              flags=flags)


def check_drawing_fits(model: str, resolution: int | None, steps: int, images: int = 1, asked: str = "",
                       grid_bytes=None, width: int | None = None, height: int | None = None,
                       flags: tuple[str, str] = ("--width", "--height")) -> tuple[int, int]:
    """What drawing `images` images of `width` × `height` (each side by default `resolution`'s; `asked`: the settings
    that ask for them; `flags`: the width's and height's) and their grid (`grid_bytes(width, height)`, if any) needs;
    returns the (width, height) used."""
    from .models import read_model_configs

    configs = read_model_configs(model)
    size = check_image_size(model, configs, resolution, width, height, flags)
    check_sampling_steps(model, configs, steps)
    sized = size_flags(resolution, width, height, size, flags)
    kept = images * size[0] * size[1] * 3 + (grid_bytes(*size) if grid_bytes else 0)  # 8-bit RGB
    # float32: SDXL's VAE decodes in it, and the images whose fp16 decode overflows are decoded again in it (`sampling.decode`)
    decoder = vae_feature_map_bytes(configs, *size, 4, DECODER_MAPS)
    check_memory(
        [(sized, "one image's last VAE decoder feature maps", decoder)],
        [(asked or sized, f"the {images:,} image(s) kept for the grid", kept)],
    )
    return size
