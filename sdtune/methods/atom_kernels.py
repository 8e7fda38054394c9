"""Fast exact convolutions for updates that mix a kernel's taps: conv(x, W_r·(I + M)).

Filter-atom updates with coefficients α = W_r·P have ΔW = α·ΔD = W_r·(P·ΔD): one k²×k² matrix
M = P·ΔD acting on the tap axis of the frozen weight. Autograd on `conv2d(x, W + ΔW)` re-forms the
whole weight every step, keeps a copy of it for backward and computes a full weight gradient that
is then contracted down to k²×k² numbers. Two custom autograd functions avoid that:

- `TapMixedConv` (tap side): unfold x, mix the k² taps of every input channel with (I + M), one
  GEMM with the frozen W. Backward: H = Wᵀ·G, the GEMM the input gradient needs anyway, gives both
  grad_x (mix back with (I + M)ᵀ, then fold) and grad_M = Σ H·unfold(x)ᵀ. No weight gradient, no
  formed weight, nothing stored but x. Fast where there are few output positions per channel (the
  deep, wide layers); unfold/fold traffic grows with the image.
- `FormedWeightConv` (weight side): one library convolution with W + ΔW formed on the fly and not
  kept; backward forms it again and asks the library for grad_x and grad_W in one call. Fast at
  large images, where the library's direct convolution beats unfold + GEMM.

`tap_mixed_conv2d` picks per call by the number of output positions (`TAP_SIDE_MAX_POSITIONS`),
measured on CPU with `benchmarks/speed.py`. Both are exact: tests compare them with
`conv2d(x, W + W_r·M)` by gradcheck in float64.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

# Batch x output positions up to which the tap side is faster than the weight side (CPU, fp32):
# at 8x8 and 16x16 feature maps the tap side takes 0.35-0.45x the weight side's time, at 32x32
# they are even, at 64x64 the weight side wins. A whole SD v1.4 step at 64x64 latents with the limit
# at 256 or 4096 positions took 1.035x and 1.084x the step with 1024.
# On an H200 (SD v1.4, 64x64 latents, batch 1, bf16) the weight side everywhere took 0.124 s a step
# and the CPU limit 0.142 s: cuDNN's weight gradient is cheap there, unfold/fold traffic is not.
TAP_SIDE_MAX_POSITIONS = {"cpu": 1024, "cuda": 0}


def _mixed_weight(weight: torch.Tensor, mixing: torch.Tensor) -> torch.Tensor:
    taps = mixing.shape[0]
    flat = weight.reshape(-1, taps)
    return (flat + flat @ mixing).reshape(weight.shape)


class TapMixedConv(torch.autograd.Function):
    """conv2d(x, W_r·(I + M)) computed on the input's taps; gradients for x and M only."""

    @staticmethod
    def forward(ctx, x, weight, mixing, bias, stride, padding, dilation):
        batch, channels, height, width = x.shape
        out_channels, _, kh, kw = weight.shape
        taps = kh * kw
        unfolded = F.unfold(x, (kh, kw), dilation=dilation, padding=padding, stride=stride)
        positions = unfolded.shape[-1]
        mix = torch.eye(taps, dtype=x.dtype, device=x.device) + mixing.to(x.dtype)
        mixed = torch.matmul(mix, unfolded.view(batch, channels, taps, positions))
        del unfolded  # 9x the input: free it before the GEMM's output is allocated
        out = torch.matmul(weight.reshape(out_channels, -1), mixed.view(batch, channels * taps, positions))
        if bias is not None:
            out = out + bias.view(1, -1, 1)
        out_height = (height + 2 * padding[0] - dilation[0] * (kh - 1) - 1) // stride[0] + 1
        ctx.save_for_backward(x, weight, mix)
        ctx.geometry = (stride, padding, dilation, (kh, kw))
        ctx.mixing_dtype = mixing.dtype
        return out.view(batch, out_channels, out_height, positions // out_height)

    @staticmethod
    def backward(ctx, grad):
        x, weight, mix = ctx.saved_tensors
        stride, padding, dilation, kernel = ctx.geometry
        batch, channels, height, width = x.shape
        out_channels, taps = weight.shape[0], mix.shape[0]
        grad = grad.reshape(batch, out_channels, -1)
        positions = grad.shape[-1]
        # dL/d(mixed taps): the same GEMM as the input gradient of the frozen convolution
        grad_mixed = torch.matmul(weight.reshape(out_channels, -1).T, grad).view(batch, channels, taps, positions)
        unfolded = F.unfold(x, kernel, dilation=dilation, padding=padding, stride=stride)
        # Σ over batch, channels and positions as one batched GEMM over (batch, channel) pairs: the
        # transposed operand is a view, so nothing 9x the input is copied (einsum permuted both
        # operands into new tensors first, 5-10x slower at 32x32 and larger maps)
        pairs = grad_mixed.reshape(batch * channels, taps, positions)
        grad_mixing = torch.matmul(pairs, unfolded.view(batch * channels, taps, positions).transpose(1, 2)).sum(0)
        del unfolded, pairs
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_unfolded = torch.matmul(mix.T, grad_mixed).view(batch, channels * taps, positions)
            del grad_mixed
            grad_x = F.fold(grad_unfolded, (height, width), kernel, dilation=dilation, padding=padding, stride=stride)
        return grad_x, None, grad_mixing.to(ctx.mixing_dtype), None, None, None, None


class FormedWeightConv(torch.autograd.Function):
    """conv2d(x, W_r·(I + M)) with the weight formed on the fly and never stored."""

    @staticmethod
    def forward(ctx, x, weight, mixing, bias, stride, padding, dilation):
        ctx.save_for_backward(x, weight, mixing)
        ctx.geometry = (stride, padding, dilation, bias is not None)
        return F.conv2d(x, _mixed_weight(weight, mixing.to(weight.dtype)), bias, stride, padding, dilation)

    @staticmethod
    def backward(ctx, grad):
        x, weight, mixing = ctx.saved_tensors
        stride, padding, dilation, has_bias = ctx.geometry
        taps = mixing.shape[0]
        formed = _mixed_weight(weight, mixing.to(weight.dtype))
        grad_x, grad_weight, grad_bias = torch.ops.aten.convolution_backward(
            grad, x, formed, None, stride, padding, dilation, False, (0, 0), 1,
            [ctx.needs_input_grad[0], True, False],
        )
        # W'_r = W_r·(I + M), so dL/dM = W_rᵀ·dL/dW'_r
        grad_mixing = weight.reshape(-1, taps).T @ grad_weight.reshape(-1, taps)
        return grad_x, None, grad_mixing.to(mixing.dtype), None, None, None, None


def tap_mixed_conv2d(x: torch.Tensor, conv: nn.Conv2d, mixing: torch.Tensor, mode: str = "auto") -> torch.Tensor:
    """conv(x) with `conv.weight` replaced by W_r·(I + mixing), exactly, by the fastest route.

    `mode`: "auto" (by output positions and device), "tap", "weight", or "autograd" (plain autograd
    on the formed weight: the reference the others are tested against). When no gradient is
    needed, the formed weight is used directly. Under autocast the fast kernels run in the
    autocast dtype, as the library convolution would; the mixing matrix and its gradient stay fp32.
    """
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type) and torch.is_grad_enabled() and mode != "autograd":
        dtype = torch.get_autocast_dtype(device_type)
        with torch.autocast(device_type, enabled=False):
            return _fast_or_plain(x.to(dtype), conv, mixing, mode, dtype)
    return _fast_or_plain(x, conv, mixing, mode, None)


def _fast_or_plain(x: torch.Tensor, conv: nn.Conv2d, mixing: torch.Tensor, mode: str, dtype) -> torch.Tensor:
    weight, bias = conv.weight, conv.bias
    if dtype is not None:
        weight = weight.to(dtype)
        bias = bias.to(dtype) if bias is not None else None
    plain = (
        mode == "autograd"
        or not torch.is_grad_enabled()
        or x.dtype != weight.dtype
        or conv.groups != 1
        or conv.weight.requires_grad
        or conv.padding_mode != "zeros"
        or isinstance(conv.padding, str)
    )
    if plain:
        return conv._conv_forward(x, _mixed_weight(conv.weight, mixing.to(conv.weight.dtype)).to(x.dtype), conv.bias)
    if mode == "auto":
        out_h = (x.shape[2] + 2 * conv.padding[0] - conv.dilation[0] * (conv.kernel_size[0] - 1) - 1) // conv.stride[0] + 1
        out_w = (x.shape[3] + 2 * conv.padding[1] - conv.dilation[1] * (conv.kernel_size[1] - 1) - 1) // conv.stride[1] + 1
        limit = TAP_SIDE_MAX_POSITIONS.get(x.device.type, TAP_SIDE_MAX_POSITIONS["cpu"])
        mode = "tap" if x.shape[0] * out_h * out_w <= limit else "weight"
    function = TapMixedConv if mode == "tap" else FormedWeightConv
    return function.apply(x, weight, mixing, bias, conv.stride, conv.padding, conv.dilation)
