"""Prompt files → images and one grid (rows = prompts, columns = seeds, per adapter strength in a sweep;
the prompt under each row)."""

from __future__ import annotations

import re
import textwrap
from dataclasses import dataclass, field
from pathlib import Path

from .config import SampleConfig, strength_name
from .limits import drawn_size
from .models import quiet_libraries

CAPTION_LINE_HEIGHT = 14
CAPTION_LINES = 2
GRID_PAD = 4
MIN_CELL = 128  # small images are shown enlarged so the captions stay readable
IMAGES_PER_CALL = 16  # images drawn per pipeline call (classifier-free guidance doubles the batch)
DECODE_BATCH = 4  # images per VAE decoding call
GRID_FILE = "grid.png"
IMAGE_NAME = re.compile(r"^\d{3,}-(scale.+-)?seed\d+\.png$")  # what `image_name` writes


@dataclass
class SampleResult:
    """What `sample` drew: the output folder, each image file, the grid, the prompts as drawn (placeholders filled
    in), and how long start-up and drawing took."""

    output: Path
    images: list[Path]
    grid: Path
    prompts: list[str]
    dtype: str = "fp32"  # the precision the images were drawn in
    startup_seconds: float = 0.0  # libraries, pipeline, adapter and merge, until the first image is begun
    draw_seconds: float = 0.0  # drawing and writing this process's images
    images_drawn: int = 0  # by this process
    notes: list[str] = field(default_factory=list)  # what the command line says after the images (the schedule chosen)

    def __post_init__(self) -> None:
        from .errors import said_to_caller

        self.notes = [said_to_caller(note) for note in self.notes]  # returned to Python: settings as it spells them

    @property
    def seconds_per_image(self) -> float:
        return self.draw_seconds / self.images_drawn if self.images_drawn else 0.0


def cell_size(image_size: tuple[int, int]) -> tuple[int, int]:
    """The (width, height) an image of `image_size` takes in a grid: its own aspect, a small one enlarged until
    its smaller side is MIN_CELL."""
    width, height = image_size
    scale = max(1.0, MIN_CELL / min(width, height))
    return round(width * scale), round(height * scale)


def grid_size(rows: int, columns: int, image_size: tuple[int, int], header: bool = False,
              row_sizes: list[tuple[int, int]] | None = None) -> tuple[int, int]:
    """Width and height of a grid of `rows` x `columns` images of `image_size` (width, height) with captions
    (and column labels); with `row_sizes`, each row's images of its own size (`grid_layout`)."""
    (width,), heights, _ = grid_layout([[size] for size in row_sizes or [image_size] * rows])  # every column alike
    return grid_extent(columns * width, columns, heights, header)  # counted, not laid out: --num-images may be huge


def grid_extent(widths: int, columns: int, heights: list[int], header: bool = False) -> tuple[int, int]:
    """Width and height of a grid of `columns` columns `widths` wide together and rows of `heights`, with captions
    (and column labels)."""
    height = sum(cell_height + CAPTION_LINES * CAPTION_LINE_HEIGHT + GRID_PAD for cell_height in heights) + GRID_PAD
    if header:
        height += CAPTION_LINES * CAPTION_LINE_HEIGHT
    return widths + (columns + 1) * GRID_PAD, height


def grid_layout(sizes: list[list[tuple[int, int]]]) -> tuple[list[int], list[int], list[list[tuple[int, int]]]]:
    """(each column's width, each row's height, each image's cell) of a grid of images of `sizes` (rows of
    (width, height)): a row is as tall as its tallest `cell_size`, and each of its images is scaled to that height
    keeping its aspect (a prompt file's --w and --h, runs of other models); a column is as wide as its widest cell,
    so that rows of different sizes line up."""
    cells, heights = [], []
    for row in sizes:
        height = max(cell_size(size)[1] for size in row)
        heights.append(height)
        cells.append([(round(width * height / own_height), height) for width, own_height in row])
    columns = max(len(row) for row in cells)
    widths = [max(row[column][0] for row in cells if column < len(row)) for column in range(columns)]
    return widths, heights, cells


def fitted_lines(text: str, width: int, font) -> list[str]:
    """`text` in lines each at most `width` pixels wide in `font`: broken between words, else after a word's hyphens
    and underscores (run names: castle-lora-seed-1), else within a piece wider than a line."""
    lines: list[str] = []
    for word in text.split():
        for index, piece in enumerate(re.findall(r"[^-_]*[-_]|[^-_]+", word)):
            joined = lines[-1] + (" " if index == 0 else "") + piece if lines else piece
            if lines and font.getlength(joined) <= width:
                lines[-1] = joined
                continue
            lines.append("")
            for char in piece:
                if lines[-1] and font.getlength(lines[-1] + char) > width:
                    lines.append("")
                lines[-1] += char
    return lines or [""]


def make_grid(rows: list[list], captions: list[str], column_labels: list[str] | None = None):
    """One image: each row of PIL images with its caption written below it, labels above the columns. Every image
    keeps its aspect (`grid_layout`), left-aligned in its column."""
    from PIL import Image, ImageDraw, ImageFont

    column_widths, row_heights, cells = grid_layout([[image.size for image in row] for row in rows])
    lefts = [GRID_PAD + sum(column_widths[:column]) + column * GRID_PAD for column in range(len(column_widths))]
    font = ImageFont.load_default(size=11)
    # a column's label is shown whole (which run or strength it is), in as many lines as its column's width needs
    labels = [fitted_lines(label, width, font) for width, label in zip(column_widths, column_labels or [])]
    header_lines = max([CAPTION_LINES, *map(len, labels)]) if column_labels else 0
    width, height = grid_extent(sum(column_widths), len(column_widths), row_heights)
    grid = Image.new("RGB", (width, height + header_lines * CAPTION_LINE_HEIGHT), "white")
    draw = ImageDraw.Draw(grid)
    chars = max(10, int((grid.size[0] - 2 * GRID_PAD) / 6))
    y = GRID_PAD
    for left, lines in zip(lefts, labels):
        for k, line in enumerate(lines):
            draw.text((left, y + k * CAPTION_LINE_HEIGHT), line, fill="black", font=font)
    y += header_lines * CAPTION_LINE_HEIGHT
    for row, caption, row_cells, row_height in zip(rows, captions, cells, row_heights):
        for left, image, cell in zip(lefts, row, row_cells):
            grid.paste(image.resize(cell, Image.Resampling.NEAREST), (left, y))
        y += row_height
        lines = textwrap.wrap(caption, chars)[:CAPTION_LINES] or [""]
        for k, line in enumerate(lines):
            draw.text((GRID_PAD, y + 1 + k * CAPTION_LINE_HEIGHT), line, fill="black", font=font)
        y += CAPTION_LINES * CAPTION_LINE_HEIGHT + GRID_PAD
    return grid


@quiet_libraries()
def sample(config: SampleConfig, progress: bool = True) -> SampleResult:
    """Draw every prompt at every seed (and strength) into OUTPUT/images, and the grid. The output folder
    is locked while it is written; an earlier sample's files there are refused unless `config.overwrite`."""
    import time

    started = time.perf_counter()
    from .adapter import adapter_info, adapter_path, outputs_suffix
    from .data import PromptLine, read_prompt_lines
    from .distributed import lock_on_main_process, process_state
    from .errors import SdtuneError, shell_word
    from .fileio import OutputLock, ensure_writable_folder
    from .limits import check_clip_skip, check_sample_fits
    from .models import DEFAULT_MODEL, read_model_configs

    config.validate()
    lines = []
    if config.dataset:
        from .datasets import class_captions

        # One row per class, captioned as training captioned that class.
        lines += [PromptLine(caption) for _, caption in class_captions(config.dataset, config.data_root, config.classes, config.class_template)]
    # a prompt file's lines may set their own negative prompt, size, seed, steps and guidance (kohya-ss' --n, --w, ...)
    lines += [PromptLine(prompt) for prompt in config.prompt] + (read_prompt_lines(config.prompts) if config.prompts else [])
    infos = [adapter_info(adapter) for adapter in config.adapters]
    info = infos[0] if infos else None
    notes = []
    if not lines:  # no prompt given: the adapter's training prompts (`validate` refuses this without an adapter)
        from .fileio import counted

        lines = [PromptLine(prompt) for prompt in trained_prompts(config.adapters, infos)]
        each = " each" if len(lines) > 1 else ""
        notes.append(f"no prompt given: drew the adapter's training {'prompts' if len(lines) > 1 else 'prompt'} "
                     + ", ".join(repr(line.prompt) for line in lines) + f", {counted(config.num_images, 'image')}{each}")
    prompts = [line.prompt for line in lines]
    model = config.model or (info.base_model if info else None) or DEFAULT_MODEL
    placeholders = placeholder_tokens(infos, [str(adapter) for adapter in config.adapters])  # a refused stack: before the model loads
    token = config.token or placeholders or None
    check_sample_fits(model, config, len(prompts), grid_size, lines)  # sizes the model or the machine cannot take, before it loads
    reading = adapters_reading(config.adapters, infos, {"clip_skip": config.clip_skip, "max_token_length": config.max_token_length})
    check_clip_skip(model, read_model_configs(model), reading.clip_skip)
    if config.output:
        output = Path(config.output)
    elif config.adapters:  # a run's step file draws into samples-step-N beside the run's own samples
        first = adapter_path(config.adapters[0])
        output = first.parent / f"samples{outputs_suffix(first)}"
    else:
        output = Path("samples")
    if any(output.resolve() == adapter_path(adapter).resolve() for adapter in config.adapters):
        raise SdtuneError(f"--output {shell_word(output)} is the adapter file; give a folder for the images")
    ensure_writable_folder(output / "images")

    # Under `accelerate launch` (or torchrun) every process draws its share of the prompts and writes
    # their images; the main process then reads them all back for the grid.
    state = process_state()
    lock = OutputLock(output)
    try:  # taken inside the try: an interrupt just after it is taken still releases it
        lock_on_main_process(state, lock)
        if state.is_main_process:
            lock.sweep(lambda name: name == GRID_FILE)
            lock.sweep(lambda name: name.endswith(".png"), output / "images")
        sweep = isinstance(config.adapter_scale, list) and not config.stacked
        files = {
            scale: [output / "images" / image_name(index, seed, scale if sweep else None)
                    for index, line in enumerate(lines) for seed in prompt_seeds(config, line)]
            for scale in config.adapter_scales
        }
        earlier = [path for path in [output / GRID_FILE, *(p for paths in files.values() for p in paths)] if path.exists()]
        if earlier and not config.overwrite:
            more = f" and {len(earlier) - 1} more" if len(earlier) > 1 else ""
            raise SdtuneError(
                f"{output} holds an earlier sample ({earlier[0].relative_to(output)}{more}): "
                "add --overwrite to replace it, or choose another --output"
            )
        # any adapter (of a stack too, but for base adapters) trained with --zero-terminal-snr samples on the rescaled, trailing schedule
        zero_snr = zero_snr_adapters(config.adapters, infos)
        return _sample(config, lines, files, model, token, output, state, progress, started, zero_snr, reading, notes)
    finally:
        lock.release()


def _sample(config: SampleConfig, lines: list, files: dict, model: str, token: str | None, output: Path, state,
            progress: bool, started: float, zero_snr: list[str] | None = None, reading=None,
            notes: list[str] | None = None) -> SampleResult:
    """Draw the images into `files` (by strength: each prompt's images, seed after seed) and the grid; `lines`: the
    prompts with the settings their prompt file's lines gave them (`data.PromptLine`); `notes`: what the command says
    after the images, so far."""
    import time

    from .data import fill_placeholders, warn_truncated_prompts
    from .fileio import atomic_write
    from .precision import cast_pipeline, sampling_dtype

    device = state.device
    dtype = sampling_dtype(config.dtype, device)
    pipe, adapter, stack = sampling_pipeline(model, config.adapters, device, config.stack_scales)
    if stack is not None and not config.token:  # stacked adapters' new tokens as the stack named them
        token = stack.placeholders
    notes = list(notes or [])
    if config.scheduler != "default":
        pipe.scheduler = make_scheduler(config.scheduler, pipe.scheduler.config)
    elif zero_snr:  # an explicit --scheduler wins
        pipe.scheduler = zero_snr_scheduler(pipe.scheduler)
        notes.append(f"{' and '.join(zero_snr)} {'was' if len(zero_snr) == 1 else 'were'} trained with --zero-terminal-snr: "
                     f"sampling with {type(pipe.scheduler).__name__}, betas rescaled to zero terminal SNR, trailing timesteps")
    native = pipe.unet.config.sample_size * pipe.vae_scale_factor
    scales = config.adapter_scales
    sweep = isinstance(config.adapter_scale, list) and not config.stacked

    filled = [fill_placeholders(line.prompt, token) for line in lines]
    per_prompt = [prompt_settings(config, line, native, token) for line in lines]
    if state.is_main_process:
        negatives = sorted({settings.negative_prompt for settings in per_prompt if settings.negative_prompt})
        warn_truncated_prompts(pipe.tokenizer, reading.max_token_length, filled + negatives)  # a negative prompt is read alike
    # Prompts go through the pipeline several at a time, and processes take whole batches: a batch's
    # images depend (in the last bit) on what else is in it, so the images are the same on any number
    # of processes (the images whose fp16 decode overflows too: decoded again in fp32, the VAE staying fp16: `decode`).
    batches = prompt_batches(per_prompt, config.num_images)
    rows = {}
    startup = draw_started = None
    for position, scale in enumerate(scales):
        last = position == len(scales) - 1
        if adapter is not None:
            # merged at each strength afresh from the exact base weights (kept unless this is the
            # last strength), in fp32, so each strength's images are those of a run at that single
            # strength; the weights the merge does not change only ever round to `dtype` the same way
            cast_pipeline(pipe, torch_float32())
            adapter.unmerge()
            adapter.set_scale(scale)
            adapter.merge(keep_base=not last)
        cast_pipeline(pipe, dtype)
        if startup is None:
            startup = time.perf_counter() - started
            draw_started = time.perf_counter()
        settings = generation_settings(pipe, config, model, dtype, scale, reading)
        with state.split_between_processes(batches) as mine:
            rows[scale] = draw_rows(pipe, filled, mine, per_prompt, files[scale], config, device,
                                    progress and state.is_main_process,
                                    description=f"sample at {strength_name(scale)}" if sweep else "sample",
                                    settings=settings, reading=reading)
    draw_seconds = time.perf_counter() - draw_started
    drawn = sum(len(row) for scale in scales for row in rows[scale].values())
    timing = dict(dtype=dtype_name(dtype), startup_seconds=startup, draw_seconds=draw_seconds, images_drawn=drawn,
                  notes=notes)
    state.wait_for_everyone()
    grid_path = output / GRID_FILE
    every_file = [path for scale in scales for path in files[scale]]
    if not state.is_main_process:
        return SampleResult(output=output, images=every_file, grid=grid_path, prompts=filled, **timing)
    for scale in scales:
        for index in range(len(filled)):
            if index not in rows[scale]:  # drawn by another process
                count = config.num_images
                rows[scale][index] = [load_png(path) for path in files[scale][index * count : (index + 1) * count]]
    grid_rows = [[image for scale in scales for image in rows[scale][index]] for index in range(len(filled))]
    # a sweep's columns: strength, then seed (or the image's number where a prompt file's --d gave rows seeds of their own)
    seeds = per_prompt[0].seeds if len({settings.seeds for settings in per_prompt}) == 1 else None
    labels = [f"scale {strength_name(scale)}, " + (f"seed {seeds[j]}" if seeds else f"image {j + 1}")
              for scale in scales for j in range(config.num_images)] if sweep else None
    with atomic_write(grid_path) as tmp:
        make_grid(grid_rows, filled, column_labels=labels).save(tmp, format="PNG")
    if config.overwrite:  # an earlier sample's images that this one did not draw again would mix with it
        for stale in set((output / "images").glob("*.png")) - set(every_file):
            if IMAGE_NAME.match(stale.name):
                stale.unlink(missing_ok=True)
    return SampleResult(output=output, images=every_file, grid=grid_path, prompts=filled, **timing)


@dataclass(frozen=True)
class PromptSettings:
    """How one prompt is drawn: the command's settings, or those its prompt file's line gave."""

    negative_prompt: str | None
    width: int
    height: int
    steps: int
    guidance: float
    seeds: tuple[int, ...]

    def call(self) -> tuple:
        """What the prompts of one pipeline call share (their seeds and negative prompts are each their own; a
        missing negative prompt is not an empty one to SDXL: `conditioning.pipeline_prompts`)."""
        return self.negative_prompt is None, self.width, self.height, self.steps, self.guidance

    def shown(self) -> dict:
        """These settings as an image's PNG text writes them."""
        return {"negative_prompt": self.negative_prompt, "width": self.width, "height": self.height, "steps": self.steps,
                "guidance": self.guidance}


def prompt_seeds(config: SampleConfig, line) -> tuple[int, ...]:
    """A prompt's seeds: its line's --d, else --seed, and the next num_images - 1."""
    first = config.seed if line.seed is None else line.seed
    return tuple(first + j for j in range(config.num_images))


def prompt_settings(config: SampleConfig, line, native: int, token) -> PromptSettings:
    """How `line` (a `data.PromptLine`) is drawn: each of its options wins over the command's setting, as
    kohya-ss' sample prompts do; `native`: the model's own image size; `token` fills placeholders."""
    from .data import fill_placeholders

    negative = line.negative_prompt if line.negative_prompt is not None else config.negative_prompt
    width, height = drawn_size(line.width or config.width, line.height or config.height, config.resolution, native)
    return PromptSettings(
        negative_prompt=fill_placeholders(negative, token) if negative else None, width=width, height=height,
        steps=line.steps or config.steps, guidance=config.guidance if line.guidance is None else line.guidance,
        seeds=prompt_seeds(config, line),
    )


def call_groups(per_prompt: list[PromptSettings]) -> list[list[int]]:
    """The prompts' indices grouped by what a pipeline call shares, each group in the prompts' order, the groups
    in the order of their first prompt: prompts of one setting still go through the pipeline together."""
    groups: dict[tuple, list[int]] = {}
    for index, settings in enumerate(per_prompt):
        groups.setdefault(settings.call(), []).append(index)
    return list(groups.values())


def prompt_batches(per_prompt: list[PromptSettings], num_images: int) -> list[list[int]]:
    """The pipeline calls that draw the prompts (lists of their indices): prompts of one `call_groups` group,
    IMAGES_PER_CALL images a call at most."""
    per_call = max(1, IMAGES_PER_CALL // num_images)
    return [group[first : first + per_call] for group in call_groups(per_prompt) for first in range(0, len(group), per_call)]


def image_name(index: int, seed: int, scale: float | None = None) -> str:
    """An image's file name: NNN-seedK.png, NNN-scaleS-seedK.png in a strength sweep."""
    stem = f"scale{strength_name(scale)}-" if scale is not None else ""
    return f"{index:03d}-{stem}seed{seed}.png"


def torch_float32():
    import torch

    return torch.float32


def dtype_name(dtype) -> str:
    return {"torch.float16": "fp16", "torch.bfloat16": "bf16", "torch.float32": "fp32"}[str(dtype)]


def trained_prompts(adapters: list, infos: list) -> list[str]:
    """The prompts an adapter is drawn with where none is given: its run's training prompt, each concept's in turn for
    a run of several (as `sdtune evaluate` measures it), or a dataset run's class captions; refused for stacked
    adapters and for a file that records no prompt (a kohya-format file of another trainer)."""
    from .adapter import adapter_path
    from .errors import SdtuneError
    from .trained_prompts import run_prompts

    asked = "give a prompt file (--prompts FILE), a prompt (--prompt TEXT) or a dataset (--dataset NAME)"
    if len(adapters) != 1:
        raise SdtuneError(f"{asked}: stacked adapters have no one training prompt to draw")
    run, info = adapter_path(adapters[0]).parent, infos[0]
    tokens = info.placeholder_tokens()
    if not info.placeholder and not isinstance(tokens, dict) and not (run / "config.toml").is_file():
        raise SdtuneError(f"{asked}: {adapters[0]} records no training prompt")
    return run_prompts(run, info.placeholder or "<concept>", tokens)


def placeholder_tokens(infos: list, names: list[str] | None = None) -> str | dict[str, str] | None:
    """What fills `<name>` placeholders: the adapter's tokens, or those of every stacked adapter by name (their new
    tokens named apart, as `load_adapters` names them; two adapters of one concept with new tokens are refused)."""
    if len(infos) <= 1:
        return infos[0].placeholder_tokens() if infos else None
    from .token_embeddings import stack_new_tokens

    return stack_new_tokens(names or [f"adapter {i + 1}" for i in range(len(infos))], infos).placeholders


def sampling_pipeline(model: str, adapter_files: list[str], device, stack_scales: list[float] | None = None):
    """The base pipeline on `device` in fp32, with the adapter at `adapter_files[0]` (if any) opened on it,
    unmerged: (pipeline, adapter or None, None). Several adapters stack, merged at their strengths (`stack_scales`,
    `adapter.load_adapters`), and no adapter is left to rescale: (pipeline, None, the stack's `StackedTokens`). The weights go to the device first, so adapters are
    injected and merged there (a GPU merges SD v1.4 in milliseconds, a CPU takes seconds)."""
    from .adapter import load_adapters, open_adapter, warn_missing_base_adapters
    from .models import load_pipeline

    pipe = load_pipeline(model)
    pipe.to(device)
    if len(adapter_files) > 1:
        return pipe, None, load_adapters(adapter_files, pipe, stack_scales)
    warn_missing_base_adapters(adapter_files)
    adapter = open_adapter(adapter_files[0], pipe) if adapter_files else None
    return pipe, adapter, None


def make_scheduler(name: str, config):
    """The sampler `name` (one of config.SCHEDULERS but "default"), set up from the model's scheduler config."""
    import diffusers

    classes = {
        "ddim": "DDIMScheduler",
        "pndm": "PNDMScheduler",
        "euler": "EulerDiscreteScheduler",
        "euler-ancestral": "EulerAncestralDiscreteScheduler",
        "dpm++": "DPMSolverMultistepScheduler",
        "dpm++-karras": "DPMSolverMultistepScheduler",
        "unipc": "UniPCMultistepScheduler",
        "heun": "HeunDiscreteScheduler",
        "ddpm": "DDPMScheduler",
    }
    options = {"use_karras_sigmas": True} if name == "dpm++-karras" else {}
    return getattr(diffusers, classes[name]).from_config(config, **options)


# diffusers' schedulers by the names the AUTOMATIC1111 web UI writes (and image sites read) in "parameters"
SAMPLER_NAMES = {
    "DDIMScheduler": "DDIM", "PNDMScheduler": "PLMS", "EulerDiscreteScheduler": "Euler",
    "EulerAncestralDiscreteScheduler": "Euler a", "DPMSolverMultistepScheduler": "DPM++ 2M",
    "UniPCMultistepScheduler": "UniPC", "HeunDiscreteScheduler": "Heun", "DDPMScheduler": "DDPM",
    "LMSDiscreteScheduler": "LMS",
}
PARAMETERS_CHUNK, SETTINGS_CHUNK = "parameters", "sdtune"  # the PNG text chunks every sampled image carries


def sampler_name(scheduler) -> str:
    name = SAMPLER_NAMES.get(type(scheduler).__name__, type(scheduler).__name__)
    return name + " Karras" if getattr(scheduler.config, "use_karras_sigmas", False) else name


def generation_settings(pipe, config: SampleConfig, model: str, dtype, scale: float, reading=None) -> dict:
    """What every image of a sample shares, for its PNG text: names, never local paths. (Each prompt's negative
    prompt, size, steps and guidance are its own: `PromptSettings.shown`.)"""
    from .version import __version__

    settings = {
        "guidance_rescale": guidance_rescale(config, pipe), "sampler": sampler_name(pipe.scheduler),
        "model": shown_name(model), "dtype": dtype_name(dtype),
        "version": f"sdtune {__version__}",
    }
    if reading is not None:  # clip_skip (AUTOMATIC1111's "Clip skip"), max_token_length: only where not the default
        settings.update({name: int(value) for name, value in reading.metadata().items()})
    if config.stacked:
        settings.update(adapter=[shown_name(a) for a in config.adapters], adapter_scale=config.stack_scales)
    elif config.adapters:
        settings.update(adapter=shown_name(config.adapters[0]), adapter_scale=scale)
    return settings


def shown_name(source: str) -> str:
    """A model or adapter as an image may show it: a hub id as it is, a local file or folder by its name (a run's
    adapter file by its run's too: every run's is adapter.safetensors)."""
    from .adapter import ADAPTER_FILE, EMA_ADAPTER_FILE, STEP_ADAPTER

    path = Path(source)
    if (path.name in (ADAPTER_FILE, EMA_ADAPTER_FILE) or STEP_ADAPTER.match(path.name)) and path.is_file():
        return f"{path.resolve().parent.name}/{path.name}"
    return path.name if path.exists() else source


def png_text(settings: dict):
    """PNG text chunks: "parameters" as the AUTOMATIC1111 web UI writes it (prompt, negative prompt, then
    `Key: value` pairs) and "sdtune" with the same settings as JSON."""
    import json

    from PIL.PngImagePlugin import PngInfo

    pairs = {
        "Steps": settings["steps"], "Sampler": settings["sampler"], "CFG scale": settings["guidance"],
        "Seed": settings["seed"], "Size": f"{settings['width']}x{settings['height']}", "Model": settings["model"],
    }
    if settings.get("guidance_rescale"):
        pairs["Guidance rescale"] = settings["guidance_rescale"]
    if settings.get("clip_skip"):
        pairs["Clip skip"] = settings["clip_skip"]
    if "adapter" in settings:
        names, scales = settings["adapter"], settings["adapter_scale"]
        if isinstance(names, list):  # stacked adapters
            names, scales = ", ".join(names), ", ".join(strength_name(scale) for scale in scales)
        else:
            scales = strength_name(scales)
        pairs.update({"Adapter": names, "Adapter strength": scales})
    pairs.update({"Dtype": settings["dtype"], "Version": settings["version"]})
    lines = [settings["prompt"]]
    if settings.get("negative_prompt"):
        lines.append(f"Negative prompt: {settings['negative_prompt']}")
    lines.append(", ".join(f"{key}: {value}" for key, value in pairs.items()))
    info = PngInfo()
    info.add_text(PARAMETERS_CHUNK, "\n".join(lines))  # tEXt where the text is Latin-1, as the web UI writes it
    info.add_text(SETTINGS_CHUNK, json.dumps({k: v for k, v in settings.items() if v is not None}, sort_keys=True))
    return info


def load_png(path: Path):
    from PIL import Image

    with Image.open(path) as image:
        return image.convert("RGB")


ZERO_SNR_GUIDANCE_RESCALE = 0.7  # what Lin et al. (2023) recommend for zero-terminal-SNR models


def adapters_reading(adapters: list, infos: list, given: dict | None = None):
    """How prompts are read (conditioning.PromptReading): each setting as `given` (a setting's name → the value asked
    for, or None) sets it, else as the adapters were trained (the default where they recorded nothing), on which
    stacked adapters must then agree, but for those another of the stack was trained on top of (its base adapters),
    which it read prompts through its own way."""
    from dataclasses import fields

    from .conditioning import MAX_TOKEN_LENGTHS, PromptReading
    from .errors import SdtuneError

    beneath = base_adapters_among(adapters, infos)
    values = {}
    for setting in fields(PromptReading):
        name, default, asked = setting.name, setting.default, (given or {}).get(setting.name)
        found = {}
        for index, (adapter, info) in enumerate(zip(adapters, infos)):
            recorded = str(info.extra[name]) if name in info.extra else kohya_recorded(info, name, default)
            if not recorded.isdigit() or int(recorded) < 1 or (name == "max_token_length" and int(recorded) not in MAX_TOKEN_LENGTHS):
                raise SdtuneError(f"{adapter} records {name} {recorded!r}, which no run writes: the file is damaged")
            if index not in beneath:
                found[str(adapter)] = int(recorded)
        if asked is not None:
            values[name] = asked
            continue
        if len(set(found.values())) > 1:
            trained = ", ".join(f"{adapter}: {value}" for adapter, value in found.items())
            flag = "--" + name.replace("_", "-")
            raise SdtuneError(f"the stacked adapters were trained with different {flag} ({trained}); give {flag} for the stack")
        values[name] = next(iter(found.values()), default)
    return PromptReading(**values)


def base_adapters_among(adapters: list, infos: list) -> set[int]:
    """The indices of the stacked adapters that another adapter of the stack records as its base adapters (by digest)."""
    from .adapter import stacked_base_adapters

    return {index for beneath in stacked_base_adapters([str(a) for a in adapters], infos)[0] for index in beneath}


def found_base_adapters(adapter) -> list:
    """The base adapters (config.BaseAdapter) a run's adapter was trained on, as its config.toml names them, where each
    file is found with the digest the adapter recorded; none where one is not (it is then drawn alone, with the warning
    that says so). For the commands that draw runs as they trained and take no adapters to stack: compare, evaluate."""
    from .adapter import adapter_digest, adapter_info, adapter_path, recorded_base_adapters
    from .config import parse_base_adapter, read_toml
    from .errors import SdtuneError

    path = adapter_path(adapter)
    records = recorded_base_adapters(adapter_info(path))
    if not records or not (path.parent / "config.toml").is_file():
        return []
    try:
        bases = [parse_base_adapter(entry) for entry in read_toml(path.parent / "config.toml").get("base_adapters", [])]
        digests = [adapter_digest(adapter_path(base.path)) for base in bases]
    except (SdtuneError, OSError, TypeError, AttributeError):
        return []
    return bases if digests == [record.get("digest") for record in records] else []


def kohya_recorded(info, name: str, default: int) -> str:
    """A kohya-format file's record of a prompt-reading setting (`ss_clip_skip`, `ss_max_token_length`, as kohya-ss
    and sdtune's kohya export write them), else `default`: kohya-ss writes 'None' where the option was not given, and
    its SDXL trainer ignores a clip skip."""
    from .conditioning import MAX_TOKEN_LENGTHS

    value = str(info.extra.get(f"ss_{name}", ""))
    sdxl = str(info.extra.get("ss_base_model_version", "")).startswith("sdxl")
    usable = value.isdigit() and int(value) >= 1 and (int(value) in MAX_TOKEN_LENGTHS if name == "max_token_length" else not sdxl)
    return value if usable else str(default)


def zero_snr_adapters(adapters: list, infos: list) -> list[str]:
    """The adapters (as given) whose header records training with --zero-terminal-snr: sdtune's key, or a kohya-format
    file's `ss_zero_terminal_snr` (kohya-ss' and sdtune's export write "True"); but for those another of the stack was
    trained on top of (its base adapters): that run drew its validation on its own schedule, as for clip skip."""
    beneath = base_adapters_among(adapters, infos)
    return [str(adapter) for index, (adapter, info) in enumerate(zip(adapters, infos))
            if index not in beneath
            and (info.extra.get("zero_terminal_snr") == "true" or str(info.extra.get("ss_zero_terminal_snr")) == "True")]


def zero_snr_scheduler(scheduler):
    """`scheduler`'s class with its betas rescaled to SNR 0 at the last timestep and trailing timesteps, as
    Lin et al. (2023) and diffusers recommend for sampling a model trained with --zero-terminal-snr; DDIM where
    that class has no such option (PNDM), which from_config would ignore."""
    import inspect

    import diffusers

    kind = type(scheduler)
    if "rescale_betas_zero_snr" not in inspect.signature(kind.__init__).parameters:
        kind = diffusers.DDIMScheduler
    return kind.from_config(scheduler.config, rescale_betas_zero_snr=True, timestep_spacing="trailing")


def zero_snr_guidance_rescale(scheduler) -> float:
    return ZERO_SNR_GUIDANCE_RESCALE if scheduler.config.get("rescale_betas_zero_snr", False) else 0.0


def guidance_rescale(config: SampleConfig, pipe) -> float:
    """--guidance-rescale, else 0.7 for a model trained on a zero-terminal-SNR schedule, else 0."""
    if config.guidance_rescale is not None:
        return config.guidance_rescale
    return zero_snr_guidance_rescale(pipe.scheduler)


def draw_rows(pipe, prompts: list[str], batches: list[list[int]], per_prompt: list[PromptSettings], files: list[Path] | None,
              config: SampleConfig, device, progress: bool, description: str = "sample",
              settings: dict | None = None, reading=None, remedy: str | None = None) -> dict[int, list]:
    """Draw each batch of prompt indices (prompts of one `PromptSettings.call`) as `per_prompt` says, one image per
    seed, each with its own seeded generator; write every image to its file, if `files` (with `settings`, its prompt,
    seed and own settings in the PNG's text) and return the rows by prompt index. `remedy`: as `decode`'s."""
    import torch
    from diffusers.utils import logging as diffusers_logging
    from tqdm.auto import tqdm

    from .fileio import atomic_write

    rows = {}
    bar = tqdm(total=sum(map(len, batches)), desc=description, unit="prompt", disable=not progress)
    verbosity = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()  # its own truncation notice repeats sdtune's warning
    try:
        count = config.num_images
        for batch in batches:
            shared = per_prompt[batch[0]]
            generators = [torch.Generator(device).manual_seed(seed) for index in batch for seed in per_prompt[index].seeds]
            images = draw(
                pipe,
                [prompts[index] for index in batch],
                remedy=remedy,
                negative_prompt=[per_prompt[index].negative_prompt for index in batch] if shared.negative_prompt is not None else None,
                reading=reading,
                num_images_per_prompt=count,
                generator=generators,
                num_inference_steps=shared.steps,
                guidance_scale=shared.guidance,
                guidance_rescale=guidance_rescale(config, pipe),
                width=shared.width,
                height=shared.height,
            )
            for offset, index in enumerate(batch):
                row = images[offset * count : (offset + 1) * count]
                for column, image in enumerate(row if files is not None else []):
                    own = {**(settings or {}), **per_prompt[index].shown()}
                    text = png_text({"prompt": prompts[index], "seed": per_prompt[index].seeds[column], **own})
                    with atomic_write(files[index * count + column]) as tmp:
                        image.save(tmp, format="PNG", pnginfo=text)
                rows[index] = row
            bar.update(len(batch))
    finally:
        bar.close()
        diffusers_logging.set_verbosity(verbosity)
    return rows


def draw(pipe, prompts, remedy=None, reading=None, negative_prompt=None, **settings) -> list:
    """PIL images from the pipeline: its denoising loop, then `decode` (`remedy`: as there); `reading` (how prompts
    are read, default the pipeline's own): see `conditioning.pipeline_prompts`."""
    import torch

    from .conditioning import PromptReading, pipeline_prompts

    with torch.no_grad():
        arguments = pipeline_prompts(pipe, prompts, negative_prompt, reading or PromptReading())
        latents = pipe(**arguments, output_type="latent", **settings).images
    return decode(pipe, latents, remedy)


def decode(pipe, latents, remedy=None) -> list:
    """The VAE's images of `latents`, decoded in the dtype of the VAE's decoder side (see `precision.vae_dtype`) with
    autocast off, as the pipeline itself decodes them. Under fp16 the images whose pixels overflow (inf or NaN from
    finite latents) are decoded again in fp32, one at a time, through the decoder side's exact fp32 weights
    (`precision.fp32_decoder`), the others kept: an overflowing image's result is its own latents' fp32 decode alone,
    whatever else is in its batch, and the VAE stays fp16. The one warning names `remedy` (default: `sdtune sample`'s)
    as what avoids the double decode."""
    import torch

    from .precision import SAMPLING_VAE_REMEDY, decoder_dtype, fp32_decoder, warn_vae_overflow

    vae = pipe.vae
    postprocess = pipe.image_processor.postprocess

    def decoded(part, dtype):
        return vae.decode(part.to(dtype) / vae.config.scaling_factor, return_dict=False)[0]

    images = []
    with torch.no_grad(), torch.autocast(latents.device.type, enabled=False):
        for part in latents.split(DECODE_BATCH):  # a 512 px decode holds gigabytes of activations an image
            dtype = decoder_dtype(vae)
            pixels = decoded(part, dtype)
            # latents that are not finite are the UNet's doing, which no fp32 decode mends
            overflowed = ~torch.isfinite(pixels).flatten(1).all(1) & torch.isfinite(part).flatten(1).all(1)
            if dtype != torch.float16 or not overflowed.any():  # one check a batch: its pixels go to the host next
                images += postprocess(pixels, output_type="pil")
                continue
            warn_vae_overflow(vae, remedy or SAMPLING_VAE_REMEDY)
            with fp32_decoder(vae):
                # one image a call: convolutions may round an image differently by its batch's size (they do on a
                # CPU), and an overflowing image's fp32 decode is then the same whatever else overflowed with it
                again = iter([postprocess(decoded(one, torch.float32), output_type="pil")[0]
                              for one in part[overflowed].split(1)])
            # postprocessed apart: the fine images' fp16 pixels go through its float maths in fp16, as in a batch
            # that did not overflow, the others' in fp32, as in an fp32 decode
            fine = iter(postprocess(pixels[~overflowed], output_type="pil") if not overflowed.all() else [])
            images += [next(again) if bad else next(fine) for bad in overflowed.tolist()]
    return images
