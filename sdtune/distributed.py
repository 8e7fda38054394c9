"""The process group of `accelerate launch` (or torchrun), as Accelerate sees it."""

from __future__ import annotations


def process_state():
    """Accelerate's PartialState: this process's index, the number of processes, its device.

    `accelerate launch --cpu` (ACCELERATE_USE_CPU) asks for several CPU processes; PartialState
    reads that flag only when told, as the Accelerator tells it during training.
    """
    from accelerate import PartialState
    from accelerate.utils import parse_flag_from_env

    return PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"))
