"""A Triton kernel for the tap side's backward: grad_x and dL/dM from H = Wᵀ·G, reading x in place.

For y = conv(x, W_r·(I + M)) (taps s, t of a kh×kw kernel; M one k²×k² matrix, or one per input channel
as in the D1 variant), with G = dL/dy and H[b, c, s, p] = Σ_o W[o, c, s]·G[b, o, p] (one GEMM with the
frozen weight, the work the frozen convolution's input gradient does anyway):

    grad_x[b, c, q] = Σ_t Σ_s (I + M)[s, t]·H[b, c, s, p_t(q)]
    dL/dM[s, t]     = Σ_{b, c, q} x[b, c, q]·H[b, c, s, p_t(q)]

where p_t(q) is the output position that input position q feeds through tap t (none where the stride
skips q or q is past the map's edge). One program takes a tile of channels × input positions, gathers the
k² values of H that each input position feeds, accumulates grad_x in fp32 and writes it once, and reduces
x·H over its positions to one partial sum of each entry of dL/dM per channel. The partial sums are added
up by torch in a fixed order, so the result is deterministic: no atomics. Nothing 9× the input is read but
H itself: no unfolded input, no mixed copy of H, no depthwise weight gradient.

H is formed per block of channels (`TAP_H_CHUNK_BYTES`), so it never holds more than that beyond what the
frozen convolution's backward holds.

That kernel ("fused") reads each value of H 9 times (once for each tap t it feeds) and reduces x·H across its
tile once for each of the k⁴ entries of dL/dM. The "fold" kernel reads H once instead. One program takes one
channel and a run of output positions p and, per block of positions, loads H's k² rows there (padded to 16) and
the input's k² taps X_t[p] = x[q_t(p)] gathered in place (q_t(p) the input position tap t reads for output p):

    dL/dM[s, t] += Σ_p H[s, p]·X_t[p]          one tensor-core dot, (16 × positions)·(positions × 16)
    H'[t, p]     = Σ_s (I + M)[s, t]·H[s, p]    one more, written over H in place

and torch's fold (col2im) then sums H' into grad_x, as the unfold route's backward does. No unfolded input, no
cross-lane reduction per entry, no second buffer the size of H. (`atom_kernels` also offers "dgrad": grad_x by
the library's input gradient of the formed weight, the "fold" kernel for dL/dM alone.)

Under `TRITON_INTERPRET=1` (set before this module is imported) the kernels run on CPU tensors, float64
included: that is how the tests check them without a GPU.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

# At most this many bytes of H = Wᵀ·G exist at once: the channels are taken in blocks that fit.
TAP_H_CHUNK_BYTES = 32 << 20
# (channels, input positions, warps, unrolled) of one program, or None for `tile`'s choice; the
# per-layer benchmark times others with --triton-tiles.
TAP_TILE: tuple[int, int, int, bool] | None = None
# (output positions a block, warps, blocks a program) of the "fold" kernel's programs; --triton-tiles sets others.
FOLD_TILE = (64, 4, 8)
KERNELS = ("fused", "fold")


@triton.jit
def _tap_pair(h_rows, mix_ptr, part_rows, x, acc, p, gather_ok, c, c_ok, s, t, positions,
              taps: tl.constexpr, NEED_X: tl.constexpr, NEED_M: tl.constexpr, PER_CHANNEL: tl.constexpr,
              acc_dtype: tl.constexpr):
    """Taps s (of H) and t (of x): grad_x += (I + M)[s, t]·H_s(p_t(q)); partial dL/dM[s, t] = Σ_q x·H_s(p_t(q))."""
    h = tl.load(h_rows + s * positions + p[None, :], mask=gather_ok, other=0.0).to(acc_dtype)
    if NEED_X:
        if PER_CHANNEL:
            weight = tl.load(mix_ptr + c * (taps * taps) + (s * taps + t), mask=c_ok, other=0.0)
            acc += weight.to(acc_dtype)[:, None] * h
        else:
            acc += tl.load(mix_ptr + (s * taps + t)).to(acc_dtype) * h
    if NEED_M:
        tl.store(part_rows + (s * taps + t), tl.sum(x * h, axis=1), mask=c_ok)
    return acc


@triton.jit
def _tap_backward_kernel(
    h_ptr, x_ptr, mix_ptr, gx_ptr, part_ptr,
    channels, height, width, out_height, out_width,
    x_batch_stride, x_channel_stride, gx_batch_stride, gx_channel_stride,
    stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
    KH: tl.constexpr, KW: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_Q: tl.constexpr,
    NEED_X: tl.constexpr, NEED_M: tl.constexpr, PER_CHANNEL: tl.constexpr, FP64: tl.constexpr,
    UNROLL: tl.constexpr,
):
    q_block = tl.program_id(0)
    c_block = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    n_q_blocks = tl.num_programs(0)
    taps: tl.constexpr = KH * KW
    acc_dtype: tl.constexpr = tl.float64 if FP64 else tl.float32

    c = (c_block * BLOCK_C + tl.arange(0, BLOCK_C)).to(tl.int64)
    q = q_block * BLOCK_Q + tl.arange(0, BLOCK_Q)
    c_ok = c < channels
    q_ok = q < height * width
    qh = q // width
    qw = q % width
    tile_ok = c_ok[:, None] & q_ok[None, :]
    x = tl.zeros([BLOCK_C, BLOCK_Q], dtype=acc_dtype)
    if NEED_M:
        x = tl.load(x_ptr + b * x_batch_stride + c[:, None] * x_channel_stride + q[None, :], mask=tile_ok, other=0.0)
        x = x.to(acc_dtype)
    acc = tl.zeros([BLOCK_C, BLOCK_Q], dtype=acc_dtype)
    positions = out_height * out_width
    h_rows = h_ptr + (b * channels + c[:, None]) * (taps * positions)
    # partial sums of dL/dM: one row of taps² per (batch, block of positions, channel)
    part_rows = part_ptr + ((b * n_q_blocks + q_block) * channels + c) * (taps * taps)
    for t in range(taps):  # a loop, not unrolled: 81 gathers in flight would spill registers
        # the output position p_t(q) that input position q feeds through tap t, where there is one
        nh = qh + pad_h - (t // KW) * dil_h
        nw = qw + pad_w - (t % KW) * dil_w
        ph = tl.where(nh >= 0, nh, 0) // stride_h
        pw = tl.where(nw >= 0, nw, 0) // stride_w
        fed = q_ok & (nh >= 0) & (nw >= 0) & (ph * stride_h == nh) & (pw * stride_w == nw)
        fed = fed & (ph < out_height) & (pw < out_width)
        p = tl.where(fed, ph * out_width + pw, 0)
        gather_ok = c_ok[:, None] & fed[None, :]
        if UNROLL:  # the k² gathers of one tap in flight together (more registers)
            for s in tl.static_range(taps):
                acc = _tap_pair(h_rows, mix_ptr, part_rows, x, acc, p, gather_ok, c, c_ok, s, t, positions,
                                taps, NEED_X, NEED_M, PER_CHANNEL, acc_dtype)
        else:
            for s in range(taps):
                acc = _tap_pair(h_rows, mix_ptr, part_rows, x, acc, p, gather_ok, c, c_ok, s, t, positions,
                                taps, NEED_X, NEED_M, PER_CHANNEL, acc_dtype)
    if NEED_X:
        out = gx_ptr + b * gx_batch_stride + c[:, None] * gx_channel_stride + q[None, :]
        tl.store(out, acc.to(gx_ptr.dtype.element_ty), mask=tile_ok)


def tile(channels: int, positions: int) -> tuple[int, int, int, bool]:
    """(channels, input positions, warps, unrolled) of one program: `TAP_TILE`, or by default 512 elements,
    up to 128 positions of a row (256 contiguous bytes in bf16) by as many channels as make up 512, on 4
    warps, with the k² gathers of a tap unrolled: on sm_90, as launched (stride, dilation and padding of 1
    specialised), 72-86 registers for a 3x3 kernel and no spills (141 with no argument specialised);
    tests/test_atom_triton_sm90.py compiles every launch of SD v1.4 and checks. Wider rows of positions
    mean fewer partial sums of dL/dM to write; the reduction over them crosses warps."""
    if TAP_TILE is not None:
        return TAP_TILE
    block_q = min(128, triton.next_power_of_2(max(positions, 1)))
    block_c = min(512 // block_q, triton.next_power_of_2(max(channels, 1)))
    return block_c, block_q, 4, True


def tap_backward(
    x: torch.Tensor,
    weight: torch.Tensor,
    mix: torch.Tensor,
    grad: torch.Tensor,
    stride: tuple[int, int],
    padding: tuple[int, int],
    dilation: tuple[int, int],
    need_x: bool = True,
    need_mixing: bool = True,
    chunk_bytes: int | None = None,
    kernel: str = "fused",
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """grad_x and dL/dM of y = conv(x, W_r·mix) given G = dL/dy (`mix` = I + M: (k², k²), or
    (c_in, k², k²) for one per input channel), by the `kernel` of `KERNELS`. dL/dM comes back in fp32
    (float64 for float64 inputs), shaped like `mix`."""
    if kernel == "fold":
        return tap_backward_fold(x, weight, mix, grad, stride, padding, dilation, need_x, need_mixing, chunk_bytes)
    if kernel != "fused":
        raise ValueError(f"no Triton tap-side kernel {kernel!r}; the kernels are {', '.join(KERNELS)}")
    batch, channels, height, width = x.shape
    kh, kw = weight.shape[-2:]
    taps = kh * kw
    out_height, out_width = grad.shape[-2:]
    per_channel = mix.dim() == 3
    fp64 = x.dtype == torch.float64
    x, grad, mix, acc_dtype = _prepared(x, grad, mix)
    grad_x = torch.empty_like(x) if need_x else None
    grad_mix = None
    chunk = _channels_a_block(x, taps, out_height * out_width, chunk_bytes)
    block_c, block_q, warps, unroll = tile(chunk, height * width)
    n_q = triton.cdiv(height * width, block_q)
    sums = []
    for start, stop, h in _blocks_of_h(x, weight, grad, chunk):
        count = stop - start
        n_c = triton.cdiv(count, block_c)
        if need_mixing:
            part = torch.empty(batch * n_q, count, taps * taps, dtype=acc_dtype, device=x.device)
        else:
            part = h  # never written
        x_chunk = x[:, start:stop]
        gx_chunk = grad_x[:, start:stop] if need_x else x_chunk
        _tap_backward_kernel[(n_q, n_c, batch)](
            h, x_chunk, mix[start:stop] if per_channel else mix, gx_chunk, part,
            count, height, width, out_height, out_width,
            x.stride(0), x.stride(1), gx_chunk.stride(0), gx_chunk.stride(1),
            stride[0], stride[1], padding[0], padding[1], dilation[0], dilation[1],
            KH=kh, KW=kw, BLOCK_C=block_c, BLOCK_Q=block_q,
            NEED_X=need_x, NEED_M=need_mixing, PER_CHANNEL=per_channel, FP64=fp64, UNROLL=unroll,
            num_warps=warps,
        )
        del h
        if need_mixing:
            sums.append(part.sum(0) if per_channel else part.sum((0, 1)))
    if need_mixing:
        grad_mix = _summed(sums, per_channel).view(mix.shape)
    return grad_x, grad_mix


def _prepared(x: torch.Tensor, grad: torch.Tensor, mix: torch.Tensor):
    """(x contiguous, dL/dy contiguous as (batch, c_out, positions), (I + M) in the accumulation dtype, that dtype:
    fp32, or float64 for float64 inputs)."""
    acc_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    grad = grad.contiguous()
    return x.contiguous(), grad.view(grad.shape[0], grad.shape[1], -1), mix.to(acc_dtype).contiguous(), acc_dtype


def _channels_a_block(x: torch.Tensor, taps: int, positions: int, chunk_bytes: int | None) -> int:
    """How many input channels' H fit in `chunk_bytes` (`TAP_H_CHUNK_BYTES` by default), at least one."""
    chunk_bytes = TAP_H_CHUNK_BYTES if chunk_bytes is None else chunk_bytes
    batch, channels = x.shape[:2]
    return max(1, min(channels, chunk_bytes // max(batch * taps * positions * x.element_size(), 1)))


def _blocks_of_h(x: torch.Tensor, weight: torch.Tensor, grad: torch.Tensor, chunk: int):
    """(first channel, channel past the last, H) for each block of `chunk` input channels: H = Wᵀ·G for those
    channels, (batch, count·k², positions), the input gradient's own GEMM."""
    out_channels, channels, kh, kw = weight.shape
    taps = kh * kw
    rows = weight.reshape(out_channels, channels * taps)
    for start in range(0, channels, chunk):
        stop = min(channels, start + chunk)
        yield start, stop, torch.matmul(rows[:, start * taps : stop * taps].T, grad)


def _summed(sums: list[torch.Tensor], per_channel: bool) -> torch.Tensor:
    """dL/dM from each block of channels' partial sums: side by side per channel, else added in order (the same
    sum every time)."""
    if per_channel:
        return torch.cat(sums)
    total = sums[0]
    for partial in sums[1:]:
        total = total + partial
    return total


@triton.jit
def _tap_fold_kernel(
    h_ptr, x_ptr, mix_ptr, part_ptr,
    channels, height, width, out_width, positions, x_batch_stride, x_channel_stride,
    stride_h, stride_w, pad_h, pad_w, dil_h, dil_w, blocks_per_program,
    KH: tl.constexpr, KW: tl.constexpr, ROWS: tl.constexpr, BLOCK_P: tl.constexpr,
    NEED_X: tl.constexpr, NEED_M: tl.constexpr, PER_CHANNEL: tl.constexpr, FP64: tl.constexpr, IEEE: tl.constexpr,
):
    split = tl.program_id(0)
    c = tl.program_id(1).to(tl.int64)
    b = tl.program_id(2).to(tl.int64)
    taps: tl.constexpr = KH * KW
    acc_dtype: tl.constexpr = tl.float64 if FP64 else tl.float32
    r = tl.arange(0, ROWS)  # a row: tap s of H, or tap t of the input
    r_ok = r < taps
    h_rows = h_ptr + (b * channels + c) * (taps * positions) + r[:, None] * positions
    x_channel = x_ptr + b * x_batch_stride + c * x_channel_stride
    offset_h = (r // KW) * dil_h - pad_h  # where tap t reads, relative to the output position's corner
    offset_w = (r % KW) * dil_w - pad_w
    if NEED_X:  # (I + M)ᵀ, padded with zeros
        mix_at = mix_ptr + (c * (taps * taps) if PER_CHANNEL else 0)
        mix_t = tl.load(mix_at + r[None, :] * taps + r[:, None], mask=r_ok[:, None] & r_ok[None, :], other=0.0)
        mix_t = mix_t.to(acc_dtype)
    acc = tl.zeros([ROWS, ROWS], dtype=acc_dtype)
    for i in range(blocks_per_program):
        p = (split * blocks_per_program + i) * BLOCK_P + tl.arange(0, BLOCK_P)
        p_ok = p < positions
        tile_ok = r_ok[:, None] & p_ok[None, :]
        h = tl.load(h_rows + p[None, :], mask=tile_ok, other=0.0)
        if NEED_M:
            qh = (p // out_width)[None, :] * stride_h + offset_h[:, None]
            qw = (p % out_width)[None, :] * stride_w + offset_w[:, None]
            inside = tile_ok & (qh >= 0) & (qh < height) & (qw >= 0) & (qw < width)
            taps_of_x = tl.load(x_channel + qh * width + qw, mask=inside, other=0.0)
            if IEEE:
                acc += tl.dot(h.to(acc_dtype), tl.trans(taps_of_x.to(acc_dtype)), input_precision="ieee")
            else:  # tf32 holds bf16 and fp16 values exactly: the products are exact, as a bf16 dot's would be
                acc += tl.dot(h.to(tl.float32), tl.trans(taps_of_x.to(tl.float32)))
        if NEED_X:
            if IEEE:
                mixed = tl.dot(mix_t, h.to(acc_dtype), input_precision="ieee")
            else:
                mixed = tl.dot(mix_t, h.to(acc_dtype))  # tf32: finer than the bf16/fp16 it is written in
            tl.store(h_rows + p[None, :], mixed.to(h_ptr.dtype.element_ty), mask=tile_ok)  # over H: only this program reads it
    if NEED_M:
        part = part_ptr + ((b * tl.num_programs(0) + split) * channels + c) * (taps * taps)
        tl.store(part + r[:, None] * taps + r[None, :], acc, mask=r_ok[:, None] & r_ok[None, :])


def fold_tile(positions: int) -> tuple[int, int, int]:
    """(output positions a block, warps, blocks a program) of the "fold" kernel: `FOLD_TILE`, the block no wider
    than the map."""
    block, warps, blocks = FOLD_TILE
    return min(block, max(16, triton.next_power_of_2(positions))), warps, blocks


def tap_backward_fold(x, weight, mix, grad, stride, padding, dilation, need_x=True, need_mixing=True, chunk_bytes=None):
    """`tap_backward` by the "fold" kernel (see the module docstring): the same arguments and results."""
    batch, channels, height, width = x.shape
    kh, kw = weight.shape[-2:]
    taps = kh * kw
    out_width = grad.shape[-1]
    positions = grad.shape[-2] * out_width
    per_channel = mix.dim() == 3
    x, grad, mix, acc_dtype = _prepared(x, grad, mix)
    chunk = _channels_a_block(x, taps, positions, chunk_bytes)
    block_p, warps, blocks = fold_tile(positions)
    blocks = min(blocks, triton.cdiv(positions, block_p))
    n_split = triton.cdiv(positions, block_p * blocks)
    grad_x = torch.empty_like(x) if need_x and chunk < channels else None
    sums = []
    for start, stop, h in _blocks_of_h(x, weight, grad, chunk):
        count = stop - start
        part = torch.empty(batch * n_split, count, taps, taps, dtype=acc_dtype, device=x.device) if need_mixing else h
        _tap_fold_kernel[(n_split, count, batch)](
            h, x[:, start:stop], mix[start:stop] if per_channel else mix, part,
            count, height, width, out_width, positions, x.stride(0), x.stride(1),
            stride[0], stride[1], padding[0], padding[1], dilation[0], dilation[1], blocks,
            KH=kh, KW=kw, ROWS=max(16, triton.next_power_of_2(taps)), BLOCK_P=block_p,
            NEED_X=need_x, NEED_M=need_mixing, PER_CHANNEL=per_channel, FP64=x.dtype == torch.float64,
            IEEE=x.dtype in (torch.float32, torch.float64), num_warps=warps,
        )
        if need_x:  # H' summed into the input positions each value came from
            folded = F.fold(h, (height, width), (kh, kw), dilation=dilation, padding=padding, stride=stride)
            if chunk == channels:
                grad_x = folded
            else:
                grad_x[:, start:stop] = folded
        del h
        if need_mixing:
            sums.append(part.sum(0) if per_channel else part.sum((0, 1)))
    return grad_x, _summed(sums, per_channel) if need_mixing else None
