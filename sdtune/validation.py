"""Validation during training: sample grids of fixed prompts and seeds, and a loss that is comparable
across steps (the same images, timesteps and noise every time).

The loss is measured on images held out of the training set (`--validation-images K`) or, with too few
images to spare, on the training images themselves: then it shows how well the concept is fitted, not
how well it generalises.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

from .fileio import atomic_write, counted
from .errors import warn

DEFAULT_PROMPTS = ("photo of a <{concept}>.", "a <{concept}> in the snow", "an oil painting of a <{concept}>")
# a prompt's seeds, steps and guidance where its line in --validation-prompts gives no --d, --s, --l (a --d gives the
# first seed: consecutive, as `sdtune sample --seed` with --num-images)
SAMPLE_SEEDS = (0, 1)
SAMPLE_STEPS = 30
SAMPLE_GUIDANCE = 7.5
SIZE_FLAGS = ("--validation-width", "--validation-height")
LOSS_TIMESTEPS = 5  # evenly spaced over the schedule
LOSS_SEED = 1234
LOSS_BATCH = 8
MIN_TRAINING_IMAGES = 3  # what must remain after holding images out


def validation_lines(config) -> list:
    """The prompts of `config.validation_prompts` (a file), each with its line's kohya-ss options (`data.PromptLine`:
    --n, --w, --h, --d, --s, --l, as `sdtune sample` and kohya-ss' --sample_prompts read them), else a few with the
    concept; placeholders filled, in negative prompts too."""
    from dataclasses import replace

    from .data import PromptLine, fill_placeholders, read_prompt_lines

    if config.validation_prompts:
        lines = read_prompt_lines(config.validation_prompts)
    else:
        lines = [PromptLine(p.format(concept=concept)) for concept in config.concepts for p in DEFAULT_PROMPTS]
    token = config.concept_tokens if len(config.concepts) > 1 else config.token
    return [replace(line, prompt=fill_placeholders(line.prompt, token),
                    negative_prompt=fill_placeholders(line.negative_prompt, token) if line.negative_prompt else line.negative_prompt)
            for line in lines]


def sampling_config(resolution: int | None, width: int | None = None, height: int | None = None):
    """Validation's drawing as `sdtune sample`'s settings: SAMPLE_SEEDS, SAMPLE_STEPS and SAMPLE_GUIDANCE at `width` ×
    `height` (--validation-width and --validation-height; each by default the training resolution's side), for
    `sampling.prompt_settings` to apply each line's options over."""
    from .config import SampleConfig

    return SampleConfig(num_images=len(SAMPLE_SEEDS), seed=SAMPLE_SEEDS[0], steps=SAMPLE_STEPS, guidance=SAMPLE_GUIDANCE,
                        resolution=resolution, width=width, height=height)


def check_validation_fits(config, lines: list) -> tuple[int, int]:
    """The validation images' sizes and steps (`config`: a resolved TrainConfig; `lines`: `validation_lines`) against the
    model and the machine, as `sdtune sample` checks its own, each line's --w, --h and --s naming its file and line,
    before the model loads; returns the largest (width, height) drawn."""
    from .limits import check_sample_fits
    from .sampling import grid_size

    drawing = sampling_config(config.resolution, config.validation_width, config.validation_height)
    asked = f"--validate-every with {counted(len(lines), 'validation prompt')} at {counted(len(SAMPLE_SEEDS), 'seed')}"
    return check_sample_fits(config.model, drawing, len(lines), grid_size, lines, flags=SIZE_FLAGS, asked=asked)


def validation_sizes(config, lines: list) -> list[tuple[int, int]]:
    """Each (width, height) the validation images are drawn at, once, in the order of the lines that first draw it
    (`config`: a resolved TrainConfig; `lines`: `validation_lines`, whose --w and --h win over the settings)."""
    from .limits import drawn_size
    from .models import read_model_configs

    native = read_model_configs(config.model).native_resolution
    sizes = [drawn_size(line.width or config.validation_width, line.height or config.validation_height, config.resolution, native)
             for line in lines]
    return list(dict.fromkeys(sizes))


def describe_sizes(sizes: list[tuple[int, int]]) -> str:
    """'at 64x64', 'at 32x48 and 48x32', or for many sizes 'at 5 sizes, the largest 96x96' (the most pixels)."""
    named = [f"{width}x{height}" for width, height in sizes]
    if len(named) <= 3:
        return "at " + (", ".join(named[:-1]) + " and " if len(named) > 1 else "") + named[-1]
    width, height = max(sizes, key=lambda size: (size[0] * size[1], size))
    return f"at {len(sizes)} sizes, the largest {width}x{height}"


def hold_out(paths: list[Path], count: int, seed: int) -> tuple[list[Path], list[Path]]:
    """(training paths, held-out paths): `count` images chosen with `seed`, or none when too few would remain."""
    import random

    if count <= 0:
        return paths, []
    if len(paths) - count < MIN_TRAINING_IMAGES:
        leaves = (
            f"would leave {len(paths) - count} of {len(paths)} images to train on" if count < len(paths)
            else f"is not fewer than the {counted(len(paths), 'image')}"
        )
        warn(
            f"--validation-images {count} {leaves} (at least {MIN_TRAINING_IMAGES} must stay); "
            "the validation loss is measured on the training images instead",
        )
        return paths, []
    chosen = set(random.Random(seed).sample(range(len(paths)), count))
    return [p for i, p in enumerate(paths) if i not in chosen], [p for i, p in enumerate(paths) if i in chosen]


class ValidationLoss:
    """The denoising loss on fixed images at fixed timesteps with fixed noise.

    Each image is encoded to the mean of its latent distribution once; it is evaluated at LOSS_TIMESTEPS
    timesteps spread over the schedule, each with its own seeded noise.
    """

    def __init__(self, pixels, prompt_embeds, vae, noise_scheduler):
        import torch

        self.noise_scheduler = noise_scheduler
        with torch.no_grad():
            means = vae.encode(pixels.to(vae.device, vae.dtype)).latent_dist.mode().float().cpu()
        means = means * vae.config.scaling_factor
        total = noise_scheduler.config.num_train_timesteps
        steps = torch.linspace(0, total - 1, LOSS_TIMESTEPS + 2)[1:-1].round().long()
        self.latents = means.repeat_interleave(len(steps), dim=0)
        self.timesteps = steps.repeat(len(means))
        generator = torch.Generator().manual_seed(LOSS_SEED)
        self.noise = torch.randn(self.latents.shape, generator=generator)
        self.use_prompt_embeds(prompt_embeds)

    def use_prompt_embeds(self, conditions) -> None:
        """The images' conditioning (`conditioning.UNetConditions`, one per image), e.g. again from a text
        encoder being trained."""
        per_image = len(self.latents) // len(conditions)
        self.prompt_embeds = conditions.cpu().repeat_interleave(per_image)

    def __len__(self) -> int:
        return len(self.latents)

    def __call__(self, unet, autocast, device) -> float:
        import torch

        from .losses import denoising_loss

        total = 0.0
        with torch.no_grad(), evaluating([unet]):
            for start in range(0, len(self), LOSS_BATCH):
                part = slice(start, start + LOSS_BATCH)
                latents = self.latents[part].to(device)
                embeds = self.prompt_embeds[part].to(device)
                loss = denoising_loss(
                    unet, self.noise_scheduler, latents, embeds, self.noise[part].to(device),
                    self.timesteps[part].to(device), autocast,
                )
                total += loss.total.item() * len(latents)
        return total / len(self)


@contextlib.contextmanager
def evaluating(modules):
    """`modules` in eval mode for a while (a method's dropout off), then back in the mode each was in."""
    modes = [module.training for module in modules]
    for module in modules:
        module.eval()
    try:
        yield
    finally:
        for module, mode in zip(modules, modes):
            module.train(mode)


@contextlib.contextmanager
def on_device(modules, device):
    """Bring modules to `device` for a while (the VAE and text encoder may wait on the CPU)."""
    places = [(module, module.device) for module in modules]
    for module, _ in places:
        module.to(device)
    try:
        yield
    finally:
        for module, place in places:
            module.to(place)


def sample_grid(pipe, prompts: list, resolution: int, device, dtype=None, reading=None, *, width: int | None = None,
                height: int | None = None, folder: Path | None = None, model: str = "", step: int | None = None,
                base_adapters: list | None = None):
    """A grid (rows = prompts, columns = SAMPLE_SEEDS) drawn with the pipeline's current UNet, as `sdtune sample`
    draws (`sampling.draw_rows`): each prompt (a `data.PromptLine`, or its text) with its line's negative prompt, size,
    seed, steps and guidance where the line gives them, else validation's own (`sampling_config`: `width` × `height`,
    each by default `resolution`), prompts of one setting through the pipeline together. With `folder`, every image
    is written there too, its PNG text naming its prompt, seed and settings, `model` and the training `step`, and
    the `base_adapters` (config.BaseAdapter) merged beneath the method as `sdtune sample` names a stack.

    The UNet being trained keeps its weights; with `dtype` fp16 or bf16 (see `sdtune sample --dtype`) it
    and the text encoder run under autocast in that dtype, and the VAE decodes in its own dtype (the images
    that overflow in fp16 are decoded again in fp32, and the VAE stays fp16: `sampling.decode`).
    """
    import torch

    from .conditioning import PromptReading
    from .data import PromptLine
    from .models import text_encoders
    from .precision import TRAINING_VAE_REMEDY
    from .sampling import draw_rows, generation_settings, image_name, make_grid, prompt_batches, prompt_settings, shown_name

    lines = [prompt if isinstance(prompt, PromptLine) else PromptLine(prompt) for prompt in prompts]
    texts = [line.prompt for line in lines]
    config = sampling_config(resolution, width, height)
    native = pipe.unet.config.sample_size * pipe.vae_scale_factor
    per_prompt = [prompt_settings(config, line, native, None) for line in lines]  # placeholders filled: `validation_lines`
    reading = reading or PromptReading()
    dtype = dtype or torch.float32
    files = settings = None
    if folder is not None:
        files = [Path(folder) / image_name(index, seed) for index, own in enumerate(per_prompt) for seed in own.seeds]
        Path(folder).mkdir(parents=True, exist_ok=True)
        settings = {**generation_settings(pipe, config, model, dtype, 1.0, reading), "step": step}
        if base_adapters:  # merged into the model the method trains on: what drew the image beside it
            settings.update(adapter=[shown_name(base.path) for base in base_adapters],
                            adapter_scale=[base.strength for base in base_adapters])
    pipe.set_progress_bar_config(disable=True)
    with torch.no_grad(), evaluating([pipe.unet]), on_device([pipe.vae, *text_encoders(pipe)], device), \
            torch.autocast(torch.device(device).type, dtype=dtype, enabled=dtype != torch.float32):
        rows = draw_rows(pipe, texts, prompt_batches(per_prompt, config.num_images), per_prompt, files, config, device,
                         progress=False, description="validation", settings=settings, reading=reading, remedy=TRAINING_VAE_REMEDY)
    return make_grid([rows[index] for index in range(len(lines))], texts)


def save_grid(grid, output: Path, step: int) -> Path:
    path = Path(output) / "samples" / f"step-{step}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(path) as tmp:
        grid.save(tmp, format="PNG")
    return path
