"""Full fine-tuning: every UNet parameter, the reference the efficient methods are compared with."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from .inplace import InPlaceMethod


@dataclass
class FullOptions:
    pass


class FullFineTune(InPlaceMethod):
    name = "full"
    summary = "full fine-tuning: every UNet parameter (the reference the efficient methods are compared with)"
    Options = FullOptions
    default_lr = 1e-5

    def find_targets(self, unet: nn.Module) -> list[str]:
        return [name for name, module in unet.named_modules() if module._parameters]

    def _select(self, unet: nn.Module, targets: list[str]) -> dict[str, nn.Parameter]:
        return dict(unet.named_parameters())
