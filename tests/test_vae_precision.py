"""The VAE's precision when sampling: SD v1/v2 VAEs decode in fp16, a batch that overflows is decoded again in fp32
(and the VAE stays there), an SDXL VAE whose config sets force_upcast is in fp32 from the start."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from sdtune.precision import cast_pipeline, vae_dtype
from sdtune.sampling import DECODE_BATCH, decode

OVERFLOW_MESSAGE = "overflowed in fp16"


def latents_for(pipe, count: int = DECODE_BATCH + 2):
    """`count` latents of the tiny model's 64 px images (two decode batches by default), scaled as the UNet's are."""
    generator = torch.Generator().manual_seed(0)
    return torch.randn(count, 4, 8, 8, generator=generator) * pipe.vae.config.scaling_factor


def make_fp16_overflow(pipe) -> None:
    """Scale the decoder's first convolution so that its fp16 activations pass 65504 (inf) while fp32's stay finite
    (and so do its weights in fp16): the GroupNorm after it brings fp32's back to the usual range."""
    conv = pipe.vae.decoder.conv_in
    with torch.no_grad():
        conv.weight *= 1e5
        conv.bias *= 1e5
    assert conv.weight.abs().max() < torch.finfo(torch.float16).max


def pixels(images) -> list:
    return [np.asarray(image, dtype=float) for image in images]


def fp32_images(latents, change=None) -> list:
    from sdtune.models import load_pipeline

    pipe = load_pipeline("tiny-random")
    if change:
        change(pipe)
    cast_pipeline(pipe, torch.float32)
    return pixels(decode(pipe, latents))


def test_sd_v1_vae_decodes_in_fp16_close_to_fp32(tiny_pipe):
    assert tiny_pipe.vae.config.force_upcast  # the default SD v1's config leaves: no reason to upcast up front
    assert vae_dtype(torch.float16, tiny_pipe) == torch.float16
    latents = latents_for(tiny_pipe)
    expected = fp32_images(latents)
    cast_pipeline(tiny_pipe, torch.float16)
    assert tiny_pipe.vae.dtype == tiny_pipe.unet.dtype == torch.float16
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        half = pixels(decode(tiny_pipe, latents))
    # latents the UNet left non-finite: an fp32 decode would mend nothing, so the VAE is not upcast (numpy does
    # warn, casting NaN pixels to 8 bits)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        decode(tiny_pipe, torch.full_like(latents[:1], float("nan")))
    assert not [w for w in caught if OVERFLOW_MESSAGE in str(w.message)]
    assert tiny_pipe.vae.dtype == torch.float16
    differences = [np.abs(a - b).mean() for a, b in zip(half, expected)]
    assert len(half) == len(expected) and all(0 < difference < 1 for difference in differences), differences


def test_an_overflowing_fp16_decode_is_done_again_in_fp32_for_good(tiny_pipe):
    latents = latents_for(tiny_pipe)
    expected = fp32_images(latents, make_fp16_overflow)
    assert all(np.isfinite(image).all() for image in expected)
    make_fp16_overflow(tiny_pipe)
    cast_pipeline(tiny_pipe, torch.float16)
    assert tiny_pipe.vae.dtype == torch.float16
    with pytest.warns(UserWarning, match=OVERFLOW_MESSAGE) as caught:
        images = pixels(decode(tiny_pipe, latents))
    assert [str(w.message) for w in caught if OVERFLOW_MESSAGE in str(w.message)] == [
        "the VAE overflowed in fp16 (its decode gave inf or NaN): decoding that batch again, and every later one, in fp32"
    ]
    assert tiny_pipe.vae.dtype == torch.float32
    # the very images an fp32 decode gives: the VAE's own fp32 weights came back, not their fp16 rounding
    assert len(images) == len(expected) and all(np.array_equal(a, b) for a, b in zip(images, expected))
    cast_pipeline(tiny_pipe, torch.float16)  # as a strength sweep casts the pipeline at each strength
    assert tiny_pipe.unet.dtype == torch.float16 and tiny_pipe.vae.dtype == torch.float32
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert all(np.array_equal(a, b) for a, b in zip(pixels(decode(tiny_pipe, latents)), expected))


def test_the_validation_grid_decodes_again_in_fp32_where_fp16_overflows(tiny_pipe):
    from sdtune.precision import cast_frozen_parameters
    from sdtune.validation import sample_grid

    make_fp16_overflow(tiny_pipe)
    cast_frozen_parameters(tiny_pipe.vae, torch.float16, ())  # as training stores it under --mixed-precision fp16
    with pytest.warns(UserWarning, match=OVERFLOW_MESSAGE):
        grid = sample_grid(tiny_pipe, ["a castle"], 64, "cpu")
    assert tiny_pipe.vae.dtype == torch.float32
    cells = np.asarray(grid, dtype=float)
    assert np.isfinite(cells).all() and cells.std() > 0


@pytest.mark.parametrize("model", ["tiny-sd2-random", "tiny-sdxl-random"])
def test_only_an_sdxl_vae_that_asks_for_it_is_upcast_up_front(model, private_cache):
    from sdtune.models import is_sdxl, load_pipeline

    pipe = load_pipeline(model)
    assert pipe.vae.config.force_upcast
    cast_pipeline(pipe, torch.float16)
    assert pipe.unet.dtype == torch.float16
    assert pipe.vae.dtype == (torch.float32 if is_sdxl(pipe) else torch.float16)
    assert vae_dtype(torch.bfloat16, pipe) == torch.bfloat16 and vae_dtype(torch.float32, pipe) == torch.float32
    pipe.vae.register_to_config(force_upcast=False)  # an SDXL VAE fixed for fp16 (madebyollin's) says so
    assert vae_dtype(torch.float16, pipe) == torch.float16


def test_sample_says_once_in_one_line_that_it_decodes_in_fp32_after_an_overflow(tiny_pipe, tmp_path):
    import os
    import subprocess
    import sys

    make_fp16_overflow(tiny_pipe)
    tiny_pipe.save_pretrained(tmp_path / "model")
    command = [sys.executable, "-m", "sdtune", "sample", "--model", str(tmp_path / "model"), "--prompt", "a castle",
               "--num-images", str(DECODE_BATCH + 2), "--steps", "2", "--dtype", "fp16", "--output", str(tmp_path / "out")]
    result = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 0, result.stderr
    said = [line for line in result.stderr.splitlines() if OVERFLOW_MESSAGE in line]
    assert len(said) == 1 and said[0].endswith("decoding that batch again, and every later one, in fp32"), result.stderr
    images = sorted((tmp_path / "out" / "images").glob("*.png"))
    assert len(images) == DECODE_BATCH + 2
    assert all(np.isfinite(cells).all() and cells.std() > 0 for cells in pixels(Image.open(path) for path in images))
