"""Masked loss (--masked-loss): masks framed as their images are, averaged over latent pixels, weighting each
element's error before each example's mean; cached as uncached, resumed exactly; off, nothing changes.

The synthetic photos are drawn here with PIL: an opaque red rectangle off-centre (the subject) on a
transparent background, so the framed image's red pixels show where the framed mask must be white."""

from __future__ import annotations

import contextlib
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from sdtune.buckets import bucket_sizes
from sdtune.config import TrainConfig
from sdtune.errors import SdtuneError

SUBJECT = (200, 30, 20)


def subject_photo(width: int, height: int, box: tuple[int, int, int, int], seed: int = 0) -> Image.Image:
    """An RGBA photo: noise in green and blue, transparent, with an opaque red `box` (left, top, right, bottom)."""
    rng = np.random.default_rng(seed)
    pixels = np.zeros((height, width, 4), dtype=np.uint8)
    pixels[..., 1:3] = rng.integers(60, 200, (height, width, 2))
    left, top, right, bottom = box
    pixels[top:bottom, left:right] = (*SUBJECT, 255)
    return Image.fromarray(pixels, mode="RGBA")


def red_part(image: Image.Image) -> np.ndarray:
    """Where a framed RGB image shows the subject."""
    pixels = np.asarray(image, dtype=np.int16)
    return (pixels[..., 0] > 128) & (pixels[..., 1] < 100) & (pixels[..., 2] < 100)


def masked_photo_set(folder: Path, sizes=((96, 128), (100, 130), (160, 90), (150, 90)), white: bool = False) -> Path:
    """Photos with their masks in masks/ (the alpha channel as a greyscale file; all white with `white`)."""
    (folder / "masks").mkdir(parents=True)
    for index, (width, height) in enumerate(sizes):
        photo = subject_photo(width, height, (width // 8, height // 6, width // 2, height * 2 // 3), seed=index)
        photo.convert("RGB").save(folder / f"photo-{index}.png")
        mask = Image.new("L", photo.size, 255) if white else photo.getchannel("A")
        mask.save(folder / "masks" / f"photo-{index}.png")
    return folder


def run_training(tmp_path, name: str, **settings):
    from sdtune.training import train

    settings = {"model": "tiny-random", "steps": 2, "log_with": "none", "output": str(tmp_path / name), **settings}
    return train(TrainConfig(**settings), progress=False)


# ---------------------------------------------------------------------------------------------
# Masks follow their images


def test_masks_follow_exif_orientation_resize_crop_buckets_and_flip(tmp_path):
    """A phone photo stored turned (EXIF orientation 6) with its subject in one corner: its framed mask (from
    the alpha channel, or from a mask file drawn upright) covers the framed image's red pixels, square,
    in a bucket, and mirrored."""
    from sdtune.data import ConceptDataset, load_framed
    from sdtune.masks import upright_mask

    shown = subject_photo(90, 160, (8, 20, 50, 90))  # upright: a 90x160 portrait, subject upper left
    stored = shown.transpose(Image.Transpose.ROTATE_90)  # what orientation 6 turns back by 270°
    exif = stored.getexif()
    exif[0x0112] = 6
    stored.save(tmp_path / "phone.png", exif=exif)
    (tmp_path / "masks").mkdir()
    shown.getchannel("A").save(tmp_path / "masks" / "phone.png")  # drawn on the image as shown

    def alpha(path, image):
        return upright_mask(path, image, "alpha")

    def files(path, image):
        return upright_mask(path, image, "files")

    for buckets in (None, bucket_sizes(64)):
        framed = load_framed(tmp_path / "phone.png", 64, buckets, mask_of=alpha)
        assert framed.original_size == (160, 90) and framed.mask.size == framed.image.size
        if buckets:
            assert framed.image.size == (48, 80)  # a portrait bucket, not the square
        subject, mask = red_part(framed.image), np.asarray(framed.mask) > 127
        assert subject.sum() > 100 and (subject == mask).mean() > 0.97  # the edge pixels blur differently
        assert subject[:10, :10].any() and not subject[-10:, -10:].any()  # upper left: the turn applied
        from_file = load_framed(tmp_path / "phone.png", 64, buckets, mask_of=files)
        assert np.array_equal(np.asarray(from_file.mask), np.asarray(framed.mask))

        dataset = ConceptDataset([framed], "a photo", random_flip=True, loss_masks=True)
        for flip in (False, True):
            item = dataset.example(0, flip)
            pixels = ((item["pixels"].permute(1, 2, 0) + 1) * 127.5).round().clamp(0, 255).byte().numpy()
            assert item["loss_mask"].dtype == torch.uint8 and item["loss_mask"].shape == (1, *pixels.shape[:2])
            subject, mask = red_part(Image.fromarray(pixels)), item["loss_mask"][0].numpy() > 127
            assert (subject == mask).mean() > 0.97
            assert subject[:, : subject.shape[1] // 2].sum() > subject[:, subject.shape[1] // 2 :].sum() or flip


def test_a_large_jpeg_decoded_at_reduced_size_keeps_its_mask_in_place(tmp_path):
    """PIL decodes a large JPEG at an eighth of its size (`draft`); its full-size mask is fitted to that first."""
    from sdtune.data import load_framed
    from sdtune.masks import upright_mask

    photo = subject_photo(800, 600, (100, 150, 400, 450))
    photo.convert("RGB").save(tmp_path / "large.jpg", quality=95)
    (tmp_path / "masks").mkdir()
    photo.getchannel("A").save(tmp_path / "masks" / "large.png")
    framed = load_framed(tmp_path / "large.jpg", 64, mask_of=lambda path, image: upright_mask(path, image, "files"))
    subject, mask = red_part(framed.image), np.asarray(framed.mask) > 127
    assert subject.sum() > 300 and (subject == mask).mean() > 0.97


def test_a_mask_of_its_images_aspect_ratio_but_another_size_is_resized_to_it(tmp_path, tiny_path):
    """Half-size masks (as a mask tool exports them), a double-size one, and a half-size one of an odd side (rounded
    either way) are fitted to their image; one of another aspect ratio is refused before the model loads."""
    from sdtune.data import load_framed
    from sdtune.masks import check_masks, upright_mask

    images = tmp_path / "photos"
    (images / "masks").mkdir(parents=True)
    sizes = {"half": (160, 90), "double": (96, 128), "odd": (151, 91)}
    mask_sizes = {"half": (80, 45), "double": (192, 256), "odd": (76, 45)}  # 75.5x45.5, rounded
    for index, (name, (width, height)) in enumerate(sizes.items()):
        photo = subject_photo(width, height, (width // 8, height // 6, width // 2, height * 2 // 3), seed=index)
        photo.convert("RGB").save(images / f"{name}.png")
        photo.getchannel("A").resize(mask_sizes[name], Image.Resampling.BOX).save(images / "masks" / f"{name}.png")
    paths = sorted(images.glob("*.png"))
    check_masks(paths, "files")
    for path in paths:
        for buckets in (None, bucket_sizes(64)):
            framed = load_framed(path, 64, buckets, mask_of=lambda p, image: upright_mask(p, image, "files"))
            assert framed.mask.size == framed.image.size
            subject, mask = red_part(framed.image), np.asarray(framed.mask) > 127
            assert subject.sum() > 100 and (subject == mask).mean() > 0.95, path.name  # the edges blur differently
    run = run_training(tmp_path, "half", images=str(images), masked_loss=True, buckets=True)
    assert run.adapter.is_file()
    Image.new("L", (80, 47), 255).save(images / "masks" / "half.png")  # 2 px off 16:9 at that size
    with pytest.raises(SdtuneError, match=r"--masked-loss: mask .*half.png is 80x47, its image half.png 160x90: a mask must have "
                                          r"its image's aspect ratio \(its size, or that scaled\)$"):
        check_masks(paths, "files")


def test_class_images_weigh_one_and_a_dataset_without_loss_masks_has_none(tmp_path):
    from sdtune.data import ConceptDataset, load_framed

    Image.new("RGB", (80, 64), (10, 20, 30)).save(tmp_path / "class.png")
    framed = load_framed(tmp_path / "class.png", 64)
    item = ConceptDataset([framed], "a castle", loss_masks=True).example(0, True)
    assert item["loss_mask"].shape == (1, 64, 64) and bool((item["loss_mask"] == 255).all())
    assert "loss_mask" not in ConceptDataset([framed], "a castle").example(0, False)


def test_masks_are_averaged_over_each_latent_pixels_area():
    from sdtune.masks import loss_weights

    mask = torch.zeros(1, 1, 16, 16, dtype=torch.uint8)
    mask[..., :8, :8] = 255  # one latent pixel all white
    mask[..., :4, 8:] = 255  # one half white
    mask[..., 8:, :8] = torch.tensor([[255, 0] * 4] * 8, dtype=torch.uint8)  # a stripe pattern: half
    weights = loss_weights(mask, (2, 2), unmasked_weight=0.25)
    expected = 0.25 + 0.75 * torch.tensor([[1.0, 0.5], [0.5, 0.0]])
    assert weights.shape == (1, 1, 2, 2) and torch.allclose(weights[0, 0], expected)
    assert torch.equal(loss_weights(mask, (16, 16), 0.0)[0, 0], mask[0, 0].float() / 255)


# ---------------------------------------------------------------------------------------------
# The loss


@pytest.mark.parametrize("loss_type", ["l2", "huber"])
def test_the_masked_loss_is_each_examples_weighted_mean(loss_type, tiny_pipe, unet_inputs):
    """For a fixed batch, the loss equals Σ w·e / Σ w per example, then the min-SNR-weighted mean, computed here
    by hand; an all-white mask gives the unmasked loss."""
    from sdtune.conditioning import UNetConditions
    from sdtune.losses import ErrorMeasure, denoising_loss, snr_loss_weights
    from sdtune.masks import loss_weights

    from diffusers import DDPMScheduler

    unet, scheduler = tiny_pipe.unet, DDPMScheduler.from_config(tiny_pipe.scheduler.config)
    latents, timesteps, embeddings = unet_inputs
    noise = torch.randn(latents.shape, generator=torch.Generator().manual_seed(7))
    masks = torch.zeros(2, 1, 64, 64, dtype=torch.uint8)
    masks[0, :, 8:40, 16:48] = 255
    masks[1, :, :, :20] = 128
    weights = loss_weights(masks, latents.shape[-2:], 0.1)
    measure = ErrorMeasure(loss_type, huber_c=0.3, huber_schedule="constant")
    conditions = UNetConditions(embeddings)

    def loss(weights):
        return denoising_loss(unet, scheduler, latents, conditions, noise, timesteps, contextlib.nullcontext,
                              snr_gamma=5.0, measure=measure, weights=weights).total

    with torch.no_grad():
        prediction = unet(scheduler.add_noise(latents, noise, timesteps), timesteps, encoder_hidden_states=embeddings).sample
        difference = (prediction - noise).double()
        errors = difference**2 if loss_type == "l2" else 2 * 0.3 * ((difference**2 + 0.09).sqrt() - 0.3)
        w = weights.double().expand_as(errors)
        by_example = (errors * w).sum(dim=(1, 2, 3)) / w.sum(dim=(1, 2, 3))
        expected = (by_example * snr_loss_weights(scheduler, timesteps, 5.0).double()).mean()
        assert math.isclose(loss(weights).item(), expected.item(), rel_tol=1e-5)
        white = loss_weights(torch.full_like(masks, 255), latents.shape[-2:], 0.1)
        assert math.isclose(loss(white).item(), loss(None).item(), rel_tol=1e-6)
        assert not math.isclose(loss(weights).item(), loss(None).item(), rel_tol=1e-3)


def test_what_a_mask_leaves_out_does_not_reach_the_gradient(tiny_pipe, unet_inputs):
    """With --unmasked-weight 0, a change of the target where the mask is black leaves every parameter's gradient
    exactly as it was; a change where it is white does not."""
    from sdtune.losses import ErrorMeasure, combine_loss
    from sdtune.masks import loss_weights

    unet, scheduler = tiny_pipe.unet, tiny_pipe.scheduler
    latents, timesteps, embeddings = unet_inputs
    masks = torch.zeros(2, 1, 64, 64, dtype=torch.uint8)
    masks[..., 16:48, 16:48] = 255  # latent pixels 2..5 of 8
    weights = loss_weights(masks, latents.shape[-2:], 0.0)
    target = torch.randn(latents.shape, generator=torch.Generator().manual_seed(3))

    def gradient(target):
        unet.zero_grad(set_to_none=True)
        prediction = unet(latents, timesteps, encoder_hidden_states=embeddings).sample
        errors = ErrorMeasure().per_example(prediction, target, scheduler, timesteps, weights)
        combine_loss(errors, timesteps, scheduler).total.backward()
        return [p.grad.clone() for p in unet.parameters() if p.grad is not None]

    base = gradient(target)
    outside, inside = target.clone(), target.clone()
    outside[..., 0, :] += 5.0  # the black border
    outside[..., :, 7] -= 3.0
    inside[0, 1, 3, 4] += 5.0
    assert all(torch.equal(a, b) for a, b in zip(base, gradient(outside)))
    assert not all(torch.equal(a, b) for a, b in zip(base, gradient(inside)))


# ---------------------------------------------------------------------------------------------
# Training


@pytest.mark.filterwarnings("ignore:resuming with other settings")  # steps: the cut run stopped early
def test_masked_training_caches_as_uncached_resumes_exactly_and_a_white_mask_changes_nothing(tmp_path, tiny_path):
    """Photos of two shapes in buckets, mirrored at random, with masks: the cached run equals the uncached one
    bit for bit, a cut and resumed run ends with the same adapter, and all-white masks train as no mask does."""
    images = masked_photo_set(tmp_path / "photos")
    settings = dict(images=str(images), buckets=True, batch_size=2, seed=3, steps=4, random_flip=True, masked_loss=True,
                    unmasked_weight=0.2, checkpoint_every=2)
    whole = run_training(tmp_path, "whole", **settings)
    assert all(math.isfinite(loss) for loss in whole.losses)
    uncached = run_training(tmp_path, "uncached", cache_latents=False, **settings)
    assert uncached.losses == whole.losses
    run_training(tmp_path, "cut", **{**settings, "steps": 2})
    resumed = run_training(tmp_path, "cut", **{**settings, "resume": "latest"})
    assert resumed.losses == whole.losses[2:]
    for run in (uncached, resumed):
        assert (run.output / "adapter.safetensors").read_bytes() == (whole.output / "adapter.safetensors").read_bytes()
    written = (whole.output / "config.toml").read_text()
    assert "masked_loss = true" in written and "unmasked_weight = 0.2" in written and 'mask_source = "files"' in written

    unmasked = run_training(tmp_path, "unmasked", **{**settings, "masked_loss": False, "unmasked_weight": 0.1})
    assert unmasked.losses != whole.losses
    keys = {line.split(" = ")[0] for line in (unmasked.output / "config.toml").read_text().splitlines()}
    assert not keys & {"masked_loss", "mask_source", "unmasked_weight"}  # off: config.toml as before masks existed
    white = masked_photo_set(tmp_path / "white", white=True)
    white_run = run_training(tmp_path, "white-run", **{**settings, "images": str(white)})
    assert white_run.losses == pytest.approx(unmasked.losses, rel=1e-5)


def test_class_images_train_unmasked_beside_masked_concept_images(tmp_path, tiny_path, monkeypatch):
    import sdtune.training

    images = masked_photo_set(tmp_path / "photos", sizes=((64, 64), (80, 64), (70, 64)))
    (tmp_path / "class").mkdir()
    for index in range(2):
        Image.new("RGB", (64, 64), (40 * index, 90, 160)).save(tmp_path / "class" / f"c{index}.png")
    seen = []
    original_loss = sdtune.training.Trainer.loss

    def recording_loss(self, latents, batch):
        seen.append((batch["is_prior"].tolist(), [bool((mask == 255).all()) for mask in batch["loss_mask"]]))
        return original_loss(self, latents, batch)

    monkeypatch.setattr(sdtune.training.Trainer, "loss", recording_loss)
    run = run_training(tmp_path, "prior", images=str(images), class_images=str(tmp_path / "class"), class_prompt="a castle",
                       masked_loss=True, batch_size=1)
    assert all(math.isfinite(loss) for loss in run.losses)
    assert seen and all(whole == [False, True] for is_prior, whole in seen) and seen[0][0] == [False, True]


def test_a_mask_whose_white_part_is_cropped_away_is_refused(tmp_path, tiny_path):
    images = tmp_path / "photos"
    (images / "masks").mkdir(parents=True)
    Image.new("RGB", (192, 64), (90, 90, 90)).save(images / "wide.png")
    mask = Image.new("L", (192, 64), 0)
    mask.paste(255, (0, 0, 20, 64))  # only the left edge, which the center crop cuts away
    mask.save(images / "masks" / "wide.png")
    with pytest.raises(SdtuneError, match="the mask of wide.png is black everywhere inside the 64x64 crop"):
        run_training(tmp_path, "cropped", images=str(images), masked_loss=True)
    assert not (tmp_path / "cropped" / "adapter.safetensors").exists()


def test_a_dry_run_says_where_the_masks_come_from(tmp_path):
    from sdtune.training import plan_run

    images = masked_photo_set(tmp_path / "photos")
    summary = plan_run(TrainConfig(model="tiny-random", images=str(images), masked_loss=True, unmasked_weight=0.0)).summary()
    assert "masked loss: masks from masks/ beside them, weight 0 where black" in summary
    with pytest.warns(UserWarning, match="masks beside the concept images are used only with masked_loss=True"):
        unmasked = plan_run(TrainConfig(model="tiny-random", images=str(images))).summary()
    assert not any("masked" in line for line in unmasked)


def test_mask_settings_check_what_combines():
    TrainConfig(masked_loss=True, mask_source="alpha", unmasked_weight=0.0).validate()
    for settings, message in [
        (dict(masked_loss=True, mask_source="layers"), "^mask_source must be one of files, alpha"),
        (dict(masked_loss=True, unmasked_weight=1.0), "^unmasked_weight must be in [0, 1)"),
        (dict(masked_loss=True, unmasked_weight=float("nan")), "^unmasked_weight must be in [0, 1)"),
        (dict(unmasked_weight=0.5), "^mask_source and unmasked_weight apply to masked_loss=True"),
        (dict(masked_loss=True, dataset="digits"), "^masked_loss=True applies to concept images"),
    ]:
        with pytest.raises(SdtuneError, match=message.replace("[", r"\[").replace(")", r"\)")):
            TrainConfig(**settings).validate()
    assert "mask" not in TrainConfig().to_toml() and "masked_loss = true" in TrainConfig(masked_loss=True).to_toml()


def test_masks_decode_on_threads_to_the_same_masks_with_the_same_warnings_in_order(tmp_path, monkeypatch):
    """Images and their masks decode on several threads (data.load_framed_images): the same pixels and masks bit for
    bit, the same warnings in the same order as on one thread; masks whose names are one in NFC, named as the run was
    planned (check_masks), are not named again by any thread."""
    import random
    import threading
    import time
    import unicodedata
    import warnings

    from sdtune.data import load_framed_images
    from sdtune.masks import upright_mask

    folder = masked_photo_set(tmp_path / "photos", sizes=((96, 128), (100, 130), (160, 90), (150, 90), (40, 30), (90, 90)))
    name = unicodedata.normalize("NFC", "café")
    subject_photo(80, 80, (10, 10, 40, 40)).convert("RGB").save(folder / f"{name}.png")
    for spelling in (name, unicodedata.normalize("NFD", name)):  # one name in NFC, spelled twice
        subject_photo(80, 80, (10, 10, 40, 40)).getchannel("A").save(folder / "masks" / f"{spelling}.png")
    paths = sorted(folder.glob("*.png"))
    threads_used, late = set(), random.Random(0)

    def mask_of(path, image):  # finishing out of order, each mask warns as it is read
        threads_used.add(threading.current_thread().name)
        time.sleep(late.uniform(0, 0.03))
        warnings.warn(f"reading the mask of {path.name}", RuntimeWarning)
        return upright_mask(path, image, "files")

    def start(threads: int):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            framed = load_framed_images(paths, 64, bucket_sizes(64), mask_of=mask_of, threads=threads)
        return framed, [(w.category, str(w.message)) for w in caught]

    one, one_said = start(1)
    assert threads_used == {threading.current_thread().name}
    assert [message for _, message in one_said] == [f"reading the mask of {path.name}" for path in paths] + [
        "photo-4.png is 40x30, smaller than its 72x56 bucket: upscaled"]
    threads_used.clear()
    framed, said = start(4)
    assert said == one_said
    assert len(threads_used) > 1 and threading.current_thread().name not in threads_used
    assert len(framed) == len(one) == len(paths)
    for each, alone in zip(framed, one):
        assert np.array_equal(np.asarray(each.image), np.asarray(alone.image))
        assert np.array_equal(np.asarray(each.mask), np.asarray(alone.mask)) and np.asarray(alone.mask).max() == 255


def test_a_masked_run_trains_the_same_adapter_on_one_thread_or_several(tmp_path, monkeypatch):
    """The cached latents and masks of a --masked-loss run decoded on several threads train the adapter of one
    thread's, bit for bit, with the same warnings."""
    import warnings

    import sdtune.data

    images = masked_photo_set(tmp_path / "photos", sizes=((96, 128), (100, 130), (160, 90), (150, 90), (40, 30), (44, 33)))
    settings = dict(images=str(images), buckets=True, batch_size=2, seed=3, steps=2, random_flip=True, masked_loss=True,
                    unmasked_weight=0.2)
    runs, said = {}, {}
    for threads in (1, 4):
        monkeypatch.setattr(sdtune.data, "decode_threads", lambda threads=threads: threads)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            runs[threads] = run_training(tmp_path, "run", overwrite=True, **settings)
        # what the run says (a library's first import deprecates things, once)
        said[threads] = [str(w.message) for w in caught if issubclass(w.category, UserWarning)]
    assert any("photo-4.png (40x30)" in message for message in said[1])
    assert said[4] == said[1]
    assert runs[4].losses == runs[1].losses
    assert (runs[4].output / "adapter.safetensors").read_bytes() == (runs[1].output / "adapter.safetensors").read_bytes()


def test_masks_beside_the_images_without_masked_loss_are_named_once_in_the_dry_run_and_at_the_start(tmp_path):
    import warnings

    from typer.testing import CliRunner

    from sdtune.cli import app

    images = masked_photo_set(tmp_path / "photos", sizes=((64, 64), (64, 64)))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = CliRunner().invoke(app, ["train", "--model", "tiny-random", "--images", str(images), "--dry-run",
                                          "--output", str(tmp_path / "dry")])
    assert result.exit_code == 0, result.output
    said = [str(w.message) for w in caught if "masks beside the concept images" in str(w.message)]
    assert len(said) == 1 and str(images / "masks") in said[0] and "--masked-loss" in said[0], said
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run_training(tmp_path, "unmasked", images=str(images), steps=1)
    said = [str(w.message) for w in caught if "masks beside the concept images" in str(w.message)]
    assert len(said) == 1 and str(images / "masks") in said[0] and "masked_loss=True" in said[0], said
    with warnings.catch_warnings(record=True) as caught:  # used, or no masks in the folder: nothing is said
        warnings.simplefilter("always")
        run_training(tmp_path, "masked", images=str(images), steps=1, masked_loss=True)
        for mask in (images / "masks").iterdir():
            mask.unlink()
        run_training(tmp_path, "empty", images=str(images), steps=1)
    assert not [w for w in caught if "masks beside the concept images" in str(w.message)]


def test_masks_beside_images_masked_by_their_alpha_channels_are_named_as_unread(tmp_path):
    """With --mask-source alpha the masks/ folder is not read: said once before the model loads, in the CLI's
    flags and Python's spelling; with the masks read from it (files), nothing is said."""
    import warnings

    from typer.testing import CliRunner

    from sdtune.cli import app
    from sdtune.training import plan_run

    images = masked_photo_set(tmp_path / "photos", sizes=((64, 64), (64, 64)))
    for index in range(2):  # the photos keep their alpha channels too
        subject_photo(64, 64, (8, 10, 32, 42), seed=index).save(images / f"photo-{index}.png")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = CliRunner().invoke(app, ["train", "--model", "tiny-random", "--images", str(images), "--masked-loss",
                                          "--mask-source", "alpha", "--dry-run", "--output", str(tmp_path / "dry")])
    assert result.exit_code == 0, result.output
    said = [str(w.message) for w in caught if "masks beside the concept images" in str(w.message)]
    assert len(said) == 1 and str(images / "masks") in said[0], said
    assert "not read with --mask-source alpha" in said[0] and "give --mask-source files to use them" in said[0], said
    with pytest.warns(UserWarning, match='not read with mask_source="alpha".*give mask_source="files" to use them'):
        plan_run(TrainConfig(model="tiny-random", images=str(images), masked_loss=True, mask_source="alpha"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        plan_run(TrainConfig(model="tiny-random", images=str(images), masked_loss=True))
    assert not [w for w in caught if "masks beside the concept images" in str(w.message)]
