"""Training and sampling with two CPU processes.

The processes are started by `torchrun` with ACCELERATE_USE_CPU=true, which Accelerate turns into a
two-process gloo group; `accelerate launch --cpu --num_processes 2` starts a single process in
accelerate 1.15, so it would not test anything shared between processes.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def two_processes(command: str, *args: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
               "-m", "sdtune", command, "--model", "tiny-random", *args]
    env = {**os.environ, "ACCELERATE_USE_CPU": "true"}
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=900)


def test_two_processes_train_and_write_one_adapter(tmp_path, tiny_path):
    output = tmp_path / "run"
    result = two_processes("train", "--steps", "4", "--checkpoint-every", "2", "--output", str(output))
    assert result.returncode == 0, result.stderr[-2000:]
    records = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert (output / "adapter.safetensors").exists() and (output / "config.toml").exists()
    step_2 = output / "checkpoints" / "step-2"
    assert json.loads((step_2 / "state.json").read_text())["num_processes"] == 2
    assert (step_2 / "random_states_0.pkl").exists() and (step_2 / "random_states_1.pkl").exists()

    expected = (output / "adapter.safetensors").read_bytes()
    again = two_processes("train", "--steps", "4", "--checkpoint-every", "2", "--output", str(output), "--resume", str(step_2))
    assert again.returncode == 0, again.stderr[-2000:]
    assert (output / "adapter.safetensors").read_bytes() == expected
    assert [json.loads(line)["step"] for line in (output / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3, 4]


def test_two_processes_share_the_prompts_and_draw_what_one_process_draws(tmp_path, tiny_path):
    from typer.testing import CliRunner

    from sdtune.cli import app
    from sdtune.sampling import IMAGES_PER_CALL

    # Four images a prompt: four prompts a batch, so six prompts make two batches, one per process.
    texts = ["a <castle>", "the <castle> at dawn", "a red <castle>", "a <castle> by the sea", "a tiny <castle>", "a <castle> in snow"]
    assert IMAGES_PER_CALL // 4 == 4
    prompts = [arg for text in texts for arg in ("--prompt", text)]
    args = [*prompts, "--num-images", "4", "--steps", "2", "--token", "sks castle"]
    one = CliRunner().invoke(app, ["sample", "--model", "tiny-random", *args, "--output", str(tmp_path / "one")])
    assert one.exit_code == 0, one.output
    two = two_processes("sample", *args, "--output", str(tmp_path / "two"))
    assert two.returncode == 0, two.stderr[-2000:]
    assert two.stdout.count("wrote 24 images") == 1  # only the main process reports
    # the main process's bar counts its own batch of four prompts; the other process drew the rest
    assert "4/4" in two.stderr and "6/6" not in two.stderr

    names = sorted(path.name for path in (tmp_path / "one" / "images").iterdir())
    assert names == sorted(path.name for path in (tmp_path / "two" / "images").iterdir())
    assert len(names) == 24
    for name in names:
        assert (tmp_path / "one" / "images" / name).read_bytes() == (tmp_path / "two" / "images" / name).read_bytes(), name
    assert (tmp_path / "one" / "grid.png").read_bytes() == (tmp_path / "two" / "grid.png").read_bytes()


@pytest.mark.slow  # 10-35 s on two cores; `make test-all` runs it
def test_two_processes_train_a_text_encoder_whose_last_layers_clip_skip_leaves_unread(tmp_path, tiny_path):
    """With --clip-skip 2 the text encoder's last layer never reaches the conditioning, so its trained layers get no
    gradient: DDP must not wait for them. They stay at their start, the read layer trains, and the run resumes exactly."""
    from safetensors import safe_open

    output = tmp_path / "run"
    args = ["--steps", "4", "--checkpoint-every", "2", "--method", "lora", "--train-text-encoder", "--clip-skip", "2",
            "--output", str(output)]
    result = two_processes("train", *args)
    assert result.returncode == 0, result.stderr[-2000:]
    with safe_open(str(output / "adapter.safetensors"), framework="pt") as adapter:
        moved = {name.split(".layers.")[1].split(".")[0] for name in adapter.keys()
                 if name.startswith("text_encoder.") and "lora_B" in name and adapter.get_tensor(name).abs().max() > 0}
    assert moved == {"0"}  # tiny-random's encoder has 2 layers; clip skip 2 reads the first's output

    expected = (output / "adapter.safetensors").read_bytes()
    again = two_processes("train", *args, "--resume", str(output / "checkpoints" / "step-2"))
    assert again.returncode == 0, again.stderr[-2000:]
    assert (output / "adapter.safetensors").read_bytes() == expected
