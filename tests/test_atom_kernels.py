"""The fast tap-mixing convolutions equal the literal conv2d(x, W + W_r·M), values and gradients."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from sdtune.methods.atom_kernels import FormedWeightConv, TapMixedConv, tap_mixed_conv2d


def literal(x, conv, mixing):
    taps = mixing.shape[0]
    weight = conv.weight + (conv.weight.reshape(-1, taps) @ mixing).reshape(conv.weight.shape)
    return torch.nn.functional.conv2d(x, weight, conv.bias, conv.stride, conv.padding, conv.dilation)


def make_conv(stride, bias, kernel=3):
    torch.manual_seed(0)
    conv = nn.Conv2d(5, 6, kernel, stride=stride, padding=kernel // 2, bias=bias).double()
    conv.requires_grad_(False)
    return conv


@pytest.mark.parametrize("function", [TapMixedConv, FormedWeightConv])
@pytest.mark.parametrize("stride,bias,kernel", [(1, True, 3), (2, True, 3), (1, False, 3), (1, True, 1)])
# 7x7 maps: more output positions than output channels, the tap side forms the weight for its forward;
# 2x2 maps: fewer, it convolves the unfolded input instead
@pytest.mark.parametrize("batch,size", [(2, 7), (1, 2)])
def test_gradcheck_against_the_definition(function, stride, bias, kernel, batch, size):
    conv = make_conv(stride, bias, kernel)
    x = torch.randn(batch, 5, size, size, dtype=torch.float64, requires_grad=True)
    mixing = (0.3 * torch.randn(kernel * kernel, kernel * kernel, dtype=torch.float64)).requires_grad_()

    def fast(x, mixing):
        return function.apply(x, conv.weight, mixing, conv.bias, conv.stride, conv.padding, conv.dilation)

    torch.testing.assert_close(fast(x, mixing), literal(x, conv, mixing), rtol=0, atol=1e-12)
    assert torch.autograd.gradcheck(fast, (x, mixing))
    grads_fast = torch.autograd.grad(fast(x, mixing).square().sum(), (x, mixing))
    grads_literal = torch.autograd.grad(literal(x, conv, mixing).square().sum(), (x, mixing))
    for a, b in zip(grads_fast, grads_literal):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-10)


@pytest.mark.parametrize("function", [TapMixedConv, FormedWeightConv])
@pytest.mark.parametrize("batch,height,width", [(2, 7, 5), (1, 3, 2)])  # both tap-side forwards, as above
def test_gradcheck_with_odd_geometry(function, batch, height, width):
    torch.manual_seed(4)
    conv = nn.Conv2d(3, 4, (3, 2), stride=(2, 1), padding=(2, 0), dilation=(2, 1)).double().requires_grad_(False)
    x = torch.randn(batch, 3, height, width, dtype=torch.float64, requires_grad=True)
    mixing = (0.3 * torch.randn(6, 6, dtype=torch.float64)).requires_grad_()

    def fast(x, mixing):
        return function.apply(x, conv.weight, mixing, conv.bias, conv.stride, conv.padding, conv.dilation)

    torch.testing.assert_close(fast(x, mixing), literal(x, conv, mixing), rtol=0, atol=1e-12)
    assert torch.autograd.gradcheck(fast, (x, mixing))


def test_a_trainable_bias_keeps_its_gradient():
    conv = nn.Conv2d(4, 4, 3, padding=1)
    conv.weight.requires_grad_(False)
    mixing = (0.1 * torch.randn(9, 9)).requires_grad_()
    tap_mixed_conv2d(torch.randn(1, 4, 5, 5), conv, mixing, mode="tap").sum().backward()
    assert conv.bias.grad is not None and mixing.grad is not None


@pytest.mark.parametrize("mode", ["auto", "tap", "weight", "autograd"])
def test_every_mode_gives_the_same_float32_result(mode):
    torch.manual_seed(1)
    conv = nn.Conv2d(8, 8, 3, padding=1).requires_grad_(False)
    x = torch.randn(1, 8, 40, 40, requires_grad=True)  # 1,600 positions: auto takes the weight side
    mixing = (0.1 * torch.randn(9, 9)).requires_grad_()
    out = tap_mixed_conv2d(x, conv, mixing, mode=mode)
    out.square().mean().backward()
    reference = literal(x.detach().requires_grad_(), conv, mixing.detach().requires_grad_())
    torch.testing.assert_close(out, reference, rtol=1e-5, atol=1e-5)


def test_no_grad_uses_the_formed_weight():
    conv = nn.Conv2d(4, 4, 3, padding=1).requires_grad_(False)
    x, mixing = torch.randn(1, 4, 6, 6), 0.1 * torch.randn(9, 9)
    with torch.no_grad():
        torch.testing.assert_close(tap_mixed_conv2d(x, conv, mixing), literal(x, conv, mixing))


@pytest.mark.parametrize("mode", ["tap", "weight"])
def test_fast_kernels_under_autocast_match_the_autocast_convolution(mode):
    torch.manual_seed(2)
    conv = nn.Conv2d(8, 16, 3, padding=1).requires_grad_(False)
    x = torch.randn(2, 8, 12, 12, requires_grad=True)
    results = {}
    for name in (mode, "autograd"):
        mixing = (0.1 * torch.randn(9, 9, generator=torch.Generator().manual_seed(3))).requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = tap_mixed_conv2d(x, conv, mixing, mode=name)
        grads = torch.autograd.grad(out.float().square().mean(), (x, mixing))
        results[name] = (out, *grads)
    out, grad_x, grad_mixing = results[mode]
    assert out.dtype == torch.bfloat16 and grad_mixing.dtype == torch.float32
    for fast, plain in zip(results[mode], results["autograd"]):
        torch.testing.assert_close(fast.float(), plain.float(), rtol=0.05, atol=0.05 * plain.abs().max().item())


@pytest.mark.parametrize("options", [{}, {"m": 4}, {"init": "sparse", "m": 4}])
def test_filter_atoms_unet_gradients_agree_across_kernels(options, tiny_path, unet_inputs):
    from sdtune import methods
    from sdtune.models import load_pipeline

    # float64: the tiny UNet's 1x1 bottleneck amplifies float32 rounding too much for a tight check
    inputs = [t.double() if t.is_floating_point() else t for t in unet_inputs]
    results = []
    for kernel in ("autograd", "tap", "weight"):
        unet = load_pipeline("tiny-random").unet.double()
        method = methods.create("atoms", kernel=kernel, **options)
        params = method.inject(unet)
        with torch.no_grad():
            for i, p in enumerate(params):
                p.copy_(torch.linspace(-0.05, 0.05, p.numel()).reshape(p.shape) * (1 + i % 3))
        out = unet(*inputs).sample
        out.square().mean().backward()
        results.append((out.detach(), [p.grad.clone() for p in params]))
    reference_out, reference_grads = results[0]
    for out, grads in results[1:]:
        torch.testing.assert_close(out, reference_out, rtol=1e-9, atol=1e-10)
        for grad, reference in zip(grads, reference_grads):
            torch.testing.assert_close(grad, reference, rtol=1e-5, atol=1e-8)  # ΔD itself is float32
