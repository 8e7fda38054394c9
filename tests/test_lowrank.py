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
        ("lora", {"conv_rank": 0}, "--conv-rank must be a whole number of at least 1, got 0"),
        ("loha", {"conv_rank": 2.5}, "--conv-rank must be a whole number"),
        ("lokr", {"conv_alpha": -1.0}, "--conv-alpha must be a positive number (and finite), got -1.0"),
        ("lora", {"conv_alpha": True}, "--conv-alpha must be a positive number"),
        ("loha", {"targets": "mlp"}, "--targets 'mlp' is not available; choose: conv, conv3x3, attn, all, transformer, locon"),
        ("lokr", {"factor": 0}, "--factor must be -1"),
        ("lokr", {"factor": -2}, "--factor must be -1"),
        ("lokr", {"tucker": "yes"}, "--tucker must be true or false"),
        ("lokr", {"decompose_both": 1}, "--decompose-both must be true or false"),
        ("lora", {"dora": "true"}, "--dora must be true or false"),
        ("loha", {"dora": True}, "method 'loha' has no option(s) dora"),
        ("lora", {"tucker": True}, "method 'lora' has no option(s) tucker"),
        ("loha", {"factor": 4}, "method 'loha' has no option(s) factor"),
        ("lora", {"dropout": 1.0}, "--lora-dropout must be a probability in [0, 1), got 1.0"),
        ("loha", {"rank_dropout": -0.1}, "--rank-dropout must be a probability in [0, 1), got -0.1"),
        ("lokr", {"module_dropout": "half"}, "--module-dropout must be a probability in [0, 1), got 'half'"),
        ("lora", {"rank_dropout": 1}, "--rank-dropout must be a probability in [0, 1), got 1"),
        ("lora", {"module_dropout": True}, "--module-dropout must be a probability in [0, 1), got True"),
        ("lora", {"dora": True, "rank_dropout": 0.1}, "--rank-dropout does not apply with --dora"),
        ("loha", {"dropout": 0.1}, "method 'loha' has no option(s) dropout"),
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


def test_kohya_targets(unet):
    """`transformer` is kohya-ss' LoRA (networks/lora.py, UNET_TARGET_REPLACE_MODULE): each Linear and Conv2d of the 16
    transformers, 12 a transformer on SD v1.x; `locon` adds its conv_dim blocks' (the 22 resnets, 6 down/upsamplers)."""
    found = {t: methods.create("lora", targets=t).find_targets(unet) for t in ("transformer", "locon", "attn")}
    per_transformer = {"proj_in", "proj_out", "transformer_blocks.0.ff.net.0.proj", "transformer_blocks.0.ff.net.2",
                       *(f"transformer_blocks.0.{a}.{p}" for a in ("attn1", "attn2") for p in ("to_q", "to_k", "to_v", "to_out.0"))}
    # `down_blocks.0.attentions.1` and `ff.net.2` from `down_blocks.0.attentions.1.transformer_blocks.0.ff.net.2`
    split = [(head + ".attentions." + tail.split(".", 1)[0], tail.split(".", 1)[1])
             for head, tail in (name.split(".attentions.") for name in found["transformer"])]
    assert len({block for block, _ in split}) == 16 and len(found["transformer"]) == 16 * 12
    assert {layer for _, layer in split} == per_transformer
    assert set(found["attn"]) < set(found["transformer"])
    added = [name for name in found["locon"] if name not in found["transformer"]]
    shortcuts = [name for name, _ in unet.named_modules() if name.endswith(".conv_shortcut")]
    assert len(added) == 22 * 3 + 6 + len(shortcuts) and {name.rsplit(".", 1)[-1] for name in added} == {"conv1", "conv2", "time_emb_proj", "conv_shortcut", "conv"}
    assert not any(name in ("conv_in", "conv_out") or name.startswith("time_embedding") for name in found["locon"])
    order = [name for name, _ in unet.named_modules()]
    assert found["locon"] == sorted(found["locon"], key=order.index)


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


@pytest.mark.parametrize("targets", ["all", "conv"])
def test_lora_merges_in_place_what_peft_adds(targets, unet, monkeypatch):
    """LoRA's merge accumulates scale·B·A into W with one GEMM per layer (3×3, 1×1 and linear layers); every merged
    weight is W + peft's own get_delta_weight, and a layer where that route does not apply takes peft's form."""
    from sdtune.methods import lowrank

    method = methods.create("lora", targets=targets)
    method.inject(unet)
    randomize(method)
    method.set_scale(0.6)
    expected = {name: (method.layer_base(layer).weight + layer.get_delta_weight(lowrank.ADAPTER)).detach().clone()
                for name, layer in method.layers.items()}
    kinds = {tuple(method.layer_base(layer).weight.shape[2:]) for layer in method.layers.values()}
    assert {(3, 3), (1, 1)} <= kinds and (targets == "conv" or () in kinds)
    in_place = []
    original = lowrank.add_lora_in_place
    monkeypatch.setattr(lowrank, "add_lora_in_place", lambda layer: in_place.append(original(layer)) or in_place[-1])
    modules = {name: method.layer_base(layer) for name, layer in method.layers.items()}
    method.merge()
    assert in_place and all(in_place)
    for name, module in modules.items():
        torch.testing.assert_close(module.weight, expected[name], rtol=0, atol=1e-6)


@pytest.mark.parametrize("name,options", [("loha", {}), ("loha", {"targets": "attn"}), ("lokr", {}), ("lokr", {"decompose_both": True}),
                                          ("lokr", {"targets": "attn", "factor": 4})])
def test_loha_and_lokr_merge_in_place_what_peft_adds(name, options, unet, monkeypatch):
    """LoHa's (w1a·w1b) ⊙ (w2a·w2b) and LoKr's w1 ⊗ w2 are added into W a part at a time; every merged weight is
    W + peft's own get_delta_weight."""
    from sdtune.methods import lowrank

    method = methods.create(name, **options)
    method.inject(unet)
    randomize(method)
    method.set_scale(0.6)
    expected = {key: (method.layer_base(layer).weight + layer.get_delta_weight(lowrank.ADAPTER)).detach().clone()
                for key, layer in method.layers.items()}
    function = "add_loha_in_place" if name == "loha" else "add_lokr_in_place"
    in_place, original = [], getattr(lowrank, function)
    monkeypatch.setattr(lowrank, function, lambda layer: in_place.append(original(layer)) or in_place[-1])
    monkeypatch.setattr(lowrank, "MERGE_CHUNK_ELEMENTS", 1000)  # several parts per layer
    modules = {key: method.layer_base(layer) for key, layer in method.layers.items()}
    method.merge()
    assert in_place and all(in_place)
    for key, module in modules.items():
        torch.testing.assert_close(module.weight, expected[key], rtol=0, atol=1e-6)


def test_tucker_factors_merge_through_peft(unet):
    from sdtune.methods import lowrank

    for name in ("loha", "lokr"):
        method = methods.create(name, tucker=True, targets="conv3x3")
        method.inject(copy.deepcopy(unet))
        randomize(method)
        core = "hada_t1" if name == "loha" else "lokr_t2"
        tucker = [layer for layer in method.layers.values() if lowrank.ADAPTER in getattr(layer, core)]
        assert tucker
        before = method.layer_base(tucker[0]).weight.detach().clone()
        assert not (lowrank.add_loha_in_place if name == "loha" else lowrank.add_lokr_in_place)(tucker[0])
        assert torch.equal(method.layer_base(tucker[0]).weight, before)


def test_lora_in_half_precision_on_a_cpu_merges_through_peft(unet):
    from sdtune.methods import lowrank

    method = methods.create("lora", targets="attn")
    method.inject(unet)
    randomize(method)
    layer = next(iter(method.layers.values()))
    layer.to(torch.bfloat16)
    before = method.layer_base(layer).weight.detach().clone()
    assert not lowrank.add_lora_in_place(layer)
    assert torch.equal(method.layer_base(layer).weight, before)


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
        (["--method", "oft", "--rank-dropout", "0.1"], "--rank-dropout applies to --method lora/loha/lokr, not oft"),
        (["--method", "lora", "--dora", "--rank-dropout", "0.1"], "--rank-dropout does not apply with --dora"),
        (["--method", "oft", "--conv-rank", "8"], "--conv-rank applies to --method lora/loha/lokr, not oft"),
        (["--method", "loha", "--conv-rank", "0"], "--conv-rank must be a whole number of at least 1, got 0"),
        (["--method", "loha", "--lora-dropout", "0.1"], "--lora-dropout applies to --method lora, not loha"),
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


# ---------------------------------------------------------------------------------------------
# Dropout: peft's lora_dropout (LoRA), kohya-ss' rank_dropout and module_dropout (LoRA), peft's (LyCORIS')
# rank_dropout and module_dropout (LoHa, LoKr), in training only

DROPOUT_CASES = [("lora", {"dropout": 0.5}), ("lora", {"rank_dropout": 0.5, "module_dropout": 0.3}),
                 ("loha", {"rank_dropout": 0.5, "module_dropout": 0.3}), ("lokr", {"rank_dropout": 0.5, "module_dropout": 0.3})]


def test_cli_dropout_flags_set_the_options(train_options):
    assert train_options("--method", "lora", "--lora-dropout", "0.1") == {"dropout": 0.1}
    assert train_options("--method", "lokr", "--rank-dropout", "0.25", "--module-dropout", "0.1") == {
        "rank_dropout": 0.25, "module_dropout": 0.1}
    assert train_options("--method", "lora", "--rank-dropout", "0.25", "--module-dropout", "0.1") == {
        "rank_dropout": 0.25, "module_dropout": 0.1}


@pytest.mark.parametrize("name,options", DROPOUT_CASES)
def test_dropout_acts_in_training_only_and_adds_no_parameter(name, options, base_unet):
    from helpers import run_unet

    inputs = (torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(5)), torch.tensor([10, 600]),
              torch.randn(2, 8, base_unet.config.cross_attention_dim, generator=torch.Generator().manual_seed(6)))
    plain, dropping = methods.create(name), methods.create(name, **options)
    unets = [copy.deepcopy(base_unet).eval() for _ in range(2)]  # loaded for sampling: eval mode
    for method, unet in zip((plain, dropping), unets):
        method.inject(unet)
        randomize(method)
        assert not any(layer.training for layer in method.layers.values())  # new layers follow the model's mode
    assert dropping.num_parameters() == plain.num_parameters()
    assert dropping.state_dict().keys() == plain.state_dict().keys()
    sampled = run_unet(unets[1], inputs)
    assert torch.equal(sampled, run_unet(unets[0], inputs))  # eval: no dropout, deterministic
    unets[1].train()
    torch.manual_seed(0)
    first = run_unet(unets[1], inputs)
    torch.manual_seed(0)
    assert torch.equal(run_unet(unets[1], inputs), first)  # the same RNG state, the same masks
    assert not torch.equal(run_unet(unets[1], inputs), first) and not torch.equal(first, sampled)


@pytest.mark.parametrize("name,options", DROPOUT_CASES)
def test_dropout_is_recorded_where_kohya_and_peft_write_it(name, options, base_unet):
    import json

    method = methods.create(name, **options)
    method.inject(copy.deepcopy(base_unet))
    _, metadata = method.kohya_tensors(method.state_dict())
    args = json.loads(metadata["ss_network_args"])
    assert metadata["ss_network_module"] == ("networks.lora" if name == "lora" else "lycoris.kohya")
    if "dropout" in options:  # kohya-ss' --network_dropout
        assert metadata["ss_network_dropout"] == "0.5" and "rank_dropout" not in args
    else:  # network args, strings as kohya-ss passes them: its own LoRA's, LyCORIS'
        assert (args["rank_dropout"], args["module_dropout"]) == ("0.5", "0.3") and "ss_network_dropout" not in metadata
    config = method.to_peft_config(["conv_in"])
    if name == "lora":  # peft's LoraConfig has lora_dropout only: kohya-ss' dropouts are sdtune's, on its layers
        assert config.lora_dropout == options.get("dropout", 0.0)
    else:
        assert {"rank_dropout": config.rank_dropout, "module_dropout": config.module_dropout} == options
    plain = methods.create(name)
    plain.inject(copy.deepcopy(base_unet))
    _, plain_metadata = plain.kohya_tensors(plain.state_dict())
    assert "ss_network_dropout" not in plain_metadata and "dropout" not in plain_metadata["ss_network_args"]
    assert not set(plain.options_dict()) & {"dropout", "rank_dropout", "module_dropout"}  # adapters as before


@pytest.mark.parametrize("name,options", [("lora", {"dropout": 0.3}), ("lora", {"rank_dropout": 0.3, "module_dropout": 0.2}),
                                          ("loha", {"rank_dropout": 0.3, "module_dropout": 0.2})])
def test_a_run_with_dropout_resumes_exactly_and_validates_without_it(name, options, tmp_path, tiny_path, monkeypatch):
    from helpers import uninterrupted_and_resumed

    from sdtune import validation
    from sdtune.config import TrainConfig
    from sdtune.training import train

    def configure(out, **more):
        settings = dict(model="tiny-random", method=name, options=options, steps=4, checkpoint_every=2, lr=1e-3,
                        train_text_encoder=name == "lora", log_with="none", output=str(out))
        return TrainConfig(**{**settings, **more})

    whole, resumed = uninterrupted_and_resumed(configure, tmp_path, monkeypatch, 2)
    assert resumed.resumed_from is not None
    assert resumed.adapter.read_bytes() == whole.adapter.read_bytes()
    plain = train(configure(tmp_path / "plain", options={}), progress=False)
    assert plain.losses != whole.losses  # dropout changed what trained
    # validation samples with every layer of the method, on the UNet and the text encoder, in eval mode
    modes, original = [], validation.sample_grid

    def recording(pipe, *args, **kwargs):
        layers = [module for model in (pipe.unet, pipe.text_encoder) for module in model.modules()
                  if hasattr(module, "get_base_layer")]  # peft's layers
        hooks = [layer.register_forward_pre_hook(lambda layer, _: modes.append(layer.training)) for layer in layers]
        try:
            return original(pipe, *args, **kwargs)
        finally:
            for hook in hooks:
                hook.remove()

    monkeypatch.setattr(validation, "SAMPLE_STEPS", 2)
    monkeypatch.setattr(validation, "sample_grid", recording)
    train(configure(tmp_path / "validated", steps=2, checkpoint_every=0, validate_every=2), progress=False)
    assert modes and not any(modes)


def test_loha_rank_dropout_of_every_channel_leaves_the_update_out_not_nan(base_unet):
    method = methods.create("loha", rank_dropout=0.9)
    method.inject(copy.deepcopy(base_unet))
    randomize(method)
    layer = method.layers["conv_out"]  # 4 output channels: all drop in 0.9⁴ ≈ 66 % of the steps
    full = layer.get_delta_weight("sdtune")
    torch.manual_seed(0)
    deltas = [layer.get_delta_weight("sdtune", apply_rank_dropout=True) for _ in range(50)]
    torch.manual_seed(0)
    masks = [(torch.rand(4) > 0.9).float() for _ in range(50)]
    for delta, mask in zip(deltas, masks):  # peft's draws and scaling: the kept channels times 1/(their fraction)
        expected = full * (mask / mask.mean()).view(-1, 1, 1, 1) if mask.any() else torch.zeros_like(full)
        torch.testing.assert_close(delta, expected)
    assert any(not mask.any() for mask in masks) and any(mask.any() for mask in masks)


# kohya-ss' rank and module dropout on peft's LoRA layers (sd-scripts' networks/lora.py, LoRAModule.forward)

KOHYA_LAYERS = {"conv": ("down_blocks.0.resnets.0.conv1", (3, 32, 8, 8)),  # a conv map: the mask over channels
                "tokens": ("down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q", (3, 5, 64)),  # over the last dim
                "vectors": ("down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q", (3, 64))}


def kohya_layer(base_unet, module: str, **options):
    """One of a LoRA's layers (rank 4, alpha 2: scale 1/2) with random factors, in training mode."""
    method = methods.create("lora", rank=4, alpha=2, **options)
    unet = copy.deepcopy(base_unet)
    method.inject(unet)
    randomize(method)
    return method.layers[module].train()


@pytest.mark.parametrize("module_dropout", [0.0, 0.4])
@pytest.mark.parametrize("kind", list(KOHYA_LAYERS))
def test_lora_rank_dropout_is_kohyas_formula(kind, module_dropout, base_unet):
    """Against kohya's forward written out with the same seeded draws: base(x) + B(A(x)·mask)·(α/r)/(1 − p),
    the mask rand(batch, r) > p over the rank features (channels of a conv map, last dim of tokens), after
    rand(1) < module_dropout, which returns base(x) alone."""
    import torch.nn.functional as F

    module, shape = KOHYA_LAYERS[kind]
    p, rank, scale = 0.5, 4, 0.5
    layer = kohya_layer(base_unet, module, rank_dropout=p, module_dropout=module_dropout)
    base, down, up = layer.get_base_layer(), layer.lora_A["sdtune"].weight, layer.lora_B["sdtune"].weight
    x = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    outcomes = set()
    for seed in range(12):
        torch.manual_seed(seed)
        with torch.no_grad():
            out = layer(x)
        torch.manual_seed(seed)
        with torch.no_grad():
            org = base(x)
            if module_dropout and torch.rand(1) < module_dropout:
                assert torch.equal(out, org)
                outcomes.add("skipped")
                continue
            if kind == "conv":
                lx = F.conv2d(x, down, stride=base.stride, padding=base.padding)
            else:
                lx = F.linear(x, down)
            mask = torch.rand((lx.size(0), rank)) > p
            mask = mask[:, :, None, None] if lx.ndim == 4 else mask[:, None, :] if lx.ndim == 3 else mask
            lx = lx * mask
            lx = F.conv2d(lx, up) if kind == "conv" else F.linear(lx, up)
            expected = org + lx * (scale * (1.0 / (1.0 - p)))
        torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)
        outcomes.add("masked")
        assert not mask.all() and mask.any()
    assert outcomes == ({"skipped", "masked"} if module_dropout else {"masked"})


@pytest.mark.parametrize("dora", [False, True])
def test_lora_module_dropout_returns_the_base_output_exactly(dora, base_unet):
    module, shape = KOHYA_LAYERS["conv"]
    layer = kohya_layer(base_unet, module, module_dropout=0.5, dora=dora)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        base = layer.get_base_layer()(x)
        full = layer.eval()(x)  # peft's forward: what every step that keeps the layer computes
        layer.train()
        assert not torch.equal(full, base)
        skipped = []
        for seed in range(16):
            torch.manual_seed(seed)
            drawn = bool(torch.rand(1) < 0.5)
            torch.manual_seed(seed)
            assert torch.equal(layer(x), base if drawn else full)
            skipped.append(drawn)
    assert any(skipped) and not all(skipped)


def test_lora_dropout_flags_say_which_dropout_each_method_has():
    shown = methods.option_flag_help("--rank-dropout")
    assert shown.startswith("lora: drop each of the r features after lora_down") and "kohya-ss' rank_dropout" in shown
    assert "loha/lokr: drop each output channel of ΔW" in shown
    assert methods.option_flag_help("--module-dropout").startswith("lora: skip a layer's whole update")


def test_lora_dropout_with_dora_goes_to_lycoris_args(base_unet):
    import json

    method = methods.create("lora", dora=True, module_dropout=0.25)
    method.inject(copy.deepcopy(base_unet))
    _, metadata = method.kohya_tensors(method.state_dict())
    assert metadata["ss_network_module"] == "lycoris.kohya"
    assert json.loads(metadata["ss_network_args"]) == {"algo": "lora", "dora_wd": "True", "wd_on_output": "True",
                                                       "module_dropout": "0.25", "conv_dim": "4", "conv_alpha": "4"}


def test_lora_dropout_survives_the_adapter_file_into_the_kohya_export(tiny_path, tmp_path):
    """The options travel in the sdtune adapter's metadata; the kohya file written from it carries networks.lora's
    network args."""
    import json

    from safetensors import safe_open

    from sdtune.adapter import save_adapter
    from sdtune.export import export_adapter
    from sdtune.models import load_pipeline

    method = methods.create("lora", rank_dropout=0.1, module_dropout=0.05)
    method.inject(load_pipeline("tiny-random").unet)
    randomize(method)
    save_adapter(tmp_path / "adapter.safetensors", method, "tiny-random")
    export_adapter(tmp_path / "adapter.safetensors", "kohya", tmp_path / "kohya.safetensors")
    with safe_open(str(tmp_path / "kohya.safetensors"), "pt") as kohya:
        metadata = kohya.metadata()
    assert metadata["ss_network_module"] == "networks.lora"
    args = json.loads(metadata["ss_network_args"])
    assert (args["rank_dropout"], args["module_dropout"]) == ("0.1", "0.05")


def test_lora_dropout_masks_are_redrawn_alike_under_gradient_checkpointing(base_unet):
    """--gradient-checkpointing reruns each block's forward in the backward pass: torch's checkpoint restores the
    RNG first, so the recomputed masks and skips are the drawn ones and the gradients are exactly as without it."""
    inputs = (torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(5)), torch.tensor([10, 600]),
              torch.randn(2, 8, base_unet.config.cross_attention_dim, generator=torch.Generator().manual_seed(6)))
    gradients = []
    for checkpointing in (False, True):
        unet = copy.deepcopy(base_unet).train()
        method = methods.create("lora", rank_dropout=0.5, module_dropout=0.3)
        method.inject(unet)
        randomize(method)
        if checkpointing:
            unet.enable_gradient_checkpointing()
        torch.manual_seed(0)
        unet(*inputs).sample.square().mean().backward()
        gradients.append([p.grad for p in method.trainable_parameters()])
    skipped = [grad is None for grad in gradients[0]]
    assert any(skipped) and not all(skipped)  # module dropout left some layers out of this step
    assert [grad is None for grad in gradients[1]] == skipped
    assert all(torch.equal(a, b) for a, b in zip(*gradients) if a is not None)


@pytest.mark.parametrize("name", ["loha", "lokr"])
def test_lycoris_layers_without_dropout_trace_whole_and_add_what_peft_adds(name, base_unet):
    """peft's LyCORIS forward draws a random number a layer in training even without module dropout, a branch
    torch.compile cannot trace; without dropout sdtune's layers skip the draw and give peft's output, bit for bit."""
    inputs = (torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(5)), torch.tensor([10, 600]),
              torch.randn(2, 8, base_unet.config.cross_attention_dim, generator=torch.Generator().manual_seed(6)))
    unet = copy.deepcopy(base_unet).train()
    method = methods.create(name)
    method.inject(unet)
    randomize(method)
    with torch.no_grad():
        ours = unet(*inputs).sample
        classes = {layer: type(layer) for layer in method.layers.values()}
        for layer, kind in classes.items():  # back to peft's own class
            layer.__class__ = next(base for base in kind.__mro__[1:] if base.__module__.startswith("peft."))
        peft_own = unet(*inputs).sample
        for layer, kind in classes.items():
            layer.__class__ = kind
    assert torch.equal(ours, peft_own)
    # traced a layer of each kind, in training mode (the whole UNet traces the same layers, at 20x the time)
    kinds = {}
    for layer in method.layers.values():
        kinds.setdefault(type(layer.get_base_layer()), layer)
    assert set(kinds) == {torch.nn.Conv2d, torch.nn.Linear}
    for kind, layer in kinds.items():
        base = layer.get_base_layer()
        x = torch.randn(2, base.in_channels, 8, 8) if kind is torch.nn.Conv2d else torch.randn(2, 8, base.in_features)
        torch._dynamo.reset()
        try:
            explained = torch._dynamo.explain(lambda: layer(x).square().mean())()
        finally:
            torch._dynamo.reset()
        assert explained.graph_break_count == 0, [reason.reason[:200] for reason in explained.break_reasons[:2]]
    dropping = methods.create(name, module_dropout=0.1)
    dropping.inject(copy.deepcopy(base_unet))
    assert all(type(layer).__module__.startswith("peft.") for layer in dropping.layers.values())  # peft's draws


@pytest.mark.parametrize("name", LOW_RANK)
def test_conv_rank_left_to_its_default_changes_no_option_config_or_adapter_byte(name, unet, tmp_path):
    """conv_rank and conv_alpha default to the rank and alpha: the options recorded, the peft config and the adapter
    file are those of a run before they existed, and giving them equal to the rank and alpha is the same run."""
    from sdtune.adapter import save_adapter

    before = {"lora": {"rank": 4, "alpha": 4.0, "targets": "all"},
              "loha": {"rank": 4, "alpha": 4.0, "targets": "all", "tucker": False},
              "lokr": {"rank": 4, "alpha": 4.0, "targets": "all", "factor": -1, "decompose_both": False, "tucker": False}}
    files = []
    for options in ({}, {"conv_rank": 4, "conv_alpha": 4.0}):
        method = methods.create(name, **options)
        assert method.options_dict() == before[name]
        torch.manual_seed(0)
        method.inject(copy.deepcopy(unet))
        config = method.peft_configs[""]["sdtune"]
        assert (config.rank_pattern, config.alpha_pattern) == ({}, {})
        randomize(method)
        save_adapter(tmp_path / f"{len(files)}.safetensors", method, "tiny-random")
        files.append((tmp_path / f"{len(files)}.safetensors").read_bytes())
    assert files[0] == files[1]


@pytest.mark.parametrize("name", LOW_RANK)
def test_an_alpha_or_conv_scale_that_follows_its_default_is_not_shown_as_changed(name):
    """The card's and the dry run's "lora (...)" and compare's variant show what the user changed: conv_alpha copied
    from the alpha, conv_rank from the rank or alpha from the rank are defaults, though the file records them."""
    from sdtune.comparison import variant_of
    from sdtune.limits import changed_options

    cases = [({"conv_rank": 2}, "conv_rank=2"), ({"rank": 8}, "rank=8"), ({"rank": 8, "alpha": 8}, "rank=8"),
             ({"conv_alpha": 2.0}, "conv_alpha=2.0"), ({"rank": 8, "conv_rank": 4}, "rank=8, conv_rank=4"),
             ({"rank": 8, "alpha": 2, "conv_rank": 2}, "rank=8, alpha=2.0, conv_rank=2"),
             ({"conv_rank": 2, "conv_alpha": 1.0}, "conv_rank=2, conv_alpha=1.0")]
    for options, shown in cases:
        method = methods.create(name, **options)
        assert changed_options(method) == f"{name} ({shown})", options
        assert variant_of(name, method.options_dict()) == ", ".join(sorted(shown.split(", "))), options
    assert methods.create(name, conv_rank=2).options_dict()["conv_alpha"] == 4.0  # the file's bytes keep it


@pytest.mark.parametrize("name", LOW_RANK)
def test_conv_rank_gives_the_3x3_convs_their_own_rank_and_scale(name, unet):
    """The 3x3 convs at conv_rank with scale conv_alpha/conv_rank; the 1x1 convs and linears at the rank (kohya-ss'
    and LyCORIS' conv_dim: a 1x1 conv is a linear to them)."""
    method = methods.create(name, targets="all", rank=4, alpha=2.0, conv_rank=2, conv_alpha=4.0)
    method.inject(unet)
    seen = set()
    for module, layer in method.layers.items():
        base = layer.get_base_layer()
        spatial = isinstance(base, nn.Conv2d) and base.kernel_size != (1, 1)
        seen.add((type(base).__name__, base.kernel_size if spatial else None))
        assert (layer.r["sdtune"], layer.scaling["sdtune"]) == ((2, 2.0) if spatial else (4, 0.5)), module
    assert ("Conv2d", (3, 3)) in seen and ("Conv2d", None) in seen and ("Linear", None) in seen
    assert method.options_dict()["conv_rank"] == 2 and method.options_dict()["conv_alpha"] == 4.0


@pytest.mark.parametrize("targets", ["attn", "transformer"])
def test_conv_rank_where_no_3x3_conv_is_tuned_is_ignored_with_a_warning(targets, unet):
    """As LyCORIS, whose conv_dim does nothing under a preset without 3x3 convs: the run trains, said so once."""
    method = methods.create("lora", targets=targets, conv_rank=8)
    with pytest.warns(UserWarning, match=f"lora --targets {targets} tunes no 3x3 convolution, so they change nothing"):
        method.inject(unet)
    assert {layer.r["sdtune"] for layer in method.layers.values()} == {4}


def test_a_kohya_loha_at_two_ranks_takes_the_conv_ones_from_its_network_args():
    """LoHa's factors flatten a conv's kernel (hada_w1_b is r x in·k·k), so which modules are 3x3 convs comes from
    ss_network_args' conv_dim and conv_alpha (LyCORIS writes them); without them the file is refused in one line."""
    conv, linear = "lora_unet_down_blocks_0_resnets_0_conv1", "lora_unet_down_blocks_0_attentions_0_proj_out"
    shapes = {conv: {"hada_w1_a": (32, 2), "hada_w1_b": (2, 288), "hada_w2_a": (32, 2), "hada_w2_b": (2, 288), "alpha": ()},
              linear: {"hada_w1_a": (32, 8), "hada_w1_b": (8, 32), "hada_w2_a": (32, 8), "hada_w2_b": (8, 32), "alpha": ()}}
    alphas = {conv: 1.0, linear: 4.0}
    Loha = methods.method_class("loha")
    options = Loha.kohya_init_options({"loha"}, shapes, alphas, {"algo": "loha", "conv_dim": "2", "conv_alpha": "1"})
    assert (options["rank"], options["alpha"], options["conv_rank"], options["conv_alpha"]) == (8, 4.0, 2, 1.0)
    with pytest.raises(SdtuneError, match="neither its tensors nor its ss_network_args' conv_dim say which are 3x3 convs"):
        Loha.kohya_init_options({"loha"}, shapes, alphas, {"algo": "loha"})
