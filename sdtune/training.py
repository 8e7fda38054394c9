"""The training loop: a frozen Stable Diffusion UNet, one injected method, Hugging Face Accelerate.

`train(config)` resolves the config, checks the inputs and locks the output folder; a `Trainer` then
reads top to bottom: it sets up (model, data, method injection, optimizer, accelerator.prepare, a
checkpoint's state when resuming), and for `steps` optimiser steps runs `step()` on the device,
reads the step's values on the host (`read()`), logs them and saves what is due: the adapter
atomically, a checkpoint every `checkpoint_every` steps.

With `train_text_encoder`, the method is injected into the text encoder(s) too; they stay on the
device, are prepared by Accelerate, and compute the prompt embeddings in the loop with gradients; their
parameters are the optimizer's second group, at `text_encoder_lr` (SDXL's second encoder's a third, at
`text_encoder_2_lr`, when one is given).

The host never waits for the device inside a step: a step's loss and gradient norm stay on the
device, and the host reads them (one transfer) after it has queued the next step, so the device
always has work. A step after which something is saved or drawn (a checkpoint, the adapter,
validation, the last step) is read at once instead, and its values are checked before anything is
written: a non-finite loss or gradient norm stops the run without saving.

Exact resume: epoch e's data order and augmentation draws derive from (seed, e), and each
micro-batch's noise, timesteps and latent sample from (seed, step, micro-batch), with that micro-batch
run in a forked RNG so the data stream is never disturbed. A run resumed from a checkpoint therefore
draws exactly what the uninterrupted run drew, and ends with the same adapter bytes (on the same
hardware and library versions).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import math
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, NoReturn

from .adapter import ADAPTER_FILE, EMA_ADAPTER_FILE, STEP_ADAPTER, adapter_bytes, save_adapter, step_adapter_name, step_adapters
from .config import TrainConfig, spelled_for_python
from .errors import SdtuneError, TrainingFailed, warn
from .fileio import OutputLock, copy_atomic, counted, ensure_writable_folder, human_bytes, remove_directory, write_text_atomic
from .limits import check_run_fits
from .optimizers import check_optimizer_ready, make_optimizer
from .tracking import LOGS_FOLDER, METRICS_FILE, MetricsLog, check_trackers_ready, log_scalars

FEW_SHOT_IMAGES = (3, 50)
CONFIG_FILE = "config.toml"
DATA_STREAM, STEP_STREAM, EMBEDDING_STREAM = 0, 1, 2
# learning-rate schedules whose rate at a step does not depend on the number of steps
STEP_COUNT_FREE_SCHEDULES = ("constant", "constant_with_warmup")
# settings that may change on resume without making the run differ from an uninterrupted one
RUN_CONTROL = {"resume", "overwrite", "checkpoint_every", "keep_checkpoints", "save_every", "keep_saves", "output", "log_with", "tracker_project"}
# what a run writes in its folder: an earlier run's are refused, or replaced with --overwrite
RUN_FILES = (ADAPTER_FILE, EMA_ADAPTER_FILE, CONFIG_FILE, METRICS_FILE)
RUN_FOLDERS = (LOGS_FOLDER, "checkpoints")
VALIDATION_GRIDS = "samples"  # OUTPUT/samples/step-N.png and its images step-N/ (sample's grid.png and images/ there are not the run's)


@dataclass
class Run:
    """What a finished training run produced: its files, settings and numbers. Not its model: a notebook that trains
    run after run and keeps every `Run` holds none of their UNets; `sdtune.open_adapter(run.adapter, pipeline)` loads
    the trained method back into a pipeline."""

    output: Path  # the run's folder (config.toml, metrics.jsonl, logs, samples)
    adapter: Path  # the adapter file in it
    config: TrainConfig  # the settings as resolved (every default filled in), as config.toml holds them
    description: str  # the trained method, its options and size: "lora (rank=4), 1,234 trainable parameters in 8 layers"
    num_parameters: int  # the method's trained numbers (beside the new token rows: token_numbers)
    losses: list[float] = field(default_factory=list)  # each step's training loss, from the first step this process ran
    seconds: float = 0.0  # wall-clock seconds of the loop
    resumed_from: Path | None = None
    extended_from: int | None = None  # the steps of the finished (or stopped) run this one extended to more
    validation_losses: dict[int, float] = field(default_factory=dict)  # step → validation loss
    token_numbers: int = 0  # numbers the new token rows trained beside the method (--token-embeddings)
    taken_options: dict = field(default_factory=dict)  # method options --init-weights gave (the run did not set them)
    started_fresh: str = ""  # which of the run's UNet layers --init-weights left alone (StartingOptions.started_fresh)
    saves: list[Path] = field(default_factory=list)  # the --save-every files kept in `output` (adapter-step-N), by step
    ema_saves: list[Path] = field(default_factory=list)  # with --ema-decay, their EMA twins (adapter-ema-step-N), by step

    @property
    def method(self):
        raise AttributeError("a Run keeps no trained method: it would keep the run's model alive; run.description says what "
                             "trained, and sdtune.open_adapter(run.adapter, sdtune.models.load_pipeline(run.config.model)) "
                             "loads it back")

    @method.setter
    def method(self, value) -> None:  # `run.method = None`, once the way to let the model go, still does nothing
        if value is not None:
            raise AttributeError("a Run keeps no trained method")


def derived_seed(*keys: int) -> int:
    """A 64-bit seed from integer keys (seed, stream, ...), independent for different keys."""
    import numpy as np

    return int(np.random.SeedSequence([k % 2**64 for k in keys]).generate_state(1, np.uint64)[0])


def seed_global_rng(seed: int, device) -> None:
    """Seed torch's global RNG for a run on `device`: as `torch.manual_seed` does, but on a CPU the CPU's
    generator alone. There `torch.manual_seed` also queues a seed for every accelerator torch was built for
    and has not started, recording a stack trace for each: most of a millisecond a step, for generators
    the run never draws from."""
    import torch

    if torch.device(device).type == "cpu":
        torch.default_generator.manual_seed(seed)
    else:
        torch.manual_seed(seed)


def train(config: TrainConfig, progress: bool = True) -> Run:
    from .models import quiet_libraries

    with quiet_libraries(), open_trainer(config, progress) as trainer:
        return trainer.fit()


@dataclass
class RunPlan:
    """A training run as its settings, inputs and sizes describe it, checked before any weight is read:
    what `sdtune train --dry-run` prints and what `open_trainer` goes on to run."""

    config: TrainConfig  # resolved: the method's default learning rate, the default output, ...
    method: Any  # the method, not yet injected
    inputs: Inputs
    sizes: Any  # limits.RunSizes
    resume: str | None
    overwrite: bool
    start: str  # where the run would start: a new folder, a checkpoint, or over an earlier run (or "not read")
    buckets: list = field(default_factory=list)  # with --buckets: each concept image's (width, height)
    validation_size: tuple[int, int] | None = None  # with --validate-every: the largest (width, height) its images take
    taken_options: dict = field(default_factory=dict)  # the method options --init-weights gave (the run did not set them)
    started_fresh: str = ""  # which of the run's UNet layers --init-weights leaves alone (StartingOptions.started_fresh)
    prediction_type: str = "epsilon"  # what the model's UNet predicts (its scheduler config says): SD 2.x 768's v_prediction
    resumes: bool = False  # from a checkpoint (its tensors, optimizer and schedule), not from --init-weights
    validation_sizes: list = field(default_factory=list)  # with --validate-every: each (width, height) its images take
    image_sizes: list = field(default_factory=list)  # with --buckets: each concept image's (width, height) as shown
    classes: Any = None  # with prior preservation: its class images, as `prior.class_frames` plans them
    text_encoders: int = 1  # the model's (SDXL's 2)

    def _prior_line(self) -> str:
        """Prior preservation's class images for the dry run: from where, how many, with which prompt; with buckets,
        how many class examples each bucket's batches draw on, and which class images none does."""
        from .data import listed
        from .prior import CLASS_IMAGES_FOLDER

        config, (count, frames, unused) = self.config, self.classes
        if config.class_images:
            source = f"{counted(count, 'class image')} from {config.class_images}"
        else:
            source = (f"{counted(count, 'class image')}, drawn by the base model into "
                      f"{Path(config.output) / CLASS_IMAGES_FOLDER} where not there yet")
        line = f"prior preservation: {source}, prompt {config.class_prompt!r}, loss weight {config.prior_loss_weight:g}"
        if config.buckets and frames:
            drawn = [f"{held} ({width}x{height})" for (width, height), held in sorted(frames.items())]
            line += f"; the buckets draw on {', '.join(drawn[:-1])}{' and ' if len(drawn) > 1 else ''}{drawn[-1]} of them"
        if unused:
            line += f"; {len(unused)} unused, of a shape no bucket of concept images draws on: {listed(unused)}"
        return line

    def summary(self) -> list[str]:
        """Lines for a person: what would train, on what, for how long, in how much memory, and where."""
        config, sizes, inputs = self.config, self.sizes, self.inputs
        predicts = " (v-prediction)" if self.prediction_type == "v_prediction" else ""
        lines = [
            f"{self.method.describe()} on {config.model}{predicts} at {sizes.resolution} px: {sizes.trained:,} trained parameters, "
            f"{sizes.unet_frozen + sizes.text_frozen:,} frozen",
        ]
        if config.zero_terminal_snr:
            lines.append("zero terminal SNR: the noise schedule's betas rescaled so its last timestep is pure noise (SNR 0)")
        if inputs.labelled is not None:
            images = len(inputs.labelled)
            lines.append(f"dataset {inputs.labelled.name}: {images:,} images in {len(inputs.labelled.class_names):,} classes, "
                         f"captioned like {inputs.labelled.caption(0)!r}")
        else:
            from .captions import first_line

            images = len(inputs.image_paths)
            held = f", {len(inputs.held_out_paths)} held out for the validation loss" if inputs.held_out_paths else ""
            named = ", ".join(config.concepts)
            templates = [config.concept_prompt(config.concepts[label]) for label in inputs.concept_labels]
            captioned = sum(prompt != template for prompt, template in zip(inputs.prompts, templates))
            several = sum(isinstance(prompt, tuple) for prompt in inputs.prompts)  # caption variants: one drawn each time
            several_note = f"; {several} with several lines, one drawn each time" if several else ""
            own = f"{captioned} with a caption of their own{several_note}" if captioned else ""
            captioned_note = f" ({own})" if own else ""
            examples, named = repr(first_line(inputs.prompts[0])), f" of {named}"
            if len(config.concepts) > 1:  # each concept's count and first prompt, in the order they were given
                counts = [f"{inputs.concept_labels.count(label)} of {name}" for label, name in enumerate(config.concepts)]
                named = " (" + ", ".join(counts) + (f"; {own}" if own else "") + ")"
                captioned_note = ""
                firsts = {label: prompt for label, prompt in reversed(list(zip(inputs.concept_labels, inputs.prompts)))}
                examples = ", ".join(repr(first_line(firsts[label])) for label in sorted(firsts))
            lines.append(f"{counted(images, 'training image')}{named}{captioned_note}{held}; prompts like {examples}")
            if self.buckets:
                from .buckets import described_buckets

                held = {bucket for bucket in self.buckets if bucket is not None}
                lines.append(f"{counted(len(held), 'aspect-ratio bucket')} (width x height): "
                             + described_buckets(self.buckets, self.image_sizes))
            if config.with_prior_preservation:
                lines.append(self._prior_line())
            if config.masked_loss:
                source = "their alpha channels" if config.mask_source == "alpha" else "masks/ beside them"
                lines.append(f"masked loss: masks from {source}, weight {config.unmasked_weight:g} where black")
        if self.validation_size:
            from .validation import describe_sizes

            own = sum(bool(line.options) for line in inputs.sample_lines)
            lines.append(f"validation every {counted(config.validate_every, 'step')}: {counted(len(inputs.sample_lines), 'prompt')} "
                         f"{describe_sizes(self.validation_sizes or [self.validation_size])}"
                         + (f" ({own} with settings of their own)" if own else ""))
        if config.token_embeddings:
            lines.append("new token embeddings: " + "; ".join(f"<{name}> is {token!r}" for name, token in config.concept_tokens.items())
                         + f"; lr {config.embedding_lr:g}, from {config.embedding_init or 'each concept name'}"
                         + (", retracted each step" if config.retract_embeddings else ""))
        accumulated = config.gradient_accumulation_steps
        seen = config.steps * config.batch_size * accumulated
        lines.append(
            f"{counted(config.steps, 'step')} at batch size {config.batch_size}"
            + (f", {accumulated} micro-batches a step" if accumulated > 1 else "")
            + f": {counted(seen, 'image')} drawn, {seen / max(images, 1):.1f} epochs; lr {config.lr:g} ({config.lr_scheduler}), "
            f"{config.optimizer}, mixed precision {config.mixed_precision}"
        )
        if config.base_adapters:
            lines.append("base adapters merged into the frozen model first: " + ", ".join(
                f"{base.path} at {base.strength:g}" for base in config.base_adapter_entries))
        if config.init_weights:
            from .starting_weights import describe_taken

            taken = describe_taken(self.taken_options, self.started_fresh)
            lines.append((f"trained tensors started from {config.init_weights}; resumed, they are the checkpoint's"
                          if self.resumes else f"trained tensors start from {config.init_weights} (a fresh optimizer and schedule)")
                         + (f"; from the file: {taken}" if taken else ""))
        if config.train_text_encoder:
            second = f", SDXL's second encoder lr {config.text_encoder_2_lr:g}" if config.text_encoder_2_lr else ""
            both = self.text_encoders > 1 and not second  # SDXL's two at one rate
            lines.append(f"text encoder{'s' if both else ''} trained too: lr {config.text_encoder_lr:g}{second}")
        if not config.prompt_reading.plain:
            lines.append("prompts read with " + ", ".join(f"{name.replace('_', ' ')} {value}" for name, value in config.prompt_reading.metadata().items()))
        held = ", ".join(sizes.held_in_ram[:-1]) + " and " * (len(sizes.held_in_ram) > 1) + "".join(sizes.held_in_ram[-1:])
        ram = f", and {human_bytes(sizes.host_bytes)} of RAM for {held}" if sizes.host_bytes else ""
        lines.append(f"memory: at least {human_bytes(sizes.device_bytes)} where it computes{ram}")
        if config.save_every and not kept_save_count(config):
            lines.append(f"saves every {counted(config.save_every, 'step')}: no adapter-step-N file is written, as the run "
                         f"ends at step {config.steps:,} first (its adapter.safetensors)")
        elif config.save_every:
            saves, ema = kept_save_count(config), 1 + bool(config.ema_decay)
            kept = f"the newest {config.keep_saves} kept" if config.keep_saves and saves == config.keep_saves else "all kept"
            files = counted(saves, "adapter-step-N file") + (f" and {counted(saves, 'adapter-ema-step-N file')}" if ema > 1 else "")
            lines.append(f"saves every {counted(config.save_every, 'step')}: {files} at the end "
                         f"({kept}), at least {human_bytes(saves * ema * sizes.trained * 4)} beside adapter.safetensors")
        lines.append(f"output: {config.output} ({self.start})")
        return lines


@spelled_for_python("train")
def plan_run(config: TrainConfig, output_state: bool = True) -> RunPlan:
    """Check a run's settings, inputs, sizes and (with `output_state`) output folder without loading the model
    or writing anything. A run itself reads its output folder's state once the folder is locked."""
    from . import methods

    config.validate()
    if config.save_every and config.save_every >= config.steps:  # the last step's save is adapter.safetensors, and none comes before it
        warn(f"--save-every {config.save_every} is not below --steps {config.steps}: no adapter-step-N file is written")
    check_optimizer_ready(config.optimizer)
    taken: dict = {}
    started_fresh = ""
    if config.init_weights:  # the file's options where the run sets none: the method is made with them
        from .starting_weights import init_weights_options, warn_other_prompt_reading

        methods.method_class(config.method)  # an unknown method first
        starting = init_weights_options(config)
        config = dataclasses.replace(config, options=starting.options)
        taken, started_fresh = starting.taken, starting.started_fresh
        warn_other_prompt_reading(config)
    base_bytes = 0
    if config.base_adapters:
        from .starting_weights import base_adapter_bytes, check_base_adapters

        base_bytes = base_adapter_bytes(check_base_adapters(config.base_adapter_entries, config.model))
    method = methods.create(config.method, **config.options)  # bad method or options fail first
    if config.train_text_encoder and not method.trains_text_encoder:
        able = [name for name in methods.available() if methods.method_class(name).trains_text_encoder]
        raise SdtuneError(f"--train-text-encoder: method {method.name!r} cannot train the text encoder; {', '.join(able)} can")
    resume, overwrite = config.resume, config.overwrite
    config = config.resolved(method.default_lr)
    from .image_files import forget_image_facts, image_facts

    forget_image_facts()  # each image's header is read once from here on, kept for the checks that follow
    inputs = read_inputs(config)  # bad input fails before the model loads
    if config.masked_loss:
        from .masks import check_masks

        check_masks(inputs.image_paths, config.mask_source)
    if inputs.labelled is None and (not config.masked_loss or config.mask_source == "alpha"):
        from .masks import warn_masks_unused

        warn_masks_unused(inputs.image_paths + inputs.held_out_paths, config.masked_loss)
    from .limits import check_resolution
    from .models import read_model_configs
    from .prior import CLASS_IMAGES_FOLDER, check_class_images_record, class_frames

    model_configs = read_model_configs(config.model)
    resolution = check_resolution(config.model, model_configs, config.resolution)
    buckets, image_sizes = [], []
    if config.buckets:
        from .buckets import check_buckets, image_buckets

        buckets = image_buckets(config, inputs.image_paths)
        image_sizes = [None if bucket is None else image_facts(path).size for path, bucket in zip(inputs.image_paths, buckets)]
        check_buckets(buckets, config.batch_size, [p.name for p in inputs.image_paths])
    # what training holds in RAM: each image framed at its bucket's size (or the resolution), the class images as framed
    frames = [size for size in buckets if size is not None] if config.buckets else None
    classes = class_frames(config, resolution, buckets)
    sizes = check_run_fits(config, method, len(inputs.image_paths), sum(classes.frames.values()), frames, classes.frames,
                           base_bytes)  # and sizes the model or the machine cannot take
    validation_size, validation_drawn = None, []
    if config.validate_every:  # the validation prompts' sizes and steps (a line's --w, --h, --s too)
        from .validation import check_validation_fits, validation_sizes

        validation_size = check_validation_fits(config, inputs.sample_lines)
        validation_drawn = validation_sizes(config, inputs.sample_lines)
    if config.with_prior_preservation and not config.class_images:  # images drawn before, for another prompt or reading
        check_class_images_record(Path(config.output) / CLASS_IMAGES_FOLDER, config.class_prompt, config.prompt_reading)
    if config.token_embeddings:  # the new tokens' names and initializer words, from the tokenizer(s) alone
        from .token_embeddings import check_tokenizers, load_tokenizers

        check_tokenizers(config, load_tokenizers(config.model))
    if inputs.labelled is None:
        from .data import warn_cropped_away, warn_upscaled_images

        # a square where there are no buckets: only the aspect ratio of the frame matters
        warn_cropped_away(inputs.image_paths, buckets or [(1, 1)] * len(inputs.image_paths), "" if config.buckets else ", or add --buckets")
        warn_upscaled_images(inputs.image_paths, buckets if config.buckets else [(resolution, resolution)] * len(inputs.image_paths))
        if not config.buckets:  # with buckets, held-out images are framed square for the loss alone: trained at no size
            warn_upscaled_images(inputs.held_out_paths, [(resolution, resolution)] * len(inputs.held_out_paths), "held-out image")
    if config.with_prior_preservation and config.class_images and not config.buckets:  # framed square (bucketed ones are named as they are framed)
        from .data import list_images, readable_images, warn_upscaled_images
        from .prior import class_image_count

        with warnings.catch_warnings():  # files that are no image were named by class_frames
            warnings.simplefilter("ignore")
            class_paths = readable_images(list_images(config.class_images), "class image")[:class_image_count(config)]
        warn_upscaled_images(class_paths, [(resolution, resolution)] * len(class_paths), "class image")
    checkpoint, earlier = run_start(Path(config.output), resume, overwrite, config) if output_state else (None, [])
    if not output_state:
        start = "not read"
    elif checkpoint is not None:
        start = resume_start(checkpoint, config)
    elif earlier:
        start = f"replaces an earlier run: {', '.join(earlier)}"
    else:
        start = "a new run"
    return RunPlan(config, method, inputs, sizes, resume, overwrite, start, buckets, validation_size, taken, started_fresh,
                   model_configs.scheduler.get("prediction_type", "epsilon"), resumes=checkpoint is not None,
                   validation_sizes=validation_drawn, image_sizes=image_sizes, classes=classes,
                   text_encoders=len(model_configs.text_encoders))


def kept_save_count(config: TrainConfig) -> int:
    """How many --save-every files (adapter-step-N) a run's folder holds at its end (each EMA one besides)."""
    saves = (config.steps - 1) // config.save_every if config.save_every else 0  # the last step's is adapter.safetensors
    return min(saves, config.keep_saves) if config.keep_saves else saves


def resume_start(checkpoint, config: TrainConfig) -> str:
    """Where a resumed run starts and how it goes on, for a person (the dry run's words)."""
    kind, changes = continuation(checkpoint.state["config"], config)
    if kind == "extends":
        saved_steps = checkpoint.state["config"].get("steps", TrainConfig.steps)
        return (f"extends a run of {counted(saved_steps, 'step')} to {config.steps:,} from {checkpoint.folder}, ending as a run "
                f"of {counted(config.steps, 'step')} trained in one go would")
    if kind == "differs":
        return f"resumes from {checkpoint.folder} with other settings ({changes}): it will differ from an uninterrupted run"
    return f"resumes from {checkpoint.folder}"


def run_start(output: Path, resume: str | None, overwrite: bool, config: TrainConfig):
    """(the checked checkpoint to resume from or None, the earlier run's files a fresh run replaces). A fresh
    run into a folder with an earlier run's files (with or without checkpoints) is refused unless `overwrite`."""
    from .checkpoints import list_checkpoints, select_checkpoint

    checkpoint = select_checkpoint(resume, output, config)
    earlier = []
    if not resume:
        earlier = earlier_run(output)
        if earlier and overwrite:
            check_not_replacing_inputs(output, config)
        if earlier and not overwrite:
            if list_checkpoints(output):
                raise SdtuneError(
                    f"{output} holds checkpoints of an earlier run: add --resume latest to continue it, "
                    "--overwrite to replace it, or choose another --output"
                )
            raise SdtuneError(
                f"{output} holds an earlier run ({', '.join(earlier)}): add --overwrite to replace it, "
                "or choose another --output"
            )
    return checkpoint, earlier


@contextlib.contextmanager
def open_trainer(config: TrainConfig, progress: bool = True) -> Iterator["Trainer"]:
    """A `Trainer` set up for `config`, its output folder locked while the block runs (what `train` runs,
    and what a benchmark steps through with `advance`)."""
    plan = plan_run(config, output_state=False)  # the output folder is read under its lock, by the Trainer
    config, method, inputs = plan.config, plan.method, plan.inputs
    resume, overwrite = plan.resume, plan.overwrite
    check_trackers_ready(config.log_with)  # a tracker's login, before the model loads
    output = ensure_writable_folder(config.output)

    from .distributed import lock_on_main_process

    accelerator = make_accelerator(config, output)
    lock, trainer = OutputLock(output), None
    try:  # taken inside the try: an interrupt just after it is taken still releases it
        lock_on_main_process(accelerator, lock)  # every process raises the same one-line error if it is taken
        if accelerator.is_main_process:
            sweep_run_folder(lock)
        trainer = Trainer(config, method, inputs, accelerator, output, resume=resume, overwrite=overwrite, progress=progress)
        trainer.taken_options, trainer.started_fresh = plan.taken_options, plan.started_fresh
        yield trainer
    finally:
        if trainer is not None:
            trainer.stop_data_workers()
        lock.release()


@dataclass
class Inputs:
    """What a run trains and validates on, read and checked before the model loads."""

    labelled: Any  # a LabelledDataset when training on a whole dataset, else None
    image_paths: list[Path]  # the concepts' training images
    held_out_paths: list[Path]  # the concepts' images held out for the validation loss
    sample_lines: list  # the validation samples' prompts, each with its line's options (data.PromptLine)
    # each training image's prompt: its caption (a tuple of its lines where it has several), else the template's
    prompts: list = field(default_factory=list)
    held_out_prompts: list = field(default_factory=list)
    concept_labels: list[int] = field(default_factory=list)  # each training image's concept (index into config.concepts)

    @property
    def sample_prompts(self) -> list[str]:
        return [line.prompt for line in self.sample_lines]


def read_inputs(config: TrainConfig) -> Inputs:
    """The run's images (some held out with --validation-images) or labelled dataset, and validation prompts."""
    from . import validation
    from .datasets import dataset_from_config

    labelled = dataset_from_config(config) if config.dataset else None
    images = [] if labelled is not None else concept_inputs(config)
    if config.validation_images and not config.validate_every:
        warn("--validation-images is used only with --validate-every; no image is held out")
    drawing = [f"--{name.replace('_', '-')}" for name in ("validation_prompts", "validation_width", "validation_height", "validation_dtype")
               if getattr(config, name) is not None]
    if drawing and not config.validate_every:  # kohya-ss' --sample_prompts likewise draws nothing without a period
        warn(f"{', '.join(drawing)} {'is' if len(drawing) == 1 else 'are'} used only with --validate-every; nothing is drawn")
    held_out_count = config.validation_images if config.validate_every else 0
    training, held_out = validation.hold_out(images, held_out_count, config.seed)
    sample_lines = validation.validation_lines(config) if config.validate_every else []
    inputs = Inputs(labelled, [p for p, _, _ in training], [p for p, _, _ in held_out], sample_lines,
                    prompts=[t for _, t, _ in training], held_out_prompts=[t for _, t, _ in held_out],
                    concept_labels=[c for _, _, c in training])
    return inputs


def concept_inputs(config: TrainConfig) -> list[tuple[Path, str | tuple[str, ...], int]]:
    """(image, prompt, concept index) of every concept's images: a caption beside the image (or in the
    folder's metadata.jsonl) with placeholders filled (each line of one of several), else the template's prompt for
    the concept."""
    from .captions import check_keep_tokens, read_captions, warn_captions_of_no_image
    from .data import fill_placeholders, image_extensions, readable_images, warn_duplicates
    from .datasets import concept_images

    concepts = config.concepts
    folders = config.images if isinstance(config.images, list) else [config.images] * len(concepts)
    tokens = config.concept_tokens if len(concepts) > 1 else config.token or f"sks {concepts[0]}"
    found = []
    for label, (concept, folder) in enumerate(zip(concepts, folders)):
        listed = concept_images(concept, folder, config.data_root)
        paths = readable_images(listed)  # files that are no image are skipped, and counted, before the model loads
        if not paths:
            raise SdtuneError(f"no readable images in {listed[0].parent} ({len(listed)} file(s) could not be read)")
        captions = read_captions(paths)
        warn_captions_of_no_image(listed[0].parent, image_extensions())
        if config.varied_captions:  # a template's prompt is no list of tags: only captions are checked
            check_keep_tokens([(path, caption) for path, caption in zip(paths, captions) if caption], config.keep_tokens)
        for path, caption in zip(paths, captions):
            if isinstance(caption, tuple):
                prompt = tuple(fill_placeholders(line, tokens) for line in caption)
            else:
                prompt = fill_placeholders(caption, tokens) if caption else config.concept_prompt(concept)
            found.append((path, prompt, label))
    warn_duplicates([path for path, _, _ in found])
    return found


def sweep_run_folder(lock: OutputLock) -> None:
    """Remove the temporaries a killed run left in its folder (the lock is held: they are older than it)."""
    from .prior import CLASS_IMAGES_FOLDER
    from .sampling import IMAGE_NAME

    output = lock.folder
    lock.sweep(lambda name: name in RUN_FILES + RUN_FOLDERS + (VALIDATION_GRIDS, CLASS_IMAGES_FOLDER) or STEP_ADAPTER.match(name))
    lock.sweep(lambda name: name.startswith("step-") and name.endswith(".png"), output / VALIDATION_GRIDS)
    for images in validation_image_folders(output):
        lock.sweep(lambda name: IMAGE_NAME.match(name) is not None, images)
    lock.sweep(lambda name: name.startswith("class-"), output / CLASS_IMAGES_FOLDER)
    lock.sweep(lambda name: name.startswith("step-"), output / "checkpoints")


def check_not_replacing_inputs(output: Path, config: TrainConfig) -> None:
    """No run writes onto its own input: an --init-weights or --base-adapters file that is one of the earlier run's
    files, which --overwrite replaces, is refused (it would be gone, and the new adapter's record of it with it)."""
    from .adapter import adapter_path

    replaced = [(output / name).resolve() for name in RUN_FILES + RUN_FOLDERS] + [path.resolve() for _, path in step_adapters(output)]
    inputs = ([("--init-weights", config.init_weights)] if config.init_weights else []) + [
        ("--base-adapters", base.path) for base in config.base_adapter_entries]
    for flag, given in inputs:
        path = adapter_path(given).resolve()
        if any(path == earlier or earlier in path.parents for earlier in replaced):
            raise SdtuneError(f"{flag} {given} is the earlier run's in {output}, which --overwrite replaces: copy it out of "
                              "the folder first, or choose another --output")


def earlier_run(output: Path) -> list[str]:
    """The files and folders of an earlier run in `output`."""
    found = [name for name in RUN_FILES + RUN_FOLDERS if (output / name).exists()]
    if step_adapters(output):
        found.append("adapter-step-N.safetensors")
    grids = output / VALIDATION_GRIDS
    if grids.is_dir() and any(grids.glob("step-*.png")):
        found.append(f"{VALIDATION_GRIDS}/step-N.png")
    if validation_image_folders(output):
        found.append(f"{VALIDATION_GRIDS}/step-N/")
    return found


def validation_image_folders(output: Path) -> list[Path]:
    """OUTPUT/samples/step-N: each validation's images, beside its grid step-N.png."""
    grids = output / VALIDATION_GRIDS
    return [path for path in grids.glob("step-*") if path.is_dir() and path.name[5:].isdigit()] if grids.is_dir() else []


def remove_earlier_run(output: Path) -> None:
    """Remove what an earlier run wrote (class images, sampled images and evaluations stay)."""
    for name in RUN_FILES:
        (output / name).unlink(missing_ok=True)
    for _, path in step_adapters(output):
        path.unlink(missing_ok=True)
    for name in RUN_FOLDERS:
        remove_directory(output / name)
    for grid in (output / VALIDATION_GRIDS).glob("step-*.png"):
        grid.unlink(missing_ok=True)
    for images in validation_image_folders(output):
        remove_directory(images)


@dataclass
class StepResult:
    """What one optimiser step left for the host to read: its values stay on the device until `Trainer.read`."""

    step: int  # the optimiser step (from 1)
    started: float  # time.perf_counter() when the step began
    lr: float  # the learning rate the step used
    text_encoder_lr: float | None = None  # with a trained text encoder: its group's
    text_encoder_2_lr: float | None = None  # with SDXL's second text encoder at its own rate: its group's
    embedding_lr: float | None = None  # with new token embeddings: their group's
    losses: list = field(default_factory=list)  # each micro-batch's loss (a tensor)
    instance_losses: list = field(default_factory=list)  # with prior preservation: the concept images' part
    prior_losses: list = field(default_factory=list)  # and the class images' part
    grad_norm: Any = None  # the norm before clipping (a tensor); not finite when an fp16 overflow skipped the step
    images: int = 0  # images the step trained on, over every micro-batch and process
    seconds: float = 0.0  # from the end of the previous step (or this one's start) until the host has read its values


class Trainer:
    """One training run: the constructor sets it up, `fit()` runs it.

    Each step, `step()` queues the micro-batches on the device, `read()` brings the step's values to
    the host, `check_finite` stops at a non-finite one, `log()` writes them and `save_due()` saves what
    is due. `advance()` runs one step and reads the step before it while this one runs, so the host
    waits only for work the device has already been given; a step after which something is saved or
    drawn is read at once (`save_or_validation_due`), before any file is written.
    """

    def __init__(
        self, config: TrainConfig, method, inputs: Inputs, accelerator, output: Path, *,
        resume: str | None = None, overwrite: bool = False, progress: bool = True,
    ):
        from accelerate.utils import set_seed

        self.config, self.method, self.inputs, self.accelerator = config, method, inputs, accelerator
        self.output, self.progress = output, progress
        self.process = accelerator.process_index
        self.global_step = 0  # optimiser steps done
        self.micro_batches = 0  # micro-batches drawn (the data stream's position)
        self.losses: list[float] = []  # each step's loss (the steps of this run, not those before a resume)
        self.validation_losses: dict[int, float] = {}
        self.metrics: MetricsLog | None = None
        self.bar = None
        self.pending: StepResult | None = None  # a step queued on the device whose values the host has not read
        self.last_read = 0.0  # time.perf_counter() when the host last read a step's values
        self.replaces: list[str] = []  # an earlier run's files that --overwrite replaces
        self._one_group: bool | None = None  # see _parameters_in_one_group
        self.gradients_in_graph_memory = False  # see _compile_unet
        self.taken_options: dict = {}  # method options --init-weights gave (open_trainer sets them)
        self.started_fresh = ""  # which of the run's UNet layers --init-weights left alone (open_trainer sets it)
        # what the adapter records of the files the run started from (their names and digests), read once
        from .adapter_info import BASE_ADAPTERS_KEY, INIT_WEIGHTS_KEY
        from .starting_weights import base_adapter_records, file_record

        self.starting_records: dict[str, str] = {}
        if config.base_adapters:
            self.starting_records[BASE_ADAPTERS_KEY] = json.dumps(base_adapter_records(config.base_adapter_entries))
        if config.init_weights:
            self.starting_records[INIT_WEIGHTS_KEY] = json.dumps(file_record(config.init_weights))

        self.checkpoint = self._find_checkpoint(resume, overwrite)
        self.resume_from = self.checkpoint.folder if self.checkpoint is not None else None
        self.extended_from: int | None = None  # the steps of the run a resume extends (more steps, see continuation)
        set_seed(config.seed)
        self._load_model()
        self._load_data()
        self._inject_method()
        self._make_optimizer()
        self._place_models()
        self._prepare_data()
        self._replace_earlier_run()
        self._prepare()
        if self.checkpoint is not None:
            self._resume()
            self._drop_saves_after(self.global_step)
        self.batches = self._batches_from(self.micro_batches)

    # -----------------------------------------------------------------------------------------
    # Set up

    def _find_checkpoint(self, resume: str | None, overwrite: bool):
        """The checked checkpoint to resume from, if any. A fresh run into a folder with an earlier run's
        files (with or without checkpoints) is refused; with `overwrite` they are replaced, once the
        set-up has checked the inputs, so a refused run replaces nothing."""
        from .checkpoints import remove_partial_checkpoints

        output, accelerator = self.output, self.accelerator
        if accelerator.is_main_process:
            remove_partial_checkpoints(output)  # staging folders of a killed run
        checkpoint, self.replaces = run_start(output, resume, overwrite, self.config)  # replaced once every input is checked
        if resume == "latest" and checkpoint is None:
            warn(f"no checkpoint in {output} yet: starting from step 0")
        return checkpoint

    def _replace_earlier_run(self) -> None:
        """With --overwrite, remove an earlier run's files, now that the inputs are known to be good and
        before this run writes its own (the trackers open their log files next)."""
        if self.replaces and self.accelerator.is_main_process:
            remove_earlier_run(self.output)
        self.accelerator.wait_for_everyone()

    def _load_model(self) -> None:
        from diffusers import DDPMScheduler

        from . import models
        from .sampling import zero_snr_scheduler

        self.pipe = pipe = models.load_pipeline(self.config.model)
        self.unet, self.vae, self.tokenizer = pipe.unet, pipe.vae, pipe.tokenizer
        self.text_encoders = models.text_encoders(pipe)  # SDXL: two
        if self.config.zero_terminal_snr:  # diffusers' rescale (Lin et al. 2023); the grids sample as its paper says
            self.noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config, rescale_betas_zero_snr=True)
            pipe.scheduler = zero_snr_scheduler(pipe.scheduler)
        else:
            self.noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
        self.resolution = self.config.resolution or self.unet.config.sample_size * pipe.vae_scale_factor
        if self.config.base_adapters:  # merged into the frozen weights before anything (class images too) uses them
            from .adapter import load_adapters

            bases = self.config.base_adapter_entries
            load_adapters([base.path for base in bases], pipe, [base.strength for base in bases])

    def _load_data(self) -> None:
        """The training images (and the class images, drawn by the base model before the method is injected)."""
        from . import masks, prior
        from .buckets import bucket_sizes, check_buckets
        from .data import ConceptDataset, load_framed_images
        from .datasets import ClassImageDataset

        config, inputs, resolution = self.config, self.inputs, self.resolution
        if inputs.labelled is not None:
            self.dataset = ClassImageDataset(inputs.labelled, resolution)  # {"pixels", "prompt"}: each image with its own caption
        else:
            skipped: list[Path] = []
            mask_of = functools.partial(masks.upright_mask, source=config.mask_source) if config.masked_loss else None
            # an image smaller than its frame was named as the run was planned (data.warn_upscaled_images)
            framed = load_framed_images(inputs.image_paths, resolution, bucket_sizes(resolution) if config.buckets else None, skipped, mask_of,
                                        warn_upscaled=False)
            kept = [i for i, path in enumerate(inputs.image_paths) if path not in skipped]
            for each, index in zip(framed, kept) if config.masked_loss else ():
                masks.check_framed_mask(each.mask, inputs.image_paths[index].name)
            self.image_paths = [inputs.image_paths[i] for i in kept]
            self.image_prompts = [inputs.prompts[i] for i in kept]
            self.concept_labels = [inputs.concept_labels[i] for i in kept]
            self.dataset = ConceptDataset(framed, self.image_prompts, config.random_flip, config.masked_loss)
            if config.buckets:  # checked before the model loaded, from the images' headers; again as decoded
                check_buckets(self.dataset.sizes, config.batch_size, [inputs.image_paths[i].name for i in kept])
            if not FEW_SHOT_IMAGES[0] <= len(self.dataset) <= FEW_SHOT_IMAGES[1]:
                warn(f"{len(self.dataset)} training images; few-shot concepts usually have 3 to 50")
        self.class_dataset, self.class_pools, self.class_paths = None, None, []
        if config.with_prior_preservation:
            class_paths = prior.class_image_paths(config, self.pipe, self.output, resolution, self.accelerator, self.progress)
            self.class_paths = class_paths
            if config.buckets:  # each bucket's batches draw class examples of their own size (see prior.py)
                framed, self.class_pools = prior.bucketed_class_images(class_paths, resolution, self.dataset.sizes, config.batch_size)
            else:
                # given ones were named as the run was planned; drawn ones are of the resolution
                framed = load_framed_images(class_paths, resolution, what="class image", warn_upscaled=not config.class_images)
            self.class_dataset = ConceptDataset(framed, config.class_prompt, config.random_flip, config.masked_loss)  # weight 1

    def _inject_method(self) -> None:
        """Inject the method into the UNet (and the text encoders it trains); check there is room for what the
        run writes; freeze the rest in its dtype."""
        from .precision import cast_frozen_parameters, frozen_dtype

        config, method = self.config, self.method
        self.vae.requires_grad_(False)
        for text_encoder in self.text_encoders:
            text_encoder.requires_grad_(False)
        # with --train-text-encoder the method tunes them too: they run in the loop, with gradients
        self.trained_encoders = list(self.text_encoders) if config.train_text_encoder else []
        if config.init_weights:  # its base model, by the weights before the method wraps them
            from .starting_weights import check_init_weights_base

            check_init_weights_base(config.init_weights, method, self.unet, self.trained_encoders)
        self.parameters = parameters = method.inject(self.unet, self.trained_encoders)
        if config.init_weights:  # a resumed run then loads its checkpoint's tensors over these
            from .starting_weights import load_init_weights

            load_init_weights(config.init_weights, method, self.pipe)
        # new token embeddings: rows of every text encoder, which then runs in the loop (trained or not)
        self.token_parameters = []
        if config.token_embeddings:
            from .token_embeddings import add_trainable_tokens

            self.token_parameters = add_trainable_tokens(self.pipe, config, derived_seed(config.seed, EMBEDDING_STREAM))
        self.loop_encoders = list(self.text_encoders) if self.trained_encoders or self.token_parameters else []
        # room for the adapter(s) and, with checkpoints, the newest ones plus one being written
        # (the trained weights, AdamW's two moments, the EMA)
        copies = (config.keep_checkpoints + 1) * (3 + bool(config.ema_decay)) if config.checkpoint_every else 0
        trained_bytes = sum(p.numel() * 4 for p in parameters)
        saves = kept_save_count(config) * adapter_bytes(method) // 2  # adapter_bytes counts an atomic rewrite's two
        needed = (adapter_bytes(method) + saves) * (1 + bool(config.ema_decay)) + copies * trained_bytes
        ensure_writable_folder(self.output, needed_bytes=needed)
        self.weight_dtype = frozen_dtype(self.accelerator)
        for model in (self.unet, *self.trained_encoders):
            cast_frozen_parameters(model, self.weight_dtype, parameters)  # trainable stay fp32
        if config.gradient_checkpointing:
            self.unet.enable_gradient_checkpointing()
        if config.compile:
            self._compile_unet()

    def _compile_unet(self) -> None:
        """torch.compile the UNet in place (the module, its parameters and the method's layers stay as they are) in
        --compile-mode. Under CUDA graphs every call of it begins a new step (`mark_each_call_a_step`)."""
        from .config import CUDA_GRAPH_COMPILE_MODES

        mode, device = self.config.compile_mode, self.accelerator.device
        graphs = mode in CUDA_GRAPH_COMPILE_MODES
        if graphs and not records_cuda_graphs(device):  # Inductor skips the graphs there; the mode's other choices still apply
            warn(f"--compile-mode {mode}: CUDA graphs need a CUDA device; the UNet compiles without them on {device.type}")
            graphs = False
        self.unet.compile(mode=None if mode == "default" else mode)
        if graphs:
            mark_each_call_a_step(self.unet)
            # a gradient the compiled backward gives lies in the graphs' memory, which the next micro-batch's call reuses
            self.gradients_in_graph_memory = self.config.gradient_accumulation_steps > 1

    def _make_optimizer(self) -> None:
        from diffusers.optimization import get_scheduler

        config, processes = self.config, self.accelerator.num_processes
        # a parameter group per learning rate: the UNet's at --lr, the text encoders' at --text-encoder-lr
        # (SDXL's second at --text-encoder-2-lr when given), each times the method's factor (LoRA+'s B matrices)
        encoder = {id(p) for p in self.method.text_encoder_parameters()}
        second = set()
        if config.text_encoder_2_lr is not None and len(self.trained_encoders) > 1:
            second = {id(p) for p in self.trained_encoders[1].parameters()} & encoder

        def part(parameter) -> int:  # 0: the UNet, 1: the (first) text encoder, 2: SDXL's second with its own rate
            return 2 if id(parameter) in second else int(id(parameter) in encoder)

        groups, self.encoder_group, self.encoder_2_group = [], None, None
        for index, lr in enumerate((config.lr, config.text_encoder_lr, config.text_encoder_2_lr)):
            for parameters, factor in self.method.learning_rate_factors():
                mine = [p for p in parameters if part(p) == index]
                if mine:
                    if index == 1 and self.encoder_group is None:
                        self.encoder_group = len(groups)
                    if index == 2 and self.encoder_2_group is None:
                        self.encoder_2_group = len(groups)
                    groups.append({"params": mine, "lr": lr * factor})
        self.embedding_group = None
        if self.token_parameters:  # the new token rows: one more group, at --embedding-lr
            self.embedding_group = len(groups)
            groups.append({"params": self.token_parameters, "lr": config.embedding_lr})
        # the trained tensors in the optimiser's order, which checkpoints number them by
        self.parameters = [p for group in groups for p in group["params"]]
        self.optimizer = make_optimizer(config, groups if len(groups) > 1 else self.parameters, self.method.weight_decay)
        # Accelerate steps a prepared scheduler once per process per optimiser step, hence the factors
        self.lr_scheduler = get_scheduler(
            "constant_with_warmup" if config.lr_scheduler == "constant" and config.lr_warmup_steps else config.lr_scheduler,
            self.optimizer,
            num_warmup_steps=config.lr_warmup_steps * processes,
            num_training_steps=config.steps * processes,
            num_cycles=config.lr_cycles,
        )

    def _place_models(self) -> None:
        from .conditioning import PromptConditioning
        from .precision import place_frozen_models, warn_half_vae

        self.device = self.accelerator.device
        place_frozen_models(
            self.device, self.weight_dtype, self.text_encoders, self.vae, self.config.no_half_vae, self.parameters
        )
        warn_half_vae(self.pipe, self.weight_dtype, self.config.no_half_vae)
        self.unet.to(self.device)
        # prompts -> the UNet's conditioning (with gradients, through trained text encoders)
        self.prompt_embeddings = PromptConditioning(self.pipe, trained=bool(self.loop_encoders), reading=self.config.prompt_reading)

    def _prepare_data(self) -> None:
        """The validation loss's images, the latent cache and the loader."""
        import torch

        from . import prior, validation
        from .buckets import BucketBatchSampler
        from .captions import AugmentedCaptions, every_line, first_line
        from .data import ConceptDataset, load_framed_images, warn_truncated_prompts
        from .datasets import BalancedClassSampler
        from .latents import CachedLatents

        config, inputs, device = self.config, self.inputs, self.device
        labelled = inputs.labelled
        warn_truncated_prompts(self.tokenizer, self.config.max_token_length,
                               self.dataset.captions if labelled is not None else sorted(set(every_line(self.image_prompts))))
        if config.validate_every and self.accelerator.is_main_process:  # drawn at every check: said once, as sampling says it
            lines = inputs.sample_lines
            warn_truncated_prompts(self.tokenizer, config.max_token_length,
                                   [line.prompt for line in lines] + [line.negative_prompt for line in lines if line.negative_prompt])
        self.validation_loss = None
        if config.validate_every and self.accelerator.is_main_process:
            held_out = self.dataset
            # framed as training frames them: SDXL's time ids give each image's original size and crop
            if inputs.held_out_paths:  # a file that cannot be decoded is skipped with its prompt
                skipped: list[Path] = []
                # a small one was named as the run was planned (with buckets, framed square for the loss alone: not at all)
                framed = load_framed_images(inputs.held_out_paths, self.resolution, skipped=skipped, what="held-out image",
                                            warn_upscaled=False)
                prompts = [prompt for path, prompt in zip(inputs.held_out_paths, inputs.held_out_prompts) if path not in skipped]
                held_out = ConceptDataset(framed, prompts)
            elif config.buckets:  # the loss is measured on one batch of square images
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # what these images warn of was said as they were loaded to train
                    held_out = ConceptDataset(load_framed_images(self.image_paths, self.resolution), self.image_prompts)
            examples = [held_out.example(i, False) for i in range(len(held_out))]
            self.validation_prompts = [first_line(example["prompt"]) for example in examples]  # fixed: comparable across steps
            self.validation_framing = {key: torch.stack([example[key] for example in examples])
                                       for key in ("original_size", "crop_top_left") if key in examples[0]}
            self.validation_size = held_out.pixels.shape[-2:]
            self.validation_loss = validation.ValidationLoss(
                held_out.pixels, self.validation_embeddings(), self.vae, self.noise_scheduler
            )
        workers = data_workers(self.dataset, self.accelerator.num_processes)
        if config.cache_latents:
            self.dataset = CachedLatents(self.dataset, self.vae, workers)
            self.class_dataset = CachedLatents(self.class_dataset, self.vae) if self.class_dataset else None
            workers = 0  # drawing a cached item decodes nothing
            self.prompt_embeddings.precompute(  # every line of a caption of several: a finite set, each encoded once
                every_line(self.dataset.prompts() + (self.class_dataset.prompts() if self.class_dataset else []))
                + ([""] if config.caption_dropout else [])
            )
            self.vae.to("cpu")  # neither runs again in the loop (validation samples bring them back for a while)
            if not config.varied_captions and not self.loop_encoders:  # else they run in the loop
                for text_encoder in self.text_encoders:
                    text_encoder.to("cpu")
        self.prompt_embeddings.remember_new = not config.varied_captions  # a shuffled caption's orders are too many

        self.data_order = torch.Generator()  # reseeded every epoch (see _batches_from)
        train_data, collate = self.dataset, None
        several_lines = labelled is None and any(isinstance(prompt, tuple) for prompt in self.image_prompts)
        if config.varied_captions or config.caption_dropout or several_lines:  # drawn after the dataset's flip, cached or not
            train_data = AugmentedCaptions(train_data, config.shuffle_caption, config.keep_tokens, config.caption_dropout,
                                           config.caption_tag_dropout)
        if self.class_dataset is not None:
            train_data, collate = prior.PriorPreservationDataset(train_data, self.class_dataset), prior.collate_with_prior
        # A dataset draws every class (every concept) equally often; the sampler's indices hold for cached
        # latents too. Buckets: batches of one image size, each concept's images repeated to the largest's number.
        self.sampler = self.batch_sampler = None
        concepts = len(config.concepts) if labelled is None else 1
        if config.buckets:
            counts = [self.concept_labels.count(label) for label in range(concepts)]
            repeats = [-(-max(counts) // counts[label]) for label in self.concept_labels]
            self.sampler = self.batch_sampler = BucketBatchSampler(
                self.dataset_sizes(), config.batch_size, repeats, class_pools=self.class_pools
            )
        elif labelled is not None and config.balance_classes:
            self.sampler = BalancedClassSampler(labelled.labels)
        elif concepts > 1:
            self.sampler = BalancedClassSampler(self.concept_labels)
        if config.batch_size > len(train_data):
            warn(
                f"--batch-size {config.batch_size} is more than the {len(train_data)} training images: "
                f"each step trains on {len(train_data)}",
            )
        # Batches go to the device from pinned memory without waiting (see make_accelerator); worker
        # processes decode the images of a dataset read from files, which draws no random numbers.
        if self.batch_sampler is not None:
            batching = dict(batch_sampler=self.batch_sampler)
        else:
            batching = dict(batch_size=config.batch_size, shuffle=self.sampler is None, sampler=self.sampler)
        self.loader = torch.utils.data.DataLoader(
            train_data, **batching, generator=self.data_order, collate_fn=collate, num_workers=workers,
            persistent_workers=workers > 0, pin_memory=device.type == "cuda",
        )

    def dataset_sizes(self) -> list[tuple[int, int]]:
        """Each concept image's (width, height): its bucket."""
        return getattr(self.dataset, "dataset", self.dataset).sizes  # the dataset under the latent cache

    def _prepare(self) -> None:
        """accelerator.prepare, checkpoint hooks, the EMA."""
        from diffusers.training_utils import EMAModel

        accelerator = self.accelerator
        self.unet, self.optimizer, self.loader, self.lr_scheduler = accelerator.prepare(
            self.unet, self.optimizer, self.loader, self.lr_scheduler
        )
        if self.loop_encoders:  # trained (or holding new token rows): prepared too (DDP, autocast), the embeddings come from them
            self.loop_encoders = [prepare_allowing_unused_parameters(accelerator, encoder) for encoder in self.loop_encoders]
            self.prompt_embeddings.text_encoders = self.loop_encoders
            if self.trained_encoders:
                self.trained_encoders = self.loop_encoders
            for encoder in self.loop_encoders:
                encoder.train()
        # checkpoints hold the trainable parameters (trainable.safetensors), not the frozen UNet
        accelerator.register_save_state_pre_hook(lambda models, weights, folder: weights.clear())
        accelerator.register_load_state_pre_hook(lambda models, folder: models.clear())
        self.ema = EMAModel(self.parameters, decay=self.config.ema_decay) if self.config.ema_decay else None
        self.unet.train()

    def _resume(self) -> None:
        """The checkpoint's weights, optimizer, scheduler, EMA and RNG states, and where the data stream was."""
        from .checkpoints import load_checkpoint

        accelerator = self.accelerator
        resumed = load_checkpoint(accelerator, self.checkpoint, self.parameters, self.ema)
        self.global_step, self.micro_batches = resumed["step"], resumed["micro_batches"]
        accelerator.step = 0  # accumulate()'s micro-batch counter, aligned with the loop's
        kind, changed = continuation(resumed["config"], self.config)
        if kind == "extends":
            self.extended_from = resumed["config"].get("steps", TrainConfig.steps)
        if changed or resumed["num_processes"] != accelerator.num_processes:
            warn(
                f"resuming with other settings ({changed or 'number of processes'}): "
                "the run will differ from an uninterrupted one",
            )

    def _drop_saves_after(self, step: int) -> None:
        """A resumed run's step files past its checkpoint are the killed run's: the run writes them again as it passes
        their steps (the same bytes, at the same cadence), so the folder never holds saves of two cadences or runs."""
        if self.accelerator.is_main_process:
            for saved, path in step_adapters(self.output):
                if saved > step:
                    path.unlink(missing_ok=True)
        self.accelerator.wait_for_everyone()

    def _batches_from(self, micro_batch: int):
        """Micro-batches from number `micro_batch` on, epoch after epoch; resuming replays the epoch's draws."""
        seed = self.config.seed
        epoch, skip = divmod(micro_batch, len(self.loader))
        while True:
            self.data_order.manual_seed(derived_seed(seed, DATA_STREAM, epoch))  # the same order on every process
            if self.sampler is not None:
                self.sampler.reseed(derived_seed(seed, DATA_STREAM, epoch))
            seed_global_rng(derived_seed(seed, DATA_STREAM, epoch, self.process), self.device)  # the dataset's flips
            for index, batch in enumerate(self.loader):
                if index >= skip:
                    yield batch
            epoch, skip = epoch + 1, 0

    # -----------------------------------------------------------------------------------------
    # The loop

    def fit(self) -> Run:
        """Train until `config.steps`, saving as due, then write the adapter(s)."""
        from .tracking import start_trackers

        self.open_logs()
        start = time.perf_counter()
        try:
            # started here, not in the set-up, so that whatever ends the run finishes them (close_logs)
            start_trackers(self.accelerator, self.config, self.output)
            self.save_missed()
            while self.global_step < self.config.steps:
                self.advance()
            self.finish_pending()
            self.check_weights()
            self.save_adapters()
            self.accelerator.wait_for_everyone()
        finally:
            self.close_logs()
        kept = [path for _, path in step_adapters(self.output)]
        return Run(
            output=self.output, adapter=self.output / ADAPTER_FILE, config=self.config, description=self.method.describe(),
            num_parameters=self.method.num_parameters(),
            losses=self.losses, seconds=time.perf_counter() - start, resumed_from=self.resume_from, extended_from=self.extended_from,
            validation_losses=self.validation_losses, token_numbers=sum(p.numel() for p in self.token_parameters),
            taken_options=self.taken_options, started_fresh=self.started_fresh,
            saves=[path for path in kept if not path.name.startswith("adapter-ema")],
            ema_saves=[path for path in kept if path.name.startswith("adapter-ema")],
        )

    def advance(self) -> None:
        """One optimiser step: queue it, then read the step before it (which the device has finished or
        is finishing while this one waits in its queue). A step after which something is saved or drawn
        is read at once, and its validation and saves follow; so is every step on a CPU, which computes a
        step as it queues it (read a step late, each step's time would be the next one's)."""
        result = self.step()
        self.finish_pending()
        if self.save_or_validation_due() or not self.reads_late:
            self.finish(result)
        else:
            self.pending = result

    @functools.cached_property
    def reads_late(self) -> bool:
        """Whether a step is read while the next one waits in the device's queue (see `advance`): on an
        accelerator, not on a CPU."""
        return self.device.type != "cpu"

    def finish_pending(self) -> None:
        if self.pending is not None:
            result, self.pending = self.pending, None
            self.finish(result)

    def finish(self, result: StepResult) -> None:
        """Read a step's values (stopping at a non-finite one), validate and log it, and save what is due."""
        values = self.read(result)
        if result.step == self.global_step and self._validation_due():
            values.update(self.validate())
        self.log(values, result)
        if result.step == self.global_step:
            self.save_due()

    def save_or_validation_due(self) -> bool:
        """Whether the step just taken is followed by a save, validation or the end of the run."""
        config, step = self.config, self.global_step
        every = [config.checkpoint_every, config.save_every, config.validate_every]
        return step >= config.steps or any(n and step % n == 0 for n in every)

    def step(self) -> StepResult:
        """One optimiser step over `gradient_accumulation_steps` micro-batches, queued on the device: nothing
        here waits for it (the losses and the gradient norm stay tensors until `read`)."""
        import torch

        from .latents import batch_latents
        from .token_embeddings import retract_rows

        config, accelerator = self.config, self.accelerator
        groups = self.optimizer.param_groups
        result = StepResult(
            step=self.global_step + 1, started=time.perf_counter(), lr=groups[0]["lr"],
            text_encoder_lr=groups[self.encoder_group]["lr"] if self.encoder_group is not None else None,
            text_encoder_2_lr=groups[self.encoder_2_group]["lr"] if self.encoder_2_group is not None else None,
            embedding_lr=groups[self.embedding_group]["lr"] if self.embedding_group is not None else None,
        )
        for micro_batch in range(config.gradient_accumulation_steps):
            batch = next(self.batches)
            self.micro_batches += 1
            # a forked RNG seeded by (seed, step, micro-batch): same draws after a resume, data stream untouched
            with accelerator.accumulate(self.unet, *self.loop_encoders), torch.random.fork_rng(devices=[]):
                seed_global_rng(derived_seed(config.seed, STEP_STREAM, self.global_step, micro_batch, self.process), self.device)
                latents = batch_latents(batch, self.vae)
                loss = self.loss(latents, batch)
                accelerator.backward(loss.total)
                if self.gradients_in_graph_memory and micro_batch == 0 and not accelerator.sync_gradients:
                    keep_gradients(self.parameters)  # later micro-batches add into these copies in place
                if accelerator.sync_gradients:
                    result.grad_norm = self.grad_norm()
                self.optimizer_step()
                if config.retract_embeddings and accelerator.sync_gradients:
                    retract_rows(self.pipe)
                self.lr_scheduler.step()
            result.losses.append(loss.total.detach())
            if loss.prior is not None:
                result.instance_losses.append(loss.instance.detach())
                result.prior_losses.append(loss.prior.detach())
        result.images = latents.shape[0] * config.gradient_accumulation_steps * accelerator.num_processes
        self.global_step += 1
        if self.ema is not None:
            self.ema.step(self.parameters)
        return result

    def grad_norm(self):
        """The gradients' total norm before clipping (a tensor), clipped to `max_grad_norm` when it is set.

        Without clipping, the norm alone: `clip_grad_norm_` would also multiply every gradient by 1, one
        more pass over them (a millisecond for LoRA's 452 tensors on a CPU). The same value.
        """
        import torch
        from accelerate.utils import DistributedType

        accelerator = self.accelerator
        plain = accelerator.distributed_type in (DistributedType.NO, DistributedType.MULTI_GPU, DistributedType.MULTI_CPU)
        if self.config.max_grad_norm or not plain or not hasattr(torch.nn.utils, "get_total_norm"):
            return accelerator.clip_grad_norm_(self.parameters, self.config.max_grad_norm or math.inf)
        accelerator.unscale_gradients()
        grads = [p.grad for p in self.parameters if p.grad is not None]
        if grads and self._parameters_in_one_group():
            # get_total_norm's own computation for a single (device, dtype) group, the same bits, without its
            # grouping and per-norm copies (a quarter of its time for LoRA's 452 tensors on a CPU)
            return torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads, 2.0)), 2.0)
        return torch.nn.utils.get_total_norm(grads)

    def _parameters_in_one_group(self) -> bool:
        """Whether the trainable parameters (so their gradients) share one device and dtype, of a kind whose
        `torch._foreach_norm` get_total_norm takes; they stay where the set-up put them, so asked once."""
        if self._one_group is None:
            import torch

            kinds = {(p.device, p.dtype) for p in self.parameters}
            self._one_group = (
                len(kinds) == 1 and next(iter(kinds))[0].type in ("cpu", "cuda") and hasattr(torch, "_foreach_norm")
                and all(type(p) is torch.nn.Parameter for p in self.parameters)
            )
        return self._one_group

    def optimizer_step(self) -> None:
        """The optimizer's step and zero_grad, at the end of an accumulation cycle.

        Accelerate's optimizer wrapper looks a package up on every step (`is_lomo_available`: an import
        search, milliseconds once transformers' import hooks are installed); where the wrapper would only
        call the optimizer (no fp16 loss scaling, no XLA), the optimizer is called directly.
        """
        from accelerate.optimizer import AcceleratedOptimizer
        from accelerate.utils import DistributedType

        accelerator, optimizer = self.accelerator, self.optimizer
        direct = (
            type(optimizer) is AcceleratedOptimizer and optimizer.scaler is None
            and accelerator.distributed_type != DistributedType.XLA
        )
        if not direct:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        elif accelerator.sync_gradients:
            optimizer.optimizer.step()
            optimizer.optimizer.zero_grad(set_to_none=True)

    def loss(self, latents, batch):
        """The denoising loss of one micro-batch, with noise and timesteps from the current RNG."""
        import torch

        from .losses import denoising_loss, training_noise
        from .masks import loss_weights

        config = self.config
        noise = training_noise(latents, config.noise_offset, None, config.multires_noise_iterations, config.multires_noise_discount)
        most = config.max_timestep or self.noise_scheduler.config.num_train_timesteps
        timesteps = torch.randint(config.min_timestep, most, (latents.shape[0],), device=self.device).long()
        weights = None
        if "loss_mask" in batch:  # --masked-loss
            weights = loss_weights(batch["loss_mask"], latents.shape[-2:], config.unmasked_weight)
        return denoising_loss(
            self.unet, self.noise_scheduler, latents, self.conditions(batch, latents), noise, timesteps,
            self.accelerator.autocast, config.snr_gamma, batch.get("is_prior"), config.prior_loss_weight,
            self.error_measure, config.input_perturbation, weights=weights, debiased_estimation=config.debiased_estimation,
        )

    @functools.cached_property
    def error_measure(self):
        """How the loss measures a prediction's error (`losses.ErrorMeasure`), the same every micro-batch."""
        from .losses import ErrorMeasure

        return ErrorMeasure(self.config.loss_type, self.config.huber_c, self.config.huber_schedule)

    @functools.cached_property
    def training_images_record(self) -> dict[str, str]:
        """What every saved adapter of a concept run records of its images (its kohya export's trigger words,
        wherever the images are by then); the images do not change during the run, so it is read once."""
        from .captions import training_images_record

        if self.config.dataset:
            return {}
        # those it trained on (none it skipped), and the class images beside them
        return training_images_record(self.image_paths, self.image_prompts, self.class_paths)

    def conditions(self, batch, latents):
        """The UNet's conditioning for a batch: its prompts (and, for SDXL, its images' sizes and crops)."""
        size = [side * self.pipe.vae_scale_factor for side in latents.shape[-2:]]
        return self.prompt_embeddings(batch["prompt"], self.device, batch, size)

    def read(self, result: StepResult) -> dict[str, Any]:
        """The step's values on the host (losses averaged over micro-batches and processes), in one transfer:
        here the host waits for the device. A non-finite loss or gradient norm stops the run."""
        import torch

        parts = [result.losses] + ([result.instance_losses, result.prior_losses] if result.prior_losses else [])
        means = torch.stack([torch.stack(losses).mean() for losses in parts])
        means = self.accelerator.gather(means).view(-1, len(parts)).mean(dim=0)
        grad_norm = result.grad_norm
        if isinstance(grad_norm, torch.Tensor):  # one transfer for everything the step left on the device
            *numbers, grad_norm = torch.cat([means, grad_norm.detach().reshape(1).to(means)]).tolist()
        else:
            numbers = means.tolist()
            grad_norm = math.nan if grad_norm is None else float(grad_norm)
        now = time.perf_counter()
        result.seconds = now - max(result.started, self.last_read)
        self.last_read = now
        loss = numbers[0]
        self.check_finite("loss", loss, result.step)
        if self.accelerator.scaler is None:  # under fp16 the scaler skips such a step
            self.check_finite("gradient norm", grad_norm, result.step)
        self.losses.append(loss)
        values = {"loss": loss, "lr": result.lr, "grad_norm": grad_norm if math.isfinite(grad_norm) else None}
        if result.text_encoder_lr is not None:
            values["text_encoder_lr"] = result.text_encoder_lr
        if result.text_encoder_2_lr is not None:
            values["text_encoder_2_lr"] = result.text_encoder_2_lr
        if result.embedding_lr is not None:
            values["embedding_lr"] = result.embedding_lr
        if "d" in self.optimizer.param_groups[0]:  # Prodigy: its step-size estimate, which its README says to watch
            values["prodigy_d"] = float(self.optimizer.param_groups[0]["d"])
        if result.prior_losses:
            values.update(instance_loss=numbers[1], prior_loss=numbers[2])
        return values

    def log(self, values: dict[str, Any], result: StepResult) -> None:
        """To the trackers (TensorBoard), metrics.jsonl and the progress bar."""
        step = result.step
        log_scalars(self.accelerator, {k: v for k, v in values.items() if v is not None}, step)
        if self.metrics is not None:
            seconds = result.seconds
            self.metrics.write(
                {"step": step, **values, "step_seconds": round(seconds, 5), "images_per_second": round(result.images / seconds, 3)}
            )
        self.bar.set_postfix(loss=f"{values['loss']:.4f}", refresh=False)  # drawn by update, at most 10 times a second
        self.bar.update(1)

    # -----------------------------------------------------------------------------------------
    # Finite values: checked before anything is saved

    def check_finite(self, name: str, value, step: int | None = None) -> None:
        """Stop when a step's loss or gradient norm (a number or a one-element tensor) is NaN or infinite."""
        value = value.item() if hasattr(value, "item") else value
        if not math.isfinite(value):
            self._fail(f"{name} is {value} at step {step or self.global_step + 1}")

    def check_weights(self) -> None:
        """Stop rather than save weights a step has ruined (one transfer for all of them)."""
        import torch

        if not bool(torch.stack([torch.isfinite(p).all() for p in self.parameters]).all()):
            self._fail(f"trained weights are not finite after step {self.global_step}")

    def _fail(self, problem: str) -> NoReturn:
        raise TrainingFailed(
            f"{problem}; stopped without saving "
            f"(the last saved adapter and checkpoint, if any, are kept in {self.output})"
        )

    # -----------------------------------------------------------------------------------------
    # Saving

    def save_due(self) -> None:
        """A checkpoint every `checkpoint_every` steps, the adapter then and every `save_every` steps (the
        last step's adapter is written by `fit`)."""
        config, step = self.config, self.global_step
        checkpoint_now = config.checkpoint_every and step % config.checkpoint_every == 0
        kept_now = step < config.steps and bool(config.save_every) and step % config.save_every == 0
        adapter_now = step < config.steps and (checkpoint_now or kept_now)
        if checkpoint_now or adapter_now:
            self.check_weights()
        if checkpoint_now:
            self.save_checkpoint()
        if adapter_now:
            self.save_adapters(kept_now)

    def save_adapters(self, kept: bool = False) -> None:
        """adapter.safetensors and, with an EMA, adapter-ema.safetensors (main process); with `kept` (a --save-every
        save) also adapter-step-N.safetensors (adapter-ema-step-N), the same bytes, kept when the run goes on."""
        if not self.accelerator.is_main_process:
            return
        from .models import is_sdxl

        config, method, base_model = self.config, self.method, self.pipe.sdtune_model_id
        extra = dict(placeholder=config.placeholder, token=config.token or "", step=str(self.global_step))
        if config.zero_terminal_snr:  # only when on: other adapters keep their bytes
            extra["zero_terminal_snr"] = "true"
        extra.update(config.prompt_reading.metadata())  # sampling reads prompts as training did; only when set, as above
        if is_sdxl(self.pipe):  # for what reads the file alone (a model card's tags); SD 1.x/2.x adapters keep their bytes
            extra["base_model_family"] = "sdxl"
        if len(config.concepts) > 1 and not config.dataset:  # sampling fills each <name> with its own token
            extra.update(token=config.concept_tokens[config.concepts[0]], concept_tokens=json.dumps(config.concept_tokens))
        from .token_embeddings import trained_rows

        extra.update(self.training_images_record)
        extra.update(self.starting_records)  # only when set, as above

        def token_rows():  # the new tokens' rows as the parameters hold them now
            return trained_rows(self.pipe) if self.token_parameters else None

        step = self.global_step
        # each written atomically: a kill leaves the earlier file or the new one, whole; a step file is a copy
        save_adapter(self.output / ADAPTER_FILE, method, base_model, token_embeddings=token_rows(), **extra)
        if kept:
            copy_atomic(self.output / ADAPTER_FILE, self.output / step_adapter_name(step))
        if self.ema is not None:  # the EMA weights in the same format, so load_adapter reads them
            self.ema.store(self.parameters)
            self.ema.copy_to(self.parameters)
            save_adapter(self.output / EMA_ADAPTER_FILE, method, base_model, ema_decay=str(config.ema_decay),
                         token_embeddings=token_rows(), **extra)
            self.ema.restore(self.parameters)
            if kept:
                copy_atomic(self.output / EMA_ADAPTER_FILE, self.output / step_adapter_name(step, ema=True))
        if kept and config.keep_saves:
            self.prune_saves()

    def save_missed(self) -> None:
        """A resumed run's save of its checkpoint's step where the folder lacks it: the run was killed between writing
        the checkpoint and the adapter, or it ended there and this run extends it. The weights are the checkpoint's,
        so the file is the one an uninterrupted run wrote."""
        config, step = self.config, self.global_step
        due = self.resume_from is not None and config.save_every and 0 < step < config.steps and step % config.save_every == 0
        if due and not (self.output / step_adapter_name(step)).is_file():
            self.save_adapters(kept=True)

    def prune_saves(self) -> None:
        """Keep the newest --keep-saves step files (and their EMA's) up to this step, removing older ones."""
        steps = sorted({saved for saved, _ in step_adapters(self.output) if saved <= self.global_step})
        stale = set(steps[:-self.config.keep_saves])
        for saved, path in step_adapters(self.output):
            if saved in stale:
                path.unlink(missing_ok=True)

    def save_checkpoint(self) -> None:
        """The full training state into checkpoints/step-N (every process takes part)."""
        from . import checkpoints
        from .version import __version__

        accelerator = self.accelerator
        state = {
            "micro_batches": self.micro_batches,
            "num_processes": accelerator.num_processes,
            "config": self.config.to_dict(),
            "sdtune_version": __version__,
        }
        checkpoints.save_checkpoint(
            accelerator, self.output, self.global_step, state, self.parameters, self.ema, self.config.keep_checkpoints
        )

    # -----------------------------------------------------------------------------------------
    # Validation and logs

    def _validation_due(self) -> bool:
        every, step = self.config.validate_every, self.global_step
        return bool(every) and (step % every == 0 or step == self.config.steps)

    def validate(self) -> dict[str, float]:
        """Validation loss and sample grid, on the main process; the others wait."""
        import torch

        from . import validation
        from .precision import sampling_dtype
        from .tracking import log_image

        accelerator, values = self.accelerator, {}
        if accelerator.is_main_process:
            # the data stream's RNG stays as if no validation ran; the text encoders are in eval mode as the UNet
            # is (validation.py), so a method's dropout is off
            with torch.random.fork_rng(devices=[]), validation.evaluating(self.loop_encoders):
                model = accelerator.unwrap_model(self.unet)
                if self.loop_encoders:  # the held-out prompts as the text encoder now reads them
                    self.validation_loss.use_prompt_embeds(self.validation_embeddings())
                values["val_loss"] = self.validation_loss(model, accelerator.autocast, self.device)
                self.validation_losses[self.global_step] = values["val_loss"]
                dtype = sampling_dtype(self.config.validation_dtype, self.device)
                if dtype == torch.float32 and self.weight_dtype is not None:
                    dtype = self.weight_dtype  # frozen weights stored in half run in half
                grid = validation.sample_grid(
                    self.pipe, self.inputs.sample_lines, self.resolution, self.device, dtype, self.config.prompt_reading,
                    width=self.config.validation_width, height=self.config.validation_height, model=self.config.model,
                    folder=self.output / VALIDATION_GRIDS / f"step-{self.global_step}", step=self.global_step,
                    base_adapters=self.config.base_adapter_entries,
                )
            validation.save_grid(grid, self.output, self.global_step)
            log_image(accelerator, "samples", grid, self.global_step)
        accelerator.wait_for_everyone()
        return values

    def validation_embeddings(self):
        """The held-out images' conditioning, without gradients (from the unwrapped text encoders: the main
        process alone runs them)."""
        import torch

        from .conditioning import PromptConditioning

        embeddings, precision = self.prompt_embeddings, contextlib.nullcontext()
        if self.loop_encoders:  # their trained layers are fp32, their frozen ones maybe half: as in the loop
            embeddings, precision = PromptConditioning(self.pipe, trained=True, reading=self.config.prompt_reading), self.accelerator.autocast()
        with torch.no_grad(), precision:
            return embeddings(self.validation_prompts, self.device, self.validation_framing, self.validation_size)

    def open_logs(self) -> None:
        """config.toml, metrics.jsonl (a resumed run keeps the lines its checkpoint reached) and the progress bar."""
        from tqdm.auto import tqdm

        config = self.config
        if self.accelerator.is_main_process:
            write_text_atomic(self.output / CONFIG_FILE, config.to_toml())
            self.metrics = MetricsLog(self.output, self.global_step)
        self.bar = tqdm(
            total=config.steps,
            initial=self.global_step,
            desc=f"train {config.method}",
            unit="step",
            disable=not (self.progress and self.accelerator.is_local_main_process),
        )

    def close_logs(self) -> None:
        from .tracking import finish_trackers

        self.bar.close()
        if self.metrics is not None:
            self.metrics.close()
        finish_trackers(self.accelerator)

    def stop_data_workers(self) -> None:
        """End the loader's worker processes now. Persistent workers otherwise live on after the run, in a
        notebook that trains again, until the garbage collector happens to free the trainer."""
        batches = getattr(self, "batches", None)
        if batches is not None:
            batches.close()  # its loop over the loader: the loader's iterator is then held by the loader alone
        loader = getattr(self, "loader", None)
        iterator = getattr(loader, "_iterator", None)  # where a DataLoader keeps its persistent workers' iterator
        if iterator is not None:
            from .latents import end_loader_workers

            loader._iterator = None
            end_loader_workers(iterator)


def records_cuda_graphs(device) -> bool:
    """Whether a mode of CUDA graphs records them on `device`: Inductor records them on CUDA devices alone."""
    return device.type == "cuda"


def mark_each_call_a_step(module) -> None:
    """Begin a new CUDA-graph step before each call of `module`, compiled in place with CUDA graphs: the training loop,
    the validation loss and the validation pipeline's sampling all call it, and once a step is marked anywhere torch
    no longer tells steps apart by itself (a call not marked would record one more graph after the last).
    `nn.Module.compile` keeps the compiled call as `_compiled_call_impl`, which `module(...)` runs: the mark goes
    around it, outside the compiled code, which it must not be traced into."""
    import torch

    compiled = module._compiled_call_impl
    mark_step_begin = torch.compiler.cudagraph_mark_step_begin

    def marked_call(*args, **kwargs):
        mark_step_begin()
        return compiled(*args, **kwargs)

    module._compiled_call_impl = marked_call


def keep_gradients(parameters) -> None:
    """Copy each gradient out of the CUDA graphs' memory, where the compiled backward of a step's first micro-batch
    left it, so that the next micro-batch adds its own to it: the next call of the UNet begins a new step
    (`mark_each_call_a_step`), whose graphs write over that memory (torch then refuses to read it). The same values;
    one copy of the trained tensors' gradients a step (the later micro-batches' add into it in place)."""
    for parameter in parameters:
        if parameter.grad is not None:
            parameter.grad = parameter.grad.clone()


def data_workers(dataset, processes: int = 1) -> int:
    """Worker processes for a dataset that decodes image files when an item is drawn; 0 for the others
    (in-memory images cost less to index than a worker costs to pass them on)."""
    import os

    if not getattr(dataset, "decodes_on_draw", False):
        return 0
    return max(0, min(4, (os.cpu_count() or 1) // processes - 1))


def steps_change(saved_steps: Any, config: TrainConfig) -> str:
    """How a run of `saved_steps` steps, resumed with `config.steps`, ends otherwise than a run trained to config.steps
    in one go, in a few words; "" where it does not: as many steps, or more under a schedule whose rate at a step does
    not depend on their number (no draw of the loop does), which extends the run."""
    if not isinstance(saved_steps, int) or saved_steps == config.steps:
        return ""
    if saved_steps > config.steps:
        return "fewer steps"
    if config.lr_scheduler not in STEP_COUNT_FREE_SCHEDULES:
        return f"the {config.lr_scheduler} rate depends on the step count"
    return ""


def changed_settings(saved: dict, config: TrainConfig) -> str:
    """The settings, other than run control (checkpointing, output), that differ from a checkpoint's. A setting
    the checkpoint lacks is one an earlier sdtune did not have: that run had its default. Raised steps that extend
    the run (`steps_change`) are no difference."""
    current = config.to_dict()
    saved = {**TrainConfig().to_dict(), **saved}
    names = sorted((set(saved) | set(current)) - RUN_CONTROL)
    steps_differ = steps_change(saved.get("steps"), config)
    if not steps_differ:
        names.remove("steps")
    defaults = TrainConfig()

    def shown(values: dict, name: str):  # a setting at its default is left out of the dict: its default, not None
        return values[name] if values.get(name) is not None else getattr(defaults, name, None)

    def why(name: str) -> str:
        return f" ({steps_differ})" if name == "steps" else ""

    return ", ".join(f"{n}: {shown(saved, n)} -> {shown(current, n)}{why(n)}" for n in names if saved.get(n) != current.get(n))


def continuation(saved: dict, config: TrainConfig) -> tuple[str, str]:
    """How a run goes on from a checkpoint whose settings are `saved`: ("resumes", ""), with its own settings;
    ("extends", ""), with more steps it ends as a run trained to them in one go would; or ("differs", the settings
    that differ, as `changed_settings` names them). `sdtune train --resume` and a sweep decide by this alone."""
    changes = changed_settings(saved, config)
    if changes:
        return "differs", changes
    saved_steps = saved.get("steps", TrainConfig.steps)
    return ("extends" if isinstance(saved_steps, int) and saved_steps < config.steps else "resumes"), ""


def prepare_allowing_unused_parameters(accelerator, model):
    """accelerator.prepare for a text encoder: under DDP it may hold trained layers that never reach the conditioning
    (SDXL reads its first encoder's penultimate layer, --clip-skip K skips K − 1 layers), whose gradients never come,
    so DDP must look for them each step or it waits for their reduction and fails at the next step. Their gradients
    stay None on every process, as in one process."""
    from accelerate.utils import DistributedDataParallelKwargs

    kept = accelerator.ddp_handler
    accelerator.ddp_handler = DistributedDataParallelKwargs(**{**(kept.to_kwargs() if kept else {}), "find_unused_parameters": True})
    try:
        return accelerator.prepare(model)
    finally:
        accelerator.ddp_handler = kept


def make_accelerator(config: TrainConfig, output: Path):
    """Accelerate's Accelerator for the run: mixed precision, gradient accumulation, TensorBoard logs in OUTPUT/logs."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from accelerate.utils import DataLoaderConfiguration, GradientAccumulationPlugin, ProjectConfiguration

    from .tracking import logging_dir, tracker_names

    # Accelerate keeps one state per process; a second run in the same process (the Python API, the
    # tests) may ask for another precision. The process group (PartialState) is kept.
    AcceleratorState._reset_state()
    try:
        return Accelerator(
            mixed_precision=config.mixed_precision,
            log_with=tracker_names(config.log_with) or None,
            project_config=ProjectConfiguration(project_dir=str(output), logging_dir=str(logging_dir(output))),
            # an optimiser step every N micro-batches, also across epoch ends, whatever the data size
            gradient_accumulation_plugin=GradientAccumulationPlugin(
                num_steps=config.gradient_accumulation_steps, sync_with_dataloader=False
            ),
            # a blocking copy to a GPU waits for everything queued before it; batches come from pinned memory
            dataloader_config=DataLoaderConfiguration(non_blocking=True),
        )
    except ValueError as error:  # a precision the device lacks
        raise SdtuneError(f"--mixed-precision {config.mixed_precision}: {str(error).splitlines()[0]}") from None
