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

import math
from pathlib import Path
from typing import Iterator

from .errors import SdtuneError
from .image_files import image_facts

MAX_STEP = 64  # px: SD's latent grid (VAE ×8) stays divisible by the UNet's three downsamplings (×8)
VAE_FACTOR = 8  # pixels per latent cell of SD's VAE: every side is a multiple of it


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


SIZES_SHOWN = 3  # image sizes named per bucket in the dry run; it counts the rest


def described_buckets(bucket_of: list, image_sizes: list) -> str:
    """Each bucket (width x height), how many images it holds and of which sizes, the commonest first, for the dry run:
    `64x64 (5 images: 320x320 ×2, 256x256 ×2, 1x1); 128x32 (1 image: 20000x100)`. `bucket_of[i]`: image i's bucket,
    `image_sizes[i]`: its (width, height) as shown; None for an unreadable image."""
    from collections import Counter

    from .fileio import counted

    held: dict[tuple[int, int], Counter] = {}
    for bucket, size in zip(bucket_of, image_sizes):
        if bucket is not None:
            held.setdefault(bucket, Counter())[size] += 1
    described = []
    for (width, height), sizes in sorted(held.items()):
        common = sorted(sizes.items(), key=lambda item: (-item[1], item[0]))
        shown = ", ".join(f"{w}x{h}" + (f" ×{count}" if count > 1 else "") for (w, h), count in common[:SIZES_SHOWN])
        more = f" and {counted(len(common) - SIZES_SHOWN, 'other size')}" if len(common) > SIZES_SHOWN else ""
        described.append(f"{width}x{height} ({counted(sum(sizes.values()), 'image')}: {shown}{more})")
    return "; ".join(described)


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
            f"give a --batch-size of at most {count}, more images of that shape, or leave out --buckets"
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
