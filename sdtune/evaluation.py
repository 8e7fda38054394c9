"""Measure generated images: text alignment, fidelity to the reference images, distance, diversity.

- CLIP-T: torchmetrics' CLIPScore between each image and its prompt (100 × cosine, floored at 0), the prompt's
  placeholders as plain class words and without sdtune's new tokens (`<s0>`).
- CLIP-I and DINO: mean cosine similarity over every (generated, reference) pair of image embeddings; for a run
  trained on a dataset, each class's generated images with that class's reference images, averaged over the classes;
  for a run of several concepts, each concept's (by the concept its prompt names) with that concept's images.
- An image's prompt (CLIP-T, diversity, the fidelity pairs alike): as drawn, or the one its PNG text records.
- FID and KID: torchmetrics' FrechetInceptionDistance / KernelInceptionDistance between the generated
  and the reference images, on Inception features (torch-fidelity) or on the CLIP or DINO embeddings.
- diversity: 1 − mean cosine similarity over the pairs of images drawn for the same prompt (DINO embeddings),
  averaged over the prompts.

Every model is named by an option and loaded from a folder or the local Hugging Face cache (downloaded
only where the hub is online). A metric whose model cannot be had is reported unavailable with a
one-line reason, and the others still run.
"""

from __future__ import annotations

import json
import os
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from .config import EvaluateConfig, strength_name
from .adapter import adapter_digest
from .errors import SdtuneError, error_line, first_sentence, said_to_caller, shell_word, warn
from .models import quiet_libraries
from .trained_prompts import run_concepts, run_prompts

EVAL_FILE = "eval.json"
FORMAT = "sdtune-eval/1"
# What eval.json's metrics mean; raised when one is measured otherwise, with what changed in REDEFINED, so that an
# earlier eval.json's value is not read as today's (read_evaluation moves it to `unavailable`, saying why).
METRICS_VERSION = 3
EVALUATE_AGAIN = "run `sdtune evaluate` again to measure it as now"
REDEFINED = {
    2: {
        "diversity": "an earlier sdtune measured diversity over every prompt's images pooled (now within each prompt)",
        "clip_i": "an earlier sdtune measured this dataset run's CLIP-I against every class's reference images (now its own class's)",
        "dino": "an earlier sdtune measured this dataset run's DINO against every class's reference images (now its own class's)",
    },
    3: {
        "clip_i": "an earlier sdtune measured this run's CLIP-I against every concept's reference images (now its own concept's)",
        "dino": "an earlier sdtune measured this run's DINO against every concept's reference images (now its own concept's)",
    },
}
SAMPLES_FOLDER = "eval-samples"
# why an evaluation's prompt file's kohya-ss options (--n, --w, ...) are not used
EVALUATE_OPTIONS_UNUSED = "evaluate draws every prompt at its own --negative-prompt, size, --seed, --steps and --guidance: the metrics compare one set of images drawn alike"
BATCH = 32
KID_MAX_SUBSET = 1000
INCEPTION_FEATURES = 2048

# name -> (title, what it says); the order of every table
METRICS: dict[str, tuple[str, str]] = {
    "clip_t": ("CLIP-T", "text alignment: CLIP score of image and prompt (higher is better)"),
    "clip_i": ("CLIP-I", "fidelity: CLIP image similarity to the reference images (higher is better)"),
    "dino": ("DINO", "fidelity: DINO image similarity to the reference images (higher is better)"),
    "fid": ("FID", "Fréchet distance to the reference images' features (lower is better)"),
    "kid": ("KID", "kernel distance to the reference images' features (lower is better)"),
    "kid_std": ("KID std", "KID's standard deviation over subsets"),
    "diversity": ("diversity", "1 − mean DINO similarity among the images of one prompt (higher is more varied)"),
    # the digits metric set (sdtune.digits.DigitMetrics: a sweep plan's metrics = "digits"), on the tiny digits model
    "digit_fidelity": ("digit fidelity", "digit-classifier feature similarity to the reference images (higher is better)"),
    "style_fidelity": ("style fidelity", "share of the base-to-reference gap in slant and ink closed (1 = reference)"),
    "preservation": ("preservation", "digit-classifier accuracy on the other digits' plain prompts (higher is better)"),
}
# `sdtune sample`'s image names: NNN-seedK, or NNN-scaleS-seedK in a strength sweep
SAMPLE_NAME = re.compile(r"^(\d+)-(?:scale(-?[\d.]+(?:e[+-]\d+)?)-)?seed-?\d+$")


class MetricUnavailable(Exception):
    """A metric cannot be computed here; the message says why in one line."""


@dataclass
class Evaluation:
    """What `evaluate` measured; `report` is what eval.json holds."""

    output: Path
    metrics: dict[str, float]
    unavailable: dict[str, str]  # returned to Python, its reasons name settings as it spells them; eval.json's flags
    report: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.unavailable = {name: said_to_caller(why) for name, why in self.unavailable.items()}

    def table(self) -> str:
        """The metrics as aligned text: name, value (or why it is unavailable), meaning."""
        rows = []
        for name, (title, meaning) in METRICS.items():
            if name in self.metrics:
                rows.append((title, format_metric(name, self.metrics[name]), meaning))
            elif name in self.unavailable:
                rows.append((title, "unavailable", self.unavailable[name]))
        width = [max(len(row[i]) for row in rows) for i in range(2)]
        return "\n".join(f"{a.ljust(width[0])}  {b.rjust(width[1])}  {c}" for a, b, c in rows) + self.concepts_table()

    def concepts_table(self) -> str:
        """A run of several concepts' CLIP-T, CLIP-I and DINO of each concept's images, as aligned text after the
        metrics ("" for other runs)."""
        per_concept = self.report.get("per_concept") or {}
        names = [name for name in ("clip_t", "clip_i", "dino") if any(name in values for values in per_concept.values())]
        if not per_concept:
            return ""
        rows = [("concept", "images", *(METRICS[name][0] for name in names))]
        rows += [(concept, str(values["images"]), *(format_metric(name, values[name]) if name in values else "-" for name in names))
                 for concept, values in per_concept.items()]
        width = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
        lines = ["  ".join([row[0].ljust(width[0]), *(cell.rjust(w) for cell, w in zip(row[1:], width[1:]))]).rstrip()
                 for row in rows]
        return "\n\nper concept (each against its own images):\n" + "\n".join(lines)


# decimal places each metric is shown at everywhere (tables, reports, cards); 4 for those not named
METRIC_DECIMALS = {"clip_t": 2, "fid": 2, "kid": 5, "kid_std": 5}


def metric_decimals(name: str) -> int:
    return METRIC_DECIMALS.get(name, 4)


def format_fixed(value: float, decimals: int) -> str:
    """`value` at `decimals` places, trailing zeros kept (0.8400 beside 0.8468); one too small to show two significant
    digits there in scientific notation with four (1.264e-05, not 0.0000), so that it reads alike wherever it stands."""
    if value != 0 and abs(value) < 10 ** -(decimals - 1):
        return f"{value:.3e}"
    return f"{value:.{decimals}f}"


def format_metric(name: str, value: float) -> str:
    return format_fixed(value, metric_decimals(name))


# ---------------------------------------------------------------------------------------------
# Models


def hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")


def from_pretrained(flag: str, name: str, load: Callable[..., Any]):
    """`load(source, local_files_only=...)` for a folder or a hub id, or MetricUnavailable saying why not."""
    path = Path(name).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise MetricUnavailable(f"{flag} {name}: not a model folder (no config.json)")
        try:
            return load(str(path), local_files_only=True)
        except Exception as error:
            raise MetricUnavailable(f"{flag} {name}: could not load the folder ({first_sentence(error)})") from None
    if name.startswith((".", "/", "~")) or name.count("/") != 1:
        raise MetricUnavailable(f"{flag} {name}: no such folder, and not a hub id")
    try:
        return load(name, local_files_only=True)
    except Exception:
        if hub_offline():
            raise MetricUnavailable(f"{flag} {name}: not in the local Hugging Face cache and the hub is offline") from None
    try:
        return load(name)
    except Exception as error:
        from .models import hub_reason

        raise MetricUnavailable(
            f"{flag} {name}: not in the local Hugging Face cache and could not be downloaded ({hub_reason(error)})"
        ) from None


def _tensor_of(output):
    """The embedding tensor: transformers 5 returns a model output whose pooler_output holds it."""
    return output if not hasattr(output, "pooler_output") else output.pooler_output


def _pooled_clip_class():
    from torch import nn

    class PooledCLIP(nn.Module):
        """A CLIPModel whose get_image_features / get_text_features return tensors, as CLIPScore expects."""

        def __init__(self, model):
            super().__init__()
            self.model = model
            self.config = model.config

        def get_image_features(self, *args, **kwargs):
            return _tensor_of(self.model.get_image_features(*args, **kwargs))

        def get_text_features(self, *args, **kwargs):
            return _tensor_of(self.model.get_text_features(*args, **kwargs))

    return PooledCLIP


def load_clip(name: str):
    """(CLIPModel in eval mode, CLIPProcessor) from a folder or the hub."""
    from transformers import CLIPModel, CLIPProcessor

    model = from_pretrained("--clip-model", name, CLIPModel.from_pretrained)
    processor = from_pretrained("--clip-model", name, CLIPProcessor.from_pretrained)
    return model.eval(), processor


def load_dino(name: str):
    """(a ViT such as DINO ViT-S/16 through AutoModel, in eval mode, its image processor)."""
    from transformers import AutoImageProcessor, AutoModel

    model = from_pretrained("--dino-model", name, AutoModel.from_pretrained)
    processor = from_pretrained("--dino-model", name, AutoImageProcessor.from_pretrained)
    return model.eval(), processor


def image_features_class():
    import torch
    from torch import nn

    class ImageFeatures(nn.Module):
        """uint8 images (N, 3, H, W) → one embedding each, through a Hugging Face model and its processor.

        Also what FID and KID take as their feature extractor (`num_features` tells them the width).
        """

        def __init__(self, model, processor, embed: Callable, num_features: int):
            super().__init__()
            self.model = model
            self.processor = processor
            self.embed = embed
            self.num_features = num_features

        @torch.no_grad()
        def forward(self, images):
            arrays = [image.permute(1, 2, 0).cpu().numpy() for image in images]
            pixels = self.processor(images=arrays, return_tensors="pt")["pixel_values"]
            device = next(self.model.parameters()).device
            return self.embed(self.model, pixels.to(device)).float().cpu()  # metric states live on the CPU

    return ImageFeatures


def clip_features(model, processor):
    """CLIP's projected image embedding (what CLIP-I compares)."""
    return image_features_class()(
        model, processor, lambda m, pixels: _tensor_of(m.get_image_features(pixel_values=pixels)), model.config.projection_dim
    )


def dino_features(model, processor):
    """The ViT's class token after the last layer norm (DINO's image embedding)."""
    return image_features_class()(
        model, processor, lambda m, pixels: m(pixel_values=pixels).last_hidden_state[:, 0], model.config.hidden_size
    )


# ---------------------------------------------------------------------------------------------
# Metrics on uint8 image tensors (3, H, W)


def _batches(images: list, size: int = BATCH):
    """Stacked batches of images of the same size, in order within each size."""
    import torch

    by_size: dict[tuple, list] = {}
    for image in images:
        by_size.setdefault(tuple(image.shape), []).append(image)
    for group in by_size.values():
        for start in range(0, len(group), size):
            yield torch.stack(group[start : start + size])


def embed(features, images: list):
    """Unit-length embeddings (N, D) of `images` through an ImageFeatures module."""
    import torch

    vectors = torch.cat([features(batch) for batch in _batches(images)]) if images else torch.zeros(0)
    return torch.nn.functional.normalize(vectors.double(), dim=-1)


def mean_cross_similarity(a, b) -> float:
    """Mean cosine similarity over every pair (row of a, row of b) of unit vectors."""
    return (a @ b.T).mean().item()


def mean_pairwise_similarity(a) -> float:
    """Mean cosine similarity over the distinct pairs of rows of a (unit vectors)."""
    n = a.shape[0]
    if n < 2:
        raise MetricUnavailable("needs at least 2 generated images")
    similarities = a @ a.T
    return ((similarities.sum() - similarities.diagonal().sum()) / (n * (n - 1))).item()


def mean_diversity_within_groups(a, groups: list[list[int]]) -> float:
    """1 − mean cosine similarity among the rows of each group (unit vectors), averaged over the groups of 2 or more:
    variety among images drawn for one prompt, not how different the prompts look."""
    counted = [group for group in groups if len(group) >= 2]
    if not counted:
        prompts = "the one prompt has" if len(groups) == 1 else f"each of the {len(groups)} prompts has"
        raise MetricUnavailable(f"needs 2 or more images drawn for one prompt, and {prompts} one")
    return sum(1.0 - mean_pairwise_similarity(a[group]) for group in counted) / len(counted)


def mean_cross_similarity_by_class(a, b, a_classes: list[str | None], b_classes: list[str]) -> float:
    """Mean cosine similarity of each class's rows of a with that class's rows of b (unit vectors), averaged over the
    classes of a: fidelity to one's own class's reference images, each class counting alike. The rows of class None
    (of no one class) are one more group, paired with every row of b."""
    means = []
    for name in dict.fromkeys(a_classes):
        rows = [index for index, own in enumerate(a_classes) if own == name]
        references = [index for index, own in enumerate(b_classes) if own == name or name is None]
        means.append(mean_cross_similarity(a[rows], b[references]))
    return sum(means) / len(means)


def clip_score(model, processor, images: list, texts: list[str]) -> float:
    """torchmetrics' CLIPScore averaged over (image, text) pairs, with an already loaded CLIP."""
    from torchmetrics.multimodal.clip_score import CLIPScore

    metric = CLIPScore(model_name_or_path=lambda: (_pooled_clip_class()(model), processor))
    metric.to(images[0].device if images else "cpu")  # its running sum lives where the scores are computed
    for start in range(0, len(images), BATCH):
        metric.update(images[start : start + BATCH], texts[start : start + BATCH])
    return metric.compute().item()


def distribution_distances(feature, generated: list, reference: list, seed: int = 0) -> dict[str, float]:
    """FID, KID and KID's std between the two sets; `feature` is 2048 (Inception) or an nn.Module.

    KID's subsets are as large as the smaller set allows (at most 1000), so small sets work.
    """
    import torch
    from torchmetrics.image.fid import FrechetInceptionDistance
    from torchmetrics.image.kid import KernelInceptionDistance

    if len(generated) < 2 or len(reference) < 2:
        raise MetricUnavailable("needs at least 2 generated and 2 reference images")
    subset_size = min(len(generated), len(reference), KID_MAX_SUBSET)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # KID's note that it keeps every feature in memory
        try:
            fid = FrechetInceptionDistance(feature=feature)
            kid = KernelInceptionDistance(feature=feature, subset_size=subset_size)
        except ModuleNotFoundError:
            raise MetricUnavailable("Inception features need torch-fidelity (pip install torch-fidelity)") from None
        except Exception as error:
            raise MetricUnavailable(f"the Inception weights could not be loaded ({first_sentence(error)})") from None
    for real, images in ((True, reference), (False, generated)):
        for batch in _batches(images):
            fid.update(batch, real=real)
            kid.update(batch, real=real)
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)  # KID draws its subsets from the global generator
    try:
        kid_mean, kid_std = kid.compute()
    finally:
        torch.random.set_rng_state(state)
    return {"fid": fid.compute().item(), "kid": kid_mean.item(), "kid_std": kid_std.item()}


# ---------------------------------------------------------------------------------------------
# Images and prompts


def _to_tensor(image):
    import numpy as np
    import torch

    return torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1).contiguous()


def read_images(paths: list, size: tuple[int, int] | None = None) -> list:
    """uint8 tensors (3, H, W): as they are, or resized to cover `size` (width, height) and center-cropped to it.
    Besides files, `paths` may hold PIL images (an in-memory dataset's examples, as `run_reference` gives them)."""
    from PIL import Image

    from .data import frame, load_framed_images, to_rgb

    if size:
        files = [path for path in paths if not isinstance(path, Image.Image)]
        in_memory = [frame(to_rgb(image), *size).image for image in paths if isinstance(image, Image.Image)]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # small reference images are upscaled: expected here
            # one bucket: every image framed to exactly that size, whatever its own aspect
            framed = [framed.image for framed in load_framed_images(files, max(size), buckets=[size])] if files else []
            return [_to_tensor(image) for image in framed + in_memory]
    images = []
    for path in paths:
        try:
            with Image.open(path) as image:
                images.append(_to_tensor(to_rgb(image)))
        except (OSError, ValueError) as error:  # not an image, or a damaged one
            raise SdtuneError(f"{path}: not a readable image ({first_sentence(error)})") from None
    return images


def image_folder(path: str | Path) -> list[Path]:
    """The images of a folder, or of its images/ subfolder (what `sdtune sample` writes)."""
    from .data import list_images

    path = Path(path)
    if (path / "images").is_dir():
        path = path / "images"
    return list_images(path)


def sweep_strength(path: Path) -> str | None:
    """The S of a strength sweep's image name NNN-scaleS-seedK; None for any other name."""
    match = SAMPLE_NAME.match(path.stem)
    return match.group(2) if match else None


def one_strength(files: list[Path], scale: float, folder: str) -> list[Path]:
    """From a strength sweep's images (NNN-scaleS-seedK), those drawn at `scale`; other folders as they are."""
    strengths = {}
    for path in files:
        strengths.setdefault(sweep_strength(path), []).append(path)
    if set(strengths) == {None}:
        return files
    wanted = strength_name(scale)
    if wanted not in strengths:
        found = ", ".join(sorted((s for s in strengths if s is not None), key=float))
        raise SdtuneError(f"{folder} holds images drawn at adapter strengths {found}: pick one with --adapter-scale")
    return strengths[wanted]


def pair_prompts(files: list[Path], prompts: list[str]) -> list[str]:
    """The prompt of each image: the only one, or by the NNN index of `sdtune sample`'s NNN-seedS names."""
    if not prompts:
        raise MetricUnavailable("no prompts (give --prompts FILE or --prompt TEXT)")
    if len(prompts) == 1:
        return [prompts[0]] * len(files)
    paired = []
    for path in files:
        match = SAMPLE_NAME.match(path.stem)
        if not match or int(match.group(1)) >= len(prompts):
            raise MetricUnavailable(
                f"cannot tell {path.name}'s prompt among {len(prompts)} (sdtune sample names images NNN-seedS)"
            )
        paired.append(prompts[int(match.group(1))])
    return paired


def image_prompts(files: list, prompts: list[str], tokens: str | dict[str, str] | None = None) -> list[str]:
    """Each image's prompt, as diversity groups them: the one its PNG text records (`sdtune sample` writes it), as
    given where a given prompt fills to it (`<castle>` rather than its token); an image recording none: the one prompt
    given, or of several the one its NNN-seedS name's NNN indexes."""
    from .data import fill_placeholders

    as_given = {fill_placeholders(prompt, tokens): prompt for prompt in reversed(prompts)}
    recorded = [recorded_prompt(path) for path in files]
    unrecorded = [path for path, prompt in zip(files, recorded) if prompt is None]
    paired = iter(pair_prompts(unrecorded, prompts) if unrecorded else [])
    return [next(paired) if prompt is None else as_given.get(prompt, prompt) for prompt in recorded]


def indices_by_value(values: list) -> dict:
    """Each distinct value → the indices it stands at, in order of first appearance."""
    indices: dict = {}
    for index, value in enumerate(values):
        indices.setdefault(value, []).append(index)
    return indices


def recorded_prompt(path) -> str | None:
    """The prompt `sdtune sample` recorded in the image's PNG text, or None (another file, or unreadable text)."""
    from PIL import Image

    from .sampling import SETTINGS_CHUNK

    try:
        with Image.open(path) as image:
            settings = json.loads(image.info.get(SETTINGS_CHUNK, "null"))
    except (OSError, ValueError, TypeError):
        return None
    prompt = settings.get("prompt") if isinstance(settings, dict) else None
    return prompt if isinstance(prompt, str) else None


def prompt_groups(files: list, prompts: list[str]) -> list[list[int]]:
    """The indices of the images drawn for each prompt where `image_prompts` cannot tell each image's prompt (no prompt
    given): by the prompt each image's PNG text records (`sdtune sample` writes it); else every image is of the one
    prompt given, or of several, the one its NNN-seedS name's NNN indexes."""
    keys: list = []
    for path in files:
        prompt = recorded_prompt(path)
        match = SAMPLE_NAME.match(Path(path).stem)
        if prompt is not None:
            keys.append(("prompt", prompt))
        elif len(prompts) <= 1:
            keys.append(("the one prompt",))
        elif match:
            keys.append(("index", int(match.group(1))))
        else:
            raise MetricUnavailable(f"cannot tell which images share a prompt: {Path(path).name} records none and is not "
                                    "named NNN-seedS as sdtune sample names images")
    return list(indices_by_value(keys).values())


MAX_DATASET_REFERENCE = 2000  # a dataset run's reference images at most: 50,000 at 512 px would be 39 GB of RAM


def run_dataset(run: Path):
    """The labelled dataset a run trained on (its classes, split and images per class), or None for a concept's run;
    over MAX_DATASET_REFERENCE images, that many drawn evenly over its classes (seeded by the run's seed)."""
    from dataclasses import replace

    from .config import read_toml
    from .datasets import balanced_subset, load_dataset, readable_examples

    settings = read_toml(run / "config.toml") if (run / "config.toml").is_file() else {}
    if not settings.get("dataset"):
        return None
    try:
        seed = settings.get("seed") or 0
        dataset = load_dataset(
            settings["dataset"], settings.get("data_root"), classes=settings.get("classes") or None,
            max_per_class=settings.get("max_per_class") or 0, split=settings.get("split"),
            template=settings.get("class_template"), seed=seed,
        )
        if len(dataset.examples) > MAX_DATASET_REFERENCE:
            per_class = max(1, MAX_DATASET_REFERENCE // len({example.label for example in dataset.examples}))
            dataset = replace(dataset, examples=balanced_subset(dataset.examples, per_class, seed))
        return readable_examples(dataset)
    except (SdtuneError, TypeError, ValueError) as error:  # moved data, or a config.toml edited by hand
        raise MetricUnavailable(f"no reference images ({error_line(error)}; give --reference DIR)") from None


def run_reference(run: Path) -> list:
    """The images the run was trained on: files, or (a dataset held in memory, such as digits) PIL images."""
    return run_reference_with_classes(run)[0]


def run_reference_with_classes(run: Path) -> tuple[list, list[str] | None]:
    """The run's reference images (as `run_reference`), with each one's class caption (the prompt sampling draws the
    class with) for a run trained on a dataset, else None."""
    if not (run / "config.toml").is_file():
        raise MetricUnavailable(f"no reference images: {run} has no config.toml (give --reference DIR)")
    dataset = run_dataset(run)
    if dataset is not None:
        from PIL import Image

        captions = [dataset.caption(example.label) for example in dataset.examples]
        if dataset.arrays is not None:
            return [Image.fromarray(dataset.arrays[example.image]) for example in dataset.examples], captions
        return [example.image for example in dataset.examples], captions
    return [path for _, paths in concept_references(run) for path in paths], None


def concept_references(run: Path) -> list[tuple[str, list[Path]]]:
    """Each of a concept run's concepts (one or several) with its reference images: the folder it trained on."""
    from .config import read_toml
    from .datasets import concept_images

    settings = read_toml(run / "config.toml")
    concepts, folders = settings.get("concept", ""), settings.get("images")
    if not isinstance(concepts, list):  # one concept (several: a list, with a list of folders or none)
        concepts, folders = [concepts], [folders]
    named = [*concepts, *(folders or []), settings.get("data_root")]
    if not all(value is None or isinstance(value, str) for value in named):
        raise MetricUnavailable(f"no reference images: {run / 'config.toml'} names its concept or images as other than text (give --reference DIR)")
    try:
        return [(concept, concept_images(concept, folder, settings.get("data_root")))
                for concept, folder in zip(concepts, folders or [None] * len(concepts))]
    except SdtuneError as error:
        raise MetricUnavailable(f"no reference images ({error}; give --reference DIR)") from None


def named_concept(prompt: str, tokens: dict[str, str]) -> str | None:
    """The one concept a prompt names, by its placeholder `<name>` or its token written out (`sks castle`, whole
    words); None where it names none or several."""
    named = [name for name, token in tokens.items()
             if f"<{name}>" in prompt or (token and re.search(rf"(?<!\w){re.escape(token)}(?!\w)", prompt))]
    return named[0] if len(named) == 1 else None


def reference_source(config: EvaluateConfig, run: Path | None, reference_files: list) -> str | None:
    """Where the reference images came from, for eval.json: the folder (a run of several concepts: each concept's,
    comma-separated, in the order it trained them), or a dataset run's dataset."""
    from .config import read_toml

    if not reference_files:
        return None
    if not config.reference and run is not None and (settings := read_toml(run / "config.toml")).get("dataset"):
        root = settings.get("data_root")
        return f"dataset {settings['dataset']}" + (f" ({root})" if root else "")
    folders = dict.fromkeys(str(Path(file).parent) for file in reference_files)  # in order, each once
    return ", ".join(folders)


# ---------------------------------------------------------------------------------------------
# The evaluation


@quiet_libraries()
def evaluate(config: EvaluateConfig, progress: bool = True) -> Evaluation:
    """Sample with the run's adapter (or read --images), measure every metric, write eval.json."""
    from .adapter import ADAPTER_FILE, adapter_path, read_adapter_info
    from .data import read_prompt_file
    from .fileio import output_file_lock

    config.validate()
    info = read_adapter_info(config.run)[0] if config.run else None
    run = adapter_path(config.run).parent if config.run else None
    if run is not None and adapter_path(config.run).name == ADAPTER_FILE:
        from .adapter import unfinished_run

        if unfinished := unfinished_run(run, info.extra.get("step", "")):
            warn(f"{run} is unfinished: its adapter is of {unfinished}; it is measured as it is now")
    # the metrics compare one set of images drawn alike: a prompt file's own --n, --w, ... are not used
    prompts = list(config.prompt) + (read_prompt_file(config.prompts, EVALUATE_OPTIONS_UNUSED) if config.prompts else [])
    if not prompts and info is not None:
        prompts = run_prompts(run, info.placeholder or "<concept>", info.placeholder_tokens())
    files = one_strength(image_folder(config.images), config.adapter_scale, config.images) if config.images else []
    if config.output:
        output = Path(config.output)
    else:
        output = evaluation_file(adapter_path(config.run)) if run else Path(config.images) / EVAL_FILE
    if not output.parent.is_dir():
        raise SdtuneError(f"output folder not found: {output.parent}")
    if output.is_dir():
        raise SdtuneError(f"--output {shell_word(output)} is a folder; give the path of the results file (such as {output / EVAL_FILE})")
    samples = None if config.images else samples_folder(output, adapter_path(config.run))
    # held from before the images are drawn: a second evaluation of the same file is refused at once, not after its
    # work (and, of a run, before it draws over the samples this one measures); what a killed one left of it is swept.
    # Its samples folder too, until they are measured: another evaluation drawing there is refused, never mixed in.
    with output_file_lock(output), samples_lock(samples):
        return _evaluate(config, progress, info, run, prompts, files, output, samples)


def samples_folder(output: Path, adapter: Path) -> Path:
    """Where an evaluation written to `output` draws its images: for its default eval.json the run's eval-samples/ (a
    step file's eval-samples-step-N/), else NAME-samples/ beside NAME.json. Each output has its own, which a rerun of
    that evaluation draws again; two evaluations with different outputs never draw over each other's images."""
    from .adapter import outputs_suffix

    if output.resolve() == evaluation_file(adapter).resolve():
        return adapter.parent / f"{SAMPLES_FOLDER}{outputs_suffix(adapter)}"
    return output.with_name(f"{output.stem}-samples")


def samples_lock(samples: Path | None):
    """The lock of an evaluation's samples folder (beside it: `sdtune sample` locks the folder itself only while it
    draws), held from before the images are drawn until they are measured; none for --images."""
    import contextlib

    from .fileio import OutputLock, file_lock_name

    if samples is None:
        return contextlib.nullcontext()
    return OutputLock(samples.parent, file_lock_name(samples.name), what=f"samples folder {shell_word(samples)}")


def _evaluate(config: EvaluateConfig, progress: bool, info, run: Path | None, prompts: list[str], files: list,
              output: Path, samples: Path | None) -> Evaluation:
    """The evaluation of `evaluate`, its inputs read and `output` and `samples` locked: the images drawn into `samples`
    (or `files`), measured, written."""
    import torch

    from .adapter import adapter_path
    from .config import SampleConfig
    from .data import fill_placeholders
    from .fileio import write_text_atomic

    # The reference images, found before anything is drawn: a run whose config names none says so now.
    unavailable: dict[str, str] = {}
    reference_files: list[Path] = []
    reference_classes: list[str] | None = None  # each reference image's class caption, for a dataset run
    try:
        if config.reference:
            from .data import list_images

            reference_files = list_images(config.reference)
        elif run is not None:
            reference_files, reference_classes = run_reference_with_classes(run)
        else:
            raise MetricUnavailable("no reference images (give --reference DIR)")
    except MetricUnavailable as error:
        for name in ("clip_i", "dino", "fid", "kid", "kid_std"):
            unavailable[name] = str(error)

    # The generated images: the folder's, or sampled now with the run's adapter.
    if not config.images:
        from .sampling import found_base_adapters, sample

        bases = found_base_adapters(config.run)  # a run trained on base adapters is drawn on them, as it trained
        result = sample(
            SampleConfig(
                adapter=[base.path for base in bases] + [config.run],
                prompt=prompts,
                output=str(samples),
                num_images=config.num_images,
                steps=config.steps,
                guidance=config.guidance,
                seed=config.seed,
                resolution=config.resolution,
                width=config.width,
                height=config.height,
                negative_prompt=config.negative_prompt,
                scheduler=config.scheduler,
                adapter_scale=[base.strength for base in bases] + [config.adapter_scale] if bases else config.adapter_scale,
                dtype=config.dtype,
                overwrite=True,  # this evaluation's own folder: measuring again draws it again
            ),
            progress=progress,
        )
        files = result.images
    generated = read_images(files)

    # The reference images, at the generated images' size so that both sets are treated alike.
    metrics: dict[str, float] = {}
    height, width = generated[0].shape[-2:]
    reference = read_images(reference_files, size=(width, height)) if reference_files else []

    device = "cuda" if torch.cuda.is_available() else "cpu"

    def measure(names: tuple[str, ...], compute: Callable[[], dict[str, float]]) -> None:
        names = tuple(n for n in names if n not in unavailable)
        if not names:
            return
        try:
            values = compute()
        except MetricUnavailable as error:
            unavailable.update({name: str(error) for name in names})
        else:
            metrics.update({name: value for name, value in values.items() if name in names})

    models: dict[str, Any] = {}

    def model(kind: str):
        if kind not in models:
            try:
                loaded, processor = load_clip(config.clip_model) if kind == "clip" else load_dino(config.dino_model)
                models[kind] = (loaded.to(device), processor)
            except MetricUnavailable as error:
                models[kind] = error
        if isinstance(models[kind], MetricUnavailable):
            raise models[kind]
        return models[kind]

    def embeddings(kind: str) -> tuple:
        key = f"{kind}-embeddings"
        if key not in models:
            extractor = (clip_features if kind == "clip" else dino_features)(*model(kind))
            models[key] = (embed(extractor, generated), embed(extractor, reference))
        return models[key]

    from .token_embeddings import without_new_tokens

    # Each image's prompt: as drawn now, or (--images) the one its PNG text records, as diversity groups them
    tokens = info.placeholder_tokens() if info is not None else None
    unpaired = MetricUnavailable("no prompts (give --prompts FILE or --prompt TEXT)")
    try:
        drawn = image_prompts(files, prompts, tokens) if config.images else [p for p in prompts for _ in range(config.num_images)]
    except MetricUnavailable as error:
        drawn, unpaired = [], error

    def clip_t(rows: list[int] | None = None) -> dict[str, float]:
        """CLIP-T of the images at `rows` (all by default)."""
        if not drawn:
            raise unpaired
        rows = range(len(generated)) if rows is None else rows
        # CLIP reads <castle> as the plain class word, and a prompt's new tokens (<s0><s1> castle) not at all
        paired = [without_new_tokens(fill_placeholders(drawn[row], None)) for row in rows]
        return {"clip_t": clip_score(*model("clip"), [generated[row].to(device) for row in rows], paired)}

    # A dataset run's images are measured against their own class's reference images where every image's prompt is
    # one of its class captions (as sampling a dataset draws them); a run of several concepts', each image whose
    # prompt names one concept against that concept's images, the others against every one; else every pair counts.
    generated_classes = None
    fidelity_pairs = "all"
    if reference_classes is not None:
        if drawn and set(drawn) <= set(reference_classes):
            generated_classes, fidelity_pairs = drawn, "own class"
    elif reference_files and not config.reference and len(concepts := run_concepts(run)) > 1 and drawn:
        concept_tokens = {name: (tokens or {}).get(name, "") if isinstance(tokens, dict) else "" for name in concepts}
        named = [named_concept(prompt, concept_tokens) for prompt in drawn]
        if any(name is not None for name in named):
            reference_classes = [name for name, paths in concept_references(run) for _ in paths]
            generated_classes = named
            fidelity_pairs = "own concept" if None not in named else "own concept, else all"

    def fidelity(kind: str) -> float:
        images, references = embeddings(kind)
        if generated_classes is None:
            return mean_cross_similarity(images, references)
        return mean_cross_similarity_by_class(images, references, generated_classes, reference_classes)

    measure(("clip_t",), clip_t)
    measure(("clip_i",), lambda: {"clip_i": fidelity("clip")})
    measure(("dino",), lambda: {"dino": fidelity("dino")})
    # within each prompt: variety among one prompt's images, not how different the prompts look
    # the images of a prompt as CLIP-T pairs them; where it cannot, as far as the PNG texts and names tell
    groups = list(indices_by_value(drawn).values()) if drawn else None
    measure(("diversity",), lambda: {"diversity": mean_diversity_within_groups(embeddings("dino")[0], groups or prompt_groups(files, prompts))})

    def distances() -> dict[str, float]:
        if config.fid_features == "none":
            raise MetricUnavailable("--fid-features none")
        if config.fid_features == "inception":
            feature = INCEPTION_FEATURES
        else:
            feature = (clip_features if config.fid_features == "clip" else dino_features)(*model(config.fid_features))
        return distribution_distances(feature, generated, reference, seed=config.seed)

    measure(("fid", "kid", "kid_std"), distances)

    # A run of several concepts: CLIP-T, CLIP-I and DINO of each concept's images too (against its own reference
    # images), in the order it trained them (CLIP-I and DINO above average these, CLIP-T averages every image's).
    per_concept: dict[str, dict[str, Any]] = {}
    if fidelity_pairs.startswith("own concept"):
        drawn_of = indices_by_value(generated_classes)
        for name in (name for name in concepts if name in drawn_of):
            rows = drawn_of[name]
            references = [index for index, own in enumerate(reference_classes) if own == name]
            values: dict[str, Any] = {"images": len(rows)}
            if "clip_t" in metrics:
                values.update(clip_t(rows))
            for metric, kind in (("clip_i", "clip"), ("dino", "dino")):
                if metric in metrics:
                    images, reference_embeddings = embeddings(kind)
                    values[metric] = mean_cross_similarity(images[rows], reference_embeddings[references])
            per_concept[name] = values

    report: dict[str, Any] = {
        "format": FORMAT,
        "metrics_version": METRICS_VERSION,
        "run": str(run) if run else None,
        "images": str(Path(files[0]).parent),
        "reference": reference_source(config, run, reference_files),
        "prompts": prompts,
        "generated_images": len(generated),
        "reference_images": len(reference),
        # CLIP-I and DINO's pairs: each image with its own class's (or concept's) reference images, or with every one
        "fidelity_pairs": fidelity_pairs if reference else None,
        "seed": config.seed,
        "models": {"clip": config.clip_model, "dino": config.dino_model, "fid_features": config.fid_features},
        "metrics": {name: metrics[name] for name in METRICS if name in metrics},
        "unavailable": {name: unavailable[name] for name in METRICS if name in unavailable},
    }
    if per_concept:
        report["per_concept"] = per_concept
    if not config.images:
        report.update(
            num_images=config.num_images, steps=config.steps, guidance=config.guidance,
            negative_prompt=config.negative_prompt, scheduler=config.scheduler, adapter_scale=config.adapter_scale,
            width=width, height=height,
        )
    elif sweep_strength(files[0]) is not None:  # one strength of a sweep's images: say which
        report.update(adapter_scale=config.adapter_scale)
    if info is not None:
        report.update(method=info.method, options=info.options, num_parameters=int(info.extra.get("num_parameters", 0)),
                      adapter=adapter_path(config.run).name, adapter_digest=adapter_digest(adapter_path(config.run)))
    write_text_atomic(output, json.dumps(report, indent=2) + "\n")
    return Evaluation(output=output, metrics=report["metrics"], unavailable=report["unavailable"], report=report)


def evaluation_file(adapter: Path) -> Path:
    """Where `sdtune evaluate --run` writes by default: a run's eval.json, or for one of its step files
    (adapter-step-N.safetensors) eval-step-N.json beside it, so that each measured step keeps its numbers."""
    from .adapter import outputs_suffix

    return adapter.parent / f"eval{outputs_suffix(adapter)}.json"


def stale_evaluation(report: dict[str, Any], run: Path, method: str, options: dict[str, Any], adapter: str = "") -> str:
    """Why a run's eval.json does not measure its adapter.safetensors (or the file named `adapter`: a step file) as it
    is now ("" where it does): it measured another adapter file, or an adapter that has been replaced since (the run
    trained again, resumed or extended). An eval.json of before the adapter digest is taken as the adapter's where the
    adapter is older than it, and with a warning (its metrics kept) where it is newer."""
    from .adapter import ADAPTER_FILE

    adapter = adapter or ADAPTER_FILE
    if report.get("adapter") not in ((None, ADAPTER_FILE) if adapter == ADAPTER_FILE else (adapter,)):
        return f"{evaluation_file(run / adapter).name} measured {report.get('adapter')}, not {adapter}"
    if "adapter_digest" in report:
        if report["adapter_digest"] != adapter_digest(run / adapter):
            return f"{evaluation_file(run / adapter).name} measured an earlier {adapter} (the run was trained again or further since)"
    elif "method" in report and (report["method"] != method or report.get("options", options) != options):
        return f"eval.json measured an adapter trained with {report['method']}, not this one of {method} (the run was trained again since)"
    elif written_after_evaluation(run):
        # an eval.json of before the digest: the adapter it measured was older than it; this one may be a later training's
        # or only a copy's (copies need not keep times), so its numbers stay, with a warning
        warn(f"{run}: eval.json records no digest of the adapter it measured (an earlier sdtune wrote it) and "
             f"{ADAPTER_FILE} was written after it: its metrics may be an earlier training's (run `sdtune evaluate "
             f"--run {shell_word(run)}` again to be sure)")
    return ""


def written_after_evaluation(run: Path) -> bool:
    """Whether the run's adapter file was written after its eval.json (by modification time; False where either is missing)."""
    from .adapter import ADAPTER_FILE

    try:
        return (run / ADAPTER_FILE).stat().st_mtime_ns > (run / EVAL_FILE).stat().st_mtime_ns
    except OSError:
        return False


def read_evaluation(run: str | Path, file: str = EVAL_FILE) -> dict[str, Any] | None:
    """A run's eval.json (or its `file`: a step file's eval-step-N.json), or None when it has none."""
    from .fileio import read_json

    path = Path(run) / file
    report = read_json(path)
    if report is None:
        return None
    if not isinstance(report, dict) or report.get("format") != FORMAT:
        raise SdtuneError(f"{path}: not an sdtune evaluation (no '{FORMAT}' format)")
    return without_redefined_metrics(report, Path(run))


def without_redefined_metrics(report: dict[str, Any], run: Path | None = None) -> dict[str, Any]:
    """The eval.json (of `run`, where it is a run's) with the metrics an earlier sdtune measured otherwise than now
    moved to `unavailable`, saying so: an earlier value is not compared with today's as if it meant the same."""
    version = report.get("metrics_version", 1)
    metrics, unavailable = dict(report.get("metrics") or {}), dict(report.get("unavailable") or {})
    for since, changes in REDEFINED.items():
        if isinstance(version, int) and version >= since:
            continue
        for name, why in changes.items():
            if name in metrics and redefined_for(report, name, since, run):
                del metrics[name]
                unavailable[name] = f"{why}: {EVALUATE_AGAIN}"
    return {**report, "metrics": metrics, "unavailable": unavailable}


def redefined_for(report: dict[str, Any], name: str, since: int, run: Path | None = None) -> bool:
    """Whether `name` of an eval.json of before `since` differs from what it would be now. Version 2 changed diversity
    where the images were of several prompts (a sampled run of one prompt pooled them alike), and CLIP-I and DINO only
    for dataset runs' references (`reference` is "dataset ..."); version 3 CLIP-I and DINO of runs of several concepts
    measured against their own images (not a --reference folder elsewhere than the first concept's)."""
    if since == 2 and name == "diversity":
        return not ("num_images" in report and len(set(report.get("prompts") or [])) <= 1)
    if since == 2 and name in ("clip_i", "dino"):
        return str(report.get("reference") or "").startswith("dataset ")
    if since == 3 and name in ("clip_i", "dino"):
        if run is None or len(run_concepts(run)) < 2:
            return False
        try:  # an earlier eval.json names the first reference image's folder: the first concept's, unless --reference
            first_folder = str(Path(concept_references(run)[0][1][0]).parent)
        except (MetricUnavailable, IndexError):
            return True
        return report.get("reference") in (None, first_folder)
    return True
