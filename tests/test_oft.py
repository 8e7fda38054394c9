"""OFT (orthogonal fine-tuning): peft's maths on sdtune's W + S·ΔW layers, its counts, its files and its options.

The method contract (zero at init, training, save/load, merge, strength, unmerge) runs in
test_methods_contract.py, the kohya exports in test_export.py, the text encoder in
test_text_encoder_training.py; here is what is OFT's own.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from sdtune import methods
from sdtune.adapter import save_adapter
from sdtune.errors import SdtuneError
from sdtune.export import export_adapter
from sdtune.methods.oft import OftLayer, OftOptions, layer_block_size
from helpers import run_unet


def perturbed(layer: OftLayer, scale: float = 0.3) -> OftLayer:
    with torch.no_grad():
        layer.oft_R.weight.copy_(torch.randn(layer.oft_R.weight.shape, generator=torch.Generator().manual_seed(3)) * scale)
    return layer


def peft_layer(base: nn.Module, options: OftOptions, weight: torch.Tensor):
    """peft's own OFT layer on a copy of `base`, holding `weight` as its Q numbers."""
    import copy

    from peft import OFTConfig
    from peft.tuners.oft.layer import Conv2d, Linear

    config = OFTConfig(
        r=0, oft_block_size=options.block_size, target_modules=["x"], block_share=options.block_share,
        use_cayley_neumann=options.cayley_neumann, num_cayley_neumann_terms=options.neumann_terms,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # peft warns where it adjusts the block size
        layer = (Conv2d if isinstance(base, nn.Conv2d) else Linear)(copy.deepcopy(base), "default", config=config, r=0)
    with torch.no_grad():
        layer.oft_R["default"].weight.copy_(weight)
    return layer


@pytest.mark.parametrize("kind", ["linear", "conv3x3", "conv1x1"])
@pytest.mark.parametrize("options", [{}, {"cayley_neumann": True}, {"block_share": True}], ids=["exact", "neumann", "shared"])
def test_the_update_is_peft_merge(kind, options):
    """W + ΔW is the weight peft's own merge writes (W·Rᵀ over the c_in·k·k side), block sizes adjusted as peft does."""
    torch.manual_seed(0)
    base = {"linear": nn.Linear(64, 24), "conv3x3": nn.Conv2d(4, 8, 3, padding=1), "conv1x1": nn.Conv2d(48, 8, 1)}[kind]
    opts = OftOptions(block_size=8, **options)
    layer = perturbed(OftLayer(base, opts))
    reference = peft_layer(base, opts, layer.oft_R.weight.detach())
    assert reference.oft_block_size["default"] == layer.oft_R.block_size  # conv3x3: D = 36, b = 9 in both
    reference.merge()
    torch.testing.assert_close(base.weight + layer.delta_weight(), reference.get_base_layer().weight, rtol=0, atol=1e-6)
    x = torch.randn(2, 4, 6, 6) if kind == "conv3x3" else torch.randn(2, 48, 5, 5) if kind == "conv1x1" else torch.randn(3, 64)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), reference(x), rtol=0, atol=1e-5)  # merged peft computes as we do


def test_peft_unmerged_forward_on_a_3x3_conv_is_not_the_base():
    """Why the layers compute W + S·ΔW themselves: peft 0.21.2's unmerged forward on a 3×3 convolution sums
    overlapping patches, so even at R = I its output is not the base's (if peft fixes this, this test says so)."""
    torch.manual_seed(0)
    base = nn.Conv2d(4, 8, 3, padding=1)
    opts = OftOptions(block_size=9)
    ours = OftLayer(base, opts)
    theirs = peft_layer(base, opts, ours.oft_R.weight.detach())
    x = torch.randn(1, 4, 6, 6)
    with torch.no_grad():
        assert torch.equal(ours(x), base(x))
        assert (theirs(x) - base(x)).abs().max() > 1e-2


def test_a_rotation_keeps_the_neurons_angles_and_strength_scales_the_difference():
    """Exact Cayley: R is orthogonal, so W' = W·Rᵀ keeps W·Wᵀ (every neuron's norm and pairwise angle, the
    paper's hyperspherical energy); strength S gives W + S·(W' − W), LyCORIS' diag-oft multiplier's rule."""
    torch.manual_seed(0)
    base = nn.Linear(64, 16)
    layer = perturbed(OftLayer(base, OftOptions(block_size=16)))
    blocks = layer.rotation()
    torch.testing.assert_close(blocks @ blocks.transpose(1, 2), torch.eye(16).expand(4, 16, 16), rtol=0, atol=1e-5)
    rotated = base.weight + layer.delta_weight()
    torch.testing.assert_close(rotated @ rotated.T, base.weight @ base.weight.T, rtol=0, atol=1e-5)
    assert (rotated - base.weight).abs().max() > 1e-2

    x = torch.randn(5, 64)
    layer.scale = 0.25
    with torch.no_grad():
        torch.testing.assert_close(layer(x), x @ (base.weight + 0.25 * (rotated - base.weight)).T + base.bias, rtol=0, atol=1e-5)
        layer.scale = 0.0
        assert torch.equal(layer(x), base(x))


def test_block_sizes_follow_peft_where_they_do_not_divide():
    from peft.tuners.oft.layer import OFTLayer

    for dim in (36, 37, 320, 768, 2880, 5, 64):
        for wanted in (2, 3, 8, 16, 32, 33, 64, 100):
            assert layer_block_size(dim, wanted) == (wanted if dim % wanted == 0 else OFTLayer.adjust_oft_parameters(None, dim, wanted))


# SD v1.4's attention projections: 16 transformer blocks of width w (320, 640, 1280: Σw = 5·320 + 5·640 + 6·1280 =
# 12,480); each has 6 projections of input w (attn1 q/k/v/out, attn2 q/out) and 2 of input 768 (attn2 k/v).
ATTN_INPUTS = 6 * 12_480 + 16 * 2 * 768  # Σ D over the 128 projections: 99,456


def per_block(b: int) -> int:
    return b * (b - 1) // 2


# The 52 3x3 convolutions: D = 9·c_in, Σ c_in = 55,680 without conv_in, whose D = 4·9 = 36 takes b = 36 (b = 18
# for 16); the 46 1x1 convolutions: D = c_in, Σ c_in = 47,040.
CONV_INPUTS = 9 * 55_680 + 47_040  # 548,160

SD14_OFT_COUNTS = [
    ({}, CONV_INPUTS // 32 * per_block(32) + per_block(36)),  # 17,130 blocks of 32×32 + conv_in's 36×36: 8,497,110
    ({"block_size": 16}, CONV_INPUTS // 16 * per_block(16) + 2 * per_block(18)),  # 4,111,506
    ({"block_share": True}, 97 * per_block(32) + per_block(36)),  # one block a layer: 48,742
    ({"targets": "attn"}, ATTN_INPUTS // 32 * per_block(32)),  # 3,108 blocks of 32×32: 1,541,568
    ({"targets": "attn", "block_size": 64}, ATTN_INPUTS // 64 * per_block(64)),  # 1,554 blocks: 3,132,864
    ({"targets": "all"}, (ATTN_INPUTS + CONV_INPUTS) // 32 * per_block(32) + per_block(36)),  # 10,038,678
    ({"targets": "conv3x3", "block_size": 16}, 9 * 55_680 // 16 * per_block(16) + 2 * per_block(18)),
]


@pytest.mark.parametrize("options,count", SD14_OFT_COUNTS, ids=[str(o) for o, _ in SD14_OFT_COUNTS])
def test_sd14_parameter_counts(options, count):
    from sdtune.models import build_sd14_unet

    method = methods.create("oft", **options)
    method.inject(build_sd14_unet("meta"))
    assert method.num_parameters() == count
    readme = {0: 8_497_110, 1: 4_111_506, 2: 48_742, 3: 1_541_568, 5: 10_038_678}  # the README's numbers
    assert all(SD14_OFT_COUNTS[index][1] == number for index, number in readme.items())


def tuned(options, path):
    from sdtune.models import load_pipeline

    pipe = load_pipeline("tiny-random")
    method = methods.create("oft", **options)
    method.inject(pipe.unet)
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for parameter in method.trainable_parameters():
            parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.05)
    save_adapter(path, method, "tiny-random", placeholder="<castle>", token="sks castle")
    return pipe


@pytest.fixture
def inputs(unet_inputs):
    latents = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(5))
    return (latents, *unet_inputs[1:])


@pytest.mark.parametrize("options", [{"targets": "attn"}, {"targets": "attn", "block_share": True, "cayley_neumann": True},
                                     {"block_size": 16}], ids=["attn", "attn-shared-neumann", "conv"])
def test_peft_folder_loads_with_peft(options, tmp_path, inputs):
    from peft import PeftModel

    from sdtune.models import load_pipeline

    expected = run_unet(tuned(options, tmp_path / "a.safetensors").unet, inputs)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        export_adapter(tmp_path / "a.safetensors", "peft", tmp_path / "peft")
    convs = options.get("targets", "conv") != "attn"
    assert any("merge_and_unload()" in str(w.message) for w in record) == convs
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = PeftModel.from_pretrained(load_pipeline("tiny-random").unet, str(tmp_path / "peft"))
    if convs:  # peft's unmerged 3x3 convolutions are wrong (the warning; here, on 2x2 maps, they fail); merged, right
        model = model.merge_and_unload()
    torch.testing.assert_close(run_unet(model, inputs), expected, rtol=0, atol=1e-4)


def test_kohya_export_is_full_weight_diffs_that_sdtune_reads_back(tmp_path, inputs):
    """LyCORIS' oft_blocks rotate the output side: no form of peft's input-side rotation; the file holds W' − W."""
    from safetensors.torch import load_file

    from sdtune.adapter import load_adapter
    from sdtune.models import load_pipeline

    expected = run_unet(tuned({"targets": "all"}, tmp_path / "a.safetensors").unet, inputs)
    export_adapter(tmp_path / "a.safetensors", "kohya", tmp_path / "k.safetensors")
    state = load_file(tmp_path / "k.safetensors")
    assert {key.partition(".")[2] for key in state} == {"diff"}
    assert state["lora_unet_down_blocks_0_resnets_0_conv1.diff"].shape == (32, 32, 3, 3)
    pipe = load_pipeline("tiny-random")
    load_adapter(tmp_path / "k.safetensors", pipe)
    torch.testing.assert_close(run_unet(pipe.unet, inputs), expected, rtol=0, atol=1e-5)


def test_coft_keeps_each_layer_within_its_radius(tiny_pipe, unet_inputs):
    """COFT projects Q back into a ball of radius eps/√n (n blocks) at each forward, as peft's forward does."""
    torch.manual_seed(0)
    eps = 1e-3
    method = methods.create("oft", coft=True, eps=eps)
    optimizer = torch.optim.AdamW(method.inject(tiny_pipe.unet), lr=1e-2)
    target = torch.randn(unet_inputs[0].shape, generator=torch.Generator().manual_seed(3))
    for _ in range(3):
        optimizer.zero_grad()
        torch.nn.functional.mse_loss(tiny_pipe.unet(*unet_inputs).sample, target).backward()
        optimizer.step()
    with torch.no_grad():
        tiny_pipe.unet(*unet_inputs)  # projects the last step's values
    moved = 0
    for layer in method.layers.values():
        rotation = layer.oft_R
        skew = rotation._pytorch_skew_symmetric(rotation.weight, rotation.block_size)
        norms = torch.linalg.matrix_norm(skew)
        assert (norms <= eps / rotation.weight.shape[0] ** 0.5 * (1 + 1e-5)).all()
        moved += int((norms > 0).sum())
    assert moved, "training moved the rotations"


@pytest.mark.parametrize("options,message", [
    ({"block_size": 1}, "--oft-block-size must be a whole number of at least 2, got 1"),
    ({"block_size": 8.5}, "--oft-block-size must be a whole number of at least 2, got 8.5"),
    ({"block_size": True}, "--oft-block-size must be a whole number of at least 2, got True"),
    ({"targets": "ff"}, "oft targets 'ff' is not available; choose: conv, conv3x3, attn, all, transformer, locon"),
    ({"coft": "yes"}, "oft option coft must be true or false, got 'yes'"),
    ({"eps": 0}, "oft option eps must be a positive number (and finite), got 0"),
    ({"eps": float("nan")}, "oft option eps must be a positive number (and finite), got nan"),
    ({"neumann_terms": 1}, "oft option neumann_terms must be a whole number of at least 2, got 1"),
    ({"module_dropout": 0.1}, "method 'oft' has no option(s) module_dropout"),
])
def test_bad_options_are_one_line(options, message):
    with pytest.raises(SdtuneError) as error:
        methods.create("oft", **options)
    assert str(error.value).startswith(message) and "\n" not in str(error.value)


def test_the_block_size_flag_reaches_the_method_before_the_model_loads(tmp_path, monkeypatch):
    import sdtune.models
    from sdtune.cli import app

    expected = methods.create("oft", block_size=16, targets="attn")
    expected.inject(sdtune.models.load_pipeline("tiny-random").unet)
    monkeypatch.setattr(sdtune.models, "load_pipeline", lambda *a, **k: pytest.fail("loaded the model"))
    result = CliRunner().invoke(app, ["train", "--model", "tiny-random", "--method", "oft", "--oft-block-size", "16",
                                      "-o", "targets=attn", "--dry-run", "--output", str(tmp_path / "run")])
    assert result.exit_code == 0, result.output
    first = result.output.splitlines()[0]
    assert first.startswith("oft (block_size=16, targets=attn,") and f": {expected.num_parameters():,} trained" in first
    assert "lr 3e-05" in result.output


@pytest.mark.parametrize("geometry", [
    # (c_in, c_out, kernel, stride, padding, dilation, block, batch, height, width)
    (5, 7, 3, 1, 1, 1, 5, 2, 6, 6),  # blocks of 5 across channels' 9 taps; the formed weight's forward
    (4, 9, 3, 2, 1, 1, 3, 3, 5, 4),  # stride 2
    (6, 3, (3, 2), (2, 1), (2, 0), (2, 1), 4, 2, 7, 5),  # a 3x2 kernel, dilation, uneven padding
    (5, 40, 3, 1, 1, 1, 9, 3, 2, 2),  # more output channels than batch·positions: the rotated input's forward,
    (5, 100, 3, 1, 1, 1, 9, 1, 9, 9),  # with the batch folded into the GEMMs above and per image here
    (8, 5, 1, 1, 0, 1, 4, 2, 3, 3),  # 1x1
])
def test_the_input_route_is_the_rotated_weights_convolution(geometry):
    """InputRotatedConv (a CPU's route for OFT on convolutions: no weight gradient, no formed weight kept) equals
    conv2d(x, W·Aᵀ by blocks), values and gradients for x and A, by gradcheck in float64."""
    from sdtune.methods.oft import InputRotatedConv

    c_in, c_out, kernel, stride, padding, dilation, size, batch, height, width = geometry
    torch.manual_seed(0)
    conv = nn.Conv2d(c_in, c_out, kernel, stride=stride, padding=padding, dilation=dilation).double().requires_grad_(False)
    blocks = conv.weight[0].numel() // size
    x = torch.randn(batch, c_in, height, width, dtype=torch.float64, requires_grad=True)
    mixing = (torch.eye(size, dtype=torch.float64) + 0.3 * torch.randn(blocks, size, size, dtype=torch.float64)).requires_grad_()

    def fast(x, mixing):
        return InputRotatedConv.apply(x, conv.weight, mixing, conv.bias, conv.stride, conv.padding, conv.dilation)

    def literal(x, mixing):
        formed = torch.einsum("onj,nij->oni", conv.weight.reshape(c_out, blocks, size), mixing).reshape(conv.weight.shape)
        return nn.functional.conv2d(x, formed, conv.bias, conv.stride, conv.padding, conv.dilation)

    torch.testing.assert_close(fast(x, mixing), literal(x, mixing), rtol=0, atol=1e-12)
    assert torch.autograd.gradcheck(fast, (x, mixing))


@pytest.mark.parametrize("options", [{}, {"block_share": True}, {"coft": True}, {"targets": "all", "block_size": 16}])
def test_the_unets_gradients_agree_between_the_input_and_the_formed_weight_routes(options, tiny_pipe, inputs, monkeypatch):
    """The tiny UNet with OFT at strength 0.7: the same output and the same gradient of every Q whichever route its
    convolutions take (a CPU's input route, CUDA's formed weight)."""
    from sdtune.methods import oft

    method = methods.create("oft", **options)
    method.inject(tiny_pipe.unet)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for layer in method.layers.values():
            layer.oft_R.weight.copy_(0.05 * torch.randn(layer.oft_R.weight.shape, generator=generator))
    method.set_scale(0.7)
    calls = []
    apply = oft.InputRotatedConv.apply
    monkeypatch.setattr(oft.InputRotatedConv, "apply", lambda *args: calls.append(1) or apply(*args))
    results = {}
    for route in ("input", "weight"):
        monkeypatch.setattr(oft, "ROUTE", {"cpu": route})
        latents, timesteps, conditions = inputs
        output = tiny_pipe.unet(latents, timesteps, conditions).sample
        results[route] = (output.detach(), torch.autograd.grad(output.square().mean(), method.trainable_parameters()))
    convolutions = sum(isinstance(layer.base_layer, nn.Conv2d) for layer in method.layers.values())
    assert len(calls) == convolutions > 0  # every trained convolution, on the input route's pass alone
    torch.testing.assert_close(results["input"][0], results["weight"][0], rtol=1e-4, atol=1e-5)
    for a, b in zip(results["input"][1], results["weight"][1]):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-6)


@pytest.mark.parametrize("kind", ["conv3x3", "linear"])
def test_the_input_route_under_bf16_autocast_computes_as_the_formed_weight_does(kind):
    """Under autocast the input route runs in autocast's dtype, as the formed weight's convolution or matmul does:
    the same output dtype, and values and Q's gradient within bf16's rounding of the formed weight's."""
    torch.manual_seed(0)
    base = (nn.Conv2d(16, 24, 3, padding=1) if kind == "conv3x3" else nn.Linear(64, 48)).requires_grad_(False)
    layer = perturbed(OftLayer(base, OftOptions(block_size=16)), scale=0.1)
    layer.scale = 0.8
    x = torch.randn(2, 16, 6, 6) if kind == "conv3x3" else torch.randn(2, 5, 64)
    results = {}
    for route in ("input", "weight"):
        layer.route = route
        with torch.autocast("cpu", dtype=torch.bfloat16):
            output = layer(x)
        results[route] = (output, torch.autograd.grad(output.float().square().mean(), layer.oft_R.weight)[0])
    assert results["input"][0].dtype == results["weight"][0].dtype == torch.bfloat16
    torch.testing.assert_close(results["input"][0].float(), results["weight"][0].float(), rtol=0.05, atol=0.05)
    torch.testing.assert_close(results["input"][1], results["weight"][1], rtol=0.1, atol=0.1 * results["weight"][1].abs().max().item())
