"""The `sdtune` command line: a thin Typer layer that builds a config and calls the library.

Exit codes: 0 success, 1 failure during the work (for example a non-finite loss), 2 bad input.
Only typer is imported at start-up; torch and diffusers load inside the commands.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import os
import re
import signal
import sys
import threading
import typing
import warnings
from pathlib import Path, PurePath
from typing import Any, Callable, List, Optional

import typer
from typer.core import TyperCommand, TyperGroup

try:  # typer 0.2x carries its own copy of click
    from typer._click.exceptions import NoArgsIsHelpError, UsageError
except ImportError:
    from click.exceptions import NoArgsIsHelpError, UsageError

from . import methods
from .config import (
    DEFAULT_CLASS_IMAGES,
    DEFAULT_MODEL,
    SCHEDULERS,
    CardConfig,
    CompareConfig,
    EvaluateConfig,
    ExplainConfig,
    ExportConfig,
    ExtractConfig,
    MergeConfig,
    SampleConfig,
    SweepConfig,
    TrainConfig,
    empty_path_message,
    spelled_as_flags,
)
from .errors import SdtuneError, SweepFailed, error_line, shell_word
from .fileio import counted
from .kohya_flags import kohya_flag_hint

class OneLineErrorsGroup(TyperGroup):
    """The command group whose usage errors (`--steps ten`, an unknown flag, a missing option) are one
    line on stderr and exit code 2, as sdtune's own errors, not a box with the usage. Its commands' path parameters
    refuse an empty value (`refuse_empty_paths`)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        for command in self.commands.values():
            refuse_empty_paths(command)

    def invoke(self, ctx: Any) -> Any:
        try:
            return super().invoke(ctx)
        except UsageError as error:
            if isinstance(error, NoArgsIsHelpError):
                raise
            message = " ".join(error.format_message().split())
            kohya = kohya_flag_hint(getattr(error, "option_name", "") or "")  # an unknown flag kohya-ss has
            if kohya:  # in place of click's guess, a near spelling (--max_train_steps: --max-timestep)
                message = f"{error.message}; {kohya}"
            typer.echo(f"error: {message}", err=True)
            raise typer.Exit(2) from None


def takes_paths(parameter: Any) -> bool:
    """Whether a command's parameter is a `Path` (or a list of them)."""
    descriptor = getattr(parameter, "type_descriptor", None)  # typer 0.2x: the annotation
    if descriptor is None:  # typer before: click's type
        return type(getattr(parameter, "type", None)).__name__ == "Path"
    annotation = descriptor.annotation
    if typing.get_origin(annotation) in (list, tuple):
        annotation = typing.get_args(annotation)[0]
    return isinstance(annotation, type) and issubclass(annotation, PurePath)


def refuse_empty_paths(command: Any) -> None:
    """typer reads an empty `Path` as "." (`--output ''` would write into the current folder): each path parameter
    of `command` refuses '' as a usage error, before it is converted and before the command runs. The configs refuse
    the empty text a str setting (`--model ''`) or a TOML file gives in the same words."""
    for parameter in command.params:
        if takes_paths(parameter):
            flag = parameter.opts[0]  # an argument's is its name: its label is its metavar, SOURCE
            label = flag if flag.startswith("-") else parameter.metavar or parameter.name.upper()
            parameter.process_value = _refusing_empty(parameter.process_value, label)


def _refusing_empty(process_value: Callable, label: str) -> Callable:
    def checked(ctx: Any, value: Any) -> Any:  # the raw text, one value or a repeated option's several
        if value == "" or (isinstance(value, (list, tuple)) and "" in value):
            raise UsageError(empty_path_message(label), ctx=ctx)
        return process_value(ctx, value)

    return checked


app = typer.Typer(
    cls=OneLineErrorsGroup,
    name="sdtune",
    help="Fine-tune Stable Diffusion (SD 1.x, 2.x, SDXL) with parameter-efficient methods (filter atoms, LoRA, ...) and compare them.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

DTYPE_HELP = "fp16, bf16 or fp32 (default: fp16 on a GPU, fp32 on a CPU); under fp16 an SD v1/v2 VAE decodes in fp16 (an image that overflows is decoded again in fp32), SDXL's in fp32."


def _one_line_warning(message, category, filename, lineno, line=None) -> str:
    return f"warning: {message}\n"


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """One line, above any progress bar (tqdm clears its bars, writes, and draws them again) rather than on it."""
    from tqdm.auto import tqdm

    tqdm.write(_one_line_warning(message, category, filename, lineno).rstrip("\n"), file=file or sys.stderr)


interrupted_with: int | None = None  # the exit code of a command that SIGINT or SIGTERM ended


class Terminated(KeyboardInterrupt):
    """SIGTERM, handled as SIGINT is: files being written are cleaned up on the way out."""


def _terminate(signum: int, frame: Any) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second one must not cut the clean-up short
    raise Terminated()


def _thread_error(previous: Callable, args: threading.ExceptHookArgs) -> None:
    """A background thread's error, unless TensorBoard's writer's: its writer raises that again in the main thread's
    next write, which says it in one line (a full disk naming the log folder); printed here too, it was a traceback."""
    if type(args.thread).__name__ == "_AsyncWriterThread":
        return
    previous(args)


def handle_errors(command: Callable) -> Callable:
    """Turn sdtune's errors into one line on stderr and the right exit code, never a traceback.

    SIGINT and SIGTERM end the command as an interrupt does: every temporary file is removed on the
    way out, "interrupted" is said, and the exit code is 130 (SIGINT) or 143 (SIGTERM). Its errors and warnings name
    flags as typed: the library's public functions, called here, leave their messages as they are.
    """

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        warnings.formatwarning = _one_line_warning
        if getattr(sys.stderr, "isatty", lambda: False)():  # where progress bars are drawn
            warnings.showwarning = _show_warning
        if os.environ.get("RANK", "0") != "0":  # the other processes of `accelerate launch` stay quiet
            warnings.simplefilter("ignore")
        main_thread = threading.current_thread() is threading.main_thread()
        previous = signal.signal(signal.SIGTERM, _terminate) if main_thread else None
        previous_hook = threading.excepthook
        threading.excepthook = functools.partial(_thread_error, previous_hook)
        try:
            with spelled_as_flags():
                return command(*args, **kwargs)
        except SdtuneError as error:
            typer.echo(f"error: {error}", err=True)
            raise typer.Exit(error.exit_code) from None
        except KeyboardInterrupt as interrupt:
            from .fileio import release_held_locks

            release_held_locks()  # an interrupt in a lock's release leaves it held: its file would stay behind
            global interrupted_with
            interrupted_with = 128 + signal.SIGTERM if isinstance(interrupt, Terminated) else 130
            typer.echo("interrupted", err=True)
            raise typer.Exit(interrupted_with) from None
        except BrokenPipeError:  # the reader of our output left (`| head`): stop quietly, as a SIGPIPE would
            _silence_stdout()
            raise typer.Exit(128 + signal.SIGPIPE) from None
        except Exception as error:
            if os.environ.get("SDTUNE_DEBUG"):
                raise
            if isinstance(error, OSError) and error.strerror:  # a read-only folder, ...
                where = f"{error.filename}: " if error.filename else ""
                typer.echo(f"error: {where}{error.strerror}", err=True)
                raise typer.Exit(1) from None
            typer.echo(f"error: {error_line(error)} (set SDTUNE_DEBUG=1 for the traceback)", err=True)
            raise typer.Exit(1) from None
        finally:
            threading.excepthook = previous_hook
            if main_thread:
                signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)

    return wrapper


def _silence_stdout() -> None:
    """Point stdout at /dev/null, so that flushing it on the way out raises nothing more."""
    import sys

    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):  # a stdout without a descriptor (a test runner's)
        pass
    finally:
        os.close(devnull)


def _default(config_class: type, name: str) -> str:
    value = config_class.__dataclass_fields__[name].default
    if isinstance(value, bool):
        value = "yes" if value else "no"
    return f" (default: {value})" if value is not None else ""


def _config_values(config_class: type, settings: dict[str, Any], **renamed: Any) -> dict[str, Any]:
    """The command's settings that are fields of `config_class`, unset ones left out; paths as text.

    `renamed` gives the fields whose command parameter has another name (`--format` is `export_format`).
    """
    names = {f.name for f in dataclasses.fields(config_class)}
    values = {**settings, **renamed}
    return {
        name: str(value) if isinstance(value, Path) else list(value) if isinstance(value, tuple) else value
        for name, value in values.items()
        if name in names and value is not None
    }


def setting_help(config_class: type, name: str | None = None) -> str:
    """What setting `name` of a config does (`setting_help(TrainConfig, "steps")`), or every setting, one a line: the
    text of `sdtune COMMAND --help` for its flag, with settings named as Python spells them. Here, beside the texts:
    the configs, which this module imports, cannot import it back."""
    from .config import check_setting_names

    if name is not None:
        check_setting_names(config_class, [name])
    texts = _settings_help(config_class)
    return texts[name] if name is not None else "\n".join(f"{setting}: {text}" for setting, text in texts.items())


def settings_help(config_class: type) -> dict[str, str]:
    """Each setting of `config_class` → what `sdtune COMMAND --help` says of its flag, settings named as Python spells
    them; the method options' flags for `options`; where a setting has no flag, the comment beside it."""
    return dict(_settings_help(config_class))


@functools.lru_cache(maxsize=None)
def _settings_help(config_class: type) -> dict[str, str]:
    """`settings_help`, worked out once a config: building the commands' help is most of a `setting_help` call."""
    from typer.main import get_command

    from .config import command_of, python_names, python_spelled

    command = command_of(config_class)
    params = get_command(app).commands[command].params
    options = {flag: name._replace(value=None) for flag, name in python_names(command).items() if name.option is not None}
    source = inspect.getsource(config_class)
    texts = {}
    for field in dataclasses.fields(config_class):
        flag = "--" + field.name.replace("_", "-")
        param = next((p for p in params if p.name == field.name or flag in p.opts), None)
        if param is not None:
            text = param.help.replace("\\[", "[")  # rich markup's escape
        elif field.name == "options":
            text = "\n".join(f"{name.spelled()}: {methods.option_flag_help(flag)}" for flag, name in options.items())
        else:
            comment = re.search(rf"^\s+{field.name}: .*?  # (.*)$", source, re.MULTILINE)
            text = comment[1] if comment else ""
        texts[field.name] = python_spelled(text, command)
    return texts


# ---------------------------------------------------------------------------------------------
# Method options as flags: one per `methods.OPTION_FLAGS` entry, with the help of the option's field.


def _flag_parameter(flag: str) -> str:
    """The command parameter behind a method-option flag: --atoms-1x1 is atoms_1x1."""
    return flag.removeprefix("--").replace("-", "_")


def with_method_option_flags(command: Callable) -> Callable:
    """Give `command`, which takes **method_options, one typer option per method-option flag (before --option).

    Their help is left empty here and filled in by `MethodOptionsCommand` when the help is shown:
    it comes from the method modules, which import torch.
    """
    signature = inspect.signature(command, eval_str=True)
    parameters = [p for p in signature.parameters.values() if p.kind is not inspect.Parameter.VAR_KEYWORD]
    flags = [
        inspect.Parameter(
            _flag_parameter(flag),
            inspect.Parameter.POSITIONAL_OR_KEYWORD,
            default=typer.Option(None, spec.switch or flag),
            annotation=Optional[spec.type],
        )
        for flag, spec in methods.OPTION_FLAGS.items()
    ]
    at = [p.name for p in parameters].index("option")
    command.__signature__ = signature.replace(parameters=parameters[:at] + flags + parameters[at:])
    return command


class MethodOptionsCommand(TyperCommand):
    """A command with method-option flags: their help is read from the methods when the help is shown."""

    def format_help(self, ctx: Any, formatter: Any) -> None:
        # typer's rich rendering and click's plain one both start here
        flags = {_flag_parameter(flag): flag for flag in methods.OPTION_FLAGS}
        for parameter in self.params:
            if parameter.name in flags and not parameter.help:
                parameter.help = methods.option_flag_help(flags[parameter.name])
        return super().format_help(ctx, formatter)


def method_options_from_flags(method: str, values: dict[str, Any]) -> dict[str, Any]:
    """The options the method-option flags set (`values`: parameter name → value or None), for `method`."""
    options = {}
    for flag, spec in methods.OPTION_FLAGS.items():
        value = values[_flag_parameter(flag)]
        if value is None:
            continue
        if method not in spec.methods:
            raise SdtuneError(f"{flag} applies to --method {'/'.join(spec.methods)}, not {method}")
        options[spec.option] = value
    return options


def _parse_options(pairs: list[str]) -> dict[str, Any]:
    """--option key=value pairs; values are read as TOML scalars (numbers, true/false) or strings."""
    import tomllib

    options: dict[str, Any] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key.strip():
            raise SdtuneError(f"--option takes KEY=VALUE, got {pair!r}")
        try:
            options[key.strip()] = tomllib.loads(f"v = {raw}")["v"]
        except tomllib.TOMLDecodeError:
            options[key.strip()] = raw
    return options


def is_main_process() -> bool:
    """False on the other processes of `accelerate launch`, which stay quiet."""
    from .distributed import process_state

    return process_state().is_main_process


@app.command(cls=MethodOptionsCommand)
@handle_errors
@with_method_option_flags
def train(
    concept: Optional[List[str]] = typer.Option(None, help="Concept name; its placeholder is <NAME>. Repeat for several concepts in one adapter (each with its own images, drawn equally often)." + _default(TrainConfig, "concept")),
    method: Optional[str] = typer.Option(None, help="Tuning method (see `sdtune methods`)." + _default(TrainConfig, "method")),
    model: Optional[str] = typer.Option(None, help="An SD 1.x, 2.x or SDXL pipeline: a hub id or a diffusers folder; or 'tiny' (pretrained on digits), 'tiny-random', 'tiny-sd2-random', 'tiny-sdxl-random'." + _default(TrainConfig, "model")),
    images: Optional[List[Path]] = typer.Option(None, help="Folder of training images, one per --concept (default: concepts/NAME, else the built-in demo set); an img.txt beside img.png, or metadata.jsonl, captions it."),
    output: Optional[Path] = typer.Option(None, help="Run folder (default: runs/<concept>-<method>)."),
    steps: Optional[int] = typer.Option(None, help="Optimiser steps." + _default(TrainConfig, "steps")),
    batch_size: Optional[int] = typer.Option(None, help="Images per step." + _default(TrainConfig, "batch_size")),
    lr: Optional[float] = typer.Option(None, help="Learning rate (default: the method's own, measured per method; see the README's default learning rates)."),
    train_text_encoder: Optional[bool] = typer.Option(None, "--train-text-encoder/--no-train-text-encoder", help="Also tune the text encoder's attention and MLP linears with the method (`sdtune methods` says which can); the adapter holds both" + _default(TrainConfig, "train_text_encoder") + "."),
    text_encoder_lr: Optional[float] = typer.Option(None, help="The text encoder's learning rate, with --train-text-encoder (default: --lr)."),
    text_encoder_2_lr: Optional[float] = typer.Option(None, help="SDXL: the second text encoder's (OpenCLIP ViT-bigG) own learning rate, with --train-text-encoder (default: --text-encoder-lr)."),
    resolution: Optional[int] = typer.Option(None, help="Training image size in pixels (default: the model's native size)."),
    random_flip: Optional[bool] = typer.Option(None, "--random-flip/--no-random-flip", help="Mirror each concept image left-right half the time (default: no; leave off for text, digits, slanted styles, asymmetric objects)."),
    seed: Optional[int] = typer.Option(None, help="Random seed." + _default(TrainConfig, "seed")),
    token: Optional[List[str]] = typer.Option(None, help="Text that replaces the placeholder (default: 'sks <concept>', with --token-embeddings '<s0><s1> <concept>'); with several --concept, one each, in order."),
    template: Optional[str] = typer.Option(None, help="Training prompt; {token} is replaced." + _default(TrainConfig, "template")),
    save_every: Optional[int] = typer.Option(None, help="Also write the adapter every N steps, each kept as OUTPUT/adapter-step-N.safetensors to sample and pick from (0: only at the end)."),
    keep_saves: Optional[int] = typer.Option(None, help="Keep only the newest K of the --save-every files; 0: keep all." + _default(TrainConfig, "keep_saves")),
    gradient_accumulation_steps: Optional[int] = typer.Option(None, help="Micro-batches per optimiser step." + _default(TrainConfig, "gradient_accumulation_steps")),
    optimizer: Optional[str] = typer.Option(None, help="adamw, adam, sgd (momentum 0.9) or adafactor." + _default(TrainConfig, "optimizer")),
    weight_decay: Optional[float] = typer.Option(None, help="Weight decay (default: the method's own, 1e-2, or 0 for methods that train base weights)."),
    adam_beta1: Optional[float] = typer.Option(None, help="adamw/adam: β1." + _default(TrainConfig, "adam_beta1")),
    adam_beta2: Optional[float] = typer.Option(None, help="adamw/adam: β2." + _default(TrainConfig, "adam_beta2")),
    adam_epsilon: Optional[float] = typer.Option(None, help="adamw/adam: ε." + _default(TrainConfig, "adam_epsilon")),
    prodigy_d_coef: Optional[float] = typer.Option(None, help="prodigy: scales its estimate of the step size d, as Prodigy's README advises instead of --lr (2 or 10: larger steps; 0.5 or 0.1: smaller)." + _default(TrainConfig, "prodigy_d_coef")),
    prodigy_d0: Optional[float] = typer.Option(None, help="prodigy: its first estimate of d; raise it to 1e-5 or 1e-4 where metrics.jsonl's prodigy_d stays at it (Prodigy's README)." + _default(TrainConfig, "prodigy_d0")),
    lr_scheduler: Optional[str] = typer.Option(None, help="constant, constant_with_warmup, linear, cosine, cosine_with_restarts or polynomial." + _default(TrainConfig, "lr_scheduler")),
    lr_warmup_steps: Optional[int] = typer.Option(None, help="Steps of linear warm-up from 0 to --lr." + _default(TrainConfig, "lr_warmup_steps")),
    lr_cycles: Optional[int] = typer.Option(None, help="cosine_with_restarts: number of cycles." + _default(TrainConfig, "lr_cycles")),
    max_grad_norm: Optional[float] = typer.Option(None, help="Clip the gradient norm to this; 0: no clipping (the norm is logged anyway)." + _default(TrainConfig, "max_grad_norm")),
    ema_decay: Optional[float] = typer.Option(None, help="Also write adapter-ema.safetensors, an EMA of the trained weights with this decay; 0: none." + _default(TrainConfig, "ema_decay")),
    gradient_checkpointing: Optional[bool] = typer.Option(None, "--gradient-checkpointing/--no-gradient-checkpointing", help="Recompute UNet activations in the backward pass: less memory, more time" + _default(TrainConfig, "gradient_checkpointing") + "."),
    compile: Optional[bool] = typer.Option(None, "--compile/--no-compile", help="torch.compile the UNet: the first steps compile (minutes for SD), later ones may run faster" + _default(TrainConfig, "compile") + "."),
    compile_mode: Optional[str] = typer.Option(None, help="With --compile, torch.compile's mode: default, reduce-overhead (CUDA graphs: the host's launch time out of the step), max-autotune (tuned kernels and CUDA graphs) or max-autotune-no-cudagraphs." + _default(TrainConfig, "compile_mode")),
    checkpoint_every: Optional[int] = typer.Option(None, help="Write the full training state to OUTPUT/checkpoints/step-N every N steps; 0: never." + _default(TrainConfig, "checkpoint_every")),
    keep_checkpoints: Optional[int] = typer.Option(None, help="Keep only the newest K checkpoints." + _default(TrainConfig, "keep_checkpoints")),
    resume: Optional[str] = typer.Option(None, help="Continue from a checkpoint: 'latest' (the newest intact one in OUTPUT/checkpoints; none yet: start at step 0) or a checkpoint folder."),
    overwrite: Optional[bool] = typer.Option(None, "--overwrite", help="Replace an earlier run's adapter, logs and checkpoints in OUTPUT (default: refuse)."),
    init_weights: Optional[Path] = typer.Option(None, help="Start the method's trained tensors from this adapter (file or run folder) of the same method, or a kohya/LyCORIS file whose update the method holds exactly (a LoRA/LoCon, LoHa or LoKr for the method of that kind), as kohya-ss' --network_weights; options the run does not set (rank, alpha, ...) come from the file, as --dim_from_weights. A new run: a fresh optimizer and schedule (--resume continues a run)."),
    base_adapters: Optional[List[str]] = typer.Option(None, help="FILE[:STRENGTH]: merge this adapter or kohya file (at STRENGTH, default 1) into the frozen model before the method is injected, as kohya-ss' --base_weights and --base_weights_multiplier; repeatable. The adapter records them; sample with them too."),
    mixed_precision: Optional[str] = typer.Option(None, help="no, fp16 or bf16; trainable parameters stay fp32, the frozen models are stored in the half dtype." + _default(TrainConfig, "mixed_precision")),
    no_half_vae: Optional[bool] = typer.Option(None, "--no-half-vae/--half-vae", help="Keep the VAE in fp32 under mixed precision (for a VAE that overflows in fp16, as SDXL's does) (default: half)."),
    snr_gamma: Optional[float] = typer.Option(None, help="Min-SNR-γ loss weighting with this γ (5 is the paper's value) (default: off)."),
    clip_skip: Optional[int] = typer.Option(None, help="SD 1.x/2.x: condition on CLIP's k-th layer from the end, as kohya-ss and AUTOMATIC1111 count it (2: the penultimate, as anime models are used); the adapter records it and samples with it" + _default(TrainConfig, "clip_skip") + "."),
    max_token_length: Optional[int] = typer.Option(None, help="Read prompts up to 75, 150 or 225 tokens, in chunks of 75 through the text encoder(s), as kohya-ss' --max_token_length (long tagger captions); the adapter records it and samples with it" + _default(TrainConfig, "max_token_length") + "."),
    zero_terminal_snr: Optional[bool] = typer.Option(None, "--zero-terminal-snr/--no-zero-terminal-snr", help="Rescale the training noise schedule's betas so the last timestep has SNR 0 (Lin et al. 2023; v-prediction models only), as kohya-ss' --zero_terminal_snr; samples then use a rescaled, trailing scheduler (default: off)."),
    debiased_estimation: Optional[bool] = typer.Option(None, "--debiased-estimation/--no-debiased-estimation", help="Weight each example's loss by 1/√SNR(t) (v-prediction: 1/(SNR(t)+1)), SNR clamped at 1000, as kohya-ss' --debiased_estimation_loss (default: off)."),
    noise_offset: Optional[float] = typer.Option(None, help="Add this times a per-image, per-channel Gaussian to the noise (0.05-0.1 typical)." + _default(TrainConfig, "noise_offset")),
    multires_noise_iterations: Optional[int] = typer.Option(None, help="Multi-resolution (pyramid) noise with this many scales, as kohya-ss' --multires_noise_iterations (6-10 typical; 0: off)." + _default(TrainConfig, "multires_noise_iterations")),
    multires_noise_discount: Optional[float] = typer.Option(None, help="With --multires-noise-iterations: each coarser scale's noise is scaled by this once more." + _default(TrainConfig, "multires_noise_discount")),
    loss_type: Optional[str] = typer.Option(None, help="l2, or a pseudo-Huber loss that outliers pull less: huber, smooth_l1." + _default(TrainConfig, "loss_type")),
    huber_c: Optional[float] = typer.Option(None, help="The pseudo-Huber threshold c (with the snr schedule, c at the noisiest timesteps, near 1 at the least noisy)." + _default(TrainConfig, "huber_c")),
    huber_schedule: Optional[str] = typer.Option(None, help="How c follows the timestep: snr, exponential or constant." + _default(TrainConfig, "huber_schedule")),
    min_timestep: Optional[int] = typer.Option(None, help="Train on timesteps from this one..." + _default(TrainConfig, "min_timestep")),
    max_timestep: Optional[int] = typer.Option(None, help="...up to, not including, this one (default: the scheduler's count, 1000 for SD)."),
    input_perturbation: Optional[float] = typer.Option(None, help="Noise the input with noise + this times fresh noise, the target still the noise (0.1 typical; diffusers' --input_perturbation)." + _default(TrainConfig, "input_perturbation")),
    cache_latents: Optional[bool] = typer.Option(None, "--cache-latents/--no-cache-latents", help="Encode every image (and its mirror image, with --random-flip) and prompt once, before the loop; the VAE leaves the accelerator, and the run is the uncached one's, bit for bit" + _default(TrainConfig, "cache_latents") + "."),
    class_images: Optional[Path] = typer.Option(None, help="Prior preservation: folder of class images (default: generated into OUTPUT/class-images)."),
    class_prompt: Optional[str] = typer.Option(None, help="Prior preservation: the class images' prompt (default: the template with the plain concept name)."),
    num_class_images: Optional[int] = typer.Option(None, help=f"Prior preservation: class images to use, generated if missing (default: {DEFAULT_CLASS_IMAGES}, or all of --class-images)."),
    prior_loss_weight: Optional[float] = typer.Option(None, help="Prior preservation: weight of the class images' loss." + _default(TrainConfig, "prior_loss_weight")),
    validate_every: Optional[int] = typer.Option(None, help="Every N steps, sample the validation prompts into OUTPUT/samples/step-N.png (each image in step-N/) and log the validation loss (0: never)." + _default(TrainConfig, "validate_every")),
    validation_prompts: Optional[Path] = typer.Option(None, help="Prompt file for validation samples, a line's kohya-ss options (--n, --w, --h, --d, --s, --l) its own, as in `sdtune sample` (default: three prompts with the concept)."),
    validation_images: Optional[int] = typer.Option(None, help="Images held out of training for the validation loss (0: the training images)." + _default(TrainConfig, "validation_images")),
    validation_dtype: Optional[str] = typer.Option(None, help="The validation grids' precision: fp16, bf16 or fp32 (default: fp16 on a GPU, fp32 on a CPU)."),
    validation_width: Optional[int] = typer.Option(None, help="The validation images' width in pixels, a multiple of 8 (default: --resolution; a prompt line's --w wins)."),
    validation_height: Optional[int] = typer.Option(None, help="The validation images' height in pixels, a multiple of 8 (default: --resolution; a prompt line's --h wins)."),
    log_with: Optional[str] = typer.Option(None, help="Trackers, comma-separated: tensorboard (event files in OUTPUT/logs), wandb, mlflow, comet_ml, aim, clearml, dvclive, swanlab, trackio; or none (default: tensorboard when installed)."),
    tracker_project: Optional[str] = typer.Option(None, help="The trackers' project: the W&B project, TensorBoard's folder in OUTPUT/logs." + _default(TrainConfig, "tracker_project")),
    dataset: Optional[str] = typer.Option(None, help="Train on a whole class-labelled dataset instead of a concept (see `sdtune datasets`); each image is captioned from the dataset's template."),
    data_root: Optional[Path] = typer.Option(None, help="The dataset's folder (VTAB-1k, class folders, metadata.jsonl); with --concept, a CustomConcept101 folder."),
    classes: Optional[str] = typer.Option(None, help="Only these classes, comma-separated (default: all)."),
    max_per_class: Optional[int] = typer.Option(None, help="At most N images a class, drawn at random (default: all)."),
    split: Optional[str] = typer.Option(None, help="VTAB-1k split: train800val200, train800, val200 or test (default: train800val200)."),
    class_template: Optional[str] = typer.Option(None, help="Caption template; {class} is replaced by the class name (default: the dataset's own)."),
    balance_classes: Optional[bool] = typer.Option(None, "--balance-classes/--no-balance-classes", help="Draw every class equally often" + _default(TrainConfig, "balance_classes") + "."),
    buckets: Optional[bool] = typer.Option(None, "--buckets/--no-buckets", help="Aspect-ratio buckets: each image resized and cropped to the bucket (about --resolution² pixels) nearest its shape, batches from one bucket; off: center-cropped squares" + _default(TrainConfig, "buckets") + "."),
    caption_dropout: Optional[float] = typer.Option(None, help="Train on the empty prompt with this probability." + _default(TrainConfig, "caption_dropout")),
    shuffle_caption: Optional[bool] = typer.Option(None, "--shuffle-caption/--no-shuffle-caption", help="Shuffle each caption's comma-separated tags every time it is drawn" + _default(TrainConfig, "shuffle_caption") + "."),
    caption_tag_dropout: Optional[float] = typer.Option(None, help="Drop each of a caption's comma-separated tags (after --keep-tokens) with this probability, as kohya-ss' --caption_tag_dropout_rate." + _default(TrainConfig, "caption_tag_dropout")),
    keep_tokens: Optional[int] = typer.Option(None, help="With --shuffle-caption or --caption-tag-dropout: the first N tags stay in place." + _default(TrainConfig, "keep_tokens")),
    masked_loss: Optional[bool] = typer.Option(None, "--masked-loss/--no-masked-loss", help="Weight the loss towards each concept image's subject by its mask: masks/STEM.png beside the images (white: trained, black: --unmasked-weight), or the image's alpha channel" + _default(TrainConfig, "masked_loss") + "."),
    mask_source: Optional[str] = typer.Option(None, help="With --masked-loss: files (masks/STEM.png beside each image) or alpha (each image's alpha channel)." + _default(TrainConfig, "mask_source")),
    unmasked_weight: Optional[float] = typer.Option(None, help="With --masked-loss: the loss weight where a mask is black, in [0, 1) (0: the background is free to drift)." + _default(TrainConfig, "unmasked_weight")),
    token_embeddings: Optional[int] = typer.Option(None, help="Train N new tokens a concept beside the method (pivotal tuning): <s0>..<sN-1> for the first concept, whose token becomes '<s0><s1> NAME'; 0: none." + _default(TrainConfig, "token_embeddings")),
    embedding_lr: Optional[float] = typer.Option(None, help="With --token-embeddings: the new rows' learning rate (default: 5e-3)."),
    embedding_init: Optional[str] = typer.Option(None, help="With --token-embeddings: the word whose embedding the new rows start from, or 'random' (default: the concept's name)."),
    retract_embeddings: Optional[bool] = typer.Option(None, "--retract-embeddings/--no-retract-embeddings", help="With --token-embeddings: after each step scale the new rows by (vocabulary std / their std)^0.1, as diffusers' advanced scripts do" + _default(TrainConfig, "retract_embeddings") + "."),
    option: List[str] = typer.Option([], "--option", "-o", help="Any method option as KEY=VALUE (repeatable)."),
    config: Optional[Path] = typer.Option(None, help="A TOML file of these settings; flags override it."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Check everything and say what would train, on what, in how much memory and where; load no model, write nothing."),
    **method_options: Any,  # the method-option flags (with_method_option_flags)
) -> None:
    """Train an adapter for a concept (or a whole dataset) and write it to the run folder."""
    from . import train as run_training

    settings = locals()
    for name in ("concept", "images"):  # repeatable: one value stays one setting
        values = [str(value) for value in settings[name] or []]
        settings[name] = None if not values else values[0] if len(values) == 1 else values
    settings["base_adapters"] = list(base_adapters) if base_adapters else None  # none given: the config file's
    file_values = TrainConfig.load(config) if config else TrainConfig()
    options = dict(file_values.options)
    options.update(method_options_from_flags(method or file_values.method, method_options))
    options.update(_parse_options(option))
    train_config = TrainConfig.load(config, options=options, **_config_values(TrainConfig, settings))
    if dry_run:
        from .training import plan_run

        typer.echo("\n".join(plan_run(train_config).summary()) + "\n(dry run: no model loaded, nothing written)")
        return
    run = run_training(train_config)
    if not is_main_process():
        return
    if run.resumed_from and not run.losses:  # the checkpoint holds every step asked for
        typer.echo(f"nothing to train: {run.resumed_from} holds all {counted(train_config.steps, 'step')}\nadapter: {run.adapter}")
        return
    final = f"{run.losses[-1]:.4f}" if run.losses else "n/a"
    resumed = f" (resumed from {run.resumed_from})" if run.resumed_from else ""
    if run.extended_from:
        resumed = f" (extended a run of {counted(run.extended_from, 'step')} to {run.config.steps:,}, from {run.resumed_from})"
    rows = f", and {run.token_numbers:,} numbers of new token rows" if run.token_numbers else ""
    from .starting_weights import describe_taken

    if taken := describe_taken(run.taken_options, run.started_fresh):
        typer.echo(f"from --init-weights {shell_word(run.config.init_weights)}: {taken}")
    typer.echo(
        f"trained {run.description}{rows} in {run.seconds:.1f} s{resumed}; final loss {final}\n"
        f"adapter: {run.adapter}"
        + "".join(f"\n{kept_files(files)}" for files in (run.saves, run.ema_saves) if files)
    )


def kept_files(files: list[Path]) -> str:
    """The end-of-run line naming a run's step files of one kind (adapter-step-N, or adapter-ema-step-N)."""
    if len(files) == 1:
        return f"save: {files[0]}"
    return f"saves: {counted(len(files), 'file')}, {files[0].name} to {files[-1].name}"


@app.command()
@handle_errors
def sample(
    prompts: Optional[Path] = typer.Option(None, help="Prompt file: one prompt a line, '#' comments; <name> placeholders get the adapter's token (default, with one adapter: its training prompt, each concept's for a run of several). As in kohya-ss' sample prompts, a line may end in its own settings: 'a castle --n blurry --w 512 --h 768 --d 42 --s 30 --l 7.5' (negative prompt, width, height, first seed, steps, guidance)."),
    prompt: List[str] = typer.Option([], help="A prompt (repeatable); alongside or instead of --prompts."),
    adapter: List[Path] = typer.Option([], help="Adapter file or run folder, or a kohya-format LoRA/LoHa/LoKr file; without it the base model is sampled. Repeat it to stack adapters: their updates are added."),
    model: Optional[str] = typer.Option(None, help=f"Base model (default: the adapter's, else {DEFAULT_MODEL})."),
    output: Optional[Path] = typer.Option(None, help="Output folder (default: RUN/samples of the first adapter, RUN/samples-step-N of a step file, else ./samples)."),
    num_images: Optional[int] = typer.Option(None, help="Images per prompt (seeds seed, seed+1, ...)." + _default(SampleConfig, "num_images")),
    steps: Optional[int] = typer.Option(None, help="Denoising steps." + _default(SampleConfig, "steps")),
    guidance: Optional[float] = typer.Option(None, help="Classifier-free guidance scale." + _default(SampleConfig, "guidance")),
    seed: Optional[int] = typer.Option(None, help="First seed." + _default(SampleConfig, "seed")),
    resolution: Optional[int] = typer.Option(None, help="Square image size in pixels (default: the model's native size)."),
    width: Optional[int] = typer.Option(None, help="Image width in pixels, a multiple of 8; wins over --resolution (default: --resolution, else the model's native size)."),
    height: Optional[int] = typer.Option(None, help="Image height in pixels, a multiple of 8; wins over --resolution (default: --resolution, else the model's native size)."),
    token: Optional[str] = typer.Option(None, help="Text for placeholders (default: the adapter's token)."),
    dataset: Optional[str] = typer.Option(None, help="One row per class of this dataset, captioned from its template (see `sdtune datasets`)."),
    data_root: Optional[Path] = typer.Option(None, help="The dataset's folder, for datasets whose classes come from it (imagefolder)."),
    classes: Optional[str] = typer.Option(None, help="With --dataset: only these classes, comma-separated."),
    class_template: Optional[str] = typer.Option(None, help="With --dataset: caption template with {class} (default: the dataset's own)."),
    negative_prompt: Optional[str] = typer.Option(None, help="What guidance steers away from, for every prompt (placeholders filled; a prompt file's --n wins for its line)."),
    clip_skip: Optional[int] = typer.Option(None, help="SD 1.x/2.x: condition on CLIP's k-th layer from the end (2: the penultimate) (default: the adapter's, else 1)."),
    max_token_length: Optional[int] = typer.Option(None, help="Read prompts up to 75, 150 or 225 tokens, in chunks of 75 (default: the adapter's, else 75)."),
    guidance_rescale: Optional[float] = typer.Option(None, help="Rescale the guided prediction, 0 to 1 (default: 0.7 for a zero-terminal-SNR model, else 0)."),
    scheduler: Optional[str] = typer.Option(None, help=f"Sampler: {', '.join(SCHEDULERS)} (default: the model's own)."),
    adapter_scale: Optional[str] = typer.Option(None, help="Strength of the adapter's update, W + scale·ΔW (0: the base model); several, comma-separated (0,0.5,1), draw every prompt and seed at each, side by side; with stacked adapters, one for all or one each." + _default(SampleConfig, "adapter_scale")),
    dtype: Optional[str] = typer.Option(None, help=DTYPE_HELP),
    overwrite: Optional[bool] = typer.Option(None, "--overwrite", help="Replace the grid and images of an earlier sample in OUTPUT (default: refuse)."),
    config: Optional[Path] = typer.Option(None, help="A TOML file of these settings (as a sweep plan's \\[sample]); flags override it."),
) -> None:
    """Draw images for every prompt and one grid (rows = prompts, columns = seeds, per strength)."""
    # no --prompt leaves the file's prompts, no --adapter the file's adapter
    settings = {**locals(), "prompt": list(prompt) or None, "adapter": [str(path) for path in adapter] or None}
    from . import sample as run_sampling

    sample_config = SampleConfig.load(config, **_config_values(SampleConfig, settings))
    result = run_sampling(sample_config)
    if is_main_process():
        for note in result.notes:
            typer.echo(f"note: {note}")
        typer.echo(
            f"wrote {counted(len(result.images), 'image')} and {result.grid} "
            f"({result.dtype}; start-up {result.startup_seconds:.1f} s, {result.seconds_per_image:.2f} s an image)"
        )


@app.command()
@handle_errors
def explain(
    run: Path = typer.Argument(..., help="Run folder (or adapter file) to explain."),
    prompt: Optional[str] = typer.Option(None, help="gift: the prompt whose image the cluster maps are drawn on; <name> placeholders get the adapter's token."),
    layer: Optional[str] = typer.Option(None, help="gift/atoms: only this tuned layer (its full module name; default: all)."),
    step: Optional[int] = typer.Option(None, help="gift: the denoising step to read, from 0 (default: the mean over all steps)."),
    output: Optional[Path] = typer.Option(None, help="Output folder (default: RUN/explain; RUN/explain-step-N for a step file)."),
    steps: Optional[int] = typer.Option(None, help="gift: denoising steps." + _default(ExplainConfig, "steps")),
    guidance: Optional[float] = typer.Option(None, help="gift: classifier-free guidance scale." + _default(ExplainConfig, "guidance")),
    seed: Optional[int] = typer.Option(None, help="gift: seed of the generated image." + _default(ExplainConfig, "seed")),
    resolution: Optional[int] = typer.Option(None, help="gift: the generated image's side, a multiple of 8 (default: the model's native size)."),
    width: Optional[int] = typer.Option(None, help="gift: the generated image's width, a multiple of 8 (default: --resolution)."),
    height: Optional[int] = typer.Option(None, help="gift: the generated image's height, a multiple of 8 (default: --resolution)."),
) -> None:
    """Draw what an adapter learned: GIFT cluster maps, filter-atom updates, per-layer update norms."""
    from .explain import explain as run_explain

    # validated by explain, once the adapter is found
    result = run_explain(ExplainConfig(**_config_values(ExplainConfig, locals())))
    typer.echo(f"wrote {counted(len(result.files), 'picture')} to {result.output}")


@app.command("export")
@handle_errors
def export(
    source: Path = typer.Argument(..., help="sdtune adapter file or run folder."),
    export_format: str = typer.Option(..., "--format", help="kohya (ComfyUI/A1111/LyCORIS keys, every method; the README says which loader reads which), diffusers (LoRA, for load_lora_weights) or peft (lora/loha/lokr/oft: a folder for PeftModel.from_pretrained)."),
    output: Path = typer.Option(..., help="Output file (kohya, diffusers) or new folder (peft)."),
    model: Optional[str] = typer.Option(None, help="kohya: the base model whose UNet config decides the key names (SDXL's differ) and, for diff-style methods, ΔW = merged - base is computed on (default: the adapter's)."),
    full_diff: bool = typer.Option(False, "--full-diff", help="kohya, diff-style methods: a zero .diff beside every .diff_b of a module whose bias alone changed (BitFit, DiffFit), so that LyCORIS, AUTOMATIC1111 and InvokeAI read the file too; the zeros cost as much as those weights (the command says how much)."),
    dtype: Optional[str] = typer.Option(None, help="fp32, fp16 or bf16 tensors (half the file; kohya-ss' --save_precision)." + _default(ExportConfig, "dtype")),
    overwrite: Optional[bool] = typer.Option(None, "--overwrite", help="Replace an existing output (never the adapter exported) (default: refuse)."),
) -> None:
    """Write an adapter in a format other tools load."""
    from .export import export_adapter

    config = ExportConfig.load(None, **_config_values(ExportConfig, locals(), format=export_format))
    result = export_adapter(
        config.source, config.format, config.output, model=config.model, full_diff=config.full_diff, overwrite=config.overwrite,
        dtype=config.dtype,
    )
    typer.echo(f"wrote {result.output} ({result.format}, {result.tensors} tensors)")
    for note in result.notes:
        typer.echo(note)


@app.command("extract")
@handle_errors
def extract(
    source: Path = typer.Argument(..., help="sdtune adapter file or run folder (any method), or a kohya-format LoRA/LoHa/LoKr/diff file."),
    output: Path = typer.Option(..., help="The LoRA file (kohya keys); its per-layer summary goes beside it as NAME.extract.json."),
    rank: Optional[int] = typer.Option(None, help="Each layer's rank; with --dynamic, the most a layer takes (kohya-ss' --dim)." + _default(ExtractConfig, "rank")),
    conv_rank: Optional[int] = typer.Option(None, help="The rank of 3x3 convolutions, LoCon (kohya-ss' --conv_dim) (default: --rank)."),
    dynamic: Optional[str] = typer.Option(None, help="Choose each layer's rank from its singular values, as kohya-ss' resize: sv_fro (keep --threshold of the Frobenius norm), sv_cumulative (of the sum of singular values) or sv_ratio (keep those within 1/--threshold of the largest) (default: the fixed --rank)."),
    threshold: Optional[float] = typer.Option(None, help="--dynamic's target: a fraction in (0, 1] for sv_fro and sv_cumulative, a ratio of 1 or more for sv_ratio."),
    model: Optional[str] = typer.Option(None, help="The base model the update is computed on (default: the adapter's)."),
    dtype: Optional[str] = typer.Option(None, help="fp32, fp16 or bf16 tensors." + _default(ExtractConfig, "dtype")),
    keep_biases: Optional[bool] = typer.Option(None, "--keep-biases", help="Write Linear/Conv2d bias changes exactly as .diff_b keys beside the LoRA ones, as ComfyUI reads them (LyCORIS and diffusers do not: see the README) (default: left out)."),
    keep_norms: Optional[bool] = typer.Option(None, "--keep-norms", help="Write norm layers' changes exactly as LyCORIS' .w_norm/.b_norm keys (LyCORIS and ComfyUI read them; diffusers refuses such a file) (default: left out)."),
    base_adapters: Optional[List[str]] = typer.Option(None, help="FILE[:STRENGTH]: a base adapter the source was trained on top of (train --base-adapters), merged first so that ΔW is what the source adds on top of it; repeatable (default: those its run folder's config.toml names, where the files are the ones it recorded)."),
    overwrite: Optional[bool] = typer.Option(None, "--overwrite", help="Replace an existing output and summary (never the adapter read) (default: refuse)."),
) -> None:
    """Write any adapter's update as a kohya LoRA/LoCon file of a chosen rank (truncated SVD of each layer's ΔW)."""
    from .extraction import extract_lora

    config = ExtractConfig.load(None, **_config_values(ExtractConfig, locals()))
    result = extract_lora(config)
    for layer in result.layers:
        typer.echo(f"{layer.key}  rank {layer.rank}/{layer.max_rank}  kept {layer.kept:.2%} of ‖ΔW‖")
    for note in result.notes:
        typer.echo(note)
    ranks = sorted({layer.rank for layer in result.layers})
    shown = "" if not ranks else f", rank {ranks[0]}" if len(ranks) == 1 else f", rank {ranks[0]}-{ranks[-1]}"
    kept = f", {len(result.kept)} biases and norms kept" if result.kept else ""
    typer.echo(f"wrote {result.output} ({len(result.layers)} layers{shown}{kept}); relative error {100 * result.relative_error:.3g}%; "
               f"summary in {result.summary}")


@app.command("card")
@handle_errors
def card(
    source: Path = typer.Argument(..., help="sdtune run folder or adapter file."),
    output: Optional[Path] = typer.Option(None, help="The card's file (default: RUN/README.md, what the Hub shows for the uploaded folder; README-step-N.md for a step file)."),
    license: Optional[str] = typer.Option(None, help="The Hub's license id, usually the base model's (creativeml-openrail-m for SD v1.x) (default: none)."),
    overwrite: Optional[bool] = typer.Option(None, "--overwrite", help="Replace an existing card (default: refuse)."),
) -> None:
    """Write a run's model card (README.md): what the adapter is, how to use it, how it was trained and measured."""
    from .model_card import write_model_card

    config = CardConfig.load(None, **_config_values(CardConfig, locals()))
    result = write_model_card(config.source, config.output, license=config.license, overwrite=config.overwrite)
    typer.echo(f"wrote {result.output} ({result.method} on {result.base_model})")


@app.command("merge")
@handle_errors
def merge(
    source: List[Path] = typer.Argument(..., help="sdtune adapter file or run folder, or a kohya-format LoRA/LoHa/LoKr file; several stack (their updates added)."),
    output: Path = typer.Option(..., help="New folder for the merged diffusers pipeline."),
    dtype: Optional[str] = typer.Option(None, help="fp32, fp16 or bf16 weights." + _default(MergeConfig, "dtype")),
    model: Optional[str] = typer.Option(None, help="Base model (default: the (first) adapter's)."),
    scale: Optional[str] = typer.Option(None, help="Strength of the update baked in, W + scale·ΔW; with several adapters, one for all or one each, comma-separated." + _default(MergeConfig, "scale")),
    overwrite: Optional[bool] = typer.Option(None, "--overwrite", help="Replace an existing output folder (never one holding the adapter) (default: refuse)."),
) -> None:
    """Save the base pipeline with the adapter baked into the UNet, loadable by plain diffusers."""
    from .merging import merge_adapter

    settings = {**locals(), "source": [str(path) for path in source]}
    config = MergeConfig.load(None, **_config_values(MergeConfig, settings))
    result = merge_adapter(
        config.sources, config.output, dtype=config.dtype, model=config.model, scale=config.scales, overwrite=config.overwrite
    )
    typer.echo(f"wrote {result.output} ({result.method} merged, {result.dtype})")
    if result.zero_terminal_snr:
        typer.echo(f"note: {' and '.join(result.zero_terminal_snr)} {'was' if len(result.zero_terminal_snr) == 1 else 'were'} "
                   "trained with --zero-terminal-snr: the merged pipeline's scheduler is rescaled to SNR 0 with trailing "
                   "timesteps, as sdtune sample draws it (which also rescales guidance by 0.7)")
    for merged, flags in result.reading_flags.items():  # what weights cannot hold: how the prompts are read
        typer.echo(f"note: {merged} was trained reading prompts with {flags}; sample the merged pipeline with "
                   f"`sdtune sample --model {shell_word(result.output)} {flags}` (its own way reads them otherwise)")

@app.command()
@handle_errors
def evaluate(
    run: Optional[Path] = typer.Option(None, help="Run folder (or adapter file) to sample from; eval.json goes there (eval-step-N.json for a run's adapter-step-N.safetensors)."),
    images: Optional[Path] = typer.Option(None, help="Measure this folder of generated images instead of sampling (e.g. RUN/samples)."),
    prompts: Optional[Path] = typer.Option(None, help="Prompt file (default: the run's training prompt, each concept's for a run of several); <name> reads as the plain name for CLIP-T."),
    prompt: List[str] = typer.Option([], help="A prompt (repeatable); alongside or instead of --prompts."),
    reference: Optional[Path] = typer.Option(None, help="Reference images for CLIP-I, DINO, FID and KID (default: the run's training images)."),
    output: Optional[Path] = typer.Option(None, help="Where to write the results (default: RUN/eval.json, else IMAGES/eval.json); the images it draws go beside it, in NAME-samples/ (the default's in RUN/eval-samples/)."),
    num_images: Optional[int] = typer.Option(None, help="Images per prompt when sampling." + _default(EvaluateConfig, "num_images")),
    seed: Optional[int] = typer.Option(None, help="First seed when sampling; also seeds KID's subsets." + _default(EvaluateConfig, "seed")),
    steps: Optional[int] = typer.Option(None, help="Denoising steps when sampling." + _default(EvaluateConfig, "steps")),
    guidance: Optional[float] = typer.Option(None, help="Classifier-free guidance scale when sampling." + _default(EvaluateConfig, "guidance")),
    resolution: Optional[int] = typer.Option(None, help="Square image size when sampling (default: the model's native size)."),
    width: Optional[int] = typer.Option(None, help="Image width when sampling; wins over --resolution (default: --resolution, else the model's native size)."),
    height: Optional[int] = typer.Option(None, help="Image height when sampling; wins over --resolution (default: --resolution, else the model's native size)."),
    negative_prompt: Optional[str] = typer.Option(None, help="Negative prompt when sampling, as for `sdtune sample`."),
    scheduler: Optional[str] = typer.Option(None, help=f"Sampler when sampling: {', '.join(SCHEDULERS)}."),
    adapter_scale: Optional[float] = typer.Option(None, help="Strength of the run's update when sampling, W + scale·ΔW." + _default(EvaluateConfig, "adapter_scale")),
    dtype: Optional[str] = typer.Option(None, help="When sampling: " + DTYPE_HELP),
    clip_model: Optional[str] = typer.Option(None, help="CLIP for CLIP-T and CLIP-I: a hub id or a folder." + _default(EvaluateConfig, "clip_model")),
    dino_model: Optional[str] = typer.Option(None, help="ViT for DINO and diversity: a hub id or a folder." + _default(EvaluateConfig, "dino_model")),
    fid_features: Optional[str] = typer.Option(None, help="FID/KID features: inception (needs torch-fidelity), clip, dino or none." + _default(EvaluateConfig, "fid_features")),
    config: Optional[Path] = typer.Option(None, help="A TOML file of these settings (as a sweep plan's \\[evaluate]); flags override it."),
) -> None:
    """Measure a run's images: CLIP-T, CLIP-I, DINO, FID, KID and diversity; writes eval.json."""
    settings = {**locals(), "prompt": list(prompt) or None}  # no --prompt leaves the file's prompts
    from . import evaluate as run_evaluation

    evaluate_config = EvaluateConfig.load(config, **_config_values(EvaluateConfig, settings))
    result = run_evaluation(evaluate_config)
    report = result.report
    typer.echo(f"{counted(report['generated_images'], 'generated image')}, {counted(report['reference_images'], 'reference image')}")
    typer.echo(result.table())
    typer.echo(f"wrote {result.output}")


@app.command()
@handle_errors
def compare(
    runs: List[Path] = typer.Argument(..., help="Run folders to compare (each with its adapter, metrics.jsonl and, if measured, eval.json), or a run's adapter-step-N.safetensors files (RUN/adapter-step-*.safetensors RUN: one column a step)."),
    output: Path = typer.Option(..., help="Folder for comparison.md, comparison.csv, the plots and the image grid."),
    prompts: Optional[Path] = typer.Option(None, help="Grid prompts (default: the first run's evaluation prompts, else its training prompt, each concept's for a run of several)."),
    prompt: List[str] = typer.Option([], help="A grid prompt (repeatable)."),
    seed: Optional[int] = typer.Option(None, help="The seed every run samples the grid with." + _default(CompareConfig, "seed")),
    steps: Optional[int] = typer.Option(None, help="Denoising steps for the grid." + _default(CompareConfig, "steps")),
    guidance: Optional[float] = typer.Option(None, help="Classifier-free guidance scale for the grid." + _default(CompareConfig, "guidance")),
    grid: Optional[bool] = typer.Option(None, "--grid/--no-grid", help="Sample the side-by-side grid (rows = prompts, columns = runs)" + _default(CompareConfig, "grid") + "."),
) -> None:
    """Compare runs: a table (markdown and CSV), metric-vs-trainable-parameters and training-loss plots, an image grid."""
    from . import compare as run_comparison

    result = run_comparison(
        [str(r) for r in runs],
        str(output),
        prompts=str(prompts) if prompts else None,
        prompt=list(prompt),
        seed=seed,
        steps=steps,
        guidance=guidance,
        grid=grid,
    )
    typer.echo(result.table)
    typer.echo(f"wrote {counted(len(result.files), 'file')} to {result.output}")


@app.command()
@handle_errors
def sweep(
    plan: Path = typer.Argument(..., help="The plan: a TOML file of shared settings and axes (see sweeps/*.toml)."),
    shard: Optional[str] = typer.Option(None, help="i/N: only the runs whose index is i modulo N, i from 0 (a GPU each, or $SLURM_ARRAY_TASK_ID/N)."),
    dry_run: bool = typer.Option(False, "--dry-run", help="List the runs (index, name, state, what they train); train nothing."),
    report_only: bool = typer.Option(False, "--report-only", help="Write the report over the runs finished so far; train nothing."),
    output: Optional[Path] = typer.Option(None, help="The sweep's folder (default: the plan's output, else runs/sweeps/NAME)."),
) -> None:
    """Run a plan: train, sample and measure every run (skipping finished ones), then write OUTPUT/report/index.html."""
    from .sweep import run_sweep

    config = SweepConfig.load(None, **_config_values(SweepConfig, locals()))
    result = run_sweep(config, log=typer.echo)
    if result.failed:
        raise SweepFailed(f"{len(result.failed)} run(s) failed: {', '.join(result.failed)} (see their sweep-run.json)")


@app.command("methods")
@handle_errors
def list_methods(
    model: str = typer.Option("sd14", help="Architecture to count on: 'sd14', 'sd2-arch' or 'sdxl-arch' (SD v1.4, SD 2.1, SDXL base, built without weights), 'tiny', 'tiny-random', 'tiny-sd2-random', 'tiny-sdxl-random', a hub id or a folder."),
) -> None:
    """List every method with its trainable parameter count and adapter size."""
    from tqdm.auto import tqdm

    from .fileio import human_bytes
    from .models import ARCHITECTURES, build_arch_unet, build_unet, read_model_configs

    if not model:  # a str, not a path the configs check: an empty one is no folder to look into
        raise SdtuneError(empty_path_message("--model"))
    # a model's UNet config alone: its architecture on the meta device, no weights loaded (the counts need shapes only)
    unet_config = None if model in ARCHITECTURES else read_model_configs(model).unet
    rows = []
    cases = [(name, variant) for name in methods.available() for variant in methods.method_class(name).variants]
    # on stderr, and only at a terminal: counting injects every case into the architecture (seconds for SD's)
    for name, variant in tqdm(cases, desc="counting", unit="case", leave=False, disable=None):
        unet = build_arch_unet(model) if unet_config is None else build_unet(unet_config)
        method = methods.create(name, **variant)
        method.inject(unet)
        size = sum(t.numel() * t.element_size() for t in method.state_dict().values())
        options = ", ".join(f"{k}={v}" for k, v in variant.items()) or "defaults"
        rows.append((name, options, f"{method.num_parameters():,}", f"{len(method.target_names)}", human_bytes(size)))
    header = ("method", "options", "trainable", "layers", "adapter")
    widths = [max(len(row[i]) for row in rows + [header]) for i in range(len(header))]
    typer.echo(f"on {ARCHITECTURES[model][1] + ' (no weights)' if model in ARCHITECTURES else model}:")
    for row in [header] + rows:
        typer.echo("  ".join(cell.rjust(w) if i in (2, 3, 4) else cell.ljust(w) for i, (cell, w) in enumerate(zip(row, widths))).rstrip())
    typer.echo("")
    for name in methods.available():
        method_class = methods.method_class(name)
        also = "; --train-text-encoder tunes the text encoder(s) too" if method_class.trains_text_encoder else ""
        typer.echo(f"{name}: {method_class.summary}{also}")


@app.command("datasets")
@handle_errors
def list_datasets() -> None:
    """List the registered datasets with their class counts and caption templates."""
    from .datasets import registry

    rows = [
        (info.name, str(len(info.class_names)) if info.class_names else "folder", "--data-root" if info.needs_root else "built in", info.template)
        for info in registry().values()
    ]
    header = ("dataset", "classes", "images", "template")
    widths = [max(len(row[i]) for row in rows + [header]) for i in range(len(header))]
    for row in [header] + rows:
        typer.echo("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())


@app.command("env")
@handle_errors
def show_environment(
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object (for scripts) instead of Markdown lines."),
) -> None:
    """Print the versions, devices and settings a bug report needs: paste it into the issue."""
    import json

    from .environment import report

    environment = report()
    typer.echo(json.dumps(environment.as_dict(), indent=2) if as_json else environment.as_text())


def version_callback(value: bool) -> None:
    if value:
        from . import __version__

        typer.echo(f"sdtune {__version__}")
        raise typer.Exit()


@app.callback()
def main_options(
    version: bool = typer.Option(False, "--version", callback=version_callback, is_eager=True, help="Show the version and exit."),
) -> None:
    """Fine-tune Stable Diffusion (SD 1.x, 2.x, SDXL) with parameter-efficient methods and compare them."""


def main() -> None:
    try:
        app()
    except SystemExit as exit:
        if interrupted_with is not None and exit.code == interrupted_with:
            # Cleaned up and said so: leave with that code. Python's own exit would turn an interrupt
            # that some library code saw on its way into a death by SIGINT (exit status -2).
            end_process_group()
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(interrupted_with)
        raise
    finally:
        end_process_group()


def end_process_group() -> None:
    """Under `accelerate launch` / torchrun, leave the process group cleanly once the command is done."""
    torch = sys.modules.get("torch")
    if torch is not None and torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
