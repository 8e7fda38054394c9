"""How prompts become the UNet's conditioning: the one place where model families differ for training.

- SD 1.x and 2.x: one text encoder; its last hidden state is `encoder_hidden_states`.
- SDXL: two text encoders; their penultimate hidden states side by side are `encoder_hidden_states`,
  the second's pooled (projected) embedding is `text_embeds`, and each image's micro-conditioning
  (original size, crop top-left, target size: six numbers) is `time_ids`, as diffusers'
  train_text_to_image_sdxl.py and StableDiffusionXLPipeline make them.

How prompts are read (`PromptReading`), as kohya-ss' sd-scripts read them:
- a CLIP skip of k > 1 (SD 1.x and 2.x): the encoder's k-th hidden state from the end, through its final layer
  norm, replaces the last hidden state (AUTOMATIC1111's "Clip skip"; diffusers' `clip_skip` k − 1);
- a longer token limit (150 or 225, kohya's `--max_token_length`): a prompt's tokens are read in chunks of 75,
  each with the start and end tokens around it, through each encoder; the hidden states are joined as kohya
  joins them (the first start token, each chunk's 75, the last end token: 77 → 152 or 227 tokens), and SDXL's
  pooled embedding is the first chunk's.
Either way the pipeline is given these embeddings (`pipeline_prompts`), so training and sampling compute them alike.

Text embeddings are computed once per distinct prompt, one prompt per encoder call, so a prompt's
embedding never depends on the prompts that came with it. Methods see only the UNet and these tensors.

A batch may carry each image's `original_size` (height, width before resizing) and `crop_top_left`
(top, left in resized pixels) as default_collate makes them of an item's pair of ints; where absent they
are the batch's own size and (0, 0), an image that was neither resized nor cropped.
"""

from __future__ import annotations

from dataclasses import dataclass

from .models import is_sdxl, text_encoders, tokenizers


TOKENS_PER_CHUNK = 75  # CLIP's 77 without its start and end tokens
MAX_TOKEN_LENGTHS = (75, 150, 225)  # kohya-ss' --max_token_length: one, two or three chunks


@dataclass(frozen=True)
class PromptReading:
    """How prompts become text embeddings beyond a pipeline's own way: the CLIP layer read and the token limit.
    A run's, recorded in its adapter (only where not the default) and used wherever the adapter draws."""

    clip_skip: int = 1  # the text encoder's k-th hidden state from the end (1: its last)
    max_token_length: int = TOKENS_PER_CHUNK  # tokens read (without start and end): 75, 150 or 225

    @property
    def plain(self) -> bool:
        """The pipeline's own reading: no CLIP skip, one 77-token window."""
        return self == PromptReading()

    @property
    def chunks(self) -> int:
        return self.max_token_length // TOKENS_PER_CHUNK

    def metadata(self) -> dict[str, str]:
        """An adapter's keys for the reading (none at the defaults: other adapters keep their bytes)."""
        from dataclasses import fields

        return {f.name: str(getattr(self, f.name)) for f in fields(self) if getattr(self, f.name) != f.default}


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

    def __init__(self, pipe, trained: bool = False, reading: PromptReading = PromptReading()):
        self.tokenizers = tokenizers(pipe)
        self.text_encoders = text_encoders(pipe)  # replaced by their prepared (wrapped) forms when trained
        self.sdxl = is_sdxl(pipe)
        self.trained = trained
        self.reading = reading
        self.cache: dict = {}  # prompt -> (hidden states, pooled embedding or None)
        # False (shuffled captions, whose tag orders are too many to keep): the cache keeps what
        # `precompute` put in it, and other prompts are encoded each time they come, to the same values.
        self.remember_new = True

    def token_ids(self, prompts) -> list:
        """The prompts' token ids for each encoder, padded to its length: (prompts, 77); with a longer token limit
        (prompts, chunks, 77), each chunk 75 tokens between a start and an end token (`chunked`)."""
        if self.reading.chunks == 1:
            return [
                tokenizer(list(prompts), padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                          return_tensors="pt").input_ids
                for tokenizer in self.tokenizers
            ]
        length = self.reading.max_token_length + 2
        return [
            chunked(tokenizer(list(prompts), padding="max_length", max_length=length, truncation=True, return_tensors="pt").input_ids,
                    tokenizer)
            for tokenizer in self.tokenizers
        ]

    def encode_batch(self, ids_per_encoder):
        """(hidden states, pooled embeddings or None) of a batch of prompts, from their token ids for each encoder."""
        import torch

        chunks = ids_per_encoder[0].shape[1] if ids_per_encoder[0].ndim == 3 else 1
        hidden, pooled = [], None
        for encoder, ids in zip(self.text_encoders, ids_per_encoder):
            ids = ids.reshape(-1, ids.shape[-1]).to(encoder.device)  # every chunk through the encoder alike
            if not self.sdxl and self.reading.clip_skip == 1:
                hidden.append(encoder(ids)[0])
                continue
            output = encoder(ids, output_hidden_states=True)
            if self.sdxl:  # SDXL's penultimate layers, without the final layer norm
                hidden.append(output.hidden_states[-2])
                pooled = output[0]  # the last encoder's projected embedding (CLIPTextModelWithProjection)
            else:
                hidden.append(normed(final_layer_norm(encoder), output.hidden_states[-self.reading.clip_skip]))
        hidden = torch.cat([h.to(hidden[-1].dtype) for h in hidden], dim=-1)
        if chunks == 1:
            return hidden, pooled
        hidden = hidden.reshape(-1, chunks * hidden.shape[1], hidden.shape[-1])
        return joined_chunks(hidden, chunks), None if pooled is None else pooled.reshape(-1, chunks, pooled.shape[-1])[:, 0]

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


def normed(norm, hidden):
    """`hidden` through the layer norm `norm`. A trained encoder's prepared forward hands back fp32 states (Accelerate's
    autocast) while its frozen norm is stored in the half dtype, which layer_norm refuses: there the norm runs in
    fp32, as autocast runs layer norms."""
    import torch

    if hidden.dtype == norm.weight.dtype:
        return norm(hidden)
    weight, bias = (None if t is None else t.to(hidden.dtype) for t in (norm.weight, norm.bias))
    return torch.nn.functional.layer_norm(hidden, norm.normalized_shape, weight, bias, norm.eps)


def chunked(ids, tokenizer):
    """(prompts, L + 2) token ids → (prompts, L / 75, 77): each 75 tokens after the start token between the
    start token and the last token, as kohya-ss' sd-scripts chunk them. Where padding is not the end token (SD 2.x,
    SDXL's second encoder), a chunk whose text runs to its end gets an end token, and an empty chunk reads
    start, end, padding, as a prompt of no text does."""
    import torch

    start, last = ids[:, :1], ids[:, -1:]
    chunks = []
    for first in range(1, ids.shape[1] - 1, TOKENS_PER_CHUNK):
        chunk = torch.cat([start, ids[:, first : first + TOKENS_PER_CHUNK], last], dim=1)
        if tokenizer.pad_token_id != tokenizer.eos_token_id:
            ends = (chunk[:, -2] != tokenizer.eos_token_id) & (chunk[:, -2] != tokenizer.pad_token_id)
            chunk[ends, -1] = tokenizer.eos_token_id
            chunk[chunk[:, 1] == tokenizer.pad_token_id, 1] = tokenizer.eos_token_id
        chunks.append(chunk)
    return torch.stack(chunks, dim=1)


def joined_chunks(hidden, chunks: int):
    """(prompts, chunks × 77, width) → (prompts, 2 + chunks × 75, width): the first start token, each chunk's 75
    tokens, the last chunk's end token, as kohya-ss' sd-scripts join them."""
    import torch

    window = TOKENS_PER_CHUNK + 2
    parts = [hidden[:, :1]] + [hidden[:, k * window + 1 : k * window + 1 + TOKENS_PER_CHUNK] for k in range(chunks)]
    return torch.cat(parts + [hidden[:, -1:]], dim=1)


def pipeline_prompts(pipe, prompts: str | list[str], negative_prompt: str | list[str] | None = None,
                     reading: PromptReading = PromptReading()) -> dict:
    """The prompt arguments of a pipeline call: the prompts themselves, or with a `reading` of their own the
    embeddings of them and of the negative prompts, computed as in training (empty negative prompts where none are
    given: classifier-free guidance's unconditional half; SDXL's zeros where its config says so, as its pipeline
    does). (diffusers' own `clip_skip` reads `text_encoder.text_model`, which transformers 5 removed.)"""
    import torch

    if reading.plain:
        return {"prompt": prompts, "negative_prompt": negative_prompt}
    # one prompt may be a string, as a pipeline takes it (list() would read its characters as prompts)
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    if isinstance(negative_prompt, str):
        negative_prompt = [negative_prompt] * len(prompts)
    if negative_prompt is not None and len(negative_prompt) != len(prompts):
        raise ValueError(f"{len(negative_prompt)} negative prompts for {len(prompts)} prompts: give one, or one a prompt")
    conditioning = PromptConditioning(pipe, reading=reading)
    negative = negative_prompt or [""] * len(prompts)
    with torch.no_grad():
        hidden, pooled = conditioning.encode_batch(conditioning.token_ids(list(prompts) + list(negative)))
    arguments = {"prompt_embeds": hidden[: len(prompts)], "negative_prompt_embeds": hidden[len(prompts) :]}
    if pooled is not None:  # SDXL
        arguments.update(pooled_prompt_embeds=pooled[: len(prompts)], negative_pooled_prompt_embeds=pooled[len(prompts) :])
        if negative_prompt is None and pipe.config.get("force_zeros_for_empty_prompt", False):
            arguments["negative_prompt_embeds"] = torch.zeros_like(arguments["negative_prompt_embeds"])
            arguments["negative_pooled_prompt_embeds"] = torch.zeros_like(arguments["negative_pooled_prompt_embeds"])
    return arguments
