"""What BitFit, DiffFit and full fine-tuning share: the UNet's own parameters train in place.

The UNet always computes with the tuned values, so merging has little to do (DiffFit folds its
scales into the weights). The adapter stores the tuned values (not deltas), which is exactly what a
fresh copy of the same base model needs to reproduce the outputs.

Strength: the update is the trained tensors' change from their values at injection, so at scale s
every trained tensor holds initial + s·(tuned − initial). The initial values are copied to the CPU
at injection (for full fine-tuning, a copy of the whole UNet).
"""

from __future__ import annotations

from abc import abstractmethod

import torch
from torch import nn

from .base import Method


def own_parameter(module: nn.Module, name: str) -> nn.Parameter | None:
    """The module's own (not a child's) parameter called `name`, if it has one."""
    return module._parameters.get(name)


class InPlaceMethod(Method):
    """A method whose trainable tensors are UNet parameters (or live on UNet modules)."""

    weight_decay = 0.0  # decay would shrink the base model's own biases and norms towards 0
    # DiffFit-pytorch trains SD with 1e-3 (the paper finds ~10x the pre-training lr best); BitFit and DiffFit
    # set their own measured rates
    default_lr = 1e-3

    def _inject(self, unet: nn.Module, targets: list[str]) -> None:
        self.layers = {name: unet.get_submodule(name) for name in targets}
        # state key -> parameter; the keys name where the tensor lives in the UNet
        self.params: dict[str, nn.Parameter] = self._select(unet, targets)
        for parameter in self.params.values():
            parameter.requires_grad_(True)
        meta = any(parameter.is_meta for parameter in self.params.values())
        self._initial = None if meta else {key: p.detach().to("cpu", copy=True) for key, p in self.params.items()}
        self._tuned: dict[str, torch.Tensor] | None = None  # the values at full strength, while scale != 1

    @abstractmethod
    def _select(self, unet: nn.Module, targets: list[str]) -> dict[str, nn.Parameter]:
        """The parameters to train, keyed by where they live in the UNet."""

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [] if self.merged else list(self.params.values())

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The tuned values (at full strength, whatever the scale); nothing once merged."""
        if self.merged:
            return {}
        if self._tuned is not None:
            return dict(self._tuned)
        return {key: parameter.detach() for key, parameter in self.params.items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        super().load_state_dict(state)
        if self._tuned is not None:
            self._write_scaled(self.scale)

    def _apply_scale(self, scale: float) -> None:
        if self._initial is None:
            raise RuntimeError(f"{self.name}: no initial values to scale from (injected on the meta device)")
        if scale != 1.0 and self._tuned is None:
            self._tuned = {key: p.detach().to("cpu", copy=True) for key, p in self.params.items()}
        if self._tuned is not None:
            self._write_scaled(scale)
        if scale == 1.0:
            self._tuned = None

    @torch.no_grad()
    def _write_scaled(self, scale: float) -> None:
        for key, parameter in self.params.items():
            tuned = self._tuned[key]
            if scale == 1.0:
                value = tuned
            else:
                initial = self._initial[key].float()
                value = initial + scale * (tuned.float() - initial)
            parameter.copy_(value.to(parameter.dtype))

    def _changed_modules(self) -> dict[str, nn.Module]:
        return dict(self.layers)

    def _initial_weights(self) -> dict[tuple[str, str], torch.Tensor]:
        # DiffFit's γ live on modules that are not targets: they leave no weight of their own
        return {
            (name, attr): value
            for key, value in (self._initial or {}).items()
            for name, _, attr in [key.rpartition(".")]
            if name in self.layers
        }

    def _merge(self) -> None:
        self._fold()
        for parameter in self.params.values():
            parameter.requires_grad_(False)

    def _unmerge(self) -> None:
        self._unfold()
        for parameter in self.params.values():
            parameter.requires_grad_(True)

    def _fold(self) -> None:
        """Fold whatever is not a plain UNet parameter into the weights (nothing, unless overridden)."""

    def _unfold(self) -> None:
        """Undo `_fold`'s removals (the weights themselves are restored by `unmerge`)."""
