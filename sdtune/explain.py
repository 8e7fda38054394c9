"""`sdtune explain`: pictures of what an adapter learned.

- GIFT: generate an image with the adapter unmerged, read each tuned layer's output Y (h*w tokens x
  d_out) through the layer's cluster matrix C (d_out x M), and draw the M maps Y·C, upsampled and
  min–max normalised, over the image: one grid per layer. Under classifier-free guidance the
  conditional half of the batch is used; one step's output or the mean over all steps.
- Filter atoms: the learned atom updates ΔD as k×k tiles, one row per layer.
- Every method: a bar chart of per-layer update norms ‖ΔW‖, from the merged UNet against the base
  weights, which needs nothing from the method but its merge.

A run trained on base adapters (`train --base-adapters`) is explained on them, as it trained: where its
config.toml names them and each file is the one it recorded (`sampling.found_base_adapters`, as compare and
evaluate draw it), they are merged first, and the base weights are the ones they leave.

Images are drawn with PIL only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .config import ExplainConfig, spelled_for_python
from .errors import SdtuneError, warn
from .models import quiet_libraries

GRID_PAD = 2
HEADER = 18  # one line of text above every picture
MAX_CELL = 256  # cluster maps of SD's 512-pixel images are shown at half size to keep grids small
OVERLAY_ALPHA = 0.5
ATOM_TAP = 12  # pixels per kernel tap in the atom tiles
BAR_HEIGHT = 12
BAR_LENGTH = 400
MAX_BARS = 64  # full fine-tuning changes ~700 modules: show the largest


@dataclass
class ExplainResult:
    output: Path
    method: str
    files: list[Path] = field(default_factory=list)
    image: Path | None = None


# ---------------------------------------------------------------------------------------------
# Pure helpers (tests check them against the literal formulas)


def minmax_per_map(maps):
    """Each map (first axis) scaled to [0, 1]; a constant map becomes all zeros."""
    flat = maps.reshape(maps.shape[0], -1)
    low = flat.min(dim=1, keepdim=True).values
    high = flat.max(dim=1, keepdim=True).values
    return ((flat - low) / (high - low).clamp_min(1e-12)).reshape(maps.shape)


def heat_colours(values):
    """A jet-like colour map: values in [0, 1] (numpy, any shape) → RGB in [0, 1], shape + (3,)."""
    import numpy as np

    v = np.clip(values, 0.0, 1.0)[..., None]
    centres = np.array([0.75, 0.5, 0.25])  # red peaks at 0.75 and up, green at 0.5, blue at 0.25
    return np.clip(1.5 - np.abs(4.0 * v - 4.0 * centres), 0.0, 1.0)


def token_grid(tokens: int, latent_height: int, latent_width: int) -> tuple[int, int] | None:
    """(h, w) with h*w = tokens: the latent's own grid or one the UNet's stride-2 downsamplings make of it (each side
    halved, rounded up: a 13 x 20 latent's 7 x 10), or None for a non-spatial layer."""
    height, width = latent_height, latent_width
    while height * width > tokens and (height, width) != (1, 1):
        height, width = -(-height // 2), -(-width // 2)
    return (height, width) if height * width == tokens else None


def cluster_maps(outputs, clusters, height: int, width: int):
    """A layer's output Y (h*w tokens x d_out) projected on the clusters C (d_out x M): (M, h, w)."""
    return (outputs.float() @ clusters.float()).T.reshape(clusters.shape[1], height, width)


def grid_layout(count: int) -> tuple[int, int]:
    """(rows, columns) of a near-square grid for `count` pictures."""
    columns = math.ceil(math.sqrt(count))
    return math.ceil(count / columns), columns


# ---------------------------------------------------------------------------------------------
# The command


@spelled_for_python("explain")
@quiet_libraries()
def explain(run: ExplainConfig | str | Path, **settings: Any) -> ExplainResult:
    """Write the explanation pictures of a run's adapter to `output` (default RUN/explain; RUN/explain-step-N for its
    step file adapter-step-N.safetensors, so that the run's own pictures are never replaced).

    `run` is an `ExplainConfig`, or a run folder (or adapter file) with the config's other settings
    as keywords: `explain("runs/castle-gift", prompt="photo of a <castle>", steps=20)`.
    """
    from . import methods
    from .adapter import adapter_path, outputs_suffix, read_adapter_info
    from .fileio import OutputLock, check_no_file_in_the_way, ensure_writable_folder
    from .limits import check_drawing_fits

    if isinstance(run, ExplainConfig):
        if settings:
            raise SdtuneError("explain takes an ExplainConfig or a run with settings, not both")
        config = run
    else:  # a misspelt setting is named as the other commands' API names it, not a TypeError
        config = ExplainConfig.load(None, run=str(run), **settings)
    path = adapter_path(config.run)
    info = read_adapter_info(path)[0]
    config.validate()
    prompt, layer, step, steps, resolution, model = config.prompt, config.layer, config.step, config.steps, config.resolution, config.model
    explanation = methods.method_class(info.method).explanation
    if explanation == "clusters" and not prompt:
        raise SdtuneError(f"a {info.method} run needs --prompt: its cluster maps are drawn over a generated image")
    if layer is not None and not explanation:
        explained = " and ".join(name for name in methods.available() if methods.method_class(name).explanation)
        raise SdtuneError(f"--layer applies to {explained} runs; this is a {info.method} run")
    if explanation != "clusters":
        given = [flag for flag, value in (("--prompt", prompt), ("--step", step)) if value is not None]
        if given:
            drawn = " and ".join(name for name in methods.available() if methods.method_class(name).explanation == "clusters")
            raise SdtuneError(f"{', '.join(given)} applies to {drawn} runs (maps over a generated image), not to {info.method}")
    output = Path(config.output) if config.output else path.parent / f"explain{outputs_suffix(path)}"
    check_no_file_in_the_way(output, "output folder")
    if explanation == "clusters":  # it draws an image: sizes the model or the machine cannot take stop here
        check_drawing_fits(model or info.base_model, resolution, steps, width=config.width, height=config.height)
    ensure_writable_folder(output)
    lock = OutputLock(output)
    try:  # taken inside the try: an interrupt just after it is taken still releases it
        lock.acquire()  # one explanation at a time in `output`: another's pictures would mix with these
        lock.sweep(lambda name: name.endswith(".png"))  # what a killed explanation left half-written
        return _explain(config, path, info, explanation, output)
    finally:
        lock.release()


def _explain(config: ExplainConfig, path: Path, info, explanation: str | None, output: Path) -> ExplainResult:
    """Draw the pictures of the adapter `path` into `output` (locked, the settings checked)."""
    import torch

    from .adapter import load_adapter, load_adapters, open_adapter
    from .fileio import atomic_write
    from .models import load_pipeline
    from .sampling import found_base_adapters

    prompt, layer, step, steps, guidance = config.prompt, config.layer, config.step, config.steps, config.guidance
    seed, resolution, token, model = config.seed, config.resolution, config.token, config.model

    bases = found_base_adapters(path)  # a run trained on base adapters is drawn on them, as it trained
    pipe = load_pipeline(model or info.base_model)
    if bases:  # merged beneath it: the bars are then its own update on them
        load_adapters([base.path for base in bases], pipe, [base.strength for base in bases])
    base = {name: p.detach().to("cpu", copy=True) for name, p in tuned_weights(pipe, info.text_encoders).items()}
    method = open_adapter(path, pipe) if bases else load_adapter(path, pipe, merge=False)  # alone: warns of them
    if layer is not None and layer not in method.target_names:
        shown = ", ".join(method.target_names[:4]) + (", …" if len(method.target_names) > 4 else "")
        raise SdtuneError(f"unknown layer {layer!r}; this adapter tunes {len(method.target_names)} layers: {shown}")
    chosen = [layer] if layer else list(method.target_names)
    result = ExplainResult(output=output, method=info.method)

    def save(image, name: str) -> Path:
        file = output / name
        with atomic_write(file) as tmp:
            image.save(tmp, format="PNG")
        result.files.append(file)
        return file

    if explanation == "clusters":
        from .data import fill_placeholders

        text = fill_placeholders(prompt, token or info.placeholder_tokens())
        from .sampling import adapters_reading

        reading = adapters_reading([path], [info])  # the image drawn as the adapter was trained
        image, maps, timing = gift_cluster_maps(pipe, method, chosen, text, step, steps, guidance, seed, resolution, reading,
                                                width=config.width, height=config.height)
        result.image = save(image, "image.png")
        for name in chosen:
            if name not in maps:
                if layer is not None:
                    raise SdtuneError(f"layer {name!r} does not act on image tokens; its clusters cannot be drawn")
                warn(f"skipped {name}: its output is not a grid of image tokens")
                continue
            title = f"{method.explanation_label()}, {timing}: {name}"
            save(overlay_grid(image, maps[name], title), f"{name}.png")
    elif explanation == "tiles":
        save(atom_tiles({name: method.update_tiles(name).cpu() for name in chosen}), "atoms.png")

    method.merge()
    with torch.no_grad():
        norms = update_norms(base, tuned_weights(pipe, info.text_encoders))
    save(bar_chart(norms, f"{info.method}: per-layer update norm ||dW|| (merged minus base weights)"), "update-norms.png")
    return result


def gift_cluster_maps(pipe, method, names, text, step, steps, guidance, seed, resolution, reading=None,
                      width: int | None = None, height: int | None = None):
    """Generate one image (`width` × `height`, each side by default `resolution`'s, as `sdtune sample` draws) and return
    it with {layer: maps (M, h, w)}, each layer's tokens laid out on the latent's grid (`token_grid`), and a note of
    the step used."""
    import torch

    from .limits import drawn_size
    from .sampling import draw

    device = "cuda" if torch.cuda.is_available() else "cpu"
    pipe.to(device)
    width, height = drawn_size(width, height, resolution, pipe.unet.config.sample_size * pipe.vae_scale_factor)
    latent_height, latent_width = height // pipe.vae_scale_factor, width // pipe.vae_scale_factor
    # A step is one UNet evaluation; some schedulers (PNDM, SD v1.x's default) add one at the start.
    pipe.scheduler.set_timesteps(steps)
    evaluations = len(pipe.scheduler.timesteps)
    if step is not None and not 0 <= step < evaluations:
        extra = f"; {steps} steps take {evaluations} UNet evaluations with this scheduler" if evaluations != steps else ""
        raise SdtuneError(f"--step must be between 0 and {evaluations - 1}{extra}, got {step}")
    clusters = {name: method.output_clusters(name).float().cpu() for name in names}
    sums: dict[str, torch.Tensor] = {}
    counts = dict.fromkeys(names, 0)
    current = {"step": -1}

    def count_step(module, args):
        current["step"] += 1  # one UNet call per denoising step; CFG batches both halves in it

    def capture(name):
        def hook(module, args, out):
            if step is None or current["step"] == step:
                # one image per prompt: the batch is [unconditional, conditional] under CFG, else
                # [conditional]; the last item is the conditional one either way
                y = out[-1].detach().float().cpu()
                sums[name] = sums[name] + y if name in sums else y
                counts[name] += 1

        return hook

    handles = [pipe.unet.register_forward_pre_hook(count_step)]
    handles += [method.layers[name].register_forward_hook(capture(name)) for name in names]
    try:
        image = draw(
            pipe,
            text,
            reading=reading,
            num_inference_steps=steps,
            guidance_scale=guidance,
            height=height,
            width=width,
            generator=torch.Generator(device).manual_seed(seed),
        )[0]
    finally:
        for handle in handles:
            handle.remove()


    maps = {}
    for name in names:
        if not counts[name]:
            continue
        outputs = sums[name] / counts[name]  # tokens x d_out
        grid = token_grid(outputs.shape[0], latent_height, latent_width)
        if grid is None:
            continue
        maps[name] = cluster_maps(outputs, clusters[name], *grid)
    timing = f"step {step} of {evaluations}" if step is not None else f"mean over {evaluations} steps"
    return image, maps, timing


# ---------------------------------------------------------------------------------------------
# Drawing


def _font():
    from PIL import ImageFont

    return ImageFont.load_default(size=11)


def overlay_grid(image, maps, title: str):
    """One cell per map: the map upsampled to the image, min–max normalised, in heat colours over it."""
    import numpy as np
    import torch.nn.functional as F
    from PIL import Image, ImageDraw

    width, height = image.size
    upsampled = F.interpolate(maps[None].float(), size=(height, width), mode="bilinear", align_corners=False)[0]
    normalised = minmax_per_map(upsampled).numpy()
    picture = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    scale = min(1.0, MAX_CELL / max(width, height))
    cell_w, cell_h = max(1, round(width * scale)), max(1, round(height * scale))
    rows, columns = grid_layout(len(normalised))
    canvas = Image.new(
        "RGB",
        (columns * cell_w + (columns + 1) * GRID_PAD, HEADER + rows * cell_h + (rows + 1) * GRID_PAD),
        "white",
    )
    draw = ImageDraw.Draw(canvas)
    font = _font()
    draw.text((GRID_PAD, 3), title, fill="black", font=font)
    for index, values in enumerate(normalised):
        blended = (1 - OVERLAY_ALPHA) * picture + OVERLAY_ALPHA * heat_colours(values)
        cell = Image.fromarray((blended * 255).round().astype(np.uint8))
        if cell.size != (cell_w, cell_h):
            cell = cell.resize((cell_w, cell_h), Image.Resampling.BILINEAR)
        row, column = divmod(index, columns)
        x = GRID_PAD + column * (cell_w + GRID_PAD)
        y = HEADER + GRID_PAD + row * (cell_h + GRID_PAD)
        canvas.paste(cell, (x, y))
        draw.text((x + 2, y + 1), str(index), fill="white", font=font, stroke_width=1, stroke_fill="black")
    return canvas


def _label_width(labels: list[str]) -> int:
    font = _font()
    return int(max((font.getlength(label) for label in labels), default=0)) + 8


def atom_tiles(deltas: dict):
    """One row per layer: its m atom updates ΔD (k×k each), red positive, blue negative, white zero.

    Each row is scaled by its own largest |ΔD| (written beside it), so small layers stay visible.
    """
    import numpy as np
    from PIL import Image, ImageDraw

    labels = {name: f"{name}  max {delta.abs().max().item():.2e}" for name, delta in deltas.items()}
    label_w = _label_width(list(labels.values()))
    atoms = max(delta.shape[0] for delta in deltas.values())
    k = max(delta.shape[-1] for delta in deltas.values())
    tile = k * ATOM_TAP
    row_h = max(tile, 14)
    canvas = Image.new(
        "RGB",
        (label_w + atoms * (tile + GRID_PAD) + GRID_PAD, HEADER + len(deltas) * (row_h + GRID_PAD) + GRID_PAD),
        "white",
    )
    draw = ImageDraw.Draw(canvas)
    font = _font()
    draw.text((GRID_PAD, 3), "filter atoms: learned atom updates dD (red +, blue -), one row per layer", fill="black", font=font)
    for row, (name, delta) in enumerate(deltas.items()):
        y = HEADER + GRID_PAD + row * (row_h + GRID_PAD)
        draw.text((GRID_PAD, y + (row_h - 12) // 2), labels[name], fill="black", font=font)
        values = delta.float().numpy()
        scaled = values / max(float(np.abs(values).max()), 1e-12)
        for index, atom in enumerate(scaled):
            rgb = np.stack([1 - np.clip(-atom, 0, 1), 1 - np.abs(atom), 1 - np.clip(atom, 0, 1)], axis=-1)
            cell = Image.fromarray((rgb * 255).round().astype(np.uint8)).resize(
                (atom.shape[1] * ATOM_TAP, atom.shape[0] * ATOM_TAP), Image.Resampling.NEAREST
            )
            x = label_w + index * (tile + GRID_PAD)
            canvas.paste(cell, (x, y))
            draw.rectangle((x - 1, y - 1, x + cell.size[0], y + cell.size[1]), outline=(128, 128, 128))
    return canvas


def tuned_weights(pipe, text_encoders=()) -> dict:
    """The UNet's parameters by name, and those of the text encoders named (an adapter's `text_encoders`) under
    `<encoder>.`, named from CLIP's transformer as an adapter names their layers."""
    from .methods.base import text_encoder_layers

    weights = dict(pipe.unet.named_parameters())
    for encoder in text_encoders:
        weights.update({f"{encoder}.{name}": p for name, p in text_encoder_layers(getattr(pipe, encoder)).named_parameters()})
    return weights


def update_norms(base: dict, tuned) -> dict[str, float]:
    """‖ΔW‖ per module (Frobenius norm over all its parameters) between `base` and `tuned`'s weights (a model,
    or parameters by name: `tuned_weights`).

    Parameters that the merge added or removed, or whose shape changed (a token embedding with new rows),
    are not compared; modules whose weights are unchanged are left out.
    """
    squares: dict[str, float] = {}
    for name, parameter in (tuned.items() if isinstance(tuned, dict) else tuned.named_parameters()):
        before = base.get(name)
        if before is None or before.shape != parameter.shape:
            continue
        module = name.rpartition(".")[0]
        diff = (parameter.detach().float().cpu() - before.float()).pow(2).sum().item()
        squares[module] = squares.get(module, 0.0) + diff
    return {module: math.sqrt(value) for module, value in squares.items() if value > 0}


def bar_chart(values: dict[str, float], title: str):
    """Horizontal bars in module order, the largest MAX_BARS when there are more."""
    from PIL import Image, ImageDraw

    shown = values
    if len(values) > MAX_BARS:
        keep = set(sorted(values, key=values.get, reverse=True)[:MAX_BARS])
        shown = {name: value for name, value in values.items() if name in keep}
        title += f" (largest {MAX_BARS} of {len(values)} changed layers)"
    if not shown:
        title += ": no layer changed"
    label_w = _label_width(list(shown))
    value_w = 70
    canvas = Image.new(
        "RGB",
        (label_w + BAR_LENGTH + value_w + 2 * GRID_PAD, HEADER + max(len(shown), 1) * (BAR_HEIGHT + GRID_PAD) + GRID_PAD),
        "white",
    )
    draw = ImageDraw.Draw(canvas)
    font = _font()
    draw.text((GRID_PAD, 3), title, fill="black", font=font)
    top = max(shown.values(), default=0.0)
    for row, (name, value) in enumerate(shown.items()):
        y = HEADER + GRID_PAD + row * (BAR_HEIGHT + GRID_PAD)
        draw.text((GRID_PAD, y), name, fill="black", font=font)
        length = max(1, round(BAR_LENGTH * value / top)) if top > 0 else 0
        draw.rectangle((label_w, y, label_w + length, y + BAR_HEIGHT - 1), fill=(220, 90, 40))
        draw.text((label_w + length + 4, y), f"{value:.3g}", fill="black", font=font)
    return canvas
