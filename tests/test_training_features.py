"""Training options: min-SNR-γ, noise offset, mixed precision, latent caching, prior preservation,
validation during training and TensorBoard logs, on the tiny model."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from sdtune import losses, prior, validation
from sdtune.config import TrainConfig
from sdtune.errors import SdtuneError


@pytest.fixture
def fast_sampling(monkeypatch):
    """Few denoising steps for validation samples and class images (the images are noise anyway)."""
    monkeypatch.setattr(validation, "SAMPLE_STEPS", 2)
    monkeypatch.setattr(prior, "GENERATION_STEPS", 2)


@pytest.fixture
def loaded_pipes(monkeypatch):
    """Every pipeline `train` loads, so a test can look at the models after (or during) training."""
    import sdtune.models

    pipes = []
    original = sdtune.models.load_pipeline

    def load_and_keep(*args, **kwargs):
        pipes.append(original(*args, **kwargs))
        return pipes[-1]

    monkeypatch.setattr(sdtune.models, "load_pipeline", load_and_keep)
    return pipes


def run_training(tmp_path, name: str, **settings):
    from sdtune.training import train

    settings = {"model": "tiny-random", "steps": 2, "log_with": "none", "output": str(tmp_path / name), **settings}
    return train(TrainConfig(**settings), progress=False)


def read_metrics(run) -> list[dict]:
    return [json.loads(line) for line in (run.output / "metrics.jsonl").read_text().splitlines()]


# ---------------------------------------------------------------------------------------------
# Min-SNR-γ and noise offset


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_min_snr_weights_follow_the_formula(prediction_type):
    from diffusers import DDPMScheduler

    scheduler = DDPMScheduler(num_train_timesteps=1000, prediction_type=prediction_type)
    timesteps = torch.tensor([0, 10, 100, 400, 999])
    gamma = 5.0
    alpha_bar = scheduler.alphas_cumprod[timesteps].double()
    snr = alpha_bar / (1 - alpha_bar)
    clipped = torch.clamp(snr, max=gamma)
    expected = clipped / snr if prediction_type == "epsilon" else clipped / (snr + 1)
    weights = losses.snr_loss_weights(scheduler, timesteps, gamma)
    torch.testing.assert_close(weights.double(), expected, rtol=1e-5, atol=1e-7)
    # high-SNR (early) timesteps are down-weighted; under epsilon the noisy ones keep weight 1
    assert weights[0] < weights[2] and (prediction_type != "epsilon" or weights[-1] == 1)


def test_min_snr_weights_the_instance_loss_and_prior_term_is_added():
    from diffusers import DDPMScheduler

    scheduler = DDPMScheduler(num_train_timesteps=1000)
    errors = torch.tensor([1.0, 2.0, 3.0, 5.0])
    timesteps = torch.tensor([5, 900, 5, 900])
    is_prior = torch.tensor([False, False, True, True])
    weights = losses.snr_loss_weights(scheduler, timesteps[:2], 5.0)
    parts = losses.combine_loss(errors, timesteps, scheduler, snr_gamma=5.0, is_prior=is_prior, prior_loss_weight=0.5)
    torch.testing.assert_close(parts.instance, (weights * errors[:2]).mean())
    torch.testing.assert_close(parts.prior, torch.tensor(4.0))
    torch.testing.assert_close(parts.total, parts.instance + 0.5 * 4.0)
    plain = losses.combine_loss(errors, timesteps, scheduler)
    torch.testing.assert_close(plain.total, errors.mean())


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_debiased_estimation_weights_follow_sd_scripts(prediction_type):
    from diffusers import DDPMScheduler

    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                              prediction_type=prediction_type)
    timesteps = torch.tensor([0, 1, 10, 400, 999])
    alpha_bar = scheduler.alphas_cumprod[timesteps].double()
    snr = torch.clamp(alpha_bar / (1 - alpha_bar), max=1000)
    assert snr[0] == 1000  # SD's first timestep has SNR ≈ 1175: the clamp bites
    expected = 1 / snr.sqrt() if prediction_type == "epsilon" else 1 / (snr + 1)
    weights = losses.debiased_loss_weights(scheduler, timesteps)
    torch.testing.assert_close(weights.double(), expected, rtol=1e-5, atol=1e-7)
    assert bool((weights[:-1] < weights[1:]).all())  # the noisier the step, the larger its weight


def test_debiased_estimation_multiplies_min_snr_and_masked_errors_and_weights_the_prior_term_too():
    import contextlib
    from types import SimpleNamespace

    from diffusers import DDPMScheduler

    from sdtune.conditioning import UNetConditions

    scheduler = DDPMScheduler(num_train_timesteps=1000)

    def unet(noisy, timesteps, **_):  # predicts zero: the error is the noise itself
        return SimpleNamespace(sample=torch.zeros_like(noisy))

    latents, noise = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    timesteps, is_prior = torch.tensor([20, 700, 300]), torch.tensor([False, False, True])
    weights = torch.rand(3, 1, 8, 8, generator=torch.Generator().manual_seed(4))  # a masked loss's
    parts = losses.denoising_loss(unet, scheduler, latents, UNetConditions(torch.zeros(3, 1, 8)), noise, timesteps,
                                  contextlib.nullcontext, snr_gamma=5.0, is_prior=is_prior, prior_loss_weight=0.5,
                                  weights=weights, debiased_estimation=True)
    # by hand: each example's Σw·e/Σw times 1/√min(SNR, 1000), the instances' also times min(SNR, 5)/SNR
    errors = (noise**2 * weights).sum(dim=(1, 2, 3)) / weights.expand_as(noise).sum(dim=(1, 2, 3))
    alpha_bar = scheduler.alphas_cumprod[timesteps]
    snr = alpha_bar / (1 - alpha_bar)
    instance = (errors * torch.clamp(snr, max=5) / snr / torch.clamp(snr, max=1000).sqrt())[:2].mean()
    torch.testing.assert_close(parts.instance, instance)
    prior = errors[2] / torch.clamp(snr[2], max=1000).sqrt()  # debiased as sd-scripts' regularisation images; no min-SNR
    torch.testing.assert_close(parts.prior, prior)
    torch.testing.assert_close(parts.total, instance + 0.5 * prior)
    plain = losses.combine_loss(errors, timesteps, scheduler, debiased_estimation=False)
    torch.testing.assert_close(plain.total, errors.mean())


def test_debiased_estimation_is_refused_where_its_weight_has_no_value():
    from types import SimpleNamespace

    from sdtune.limits import check_debiased_estimation

    def configs(**scheduler):
        return SimpleNamespace(scheduler={"num_train_timesteps": 1000, **scheduler})

    check_debiased_estimation("m", configs(), None)
    check_debiased_estimation("m", configs(prediction_type="v_prediction", rescale_betas_zero_snr=True), None)
    check_debiased_estimation("m", configs(rescale_betas_zero_snr=True), 999)
    with pytest.raises(SdtuneError, match="m predicts sample"):
        check_debiased_estimation("m", configs(prediction_type="sample"), None)
    with pytest.raises(SdtuneError, match="infinite at m's last timestep .* add --max-timestep 999"):
        check_debiased_estimation("m", configs(rescale_betas_zero_snr=True), 1000)


def test_noise_offset_adds_a_per_channel_constant():
    latents = torch.zeros(3, 4, 8, 8)
    plain = losses.training_noise(latents, 0.0, torch.Generator().manual_seed(7))
    offset = losses.training_noise(latents, 0.1, torch.Generator().manual_seed(7))
    generator = torch.Generator().manual_seed(7)
    base = torch.randn(latents.shape, generator=generator)
    constants = torch.randn(3, 4, 1, 1, generator=generator)
    torch.testing.assert_close(plain, base)
    torch.testing.assert_close(offset, base + 0.1 * constants)
    difference = offset - plain
    torch.testing.assert_close(difference, difference[..., :1, :1].expand_as(difference))  # constant over pixels


def test_multires_noise_adds_upsampled_coarser_noises_and_normalises():
    import torch.nn.functional as F

    latents = torch.zeros(2, 4, 32, 24)
    noise = losses.training_noise(latents, 0.0, torch.Generator().manual_seed(5), multires_iterations=3, multires_discount=0.5)
    # sd-scripts' pyramid_noise_like by hand: scale i adds noise drawn at ⌊h/rⁱ⌋×⌊w/rⁱ⌋, r in [2, 4), times 0.5ⁱ
    generator = torch.Generator().manual_seed(5)
    expected, sizes = torch.randn(latents.shape, generator=generator), []
    for i in range(3):
        r = 2 + 2 * torch.rand((), generator=generator, dtype=torch.float64).item()
        sizes.append((max(1, int(32 / r**i)), max(1, int(24 / r**i))))
        coarse = torch.randn(2, 4, *sizes[-1], generator=generator)
        expected = expected + F.interpolate(coarse, size=(32, 24), mode="bilinear") * 0.5**i
    torch.testing.assert_close(noise, expected / expected.std())
    assert sizes[0] == (32, 24) and 2 <= sizes[1][0] <= 16 and sizes[2][0] < sizes[1][0]  # full size, then coarser
    assert noise.std().item() == pytest.approx(1.0, abs=1e-6)
    # the coarse scales correlate neighbouring pixels, which plain Gaussian noise does not
    big = torch.zeros(1, 4, 64, 64)
    for iterations, low, high in ((0, -0.05, 0.05), (6, 0.2, 0.9)):
        drawn = losses.training_noise(big, 0.0, torch.Generator().manual_seed(1), multires_iterations=iterations,
                                      multires_discount=0.8)
        left, right = drawn[..., :-1].flatten(), drawn[..., 1:].flatten()
        assert low < torch.corrcoef(torch.stack([left, right]))[0, 1].item() < high
    # the pyramid stops after its first 1-pixel side: an 8×8 latent has at most 4 scales
    small = torch.zeros(1, 4, 8, 8)
    torch.testing.assert_close(losses.training_noise(small, 0.0, torch.Generator().manual_seed(2), multires_iterations=4),
                               losses.training_noise(small, 0.0, torch.Generator().manual_seed(2), multires_iterations=50))


def test_multires_noise_off_draws_exactly_the_plain_noise_and_follows_the_offset():
    latents = torch.zeros(3, 4, 8, 8)
    plain_generator, off_generator = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    plain = losses.training_noise(latents, 0.1, plain_generator)
    off = losses.training_noise(latents, 0.1, off_generator, multires_iterations=0, multires_discount=0.9)
    assert torch.equal(plain, off) and torch.equal(plain_generator.get_state(), off_generator.get_state())
    # with both, as sd-scripts: the offset noise goes through the pyramid
    generator = torch.Generator().manual_seed(7)
    both = losses.training_noise(latents, 0.1, generator, multires_iterations=2)
    pyramid = losses.pyramid_noise(losses.training_noise(latents, 0.1, off_generator.manual_seed(7)), 2, 0.3, off_generator)
    torch.testing.assert_close(both, pyramid)


@pytest.mark.parametrize("schedule", ["snr", "exponential", "constant"])
def test_pseudo_huber_thresholds_follow_their_schedules(schedule):
    from diffusers import DDPMScheduler

    scheduler = DDPMScheduler(num_train_timesteps=1000)
    timesteps = torch.tensor([0, 10, 500, 999])
    c = losses.ErrorMeasure("huber", 0.1, schedule).huber_threshold(scheduler, timesteps).double()
    alpha_bar = scheduler.alphas_cumprod[timesteps].double()
    expected = {
        "snr": 0.9 / (1 + ((1 - alpha_bar) / alpha_bar).sqrt()) ** 2 + 0.1,
        "exponential": 0.1 ** (timesteps.double() / 1000),
        "constant": torch.full((4,), 0.1, dtype=torch.float64),
    }[schedule]
    torch.testing.assert_close(c, expected, rtol=1e-5, atol=1e-7)
    if schedule != "constant":  # near 1 (almost MSE) at little noise, towards c at much noise
        assert c[0] > 0.98 and c[-1] < 0.11 and bool((c[:-1] >= c[1:]).all())


def test_pseudo_huber_losses_are_mse_for_small_errors_and_linear_for_large_ones():
    from diffusers import DDPMScheduler

    scheduler = DDPMScheduler(num_train_timesteps=1000)
    timesteps = torch.tensor([3, 700])
    target = torch.zeros(2, 4, 8, 8)
    huber = losses.ErrorMeasure("huber", 0.5, "constant")
    smooth = losses.ErrorMeasure("smooth_l1", 0.5, "constant")
    small, large = torch.full_like(target, 1e-3), torch.full_like(target, 100.0)
    torch.testing.assert_close(huber.per_example(small, target, scheduler, timesteps), torch.full((2,), 1e-6), rtol=1e-3, atol=0)
    torch.testing.assert_close(smooth.per_example(small, target, scheduler, timesteps), torch.full((2,), 2e-6), rtol=1e-3, atol=0)
    torch.testing.assert_close(huber.per_example(large, target, scheduler, timesteps), torch.full((2,), 2 * 0.5 * ((100**2 + 0.5**2) ** 0.5 - 0.5)))  # about 2c|d|
    # an element's error, literally: 2c(√(d² + c²) − c), its mean over each example
    prediction = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    measure = losses.ErrorMeasure("huber", 0.1, "snr")
    c = measure.huber_threshold(scheduler, timesteps).view(2, 1, 1, 1)
    expected = (2 * c * ((prediction**2 + c**2).sqrt() - c)).mean(dim=(1, 2, 3))
    torch.testing.assert_close(measure.per_example(prediction, target, scheduler, timesteps), expected)
    mse = losses.ErrorMeasure().per_example(prediction, target, scheduler, timesteps)
    torch.testing.assert_close(mse, (prediction**2).mean(dim=(1, 2, 3)))


def test_a_pseudo_huber_run_trains_with_that_loss_and_says_so(tmp_path, tiny_path):
    import tomllib

    plain = run_training(tmp_path, "plain", steps=3)
    huber = run_training(tmp_path, "huber", steps=3, loss_type="huber", huber_c=0.2, huber_schedule="exponential")
    assert huber.losses != plain.losses and all(map(torch.isfinite, torch.tensor(huber.losses)))
    written = tomllib.loads((huber.output / "config.toml").read_text())
    assert (written["loss_type"], written["huber_c"], written["huber_schedule"]) == ("huber", 0.2, "exponential")
    assert "loss_type" not in tomllib.loads((plain.output / "config.toml").read_text())  # as before the option


def test_a_multires_noise_run_trains_on_pyramid_noise_and_says_so(tmp_path, tiny_path):
    import tomllib

    from sdtune.model_card import write_model_card

    plain = run_training(tmp_path, "plain", steps=2)
    pyramid = run_training(tmp_path, "pyramid", steps=2, multires_noise_iterations=6, multires_noise_discount=0.4)
    assert pyramid.losses != plain.losses and all(map(torch.isfinite, torch.tensor(pyramid.losses)))
    written = tomllib.loads((pyramid.output / "config.toml").read_text())
    assert (written["multires_noise_iterations"], written["multires_noise_discount"]) == (6, 0.4)
    assert "multires_noise_iterations" not in tomllib.loads((plain.output / "config.toml").read_text())  # as before the option
    card = (write_model_card(pyramid.output).output).read_text()
    assert "multires noise iterations" in card and "0.4" in card


def test_a_debiased_estimation_run_weights_its_loss_and_says_so(tmp_path, tiny_path):
    import tomllib

    from sdtune.model_card import write_model_card

    min_snr = run_training(tmp_path, "min-snr", steps=2, snr_gamma=5.0)
    debiased = run_training(tmp_path, "debiased", steps=2, snr_gamma=5.0, debiased_estimation=True)
    assert debiased.losses != min_snr.losses and all(map(torch.isfinite, torch.tensor(debiased.losses)))
    assert tomllib.loads((debiased.output / "config.toml").read_text())["debiased_estimation"] is True
    assert "debiased_estimation" not in tomllib.loads((min_snr.output / "config.toml").read_text())  # as before the option
    assert "debiased estimation" in write_model_card(debiased.output).output.read_text()


def test_a_run_with_multires_noise_and_debiased_estimation_resumes_exactly(tmp_path, tiny_path, monkeypatch):
    from helpers import uninterrupted_and_resumed

    def configure(out, **more):  # the pyramid's sizes come from the step's seeded CPU RNG, as its noise does
        return TrainConfig(model="tiny-random", steps=4, checkpoint_every=2, log_with="none", output=str(out),
                           multires_noise_iterations=4, debiased_estimation=True, **more)

    whole, resumed = uninterrupted_and_resumed(configure, tmp_path, monkeypatch, 2)
    assert resumed.resumed_from is not None and resumed.losses == whole.losses[2:]
    assert resumed.adapter.read_bytes() == whole.adapter.read_bytes()


def test_timestep_range_and_input_perturbation_reach_the_loss(tmp_path, tiny_path, monkeypatch):
    seen = []
    original = losses.denoising_loss

    def recording(unet, noise_scheduler, latents, conditions, noise, timesteps, *args, **kwargs):
        seen.append((timesteps.clone(), args[-1]))
        return original(unet, noise_scheduler, latents, conditions, noise, timesteps, *args, **kwargs)

    monkeypatch.setattr(losses, "denoising_loss", recording)
    run_training(tmp_path, "range", steps=4, batch_size=2, min_timestep=900, max_timestep=902, input_perturbation=0.1)
    drawn = torch.cat([timesteps for timesteps, _ in seen])
    assert set(drawn.tolist()) <= {900, 901} and len(drawn) == 8 and {perturbation for _, perturbation in seen} == {0.1}


def test_input_perturbation_noises_the_input_and_keeps_the_target():
    import contextlib
    from types import SimpleNamespace

    from diffusers import DDPMScheduler

    from sdtune.conditioning import UNetConditions

    scheduler = DDPMScheduler(num_train_timesteps=1000)
    inputs = []

    def unet(noisy, timesteps, **_):  # predicts zero; keeps what it was given
        inputs.append(noisy)
        return SimpleNamespace(sample=torch.zeros_like(noisy))

    latents, noise = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    timesteps = torch.tensor([10, 500])
    conditions = UNetConditions(torch.zeros(2, 1, 8))
    torch.manual_seed(0)
    plain = losses.denoising_loss(unet, scheduler, latents, conditions, noise, timesteps, contextlib.nullcontext)
    torch.manual_seed(0)
    perturbed = losses.denoising_loss(unet, scheduler, latents, conditions, noise, timesteps,
                                      contextlib.nullcontext, input_perturbation=0.1)
    torch.manual_seed(0)
    extra = torch.randn(noise.shape)
    torch.testing.assert_close(inputs[0], scheduler.add_noise(latents, noise, timesteps))
    torch.testing.assert_close(inputs[1], scheduler.add_noise(latents, noise + 0.1 * extra, timesteps))
    torch.testing.assert_close(plain.total, perturbed.total)  # the same target: the noise, not the perturbed noise


# ---------------------------------------------------------------------------------------------
# Mixed precision


def test_bf16_trains_with_fp32_trainable_parameters_and_half_frozen_models(tmp_path, tiny_path, loaded_pipes):
    run = run_training(tmp_path, "bf16", mixed_precision="bf16", no_half_vae=True)
    assert len(run.losses) == 2 and all(torch.isfinite(torch.tensor(run.losses)))
    pipe = loaded_pipes[-1]
    trainable = [p for p in pipe.unet.parameters() if p.requires_grad]
    frozen = [p for p in pipe.unet.parameters() if not p.requires_grad]
    assert trainable and {p.dtype for p in trainable} == {torch.float32}
    assert {p.dtype for p in frozen} == {torch.bfloat16}
    assert {p.dtype for p in pipe.text_encoder.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in pipe.vae.parameters()} == {torch.float32}  # --no-half-vae
    assert all(t.dtype == torch.float32 for t in load_file(str(run.adapter)).values())  # the trained tensors, as written


def test_bf16_halves_the_vae_without_no_half_vae(tmp_path, tiny_path, loaded_pipes):
    run_training(tmp_path, "bf16-vae", mixed_precision="bf16", steps=1, method="bitfit")
    pipe = loaded_pipes[-1]
    assert {p.dtype for p in pipe.vae.parameters()} == {torch.bfloat16}
    biases = [p for p in pipe.unet.parameters() if p.requires_grad]
    assert biases and {p.dtype for p in biases} == {torch.float32}  # in-place trainables too
    # layers without a trained bias are stored in bf16; those with one stay whole in fp32
    unet = pipe.unet
    assert unet.conv_in.weight.dtype == torch.float32 and unet.conv_in.bias.requires_grad
    assert unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1.to_q.weight.dtype == torch.bfloat16


@pytest.mark.skipif(torch.cuda.is_available(), reason="fp16 autocasts on a GPU")
def test_fp16_on_cpu_warns_and_trains_in_fp32(tmp_path, tiny_path, loaded_pipes):
    with pytest.warns(UserWarning, match="fp16 has no effect on cpu"):
        run = run_training(tmp_path, "fp16", mixed_precision="fp16", steps=1, method="difffit")
    assert all(torch.isfinite(torch.tensor(run.losses)))
    assert {p.dtype for p in loaded_pipes[-1].unet.parameters()} == {torch.float32}


# ---------------------------------------------------------------------------------------------
# Latent caching


def test_cached_latents_give_the_same_losses_and_skip_the_vae(tmp_path, tiny_path, monkeypatch):
    import sdtune.models

    original = sdtune.models.load_pipeline
    encoded: list[int] = []

    def load_counting(*args, **kwargs):
        pipe = original(*args, **kwargs)
        pipe.vae.encoder.register_forward_hook(lambda module, inputs, output: encoded.append(inputs[0].shape[0]))
        return pipe

    monkeypatch.setattr(sdtune.models, "load_pipeline", load_counting)
    settings = dict(steps=10, batch_size=2, seed=3, random_flip=True)  # 8 castle images: 2.5 epochs
    uncached = run_training(tmp_path, "uncached", cache_latents=False, **settings)
    assert sum(encoded) == 10 * 2
    encoded.clear()
    cached = run_training(tmp_path, "cached", **settings)  # the default
    assert cached.config.cache_latents
    assert sum(encoded) == 2 * 8  # every image and its mirror image, once
    # one image per VAE call in both: the same latents, so the same losses and adapter, bit for bit
    assert cached.losses == uncached.losses
    assert (cached.output / "adapter.safetensors").read_bytes() == (uncached.output / "adapter.safetensors").read_bytes()


def test_cached_latents_keep_random_flips():
    from sdtune.data import ConceptDataset
    from sdtune.latents import CachedLatents
    from sdtune.models import load_pipeline
    from PIL import Image

    images = [Image.new("RGB", (64, 64), (255, 0, 0)), Image.new("RGB", (64, 64), (0, 0, 255))]
    images[0].paste((0, 255, 0), (0, 0, 32, 64))  # left half green: not symmetric
    vae = load_pipeline("tiny-random").vae
    dataset = CachedLatents(ConceptDataset(images, "a photo", random_flip=True), vae)
    assert not torch.equal(dataset.parameters[False][0], dataset.parameters[True][0])
    torch.manual_seed(0)
    seen = {bool(torch.equal(dataset[0]["latent_parameters"], dataset.parameters[True][0])) for _ in range(20)}
    assert seen == {False, True}
    assert dataset[1]["prompt"] == "a photo" and "pixels" not in dataset[1]

    # without random flips (the default) only the images as given are encoded and drawn
    unflipped = CachedLatents(ConceptDataset(images, "a photo"), vae)
    assert list(unflipped.parameters) == [False]
    assert all(torch.equal(unflipped[0]["latent_parameters"], unflipped.parameters[False][0]) for _ in range(10))
    # drawing an item reads nothing more from the dataset (a labelled dataset would decode its file again)
    unflipped.dataset = None
    assert unflipped[1]["prompt"] == "a photo" and unflipped.prompts() == ["a photo", "a photo"]
    # an image's latents do not depend on the images encoded with it
    from sdtune.latents import encode_images

    pixels = torch.stack([ConceptDataset(images, "").pixels[i] for i in (1, 0)])
    assert torch.equal(encode_images(vae, pixels)[1], unflipped.parameters[False][0])


def test_concept_images_are_mirrored_only_with_random_flip():
    from PIL import Image

    from sdtune.data import ConceptDataset

    image = Image.new("RGB", (64, 64), (255, 0, 0))
    image.paste((0, 255, 0), (0, 0, 32, 64))
    torch.manual_seed(0)
    plain = ConceptDataset([image], "a photo")
    assert all(torch.equal(plain[0]["pixels"], plain.pixels[0]) for _ in range(20))
    flipping = ConceptDataset([image], "a photo", random_flip=True)
    seen = {bool(torch.equal(flipping[0]["pixels"], flipping.pixels[0].flip(-1))) for _ in range(20)}
    assert seen == {False, True}


# ---------------------------------------------------------------------------------------------
# Prior preservation


def test_prior_preservation_generates_class_images_once(tmp_path, tiny_path, fast_sampling, loaded_pipes, monkeypatch):
    settings = dict(class_prompt="photo of a castle", num_class_images=2, prior_loss_weight=0.5)
    run = run_training(tmp_path, "prior", **settings)
    folder = run.output / "class-images"
    files = sorted(p.name for p in folder.glob("*.png"))
    assert files == ["class-0000.png", "class-0001.png"]
    records = read_metrics(run)
    assert [r["step"] for r in records] == [1, 2]
    for record in records:
        assert record["loss"] == pytest.approx(record["instance_loss"] + 0.5 * record["prior_loss"], rel=1e-5)
        assert record["images_per_second"] > 0
    times = {p.name: p.stat().st_mtime_ns for p in folder.glob("*.png")}
    drawn = []
    original = prior.generate_class_images
    prior.generate_class_images = lambda *a, **k: drawn.append(original(*a, **k)) or drawn[-1]
    try:
        run_training(tmp_path, "prior", overwrite=True, **settings)  # the same run folder: the images are reused
    finally:
        prior.generate_class_images = original
    assert drawn == [0] and times == {p.name: p.stat().st_mtime_ns for p in folder.glob("*.png")}
    adapter = (run.output / "adapter.safetensors").read_bytes()
    with pytest.raises(SdtuneError, match="class images drawn for"):
        run_training(tmp_path, "prior", class_prompt="photo of a tower", num_class_images=2, overwrite=True)
    assert (run.output / "adapter.safetensors").read_bytes() == adapter, "a refused run replaces nothing"
    # read another way: the same prompt's images differ, and the record says how each was read, on one line, before
    # the model loads (a dry run says so too)
    import sdtune.models

    with monkeypatch.context() as patched:
        patched.setattr(sdtune.models, "load_pipeline", lambda *a, **k: pytest.fail("the model loaded"))
        with pytest.raises(SdtuneError, match=r"drawn for 'photo of a castle', not 'photo of a castle' \(clip_skip 2\):"):
            run_training(tmp_path, "prior", clip_skip=2, overwrite=True, **settings)


def test_prior_batches_hold_instance_then_class_examples():
    instances = [{"pixels": torch.zeros(3, 8, 8), "prompt": "sks"} for _ in range(3)]
    classes = [{"pixels": torch.ones(3, 8, 8), "prompt": "class"} for _ in range(5)]
    dataset = prior.PriorPreservationDataset(instances, classes)
    assert len(dataset) == 5
    batch = prior.collate_with_prior([dataset[0], dataset[4]])
    assert batch["prompt"] == ["sks", "sks", "class", "class"]
    assert batch["is_prior"].tolist() == [False, False, True, True]
    assert batch["pixels"][:2].eq(0).all() and batch["pixels"][2:].eq(1).all()


def test_given_class_images_folder(tmp_path, tiny_path):
    from sdtune.demo_images import demo_concept_folder

    run = run_training(tmp_path, "given", class_images=str(demo_concept_folder("canal")), steps=1)
    assert not (run.output / "class-images").exists()
    assert "prior_loss" in read_metrics(run)[0]
    assert run.config.class_prompt == "photo of a castle."


# ---------------------------------------------------------------------------------------------
# Validation and TensorBoard


def test_validation_samples_loss_and_tensorboard_events(tmp_path, tiny_path, fast_sampling):
    from PIL import Image
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from sdtune.sampling import grid_size

    run = run_training(tmp_path, "validate", steps=4, validate_every=2, validation_images=2, log_with="tensorboard")
    for step in (2, 4):
        grid = Image.open(run.output / "samples" / f"step-{step}.png")
        assert grid.size == grid_size(rows=len(validation.DEFAULT_PROMPTS), columns=len(validation.SAMPLE_SEEDS), image_size=(64, 64))
    records = read_metrics(run)
    assert ["val_loss" in r for r in records] == [False, True, False, True]
    assert sorted(run.validation_losses) == [2, 4]
    assert all(r["grad_norm"] > 0 for r in records)

    events = EventAccumulator(str(run.output / "logs" / "sdtune"), size_guidance={"images": 0, "scalars": 0})
    events.Reload()
    tags = events.Tags()
    assert {"loss", "lr", "grad_norm", "val_loss"} <= set(tags["scalars"])
    logged = {event.step: event.value for event in events.Scalars("loss")}
    assert sorted(logged) == [1, 2, 3, 4]
    for record in records:
        assert logged[record["step"]] == pytest.approx(record["loss"], rel=1e-6)
    assert [e.step for e in events.Scalars("val_loss")] == [2, 4]
    assert "samples" in tags["images"] and [e.step for e in events.Images("samples")] == [2, 4]


def test_validation_prompts_are_drawn_with_their_lines_options_as_sample_draws_them(tmp_path, tiny_path, fast_sampling):
    """A --validation-prompts line's --n, --w, --h, --d, --s and --l are its own (kohya-ss' --sample_prompts reads them
    alike), the others drawn at --validation-width x --validation-height; each image's PNG text says how it was
    drawn; the grid keeps each row's aspect; and drawing them leaves the training as it is."""
    import json

    from PIL import Image

    from sdtune.sampling import SETTINGS_CHUNK, grid_size

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a <castle> --n blurry <castle> --w 64 --h 128 --d 7 --s 3 --l 5\nplain <castle>\n")
    settings = dict(steps=2, seed=3, validate_every=2)
    run = run_training(tmp_path, "options", validation_prompts=str(prompts), validation_width=128, **settings)
    grid = Image.open(run.output / "samples" / "step-2.png")
    assert grid.size == grid_size(rows=2, columns=2, image_size=(64, 64), row_sizes=[(64, 128), (128, 64)])
    images = run.output / "samples" / "step-2"
    assert sorted(path.name for path in images.iterdir()) == ["000-seed7.png", "000-seed8.png", "001-seed0.png", "001-seed1.png"]
    own = Image.open(images / "000-seed8.png")
    shown = json.loads(own.text[SETTINGS_CHUNK])
    assert own.size == (64, 128)
    assert {key: shown[key] for key in ("prompt", "negative_prompt", "seed", "steps", "guidance", "width", "height", "step")} == {
        "prompt": "a sks castle", "negative_prompt": "blurry sks castle", "seed": 8, "steps": 3, "guidance": 5,
        "width": 64, "height": 128, "step": 2,
    }
    plain = json.loads(Image.open(images / "001-seed0.png").text[SETTINGS_CHUNK])
    assert (plain["prompt"], plain["steps"], plain["guidance"], plain["width"], plain["height"]) == (
        "plain sks castle", validation.SAMPLE_STEPS, validation.SAMPLE_GUIDANCE, 128, 64)
    assert "negative_prompt" not in plain and plain["model"] == "tiny-random"
    unvalidated = run_training(tmp_path, "unvalidated", **{**settings, "validate_every": 0})
    assert run.adapter.read_bytes() == unvalidated.adapter.read_bytes()

    from sdtune.training import earlier_run, remove_earlier_run

    (run.output / "samples" / "step-2.png").unlink()
    assert "samples/step-N/" in earlier_run(run.output)  # the images alone are an earlier run's, which --overwrite removes
    remove_earlier_run(run.output)
    assert not images.exists() and earlier_run(run.output) == []


def test_validation_images_name_the_base_adapters_beneath_the_method(tmp_path, tiny_path, fast_sampling):
    """A run on --base-adapters draws its validation on the model with them merged: each image's PNG text names them
    and their strengths as `sdtune sample` names a stack; a run without them names no adapter, as before."""
    import json

    from PIL import Image

    from sdtune.sampling import PARAMETERS_CHUNK, SETTINGS_CHUNK

    base = run_training(tmp_path, "style", steps=1, validate_every=1, validation_images=1)
    plain = Image.open(base.output / "samples" / "step-1" / "000-seed0.png")
    assert "Adapter" not in plain.text[PARAMETERS_CHUNK] and "adapter" not in json.loads(plain.text[SETTINGS_CHUNK])
    on_top = run_training(tmp_path, "on-top", steps=1, validate_every=1, validation_images=1,
                          base_adapters=[f"{base.adapter}:0.5", str(base.output)])
    image = Image.open(on_top.output / "samples" / "step-1" / "000-seed0.png")
    assert "Model: tiny-random, Adapter: style/adapter.safetensors, style, Adapter strength: 0.5, 1," in image.text[PARAMETERS_CHUNK]
    shown = json.loads(image.text[SETTINGS_CHUNK])
    assert (shown["adapter"], shown["adapter_scale"], shown["step"]) == (["style/adapter.safetensors", "style"], [0.5, 1.0], 1)


def test_a_run_drawing_validation_prompts_with_their_own_options_resumes_exactly(tmp_path, tiny_path, monkeypatch):
    from helpers import uninterrupted_and_resumed

    prompts = tmp_path / "prompts.txt"  # each line its own steps: few, and the same in the resumed run
    prompts.write_text("a <castle> --w 64 --h 96 --d 5 --s 2 --n fog\nanother <castle> --l 3 --s 2\n")

    def configure(output, **changes):
        return TrainConfig(**{"model": "tiny-random", "steps": 3, "checkpoint_every": 1, "validate_every": 1, "log_with": "none",
                              "validation_prompts": str(prompts), "validation_height": 72, "output": str(output), **changes})

    whole, resumed = uninterrupted_and_resumed(configure, tmp_path, monkeypatch, 2)
    assert resumed.resumed_from is not None and resumed.losses == whole.losses[2:]
    assert resumed.adapter.read_bytes() == whole.adapter.read_bytes()
    for name in ("000-seed5.png", "001-seed1.png"):  # the last step's images: the same weights draw the same images
        assert (resumed.output / "samples" / "step-3" / name).read_bytes() == (whole.output / "samples" / "step-3" / name).read_bytes()


@pytest.mark.parametrize(
    "line,settings,message",
    [
        ("a castle", dict(validation_width=8), "^validation_width=8 is too small for tiny-random: at least"),
        ("a castle --h 8", dict(), "^{prompts} line 2: --height 8 is too small for tiny-random"),
        ("a castle --s 5000", dict(), "^{prompts} line 2: steps=5000: tiny-random's scheduler has 1000 timesteps"),
        ("a castle --w 12", dict(), "^{prompts} line 2: --w takes the width in pixels, a positive multiple of 8, got '12'"),
    ],
)
def test_validation_sizes_and_steps_are_refused_before_the_model_loads(tmp_path, tiny_path, line, settings, message):
    import re

    from sdtune.training import plan_run

    prompts = tmp_path / "prompts.txt"
    prompts.write_text(f"# sizes\n{line}\n")
    config = TrainConfig(model="tiny-random", output=str(tmp_path / "run"), validate_every=1, validation_prompts=str(prompts), **settings)
    with pytest.raises(SdtuneError, match=re.escape(message.format(prompts=prompts)).replace("\\^", "^")):
        plan_run(config)


def test_validation_width_and_height_are_multiples_of_8(tmp_path):
    with pytest.raises(SdtuneError, match="^validation_height must be a positive multiple of 8, got 100$"):
        TrainConfig(validation_height=100).validate()


def test_the_dry_run_says_the_validation_sizes_drawn(tmp_path, tiny_path):
    """Each size drawn, not the widest width with the tallest height, which lines of 32x48 and 48x32 never draw."""
    from sdtune.training import plan_run
    from sdtune.validation import describe_sizes

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a castle --w 96\na tower\n")
    config = TrainConfig(model="tiny-random", output=str(tmp_path / "run"), validate_every=5, validation_prompts=str(prompts),
                         validation_height=80)
    assert "validation every 5 steps: 2 prompts at 96x80 and 64x80 (1 with settings of their own)" in plan_run(config).summary()
    prompts.write_text("a castle --w 32 --h 48\na tower --w 48 --h 32\na wall --w 32 --h 48\n")
    config = TrainConfig(model="tiny-random", output=str(tmp_path / "run"), validate_every=5, validation_prompts=str(prompts))
    assert "validation every 5 steps: 3 prompts at 32x48 and 48x32 (3 with settings of their own)" in plan_run(config).summary()
    config = TrainConfig(model="tiny-random", output=str(tmp_path / "run"), validate_every=5, resolution=32)
    assert any(line.startswith("validation every 5 steps: 3 prompts at 32x32") for line in plan_run(config).summary())
    assert describe_sizes([(32, 48), (48, 32), (64, 64)]) == "at 32x48, 48x32 and 64x64"
    assert describe_sizes([(32, 48), (96, 64), (48, 32), (40, 96), (72, 80)]) == "at 5 sizes, the largest 96x64"


def test_a_validation_prompt_longer_than_the_text_encoder_reads_is_named_once(tmp_path, tiny_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a <castle> " + "tower " * 80 + "at dusk --s 1\nshort <castle> --s 1\n")
    with pytest.warns(UserWarning) as said:
        run_training(tmp_path, "long", steps=1, validate_every=1, validation_prompts=str(prompts))
    truncated = [str(w.message) for w in said if "truncated" in str(w.message)]
    assert len(truncated) == 1 and truncated[0].startswith("prompt 'a sks castle tower") and "is not read" in truncated[0], truncated


def test_validation_settings_without_validate_every_say_they_draw_nothing(tmp_path, tiny_path):
    """As kohya-ss' --sample_prompts without a period: nothing is drawn, and a warning says so before the model loads
    (raised to Python code, it names settings as the code gives them)."""
    from sdtune.training import plan_run

    config = TrainConfig(model="tiny-random", output=str(tmp_path / "run"), validation_prompts=str(tmp_path / "prompts.txt"),
                         validation_width=96)
    with pytest.warns(UserWarning, match="^validation_prompts, validation_width are used only with validate_every; nothing is drawn$"):
        summary = plan_run(config).summary()
    assert not any(line.startswith("validation every") for line in summary)


def wandb_records(path):
    """The records of an offline W&B run file (a LevelDB-style log of protobuf records, 32 KiB blocks)."""
    import struct

    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    position, block, pieces = 7, 32768, b""
    while position + 7 <= len(data):
        left = block - position % block
        _, length, kind = struct.unpack("<IHB", data[position : position + 7]) if left >= 7 else (0, 0, 0)
        if kind == 0:  # the rest of a block
            position += left
            continue
        pieces += data[position + 7 : position + 7 + length]
        position += 7 + length
        if kind in (1, 4):  # a whole record, or its last piece
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pieces)
            pieces = b""
            yield record


def wandb_history(records) -> list[dict[str, str]]:
    """The logged steps: each a row of key -> JSON value (images as samples/... keys)."""
    return [{i.key or "/".join(i.nested_key): i.value_json for i in r.history.item} for r in records if r.HasField("history")]


def test_wandb_gets_the_steps_settings_and_grids_and_a_resumed_run_goes_on_in_the_same_wandb_run(
    tmp_path, monkeypatch, fast_sampling
):
    wandb = pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    settings = dict(steps=2, validate_every=2, checkpoint_every=2, log_with="tensorboard,wandb", tracker_project="castles")
    run = run_training(tmp_path, "tracked", **settings)
    # run.finish() only asks wandb's service to close the run: the service writes the offline file's records
    # when it does, after train() has returned (a process's exit waits for it); teardown waits for it here
    wandb.teardown()
    run_id = (run.output / "logs" / "wandb-run-id").read_text().strip()
    first = list((run.output / "logs" / "wandb").glob(f"offline-run-*-{run_id}/run-{run_id}.wandb"))
    assert len(first) == 1 and (run.output / "logs" / "castles").is_dir()  # TensorBoard beside W&B

    records = list(wandb_records(first[0]))
    started = next(r.run for r in records if r.WhichOneof("record_type") == "run")
    assert (started.run_id, started.project, started.display_name) == (run_id, "castles", "tracked")
    settings_logged = {i.key: json.loads(i.value_json) for r in records if r.HasField("config") for i in r.config.update}
    assert settings_logged["method"] == "atoms" and settings_logged["steps"] == 2 and settings_logged["seed"] == 0
    history = wandb_history(records)
    assert [int(row["_step"]) for row in history] == [1, 2]
    for row, record in zip(history, read_metrics(run)):
        assert float(row["loss"]) == pytest.approx(record["loss"]) and float(row["grad_norm"]) == pytest.approx(record["grad_norm"])
    assert "val_loss" in history[1] and history[1]["samples/_type"] == '"images/separated"'

    resumed = run_training(tmp_path, "tracked", **{**settings, "steps": 3, "resume": "latest"})
    wandb.teardown()
    again = sorted((resumed.output / "logs" / "wandb").glob(f"offline-run-*-{run_id}/run-{run_id}.wandb"))
    assert len(again) == 2  # a second offline segment of the same W&B run
    later = wandb_history(wandb_records(next(p for p in again if p != first[0])))
    assert [int(row["_step"]) for row in later] == [3]


def test_a_run_that_fails_before_its_loop_leaves_no_tracker_running(tmp_path, monkeypatch):
    """Trackers start with the loop, whose end finishes them however it ends: a resume that fails in the
    set-up starts none (TensorBoard's writer opens its events file when it starts)."""
    from sdtune.training import Trainer

    settings = dict(steps=2, checkpoint_every=2, log_with="tensorboard", tracker_project="castles")
    run = run_training(tmp_path, "tracked", **settings)
    events = sorted((run.output / "logs" / "castles").rglob("events.out.tfevents.*"))
    assert len(events) == 1

    def broken(self):
        raise SdtuneError("the checkpoint's optimizer state does not load")

    monkeypatch.setattr(Trainer, "_resume", broken)
    with pytest.raises(SdtuneError, match="does not load"):
        run_training(tmp_path, "tracked", **{**settings, "steps": 3, "resume": "latest"})
    assert sorted((run.output / "logs" / "castles").rglob("events.out.tfevents.*")) == events


def test_an_interrupt_while_the_trackers_start_is_said_as_an_interrupt(tmp_path, monkeypatch):
    """SIGTERM while TensorBoard's writer is being made (a fraction of a second into `sdtune train`): the
    command says "interrupted" and exits 143, instead of failing on the tracker that never started."""
    from accelerate.tracking import TensorBoardTracker
    from typer.testing import CliRunner

    from sdtune.cli import Terminated, app

    def cut_short(self):
        raise Terminated()

    monkeypatch.setattr(TensorBoardTracker, "start", cut_short)
    result = CliRunner().invoke(app, ["train", "--model", "tiny-random", "--steps", "2", "--resolution", "32",
                                      "--output", str(tmp_path / "run"), "--log-with", "tensorboard"])
    assert result.exit_code == 143 and result.output.strip().splitlines()[-1] == "interrupted", result.output


def test_trackers_are_checked_before_the_model_loads(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from sdtune import tracking
    from sdtune.cli import app

    monkeypatch.setattr(tracking, "installed", lambda package: package == "tensorboard")
    monkeypatch.setattr("sdtune.models.load_pipeline", lambda *a, **k: pytest.fail("loaded the model"))
    base = ("train", "--model", "tiny-random", "--steps", "1", "--output", str(tmp_path / "run"))
    for value, line in [
        ("tensorboard,mlflow", "--log-with mlflow needs the mlflow package (pip install mlflow)"),
        ("comet_ml", "--log-with comet_ml needs the comet_ml package (pip install comet-ml)"),
        ("tensorboard,tensorboard", "--log-with takes none or comma-separated trackers out of tensorboard, wandb"),
        ("neptune", "--log-with takes none or comma-separated trackers"),
    ]:
        result = CliRunner().invoke(app, [*base, "--log-with", value])
        assert result.exit_code == 2 and line in result.output, (value, result.output)
    result = CliRunner().invoke(app, [*base, "--tracker-project", "a/b"])
    assert result.exit_code == 2 and "--tracker-project must be a plain name" in result.output
    assert not (tmp_path / "run").exists()


def test_wandb_without_a_key_fails_before_the_model_loads(tmp_path, monkeypatch):
    wandb = pytest.importorskip("wandb")
    wandb.teardown()  # settings an earlier offline run in this process left (its mode among them)
    from typer.testing import CliRunner

    from sdtune.cli import app

    for name in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_IDENTITY_TOKEN_FILE", "NETRC"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc, no saved W&B settings
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb-config"))
    monkeypatch.setattr("sdtune.models.load_pipeline", lambda *a, **k: pytest.fail("loaded the model"))
    result = CliRunner().invoke(app, ["train", "--model", "tiny-random", "--steps", "1", "--log-with", "wandb",
                                      "--output", str(tmp_path / "run")])
    assert result.exit_code == 2 and "--log-with wandb: No API key configured" in result.output, result.output
    assert "WANDB_MODE=offline" in result.output and not (tmp_path / "run").exists()


def test_validation_loss_is_fixed_for_a_fixed_model(tiny_pipe):
    from contextlib import nullcontext

    from diffusers import DDPMScheduler

    from sdtune.conditioning import PromptConditioning

    pixels = torch.rand(3, 3, 64, 64) * 2 - 1
    embeds = PromptConditioning(tiny_pipe)(["a photo"] * 3, "cpu")
    scheduler = DDPMScheduler.from_config(tiny_pipe.scheduler.config)
    loss = validation.ValidationLoss(pixels, embeds, tiny_pipe.vae, scheduler)
    assert len(loss) == 3 * validation.LOSS_TIMESTEPS
    first = loss(tiny_pipe.unet, nullcontext, "cpu")
    torch.randn(100)  # the global random state does not matter
    assert loss(tiny_pipe.unet, nullcontext, "cpu") == first
    with torch.no_grad():
        for parameter in tiny_pipe.unet.conv_out.parameters():
            parameter.add_(0.05)
    assert loss(tiny_pipe.unet, nullcontext, "cpu") != first


def test_hold_out_and_its_fallback(tmp_path):
    paths = [tmp_path / f"{i}.png" for i in range(8)]
    train_paths, held = validation.hold_out(paths, 2, seed=0)
    assert len(held) == 2 and len(train_paths) == 6 and not set(held) & set(train_paths)
    assert validation.hold_out(paths, 2, seed=0) == (train_paths, held)
    with pytest.warns(UserWarning, match="measured on the training images"):
        assert validation.hold_out(paths[:4], 2, seed=0) == (paths[:4], [])


def test_validation_prompts_fill_the_token(tmp_path):
    from sdtune.data import PromptLine

    config = TrainConfig(concept="castle").resolved(1e-3)
    assert validation.validation_lines(config)[0] == PromptLine("photo of a sks castle.")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("# comment\nthe <castle> at night --n a <castle> by day --d 3\n")
    config = TrainConfig(concept="castle", validation_prompts=str(prompts)).resolved(1e-3)
    assert validation.validation_lines(config) == [
        PromptLine("the sks castle at night", f"{prompts} line 2", negative_prompt="a sks castle by day", seed=3)
    ]


# ---------------------------------------------------------------------------------------------
# Command line


def test_cli_flags_reach_the_config(tmp_path, tiny_path):
    import tomllib

    from typer.testing import CliRunner

    from sdtune.cli import app

    output = tmp_path / "cli"
    args = [
        "train", "--model", "tiny-random", "--steps", "1", "--output", str(output), "--snr-gamma", "5", "--noise-offset", "0.05",
        "--cache-latents", "--mixed-precision", "bf16", "--no-half-vae", "--log-with", "none", "--prior-loss-weight", "0.5",
        "--optimizer", "adam", "--weight-decay", "0", "--adam-beta1", "0.8", "--adam-beta2", "0.99", "--adam-epsilon", "1e-6",
        "--loss-type", "smooth_l1", "--huber-c", "0.3", "--huber-schedule", "constant",
    ]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    written = tomllib.loads((output / "config.toml").read_text())
    assert written["snr_gamma"] == 5 and written["noise_offset"] == 0.05 and written["cache_latents"] is True
    assert written["no_half_vae"] is True and written["log_with"] == "none" and written["prior_loss_weight"] == 0.5
    assert (written["optimizer"], written["weight_decay"], written["adam_beta1"], written["adam_beta2"]) == ("adam", 0, 0.8, 0.99)
    assert written["adam_epsilon"] == 1e-6
    assert (written["loss_type"], written["huber_c"], written["huber_schedule"]) == ("smooth_l1", 0.3, "constant")
    assert "class_prompt" not in written  # no prior preservation without class settings
    assert sorted(p.name for p in output.iterdir()) == ["adapter.safetensors", "config.toml", "metrics.jsonl"]


@pytest.mark.parametrize(
    "args,pattern",
    [
        (("--snr-gamma", "0"), "--snr-gamma must be positive"),
        (("--noise-offset", "-1"), "--noise-offset must be 0 or more"),
        (("--num-class-images", "0"), "--num-class-images must be at least 1"),
        (("--log-with", "tensorboard,nope"), "--log-with takes none or comma-separated trackers"),
        (("--validate-every", "1", "--validation-prompts", "/no/prompts.txt"), "prompt file not found"),
        (("--class-images", "/no/class/dir"), "image folder not found"),
        (("--optimizer", "lion"), "--optimizer must be one of"),
        (("--weight-decay", "-1"), "--weight-decay must be 0 or more"),
        (("--adam-beta2", "1"), "--adam-beta2 must be in [0, 1)"),
        (("--adam-epsilon", "0"), "--adam-epsilon must be positive"),
        (("--loss-type", "l1"), "--loss-type must be one of l2, huber, smooth_l1"),
        (("--min-timestep", "500", "--max-timestep", "500"), "--max-timestep must be above --min-timestep (500), got 500"),
        (("--max-timestep", "1001"), "--max-timestep 1001: tiny-random's scheduler has 1000 timesteps (0 to 999)"),
        (("--min-timestep", "1000"), "--min-timestep 1000: tiny-random's scheduler has 1000 timesteps (0 to 999)"),
        (("--input-perturbation", "-0.1"), "--input-perturbation must be 0 or more"),
        (("--huber-schedule", "cosine"), "--huber-schedule must be one of snr, exponential, constant"),
        (("--loss-type", "huber", "--huber-c", "0"), "--huber-c must be positive and finite"),
        (("--loss-type", "huber", "--huber-c", "1.5"), "--huber-c must be at most 1 with --huber-schedule snr"),
    ],
)
def test_bad_training_options_are_one_line_errors(args, pattern, tmp_path, tiny_path):
    from typer.testing import CliRunner

    from sdtune.cli import app

    result = CliRunner().invoke(app, ["train", "--model", "tiny-random", "--steps", "1", "--output", str(tmp_path / "x"), *args])
    assert result.exit_code == 2, result.output
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and pattern in errors[0], result.stderr


# ---------------------------------------------------------------------------------------------
# CLIP skip


def test_clip_skip_conditions_on_the_layer_diffusers_names(tiny_pipe):
    """--clip-skip k: the text encoder's k-th hidden state from the end through its final layer norm, which is what
    diffusers' pipelines compute for clip_skip k − 1 (run here on the transformers 4 layout its code expects)."""
    from sdtune.conditioning import PromptConditioning, PromptReading, pipeline_prompts

    prompts = ["a photo of a castle", "a red door"]
    last = PromptConditioning(tiny_pipe).encode_prompts(prompts)
    skipped = PromptConditioning(tiny_pipe, reading=PromptReading(clip_skip=2)).encode_prompts(prompts)

    class AsTransformers4(torch.nn.Module):  # CLIPTextModel's shape under transformers 4: layers below text_model
        def __init__(self, text_model):
            super().__init__()
            self.text_model, self.config = text_model, text_model.config
            self.dtype, self.device = text_model.dtype, text_model.device

        def forward(self, *args, **kwargs):
            return self.text_model(*args, **kwargs)

    tiny_pipe.text_encoder = AsTransformers4(tiny_pipe.text_encoder)
    for prompt in prompts:
        theirs, _ = tiny_pipe.encode_prompt(prompt, "cpu", 1, False, clip_skip=1)
        torch.testing.assert_close(skipped[prompt][0], theirs[0], rtol=0, atol=1e-6)
        assert (skipped[prompt][0] - last[prompt][0]).abs().max() > 1e-3, "the penultimate layer differs from the last"
    given = pipeline_prompts(tiny_pipe, prompts, None, PromptReading(clip_skip=2))  # what sampling hands the pipeline
    unconditional, _ = tiny_pipe.encode_prompt("", "cpu", 1, False, clip_skip=1)
    torch.testing.assert_close(given["prompt_embeds"], torch.stack([skipped[p][0] for p in prompts]), rtol=0, atol=1e-6)
    torch.testing.assert_close(given["negative_prompt_embeds"], unconditional.expand(2, -1, -1), rtol=0, atol=1e-6)
    assert pipeline_prompts(tiny_pipe, prompts) == {"prompt": prompts, "negative_prompt": None}  # no skip: as before


def test_pipeline_prompts_takes_one_prompt_and_one_negative_prompt_as_strings(tiny_pipe):
    """As a pipeline takes them: a string is one prompt (not one a character), and one negative prompt serves every
    prompt; a list of negative prompts of another length is refused."""
    from sdtune.conditioning import PromptReading, pipeline_prompts

    reading = PromptReading(clip_skip=2)
    listed = pipeline_prompts(tiny_pipe, ["a castle", "a door"], ["blurry", "blurry"], reading)
    one = pipeline_prompts(tiny_pipe, "a castle", "blurry", reading)
    assert one["prompt_embeds"].shape == (1, 77, 32) and one["negative_prompt_embeds"].shape == (1, 77, 32)
    torch.testing.assert_close(one["prompt_embeds"][0], listed["prompt_embeds"][0], rtol=0, atol=1e-6)
    shared = pipeline_prompts(tiny_pipe, ["a castle", "a door"], "blurry", reading)
    torch.testing.assert_close(shared["negative_prompt_embeds"], listed["negative_prompt_embeds"], rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="3 negative prompts for 2 prompts"):
        pipeline_prompts(tiny_pipe, ["a castle", "a door"], ["a", "b", "c"], reading)


def test_a_run_with_clip_skip_records_it_and_samples_with_it(tmp_path, tiny_path, fast_sampling):
    """The adapter, config.toml, kohya metadata and model card record the clip skip; sampling uses the adapter's
    (its PNG text says so as AUTOMATIC1111 does) unless --clip-skip overrides it; the validation grid draws with it."""
    from PIL import Image
    from safetensors import safe_open

    from sdtune.adapter import read_adapter_info
    from sdtune.conditioning import PromptReading
    from sdtune.config import SampleConfig
    import json

    from sdtune.export import export_adapter
    from sdtune.merging import merge_adapter
    from sdtune.model_card import write_model_card
    from sdtune.sampling import sample

    drawn = []
    original = validation.sample_grid
    validation.sample_grid = lambda *a, **k: drawn.append(a[5:] or k.get("clip_skip")) or original(*a, **k)
    try:
        run = run_training(tmp_path, "skip", clip_skip=2, validate_every=2)
    finally:
        validation.sample_grid = original
    assert drawn == [(PromptReading(clip_skip=2),)]
    assert read_adapter_info(run.adapter)[0].extra["clip_skip"] == "2"
    assert "clip_skip = 2" in (run.output / "config.toml").read_text()
    export_adapter(run.output, "kohya", tmp_path / "skip.safetensors")
    with safe_open(str(tmp_path / "skip.safetensors"), framework="pt") as handle:
        assert handle.metadata()["ss_clip_skip"] == "2"
    assert "| CLIP skip | 2 |" in write_model_card(run.output).output.read_text()
    merged = merge_adapter(run.output, tmp_path / "merged")  # weights cannot hold the clip skip: recorded and said
    assert merged.reading_flags == {str(run.output): "--clip-skip 2"}
    assert json.loads((tmp_path / "merged" / "sdtune_merge.json").read_text())["clip_skip"] == 2

    settings = dict(adapter=str(run.output), prompt=["a <castle> at dawn"], num_images=1, steps=2, overwrite=True)
    own = sample(SampleConfig(output=str(tmp_path / "own"), **settings), progress=False)
    forced = sample(SampleConfig(output=str(tmp_path / "forced"), clip_skip=2, **settings), progress=False)
    last = sample(SampleConfig(output=str(tmp_path / "last"), clip_skip=1, **settings), progress=False)
    pixels = [torch.tensor(list(Image.open(result.images[0]).getdata()), dtype=torch.float32) for result in (own, forced, last)]
    assert torch.equal(pixels[0], pixels[1]) and not torch.equal(pixels[0], pixels[2])
    assert "Clip skip: 2" in Image.open(own.images[0]).text["parameters"]
    # its kohya export samples as the adapter does: read from ss_clip_skip, as kohya-ss trainers record it
    kohya = sample(SampleConfig(output=str(tmp_path / "kohya"), **{**settings, "adapter": str(tmp_path / "skip.safetensors")}),
                   progress=False)
    assert torch.equal(torch.tensor(list(Image.open(kohya.images[0]).getdata()), dtype=torch.float32), pixels[0])
    assert "Clip skip" not in Image.open(last.images[0]).text["parameters"]

    plain = run_training(tmp_path, "plain")  # without it: nothing recorded, bytes as before
    assert merge_adapter(plain.output, tmp_path / "merged-plain").reading_flags == {}
    assert "clip_skip" not in read_adapter_info(plain.adapter)[0].extra
    assert "clip_skip =" not in (plain.output / "config.toml").read_text()
    stack = dict(adapter=[str(run.output), str(plain.output)], prompt=["x"], num_images=1, steps=2)
    with pytest.raises(SdtuneError, match="trained with different --clip-skip"):
        sample(SampleConfig(output=str(tmp_path / "stack"), **stack), progress=False)
    chosen = sample(SampleConfig(output=str(tmp_path / "stack"), clip_skip=2, **stack), progress=False)  # as it says
    assert "Clip skip: 2" in Image.open(chosen.images[0]).text["parameters"]

    # a run trained on it as a base adapter read prompts its own way: stacked on it, it is drawn so, and merged says nothing
    on_top = run_training(tmp_path, "on-top", steps=1, base_adapters=[f"{run.adapter}:0.5"])
    stacked = dict(stack, adapter=[str(run.adapter), str(on_top.output)], adapter_scale=[0.5, 1.0])
    drawn_on_top = sample(SampleConfig(output=str(tmp_path / "on-top-stack"), **stacked), progress=False)
    assert "Clip skip" not in Image.open(drawn_on_top.images[0]).text["parameters"]
    assert merge_adapter([run.adapter, on_top.output], tmp_path / "merged-on-top", scale=[0.5, 1.0]).reading_flags == {}


def test_a_kohya_file_s_record_of_how_it_read_prompts_is_used_where_it_can_be():
    """kohya-ss writes 'None' for an option not given, and its SDXL trainer ignores a clip skip."""
    from types import SimpleNamespace

    from sdtune.sampling import adapters_reading

    def kohya(**metadata):
        return SimpleNamespace(extra={f"ss_{name}": value for name, value in metadata.items()})

    read = adapters_reading(["anime.safetensors"], [kohya(clip_skip="2", max_token_length="225", base_model_version="sd_v1")])
    assert (read.clip_skip, read.max_token_length) == (2, 225)
    read = adapters_reading(["xl.safetensors"], [kohya(clip_skip="2", max_token_length="None", base_model_version="sdxl_base_v1-0")])
    assert (read.clip_skip, read.max_token_length) == (1, 75)


@pytest.mark.parametrize("settings, pattern", [
    (dict(clip_skip=0), "^clip_skip must be at least 1"),
    (dict(clip_skip=3), "^clip_skip=3 skips past the first of tiny-random's 2 text-encoder layers; give at most 2"),
    (dict(clip_skip=2, model="tiny-sdxl-random"), "^clip_skip applies to SD 1.x and 2.x"),
])
def test_clip_skip_the_model_cannot_take_is_refused_before_it_loads(settings, pattern, tmp_path, tiny_path, monkeypatch):
    import sdtune.models

    monkeypatch.setattr(sdtune.models, "load_pipeline", lambda *a, **k: pytest.fail("the model loaded"))
    with pytest.raises(SdtuneError, match=pattern):
        run_training(tmp_path, "refused", **settings)


# ---------------------------------------------------------------------------------------------
# Long prompts: --max-token-length


def test_long_prompts_are_read_in_chunks_of_75_as_kohya_joins_them(tiny_pipe):
    """--max-token-length 150: two chunks of start + 75 tokens + end through the encoder, joined as kohya-ss' sd-scripts
    join them (the first start token, each chunk's 75, the last end token: 152); a prompt within 75 tokens reads its
    first chunk exactly as the one 77-token window (SD 1.x pads with the end token), and the tokens past 75 count."""
    from sdtune.conditioning import PromptConditioning, PromptReading

    short, long = "a photo of a castle", "a castle " + "by the lake with snow on the mountains " * 12
    window = PromptConditioning(tiny_pipe).encode_prompts([short, long])
    chunks = PromptConditioning(tiny_pipe, reading=PromptReading(max_token_length=150)).encode_prompts([short, long])
    assert chunks[short][0].shape == (152, 32) and window[short][0].shape == (77, 32)
    torch.testing.assert_close(chunks[short][0][:76], window[short][0][:76], rtol=0, atol=1e-6)
    ids = tiny_pipe.tokenizer(long, truncation=False).input_ids
    assert 77 < len(ids) <= 152
    encoder = tiny_pipe.text_encoder
    with torch.no_grad():  # by hand: the second chunk is start, tokens 76..150, end
        second_ids = torch.tensor([[ids[0], *ids[76:-1], ids[-1]] + [ids[-1]] * (77 - (len(ids) - 76) - 1)])
        second = encoder(second_ids)[0][0]
    torch.testing.assert_close(chunks[long][0][76:151], second[1:76], rtol=0, atol=1e-6)
    torch.testing.assert_close(chunks[long][0][-1], second[-1], rtol=0, atol=1e-6)


def test_chunks_where_padding_is_not_the_end_token_end_as_kohya_ends_them():
    """SD 2.x and SDXL's second tokenizer pad with another token than the end: a chunk whose text runs to its end gets
    an end token, one with no text reads start, end, padding."""
    from types import SimpleNamespace

    from sdtune.conditioning import chunked

    bos, eos, pad = 1, 2, 0
    tokenizer = SimpleNamespace(eos_token_id=eos, pad_token_id=pad)
    full = torch.tensor([[bos] + list(range(10, 160)) + [eos]])  # 150 tokens of text: both chunks full
    short = torch.tensor([[bos] + list(range(10, 40)) + [eos] + [pad] * 120])  # 30 tokens: the second chunk empty
    both = chunked(torch.cat([full, short]), tokenizer)
    assert both.shape == (2, 2, 77)
    assert both[0, 0].tolist() == [bos, *range(10, 85), eos] and both[0, 1].tolist() == [bos, *range(85, 160), eos]
    assert both[1, 0].tolist() == [bos, *range(10, 40), eos] + [pad] * 44 + [pad]
    assert both[1, 1].tolist() == [bos, eos] + [pad] * 75


def test_a_run_with_long_prompts_records_the_limit_and_samples_with_it(tmp_path, tiny_path, fast_sampling):
    """Training on a long template reads it whole (no truncation warning); the adapter, config.toml and kohya export
    record the limit; sampling reads prompts as training did, SDXL's pooled embeddings too."""
    import warnings

    from PIL import Image
    from safetensors import safe_open

    from sdtune.adapter import read_adapter_info
    from sdtune.config import SampleConfig
    from sdtune.export import export_adapter
    from sdtune.sampling import sample

    template = "{token} " + "by the lake with snow on the mountains " * 12
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*truncated")
        run = run_training(tmp_path, "long", template=template, max_token_length=150, validate_every=2)
    assert read_adapter_info(run.adapter)[0].extra["max_token_length"] == "150"
    from sdtune.training import plan_run

    planned = plan_run(TrainConfig(model="tiny-random", template=template, max_token_length=150, clip_skip=2), output_state=False)
    assert "prompts read with clip skip 2, max token length 150" in planned.summary()
    assert "max_token_length = 150" in (run.output / "config.toml").read_text()
    export_adapter(run.output, "kohya", tmp_path / "long.safetensors")
    with safe_open(str(tmp_path / "long.safetensors"), framework="pt") as handle:
        assert handle.metadata()["ss_max_token_length"] == "150"
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*truncated")
        result = sample(SampleConfig(adapter=str(run.output), prompt=[template.format(token="<castle>")], num_images=1,
                                     steps=2, output=str(tmp_path / "drawn")), progress=False)
    import json

    assert json.loads(Image.open(result.images[0]).text["sdtune"])["max_token_length"] == 150
    xl = sample(SampleConfig(model="tiny-sdxl-random", prompt=["a castle", template.format(token="x")], num_images=1,
                             steps=2, max_token_length=225, negative_prompt="blurry", output=str(tmp_path / "xl")), progress=False)
    assert len(xl.images) == 2
    with pytest.raises(SdtuneError, match="^max_token_length must be one of 75, 150, 225"):
        run_training(tmp_path, "bad", max_token_length=100)
