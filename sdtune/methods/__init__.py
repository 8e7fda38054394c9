"""The registry of tuning methods: `available()` lists them, `create(name, **options)` builds one."""

from __future__ import annotations

from typing import Any

from ..errors import SdtuneError
from .base import Method

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


def create(name: str, **options: Any) -> Method:
    """A new, not yet injected method object."""
    return method_class(name)(**options)


__all__ = ["Method", "available", "create", "method_class"]
