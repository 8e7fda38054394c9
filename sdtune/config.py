"""Run configurations: plain dataclasses that the CLI flags, TOML files and the Python API share.

`TrainConfig.load("run.toml", steps=10)` reads a TOML file and applies overrides on top; the
resolved configuration of every run is written beside its adapter as `config.toml` and can be
replayed with `sdtune train --config runs/NAME/config.toml`.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import re
import shlex
import tomllib
import types
import typing
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, NamedTuple

from . import errors
from .data import MAX_SEED
from .errors import AS_TYPED, SdtuneError, reading_file, settings_spelled_for, shell_word
from .losses import HUBER_SCHEDULES, LOSS_TYPES
from .masks import MASK_SOURCES
from .methods import DEFAULT_METHOD, OPTION_FLAGS, option_words
from .models import DEFAULT_MODEL
from .optimizers import OPTIMIZERS
from .token_embeddings import DEFAULT_EMBEDDING_LR, NEW_TOKEN, check_token_settings, default_token, new_token_names
from .tracking import PROJECT_NAME, check_log_with, resolve_log_with

MIXED_PRECISION = ("no", "fp16", "bf16")
SAMPLE_DTYPES = ("fp16", "bf16", "fp32")  # sample/evaluate --dtype, train --validation-dtype
LR_SCHEDULERS = ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial")
# `sdtune sample --scheduler`: "default" keeps the model's own (PNDM for SD v1.4); the rest are diffusers'
# classes, built from the model's scheduler config (the names follow diffusers' and the web UIs' usage)
SCHEDULERS = ("default", "ddim", "pndm", "euler", "euler-ancestral", "dpm++", "dpm++-karras", "unipc", "heun", "ddpm")
DEFAULT_CLASS_IMAGES = 100  # as diffusers' DreamBooth script
# torch.compile's modes (`train --compile-mode`); "default" is torch.compile's own (mode=None)
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
CUDA_GRAPH_COMPILE_MODES = ("reduce-overhead", "max-autotune")  # the modes that record CUDA graphs (on a CUDA device)


# Settings that name files or folders: a leading `~` is the home folder, as a shell would expand it
# (`--output=~/runs/x`, TOML values and the Python API are not expanded by one).
PATH_SETTINGS = frozenset({
    "source", "output", "runs", "prompts", "run", "images", "reference", "clip_model", "dino_model", "adapter",
    "model", "data_root", "plan", "resume", "class_images", "validation_prompts", "init_weights", "base_adapters",
})


def empty_path_message(label: str) -> str:
    """What an empty path setting is told, by the CLI (`--output ''`, which typer would read as the current folder) and
    by TOML and Python alike. `label`: the flag, or an argument's name."""
    return f"{label} must not be empty"


def check_path_not_empty(name: str, value: Any) -> None:
    if value == "" or (isinstance(value, list) and "" in value):
        raise SdtuneError(empty_path_message(name if name in NOT_FLAGS else "--" + name.replace("_", "-")))


def expand_home(value: Any) -> Any:
    if isinstance(value, str) and value.startswith("~"):
        return os.path.expanduser(value)
    if isinstance(value, list):
        return [expand_home(item) for item in value]
    return value


def check_setting_names(config_class, names, where: str = "") -> None:
    """Refuse names that are no setting of `config_class`, all of them in one line."""
    unknown = sorted(set(names) - {f.name for f in dataclasses.fields(config_class)})
    if unknown:
        from .kohya_flags import kohya_settings_hint  # a kohya-ss config file's keys: what to give instead

        raise SdtuneError(f"unknown setting(s){where}: {', '.join(unknown)}{kohya_settings_hint(unknown)}")


# ---------------------------------------------------------------------------------------------
# Errors raised to Python code name settings as it spells them: `--validation-width` is `validation_width`, the
# switch `--overwrite` is `overwrite=True`, the method option `--rank` is `options["rank"]`. The CLI keeps flags.


class PythonName(NamedTuple):
    """How Python code gives what one flag sets."""

    setting: str  # the config's field
    option: str | None = None  # a method option, within `options`
    value: bool | None = None  # what a switch (`--overwrite`, `--no-dora`) sets

    def spelled(self, value: str | None = None) -> str:
        """`setting`, `setting=True`, or with the value the message gave, `setting=512`; a method option in `options`."""
        if value is None and self.value is not None:
            value = str(self.value)
        if self.option is None:
            return self.setting if value is None else f"{self.setting}={value}"
        return f'{self.setting}["{self.option}"]' if value is None else f'{self.setting}={{"{self.option}": {value}}}'

    def toml_spelled(self, value: str | None = None) -> str:
        """As a TOML file (a sweep plan's section, a config file) gives it: `setting`, `setting = 512`,
        `options.rank = 8`, a switch `overwrite = true`."""
        if value is None and self.value is not None:
            value = str(self.value).lower()
        key = self.setting if self.option is None else f"{self.setting}.{self.option}"
        return key if value is None else f"{key} = {value}"


# Fields that are no command's flag: given as arguments (`sdtune export SOURCE`) or `--option KEY=VALUE` pairs
NOT_FLAGS = frozenset({"options", "runs", "source", "plan"})


# commands whose settings hold other commands' as sections: a sweep plan's [train], [sample] and [evaluate]
COMMANDS_WITHIN = {"sweep": ("train", "sample", "evaluate")}


def command_of(config_class: type) -> str:
    """The command a config is the settings of: TrainConfig's is `sdtune train`."""
    return config_class.__name__.removesuffix("Config").lower()


@functools.cache
def python_names(command: str) -> dict[str, PythonName]:
    """`sdtune COMMAND`'s flags → how Python code gives them: its config's fields, each the flag of the same name
    (underscores for dashes); where the config takes method options, their own flags (`OPTION_FLAGS`). A switch's
    other half (`--no-dora`) is read from its first (`python_spelled`), but for a switch whose field says "no"
    (`no_half_vae`): its other half (`--half-vae`) is `no_half_vae=False`."""
    config_class = next((c for c in _Config.__subclasses__() if command_of(c) == command), None)
    if config_class is None:
        return {}
    hints = typing.get_type_hints(config_class)
    names = {
        "--" + f.name.replace("_", "-"): PythonName(f.name, value=True if hints[f.name] is bool else None)
        for f in dataclasses.fields(config_class) if f.name not in NOT_FLAGS
    }
    for flag, name in list(names.items()):  # a switch named for its "no" half has its other half: --half-vae
        if name.value and flag.startswith("--no-"):
            names["--" + flag[len("--no-"):]] = name._replace(value=False)
    for within in COMMANDS_WITHIN.get(command, ()):  # the command's own settings win
        names = {**python_names(within), **names}
    if "options" in hints:
        for flag, spec in OPTION_FLAGS.items():
            names[flag] = PythonName("options", spec.option, True if spec.type is bool else None)
    return names


NUMBER = r"-?\d+(?:\.\d+)?(?:e[+-]?\d+)?"
# a flag (not kohya-ss' --network_weights, nor one inside a quoted value or a path), and the word after it: its
# value, or the sentence's own
# a word ends before a sentence's full stop or colon: "--model nobody/x: not found", "--output runs/x."
# a value quoted as a shell reads it (`errors.shell_word`: 'my runs/x', 'it'"'"'s') is the flag's value, whole
FLAG = re.compile(rf"(?<![\w'\"/.-])(?P<flag>--[a-z0-9]+(?:-[a-z0-9]+)*)(?![\w/-])"
                  rf"(?: (?P<word>{NUMBER}(?:,{NUMBER})*(?!\w)|[\w.+~/-](?:[\w.+~/:-]*[\w+~/-])?"
                  r"|(?P<quoted>(?:'[^']*'|\"(?:[^\"\\]|\\.)*\")+)))?")
# what a path or hub id has and the sentence's own words after a path flag ("--images folder") have not
PATH_LIKE = re.compile(r"[/\\.~_:\d-]")
TRAINED_WITH = "trained with "  # before a flag: the setting of the run that trained an adapter, `sdtune train`'s
# a switch a message says to leave off: "leave out --buckets", "leave --buckets off", "without --buckets", which in Python
# is the switch set the other way ("set buckets=False"), not "leave out buckets=True"
SWITCHED_OFF = re.compile(r"\b(?:(?P<leave_out>leave out )(?P<flag1>--[a-z0-9-]+)(?![\w/-])|(?P<leave>leave )(?P<flag2>--[a-z0-9-]+) off\b"
                          r"|(?P<without>without )(?P<flag3>--[a-z0-9-]+)(?![\w/-]))")
# commands a message quotes, to be typed as they are: `sdtune sample --dtype bf16`, 'sdtune train --resume latest'
QUOTED_COMMAND = re.compile(r"`sdtune [^`]*`|'sdtune [^']*'|\"sdtune [^\"]*\"|\(sdtune [^)]*\)")


@functools.cache
def named_values() -> dict[str, tuple[str, ...]]:
    """The settings that take one of a few words, and those words: what follows such a flag in a message is its
    value ("--format diffusers" is 'format="diffusers"'), where "--targets of those layers" is a sentence's."""
    from .datasets import VTAB_SPLITS
    from .methods import available
    from .models import TINY, TINY_RANDOM, TINY_SD2_RANDOM, TINY_SDXL_RANDOM

    return {
        "method": tuple(available()), "resume": ("latest",), "mixed_precision": MIXED_PRECISION,
        "model": (TINY, TINY_RANDOM, TINY_SD2_RANDOM, TINY_SDXL_RANDOM),  # the built-in ones, no path to tell them by
        "dtype": SAMPLE_DTYPES + MERGE_DTYPES, "validation_dtype": SAMPLE_DTYPES, "format": EXPORT_FORMATS,
        "optimizer": tuple(OPTIMIZERS), "lr_scheduler": LR_SCHEDULERS, "scheduler": SCHEDULERS, "loss_type": LOSS_TYPES,
        "huber_schedule": HUBER_SCHEDULES, "mask_source": MASK_SOURCES, "dynamic": EXTRACT_DYNAMIC, "compile_mode": COMPILE_MODES,
        "fid_features": FID_FEATURES, "split": VTAB_SPLITS,
    }


def python_value(name: PythonName, word: str) -> str | None:
    """The value `word` gives `name` in Python (a number, a placeholder such as DIR, one of its words or a method
    option's (`methods.option_words`), or a path or hub id, quoted), or None where it is the sentence's next word.
    1,000 is a thousand; 0,0.5,1 a list."""
    if re.fullmatch(rf"{NUMBER}(?:,{NUMBER})*", word):
        if re.fullmatch(r"[1-9]\d{0,2}(?:,\d{3})+", word):
            return word.replace(",", "")
        return f"[{', '.join(word.split(','))}]" if "," in word else word
    if re.fullmatch(r"[A-Z][A-Z0-9_]*", word):
        return word
    if name.option is None and name.setting in PATH_SETTINGS and PATH_LIKE.search(word):  # a file or hub id: text
        return f'"{word}"'
    words = named_values().get(name.setting, ()) if name.option is None else option_words(name.option)
    return f'"{word}"' if word in words else None


def shell_unquoted(word: str) -> str | None:
    """The one value a shell-quoted `word` stands for, or None where it is not one."""
    try:
        words = shlex.split(word)
    except ValueError:
        return None
    return words[0] if len(words) == 1 else None


def python_text(text: str) -> str:
    """`text` as a string literal, as Python code and TOML alike write it ("my runs/x")."""
    return json.dumps(text, ensure_ascii=False)


def switch_named(flag: str, names: dict[str, PythonName]) -> PythonName | None:
    """How Python code gives `flag` among `names` (`python_names`), a switch's other half too: `--no-dora` is
    options={"dora": False}. None for a flag of no setting."""
    name = names.get(flag)
    if name is None and flag.startswith("--no-"):
        negated = names.get("--" + flag[len("--no-"):])
        if negated is not None and negated.value:  # only a switch has a --no- half; a value's flag has none
            return negated._replace(value=False)
    return name


def python_spelled(message: str, command: str, toml: bool = False) -> str:
    """`message` with each of `sdtune COMMAND`'s flags as Python code gives it: "add --overwrite" is "add
    overwrite=True", "--rank must be ..." is 'options["rank"] must be ...', "--steps 200" is "steps=200"; `toml`:
    as a TOML file's key (`PythonName.toml_spelled`). Quoted commands, flags of no setting (a prompt line's --w) and
    other tools' flags stay as written."""
    names = python_names(command)

    def spell(match: re.Match) -> str:
        flag, word = match["flag"], match["word"]
        # "trained with --zero-terminal-snr" in another command's note (sample's) names the training setting
        known = python_names("train") if match.string[:match.start()].endswith(TRAINED_WITH) else names
        name = switch_named(flag, known)
        if name is None:
            return match[0]
        if name.value is not None and word == "must":  # "--dora must be true or false": the setting, not a value
            name = name._replace(value=None)
        value = None
        if word is not None and name.value is None:  # switches take no value
            if not match["quoted"]:
                value = python_value(name, word)
            elif (unquoted := shell_unquoted(word)) is not None:  # quoted: text, whatever it holds
                value = python_text(unquoted)
        spelled = name.toml_spelled if toml else name.spelled
        if value is not None:
            return spelled(value)
        return spelled() + (f" {word}" if word is not None else "")

    def switch_off(match: re.Match) -> str:
        name = switch_named(match["flag1"] or match["flag2"] or match["flag3"], names)
        if name is None or name.value is None:  # no switch (a value's flag): "without ema_decay" reads as it is
            return match[0]
        turned = name._replace(value=not name.value)
        return ("with " if match["without"] else "set ") + (turned.toml_spelled() if toml else turned.spelled())

    def respelled(text: str) -> str:
        return FLAG.sub(spell, SWITCHED_OFF.sub(switch_off, text))

    pieces, start = [], 0
    for quoted in QUOTED_COMMAND.finditer(message):
        pieces += [respelled(message[start:quoted.start()]), quoted[0]]
        start = quoted.end()
    return "".join(pieces) + respelled(message[start:])


errors.respell = python_spelled  # warnings raised to Python code name settings as its errors do (`errors.warn`)


@contextmanager
def spelled_as_flags() -> Iterator[None]:
    """The CLI's block around a command: errors and warnings raised inside keep naming flags (`--overwrite`), as the
    user typed them."""
    token = settings_spelled_for.set(AS_TYPED)
    try:
        yield
    finally:
        settings_spelled_for.reset(token)


@contextmanager
def python_spelling(command: str) -> Iterator[None]:
    """A block of a public function or config method: an SdtuneError leaving it, and a warning raised inside
    (`errors.warn`), names each setting as Python code gives it (`python_spelled`, with `sdtune COMMAND`'s settings),
    unless the CLI or an outer sdtune call answers the user (an outer call's command is the one its settings are
    named by)."""
    if settings_spelled_for.get() is not None:
        yield
        return
    token = settings_spelled_for.set(command)
    try:
        yield
    except SdtuneError as error:
        if len(error.args) == 1 and isinstance(error.args[0], str):
            error.args = (python_spelled(error.args[0], command),)
        raise
    finally:
        settings_spelled_for.reset(token)


def spelled_for_python(command: str) -> Callable[[Callable], Callable]:
    """A public function's decorator: its errors name settings as Python spells them (`python_spelling`). A wrapper
    of sdtune's own, not contextlib's: `errors.warn` finds the caller's line past every frame of the package."""

    def decorate(function: Callable) -> Callable:
        @functools.wraps(function)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            with python_spelling(command):
                return function(*args, **kwargs)

        return wrapper

    return decorate


def _spelled_for_python(method: Callable) -> Callable:
    """A config's method (or classmethod's function) whose errors, raised to Python code, name its settings as
    Python spells them (`python_spelling`)."""

    @functools.wraps(method)
    def wrapper(config, *args: Any, **kwargs: Any):
        with python_spelling(command_of(config if isinstance(config, type) else type(config))):
            return method(config, *args, **kwargs)

    return wrapper


class _Config:
    """TOML in, TOML out, with clear errors for unknown keys and bad values.

    Each setting is its command's flag of the same name (`max_grad_norm`: `--max-grad-norm`), which `sdtune
    COMMAND --help` and the README describe; `load(path, **overrides)` reads a TOML file and applies overrides.
    Building, loading or validating one from Python, an error names settings as Python spells them."""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        for name in ("__post_init__", "validate"):  # each config's own checks, as _Config's below
            if name in vars(cls):
                setattr(cls, name, _spelled_for_python(vars(cls)[name]))

    @_spelled_for_python
    def __new__(cls, *args: Any, **values: Any):
        # before the dataclass's own __init__, which would raise a TypeError: a setting misspelt in Python
        # (`TrainConfig(stepz=3)`) is refused as TOML and flags refuse it, in one SdtuneError line
        if args:
            raise SdtuneError(f"give {cls.__name__}'s settings by name, as in {cls.__name__}(output=\"out\"); got {len(args)} positional value(s)")
        check_setting_names(cls, values)
        return super().__new__(cls)

    @classmethod
    @_spelled_for_python
    def load(cls, path: str | Path | None = None, **overrides: Any):
        values: dict[str, Any] = {}
        if path is not None:
            values.update(read_toml(path))
        values.update({k: v for k, v in overrides.items() if v is not None})
        check_setting_names(cls, values, f" in {path}" if path else "")
        config = cls(**values)
        config.validate()
        return config

    @_spelled_for_python
    def __post_init__(self) -> None:
        # the Python API builds configs directly: types are checked here, for TOML and flags alike
        for name, hint in typing.get_type_hints(type(self)).items():
            value = checked_value(name, getattr(self, name), hint)
            if name in PATH_SETTINGS:
                check_path_not_empty(name, value)
                value = expand_home(value)
            setattr(self, name, value)

    @_spelled_for_python
    def validate(self) -> None:
        pass

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}

    def to_toml(self) -> str:
        import tomli_w

        return tomli_w.dumps(self.to_dict())


def checked_value(name: str, value: Any, hint: Any) -> Any:
    """`value` if it has the type `hint` allows (an int also passes as a float, a path as text, a tuple as a list, and
    one text where only a list of text is allowed as that list); else a one-line error."""
    allowed = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
    if isinstance(value, tuple):  # Python's other sequence: (0, 0.5, 1), ("castle", "canal")
        value = list(value)
    if isinstance(value, list):  # paths (a Run's output, pathlib) where text is asked for, as a single path passes
        value = [os.fspath(item) if isinstance(item, os.PathLike) else item for item in value]
    if allowed == (list[str],) and isinstance(value, (str, os.PathLike)):  # prompt="a castle": a list of one
        value = [os.fspath(value)]
    for kind in allowed:
        origin = typing.get_origin(kind) or kind
        if kind is type(None) and value is None:
            return value
        if origin is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if origin is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if origin in (str, bool, dict) and isinstance(value, origin):
            return value
        if origin is str and isinstance(value, os.PathLike):
            return os.fspath(value)
        if origin is list and isinstance(value, list):
            item_kind = (typing.get_args(kind) or (str,))[0]
            if item_kind is str and all(isinstance(item, str) for item in value):
                return value
            if item_kind is float and all(isinstance(item, (int, float)) and not isinstance(item, bool) for item in value):
                return [float(item) for item in value]
    expected = " or ".join(_type_name(kind) for kind in allowed if kind is not type(None))
    raise SdtuneError(f"setting {name} must be {expected}, got {value!r}")


def _type_name(kind: Any) -> str:
    origin = typing.get_origin(kind) or kind
    if origin is list and typing.get_args(kind) == (float,):
        return "a list of numbers"
    names = {int: "a whole number", float: "a number", str: "text", bool: "true or false",
             dict: "a table", list: "a list of text"}
    return names.get(origin, getattr(origin, "__name__", str(origin)))


def read_toml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    with reading_file(path, "config file", "give a TOML file (a run's config.toml)"):
        text = path.read_bytes()
    try:
        return tomllib.loads(text.decode("utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as error:
        raise SdtuneError(f"{path}: not valid TOML ({error})") from None


def check_seed(seed: int) -> None:
    if not 0 <= seed <= MAX_SEED:
        raise SdtuneError(f"--seed must be between 0 and {MAX_SEED}, got {seed}")


def check_guidance(guidance: float) -> None:
    if not math.isfinite(guidance):
        raise SdtuneError(f"--guidance must be a finite number, got {guidance}")


def check_sample_dtype(flag: str, dtype: str | None) -> None:
    if dtype is not None and dtype not in SAMPLE_DTYPES:
        raise SdtuneError(f"{flag} must be one of {', '.join(SAMPLE_DTYPES)}, got {dtype!r}")


def check_prompt_reading(clip_skip: int | None, max_token_length: int | None) -> None:
    from .conditioning import MAX_TOKEN_LENGTHS

    if clip_skip is not None and clip_skip < 1:
        raise SdtuneError(f"--clip-skip must be at least 1 (1: CLIP's last layer, 2: the one before it), got {clip_skip}")
    if max_token_length is not None and max_token_length not in MAX_TOKEN_LENGTHS:
        raise SdtuneError(f"--max-token-length must be one of {', '.join(map(str, MAX_TOKEN_LENGTHS))} (chunks of 75), got {max_token_length}")


def check_compile_mode(compile: bool, mode: str) -> None:
    if mode not in COMPILE_MODES:
        raise SdtuneError(f"--compile-mode must be one of {', '.join(COMPILE_MODES)}, got {mode!r}")
    if mode != "default" and not compile:  # else the mode would silently do nothing
        raise SdtuneError(f"--compile-mode {mode} applies with --compile")


def check_resolution(resolution: int | None, flag: str = "--resolution") -> None:
    """An image size the VAE maps to whole latents: a positive multiple of 8 (None: the model's own)."""
    if resolution is not None and (resolution < 8 or resolution % 8):
        raise SdtuneError(f"{flag} must be a positive multiple of 8, got {resolution}")


def check_image_sides(config) -> None:
    """A sampling config's --resolution, --width and --height, each a size the VAE maps to whole latents."""
    for flag, value in (("--resolution", config.resolution), ("--width", config.width), ("--height", config.height)):
        check_resolution(value, flag)


@dataclass(frozen=True)
class BaseAdapter:
    """One `--base-adapters FILE[:STRENGTH]` entry."""

    path: str
    strength: float = 1.0


def parse_base_adapter(entry: str) -> BaseAdapter:
    """`FILE` or `FILE:STRENGTH`; a colon followed by no number belongs to the file's name."""
    head, sep, tail = entry.rpartition(":")
    if sep and head:
        try:
            strength = float(tail)
        except ValueError:
            return BaseAdapter(entry)
        if not math.isfinite(strength):
            raise SdtuneError(f"--base-adapters {shell_word(entry)}: the strength must be a finite number, got {tail!r}")
        if abs(strength) > MAX_ADAPTER_SCALE:  # sampling the run stacked on it takes no more
            raise SdtuneError(f"--base-adapters {shell_word(entry)}: the strength must lie within ±{MAX_ADAPTER_SCALE:g}, as sdtune "
                              f"sample's --adapter-scale, got {tail}")
        return BaseAdapter(head, strength)
    if not entry:
        raise SdtuneError("--base-adapters takes FILE or FILE:STRENGTH, got an empty entry")
    return BaseAdapter(entry)


@dataclass
class TrainConfig(_Config):
    """Everything `sdtune train` needs. Each setting is its flag of the same name, which `sdtune train --help` and
    `sdtune.cli.setting_help(TrainConfig, "name")` describe; method options (`options={"rank": 8}`) are those of
    `sdtune methods`. Unset values are resolved by `resolved()`."""

    concept: str | list[str] = "castle"  # several train one adapter, each with its own images and placeholder
    method: str = DEFAULT_METHOD
    options: dict[str, Any] = field(default_factory=dict)  # the method's own options
    model: str = DEFAULT_MODEL
    images: str | list[str] | None = None  # folder of training images (one per concept); default concepts/NAME or the demo set
    output: str | None = None  # default runs/<concept>-<method>
    token: str | list[str] | None = None  # replaces the placeholder (one per concept); default "sks <concept>"
    template: str = "photo of a {token}."
    steps: int = 400
    batch_size: int = 1
    lr: float | None = None  # default: the method's own
    train_text_encoder: bool = False  # also tune the text encoder(s), for methods that can (lora, loha, lokr)
    text_encoder_lr: float | None = None  # the text encoder's learning rate; default: lr
    text_encoder_2_lr: float | None = None  # SDXL's second text encoder's own rate, as kohya's second value; default: text_encoder_lr
    clip_skip: int = 1  # condition on CLIP's k-th layer from the end (2: the penultimate), as kohya-ss and AUTOMATIC1111 count
    max_token_length: int = 75  # tokens a prompt is read to: 75, or 150 / 225 in chunks of 75 (kohya-ss' --max_token_length)
    resolution: int | None = None  # default: the model's native size
    random_flip: bool = False  # mirror concept images left-right at random (not for text, digits, slanted styles)
    seed: int = 0
    save_every: int = 0  # also save the adapter every N steps, each kept as adapter-step-N.safetensors (0: only at the end)
    keep_saves: int = 0  # keep only the newest K of the --save-every files (0: all, as kohya-ss and diffusers do)
    mixed_precision: str = "no"
    gradient_accumulation_steps: int = 1  # micro-batches per optimiser step
    optimizer: str = "adamw"  # adamw, adam, sgd (momentum 0.9), adafactor, adamw8bit or prodigy (sdtune/optimizers.py)
    weight_decay: float | None = None  # default: the method's own (1e-2; 0 for methods that train base weights)
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_epsilon: float = 1e-8
    prodigy_d_coef: float = 1.0  # prodigy: scales its step-size estimate d (Prodigy's README: 2 or 10 larger, 0.5 or 0.1 smaller)
    prodigy_d0: float = 1e-6  # prodigy: its first estimate of d (Prodigy's README: 1e-5 or 1e-4 where d stays too small)
    lr_scheduler: str = "constant"
    lr_warmup_steps: int = 0
    lr_cycles: int = 1  # cosine_with_restarts: number of hard restarts
    max_grad_norm: float = 0.0  # clip the gradient norm to this (0: no clipping; the norm is logged anyway)
    ema_decay: float = 0.0  # keep an EMA of the trained weights with this decay (0: none)
    gradient_checkpointing: bool = False
    compile: bool = False  # torch.compile the UNet: slow first steps, then faster ones (measure before using)
    compile_mode: str = "default"  # torch.compile's mode, one of COMPILE_MODES (reduce-overhead: CUDA graphs)
    checkpoint_every: int = 0  # full training state every N steps into checkpoints/step-N (0: none)
    keep_checkpoints: int = 3
    resume: str | None = None  # "latest" or a checkpoint folder; never written to config.toml
    overwrite: bool = False  # replace an earlier run's files in the output folder; never written to config.toml
    # Starting weights (sdtune/starting_weights.py)
    init_weights: str | None = None  # the method's tensors start from this adapter or kohya file (kohya-ss' --network_weights)
    base_adapters: list[str] = field(default_factory=list)  # FILE[:STRENGTH] merged into the frozen model first (--base_weights)
    # Loss
    snr_gamma: float | None = None  # min-SNR-γ loss weighting (5 is the paper's value); unset: plain MSE
    debiased_estimation: bool = False  # weight each example by 1/√SNR(t) (v-prediction: 1/(SNR(t)+1)), as kohya-ss'
    # rescale the training schedule's betas to SNR 0 at its last timestep (Lin et al. 2023), v-prediction only
    zero_terminal_snr: bool = False
    noise_offset: float = 0.0  # scale of a per-image, per-channel constant added to the noise
    multires_noise_iterations: int = 0  # multi-resolution (pyramid) noise with this many scales (0: off), as kohya-ss'
    multires_noise_discount: float = 0.3  # ... each coarser scale's noise scaled by this once more
    loss_type: str = "l2"  # l2, or the pseudo-Huber losses huber and smooth_l1 (sdtune/losses.py)
    huber_c: float = 0.1  # the pseudo-Huber threshold c (at the noisiest timesteps, with the snr schedule)
    huber_schedule: str = "snr"  # how c follows the timestep: snr, exponential or constant
    min_timestep: int = 0  # train on timesteps from this one ...
    max_timestep: int | None = None  # ... up to, not including, this one (default: the scheduler's count, 1000 for SD)
    input_perturbation: float = 0.0  # noise the input with noise + this times fresh noise; the target keeps the noise
    # Memory
    no_half_vae: bool = False  # keep the VAE in fp32 under mixed precision (for a VAE that overflows in fp16, as SDXL's does)
    cache_latents: bool = True  # encode every image (and its mirror image, with random_flip) and prompt once; exact
    # Prior preservation (DreamBooth): on when any of the class settings is given
    class_images: str | None = None  # folder of class images; default: generated into OUTPUT/class-images
    class_prompt: str | None = None  # default: the template with the plain concept name
    num_class_images: int | None = None  # default: 100 generated, or every image of --class-images
    prior_loss_weight: float = 1.0
    # Validation and logs
    validate_every: int = 0  # sample the validation prompts and measure the validation loss every N steps
    validation_prompts: str | None = None  # prompt file; default: a few prompts with the concept
    validation_images: int = 0  # images held out of training for the validation loss (0: the training images)
    validation_dtype: str | None = None  # the validation grids' precision, as `sdtune sample --dtype`
    # the validation images' size, as `sdtune sample --width/--height` (kohya-ss' --w/--h); each side by default the
    # resolution's (a prompt line's --w and --h win)
    validation_width: int | None = None
    validation_height: int | None = None
    log_with: str | None = None  # comma-separated trackers (tensorboard, wandb, mlflow, ...) or none; default: tensorboard when installed
    tracker_project: str = PROJECT_NAME  # the trackers' project (W&B project, TensorBoard's folder in OUTPUT/logs)
    # Whole-dataset training (sdtune/datasets.py): every image captioned from the dataset's template.
    dataset: str | None = None  # a registered dataset (`sdtune datasets`); replaces the concept's images
    data_root: str | None = None  # the dataset's folder; with a concept, a CustomConcept101 folder
    classes: list[str] = field(default_factory=list)  # only these classes (default: all)
    max_per_class: int = 0  # at most N images a class, drawn at random (0: all)
    split: str | None = None  # VTAB-1k split file (default train800val200)
    class_template: str | None = None  # caption template with {class} (default: the dataset's own)
    balance_classes: bool = True  # draw every class equally often
    # Photo sets (sdtune/buckets.py, sdtune/captions.py): captions beside concept images are always read
    buckets: bool = False  # aspect-ratio buckets instead of center-cropping every image to a square
    caption_dropout: float = 0.0  # train on the empty prompt with this probability
    shuffle_caption: bool = False  # shuffle each caption's comma-separated tags every time it is drawn
    caption_tag_dropout: float = 0.0  # drop each comma-separated tag (after keep_tokens) with this probability
    keep_tokens: int = 0  # with shuffle_caption or caption_tag_dropout: the first N tags stay in place
    masked_loss: bool = False  # weight the loss towards each image's subject by its mask (sdtune/masks.py)
    mask_source: str = "files"  # files: masks/STEM.png beside the images; alpha: each image's alpha channel
    unmasked_weight: float = 0.1  # the loss weight where a mask is black (1 where it is white)
    # New token embeddings trained beside the method (sdtune/token_embeddings.py): N new tokens a concept
    token_embeddings: int = 0  # 0: none; N: <s0>..<sN-1> for the first concept, whose token becomes "<s0><s1> castle"
    embedding_lr: float | None = None  # the new rows' learning rate; default token_embeddings.DEFAULT_EMBEDDING_LR
    embedding_init: str | None = None  # the word the rows start from, or "random"; default: the concept's name
    retract_embeddings: bool = False  # after each step, scale the new rows by (vocabulary std / their std)^0.1, as diffusers'

    def validate(self) -> None:
        _split_classes(self)
        _check_photo_settings(self)
        if self.dataset is not None:
            _check_dataset(self)
        elif self.classes or self.max_per_class or self.split:
            raise SdtuneError("--classes, --max-per-class and --split need --dataset")
        if self.dataset is not None and self.random_flip:
            raise SdtuneError("--random-flip applies to concept images; labelled datasets are not mirrored")
        if self.dataset is not None and (self.validate_every or self.with_prior_preservation):
            raise SdtuneError("--dataset does not combine with --validate-every or prior preservation (class images)")
        for concept in self.concepts:
            if not concept or not concept.replace("-", "").replace("_", "").isalnum():
                raise SdtuneError(f"--concept must be a plain name (letters, digits, - or _), got {concept!r}")
            if NEW_TOKEN.fullmatch(f"<{concept}>"):  # <s0> in a prompt is a trained token, never a placeholder
                raise SdtuneError(f"--concept {concept}: <{concept}> names a trained token (--token-embeddings); choose another name")
        for name in ("steps", "batch_size"):
            if getattr(self, name) < 1:
                raise SdtuneError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if self.lr is not None and not (self.lr > 0 and math.isfinite(self.lr)):
            raise SdtuneError(f"--lr must be positive and finite, got {self.lr}")
        for name in ("text_encoder_lr", "text_encoder_2_lr"):
            value, flag = getattr(self, name), "--" + name.replace("_", "-")
            if value is not None and not (value > 0 and math.isfinite(value)):
                raise SdtuneError(f"{flag} must be positive and finite, got {value}")
            if value is not None and not self.train_text_encoder:
                raise SdtuneError(f"{flag} applies with --train-text-encoder")
        check_seed(self.seed)
        check_resolution(self.resolution)
        check_prompt_reading(self.clip_skip, self.max_token_length)
        if self.save_every < 0:
            raise SdtuneError(f"--save-every must be 0 or more, got {self.save_every}")
        if self.keep_saves < 0:
            raise SdtuneError(f"--keep-saves must be 0 (keep all) or more, got {self.keep_saves}")
        if self.keep_saves and not self.save_every:  # else no save is kept, and it would say nothing
            raise SdtuneError("--keep-saves needs --save-every")
        for name in ("gradient_accumulation_steps", "lr_cycles", "keep_checkpoints"):
            if getattr(self, name) < 1:
                raise SdtuneError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        for name in ("lr_warmup_steps", "checkpoint_every", "max_grad_norm"):
            if getattr(self, name) < 0:
                raise SdtuneError(f"--{name.replace('_', '-')} must be 0 or more, got {getattr(self, name)}")
        if self.lr_scheduler not in LR_SCHEDULERS:
            raise SdtuneError(f"--lr-scheduler must be one of {', '.join(LR_SCHEDULERS)}, got {self.lr_scheduler!r}")
        if self.optimizer not in OPTIMIZERS:
            raise SdtuneError(f"--optimizer must be one of {', '.join(OPTIMIZERS)}, got {self.optimizer!r}")
        if self.weight_decay is not None and not (self.weight_decay >= 0 and math.isfinite(self.weight_decay)):
            raise SdtuneError(f"--weight-decay must be 0 or more and finite, got {self.weight_decay}")
        for name in ("adam_beta1", "adam_beta2"):
            if not 0 <= getattr(self, name) < 1:
                raise SdtuneError(f"--{name.replace('_', '-')} must be in [0, 1), got {getattr(self, name)}")
        if not (self.adam_epsilon > 0 and math.isfinite(self.adam_epsilon)):
            raise SdtuneError(f"--adam-epsilon must be positive and finite, got {self.adam_epsilon}")
        if not (self.prodigy_d_coef > 0 and math.isfinite(self.prodigy_d_coef)):
            raise SdtuneError(f"--prodigy-d-coef must be positive and finite, got {self.prodigy_d_coef}")
        if not (self.prodigy_d0 > 0 and math.isfinite(self.prodigy_d0)):
            raise SdtuneError(f"--prodigy-d0 must be positive and finite, got {self.prodigy_d0}")
        for name, default in (("prodigy_d_coef", 1.0), ("prodigy_d0", 1e-6)):
            if getattr(self, name) != default and self.optimizer != "prodigy":
                raise SdtuneError(f"--{name.replace('_', '-')} applies to --optimizer prodigy, not {self.optimizer}")
        if not 0 <= self.ema_decay < 1:
            raise SdtuneError(f"--ema-decay must be in [0, 1) (0: no EMA), got {self.ema_decay}")
        self.base_adapter_entries  # each FILE[:STRENGTH] parses
        if self.resume and self.overwrite:
            raise SdtuneError("give --resume to continue a run or --overwrite to replace it, not both")
        if self.mixed_precision not in MIXED_PRECISION:
            raise SdtuneError(f"--mixed-precision must be one of {', '.join(MIXED_PRECISION)}")
        check_compile_mode(self.compile, self.compile_mode)
        if "{token}" not in self.template:
            raise SdtuneError(f"--template must contain {{token}}, got {self.template!r}")
        if self.loss_type not in LOSS_TYPES:
            raise SdtuneError(f"--loss-type must be one of {', '.join(LOSS_TYPES)}, got {self.loss_type!r}")
        if self.huber_schedule not in HUBER_SCHEDULES:
            raise SdtuneError(f"--huber-schedule must be one of {', '.join(HUBER_SCHEDULES)}, got {self.huber_schedule!r}")
        if not (self.huber_c > 0 and math.isfinite(self.huber_c)):
            raise SdtuneError(f"--huber-c must be positive and finite, got {self.huber_c}")
        if self.huber_schedule != "constant" and self.huber_c > 1:
            raise SdtuneError(f"--huber-c must be at most 1 with --huber-schedule {self.huber_schedule}, got {self.huber_c}")
        if self.min_timestep < 0:
            raise SdtuneError(f"--min-timestep must be 0 or more, got {self.min_timestep}")
        if self.max_timestep is not None and self.max_timestep <= self.min_timestep:
            raise SdtuneError(f"--max-timestep must be above --min-timestep ({self.min_timestep}), got {self.max_timestep}")
        if not (self.input_perturbation >= 0 and math.isfinite(self.input_perturbation)):
            raise SdtuneError(f"--input-perturbation must be 0 or more and finite, got {self.input_perturbation}")
        if self.multires_noise_iterations < 0:
            raise SdtuneError(f"--multires-noise-iterations must be 0 (off) or more, got {self.multires_noise_iterations}")
        if not (0 < self.multires_noise_discount <= 1):
            raise SdtuneError(f"--multires-noise-discount must be in (0, 1], got {self.multires_noise_discount}")
        if self.multires_noise_discount != 0.3 and not self.multires_noise_iterations:
            raise SdtuneError("--multires-noise-discount applies with --multires-noise-iterations")
        if self.snr_gamma is not None and not self.snr_gamma > 0:
            raise SdtuneError(f"--snr-gamma must be positive, got {self.snr_gamma}")
        for name in ("noise_offset", "prior_loss_weight", "validate_every", "validation_images"):
            if not getattr(self, name) >= 0:
                raise SdtuneError(f"--{name.replace('_', '-')} must be 0 or more, got {getattr(self, name)}")
        if self.num_class_images is not None and self.num_class_images < 1:
            raise SdtuneError(f"--num-class-images must be at least 1, got {self.num_class_images}")
        check_sample_dtype("--validation-dtype", self.validation_dtype)
        check_resolution(self.validation_width, "--validation-width")
        check_resolution(self.validation_height, "--validation-height")
        check_token_settings(self)
        check_log_with(self.log_with)
        if not self.tracker_project or not self.tracker_project.replace("-", "").replace("_", "").replace(".", "").isalnum():
            raise SdtuneError(f"--tracker-project must be a plain name (letters, digits, -, _ or .), got {self.tracker_project!r}")

    @property
    def with_prior_preservation(self) -> bool:
        return bool(self.class_images or self.class_prompt or self.num_class_images)

    def __post_init__(self) -> None:
        _split_classes(self)  # "a,b,c" from the command line
        super().__post_init__()
        for name in ("concept", "images", "token"):  # one concept stays a plain setting, as before several were possible
            value = getattr(self, name)
            if isinstance(value, list) and len(value) == 1:
                setattr(self, name, value[0])

    @property
    def base_adapter_entries(self) -> list[BaseAdapter]:
        """`base_adapters` parsed: the one list the plan, the model loading and the records read (the setting itself
        stays the strings given, as TOML and the command line write them)."""
        return [parse_base_adapter(entry) for entry in self.base_adapters]

    @property
    def concepts(self) -> list[str]:
        """The concepts' names (one or several)."""
        return list(self.concept) if isinstance(self.concept, list) else [self.concept]

    @property
    def prompt_reading(self):
        """How the run reads prompts (conditioning.PromptReading)."""
        from .conditioning import PromptReading

        return PromptReading(self.clip_skip, self.max_token_length)

    @property
    def varied_captions(self) -> bool:
        """Whether a caption's tags are shuffled or dropped each time it is drawn (too many variants to cache)."""
        return self.shuffle_caption or self.caption_tag_dropout > 0

    @property
    def concept_tokens(self) -> dict[str, str]:
        """Each concept's name → the text that replaces its placeholder `<name>`."""
        if len(self.concepts) == 1:
            return {self.concepts[0]: self.token or self.default_token(self.concepts[0])}
        if isinstance(self.token, list):
            return dict(zip(self.concepts, self.token))
        return {name: self.default_token(name) for name in self.concepts}

    def default_token(self, name: str) -> str:
        """A concept's token where --token gives none: "sks castle", or with new token embeddings "<s0><s1> castle"."""
        if not self.token_embeddings:
            return f"sks {name}"
        return default_token(name, new_token_names(self.concepts, self.token_embeddings)[name])

    def concept_prompt(self, name: str) -> str:
        """The template's prompt for one concept's images."""
        return self.template.format(token=self.concept_tokens[name])

    def to_dict(self) -> dict[str, Any]:
        values = super().to_dict()
        values.pop("overwrite", None)  # run control, as resume
        for name in PHOTO_SETTINGS:  # at their defaults, left out: a run's config.toml reads as before they existed
            if values.get(name) == TrainConfig.__dataclass_fields__[name].default:
                values.pop(name)
        if not self.masked_loss:  # as the pseudo-Huber settings below
            for name in ("mask_source", "unmasked_weight"):
                values.pop(name, None)
        if self.loss_type == "l2":  # a plain-MSE run's config.toml stays as before the pseudo-Huber losses existed
            for name in ("loss_type", "huber_c", "huber_schedule"):
                values.pop(name, None)
        for name in ("min_timestep", "input_perturbation"):  # at their defaults, left out, as above
            if values.get(name) == 0:
                values.pop(name)
        if not self.debiased_estimation:  # as above
            values.pop("debiased_estimation", None)
        if not self.zero_terminal_snr:  # as above
            values.pop("zero_terminal_snr", None)
        if not self.multires_noise_iterations:  # as above
            for name in ("multires_noise_iterations", "multires_noise_discount"):
                values.pop(name, None)
        for name, default in (("prodigy_d_coef", 1.0), ("prodigy_d0", 1e-6)):  # as above
            if values.get(name) == default:
                values.pop(name)
        for name in ("clip_skip", "max_token_length"):  # as above (PromptReading's: only where not its default)
            if name not in self.prompt_reading.metadata():
                values.pop(name, None)
        if self.compile_mode == "default":  # as above
            values.pop("compile_mode", None)
        if not self.train_text_encoder:  # a UNet-only run's config.toml stays as before the setting existed
            values.pop("train_text_encoder", None)
        if not self.token_embeddings:  # a run without new tokens: its config.toml stays as before they existed
            for name in ("token_embeddings", "embedding_lr", "embedding_init"):
                values.pop(name, None)
        if not self.retract_embeddings:  # as it was before the setting existed
            values.pop("retract_embeddings", None)
        if not self.base_adapters:  # as above
            values.pop("base_adapters", None)
        if not self.dataset:  # a concept run's config.toml stays free of dataset settings
            for name in ("classes", "max_per_class", "split", "class_template", "balance_classes"):
                values.pop(name, None)
        return values

    @property
    def placeholder(self) -> str:
        """The (first) concept's placeholder; `concept_tokens` has every concept's."""
        return "" if self.dataset else f"<{self.concepts[0]}>"

    def resolved(self, default_lr: float) -> "TrainConfig":
        """A copy with every default filled in, as written to config.toml (the learning rate: the optimiser's
        own where it has one, as Prodigy does, else the method's `default_lr`)."""
        optimizer = OPTIMIZERS.get(self.optimizer)
        lr = optimizer.default_lr if optimizer and optimizer.default_lr else default_lr
        name = self.dataset or "+".join(self.concepts)
        prior = self.with_prior_preservation
        return dataclasses.replace(
            self,
            options=dict(self.options),
            classes=list(self.classes),
            base_adapters=list(self.base_adapters),
            output=self.output or str(Path("runs") / f"{name}-{self.method}"),
            token=None if self.dataset else self.token if len(self.concepts) > 1 else self.token or self.default_token(self.concept),
            lr=self.lr or lr,
            text_encoder_lr=(self.text_encoder_lr or self.lr or lr) if self.train_text_encoder else None,
            resume=None,  # how this run started, not a setting to replay
            overwrite=False,
            class_prompt=self.class_prompt or (self.template.format(token=self.concept) if prior else None),
            num_class_images=self.num_class_images or (DEFAULT_CLASS_IMAGES if prior and not self.class_images else None),
            log_with=resolve_log_with(self.log_with),
            embedding_lr=(self.embedding_lr or DEFAULT_EMBEDDING_LR) if self.token_embeddings else None,
        )

    @property
    def prompt(self) -> str:
        """The (first) concept's prompt from the template."""
        return self.concept_prompt(self.concepts[0])


def _split_classes(config) -> None:
    """--classes a,b,c (or a TOML list) as a list of names."""
    if isinstance(config.classes, str):
        text, config.classes = config.classes, [name.strip() for name in config.classes.split(",") if name.strip()]
        if not config.classes:  # given, but naming none: not "every class"
            raise SdtuneError(f"--classes takes class names separated by commas, got {text!r}")
    if not isinstance(config.classes, list) or not all(isinstance(name, str) and name for name in config.classes):
        raise SdtuneError(f"--classes takes class names separated by commas, got {config.classes!r}")


PHOTO_SETTINGS = ("buckets", "caption_dropout", "shuffle_caption", "caption_tag_dropout", "keep_tokens", "masked_loss")


def _check_photo_settings(config) -> None:
    """Several concepts, buckets and caption augmentation: what combines with what."""
    concepts = config.concepts
    if not concepts:
        raise SdtuneError("--concept needs a name (or a list of names)")
    if len(set(concepts)) != len(concepts):
        raise SdtuneError(f"--concept names a concept twice: {', '.join(concepts)}")
    folders = len(config.images) if isinstance(config.images, list) else int(config.images is not None)
    if folders and folders != len(concepts):
        raise SdtuneError(f"give one --images folder per --concept: {folders} for {len(concepts)} concepts")
    tokens = len(config.token) if isinstance(config.token, list) else int(config.token is not None)
    if tokens and tokens != len(concepts):
        raise SdtuneError(
            f"give one --token per --concept ({tokens} for {len(concepts)} concepts), or none: each <NAME> then "
            "becomes 'sks NAME'"
        )
    if len(concepts) > 1:
        if config.dataset is not None:
            raise SdtuneError("--dataset trains on a labelled dataset; it takes no --concept")
        if config.with_prior_preservation:
            raise SdtuneError("prior preservation (class images) takes one --concept")
    if not (0 <= config.caption_dropout < 1):
        raise SdtuneError(f"--caption-dropout must be in [0, 1), got {config.caption_dropout}")
    if not (0 <= config.caption_tag_dropout < 1):
        raise SdtuneError(f"--caption-tag-dropout must be in [0, 1), got {config.caption_tag_dropout}")
    if config.keep_tokens < 0:
        raise SdtuneError(f"--keep-tokens must be 0 or more, got {config.keep_tokens}")
    if config.keep_tokens and not config.varied_captions:
        raise SdtuneError("--keep-tokens applies to --shuffle-caption and --caption-tag-dropout")
    if config.buckets and config.dataset is not None:
        raise SdtuneError("--buckets applies to concept images; a labelled dataset's images are center-cropped")
    if config.mask_source not in MASK_SOURCES:
        raise SdtuneError(f"--mask-source must be one of {', '.join(MASK_SOURCES)}, got {config.mask_source!r}")
    if not 0 <= config.unmasked_weight < 1:  # 1 would be no mask at all; NaN fails too
        raise SdtuneError(f"--unmasked-weight must be in [0, 1), got {config.unmasked_weight}")
    if not config.masked_loss and (config.mask_source, config.unmasked_weight) != (TrainConfig.mask_source, TrainConfig.unmasked_weight):
        raise SdtuneError("--mask-source and --unmasked-weight apply to --masked-loss")
    if config.masked_loss and config.dataset is not None:
        raise SdtuneError("--masked-loss applies to concept images; a labelled dataset's images have no masks")


def _check_dataset(config) -> None:
    from .datasets import VTAB_SPLITS, LabelledDataset, dataset_info, missing_data_root

    info = dataset_info(config.dataset)  # an unknown name lists the known ones
    # what needs no image read is checked now, before a model loads (a sweep's whole plan at once)
    if info.class_names and config.classes:  # a misspelt or repeated class
        LabelledDataset(info.name, list(info.class_names), info.template, []).select_classes(list(config.classes))
    if not info.needs_root and config.data_root:
        raise SdtuneError(f"dataset {info.name!r} is built in; it takes no --data-root")
    # training reads the images; sampling only where the classes are the folder's
    if info.needs_root and not config.data_root and (isinstance(config, TrainConfig) or not info.class_names):
        raise missing_data_root(info)
    if getattr(config, "images", None):
        raise SdtuneError("give --dataset or --images, not both")
    if getattr(config, "max_per_class", 0) < 0:
        raise SdtuneError(f"--max-per-class must be 0 (all) or more, got {config.max_per_class}")
    if getattr(config, "split", None) is not None and config.split not in VTAB_SPLITS:
        raise SdtuneError(f"--split must be one of {', '.join(VTAB_SPLITS)}, got {config.split!r}")
    if config.class_template is not None and not config.class_template.strip():
        raise SdtuneError("--class-template must not be empty")
    if config.class_template is not None and "{class}" not in config.class_template:  # every class captioned alike
        raise SdtuneError(f"--class-template must contain {{class}}, got {config.class_template!r}")


@dataclass
class SampleConfig(_Config):
    """Everything `sdtune sample` needs. Each setting is its flag of the same name, which `sdtune sample --help` and
    `sdtune.cli.setting_help(SampleConfig, "name")` describe."""

    prompts: str | None = None  # a prompt file; one prompt a line, '#' comments, kohya-ss' --n, --w, ... after a prompt its own
    prompt: list[str] = field(default_factory=list)  # prompts given directly
    # none of prompts, prompt and dataset: one adapter's training prompt (each concept's in turn, for a run of several)
    adapter: str | list[str] | None = None  # adapter file or run folder (several stack); none samples the base model
    model: str | None = None  # default: the (first) adapter's base model, else SD v1.4
    output: str | None = None  # default: <run>/samples (the first adapter's), else samples/
    num_images: int = 4
    steps: int = 30
    guidance: float = 7.5
    seed: int = 0
    resolution: int | None = None  # a square's side; default: the model's native size
    width: int | None = None  # default: resolution (A1111's and kohya's --w)
    height: int | None = None  # default: resolution (A1111's and kohya's --h)
    token: str | None = None  # default: the adapter's token
    dataset: str | None = None  # one row per class, captioned from the dataset's template
    data_root: str | None = None  # only for datasets whose classes come from their folder
    classes: list[str] = field(default_factory=list)  # only these classes' rows
    class_template: str | None = None  # default: the dataset's own
    negative_prompt: str | None = None  # what classifier-free guidance steers away from, for every prompt
    # rescales the guided prediction's spread (Lin et al. 2023, "Common Diffusion Noise Schedules and Sample
    # Steps Are Flawed"); default: 0.7 for a zero-terminal-SNR model (its scheduler config says so), else 0
    guidance_rescale: float | None = None
    scheduler: str = "default"  # the sampler; "default" is the model's own
    # the update's strength: W + scale·ΔW (0: the base model); a list draws every prompt and seed at each,
    # or, with several adapters, gives each its own strength
    adapter_scale: float | list[float] = 1.0
    clip_skip: int | None = None  # CLIP's k-th layer from the end conditions the images; default: the adapters', else 1
    max_token_length: int | None = None  # tokens a prompt is read to (75, 150, 225); default: the adapters', else 75
    dtype: str | None = None  # fp16, bf16 or fp32; default: fp16 on a GPU, fp32 on a CPU (under fp16 SDXL's VAE decodes in fp32; others in fp16, an overflowing image again in fp32)
    overwrite: bool = False  # replace the images and grid of an earlier sample in the output folder

    def __post_init__(self) -> None:
        _split_classes(self)  # "a,b,c" from the command line
        _split_scales(self)  # "0,0.5,1" from the command line
        super().__post_init__()
        if isinstance(self.adapter, list) and len(self.adapter) <= 1:  # one adapter stays a plain setting
            self.adapter = self.adapter[0] if self.adapter else None

    @property
    def adapters(self) -> list[str]:
        """The adapters, in the order they merge: none, one, or several that stack."""
        return listed(self.adapter)

    @property
    def stacked(self) -> bool:
        """Several adapters, merged one after the other into the base model, each at its own strength."""
        return len(self.adapters) > 1

    @property
    def adapter_scales(self) -> list[float]:
        """The strengths to draw at: one, or the sweep's (stacked adapters: one drawing, their own strengths)."""
        if self.stacked:
            return [1.0]
        return list(self.adapter_scale) if isinstance(self.adapter_scale, list) else [self.adapter_scale]

    @property
    def stack_scales(self) -> list[float]:
        """Each stacked adapter's strength: one each, or one for all."""
        return strengths(self.adapter_scale, len(self.adapters))

    def validate(self) -> None:
        _split_classes(self)
        _split_scales(self)
        if self.dataset is not None:
            _check_dataset(self)
        elif self.classes:
            raise SdtuneError("--classes needs --dataset")
        if not self.prompts and not self.prompt and not self.dataset and not self.adapter:  # an adapter: its run's prompts
            raise SdtuneError("give a prompt file (--prompts FILE), a prompt (--prompt TEXT) or a dataset (--dataset NAME)")
        for name in ("num_images", "steps"):
            if getattr(self, name) < 1:
                raise SdtuneError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        check_guidance(self.guidance)
        if self.guidance_rescale is not None and not 0 <= self.guidance_rescale <= 1:
            raise SdtuneError(f"--guidance-rescale must be in [0, 1], got {self.guidance_rescale}")
        check_seed(self.seed)
        check_image_sides(self)
        check_prompt_reading(self.clip_skip, self.max_token_length)
        _check_sampler_settings(self)
        if (isinstance(self.adapter_scale, list) or self.adapter_scale != 1.0) and not self.adapter:
            raise SdtuneError("--adapter-scale needs --adapter")
        if self.stacked:
            if isinstance(self.adapter_scale, list) and len(self.adapter_scale) != len(self.adapters):
                raise SdtuneError(
                    f"--adapter-scale with {len(self.adapters)} adapters takes one strength for all or one each "
                    f"({len(self.adapters)}, comma-separated), got {scales_text(self.adapter_scale)}; "
                    "a strength sweep takes one adapter"
                )
        elif isinstance(self.adapter_scale, list):
            if not self.adapter_scale:
                raise SdtuneError("--adapter-scale needs at least one number")
            names = [strength_name(scale) for scale in self.adapter_scale]
            if len(set(names)) != len(names):
                raise SdtuneError(f"--adapter-scale lists a strength twice (to 6 digits): {scales_text(self.adapter_scale)}")


def _split_scales(config) -> None:
    """--adapter-scale 0,0.5,1 as a list of numbers; one number stays a number."""
    config.adapter_scale = split_numbers(config.adapter_scale, "--adapter-scale")


def split_numbers(value, flag: str):
    """"0,0.5,1" from the command line as a list of numbers; one number stays a number."""
    if not isinstance(value, str):
        return value
    try:
        values = [float(part) for part in value.split(",")]
    except ValueError:
        raise SdtuneError(f"{flag} takes numbers separated by commas, got {value!r}") from None
    return values if len(values) != 1 else values[0]


def listed(value) -> list[str]:
    """A setting of one path or several (`--adapter A --adapter B`) as a list of text; unset: none."""
    if value is None or value == "":
        return []
    return [str(v) for v in value] if isinstance(value, list) else [str(value)]


def strengths(scale: float | list[float], count: int) -> list[float]:
    """The strength of each of `count` stacked adapters: a list gives one each, a number one for all."""
    return list(scale) if isinstance(scale, (list, tuple)) else [scale] * count


def strength_name(scale: float) -> str:
    """How an adapter strength is written: in a sweep's image names (NNN-scaleS-seedK), labels and messages."""
    return f"{scale:g}"


def scales_text(scales: list[float]) -> str:
    """Strengths as a message and `--adapter-scale` write them: 0,0.5,1."""
    return ",".join(strength_name(scale) for scale in scales)


MAX_ADAPTER_SCALE = 100.0  # strengths are fractions or small multiples of the trained update


def _check_sampler_settings(config) -> None:
    """The sampling settings `sdtune sample` and `sdtune evaluate` share."""
    if config.scheduler not in SCHEDULERS:
        raise SdtuneError(f"--scheduler must be one of {', '.join(SCHEDULERS)}, got {config.scheduler!r}")
    check_sample_dtype("--dtype", config.dtype)
    scales = config.adapter_scale if isinstance(config.adapter_scale, list) else [config.adapter_scale]
    if not all(math.isfinite(scale) for scale in scales):
        raise SdtuneError(f"--adapter-scale must be a finite number, got {scales_text(scales)}")
    if any(abs(scale) > MAX_ADAPTER_SCALE for scale in scales):
        raise SdtuneError(
            f"--adapter-scale must lie within ±{MAX_ADAPTER_SCALE:g} (further out, the weights overflow to "
            f"infinities and the images come out blank), got {scales_text(scales)}"
        )


EXPORT_FORMATS = ("kohya", "diffusers", "peft")
MERGE_DTYPES = ("fp32", "fp16", "bf16")


@dataclass
class ExportConfig(_Config):
    """Everything `sdtune export` needs. Each setting is its flag of the same name, which `sdtune export --help` and
    `sdtune.cli.setting_help(ExportConfig, "name")` describe."""

    source: str = ""  # an sdtune adapter file or run folder
    format: str = "kohya"  # kohya, diffusers (LoRA) or peft (lora, loha, lokr, oft)
    output: str = ""  # a file (kohya, diffusers) or a new folder (peft)
    model: str | None = None  # the base model diff-style kohya exports use (default: the adapter's)
    full_diff: bool = False  # kohya diffs: a zero .diff beside every lone .diff_b, for LyCORIS, A1111, InvokeAI
    dtype: str = "fp32"  # the written tensors: fp32 (as trained), or fp16 / bf16 at half the size (kohya's --save_precision)
    overwrite: bool = False  # replace an existing output (never the adapter being exported)

    def validate(self) -> None:
        if not self.source or not self.output:
            raise SdtuneError("export needs an adapter (file or run folder) and --output")
        if self.format not in EXPORT_FORMATS:
            raise SdtuneError(f"--format {self.format!r} is not available; choose: {', '.join(EXPORT_FORMATS)}")
        if self.full_diff and self.format != "kohya":
            raise SdtuneError(f"--full-diff applies to --format kohya, not {self.format}")
        if self.dtype not in MERGE_DTYPES:
            raise SdtuneError(f"--dtype {self.dtype!r} is not available; choose: {', '.join(MERGE_DTYPES)}")


EXTRACT_DYNAMIC = ("sv_fro", "sv_cumulative", "sv_ratio")  # kohya-ss resize_lora's --dynamic_method


@dataclass
class ExtractConfig(_Config):
    """Everything `sdtune extract` needs: an adapter's update as a LoRA of the chosen rank. Each setting is its flag of
    the same name, which `sdtune extract --help` and `sdtune.cli.setting_help(ExtractConfig, "name")` describe."""

    source: str = ""  # an sdtune adapter file or run folder, or a kohya-format file
    output: str = ""  # the LoRA file; its summary goes beside it as <name>.extract.json
    rank: int = 4  # each layer's rank (with --dynamic, the most it may take), as kohya-ss' --dim
    conv_rank: int | None = None  # the rank of 3x3 convolutions (LoCon) (default: --rank), as kohya-ss' --conv_dim
    dynamic: str | None = None  # choose each layer's rank from its singular values: sv_fro, sv_cumulative or sv_ratio
    threshold: float | None = None  # --dynamic's target: kept fraction (sv_fro, sv_cumulative) or largest/smallest kept (sv_ratio)
    model: str | None = None  # the base model ΔW is computed on (default: the adapter's)
    dtype: str = "fp32"  # the LoRA's tensors: fp32, fp16 or bf16
    keep_biases: bool = False  # write Linear/Conv2d bias changes exactly as `.diff_b` keys (ComfyUI reads them; diffusers refuses the file)
    keep_norms: bool = False  # write norm layers' changes exactly as LyCORIS' `.w_norm`/`.b_norm` keys (diffusers refuses the file)
    base_adapters: list[str] = field(default_factory=list)  # FILE[:STRENGTH]: the adapter's base adapters, ΔW taken on them
    overwrite: bool = False  # replace an existing output (never the adapter read)

    def validate(self) -> None:
        if not self.source or not self.output:
            raise SdtuneError("extract needs an adapter (file or run folder) and --output")
        self.base_adapter_entries  # each FILE[:STRENGTH] parses
        for flag, value in (("--rank", self.rank), ("--conv-rank", self.conv_rank)):
            if value is not None and value < 1:
                raise SdtuneError(f"{flag} must be 1 or more, got {value}")
        if self.dtype not in MERGE_DTYPES:
            raise SdtuneError(f"--dtype {self.dtype!r} is not available; choose: {', '.join(MERGE_DTYPES)}")
        if self.dynamic is None:
            if self.threshold is not None:
                raise SdtuneError("--threshold applies with --dynamic (sv_fro, sv_cumulative or sv_ratio)")
            return
        if self.dynamic not in EXTRACT_DYNAMIC:
            raise SdtuneError(f"--dynamic {self.dynamic!r} is not available; choose: {', '.join(EXTRACT_DYNAMIC)}")
        if self.threshold is None:
            raise SdtuneError(f"--dynamic {self.dynamic} needs --threshold")
        if self.dynamic == "sv_ratio":
            if not (math.isfinite(self.threshold) and self.threshold >= 1):
                raise SdtuneError(f"--threshold with --dynamic sv_ratio is the largest kept ratio of singular values, 1 or more, got {self.threshold}")
        elif not 0 < self.threshold <= 1:
            raise SdtuneError(f"--threshold with --dynamic {self.dynamic} is the fraction to keep, above 0 and at most 1, got {self.threshold}")

    @property
    def layer_conv_rank(self) -> int:
        return self.rank if self.conv_rank is None else self.conv_rank

    @property
    def base_adapter_entries(self) -> list[BaseAdapter]:
        return [parse_base_adapter(entry) for entry in self.base_adapters]


@dataclass
class CardConfig(_Config):
    """Everything `sdtune card` needs. Each setting is its flag of the same name, which `sdtune card --help` and
    `sdtune.cli.setting_help(CardConfig, "name")` describe."""

    source: str = ""  # an sdtune run folder or adapter file
    output: str | None = None  # default: RUN/README.md
    license: str | None = None  # the Hub's license id (the base model's, e.g. creativeml-openrail-m for SD v1.x)
    overwrite: bool = False  # replace an existing card

    def validate(self) -> None:
        if not self.source:
            raise SdtuneError("card needs a run folder or adapter file")
        if self.license is not None and not re.fullmatch(r"[a-z0-9][a-z0-9.+-]*", self.license):
            raise SdtuneError(f"--license must be a Hub license id (such as creativeml-openrail-m or mit), got {self.license!r}")


@dataclass
class MergeConfig(_Config):
    """Everything `sdtune merge` needs. Each setting is its flag of the same name, which `sdtune merge --help` and
    `sdtune.cli.setting_help(MergeConfig, "name")` describe."""

    source: str | list[str] = ""  # an sdtune adapter file or run folder, or a kohya-format file; several stack
    output: str = ""  # a new folder for the diffusers pipeline
    dtype: str = "fp32"
    model: str | None = None  # default: the (first) adapter's base model
    scale: float | list[float] = 1.0  # the update's strength: W + scale·ΔW; with several adapters, one each
    overwrite: bool = False  # replace an existing output folder (never one holding the adapter)

    def __post_init__(self) -> None:
        self.scale = split_numbers(self.scale, "--scale")  # "1,0.5" from the command line
        super().__post_init__()
        if isinstance(self.source, list) and len(self.source) == 1:  # one adapter stays a plain setting
            self.source = self.source[0]

    @property
    def sources(self) -> list[str]:
        return listed(self.source)

    @property
    def scales(self) -> list[float]:
        """Each adapter's strength: one each, or one for all."""
        return strengths(self.scale, len(self.sources))

    def validate(self) -> None:
        self.scale = split_numbers(self.scale, "--scale")
        if not self.sources or not self.output:
            raise SdtuneError("merge needs an adapter (file or run folder) and --output")
        if self.dtype not in MERGE_DTYPES:
            raise SdtuneError(f"--dtype {self.dtype!r} is not available; choose: {', '.join(MERGE_DTYPES)}")
        scales = self.scale if isinstance(self.scale, list) else [self.scale]
        if isinstance(self.scale, list) and len(self.scale) != len(self.sources):
            raise SdtuneError(
                f"--scale with {len(self.sources)} adapters takes one strength for all or one each, got {scales_text(scales)}"
            )
        if not all(math.isfinite(scale) for scale in scales):
            raise SdtuneError(f"--scale must be a finite number, got {scales_text(scales)}")


FID_FEATURES = ("inception", "clip", "dino", "none")
DEFAULT_CLIP_MODEL = "openai/clip-vit-base-patch32"
DEFAULT_DINO_MODEL = "facebook/dino-vits16"


@dataclass
class EvaluateConfig(_Config):
    """Everything `sdtune evaluate` needs: what to measure, against what, with which models. Each setting is its flag of
    the same name, which `sdtune evaluate --help` and `sdtune.cli.setting_help(EvaluateConfig, "name")` describe."""

    run: str | None = None  # run folder or adapter file to sample from (and where eval.json goes)
    images: str | None = None  # a folder of generated images instead of sampling (e.g. RUN/samples)
    prompts: str | None = None  # prompt file; default: the run's training prompt (each concept's, for several)
    prompt: list[str] = field(default_factory=list)  # prompts given directly
    reference: str | None = None  # reference images; default: the run's training images
    output: str | None = None  # default: RUN/eval.json, else IMAGES/eval.json
    num_images: int = 4  # images per prompt when sampling
    seed: int = 0
    steps: int = 30
    guidance: float = 7.5
    resolution: int | None = None
    width: int | None = None  # default: resolution
    height: int | None = None  # default: resolution
    negative_prompt: str | None = None  # sampling settings as `sdtune sample`'s
    scheduler: str = "default"
    adapter_scale: float = 1.0
    dtype: str | None = None  # as `sdtune sample --dtype`
    clip_model: str = DEFAULT_CLIP_MODEL  # CLIP-T, CLIP-I (and FID features with fid_features="clip")
    dino_model: str = DEFAULT_DINO_MODEL  # DINO, diversity (and FID features with fid_features="dino")
    fid_features: str = "inception"  # feature model of FID and KID: inception, clip, dino or none

    def validate(self) -> None:
        if not self.run and not self.images:
            raise SdtuneError("give a run to sample from (--run RUN) or a folder of generated images (--images DIR)")
        for name in ("num_images", "steps"):
            if getattr(self, name) < 1:
                raise SdtuneError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        check_guidance(self.guidance)
        check_seed(self.seed)
        check_image_sides(self)
        if self.fid_features not in FID_FEATURES:
            raise SdtuneError(f"--fid-features must be one of {', '.join(FID_FEATURES)}, got {self.fid_features!r}")
        _check_sampler_settings(self)


@dataclass
class CompareConfig(_Config):
    """Everything `sdtune compare` needs: the runs, where to write, and how to draw the image grid. Each setting is its
    flag of the same name, which `sdtune compare --help` and `sdtune.cli.setting_help(CompareConfig, "name")`
    describe."""

    runs: list[str] = field(default_factory=list)
    output: str = "comparison"
    prompts: str | None = None  # grid prompts; default: the first run's evaluation prompts, else its training prompt(s)
    prompt: list[str] = field(default_factory=list)
    seed: int = 0  # the one seed every run samples the grid with
    steps: int = 30
    guidance: float = 7.5
    grid: bool = True  # sample the side-by-side grid (the only part that runs the models)

    def validate(self) -> None:
        if not self.runs:
            raise SdtuneError("give at least one run folder to compare")
        if self.steps < 1:
            raise SdtuneError(f"--steps must be at least 1, got {self.steps}")
        check_guidance(self.guidance)
        check_seed(self.seed)


@dataclass
class ExplainConfig(_Config):
    """Everything `sdtune explain` needs: the run, and how to draw what its adapter learned. Each setting is its flag of
    the same name, which `sdtune explain --help` and `sdtune.cli.setting_help(ExplainConfig, "name")` describe."""

    run: str = ""  # run folder or adapter file
    prompt: str | None = None  # the prompt of the image that maps are drawn over, where a method draws them
    layer: str | None = None  # only this tuned layer (its full module name); default: all
    step: int | None = None  # the denoising step to read, from 0; default: the mean over all steps
    output: str | None = None  # default: RUN/explain
    steps: int = 30  # denoising steps of the generated image
    guidance: float = 7.5
    seed: int = 0  # seed of the generated image
    resolution: int | None = None  # default: the model's native size
    width: int | None = None  # the generated image's width; default: resolution (as `sdtune sample --width`)
    height: int | None = None  # the generated image's height; default: resolution
    token: str | None = None  # text for <name> placeholders; default: the adapter's token
    model: str | None = None  # default: the adapter's base model

    def validate(self) -> None:
        if not self.run:
            raise SdtuneError("explain needs a run folder or adapter file")
        if self.steps < 1:
            raise SdtuneError(f"--steps must be at least 1, got {self.steps}")
        if self.step is not None and self.step < 0:
            raise SdtuneError(f"--step counts denoising steps from 0, got {self.step}")
        check_guidance(self.guidance)
        check_seed(self.seed)
        check_image_sides(self)


@dataclass
class SweepConfig(_Config):
    """Everything `sdtune sweep` needs: the plan, and which of its runs to do here. Each setting is its flag of the same
    name, which `sdtune sweep --help` and `sdtune.cli.setting_help(SweepConfig, "name")` describe."""

    plan: str = ""  # the plan's TOML file (sweeps/*.toml)
    output: str | None = None  # default: the plan's own `output`, else runs/sweeps/<plan name>
    shard: str | None = None  # "i/N": the runs whose index is i modulo N (i from 0)
    dry_run: bool = False  # list the runs and their state; train nothing
    report_only: bool = False  # write the report over the runs finished so far; train nothing

    def validate(self) -> None:
        if not self.plan:
            raise SdtuneError("sweep needs a plan file (sweeps/*.toml)")
        if self.dry_run and self.report_only:
            raise SdtuneError("give --dry-run or --report-only, not both")
        parse_shard(self.shard)


def parse_shard(text: str | None) -> tuple[int, int] | None:
    """`--shard i/N` (0 <= i < N) as (i, N), or None."""
    if text is None:
        return None
    match = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text)
    if not match or not 0 <= int(match.group(1)) < int(match.group(2)):
        raise SdtuneError(f"--shard takes i/N with 0 <= i < N (e.g. 0/4 ... 3/4), got {text!r}")
    return int(match.group(1)), int(match.group(2))
