"""Fast exact convolutions for updates that mix a kernel's taps: conv(x, W_r·(I + M)).

Filter-atom updates with coefficients α = W_r·P have ΔW = α·ΔD = W_r·(P·ΔD): one k²×k² matrix
M = P·ΔD acting on the tap axis of the frozen weight. Autograd on `conv2d(x, W + ΔW)` re-forms the
whole weight every step, keeps a copy of it for backward and computes a full weight gradient that
is then contracted down to k²×k² numbers. Two custom autograd functions avoid that:

- `TapMixedConv` (tap side): the forward convolves x with the formed W_r·(I + M) where that weight is
  no bigger than the unfolded input, else unfolds x, mixes the k² taps of every input channel with
  (I + M) and does one GEMM with the frozen W. Backward: H = Wᵀ·G, the GEMM the input gradient needs
  anyway; the rest is a depthwise convolution of x with k² outputs per channel and weight (I + M),
  whose library backward gives grad_x and, summed over channels, grad_M in one call. No weight
  gradient, no stored formed weight, nothing stored but x.
- `FormedWeightConv` (weight side): one library convolution with W + ΔW formed on the fly and not
  kept; backward forms it again and asks the library for grad_x and grad_W in one call. Fast on
  large maps, where the library's weight gradient costs less than H's memory traffic.

`tap_mixed_conv2d` picks per call by the number of input positions (`TAP_SIDE_MAX_POSITIONS`),
measured on CPU with `benchmarks/speed.py`. Both are exact: tests compare them with
`conv2d(x, W + W_r·M)` by gradcheck in float64.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

# Batch x input positions up to which the tap side is faster than the weight side (CPU, fp32): on
# 8x8 to 32x32 maps of SD v1.4 the tap side costs 0.5-1.6x the frozen convolution and the weight side
# 1.7-5.6x; on 64x64 maps they are within this machine's noise, and the weight side wins on the 320->4
# output convolution and the stride-2 one. With this limit an SD v1.4 step at 32x32 latents took 0.85x
# the frozen floor (0.78x LoRA's), against 1.00x (0.90x) with the unfold/fold tap side it replaced.
# On an H200 (SD v1.4, 64x64 latents, batch 1, bf16) the weight side everywhere took 0.124 s a step
# and the CPU limit 0.142 s (with the unfold/fold tap side): cuDNN's weight gradient is cheap there.
TAP_SIDE_MAX_POSITIONS = {"cpu": 1024, "cuda": 0}


def _mixed_weight(weight: torch.Tensor, mixing: torch.Tensor) -> torch.Tensor:
    taps = mixing.shape[0]
    flat = weight.reshape(-1, taps)
    return (flat + flat @ mixing).reshape(weight.shape)


class TapMixedConv(torch.autograd.Function):
    """conv2d(x, W_r·(I + M)) whose backward works on the taps; gradients for x and M only."""

    @staticmethod
    def forward(ctx, x, weight, mixing, bias, stride, padding, dilation):
        batch, channels, height, width = x.shape
        out_channels, _, kh, kw = weight.shape
        taps = kh * kw
        mix = torch.eye(taps, dtype=x.dtype, device=x.device) + mixing.to(x.dtype)
        ctx.save_for_backward(x, weight, mix)
        ctx.geometry = (stride, padding, dilation)
        ctx.mixing_dtype = mixing.dtype
        out_height = (height + 2 * padding[0] - dilation[0] * (kh - 1) - 1) // stride[0] + 1
        out_width = (width + 2 * padding[1] - dilation[1] * (kw - 1) - 1) // stride[1] + 1
        positions = out_height * out_width
        if out_channels <= batch * positions:
            # the formed weight is no bigger than the unfolded input: form it and let the library convolve
            return F.conv2d(x, _mixed_weight(weight, mixing.to(x.dtype)), bias, stride, padding, dilation)
        unfolded = F.unfold(x, (kh, kw), dilation=dilation, padding=padding, stride=stride)
        mixed = torch.matmul(mix, unfolded.view(batch, channels, taps, positions))
        del unfolded  # 9x the input: free it before the GEMM's output is allocated
        out = torch.matmul(weight.reshape(out_channels, -1), mixed.view(batch, channels * taps, positions))
        if bias is not None:
            out = out + bias.view(1, -1, 1)
        return out.view(batch, out_channels, out_height, out_width)

    @staticmethod
    def backward(ctx, grad):
        x, weight, mix = ctx.saved_tensors
        stride, padding, dilation = ctx.geometry
        batch, channels = x.shape[:2]
        out_channels, _, kh, kw = weight.shape
        taps = kh * kw
        out_height, out_width = grad.shape[-2:]
        # dL/d(mixed taps) H = Wᵀ·G: the GEMM the frozen convolution's input gradient needs anyway
        grad_taps = torch.matmul(weight.reshape(out_channels, -1).T, grad.reshape(batch, out_channels, -1))
        grad_taps = grad_taps.view(batch, channels * taps, out_height, out_width)
        # The rest is a depthwise convolution with `taps` outputs per channel and weight (I + M): its
        # input gradient is grad_x, its weight gradient summed over channels is dL/dM. One library
        # call does both without the unfolded input (unfold/fold and small GEMMs were 2-5x slower).
        depthwise = mix.view(1, taps, kh, kw).expand(channels, taps, kh, kw).reshape(channels * taps, 1, kh, kw)
        grad_x, grad_depthwise, _ = torch.ops.aten.convolution_backward(
            grad_taps, x, depthwise, None, stride, padding, dilation, False, (0, 0), channels,
            [ctx.needs_input_grad[0], ctx.needs_input_grad[2], False],
        )
        grad_mixing = None
        if ctx.needs_input_grad[2]:  # summed in fp32 at least: fp16 sums over 1,280 channels overflow early
            at_least_fp32 = torch.promote_types(grad_depthwise.dtype, torch.float32)
            grad_mixing = grad_depthwise.view(channels, taps, taps).sum(0, dtype=at_least_fp32).to(ctx.mixing_dtype)
        return grad_x, None, grad_mixing, None, None, None, None


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

    `mode`: "auto" (by input positions and device), "tap", "weight", or "autograd" (plain autograd
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
        or (conv.bias is not None and conv.bias.requires_grad)
        or conv.padding_mode != "zeros"
        or isinstance(conv.padding, str)
    )
    if plain:
        return conv._conv_forward(x, _mixed_weight(conv.weight, mixing.to(conv.weight.dtype)).to(x.dtype), conv.bias)
    if mode == "auto":
        limit = TAP_SIDE_MAX_POSITIONS.get(x.device.type, 0)  # elsewhere (mps, xpu): the library's own route
        mode = "tap" if x.shape[0] * x.shape[2] * x.shape[3] <= limit else "weight"
    function = TapMixedConv if mode == "tap" else FormedWeightConv
    return function.apply(x, weight, mixing, bias, conv.stride, conv.padding, conv.dilation)
