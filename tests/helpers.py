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
