"""Training data: image folders, concepts, prompt files.

Images of any mode (RGBA, palette, CMYK, 16-bit, greyscale) are converted to RGB, transparency composited
on white; hidden files are never images; files that are not images are skipped with a warning as long as
others remain (by their header before the model loads, `readable_images`, or as they are decoded). PIL's
decompression-bomb guard stays on.
"""

from __future__ import annotations

import contextlib
import math
import os
import re
import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import colour
from .buckets import nearest_bucket
from .captions import decode_text, same_name
from .colour import cmyk_to_rgb, colour_profile, in_srgb
from .errors import SdtuneError, quiet_pil, reading_file, warn, warn_again
from .fileio import counted
from .image_files import decode_threads, heif_opener, image_facts, in_threads, open_image, upright_size

MAX_SEED = 2**32 - 1  # what numpy's and Python's seeding accept (--seed, a prompt line's --d)
MASK_FOLDER = "masks"  # the masks of --masked-loss, beside the images (masks.py)
IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".jfif", ".png", ".webp", ".avif", ".bmp", ".tif", ".tiff", ".gif"}  # a GIF's first frame
# an iPhone's photos, and cameras' (Sony, Canon, Fujifilm write .HIF): images too where pillow-heif is installed
# (image_files.heif_opener)
HEIF_EXTENSIONS = {".heic", ".heif", ".hif"}
# photos PIL does not decode (without plugins): HEIC without pillow-heif, JPEG XL, cameras' raw files; named, never
# silently left out
UNREAD_PHOTO_EXTENSIONS = HEIF_EXTENSIONS | {".jxl", ".dng", ".cr2", ".cr3", ".crw", ".nef", ".nrw", ".arw", ".srf", ".sr2",
                                             ".raf", ".orf", ".rw2", ".rwl", ".pef", ".srw", ".x3f", ".3fr", ".iiq", ".erf"}
HEIF_HINT = "pip install 'sdtune[heif]'"  # what reads HEIC/HEIF photos
# <name>, but not a trained token's own name (<s0>, <s1>, ...: token_embeddings.py), which a prompt may write as is
PLACEHOLDER = re.compile(r"<(?!s\d+>)([^<>\s]+)>")
SKIPPED_SHOWN = 3  # files a warning about several names; it counts the rest
MAX_PROMPT_FILE_BYTES = 64 * 2**20  # read no further: /dev/zero is not a prompt file


# ---------------------------------------------------------------------------------------------
# Prompt files


# kohya-ss' sample-prompt options, as its `line_to_prompt_dict` reads them: the line is cut at every " --"; the
# first piece is the prompt, each other piece an option (its letter, case aside, then its value)
PROMPT_OPTIONS = {"n": "negative prompt", "w": "width", "h": "height", "d": "seed", "s": "steps", "l": "guidance"}
# each option's field of PromptLine
PROMPT_FIELDS = {"n": "negative_prompt", "w": "width", "h": "height", "d": "seed", "s": "steps", "l": "guidance"}


@dataclass(frozen=True)
class PromptLine:
    """A prompt and the kohya-ss options its line gave (None: the command's own setting)."""

    prompt: str
    where: str = ""  # "FILE line N", for messages; empty for a prompt not from a file
    negative_prompt: str | None = None  # --n
    width: int | None = None  # --w
    height: int | None = None  # --h
    seed: int | None = None  # --d: the first seed
    steps: int | None = None  # --s
    guidance: float | None = None  # --l: the classifier-free guidance scale

    @property
    def options(self) -> list[str]:
        """The options the line gave, as it wrote them: `--w`, `--n`, ..."""
        return [f"--{letter}" for letter, name in PROMPT_FIELDS.items() if getattr(self, name) is not None]


def prompt_line_text(line: PromptLine) -> str:
    """`line` as a prompt file's line that `parse_prompt_line` reads back as it is: the prompt, then its options."""
    options = [f" --{letter} {getattr(line, name)}" for letter, name in PROMPT_FIELDS.items() if getattr(line, name) is not None]
    return line.prompt + "".join(options)


def parse_prompt_line(line: str, where: str = "") -> tuple[PromptLine, list[str]]:
    """A prompt file's line, read as kohya-ss reads its sample prompts (`a castle --n blurry --w 512 --d 42`): the
    prompt and its options, and the options sdtune does not know (kohya-ss' --ss, --cn, a typo), which it ignores as
    kohya-ss does. Text after " --" is never part of the prompt, as there. A value that is not what its option takes
    is refused, naming `where`."""
    prompt, *pieces = line.split(" --")
    values: dict[str, Any] = {}
    unknown = []
    for piece in pieces:
        if not piece.strip():  # "castle --": nothing given
            continue
        letter, _, value = piece.partition(" ")
        letter, value = letter.lower(), value.strip()
        if letter not in PROMPT_OPTIONS:
            unknown.append(f"--{letter}")
            continue
        what = PROMPT_OPTIONS[letter]
        if not value:
            raise SdtuneError(f"{where}: --{letter} needs a value (the {what})")
        if letter == "n":
            values["negative_prompt"] = value
            continue
        if letter == "l":
            number = _number(value, float)
            if number is None or not math.isfinite(number):
                raise SdtuneError(f"{where}: --l takes the guidance scale, a number, got {value!r}")
            values["guidance"] = number
            continue
        number = _number(value, int) if value.isdigit() else None
        if letter in "wh" and (number is None or number < 8 or number % 8):
            raise SdtuneError(f"{where}: --{letter} takes the {what} in pixels, a positive multiple of 8, got {value!r}")
        if letter == "d" and (number is None or number > MAX_SEED):
            raise SdtuneError(f"{where}: --d takes the seed, a whole number from 0 to {MAX_SEED}, got {value!r}")
        if letter == "s" and (number is None or number < 1):
            raise SdtuneError(f"{where}: --s takes the denoising steps, a whole number of at least 1, got {value!r}")
        values[PROMPT_FIELDS[letter]] = number
    return PromptLine(prompt.strip(), where, **values), unknown


def _number(text: str, kind):
    try:
        return kind(text)
    except ValueError:
        return None


def read_prompt_lines(path: str | Path) -> list[PromptLine]:
    """The prompts of a prompt file, each with the kohya-ss options of its line (`parse_prompt_line`): one a line;
    blank lines and lines starting with '#' are skipped. The options sdtune does not know are named in one warning.

    `-` reads standard input; a FIFO or /dev/stdin is read as any file is."""
    name, lines = _prompt_file_lines(path)
    read, ignored = [], []
    for number, line in lines:
        prompt, unknown = parse_prompt_line(line, f"{name} line {number}")
        read.append(prompt)
        ignored += [f"{option} (line {number})" for option in unknown]
    if ignored:
        shown = ", ".join(ignored[:SKIPPED_SHOWN]) + (f" and {len(ignored) - SKIPPED_SHOWN} more" if len(ignored) > SKIPPED_SHOWN else "")
        warn(
            f"prompt file {name}: ignored {shown}; sdtune reads "
            + ", ".join(f"--{letter} ({what})" for letter, what in PROMPT_OPTIONS.items())
            + " after a prompt, as kohya-ss does, and ignores the others as it does",
        )
    return read


def read_prompt_file(path: str | Path, options_unused: str = "this command draws every prompt with its own settings") -> list[str]:
    """The prompts of a prompt file (`read_prompt_lines`) without their kohya-ss options: where a line gives any,
    one warning names them and why they are not used (`options_unused`)."""
    lines = read_prompt_lines(path)
    given = [line for line in lines if line.options]
    if given:
        options = sorted({option for line in given for option in line.options})
        warn(
            f"prompt file {Path(path) if str(path) != '-' else 'standard input'}: {counted(len(given), 'line')} give "
            f"{', '.join(options)} (kohya-ss' options), left unused: {options_unused}",
        )
    return [line.prompt for line in lines]


def _prompt_file_lines(path: str | Path) -> tuple[str, list[tuple[int, str]]]:
    """(the file's name for messages, its prompt lines with their numbers from 1, stripped)."""
    path = Path(path)
    if str(path) == "-":  # standard input, as command-line tools read it
        stream = sys.stdin.buffer if hasattr(sys.stdin, "buffer") else sys.stdin
        with reading_file("standard input", "prompt file", "give one prompt a line"):
            data, path = stream.read(MAX_PROMPT_FILE_BYTES + 1), Path("standard input")
        data = data.encode() if isinstance(data, str) else data
    else:
        with reading_file(path, "prompt file", "give a text file with one prompt a line"), open(path, "rb") as handle:
            data = handle.read(MAX_PROMPT_FILE_BYTES + 1)  # also /dev/stdin, a FIFO or a process substitution
    if len(data) > MAX_PROMPT_FILE_BYTES:
        raise SdtuneError(f"prompt file {path} holds more than {MAX_PROMPT_FILE_BYTES // 2**20} MB; give one prompt a line")
    text = decode_text(data, str(path))  # UTF-8 or UTF-16 with its mark; a byte-order mark is not part of the first prompt
    lines = [(number, line.strip()) for number, line in enumerate(text.splitlines(), 1)]
    lines = [(number, line) for number, line in lines if line and not line.startswith("#")]
    if not lines:
        raise SdtuneError(f"prompt file {path} has no prompts")
    return str(path), lines


def warn_truncated_prompts(tokenizer, max_token_length: int, prompts: list[str]) -> None:
    """One warning for the prompts longer than the text encoder reads (`max_token_length` tokens with start and
    end: 77 for CLIP's one window): the first, with what of it is not read, and how many more (a tagger's captions
    are often all long)."""
    limit = max_token_length + 2
    long = []
    for prompt in prompts:
        ids = tokenizer(prompt, truncation=False).input_ids
        if len(ids) > limit:
            long.append((prompt, ids))
    if long:
        prompt, ids = long[0]
        dropped = tokenizer.decode(ids[limit - 1 : -1])
        more = f"; and {len(long) - 1} more prompt(s) over {limit} tokens, truncated alike" if len(long) > 1 else ""
        warn(
            f"prompt {_shorten(prompt)!r} is {len(ids)} tokens, over the text encoder's {limit}: "
            f"truncated, {_shorten(dropped)!r} is not read{more}"
            + ("" if max_token_length >= 225 else "; --max-token-length 225 reads up to 227 (in chunks of 75)"),
        )


def _shorten(text: str, length: int = 40) -> str:
    return text if len(text) <= length else text[: length - 1] + "…"


def fill_placeholders(prompt: str, token: str | dict[str, str] | None) -> str:
    """Replace every `<name>` with the concept's token, or with plain `name` when there is none.

    With several concepts `token` maps each name to its token; a `<name>` it lacks becomes plain `name`. New tokens'
    names (`<s0>`) stay as they are."""
    if isinstance(token, dict):
        return PLACEHOLDER.sub(lambda match: token.get(match.group(1), match.group(1)), prompt)
    return PLACEHOLDER.sub(lambda match: token if token else match.group(1), prompt)


# ---------------------------------------------------------------------------------------------
# Images


def image_extensions() -> set[str]:
    """The extensions (lower case) of the files read as images: HEIC/HEIF too where pillow-heif is installed."""
    return IMAGE_EXTENSIONS | HEIF_EXTENSIONS if heif_opener() else IMAGE_EXTENSIONS


def list_images(folder: str | Path, what: str = "image folder") -> list[Path]:
    """The images of a folder (not of its subfolders), by name. Photos in a format PIL cannot read (a camera's raw
    files; an iPhone's HEIC without pillow-heif) are named in a warning, or in the error where the folder has no other image.
    `what` names the folder in errors. (A setting's `~` was expanded with the config: `config.PATH_SETTINGS`.)"""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise SdtuneError(f"{folder} is a file, not a folder of images")
    if not folder.is_dir():
        raise SdtuneError(f"image folder not found: {folder}")
    try:
        entries = sorted(folder.iterdir())
        # a broken link too: skipped, and named, as files that cannot be read are
        files = [p for p in entries if is_image_name(p) and (p.is_file() or (p.is_symlink() and not p.exists()))]
        unread_extensions = UNREAD_PHOTO_EXTENSIONS - image_extensions()
        unread = [p.name for p in entries if p.suffix.lower() in unread_extensions and not p.name.startswith(".") and p.is_file()]
    except OSError as error:
        raise SdtuneError(f"cannot read image folder {folder}: {error.strerror or error}") from None
    if unread:
        kinds = "/".join(sorted({Path(name).suffix.lower()[1:].upper() for name in unread}))
        heif = f", or for HEIC/HEIF photos {HEIF_HINT}" if any(Path(name).suffix.lower() in HEIF_EXTENSIONS for name in unread) else ""
        unread_text = f"{len(unread)} {kinds} photo(s) ({listed(unread)}), a format sdtune does not read: convert them to JPEG or PNG{heif}"
        if not files:
            raise SdtuneError(f"{what} {folder} has {unread_text}")
        warn(f"{folder}: skipping {unread_text}")
    if not files:
        within = [p.name for p in entries if p.is_dir() and not p.name.startswith(".") and p.name != MASK_FOLDER and _holds_images(p)]
        hint = f"; images in a subfolder are not read: give the subfolder ({shlex.quote(str(folder / within[0]))})" if within else ""
        hint += _kohya_folders_hint(within)
        raise SdtuneError(f"{what} {folder} has no images ({', '.join(sorted(image_extensions()))}){hint}")
    return files


# kohya-ss' training folder names: `10_sks castle` trains its images 10 times an epoch, prompted 'sks castle'
KOHYA_FOLDER_NAME = re.compile(r"(?P<repeats>\d+)_(?P<prompt>.+)")


def _kohya_folders_hint(names: list[str]) -> str:
    """For subfolders named as kohya-ss names its training folders: what sdtune takes in place of their names."""
    kohya = [match for match in map(KOHYA_FOLDER_NAME.fullmatch, names) if match]
    if not kohya:
        return ""
    several = f"; {len(kohya)} such folders: give each its --concept and --images, or move their images into one" if len(kohya) > 1 else ""
    return (f"; a kohya-ss folder name's repeats and prompt ({kohya[0]['repeats']}, {kohya[0]['prompt']!r}) are not read "
            f"either: --steps sets a run's length, and an image without a caption file is prompted by --token and "
            f"--template (class images: --class-prompt){several}")


def _holds_images(folder: Path) -> bool:
    try:
        return any(is_image_name(path) and path.is_file() for path in folder.iterdir())
    except OSError:  # a subfolder that cannot be read gives no hint
        return False


def is_image_name(path: Path) -> bool:
    """Whether a file's name is an image's: an image extension (any case), and not hidden. Hidden files are
    never photos: macOS writes `._IMG_0001.JPG` (AppleDouble metadata) beside every photo on a FAT or network disk."""
    return path.suffix.lower() in image_extensions() and not path.name.startswith(".")


def readable_images(paths: list[Path], what: str = "image") -> list[Path]:
    """The images whose header PIL reads, within its decompression-bomb limit, and that are not cut short
    (`cut_short`: a JPEG without its end, a PNG that ends inside a chunk). The other files are skipped with one warning
    naming them (the first few, with why; `what` names their kind). Nothing is decoded here (`image_files.image_facts`,
    kept for the rest of the start): an image damaged further in is found, and skipped, when it is decoded."""
    readable, skipped, odd = [], [], []
    for path in paths:
        try:
            facts = image_facts(path)
        except Exception as error:  # PIL raises many kinds for files that are not images
            skipped.append((path, unreadable_because(path, error)))
            continue
        if facts.cut:
            skipped.append((path, facts.cut))
            continue
        readable.append(path)
        if facts.odd is not None:
            odd.append(f"{path.name} ({facts.odd})")
    if odd:
        warn(f"PIL finds odd data in {listed(odd)}: read as far as it can, an EXIF orientation it cannot read "
             "not applied")
    if len(skipped) == 1:
        warn(f"skipping {skipped[0][0]}: not a readable {what} ({skipped[0][1]})")
    elif skipped:
        shown = "; ".join(f"{path} ({why})" for path, why in skipped[:SKIPPED_SHOWN])
        more = f"; and {len(skipped) - SKIPPED_SHOWN} more" if len(skipped) > SKIPPED_SHOWN else ""
        warn(f"skipping {len(skipped)} files that are not readable {what}s: {shown}{more}")
    return readable


ENDS_BYTES = 65536  # files of one size are told apart by their first and last bytes before the whole is read


def duplicate_images(paths: list[Path]) -> list[list[Path]]:
    """Groups of files with the same bytes (a copy, or a link to another of the files), each in the order
    given; only files of the same size are read, and of those, whole only where their first and last bytes agree
    (exported photos of one size are common, copies rare)."""
    import hashlib

    def same_ends(path: Path, size: int) -> bytes:
        with open(path, "rb") as handle:
            start = handle.read(ENDS_BYTES)
            handle.seek(max(0, size - ENDS_BYTES))
            return start + handle.read(ENDS_BYTES)

    by_size: dict[int, list[Path]] = {}
    for path in paths:
        with contextlib.suppress(OSError):  # an unreadable file is named where it is read
            by_size.setdefault(path.stat().st_size, []).append(path)
    candidates: dict[tuple[int, bytes], list[Path]] = {}
    for size, same_size in by_size.items():
        for path in same_size if len(same_size) > 1 else ():
            with contextlib.suppress(OSError):
                candidates.setdefault((size, hashlib.sha256(same_ends(path, size)).digest()), []).append(path)
    groups: dict[tuple[int, str], list[Path]] = {}
    for (size, _), same_ends_paths in candidates.items():
        for path in same_ends_paths if len(same_ends_paths) > 1 else ():
            with contextlib.suppress(OSError), open(path, "rb") as handle:
                groups.setdefault((size, hashlib.file_digest(handle, "sha256").hexdigest()), []).append(path)
    order = {path: index for index, path in enumerate(paths)}
    return sorted((sorted(group, key=order.__getitem__) for group in groups.values() if len(group) > 1), key=lambda g: order[g[0]])


def same_names(paths: list[Path]) -> list[list[Path]]:
    """Groups of images of one folder with one name but their extensions (`IMG_0001.HEIC`, `IMG_0001.JPG`, the case
    aside), in the order given: one photo in two formats, as an iPhone's export or a converter leaves the original beside."""
    groups: dict[tuple[Path, str], list[Path]] = {}
    for path in paths:
        groups.setdefault((path.parent, path.stem.casefold()), []).append(path)
    return [group for group in groups.values() if len({p.suffix.lower() for p in group}) > 1]


def spelled_twice(paths: list[Path]) -> list[list[Path]]:
    """Groups of images of one folder whose names are one in Unicode's composed form (`captions.same_name`) but differ
    byte for byte (`café.jpg` saved on a Mac, decomposed, beside one saved elsewhere), in the order given."""
    groups: dict[tuple[Path, str], list[Path]] = {}
    for path in paths:
        groups.setdefault((path.parent, same_name(path.name)), []).append(path)
    return [group for group in groups.values() if len({p.name for p in group}) > 1]


def warn_duplicates(paths: list[Path]) -> None:
    """One warning naming the images that are the same file twice or more: each copy is drawn as another image; one
    naming those of one name with several extensions (likely one photo, converted), and one naming those whose names
    are one in NFC (`spelled_twice`), but where they are copies."""
    groups = duplicate_images(paths)
    copies = {path for group in groups for path in group}
    spelled = [group for group in spelled_twice(paths) if not set(group) <= copies]
    if spelled:
        shown = "; ".join(", ".join(ascii(path.name) for path in group) for group in spelled[:SKIPPED_SHOWN])
        more = f"; and {len(spelled) - SKIPPED_SHOWN} more" if len(spelled) > SKIPPED_SHOWN else ""
        warn(f"images whose names differ only in their Unicode form: {shown}{more}; one was likely saved on a Mac, "
             "which decomposes accents: each is trained as another image, with the same caption; remove one of each")
    named = [group for group in same_names(paths) if not set(group) <= copies]
    if named:
        shown = "; ".join(", ".join(path.name for path in group) for group in named[:SKIPPED_SHOWN])
        more = f"; and {len(named) - SKIPPED_SHOWN} more" if len(named) > SKIPPED_SHOWN else ""
        warn(f"images with one name and several extensions: {shown}{more}; likely one photo saved twice or converted "
             "(an iPhone's export keeps the HEIC beside the JPEG): each is trained as another image, with the same "
             "caption file; remove one of each")
    if groups:
        one_folder = len({path.parent for group in groups for path in group}) == 1
        shown = "; ".join(" = ".join(path.name if one_folder else str(path) for path in group) for group in groups[:SKIPPED_SHOWN])
        more = f"; and {len(groups) - SKIPPED_SHOWN} more" if len(groups) > SKIPPED_SHOWN else ""
        warn(f"the same image more than once: {shown}{more}; each copy is trained as another image, so that image is "
             "drawn as often as its copies together (remove the copies to train it as often as the others)")


def _framed_sizes(paths: list[Path], frames: list):
    """(path, frame, the image's (width, height) from its header) of each image framed (`frames[i]` not None) and
    readable: loading warns about the others."""
    for path, frame_size in zip(paths, frames):
        if frame_size is None:
            continue
        try:
            size = image_facts(path).size
        except Exception:  # PIL raises many kinds for unreadable files
            continue
        yield path, frame_size, size


def warn_cropped_away(paths: list[Path], frames: list, hint: str = "") -> None:
    """One warning naming the images whose framing cuts away more than half of them: those of an aspect ratio
    over twice their frame's (a 10:1 panorama in a square, or in a 4:1 bucket). `frames[i]`: the (width,
    height) image i is center-cropped into, or None (not read); `hint` ends the warning."""
    cut = []
    for path, frame_size, (width, height) in _framed_sizes(paths, frames):
        ratio, frame_ratio = width / height, frame_size[0] / frame_size[1]
        kept = min(ratio, frame_ratio) / max(ratio, frame_ratio)
        if kept < 0.5:
            cut.append(f"{path.name} ({width}x{height}: {share_of(1 - kept)} cut away)")
    if cut:
        warn(f"center-cropping cuts away more than half of {listed(cut)}; crop such photos yourself to keep the part "
             f"that matters{hint}")


def warn_upscaled_images(paths: list[Path], frames: list, what: str = "image") -> None:
    """Before the model loads (a dry run too): the images smaller than the frame they are trained at, named as loading
    names them (`LoadNotes`, as `what`: "held-out image"), from their headers. `frames[i]`: image i's (width, height)
    frame, or None (not read)."""
    notes = LoadNotes(what=what)
    for path, frame_size, (width, height) in _framed_sizes(paths, frames):
        if max(frame_size[0] / width, frame_size[1] / height) > 1:
            notes.upscaled.append((path.name, (width, height), tuple(frame_size)))
    notes.warn()


def share_of(fraction: float) -> str:
    """A fraction as a percentage, never rounded to 100% where some is left (a 200:1 panorama in a square keeps 0.5%
    of it: "99.5% cut away", not "100%")."""
    text = f"{fraction:.0%}"
    return f"{min(fraction, 0.999):.1%}" if text == "100%" and fraction < 1 else text


def unreadable_because(path: Path, error: BaseException) -> str:
    """Why PIL could not read an image file, in a few words (its own messages repeat the path)."""
    from PIL import Image, UnidentifiedImageError

    if isinstance(error, (Image.DecompressionBombError, Image.DecompressionBombWarning)):
        return f"over PIL's decompression-bomb limit: {str(error).split(',')[0]}"
    if isinstance(error, FileNotFoundError) and path.is_symlink():
        return f"a link to {Path(os.readlink(path))}, which is not there"
    if isinstance(error, UnidentifiedImageError):
        with contextlib.suppress(OSError):
            if path.stat().st_size == 0:
                return "an empty file"
        return "not an image format PIL reads"
    return first_line(error).replace(f"'{path}'", "").replace(str(path), "").strip() or type(error).__name__


def first_line(error: BaseException) -> str:
    """An error's first line, at most 100 characters (PIL's messages can run over several)."""
    return (str(error).strip().splitlines() or [type(error).__name__])[0][:100]


def damaged_image(path: str | Path) -> str | None:
    """What is wrong with an image file that should be whole (a cached or generated one), or None:
    every chunk's checksum (`verify`) and a full decode must pass."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            image.verify()
        with Image.open(path) as image:
            image.load()
    except Exception as error:  # PIL raises many kinds for damaged files
        return (str(error).strip().splitlines() or [type(error).__name__])[0][:100]
    return None


def to_rgb(image, plain_cmyk: bool | None = None):
    """Any PIL image as 8-bit RGB (the image itself where it is that in sRGB already); transparency is composited on
    white; colours in sRGB (`in_srgb`; CMYK by its profile, `colour.cmyk_to_rgb`). `plain_cmyk`: whether the image is a CMYK JPEG PIL read inverted
    (`colour.plain_cmyk`), told by the caller where the image is no longer the opened file (turned upright); None:
    told from the image.

    16-bit greyscale (a 16-bit PNG or TIFF, and 32-bit integers within 0..65535) keeps its tones: 65535 is
    white. Floats within 0..1 are scaled by 255. Other integer or float images, whose white is unknown,
    are stretched from their lowest to their highest value (one value throughout: mid-grey). A PNG's narrow-range
    values (16 to 235, as its cICP chunk may say) are stretched to 0..255."""
    import numpy as np
    from PIL import Image

    profile = colour_profile(image)  # compositing below makes a new image, without it
    narrow = image.info.get("narrow_range")  # a PNG's values from 16 to 235 (image_files.describe_colours)
    if image.mode == "CMYK":
        return cmyk_to_rgb(image, profile, colour.plain_cmyk(image) if plain_cmyk is None else plain_cmyk)
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        array = np.asarray(image, dtype=np.float64)
        low, high = float(array.min()), float(array.max())
        if image.mode != "F" and low >= 0 and high <= 65535:
            scaled = array / 257.0
        elif image.mode == "F" and low >= 0 and high <= 1:
            scaled = array * 255.0
        elif high > low:
            scaled = (array - low) * (255.0 / (high - low))
        else:
            scaled = np.full_like(array, 127.5)
        image = Image.fromarray(np.clip(np.rint(scaled), 0, 255).astype(np.uint8), mode="L")
    if image.mode == "P":
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA"):
        background = Image.new("RGBA", image.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, image.convert("RGBA"))
    image = image if image.mode == "RGB" else image.convert("RGB")  # PIL's convert to its own mode copies it whole
    return in_srgb(image.point(NARROW_TO_FULL_RANGE * 3) if narrow else image, profile)


# video's narrow range (black at 16, white at 235) stretched to 0..255
NARROW_TO_FULL_RANGE = [min(255, max(0, round((value - 16) * 255 / 219))) for value in range(256)]


@dataclass
class Framed:
    """An image at its training size, and where it came from (SDXL's size and crop conditioning)."""

    image: Any  # RGB PIL image
    original_size: tuple[int, int]  # (height, width) of the file's image, before any resizing
    crop_top_left: tuple[int, int]  # (top, left) of the crop, in the resized image's pixels
    resized_width: int  # the resized image's width, to mirror the crop's left edge with the image
    mask: Any = None  # with a masked loss: the 8-bit greyscale mask, framed as the image is


def load_image(path: Path, resolution: int):
    """Open, convert, resize the shorter side to `resolution` and center-crop to a square."""
    return load_framed(path, resolution).image


def load_framed(path: Path, resolution: int, buckets: list[tuple[int, int]] | None = None, mask_of=None, notes=None,
                warn_upscaled: bool = True) -> Framed:
    """Open, convert and fit an image into a `resolution` square or, with `buckets`, into the (width,
    height) bucket nearest its aspect ratio. A phone photo's EXIF orientation is applied first."""

    def own_size(width: int, height: int) -> tuple[int, int]:
        return nearest_bucket(width, height, buckets) if buckets else (resolution, resolution)

    return load_framed_sizes(path, lambda width, height: [own_size(width, height)], warn_upscaled, mask_of, notes)[0]


def load_framed_sizes(path: Path, sizes_of, warn_upscaled: bool = True, mask_of=None, notes: "LoadNotes | None" = None) -> list[Framed]:
    """Open and convert an image once (EXIF orientation applied) and fit it into each (width, height) of
    `sizes_of(width, height)`, given its upright size; upscaling into the first size warns if `warn_upscaled`.
    `mask_of(path, upright image)` gives the image's mask (masks.upright_mask), framed with the image.
    With `notes`, what would warn (several frames, upscaled) is kept there, for one warning over many images."""
    from PIL import Image, ImageOps

    kept = notes if notes is not None else LoadNotes()
    image = open_image(path)  # over PIL's decompression-bomb limit: refused, but a JPEG (decoded at a fraction, below)
    with image:
        # an animation's frames; a phone's MPO JPEG holds the photo first, then its previews, depth or gain maps; a HEIC
        # opens at its primary image (heif_opener)
        if getattr(image, "n_frames", 1) > 1 and image.format not in ("MPO", "HEIF"):
            kept.frames.append((path.name, image.n_frames))
        (width, height), turned = upright_size(image)
        sizes = sizes_of(width, height)
        largest = (max(w for w, _ in sizes), max(h for _, h in sizes))  # a draft covering it covers every size
        image.draft("RGB", largest[::-1] if turned else largest)  # JPEGs decode at reduced size when large
        if Image.MAX_IMAGE_PIXELS and image.width * image.height > Image.MAX_IMAGE_PIXELS:  # a JPEG that draft left large
            raise Image.DecompressionBombError(f"Image size ({image.width * image.height} pixels) exceeds limit of "
                                               f"{Image.MAX_IMAGE_PIXELS} pixels even decoded at a fraction of its size")
        plain_cmyk = colour.plain_cmyk(image)
        with quiet_pil():  # a corrupt EXIF block was named once, by readable_images
            # turned in place: an upright photo is not copied whole (framing below makes the images kept, while it is open)
            ImageOps.exif_transpose(image, in_place=True)
        mask = mask_of(path, image) if mask_of else None  # before to_rgb: it may be the alpha channel
        image = to_rgb(image, plain_cmyk)
        framed = [frame(image, *size, mask) for size in sizes]
    size = sizes[0]
    if warn_upscaled and max(size[0] / width, size[1] / height) > 1:
        kept.upscaled.append((path.name, (width, height), size))
    if notes is None:
        kept.warn()
    for each in framed:
        each.original_size = (height, width)
    return framed


@dataclass
class LoadNotes:
    """What loading images has to say of them, kept until `warn` says it in one warning a kind (however many
    images a folder of phone thumbnails or GIFs has)."""

    frames: list = field(default_factory=list)  # (name, frame count) of each image of several frames
    upscaled: list = field(default_factory=list)  # (name, (width, height), (frame width, frame height)) of each small one
    what: str = "image"  # their kind, named with them where it is not plain images: "class image"

    def warn(self) -> None:
        # a class image is named as one: a concept folder may hold a file of the same name
        kind, kinds = ("", "") if self.what == "image" else (f"{self.what} ", f"{self.what}s ")
        if len(self.frames) == 1:
            name, count = self.frames[0]
            warn(f"{kind}{name} has {count} frames: the first is used")
        elif self.frames:
            warn(f"{kinds}{listed([name for name, _ in self.frames])} have several frames: the first of each is used")
        if len(self.upscaled) == 1:
            name, (width, height), size = self.upscaled[0]
            smaller = f"{size[0]}px" if size[0] == size[1] else f"its {size[0]}x{size[1]} bucket"
            warn(f"{kind}{name} is {width}x{height}, smaller than {smaller}: upscaled")
        elif self.upscaled:
            shown = listed([f"{name} ({width}x{height})" for name, (width, height), _ in self.upscaled])
            warn(f"{len(self.upscaled)} {self.what}s are smaller than the size they are trained at, and upscaled: {shown}")
        self.frames, self.upscaled = [], []


def listed(names: list[str]) -> str:
    """The first few of `names`, and how many more."""
    return ", ".join(names[:SKIPPED_SHOWN]) + (f", and {len(names) - SKIPPED_SHOWN} more" if len(names) > SKIPPED_SHOWN else "")


def fit_square(image, resolution: int):
    """Resize an RGB image's shorter side to `resolution` and center-crop it to a square."""
    return frame(image, resolution, resolution).image


def frame(image, width: int, height: int, mask=None) -> Framed:
    """Resize an RGB image to cover `width`×`height` and center-crop it to that size; a `mask` of the
    image's size is resized and cropped alike."""
    from PIL import Image

    old_width, old_height = image.size
    scale = max(width / old_width, height / old_height)
    size = (max(width, round(old_width * scale)), max(height, round(old_height * scale)))
    left, top = (size[0] - width) // 2, (size[1] - height) // 2
    box = (left, top, left + width, top + height)

    def fitted(picture):
        return picture.resize(size, Image.Resampling.BICUBIC, reducing_gap=3.0).crop(box)

    return Framed(fitted(image), (old_height, old_width), (top, left), size[0], fitted(mask) if mask is not None else None)


def load_images(paths: list[Path], resolution: int) -> list:
    """Every readable image; unreadable files are skipped with a warning, none readable is an error."""
    return [framed.image for framed in load_framed_images(paths, resolution)]


def load_framed_images(paths: list[Path], resolution: int, buckets: list[tuple[int, int]] | None = None,
                       skipped: list[Path] | None = None, mask_of=None, threads: int | None = None,
                       what: str = "image", warn_upscaled: bool = True) -> list[Framed]:
    """`load_framed` for every readable image; unreadable files are skipped with a warning (and added to
    `skipped`), none readable is an error. Images of several frames and small ones (unless `warn_upscaled` is False:
    `warn_upscaled_images` named them as the run was planned) are named in one warning each, as `what` ("class
    image": named as such). The images (and their masks) are decoded on `threads` threads (None:
    `image_files.decode_threads`), to the same images, with the same warnings in the same order, as on one."""
    loaded, skipped = [], skipped if skipped is not None else []
    notes = LoadNotes(what=what)
    kind = "" if what == "image" else f"{what} "
    for path, framed, own in decoded_in_threads(lambda path, own: load_framed(path, resolution, buckets, mask_of, own, warn_upscaled),
                                                  paths, threads):
        if own is None:
            skipped.append(path)
            warn(f"skipping {kind}{path}: not a readable image ({unreadable_because(path, framed)})")
            continue
        loaded.append(framed)
        notes.frames += own.frames
        notes.upscaled += own.upscaled
    notes.warn()
    if not loaded:
        folder = paths[0].parent if paths else "?"
        raise SdtuneError(f"no readable {what}s in {folder} ({len(skipped)} file(s) could not be read)")
    return loaded


def decoded_in_threads(load, items: list, threads: int | None = None):
    """`load(item, notes)` for each item on `threads` threads (None: `image_files.decode_threads`), yielded in the items'
    order as (item, result, notes), each item's warnings raised again just before it, as one thread would raise them;
    where a file cannot be read (PIL's errors, a bomb, OSError, ValueError) `result` is the error and `notes` None.
    Any other error (a mask's check, memory) is raised as one thread would, after the warnings before it."""
    from PIL import Image, UnidentifiedImageError

    unreadable = (Image.DecompressionBombError, Image.DecompressionBombWarning, UnidentifiedImageError, OSError, ValueError)

    def decoded(item):
        notes = LoadNotes()  # each item's own: merged by the caller in the items' order
        try:
            return load(item, notes), notes
        except unreadable as error:
            return error, None

    threads = decode_threads() if threads is None else threads
    for item, (result, error, said) in zip(items, in_threads(decoded, items, threads)):
        warn_again(said)
        if error is not None:
            raise error
        yield item, *result


class ConceptDataset:
    """Few-shot concept images as tensors in [-1, 1], with `random_flip` each mirrored left-right half the time.

    Items are `{"pixels": (3, H, W) tensor, "prompt": str, "original_size": (h, w), "crop_top_left":
    (top, left)}` (the last two as int64 tensors, so the default collate stacks them). `prompt` is one
    prompt for every image or a list with each image's own (its caption; a tuple of its lines where it has several,
    which `captions.AugmentedCaptions` draws one of). `images` are PIL images, or
    `Framed` ones that also tell their original size and crop; images of several sizes (aspect-ratio
    buckets) are kept one tensor each. `example(index, flip)` gives one item with the flip chosen by
    the caller, so a latent cache can encode both orientations once and still flip at random.
    Flipping is off unless asked for (as in diffusers and kohya): it would teach a mirrored concept where
    orientation matters (text, digits, a slanted style, an asymmetric object). With `loss_masks` every item
    also has `"loss_mask"`, a (1, H, W) uint8 tensor flipped with the pixels: the framed image's mask, or
    255 everywhere for an image without one (class images; see masks.py).
    """

    def __init__(self, images: list, prompt: str | list[str], random_flip: bool = False, loss_masks: bool = False):
        import numpy as np
        import torch

        framed = [image if isinstance(image, Framed) else Framed(image, image.size[::-1], (0, 0), image.size[0]) for image in images]
        tensors = [torch.from_numpy(np.asarray(f.image, dtype=np.float32) / 127.5 - 1.0).permute(2, 0, 1).contiguous() for f in framed]
        one_size = len({tuple(t.shape) for t in tensors}) == 1
        self.pixels = torch.stack(tensors) if one_size else tensors  # a list where the sizes differ (buckets)
        self.prompts = list(prompt) if isinstance(prompt, list) else [prompt] * len(framed)
        if len(self.prompts) != len(framed):
            raise ValueError(f"{len(self.prompts)} prompts for {len(framed)} images")
        self.prompt = self.prompts[0]
        self.sizes = [(t.shape[2], t.shape[1]) for t in tensors]  # (width, height): the bucket of each image
        self.original_sizes = [f.original_size for f in framed]
        self.crops = [(f.crop_top_left, f.resized_width) for f in framed]
        self.random_flip = random_flip
        self.masks = None
        if loss_masks:  # 8-bit, as read: a float copy of every mask would cost four times the memory
            self.masks = [torch.from_numpy(np.array(f.mask, dtype=np.uint8))[None] if f.mask is not None
                          else torch.full((1, 1, 1), 255, dtype=torch.uint8).expand(1, *t.shape[1:])
                          for f, t in zip(framed, tensors)]

    def __len__(self) -> int:
        return len(self.pixels)

    def example(self, index: int, flip: bool) -> dict:
        import torch

        pixels = self.pixels[index]
        (top, left), resized_width = self.crops[index]
        if flip:  # the crop's left edge, seen in the mirrored image
            left = resized_width - left - pixels.shape[-1]
        item = {
            "pixels": pixels.flip(-1) if flip else pixels,
            "prompt": self.prompts[index],
            "original_size": torch.tensor(self.original_sizes[index]),
            "crop_top_left": torch.tensor((top, left)),
        }
        if self.masks is not None:
            item["loss_mask"] = self.masks[index].flip(-1) if flip else self.masks[index]
        return item

    def __getitem__(self, index: int) -> dict:
        return self.example(index, self.random_flip and random_flip())


def random_flip() -> bool:
    """One fair coin from torch's global generator (seeded by the run's seed)."""
    import torch

    return bool(torch.rand(()) < 0.5)
