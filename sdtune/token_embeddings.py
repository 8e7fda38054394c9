"""New token embeddings trained beside the adapter: textual inversion, or with a method, pivotal tuning.

With `token_embeddings = N`, each concept gets N new tokens, named as diffusers' advanced DreamBooth scripts
name them (`<s0><s1>` for the first concept, `<s2><s3>` for the second, ...); its token (what `<castle>`
becomes in prompts) is then `<s0><s1> castle` unless `--token` says otherwise. Each new token has its own
row in every text encoder's embedding matrix (SDXL: a 768-wide one for CLIP-L, a 1280-wide one for
CLIP-G), initialised from an initializer word's rows (diffusers' `--initializer_concept`) or at random
with the matrix's spread, and trained at `embedding_lr` in the optimizer's own group. With
`retract_embeddings`, after every optimiser step the rows are scaled by (the matrix's std / their std)^0.1, as
the advanced scripts' `retract_embeddings` does after each of theirs.

During training the rows live in `NewTokenRows`, which stands in for the encoder's token embedding: ids
of the new tokens read the trained rows, every other id the frozen matrix, whose rows therefore stay
bit-identical. The adapter file carries the rows as `token_embeddings.<text encoder>` tensors (one row
per token, in the order the `token_embeddings` metadata lists them); loading adds the tokens to the
pipeline's tokenizer(s) and embedding matrices with diffusers' own `load_textual_inversion`, so sampling,
merged pipelines and exported embedding files all read them as diffusers does.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from .errors import SdtuneError

TENSOR_PREFIX = "token_embeddings."  # + a text encoder's name (text_encoder, text_encoder_2): (tokens, width)
METADATA_KEY = "token_embeddings"  # an adapter's new tokens, a JSON list in row order
MAX_PER_CONCEPT = 16  # CLIP reads 75 tokens of a prompt: several concepts' tokens must leave room for words
DEFAULT_EMBEDDING_LR = 5e-3  # AUTOMATIC1111's textual inversion default; the README gives the tiny model's measurement
RANDOM_INIT = "random"
NEW_TOKEN = re.compile(r"<s\d+>")
# the advanced scripts' names for each text encoder's rows in a standalone embedding file
EMBEDDING_FILE_KEYS = {"text_encoder": "clip_l", "text_encoder_2": "clip_g"}


def new_token_names(concepts: list[str], count: int) -> dict[str, list[str]]:
    """Each concept's `count` new tokens: <s0>..<s{count-1}> for the first, the next `count` for the second."""
    return {name: [f"<s{i * count + j}>" for j in range(count)] for i, name in enumerate(concepts)}


def new_token_numbers(config, configs) -> int:
    """How many numbers `--token-embeddings` trains, from the model's configs alone (`models.read_model_configs`): a
    row of the encoder's embedding width for each new token, in every text encoder."""
    if not config.token_embeddings:
        return 0
    width = 0
    for _, encoder in configs.text_encoders:
        try:
            width += int(encoder["hidden_size"])
        except (KeyError, TypeError, ValueError):  # an encoder that cannot be read counts nothing: a lower bound
            continue
    return len(config.concepts) * config.token_embeddings * width


def default_token(concept: str, tokens: list[str]) -> str:
    """What `<concept>` becomes: the new tokens then the class word, as the advanced scripts' `<s0><s1> dog`."""
    return "".join(tokens) + f" {concept}"


def without_new_tokens(text: str) -> str:
    """`text` without sdtune's new-token names: what a model that never learnt them should read
    (`a <s0><s1> castle` → `a castle`)."""
    return " ".join(NEW_TOKEN.sub(" ", text).split())


def check_token_settings(config) -> None:
    """The settings alone: the count, the learning rate, and that every concept's token holds its new tokens."""
    import math

    count = config.token_embeddings
    if count < 0 or count > MAX_PER_CONCEPT:
        raise SdtuneError(f"--token-embeddings must be 0 (off) to {MAX_PER_CONCEPT} new tokens a concept, got {count}")
    if config.embedding_lr is not None and not (config.embedding_lr > 0 and math.isfinite(config.embedding_lr)):
        raise SdtuneError(f"--embedding-lr must be positive and finite, got {config.embedding_lr}")
    if not count:
        if config.embedding_lr is not None or config.embedding_init is not None or config.retract_embeddings:
            raise SdtuneError("--embedding-lr, --embedding-init and --retract-embeddings apply with --token-embeddings N")
        return
    if config.dataset:
        raise SdtuneError("--token-embeddings trains new tokens for concepts; a --dataset's captions name none")
    if config.embedding_init is not None and not config.embedding_init.strip():
        raise SdtuneError("--embedding-init takes a word (or 'random'), got an empty one")
    names = new_token_names(config.concepts, count)
    for concept, token in config.concept_tokens.items():
        missing = [t for t in names[concept] if t not in token]
        if missing:
            raise SdtuneError(
                f"--token {token!r} lacks the new token(s) {''.join(missing)} of concept {concept!r}: they would never "
                f"train; write them in it, as in {default_token(concept, names[concept])!r}"
            )
    if count * len(config.concepts) > 60:
        raise SdtuneError(
            f"--token-embeddings {count} for {len(config.concepts)} concepts makes {count * len(config.concepts)} new "
            "tokens, more than a 75-token prompt leaves room for"
        )


def init_word(config, concept: str) -> str:
    """The word a concept's new rows start from: --embedding-init, else the concept's own name."""
    return config.embedding_init or concept.replace("_", " ").replace("-", " ")


def check_tokenizers(config, tokenizers: list) -> None:
    """That the new tokens are new to every tokenizer and each initializer word tokenizes to something."""
    names = new_token_names(config.concepts, config.token_embeddings)
    for tokenizer in tokenizers:
        vocabulary = tokenizer.get_vocab()
        taken = [t for tokens in names.values() for t in tokens if t in vocabulary]
        if taken:
            raise SdtuneError(f"--token-embeddings: the model's tokenizer already has token(s) {', '.join(taken)}; "
                              "it cannot learn them anew")
        for concept in config.concepts:
            word = init_word(config, concept)
            if word != RANDOM_INIT and not tokenizer(word, add_special_tokens=False).input_ids:
                raise SdtuneError(f"--embedding-init {word!r} is no token to the model's tokenizer; give a word or 'random'")


def load_tokenizers(model: str) -> list:
    """The model's tokenizer(s) alone, without its weights; none where they cannot be read this way (the
    pipeline's own loading then says why)."""
    from transformers import CLIPTokenizer

    from .models import read_model_configs, resolve_model

    configs = read_model_configs(model)
    folders = ["tokenizer", "tokenizer_2"] if configs.is_sdxl else ["tokenizer"]
    try:
        return [CLIPTokenizer.from_pretrained(resolve_model(model), subfolder=name, local_files_only=True) for name in folders]
    except (OSError, ValueError):
        return []


def _module_class():
    import torch

    class NewTokenRows(torch.nn.Module):
        """A text encoder's token embedding with trained rows for ids from `first_id` on: other ids read the
        frozen matrix, which neither changes nor receives gradients."""

        def __init__(self, base: torch.nn.Embedding, rows: torch.Tensor, first_id: int):
            super().__init__()
            self.base, self.first_id = base, first_id
            self.rows = torch.nn.Parameter(rows)
            self.vocabulary_std = base.weight.detach().float().std().item()  # the frozen matrix's spread

        @torch.no_grad()
        def retract_(self) -> None:
            """Scale the rows by (vocabulary std / their std)^0.1, as the advanced scripts' `retract_embeddings`
            does after every step: rows drifting far from the vocabulary's spread are pulled back a little."""
            self.rows.mul_((self.vocabulary_std / self.rows.float().std()) ** 0.1)

        @property
        def weight(self):  # what code reading `get_input_embeddings().weight` (dtype, device) expects
            return self.base.weight

        def forward(self, ids: torch.Tensor) -> torch.Tensor:
            new = ids >= self.first_id
            embedded = self.base(torch.where(new, torch.zeros_like(ids), ids))
            trained = self.rows[(ids - self.first_id).clamp(0, len(self.rows) - 1)].to(embedded.dtype)
            return torch.where(new[..., None], trained, embedded)

    return NewTokenRows


def add_trainable_tokens(pipe, config, seed: int) -> list:
    """Add each concept's new tokens to the pipeline's tokenizer(s) and give every text encoder a trainable row
    for each (NewTokenRows); the rows' parameters, one per encoder."""
    import torch

    from .models import text_encoders, tokenizers

    check_tokenizers(config, tokenizers(pipe))
    names = new_token_names(config.concepts, config.token_embeddings)
    tokens = [t for concept in config.concepts for t in names[concept]]
    generator = torch.Generator().manual_seed(seed)
    parameters = []
    for tokenizer, encoder in zip(tokenizers(pipe), text_encoders(pipe)):
        first_id = len(tokenizer)
        tokenizer.add_tokens(tokens)
        if tokenizer.convert_tokens_to_ids(tokens) != list(range(first_id, first_id + len(tokens))):
            raise SdtuneError("--token-embeddings: the tokenizer did not number the new tokens after its own")
        base = encoder.get_input_embeddings()
        matrix = base.weight.detach().float().cpu()
        rows = []
        for concept in config.concepts:
            word = init_word(config, concept)
            if word == RANDOM_INIT:  # diffusers' advanced scripts without --initializer_concept
                rows.append(torch.randn(len(names[concept]), matrix.shape[1], generator=generator) * matrix.std())
            else:  # their --initializer_concept: row j from the word's token j (cycling)
                ids = tokenizer(word, add_special_tokens=False).input_ids
                rows.append(torch.stack([matrix[ids[j % len(ids)]] for j in range(len(names[concept]))]))
        module = _module_class()(base, torch.cat(rows).to(base.weight.device), first_id)
        encoder.set_input_embeddings(module)
        parameters.append(module.rows)
    return parameters


def retract_rows(pipe) -> None:
    """Every text encoder's new rows scaled back towards the vocabulary's spread (`NewTokenRows.retract_`)."""
    from .models import text_encoders

    for encoder in text_encoders(pipe):
        module = encoder.get_input_embeddings()
        if hasattr(module, "retract_"):
            module.retract_()


def trained_rows(pipe) -> tuple[list[str], dict]:
    """(the new tokens in row order, each text encoder's rows by its name) of a pipeline being trained."""
    from .methods.base import text_encoder_prefix
    from .models import text_encoders, tokenizers

    rows, tokens = {}, []
    for index, (tokenizer, encoder) in enumerate(zip(tokenizers(pipe), text_encoders(pipe))):
        module = encoder.get_input_embeddings()
        rows[TENSOR_PREFIX + text_encoder_prefix(index)] = module.rows.detach().float().cpu().contiguous()
        tokens = tokenizer.convert_ids_to_tokens(list(range(module.first_id, module.first_id + len(module.rows))))
    return tokens, rows


def split_state(tensors: dict) -> tuple[dict, dict]:
    """An adapter's tensors as (the method's, the token embeddings')."""
    own = {k: v for k, v in tensors.items() if not k.startswith(TENSOR_PREFIX)}
    return own, {k: v for k, v in tensors.items() if k.startswith(TENSOR_PREFIX)}


def read_token_list(path, metadata: dict, entries: dict) -> tuple[str, ...]:
    """The new tokens an adapter's metadata lists, checked against its embedding tensors."""
    from .methods.base import text_encoder_prefix

    rows = {k: v for k, v in entries.items() if k.startswith(TENSOR_PREFIX)}
    if METADATA_KEY not in metadata:
        if rows:
            raise SdtuneError(f"{path}: damaged sdtune adapter (token embeddings without the {METADATA_KEY!r} metadata)")
        return ()
    try:
        tokens = json.loads(metadata[METADATA_KEY])
    except ValueError:
        tokens = None
    if not isinstance(tokens, list) or not tokens or not all(isinstance(t, str) and NEW_TOKEN.fullmatch(t) for t in tokens):
        raise SdtuneError(f"{path}: damaged sdtune adapter metadata ({METADATA_KEY} is not a list of <sN> tokens)")
    expected = {TENSOR_PREFIX + text_encoder_prefix(i) for i in range(len(rows))}
    if not rows or set(rows) != expected or any(len(e.shape) != 2 or e.shape[0] != len(tokens) for e in rows.values()):
        raise SdtuneError(f"{path}: damaged sdtune adapter (its token embeddings are not one row per token of {len(tokens)})")
    return tuple(tokens)


def add_tokens(pipe, tokens: list[str], rows: dict, where: str) -> None:
    """Add `tokens` with their trained rows to the pipeline's tokenizer(s) and text encoder(s), with diffusers'
    `load_textual_inversion` (the embedding matrices grow by a row a token)."""
    from .methods.base import text_encoder_prefix
    from .models import text_encoders, tokenizers

    encoders = text_encoders(pipe)
    if len(rows) != len(encoders):
        raise SdtuneError(f"{where} holds token embeddings for {len(rows)} text encoder(s); this pipeline has {len(encoders)}")
    for index, (tokenizer, encoder) in enumerate(zip(tokenizers(pipe), encoders)):
        matrix = rows[TENSOR_PREFIX + text_encoder_prefix(index)]
        width = encoder.get_input_embeddings().weight.shape[1]
        if matrix.shape[1] != width:
            raise SdtuneError(f"{where}: its token embeddings are {matrix.shape[1]} wide; this model's text encoder takes {width}")
        vocabulary = tokenizer.get_vocab()
        taken = [t for t in tokens if t in vocabulary]
        if taken:
            raise SdtuneError(
                f"{where}: the pipeline already has token(s) {', '.join(taken)} (another adapter's, or this one loaded twice)"
            )
        pipe.load_textual_inversion(matrix.to(encoder.dtype), token=list(tokens), text_encoder=encoder, tokenizer=tokenizer)


# ---------------------------------------------------------------------------------------------
# Stacked adapters: every run names its tokens <s0>.., so later adapters' tokens take the next free names


@dataclass
class StackedTokens:
    """How stacked adapters' new tokens are named in the pipeline they share."""

    renames: list[dict[str, str]]  # one per adapter, in stack order: its new tokens' names here ({}: unchanged)
    placeholders: dict[str, str] | None  # what fills each `<name>` placeholder, with the renamed tokens
    notice: str = ""  # the renames in one line ("" where none)


def adapter_new_tokens(info) -> tuple[str, ...]:
    """An adapter's new tokens: an sdtune adapter's, or those an sdtune kohya export's metadata lists."""
    if info.new_tokens:
        return tuple(info.new_tokens)
    try:
        tokens = json.loads(info.extra.get(KOHYA_METADATA_KEY, "[]"))
    except ValueError:
        return ()
    if isinstance(tokens, list) and all(isinstance(t, str) and NEW_TOKEN.fullmatch(t) for t in tokens):
        return tuple(tokens)
    return ()


def renamed(text: str, rename: dict[str, str]) -> str:
    """`text` with each new token that `rename` names written under its new name."""
    return NEW_TOKEN.sub(lambda match: rename.get(match.group(0), match.group(0)), text) if rename else text


def concept_texts(info) -> dict[str, str]:
    """What each of an adapter's concepts' `<name>` placeholder becomes ({} for an adapter that names none)."""
    found = info.placeholder_tokens()
    if isinstance(found, dict):
        return dict(found)
    return {info.placeholder.strip("<>"): found} if found and info.placeholder else {}


def stack_new_tokens(names: list[str], infos: list, taken=()) -> StackedTokens:
    """Name stacked adapters' new tokens apart: an adapter keeps its names where they are free (in `taken`, the
    pipeline's vocabulary, and the adapters before it), else all of its tokens take the next free ones (<s2><s3>
    after another's <s0><s1>). Refused: two adapters naming the same concept where either brings new tokens,
    as `<name>` would then mean either."""
    used = {t for t in taken if NEW_TOKEN.fullmatch(t)}
    owner: dict[str, int] = {}
    renames, placeholders, said = [], {}, []
    for index, (name, info) in enumerate(zip(names, infos)):
        tokens, texts = adapter_new_tokens(info), concept_texts(info)
        for concept in texts:
            earlier = owner.get(concept)
            if earlier is not None and (tokens or adapter_new_tokens(infos[earlier])):
                raise SdtuneError(
                    f"adapters {names[earlier]} and {name} both train concept <{concept}>, so <{concept}> in a prompt "
                    "would mean either; stack adapters of different concepts"
                )
            owner[concept] = index
        rename = {}
        if used & set(tokens):
            first = 1 + max(int(t[2:-1]) for t in used)
            rename = {t: f"<s{first + i}>" for i, t in enumerate(tokens)}
            shown = ", ".join(f"<{c}> is {renamed(text, rename)!r}" for c, text in texts.items())
            said.append(f"{name}: {''.join(tokens)} as {''.join(rename.values())}" + (f" ({shown})" if shown else ""))
        used.update(rename.get(t, t) for t in tokens)
        renames.append(rename)
        placeholders.update({concept: renamed(text, rename) for concept, text in texts.items()})
    notice = "stacked adapters' new tokens renamed apart: " + "; ".join(said) if said else ""
    return StackedTokens(renames, placeholders or None, notice)


# ---------------------------------------------------------------------------------------------
# Other tools' files

BUNDLE_PREFIX = "bundle_emb."  # kohya-ss / OneTrainer: embeddings bundled in a LoRA file, as ComfyUI and A1111 read them
KOHYA_METADATA_KEY = "sdtune_token_embeddings"  # an exported kohya file's new tokens, for sdtune to read them back


def concept_tokens_of(info) -> dict[str, list[str]]:
    """Each concept's new tokens, in the order its token text writes them (`<s0><s1> castle`: <s0>, <s1>)."""
    found = info.placeholder_tokens()
    texts = found if isinstance(found, dict) else {info.placeholder.strip("<>") or "concept": found or ""}
    return {name: [t for t in NEW_TOKEN.findall(text) if t in info.new_tokens] for name, text in texts.items()}


def bundle_name(concept: str) -> str:
    """A concept's embedding name in a kohya file: what AUTOMATIC1111 prompts write where sdtune's had the new tokens."""
    return f"{concept}_tokens"


def kohya_bundles(info, rows: dict, sdxl: bool) -> tuple[dict, dict]:
    """The new tokens' rows as kohya bundles: `bundle_emb.<name>.string_to_param.*` (one text encoder), or
    `bundle_emb.<name>.clip_l` and `.clip_g` (SDXL), one bundle per concept; and the metadata naming each
    bundle's tokens, for sdtune to read them back as they were trained."""
    from .methods.base import text_encoder_prefix

    state, metadata = {}, {KOHYA_METADATA_KEY: json.dumps(list(info.new_tokens))}
    for concept, tokens in concept_tokens_of(info).items():
        if not tokens:
            continue
        index = [info.new_tokens.index(t) for t in tokens]
        metadata[f"{KOHYA_METADATA_KEY}.{bundle_name(concept)}"] = json.dumps(tokens)
        name = BUNDLE_PREFIX + bundle_name(concept)
        if not sdxl:
            state[f"{name}.string_to_param.*"] = rows[TENSOR_PREFIX + text_encoder_prefix(0)][index].contiguous()
        else:
            for encoder, key in EMBEDDING_FILE_KEYS.items():
                state[f"{name}.{key}"] = rows[TENSOR_PREFIX + encoder][index].contiguous()
    return state, metadata


def embedding_file_path(output, folder: bool = False) -> Path:
    """Where an export's standalone embedding file goes: beside a file (`x_emb.safetensors` for `x.safetensors`, as
    the advanced scripts name theirs; a file named without a suffix too), inside a `folder`."""
    output = Path(output)
    if folder:
        return output / "token_embeddings.safetensors"
    return output.parent / f"{output.stem if output.suffix else output.name}_emb.safetensors"


def write_embedding_file(path, info, rows: dict) -> None:
    """The advanced scripts' embedding file: `clip_l` (and SDXL's `clip_g`) rows of every new token, in the order
    the `tokens` metadata lists them; diffusers loads it with
    `pipe.load_textual_inversion(file["clip_l"], token=[...], text_encoder=..., tokenizer=...)`."""
    from .fileio import save_safetensors

    state = {EMBEDDING_FILE_KEYS[key.removeprefix(TENSOR_PREFIX)]: tensor.contiguous() for key, tensor in rows.items()}
    save_safetensors(state, path, {"tokens": json.dumps(list(info.new_tokens)), "format": "pt"})


def add_bundled_tokens(pipe, metadata: dict, bundles: dict, where: str, rename: dict | None = None) -> None:
    """A kohya file's bundled embeddings into `pipe`: sdtune's own exports as the tokens they were trained as
    (their metadata lists them; `rename` gives some other names in a stack), others as diffusers loads an embedding of N rows (the name, then name_1 ...,
    which the pipelines expand the name to)."""
    from .methods.base import text_encoder_prefix
    from .models import is_sdxl

    by_name: dict[str, dict] = {}
    for key, tensor in bundles.items():
        name, _, part = key.removeprefix(BUNDLE_PREFIX).partition(".")
        by_name.setdefault(name, {})[part] = tensor
    parts = ["clip_l", "clip_g"] if is_sdxl(pipe) else ["string_to_param.*"]
    tokens = json.loads(metadata[KOHYA_METADATA_KEY]) if KOHYA_METADATA_KEY in metadata else None
    for name, found in sorted(by_name.items()):
        if sorted(found) != sorted(parts):
            raise SdtuneError(f"{where}: bundled embedding {name!r} has {', '.join(sorted(found))}; this model needs {', '.join(parts)}")
    if tokens is not None:  # sdtune's: each concept's rows back to its tokens
        rows = {text_encoder_prefix(i): {} for i in range(len(parts))}
        for name, found in by_name.items():
            concept_tokens = json.loads(metadata.get(f"{KOHYA_METADATA_KEY}.{name}", "[]"))
            for i, part in enumerate(parts):
                rows[text_encoder_prefix(i)].update(zip(concept_tokens, found[part]))
        if any(set(tokens) - set(r) for r in rows.values()):
            raise SdtuneError(f"{where}: its bundled embeddings lack some of the tokens its metadata lists")
        import torch

        stacked = {TENSOR_PREFIX + p: torch.stack([r[t] for t in tokens]) for p, r in rows.items()}
        add_tokens(pipe, [(rename or {}).get(t, t) for t in tokens], stacked, where)
        return
    from .models import text_encoders, tokenizers

    for name, found in sorted(by_name.items()):
        for part, tokenizer, encoder in zip(parts, tokenizers(pipe), text_encoders(pipe)):
            if name in tokenizer.get_vocab():
                raise SdtuneError(f"{where}: the pipeline already has a token {name!r}")
            pipe.load_textual_inversion(found[part].to(encoder.dtype), token=name, text_encoder=encoder, tokenizer=tokenizer)
