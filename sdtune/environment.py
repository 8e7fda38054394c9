"""What `sdtune env` prints: the versions, devices and settings a maintainer needs to reproduce a report.

Versions come from the installed packages' metadata, so no package is imported just to be named; torch is imported for
the devices. Each method says how it runs on the devices present (`Method.device_notes`), so nothing here names one.
"""

from __future__ import annotations

import os
import platform
from dataclasses import dataclass, field
from importlib import metadata

from . import methods
from .fileio import human_bytes
from .version import __version__

# The packages a run's behaviour depends on, by their distribution names (as pip lists them).
PACKAGES = (
    "torch", "diffusers", "transformers", "accelerate", "peft", "safetensors", "torchmetrics", "triton",
    "lycoris-lora", "bitsandbytes",
)
METHODS_KEY = "methods on this machine"
NOT_INSTALLED = "not installed"


@dataclass
class Environment:
    """The report: `facts` as (name, value) in the order shown, then each method's notes per present device type."""

    facts: list[tuple[str, str]]
    method_notes: dict[str, dict[str, list[str]]] = field(default_factory=dict)

    def as_text(self) -> str:
        """Markdown list lines ("- name: value"), as `diffusers-cli env` prints: they paste well into an issue."""
        lines = [f"- {name}: {value}" for name, value in self.facts]
        lines.append(f"- {METHODS_KEY}:" + ("" if self.method_notes else " nothing device-specific"))
        for method, by_device in self.method_notes.items():
            for device_type, notes in by_device.items():
                lines.extend(f"  - {method} on {device_type}: {note}" for note in notes)
        return "\n".join(lines)

    def as_dict(self) -> dict:
        """The same as one JSON-ready object: the facts' names as keys, the methods' notes under `METHODS_KEY`."""
        return {**dict(self.facts), METHODS_KEY: self.method_notes}


def package_version(name: str) -> str | None:
    """The installed version of distribution `name`, or None where it is not installed."""
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def report() -> Environment:
    """The environment of this process: sdtune, Python and the platform, the packages, the devices, the settings
    read from the environment, and each method's notes for the device types present. Loads no model."""
    import torch

    facts = [("sdtune", __version__), ("Python", platform.python_version()), ("Platform", platform.platform())]
    for name in PACKAGES:
        version = package_version(name) or NOT_INSTALLED
        if name == "torch":
            version += f" ({torch_build(torch)})"
        facts.append((name, version))
    device_types = ["cpu"]
    facts += _probed("CUDA available", lambda: cuda_facts(torch))
    if any(name == "CUDA available" and value.startswith("yes") for name, value in facts):
        device_types.append("cuda")
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_built():
        available = mps.is_available()
        facts.append(("MPS available", "yes" if available else "no"))
        if available:
            device_types.append("mps")
    facts.append(("torch CPU threads", str(torch.get_num_threads())))
    facts += _set_variables("OMP_NUM_THREADS")
    facts += _probed("Accelerate default config", lambda: [("Accelerate default config", accelerate_config_file())])
    facts.append(("HF_HUB_OFFLINE", os.environ.get("HF_HUB_OFFLINE", "not set")))
    facts.append(("sdtune cache", sdtune_cache()))
    facts += _set_variables("TRITON_INTERPRET")
    return Environment(facts, method_device_notes(device_types))


def torch_build(torch) -> str:
    """What torch was built for: "CUDA 12.4", "ROCm 6.2" or "CPU only"."""
    if getattr(torch.version, "hip", None):
        return f"ROCm {torch.version.hip}"
    if torch.version.cuda:
        return f"CUDA {torch.version.cuda}"
    return "CPU only"


def cuda_facts(torch) -> list[tuple[str, str]]:
    """Whether CUDA (or ROCm, through the same API) is available, then one line per GPU: its name, memory, compute
    capability and whether bf16 runs natively on it."""
    if not torch.cuda.is_available():
        return [("CUDA available", "no")]
    count = torch.cuda.device_count()
    facts = [("CUDA available", f"yes ({count} GPU{'s' if count != 1 else ''})")]
    for index in range(count):
        props = torch.cuda.get_device_properties(index)
        with torch.cuda.device(index):
            if torch.cuda.is_bf16_supported(including_emulation=False):
                bf16 = "yes"
            else:
                bf16 = "emulated" if torch.cuda.is_bf16_supported() else "no"
        facts.append((
            f"GPU {index}",
            f"{props.name}, {human_bytes(props.total_memory)}, compute capability {props.major}.{props.minor}, bf16: {bf16}",
        ))
    return facts


def accelerate_config_file() -> str:
    """The path of Accelerate's default config file (what `accelerate config` writes and `accelerate launch` reads
    unless told), or "none" where there is none."""
    if package_version("accelerate") is None:
        return "none"
    from accelerate.commands.config.config_args import default_config_file

    return default_config_file if os.path.isfile(default_config_file) else "none"


def sdtune_cache() -> str:
    """The folder sdtune keeps built models and decompositions in, as `models.cache_dir` resolves it."""
    from .models import cache_dir

    folder = str(cache_dir())
    return f"{folder} (SDTUNE_CACHE)" if os.environ.get("SDTUNE_CACHE") else folder


def method_device_notes(device_types: list[str]) -> dict[str, dict[str, list[str]]]:
    """Each method's `device_notes` for each of `device_types`, leaving out the methods and devices with none."""
    notes: dict[str, dict[str, list[str]]] = {}
    for name in methods.available():
        method_class = methods.method_class(name)
        by_device = {device_type: method_class.device_notes(device_type) for device_type in device_types}
        by_device = {device_type: lines for device_type, lines in by_device.items() if lines}
        if by_device:
            notes[name] = by_device
    return notes


def _set_variables(*names: str) -> list[tuple[str, str]]:
    return [(name, os.environ[name]) for name in names if name in os.environ]


def _probed(name: str, probe) -> list[tuple[str, str]]:
    """`probe()`'s facts, or one fact saying it failed: a report for a broken setup must still print."""
    try:
        return probe()
    except Exception as error:  # noqa: BLE001 - the failure is itself what the report should show
        first_line = (str(error).strip().splitlines() or [""])[0]
        return [(name, f"unknown ({type(error).__name__}: {first_line})")]
