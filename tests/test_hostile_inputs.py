"""Hostile inputs across train, sample, merge, export, extract, explain, evaluate, compare and sweep: one table, one check.

Every row is a command line that must be refused: with its exit code (2 for bad input), one line on
stderr that says why, no traceback, and nothing written, neither in the test's folder nor in the
adapters' run folders. Most rows fail before the model loads and cost milliseconds; the few that
need a model use `tiny-random`. Placeholders: {tmp} is the test's own folder, {runs} the folder of
the module's adapters ({atoms}, {bitfit}, {lora}: run folders; {kohya}: a kohya-format file).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from test_cli import assert_one_line_error, invoke

ROOT = Path(__file__).resolve().parents[1]
HUGE = "1000000000000000000"


@pytest.fixture(scope="module")
def runs(tmp_path_factory, private_cache):
    """Adapters of three methods (one step of training's worth of change each) and a kohya export."""
    import torch

    from sdtune import methods
    from sdtune.adapter import save_adapter
    from sdtune.export import export_adapter
    from sdtune.models import load_pipeline

    folder = tmp_path_factory.mktemp("runs")
    for name in ("atoms", "bitfit", "lora"):
        pipe = load_pipeline("tiny-random")
        method = methods.create(name)
        method.inject(pipe.unet)
        with torch.no_grad():
            for parameter in method.trainable_parameters():
                parameter.add_(torch.full_like(parameter, 0.01))
        (folder / name).mkdir()
        save_adapter(folder / name / "adapter.safetensors", method, "tiny-random", placeholder="<castle>", token="sks castle")
    export_adapter(folder / "atoms", "kohya", folder / "atoms-kohya.safetensors")
    # a run whose config.toml was edited by hand, and an adapter whose metadata was
    (folder / "odd-template").mkdir()
    (folder / "odd-template" / "adapter.safetensors").write_bytes((folder / "lora" / "adapter.safetensors").read_bytes())
    (folder / "odd-template" / "config.toml").write_text('concept = "castle"\ntemplate = "photo of a {oops}"\n')
    pipe = load_pipeline("tiny-random")
    method = methods.create("lora")
    method.inject(pipe.unet)
    (folder / "odd-count").mkdir()
    save_adapter(folder / "odd-count" / "adapter.safetensors", method, "tiny-random", num_parameters="lots")
    return folder


def make_files(tmp: Path) -> None:
    """What some rows name: a folder where a file belongs, an SD3 pipeline, an SDXL pipeline lacking its second
    text encoder, a text file as an adapter."""
    (tmp / "a-folder").mkdir()
    (tmp / "sd3").mkdir()
    (tmp / "sd3" / "model_index.json").write_text(
        '{"_class_name": "StableDiffusion3Pipeline", "_diffusers_version": "0.42.1", "transformer": ["diffusers", "SD3Transformer2DModel"], '
        '"text_encoder_3": ["transformers", "T5EncoderModel"], "vae": ["diffusers", "AutoencoderKL"]}'
    )
    (tmp / "sdxl").mkdir()
    (tmp / "sdxl" / "model_index.json").write_text(
        '{"_class_name": "StableDiffusionXLPipeline", "_diffusers_version": "0.42.1", "unet": ["diffusers", "UNet2DConditionModel"], '
        '"text_encoder": ["transformers", "CLIPTextModel"], "vae": ["diffusers", "AutoencoderKL"]}'
    )
    for component in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"):
        (tmp / "sdxl" / component).mkdir()
    (tmp / "a-file").write_text("not a folder\n")
    (tmp / "text.safetensors").write_text("not safetensors at all\n")
    (tmp / "empty-images").mkdir()
    (tmp / "not-images").mkdir()
    (tmp / "not-images" / "a.png").write_text("not a picture\n")
    (tmp / "empty.txt").write_text("")
    (tmp / "comparison").mkdir()
    (tmp / "comparison" / "comparison.csv").write_text("an earlier comparison\n")
    # sweep plans: empty, named as a path, a million runs, and one good plan
    (tmp / "empty.toml").write_text("")
    (tmp / "escape.toml").write_text('name = "../../etc"\n[train]\nmodel = "tiny-random"\n[axes]\nmethod = ["lora"]\n')
    axes = "".join(f"{axis} = [{', '.join(str(k + 1) for k in range(10))}]\n" for axis in ("seed", "steps", "batch_size", "lr", "gradient_accumulation_steps", "lr_warmup_steps"))
    (tmp / "million.toml").write_text(f'[train]\nmodel = "tiny-random"\n[axes]\n{axes}')
    (tmp / "no-prompts.toml").write_text(
        f'[train]\nmodel = "tiny-random"\nsteps = 1\n[axes]\nmethod = ["lora"]\n[sample]\nprompts = "{tmp}/none.txt"\n')
    (tmp / "plan.toml").write_text('[train]\nmodel = "tiny-random"\nsteps = 1\n[axes]\nmethod = ["lora"]\n')
    # photo sets: 3:4, 1:1, 16:9 and 3:1 photos, captioned badly
    from PIL import Image

    metadata = {"metadata-json": b'{"file_name": "a.png", "text": "x"\n', "metadata-text": b'{"file_name": "a.png", "text": ""}\n',
                "metadata-list": b'{"file_name": "a.png", "text": ["x", " "]}\n'}
    for name, captions in {"latin1": {"a": "café".encode("latin-1")}, "empty": {"a": b" \n"}, "tags": {"b": b"a <castle>, snow"},
                           "lines": {"b": b"a <castle>, snow, dusk\r\n\r\na <castle>, fog\r\n"},
                           **{name: {} for name in metadata}}.items():
        folder = tmp / f"photos-{name}"
        folder.mkdir()
        for stem, size in {"a": (96, 128), "b": (100, 100), "c": (100, 100), "d": (160, 90), "e": (300, 100)}.items():
            Image.new("RGB", size, (200, 120, 40)).save(folder / f"{stem}.png")
        for stem, text in captions.items():
            (folder / f"{stem}.txt").write_bytes(text)
        if name in metadata:
            (folder / "metadata.jsonl").write_bytes(metadata[name])
    # masked loss: masks missing, of another size, black everywhere
    for name in ("missing", "size", "black"):
        folder = tmp / f"masks-{name}"
        (folder / "masks").mkdir(parents=True)
        for stem in "abc":
            Image.new("RGB", (96, 128), (200, 120, 40)).save(folder / f"{stem}.png")
            if name != "missing" or stem == "a":
                Image.new("L", (96, 128), 255).save(folder / "masks" / f"{stem}.png")
    Image.new("L", (64, 64), 255).save(tmp / "masks-size" / "masks" / "b.png")
    Image.new("L", (96, 128), 0).save(tmp / "masks-black" / "masks" / "c.png")


TRAIN = ("train", "--model", "tiny-random", "--output", "{tmp}/out", "--log-with", "none")
SAMPLE = ("sample", "--model", "tiny-random", "--prompt", "a <castle>", "--output", "{tmp}/out")

CASES = [
    # train: sizes the model or the machine cannot take, before the model loads
    ("train-resolution-8", (*TRAIN, "--resolution", 8), 2, "--resolution 8 is too small for tiny-random: at least 24"),
    ("train-resolution-16", (*TRAIN, "--resolution", 16), 2, "--resolution 16 is too small for tiny-random: at least 24"),
    ("train-prodigy-d-coef-zero", (*TRAIN, "--optimizer", "prodigy", "--prodigy-d-coef", 0), 2, "--prodigy-d-coef must be positive and finite, got 0.0"),
    ("train-prodigy-d-coef-adamw", (*TRAIN, "--prodigy-d-coef", 2), 2, "--prodigy-d-coef applies to --optimizer prodigy, not adamw"),
    ("train-prodigy-d0-negative", (*TRAIN, "--optimizer", "prodigy", "--prodigy-d0", "-1e-5"), 2, "--prodigy-d0 must be positive and finite, got -1e-05"),
    ("train-zero-terminal-snr-epsilon", (*TRAIN, "--zero-terminal-snr"), 2, "--zero-terminal-snr needs a v-prediction model (Lin et al. 2023); tiny-random predicts epsilon"),
    ("train-multires-negative", (*TRAIN, "--multires-noise-iterations", -1), 2, "--multires-noise-iterations must be 0 (off) or more, got -1"),
    ("train-multires-discount-zero", (*TRAIN, "--multires-noise-iterations", 6, "--multires-noise-discount", 0), 2, "--multires-noise-discount must be in (0, 1], got 0.0"),
    ("train-multires-discount-alone", (*TRAIN, "--multires-noise-discount", 0.5), 2, "--multires-noise-discount applies with --multires-noise-iterations"),
    ("train-resolution-huge", (*TRAIN, "--resolution", 100000), 2, "--resolution 100000 needs more memory than there is"),
    ("train-resolution-odd", (*TRAIN, "--resolution", 60), 2, "--resolution must be a positive multiple of 8"),
    ("train-validation-width-odd", (*TRAIN, "--validate-every", 1, "--validation-width", 60), 2, "--validation-width must be a positive multiple of 8, got 60"),
    ("train-validation-height-8", (*TRAIN, "--validate-every", 1, "--validation-height", 8), 2, "--validation-height 8 is too small for tiny-random: at least 24"),
    ("train-validation-huge", (*TRAIN, "--validate-every", 1, "--validation-width", 100000, "--validation-height", 100000), 2,
     "--validation-width 100000 --validation-height 100000 needs more memory than there is"),
    ("train-steps-huge", (*TRAIN, "--steps", HUGE), 2, "micro-batches; sdtune runs at most 10^12"),
    ("train-accumulation-huge", (*TRAIN, "--gradient-accumulation-steps", HUGE), 2, "micro-batches; sdtune runs at most 10^12"),
    ("train-class-images-huge", (*TRAIN, "--num-class-images", 10**12), 2, "--num-class-images 1,000,000,000,000 needs more memory"),
    ("train-gift-rank-huge", (*TRAIN, "--method", "gift", "--option", "rank=100000"), 2, "gift (rank=100000) needs more memory than there is"),
    ("train-gift-blocks-huge", (*TRAIN, "--gift-blocks", 10**6, "--method", "gift"), 2, "--gift-blocks must be at most 64"),
    ("train-lora-rank-huge", (*TRAIN, "--method", "lora", "--rank", 10**7), 2, "lora (rank=10000000) needs more memory"),
    ("train-lora-alpha-inf", (*TRAIN, "--method", "lora", "--option", "alpha=inf"), 2, "--alpha must be a positive number (and finite), got inf"),
    ("train-lora-alpha-nan", (*TRAIN, "--method", "loha", "--alpha", "nan"), 2, "--alpha must be a positive number (and finite), got nan"),
    ("train-lora-dora-not-a-bool", (*TRAIN, "--method", "lora", "--option", "dora=maybe"), 2, "--dora must be true or false, got 'maybe'"),
    ("train-dora-flag-loha", (*TRAIN, "--method", "loha", "--dora"), 2, "--dora applies to --method lora, not loha"),
    ("train-lora-dropout-one", (*TRAIN, "--method", "lora", "--lora-dropout", 1), 2, "--lora-dropout must be a probability in [0, 1), got 1.0"),
    ("train-rank-dropout-oft", (*TRAIN, "--method", "oft", "--rank-dropout", 0.1), 2, "--rank-dropout applies to --method lora/loha/lokr, not oft"),
    ("train-lora-rank-dropout-one", (*TRAIN, "--method", "lora", "--rank-dropout", 1), 2, "--rank-dropout must be a probability in [0, 1), got 1.0"),
    ("train-lora-module-dropout-negative", (*TRAIN, "--method", "lora", "--module-dropout", -0.5), 2,
     "--module-dropout must be a probability in [0, 1), got -0.5"),
    ("train-lora-dora-rank-dropout", (*TRAIN, "--method", "lora", "--dora", "--rank-dropout", 0.1), 2,
     "--rank-dropout does not apply with --dora (DoRA's update is one normalised weight, with no rank features to drop)"),
    ("train-oft-block-size-1", (*TRAIN, "--method", "oft", "--oft-block-size", 1), 2,
     "--oft-block-size must be a whole number of at least 2, got 1"),
    ("train-oft-targets", (*TRAIN, "--method", "oft", "--option", "targets=ff"), 2, "oft targets 'ff' is not available"),
    ("train-oft-targets-flag", (*TRAIN, "--method", "oft", "--targets", "ff"), 2, "oft targets 'ff' is not available"),
    ("train-atoms-seed-huge", (*TRAIN, "--option", "seed=" + HUGE), 2, "atoms seed must be between 0 and 4294967295"),
    ("train-steps-zero", (*TRAIN, "--steps", 0), 2, "--steps must be at least 1"),
    ("train-lr-nan", (*TRAIN, "--lr", "nan"), 2, "--lr must be positive and finite"),
    ("train-unknown-method", (*TRAIN, "--method", "nope"), 2, "unknown method 'nope'"),
    ("train-text-encoder-bitfit", (*TRAIN, "--method", "bitfit", "--train-text-encoder"), 2,
     "--train-text-encoder: method 'bitfit' cannot train the text encoder; atoms, lora, loha, lokr, oft can"),
    ("train-text-encoder-lr-alone", (*TRAIN, "--method", "lora", "--text-encoder-lr", "1e-4"), 2,
     "--text-encoder-lr applies with --train-text-encoder"),
    ("train-text-encoder-lr-nan", (*TRAIN, "--method", "lora", "--train-text-encoder", "--text-encoder-lr", "nan"), 2,
     "--text-encoder-lr must be positive and finite"),
    ("train-unknown-option", (*TRAIN, "--option", "rank=4"), 2, "has no option(s) rank"),
    ("train-flag-of-another-method", (*TRAIN, "--rank", 4), 2, "--rank applies to --method lora/loha/lokr"),
    ("train-template-without-token", (*TRAIN, "--template", "a photo"), 2, "--template must contain {{token}}"),
    ("train-token-embeddings-negative", (*TRAIN, "--token-embeddings", -1), 2, "--token-embeddings must be 0 (off) to 16 new tokens a concept, got -1"),
    ("train-token-embeddings-huge", (*TRAIN, "--token-embeddings", 10**6), 2, "--token-embeddings must be 0 (off) to 16"),
    ("train-token-embeddings-prompt-full", (*TRAIN, *("--concept", "a", "--concept", "b", "--concept", "c", "--concept", "d"), "--token-embeddings", 16), 2,
     "makes 64 new tokens, more than a 75-token prompt leaves room for"),
    ("train-token-embeddings-dataset", (*TRAIN, "--dataset", "digits", "--token-embeddings", 2), 2, "a --dataset's captions name none"),
    ("train-token-embeddings-token-without-them", (*TRAIN, "--token-embeddings", 2, "--token", "sks castle"), 2,
     "--token 'sks castle' lacks the new token(s) <s0><s1> of concept 'castle'"),
    ("train-embedding-lr-alone", (*TRAIN, "--embedding-lr", "1e-3"), 2, "--embedding-lr, --embedding-init and --retract-embeddings apply with --token-embeddings N"),
    ("train-retraction-alone", (*TRAIN, "--retract-embeddings"), 2, "--embedding-lr, --embedding-init and --retract-embeddings apply with --token-embeddings N"),
    ("train-embedding-lr-nan", (*TRAIN, "--token-embeddings", 1, "--embedding-lr", "nan"), 2, "--embedding-lr must be positive and finite"),
    ("train-embedding-init-blank", (*TRAIN, "--token-embeddings", 1, "--embedding-init", " "), 2, "--embedding-init takes a word (or 'random')"),
    ("train-concept-named-as-a-token", (*TRAIN, "--concept", "s0"), 2, "--concept s0: <s0> names a trained token"),
    ("train-concept-path", (*TRAIN, "--concept", "../etc"), 2, "--concept must be a plain name"),
    ("train-dataset-validation", (*TRAIN, "--dataset", "digits", "--validate-every", 5), 2, "--dataset does not combine with --validate-every"),
    ("train-config-folder", (*TRAIN, "--config", "{tmp}/a-folder"), 2, "config file {tmp}/a-folder is a folder"),
    ("train-config-missing", (*TRAIN, "--config", "{tmp}/none.toml"), 2, "config file not found"),
    ("train-images-missing", (*TRAIN, "--images", "{tmp}/no-images"), 2, "image folder not found"),
    ("train-images-empty", (*TRAIN, "--images", "{tmp}/empty-images"), 2, "has no images"),
    ("train-output-is-a-file", (*TRAIN[:3], "--output", "{tmp}/a-file"), 2, "cannot write to output folder"),
    ("train-model-bad-hub-id", (*TRAIN[:1], "--model", "org/-name", "--output", "{tmp}/out"), 2,
     "--model org/-name: no such folder, and not a hub id (ORG/NAME of letters"),
    ("train-model-sd3", (*TRAIN[:1], "--model", "{tmp}/sd3", "--output", "{tmp}/out"), 2,
     "is a StableDiffusion3Pipeline, which sdtune does not support yet"),
    ("train-model-sdxl-one-text-encoder", (*TRAIN[:1], "--model", "{tmp}/sdxl", "--output", "{tmp}/out"), 2,
     "the folder lacks component(s) text_encoder_2, tokenizer_2, which a StableDiffusionXLPipeline needs"),
    ("train-caption-not-utf8", (*TRAIN, "--images", "{tmp}/photos-latin1"), 2, "caption file {tmp}/photos-latin1/a.txt: not UTF-8 text (byte 3 is 0xE9"),
    ("train-caption-empty", (*TRAIN, "--images", "{tmp}/photos-empty"), 2, "caption file {tmp}/photos-empty/a.txt is blank"),
    ("train-metadata-not-json", (*TRAIN, "--images", "{tmp}/photos-metadata-json"), 2, "{tmp}/photos-metadata-json/metadata.jsonl line 1: not JSON"),
    ("train-metadata-empty-text", (*TRAIN, "--images", "{tmp}/photos-metadata-text"), 2, "line 1: \"text\" must be a caption (non-empty text)"),
    ("train-metadata-text-list-blank", (*TRAIN, "--images", "{tmp}/photos-metadata-list"), 2,
     "line 1: \"text\" must be a caption (non-empty text) or a list of them, got ['x', ' ']"),
    ("train-keep-tokens-over-caption-line", (*TRAIN, "--images", "{tmp}/photos-lines", "--shuffle-caption", "--keep-tokens", 3), 2,
     "--keep-tokens 3 is more than the 2 comma-separated tag(s) of a line of b.png's caption ('a <castle>, fog')"),
    ("train-bucket-of-one", (*TRAIN, "--images", "{tmp}/photos-tags", "--buckets", "--batch-size", 2), 2,
     "--buckets: the 56x72 bucket holds 1 image(s) (a.png), fewer than --batch-size 2; give a --batch-size of at most 1, "
     "more images of that shape, or leave out --buckets"),
    ("train-bucket-too-small", (*TRAIN, "--images", "{tmp}/photos-tags", "--buckets", "--resolution", 32), 2,
     "--buckets: e.png (300x100) goes to the 64x16 bucket, smaller than tiny-random's smallest side (24 px)"),
    ("train-keep-tokens-over-caption", (*TRAIN, "--images", "{tmp}/photos-tags", "--shuffle-caption", "--keep-tokens", 3), 2,
     "--keep-tokens 3 is more than the 2 comma-separated tag(s) of b.png's caption"),
    ("train-keep-tokens-without-shuffle", (*TRAIN, "--keep-tokens", 1), 2, "--keep-tokens applies to --shuffle-caption"),
    ("train-caption-dropout-one", (*TRAIN, "--caption-dropout", 1), 2, "--caption-dropout must be in [0, 1)"),
    ("train-masks-missing", (*TRAIN, "--images", "{tmp}/masks-missing", "--masked-loss"), 2,
     "--masked-loss: 2 of 3 concept images have no mask in masks/ beside them (of the same stem: masks/b.png): b.png, c.png"),
    ("train-mask-size", (*TRAIN, "--images", "{tmp}/masks-size", "--masked-loss"), 2,
     "--masked-loss: mask {tmp}/masks-size/masks/b.png is 64x64, its image b.png 96x128: a mask must have its image's "
     "aspect ratio (its size, or that scaled)"),
    ("train-mask-black", (*TRAIN, "--images", "{tmp}/masks-black", "--masked-loss"), 2,
     "--masked-loss: mask {tmp}/masks-black/masks/c.png is black everywhere: nothing of c.png would be trained"),
    ("train-mask-no-alpha", (*TRAIN, "--images", "{tmp}/masks-black", "--masked-loss", "--mask-source", "alpha"), 2,
     "--masked-loss: 3 of 3 concept images have no alpha channel: a.png, b.png, c.png"),
    ("train-mask-source", (*TRAIN, "--masked-loss", "--mask-source", "layers"), 2, "--mask-source must be one of files, alpha, got 'layers'"),
    ("train-unmasked-weight-one", (*TRAIN, "--masked-loss", "--unmasked-weight", 1), 2, "--unmasked-weight must be in [0, 1), got 1.0"),
    ("train-unmasked-weight-alone", (*TRAIN, "--unmasked-weight", 0.5), 2, "--mask-source and --unmasked-weight apply to --masked-loss"),
    ("train-masked-dataset", (*TRAIN, "--dataset", "digits", "--masked-loss"), 2, "--masked-loss applies to concept images"),
    ("train-concepts-one-folder", (*TRAIN, "--concept", "castle", "--concept", "canal", "--images", "{tmp}/photos-tags"), 2,
     "give one --images folder per --concept: 1 for 2 concepts"),
    ("train-model-missing-folder", (*TRAIN[:1], "--model", "/no/such/model", "--output", "{tmp}/out"), 2, "no such folder, and not a hub id"),
    ("train-model-not-cached", (*TRAIN[:1], "--model", "nobody/no-such-model", "--output", "{tmp}/out"), 2,
     "--model nobody/no-such-model: not in the local Hugging Face cache, and the hub is offline (HF_HUB_OFFLINE); use --model tiny or a local folder"),
    # sample
    ("sample-steps-huge", (*SAMPLE, "--steps", 10**9), 2, "tiny-random's scheduler has 1000 timesteps, so at most 1000 denoising steps"),
    ("sample-num-images-huge", (*SAMPLE, "--num-images", 10**12), 2, "--num-images 1,000,000,000,000 for 1 prompt(s) needs more memory"),
    ("sample-resolution-huge", (*SAMPLE, "--resolution", 100000), 2, "--resolution 100000 needs more memory than there is"),
    ("sample-resolution-32768", (*SAMPLE, "--resolution", 32768), 2,
     "--resolution 32768 needs more memory than there is: 384.0 GB for one image's last VAE decoder feature maps alone"),
    ("sample-resolution-8", (*SAMPLE, "--resolution", 8), 2, "--resolution 8 is too small for tiny-random: at least 24"),
    ("sample-prompts-folder", (*SAMPLE, "--prompts", "{tmp}/a-folder"), 2, "prompt file {tmp}/a-folder is a folder"),
    ("sample-prompts-missing", (*SAMPLE, "--prompts", "{tmp}/none.txt"), 2, "prompt file not found"),
    ("sample-prompts-endless", (*SAMPLE, "--prompts", "/dev/zero"), 2, "prompt file /dev/zero holds more than 64 MB"),
    ("sample-no-prompt", ("sample", "--model", "tiny-random", "--output", "{tmp}/out"), 2, "give a prompt file"),
    ("sample-classes-none", ("sample", "--model", "tiny-random", "--dataset", "digits", "--classes", ",", "--output", "{tmp}/out"), 2,
     "--classes takes class names separated by commas, got ','"),
    ("sample-class-template-without-class", ("sample", "--model", "tiny-random", "--dataset", "digits", "--class-template", "a photo",
                                             "--output", "{tmp}/out"), 2, "--class-template must contain {{class}}, got 'a photo'"),
    ("sample-scheduler", (*SAMPLE, "--scheduler", "nope"), 2, "--scheduler must be one of"),
    ("sample-adapter-scale-inf", (*SAMPLE[:1], "--adapter", "{runs}/atoms", "--prompt", "x", "--adapter-scale", "0,inf", "--output", "{tmp}/out"),
     2, "--adapter-scale must be a finite number"),
    ("sample-adapter-scale-huge", (*SAMPLE[:1], "--adapter", "{runs}/atoms", "--prompt", "x", "--adapter-scale", "1e308", "--output", "{tmp}/out"),
     2, "--adapter-scale must lie within"),
    ("sample-adapter-missing", (*SAMPLE[:1], "--adapter", "{tmp}/none.safetensors", "--prompt", "x", "--output", "{tmp}/out"), 2, "adapter not found"),
    ("sample-adapter-not-safetensors", (*SAMPLE[:1], "--adapter", "{tmp}/text.safetensors", "--prompt", "x", "--output", "{tmp}/out"), 2,
     "text.safetensors"),
    ("sample-model-sd3", (*SAMPLE[:1], "--model", "{tmp}/sd3", "--prompt", "x", "--output", "{tmp}/out"), 2, "is a StableDiffusion3Pipeline"),
    ("sample-model-sdxl-one-text-encoder", (*SAMPLE[:1], "--model", "{tmp}/sdxl", "--prompt", "x", "--output", "{tmp}/out"), 2,
     "lacks component(s) text_encoder_2, tokenizer_2"),
    ("sample-output-is-a-file", (*SAMPLE[:5], "--output", "{tmp}/a-file"), 2,
     "cannot write to output folder {tmp}/a-file/images: {tmp}/a-file is a file, not a folder"),
    # merge
    ("merge-scale-overflows", ("merge", "{runs}/atoms", "--output", "{tmp}/out", "--scale", "1e308"), 2,
     "scale 1e+308 makes the merged unet weight conv_in.weight overflow float32; use a smaller scale"),
    ("merge-scale-overflows-fp16", ("merge", "{runs}/atoms", "--output", "{tmp}/out", "--scale", "1e8", "--dtype", "fp16"), 2,
     "overflows fp16 at --scale 1e+08; use a smaller --scale or a wider --dtype"),
    ("merge-scale-nan", ("merge", "{runs}/atoms", "--output", "{tmp}/out", "--scale", "nan"), 2, "--scale must be a finite number"),
    ("merge-dtype", ("merge", "{runs}/atoms", "--output", "{tmp}/out", "--dtype", "fp8"), 2, "--dtype 'fp8' is not available"),
    ("merge-missing", ("merge", "{tmp}/none", "--output", "{tmp}/out"), 2, "adapter not found"),
    ("merge-model-sd3", ("merge", "{runs}/atoms", "--output", "{tmp}/out", "--model", "{tmp}/sd3"), 2, "is a StableDiffusion3Pipeline"),
    ("merge-output-under-a-file", ("merge", "{runs}/atoms", "--output", "{tmp}/a-file/merged"), 2,
     "cannot write --output {tmp}/a-file/merged: {tmp}/a-file is a file, not a folder"),
    # export
    ("export-format", ("export", "{runs}/atoms", "--format", "nope", "--output", "{tmp}/out"), 2, "--format 'nope' is not available"),
    ("export-format-of-another-method", ("export", "{runs}/atoms", "--format", "diffusers", "--output", "{tmp}/out"), 2,
     "--format diffusers holds LoRA, not atoms"),
    ("export-full-diff-own-tensors", ("export", "{runs}/lora", "--format", "kohya", "--full-diff", "--output", "{tmp}/out"), 2,
     "--full-diff applies to kohya files of full-weight differences; a lora adapter"),
    ("export-full-diff-peft", ("export", "{runs}/lora", "--format", "peft", "--full-diff", "--output", "{tmp}/out"), 2,
     "--full-diff applies to --format kohya, not peft"),
    ("export-output-folder", ("export", "{runs}/bitfit", "--format", "kohya", "--output", "{tmp}/a-folder"), 2, "is a folder; this format is one file"),
    ("export-kohya-file", ("export", "{runs}/atoms-kohya.safetensors", "--format", "kohya", "--output", "{tmp}/out"), 2,
     "already is a kohya-format file"),
    ("export-output-under-a-file", ("export", "{runs}/bitfit", "--format", "kohya", "--output", "{tmp}/a-file/x.safetensors"), 2,
     "cannot write --output {tmp}/a-file/x.safetensors: {tmp}/a-file is a file, not a folder"),
    ("export-model-sd3", ("export", "{runs}/bitfit", "--format", "kohya", "--output", "{tmp}/out", "--model", "{tmp}/sd3"), 2,
     "is a StableDiffusion3Pipeline"),
    # extract: settings and paths refused before the model loads; an adapter LoRA cannot hold after
    ("extract-rank-zero", ("extract", "{runs}/atoms", "--output", "{tmp}/lora.safetensors", "--rank", 0), 2, "--rank must be 1 or more, got 0"),
    ("extract-conv-rank-negative", ("extract", "{runs}/atoms", "--output", "{tmp}/lora.safetensors", "--conv-rank", -2), 2,
     "--conv-rank must be 1 or more, got -2"),
    ("extract-dynamic-unknown", ("extract", "{runs}/atoms", "--output", "{tmp}/lora.safetensors", "--dynamic", "svd", "--threshold", 0.9), 2,
     "--dynamic 'svd' is not available; choose: sv_fro, sv_cumulative, sv_ratio"),
    ("extract-dynamic-without-threshold", ("extract", "{runs}/atoms", "--output", "{tmp}/lora.safetensors", "--dynamic", "sv_fro"), 2,
     "--dynamic sv_fro needs --threshold"),
    ("extract-threshold-without-dynamic", ("extract", "{runs}/atoms", "--output", "{tmp}/lora.safetensors", "--threshold", 0.9), 2,
     "--threshold applies with --dynamic"),
    ("extract-threshold-above-1", ("extract", "{runs}/atoms", "--output", "{tmp}/lora.safetensors", "--dynamic", "sv_fro", "--threshold", 1.5), 2,
     "--threshold with --dynamic sv_fro is the fraction to keep, above 0 and at most 1, got 1.5"),
    ("extract-threshold-nan", ("extract", "{runs}/atoms", "--output", "{tmp}/lora.safetensors", "--dynamic", "sv_cumulative", "--threshold", "nan"), 2,
     "--threshold with --dynamic sv_cumulative is the fraction to keep, above 0 and at most 1, got nan"),
    ("extract-ratio-below-1", ("extract", "{runs}/atoms", "--output", "{tmp}/lora.safetensors", "--dynamic", "sv_ratio", "--threshold", 0.5), 2,
     "--threshold with --dynamic sv_ratio is the largest kept ratio of singular values, 1 or more, got 0.5"),
    ("extract-dtype", ("extract", "{runs}/atoms", "--output", "{tmp}/lora.safetensors", "--dtype", "fp8"), 2, "--dtype 'fp8' is not available"),
    ("extract-output-exists", ("extract", "{runs}/atoms", "--output", "{tmp}/a-file"), 2,
     "--output {tmp}/a-file already exists; give a new path, or --overwrite to replace it"),
    ("extract-output-folder", ("extract", "{runs}/atoms", "--output", "{tmp}/a-folder", "--overwrite"), 2, "is a folder; a LoRA is one file"),
    ("extract-output-is-the-adapter", ("extract", "{runs}/atoms", "--output", "{runs}/atoms/adapter.safetensors", "--overwrite"), 2,
     "is where the input {runs}/atoms/adapter.safetensors is"),
    ("extract-output-under-a-file", ("extract", "{runs}/atoms", "--output", "{tmp}/a-file/lora.safetensors"), 2,
     "cannot write --output {tmp}/a-file/lora.safetensors: {tmp}/a-file is a file, not a folder"),
    ("extract-source-missing", ("extract", "{tmp}/none", "--output", "{tmp}/lora.safetensors"), 2, "adapter not found: {tmp}/none"),
    ("extract-source-not-safetensors", ("extract", "{tmp}/text.safetensors", "--output", "{tmp}/lora.safetensors"), 2, "text.safetensors"),
    ("extract-source-pickle", ("extract", "{tmp}/a.ckpt", "--output", "{tmp}/lora.safetensors"), 2, "files are pickles"),
    ("extract-bitfit", ("extract", "{runs}/bitfit", "--output", "{tmp}/lora.safetensors"), 2,
     "the adapter changes only biases or norm layers, which LoRA cannot hold; there is no LoRA to extract "
     "(--keep-biases and --keep-norms write them exactly)"),
    # explain
    ("explain-guidance-nan", ("explain", "{runs}/atoms", "--guidance", "nan"), 2, "--guidance must be a finite number, got nan"),
    ("explain-seed-negative", ("explain", "{runs}/atoms", "--seed", -5), 2, "--seed must be between 0 and 4294967295, got -5"),
    ("explain-step-of-atoms", ("explain", "{runs}/atoms", "--step", 3), 2, "--step applies to gift runs (maps over a generated image), not to atoms"),
    ("explain-output-is-a-file", ("explain", "{runs}/lora", "--output", "{tmp}/a-file"), 2,
     "cannot write to output folder {tmp}/a-file: {tmp}/a-file is a file, not a folder"),
    # evaluate
    ("evaluate-images-not-images", ("evaluate", "--images", "{tmp}/not-images", "--prompt", "x", "--output", "{tmp}/eval.json"), 2,
     "{tmp}/not-images/a.png: not a readable image (cannot identify image file"),
    ("evaluate-output-folder", ("evaluate", "--images", "{tmp}/photos-tags", "--prompt", "x", "--output", "{tmp}/a-folder"), 2,
     "--output {tmp}/a-folder is a folder; give the path of the results file"),
    ("evaluate-seed-negative", ("evaluate", "--images", "{tmp}/photos-tags", "--prompt", "x", "--seed", -1, "--output", "{tmp}/eval.json"),
     2, "--seed must be between 0 and 4294967295, got -1"),
    ("evaluate-run-template", ("evaluate", "--run", "{runs}/odd-template", "--output", "{tmp}/eval.json"), 2,
     "{runs}/odd-template/config.toml: template 'photo of a {{oops}}' is not a caption template with {{token}} (KeyError: 'oops')"),
    # compare: an earlier comparison in --output stays as it was
    ("compare-prompts-empty", ("compare", "{runs}/lora", "--output", "{tmp}/comparison", "--prompts", "{tmp}/empty.txt"), 2,
     "prompt file {tmp}/empty.txt has no prompts"),
    ("compare-steps-huge", ("compare", "{runs}/lora", "--output", "{tmp}/comparison", "--steps", 10**9), 2,
     "tiny-random's scheduler has 1000 timesteps, so at most 1000 denoising steps"),
    ("compare-run-template", ("compare", "{runs}/odd-template", "--output", "{tmp}/comparison"), 2,
     "template 'photo of a {{oops}}' is not a caption template"),
    ("compare-seed-negative", ("compare", "{runs}/lora", "--output", "{tmp}/out", "--seed", -1), 2, "--seed must be between 0 and 4294967295"),
    ("compare-guidance-inf", ("compare", "{runs}/lora", "--output", "{tmp}/out", "--guidance", "inf"), 2, "--guidance must be a finite number, got inf"),
    ("compare-output-is-a-file", ("compare", "{runs}/lora", "--output", "{tmp}/a-file", "--no-grid"), 2,
     "cannot write to output folder {tmp}/a-file: {tmp}/a-file is a file, not a folder"),
    ("compare-parameter-count-damaged", ("compare", "{runs}/odd-count", "--output", "{tmp}/out", "--no-grid"), 2,
     "damaged sdtune adapter metadata (num_parameters 'lots' is not a count)"),
    # sweep
    ("sweep-plan-empty", ("sweep", "{tmp}/empty.toml", "--dry-run"), 2, "plan {tmp}/empty.toml: empty; a plan has [train] settings and [axes]"),
    ("sweep-plan-name-a-path", ("sweep", "{tmp}/escape.toml", "--dry-run"), 2, "name must be a plain name (letters, digits, ., - or _), got '../../etc'"),
    ("sweep-million-runs", ("sweep", "{tmp}/million.toml", "--dry-run"), 2,
     "the axes make 1,000,000 runs (10 x 10 x 10 x 10 x 10 x 10); a plan runs at most 10,000"),
    ("sweep-prompts-missing", ("sweep", "{tmp}/no-prompts.toml", "--output", "{tmp}/sweep"), 2, "prompt file not found: {tmp}/none.txt"),
    ("sweep-output-is-a-file", ("sweep", "{tmp}/plan.toml", "--output", "{tmp}/a-file"), 2,
     "cannot write to the sweep's folder {tmp}/a-file: {tmp}/a-file is a file, not a folder"),
]


def tree(folder: Path) -> dict[str, bytes | None]:
    """Every path under `folder` with its bytes (None for folders)."""
    return {str(p.relative_to(folder)): None if p.is_dir() else p.read_bytes() for p in sorted(folder.rglob("*"))}


@pytest.mark.parametrize("name,args,code,message", CASES, ids=[case[0] for case in CASES])
def test_hostile_input_is_refused_in_one_line_writing_nothing(name, args, code, message, runs, tmp_path, private_cache):
    make_files(tmp_path)
    fill = {"tmp": tmp_path, "runs": runs}
    before, runs_before = tree(tmp_path), tree(runs)
    result = invoke(*(str(arg).format(**fill) for arg in args))
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.exit_code == code, (result.exit_code, result.output, result.exception)
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert message.format(**fill) in lines[0], lines[0]
    assert "Traceback" not in result.output and result.stdout == ""
    assert tree(tmp_path) == before, "nothing is written"
    assert tree(runs) == runs_before, "nothing is written beside the adapters"


def test_a_model_the_hub_cannot_give_is_one_whole_line(tmp_path):
    """Online but unreachable: the reason is said whole and short, not a library's paragraph cut mid-word."""
    env = {**os.environ, "HF_HUB_OFFLINE": "0", "HF_ENDPOINT": "http://127.0.0.1:9", "HF_HOME": str(tmp_path / "hf"),
           "PYTHONPATH": str(ROOT)}
    command = [sys.executable, "-m", "sdtune", "train", "--model", "nobody/no-such-model", "--output", str(tmp_path / "out")]
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2 and len(lines) == 1, result.stderr
    assert lines[0] == (
        "error: --model nobody/no-such-model: not in the local Hugging Face cache, and the hub could not be reached; "
        "use --model tiny or a local folder"
    )
    assert not (tmp_path / "out").exists()


def test_unsupported_pipelines_are_refused_by_their_class(tmp_path):
    from sdtune.errors import SdtuneError
    from sdtune.models import load_pipeline, read_model_configs

    make_files(tmp_path)
    for call in (read_model_configs, load_pipeline):
        with pytest.raises(SdtuneError, match="is a StableDiffusion3Pipeline, which sdtune does not support yet"):
            call(str(tmp_path / "sd3"))
        with pytest.raises(SdtuneError, match=r"lacks component\(s\) text_encoder_2, tokenizer_2"):
            call(str(tmp_path / "sdxl"))
    assert read_model_configs("tiny-random").pipeline == "StableDiffusionPipeline"


def test_the_smallest_resolution_follows_the_models_widths():
    from sdtune.limits import fewest_values_per_group, smallest_resolution
    from sdtune.models import ModelConfigs, read_model_configs, sd14_unet_config

    tiny = read_model_configs("tiny-random")
    assert smallest_resolution(tiny) == 24  # a 32-channel block with 32 groups at 1x1 below that
    assert fewest_values_per_group(tiny, 16) == (1, "UNet block 1")
    sd14_vae = {"block_out_channels": [128, 256, 512, 512], "norm_num_groups": 32}
    sd14 = ModelConfigs("StableDiffusionPipeline", sd14_unet_config(), sd14_vae, {"num_train_timesteps": 1000})
    assert smallest_resolution(sd14) == 8 and sd14.native_resolution == 512


def test_memory_is_the_gpus_where_the_run_uses_one(monkeypatch):
    """Device parts are bounded by the GPU's memory when the run trains on one (Accelerate's choice), host
    parts (images) by the RAM; on a CPU, all of them together by the RAM."""
    from types import SimpleNamespace

    import torch

    from sdtune.errors import SdtuneError
    from sdtune.limits import check_memory, device_memory, ram_bytes

    monkeypatch.delenv("ACCELERATE_USE_CPU", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: SimpleNamespace(total_memory=(i + 1) * 2**30, name=f"GPU{i}"))
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert device_memory() == (2 * 2**30, "the GPU (GPU1) has 2.0 GB")
    with pytest.raises(SdtuneError, match=r"^--resolution 512 needs more memory than there is: 3.0 GB for its maps alone, and the GPU \(GPU1\) has 2.0 GB$"):
        check_memory([("--resolution 512", "its maps", 3 * 2**30), ("--model m", "weights", 1)])
    with pytest.raises(SdtuneError, match=r"^this run needs at least 2.5 GB of memory \(maps 1.5 GB, weights 1.0 GB\), and the GPU"):
        check_memory([("--resolution 512", "maps", 3 * 2**29), ("--model m", "weights", 2**30)])
    check_memory([("--resolution 512", "maps", 2**30)], [("--num-images 4", "images", 3 * 2**30)])  # images in RAM
    with pytest.raises(SdtuneError, match=r"^--num-images 9 needs more memory than there is: .* and this machine has"):
        check_memory([("--resolution 512", "maps", 2**30)], [("--num-images 9", "images", 2 * ram_bytes())])
    monkeypatch.setenv("ACCELERATE_USE_CPU", "true")
    assert device_memory() is None
    with pytest.raises(SdtuneError, match=r"^this run needs at least .* and this machine has"):
        check_memory([("--resolution 512", "maps", ram_bytes() // 2 + 1)], [("--num-images 4", "images", ram_bytes() // 2 + 1)])


def test_one_line_of_another_library_error():
    from sdtune.errors import SdtuneError, error_line, first_sentence

    long = ValueError("The file is damaged.\nIt was written by an old version " + "and more " * 40)
    assert first_sentence(long) == "The file is damaged"
    words = OSError(" ".join(f"word{i}" for i in range(60)))
    cut = first_sentence(words, limit=50)
    assert cut.endswith(" …") and len(cut) <= 52 and cut[:-2] in str(words) and str(words)[len(cut) - 2] == " "
    assert first_sentence(KeyError()) == "KeyError"
    assert error_line(long) == "ValueError: The file is damaged"
    assert error_line(RuntimeError("")) == "RuntimeError"
    assert error_line(SdtuneError("--steps must be positive. Really.")) == "--steps must be positive. Really."


def test_an_unexpected_error_is_one_line_cut_at_a_word(monkeypatch):
    from test_cli import assert_one_line_error

    import sdtune.datasets

    def broken():
        raise RuntimeError("The registry broke. " + "Details follow " * 40 + "\nline two")

    monkeypatch.setattr(sdtune.datasets, "registry", broken)
    monkeypatch.delenv("SDTUNE_DEBUG", raising=False)
    result = invoke("datasets")
    assert_one_line_error(result, 1, "error: RuntimeError: The registry broke (set SDTUNE_DEBUG=1 for the traceback)")


def test_the_library_refuses_bad_arguments_leaving_the_pipeline_as_it_was(runs, tmp_path, private_cache):
    """The Python API's hostile inputs: a refused adapter strength binds nothing to the pipeline (a
    later, good load still fits it), a config of the wrong kind is named, one run folder is one run."""
    import sdtune
    from sdtune.errors import SdtuneError
    from sdtune.models import load_pipeline

    pipe = load_pipeline("tiny-random")
    names = set(pipe.unet.state_dict())
    for scale in (float("nan"), float("inf"), "strong", "0.5", None, True):
        with pytest.raises(SdtuneError, match=r"^an adapter's scale must be a finite number, got "):
            sdtune.load_adapter(runs / "lora", pipe, scale=scale)
        assert set(pipe.unet.state_dict()) == names
    with pytest.raises(SdtuneError, match=r"^an adapter is a file or run folder path, got None$"):
        sdtune.load_adapter(None, pipe)
    sdtune.load_adapter(runs / "lora", pipe, scale=0.5)
    with pytest.raises(SdtuneError, match=r"^give a sdtune.config.SampleConfig \(such as SampleConfig.load\(None, ...\)\), got dict$"):
        sdtune.sample({"prompt": ["x"]})
    with pytest.raises(SdtuneError, match=r"^give a sdtune.config.EvaluateConfig"):
        sdtune.evaluate("runs/castle")
    comparison = sdtune.compare(str(runs / "lora"), tmp_path / "comparison", grid=False, progress=False)
    assert [run.name for run in comparison.runs] == ["lora"]


def test_the_library_names_a_notebooks_mistakes_in_one_line(runs, tmp_path, private_cache):
    """What a researcher gets wrong in Python is an SdtuneError (exported as sdtune.SdtuneError) of one line, never
    a TypeError or AttributeError from deep inside: a misspelt or positional setting, no pipeline, an adapter
    merged for good then unmerged, another library's export given as an adapter; one path stacks as one adapter,
    and compare takes a whole CompareConfig."""
    import torch

    import sdtune
    from sdtune.config import CompareConfig, TrainConfig
    from sdtune.export import export_adapter
    from sdtune.merging import merge_adapter
    from sdtune.models import load_pipeline

    assert sdtune.SdtuneError is sdtune.errors.SdtuneError and "SdtuneError" in sdtune.__all__
    assert sdtune.TrainConfig is TrainConfig and sdtune.config.CompareConfig is CompareConfig  # on first use
    with pytest.raises(sdtune.SdtuneError, match=r"^unknown setting\(s\): stepz$"):
        TrainConfig(steps=3, stepz=3)
    with pytest.raises(sdtune.SdtuneError, match=r"^give TrainConfig's settings by name"):
        TrainConfig("castle")
    pipe = load_pipeline("tiny-random")
    for not_a_pipeline in (None, "tiny-random", pipe.unet):
        with pytest.raises(sdtune.SdtuneError, match=r"^give a diffusers pipeline to load the adapter into .*, got \w+$"):
            sdtune.load_adapter(runs / "lora", not_a_pipeline)
        with pytest.raises(sdtune.SdtuneError, match=r"^give a diffusers pipeline"):
            sdtune.load_adapters([runs / "lora"], not_a_pipeline)
    with pytest.raises(sdtune.SdtuneError, match=r"^merge is True or False, got 'no'$"):
        sdtune.load_adapter(runs / "lora", pipe, merge="no")
    with pytest.raises(sdtune.SdtuneError, match=r"^scale must be a finite number, got '1'$"):
        merge_adapter(runs / "lora", tmp_path / "merged", scale="1")
    assert not (tmp_path / "merged").exists()
    method = sdtune.load_adapter(runs / "atoms", pipe)
    with pytest.raises(sdtune.SdtuneError, match=r"^atoms: merged for good .* bind it with sdtune.open_adapter and merge\(\)$"):
        method.unmerge()
    with pytest.raises(sdtune.SdtuneError, match=r"^atoms: merged; unmerge\(\) before changing the scale$"):
        method.set_scale(0.5)
    kohya = sdtune.open_adapter(runs / "atoms-kohya.safetensors", load_pipeline("tiny-random"))
    kohya.merge(keep_base=False)
    with pytest.raises(sdtune.SdtuneError, match=r"^kohya: merged for good"):
        kohya.unmerge()

    one, stacked = load_pipeline("tiny-random"), load_pipeline("tiny-random")
    sdtune.load_adapter(runs / "lora", one, scale=0.5)
    sdtune.load_adapters(str(runs / "lora"), stacked, 0.5)  # one path, one number: not a stack of its letters
    assert all(torch.equal(value, stacked.unet.state_dict()[key]) for key, value in one.unet.state_dict().items())

    export_adapter(runs / "lora", "diffusers", tmp_path / "diffusers.safetensors")
    with pytest.raises(sdtune.SdtuneError, match=r"diffusers-format LoRA .* load it with diffusers' pipe.load_lora_weights"):
        sdtune.load_adapter(tmp_path / "diffusers.safetensors", load_pipeline("tiny-random"))
    export_adapter(runs / "lora", "peft", tmp_path / "peft")
    with pytest.raises(sdtune.SdtuneError, match=r"peft adapter folder.*PeftModel.from_pretrained"):
        sdtune.load_adapter(tmp_path / "peft", load_pipeline("tiny-random"))

    config = CompareConfig(runs=[str(runs / "lora")], output=str(tmp_path / "comparison"), grid=False)
    assert [run.name for run in sdtune.compare(config, progress=False).runs] == ["lora"]
    with pytest.raises(sdtune.SdtuneError, match=r"^give the folder to write the comparison to"):
        sdtune.compare([str(runs / "lora")])


def test_errors_raised_to_python_name_settings_as_python_spells_them(runs, tmp_path, private_cache):
    """A refusal raised to Python code names the setting as the code gives it (overwrite=True, options["rank"],
    validation_width, adapter_scale), through the public functions and the configs alike; the same refusal through
    the CLI, in the same process before and after, names its flag."""
    import sdtune
    from sdtune.config import SampleConfig, TrainConfig

    train = ("train", "--model", "tiny-random", "--steps", 1)
    assert_one_line_error(invoke(*train, "--output", runs / "lora"), 2,
                          "holds an earlier run (adapter.safetensors): add --overwrite to replace it, or choose another --output")
    with pytest.raises(sdtune.SdtuneError, match=r"holds an earlier run \(adapter.safetensors\): add overwrite=True to replace it, "
                                                 r"or choose another output$"):
        sdtune.train(TrainConfig(model="tiny-random", steps=1, output=str(runs / "lora")))
    with pytest.raises(sdtune.SdtuneError, match=r'^options\["rank"\] must be a whole number of at least 1, got 0$'):
        sdtune.train(TrainConfig(model="tiny-random", steps=1, method="lora", options={"rank": 0}, output=str(tmp_path / "r")))
    with pytest.raises(sdtune.SdtuneError, match=r'^options\["rank_dropout"\] does not apply with options=\{"dora": True\} '):
        sdtune.train(TrainConfig(model="tiny-random", steps=1, method="lora", options={"dora": True, "rank_dropout": 0.1},
                                 output=str(tmp_path / "d")))
    assert_one_line_error(invoke(*train, "--method", "lora", "--rank", 0, "--output", tmp_path / "r"), 2,
                          "error: --rank must be a whole number of at least 1, got 0")
    for refused in (lambda: TrainConfig(validation_width=100).validate(), lambda: TrainConfig.load(None, validation_width=100)):
        with pytest.raises(sdtune.SdtuneError, match=r"^validation_width must be a positive multiple of 8, got 100$"):
            refused()
    with pytest.raises(sdtune.SdtuneError, match=r"^adapter_scale must lie within ±100 \(further out"):
        sdtune.sample(SampleConfig(prompt="x", adapter=str(runs / "lora"), adapter_scale=1e9))
    with pytest.raises(sdtune.SdtuneError, match=r"^classes takes class names separated by commas, got ''$"):
        SampleConfig(prompt="x", classes="")  # raised while the config is built
    with pytest.raises(sdtune.SdtuneError, match=r"^give steps=30 or more"):  # a message's value, as Python writes it
        with sdtune.config.python_spelling("sample"):
            raise sdtune.SdtuneError("give --steps 30 or more")


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="fp16 autocasts on a GPU: no warning")
def test_warnings_raised_to_python_name_settings_as_python_spells_them(runs, tmp_path, private_cache):
    """A warning raised to Python code names settings as the code gives them (validation_width, no_half_vae=True),
    shown at the line that called sdtune; the same warnings through the CLI name flags, as they always did. Export's
    notes too: returned to Python, `full_diff=True`; printed by `sdtune export`, `--full-diff`."""
    from types import SimpleNamespace

    import torch

    import sdtune
    from sdtune.config import TrainConfig, python_spelling, spelled_as_flags
    from sdtune.export import export_adapter
    from sdtune.precision import warn_half_vae

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a castle\n")
    settings = {"model": "tiny-random", "steps": 1, "method": "difffit", "log_with": "none", "mixed_precision": "fp16",
                "validation_prompts": str(prompts), "validation_width": 96}
    python = ["validation_prompts, validation_width are used only with validate_every; nothing is drawn",
              'mixed_precision="fp16" has no effect on cpu (training runs in fp32); bf16 does']
    flags = ["--validation-prompts, --validation-width are used only with --validate-every; nothing is drawn",
             "--mixed-precision fp16 has no effect on cpu (training runs in fp32); bf16 does"]

    def said(caught, expected):
        return [w for w in caught if str(w.message) in expected]

    with pytest.warns(UserWarning) as caught:
        line = sys._getframe().f_lineno + 1
        sdtune.train(TrainConfig(output=str(tmp_path / "python"), **settings))
    assert sorted(str(w.message) for w in said(caught, python)) == sorted(python), [str(w.message) for w in caught]
    assert all((w.filename, w.lineno) == (__file__, line) for w in said(caught, python))
    with pytest.warns(UserWarning) as caught:
        result = invoke("train", *[part for name, value in settings.items() for part in (f"--{name.replace('_', '-')}", value)],
                        "--output", tmp_path / "cli")
    assert result.exit_code == 0, result.output
    assert sorted(str(w.message) for w in said(caught, flags)) == sorted(flags), [str(w.message) for w in caught]

    sdxl = SimpleNamespace(text_encoder_2=object(), vae=SimpleNamespace(config=SimpleNamespace(force_upcast=True)))
    advice = "this SDXL model's VAE overflows in fp16 (its config sets force_upcast): add {} to keep it in fp32, or use {}"
    with pytest.warns(UserWarning) as caught:
        with python_spelling("train"):
            warn_half_vae(sdxl, torch.float16, no_half_vae=False)
        with spelled_as_flags(), python_spelling("train"):  # the CLI answers: an sdtune call inside it keeps flags
            warn_half_vae(sdxl, torch.float16, no_half_vae=False)
    assert [str(w.message) for w in caught] == [advice.format("no_half_vae=True", 'mixed_precision="bf16"'),
                                                 advice.format("--no-half-vae", "--mixed-precision bf16")]

    notes = export_adapter(runs / "bitfit", "kohya", tmp_path / "python.safetensors").notes
    assert len(notes) == 1 and "; full_diff=True adds a zero .diff beside each for them" in notes[0], notes
    result = invoke("export", runs / "bitfit", "--format", "kohya", "--output", tmp_path / "cli.safetensors")
    assert result.exit_code == 0 and "; --full-diff adds a zero .diff beside each for them" in result.output, result.output


def test_python_spelling_leaves_commands_and_other_flags_as_written():
    """Only the command's own flags are respelt: a quoted command stays one to type, a prompt line's --w and
    kohya-ss' --network_weights are not sdtune's settings, and a word after a flag is its value only where it is one."""
    from sdtune.config import python_spelled

    def spelled(message, command="train"):
        return python_spelled(message, command)

    assert spelled("run `sdtune train --resume latest` or 'sdtune sample --overwrite'") == \
        "run `sdtune train --resume latest` or 'sdtune sample --overwrite'"
    assert spelled("use `--mixed-precision bf16` or `--no-half-vae`") == 'use `mixed_precision="bf16"` or `no_half_vae=True`'
    assert spelled("--half-vae halves it; --no-half-vae") == "no_half_vae=False halves it; no_half_vae=True"  # a "no" field
    assert spelled("a line's --w 513, as kohya-ss' --network_weights; --seed 3.") == "a line's --w 513, as kohya-ss' --network_weights; seed=3."
    assert spelled("add --resume latest to continue it, --overwrite to replace it") == \
        'add resume="latest" to continue it, overwrite=True to replace it'
    assert spelled("lora --targets attn does not tune them: start with --targets of those layers") == \
        'lora options={"targets": "attn"} does not tune them: start with options["targets"] of those layers'
    assert spelled("--atoms-init sparse with --gift-generator simple; --rank 8") == \
        'options={"init": "sparse"} with options={"generator": "simple"}; options={"rank": 8}'
    assert python_spelled("--targets attn", "train", toml=True) == 'options.targets = "attn"'
    assert spelled("--steps 1,000 × --batch-size 4; give --images DIR") == "steps=1000 × batch_size=4; give images=DIR"
    assert spelled("--dora must be true or false; --no-dora") == 'options["dora"] must be true or false; options={"dora": False}'
    assert spelled("--adapter-scale 0,0.5,1 lists a strength twice", "sample") == "adapter_scale=[0, 0.5, 1] lists a strength twice"
    assert spelled("--rank must be 1 or more", "extract") == "rank must be 1 or more"  # extract's own setting, no option
    assert spelled("got '--steps'; --unknown-flag; runs/--steps/x") == "got '--steps'; --unknown-flag; runs/--steps/x"
    # a switch left off is the switch set the other way; a value's flag left out reads as it is
    assert spelled("or leave out --buckets; or leave --buckets off.") == "or set buckets=False; or set buckets=False."
    assert spelled("run without --dora, or without --no-half-vae") == 'run with options={"dora": False}, or with no_half_vae=False'
    assert spelled("resume without --ema-decay, or leave out --steps") == "resume without ema_decay, or leave out steps"
    # as a TOML file gives them (a sweep plan's refusals): the same switches, TOML's spelling
    assert python_spelled("or leave out --buckets; run without --no-dora", "train", toml=True) == \
        "or set buckets = false; run with options.dora = true"
    assert python_spelled("leave --half-vae off", "train", toml=True) == "set no_half_vae = true"
    assert spelled("`sdtune train` without --resume-x; `sdtune train --buckets` leave out") == \
        "`sdtune train` without --resume-x; `sdtune train --buckets` leave out"
    # a note of sample's on how an adapter was trained names train's setting; train's flag elsewhere stays
    assert spelled("x was trained with --zero-terminal-snr; --zero-terminal-snr", "sample") == \
        "x was trained with zero_terminal_snr=True; --zero-terminal-snr"
    # a path or hub id after a path flag is text, as other text values are; the sentence's own words are not
    assert spelled("--clip-model nobody/x: not in the cache", "evaluate") == 'clip_model="nobody/x": not in the cache'
    assert spelled("--output runs/a-b already exists; give --images folder.") == \
        'output="runs/a-b" already exists; give images folder.'
    assert spelled("--base-adapters b.safetensors:0.5: the strength; --model tiny or --model is") == \
        'base_adapters="b.safetensors:0.5": the strength; model="tiny" or model is'
    # a value a message quotes as a shell reads it is the flag's value, whole: a path with spaces, a quote in a name
    assert spelled("--output 'my runs/x' already exists; give a new path, or --overwrite 'to' x") == \
        'output="my runs/x" already exists; give a new path, or overwrite=True \'to\' x'
    assert spelled("--init-weights 'it'\"'\"'s a.safetensors': no; --validation-dtype 'fp64' is not available", "train") == \
        'init_weights="it\'s a.safetensors": no; validation_dtype="fp64" is not available'
    assert python_spelled("--output 'my runs/x' exists", "train", toml=True) == 'output = "my runs/x" exists'
    assert spelled("--output 'unclosed is read as written") == "output 'unclosed is read as written"


def test_a_path_with_spaces_is_named_whole_after_its_flag(runs, tmp_path):
    """A message quotes a path with spaces after its flag, as a shell reads it; raised to Python, the same path is
    the setting's value, whole."""
    import sdtune
    from sdtune.export import export_adapter

    taken = tmp_path / "my runs" / "taken x.safetensors"
    taken.parent.mkdir()
    taken.write_bytes(b"mine")
    assert_one_line_error(invoke("export", runs / "bitfit", "--format", "kohya", "--output", taken), 2,
                          f"--output '{taken}' already exists; give a new path, or --overwrite to replace it")
    with pytest.raises(sdtune.SdtuneError, match=rf'^output="{re.escape(str(taken))}" already exists; give a new path, '
                                                 r"or overwrite=True to replace it$"):
        export_adapter(runs / "bitfit", "kohya", taken)


def test_the_python_spelling_table_names_real_flags_and_fields():
    """Every flag the table respells is a real flag of some command, and every Python name a real setting: a
    config's field, or an option of a method; and each command's flags that set its config's fields are in it (a
    switch's --no- half through its first, the other half of a switch named for its "no" half, --half-vae, as False)."""
    import dataclasses

    from typer.main import get_command

    from sdtune import methods
    from sdtune.cli import app
    from sdtune.config import COMMANDS_WITHIN, _Config, command_of, python_names

    commands = get_command(app).commands
    flags = {flag for command in commands.values() for param in command.params for flag in param.opts + param.secondary_opts}
    option_fields = {f.name for name in methods.available() for f in dataclasses.fields(methods.method_class(name).Options)}
    configs = {command_of(config): config for config in _Config.__subclasses__()}
    assert set(configs) <= set(commands)
    for command, config in configs.items():
        table = python_names(command)
        settings = {f.name for within in (command, *COMMANDS_WITHIN.get(command, ())) for f in dataclasses.fields(configs[within])}
        assert table and set(table) <= flags, (command, set(table) - flags)
        for flag, name in table.items():
            assert name.setting in settings, (command, flag, name)
            assert name.option is None or name.option in option_fields, (command, flag, name)
        fields = {f.name for f in dataclasses.fields(config)}
        for param in commands[command].params:
            if param.name in fields and param.opts[0].startswith("--"):
                assert set(param.opts) <= set(table), (command, param.opts)
                assert all(table[param.opts[0]].value for _ in param.secondary_opts), (command, param.opts)
                for flag in param.secondary_opts:  # --no-X is read through --X; --half-vae is in the table
                    if not flag.startswith("--no-"):
                        assert table[flag] == table[param.opts[0]]._replace(value=False), (command, flag)
    assert python_names("train")["--rank"].option == "rank" and python_names("extract")["--rank"].option is None
    assert all(spec.switch is None or python_names("train")[flag].value for flag, spec in methods.OPTION_FLAGS.items())


def test_each_config_says_where_its_settings_are_described():
    """A config's docstring names `sdtune COMMAND --help` and `sdtune.cli.setting_help`, which gives that help's text
    for each setting (its flags respelt for Python), the method options' for `options`, and refuses a setting it lacks."""
    import dataclasses

    import sdtune
    from sdtune.cli import setting_help
    from sdtune.config import EvaluateConfig, ExplainConfig, TrainConfig, _Config, command_of

    for config in _Config.__subclasses__():
        doc = " ".join(config.__doc__.split())
        assert f"`sdtune {command_of(config)} --help`" in doc and f'`sdtune.cli.setting_help({config.__name__}, "name")`' in doc, config
        names = {line.split(":")[0] for line in setting_help(config).splitlines()}
        assert {f.name for f in dataclasses.fields(config)} <= names, config
        assert all(setting_help(config, f.name).strip() for f in dataclasses.fields(config)), config
    assert setting_help(TrainConfig, "validation_width") == (
        "The validation images' width in pixels, a multiple of 8 (default: resolution; a prompt line's --w wins).")
    assert setting_help(TrainConfig, "steps") == "Optimiser steps. (default: 400)"
    assert 'options["rank"]: lora/loha/lokr: rank r (default: 4).' in setting_help(TrainConfig, "options").splitlines()
    assert setting_help(EvaluateConfig, "prompt") == "A prompt (repeatable); alongside or instead of prompts."
    assert setting_help(ExplainConfig, "token") == "text for <name> placeholders; default: the adapter's token"  # no flag
    with pytest.raises(sdtune.SdtuneError, match=r"^unknown setting\(s\): stepz$"):
        setting_help(TrainConfig, "stepz")


def test_configs_take_what_python_code_holds(tmp_path):
    """Paths (a Run's output) in a list of paths, tuples for lists and one prompt for a list of prompts are taken
    as the CLI's text would be; what is still of the wrong type is named."""
    from sdtune.config import CompareConfig, SampleConfig, TrainConfig
    from sdtune.errors import SdtuneError

    import inspect

    # a notebook's signature help shows the settings, not the check that refuses misspelt ones
    assert {"steps", "method", "buckets"} <= set(inspect.signature(TrainConfig).parameters)
    runs = [tmp_path / "castle-lora", tmp_path / "castle-atoms"]
    assert SampleConfig(adapter=runs).adapter == [str(run) for run in runs]
    assert TrainConfig(concept=("castle", "canal"), images=runs).images == [str(run) for run in runs]
    assert CompareConfig(runs=tuple(runs)).runs == [str(run) for run in runs]
    assert SampleConfig(prompt="a <castle> at dawn").prompt == ["a <castle> at dawn"]
    assert SampleConfig(adapter=runs[0], adapter_scale=(0, 0.5, 1)).adapter_scale == [0.0, 0.5, 1.0]
    with pytest.raises(SdtuneError, match=r"^setting prompt must be a list of text, got \['a', 3\]$"):
        SampleConfig(prompt=("a", 3))
