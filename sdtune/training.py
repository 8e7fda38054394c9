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


def train(config: TrainConfig, progress: bool = True) -> Run:
    import torch
    import torch.nn.functional as F
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from diffusers import DDPMScheduler
    from tqdm.auto import tqdm

    from . import methods
    from .data import ConceptDataset, concept_images, load_images, warn_truncated_prompts
    from .models import load_pipeline

    config.validate()
    method = methods.create(config.method, **config.options)  # bad method or options fail first
    config = config.resolved(method.default_lr)
    image_paths = concept_images(config.concept, config.images)
    output = ensure_writable_folder(config.output)

    accelerator = Accelerator(mixed_precision=config.mixed_precision)
    set_seed(config.seed)
    pipe = load_pipeline(config.model)
    unet, vae, text_encoder, tokenizer = pipe.unet, pipe.vae, pipe.text_encoder, pipe.tokenizer
    noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    resolution = config.resolution or unet.config.sample_size * pipe.vae_scale_factor
    dataset = ConceptDataset(load_images(image_paths, resolution), config.prompt)
    if not FEW_SHOT_IMAGES[0] <= len(dataset) <= FEW_SHOT_IMAGES[1]:
        warnings.warn(f"{len(dataset)} training images; few-shot concepts usually have 3 to 50", stacklevel=2)

    vae.requires_grad_(False)
    text_encoder.requires_grad_(False)
    parameters = method.inject(unet)
    ensure_writable_folder(output, needed_bytes=adapter_bytes(method))
    for parameter in parameters:
        parameter.data = parameter.data.float()  # trainable weights stay fp32 under mixed precision
    optimizer = torch.optim.AdamW(parameters, lr=config.lr, weight_decay=method.weight_decay)
    generator = torch.Generator().manual_seed(config.seed)
    loader = torch.utils.data.DataLoader(dataset, batch_size=config.batch_size, shuffle=True, generator=generator)
    unet, optimizer, loader = accelerator.prepare(unet, optimizer, loader)
    device = accelerator.device
    vae.to(device)
    text_encoder.to(device)
    unet.train()

    warn_truncated_prompts(tokenizer, [config.prompt])
    with torch.no_grad():
        ids = tokenizer(
            config.prompt, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
        ).input_ids.to(device)
        prompt_embeds = text_encoder(ids)[0]

    if accelerator.is_main_process:
        write_text_atomic(output / "config.toml", config.to_toml())
    metrics_path = output / "metrics.jsonl"
    metrics = open(metrics_path, "w", encoding="utf-8") if accelerator.is_main_process else None
    adapter = output / ADAPTER_FILE
    base_model = pipe.sdtune_model_id

    def save() -> None:
        if accelerator.is_main_process:
            save_adapter(adapter, method, base_model, placeholder=config.placeholder, token=config.token, step=str(step))

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
            for pixels in loader:
                if step >= config.steps:
                    break
                step_start = time.perf_counter()
                with torch.no_grad():
                    latents = vae.encode(pixels.to(device, vae.dtype)).latent_dist.sample()
                    latents = latents * vae.config.scaling_factor
                noise = torch.randn_like(latents)
                timesteps = torch.randint(
                    0, noise_scheduler.config.num_train_timesteps, (latents.shape[0],), device=device
                ).long()
                noisy = noise_scheduler.add_noise(latents, noise, timesteps)
                if noise_scheduler.config.prediction_type == "v_prediction":
                    target = noise_scheduler.get_velocity(latents, noise, timesteps)
                else:
                    target = noise
                with accelerator.autocast():
                    prediction = unet(noisy, timesteps, prompt_embeds.expand(latents.shape[0], -1, -1)).sample
                loss = F.mse_loss(prediction.float(), target.float())
                if not torch.isfinite(loss):
                    raise TrainingFailed(
                        f"loss is {loss.item()} at step {step + 1}; stopped without saving "
                        f"(the last saved adapter, if any, is kept in {output})"
                    )
                accelerator.backward(loss)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                step += 1

                loss_value = accelerator.gather(loss.detach()).mean().item()
                losses.append(loss_value)
                seconds = time.perf_counter() - step_start
                if metrics:
                    record = {
                        "step": step,
                        "loss": loss_value,
                        "lr": optimizer.param_groups[0]["lr"],
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
    accelerator.wait_for_everyone()
    elapsed = time.perf_counter() - start
    return Run(output=output, adapter=adapter, config=config, method=method, losses=losses, seconds=elapsed)
