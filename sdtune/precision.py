"""Mixed precision: trainable parameters in fp32, the frozen models in the half dtype to save memory.

Accelerate's autocast runs the forward in the half dtype either way; storing the frozen weights in it
halves their memory. SD's VAE overflows in fp16, so `--no-half-vae` keeps it in fp32.
"""

from __future__ import annotations

HALF_DTYPES = {"fp16": "float16", "bf16": "bfloat16"}


def half_dtype(mixed_precision: str):
    """torch's dtype for `fp16`/`bf16`, None for `no`."""
    import torch

    name = HALF_DTYPES.get(mixed_precision)
    return getattr(torch, name) if name else None


def cast_frozen_parameters(module, dtype, trainable) -> None:
    """Cast every parameter of `module` that is not trainable to `dtype`; trainable ones to fp32."""
    import torch

    trainable_ids = {id(p) for p in trainable}
    for parameter in module.parameters():
        if id(parameter) in trainable_ids:
            parameter.data = parameter.data.float()
        elif parameter.is_floating_point() and dtype is not None:
            parameter.data = parameter.data.to(dtype)
    for parameter in trainable:  # trainable tensors a method keeps outside the module
        parameter.data = parameter.data.to(torch.float32)


def place_frozen_models(mixed_precision: str, device, text_encoder, vae, no_half_vae: bool) -> None:
    """Move the frozen text encoder and VAE to `device`, in the half dtype under mixed precision."""
    dtype = half_dtype(mixed_precision)
    text_encoder.to(device)
    vae.to(device)
    # Parameter by parameter: diffusers' `to(dtype)` warns about fp32-kept modules even when there are none.
    cast_frozen_parameters(text_encoder, dtype, ())
    if not no_half_vae:
        cast_frozen_parameters(vae, dtype, ())
