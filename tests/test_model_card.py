"""`sdtune card`: a run's README.md model card, read back through huggingface_hub as the Hub reads it."""

from __future__ import annotations

import json

import pytest
from huggingface_hub import ModelCard
from typer.testing import CliRunner

from sdtune.cli import app
from sdtune.config import SampleConfig, TrainConfig
from sdtune.evaluation import EVAL_FILE, FORMAT
from sdtune.model_card import is_hub_id


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_path):
    import sdtune

    output = tmp_path_factory.mktemp("card") / "castle-lora"
    sdtune.train(TrainConfig(method="lora", model="tiny-random", steps=3, seed=7, output=str(output), log_with="none"))
    sdtune.sample(SampleConfig(adapter=str(output), prompt=["a <castle>"], num_images=1, steps=2))
    (output / EVAL_FILE).write_text(json.dumps({"format": FORMAT, "metrics": {"clip_t": 27.25}, "unavailable": {}}))
    return output


def test_the_card_says_what_the_run_is_and_the_hub_reads_it(run):
    result = CliRunner().invoke(app, ["card", str(run), "--license", "creativeml-openrail-m"])
    assert result.exit_code == 0, result.output
    card = ModelCard.load(run / "README.md")
    assert card.data.license == "creativeml-openrail-m" and card.data.base_model is None  # tiny-random is no hub id
    assert card.data.tags == ["sdtune", "stable-diffusion", "text-to-image", "lora"]
    assert card.data.instance_prompt == "photo of a sks castle."
    assert card.data.widget == [{"text": "photo of a sks castle.", "output": {"url": "samples/grid.png"}}]
    text = card.text
    assert "An sdtune adapter: **lora** on `tiny-random`, 213,152 trained parameters, " in text
    assert "| steps | 3 |" in text and "| seed | 7 |" in text and "| optimizer | adamw |" in text
    losses = [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert f"| final loss (mean of the last 3 steps) | {sum(losses) / 3:.4f} |" in text
    assert "| CLIP-T | 27.25 |" in text and "![samples](samples/grid.png)" in text
    assert 'pipe = load_pipeline("tiny-random")' in text and "sdtune.load_adapter(\"adapter.safetensors\", pipe)" in text


def test_an_existing_card_is_kept_and_bad_input_is_one_line(run, tmp_path):
    runner = CliRunner()
    (run / "README.md").write_text("mine\n")
    kept = runner.invoke(app, ["card", str(run)])
    assert kept.exit_code == 2 and "already exists; give a new path, or --overwrite" in kept.stderr
    assert (run / "README.md").read_text() == "mine\n"
    bad = runner.invoke(app, ["card", str(run), "--license", "Not A License", "--output", str(tmp_path / "c.md")])
    assert bad.exit_code == 2 and bad.stderr.startswith("error: --license must be a Hub license id")
    export = runner.invoke(app, ["export", str(run), "--format", "kohya", "--output", str(tmp_path / "k.safetensors")])
    assert export.exit_code == 0, export.output
    kohya = runner.invoke(app, ["card", str(tmp_path / "k.safetensors"), "--output", str(tmp_path / "k.md")])
    assert kohya.exit_code == 2 and "is a kohya-format file; a card describes an sdtune run or adapter" in kohya.stderr
    assert not (tmp_path / "k.md").exists() and not (tmp_path / "c.md").exists()
    replaced = runner.invoke(app, ["card", str(run), "--overwrite"])
    assert replaced.exit_code == 0 and (run / "README.md").read_text().startswith("---\n")


def test_a_card_another_command_is_writing_is_refused_and_kept(run, tmp_path, monkeypatch):
    """Two `sdtune card` onto one file: the one that finds the other's lock is refused in one line (exit 2), even with
    --overwrite, and the other's card stays; one whose target the other wrote while it read the run is refused as an
    existing card once it holds the lock, not written over it."""
    import os

    import sdtune.model_card
    from sdtune.fileio import OutputLock, file_lock_name
    from test_cli import assert_one_line_error

    output = tmp_path / "card.md"
    output.write_text("the other card\n")
    with OutputLock(tmp_path, file_lock_name(output.name)):
        result = CliRunner().invoke(app, ["card", str(run), "--output", str(output), "--overwrite"])
    assert_one_line_error(result, 2, f"--output {output} is in use by another sdtune run (pid {os.getpid()}")
    assert output.read_text() == "the other card\n" and [path.name for path in tmp_path.iterdir()] == ["card.md"]

    later = tmp_path / "later.md"
    card_text = sdtune.model_card.model_card

    def another_card_written_meanwhile(*args, **kwargs):
        text = card_text(*args, **kwargs)
        later.write_text("the other card\n")  # another `sdtune card` finished while this one read the run
        return text

    monkeypatch.setattr(sdtune.model_card, "model_card", another_card_written_meanwhile)
    result = CliRunner().invoke(app, ["card", str(run), "--output", str(later)])
    assert_one_line_error(result, 2, f"--output {later} already exists; give a new path, or --overwrite to replace it")
    assert later.read_text() == "the other card\n"

def test_hub_ids_are_linked_and_local_names_are_not(tmp_path):
    assert is_hub_id("CompVis/stable-diffusion-v1-4") and is_hub_id("stabilityai/stable-diffusion-xl-base-1.0")
    assert not any(map(is_hub_id, ["tiny", str(tmp_path), "./models/sd", "a/b/c", "/abs"]))


def test_an_sdxl_adapter_is_tagged_for_sdxl(tmp_path, tiny_path):
    """The Hub lists SDXL adapters under stable-diffusion-xl: the adapter records its family, so the card says so
    from the file alone; SD 1.x/2.x adapters keep their bytes (no such key)."""
    import sdtune
    from safetensors import safe_open

    from sdtune.adapter import read_adapter_info
    from sdtune.model_card import model_card

    output = tmp_path / "sdxl-lora"
    sdtune.train(TrainConfig(method="lora", model="tiny-sdxl-random", steps=1, output=str(output), log_with="none"))
    info = read_adapter_info(output)[0]
    assert ModelCard(model_card(output / "adapter.safetensors", info)).data.tags == [
        "sdtune", "stable-diffusion-xl", "text-to-image", "lora"]
    with safe_open(str(output / "adapter.safetensors"), framework="pt") as handle:
        assert handle.metadata()["base_model_family"] == "sdxl"


def test_the_card_leaves_out_the_metrics_of_an_earlier_training(run, tmp_path):
    """An eval.json that measured another adapter (the folder trained again with another method since) is not the
    card's evaluation."""
    import shutil

    from sdtune.model_card import write_model_card

    copy = tmp_path / "castle-lora"
    shutil.copytree(run, copy)
    (copy / "README.md").unlink(missing_ok=True)
    (copy / EVAL_FILE).write_text(json.dumps({"format": FORMAT, "metrics": {"clip_t": 27.25}, "unavailable": {},
                                              "method": "atoms", "options": {"m": 9}}))
    with pytest.warns(UserWarning, match="eval.json measured an adapter trained with atoms, not this one of lora"):
        write_model_card(copy)
    assert "27.25" not in (copy / "README.md").read_text()


def test_the_cards_python_reads_prompts_as_the_run_trained(tmp_path, tiny_path, monkeypatch):
    """A run trained with --clip-skip 2 is drawn with diffusers' clip_skip=1 (one less, as diffusers counts), and one
    trained on long prompts says that the pipeline reads 75 tokens; a run at the defaults passes neither."""
    import re
    from types import SimpleNamespace

    import diffusers

    import sdtune
    from sdtune.model_card import write_model_card

    calls = []
    monkeypatch.setattr(diffusers.StableDiffusionPipeline, "__call__",
                        lambda pipe, prompt, **settings: calls.append(settings) or SimpleNamespace(images=[None]))
    for name, reading, settings in (("skip", {"clip_skip": 2, "max_token_length": 150}, {"clip_skip": 1}), ("plain", {}, {})):
        output = tmp_path / name
        sdtune.train(TrainConfig(method="lora", model="tiny-random", steps=1, output=str(output), log_with="none", **reading))
        write_model_card(output)
        snippet = re.search(r"```python\n(.*?)```", (output / "README.md").read_text(), re.S).group(1)
        assert ("# trained reading prompts to 150 tokens; this pipeline reads 75" in snippet) == bool(reading)
        monkeypatch.chdir(output)
        exec(snippet, {})
        assert calls[-1] == settings


def test_a_card_of_an_adapter_trained_on_base_adapters_uses_it_stacked_on_them(run):
    """Its sample, merge and Python lines stack the base adapters beneath it at their strengths, as it trained."""
    import dataclasses

    from sdtune.adapter import adapter_info
    from sdtune.adapter_info import BASE_ADAPTERS_KEY
    from sdtune.model_card import model_card

    path = run / "adapter.safetensors"
    info = adapter_info(path)
    records = [{"name": "style.safetensors", "digest": "0" * 32, "strength": 0.8}]
    text = model_card(path, dataclasses.replace(info, extra={**info.extra, BASE_ADAPTERS_KEY: json.dumps(records)}))
    assert "sdtune sample --adapter style.safetensors --adapter adapter.safetensors --adapter-scale 0.8,1 --prompt" in text
    assert "sdtune merge style.safetensors adapter.safetensors --scale 0.8,1 --output castle-lora-merged/" in text
    assert 'sdtune.load_adapters(["style.safetensors", "adapter.safetensors"], pipe, [0.8, 1.0])' in text
    assert "- `style.safetensors` at strength 0.8" in text


def test_a_card_of_a_run_trained_on_a_dataset_draws_its_classes(tmp_path, tiny_path):
    """A dataset run has no token: the card's examples are its classes' captions, and it lists the classes."""
    import sdtune
    from sdtune.model_card import write_model_card

    output = tmp_path / "digits-lora"
    sdtune.train(TrainConfig(method="lora", model="tiny-random", steps=1, output=str(output), log_with="none",
                             dataset="digits", classes=["three", "seven"], max_per_class=2))
    sdtune.sample(SampleConfig(adapter=str(output), dataset="digits", classes=["three", "seven"], num_images=1, steps=1))
    write_model_card(output)
    card = ModelCard.load(output / "README.md")
    caption = "This is a picture of the handwritten digit three."
    assert card.data.widget[0]["text"] == caption and "instance_prompt" not in card.data.to_dict()
    assert "sdtune sample --adapter adapter.safetensors --dataset digits --classes three,seven   # one row per class" in card.text
    assert f'image = pipe("{caption}").images[0]' in card.text and "<concept>" not in card.text
    assert "| dataset | digits |" in card.text and "| classes | three, seven |" in card.text
    assert "| images a class, at most | 2 |" in card.text


def test_a_card_of_a_run_of_several_concepts_names_and_draws_each(tmp_path, tiny_path, monkeypatch):
    """A run of two concepts: the card lists each concept's token and prompt, its examples draw each concept, its
    Python draws both, and eval.json's per-concept metrics are a table of their own; sampled without a prompt, the
    grid holds a row per concept."""
    import re
    from types import SimpleNamespace

    import diffusers
    from PIL import Image

    import sdtune
    from sdtune.model_card import write_model_card

    folders = []
    for name, colour in (("castle", (200, 40, 40)), ("canal", (30, 60, 200))):
        folders.append(tmp_path / name)
        folders[-1].mkdir()
        Image.new("RGB", (64, 64), colour).save(folders[-1] / "0.png")
    output = tmp_path / "castle-canal"
    sdtune.train(TrainConfig(method="lora", model="tiny-random", steps=1, output=str(output), log_with="none",
                             concept=["castle", "canal"], images=[str(folder) for folder in folders]))
    drawn = sdtune.sample(SampleConfig(adapter=str(output), num_images=1, steps=1))
    assert drawn.prompts == ["photo of a sks castle.", "photo of a sks canal."]
    assert drawn.notes == ["no prompt given: drew the adapter's training prompts 'photo of a <castle>.', "
                           "'photo of a <canal>.', 1 image each"]
    (output / EVAL_FILE).write_text(json.dumps({
        "format": FORMAT, "metrics_version": 3, "metrics": {"clip_t": 27.25, "clip_i": 0.75}, "unavailable": {},
        "reference": str(folders[0]),
        "per_concept": {"castle": {"images": 4, "clip_t": 28.0, "clip_i": 0.8}, "canal": {"images": 4, "clip_t": 26.5, "clip_i": 0.7}}}))
    write_model_card(output)
    card = ModelCard.load(output / "README.md")
    assert card.data.instance_prompt == "photo of a sks castle.; photo of a sks canal."
    assert [entry["text"] for entry in card.data.widget] == ["photo of a sks castle.", "photo of a sks canal."]
    text = card.text
    assert "- `sks castle` stands for `<castle>` (training prompt: `photo of a sks castle.`)" in text
    assert "- `sks canal` stands for `<canal>` (training prompt: `photo of a sks canal.`)" in text
    assert "The token `sks castle` stands for the concept" not in text
    assert 'sdtune sample --adapter adapter.safetensors --prompt "a <castle> at dawn" --prompt "a <canal> at dawn"' in text
    assert "| concepts | castle, canal |" in text
    assert "| castle | 4 | 28.00 | 0.8000 |" in text and "| canal | 4 | 26.50 | 0.7000 |" in text

    prompts = []
    monkeypatch.setattr(diffusers.StableDiffusionPipeline, "__call__",
                        lambda pipe, prompt, **settings: prompts.append(prompt) or SimpleNamespace(images=[None]))
    snippet = re.search(r"```python\n(.*?)```", text, re.S).group(1)
    monkeypatch.chdir(output)
    exec(snippet, {})
    assert prompts == ["a sks castle at dawn", "a sks canal at dawn"]


def test_a_step_files_card_is_its_own_beside_the_runs(tmp_path, tiny_path):
    """`sdtune card RUN/adapter-step-N.safetensors` writes README-step-N.md (the run's README.md stays the run's card)
    from the step's own files: its samples-step-N grid, its losses and steps up to N, its eval-step-N.json."""
    import sdtune
    from sdtune.evaluation import adapter_digest

    output = tmp_path / "castle"
    sdtune.train(TrainConfig(method="lora", model="tiny-random", steps=2, save_every=1, output=str(output), log_with="none"))
    step_file = output / "adapter-step-000001.safetensors"
    sdtune.sample(SampleConfig(adapter=str(step_file), prompt=["a <castle>"], num_images=1, steps=1))
    (output / EVAL_FILE).write_text(json.dumps({"format": FORMAT, "metrics": {"clip_t": 11.5}, "unavailable": {},
                                                "adapter": "adapter.safetensors",
                                                "adapter_digest": adapter_digest(output / "adapter.safetensors")}))
    (output / "eval-step-000001.json").write_text(json.dumps({
        "format": FORMAT, "metrics": {"clip_t": 22.5}, "unavailable": {}, "adapter": step_file.name,
        "adapter_digest": adapter_digest(step_file)}))
    (output / "README.md").write_text("the run's card\n")
    result = CliRunner().invoke(app, ["card", str(step_file)])
    assert result.exit_code == 0, result.output
    assert (output / "README.md").read_text() == "the run's card\n"
    card = ModelCard.load(output / "README-step-000001.md")
    assert card.data.widget[0]["output"]["url"] == "samples-step-000001/grid.png"
    text = card.text
    assert text.lstrip().startswith("# castle-step-000001\n") and "![samples](samples-step-000001/grid.png)" in text
    first_loss = json.loads((output / "metrics.jsonl").read_text().splitlines()[0])["loss"]
    assert "| steps | 1 |" in text and f"| final loss (mean of the last 1 steps) | {first_loss:.4f} |" in text
    assert "| CLIP-T | 22.50 |" in text and "11.50" not in text
    assert "replays the run (`--output` elsewhere); of its 2 steps, this file is the save of step 1." in text
    assert "- `eval-step-000001.json`" in text and "- `eval.json`" not in text
