"""The interface every tuning method implements, and what all of them share.

A method is created from its options, injected into a frozen UNet (it wraps or selects the
parameters it trains), and can then give its trainable parameters, save and load its state,
merge its update into the base weights, and count its parameters. Adapter files and the training
loop only ever talk to this interface.
"""

from __future__ import annotations

import dataclasses
import hashlib
from abc import ABC, abstractmethod
from typing import Any, ClassVar, Iterator

import torch
from torch import nn

from ..errors import SdtuneError


class Method(ABC):
    """One tuning method: its options, its injection, its state and its merge."""

    name: ClassVar[str]
    summary: ClassVar[str]
    Options: ClassVar[type]
    default_lr: ClassVar[float] = 1e-4  # the `--lr` default: trains the method well at batch size 1
    # AdamW's decoupled decay pulls trainable tensors towards 0: right for updates that start at 0,
    # wrong for base weights trained in place (those methods set 0).
    weight_decay: ClassVar[float] = 1e-2
    # option sets that `sdtune methods` lists (the defaults first)
    variants: ClassVar[tuple[dict[str, Any], ...]] = ({},)

    def __init__(self, **options: Any):
        known = {f.name for f in dataclasses.fields(self.Options)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise SdtuneError(
                f"method {self.name!r} has no option(s) {', '.join(unknown)}; it takes: {', '.join(sorted(known))}"
            )
        self.options = self.Options(**options)
        self.validate_options()
        self.target_names: list[str] = []
        self.base_fingerprint: str | None = None
        self.base_structure: str | None = None
        self.base_sample: torch.Tensor = torch.zeros(0)
        self._unet: nn.Module | None = None

    def validate_options(self) -> None:
        """Raise SdtuneError for option values that cannot work."""

    # -- the interface -------------------------------------------------------------------------
    @abstractmethod
    def find_targets(self, unet: nn.Module) -> list[str]:
        """Names of the UNet modules this method changes."""

    @abstractmethod
    def _inject(self, unet: nn.Module, targets: list[str]) -> None:
        """Wrap or select the targets; after this, `trainable_parameters()` is valid."""

    @abstractmethod
    def trainable_parameters(self) -> list[nn.Parameter]:
        """The parameters the optimiser updates."""

    @abstractmethod
    def state_dict(self) -> dict[str, torch.Tensor]:
        """Every tensor needed to rebuild the update on the same base model."""

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Load what `state_dict` returned (after `inject` on the same base model).

        The default copies into the tensors `state_dict()` returns, which must share storage with
        the method's own (detached views do). Keys and shapes are all checked before any copy.
        """
        own = self.state_dict()
        check_state_names(own, state)
        check_state_shapes({k: tuple(v.shape) for k, v in own.items()}, {k: tuple(v.shape) for k, v in state.items()})
        with torch.no_grad():
            for key, tensor in own.items():
                tensor.copy_(state[key])

    @abstractmethod
    def merge(self) -> None:
        """Fold the update into the base weights and remove every wrapper."""

    # -- shared behaviour ----------------------------------------------------------------------
    def inject(self, unet: nn.Module) -> list[nn.Parameter]:
        """Freeze the UNet, apply the method to it, and return the trainable parameters."""
        if self._unet is not None:
            raise RuntimeError(f"{self.name}: already injected")
        unet.requires_grad_(False)
        targets = self.find_targets(unet)
        if not targets:
            raise SdtuneError(f"method {self.name!r} found no layer to tune in this UNet")
        self.base_structure = structure_digest(unet, targets)
        self.base_sample = weight_sample(unet, targets)
        self.base_fingerprint = fingerprint_of(self.base_structure, self.base_sample)
        self.target_names = targets
        self._unet = unet
        self._inject(unet, targets)
        return self.trainable_parameters()

    def num_parameters(self) -> int:
        """How many numbers training updates."""
        return sum(p.numel() for p in self.trainable_parameters())

    def options_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self.options)

    def describe(self) -> str:
        """A one-line human description: method, options and size."""
        opts = ", ".join(f"{k}={v}" for k, v in self.options_dict().items())
        size = f", {self.num_parameters():,} trainable parameters in {len(self.target_names)} layers" if self._unet else ""
        return f"{self.name} ({opts}){size}"

    @property
    def unet(self) -> nn.Module:
        if self._unet is None:
            raise RuntimeError(f"{self.name}: inject() first")
        return self._unet

    # -- views of the update in other formats ----------------------------------------------------
    # What the file writers (`sdtune export`) ask a method instead of testing its name. They read
    # the adapter's saved tensors (`state_dict()`'s keys), with no model and nothing injected.

    # the `sdtune export --format`s this method's adapters can be written in
    export_formats: ClassVar[tuple[str, ...]] = ("kohya",)

    def kohya_tensors(
        self, tensors: dict[str, torch.Tensor]
    ) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, str]] | None:
        """The update as kohya/LyCORIS tensors, computed from the adapter's `tensors` alone:
        (UNet module name → {kohya suffix, e.g. `lora_down.weight`: tensor}, kohya-ss' `ss_network_*`
        metadata). None (this default): the update is exported as full-weight differences
        (merged − base), computed on the base model."""
        return None

    def to_peft_config(self, module_names: list[str]):
        """The peft config (a `peft.PeftConfig`) that wraps exactly `module_names` with this method's layers."""
        raise SdtuneError(f"method {self.name!r} has no peft form")


# ---------------------------------------------------------------------------------------------
# Helpers the methods share


def check_state_names(own: dict, found: dict, what: str = "adapter") -> None:
    """Refuse a state whose tensor names are not exactly the method's own."""
    missing, extra = sorted(set(own) - set(found)), sorted(set(found) - set(own))
    if missing or extra:
        raise SdtuneError(
            f"{what} does not fit this model: {len(missing)} tensor(s) missing"
            f"{' (' + missing[0] + ', …)' if missing else ''}, {len(extra)} unexpected"
            f"{' (' + extra[0] + ', …)' if extra else ''}"
        )


def check_state_shapes(own: dict[str, tuple[int, ...]], found: dict[str, tuple[int, ...]], what: str = "adapter") -> None:
    """Refuse a state with a tensor whose shape is not the method's own (names checked first)."""
    for key, shape in own.items():
        if found[key] != shape:
            raise SdtuneError(f"{what} tensor {key} has shape {found[key]}, the model needs {shape}")


def replace_module(root: nn.Module, name: str, new: nn.Module) -> None:
    """Put `new` where `root.get_submodule(name)` is."""
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, new)


def named_convs(unet: nn.Module, kernel_sizes: set[int]) -> Iterator[tuple[str, nn.Conv2d]]:
    """The UNet's square Conv2d layers whose kernel size is in `kernel_sizes`, in module order."""
    for name, module in unet.named_modules():
        if type(module) is nn.Conv2d and module.kernel_size[0] == module.kernel_size[1]:
            if module.kernel_size[0] in kernel_sizes and module.groups == 1:
                yield name, module


FINGERPRINT_SAMPLES = 64


def sample_indices(size: int, count: int) -> torch.Tensor:
    """`count` evenly spaced indices into a tensor of `size` elements, first and last included.

    Integer arithmetic: a float linspace rounds past the end for sizes above 2**24.
    """
    count = min(count, size)
    return torch.arange(count, dtype=torch.int64) * (size - 1) // max(count - 1, 1)


def structure_digest(unet: nn.Module, names: list[str]) -> str:
    """A short hash of the named layers' names and weight shapes."""
    digest = hashlib.sha256()
    for name in names:
        weight = getattr(unet.get_submodule(name), "weight", None)
        digest.update(f"{name}:{tuple(weight.shape) if weight is not None else ''};".encode())
    return digest.hexdigest()[:16]


def weight_sample(unet: nn.Module, names: list[str]) -> torch.Tensor:
    """A fixed sample of the named layers' weights (64 evenly spaced values each), as float32."""
    values = []
    for name in names:
        weight = getattr(unet.get_submodule(name), "weight", None)
        if weight is None or weight.is_meta:
            continue
        flat = weight.detach().reshape(-1)
        values.append(flat[sample_indices(flat.numel(), FINGERPRINT_SAMPLES).to(flat.device)].float().cpu())
    return torch.cat(values) if values else torch.zeros(0)


def same_weights(expected: torch.Tensor, found: torch.Tensor, relative: float = 1e-2) -> bool:
    """Whether two weight samples come from the same model, up to a change of precision.

    bfloat16 keeps 8 significant bits (relative error up to 0.4 %); a different base model, even a
    fine-tuned one, moves most weights by far more.
    """
    if expected.shape != found.shape:
        return False
    scale = expected.square().mean().sqrt().item() if expected.numel() else 0.0
    return bool(((expected - found).abs() <= relative * expected.abs() + 1e-3 * scale).all())


def own_parameters(unet: nn.Module, names: list[str]) -> dict[tuple[str, str], torch.Tensor]:
    """Copies of the named modules' own parameters, by (module name, parameter name): what a merge may change."""
    return {
        (name, attr): parameter.detach().clone()
        for name in names
        for attr, parameter in unet.get_submodule(name).named_parameters(recurse=False)
    }


def fingerprint(unet: nn.Module, names: list[str]) -> str:
    """A short hash of the named layers' shapes and a fixed sample of their weights."""
    return fingerprint_of(structure_digest(unet, names), weight_sample(unet, names))


def fingerprint_of(structure: str, sample: torch.Tensor) -> str:
    """The fingerprint from a structure digest and a weight sample.

    Values are rounded to float16 first, so a base model loaded in fp16 or fp32 gives the same
    fingerprint; the sample (64 evenly spaced values per weight) keeps it fast on SD v1.4.
    """
    digest = hashlib.sha256(structure.encode())
    digest.update(sample.to(torch.float16).numpy().tobytes())
    return digest.hexdigest()[:16]
