"""Validation during training: sample grids of fixed prompts and seeds, and a loss that is comparable
across steps (the same images, timesteps and noise every time).

The loss is measured on images held out of the training set (`--validation-images K`) or, with too few
images to spare, on the training images themselves: then it shows how well the concept is fitted, not
how well it generalises.
"""

from __future__ import annotations

import contextlib
import warnings
from pathlib import Path

from .fileio import atomic_write, counted

DEFAULT_PROMPTS = ("photo of a <{concept}>.", "a <{concept}> in the snow", "an oil painting of a <{concept}>")
SAMPLE_SEEDS = (0, 1)
SAMPLE_STEPS = 30
SAMPLE_GUIDANCE = 7.5
# why a --validation-prompts file's kohya-ss options (--n, --w, ...) are not used
VALIDATION_OPTIONS_UNUSED = "validation grids are drawn alike at every check (the training resolution, fixed seeds, steps and guidance), to be compared"
LOSS_TIMESTEPS = 5  # evenly spaced over the schedule
LOSS_SEED = 1234
LOSS_BATCH = 8
MIN_TRAINING_IMAGES = 3  # what must remain after holding images out


def validation_prompts(config) -> list[str]:
    """The prompts of `config.validation_prompts` (a file), else a few with the concept; placeholders filled."""
    from .data import fill_placeholders, read_prompt_file

    if config.validation_prompts:
        prompts = read_prompt_file(config.validation_prompts, VALIDATION_OPTIONS_UNUSED)
    else:
        prompts = [p.format(concept=concept) for concept in config.concepts for p in DEFAULT_PROMPTS]
    return [fill_placeholders(p, config.concept_tokens if len(config.concepts) > 1 else config.token) for p in prompts]


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
        warnings.warn(
            f"--validation-images {count} {leaves} (at least {MIN_TRAINING_IMAGES} must stay); "
            "the validation loss is measured on the training images instead",
            stacklevel=2,
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


def sample_grid(pipe, prompts: list[str], resolution: int, device, dtype=None, reading=None):
    """A grid (rows = prompts, columns = SAMPLE_SEEDS) drawn with the pipeline's current UNet.

    The UNet being trained keeps its weights; with `dtype` fp16 or bf16 (see `sdtune sample --dtype`) it
    and the text encoder run under autocast in that dtype, and the VAE decodes in its own dtype (the images
    that overflow in fp16 are decoded again in fp32, and the VAE stays fp16: `sampling.decode`). Every
    prompt and seed goes through the pipeline at once (a few calls for many prompts).
    """
    import torch

    from .conditioning import PromptReading, pipeline_prompts
    from .models import text_encoders
    from .precision import TRAINING_VAE_REMEDY
    from .sampling import IMAGES_PER_CALL, decode, make_grid, zero_snr_guidance_rescale

    pipe.set_progress_bar_config(disable=True)
    dtype = dtype or torch.float32
    per_call = max(1, IMAGES_PER_CALL // len(SAMPLE_SEEDS))
    images = []
    with torch.no_grad(), evaluating([pipe.unet]), on_device([pipe.vae, *text_encoders(pipe)], device):
        for first in range(0, len(prompts), per_call):
            batch = prompts[first : first + per_call]
            generators = [torch.Generator(device).manual_seed(seed) for _ in batch for seed in SAMPLE_SEEDS]
            with torch.autocast(torch.device(device).type, dtype=dtype, enabled=dtype != torch.float32):
                latents = pipe(
                    **pipeline_prompts(pipe, batch, reading=reading or PromptReading()),
                    num_images_per_prompt=len(SAMPLE_SEEDS),
                    generator=generators,
                    num_inference_steps=SAMPLE_STEPS,
                    guidance_scale=SAMPLE_GUIDANCE,
                    guidance_rescale=zero_snr_guidance_rescale(pipe.scheduler),
                    height=resolution,
                    width=resolution,
                    output_type="latent",
                ).images
            images += decode(pipe, latents, TRAINING_VAE_REMEDY)
    rows = [images[i * len(SAMPLE_SEEDS) : (i + 1) * len(SAMPLE_SEEDS)] for i in range(len(prompts))]
    return make_grid(rows, prompts)


def save_grid(grid, output: Path, step: int) -> Path:
    path = Path(output) / "samples" / f"step-{step}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(path) as tmp:
        grid.save(tmp, format="PNG")
    return path
