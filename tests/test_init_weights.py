"""Runs that start from existing weights: `--init-weights` (kohya-ss' --network_weights) starts the method's
tensors from an adapter or a kohya/LyCORIS file, `--base-adapters` (kohya-ss' --base_weights) merges adapters into
the frozen model before the method is injected."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from safetensors import safe_open
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


@pytest.fixture(scope="module")
def fresh_step_zero(tmp_path_factory):
    """`fresh_step_zero(method, inputs)`: step_zero_output of a run of `method` at rank 2 started from nothing, set up
    once per method in the module (the same seed and settings give the same UNet each time)."""
    outputs = {}

    def output(method, inputs):
        if method not in outputs:
            config = settings(tmp_path_factory.mktemp("fresh"), method=method, options={"rank": 2})
            outputs[method] = step_zero_output(config, inputs)
        return outputs[method]

    return output


@pytest.mark.parametrize("source", ["lora", "lora-kohya", "loha-kohya", "lokr-kohya", "lora-dora-kohya", "loha", "lokr"])
def test_step_zero_with_init_weights_is_the_adapter_loaded(source, trained, tmp_path, inputs, fresh_step_zero):
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
    fresh = fresh_step_zero(method, inputs)
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
    summary = plan_run(configure(resumed.output, resume="latest")).summary()  # the dry run says whose tensors it resumes
    assert any(line.startswith(f"trained tensors started from {trained['lora']}; resumed, they are the checkpoint's") for line in summary)


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
    with pytest.raises(SdtuneError, match='trained on a sd_v2 model; model="tiny-random" is sd_v1'):
        plan_run(settings(tmp_path / "run", method="lora", init_weights=str(sd2)))
    with pytest.raises(SdtuneError, match=f"^base_adapters: {sd2} was trained on a sd_v2 model; model=\"tiny-random\" is sd_v1$"):
        plan_run(settings(tmp_path / "run", method="lora", base_adapters=[f"{sd2}:0.5"]))  # before the model loads too
    with_te = tmp_path / "te.safetensors"
    te = {"lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": torch.zeros(2, 32),
          "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight": torch.zeros(32, 2)}
    save_file({**tensors, **te}, with_te)
    with pytest.raises(SdtuneError, match="add train_text_encoder=True"):
        plan_run(settings(tmp_path / "run", method="lora", init_weights=str(with_te)))


def test_a_kohya_module_outside_the_targets_is_refused_before_the_model_loads(trained, tmp_path, monkeypatch):
    """The run's own --targets leave out modules the file changes: the dry run (which loads no model) refuses it, in
    one line, exit 2, and a run before it loads the model, in the words loading the file would say."""
    import sdtune.models

    source = trained["lora-kohya"]
    config = settings(tmp_path / "run", method="lora", options={"targets": "attn"}, init_weights=str(source))
    result = CliRunner().invoke(app, ["train", "--dry-run", "--model", "tiny-random", "--method", "lora", "--targets", "attn",
                                      "--init-weights", str(source), "--output", str(tmp_path / "cli"), "--log-with", "none"])
    said = result.output.strip()
    assert result.exit_code == 2 and len(said.splitlines()) == 1, result.output
    assert said.startswith(f"error: --init-weights {source}: the file changes ") and \
        " module(s) that lora --targets attn does not tune (" in said and said.endswith(": start with --targets all or full"), said
    with pytest.raises(SdtuneError, match=r'module\(s\) that lora options=\{"targets": "attn"\} does not tune'):
        plan_run(config)

    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(sdtune.models, "load_pipeline", no_model)
    with pytest.raises(SdtuneError, match=r'module\(s\) that lora options=\{"targets": "attn"\} does not tune'):
        train(config, progress=False)


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
    with pytest.warns(UserWarning, match=r"trained on top of base adapters that are not loaded with it: loha/adapter.safetensors at 0.7; .*--adapter-scale 0.7,1\)"):
        load_adapter(based.adapter, load_pipeline("tiny-random"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_adapters([str(trained["loha"]), str(based.adapter)], load_pipeline("tiny-random"), [0.7, 1.0])
    exported = export_adapter(based.output, "kohya", tmp_path / "based.safetensors").output  # its kohya file says so too
    with pytest.warns(UserWarning, match="based.safetensors was trained on top of base adapters that are not loaded with it"):
        load_adapter(exported, load_pipeline("tiny-random"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_adapters([str(trained["loha"]), str(exported)], load_pipeline("tiny-random"), [0.7, 1.0])
    from sdtune.model_card import write_model_card

    card = write_model_card(based.output).output.read_text()
    assert "loha/adapter.safetensors` at strength 0.7" in card


def unet_weights(pipe) -> dict[str, torch.Tensor]:
    return {name: value.detach().clone() for name, value in pipe.unet.state_dict().items()}


def each_on_the_base_weights(paths, scales):
    """A pipeline with the adapters' updates each taken on the base weights, added up in their order: what stacking
    did for every adapter before it stacked one on its base adapters."""
    from sdtune.adapter import open_adapter
    from sdtune.methods.base import remember_base_samples

    pipe, total = load_pipeline("tiny-random"), {}
    for path, scale in zip(paths, scales):
        adapter = open_adapter(path, pipe)
        if scale != 1.0:
            adapter.set_scale(scale)
        for module, attr, delta in adapter.take_update():  # the weights are put back: the next one meets the base
            entry = total.setdefault((id(module), attr), [module, attr, None])
            entry[2] = delta if entry[2] is None else entry[2].add_(delta)
    remember_base_samples({id(module): module for module, _, _ in total.values()}.values())
    with torch.no_grad():
        for module, attr, delta in total.values():
            weight = getattr(module, attr)
            weight.copy_(weight + delta.to(weight.dtype))
    return pipe


def merged_by_hand(base, strength: float, runs: list):
    """A pipeline with `base` merged at `strength` as --base-adapters merges it, then each of `runs` merged into the
    weights it left (what each run trained and validated on), their updates added up."""
    pipe = load_pipeline("tiny-random")
    load_adapters([str(base)], pipe, [strength])
    beneath = unet_weights(pipe)
    total = None
    for run in runs:
        with_run = load_pipeline("tiny-random")
        load_adapters([str(base)], with_run, [strength])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # loaded alone, without its base adapter (merged into the weights already)
            load_adapter(run, with_run)
        change = {key: value - beneath[key] for key, value in unet_weights(with_run).items()}
        total = change if total is None else {key: total[key] + change[key] for key in total}
    pipe.unet.load_state_dict({key: beneath[key] + total[key] for key in beneath})
    return pipe


@pytest.fixture(scope="module")
def on_lora(trained, tmp_path_factory):
    """Filter atoms, GIFT and DiffFit, each trained two steps on the LoRA merged at 0.7."""
    root = tmp_path_factory.mktemp("on-lora")
    return {method: train(settings(root / method, method=method, base_adapters=[f"{trained['lora']}:0.7"]), progress=False).output
            for method in ("atoms", "gift", "difffit")}


@pytest.mark.parametrize("method", ["atoms", "gift", "difffit"])
def test_an_adapter_stacked_on_its_base_adapter_is_what_it_trained_on(method, on_lora, trained, inputs):
    """Filter atoms, GIFT and DiffFit compute their update from the weights they meet: stacked with the LoRA they were
    trained on at its strength (in either order), their update is computed on the weights the LoRA leaves, so the
    stack is what the run trained and validated on: the LoRA merged by hand, the run merged on top."""
    lora, run = trained["lora"], on_lora[method]
    expected = merged_by_hand(lora, 0.7, [run])
    weights, output = unet_weights(expected), run_unet(expected.unet, inputs)
    for paths, scales in (([lora, run], [0.7, 1.0]), ([run, lora], [1.0, 0.7])):
        pipe = load_pipeline("tiny-random")
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # its base adapter is there, at its strength: nothing to warn of
            load_adapters([str(path) for path in paths], pipe, scales)
        stacked = unet_weights(pipe)
        assert stacked.keys() == weights.keys()
        for key in weights:
            torch.testing.assert_close(stacked[key], weights[key], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(run_unet(pipe.unet, inputs), output, rtol=1e-5, atol=1e-6)
        # the comparison means something: the run's update on the base weights (as stacks took it) is another one
        apart = unet_weights(each_on_the_base_weights([str(path) for path in paths], scales))
        assert max((apart[key] - weights[key]).abs().max().item() for key in weights) > 1e-4


def test_two_adapters_on_one_base_adapter_each_stack_on_it(on_lora, trained):
    """Filter atoms (computed a layer at a time) and DiffFit (its update held whole, taken on the weights the LoRA
    leaves for the while) both trained on the LoRA: each update is the one on the weights the LoRA leaves, added up."""
    lora, atoms, difffit = trained["lora"], on_lora["atoms"], on_lora["difffit"]
    expected = unet_weights(merged_by_hand(lora, 0.7, [atoms, difffit]))
    for paths, scales in (([difffit, lora, atoms], [1.0, 0.7, 1.0]), ([atoms, difffit, lora], [1.0, 1.0, 0.7])):
        pipe = load_pipeline("tiny-random")
        load_adapters([str(path) for path in paths], pipe, scales)
        stacked = unet_weights(pipe)
        for key in expected:
            torch.testing.assert_close(stacked[key], expected[key], rtol=1e-5, atol=2e-6)


def test_an_adapter_on_its_base_adapter_is_still_stacked_a_layer_at_a_time(on_lora, trained, monkeypatch):
    """Each layer's updates (the LoRA's, then the atoms' on the weight with the LoRA's added) are computed together and
    written before the next layer's: stacking on base adapters keeps the peak at one layer's updates."""
    from sdtune.methods.base import WrappedLayers

    computed, layer_update = [], WrappedLayers._layer_update

    def logged(self, layer):
        computed.append((id(self.layer_base(layer)), self.name))
        return layer_update(self, layer)

    monkeypatch.setattr(WrappedLayers, "_layer_update", logged)
    load_adapters([str(on_lora["atoms"]), str(trained["lora"])], load_pipeline("tiny-random"), [1.0, 0.7])
    runs = [key for i, (key, _) in enumerate(computed) if i == 0 or computed[i - 1][0] != key]
    assert len(runs) == len(set(runs))  # each layer's updates computed together, never again
    both = [names for key in runs if len(names := [name for k, name in computed if k == key]) == 2]
    assert both and all(names == ["lora", "atoms"] for names in both)  # the base adapter's first, the run's on it


def test_a_refused_adapter_stacked_on_its_base_adapter_leaves_the_base_weights(on_lora, trained, monkeypatch):
    """DiffFit's update is taken whole, on weights the LoRA's update is added to for the while: refused there, the
    weights are put back exactly and the model is plain."""
    import sdtune.adapter

    pipe = load_pipeline("tiny-random")
    base, names = unet_weights(pipe), [name for name, _ in pipe.unet.named_modules()]
    open_adapter = sdtune.adapter.open_adapter

    def refusing(path, pipeline, rename=None):
        if "difffit" in str(path):
            assert any(not torch.equal(value, base[key]) for key, value in unet_weights(pipeline).items())  # the LoRA's in
            raise SdtuneError("refused")
        return open_adapter(path, pipeline, rename)

    monkeypatch.setattr(sdtune.adapter, "open_adapter", refusing)
    with pytest.raises(SdtuneError, match="refused"):
        load_adapters([str(on_lora["difffit"]), str(trained["lora"])], pipe, [1.0, 0.7])
    after = unet_weights(pipe)
    assert after.keys() == base.keys() and all(torch.equal(after[key], base[key]) for key in base)
    assert [name for name, _ in pipe.unet.named_modules()] == names


@pytest.mark.slow  # 10-35 s on two cores; `make test-all` runs it
def test_a_low_rank_adapter_on_a_base_adapter_stacks_with_the_same_bits(trained, tmp_path):
    """A LoRA's update is the same on any weights: stacked on the LoHa it was trained on, it is computed on the base
    weights as always, and the stack's weights are bit for bit what they were."""
    run = train(settings(tmp_path / "on-loha", method="lora", options={"rank": 2}, base_adapters=[f"{trained['loha']}:0.7"]),
                progress=False).output
    for paths, scales in (([trained["loha"], run], [0.7, 1.0]), ([run, trained["loha"]], [0.5, 0.7]),
                          ([run, trained["lokr"], trained["loha"]], [1.0, 0.5, 0.7])):  # summed in the stack's order
        paths = [str(path) for path in paths]
        pipe = load_pipeline("tiny-random")
        load_adapters(paths, pipe, scales)
        stacked, expected = unet_weights(pipe), unet_weights(each_on_the_base_weights(paths, scales))
        assert stacked.keys() == expected.keys() and all(torch.equal(stacked[key], expected[key]) for key in stacked)


def test_a_base_adapter_stacked_at_another_strength_is_warned_of(on_lora, trained):
    """At another strength than the run's, the base adapter leaves other weights than it trained on: a warning says
    so, and the run's update is taken on the base weights, as for an adapter without base adapters."""
    paths, scales = [str(trained["lora"]), str(on_lora["atoms"])], [0.5, 1.0]
    pipe = load_pipeline("tiny-random")
    with pytest.warns(UserWarning, match=r"atoms was trained on top of base adapters loaded with it at "
                                         r"another strength: lora/adapter.safetensors at 0.7 \(given at 0.5\)"):
        load_adapters(paths, pipe, scales)
    stacked, expected = unet_weights(pipe), unet_weights(each_on_the_base_weights(paths, scales))
    assert all(torch.equal(stacked[key], expected[key]) for key in stacked)


def test_a_base_adapter_given_twice_is_merged_twice_everywhere(trained, tmp_path):
    """As kohya-ss merges each --base_weights entry, a file given twice is merged twice: recorded twice, and a stack that
    gives it twice at those strengths has the run's update computed on the weights both leave (the LoRA at 0.5 twice:
    at 1), without a warning; given once, the other entry is missing."""
    lora = trained["lora"]
    config = settings(tmp_path / "twice", method="atoms", base_adapters=[f"{lora}:0.5", f"{lora}:0.5"])
    assert any(f"first: {lora} at 0.5, {lora} at 0.5" in line for line in plan_run(config).summary())
    run = train(config, progress=False).output
    records = json.loads(adapter_info(run).extra["base_adapters"])
    assert [(r["name"], r["strength"]) for r in records] == [("lora/adapter.safetensors", 0.5)] * 2
    expected = unet_weights(merged_by_hand(lora, 1.0, [run]))
    pipe = load_pipeline("tiny-random")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_adapters([str(lora), str(run), str(lora)], pipe, [0.5, 1.0, 0.5])
    stacked = unet_weights(pipe)
    for key in expected:
        torch.testing.assert_close(stacked[key], expected[key], rtol=1e-5, atol=1e-6)
    with pytest.warns(UserWarning, match=r"twice was trained on top of base adapters that are not "
                                         r"loaded with it: lora/adapter.safetensors at 0.5;"):
        load_adapters([str(lora), str(run)], load_pipeline("tiny-random"), [0.5, 1.0])


def test_a_starting_file_trained_reading_prompts_another_way_is_warned_of(trained, tmp_path):
    """--init-weights of a file trained with another --clip-skip or --max-token-length than the run's: one warning names
    both values (an sdtune adapter's records, a kohya file's ss_ keys where it has them), the dry run's too."""
    lora, kohya = trained["lora"], trained["lora-kohya"]
    assert "clip_skip" not in adapter_info(lora).extra  # trained reading prompts plainly
    with pytest.warns(UserWarning, match=r"^init_weights=\".*lora/adapter.safetensors\" was trained with clip_skip=1 and "
                                         r"max_token_length=75; the run reads prompts with clip_skip=2 and max_token_length=150: "
                                         r"its tensors start from what they learned on other text embeddings") as said:
        plan_run(settings(tmp_path / "run", method="lora", init_weights=str(lora), clip_skip=2, max_token_length=150))
    assert len([w for w in said if "was trained with" in str(w.message)]) == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the same reading, or a kohya file that does not say
        plan_run(settings(tmp_path / "run", method="lora", init_weights=str(lora)))
        bare = tmp_path / "bare.safetensors"
        save_file(load_file(kohya), bare, {"ss_network_module": "networks.lora"})
        plan_run(settings(tmp_path / "run", method="lora", init_weights=str(bare), clip_skip=2))
    said_two = tmp_path / "clip2.safetensors"
    save_file(load_file(kohya), said_two, {"ss_network_module": "networks.lora", "ss_clip_skip": "2", "ss_max_token_length": "None"})
    with pytest.warns(UserWarning, match=r"clip2.safetensors\" was trained with clip_skip=2; the run reads prompts with clip_skip=1:"):
        plan_run(settings(tmp_path / "run", method="lora", init_weights=str(said_two)))
    with pytest.warns(UserWarning, match=r"^--init-weights .*clip2.safetensors was trained with --max-token-length 75; "
                                         r"the run reads prompts with --max-token-length 225: .*\(give --max-token-length 75 "):
        result = CliRunner().invoke(app, ["train", "--model", "tiny-random", "--dry-run", "--method", "lora", "--output",
                                          str(tmp_path / "run"), "--init-weights", str(said_two), "--clip-skip", "2",
                                          "--max-token-length", "225"])
    assert result.exit_code == 0 and "(dry run: no model loaded, nothing written)" in result.output, result.output


def test_overwriting_the_run_that_holds_the_starting_files_is_refused(trained, tmp_path):
    """No run writes onto its own input: --overwrite would replace the earlier run's adapter the run starts from or
    trains on; a file of the user's own in the folder, which it leaves, is fine."""
    import shutil

    run = shutil.copytree(trained["lora"], tmp_path / "run")
    for changes in ({"init_weights": str(run)}, {"base_adapters": [f"{run / 'adapter.safetensors'}:0.5"]}):
        with pytest.raises(SdtuneError, match=r"is the earlier run's in .*, which overwrite=True replaces: copy it out of the folder"):
            plan_run(settings(run, method="lora", overwrite=True, **changes))
    shutil.copy(run / "adapter.safetensors", run / "mine.safetensors")
    assert plan_run(settings(run, method="lora", overwrite=True, init_weights=str(run / "mine.safetensors"))).start.startswith("replaces")


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
    result = CliRunner().invoke(app, ["train", "--model", "tiny-random", "--dry-run", "--base-adapters", f"{trained['loha']}:1000"])
    assert result.exit_code == 2 and "the strength must lie within ±100, as sdtune sample's --adapter-scale, got 1000" in result.output
    result = CliRunner().invoke(app, ["train", "--model", "tiny-random", "--dry-run", "--base-adapters", f"{trained['loha']}:abc"])
    assert result.exit_code == 2 and f"({trained['loha']} is there: the strength after ':' is a number, such as {trained['loha']}:0.5)" in result.output


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


def kohya_lora_by_hand(path, family: str, rank: int = 3, alpha: float = 1.5, conv_rank: int | None = None,
                       conv_alpha: float | None = None):
    """A kohya-ss LoRA of a `--targets` family's layers on tiny-random, written by hand under kohya's names
    (`lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_ff_net_0_proj`, `..._proj_in`), no sdtune metadata;
    a 1x1 conv's factors are 1x1 convs, as kohya-ss stores them. With `conv_rank` (and `conv_alpha`), the 3x3 convs
    at those, and ss_network_args saying so, as kohya-ss' --network_args conv_dim=... conv_alpha=... writes them."""
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
        spatial = conv and tuple(layer.kernel_size) != (1, 1) and conv_rank is not None
        r, a = (conv_rank, conv_alpha if conv_alpha is not None else alpha) if spatial else (rank, alpha)
        tensors[f"{key}.lora_down.weight"] = torch.randn(r, inputs, *(layer.kernel_size if conv else ()), generator=generator) * 0.3
        tensors[f"{key}.lora_up.weight"] = torch.randn(outputs, r, *((1, 1) if conv else ()), generator=generator) * 0.3
        tensors[f"{key}.alpha"] = torch.tensor(a)
    metadata = {"ss_network_module": "networks.lora", "ss_base_model_version": "sd_v1"}
    if conv_rank is not None:
        metadata["ss_network_args"] = json.dumps({"conv_dim": str(conv_rank), "conv_alpha": f"{conv_alpha if conv_alpha is not None else alpha:g}"})
    save_file(tensors, path, metadata)
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


@pytest.mark.parametrize("family", ["transformer", "locon", "full"])
def test_a_kohya_file_of_transformer_layers_starts_a_run_of_that_family(family, tmp_path, inputs):
    """A kohya-ss LoRA of the transformer blocks' every layer (ff, proj_in/out: kohya's LoRA; with the resnets': its
    LoCon; with conv_in, conv_out and the time embedding, `lora_unet_conv_in`, `lora_unet_time_embedding_linear_1`:
    LyCORIS' full preset), written by hand: the run takes the family that covers exactly its modules as it takes the
    rank, says so, computes what sampling with the file computes before its first step, and exports the file's
    tensors bit for bit."""
    source = kohya_lora_by_hand(tmp_path / "kohya.safetensors", family)
    assert any("_ff_net_0_proj." in key for key in load_file(source)) and any("_proj_in." in key for key in load_file(source))
    config = settings(tmp_path / "run", method="lora", init_weights=str(source))
    plan = plan_run(config)
    assert plan.config.options["targets"] == family and plan.taken_options == {"targets": family, "rank": 3, "alpha": 1.5}
    assert any(f"targets {family}" in line for line in plan.summary())
    assert plan.started_fresh == "" and not any("fresh run" in line for line in plan.summary())
    torch.testing.assert_close(step_zero_output(config, inputs), sampled_output([source], inputs), atol=2e-5, rtol=1e-4)
    original, again = load_file(source), restarted_export(config, tmp_path)
    assert original.keys() == again.keys() and all(torch.equal(original[key], again[key]) for key in original)
    if family == "full":
        assert {"lora_unet_conv_in.alpha", "lora_unet_time_embedding_linear_2.alpha"} <= original.keys()


@pytest.mark.parametrize("family,left_out", [
    ("locon", ("down_blocks_0", "up_blocks_1_resnets")),  # kohya-ss' block-wise dims of 0 for those blocks
    ("transformer", ("up_blocks_1_attentions_0",)),
    ("full", ("time_embedding", "mid_block")),  # a LyCORIS full-preset file without a few of its layers
])
def test_a_kohya_file_that_left_blocks_out_starts_the_family_it_was_cut_from(family, left_out, tmp_path, inputs):
    """A kohya file whose blocks were partly left out (block-wise dims of 0) is exactly no family: the run takes the
    smallest family that holds every layer of it, and the dry run and the closing line say how many of the run's
    layers the file holds, the others starting as in a fresh run; before its first step the run computes what
    sampling with the file does."""
    from sdtune.methods.base import layer_family

    whole = load_file(kohya_lora_by_hand(tmp_path / "whole.safetensors", family))
    cut = {key: value for key, value in whole.items() if not any(f"lora_unet_{block}" in key for block in left_out)}
    source = tmp_path / "cut.safetensors"
    save_file(cut, source, {"ss_network_module": "networks.lora", "ss_base_model_version": "sd_v1"})
    held, tuned = len({key.partition(".")[0] for key in cut}), len(layer_family(load_pipeline("tiny-random").unet, family))
    assert 0 < held < tuned
    config = settings(tmp_path / "run", method="lora", init_weights=str(source))
    plan = plan_run(config)
    assert plan.config.options["targets"] == family and plan.taken_options == {"targets": family, "rank": 3, "alpha": 1.5}
    said = f"{held} of the run's {tuned} UNet layers (the other {tuned - held} start as in a fresh run)"
    assert plan.started_fresh == said
    assert any(line.endswith(f"; from the file: rank 3, alpha 1.5, targets {family}; {said}") for line in plan.summary())
    torch.testing.assert_close(step_zero_output(config, inputs), sampled_output([source], inputs), atol=2e-5, rtol=1e-4)
    again = restarted_export(config, tmp_path)
    assert all(torch.equal(cut[key], again[key]) for key in cut) and len(again) == len(whole)

    result = CliRunner().invoke(app, ["train", "--model", "tiny-random", "--output", str(tmp_path / "cli"), "--log-with", "none",
                                      "--steps", "1", "--method", "lora", "--init-weights", str(source)])
    assert result.exit_code == 0, result.output
    assert f"from --init-weights {source}: rank 3, alpha 1.5, targets {family}; {said}\ntrained lora" in result.output


def test_a_wider_family_than_the_files_says_which_layers_start_fresh(tmp_path):
    """A run that chooses a family wider than the file's own says how many of its layers start fresh; one of the
    file's own family says nothing of the kind."""
    source = kohya_lora_by_hand(tmp_path / "kohya.safetensors", "transformer")
    wider = plan_run(settings(tmp_path / "wider", method="lora", options={"targets": "full"}, init_weights=str(source)))
    assert "targets" not in wider.taken_options and wider.started_fresh.endswith(" start as in a fresh run)")
    assert any(line.endswith(f"; from the file: rank 3, alpha 1.5; {wider.started_fresh}") for line in wider.summary())
    own = plan_run(settings(tmp_path / "own", method="lora", options={"targets": "transformer"}, init_weights=str(source)))
    assert own.started_fresh == "" and own.taken_options == {"rank": 3, "alpha": 1.5}


def test_a_kohya_locon_with_its_own_conv_dim_starts_a_run_at_both_ranks(tmp_path, inputs):
    """kohya-ss' common LoCon setting, network_dim 32 alpha 16 with conv_dim 8 conv_alpha 4, at tiny-random's scale: the
    run takes both ranks and alphas from the file, says so, computes before its first step what sampling with the file
    does, and exports the file's tensors bit for bit, with kohya-ss' conv_dim and conv_alpha."""
    source = kohya_lora_by_hand(tmp_path / "locon.safetensors", "locon", rank=8, alpha=4.0, conv_rank=2, conv_alpha=1.0)
    config = settings(tmp_path / "run", method="lora", init_weights=str(source))
    plan = plan_run(config)
    assert plan.taken_options == {"targets": "locon", "rank": 8, "alpha": 4.0, "conv_rank": 2, "conv_alpha": 1.0}
    assert any(line.endswith("; from the file: rank 8, alpha 4.0, conv_rank 2, conv_alpha 1.0, targets locon")
               for line in plan.summary()), plan.summary()
    torch.testing.assert_close(step_zero_output(config, inputs), sampled_output([source], inputs), atol=2e-5, rtol=1e-4)
    original, again = load_file(source), restarted_export(config, tmp_path)
    assert original.keys() == again.keys() and all(torch.equal(original[key], again[key]) for key in original)
    with safe_open(str(tmp_path / "again.safetensors"), framework="pt") as handle:
        args = json.loads(handle.metadata()["ss_network_args"])
    assert (args["conv_dim"], args["conv_alpha"]) == ("2", "1")

    # the file's tensors fix both ranks: a run that sets another conv rank is refused, in one line
    with pytest.raises(SdtuneError, match="holds tensors of conv_rank 2; the run sets 3"):
        plan_run(settings(tmp_path / "other", method="lora", options={"conv_rank": 3}, init_weights=str(source)))


def test_a_kohya_file_of_linears_at_two_ranks_is_refused_in_one_line(tmp_path):
    """sdtune trains one rank for the linears (and 1x1 convs), one for the 3x3 convs: a file whose linears differ is
    refused, naming the ranks."""
    four = load_file(kohya_lora_by_hand(tmp_path / "four.safetensors", "transformer", rank=4))
    eight = load_file(kohya_lora_by_hand(tmp_path / "eight.safetensors", "transformer", rank=8))
    mixed = {key: (eight if "_attn1_" in key else four)[key] for key in four}
    save_file(mixed, tmp_path / "mixed.safetensors", {"ss_network_module": "networks.lora"})
    with pytest.raises(SdtuneError, match=r"the file's modules have ranks 4, 8; .*conv_rank") as raised:
        plan_run(settings(tmp_path / "run", method="lora", init_weights=str(tmp_path / "mixed.safetensors")))
    assert "\n" not in str(raised.value)


def test_a_files_alpha_is_named_where_it_differs_from_what_its_rank_defaults_to(tmp_path):
    """kohya-ss' common dim 8, alpha 4: alpha 4 is what a rank-4 run defaults to, not what a rank-8 one does (8), so
    the dry run names it among what the file gave; a file whose alpha is its rank says nothing of alpha."""
    halved = kohya_lora_by_hand(tmp_path / "halved.safetensors", "transformer", rank=8, alpha=4.0)
    plan = plan_run(settings(tmp_path / "halved-run", method="lora", init_weights=str(halved)))
    assert plan.config.options["alpha"] == 4.0 and plan.taken_options == {"targets": "transformer", "rank": 8, "alpha": 4.0}
    assert any(line.endswith("; from the file: rank 8, alpha 4.0, targets transformer") for line in plan.summary())
    whole = kohya_lora_by_hand(tmp_path / "whole.safetensors", "transformer", rank=8, alpha=8.0)
    assert plan_run(settings(tmp_path / "whole-run", method="lora", init_weights=str(whole))).taken_options == {
        "targets": "transformer", "rank": 8}


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
    with pytest.raises(SdtuneError, match=r'lora options=\{"targets": "attn"\} does not tune .*: start with '
                                          r'options=\{"targets": "transformer"\} or locon'):
        plan_run(settings(tmp_path / "attn", method="lora", options={"targets": "attn"}, init_weights=str(exported)))
    wider = settings(tmp_path / "wider", method="lora", options={"targets": "locon"}, init_weights=str(exported))
    assert plan_run(wider).config.options["targets"] == "locon"  # the run's own choice: its other layers start at 0
    torch.testing.assert_close(step_zero_output(wider, inputs), sampled_output([exported], inputs), atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("flag, toml_line, message", [
    ("--init-weights", 'init_weights = ""', "--init-weights must not be empty"),
    ("--base-adapters", 'base_adapters = [""]', "--base-adapters must not be empty"),
])
def test_an_empty_path_says_the_same_from_the_command_line_and_toml(flag, toml_line, message, tmp_path):
    """An empty value is refused as one: not read as the current folder (which said 'adapter not found')."""
    toml = tmp_path / "run.toml"
    toml.write_text(f'model = "tiny-random"\n{toml_line}\n')
    common = ["train", "--dry-run", "--output", str(tmp_path / "run"), "--log-with", "none"]
    said = []
    for args in ([*common, "--model", "tiny-random", flag, ""], [*common, "--config", str(toml)]):
        result = CliRunner().invoke(app, args)
        assert result.exit_code == 2 and message in result.output, result.output
        said.append(result.output.strip())
    assert said[0] == said[1] and len(said[0].splitlines()) == 1
