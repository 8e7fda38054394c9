"""Fast exact convolutions for updates that mix a kernel's taps: conv(x, W_r·(I + M)).

Filter-atom updates with coefficients α = W_r·P have ΔW = α·ΔD = W_r·(P·ΔD): one k²×k² matrix
M = P·ΔD acting on the tap axis of the frozen weight (or, for the D1 variant, one M_c per input
channel: pass `mixing` as (c_in, k², k²)). Autograd on `conv2d(x, W + ΔW)` re-forms the whole weight
every step, keeps a copy of it for backward and computes a full weight gradient that is then
contracted down to k²×k² numbers. Two custom autograd functions avoid that:

- `TapMixedConv` (tap side): the forward convolves x with the formed W_r·(I + M) where that weight is
  no bigger than the unfolded input, else unfolds x, mixes the k² taps of every input channel with
  (I + M) and does one GEMM with the frozen W. Backward: H = Wᵀ·G, the GEMM the input gradient needs
  anyway; grad_x and dL/dM are then cheap contractions of H with (I + M) and with x's taps. No weight
  gradient, no stored formed weight, nothing stored but x. Three ways to do those contractions
  (`TAP_BACKWARDS`):
  - "unfold": dL/dM = Σ H·unfold(x)ᵀ as one batched GEMM over (batch, channel) pairs, grad_x = fold of
    (I + M)ᵀ·H. Library calls with a few parallel regions each: the CPU default. On small maps the batch
    is folded into the GEMMs' columns (`FOLD_BATCH_MAX_POSITIONS`), forward and backward.
  - "depthwise": one depthwise library convolution backward with k² outputs per channel and weight
    (I + M) gives both. Fewer bytes moved on CPU, but oneDNN runs this grouped convolution's backward
    as one parallel region per channel on maps of 32×32 and more (323 regions for 320 channels, against
    3 for "unfold"): each region waits for both threads to be scheduled, so on a machine whose cores
    other work keeps busy it slows down many times more than the library's own convolutions do.
  - "triton" (CUDA): `atom_triton.tap_backward`, one kernel that reads H and x in place and writes grad_x
    and per-tile partial sums of dL/dM (no unfolded input, no mixed copy of H, no atomics); H is formed
    per block of channels so that little memory is added to the frozen convolution's backward. Under
    torch.compile it is called as the custom op `sdtune::tap_backward_triton`, one op of the backward graph.
  - "triton-fold" (CUDA): `atom_triton.tap_backward_fold`, one kernel that reads H once: dL/dM by a tensor-core dot
    with x's taps gathered in place, and (I + M)ᵀ·H written over H for the library's fold to sum into grad_x.
  - "triton-dgrad" (CUDA): grad_x by the library's input gradient of the formed weight, dL/dM by that kernel alone.
- `ProjectedMixingConv` (weight side): one library convolution with W + ΔW formed on the fly and not kept;
  backward forms it again (where x needs a gradient) and asks the library for grad_x and grad_W in one call. It takes
  filter atoms' ΔD and P and forms M = P·ΔD itself, so that a layer is one autograd node, with as few aten calls as
  the maths allows (`benchmarks/host_cost.py` counts them: a forward and backward with its loss makes 20 in fp32
  and 24 under bf16 autocast with bf16 frozen weights, against the frozen convolution's 6 and 8). On CPU, fast on large maps, where the library's
  weight gradient costs less than H's memory traffic; on CUDA the default everywhere (`TAP_SIDE_MAX_POSITIONS`).
  `FormedWeightConv` is the same for one mixing per input channel (D1).

`tap_mixed_conv2d` picks per call by the device, the weight's size and the number of input positions
(`PLAIN_MAX_WEIGHTS`, `TAP_SIDE_MAX_POSITIONS`, `TAP_BACKWARD`), measured with
`benchmarks/atom_kernels.py` and `benchmarks/speed.py`. On CUDA that is the weight side everywhere (see
`TAP_SIDE_MAX_POSITIONS`); the Triton kernel remains for `mode="tap"` or `"tap-triton"`. All are exact: tests
compare them with `conv2d(x, W + W_r·M)` by gradcheck in float64 (the Triton kernel through Triton's CPU interpreter).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import warn

# Batch x input positions up to which the tap side is faster than the weight side (CPU, fp32): on
# 8x8 to 32x32 maps of SD v1.4 the tap side costs 0.5-1.6x the frozen convolution and the weight side
# 1.7-5.6x; on 64x64 maps they are within this machine's noise, and the weight side wins on the 320->4
# output convolution and the stride-2 one. With this limit an SD v1.4 step at 32x32 latents took 0.85x
# the frozen floor (0.78x LoRA's) with the depthwise backward, and 0.93x against its 0.88x with the unfold
# backward (ten rounds in turns: 3.28 and 3.25 s a step, within this machine's noise).
# CUDA takes the weight side everywhere (`ProjectedMixingConv` for a shared mixing, `FormedWeightConv` per channel).
# On an H200 (SD v1.4, 64x64 latents, bf16; benchmarks/RESULTS.md) the step is bound by the host, and the weight side
# makes the fewest calls a layer of the routes that keep no formed weight: a step took 0.134 s at batch 1 and 0.127 s
# at batch 4 so, against 0.140 and 0.146 s with the Triton tap side on the 13 of 42 geometries where timing each layer
# alone had ranked it faster. Its cost is on the GPU: cuDNN's bf16 weight gradient adds about the floor's own kernel
# time. The Triton tap side stays opt-in: `-o kernel=tap`.
TAP_SIDE_MAX_POSITIONS: dict[str, int | None] = {"cpu": 1024, "cuda": 0}
# Which contraction the tap side's backward uses, per device type (see the module docstring).
TAP_BACKWARD = {"cpu": "unfold", "cuda": "triton"}
# Convolutions with at most this many weights take plain autograd on the formed weight: the weight
# gradient of so small a weight costs less than the fast routes' extra calls (CPU, one thread: 64->64
# channels on 8x8 maps 514 us a forward and backward against 599 for the tap side; 128->128, 1,592
# against 1,251). All the tiny model's convolutions but its eight 128->64 ones are this small; of SD
# v1.4's, only conv_in and conv_out.
PLAIN_MAX_WEIGHTS = {"cpu": 1 << 16}
# Output positions per image up to which the unfold route folds the batch into its GEMMs' columns (one GEMM
# of batch·positions columns, after a copy of the unfolded input into (channel, tap, batch·position) order)
# instead of one GEMM per image: a GEMM of 4 to 64 columns runs far below the library's speed (CPU, one
# thread, batch 4, forward + backward: 1,280 channels on 2x2 maps 166 -> 22 ms, on 4x4 83 -> 52 ms, 640 on 8x8
# 57 -> 51 ms); from 16x16 up the copies cost what the wider GEMM saves.
FOLD_BATCH_MAX_POSITIONS = 64
TAP_BACKWARDS = ("unfold", "depthwise", "triton", "triton-fold", "triton-dgrad")
MODES = ("auto", "tap", "weight", "autograd") + tuple(f"tap-{name}" for name in TAP_BACKWARDS)

_triton_state: dict[str, object] = {}


def triton_tap_backward():
    """`atom_triton.tap_backward`, or None where Triton cannot be imported (or failed once)."""
    if "function" not in _triton_state:
        try:
            from .atom_triton import tap_backward
        except Exception:  # noqa: BLE001 - no Triton, or one that does not load: the library routes remain
            tap_backward = None
        _triton_state["function"] = tap_backward
    return _triton_state["function"]


def _identity_plus(mixing: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    taps = mixing.shape[-1]
    return torch.eye(taps, dtype=dtype, device=mixing.device) + mixing.to(dtype)


def _mixed_weight(weight: torch.Tensor, mixing: torch.Tensor) -> torch.Tensor:
    """W_r·(I + M) shaped like W; `mixing` (k², k²) or one per input channel (c_in, k², k²)."""
    taps = mixing.shape[-1]
    if mixing.dim() == 2:
        flat = weight.reshape(-1, taps)
        return torch.addmm(flat, flat, mixing).reshape(weight.shape)
    out_channels, channels = weight.shape[:2]
    flat = weight.reshape(out_channels, channels, taps).transpose(0, 1)  # (c_in, c_out, k²)
    return torch.baddbmm(flat, flat, mixing).transpose(0, 1).reshape(weight.shape)


def _sum_mixing_grad(grad: torch.Tensor, per_channel: bool, channels: int, dtype: torch.dtype) -> torch.Tensor:
    """(batch·channels or channels, k², k²) per-channel products -> dL/dM, summed in fp32 at least
    (fp16 sums over 1,280 channels overflow early)."""
    at_least_fp32 = torch.promote_types(grad.dtype, torch.float32)
    taps = grad.shape[-1]
    grad = grad.reshape(-1, channels, taps, taps)
    if per_channel:
        return grad.sum(0, dtype=at_least_fp32).to(dtype)
    return grad.sum((0, 1), dtype=at_least_fp32).to(dtype)


class TapMixedConv(torch.autograd.Function):
    """conv2d(x, W_r·(I + M)) whose backward works on the taps; gradients for x and M only."""

    @staticmethod
    def forward(ctx, x, weight, mixing, bias, stride, padding, dilation, backward="unfold"):
        batch, channels, height, width = x.shape
        out_channels, _, kh, kw = weight.shape
        taps = kh * kw
        ctx.save_for_backward(x, weight, mixing)
        ctx.geometry = (stride, padding, dilation)
        ctx.backward_route = backward
        out_height = (height + 2 * padding[0] - dilation[0] * (kh - 1) - 1) // stride[0] + 1
        out_width = (width + 2 * padding[1] - dilation[1] * (kw - 1) - 1) // stride[1] + 1
        positions = out_height * out_width
        if backward.startswith("triton") or out_channels <= batch * positions:
            # the formed weight is no bigger than the unfolded input: form it and let the library convolve
            return F.conv2d(x, _mixed_weight(weight, _as(mixing, x.dtype)), bias, stride, padding, dilation)
        mix = _identity_plus(mixing, x.dtype)
        unfolded = F.unfold(x, (kh, kw), dilation=dilation, padding=padding, stride=stride)
        mixed = torch.matmul(mix, unfolded.view(batch, channels, taps, positions))
        del unfolded  # 9x the input: free it before the GEMM's output is allocated
        return frozen_conv_of_columns(weight, mixed.view(batch, channels * taps, positions), bias, out_height, out_width)

    @staticmethod
    def backward(ctx, grad):
        x, weight, mixing = ctx.saved_tensors
        stride, padding, dilation = ctx.geometry
        need_x, need_mixing = ctx.needs_input_grad[0], ctx.needs_input_grad[2]
        if ctx.backward_route.startswith("triton"):
            kernel = ctx.backward_route.partition("-")[2] or "fused"  # "triton-fold" -> "fold"
            grad_x, grad_mixing = _triton_backward(
                x, weight, mixing, grad, stride, padding, dilation, need_x, need_mixing, kernel
            )
        else:
            contract = _unfold_backward if ctx.backward_route == "unfold" else _depthwise_backward
            grad_x, grad_mixing = contract(x, weight, mixing, grad, stride, padding, dilation, need_x, need_mixing)
        return grad_x, None, grad_mixing, None, None, None, None, None


def _grad_taps(weight: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """H = Wᵀ·G, (batch, c_in·k², output positions): the GEMM the frozen convolution's input gradient needs anyway."""
    out_channels = weight.shape[0]
    return torch.matmul(weight.reshape(out_channels, -1).T, grad.reshape(grad.shape[0], out_channels, -1))


def _folds_batch(batch: int, positions: int) -> bool:
    return batch > 1 and positions <= FOLD_BATCH_MAX_POSITIONS


def matmul_over_batch(matrix: torch.Tensor, batched: torch.Tensor) -> torch.Tensor:
    """matrix (m, k) @ batched (batch, k, p) -> (batch, m, p): on small maps one GEMM over the whole batch's columns
    (the result a transposed view), else one per image."""
    batch, rows, positions = batched.shape
    if not _folds_batch(batch, positions):
        return torch.matmul(matrix, batched)
    columns = batched.transpose(0, 1).reshape(rows, -1)
    return torch.matmul(matrix, columns).view(matrix.shape[0], batch, positions).transpose(0, 1)


def frozen_conv_of_columns(weight: torch.Tensor, columns: torch.Tensor, bias, out_height: int, out_width: int):
    """The frozen convolution W of an unfolded (and transformed) input `columns`, (batch, c_in·kh·kw, positions):
    one GEMM with W's rows, plus the bias."""
    out_channels = weight.shape[0]
    out = matmul_over_batch(weight.reshape(out_channels, -1), columns)
    if bias is not None:
        out = out + bias.view(1, -1, 1)
    return out.reshape(columns.shape[0], out_channels, out_height, out_width)


def _unfold_backward(x, weight, mixing, grad, stride, padding, dilation, need_x, need_mixing):
    positions = grad.shape[-2] * grad.shape[-1]
    if _folds_batch(x.shape[0], positions):
        return _unfold_backward_folded(x, weight, mixing, grad, stride, padding, dilation, need_x, need_mixing)
    batch, channels, height, width = x.shape
    kh, kw = weight.shape[-2:]
    taps = kh * kw
    grad_taps = _grad_taps(weight, grad)
    positions = grad_taps.shape[-1]
    pairs = grad_taps.view(batch * channels, taps, positions)
    grad_mixing = None
    if need_mixing:
        # Σ over positions as one batched GEMM over (batch, channel) pairs: the transposed operand is a
        # view, so nothing 9x the input is copied but the unfolded input itself
        unfolded = F.unfold(x, (kh, kw), dilation=dilation, padding=padding, stride=stride)
        products = torch.matmul(pairs, unfolded.view(batch * channels, taps, positions).transpose(1, 2))
        del unfolded
        grad_mixing = _sum_mixing_grad(products, mixing.dim() == 3, channels, mixing.dtype)
    grad_x = None
    if need_x:
        mix = _identity_plus(mixing, x.dtype)
        mixed = torch.matmul(mix.transpose(-1, -2), grad_taps.view(batch, channels, taps, positions))
        del grad_taps, pairs
        grad_x = F.fold(
            mixed.view(batch, channels * taps, positions), (height, width), (kh, kw),
            dilation=dilation, padding=padding, stride=stride,
        )
    return grad_x, grad_mixing


def _unfold_backward_folded(x, weight, mixing, grad, stride, padding, dilation, need_x, need_mixing):
    """`_unfold_backward` with the batch folded into the GEMMs' columns (small maps): H = Wᵀ·G as one GEMM over
    every image's positions, in (channel, tap, batch·position) order, and dL/dM as one batched GEMM over channels."""
    batch, channels, height, width = x.shape
    out_channels, _, kh, kw = weight.shape
    taps = kh * kw
    grad_taps = matmul_over_batch(weight.reshape(out_channels, -1).T, grad.reshape(batch, out_channels, -1))
    grad_taps = grad_taps.transpose(0, 1).view(channels, taps, -1)  # the folded GEMM's own (c_in·k², batch·P) order
    grad_mixing = None
    if need_mixing:
        unfolded = F.unfold(x, (kh, kw), dilation=dilation, padding=padding, stride=stride)
        taps_of_x = unfolded.view(batch, channels, taps, -1).permute(1, 2, 0, 3).reshape(channels, taps, -1)
        del unfolded
        products = torch.matmul(grad_taps, taps_of_x.transpose(1, 2))  # (channels, k², k²), summed over the batch
        del taps_of_x
        grad_mixing = _sum_mixing_grad(products, mixing.dim() == 3, channels, mixing.dtype)
    grad_x = None
    if need_x:
        mix = _identity_plus(mixing, x.dtype)
        mixed = torch.matmul(mix.transpose(-1, -2), grad_taps)
        del grad_taps
        mixed = mixed.view(channels * taps, batch, -1).transpose(0, 1).reshape(batch, channels * taps, -1)
        grad_x = F.fold(mixed, (height, width), (kh, kw), dilation=dilation, padding=padding, stride=stride)
    return grad_x, grad_mixing


def _depthwise_backward(x, weight, mixing, grad, stride, padding, dilation, need_x, need_mixing):
    channels = x.shape[1]
    kh, kw = weight.shape[-2:]
    taps = kh * kw
    out_height, out_width = grad.shape[-2:]
    grad_taps = _grad_taps(weight, grad).view(x.shape[0], channels * taps, out_height, out_width)
    # The rest is a depthwise convolution with `taps` outputs per channel and weight (I + M): its
    # input gradient is grad_x, its weight gradient summed over channels is dL/dM.
    mix = _identity_plus(mixing, x.dtype)
    depthwise = mix.expand(channels, taps, taps).reshape(channels * taps, 1, kh, kw)
    grad_x, grad_depthwise, _ = torch.ops.aten.convolution_backward(
        grad_taps, x, depthwise, None, stride, padding, dilation, False, (0, 0), channels,
        [need_x, need_mixing, False],
    )
    grad_mixing = None
    if need_mixing:
        products = grad_depthwise.view(channels, taps, taps)
        grad_mixing = _sum_mixing_grad(products, mixing.dim() == 3, channels, mixing.dtype)
    return grad_x, grad_mixing


def _triton_backward(x, weight, mixing, grad, stride, padding, dilation, need_x, need_mixing, kernel="fused"):
    if not torch.compiler.is_compiling():  # eager: the op's dispatch would cost ~30 us a layer of host time
        return triton_or_library_backward(
            x, weight, mixing, grad, stride, padding, dilation, need_x, need_mixing, kernel
        )
    # Traced through a custom op: torch.compile keeps it whole in the backward graph instead of tracing the kernel's
    # launch (whose Python it cannot trace) or the fallback's state.
    grad_x, grad_mixing = torch.ops.sdtune.tap_backward_triton(
        x, weight, mixing, grad, list(stride), list(padding), list(dilation), need_x, need_mixing, kernel
    )
    return (grad_x if need_x else None), (grad_mixing if need_mixing else None)


@torch.library.custom_op("sdtune::tap_backward_triton", mutates_args=())
def _tap_backward_triton(
    x: torch.Tensor, weight: torch.Tensor, mixing: torch.Tensor, grad: torch.Tensor,
    stride: list[int], padding: list[int], dilation: list[int], need_x: bool, need_mixing: bool, kernel: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`triton_or_library_backward` as an op: each gradient not needed is an empty tensor (an op returns tensors)."""
    grad_x, grad_mixing = triton_or_library_backward(
        x, weight, mixing, grad, stride, padding, dilation, need_x, need_mixing, kernel
    )
    return (
        grad_x.contiguous() if need_x else x.new_empty(0),
        grad_mixing.contiguous() if need_mixing else mixing.new_empty(0),
    )


def triton_or_library_backward(x, weight, mixing, grad, stride, padding, dilation, need_x, need_mixing, kernel="fused"):
    """(grad_x, dL/dM) by the Triton `kernel` ("fused" or "fold" of `atom_triton.KERNELS`, or "dgrad": grad_x by the
    library's input gradient of the formed weight and dL/dM by the "fold" kernel alone), or by the depthwise backward
    where Triton is missing or failed."""
    function = triton_tap_backward()
    if function is not None:
        mix = _identity_plus(mixing, torch.promote_types(mixing.dtype, torch.float32))
        try:
            if kernel == "dgrad":
                grad_x = _formed_weight_input_grad(x, weight, mixing, grad, stride, padding, dilation) if need_x else None
                grad_mixing = function(
                    x, weight, mix, grad, stride, padding, dilation, need_x=False, need_mixing=True, kernel="fold"
                )[1] if need_mixing else None  # else its H would be a GEMM for nothing
            else:
                grad_x, grad_mixing = function(
                    x, weight, mix, grad, stride, padding, dilation, need_x=need_x, need_mixing=need_mixing, kernel=kernel
                )
            return grad_x, grad_mixing.to(mixing.dtype) if grad_mixing is not None else None
        except Exception as error:  # noqa: BLE001 - an exact library route is always there to fall back on
            warn(f"the Triton tap-side kernel ({kernel}) failed ({type(error).__name__}: {error}); using the library's")
            _triton_state["function"] = None
    return _depthwise_backward(x, weight, mixing, grad, stride, padding, dilation, need_x, need_mixing)


def _formed_weight_input_grad(x, weight, mixing, grad, stride, padding, dilation) -> torch.Tensor:
    """grad_x by the library's input gradient of the formed weight W_r·(I + M), as the forward formed it: the frozen
    convolution's own backward (cuDNN's on a GPU) with a different weight."""
    formed = _mixed_weight(weight, _as(mixing, x.dtype))
    return torch.ops.aten.convolution_backward(
        grad, x, formed, None, stride, padding, dilation, False, (0, 0), 1, [True, False, False]
    )[0]


@_tap_backward_triton.register_fake
def _(x, weight, mixing, grad, stride, padding, dilation, need_x, need_mixing, kernel):
    return (
        torch.empty(x.shape, dtype=x.dtype, device=x.device) if need_x else x.new_empty(0),
        torch.empty(mixing.shape, dtype=mixing.dtype, device=mixing.device) if need_mixing else mixing.new_empty(0),
    )


class FormedWeightConv(torch.autograd.Function):
    """conv2d(x, W_r·(I + M_c)) with one mixing M_c per input channel (D1; `mixing` (c_in, k², k²)), the weight formed on
    the fly and never stored: the weight side of `weight_side_conv` for such a mixing."""

    @staticmethod
    def forward(ctx, x, weight, mixing, bias, stride, padding, dilation):
        mixing_for_weight = _as(mixing, weight.dtype)
        ctx.save_for_backward(x, weight, mixing_for_weight)
        ctx.geometry = (stride, padding, dilation, mixing.dtype)
        return F.conv2d(x, _mixed_weight(weight, mixing_for_weight), bias, stride, padding, dilation)

    @staticmethod
    def backward(ctx, grad):
        x, weight, mixing = ctx.saved_tensors
        stride, padding, dilation, mixing_dtype = ctx.geometry
        need_x, need_mixing = ctx.needs_input_grad[0], ctx.needs_input_grad[2]
        # the weight gradient alone reads only the weight's shape and dtype: no formed weight for it
        formed = _mixed_weight(weight, mixing) if need_x else torch.empty_like(weight)
        grad_x, grad_weight, _ = torch.ops.aten.convolution_backward(
            grad, x, formed, None, stride, padding, dilation, False, (0, 0), 1, [need_x, need_mixing, False],
        )
        if not need_mixing:
            return grad_x, None, None, None, None, None, None
        # W'_r[:, c] = W_r[:, c]·(I + M_c), so dL/dM_c = W_r[:, c]ᵀ·dL/dW'_r[:, c]
        out_channels, channels, taps = weight.shape[0], weight.shape[1], mixing.shape[-1]
        rows = weight.reshape(out_channels, channels, taps).transpose(0, 1)
        grad_mixing = torch.bmm(rows.transpose(1, 2), grad_weight.reshape(out_channels, channels, taps).transpose(0, 1))
        return grad_x, None, _as(grad_mixing, mixing_dtype), None, None, None, None


class ProjectedMixingConv(torch.autograd.Function):
    """conv2d(x, W_r·(I + s·P·ΔD)), or conv2d(x, W_r·(I + M)) without P: the weight side of a shared mixing, M formed
    inside.

    One autograd node a layer instead of three (the mixing's product, its cast, the convolution), no route to pick
    per call and no cast that changes nothing: where the step is bound by the host rather than the GPU, as SD v1.4
    at 512 px is on an H200 (the frozen step costs the same at batch 1 and 4), every aten call a layer makes costs
    time (`benchmarks/host_cost.py` counts them). Stores x in the compute dtype, W_r as a view of the frozen W, P and
    the k²×k² mixing, never the formed weight. Runs with autocast off (`projected_mixing_conv2d` turns it off): the
    mixing is formed in ΔD's dtype and cast once to W's, the weight formed in W's dtype with the scale as the GEMM's
    alpha, the convolution run in `dtype`."""

    @staticmethod
    def forward(ctx, x, weight, bias, projector, delta, scale, stride, padding, dilation, dtype):
        rows = weight.reshape(weight.shape[0] * weight.shape[1], -1)  # W_r
        mixing = delta if projector is None else torch.mm(projector, delta.reshape(delta.shape[0], -1))
        mixing = _as(mixing, rows.dtype)
        x = _as(x, dtype)
        # W_r where it is a view of W (backward then reshapes nothing), else W itself: a channels-last W_r is a copy
        ctx.save_for_backward(x, rows if weight.is_contiguous() else weight, projector, mixing)
        ctx.geometry = (stride, padding, dilation, scale, weight.shape, delta.shape, delta.dtype)
        formed = _as(torch.addmm(rows, rows, mixing, alpha=scale), dtype).view(weight.shape)  # s folded into the GEMM
        return F.conv2d(x, formed, bias if bias is None else _as(bias, dtype), stride, padding, dilation)

    @staticmethod
    def backward(ctx, grad):
        x, rows, projector, mixing = ctx.saved_tensors
        stride, padding, dilation, scale, weight_shape, delta_shape, delta_dtype = ctx.geometry
        if rows.dim() == 4:
            rows = rows.reshape(weight_shape[0] * weight_shape[1], -1)
        need_x, need_delta = ctx.needs_input_grad[0], ctx.needs_input_grad[4]
        if need_x:
            formed = _as(torch.addmm(rows, rows, mixing, alpha=scale), x.dtype).view(weight_shape)
        else:  # the weight gradient reads only the weight's shape and dtype: no formed weight to compute
            formed = x.new_empty(weight_shape)
        grad_x, grad_weight, _ = torch.ops.aten.convolution_backward(
            _as(grad, x.dtype), x, formed, None, stride, padding, dilation, False, (0, 0), 1, [need_x, need_delta, False],
        )
        if not need_delta:
            return grad_x, None, None, None, None, None, None, None, None, None
        # W'_r = W_r + s·W_r·P·ΔD, so dL/dΔD = s·Pᵀ·(W_rᵀ·dL/dW'_r)
        grad_rows = grad_weight.reshape(rows.shape)
        # in fp32 where the dtypes differ, and for fp16, whose range a sum over c_out·c_in rows overflows under loss
        # scaling (torch.promote_types would be one more aten call)
        sums = rows.dtype if rows.dtype == grad_rows.dtype and rows.dtype != torch.float16 else torch.float32
        products = _as(torch.mm(_as(rows, sums).T, _as(grad_rows, sums)), delta_dtype)
        if projector is not None:
            transposed = projector.T  # (m, k²), and the shape of the product: addmm's input, ignored at beta=0
            products = torch.mm(transposed, products) if scale == 1.0 else torch.addmm(
                transposed, transposed, products, beta=0, alpha=scale
            )
        elif scale != 1.0:
            products = products * scale
        return grad_x, None, None, None, products.view(delta_shape), None, None, None, None, None


def _without_autocast(device_type: str, function, *arguments):
    """function(*arguments) with autocast off on `device_type` (where it is on). Two flips of its flag cost the host
    less than an autocast context; under torch.compile the context, which dynamo traces (a flip it refuses)."""
    if torch.compiler.is_compiling():
        with torch.autocast(device_type, enabled=False):
            return function(*arguments)
    torch.set_autocast_enabled(device_type, False)
    try:
        return function(*arguments)
    finally:
        torch.set_autocast_enabled(device_type, True)


def _as(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`tensor` in `dtype`, without the call where it already is (a call costs host time a layer)."""
    return tensor if tensor.dtype == dtype else tensor.to(dtype)


def projected_mixing_conv2d(
    x: torch.Tensor, conv: nn.Conv2d, projector: torch.Tensor, delta: torch.Tensor, scale: float = 1.0,
    mode: str = "auto",
) -> torch.Tensor:
    """conv(x) with `conv.weight` replaced by W_r·(I + scale·projector·delta), exactly: filter atoms' D variant.

    The weight side runs as `ProjectedMixingConv`; every other route as `tap_mixed_conv2d` with the formed mixing."""
    device_type = x.device.type
    autocast = torch.is_autocast_enabled(device_type)
    weight, bias = conv.weight, conv.bias
    dtype = torch.get_autocast_dtype(device_type) if autocast else weight.dtype
    if (
        delta.requires_grad
        and torch.is_grad_enabled()
        and (autocast or x.dtype == dtype)
        and route(x, mode, weight.numel())[0] == "weight"
        and _fast_geometry(conv, weight, bias)
    ):
        arguments = (x, weight, bias, projector, delta, scale, conv.stride, conv.padding, conv.dilation, dtype)
        if not autocast:
            return ProjectedMixingConv.apply(*arguments)
        # off inside, so that only the casts the function asks for run (autocast would cast P and ΔD to form the
        # mixing in the half dtype)
        return _without_autocast(device_type, ProjectedMixingConv.apply, *arguments)
    taps = projector.shape[0]
    mixing = projector.to(delta.dtype) @ delta.reshape(-1, taps)
    return tap_mixed_conv2d(x, conv, mixing * scale if scale != 1.0 else mixing, mode)


def tap_mixed_conv2d(x: torch.Tensor, conv: nn.Conv2d, mixing: torch.Tensor, mode: str = "auto") -> torch.Tensor:
    """conv(x) with `conv.weight` replaced by W_r·(I + mixing), exactly, by the fastest route.

    `mixing`: (k², k²), or (c_in, k², k²) for one per input channel. `mode`: "auto" (by the device,
    the weight's size and the input positions), "tap" (the device's tap-side backward), "tap-unfold", "tap-depthwise",
    "tap-triton", "tap-triton-fold", "tap-triton-dgrad" (one tap-side backward), "weight", or "autograd" (plain autograd on the formed weight:
    the reference the others are tested against). When no gradient is needed, the formed weight is
    used directly. Under autocast the fast kernels run in the autocast dtype, as the library
    convolution would; the mixing matrix and its gradient stay fp32.
    """
    side, backward = route(x, mode, conv.weight.numel())
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type) and torch.is_grad_enabled() and side != "autograd":
        dtype = torch.get_autocast_dtype(device_type)
        return _without_autocast(device_type, _fast_or_plain, _as(x, dtype), conv, mixing, side, backward, dtype)
    return _fast_or_plain(x, conv, mixing, side, backward, None)


def route(x: torch.Tensor, mode: str = "auto", weights: int | None = None) -> tuple[str, str | None]:
    """(side, tap-side backward) that `mode` takes for input x and a weight of `weights` numbers:
    ("tap", "unfold"), ("weight", None), ("autograd", None)..."""
    return device_route(x.device.type, x.shape[0] * x.shape[2] * x.shape[3], mode, weights)


def device_route(device_type: str, positions: int, mode: str = "auto", weights: int | None = None) -> tuple[str, str | None]:
    """`route` for an input of `positions` batch x input positions on `device_type`, with no tensor needed (what
    `sdtune env` reports per device)."""
    if mode.startswith("tap-"):
        return "tap", mode[4:]
    if mode in ("weight", "autograd"):
        return mode, None
    if mode == "auto" and weights is not None and weights <= PLAIN_MAX_WEIGHTS.get(device_type, 0):
        return "autograd", None
    backward = TAP_BACKWARD.get(device_type, "depthwise")
    if backward == "triton" and (device_type != "cuda" or triton_tap_backward() is None):
        if mode == "auto":
            return "weight", None  # CUDA without Triton: cuDNN's weight gradient beats the library tap side
        backward = "depthwise"
    if mode == "tap":
        return "tap", backward
    limit = TAP_SIDE_MAX_POSITIONS.get(device_type, 0)  # elsewhere (mps, xpu): the library's own route
    return ("tap", backward) if limit is None or positions <= limit else ("weight", None)


def _takes_plain(x: torch.Tensor, conv: nn.Conv2d, weight_dtype: torch.dtype) -> bool:
    """Whether no fast route applies: no gradient, mixed dtypes, or a layer `_fast_geometry` refuses."""
    return not torch.is_grad_enabled() or x.dtype != weight_dtype or not _fast_geometry(conv, conv.weight, conv.bias)


def _fast_geometry(conv: nn.Conv2d, weight: torch.Tensor, bias: torch.Tensor | None) -> bool:
    """Whether the fast routes can run this layer: frozen weight and bias, one group, zero padding given in numbers.
    `weight` and `bias` are the layer's own, passed by a caller that holds them (a module attribute lookup costs
    the host a call's worth of time)."""
    return (
        conv.groups == 1
        and not weight.requires_grad
        and (bias is None or not bias.requires_grad)
        and conv.padding_mode == "zeros"
        and not isinstance(conv.padding, str)
    )


def _fast_or_plain(x: torch.Tensor, conv: nn.Conv2d, mixing: torch.Tensor, side: str, backward, dtype) -> torch.Tensor:
    weight, bias = conv.weight, conv.bias
    if dtype is not None:
        weight = _as(weight, dtype)
        bias = _as(bias, dtype) if bias is not None else None
    if side == "autograd" or _takes_plain(x, conv, weight.dtype):
        return conv._conv_forward(x, _as(_mixed_weight(weight, _as(mixing, weight.dtype)), x.dtype), bias)
    if side == "tap":
        return TapMixedConv.apply(x, weight, mixing, bias, conv.stride, conv.padding, conv.dilation, backward)
    return weight_side_conv(x, weight, mixing, bias, conv.stride, conv.padding, conv.dilation)


def weight_side_conv(x, weight, mixing, bias, stride, padding, dilation) -> torch.Tensor:
    """conv2d(x, W_r·(I + M)) on the weight side: `ProjectedMixingConv` for a shared M (k², k²), `FormedWeightConv` for
    one per input channel (c_in, k², k²)."""
    if mixing.dim() == 2:
        return ProjectedMixingConv.apply(x, weight, bias, None, mixing, 1.0, stride, padding, dilation, weight.dtype)
    return FormedWeightConv.apply(x, weight, mixing, bias, stride, padding, dilation)

