"""Captions for concept images, and the caption augmentations of kohya-ss' trainers.

A caption file beside an image (`img.txt` for `img.png`, or kohya-ss' other convention `img.caption`;
either extension in any case) or a row of the folder's `metadata.jsonl`
(`{"file_name": "img.png", "text": "..."}`, diffusers' imagefolder convention) replaces the template's
prompt for that image; `<name>` placeholders in it become the concept's token. An image without
either gets the template's prompt.

A caption file of several non-blank lines holds caption variants, as OneTrainer and SimpleTuner read it (kohya-ss
reads the first line, or with `--enable_wildcard` one at random): each time the image is drawn, one line is drawn
(`draw_line`). So is one of a metadata row's `"text"` given as a list of strings, as diffusers' text-to-image
examples read a caption column of lists (HF imagefolder keeps such a column as a list). Such an image's prompt is
a tuple of its lines; a one-line caption stays a plain string.

In the loop, `--shuffle-caption` shuffles a caption's comma-separated tags, keeping the first
`--keep-tokens` in place, and `--caption-dropout P` trains on the empty prompt with probability P
(what classifier-free guidance needs). Both draw from torch's generator, which the loop seeds per
epoch (and process), so a resumed run draws what the uninterrupted one drew.
"""

from __future__ import annotations

import codecs
import json
import unicodedata
from pathlib import Path

from .errors import SdtuneError, warn

CAPTION_SUFFIXES = (".txt", ".caption")  # in this order: kohya-ss' trainers read either, as their caption_extension says
METADATA_FILE = "metadata.jsonl"


# an image's prompt: one text, or the caption variants of which one is drawn each time it is drawn (two or more)
Prompt = str | tuple[str, ...]


def read_captions(images: list[Path]) -> list[Prompt | None]:
    """Each image's caption (whitespace collapsed; a tuple of its variants where it has several), or None where it
    has none."""
    metadata: dict[Path, dict[str, Prompt | None]] = {}
    listed: dict[Path, dict] = {}
    captions = []
    for image in images:
        folder = image.parent
        if folder not in metadata:
            metadata[folder] = _read_metadata(folder / METADATA_FILE)
        beside = caption_file(image, listed)
        if beside is not None:
            captions.append(_read_caption_file(beside))
        else:
            captions.append(metadata[folder].get(same_name(image.name)))
    return captions


def warn_captions_of_no_image(folder: Path, image_suffixes: set[str]) -> None:
    """One warning naming the caption files of a concept folder that caption no file there (their stem is no other
    file's), so are read for no image: one named `IMG_1.jpg.txt`, as some captioning tools name them (IMG_1.jpg's is
    `IMG_1.txt`), or one left behind by a photo removed or renamed. `image_suffixes`: what is read as an image."""
    try:
        files = [path for path in folder.iterdir() if not path.name.startswith(".") and path.is_file()]
    except OSError:  # an unreadable folder is named where its images are listed
        return
    stems = {same_name(path.stem) for path in files if path.suffix.lower() not in CAPTION_SUFFIXES}
    alone = sorted(path for path in files if path.suffix.lower() in CAPTION_SUFFIXES and same_name(path.stem) not in stems)
    if not alone:
        return
    shown = ", ".join(path.name for path in alone[:3]) + (f" and {len(alone) - 3} more" if len(alone) > 3 else "")
    # `IMG_1.jpg.txt`: named for the image's whole name
    whole = next((Path(path.stem) for path in alone if Path(path.stem).suffix.lower() in image_suffixes
                  and same_name(Path(path.stem).stem) in stems), None)
    hint = f"; an image's caption file is named for its stem: {whole.name}'s is {whole.stem}.txt" if whole else ""
    warn(f"{folder}: caption files of no image there, not read: {shown}{hint}")


def same_name(name: str) -> str:
    """A file name as names are compared: in Unicode's composed form (NFC). macOS writes names decomposed (NFD: `é` as
    `e` and a combining accent) where Linux and Windows keep them as typed (mostly NFC), so `café.txt` saved on a Mac
    beside `café.jpg` saved on Linux differ byte for byte, and are one name to their user."""
    return unicodedata.normalize("NFC", name)


def caption_file(image: Path, listed: dict[Path, dict] | None = None) -> Path | None:
    """The caption file beside an image: `STEM.txt`, else `STEM.caption`, the extension in any case (a camera's
    `IMG_1.JPG` with `IMG_1.TXT`; the lower-case name first where both are there), the stem compared in NFC
    (`same_name`: one saved on macOS matches); None without one. `listed` keeps each folder's caption files between
    calls, so a folder of many images is listed once."""
    listed = {} if listed is None else listed
    folder = image.parent
    if folder not in listed:
        listed[folder] = _caption_files(folder)
    for suffix in CAPTION_SUFFIXES:
        found = listed[folder].get((same_name(image.stem), suffix))
        if found:  # where several names are one in NFC (named in a warning), the image's own spelling first
            return next((path for path in found if path.stem == image.stem), found[0])
    return None


def _caption_files(folder: Path) -> dict[tuple[str, str], list[Path]]:
    """(stem in NFC, lower-case extension) → the caption files of `folder` of that stem and extension: the lower-case
    extension's first. Files whose names differ only in their Unicode form are named in a warning."""
    try:
        entries = sorted(folder.iterdir())
    except OSError:  # an unreadable folder is named where its images are listed
        return {}
    found: dict[tuple[str, str], list[Path]] = {}
    for path in entries:
        suffix = path.suffix.lower()
        if suffix in CAPTION_SUFFIXES and path.is_file():
            found.setdefault((same_name(path.stem), suffix), []).append(path)
    for paths in found.values():
        paths.sort(key=lambda path: path.suffix != path.suffix.lower())  # the lower-case name wins, as before
    warn_same_names([path.name for paths in found.values() for path in paths], f"caption files in {folder}")
    return found


def warn_same_names(names: list[str], what: str) -> None:
    """One warning naming the `names` that are one name in NFC (`same_name`) but differ byte for byte: one saved on
    macOS, one elsewhere; only one of them is read."""
    spelled: dict[str, set[str]] = {}
    for name in names:
        spelled.setdefault(same_name(name), set()).add(name)
    clashes = sorted(same for same, spellings in spelled.items() if len(spellings) > 1)
    if clashes:
        shown = ", ".join(clashes[:3]) + (f" and {len(clashes) - 3} more" if len(clashes) > 3 else "")
        warn(f"{what}: {shown} {'is' if len(clashes) == 1 else 'are'} there twice, spelled in two Unicode forms "
             "(one saved on macOS, which decomposes accents): only one of each is read; remove the other")


def read_utf8(path: Path, what: str = "") -> str:
    """A text file's content (a byte-order mark dropped): UTF-8, or UTF-16 that starts with its byte-order mark
    (`decode_text`); one line naming the file where it is neither or cannot be read. `what` names the kind of
    file in the message ("caption file ")."""
    try:
        data = path.read_bytes()
    except OSError as error:
        raise SdtuneError(f"{what}{path} cannot be read: {error.strerror or error}") from None
    return decode_text(data, f"{what}{path}", "; save it as UTF-8")


UTF16_BOMS = ((codecs.BOM_UTF16_LE, "utf-16-le"), (codecs.BOM_UTF16_BE, "utf-16-be"))


def decode_text(data: bytes, name: str, hint: str = "") -> str:
    """A text file's bytes as text, its byte-order mark dropped: UTF-8, or UTF-16 (little or big endian) where
    UTF-16's byte-order mark starts it, as Windows Notepad saves "Unicode" and Windows PowerShell 5 writes by
    default. Anything else is one line naming the file (`name`), with `hint` after it: no other encoding can
    be told from its bytes, and a NUL character, valid UTF-8 as it is, is no caption's (UTF-16 without its mark)."""
    for mark, codec in UTF16_BOMS:
        if data.startswith(mark):
            try:
                text = data[len(mark):].decode(codec)
            except UnicodeDecodeError as error:
                raise SdtuneError(f"{name}: not UTF-16 text, though it starts with UTF-16's byte-order mark "
                                  f"(byte {len(mark) + error.start}){hint}") from None
            if "\0" in text:  # UTF-32's mark starts with UTF-16 little endian's
                raise SdtuneError(f"{name}: not UTF-16 text (a NUL character; UTF-32?){hint}")
            return text
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        raise SdtuneError(f"{name}: not UTF-8 text ({not_utf8_at(data, error.start)}){hint}") from None
    if "\0" in text:
        raise SdtuneError(f"{name}: not UTF-8 text (a NUL character at byte {data.index(0)}: UTF-16 without its "
                          f"byte-order mark?){hint}")
    return text


CONTEXT_CHARACTERS = 24  # of the text before a byte that is not UTF-8, to find it by


def not_utf8_at(data: bytes, start: int) -> str:
    """Where a file stops being UTF-8, for a person to find it: the byte, the text before it, and what Windows-1252
    (Windows' "ANSI" in the West, Latin-1's superset: the likeliest other encoding of a caption) reads there
    (`byte 24 is 0xE9, after 'castle, caf': 'é' in Windows-1252`)."""
    before = data[:start].decode("utf-8-sig")[-CONTEXT_CHARACTERS:]  # valid: the decoding failed at `start`
    said = f"byte {start} is 0x{data[start]:02X}" + (f", after {before!r}" if before else "")
    try:
        return said + f": {data[start:start + 1].decode('cp1252')!r} in Windows-1252"
    except UnicodeDecodeError:  # one of its five unused bytes
        return said


def caption_text(path: Path) -> str:
    """A caption file's text, whitespace collapsed ("" for a file of blanks)."""
    return " ".join(read_utf8(path, "caption file ").split())


def _read_caption_file(path: Path) -> Prompt:
    """A caption file's caption: its one non-blank line, or its lines as variants (`variants`)."""
    text = read_utf8(path, "caption file ")
    lines = [" ".join(line.split()) for line in text.splitlines()]
    lines = [line for line in lines if line]
    if not lines:  # a file of spaces and line ends is not said to be empty: its size is not 0
        raise SdtuneError(f"caption file {path} is {'blank' if text else 'empty'}; write the image's caption in it, or remove it "
                          "to use --template")
    return variants(lines)


def variants(lines: list[str]) -> Prompt:
    """One caption, or a tuple of several to draw from: lines that are all the same are one caption (nothing to draw)."""
    return lines[0] if len(set(lines)) == 1 else tuple(lines)


def prompt_lines(prompt: Prompt) -> tuple[str, ...]:
    """A prompt's variants: a caption's lines, or the prompt alone."""
    return prompt if isinstance(prompt, tuple) else (prompt,)


def first_line(prompt: Prompt) -> str:
    """What stands for a prompt where one fixed text is needed (the validation loss, a prompt shown): its first line,
    as diffusers' examples take a list caption's first outside training."""
    return prompt_lines(prompt)[0]


def every_line(prompts) -> list[str]:
    """Every variant of every prompt of `prompts`, in order (what the text-embedding cache keeps)."""
    return [line for prompt in prompts for line in prompt_lines(prompt)]


def draw_line(prompt: Prompt) -> str:
    """One of a prompt's variants, drawn from torch's generator (the loop's seeded per-epoch stream); a prompt of one
    draws nothing, so runs without several lines draw as before."""
    if not isinstance(prompt, tuple):
        return prompt
    import torch

    return prompt[int(torch.randint(len(prompt), ()))]


def metadata_rows(path: Path, lines: list[str]):
    """(line number, row) of each row of a metadata.jsonl's `lines`: a JSON object with a "file_name"."""
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            raise SdtuneError(f"{path} line {number}: not JSON ({error.msg})") from None
        if not isinstance(row, dict) or not isinstance(row.get("file_name"), str):
            raise SdtuneError(f"{path} line {number}: needs a \"file_name\"")
        yield number, row


def _read_metadata(path: Path) -> dict[str, Prompt | None]:
    """file name (in NFC: `same_name`) → caption from a concept folder's metadata.jsonl (none: an empty map). A
    `"text"` may be a list of captions, one drawn each time (as diffusers' text-to-image examples read one)."""
    if not path.is_file():
        return {}
    captions: dict[str, Prompt | None] = {}
    names = []
    for number, row in metadata_rows(path, read_utf8(path).splitlines()):
        text = row.get("text")
        texts = text if isinstance(text, list) else [text]
        if text is not None and (not texts or not all(isinstance(each, str) and each.strip() for each in texts)):
            raise SdtuneError(f"{path} line {number}: \"text\" must be a caption (non-empty text) or a list of them, got {text!r}")
        names.append(Path(row["file_name"]).name)
        captions[same_name(names[-1])] = variants([" ".join(each.split()) for each in texts]) if text is not None else None
    warn_same_names(names, f"{path}'s \"file_name\"s")
    return captions


def tags(caption: str) -> list[str]:
    """A caption's comma-separated tags, stripped; empty ones dropped."""
    return [tag.strip() for tag in caption.split(",") if tag.strip()]


# an adapter's record of the images it was trained on, under the kohya-ss names its kohya export gives them
TRAINING_IMAGES_KEYS = {"tag_frequency": "ss_tag_frequency", "dataset_dirs": "ss_dataset_dirs", "num_train_images": "ss_num_train_images",
                        "reg_dataset_dirs": "ss_reg_dataset_dirs", "num_reg_images": "ss_num_reg_images"}


def training_images_record(images: list[Path], prompts: list[Prompt], class_images: list[Path] = ()) -> dict[str, str]:
    """What kohya-ss records of a run's images (each a JSON string, under `TRAINING_IMAGES_KEYS`' sdtune names): per
    image folder, how many images' prompts hold each comma-separated tag (the trigger words users look for; an image
    of several lines counts once for a tag in any of them) and how many images it has; and the number of images.
    With prior preservation's `class_images` (kohya-ss' regularisation images), their folders and number alike;
    without, no such keys, so other adapters keep their bytes."""
    from collections import Counter

    def folders(paths) -> str:
        counts = Counter(path.parent.name for path in paths)
        return json.dumps({folder: {"n_repeats": 1, "img_count": count} for folder, count in counts.items()})

    frequency: dict[str, Counter] = {}
    for path, prompt in zip(images, prompts):
        # each tag once an image, in the order written: a set's order changes from process to process (and the bytes with it)
        held = dict.fromkeys(tag for line in prompt_lines(prompt) for tag in tags(line))
        frequency.setdefault(path.parent.name, Counter()).update(list(held))
    record = {
        "tag_frequency": json.dumps({folder: dict(found) for folder, found in frequency.items()}),
        "dataset_dirs": folders(images),
        "num_train_images": str(len(images)),
    }
    if class_images:
        record.update(reg_dataset_dirs=folders(class_images), num_reg_images=str(len(class_images)))
    return record


def check_keep_tokens(captioned: list[tuple[Path, Prompt]], keep_tokens: int) -> None:
    """Refuse a --keep-tokens larger than an image's caption (any of its lines) has tags: it would keep the whole
    caption."""
    for image, prompt in captioned:
        for line in prompt_lines(prompt):
            count = len(tags(line))
            if count < keep_tokens:
                caption = f"{image.name}'s caption" if isinstance(prompt, str) else f"a line of {image.name}'s caption"
                raise SdtuneError(
                    f"--keep-tokens {keep_tokens} is more than the {count} comma-separated tag(s) of {caption} "
                    f"({line[:60]!r}); give a smaller --keep-tokens"
                )


class AugmentedCaptions:
    """A dataset's items with one line drawn of a prompt of several (`draw_line`), its tags after the first
    `keep_tokens` shuffled and each dropped with probability `tag_dropout` (in that order, as kohya-ss' sd-scripts),
    and whole prompts dropped with probability `dropout`. Works on raw and cached datasets alike; drawing an item
    draws the dataset's own random numbers first, then these."""

    def __init__(self, dataset, shuffle: bool = False, keep_tokens: int = 0, dropout: float = 0.0, tag_dropout: float = 0.0):
        self.dataset, self.shuffle, self.keep_tokens, self.dropout = dataset, shuffle, keep_tokens, dropout
        self.tag_dropout = tag_dropout

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict:
        item = dict(self.dataset[index])
        item["prompt"] = self.augment(item["prompt"])
        return item

    def augment(self, prompt: Prompt) -> str:
        import torch

        prompt = draw_line(prompt)
        if self.shuffle or self.tag_dropout:
            parts = tags(prompt)
            kept, rest = parts[: self.keep_tokens], parts[self.keep_tokens :]
            if self.shuffle:
                rest = [rest[i] for i in torch.randperm(len(rest)).tolist()]
            if self.tag_dropout:
                rest = [tag for tag in rest if not bool(torch.rand(()) < self.tag_dropout)]
            prompt = ", ".join(kept + rest)
        if self.dropout and bool(torch.rand(()) < self.dropout):
            prompt = ""
        return prompt
