"""What an adapter file says about itself: the one description every adapter reader returns.

`sdtune.adapter` fills it from an sdtune adapter's metadata, `sdtune.kohya` from a kohya-format file's.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

INIT_WEIGHTS_KEY = "init_weights"  # adapter metadata: {"name", "digest"} of the file the trained tensors started from
BASE_ADAPTERS_KEY = "base_adapters"  # adapter metadata: [{"name", "digest", "strength"}], merged beneath in this order
CONCEPT_TOKENS = "concept_tokens"  # metadata of an adapter of several concepts: JSON {name: token}


@dataclass
class AdapterInfo:
    """What an adapter file says about itself."""

    method: str
    options: dict[str, Any]
    base_model: str
    fingerprint: str
    structure: str = ""
    weight_sample: bytes = b""
    placeholder: str = ""
    token: str = ""
    text_encoders: tuple[str, ...] = ()  # the text encoders the adapter trained (text_encoder, text_encoder_2)
    new_tokens: tuple[str, ...] = ()  # tokens whose embeddings it trained (<s0>, <s1>, ...), in row order
    extra: dict[str, str] = field(default_factory=dict)

    def placeholder_tokens(self) -> str | dict[str, str] | None:
        """What fills `<name>` placeholders: each concept's token (an adapter of several concepts), else its token."""
        import json

        if CONCEPT_TOKENS in self.extra:
            try:
                tokens = json.loads(self.extra[CONCEPT_TOKENS])
            except ValueError:
                tokens = None
            if isinstance(tokens, dict) and all(isinstance(v, str) for v in tokens.values()):
                return tokens
        return self.token or None
