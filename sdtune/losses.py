"""The denoising loss: noise (with an optional offset), the prediction target, min-SNR-γ weights and
the DreamBooth prior-preservation term.

Min-SNR-γ (Hang et al. 2023, "Efficient Diffusion Training via Min-SNR Weighting Strategy") weights
each example's MSE by min(SNR(t), γ) / SNR(t) for ε-prediction and min(SNR(t), γ) / (SNR(t) + 1) for
v-prediction, with SNR from diffusers' `compute_snr`, as diffusers' train_text_to_image.py does.
Noise offset (Guttenberg 2023) adds a per-image, per-channel constant to the noise so the model learns
to change an image's overall brightness.
Multi-resolution (pyramid) noise (Whitaker 2023, "Multi-Resolution Noise for Diffusion Model Training"), as
kohya-ss' sd-scripts' `pyramid_noise_like`: to the noise n add, for i = 0 … N−1, Gaussian noise drawn at
⌊h/rᵢⁱ⌋×⌊w/rᵢⁱ⌋ (rᵢ uniform in [2, 4), at least 1×1), bilinearly upsampled and scaled by Dⁱ, stopping
after the first 1-pixel side; then divide by the result's standard deviation (over the whole batch).
Debiased estimation (Yu et al. 2023, "Debias the Training of Diffusion Models"), as sd-scripts'
`apply_debiased_estimation`: each example's loss times 1/√SNR(t) under ε-prediction and 1/(SNR(t) + 1) under
v-prediction, SNR(t) clamped at 1000 (infinite at t = 0 on some schedules); with min-SNR-γ both weights apply.

The pseudo-Huber losses (Khrapov et al. 2024, "Improving Diffusion Models's Data-Corruption Resistance
using Scheduled Pseudo-Huber Loss"), as kohya-ss' sd-scripts define them, replace each element's squared
error d² by `huber`: 2c(√(d² + c²) − c), which is d² for |d| ≪ c and 2c|d| for |d| ≫ c, so an outlier
(a badly cropped photo, a watermark) pulls less; or `smooth_l1`: 2(√(d² + c²) − c), d²/c near 0.
Its threshold c follows the timestep: `snr` (the paper's): c_t = (1 − c)/(1 + σ_t)² + c with
σ_t = √((1 − ᾱ_t)/ᾱ_t), near 1 (almost MSE) at low noise and c at high noise; `exponential`:
c_t = c^(t/T); `constant`: c.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

LOSS_TYPES = ("l2", "huber", "smooth_l1")
HUBER_SCHEDULES = ("snr", "exponential", "constant")


def snr_loss_weights(noise_scheduler, timesteps, snr_gamma: float):
    """Per-example min-SNR-γ weights for the scheduler's prediction type."""
    import torch
    from diffusers.training_utils import compute_snr

    snr = compute_snr(noise_scheduler, timesteps)
    clipped = torch.minimum(snr, torch.full_like(snr, snr_gamma))
    prediction_type = noise_scheduler.config.prediction_type
    if prediction_type == "epsilon":
        # a zero-terminal-SNR schedule (rescale_betas_zero_snr) has SNR 0 at its last step, where
        # min(SNR, γ) / SNR tends to 1
        return torch.where(snr > 0, clipped / snr.clamp_min(torch.finfo(snr.dtype).tiny), torch.ones_like(snr))
    if prediction_type == "v_prediction":
        return clipped / (snr + 1)
    if prediction_type == "sample":
        return clipped
    raise ValueError(f"min-SNR weighting does not support prediction type {prediction_type!r}")


DEBIASED_SNR_LIMIT = 1000.0  # sd-scripts' clamp
DEBIASED_PREDICTION_TYPES = ("epsilon", "v_prediction")  # sd-scripts' two


def debiased_loss_weights(noise_scheduler, timesteps):
    """Per-example debiased-estimation weights for the scheduler's prediction type (sd-scripts')."""
    import torch
    from diffusers.training_utils import compute_snr

    snr = torch.clamp(compute_snr(noise_scheduler, timesteps), max=DEBIASED_SNR_LIMIT)
    prediction_type = noise_scheduler.config.prediction_type
    if prediction_type == "epsilon":
        return 1 / torch.sqrt(snr)
    if prediction_type == "v_prediction":
        return 1 / (snr + 1)
    raise ValueError(f"debiased estimation does not support prediction type {prediction_type!r}")


def training_noise(latents, noise_offset: float = 0.0, generator=None, multires_iterations: int = 0,
                   multires_discount: float = 0.3):
    """Gaussian noise like `latents`, plus `noise_offset` times a per-image, per-channel Gaussian constant, then
    with `multires_iterations` the pyramid noise of that (as sd-scripts: offset first, then the pyramid)."""
    import torch

    noise = torch.randn(latents.shape, generator=generator, device=latents.device, dtype=latents.dtype)
    if noise_offset:
        offset = torch.randn(
            (latents.shape[0], latents.shape[1], 1, 1), generator=generator, device=latents.device, dtype=latents.dtype
        )
        noise = noise + noise_offset * offset
    if multires_iterations:
        noise = pyramid_noise(noise, multires_iterations, multires_discount, generator)
    return noise


def pyramid_noise(noise, iterations: int, discount: float, generator=None):
    """`noise` plus `iterations` coarser Gaussian noises, each upsampled and scaled by discountⁱ, normalised to
    unit standard deviation (sd-scripts' `pyramid_noise_like`). The sizes' factors rᵢ come from the CPU RNG (the
    global one unless `generator` is a CPU generator), so the host never waits for the device to size them."""
    import torch
    import torch.nn.functional as F

    batch, channels, height, width = noise.shape
    cpu_generator = generator if generator is not None and generator.device.type == "cpu" else None
    for i in range(iterations):
        r = 2 + 2 * torch.rand((), generator=cpu_generator, dtype=torch.float64).item()  # not always 2×: [2, 4)
        low_height, low_width = max(1, int(height / r**i)), max(1, int(width / r**i))
        coarse = torch.randn((batch, channels, low_height, low_width), generator=generator, device=noise.device, dtype=noise.dtype)
        noise = noise + F.interpolate(coarse, size=(height, width), mode="bilinear") * discount**i
        if low_height == 1 or low_width == 1:
            break  # the coarsest is a single row or column
    return noise / noise.std()


def prediction_target(noise_scheduler, latents, noise, timesteps):
    """What the UNet learns to predict: the noise, the velocity or the clean latents."""
    prediction_type = noise_scheduler.config.prediction_type
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "v_prediction":
        return noise_scheduler.get_velocity(latents, noise, timesteps)
    if prediction_type == "sample":
        return latents
    raise ValueError(f"unknown prediction type {prediction_type!r}")


@dataclass
class LossParts:
    """The loss that is minimised and its parts, for logging."""

    total: object  # scalar tensor
    instance: object
    prior: object | None = None


def per_example_mse(prediction, target):
    """Mean squared error of each example in the batch, in fp32."""
    return ((prediction.float() - target.float()) ** 2).mean(dim=tuple(range(1, prediction.ndim)))


@dataclass(frozen=True)
class ErrorMeasure:
    """How a prediction's error is measured, element by element, before the mean over each example."""

    loss_type: str = "l2"
    huber_c: float = 0.1
    huber_schedule: str = "snr"

    def huber_threshold(self, noise_scheduler, timesteps):
        """Each example's c_t, as `huber_schedule` says (a tensor of the batch's size)."""
        import torch

        if self.huber_schedule == "constant":
            return torch.full(timesteps.shape, self.huber_c, device=timesteps.device)
        if self.huber_schedule == "exponential":
            steps = noise_scheduler.config.num_train_timesteps
            return torch.exp(timesteps.float() * (math.log(self.huber_c) / steps))
        alphas_cumprod = noise_scheduler.alphas_cumprod.to(timesteps.device)[timesteps].float()
        sigmas = ((1 - alphas_cumprod) / alphas_cumprod) ** 0.5
        return (1 - self.huber_c) / (1 + sigmas) ** 2 + self.huber_c

    def per_example(self, prediction, target, noise_scheduler, timesteps, weights=None):
        """Each example's mean error, in fp32; with `weights` (broadcast to the prediction's shape: a masked
        loss's, see masks.py) each example's weighted mean Σ w·e / Σ w."""
        if self.loss_type == "l2" and weights is None:
            return per_example_mse(prediction, target)
        squared = (prediction.float() - target.float()) ** 2
        errors = squared
        if self.loss_type != "l2":
            c = self.huber_threshold(noise_scheduler, timesteps).view(-1, *[1] * (prediction.ndim - 1))
            errors = 2 * squared / ((squared + c**2).sqrt() + c)  # = 2(√(d² + c²) − c), without cancelling digits
            if self.loss_type == "huber":
                errors = c * errors
        dims = tuple(range(1, prediction.ndim))
        if weights is None:
            return errors.mean(dim=dims)
        weights = weights.float().expand_as(errors)
        return (errors * weights).sum(dim=dims) / weights.sum(dim=dims)


def combine_loss(
    errors, timesteps, noise_scheduler, snr_gamma: float | None = None, is_prior=None, prior_loss_weight: float = 1.0,
    debiased_estimation: bool = False,
) -> LossParts:
    """instance loss (min-SNR weighted when `snr_gamma`, debiased-estimation weighted when `debiased_estimation`:
    both multiply, as in sd-scripts) + prior_loss_weight × prior loss.

    `errors` are per-example MSEs; `is_prior` marks the class (prior-preservation) examples. As in
    diffusers' DreamBooth script, min-SNR weights the instance examples and leaves the prior term plain; the
    debiased weights, sd-scripts' own, weight both, as sd-scripts weights its regularisation images.
    Nothing here waits for the device: the two parts are masked means, not selections (whose size the
    host would have to read), and they equal the means of the selected examples.
    """
    if debiased_estimation:
        errors = errors * debiased_loss_weights(noise_scheduler, timesteps)
    if snr_gamma:
        errors_weighted = errors * snr_loss_weights(noise_scheduler, timesteps, snr_gamma)
    else:
        errors_weighted = errors
    if is_prior is None:
        instance_loss = errors_weighted.mean()
        return LossParts(total=instance_loss, instance=instance_loss)
    prior_mask = is_prior.to(errors.dtype)
    instance_mask = 1 - prior_mask
    instance_loss = (errors_weighted * instance_mask).sum() / instance_mask.sum()
    prior_loss = (errors * prior_mask).sum() / prior_mask.sum()
    return LossParts(total=instance_loss + prior_loss_weight * prior_loss, instance=instance_loss, prior=prior_loss)


def denoising_loss(
    unet, noise_scheduler, latents, conditions, noise, timesteps, autocast, snr_gamma=None, is_prior=None,
    prior_loss_weight=1.0, measure: ErrorMeasure = ErrorMeasure(), input_perturbation: float = 0.0, weights=None,
    debiased_estimation: bool = False,
) -> LossParts:
    """Noise `latents` to `timesteps`, predict with the UNet (on `conditions`, a
    `conditioning.UNetConditions`) and compare with the target (`measure`: MSE unless told otherwise; each
    element weighted by `weights`, a masked loss's, before each example's mean).
    With `input_perturbation` γ (Ning et al. 2023, as diffusers' train_text_to_image.py), the input is noised
    with noise + γ·ξ, ξ fresh Gaussian noise, while the target is still made from `noise`."""
    import torch

    applied = noise
    if input_perturbation:
        applied = noise + input_perturbation * torch.randn(noise.shape, device=noise.device, dtype=noise.dtype)
    noisy = noise_scheduler.add_noise(latents, applied, timesteps)
    target = prediction_target(noise_scheduler, latents, noise, timesteps)
    with autocast():
        prediction = unet(noisy, timesteps, **conditions.unet_kwargs()).sample
    errors = measure.per_example(prediction, target, noise_scheduler, timesteps, weights)
    return combine_loss(errors, timesteps, noise_scheduler, snr_gamma, is_prior, prior_loss_weight, debiased_estimation)
