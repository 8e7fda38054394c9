"""GIFT: a generator makes each layer's update from the layer's own frozen weight.

For a frozen Linear weight ω (d_out x d_in), each row a "parameter token":
P = ω·φᵀ (d_out x r), P' = H(P), Δω = P'·ψᵀ (d_out x d_in), with φ (r, d_in) and ψ (d_in, r)
bias-free and ψ zero-initialised, so an untrained adapter is the base model.

H is the identity (`simple`) or the Parameter-to-Cluster Attention hyper-Transformer (`paca`) of
Savadikar, Song and Wu, "GIFT: Generative Interpretable Fine-Tuning Transformers" (2023): l blocks
of w ← w + PaCa(ℓ2(w)); w ← w + FFN(ℓ2(w)). PaCa softly assigns the N = d_out parameter tokens to M
clusters, C = sigmoid(u·A + a)/N, and attends from the tokens to the M cluster tokens ℓ2(Cᵀu).
C (d_out x M) is what `sdtune explain` projects a layer's output onto to draw the cluster maps
(`Gift.output_clusters`).

One generator (φ, H, ψ) serves every targeted layer with the same input width, as the paper shares
one across its isotropic ViT; the SD v1.x UNet has three widths (320, 640, 1280).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import SdtuneError
from .choices import GIFT_GENERATORS
from .base import DeltaLayer, WrappedLayers, named_linears, replace_module

GENERATORS = GIFT_GENERATORS
MAX_BLOCKS = 64


# ---------------------------------------------------------------------------------------------
# The maths as pure functions (tests check these against the literal formulas)


def l2_rows(x: torch.Tensor) -> torch.Tensor:
    """Each row scaled to unit ℓ2 norm (all-zero rows stay zero)."""
    return F.normalize(x, dim=-1)


def cluster_assignment(u: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """C = sigmoid(u·A + a) / N for u (N x r), A = weightᵀ (r x M), a (M): the N x M cluster matrix."""
    return torch.sigmoid(u @ weight.T + bias) / u.shape[-2]


def gift_delta(weight: torch.Tensor, phi: torch.Tensor, psi: torch.Tensor, generator=None) -> torch.Tensor:
    """Δω = H(ω·φᵀ)·ψᵀ in float32, for ω (d_out, d_in), φ (r, d_in), ψ (d_in, r); H = identity if None."""
    tokens = weight.float() @ phi.float().T
    if generator is not None:
        tokens = generator(tokens)
    return tokens @ psi.float().T


# ---------------------------------------------------------------------------------------------
# The generator


class ParameterToClusterAttention(nn.Module):
    """Single-head attention from N parameter tokens to M learned clusters of them."""

    def __init__(self, rank: int, clusters: int):
        super().__init__()
        self.assign = nn.Linear(rank, clusters)  # A and a
        self.query = nn.Linear(rank, rank)
        self.key = nn.Linear(rank, rank)
        self.value = nn.Linear(rank, rank)
        self.proj = nn.Linear(rank, rank)

    def clusters(self, u: torch.Tensor) -> torch.Tensor:
        return cluster_assignment(u, self.assign.weight, self.assign.bias)

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        c = self.clusters(u)  # N x M
        z = l2_rows(c.T @ u)  # M x r: one token per cluster
        q, k, v = self.query(u), self.key(z), self.value(z)
        attention = torch.softmax(q @ k.T / math.sqrt(q.shape[-1]), dim=-1)  # N x M
        return self.proj(attention @ v)


class PacaBlock(nn.Module):
    """w ← w + PaCa(ℓ2(w)); w ← w + FFN(ℓ2(w)), FFN r → 2r → r with GELU."""

    def __init__(self, rank: int, clusters: int):
        super().__init__()
        self.attention = ParameterToClusterAttention(rank, clusters)
        self.ffn = nn.Sequential(nn.Linear(rank, 2 * rank), nn.GELU(), nn.Linear(2 * rank, rank))

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        w = w + self.attention(l2_rows(w))
        return w + self.ffn(l2_rows(w))


class Generator(nn.Module):
    """φ, H and ψ for one input width."""

    def __init__(self, width: int, rank: int, kind: str, clusters: int, blocks: int):
        super().__init__()
        self.phi = nn.Linear(width, rank, bias=False)
        self.blocks = nn.ModuleList(PacaBlock(rank, clusters) for _ in range(blocks if kind == "paca" else 0))
        self.psi = nn.Linear(rank, width, bias=False)
        nn.init.zeros_(self.psi.weight)

    def hyper(self, tokens: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            tokens = block(tokens)
        return tokens

    def delta(self, weight: torch.Tensor) -> torch.Tensor:
        return gift_delta(weight, self.phi.weight, self.psi.weight, self.hyper if len(self.blocks) else None)

    def clusters(self, weight: torch.Tensor) -> torch.Tensor:
        """The matrix a layer's output is read through: the last PaCa block's C, or ω·φᵀ for H = identity."""
        tokens = weight.float() @ self.phi.weight.float().T
        if not len(self.blocks):
            return tokens
        for block in self.blocks[:-1]:
            tokens = block(tokens)
        return self.blocks[-1].attention.clusters(l2_rows(tokens))


# ---------------------------------------------------------------------------------------------
# The layer


class GiftLinear(DeltaLayer):
    """A frozen Linear whose weight is ω + Δω, Δω made by the (shared) generator; ONE matmul."""

    def __init__(self, base: nn.Linear, generator: Generator):
        super().__init__(base)
        self.generator = generator  # registered here too, so moving the UNet moves it

    def delta_weight(self) -> torch.Tensor:
        # the generator runs in float32 even under mixed precision, as the reference does: its
        # ℓ2 norms and softmax are on tiny r-dimensional tokens, and the cost is per layer, not per token
        with torch.autocast(self.base_layer.weight.device.type, enabled=False):
            return self.generator.delta(self.base_layer.weight)

    @torch.no_grad()
    def clusters(self) -> torch.Tensor:
        return self.generator.clusters(self.base_layer.weight)

    def backward_bytes(self, compute_bytes: int, device_type: str = "cuda", autocast: bool = False) -> int:
        """What one step's forward keeps for backward on any device (measured with saved_tensors_hooks, exact on tiny-random):
        the formed weight ω + Δω in the compute dtype; under mixed precision ω cast to float32 for ω·φᵀ; and the
        generator's float32 tensors: the N x r tokens ψ reads, and per PaCa block (N = d_out) 10 N x r (the ℓ2
        inputs and outputs, q, the projection's input, the FFN's 2r-wide two), 3 N x M (C, its transpose, the
        softmax), 4 per-row norms, 4 M x r and 2 M of the cluster tokens."""
        out_features, in_features = self.base_layer.weight.shape
        generator = self.generator
        rank, clusters = generator.phi.out_features, generator.blocks[0].attention.assign.out_features if len(generator.blocks) else 0
        per_block = out_features * (10 * rank + 3 * clusters + 4) + clusters * (4 * rank + 2)
        float_weight = 4 * out_features * in_features if compute_bytes != 4 else 0
        generated = 4 * (out_features * rank + len(generator.blocks) * per_block)
        return compute_bytes * out_features * in_features + float_weight + generated


# ---------------------------------------------------------------------------------------------
# The method


@dataclass
class GiftOptions:
    # paca by default: the seed paper's generator, whose cluster matrix C is what its interpretability
    # rests on (the authors' later code defaults to simple, which `sdtune explain` reads through ω·φ)
    generator: str = field(
        default="paca", metadata={"help": "simple (H = identity) or paca (cluster-attention hyper-Transformer)"}
    )
    rank: int = field(default=16, metadata={"help": "rank r of the parameter tokens"})
    clusters: int = field(default=64, metadata={"help": "number of PaCa clusters M"})
    blocks: int = field(default=1, metadata={"help": "number of PaCa blocks l"})
    targets: str = field(
        default="attn1.to_out.0", metadata={"help": "comma-separated module-name endings inside transformer blocks"}
    )


class Gift(WrappedLayers):
    name = "gift"
    summary = "GIFT: one generator per width makes ΔW = H(W·φ)·ψ from each self-attention output projection's weight"
    Options = GiftOptions
    variants = ({}, {"generator": "simple"}, {"targets": "attn1.to_out.0,attn2.to_out.0"})
    default_lr = 1e-4  # measured: sweeps/digits-lr.toml over seeds 0-2 (benchmarks/RESULTS.md): 3e-4 lost 25 points

    def validate_options(self) -> None:
        o = self.options
        if isinstance(o.targets, (list, tuple)):  # a TOML array from a config file
            o.targets = ",".join(str(t) for t in o.targets)
        if o.generator not in GENERATORS:
            raise SdtuneError(f"--gift-generator must be one of {', '.join(GENERATORS)}, got {o.generator!r}")
        for flag, value in (("rank", o.rank), ("clusters", o.clusters), ("blocks", o.blocks)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise SdtuneError(f"--gift-{flag} must be a whole number of at least 1, got {value!r}")
        if o.blocks > MAX_BLOCKS:  # each block is one more sequential step of every update; thousands take minutes to build
            raise SdtuneError(f"--gift-blocks must be at most {MAX_BLOCKS} (the paper uses 1 or 2), got {o.blocks}")
        if not isinstance(o.targets, str) or not self.target_suffixes():
            raise SdtuneError(f"gift targets must name module endings such as attn1.to_out.0, got {o.targets!r}")

    def target_suffixes(self) -> list[str]:
        return [t.strip() for t in str(self.options.targets).split(",") if t.strip()]

    def find_targets(self, unet: nn.Module) -> list[str]:
        found: list[str] = []
        for suffix in self.target_suffixes():
            names = [name for name, _ in named_linears(unet, [suffix], within=".transformer_blocks.")]
            if not names:
                raise SdtuneError(f"gift target {suffix!r} matches no Linear layer in the UNet's transformer blocks")
            found += names
        order = {name: i for i, (name, _) in enumerate(unet.named_modules())}
        return sorted(set(found), key=order.__getitem__)

    def _inject(self, unet: nn.Module, targets: list[str]) -> None:
        o = self.options
        self.generators = nn.ModuleDict()
        for name in targets:
            base = unet.get_submodule(name)
            key = str(base.in_features)
            if key not in self.generators:
                generator = Generator(base.in_features, o.rank, o.generator, o.clusters, o.blocks)
                self.generators[key] = generator.to(base.weight.device)
            layer = GiftLinear(base, self.generators[key])
            replace_module(unet, name, layer)
            self.layers[name] = layer

    explanation = "clusters"

    def output_clusters(self, layer: str) -> torch.Tensor:
        return self.layers[layer].clusters()

    def explanation_label(self) -> str:
        return self.options.generator

    def trainable_parameters(self) -> list[nn.Parameter]:
        """The generators' parameters, once each (layers of one width share a generator)."""
        return [] if self.merged else list(self.generators.parameters())

    def state_dict(self) -> dict[str, torch.Tensor]:
        if self.merged:
            return {}
        return {f"generators.{k}": v.detach() for k, v in self.generators.state_dict().items()}
