"""Shared fixtures: every test runs offline on the embedded tiny model, in a private cache."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Triton's CPU interpreter for test_atom_triton.py. Triton reads this when it is first imported (its own @jit
# helpers, tl.sum and the like, become interpreted or compiled then), and importing diffusers or another test
# module may import it: set here, before any test module is imported.
os.environ.setdefault("TRITON_INTERPRET", "1")


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


@pytest.fixture
def without_heif(monkeypatch):
    """As where pillow-heif is not installed: importing it fails, so HEIC/HEIF photos are no images to sdtune."""
    import sys

    from sdtune.image_files import heif_opener

    monkeypatch.setitem(sys.modules, "pillow_heif", None)  # `import pillow_heif` raises ImportError
    heif_opener.cache_clear()
    yield
    heif_opener.cache_clear()  # the next test finds pillow-heif again, where it is installed


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


@pytest.fixture
def inputs(unet_inputs):
    """`unet_inputs` at 16x16 latents: at 8x8 the tiny UNet's last down block runs at 1x1, where GroupNorm
    amplifies the different rounding of a merged W + ΔW."""
    import torch

    latents = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(5))
    return (latents, *unet_inputs[1:])


@pytest.fixture
def train_options(monkeypatch, tmp_path):
    """`train_options(*args)`: the method options `sdtune train ARGS` would train with, read from the config it
    hands to `sdtune.train` (which is stopped there)."""
    from typer.testing import CliRunner

    import sdtune
    from sdtune.cli import app
    from sdtune.errors import SdtuneError

    seen = {}

    def stop_before_training(config):
        seen.update(config.options)
        raise SdtuneError("stop before training")

    monkeypatch.setattr(sdtune, "train", stop_before_training)

    def options(*args) -> dict:
        seen.clear()
        result = CliRunner().invoke(app, ["train", "--model", "tiny-random", "--output", str(tmp_path / "run"), *args])
        assert "stop before training" in result.output, result.output
        return dict(seen)

    return options

