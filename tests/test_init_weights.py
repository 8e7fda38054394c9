"""Runs that start from existing weights: `--init-weights` (kohya-ss' --network_weights) starts the method's
tensors from an adapter or a kohya/LyCORIS file, `--base-adapters` (kohya-ss' --base_weights) merges adapters into
the frozen model before the method is injected."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from helpers import run_unet, uninterrupted_and_resumed
from sdtune.adapter import adapter_info, load_adapter, load_adapters
from sdtune.cli import app
from sdtune.config import TrainConfig
from sdtune.errors import SdtuneError
from sdtune.export import export_adapter
from sdtune.merging import merge_adapter
from sdtune.models import load_pipeline
from sdtune.training import open_trainer, plan_run, train

SETTINGS = dict(concept="castle", model="tiny-random", log_with="none", seed=3)


def settings(output, **changes) -> TrainConfig:
    return TrainConfig(output=str(output), **{**SETTINGS, "steps": 2, "lr": 1e-2, **changes})


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_path):
    """A LoRA (rank 2, alpha 1), a LoHa and a LoKr trained a few steps on tiny-random, and their kohya exports."""
    root = tmp_path_factory.mktemp("start")
    runs = {}
    kinds = (("lora", "lora", {"rank": 2, "alpha": 1.0}), ("loha", "loha", {"rank": 2}), ("lokr", "lokr", {"rank": 2}),
             ("lora-dora", "lora", {"rank": 2, "dora": True}))
    for name, method, options in kinds:
        run = train(settings(root / name, method=method, options=options, steps=4, lr=3e-2), progress=False).output
        kohya = root / f"{name}-kohya.safetensors"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # LyCORIS' loader notes
            export_adapter(run, "kohya", kohya)
        runs[name], runs[f"{name}-kohya"] = run, kohya
    return runs


def step_zero_output(config, inputs) -> torch.Tensor:
    """The UNet's prediction once the run is set up, before its first step."""
    with open_trainer(config, progress=False) as trainer:
        return run_unet(trainer.method.unet, inputs)


def sampled_output(adapters, inputs, scales=None) -> torch.Tensor:
    pipe = load_pipeline("tiny-random")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        load_adapters([str(a) for a in adapters], pipe, scales) if len(adapters) > 1 else load_adapter(adapters[0], pipe)
    return run_unet(pipe.unet, inputs)


@pytest.mark.parametrize("source", ["lora", "lora-kohya", "loha-kohya", "lokr-kohya", "lora-dora-kohya", "loha", "lokr"])
def test_step_zero_with_init_weights_is_the_adapter_loaded(source, trained, tmp_path, inputs):
    """Rank and alpha come from the file (--dim_from_weights); the run's UNet before its first step computes what
    sampling with the file computes, for sdtune adapters and kohya/LyCORIS files alike."""
    method = source.split("-")[0]
    config = settings(tmp_path / "run", method=method, init_weights=str(trained[source]))
    plan = plan_run(config)
    assert plan.config.options["rank"] == 2 and plan.taken_options["rank"] == 2
    if source == "lora-kohya":
        assert plan.config.options["alpha"] == 1.0 and plan.taken_options["alpha"] == 1.0
    assert plan.config.options.get("dora", False) == ("dora" in source)
    assert any(f"start from {trained[source]}" in line for line in plan.summary())
    fresh = step_zero_output(settings(tmp_path / "fresh", method=method, options={"rank": 2}), inputs)
    started = step_zero_output(config, inputs)
    expected = sampled_output([trained[source]], inputs)
    assert not torch.allclose(fresh, expected, atol=1e-4)  # the adapter changes the output: the comparison means something
    torch.testing.assert_close(started, expected, atol=2e-5, rtol=1e-4)


def test_training_from_init_weights_starts_lower_and_trains_on(trained, tmp_path):
    """The same draws at a rate too small to move anything: the run started from the trained LoRA has a lower loss than
    a fresh one; at a real rate its tensors move on from the file's (a fresh optimizer, no checkpoint needed)."""
    probe = dict(method="lora", steps=6, lr=1e-9, seed=11)
    fresh = train(settings(tmp_path / "fresh", options={"rank": 2, "alpha": 1.0}, **probe), progress=False)
    started = train(settings(tmp_path / "started", init_weights=str(trained["lora"]), **probe), progress=False)
    assert sum(started.losses) < sum(fresh.losses), (started.losses, fresh.losses)
    run = train(settings(tmp_path / "on", method="lora", init_weights=str(trained["lora"]), steps=3), progress=False)
    before = load_file(trained["lora"] / "adapter.safetensors")
    after = load_file(run.adapter)
    assert before.keys() == after.keys() and any(not torch.equal(before[k], after[k]) for k in before)


def test_the_adapter_and_its_card_record_where_training_started(trained, tmp_path):
    from sdtune.adapter import adapter_digest
    from sdtune.model_card import write_model_card

    run = train(settings(tmp_path / "run", method="lora", init_weights=str(trained["lora-kohya"])), progress=False)
    record = json.loads(adapter_info(run.adapter).extra["init_weights"])
    assert record == {"name": "lora-kohya.safetensors", "digest": adapter_digest(trained["lora-kohya"])}
    card = write_model_card(run.output).output.read_text()
    assert "lora-kohya.safetensors" in card and record["digest"] in card
    exported = tmp_path / "again.safetensors"
    export_adapter(run.output, "kohya", exported)
    from sdtune.safetensors_checks import read_safetensors_header

    assert json.loads(read_safetensors_header(exported)[0]["sdtune_init_weights"]) == record


def test_a_resumed_run_with_init_weights_resumes_rather_than_starting_again(trained, tmp_path, monkeypatch):
    def configure(output, **changes):
        return settings(output, method="lora", init_weights=str(trained["lora"]), steps=4, checkpoint_every=2, **changes)

    whole, resumed = uninterrupted_and_resumed(configure, tmp_path, monkeypatch, at_step=2)
    assert resumed.resumed_from is not None and len(resumed.losses) == 2
    first, second = load_file(whole.adapter), load_file(resumed.adapter)
    assert all(torch.equal(first[k], second[k]) for k in first)


@pytest.mark.parametrize("source, args, message", [
    ("atoms", [], "atoms adapter; start from it with --method atoms"),
    ("lora", ["--rank", "8"], "holds tensors of rank 2; the run sets 8"),
    ("lora", ["--alpha", "3"], "holds tensors of alpha 1.0; the run sets 3.0"),
    ("lora", ["--dora"], "holds tensors of dora False; the run sets True"),
])
def test_init_weights_of_another_method_or_meaning_is_refused_before_the_model_loads(source, args, message, trained, tmp_path, monkeypatch):
    import sdtune.models

    if source == "atoms":
        source = train(settings(tmp_path / "atoms", method="atoms", steps=1), progress=False).output
    else:
        source = trained[source]
    monkeypatch.setattr(sdtune.models, "load_pipeline", lambda *a, **k: pytest.fail("the model loaded"))
    args = ["--method", "lora", *args]
    result = CliRunner().invoke(app, ["train", "--model", "tiny-random", "--output", str(tmp_path / "run"), "--log-with", "none",
                                      "--init-weights", str(source), *args])
    assert result.exit_code == 2 and message in result.output, result.output
    assert len(result.output.strip().splitlines()) == 1


@pytest.mark.parametrize("method, source, message", [
    ("atoms", "lora-kohya", "method 'atoms' cannot start from a kohya/LyCORIS file"),
    ("lora", "loha-kohya", "holds loha updates"),
    ("loha", "lora-kohya", "holds lora updates"),
])
def test_a_kohya_file_the_method_cannot_hold_is_refused(method, source, message, trained, tmp_path):
    with pytest.raises(SdtuneError, match=message):
        plan_run(settings(tmp_path / "run", method=method, init_weights=str(trained[source])))


def test_a_kohya_file_of_another_model_family_or_text_encoder_is_refused(trained, tmp_path):
    tensors = load_file(trained["lora-kohya"])
    sd2 = tmp_path / "sd2.safetensors"
    save_file(tensors, sd2, {"ss_base_model_version": "sd_v2", "ss_network_module": "networks.lora"})
    with pytest.raises(SdtuneError, match="trained on a sd_v2 model; model tiny-random is sd_v1"):
        plan_run(settings(tmp_path / "run", method="lora", init_weights=str(sd2)))
    with_te = tmp_path / "te.safetensors"
    te = {"lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": torch.zeros(2, 32),
          "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight": torch.zeros(32, 2)}
    save_file({**tensors, **te}, with_te)
    with pytest.raises(SdtuneError, match="add train_text_encoder=True"):
        plan_run(settings(tmp_path / "run", method="lora", init_weights=str(with_te)))


def test_a_kohya_module_outside_the_targets_is_refused(trained, tmp_path):
    with pytest.raises(SdtuneError, match=r"module\(s\) that lora --targets attn does not tune"):
        step_zero_output(settings(tmp_path / "run", method="lora", options={"targets": "attn"},
                                  init_weights=str(trained["lora-kohya"])), None)


def test_training_on_base_adapters_equals_training_on_a_model_they_were_merged_into(trained, tmp_path):
    """--base-adapters FILE:S merges at strength S before the method is injected: the first step's loss is the one a run
    on a pipeline merged by hand (`sdtune merge --scale S`) has; the trained adapter records them, loads on the base
    model with a warning that they are missing, and stacks on them without one."""
    merged = merge_adapter(trained["loha"], tmp_path / "merged", scale=0.7).output
    by_hand = train(settings(tmp_path / "by-hand", method="lora", model=str(merged), steps=1), progress=False)
    config = settings(tmp_path / "based", method="lora", steps=1, base_adapters=[f"{trained['loha']}:0.7"])
    summary = plan_run(config).summary()
    assert any("base adapters merged into the frozen model first" in line and ":0.7" not in line and "at 0.7" in line
               for line in summary)
    assert any("base adapters' tensors" in line for line in summary)  # the memory check counts them
    based = train(config, progress=False)
    assert based.losses[0] == pytest.approx(by_hand.losses[0], rel=1e-5, abs=1e-6)
    records = json.loads(adapter_info(based.adapter).extra["base_adapters"])
    assert [(r["name"], r["strength"]) for r in records] == [("loha/adapter.safetensors", 0.7)]
    with pytest.warns(UserWarning, match="trained on top of base adapters that are not loaded with it: loha/adapter.safetensors at 0.7"):
        load_adapter(based.adapter, load_pipeline("tiny-random"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_adapters([str(trained["loha"]), str(based.adapter)], load_pipeline("tiny-random"), [0.7, 1.0])
    from sdtune.model_card import write_model_card

    card = write_model_card(based.output).output.read_text()
    assert "loha/adapter.safetensors` at strength 0.7" in card


def test_base_adapters_in_toml_and_from_the_command_line(trained, tmp_path):
    toml = tmp_path / "run.toml"
    toml.write_text(f'method = "lora"\nmodel = "tiny-random"\nbase_adapters = ["{trained["loha"]}:0.5"]\ninit_weights = "{trained["lora"]}"\n')
    config = TrainConfig.load(toml, output=str(tmp_path / "run"))
    assert config.base_adapters == [f"{trained['loha']}:0.5"] and config.init_weights == str(trained["lora"])
    assert "base_adapters" in config.to_dict() and "base_adapters" not in TrainConfig().to_dict()
    result = CliRunner().invoke(app, ["train", "--config", str(toml), "--dry-run", "--base-adapters", f"{trained['lokr']}:0.25"])
    assert result.exit_code == 0, result.output
    assert f"{trained['lokr']} at 0.25" in result.output and f"{trained['loha']}" not in result.output
    result = CliRunner().invoke(app, ["train", "--model", "tiny-random", "--dry-run", "--base-adapters", str(tmp_path / "none:0.5")])
    assert result.exit_code == 2 and "adapter not found" in result.output, result.output


def test_init_weights_start_the_text_encoder_too(trained, tmp_path):
    """An adapter (and its kohya export) that trained the text encoder starts a --train-text-encoder run's text encoder
    layers too; a UNet-only adapter starts such a run's UNet layers, its text encoder layers fresh."""
    te_run = train(settings(tmp_path / "te", method="lora", options={"rank": 2}, train_text_encoder=True, steps=3, lr=3e-2),
                   progress=False).output
    exported = tmp_path / "te.safetensors"
    export_adapter(te_run, "kohya", exported)
    tokenizer = load_pipeline("tiny-random").tokenizer
    ids = tokenizer(["a photo of a castle"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    for source in (te_run, exported):
        config = settings(tmp_path / f"from-{source.name}", method="lora", train_text_encoder=True, init_weights=str(source))
        with open_trainer(config, progress=False) as trainer, torch.no_grad():
            started = trainer.pipe.text_encoder.eval()(ids)[0]
        pipe = load_pipeline("tiny-random")
        load_adapter(source, pipe)
        with torch.no_grad():
            torch.testing.assert_close(started, pipe.text_encoder(ids)[0], atol=1e-5, rtol=1e-4)
            assert not torch.allclose(started, load_pipeline("tiny-random").text_encoder(ids)[0], atol=1e-3)
    config = settings(tmp_path / "unet-only", method="lora", train_text_encoder=True, init_weights=str(trained["lora"]))
    with open_trainer(config, progress=False) as trainer:
        assert trainer.method.text_encoders  # the UNet's tensors from the file, the text encoder's as a fresh run's


def test_init_weights_for_another_base_model_are_refused(trained, tmp_path):
    """An adapter's fingerprint is checked against the run's model: weights that another adapter was merged into (a
    folder `sdtune merge` wrote) are another base model; the same adapter merged beneath with --base-adapters is not."""
    other = merge_adapter(trained["loha"], tmp_path / "other", scale=1.0).output
    with pytest.raises(SdtuneError, match="was trained on base model 'tiny-random'; this model's weights differ"):
        step_zero_output(settings(tmp_path / "run", method="lora", model=str(other), init_weights=str(trained["lora"])), None)
    on_base = settings(tmp_path / "based", method="lora", init_weights=str(trained["lora"]), base_adapters=[str(trained["loha"])])
    with open_trainer(on_base, progress=False):
        pass


def kohya_lora_by_hand(path, family: str, rank: int = 3, alpha: float = 1.5):
    """A kohya-ss LoRA of a `--targets` family's layers on tiny-random, written by hand under kohya's names
    (`lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_ff_net_0_proj`, `..._proj_in`), no sdtune metadata;
    a 1x1 conv's factors are 1x1 convs, as kohya-ss stores them."""
    from sdtune.kohya import UNET_PREFIX, kohya_name
    from sdtune.methods.base import layer_family

    unet = load_pipeline("tiny-random").unet
    generator = torch.Generator().manual_seed(13)
    tensors = {}
    for name in layer_family(unet, family):
        layer = unet.get_submodule(name)
        conv = isinstance(layer, torch.nn.Conv2d)
        inputs, outputs = (layer.in_channels, layer.out_channels) if conv else (layer.in_features, layer.out_features)
        key = kohya_name(UNET_PREFIX, name)
        tensors[f"{key}.lora_down.weight"] = torch.randn(rank, inputs, *(layer.kernel_size if conv else ()), generator=generator) * 0.3
        tensors[f"{key}.lora_up.weight"] = torch.randn(outputs, rank, *((1, 1) if conv else ()), generator=generator) * 0.3
        tensors[f"{key}.alpha"] = torch.tensor(alpha)
    save_file(tensors, path, {"ss_network_module": "networks.lora", "ss_base_model_version": "sd_v1"})
    return path


def restarted_export(config, tmp_path):
    """The run's method as it starts (before any step), saved and exported to a kohya file: its tensors."""
    from sdtune.adapter import save_adapter

    with open_trainer(config, progress=False) as trainer:
        adapter = save_adapter(tmp_path / "start" / "adapter.safetensors", trainer.method, "tiny-random")
    exported = tmp_path / "again.safetensors"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        export_adapter(adapter, "kohya", exported)
    return load_file(exported)


@pytest.mark.parametrize("family", ["transformer", "locon"])
def test_a_kohya_file_of_transformer_layers_starts_a_run_of_that_family(family, tmp_path, inputs):
    """A kohya-ss LoRA of the transformer blocks' every layer (ff, proj_in/out: kohya's LoRA; with the resnets': its
    LoCon), written by hand: the run takes the family that covers exactly its modules as it takes the rank, says so,
    computes what sampling with the file computes before its first step, and exports the file's tensors bit for bit."""
    source = kohya_lora_by_hand(tmp_path / "kohya.safetensors", family)
    assert any("_ff_net_0_proj." in key for key in load_file(source)) and any("_proj_in." in key for key in load_file(source))
    config = settings(tmp_path / "run", method="lora", init_weights=str(source))
    plan = plan_run(config)
    assert plan.config.options["targets"] == family and plan.taken_options == {"targets": family, "rank": 3, "alpha": 1.5}
    assert any(f"targets {family}" in line for line in plan.summary())
    torch.testing.assert_close(step_zero_output(config, inputs), sampled_output([source], inputs), atol=2e-5, rtol=1e-4)
    original, again = load_file(source), restarted_export(config, tmp_path)
    assert original.keys() == again.keys() and all(torch.equal(original[key], again[key]) for key in original)


def test_a_run_trained_on_transformer_layers_exports_kohya_names_and_starts_a_run_again(tmp_path, inputs):
    """sdtune's `--targets transformer` run, exported to kohya, holds kohya-ss' names for ff and proj layers; a run
    started from the export without --targets takes the family back; with a family that lacks its layers it is
    refused, naming the families that hold them."""
    run = train(settings(tmp_path / "trained", method="lora", options={"targets": "transformer", "rank": 2}, steps=2), progress=False)
    exported = tmp_path / "transformer.safetensors"
    export_adapter(run.output, "kohya", exported)
    modules = {key.partition(".")[0] for key in load_file(exported)}
    assert "lora_unet_mid_block_attentions_0_transformer_blocks_0_ff_net_2" in modules
    assert "lora_unet_up_blocks_1_attentions_2_proj_out" in modules and "lora_unet_up_blocks_1_resnets_0_conv1" not in modules
    from sdtune.safetensors_checks import read_safetensors_header

    assert "conv_dim" not in json.loads(read_safetensors_header(exported)[0]["ss_network_args"])  # proj_in's 1x1 is plain LoRA
    config = settings(tmp_path / "run", method="lora", init_weights=str(exported))
    assert plan_run(config).taken_options["targets"] == "transformer"
    original, again = load_file(exported), restarted_export(config, tmp_path)
    assert all(torch.equal(original[key], again[key]) for key in original)
    with pytest.raises(SdtuneError, match=r"lora --targets attn does not tune .*: start with --targets transformer or locon"):
        step_zero_output(settings(tmp_path / "attn", method="lora", options={"targets": "attn"}, init_weights=str(exported)), None)
    wider = settings(tmp_path / "wider", method="lora", options={"targets": "locon"}, init_weights=str(exported))
    assert plan_run(wider).config.options["targets"] == "locon"  # the run's own choice: its other layers start at 0
    torch.testing.assert_close(step_zero_output(wider, inputs), sampled_output([exported], inputs), atol=2e-5, rtol=1e-4)
