"""A tiny SDXL: its UNet's structure (two text encoders, added text/time conditioning, 1 and 2
transformer layers per block) at tiny widths, random weights, as diffusers' own SDXL tests build it."""

from __future__ import annotations

import json
from pathlib import Path

import torch

SDXL_UNET_CONFIG = Path(__file__).parent / "data" / "sdxl_unet_config.json"  # stabilityai/stable-diffusion-xl-base-1.0's
TIME_EMBED_DIM = 8
TEXT_DIM = 32  # each text encoder's width; the UNet attends to both, concatenated


def sdxl_unet_config() -> dict:
    """The full-size SDXL base UNet's config."""
    return json.loads(SDXL_UNET_CONFIG.read_text())


def tiny_sdxl_unet_config() -> dict:
    return dict(
        block_out_channels=(32, 64),
        layers_per_block=2,
        sample_size=16,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=TIME_EMBED_DIM,
        transformer_layers_per_block=(1, 2),
        projection_class_embeddings_input_dim=6 * TIME_EMBED_DIM + TEXT_DIM,  # six time ids + pooled text
        cross_attention_dim=2 * TEXT_DIM,
        norm_num_groups=8,
    )


def tiny_sdxl_unet(seed: int = 0):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(**tiny_sdxl_unet_config()).eval()


def tiny_text_encoders(seed: int = 0) -> dict:
    """SDXL's two text encoders, by pipeline component name (the second with a projection)."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from sdtune.models import _tiny_tokenizer_files

    vocab, _ = _tiny_tokenizer_files()  # the tiny tokenizer's, as the tiny SD model's encoder
    end = vocab["<|endoftext|>"]
    config = CLIPTextConfig(
        vocab_size=len(vocab), bos_token_id=vocab["<|startoftext|>"], eos_token_id=end, pad_token_id=end,
        hidden_size=TEXT_DIM, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2,
        max_position_embeddings=77, projection_dim=TEXT_DIM,
    )
    torch.manual_seed(seed)
    first = CLIPTextModel(config).eval()
    torch.manual_seed(seed + 1)
    second = CLIPTextModelWithProjection(config).eval()
    return {"text_encoder": first, "text_encoder_2": second}


def tiny_sdxl_pipeline(seed: int = 0):
    """A StableDiffusionXLPipeline around the tiny UNet and text encoders."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline

    from sdtune.models import _tiny_tokenizer

    torch.manual_seed(seed)
    vae = AutoencoderKL(
        block_out_channels=[32, 64], in_channels=3, out_channels=3, latent_channels=4, norm_num_groups=8,
        down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2, sample_size=32,
    )
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", timestep_spacing="leading")
    encoders = tiny_text_encoders(seed)
    return StableDiffusionXLPipeline(
        vae=vae, unet=tiny_sdxl_unet(seed), scheduler=scheduler, tokenizer=_tiny_tokenizer(),
        tokenizer_2=_tiny_tokenizer(), **encoders,
    )


def unet_inputs(batch: int = 2, seed: int = 5) -> tuple:
    """(latents, timesteps, encoder hidden states, added conditions) for the tiny SDXL UNet."""
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(batch, 4, 16, 16, generator=g),
        torch.tensor([10, 700][:batch]),
        torch.randn(batch, 7, 2 * TEXT_DIM, generator=g),
        {"text_embeds": torch.randn(batch, TEXT_DIM, generator=g), "time_ids": torch.randn(batch, 6, generator=g) * 100},
    )
