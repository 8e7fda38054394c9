"""Plain helpers the test modules share (fixtures live in conftest.py)."""

from __future__ import annotations

import torch


def run_unet(unet, inputs) -> torch.Tensor:
    """The UNet's prediction on fixed `inputs`, without gradients: (latents, timesteps, text embeddings), SDXL's
    with its added conditions (a dict) fourth, or (latents, timesteps, a `conditioning` object)."""
    latents, timesteps, conditions, *added = inputs
    with torch.no_grad():
        if hasattr(conditions, "unet_kwargs"):
            return unet(latents, timesteps, **conditions.unet_kwargs()).sample
        if added:
            return unet(latents, timesteps, encoder_hidden_states=conditions, added_cond_kwargs=added[0]).sample
        return unet(latents, timesteps, conditions).sample


def crash_after_checkpoint(monkeypatch, at_step: int) -> None:
    """Make runs stop (KeyboardInterrupt) right after writing their checkpoint of `at_step`, before the adapter
    is written: a crash to resume from. `monkeypatch.undo()` ends it."""
    import sdtune.checkpoints

    original_save = sdtune.checkpoints.save_checkpoint

    def save_then_crash(accelerator, out, step, *args, **kwargs):
        folder = original_save(accelerator, out, step, *args, **kwargs)
        if step == at_step:
            raise KeyboardInterrupt
        return folder

    monkeypatch.setattr(sdtune.checkpoints, "save_checkpoint", save_then_crash)


def uninterrupted_and_resumed(configure, folder, monkeypatch, at_step: int):
    """(a whole run, the same run stopped after its checkpoint of `at_step` and resumed): `configure(output,
    **changes)` gives each run's TrainConfig."""
    import pytest

    from sdtune.training import train

    whole = train(configure(folder / "whole"), progress=False)
    crash_after_checkpoint(monkeypatch, at_step)
    with pytest.raises(KeyboardInterrupt):
        train(configure(folder / "split"), progress=False)
    monkeypatch.undo()
    return whole, train(configure(folder / "split", resume="latest"), progress=False)


# Names as kohya-ss writes them: a UNet convolution, a UNet attention projection, a text-encoder projection
KOHYA_CONV = "lora_unet_up_blocks_1_resnets_0_conv2"
KOHYA_ATTN = "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn2_to_k"
KOHYA_TE = "lora_te_text_model_encoder_layers_0_self_attn_q_proj"


def kohya_tucker_conv(generator: torch.Generator) -> dict:
    """A rank-3 Tucker LoCon on `KOHYA_CONV` (64 channels, 3x3), as kohya-ss stores one (no sdtune metadata)."""
    return {
        f"{KOHYA_CONV}.lora_down.weight": torch.randn(3, 64, 1, 1, generator=generator),
        f"{KOHYA_CONV}.lora_mid.weight": torch.randn(3, 3, 3, 3, generator=generator),
        f"{KOHYA_CONV}.lora_up.weight": torch.randn(64, 3, 1, 1, generator=generator) * 0.1,
        f"{KOHYA_CONV}.alpha": torch.tensor(1.5),
    }


def icc_profile(name: str, red, green, blue) -> bytes:
    """A matrix ICC profile (v2, monitor class, RGB to XYZ) with sRGB's tone curve, `red`, `green` and `blue` the
    primaries' XYZ (D50-adapted) and `name` its description: what a phone or camera embeds in its photos."""
    import struct

    def fixed(value: float) -> bytes:
        return struct.pack(">i", round(value * 65536))  # s15Fixed16

    def xyz(x: float, y: float, z: float) -> bytes:
        return b"XYZ " + bytes(4) + fixed(x) + fixed(y) + fixed(z)

    # parametric curve type 3: sRGB's, (a·v + b)^g above d, c·v below
    srgb_curve = b"para" + bytes(4) + struct.pack(">HH", 3, 0) + b"".join(fixed(v) for v in (2.4, 1 / 1.055, 0.055 / 1.055, 1 / 12.92, 0.04045))
    text = name.encode() + b"\0"
    description = b"desc" + bytes(4) + struct.pack(">I", len(text)) + text + bytes(8 + 3 + 67)  # no Unicode nor Mac name
    tags = [(b"desc", description), (b"wtpt", xyz(0.9642, 1.0, 0.8249)), (b"rXYZ", xyz(*red)), (b"gXYZ", xyz(*green)),
            (b"bXYZ", xyz(*blue)), (b"rTRC", srgb_curve), (b"gTRC", srgb_curve), (b"bTRC", srgb_curve),
            (b"cprt", b"text" + bytes(4) + b"none\0")]
    start = 128 + 4 + 12 * len(tags)
    table, body = b"", b""
    for signature, data in tags:
        body += bytes(-(start + len(body)) % 4)  # tags start on 4-byte boundaries
        table += signature + struct.pack(">II", start + len(body), len(data))
        body += data
    header = (struct.pack(">I", start + len(body)) + b"lcms" + bytes([2, 0x10, 0, 0]) + b"mntr" + b"RGB " + b"XYZ " + bytes(12)
              + b"acsp" + bytes(24) + bytes(4) + fixed(0.9642) + fixed(1.0) + fixed(0.8249) + bytes(48))
    return header + struct.pack(">I", len(tags)) + table + body


# the primaries of Apple's Display P3 (an iPhone's photos) and of sRGB, D50-adapted, as their ICC profiles give them
DISPLAY_P3 = ((0.51512, 0.24120, -0.00105), (0.29198, 0.69225, 0.04189), (0.15710, 0.06657, 0.78407))
SRGB = ((0.43607, 0.22249, 0.01392), (0.38515, 0.71687, 0.09708), (0.14307, 0.06061, 0.71410))


def cmyk_profile(name: str, lab_of) -> bytes:
    """A CMYK output ICC profile (v2, printer class, CMYK to Lab) of one A2B0 table (lut16Type) over the 16 corners of
    the CMYK cube: `lab_of(c, m, y, k)` (each 0 or 1) gives each corner's Lab; lcms interpolates between them. What a
    print file's JPEG embeds (ImageCms builds only sRGB, Lab and XYZ profiles)."""
    import itertools
    import struct

    def fixed(value: float) -> bytes:
        return struct.pack(">i", round(value * 65536))

    def lab16(lightness: float, a: float, b: float) -> bytes:  # version 2's 16-bit Lab: L 0..100 on 0..0xFF00, a and b + 128
        return struct.pack(">3H", round(lightness * 0xFF00 / 100), round((a + 128) * 256), round((b + 128) * 256))

    grid = b"".join(lab16(*lab_of(*corner)) for corner in itertools.product((0, 1), repeat=4))  # C slowest, K fastest
    identity = b"".join(fixed(v) for v in (1, 0, 0, 0, 1, 0, 0, 0, 1))
    ramp = struct.pack(">2H", 0, 65535)
    lut = b"mft2" + bytes(4) + bytes([4, 3, 2, 0]) + identity + struct.pack(">HH", 2, 2) + ramp * 4 + grid + ramp * 3
    text = name.encode() + b"\0"
    description = b"desc" + bytes(4) + struct.pack(">I", len(text)) + text + bytes(8 + 3 + 67)
    white = b"XYZ " + bytes(4) + fixed(0.9642) + fixed(1.0) + fixed(0.8249)
    tags = [(b"desc", description), (b"wtpt", white), (b"A2B0", lut), (b"cprt", b"text" + bytes(4) + b"none\0")]
    start = 128 + 4 + 12 * len(tags)
    table, body = b"", b""
    for signature, data in tags:
        body += bytes(-(start + len(body)) % 4)
        table += signature + struct.pack(">II", start + len(body), len(data))
        body += data
    header = (struct.pack(">I", start + len(body)) + b"lcms" + bytes([2, 0x10, 0, 0]) + b"prtr" + b"CMYK" + b"Lab " + bytes(12)
              + b"acsp" + bytes(24) + bytes(4) + fixed(0.9642) + fixed(1.0) + fixed(0.8249) + bytes(48))
    return header + struct.pack(">I", len(tags)) + table + body
