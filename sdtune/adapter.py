"""Adapter files: one safetensors file that is enough to rebuild a method on the right base model.

The file holds the method's tensors; its metadata (strings, as safetensors requires) holds the
method name and options, the base model's id, a fingerprint of the targeted layers' shapes and
weights, and the concept's placeholder and token.
"""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import __version__
from .errors import SdtuneError
from .fileio import save_safetensors

ADAPTER_FILE = "adapter.safetensors"
FORMAT = "sdtune-adapter/1"


@dataclass
class AdapterInfo:
    """What an adapter file says about itself."""

    method: str
    options: dict[str, Any]
    base_model: str
    fingerprint: str
    structure: str = ""
    weight_sample: bytes = b""
    placeholder: str = ""
    token: str = ""
    extra: dict[str, str] = field(default_factory=dict)


def adapter_path(path: str | Path) -> Path:
    """The adapter file for a file path or a run folder."""
    path = Path(path)
    if path.is_dir():
        path = path / ADAPTER_FILE
    if not path.is_file():
        raise SdtuneError(f"adapter not found: {path}")
    return path


def save_adapter(path: str | Path, method, base_model: str, placeholder: str = "", token: str = "", **extra: str) -> Path:
    """Write the method's state and metadata to `path` atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    metadata = {
        "format": FORMAT,
        "sdtune_version": __version__,
        "method": method.name,
        "options": json.dumps(method.options_dict(), sort_keys=True),
        "base_model": base_model,
        "fingerprint": method.base_fingerprint or "",
        "structure": method.base_structure or "",
        "weight_sample": base64.b64encode(method.base_sample.numpy().astype("<f4").tobytes()).decode(),
        "placeholder": placeholder,
        "token": token,
        "num_parameters": str(method.num_parameters()),
        **{k: str(v) for k, v in extra.items()},
    }
    state = {k: v.detach().cpu().contiguous() for k, v in method.state_dict().items()}
    save_safetensors(state, path, metadata)  # atomic, and the same bytes for the same adapter
    return path


def read_adapter(path: str | Path):
    """(AdapterInfo, tensors) from an sdtune adapter file; refuses anything else."""
    from safetensors import safe_open

    path = adapter_path(path)
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    except Exception as error:
        raise SdtuneError(f"{path}: not a readable safetensors file ({str(error).splitlines()[0][:120]})") from None
    if metadata.get("format") != FORMAT:
        raise SdtuneError(f"{path}: not an sdtune adapter (no '{FORMAT}' metadata)")
    known = {
        "format", "sdtune_version", "method", "options", "base_model", "fingerprint", "structure",
        "weight_sample", "placeholder", "token",
    }
    try:
        info = AdapterInfo(
            method=metadata["method"],
            options=json.loads(metadata["options"]),
            base_model=metadata["base_model"],
            fingerprint=metadata["fingerprint"],
            structure=metadata["structure"],
            weight_sample=base64.b64decode(metadata["weight_sample"]),
            placeholder=metadata.get("placeholder", ""),
            token=metadata.get("token", ""),
            extra={k: v for k, v in metadata.items() if k not in known},
        )
    except (KeyError, ValueError) as error:
        raise SdtuneError(f"{path}: damaged sdtune adapter metadata ({error})") from None
    return info, tensors


def load_adapter(path: str | Path, pipeline, merge: bool = True):
    """Rebuild the adapter's method on `pipeline.unet` and load its tensors; merge by default.

    Refuses, with a clear message, an adapter made for a base model whose targeted layers differ
    in names, shapes or weights; the same weights in another precision (fp16, bf16) are accepted.
    """
    import numpy as np
    import torch

    from . import methods
    from .methods.base import fingerprint_of, same_weights, structure_digest, weight_sample

    info, tensors = read_adapter(path)
    method = methods.create(info.method, **info.options)
    unet = pipeline.unet
    targets = method.find_targets(unet)
    trained_on = f"adapter {adapter_path(path)} was trained on base model {info.base_model!r}"
    structure = structure_digest(unet, targets)
    if structure != info.structure:
        raise SdtuneError(f"{trained_on}; the loaded model's layers have other names or shapes")
    sample = weight_sample(unet, targets)
    if fingerprint_of(structure, sample) != info.fingerprint:  # same weights also in fp16/bf16: compare values
        expected = torch.from_numpy(np.frombuffer(info.weight_sample, dtype="<f4").copy())
        if not same_weights(expected, sample):
            raise SdtuneError(f"{trained_on}; the loaded model's weights differ")
    device = unet.device  # read once: diffusers walks every module to find it
    method.inject(unet)
    method.load_state_dict({k: v.to(device) for k, v in tensors.items()})
    if merge:
        method.merge()
    method.info = info
    return method
