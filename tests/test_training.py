"""The training loop's options: checkpoints and exact resume, LR schedules, clipping, EMA, accumulation,
gradient checkpointing."""

from __future__ import annotations

import json
import tomllib
import warnings

import pytest
import torch
from helpers import crash_after_checkpoint
from safetensors import safe_open
from safetensors.torch import load_file

from sdtune.checkpoints import list_checkpoints
from sdtune.config import TrainConfig
from sdtune.errors import SdtuneError
from sdtune.tracking import metrics_until
from sdtune.training import changed_settings, train


def config(output, **settings) -> TrainConfig:
    return TrainConfig(model="tiny-random", output=str(output), **{"steps": 2, "seed": 3, **settings})


def records(output) -> list[dict]:
    return [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]


def tensors(path) -> dict:
    return load_file(str(path))


# Everything that keeps state across steps at once: accumulation position, warm-up and cosine, clipping, EMA.
RESUMABLE = dict(
    steps=6, checkpoint_every=2, keep_checkpoints=2, gradient_accumulation_steps=2, lr_scheduler="cosine",
    lr_warmup_steps=2, max_grad_norm=0.5, ema_decay=0.9,
)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, tiny_path):
    output = tmp_path_factory.mktemp("uninterrupted") / "run"
    train(config(output, **RESUMABLE), progress=False)
    return output


def test_checkpoints_hold_the_training_state_and_only_the_newest_stay(uninterrupted):
    assert [step for step, _ in list_checkpoints(uninterrupted)] == [4, 6]  # keep_checkpoints=2
    assert not [p for p in (uninterrupted / "checkpoints").iterdir() if p.name.startswith(".")]
    folder = uninterrupted / "checkpoints" / "step-6"
    names = sorted(p.name for p in folder.iterdir())
    assert names == [
        "ema.safetensors", "optimizer.bin", "random_states_0.pkl", "scheduler.bin", "state.json", "trainable.safetensors"
    ]  # no copy of the frozen UNet
    state = json.loads((folder / "state.json").read_text())
    assert state["step"] == 6 and state["micro_batches"] == 12 and state["config"]["lr_scheduler"] == "cosine"
    optimizer = torch.load(folder / "optimizer.bin", weights_only=True)
    assert {float(s["step"]) for s in optimizer["state"].values()} == {6.0}  # one optimiser step per 2 micro-batches
    assert "grad_norm" in records(uninterrupted)[0]


def test_resume_after_an_interruption_gives_the_same_adapter_bytes(uninterrupted, tmp_path, monkeypatch):
    output = tmp_path / "run"
    crash_after_checkpoint(monkeypatch, 4)
    with pytest.raises(KeyboardInterrupt):
        train(config(output, **RESUMABLE), progress=False)
    with safe_open(str(output / "adapter.safetensors"), framework="pt") as handle:
        assert handle.metadata()["step"] == "2"  # the adapter of the previous checkpoint
    assert [r["step"] for r in records(output)] == [1, 2, 3, 4]
    monkeypatch.undo()

    weights_only = []
    real_load = torch.load

    def recording_load(*args, **kwargs):
        weights_only.append(kwargs.get("weights_only"))
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", recording_load)
    run = train(config(output, resume="latest", **RESUMABLE), progress=False)
    monkeypatch.undo()
    assert run.resumed_from == output / "checkpoints" / "step-4"
    assert weights_only and all(w is True for w in weights_only)  # accelerate reads its torch.save files safely

    for name in ("adapter.safetensors", "adapter-ema.safetensors"):
        assert (output / name).read_bytes() == (uninterrupted / name).read_bytes(), name
    same = ("step", "loss", "lr", "grad_norm")
    assert [{k: r[k] for k in same} for r in records(output)] == [{k: r[k] for k in same} for r in records(uninterrupted)]

    # resuming from an older checkpoint folder replays the same steps again
    train(config(output, resume=str(output / "checkpoints" / "step-4"), **RESUMABLE), progress=False)
    assert (output / "adapter.safetensors").read_bytes() == (uninterrupted / "adapter.safetensors").read_bytes()
    assert len(records(output)) == 6

    # a run folder means its newest checkpoint: the finished run has nothing left to train
    run = train(config(output, resume=str(output), **RESUMABLE), progress=False)
    assert run.resumed_from == output / "checkpoints" / "step-6" and run.losses == []
    assert (output / "adapter.safetensors").read_bytes() == (uninterrupted / "adapter.safetensors").read_bytes()


def step_files(output) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted(output.glob("adapter*-step-*.safetensors"))}


def test_save_every_keeps_each_save_and_a_resumed_run_writes_them_exactly(tmp_path, tiny_path, monkeypatch):
    from sdtune.training import Trainer

    # saves at 2, 4, 6, 8 (9 is adapter.safetensors), the newest 3 kept; the kill comes after the save of step 6,
    # past the checkpoint of step 4, so the resumed run meets a save of its own future and writes it again
    settings = dict(steps=9, save_every=2, keep_saves=3, checkpoint_every=4, ema_decay=0.9, log_with="none")
    whole = train(config(tmp_path / "whole", **settings), progress=False)
    kept = [f"adapter{kind}-step-{step:06d}.safetensors" for step in (4, 6, 8) for kind in ("", "-ema")]
    assert sorted(step_files(tmp_path / "whole")) == sorted(kept)
    assert [path.name for path in whole.saves] == [name for name in kept if "-ema" not in name]
    for step in (4, 6, 8):
        with safe_open(str(tmp_path / "whole" / f"adapter-step-{step:06d}.safetensors"), framework="pt") as handle:
            assert handle.metadata()["step"] == str(step)
    assert step_files(tmp_path / "whole")["adapter-step-000004.safetensors"] != (tmp_path / "whole" / "adapter.safetensors").read_bytes()

    original = Trainer.save_adapters

    def save_then_crash(self, kept=False):
        original(self, kept)
        if self.global_step == 6:
            raise KeyboardInterrupt

    monkeypatch.setattr(Trainer, "save_adapters", save_then_crash)
    with pytest.raises(KeyboardInterrupt):
        train(config(tmp_path / "cut", **settings), progress=False)
    monkeypatch.undo()
    assert sorted(step_files(tmp_path / "cut")) == sorted(f"adapter{kind}-step-{step:06d}.safetensors" for step in (2, 4, 6) for kind in ("", "-ema"))
    run = train(config(tmp_path / "cut", resume="latest", **settings), progress=False)
    assert run.resumed_from == tmp_path / "cut" / "checkpoints" / "step-4"
    assert step_files(tmp_path / "cut") == step_files(tmp_path / "whole")  # bit for bit, pruned alike

    # killed between the checkpoint of a save's step and the save, or extended from that step's end: written on resume
    crash_after_checkpoint(monkeypatch, 8)
    with pytest.raises(KeyboardInterrupt):
        train(config(tmp_path / "at-save", **{**settings, "checkpoint_every": 8}), progress=False)
    monkeypatch.undo()
    assert "adapter-step-000008.safetensors" not in step_files(tmp_path / "at-save")
    train(config(tmp_path / "at-save", resume="latest", **{**settings, "checkpoint_every": 8}), progress=False)
    assert step_files(tmp_path / "at-save") == step_files(tmp_path / "whole")
    train(config(tmp_path / "short", **{**settings, "steps": 8, "checkpoint_every": 8}), progress=False)
    train(config(tmp_path / "short", resume="latest", **{**settings, "checkpoint_every": 8}), progress=False)
    assert step_files(tmp_path / "short") == step_files(tmp_path / "whole")

    # saves alone are an earlier run's; a fresh run with --overwrite leaves none of them
    lone = tmp_path / "lone"
    lone.mkdir()
    (lone / "adapter-step-000002.safetensors").write_bytes(b"saved")
    with pytest.raises(SdtuneError, match=r"earlier run \(adapter-step-N.safetensors\): add --overwrite"):
        train(config(lone), progress=False)
    train(config(tmp_path / "cut", overwrite=True, steps=1), progress=False)
    assert step_files(tmp_path / "cut") == {}


def test_resume_of_a_labelled_dataset_crosses_epochs_exactly(tmp_path, tiny_path):
    # 10 digits in batches of 2: 5 steps an epoch, so the resumed run replays the balanced sampler's
    # draws of the second epoch
    settings = dict(dataset="digits", max_per_class=1, batch_size=2, steps=9, checkpoint_every=3, log_with="none")
    train(config(tmp_path / "whole", **settings), progress=False)
    train(config(tmp_path / "cut", **{**settings, "steps": 6}), progress=False)
    train(config(tmp_path / "cut", resume="latest", **settings), progress=False)
    assert (tmp_path / "cut" / "adapter.safetensors").read_bytes() == (tmp_path / "whole" / "adapter.safetensors").read_bytes()


@pytest.mark.parametrize(
    "name,kind",
    [("adamw", "AdamW"), ("adam", "Adam"), ("sgd", "SGD"), ("adafactor", "Adafactor"), ("adamw8bit", "AdamW8bit"), ("prodigy", "Prodigy")],
)
def test_optimizer_settings_build_that_optimizer(name, kind):
    from sdtune.optimizers import make_optimizer

    parameter = torch.nn.Parameter(torch.zeros(3))
    settings = TrainConfig(optimizer=name, lr=1e-3, adam_beta1=0.8, adam_beta2=0.99, adam_epsilon=1e-6)
    optimizer = make_optimizer(settings, [parameter], 1e-2)
    group = optimizer.param_groups[0]
    assert type(optimizer).__name__ == kind and group["lr"] == 1e-3
    assert group["weight_decay"] == 1e-2  # the method's own, unless --weight-decay is given
    if name in ("adamw", "adam", "adamw8bit", "prodigy"):
        assert tuple(group["betas"][:2]) == (0.8, 0.99) and group["eps"] == 1e-6
    if name == "prodigy":  # as diffusers' DreamBooth LoRA script by default: decoupled decay, bias correction, safeguard
        assert group["decouple"] and group["use_bias_correction"] and group["safeguard_warmup"]
    if name == "sgd":
        assert group["momentum"] == 0.9
    # kohya-ss' ss_optimizer: the class built, and the arguments it was given, as the group holds them
    from sdtune.optimizers import kohya_optimizer_name, optimizer_arguments

    held = ",".join(f"{key}={tuple(group[key]) if key == 'betas' else group[key]}" for key in optimizer_arguments(settings, 1e-2))
    assert kohya_optimizer_name(settings, 1e-2) == f"{type(optimizer).__module__}.{kind}({held})"
    assert "betas=(0.8, 0.99)" in held or name in ("sgd", "adafactor")
    overridden = make_optimizer(TrainConfig(optimizer=name, lr=1e-3, weight_decay=0.0), [parameter], 1e-2)
    assert overridden.param_groups[0]["weight_decay"] == 0.0
    if name == "prodigy":  # the step-size estimate's scale and first value, Prodigy's own knobs
        assert group["d_coef"] == 1.0 and group["d0"] == group["d"] == 1e-6
        tuned = make_optimizer(TrainConfig(optimizer=name, lr=1.0, prodigy_d_coef=10.0, prodigy_d0=1e-4), [parameter], 1e-2)
        assert tuned.param_groups[0]["d_coef"] == 10.0 and tuned.param_groups[0]["d0"] == tuned.param_groups[0]["d"] == 1e-4
        assert not {"prodigy_d_coef", "prodigy_d0"} & set(TrainConfig(optimizer=name).to_dict())  # at their defaults, config.toml as before


@pytest.mark.parametrize("name,method", [("adamw8bit", "full"), ("prodigy", "lora")])
def test_package_optimizers_train_and_resume_exactly(name, method, tmp_path, tiny_path):
    # full fine-tuning has tensors of 4,096 numbers and more, which AdamW8bit keeps in 8 bits
    settings = dict(method=method, optimizer=name, steps=4, checkpoint_every=2, lr_warmup_steps=1, log_with="none")
    whole = train(config(tmp_path / "whole", **settings), progress=False)
    train(config(tmp_path / "cut", **{**settings, "steps": 2}), progress=False)
    train(config(tmp_path / "cut", resume="latest", **settings), progress=False)
    assert (tmp_path / "cut" / "adapter.safetensors").read_bytes() == (tmp_path / "whole" / "adapter.safetensors").read_bytes()
    state = torch.load(tmp_path / "whole" / "checkpoints" / "step-4" / "optimizer.bin", weights_only=True)
    if name == "adamw8bit":
        quantised = [s for s in state["state"].values() if s["__bnb_optimizer_quant_state__"]["state1"].dtype == torch.uint8]
        assert quantised  # moments of the large tensors in 8 bits
    else:
        group = state["param_groups"][0]
        assert group["lr"] == 1.0 and group["safeguard_warmup"]  # Prodigy's own lr; warm-up with its safeguard
        assert group["d"] >= group["d0"] and group["d_numerator"] > 0  # estimating its step size from d0 up
        assert 'lr = 1.0' in (tmp_path / "whole" / "config.toml").read_text()
        assert [record["prodigy_d"] for record in records(tmp_path / "whole")][-1] == group["d"]  # logged, to watch
    assert whole.losses and all(torch.isfinite(torch.tensor(whole.losses)))


def test_an_optimizer_without_its_package_is_one_line_before_the_model_loads(tmp_path, monkeypatch):
    import importlib.util

    from sdtune.training import plan_run

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "prodigyopt" else real(name, *a))
    with pytest.raises(SdtuneError, match=r'^optimizer="prodigy" needs the prodigyopt package: pip install prodigyopt'):
        plan_run(TrainConfig(model="no/such-model", output=str(tmp_path / "run"), optimizer="prodigy"))
    assert not (tmp_path / "run").exists()


def test_the_memory_check_counts_each_optimizers_state(tmp_path):
    from sdtune.training import plan_run

    def device_bytes(optimizer):
        return plan_run(config(tmp_path / optimizer, method="full", optimizer=optimizer)).sizes.device_bytes

    trained = plan_run(config(tmp_path / "count", method="full")).sizes.trained
    adamw = device_bytes("adamw")
    assert adamw - device_bytes("adamw8bit") == 6 * trained  # 8-bit moments: 2 bytes a parameter against 8
    assert device_bytes("prodigy") - adamw == 8 * trained  # Prodigy adds s and the initial weights


def test_resume_with_another_optimizer_is_refused_and_loses_nothing(tmp_path, tiny_path):
    output = tmp_path / "sgd"
    train(config(output, optimizer="sgd", lr=1e-2, checkpoint_every=2), progress=False)
    assert 'optimizer = "sgd"' in (output / "config.toml").read_text()
    state = torch.load(output / "checkpoints" / "step-2" / "optimizer.bin", weights_only=True)
    assert state["param_groups"][0]["momentum"] == 0.9  # SGD's state, not AdamW's
    kept = {name: (output / name).read_bytes() for name in ("adapter.safetensors", "config.toml", "metrics.jsonl")}
    with pytest.raises(SdtuneError, match="holds the state of --optimizer sgd; resume with it, not adamw"):
        train(config(output, steps=3, checkpoint_every=2, resume="latest"), progress=False)
    assert {name: (output / name).read_bytes() for name in kept} == kept
    with pytest.warns(UserWarning, match="lr: 0.01 -> 0.02"):  # another rate: named
        resumed = train(config(output, optimizer="sgd", lr=2e-2, steps=3, checkpoint_every=2, resume="latest"), progress=False)
    assert resumed.resumed_from == output / "checkpoints" / "step-2" and len(resumed.losses) == 1


def test_extending_a_finished_run_ends_as_the_longer_run_would(tmp_path, tiny_path, recwarn):
    """Under a constant rate nothing the loop draws depends on --steps: raising it is no change worth a warning,
    and the extended run ends with the longer run's bytes. A schedule that spans the steps is named as changed,
    with why; the dry run says which of the two a resume is (a sweep decides by the same rule: test_sweep)."""
    from sdtune.training import continuation, plan_run

    longer = train(config(tmp_path / "longer", steps=3, checkpoint_every=2), progress=False)
    train(config(tmp_path / "extended", steps=2, checkpoint_every=2), progress=False)
    start = plan_run(config(tmp_path / "extended", steps=3, checkpoint_every=2, resume="latest")).start
    assert start.startswith("extends a run of 2 steps to 3 from ") and start.endswith("ending as a run of 3 steps trained in one go would")
    extended = train(config(tmp_path / "extended", steps=3, checkpoint_every=2, resume="latest"), progress=False)
    assert not [w for w in recwarn if "resuming with other settings" in str(w.message)]
    assert extended.adapter.read_bytes() == longer.adapter.read_bytes()
    assert extended.extended_from == 2 and longer.extended_from is None
    saved = TrainConfig(output="a", steps=2).to_dict()
    assert continuation(saved, TrainConfig(output="a", steps=3)) == ("extends", "")
    assert continuation(saved, TrainConfig(output="a", steps=2, checkpoint_every=5)) == ("resumes", "")
    assert changed_settings(saved, TrainConfig(output="a", steps=3, lr_scheduler="constant_with_warmup")) == "lr_scheduler: constant -> constant_with_warmup"
    assert changed_settings(saved, TrainConfig(output="a", steps=1)) == "steps: 2 -> 1 (fewer steps)"
    cosine = TrainConfig(output="a", steps=2, lr_scheduler="cosine").to_dict()
    assert continuation(cosine, TrainConfig(output="a", steps=3, lr_scheduler="cosine")) == (
        "differs", "steps: 2 -> 3 (the cosine rate depends on the step count)")
    train(config(tmp_path / "cosine", steps=2, checkpoint_every=2, lr_scheduler="cosine"), progress=False)
    start = plan_run(config(tmp_path / "cosine", steps=3, checkpoint_every=2, lr_scheduler="cosine", resume="latest")).start
    assert "with other settings (steps: 2 -> 3 (the cosine rate depends on the step count)): it will differ" in start


def test_resume_latest_without_checkpoints_starts_at_step_zero(tmp_path, tiny_path):
    with pytest.warns(UserWarning, match="no checkpoint"):
        run = train(config(tmp_path / "run", steps=1, resume="latest"), progress=False)
    assert run.resumed_from is None and len(run.losses) == 1


def test_resume_refuses_what_is_not_a_checkpoint_and_a_fresh_run_over_checkpoints(tmp_path, tiny_path):
    with pytest.raises(SdtuneError, match="checkpoint folder not found"):
        train(config(tmp_path / "a", resume=str(tmp_path / "nothing")), progress=False)
    (tmp_path / "empty").mkdir()
    with pytest.raises(SdtuneError, match="not an sdtune checkpoint"):
        train(config(tmp_path / "a", resume=str(tmp_path / "empty")), progress=False)
    (tmp_path / "empty" / "state.json").write_bytes(b'{"format": \xff')
    with pytest.raises(SdtuneError, match="state.json: damaged checkpoint state"):
        train(config(tmp_path / "a", resume=str(tmp_path / "empty")), progress=False)
    (tmp_path / "b" / "checkpoints" / "step-1").mkdir(parents=True)
    with pytest.raises(SdtuneError, match="holds checkpoints of an earlier run: add --resume latest"):
        train(config(tmp_path / "b"), progress=False)


def test_warm_up_then_linear_decay_and_clipping(tmp_path, tiny_path, monkeypatch):
    from accelerate import Accelerator

    clipped = []
    original = Accelerator.clip_grad_norm_

    def recording_clip(self, parameters, max_norm, norm_type=2):
        parameters = list(parameters)
        before = original(self, parameters, max_norm, norm_type)
        after = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in parameters if p.grad is not None]))
        clipped.append((before.item(), after.item()))
        return before

    monkeypatch.setattr(Accelerator, "clip_grad_norm_", recording_clip)
    output = tmp_path / "run"
    train(config(output, steps=4, lr=1e-3, lr_scheduler="linear", lr_warmup_steps=2, max_grad_norm=0.01), progress=False)
    logged = records(output)
    assert [r["lr"] for r in logged] == pytest.approx([0.0, 5e-4, 1e-3, 5e-4])
    assert [r["grad_norm"] for r in logged] == pytest.approx([before for before, _ in clipped])
    assert all(before > 0.01 and after == pytest.approx(0.01, rel=1e-3) for before, after in clipped)


def test_ema_adapter_is_the_moving_average_and_loads(tmp_path, tiny_path):
    from sdtune.adapter import load_adapter, read_adapter
    from sdtune.models import load_pipeline

    one, two = tmp_path / "one", tmp_path / "two"
    train(config(one, steps=1), progress=False)
    train(config(two, steps=2, ema_decay=0.9), progress=False)
    first, second, ema = tensors(one / "adapter.safetensors"), tensors(two / "adapter.safetensors"), tensors(two / "adapter-ema.safetensors")
    decay = 2 / 11  # diffusers' EMAModel warm-up, min((1 + t) / (10 + t), 0.9) at its second update
    for key in second:
        torch.testing.assert_close(ema[key], decay * first[key] + (1 - decay) * second[key])
    assert any(not torch.equal(ema[k], second[k]) for k in second)
    info, _ = read_adapter(two / "adapter-ema.safetensors")
    assert info.extra["ema_decay"] == "0.9" and info.extra["step"] == "2"
    load_adapter(two / "adapter-ema.safetensors", load_pipeline("tiny-random"))


def test_gradient_checkpointing_gives_the_same_loss_and_gradient(tmp_path, tiny_path, monkeypatch):
    import torch.utils.checkpoint

    calls = []
    original = torch.utils.checkpoint.checkpoint

    def counting_checkpoint(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    plain, checkpointed = tmp_path / "plain", tmp_path / "checkpointed"
    train(config(plain, steps=2), progress=False)
    monkeypatch.setattr(torch.utils.checkpoint, "checkpoint", counting_checkpoint)
    train(config(checkpointed, steps=2, gradient_checkpointing=True), progress=False)
    assert calls, "the UNet ran its blocks through torch.utils.checkpoint"
    for a, b in zip(records(plain), records(checkpointed)):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-6) and b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-5)
    expected, got = tensors(plain / "adapter.safetensors"), tensors(checkpointed / "adapter.safetensors")
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=1e-5, atol=1e-7)


def test_training_settings_are_validated():
    for settings, message in [
        (dict(gradient_accumulation_steps=0), "^gradient_accumulation_steps must be at least 1"),
        (dict(lr_scheduler="step"), "^lr_scheduler must be one of"),
        (dict(ema_decay=1.0), "^ema_decay must be in [0, 1)"),
        (dict(max_grad_norm=-1.0), "^max_grad_norm must be 0 or more"),
        (dict(keep_checkpoints=0), "^keep_checkpoints must be at least 1"),
        (dict(checkpoint_every=-2), "^checkpoint_every must be 0 or more"),
    ]:
        with pytest.raises(SdtuneError, match=message.replace("[", r"\[").replace(")", r"\)")):
            TrainConfig(**settings).validate()
    assert "resume" not in TrainConfig(resume="latest").resolved(1e-3).to_toml()


def test_changed_settings_and_metrics_until(tmp_path):
    saved = TrainConfig(output="a", checkpoint_every=2).to_dict()
    assert changed_settings(saved, TrainConfig(output="b", checkpoint_every=5, resume="latest")) == ""
    assert changed_settings(saved, TrainConfig(output="a", lr=0.5)) == "lr: None -> 0.5"
    # settings at their defaults, which config.toml leaves out, are shown as their values
    read_otherwise = TrainConfig(output="a", checkpoint_every=2, clip_skip=2, shuffle_caption=True, caption_tag_dropout=0.3).to_dict()
    assert changed_settings(read_otherwise, TrainConfig(output="a", shuffle_caption=True)) == "caption_tag_dropout: 0.3 -> 0.0, clip_skip: 2 -> 1"
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\n{"step": 2}\n{"step": 3}\n{"st')
    assert metrics_until(path, 2) == '{"step": 1}\n{"step": 2}\n'
    assert metrics_until(path, 0) == ""


# ---------------------------------------------------------------------------------------------
# A loop at the device's pace


def test_a_step_never_reads_the_device_and_read_brings_its_values(tmp_path, tiny_path, monkeypatch):
    """What `step()` queues stays on the device: nothing in sdtune reads a tensor back inside it (on a
    GPU each read would make the host wait); `read` brings the step's values in one transfer."""
    import traceback

    import sdtune
    from sdtune.training import open_trainer

    package = str(next(iter(sdtune.__path__)))
    reads = []

    def recording(name):
        original = getattr(torch.Tensor, name)

        def read(self, *args, **kwargs):
            caller = traceback.extract_stack()[-2]  # the code that reads the tensor
            if caller.filename.startswith(package):
                reads.append((name, f"{caller.filename}:{caller.lineno}"))
            return original(self, *args, **kwargs)

        return read

    settings = dict(steps=3, gradient_accumulation_steps=2, max_grad_norm=1.0, class_images=None, snr_gamma=5.0)
    with open_trainer(config(tmp_path / "run", **settings), progress=False) as trainer:
        trainer.open_logs()
        for name in ("item", "tolist", "__bool__", "__float__", "__int__"):
            monkeypatch.setattr(torch.Tensor, name, recording(name))
        result = trainer.step()
        monkeypatch.undo()
        assert reads == []
        assert [loss.shape for loss in result.losses] == [torch.Size([])] * 2 and isinstance(result.grad_norm, torch.Tensor)
        values = trainer.read(result)
        assert values["loss"] == pytest.approx(torch.stack(result.losses).mean().item())
        assert values["grad_norm"] == pytest.approx(result.grad_norm.item())
        trainer.close_logs()


def test_a_non_finite_step_read_late_is_named_and_nothing_after_the_last_good_save_is_written(tmp_path, tiny_path):
    from sdtune.errors import TrainingFailed

    output = tmp_path / "nan"
    with pytest.raises(TrainingFailed, match=r"loss is (nan|inf) at step \d+; stopped without saving") as failure:
        train(config(output, steps=12, lr=1e30, save_every=5, log_with="none"), progress=False)
    step = int(str(failure.value).split("at step ")[1].split(";")[0])
    logged = [r["step"] for r in records(output)]
    assert logged == list(range(1, step))  # every step before the failing one, read one step late, is logged
    if step > 5:
        with safe_open(str(output / "adapter.safetensors"), framework="pt") as handle:
            assert int(handle.metadata()["step"]) == 5 * ((step - 1) // 5)
    else:
        assert not (output / "adapter.safetensors").exists()


def test_step_seconds_follow_the_loop_pace(tmp_path, tiny_path):
    run = train(config(tmp_path / "run", steps=6, log_with="none"), progress=False)
    seconds = [r["step_seconds"] for r in records(run.output)]
    assert len(seconds) == 6 and all(s > 0 for s in seconds)
    assert sum(seconds) <= run.seconds  # intervals between reads: they never overlap


@pytest.fixture
def compiled_eagerly(monkeypatch):
    """`Module.compile` through Dynamo and AOTAutograd with eager kernels and fullgraph (no graph break allowed):
    Inductor's code generation takes minutes on a CPU. The names of the classes compiled."""
    compiled = []
    compile_module = torch.nn.Module.compile

    def compile_eagerly(module, *args, **kwargs):
        compiled.append(type(module).__name__)
        compile_module(module, backend="aot_eager", fullgraph=True)

    monkeypatch.setattr(torch.nn.Module, "compile", compile_eagerly)
    yield compiled
    torch._dynamo.reset()


@pytest.mark.parametrize("kernel", [pytest.param("auto", marks=pytest.mark.slow), "weight"])  # weight: CUDA's
def test_compile_compiles_the_unet_in_place_and_trains_as_eager(tmp_path, tiny_path, compiled_eagerly, kernel):
    """Filter atoms' kernels trace whole, and the compiled steps give the eager losses, on the CPU's own routes and on
    the weight side everywhere (CUDA's)."""
    settings = dict(steps=3, method="atoms", options={"kernel": kernel}, log_with="none")
    eager = train(config(tmp_path / "eager", **settings), progress=False)
    run = train(config(tmp_path / "run", compile=True, **settings), progress=False)
    assert compiled_eagerly == ["UNet2DConditionModel"] and run.config.compile
    assert "compile = true" in (run.output / "config.toml").read_text()
    assert [r["loss"] for r in records(run.output)] == [r["loss"] for r in records(eager.output)]


@pytest.fixture
def compile_modes(monkeypatch):
    """`Module.compile` recording each module's class and mode, and compiling nothing (the module's own call stands in
    for the compiled one): Inductor takes minutes on a CPU, and CUDA graphs need a GPU."""
    compiled = []

    def record(module, *args, **kwargs):
        compiled.append((type(module).__name__, kwargs.get("mode")))
        module._compiled_call_impl = module._call_impl

    monkeypatch.setattr(torch.nn.Module, "compile", record)
    return compiled


@pytest.mark.parametrize("mode", ["default", "reduce-overhead"])
def test_compile_mode_reaches_the_unet_and_cuda_graphs_wait_for_a_cuda_device(tmp_path, tiny_path, compile_modes, monkeypatch,
                                                                                mode):
    """torch.compile's own default is mode=None; on the CPU a mode of CUDA graphs says once that the UNet compiles
    without them, and no step is marked."""
    marks = []
    monkeypatch.setattr(torch.compiler, "cudagraph_mark_step_begin", lambda: marks.append(1))
    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        run = train(config(tmp_path / "run", compile=True, compile_mode=mode, log_with="none"), progress=False)
    assert compile_modes == [("UNet2DConditionModel", None if mode == "default" else mode)]
    graphs = [str(w.message) for w in said if "CUDA graphs" in str(w.message)]
    if mode == "default":
        assert not graphs
    else:
        assert graphs == ["--compile-mode reduce-overhead: CUDA graphs need a CUDA device; the UNet compiles without them on cpu"]
    assert not marks
    written = tomllib.loads((run.output / "config.toml").read_text())
    assert written["compile"] is True and written.get("compile_mode") == (None if mode == "default" else mode)


def test_under_cuda_graphs_every_call_of_the_unet_begins_a_step_and_accumulated_gradients_are_kept(
        tmp_path, tiny_path, compile_modes, monkeypatch):
    """As on a CUDA device: each call of the compiled UNet, in the loop, the validation loss and the validation grid,
    marks a new CUDA-graph step first, and a micro-batch's gradients, copied out of the graphs' memory before the
    next one's call, add up to the eager run's (the same losses and adapter)."""
    import sdtune.training
    from sdtune import validation

    monkeypatch.setattr(validation, "SAMPLE_STEPS", 2)
    settings = dict(steps=2, gradient_accumulation_steps=3, validate_every=2, validation_images=1, log_with="none")
    eager = train(config(tmp_path / "eager", **settings), progress=False)

    events = []
    monkeypatch.setattr(torch.compiler, "cudagraph_mark_step_begin", lambda: events.append("mark"))
    monkeypatch.setattr(sdtune.training, "records_cuda_graphs", lambda device: True)
    kept = []
    keep_gradients = sdtune.training.keep_gradients

    def keep(parameters):
        kept.append(len(events))
        keep_gradients(parameters)

    monkeypatch.setattr(sdtune.training, "keep_gradients", keep)
    import sdtune.models

    load_pipeline = sdtune.models.load_pipeline

    def calls_recorded(*args, **kwargs):  # every call of the run's UNet, with or without gradients
        pipe = load_pipeline(*args, **kwargs)
        pipe.unet.register_forward_pre_hook(lambda module, inputs: events.append("grad" if torch.is_grad_enabled() else "no-grad"))
        return pipe

    monkeypatch.setattr(sdtune.models, "load_pipeline", calls_recorded)
    run = train(config(tmp_path / "graphs", compile=True, compile_mode="reduce-overhead", **settings), progress=False)

    assert compile_modes == [("UNet2DConditionModel", "reduce-overhead")]
    calls = [event for event in events if event != "mark"]
    assert events == [item for call in calls for item in ("mark", call)]  # a mark before every call
    assert calls.count("grad") == 6 and calls.count("no-grad") > 1  # 2 steps of 3 micro-batches; validation
    first_calls = [index for index, event in enumerate(events) if event == "grad"][::3]
    # after each step's first micro-batch, before its second: the later ones add into the copies in place
    assert kept == [index + 1 for index in first_calls]
    assert [r["loss"] for r in records(run.output)] == [r["loss"] for r in records(eager.output)]
    assert tensors(run.adapter).keys() == tensors(eager.adapter).keys()
    assert all(torch.equal(tensors(run.adapter)[k], tensors(eager.adapter)[k]) for k in tensors(eager.adapter))


def test_cuda_graph_modes_are_those_torch_records_graphs_in():
    from torch._inductor import list_mode_options

    from sdtune.config import COMPILE_MODES, CUDA_GRAPH_COMPILE_MODES

    assert COMPILE_MODES[0] == "default" and set(CUDA_GRAPH_COMPILE_MODES) <= set(COMPILE_MODES)
    assert [m for m in COMPILE_MODES if list_mode_options(m).get("triton.cudagraphs")] == list(CUDA_GRAPH_COMPILE_MODES)


@pytest.mark.parametrize("args,pattern", [
    (("--compile-mode", "reduce-overhead"), "--compile-mode reduce-overhead applies with --compile"),
    (("--no-compile", "--compile-mode", "max-autotune"), "--compile-mode max-autotune applies with --compile"),
    (("--compile", "--compile-mode", "fast"),
     "--compile-mode must be one of default, reduce-overhead, max-autotune, max-autotune-no-cudagraphs, got 'fast'"),
])
def test_a_compile_mode_needs_compile_and_a_known_mode(tmp_path, args, pattern):
    from typer.testing import CliRunner

    from sdtune.cli import app

    result = CliRunner().invoke(app, ["train", "--model", "tiny-random", "--output", str(tmp_path / "run"), *args])
    assert result.exit_code == 2, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines == [f"error: {pattern}"] and "Traceback" not in result.output
    assert not (tmp_path / "run").exists()  # refused before anything is written


def test_compile_mode_from_toml_and_python(tmp_path):
    toml = tmp_path / "run.toml"
    toml.write_text('compile = true\ncompile_mode = "max-autotune-no-cudagraphs"\n')
    loaded = TrainConfig.load(toml)
    assert (loaded.compile, loaded.compile_mode) == (True, "max-autotune-no-cudagraphs")
    written = tmp_path / "written.toml"
    written.write_text(loaded.to_toml())
    assert TrainConfig.load(written) == loaded
    assert "compile_mode" not in TrainConfig(compile=True).to_toml()  # at its default, left out as before it existed
    with pytest.raises(SdtuneError, match=r'^compile_mode="reduce-overhead" applies with compile=True$'):
        TrainConfig(compile_mode="reduce-overhead").validate()
    toml.write_text('compile_mode = "reduce-overhead"\n')
    with pytest.raises(SdtuneError, match="applies with compile"):
        TrainConfig.load(toml)


def test_resuming_in_another_compile_mode_is_named_as_a_difference():
    saved = TrainConfig(compile=True, compile_mode="reduce-overhead").to_dict()
    assert changed_settings(saved, TrainConfig(compile=True)) == "compile_mode: reduce-overhead -> default"
    assert changed_settings(saved, TrainConfig(compile=True, compile_mode="reduce-overhead")) == ""
    assert changed_settings(TrainConfig().to_dict(), TrainConfig(compile=True, compile_mode="max-autotune")) == (
        "compile: False -> True, compile_mode: default -> max-autotune")


def test_loop_benchmark_runs_on_the_tiny_model(tmp_path, tiny_path):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "loop.py"
    spec = importlib.util.spec_from_file_location("loop_benchmark", path)
    loop = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(loop)
    for call in (1, 2):  # a second call into the same --work folder (as gpu.sh makes) has its own runs
        text = loop.main(["--methods", "atoms", "--batches", "2", "--steps", "2", "--warmup", "1", "--work", str(tmp_path)])
        row = next(line for line in text.splitlines() if line.startswith("| atoms | 2 |"))
        whole, bare, floor, *ratios = (float(cell) for cell in row.strip("|").split("|")[2:])
        assert whole > 0 and bare > 0 and floor > 0 and all(r > 0 for r in ratios)
        runs = sorted(tmp_path.glob("*/atoms-batch2"))
        assert len(runs) == call and all([r["step"] for r in records(run)] == [1, 2, 3] for run in runs)


@pytest.mark.parametrize("args,pattern", [
    (["--compile-mode", "reduce-overhead"], "--compile-mode reduce-overhead applies with --compile"),
    (["--compile", "--compile-mode", "fast"], "--compile-mode must be one of default, reduce-overhead"),
])
def test_loop_benchmark_refuses_a_compile_mode_it_would_not_use(args, pattern, capsys):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "loop.py"
    spec = importlib.util.spec_from_file_location("loop_benchmark", path)
    loop = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(loop)
    with pytest.raises(SystemExit) as exit:
        loop.main(args)
    assert exit.value.code == 2 and pattern in capsys.readouterr().err


def test_a_notebooks_train_warns_at_its_own_line_and_leaves_the_libraries_as_they_were(tmp_path):
    """A notebook's `sdtune.train(...)` that warns shows its own cell's line, not training.py's: the warning comes up
    through contextlib and the trainer's setup, and each is skipped. transformers' and diffusers' logging and bars,
    quiet while it ran, are as the notebook set them afterwards."""
    import sys

    import transformers
    from diffusers.utils import logging as diffusers_logging

    import sdtune

    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_info()
    try:
        with pytest.warns(UserWarning, match="no checkpoint in .* yet: starting from step 0") as said:
            line = sys._getframe().f_lineno + 1
            sdtune.train(config(tmp_path / "run", steps=1, resume="latest"))
        assert transformers.logging.get_verbosity() == transformers.logging.INFO
        assert transformers.logging.is_progress_bar_enabled() and diffusers_logging.is_progress_bar_enabled()
    finally:
        transformers.logging.set_verbosity(verbosity)
    warning = next(w for w in said if "no checkpoint" in str(w.message))
    assert (warning.filename, warning.lineno) == (__file__, line)


def test_sdtunes_warnings_reach_code_run_without_a_file():
    """`python -c` and other code without a source file (its module's loader has no source) get sdtune's warnings as
    they get Python's own: the warning is shown at the caller's line, and nothing is raised in its place."""
    import subprocess
    import sys

    code = "from sdtune.errors import warn\nwarn('the warning')\nprint('went on')\n"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stderr[-500:]
    assert result.stdout == "went on\n" and "<string>:2: UserWarning: the warning" in result.stderr


def test_a_kept_run_does_not_keep_its_model(tmp_path, monkeypatch):
    """A notebook that trains run after run and keeps every `Run` keeps one model at most, the one in training: a
    finished run holds what it says (its description, numbers, files), not its UNet; asked for its method, it says
    how to load it back."""
    import gc
    import weakref

    import sdtune.models

    loaded = []
    load_pipeline = sdtune.models.load_pipeline

    def tracked(*args, **kwargs):
        pipe = load_pipeline(*args, **kwargs)
        loaded.append(weakref.ref(pipe.unet))
        return pipe

    monkeypatch.setattr(sdtune.models, "load_pipeline", tracked)
    runs = [train(config(tmp_path / name, method="lora", steps=1), progress=False) for name in ("first", "second")]
    gc.collect()
    assert len(loaded) == 2 and loaded[0]() is None and loaded[1]() is None
    assert runs[0].description.startswith("lora (") and runs[0].description.endswith(" layers")
    assert runs[0].num_parameters > 0
    with pytest.raises(AttributeError, match=r"open_adapter\(run\.adapter, "):
        runs[0].method
