"""DiffFit, BitFit and full fine-tuning beyond the shared contract: what γ scales, exact folding,
nothing left behind by merge, in-place state, and option errors."""

from __future__ import annotations

import pytest
import torch
from diffusers.models.attention import BasicTransformerBlock
from diffusers.models.resnet import ResnetBlock2D

from sdtune import methods
from sdtune.errors import SdtuneError
from helpers import run_unet


def first(unet, kind):
    return next((name, m) for name, m in unet.named_modules() if isinstance(m, kind))


def gammas(method):
    return {k: p for k, p in zip(method.state_dict(), method.trainable_parameters()) if ".gamma" in k}


def test_difffit_trains_biases_norms_and_gammas_only(tiny_pipe):
    unet = tiny_pipe.unet
    method = methods.create("difffit")
    method.inject(unet)
    keys = list(method.state_dict())
    norms = {n for n, m in unet.named_modules() if isinstance(m, (torch.nn.GroupNorm, torch.nn.LayerNorm))}
    for key in keys:
        module, _, attr = key.rpartition(".")
        assert attr == "bias" or attr.startswith("gamma_") or (attr == "weight" and module in norms), key
    block_name, _ = first(unet, BasicTransformerBlock)
    for gamma in ("gamma_attn1", "gamma_attn2", "gamma_ff"):
        assert f"{block_name}.{gamma}" in keys
    for attention in ("attn1", "attn2"):
        for gamma in ("gamma_q", "gamma_k", "gamma_v", "gamma_out"):
            assert f"{block_name}.{attention}.{gamma}" in keys
    assert not any(k.endswith(".gamma") for k in keys), "no ResnetBlock2D scale unless asked"
    assert all(torch.equal(p, torch.ones_like(p)) for p in gammas(method).values())


def test_zero_branch_gammas_make_a_transformer_block_the_identity(tiny_pipe):
    unet = tiny_pipe.unet
    method = methods.create("difffit")
    method.inject(unet)
    name, block = first(unet, BasicTransformerBlock)
    with torch.no_grad():
        for gamma in ("gamma_attn1", "gamma_attn2", "gamma_ff"):
            getattr(block, gamma).zero_()
        x = torch.randn(2, 16, block.norm1.normalized_shape[0])
        context = torch.randn(2, 77, block.attn2.to_k.in_features)
        torch.testing.assert_close(block(x, encoder_hidden_states=context), x, rtol=0, atol=0)
        # γ on the value projection: zero values leave only to_out's bias, times γ_out
        getattr(block, "gamma_attn1").fill_(1.0)
        block.attn1.gamma_v.zero_()
        block.attn1.gamma_out.fill_(3.0)
        out = block.attn1(block.norm1(x))
        torch.testing.assert_close(out, (3.0 * block.attn1.to_out[0].bias).expand_as(out))


def test_resnet_gamma_scales_the_residual_branch(tiny_pipe):
    unet = tiny_pipe.unet
    name, resnet = first(unet, ResnetBlock2D)
    x = torch.randn(1, resnet.in_channels, 8, 8)
    temb = torch.randn(1, resnet.time_emb_proj.in_features)
    with torch.no_grad():
        branch = resnet(x, temb) * resnet.output_scale_factor - (resnet.conv_shortcut(x) if resnet.conv_shortcut else x)
    method = methods.create("difffit", resnet_gamma=True)
    method.inject(unet)
    gamma = torch.linspace(0.5, 2.0, resnet.conv2.out_channels)
    with torch.no_grad():
        resnet.gamma.copy_(gamma)
        expected = ((resnet.conv_shortcut(x) if resnet.conv_shortcut else x) + gamma[:, None, None] * branch) / resnet.output_scale_factor
        torch.testing.assert_close(resnet(x, temb), expected)


def test_merge_folds_every_gamma_exactly_and_leaves_plain_modules(tiny_pipe, unet_inputs):
    unet = tiny_pipe.unet
    names_before = [n for n, _ in unet.named_parameters()]
    method = methods.create("difffit", resnet_gamma=True)
    method.inject(unet)
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for key, parameter in zip(method.state_dict(), method.trainable_parameters()):
            scale = 0.5 if ".gamma" in key else 0.05
            parameter.add_(torch.randn(parameter.shape, generator=generator) * scale)
    tuned = run_unet(unet, unet_inputs)
    method.merge()
    merged = run_unet(unet, unet_inputs)
    assert (tuned - merged).abs().max() < 1e-5 * max(1.0, tuned.abs().max().item())
    assert [n for n, _ in unet.named_parameters()] == names_before, "merge must remove every γ parameter"
    hooked = [n for n, m in unet.named_modules() if m._forward_hooks or m._forward_pre_hooks]
    assert not hooked, f"hooks left after merge: {hooked[:3]}"
    assert not any(p.requires_grad for p in unet.parameters())
    assert method.trainable_parameters() == [] and method.state_dict() == {}
    method.merge()  # a second merge has nothing left to fold
    torch.testing.assert_close(run_unet(unet, unet_inputs), merged, rtol=0, atol=0)


def test_gamma_of_ones_merges_to_the_base_weights(tiny_pipe):
    unet = tiny_pipe.unet
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    method = methods.create("difffit")
    method.inject(unet)
    method.merge()
    after = unet.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_bitfit_trains_biases_in_place(tiny_pipe, unet_inputs):
    unet = tiny_pipe.unet
    method = methods.create("bitfit")
    parameters = method.inject(unet)
    assert all(key.endswith(".bias") for key in method.state_dict())
    bias = dict(unet.named_parameters())["conv_in.bias"]
    assert any(p is bias for p in parameters), "the UNet's own bias is what trains"
    with torch.no_grad():
        bias.add_(1.0)
    assert torch.equal(method.state_dict()["conv_in.bias"], bias)
    tuned = run_unet(unet, unet_inputs)
    method.merge()
    torch.testing.assert_close(run_unet(unet, unet_inputs), tuned, rtol=0, atol=0)
    assert not bias.requires_grad


def test_bitfit_targets_restrict_by_module_name(tiny_pipe):
    method = methods.create("bitfit", targets=["attn2", "time_embedding"])
    method.inject(tiny_pipe.unet)
    keys = list(method.state_dict())
    assert keys and all("attn2" in k or "time_embedding" in k for k in keys)
    assert method.options_dict() == {"targets": "attn2,time_embedding"}


@pytest.mark.parametrize(
    "name,options,message",
    [
        ("bitfit", {"targets": 3}, "targets must be"),
        ("bitfit", {"targets": "attn1,,ff"}, "empty entry"),
        ("difffit", {"resnet_gamma": "yes"}, "resnet_gamma must be true or false"),
        ("difffit", {"rank": 4}, "has no option"),
        ("full", {"targets": "attn"}, "has no option"),
    ],
)
def test_bad_options_are_refused(name, options, message):
    with pytest.raises(SdtuneError, match=message):
        methods.create(name, **options)


def test_bitfit_targets_that_match_nothing_are_refused(tiny_pipe):
    with pytest.raises(SdtuneError, match="found no layer"):
        methods.create("bitfit", targets="no_such_module").inject(tiny_pipe.unet)


def test_adapter_from_another_architecture_is_refused(tiny_pipe):
    method = methods.create("difffit")
    method.inject(tiny_pipe.unet)
    state = method.state_dict()
    state["conv_in.bias"] = torch.zeros(7)
    fresh = methods.create("difffit")
    from sdtune.models import load_pipeline

    fresh.inject(load_pipeline("tiny-random").unet)
    with pytest.raises(SdtuneError, match="conv_in.bias has shape"):
        fresh.load_state_dict(state)
    del state["conv_in.bias"]
    with pytest.raises(SdtuneError, match="1 tensor\\(s\\) missing"):
        fresh.load_state_dict(state)


def test_full_trains_and_stores_every_parameter(tiny_pipe):
    unet = tiny_pipe.unet
    method = methods.create("full")
    method.inject(unet)
    assert set(method.state_dict()) == {n for n, _ in unet.named_parameters()}
    assert all(p.requires_grad for p in unet.parameters())
    method.merge()
    assert not any(p.requires_grad for p in unet.parameters())


def test_cli_option_reaches_bitfit_targets():
    from sdtune.cli import _parse_options

    options = _parse_options(["targets=attn1,ff"])
    assert methods.create("bitfit", **options).options.targets == "attn1,ff"
    options = _parse_options(['targets=["attn1", "ff"]'])
    assert methods.create("bitfit", **options).options.targets == "attn1,ff"
