"""Mixed precision: trainable parameters in fp32, the frozen models in the half dtype to save memory.

Accelerate's autocast runs the forward in the half dtype either way; storing the frozen weights in it
halves their memory. A VAE may overflow in fp16 (SDXL's does), so `--no-half-vae` keeps it in fp32; SD v1/v2 VAEs
decode in fp16, and the images whose fp16 decode overflows are decoded again in fp32 through the decoder side's exact
fp32 weights, while the VAE stays fp16 (`sampling.decode`, `fp32_decoder`).
"""

from __future__ import annotations

import contextlib
import weakref

from .errors import warn

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

    mixed_precision = accelerator.mixed_precision
    if mixed_precision == "fp16" and not accelerator.native_amp:
        warn(f"--mixed-precision fp16 has no effect on {accelerator.device.type} (training runs in fp32); bf16 does")
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
    import torch

    text_encoders = text_encoders if isinstance(text_encoders, (list, tuple)) else [text_encoders]
    vae.to(device)
    for text_encoder in text_encoders:
        text_encoder.to(device)
        # Parameter by parameter: diffusers' `to(dtype)` warns about fp32-kept modules even when there are none.
        cast_frozen_parameters(text_encoder, dtype, trainable)
    if not no_half_vae:
        if dtype == torch.float16:  # for the fp32 decode of an overflowing validation or class image (`fp32_decoder`);
            keep_fp32_weights(vae, decoder_side_names(vae))  # 198 MB of RAM for SD's VAE
        cast_frozen_parameters(vae, dtype, ())


def warn_half_vae(pipe, dtype, no_half_vae: bool) -> None:
    """Advise --no-half-vae where an SDXL VAE that overflows in fp16 (its config's `force_upcast`) would run in fp16."""

    import torch

    from .models import is_sdxl

    if is_sdxl(pipe) and dtype == torch.float16 and not no_half_vae and getattr(pipe.vae.config, "force_upcast", True):
        warn(
            "this SDXL model's VAE overflows in fp16 (its config sets force_upcast): add --no-half-vae to keep "
            "it in fp32, or use --mixed-precision bf16",
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


# The fp32 weights a VAE had before it was first stored in fp16, on the host: all of them where `cast_vae` stored it (a
# cast back to fp32 restores them, exactly), its decoder side's where training did (`place_frozen_models`), for the fp32
# decode of the images whose fp16 decode overflowed (`fp32_decoder`).
_FP32_VAE_WEIGHTS = weakref.WeakKeyDictionary()
# The same decoder-side fp32 weights on the VAE's device, moved there at its first overflow and kept for the next ones
# so that a retry copies nothing: for SD's VAE 49.5M parameters, 198 MB of device memory for the rest of its life.
_FP32_DECODERS_ON_DEVICE = weakref.WeakKeyDictionary()
# VAEs whose fp16 decode has overflowed, which `warn_vae_overflow` has said once
_WARNED_VAES = weakref.WeakSet()
# What avoids the fp32 decode after an fp16 one: in `sdtune sample`, `evaluate` and `explain`, and in training (the
# validation grids and class images decode in the training VAE's dtype)
SAMPLING_VAE_REMEDY = "`--dtype bf16` or fp32"
TRAINING_VAE_REMEDY = "`--mixed-precision bf16` or `--no-half-vae`"


def vae_dtype(dtype, pipe):
    """The dtype the pipeline's VAE is stored and decodes in when sampling in `dtype`: fp32 under fp16 for an SDXL
    VAE whose config sets `force_upcast` (it is known to overflow in fp16; diffusers' SDXL pipeline upcasts it too),
    else `dtype`. SD v1/v2 VAEs leave `force_upcast` at its default, True, yet decode in fp16 as diffusers' own
    pipeline decodes them; `sampling.decode` decodes the images that overflow again in fp32, and the VAE stays fp16."""
    import torch

    from .models import is_sdxl

    if dtype == torch.float16 and is_sdxl(pipe) and getattr(pipe.vae.config, "force_upcast", True):
        return torch.float32
    return dtype


def decoder_side_names(vae) -> list[str]:
    """The names of the parameters a decode goes through: post_quant_conv's (where the VAE has one), the decoder's."""
    return [name for name, _ in vae.named_parameters() if name.startswith(("post_quant_conv.", "decoder."))]


def decoder_dtype(vae):
    """The dtype the VAE decodes in (`vae.dtype` is its first parameter's, the encoder's): its decoder's, which
    post_quant_conv's always shares (the decoder side is cast and swapped as one)."""
    return next(vae.decoder.parameters()).dtype


def keep_fp32_weights(vae, names) -> None:
    """Keep the fp32 weights `names` of a VAE about to be stored in fp16, on the host, once."""
    import torch

    if vae in _FP32_VAE_WEIGHTS or decoder_dtype(vae) != torch.float32:
        return
    parameters = dict(vae.named_parameters())
    # a new tensor on the host (the device's is replaced by its fp16 copy next, so on a CPU this copies nothing)
    _FP32_VAE_WEIGHTS[vae] = {name: parameters[name].data.to("cpu") for name in names}


def cast_vae(vae, dtype) -> None:
    """Store the VAE in `dtype`. Its first cast from fp32 to fp16 keeps the fp32 weights on the host, and a cast back
    to fp32 restores them, so a pipeline cast to fp16 and back to fp32 (`sdtune sample` merging an adapter at each
    strength) has the VAE's own fp32 weights, not their fp16 rounding."""
    import torch

    kept = _FP32_VAE_WEIGHTS.get(vae)
    if dtype == torch.float32 and kept is not None:
        on_device = _FP32_DECODERS_ON_DEVICE.get(vae, {})
        for name, parameter in vae.named_parameters():
            if name in on_device and on_device[name].device == parameter.device:
                parameter.data = on_device[name]  # the same tensor, no second fp32 copy on the device
            elif name in kept:
                parameter.data = kept[name].to(parameter.device)
            else:  # kept for its decoder side only (a training VAE): its fp16 weights, exactly in fp32
                parameter.data = parameter.data.to(torch.float32)
        return
    if dtype == torch.float16:
        keep_fp32_weights(vae, [name for name, _ in vae.named_parameters()])
    cast_frozen_parameters(vae, dtype, ())


@contextlib.contextmanager
def fp32_decoder(vae):
    """The VAE's decoder side (post_quant_conv and decoder) in its exact fp32 weights inside the `with` block, its
    fp16 ones back after; the parameters' tensors are swapped, not copied (but at the first overflow on a device, see
    `_FP32_DECODERS_ON_DEVICE`). The encoder stays as it is."""
    import torch

    names = decoder_side_names(vae)
    parameters = dict(vae.named_parameters())
    device = parameters[names[0]].device
    on_device = _FP32_DECODERS_ON_DEVICE.get(vae)
    if on_device is None or on_device[names[0]].device != device:
        kept = _FP32_VAE_WEIGHTS.get(vae, {})
        # a VAE stored in fp16 with no fp32 weights kept (loaded in fp16): its fp16 weights, exactly in fp32
        on_device = {name: kept.get(name, parameters[name].data).to(device, torch.float32) for name in names}
        _FP32_DECODERS_ON_DEVICE[vae] = on_device
    half = {name: parameters[name].data for name in names}
    try:
        for name in names:
            parameters[name].data = on_device[name]
        yield
    finally:
        for name in names:
            parameters[name].data = half[name]


def warn_vae_overflow(vae, remedy: str) -> None:
    """Say once per VAE, in one line, that its fp16 decode overflowed and what avoids the fp32 decode after it."""

    if vae not in _WARNED_VAES:
        _WARNED_VAES.add(vae)
        warn(f"the VAE overflowed in fp16 (inf or NaN): the images that overflow are decoded again in fp32; "
             f"for a VAE that overflows often, {remedy} avoids the double decode")


def cast_pipeline(pipe, dtype) -> None:
    """Store the UNet and text encoder in `dtype`, the VAE in `vae_dtype(dtype, pipe)` (on their devices)."""
    for module in (pipe.unet, pipe.text_encoder, getattr(pipe, "text_encoder_2", None)):
        if module is not None:
            cast_frozen_parameters(module, dtype, ())
    cast_vae(pipe.vae, vae_dtype(dtype, pipe))
