"""A run's model card: the README.md the Hugging Face Hub shows for a run folder uploaded as a model repo
(`sdtune card RUN`).

The card's YAML header is huggingface_hub's `ModelCardData` (base_model, license, tags, the instance prompt,
a widget of the sample grid), so the Hub links the base model and shows the grid; its text says what the
adapter is (method, options, trained parameters), how to use it (sdtune, its exports for ComfyUI, AUTOMATIC1111
and diffusers), how it was trained (from config.toml and metrics.jsonl) and what `sdtune evaluate` measured
(eval.json). Everything comes from the run's own files; nothing is downloaded.
"""

from __future__ import annotations

import json
import shlex
import tomllib
from dataclasses import dataclass
from pathlib import Path

from .config import spelled_for_python
from .errors import SdtuneError, shell_word, warn
from .version import __version__

CARD_FILE = "README.md"
GRID = Path("samples") / "grid.png"
LOSS_WINDOW = 10  # the final loss is the mean of the last steps' losses
# an adapter trained with --zero-terminal-snr is drawn on the schedule it trained on, as `sdtune sample` draws it
ZERO_SNR_SCHEDULER = ('pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config, rescale_betas_zero_snr=True, '
                      'timestep_spacing="trailing")  # trained with --zero-terminal-snr: its schedule ends at SNR 0')
# the training settings a card lists, with their labels, when config.toml has them
SETTINGS = {
    "steps": "steps", "batch_size": "batch size", "gradient_accumulation_steps": "gradient accumulation",
    "lr": "learning rate", "lr_scheduler": "learning-rate schedule", "lr_warmup_steps": "warm-up steps",
    "optimizer": "optimizer", "resolution": "resolution", "mixed_precision": "mixed precision", "seed": "seed",
    "train_text_encoder": "text encoder trained", "text_encoder_lr": "text encoder learning rate",
    "text_encoder_2_lr": "second text encoder learning rate", "clip_skip": "CLIP skip", "caption_dropout": "caption dropout",
    "shuffle_caption": "caption tags shuffled", "caption_tag_dropout": "caption tag dropout", "keep_tokens": "caption tags kept in place", "max_token_length": "tokens read", "snr_gamma": "min-SNR γ", "noise_offset": "noise offset",
    "debiased_estimation": "debiased estimation", "zero_terminal_snr": "zero terminal SNR", "multires_noise_iterations": "multires noise iterations",
    "multires_noise_discount": "multires noise discount",
    "loss_type": "loss", "class_prompt": "prior preservation (class prompt)", "dataset": "dataset",
    "classes": "classes", "max_per_class": "images a class, at most",
    "buckets": "aspect-ratio buckets", "ema_decay": "EMA decay", "masked_loss": "masked loss",
    "unmasked_weight": "unmasked weight", "token_embeddings": "new tokens a concept", "embedding_lr": "embedding learning rate",
    "retract_embeddings": "embeddings retracted",
}


@dataclass
class CardResult:
    output: Path
    base_model: str
    method: str


def is_hub_id(name: str) -> bool:
    """A name the Hub can link: `owner/model`, not a local path or an embedded model."""
    parts = name.split("/")
    return len(parts) == 2 and all(parts) and not Path(name).exists() and not name.startswith((".", "/", "~"))


@spelled_for_python("card")
def write_model_card(source: str | Path, output: str | Path | None = None, license: str | None = None,
                     overwrite: bool = False) -> CardResult:
    """Write the model card of the run (or adapter file) `source`, by default to RUN/README.md (README-step-N.md for
    a run's adapter-step-N.safetensors, whose card never replaces the run's)."""
    from .adapter import adapter_info, adapter_path, outputs_suffix
    from .fileio import check_output_target, output_file_lock, write_text_atomic
    from .kohya import is_kohya_file

    path = adapter_path(source)
    run = path.parent
    output = Path(output) if output else run / f"{Path(CARD_FILE).stem}{outputs_suffix(path)}{Path(CARD_FILE).suffix}"
    if output.is_dir():
        raise SdtuneError(f"--output {shell_word(output)} is a folder; give the card's file path (such as {output / CARD_FILE})")
    check_output_target(output, [path], overwrite)
    if is_kohya_file(path):
        raise SdtuneError(f"{path} is a kohya-format file; a card describes an sdtune run or adapter")
    info = adapter_info(path)
    text = model_card(path, info, license)
    with output_file_lock(output):
        check_output_target(output, [path], overwrite)  # again, now that no other command writes it
        write_text_atomic(output, text)
    return CardResult(output, info.base_model, info.method)


def model_card(path: Path, info, license: str | None = None) -> str:
    """The card's text (YAML header and Markdown) for the adapter file `path` (`info`: what it says about itself)
    and the run folder holding it."""
    from huggingface_hub import ModelCard, ModelCardData

    from . import methods
    from .adapter import outputs_suffix, saved_step
    from .data import fill_placeholders
    from .evaluation import evaluation_file
    from .fileio import human_bytes
    from .limits import changed_options

    run = path.parent
    settings = read_settings(run)
    # a run's step file (adapter-step-N.safetensors) is the run as it was at step N: its own samples, losses and evaluation
    suffix = outputs_suffix(path)
    step = saved_step(path) if (run / "config.toml").exists() else None
    run_steps = settings.get("steps")
    if step is not None:
        settings["steps"] = step
    name = run.name + suffix if (run / "config.toml").exists() else path.stem
    grid_file = Path(f"{GRID.parent}{suffix}") / GRID.name
    adapter_method = methods.create(info.method, **info.options)
    trained = trained_parameters(info, adapter_method) + token_rows(path)
    template = settings.get("template", "photo of a {token}.")
    prompt = template.format(token=info.token) if info.token and "{token}" in template else None
    # a run of several concepts: each concept's token and training prompt, in the order it trained them
    tokens = info.placeholder_tokens()
    concept_tokens = tokens if isinstance(tokens, dict) and len(tokens) > 1 else {}
    prompts = [template.format(token=token) for token in concept_tokens.values()] if prompt and concept_tokens else [prompt] * bool(prompt)
    captions = dataset_captions(settings)  # a run trained on a dataset is drawn by its classes' captions, not a token
    family = ["stable-diffusion-xl"] if info.extra.get("base_model_family") == "sdxl" else ["stable-diffusion"]
    tags = ["sdtune", *family, "text-to-image", info.method] + (["textual_inversion"] if info.new_tokens else [])
    grid = run / grid_file
    data = ModelCardData(
        base_model=info.base_model if is_hub_id(info.base_model) else None,
        license=license,
        tags=tags,
        instance_prompt="; ".join(prompts) or None,
        widget=[{"text": text, "output": {"url": grid_file.as_posix()}} for text in prompts or [captions[0] if captions else name]]
        if grid.is_file() else None,
    )
    counted = f"{trained:,} trained parameters, " if trained else ""
    lines = [
        f"# {name}",
        "",
        f"An sdtune adapter: **{changed_options(adapter_method)}** on "
        f"`{info.base_model}`, {counted}{human_bytes(path.stat().st_size)} on disk (sdtune {__version__}).",
        "",
        f"The method: {adapter_method.summary}.",
    ]
    if concept_tokens and prompt:
        lines += ["", f"It learnt {len(concept_tokens)} concepts, each with its token:", ""]
        lines += [f"- `{token}` stands for `<{concept}>` (training prompt: `{text}`)"
                  for (concept, token), text in zip(concept_tokens.items(), prompts)]
    elif prompt:
        lines += ["", f"The token `{info.token}` stands for the concept (training prompt: `{prompt}`)."]
    if info.new_tokens:
        tokens = ", ".join(f"`{token}`" for token in info.new_tokens)
        lines += ["", f"It also trained the embeddings of new tokens ({tokens}), which sdtune adds to the tokenizer "
                  "when it loads the adapter. Every export also writes them as `NAME_emb.safetensors` for diffusers' "
                  "`load_textual_inversion`, and the kohya file bundles them for ComfyUI and AUTOMATIC1111."]
    lines += starting_lines(info)
    if grid.is_file():
        lines += ["", f"![samples]({grid_file.as_posix()})"]
    placeholder = info.placeholder or "<concept>"
    from .sampling import adapters_reading, zero_snr_adapters

    zero_snr = bool(zero_snr_adapters([path], [info]))  # drawn as sdtune sample draws it: rescaled, trailing schedule
    reading = adapters_reading([path], [info])
    # read as it trained: diffusers' clip_skip counts one less than sdtune's (kohya-ss', AUTOMATIC1111's)
    call = "".join([f", clip_skip={reading.clip_skip - 1}"] * (reading.clip_skip > 1) + [", guidance_rescale=0.7"] * zero_snr)
    long_prompts = [f"# trained reading prompts to {reading.max_token_length} tokens; this pipeline reads 75 (sdtune sample "
                    f"reads {reading.max_token_length})"] * (reading.max_token_length != 75)
    # trained on base adapters: drawn stacked on them, each at its strength, as its training drew
    from .adapter import recorded_base_adapters

    bases = recorded_base_adapters(info)
    stack = [r["name"] for r in bases] + [path.name]
    strengths = [float(r.get("strength", 1.0)) for r in bases] + [1.0]
    listed = ",".join(f"{s:g}" for s in strengths)
    sample_scales, merge_scales = (f" --adapter-scale {listed}", f" --scale {listed}") if bases else ("", "")
    placeholders = [f"<{concept}>" for concept in concept_tokens] or [placeholder]
    examples = captions[:1] or [fill_placeholders(f"a {each} at dawn", tokens) for each in placeholders]
    adapters = " ".join("--adapter " + a for a in stack)
    asked = " ".join(f'--prompt "a {each} at dawn"' for each in placeholders)
    lines += [
        "", "## Use it", "", "```bash",
        f"sdtune sample {adapters}{sample_scales} {dataset_flags(settings)}   # one row per class, captioned as training captioned it"
        if captions else
        f"sdtune sample {adapters}{sample_scales} {asked}   # each <name> becomes its concept's token" if concept_tokens else
        f'sdtune sample {adapters}{sample_scales} {asked}   # {placeholder} becomes the token',
        f"sdtune export {path.name} --format kohya --output {name}.safetensors      # ComfyUI, AUTOMATIC1111, LyCORIS, InvokeAI"
        + (" (beside its base adapters)" if bases else ""),
        f"sdtune merge {' '.join(stack)}{merge_scales} --output {name}-merged/                        # a whole diffusers pipeline",
        "```", "", "```python", "import sdtune", *["from diffusers import DDIMScheduler"] * zero_snr,
        *(["from diffusers import DiffusionPipeline", "", f'pipe = DiffusionPipeline.from_pretrained("{info.base_model}")']
          if is_hub_id(info.base_model) else
          ["from sdtune.models import load_pipeline", "", f'pipe = load_pipeline("{info.base_model}")']),
        (f'sdtune.load_adapters({json.dumps(stack)}, pipe, {json.dumps(strengths)})   # merged, each at its strength' if bases else
         f'sdtune.load_adapter("{path.name}", pipe)   # merged; scale=0.8 weakens it'),
        *[ZERO_SNR_SCHEDULER] * zero_snr,
        *long_prompts,
        f"images = [pipe(prompt{call}).images[0] for prompt in {json.dumps(examples, ensure_ascii=False)}]" if len(examples) > 1 else
        f"image = pipe({json.dumps(examples[0], ensure_ascii=False)}{call}).images[0]",
        "```",
    ]
    rows = [(label, _shown(settings[key])) for key, label in SETTINGS.items() if _worth_showing(key, settings.get(key))]
    if concept_tokens:
        rows.insert(0, ("concepts", ", ".join(concept_tokens)))
    losses = final_losses(run, step)
    if rows or losses:
        lines += ["", "## Training", "", "| setting | value |", "| --- | --- |"]
        lines += [f"| {label} | {value} |" for label, value in rows]
        if losses:
            mean = sum(losses[-LOSS_WINDOW:]) / len(losses[-LOSS_WINDOW:])
            lines.append(f"| final loss (mean of the last {min(LOSS_WINDOW, len(losses))} steps) | {mean:.4f} |")
        if (run / "config.toml").exists():
            lines += ["", "`sdtune train --config config.toml` replays the run (`--output` elsewhere)"
                      + (f"; of its {run_steps} steps, this file is the save of step {step}." if step is not None else ".")]
    lines += evaluation_lines(run, info, path.name)
    files = [f for f in (path.name, "config.toml", "metrics.jsonl", evaluation_file(path).name, grid_file.as_posix())
             if (run / f).is_file()]
    lines += ["", "## Files", ""] + [f"- `{f}`" for f in files]
    return str(ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines).strip() + "\n"))


def starting_lines(info) -> list[str]:
    """What the adapter records of where its training started: the file its tensors started from
    (--init-weights) and the base adapters merged beneath it (--base-adapters), each by name and digest."""
    from .adapter import recorded_base_adapters, recorded_init_weights

    lines = []
    start = recorded_init_weights(info)
    if start:
        lines += ["", f"Training continued from `{start['name']}` (sha256 digest `{start.get('digest', '?')}`): its tensors "
                  "were the starting point, with a fresh optimizer and schedule."]
    bases = recorded_base_adapters(info)
    if bases:
        lines += ["", "It was trained on top of these adapters, merged into the base model first; load them with it "
                  "(`sdtune sample --adapter BASE ... --adapter THIS`) at these strengths:", ""]
        lines += [f"- `{r['name']}` at strength {float(r.get('strength', 1.0)):g} (digest `{r.get('digest', '?')}`)" for r in bases]
    return lines


def dataset_captions(settings: dict) -> list[str]:
    """Each trained class's caption, for a run trained on a dataset (none for a concept run, or where its classes
    cannot be read any more: a folder's classes moved away)."""
    from .datasets import class_captions

    if not settings.get("dataset"):
        return []
    try:
        return [caption for _, caption in class_captions(settings["dataset"], settings.get("data_root"),
                                                         settings.get("classes") or None, settings.get("class_template"))]
    except (SdtuneError, OSError):
        return []


def dataset_flags(settings: dict) -> str:
    """`sdtune sample`'s flags that draw the run's classes as its training captioned them."""
    from .datasets import dataset_info

    flags = [f"--dataset {settings['dataset']}"]
    if not dataset_info(settings["dataset"]).class_names:  # the folder's classes: sampling reads them there
        flags.append(f"--data-root {shlex.quote(str(settings['data_root']))}")
    if settings.get("classes"):
        flags.append(f"--classes {shlex.quote(','.join(settings['classes']))}")
    if settings.get("class_template"):
        flags.append(f"--class-template {shlex.quote(settings['class_template'])}")
    return " ".join(flags)


def read_settings(run: Path) -> dict:
    """The run's config.toml, or nothing for an adapter file alone."""
    path = run / "config.toml"
    if not path.is_file():
        return {}
    try:
        return tomllib.loads(path.read_text())
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as error:
        raise SdtuneError(f"{path}: not a readable run configuration ({error})") from None


def final_losses(run: Path, up_to: int | None = None) -> list[float]:
    """Each step's loss from metrics.jsonl (none without it), up to step `up_to` where given (a step file's)."""
    path = run / "metrics.jsonl"
    if not path.is_file():
        return []
    losses = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            record = json.loads(line)
            value = record.get("loss")
        except (ValueError, AttributeError):
            continue  # a line cut by a kill
        if up_to is not None and not (isinstance(record.get("step"), int) and record["step"] <= up_to):
            continue
        if isinstance(value, (int, float)):
            losses.append(float(value))
    return losses


def evaluation_lines(run: Path, info, adapter: str = "") -> list[str]:
    """The metrics table of the run's eval.json (eval-step-N.json for its step file `adapter`), if `sdtune evaluate`
    wrote one of the adapter as it is now."""
    from .adapter import ADAPTER_FILE
    from .evaluation import METRICS, evaluation_file, format_metric, read_evaluation, stale_evaluation

    adapter = adapter or ADAPTER_FILE
    report = read_evaluation(run, evaluation_file(run / adapter).name)
    if not report or not report.get("metrics"):
        return []
    if stale := stale_evaluation(report, run, info.method, info.options, adapter):  # another adapter's numbers
        measured = run if adapter == ADAPTER_FILE else run / adapter
        warn(f"{run}: {stale}; the card leaves its metrics out (run `sdtune evaluate --run {shell_word(measured)}` again)")
        return []
    lines = ["", "## Evaluation (`sdtune evaluate`)", "", "| metric | value | meaning |", "| --- | ---: | --- |"]
    for key, (title, meaning) in METRICS.items():
        if key in report["metrics"]:
            lines.append(f"| {title} | {format_metric(key, report['metrics'][key])} | {meaning} |")
    per_concept = report.get("per_concept") or {}
    shown = [key for key in ("clip_t", "clip_i", "dino") if key in report["metrics"]]
    if per_concept and shown:  # a run of several concepts: each concept's images against its own reference images
        lines += ["", "Each concept's images (CLIP-I and DINO against that concept's training images):", "",
                  "| concept | images | " + " | ".join(METRICS[key][0] for key in shown) + " |",
                  "| --- | ---: | " + " | ".join("---:" for _ in shown) + " |"]
        lines += [f"| {concept} | {values.get('images', '')} | "
                  + " | ".join(format_metric(key, values[key]) if key in values else "" for key in shown) + " |"
                  for concept, values in per_concept.items() if isinstance(values, dict)]
    return lines


def _worth_showing(key: str, value) -> bool:
    """A setting the card lists: set, and not an option left off (0, false; one micro-batch a step)."""
    if value is None or value is False:
        return False
    if key == "seed":
        return True
    left_off = {"gradient_accumulation_steps": 1, "clip_skip": 1, "max_token_length": 75}  # their defaults
    return not (value == 0 or (key in left_off and value == left_off[key]))


def trained_parameters(info, method) -> int:
    """How many parameters the adapter's method trained, counted on the base model's architecture built on the
    meta device from its configs (0 where those cannot be read: the card then leaves the count out)."""
    from .limits import probe_method
    from .models import read_model_configs

    try:
        configs = read_model_configs(info.base_model)
    except SdtuneError:
        return 0
    probe = probe_method(configs, method, bool(info.text_encoders))  # the UNet and text encoders injected once
    return probe.unet_counts()[1] + probe.text_counts()[1]


def token_rows(path: Path) -> int:
    """How many numbers the adapter's new token embeddings hold (0 without any)."""
    from safetensors import safe_open

    from .token_embeddings import TENSOR_PREFIX

    with safe_open(path, "pt") as tensors:
        shapes = [tensors.get_slice(key).get_shape() for key in tensors.keys() if key.startswith(TENSOR_PREFIX)]
    return sum(rows * width for rows, width in shapes)


def _shown(value) -> str:
    if isinstance(value, list):
        return ", ".join(map(str, value))
    return f"{value:g}" if isinstance(value, float) else "yes" if value is True else str(value)
