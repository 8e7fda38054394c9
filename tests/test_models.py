"""The embedded tiny model and model loading."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from sdtune.errors import SdtuneError
from sdtune.methods.base import named_convs
from sdtune.models import build_sd14_unet, build_tiny_pipeline, load_pipeline, sd14_unet_config, tiny_unet_config


def test_tiny_model_is_deterministic():
    first, second = build_tiny_pipeline().unet.state_dict(), build_tiny_pipeline().unet.state_dict()
    assert first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)


def test_tiny_model_has_sd14_structure(tiny_pipe):
    tiny, sd14 = tiny_pipe.unet.config, sd14_unet_config()
    for key in ("down_block_types", "up_block_types", "layers_per_block", "in_channels", "out_channels"):
        assert list(tiny[key]) == list(sd14[key]) if isinstance(sd14[key], list) else tiny[key] == sd14[key]
    assert not tiny.use_linear_projection  # conv proj_in / proj_out, as in SD v1.4
    tiny_convs = [name for name, _ in named_convs(tiny_pipe.unet, {3})]
    sd14_convs = [name for name, _ in named_convs(build_sd14_unet("meta"), {3})]
    assert len(tiny_convs) == 52 and tiny_convs == sd14_convs
    assert tiny_pipe.vae_scale_factor == 8
    assert type(tiny_pipe.text_encoder).__name__ == "CLIPTextModel"


def test_tiny_tokenizer_encodes_any_text(tiny_pipe):
    tokenizer = tiny_pipe.tokenizer
    ids = tokenizer("photo of a sks castle, Ünïcode & emoji 🏰").input_ids
    assert ids[0] == tokenizer.bos_token_id and ids[-1] == tokenizer.eos_token_id
    assert "castle" in tokenizer.decode(ids)
    assert len(tokenizer("word " * 200, truncation=True, max_length=77).input_ids) == 77


def test_loads_a_folder_with_safety_checker_entries(tiny_path, tmp_path):
    folder = tmp_path / "sd-like"
    shutil.copytree(tiny_path, folder)
    index = json.loads((folder / "model_index.json").read_text())
    index["safety_checker"] = ["stable_diffusion", "StableDiffusionSafetyChecker"]
    index["feature_extractor"] = ["transformers", "CLIPImageProcessor"]
    (folder / "model_index.json").write_text(json.dumps(index))
    pipe = load_pipeline(str(folder))
    assert pipe.safety_checker is None


def test_missing_component_is_named(tiny_path, tmp_path):
    folder = tmp_path / "broken"
    shutil.copytree(tiny_path, folder)
    shutil.rmtree(folder / "vae")
    with pytest.raises(SdtuneError, match="lacks component.*vae"):
        load_pipeline(str(folder))


def test_a_component_model_index_leaves_unnamed_is_named(private_cache, tmp_path):
    """An SDXL folder that holds text_encoder_2/ but whose model_index.json has it as [null, null] (diffusers
    then loads None) is refused in one line, not a TypeError in the first step."""
    from sdtune.models import read_model_configs, tiny_sdxl_random_path

    folder = tmp_path / "xl"
    shutil.copytree(tiny_sdxl_random_path(), folder)
    index = json.loads((folder / "model_index.json").read_text())
    index["text_encoder_2"] = [None, None]
    (folder / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(SdtuneError, match=r"model_index.json names no text_encoder_2, which a StableDiffusionXLPipeline needs"):
        read_model_configs(str(folder))


def test_a_folder_of_fp16_variant_weights_loads(private_cache, tmp_path):
    """SDXL repositories ship `*.fp16.safetensors` beside the full weights, and a folder of those alone (the
    VAE's plain here) loads, as diffusers does with variant="fp16"."""
    import torch

    from sdtune.models import tiny_sdxl_random_path

    folder = tmp_path / "xl-fp16"
    shutil.copytree(tiny_sdxl_random_path(), folder)
    for weights in folder.glob("*/*.safetensors"):
        if weights.parent.name != "vae":
            weights.rename(weights.with_name(weights.name.replace(".safetensors", ".fp16.safetensors")))
    pipe, plain = load_pipeline(str(folder)), load_pipeline("tiny-sdxl-random")
    for component in ("unet", "vae", "text_encoder", "text_encoder_2"):
        mine, theirs = getattr(pipe, component).state_dict(), getattr(plain, component).state_dict()
        assert all(torch.equal(mine[key], theirs[key]) for key in theirs), component


def test_a_hub_cache_of_the_fp16_variant_alone_loads(private_cache, tmp_path):
    """`StableDiffusionXLPipeline.from_pretrained(id, variant="fp16")`, as SDXL's model cards load it, leaves the
    fp16 files alone in the Hugging Face cache: offline, the id loads from them (it said the weights were not cached)."""
    import os
    import subprocess
    import sys

    from sdtune.models import tiny_sdxl_random_path

    repo = tmp_path / "hub" / "models--someorg--tiny-xl"
    snapshot = repo / "snapshots" / "abc123"
    shutil.copytree(tiny_sdxl_random_path(), snapshot)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("abc123")
    for weights in snapshot.glob("*/*.safetensors"):
        weights.rename(weights.with_name(weights.name.replace(".safetensors", ".fp16.safetensors")))
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, "-m", "sdtune", "sample", "--model", "someorg/tiny-xl", "--prompt", "x", "--num-images", "1",
               "--steps", "1", "--output", str(tmp_path / "out")]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-500:]
    assert (tmp_path / "out" / "grid.png").is_file()


def test_tiny_without_installed_weights_points_to_tiny_random(monkeypatch):
    import sdtune.models as models

    monkeypatch.setattr(models, "TINY_DIGITS_FOLDER", "no-such-folder")
    with pytest.raises(SdtuneError, match="pretrained tiny weights are not installed.*--model tiny-random"):
        load_pipeline("tiny")


def test_tiny_and_tiny_random_are_different_base_models(tiny_pipe, tmp_path, monkeypatch):
    import sdtune.models as models
    from sdtune import methods
    from sdtune.adapter import load_adapter, save_adapter

    stand_in = tmp_path / "tiny-digits"  # the pretrained folder's stand-in: same architecture, other weights
    build_tiny_pipeline(seed=5).save_pretrained(stand_in)
    monkeypatch.setattr(models, "tiny_pretrained_path", lambda: stand_in)
    pretrained = load_pipeline("tiny")
    assert pretrained.sdtune_model_id == "tiny"
    assert not torch.equal(pretrained.unet.conv_in.weight, tiny_pipe.unet.conv_in.weight)

    method = methods.create("lora")
    method.inject(tiny_pipe.unet)
    adapter = save_adapter(tmp_path / "adapter.safetensors", method, "tiny-random")
    with pytest.raises(SdtuneError, match="was trained on base model 'tiny-random'"):
        load_adapter(adapter, pretrained)
    load_adapter(adapter, load_pipeline("tiny-random"))


def _shipped_tiny_exists() -> bool:
    from importlib import resources

    from sdtune.models import TINY_DIGITS_FOLDER

    return resources.files("sdtune.resources").joinpath(TINY_DIGITS_FOLDER, "model_index.json").is_file()


@pytest.mark.skipif(not _shipped_tiny_exists(), reason="the pretrained tiny weights are not installed")
def test_shipped_tiny_is_the_tiny_architecture_with_other_weights():
    shipped, random = load_pipeline("tiny"), build_tiny_pipeline()
    for key, value in tiny_unet_config().items():
        assert (list(shipped.unet.config[key]) if isinstance(value, list) else shipped.unet.config[key]) == value, key
    for name in ("unet", "vae", "text_encoder"):
        ours, theirs = getattr(shipped, name).state_dict(), getattr(random, name).state_dict()
        assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in theirs.items()}, name
    assert shipped.tokenizer.get_vocab() == random.tokenizer.get_vocab()
    # trained: the UNet and VAE moved away from the random initialisation, the latent scale was measured
    assert not torch.allclose(shipped.unet.conv_in.weight, random.unet.conv_in.weight)
    assert not torch.allclose(shipped.vae.encoder.conv_in.weight, random.vae.encoder.conv_in.weight)
    assert shipped.vae.config.scaling_factor != random.vae.config.scaling_factor


@pytest.mark.skipif(not _shipped_tiny_exists(), reason="the pretrained tiny weights are not installed")
def test_shipped_tiny_loads_in_plain_diffusers_in_one_dtype_and_draws():
    """Its weights are float16 files; diffusers reads every part but the text encoder in float32, transformers the
    text encoder in the dtype its config names: float32 there too, or the first call fails on mixed dtypes."""
    from diffusers import StableDiffusionPipeline

    from sdtune.models import resolve_model

    pipe = StableDiffusionPipeline.from_pretrained(resolve_model("tiny"), safety_checker=None)
    assert {pipe.unet.dtype, pipe.vae.dtype, pipe.text_encoder.dtype} == {torch.float32}
    image = pipe("This is a picture of the handwritten digit seven.", num_inference_steps=2, output_type="np",
                 generator=torch.Generator().manual_seed(0)).images[0]
    assert image.shape == (64, 64, 3) and np.isfinite(image).all()


@pytest.mark.parametrize("model", ["/no/such/folder", "someone/not-cached-model"])
def test_unavailable_model_names_tiny(model):
    with pytest.raises(SdtuneError, match="--model tiny"):
        load_pipeline(model)


@pytest.mark.parametrize("size", [1, 2, 63, 64, 1000, 2**24 + 3, 29_491_200])
def test_fingerprint_sample_indices_stay_in_bounds(size):
    from sdtune.methods.base import sample_indices

    index = sample_indices(size, 64)
    assert index[0] == 0 and index[-1] == size - 1 and len(index) == min(64, size)
    assert bool((index[1:] >= index[:-1]).all())


def test_full_size_sd14_pipeline_for_benchmarks_has_sd14_shapes():
    from sdtune.models import build_sd14_pipeline

    pipe = build_sd14_pipeline(device="meta")  # the architecture without allocating its 4.3 GB
    count = lambda module: sum(p.numel() for p in module.parameters())  # noqa: E731
    assert count(pipe.unet) == 859_520_964  # SD v1.4's UNet, VAE and CLIP ViT-L/14 text encoder
    assert count(pipe.vae) == 83_653_863
    assert count(pipe.text_encoder) == 123_060_480
    assert pipe.vae_scale_factor == 8 and pipe.unet.config.sample_size == 64
    ids = pipe.tokenizer("photo of a sks castle.").input_ids
    assert max(ids) < pipe.text_encoder.config.vocab_size and ids[-1] == pipe.text_encoder.config.eos_token_id


@pytest.fixture
def loud_libraries():
    """transformers and diffusers as a notebook leaves them: info messages and progress bars on (then as they were)."""
    import transformers
    from diffusers.utils import logging as diffusers_logging
    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

    before = (transformers.logging.get_verbosity(), transformers.logging.is_progress_bar_enabled(),
              diffusers_logging.is_progress_bar_enabled(), are_progress_bars_disabled())
    transformers.logging.set_verbosity_info()
    transformers.logging.enable_progress_bar()
    diffusers_logging.enable_progress_bar()
    yield lambda: (transformers.logging.get_verbosity(), transformers.logging.is_progress_bar_enabled(),
                   diffusers_logging.is_progress_bar_enabled(), are_progress_bars_disabled())
    transformers.logging.set_verbosity(before[0])
    (transformers.logging.enable_progress_bar if before[1] else transformers.logging.disable_progress_bar)()
    (diffusers_logging.enable_progress_bar if before[2] else diffusers_logging.disable_progress_bar)()
    (disable_progress_bars if before[3] else enable_progress_bars)()


def test_loading_quiets_the_libraries_only_while_it_loads(tiny_path, loud_libraries):
    import logging

    from sdtune.models import quiet_libraries

    loud = (logging.INFO, True, True, False)
    assert loud_libraries() == loud
    with quiet_libraries():
        assert loud_libraries() == (logging.ERROR, False, False, True)
    load_pipeline("tiny-random")
    assert loud_libraries() == loud  # a notebook's own from_pretrained afterwards still warns and draws its bars
    with pytest.raises(SdtuneError):
        load_pipeline(str(tiny_path / "no-such-model"))
    assert loud_libraries() == loud  # a refused load gives them back too
