"""Aspect-ratio buckets: photos of mixed shapes trained at their own aspect ratio, not center-cropped square.

The bucket sizes hold about `resolution`² pixels (never more, so a batch costs what a square one does),
with sides in steps of `bucket_step(resolution)` from resolution/2 to 2·resolution (aspect ratios up
to 4:1, as kohya-ss' defaults at 512 px). Each image goes to the bucket nearest its aspect ratio (in
log ratio, so 2:1 and 1:2 are equally far from square), is resized to cover the bucket and
center-cropped into it. `BucketBatchSampler` draws every batch from one bucket: images of one size
stack into one tensor and one UNet call.

With prior preservation the class images are bucketed too, by their own aspect ratio, and each batch of a
bucket takes as many class examples from that bucket's pool (`class_pools`): the class images of the same
bucket when it holds a batch of them, else those of the nearest buckets, framed into the batch's size, so
the concept and class examples of a step stack into one tensor, as without buckets.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import os
import struct
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from .errors import SdtuneError

ALPHA_MODES = ("RGBA", "LA", "PA", "La", "RGBa")  # PIL's modes with an alpha channel
EXIF_ORIENTATION = 0x0112  # the EXIF tag of how a photo is stored turned or mirrored
MAX_STEP = 64  # px: SD's latent grid (VAE ×8) stays divisible by the UNet's three downsamplings (×8)
VAE_FACTOR = 8  # pixels per latent cell of SD's VAE: every side is a multiple of it


def upright_size(image) -> tuple[tuple[int, int], bool]:
    """An opened PIL image's (width, height) as it is shown, after its EXIF orientation, and whether it
    is stored turned by a quarter (then its stored width and height are swapped). A PNG not yet decoded is
    decoded to find an EXIF chunk after its pixels (PIL's way): `image_facts` reads a file's without decoding."""
    with quiet_pil():
        return _upright(image.size, image.getexif().get(EXIF_ORIENTATION, 1))


def _upright(size: tuple[int, int], orientation) -> tuple[tuple[int, int], bool]:
    turned = orientation in (5, 6, 7, 8)
    return (size[::-1] if turned else size), turned


@dataclass(frozen=True)
class ImageFacts:
    """What the start of a run needs of an image file, read from its header (and, for a PNG, its chunks' headers)
    once, no pixel decoded: `image_facts`."""

    format: str | None  # PIL's name of its format: "JPEG", "PNG", ...
    size: tuple[int, int]  # (width, height) as it is shown, its EXIF orientation applied
    turned: bool  # stored turned by a quarter: its stored width and height are `size` swapped
    mode: str  # PIL's mode of its pixels as stored ("RGB", "CMYK", "P", ...)
    alpha: bool  # it has an alpha channel, or a palette's transparency
    frames: int  # an animation's frames; a phone's MPO its images
    colour_profile: bytes | None  # the ICC profile of its pixels' colour space (colour.colour_profile), None for sRGB
    odd: str | None  # the first warning PIL gave reading its header and EXIF (a corrupt EXIF block), or None
    cut: str | None  # why it ends before its image does (a copy that stopped), or None


_FACTS: dict[tuple, ImageFacts] = {}  # by path and the file's identity: a file changed since is read again
FACTS_KEPT = 100_000  # files remembered at most (a few hundred bytes each)


def forget_image_facts() -> None:
    """Read every file again from here on (a run's planning starts so: a file rewritten in place within the clock's
    granularity keeps its size, time and inode)."""
    _FACTS.clear()


def image_facts(path) -> ImageFacts:
    """An image file's `ImageFacts`, read once per process and file version (kept by path, size, modification time
    and inode), so that checking, bucketing and framing a large folder reads each header once. Raises what PIL raises
    for a file that is no readable image, and DecompressionBombError where `open_image` would (never kept)."""
    stat = os.stat(path)
    key = (os.fspath(path), stat.st_size, stat.st_mtime_ns, stat.st_ino, stat.st_dev)
    if key in _FACTS:
        return _FACTS[key]
    facts = _read_facts(path)
    if len(_FACTS) >= FACTS_KEPT:
        _FACTS.clear()
    _FACTS[key] = facts
    return facts


def _read_facts(path) -> ImageFacts:
    from PIL import Image

    from .colour import colour_profile
    from .data import cut_short

    heif_opener()
    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        with Image.open(path) as image:  # reads the header alone
            refuse_bomb(image, said)  # over PIL's decompression-bomb limit, as open_image refuses it
            if image.format == "PNG":
                tail, cut = png_tail(path)
                image.info.update(tail)  # what PIL adds to it as it decodes the pixels
                exif = Image.Image.getexif(image)  # PIL's own reading of them, without PngImageFile's decode first
            else:
                exif = image.getexif()  # parsed as it opened (JPEG, WebP, HEIC), or read from its header (TIFF)
                cut = cut_short(path, image.format)
            size, turned = _upright(image.size, exif.get(EXIF_ORIENTATION, 1))
            alpha = image.mode in ALPHA_MODES or (image.mode == "P" and "transparency" in image.info)
            facts = ImageFacts(image.format, size, turned, image.mode, alpha, getattr(image, "n_frames", 1),
                               colour_profile(image, exif), None, cut)
    odd = [w for w in said if issubclass(w.category, UserWarning) and not issubclass(w.category, Image.DecompressionBombWarning)]
    if odd:  # PIL's message, on one line
        facts = dataclasses.replace(facts, odd=" ".join((str(odd[0].message).strip().splitlines() or [""])[0][:100].split()))
    return facts


PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
PNG_TAIL_CHUNKS = (b"eXIf", b"tEXt", b"zTXt", b"iTXt")  # what PIL reads into `info` after the pixels as it decodes them
PNG_CUT = "cut short: it ends inside a chunk, as a copy or download that stopped leaves it"


def png_tail(path) -> tuple[dict, str | None]:
    """A PNG's chunks that PIL reads only as it decodes its pixels (EXIF and text after the image data, up to an
    animation's second frame, where PIL's decode stops), read by PIL's own chunk readers into what they add to the
    image's `info`; and why the file is cut short (it ends inside a chunk, or before its image data), or None. Only
    the chunks' headers are read on the way: the image data is skipped, not decoded. A file that ends between two
    chunks without its IEND is left to the decoder, which reads one whose image data is whole, as PIL does."""
    kept, after_pixels, reading = [], False, True
    with open(path, "rb") as handle:
        size = os.fstat(handle.fileno()).st_size
        if handle.read(len(PNG_SIGNATURE)) != PNG_SIGNATURE:
            return {}, None
        while True:
            header = handle.read(8)
            if not header and after_pixels:
                break
            if len(header) < 8:
                return _tail_info(kept), PNG_CUT
            length, kind = struct.unpack(">I4s", header)
            if kind == b"IEND":
                break
            if handle.tell() + length + 4 > size:  # its data or CRC is not there
                return _tail_info(kept), PNG_CUT
            if kind == b"IDAT":
                after_pixels = True
            elif after_pixels and kind == b"fcTL":  # the next frame: PIL's decode of the first stops here
                reading = False
            elif after_pixels and reading and kind in PNG_TAIL_CHUNKS:
                kept.append((kind, handle.read(length)))
                length = 0
            handle.seek(length + 4, os.SEEK_CUR)  # past the data and its CRC
    return _tail_info(kept), None


def _tail_info(chunks: list[tuple[bytes, bytes]]) -> dict:
    import io

    from PIL import PngImagePlugin

    stream = PngImagePlugin.PngStream(io.BytesIO(b"".join(data for _, data in chunks)))
    for kind, data in chunks:
        stream.call(kind, 0, len(data))
    return stream.im_info


def open_image(path):
    """PIL's `Image.open` without PIL's own warnings (see quiet_pil): a JPEG's EXIF block is parsed as it opens.
    HEIC/HEIF photos open too where pillow-heif is installed (`heif_opener`). An image over PIL's decompression-bomb
    limit raises PIL's DecompressionBombError, but a JPEG below twice it (`refuse_bomb`)."""
    from PIL import Image

    heif_opener()
    with quiet_pil(), warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always", Image.DecompressionBombWarning)
        image = Image.open(path)
    refuse_bomb(image, said)
    for warning in said:  # any other warning is shown as it would have been
        if not issubclass(warning.category, Image.DecompressionBombWarning):
            warnings.warn_explicit(warning.message, warning.category, warning.filename, warning.lineno)
    return image


DRAFT_FORMATS = ("JPEG", "MPO")  # decoded at a fraction of their size (PIL's draft: 1/2, 1/4, 1/8) where that covers the training size


def refuse_bomb(image, said) -> None:
    """Raise PIL's DecompressionBombError for an image PIL warned of, as over its limit (`said`: the warnings its
    opening gave; over twice the limit PIL raises itself), and close it; but keep a JPEG: it is decoded at a fraction
    of its size, and refused only if that still is over the limit (data.load_framed_sizes). A 100-megapixel camera's
    photo (Fujifilm GFX, Hasselblad X2D) is just over the limit, and a JPEG's draft decodes it at 1/8, 1.6 megapixels."""
    from PIL import Image

    bombs = [warning for warning in said if issubclass(warning.category, Image.DecompressionBombWarning)]
    if bombs and image.format not in DRAFT_FORMATS:
        image.close()
        raise Image.DecompressionBombError(str(bombs[0].message))


@functools.cache
def heif_opener() -> bool:
    """Whether PIL reads HEIC/HEIF photos (an iPhone's): pillow-heif, where installed (`pip install 'sdtune[heif]'`),
    registers its opener once. It applies the photo's rotation and mirroring as it decodes, and sets the EXIF
    orientation it hands PIL to 1, so the photo is not turned twice; it opens the primary image of several."""
    try:
        import pillow_heif
    except (ImportError, OSError):  # not installed, or its libheif cannot load
        return False
    pillow_heif.register_heif_opener()
    return True


@contextlib.contextmanager
def quiet_pil() -> Iterator[None]:
    """A block in which PIL's own warnings (corrupt EXIF data, ...) are not shown: they name no file, and would
    come again each time a header is read; data.readable_images names them once, with their file."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=UserWarning, module=r"PIL\.")
        yield


def bucket_step(resolution: int) -> int:
    """The bucket sides' step: 64 px, or for smaller resolutions (the tiny test models) resolution/8
    rounded down to a multiple of 8 (at least 8), so that a small model has several buckets too."""
    return min(MAX_STEP, max(VAE_FACTOR, resolution // 8 // VAE_FACTOR * VAE_FACTOR))


def bucket_sizes(resolution: int) -> list[tuple[int, int]]:
    """(width, height) of every bucket, square first, then from the widest to the tallest."""
    step = bucket_step(resolution)
    area = resolution * resolution
    shortest = max(step, math.ceil(resolution / 2 / step) * step)
    sizes = {(resolution, resolution)}
    for short in range(shortest, resolution, step):
        long = min(2 * resolution, area // short // step * step)
        if long > short:
            sizes |= {(long, short), (short, long)}
    return sorted(sizes, key=lambda size: (size != (resolution, resolution), -size[0] / size[1]))


def nearest_bucket(width: int, height: int, sizes: list[tuple[int, int]]) -> tuple[int, int]:
    """The bucket whose aspect ratio is nearest the image's (in log ratio; ties go to the first listed)."""
    ratio = math.log(width / height)
    return min(sizes, key=lambda size: abs(math.log(size[0] / size[1]) - ratio))


def aspect_distance(size: tuple[int, int], other: tuple[int, int]) -> float:
    """How far apart two (width, height) sizes' aspect ratios are, in log ratio (rounded: 2:1 and 1:2 are
    equally far from square, exactly)."""
    return round(abs(math.log(size[0] / size[1]) - math.log(other[0] / other[1])), 9)


def class_pools(instance_buckets: list, class_buckets: list, batch_size: int) -> dict[tuple[int, int], list[int]]:
    """For each concept images' bucket, the class images (indices into `class_buckets`, each image's own
    bucket or None for an unreadable one) its batches draw from: those of the same bucket when it holds at
    least a batch of them, else those of the nearest buckets (equally near ones together), nearest first,
    until they hold a batch (or all of them, when the class images are fewer than a batch)."""
    members: dict[tuple[int, int], list[int]] = {}
    for index, size in enumerate(class_buckets):
        if size is not None:
            members.setdefault(size, []).append(index)
    pools = {}
    for size in sorted({s for s in instance_buckets if s is not None}):
        pool: list[int] = []
        for reach in sorted({aspect_distance(size, other) for other in members}):
            pool = sorted(i for other, indices in members.items() if aspect_distance(size, other) <= reach for i in indices)
            if len(pool) >= batch_size:
                break
        pools[size] = pool
    return pools


def check_buckets(bucket_of: list, batch_size: int, names: list[str] | None = None) -> None:
    """Refuse a bucket holding fewer images than a batch: its batches would be smaller than the others'
    (one image trained alone, as often as a full batch), which kohya-ss does silently."""
    counts: dict[tuple[int, int], int] = {}
    for size in bucket_of:
        if size is not None:  # an unreadable image
            counts[size] = counts.get(size, 0) + 1
    small = sorted((count, size) for size, count in counts.items() if count < batch_size)
    if small:
        count, (width, height) = small[0]
        example = ""
        if names is not None:
            example = " (" + ", ".join(n for n, s in zip(names, bucket_of) if s == (width, height))[:120] + ")"
        raise SdtuneError(
            f"--buckets: the {width}x{height} bucket holds {count} image(s){example}, fewer than --batch-size {batch_size}; "
            f"give a --batch-size of at most {count}, more images of that shape, or leave --buckets off"
        )


class BucketBatchSampler:
    """Batches of indices, each from one bucket; a DataLoader's `batch_sampler`.

    Each epoch shuffles every bucket's images, cuts them into batches of `batch_size` (a bucket's last
    batch may be smaller), and shuffles the batches of all buckets together. `repeats[i]` puts image i in
    the epoch that many times (balanced concepts). The number of batches is the same every epoch, so the
    loop can skip the batches already drawn when it resumes; `reseed` starts the draws again from a seed.

    With `class_pools` (prior preservation: each bucket's class examples, see `class_pools`) every index
    becomes an (image, class example) pair: each bucket's pool is drawn in a shuffled order, reshuffled
    when it runs out, by the same seeded generator after the batches are laid out (so the concept images'
    order is the one drawn without class images).
    """

    def __init__(self, bucket_of: list[tuple[int, int]], batch_size: int, repeats: list[int] | None = None, seed: int = 0,
                 class_pools: dict[tuple[int, int], list[int]] | None = None):
        import numpy as np

        repeats = repeats or [1] * len(bucket_of)
        self.sizes = sorted(set(bucket_of))
        self.buckets: list[np.ndarray] = []
        for size in self.sizes:
            members = [i for i, s in enumerate(bucket_of) if s == size]
            self.buckets.append(np.asarray([i for i in members for _ in range(repeats[i])], dtype=np.int64))
        if class_pools is not None and not all(class_pools.get(size) for size in self.sizes):
            raise ValueError("every bucket needs class examples to draw from")
        self.class_pools = class_pools
        # not `batch_size`: Accelerate then shards these batches across processes as whole batches of
        # varying length, never topping one up with another bucket's images
        self.images_per_batch = batch_size
        self.reseed(seed)

    def reseed(self, seed: int) -> None:
        import numpy as np

        self.rng = np.random.default_rng(seed)

    def __len__(self) -> int:
        return sum(-(-len(members) // self.images_per_batch) for members in self.buckets)

    def __iter__(self) -> Iterator[list]:
        batches = []
        for size, members in zip(self.sizes, self.buckets):
            order = self.rng.permutation(members)
            batches += [(size, order[start : start + self.images_per_batch].tolist()) for start in range(0, len(order), self.images_per_batch)]
        batches = [batches[i] for i in self.rng.permutation(len(batches))]
        if self.class_pools is None:
            return iter([batch for _, batch in batches])
        left: dict[tuple[int, int], list[int]] = {}  # each pool's class examples not yet drawn in this pass
        paired = []
        for size, batch in batches:
            pairs = []
            for index in batch:
                if not left.get(size):
                    left[size] = self.rng.permutation(self.class_pools[size]).tolist()
                pairs.append((index, left[size].pop()))
            paired.append(pairs)
        return iter(paired)


def image_buckets(config, paths: list) -> list[tuple[int, int]]:
    """The bucket of each image, from its header alone (no pixel is decoded: `image_facts`), before the model loads; None
    for an unreadable image (loading skips it with a warning). A bucket too small for the model is refused."""
    from .limits import smallest_resolution
    from .models import read_model_configs

    configs = read_model_configs(config.model)
    resolution = config.resolution or configs.native_resolution
    sizes, least = bucket_sizes(resolution), smallest_resolution(configs)
    found = []
    for path in paths:
        try:
            width, height = image_facts(path).size
        except Exception:  # PIL raises many kinds for unreadable files; loading warns about them
            found.append(None)
            continue
        found.append(nearest_bucket(width, height, sizes))
        if min(found[-1]) < least:  # a GroupNorm would normalise single values, as --resolution's check says
            raise SdtuneError(
                f"--buckets: {Path(path).name} ({width}x{height}) goes to the {found[-1][0]}x{found[-1][1]} bucket, "
                f"smaller than {config.model}'s smallest side ({least} px); give a larger --resolution"
            )
    return found
