"""Shared fixtures: every test runs offline on the embedded tiny model, in a private cache."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session", autouse=True)
def private_cache(tmp_path_factory):
    """A cache folder of the test session's own, so no test reads a stale or user cache."""
    path = tmp_path_factory.mktemp("sdtune-cache")
    previous = os.environ.get("SDTUNE_CACHE")
    os.environ["SDTUNE_CACHE"] = str(path)
    yield path
    if previous is None:
        os.environ.pop("SDTUNE_CACHE", None)
    else:
        os.environ["SDTUNE_CACHE"] = previous


@pytest.fixture(scope="session")
def tiny_path(private_cache):
    from sdtune.models import tiny_random_path

    return tiny_random_path()


@pytest.fixture
def tiny_pipe(tiny_path):
    """A fresh tiny pipeline (loaded from the cached folder, so tests may change it freely)."""
    from sdtune.models import load_pipeline

    return load_pipeline("tiny-random")


@pytest.fixture
def unet_inputs():
    """A fixed batch for the tiny UNet: latents, timesteps, text embeddings."""
    import torch

    generator = torch.Generator().manual_seed(1234)
    latents = torch.randn(2, 4, 8, 8, generator=generator)
    timesteps = torch.tensor([50, 700])
    embeddings = torch.randn(2, 77, 32, generator=generator)
    return latents, timesteps, embeddings
