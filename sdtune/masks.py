"""Masked loss (`--masked-loss`): the loss weighted towards each concept image's subject.

A mask is white where the image is trained, black where it is not, grey in between. It comes from a
file of the image's stem in a `masks/` folder beside the images (`photos/a.jpg` → `photos/masks/a.png`,
any image format; kohya-ss reads masks of the same names from a folder of their own too), or with
`mask_source="alpha"` from the image's own alpha channel (kohya-ss' `--alpha_mask`). A mask is matched
to the image as it is shown: both are turned upright by their own EXIF orientation, and a mask must then
have its image's aspect ratio (within a pixel's rounding): one of another size (a half-size mask) is resized
to its image's size first. It is framed with exactly its image's geometry (resize, crop, bucket, flip;
see data.py) and averaged over each latent pixel's area.

Each latent element's error is weighted by w = u + (1 − u)·m, m the mask's value there and u the
`unmasked_weight` (OneTrainer's "unmasked weight"), and each example's loss is the weighted mean
Σ w·e / Σ w (OneTrainer's "normalize masked area loss"; kohya-ss averages w·e over the whole image, so an
image's pull shrinks with its subject's area): every image pulls as hard whatever its subject's size, and
an all-white mask gives the unmasked loss. Class images (prior preservation) have no mask: weight 1.
"""

from __future__ import annotations

from pathlib import Path

from .image_files import ALPHA_MODES
from .captions import same_name, warn_same_names
from .data import MASK_FOLDER, image_extensions, listed
from .errors import SdtuneError, warn

MASK_SOURCES = ("files", "alpha")


def mask_file(image: Path, listed: dict[Path, dict] | None = None, warn_names: bool = True) -> Path | None:
    """The mask file of a concept image: `masks/STEM.*` beside it (a PNG first; the extension in any case, the
    lower-case one first), the stem compared in NFC (`captions.same_name`: a mask saved on macOS matches), or None.
    `listed` keeps each masks folder's files between calls, so a folder of many masks is listed once; `warn_names`:
    name the masks whose names are one in NFC (False where check_masks named them already)."""
    listed = {} if listed is None else listed
    folder = image.parent / MASK_FOLDER
    if folder not in listed:
        listed[folder] = _mask_files(folder, warn_names)
    found = listed[folder].get(same_name(image.stem), [])
    order = [".png", *sorted(image_extensions() - {".png"})]
    # where several names are one in NFC (named in a warning), the image's own spelling first
    found = sorted(found, key=lambda path: (order.index(path.suffix.lower()), path.suffix != path.suffix.lower(), path.stem != image.stem))
    return next((path for path in found if path.is_file()), None)


def _mask_files(folder: Path, warn_names: bool = True) -> dict[str, list[Path]]:
    """Stem in NFC → the image files of that stem in a masks folder (empty where there is none)."""
    try:
        entries = sorted(folder.iterdir())
    except OSError:  # no masks folder: every image lacks its mask, which check_masks names
        return {}
    found: dict[str, list[Path]] = {}
    for path in entries:
        if path.suffix.lower() in image_extensions() and not path.name.startswith("."):
            found.setdefault(same_name(path.stem), []).append(path)
    if warn_names:
        warn_same_names([path.stem for paths in found.values() for path in paths], f"masks in {folder}")
    return found


def warn_masks_unused(paths: list[Path], masked_loss: bool = False) -> None:
    """Without --masked-loss, or with it and --mask-source alpha: a masks/ folder of images beside the concept
    images (where kohya-ss users keep them) is not read. Said once, naming each such folder, before the model loads
    (a dry run too)."""
    folders = sorted({path.parent / MASK_FOLDER for path in paths})
    holding = [str(folder) for folder in folders if _mask_files(folder, warn_names=False)]
    if not holding:
        return
    if masked_loss:  # the masks come from the alpha channels
        warn(f"{listed(holding)}: masks beside the concept images are not read with --mask-source alpha, which takes "
             "each image's alpha channel as its mask; give --mask-source files to use them")
    else:
        warn(f"{listed(holding)}: masks beside the concept images are used only with --masked-loss; "
             "without it the loss weighs every pixel alike")


def has_alpha(image) -> bool:
    return image.mode in ALPHA_MODES or (image.mode == "P" and "transparency" in image.info)


def upright_mask(path: Path, upright_image, source: str):
    """The mask of the image at `path` as an 8-bit greyscale PIL image, upright and of `upright_image`'s
    size (the image as decoded, its EXIF orientation applied). Sets no warning filters of its own, so images and
    their masks decode on threads (data.load_framed_images)."""
    from PIL import Image, ImageOps

    from .errors import quiet_pil
    from .image_files import open_image

    if source == "alpha":
        return upright_image.convert("RGBA").getchannel("A")
    mask_path = mask_file(path, warn_names=False)  # names spelled twice were named as the run was planned (check_masks)
    if mask_path is None:  # checked before the model loads; the folder may have changed since
        raise SdtuneError(f"--masked-loss: {path.name} has no mask {MASK_FOLDER}/{path.stem}.png beside it")
    with open_image(mask_path) as mask, quiet_pil():
        mask = ImageOps.exif_transpose(mask).convert("L")
    if mask.size != upright_image.size:  # a mask of another size, or the image decoded at a reduced size (a large JPEG's draft)
        # Larger: BOX averages each image pixel's area, as the loss later averages each latent pixel's. Smaller
        # (a half-size mask): BILINEAR, so an edge stays where the mask drew it, at most a grey pixel wide, and grey
        # weights stay grey (NEAREST would move an edge by up to half a mask pixel). kohya-ss resizes a mask
        # (its conditioning image) with INTER_AREA or Lanczos where it is not the training size, but with buckets
        # refuses one of another size than its image; the 8x8 area average leaves little between these filters.
        larger = mask.width >= upright_image.width
        mask = mask.resize(upright_image.size, Image.Resampling.BOX if larger else Image.Resampling.BILINEAR)
    return mask


def same_aspect(size: tuple[int, int], other: tuple[int, int]) -> bool:
    """Whether two (width, height) sizes have one aspect ratio, within the rounding of a pixel of the smaller one's
    sides: a 2016x1512 or 2017x1513 mask of a 4033x3025 photo. |w·H − h·W| ≤ max(W, H), W×H the larger size, says
    that scaling it to the smaller's width (or height) misses the other side by at most a pixel."""
    (width, height), (large_width, large_height) = sorted((size, other))
    return abs(width * large_height - height * large_width) <= max(large_width, large_height)


def check_masks(paths: list[Path], source: str) -> None:
    """Before the model loads: every concept image has a mask of its own aspect ratio (of any size: it is resized
    to its image's) that is not black everywhere."""
    from .image_files import image_facts, open_image, upright_size

    lacking, problems, listed = [], [], {}
    for path in paths:
        try:
            facts = image_facts(path)
        except Exception:  # PIL raises many kinds for unreadable files; loading skips them with a warning
            continue
        size = facts.size
        if source == "alpha":
            if not facts.alpha:
                lacking.append(path.name)
                continue
            mask_path, describe = path, f"the alpha channel of {path.name}"
        else:
            mask_path = mask_file(path, listed)
            if mask_path is None:
                lacking.append(path.name)
                continue
            describe = f"mask {mask_path}"
        try:
            with open_image(mask_path) as mask:
                mask_size, _ = upright_size(mask)
                if not same_aspect(mask_size, size):
                    problems.append(f"{describe} is {mask_size[0]}x{mask_size[1]}, its image {path.name} {size[0]}x{size[1]}: "
                                    "a mask must have its image's aspect ratio (its size, or that scaled)")
                    continue
                values = mask.convert("RGBA").getchannel("A") if source == "alpha" else mask.convert("L")
        except Exception as error:  # PIL raises many kinds for unreadable files
            problems.append(f"{describe} is not a readable image ({(str(error).splitlines() or [type(error).__name__])[0][:100]})")
            continue
        if values.getextrema()[1] == 0:
            problems.append(f"{describe} is black everywhere: nothing of {path.name} would be trained")
    if lacking:
        shown = ", ".join(lacking[:3]) + (", ..." if len(lacking) > 3 else "")
        where = "alpha channel" if source == "alpha" else f"mask in {MASK_FOLDER}/ beside them (of the same stem: {MASK_FOLDER}/{Path(lacking[0]).stem}.png)"
        raise SdtuneError(f"--masked-loss: {len(lacking)} of {len(paths)} concept images have no {where}: {shown}")
    if problems:
        raise SdtuneError(f"--masked-loss: {problems[0]}" + (f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""))


def check_framed_mask(mask, name: str) -> None:
    """A framed mask keeps some of its subject: a crop can cut a mask's white part away."""
    if mask.getextrema()[1] == 0:
        raise SdtuneError(
            f"--masked-loss: the mask of {name} is black everywhere inside the {mask.size[0]}x{mask.size[1]} crop it "
            "is trained at: nothing of it would be trained"
        )


def loss_weights(masks, latent_size, unmasked_weight: float):
    """Each latent element's loss weight, (batch, 1, h, w): the 8-bit masks (batch, 1, H, W) averaged over
    each latent pixel's area (as kohya-ss does), then u + (1 − u)·mask with u the `unmasked_weight`."""
    import torch

    masks = masks.float() / 255
    area = torch.nn.functional.interpolate(masks, size=tuple(latent_size), mode="area")
    return unmasked_weight + (1 - unmasked_weight) * area
