"""Training with two CPU processes (slow: two interpreters start).

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


def two_processes(*train_args: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
               "-m", "sdtune", "train", "--model", "tiny-random", *train_args]
    env = {**os.environ, "ACCELERATE_USE_CPU": "true"}
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=900)


@pytest.mark.slow
def test_two_processes_train_and_write_one_adapter(tmp_path, tiny_path):
    output = tmp_path / "run"
    result = two_processes("--steps", "4", "--checkpoint-every", "2", "--output", str(output))
    assert result.returncode == 0, result.stderr[-2000:]
    records = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert (output / "adapter.safetensors").exists() and (output / "config.toml").exists()
    step_2 = output / "checkpoints" / "step-2"
    assert json.loads((step_2 / "state.json").read_text())["num_processes"] == 2
    assert (step_2 / "random_states_0.pkl").exists() and (step_2 / "random_states_1.pkl").exists()

    expected = (output / "adapter.safetensors").read_bytes()
    again = two_processes("--steps", "4", "--checkpoint-every", "2", "--output", str(output), "--resume", str(step_2))
    assert again.returncode == 0, again.stderr[-2000:]
    assert (output / "adapter.safetensors").read_bytes() == expected
    assert [json.loads(line)["step"] for line in (output / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3, 4]
