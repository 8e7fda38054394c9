"""What the UNet trains on: latents from the VAE (prompts become conditioning in conditioning.py).

Text embeddings are computed once per distinct prompt, and images are encoded one per VAE call, so an
image's latents never depend on the images that came with it. By default (`--no-cache-latents` turns it
off) each training image is encoded once as it is and, with random flips, once mirrored, before the
loop; the loop then samples from the stored latent distributions: the VAE is not run again (it can leave
the accelerator), random flips stay, and for a given seed a cached run draws the same random numbers and
trains on the same latents, bit for bit, as an uncached one.
"""

from __future__ import annotations

from .data import random_flip

ENCODE_BATCH = 8  # images read at a time while filling the cache


def encode_images(vae, pixels):
    """The VAE's latent-distribution parameters (mean and log-variance, stacked) for a batch of images.

    One image per VAE call: the library kernels round differently for different batch sizes, and a
    cached image must give the latents it gives when it is encoded in the loop's batches.
    """
    import torch

    with torch.no_grad():
        pixels = pixels.to(vae.device, vae.dtype)
        return torch.cat([vae.encode(pixels[i : i + 1]).latent_dist.parameters for i in range(len(pixels))])


class _Examples:
    """A dataset's examples in one orientation, for a DataLoader that fills the latent cache."""

    def __init__(self, dataset, flip: bool):
        self.dataset, self.flip = dataset, flip

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict:
        return self.dataset.example(index, self.flip)


class CachedLatents:
    """A dataset's items with the VAE's latent distribution (`"latent_parameters"`) in place of the pixels.

    The dataset must offer `example(index, flip)`; every image is encoded up front, in both orientations
    when the dataset flips at random, and kept on the CPU (the data loader moves each batch to the device).
    The other fields of each item (its prompt, original size and crop, which a flip changes) are kept
    too, so drawing an item decodes nothing; a dataset that decodes its images when drawn
    (`decodes_on_draw`) is read by `workers` processes while filling. Images of several sizes (aspect-ratio
    buckets) keep latents of several sizes, one tensor each.
    """

    def __init__(self, dataset, vae, workers: int = 0):
        import torch

        self.dataset = dataset
        self.random_flip = getattr(dataset, "random_flip", False)
        self.parameters = {}
        self.items: dict[bool, list[dict]] = {}
        for flip in (False, True) if self.random_flip else (False,):
            loader = torch.utils.data.DataLoader(
                _Examples(dataset, flip), batch_size=ENCODE_BATCH, num_workers=workers, collate_fn=list
            )
            parameters, self.items[flip] = [], []
            batches = iter(loader)
            try:
                for examples in batches:
                    for example in examples:  # one image per VAE call (encode_images), whatever their sizes
                        parameters.append(encode_images(vae, example["pixels"][None])[0].cpu())
                    self.items[flip] += [{k: v for k, v in example.items() if k != "pixels"} for example in examples]
            finally:  # a worker's error keeps this iterator in its traceback, and so the workers, while the error is kept
                end_loader_workers(batches)
            one_size = len({tuple(p.shape) for p in parameters}) == 1
            self.parameters[flip] = torch.stack(parameters) if one_size else parameters

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict:
        flip = self.random_flip and random_flip()  # the same draw the dataset itself makes
        return {**self.items[flip][index], "latent_parameters": self.parameters[flip][index]}

    def prompts(self) -> list[str]:
        return [item["prompt"] for item in self.items[False]]


def end_loader_workers(batches) -> None:
    """End a DataLoader iterator's worker processes now, not when the iterator is freed (if it has any)."""
    shutdown = getattr(batches, "_shutdown_workers", None)  # torch's multiprocessing iterator alone has workers
    if shutdown is not None:
        shutdown()


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
