"""Run configurations: plain dataclasses that the CLI flags, TOML files and the Python API share.

`TrainConfig.load("run.toml", steps=10)` reads a TOML file and applies overrides on top; the
resolved configuration of every run is written beside its adapter as `config.toml` and can be
replayed with `sdtune train --config runs/NAME/config.toml`.
"""

from __future__ import annotations

import dataclasses
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import SdtuneError
from .models import DEFAULT_MODEL

MIXED_PRECISION = ("no", "fp16", "bf16")
LR_SCHEDULERS = ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial")


class _Config:
    """TOML in, TOML out, with clear errors for unknown keys and bad values."""

    @classmethod
    def load(cls, path: str | Path | None = None, **overrides: Any):
        values: dict[str, Any] = {}
        if path is not None:
            values.update(read_toml(path))
        values.update({k: v for k, v in overrides.items() if v is not None})
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            where = f" in {path}" if path else ""
            raise SdtuneError(f"unknown setting(s){where}: {', '.join(unknown)}")
        config = cls(**values)
        config.validate()
        return config

    def validate(self) -> None:
        pass

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}

    def to_toml(self) -> str:
        import tomli_w

        return tomli_w.dumps(self.to_dict())


def read_toml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise SdtuneError(f"config file not found: {path}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as error:
        raise SdtuneError(f"{path}: not valid TOML ({error})") from None


@dataclass
class TrainConfig(_Config):
    """Everything `sdtune train` needs. Unset values are resolved by `resolved()`."""

    concept: str = "castle"
    method: str = "atoms"
    options: dict[str, Any] = field(default_factory=dict)  # the method's own options
    model: str = DEFAULT_MODEL
    images: str | None = None  # folder of training images; default concepts/NAME or the demo set
    output: str | None = None  # default runs/<concept>-<method>
    token: str | None = None  # replaces the placeholder; default "sks <concept>"
    template: str = "photo of a {token}."
    steps: int = 400
    batch_size: int = 1
    lr: float | None = None  # default: the method's own
    resolution: int | None = None  # default: the model's native size
    seed: int = 0
    save_every: int = 0  # also save the adapter every N steps (0: only at the end)
    mixed_precision: str = "no"
    gradient_accumulation_steps: int = 1  # micro-batches per optimiser step
    lr_scheduler: str = "constant"
    lr_warmup_steps: int = 0
    lr_cycles: int = 1  # cosine_with_restarts: number of hard restarts
    max_grad_norm: float = 0.0  # clip the gradient norm to this (0: no clipping; the norm is logged anyway)
    ema_decay: float = 0.0  # keep an EMA of the trained weights with this decay (0: none)
    gradient_checkpointing: bool = False
    checkpoint_every: int = 0  # full training state every N steps into checkpoints/step-N (0: none)
    keep_checkpoints: int = 3
    resume: str | None = None  # "latest" or a checkpoint folder; never written to config.toml

    def validate(self) -> None:
        if not self.concept or not self.concept.replace("-", "").replace("_", "").isalnum():
            raise SdtuneError(f"--concept must be a plain name (letters, digits, - or _), got {self.concept!r}")
        for name in ("steps", "batch_size"):
            if getattr(self, name) < 1:
                raise SdtuneError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if self.lr is not None and not self.lr > 0:
            raise SdtuneError(f"--lr must be positive, got {self.lr}")
        if self.resolution is not None and (self.resolution < 8 or self.resolution % 8):
            raise SdtuneError(f"--resolution must be a positive multiple of 8, got {self.resolution}")
        if self.save_every < 0:
            raise SdtuneError(f"--save-every must be 0 or more, got {self.save_every}")
        for name in ("gradient_accumulation_steps", "lr_cycles", "keep_checkpoints"):
            if getattr(self, name) < 1:
                raise SdtuneError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        for name in ("lr_warmup_steps", "checkpoint_every", "max_grad_norm"):
            if getattr(self, name) < 0:
                raise SdtuneError(f"--{name.replace('_', '-')} must be 0 or more, got {getattr(self, name)}")
        if self.lr_scheduler not in LR_SCHEDULERS:
            raise SdtuneError(f"--lr-scheduler must be one of {', '.join(LR_SCHEDULERS)}, got {self.lr_scheduler!r}")
        if not 0 <= self.ema_decay < 1:
            raise SdtuneError(f"--ema-decay must be in [0, 1) (0: no EMA), got {self.ema_decay}")
        if self.resume is not None and not self.resume:
            raise SdtuneError("--resume takes 'latest' or a checkpoint folder")
        if self.mixed_precision not in MIXED_PRECISION:
            raise SdtuneError(f"--mixed-precision must be one of {', '.join(MIXED_PRECISION)}")
        if "{token}" not in self.template:
            raise SdtuneError(f"--template must contain {{token}}, got {self.template!r}")

    @property
    def placeholder(self) -> str:
        return f"<{self.concept}>"

    def resolved(self, default_lr: float) -> "TrainConfig":
        """A copy with every default filled in, as written to config.toml."""
        return dataclasses.replace(
            self,
            options=dict(self.options),
            output=self.output or str(Path("runs") / f"{self.concept}-{self.method}"),
            token=self.token or f"sks {self.concept}",
            lr=self.lr or default_lr,
            resume=None,  # how this run started, not a setting to replay
        )

    @property
    def prompt(self) -> str:
        return self.template.format(token=self.token or f"sks {self.concept}")


@dataclass
class SampleConfig(_Config):
    """Everything `sdtune sample` needs."""

    prompts: str | None = None  # a prompt file; one prompt a line, '#' comments
    prompt: list[str] = field(default_factory=list)  # prompts given directly
    adapter: str | None = None  # adapter file or run folder; none samples the base model
    model: str | None = None  # default: the adapter's base model, else SD v1.4
    output: str | None = None  # default: <run>/samples, else samples/
    num_images: int = 4
    steps: int = 30
    guidance: float = 7.5
    seed: int = 0
    resolution: int | None = None
    token: str | None = None  # default: the adapter's token

    def validate(self) -> None:
        if not self.prompts and not self.prompt:
            raise SdtuneError("give a prompt file (--prompts FILE) or a prompt (--prompt TEXT)")
        for name in ("num_images", "steps"):
            if getattr(self, name) < 1:
                raise SdtuneError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if self.resolution is not None and (self.resolution < 8 or self.resolution % 8):
            raise SdtuneError(f"--resolution must be a positive multiple of 8, got {self.resolution}")
