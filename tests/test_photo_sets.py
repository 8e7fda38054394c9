"""Photo sets: aspect-ratio buckets, captions beside concept images, caption shuffle and dropout,
several concepts in one run; images of 3:4, 1:1 and 16:9 drawn here with PIL."""

from __future__ import annotations

import dataclasses
import json
import math
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from sdtune.buckets import BucketBatchSampler, bucket_sizes, bucket_step, check_buckets, class_pools, nearest_bucket
from sdtune.captions import AugmentedCaptions, read_captions
from sdtune.config import TrainConfig
from sdtune.errors import SdtuneError

SHAPES = {"portrait": (96, 128), "square": (100, 100), "wide": (160, 90)}  # (width, height): 3:4, 1:1, 16:9


def photo_set(folder: Path, counts=(2, 2, 2), seed: int = 0) -> list[Path]:
    """Noise photos of 3:4, 1:1 and 16:9 (`counts` of each) in `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for (name, (width, height)), count in zip(SHAPES.items(), counts):
        for i in range(count):
            path = folder / f"{name}-{i}.png"
            Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8)).save(path)
            paths.append(path)
    return paths


def run_training(tmp_path, name: str, **settings):
    from sdtune.training import train

    settings = {"model": "tiny-random", "steps": 2, "log_with": "none", "output": str(tmp_path / name), **settings}
    return train(TrainConfig(**settings), progress=False)


# ---------------------------------------------------------------------------------------------
# Buckets


def test_buckets_hold_about_the_resolution_squared_in_steps_of_64_px():
    assert bucket_step(512) == bucket_step(1024) == 64 and bucket_step(64) == 8  # tiny models get several buckets too
    for resolution in (64, 512, 768):
        sizes = bucket_sizes(resolution)
        step = bucket_step(resolution)
        assert sizes[0] == (resolution, resolution) and len(sizes) == len(set(sizes)) > 4
        for width, height in sizes:
            assert width % step == 0 and height % step == 0
            assert 0.75 * resolution**2 <= width * height <= resolution**2
            assert resolution // 2 <= min(width, height) and max(width, height) <= 2 * resolution
            assert (height, width) in sizes
    sizes = bucket_sizes(512)
    assert nearest_bucket(300, 400, sizes) == (448, 576)  # 3:4 → 0.78
    assert nearest_bucket(1000, 1000, sizes) == (512, 512)
    assert nearest_bucket(1920, 1080, sizes) == (640, 384)  # 16:9 = 1.78 → 1.67 (1.75 is not a bucket: 768x448 is over 512²)
    for width, height in ((300, 400), (1920, 1080), (1080, 1920), (5000, 100)):
        chosen = nearest_bucket(width, height, sizes)
        distance = abs(math.log(chosen[0] / chosen[1]) - math.log(width / height))
        assert all(distance <= abs(math.log(w / h) - math.log(width / height)) for w, h in sizes)


def test_images_fill_their_bucket_and_tell_their_original_size_and_crop(tmp_path):
    from sdtune.data import ConceptDataset, load_framed, load_framed_images

    paths = photo_set(tmp_path, counts=(1, 1, 1))
    buckets = bucket_sizes(64)
    framed = load_framed_images(paths, 64, buckets)
    assert [f.image.size for f in framed] == [nearest_bucket(w, h, buckets) for w, h in SHAPES.values()]
    assert [f.original_size for f in framed] == [(h, w) for w, h in SHAPES.values()]
    assert [f.image.size for f in framed] == [(56, 72), (64, 64), (80, 48)]
    wide = framed[2]  # 160x90 covers 80x48 at 0.533: 85x48, cropped 2 px from the left
    assert wide.crop_top_left == (0, 2)
    square = load_framed(paths[2], 64)  # center crop, without buckets: 114x64, 25 px from the left
    assert square.image.size == (64, 64) and square.crop_top_left == (0, 25) and square.original_size == (90, 160)

    dataset = ConceptDataset([square, *framed], "a photo")
    assert isinstance(dataset.pixels, list) and [tuple(p.shape[1:]) for p in dataset.pixels][1] == (72, 56)
    item, mirrored = dataset.example(0, False), dataset.example(0, True)
    assert item["original_size"].tolist() == [90, 160] and item["crop_top_left"].tolist() == [0, 25]
    assert mirrored["crop_top_left"].tolist() == [0, 114 - 25 - 64]  # the crop's left edge in the mirrored image
    batch = torch.utils.data.default_collate([dataset.example(0, False), dataset.example(0, True)])
    assert batch["original_size"].shape == (2, 2) and batch["crop_top_left"].tolist() == [[0, 25], [0, 25]]


def test_labelled_dataset_items_tell_their_original_size_and_crop(tmp_path):
    from sdtune.datasets import ClassImageDataset, read_folder

    photo_set(tmp_path / "photos" / "castle", counts=(1, 0, 1))
    dataset = ClassImageDataset(read_folder(tmp_path / "photos", "a photo of a {class}."), 64)
    items = [dataset[i] for i in range(len(dataset))]
    assert [item["original_size"].tolist() for item in items] == [[128, 96], [90, 160]]  # portrait-0, wide-0
    assert [item["crop_top_left"].tolist() for item in items] == [[10, 0], [0, 25]]


def test_a_phone_photo_is_turned_upright_by_its_exif_orientation(tmp_path):
    from sdtune.data import load_framed

    pixels = np.zeros((90, 160, 3), dtype=np.uint8)  # stored landscape, shown portrait (orientation 6: turned 90°)
    image = Image.fromarray(pixels)
    exif = image.getexif()
    exif[0x0112] = 6
    image.save(tmp_path / "phone.jpg", exif=exif)
    framed = load_framed(tmp_path / "phone.jpg", 64, bucket_sizes(64))
    assert framed.original_size == (160, 90) and framed.image.size[0] < framed.image.size[1]


def png_with_late_exif(path: Path, image, orientation: int) -> None:
    """A PNG whose eXIf chunk follows its pixels, where Android's and exiftool's PNGs have it (PIL writes it before
    them, where PIL reads it as the file opens)."""
    import io
    import struct

    exif = Image.Exif()
    exif[0x0112] = orientation
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", exif=exif)
    data, chunks, position = buffer.getvalue(), [], 8
    while position < len(data):
        (length,) = struct.unpack(">I", data[position : position + 4])
        chunks.append(data[position : position + 12 + length])
        position += 12 + length
    late = [chunk for chunk in chunks if chunk[4:8] == b"eXIf"]
    rest = [chunk for chunk in chunks if chunk[4:8] != b"eXIf"]
    assert len(late) == 1 and rest[-1][4:8] == b"IEND"
    path.write_bytes(data[:8] + b"".join(rest[:-1]) + late[0] + rest[-1])


def test_the_start_reads_each_photo_header_once_and_decodes_no_png(tmp_path, monkeypatch):
    """Before the model loads, a run's checks (readable, buckets, crops, masks, class images) read each image's header
    once (`image_files.image_facts`), and no PNG's pixels: PIL decodes a PNG whole to find an EXIF chunk after them; sdtune
    walks its chunks instead, and turns a photo whose EXIF comes last upright all the same."""
    import collections

    from PIL import PngImagePlugin

    from sdtune.image_files import image_facts
    from sdtune.training import plan_run

    paths = photo_set(tmp_path / "photos", counts=(2, 2, 2))
    png_with_late_exif(tmp_path / "photos" / "turned.png", Image.new("RGB", (160, 90), "red"), 6)  # shown 90x160
    (tmp_path / "photos" / "masks").mkdir()
    for path in [*paths, tmp_path / "photos" / "turned.png"]:
        with Image.open(path) as image:
            Image.new("L", image.size if path.stem != "turned" else (90, 160), 255).save(tmp_path / "photos" / "masks" / path.name)
    classes = photo_set(tmp_path / "classes", counts=(1, 2, 0), seed=1)
    with Image.open(tmp_path / "photos" / "turned.png") as image:  # PIL finds the EXIF only once the pixels are decoded
        assert "exif" not in image.info and image.getexif()[0x0112] == 6
    opened, decoded = collections.Counter(), []
    open_image, load = Image.open, PngImagePlugin.PngImageFile.load

    def counted_open(path, *args, **kwargs):
        opened[Path(path).relative_to(tmp_path).as_posix()] += 1
        return open_image(path, *args, **kwargs)

    def counted_load(image):
        decoded.append(Path(image.filename).relative_to(tmp_path).as_posix())
        return load(image)

    monkeypatch.setattr(Image, "open", counted_open)
    monkeypatch.setattr(PngImagePlugin.PngImageFile, "load", counted_load)
    plan = plan_run(TrainConfig(model="tiny-random", images=str(tmp_path / "photos"), output=str(tmp_path / "run"), buckets=True,
                                masked_loss=True, class_images=str(tmp_path / "classes"), class_prompt="a castle"))
    names = [path.name for path in plan.inputs.image_paths]
    assert sorted(names) == sorted([path.name for path in paths] + ["turned.png"])
    images = {path: count for path, count in opened.items() if not path.startswith("photos/masks/")}
    assert images == {**{f"photos/{name}": 1 for name in names}, **{f"classes/{path.name}": 1 for path in classes}}  # once each
    assert decoded and all(path.startswith("photos/masks/") for path in decoded), decoded  # the masks, for their black check
    assert image_facts(tmp_path / "photos" / "turned.png").size == (90, 160)
    assert plan.buckets[names.index("turned.png")] == nearest_bucket(90, 160, bucket_sizes(64))  # a portrait's
    monkeypatch.undo()
    from sdtune.data import load_framed

    assert load_framed(tmp_path / "photos" / "turned.png", 64, bucket_sizes(64)).original_size == (160, 90)  # as decoded


def test_bucket_batches_come_from_one_bucket_and_repeat_exactly():
    bucket_of = [(48, 80)] * 3 + [(64, 64)] * 4 + [(96, 40)] * 2
    sampler = BucketBatchSampler(bucket_of, batch_size=2)
    assert len(sampler) == 2 + 2 + 1
    sampler.reseed(5)
    first = list(sampler)
    assert len(first) == len(sampler)
    assert sorted(i for batch in first for i in batch) == list(range(9))  # every image once an epoch
    assert all(len({bucket_of[i] for i in batch}) == 1 for batch in first)
    second = list(sampler)
    sampler.reseed(5)
    assert list(sampler) == first and second != first
    repeated = BucketBatchSampler(bucket_of, batch_size=2, repeats=[2] * 3 + [1] * 6)
    assert sorted(i for batch in repeated for i in batch) == sorted([0, 1, 2] * 2 + list(range(3, 9)))


def test_a_bucket_with_fewer_images_than_a_batch_is_refused(tmp_path):
    check_buckets([(64, 64)] * 2 + [(96, 40)], batch_size=1)
    with pytest.raises(SdtuneError, match=r"the 96x40 bucket holds 1 image\(s\) \(wide.png\), fewer than --batch-size 2"):
        check_buckets([(64, 64)] * 2 + [(96, 40)], batch_size=2, names=["a.png", "b.png", "wide.png"])
    from sdtune.training import plan_run

    photo_set(tmp_path / "photos", counts=(2, 2, 1))  # one 16:9 photo: a bucket of its own
    with pytest.raises(SdtuneError, match=r"^buckets=True: the \S+ bucket holds 1 image.* more images of that shape, or set buckets=False$"):
        plan_run(TrainConfig(model="tiny-random", images=str(tmp_path / "photos"), buckets=True, batch_size=2))


def test_the_dry_run_lists_the_buckets_and_their_images(tmp_path):
    from sdtune.training import plan_run

    folder = photo_set(tmp_path / "photos", counts=(1, 2, 3))[0].parent
    phone = Image.Exif()
    phone[0x0112] = 6  # stored 128x96, shown 96x128: counted as shown
    Image.new("RGB", (128, 96)).save(folder / "IMG_0001.jpg", exif=phone)
    for side in (1, 90, 110):  # a pixel, and squares of other sizes: the three commonest named, the rest counted
        Image.new("RGB", (side, side)).save(folder / f"square-{side}px.png")
    config = TrainConfig(model="tiny-random", images=str(folder), buckets=True, output=str(tmp_path / "run"))
    lines = plan_run(config).summary()
    assert lines[2] == ("3 aspect-ratio buckets (width x height): 56x72 (2 images: 96x128 ×2); "
                        "64x64 (5 images: 100x100 ×2, 1x1, 90x90 and 1 other size); 80x48 (3 images: 160x90 ×3)")
    assert not any(line.startswith("prior preservation") for line in lines)
    assert not any("bucket" in line for line in plan_run(TrainConfig(model="tiny-random", output=str(tmp_path / "run"))).summary())


def test_the_dry_run_says_where_the_class_images_come_from_and_which_buckets_draw_on_them(tmp_path):
    import warnings

    from sdtune.training import plan_run

    photo_set(tmp_path / "photos")
    classes = photo_set(tmp_path / "class", counts=(2, 3, 0), seed=2)[0].parent  # no wide one: the wide bucket draws squares
    Image.new("RGB", (640, 64)).save(classes / "panorama.png")  # 10:1, nearer no concept bucket than the others: unused
    (classes / "notes.jpg").write_bytes(b"a text saved as .jpg")
    settings = dict(model="tiny-random", images=str(tmp_path / "photos"), output=str(tmp_path / "run"), class_prompt="photo of a castle.")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        lines = plan_run(TrainConfig(buckets=True, class_images=str(classes), **settings)).summary()
    assert [str(w.message) for w in caught if "notes.jpg" in str(w.message)] == [f"skipping {classes / 'notes.jpg'}: not a readable class image (not an image "
                                                "format PIL reads)"]  # once
    assert lines[3] == (f"prior preservation: 6 class images from {classes}, prompt 'photo of a castle.', loss weight 1; the buckets "
                        "draw on 2 (56x72), 3 (64x64) and 3 (80x48) of them; 1 unused, of a shape no bucket of concept images draws "
                        "on: panorama.png (640x64)")
    with pytest.warns(UserWarning, match="notes.jpg"):
        lines = plan_run(TrainConfig(class_images=str(classes), prior_loss_weight=0.5, **settings)).summary()
    assert lines[2] == f"prior preservation: 6 class images from {classes}, prompt 'photo of a castle.', loss weight 0.5"
    lines = plan_run(TrainConfig(num_class_images=8, buckets=True, **settings)).summary()
    assert lines[3] == (f"prior preservation: 8 class images, drawn by the base model into {tmp_path / 'run' / 'class-images'} where "
                        "not there yet, prompt 'photo of a castle.', loss weight 1; the buckets draw on 8 (56x72), 8 (64x64) and 8 "
                        "(80x48) of them")


def test_files_that_are_no_images_are_left_out_before_the_model_loads(tmp_path):
    from sdtune.training import plan_run

    photo_set(tmp_path / "photos", counts=(1, 2, 1))
    (tmp_path / "photos" / "zero.png").write_bytes(b"")
    (tmp_path / "photos" / "notes.jpg").write_bytes(b"a text saved as .jpg")
    (tmp_path / "photos" / "._square-0.png").write_bytes(b"\x00\x05\x16\x07 AppleDouble")  # hidden: not even named
    config = TrainConfig(model="tiny-random", images=str(tmp_path / "photos"), buckets=True, output=str(tmp_path / "run"))
    with pytest.warns(UserWarning, match=r"skipping 2 files that are not readable images: .*notes.jpg .*zero.png") as caught:
        lines = plan_run(config).summary()
    assert not any("._square-0" in str(w.message) for w in caught)
    assert lines[1].startswith("4 training images of castle")
    assert lines[2] == "3 aspect-ratio buckets (width x height): 56x72 (1 image: 96x128); 64x64 (2 images: 100x100 ×2); 80x48 (1 image: 160x90)"
    for path in (tmp_path / "photos").glob("*-*.png"):
        path.unlink()
    with pytest.raises(SdtuneError, match=r"no readable images in .*photos \(2 file\(s\) could not be read\)"), pytest.warns(UserWarning):
        plan_run(config)


def test_jpegs_cut_short_are_left_out_before_the_model_loads_and_motion_photos_kept(tmp_path):
    """An interrupted copy leaves a JPEG without its end marker, a PNG without its last chunks; found from their bytes,
    without decoding, and named with the files that are no images. A phone's motion photo (its video after the JPEG's
    end) and a JPEG whose EXIF thumbnail has an end marker of its own are told apart."""
    from sdtune.data import readable_images
    from sdtune.image_files import cut_short
    from sdtune.training import plan_run

    folder = photo_set(tmp_path / "photos", counts=(1, 1, 1))[0].parent
    noise = Image.fromarray(np.random.default_rng(3).integers(0, 255, (80, 80, 3), dtype=np.uint8))
    thumbnail = b"\xff\xd8" + bytes(50) + b"\xff\xd9"  # an EXIF block holding a JPEG's end marker
    noise.save(tmp_path / "whole.jpg", quality=95, exif=b"Exif\x00\x00" + thumbnail)
    noise.save(tmp_path / "whole.png")
    jpeg, png = (tmp_path / "whole.jpg").read_bytes(), (tmp_path / "whole.png").read_bytes()
    (folder / "IMG_0001.jpg").write_bytes(jpeg[: len(jpeg) // 2])
    (folder / "IMG_0002.jpg").write_bytes(jpeg[:-2])  # only the end marker lost: PIL cannot decode it either
    (folder / "IMG_0003.png").write_bytes(png[: len(png) // 2])
    (folder / "PXL_0004.MP.jpg").write_bytes(jpeg + b"\x00\x00\x00\x18ftypmp42" + bytes(range(256)) * 40)  # motion photo
    (folder / "IMG_0005.jpg").write_bytes(jpeg + bytes(5000))  # zeros after the end, as some cameras pad
    cut_bmp(folder / "IMG_0006.bmp")  # other formats: found as they are decoded
    assert cut_short(folder / "IMG_0001.jpg", "JPEG") and cut_short(folder / "IMG_0003.png", "PNG")
    assert cut_short(tmp_path / "whole.png", "PNG") is None
    with pytest.warns(UserWarning, match=r"skipping 3 files that are not readable images: .*IMG_0001.jpg \(cut short: no "
                                         r"end-of-image marker \(FF D9\) after its data, as a copy or download that stopped "
                                         r"leaves it\); .*IMG_0002.jpg \(cut short: .*\); .*IMG_0003.png \(cut short: it ends "
                                         r"inside a chunk, as a copy or download that stopped leaves it\)$"):
        lines = plan_run(TrainConfig(model="tiny-random", images=str(folder), output=str(tmp_path / "run"))).summary()
    assert lines[1].startswith("6 training images of castle")
    kept = [path.name for path in readable_images([folder / "PXL_0004.MP.jpg", folder / "IMG_0005.jpg"])]
    assert kept == ["PXL_0004.MP.jpg", "IMG_0005.jpg"]
    for name in kept:  # and both decode
        with Image.open(folder / name) as image:
            image.load()


def test_a_panorama_that_its_frame_cuts_mostly_away_is_named_before_the_model_loads(tmp_path):
    import warnings

    from sdtune.training import plan_run

    folder = photo_set(tmp_path / "photos", counts=(1, 1, 1))[0].parent  # up to 16:9: kept
    Image.new("RGB", (640, 64)).save(folder / "panorama.png")  # 10:1
    said = {}
    for buckets in (True, False):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            plan_run(TrainConfig(model="tiny-random", images=str(folder), buckets=buckets, output=str(tmp_path / "run")))
        said[buckets] = [str(w.message) for w in caught if "center-cropping" in str(w.message)]
    assert said[True] == ["center-cropping cuts away more than half of panorama.png (640x64: 60% cut away); "
                          "crop such photos yourself to keep the part that matters"]  # into the 128x32 bucket, 4:1
    assert len(said[False]) == 1 and "panorama.png (640x64: 90% cut away)" in said[False][0]
    assert said[False][0].endswith(", or add buckets=True")  # said to Python: the setting, as Python spells it
    Image.new("RGB", (20000, 100)).save(folder / "panorama.png")  # 200:1: a square keeps 0.5% of it, not nothing
    with pytest.warns(UserWarning, match=r"panorama.png \(20000x100: 99.5% cut away\)"):
        plan_run(TrainConfig(model="tiny-random", images=str(folder), output=str(tmp_path / "run")))


def test_heic_photos_are_read_upright_like_jpegs_where_pillow_heif_is_installed(tmp_path, tiny_path):
    """An iPhone's HEIC, written by pillow-heif's own encoder (x265), stored turned as a phone held upright stores it."""
    pillow_heif = pytest.importorskip("pillow_heif")
    from sdtune.data import list_images, load_framed_images
    from sdtune.training import plan_run

    folder = photo_set(tmp_path / "photos", counts=(1, 1, 1))[0].parent
    stored = Image.new("RGB", (80, 60), "red")
    stored.paste((0, 0, 255), (40, 0, 80, 60))  # left red, right blue as stored
    turned = Image.Exif()
    turned[0x0112] = 6  # shown turned a quarter clockwise: 60x80, red on top
    pillow_heif.from_pillow(stored).save(folder / "IMG_0001.HEIC", quality=95, exif=turned.tobytes())
    pillow_heif.from_pillow(stored).save(folder / "IMG_0002.HIF", quality=95)  # as Sony, Canon and Fujifilm cameras name it
    stored.save(folder / "IMG_0003.jpg", quality=95, exif=turned.tobytes())  # the same photo as a JPEG
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # named as unread nowhere
        assert [p.name for p in list_images(folder)][:3] == ["IMG_0001.HEIC", "IMG_0002.HIF", "IMG_0003.jpg"]
        heic, heif, jpeg = load_framed_images([folder / "IMG_0001.HEIC", folder / "IMG_0002.HIF", folder / "IMG_0003.jpg"], 64,
                                              bucket_sizes(64))
    assert heic.original_size == jpeg.original_size == (80, 60) and heif.original_size == (60, 80)
    assert heic.image.mode == "RGB" and heic.image.size == jpeg.image.size == (56, 72)
    for framed in (heic, jpeg):  # upright as the JPEG's EXIF orientation turns it, not turned twice
        assert framed.image.getpixel((28, 4))[0] > 200 and framed.image.getpixel((28, 68))[2] > 200
    config = TrainConfig(model="tiny-random", images=str(folder), buckets=True, output=str(tmp_path / "run"))
    lines = plan_run(config).summary()
    assert lines[1].startswith("6 training images of castle")
    assert lines[2] == ("4 aspect-ratio buckets (width x height): 56x72 (3 images: 60x80 ×2, 96x128); 64x64 (1 image: 100x100); "
                        "72x56 (1 image: 80x60); 80x48 (1 image: 160x90)")
    run = run_training(tmp_path, "heic", images=str(folder), buckets=True)
    assert run.adapter.is_file() and len(run.losses) == 2


def cut_bmp(path: Path) -> Path:
    """A BMP cut in half: its header reads, its pixels do not (found only as it is decoded)."""
    Image.fromarray(np.random.default_rng(3).integers(0, 255, (80, 80, 3), dtype=np.uint8)).save(path, format="BMP")
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    return path


def test_an_undecodable_held_out_image_is_skipped_and_warnings_are_given_once(tmp_path, tiny_path):
    """A file whose header reads but whose pixels do not (a BMP cut short) is found only as it is decoded."""
    import warnings

    folder = photo_set(tmp_path / "photos", counts=(2, 2, 2))[0].parent
    Image.new("RGB", (20, 20), "red").save(folder / "small.png")
    for name in ("z-cut-0.jpg", "z-cut-1.jpg"):
        cut_bmp(folder / name)  # a BMP named .jpg is read as what it is
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        # seed 0 holds out wide-1.png and z-cut-1.jpg
        run_training(tmp_path, "held", images=str(folder), validate_every=2, validation_images=2, steps=2)
        run_training(tmp_path, "buckets", images=str(folder), validate_every=2, buckets=True, steps=2)
    said = [str(w.message) for w in caught]
    assert sum("small.png is 20x20" in m for m in said) == 2, said  # once a run: not again for the validation loss
    assert sum("skipping " in m and "z-cut-0.jpg" in m for m in said) == 2, said
    assert sum("skipping " in m and "z-cut-1.jpg" in m for m in said) == 2, said


def test_held_out_photos_that_fit_their_bucket_are_not_called_upscaled(tmp_path, tiny_path):
    """With buckets, a wide photo's bucket needs no upscaling; held out for the validation loss it is framed square
    (the loss's one batch), where its short side is upscaled: that is no size it is trained at, and said nowhere."""
    import warnings

    folder = tmp_path / "wide"
    folder.mkdir()
    for index in range(4):
        Image.fromarray(np.random.default_rng(index).integers(0, 255, (60, 120, 3), dtype=np.uint8)).save(folder / f"w{index}.png")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run = run_training(tmp_path, "held", images=str(folder), buckets=True, validate_every=2, validation_images=1)
    assert run.validation_losses and not [str(w.message) for w in caught if "upscaled" in str(w.message)]


@pytest.mark.filterwarnings("ignore:resuming with other settings")  # steps: the cut run stopped early
def test_buckets_train_cached_as_uncached_and_resume_exactly(tmp_path, tiny_path):
    """Three shapes in batches of 2 (3 batches an epoch): the cached run equals the uncached one bit for
    bit, and a run cut at step 4 and resumed (in its second epoch) ends with the uninterrupted adapter."""
    images = photo_set(tmp_path / "photos")[0].parent
    shapes: list = []
    import sdtune.training

    original_step = sdtune.training.Trainer.loss

    def recording_loss(self, latents, batch):
        shapes.append(tuple(latents.shape))
        return original_step(self, latents, batch)

    settings = dict(images=str(images), buckets=True, batch_size=2, seed=3, steps=6, random_flip=True)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(sdtune.training.Trainer, "loss", recording_loss)
        whole = run_training(tmp_path, "whole", **settings)
    assert {shape[2:] for shape in shapes} == {(9, 7), (8, 8), (6, 10)}  # latents of the three buckets (÷8)
    assert all(shape[0] == 2 for shape in shapes)
    uncached = run_training(tmp_path, "uncached", cache_latents=False, **settings)
    assert uncached.losses == whole.losses
    run_training(tmp_path, "cut", **{**settings, "steps": 4, "checkpoint_every": 2})
    resumed = run_training(tmp_path, "cut", **{**settings, "checkpoint_every": 2, "resume": "latest"})
    assert resumed.losses == whole.losses[4:]
    for run in (uncached, resumed):
        assert (run.output / "adapter.safetensors").read_bytes() == (whole.output / "adapter.safetensors").read_bytes()
    assert "buckets = true" in (whole.output / "config.toml").read_text()


@pytest.mark.filterwarnings("ignore:resuming with other settings")  # steps: the cut run stopped early
def test_photos_decoded_on_one_thread_or_several_train_the_same_adapter(tmp_path, monkeypatch):
    """The start decodes its photos on threads (`image_files.decode_threads`): the cached latents, the losses and the
    adapter are those of one thread's, bit for bit, and a run resumed on another count of threads ends as they do."""
    import sdtune.data

    images = photo_set(tmp_path / "photos")[0].parent
    png_with_late_exif(images / "turned.png", Image.fromarray(np.random.default_rng(5).integers(0, 255, (90, 160, 3), dtype=np.uint8)), 6)
    settings = dict(images=str(images), buckets=True, batch_size=1, seed=3, steps=4, random_flip=True, checkpoint_every=2)
    runs = {}
    for threads in (1, 4):
        monkeypatch.setattr(sdtune.data, "decode_threads", lambda threads=threads: threads)
        runs[threads] = run_training(tmp_path, f"threads-{threads}", **settings)
    assert runs[4].losses == runs[1].losses
    assert (runs[4].output / "adapter.safetensors").read_bytes() == (runs[1].output / "adapter.safetensors").read_bytes()
    run_training(tmp_path, "cut", **{**settings, "steps": 2})
    monkeypatch.setattr(sdtune.data, "decode_threads", lambda: 1)
    resumed = run_training(tmp_path, "cut", **{**settings, "resume": "latest"})
    assert resumed.losses == runs[4].losses[2:]
    assert (resumed.output / "adapter.safetensors").read_bytes() == (runs[1].output / "adapter.safetensors").read_bytes()


def test_bucketed_class_images_decoded_on_one_thread_or_several_train_the_same_adapter(tmp_path, monkeypatch):
    """Prior preservation's class images, framed into the buckets, decode on the start's threads too: the warnings,
    the losses and the adapter are those of one thread's, bit for bit."""
    import threading
    import time
    import warnings

    import sdtune.data

    images = photo_set(tmp_path / "photos")[0].parent
    class_images = photo_set(tmp_path / "class", counts=(2, 3, 0), seed=2)[0].parent  # the wide bucket draws squares
    png_with_late_exif(class_images / "turned.png", Image.fromarray(np.random.default_rng(5).integers(0, 255, (90, 160, 3), dtype=np.uint8)), 6)
    Image.new("RGB", (30, 40), "green").save(class_images / "small.png")  # upscaled: named
    frame_sizes, class_threads = sdtune.data.load_framed_sizes, set()

    def spying(path, *args, **kwargs):
        if path.parent == class_images:
            class_threads.add(threading.current_thread().name)
            time.sleep(0.01)  # each thread takes more than one image
        return frame_sizes(path, *args, **kwargs)

    monkeypatch.setattr(sdtune.data, "load_framed_sizes", spying)
    settings = dict(images=str(images), class_images=str(class_images), class_prompt="photo of a castle.", buckets=True,
                    batch_size=2, seed=3, steps=2, random_flip=True)
    runs, said = {}, {}
    for threads in (1, 4):
        class_threads.clear()
        monkeypatch.setattr(sdtune.data, "decode_threads", lambda threads=threads: threads)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            runs[threads] = run_training(tmp_path, f"threads-{threads}", **settings)
        said[threads] = [str(w.message).replace(f"threads-{threads}", "OUTPUT") for w in caught if issubclass(w.category, UserWarning)]
        main = threading.current_thread().name
        assert class_threads == {main} if threads == 1 else len(class_threads) > 1 and main not in class_threads
    assert "class image small.png is 30x40, smaller than its 56x72 bucket: upscaled" in said[1]
    assert said[4] == said[1]
    assert runs[4].losses == runs[1].losses
    assert (runs[4].output / "adapter.safetensors").read_bytes() == (runs[1].output / "adapter.safetensors").read_bytes()


def test_each_bucket_draws_class_images_of_its_own_shape_or_the_nearest():
    portrait, square, wide, tall = (56, 72), (64, 64), (80, 48), (40, 104)
    class_buckets = [square, portrait, square, None, square, wide]  # None: an unreadable class image
    pools = class_pools([portrait, square, wide, tall, portrait], class_buckets, batch_size=2)
    assert pools[square] == [0, 2, 4]  # its own bucket holds a batch
    assert pools[portrait] == [0, 1, 2, 4]  # one of its own: the nearest bucket's (square) join
    assert pools[wide] == [0, 2, 4, 5]
    assert pools[tall] == [0, 1, 2, 4]  # square and portrait: the nearest until they hold a batch
    assert class_pools([wide], [portrait, (72, 56)], batch_size=3) == {wide: [0, 1]}  # fewer than a batch: all
    assert class_pools([square], [portrait, wide, (72, 56)], batch_size=1)[square] == [0, 2]  # 7:9 and 9:7, equally near, together


def test_bucket_batches_pair_each_image_with_a_class_example_of_its_bucket():
    bucket_of = [(48, 80)] * 3 + [(64, 64)] * 4
    pools = {(48, 80): [10, 11], (64, 64): [20, 21, 22]}
    plain, paired = BucketBatchSampler(bucket_of, 2, seed=4), BucketBatchSampler(bucket_of, 2, seed=4, class_pools=pools)
    batches = list(paired)
    assert [[image for image, _ in batch] for batch in batches] == list(plain)  # the concept images' order is kept
    for batch in batches:
        assert all(example in pools[bucket_of[image]] for image, example in batch)
    for size, pool in pools.items():  # each pool in a shuffled order, reshuffled when it runs out
        drawn = [example for batch in batches for image, example in batch if bucket_of[image] == size]
        assert sorted(drawn[: len(pool)]) == pool and len(drawn) == bucket_of.count(size)
    paired.reseed(4)
    assert list(paired) == batches
    with pytest.raises(ValueError, match="every bucket needs class examples"):
        BucketBatchSampler(bucket_of, 2, class_pools={(64, 64): [0]})


def test_bucketed_class_images_are_framed_into_each_bucket_that_draws_them(tmp_path):
    from sdtune.prior import bucketed_class_images

    paths = photo_set(tmp_path, counts=(1, 2, 1))  # portrait-0, square-0, square-1, wide-0
    (tmp_path / "broken.png").write_bytes(b"not an image")
    square, wide = (64, 64), (80, 48)
    with pytest.warns(UserWarning) as caught:
        framed, pools = bucketed_class_images([*paths, tmp_path / "broken.png"], 64, [square, wide, square], 2)
    messages = [str(w.message) for w in caught]
    assert any("portrait-0.png" in m and "unused" in m for m in messages)  # no concept image is a portrait
    assert any(m.startswith(f"skipping class image {tmp_path / 'broken.png'}: not a readable image") for m in messages)
    assert sorted(pools) == [square, wide]
    assert [framed[i].image.size for i in pools[square]] == [square, square]
    assert {framed[i].original_size for i in pools[square]} == {(100, 100)}
    # the wide bucket holds one wide image: the squares (nearer than the portrait) join it, framed 80x48
    assert [(framed[i].image.size, framed[i].original_size) for i in pools[wide]] == [(wide, (100, 100))] * 2 + [(wide, (90, 160))]
    assert framed[pools[wide][0]].crop_top_left == (16, 0)  # 100x100 covers 80x48 at 0.8: 80x80, 16 px from the top
    with pytest.raises(SdtuneError, match="no readable class images in .* for the 80x48 bucket"), pytest.warns(UserWarning, match="skipping"):
        bucketed_class_images([tmp_path / "broken.png"], 64, [wide], 2)


def test_class_images_that_are_no_images_are_not_counted(tmp_path):
    from sdtune.prior import class_image_paths

    photo_set(tmp_path / "class", counts=(1, 1, 1))
    for name in ("a-empty.png", "b-text.jpg"):
        (tmp_path / "class" / name).write_bytes(b"" if "empty" in name else b"not an image")
    from sdtune.prior import class_image_count

    config = TrainConfig(class_images=str(tmp_path / "class"), class_prompt="a castle", num_class_images=3)
    # named as the run is planned, before the model loads, and left out of what the memory check counts
    with pytest.warns(UserWarning, match=r"skipping 2 files that are not readable class images: .*a-empty.png \(an empty file\)"):
        assert class_image_count(dataclasses.replace(config, num_class_images=0)) == 3
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # not named a second time once the model has loaded
        paths = class_image_paths(config, None, tmp_path / "run", 64, None)
    assert [p.name for p in paths] == ["portrait-0.png", "square-0.png", "wide-0.png"]  # three, as asked


@pytest.mark.filterwarnings("ignore:resuming with other settings")  # steps: the cut run stopped early
def test_buckets_with_prior_preservation_train_and_resume_exactly(tmp_path, tiny_path):
    """Concept photos of three shapes, class photos of two (no wide one): every step stacks the concept
    examples and as many class examples of the same size (the wide bucket's from the square class images);
    cached equals uncached, and a run cut at step 4 and resumed ends with the uninterrupted adapter."""
    images = photo_set(tmp_path / "photos")[0].parent
    class_images = photo_set(tmp_path / "class", counts=(2, 3, 0), seed=2)[0].parent
    batches: list = []
    import sdtune.training

    original_loss = sdtune.training.Trainer.loss

    def recording_loss(self, latents, batch):
        batches.append((tuple(latents.shape), batch["is_prior"].tolist(), batch["original_size"].tolist(), list(batch["prompt"])))
        return original_loss(self, latents, batch)

    settings = dict(images=str(images), class_images=str(class_images), class_prompt="photo of a castle.", buckets=True,
                    batch_size=2, seed=3, steps=6, random_flip=True, checkpoint_every=2)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(sdtune.training.Trainer, "loss", recording_loss)
        whole = run_training(tmp_path, "whole", **settings)
    assert {shape[2:] for shape, *_ in batches} == {(9, 7), (8, 8), (6, 10)}  # the three buckets, class examples too
    originals = {(h, w): name for name, (w, h) in SHAPES.items()}
    for shape, is_prior, original_sizes, prompts in batches:
        assert shape[0] == 4 and is_prior == [False, False, True, True]
        assert prompts[2:] == ["photo of a castle."] * 2 and "photo of a castle." not in prompts[:2]
        concept, classes = {originals[tuple(s)] for s in original_sizes[:2]}, {originals[tuple(s)] for s in original_sizes[2:]}
        assert len(concept) == 1 and classes == ({"square"} if concept == {"wide"} else concept)
    assert all(math.isfinite(loss) for loss in whole.losses) and len(whole.losses) == 6
    metrics = [json.loads(line) for line in (whole.output / "metrics.jsonl").read_text().splitlines()]
    assert all(math.isfinite(row["prior_loss"]) and math.isfinite(row["instance_loss"]) for row in metrics)
    uncached = run_training(tmp_path, "uncached", cache_latents=False, **settings)
    assert uncached.losses == whole.losses
    run_training(tmp_path, "cut", **{**settings, "steps": 4})
    resumed = run_training(tmp_path, "cut", **{**settings, "resume": "latest"})
    assert resumed.losses == whole.losses[4:]
    for run in (uncached, resumed):
        assert (run.output / "adapter.safetensors").read_bytes() == (whole.output / "adapter.safetensors").read_bytes()
    TrainConfig(buckets=True, class_prompt="a castle").validate()  # combined since class images are bucketed too


# ---------------------------------------------------------------------------------------------
# Captions


def test_captions_beside_images_and_in_metadata_replace_the_template(tmp_path):
    from sdtune.training import concept_inputs

    paths = photo_set(tmp_path / "photos", counts=(2, 1, 1))
    (tmp_path / "photos" / "portrait-0.txt").write_text("a <castle>  at dusk,  fog\n")
    rows = [{"file_name": "square-0.png", "text": "the <castle> from above"}, {"file_name": "wide-0.png"}]
    (tmp_path / "photos" / "metadata.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    assert read_captions(paths) == ["a <castle> at dusk, fog", None, "the <castle> from above", None]
    config = TrainConfig(images=str(tmp_path / "photos"), token="zwx castle")
    assert [prompt for _, prompt, _ in concept_inputs(config)] == [
        "a zwx castle at dusk, fog", "photo of a zwx castle.", "the zwx castle from above", "photo of a zwx castle.",
    ]
    from sdtune.training import plan_run

    summary = plan_run(TrainConfig(model="tiny-random", images=str(tmp_path / "photos"), output=str(tmp_path / "run"))).summary()
    assert summary[1] == "4 training images of castle (2 with a caption of their own); prompts like 'a sks castle at dusk, fog'"


@pytest.mark.parametrize("content, message", [
    (b"caf\xe9 caption", r"portrait-0.txt: not UTF-8 text \(byte 3 is 0xE9, after 'caf': 'é' in Windows-1252\); save it as UTF-8"),  # Latin-1
    (b"\x81", r"portrait-0.txt: not UTF-8 text \(byte 0 is 0x81\); save it as UTF-8"),  # no character in Windows-1252
    (b"\xff\xfea", r"portrait-0.txt: not UTF-16 text, though it starts with UTF-16's byte-order mark \(byte 2\)"),
    ("a caption".encode("utf-16-le"), r"portrait-0.txt: not UTF-8 text \(a NUL character at byte 1: UTF-16 without its byte-order mark\?\)"),
    (b"  \n ", r"portrait-0.txt is blank; write the image's caption in it"),
    (b"", r"portrait-0.txt is empty; write the image's caption in it"),
    (b"\xef\xbb\xbf\r\n", r"portrait-0.txt is blank"),  # a byte-order mark and a Windows line end
])
def test_a_bad_caption_file_is_refused(tmp_path, content, message):
    paths = photo_set(tmp_path, counts=(1, 1, 0))
    (tmp_path / "portrait-0.txt").write_bytes(content)
    with pytest.raises(SdtuneError, match=message):
        read_captions(paths)


def test_a_caption_file_of_several_lines_holds_caption_variants(tmp_path):
    """Each non-blank line is a caption of its own (OneTrainer's, SimpleTuner's reading), not a part of one; a list of
    texts in metadata.jsonl is so too (diffusers' text-to-image examples read a caption column of lists). One line, or
    lines all the same, are one caption, as before."""
    from sdtune.training import concept_inputs, plan_run

    paths = photo_set(tmp_path / "photos", counts=(2, 2, 2))
    folder = tmp_path / "photos"
    (folder / "portrait-0.txt").write_text("a <castle> at dusk\n\n   \n  a <castle>,  in fog \r\nthe <castle> from above\n")
    (folder / "portrait-1.txt").write_text("\n  a <castle> alone  \n\n")  # one line among blank ones
    (folder / "square-0.txt").write_text("the same <castle>\nthe  same <castle>\n")  # nothing to draw between
    rows = [{"file_name": "square-1.png", "text": ["a <castle>, tag", "  another <castle>  "]},
            {"file_name": "wide-0.png", "text": ["one <castle> in a list"]}]
    (folder / "metadata.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    assert read_captions(paths) == [
        ("a <castle> at dusk", "a <castle>, in fog", "the <castle> from above"), "a <castle> alone", "the same <castle>",
        ("a <castle>, tag", "another <castle>"), "one <castle> in a list", None,
    ]
    config = TrainConfig(model="tiny-random", images=str(folder), token="zwx castle", output=str(tmp_path / "run"))
    prompts = [prompt for _, prompt, _ in concept_inputs(config)]
    assert prompts[0] == ("a zwx castle at dusk", "a zwx castle, in fog", "the zwx castle from above")
    assert prompts[3] == ("a zwx castle, tag", "another zwx castle") and prompts[5] == "photo of a zwx castle."
    assert plan_run(config).summary()[1] == ("6 training images of castle (5 with a caption of their own; 2 with several lines, "
                                             "one drawn each time); prompts like 'a zwx castle at dusk'")


@pytest.mark.parametrize("text, message", [
    ([], r"line 1: \"text\" must be a caption \(non-empty text\) or a list of them, got \[\]"),
    (["a castle", "  "], r"line 1: \"text\" must be a caption \(non-empty text\) or a list of them, got \['a castle', '  '\]"),
    (["a castle", 3], r"line 1: \"text\" must be a caption .* got \['a castle', 3\]"),
    ("\n \n", r"line 1: \"text\" must be a caption \(non-empty text\) or a list of them"),
])
def test_a_metadata_text_that_is_no_caption_nor_a_list_of_them_is_refused(tmp_path, text, message):
    paths = photo_set(tmp_path, counts=(1, 0, 0))
    (tmp_path / "metadata.jsonl").write_text(json.dumps({"file_name": "portrait-0.png", "text": text}) + "\n")
    with pytest.raises(SdtuneError, match=message):
        read_captions(paths)


def test_a_dataset_metadata_text_list_is_refused_in_one_line(tmp_path):
    """A --dataset image's caption is its class's (evaluation groups images by it): one text, never a list."""
    from sdtune.datasets import read_folder

    photo_set(tmp_path, counts=(1, 0, 0))
    (tmp_path / "metadata.jsonl").write_text(json.dumps({"file_name": "portrait-0.png", "text": ["a", "b"]}) + "\n")
    with pytest.raises(SdtuneError, match=r"metadata.jsonl line 1: \"text\" is a list of captions, which concept images "
                                          r"\(--images\) draw from; a --dataset image takes one caption$"):
        read_folder(tmp_path, "a photo")


def test_keep_tokens_is_checked_against_every_line_of_a_caption(tmp_path):
    from sdtune.training import plan_run

    photo_set(tmp_path / "photos", counts=(1, 1, 1))
    (tmp_path / "photos" / "square-0.txt").write_text("<castle>, tower, snow\n<castle>\n")
    config = TrainConfig(model="tiny-random", images=str(tmp_path / "photos"), shuffle_caption=True, keep_tokens=2,
                         output=str(tmp_path / "run"))
    with pytest.raises(SdtuneError, match=r"keep_tokens=2 is more than the 1 comma-separated tag\(s\) of a line of "
                                          r"square-0.png's caption \('<castle>'\)"):
        plan_run(config)


def test_one_line_of_a_caption_is_drawn_each_time_from_the_seeded_stream():
    """Every line comes up, about equally often, each draw decided by torch's generator (the loop seeds it per epoch
    and process); a shuffle applies to the line drawn; a caption of one line draws nothing."""
    lines = ("sks castle, tower, snow", "sks castle, dusk", "a sks castle from above")
    items = [{"prompt": lines}, {"prompt": "sks castle, alone"}] * 300
    augmented = AugmentedCaptions(items)
    torch.manual_seed(0)
    drawn = [augmented[i]["prompt"] for i in range(0, len(items), 2)]
    torch.manual_seed(0)
    assert [augmented[i]["prompt"] for i in range(0, len(items), 2)] == drawn
    assert set(drawn) == set(lines) and all(80 < drawn.count(line) < 120 for line in lines)
    torch.manual_seed(0)
    shuffled = [AugmentedCaptions(items, shuffle=True, keep_tokens=1)[i]["prompt"] for i in range(0, 200, 2)]
    assert {", ".join(sorted(p.split(", "))) for p in shuffled} == {", ".join(sorted(line.split(", "))) for line in lines}
    assert "sks castle, snow, tower" in shuffled  # the first line, shuffled after its kept tag
    torch.manual_seed(3)
    assert augmented[1]["prompt"] == "sks castle, alone"
    after_one_line = torch.rand(())
    torch.manual_seed(3)
    assert torch.rand(()) == after_one_line  # a caption of one line drew nothing: such runs draw as before


def test_the_training_images_record_counts_a_tag_of_any_line_once_an_image():
    from sdtune.captions import training_images_record

    images = [Path("photos/a.png"), Path("photos/b.png")]
    record = training_images_record(images, [("sks castle, snow", "sks castle, dusk, snow"), "sks castle, dusk"])
    assert record["tag_frequency"] == json.dumps({"photos": {"sks castle": 2, "snow": 1, "dusk": 2}})
    assert record["num_train_images"] == "2"


def record_prompts(monkeypatch) -> tuple[list[str], list[str]]:
    """Lists that the runs after this call fill: the prompts each step trained on, in order, and those the text
    encoder encoded."""
    import sdtune.training
    from sdtune.conditioning import PromptConditioning

    trained: list[str] = []
    encoded: list[str] = []
    original_loss, original_encode = sdtune.training.Trainer.loss, PromptConditioning.encode_prompts
    monkeypatch.setattr(sdtune.training.Trainer, "loss",
                        lambda self, latents, batch: trained.extend(batch["prompt"]) or original_loss(self, latents, batch))
    monkeypatch.setattr(PromptConditioning, "encode_prompts",
                        lambda self, prompts: encoded.extend(sorted(prompts)) or original_encode(self, prompts))
    return trained, encoded


def several_lines_run(tmp_path, recorded, name: str, **settings):
    """A short run on photos whose captions have several lines (one of one line, one without a caption); what
    `recorded` (record_prompts' lists) recorded of it, alone."""
    folder = tmp_path / "photos"
    if not folder.is_dir():
        photo_set(folder, counts=(2, 1, 1))
        (folder / "portrait-0.txt").write_text("a <castle> at dusk\na <castle> in fog\n\nthe <castle> from above\n")
        (folder / "portrait-1.txt").write_text("a <castle> alone\n")
        (folder / "metadata.jsonl").write_text(json.dumps({"file_name": "square-0.png", "text": ["x <castle>", "y <castle>"]}) + "\n")
    for kept in recorded:
        kept.clear()
    run = run_training(tmp_path, name, images=str(folder), batch_size=2, **settings)
    return run, *(list(kept) for kept in recorded)


LINES = {"a sks castle at dusk", "a sks castle in fog", "the sks castle from above", "x sks castle", "y sks castle"}


@pytest.mark.parametrize("cache_latents", [True, False])
def test_each_line_is_trained_and_encoded_once(tmp_path, tiny_path, monkeypatch, cache_latents):
    run, trained, encoded = several_lines_run(tmp_path, record_prompts(monkeypatch), "run", steps=12, cache_latents=cache_latents)
    assert len(trained) == 24 and LINES <= set(trained)
    assert set(trained) == LINES | {"a sks castle alone", "photo of a sks castle."}
    assert sorted(encoded) == sorted(set(encoded)) and set(trained) <= set(encoded)  # each encoded once, and kept
    if cache_latents:  # every line before the loop: a finite set
        assert set(encoded) == set(trained)


def test_the_validation_loss_measures_an_image_of_several_lines_with_its_first(tmp_path, tiny_path, monkeypatch):
    """Fixed prompts keep the validation loss comparable from check to check."""
    import sdtune.training
    from sdtune import validation

    monkeypatch.setattr(validation, "SAMPLE_STEPS", 2)
    measured: list[list[str]] = []
    original = sdtune.training.Trainer.validation_embeddings
    monkeypatch.setattr(sdtune.training.Trainer, "validation_embeddings",
                        lambda self: measured.append(list(self.validation_prompts)) or original(self))
    run, _, _ = several_lines_run(tmp_path, record_prompts(monkeypatch), "run", steps=2, validate_every=1)
    assert set(run.validation_losses) == {1, 2}
    assert measured == [["a sks castle at dusk", "a sks castle alone", "x sks castle", "photo of a sks castle."]]  # encoded once


@pytest.mark.filterwarnings("ignore:resuming with other settings")  # steps: the cut run stopped early
def test_caption_lines_train_cached_as_uncached_and_resume_exactly(tmp_path, tiny_path, monkeypatch):
    settings = dict(steps=6, shuffle_caption=True, caption_dropout=0.2)
    recorded = record_prompts(monkeypatch)
    whole, drawn, _ = several_lines_run(tmp_path, recorded, "whole", **settings)
    assert len(LINES & set(drawn)) >= 2  # lines drawn (each of one tag: its own shuffle); every one: the test above
    uncached, drawn_uncached, _ = several_lines_run(tmp_path, recorded, "uncached", **settings, cache_latents=False)
    several_lines_run(tmp_path, recorded, "cut", **{**settings, "steps": 3, "checkpoint_every": 3})
    resumed, drawn_resumed, _ = several_lines_run(tmp_path, recorded, "cut", **settings, checkpoint_every=3, resume="latest")
    assert drawn_uncached == drawn and drawn_resumed == drawn[6:]
    assert resumed.losses == whole.losses[3:]
    for run in (uncached, resumed):
        assert (run.output / "adapter.safetensors").read_bytes() == (whole.output / "adapter.safetensors").read_bytes()


def test_one_line_caption_files_train_as_before(tmp_path, tiny_path):
    """A caption file of one line trains, bit for bit, what it trained before captions had several lines: among blank
    lines and Windows line ends, twice over, or as a metadata list of one; the run draws nothing for it (the seeded
    stream after the flips is as it was, so the adapter's bytes are too)."""
    adapters = []
    for index, (caption, text) in enumerate([("a <castle>, tower\n", "x <castle>"), ("\r\n a <castle>,  tower \r\n\n", ["x <castle>"]),
                                             ("a <castle>, tower\na <castle>, tower", ["x <castle>", "x  <castle>"])]):
        folder = tmp_path / f"set-{index}" / "photos"  # one folder name: the adapter records it
        photo_set(folder, counts=(1, 1, 1))
        (folder / "portrait-0.txt").write_text(caption)
        (folder / "metadata.jsonl").write_text(json.dumps({"file_name": "square-0.png", "text": text}) + "\n")
        run = run_training(tmp_path, f"run-{index}", images=str(folder), random_flip=True, steps=3)
        adapters.append((run.output / "adapter.safetensors").read_bytes())
    assert adapters[1] == adapters[0] and adapters[2] == adapters[0]


def test_caption_files_of_no_image_are_named_before_the_model_loads(tmp_path):
    """A caption named for its image's whole name (`IMG_1.jpg.txt`, as some captioning tools write it), or left behind
    by a photo removed, captions nothing: named, not silently left out."""
    import warnings

    from sdtune.training import plan_run

    folder = photo_set(tmp_path / "photos", counts=(1, 1, 1))[0].parent
    (folder / "square-0.txt").write_text("a <castle> from above")
    (folder / "portrait-0.png.txt").write_text("a <castle> at dusk")
    (folder / "IMG_0999.caption").write_text("a photo since removed")
    (folder / "._square-0.txt").write_bytes(b"\x00\x05\x16\x07")  # macOS' metadata beside a file: hidden, not named
    (folder / "broken.png").write_bytes(b"not an image")  # its caption is of an image, named as unreadable
    (folder / "broken.txt").write_text("a broken <castle>")
    config = TrainConfig(model="tiny-random", images=str(folder), output=str(tmp_path / "run"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        lines = plan_run(config).summary()
    said = [str(w.message) for w in caught if "caption file" in str(w.message)]
    assert said == [f"{folder}: caption files of no image there, not read: IMG_0999.caption, portrait-0.png.txt; an image's "
                    "caption file is named for its stem: portrait-0.png's is portrait-0.txt"]
    assert lines[1].startswith("3 training images of castle (1 with a caption of their own)")
    for path in (folder / "IMG_0999.caption", folder / "portrait-0.png.txt"):
        path.unlink()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        plan_run(config)
    assert not [w for w in caught if "caption file" in str(w.message)]


def test_utf16_caption_and_metadata_files_with_their_byte_order_mark_are_read(tmp_path):
    """Windows Notepad saves "Unicode" as UTF-16 little endian with its mark (and CRLF); Windows PowerShell 5's
    `Out-File` writes a metadata.jsonl so by default."""
    paths = photo_set(tmp_path, counts=(2, 1, 0))
    (tmp_path / "portrait-0.txt").write_bytes("a <castle> at dusk, café\r\n".encode("utf-16"))  # with its mark
    (tmp_path / "portrait-1.txt").write_bytes(b"\xfe\xff" + "the <castle>, 城".encode("utf-16-be"))
    row = json.dumps({"file_name": "square-0.png", "text": "a <castle> from above"})
    (tmp_path / "metadata.jsonl").write_bytes(f"{row}\r\n".encode("utf-16"))
    assert read_captions(paths) == ["a <castle> at dusk, café", "the <castle>, 城", "a <castle> from above"]


def test_captions_masks_and_metadata_named_on_a_mac_match_photos_named_elsewhere(tmp_path):
    """macOS writes names decomposed (NFD), Linux and Windows as typed (NFC): `café.txt` from a Mac beside `café.jpg`
    from Linux is one name to its user, and is matched so, as masks and metadata.jsonl's file names are. Two files
    that are one name so are named in a warning, and the image's own spelling is read."""
    import unicodedata

    from sdtune.datasets import read_folder
    from sdtune.masks import mask_file

    def nfd(name: str) -> str:
        return unicodedata.normalize("NFD", name)

    folder = tmp_path / "photos"
    folder.mkdir()
    for index, name in enumerate(("café", nfd("crème"), "déjà")):
        Image.new("RGB", (40, 30), (60 * index, 0, 0)).save(folder / f"{name}.png")
    paths = sorted(folder.glob("*.png"))
    (folder / f"{nfd('café')}.txt").write_text("a <castle> at the café")  # saved on a Mac
    (folder / "crème.TXT").write_text("a <castle> in cream")
    (folder / "metadata.jsonl").write_text(json.dumps({"file_name": nfd("déjà.png"), "text": "seen before"}) + "\n")
    assert "café.png".encode() != nfd("café.png").encode()  # byte for byte, two names
    by_name = dict(zip([unicodedata.normalize("NFC", path.stem) for path in paths], read_captions(paths)))
    assert by_name == {"café": "a <castle> at the café", "crème": "a <castle> in cream", "déjà": "seen before"}
    (folder / "masks").mkdir()
    Image.new("L", (40, 30), 255).save(folder / "masks" / f"{nfd('café')}.png")
    Image.new("L", (40, 30), 255).save(folder / "masks" / "crème.png")
    assert [mask_file(path) for path in paths] == [folder / "masks" / f"{nfd('café')}.png", folder / "masks" / "crème.png", None]
    (folder / "metadata.jsonl").write_text(json.dumps({"file_name": "crème.png", "text": "from Linux"}) + "\n")
    assert [example.caption for example in read_folder(folder, "a photo").examples if "cr" in example.image.name] == ["from Linux"]
    (folder / "café.txt").write_text("typed on Linux")  # now both spellings are there
    with pytest.warns(UserWarning, match=r"caption files in .*photos: café.txt is there twice, spelled in two Unicode forms"):
        assert read_captions([folder / "café.png"]) == ["typed on Linux"]
    from sdtune.data import warn_duplicates

    Image.new("RGB", (40, 30), "blue").save(folder / f"{nfd('café')}.png")  # another photo of one name
    with pytest.warns(UserWarning, match=r"images whose names differ only in their Unicode form: 'cafe\\u0301.png', "
                                         r"'caf\\xe9.png'; one was likely saved on a Mac"):
        warn_duplicates(sorted(folder.glob("*.png"), key=lambda path: path.name.encode()))


def test_caption_files_in_kohyas_conventions_and_any_case(tmp_path):
    paths = photo_set(tmp_path, counts=(2, 2, 1))  # portrait-0, portrait-1, square-0, square-1, wide-0
    (tmp_path / "portrait-0.caption").write_text("a <castle>, kohya's extension")
    (tmp_path / "portrait-1.TXT").write_text("a <castle> from a camera's card")
    (tmp_path / "square-0.txt").write_text("the .txt first")
    (tmp_path / "square-0.caption").write_text("not read")
    (tmp_path / "square-1.Caption").write_text("  any case  ")
    assert read_captions(paths) == ["a <castle>, kohya's extension", "a <castle> from a camera's card", "the .txt first",
                                    "any case", None]
    (tmp_path / "wide-0.caption").write_bytes(b"\xff caption")
    with pytest.raises(SdtuneError, match=r"caption file .*wide-0.caption: not UTF-8 text"):
        read_captions(paths)


def test_shuffled_captions_keep_their_first_tags_and_dropout_empties_some():
    items = [{"prompt": "sks castle, tower, snow, dusk, red roof"}] * 400
    augmented = AugmentedCaptions(items, shuffle=True, keep_tokens=2, dropout=0.25)
    torch.manual_seed(0)
    drawn = [augmented[i]["prompt"] for i in range(len(items))]
    torch.manual_seed(0)
    assert [augmented[i]["prompt"] for i in range(len(items))] == drawn  # the loop's seeded stream decides
    kept = [p for p in drawn if p]
    assert 0.18 < 1 - len(kept) / len(drawn) < 0.32
    assert all(p.startswith("sks castle, tower, ") for p in kept)
    assert all(sorted(p.split(", ")) == sorted(items[0]["prompt"].split(", ")) for p in kept)
    assert len(set(kept)) == 6  # every order of the three shuffled tags
    plain = AugmentedCaptions(items, dropout=0.0, shuffle=False)
    assert plain[0]["prompt"] == items[0]["prompt"]


def test_tag_dropout_drops_each_tag_after_the_kept_ones_as_kohya_does():
    """--caption-tag-dropout P: each tag after --keep-tokens dropped with probability P, independently, the kept
    tags never; with --shuffle-caption the survivors come in shuffled order; at 0 nothing is drawn for it."""
    items = [{"prompt": "sks castle, tower, snow, dusk, red roof"}] * 2000
    torch.manual_seed(1)
    drawn = [AugmentedCaptions(items, keep_tokens=1, tag_dropout=0.3)[i]["prompt"].split(", ") for i in range(len(items))]
    assert all(tags[0] == "sks castle" for tags in drawn)
    rest = [tags[1:] for tags in drawn]
    assert all(tags == [t for t in ["tower", "snow", "dusk", "red roof"] if t in tags] for tags in rest)  # order kept
    for tag in ["tower", "snow", "dusk", "red roof"]:
        assert 0.26 < 1 - sum(tag in tags for tags in rest) / len(rest) < 0.34
    torch.manual_seed(1)
    both = AugmentedCaptions(items, shuffle=True, keep_tokens=1, tag_dropout=0.3)
    shuffled = [both[i]["prompt"].split(", ") for i in range(400)]
    assert any(tags[1:] != sorted(tags[1:], key=["tower", "snow", "dusk", "red roof"].index) for tags in shuffled)
    torch.manual_seed(1)
    AugmentedCaptions(items, shuffle=True, keep_tokens=1)[0]
    after_shuffle = torch.rand(())
    torch.manual_seed(1)
    AugmentedCaptions(items, shuffle=True, keep_tokens=1, tag_dropout=0.0)[0]
    assert torch.rand(()) == after_shuffle  # no dropout, no draws: runs without it draw as before


@pytest.mark.filterwarnings("ignore:resuming with other settings")  # steps: the cut run stopped early
def test_caption_augmentation_trains_and_resumes_exactly(tmp_path, tiny_path):
    folder = photo_set(tmp_path / "photos", counts=(1, 2, 1))[0].parent
    for i, path in enumerate(sorted(folder.glob("*.png"))):
        path.with_suffix(".txt").write_text(f"<castle>, tag{i}, stone, snow, dusk")
    settings = dict(images=str(folder), shuffle_caption=True, keep_tokens=1, caption_dropout=0.3, caption_tag_dropout=0.2,
                    batch_size=2, steps=5)
    whole = run_training(tmp_path, "whole", **settings)
    run_training(tmp_path, "cut", **{**settings, "steps": 3, "checkpoint_every": 3})
    resumed = run_training(tmp_path, "cut", **{**settings, "checkpoint_every": 3, "resume": "latest"})
    assert resumed.losses == whole.losses[3:]
    assert (resumed.output / "adapter.safetensors").read_bytes() == (whole.output / "adapter.safetensors").read_bytes()
    from sdtune.model_card import write_model_card

    card = write_model_card(whole.output).output.read_text()
    assert all(row in card for row in ("| caption dropout | 0.3 |", "| caption tags shuffled | yes |", "| caption tag dropout | 0.2 |",
                                       "| caption tags kept in place | 1 |"))


def test_captions_reach_the_validation_loss_and_prior_preservation(tmp_path, tiny_path, monkeypatch):
    from sdtune import validation

    monkeypatch.setattr(validation, "SAMPLE_STEPS", 2)
    folder = photo_set(tmp_path / "photos", counts=(2, 2, 1))[0].parent
    for path in sorted(folder.glob("*.png")):
        path.with_suffix(".txt").write_text(f"a <castle> seen as {path.stem}")
    class_images = photo_set(tmp_path / "class", counts=(1, 1, 1), seed=2)[0].parent
    embedded: list[str] = []
    original = validation.ValidationLoss.__init__

    def recording(self, pixels, prompt_embeds, *args):
        embedded.append(len(prompt_embeds))
        return original(self, pixels, prompt_embeds, *args)

    monkeypatch.setattr(validation.ValidationLoss, "__init__", recording)
    prompts: list[str] = []
    import sdtune.training

    original_loss = sdtune.training.Trainer.loss
    monkeypatch.setattr(sdtune.training.Trainer, "loss", lambda self, latents, batch: prompts.extend(batch["prompt"]) or original_loss(self, latents, batch))
    Image.new("RGB", (20, 20), "green").save(class_images / "thumb.png")  # named as a class image, not as a concept's
    with pytest.warns(UserWarning, match=r"^class image thumb.png is 20x20, smaller than 64px: upscaled$"):
        run = run_training(tmp_path, "prior", images=str(folder), class_images=str(class_images), class_prompt="photo of a castle.",
                           validate_every=2, validation_images=1, caption_dropout=0.5, batch_size=2, steps=2)
    assert set(run.validation_losses) == {2} and embedded == [1]
    assert {p for p in prompts if p.startswith("a sks castle seen as")} and "photo of a castle." in prompts
    assert len(prompts) == 2 * 2 * 2  # concept and class examples in every batch


# ---------------------------------------------------------------------------------------------
# Several concepts


def test_several_concepts_train_one_adapter_that_knows_every_placeholder(tmp_path, tiny_path, monkeypatch):
    from sdtune.adapter import read_adapter_info
    from sdtune.data import fill_placeholders
    from sdtune.export import export_adapter
    from sdtune.adapter import adapter_info

    castle = photo_set(tmp_path / "castle", counts=(1, 1, 1))[0].parent
    canal = photo_set(tmp_path / "canal", counts=(2, 2, 2), seed=1)[0].parent
    (canal / "wide-0.txt").write_text("a <canal> at night, seen from the <castle>")
    prompts: list[str] = []
    import sdtune.training

    original_loss = sdtune.training.Trainer.loss
    monkeypatch.setattr(sdtune.training.Trainer, "loss", lambda self, latents, batch: prompts.extend(batch["prompt"]) or original_loss(self, latents, batch))
    run = run_training(tmp_path, "both", concept=["castle", "canal"], images=[str(castle), str(canal)], steps=6, batch_size=2)
    # 3 castle and 6 canal images: the balanced sampler draws each concept 6 times an epoch of 12
    assert sum("sks castle." in p for p in prompts) == sum("sks canal" in p for p in prompts) == 6
    assert "a sks canal at night, seen from the sks castle" in prompts
    info, _ = read_adapter_info(run.adapter)
    assert info.placeholder_tokens() == {"castle": "sks castle", "canal": "sks canal"}
    assert fill_placeholders("a <castle> by a <canal> and a <bridge>", info.placeholder_tokens()) == "a sks castle by a sks canal and a bridge"
    export_adapter(run.output, "kohya", tmp_path / "both.safetensors")  # the tokens travel with a kohya export
    assert adapter_info(tmp_path / "both.safetensors").placeholder_tokens() == info.placeholder_tokens()
    assert run.output.name == "both" and TrainConfig(concept=["castle", "canal"]).resolved(1e-3).output == "runs/castle+canal-atoms"
    written = (run.output / "config.toml").read_text()
    assert 'concept = [\n    "castle",\n    "canal",\n]' in written or 'concept = ["castle", "canal"]' in written
    assert TrainConfig(concept=["castle"]).concept == "castle"  # one concept stays a plain setting


def test_several_concepts_in_buckets_are_drawn_equally_often(tmp_path, tiny_path, monkeypatch):
    castle = photo_set(tmp_path / "castle", counts=(1, 1, 1))[0].parent
    canal = photo_set(tmp_path / "canal", counts=(2, 2, 2), seed=1)[0].parent
    prompts: list[str] = []
    import sdtune.training

    original_loss = sdtune.training.Trainer.loss
    monkeypatch.setattr(sdtune.training.Trainer, "loss", lambda self, latents, batch: prompts.extend(batch["prompt"]) or original_loss(self, latents, batch))
    run_training(tmp_path, "both", concept=["castle", "canal"], images=[str(castle), str(canal)], buckets=True, steps=12)
    # each castle image twice, each canal image once: 6 and 6 in an epoch of 12 batches of one
    assert prompts.count("photo of a sks castle.") == prompts.count("photo of a sks canal.") == 6


def test_several_concepts_from_the_command_line(tmp_path, monkeypatch):
    import sdtune
    from test_cli import invoke

    seen = {}

    def refuse(config):
        seen["config"] = config
        raise SdtuneError("stopped before training")

    monkeypatch.setattr(sdtune, "train", refuse)
    result = invoke("train", "--concept", "castle", "--concept", "canal", "--images", "a", "--images", "b", "--buckets",
                    "--caption-dropout", "0.1", "--shuffle-caption", "--keep-tokens", "1", "--caption-tag-dropout", "0.2")
    assert "stopped before training" in result.stderr, result.output
    config = seen["config"]
    assert config.concepts == ["castle", "canal"] and config.images == ["a", "b"]
    assert config.buckets and config.caption_dropout == 0.1 and config.shuffle_caption and config.keep_tokens == 1
    assert config.caption_tag_dropout == 0.2
    assert config.concept_tokens == {"castle": "sks castle", "canal": "sks canal"}
    invoke("train", "--concept", "castle", "--concept", "canal", "--token", "zwx tower", "--token", "qrv river")
    config = seen["config"]
    assert config.concept_tokens == {"castle": "zwx tower", "canal": "qrv river"}
    assert config.resolved(1e-3).token == ["zwx tower", "qrv river"]  # kept in the run's config.toml
    assert config.concept_prompt("canal") == "photo of a qrv river."
    invoke("train", "--token", "zwx tower")
    assert seen["config"].token == "zwx tower"  # one concept, one token: a plain setting


@pytest.mark.parametrize("settings, message", [
    (dict(concept=["castle", "castle"]), "^concept names a concept twice"),
    (dict(concept=[]), "^concept needs a name"),
    (dict(concept=["castle", "canal"], images=["a"]), "^give one images folder per concept: 1 for 2 concepts"),
    (dict(concept=["castle", "canal"], token="zwx"), "^give one token per concept \\(1 for 2 concepts\\)"),
    (dict(concept="castle", token=["zwx", "qrv"]), "^give one token per concept \\(2 for 1 concepts\\)"),
    (dict(concept=["castle", "canal"], class_prompt="a castle"), "^prior preservation .* takes one concept"),
    (dict(keep_tokens=1), "^keep_tokens applies to shuffle_caption=True"),
    (dict(caption_dropout=1.0), r"^caption_dropout must be in \[0, 1\)"),
    (dict(caption_tag_dropout=-0.1), r"^caption_tag_dropout must be in \[0, 1\)"),
    (dict(buckets=True, dataset="digits"), "^buckets=True applies to concept images"),
])
def test_photo_settings_that_do_not_combine_are_refused(settings, message):
    with pytest.raises(SdtuneError, match=message):
        TrainConfig(**settings).validate()


@pytest.mark.slow
def test_two_processes_take_whole_bucket_batches(tmp_path, tiny_path):
    """Accelerate shards the bucket batches (some smaller: 3 images in batches of 2) as whole batches."""
    from test_multiprocess import two_processes

    images = photo_set(tmp_path / "photos", counts=(2, 3, 2))[0].parent
    result = two_processes("train", "--images", str(images), "--buckets", "--batch-size", "2", "--steps", "5",
                           "--log-with", "none", "--output", str(tmp_path / "run"))
    assert result.returncode == 0, result.stderr[-2000:]
    assert len((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()) == 5


def test_sdxl_time_ids_come_from_each_bucket_image(tmp_path, monkeypatch):
    """SDXL's micro-conditioning: every training image's original size, crop and bucket size."""
    from diffusers import UNet2DConditionModel

    seen = []
    forward = UNet2DConditionModel.forward

    def recording(self, sample, timestep, encoder_hidden_states, *args, added_cond_kwargs=None, **kwargs):
        if self.training and added_cond_kwargs is not None:
            seen.append((tuple(sample.shape[-2:]), added_cond_kwargs["time_ids"].detach().cpu()))
        return forward(self, sample, timestep, encoder_hidden_states, *args, added_cond_kwargs=added_cond_kwargs, **kwargs)

    monkeypatch.setattr(UNet2DConditionModel, "forward", recording)
    photo_set(tmp_path / "photos", counts=(1, 1, 1))
    run_training(tmp_path, "sdxl", model="tiny-sdxl-random", images=str(tmp_path / "photos"), buckets=True, steps=3,
                 batch_size=1, random_flip=False)
    originals = {(h, w) for w, h in SHAPES.values()}
    assert len(seen) == 3
    for (latent_h, latent_w), ids in seen:
        original, crop, target = ids[0, :2].tolist(), ids[0, 2:4].tolist(), ids[0, 4:].tolist()
        assert tuple(int(v) for v in original) in originals
        assert target[0] % latent_h == 0 and target[0] / latent_h == target[1] / latent_w  # the bucket, in pixels
        assert all(v >= 0 for v in crop)
    assert len({tuple(ids[0, 4:].tolist()) for _, ids in seen}) > 1  # several buckets

    seen.clear()  # with prior preservation: each class row tells its own class image's size and crop
    photo_set(tmp_path / "class", counts=(0, 1, 0), seed=2)
    run_training(tmp_path, "sdxl-prior", model="tiny-sdxl-random", images=str(tmp_path / "photos"), buckets=True, steps=3,
                 batch_size=1, random_flip=False, class_images=str(tmp_path / "class"), class_prompt="photo of a castle.")
    assert len(seen) == 3
    for (latent_h, latent_w), ids in seen:
        assert ids.shape[0] == 2 and ids[0, 4:].tolist() == ids[1, 4:].tolist()  # one size for the pair
        assert ids[1, :2].tolist() == [100, 100]  # the square class image, cropped into every bucket
        height, width = (int(v) for v in ids[1, 4:].tolist())
        side = max(width, height)  # the square resized to cover the bucket, then center-cropped
        assert ids[1, 2:4].tolist() == [(side - height) // 2, (side - width) // 2]
