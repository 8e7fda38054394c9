"""--zero-terminal-snr: the training schedule's betas rescaled by diffusers to SNR 0 at the last timestep
(Lin et al. 2023), on a v-prediction model; what the adapter, sampling and the kohya export then do."""

from __future__ import annotations

import tomllib
from types import SimpleNamespace

import pytest
import torch

from sdtune.config import TrainConfig
from sdtune.errors import SdtuneError
from sdtune.training import train

MODEL = "tiny-sd2-random"  # v-prediction


def config(output, **settings) -> TrainConfig:
    return TrainConfig(**{"model": MODEL, "output": str(output), "steps": 2, "seed": 3, "log_with": "none",
                          "zero_terminal_snr": True, **settings})


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_path):
    output = tmp_path_factory.mktemp("ztsnr") / "run"
    return train(config(output, steps=4, checkpoint_every=2), progress=False)


def test_only_v_prediction_models_are_accepted():
    from sdtune.limits import check_zero_terminal_snr

    def configs(**scheduler):
        return SimpleNamespace(scheduler=scheduler)

    check_zero_terminal_snr("m", configs(prediction_type="v_prediction"))
    check_zero_terminal_snr("m", configs(prediction_type="v_prediction", rescale_betas_zero_snr=True))
    for prediction in ("epsilon", "sample"):
        with pytest.raises(SdtuneError, match=f"needs a v-prediction model .*; m predicts {prediction}"):
            check_zero_terminal_snr("m", configs(prediction_type=prediction))
    with pytest.raises(SdtuneError, match="predicts epsilon"):  # no prediction_type: diffusers' default
        check_zero_terminal_snr("m", configs())


def test_debiased_estimation_sees_the_flag():
    from sdtune.limits import check_debiased_estimation

    configs = SimpleNamespace(scheduler={"prediction_type": "epsilon", "num_train_timesteps": 1000})
    check_debiased_estimation("m", configs, None)
    with pytest.raises(SdtuneError, match="infinite at m's last timestep"):
        check_debiased_estimation("m", configs, None, zero_terminal_snr=True)


def test_the_trainers_schedule_is_diffusers_rescale_bit_for_bit(tmp_path, tiny_path):
    from diffusers import DDPMScheduler

    from sdtune.models import load_pipeline
    from sdtune.training import Trainer

    trainer = Trainer.__new__(Trainer)
    trainer.config = config(tmp_path / "unused")
    trainer._load_model()
    base = load_pipeline(MODEL).scheduler.config
    expected = DDPMScheduler.from_config(base, rescale_betas_zero_snr=True)
    assert trainer.noise_scheduler.alphas_cumprod[-1] == 0
    assert torch.equal(trainer.noise_scheduler.betas, expected.betas)
    assert torch.equal(trainer.noise_scheduler.alphas_cumprod, expected.alphas_cumprod)
    assert not torch.equal(expected.betas, DDPMScheduler.from_config(base).betas)
    # the validation grids sample as the paper says: rescaled betas, trailing timesteps
    assert trainer.pipe.scheduler.config.rescale_betas_zero_snr is True
    assert trainer.pipe.scheduler.config.timestep_spacing == "trailing"


def test_training_at_the_last_timesteps_is_finite_and_learns(tmp_path, tiny_path):
    result = train(config(tmp_path / "end", steps=8, min_timestep=990, lr=1e-2), progress=False)
    losses = torch.tensor(result.losses)
    assert torch.isfinite(losses).all()
    assert losses[-3:].mean() < losses[:3].mean()


def test_config_toml_records_it_only_when_on(run, tmp_path):
    assert tomllib.loads((run.output / "config.toml").read_text())["zero_terminal_snr"] is True
    assert "zero_terminal_snr" not in TrainConfig(model=MODEL, output=str(tmp_path)).to_dict()


def test_resume_is_exact(run, tmp_path, monkeypatch):
    from helpers import crash_after_checkpoint

    cut = tmp_path / "cut"
    crash_after_checkpoint(monkeypatch, 2)
    with pytest.raises(KeyboardInterrupt):
        train(config(cut, steps=4, checkpoint_every=2), progress=False)
    monkeypatch.undo()
    train(config(cut, steps=4, checkpoint_every=2, resume="latest"), progress=False)
    assert (cut / "adapter.safetensors").read_bytes() == (run.output / "adapter.safetensors").read_bytes()


@pytest.fixture
def schedulers(monkeypatch) -> list:
    """The scheduler config of every sampling pipeline as it starts drawing, in order."""
    import sdtune.sampling as sampling

    drawn = []
    original = sampling.generation_settings

    def spy(pipe, *args, **kwargs):
        drawn.append(pipe.scheduler.config)
        return original(pipe, *args, **kwargs)

    monkeypatch.setattr(sampling, "generation_settings", spy)
    return drawn


def test_the_adapter_records_it_and_sampling_uses_the_rescaled_trailing_scheduler(run, tmp_path, capsys, schedulers):
    import sdtune
    from sdtune.adapter import adapter_info
    from sdtune.config import SampleConfig
    from sdtune.sampling import sample

    assert adapter_info(run.output / "adapter.safetensors").extra["zero_terminal_snr"] == "true"
    plain = train(config(tmp_path / "plain", steps=1, zero_terminal_snr=False), progress=False)
    assert "zero_terminal_snr" not in adapter_info(plain.output / "adapter.safetensors").extra

    result = sdtune.sample(SampleConfig(adapter=str(run.output), prompt=["a photo"], steps=2, num_images=1,
                                        output=str(tmp_path / "samples")))
    # the library prints nothing: the command line says the notes; returned to Python, the training setting is named
    # as Python gives it, though it is no setting of sample's
    assert "trained with zero_terminal_snr=True: sampling with DDIMScheduler" in " ".join(result.notes)
    assert "zero" not in capsys.readouterr().out
    assert schedulers[-1].rescale_betas_zero_snr is True and schedulers[-1].timestep_spacing == "trailing"
    sample(SampleConfig(adapter=str(run.output), prompt=["a photo"], steps=2, num_images=1, scheduler="euler",
                        output=str(tmp_path / "euler")), progress=False)  # an explicit --scheduler wins
    assert not schedulers[-1].get("rescale_betas_zero_snr", False)


@pytest.fixture(scope="module")
def plain(tmp_path_factory, tiny_path):
    """An adapter of the same model trained without --zero-terminal-snr."""
    return train(config(tmp_path_factory.mktemp("plain") / "run", steps=1, zero_terminal_snr=False), progress=False).output


def test_a_stack_samples_rescaled_when_any_of_its_adapters_asks(run, plain, tmp_path, schedulers):
    import sdtune.sampling as sampling
    from sdtune.config import SampleConfig

    drawn = schedulers
    common = dict(prompt=["a photo"], steps=2, num_images=1)
    for name, stack in (("second", [str(plain), str(run.output)]), ("both", [str(run.output), str(run.output)])):
        notes = sampling.sample(SampleConfig(adapter=stack, output=str(tmp_path / name), **common), progress=False).notes
        asked = " and ".join(a for a in stack if a == str(run.output))
        assert f"{asked} {'were' if ' and ' in asked else 'was'} trained with --zero-terminal-snr: " in " ".join(notes)
        assert drawn[-1].rescale_betas_zero_snr is True and drawn[-1].timestep_spacing == "trailing"
    assert not sampling.sample(SampleConfig(adapter=[str(plain), str(plain)], output=str(tmp_path / "neither"), **common),
                               progress=False).notes
    assert not drawn[-1].get("rescale_betas_zero_snr", False)
    assert not sampling.sample(SampleConfig(adapter=[str(plain), str(run.output)], scheduler="euler", output=str(tmp_path / "euler"),
                                            **common), progress=False).notes  # an explicit --scheduler wins
    assert not drawn[-1].get("rescale_betas_zero_snr", False)


def test_train_then_sample_from_the_command_line(plain, tmp_path, tiny_path):
    from typer.testing import CliRunner

    from sdtune.cli import app

    runner = CliRunner()
    trained = runner.invoke(app, ["train", "--model", MODEL, "--zero-terminal-snr", "--steps", "2", "--log-with", "none",
                                  "--output", str(tmp_path / "run")])
    assert trained.exit_code == 0, trained.output
    drawn = runner.invoke(app, ["sample", "--adapter", str(plain), "--adapter", str(tmp_path / "run"), "--prompt", "a photo",
                                "--num-images", "2", "--steps", "2", "--output", str(tmp_path / "samples")])
    assert drawn.exit_code == 0, drawn.output
    assert f"{tmp_path / 'run'} was trained with --zero-terminal-snr: sampling with " in drawn.output
    assert sorted(path.name for path in (tmp_path / "samples" / "images").iterdir()) == ["000-seed0.png", "000-seed1.png"]
    assert (tmp_path / "samples" / "grid.png").is_file()


def test_kohya_export_says_so_and_samples_as_its_adapter(run, plain, tmp_path):
    """The export records it as kohya-ss does, and sampling the kohya file (sdtune's, or one kohya-ss trained with
    --zero_terminal_snr) uses the rescaled, trailing scheduler, as its adapter does; a plain run's export does not."""
    from safetensors import safe_open

    from sdtune.config import SampleConfig
    from sdtune.export import export_adapter
    from sdtune.sampling import sample

    path = export_adapter(str(run.output), "kohya", str(tmp_path / "k.safetensors")).output
    with safe_open(str(path), "pt") as f:
        assert f.metadata()["ss_zero_terminal_snr"] == "True"
    plain_path = export_adapter(str(plain), "kohya", str(tmp_path / "plain.safetensors")).output
    for adapter, rescaled in ((path, True), (plain_path, False)):
        notes = sample(SampleConfig(adapter=str(adapter), prompt=["a photo"], steps=2, num_images=1,
                                    output=str(tmp_path / adapter.stem)), progress=False).notes
        assert ("trained with --zero-terminal-snr" in " ".join(notes)) == rescaled


def test_a_sampler_without_the_option_becomes_ddim():
    from diffusers import DDIMScheduler, EulerDiscreteScheduler, PNDMScheduler

    from sdtune.sampling import zero_snr_scheduler

    base = {"prediction_type": "v_prediction", "beta_schedule": "scaled_linear"}
    euler = zero_snr_scheduler(EulerDiscreteScheduler.from_config(base))
    assert isinstance(euler, EulerDiscreteScheduler) and euler.config.rescale_betas_zero_snr
    pndm = zero_snr_scheduler(PNDMScheduler.from_config(base))
    assert isinstance(pndm, DDIMScheduler) and pndm.config.rescale_betas_zero_snr and pndm.config.timestep_spacing == "trailing"


def test_a_merged_pipeline_samples_as_its_adapter(run, plain, tmp_path):
    """`sdtune merge` of a --zero-terminal-snr adapter writes the rescaled, trailing scheduler (and says so), so
    sampling the merged folder draws exactly what sampling the adapter draws; a plain adapter's keeps the model's."""
    import json

    import numpy as np
    from PIL import Image
    from typer.testing import CliRunner

    from sdtune.cli import app
    from sdtune.config import SampleConfig
    from sdtune.merging import merge_adapter
    from sdtune.sampling import sample

    merged = CliRunner().invoke(app, ["merge", str(run.output), "--output", str(tmp_path / "merged")])
    assert merged.exit_code == 0, merged.output
    assert f"note: {run.output} was trained with --zero-terminal-snr: the merged pipeline's scheduler is rescaled" in merged.output
    scheduler = json.loads((tmp_path / "merged" / "scheduler" / "scheduler_config.json").read_text())
    assert scheduler["rescale_betas_zero_snr"] is True and scheduler["timestep_spacing"] == "trailing"
    common = dict(prompt=["a photo"], steps=3, num_images=1)
    images = [sample(SampleConfig(output=str(tmp_path / name), **source, **common), progress=False).images[0]
              for name, source in (("adapter", {"adapter": str(run.output)}), ("merged", {"model": str(tmp_path / "merged")}))]
    adapter_drawn, merged_drawn = (np.asarray(Image.open(image)).astype(int) for image in images)
    # the same weights, held in other tensors (merged here, read from a file there): a level of rounding at most;
    # with the model's own scheduler the merged pipeline drew tens of levels away
    assert np.abs(adapter_drawn - merged_drawn).max() <= 1

    result = merge_adapter(str(plain), tmp_path / "plain-merged")
    assert result.zero_terminal_snr == []
    scheduler = json.loads((tmp_path / "plain-merged" / "scheduler" / "scheduler_config.json").read_text())
    assert not scheduler.get("rescale_betas_zero_snr") and scheduler["timestep_spacing"] != "trailing"


def test_the_model_cards_python_draws_on_the_rescaled_schedule(run, plain, tmp_path, monkeypatch):
    """The card's Python snippet, run as a reader would run it beside the adapter, draws with the rescaled, trailing
    scheduler and guidance rescale 0.7, as `sdtune sample` does; a plain run's snippet keeps the model's own."""
    import re

    import diffusers

    from sdtune.model_card import write_model_card

    calls = []
    monkeypatch.setattr(diffusers.StableDiffusionPipeline, "__call__",
                        lambda pipe, prompt, **settings: calls.append((pipe.scheduler.config, settings)) or SimpleNamespace(images=[None]))
    for folder, rescaled in ((run.output, True), (plain, False)):
        write_model_card(folder, overwrite=True)
        snippet = re.search(r"```python\n(.*?)```", (folder / "README.md").read_text(), re.S).group(1)
        monkeypatch.chdir(folder)
        exec(snippet, {})
        scheduler, settings = calls[-1]
        assert bool(scheduler.get("rescale_betas_zero_snr")) == rescaled
        assert (scheduler.timestep_spacing == "trailing") == rescaled
        assert settings == ({"guidance_rescale": 0.7} if rescaled else {})


def test_a_base_adapter_does_not_decide_the_stacks_schedule(run, tmp_path, schedulers):
    """A run trained without the option on top of a --zero-terminal-snr base adapter drew its validation on the
    model's schedule: sampling or merging the stack of both draws as it trained, as clip skip leaves base adapters out."""
    import json

    import sdtune.sampling as sampling
    from sdtune.config import SampleConfig
    from sdtune.merging import merge_adapter

    on_top = train(config(tmp_path / "on-top", steps=1, zero_terminal_snr=False, base_adapters=[str(run.output)]),
                   progress=False).output
    drawn = schedulers
    stack = [str(run.output), str(on_top)]
    notes = sampling.sample(SampleConfig(adapter=stack, prompt=["a photo"], steps=2, num_images=1,
                                         output=str(tmp_path / "samples")), progress=False).notes
    assert not any("zero-terminal-snr" in note for note in notes)
    assert not drawn[-1].get("rescale_betas_zero_snr", False)
    assert merge_adapter(stack, tmp_path / "merged").zero_terminal_snr == []
    scheduler = json.loads((tmp_path / "merged" / "scheduler" / "scheduler_config.json").read_text())
    assert not scheduler.get("rescale_betas_zero_snr")
