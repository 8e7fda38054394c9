"""OFT: orthogonal fine-tuning (Qiu et al. 2023, "Controlling Text-to-Image Diffusion by Orthogonal
Finetuning"), with peft's parametrisation (`peft.OFTConfig`, peft 0.21).

Each tuned layer's weight W (d_out × D, D = d_in, or c_in·k·k for a k×k convolution flattened as peft
and PyTorch lay it out) turns every neuron's weight vector by the same block-diagonal rotation R:
W' = W·Rᵀ, R = diag(R_1, ..., R_n), n = D/b blocks of b×b, each the Cayley transform of a skew-symmetric
Q_i built from b(b−1)/2 trainable numbers: R_i = (I − Q_i)(I + Q_i)⁻¹ (exact; with `cayley_neumann`,
peft's truncated Neumann series of (I + Q_i)(I − Q_i)⁻¹). Q starts at zero, so R = I and the model is
the base. Rotating the input side as the paper does keeps the angles between the layer's neurons
(its "hyperspherical energy"). `coft` (constrained OFT) projects Q back into a ball of radius eps/√n
at each forward, as peft's forward does; `block_share` uses one R_i for all blocks of a layer.

The update is ΔW = W' − W = W·(Rᵀ − I), and the strength S gives W + S·ΔW, the project's convention for
updates that are not additive: it is what LyCORIS' `diag-oft` multiplier does (its weight is
(I + S·(R − I)) applied to W; ComfyUI's reader of such files scales that difference by S once more, S²·ΔW,
agreeing at 0 and 1). S = 0 is the base; the kohya files sdtune writes are W' − W, which every loader
scales linearly.

Built on peft's maths, not on peft's layers: each layer keeps peft's `OFTRotationModule` (peft's
Cayley, Neumann, COFT projection and block sharing) under peft's own name, so adapter keys are peft's
(`<module>.oft_R.weight`) and `--format peft` writes them as they are; but it computes with W + S·ΔW
in one matmul or convolution, because peft 0.21.2's layers (a) ignore a scale (their `set_scale` warns
and keeps 1) and (b) on a k×k convolution with k > 1 rotate unfolded input patches and fold them back
with F.fold, which sums overlapping patches: at R = I such a layer's output is not the base's (each
pixel counted up to k² times), and maps smaller than the kernel fail. Their merge (W·Rᵀ) is right, and
that is what this module computes.
The same reason gives `export_warnings` for peft files that hold k×k convolutions.

Block size: `block_size` b (peft's `oft_block_size`, default 32: it divides every attention width and
every convolution's c_in·k·k of SD v1.x/2.x, SDXL and the tiny models but `conv_in`'s). Where b does not
divide a layer's D, that layer uses peft's choice, the divisor of D nearest b (ties: the smaller; D itself
when b > D), as peft does when it loads the file, so exported files keep the shapes peft builds (SD's
`conv_in`, D = 4·3·3 = 36, takes b = 36).

Targets: LoRA's families. `conv` (default): the UNet's 3x3 and 1x1 convolutions; `conv3x3`; `attn`: the
to_q, to_k, to_v and to_out.0 projections of every attention; `all`: both; `transformer` and `locon`: kohya-ss'
LoRA and LoCon layer sets; `full`: LyCORIS' full preset (every Linear and Conv2d of the UNet). The paper and its authors'
peft DreamBooth example (examples/boft_dreambooth/train_oft.sh, UNET_TARGET_MODULES = to_q/to_k/to_v/
to_out.0) put OFT on the attention projections; the default is the convolutions by measurement
(sweeps/digits-lr.toml, benchmarks/RESULTS.md): on the digits concept, OFT on the attention projections
(or on `all`) broke the other digits' prompts (they drew the same few shapes) at every rate that learned
anything of the style, and at rates that learned nothing still lost 11–17 points; on the convolutions it
learned the most style of any method there (0.42 at 3e-5) keeping 92.6 % of the other digits over three
seeds. `-o targets=attn` is the paper's choice. With text encoders (`--train-text-encoder`), the same
rotation goes on their q/k/v/out projections and MLP linears, saved under `text_encoder.<module>.oft_R.weight`.

peft's `module_dropout` is not offered: peft 0.21.2 builds its multiplicative-dropout layer and never
calls it, so it has no effect there either.

Export: `--format peft` (the tensors and an `OFTConfig`); `--format kohya` writes full-weight
differences (W' − W, computed on the base model). LyCORIS' `diag-oft` (`oft_blocks`, `alpha`) is not
the same maths: it rotates the *output* axis (W' = blockdiag(R)ᵀ·W over d_out), with R = (I + Q)(I − Q)⁻¹
from a full b×b block (Q = B − Bᵀ), so peft's input-side rotation has no `oft_blocks` form.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import SdtuneError
from .atom_kernels import frozen_conv_of_columns, matmul_over_batch
from .base import KOHYA_FAMILY_VARIANTS, LAYER_FAMILIES, TARGETS_HELP, DeltaLayer, WrappedLayers, exact_module_pattern, is_whole_number, layer_family, replace_module

# How a trained layer computes, per device type: "input" turns the layer's input by the blocks (a convolution's
# unfolded input, `InputRotatedConv`) and applies the frozen W: no weight gradient, no formed weight kept; "weight"
# forms W + S·ΔW and lets autograd take the layer's weight gradient. On a CPU (SD v1.4, 16x16 latents, one thread)
# a step with OFT on the convolutions cost 4.9x the frozen floor with 1.64x its peak memory through the formed
# weight (benchmarks/RESULTS.md); CUDA keeps the formed weight until measured there.
ROUTE = {"cpu": "input"}
ROUTE_WORDS = {
    "input": "the input route (the input, unfolded for a convolution, turned by the blocks: no weight gradient, no formed weight kept)",
    "weight": "the formed weight W + S·ΔW (autograd's weight gradient)",
}


def default_route(device_type: str, autocast: bool) -> str:
    """"input" or "weight": the route a layer takes on `device_type` unless told (`OftLayer.route`). Under autocast the
    formed weight, the route measured before, until the input route is measured where mixed precision runs (CUDA); on
    a CPU's bf16 the tiny model's two routes cost the same."""
    return (None if autocast else ROUTE.get(device_type)) or "weight"


class InputRotatedConv(torch.autograd.Function):
    """conv2d(x, W') with W' = W·Aᵀ block by block on the flattened input axis (c_in·k·k in blocks of b, A (n, b, b)):
    the unfolded input's blocks are turned by Aᵀ and convolved with the frozen W. Backward: H = Wᵀ·G (the frozen
    convolution's input-gradient GEMM), grad_x = fold(A·H), dL/dA = Σ U·Hᵀ over batch and positions, per block.
    Gradients for x and A only."""

    @staticmethod
    def forward(ctx, x, weight, mixing, bias, stride, padding, dilation):
        batch, channels, height, width = x.shape
        out_channels, _, kh, kw = weight.shape
        blocks, size = mixing.shape[0], mixing.shape[-1]
        ctx.save_for_backward(x, weight, mixing)
        ctx.geometry = (stride, padding, dilation)
        out_height = (height + 2 * padding[0] - dilation[0] * (kh - 1) - 1) // stride[0] + 1
        out_width = (width + 2 * padding[1] - dilation[1] * (kw - 1) - 1) // stride[1] + 1
        positions = out_height * out_width
        if out_channels <= batch * positions:  # the formed weight is no bigger than the unfolded input
            formed = torch.einsum("onj,nij->oni", weight.reshape(out_channels, blocks, size), mixing)
            return F.conv2d(x, formed.reshape(weight.shape), bias, stride, padding, dilation)
        unfolded = F.unfold(x, (kh, kw), dilation=dilation, padding=padding, stride=stride)  # (batch, D, P)
        turned = torch.matmul(mixing.transpose(1, 2), unfolded.view(batch, blocks, size, positions))
        del unfolded
        return frozen_conv_of_columns(weight, turned.view(batch, -1, positions), bias, out_height, out_width)

    @staticmethod
    def backward(ctx, grad):
        x, weight, mixing = ctx.saved_tensors
        stride, padding, dilation = ctx.geometry
        batch, channels, height, width = x.shape
        out_channels, _, kh, kw = weight.shape
        blocks, size = mixing.shape[0], mixing.shape[-1]
        grad_taps = matmul_over_batch(weight.reshape(out_channels, -1).T, grad.reshape(batch, out_channels, -1))
        grad_taps = grad_taps.reshape(batch, blocks, size, -1)  # H, (batch, n, b, P)
        grad_mixing = grad_x = None
        if ctx.needs_input_grad[2]:
            unfolded = F.unfold(x, (kh, kw), dilation=dilation, padding=padding, stride=stride)
            unfolded = unfolded.view(batch, blocks, size, -1)
            # Σ over batch and positions of U·Hᵀ, per block: one batched GEMM over blocks
            by_block = unfolded.permute(1, 2, 0, 3).reshape(blocks, size, -1)  # (n, b, batch·P)
            grad_mixing = torch.matmul(by_block, grad_taps.permute(1, 0, 3, 2).reshape(blocks, -1, size))
            del unfolded
        if ctx.needs_input_grad[0]:
            turned = torch.matmul(mixing, grad_taps).view(batch, channels * kh * kw, -1)
            grad_x = F.fold(turned, (height, width), (kh, kw), dilation=dilation, padding=padding, stride=stride)
        return grad_x, None, grad_mixing, None, None, None, None



@dataclass
class OftOptions:
    block_size: int = field(default=32, metadata={"help": "rotation block size b (peft's oft_block_size)"})
    targets: str = field(
        default="conv", metadata={"help": TARGETS_HELP}
    )
    coft: bool = field(default=False, metadata={"help": "constrained OFT: keep each Q within a ball of radius eps"})
    eps: float = field(default=6e-5, metadata={"help": "COFT's radius (with coft)"})
    block_share: bool = field(default=False, metadata={"help": "one rotation block shared by all blocks of a layer"})
    cayley_neumann: bool = field(
        default=False, metadata={"help": "peft's Neumann-series Cayley transform instead of the exact one"}
    )
    neumann_terms: int = field(default=5, metadata={"help": "terms of the Neumann series (with cayley_neumann)"})


def layer_block_size(dim: int, block_size: int) -> int:
    """The block size a layer of input dimension `dim` uses: `block_size` where it divides `dim`, else
    peft's choice (`OFTLayer.adjust_oft_parameters`): the nearest divisor, the smaller on a tie, `dim`
    when `block_size` exceeds it."""
    if dim % block_size == 0:
        return block_size
    if block_size >= dim:
        return dim
    higher = block_size
    while higher <= dim and dim % higher != 0:
        higher += 1
    lower = block_size
    while lower > 1 and dim % lower != 0:
        lower -= 1
    return lower if block_size - lower <= higher - block_size else higher


class OftLayer(DeltaLayer):
    """A Linear or Conv2d turned by a block-diagonal rotation of its input side: ΔW = W·(Rᵀ − I)."""

    def __init__(self, base: nn.Module, options: OftOptions):
        from peft.tuners.oft.layer import OFTRotationModule

        super().__init__(base)
        self.route: str | None = None  # "input" or "weight" for this layer (benchmarks); None: `ROUTE`'s for the device
        dim = base.weight[0].numel()  # d_in, or c_in·k·k
        size = layer_block_size(dim, options.block_size)
        self.blocks = dim // size
        device = base.weight.device  # the meta device when `sdtune train` or `sdtune methods` counts
        # on the meta device peft's index tables take milliseconds a layer to build: built on the CPU and moved there
        with torch.device("cpu" if device.type == "meta" else device):
            self.oft_R = OFTRotationModule(
                1 if options.block_share else self.blocks,
                size * (size - 1) // 2,
                size,
                dim,
                coft=options.coft,
                eps=options.eps,
                block_share=options.block_share,
                kernel_size=getattr(base, "kernel_size", (0, 0)),
                use_cayley_neumann=options.cayley_neumann,
                num_cayley_neumann_terms=options.neumann_terms,
            )
        if device.type == "meta":
            self.oft_R.to(device)
        nn.init.zeros_(self.oft_R.weight)  # Q = 0: R = I

    def rotation(self) -> torch.Tensor:
        """The blocks R_i, (n, b, b) (one, expanded, with block_share), as peft computes them."""
        rotation = self.oft_R
        if rotation.coft:  # peft's forward does this projection in place, before the Cayley transform
            with torch.no_grad():
                rotation.weight.copy_(rotation._project_batch(rotation.weight, eps=rotation.eps))
        blocks = rotation._cayley_batch(
            rotation.weight, rotation.block_size, rotation.use_cayley_neumann, rotation.num_cayley_neumann_terms
        )
        return blocks.expand(self.blocks, -1, -1)

    def training_route(self, device_type: str, autocast: bool) -> str:
        """"input" or "weight": how this layer computes a training step on `device_type`, under autocast or not
        (`default_route` unless `route` is set)."""
        base = self.base_layer
        route = self.route or default_route(device_type, autocast)
        if isinstance(base, nn.Conv2d) and not (base.groups == 1 and base.padding_mode == "zeros" and not isinstance(base.padding, str)):
            return "weight"  # InputRotatedConv takes plain zero-padded, ungrouped convolutions
        return route

    def backward_bytes(self, compute_bytes: int, device_type: str = "cuda", autocast: bool = False) -> int:
        """Exact in float32 (measured: tests/test_memory_estimate.py): three float32 tensors of the trained blocks (the Cayley
        transform's and R − I), the exact Cayley's int32 pivots and peft's int64 rows and columns of Q's free
        entries; on the weight route the formed weight W' = W + S·ΔW and, under mixed precision, W cast to the
        compute dtype for the einsum; on the input route (`training_route`) no weight-sized tensor, only the
        n turning blocks I + S·(R − I). (A linear's turned input there is an activation, like its input.)"""
        rotation, size = self.oft_R, self.oft_R.block_size
        trained_blocks = rotation.weight.shape[0]  # n, or 1 with block_share
        blocks = 3 * trained_blocks * size * size * 4
        pivots = 0 if rotation.use_cayley_neumann else trained_blocks * size * 4
        free_entries = 2 * (size * (size - 1) // 2) * 8
        if self.training_route(device_type, autocast) == "input":
            return self.blocks * size * size * compute_bytes + blocks + pivots + free_entries
        cast = self.base_layer.weight.numel() * compute_bytes if compute_bytes != 4 else 0
        return super().backward_bytes(compute_bytes) + blocks + pivots + free_entries + cast

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        base = self.base_layer
        device_type = x.device.type
        autocast = torch.is_autocast_enabled(device_type)
        if not (
            self.training_route(device_type, autocast) == "input" and torch.is_grad_enabled()
            and self.oft_R.weight.requires_grad and not base.weight.requires_grad
        ):
            return super().forward(x)
        if autocast:  # in autocast's dtype, as the formed weight's matmul would run
            dtype = torch.get_autocast_dtype(device_type)
            with torch.autocast(device_type, enabled=False):
                return self._rotated_input(x.to(dtype))
        if x.dtype != base.weight.dtype:
            return super().forward(x)
        return self._rotated_input(x)

    def _rotated_input(self, x: torch.Tensor) -> torch.Tensor:
        """The layer on the input route: x's blocks turned by I + S·(R − I) (W + S·ΔW = W·(I + S·(R − I))ᵀ by
        blocks), then the frozen W, in x's dtype."""
        base = self.base_layer
        rotation = self.rotation()
        eye = torch.eye(rotation.shape[-1], device=rotation.device, dtype=rotation.dtype)
        mixing = (eye + self.scale * (rotation - eye)).to(x.dtype)
        weight = base.weight.to(x.dtype)
        bias = base.bias.to(x.dtype) if base.bias is not None else None
        if isinstance(base, nn.Conv2d):
            return InputRotatedConv.apply(x, weight, mixing, bias, base.stride, base.padding, base.dilation)
        # a linear layer: its input's blocks turned, then the frozen W; autograd takes no weight gradient
        turned = torch.einsum("...ni,nij->...nj", x.unflatten(-1, (self.blocks, -1)), mixing)
        return F.linear(turned.flatten(-2), weight, bias)

    def delta_weight(self) -> torch.Tensor:
        weight = self.base_layer.weight
        rotation = self.rotation()
        eye = torch.eye(rotation.shape[-1], device=rotation.device, dtype=rotation.dtype)
        # W·(Rᵀ − I) block by block: (d_out, n, b) · (n, b, b); R − I keeps small rotations' precision
        blocks = weight.reshape(weight.shape[0], self.blocks, -1).to(rotation.dtype)
        delta = torch.einsum("onj,nij->oni", blocks, rotation - eye)
        return delta.reshape(weight.shape)


class Oft(WrappedLayers):
    name = "oft"
    summary = "OFT: block-diagonal orthogonal rotation of each weight's input side, W' = W·Rᵀ (peft's maths)"
    Options = OftOptions
    variants = ({}, {"targets": "attn"}, {"targets": "all"}, *KOHYA_FAMILY_VARIANTS, {"block_size": 16}, {"block_share": True})
    # measured: sweeps/digits-lr.toml over seeds 0-2 (benchmarks/RESULTS.md): 1e-4 lost 18.5 points; also the rate
    # of the OFT authors' SD DreamBooth example in peft (examples/boft_dreambooth/train_oft.sh)
    default_lr = 3e-5
    export_formats = ("kohya", "peft")
    trains_text_encoder = True

    @classmethod
    def device_notes(cls, device_type: str) -> list[str]:
        """The route a plain, zero-padded layer takes on `device_type` (`default_route`), in full precision and under
        mixed precision."""
        full, mixed = default_route(device_type, False), default_route(device_type, True)
        if full == mixed:
            return [f"layers take {ROUTE_WORDS[full]}"]
        return [f"layers take {ROUTE_WORDS[full]} in fp32, {ROUTE_WORDS[mixed]} under mixed precision"]

    def validate_options(self) -> None:
        o = self.options
        if not is_whole_number(o.block_size) or o.block_size < 2:
            raise SdtuneError(f"--oft-block-size must be a whole number of at least 2, got {o.block_size!r}")
        if o.targets not in LAYER_FAMILIES:
            raise SdtuneError(f"oft targets {o.targets!r} is not available; choose: {', '.join(LAYER_FAMILIES)}")
        for flag in ("coft", "block_share", "cayley_neumann"):
            if not isinstance(getattr(o, flag), bool):
                raise SdtuneError(f"oft option {flag} must be true or false, got {getattr(o, flag)!r}")
        if isinstance(o.eps, bool) or not isinstance(o.eps, (int, float)) or not 0 < o.eps < math.inf:
            raise SdtuneError(f"oft option eps must be a positive number (and finite), got {o.eps!r}")
        o.eps = float(o.eps)
        if not is_whole_number(o.neumann_terms) or o.neumann_terms < 2:
            raise SdtuneError(f"oft option neumann_terms must be a whole number of at least 2, got {o.neumann_terms!r}")

    def find_targets(self, unet: nn.Module) -> list[str]:
        return layer_family(unet, self.options.targets)

    def _inject(self, unet: nn.Module, targets: list[str]) -> None:
        for name in targets:
            self.layers[name] = OftLayer(unet.get_submodule(name), self.options)
            replace_module(unet, name, self.layers[name])

    def _inject_text_encoder(self, text_encoder: nn.Module, prefix: str, targets: list[str]) -> None:
        for name in targets:
            layer = OftLayer(text_encoder.get_submodule(name), self.options)
            replace_module(text_encoder, name, layer)
            self.layers[f"{prefix}.{name}"] = layer

    def to_peft_config(self, module_names: list[str]):
        from peft import OFTConfig


        o = self.options
        return OFTConfig(
            r=0,
            oft_block_size=o.block_size,
            target_modules=exact_module_pattern(module_names),
            coft=o.coft,
            eps=o.eps,
            block_share=o.block_share,
            use_cayley_neumann=o.cayley_neumann,
            num_cayley_neumann_terms=o.neumann_terms,
        )

    def export_warnings(self, format: str, tensors: dict[str, torch.Tensor]) -> list[str]:
        """peft's unmerged forward is wrong on k×k convolutions (see the module docstring); its merge is right.
        Every target choice but `attn` and `transformer` takes the UNet's 3×3 convolutions (`transformer` its 1×1 ones
        at most, which peft computes right)."""
        if format != "peft" or self.options.targets in ("attn", "transformer"):  # the default (conv) warns
            return []
        return [f"peft (0.21.2) computes OFT on 3×3 convolutions wrongly unless merged (targets={self.options.targets}): "
                "its forward sums overlapping input patches (and fails on maps smaller than the kernel); call "
                "merge_and_unload() after PeftModel.from_pretrained, or use --format kohya"]
