"""Reliability: bad input, hostile files and full disks end in a one-line error, never a crash.

Sections (one class each): training images, prompts, settings and model folders, hostile adapter
files, output folders and full disks, and runs that are killed, diverge or meet another run.
"""

from __future__ import annotations

import errno
import io
import json
import os
import pickle
import random
import re
import shutil
import signal
import struct
import subprocess
import sys
import time
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from test_cli import assert_one_line_error, invoke

from sdtune.errors import SdtuneError, TrainingFailed

ROOT = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------------------------
# Helpers that craft hostile files


def png_header_only(width: int, height: int) -> bytes:
    """A PNG that declares `width` x `height` RGB pixels but holds almost no data (a few hundred bytes)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(bytes(1000))) + chunk(b"IEND", b"")


class RunsCode:
    """Unpickling this creates `marker`: proof that a file was unpickled, which must never happen."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def split_safetensors(data: bytes) -> tuple[dict, bytes]:
    (length,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8 : 8 + length]), data[8 + length :]


def join_safetensors(header: dict, body: bytes) -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + body


def good_images(folder: Path, count: int = 3) -> None:
    rng = np.random.default_rng(1)
    for k in range(count):
        Image.fromarray(rng.integers(0, 255, (72, 72, 3), dtype=np.uint8)).save(folder / f"good{k}.png")


# ---------------------------------------------------------------------------------------------
# Training images


class TestImages:
    def test_bad_files_are_skipped_and_odd_ones_converted_in_a_training_run(self, tmp_path, private_cache):
        images = tmp_path / "images"
        images.mkdir()
        good_images(images)
        (images / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
        (images / "bomb.png").write_bytes(png_header_only(20000, 20000))
        Image.new("CMYK", (70, 90), (0, 80, 160, 0)).save(images / "cmyk.jpg")
        Image.new("RGB", (16, 24), "blue").save(images / "small.png")
        with pytest.warns(UserWarning) as record:
            result = invoke("train", "--model", "tiny-random", "--steps", 1, "--images", images, "--output", tmp_path / "run")
        assert result.exit_code == 0, result.output
        messages = [str(w.message) for w in record]
        assert any("skipping" in m and "broken.jpg" in m for m in messages), messages
        assert any("bomb.png" in m and "decompression-bomb limit" in m for m in messages), messages
        assert any("small.png is 16x24, smaller than 64px: upscaled" in m for m in messages), messages
        assert not any("cmyk" in m for m in messages), messages

    def test_a_folder_of_only_unreadable_images_is_one_line_exit_2(self, tmp_path):
        (tmp_path / "bomb.png").write_bytes(png_header_only(20000, 20000))
        (tmp_path / "cut.png").write_bytes(png_header_only(64, 64)[:40])
        with pytest.warns(UserWarning, match="skipping"):
            result = invoke("train", "--model", "tiny-random", "--images", tmp_path, "--output", tmp_path / "run")
        assert_one_line_error(result, 2, "no readable images")

    def test_decompression_bomb_is_refused_without_allocating_it(self, tmp_path):
        """Loading runs under a 1 GiB address-space limit: decoding 20000x20000 RGB would need 1.2 GB."""
        (tmp_path / "bomb.png").write_bytes(png_header_only(20000, 20000))
        (tmp_path / "big.png").write_bytes(png_header_only(10000, 10000))  # between PIL's warning and its error
        # a 90-megapixel JPEG, just over the limit: read at 1/8 of its size (PIL's draft), within the 1 GiB
        Image.new("L", (9500, 9500), 200).save(tmp_path / "large.jpg", quality=50)
        Image.new("RGB", (64, 64), "red").save(tmp_path / "good.png")
        code = f"""
import resource, warnings
resource.setrlimit(resource.RLIMIT_AS, (2**30, 2**30))
from PIL import Image
from sdtune.data import list_images, load_images
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    images = load_images(list_images({str(tmp_path)!r}), 64)
assert Image.MAX_IMAGE_PIXELS is not None
skipped = sorted(str(w.message).split(":")[0] for w in caught if "decompression-bomb" in str(w.message))
print(len(images), skipped)
"""
        result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120, check=False)
        assert result.returncode == 0, result.stderr[-2000:]
        bomb, big = tmp_path / "bomb.png", tmp_path / "big.png"
        assert result.stdout.strip() == f"2 {[f'skipping {big}', f'skipping {bomb}']}"

    @pytest.mark.parametrize(
        "mode,extension",
        [("1", "png"), ("LA", "png"), ("I", "tif"), ("F", "tif"), ("CMYK", "tif"), ("P+transparency", "png"), ("I;16B", "tif")],
    )
    def test_more_image_modes_become_rgb(self, tmp_path, mode, extension):
        rng = np.random.default_rng(2)
        base = Image.fromarray(rng.integers(0, 255, (70, 70, 3), dtype=np.uint8))
        if mode == "P+transparency":
            image = base.convert("P")
            image.info["transparency"] = 0
        elif mode in ("I", "F", "I;16B"):
            image = Image.fromarray(rng.integers(0, 30000, (70, 70)).astype(np.int32)).convert(mode)
        else:
            image = base.convert(mode)
        image.save(tmp_path / f"odd.{extension}")
        from sdtune.data import list_images, load_images

        (loaded,) = load_images(list_images(tmp_path), 64)
        assert loaded.mode == "RGB" and loaded.size == (64, 64)
        assert np.asarray(loaded).std() > 0, "the picture survives the conversion"

    def test_damaged_files_of_every_format_never_escape_as_crashes(self, tmp_path):
        """Truncations and flipped bytes in each format: an image or a skip, never another exception."""
        from sdtune.data import load_images

        rng = np.random.default_rng(3)
        picture = Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8))
        shuffle = random.Random(4)
        for fmt, extension in [("PNG", "png"), ("JPEG", "jpg"), ("WEBP", "webp"), ("TIFF", "tif"), ("BMP", "bmp"), ("GIF", "gif")]:
            buffer = io.BytesIO()
            picture.save(buffer, format=fmt)
            data = buffer.getvalue()
            for trial in range(24):
                damaged = bytearray(data)
                if trial % 2:
                    damaged = damaged[: shuffle.randrange(1, len(damaged))]
                else:
                    for _ in range(shuffle.randrange(1, 6)):
                        damaged[shuffle.randrange(len(damaged))] = shuffle.randrange(256)
                path = tmp_path / f"damaged.{extension}"
                path.write_bytes(bytes(damaged))
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # skips are warnings; this test is about exceptions
                    try:
                        load_images([path], 32)
                    except SdtuneError:
                        pass


# ---------------------------------------------------------------------------------------------
# Prompts

LONG_PROMPT = "photo of a <castle> " + "by the lake with snow on the mountains " * 12


class TestPrompts:
    def test_byte_order_mark_is_not_part_of_the_first_prompt(self, tmp_path):
        from sdtune.data import read_prompt_file

        path = tmp_path / "bom.txt"
        path.write_bytes("photo of a <castle>.\nsecond\n".encode("utf-8-sig"))
        assert read_prompt_file(path) == ["photo of a <castle>.", "second"]

    # UTF-16 without its byte-order mark (with it, it is read); Latin-1
    @pytest.mark.parametrize("content", ["photo of a <castle>\n".encode("utf-16-le"), b"caf\xe9 <castle>\n"])
    def test_prompt_file_in_another_encoding_is_one_line_exit_2(self, tmp_path, content):
        path = tmp_path / "prompts.txt"
        path.write_bytes(content)
        result = invoke("sample", "--model", "tiny-random", "--prompts", path, "--output", tmp_path / "out")
        assert_one_line_error(result, 2, "not UTF-8 text")
        assert not (tmp_path / "out").exists()

    def test_long_prompt_is_truncated_with_a_warning_when_sampling(self, tmp_path, private_cache):
        with pytest.warns(UserWarning, match=r"tokens, over the text encoder's 77: truncated") as record:
            result = invoke(
                "sample", "--model", "tiny-random", "--prompt", LONG_PROMPT, "--prompt", "a short one",
                "--num-images", 1, "--steps", 1, "--output", tmp_path,
            )
        assert result.exit_code == 0, result.output
        truncated = [str(w.message) for w in record if "truncated" in str(w.message)]
        assert len(truncated) == 1 and "photo of a castle by the lake" in truncated[0]
        assert "mountains" in truncated[0].split("truncated, ")[1], "the warning shows what is dropped"

    def test_a_long_negative_prompt_is_named_as_a_prompt_is(self, tmp_path, private_cache):
        with pytest.warns(UserWarning, match=r"tokens, over the text encoder's 77: truncated") as record:
            result = invoke("sample", "--model", "tiny-random", "--prompt", "a short one", "--negative-prompt", LONG_PROMPT,
                            "--num-images", 1, "--steps", 1, "--output", tmp_path)
        assert result.exit_code == 0, result.output
        assert any("photo of a castle by the lake" in str(w.message) for w in record)

    def test_long_training_prompt_is_truncated_with_a_warning(self, tmp_path, private_cache):
        template = "{token} " + "by the lake with snow on the mountains " * 12
        with pytest.warns(UserWarning, match=r"tokens, over the text encoder's 77: truncated"):
            result = invoke("train", "--model", "tiny-random", "--steps", 1, "--template", template, "--output", tmp_path / "run")
        assert result.exit_code == 0, result.output

    def test_prompts_that_fit_give_no_warning(self, tiny_pipe):
        from sdtune.data import warn_truncated_prompts

        words = "lake " * 75  # one token each, plus the start and end tokens: exactly 77
        assert len(tiny_pipe.tokenizer(words).input_ids) == 77
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            warn_truncated_prompts(tiny_pipe.tokenizer, 75, [words, "a castle"])
        with pytest.warns(UserWarning, match="78 tokens.*'lake' is not read"):
            warn_truncated_prompts(tiny_pipe.tokenizer, 75, [words + "lake"])
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            warn_truncated_prompts(tiny_pipe.tokenizer, 75, [words + "lake", "a castle", words + "lake lake", words + "snow"])
        assert len(caught) == 1, "one warning, however many captions are long"
        assert str(caught[0].message).endswith("'lake' is not read; and 2 more prompt(s) over 77 tokens, truncated alike; "
                                               "--max-token-length 225 reads up to 227 (in chunks of 75)")
        with warnings.catch_warnings():  # read in two chunks of 75, 152 tokens with the start and end
            warnings.simplefilter("error")
            warn_truncated_prompts(tiny_pipe.tokenizer, 150, [words + "lake", words + words])
        with pytest.warns(UserWarning, match="153 tokens, over the text encoder's 152"):
            warn_truncated_prompts(tiny_pipe.tokenizer, 150, [words + words + "lake"])


# ---------------------------------------------------------------------------------------------
# Settings and model folders


class TestSettings:
    @pytest.mark.parametrize(
        "args,pattern",
        [
            (("--batch-size", 0), "--batch-size must be at least 1"),
            (("--batch-size", -2), "--batch-size must be at least 1"),
            (("--steps", -5), "--steps must be at least 1"),
            (("--lr", 0), "--lr must be positive"),
            (("--lr", "inf"), "--lr must be positive and finite"),
            (("--lr", "nan"), "--lr must be positive and finite"),
            (("--seed", -1), "--seed must be between 0 and"),
            (("--resolution", 60), "--resolution must be a positive multiple of 8"),
            (("--save-every", -1), "--save-every must be 0 or more"),
            (("--keep-saves", -1), "--keep-saves must be 0 (keep all) or more"),
            (("--keep-saves", 2), "--keep-saves needs --save-every"),
            (("--mixed-precision", "fp8"), "--mixed-precision must be one of"),
            (("--template", "no token here"), "--template must contain {token}"),
            (("--concept", "../etc"), "--concept must be a plain name"),
            (("--atoms-m", 0), "--atoms-m must be an integer of at least 1"),
            (("--option", "m=nine"), "--atoms-m must be an integer"),
            (("--option", "novalue"), "--option takes KEY=VALUE"),
            (("--rank", 4), "--rank applies to --method lora/loha/lokr"),
        ],
    )
    def test_bad_train_flags_are_one_line_exit_2(self, tmp_path, args, pattern):
        result = invoke("train", "--model", "tiny-random", "--output", tmp_path / "run", *args)
        assert_one_line_error(result, 2, pattern)
        assert not (tmp_path / "run").exists(), "nothing is written before the settings are checked"

    @pytest.mark.parametrize(
        "args,pattern",
        [
            (("--num-images", 0), "--num-images must be at least 1"),
            (("--steps", -1), "--steps must be at least 1"),
            (("--guidance", "nan"), "--guidance must be a finite number"),
            (("--seed", -3), "--seed must be between 0 and"),
            (("--resolution", 4), "--resolution must be a positive multiple of 8"),
        ],
    )
    def test_bad_sample_flags_are_one_line_exit_2(self, tmp_path, args, pattern):
        result = invoke("sample", "--model", "tiny-random", "--prompt", "x", "--output", tmp_path / "out", *args)
        assert_one_line_error(result, 2, pattern)

    @pytest.mark.parametrize(
        "toml,pattern",
        [
            ('steps = "ten"\n', "setting steps must be a whole number, got 'ten'"),
            ("steps = 2.5\n", "setting steps must be a whole number, got 2.5"),
            ("steps = true\n", "setting steps must be a whole number, got True"),
            ("lr = true\n", "setting lr must be a number, got True"),
            ("options = 3\n", "setting options must be a table, got 3"),
            ("images = 5\n", "setting images must be text or a list of text, got 5"),
            ("[train]\nsteps = 3\n", "unknown setting(s)"),
            ("lr = inf\n", "--lr must be positive and finite"),
            ("[options]\nm = 3\nrank = 4\n", "has no option(s) rank"),
            ('[options]\nm = "nine"\n', "--atoms-m must be an integer"),
            ("steps = \n", "not valid TOML"),
        ],
    )
    def test_bad_toml_config_is_one_line_exit_2(self, tmp_path, toml, pattern):
        config = tmp_path / "run.toml"
        config.write_text(toml)
        result = invoke("train", "--model", "tiny-random", "--config", config, "--output", tmp_path / "run")
        assert_one_line_error(result, 2, pattern)

    def test_toml_numbers_are_accepted_as_their_field_types(self, tmp_path):
        from sdtune.config import TrainConfig

        config = tmp_path / "run.toml"
        config.write_text("lr = 1\nsteps = 3\n[options]\nm = 4\n")
        loaded = TrainConfig.load(config)
        assert loaded.lr == 1.0 and isinstance(loaded.lr, float) and loaded.options == {"m": 4}

    def test_non_utf8_toml_config_is_one_line_exit_2(self, tmp_path):
        config = tmp_path / "run.toml"
        config.write_bytes(b'template = "caf\xe9 {token}"\n')
        assert_one_line_error(invoke("train", "--config", config), 2, "not valid TOML")

    @pytest.mark.parametrize("damage", ["missing unet", "pickled unet", "truncated unet", "no model_index.json"])
    def test_broken_model_folder_is_one_line_exit_2(self, tiny_path, tmp_path, damage):
        folder = tmp_path / "model"
        shutil.copytree(tiny_path, folder)
        weights = folder / "unet" / "diffusion_pytorch_model.safetensors"
        marker = tmp_path / "unpickled"
        if damage == "missing unet":
            shutil.rmtree(folder / "unet")
            pattern = "lacks component(s) unet"
        elif damage == "pickled unet":
            weights.unlink()
            (folder / "unet" / "diffusion_pytorch_model.bin").write_bytes(pickle.dumps(RunsCode(marker)))
            pattern = "unet/ holds only pickled weights (diffusion_pytorch_model.bin)"
        elif damage == "truncated unet":
            weights.write_bytes(weights.read_bytes()[:5000])
            pattern = "could not load the folder"
        else:
            (folder / "model_index.json").unlink()
            pattern = "not a diffusers pipeline folder"
        result = invoke("sample", "--model", folder, "--prompt", "x", "--steps", 1, "--output", tmp_path / "out")
        assert_one_line_error(result, 2, pattern)
        assert not marker.exists()


# ---------------------------------------------------------------------------------------------
# Hostile adapter files


@pytest.fixture(scope="module")
def adapter_file(tmp_path_factory, private_cache):
    """A valid atoms adapter on the tiny model, with non-zero updates, written by the library."""
    import torch

    from sdtune import methods
    from sdtune.adapter import save_adapter
    from sdtune.models import load_pipeline

    method = methods.create("atoms")
    method.inject(load_pipeline("tiny-random").unet)
    with torch.no_grad():
        for parameter in method.trainable_parameters():
            parameter.normal_(0, 0.01)
    path = tmp_path_factory.mktemp("adapter") / "adapter.safetensors"
    return save_adapter(path, method, "tiny-random", placeholder="<castle>", token="sks castle")


def _first_delta(tensors: dict) -> str:
    return next(key for key in sorted(tensors) if key.endswith("delta_atoms"))


def _edit_tensors(edit):
    """A hostile file written by safetensors itself: valid format, wrong content."""

    def rewrite(data: bytes) -> bytes:
        from safetensors.torch import load, save

        header, _ = split_safetensors(data)
        tensors = load(data)
        edit(tensors)
        return save(tensors, metadata=header["__metadata__"])

    return rewrite


def _edit_header(edit):
    def rewrite(data: bytes) -> bytes:
        header, body = split_safetensors(data)
        edit(header)
        return join_safetensors(header, body)

    return rewrite


def _edit_metadata(key, value):
    return _edit_header(lambda header: header["__metadata__"].__setitem__(key, value))


def _huge_shape(header):
    name = min(k for k in header if k != "__metadata__")
    header[name]["shape"] = [10**6, 10**6]  # 10^12 elements; the body holds a few bytes


def _relabel(dtype):
    def edit(header):
        name = min(k for k in header if k != "__metadata__")
        header[name]["dtype"] = dtype  # same byte size as F32, so the offsets still add up

    return edit


def _overlap(header):
    first, second = sorted((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"])[:2]
    header[second]["data_offsets"] = header[first]["data_offsets"]


HOSTILE_ADAPTERS = {
    "huge declared shape": (_edit_header(_huge_shape), "declares shape (1000000, 1000000) (4,000,000,000,000 bytes)"),
    "int32 tensor": (_edit_header(_relabel("I32")), "is I32; adapters hold BF16, F16, F32 tensors"),
    "float64 tensor": (_edit_tensors(lambda t: t.update({_first_delta(t): t[_first_delta(t)].double()})), "is F64"),
    "int64 tensor": (_edit_tensors(lambda t: t.update({_first_delta(t): t[_first_delta(t)].long()})), "is I64"),
    "extra tensor": (_edit_tensors(lambda t: t.update({"no_such_layer.delta_atoms": t[_first_delta(t)].clone()})), "1 unexpected (no_such_layer"),
    "missing tensor": (_edit_tensors(lambda t: t.pop(_first_delta(t))), "1 tensor(s) missing"),
    "wrong shape": (_edit_tensors(lambda t: t.update({_first_delta(t): t[_first_delta(t)][:4]})), "has shape (4, 3, 3), the model needs (9, 3, 3)"),
    "NaN values": (_edit_tensors(lambda t: t[_first_delta(t)].view(-1).__setitem__(0, float("nan"))), "holds NaN or infinite values"),
    "header not JSON": (lambda data: struct.pack("<Q", 10) + b"{not json}" + data[8:], "the header is not JSON"),
    "header length past the end": (lambda data: struct.pack("<Q", 10**15) + data[8:], "header of 1000000000000000 bytes"),
    "shorter than 8 bytes": (lambda data: data[:5], "shorter than the 8-byte header length"),
    "truncated body": (lambda data: data[:-100], "the file is cut short"),
    "deeply nested header": (lambda data: struct.pack("<Q", 200_000) + b"[" * 100_000 + b"]" * 100_000, "the header is not JSON"),
    "overlapping tensors": (_edit_header(_overlap), "overlaps or leaves gaps"),
    "metadata not strings": (_edit_metadata("method", 7), "its metadata is not a table of strings"),
    "metadata missing keys": (_edit_header(lambda h: h["__metadata__"].pop("structure")), "no structure"),
    "method not in the registry": (_edit_metadata("method", "dora"), "made with method 'dora', which this sdtune does not have"),
    "options not JSON": (_edit_metadata("options", "{m: 9"), "damaged sdtune adapter metadata"),
    "options not an object": (_edit_metadata("options", "[9]"), "options are not a JSON object"),
    "unexpected option": (_edit_metadata("options", '{"m": 9, "rank": 4}'), "has no option(s) rank"),
    "option of the wrong type": (_edit_metadata("options", '{"m": "nine"}'), "--atoms-m must be an integer"),
    "options that change the shapes": (_edit_metadata("options", '{"m": 4}'), "tensor conv_in.atoms has shape (9, 9), the model needs (4, 9)"),
    "another method's tensors": (
        _edit_header(lambda h: h["__metadata__"].update(method="lora", options="{}")), "450 tensor(s) missing (conv_in.lora_A.weight, …), 104 unexpected"
    ),
    "weight sample not base64": (_edit_metadata("weight_sample", "%%%"), "damaged sdtune adapter metadata"),
    "weight sample of odd length": (_edit_metadata("weight_sample", "AAAA"), "weight_sample is not float32 values"),
    "not an sdtune file": (_edit_header(lambda h: h.__setitem__("__metadata__", {"format": "pt"})), "not an sdtune adapter"),
    "pickle named .safetensors": (lambda data: pickle.dumps({"a": 1}), "not a valid safetensors file"),
}


class TestHostileAdapters:
    @pytest.mark.parametrize("case", list(HOSTILE_ADAPTERS))
    def test_hostile_adapter_is_one_line_exit_2(self, adapter_file, tmp_path, case):
        make, pattern = HOSTILE_ADAPTERS[case]
        hostile = tmp_path / "adapter.safetensors"
        hostile.write_bytes(make(adapter_file.read_bytes()))
        result = invoke("sample", "--adapter", hostile, "--prompt", "x", "--steps", 1, "--output", tmp_path / "out")
        assert_one_line_error(result, 2, pattern)
        assert not (tmp_path / "out" / "grid.png").exists()

    def test_the_untouched_adapter_loads(self, adapter_file, tiny_pipe):
        from sdtune.adapter import load_adapter

        method = load_adapter(adapter_file, tiny_pipe, merge=False)
        assert method.num_parameters() == 52 * 9 * 9

    @pytest.mark.parametrize("case", ["wrong shape", "extra tensor", "options that change the shapes", "NaN values"])
    def test_a_refused_adapter_leaves_the_model_untouched(self, adapter_file, tiny_pipe, tmp_path, case):
        from sdtune.adapter import load_adapter

        hostile = tmp_path / "adapter.safetensors"
        hostile.write_bytes(HOSTILE_ADAPTERS[case][0](adapter_file.read_bytes()))
        before = [(name, type(module)) for name, module in tiny_pipe.unet.named_modules()]
        with pytest.raises(SdtuneError):
            load_adapter(hostile, tiny_pipe)
        assert [(name, type(module)) for name, module in tiny_pipe.unet.named_modules()] == before

    @pytest.mark.parametrize("suffix", [".bin", ".pt", ".ckpt", ".pth"])
    def test_pickle_adapter_is_refused_without_unpickling(self, tmp_path, suffix):
        marker = tmp_path / "unpickled"
        hostile = tmp_path / f"adapter{suffix}"
        hostile.write_bytes(pickle.dumps(RunsCode(marker)))
        result = invoke("sample", "--adapter", hostile, "--prompt", "x", "--output", tmp_path / "out")
        assert_one_line_error(result, 2, f"{suffix} files are pickles, which can run code when loaded")
        assert not marker.exists()
        pickle.loads(hostile.read_bytes())  # the control: unpickling the file does run its code
        assert marker.exists()

    def test_no_pickle_loading_anywhere_in_the_package(self):
        """Every file sdtune reads is safetensors, JSON, TOML or an image: no pickle, no unsafe torch.load."""
        for path in sorted((ROOT / "sdtune").rglob("*.py")):
            source = path.read_text()
            assert not re.search(r"^\s*(import|from)\s+(pickle|dill|cloudpickle|joblib)\b", source, re.MULTILINE), path
            for call in re.findall(r"torch\.load\([^)]*\)", source):
                assert "weights_only=True" in call, f"{path}: {call}"
            assert "weights_only=False" not in source, path


# ---------------------------------------------------------------------------------------------
# Output folders and full disks


def _fail_with_disk_full_after(calls_that_succeed: int, write, counts=lambda target: True):
    """A writer that works `calls_that_succeed` times (calls to targets `counts` picks; others always work), then
    writes half a file and fails as a full disk does."""
    state = {"calls": 0}

    def writer(obj, target, *args, **kwargs):
        state["calls"] += counts(target)
        if counts(target) and state["calls"] > calls_that_succeed:
            Path(target).write_bytes(b"\0" * 100)
            raise OSError(errno.ENOSPC, "No space left on device")
        return write(obj, target, *args, **kwargs)

    return writer


class TestOutputFolders:
    @pytest.mark.parametrize("command", ["train", "sample"])
    def test_unwritable_output_folder_fails_before_any_work(self, tmp_path, command):
        blocker = tmp_path / "a-file"
        blocker.write_text("x")
        args = ("--prompt", "x") if command == "sample" else ()
        result = invoke(command, "--model", "tiny-random", "--output", blocker / "run", *args)
        assert_one_line_error(result, 2, "cannot write to output folder")

    def test_too_little_free_space_fails_before_training(self, tmp_path, monkeypatch, tiny_path):
        import sdtune.fileio

        usage = shutil.disk_usage(tmp_path)
        monkeypatch.setattr(sdtune.fileio.shutil, "disk_usage", lambda _: usage._replace(free=1000))
        result = invoke("train", "--model", "tiny-random", "--steps", 1, "--output", tmp_path / "run")
        assert_one_line_error(result, 2, "has 0.0 MB free; this run needs about 0.1 MB")
        assert not (tmp_path / "run" / "metrics.jsonl").exists()

    def test_disk_full_while_saving_keeps_the_last_adapter_whole(self, tmp_path, monkeypatch, tiny_path):
        # tiny_path: the model is built before the writes fail (run first, the run would build it with the failing writer)
        import safetensors.torch

        # step 1 writes adapter.safetensors (adapter-step-000001.safetensors is its copy); the last step's finds the disk
        # full. Only the adapter's writes count: the atoms' decomposition cache writes one where no earlier test did
        adapter_writes = _fail_with_disk_full_after(1, safetensors.torch.save_file, lambda target: "adapter" in Path(target).name)
        monkeypatch.setattr(safetensors.torch, "save_file", adapter_writes)
        output = tmp_path / "run"
        result = invoke("train", "--model", "tiny-random", "--steps", 2, "--save-every", 1, "--output", output)
        assert_one_line_error(result, 1, f"{output / 'adapter.safetensors'}: No space left on device")
        from sdtune.adapter import read_adapter_info

        assert read_adapter_info(output)[0].extra["step"] == "1"
        assert not [p.name for p in output.iterdir() if p.name.endswith(".tmp")]

    def test_disk_full_while_sampling_leaves_no_partial_image(self, tmp_path, monkeypatch, tiny_path):
        monkeypatch.setattr(Image.Image, "save", _fail_with_disk_full_after(1, Image.Image.save))
        result = invoke("sample", "--model", "tiny-random", "--prompt", "x", "--num-images", 2, "--steps", 1, "--output", tmp_path)
        assert_one_line_error(result, 1, "seed1.png: No space left on device")
        assert sorted(p.name for p in tmp_path.rglob("*") if p.is_file()) == ["000-seed0.png"]
        Image.open(tmp_path / "images" / "000-seed0.png").verify()

    def test_non_finite_tensors_are_never_saved(self, tmp_path, tiny_pipe):
        import torch

        from sdtune import methods
        from sdtune.adapter import save_adapter

        method = methods.create("bitfit")
        method.inject(tiny_pipe.unet)
        with torch.no_grad():
            method.trainable_parameters()[0].fill_(float("inf"))
        with pytest.raises(TrainingFailed, match="holds NaN or infinite values"):
            save_adapter(tmp_path / "adapter.safetensors", method, "tiny-random")
        assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------------------------
# Kills, NaNs and a second run into the same folder


def faults_benchmark():
    """benchmarks/faults.py as a module: its trial helpers are what these tests use."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("faults", ROOT / "benchmarks" / "faults.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


class TestInterruptions:
    def test_second_run_into_a_locked_folder_refuses(self, tmp_path, tiny_path):
        from sdtune.fileio import LOCK_FILE, OutputLock

        output = tmp_path / "run"
        output.mkdir()
        with OutputLock(output):  # an open lock of its own, as a running process holds it
            result = invoke("train", "--model", "tiny-random", "--steps", 1, "--output", output)
        assert_one_line_error(result, 2, f"output folder {output} is in use by another sdtune run (pid {os.getpid()}")
        assert not (output / "metrics.jsonl").exists() and not (output / LOCK_FILE).exists()

    def test_stale_lock_of_a_dead_process_is_taken_over(self, tmp_path, tiny_path):
        from sdtune.fileio import LOCK_FILE

        output = tmp_path / "run"
        output.mkdir()
        (output / LOCK_FILE).write_text(f"{dead_pid()} somewhere\n")
        result = invoke("train", "--model", "tiny-random", "--steps", 1, "--output", output)
        assert result.exit_code == 0, result.output
        assert not (output / LOCK_FILE).exists()

    def test_without_flock_the_lock_checks_the_pid(self, tmp_path, monkeypatch):
        import sdtune.fileio
        from sdtune.fileio import LOCK_FILE, OutputLock

        def no_flock(fd):
            raise OSError(errno.ENOLCK, "No locks available")

        monkeypatch.setattr(sdtune.fileio, "_try_flock", no_flock)
        host = sdtune.fileio._hostname()
        (tmp_path / LOCK_FILE).write_text(f"{os.getppid()} {host}\n")  # a live process
        with pytest.raises(SdtuneError, match=f"pid {os.getppid()} on {host}"):
            OutputLock(tmp_path).acquire()
        (tmp_path / LOCK_FILE).write_text(f"{dead_pid()} {host}\n")
        with OutputLock(tmp_path):
            assert (tmp_path / LOCK_FILE).read_text().split()[0] == str(os.getpid())
        assert not (tmp_path / LOCK_FILE).exists()

    def test_nan_stops_naming_the_step_and_keeps_the_last_good_checkpoint(self, tmp_path, tiny_path):
        from sdtune.adapter import read_adapter_info

        output = tmp_path / "nan"
        args = ("--steps", 8, "--lr", "1e30", "--checkpoint-every", 1, "--keep-checkpoints", 10, "--output", output)
        result = invoke("train", "--model", "tiny-random", *args)
        assert_one_line_error(result, 1, "at step ")
        error = result.stderr.strip().splitlines()[-1]
        step = int(error.split("at step ")[1].split(";")[0])
        assert step > 1 and ("is nan" in error or "is inf" in error or "not finite" in error), error
        saved = sorted(int(p.name.split("-")[1]) for p in (output / "checkpoints").iterdir())
        assert saved == list(range(1, step))  # nothing of the failing step or later
        assert read_adapter_info(output)[0].extra["step"] == str(step - 1)
        assert not [p for p in output.rglob("*") if p.name.startswith(".")]

    def test_kill_9_during_training_then_resume_gives_the_same_adapter(self, tmp_path, tiny_path):
        from sdtune.config import TrainConfig
        from sdtune.fileio import LOCK_FILE
        from sdtune.training import train

        faults = faults_benchmark()
        steps, reference, output = 6, tmp_path / "uninterrupted", tmp_path / "killed"
        settings = dict(
            model="tiny-random", seed=7, lr_scheduler="cosine", lr_warmup_steps=2, ema_decay=0.9, steps=steps,
            checkpoint_every=2, validate_every=3,
        )
        assert faults.TRAIN_ARGS == [
            "--model", "tiny-random", "--seed", "7", "--lr-scheduler", "cosine", "--lr-warmup-steps", "2",
            "--ema-decay", "0.9", "--validate-every", "3",
        ]
        train(TrainConfig(output=str(reference), **settings), progress=False)

        process = faults.start(faults.train_command(output, steps, "--checkpoint-every", "2"), tmp_path / "log")
        deadline = time.time() + 600
        while not (output / "checkpoints" / "step-2").exists() and process.poll() is None and time.time() < deadline:
            time.sleep(0.01)
        os.kill(process.pid, signal.SIGKILL)  # right after the first checkpoint: mid-way through step 3
        process.wait()
        assert process.returncode == -signal.SIGKILL, (tmp_path / "log").read_text()[-2000:]
        assert faults.problems_after_kill(output, 2, steps) == []
        assert (output / LOCK_FILE).exists()  # the killed run's lock, taken over below

        run = train(TrainConfig(output=str(output), resume="latest", **settings), progress=False)
        assert run.resumed_from is not None
        for name in faults.ADAPTERS:
            assert (output / name).read_bytes() == (reference / name).read_bytes(), name
        assert faults.losses(output) == faults.losses(reference)

    @pytest.mark.slow
    def test_fault_benchmark_three_random_kills(self, tmp_path, tiny_path):
        summary = faults_benchmark().main(["--trials", "3", "--steps", "6", "--work", str(tmp_path)])
        assert summary == "3 trials, 3 recovered, 0 lost"


@pytest.mark.parametrize("interrupted", ["_try_flock", "_is_ours", "fsync"])
def test_an_interrupt_while_the_lock_is_taken_leaves_no_lock_file(tmp_path, monkeypatch, interrupted):
    """SIGTERM or SIGINT between the lock file's creation and the end of `acquire` (where no `release` follows)
    removes the file the lock created, as `release` does."""
    import sdtune.fileio
    from sdtune.fileio import LOCK_FILE, OutputLock

    target = os if interrupted == "fsync" else sdtune.fileio
    if interrupted == "_is_ours":
        target = OutputLock
    original, calls = getattr(target, interrupted), []

    def then_interrupted(*args):  # the signal comes once, right after the call
        result = original(*args)
        calls.append(1)
        if len(calls) == 1:
            raise KeyboardInterrupt
        return result

    monkeypatch.setattr(target, interrupted, then_interrupted)
    with pytest.raises(KeyboardInterrupt):
        OutputLock(tmp_path).acquire()
    monkeypatch.undo()
    assert not (tmp_path / LOCK_FILE).exists()
    with OutputLock(tmp_path):  # and the next command takes the lock
        assert (tmp_path / LOCK_FILE).exists()


def test_an_interrupt_as_the_output_lock_is_released_leaves_no_lock_file(tmp_path, tiny_path, monkeypatch):
    """SIGTERM or SIGINT as a finished command releases its lock (in the `finally` that releases it, before the file is
    removed) still ends in one "interrupted" line with no lock file: the CLI releases the locks an interrupt left held."""
    from sdtune.fileio import OutputLock

    invoke("train", "--model", "tiny-random", "--steps", 1, "--output", tmp_path / "run")
    release, calls = OutputLock.release, []

    def interrupted_once(self):
        calls.append(self.path)
        if len(calls) == 1:
            raise KeyboardInterrupt  # as the release begins
        release(self)

    monkeypatch.setattr(OutputLock, "release", interrupted_once)
    output = tmp_path / "out"
    result = invoke("sample", "--adapter", tmp_path / "run", "--prompt", "a <castle>", "--num-images", 1, "--steps", 1,
                    "--output", output)
    assert result.exit_code == 130, result.output
    assert result.stderr.strip().splitlines()[-1] == "interrupted"
    assert calls[0] == output / ".sdtune.lock"
    assert [p.name for p in tmp_path.rglob("*.lock")] == []


@pytest.mark.parametrize("command", ["train", "sample", "sweep"])
def test_an_interrupt_just_after_the_output_lock_is_taken_releases_it(tmp_path, tiny_path, monkeypatch, command):
    """SIGTERM or SIGINT once the lock is taken but before the block that releases it begins (on the caller's
    `try:` line, or on `lock_on_main_process`'s way out) leaves no lock file: the lock is taken inside that block."""
    import sdtune.distributed
    from sdtune.config import SampleConfig, SweepConfig, TrainConfig
    from sdtune.sampling import sample
    from sdtune.sweep import run_sweep
    from sdtune.training import train

    if command == "sample":
        train(TrainConfig(model="tiny-random", steps=1, output=str(tmp_path / "run")), progress=False)
    original = sdtune.distributed.lock_on_main_process

    def taken_then_interrupted(state, lock):
        original(state, lock)
        assert lock.path.exists()
        raise KeyboardInterrupt

    monkeypatch.setattr(sdtune.distributed, "lock_on_main_process", taken_then_interrupted)
    output = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        if command == "train":
            train(TrainConfig(model="tiny-random", steps=1, output=str(output)), progress=False)
        elif command == "sample":
            sample(SampleConfig(adapter=str(tmp_path / "run"), prompt=["a <castle>"], num_images=1, steps=1, output=str(output)), progress=False)
        else:
            plan = tmp_path / "plan.toml"
            plan.write_text('metrics = "none"\n[train]\nmodel = "tiny-random"\nsteps = 1\n[axes]\nseed = [0]\n')
            run_sweep(SweepConfig(plan=str(plan), output=str(output)), log=lambda message: None)
    assert [p.name for p in output.rglob("*.lock")] == []


@pytest.mark.slow
def test_fault_benchmark_signals_at_random_lines(tmp_path, tiny_path):
    """Three trials drawn from every command the benchmark signals (train, merge, sample, export, evaluate, compare,
    extract, sweep)."""
    summary = faults_benchmark().main(["--faults", "lines", "--trials", "3", "--steps", "4", "--work", str(tmp_path)])
    assert summary == "3 trials, 3 recovered, 0 lost"


@pytest.mark.slow
def test_fault_benchmark_signals_at_random_lines_of_experiment_commands(tmp_path, tiny_path):
    """evaluate, compare, extract and a two-run sweep, run again or resumed, write what their uninterrupted run wrote."""
    summary = faults_benchmark().main(["--faults", "lines", "--commands", "evaluate,compare,extract,sweep", "--trials", "2",
                                       "--steps", "4", "--work", str(tmp_path)])
    assert summary == "2 trials, 2 recovered, 0 lost"


def test_fault_benchmark_compares_sweep_outputs_without_their_timings(tmp_path):
    """A resumed sweep's run markers and report differ from its uninterrupted run's in wall times only; a metric,
    a state or a run counted differently still counts as a difference."""
    steady = faults_benchmark()._steady
    marker = {"format": "sdtune-sweep-run/1", "name": "a", "state": "finished", "metrics": {"clip_t": 27.9},
              "seconds": 6.0, "train_seconds": 4.4}

    def as_json(**changes) -> str:
        return json.dumps({**marker, **changes})

    assert steady("sweep-run.json", as_json(), tmp_path) == steady("sweep-run.json", as_json(seconds=6.2, train_seconds=3.1), tmp_path)
    assert steady("sweep-run.json", as_json(), tmp_path) != steady("sweep-run.json", as_json(metrics={"clip_t": 28.0}), tmp_path)
    assert steady("sweep-run.json", as_json(), tmp_path) != steady("sweep-run.json", as_json(state="failed"), tmp_path)

    def page(total: str, runs: int, per_step: str, train_time: str, clip: str) -> str:
        keys = ["run", "train_seconds_per_step", "train_seconds", "clip_t"]
        head = "".join(f'<th class="sortable" data-key="{key}">{key}</th>' for key in keys)
        row = "".join(f'<td data-value="{value}">{value}</td>' for value in ("a", per_step, train_time, clip))
        return (f"<p>Written 2026-11-30 02:00 from <code>plan.toml</code>.</p><p>Training took {total} in all, over "
                f"{runs} runs (train time: ...).</p><table><thead><tr>{head}</tr></thead>"
                f'<tbody><tr class="finished" data-run="a">{row}</tr></tbody></table>')

    reference = steady("index.html", page("7.4 s", 2, "0.5", "4.4 s", "27.92"), tmp_path)
    assert steady("index.html", page("1 min 3 s", 2, "0.6", "3.1 s", "27.92"), tmp_path) == reference
    assert steady("index.html", page("7.4 s", 2, "0.5", "4.4 s", "27.93"), tmp_path) != reference
    assert steady("index.html", page("7.4 s", 1, "0.5", "4.4 s", "27.92"), tmp_path) != reference
