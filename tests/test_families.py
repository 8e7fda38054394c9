"""Model families beyond SD v1.4: SD 2.x (v-prediction) and SDXL, on their tiny random models.

Every method keeps the contract it keeps on SD v1.4 (zero update at init, the loss falls, save → load
and merge reproduce the outputs); training resumes exactly; SDXL's conditioning (two encoders, pooled
embedding, time ids) is checked against diffusers' own pipeline; v-prediction's target and min-SNR
weights against their formulas; sampling, merge and export run on both.
"""

from __future__ import annotations

import json

import pytest
import torch

from sdtune import methods
from sdtune.adapter import load_adapter, save_adapter
from sdtune.conditioning import PromptConditioning, UNetConditions
from helpers import run_unet, uninterrupted_and_resumed
from test_evaluation import metric_models  # noqa: F401  (a fixture: tiny random CLIP and DINO folders)

FAMILIES = ["tiny-sd2-random", "tiny-sdxl-random"]
# every method with its default variant, and a learning rate at which 6 steps lower the loss
LEARNING_RATES = {"atoms": 1e-2, "bitfit": 1e-2, "difffit": 1e-2, "full": 1e-3, "gift": 3e-2, "lora": 1e-3, "loha": 1e-2, "lokr": 1e-2}


@pytest.fixture(scope="module")
def built(private_cache):
    """Each family's folder, built once for the module."""
    from sdtune.models import resolve_model

    return {family: resolve_model(family) for family in FAMILIES}


def load(family):
    from sdtune.models import load_pipeline

    return load_pipeline(family)


_UNETS: dict = {}


def fresh_unet(family):
    """A fresh copy of `family`'s UNet (loaded once), in a stand-in for the pipeline adapters load into."""
    import copy
    from types import SimpleNamespace

    if family not in _UNETS:
        _UNETS[family] = load(family)
    pipe = _UNETS[family]
    # frozen, as injecting or loading an adapter leaves it: torch's CPU linear layers round differently under
    # no_grad when their weights require gradients (SD 2.x's linear projections, up to 8e-7)
    unet = copy.deepcopy(pipe.unet).requires_grad_(False)
    return SimpleNamespace(unet=unet, text_encoder_2=getattr(pipe, "text_encoder_2", None),
                           vae_scale_factor=pipe.vae_scale_factor)


def unet_inputs(pipe, batch: int = 2, latent: int = 16):
    """Fixed latents, timesteps and conditions for `pipe`'s UNet (random, of the widths it takes)."""
    generator = torch.Generator().manual_seed(1234)
    latents = torch.randn(batch, 4, latent, latent, generator=generator)
    timesteps = torch.tensor([50, 700][:batch])
    hidden = torch.randn(batch, 77, pipe.unet.config.cross_attention_dim, generator=generator)
    if getattr(pipe, "text_encoder_2", None) is None:
        return latents, timesteps, UNetConditions(hidden)
    pooled = torch.randn(batch, pipe.text_encoder_2.config.projection_dim, generator=generator)
    size = latent * pipe.vae_scale_factor
    time_ids = torch.tensor([[size, size, 0, 0, size, size]] * batch, dtype=torch.float32)
    return latents, timesteps, UNetConditions(hidden, pooled, time_ids)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("name", sorted(LEARNING_RATES))
def test_every_method_keeps_its_contract(family, name, built, tmp_path):
    torch.manual_seed(0)
    pipe = fresh_unet(family)
    inputs = unet_inputs(pipe)
    base = run_unet(pipe.unet, inputs)
    method = methods.create(name)
    parameters = method.inject(pipe.unet)
    torch.testing.assert_close(run_unet(pipe.unet, inputs), base, rtol=0, atol=1e-6)  # zero update at init

    small = unet_inputs(pipe, latent=8)
    target = torch.randn(small[0].shape, generator=torch.Generator().manual_seed(3))
    optimizer = torch.optim.AdamW(parameters, lr=LEARNING_RATES[name])

    def loss():
        latents, timesteps, conditions = small
        return torch.nn.functional.mse_loss(pipe.unet(latents, timesteps, **conditions.unet_kwargs()).sample, target)

    with torch.no_grad():
        before = loss().item()
    for _ in range(6):
        optimizer.zero_grad()
        loss().backward()
        optimizer.step()
    with torch.no_grad():
        assert loss().item() < before * 0.99, name

    tuned = run_unet(pipe.unet, inputs)
    assert (tuned - base).abs().max() > 1e-5
    path = save_adapter(tmp_path / "adapter.safetensors", method, family, placeholder="<castle>", token="sks castle")
    fresh = fresh_unet(family)
    load_adapter(path, fresh, merge=False)
    torch.testing.assert_close(run_unet(fresh.unet, inputs), tuned, rtol=0, atol=1e-5)
    merged = fresh_unet(family)
    load_adapter(path, merged, merge=True)
    torch.testing.assert_close(run_unet(merged.unet, inputs), tuned, rtol=0, atol=1e-4)
    # strength 0 is the base model
    unscaled = fresh_unet(family)
    load_adapter(path, unscaled, scale=0.0)
    torch.testing.assert_close(run_unet(unscaled.unet, inputs), base, rtol=0, atol=0)


def test_the_tiny_families_have_their_architectures(built):
    from sdtune.models import read_model_configs, text_encoders

    sd2, sdxl = load("tiny-sd2-random"), load("tiny-sdxl-random")
    assert type(sd2).__name__ == "StableDiffusionPipeline" and type(sdxl).__name__ == "StableDiffusionXLPipeline"
    assert sd2.scheduler.config.prediction_type == "v_prediction" and sd2.unet.config.use_linear_projection
    assert sd2.text_encoder.config.hidden_act == "gelu"
    assert list(sdxl.unet.config.down_block_types) == ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"]
    assert sdxl.unet.config.addition_embed_type == "text_time"
    assert [type(e).__name__ for e in text_encoders(sdxl)] == ["CLIPTextModel", "CLIPTextModelWithProjection"]
    assert read_model_configs("tiny-sdxl-random").is_sdxl and not read_model_configs("tiny-sd2-random").is_sdxl
    assert read_model_configs("tiny-sdxl-random").native_resolution == 64


def test_sdxl_conditioning_is_the_pipelines_own(built):
    """Hidden states, pooled embedding and time ids as StableDiffusionXLPipeline makes them."""
    pipe = load("tiny-sdxl-random")
    conditioning = PromptConditioning(pipe)
    batch = {"original_size": [torch.tensor([100, 64]), torch.tensor([80, 48])], "crop_top_left": torch.tensor([[4, 0], [0, 8]])}
    conditions = conditioning(["a photo of a dog", "a castle"], "cpu", batch, size=(32, 32))
    embeds, _, pooled, _ = pipe.encode_prompt(["a photo of a dog", "a castle"], device="cpu", do_classifier_free_guidance=False)
    torch.testing.assert_close(conditions.encoder_hidden_states, embeds)
    torch.testing.assert_close(conditions.text_embeds, pooled)
    assert conditions.time_ids.tolist() == [[100, 80, 4, 0, 32, 32], [64, 48, 0, 8, 32, 32]]
    # defaults: the image's own size, no crop; one prompt per encoder call (the same alone or in company)
    alone = conditioning(["a castle"], "cpu", None, size=(32, 48))
    assert alone.time_ids.tolist() == [[32, 48, 0, 0, 32, 48]]
    assert torch.equal(alone.encoder_hidden_states[0], conditions.encoder_hidden_states[1])
    assert conditions.unet_kwargs()["added_cond_kwargs"].keys() == {"text_embeds", "time_ids"}
    sd2 = PromptConditioning(load("tiny-sd2-random"))(["a castle"], "cpu")
    assert sd2.text_embeds is None and sd2.unet_kwargs().keys() == {"encoder_hidden_states"}


def test_v_prediction_target_and_min_snr_weights_follow_the_formulas(built):
    from diffusers import DDPMScheduler

    from sdtune.losses import prediction_target, snr_loss_weights

    scheduler = DDPMScheduler.from_config(load("tiny-sd2-random").scheduler.config)
    assert scheduler.config.prediction_type == "v_prediction"
    generator = torch.Generator().manual_seed(0)
    latents, noise = torch.randn(3, 4, 4, 4, generator=generator), torch.randn(3, 4, 4, 4, generator=generator)
    timesteps = torch.tensor([0, 500, 999])
    alpha_bar = scheduler.alphas_cumprod[timesteps].view(-1, 1, 1, 1)
    expected = alpha_bar.sqrt() * noise - (1 - alpha_bar).sqrt() * latents
    torch.testing.assert_close(prediction_target(scheduler, latents, noise, timesteps), expected)
    snr = (alpha_bar / (1 - alpha_bar)).flatten()
    torch.testing.assert_close(snr_loss_weights(scheduler, timesteps, 5.0), torch.clamp(snr, max=5.0) / (snr + 1))

    # a zero-terminal-SNR schedule: finite weights at its last step for both prediction types
    for prediction_type in ("epsilon", "v_prediction"):
        rescaled = DDPMScheduler.from_config({**scheduler.config, "rescale_betas_zero_snr": True, "prediction_type": prediction_type})
        assert float(rescaled.alphas_cumprod[-1]) < 1e-6
        weights = snr_loss_weights(rescaled, timesteps, 5.0)
        assert torch.isfinite(weights).all() and weights[-1] == (1.0 if prediction_type == "epsilon" else 0.0)


def train_config(family, output, **settings):
    from sdtune.config import TrainConfig

    return TrainConfig(
        model=family, output=str(output), resolution=32, log_with="none",
        **{"steps": 4, "seed": 3, "checkpoint_every": 2, "snr_gamma": 5.0, **settings},
    )


@pytest.mark.parametrize("family", FAMILIES)
def test_training_resumes_exactly(family, built, tmp_path, monkeypatch):
    whole, resumed = uninterrupted_and_resumed(lambda out, **more: train_config(family, out, **more), tmp_path, monkeypatch, 2)
    assert whole.losses[-1] == whole.losses[-1]  # finite
    assert resumed.adapter.read_bytes() == whole.adapter.read_bytes()


def test_sdxl_sample_merge_and_export(built, tmp_path):
    """An SDXL adapter: strength sweep sampling, a merged pipeline diffusers loads, a diffusers LoRA file."""
    from diffusers import StableDiffusionXLPipeline
    from safetensors.torch import load_file

    from sdtune.config import SampleConfig
    from sdtune.export import export_adapter
    from sdtune.merging import merge_adapter
    from sdtune.sampling import sample

    family = "tiny-sdxl-random"
    pipe = load(family)
    method = methods.create("lora")
    method.inject(pipe.unet)
    with torch.no_grad():
        for parameter in method.trainable_parameters():
            parameter.add_(torch.randn(parameter.shape, generator=torch.Generator().manual_seed(7)) * 0.05)
    inputs = unet_inputs(pipe)
    tuned = run_unet(pipe.unet, inputs)
    adapter = save_adapter(tmp_path / "a.safetensors", method, family, placeholder="<castle>", token="sks castle")

    result = sample(
        SampleConfig(adapter=str(adapter), prompt=["a photo of <castle>"], num_images=1, steps=2, resolution=32,
                     adapter_scale=[0.0, 1.0], output=str(tmp_path / "samples")),
        progress=False,
    )
    assert (tmp_path / "samples" / "grid.png").is_file() and result is not None

    merge_adapter(adapter, tmp_path / "merged")
    merged = StableDiffusionXLPipeline.from_pretrained(str(tmp_path / "merged"))
    torch.testing.assert_close(run_unet(merged.unet, inputs), tuned, rtol=0, atol=1e-4)
    assert json.loads((tmp_path / "merged" / "model_index.json").read_text())["_class_name"] == "StableDiffusionXLPipeline"

    export_adapter(adapter, "diffusers", tmp_path / "lora.safetensors")
    assert all(key.startswith("unet.") for key in load_file(tmp_path / "lora.safetensors"))
    plain = load(family)
    plain.load_lora_weights(str(tmp_path / "lora.safetensors"))
    torch.testing.assert_close(run_unet(plain.unet, inputs), tuned, rtol=0, atol=1e-4)


def test_methods_counts_the_full_size_architectures_without_weights():
    from sdtune.models import ARCHITECTURES, build_arch_unet

    counts = {name: sum(p.numel() for p in build_arch_unet(name).parameters()) for name in ARCHITECTURES}
    # the published UNets: SD v1.4 860M, SD 2.1 866M, SDXL base 2.6B
    assert counts == {"sd14": 859_520_964, "sd2-arch": 865_910_724, "sdxl-arch": 2_567_463_684}
    unet = build_arch_unet("sdxl-arch")
    method = methods.create("atoms")
    method.inject(unet)
    assert method.num_parameters() == 3_240  # 40 3x3 convolutions x 9 atoms x 9 taps


# LyCORIS' `full` preset beyond kohya-ss' LoCon: conv_in, conv_out, the time embedding (SDXL: the added conditioning too)
FULL_BEYOND_LOCON = {"conv_in", "conv_out", "time_embedding.linear_1", "time_embedding.linear_2"}
SDXL_ADDED_CONDITIONING = {"add_embedding.linear_1", "add_embedding.linear_2"}


@pytest.mark.parametrize("arch,locon,full", [("sd14", 278, 282), ("sd2-arch", 278, 282), ("sdxl-arch", 788, 794)])
def test_the_lycoris_full_family_is_locon_and_the_outer_layers(arch, locon, full):
    """`--targets full` on the full-size UNets: locon's layers and these by name, every Linear and Conv2d of the UNet."""
    from sdtune.methods.base import layer_family
    from sdtune.models import build_arch_unet

    unet = build_arch_unet(arch, "meta")
    found = {family: layer_family(unet, family) for family in ("locon", "full")}
    assert (len(found["locon"]), len(found["full"])) == (locon, full)
    added = FULL_BEYOND_LOCON | (SDXL_ADDED_CONDITIONING if arch == "sdxl-arch" else set())
    assert set(found["full"]) - set(found["locon"]) == added and set(found["locon"]) < set(found["full"])
    assert found["full"] == [name for name, module in unet.named_modules() if type(module) in (torch.nn.Linear, torch.nn.Conv2d)]


def lycoris_full_preset_network(unet, rank: int = 1):
    """LyCORIS' own network with its `full` preset on `unet` (lora_dim and conv_dim `rank`, so 3x3 convolutions count
    too). lycoris-lora 4.1.3 names the time embedding's linears twice, by its block class (TimestepEmbedding) and by
    name, and asserts against the duplicate: built without those names, which the class holds."""
    from lycoris.config import PRESET
    from lycoris.kohya import LycorisNetworkKohya

    preset = dict(PRESET["full"])
    assert "TimestepEmbedding" in preset["unet_target_module"]
    preset["unet_target_name"] = [name for name in preset["unet_target_name"] if not name.startswith("time_embedding.")]
    kept = {key: getattr(LycorisNetworkKohya, key) for key in (
        "ENABLE_CONV", "UNET_TARGET_REPLACE_MODULE", "UNET_TARGET_REPLACE_NAME", "TEXT_ENCODER_TARGET_REPLACE_MODULE",
        "TEXT_ENCODER_TARGET_REPLACE_NAME", "MODULE_ALGO_MAP", "NAME_ALGO_MAP", "USE_FNMATCH", "TARGET_EXCLUDE_NAME")}
    try:
        LycorisNetworkKohya.apply_preset(preset)
        return LycorisNetworkKohya(None, unet, lora_dim=rank, conv_lora_dim=rank, warn_on_unmatched=False)
    finally:
        for key, value in kept.items():
            setattr(LycorisNetworkKohya, key, value)


@pytest.mark.parametrize("family", ["tiny-random", "tiny-sdxl-random"])
def test_the_full_family_is_the_layers_lycoris_full_preset_takes(family, built):
    pytest.importorskip("lycoris.kohya")
    from sdtune.kohya import UNET_PREFIX, kohya_name
    from sdtune.methods.base import layer_family
    from sdtune.models import load_pipeline

    unet = load_pipeline(family).unet
    ours = {kohya_name(UNET_PREFIX, name) for name in layer_family(unet, "full")}
    assert {module.lora_name for module in lycoris_full_preset_network(unet).unet_loras} == ours
    assert {"lora_unet_conv_in", "lora_unet_time_embedding_linear_2"} < ours
    assert ("lora_unet_add_embedding_linear_1" in ours) == (family == "tiny-sdxl-random")


def test_a_file_lycoris_wrote_with_its_full_preset_on_sdxl_starts_a_full_run(built, tmp_path):
    """LyCORIS' network with the full preset on diffusers' SDXL UNet, saved by LyCORIS (its diffusers spelling:
    `lora_unet_add_embedding_linear_1`, `lora_unet_conv_in`): a run started from it takes `full`, every layer from
    the file, and sdtune's reader computes what LyCORIS' own forward does."""
    pytest.importorskip("lycoris.kohya")
    from sdtune.starting_weights import fresh_layers, kohya_layer_options, kohya_unet_layers, read_kohya_header

    pipe = fresh_unet("tiny-sdxl-random")
    network = lycoris_full_preset_network(pipe.unet, rank=2)
    network.apply_to(None, pipe.unet, apply_text_encoder=False, apply_unet=True)
    generator = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for name, parameter in network.named_parameters():
            if "lora_up" in name:  # LyCORIS starts them at zero
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.1)
    path = tmp_path / "lycoris-full.safetensors"
    network.save_weights(str(path), None, {"ss_network_module": "lycoris.kohya", "ss_base_model_version": "sdxl_base_v1-0",
                                           "ss_network_args": json.dumps({"preset": "full", "algo": "locon", "conv_dim": "2"})})
    header = read_kohya_header(path)
    assert {"lora_unet_add_embedding_linear_1", "lora_unet_conv_in", "lora_unet_time_embedding_linear_2"} <= set(header.shapes)

    lora = methods.method_class("lora")
    layers = kohya_unet_layers("tiny-sdxl-random", header)
    assert kohya_layer_options(lora, layers) == {"targets": "full"} and fresh_layers(lora(targets="full"), layers) == ""
    inputs = unet_inputs(pipe)
    with torch.no_grad():
        lycoris_output = run_unet(pipe.unet, inputs)
    ours = fresh_unet("tiny-sdxl-random")
    assert (run_unet(ours.unet, inputs) - lycoris_output).abs().max() > 1e-4
    load_adapter(path, ours)
    torch.testing.assert_close(run_unet(ours.unet, inputs), lycoris_output, rtol=0, atol=1e-5)


def test_evaluate_and_compare_an_sd2_run(built, metric_models, tmp_path):
    """evaluate samples the run's model (v-prediction) and measures it; compare reads the result."""
    import sdtune
    from sdtune.config import EvaluateConfig
    from sdtune.training import train

    run = train(train_config("tiny-sd2-random", tmp_path / "run", steps=2, checkpoint_every=0), progress=False).output
    clip_path, dino_path = metric_models
    result = sdtune.evaluate(
        EvaluateConfig(run=str(run), num_images=2, steps=1, clip_model=str(clip_path), dino_model=str(dino_path), fid_features="dino")
    )
    report = json.loads(result.output.read_text())
    assert report["generated_images"] == 2 and set(report["metrics"]) >= {"clip_t", "clip_i", "dino", "fid"}
    compared = sdtune.compare([str(run)], str(tmp_path / "compare"))
    assert compared.files


def test_sdxl_vae_in_fp16_gets_the_no_half_vae_advice(built):
    import warnings

    from sdtune.precision import warn_half_vae

    sdxl, sd2 = load("tiny-sdxl-random"), load("tiny-sd2-random")
    with pytest.warns(UserWarning, match="add --no-half-vae"):
        warn_half_vae(sdxl, torch.float16, no_half_vae=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        warn_half_vae(sdxl, torch.float16, no_half_vae=True)
        warn_half_vae(sdxl, torch.bfloat16, no_half_vae=False)
        warn_half_vae(sd2, torch.float16, no_half_vae=False)


def test_an_adapter_refuses_another_familys_model(built, tmp_path):
    from sdtune.errors import SdtuneError

    pipe = fresh_unet("tiny-sd2-random")
    method = methods.create("atoms")
    method.inject(pipe.unet)
    path = save_adapter(tmp_path / "sd2.safetensors", method, "tiny-sd2-random")
    with pytest.raises(SdtuneError, match=r"\(trained on base model 'tiny-sd2-random'\) does not fit this model"):
        load_adapter(path, fresh_unet("tiny-sdxl-random"))


def test_zero_terminal_snr_models_sample_with_rescaled_guidance(tmp_path, monkeypatch):
    """A model whose scheduler is zero-terminal-SNR samples with guidance rescale 0.7 unless told otherwise."""
    from diffusers import StableDiffusionPipeline

    from sdtune.config import SampleConfig
    from sdtune.errors import SdtuneError
    from sdtune.models import load_pipeline
    from sdtune.sampling import guidance_rescale, sample

    pipe = load_pipeline("tiny-sd2-random")
    plain = SampleConfig(prompt=["x"], model="tiny-sd2-random")
    assert guidance_rescale(plain, pipe) == 0.0
    pipe.scheduler.register_to_config(rescale_betas_zero_snr=True, timestep_spacing="trailing")
    assert guidance_rescale(plain, pipe) == 0.7
    assert guidance_rescale(SampleConfig(prompt=["x"], guidance_rescale=0.2), pipe) == 0.2
    with pytest.raises(SdtuneError, match=r"^guidance_rescale must be in \[0, 1\], got 1.5$"):
        SampleConfig(prompt=["x"], guidance_rescale=1.5).validate()

    seen = []
    call = StableDiffusionPipeline.__call__

    def recording(self, *args, **kwargs):
        seen.append(kwargs.get("guidance_rescale"))
        return call(self, *args, **kwargs)

    monkeypatch.setattr(StableDiffusionPipeline, "__call__", recording)
    sample(SampleConfig(prompt=["x"], model="tiny-sd2-random", num_images=1, steps=2, guidance_rescale=0.3,
                        output=str(tmp_path / "out")), progress=False)
    assert seen == [0.3]


@pytest.mark.parametrize("format", ["diffusers", "peft"])
def test_sdxl_text_encoder_exports_load_on_both_encoders(format, built, tmp_path):
    """SDXL's second encoder (CLIPTextModelWithProjection) keeps CLIP's layers under `text_model.`, which
    transformers 5's CLIPTextModel dropped: diffusers' load_lora_weights and PeftModel put the exported
    update on both encoders as sdtune does."""
    from peft import PeftModel

    from sdtune.export import export_adapter

    family = "tiny-sdxl-random"
    pipe = load(family)
    method = methods.create("lora")
    method.inject(pipe.unet, [pipe.text_encoder, pipe.text_encoder_2])
    with torch.no_grad():
        for parameter in method.trainable_parameters():
            parameter.add_(torch.randn(parameter.shape, generator=torch.Generator().manual_seed(7)) * 0.05)
    adapter = save_adapter(tmp_path / "a.safetensors", method, family, placeholder="<castle>", token="sks castle")
    ids = pipe.tokenizer(["a photo of sks castle"], padding="max_length", max_length=77, return_tensors="pt").input_ids

    def encoded(first, second):
        with torch.no_grad():
            return first(ids)[0], second(ids).text_embeds

    tuned = encoded(pipe.text_encoder, pipe.text_encoder_2)
    plain = load(family)
    untuned = encoded(plain.text_encoder, plain.text_encoder_2)
    assert all((a - b).abs().max() > 1e-4 for a, b in zip(tuned, untuned))
    if format == "diffusers":
        export_adapter(adapter, "diffusers", tmp_path / "lora.safetensors")
        plain.load_lora_weights(str(tmp_path / "lora.safetensors"))
        loaded = encoded(plain.text_encoder, plain.text_encoder_2)
    else:
        export_adapter(adapter, "peft", tmp_path / "peft")
        loaded = encoded(PeftModel.from_pretrained(plain.text_encoder, str(tmp_path / "peft" / "text_encoder")),
                         PeftModel.from_pretrained(plain.text_encoder_2, str(tmp_path / "peft" / "text_encoder_2")))
    for got, want in zip(loaded, tuned):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


@pytest.mark.parametrize("held_out,buckets", [(0, False), (2, False), (0, True)])
def test_sdxl_validation_loss_has_each_images_size_and_crop(held_out, buckets, built, tmp_path):
    """The validation loss conditions SDXL on each image's original size and crop, as training does (held-out
    images and the square copies buckets measure on were framed without them: 'neither resized nor cropped')."""
    from PIL import Image

    from sdtune.training import open_trainer

    photos = tmp_path / "photos"
    photos.mkdir()
    sizes = [(96, 48), (40, 80), (64, 64), (50, 50), (70, 35)]  # (width, height)
    for index, (width, height) in enumerate(sizes):
        Image.new("RGB", (width, height), (40 * index, 90, 200)).save(photos / f"{index}.png")
    settings = train_config("tiny-sdxl-random", tmp_path / "run", images=[str(photos)], validate_every=1, steps=1,
                            checkpoint_every=0, validation_images=held_out, buckets=buckets)
    with open_trainer(settings, progress=False) as trainer:
        time_ids = trainer.validation_loss.prompt_embeds.time_ids
        framed = {(h, w): (top, left) for h, w, top, left, *_ in time_ids.tolist()}
    # each image at 32 px, center-cropped: (original height, width) -> (crop top, left) in the resized image
    expected = {(48, 96): (0, 16), (80, 40): (16, 0), (64, 64): (0, 0), (50, 50): (0, 0), (35, 70): (0, 16)}
    assert framed and all(expected[size] == crop for size, crop in framed.items()), framed
    assert len(framed) == (held_out or len(sizes)) and time_ids[:, 4:].eq(32).all()
