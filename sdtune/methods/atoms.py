"""Filter atoms: tune the filter subspace of each convolution, not its filters.

("Large Convolutional Model Tuning via Filter Subspace", Chen, Miao & Qiu, ICLR 2025.)

Notation
--------
A conv weight W (c_out, c_in, k, k). For a block size b (1 unless channel atoms are asked for) its
block view W_b has one row per b×b block of channels and (k·b)² columns,

    W_b[(o, i), (p, h, q, w)] = W[o·b + p, i·b + q, h, w]        (b = 1: W_r, (c_out·c_in, k²))

and is factored as W_b ≈ α·D: M atoms D (M, (k·b)²) and coefficients α (rows, M). Let
m' = min(m, k²): atoms beyond the number of taps add nothing a frozen α could use.

α is never stored (it is as big as W). The adapter keeps D, and α is rebuilt from the base weight:

    α = W_b·P,   P = Dᵀ for the orthonormal atoms of `init="svd"`,
                 P = D⁺ (pseudo-inverse, float64) for the sparse-coding atoms of `init="sparse"`.

For the SVD, W_b·Dᵀ is the least-squares (and exact when m' = k²) coefficient matrix. For sparse
coding, the lasso coefficients that dictionary learning ends with are not used by the adapter:
storing them costs as much as W, and rebuilding them means re-running an iterative solver whose
result depends on the machine's arithmetic. W_b·D⁺ is the closed-form least-squares coefficient for
the learned atoms: a pure function of the base weight and the stored D (so save → load is exact to
float rounding anywhere), at least as faithful a reconstruction as the lasso code, exact when
m' = k², and it keeps every D/kc update a (k·b)²×(k·b)² matrix acting on the block's taps.

Variants (each has zero update at init and folds into W ← W + ΔW)
------------------------------------------------------------------
- `D` (default; the paper's "bases_l1"): train ΔD (m', k, k), zero-init.
      ΔW_r = α·ΔD = W_r·(P·ΔD)                                  trainable m'·k² per conv
- `kc` (kc > 1, m1 = 0; "coeff_l1", channel atoms): b = kc where kc divides c_in and c_out, else b = 1
  for that layer. M = m'·b² atoms of size (k·b)×(k·b); train ΔD (M, k·b, k·b), zero-init.
      ΔW_b = α·ΔD = W_b·(P·ΔD)                                  trainable m'·b²·(k·b)² per conv
- `D1` (m1 > 0, kc = 1; "bases_l2", over-complete): every input channel c gets its own atom
  updates, each a combination of m1 sub-atoms of that atom:
      ΔD[c, j] = Σ_s β[c, j, s]·D1[j, s]        β (c_in, m', m1) ~ N(0, 1/m1), D1 (m', m1, k²) zero-init
      ΔW[o, c] = Σ_j α[o, c, j]·ΔD[c, j]                         trainable c_in·m'·m1 + m'·m1·k² per conv
  (β's scale makes ΔD[c, j] as large as one D1 row, so D1 learns at the D variant's pace.)
- `D1+Dc` (m1 > 0 and kc > 1; "coeff_bases_l1"): the D1 variant plus trainable bases of the
  coefficients. The filters of one b×b channel block have b²·m' coefficients; as one vector a
  (ordered p, q, j) it is re-expressed over the bases I + ΔDc, ΔDc (b²·m', b²·m') zero-init:
      a' = a·(I + ΔDc)                          (α' = α with every block's a replaced by a')
      W + ΔW = R + α'·(D + ΔD[c])               (R = W − α·D, the part the atoms do not reach)
      ΔW[o, c] = Σ_j (α' − α)[o, c, j]·D[j] + Σ_j α'[o, c, j]·ΔD[c, j]
                                                trainable c_in·m'·m1 + m'·m1·k² + (b²·m')² per conv
  Its decomposition is the per-filter one (b = 1); kc only groups the coefficients.
- `linear` (with any of the above): the attention projections to_q, to_k, to_v and to_out.0. A
  weight (d_out, d_in) is seen as (d_out/b)·(d_in/b) blocks of b×b, b = `linear_kc` where it divides
  both sizes (else 1); M = min(m, b²) atoms of b×b; the D-variant update ΔW_b = W_b·(P·ΔD), ΔD (M, b, b)
  zero-init: trainable min(m, b²)·b² per projection.

With `--train-text-encoder` the linear form also tunes the text encoder's q/k/v/out projections and
MLP linears (fc1, fc2), whatever `linear` says for the UNet.

Targets: every 3×3 conv; the 1×1 convs (shortcuts, proj_in/proj_out, where atoms are scalars unless
kc > 1) when `include_1x1` is true, by default only when kc > 1.

Where the paper's public code differs: its "bases_l2" forward lays β·D1 out atom-major and reads it
back channel-major, so a channel's atom j is updated from another atom's sub-atoms, and its
"coeff_bases_l1" creates Dc but never uses it; the formulas above are the variants as described.

Decompositions are cached per base model (a fingerprint of the targeted layers' weights) in
`<cache>/decompositions`, so a second run reuses them.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..errors import SdtuneError, warn
from .choices import ATOMS_INITS
from . import atom_kernels
from .atom_kernels import projected_mixing_conv2d, tap_mixed_conv2d
from .base import ATTENTION_PROJECTIONS, DeltaLayer, WrappedLayers, fingerprint, named_convs, named_linears, replace_module

INITS = ATOMS_INITS
KERNELS = ("auto", "tap", "weight", "autograd")
GRAM_CHUNK_ROWS = 1 << 18

# Sparse coding settings. λ is relative to the weights' RMS, so every layer gets the same sparsity
# pressure whatever its scale. Many short alternations (warm-started codes) move the atoms further
# than a few long ones for the same work; the dictionary is learned from a fixed-size random sample
# of rows, which keeps every SD v1.4 layer to about a second.
SPARSE_PENALTY = 0.2
SPARSE_ROUNDS = 60
SPARSE_LASSO_STEPS = 3
SPARSE_SAMPLE_ROWS = 8192
# Singular values of D below this fraction of the largest are dropped by D⁺, so near-dependent
# learned atoms (a layer with fewer blocks than atoms gives some) cannot blow the update up.
PINV_RTOL = 1e-3
MAX_SEED = 2**32 - 1  # as `--seed`
DECOMPOSITION_VERSION = "1"  # bump when a decomposition's algorithm changes: old cache entries are ignored


# ---------------------------------------------------------------------------------------------
# The maths as pure functions (tests check these against the literal formulas)


def to_blocks(weight: torch.Tensor, kc: int = 1) -> torch.Tensor:
    """The block view W_b (c_out/kc · c_in/kc, kc·k·kc·k) of a conv weight (a Linear weight is k = 1)."""
    if weight.dim() == 2:
        weight = weight.reshape(*weight.shape, 1, 1)
    c_out, c_in, kh, kw = weight.shape
    if kc == 1:
        return weight.reshape(c_out * c_in, kh * kw)
    blocks = weight.reshape(c_out // kc, kc, c_in // kc, kc, kh, kw).permute(0, 2, 1, 4, 3, 5)
    return blocks.reshape((c_out // kc) * (c_in // kc), kc * kh * kc * kw)


def from_blocks(blocks: torch.Tensor, shape: torch.Size | tuple, kc: int = 1) -> torch.Tensor:
    """The inverse of `to_blocks`: a tensor of `shape` (4-D conv or 2-D Linear)."""
    c_out, c_in = shape[0], shape[1]
    kh, kw = (shape[2], shape[3]) if len(shape) == 4 else (1, 1)
    if kc == 1:
        return blocks.reshape(shape)
    weight = blocks.reshape(c_out // kc, c_in // kc, kc, kh, kc, kw).permute(0, 2, 1, 4, 3, 5)
    return weight.reshape(shape)


def svd_atoms(rows: torch.Tensor, m: int) -> torch.Tensor:
    """The m leading right singular vectors of the data matrix: atoms D (m, n).

    `rows` is the (N, n) block view, or a 4-D conv weight (read as W_r). Computed from the n×n Gram
    matrix in float64 (exactly the SVD's right factor, at a fraction of its cost). Each atom's sign
    is fixed so that its largest entry is positive.
    """
    if rows.dim() == 4:
        rows = rows.reshape(-1, rows.shape[-1] * rows.shape[-2])
    rows = rows.detach()
    gram = torch.zeros(rows.shape[1], rows.shape[1], dtype=torch.float64, device=rows.device)
    for start in range(0, rows.shape[0], GRAM_CHUNK_ROWS):  # chunks: no float64 copy of a whole weight
        chunk = rows[start : start + GRAM_CHUNK_ROWS].double()
        gram += chunk.T @ chunk
    eigenvalues, eigenvectors = torch.linalg.eigh(gram)
    order = torch.argsort(eigenvalues, descending=True, stable=True)[:m]
    return _fix_signs(eigenvectors[:, order].T.contiguous()).float()


def _fix_signs(atoms: torch.Tensor) -> torch.Tensor:
    sign = torch.sign(atoms.gather(1, atoms.abs().argmax(dim=1, keepdim=True)))
    return atoms * torch.where(sign == 0, torch.ones_like(sign), sign)


def lasso_codes(
    rows: torch.Tensor, atoms: torch.Tensor, penalty: float, steps: int, start: torch.Tensor | None = None
) -> torch.Tensor:
    """FISTA for every row at once: argmin_α ½‖X − α·D‖² + λ‖α‖₁ (α: (N, m)), `steps` iterations."""
    gram = atoms @ atoms.T
    lipschitz = float(torch.linalg.eigvalsh(gram).max().clamp_min(1e-12))
    target = rows @ atoms.T
    codes = torch.zeros_like(target) if start is None else start.clone()
    point, t = codes, 1.0
    for _ in range(steps):
        step = point - (point @ gram - target) / lipschitz
        new = torch.sign(step) * (step.abs() - penalty / lipschitz).clamp_min(0)
        t_next = (1 + math.sqrt(1 + 4 * t * t)) / 2
        point = new + ((t - 1) / t_next) * (new - codes)
        codes, t = new, t_next
    return codes


def _update_atoms(rows: torch.Tensor, codes: torch.Tensor, atoms: torch.Tensor) -> torch.Tensor:
    """One sweep of block coordinate descent on the atoms, each renormalised to unit length.

    Atom j's least-squares value given the others is (α_jᵀX − Σ_{i≠j} α_jᵀα_i·D_i) / α_jᵀα_j; only
    the m×m and m×n Gram products are needed (the sweep runs in numpy: tiny matrices, many steps).
    An atom no row uses restarts on the worst-fitted row.
    """
    code_gram = (codes.T @ codes).double().numpy()
    code_data = (codes.T @ rows).double().numpy()
    new = atoms.double().numpy().copy()
    for j in range(new.shape[0]):
        if code_gram[j, j] <= 1e-12:
            residual = rows - codes @ torch.from_numpy(new).to(rows.dtype)
            worst = residual[residual.norm(dim=1).argmax()].double().numpy()
            if np.linalg.norm(worst) > 1e-12:
                new[j] = worst / np.linalg.norm(worst)
            continue
        update = code_data[j] - code_gram[j] @ new + code_gram[j, j] * new[j]
        norm = np.linalg.norm(update)
        if norm > 1e-12:
            new[j] = update / norm
    return torch.from_numpy(new).to(atoms.dtype)


def sparse_atoms(
    rows: torch.Tensor,
    m: int,
    seed: int = 0,
    penalty: float = SPARSE_PENALTY,
    rounds: int = SPARSE_ROUNDS,
    lasso_steps: int = SPARSE_LASSO_STEPS,
    sample_rows: int = SPARSE_SAMPLE_ROWS,
) -> torch.Tensor:
    """Dictionary learning with a lasso penalty: m unit-norm atoms D (m, n) for the rows of X.

    min_{α, D} ½‖X − α·D‖² + λ‖α‖₁ with ‖D_j‖ = 1, by `rounds` alternations of FISTA on α (warm
    started) and a block-coordinate sweep on D. X is `sample_rows` rows drawn with a seeded
    generator (so the result is a function of the weight and `seed`), scaled to unit RMS. D starts
    from random orthonormal rows. Atoms come out ordered by use (ℓ1 mass of their codes) with the
    largest entry of each positive. Float32 iterations: the atoms are stored, never recomputed.
    """
    if rows.dim() == 4:
        rows = rows.reshape(-1, rows.shape[-1] * rows.shape[-2])
    rows = rows.detach()
    n = rows.shape[1]
    generator = torch.Generator().manual_seed(seed)
    if rows.shape[0] > sample_rows:
        index = torch.randint(rows.shape[0], (sample_rows,), generator=generator).sort().values
        data = rows[index.to(rows.device)]
    else:
        data = rows
    data = data.float().cpu()
    scale = data.pow(2).mean().sqrt()
    if not scale > 0:
        return svd_atoms(rows, m)  # all-zero weights: any orthonormal atoms represent them
    data = data / scale
    start = torch.randn(max(m, n), n, generator=generator, dtype=torch.float64)
    atoms = (torch.linalg.qr(start.T).Q.T[:m] if m <= n else F.normalize(start[:m], dim=1)).float()
    codes = None
    for _ in range(rounds):
        codes = lasso_codes(data, atoms, penalty, lasso_steps, start=codes)
        atoms = _update_atoms(data, codes, atoms)
    codes = lasso_codes(data, atoms, penalty, lasso_steps, start=codes)
    order = torch.argsort(codes.abs().sum(dim=0), descending=True, stable=True)
    return _fix_signs(atoms[order]).contiguous().to(rows.device)


def atom_projector(atoms: torch.Tensor, orthonormal: bool) -> torch.Tensor:
    """P (n, M) with α = W_b·P: Dᵀ for orthonormal atoms, else the pseudo-inverse D⁺."""
    if orthonormal or atoms.is_meta:
        return atoms.T.contiguous()
    return torch.linalg.pinv(atoms.double(), rtol=PINV_RTOL).to(atoms.dtype)


def _compute_dtype(weight: torch.Tensor) -> torch.dtype:
    return torch.float64 if weight.dtype == torch.float64 else torch.float32


def weight_diff(
    weight: torch.Tensor, atoms: torch.Tensor, delta_atoms: torch.Tensor, kc: int = 1, projector=None
) -> torch.Tensor:
    """D and kc variants (and linear): ΔW_b = α·ΔD = W_b·(P·ΔD), reshaped like W."""
    dtype = _compute_dtype(weight)
    projector = atoms.T if projector is None else projector
    mixing = projector.to(dtype) @ delta_atoms.reshape(-1, atoms.shape[1]).to(dtype)
    return from_blocks(to_blocks(weight, kc) @ mixing.to(weight.dtype), weight.shape, kc)


# Rows of W_b (filters) mixed at a time when merging: a chunk of a few MB stays in cache between its GEMM and
# its addition, so the merge is one pass over the weight instead of forming ΔW beside it.
MERGE_CHUNK_ROWS = 1 << 15


@torch.no_grad()
def add_tap_mixing_(weight: torch.Tensor, mixing: torch.Tensor) -> bool:
    """W_b += W_b·mixing in place, a chunk of filters at a time (kc = 1: W_b is a view of W). False, with W
    untouched, where W_b is not a view of W."""
    try:
        rows = weight.view(-1, mixing.shape[0])
    except RuntimeError:
        return False
    mixing = mixing.to(weight.dtype)
    for start in range(0, rows.shape[0], MERGE_CHUNK_ROWS):
        chunk = rows[start : start + MERGE_CHUNK_ROWS]
        chunk += chunk @ mixing
    return True


def _coefficient_blocks(alpha: torch.Tensor, kc: int) -> torch.Tensor:
    """α (c_out, c_in, m) → one row per kc×kc channel block, columns ordered (p, q, j)."""
    c_out, c_in, m = alpha.shape
    blocks = alpha.reshape(c_out // kc, kc, c_in // kc, kc, m).permute(0, 2, 1, 3, 4)
    return blocks.reshape((c_out // kc) * (c_in // kc), kc * kc * m)


def _coefficients_from_blocks(blocks: torch.Tensor, shape: tuple, kc: int) -> torch.Tensor:
    c_out, c_in, m = shape
    alpha = blocks.reshape(c_out // kc, c_in // kc, kc, kc, m).permute(0, 2, 1, 3, 4)
    return alpha.reshape(shape)


def _sub_atom_deltas(atoms, beta, sub_atoms, dtype) -> torch.Tensor:
    """ΔD[c, j] = Σ_s β[c, j, s]·D1[j, s]: (c_in, m, taps)."""
    m, taps = atoms.shape
    return torch.einsum("cjs,jst->cjt", beta.to(dtype), sub_atoms.reshape(m, -1, taps).to(dtype))


def sub_atom_mixing(atoms, beta, sub_atoms, projector=None, dtype=torch.float32) -> torch.Tensor:
    """D1's per-input-channel tap mixing M_c = P·ΔD[c] (c_in, k², k²): ΔW[:, c] = W_r[:, c]·M_c."""
    projector = (atoms.T if projector is None else projector).to(dtype)
    return projector.unsqueeze(0) @ _sub_atom_deltas(atoms, beta, sub_atoms, dtype)


def sub_atom_weight_diff(
    weight: torch.Tensor,
    atoms: torch.Tensor,
    beta: torch.Tensor,
    sub_atoms: torch.Tensor,
    delta_coeff_bases: torch.Tensor | None = None,
    kc: int = 1,
    projector=None,
) -> torch.Tensor:
    """D1 variant, and D1+Dc when `delta_coeff_bases` is given (see the module docstring)."""
    c_out, c_in = weight.shape[:2]
    taps = atoms.shape[1]
    dtype = _compute_dtype(weight)
    flat = weight.reshape(c_out, c_in, taps).to(dtype)
    if delta_coeff_bases is None:
        # Σ_j α[o, c, j]·ΔD[c, j] = W_r[o, c]·(P·ΔD[c]): one taps×taps mixing per input channel
        mixing = sub_atom_mixing(atoms, beta, sub_atoms, projector, dtype)
        diff = torch.bmm(flat.transpose(0, 1), mixing).transpose(0, 1)
        return diff.reshape(weight.shape).to(weight.dtype)
    projector = (atoms.T if projector is None else projector).to(dtype)
    delta = _sub_atom_deltas(atoms, beta, sub_atoms, dtype)
    alpha = flat @ projector
    delta_alpha = _coefficients_from_blocks(
        _coefficient_blocks(alpha, kc) @ delta_coeff_bases.to(dtype), alpha.shape, kc
    )
    diff = delta_alpha @ atoms.to(dtype) + torch.einsum("ocj,cjt->oct", alpha + delta_alpha, delta)
    return diff.reshape(weight.shape).to(weight.dtype)


# ---------------------------------------------------------------------------------------------
# The layers: each runs ONE convolution (or matmul) on W + ΔW


class _AtomLayer(DeltaLayer):
    """What every tuned layer shares: the frozen base layer, atoms D with their projector P."""

    state_names: tuple[str, ...] = ()

    def __init__(self, base: nn.Module, atoms: torch.Tensor, kc: int, orthonormal: bool):
        super().__init__(base)
        self.kc = kc
        self.orthonormal = orthonormal
        self.register_buffer("atoms", atoms.to(device=base.weight.device, dtype=torch.float32))
        self.register_buffer("projector", atom_projector(self.atoms, orthonormal), persistent=False)

    def set_atoms(self, atoms: torch.Tensor) -> None:
        """Replace D (as loading an adapter does) and the projector derived from it."""
        self.atoms.copy_(atoms)
        self.projector = atom_projector(self.atoms, self.orthonormal)

    def tap_mixing(self, dtype: torch.dtype) -> torch.Tensor | None:
        """scale·P·ΔD in `dtype`: the k²×k² mixing with ΔW_b = W_b·mixing (kc = 1), or None where ΔW is no such product."""
        if self.kc != 1:
            return None
        taps = self.atoms.shape[1]
        mixing = self.projector.to(dtype) @ self.delta_atoms.reshape(-1, taps).to(dtype)
        return mixing * self.scale if self.scale != 1.0 else mixing

    @torch.no_grad()
    def merge_into_base(self) -> None:
        """W += scale·ΔW in place."""
        weight = self.base_layer.weight
        mixing = self.tap_mixing(_compute_dtype(weight))
        if mixing is None or not add_tap_mixing_(weight, mixing):
            weight += self.scaled_delta()


class FilterAtomConv2d(_AtomLayer):
    """A frozen Conv2d whose filters change only through their atoms (D variant; kc > 1: channel atoms)."""

    state_names = ("atoms", "delta_atoms")

    def __init__(
        self, base: nn.Conv2d, atoms: torch.Tensor, kc: int = 1, orthonormal: bool = True, kernel: str = "auto"
    ):
        super().__init__(base, atoms, kc, orthonormal)
        side = base.kernel_size[0] * kc
        self.delta_atoms = nn.Parameter(torch.zeros(atoms.shape[0], side, side, device=base.weight.device))
        self.kernel = kernel

    def delta_weight(self) -> torch.Tensor:
        return weight_diff(self.base_layer.weight, self.atoms, self.delta_atoms, self.kc, self.projector)

    def backward_bytes(self, compute_bytes: int, device_type: str = "cuda", autocast: bool = False) -> int:
        return super().backward_bytes(compute_bytes, device_type, autocast) if self.kc != 1 else 0  # the tap mixing forms no weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kc != 1:
            return super().forward(x)
        # ΔW = W_r·(P·ΔD): a k²×k² mixing of the taps, which the fast kernels apply exactly
        return projected_mixing_conv2d(x, self.base_layer, self.projector, self.delta_atoms, self.scale, self.kernel)


class FilterAtomLinear(_AtomLayer):
    """A frozen Linear whose kc×kc weight blocks change only through their atoms."""

    state_names = ("atoms", "delta_atoms")

    def __init__(self, base: nn.Linear, atoms: torch.Tensor, kc: int = 1, orthonormal: bool = True):
        super().__init__(base, atoms, kc, orthonormal)
        self.delta_atoms = nn.Parameter(torch.zeros(atoms.shape[0], kc, kc, device=base.weight.device))

    def delta_weight(self) -> torch.Tensor:
        return weight_diff(self.base_layer.weight, self.atoms, self.delta_atoms, self.kc, self.projector)


class SubAtomConv2d(_AtomLayer):
    """A frozen Conv2d tuned through per-channel combinations of sub-atoms (D1), optionally with
    trainable bases of its coefficients (D1+Dc, kc = the coefficient block size)."""

    def __init__(
        self,
        base: nn.Conv2d,
        atoms: torch.Tensor,
        m1: int,
        kc: int = 1,
        coefficient_bases: bool = False,
        orthonormal: bool = True,
        generator: torch.Generator | None = None,
        kernel: str = "auto",
    ):
        super().__init__(base, atoms, kc, orthonormal)
        self.kernel = kernel
        m, k, device = atoms.shape[0], base.kernel_size[0], base.weight.device
        beta = torch.randn(base.in_channels, m, m1, generator=generator) / math.sqrt(m1)
        self.beta = nn.Parameter(beta.to(device))
        self.sub_atoms = nn.Parameter(torch.zeros(m, m1, k, k, device=device))
        size = kc * kc * m
        self.delta_coeff_bases = nn.Parameter(torch.zeros(size, size, device=device)) if coefficient_bases else None
        self.state_names = ("atoms", "beta", "sub_atoms") + (("delta_coeff_bases",) if coefficient_bases else ())

    def delta_weight(self) -> torch.Tensor:
        return sub_atom_weight_diff(
            self.base_layer.weight, self.atoms, self.beta, self.sub_atoms, self.delta_coeff_bases, self.kc, self.projector
        )

    def backward_bytes(self, compute_bytes: int, device_type: str = "cuda", autocast: bool = False) -> int:
        return super().backward_bytes(compute_bytes, device_type, autocast) if self.delta_coeff_bases is not None else 0  # as forward

    def tap_mixing(self, dtype: torch.dtype) -> torch.Tensor | None:
        return None  # one mixing per input channel (or none, with Dc): its merge takes the formed update

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.delta_coeff_bases is not None:
            return super().forward(x)  # D1+Dc mixes coefficients across channels: no tap mixing expresses it
        # D1: ΔW[:, c] = W_r[:, c]·M_c, one k²×k² mixing per input channel, which the fast kernels apply exactly
        mixing = sub_atom_mixing(self.atoms, self.beta, self.sub_atoms, self.projector, self.sub_atoms.dtype)
        if self.scale != 1.0:
            mixing = mixing * self.scale
        return tap_mixed_conv2d(x, self.base_layer, mixing, self.kernel)


# ---------------------------------------------------------------------------------------------
# The method


@dataclass
class AtomsOptions:
    m: int = field(default=9, metadata={"help": "number of filter atoms per convolution"})  # at most k²
    include_1x1: bool | None = field(
        default=None, metadata={"help": "also tune 1x1 convolutions", "default": "only with --atoms-kc > 1"}
    )
    init: str = field(default="svd", metadata={"help": "decomposition, svd or sparse (dictionary learning)"})
    m1: int = field(default=0, metadata={"help": "sub-atoms per atom; > 0 trains β and D1 (over-complete variant)"})
    kc: int = field(
        default=1, metadata={"help": "channel atoms over kc×kc channel blocks; with --atoms-m1, the D1+Dc variant"}
    )
    linear: bool = field(
        default=False,
        metadata={"help": "also the attention projections, atoms over 4×4 weight blocks (-o linear_kc=N)"},
    )
    linear_kc: int = field(default=4, metadata={"help": "block size of the attention projections' atoms"})
    seed: int = field(default=0, metadata={"help": "seed of β's init and of the sparse coding's sample and start"})
    kernel: str = field(
        default="auto",
        metadata={
            "help": "how the D and D1 variants' convolutions run: auto (per layer size), tap, weight, or autograd "
            "(the plain formula, for comparison); all exact, see atom_kernels"
        },
    )


@dataclass(frozen=True)
class LayerPlan:
    """How one target is decomposed and tuned."""

    kind: str  # "atoms" (D, kc, linear) or "sub_atoms" (D1, D1+Dc)
    block: int  # block size of the decomposition
    coefficient_block: int  # block size of the coefficient bases (D1+Dc), else 1
    num_atoms: int  # M
    atom_size: int  # n = (k·block)²


def decomposition_cache_dir() -> Path:
    from ..models import cache_dir

    return cache_dir() / "decompositions"


def tensors_digest(tensors: dict[str, torch.Tensor]) -> str:
    """A SHA-256 of named tensors (names, dtypes, shapes and bytes), to tell a cache entry that changed on disk."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        tensor = tensors[name].detach().cpu().contiguous()
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)};".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


def read_decomposition(path: Path, plans: dict[str, LayerPlan]) -> tuple[dict[str, torch.Tensor] | None, str]:
    """A cached decomposition and "", or None and what is wrong with it (unreadable, other layers or
    shapes, NaN or infinite values, bytes that are not those written)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            cached = {key: handle.get_tensor(key) for key in handle.keys()}
    except Exception as error:
        return None, f"unreadable: {(str(error).splitlines() or [type(error).__name__])[0][:100]}"
    if set(cached) != set(plans) or any(tuple(cached[n].shape) != (p.num_atoms, p.atom_size) for n, p in plans.items()):
        return None, "other layers or shapes than this model's"
    if not all(bool(tensor.isfinite().all()) for tensor in cached.values()):
        return None, "NaN or infinite values"
    if "sha256" in metadata and metadata["sha256"] != tensors_digest(cached):
        return None, "its bytes are not those written"
    return cached, ""


def decompose(rows: torch.Tensor, num_atoms: int, init: str, seed: int) -> torch.Tensor:
    """Atoms (num_atoms, n) for the rows of a block view."""
    if init == "sparse":
        return sparse_atoms(rows, num_atoms, seed=seed)
    return svd_atoms(rows, num_atoms)


class FilterAtoms(WrappedLayers):
    name = "atoms"
    summary = "filter atoms: train the atoms of each conv's filter subspace (ΔW = α·ΔD; D1, kc and D1+Dc variants)"
    Options = AtomsOptions
    variants = ({}, {"m": 6}, {"m1": 4}, {"kc": 2}, {"m1": 4, "kc": 2}, {"linear": True}, {"include_1x1": True})
    trains_text_encoder = True  # the linear form, on the text encoder's attention and MLP linears
    default_lr = 1e-3  # a few thousand parameters: a larger step; measured (sweeps/digits-lr.toml): 3e-3 lost 15 points

    def merge_layer(self, layer: nn.Module) -> None:
        layer.merge_into_base()

    @classmethod
    def device_notes(cls, device_type: str) -> list[str]:
        """The route the default and D1 variants' convolutions take on `device_type` under `-o kernel=auto`, read from
        `atom_kernels`' tables (`device_route`), and whether the Triton tap side can be asked for there."""
        side, backward = atom_kernels.device_route(device_type, 1)
        limit = atom_kernels.TAP_SIDE_MAX_POSITIONS.get(device_type, 0)
        if side != "tap":
            routes = "the weight side at every size"
        elif limit is None:
            routes = f"the tap side ({backward} backward) at every size"
        else:
            routes = f"the tap side ({backward} backward) up to {limit:,} batch x input positions, else the weight side"
        plain = atom_kernels.PLAIN_MAX_WEIGHTS.get(device_type, 0)
        if plain:
            routes += f"; those of at most {plain:,} weights plain autograd on the formed weight"
        notes = [f"convolutions take {routes}"]
        tap_backward = atom_kernels.device_route(device_type, 1, "tap")[1]
        if tap_backward.startswith("triton"):
            notes.append(f"Triton tap-side kernels available: -o kernel=tap (the {tap_backward} backward)")
        elif atom_kernels.TAP_BACKWARD.get(device_type, "").startswith("triton"):
            notes.append(f"Triton tap-side kernels not available (Triton missing or failed): -o kernel=tap takes the {tap_backward} backward")
        return notes

    def validate_options(self) -> None:
        o = self.options
        for name, flag, least in (("m", "--atoms-m", 1), ("m1", "--atoms-m1", 0), ("kc", "--atoms-kc", 1),
                                  ("linear_kc", "linear_kc", 1), ("seed", "seed", 0)):
            value = getattr(o, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < least:
                raise SdtuneError(f"{flag} must be an integer of at least {least}, got {value!r}")
        if o.seed > MAX_SEED:
            raise SdtuneError(f"atoms seed must be between 0 and {MAX_SEED}, as --seed, got {o.seed}")
        if o.init not in INITS:
            raise SdtuneError(f"--atoms-init {o.init!r} is not available; choose: {', '.join(INITS)}")
        if o.kernel not in KERNELS:
            raise SdtuneError(f"atoms kernel {o.kernel!r} is not available; choose: {', '.join(KERNELS)}")
        for name, flag in (("include_1x1", "--atoms-1x1"), ("linear", "--atoms-linear")):
            value = getattr(o, name)
            if not (isinstance(value, bool) or (value is None and name == "include_1x1")):
                raise SdtuneError(f"{flag} must be true or false, got {value!r}")

    @property
    def variant(self) -> str:
        if self.options.m1 > 0:
            return "D1+Dc" if self.options.kc > 1 else "D1"
        return "kc" if self.options.kc > 1 else "D"

    @property
    def includes_1x1(self) -> bool:
        """Whether 1x1 convolutions are tuned: as `include_1x1` says, by default only with kc > 1."""
        return self.options.kc > 1 if self.options.include_1x1 is None else self.options.include_1x1

    def shown_options(self) -> dict[str, Any]:
        return {**self.options_dict(), "include_1x1": self.includes_1x1}

    def find_targets(self, unet: nn.Module) -> list[str]:
        include_1x1 = self.includes_1x1
        targets = [name for name, _ in named_convs(unet, {3, 1} if include_1x1 else {3})]
        if self.options.linear:
            targets += [name for name, _ in named_linears(unet, ATTENTION_PROJECTIONS)]
        return targets

    def atoms_per_layer(self, conv: nn.Conv2d) -> int:
        return min(self.options.m, conv.kernel_size[0] ** 2)

    def _check_m_usable(self, unet: nn.Module, targets: list[str]) -> None:
        """Refuse an --atoms-m that no tuned layer can use: a k×k convolution has at most k² atoms, and an
        attention projection's b×b blocks (--atoms-linear) at most b². A smaller one is capped per layer."""
        most = {}
        for name in targets:
            module = unet.get_submodule(name)
            if isinstance(module, nn.Linear):
                block = self.plan(module).block
                most.setdefault(f"{block}x{block} blocks of the attention projections", block * block)
            else:
                k = module.kernel_size[0]
                most.setdefault(f"{k}x{k} convolutions", k * k)
        if most and self.options.m > max(most.values()):
            usable = max(most.values())
            where = ", ".join(f"{count} for {what}" for what, count in sorted(most.items(), key=lambda item: -item[1]))
            raise SdtuneError(
                f"--atoms-m {self.options.m} is more atoms than any tuned layer has ({where}); give --atoms-m {usable} or less"
            )

    def plan(self, module: nn.Module) -> LayerPlan:
        o = self.options
        if isinstance(module, nn.Linear):
            block = o.linear_kc if module.out_features % o.linear_kc == 0 and module.in_features % o.linear_kc == 0 else 1
            return LayerPlan("atoms", block, 1, min(o.m, block * block), block * block)
        k = module.kernel_size[0]
        kc = o.kc if module.in_channels % o.kc == 0 and module.out_channels % o.kc == 0 else 1
        m = self.atoms_per_layer(module)
        if o.m1 > 0:
            return LayerPlan("sub_atoms", 1, kc, m, k * k)
        return LayerPlan("atoms", kc, 1, m * kc * kc, (k * kc) ** 2)

    def _inject(self, unet: nn.Module, targets: list[str]) -> None:
        plans = {name: self.plan(unet.get_submodule(name)) for name in targets}
        self._check_m_usable(unet, targets)
        decomposition = self._decompose(unet, plans)
        orthonormal = self.options.init == "svd"
        generator = torch.Generator().manual_seed(self.options.seed)
        for name in targets:
            base, plan = unet.get_submodule(name), plans[name]
            if isinstance(base, nn.Linear):
                layer = FilterAtomLinear(base, decomposition[name], plan.block, orthonormal)
            elif plan.kind == "sub_atoms":
                layer = SubAtomConv2d(
                    base, decomposition[name], self.options.m1, plan.coefficient_block,
                    coefficient_bases=self.options.kc > 1, orthonormal=orthonormal, generator=generator,
                    kernel=self.options.kernel,
                )
            else:
                layer = FilterAtomConv2d(base, decomposition[name], plan.block, orthonormal, self.options.kernel)
            replace_module(unet, name, layer)
            self.layers[name] = layer

    def _inject_text_encoder(self, text_encoder: nn.Module, prefix: str, targets: list[str]) -> None:
        """The linear form on the text encoder's attention and MLP linears (b×b weight blocks, b = linear_kc
        where it divides both sizes), with atoms decomposed from its own weights."""
        plans = {name: self.plan(text_encoder.get_submodule(name)) for name in targets}
        decomposition = self._decompose(text_encoder, plans)
        for name in targets:
            layer = FilterAtomLinear(text_encoder.get_submodule(name), decomposition[name], plans[name].block, self.options.init == "svd")
            replace_module(text_encoder, name, layer)
            self.layers[f"{prefix}.{name}"] = layer

    def _decompose(self, unet: nn.Module, plans: dict[str, LayerPlan]) -> dict[str, torch.Tensor]:
        """Atoms for every target, from the cache when this base model was decomposed before. A cache
        entry is checked when read (its checksum, shapes and finite values); a damaged one is rebuilt,
        with a warning."""
        modules = {name: unet.get_submodule(name) for name in plans}
        if any(module.weight.is_meta for module in modules.values()):
            return {name: torch.empty(p.num_atoms, p.atom_size, device="meta") for name, p in plans.items()}
        from safetensors.torch import save_file

        from ..fileio import atomic_write, sweep_dead_temporaries

        layout = json.dumps(
            [DECOMPOSITION_VERSION, self.options.init, self.options.seed]
            + [[name, p.block, p.num_atoms] for name, p in plans.items()]
        )
        layout_hash = hashlib.sha256(layout.encode()).hexdigest()[:12]
        key = f"{self.options.init}-{layout_hash}-{fingerprint(unet, list(plans))}"
        path = decomposition_cache_dir() / f"{key}.safetensors"
        sweep_dead_temporaries(path.parent, lambda name: name.endswith(".safetensors"))
        if path.exists():
            cached, problem = read_decomposition(path, plans)
            if cached is not None:
                return cached
            warn(f"cached decomposition {path} is damaged ({problem}): rebuilt")
        decomposition = {
            name: decompose(to_blocks(modules[name].weight.detach(), p.block), p.num_atoms, self.options.init, self.options.seed)
            for name, p in plans.items()
        }
        tensors = {k: v.detach().cpu().contiguous() for k, v in decomposition.items()}
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with atomic_write(path) as tmp:
                save_file(tensors, str(tmp), metadata={"sha256": tensors_digest(tensors)})
        except OSError:
            pass  # the cache is an optimisation; an unwritable cache folder is not an error
        return decomposition

    explanation = "tiles"

    def update_tiles(self, layer: str) -> torch.Tensor:
        """ΔD as (M, k·kc, k·kc) tiles; for the D1 variants the sub-atoms D1 as (m·m1, k, k)."""
        module = self.layers[layer]
        if isinstance(module, SubAtomConv2d):
            return module.sub_atoms.detach().flatten(0, 1)
        return module.delta_atoms.detach()

    def state_dict(self) -> dict[str, torch.Tensor]:
        if self.merged:
            return {}
        return {
            f"{name}.{attr}": getattr(layer, attr).detach()
            for name, layer in self.layers.items()
            for attr in layer.state_names
        }

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        super().load_state_dict(state)
        for layer in self.layers.values():
            layer.set_atoms(layer.atoms)  # the adapter's atoms define α: refresh what derives from them

