"""The training loop: a frozen Stable Diffusion UNet, one injected method, Hugging Face Accelerate.

Reads top to bottom: resolve the config, check the inputs, load the model, inject the method,
then denoise-and-step for `steps` steps, logging every step and writing the adapter atomically.
"""

from __future__ import annotations

import json
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from .adapter import ADAPTER_FILE, adapter_bytes, save_adapter
from .config import TrainConfig
from .errors import TrainingFailed
from .fileio import ensure_writable_folder, write_text_atomic

FEW_SHOT_IMAGES = (3, 50)


@dataclass
class Run:
    """What a finished training run produced."""

    output: Path
    adapter: Path
    config: TrainConfig
    method: object
    losses: list[float] = field(default_factory=list)
    seconds: float = 0.0
    validation_losses: dict[int, float] = field(default_factory=dict)  # step → validation loss


def train(config: TrainConfig, progress: bool = True) -> Run:
    import torch
    from accelerate.utils import set_seed
    from diffusers import DDPMScheduler
    from tqdm.auto import tqdm

    from . import methods, prior, validation
    from .data import ConceptDataset, load_images, warn_truncated_prompts
    from .datasets import BalancedClassSampler, ClassImageDataset, concept_image_paths, dataset_from_config
    from .latents import CachedLatents, PromptEmbeddings, batch_latents
    from .losses import denoising_loss, training_noise
    from .models import load_pipeline
    from .precision import cast_frozen_parameters, frozen_dtype, place_frozen_models
    from .tracking import PROJECT_NAME, gradient_norm, log_image

    config.validate()
    method = methods.create(config.method, **config.options)  # bad method or options fail first
    config = config.resolved(method.default_lr)
    labelled = dataset_from_config(config) if config.dataset else None  # bad input fails before the model loads
    image_paths = [] if labelled is not None else concept_image_paths(config)
    if config.validation_images and not config.validate_every:
        warnings.warn("--validation-images is used only with --validate-every; no image is held out", stacklevel=2)
    held_out_count = config.validation_images if config.validate_every else 0
    image_paths, held_out_paths = validation.hold_out(image_paths, held_out_count, config.seed)
    sample_prompts = validation.validation_prompts(config) if config.validate_every else []
    output = ensure_writable_folder(config.output)

    accelerator = make_accelerator(config, output)
    set_seed(config.seed)
    pipe = load_pipeline(config.model)
    unet, vae, text_encoder, tokenizer = pipe.unet, pipe.vae, pipe.text_encoder, pipe.tokenizer
    noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    resolution = config.resolution or unet.config.sample_size * pipe.vae_scale_factor
    if labelled is not None:
        dataset = ClassImageDataset(labelled, resolution)  # {"pixels", "prompt"}: each image with its own caption
    else:
        dataset = ConceptDataset(load_images(image_paths, resolution), config.prompt)
        if not FEW_SHOT_IMAGES[0] <= len(dataset) <= FEW_SHOT_IMAGES[1]:
            warnings.warn(f"{len(dataset)} training images; few-shot concepts usually have 3 to 50", stacklevel=2)
    class_dataset = None
    if config.with_prior_preservation:  # class images are drawn by the base model, before the method is injected
        class_paths = prior.class_image_paths(config, pipe, output, resolution, accelerator, progress)
        class_dataset = ConceptDataset(load_images(class_paths, resolution), config.class_prompt)

    vae.requires_grad_(False)
    text_encoder.requires_grad_(False)
    parameters = method.inject(unet)
    ensure_writable_folder(output, needed_bytes=adapter_bytes(method))
    weight_dtype = frozen_dtype(accelerator)
    cast_frozen_parameters(unet, weight_dtype, parameters)  # trainable stay fp32
    optimizer = torch.optim.AdamW(parameters, lr=config.lr, weight_decay=method.weight_decay)
    device = accelerator.device
    place_frozen_models(device, weight_dtype, text_encoder, vae, config.no_half_vae)
    unet.to(device)
    prompt_embeddings = PromptEmbeddings(tokenizer, text_encoder)

    warn_truncated_prompts(tokenizer, dataset.captions if labelled is not None else [config.prompt])
    validation_loss = None
    if config.validate_every and accelerator.is_main_process:
        held_out = ConceptDataset(load_images(held_out_paths, resolution), config.prompt) if held_out_paths else dataset
        prompts = [held_out.example(i, False)["prompt"] for i in range(len(held_out))]
        validation_loss = validation.ValidationLoss(held_out.pixels, prompt_embeddings(prompts, device), vae, noise_scheduler)
    if config.cache_latents:
        dataset = CachedLatents(dataset, vae)
        class_dataset = CachedLatents(class_dataset, vae) if class_dataset else None
        prompt_embeddings.precompute(dataset.prompts() + (class_dataset.prompts() if class_dataset else []))
        vae.to("cpu")  # neither runs again in the loop (validation samples bring them back for a while)
        text_encoder.to("cpu")

    generator = torch.Generator().manual_seed(config.seed)
    train_data, collate = dataset, None
    if class_dataset is not None:
        train_data, collate = prior.PriorPreservationDataset(dataset, class_dataset), prior.collate_with_prior
    # A dataset draws every class equally often; the sampler's indices hold for cached latents too.
    sampler = BalancedClassSampler(labelled.labels, config.seed) if labelled is not None and config.balance_classes else None
    loader = torch.utils.data.DataLoader(
        train_data, batch_size=config.batch_size, shuffle=sampler is None, sampler=sampler, generator=generator,
        collate_fn=collate,
    )
    unet, optimizer, loader = accelerator.prepare(unet, optimizer, loader)
    unet.train()
    if config.log_with != "none":
        accelerator.init_trackers(PROJECT_NAME)

    if accelerator.is_main_process:
        write_text_atomic(output / "config.toml", config.to_toml())
    metrics_path = output / "metrics.jsonl"
    metrics = open(metrics_path, "w", encoding="utf-8") if accelerator.is_main_process else None
    adapter = output / ADAPTER_FILE
    base_model = pipe.sdtune_model_id
    validation_losses: dict[int, float] = {}

    def save() -> None:
        if accelerator.is_main_process:
            save_adapter(adapter, method, base_model, placeholder=config.placeholder, token=config.token or "", step=str(step))

    def validate() -> dict:
        """Validation loss and sample grid, on the main process; the others wait."""
        values = {}
        if accelerator.is_main_process:
            model = accelerator.unwrap_model(unet)
            values["val_loss"] = validation_loss(model, accelerator.autocast, device)
            validation_losses[step] = values["val_loss"]
            grid = validation.sample_grid(pipe, sample_prompts, resolution, device, accelerator.autocast)
            validation.save_grid(grid, output, step)
            log_image(accelerator, "samples", grid, step)
        accelerator.wait_for_everyone()
        return values

    losses: list[float] = []
    bar = tqdm(
        total=config.steps,
        desc=f"train {config.method}",
        unit="step",
        disable=not (progress and accelerator.is_local_main_process),
    )
    start = time.perf_counter()
    step = 0
    try:
        while step < config.steps:
            for batch in loader:
                if step >= config.steps:
                    break
                step_start = time.perf_counter()
                latents = batch_latents(batch, vae)
                noise = training_noise(latents, config.noise_offset)
                timesteps = torch.randint(
                    0, noise_scheduler.config.num_train_timesteps, (latents.shape[0],), device=device
                ).long()
                loss = denoising_loss(
                    unet, noise_scheduler, latents, prompt_embeddings(batch["prompt"], device), noise, timesteps,
                    accelerator.autocast, config.snr_gamma, batch.get("is_prior"), config.prior_loss_weight,
                )
                if not torch.isfinite(loss.total):
                    raise TrainingFailed(
                        f"loss is {loss.total.item()} at step {step + 1}; stopped without saving "
                        f"(the last saved adapter, if any, is kept in {output})"
                    )
                accelerator.backward(loss.total)
                grad_norm = gradient_norm(parameters, accelerator)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                step += 1

                loss_value = accelerator.gather(loss.total.detach()).mean().item()
                losses.append(loss_value)
                seconds = time.perf_counter() - step_start
                values = {"loss": loss_value, "lr": optimizer.param_groups[0]["lr"]}
                if grad_norm is not None:
                    values["grad_norm"] = grad_norm
                if loss.prior is not None:
                    values["instance_loss"] = accelerator.gather(loss.instance.detach()).mean().item()
                    values["prior_loss"] = accelerator.gather(loss.prior.detach()).mean().item()
                if config.validate_every and (step % config.validate_every == 0 or step == config.steps):
                    values.update(validate())
                accelerator.log(values, step=step)
                if metrics:
                    record = {
                        "step": step,
                        **values,
                        "step_seconds": round(seconds, 5),
                        "images_per_second": round(latents.shape[0] * accelerator.num_processes / seconds, 3),
                    }
                    metrics.write(json.dumps(record) + "\n")
                    metrics.flush()
                bar.update(1)
                bar.set_postfix(loss=f"{loss_value:.4f}")
                if config.save_every and step % config.save_every == 0 and step < config.steps:
                    save()
        save()
    finally:
        bar.close()
        if metrics:
            metrics.close()
        accelerator.end_training()
    accelerator.wait_for_everyone()
    elapsed = time.perf_counter() - start
    return Run(
        output=output, adapter=adapter, config=config, method=method, losses=losses, seconds=elapsed,
        validation_losses=validation_losses,
    )


def make_accelerator(config: TrainConfig, output: Path):
    """Accelerate's Accelerator for the run: mixed precision, and TensorBoard logs in OUTPUT/logs."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from accelerate.utils import ProjectConfiguration

    from .tracking import logging_dir

    # Accelerate keeps one state per process; a second run in the same process (the Python API, the
    # tests) may ask for another precision. The process group (PartialState) is kept.
    AcceleratorState._reset_state()
    try:
        return Accelerator(
            mixed_precision=config.mixed_precision,
            log_with=None if config.log_with == "none" else config.log_with,
            project_config=ProjectConfiguration(project_dir=str(output), logging_dir=str(logging_dir(output))),
        )
    except ValueError as error:  # a precision the device lacks
        raise SdtuneError(f"--mixed-precision {config.mixed_precision}: {str(error).splitlines()[0]}") from None
