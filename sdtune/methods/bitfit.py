"""BitFit: train only the UNet's bias terms (Ben Zaken, Ravfogel & Goldberg, 2022), optionally only in
modules whose names contain one of `targets`."""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from ..errors import SdtuneError
from .inplace import InPlaceMethod, own_parameter


def parse_targets(value) -> str:
    """Module-name substrings as one comma-separated string (accepts a list too)."""
    if isinstance(value, (list, tuple)):
        parts = value
    elif isinstance(value, str):
        parts = value.split(",")
    else:
        raise SdtuneError(f"targets must be module-name substrings separated by commas, got {value!r}")
    if not all(isinstance(part, str) for part in parts):
        raise SdtuneError(f"targets must be module-name substrings separated by commas, got {value!r}")
    parts = [part.strip() for part in parts]
    if any(not part for part in parts) and value not in ("", [], ()):
        raise SdtuneError(f"targets has an empty entry: {value!r}")
    return ",".join(part for part in parts if part)


@dataclass
class BitFitOptions:
    targets: str = field(
        default="",
        metadata={"help": "comma-separated substrings of module names whose biases are trained", "default": "every bias"},
    )


class BitFit(InPlaceMethod):
    name = "bitfit"
    summary = "BitFit: train only the UNet's bias terms (optionally only in modules matching `targets`)"
    Options = BitFitOptions
    default_lr = 3e-5  # measured: sweeps/digits-lr.toml over seeds 0-2 (benchmarks/RESULTS.md): 1e-4 lost 10.2 points

    def validate_options(self) -> None:
        self.options.targets = parse_targets(self.options.targets)

    def shown_options(self) -> dict:
        return {"targets": self.options.targets} if self.options.targets else {}  # none: every bias, nothing to show

    def find_targets(self, unet: nn.Module) -> list[str]:
        wanted = [part for part in self.options.targets.split(",") if part]
        return [
            name
            for name, module in unet.named_modules()
            if own_parameter(module, "bias") is not None and (not wanted or any(part in name for part in wanted))
        ]

    def _select(self, unet: nn.Module, targets: list[str]) -> dict[str, nn.Parameter]:
        return {f"{name}.bias": own_parameter(unet.get_submodule(name), "bias") for name in targets}
