"""The registry of tuning methods: `available()` lists them, `create(name, **options)` builds one.

It also holds `OPTION_FLAGS`, the dedicated `sdtune train` flags of method options. Importing this
module stays cheap (no torch): the method modules load only when a method is asked for.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any, NamedTuple

from ..errors import SdtuneError
from .choices import ATOMS_INITS, GIFT_GENERATORS, LAYER_FAMILIES

if TYPE_CHECKING:
    from .base import Method

DEFAULT_METHOD = "atoms"  # what `sdtune train` trains unless told otherwise

_REGISTRY: dict[str, str] = {
    # name -> "module:Class", imported on demand so listing methods stays cheap
    "atoms": "atoms:FilterAtoms",
    "bitfit": "bitfit:BitFit",
    "difffit": "difffit:DiffFit",
    "full": "full:FullFineTune",
    "gift": "gift:Gift",
    "lora": "lowrank:Lora",
    "loha": "lowrank:Loha",
    "lokr": "lowrank:Lokr",
    "oft": "oft:Oft",
}


class OptionFlag(NamedTuple):
    """A command-line flag for one method option; its help is the option field's metadata."""

    methods: tuple[str, ...]  # the methods that take it (the first one's Options field gives the help)
    option: str  # the option's name in their Options
    type: type  # the flag's value type
    switch: str | None = None  # true/false options: the "--x/--no-x" pair
    words: tuple[str, ...] = ()  # options that take one of a few words: those (a message's "--targets attn" is a value)



_LOW_RANK = ("lora", "loha", "lokr")
# `sdtune train`'s flags for method options, in the order `sdtune train --help` lists them;
# every other option is reached with `-o KEY=VALUE`.
OPTION_FLAGS: dict[str, OptionFlag] = {
    "--atoms-m": OptionFlag(("atoms",), "m", int),
    "--gift-generator": OptionFlag(("gift",), "generator", str, words=GIFT_GENERATORS),
    "--gift-rank": OptionFlag(("gift",), "rank", int),
    "--gift-clusters": OptionFlag(("gift",), "clusters", int),
    "--gift-blocks": OptionFlag(("gift",), "blocks", int),
    "--rank": OptionFlag(_LOW_RANK, "rank", int),
    "--alpha": OptionFlag(_LOW_RANK, "alpha", float),
    "--conv-rank": OptionFlag(_LOW_RANK, "conv_rank", int),
    "--conv-alpha": OptionFlag(_LOW_RANK, "conv_alpha", float),
    "--targets": OptionFlag((*_LOW_RANK, "oft"), "targets", str, words=LAYER_FAMILIES),
    "--dora": OptionFlag(("lora",), "dora", bool, "--dora/--no-dora"),
    "--loraplus-lr-ratio": OptionFlag(("lora",), "loraplus_lr_ratio", float),
    "--lora-dropout": OptionFlag(("lora",), "dropout", float),
    "--rank-dropout": OptionFlag(_LOW_RANK, "rank_dropout", float),
    "--module-dropout": OptionFlag(_LOW_RANK, "module_dropout", float),
    "--factor": OptionFlag(("lokr",), "factor", int),
    "--decompose-both": OptionFlag(("lokr",), "decompose_both", bool, "--decompose-both/--no-decompose-both"),
    "--tucker": OptionFlag(("loha", "lokr"), "tucker", bool, "--tucker/--no-tucker"),
    "--atoms-1x1": OptionFlag(("atoms",), "include_1x1", bool, "--atoms-1x1/--no-atoms-1x1"),
    "--atoms-m1": OptionFlag(("atoms",), "m1", int),
    "--atoms-kc": OptionFlag(("atoms",), "kc", int),
    "--atoms-init": OptionFlag(("atoms",), "init", str, words=ATOMS_INITS),
    "--atoms-linear": OptionFlag(("atoms",), "linear", bool, "--atoms-linear/--no-atoms-linear"),
    "--oft-block-size": OptionFlag(("oft",), "block_size", int),
}


def available() -> list[str]:
    """Names of every registered method."""
    return list(_REGISTRY)


def method_class(name: str) -> type[Method]:
    if name not in _REGISTRY:
        raise SdtuneError(f"unknown method {name!r}; choose one of: {', '.join(available())}")
    from importlib import import_module

    module_name, class_name = _REGISTRY[name].split(":")
    return getattr(import_module(f"{__name__}.{module_name}"), class_name)


def option_words(option: str) -> tuple[str, ...]:
    """The words a method option of `OPTION_FLAGS` takes where it takes one of a few (`targets`: the layer families),
    else ()."""
    return tuple(word for spec in OPTION_FLAGS.values() if spec.option == option for word in spec.words)


def create(name: str, **options: Any) -> Method:
    """A new, not yet injected method object."""
    return method_class(name)(**options)


def option_help(name: str, option: str) -> str:
    """An option's help text with its default, from the field's metadata: "rank r (default: 4)".

    The metadata's "help" says what the option does; "default", where given, is how the default is
    shown (what an unset or empty value means).
    """
    field = {f.name: f for f in dataclasses.fields(method_class(name).Options)}[option]
    default = field.metadata.get("default", field.default)
    if isinstance(default, bool):
        default = "yes" if default else "no"
    return f"{field.metadata['help']} (default: {default})"


def option_flag_help(flag: str) -> str:
    """The help of one of `OPTION_FLAGS`: "lora/loha/lokr: rank r (default: 4).", or one sentence per help where
    the methods' fields say different things ("lora: ... loha/lokr: ..."). Imports the methods."""
    spec = OPTION_FLAGS[flag]
    by_help: dict[str, list[str]] = {}
    for name in spec.methods:
        by_help.setdefault(option_help(name, spec.option), []).append(name)
    return " ".join(f"{'/'.join(names)}: {help}." for help, names in by_help.items())


def __getattr__(name: str) -> Any:
    if name == "Method":  # the base class imports torch: only when asked for
        from .base import Method

        return Method
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["Method", "OPTION_FLAGS", "OptionFlag", "available", "create", "method_class", "option_flag_help", "option_help", "option_words"]
