"""The training loop: a frozen Stable Diffusion UNet, one injected method, Hugging Face Accelerate.

Reads top to bottom: resolve the config, check the inputs, lock the output folder, load the model,
inject the method, restore a checkpoint when resuming, then denoise-and-step for `steps` optimiser
steps, logging every step, checkpointing every `checkpoint_every` and writing the adapter atomically.

Exact resume: epoch e's data order and augmentation draws derive from (seed, e), and each
micro-batch's noise, timesteps and latent sample from (seed, step, micro-batch), with that micro-batch
run in a forked RNG so the data stream is never disturbed. A run resumed from a checkpoint therefore
draws exactly what the uninterrupted run drew, and ends with the same adapter bytes (on the same
hardware and library versions).
"""

from __future__ import annotations

import json
import math
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from .adapter import ADAPTER_FILE, adapter_bytes, save_adapter
from .config import TrainConfig
from .errors import SdtuneError, TrainingFailed
from .fileio import OutputLock, ensure_writable_folder, write_text_atomic

FEW_SHOT_IMAGES = (3, 50)
EMA_ADAPTER_FILE = "adapter-ema.safetensors"
DATA_STREAM, STEP_STREAM = 0, 1
# settings that may change on resume without making the run differ from an uninterrupted one
RUN_CONTROL = {"resume", "checkpoint_every", "keep_checkpoints", "save_every", "output"}


@dataclass
class Run:
    """What a finished training run produced."""

    output: Path
    adapter: Path
    config: TrainConfig
    method: object
    losses: list[float] = field(default_factory=list)
    seconds: float = 0.0
    resumed_from: Path | None = None
    validation_losses: dict[int, float] = field(default_factory=dict)  # step → validation loss


def derived_seed(*keys: int) -> int:
    """A 64-bit seed from integer keys (seed, stream, ...), independent for different keys."""
    import numpy as np

    return int(np.random.SeedSequence([k % 2**64 for k in keys]).generate_state(1, np.uint64)[0])


def train(config: TrainConfig, progress: bool = True) -> Run:
    from . import methods, validation
    from .datasets import concept_image_paths, dataset_from_config

    config.validate()
    method = methods.create(config.method, **config.options)  # bad method or options fail first
    resume = config.resume
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
    lock = lock_output(accelerator, output)
    try:
        return _train(
            config, method, labelled, image_paths, held_out_paths, sample_prompts, output, accelerator, resume, progress
        )
    finally:
        lock.release()


def lock_output(accelerator, output: Path) -> OutputLock:
    """Lock the output folder (main process); every process raises the same one-line error if it is taken."""
    from accelerate.utils import broadcast_object_list

    lock, refusal = OutputLock(output), None
    if accelerator.is_main_process:
        try:
            lock.acquire()
        except SdtuneError as error:
            refusal = str(error)
    if accelerator.num_processes > 1:
        refusal = broadcast_object_list([refusal])[0]
    if refusal:
        lock.release()
        raise SdtuneError(refusal)
    return lock


def _train(
    config: TrainConfig, method, labelled, image_paths, held_out_paths, sample_prompts, output: Path, accelerator,
    resume: str | None, progress: bool,
) -> Run:
    import torch
    from accelerate.utils import set_seed
    from diffusers import DDPMScheduler
    from diffusers.optimization import get_scheduler
    from diffusers.training_utils import EMAModel
    from tqdm.auto import tqdm

    from . import prior, validation
    from .checkpoints import list_checkpoints, load_checkpoint, remove_partial_checkpoints, resolve_resume, save_checkpoint
    from .data import ConceptDataset, load_images, warn_truncated_prompts
    from .datasets import BalancedClassSampler, ClassImageDataset
    from .latents import CachedLatents, PromptEmbeddings, batch_latents
    from .losses import denoising_loss, training_noise
    from .models import load_pipeline
    from .precision import cast_frozen_parameters, frozen_dtype, place_frozen_models
    from .tracking import PROJECT_NAME, log_image
    from .version import __version__

    if accelerator.is_main_process:
        remove_partial_checkpoints(output)  # staging folders of a killed run
    resume_from = resolve_resume(resume, output)
    if resume_from is None and list_checkpoints(output):
        raise SdtuneError(
            f"{output} holds checkpoints of an earlier run: add --resume latest to continue it, or choose another --output"
        )
    if resume == "latest" and resume_from is None:
        warnings.warn(f"no checkpoint in {output} yet: starting from step 0", stacklevel=2)

    set_seed(config.seed)
    pipe = load_pipeline(config.model)
    unet, vae, text_encoder, tokenizer = pipe.unet, pipe.vae, pipe.text_encoder, pipe.tokenizer
    noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    resolution = config.resolution or unet.config.sample_size * pipe.vae_scale_factor
    if labelled is not None:
        dataset = ClassImageDataset(labelled, resolution)  # {"pixels", "prompt"}: each image with its own caption
    else:
        dataset = ConceptDataset(load_images(image_paths, resolution), config.prompt, config.random_flip)
        if not FEW_SHOT_IMAGES[0] <= len(dataset) <= FEW_SHOT_IMAGES[1]:
            warnings.warn(f"{len(dataset)} training images; few-shot concepts usually have 3 to 50", stacklevel=2)
    class_dataset = None
    if config.with_prior_preservation:  # class images are drawn by the base model, before the method is injected
        class_paths = prior.class_image_paths(config, pipe, output, resolution, accelerator, progress)
        class_dataset = ConceptDataset(load_images(class_paths, resolution), config.class_prompt, config.random_flip)

    vae.requires_grad_(False)
    text_encoder.requires_grad_(False)
    parameters = method.inject(unet)
    # room for the adapter(s) and, with checkpoints, the newest ones plus one being written
    # (the trained weights, AdamW's two moments, the EMA)
    copies = (config.keep_checkpoints + 1) * (3 + bool(config.ema_decay)) if config.checkpoint_every else 0
    trained_bytes = sum(p.numel() * 4 for p in parameters)
    ensure_writable_folder(output, needed_bytes=adapter_bytes(method) * (1 + bool(config.ema_decay)) + copies * trained_bytes)
    weight_dtype = frozen_dtype(accelerator)
    cast_frozen_parameters(unet, weight_dtype, parameters)  # trainable stay fp32
    if config.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    optimizer = make_optimizer(config, parameters, method.weight_decay)
    # Accelerate steps a prepared scheduler once per process per optimiser step, hence the factors
    lr_scheduler = get_scheduler(
        "constant_with_warmup" if config.lr_scheduler == "constant" and config.lr_warmup_steps else config.lr_scheduler,
        optimizer,
        num_warmup_steps=config.lr_warmup_steps * accelerator.num_processes,
        num_training_steps=config.steps * accelerator.num_processes,
        num_cycles=config.lr_cycles,
    )
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

    data_order = torch.Generator()  # reseeded every epoch (see batches_from)
    train_data, collate = dataset, None
    if class_dataset is not None:
        train_data, collate = prior.PriorPreservationDataset(dataset, class_dataset), prior.collate_with_prior
    # A dataset draws every class equally often; the sampler's indices hold for cached latents too.
    sampler = BalancedClassSampler(labelled.labels) if labelled is not None and config.balance_classes else None
    loader = torch.utils.data.DataLoader(
        train_data, batch_size=config.batch_size, shuffle=sampler is None, sampler=sampler, generator=data_order,
        collate_fn=collate,
    )
    unet, optimizer, loader, lr_scheduler = accelerator.prepare(unet, optimizer, loader, lr_scheduler)
    # checkpoints hold the trainable parameters (trainable.safetensors), not the frozen UNet
    accelerator.register_save_state_pre_hook(lambda models, weights, folder: weights.clear())
    accelerator.register_load_state_pre_hook(lambda models, folder: models.clear())
    ema = EMAModel(parameters, decay=config.ema_decay) if config.ema_decay else None
    unet.train()
    if config.log_with != "none":
        accelerator.init_trackers(PROJECT_NAME)

    step = micro_batches = 0
    if resume_from is not None:
        resumed = load_checkpoint(accelerator, resume_from, parameters, ema, config.optimizer)
        step, micro_batches = resumed["step"], resumed["micro_batches"]
        accelerator.step = 0  # accumulate()'s micro-batch counter, aligned with the loop's
        changed = changed_settings(resumed["config"], config)
        if changed or resumed["num_processes"] != accelerator.num_processes:
            warnings.warn(
                f"resuming with other settings ({changed or 'number of processes'}): "
                "the run will differ from an uninterrupted one",
                stacklevel=2,
            )

    metrics_path = output / "metrics.jsonl"
    metrics = None
    if accelerator.is_main_process:
        write_text_atomic(output / "config.toml", config.to_toml())
        write_text_atomic(metrics_path, metrics_until(metrics_path, step))  # drop steps the checkpoint did not reach
        metrics = open(metrics_path, "a", encoding="utf-8")
    adapter = output / ADAPTER_FILE
    base_model = pipe.sdtune_model_id
    process = accelerator.process_index
    validation_losses: dict[int, float] = {}

    def batches_from(micro_batch: int):
        """Micro-batches from number `micro_batch` on, epoch after epoch; resuming replays the epoch's draws."""
        epoch, skip = divmod(micro_batch, len(loader))
        while True:
            data_order.manual_seed(derived_seed(config.seed, DATA_STREAM, epoch))  # the same order on every process
            if sampler is not None:
                sampler.reseed(derived_seed(config.seed, DATA_STREAM, epoch))
            torch.manual_seed(derived_seed(config.seed, DATA_STREAM, epoch, process))  # the dataset's flips
            for index, batch in enumerate(loader):
                if index >= skip:
                    yield batch
            epoch, skip = epoch + 1, 0

    def check_finite() -> None:
        if not all(bool(torch.isfinite(p).all()) for p in parameters):
            raise TrainingFailed(
                f"trained weights are not finite after step {step}; stopped without saving "
                f"(the last saved adapter and checkpoint, if any, are kept in {output})"
            )

    def save_adapters() -> None:
        if not accelerator.is_main_process:
            return
        extra = dict(placeholder=config.placeholder, token=config.token or "", step=str(step))
        save_adapter(adapter, method, base_model, **extra)
        if ema is not None:  # the EMA weights in the same format, so load_adapter reads them
            ema.store(parameters)
            ema.copy_to(parameters)
            save_adapter(output / EMA_ADAPTER_FILE, method, base_model, ema_decay=str(config.ema_decay), **extra)
            ema.restore(parameters)

    def gathered_mean(values: list) -> float:
        """The mean over a step's micro-batches and over the processes."""
        return accelerator.gather(torch.stack(values).mean()).mean().item()

    def validate() -> dict:
        """Validation loss and sample grid, on the main process; the others wait."""
        values = {}
        if accelerator.is_main_process:
            with torch.random.fork_rng(devices=[]):  # the data stream's RNG stays as if no validation ran
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
        initial=step,
        desc=f"train {config.method}",
        unit="step",
        disable=not (progress and accelerator.is_local_main_process),
    )
    batches = batches_from(micro_batches)
    start = time.perf_counter()
    try:
        while step < config.steps:
            step_start = time.perf_counter()
            lr = optimizer.param_groups[0]["lr"]
            step_losses, instance_losses, prior_losses = [], [], []
            for micro_batch in range(config.gradient_accumulation_steps):
                batch = next(batches)
                micro_batches += 1
                # a forked RNG seeded by (seed, step, micro-batch): same draws after a resume, data stream untouched
                with accelerator.accumulate(unet), torch.random.fork_rng(devices=[]):
                    torch.manual_seed(derived_seed(config.seed, STEP_STREAM, step, micro_batch, process))
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
                            f"(the last saved adapter and checkpoint, if any, are kept in {output})"
                        )
                    accelerator.backward(loss.total)
                    if accelerator.sync_gradients:
                        grad_norm = accelerator.clip_grad_norm_(parameters, config.max_grad_norm or math.inf).item()
                        if accelerator.scaler is None and not math.isfinite(grad_norm):
                            raise TrainingFailed(
                                f"gradient norm is {grad_norm} at step {step + 1}; stopped without saving "
                                f"(the last saved adapter and checkpoint, if any, are kept in {output})"
                            )
                    optimizer.step()
                    lr_scheduler.step()
                    optimizer.zero_grad(set_to_none=True)
                step_losses.append(loss.total.detach())
                if loss.prior is not None:
                    instance_losses.append(loss.instance.detach())
                    prior_losses.append(loss.prior.detach())
            step += 1
            if ema is not None:
                ema.step(parameters)
            loss_value = gathered_mean(step_losses)
            losses.append(loss_value)
            seconds = time.perf_counter() - step_start
            # grad_norm is the norm before clipping; None when an fp16 overflow made the step skip
            values = {"loss": loss_value, "lr": lr, "grad_norm": grad_norm if math.isfinite(grad_norm) else None}
            if prior_losses:
                values.update(instance_loss=gathered_mean(instance_losses), prior_loss=gathered_mean(prior_losses))
            if config.validate_every and (step % config.validate_every == 0 or step == config.steps):
                values.update(validate())
            accelerator.log({k: v for k, v in values.items() if v is not None}, step=step)
            if metrics:
                images = latents.shape[0] * config.gradient_accumulation_steps * accelerator.num_processes
                record = {
                    "step": step,
                    **values,
                    "step_seconds": round(seconds, 5),
                    "images_per_second": round(images / seconds, 3),
                }
                metrics.write(json.dumps(record) + "\n")
                metrics.flush()
            bar.update(1)
            bar.set_postfix(loss=f"{loss_value:.4f}")
            checkpoint_now = config.checkpoint_every and step % config.checkpoint_every == 0
            adapter_now = step < config.steps and (checkpoint_now or (config.save_every and step % config.save_every == 0))
            if checkpoint_now or adapter_now:
                check_finite()  # never save weights a step has already ruined
            if checkpoint_now:
                state = {
                    "micro_batches": micro_batches,
                    "num_processes": accelerator.num_processes,
                    "config": config.to_dict(),
                    "sdtune_version": __version__,
                }
                save_checkpoint(accelerator, output, step, state, parameters, ema, config.keep_checkpoints)
            if adapter_now:
                save_adapters()
        check_finite()
        save_adapters()
        accelerator.wait_for_everyone()
    finally:
        bar.close()
        if metrics:
            metrics.close()
        # The trackers end here, but not the process group (as accelerator.end_training() would): it
        # belongs to the launched process, which may go on to sample.
        for tracker in accelerator.trackers:
            tracker.finish()
    elapsed = time.perf_counter() - start
    return Run(
        output=output, adapter=adapter, config=config, method=method, losses=losses, seconds=elapsed,
        resumed_from=resume_from, validation_losses=validation_losses,
    )


def make_optimizer(config: TrainConfig, parameters: list, method_weight_decay: float):
    """torch.optim's `config.optimizer` over the trainable parameters (decay: the config's, else the method's)."""
    import torch

    decay = method_weight_decay if config.weight_decay is None else config.weight_decay
    betas = (config.adam_beta1, config.adam_beta2)
    if config.optimizer == "adamw":
        return torch.optim.AdamW(parameters, lr=config.lr, betas=betas, eps=config.adam_epsilon, weight_decay=decay)
    if config.optimizer == "adam":  # L2 penalty in the gradient, not decoupled decay
        return torch.optim.Adam(parameters, lr=config.lr, betas=betas, eps=config.adam_epsilon, weight_decay=decay)
    if config.optimizer == "sgd":
        return torch.optim.SGD(parameters, lr=config.lr, momentum=0.9, weight_decay=decay)
    if not hasattr(torch.optim, "Adafactor"):
        raise SdtuneError(f"--optimizer adafactor needs torch 2.5 or newer; this is torch {torch.__version__}")
    return torch.optim.Adafactor(parameters, lr=config.lr, weight_decay=decay)


def changed_settings(saved: dict, config: TrainConfig) -> str:
    """The settings, other than run control (checkpointing, output), that differ from a checkpoint's."""
    current = config.to_dict()
    names = sorted((set(saved) | set(current)) - RUN_CONTROL)
    return ", ".join(f"{n}: {saved.get(n)} -> {current.get(n)}" for n in names if saved.get(n) != current.get(n))


def metrics_until(path: Path, step: int) -> str:
    """The metrics.jsonl lines of steps 1..`step` (a line cut short by a kill is dropped)."""
    if step == 0 or not path.exists():
        return ""
    kept = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and isinstance(record.get("step"), int) and record["step"] <= step:
            kept.append(line + "\n")
    return "".join(kept)


def make_accelerator(config: TrainConfig, output: Path):
    """Accelerate's Accelerator for the run: mixed precision, gradient accumulation, TensorBoard logs in OUTPUT/logs."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from accelerate.utils import GradientAccumulationPlugin, ProjectConfiguration

    from .tracking import logging_dir

    # Accelerate keeps one state per process; a second run in the same process (the Python API, the
    # tests) may ask for another precision. The process group (PartialState) is kept.
    AcceleratorState._reset_state()
    try:
        return Accelerator(
            mixed_precision=config.mixed_precision,
            log_with=None if config.log_with == "none" else config.log_with,
            project_config=ProjectConfiguration(project_dir=str(output), logging_dir=str(logging_dir(output))),
            # an optimiser step every N micro-batches, also across epoch ends, whatever the data size
            gradient_accumulation_plugin=GradientAccumulationPlugin(
                num_steps=config.gradient_accumulation_steps, sync_with_dataloader=False
            ),
        )
    except ValueError as error:  # a precision the device lacks
        raise SdtuneError(f"--mixed-precision {config.mixed_precision}: {str(error).splitlines()[0]}") from None
