"""The interface every tuning method implements, and what all of them share.

A method is created from its options, injected into a frozen UNet (it wraps or selects the
parameters it trains; a method that `trains_text_encoder` also into the text encoders, whose
modules it names `text_encoder.<module>`), and can then give its trainable parameters, save and load its state, set the
strength of its update, merge it into the base weights and unmerge it again, and count its
parameters. Adapter files, sampling and the training loop only ever talk to this interface.

Two shapes cover every method so far, each a base class here:
- `WrappedLayers`: each target is replaced by a layer computing with W + scale·ΔW (`DeltaLayer`
  for sdtune's own maths; peft's layers for the low-rank family);
- `InPlaceMethod` (methods/inplace.py): the UNet's own parameters train, so the tuned values are the
  weights.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import math
import re
from abc import ABC, abstractmethod
from typing import Any, Callable, ClassVar, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import SdtuneError
from .choices import LAYER_FAMILIES  # what the low-rank methods' and OFT's `targets` name (listed without torch, for messages)

ATTENTION_PROJECTIONS = ("to_q", "to_k", "to_v", "to_out.0")
CARRIED_METHOD = "_sdtune_method"  # set on a UNet while a method's update is injected and not merged
BASE_SAMPLE = "_sdtune_base_sample"  # set on a layer a merge changed: the sample of its weights before
# a CLIP text encoder's attention and MLP linears: what kohya-ss and diffusers train there
TEXT_ENCODER_LINEARS = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")


def check_no_unmerged_method(unet: nn.Module, before: str) -> None:
    """Refuse a second update on a UNet that carries a method unmerged: wrappers of two methods would wrap each
    other, and its layers no longer have the base model's names."""
    carried = getattr(unet, CARRIED_METHOD, None)
    if carried is not None:
        raise SdtuneError(
            f"this UNet already carries {carried} (unmerged): merge it into the weights (method.merge()) "
            f"or load a fresh pipeline before {before}"
        )


def text_encoder_prefix(index: int) -> str:
    """The name of a pipeline's `index`-th text encoder (diffusers': text_encoder, text_encoder_2), which
    prefixes its modules' names in a method's targets and state."""
    return "text_encoder" if index == 0 else f"text_encoder_{index + 1}"


class ModelParts:
    """The UNet and the trained text encoders seen as one tree for module lookups: a name starting with
    `text_encoder.` (or `text_encoder_2.`) is that encoder's module, any other the UNet's."""

    def __init__(self, unet: nn.Module, text_encoders: dict[str, nn.Module]):
        self.unet, self.text_encoders = unet, text_encoders

    def split(self, name: str) -> tuple[nn.Module, str]:
        """(the model holding module `name`, its name there)."""
        prefix, _, rest = name.partition(".")
        if prefix in self.text_encoders:
            return self.text_encoders[prefix], rest
        return self.unet, name

    def get_submodule(self, name: str) -> nn.Module:
        model, local = self.split(name)
        return model.get_submodule(local)


class Method(ABC):
    """One tuning method: its options, its injection, its state, its strength and its merge."""

    name: ClassVar[str]
    summary: ClassVar[str]
    Options: ClassVar[type]
    default_lr: ClassVar[float] = 1e-4  # the `--lr` default: trains the method well at batch size 1
    # AdamW's decoupled decay pulls trainable tensors towards 0: right for updates that start at 0,
    # wrong for base weights trained in place (those methods set 0).
    weight_decay: ClassVar[float] = 1e-2
    # option sets that `sdtune methods` lists (the defaults first)
    variants: ClassVar[tuple[dict[str, Any], ...]] = ({},)
    # what `sdtune explain` draws beyond the per-layer update norms: "clusters" (each tuned layer's
    # output read through `output_clusters`, over a generated image) or "tiles" (`update_tiles`)
    explanation: ClassVar[str] = ""
    # whether `inject` also takes text encoders (their linears tuned with the method's own maths)
    trains_text_encoder: ClassVar[bool] = False
    # whether `pending_updates` computes each update only when asked (else they are all held already)
    updates_on_demand: ClassVar[bool] = False
    # options that act in training only (dropouts, learning-rate factors): a run that starts from an adapter's
    # tensors (`sdtune train --init-weights`) may set them otherwise than the adapter did; every other option
    # gives the tensors their meaning and must be the adapter's
    training_only_options: ClassVar[tuple[str, ...]] = ()

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
        self.text_encoders: dict[str, nn.Module] = {}  # the trained encoders by prefix (text_encoder, ...)
        # the tuned layers by module name: wrappers, or the modules whose own parameters train
        self.layers: dict[str, nn.Module] = {}
        self.scale = 1.0  # strength of the update: the UNet computes with W + scale·ΔW
        self.merged = False
        self._unmerged_weights: dict[tuple[str, str], torch.Tensor] | None = None

    def validate_options(self) -> None:
        """Raise SdtuneError for option values that cannot work."""

    @classmethod
    def kohya_layer_options(cls, unet: nn.Module, modules: set[str]) -> dict[str, Any]:
        """The options that choose exactly the UNet layers `modules` (diffusers names) a kohya file changes, where
        an option of this method does (a layer family): what a run started from the file takes when it sets none."""
        return {}

    @classmethod
    def device_notes(cls, device_type: str) -> list[str]:
        """Lines on how this method computes a training step on `device_type` ("cpu", "cuda", "mps") under its
        default options, where it chooses by device (which kernel, which side of the layer); `sdtune env` lists them.
        Most methods run as the library does everywhere: none."""
        return []

    # -- the interface -------------------------------------------------------------------------
    @abstractmethod
    def find_targets(self, unet: nn.Module) -> list[str]:
        """Names of the UNet modules this method changes."""

    @abstractmethod
    def _inject(self, unet: nn.Module, targets: list[str]) -> None:
        """Wrap or select the targets; after this, `trainable_parameters()` is valid."""

    def find_text_encoder_targets(self, text_encoder: nn.Module) -> list[str]:
        """Names of the text encoder's modules this method changes (methods that train it)."""
        return [name for name, _ in named_linears(text_encoder, TEXT_ENCODER_LINEARS)]

    def _inject_text_encoder(self, text_encoder: nn.Module, prefix: str, targets: list[str]) -> None:
        """Wrap the text encoder's `targets`, registering them in `layers` as `<prefix>.<name>`."""
        raise SdtuneError(f"method {self.name!r} cannot train the text encoder")

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

    # -- strength, merge and unmerge ----------------------------------------------------------
    def set_scale(self, scale: float) -> None:
        """Set the update's strength: W + scale·ΔW from now on (0: the base model, 1: as trained).

        Applies to the unmerged UNet and to what `merge` folds in; change it while unmerged.
        """
        scale = checked_scale(scale)
        if self.merged:
            raise SdtuneError(f"{self.name}: merged; unmerge() before changing the scale")
        self._apply_scale(scale)
        self.scale = scale

    def merge(self, keep_base: bool = True) -> None:
        """Fold scale·ΔW into the base weights and remove every wrapper and hook: the UNet is plain again.

        With `keep_base`, the changed weights are copied first (to the CPU) so that `unmerge` puts
        them back exactly; without it the merge is one-way and costs no copy. Merging a merged
        method does nothing.
        """
        if self.merged:
            return
        changed = self._changed_modules()
        remember_base_samples(changed.values())
        self._unmerged_weights = copy_parameters(changed, "cpu") if keep_base else None
        self._merge()
        self.merged = True
        self._unet.__dict__.pop(CARRIED_METHOD, None)  # plain again: another method may be injected

    def unmerge(self) -> None:
        """Undo `merge`: the base weights exactly as they were, the wrappers and hooks back in place."""
        if not self.merged:
            return
        if self._unmerged_weights is None:
            raise SdtuneError(f"{self.name}: {ONE_WAY_MERGE}")
        self._unmerge()
        changed = self._changed_modules()
        with torch.no_grad():
            for (name, attr), value in self._unmerged_weights.items():
                getattr(changed[name], attr).copy_(value)
        self._unmerged_weights = None
        self.merged = False
        setattr(self._unet, CARRIED_METHOD, self.name)

    def _initial_weights(self) -> dict[tuple[str, str], torch.Tensor]:
        """Weights the method trains in place, as they were before training (none for wrappers)."""
        return {}

    @abstractmethod
    def _changed_modules(self) -> dict[str, nn.Module]:
        """The plain modules whose own parameters a merge changes, by module name."""

    @abstractmethod
    def _apply_scale(self, scale: float) -> None:
        """Make the unmerged UNet compute with W + scale·ΔW."""

    @abstractmethod
    def _merge(self) -> None:
        """Fold scale·ΔW into the base weights; leave only plain modules in the UNet."""

    @abstractmethod
    def _unmerge(self) -> None:
        """Put the wrappers (or hooks) back; the base weights are restored by `unmerge`."""

    # -- shared behaviour ----------------------------------------------------------------------
    def inject(self, unet: nn.Module, text_encoders: list[nn.Module] | tuple = ()) -> list[nn.Parameter]:
        """Freeze the UNet (and `text_encoders`, which the method then tunes too), apply the method, and
        return the trainable parameters: the UNet's first, then each text encoder's."""
        if self._unet is not None:
            raise RuntimeError(f"{self.name}: already injected")
        check_no_unmerged_method(unet, f"injecting {self.name}")
        if text_encoders and not self.trains_text_encoder:
            raise SdtuneError(f"method {self.name!r} cannot train the text encoder")
        encoders = {text_encoder_prefix(i): text_encoder_layers(encoder) for i, encoder in enumerate(text_encoders)}
        unet.requires_grad_(False)
        for encoder in encoders.values():
            encoder.requires_grad_(False)
        unet_targets = self.find_targets(unet)
        if not unet_targets:
            raise SdtuneError(f"method {self.name!r} found no layer to tune in this UNet")
        targets = self.all_targets(unet, encoders)
        parts = ModelParts(unet, encoders)
        self.base_structure = structure_digest(parts, targets)
        # the weights before any sdtune merge changed them (`remember_base_samples`): an adapter trained on top of
        # merged ones (--base-adapters) loads on the base model, and stacks with them
        self.base_sample = weight_sample(parts, targets, base=True)
        self.base_fingerprint = fingerprint_of(self.base_structure, self.base_sample)
        self.target_names = targets
        self._unet = unet
        self.text_encoders = encoders
        self._inject(unet, unet_targets)
        setattr(unet, CARRIED_METHOD, self.name)
        for prefix, encoder in encoders.items():
            own = [name[len(prefix) + 1 :] for name in targets if name.startswith(prefix + ".")]
            self._inject_text_encoder(encoder, prefix, own)
        return self.trainable_parameters()

    def all_targets(self, unet: nn.Module, text_encoders: dict[str, nn.Module]) -> list[str]:
        """The UNet's targets, then each text encoder's as `<prefix>.<name>` (what the fingerprint covers)."""
        targets = self.find_targets(unet)
        for prefix, encoder in text_encoders.items():
            own = self.find_text_encoder_targets(encoder)
            if not own:
                raise SdtuneError(f"method {self.name!r} found no layer to tune in the {prefix.replace('_', ' ')}")
            targets += [f"{prefix}.{name}" for name in own]
        return targets

    @property
    def models(self) -> ModelParts:
        """The UNet and the trained text encoders, for looking modules up by target name."""
        return ModelParts(self.unet, self.text_encoders)

    def text_encoder_parameters(self) -> list[nn.Parameter]:
        """The trainable parameters that live in the text encoders (their own learning rate)."""
        return []

    def learning_rate_factors(self) -> list[tuple[list[nn.Parameter], float]]:
        """The trainable parameters by the factor their learning rate gets (LoRA+'s B matrices train faster)."""
        return [(self.trainable_parameters(), 1.0)]

    def num_parameters(self) -> int:
        """How many numbers training updates."""
        return sum(p.numel() for p in self.trainable_parameters())

    def backward_bytes(self, compute_bytes: int, device_type: str = "cuda", autocast: bool = False) -> int:
        """Bytes of the tensors this method forms from the weights in a training step that autograd keeps for
        backward, whatever the batch (a weight W + ΔW formed per layer, say): what the memory check
        (`limits.py`) adds to the trained parameters. `compute_bytes`: 2 under mixed precision, else 4;
        `device_type` ("cuda", "cpu", ...) and `autocast`: where and how the step runs, for a method whose
        layers compute differently there. Valid once injected, on the meta device too; none by default."""
        return 0

    def text_encoder_activation_bytes(self, tokens: int, compute_bytes: int) -> int:
        """At least what the trained text encoders keep for backward per prompt of `tokens` tokens: the input of
        every tuned linear, which the gradient of its update reads (q/k/v share one)."""
        inputs = {}
        for name in self.target_names:
            if name.partition(".")[0] not in self.text_encoders:
                continue
            parent, _, leaf = name.rpartition(".")
            module = self.models.get_submodule(name)
            width = getattr(module, "in_features", None) or getattr(getattr(module, "base_layer", None), "in_features", 0)
            inputs[f"{parent}.q_proj" if leaf in ("q_proj", "k_proj", "v_proj") else name] = width
        return sum(inputs.values()) * tokens * compute_bytes

    def options_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self.options)

    def changed_options(self, options: dict[str, Any] | None = None) -> dict[str, Any]:
        """The options (this method's, or `options` as an adapter file holds them) that differ from their defaults."""
        options = self.options_dict() if options is None else options
        defaults = type(self)().options_dict()
        return {key: value for key, value in options.items() if key not in defaults or value != defaults[key]}

    def shown_options(self) -> dict[str, Any]:
        """The options as `describe` shows them: an option left to be derived shows what it derives to."""
        return self.options_dict()

    def describe(self) -> str:
        """A one-line human description: method, options and size."""
        opts = ", ".join(f"{k}={v}" for k, v in self.shown_options().items())
        size = f", {self.num_parameters():,} trainable parameters in {len(self.target_names)} layers" if self._unet else ""
        return f"{self.name} ({opts}){size}" if opts else f"{self.name}{size}"

    # -- what `sdtune explain` reads (methods with an `explanation`) ---------------------------
    def output_clusters(self, layer: str) -> torch.Tensor:
        """The (d_out, M) matrix a tuned layer's output is projected on to draw M cluster maps."""
        raise NotImplementedError(f"{self.name} has no cluster maps")

    def update_tiles(self, layer: str) -> torch.Tensor:
        """A tuned layer's learned update as small (n, h, w) tiles."""
        raise NotImplementedError(f"{self.name} has no update tiles")

    def explanation_label(self) -> str:
        """How the explanation pictures name this method's variant."""
        return self.name

    @property
    def unet(self) -> nn.Module:
        if self._unet is None:
            raise RuntimeError(f"{self.name}: inject() first")
        return self._unet

    # -- views of the update in other formats ----------------------------------------------------
    # What the file writers (`sdtune export`) ask a method instead of testing its name. They read
    # the adapter's saved tensors (`state_dict()`'s keys), with no model and nothing injected.

    @property
    def needs_base_layers(self) -> bool:
        """Whether the views below need `read_base_layers` first: what the tensors alone do not tell of the base model's
        layers (which are 3x3 convolutions, for LoCon's conv_rank). False by default."""
        return False

    def read_base_layers(self, unet: nn.Module) -> None:
        """Read what `needs_base_layers` wants off `unet`, the base model's UNet (on the meta device: shapes only)."""

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

    def export_warnings(self, format: str, tensors: dict[str, torch.Tensor]) -> list[str]:
        """What to warn about when the adapter's `tensors` are written in `format`: known loaders that
        read the file wrongly for this method's options (none by default)."""
        return []

    # -- starting from a kohya/LyCORIS file (`sdtune train --init-weights`) ------------------------
    @classmethod
    def kohya_init_options(cls, kinds: set[str], shapes: dict[str, dict[str, tuple[int, ...]]],
                           alphas: dict[str, float], network_args: dict[str, str]) -> dict[str, Any]:
        """The options a kohya/LyCORIS file's update needs to be held exactly by this method, read from the file
        alone (`kinds`: its update kinds, kohya.KOHYA_KINDS' names; `shapes`: kohya module name → {suffix: shape};
        `alphas`: module → its `.alpha`; `network_args`: its `ss_network_args`). Refuses, in one line, a file
        the method cannot hold; by default every file: only methods with kohya tensors of their own can."""
        raise SdtuneError(f"method {cls.name!r} cannot start from a kohya/LyCORIS file; start from an sdtune adapter of {cls.name}")

    def state_from_kohya(self, modules: dict[str, dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """This injected method's state (`state_dict()`'s keys, every one) holding the update of a kohya file's
        `modules` (sdtune module name, text encoders' as `text_encoder.<name>`, → {kohya suffix: tensor}); a
        target the file leaves alone keeps its initial tensors. Refuses a module it has no target for."""
        raise SdtuneError(f"method {self.name!r} cannot start from a kohya/LyCORIS file")

    def check_kohya_unet_modules(self, unet: nn.Module, modules: set[str]) -> None:
        """Refuse, before the model loads, a kohya file's UNet `modules` (diffusers names, on `unet`: the run's UNet
        on the meta device, nothing injected) that this method, with its options, does not tune: what
        `state_from_kohya` refuses once it loads, in the same words. By default nothing: a method that can hold a
        kohya file says which of its modules it cannot."""

    def to_peft_config(self, module_names: list[str]):
        """The peft config (a `peft.PeftConfig`) that wraps exactly `module_names` with this method's layers."""
        raise SdtuneError(f"method {self.name!r} has no peft form")

    @torch.no_grad()
    def weight_diffs(self) -> dict[tuple[str, str], torch.Tensor]:
        """Merge (if not merged yet), and return ΔW = merged − base of every weight the merge changed,
        by (module name, parameter name), in float32 on the CPU; `unmerge` goes back."""
        if self.merged and self._unmerged_weights is None:
            raise RuntimeError(f"{self.name}: merged with keep_base=False; the base weights are gone")
        self.merge(keep_base=True)
        changed = self._changed_modules()
        diffs = {}
        for (name, attr), base in self._base_weights().items():
            delta = getattr(changed[name], attr).detach().float().cpu() - base.float()
            if delta.any():
                diffs[(name, attr)] = delta
        return diffs

    def _base_weights(self) -> dict[tuple[str, str], torch.Tensor]:
        """Merged with keep_base: every weight the merge changed as the base model had it (a method that trains
        weights in place keeps their values from before training)."""
        return {**self._unmerged_weights, **self._initial_weights()}

    def take_update(self) -> list[tuple[nn.Module, str, torch.Tensor]]:
        """(module, parameter name, scale·ΔW) of every weight the merge changes, ΔW in float32 on the CPU; the
        base weights are put back and no wrapper is left, so the UNet is plain and this method is done with.
        What stacked adapters add up (`adapter.load_adapters`)."""
        diffs = self.weight_diffs()
        changed = self._changed_modules()
        with torch.no_grad():
            for (name, attr), base in self._base_weights().items():
                getattr(changed[name], attr).copy_(base)
        self._unmerged_weights = None
        return [(changed[name], attr, delta) for (name, attr), delta in diffs.items()]

    @property
    def update_reads_weights(self) -> bool:
        """Whether scale·ΔW depends on the weights it is computed on (filter atoms decompose them, GIFT generates from
        them, OFT rotates them, DiffFit scales them, in-place methods replace them). Stacked with the base adapters it
        was trained on, such an update is computed on the weights they leave (`adapter.load_adapters`)."""
        return True

    def pending_updates(self) -> list[tuple[nn.Module, str, Callable[[], torch.Tensor | None]]]:
        """(module, parameter name, a function giving scale·ΔW) for every weight the merge changes: `take_update`
        with each update computed when its function is called (float32 on the CPU, None where it changes
        nothing), from the weight as it is then. The UNet is plain at once and this method done with; several
        adapters' updates of one weight, each computed before it is written, read the base weights, or those with
        the updates of the adapter's base adapters added (`adapter.load_adapters`). This default takes them all now (a method that trains weights in place
        holds their initial values anyway)."""
        return [(module, attr, lambda delta=delta: delta) for module, attr, delta in self.take_update()]


# ---------------------------------------------------------------------------------------------
# Methods that wrap their targets


class DeltaLayer(nn.Module):
    """A frozen Conv2d or Linear that computes with W + scale·ΔW, in ONE convolution or matmul.

    Subclasses give ΔW (`delta_weight`) from their own trainable tensors; the method sets `scale`.
    """

    def __init__(self, base: nn.Module):
        super().__init__()
        self.base_layer = base
        self.scale = 1.0

    def delta_weight(self) -> torch.Tensor:
        raise NotImplementedError

    def scaled_delta(self) -> torch.Tensor:
        """scale·ΔW in the base weight's dtype (at scale 1 exactly ΔW)."""
        delta = self.delta_weight()
        if self.scale != 1.0:
            delta = delta * self.scale
        return delta.to(self.base_layer.weight.dtype)

    def backward_bytes(self, compute_bytes: int, device_type: str = "cuda", autocast: bool = False) -> int:
        """What `forward` keeps for backward beyond the input and the base weight: the weight W + scale·ΔW it
        forms, in the compute dtype (what the linear or convolution saves to pass the gradient to ΔW), on any
        device (`Method.backward_bytes`)."""
        return self.base_layer.weight.numel() * compute_bytes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        base = self.base_layer
        weight = (base.weight + self.scaled_delta()).to(x.dtype)
        bias = base.bias.to(x.dtype) if base.bias is not None else None
        if isinstance(base, nn.Linear):
            return F.linear(x, weight, bias)
        return base._conv_forward(x, weight, bias)


class WrappedLayers(Method):
    """A method that replaces each target by a layer computing with W + scale·ΔW.

    Defaults fit `DeltaLayer`s; a method whose layers come from elsewhere (peft) overrides the
    three per-layer hooks below.
    """

    updates_on_demand = True

    def layer_base(self, layer: nn.Module) -> nn.Module:
        """The plain module a wrapper wraps."""
        return layer.base_layer

    def layer_delta(self, layer: nn.Module) -> torch.Tensor:
        """scale·ΔW of one wrapper, in its base weight's dtype."""
        return layer.scaled_delta()

    def set_layer_scale(self, layer: nn.Module, scale: float) -> None:
        layer.scale = scale

    def _changed_modules(self) -> dict[str, nn.Module]:
        return {name: self.layer_base(layer) for name, layer in self.layers.items()}

    def _apply_scale(self, scale: float) -> None:
        for layer in self.layers.values():
            self.set_layer_scale(layer, scale)

    def merge_layer(self, layer: nn.Module) -> None:
        """Fold one wrapper's scale·ΔW into its base weight, in place (under no_grad)."""
        self.layer_base(layer).weight += self.layer_delta(layer)

    @torch.no_grad()
    def _merge(self) -> None:
        for layer in self.layers.values():
            self.merge_layer(layer)
        self._put_back_bases()

    def _put_back_bases(self) -> None:
        """Each wrapped module back in its wrapper's place: the model is plain."""
        for name, layer in self.layers.items():
            replace_module(self.models, name, self.layer_base(layer))

    def pending_updates(self) -> list[tuple[nn.Module, str, Callable[[], torch.Tensor | None]]]:
        """Each wrapped layer's update computed when asked for, exactly what `take_update` gives for it (what
        `merge` would leave in the weight, less the weight, in float32 on the CPU), from its base weight as it
        is then. The wrappers leave the model at once (it is plain) but keep computing."""
        if self.merged:
            raise RuntimeError(f"{self.name}: pending_updates() reads the update of an unmerged method")
        self._put_back_bases()
        self.merged, self._unmerged_weights = True, None
        self._unet.__dict__.pop(CARRIED_METHOD, None)
        return [(self.layer_base(layer), "weight", functools.partial(self._layer_update, layer)) for layer in self.layers.values()]

    @torch.no_grad()
    def _layer_update(self, layer: nn.Module) -> torch.Tensor | None:
        weight = self.layer_base(layer).weight
        base = weight.detach().clone()
        self.merge_layer(layer)  # the very sum `merge` leaves, bit for bit; the weight is put back at once
        delta = weight.float().cpu() - base.float().cpu()
        weight.copy_(base)
        return delta if delta.any() else None

    def _unmerge(self) -> None:
        for name, layer in self.layers.items():
            # the merged UNet may have moved (sampling moves it to the GPU): the wrapper follows its base
            layer.to(self.layer_base(layer).weight.device)
            replace_module(self.models, name, layer)

    def backward_bytes(self, compute_bytes: int, device_type: str = "cuda", autocast: bool = False) -> int:
        """Each wrapper's own (`DeltaLayer.backward_bytes`); peft's layers keep only activations."""
        return sum(layer.backward_bytes(compute_bytes, device_type, autocast)
                   for layer in self.layers.values() if isinstance(layer, DeltaLayer))

    def trainable_parameters(self) -> list[nn.Parameter]:
        """Every wrapper's parameters, not the frozen base layers' (none once merged)."""
        if self.merged:
            return []
        return [p for layer in self.layers.values() for p in self.layer_parameters(layer)]

    def text_encoder_parameters(self) -> list[nn.Parameter]:
        if self.merged:
            return []
        prefixes = tuple(prefix + "." for prefix in self.text_encoders)
        return [p for name, layer in self.layers.items() if prefixes and name.startswith(prefixes) for p in self.layer_parameters(layer)]

    def layer_parameters(self, layer: nn.Module) -> list[nn.Parameter]:
        """The trainable parameters of one wrapper."""
        return [p for _, p in self.named_layer_parameters(layer)]

    def named_layer_parameters(self, layer: nn.Module) -> list[tuple[str, nn.Parameter]]:
        return [(name, p) for name, p in layer.named_parameters() if not name.startswith("base_layer.")]

    def state_dict(self) -> dict[str, torch.Tensor]:
        """`<target>.<parameter>` for every wrapper's parameters (nothing once merged)."""
        if self.merged:
            return {}
        return {
            f"{name}.{key}": parameter.detach()
            for name, layer in self.layers.items()
            for key, parameter in self.named_layer_parameters(layer)
        }


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


def text_encoder_layers(encoder: nn.Module) -> nn.Module:
    """The module whose names an adapter gives a text encoder's layers: CLIP's transformer. transformers 5
    puts CLIPTextModel's layers at its top, transformers 4 (and CLIPTextModelWithProjection) below
    `text_model`; naming them from there, an adapter reads the same whichever version saved or loads it."""
    return getattr(encoder, "text_model", encoder)


def replace_module(root: nn.Module | ModelParts, name: str, new: nn.Module) -> None:
    """Put `new` where `root.get_submodule(name)` is."""
    parent_name, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent_name), child, new)  # get_submodule("") is the root (ModelParts: the UNet)


def named_convs(unet: nn.Module, kernel_sizes: set[int]) -> Iterator[tuple[str, nn.Conv2d]]:
    """The UNet's square Conv2d layers whose kernel size is in `kernel_sizes`, in module order."""
    for name, module in unet.named_modules():
        if type(module) is nn.Conv2d and module.kernel_size[0] == module.kernel_size[1]:
            if module.kernel_size[0] in kernel_sizes and module.groups == 1:
                yield name, module


def named_linears(unet: nn.Module, endings: tuple[str, ...] | list[str], within: str = "") -> Iterator[tuple[str, nn.Linear]]:
    """The UNet's Linear layers whose names end with one of `endings` (after a dot), in module order;
    with `within`, only those whose name contains it."""
    suffixes = tuple("." + ending for ending in endings)
    for name, module in unet.named_modules():
        if type(module) is nn.Linear and name.endswith(suffixes) and within in name:
            yield name, module


# kohya-ss' sd-scripts (networks/lora.py) tunes every Linear and Conv2d inside these diffusers blocks: the transformers
# (UNET_TARGET_REPLACE_MODULE) for its LoRA, and with `conv_dim` (LoCon) the resnets and resamplers too
# (UNET_TARGET_REPLACE_MODULE_CONV2D_3X3); LyCORIS' `unet-transformer-only` and `attn-mlp` presets take the first
KOHYA_TRANSFORMER_BLOCKS = ("Transformer2DModel",)
KOHYA_CONV_BLOCKS = ("ResnetBlock2D", "Downsample2D", "Upsample2D")
# LyCORIS' `full` preset (lycoris/config.py FULL_UNET_MODULES, FULL_UNET_NAMES): LoCon's blocks, the TimestepEmbedding
# blocks (the time embedding; SDXL's added-conditioning MLP, add_embedding, is one too) and these layers by name
LYCORIS_FULL_BLOCKS = ("TimestepEmbedding",)
LYCORIS_FULL_NAMES = ("conv_in", "conv_out", "time_embedding.linear_1", "time_embedding.linear_2")
# the kohya-ss and LyCORIS families, which `sdtune methods` counts for every method that takes `targets`
KOHYA_FAMILY_VARIANTS = ({"targets": "transformer"}, {"targets": "locon"}, {"targets": "full"})
TARGETS_HELP = ("conv (3x3 and 1x1 convs), conv3x3, attn (to_q/k/v/out), all (conv and attn), transformer (kohya-ss' "
                "LoRA: every linear and 1x1 conv of the transformer blocks), locon (kohya-ss' LoCon: transformer and the "
                "resnets' and down/upsamplers' layers) or full (LyCORIS' full preset: locon, conv_in, conv_out and the "
                "time embedding's linears, on SDXL the added conditioning's too: every linear and conv of the UNet)")


def layer_family(unet: nn.Module, family: str) -> list[str]:
    """The layers a `targets` family names, in module order: `conv` the 3x3 and 1x1 convolutions, `conv3x3`
    only the 3x3 ones, `attn` the attention projections (to_q, to_k, to_v, to_out.0), `all` both;
    `transformer` kohya-ss' LoRA, every Linear and Conv2d inside the transformer blocks (proj_in, proj_out, the
    attentions' q/k/v/out, ff.net.0.proj, ff.net.2), `locon` kohya-ss' LoCon (`conv_dim`), those and every Linear
    and Conv2d inside the resnets and down/upsamplers (conv1, conv2, time_emb_proj, conv_shortcut, the resamplers'
    conv): everything kohya-ss trains in the UNet but conv_in, conv_out and the time embedding; `full` LyCORIS'
    `full` preset, locon's and those (SDXL: add_embedding's linears too)."""
    chosen: set[str] = set()
    if family == "conv3x3":
        chosen.update(name for name, _ in named_convs(unet, {3}))
    if family in ("conv", "all"):
        chosen.update(name for name, _ in named_convs(unet, {3, 1}))
    if family in ("attn", "all"):
        chosen.update(attention_projections(unet))
    if family in ("transformer", "locon", "full"):
        chosen.update(layers_within(unet, KOHYA_TRANSFORMER_BLOCKS))
    if family in ("locon", "full"):
        chosen.update(layers_within(unet, KOHYA_CONV_BLOCKS))
    if family == "full":
        chosen.update(layers_within(unet, LYCORIS_FULL_BLOCKS))
        chosen.update(name for name, module in unet.named_modules()
                      if name in LYCORIS_FULL_NAMES and type(module) in (nn.Linear, nn.Conv2d))
    return [name for name, _ in unet.named_modules() if name in chosen]  # module order, stable


def layers_within(model: nn.Module, block_types: tuple[str, ...]) -> list[str]:
    """Every plain Linear and Conv2d inside a module whose class is named in `block_types` (kohya-ss matches
    blocks by class name, so do we: diffusers' classes move between modules)."""
    found = []
    for name, module in model.named_modules():
        if type(module).__name__ in block_types:
            found += [f"{name}.{child}" for child, layer in module.named_modules() if type(layer) in (nn.Linear, nn.Conv2d)]
    return found


def families_covering(unet: nn.Module, names: set[str]) -> list[str]:
    """The `targets` families whose layers include all of `names`, smallest first (the first: exactly `names`
    where a family is)."""
    covering = [(len(layers), family) for family in LAYER_FAMILIES
                if names <= set(layers := layer_family(unet, family))]
    return [family for _, family in sorted(covering, key=lambda pair: pair[0])]


def is_whole_number(value: Any) -> bool:
    """An int option's value: an int, and not a bool (which Python counts as one)."""
    return isinstance(value, int) and not isinstance(value, bool)


def dora_weight(weight: torch.Tensor, delta: torch.Tensor, magnitude: torch.Tensor) -> torch.Tensor:
    """DoRA's W' = m·(W + ΔW)/‖W + ΔW‖, the norm over each output channel (dimension 0), as peft computes it
    (`magnitude`: one value per output channel, in any shape that flattens to them)."""
    direction = weight + delta
    norm = direction.flatten(1).norm(dim=1)
    return direction * (magnitude.flatten() / norm).view(-1, *[1] * (weight.ndim - 1))


def exact_module_pattern(names: list[str], optional_prefix: str = "") -> str:
    """A peft `target_modules` pattern for exactly `names`: peft full-matches a string target against each
    module name, so exact names, no suffix matches; each may also stand under `optional_prefix`."""
    prefix = f"(?:{re.escape(optional_prefix)})?" if optional_prefix else ""
    return "^" + prefix + "(?:" + "|".join(re.escape(name) for name in names) + ")$"


def attention_projections(unet: nn.Module) -> list[str]:
    """Names of the q/k/v/out Linear layers of every attention, in module order."""
    return [name for name, _ in named_linears(unet, ATTENTION_PROJECTIONS)]


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


def layer_sample(module: nn.Module) -> torch.Tensor | None:
    """A fixed sample of a layer's weight (64 evenly spaced values), as float32 on the CPU (None: no weight)."""
    weight = getattr(module, "weight", None)
    if weight is None or weight.is_meta:
        return None
    flat = weight.detach().reshape(-1)
    return flat[sample_indices(flat.numel(), FINGERPRINT_SAMPLES).to(flat.device)].float().cpu()


def weight_sample(unet: nn.Module, names: list[str], base: bool = False) -> torch.Tensor:
    """A fixed sample of the named layers' weights, as float32; with `base`, of their weights before any
    sdtune merge changed them (`remember_base_samples`), so that adapters stack."""
    values = []
    for name in names:
        module = unet.get_submodule(name)
        sample = module.__dict__.get(BASE_SAMPLE) if base else None
        sample = layer_sample(module) if sample is None else sample
        if sample is not None:
            values.append(sample)
    return torch.cat(values) if values else torch.zeros(0, device="cpu")


def remember_base_samples(modules) -> None:
    """Before a merge changes these modules' weights for good: keep each one's sample of the weights it had
    before the first merge, which an adapter trained on the base model is checked against (`weight_sample`)."""
    for module in modules:
        if BASE_SAMPLE not in module.__dict__:
            sample = layer_sample(module)
            if sample is not None:
                module.__dict__[BASE_SAMPLE] = sample


def same_weights(expected: torch.Tensor, found: torch.Tensor, relative: float = 1e-2) -> bool:
    """Whether two weight samples come from the same model, up to a change of precision.

    bfloat16 keeps 8 significant bits (relative error up to 0.4 %); a different base model, even a
    fine-tuned one, moves most weights by far more.
    """
    if expected.shape != found.shape:
        return False
    scale = expected.square().mean().sqrt().item() if expected.numel() else 0.0
    return bool(((expected - found).abs() <= relative * expected.abs() + 1e-3 * scale).all())


# why a merge cannot be undone: what load_adapter(merge=True) and merge(keep_base=False) do, and what to do instead
ONE_WAY_MERGE = ("merged for good (load_adapter merges so, as merge(keep_base=False) does): there is nothing to unmerge to; "
                 "to unmerge later, bind it with sdtune.open_adapter and merge()")


def checked_scale(scale) -> float:
    """An adapter's strength as a float; anything but a finite number (True and False, and text such as "0.5",
    included) is refused."""
    try:
        value = float(scale)
    except (TypeError, ValueError):
        value = math.nan
    if isinstance(scale, (bool, str, bytes)) or not math.isfinite(value):
        raise SdtuneError(f"an adapter's scale must be a finite number, got {scale!r}")
    return value


def copy_parameters(modules: dict[str, nn.Module], device: str | None = None) -> dict[tuple[str, str], torch.Tensor]:
    """Copies of each module's own (not its children's) parameters, by (module name, parameter name)."""
    return {
        (name, attr): parameter.detach().to(device or parameter.device, copy=True)
        for name, module in modules.items()
        for attr, parameter in module.named_parameters(recurse=False)
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


def spatial_convs(model: nn.Module, names: list[str]) -> list[str]:
    """Those of the named modules that are Conv2d layers of a kernel over 1x1 (what kohya-ss' and LyCORIS' conv_dim
    takes: a 1x1 conv is a linear to them), in the order given."""
    found = []
    for name in names:
        module = model.get_submodule(name)
        module = getattr(module, "base_layer", module)  # a wrapper injected already: its base layer
        if isinstance(module, nn.Conv2d) and tuple(module.kernel_size) != (1, 1):
            found.append(name)
    return found
