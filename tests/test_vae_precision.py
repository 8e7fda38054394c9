"""The VAE's precision when sampling: SD v1/v2 VAEs decode in fp16, the images that overflow are decoded again in fp32
(one at a time, through the decoder's exact fp32 weights) while the VAE stays fp16, an SDXL VAE whose config sets
force_upcast is in fp32 from the start."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from sdtune.precision import cast_pipeline, vae_dtype
from sdtune.sampling import DECODE_BATCH, decode

OVERFLOW_MESSAGE = "overflowed in fp16"
# scaling the decoder's first convolution by EVERY_IMAGE makes every image's fp16 decode overflow; by SOME_IMAGES only
# those of latents multiplied by OVERFLOWING_LATENTS (measured on the tiny VAE: fp32's stay finite either way)
EVERY_IMAGE, SOME_IMAGES, OVERFLOWING_LATENTS = 1e5, 1e3, 100


def latents_for(pipe, count: int = DECODE_BATCH + 2):
    """`count` latents of the tiny model's 64 px images (two decode batches by default), scaled as the UNet's are."""
    generator = torch.Generator().manual_seed(0)
    return torch.randn(count, 4, 8, 8, generator=generator) * pipe.vae.config.scaling_factor


def make_fp16_overflow(pipe, factor: float = EVERY_IMAGE) -> None:
    """Scale the decoder's first convolution so that its fp16 activations pass 65504 (inf) while fp32's stay finite
    (and so do its weights in fp16): the GroupNorm after it brings fp32's back to the usual range."""
    conv = pipe.vae.decoder.conv_in
    with torch.no_grad():
        conv.weight *= factor
        conv.bias *= factor
    assert conv.weight.abs().max() < torch.finfo(torch.float16).max


def some_overflow(pipe) -> None:
    make_fp16_overflow(pipe, SOME_IMAGES)


def pixels(images) -> list:
    return [np.asarray(image, dtype=float) for image in images]


def fp32_images(latents, change=None, one_at_a_time=False) -> list:
    from sdtune.models import load_pipeline

    pipe = load_pipeline("tiny-random")
    if change:
        change(pipe)
    cast_pipeline(pipe, torch.float32)
    if one_at_a_time:
        return [image for one in latents.split(1) for image in pixels(decode(pipe, one))]
    return pixels(decode(pipe, latents))


def all_half(vae) -> bool:
    return all(parameter.dtype == torch.float16 for parameter in vae.parameters())


def overflow_warnings(caught) -> list[str]:
    return [str(w.message) for w in caught if OVERFLOW_MESSAGE in str(w.message)]


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


def test_overflowing_images_are_decoded_again_exactly_in_fp32_and_the_vae_stays_fp16(tiny_pipe):
    from sdtune import precision
    from sdtune.models import load_pipeline

    latents = latents_for(tiny_pipe)
    expected = fp32_images(latents, make_fp16_overflow, one_at_a_time=True)
    assert all(np.isfinite(image).all() for image in expected)
    make_fp16_overflow(tiny_pipe)
    cast_pipeline(tiny_pipe, torch.float16)
    vae = tiny_pipe.vae
    assert all_half(vae)
    with pytest.warns(UserWarning, match=OVERFLOW_MESSAGE) as caught:
        images = pixels(decode(tiny_pipe, latents))
    assert overflow_warnings(caught) == [
        "the VAE overflowed in fp16 (inf or NaN): the images that overflow are decoded again in fp32; for a VAE that "
        "overflows often, `--dtype bf16` or fp32 avoids the double decode"
    ]
    assert all_half(vae)  # the encoder too: nothing stays upcast
    # the very images an fp32 decode gives: the VAE's own fp32 weights, not their fp16 rounding
    assert len(images) == len(expected) and all(np.array_equal(a, b) for a, b in zip(images, expected))
    # the fp32 decoder weights moved to the device once and stay there: a later overflow copies nothing
    kept = {name: tensor.data_ptr() for name, tensor in precision._FP32_DECODERS_ON_DEVICE[vae].items()}
    # as a strength sweep casts the pipeline: to fp32 for the merge (the VAE's exact fp32 weights) and back
    cast_pipeline(tiny_pipe, torch.float32)
    original = load_pipeline("tiny-random")
    make_fp16_overflow(original)
    assert all(torch.equal(a, b) for a, b in zip(vae.parameters(), original.vae.parameters()))
    cast_pipeline(tiny_pipe, torch.float16)
    assert all_half(vae)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # said once per VAE
        assert all(np.array_equal(a, b) for a, b in zip(pixels(decode(tiny_pipe, latents)), expected))
    assert {name: tensor.data_ptr() for name, tensor in precision._FP32_DECODERS_ON_DEVICE[vae].items()} == kept
    assert all_half(vae)


def test_only_the_overflowing_images_of_a_batch_are_decoded_again(tiny_pipe):
    latents = latents_for(tiny_pipe)
    overflowing = [1, 2, DECODE_BATCH + 1]
    latents[overflowing] *= OVERFLOWING_LATENTS
    some_overflow(tiny_pipe)
    cast_pipeline(tiny_pipe, torch.float16)
    vae = tiny_pipe.vae
    with torch.no_grad():  # the plain fp16 decode of each batch
        plain = torch.cat([vae.decode(part.half() / vae.config.scaling_factor, return_dict=False)[0]
                           for part in latents.split(DECODE_BATCH)])
    assert (~torch.isfinite(plain).flatten(1).all(1)).nonzero().flatten().tolist() == overflowing
    with pytest.warns(UserWarning, match=OVERFLOW_MESSAGE) as caught:
        images = pixels(decode(tiny_pipe, latents))
    assert len(overflow_warnings(caught)) == 1
    assert all_half(vae)
    expected = fp32_images(latents[overflowing], some_overflow, one_at_a_time=True)
    assert all(np.array_equal(images[index], image) for index, image in zip(overflowing, expected))
    fine = [index for index in range(len(latents)) if index not in overflowing]
    kept = pixels(tiny_pipe.image_processor.postprocess(plain[fine], output_type="pil"))
    assert all(np.array_equal(images[index], image) for index, image in zip(fine, kept))


def test_the_images_are_the_same_whichever_process_decodes_which_batch(tiny_pipe):
    from sdtune.models import load_pipeline

    latents = latents_for(tiny_pipe)
    overflowing = [0, 2]  # both in the first batch
    latents[overflowing] *= OVERFLOWING_LATENTS
    other_process = load_pipeline("tiny-random")
    for pipe in (tiny_pipe, other_process):
        some_overflow(pipe)
        cast_pipeline(pipe, torch.float16)
    with pytest.warns(UserWarning, match=OVERFLOW_MESSAGE):
        every_batch = pixels(decode(tiny_pipe, latents))  # one process: its later batch after the overflow
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the second batch alone: nothing overflows
        second = pixels(decode(other_process, latents[DECODE_BATCH:]))
    assert all(np.array_equal(a, b) for a, b in zip(every_batch[DECODE_BATCH:], second))
    with pytest.warns(UserWarning, match=OVERFLOW_MESSAGE):
        first = pixels(decode(other_process, latents[:DECODE_BATCH]))
    assert all(np.array_equal(a, b) for a, b in zip(every_batch[:DECODE_BATCH], first))
    # batches of one: an overflowing image is exactly the same; the others are fp16 decodes, which CPU convolutions
    # round differently by batch size (in the last bit, so by at most one level of 8 bits)
    alone = [image for one in latents.split(1) for image in pixels(decode(tiny_pipe, one))]
    assert all(np.array_equal(every_batch[index], alone[index]) for index in overflowing)
    assert all(np.abs(a - b).max() <= 1 for a, b in zip(every_batch, alone))


def test_latents_that_are_not_finite_are_not_decoded_again(tiny_pipe, monkeypatch):
    some_overflow(tiny_pipe)
    cast_pipeline(tiny_pipe, torch.float16)
    vae = tiny_pipe.vae
    calls = []
    plain_decode = vae.decode

    def counted(latents, *args, **kwargs):
        calls.append((len(latents), latents.dtype))
        return plain_decode(latents, *args, **kwargs)

    monkeypatch.setattr(vae, "decode", counted)
    not_finite = torch.full_like(latents_for(tiny_pipe, 1), float("nan"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        decode(tiny_pipe, not_finite)
    assert calls == [(1, torch.float16)] and not overflow_warnings(caught)
    latents = latents_for(tiny_pipe, 3)
    latents[0] = float("nan")  # the UNet's doing: no fp32 decode mends it
    latents[1] *= OVERFLOWING_LATENTS
    calls.clear()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        decode(tiny_pipe, latents)
    assert calls == [(3, torch.float16), (1, torch.float32)] and len(overflow_warnings(caught)) == 1
    assert all_half(vae)


def test_a_training_vae_decodes_its_overflowing_images_with_its_exact_fp32_weights(tiny_pipe):
    from sdtune.precision import TRAINING_VAE_REMEDY, place_frozen_models

    latents = latents_for(tiny_pipe)
    expected = fp32_images(latents, make_fp16_overflow, one_at_a_time=True)
    make_fp16_overflow(tiny_pipe)
    place_frozen_models("cpu", torch.float16, [], tiny_pipe.vae, no_half_vae=False)  # as training under fp16
    assert all_half(tiny_pipe.vae)
    with pytest.warns(UserWarning, match=OVERFLOW_MESSAGE) as caught:
        images = pixels(decode(tiny_pipe, latents, TRAINING_VAE_REMEDY))
    assert [message.split("often, ")[1] for message in overflow_warnings(caught)] == [
        "`--mixed-precision bf16` or `--no-half-vae` avoids the double decode"
    ]
    assert all(np.array_equal(a, b) for a, b in zip(images, expected))
    assert all_half(tiny_pipe.vae)  # its encodes keep the precision the memory check counted


def test_the_validation_grid_decodes_again_in_fp32_where_fp16_overflows(tiny_pipe):
    from sdtune.precision import place_frozen_models
    from sdtune.validation import sample_grid

    make_fp16_overflow(tiny_pipe)
    # as training stores it under --mixed-precision fp16 (the UNet and text encoder stay fp32: no autocast on a CPU)
    place_frozen_models("cpu", torch.float16, [], tiny_pipe.vae, no_half_vae=False)
    with pytest.warns(UserWarning, match="--no-half-vae"):
        grid = sample_grid(tiny_pipe, ["a castle"], 64, "cpu")
    assert all_half(tiny_pipe.vae)
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


def test_sample_says_once_in_one_line_that_overflowing_images_are_decoded_again_in_fp32(tiny_pipe, tmp_path):
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
    assert len(said) == 1 and said[0].endswith(
        "the images that overflow are decoded again in fp32; for a VAE that overflows often, `--dtype bf16` or fp32 "
        "avoids the double decode"
    ), result.stderr
    images = sorted((tmp_path / "out" / "images").glob("*.png"))
    assert len(images) == DECODE_BATCH + 2
    assert all(np.isfinite(cells).all() and cells.std() > 0 for cells in pixels(Image.open(path) for path in images))
