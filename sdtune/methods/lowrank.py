"""LoRA, LoHa and LoKr: low-rank, Hadamard and Kronecker weight updates, built on peft.

- LoRA: ΔW = (α/r)·B·A; on a k×k conv, A is a k×k conv down to r channels and B a 1×1 conv up.
- LoHa: ΔW = (α/r)·(B1·A1) ⊙ (B2·A2), with `tucker` a CP/Tucker core per product on k×k convs.
- LoKr: ΔW = (α/r)·W1 ⊗ W2; each factor is full or low-rank (B·A) following LyCORIS' rules, the
  channel counts split by `factor` (-1: the divisor pair nearest the square root).

Why peft rather than lycoris-lora: peft implements all three on Linear and Conv2d (its LoHa and
LoKr are ports of LyCORIS' maths, factorisation and "use_effective_conv2d" = LyCORIS' tucker),
diffusers integrates with it, and its layers inject into any nn.Module and merge one by one. So
this module only chooses the layers, builds the peft config, and unwraps after merging.

Adapter tensors are saved under peft's adapter-name-free keys, `<module name>.<parameter>`
(for example `down_blocks.0.resnets.0.conv1.lora_A.weight` or `...to_q.hada_w1_a`).
The scale is always alpha/rank, as in peft (LyCORIS forces 1 when both LoKr factors are full);
with the default alpha = rank the two agree.

Targets: `conv` means the UNet's 3×3 and 1×1 convolutions (LoCon), `conv3x3` only the 52 3×3
convolutions that the filter-atom method tunes, `attn` the to_q, to_k, to_v and to_out.0
projections of every attention, `all` the convolutions and the projections.
"""

from __future__ import annotations

import re
from abc import abstractmethod
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..errors import SdtuneError
from .base import Method, named_convs, replace_module

ADAPTER = "sdtune"  # peft's adapter name; it never appears in saved keys
TARGET_CHOICES = ("conv", "conv3x3", "attn", "all")
_ATTN_PROJECTION = re.compile(r"(^|\.)(to_q|to_k|to_v|to_out\.0)$")


def attention_projections(unet: nn.Module) -> list[str]:
    """Names of the q/k/v/out Linear layers of every attention, in module order."""
    return [name for name, module in unet.named_modules() if type(module) is nn.Linear and _ATTN_PROJECTION.search(name)]


@dataclass
class LoraOptions:
    rank: int = field(default=4, metadata={"help": "rank r"})
    # unset: alpha = rank, so the update's scale α/r is 1
    alpha: float | None = field(
        default=None, metadata={"help": "alpha; the update is scaled by alpha/rank", "default": "the rank"}
    )
    # Both convolutions and attention by default: LoCon/LyCORIS practice for LoHa and LoKr,
    # and the layers the filter-atom comparison tunes (its convs) plus the usual LoRA ones.
    targets: str = field(
        default="all", metadata={"help": "conv (3x3 and 1x1 convs), conv3x3, attn (to_q/k/v/out) or all"}
    )


@dataclass
class LohaOptions(LoraOptions):
    tucker: bool = field(default=False, metadata={"help": "Tucker-decompose 3x3 conv updates"})


@dataclass
class LokrOptions(LoraOptions):
    factor: int = field(default=-1, metadata={"help": "Kronecker factor size, -1 for automatic"})
    decompose_both: bool = field(default=False, metadata={"help": "also make the first Kronecker factor low-rank"})
    tucker: bool = field(default=False, metadata={"help": "Tucker-decompose 3x3 conv updates"})


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


class _PeftLowRank(Method):
    """What LoRA, LoHa and LoKr share: target choice, peft injection, state, merge."""

    default_lr = 1e-4  # the usual SD LoRA rate with alpha = rank (scale 1)

    def validate_options(self) -> None:
        o = self.options
        if not _is_int(o.rank) or o.rank < 1:
            raise SdtuneError(f"--rank must be a whole number of at least 1, got {o.rank!r}")
        if o.alpha is None:
            o.alpha = float(o.rank)
        elif isinstance(o.alpha, bool) or not isinstance(o.alpha, (int, float)) or not o.alpha > 0:
            raise SdtuneError(f"--alpha must be a positive number, got {o.alpha!r}")
        o.alpha = float(o.alpha)
        if o.targets not in TARGET_CHOICES:
            raise SdtuneError(f"--targets {o.targets!r} is not available; choose: {', '.join(TARGET_CHOICES)}")
        for flag in ("tucker", "decompose_both"):
            if hasattr(o, flag) and not isinstance(getattr(o, flag), bool):
                raise SdtuneError(f"--{flag.replace('_', '-')} must be true or false, got {getattr(o, flag)!r}")

    def find_targets(self, unet: nn.Module) -> list[str]:
        chosen: set[str] = set()
        if self.options.targets == "conv3x3":
            chosen.update(name for name, _ in named_convs(unet, {3}))
        if self.options.targets in ("conv", "all"):
            chosen.update(name for name, _ in named_convs(unet, {3, 1}))
        if self.options.targets in ("attn", "all"):
            chosen.update(attention_projections(unet))
        return [name for name, _ in unet.named_modules() if name in chosen]  # module order, stable

    @abstractmethod
    def peft_config(self, targets: list[str]):
        """The peft config that wraps exactly `targets`."""

    def _inject(self, unet: nn.Module, targets: list[str]) -> None:
        from peft import inject_adapter_in_model

        inject_adapter_in_model(self.peft_config(targets), unet, adapter_name=ADAPTER)
        self.layers: dict[str, nn.Module] = {name: unet.get_submodule(name) for name in targets}
        missed = [name for name, layer in self.layers.items() if not hasattr(layer, "get_base_layer")]
        if missed:
            raise RuntimeError(f"{self.name}: peft did not wrap {missed[:3]}")

    @staticmethod
    def _exact(targets: list[str]) -> str:
        # peft full-matches a string target against each module name: exact names, no suffix matches
        return "^(?:" + "|".join(re.escape(name) for name in targets) + ")$"

    def trainable_parameters(self) -> list[nn.Parameter]:
        parameters = []
        for layer in self.layers.values():
            for key, parameter in layer.named_parameters():
                attr, adapter = (key.split(".") + [""])[:2]  # e.g. "lora_A.sdtune.weight", "hada_w1_a.sdtune"
                if attr in layer.adapter_layer_names and adapter == ADAPTER:
                    parameters.append(parameter)
        return parameters

    def state_dict(self) -> dict[str, torch.Tensor]:
        """peft's adapter-name-free keys; the tensors are views of the parameters, so the shared
        `load_state_dict` copies into them."""
        from peft import get_peft_model_state_dict

        return get_peft_model_state_dict(self.unet, adapter_name=ADAPTER, save_embedding_layers=False)

    def merge(self) -> None:
        for name, layer in self.layers.items():
            layer.merge(safe_merge=True, adapter_names=[ADAPTER])
            replace_module(self.unet, name, layer.get_base_layer())
        self.layers = {}
        if hasattr(self.unet, "peft_config"):
            del self.unet.peft_config  # inject_adapter_in_model left it; the merged UNet is plain


class Lora(_PeftLowRank):
    name = "lora"
    summary = "LoRA: low-rank update ΔW = B·A on convs and attention projections (peft)"
    Options = LoraOptions
    variants = ({}, {"targets": "conv"}, {"targets": "conv3x3"}, {"targets": "attn"}, {"rank": 16})

    def peft_config(self, targets: list[str]):
        from peft import LoraConfig

        return LoraConfig(
            r=self.options.rank, lora_alpha=self.options.alpha, target_modules=self._exact(targets), lora_dropout=0.0
        )


class Loha(_PeftLowRank):
    name = "loha"
    summary = "LoHa: Hadamard product of two low-rank updates (B1·A1)⊙(B2·A2) (peft)"
    Options = LohaOptions
    variants = ({}, {"targets": "conv3x3"})

    def peft_config(self, targets: list[str]):
        from peft import LoHaConfig

        return LoHaConfig(
            r=self.options.rank,
            alpha=self.options.alpha,
            target_modules=self._exact(targets),
            use_effective_conv2d=self.options.tucker,
        )


class Lokr(_PeftLowRank):
    name = "lokr"
    summary = "LoKr: Kronecker product update W1 ⊗ W2 with low-rank factors where small (peft)"
    Options = LokrOptions
    variants = ({}, {"targets": "conv3x3"}, {"decompose_both": True})

    def validate_options(self) -> None:
        super().validate_options()
        factor = self.options.factor
        if not _is_int(factor) or not (factor == -1 or factor >= 1):
            raise SdtuneError(f"--factor must be -1 (automatic) or a whole number of at least 1, got {factor!r}")

    def peft_config(self, targets: list[str]):
        from peft import LoKrConfig

        return LoKrConfig(
            r=self.options.rank,
            alpha=self.options.alpha,
            target_modules=self._exact(targets),
            decompose_factor=self.options.factor,
            decompose_both=self.options.decompose_both,
            use_effective_conv2d=self.options.tucker,
        )
