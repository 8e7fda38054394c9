"""New token embeddings trained beside any method (`--token-embeddings N`: pivotal tuning), on the tiny models.

Only the new rows train (every other row of the embedding matrix stays bit-identical, the text encoder
frozen or not); the adapter carries them and every reader adds the tokens (load, sample, merge into a
folder plain diffusers reads, kohya files with `bundle_emb.*`, the advanced scripts' `*_emb.safetensors`
that diffusers' `load_textual_inversion` loads); a resumed run ends with the uninterrupted run's bytes.
"""

from __future__ import annotations

import json

import pytest
import torch
from helpers import uninterrupted_and_resumed
from safetensors import safe_open
from safetensors.torch import load_file

from sdtune.adapter import load_adapter, load_adapters, read_adapter
from sdtune.config import SampleConfig, TrainConfig
from sdtune.conditioning import PromptConditioning
from sdtune.errors import SdtuneError
from sdtune.export import export_adapter
from sdtune.merging import merge_adapter
from sdtune.models import load_pipeline, text_encoders, tokenizers
from sdtune.token_embeddings import add_trainable_tokens, check_tokenizers, new_token_names
from sdtune.training import open_trainer

PROMPT = "a photo of <s0><s1> castle"


def config(output, **settings) -> TrainConfig:
    return TrainConfig(
        output=str(output), log_with="none",
        **{"model": "tiny-random", "method": "lora", "steps": 3, "seed": 3, "token_embeddings": 2, **settings},
    )


def embeddings(pipe, prompt=PROMPT):
    """The UNet's conditioning of `prompt` as training computes it (both encoders on SDXL)."""
    with torch.no_grad():
        return PromptConditioning(pipe, trained=True)([prompt], "cpu", size=(32, 32))


def image(pipe, prompt=PROMPT):
    generator = torch.Generator().manual_seed(0)
    return pipe(prompt, num_inference_steps=2, generator=generator, output_type="np").images


def same_conditions(a, b, atol=0.0):
    torch.testing.assert_close(a.encoder_hidden_states, b.encoder_hidden_states, rtol=0, atol=atol)
    if a.text_embeds is not None:
        torch.testing.assert_close(a.text_embeds, b.text_embeds, rtol=0, atol=atol)


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, private_cache):
    """A LoRA run with two new tokens, the text encoder frozen: (run, the trainer's pipeline, the base pipeline)."""
    output = tmp_path_factory.mktemp("pivotal") / "run"
    prompts = output.parent / "prompts.txt"
    prompts.write_text("a <castle> at dawn\n")
    settings = config(output, embedding_lr=5e-2, validate_every=3, validation_prompts=str(prompts))
    with open_trainer(settings, progress=False) as trainer:
        assert trainer.inputs.sample_prompts == ["a <s0><s1> castle at dawn"]
        run = trainer.fit()
        pipe = trainer.pipe
    return run, pipe, load_pipeline("tiny-random")


def test_off_changes_nothing_a_run_writes():
    plain = TrainConfig()
    assert not {"token_embeddings", "embedding_lr", "embedding_init"} & set(plain.resolved(1e-4).to_dict())
    assert plain.resolved(1e-4).token == "sks castle"
    on = TrainConfig(token_embeddings=2).resolved(1e-4)
    assert on.token == "<s0><s1> castle" and on.embedding_lr == 5e-3
    several = TrainConfig(concept=["castle", "dog"], token_embeddings=2)
    assert several.concept_tokens == {"castle": "<s0><s1> castle", "dog": "<s2><s3> dog"}
    assert new_token_names(["castle", "dog"], 1) == {"castle": ["<s0>"], "dog": ["<s1>"]}


def test_only_the_new_rows_train_and_the_rest_of_the_vocabulary_stays_bit_identical(trained_run):
    run, pipe, base = trained_run
    encoder, frozen = pipe.text_encoder, base.text_encoder
    rows = encoder.get_input_embeddings()
    assert torch.equal(rows.base.weight, frozen.get_input_embeddings().weight), "every existing row untouched"
    trained = dict(encoder.named_parameters())
    for name, parameter in frozen.named_parameters():  # the frozen encoder's other weights too
        assert torch.equal(trained[name.replace("token_embedding.weight", "token_embedding.base.weight")], parameter), name
    castle = base.tokenizer("castle", add_special_tokens=False).input_ids
    start = torch.stack([frozen.get_input_embeddings().weight[castle[j % len(castle)]] for j in range(2)])
    assert (rows.rows.detach() - start).abs().max() > 1e-3, "the new rows moved from their initializer word's"
    info, tensors = read_adapter(run.adapter)
    assert info.new_tokens == ("<s0>", "<s1>") and info.token == "<s0><s1> castle"
    assert torch.equal(tensors["token_embeddings.text_encoder"], rows.rows.detach())
    assert "token_embeddings = 2" in (run.output / "config.toml").read_text()
    assert list(run.validation_losses) == [3] and (run.output / "samples" / "step-3.png").is_file()


def test_the_new_rows_learn_the_concept(tiny_pipe):
    """Adam on the new rows alone lowers the denoising loss of fixed images, noise and timesteps."""
    import contextlib

    from diffusers import DDPMScheduler

    from sdtune.losses import ErrorMeasure, denoising_loss

    settings = TrainConfig(token_embeddings=2)
    rows = add_trainable_tokens(tiny_pipe, settings, seed=0)
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(4, 4, 8, 8, generator=generator)
    noise = torch.randn(latents.shape, generator=generator)
    timesteps = torch.tensor([100, 300, 500, 700])
    conditions = PromptConditioning(tiny_pipe, trained=True)
    optimizer = torch.optim.Adam(rows, lr=5e-2)

    scheduler = DDPMScheduler.from_config(tiny_pipe.scheduler.config)

    def loss():
        return denoising_loss(tiny_pipe.unet, scheduler, latents, conditions([PROMPT] * 4, "cpu"), noise, timesteps,
                              contextlib.nullcontext, measure=ErrorMeasure("l2")).total

    before = loss().item()
    for _ in range(15):
        optimizer.zero_grad()
        loss().backward()
        optimizer.step()
    assert loss().item() < before - 1e-4


def test_the_adapter_brings_its_tokens_to_load_sample_and_merge(trained_run, tmp_path):
    from diffusers import StableDiffusionPipeline

    run, pipe, _ = trained_run
    trainer_pipe_embeddings, trained_image = embeddings(pipe), image(pipe)
    loaded = load_pipeline("tiny-random")
    load_adapter(run.adapter, loaded)
    same_conditions(embeddings(loaded), trainer_pipe_embeddings)
    assert loaded.tokenizer.tokenize("<s0><s1> castle")[:2] == ["<s0>", "<s1>"]
    assert torch.equal(loaded.text_encoder.get_input_embeddings().weight[: len(loaded.tokenizer) - 2],
                       load_pipeline("tiny-random").text_encoder.get_input_embeddings().weight[: len(loaded.tokenizer) - 2])
    torch.testing.assert_close(image(loaded), trained_image, rtol=0, atol=1e-4)  # merged, not unmerged
    with pytest.raises(SdtuneError, match="already has token"):
        load_adapter(run.adapter, loaded)  # twice: the tokens are taken
    fresh = load_pipeline("tiny-random")
    with pytest.raises(SdtuneError, match="both train concept <castle>, so <castle> in a prompt would mean either"):
        load_adapters([run.adapter, run.adapter], fresh)
    assert "<s0>" not in fresh.tokenizer.get_vocab(), "refused before any adapter was bound"

    from sdtune.sampling import sample

    result = sample(SampleConfig(adapter=str(run.output), prompt=["a <castle> at dawn"], num_images=1, steps=2,
                                 output=str(tmp_path / "samples")), progress=False)
    assert result.prompts == ["a <s0><s1> castle at dawn"] and result.images[0].is_file()

    merged = merge_adapter(run.output, tmp_path / "merged").output
    plain = StableDiffusionPipeline.from_pretrained(str(merged), safety_checker=None, requires_safety_checker=False)
    plain.set_progress_bar_config(disable=True)
    torch.testing.assert_close(image(plain), image(loaded), rtol=0, atol=1e-5)


@pytest.fixture(scope="module")
def canal_run(tmp_path_factory, private_cache):
    """A second LoRA run with two new tokens, of another concept: its tokens are <s0><s1> too."""
    output = tmp_path_factory.mktemp("pivotal-canal") / "canal"
    with open_trainer(config(output, concept=["canal"], embedding_lr=5e-2, embedding_init="random"), progress=False) as trainer:
        return trainer.fit()


def test_adapters_with_new_tokens_stack_under_the_next_free_names(trained_run, canal_run, tmp_path):
    from diffusers import StableDiffusionPipeline

    castle, canal = trained_run[0].adapter, canal_run.adapter
    castle_rows, canal_rows = (load_file(a)["token_embeddings.text_encoder"] for a in (castle, canal))
    stacked = load_pipeline("tiny-random")
    with pytest.warns(UserWarning, match=r"renamed apart: .*canal.*: <s0><s1> as <s2><s3> \(<canal> is '<s2><s3> canal'\)"):
        stack = load_adapters([castle, canal], stacked)
    assert stack.renames == [{}, {"<s0>": "<s2>", "<s1>": "<s3>"}]
    assert stack.placeholders == {"castle": "<s0><s1> castle", "canal": "<s2><s3> canal"}
    matrix = stacked.text_encoder.get_input_embeddings().weight
    for tokens, rows in ((["<s0>", "<s1>"], castle_rows), (["<s2>", "<s3>"], canal_rows)):  # each adapter's own rows
        assert torch.equal(matrix[stacked.tokenizer.convert_tokens_to_ids(tokens)], rows)
    for adapter, own, here in ((castle, "a photo of <s0><s1> castle", "a photo of <s0><s1> castle"),
                               (canal, "a photo of <s0><s1> canal", "a photo of <s2><s3> canal")):
        alone = load_pipeline("tiny-random")  # each prompt reads in the stack as with its adapter alone
        load_adapter(adapter, alone)
        same_conditions(embeddings(stacked, here), embeddings(alone, own))

    with pytest.warns(UserWarning, match="renamed apart"):  # plain diffusers reads the stack's tokens
        merged = merge_adapter([castle, canal], tmp_path / "merged")
    assert merged.token_renames == stack.renames
    provenance = json.loads((merged.output / "sdtune_merge.json").read_text())["stacked"]
    assert provenance[1]["token"] == "<s2><s3> canal" and provenance[1]["renamed_tokens"] == {"<s0>": "<s2>", "<s1>": "<s3>"}
    plain = StableDiffusionPipeline.from_pretrained(str(merged.output), safety_checker=None, requires_safety_checker=False)
    plain.set_progress_bar_config(disable=True)
    prompt = "a photo of <s2><s3> canal by <s0><s1> castle"
    same_conditions(embeddings(plain, prompt), embeddings(stacked, prompt))
    torch.testing.assert_close(image(plain, prompt), image(stacked, prompt), rtol=0, atol=1e-5)

    from sdtune.sampling import sample

    with pytest.warns(UserWarning, match="renamed apart"):
        result = sample(SampleConfig(adapter=[str(castle), str(canal)], prompt=["a <canal> by a <castle>"], num_images=1,
                                     steps=2, output=str(tmp_path / "samples")), progress=False)
    assert result.prompts == ["a <s2><s3> canal by a <s0><s1> castle"] and result.images[0].is_file()

    kohya = tmp_path / "canal.safetensors"  # an sdtune kohya export's bundled tokens are renamed the same way
    export_adapter(canal, "kohya", kohya)
    from_kohya = load_pipeline("tiny-random")
    with pytest.warns(UserWarning, match="<s0><s1> as <s2><s3>"):
        assert load_adapters([castle, kohya], from_kohya).renames == stack.renames
    same_conditions(embeddings(from_kohya, prompt), embeddings(stacked, prompt), atol=1e-6)


def test_a_stack_of_two_adapters_of_one_concept_is_refused_in_one_line(trained_run, tmp_path):
    from typer.testing import CliRunner

    from sdtune.cli import app

    adapter = str(trained_run[0].adapter)
    result = CliRunner().invoke(app, ["sample", "--adapter", adapter, "--adapter", adapter, "--prompt", "a <castle>",
                                      "--output", str(tmp_path / "out"), "--model", "no-such-model"])
    assert result.exit_code == 2, result.output
    assert result.output.count("\n") == 1 and "both train concept <castle>" in result.output  # before the model loads
    assert not (tmp_path / "out").exists()


def test_kohya_and_diffusers_exports_carry_the_embeddings(trained_run, tmp_path):
    run, pipe, _ = trained_run
    expected = embeddings(pipe)
    kohya = tmp_path / "castle.safetensors"
    result = export_adapter(run.output, "kohya", kohya)
    state = load_file(kohya)
    assert state["bundle_emb.castle_tokens.string_to_param.*"].shape == (2, 32)
    assert any("castle_emb.safetensors" in note for note in result.notes)
    loaded = load_pipeline("tiny-random")  # sdtune reads its kohya file back with the tokens it trained
    load_adapter(kohya, loaded)
    same_conditions(embeddings(loaded), expected, atol=1e-6)

    standalone = load_file(tmp_path / "castle_emb.safetensors")  # the advanced scripts' file, read by diffusers
    with safe_open(tmp_path / "castle_emb.safetensors", "pt") as handle:
        tokens = json.loads(handle.metadata()["tokens"])
    plain = load_pipeline("tiny-random")
    plain.load_textual_inversion(standalone["clip_l"], token=tokens, text_encoder=plain.text_encoder, tokenizer=plain.tokenizer)
    same_conditions(embeddings(plain), expected)
    a1111 = load_pipeline("tiny-random")  # the bundle as AUTOMATIC1111/diffusers read an embedding of 2 rows
    a1111.load_textual_inversion(state["bundle_emb.castle_tokens.string_to_param.*"], token="castle_tokens")
    prompt = a1111.maybe_convert_prompt("a photo of castle_tokens castle", a1111.tokenizer)  # as the pipelines do
    same_conditions(embeddings(a1111, prompt), expected)

    export_adapter(run.output, "diffusers", tmp_path / "diffusers" / "lora.safetensors")
    assert (tmp_path / "diffusers" / "lora_emb.safetensors").is_file()
    for format in ("kohya", "diffusers"):  # a file named without a suffix: its embeddings beside it, not inside it
        result = export_adapter(run.output, format, tmp_path / f"bare-{format}", dtype="fp16")
        assert (tmp_path / f"bare-{format}").is_file() and (tmp_path / f"bare-{format}_emb.safetensors").is_file()
        assert any(f"bare-{format}_emb.safetensors" in note for note in result.notes)


def test_resume_gives_the_uninterrupted_adapter_bytes(tmp_path, tiny_path, monkeypatch):
    settings = dict(steps=4, checkpoint_every=2, embedding_init="random", method="bitfit")
    whole, resumed = uninterrupted_and_resumed(lambda out, **more: config(out, **settings, **more), tmp_path, monkeypatch, 2)
    assert resumed.resumed_from is not None
    assert resumed.adapter.read_bytes() == whole.adapter.read_bytes()


def test_the_optimizer_has_one_more_group_at_the_embedding_lr(tmp_path, tiny_path):
    with open_trainer(config(tmp_path / "run", method="full", lr=1e-5, embedding_lr=2e-3, concept=["castle", "canal"], steps=2),
                      progress=False) as trainer:
        groups = trainer.optimizer.param_groups
        assert [g["lr"] for g in groups] == [1e-5, 2e-3]
        assert groups[1]["params"] == trainer.token_parameters and len(trainer.token_parameters) == 1
        assert trainer.token_parameters[0].shape == (4, 32)  # two concepts' two tokens
        assert trainer.pipe.tokenizer.tokenize("<s2><s3>") == ["<s2>", "<s3>"]
        trainer.fit()
    logged = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert logged and all(row["lr"] == 1e-5 and row["embedding_lr"] == 2e-3 for row in logged)


def test_sdxl_trains_rows_of_both_encoders_with_the_text_encoder(tmp_path):
    pipe = load_pipeline("tiny-sdxl-random")
    settings = config(tmp_path / "run", model="tiny-sdxl-random", train_text_encoder=True, embedding_lr=5e-2)
    with open_trainer(settings, progress=False) as trainer:
        run = trainer.fit()
        for encoder, base in zip(text_encoders(trainer.pipe), text_encoders(pipe)):  # LoRA on the encoder, rows beside
            assert torch.equal(encoder.get_input_embeddings().base.weight, base.get_input_embeddings().weight)
    info, tensors = read_adapter(run.adapter)
    assert tensors["token_embeddings.text_encoder"].shape == tensors["token_embeddings.text_encoder_2"].shape == (2, 32)
    loaded = load_pipeline("tiny-sdxl-random")
    load_adapter(run.adapter, loaded)
    for tokenizer, encoder, before in zip(tokenizers(loaded), text_encoders(loaded), text_encoders(pipe)):
        assert tokenizer.tokenize("<s0><s1>") == ["<s0>", "<s1>"]
        count = before.get_input_embeddings().weight.shape[0]
        assert torch.equal(encoder.get_input_embeddings().weight[:count], before.get_input_embeddings().weight)

    notes = export_adapter(run.output, "kohya", tmp_path / "xl.safetensors").notes
    state = load_file(tmp_path / "xl.safetensors")
    assert {k for k in state if k.startswith("bundle_emb.")} == {"bundle_emb.castle_tokens.clip_l", "bundle_emb.castle_tokens.clip_g"}
    # the notes say which rows go into which encoder, and that diffusers' LoRA loader refuses the bundles
    assert 'state["clip_g"], token=[\'<s0>\', \'<s1>\'], text_encoder=pipe.text_encoder_2, tokenizer=pipe.tokenizer_2' in notes[0]
    assert 'state["clip_l"]' in notes[0] and "text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer)" in notes[0]
    assert "load_lora_weights refuses" in notes[1] and "xl_emb.safetensors" in notes[1]
    with pytest.raises(ValueError, match="lora"):
        load_pipeline("tiny-sdxl-random").load_lora_weights(str(tmp_path / "xl.safetensors"))
    standalone = load_file(tmp_path / "xl_emb.safetensors")  # diffusers adds each encoder's rows as sdtune does
    plain = load_pipeline("tiny-sdxl-random")
    for key, encoder, tokenizer in (("clip_l", plain.text_encoder, plain.tokenizer), ("clip_g", plain.text_encoder_2, plain.tokenizer_2)):
        plain.load_textual_inversion(standalone[key], token=["<s0>", "<s1>"], text_encoder=encoder, tokenizer=tokenizer)
    for mine, theirs in zip(text_encoders(loaded), text_encoders(plain)):
        assert torch.equal(mine.get_input_embeddings().weight, theirs.get_input_embeddings().weight)


def test_clashing_tokens_and_bad_settings_are_refused(tiny_pipe):
    tiny_pipe.tokenizer.add_tokens(["<s1>"])
    with pytest.raises(SdtuneError, match=r"already has token\(s\) <s1>"):
        check_tokenizers(TrainConfig(token_embeddings=2), [tiny_pipe.tokenizer])
    with pytest.raises(SdtuneError, match="lacks the new token"):
        TrainConfig(token_embeddings=2, token="sks castle").validate()
    TrainConfig(token_embeddings=2, token="a <s0><s1> castle").validate()


def test_the_model_card_names_the_new_tokens_and_counts_their_rows(trained_run):
    from huggingface_hub import ModelCard
    from safetensors.torch import load_file

    from sdtune import methods
    from sdtune.adapter import adapter_info
    from sdtune.model_card import trained_parameters, write_model_card

    adapter = trained_run[0].adapter
    rows = load_file(adapter)["token_embeddings.text_encoder"]
    write_model_card(adapter.parent, overwrite=True)
    card = ModelCard.load(adapter.parent / "README.md")
    assert "textual_inversion" in card.data.tags
    assert "new tokens (`<s0>`, `<s1>`)" in card.text and "load_textual_inversion" in card.text
    assert "| new tokens a concept | 2 |" in card.text and "| embedding learning rate | 0.05 |" in card.text
    info = adapter_info(adapter)
    by_method = trained_parameters(info, methods.create(info.method, **info.options))
    assert rows.shape[0] == 2 and by_method > 0
    assert f"{by_method + rows.numel():,} trained parameters" in card.text


def test_an_extracted_lora_carries_the_new_tokens_and_so_does_its_own_extraction(trained_run, tmp_path):
    from sdtune.config import ExtractConfig
    from sdtune.extraction import extract_lora

    run, pipe, _ = trained_run
    exported = tmp_path / "exported.safetensors"
    export_adapter(run.output, "kohya", exported)
    bundle = "bundle_emb.castle_tokens.string_to_param.*"
    extracted = tmp_path / "lora.safetensors"
    result = extract_lora(ExtractConfig(source=str(run.adapter), output=str(extracted), rank=2))
    assert torch.equal(load_file(extracted)[bundle], load_file(exported)[bundle])
    assert torch.equal(load_file(tmp_path / "lora_emb.safetensors")["clip_l"], load_file(tmp_path / "exported_emb.safetensors")["clip_l"])
    assert any("<s0><s1>" in note for note in result.notes)
    loaded = load_pipeline("tiny-random")  # read back with the tokens it trained, whose prompts read as trained
    load_adapter(extracted, loaded)
    ids = loaded.tokenizer.convert_tokens_to_ids(["<s0>", "<s1>"])
    assert ids == pipe.tokenizer.convert_tokens_to_ids(["<s0>", "<s1>"])
    assert torch.equal(loaded.text_encoder.get_input_embeddings().weight[ids], load_file(exported)[bundle])
    again = tmp_path / "again.safetensors"  # a kohya source's bundles pass through
    extract_lora(ExtractConfig(source=str(extracted), output=str(again), rank=1))
    assert torch.equal(load_file(again)[bundle], load_file(exported)[bundle])


def test_retraction_scales_the_rows_towards_the_vocabulary_spread_after_each_step(tmp_path, tiny_path, monkeypatch):
    """--retract-embeddings: after each optimiser step rows ← rows·(std(vocabulary) / std(rows))^0.1, as the advanced
    scripts' retract_embeddings; off, a run draws what it drew; a resumed run ends with the uninterrupted bytes."""
    from sdtune.token_embeddings import retract_rows

    with open_trainer(config(tmp_path / "once", steps=1, embedding_lr=5e-2, retract_embeddings=True), progress=False) as trainer:
        module = trainer.pipe.text_encoder.get_input_embeddings()
        vocabulary = module.base.weight.detach().float().std().item()
        assert module.vocabulary_std == vocabulary
        seen = []
        original = module.retract_

        def retract():
            before = module.rows.detach().clone()
            original()
            seen.append((before, module.rows.detach().clone()))

        monkeypatch.setattr(module, "retract_", retract)
        trainer.fit()
    (before, after), = seen
    torch.testing.assert_close(after, before * (vocabulary / before.std()) ** 0.1, rtol=1e-6, atol=0)
    assert not torch.equal(after, before)

    rows = torch.full((2, 32), 3.0) + torch.arange(64.0).view(2, 32)
    pipe = load_pipeline("tiny-random")
    add_trainable_tokens(pipe, TrainConfig(token_embeddings=2), seed=0)
    module = pipe.text_encoder.get_input_embeddings()
    with torch.no_grad():
        module.rows.copy_(rows)
    retract_rows(pipe)
    assert torch.allclose(module.rows.detach(), rows * (module.vocabulary_std / rows.std()) ** 0.1)

    plain = TrainConfig(token_embeddings=2).resolved(1e-4).to_dict()
    assert "retract_embeddings" not in plain and TrainConfig(token_embeddings=2, retract_embeddings=True).resolved(1e-4).to_dict()["retract_embeddings"]
    with pytest.raises(SdtuneError, match="retract_embeddings=True apply with token_embeddings=N$"):
        TrainConfig(retract_embeddings=True).validate()

    settings = dict(steps=4, checkpoint_every=2, method="bitfit", retract_embeddings=True)
    whole, resumed = uninterrupted_and_resumed(lambda out, **more: config(out, **settings, **more), tmp_path, monkeypatch, 2)
    assert resumed.adapter.read_bytes() == whole.adapter.read_bytes()
    unretracted = config(tmp_path / "plain", **{**settings, "retract_embeddings": False, "checkpoint_every": 0})
    with open_trainer(unretracted, progress=False) as trainer:
        plain_run = trainer.fit()
    assert read_adapter(plain_run.adapter)[1]["token_embeddings.text_encoder"].ne(
        read_adapter(whole.adapter)[1]["token_embeddings.text_encoder"]).any()


def test_the_plan_and_the_run_count_the_new_rows_as_trained(trained_run, tmp_path):
    """The dry run's trained parameters and the memory it checks count the new token rows (a row of the encoder's
    width a token, with gradients and optimiser state), as the run's last line and the model card do."""
    from safetensors.torch import load_file

    from sdtune.training import plan_run

    run = trained_run[0]
    rows = load_file(run.adapter)["token_embeddings.text_encoder"]
    assert run.token_numbers == rows.numel() > 0
    with_rows = plan_run(config(tmp_path / "a", embedding_lr=5e-2), output_state=False).sizes
    without = plan_run(config(tmp_path / "b", token_embeddings=0), output_state=False).sizes
    assert with_rows.trained - without.trained == rows.numel()
    assert with_rows.step_bytes - without.step_bytes >= rows.numel() * (4 + 4 + 8)  # weights, gradients, AdamW's moments
