"""Prompt files → images and one grid (rows = prompts, columns = seeds, the prompt under each row)."""

from __future__ import annotations

import textwrap
from dataclasses import dataclass
from pathlib import Path

from .config import SampleConfig

CAPTION_LINE_HEIGHT = 14
CAPTION_LINES = 2
GRID_PAD = 4
MIN_CELL = 128  # small images are shown enlarged so the captions stay readable
IMAGES_PER_CALL = 16  # images drawn per pipeline call (classifier-free guidance doubles the batch)


@dataclass
class SampleResult:
    output: Path
    images: list[Path]
    grid: Path
    prompts: list[str]


def grid_size(rows: int, columns: int, image_size: int, header: bool = False) -> tuple[int, int]:
    """Width and height of a grid of `rows` x `columns` square images with captions (and column labels)."""
    cell = max(image_size, MIN_CELL)
    width = columns * cell + (columns + 1) * GRID_PAD
    height = rows * (cell + CAPTION_LINES * CAPTION_LINE_HEIGHT + GRID_PAD) + GRID_PAD
    if header:
        height += CAPTION_LINES * CAPTION_LINE_HEIGHT
    return width, height


def make_grid(rows: list[list], captions: list[str], column_labels: list[str] | None = None):
    """One image: each row of PIL images with its caption written below it, labels above the columns."""
    from PIL import Image, ImageDraw, ImageFont

    image_size = rows[0][0].size[0]
    cell = max(image_size, MIN_CELL)
    columns = max(len(row) for row in rows)
    grid = Image.new("RGB", grid_size(len(rows), columns, image_size, header=bool(column_labels)), "white")
    draw = ImageDraw.Draw(grid)
    font = ImageFont.load_default(size=11)
    chars = max(10, int((grid.size[0] - 2 * GRID_PAD) / 6))
    y = GRID_PAD
    if column_labels:
        for column, label in enumerate(column_labels):
            lines = textwrap.wrap(label, max(4, cell // 6))[:CAPTION_LINES] or [""]
            for k, line in enumerate(lines):
                draw.text((GRID_PAD + column * (cell + GRID_PAD), y + k * CAPTION_LINE_HEIGHT), line, fill="black", font=font)
        y += CAPTION_LINES * CAPTION_LINE_HEIGHT
    for row, caption in zip(rows, captions):
        for column, image in enumerate(row):
            grid.paste(image.resize((cell, cell), Image.Resampling.NEAREST), (GRID_PAD + column * (cell + GRID_PAD), y))
        y += cell
        lines = textwrap.wrap(caption, chars)[:CAPTION_LINES] or [""]
        for k, line in enumerate(lines):
            draw.text((GRID_PAD, y + 1 + k * CAPTION_LINE_HEIGHT), line, fill="black", font=font)
        y += CAPTION_LINES * CAPTION_LINE_HEIGHT + GRID_PAD
    return grid


def sample(config: SampleConfig, progress: bool = True) -> SampleResult:
    import torch
    from diffusers.utils import logging as diffusers_logging
    from tqdm.auto import tqdm

    from .adapter import adapter_path, load_adapter, read_adapter_info
    from .data import fill_placeholders, read_prompt_file, warn_truncated_prompts
    from .fileio import atomic_write, ensure_writable_folder
    from .models import DEFAULT_MODEL, load_pipeline

    config.validate()
    prompts = list(config.prompt) + (read_prompt_file(config.prompts) if config.prompts else [])
    info = read_adapter_info(config.adapter)[0] if config.adapter else None
    model = config.model or (info.base_model if info else DEFAULT_MODEL)
    token = config.token or (info.token if info else None)
    if config.output:
        output = Path(config.output)
    elif config.adapter:
        output = adapter_path(config.adapter).parent / "samples"
    else:
        output = Path("samples")
    ensure_writable_folder(output / "images")

    pipe = load_pipeline(model)
    if config.adapter:
        load_adapter(config.adapter, pipe, merge=True)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    pipe.to(device)
    resolution = config.resolution or pipe.unet.config.sample_size * pipe.vae_scale_factor

    seeds = [config.seed + j for j in range(config.num_images)]
    rows, files = [], []
    filled = [fill_placeholders(prompt, token) for prompt in prompts]
    warn_truncated_prompts(pipe.tokenizer, filled)
    # Several prompts go through the pipeline at once; every image keeps its own seeded generator,
    # so the images do not depend on how prompts are batched.
    per_call = max(1, IMAGES_PER_CALL // len(seeds))
    bar = tqdm(total=len(filled), desc="sample", unit="prompt", disable=not progress)
    verbosity = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()  # its own truncation notice repeats the warning above
    try:
        for first in range(0, len(filled), per_call):
            texts = filled[first : first + per_call]
            generators = [torch.Generator(device).manual_seed(seed) for _ in texts for seed in seeds]
            images = pipe(
                texts,
                num_images_per_prompt=len(seeds),
                generator=generators,
                num_inference_steps=config.steps,
                guidance_scale=config.guidance,
                height=resolution,
                width=resolution,
            ).images
            for offset in range(len(texts)):
                row = images[offset * len(seeds) : (offset + 1) * len(seeds)]
                for seed, image in zip(seeds, row):
                    path = output / "images" / f"{first + offset:03d}-seed{seed}.png"
                    with atomic_write(path) as tmp:
                        image.save(tmp, format="PNG")
                    files.append(path)
                rows.append(row)
            bar.update(len(texts))
    finally:
        bar.close()
        diffusers_logging.set_verbosity(verbosity)
    grid_path = output / "grid.png"
    with atomic_write(grid_path) as tmp:
        make_grid(rows, filled).save(tmp, format="PNG")
    return SampleResult(output=output, images=files, grid=grid_path, prompts=filled)
