"""Adapters stack: each merges in turn into the weights the ones before it changed (`load_adapter` twice,
`sdtune sample --adapter A --adapter B`, `sdtune merge A B`), and each is still checked against the base model."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image
from torch import nn
from typer.testing import CliRunner

from sdtune.adapter import load_adapter, load_adapters
from sdtune.cli import app
from sdtune.config import TrainConfig
from sdtune.errors import SdtuneError
from sdtune.models import load_pipeline
from sdtune.training import train


@pytest.fixture(scope="module")
def adapters(tmp_path_factory, tiny_path):
    """A LoRA of castle and filter atoms of canal, both trained on tiny-random (so both change the 3x3 convs)."""
    root = tmp_path_factory.mktemp("stack")
    runs = {}
    for name, concept, method, lr in (("lora", "castle", "lora", 1e-2), ("atoms", "canal", "atoms", 1e-2)):
        settings = dict(concept=concept, method=method, lr=lr, steps=3, model="tiny-random", log_with="none")
        runs[name] = train(TrainConfig(output=str(root / name), **settings), progress=False).output
    return runs


def unet_weights(pipe) -> dict[str, torch.Tensor]:
    return {name: value.detach().clone() for name, value in pipe.unet.state_dict().items()}


def test_stacked_adapters_add_their_updates_in_any_order(adapters, tiny_path):
    base = unet_weights(load_pipeline("tiny-random"))
    alone = {}
    for name, scale in (("lora", 1.0), ("atoms", 0.5)):
        pipe = load_pipeline("tiny-random")
        load_adapter(adapters[name], pipe, scale=scale)
        alone[name] = unet_weights(pipe)
    for order in (("lora", "atoms"), ("atoms", "lora")):
        pipe = load_pipeline("tiny-random")
        load_adapters([adapters[name] for name in order], pipe, [{"lora": 1.0, "atoms": 0.5}[name] for name in order])
        stacked = unet_weights(pipe)
        changed = 0
        for key, value in stacked.items():
            expected = alone["lora"][key] + alone["atoms"][key] - base[key]
            torch.testing.assert_close(value, expected, rtol=1e-5, atol=1e-6)
            changed += not torch.equal(alone["lora"][key], base[key]) and not torch.equal(alone["atoms"][key], base[key])
        assert changed >= 52  # both changed every 3x3 convolution


def test_load_adapter_again_merges_into_the_weights_the_first_left(adapters, tiny_path):
    # filter atoms decompose the weights they meet: loaded after a LoRA, their update is not the one trained
    # on the base weights, which `load_adapters` adds; a LoRA's update is the same on any weights
    for order in (("atoms", "lora"), ("lora", "atoms")):
        pipe, reference = load_pipeline("tiny-random"), load_pipeline("tiny-random")
        for name in order:  # the second one's check reads the weights the first merge changed
            load_adapter(adapters[name], pipe)
        load_adapters([adapters[name] for name in order], reference)
        same = all(torch.allclose(a, b, rtol=1e-5, atol=1e-6) for a, b in zip(unet_weights(pipe).values(), unet_weights(reference).values()))
        assert same == (order[1] == "lora")


def test_a_stacked_adapter_of_another_base_model_is_still_refused(adapters, tmp_path, tiny_path):
    other = train(TrainConfig(output=str(tmp_path / "tiny"), model="tiny", steps=1, log_with="none"), progress=False).output
    pipe = load_pipeline("tiny-random")
    load_adapter(adapters["lora"], pipe)
    with pytest.raises(SdtuneError, match="was trained on base model 'tiny'; the loaded model's weights differ"):
        load_adapter(other, pipe)


def test_sample_stacks_adapters_as_merge_does(adapters, tmp_path, tiny_path):
    runner = CliRunner()
    common = ["--prompt", "a <castle> by a <canal>", "--num-images", "1", "--steps", "2"]
    stacked = runner.invoke(app, ["sample", "--adapter", str(adapters["lora"]), "--adapter", str(adapters["atoms"]),
                                  "--adapter-scale", "1,0.5", "--output", str(tmp_path / "stacked"), *common])
    assert stacked.exit_code == 0, stacked.output
    merged = runner.invoke(app, ["merge", str(adapters["lora"]), str(adapters["atoms"]), "--scale", "1,0.5",
                                 "--output", str(tmp_path / "merged")])
    assert merged.exit_code == 0, merged.output
    assert "lora+atoms merged" in merged.output
    provenance = json.loads((tmp_path / "merged" / "sdtune_merge.json").read_text())
    assert [(p["method"], p["scale"]) for p in provenance["stacked"]] == [("lora", 1.0), ("atoms", 0.5)]
    plain = runner.invoke(app, ["sample", "--model", str(tmp_path / "merged"), "--output", str(tmp_path / "plain"),
                                "--prompt", "a sks castle by a sks canal", "--num-images", "1", "--steps", "2"])
    assert plain.exit_code == 0, plain.output
    with Image.open(tmp_path / "stacked" / "images" / "000-seed0.png") as image:
        assert image.text["parameters"].splitlines()[0] == "a sks castle by a sks canal"  # each adapter's token
        assert "Adapter: lora, atoms, Adapter strength: 1, 0.5" in image.text["parameters"]
        assert json.loads(image.text["sdtune"])["adapter_scale"] == [1.0, 0.5]
        stacked_pixels = image.convert("RGB").tobytes()
    with Image.open(tmp_path / "plain" / "images" / "000-seed0.png") as image:
        assert image.convert("RGB").tobytes() == stacked_pixels


@pytest.mark.parametrize(
    "args,message",
    [
        (["sample", "--prompt", "x", "--adapter-scale", "1,0.5,0"],
         "--adapter-scale with 2 adapters takes one strength for all or one each (2, comma-separated), got 1,0.5,0; "
         "a strength sweep takes one adapter"),
        (["merge", "--scale", "1,0.5,0"], "--scale with 2 adapters takes one strength for all or one each, got 1,0.5,0"),
    ],
)
def test_strengths_for_stacked_adapters_are_one_or_one_each(args, message, adapters, tmp_path):
    command, *rest = args
    given = ["--adapter", str(adapters["lora"]), "--adapter", str(adapters["atoms"])] if command == "sample" \
        else [str(adapters["lora"]), str(adapters["atoms"])]
    result = CliRunner().invoke(app, [command, *given, *rest, "--output", str(tmp_path / "out")])
    assert result.exit_code == 2 and result.stderr.strip() == f"error: {message}", result.output
    assert not (tmp_path / "out").exists()


def summed_all_at_once(paths, pipe, scales):
    """What stacking computed before it streamed: each adapter's whole update taken, summed, then added."""
    from sdtune.adapter import open_adapter
    from sdtune.methods.base import remember_base_samples

    total = {}
    for path, scale in zip(paths, scales):
        adapter = open_adapter(path, pipe)
        if scale != 1.0:
            adapter.set_scale(scale)
        for module, attr, delta in adapter.take_update():
            entry = total.setdefault((id(module), attr), [module, attr, 0])
            entry[2] = entry[2] + delta
    remember_base_samples({id(module): module for module, _, _ in total.values()}.values())
    with torch.no_grad():
        for module, attr, delta in total.values():
            getattr(module, attr).add_(delta.to(getattr(module, attr).dtype))


def test_stacking_takes_each_update_a_layer_at_a_time_with_the_same_bits(adapters, tmp_path, tiny_path):
    from sdtune.export import export_adapter

    # BitFit trains biases in place (its update is taken whole at once), between the two computed a layer at a time
    bitfit = train(TrainConfig(output=str(tmp_path / "bitfit"), method="bitfit", lr=1e-2, steps=1, model="tiny-random",
                               log_with="none"), progress=False).output
    kohya = tmp_path / "lora-kohya.safetensors"  # a kohya file's updates are read whole, as BitFit's
    export_adapter(adapters["lora"], "kohya", kohya)
    for paths, scales in (([adapters["atoms"], adapters["lora"]], [0.5, 1.0]),  # the other order: the test above
                          ([adapters["lora"], bitfit, adapters["atoms"]], [1.0, 2.0, 0.5]),
                          ([bitfit, kohya, adapters["atoms"], kohya], [1.0, 0.5, 1.0, 0.25])):
        pipe, reference = load_pipeline("tiny-random"), load_pipeline("tiny-random")
        load_adapters(paths, pipe, scales)
        summed_all_at_once(paths, reference, scales)
        stacked, expected = unet_weights(pipe), unet_weights(reference)
        assert stacked.keys() == expected.keys() and all(torch.equal(stacked[key], expected[key]) for key in stacked)


def test_stacking_computes_every_adapters_update_of_a_layer_and_writes_it_before_the_next(adapters, monkeypatch, tiny_path):
    """The peak is one layer's updates: each layer's are computed (one per adapter), added and written before the
    next layer's is computed."""
    from sdtune.methods.base import WrappedLayers

    pipe = load_pipeline("tiny-random")
    base = {id(module): module.weight.detach().clone() for module in pipe.unet.modules() if isinstance(module, (nn.Conv2d, nn.Linear))}
    computed = []
    layer_update = WrappedLayers._layer_update

    changes = set()

    def logged(self, layer):
        module = self.layer_base(layer)
        if computed and computed[-1][0] is not module and id(computed[-1][0]) in changes:
            before = computed[-1][0]  # a new layer: the one before is in the weights already
            assert not torch.equal(before.weight, base[id(before)]), "a layer's update was not written before the next"
        computed.append((module, self.name))
        update = layer_update(self, layer)
        if update is not None:
            changes.add(id(module))
        return update

    monkeypatch.setattr(WrappedLayers, "_layer_update", logged)
    load_adapters([adapters["lora"], adapters["atoms"]], pipe)
    order = [id(module) for module, _ in computed]
    runs = [key for i, key in enumerate(order) if i == 0 or order[i - 1] != key]
    assert len(runs) == len(set(runs))  # each layer's updates computed together, never again
    shared = [names for key in runs if len(names := [name for module, name in computed if id(module) == key]) == 2]
    assert len(shared) >= 52 and all(names == ["lora", "atoms"] for names in shared)  # both, in the adapters' order
    assert len(changes) >= 52


def test_a_refused_adapter_in_a_stack_leaves_the_base_weights_and_no_wrapper(adapters, tmp_path, tiny_path):
    from sdtune import methods
    from sdtune.adapter import save_adapter

    tiny = load_pipeline("tiny")
    other = methods.create("lora")
    other.inject(tiny.unet)
    save_adapter(tmp_path / "other.safetensors", other, "tiny")
    pipe = load_pipeline("tiny-random")
    base, names = unet_weights(pipe), [name for name, _ in pipe.unet.named_modules()]
    with pytest.raises(SdtuneError, match="was trained on base model 'tiny'"):
        load_adapters([adapters["lora"], adapters["atoms"], tmp_path / "other.safetensors"], pipe)
    after = unet_weights(pipe)
    assert after.keys() == base.keys() and all(torch.equal(after[key], base[key]) for key in base)
    assert [name for name, _ in pipe.unet.named_modules()] == names  # plain: the first two's wrappers are gone
    load_adapters([adapters["lora"]], pipe)  # and another stack can still be loaded onto it


def test_a_strength_that_overflows_a_merged_weight_is_refused_naming_it(adapters, tiny_path):
    """load_adapter past 1 and load_adapters check the merged weights: a huge strength is one SdtuneError naming the
    weight (stacked: before that weight changes), where it used to leave infinities in the pipeline silently."""
    pipe = load_pipeline("tiny-random")
    with pytest.raises(SdtuneError, match=r"scale 1e\+308 makes the merged unet weight \S+ overflow float32; use a smaller scale"):
        load_adapter(adapters["lora"], pipe, scale=1e308)
    pipe = load_pipeline("tiny-random")
    base = unet_weights(pipe)
    with pytest.raises(SdtuneError, match=r"strengths 1, 1e\+308 make the merged weight unet\.\S+ overflow float32"):
        load_adapters([adapters["lora"], adapters["atoms"]], pipe, [1.0, 1e308])
    after = unet_weights(pipe)
    assert all(bool(value.isfinite().all()) for value in after.values())  # the refused weight kept its value
    assert after.keys() == base.keys()
    pipe = load_pipeline("tiny-random")
    load_adapter(adapters["lora"], pipe, scale=3.0)  # a large but finite strength still merges
    assert all(bool(value.isfinite().all()) for value in unet_weights(pipe).values())
