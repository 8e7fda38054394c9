"""The memory check's parts (sdtune/limits.py) against what PyTorch keeps: the tensors a method forms for
backward, the trained text encoders' activations, prior preservation's class images and batches."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from sdtune import methods
from sdtune.config import TrainConfig
from sdtune.errors import SdtuneError
from sdtune import limits
from sdtune.limits import text_encoder_backward_bytes
from sdtune.methods.base import DeltaLayer
from sdtune.models import read_model_configs


def config(output, **settings) -> TrainConfig:
    return TrainConfig(model="tiny-random", output=str(output), **{"steps": 2, "seed": 3, **settings})


def saved_bytes(run, exclude=()) -> int:
    """Bytes of the distinct storages autograd saves for backward while `run()` runs, but `exclude`'s."""
    skip = {tensor.untyped_storage().data_ptr() for tensor in exclude}
    seen = {}

    def pack(tensor):
        seen[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        run()
    return sum(size for pointer, size in seen.items() if pointer not in skip)


def layer_saved_bytes(layer: DeltaLayer) -> int:
    """What one wrapped layer's forward saves beyond its input, base weight and trained parameters."""
    base = layer.base_layer
    x = torch.randn(2, base.in_features) if isinstance(base, nn.Linear) else torch.randn(1, base.in_channels, 4, 4)
    x.requires_grad_(True)
    return saved_bytes(lambda: layer(x), [x, base.weight, *layer.parameters()])


@pytest.mark.parametrize("options", [{}, {"targets": "attn"}, {"targets": "all"}, {"block_share": True}, {"cayley_neumann": True}])
def test_oft_states_exactly_what_its_backward_keeps_on_either_route(tiny_pipe, options, monkeypatch):
    """OFT forms W' = W·Rᵀ (and R's blocks) per layer each step on the formed-weight route (CUDA's, and any device's
    under autocast); a CPU's input route turns the input by the blocks and keeps no weight-sized tensor. Its
    `backward_bytes` for the device is what autograd saves on that route."""
    from sdtune.methods import oft

    method = methods.create("oft", **options)
    method.inject(tiny_pipe.unet)
    on_cpu = sum(layer_saved_bytes(layer) for layer in method.layers.values())
    assert method.backward_bytes(4, "cpu", False) == on_cpu
    monkeypatch.setattr(oft, "ROUTE", {})
    measured = sum(layer_saved_bytes(layer) for layer in method.layers.values())
    weights = sum(layer.base_layer.weight.numel() for layer in method.layers.values())
    assert method.backward_bytes(4) == method.backward_bytes(4, "cuda", False) == measured  # the weight route: as before
    assert measured > 4 * weights  # a float32 weight-sized copy per layer, and more
    assert on_cpu < measured
    # under autocast every device takes the weight route
    assert method.backward_bytes(2, "cpu", True) == method.backward_bytes(2, "cuda", True) == method.backward_bytes(2)


@pytest.mark.parametrize("targets", ["conv", "attn"])
def test_oft_under_bf16_autocast_counts_the_weight_route_on_a_cpu(tiny_pipe, targets):
    """Under autocast a CPU's layers form the weight too: the count is the weight route's, exact with bf16 base
    weights and biases."""
    method = methods.create("oft", targets=targets)
    method.inject(tiny_pipe.unet)
    measured = 0
    for layer in method.layers.values():
        base = layer.base_layer.to(torch.bfloat16)
        shape = (2, base.in_features) if isinstance(base, nn.Linear) else (1, base.in_channels, 4, 4)
        x = torch.randn(*shape, dtype=torch.bfloat16, requires_grad=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            measured += saved_bytes(lambda: layer(x), [x, base.weight, *layer.parameters()])
    assert method.backward_bytes(2, "cpu", True) == measured


@pytest.mark.parametrize("options", [{}, {"generator": "simple"}, {"rank": 3, "clusters": 11, "blocks": 3}])
@pytest.mark.parametrize("half", [False, True])
def test_gift_states_exactly_what_its_backward_keeps(tiny_pipe, options, half):
    """GIFT forms ω + Δω per layer, and its generator's float32 tokens, cluster matrices and attention besides (about
    ten times the formed weight on tiny-random): `backward_bytes` is what autograd saves, in fp32 and under bf16."""
    method = methods.create("gift", **options)
    method.inject(tiny_pipe.unet)
    measured = 0
    for layer in method.layers.values():
        base = layer.base_layer.to(torch.bfloat16 if half else torch.float32)
        x = torch.randn(2, base.in_features, dtype=base.weight.dtype, requires_grad=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=half):
            measured += saved_bytes(lambda: layer(x), [x, base.weight, *layer.parameters()])
    compute_bytes = 2 if half else 4
    assert method.backward_bytes(compute_bytes) == measured
    formed = sum(layer.base_layer.weight.numel() for layer in method.layers.values()) * compute_bytes
    assert measured > formed  # what was counted before: the formed weight alone


def test_the_memory_check_adds_what_the_method_keeps_for_backward(tmp_path, monkeypatch, tiny_path):
    from sdtune.limits import probe_method
    from sdtune.methods.oft import Oft
    from sdtune.models import read_model_configs
    from sdtune.training import plan_run

    with_backward = plan_run(config(tmp_path / "a", method="oft")).sizes.step_bytes
    half = plan_run(config(tmp_path / "b", method="oft", mixed_precision="bf16")).sizes
    probe = probe_method(read_model_configs("tiny-random"), methods.create("oft")).method
    device = limits.training_device_type()  # this machine's: a CPU's input route, or CUDA's weight route
    full, halved = probe.backward_bytes(4, device, False), probe.backward_bytes(2, device, True)
    weight_route, input_route = probe.backward_bytes(4, "cuda", False), probe.backward_bytes(4, "cpu", False)
    monkeypatch.setattr(Oft, "backward_bytes", lambda self, compute_bytes, device_type="cuda", autocast=False: 0)
    without = plan_run(config(tmp_path / "c", method="oft")).sizes.step_bytes
    assert with_backward - without == full > 0
    assert half.step_bytes - plan_run(config(tmp_path / "d", method="oft", mixed_precision="bf16")).sizes.step_bytes == halved
    weights = sum(layer.base_layer.weight.numel() for layer in probe.layers.values())
    # under bf16 the formed weight is half as large, and the einsum keeps W cast to bf16 besides
    assert weight_route - 4 * weights == halved - 2 * 2 * weights
    assert input_route < weight_route  # a CPU's input route keeps the turning blocks, no formed weight
    assert half.step_bytes < with_backward


def test_the_trained_text_encoders_activations_are_counted(tmp_path, tiny_pipe, monkeypatch, tiny_path):
    """The inputs of every tuned linear of the text encoder, a lower bound of what its forward saves."""
    from sdtune.methods.base import Method
    from sdtune.training import plan_run

    method = methods.create("lora")
    encoder = tiny_pipe.text_encoder
    method.inject(tiny_pipe.unet, [encoder])
    per_prompt = method.text_encoder_activation_bytes(77, 4)
    hidden, inner, layers = encoder.config.hidden_size, encoder.config.intermediate_size, encoder.config.num_hidden_layers
    assert per_prompt == layers * (3 * hidden + inner) * 77 * 4  # q/k/v's shared input, out_proj's, fc1's, fc2's
    ids = torch.zeros(1, 77, dtype=torch.long)
    measured = saved_bytes(lambda: encoder(ids), list(encoder.parameters()))
    assert per_prompt <= measured

    def device_bytes(name, **settings):
        return plan_run(config(tmp_path / name, method="lora", train_text_encoder=True, batch_size=2, **settings)).sizes.step_bytes

    through = text_encoder_backward_bytes(read_model_configs("tiny-random"), 4)
    counted = device_bytes("a")
    monkeypatch.setattr(Method, "text_encoder_activation_bytes", lambda self, tokens, compute_bytes: 0)
    monkeypatch.setattr(limits, "text_encoder_backward_bytes", lambda configs, compute_bytes: 0)
    assert counted - device_bytes("b") == 2 * max(per_prompt, through)  # a batch of two prompts, the larger measure


def frozen_encoder_with_new_rows(pipe):
    """The text encoder frozen, its token embedding given one trainable row (what --token-embeddings adds)."""
    from sdtune.token_embeddings import _module_class

    encoder = pipe.text_encoder
    encoder.requires_grad_(False)
    base = encoder.get_input_embeddings()
    encoder.set_input_embeddings(_module_class()(base, base.weight[:1].detach().clone(), base.num_embeddings - 1))
    return encoder


def test_new_token_rows_count_the_activations_their_backward_keeps_through_the_frozen_text_encoder(tmp_path, tiny_pipe, monkeypatch, tiny_path):
    """With --token-embeddings alone the gradient still passes through every layer of the frozen text encoder to
    the rows: its LayerNorms', attention's and MLP activation's inputs are kept, and counted per prompt."""
    from sdtune.training import plan_run

    encoder = frozen_encoder_with_new_rows(tiny_pipe)
    c = encoder.config
    per_prompt = text_encoder_backward_bytes(read_model_configs("tiny-random"), 4)
    assert per_prompt == (c.num_hidden_layers * (6 * c.hidden_size + 2 * c.intermediate_size) + c.hidden_size) * 77 * 4
    ids = torch.full((1, 77), encoder.get_input_embeddings().first_id)  # every position a new token
    measured = saved_bytes(lambda: encoder(ids), [p for p in encoder.parameters() if not p.requires_grad])
    assert per_prompt <= measured < 1.05 * per_prompt  # the rest: LayerNorm statistics and attention's logsumexp
    half = text_encoder_backward_bytes(read_model_configs("tiny-random"), 2)
    assert 2 * half == per_prompt

    def device_bytes(name, **settings):
        return plan_run(config(tmp_path / name, batch_size=2, **settings)).sizes.step_bytes

    # two prompts' activations, and the two new rows with their gradients and AdamW's two moments
    rows = 2 * c.hidden_size
    assert device_bytes("tokens", token_embeddings=2) - device_bytes("plain") == 2 * per_prompt + rows * (4 + 4 + 8)


def test_prior_preservation_holds_a_class_example_per_concept_example_and_every_class_image(tmp_path, tiny_path):
    from PIL import Image

    from sdtune.training import plan_run

    classes = tmp_path / "classes"
    classes.mkdir()
    for index in range(5):
        Image.new("RGB", (32, 32), (index * 40, 0, 0)).save(classes / f"{index}.png")
    plain = plan_run(config(tmp_path / "plain", batch_size=2)).sizes
    prior = plan_run(config(tmp_path / "prior", batch_size=2, class_images=str(classes), class_prompt="a castle")).sizes
    image = 3 * plain.resolution**2 * 4
    latents = 2 * 4 * (plain.resolution // 8) ** 2 * 4  # the cached mean and log-variance the batches hold
    assert prior.host_bytes - plain.host_bytes == 5 * image  # every image of the folder, as training loads them
    assert prior.step_bytes - plain.step_bytes == 2 * latents  # two class examples beside the two concept ones
    uncached = dict(batch_size=2, cache_latents=False)
    plain = plan_run(config(tmp_path / "plain-uncached", **uncached)).sizes
    prior = plan_run(config(tmp_path / "prior-uncached", **uncached, class_images=str(classes), class_prompt="a castle")).sizes
    assert prior.step_bytes - plain.step_bytes == prior.encoding_bytes - plain.encoding_bytes == 2 * image  # their pixels
    fewer = plan_run(config(tmp_path / "fewer", batch_size=2, class_images=str(classes), class_prompt="a castle", num_class_images=3)).sizes
    assert fewer.host_bytes - plain.host_bytes == 3 * image


def test_bucketed_class_images_are_counted_as_often_as_they_are_framed(tmp_path, tiny_path):
    """With --buckets each class image is framed into every bucket that draws on it (prior.bucketed_class_images):
    square class images serve the square bucket and, having no wide one beside them, the wide bucket too, so RAM holds
    them twice; and each image is held at its bucket's size, which holds at most the resolution squared."""
    from PIL import Image

    from sdtune.buckets import bucket_sizes, nearest_bucket
    from sdtune.prior import bucketed_class_images
    from sdtune.training import plan_run

    photos, classes = tmp_path / "photos", tmp_path / "classes"
    photos.mkdir()
    classes.mkdir()
    for index in range(2):
        Image.new("RGB", (64, 64), (index * 40, 0, 0)).save(photos / f"square-{index}.png")
        Image.new("RGB", (128, 64), (index * 40, 0, 0)).save(photos / f"wide-{index}.png")
    for index in range(5):
        Image.new("RGB", (64, 64), (index * 40, 0, 0)).save(classes / f"{index}.png")
    settings = dict(batch_size=2, buckets=True, images=str(photos))
    plain = plan_run(config(tmp_path / "plain", **settings)).sizes
    prior = plan_run(config(tmp_path / "prior", **settings, class_images=str(classes), class_prompt="a castle")).sizes
    sizes = bucket_sizes(plain.resolution)
    square, wide = nearest_bucket(64, 64, sizes), nearest_bucket(128, 64, sizes)
    framed, _ = bucketed_class_images(sorted(classes.iterdir()), plain.resolution, [square, wide], 2)
    assert sorted(example.image.size for example in framed) == sorted([square] * 5 + [wide] * 5)  # what training holds
    area = 5 * (square[0] * square[1] + wide[0] * wide[1])
    assert prior.host_bytes - plain.host_bytes == 3 * 4 * area  # float32 RGB, as the dataset holds them
    assert plain.host_bytes == 3 * 4 * 2 * (square[0] * square[1] + wide[0] * wide[1])  # the training images at their buckets'
    assert wide[0] * wide[1] < plain.resolution**2
    assert any("10 class examples" in part for part in prior.held_in_ram)
    drawn = plan_run(config(tmp_path / "drawn", **settings, class_prompt="a castle", num_class_images=3)).sizes
    assert drawn.host_bytes - plain.host_bytes == 3 * 4 * 3 * (square[0] * square[1] + wide[0] * wide[1])  # drawn square
    with pytest.raises(SdtuneError, match=r"^num_class_images=1000000000000 with buckets=True needs more memory"):
        plan_run(config(tmp_path / "huge", **settings, class_prompt="a castle", num_class_images=10**12))


def test_the_vae_encoding_is_counted_apart_from_the_step_with_its_live_maps(tmp_path, tiny_path):
    """The VAE encodes one image at a time under no_grad, before the UNet runs (with cached latents, before the
    loop): its three live full-resolution maps are counted with what is alive then, never with backward's parts."""
    from sdtune.limits import ENCODER_MAPS
    from sdtune.training import plan_run

    configs = read_model_configs("tiny-random")
    maps = ENCODER_MAPS * configs.vae["block_out_channels"][0] * 64 * 64 * 4
    cached = plan_run(config(tmp_path / "cached", method="lora", batch_size=2)).sizes
    vae = sum(p.numel() for p in build_vae(configs).parameters()) * 4
    weights = (cached.unet_frozen + cached.text_frozen) * 4 + vae
    assert cached.encoding_bytes == weights + 4 * cached.trained + maps  # no gradient nor optimiser state yet
    assert cached.device_bytes == max(cached.step_bytes, cached.encoding_bytes)
    uncached = plan_run(config(tmp_path / "uncached", method="lora", batch_size=2, cache_latents=False)).sizes
    # in the loop: AdamW's two moments (the gradients freed by its step) and the batch's pixels
    assert uncached.encoding_bytes == weights + 12 * uncached.trained + 2 * 3 * 64 * 64 * 4 + maps
    # uncached, the VAE stays beside the UNet to encode each batch; cached, it has left the device
    assert uncached.step_bytes - plan_run(config(tmp_path / "uncached-b", method="lora", batch_size=2)).sizes.step_bytes == (
        vae + 2 * 3 * 64 * 64 * 4 - 2 * 2 * 4 * 8 * 8 * 4)  # pixels instead of the latents' mean and log-variance
    large = plan_run(config(tmp_path / "large", method="lora", resolution=512)).sizes
    assert large.device_bytes == large.encoding_bytes > large.step_bytes  # the maps outgrow the step on the tiny model
    assert large.encoding_bytes - cached.encoding_bytes == maps * (512**2 // 64**2 - 1)


def build_vae(configs):
    from diffusers import AutoencoderKL

    with torch.device("meta"):
        return AutoencoderKL.from_config(configs.vae)


def test_fp16_training_counts_the_vae_decoders_fp32_weights_kept_on_the_host(tmp_path, tiny_path):
    """fp16 training keeps the decoder side's fp32 weights in RAM for validation images whose fp16 decode
    overflows (`precision.place_frozen_models`); bf16, fp32 and --no-half-vae keep none."""
    from sdtune.precision import decoder_side_names
    from sdtune.training import plan_run

    vae = build_vae(read_model_configs("tiny-random"))
    decoder = sum(p.numel() for name, p in vae.named_parameters() if name in decoder_side_names(vae))
    sizes = {precision: plan_run(config(tmp_path / precision, method="lora", mixed_precision=precision)).sizes
             for precision in ("no", "bf16", "fp16")}
    kept_fp32 = plan_run(config(tmp_path / "fp32-vae", method="lora", mixed_precision="fp16", no_half_vae=True)).sizes
    assert sizes["fp16"].host_bytes - sizes["bf16"].host_bytes == 4 * decoder > 0
    assert sizes["bf16"].host_bytes == sizes["no"].host_bytes == kept_fp32.host_bytes
    memory_line = next(line for line in plan_run(config(tmp_path / "fp16", mixed_precision="fp16")).summary() if line.startswith("memory"))
    assert memory_line.endswith("of RAM for the training images and the VAE decoder's fp32 weights (for overflowing fp16 decodes)")
    # the VAE's weights are stored in the compute dtype, unless --no-half-vae keeps them in fp32
    vae_bytes = sum(p.numel() for p in vae.parameters())
    assert kept_fp32.encoding_bytes - sizes["fp16"].encoding_bytes >= 2 * vae_bytes


def test_sampling_refuses_a_resolution_whose_decoding_cannot_fit(monkeypatch, tmp_path, tiny_path):
    """On a 16 GB machine the tiny model's 8192 px decode needs three 32-channel float32 maps of 8192² (24 GB):
    refused in one line before the model loads; SD's and SDXL's usual sizes pass on an 8 GB GPU."""
    from test_cli import assert_one_line_error, invoke

    from sdtune import limits, models

    monkeypatch.setattr(limits, "device_memory", lambda: None)
    monkeypatch.setattr(limits, "ram_bytes", lambda: 16 * 2**30)
    result = invoke("sample", "--model", "tiny-random", "--prompt", "a castle", "--resolution", 8192, "--output", tmp_path / "out")
    assert_one_line_error(result, 2, "--resolution 8192 needs more memory than there is: 24.0 GB for one image's last "
                                     "VAE decoder feature maps alone, and this machine has 16.0 GB of memory")
    assert not (tmp_path / "out").exists()
    assert limits.check_drawing_fits("tiny-random", 4096, 20) == (4096, 4096)

    # width x height counts: 4096 x 16384 has 8192²'s pixels, whatever --resolution says
    result = invoke("sample", "--model", "tiny-random", "--prompt", "a castle", "--resolution", 64, "--width", 4096,
                    "--height", 16384, "--output", tmp_path / "out")
    assert_one_line_error(result, 2, "--width 4096 --height 16384 needs more memory than there is: 24.0 GB for one image's "
                                     "last VAE decoder feature maps alone")
    assert not (tmp_path / "out").exists()
    assert limits.check_drawing_fits("tiny-random", None, 20, width=8192) == (8192, 64)  # the other side: the model's own
    assert limits.check_drawing_fits("tiny-random", 8192, 20, height=64) == (8192, 64)
    # the images a sample keeps for its grid, and the grid itself, at width x height too (cells of their aspect)
    from sdtune.config import SampleConfig
    from sdtune.errors import SdtuneError
    from sdtune.sampling import grid_size

    many = dict(prompt=["a castle"], num_images=2400, steps=1)
    assert limits.check_sample_fits("tiny-random", SampleConfig(**many, resolution=64), 1, grid_size) == (64, 64)
    with pytest.raises(SdtuneError, match=r"^--num-images 2,400 for 1 prompt\(s\) needs more memory than there is: .* "
                                          r"for the 2,400 image\(s\) kept for the grid alone"):
        limits.check_sample_fits("tiny-random", SampleConfig(**many, width=64, height=8192), 1, grid_size)

    monkeypatch.setattr(limits, "device_memory", lambda: (8 * 2**30, "the GPU has 8.0 GB"))
    vae = {"block_out_channels": [128, 256, 512, 512], "norm_num_groups": 32}
    for pipeline, unet, size in (("StableDiffusionPipeline", models.sd14_unet_config(), 768),
                                 ("StableDiffusionXLPipeline", {**models.sd14_unet_config(), "sample_size": 128}, 1024)):
        configs = models.ModelConfigs(pipeline, unet, vae, {"num_train_timesteps": 1000})
        monkeypatch.setattr(models, "read_model_configs", lambda model, configs=configs: configs)
        assert limits.check_drawing_fits("some/model", size, 30, images=4) == (size, size)
