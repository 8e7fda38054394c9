"""The optimisers `--optimizer` names: torch.optim's, bitsandbytes' 8-bit AdamW and Prodigy.

Each entry says which package it needs (checked before the model loads, `check_optimizer_ready`), the
learning rate it takes when `--lr` is not given (None: the method's own), and a lower bound of its state's
bytes per trained parameter (the memory check, `sdtune/limits.py`). Importing this module costs no torch.

- `adamw8bit`: bitsandbytes' AdamW8bit (Dettmers et al. 2022, "8-bit Optimizers via Block-wise
  Quantization"), kohya-ss' default: both moments in 8 bits, block-wise quantised, for tensors of 4,096
  numbers or more (bitsandbytes keeps smaller ones in 32 bits). It runs on CUDA and on CPUs.
- `prodigy`: Prodigy (Mishchenko and Defazio 2024, "Prodigy: An Expeditiously Adaptive Parameter-Free
  Learner"), an Adam that estimates its own step size d; `--lr` multiplies d, so the default is 1.0. As
  diffusers' DreamBooth LoRA script sets it up by default, and Prodigy's README advises for diffusion models:
  decoupled weight decay, Adam's bias correction and the safeguard (lr out of d's denominator, so a
  warm-up or a schedule cannot inflate d). `--prodigy-d-coef` scales
  d's estimate: Prodigy's README (github.com/konstmish/prodigy) keeps lr at 1 and tunes d_coef instead
  (2 or 10 for larger steps, 0.5 or 0.1 for smaller); diffusers' DreamBooth scripts expose only
  bias correction, the safeguard, decoupled decay and β3, and kohya-ss' passes any Prodigy argument
  through --optimizer_args. `--prodigy-d0`: d's first estimate (1e-6); the README advises 1e-5 or 1e-4
  where d stays too small, as it does in short few-shot runs (benchmarks/RESULTS.md); training logs d.
"""

from __future__ import annotations

import importlib.util
from typing import NamedTuple

from .errors import SdtuneError


class Optimizer(NamedTuple):
    package: str | None  # the module it imports (None: torch)
    pip: str | None  # what to install for it
    default_lr: float | None  # without --lr (None: the method's own)
    state_bytes: int  # optimiser state per trained fp32 parameter, a lower bound
    class_path: str  # its class as kohya-ss' ss_optimizer names it (module.Class)


OPTIMIZERS: dict[str, Optimizer] = {
    "adamw": Optimizer(None, None, None, 8, "torch.optim.adamw.AdamW"),  # two fp32 moments
    "adam": Optimizer(None, None, None, 8, "torch.optim.adam.Adam"),  # L2 penalty in the gradient, not decoupled decay
    "sgd": Optimizer(None, None, None, 4, "torch.optim.sgd.SGD"),  # momentum 0.9
    "adafactor": Optimizer(None, None, None, 0, "torch.optim.Adafactor"),  # factored moments, counted as nothing
    "adamw8bit": Optimizer("bitsandbytes", "bitsandbytes", None, 2, "bitsandbytes.optim.adamw.AdamW8bit"),  # 8-bit moments
    "prodigy": Optimizer("prodigyopt", "prodigyopt", 1.0, 16, "prodigyopt.prodigy.Prodigy"),  # moments, s, initial weights
}


def check_optimizer_ready(name: str) -> None:
    """Before the model loads: the optimiser's package is installed."""
    optimizer = OPTIMIZERS[name]
    if optimizer.package and importlib.util.find_spec(optimizer.package) is None:
        raise SdtuneError(
            f"--optimizer {name} needs the {optimizer.package} package: "
            f'pip install {optimizer.pip} (or pip install "sdtune[{name}]")'
        )


def optimizer_arguments(config, method_weight_decay: float) -> dict:
    """The arguments besides the learning rate that `make_optimizer` passes to `config.optimizer`'s class."""
    decay = method_weight_decay if config.weight_decay is None else config.weight_decay
    adam = {"betas": (config.adam_beta1, config.adam_beta2), "eps": config.adam_epsilon, "weight_decay": decay}
    return {
        "adamw": adam, "adam": adam, "adamw8bit": adam,
        "sgd": {"momentum": 0.9, "weight_decay": decay},
        "adafactor": {"weight_decay": decay},
        "prodigy": {
            **adam, "decouple": True, "use_bias_correction": True, "safeguard_warmup": True,
            "d_coef": config.prodigy_d_coef, "d0": config.prodigy_d0,
        },
    }[config.optimizer]


def kohya_optimizer_name(config, method_weight_decay: float) -> str:
    """`ss_optimizer` as kohya-ss' train_network.py writes it: the class's module path, its arguments in brackets
    (`torch.optim.adamw.AdamW(betas=(0.9, 0.999),eps=1e-08,weight_decay=0.01)`)."""
    arguments = ",".join(f"{name}={value}" for name, value in optimizer_arguments(config, method_weight_decay).items())
    return f"{OPTIMIZERS[config.optimizer].class_path}({arguments})"


def make_optimizer(config, parameters: list, method_weight_decay: float):
    """`config.optimizer` over the trainable parameters (decay: the config's, else the method's)."""
    import torch

    arguments = optimizer_arguments(config, method_weight_decay)
    # The multi-tensor step, which torch takes by default on CUDA only: on a CPU it updates LoRA's 452 tensors
    # in 6.5 ms against 11.5 one by one (tiny model), with the same bits.
    if config.optimizer in ("adamw", "adam", "sgd"):
        arguments["foreach"] = True
    if config.optimizer == "adamw":
        return torch.optim.AdamW(parameters, lr=config.lr, **arguments)
    if config.optimizer == "adam":
        return torch.optim.Adam(parameters, lr=config.lr, **arguments)
    if config.optimizer == "sgd":
        return torch.optim.SGD(parameters, lr=config.lr, **arguments)
    if config.optimizer == "adafactor":
        if not hasattr(torch.optim, "Adafactor"):
            raise SdtuneError(f"--optimizer adafactor needs torch 2.5 or newer; this is torch {torch.__version__}")
        return torch.optim.Adafactor(parameters, lr=config.lr, **arguments)
    if config.optimizer == "adamw8bit":
        import bitsandbytes

        return bitsandbytes.optim.AdamW8bit(parameters, lr=config.lr, **arguments)
    if config.optimizer == "prodigy":
        import contextlib
        import io

        from prodigyopt import Prodigy

        with contextlib.redirect_stdout(io.StringIO()):  # it prints "Using decoupled weight decay"
            return Prodigy(parameters, lr=config.lr, **arguments)
    raise SdtuneError(f"--optimizer must be one of {', '.join(OPTIMIZERS)}, got {config.optimizer!r}")
