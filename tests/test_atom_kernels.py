"""The fast tap-mixing convolutions equal the literal conv2d(x, W + W_r·M), values and gradients."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from torch import nn

from sdtune.methods import atom_kernels
from sdtune.methods.atom_kernels import TapMixedConv, projected_mixing_conv2d, route, tap_mixed_conv2d, weight_side_conv

ROOT = Path(__file__).resolve().parents[1]

# every exact route: the tap side with each library backward, and the weight side
ROUTES = ["tap-unfold", "tap-depthwise", "weight"]


def literal(x, conv, mixing):
    """conv2d(x, W + W_r·M), M (k², k²) or one per input channel (c_in, k², k²)."""
    taps = mixing.shape[-1]
    rows = conv.weight.reshape(conv.weight.shape[0], conv.weight.shape[1], taps)
    delta = rows @ mixing if mixing.dim() == 2 else torch.einsum("ocs,cst->oct", rows, mixing)
    weight = conv.weight + delta.reshape(conv.weight.shape)
    return torch.nn.functional.conv2d(x, weight, conv.bias, conv.stride, conv.padding, conv.dilation)


def apply(route_name, x, conv, mixing):
    if route_name == "weight":
        return weight_side_conv(x, conv.weight, mixing, conv.bias, conv.stride, conv.padding, conv.dilation)
    backward = route_name.removeprefix("tap-")
    return TapMixedConv.apply(x, conv.weight, mixing, conv.bias, conv.stride, conv.padding, conv.dilation, backward)


def make_conv(stride, bias, kernel=3):
    torch.manual_seed(0)
    conv = nn.Conv2d(5, 6, kernel, stride=stride, padding=kernel // 2, bias=bias).double()
    conv.requires_grad_(False)
    return conv


@pytest.mark.parametrize("route_name", ROUTES)
@pytest.mark.parametrize("stride,bias,kernel", [(1, True, 3), (2, True, 3), (1, False, 3), (1, True, 1)])
# 7x7 maps: more output positions than output channels, the tap side forms the weight for its forward;
# 2x2 maps: fewer, it convolves the unfolded input instead
@pytest.mark.parametrize("batch,size", [(2, 7), (1, 2)])
def test_gradcheck_against_the_definition(route_name, stride, bias, kernel, batch, size):
    conv = make_conv(stride, bias, kernel)
    x = torch.randn(batch, 5, size, size, dtype=torch.float64, requires_grad=True)
    mixing = (0.3 * torch.randn(kernel * kernel, kernel * kernel, dtype=torch.float64)).requires_grad_()

    def fast(x, mixing):
        return apply(route_name, x, conv, mixing)

    torch.testing.assert_close(fast(x, mixing), literal(x, conv, mixing), rtol=0, atol=1e-12)
    assert torch.autograd.gradcheck(fast, (x, mixing))
    grads_fast = torch.autograd.grad(fast(x, mixing).square().sum(), (x, mixing))
    grads_literal = torch.autograd.grad(literal(x, conv, mixing).square().sum(), (x, mixing))
    for a, b in zip(grads_fast, grads_literal):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-10)


@pytest.mark.parametrize("route_name", ROUTES)
@pytest.mark.parametrize("batch,height,width", [(2, 7, 5), (1, 3, 2)])  # both tap-side forwards, as above
@pytest.mark.parametrize("per_channel", [False, True])  # one M, or one per input channel (the D1 variant's)
def test_gradcheck_with_odd_geometry(route_name, batch, height, width, per_channel):
    torch.manual_seed(4)
    conv = nn.Conv2d(3, 4, (3, 2), stride=(2, 1), padding=(2, 0), dilation=(2, 1)).double().requires_grad_(False)
    x = torch.randn(batch, 3, height, width, dtype=torch.float64, requires_grad=True)
    mixing = (0.3 * torch.randn(*((3,) if per_channel else ()), 6, 6, dtype=torch.float64)).requires_grad_()

    def fast(x, mixing):
        return apply(route_name, x, conv, mixing)

    torch.testing.assert_close(fast(x, mixing), literal(x, conv, mixing), rtol=0, atol=1e-12)
    assert torch.autograd.gradcheck(fast, (x, mixing))


@pytest.mark.parametrize("route_name", ROUTES)
@pytest.mark.parametrize("per_channel", [False, True])
def test_only_the_gradients_asked_for(route_name, per_channel):
    conv = make_conv(1, True)
    x = torch.randn(2, 5, 6, 6, dtype=torch.float64)
    mixing = (0.3 * torch.randn(*((5,) if per_channel else ()), 9, 9, dtype=torch.float64)).requires_grad_()
    (grad_mixing,) = torch.autograd.grad(apply(route_name, x, conv, mixing).square().sum(), (mixing,))
    (reference,) = torch.autograd.grad(literal(x, conv, mixing).square().sum(), (mixing,))
    torch.testing.assert_close(grad_mixing, reference, rtol=0, atol=1e-10)
    x.requires_grad_(True)
    (grad_x,) = torch.autograd.grad(apply(route_name, x, conv, mixing.detach()).square().sum(), (x,))
    (reference,) = torch.autograd.grad(literal(x, conv, mixing.detach()).square().sum(), (x,))
    torch.testing.assert_close(grad_x, reference, rtol=0, atol=1e-10)


@pytest.mark.parametrize("route_name", ROUTES)
def test_float32_gradients_repeat_bitwise(route_name):
    torch.manual_seed(5)
    conv = nn.Conv2d(16, 8, 3, padding=1).requires_grad_(False)
    x = torch.randn(2, 16, 9, 9, requires_grad=True)
    mixing = (0.1 * torch.randn(9, 9)).requires_grad_()
    first, second = (torch.autograd.grad(apply(route_name, x, conv, mixing).square().sum(), (x, mixing)) for _ in range(2))
    for a, b in zip(first, second):
        assert torch.equal(a, b)


def test_a_trainable_bias_keeps_its_gradient():
    conv = nn.Conv2d(4, 4, 3, padding=1)
    conv.weight.requires_grad_(False)
    mixing = (0.1 * torch.randn(9, 9)).requires_grad_()
    tap_mixed_conv2d(torch.randn(1, 4, 5, 5), conv, mixing, mode="tap").sum().backward()
    assert conv.bias.grad is not None and mixing.grad is not None


@pytest.mark.parametrize("mode", ["auto", "tap", "tap-unfold", "tap-depthwise", "weight", "autograd"])
def test_every_mode_gives_the_same_float32_result(mode):
    torch.manual_seed(1)
    conv = nn.Conv2d(8, 8, 3, padding=1).requires_grad_(False)
    x = torch.randn(1, 8, 40, 40, requires_grad=True)  # 576 weights: auto takes plain autograd
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


def test_the_route_follows_the_device_and_the_map_size(monkeypatch):
    small, large = torch.empty(1, 4, 32, 32), torch.empty(2, 4, 32, 32)  # 1,024 and 2,048 input positions
    assert route(small) == ("tap", "unfold") and route(large) == ("weight", None)
    assert route(large, "tap") == ("tap", "unfold") and route(small, "tap-depthwise") == ("tap", "depthwise")
    assert route(small, "weight") == ("weight", None)
    # a weight of at most PLAIN_MAX_WEIGHTS numbers: plain autograd, whatever the map
    assert route(large, weights=1 << 16) == ("autograd", None) and route(large, weights=(1 << 16) + 1) == ("weight", None)
    assert route(small, "tap", weights=9) == ("tap", "unfold")
    # a device whose tap side is the Triton kernel takes the weight side when Triton is missing
    monkeypatch.setitem(atom_kernels.TAP_BACKWARD, "cpu", "triton")
    monkeypatch.setitem(atom_kernels._triton_state, "function", None)
    assert route(small) == ("weight", None) and route(small, "tap") == ("tap", "depthwise")


@pytest.mark.parametrize("mode", ["tap", "tap-depthwise", "weight"])
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


@pytest.mark.parametrize("options", [{}, {"m": 4}, {"init": "sparse", "m": 4}, {"m1": 2}, {"m1": 3, "m": 4}])
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


@pytest.mark.parametrize("fold", [False, True])  # one GEMM per image, or the batch folded into the columns
@pytest.mark.parametrize("per_channel", [False, True])
@pytest.mark.parametrize("geometry,batch,height,width", [
    ("plain", 3, 1, 1),  # fewer batch·positions than output channels: the tap side's own forward
    ("plain", 3, 2, 3),
    ("plain", 2, 7, 7),  # more: the formed weight's forward, the tap side's backward
    ("odd", 3, 2, 2),
    ("odd", 2, 7, 5),
])
def test_the_unfold_route_with_the_batch_folded_or_not_is_the_definition(fold, per_channel, geometry, batch, height,
                                                                       width, monkeypatch):
    monkeypatch.setattr(atom_kernels, "FOLD_BATCH_MAX_POSITIONS", 1 << 30 if fold else 0)
    torch.manual_seed(5)
    if geometry == "plain":
        conv = nn.Conv2d(5, 7, 3, padding=1).double().requires_grad_(False)
    else:
        conv = nn.Conv2d(5, 7, (3, 2), stride=(2, 1), padding=(2, 0), dilation=(2, 1)).double().requires_grad_(False)
    taps = conv.kernel_size[0] * conv.kernel_size[1]
    x = torch.randn(batch, 5, height, width, dtype=torch.float64, requires_grad=True)
    mixing = (0.3 * torch.randn(*((5,) if per_channel else ()), taps, taps, dtype=torch.float64)).requires_grad_()

    def fast(x, mixing):
        return apply("tap-unfold", x, conv, mixing)

    torch.testing.assert_close(fast(x, mixing), literal(x, conv, mixing), rtol=0, atol=1e-12)
    assert torch.autograd.gradcheck(fast, (x, mixing))


@pytest.mark.parametrize("scale", [1.0, 0.7])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("x_needs_grad", [True, False])  # without: the weight side forms no weight in backward
@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])  # W_r a view of W, or not
def test_the_projected_weight_side_is_the_definition(scale, bias, x_needs_grad, memory_format):
    """`projected_mixing_conv2d` on the weight side (`ProjectedMixingConv`) with a projector that is not orthonormal
    (sparse atoms' D⁺) and a scale: conv2d(x, W + W_r·(s·P·ΔD)), values and gradients."""
    conv = make_conv(1, bias).to(memory_format=memory_format)
    torch.manual_seed(6)
    projector = torch.randn(9, 6, dtype=torch.float64)
    x = torch.randn(2, 5, 6, 6, dtype=torch.float64).to(memory_format=memory_format).requires_grad_(x_needs_grad)
    delta = (0.3 * torch.randn(6, 3, 3, dtype=torch.float64)).requires_grad_()

    def fast(x, delta):
        return projected_mixing_conv2d(x, conv, projector, delta, scale, mode="weight")

    def reference(x, delta):
        return literal(x, conv, scale * projector @ delta.reshape(6, 9))

    torch.testing.assert_close(fast(x, delta), reference(x, delta), rtol=0, atol=1e-12)
    inputs = (x, delta) if x_needs_grad else (delta,)
    assert torch.autograd.gradcheck(lambda *tensors: fast(*((x,) * (not x_needs_grad) + tensors)), inputs)
    grads = torch.autograd.grad(fast(x, delta).square().sum(), inputs)
    expected = torch.autograd.grad(reference(x, delta).square().sum(), inputs)
    for a, b in zip(grads, expected):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-10)


def test_the_projected_weight_side_under_autocast_with_half_frozen_weights():
    """As mixed-precision training runs it: autocast bf16, the frozen weights stored in bf16, ΔD and P in fp32. The
    weight side gives the autocast convolution's result and ΔD's gradient in fp32, within bf16's rounding."""
    from sdtune.methods.atoms import FilterAtomConv2d
    from sdtune.precision import cast_frozen_parameters

    torch.manual_seed(7)
    base = nn.Conv2d(8, 16, 3, padding=1).requires_grad_(False)
    atoms = torch.linalg.qr(torch.randn(9, 9))[0]
    results = {}
    for kernel in ("weight", "autograd"):
        layer = FilterAtomConv2d(nn.Conv2d(8, 16, 3, padding=1).requires_grad_(False), atoms, kernel=kernel)
        layer.base_layer.load_state_dict(base.state_dict())
        with torch.no_grad():
            layer.delta_atoms.copy_(0.1 * torch.randn(9, 3, 3, generator=torch.Generator().manual_seed(8)))
        layer.scale = 0.5
        cast_frozen_parameters(layer, torch.bfloat16, [layer.delta_atoms])
        x = torch.randn(2, 8, 12, 12, generator=torch.Generator().manual_seed(9), requires_grad=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = layer(x)
        results[kernel] = (out, *torch.autograd.grad(out.float().square().mean(), (x, layer.delta_atoms)))
    out, grad_x, grad_delta = results["weight"]
    assert out.dtype == torch.bfloat16 and grad_x.dtype == torch.float32 and grad_delta.dtype == torch.float32
    for fast, plain in zip(results["weight"], results["autograd"]):
        torch.testing.assert_close(fast.float(), plain.float(), rtol=0.05, atol=0.02 * plain.abs().max().item())


def host_cost_benchmark():
    """benchmarks/host_cost.py as a module: it counts a layer's aten operations."""
    spec = importlib.util.spec_from_file_location("host_cost", ROOT / "benchmarks" / "host_cost.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# What one forward and backward of a filter-atom layer on the weight side dispatches, with the benchmark's sum and
# gradient accumulation (6 for the frozen convolution in fp32, 8 under autocast). A change that adds host work to
# every layer of every step fails here: lower these when a change takes calls away.
WEIGHT_SIDE_ATEN_OPS = {"fp32": 20, "bf16": 24}


@pytest.mark.parametrize("precision", sorted(WEIGHT_SIDE_ATEN_OPS))
def test_the_weight_side_makes_few_host_calls_and_keeps_no_formed_weight(precision):
    from sdtune.methods.atoms import FilterAtomConv2d

    benchmark = host_cost_benchmark()
    autocast = torch.bfloat16 if precision == "bf16" else None
    layer = benchmark.make_layers(16, autocast)["atoms[weight]"]
    assert isinstance(layer, FilterAtomConv2d)
    x = torch.randn(1, 16, 4, 4, requires_grad=True)
    ops = benchmark.aten_ops(layer, x, autocast)
    assert len(ops) <= WEIGHT_SIDE_ATEN_OPS[precision], [str(op) for op in ops]

    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda tensor: saved.append(tensor) or tensor, lambda tensor: tensor):
        with torch.autocast("cpu", dtype=autocast or torch.bfloat16, enabled=autocast is not None):
            layer(x)
    weight = layer.base_layer.weight
    shares_weight = [t for t in saved if t.untyped_storage().data_ptr() == weight.untyped_storage().data_ptr()]
    new = [t for t in saved if t.untyped_storage().data_ptr() != weight.untyped_storage().data_ptr()]
    # the input (cast to the compute dtype), P and the k²×k² mixing; W only as a view of itself
    assert len(shares_weight) == 1 and sum(t.numel() for t in new) == x.numel() + 2 * 81
