"""The Triton tap-side kernel equals autograd on the formed weight W + W_r·M.

Run by Triton's interpreter on CPU tensors (TRITON_INTERPRET=1, which conftest.py sets before anything
imports Triton), so these tests need Triton installed but no GPU; they are skipped where Triton is missing.
Shapes are small: the interpreter runs every program of the grid in numpy.
"""

from __future__ import annotations

import os
import warnings

import pytest
import torch
from torch import nn

triton = pytest.importorskip("triton")

from triton.runtime.interpreter import InterpretedFunction  # noqa: E402

if os.environ.get("TRITON_INTERPRET") == "1" and not isinstance(triton.language.sum, InterpretedFunction):
    # the kernel's tl.sum would raise "Cannot call @triton.jit'd outside of the scope of a kernel" in every test
    pytest.fail("Triton was imported before TRITON_INTERPRET=1 was set: its tl.sum is compiled, not interpreted",
                pytrace=False)

from sdtune.methods import atom_kernels  # noqa: E402
from sdtune.methods.atom_kernels import TapMixedConv, tap_mixed_conv2d  # noqa: E402
from sdtune.methods import atom_triton  # noqa: E402
from sdtune.methods.atom_triton import tap_backward as triton_tap_backward  # noqa: E402

pytestmark = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available(),
    reason="the Triton kernel needs a GPU or TRITON_INTERPRET=1",
)


def formed_weight(weight, mixing):
    taps = mixing.shape[-1]
    rows = weight.reshape(weight.shape[0], weight.shape[1], taps)
    delta = rows @ mixing if mixing.dim() == 2 else torch.einsum("ocs,cst->oct", rows, mixing)
    return weight + delta.reshape(weight.shape)


def reference(x, weight, mixing, grad, stride, padding, dilation):
    """grad_x and dL/dM by autograd on conv2d(x, W + W_r·M)."""
    x = x.detach().requires_grad_()
    mixing = mixing.detach().requires_grad_()
    out = torch.nn.functional.conv2d(x, formed_weight(weight, mixing), None, stride, padding, dilation)
    return torch.autograd.grad(out, (x, mixing), grad)


def tap_backward(x, weight, mix, grad, stride, padding, dilation, need_x=True, need_mixing=True, chunk_bytes=None,
                 kernel="fused"):
    """`atom_triton.tap_backward`'s kernels, and "dgrad" (the library's grad_x of the formed weight, the "fold" kernel's
    dL/dM, joined in `atom_kernels`) on the same arguments; the kernels must run, not the library's fallback."""
    if kernel != "dgrad":
        return triton_tap_backward(x, weight, mix, grad, stride, padding, dilation, need_x, need_mixing, chunk_bytes, kernel)
    eye = torch.eye(mix.shape[-1], dtype=mix.dtype)
    original = atom_triton.TAP_H_CHUNK_BYTES
    try:
        if chunk_bytes is not None:
            atom_triton.TAP_H_CHUNK_BYTES = chunk_bytes
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # a failed kernel warns, then falls back to the library
            return atom_kernels.triton_or_library_backward(
                x, weight, mix - eye, grad, stride, padding, dilation, need_x, need_mixing, kernel
            )
    finally:
        atom_triton.TAP_H_CHUNK_BYTES = original


GEOMETRIES = {
    # name: (batch, c_in, c_out, height, width, kernel size, stride, padding, dilation)
    "3x3": (2, 5, 6, 7, 7, (3, 3), (1, 1), (1, 1), (1, 1)),
    "stride 2": (2, 5, 6, 7, 8, (3, 3), (2, 2), (1, 1), (1, 1)),
    "3x2 strided dilated": (1, 3, 4, 7, 5, (3, 2), (2, 1), (2, 0), (2, 1)),
    "1x1": (2, 5, 6, 6, 6, (1, 1), (1, 1), (0, 0), (1, 1)),
    "37 channels": (1, 37, 4, 5, 5, (3, 3), (1, 1), (1, 1), (1, 1)),  # not a multiple of the tile
    "no padding": (1, 4, 3, 6, 6, (3, 3), (1, 1), (0, 0), (1, 1)),
}


# one M for all channels on every geometry; one per input channel (the D1 variant's) on two
CASES = [(name, False) for name in GEOMETRIES] + [("stride 2", True), ("3x2 strided dilated", True)]


# "dgrad" runs the fold kernel for dL/dM and the library for grad_x: three geometries check how it joins them
KERNEL_CASES = [(name, per_channel, kernel) for name, per_channel in CASES for kernel in ("fused", "fold")] + [
    ("stride 2", True, "dgrad"), ("37 channels", False, "dgrad"), ("3x2 strided dilated", False, "dgrad"),
]


@pytest.mark.parametrize("name,per_channel,kernel", KERNEL_CASES)
def test_kernel_equals_autograd_in_float64(name, per_channel, kernel):
    batch, c_in, c_out, height, width, kernel_size, stride, padding, dilation = GEOMETRIES[name]
    generator = torch.Generator().manual_seed(7)
    taps = kernel_size[0] * kernel_size[1]
    x = torch.randn(batch, c_in, height, width, generator=generator, dtype=torch.float64)
    weight = torch.randn(c_out, c_in, *kernel_size, generator=generator, dtype=torch.float64)
    mixing = 0.3 * torch.randn(*((c_in,) if per_channel else ()), taps, taps, generator=generator, dtype=torch.float64)
    out_shape = torch.nn.functional.conv2d(x, weight, None, stride, padding, dilation).shape
    grad = torch.randn(out_shape, generator=generator, dtype=torch.float64)
    expected_x, expected_mixing = reference(x, weight, mixing, grad, stride, padding, dilation)
    eye = torch.eye(taps, dtype=torch.float64)
    grad_x, grad_mixing = tap_backward(x, weight, eye + mixing, grad, stride, padding, dilation, kernel=kernel)
    torch.testing.assert_close(grad_x, expected_x, rtol=0, atol=1e-12)
    torch.testing.assert_close(grad_mixing, expected_mixing, rtol=0, atol=1e-11)
    # H taken in blocks of channels (as for a large layer: here three) gives the same numbers
    chunk_bytes = grad[:, :1].numel() * taps * x.element_size() * -(-c_in // 3)
    grad_x, grad_mixing = tap_backward(
        x, weight, eye + mixing, grad, stride, padding, dilation, chunk_bytes=chunk_bytes, kernel=kernel
    )
    torch.testing.assert_close(grad_x, expected_x, rtol=0, atol=1e-12)
    torch.testing.assert_close(grad_mixing, expected_mixing, rtol=0, atol=1e-11)


@pytest.mark.parametrize("tile", [(8, 32, 2, False), (16, 16, 4, True)])
def test_other_tiles_give_the_same_numbers(monkeypatch, tile):
    monkeypatch.setattr(atom_triton, "TAP_TILE", tile)
    test_kernel_equals_autograd_in_float64("stride 2", False, "fused")


@pytest.mark.parametrize("tile", [(16, 2, 1), (128, 4, 3)])
def test_other_fold_tiles_give_the_same_numbers(monkeypatch, tile):
    """Blocks of positions narrower than a map's row or wider than the map, one block a program or several."""
    monkeypatch.setattr(atom_triton, "FOLD_TILE", tile)
    test_kernel_equals_autograd_in_float64("stride 2", True, "fold")
    test_kernel_equals_autograd_in_float64("37 channels", False, "fold")


@pytest.mark.parametrize("route", ["triton", "triton-fold", "triton-dgrad"])
def test_gradcheck_through_the_autograd_function(route):
    torch.manual_seed(3)
    conv = nn.Conv2d(3, 4, 3, stride=2, padding=1).double().requires_grad_(False)
    x = torch.randn(2, 3, 5, 4, dtype=torch.float64, requires_grad=True)
    mixing = (0.3 * torch.randn(9, 9, dtype=torch.float64)).requires_grad_()

    def fast(x, mixing):
        return TapMixedConv.apply(x, conv.weight, mixing, conv.bias, conv.stride, conv.padding, conv.dilation, route)

    assert torch.autograd.gradcheck(fast, (x, mixing), fast_mode=True)


@pytest.mark.parametrize("kernel", ["fused", "fold", "dgrad"])
def test_float32_close_to_float64_and_bitwise_repeatable(kernel):
    generator = torch.Generator().manual_seed(11)
    x = torch.randn(2, 12, 8, 8, generator=generator, dtype=torch.float64)
    weight = torch.randn(10, 12, 3, 3, generator=generator, dtype=torch.float64)
    mix = torch.eye(9, dtype=torch.float64) + 0.3 * torch.randn(9, 9, generator=generator, dtype=torch.float64)
    grad = torch.randn(2, 10, 8, 8, generator=generator, dtype=torch.float64)
    geometry = ((1, 1), (1, 1), (1, 1))
    expected_x, expected_mixing = tap_backward(x, weight, mix, grad, *geometry, kernel=kernel)
    first = tap_backward(x.float(), weight.float(), mix.float(), grad.float(), *geometry, kernel=kernel)
    second = tap_backward(x.float(), weight.float(), mix.float(), grad.float(), *geometry, kernel=kernel)
    assert first[0].dtype == torch.float32 and first[1].dtype == torch.float32
    for a, b in zip(first, second):
        assert torch.equal(a, b)  # no atomics: the same sums in the same order every time
    torch.testing.assert_close(first[0].double(), expected_x, rtol=1e-5, atol=1e-5 * expected_x.abs().max().item())
    torch.testing.assert_close(first[1].double(), expected_mixing, rtol=1e-5, atol=1e-5 * expected_mixing.abs().max().item())


@pytest.mark.parametrize("kernel,dtype", [
    ("fused", torch.bfloat16), ("fold", torch.bfloat16), ("fold", torch.float16), ("dgrad", torch.bfloat16),
    pytest.param("fused", torch.float16, marks=pytest.mark.slow), pytest.param("dgrad", torch.float16, marks=pytest.mark.slow),
])
def test_half_precision_within_autograds_own_error(kernel, dtype):
    """In bf16 and fp16 (x, W and dL/dy so, the mixing fp32, as under autocast) each gradient is within 3x the error
    that autograd on the formed weight makes in the same dtype, both against float64: the GPU check's comparison."""
    for stride in (1, 2):
        generator = torch.Generator().manual_seed(stride)
        x = torch.randn(2, 20, 9, 9, generator=generator, dtype=torch.float64)
        weight = 0.1 * torch.randn(17, 20, 3, 3, generator=generator, dtype=torch.float64)
        mixing = 0.05 * torch.randn(9, 9, generator=generator, dtype=torch.float64)
        geometry = ((stride, stride), (1, 1), (1, 1))
        out_size = 9 if stride == 1 else 5
        grad = torch.randn(2, 17, out_size, out_size, generator=generator, dtype=torch.float64)
        expected = reference(x, weight, mixing, grad, *geometry)
        low_x = x.to(dtype).requires_grad_()
        low_mixing = mixing.float().requires_grad_()
        out = torch.nn.functional.conv2d(low_x, formed_weight(weight.to(dtype), low_mixing.to(dtype)), None, *geometry)
        autograd = torch.autograd.grad(out, (low_x, low_mixing), grad.to(dtype))
        got = tap_backward(
            x.to(dtype), weight.to(dtype), torch.eye(9) + low_mixing.detach(), grad.to(dtype), *geometry, kernel=kernel
        )
        assert got[0].dtype == dtype and got[1].dtype == torch.float32
        for ours, theirs, exact in zip(got, autograd, expected):
            scale = exact.abs().max().item()
            error = (ours.double() - exact).abs().max().item() / scale
            assert error <= 3 * (theirs.double() - exact).abs().max().item() / scale and error < 2e-2


@pytest.mark.parametrize("kernel", ["fused", "fold", "dgrad"])
def test_only_the_gradients_asked_for(kernel, monkeypatch):
    generator = torch.Generator().manual_seed(2)
    x = torch.randn(1, 4, 5, 5, generator=generator, dtype=torch.float64)
    weight = torch.randn(3, 4, 3, 3, generator=generator, dtype=torch.float64)
    mix = torch.eye(9, dtype=torch.float64)
    grad = torch.randn(1, 3, 5, 5, generator=generator, dtype=torch.float64)
    geometry = ((1, 1), (1, 1), (1, 1))
    full_x, full_mixing = tap_backward(x, weight, mix, grad, *geometry, kernel=kernel)
    only_x = tap_backward(x, weight, mix, grad, *geometry, need_mixing=False, kernel=kernel)
    only_mixing = tap_backward(x, weight, mix, grad, *geometry, need_x=False, kernel=kernel)
    assert only_x[1] is None and only_mixing[0] is None
    assert torch.equal(only_x[0], full_x) and torch.equal(only_mixing[1], full_mixing)
    if kernel == "dgrad":  # grad_x alone is the library's: no H = Wᵀ·G formed for it
        formed = []
        blocks_of_h = atom_triton._blocks_of_h
        monkeypatch.setattr(atom_triton, "_blocks_of_h", lambda *a: formed.append(1) or blocks_of_h(*a))
        tap_backward(x, weight, mix, grad, *geometry, need_mixing=False, kernel=kernel)
        assert not formed


@pytest.mark.parametrize("backward", ["triton", "triton-fold", "triton-dgrad"])
def test_the_triton_mode_of_the_layer_function(backward):
    torch.manual_seed(6)
    conv = nn.Conv2d(6, 5, 3, padding=1).double().requires_grad_(False)
    x = torch.randn(2, 6, 6, 6, dtype=torch.float64, requires_grad=True)
    mixing = (0.2 * torch.randn(9, 9, dtype=torch.float64)).requires_grad_()
    assert atom_kernels.route(x, f"tap-{backward}") == ("tap", backward)
    out = tap_mixed_conv2d(x, conv, mixing, mode=f"tap-{backward}")
    grads = torch.autograd.grad(out.square().sum(), (x, mixing))
    expected = torch.nn.functional.conv2d(x, formed_weight(conv.weight, mixing), conv.bias, 1, 1)
    expected_grads = torch.autograd.grad(expected.square().sum(), (x, mixing))
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-12)
    for a, b in zip(grads, expected_grads):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-10)
    assert atom_kernels.triton_tap_backward() is not None  # it ran: no fallback to the library


@pytest.mark.parametrize("backward", ["triton", "triton-fold", "triton-dgrad"])
def test_torch_compile_takes_the_kernel_whole(backward):
    """torch.compile traces the layer with no graph break and keeps the kernel as one op of the backward graph
    (it cannot trace the kernel's launch itself); the compiled gradients are the eager ones."""
    torch.manual_seed(8)
    conv = nn.Conv2d(5, 4, 3, stride=2, padding=1).double().requires_grad_(False)
    x = torch.randn(2, 5, 7, 6, dtype=torch.float64, requires_grad=True)
    mixing = (0.2 * torch.randn(5, 9, 9, dtype=torch.float64)).requires_grad_()  # one per channel

    def loss(x, mixing):
        return tap_mixed_conv2d(x, conv, mixing, mode=f"tap-{backward}").square().sum()

    torch._dynamo.reset()
    explained = torch._dynamo.explain(loss)(x, mixing)
    assert explained.graph_count == 1 and explained.graph_break_count == 0
    expected = torch.autograd.grad(loss(x, mixing), (x, mixing))
    graphs = []

    def backend(graph, inputs):
        from functorch.compile import make_boxed_func
        from torch._dynamo.backends.common import aot_autograd

        def keep(module, _):
            graphs.append(module)
            return make_boxed_func(module.forward)

        return aot_autograd(fw_compiler=keep, bw_compiler=keep)(graph, inputs)

    compiled = torch.compile(loss, backend=backend, fullgraph=True)
    got = torch.autograd.grad(compiled(x, mixing), (x, mixing))
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
    backward_ops = [str(node.target) for node in graphs[-1].graph.nodes if node.op == "call_function"]
    assert "sdtune.tap_backward_triton.default" in backward_ops
    assert atom_kernels.triton_tap_backward() is not None  # the kernel ran, not the library's fallback
    torch._dynamo.reset()


def test_an_unknown_kernel_is_refused():
    x = torch.zeros(1, 2, 3, 3, dtype=torch.float64)
    with pytest.raises(ValueError, match="no Triton tap-side kernel 'dgrad'"):
        triton_tap_backward(x, torch.zeros(2, 2, 3, 3, dtype=torch.float64), torch.eye(9, dtype=torch.float64), x,
                            (1, 1), (1, 1), (1, 1), kernel="dgrad")
