"""Reading safetensors files that may be damaged or hostile: what every adapter reader checks.

The header is checked against the file's size before anything is loaded (`read_safetensors_header`),
adapters hold floating-point tensors only (`check_adapter_dtypes`), and a tensor holding NaN or an
infinity is found by name (`first_non_finite`). The sdtune adapter reader (`sdtune.adapter`) and the
kohya-format reader (`sdtune.kohya`) both use them, so a file gets the same checks in either format.
"""

from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import SdtuneError, warn

MAX_HEADER_BYTES = 16 * 2**20  # an SD v1.4 `full` adapter's header is about 100 KB
SAFETENSORS_DTYPE_BYTES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
    "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8,
}
ADAPTER_DTYPES = {"F32", "F16", "BF16"}  # trained tensors; anything else is not an adapter's


@dataclass(frozen=True)
class TensorEntry:
    """One tensor as a safetensors header declares it."""

    dtype: str
    shape: tuple[int, ...]


def read_safetensors_header(path: str | Path) -> tuple[dict[str, str], dict[str, TensorEntry]]:
    """The metadata and tensor table of a safetensors file, checked against the file's size.

    Nothing is allocated from what the header declares: the header's length must fit the file, every
    tensor's byte range must lie in the body and match its shape and dtype, and the ranges must
    tile the body exactly, so a file cannot declare more data than it holds.
    """
    path = Path(path)

    def damaged(reason: str) -> SdtuneError:
        return SdtuneError(f"{path}: not a valid safetensors file ({reason})")

    with open(path, "rb") as handle:
        size = os.fstat(handle.fileno()).st_size
        if size < 8:
            raise damaged(f"{size} bytes, shorter than the 8-byte header length")
        (header_length,) = struct.unpack("<Q", handle.read(8))
        if header_length > min(size - 8, MAX_HEADER_BYTES):
            raise damaged(f"header of {header_length} bytes declared in a file of {size} bytes")
        raw = handle.read(header_length)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise damaged("the header is not JSON") from None
    if not isinstance(header, dict):
        raise damaged("the header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise damaged("its metadata is not a table of strings")
    body = size - 8 - header_length
    entries, ranges = {}, []
    for name, entry in header.items():
        if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
            raise damaged(f"tensor {name!r} has no dtype, shape and data_offsets")
        dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
        if dtype not in SAFETENSORS_DTYPE_BYTES:
            raise damaged(f"tensor {name!r} has unknown dtype {dtype!r}")
        if not isinstance(shape, list) or not all(_is_count(n) for n in shape):
            raise damaged(f"tensor {name!r} has shape {shape!r}")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_count(n) for n in offsets)):
            raise damaged(f"tensor {name!r} has data_offsets {offsets!r}")
        begin, end = offsets
        needed = math.prod(shape) * SAFETENSORS_DTYPE_BYTES[dtype]
        if end > body:
            raise damaged(f"tensor {name!r} ends at byte {end:,} of a body of {body:,} bytes: the file is cut short")
        if end - begin != needed:
            raise damaged(f"tensor {name!r} declares shape {tuple(shape)} ({needed:,} bytes) but holds {end - begin:,} bytes")
        entries[name] = TensorEntry(dtype, tuple(shape))
        ranges.append((begin, end))
    position = 0
    for begin, end in sorted(ranges):
        if begin != position:
            raise damaged("tensor data overlaps or leaves gaps")
        position = end
    if position != body:
        raise damaged(f"the header describes {position:,} bytes of data, the file holds {body:,}")
    return metadata, entries


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def check_adapter_dtypes(path: str | Path, entries: dict[str, TensorEntry]) -> None:
    """Refuse a file holding a tensor that is not floating-point (F32, F16, BF16), naming the first."""
    for name, entry in entries.items():
        if entry.dtype not in ADAPTER_DTYPES:
            raise SdtuneError(
                f"{path}: tensor {name} is {entry.dtype}; adapters hold {', '.join(sorted(ADAPTER_DTYPES))} tensors"
            )


def read_tensors(path: Path) -> dict:
    """Every tensor of a safetensors file whose header `read_safetensors_header` has checked."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            return {key: handle.get_tensor(key) for key in handle.keys()}
    except Exception as error:
        raise SdtuneError(f"{path}: not a readable safetensors file ({str(error).splitlines()[0][:120]})") from None


def first_non_finite(tensors: dict) -> str | None:
    """The name of the first tensor holding a NaN or an infinity, if any."""
    return next((key for key, tensor in tensors.items() if not bool(tensor.isfinite().all())), None)


# Trained updates (and the full weights of `full`, BitFit's biases, kohya alphas) stay far below this;
# values above it make the UNet's activations overflow, and the images come out black or as noise.
ABSURD_VALUE = 1e4


def warn_absurd_values(path: str | Path, tensors: dict) -> None:
    """Warn, naming the tensor, when an adapter holds finite values no training gives (above ABSURD_VALUE)."""

    largest, name = 0.0, None
    for key, tensor in tensors.items():
        if tensor.numel():
            value = float(tensor.detach().abs().max())
            if value > largest:
                largest, name = value, key
    if largest > ABSURD_VALUE:
        warn(
            f"{path}: tensor {name} holds values up to {largest:.3g}, far beyond a trained update's; "
            "images drawn with it will likely be black or noise",
        )
