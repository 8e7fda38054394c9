"""LoRA, LoHa and LoKr beyond the shared contract: options, targets, adapter keys, merge, CLI flags."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from sdtune import methods
from sdtune.errors import SdtuneError
from sdtune.methods.base import named_convs

LOW_RANK = ("lora", "loha", "lokr")


@pytest.fixture(scope="module")
def base_unet(tiny_path):
    from sdtune.models import load_pipeline

    return load_pipeline("tiny-random").unet


@pytest.fixture
def unet(base_unet):
    return copy.deepcopy(base_unet)  # cheaper than loading a pipeline per test


def randomize(method, seed=0):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in method.trainable_parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.3)


@pytest.mark.parametrize(
    "name,options,message",
    [
        ("lora", {"rank": 0}, "--rank must be a whole number of at least 1"),
        ("loha", {"rank": 2.5}, "--rank must be a whole number"),
        ("lokr", {"rank": True}, "--rank must be a whole number"),
        ("lora", {"alpha": 0}, "--alpha must be a positive number"),
        ("lora", {"alpha": "big"}, "--alpha must be a positive number"),
        ("loha", {"targets": "mlp"}, "--targets 'mlp' is not available; choose: conv, conv3x3, attn, all"),
        ("lokr", {"factor": 0}, "--factor must be -1"),
        ("lokr", {"factor": -2}, "--factor must be -1"),
        ("lokr", {"tucker": "yes"}, "--tucker must be true or false"),
        ("lokr", {"decompose_both": 1}, "--decompose-both must be true or false"),
        ("lora", {"dora": "true"}, "--dora must be true or false"),
        ("loha", {"dora": True}, "method 'loha' has no option(s) dora"),
        ("lora", {"tucker": True}, "method 'lora' has no option(s) tucker"),
        ("loha", {"factor": 4}, "method 'loha' has no option(s) factor"),
    ],
)
def test_bad_options_are_one_line_errors(name, options, message):
    with pytest.raises(SdtuneError) as error:
        methods.create(name, **options)
    assert message in str(error.value)
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("name", LOW_RANK)
def test_alpha_defaults_to_rank(name):
    assert methods.create(name, rank=8).options_dict()["alpha"] == 8.0
    assert methods.create(name, rank=8, alpha=2).options_dict()["alpha"] == 2.0


def test_targets(unet):
    convs3 = [name for name, _ in named_convs(unet, {3})]
    convs = [name for name, _ in named_convs(unet, {3, 1})]
    projections = [
        name for name, module in unet.named_modules()
        if isinstance(module, nn.Linear) and name.endswith((".to_q", ".to_k", ".to_v", ".to_out.0"))
    ]
    assert len(convs3) == 52 and len(projections) == 128  # SD v1.x's layout: 16 transformer blocks x 2 attentions x 4
    found = {t: methods.create("lora", targets=t).find_targets(unet) for t in ("conv", "conv3x3", "attn", "all")}
    assert found["conv3x3"] == convs3
    assert found["conv"] == convs and len(convs) > len(convs3)
    assert found["attn"] == projections
    assert sorted(found["all"]) == sorted(convs + projections)
    order = [name for name, _ in unet.named_modules()]
    assert found["all"] == sorted(found["all"], key=order.index)  # module order, so fingerprints are stable


@pytest.mark.parametrize(
    "name,options,params",
    [
        ("lora", {}, {"lora_A.weight", "lora_B.weight"}),
        ("loha", {}, {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"}),
        ("loha", {"targets": "conv3x3", "tucker": True}, {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2"}),
        ("lokr", {"targets": "conv3x3", "rank": 1, "tucker": True}, {"lokr_w1", "lokr_w2_a", "lokr_w2_b", "lokr_t2"}),
        ("lokr", {"targets": "attn", "factor": 16, "decompose_both": True}, {"lokr_w1_a", "lokr_w1_b", "lokr_w2"}),
    ],
)
def test_state_keys_are_module_name_and_parameter(name, options, params, unet):
    method = methods.create(name, **options)
    method.inject(unet)
    state = method.state_dict()
    seen = set()
    for key in state:
        param = next(key[len(t) + 1:] for t in method.target_names if key.startswith(t + "."))
        assert "sdtune" not in key
        seen.add(param)
    assert seen == params
    assert {k.rpartition("." + p)[0] for k in state for p in params if k.endswith("." + p)} == set(method.target_names)
    assert sum(t.numel() for t in state.values()) == method.num_parameters()  # only trainable tensors


def test_lokr_factor_sets_the_kronecker_shapes(unet):
    method = methods.create("lokr", targets="attn", factor=4)
    method.inject(unet)
    name = next(n for n in method.target_names if n.endswith("attn1.to_q"))
    layer = unet.get_submodule(name)
    d_out, d_in = layer.get_base_layer().weight.shape
    w1 = method.state_dict()[f"{name}.lokr_w1"]
    assert tuple(w1.shape) == (4, 4)  # factor 4 divides both widths
    assert d_out % 4 == 0 and d_in % 4 == 0


@pytest.mark.parametrize(
    "name,options",
    [("lora", {}), ("loha", {"tucker": True}), ("lokr", {}), ("lokr", {"decompose_both": True, "factor": 16, "tucker": True})],
)
def test_every_layer_starts_with_a_zero_update(name, options, unet):
    method = methods.create(name, **options)
    method.inject(unet)
    for target in method.target_names:
        delta = unet.get_submodule(target).get_delta_weight("sdtune")
        assert torch.count_nonzero(delta) == 0, target


@pytest.mark.parametrize("name", LOW_RANK)
def test_alpha_scales_the_update(name, base_unet):
    """ΔW is proportional to alpha/rank: the same tensors with twice the alpha give twice the update."""
    deltas = []
    for alpha in (2.0, 4.0):
        unet = copy.deepcopy(base_unet)
        method = methods.create(name, rank=2, alpha=alpha, targets="conv")
        method.inject(unet)
        if not deltas:
            randomize(method)
            state = {k: v.clone() for k, v in method.state_dict().items()}
        else:
            method.load_state_dict(state)
        method.merge()
        conv = unet.get_submodule("down_blocks.0.resnets.0.conv1")
        deltas.append(conv.weight - base_unet.get_submodule("down_blocks.0.resnets.0.conv1").weight)
    assert deltas[0].abs().max() > 1e-3
    torch.testing.assert_close(deltas[1], 2 * deltas[0], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("name", LOW_RANK)
def test_merge_leaves_a_plain_unet(name, unet, base_unet):
    method = methods.create(name)
    method.inject(unet)
    randomize(method)
    method.merge()
    assert not hasattr(unet, "peft_config")
    assert all(not type(m).__module__.startswith("peft") for m in unet.modules())
    for target in method.target_names:
        assert type(unet.get_submodule(target)) in (nn.Conv2d, nn.Linear)
    assert set(unet.state_dict()) == set(base_unet.state_dict())  # no base_layer / adapter keys left
    assert not any(p.requires_grad for p in unet.parameters())
    changed = unet.get_submodule(method.target_names[0]).weight
    assert not torch.equal(changed, base_unet.get_submodule(method.target_names[0]).weight)


@pytest.mark.parametrize("name", LOW_RANK)
def test_load_refuses_tensors_that_do_not_fit(name, unet, base_unet):
    method = methods.create(name)
    method.inject(unet)
    state = method.state_dict()
    key = next(iter(state))
    with pytest.raises(SdtuneError, match="1 tensor\\(s\\) missing"):
        method.load_state_dict({k: v for k, v in state.items() if k != key})
    with pytest.raises(SdtuneError, match="1 unexpected"):
        method.load_state_dict({**state, "conv_in.extra": torch.zeros(1)})
    with pytest.raises(SdtuneError, match=f"adapter tensor {key} has shape"):
        method.load_state_dict({**state, key: torch.zeros(3, 3)})
    other = methods.create(name, rank=2)
    other.inject(copy.deepcopy(base_unet))
    with pytest.raises(SdtuneError, match="has shape|does not fit"):  # LoKr's rank also decides which factors exist
        other.load_state_dict(state)


def test_sd14_counts_match_the_formula_for_every_case():
    from test_methods_contract import CASES, expected_count

    from sdtune.models import build_sd14_unet

    for name, options, _ in CASES:
        if name in LOW_RANK:
            method = methods.create(name, **options)
            method.inject(build_sd14_unet("meta"))
            assert method.num_parameters() == expected_count(name, options, build_sd14_unet("meta")), (name, options)


@pytest.mark.parametrize(
    "args,message",
    [
        (["--method", "atoms", "--rank", "8"], "--rank applies to --method lora/loha/lokr, not atoms"),
        (["--method", "lora", "--factor", "4"], "--factor applies to --method lokr, not lora"),
        (["--method", "lora", "--tucker"], "--tucker applies to --method loha/lokr, not lora"),
        (["--method", "lokr", "--dora"], "--dora applies to --method lora, not lokr"),
        (["--method", "lokr", "--targets", "mlp"], "--targets 'mlp' is not available"),
    ],
)
def test_cli_flags_reach_the_right_methods_only(args, message, tmp_path):
    from typer.testing import CliRunner

    from sdtune.cli import app

    result = CliRunner().invoke(app, ["train", "--model", "tiny-random", "--output", str(tmp_path / "run"), *args])
    assert result.exit_code == 2
    assert message in result.output


def test_cli_flags_set_the_options(train_options):
    """--rank, --alpha, --targets, --factor, --decompose-both and --tucker become lokr's options."""
    args = ["--rank", "2", "--alpha", "1", "--targets", "conv", "--factor", "8", "--decompose-both", "--tucker"]
    seen = train_options("--method", "lokr", *args)
    assert seen == {"rank": 2, "alpha": 1.0, "targets": "conv", "factor": 8, "decompose_both": True, "tucker": True}
