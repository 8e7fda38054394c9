"""LoRA, LoHa and LoKr: low-rank, Hadamard and Kronecker weight updates, built on peft.

- LoRA: ΔW = (α/r)·B·A; on a k×k conv, A is a k×k conv down to r channels and B a 1×1 conv up.
  With `dora` (DoRA, Liu et al. 2024; peft's `use_dora`): W' = m·(W + (α/r)·B·A)/‖W + (α/r)·B·A‖, the
  norm and the trained magnitude m (starting at ‖W‖) per output channel; strength S gives W + S·(W' − W).
- LoHa: ΔW = (α/r)·(B1·A1) ⊙ (B2·A2), with `tucker` a CP/Tucker core per product on k×k convs.
- LoKr: ΔW = (α/r)·W1 ⊗ W2; each factor is full or low-rank (B·A) following LyCORIS' rules, the
  channel counts split by `factor` (-1: the divisor pair nearest the square root).

Why peft rather than lycoris-lora: peft implements all three on Linear and Conv2d (its LoHa and
LoKr are ports of LyCORIS' maths, factorisation and "use_effective_conv2d" = LyCORIS' tucker),
diffusers integrates with it, and its layers inject into any nn.Module and merge one by one. So
this module only chooses the layers, builds the peft config, and unwraps after merging; it
also gives the update in the formats other tools read (`kohya_tensors`: peft's tensors under
LyCORIS' names, which are the same maths; `diffusers_lora_layers` for LoRA).

Dropout (in training only): LoRA's `dropout` is peft's lora_dropout on each layer's input, its `rank_dropout` and
`module_dropout` kohya-ss' (networks.lora), added to peft's LoRA layers here (`_KohyaDropout`); LoHa's and
LoKr's `rank_dropout` and `module_dropout` are peft's ports of LyCORIS' (without either, their layers skip the
random draw peft makes anyway, so torch.compile traces them whole: `_EveryUpdate`). Injected layers take the
model's train/eval mode, so a pipeline loaded to sample never drops out.

Adapter tensors are saved under peft's adapter-name-free keys, `<module name>.<parameter>`
(for example `down_blocks.0.resnets.0.conv1.lora_A.weight` or `...to_q.hada_w1_a`).
The scale is always alpha/rank, as in peft (LyCORIS forces 1 when both LoKr factors are full);
with the default alpha = rank the two agree. `conv_rank` and `conv_alpha` (kohya-ss' and LyCORIS' conv_dim, conv_alpha)
give the 3x3 convolutions a rank and alpha of their own, through peft's rank_pattern and alpha_pattern; 1x1 ones keep
the rank, as in both. Left unset they are the rank and alpha, and the options, configs and files are as before them.

Targets: `conv` means the UNet's 3×3 and 1×1 convolutions, `conv3x3` only the 52 3×3
convolutions that the filter-atom method tunes, `attn` the to_q, to_k, to_v and to_out.0
projections of every attention, `all` the convolutions and the projections; `transformer` is kohya-ss'
LoRA layer set (every Linear and 1×1 conv of the transformer blocks: proj_in/out, attention, ff), `locon`
kohya-ss' LoCon (`conv_dim`: those and the resnets' and resamplers' layers) and `full` LyCORIS' `full` preset (those,
conv_in, conv_out and the time embedding, SDXL's added conditioning too: every Linear and Conv2d of the UNet, written
to kohya files as LyCORIS' network with `preset=full`), as `base.layer_family` says. With text encoders
(`--train-text-encoder`), the same layers go on their q/k/v/out projections and MLP linears, saved
under `text_encoder.<module>.<parameter>`.
"""

from __future__ import annotations

import json
import math
import re
from abc import abstractmethod
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..errors import SdtuneError, warn
from .base import (
    KOHYA_FAMILY_VARIANTS, LAYER_FAMILIES, TARGETS_HELP, WrappedLayers, dora_weight, exact_module_pattern, families_covering, is_whole_number,
    layer_family, spatial_convs,
)

ADAPTER = "sdtune"  # peft's adapter name; it never appears in saved keys

# peft's adapter tensor names (after `<module>.`) and their kohya/LyCORIS names
PEFT_TO_KOHYA = {
    "lora_A.weight": "lora_down.weight",
    "lora_B.weight": "lora_up.weight",
    **{name: name for name in ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2")},
    **{name: name for name in ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2")},
    "lora_magnitude_vector": "dora_scale",  # DoRA's magnitude: peft (1, out, 1, 1) or (out,), LyCORIS (out, 1, ...)
}


@dataclass
class LowRankOptions:
    rank: int = field(default=4, metadata={"help": "rank r"})
    # unset: alpha = rank, so the update's scale α/r is 1
    alpha: float | None = field(
        default=None, metadata={"help": "alpha; the update is scaled by alpha/rank", "default": "the rank"}
    )
    # kohya-ss' and LyCORIS' conv_dim/conv_alpha: LoCon's 3x3 convolutions at their own rank (1x1 ones, linear at heart,
    # keep --rank); unset: the rank and the alpha, as LyCORIS defaults them
    conv_rank: int | None = field(
        default=None, metadata={"help": "the rank of the 3x3 convolutions (kohya-ss' and LyCORIS' conv_dim); 1x1 convs and "
                                         "linears keep --rank", "default": "the rank"}
    )
    conv_alpha: float | None = field(
        default=None, metadata={"help": "the alpha of the 3x3 convolutions (kohya-ss' conv_alpha)", "default": "the alpha"}
    )
    # Both convolutions and attention by default: LoCon/LyCORIS practice for LoHa and LoKr,
    # and the layers the filter-atom comparison tunes (its convs) plus the usual LoRA ones.
    targets: str = field(
        default="all", metadata={"help": TARGETS_HELP}
    )


@dataclass
class LoraOptions(LowRankOptions):
    dropout: float = field(
        default=0.0, metadata={"help": "peft's lora_dropout: drop each LoRA layer's input features with this probability, in training only"}
    )
    dora: bool = field(
        default=False, metadata={"help": "DoRA: also train a magnitude per output channel of the normalised W + ΔW"}
    )
    loraplus_lr_ratio: float = field(
        default=1.0, metadata={"help": "LoRA+: the B (up) matrices learn at this times --lr (16 in the paper; 1: plain LoRA)"}
    )
    rank_dropout: float = field(
        default=0.0,
        metadata={"help": "drop each of the r features after lora_down with this probability, the update scaled by "
                          "1/(1-p), in training only (kohya-ss' rank_dropout; not with --dora)"},
    )
    module_dropout: float = field(
        default=0.0, metadata={"help": "skip a layer's whole update with this probability, in training only (kohya-ss' module_dropout)"}
    )


@dataclass
class LycorisOptions(LowRankOptions):
    """LoHa's and LoKr's dropouts, peft's (ports of LyCORIS'); in training only."""

    rank_dropout: float = field(
        default=0.0, metadata={"help": "drop each output channel of ΔW with this probability (LyCORIS' rank_dropout)"}
    )
    module_dropout: float = field(
        default=0.0, metadata={"help": "skip a layer's whole update with this probability (LyCORIS' module_dropout)"}
    )


# the options that act in training only, and their flags
DROPOUT_FLAGS = {"dropout": "--lora-dropout", "rank_dropout": "--rank-dropout", "module_dropout": "--module-dropout"}


@dataclass
class LohaOptions(LycorisOptions):
    tucker: bool = field(default=False, metadata={"help": "Tucker-decompose 3x3 conv updates"})


@dataclass
class LokrOptions(LycorisOptions):
    factor: int = field(default=-1, metadata={"help": "Kronecker factor size, -1 for automatic"})
    decompose_both: bool = field(default=False, metadata={"help": "also make the first Kronecker factor low-rank"})
    tucker: bool = field(default=False, metadata={"help": "Tucker-decompose 3x3 conv updates"})


def split_peft_key(key: str) -> tuple[str, str]:
    """(`down_blocks.0.resnets.0.conv1`, `lora_A.weight`) from a peft adapter key."""
    for suffix in PEFT_TO_KOHYA:
        if key.endswith("." + suffix):
            return key[: -len(suffix) - 1], suffix
    raise SdtuneError(f"unexpected tensor {key!r} in a low-rank adapter")


def _group_by_module(tensors: dict[str, Any]) -> dict[str, dict[str, Any]]:
    groups: dict[str, dict[str, Any]] = {}
    for key, tensor in tensors.items():
        module, suffix = split_peft_key(key)
        groups.setdefault(module, {})[suffix] = tensor
    return groups


KOHYA_TO_PEFT = {kohya: peft for peft, kohya in PEFT_TO_KOHYA.items()}
# a kohya module's tensors that hold its rank r first (the low-rank "down" or "b" factors), by update kind
RANK_TENSORS = {"lora": ("lora_down.weight",), "loha": ("hada_w1_b",), "lokr": ("lokr_w1_b", "lokr_w2_b")}


def _kohya_spatial(parts: dict[str, tuple[int, ...]]) -> bool | None:
    """Whether a kohya module's tensors sit on a 3x3 convolution, where their shapes tell (None where not: LoHa's and
    LoKr's low-rank factors flatten the kernel): Tucker cores sit only on such convs, LoRA's lora_down and LoKr's full w2
    hold the kernel."""
    if "lora_mid.weight" in parts or "hada_t1" in parts or "lokr_t2" in parts:
        return True
    kernels = [parts[name][2:] for name in ("lora_down.weight", "lokr_w2") if name in parts and len(parts[name]) == 4]
    if "lora_down.weight" in parts or kernels:
        return any(tuple(kernel) != (1, 1) for kernel in kernels)
    return None


def _kohya_convs(scales: dict[str, tuple[int, float]], shapes: dict[str, dict[str, tuple[int, ...]]],
                 network_args: dict[str, str]) -> list[str]:
    """The modules of a kohya file whose update sits on a 3x3 convolution, where its modules differ in (rank, alpha)
    (`scales`): told by the tensors where they say (LoRA's lora_down holds the kernel, Tucker cores sit only on such
    convs, LoKr's full w2 holds it), by ss_network_args' conv_dim and conv_alpha otherwise (LoHa's and LoKr's
    low-rank factors flatten the kernel); refused where neither tells."""
    conv_scale = None
    if str(network_args.get("conv_dim", "")).isdigit():
        try:
            conv_alpha = float(network_args.get("conv_alpha", network_args["conv_dim"]))
        except ValueError:
            conv_alpha = None
        conv_scale = (int(network_args["conv_dim"]), conv_alpha)
    convs = []
    for module in scales:
        spatial = _kohya_spatial(shapes[module])
        if spatial is None and conv_scale is not None:
            spatial = scales[module] == conv_scale if conv_scale[1] is not None else scales[module][0] == conv_scale[0]
        elif spatial is None:
            raise SdtuneError("the file's modules differ in rank or alpha, and neither its tensors nor its ss_network_args' "
                              "conv_dim say which are 3x3 convs (sdtune holds one rank and alpha for those, one for the rest)")
        if spatial:
            convs.append(module)
    if not convs or len(convs) == len(scales):
        ranks = sorted({rank for rank, _ in scales.values()})
        what = f"ranks {', '.join(map(str, ranks))}" if len(ranks) > 1 else \
            f"alphas {', '.join(f'{a:g}' for a in sorted({alpha for _, alpha in scales.values()}))}"
        raise SdtuneError(f"the file's {'3x3 convs' if convs else 'modules'} have {what}; sdtune trains one rank and alpha "
                          "for the linears and 1x1 convs and one (--conv-rank, --conv-alpha) for the 3x3 convs")
    return convs


class _PeftLowRank(WrappedLayers):
    """What LoRA, LoHa and LoKr share: target choice, peft injection, state, merge."""

    default_lr = 1e-4  # the usual SD LoRA rate with alpha = rank (scale 1); LoHa's measured pick (LoRA, LoKr: 3e-5)
    export_formats = ("kohya", "peft")
    trains_text_encoder = True  # the same peft layers on the text encoder's attention and MLP linears
    training_only_options = ("dropout", "rank_dropout", "module_dropout", "loraplus_lr_ratio")
    kohya_kind: str  # the kohya/LyCORIS update kind this method holds exactly (kohya.KOHYA_KINDS' name)

    @property
    def update_reads_weights(self) -> bool:
        # B·A (or its LoHa/LoKr product) is the same on any weights; DoRA normalises W + B·A
        return bool(getattr(self.options, "dora", False))

    @classmethod
    def kohya_init_options(cls, kinds: set[str], shapes: dict[str, dict[str, tuple[int, ...]]],
                           alphas: dict[str, float], network_args: dict[str, str]) -> dict[str, Any]:
        """rank from the factors' shapes (kohya-ss' --dim_from_weights), alpha from `.alpha` (none: the rank, scale
        1), the 3x3 convs' own (LoCon's conv_dim, conv_alpha) as conv_rank and conv_alpha, tucker from the cores; refuses
        other kinds and a file whose linears (or whose 3x3 convs) differ in rank or alpha among themselves."""
        if kinds - {"dora"} != {cls.kohya_kind}:
            raise SdtuneError(f"method {cls.name!r} holds kohya {cls.kohya_kind} updates exactly; this file holds "
                              f"{', '.join(sorted(kinds))} updates (start from it with the method of that kind)")
        # (rank, alpha) of each module whose rank scales it (a LoKr module with both factors full has scale 1); no
        # .alpha: the rank, scale 1
        scales = {module: (rank, alphas.get(module, float(rank))) for module, parts in shapes.items()
                  for rank in [next((parts[name][0] for name in RANK_TENSORS[cls.kohya_kind] if name in parts), None)]
                  if rank is not None}
        options: dict[str, Any] = {}
        if len(set(scales.values())) > 1:  # LoCon's conv_dim/conv_alpha, or a file sdtune cannot hold
            convs = _kohya_convs(scales, shapes, network_args)
            for what, members in (("linears and 1x1 convs", [m for m in scales if m not in convs]), ("3x3 convs", convs)):
                ranks = sorted({scales[m][0] for m in members})
                if len(ranks) > 1:
                    raise SdtuneError(f"the file's {what} have ranks {', '.join(map(str, ranks))}; {cls.name} trains one "
                                      "rank for all of them (and one, --conv-rank, for the 3x3 convs)")
                found = sorted({scales[m][1] for m in members})
                if len(found) > 1:
                    raise SdtuneError(f"the file's {what} have alphas {', '.join(f'{a:g}' for a in found)}; {cls.name} "
                                      "trains one alpha for all of them (and one, --conv-alpha, for the 3x3 convs)")
            options["rank"], options["alpha"] = scales[next(m for m in scales if m not in convs)]
            options["conv_rank"], options["conv_alpha"] = scales[convs[0]]
        elif scales:
            options["rank"], options["alpha"] = next(iter(scales.values()))
            if "conv_dim" in network_args or any(_kohya_spatial(parts) for parts in shapes.values()):
                # its 3x3 convs at the one rank: a run's other --conv-rank would not hold them
                options["conv_rank"], options["conv_alpha"] = options["rank"], options["alpha"]
        options.update(cls._kohya_structure(kinds, shapes, network_args))
        return options

    @classmethod
    def kohya_layer_options(cls, unet: nn.Module, modules: set[str]) -> dict[str, Any]:
        """The smallest family that holds every module: the file's own set where a family is exactly it, and for a
        file that leaves some of a family's layers out (kohya-ss' block-wise dims of 0) the family it was cut from."""
        covering = families_covering(unet, modules)
        return {"targets": covering[0]} if covering else {}

    @classmethod
    def _kohya_structure(cls, kinds: set[str], shapes: dict[str, dict[str, tuple[int, ...]]],
                         network_args: dict[str, str]) -> dict[str, Any]:
        """The options besides rank and alpha that a file's tensors call for (the cores: tucker)."""
        if "dora" in kinds:
            raise SdtuneError(f"method {cls.name!r} cannot hold DoRA's dora_scale; only lora --dora can")
        return {"tucker": any(name in parts for parts in shapes.values() for name in ("hada_t1", "lokr_t2"))}

    def state_from_kohya(self, modules: dict[str, dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """peft's names of the file's tensors (the inverse of `kohya_tensors`); untouched targets keep their start."""
        state = {key: tensor.detach().clone() for key, tensor in self.state_dict().items()}
        outside = sorted(set(modules) - set(self.layers))
        if outside:
            unet_modules = {name for name in modules if name.split(".", 1)[0] not in self.text_encoders}
            self._refuse_modules_outside(plain_copy(self.unet), unet_modules, outside)
        for module, parts in modules.items():
            parts = self._factors_from_kohya(module, {KOHYA_TO_PEFT[suffix]: tensor for suffix, tensor in parts.items() if suffix != "alpha"})
            for suffix, tensor in parts.items():
                key = f"{module}.{suffix}"
                if key not in state:
                    raise SdtuneError(f"{module}: the file's {PEFT_TO_KOHYA[suffix]} has no place in {self.describe()}")
                own = state[key]
                if suffix == "lora_magnitude_vector" and tensor.numel() == own.numel() and tensor.shape[0] == own.numel():
                    tensor = tensor.reshape(own.shape)  # LyCORIS' (out, 1, …) per output channel, peft's (out,)
                state[key] = tensor.to(own.dtype)
        return state

    def check_kohya_unet_modules(self, unet: nn.Module, modules: set[str]) -> None:
        outside = sorted(set(modules) - set(self.find_targets(unet)))
        if outside:
            self._refuse_modules_outside(unet, modules, outside)

    def _refuse_modules_outside(self, unet: nn.Module, unet_modules: set[str], outside: list[str]) -> None:
        """The file's modules `outside` the run's targets: name the families that would hold its UNet modules."""
        covering = families_covering(unet, unet_modules)
        fix = f"--targets {' or '.join(covering)}" if covering else "--targets of those layers (none of sdtune's covers them all)"
        raise SdtuneError(f"the file changes {len(outside)} module(s) that {self.name} --targets {self.options.targets} does not "
                          f"tune ({outside[0]}, …): start with {fix}")

    def _factors_from_kohya(self, module: str, parts: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """One module's tensors from LyCORIS' maths to peft's (the same, but for LoKr's full factors)."""
        return parts

    def validate_options(self) -> None:
        o = self.options
        if not is_whole_number(o.rank) or o.rank < 1:
            raise SdtuneError(f"--rank must be a whole number of at least 1, got {o.rank!r}")
        if o.alpha is None:
            o.alpha = float(o.rank)
        elif isinstance(o.alpha, bool) or not isinstance(o.alpha, (int, float)) or not 0 < o.alpha < math.inf:
            raise SdtuneError(f"--alpha must be a positive number (and finite), got {o.alpha!r}")
        o.alpha = float(o.alpha)
        if o.conv_rank is None:
            o.conv_rank = o.rank
        elif not is_whole_number(o.conv_rank) or o.conv_rank < 1:
            raise SdtuneError(f"--conv-rank must be a whole number of at least 1, got {o.conv_rank!r}")
        if o.conv_alpha is None:
            o.conv_alpha = o.alpha
        elif isinstance(o.conv_alpha, bool) or not isinstance(o.conv_alpha, (int, float)) or not 0 < o.conv_alpha < math.inf:
            raise SdtuneError(f"--conv-alpha must be a positive number (and finite), got {o.conv_alpha!r}")
        o.conv_alpha = float(o.conv_alpha)
        if o.targets not in LAYER_FAMILIES:
            raise SdtuneError(f"--targets {o.targets!r} is not available; choose: {', '.join(LAYER_FAMILIES)}")
        for flag in ("tucker", "decompose_both", "dora"):
            if hasattr(o, flag) and not isinstance(getattr(o, flag), bool):
                raise SdtuneError(f"--{flag.replace('_', '-')} must be true or false, got {getattr(o, flag)!r}")
        for name, flag in DROPOUT_FLAGS.items():
            if hasattr(o, name):
                p = getattr(o, name)
                if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0 <= p < 1:
                    raise SdtuneError(f"{flag} must be a probability in [0, 1), got {p!r}")
                setattr(o, name, float(p))

    def options_dict(self) -> dict[str, Any]:
        options = super().options_dict()
        for name in DROPOUT_FLAGS:
            if options.get(name) == 0:
                del options[name]  # adapters trained without dropout keep the bytes they had before it
        if not self.own_conv_scale:
            del options["conv_rank"], options["conv_alpha"]  # and those of one rank for all, the bytes before conv_rank
        return options

    def changed_options(self, options: dict[str, Any] | None = None) -> dict[str, Any]:
        options = self.options_dict() if options is None else options
        # the user reads alpha's default as the rank, conv_rank's as the rank and conv_alpha's as the alpha: a value
        # that follows them was not changed, even where the file writes it down
        follows = {"alpha": options.get("rank"), "conv_rank": options.get("rank"), "conv_alpha": options.get("alpha")}
        return {key: value for key, value in super().changed_options(options).items()
                if key not in follows or value != follows[key]}

    @property
    def own_conv_scale(self) -> bool:
        """Whether the 3x3 convolutions train at a rank or alpha of their own (LoCon's conv_dim, conv_alpha)."""
        o = self.options
        return (o.conv_rank, o.conv_alpha) != (o.rank, o.alpha)

    def layer_rank_alpha(self, module: str) -> tuple[int, float]:
        """(rank, alpha) of one tuned module: the conv ones for a 3x3 convolution, else the rank and alpha."""
        o = self.options
        return (o.conv_rank, o.conv_alpha) if module in self.spatial_convs() else (o.rank, o.alpha)

    def spatial_convs(self) -> set[str]:
        """The tuned modules that are convolutions of a kernel over 1x1, which take conv_rank and conv_alpha (kohya-ss
        and LyCORIS treat a 1x1 conv as a linear): read off the UNet at injection, or (`read_base_layers`) off its
        architecture for an adapter's tensors alone; empty where every layer takes one rank and alpha."""
        if not self.own_conv_scale:
            return set()
        if self._spatial_convs is None:
            raise SdtuneError(f"{self.name} with conv_rank/conv_alpha of their own: which layers are 3x3 convolutions is read "
                              "from the base model's UNet config, which could not be read; name the base model with --model")
        return self._spatial_convs

    _spatial_convs: set[str] | None = None

    @property
    def needs_base_layers(self) -> bool:
        return self.own_conv_scale and self._spatial_convs is None

    def read_base_layers(self, unet: nn.Module) -> None:
        self._spatial_convs = set(spatial_convs(unet, self.find_targets(unet)))

    def find_targets(self, unet: nn.Module) -> list[str]:
        return layer_family(unet, self.options.targets)

    @abstractmethod
    def to_peft_config(self, module_names: list[str]):
        """The peft config that wraps exactly `module_names`."""

    def _inject(self, unet: nn.Module, targets: list[str]) -> None:
        self.peft_configs: dict[str, Any] = {}  # inject_adapter_in_model's record per model; a merged one goes without
        self._spatial_convs = set(spatial_convs(unet, targets))
        if self.own_conv_scale and not self._spatial_convs:
            # LyCORIS ignores conv_dim where its preset holds no such conv (kohya-ss' LoRA always adds them): so here
            warn(f"--conv-rank/--conv-alpha: {self.name} --targets {self.options.targets} tunes no 3x3 convolution, so they "
                 "change nothing (every layer trains at --rank and --alpha)")
        self._inject_peft(unet, "", targets)

    def _conv_patterns(self, module_names: list[str]) -> dict[str, Any]:
        """peft's rank_pattern and alpha_pattern giving `module_names`' 3x3 convolutions conv_rank and conv_alpha (none
        where every layer takes the rank and alpha: configs as before conv_rank). peft matches a pattern key at the end of
        a module's name after a dot; the one key here is the exact names."""
        convs = [name for name in module_names if name in self.spatial_convs()]
        if not convs:
            return {}
        key = "(?:" + "|".join(re.escape(name) for name in convs) + ")"
        return {"rank_pattern": {key: self.options.conv_rank}, "alpha_pattern": {key: self.options.conv_alpha}}

    def _inject_text_encoder(self, text_encoder: nn.Module, prefix: str, targets: list[str]) -> None:
        self._inject_peft(text_encoder, prefix, targets)

    def _inject_peft(self, model: nn.Module, prefix: str, targets: list[str]) -> None:
        """peft's layers on `model`'s `targets`, registered under `<prefix>.<name>` (the UNet's: `<name>`)."""
        from peft import inject_adapter_in_model

        inject_adapter_in_model(self.to_peft_config(targets), model, adapter_name=ADAPTER)
        self.peft_configs[prefix] = model.peft_config
        layers = {f"{prefix}.{name}" if prefix else name: model.get_submodule(name) for name in targets}
        for layer in layers.values():  # new modules start in training mode: a model loaded to sample must not drop out
            layer.train(model.training)
        missed = [name for name, layer in layers.items() if not hasattr(layer, "get_base_layer")]
        if missed:
            raise RuntimeError(f"{self.name}: peft did not wrap {missed[:3]}")
        self.layers.update(layers)

    def _peft_models(self) -> dict[str, nn.Module]:
        """The models peft wrapped, by prefix ("" for the UNet)."""
        return {"": self.unet, **self.text_encoders}

    # peft's layers: the base layer, ΔW with peft's scaling (alpha/rank times the strength), its set_scale
    def layer_base(self, layer: nn.Module) -> nn.Module:
        return layer.get_base_layer()

    def layer_delta(self, layer: nn.Module) -> torch.Tensor:
        # what peft's own merge adds to the weight
        return layer.get_delta_weight(ADAPTER)

    def set_layer_scale(self, layer: nn.Module, scale: float) -> None:
        layer.set_scale(ADAPTER, scale)

    def layer_parameters(self, layer: nn.Module) -> list[nn.Parameter]:
        parameters = []
        for key, parameter in layer.named_parameters():
            attr, adapter = (key.split(".") + [""])[:2]  # e.g. "lora_A.sdtune.weight", "hada_w1_a.sdtune"
            if attr in layer.adapter_layer_names and adapter == ADAPTER:
                parameters.append(parameter)
        return parameters

    def state_dict(self) -> dict[str, torch.Tensor]:
        """peft's adapter-name-free keys; the tensors are views of the parameters, so the shared
        `load_state_dict` copies into them."""
        from peft import get_peft_model_state_dict

        if self.merged:
            return {}
        state = {}
        for prefix, model in self._peft_models().items():
            own = get_peft_model_state_dict(model, adapter_name=ADAPTER, save_embedding_layers=False)
            state.update({f"{prefix}.{key}" if prefix else key: tensor for key, tensor in own.items()})
        return state

    def _put_back_bases(self) -> None:
        super()._put_back_bases()
        for model in self._peft_models().values():
            if hasattr(model, "peft_config"):
                del model.peft_config  # the merged model is plain

    def _unmerge(self) -> None:
        super()._unmerge()
        for prefix, model in self._peft_models().items():
            model.peft_config = self.peft_configs[prefix]

    def kohya_tensors(self, tensors: dict[str, torch.Tensor]) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, str]]:
        """peft's tensors under their LyCORIS names, plus `alpha`, per module; kohya-ss' network metadata."""
        rank, alpha = self.options.rank, float(self.options.alpha)
        modules: dict[str, dict[str, torch.Tensor]] = {}
        for module, parts in _group_by_module(tensors).items():
            own = {PEFT_TO_KOHYA[suffix]: tensor for suffix, tensor in self._kohya_factors(module, parts).items()}
            modules[module] = {**own, "alpha": torch.tensor(float(self.layer_rank_alpha(module)[1]), dtype=torch.float32)}
        network, args = self._kohya_network()
        if self.options.targets == "full":  # LyCORIS' preset, as LyCORIS records it: kohya-ss' networks.lora loads no
            network, args = "lycoris.kohya", {"algo": self.name, **args, "preset": "full"}  # conv_in, conv_out, time embedding
        # kohya-ss' conv_dim: LoRA on the 3×3 convolutions (a 1×1 one, such as SD 1.x's proj_in, is its plain LoRA)
        if self.own_conv_scale:
            if any(module in self.spatial_convs() for module in modules):
                args.update(conv_dim=str(self.options.conv_rank), conv_alpha=f"{self.options.conv_alpha:g}")
        elif any(tensor.ndim == 4 and tensor.shape[-1] > 1 for tensor in tensors.values()):
            args.update(conv_dim=str(rank), conv_alpha=f"{alpha:g}")
        metadata = {
            "ss_network_module": network,
            "ss_network_dim": str(rank),
            "ss_network_alpha": f"{alpha:g}",
            "ss_network_args": json.dumps(args),
        }
        if getattr(self.options, "dropout", 0):  # kohya-ss' --network_dropout, where it writes it
            metadata["ss_network_dropout"] = f"{self.options.dropout:g}"
        return modules, metadata

    def _kohya_factors(self, module: str, parts: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """One module's peft tensors as LyCORIS' maths wants them (the same, but for LoKr's full factors)."""
        return parts

    def _kohya_network(self) -> tuple[str, dict[str, str]]:
        """kohya-ss' network module for this method and its args (LyCORIS' for LoHa and LoKr)."""
        args = {"algo": self.name}
        if self.options.tucker:
            args["use_tucker"] = "True"
        for name in ("rank_dropout", "module_dropout"):  # LyCORIS' network args, as kohya-ss passes them on
            if getattr(self.options, name):
                args[name] = f"{getattr(self.options, name):g}"
        return "lycoris.kohya", args


def plain_copy(unet: nn.Module) -> nn.Module:
    """The UNet's architecture without weights (meta device) and without the wrappers injected into it: the layer
    families are found on plain Linear and Conv2d layers."""
    with torch.device("meta"):
        return type(unet).from_config(unet.config)


def _lycoris_merge_warning(method) -> str:
    o = method.options
    # the 3x3 convs' own pair where only it differs: named so, since alpha = rank alone would not avoid it
    rank, alpha, kind, cure = ((o.rank, o.alpha, "", "alpha = rank (the default)") if o.alpha != o.rank else
                               (o.conv_rank, o.conv_alpha, "conv ", "conv alpha = conv rank"))
    return (f"{method.name} with {kind}alpha {alpha:g} ≠ {kind}rank {rank}: LyCORIS (lycoris-lora 4.1.3) applies alpha/rank "
            f"twice when it merges this file (merge_to, get_diff_weight; its forward pass is right); ComfyUI and sdtune "
            f"read it right, and {cure} avoids it")


MERGE_CHUNK_ELEMENTS = 1 << 20  # LoHa's and LoKr's in-place merges form ΔW a few MB of the weight at a time


def _plain_merge_target(layer: nn.Module, factors: list[torch.Tensor]) -> torch.Tensor | None:
    """The base weight, where an in-place merge applies: factors and weight in one dtype (not half precision on a
    CPU, where peft computes in fp32), an ungrouped layer, a contiguous weight."""
    weight = layer.get_base_layer().weight
    if getattr(layer.get_base_layer(), "groups", 1) != 1 or not weight.is_contiguous():
        return None
    if any(factor.dtype != weight.dtype for factor in factors):
        return None
    if weight.device.type == "cpu" and weight.dtype in (torch.float16, torch.bfloat16):
        return None
    return weight


@torch.no_grad()
def add_loha_in_place(layer: nn.Module) -> bool:
    """W += scale·(w1a·w1b) ⊙ (w2a·w2b), a few output channels at a time: peft's ΔW (LyCORIS' `HadaWeight`)
    without forming it whole beside W. False, with W untouched, for Tucker factors or where `_plain_merge_target`
    says no."""
    names = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")
    if any(ADAPTER not in getattr(layer, name, {}) for name in names) or ADAPTER in getattr(layer, "hada_t1", {}):
        return False
    w1a, w1b, w2a, w2b = (getattr(layer, name)[ADAPTER] for name in names)
    weight = _plain_merge_target(layer, [w1a, w1b, w2a, w2b])
    if weight is None or w1b.shape[1] * w1a.shape[0] != weight.numel():
        return False
    rows = weight.view(w1a.shape[0], -1)
    step = max(1, MERGE_CHUNK_ELEMENTS // rows.shape[1])
    for start in range(0, rows.shape[0], step):
        part = slice(start, start + step)
        update = w1a[part] @ w1b
        update *= w2a[part] @ w2b
        rows[part].add_(update, alpha=layer.scaling[ADAPTER])
    return True


def _kronecker_factor(layer: nn.Module, name: str) -> torch.Tensor | None:
    """LoKr's factor `name` (lokr_w1, lokr_w2): the full matrix, or its low-rank product `name`_a·`name`_b."""
    if ADAPTER in getattr(layer, name, {}):
        return getattr(layer, name)[ADAPTER]
    if ADAPTER in getattr(layer, f"{name}_a", {}):
        return getattr(layer, f"{name}_a")[ADAPTER] @ getattr(layer, f"{name}_b")[ADAPTER]
    return None


@torch.no_grad()
def add_lokr_in_place(layer: nn.Module) -> bool:
    """W += scale·(w1 ⊗ w2), one row of w1 at a time: peft's ΔW (`make_kron`) without forming the Kronecker product
    whole beside W. False, with W untouched, for Tucker factors or where `_plain_merge_target` says no."""
    if ADAPTER in getattr(layer, "lokr_t2", {}):
        return False
    w1, w2 = _kronecker_factor(layer, "lokr_w1"), _kronecker_factor(layer, "lokr_w2")
    if w1 is None or w2 is None:
        return False
    weight = _plain_merge_target(layer, [w1, w2])
    if weight is None or w1.dim() != 2 or w1.numel() * w2.numel() != weight.numel():
        return False
    # kron(w1, w2)[i·c + j, k·d + l, ...] = w1[i, k]·w2[j, l, ...]: W seen as (a, c, b, d, ...) takes w1's rows in turn
    # (w2 is (c, d, kh, kw), or (c, d·kh·kw) for a convolution whose w2 is low-rank: peft reshapes the product)
    (a, b), c, rest = w1.shape, w2.shape[0], w2.shape[1:]
    if weight.shape[0] != a * c:
        return False
    blocks = weight.view(a, c, b, *rest)
    w2 = w2.unsqueeze(1)  # (c, 1, ...): broadcast over w1's columns
    scale = layer.scaling[ADAPTER]
    for row in range(a):
        blocks[row].add_(w1[row].view(1, b, *[1] * len(rest)) * w2, alpha=scale)
    return True


@torch.no_grad()
def add_lora_in_place(layer: nn.Module) -> bool:
    """W += scaling·B·A as one GEMM accumulating into W: what peft's merge adds, without forming ΔW beside W (peft
    forms a 3×3 convolution's ΔW as a convolution, transposed in memory, so the addition is strided too). False,
    with W untouched, where peft's own form is needed: half precision on a CPU, grouped convolutions, a bias on
    B, a transposed (Conv1D) weight, mixed dtypes."""
    if ADAPTER not in getattr(layer, "lora_A", {}) or getattr(layer, "fan_in_fan_out", False):
        return False
    if getattr(layer, "lora_bias", {}).get(ADAPTER, False):
        return False
    down, up = layer.lora_A[ADAPTER].weight, layer.lora_B[ADAPTER].weight
    weight = _plain_merge_target(layer, [down, up])
    if weight is None or (up.dim() == 4 and up.shape[2:] != (1, 1)):
        return False
    rows = weight.view(weight.shape[0], -1)
    rows.addmm_(up.reshape(up.shape[0], -1), down.reshape(down.shape[0], -1), alpha=layer.scaling[ADAPTER])
    return True


class Lora(_PeftLowRank):
    name = "lora"
    summary = "LoRA: low-rank update ΔW = B·A on convs and attention projections (peft)"
    Options = LoraOptions
    variants = ({}, {"targets": "conv"}, {"targets": "conv3x3"}, {"targets": "attn"}, *KOHYA_FAMILY_VARIANTS,
                {"rank": 16}, {"dora": True},
                # kohya-ss' common LoCon: network_dim 32, network_alpha 16, conv_dim 8, conv_alpha 4
                {"targets": "locon", "rank": 32, "alpha": 16.0, "conv_rank": 8, "conv_alpha": 4.0})
    export_formats = ("kohya", "diffusers", "peft")
    default_lr = 3e-5  # measured: sweeps/digits-lr.toml over seeds 0-2 (benchmarks/RESULTS.md): 1e-4 lost 28 points of preservation
    kohya_kind = "lora"

    @classmethod
    def _kohya_structure(cls, kinds, shapes, network_args) -> dict[str, Any]:
        if any("lora_mid.weight" in parts for parts in shapes.values()):
            raise SdtuneError("the file's LoRA has Tucker cores (lora_mid), which peft's LoRA has no place for")
        return {"dora": True} if "dora" in kinds else {}

    def to_peft_config(self, module_names: list[str]):
        from peft import LoraConfig

        return LoraConfig(
            r=self.options.rank, lora_alpha=self.options.alpha, **self._conv_patterns(module_names),
            target_modules=exact_module_pattern(module_names),
            lora_dropout=self.options.dropout, use_dora=self.options.dora,
        )

    def options_dict(self) -> dict[str, Any]:
        options = super().options_dict()
        if not options["dora"]:
            del options["dora"]  # plain LoRA adapters keep the bytes they had before DoRA
        if options["loraplus_lr_ratio"] == 1.0:
            del options["loraplus_lr_ratio"]  # and before LoRA+
        return options

    def validate_options(self) -> None:
        super().validate_options()
        ratio = self.options.loraplus_lr_ratio
        if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 < ratio < math.inf:
            raise SdtuneError(f"--loraplus-lr-ratio must be a positive number (and finite), got {ratio!r}")
        self.options.loraplus_lr_ratio = float(ratio)
        if self.options.dora and self.options.rank_dropout:
            # peft's DoRA layer normalises W + ΔW as a whole weight: there are no rank features in its forward to drop
            raise SdtuneError("--rank-dropout does not apply with --dora (DoRA's update is one normalised weight, with no "
                              "rank features to drop); --module-dropout and --lora-dropout do")

    # LoRA+ (Hayou et al. 2024, "LoRA+: Efficient Low Rank Adaptation of Large Models"): B starts at zero and
    # must move further than A, so it learns at λ times the rate, as peft's create_loraplus_optimizer and
    # kohya-ss' loraplus_lr_ratio set it up; DoRA's magnitudes keep the plain rate.
    def learning_rate_factors(self) -> list[tuple[list[nn.Parameter], float]]:
        ratio = self.options.loraplus_lr_ratio
        if ratio == 1.0:
            return super().learning_rate_factors()
        plain, faster = [], []
        for layer in self.layers.values():
            for key, parameter in layer.named_parameters():
                if key.startswith("lora_B.") and key.split(".")[1] == ADAPTER:
                    faster.append(parameter)
                elif key.split(".")[0] in layer.adapter_layer_names and key.split(".")[1] == ADAPTER:
                    plain.append(parameter)
        return [(plain, 1.0), (faster, ratio)]

    # DoRA's strength. peft's own scale multiplies (α/r)·B·A inside the norm, so at 0 it gives m·W/‖W‖, not
    # W. Here peft's scale stays at training's and the strength S multiplies what the DoRA module adds
    # to the base layer's output, (W' − W)·x: the layer computes with W + S·(W' − W), as ComfyUI's strength.
    def _inject_peft(self, model: nn.Module, prefix: str, targets: list[str]) -> None:
        super()._inject_peft(model, prefix, targets)
        if self.options.dora:
            for name in targets:
                dora = model.get_submodule(name).lora_magnitude_vector[ADAPTER]
                dora.sdtune_strength = 1.0
                dora.register_forward_hook(_dora_strength_hook)
        if self.options.rank_dropout or self.options.module_dropout:
            for name in targets:
                layer = model.get_submodule(name)
                layer.__class__ = _with_kohya_dropout(type(layer))
                layer.sdtune_rank_dropout = self.options.rank_dropout
                layer.sdtune_module_dropout = self.options.module_dropout

    def set_layer_scale(self, layer: nn.Module, scale: float) -> None:
        if self.options.dora:
            layer.lora_magnitude_vector[ADAPTER].sdtune_strength = scale
        else:
            super().set_layer_scale(layer, scale)

    def merge_layer(self, layer: nn.Module) -> None:
        if self.options.dora or not add_lora_in_place(layer):
            super().merge_layer(layer)

    def layer_delta(self, layer: nn.Module) -> torch.Tensor:
        if not self.options.dora:
            return super().layer_delta(layer)
        base = layer.get_base_layer().weight
        dora = layer.lora_magnitude_vector[ADAPTER]
        weight = dora_weight(base.float(), layer.get_delta_weight(ADAPTER).float(), dora.weight.float())
        return ((weight - base.float()) * dora.sdtune_strength).to(base.dtype)

    def _kohya_factors(self, module: str, parts: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if "lora_magnitude_vector" in parts:
            # LyCORIS' dora_scale with wd_on_out: one value per output channel, shaped to broadcast over W
            ndim = parts["lora_A.weight"].ndim
            magnitude = parts["lora_magnitude_vector"]
            parts = {**parts, "lora_magnitude_vector": magnitude.reshape(-1, *[1] * (ndim - 1))}
        return parts

    def _kohya_network(self) -> tuple[str, dict[str, str]]:
        # kohya-ss' own LoRA, or LyCORIS' for DoRA (kohya-ss' has none), the norm per output channel; both take the
        # dropouts as network args, strings as kohya-ss passes them on
        network, args = ("networks.lora", {}) if not self.options.dora else (
            "lycoris.kohya", {"algo": "lora", "dora_wd": "True", "wd_on_output": "True"})
        for name in ("rank_dropout", "module_dropout"):
            if getattr(self.options, name):
                args[name] = f"{getattr(self.options, name):g}"
        return network, args

    def export_warnings(self, format: str, tensors: dict[str, torch.Tensor]) -> list[str]:
        if format == "kohya" and self.options.dora:
            return ["DoRA in a kohya file: LyCORIS and sdtune read it exactly; ComfyUI (through v0.3.77) and Forge divide "
                    "this per-output-channel dora_scale by the base weight's norm ‖W‖ where DoRA divides by ‖W + ΔW‖, so "
                    "their update is slightly off; AUTOMATIC1111 takes dora_scale per input channel and misreads it"]
        return []

    def diffusers_lora_layers(self, tensors: dict[str, torch.Tensor], model: str = "unet") -> tuple[dict[str, torch.Tensor], dict]:
        """The adapter's `tensors` of one `model` (unet, text_encoder, ...) as diffusers' `save_lora_weights`
        takes them, alpha/rank folded into lora_B, and the LoraConfig metadata (lora_alpha = r), so loaders
        that read the metadata and older ones that do not get the same update."""
        if self.options.dora and model != "unet":
            # its text encoders load through transformers' load_adapter, whose key mapping (peft 0.21's
            # build_peft_weight_mapping) misses the magnitudes' `.weight`: they keep their initial values
            raise SdtuneError(
                "--format diffusers: diffusers' load_lora_weights (0.42, with transformers 5) drops a text encoder's "
                "DoRA magnitudes; export this adapter with --format peft or kohya"
            )
        layers = {}
        for key, tensor in tensors.items():
            module, suffix = split_peft_key(key)
            if suffix == "lora_B.weight":
                rank, alpha = self.layer_rank_alpha(module) if model == "unet" else (self.options.rank, self.options.alpha)
                tensor = (tensor.float() * (float(alpha) / rank)).to(tensor.dtype)
            layers[key] = tensor.contiguous()
        modules = list(_group_by_module(tensors))
        metadata = {"r": self.options.rank, "lora_alpha": self.options.rank, "target_modules": exact_module_pattern(modules)}
        if model == "unet":  # the 3x3 convolutions' own rank (conv_rank), their alpha/rank folded into lora_B as the others'
            patterns = self._conv_patterns(modules)
            if patterns:
                metadata.update(rank_pattern=patterns["rank_pattern"], alpha_pattern=dict(patterns["rank_pattern"]))
        if self.options.dora:
            metadata["use_dora"] = True  # the magnitudes keep peft's names and shapes, which diffusers loads
        return layers, metadata


def _dora_strength_hook(module: nn.Module, args, output: torch.Tensor):
    """peft's DoRA module returns (W' − W)·x; scale it by the strength (1: as peft computes it)."""
    strength = module.sdtune_strength
    return None if strength == 1.0 else output * strength


class _KohyaDropout:
    """kohya-ss' rank and module dropout (sd-scripts' networks/lora.py, LoRAModule.forward) on one of peft's LoRA
    layers (Linear, Conv2d), in training only; in eval mode, and wherever peft's own forward takes another path
    (merged, adapters disabled, mixed batches), peft's forward as it is.

    Module dropout: with probability p (one `torch.rand(1)` draw per layer and forward) the base output alone.
    Rank dropout: the r features after lora_A times a mask `rand(batch, r) > p`, drawn on their device, and the
    update's scale times 1/(1 − p). peft's lora_dropout on the input stays. The draws come from torch's global
    RNG, which the training step seeds, so a resumed run draws the same masks. With DoRA (rank dropout refused)
    module dropout skips to the base output before peft's DoRA forward."""

    sdtune_rank_dropout: float
    sdtune_module_dropout: float
    peft_only_kwargs: tuple[str, ...]  # what peft's forward takes for itself and keeps from the base layer

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if not self.training or self.disable_adapters or self.merged or kwargs.get("adapter_names") is not None:
            return super().forward(x, *args, **kwargs)
        self._check_forward_args(x, *args, **kwargs)
        base_kwargs = {key: value for key, value in kwargs.items() if key not in self.peft_only_kwargs}
        if self.sdtune_module_dropout and torch.rand(1) < self.sdtune_module_dropout:
            return self.base_layer(x, *args, **base_kwargs)
        if not self.sdtune_rank_dropout or any(a in self.lora_variant for a in self.active_adapters):
            return super().forward(x, *args, **kwargs)
        # peft's vanilla-LoRA forward (Linear.forward, _ConvNd.forward) with the rank mask between A and B
        result = self.base_layer(x, *args, **base_kwargs)
        result_dtype = result.dtype
        p = self.sdtune_rank_dropout
        for active_adapter in self.active_adapters:
            if active_adapter not in self.lora_A.keys():
                continue
            lora_A, lora_B = self.lora_A[active_adapter], self.lora_B[active_adapter]
            x = self._cast_input_dtype(x, lora_A.weight.dtype)
            features = lora_A(self.lora_dropout[active_adapter](x))
            mask = torch.rand((features.size(0), features.size(self._rank_dim)), device=features.device) > p
            shape = [1] * features.ndim
            shape[0], shape[self._rank_dim] = mask.shape
            features = features * mask.view(shape)  # the rank features: the last dim (Linear), the channels (conv)
            result = result + lora_B(features) * (self.scaling[active_adapter] * (1.0 / (1.0 - p)))
        return result.to(result_dtype)

    @property
    def _rank_dim(self) -> int:
        return -1 if isinstance(self.get_base_layer(), nn.Linear) else 1


_MIXED_IN: dict[tuple[type, type], type] = {}


def _mixed_in(mixin: type, layer_class: type, **attributes: Any) -> type:
    """The subclass of one of peft's layer classes with one of sdtune's mixins before it (the class name kept, so the
    layer still reads as peft's), made once per pair."""
    if (mixin, layer_class) not in _MIXED_IN:
        _MIXED_IN[mixin, layer_class] = type(layer_class.__name__, (mixin, layer_class), attributes)
    return _MIXED_IN[mixin, layer_class]


def _with_kohya_dropout(layer_class: type) -> type:
    """One of peft's LoRA layer classes (Linear, Conv2d) with `_KohyaDropout`."""
    from peft.tuners.lora.layer import VARIANT_KWARG_KEYS

    return _mixed_in(_KohyaDropout, layer_class, peft_only_kwargs=("adapter_names", *VARIANT_KWARG_KEYS))


class _FiniteRankDropout:
    """peft's LoHa rank dropout, but for one case: peft rescales the kept output channels by 1/(their fraction),
    0/0 when every channel drops (at p = 0.1 one step in 10,000 for SD's 4-channel conv_out), and a NaN update
    ends the run. Here such a step leaves the layer's update out, as module dropout would; the draws are peft's."""

    def get_delta_weight(self, adapter_name: str, *, apply_rank_dropout: bool = False) -> torch.Tensor:
        weight = super().get_delta_weight(adapter_name)
        if not apply_rank_dropout:
            return weight
        keep = (torch.rand(weight.size(0)) > self.rank_dropout[adapter_name]).to(weight.dtype)
        kept = keep.mean()  # on the CPU, as peft draws it: no wait for the device
        if kept > 0:
            keep = keep / kept
        return weight * keep.view(-1, *[1] * (weight.ndim - 1)).to(weight.device)


class _EveryUpdate:
    """peft's LyCORIS forward (LoHa, LoKr) in training when module dropout is off: peft still draws `torch.rand(1)`
    a layer to decide whether to skip the update (`rand > 0`), a data-dependent branch that torch.compile cannot
    trace, one graph break a layer. Here the update is added without the draw, as peft adds it then."""

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if not self.training or self.disable_adapters or self.merged:
            return super().forward(x, *args, **kwargs)
        previous_dtype = x.dtype
        result = self.base_layer(x, *args, **kwargs)
        for active_adapter in self.active_adapters:
            if active_adapter in self._available_adapters:
                result = result + self._get_delta_activations(active_adapter, x, *args, **kwargs)
        return result.to(previous_dtype)


class _Lycoris(_PeftLowRank):
    """What LoHa and LoKr share: peft's LyCORIS layers, with what sdtune adds to them (`layer_mixin`)."""

    def layer_mixin(self) -> type | None:
        """`_EveryUpdate` without dropout, where peft's draws would change nothing but the RNG's position."""
        return _EveryUpdate if not self.options.rank_dropout and not self.options.module_dropout else None

    def _inject_peft(self, model: nn.Module, prefix: str, targets: list[str]) -> None:
        super()._inject_peft(model, prefix, targets)
        mixin = self.layer_mixin()
        if mixin is not None:
            for name in targets:
                layer = model.get_submodule(name)
                layer.__class__ = _mixed_in(mixin, type(layer))


class Loha(_Lycoris):
    name = "loha"
    summary = "LoHa: Hadamard product of two low-rank updates (B1·A1)⊙(B2·A2) (peft)"
    Options = LohaOptions
    variants = ({}, {"targets": "conv3x3"}, *KOHYA_FAMILY_VARIANTS)
    kohya_kind = "loha"

    def layer_mixin(self) -> type | None:
        return _FiniteRankDropout if self.options.rank_dropout else super().layer_mixin()

    def merge_layer(self, layer: nn.Module) -> None:
        if not add_loha_in_place(layer):
            super().merge_layer(layer)

    def export_warnings(self, format: str, tensors: dict[str, torch.Tensor]) -> list[str]:
        o = self.options
        return [_lycoris_merge_warning(self)] if format == "kohya" and (o.alpha != o.rank or o.conv_alpha != o.conv_rank) else []

    def to_peft_config(self, module_names: list[str]):
        from peft import LoHaConfig

        return LoHaConfig(
            r=self.options.rank,
            alpha=self.options.alpha,
            **self._conv_patterns(module_names),
            target_modules=exact_module_pattern(module_names),
            use_effective_conv2d=self.options.tucker,
            rank_dropout=self.options.rank_dropout,
            module_dropout=self.options.module_dropout,
        )


def _factorization(dimension: int, factor: int, ordered: bool) -> tuple[int, int]:
    """LoKr's split of `dimension` into (w1's, w2's) part near `factor` (-1: near the square root); `ordered`:
    LyCORIS' (the smaller first always), else peft's (a dividing factor first, even the larger)."""
    from peft.tuners.lokr.layer import factorization

    m, n = factorization(dimension, factor)
    return (min(m, n), max(m, n)) if ordered else (m, n)


def _lokr_layout(weight: tuple[int, ...], rank: int, factor: int, decompose_both: bool, tucker: bool,
                 full: bool = False, ordered: bool = False) -> dict[str, tuple[int, ...]]:
    """The LoKr tensors' shapes on a layer of weight shape `weight`: peft's (`ordered` False), or LyCORIS 4.1.3's
    module (`ordered`; `full`: its full_matrix)."""
    (out_dim, in_dim, *kernel) = weight
    (a, b), (c, d) = _factorization(out_dim, factor, ordered), _factorization(in_dim, factor, ordered)
    tucker = tucker and any(k != 1 for k in kernel)
    shapes: dict[str, tuple[int, ...]] = {}
    if decompose_both and rank < max(a, c) / 2 and not full:
        shapes.update(lokr_w1_a=(a, rank), lokr_w1_b=(rank, c))
    else:
        shapes["lokr_w1"] = (a, c)
    if rank >= max(b, d) / 2 or full:
        shapes["lokr_w2"] = (b, d, *kernel)
    elif tucker:
        shapes.update(lokr_t2=(rank, rank, *kernel), lokr_w2_a=(rank, b), lokr_w2_b=(rank, d))
    else:
        shapes.update(lokr_w2_a=(b, rank), lokr_w2_b=(rank, d * math.prod(kernel)))
    return shapes


def lycoris_lokr_layout(weight: tuple[int, ...], parts: dict[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
    """The LoKr tensors' shapes lycoris-lora 4.1.3 builds to load a module's `parts` (its
    `LokrModule.make_module_from_state_dict`), on a layer of weight shape `weight`: it guesses rank and factor from
    the shapes, and for a convolution counts w2_b's flattened kernel into the input size."""
    w1 = parts.get("lokr_w1") or (parts["lokr_w1_a"][0], parts["lokr_w1_b"][1])
    w2 = parts.get("lokr_w2") or (parts["lokr_w2_a"][0], parts["lokr_w2_b"][1])
    low_rank = parts.get("lokr_w1_a") or parts.get("lokr_w2_a")
    rank = low_rank[1] if low_rank else 1
    out_dim, in_dim = w1[0] * w2[0], w1[1] * w2[1]
    if w1[0] == _factorization(out_dim, -1, True)[0] and w1[1] == _factorization(in_dim, -1, True)[0]:
        factor = -1
    else:
        factor1, factor2 = max(w1), max(w2)
        fits = [f for f in (factor1, factor2) if not out_dim % f and not in_dim % f and f in (w1[0], w2[0]) and f in (w1[1], w2[1])]
        factor = fits[0] if fits else min(factor1, factor2)
    return _lokr_layout(weight, rank, factor, decompose_both="lokr_w1" not in parts and "lokr_w2" not in parts,
                        tucker="lokr_t2" in parts, full=low_rank is None, ordered=True)


class Lokr(_Lycoris):
    name = "lokr"
    summary = "LoKr: Kronecker product update W1 ⊗ W2 with low-rank factors where small (peft)"
    Options = LokrOptions
    variants = ({}, {"targets": "conv3x3"}, *KOHYA_FAMILY_VARIANTS, {"decompose_both": True})
    default_lr = 3e-5  # measured: sweeps/digits-lr.toml over seeds 0-2 (benchmarks/RESULTS.md): 1e-4 lost 11 points
    kohya_kind = "lokr"

    @classmethod
    def _kohya_structure(cls, kinds, shapes, network_args) -> dict[str, Any]:
        options = super()._kohya_structure(kinds, shapes, network_args)
        options["decompose_both"] = any("lokr_w1_a" in parts for parts in shapes.values())
        factor = str(network_args.get("factor", ""))
        if factor.lstrip("-").isdigit():  # LyCORIS' and sdtune's network args record it
            options["factor"] = int(factor)
        return options

    def _factors_from_kohya(self, module: str, parts: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if "lokr_w1" in parts and "lokr_w2" in parts:  # both full: the file's scale is 1, peft's alpha/rank (see _kohya_factors)
            w1, (rank, alpha) = parts["lokr_w1"], self.layer_rank_alpha(module)
            parts = {**parts, "lokr_w1": (w1.float() / (alpha / rank)).to(w1.dtype)}
        return parts

    def merge_layer(self, layer: nn.Module) -> None:
        if not add_lokr_in_place(layer):
            super().merge_layer(layer)

    def validate_options(self) -> None:
        super().validate_options()
        factor = self.options.factor
        if not is_whole_number(factor) or not (factor == -1 or factor >= 1):
            raise SdtuneError(f"--factor must be -1 (automatic) or a whole number of at least 1, got {factor!r}")

    def to_peft_config(self, module_names: list[str]):
        from peft import LoKrConfig

        return LoKrConfig(
            r=self.options.rank,
            alpha=self.options.alpha,
            **self._conv_patterns(module_names),
            target_modules=exact_module_pattern(module_names),
            decompose_factor=self.options.factor,
            decompose_both=self.options.decompose_both,
            use_effective_conv2d=self.options.tucker,
            rank_dropout=self.options.rank_dropout,
            module_dropout=self.options.module_dropout,
        )

    def export_warnings(self, format: str, tensors: dict[str, torch.Tensor]) -> list[str]:
        """LyCORIS 4.1.3's loader and merge, which the kohya file meets: its maths is right only where it
        rebuilds the factors' layout from their shapes as peft laid them out."""
        if format != "kohya":
            return []
        modules = _group_by_module(tensors).values()
        found = []
        # both factors full: alpha/rank is folded into w1 and the file's scale is 1, which LyCORIS gets right
        scales = {self.layer_rank_alpha(module) for module, parts in _group_by_module(tensors).items()
                  if "lokr_w1" not in parts or "lokr_w2" not in parts}
        if any(alpha != rank for rank, alpha in scales):
            found.append(_lycoris_merge_warning(self))
        if any("lokr_t2" in m for m in modules):
            found.append("LyCORIS (lycoris-lora 4.1.3) cannot load Tucker LoKr files, its own included (it reads the "
                         "rank from lokr_w2_a's second dimension; the Tucker layout holds it first); ComfyUI and sdtune read this one")
        if any("lokr_w1_a" in m and "lokr_w2" in m for m in modules):
            found.append("LyCORIS (lycoris-lora 4.1.3) cannot load this file: with --decompose-both it expects both "
                         "Kronecker factors low-rank, and a layer this small keeps w2 full; ComfyUI and sdtune read it")
        misread = self.lycoris_misread_layers(tensors)
        if misread:
            found.append(self._misread_warning(misread))
        return found

    _weight_shapes: dict[str, tuple[int, ...]] | None = None

    @property
    def needs_base_layers(self) -> bool:
        # the layers' shapes: LyCORIS' loader rebuilds a LoKr from them and the file's, which alone do not tell a kernel
        return super().needs_base_layers or self._weight_shapes is None

    def read_base_layers(self, unet: nn.Module) -> None:
        super().read_base_layers(unet)
        self._weight_shapes = {name: tuple(unet.get_submodule(name).weight.shape) for name in self.find_targets(unet)}

    def lycoris_misread_layers(self, tensors: dict[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
        """The UNet layers (and their weight shapes) whose LoKr tensors lycoris-lora 4.1.3 rebuilds in other shapes
        than the file's, so that it cannot load the file; those of the layouts warned of apart (Tucker cores,
        --decompose-both beside a full w2) left out, as are layers whose shapes are unknown (no base model config)."""
        misread = {}
        for module, parts in _group_by_module(tensors).items():
            weight = (self._weight_shapes or {}).get(module)
            shapes = {suffix: tuple(tensor.shape) for suffix, tensor in parts.items()}
            if weight is None or "lokr_t2" in shapes or ("lokr_w1_a" in shapes and "lokr_w2" in shapes):
                continue
            if lycoris_lokr_layout(weight, shapes) != shapes:
                misread[module] = weight
        return misread

    def _misread_warning(self, misread: dict[str, tuple[int, ...]]) -> str:
        """One line: which layers LyCORIS misreads, why, and the option that avoids it."""
        o = self.options
        names = ", ".join(sorted(misread)[:3]) + (", …" if len(misread) > 3 else "")
        head = (f"LyCORIS (lycoris-lora 4.1.3) cannot load this file: it guesses each LoKr layer's Kronecker split from "
                f"the tensors' shapes and gets {len(misread)} wrong ({names})")
        tail = "; ComfyUI and sdtune read it"
        if o.factor > 0 and any(_factorization(dim, o.factor, False)[0] > _factorization(dim, o.factor, True)[0]
                                for weight in misread.values() for dim in weight[:2]):
            return (f"{head}: with --factor {o.factor} over the square root of a layer's size peft puts the larger part "
                    f"in w1, LyCORIS never; a smaller --factor (or -1) avoids it{tail}")
        convs = [name for name, weight in (self._weight_shapes or {}).items() if len(weight) > 2 and math.prod(weight[2:]) > 1]
        if all(name in convs for name in misread):
            rank = self.layer_rank_alpha(next(iter(misread)))[0]
            fix = next((r for r in range(rank + 1, 2 * max(max(self._weight_shapes[n][:2]) for n in convs) + 1)
                        if all(self._lycoris_reads(self._weight_shapes[n], r) for n in convs)), None)
            if fix is not None:
                return (f"{head}: on a k×k convolution it counts the kernel into w2_b's input size; --conv-rank {fix}, "
                        f"the least above {rank} whose split it guesses right on every 3×3 convolution, avoids it{tail}")
        return f"{head}; leave those layers out of --targets{tail}"

    def _lycoris_reads(self, weight: tuple[int, ...], rank: int) -> bool:
        """Whether lycoris-lora 4.1.3 loads the LoKr sdtune trains at `rank` on a layer of shape `weight`."""
        o = self.options
        shapes = _lokr_layout(weight, rank, o.factor, o.decompose_both, o.tucker)
        return lycoris_lokr_layout(weight, shapes) == shapes

    def _kohya_factors(self, module: str, parts: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if "lokr_w1" in parts and "lokr_w2" in parts:
            # both factors full: LyCORIS and ComfyUI use scale 1, peft alpha/rank; fold it into w1
            w1, (rank, alpha) = parts["lokr_w1"], self.layer_rank_alpha(module)
            parts = {**parts, "lokr_w1": (w1.float() * (alpha / rank)).to(w1.dtype)}
        return parts

    def _kohya_network(self) -> tuple[str, dict[str, str]]:
        network, args = super()._kohya_network()
        args["factor"] = str(self.options.factor)
        args["decompose_both"] = str(bool(self.options.decompose_both))
        return network, args
