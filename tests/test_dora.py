"""DoRA (`lora` with `dora=True`) on the tiny model: its maths, strength, and files other tools read.

The method contract (zero at init, training, save → load, merge, unmerge, strength, parameter count)
runs in tests/test_methods_contract.py and, with the text encoder, tests/test_text_encoder_training.py;
here: the layer computes W' = m·(W + ΔW)/‖W + ΔW‖ per output channel and W + S·(W' − W) at strength S,
and each export is read back by the library it is for (LyCORIS, peft, diffusers) and by sdtune.
"""

from __future__ import annotations

import json
import warnings

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from sdtune import methods
from sdtune.adapter import load_adapter, read_adapter, save_adapter
from sdtune.errors import SdtuneError
from sdtune.export import export_adapter
from sdtune.models import load_pipeline
from helpers import run_unet

CONV = "down_blocks.0.resnets.0.conv1"
LINEAR = "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k"  # 32 → 32 from the text embeddings


def perturbed(options=None, text_encoder=False, scale=0.05):
    """A pipeline with DoRA injected (unmerged) and every trainable tensor moved, as training would."""
    pipe = load_pipeline("tiny-random")
    method = methods.create("lora", **{"dora": True, **(options or {})})
    method.inject(pipe.unet, [pipe.text_encoder] if text_encoder else [])
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for parameter in method.trainable_parameters():
            parameter.add_(torch.randn(parameter.shape, generator=generator) * scale)
    return pipe, method


def decomposed(weight, up, down, magnitude, scale):
    """W' = m·(W + s·up·down)/‖W + s·up·down‖, each output channel's norm over all its other dimensions."""
    direction = weight + scale * (up.flatten(1) @ down.flatten(1)).reshape(weight.shape)
    norms = torch.stack([row.norm() for row in direction])
    return direction * (magnitude.flatten() / norms).reshape(-1, *[1] * (weight.ndim - 1))


def with_weight(base, x, weight):
    """`base`'s output on `x` with `weight` in place of its own."""
    if isinstance(base, torch.nn.Linear):
        return F.linear(x, weight, base.bias)
    return base._conv_forward(x, weight, base.bias)


@pytest.mark.parametrize("name", [CONV, LINEAR])
def test_the_layer_computes_the_decomposed_weight_and_strength_blends_it(name):
    pipe, method = perturbed({"alpha": 2.0})  # scale α/r = 0.5 inside the norm
    state = method.state_dict()
    layer = method.layers[name]
    base = layer.get_base_layer()
    expected = decomposed(base.weight, state[f"{name}.lora_B.weight"], state[f"{name}.lora_A.weight"], state[f"{name}.lora_magnitude_vector"], 0.5)
    x = torch.randn(2, 32, 8, 8) if name == CONV else torch.randn(2, 5, 32)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), with_weight(base, x, expected), rtol=0, atol=1e-5)
        for strength in (0.5, -1.0):
            method.set_scale(strength)
            blended = base.weight + strength * (expected - base.weight)
            torch.testing.assert_close(layer(x), with_weight(base, x, blended), rtol=0, atol=1e-5)
        method.set_scale(0.0)
        assert torch.equal(layer(x), base(x))  # strength 0: the base layer's output exactly
        # why the strength is sdtune's: peft's own scale at 0 gives m·W/‖W‖, not W
        method.set_scale(1.0)
        layer.set_scale("sdtune", 0.0)
        assert (layer(x) - base(x)).abs().max() > 1e-3


def test_options_and_saved_files():
    """dora must be a bool, belongs to lora alone, and plain LoRA adapters do not mention it."""
    with pytest.raises(SdtuneError, match="--dora must be true or false, got 'yes'"):
        methods.create("lora", dora="yes")
    for name in ("loha", "lokr"):
        with pytest.raises(SdtuneError, match=f"method '{name}' has no option"):
            methods.create(name, dora=True)
    assert "dora" not in methods.create("lora").options_dict()  # the bytes of plain LoRA adapters stay as they were
    assert methods.create("lora", dora=False).options_dict() == methods.create("lora").options_dict()
    assert methods.create("lora", dora=True).options_dict()["dora"] is True


def test_an_adapter_keeps_dora_and_the_magnitudes(tmp_path, inputs):
    pipe, method = perturbed({"targets": "attn"})
    path = save_adapter(tmp_path / "a.safetensors", method, "tiny-random")
    info, tensors = read_adapter(path)
    assert info.options["dora"] is True
    magnitudes = {key: t.shape for key, t in tensors.items() if key.endswith(".lora_magnitude_vector")}
    assert len(magnitudes) == len(method.target_names) and magnitudes[f"{LINEAR}.lora_magnitude_vector"] == (32,)
    loaded = load_adapter(path, load_pipeline("tiny-random"), merge=False)
    assert loaded.options.dora and loaded.num_parameters() == method.num_parameters()


def test_kohya_export_loads_in_lycoris_and_sdtune(tmp_path, inputs, monkeypatch):
    lycoris_kohya = pytest.importorskip("lycoris.kohya")
    monkeypatch.setattr(lycoris_kohya.LycorisNetworkKohya, "UNET_TARGET_REPLACE_NAME", [])  # as tests/test_export.py
    pipe, method = perturbed({"alpha": 2.0})
    path = save_adapter(tmp_path / "a.safetensors", method, "tiny-random", placeholder="<castle>", token="sks castle")
    tuned = run_unet(pipe.unet, inputs)
    method.set_scale(0.5)
    half = run_unet(pipe.unet, inputs)
    base = run_unet(load_pipeline("tiny-random").unet, inputs)

    out = tmp_path / "k.safetensors"
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        export_adapter(path, "kohya", out)
    assert any("ComfyUI" in str(w.message) and "‖W + ΔW‖" in str(w.message) for w in record)
    state = load_file(out)
    kohya_conv, kohya_linear = "lora_unet_" + CONV.replace(".", "_"), "lora_unet_" + LINEAR.replace(".", "_")
    assert state[f"{kohya_conv}.dora_scale"].shape == (32, 1, 1, 1) and state[f"{kohya_linear}.dora_scale"].shape == (32, 1)
    torch.testing.assert_close(state[f"{kohya_conv}.dora_scale"].flatten(), method.state_dict()[f"{CONV}.lora_magnitude_vector"].flatten())
    assert len([k for k in state if k.endswith(".dora_scale")]) == len(method.target_names)
    with safe_open(str(out), framework="pt") as handle:
        metadata = handle.metadata()
    assert metadata["ss_network_module"] == "lycoris.kohya"
    assert json.loads(metadata["ss_network_args"]) == {"algo": "lora", "dora_wd": "True", "wd_on_output": "True", "conv_dim": "4", "conv_alpha": "2"}

    unet = load_pipeline("tiny-random").unet  # LyCORIS' own loader and forward
    network, _ = lycoris_kohya.create_network_from_weights(1.0, str(out), None, None, unet, weights_sd=state)
    assert len(network.unet_loras) == len(method.target_names) and all(lora.wd and lora.wd_on_out for lora in network.unet_loras)
    network.apply_to(None, unet, apply_text_encoder=False, apply_unet=True)
    torch.testing.assert_close(run_unet(unet, inputs), tuned, rtol=0, atol=1e-4)

    for scale, expected in ((1.0, tuned), (0.5, half)):  # sdtune reads it back, strength W + S·(W' − W) as trained
        own = load_pipeline("tiny-random")
        load_adapter(out, own, scale=scale)
        torch.testing.assert_close(run_unet(own.unet, inputs), expected, rtol=0, atol=1e-4)
    own = load_pipeline("tiny-random")
    load_adapter(out, own, scale=0.0)
    torch.testing.assert_close(run_unet(own.unet, inputs), base, rtol=0, atol=0)


@pytest.mark.parametrize("wd_on_out", [True, False])
def test_the_kohya_reader_follows_lycoris_on_either_axis(wd_on_out, tmp_path):
    """LyCORIS' dora_scale per output channel (wd_on_output, sdtune's) or per input channel (its older default)."""
    from lycoris.modules.locon import LoConModule

    from sdtune.kohya import kohya_updates

    pipe = load_pipeline("tiny-random")
    conv = pipe.unet.get_submodule(CONV)
    module = LoConModule("lora_unet_" + CONV.replace(".", "_"), conv, lora_dim=2, alpha=1.0, weight_decompose=True, wd_on_out=wd_on_out)
    generator = torch.Generator().manual_seed(2)
    with torch.no_grad():
        module.lora_up.weight.copy_(torch.randn(module.lora_up.weight.shape, generator=generator) * 0.1)
        module.dora_scale.mul_(1 + 0.1 * torch.randn(module.dora_scale.shape, generator=generator))
    expected = module.get_merged_weight(multiplier=1.0)[0]
    state = {f"{module.lora_name}.{key}": tensor.detach().contiguous() for key, tensor in module.custom_state_dict().items()}
    assert state[f"{module.lora_name}.dora_scale"].shape == ((32, 1, 1, 1) if wd_on_out else (1, 32, 1, 1))
    path = tmp_path / "lycoris.safetensors"
    save_file(state, str(path))
    adapter = kohya_updates(path, pipe.unet, {})
    (update,) = adapter.updates
    torch.testing.assert_close(conv.weight + update.delta_weight, expected, rtol=0, atol=1e-5)


def test_kohya_dora_scale_errors_are_one_line(tmp_path):
    conv = "lora_unet_" + CONV.replace(".", "_")
    lora = {f"{conv}.lora_down.weight": torch.zeros(2, 32, 3, 3), f"{conv}.lora_up.weight": torch.zeros(32, 2, 1, 1)}
    cases = {
        "dora_scale has shape (16, 1, 1, 1); down_blocks.0.resnets.0.conv1's weight (32, 32, 3, 3) wants (32, 1, 1, 1)":
            {**lora, f"{conv}.dora_scale": torch.ones(16, 1, 1, 1)},
        "dora_scale goes with a LoRA, LoHa or LoKr update, not with diff tensors":
            {f"{conv}.diff": torch.zeros(32, 32, 3, 3), f"{conv}.dora_scale": torch.ones(32, 1, 1, 1)},
        "are no known update": {f"{conv}.dora_scale": torch.ones(32, 1, 1, 1)},
    }
    for message, state in cases.items():
        path = tmp_path / "bad.safetensors"
        save_file(state, str(path))
        pipe = load_pipeline("tiny-random")
        before = pipe.unet.get_submodule(CONV).weight.clone()
        with pytest.raises(SdtuneError) as error:
            load_adapter(path, pipe)
        assert message in str(error.value) and "\n" not in str(error.value), str(error.value)
        assert torch.equal(pipe.unet.get_submodule(CONV).weight, before)


def test_peft_export_loads_with_peft(tmp_path, inputs):
    from peft import PeftConfig, PeftModel, inject_adapter_in_model, set_peft_model_state_dict

    pipe, method = perturbed({"alpha": 2.0})
    path = save_adapter(tmp_path / "a.safetensors", method, "tiny-random")
    folder = tmp_path / "peft"
    export_adapter(path, "peft", folder)
    assert json.loads((folder / "adapter_config.json").read_text())["use_dora"] is True
    tuned = run_unet(pipe.unet, inputs)
    model = PeftModel.from_pretrained(load_pipeline("tiny-random").unet, str(folder))
    torch.testing.assert_close(run_unet(model, inputs), tuned, rtol=0, atol=1e-4)

    unet = load_pipeline("tiny-random").unet  # the README's other way: inject, then the state without its prefix
    inject_adapter_in_model(PeftConfig.from_pretrained(str(folder)), unet)
    state = {k.removeprefix("base_model.model."): v for k, v in load_file(folder / "adapter_model.safetensors").items()}
    assert not set_peft_model_state_dict(unet, state).unexpected_keys
    torch.testing.assert_close(run_unet(unet, inputs), tuned, rtol=0, atol=1e-4)


def test_diffusers_export_loads_with_load_lora_weights(tmp_path, inputs):
    pipe, method = perturbed({"alpha": 2.0})
    path = save_adapter(tmp_path / "a.safetensors", method, "tiny-random")
    out = tmp_path / "pytorch_lora_weights.safetensors"
    export_adapter(path, "diffusers", out)
    assert f"unet.{CONV}.lora_magnitude_vector" in load_file(out)
    loaded = load_pipeline("tiny-random")
    loaded.load_lora_weights(str(out))
    torch.testing.assert_close(run_unet(loaded.unet, inputs), run_unet(pipe.unet, inputs), rtol=0, atol=1e-4)


def test_diffusers_export_of_a_dora_text_encoder_is_refused(tmp_path):
    """diffusers' text-encoder loading leaves DoRA's magnitudes at their initial values (checked here, so the
    refusal goes when a diffusers release reads them)."""
    pipe, method = perturbed({"targets": "attn"}, text_encoder=True)
    path = save_adapter(tmp_path / "a.safetensors", method, "tiny-random")
    with pytest.raises(SdtuneError, match="drops a text encoder's DoRA magnitudes; export this adapter with format=\"peft\" or kohya"):
        export_adapter(path, "diffusers", tmp_path / "d.safetensors")
    assert not list(tmp_path.glob("d*"))

    from diffusers import StableDiffusionPipeline

    from sdtune.export import peft_module_names, tensors_by_model

    # the file it would write (alpha = rank: nothing to fold), and what diffusers makes of it
    layers = {k: v.contiguous() for k, v in tensors_by_model(method.state_dict(), ("text_encoder",))["text_encoder"].items()}
    metadata = {"r": 4, "lora_alpha": 4, "target_modules": peft_module_names(layers), "use_dora": True}
    StableDiffusionPipeline.save_lora_weights(
        tmp_path / "te", weight_name="d.safetensors", text_encoder_lora_layers=layers, text_encoder_lora_adapter_metadata=metadata
    )
    loaded = load_pipeline("tiny-random")
    loaded.load_lora_weights(str(tmp_path / "te" / "d.safetensors"))
    name = "encoder.layers.0.mlp.fc1"
    found = next(iter(loaded.text_encoder.get_submodule(name).lora_magnitude_vector.values())).weight
    assert (found - layers[f"{name}.lora_magnitude_vector"]).abs().max() > 1e-3


def test_text_encoder_dora_exports_to_kohya_and_peft(tmp_path, inputs):
    from peft import PeftModel

    pipe, method = perturbed({"targets": "attn"}, text_encoder=True)
    path = save_adapter(tmp_path / "a.safetensors", method, "tiny-random")
    prompt = pipe.tokenizer(["a photo"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        tuned = pipe.text_encoder(prompt)[0]
    out = tmp_path / "k.safetensors"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        export_adapter(path, "kohya", out)
    assert load_file(out)["lora_te_text_model_encoder_layers_0_mlp_fc1.dora_scale"].shape == (37, 1)
    own = load_pipeline("tiny-random")
    load_adapter(out, own)
    with torch.no_grad():
        torch.testing.assert_close(own.text_encoder(prompt)[0], tuned, rtol=0, atol=1e-4)
    torch.testing.assert_close(run_unet(own.unet, inputs), run_unet(pipe.unet, inputs), rtol=0, atol=1e-4)

    export_adapter(path, "peft", tmp_path / "peft")
    encoder = PeftModel.from_pretrained(load_pipeline("tiny-random").text_encoder, str(tmp_path / "peft" / "text_encoder"))
    with torch.no_grad():
        torch.testing.assert_close(encoder(prompt)[0], tuned, rtol=0, atol=1e-4)


def test_the_dora_flag_sets_the_option(train_options, tmp_path):
    from typer.testing import CliRunner

    from sdtune.cli import app

    for args in (["--dora"], ["--option", "dora=true"]):
        assert train_options("--method", "lora", *args) == {"dora": True}, args
    result = CliRunner().invoke(app, ["train", "--method", "loha", "--model", "tiny-random", "--output", str(tmp_path), "--dora"])
    assert result.exit_code == 2 and "--dora applies to --method lora, not loha" in result.output
