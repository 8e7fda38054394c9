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


def lock_on_main_process(state, lock):
    """Take `lock` (an OutputLock) on the main process of `state` (an Accelerator or PartialState); every
    process raises the same one-line error when it is taken, and waits until it is held."""
    from accelerate.utils import broadcast_object_list

    from .errors import SdtuneError

    refusal = None
    if state.is_main_process:
        try:
            lock.acquire()
        except SdtuneError as error:
            refusal = str(error)
    if state.num_processes > 1:
        refusal = broadcast_object_list([refusal])[0]
    if refusal:
        lock.release()
        raise SdtuneError(refusal)
    return lock
