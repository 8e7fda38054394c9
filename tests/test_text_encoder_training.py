"""Text-encoder training (`--train-text-encoder`) for the low-rank family, on the tiny model.

The method tunes the text encoder's attention and MLP linears beside the UNet: zero update at init,
gradients reach it, the adapter holds it (under `text_encoder.`) and puts it back on load, merged or
not, at any strength; the training loop trains it at its own learning rate and resumes exactly; kohya
files name it `lora_te_`, diffusers `text_encoder.`, and other loaders read those back.
"""

from __future__ import annotations

import json

import pytest
import torch
from helpers import uninterrupted_and_resumed
from safetensors import safe_open
from safetensors.torch import load_file

from sdtune import methods
from sdtune.adapter import load_adapter, save_adapter
from sdtune.config import TrainConfig
from sdtune.errors import SdtuneError
from sdtune.export import export_adapter
from sdtune.models import load_pipeline
from sdtune.training import open_trainer, train

LOW_RANK = [("lora", {}), ("loha", {}), ("lokr", {}), ("lora", {"targets": "attn", "rank": 2, "alpha": 1.0})]
# filter atoms' linear form on the text encoder's linears: 4×4 weight blocks where they divide (32×32),
# else 1×1 (the tiny model's 37-wide MLP)
CASES = LOW_RANK + [("lora", {"dora": True}), ("atoms", {}), ("atoms", {"linear_kc": 2, "m": 3}), ("oft", {})]
IDS = [f"{name}-{'-'.join(f'{k}={v}' for k, v in opts.items()) or 'default'}" for name, opts in CASES]
LINEARS = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")


def encode(pipe, prompt="a photo of a sks castle"):
    ids = pipe.tokenizer([prompt], padding="max_length", max_length=pipe.tokenizer.model_max_length, return_tensors="pt").input_ids
    with torch.no_grad():
        return pipe.text_encoder(ids)[0]


def perturb(method, scale=0.05):
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for parameter in method.trainable_parameters():
            parameter.add_(torch.randn(parameter.shape, generator=generator) * scale)


def tuned_adapter(name, options, path):
    """An adapter of the UNet and the text encoder with every tensor perturbed; its tuned pipeline (unmerged)."""
    pipe = load_pipeline("tiny-random")
    method = methods.create(name, **options)
    method.inject(pipe.unet, [pipe.text_encoder])
    perturb(method)
    save_adapter(path, method, "tiny-random", placeholder="<castle>", token="sks castle")
    return pipe, method


@pytest.mark.parametrize("name,options", CASES, ids=IDS)
def test_zero_at_init_then_strength_merge_and_unmerge_cover_the_text_encoder(name, options, tiny_pipe):
    base = encode(tiny_pipe)
    method = methods.create(name, **options)
    parameters = method.inject(tiny_pipe.unet, [tiny_pipe.text_encoder])
    torch.testing.assert_close(encode(tiny_pipe), base, rtol=0, atol=0)
    encoder_parameters = method.text_encoder_parameters()
    assert encoder_parameters and parameters[-len(encoder_parameters):] == encoder_parameters  # the UNet's first
    encoder_layers = [n for n in method.target_names if n.startswith("text_encoder.")]
    assert len(encoder_layers) == 2 * len(LINEARS) and all(n.endswith(LINEARS) for n in encoder_layers)
    assert all(key.startswith("text_encoder.") == (".self_attn." in key or ".mlp." in key) for key in method.state_dict())
    unet_only = methods.create(name, **options)
    unet_only.inject(load_pipeline("tiny-random").unet)
    assert list(unet_only.state_dict()) == [k for k in method.state_dict() if not k.startswith("text_encoder.")]

    perturb(method)
    tuned = encode(tiny_pipe)
    assert (tuned - base).abs().max() > 1e-3
    method.set_scale(0.0)
    torch.testing.assert_close(encode(tiny_pipe), base, rtol=0, atol=1e-6)
    method.set_scale(1.0)
    method.merge()
    assert not any(hasattr(m, "get_base_layer") for m in tiny_pipe.text_encoder.modules()), "merged: plain layers"
    torch.testing.assert_close(encode(tiny_pipe), tuned, rtol=0, atol=1e-5)
    method.unmerge()
    torch.testing.assert_close(encode(tiny_pipe), tuned, rtol=0, atol=1e-6)
    method.set_scale(0.0)
    method.merge()
    torch.testing.assert_close(encode(tiny_pipe), base, rtol=0, atol=1e-6)


def test_gradients_reach_the_text_encoder_and_lower_the_loss(tiny_pipe, unet_inputs):
    torch.manual_seed(0)
    pipe = tiny_pipe
    method = methods.create("lora")
    method.inject(pipe.unet, [pipe.text_encoder])
    before_values = [p.detach().clone() for p in method.text_encoder_parameters()]
    optimizer = torch.optim.AdamW(method.text_encoder_parameters(), lr=1e-2)  # the text encoder alone
    ids = pipe.tokenizer(["a photo"] * 2, padding="max_length", max_length=pipe.tokenizer.model_max_length, return_tensors="pt").input_ids
    target = torch.randn(unet_inputs[0].shape, generator=torch.Generator().manual_seed(3))

    def loss():
        return torch.nn.functional.mse_loss(pipe.unet(unet_inputs[0], unet_inputs[1], pipe.text_encoder(ids)[0]).sample, target)

    with torch.no_grad():
        before = loss().item()
    for _ in range(10):
        optimizer.zero_grad()
        loss().backward()
        optimizer.step()
    with torch.no_grad():
        after = loss().item()
    assert after < before * 0.99, (before, after)
    assert all(not torch.equal(a, p) for a, p in zip(before_values, method.text_encoder_parameters()))
    assert not [n for n, p in pipe.text_encoder.named_parameters() if p.requires_grad and ".sdtune" not in n]


@pytest.mark.parametrize("name,options", CASES, ids=IDS)
def test_save_load_reproduces_both_models_merged_or_not(name, options, tmp_path, inputs):
    path = tmp_path / "adapter.safetensors"
    tuned_pipe, method = tuned_adapter(name, options, path)
    tuned_embeds, base_embeds = encode(tuned_pipe), encode(load_pipeline("tiny-random"))
    with torch.no_grad():
        tuned_unet = tuned_pipe.unet(*inputs).sample
    with safe_open(str(path), framework="pt") as handle:
        assert handle.metadata()["text_encoders"] == "text_encoder"
        assert any(key.startswith("text_encoder.") for key in handle.keys())

    for merge in (False, True):
        pipe = load_pipeline("tiny-random")
        adapter = load_adapter(path, pipe, merge=merge)
        torch.testing.assert_close(encode(pipe), tuned_embeds, rtol=0, atol=1e-5)
        with torch.no_grad():
            torch.testing.assert_close(pipe.unet(*inputs).sample, tuned_unet, rtol=0, atol=1e-5)
        assert adapter.num_parameters() == (method.num_parameters() if not merge else 0)
    pipe = load_pipeline("tiny-random")
    load_adapter(path, pipe, scale=0.0)  # strength 0: the base model
    torch.testing.assert_close(encode(pipe), base_embeds, rtol=0, atol=1e-6)


def test_the_fingerprint_covers_the_text_encoder_layers(tmp_path):
    path = tmp_path / "adapter.safetensors"
    tuned_adapter("lora", {}, path)
    other = load_pipeline("tiny-random")
    with torch.no_grad():
        other.text_encoder.get_submodule("encoder.layers.1.mlp.fc2").weight.mul_(1.5)
    with pytest.raises(SdtuneError, match="the loaded model's weights differ"):
        load_adapter(path, other)
    assert not any(hasattr(m, "get_base_layer") for m in other.unet.modules()), "a refused adapter changes nothing"

    # an adapter of the UNet alone keeps the fingerprint, metadata and tensors it always had
    pipe = load_pipeline("tiny-random")
    method = methods.create("lora")
    method.inject(pipe.unet)
    save_adapter(tmp_path / "unet.safetensors", method, "tiny-random")
    with safe_open(str(tmp_path / "unet.safetensors"), framework="pt") as handle:
        assert "text_encoders" not in handle.metadata()
        assert not any(key.startswith("text_encoder") for key in handle.keys())


def test_kohya_export_names_the_text_encoder_lora_te_and_loads_back(tmp_path, inputs):
    path = tmp_path / "adapter.safetensors"
    tuned_pipe, _ = tuned_adapter("lora", {"alpha": 2.0}, path)  # alpha ≠ rank: the scale must reach every reader
    out = tmp_path / "kohya.safetensors"
    export_adapter(path, "kohya", out)
    state = load_file(out)
    encoder_modules = {key.partition(".")[0] for key in state if key.startswith("lora_te_")}
    assert len(encoder_modules) == 2 * len(LINEARS)
    assert "lora_te_text_model_encoder_layers_0_self_attn_q_proj" in encoder_modules  # kohya-ss' names
    assert all(key.startswith(("lora_unet_", "lora_te_")) for key in state)

    # sdtune's kohya reader and diffusers' kohya converter put the same update on both models
    for load in ("sdtune", "diffusers"):
        pipe = load_pipeline("tiny-random")
        if load == "sdtune":
            load_adapter(out, pipe)
        else:
            pipe.load_lora_weights(str(out))
        torch.testing.assert_close(encode(pipe), encode(tuned_pipe), rtol=0, atol=1e-4)
        with torch.no_grad():
            torch.testing.assert_close(pipe.unet(*inputs).sample, tuned_pipe.unet(*inputs).sample, rtol=0, atol=1e-4)


def test_merged_pipeline_bakes_in_the_text_encoder(tmp_path):
    from diffusers import StableDiffusionPipeline

    from sdtune.merging import merge_adapter

    path = tmp_path / "adapter.safetensors"
    tuned_pipe, _ = tuned_adapter("lokr", {}, path)
    merge_adapter(path, tmp_path / "merged")
    merged = StableDiffusionPipeline.from_pretrained(str(tmp_path / "merged"), safety_checker=None, requires_safety_checker=False)
    torch.testing.assert_close(encode(merged), encode(tuned_pipe), rtol=0, atol=1e-5)


def test_atoms_kohya_export_writes_text_encoder_diffs(tmp_path, inputs):
    path = tmp_path / "adapter.safetensors"
    tuned_pipe, _ = tuned_adapter("atoms", {}, path)
    out = tmp_path / "kohya.safetensors"
    export_adapter(path, "kohya", out)
    state = load_file(out)
    assert "lora_te_text_model_encoder_layers_1_mlp_fc2.diff" in state
    pipe = load_pipeline("tiny-random")
    load_adapter(out, pipe)
    torch.testing.assert_close(encode(pipe), encode(tuned_pipe), rtol=0, atol=1e-5)


def test_diffusers_export_holds_text_encoder_layers(tmp_path, inputs):
    path = tmp_path / "adapter.safetensors"
    tuned_pipe, _ = tuned_adapter("lora", {"alpha": 2.0}, path)
    out = tmp_path / "pytorch_lora_weights.safetensors"
    export_adapter(path, "diffusers", out)
    keys = list(load_file(out))
    assert any(key.startswith("text_encoder.") for key in keys) and any(key.startswith("unet.") for key in keys)
    pipe = load_pipeline("tiny-random")
    pipe.load_lora_weights(str(out))
    torch.testing.assert_close(encode(pipe), encode(tuned_pipe), rtol=0, atol=1e-4)


def test_peft_export_writes_the_text_encoder_beside_the_unet(tmp_path):
    from peft import PeftModel

    path = tmp_path / "adapter.safetensors"
    tuned_pipe, _ = tuned_adapter("loha", {}, path)
    folder = tmp_path / "peft"
    export_adapter(path, "peft", folder)
    assert {p.name for p in (folder / "text_encoder").iterdir()} == {"adapter_config.json", "adapter_model.safetensors"}
    pipe = load_pipeline("tiny-random")
    pipe.text_encoder = PeftModel.from_pretrained(pipe.text_encoder, str(folder / "text_encoder"))
    torch.testing.assert_close(encode(pipe), encode(tuned_pipe), rtol=0, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# The training loop


def config(output, **settings) -> TrainConfig:
    return TrainConfig(
        output=str(output), log_with="none",
        **{"model": "tiny-random", "method": "lora", "steps": 2, "seed": 3, "train_text_encoder": True, **settings},
    )


def test_the_text_encoder_gets_its_own_learning_rate(tmp_path, tiny_path):
    with open_trainer(config(tmp_path / "run", lr=1e-4, text_encoder_lr=3e-5), progress=False) as trainer:
        groups = trainer.optimizer.param_groups
        encoder = {id(p) for p in trainer.method.text_encoder_parameters()}
        assert [g["lr"] for g in groups] == [1e-4, 3e-5]
        assert {id(p) for p in groups[1]["params"]} == encoder and not encoder & {id(p) for p in groups[0]["params"]}
        assert all(p.requires_grad for p in trainer.method.text_encoder_parameters())
        trainer.fit()
    logged = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert logged and all(row["lr"] == 1e-4 and row["text_encoder_lr"] == 3e-5 for row in logged)
    with open_trainer(config(tmp_path / "run2", lr=2e-4), progress=False) as trainer:
        assert [g["lr"] for g in trainer.optimizer.param_groups] == [2e-4, 2e-4]  # default: --lr
    with open_trainer(config(tmp_path / "run3", train_text_encoder=False), progress=False) as trainer:
        assert len(trainer.optimizer.param_groups) == 1 and not trainer.method.text_encoder_parameters()


def test_a_run_trains_the_text_encoder_and_the_adapter_reproduces_it(tmp_path, tiny_path):
    run = train(config(tmp_path / "run", steps=3, lr=1e-3, validate_every=3), progress=False)
    assert list(run.validation_losses) == [3]  # its prompts re-encoded by the trained text encoder
    state = load_file(run.adapter)
    encoder_b = [v for k, v in state.items() if k.startswith("text_encoder.") and "lora_B" in k]
    assert encoder_b and all(v.abs().max() > 0 for v in encoder_b), "lora_B starts at 0: training moved it"
    assert "train_text_encoder = true" in (run.output / "config.toml").read_text()
    tuned_embeds = encode(load_pipeline("tiny-random"))
    pipe = load_pipeline("tiny-random")
    load_adapter(run.adapter, pipe)
    assert (encode(pipe) - tuned_embeds).abs().max() > 1e-6, "the trained text encoder differs from the base"
    trained = load_pipeline("tiny-random")
    load_adapter(run.adapter, trained, merge=False).merge()
    torch.testing.assert_close(encode(trained), encode(pipe), rtol=0, atol=1e-6)


def test_clip_skip_with_a_trained_text_encoder_under_bf16_trains(tmp_path, tiny_path):
    """kohya-ss users' common setting: clip skip 2, the text encoder trained, bf16. The trained encoder's prepared
    forward hands back fp32 states while its frozen final layer norm is stored in bf16, which layer_norm refused (a
    RuntimeError at the first step): the norm runs in fp32 there, as autocast runs it."""
    run = train(config(tmp_path / "run", steps=2, lr=1e-3, clip_skip=2, mixed_precision="bf16"), progress=False)
    state = load_file(run.adapter)
    encoder_b = [v for k, v in state.items() if k.startswith("text_encoder.") and "lora_B" in k]
    assert encoder_b and all(torch.isfinite(v).all() for v in encoder_b) and any(v.abs().max() > 0 for v in encoder_b)


def test_resume_gives_the_uninterrupted_adapter_bytes(tmp_path, tiny_path, monkeypatch):
    settings = dict(steps=4, checkpoint_every=2, lr=1e-3, text_encoder_lr=5e-4)
    whole, resumed = uninterrupted_and_resumed(lambda out, **more: config(out, **settings, **more), tmp_path, monkeypatch, 2)
    assert resumed.resumed_from is not None
    assert resumed.adapter.read_bytes() == whole.adapter.read_bytes()


def test_sdxl_trains_both_text_encoders_and_exports_lora_te1_and_te2(tmp_path):
    """On SDXL both encoders are tuned, trained through the pooled embedding too, and exported under
    kohya-ss' SDXL prefixes."""
    pipe = load_pipeline("tiny-sdxl-random")
    before = [{k: v.clone() for k, v in e.state_dict().items()} for e in (pipe.text_encoder, pipe.text_encoder_2)]
    run = train(config(tmp_path / "run", model="tiny-sdxl-random", text_encoder_lr=1e-2, steps=3), progress=False)
    tuned = load_pipeline("tiny-sdxl-random")
    method = load_adapter(run.adapter, tuned, merge=True)
    for name, encoder, base in zip(("text_encoder", "text_encoder_2"), (tuned.text_encoder, tuned.text_encoder_2), before):
        assert any(f"{name}." in target for target in method.target_names)
        changed = [k for k, v in encoder.state_dict().items() if not torch.equal(v, base[k])]
        assert changed, f"{name} did not change"
    out = tmp_path / "kohya.safetensors"
    export_adapter(run.adapter, "kohya", out)
    prefixes = {key.split("_text_model_")[0] for key in load_file(out) if "_text_model_" in key}
    assert prefixes == {"lora_te1", "lora_te2"}


def test_sdxl_second_text_encoder_trains_at_its_own_rate(tmp_path):
    """--text-encoder-2-lr puts SDXL's second encoder in a group of its own (kohya's second value): logged, exported
    as kohya's list, refused on a one-encoder model before it loads, and a resume must keep or leave it as it began."""
    settings = dict(model="tiny-sdxl-random", lr=1e-4, text_encoder_lr=3e-5, text_encoder_2_lr=1e-5, checkpoint_every=1)
    with open_trainer(config(tmp_path / "run", **settings), progress=False) as trainer:
        groups = trainer.optimizer.param_groups
        second = {id(p) for p in trainer.trained_encoders[1].parameters()}
        encoder = {id(p) for p in trainer.method.text_encoder_parameters()}
        assert [g["lr"] for g in groups] == [1e-4, 3e-5, 1e-5]
        assert {id(p) for p in groups[2]["params"]} == encoder & second and second & encoder
        assert {id(p) for p in groups[1]["params"]} == encoder - second
        trainer.fit()
    logged = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert logged and all(row["text_encoder_lr"] == 3e-5 and row["text_encoder_2_lr"] == 1e-5 for row in logged)
    export_adapter(tmp_path / "run", "kohya", tmp_path / "kohya.safetensors")
    with safe_open(str(tmp_path / "kohya.safetensors"), framework="pt") as handle:
        metadata = handle.metadata()
    assert metadata["ss_text_encoder_lr"] == "[3e-05, 1e-05]"
    from sdtune.model_card import write_model_card

    card = write_model_card(tmp_path / "run").output.read_text()
    assert metadata["ss_clip_skip"] == "None"  # SDXL reads its penultimate layers by design, as kohya-ss records it
    assert "| text encoder learning rate | 3e-05 |" in card and "| second text encoder learning rate | 1e-05 |" in card

    from sdtune.training import plan_run

    planned = "\n".join(plan_run(config(tmp_path / "planned", **settings)).summary())
    assert "text encoder trained too: lr 3e-05, SDXL's second encoder lr 1e-05" in planned

    unset = {**settings, "text_encoder_2_lr": None}
    joined = plan_run(config(tmp_path / "joined-plan", **unset)).summary()
    assert "text encoders trained too: lr 3e-05" in joined  # SDXL's two at one rate; SD 1.x's one, one
    assert "text encoder trained too: lr 3e-05" in plan_run(config(tmp_path / "one", **{**unset, "model": "tiny-random"})).summary()
    with open_trainer(config(tmp_path / "joined", **unset), progress=False) as trainer:
        assert [g["lr"] for g in trainer.optimizer.param_groups] == [1e-4, 3e-5]  # both encoders in one group
    with pytest.raises(SdtuneError, match="trained with --text-encoder-2-lr .*; resume with it"):
        train(config(tmp_path / "run", **{**unset, "steps": 3}, resume="latest"), progress=False)
    with pytest.raises(SdtuneError, match="has one text encoder"):
        train(config(tmp_path / "sd1", text_encoder_2_lr=1e-5), progress=False)
    with pytest.raises(SdtuneError, match="^text_encoder_2_lr applies with train_text_encoder=True$"):
        config(tmp_path / "off", model="tiny-sdxl-random", train_text_encoder=False, text_encoder_2_lr=1e-5).validate()


def test_adapters_name_clip_layers_alike_under_transformers_4_and_5(tmp_path, inputs):
    """transformers 4 kept CLIP's layers below a `text_model` module, transformers 5 at the top: an
    adapter saved with one loads with the other."""
    pipe, method = tuned_adapter("lora", {}, tmp_path / "a.safetensors")
    expected = encode(pipe)

    class WrappedAsTransformers4(torch.nn.Module):  # CLIPTextModel's shape under transformers 4
        def __init__(self, text_model):
            super().__init__()
            self.text_model, self.config = text_model, text_model.config

        def forward(self, *args, **kwargs):
            return self.text_model(*args, **kwargs)

    other = load_pipeline("tiny-random")
    other.text_encoder = WrappedAsTransformers4(other.text_encoder)
    load_adapter(tmp_path / "a.safetensors", other, merge=True)
    assert torch.allclose(encode(other), expected, atol=1e-5)


@pytest.mark.parametrize("model", ["tiny-random", "tiny-sdxl-random"])
@pytest.mark.parametrize("name", ["lora", "atoms"])
def test_the_memory_check_counts_the_text_encoders_before_the_model_loads(model, name):
    from sdtune.limits import count_text_encoder_parameters
    from sdtune.models import read_model_configs, text_encoders

    configs = read_model_configs(model)
    pipe = load_pipeline(model)
    encoders = text_encoders(pipe)
    method = methods.create(name)
    method.inject(pipe.unet, encoders)
    trained = sum(p.numel() for p in method.text_encoder_parameters())
    frozen = sum(p.numel() for encoder in encoders for p in encoder.parameters()) - trained
    assert trained > 0 and count_text_encoder_parameters(configs, methods.create(name), True) == (frozen, trained)
    assert count_text_encoder_parameters(configs, methods.create(name), False) == (frozen, 0)
