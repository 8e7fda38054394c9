"""What an adapter file says about itself: the one description every adapter reader returns.

`sdtune.adapter` fills it from an sdtune adapter's metadata, `sdtune.kohya` from a kohya-format file's.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


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
    extra: dict[str, str] = field(default_factory=dict)
