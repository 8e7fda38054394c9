"""Mixed precision: trainable parameters in fp32, the frozen models in the half dtype to save memory.

Accelerate's autocast runs the forward in the half dtype either way; storing the frozen weights in it
halves their memory. A VAE may overflow in fp16 (SDXL's does), so `--no-half-vae` keeps it in fp32; sampling
decodes SD v1/v2 VAEs in fp16 and decodes a batch again in fp32 where that overflows (`sampling.decode`).
"""

from __future__ import annotations

import weakref

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


# VAEs whose fp16 decode overflowed: they decode in fp32 for the rest of their life (`keep_vae_in_fp32`)
_OVERFLOWED_VAES = weakref.WeakSet()
# the fp32 weights a VAE had before `cast_vae` stored it in fp16, on the host, so that going back to fp32 is exact
_FP32_VAE_WEIGHTS = weakref.WeakKeyDictionary()


def vae_dtype(dtype, pipe):
    """The dtype the pipeline's VAE is stored and decodes in when sampling in `dtype`: fp32 under fp16 for an SDXL
    VAE whose config sets `force_upcast` (it is known to overflow in fp16; diffusers' SDXL pipeline upcasts it too)
    and for a VAE whose fp16 decode has overflowed, else `dtype`. SD v1/v2 VAEs leave `force_upcast` at its default,
    True, yet decode in fp16 as diffusers' own pipeline decodes them; `sampling.decode` catches an overflow."""
    import torch

    from .models import is_sdxl

    vae = pipe.vae
    if dtype == torch.float16 and (vae in _OVERFLOWED_VAES or (is_sdxl(pipe) and getattr(vae.config, "force_upcast", True))):
        return torch.float32
    return dtype


def cast_vae(vae, dtype) -> None:
    """Store the VAE in `dtype`. Its first cast from fp32 to fp16 keeps the fp32 weights on the host, and a cast back
    to fp32 restores them, so an fp32 decode after an fp16 one (an overflow's retry) is exactly an fp32 decode."""
    import torch

    kept = _FP32_VAE_WEIGHTS.get(vae)
    if dtype == torch.float32 and kept is not None:
        for name, parameter in vae.named_parameters():
            parameter.data = kept[name].to(parameter.device)
        return
    if dtype == torch.float16 and kept is None and vae.dtype == torch.float32:
        # a new tensor on the host (the device's is replaced by its fp16 copy below, so on a CPU this copies nothing)
        _FP32_VAE_WEIGHTS[vae] = {name: parameter.data.to("cpu") for name, parameter in vae.named_parameters()}
    cast_frozen_parameters(vae, dtype, ())


def keep_vae_in_fp32(pipe) -> None:
    """After the VAE's fp16 decode overflowed: store it in fp32 now and whenever the pipeline is cast again, and say so once."""
    import warnings

    import torch

    if pipe.vae not in _OVERFLOWED_VAES:
        warnings.warn("the VAE overflowed in fp16 (its decode gave inf or NaN): decoding that batch again, and every later "
                      "one, in fp32", stacklevel=3)
        _OVERFLOWED_VAES.add(pipe.vae)
    cast_vae(pipe.vae, torch.float32)


def cast_pipeline(pipe, dtype) -> None:
    """Store the UNet and text encoder in `dtype`, the VAE in `vae_dtype(dtype, pipe)` (on their devices)."""
    for module in (pipe.unet, pipe.text_encoder, getattr(pipe, "text_encoder_2", None)):
        if module is not None:
            cast_frozen_parameters(module, dtype, ())
    cast_vae(pipe.vae, vae_dtype(dtype, pipe))
