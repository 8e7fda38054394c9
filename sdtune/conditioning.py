"""How prompts become the UNet's conditioning: the one place where model families differ for training.

- SD 1.x and 2.x: one text encoder; its last hidden state is `encoder_hidden_states`.
- SDXL: two text encoders; their penultimate hidden states side by side are `encoder_hidden_states`,
  the second's pooled (projected) embedding is `text_embeds`, and each image's micro-conditioning
  (original size, crop top-left, target size: six numbers) is `time_ids`, as diffusers'
  train_text_to_image_sdxl.py and StableDiffusionXLPipeline make them.

With a CLIP skip of k > 1 (SD 1.x and 2.x), the encoder's k-th hidden state from the end, through its final
layer norm, replaces the last hidden state, as kohya-ss trains and AUTOMATIC1111 and diffusers (`clip_skip`
k − 1) sample; the pipeline is then given these embeddings (`pipeline_prompts`), so training and sampling
compute them alike.

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
    """A pipeline's prompts → UNetConditions, with each prompt's text embeddings computed once.

    `trained` (a text encoder being trained): nothing is cached, and every call runs the encoders on its
    whole batch of prompts, with gradients.
    """

    def __init__(self, pipe, trained: bool = False, clip_skip: int = 1):
        self.tokenizers = tokenizers(pipe)
        self.text_encoders = text_encoders(pipe)  # replaced by their prepared (wrapped) forms when trained
        self.sdxl = is_sdxl(pipe)
        self.trained = trained
        self.clip_skip = clip_skip
        self.cache: dict = {}  # prompt -> (hidden states, pooled embedding or None)
        # False (shuffled captions, whose tag orders are too many to keep): the cache keeps what
        # `precompute` put in it, and other prompts are encoded each time they come, to the same values.
        self.remember_new = True

    def token_ids(self, prompts) -> list:
        """The prompts' token ids for each encoder, padded to its length."""
        return [
            tokenizer(list(prompts), padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                      return_tensors="pt").input_ids
            for tokenizer in self.tokenizers
        ]

    def encode_batch(self, ids_per_encoder):
        """(hidden states, pooled embeddings or None) of a batch of prompts, from their token ids for each encoder."""
        if not self.sdxl:
            encoder = self.text_encoders[0]
            ids = ids_per_encoder[0].to(encoder.device)
            if self.clip_skip == 1:
                return encoder(ids)[0], None
            hidden = encoder(ids, output_hidden_states=True).hidden_states[-self.clip_skip]
            return final_layer_norm(encoder)(hidden), None
        import torch

        hidden, pooled = [], None
        for encoder, ids in zip(self.text_encoders, ids_per_encoder):
            output = encoder(ids.to(encoder.device), output_hidden_states=True)
            hidden.append(output.hidden_states[-2])
            pooled = output[0]  # the last encoder's projected embedding (CLIPTextModelWithProjection)
        return torch.cat([h.to(hidden[-1].dtype) for h in hidden], dim=-1), pooled

    def encode(self, ids_per_encoder):
        """One prompt's (hidden states, pooled embedding or None) from its token ids for each encoder."""
        hidden, pooled = self.encode_batch([ids[None] for ids in ids_per_encoder])
        return hidden[0], None if pooled is None else pooled[0]

    def precompute(self, prompts) -> None:
        if self.trained:
            return
        self.cache.update(self.encode_prompts({p for p in prompts if p not in self.cache}))

    def encode_prompts(self, prompts) -> dict:
        """Each prompt's (hidden states, pooled embedding or None), one prompt per encoder call."""
        import torch

        missing = sorted(prompts)
        if not missing:
            return {}
        ids = self.token_ids(missing)
        with torch.no_grad():
            # One prompt per call: the embedding does not depend on which prompts came with it.
            return {prompt: self.encode([per_encoder[index] for per_encoder in ids]) for index, prompt in enumerate(missing)}

    def lookup(self, prompts) -> dict:
        """prompt -> its cached or freshly computed embeddings, for every prompt of `prompts`."""
        if self.remember_new:
            self.precompute(prompts)
            return self.cache
        return {**self.cache, **self.encode_prompts({p for p in prompts if p not in self.cache})}

    def __call__(self, prompts, device, batch=None, size=None) -> UNetConditions:
        """The conditions of `prompts`; for SDXL also the time ids of `batch`'s images, which are
        `size` (height, width) pixels."""
        import torch

        if self.trained:
            hidden, pooled = self.encode_batch(self.token_ids(prompts))
            hidden = hidden.to(device)
        else:
            found = self.lookup(prompts)
            hidden = torch.stack([found[p][0] for p in prompts]).to(device)
        if not self.sdxl:
            return UNetConditions(hidden)
        if size is None:
            raise ValueError("SDXL's conditioning needs the images' size: it is part of the time ids")
        pooled = pooled.to(device) if self.trained else torch.stack([found[p][1] for p in prompts]).to(device)
        ids = time_ids(batch, len(prompts), tuple(int(s) for s in size)).to(device, pooled.dtype)
        return UNetConditions(hidden, pooled, ids)


def final_layer_norm(encoder):
    """A CLIP text encoder's last layer norm, wherever transformers puts it (also in a DDP wrapper)."""
    from .methods.base import text_encoder_layers

    return text_encoder_layers(getattr(encoder, "module", encoder)).final_layer_norm


def pipeline_prompts(pipe, prompts: list[str], negative_prompt: list[str] | None = None, clip_skip: int = 1) -> dict:
    """The prompt arguments of a pipeline call: the prompts themselves, or with a CLIP skip the embeddings of them
    and of the negative prompts (empty where none: classifier-free guidance's unconditional half), computed as in
    training. (diffusers' own `clip_skip` reads `text_encoder.text_model`, which transformers 5 removed.)"""
    import torch

    if clip_skip == 1:
        return {"prompt": prompts, "negative_prompt": negative_prompt}
    conditioning = PromptConditioning(pipe, clip_skip=clip_skip)
    negative = negative_prompt or [""] * len(prompts)
    with torch.no_grad():
        hidden, _ = conditioning.encode_batch(conditioning.token_ids(list(prompts) + list(negative)))
    return {"prompt_embeds": hidden[: len(prompts)], "negative_prompt_embeds": hidden[len(prompts) :]}
