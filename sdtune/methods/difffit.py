"""DiffFit: biases, norms and per-channel scales γ (Xie et al., 2023), trained in place.

DiffFit adds per-channel scale factors γ (init 1, so step 0 is the base model). Following
DiffFit-pytorch (mkshing/DiffFit-pytorch, the reference port of Xie et al. 2023 to Stable
Diffusion), every BasicTransformerBlock gets γ on its three residual branches (attn1, attn2, ff:
`gamma_attn1/2`, `gamma_ff`) and every Attention in it gets γ on the outputs of to_q, to_k, to_v and
to_out.0 (`gamma_q/k/v/out`; DiffFit-pytorch calls the last one `gamma_fnn`). DiffFit-pytorch leaves
the ResnetBlock2D branches unscaled; `resnet_gamma=True` adds a γ on each one's conv2 output, the
"each ResnetBlock2D branch" reading of the paper. Trainable besides γ: every bias and the affine
weights of every normalisation layer (GroupNorm, LayerNorm), as DiffFit-pytorch's "bias"/"norm"
name filter selects on the SD UNet.

Every γ scales the output channels of one Linear or Conv2d (a branch's γ scales the branch's last
projection, to_out.0 or ff.net.2: the same thing, since only dropout follows them), applied by a
forward hook while training. `merge()` multiplies it into that layer's weight rows and bias and
removes the hook and the parameter, leaving plain diffusers modules.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from ..errors import SdtuneError
from .inplace import InPlaceMethod, own_parameter

NORM_TYPES: tuple[type[nn.Module], ...] = (nn.GroupNorm, nn.LayerNorm) + ((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ())


class ScaleOutputChannels:
    """Forward hook: multiply a layer's output channels by the product of γ's living on other modules.

    The γ's are looked up at call time, so moving the UNet to another device or dtype (which may
    replace its parameters) never leaves the hook holding a stale tensor.
    """

    def __init__(self, gammas: list[tuple[nn.Module, str]], channel_dim: int):
        self.gammas = gammas
        self.channel_dim = channel_dim

    def scale(self) -> torch.Tensor:
        scale = getattr(*self.gammas[0])
        for owner, name in self.gammas[1:]:
            scale = scale * getattr(owner, name)
        return scale

    def __call__(self, module: nn.Module, args, output: torch.Tensor) -> torch.Tensor:
        scale = self.scale().to(output.dtype)
        if self.channel_dim != -1:
            scale = scale.reshape(-1, *([1] * (output.ndim - self.channel_dim - 1)))
        return output * scale


@dataclass
class DiffFitOptions:
    resnet_gamma: bool = field(
        default=False, metadata={"help": "also scale each ResnetBlock2D's residual branch (not done by DiffFit-pytorch)"}
    )


@dataclass
class _Scaled:
    """One Linear/Conv2d whose output channels carry γ's, and its hook while unmerged."""

    layer: nn.Module
    gammas: list[tuple[nn.Module, str]] = field(default_factory=list)
    handle: object = None


class DiffFit(InPlaceMethod):
    name = "difffit"
    summary = "DiffFit: biases, norm affine params and per-channel scales γ on transformer branches and q/k/v/out"
    Options = DiffFitOptions
    variants = ({}, {"resnet_gamma": True})
    default_lr = 3e-5  # measured: sweeps/digits-lr.toml over seeds 0-2 (benchmarks/RESULTS.md): 1e-4 lost 10.2 points

    def validate_options(self) -> None:
        if not isinstance(self.options.resnet_gamma, bool):
            raise SdtuneError(f"resnet_gamma must be true or false, got {self.options.resnet_gamma!r}")

    # which layer each γ scales: (owner module, γ name, scaled layer's name relative to the owner)
    def _gamma_sites(self, unet: nn.Module) -> list[tuple[str, str, str]]:
        from diffusers.models.attention import BasicTransformerBlock
        from diffusers.models.resnet import ResnetBlock2D

        sites = []
        for name, module in unet.named_modules():
            if isinstance(module, BasicTransformerBlock):
                for branch in ("attn1", "attn2"):
                    attention = getattr(module, branch, None)
                    if attention is None:
                        continue
                    sites.append((name, f"gamma_{branch}", f"{branch}.to_out.0"))
                    for projection in ("q", "k", "v"):
                        if getattr(attention, f"to_{projection}", None) is not None:
                            sites.append((f"{name}.{branch}", f"gamma_{projection}", f"to_{projection}"))
                    sites.append((f"{name}.{branch}", "gamma_out", "to_out.0"))
                sites.append((name, "gamma_ff", f"ff.net.{last_linear_index(module.ff, name)}"))
            elif isinstance(module, ResnetBlock2D) and self.options.resnet_gamma:
                sites.append((name, "gamma", "conv2"))
        for owner, _, layer in sites:
            scaled = unet.get_submodule(f"{owner}.{layer}")
            if type(scaled) not in (nn.Linear, nn.Conv2d):
                raise SdtuneError(f"difffit cannot fold a scale into {owner}.{layer} ({type(scaled).__name__})")
        return sites

    def find_targets(self, unet: nn.Module) -> list[str]:
        scaled = {f"{owner}.{layer}" for owner, _, layer in self._gamma_sites(unet)}
        return [
            name
            for name, module in unet.named_modules()
            if own_parameter(module, "bias") is not None or isinstance(module, NORM_TYPES) or name in scaled
        ]

    def _select(self, unet: nn.Module, targets: list[str]) -> dict[str, nn.Parameter]:
        params: dict[str, nn.Parameter] = {}
        for name in targets:
            module = unet.get_submodule(name)
            for attr in ("weight", "bias") if isinstance(module, NORM_TYPES) else ("bias",):
                parameter = own_parameter(module, attr)
                if parameter is not None:
                    params[f"{name}.{attr}"] = parameter

        self.scaled: dict[str, _Scaled] = {}
        self.gamma_parameters: dict[tuple[nn.Module, str], nn.Parameter] = {}  # kept while merged, for unmerge
        for owner_name, gamma_name, layer_name in self._gamma_sites(unet):
            owner = unet.get_submodule(owner_name)
            full_name = f"{owner_name}.{layer_name}"
            layer = unet.get_submodule(full_name)
            if hasattr(owner, gamma_name):
                raise RuntimeError(f"difffit: {owner_name} already has {gamma_name}; inject once per UNet")
            gamma = nn.Parameter(torch.ones(layer.weight.shape[0], device=layer.weight.device, dtype=torch.float32))
            owner.register_parameter(gamma_name, gamma)
            params[f"{owner_name}.{gamma_name}"] = gamma
            self.gamma_parameters[(owner, gamma_name)] = gamma
            self.scaled.setdefault(full_name, _Scaled(layer)).gammas.append((owner, gamma_name))
        self._hook_scales()
        return params

    def _hook_scales(self) -> None:
        for entry in self.scaled.values():
            channel_dim = 1 if isinstance(entry.layer, nn.Conv2d) else -1
            entry.handle = entry.layer.register_forward_hook(ScaleOutputChannels(entry.gammas, channel_dim))

    @torch.no_grad()
    def _fold(self) -> None:
        for entry in self.scaled.values():
            entry.handle.remove()
            scale = ScaleOutputChannels(entry.gammas, -1).scale()
            weight = entry.layer.weight
            weight.mul_(scale.to(weight.dtype).reshape(-1, *([1] * (weight.ndim - 1))))
            if entry.layer.bias is not None:
                entry.layer.bias.mul_(scale.to(entry.layer.bias.dtype))
            for owner, gamma_name in entry.gammas:
                delattr(owner, gamma_name)

    def _unfold(self) -> None:
        for entry in self.scaled.values():
            for owner, gamma_name in entry.gammas:
                gamma = self.gamma_parameters[(owner, gamma_name)]
                gamma.data = gamma.data.to(entry.layer.weight.device)  # the merged UNet may have moved
                owner.register_parameter(gamma_name, gamma)
        self._hook_scales()


def last_linear_index(feed_forward: nn.Module, block_name: str) -> int:
    """Index of a FeedForward's output Linear in `net`; only dropout may follow it (γ commutes with it)."""
    net = list(feed_forward.net)
    for index in range(len(net) - 1, -1, -1):
        if type(net[index]) is nn.Linear:
            if all(isinstance(after, nn.Dropout) for after in net[index + 1 :]):
                return index
            break
    raise SdtuneError(f"difffit cannot fold the feed-forward scale of {block_name}: its output layer is not a Linear")
