"""LoRA+: lora's B matrices learn at `loraplus_lr_ratio` times the rate, in the optimiser's own parameter groups."""

from __future__ import annotations

import json

import pytest
from safetensors.torch import load_file

from sdtune import methods
from sdtune.adapter import read_adapter_info
from sdtune.config import TrainConfig
from sdtune.errors import SdtuneError
from sdtune.training import open_trainer, train


def settings(output, **more) -> TrainConfig:
    return TrainConfig(**{"method": "lora", "model": "tiny-random", "output": str(output), "steps": 1, "lr": 1e-3,
                          "log_with": "none", **more})


def test_b_matrices_form_the_faster_group(tiny_path):
    from sdtune.models import load_pipeline

    lora = methods.create("lora", loraplus_lr_ratio=16, dora=True)
    lora.inject(load_pipeline("tiny-random").unet)
    (plain, one), (faster, ratio) = lora.learning_rate_factors()
    layers = len(lora.target_names)
    assert (one, ratio) == (1.0, 16.0) and len(faster) == layers and len(plain) == 2 * layers  # A and DoRA's m
    assert {id(p) for p in plain + faster} == {id(p) for p in lora.trainable_parameters()}
    assert all(not p.any() for p in faster)  # B starts at zero
    assert methods.create("lora").learning_rate_factors()[0][1] == 1.0


def test_loraplus_moves_b_ratio_times_as_far_in_a_first_adam_step(tmp_path, tiny_path):
    def b_norm(output):
        tensors = load_file(str(output / "adapter.safetensors"))
        return max(t.abs().max().item() for k, t in tensors.items() if ".lora_B." in k)

    train(settings(tmp_path / "plain"), progress=False)
    run = train(settings(tmp_path / "plus", options={"loraplus_lr_ratio": 16}), progress=False)
    assert b_norm(tmp_path / "plus") == pytest.approx(16 * b_norm(tmp_path / "plain"), rel=1e-3)  # Adam's first step: ±lr
    info, _ = read_adapter_info(run.output / "adapter.safetensors")
    assert info.options["loraplus_lr_ratio"] == 16.0
    assert "loraplus_lr_ratio" not in read_adapter_info(tmp_path / "plain" / "adapter.safetensors")[0].options


def test_groups_with_the_text_encoder_and_exact_resume(tmp_path, tiny_path):
    more = dict(options={"loraplus_lr_ratio": 4}, train_text_encoder=True, text_encoder_lr=5e-4)
    with open_trainer(settings(tmp_path / "groups", **more), progress=False) as trainer:
        assert [group["lr"] for group in trainer.optimizer.param_groups] == [1e-3, 4e-3, 5e-4, 2e-3]
        assert trainer.encoder_group == 2
    resumable = dict(more, steps=4, checkpoint_every=2)
    train(settings(tmp_path / "whole", **resumable), progress=False)
    train(settings(tmp_path / "cut", **{**resumable, "steps": 2}), progress=False)
    train(settings(tmp_path / "cut", resume="latest", **resumable), progress=False)
    assert (tmp_path / "cut" / "adapter.safetensors").read_bytes() == (tmp_path / "whole" / "adapter.safetensors").read_bytes()
    record = json.loads((tmp_path / "whole" / "metrics.jsonl").read_text().splitlines()[0])
    assert record["lr"] == 1e-3 and record["text_encoder_lr"] == 5e-4


@pytest.mark.parametrize("value", [0, -1, float("inf"), True, "fast"])
def test_bad_ratios_are_one_line(value):
    with pytest.raises(SdtuneError, match=r"^--loraplus-lr-ratio must be a positive number"):
        methods.create("lora", loraplus_lr_ratio=value)
