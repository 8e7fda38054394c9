"""`sdtune extract`: any adapter as a kohya LoRA/LoCon file of a chosen rank, on the tiny models.

At full rank the LoRA gives the adapter's outputs back; at a lower rank each layer's error is the norm of
its discarded singular values (Eckart–Young), as the summary says; the file loads in sdtune, diffusers
and LyCORIS alike.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from helpers import KOHYA_ATTN, KOHYA_CONV, KOHYA_TE, kohya_tucker_conv, run_unet
from test_cli import assert_one_line_error, invoke
from test_export import make_adapter

import sdtune
from sdtune import methods
from sdtune.adapter import load_adapter, open_adapter, save_adapter
from sdtune.config import ExtractConfig
from sdtune.errors import SdtuneError
from sdtune.extraction import chosen_rank, extract_lora, named_updates, summary_path

FULL = 10**6  # more than any layer's rank: each layer keeps all of its ΔW


def extract(source, output, **settings):
    return extract_lora(ExtractConfig.load(None, source=str(source), output=str(output), **settings))


def tuned_deltas(path, pipeline_factory) -> dict[str, torch.Tensor]:
    """The adapter's ΔW of every Linear/Conv2d weight, by module name, as `load_adapters` takes them."""
    pipe = pipeline_factory()
    return {
        name: delta for name, module, attr, delta in named_updates(open_adapter(path, pipe), pipe)
        if attr == "weight" and isinstance(module, (torch.nn.Linear, torch.nn.Conv2d))
    }


def lora_deltas(state: dict) -> dict[str, torch.Tensor]:
    """ΔW = up·down·alpha/rank of every module of a kohya LoRA file, by its kohya name, as (out, in·k·k) matrices."""
    deltas = {}
    for key in state:
        if key.endswith(".lora_down.weight"):
            module = key.removesuffix(".lora_down.weight")
            down, up = state[key].float(), state[f"{module}.lora_up.weight"].float()
            deltas[module] = up.flatten(1) @ down.flatten(1) * (state[f"{module}.alpha"].item() / down.shape[0])
    return deltas


def tiny():
    from sdtune.models import load_pipeline

    return load_pipeline("tiny-random")


CASES = [("atoms", {}), ("lora", {"rank": 4, "alpha": 2.0}), ("oft", {"targets": "all"}), ("gift", {})]


@pytest.mark.parametrize("name,options", CASES, ids=[name for name, _ in CASES])
def test_full_rank_lora_gives_the_adapters_outputs(name, options, tmp_path, inputs):
    tuned = run_unet(make_adapter(name, options, tmp_path / "a.safetensors").unet, inputs)
    out = tmp_path / "lora.safetensors"
    result = extract(tmp_path / "a.safetensors", out, rank=FULL)
    assert result.relative_error < 1e-5 and result.left_out == [] and result.notes == []
    pipe = tiny()
    load_adapter(out, pipe)
    torch.testing.assert_close(run_unet(pipe.unet, inputs), tuned, rtol=0, atol=1e-4)
    assert (tuned - run_unet(tiny().unet, inputs)).abs().max() > 1e-3

    state = load_file(out)
    suffixes = {key.partition(".")[2] for key in state}
    assert suffixes == {"lora_down.weight", "lora_up.weight", "alpha"}
    layers = {layer.key: layer for layer in result.layers}
    for key, layer in layers.items():
        down, up = state[f"{key}.lora_down.weight"], state[f"{key}.lora_up.weight"]
        assert state[f"{key}.alpha"].item() == layer.rank == down.shape[0] == up.shape[1]  # alpha/rank = 1, as kohya-ss'
        assert layer.rank <= layer.max_rank == min(layer.shape[0], down[0].numel())
        if len(layer.shape) == 4:  # LoCon: a k×k conv down to r channels, a 1×1 conv up
            assert tuple(down.shape) == (layer.rank, *layer.shape[1:]) and tuple(up.shape) == (layer.shape[0], layer.rank, 1, 1)
    if name == "lora":  # a rank-4 LoRA stays rank 4, whatever rank is asked for
        assert {layer.rank for layer in result.layers} == {4}
    if name == "atoms":
        assert "lora_unet_down_blocks_0_resnets_0_conv1" in layers and len(layers["lora_unet_down_blocks_0_resnets_0_conv1"].shape) == 4
    with safe_open(str(out), framework="pt") as handle:
        metadata = handle.metadata()
    assert metadata["ss_network_module"] == "networks.lora" and metadata["ss_network_dim"] == str(FULL)
    assert float(metadata["ss_network_alpha"]) == FULL and metadata["ss_base_model_version"] == "sd_v1"
    assert metadata["ss_sd_model_name"] == "tiny-random" and metadata["sdtune_token"] == "sks castle"
    assert metadata["ss_training_comment"].startswith(f"extracted by sdtune {sdtune.__version__} from an adapter of method {name} at rank")


def test_lower_rank_error_is_the_discarded_singular_values(tmp_path):
    """Eckart–Young: the rank-r truncation's error is √Σ of the discarded S², which the summary gives per layer."""
    make_adapter("atoms", {"include_1x1": True}, tmp_path / "a.safetensors")
    deltas = tuned_deltas(tmp_path / "a.safetensors", tiny)
    out = tmp_path / "r2.safetensors"
    result = extract(tmp_path / "a.safetensors", out, rank=2, conv_rank=3)
    summary = json.loads(summary_path(out).read_text())
    assert summary_path(out) == tmp_path / "r2.extract.json" == result.summary
    assert [layer["key"] for layer in summary["layers"]] == [layer.key for layer in result.layers]
    rebuilt = lora_deltas(load_file(out))
    for layer in summary["layers"]:
        delta = deltas[layer["module"]].reshape(layer["shape"][0], -1).double()
        s = torch.linalg.svdvals(delta)
        conv3 = len(layer["shape"]) == 4 and layer["shape"][2:] != [1, 1]
        assert layer["rank"] == min(3 if conv3 else 2, layer["max_rank"])
        discarded = s[layer["rank"]:].square().sum().sqrt() / delta.norm()
        error = (delta - rebuilt[layer["key"]].double()).norm() / delta.norm()
        assert error.item() == pytest.approx(layer["error"], abs=1e-5)
        assert discarded.item() == pytest.approx(layer["error"], abs=1e-5)
        assert layer["kept"] ** 2 + layer["error"] ** 2 == pytest.approx(1.0)
        assert layer["norm"] == pytest.approx(delta.norm().item(), rel=1e-5)
    assert 0.1 < summary["relative_error"] < 1
    lost = sum((layer["error"] * layer["norm"]) ** 2 for layer in summary["layers"])
    assert summary["relative_error"] == pytest.approx((lost / sum(layer["norm"] ** 2 for layer in summary["layers"])) ** 0.5)

    # a larger rank keeps more, everywhere
    larger = extract(tmp_path / "a.safetensors", tmp_path / "r8.safetensors", rank=8)
    assert all(big.kept >= small.kept - 1e-6 for big, small in zip(larger.layers, result.layers))
    assert larger.relative_error < result.relative_error


def test_dynamic_rank_is_the_smallest_that_meets_the_threshold(tmp_path):
    s = torch.tensor([4.0, 2.0, 1.0, 0.5, 0.0])
    assert chosen_rank(s, 5, "sv_fro", 0.9) == 2  # √(16+4)/√21.25 = 0.970 ≥ 0.9 > √16/√21.25 = 0.868
    assert chosen_rank(s, 5, "sv_fro", 1.0) == 4
    assert chosen_rank(s, 5, "sv_cumulative", 0.8) == 2  # 6/7.5 = 0.8
    assert chosen_rank(s, 5, "sv_cumulative", 0.81) == 3
    assert chosen_rank(s, 5, "sv_ratio", 4) == 3  # 4/1 ≤ 4 < 4/0.5
    assert chosen_rank(s, 2, "sv_ratio", 100) == 2 and chosen_rank(s, 3, None, None) == 3

    make_adapter("atoms", {}, tmp_path / "a.safetensors")
    result = extract(tmp_path / "a.safetensors", tmp_path / "d.safetensors", rank=FULL, dynamic="sv_fro", threshold=0.9)
    deltas = tuned_deltas(tmp_path / "a.safetensors", tiny)
    for layer in result.layers:
        assert layer.kept >= 0.9 - 1e-9
        s = torch.linalg.svdvals(deltas[layer.module].reshape(layer.shape[0], -1).double())
        assert layer.rank == 1 or (s[: layer.rank - 1].square().sum() / s.square().sum()).sqrt() < 0.9  # one less falls short
    assert len({layer.rank for layer in result.layers}) > 1
    with safe_open(str(tmp_path / "d.safetensors"), framework="pt") as handle:
        assert handle.metadata()["ss_network_dim"] == "Dynamic"
    capped = extract(tmp_path / "a.safetensors", tmp_path / "c.safetensors", rank=2, dynamic="sv_fro", threshold=0.99)
    assert max(layer.rank for layer in capped.layers) == 2  # --rank caps a dynamic rank


def test_extracted_lora_loads_in_diffusers_and_lycoris(tmp_path, inputs, monkeypatch):
    """A LoCon (3×3 convs) and attention LoRA at rank 3: diffusers' and LyCORIS' loaders give sdtune's outputs."""
    lycoris_kohya = pytest.importorskip("lycoris.kohya")
    monkeypatch.setattr(lycoris_kohya.LycorisNetworkKohya, "UNET_TARGET_REPLACE_NAME", [])  # as tests/test_export.py
    make_adapter("atoms", {"include_1x1": True}, tmp_path / "a.safetensors")
    out = tmp_path / "lora.safetensors"
    extract(tmp_path / "a.safetensors", out, rank=3)
    own = tiny()
    load_adapter(out, own)
    expected = run_unet(own.unet, inputs)
    assert (expected - run_unet(tiny().unet, inputs)).abs().max() > 1e-3

    pipe = tiny()
    pipe.load_lora_weights(str(out))
    torch.testing.assert_close(run_unet(pipe.unet, inputs), expected, rtol=0, atol=1e-4)

    state = load_file(out)
    unet = tiny().unet
    network, _ = lycoris_kohya.create_network_from_weights(1.0, str(out), None, None, unet, weights_sd=state)
    assert len(network.unet_loras) == len({key.partition(".")[0] for key in state})
    network.apply_to(None, unet, apply_text_encoder=False, apply_unet=True)
    torch.testing.assert_close(run_unet(unet, inputs), expected, rtol=0, atol=1e-4)


def text_encoder_output(pipe):
    ids = pipe.tokenizer(["a photo of a castle"], padding="max_length", max_length=16, return_tensors="pt").input_ids
    with torch.no_grad():
        return pipe.text_encoder(ids)[0]


def test_text_encoder_layers_are_extracted_too(tmp_path, inputs):
    pipe = tiny()
    method = methods.create("lora", rank=2)
    method.inject(pipe.unet, [pipe.text_encoder])
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for parameter in method.trainable_parameters():
            parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.05)
    save_adapter(tmp_path / "a.safetensors", method, "tiny-random")
    method.merge()
    out = tmp_path / "lora.safetensors"
    result = extract(tmp_path / "a.safetensors", out, rank=8)
    keys = {layer.key for layer in result.layers}
    assert any(key.startswith("lora_te_text_model_encoder_layers_0_self_attn_q_proj") for key in keys)
    assert {layer.rank for layer in result.layers} == {2}
    for loader in ("sdtune", "diffusers"):
        loaded = tiny()
        load_adapter(out, loaded) if loader == "sdtune" else loaded.load_lora_weights(str(out))
        torch.testing.assert_close(text_encoder_output(loaded), text_encoder_output(pipe), rtol=0, atol=1e-4, msg=loader)
        torch.testing.assert_close(run_unet(loaded.unet, inputs), run_unet(pipe.unet, inputs), rtol=0, atol=1e-4, msg=loader)
    assert (text_encoder_output(tiny()) - text_encoder_output(pipe)).abs().max() > 1e-3


def test_a_kohya_file_is_extracted_and_resized(tmp_path, inputs):
    """A file as other trainers write it (Tucker LoCon, a text-encoder LoRA, a LoHa) becomes a plain LoRA; a
    rank-8 LoRA resized to rank 2 keeps its two largest singular directions."""
    g = torch.Generator().manual_seed(3)
    conv, attn, te = KOHYA_CONV, KOHYA_ATTN, KOHYA_TE
    state = {
        **kohya_tucker_conv(g),
        f"{attn}.hada_w1_a": torch.randn(64, 2, generator=g) * 0.3,
        f"{attn}.hada_w1_b": torch.randn(2, 32, generator=g),
        f"{attn}.hada_w2_a": torch.randn(64, 2, generator=g) * 0.3,
        f"{attn}.hada_w2_b": torch.randn(2, 32, generator=g),
        f"{te}.lora_down.weight": torch.randn(8, 32, generator=g),
        f"{te}.lora_up.weight": torch.randn(32, 8, generator=g) * 0.1,
        f"{te}.alpha": torch.tensor(4.0),
    }
    path = tmp_path / "elsewhere.safetensors"
    save_file(state, str(path), metadata={"ss_network_module": "networks.lora"})
    tuned = tiny()
    load_adapter(path, tuned)
    out = tmp_path / "lora.safetensors"
    result = extract(path, out, rank=FULL, model="tiny-random")
    assert {layer.key for layer in result.layers} == {conv, attn, te}
    ranks = {layer.key: layer.rank for layer in result.layers}
    assert ranks[conv] == 3 and ranks[te] == 8 and ranks[attn] == 4  # a LoHa of rank 2 has rank ≤ 2·2
    loaded = tiny()
    load_adapter(out, loaded)
    torch.testing.assert_close(run_unet(loaded.unet, inputs), run_unet(tuned.unet, inputs), rtol=0, atol=1e-4)
    torch.testing.assert_close(text_encoder_output(loaded), text_encoder_output(tuned), rtol=0, atol=1e-4)

    resized = extract(out, tmp_path / "r2.safetensors", rank=2)
    small = lora_deltas(load_file(tmp_path / "r2.safetensors"))
    te_delta = state[f"{te}.lora_up.weight"] @ state[f"{te}.lora_down.weight"] * 0.5
    u, s, vh = torch.linalg.svd(te_delta.double())
    torch.testing.assert_close(small[te].double(), (u[:, :2] * s[:2]) @ vh[:2], rtol=0, atol=1e-5)
    assert {layer.rank for layer in resized.layers} == {2}


def test_sdxl_lora_has_original_names_and_loads_in_diffusers(tmp_path):
    from sdxl_fixtures import tiny_sdxl_pipeline, unet_inputs

    folder = tmp_path / "tiny-sdxl"
    tiny_sdxl_pipeline().save_pretrained(folder)
    from sdtune.models import load_pipeline

    pipe = load_pipeline(str(folder))
    method = methods.create("atoms")
    method.inject(pipe.unet)
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for parameter in method.trainable_parameters():
            parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.05)
    save_adapter(tmp_path / "a.safetensors", method, str(folder))
    method.merge()
    inputs = unet_inputs()
    tuned = run_unet(pipe.unet, inputs)
    out = tmp_path / "lora.safetensors"
    result = extract(tmp_path / "a.safetensors", out, rank=FULL)
    keys = {layer.key for layer in result.layers}
    assert "lora_unet_input_blocks_1_0_in_layers_2" in keys
    assert not any("down_blocks" in key or "up_blocks" in key for key in keys)
    with safe_open(str(out), framework="pt") as handle:
        assert handle.metadata()["ss_base_model_version"] == "sdxl_base_v1-0"
    for loader in ("sdtune", "diffusers"):
        loaded = tiny_sdxl_pipeline()
        load_adapter(out, loaded) if loader == "sdtune" else loaded.load_lora_weights(str(out))
        torch.testing.assert_close(run_unet(loaded.unet, inputs), tuned, rtol=0, atol=1e-4, msg=loader)


def test_changes_lora_cannot_hold_are_named_and_counted(tmp_path):
    """DiffFit changes biases and norm layers besides its scaled weights: left out, named, in the relative error."""
    make_adapter("difffit", {}, tmp_path / "d.safetensors")
    result = extract(tmp_path / "d.safetensors", tmp_path / "d-lora.safetensors", rank=FULL)
    assert result.left_out and {item["parameter"] for item in result.left_out} == {"bias", "weight"}
    assert len(result.notes) == 1 and result.notes[0].startswith("left out: ") and "which LoRA cannot hold" in result.notes[0]
    assert all(layer.error < 1e-5 for layer in result.layers)
    left = sum(item["norm"] ** 2 for item in result.left_out)
    assert result.relative_error == pytest.approx((left / (left + sum(layer.norm**2 for layer in result.layers))) ** 0.5)
    make_adapter("bitfit", {}, tmp_path / "b.safetensors")
    with pytest.raises(SdtuneError, match="changes only biases or norm layers, which LoRA cannot hold; there is no LoRA to extract"):
        extract(tmp_path / "b.safetensors", tmp_path / "b-lora.safetensors")
    assert not (tmp_path / "b-lora.safetensors").exists() and not (tmp_path / "b-lora.extract.json").exists()


def suffixes_by_module(state: dict) -> dict[str, set[str]]:
    modules = {}
    for key in state:
        module, _, suffix = key.partition(".")
        modules.setdefault(module, set()).add(suffix)
    return modules


def test_kept_biases_and_norms_give_difffits_outputs(tmp_path, inputs):
    """--keep-biases --keep-norms at full rank: DiffFit's biases as .diff_b (beside the layer's LoRA keys or alone)
    and its norm layers as .w_norm/.b_norm, exactly; without them, the LoRA keys alone, as before."""
    tuned = run_unet(make_adapter("difffit", {}, tmp_path / "d.safetensors").unet, inputs)
    out = tmp_path / "kept.safetensors"
    result = extract(tmp_path / "d.safetensors", out, rank=FULL, keep_biases=True, keep_norms=True)
    assert result.left_out == [] and result.relative_error < 1e-5
    loaded = tiny()
    load_adapter(out, loaded)
    torch.testing.assert_close(run_unet(loaded.unet, inputs), tuned, rtol=0, atol=1e-4)

    state = load_file(out)
    modules = suffixes_by_module(state)
    lora = {"lora_down.weight", "lora_up.weight", "alpha"}
    assert {frozenset(suffixes) for suffixes in modules.values()} == {
        frozenset(lora), frozenset(lora | {"diff_b"}), frozenset({"diff_b"}), frozenset({"w_norm", "b_norm"})}
    assert modules["lora_unet_down_blocks_0_resnets_0_conv1"] == {"diff_b"}  # DiffFit scales no resnet conv: its bias alone
    assert modules["lora_unet_down_blocks_0_resnets_0_norm1"] == {"w_norm", "b_norm"}
    summary = json.loads(summary_path(out).read_text())
    assert summary["keep_biases"] is summary["keep_norms"] is True and summary["left_out"] == []
    assert summary["kept"] == result.kept and {item["key"] for item in result.kept} == {
        module for module, suffixes in modules.items() if suffixes & {"diff_b", "w_norm"}}
    with safe_open(str(out), framework="pt") as handle:
        recorded = json.loads(handle.metadata()["sdtune_extraction"])
    assert recorded["keep_biases"] is recorded["keep_norms"] is True
    assert len(result.notes) == 1 and result.notes[0].startswith("kept exactly: ") and "refuses the file" in result.notes[0]

    plain = extract(tmp_path / "d.safetensors", tmp_path / "plain.safetensors", rank=FULL)
    plain_state = load_file(tmp_path / "plain.safetensors")
    assert {key for key in state if key.partition(".")[2] in lora} == set(plain_state)
    assert all(torch.equal(state[key], plain_state[key]) for key in plain_state)
    assert sorted((item["module"], item["parameter"]) for item in plain.left_out) == sorted(
        (item["module"], item["parameter"]) for item in result.kept)
    assert plain.notes[0].endswith("--keep-biases and --keep-norms write them exactly")
    config = ExtractConfig(source=str(tmp_path / "d.safetensors"), output=str(tmp_path / "python.safetensors"), rank=FULL)
    assert sdtune.extract_lora(config).notes[0].endswith("keep_biases=True and keep_norms=True write them exactly")  # to Python
    with safe_open(str(tmp_path / "plain.safetensors"), framework="pt") as handle:
        assert "keep" not in handle.metadata()["sdtune_extraction"]  # the default file's bytes are what they were
    assert json.loads(summary_path(tmp_path / "plain.safetensors").read_text())["kept"] == []


def test_kept_norms_load_in_lycoris_and_diffusers_refuses_them(tmp_path, inputs, monkeypatch):
    """LyCORIS reads .w_norm/.b_norm as sdtune does; diffusers' load_lora_weights refuses any key but LoRA's."""
    lycoris_kohya = pytest.importorskip("lycoris.kohya")
    monkeypatch.setattr(lycoris_kohya.LycorisNetworkKohya, "UNET_TARGET_REPLACE_NAME", [])  # as tests/test_export.py
    make_adapter("difffit", {}, tmp_path / "d.safetensors")
    out = tmp_path / "norms.safetensors"
    result = extract(tmp_path / "d.safetensors", out, rank=FULL, keep_norms=True)
    assert result.kept and {item["parameter"] for item in result.left_out} == {"bias"}
    own = tiny()
    load_adapter(out, own)
    expected = run_unet(own.unet, inputs)
    without_norms = tiny()
    extract(tmp_path / "d.safetensors", tmp_path / "plain.safetensors", rank=FULL)
    load_adapter(tmp_path / "plain.safetensors", without_norms)
    assert (expected - run_unet(without_norms.unet, inputs)).abs().max() > 1e-3

    state = load_file(out)
    unet = tiny().unet
    network, _ = lycoris_kohya.create_network_from_weights(1.0, str(out), None, None, unet, weights_sd=state)
    assert len(network.unet_loras) == len(suffixes_by_module(state))
    network.apply_to(None, unet, apply_text_encoder=False, apply_unet=True)
    torch.testing.assert_close(run_unet(unet, inputs), expected, rtol=0, atol=1e-4)

    with pytest.raises(ValueError, match="have not been correctly renamed"):
        tiny().load_lora_weights(str(out))


def test_bitfit_is_extracted_with_keep_biases(tmp_path, inputs):
    """BitFit changes biases alone: refused as a LoRA, written as .diff_b keys alone with --keep-biases."""
    tuned = run_unet(make_adapter("bitfit", {"targets": "attn"}, tmp_path / "b.safetensors").unet, inputs)  # no norm layer's
    out = tmp_path / "biases.safetensors"
    refused = invoke("extract", tmp_path / "b.safetensors", "--output", out, "--keep-norms")
    assert_one_line_error(refused, 2, "changes only biases or norm layers, which LoRA cannot hold; there is no LoRA to extract "
                                      "(--keep-biases writes them exactly)")
    assert not out.exists() and not summary_path(out).exists()
    result = invoke("extract", tmp_path / "b.safetensors", "--output", out, "--keep-biases")
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines()[-1].startswith(f"wrote {out} (0 layers, ") and "biases and norms kept); relative error 0%" in result.stdout
    state = load_file(out)
    assert state and all(key.endswith(".diff_b") for key in state)
    summary = json.loads(summary_path(out).read_text())
    assert summary["layers"] == [] and summary["ranks"] == {"min": None, "max": None, "total": 0} and len(summary["kept"]) == len(state)
    loaded = tiny()
    load_adapter(out, loaded)
    torch.testing.assert_close(run_unet(loaded.unet, inputs), tuned, rtol=0, atol=1e-5)


def test_kohya_reader_takes_a_bias_beside_lora_factors():
    """A .diff_b beside LoRA, LoHa or LoKr factors is the module's Δbias (ComfyUI's reading); beside a .diff too."""
    from sdtune.kohya import kohya_delta

    g = torch.Generator().manual_seed(1)
    bias = torch.randn(8, generator=g)
    factors = {
        "lora": {"lora_down.weight": torch.randn(2, 4, generator=g), "lora_up.weight": torch.randn(8, 2, generator=g), "alpha": torch.tensor(2.0)},
        "loha": {name: torch.randn(shape, generator=g) for name, shape in
                 (("hada_w1_a", (8, 2)), ("hada_w1_b", (2, 4)), ("hada_w2_a", (8, 2)), ("hada_w2_b", (2, 4)))},
        "lokr": {"lokr_w1": torch.randn(2, 2, generator=g), "lokr_w2": torch.randn(4, 2, generator=g)},
    }
    for kind, parts in factors.items():
        delta, delta_bias, _ = kohya_delta(parts, kind)
        with_bias, got_bias, _ = kohya_delta({**parts, "diff_b": bias}, kind)
        assert delta_bias is None and torch.equal(got_bias, bias) and torch.equal(with_bias, delta), kind
    with pytest.raises(SdtuneError, match="are no known update"):
        kohya_delta({**factors["lora"], "diff": torch.zeros(8, 4), "diff_b": bias}, "mixed")


def test_cli_prints_each_layer_and_keeps_what_exists(tmp_path):
    make_adapter("lora", {}, tmp_path / "a.safetensors")
    out = tmp_path / "small.safetensors"
    result = invoke("extract", tmp_path / "a.safetensors", "--output", out, "--rank", 2, "--dtype", "fp16")
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert any(line.startswith("lora_unet_") and "rank 2/" in line and "kept " in line for line in lines)
    assert lines[-1].startswith(f"wrote {out} (") and "rank 2); relative error " in lines[-1]
    assert all(tensor.dtype == torch.float16 for tensor in load_file(out).values())
    summary = json.loads((tmp_path / "small.extract.json").read_text())
    assert summary["rank"] == 2 and summary["dtype"] == "fp16" and len(summary["layers"]) == len(lines) - 1
    before = out.read_bytes()
    again = invoke("extract", tmp_path / "a.safetensors", "--output", out)
    assert_one_line_error(again, 2, f"--output {out} already exists; give a new path, or --overwrite to replace it")
    assert out.read_bytes() == before
    out.unlink()  # the summary beside it is refused alike
    again = invoke("extract", tmp_path / "a.safetensors", "--output", out)
    assert_one_line_error(again, 2, f"--output {tmp_path / 'small.extract.json'} already exists")
    assert invoke("extract", tmp_path / "a.safetensors", "--output", out, "--overwrite").exit_code == 0


def test_an_update_beyond_fp16_is_refused_in_fp16(tmp_path):
    make_adapter("lora", {}, tmp_path / "a.safetensors", scale=1000.0)
    with pytest.raises(SdtuneError, match=r"^lora_unet_.*\.lora_up\.weight overflows fp16; use --dtype fp32 or bf16$"):
        extract(tmp_path / "a.safetensors", tmp_path / "h.safetensors", dtype="fp16")
    assert not (tmp_path / "h.safetensors").exists()
    extract(tmp_path / "a.safetensors", tmp_path / "h.safetensors", dtype="bf16")


@pytest.mark.parametrize("interrupted", ["once the LoRA is written", "as the summary is written"])
def test_an_interrupt_between_the_lora_and_its_summary_leaves_neither(tmp_path, monkeypatch, interrupted):
    """SIGINT or SIGTERM once the LoRA file is written but before its summary is leaves neither file (a LoRA without
    its summary looks finished, and a second extract refuses it); before the first is written, an earlier pair stays."""
    import sdtune.extraction
    import sdtune.kohya

    make_adapter("lora", {}, tmp_path / "a.safetensors")
    out, summary = tmp_path / "small.safetensors", tmp_path / "small.extract.json"
    write_kohya = sdtune.kohya.write_kohya

    def written_then_interrupted(*args, **kwargs):
        write_kohya(*args, **kwargs)
        raise KeyboardInterrupt

    def interrupted_before(*args, **kwargs):
        raise KeyboardInterrupt

    if interrupted == "once the LoRA is written":
        monkeypatch.setattr(sdtune.kohya, "write_kohya", written_then_interrupted)
    else:
        monkeypatch.setattr(sdtune.extraction, "write_text_atomic", interrupted_before)
    with pytest.raises(KeyboardInterrupt):
        extract(tmp_path / "a.safetensors", out, rank=2)
    assert not out.exists() and not summary.exists()

    monkeypatch.undo()
    extract(tmp_path / "a.safetensors", out, rank=2)
    earlier = out.read_bytes(), summary.read_bytes()
    monkeypatch.setattr(sdtune.kohya, "write_kohya", interrupted_before)
    with pytest.raises(KeyboardInterrupt):
        extract(tmp_path / "a.safetensors", out, rank=1, overwrite=True)
    assert (out.read_bytes(), summary.read_bytes()) == earlier


def trained_on_a_base_adapter(root):
    """A LoRA trained two steps, and filter atoms (whose update reads the weights) trained on it merged at 0.7."""
    from sdtune.config import TrainConfig
    from sdtune.training import train

    def run(name, **changes):
        config = TrainConfig(output=str(root / name), concept="castle", model="tiny-random", log_with="none", seed=3,
                             steps=2, lr=1e-2, **changes)
        return train(config, progress=False).output

    lora = run("lora", method="lora", options={"rank": 2})
    return lora, run("atoms", method="atoms", base_adapters=[f"{lora}:0.7"])


@pytest.mark.slow  # 10-35 s on two cores; `make test-all` runs it
def test_an_adapter_trained_on_base_adapters_is_extracted_on_them(tmp_path, inputs):
    """What filter atoms add on top of the LoRA they trained on is taken on the weights the LoRA leaves: the LoRA's
    run folder names it (found as compare finds it) or --base-adapters gives it, and the LoRA at 0.7 with the extracted
    file is what the run drew. Without it, a warning says the update is taken on the plain base weights."""
    import shutil
    import warnings

    from sdtune.adapter import load_adapters

    lora, atoms = trained_on_a_base_adapter(tmp_path)
    expected = tiny()
    load_adapters([str(lora), str(atoms)], expected, [0.7, 1.0])
    drawn = run_unet(expected.unet, inputs)
    alone = tmp_path / "atoms.safetensors"  # out of its run folder: no config.toml names its base adapter
    shutil.copy(atoms / "adapter.safetensors", alone)

    def stacked(lora_file):
        pipe = tiny()
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # the extracted file records the base adapter, which is there
            load_adapters([str(lora), str(lora_file)], pipe, [0.7, 1.0])
        return run_unet(pipe.unet, inputs)

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        found = extract(atoms, tmp_path / "found.safetensors", rank=FULL)
        given = extract(alone, tmp_path / "given.safetensors", rank=FULL, base_adapters=[f"{lora}:0.7"])
    for result in (found, given):
        assert any(note.startswith("taken on its base adapters") for note in result.notes)
        torch.testing.assert_close(stacked(result.output), drawn, rtol=0, atol=1e-4)
    summary = json.loads(summary_path(found.output).read_text())
    assert summary["base_adapters"] == [{"path": str(lora), "strength": 0.7}]

    with pytest.warns(UserWarning, match=r"atoms.safetensors was trained on top of base adapters that are not given: "
                                         r"lora/adapter.safetensors at 0.7; its atoms update depends on the weights"):
        plain = extract(alone, tmp_path / "plain.safetensors", rank=FULL)
    assert (stacked(plain.output) - drawn).abs().max() > 1e-3  # on the plain weights: another update

    for wrong in ([f"{lora}:0.5"], [f"{lora}:0.7", f"{lora}:0.7"], [f"{tmp_path / 'plain.safetensors'}:0.7"]):
        with pytest.raises(SdtuneError, match=r"^--base-adapters: .*atoms.safetensors was trained on top of "
                                              r"lora/adapter.safetensors at 0.7; give those files at those strengths"):
            extract(alone, tmp_path / "wrong.safetensors", base_adapters=wrong)
    result = invoke("extract", alone, "--output", tmp_path / "cli.safetensors", "--base-adapters", f"{lora}:0.5")
    assert_one_line_error(result, 2, "--base-adapters: ")
    assert not (tmp_path / "wrong.safetensors").exists() and not (tmp_path / "cli.safetensors").exists()


def test_an_update_that_reads_no_weights_is_extracted_without_merging_its_base_adapters(tmp_path, monkeypatch):
    """A LoRA trained on a base LoRA: its B·A is the same on any weights, so extract merges no base adapter (seconds on
    a real model): its tensors are byte for byte those taken with no base adapter, as `load_adapters` takes such an
    update (on the base weights), and the notes still say to stack it on them. Taken on the merged weights instead,
    ΔW = (W + B·A) − W differs from it only by float32's rounding."""
    import shutil

    import sdtune.adapter
    from sdtune.config import TrainConfig
    from sdtune.training import train

    def run(name, **changes):
        config = TrainConfig(output=str(tmp_path / name), concept="castle", model="tiny-random", log_with="none", seed=3,
                             steps=2, lr=1e-2, method="lora", options={"rank": 2}, **changes)
        return train(config, progress=False).output

    base = run("base")
    on_base = run("on-base", base_adapters=[f"{base}:0.7"])
    alone = tmp_path / "alone.safetensors"  # out of its run folder: no base adapter is found
    shutil.copy(on_base / "adapter.safetensors", alone)
    merged = []
    real = sdtune.adapter.load_adapters
    monkeypatch.setattr(sdtune.adapter, "load_adapters", lambda *args, **kwargs: merged.append(args[0]) or real(*args, **kwargs))
    result = extract(on_base, tmp_path / "found.safetensors", rank=FULL)
    given = extract(alone, tmp_path / "given.safetensors", rank=FULL, base_adapters=[f"{base}:0.7"])
    plain = extract(alone, tmp_path / "plain.safetensors", rank=FULL)
    assert merged == []
    assert all(any(note.startswith("taken on its base adapters") for note in each.notes) for each in (result, given))
    expected = load_file(plain.output)
    for each in (result, given):
        tensors = load_file(each.output)
        assert tensors.keys() == expected.keys() and all(torch.equal(tensors[key], expected[key]) for key in expected)
    assert json.loads(summary_path(result.output).read_text())["base_adapters"] == [{"path": str(base), "strength": 0.7}]

    lora = type(methods.create("lora"))  # as though its update read the weights: the base LoRA merged first
    monkeypatch.setattr(lora, "update_reads_weights", property(lambda self: True))
    on_merged = load_file(extract(on_base, tmp_path / "merged.safetensors", rank=FULL).output)
    assert merged == [[str(base)]]
    taken, rounded = lora_deltas(expected), lora_deltas(on_merged)
    assert rounded.keys() == taken.keys()
    for key in taken:
        torch.testing.assert_close(rounded[key], taken[key], rtol=0, atol=1e-6)
