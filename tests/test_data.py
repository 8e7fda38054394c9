"""Images of every kind, prompt files and the demo concepts."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from sdtune.data import PromptLine, fill_placeholders, list_images, load_images, read_prompt_file, read_prompt_lines
from sdtune.datasets import concept_images
from sdtune.demo_images import DEMO_COUNT, demo_concept_folder, draw_demo_image
from sdtune.errors import SdtuneError


def test_prompt_file_skips_comments_and_blank_lines(tmp_path):
    path = tmp_path / "p.txt"
    path.write_text("# comment\n\nphoto of a <castle>.\n  The <castle> at night.  \n", encoding="utf-8")
    assert read_prompt_file(path) == ["photo of a <castle>.", "The <castle> at night."]


def test_prompt_lines_carry_kohya_ss_options(tmp_path):
    """As kohya-ss' sample prompts write them: the line cut at every " --", the first piece the prompt, each other an
    option by its letter in either case; the last of an option repeated wins; text after " --" is never the prompt."""
    path = tmp_path / "p.txt"
    path.write_text(
        "a <castle> at dusk --n blurry, low-res --w 512 --h 768 --d 42 --s 30 --l 7.5\n"
        "# a comment --w 8\n"
        "plain--text, low-res\n"
        "a castle --W 64 --L 3 --w 128 --\n"
        "a sign reading --hello there\n",
        encoding="utf-8",
    )
    with pytest.warns(UserWarning) as caught:
        lines = read_prompt_lines(path)
    assert lines == [
        PromptLine("a <castle> at dusk", f"{path} line 1", negative_prompt="blurry, low-res", width=512, height=768,
                   seed=42, steps=30, guidance=7.5),
        PromptLine("plain--text, low-res", f"{path} line 3"),
        PromptLine("a castle", f"{path} line 4", width=128, guidance=3.0),
        PromptLine("a sign reading", f"{path} line 5"),
    ]
    assert lines[0].options == ["--n", "--w", "--h", "--d", "--s", "--l"]
    assert len(caught) == 1 and f"prompt file {path}: ignored --hello (line 5); sdtune reads --n (negative prompt)" in str(caught[0].message)

    # where a command does not use them, the prompts come without them, and one warning says why
    with pytest.warns(UserWarning) as caught:
        prompts = read_prompt_file(path, "the reason")
    assert prompts == ["a <castle> at dusk", "plain--text, low-res", "a castle", "a sign reading"]
    unused = [str(w.message) for w in caught if "left unused" in str(w.message)]
    assert unused == [f"prompt file {path}: 2 lines give --d, --h, --l, --n, --s, --w (kohya-ss' options), left unused: the reason"]


def test_a_prompt_line_written_back_reads_as_it_was(tmp_path):
    from sdtune.data import parse_prompt_line, prompt_line_text

    lines = [
        PromptLine("a <castle> at dusk", negative_prompt="blurry, low-res", width=512, height=768, seed=42, steps=30, guidance=7.5),
        PromptLine("plain--text", height=64, guidance=3.0),
        PromptLine("a castle"),
    ]
    assert prompt_line_text(lines[0]) == "a <castle> at dusk --n blurry, low-res --w 512 --h 768 --d 42 --s 30 --l 7.5"
    assert [parse_prompt_line(prompt_line_text(line))[0] for line in lines] == lines


@pytest.mark.parametrize("line, message", [
    ("a --w abc", "--w takes the width in pixels, a positive multiple of 8, got 'abc'"),
    ("a --h 500", "--h takes the height in pixels, a positive multiple of 8, got '500'"),
    ("a --w 512px", "--w takes the width in pixels, a positive multiple of 8, got '512px'"),
    ("a --d -1", "--d takes the seed, a whole number from 0 to 4294967295, got '-1'"),
    ("a --d 4294967296", "--d takes the seed, a whole number from 0 to 4294967295, got '4294967296'"),
    ("a --s 0", "--s takes the denoising steps, a whole number of at least 1, got '0'"),
    ("a --l nan", "--l takes the guidance scale, a number, got 'nan'"),
    ("a --l 7.5.3", "--l takes the guidance scale, a number, got '7.5.3'"),
    ("a --n", "--n needs a value (the negative prompt)"),
])
def test_a_bad_option_value_names_the_file_and_line(tmp_path, line, message):
    path = tmp_path / "p.txt"
    path.write_text(f"fine --w 64\n\n{line}\n", encoding="utf-8")
    with pytest.raises(SdtuneError) as raised:
        read_prompt_lines(path)
    assert str(raised.value) == f"{path} line 3: {message}"


@pytest.mark.parametrize("content", [b"", b"# only comments\n\n", b"\xff\xfe\x00ba", b"caf\xe9", "a".encode("utf-16-le")])
def test_empty_or_undecodable_prompt_file_is_refused(tmp_path, content):
    path = tmp_path / "p.txt"
    path.write_bytes(content)
    with pytest.raises(SdtuneError):
        read_prompt_file(path)


def test_utf16_prompt_files_with_their_byte_order_mark_are_read(tmp_path):
    """As captions are (captions.decode_text): Notepad's "Unicode", little endian, and big endian."""
    path = tmp_path / "p.txt"
    for encoded in ("# Notepad\r\nphoto of a <castle>.\r\nthe <castle> at night\r\n".encode("utf-16"),
                    b"\xfe\xff" + "photo of a <castle>.\nthe <castle> at night".encode("utf-16-be")):
        path.write_bytes(encoded)
        assert read_prompt_file(path) == ["photo of a <castle>.", "the <castle> at night"]
    path.write_bytes(b"\xff\xfe" + "a <castle>".encode("utf-16-le")[:-1])  # cut mid-character
    with pytest.raises(SdtuneError, match=r"p.txt: not UTF-16 text, though it starts with UTF-16's byte-order mark \(byte 20\)$"):
        read_prompt_file(path)


def test_prompts_from_standard_input_a_fifo_and_dev_stdin(tmp_path, monkeypatch):
    """`-`, /dev/stdin and a FIFO are read as command-line tools read them, not reported missing."""
    import io
    import os
    import subprocess
    import sys
    import threading

    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"a <castle>\n# no\nb\n")))
    assert read_prompt_file("-") == ["a <castle>", "b"]

    fifo = tmp_path / "prompts.fifo"
    os.mkfifo(fifo)
    writer = threading.Thread(target=lambda: fifo.write_text("from a pipe\n"))
    writer.start()
    assert read_prompt_file(fifo) == ["from a pipe"]
    writer.join()

    code = "from sdtune.data import read_prompt_file; print(read_prompt_file('/dev/stdin'))"
    result = subprocess.run([sys.executable, "-c", code], input="piped <castle>\n", capture_output=True, text=True, timeout=120)
    assert result.stdout.strip() == "['piped <castle>']", result.stderr


def test_cli_samples_prompts_from_standard_input(tmp_path, private_cache):
    from test_cli import runner

    from sdtune.cli import app

    args = ["sample", "--model", "tiny-random", "--prompts", "-", "--num-images", "1", "--steps", "1", "--output", str(tmp_path)]
    result = runner.invoke(app, args, input="a <castle>\nthe <castle>\n")
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in (tmp_path / "images").iterdir()) == ["000-seed0.png", "001-seed0.png"]


def test_paper_prompt_files_have_twenty_prompts():
    for concept in ("castle", "canal"):
        prompts = read_prompt_file(f"prompts/{concept}.txt")
        assert len(prompts) == 20 and all(f"<{concept}>" in p for p in prompts)


def test_placeholders():
    assert fill_placeholders("A <castle> by a lake", "sks castle") == "A sks castle by a lake"
    assert fill_placeholders("A <castle> by a lake", None) == "A castle by a lake"


def odd_images(folder):
    """Every mode sdtune must accept, plus a tiny image."""
    rng = np.random.default_rng(0)
    rgb = Image.fromarray(rng.integers(0, 255, (80, 96, 3), dtype=np.uint8))
    rgb.convert("RGBA").save(folder / "rgba.png")
    rgb.convert("P").save(folder / "palette.png")
    rgb.convert("CMYK").save(folder / "cmyk.jpg")
    rgb.convert("L").save(folder / "grey.png")
    Image.fromarray(rng.integers(0, 65535, (80, 80), dtype=np.uint16)).save(folder / "sixteen.png")
    rgb.resize((20, 12)).save(folder / "tiny.webp")


def test_every_image_mode_becomes_rgb(tmp_path):
    odd_images(tmp_path)
    with pytest.warns(UserWarning, match="smaller than 64px: upscaled"):
        images = load_images(list_images(tmp_path), 64)
    assert len(images) == 6
    for image in images:
        assert image.mode == "RGB" and image.size == (64, 64)
    sixteen = np.asarray(images[[p.name for p in list_images(tmp_path)].index("sixteen.png")])
    assert sixteen.max() > 200 and sixteen.min() < 50, "16-bit images are rescaled, not clipped"


def test_unreadable_files_are_skipped_while_others_remain(tmp_path):
    Image.new("RGB", (64, 64), "red").save(tmp_path / "good.png")
    (tmp_path / "broken.png").write_bytes(b"not an image at all")
    with pytest.warns(UserWarning, match="skipping .*broken.png"):
        assert len(load_images(list_images(tmp_path), 64)) == 1
    (tmp_path / "good.png").unlink()
    with pytest.raises(SdtuneError, match="no readable images"), pytest.warns(UserWarning, match="skipping .*broken.png"):
        load_images(list_images(tmp_path), 64)


def test_a_folder_under_home_is_found_as_a_shell_finds_it(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "photos").mkdir()
    Image.new("RGB", (64, 64)).save(tmp_path / "photos" / "a.png")
    from sdtune.config import TrainConfig

    # --images=~/photos and TOML values reach sdtune unexpanded; the config expands them
    assert list_images(TrainConfig(images="~/photos").images) == [tmp_path / "photos" / "a.png"]


def test_missing_or_empty_folder(tmp_path):
    with pytest.raises(SdtuneError, match="not found"):
        list_images(tmp_path / "nope")
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(SdtuneError, match="has no images"):
        list_images(tmp_path)


def test_demo_concepts_are_drawn_deterministically(tmp_path, monkeypatch):
    folder = demo_concept_folder("canal")
    files = sorted(folder.iterdir())
    assert len(files) == DEMO_COUNT
    assert np.array_equal(np.asarray(Image.open(files[3])), np.asarray(draw_demo_image("canal", 3)))
    monkeypatch.chdir(tmp_path)
    assert concept_images("castle")[0].parent.name.startswith("castle")
    (tmp_path / "concepts" / "castle").mkdir(parents=True)
    Image.new("RGB", (64, 64)).save(tmp_path / "concepts" / "castle" / "mine.png")
    assert [p.name for p in concept_images("castle")] == ["mine.png"]
    with pytest.raises(SdtuneError, match="no images for concept 'dragon'"):
        concept_images("dragon")


def test_hidden_files_are_never_images_and_extensions_are_read_in_any_case(tmp_path):
    Image.new("RGB", (64, 64), "red").save(tmp_path / "IMG_0001.JPG", format="JPEG")
    Image.new("RGB", (64, 64), "red").save(tmp_path / "IMG_0002.jpeg", format="JPEG")
    (tmp_path / "._IMG_0001.JPG").write_bytes(b"\x00\x05\x16\x07\x00\x02\x00\x00Mac OS X")  # macOS' AppleDouble file
    Image.new("RGB", (64, 64), "red").save(tmp_path / ".hidden.png")
    (tmp_path / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
    (tmp_path / "Thumbs.db").write_bytes(b"\xd0\xcf\x11\xe0")
    assert [p.name for p in list_images(tmp_path)] == ["IMG_0001.JPG", "IMG_0002.jpeg"]


def test_sixteen_bit_and_float_images_keep_their_tones(tmp_path):
    from sdtune.data import to_rgb

    white = Image.fromarray(np.full((8, 8), 65535, dtype=np.uint16))
    assert white.mode == "I;16" and np.asarray(to_rgb(white)).min() == 255  # not stretched into black
    dark = Image.fromarray(np.linspace(0, 8000, 64, dtype=np.uint16).reshape(8, 8))
    assert np.asarray(to_rgb(dark)).max() == round(8000 / 257)  # a dark photo stays dark
    dark.save(tmp_path / "dark.png")
    with Image.open(tmp_path / "dark.png") as reopened:
        assert np.array_equal(np.asarray(to_rgb(reopened)), np.asarray(to_rgb(dark)))
    unit = Image.fromarray(np.full((8, 8), 0.5, dtype=np.float32), mode="F")
    assert np.asarray(to_rgb(unit)).max() == 128
    flat = Image.fromarray(np.full((8, 8), -3.0, dtype=np.float32), mode="F")
    assert np.asarray(to_rgb(flat)).max() == 128  # one value of unknown range: mid-grey


def test_files_that_are_no_images_are_skipped_by_their_header_with_one_warning(tmp_path, monkeypatch):
    import warnings

    from sdtune.data import readable_images

    good = tmp_path / "good.jpg"
    Image.new("RGB", (64, 64), "red").save(good, format="PNG")  # a PNG named .jpg is read as what it is
    (tmp_path / "zero.png").write_bytes(b"")
    (tmp_path / "notes.png").write_bytes(b"not an image at all")
    (tmp_path / "moved.png").symlink_to(tmp_path / "elsewhere" / "moved.png")  # a link whose photo was moved
    Image.new("RGB", (200, 200)).save(tmp_path / "bomb.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100 * 100)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert readable_images(list_images(tmp_path)) == [good]
    assert len(caught) == 1, [str(w.message) for w in caught]
    message = str(caught[0].message)
    assert message.startswith("skipping 4 files that are not readable images: ")
    assert "bomb.png (over PIL's decompression-bomb limit" in message and f"moved.png (a link to {tmp_path}/elsewhere/moved.png, which is not there)" in message
    assert message.endswith("; and 1 more")  # zero.png, the fourth in name order
    with pytest.warns(UserWarning, match=r"^skipping .*zero.png: not a readable image \("):
        assert readable_images([good, tmp_path / "zero.png"]) == [good]


def test_a_jpeg_over_the_bomb_limit_is_read_at_a_fraction_of_its_size(tmp_path, monkeypatch):
    """A 100-megapixel camera's JPEG is over PIL's limit (89 megapixels) but below twice it: decoded at 1/8 (PIL's
    draft), it costs less than a phone photo; kept, where a PNG of that size is still refused. A JPEG that the
    training size keeps from being drafted small enough is refused as it is decoded."""
    import warnings

    from sdtune.data import load_framed, load_framed_images, readable_images

    Image.new("RGB", (130, 130), "red").save(tmp_path / "large.jpg", quality=95)  # 16,900 pixels
    Image.new("RGB", (130, 130), "red").save(tmp_path / "large.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100 * 100)  # PIL warns from 10,000 pixels, refuses from 20,000
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert readable_images([tmp_path / "large.jpg", tmp_path / "large.png"]) == [tmp_path / "large.jpg"]
        framed = load_framed(tmp_path / "large.jpg", 32)  # drafted at 1/4: 33x33
    said = [str(w.message) for w in caught]
    assert len(said) == 1 and "large.png: not a readable image (over PIL's decompression-bomb limit: Image size (16900 pixels)" in said[0], said
    assert framed.original_size == (130, 130) and framed.image.getpixel((16, 16))[0] > 240
    with pytest.warns(UserWarning, match=r"skipping .*large.jpg: not a readable image \(over PIL's decompression-bomb limit: "
                                         r"Image size \(16900 pixels\) exceeds limit of 10000 pixels even decoded at a "
                                         r"fraction of its size\)"):
        with pytest.raises(SdtuneError, match="no readable images"):
            load_framed_images([tmp_path / "large.jpg"], 128)  # 128 px of 130: not drafted
    Image.new("RGB", (150, 150)).save(tmp_path / "huge.jpg")  # over twice the limit: PIL refuses it, JPEG or not
    with pytest.warns(UserWarning, match=r"huge.jpg: not a readable image \(over PIL's decompression-bomb limit"):
        assert readable_images([tmp_path / "huge.jpg"]) == []


def test_copies_of_an_image_are_named_in_one_warning(tmp_path):
    from sdtune.data import duplicate_images, warn_duplicates

    rng = np.random.default_rng(0)
    for name in ("a.png", "b.png"):
        Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(tmp_path / name)
    (tmp_path / "a copy.png").write_bytes((tmp_path / "a.png").read_bytes())
    (tmp_path / "link.png").symlink_to(tmp_path / "a.png")
    paths = list_images(tmp_path)
    assert [[p.name for p in group] for group in duplicate_images(paths)] == [["a copy.png", "a.png", "link.png"]]
    with pytest.warns(UserWarning, match=r"the same image more than once: a copy.png = a.png = link.png; "):
        warn_duplicates(paths)
    assert duplicate_images([tmp_path / "a.png", tmp_path / "b.png"]) == []


def test_one_photo_with_two_extensions_is_named_in_one_warning(tmp_path):
    """An iPhone's export keeps IMG_0001.HEIC beside IMG_0001.JPG: now both are read, the photo would be drawn twice."""
    import warnings

    from sdtune.data import warn_duplicates

    rng = np.random.default_rng(0)
    photos = {stem: Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)) for stem in ("IMG_0001", "IMG_0002", "IMG_0003", "IMG_0004")}
    for name, quality in (("IMG_0001.JPG", 90), ("IMG_0001.png", 0), ("IMG_0002.jpg", 90), ("IMG_0003.JPG", 90),
                          ("IMG_0003.jpeg", 70), ("IMG_0004.jpg", 90)):
        photos[name[:8]].save(tmp_path / name, format="PNG" if name.endswith("png") else "JPEG", quality=quality)
    (tmp_path / "img_0004.JPG").write_bytes((tmp_path / "IMG_0004.jpg").read_bytes())  # a copy: named as one, once
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        warn_duplicates(list_images(tmp_path))
    said = [str(w.message) for w in caught]
    assert said[0].startswith("images with one name and several extensions: IMG_0001.JPG, IMG_0001.png; IMG_0003.JPG, "
                              "IMG_0003.jpeg; likely one photo saved twice or converted") and said[0].endswith("remove one of each")
    assert len(said) == 2 and said[1].startswith("the same image more than once: IMG_0004.jpg = img_0004.JPG;")


def test_small_and_animated_images_are_named_in_one_warning_a_kind(tmp_path):
    import warnings

    from sdtune.data import load_framed_images

    for i in range(5):
        Image.new("RGB", (20 + i, 20), (40 * i, 0, 0)).save(tmp_path / f"thumb{i}.jpg")
    frames = [Image.new("RGB", (80, 80), colour) for colour in ("red", "blue", "green")]
    frames[0].save(tmp_path / "a.gif", save_all=True, append_images=frames[1:])
    frames[0].save(tmp_path / "b.webp", save_all=True, append_images=frames[1:])
    # a phone's JPEG with a gain map or depth image is an MPO of two: the photo is the first, said of none
    Image.new("RGB", (80, 80), "red").save(tmp_path / "phone.jpg", format="MPO", save_all=True, append_images=[frames[1]])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loaded = load_framed_images(list_images(tmp_path), 64)
    assert len(loaded) == 8 and loaded[2].image.getpixel((5, 5))[0] > 250  # phone.jpg: its red photo
    assert [str(w.message) for w in caught] == [
        "a.gif, b.webp have several frames: the first of each is used",
        "5 images are smaller than the size they are trained at, and upscaled: thumb0.jpg (20x20), thumb1.jpg (21x20), "
        "thumb2.jpg (22x20), and 2 more",
    ]
    with pytest.warns(UserWarning, match=r"^a.gif has 3 frames: the first is used$"):
        load_framed_images([tmp_path / "a.gif"], 64)


def test_photos_in_formats_not_read_are_named_and_subfolders_hinted(tmp_path, without_heif):
    phone = tmp_path / "phone"
    phone.mkdir()
    Image.new("RGB", (64, 64), "red").save(phone / "web.jfif", format="JPEG")  # what browsers save JPEGs as
    Image.new("RGB", (64, 64), "red").save(phone / "new.avif")
    (phone / "IMG_0001.HEIC").write_bytes(b"\x00\x00\x00\x18ftypheic")
    (phone / "IMG_0002.dng").write_bytes(b"II*\x00")
    (phone / "IMG_0003.jxl").write_bytes(b"\xff\x0a")  # JPEG XL
    (phone / "DSC_0004.NRW").write_bytes(b"II*\x00")  # a Nikon compact's raw file
    (phone / "DSC_0005.HIF").write_bytes(b"\x00\x00\x00\x18ftypheix")  # a Sony or Canon camera's HEIF
    with pytest.warns(UserWarning, match=r"skipping 5 DNG/HEIC/HIF/JXL/NRW photo\(s\) \(DSC_0004.NRW, DSC_0005.HIF, IMG_0001.HEIC, "
                                         r"and 2 more\), a format sdtune does not read: convert them to JPEG or PNG, or for "
                                         r"HEIC/HEIF photos pip install 'sdtune\[heif\]'$"):
        assert [p.name for p in list_images(phone)] == ["new.avif", "web.jfif"]
    for name in ("IMG_0003.jxl", "DSC_0004.NRW", "DSC_0005.HIF"):
        (phone / name).unlink()
    with pytest.warns(UserWarning, match="HEIC"):
        assert len(load_images(list_images(phone), 32)) == 2
    for name in ("new.avif", "web.jfif"):
        (phone / name).unlink()
    with pytest.raises(SdtuneError, match=r"phone has 2 DNG/HEIC photo\(s\) .*: convert them to JPEG or PNG, or for HEIC/HEIF "
                                          r"photos pip install 'sdtune\[heif\]'"):
        list_images(phone)
    (phone / "IMG_0001.HEIC").unlink()
    with pytest.raises(SdtuneError, match=r"phone has 1 DNG photo\(s\) \(IMG_0002.dng\), a format sdtune does not read: convert them to JPEG or PNG$"):
        list_images(phone)  # no pip hint where no HEIC is among them
    (tmp_path / "parent" / "castle").mkdir(parents=True)
    (tmp_path / "parent" / "masks").mkdir()
    Image.new("RGB", (64, 64)).save(tmp_path / "parent" / "castle" / "a.png")
    with pytest.raises(SdtuneError, match=r"images in a subfolder are not read: give the subfolder \(.*parent/castle\)"):
        list_images(tmp_path / "parent")


def test_a_kohya_training_folder_is_refused_naming_the_folder_to_give_and_what_replaces_its_name(tmp_path):
    """kohya-ss' layout, `train/10_sks castle/`: the refusal names the subfolder quoted as a shell takes it (a space in
    the name), and says the name's repeats and prompt are not read and what sets them instead; a folder whose name is
    no kohya-ss one gets no such words."""
    train = tmp_path / "train"
    for name in ("10_sks castle", "5_sks castle closeup"):
        (train / name).mkdir(parents=True)
        Image.new("RGB", (64, 64)).save(train / name / "a.jpg")
    with pytest.raises(SdtuneError) as refused:
        list_images(train)
    message = str(refused.value)
    assert f"give the subfolder ('{train / '10_sks castle'}')" in message
    assert "repeats and prompt (10, 'sks castle') are not read either: --steps sets a run's length" in message
    assert "prompted by --token and --template (class images: --class-prompt)" in message
    assert message.endswith("2 such folders: give each its --concept and --images, or move their images into one")
    (train / "5_sks castle closeup" / "a.jpg").unlink()
    with pytest.raises(SdtuneError, match=r"--class-prompt\)$"):  # one such folder: nothing of several
        list_images(train)
    plain = tmp_path / "plain"
    (plain / "castle").mkdir(parents=True)
    Image.new("RGB", (64, 64)).save(plain / "castle" / "a.jpg")
    with pytest.raises(SdtuneError) as refused:
        list_images(plain)
    assert str(refused.value).endswith(f"give the subfolder ({plain / 'castle'})") and "kohya-ss" not in str(refused.value)


def test_photos_in_display_p3_or_another_rgb_profile_are_converted_to_srgb(tmp_path):
    """An iPhone's photos embed Display P3: their pixel values, read as sRGB, are duller than the photo; a viewer
    converts them, and so does sdtune. sRGB, damaged profiles and images without one stay as they are."""
    from helpers import DISPLAY_P3, SRGB, icc_profile

    from sdtune.data import load_framed

    p3 = icc_profile("Display P3", *DISPLAY_P3)
    colour = np.array([180, 120, 90])

    def decode(v):
        return np.where(v <= 0.04045, v / 12.92, ((v + 0.055) / 1.055) ** 2.4)

    def encode(v):
        return np.where(v <= 0.0031308, v * 12.92, 1.055 * v ** (1 / 2.4) - 0.055)

    # P3 to XYZ by its primaries, XYZ to sRGB by sRGB's: (190, 117, 84), redder than the file's values
    expected = encode(np.linalg.solve(np.array(SRGB).T, np.array(DISPLAY_P3).T @ decode(colour / 255))) * 255
    assert np.abs(expected - [190.3, 116.6, 84.0]).max() < 0.1
    flat = Image.new("RGB", (40, 30), tuple(int(c) for c in colour))
    flat.save(tmp_path / "p3.png", icc_profile=p3)
    turned = flat.getexif()
    turned[0x0112] = 6
    flat.save(tmp_path / "p3.jpg", icc_profile=p3, exif=turned, quality=100)  # turned upright, decoded at a draft
    transparent = Image.new("RGBA", (40, 30), (*colour, 255))
    transparent.paste((0, 0, 0, 0), (0, 0, 20, 30))
    transparent.save(tmp_path / "p3-alpha.png", icc_profile=p3)
    flat.save(tmp_path / "srgb.png", icc_profile=icc_profile("sRGB IEC61966-2.1", *SRGB))
    flat.save(tmp_path / "damaged.png", icc_profile=b"not a profile")
    flat.save(tmp_path / "none.png")
    names = ["p3.png", "p3.jpg", "p3-alpha.png", "srgb.png", "damaged.png", "none.png"]
    try:
        import pillow_heif
    except ImportError:  # the HEIC case needs pillow-heif (sdtune[heif])
        pillow_heif = None
    if pillow_heif is not None:
        pillow_heif.from_pillow(flat).save(tmp_path / "p3.heic", quality=-1, icc_profile=p3)  # lossless
        names.append("p3.heic")
    for name in names:
        framed = load_framed(tmp_path / name, 16)
        centre = np.array(framed.image.getpixel((12, 8)))
        want = expected if name.startswith("p3") else colour
        assert np.abs(centre - want).max() <= 2, (name, centre)
    alpha = load_framed(tmp_path / "p3-alpha.png", 16).image
    assert alpha.getpixel((1, 8)) == (255, 255, 255)  # white stays white


def test_a_heic_described_by_an_nclx_box_in_display_p3_is_converted_to_srgb(tmp_path):
    """A HEIC or AVIF may describe its colours by an nclx box (H.273 codes) instead of an ICC profile: Display P3's
    primaries with sRGB's curve is read as Display P3 is, as pillow-heif hands it over (`info["nclx_profile"]`);
    sRGB's own codes, or HDR curves (PQ), stay as they are."""
    pillow_heif = pytest.importorskip("pillow_heif")
    from helpers import DISPLAY_P3, icc_profile

    from sdtune.colour import nclx_icc
    from sdtune.data import load_framed

    colour = np.array([180, 120, 90])
    flat = Image.new("RGB", (40, 30), tuple(int(c) for c in colour))
    flat.save(tmp_path / "p3.png", icc_profile=icc_profile("Display P3", *DISPLAY_P3))
    expected = np.array(load_framed(tmp_path / "p3.png", 16).image.getpixel((12, 8)))  # as its ICC profile converts it
    assert np.abs(expected - colour).max() > 5
    for name, (primaries, transfer), want in [("p3.heic", (12, 13), expected), ("srgb.heic", (1, 13), colour),
                                              ("pq.heic", (9, 16), colour)]:
        pillow_heif.from_pillow(flat).save(tmp_path / name, quality=-1, color_primaries=primaries, transfer_characteristics=transfer,
                                           matrix_coefficients=6, full_range_flag=1)  # lossless
        with Image.open(tmp_path / name) as image:
            assert image.info["nclx_profile"]["color_primaries"] == primaries and "icc_profile" not in image.info
        centre = np.array(load_framed(tmp_path / name, 16).image.getpixel((12, 8)))
        assert np.abs(centre - want).max() <= 2, (name, centre)
    # the primaries' codes alone (no coordinates) give the same profile's conversion
    coded = nclx_icc((("color_primaries", 12), ("transfer_characteristics", 13)))
    from sdtune.colour import in_srgb

    assert np.abs(np.array(in_srgb(flat, coded).getpixel((1, 1))) - expected).max() <= 2
    assert nclx_icc((("color_primaries", 1), ("transfer_characteristics", 13))) is None


def avif_with_nclx(path, image, primaries: int, transfer: int, **save) -> None:
    """An AVIF whose nclx box names other primaries and transfer than sRGB's, which PIL writes (its pixels as they are)."""
    import io
    import struct

    buffer = io.BytesIO()
    image.save(buffer, format="AVIF", quality=100, subsampling="4:4:4", **save)
    data = buffer.getvalue()
    at = data.index(b"colrnclx") + 8
    assert data[at : at + 4] in (struct.pack(">HH", 1, 13), struct.pack(">HH", 2, 2))  # BT.709 and sRGB's, or unspecified
    path.write_bytes(data[:at] + struct.pack(">HH", primaries, transfer) + data[at + 4 :])


def flat_colour_in_display_p3(tmp_path):
    """A flat colour, its image, a Display P3 profile, and that colour as sdtune reads it tagged P3 (in sRGB: other)."""
    from helpers import DISPLAY_P3, icc_profile

    from sdtune.data import load_framed

    colour = np.array([180, 120, 90])
    flat = Image.new("RGB", (40, 30), tuple(int(c) for c in colour))
    p3 = icc_profile("Display P3", *DISPLAY_P3)
    flat.save(tmp_path / "p3.png", icc_profile=p3)
    expected = np.array(load_framed(tmp_path / "p3.png", 16).image.getpixel((12, 8)))
    assert np.abs(expected - colour).max() > 5
    return colour, flat, p3, expected


def test_an_avif_described_by_an_nclx_box_in_display_p3_is_converted_to_srgb(tmp_path):
    """PIL's AVIF reader gives an AVIF's ICC profile but not its nclx box (H.273 codes): sdtune reads the primary image's
    from the file's boxes, as pillow-heif gives a HEIC's, and converts Display P3 as a profile would; sRGB's codes and HDR
    curves (PQ) stay as they are; an ICC profile beside the box is the one used."""
    from PIL import features

    if not features.check("avif"):
        pytest.skip("this Pillow reads no AVIF")
    from sdtune.colour import nclx_icc
    from sdtune.data import load_framed
    from sdtune.image_files import heif_nclx, image_facts

    colour, flat, p3, expected = flat_colour_in_display_p3(tmp_path)
    for name, (primaries, transfer), want, save in [("p3.avif", (12, 13), expected, {}), ("srgb.avif", (1, 13), colour, {}),
                                                    ("bt709.avif", (1, 1), colour, {}), ("pq.avif", (9, 16), colour, {}),
                                                    ("profiled.avif", (1, 13), expected, {"icc_profile": p3})]:
        avif_with_nclx(tmp_path / name, flat, primaries, transfer, **save)
        described = heif_nclx(tmp_path / name)
        assert (described["color_primaries"], described["transfer_characteristics"], described["full_range_flag"]) == (primaries, transfer, 1)
        profile = image_facts(tmp_path / name).colour_profile
        assert profile == (p3 if save else nclx_icc(tuple(sorted(described.items()))))
        assert (profile is None) == (name != "p3.avif" and not save)
        centre = np.array(load_framed(tmp_path / name, 16).image.getpixel((12, 8)))
        assert np.abs(centre - want).max() <= 3, (name, centre, want)
    assert heif_nclx(tmp_path / "p3.png") is None


def png_with_cicp(path, image, cicp: tuple, **save) -> None:
    """A PNG with a cICP chunk (PNG's third edition) after its header chunk, its checksum right; PIL writes none."""
    import io
    import struct
    import zlib

    buffer = io.BytesIO()
    image.save(buffer, format="PNG", **save)
    data, body = buffer.getvalue(), bytes(cicp)
    header_end = 8 + 8 + 13 + 4  # signature, then IHDR: length and type, 13 bytes, checksum
    chunk = struct.pack(">I", len(body)) + b"cICP" + body + struct.pack(">I", zlib.crc32(b"cICP" + body))
    path.write_bytes(data[:header_end] + chunk + data[header_end:])


def test_a_png_described_by_a_cicp_chunk_is_converted_to_srgb_over_its_icc_profile(tmp_path):
    """A PNG's cICP chunk (H.273 codes, as an nclx box) is read from its chunks, no pixel decoded, and stands in place of
    its ICC profile, as PNG's third edition says: Display P3 converted; sRGB's codes over a P3 profile leave the
    pixels as they are, as do HDR curves (PQ) and a chunk no PNG may hold (a matrix other than RGB's); narrow-range
    values (16 to 235) are stretched to 0 to 255."""
    from sdtune.colour import nclx_icc
    from sdtune.data import load_framed
    from sdtune.image_files import image_facts, png_cicp

    colour, flat, p3, expected = flat_colour_in_display_p3(tmp_path)
    narrow = Image.new("RGB", (40, 30), tuple(round(16 + c * 219 / 255) for c in colour))
    for name, image, cicp, want, save in [("cicp-p3.png", flat, (12, 13, 0, 1), expected, {}),
                                          ("cicp-srgb.png", flat, (1, 13, 0, 1), colour, {"icc_profile": p3}),
                                          ("cicp-pq.png", flat, (9, 16, 0, 1), colour, {}),
                                          ("cicp-yuv.png", flat, (12, 13, 6, 1), expected, {"icc_profile": p3}),
                                          ("cicp-narrow.png", narrow, (1, 13, 0, 0), colour, {}),
                                          ("cicp-p3-narrow.png", narrow, (12, 13, 0, 0), expected, {})]:
        png_with_cicp(tmp_path / name, image, cicp, **save)
        read = png_cicp(tmp_path / name)
        assert (read is None) == (name == "cicp-yuv.png")
        profile = image_facts(tmp_path / name).colour_profile
        if read is not None:
            assert tuple(read.values()) == cicp and profile == nclx_icc(tuple(sorted(read.items())))
        centre = np.array(load_framed(tmp_path / name, 16).image.getpixel((12, 8)))
        assert np.abs(centre - want).max() <= 2, (name, centre, want)
    assert png_cicp(tmp_path / "p3.png") is None


def test_cmyk_jpegs_are_converted_by_their_profile_and_their_polarity(tmp_path):
    """A print file's CMYK JPEG is converted by its ICC profile (a press's cyan is no screen's), else by PIL's formula.
    Adobe's software writes each CMYK value inverted and says so by its APP14 marker, as PIL assumes of every CMYK JPEG;
    one without the marker holds its values as they are and is not read as a negative."""
    import io

    from helpers import cmyk_profile
    from PIL import ImageChops, ImageCms

    from sdtune.data import load_framed

    def press(c, m, y, k):  # a press whose cyan is a deep blue
        return (5, 0, 0) if k else (max(10, 100 - 45 * c - 40 * m - 10 * y), 70 * m - 20 * c - 10 * y, 80 * y - 60 * c - 40 * m)

    profile = cmyk_profile("Test press", press)
    ink = Image.new("CMYK", (40, 30), (230, 20, 0, 10))  # mostly cyan
    srgb = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB"))
    by_profile = ImageCms.profileToProfile(ink, ImageCms.ImageCmsProfile(io.BytesIO(profile)), srgb, outputMode="RGB").getpixel((1, 1))
    by_formula = ink.convert("RGB").getpixel((1, 1))
    assert np.abs(np.array(by_profile) - by_formula).max() > 40
    ink.save(tmp_path / "profiled.jpg", icc_profile=profile, quality=100)
    ink.save(tmp_path / "adobe.jpg", quality=100)  # PIL writes Adobe's APP14 marker and inverted values, as Photoshop does

    def without_app14(data: bytes) -> bytes:
        start = data.index(b"\xff\xee")
        return data[:start] + data[start + 2 + int.from_bytes(data[start + 2 : start + 4], "big") :]

    buffer = io.BytesIO()
    ImageChops.invert(ink).save(buffer, format="JPEG", quality=100)  # PIL inverts as it writes: the values as they are
    (tmp_path / "plain.jpg").write_bytes(without_app14(buffer.getvalue()))
    with Image.open(tmp_path / "plain.jpg") as plain, Image.open(tmp_path / "adobe.jpg") as adobe:
        assert "adobe" not in plain.info and adobe.info["adobe"]
        assert np.abs(np.array(plain.getpixel((1, 1))) - (25, 235, 255, 245)).max() <= 3  # PIL's reading: a negative
    for name, want in [("profiled.jpg", by_profile), ("adobe.jpg", by_formula), ("plain.jpg", by_formula)]:
        centre = np.array(load_framed(tmp_path / name, 16).image.getpixel((8, 8)))
        assert np.abs(centre - want).max() <= 3, (name, centre, want)


def test_a_cameras_adobe_rgb_jpeg_without_a_profile_is_converted_by_its_exif(tmp_path):
    """A camera set to Adobe RGB embeds no ICC profile: its EXIF says "uncalibrated" and DCF's interoperability
    index R03 (the Adobe RGB option file). sdtune reads it as Adobe RGB; EXIF's sRGB, or uncalibrated alone, not."""
    from sdtune.data import load_framed

    colour = np.array([180, 120, 90])
    adobe = np.array([(0.60974, 0.31111, 0.01947), (0.20528, 0.62567, 0.06087), (0.14919, 0.06322, 0.74457)]).T
    srgb = np.array([(0.43607, 0.22249, 0.01392), (0.38515, 0.71687, 0.09708), (0.14307, 0.06061, 0.71410)]).T
    linear = np.linalg.solve(srgb, adobe @ (colour / 255) ** (563 / 256))  # Adobe RGB's gamma, then its primaries
    expected = np.where(linear <= 0.0031308, linear * 12.92, 1.055 * linear ** (1 / 2.4) - 0.055) * 255
    assert np.abs(expected - [199.5, 120.8, 87.9]).max() < 0.1
    flat = Image.new("RGB", (40, 30), tuple(int(c) for c in colour))
    for name, colour_space, index, orientation in [("_DSC0001.JPG", 0xFFFF, "R03", 1), ("_DSC0002.JPG", 0xFFFF, "R03", 6),
                                                   ("DSC0003.JPG", 1, "R98", 1), ("DSC0004.JPG", 0xFFFF, None, 1)]:
        exif = Image.Exif()
        exif[0x8769] = {0xA001: colour_space, **({0xA005: {0x0001: index}} if index else {})}
        exif[0x0112] = orientation
        flat.save(tmp_path / name, exif=exif, quality=100)
        centre = np.array(load_framed(tmp_path / name, 16).image.getpixel((8, 8)))
        want = expected if name.startswith("_") else colour  # DCF names Adobe RGB files with a leading underscore
        assert np.abs(centre - want).max() <= 2, (name, centre)


def test_a_corrupt_exif_block_is_named_once_with_its_file(tmp_path):
    import io
    import struct
    import warnings

    from sdtune.buckets import bucket_sizes
    from sdtune.data import load_framed_images, readable_images, warn_cropped_away

    buffer = io.BytesIO()
    Image.new("RGB", (80, 60), "blue").save(buffer, format="JPEG")
    exif = b"Exif\x00\x00MM\x00\x2a\x00\x00\x00\x08\xff\xff" + b"\x01" * 30  # 65535 entries promised, 30 bytes given
    segment = b"\xff\xe1" + struct.pack(">H", len(exif) + 2) + exif
    (tmp_path / "odd.jpg").write_bytes(buffer.getvalue()[:2] + segment + buffer.getvalue()[2:])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        paths = readable_images(list_images(tmp_path))
        warn_cropped_away(paths, [(1, 1)])  # reads the header again
        (framed,) = load_framed_images(paths, 64, bucket_sizes(64))
    assert framed.image.size == (72, 56)
    said = [str(w.message) for w in caught]
    assert len(said) == 1 and said[0].startswith("PIL finds odd data in odd.jpg (Corrupt EXIF data."), said


def odd_photo_folder(folder):
    """A folder of what a start may meet: every mode (`odd_images`), a phone photo stored turned, a P3 photo, a
    corrupt EXIF block, an animation, thumbnails, a JPEG over PIL's bomb limit (decoded at a fraction) and a PNG over
    it, a PNG cut short (found by its chunks), a BMP cut short (found only as it is decoded)."""
    import io
    import struct

    from helpers import DISPLAY_P3, icc_profile

    folder.mkdir()
    odd_images(folder)
    rng = np.random.default_rng(1)
    noise = Image.fromarray(rng.integers(0, 255, (90, 160, 3), dtype=np.uint8))
    exif = Image.Exif()
    exif[0x0112] = 6
    noise.save(folder / "IMG_0001.jpg", exif=exif, quality=90)
    noise.save(folder / "IMG_0002.png", icc_profile=icc_profile("Display P3", *DISPLAY_P3))
    buffer = io.BytesIO()
    noise.save(buffer, format="JPEG")
    corrupt = b"Exif\x00\x00MM\x00\x2a\x00\x00\x00\x08\xff\xff" + b"\x01" * 30
    (folder / "IMG_0003.jpg").write_bytes(buffer.getvalue()[:2] + b"\xff\xe1" + struct.pack(">H", len(corrupt) + 2) + corrupt
                                          + buffer.getvalue()[2:])
    frames = [Image.new("RGB", (80, 80), colour) for colour in ("red", "blue")]
    frames[0].save(folder / "moving.gif", save_all=True, append_images=frames[1:])
    Image.new("RGB", (30, 20), "green").save(folder / "thumb.jpg")
    noise.resize((200, 200)).save(folder / "large.jpg", quality=95)  # 40,000 pixels: over the limit the test sets
    noise.resize((200, 200)).save(folder / "large.png")
    noise.save(buffer := io.BytesIO(), format="PNG")
    (folder / "cut.png").write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    noise.save(folder / "cut.bmp")
    (folder / "cut.bmp").write_bytes((folder / "cut.bmp").read_bytes()[:20000])


def converting_slowly(monkeypatch) -> set[str]:
    """Each image converted after a random pause, so threads finish out of order, and warning as it is converted;
    returns the names of the threads that converted (filled as they do)."""
    import random
    import threading
    import time
    import warnings

    import sdtune.data

    threads_used, to_rgb, late = set(), sdtune.data.to_rgb, random.Random(0)

    def slow_to_rgb(image, *args):
        threads_used.add(threading.current_thread().name)
        time.sleep(late.uniform(0, 0.03))
        warnings.warn(f"converting a {image.mode} image", RuntimeWarning)
        return to_rgb(image, *args)

    monkeypatch.setattr(sdtune.data, "to_rgb", slow_to_rgb)
    return threads_used


def test_images_decode_on_threads_to_the_same_pixels_with_the_same_warnings_in_order(tmp_path, monkeypatch):
    """The start decodes its images on several threads: the same pixels bit for bit, and the same warnings, in the
    same order, as on one thread, whichever thread finishes first; PIL's own warnings kept quiet on every thread."""
    import threading
    import warnings

    from sdtune.buckets import bucket_sizes
    from sdtune.data import load_framed_images, readable_images

    odd_photo_folder(tmp_path / "photos")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 150 * 150)  # PIL refuses from twice it, 45,000 pixels
    threads_used = converting_slowly(monkeypatch)

    def start(threads: int):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            paths = readable_images(list_images(tmp_path / "photos"))
            framed = load_framed_images(paths, 64, bucket_sizes(64), threads=threads)
        return [np.asarray(each.image) for each in framed], [(w.category, str(w.message)) for w in caught]

    one_pixels, one_said = start(1)
    assert threads_used == {threading.current_thread().name}
    threads_used.clear()
    for threads in (4, 3):
        pixels, said = start(threads)
        assert said == one_said
        assert len(pixels) == len(one_pixels) and all(np.array_equal(a, b) for a, b in zip(pixels, one_pixels))
        assert len(threads_used) > 1 and threading.current_thread().name not in threads_used
    messages = [message for _, message in one_said]
    assert messages[0].startswith("PIL finds odd data in IMG_0003.jpg (Corrupt EXIF data")
    assert messages[1].startswith("skipping 2 files that are not readable images: ") and "cut.png (cut short" in messages[1]
    assert "large.png (over PIL's decompression-bomb limit" in messages[1]
    converted = [index for index, message in enumerate(messages) if message.startswith("converting")]
    assert converted == [2, 3, 4, 5] + list(range(7, 15))  # the twelve read, in name order, and cut.bmp between
    assert messages[6].startswith("skipping ") and "cut.bmp: not a readable image" in messages[6]
    assert [one_said[i][0] for i in converted] == [RuntimeWarning] * 12
    assert messages[15:] == ["moving.gif has 2 frames: the first is used",
                             "2 images are smaller than the size they are trained at, and upscaled: thumb.jpg (30x20), tiny.webp (20x12)"]


def test_bucketed_class_images_decode_on_threads_to_the_same_examples_with_the_same_warnings_in_order(tmp_path, monkeypatch):
    """Prior preservation's class images, framed into the concept images' buckets (`prior.bucketed_class_images`),
    decode on threads as the concept images do: the same examples in the same pools, bit for bit, and the same
    warnings in the same order, as on one thread, whichever thread finishes first."""
    import threading
    import warnings

    from sdtune.buckets import bucket_sizes, nearest_bucket
    from sdtune.data import readable_images
    from sdtune.prior import bucketed_class_images

    odd_photo_folder(tmp_path / "photos")
    (tmp_path / "photos" / "broken.png").write_bytes(b"not an image")  # its header unreadable: named in its place
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 150 * 150)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        paths = readable_images(list_images(tmp_path / "photos")) + [tmp_path / "photos" / "broken.png"]
    paths.sort()
    square, wide, tall = (64, 64), nearest_bucket(160, 90, bucket_sizes(64)), nearest_bucket(90, 160, bucket_sizes(64))
    threads_used = converting_slowly(monkeypatch)

    def start(threads: int):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            framed, pools = bucketed_class_images(paths, 64, [square, wide, tall, square], 3, threads=threads)
        return ([(np.asarray(each.image), each.original_size, each.crop_top_left) for each in framed], pools,
                [(w.category, str(w.message)) for w in caught])

    one_examples, one_pools, one_said = start(1)
    assert threads_used == {threading.current_thread().name}
    assert sorted(one_pools) == sorted([square, wide, tall])
    for threads in (4, 3):
        threads_used.clear()
        examples, pools, said = start(threads)
        assert said == one_said and pools == one_pools
        assert len(examples) == len(one_examples)
        for (pixels, size, crop), (one_pixels, one_size, one_crop) in zip(examples, one_examples):
            assert np.array_equal(pixels, one_pixels) and (size, crop) == (one_size, one_crop)
        assert len(threads_used) > 1 and threading.current_thread().name not in threads_used
    messages = [message for _, message in one_said]
    skipped = [index for index, message in enumerate(messages) if message.startswith("skipping class image")]
    assert [messages[i].split(":")[0] for i in skipped] == [f"skipping class image {tmp_path / 'photos' / name}"
                                                           for name in ("broken.png", "cut.bmp")]
    converted = [index for index, message in enumerate(messages) if message.startswith("converting")]
    assert converted[0] < skipped[0] < skipped[1] < converted[-1]  # each in its file's place
    assert len(one_examples) > len(converted)  # some decoded once, framed into two buckets
    assert messages[-3:-1] == ["class image moving.gif has 2 frames: the first is used",  # not taken for a concept image
                               "2 class images are smaller than the size they are trained at, and upscaled: thumb.jpg (30x20), "
                               "tiny.webp (20x12)"]
    assert messages[-1].endswith("are of a shape that no bucket of concept images draws from: unused")


def test_warnings_on_decoding_threads_name_settings_as_the_call_on_the_main_thread_does():
    """A decoding thread's warning, raised inside a Python call (`config.python_spelling`), names settings as Python
    spells them, as the main thread's would; inside the CLI's block, flags."""
    import warnings

    from sdtune.config import python_spelling, spelled_as_flags
    from sdtune.errors import warn, warn_again
    from sdtune.image_files import in_threads

    def warned(threads: int) -> list[str]:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for _, _, said in in_threads(lambda steps: warn(f"--steps {steps} is few"), [1, 2, 3], threads):
                warn_again(said)
        return [str(w.message) for w in caught]

    for threads in (1, 3):
        with python_spelling("train"):
            assert warned(threads) == ["steps=1 is few", "steps=2 is few", "steps=3 is few"]
        with spelled_as_flags():
            assert warned(threads) == ["--steps 1 is few", "--steps 2 is few", "--steps 3 is few"]


def test_an_error_that_is_no_files_fault_stops_the_threads_after_the_warnings_before_it(tmp_path, monkeypatch):
    import warnings

    import sdtune.data
    from sdtune.data import load_framed_images

    for index in range(6):
        Image.new("RGB", (20 + index, 20)).save(tmp_path / f"{index}.png")
    load_framed = sdtune.data.load_framed

    def failing(path, *args):
        if path.name == "3.png":
            raise MemoryError("no room for 3.png")
        return load_framed(path, *args)

    monkeypatch.setattr(sdtune.data, "load_framed", failing)
    with warnings.catch_warnings(record=True) as caught, pytest.raises(MemoryError, match="3.png"):
        warnings.simplefilter("always")
        load_framed_images(sorted(tmp_path.glob("*.png")), 64, threads=3)
    assert caught == []  # the small images' note comes at the end, which it does not reach


def test_images_are_decoded_on_the_cores_the_process_may_use_at_most_eight(monkeypatch):
    import os

    from sdtune.image_files import DECODE_THREADS_MAX, decode_threads

    for cores, threads in [({0}, 1), ({2, 5}, 2), (set(range(64)), DECODE_THREADS_MAX)]:
        monkeypatch.setattr(os, "sched_getaffinity", lambda pid, cores=cores: cores)
        assert decode_threads() == threads


def test_an_image_smaller_than_its_frame_is_named_once_before_the_model_loads(tmp_path, monkeypatch):
    """A 1x1 (or thumbnail) concept image is named as the run is planned, a dry run too, in the words loading
    used, and not again as the images load; with buckets too."""
    import warnings

    from typer.testing import CliRunner

    from sdtune import models
    from sdtune.cli import app
    from sdtune.config import TrainConfig
    from sdtune.training import plan_run, train

    folder = tmp_path / "photos"
    folder.mkdir()
    for index in range(3):
        Image.fromarray(np.random.default_rng(index).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(folder / f"p{index}.png")
    Image.new("RGB", (1, 1), "red").save(folder / "dot.png")
    said = "dot.png is 1x1, smaller than 64px: upscaled"

    def upscaled(caught) -> list[str]:
        return [str(w.message) for w in caught if "upscaled" in str(w.message)]

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = CliRunner().invoke(app, ["train", "--model", "tiny-random", "--images", str(folder), "--resolution", "64",
                                          "--dry-run", "--output", str(tmp_path / "dry")])
    assert result.exit_code == 0, result.output
    assert upscaled(caught) == [said]
    loaded = []
    monkeypatch.setattr(models, "load_pipeline", lambda *args, real=models.load_pipeline: loaded.append(1) or real(*args))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train(TrainConfig(model="tiny-random", images=str(folder), resolution=64, steps=1, log_with="none",
                          output=str(tmp_path / "run")), progress=False)
    assert upscaled(caught) == [said] and loaded == [1]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        plan_run(TrainConfig(model="tiny-random", images=str(folder), resolution=64, buckets=True, output=str(tmp_path / "b")))
    assert upscaled(caught) == [said]  # its bucket: the 64x64 square


def test_small_held_out_and_class_images_are_named_as_such_once_before_the_model_loads(tmp_path, monkeypatch):
    """Held out for the validation loss (framed square without buckets) or given as class images, an image smaller
    than the resolution is named as what it is as the run is planned, a dry run too, and not again as it loads."""
    import warnings

    from typer.testing import CliRunner

    from sdtune import models
    from sdtune.cli import app
    from sdtune.config import TrainConfig
    from sdtune.training import train

    folder, class_images = tmp_path / "photos", tmp_path / "class"
    folder.mkdir()
    class_images.mkdir()
    for index in range(4):  # all small: whichever is held out is
        Image.fromarray(np.random.default_rng(index).integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(folder / f"p{index}.png")
    Image.new("RGB", (20, 30), "green").save(class_images / "thumb.png")
    Image.new("RGB", (64, 64), "blue").save(class_images / "large.png")
    settings = dict(validate_every=1, validation_images=1, class_images=str(class_images), class_prompt="a photo")

    def upscaled(caught) -> list[str]:
        return [str(w.message) for w in caught if "upscaled" in str(w.message)]

    def expected(said: list[str]) -> None:
        held = [message for message in said if message.startswith("held-out image ")]
        assert len(held) == 1 and held[0].endswith("is 40x40, smaller than 64px: upscaled"), said
        assert "class image thumb.png is 20x30, smaller than 64px: upscaled" in said, said
        assert "3 images are smaller than the size they are trained at, and upscaled: " in " ".join(said), said
        assert len(said) == 3, said

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = CliRunner().invoke(app, ["train", "--model", "tiny-random", "--images", str(folder), "--resolution", "64",
                                          "--validate-every", "1", "--validation-images", "1",
                                          "--class-images", str(class_images), "--class-prompt", "a photo",
                                          "--dry-run", "--output", str(tmp_path / "dry")])
    assert result.exit_code == 0, result.output
    expected(upscaled(caught))
    said_at_load = []
    monkeypatch.setattr(models, "load_pipeline", lambda *args, real=models.load_pipeline: said_at_load.append(len(upscaled(caught))) or real(*args))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train(TrainConfig(model="tiny-random", images=str(folder), resolution=64, steps=1, log_with="none",
                          output=str(tmp_path / "run"), **settings), progress=False)
    expected(upscaled(caught))
    assert said_at_load == [3]
