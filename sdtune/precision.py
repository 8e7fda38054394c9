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


def frozen_dtype(accelerator):
    """The dtype to store frozen weights in: the half dtype where Accelerate autocasts, else None (fp32).

    Accelerate runs fp16 on a CPU without autocast (in fp32), so frozen weights stay fp32 there too.
    """
    import warnings

    mixed_precision = accelerator.mixed_precision
    if mixed_precision == "fp16" and not accelerator.native_amp:
        warnings.warn(f"--mixed-precision fp16 has no effect on {accelerator.device.type} (training runs in fp32); bf16 does", stacklevel=2)
    return half_dtype(mixed_precision) if accelerator.native_amp else None


def cast_frozen_parameters(module, dtype, trainable) -> None:
    """Cast the parameters of `module`'s fully frozen layers to `dtype`; trainable ones to fp32.

    A layer holding a trainable parameter keeps all of its own in fp32 (a GroupNorm with a trained
    bias and a half weight would mix dtypes in one kernel); wrapped base layers are cast.
    """
    import torch

    trainable_ids = {id(p) for p in trainable}
    for layer in module.modules():
        own = list(layer.parameters(recurse=False))
        if dtype is None or any(id(p) in trainable_ids for p in own):
            continue
        for parameter in own:
            if parameter.is_floating_point():
                parameter.data = parameter.data.to(dtype)
    for parameter in trainable:
        parameter.data = parameter.data.to(torch.float32)


def place_frozen_models(device, dtype, text_encoders, vae, no_half_vae: bool, trainable=()) -> None:
    """Move the text encoder(s) (a module or a list) and VAE to `device`, their frozen weights in `dtype`
    (None: as they are); the `trainable` parameters (a method's, in a trained text encoder) stay fp32."""
    text_encoders = text_encoders if isinstance(text_encoders, (list, tuple)) else [text_encoders]
    vae.to(device)
    for text_encoder in text_encoders:
        text_encoder.to(device)
        # Parameter by parameter: diffusers' `to(dtype)` warns about fp32-kept modules even when there are none.
        cast_frozen_parameters(text_encoder, dtype, trainable)
    if not no_half_vae:
        cast_frozen_parameters(vae, dtype, ())


def warn_half_vae(pipe, dtype, no_half_vae: bool) -> None:
    """Advise --no-half-vae where an SDXL VAE that overflows in fp16 (its config's `force_upcast`) would run in fp16."""
    import warnings

    import torch

    from .models import is_sdxl

    if is_sdxl(pipe) and dtype == torch.float16 and not no_half_vae and getattr(pipe.vae.config, "force_upcast", True):
        warnings.warn(
            "this SDXL model's VAE overflows in fp16 (its config sets force_upcast): add --no-half-vae to keep "
            "it in fp32, or use --mixed-precision bf16",
            stacklevel=3,
        )


# ---------------------------------------------------------------------------------------------
# Sampling precision: `sdtune sample --dtype`, `evaluate --dtype`, `train --validation-dtype`

DTYPE_NAMES = {"fp16": "float16", "bf16": "bfloat16", "fp32": "float32"}


def sampling_dtype(name: str | None, device):
    """torch's dtype for `name`; None: fp16 on a GPU, fp32 elsewhere (CPUs gain nothing from half weights)."""
    import torch

    if name is None:
        name = "fp16" if torch.device(device).type == "cuda" else "fp32"
    return getattr(torch, DTYPE_NAMES[name])


def vae_dtype(dtype, vae):
    """The dtype the VAE decodes in: fp32 under fp16 when the VAE asks for it (`force_upcast`, which SD v1's
    VAE config leaves at its default, True: it overflows in fp16), else `dtype` (bf16 has fp32's range)."""
    import torch

    if dtype == torch.float16 and getattr(vae.config, "force_upcast", True):
        return torch.float32
    return dtype


def cast_pipeline(pipe, dtype) -> None:
    """Store the UNet and text encoder in `dtype`, the VAE in `vae_dtype(dtype)` (on their devices)."""
    for module in (pipe.unet, pipe.text_encoder, getattr(pipe, "text_encoder_2", None)):
        if module is not None:
            cast_frozen_parameters(module, dtype, ())
    cast_frozen_parameters(pipe.vae, vae_dtype(dtype, pipe.vae), ())
