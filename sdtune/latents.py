"""What the UNet trains on: latents from the VAE and prompt embeddings from the text encoder.

Text embeddings are computed once per distinct prompt. With `--cache-latents`, each training image is
encoded once as it is and once mirrored, and the loop samples from the stored latent distributions: the
VAE is not run again (it can leave the accelerator), random flips stay, and for a given seed a cached
run draws exactly the random numbers an uncached one does.
"""

from __future__ import annotations

from .data import random_flip

ENCODE_BATCH = 8  # images per VAE call while filling the cache


class PromptEmbeddings:
    """Text-encoder outputs, computed once per distinct prompt."""

    def __init__(self, tokenizer, text_encoder):
        self.tokenizer = tokenizer
        self.text_encoder = text_encoder
        self.cache: dict = {}

    def precompute(self, prompts) -> None:
        import torch

        missing = sorted({p for p in prompts if p not in self.cache})
        if not missing:
            return
        ids = self.tokenizer(
            missing,
            padding="max_length",
            max_length=self.tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids
        with torch.no_grad():
            for prompt, single in zip(missing, ids):
                # One prompt per call: the embedding does not depend on which prompts came with it.
                self.cache[prompt] = self.text_encoder(single[None].to(self.text_encoder.device))[0][0]

    def __call__(self, prompts, device):
        import torch

        self.precompute(prompts)
        return torch.stack([self.cache[p] for p in prompts]).to(device)


def encode_images(vae, pixels):
    """The VAE's latent-distribution parameters (mean and log-variance, stacked) for a batch of images."""
    import torch

    with torch.no_grad():
        return vae.encode(pixels.to(vae.device, vae.dtype)).latent_dist.parameters


class CachedLatents:
    """A dataset's items with the VAE's latent distribution (`"latent_parameters"`) in place of the pixels.

    The dataset must offer `example(index, flip)`; every image is encoded up front, in both orientations
    when the dataset flips at random, and kept on the CPU (the data loader moves each batch to the device).
    """

    def __init__(self, dataset, vae):
        import torch

        self.dataset = dataset
        self.random_flip = getattr(dataset, "random_flip", False)
        self.parameters = {}
        for flip in (False, True) if self.random_flip else (False,):
            chunks = []
            for start in range(0, len(dataset), ENCODE_BATCH):
                indices = range(start, min(start + ENCODE_BATCH, len(dataset)))
                pixels = torch.stack([dataset.example(i, flip)["pixels"] for i in indices])
                chunks.append(encode_images(vae, pixels).cpu())
            self.parameters[flip] = torch.cat(chunks)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict:
        flip = self.random_flip and random_flip()  # the same draw the dataset itself makes
        example = {k: v for k, v in self.dataset.example(index, flip).items() if k != "pixels"}
        example["latent_parameters"] = self.parameters[flip][index]
        return example

    def prompts(self) -> list[str]:
        return [self.dataset.example(i, False)["prompt"] for i in range(len(self.dataset))]


def batch_latents(batch, vae):
    """Scaled latents for a batch: sampled from the cached distributions, or encoded now."""
    import torch
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

    with torch.no_grad():
        if "latent_parameters" in batch:
            distribution = DiagonalGaussianDistribution(batch["latent_parameters"])
        else:
            distribution = DiagonalGaussianDistribution(encode_images(vae, batch["pixels"]))
        # contiguous: the VAE's output may be channels-last, and the library convolutions round
        # differently by layout; cached and uncached runs must feed the UNet the same thing
        return (distribution.sample() * vae.config.scaling_factor).contiguous()
