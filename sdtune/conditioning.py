"""How prompts become the UNet's conditioning: the one place where model families differ for training.

- SD 1.x and 2.x: one text encoder; its last hidden state is `encoder_hidden_states`.
- SDXL: two text encoders; their penultimate hidden states side by side are `encoder_hidden_states`,
  the second's pooled (projected) embedding is `text_embeds`, and each image's micro-conditioning
  (original size, crop top-left, target size: six numbers) is `time_ids`, as diffusers'
  train_text_to_image_sdxl.py and StableDiffusionXLPipeline make them.

Text embeddings are computed once per distinct prompt, one prompt per encoder call, so a prompt's
embedding never depends on the prompts that came with it. Methods see only the UNet and these tensors.

A batch may carry each image's `original_size` (height, width before resizing) and `crop_top_left`
(top, left in resized pixels) as default_collate makes them of an item's pair of ints; where absent they
are the batch's own size and (0, 0), an image that was neither resized nor cropped.
"""

from __future__ import annotations

from dataclasses import dataclass

from .models import is_sdxl, text_encoders, tokenizers


@dataclass
class UNetConditions:
    """What the UNet is conditioned on for a batch, beside the noisy latents and timesteps."""

    encoder_hidden_states: object  # (batch, tokens, width) tensor
    text_embeds: object | None = None  # SDXL: (batch, pooled width)
    time_ids: object | None = None  # SDXL: (batch, 6)

    def unet_kwargs(self) -> dict:
        kwargs = {"encoder_hidden_states": self.encoder_hidden_states}
        if self.text_embeds is not None:
            kwargs["added_cond_kwargs"] = {"text_embeds": self.text_embeds, "time_ids": self.time_ids}
        return kwargs

    def _map(self, function) -> "UNetConditions":
        return UNetConditions(*(None if part is None else function(part) for part in vars(self).values()))

    def to(self, device) -> "UNetConditions":
        return self._map(lambda t: t.to(device))

    def cpu(self) -> "UNetConditions":
        return self._map(lambda t: t.detach().cpu())

    def repeat_interleave(self, repeats: int) -> "UNetConditions":
        return self._map(lambda t: t.repeat_interleave(repeats, dim=0))

    def __getitem__(self, part) -> "UNetConditions":
        return self._map(lambda t: t[part])

    def __len__(self) -> int:
        return len(self.encoder_hidden_states)


def as_conditions(value) -> UNetConditions:
    """`value` as UNetConditions: a bare tensor is an SD 1.x/2.x `encoder_hidden_states`."""
    return value if isinstance(value, UNetConditions) else UNetConditions(value)


def _pairs(value, count: int, default: tuple[int, int]):
    """A (count, 2) tensor from a batch field: a (count, 2) tensor, or default_collate's [heights, widths]."""
    import torch

    if value is None:
        return torch.tensor([list(default)] * count, dtype=torch.float32)
    if isinstance(value, (list, tuple)) and len(value) == 2 and all(torch.is_tensor(v) and v.ndim == 1 for v in value):
        return torch.stack([v.float() for v in value], dim=-1)
    return torch.as_tensor(value, dtype=torch.float32).reshape(count, 2)


def time_ids(batch, count: int, size: tuple[int, int]):
    """SDXL's micro-conditioning of each image: original size + crop top-left + target size (`size`)."""
    import torch

    batch = batch or {}
    original = _pairs(batch.get("original_size"), count, size)
    crop = _pairs(batch.get("crop_top_left"), count, (0, 0))
    target = torch.tensor([list(size)] * count, dtype=torch.float32)
    return torch.cat([original, crop, target], dim=1)


class PromptConditioning:
    """A pipeline's prompts → UNetConditions, with each prompt's text embeddings computed once."""

    def __init__(self, pipe):
        self.tokenizers = tokenizers(pipe)
        self.text_encoders = text_encoders(pipe)
        self.sdxl = is_sdxl(pipe)
        self.vae_scale_factor = pipe.vae_scale_factor
        self.cache: dict = {}  # prompt -> (hidden states, pooled embedding or None)

    def encode(self, ids_per_encoder):
        """One prompt's (hidden states, pooled embedding or None) from its token ids for each encoder."""
        if not self.sdxl:
            encoder = self.text_encoders[0]
            return encoder(ids_per_encoder[0][None].to(encoder.device))[0][0], None
        import torch

        hidden, pooled = [], None
        for encoder, ids in zip(self.text_encoders, ids_per_encoder):
            output = encoder(ids[None].to(encoder.device), output_hidden_states=True)
            hidden.append(output.hidden_states[-2][0])
            pooled = output[0][0]  # the last encoder's projected embedding (CLIPTextModelWithProjection)
        return torch.cat([h.to(hidden[-1].dtype) for h in hidden], dim=-1), pooled

    def precompute(self, prompts) -> None:
        import torch

        missing = sorted({p for p in prompts if p not in self.cache})
        if not missing:
            return
        ids = [
            tokenizer(missing, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                      return_tensors="pt").input_ids
            for tokenizer in self.tokenizers
        ]
        with torch.no_grad():
            for index, prompt in enumerate(missing):
                # One prompt per call: the embedding does not depend on which prompts came with it.
                self.cache[prompt] = self.encode([per_encoder[index] for per_encoder in ids])

    def __call__(self, prompts, device, batch=None, size=None) -> UNetConditions:
        """The conditions of `prompts`; for SDXL also the time ids of `batch`'s images, which are
        `size` (height, width) pixels."""
        import torch

        self.precompute(prompts)
        hidden = torch.stack([self.cache[p][0] for p in prompts]).to(device)
        if not self.sdxl:
            return UNetConditions(hidden)
        if size is None:
            raise ValueError("SDXL's conditioning needs the images' size: it is part of the time ids")
        pooled = torch.stack([self.cache[p][1] for p in prompts]).to(device)
        ids = time_ids(batch, len(prompts), tuple(int(s) for s in size)).to(device, pooled.dtype)
        return UNetConditions(hidden, pooled, ids)
