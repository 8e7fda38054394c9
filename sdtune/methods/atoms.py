"""Filter atoms: tune only the spatial filter atoms of each convolution.

A conv weight W (c_out, c_in, k, k), reshaped to W_r (c_out*c_in, k*k), is factored as α·D with m
atoms D (m, k*k) and coefficients α (c_out*c_in, m). Training changes the atoms only:
ΔW = α·ΔD with ΔD (m, k, k) zero-initialised, so an untrained adapter is the base model.

With the truncated-SVD decomposition D holds orthonormal rows and α = W_r·Dᵀ, so
ΔW = W_r·(Dᵀ·ΔD): a k²×k² matrix acting on the kernel's tap axis. α is therefore never stored;
the adapter keeps D (m·k² numbers per layer) and ΔD.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..errors import SdtuneError
from .base import Method, fingerprint, named_convs, replace_module


# ---------------------------------------------------------------------------------------------
# The maths as pure functions (tests check these against the literal formulas)


def svd_atoms(weight: torch.Tensor, m: int) -> torch.Tensor:
    """The m leading right singular vectors of W reshaped to (c_out*c_in, k*k): atoms D (m, k*k).

    Computed from the k²×k² Gram matrix in float64 (exactly the SVD's right factor, at a fraction
    of its cost). Each atom's sign is fixed so that its largest entry is positive.
    """
    taps = weight.shape[-1] * weight.shape[-2]
    flat = weight.detach().reshape(-1, taps).double()
    gram = flat.T @ flat
    eigenvalues, eigenvectors = torch.linalg.eigh(gram)
    order = torch.argsort(eigenvalues, descending=True)[:m]
    atoms = eigenvectors[:, order].T.contiguous()
    sign = torch.sign(atoms.gather(1, atoms.abs().argmax(dim=1, keepdim=True)))
    return (atoms * sign).float()


def atom_coefficients(weight: torch.Tensor, atoms: torch.Tensor) -> torch.Tensor:
    """α = W_r·Dᵀ (c_out*c_in, m): the least-squares coefficients for orthonormal atoms."""
    return weight.reshape(-1, atoms.shape[1]) @ atoms.T.to(weight.dtype)


def weight_diff(weight: torch.Tensor, atoms: torch.Tensor, delta_atoms: torch.Tensor) -> torch.Tensor:
    """ΔW = α·ΔD = W_r·(Dᵀ·ΔD), reshaped like W."""
    taps = atoms.shape[1]
    mixing = atoms.T.float() @ delta_atoms.reshape(-1, taps).float()
    return (weight.reshape(-1, taps) @ mixing.to(weight.dtype)).reshape(weight.shape)


# ---------------------------------------------------------------------------------------------
# The layer


class FilterAtomConv2d(nn.Module):
    """A frozen Conv2d whose filters are rebuilt from trainable atoms; runs ONE convolution."""

    def __init__(self, base: nn.Conv2d, atoms: torch.Tensor):
        super().__init__()
        self.base_layer = base
        k = base.kernel_size[0]
        self.register_buffer("atoms", atoms.to(device=base.weight.device, dtype=torch.float32))
        self.delta_atoms = nn.Parameter(
            torch.zeros(atoms.shape[0], k, k, device=base.weight.device, dtype=torch.float32)
        )

    def delta_weight(self) -> torch.Tensor:
        return weight_diff(self.base_layer.weight, self.atoms, self.delta_atoms)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.base_layer.weight + self.delta_weight()
        return self.base_layer._conv_forward(x, weight.to(x.dtype), self.base_layer.bias)

    @torch.no_grad()
    def merged(self) -> nn.Conv2d:
        """The base conv with ΔW added to its weight."""
        self.base_layer.weight += self.delta_weight()
        return self.base_layer


# ---------------------------------------------------------------------------------------------
# The method


@dataclass
class AtomsOptions:
    m: int = 9
    include_1x1: bool = False
    init: str = "svd"


def decomposition_cache_dir() -> Path:
    from ..models import cache_dir

    return cache_dir() / "decompositions"


class FilterAtoms(Method):
    name = "atoms"
    summary = "filter atoms: train only the m spatial atoms of each convolution (ΔW = α·ΔD)"
    Options = AtomsOptions
    default_lr = 1e-3  # a few thousand parameters: a larger step than the low-rank methods

    def validate_options(self) -> None:
        if self.options.m < 1:
            raise SdtuneError(f"--atoms-m must be at least 1, got {self.options.m}")
        if self.options.init != "svd":
            raise SdtuneError(f"--atoms-init {self.options.init!r} is not available; choose: svd")

    def find_targets(self, unet: nn.Module) -> list[str]:
        sizes = {3, 1} if self.options.include_1x1 else {3}
        return [name for name, _ in named_convs(unet, sizes)]

    def atoms_per_layer(self, conv: nn.Conv2d) -> int:
        return min(self.options.m, conv.kernel_size[0] ** 2)

    def _inject(self, unet: nn.Module, targets: list[str]) -> None:
        decomposition = self._decompose(unet, targets)
        self.layers: dict[str, FilterAtomConv2d] = {}
        for name in targets:
            layer = FilterAtomConv2d(unet.get_submodule(name), decomposition[name])
            replace_module(unet, name, layer)
            self.layers[name] = layer

    def _decompose(self, unet: nn.Module, targets: list[str]) -> dict[str, torch.Tensor]:
        """Atoms for every target, from the cache when this base model was decomposed before."""
        convs = {name: unet.get_submodule(name) for name in targets}
        if any(conv.weight.is_meta for conv in convs.values()):
            return {
                name: torch.empty(self.atoms_per_layer(conv), conv.kernel_size[0] ** 2, device="meta")
                for name, conv in convs.items()
            }
        from safetensors.torch import load_file, save_file

        key = f"{self.options.init}-m{self.options.m}-{fingerprint(unet, targets)}"
        path = decomposition_cache_dir() / f"{key}.safetensors"
        if path.exists():
            try:
                cached = load_file(path)
                if set(cached) == set(targets):
                    return cached
            except Exception:
                pass  # a damaged cache entry is recomputed below
        decomposition = {name: svd_atoms(conv.weight, self.atoms_per_layer(conv)) for name, conv in convs.items()}
        try:
            from ..fileio import atomic_write

            path.parent.mkdir(parents=True, exist_ok=True)
            with atomic_write(path) as tmp:
                save_file({k: v.contiguous() for k, v in decomposition.items()}, str(tmp))
        except OSError:
            pass  # the cache is an optimisation; an unwritable cache folder is not an error
        return decomposition

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [layer.delta_atoms for layer in self.layers.values()]

    def state_dict(self) -> dict[str, torch.Tensor]:
        state = {}
        for name, layer in self.layers.items():
            state[f"{name}.atoms"] = layer.atoms.detach()
            state[f"{name}.delta_atoms"] = layer.delta_atoms.detach()
        return state

    def merge(self) -> None:
        for name, layer in self.layers.items():
            replace_module(self.unet, name, layer.merged())
        self.layers = {}
