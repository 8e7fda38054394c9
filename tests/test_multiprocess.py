"""Training under `accelerate launch` with two CPU processes (slow: two interpreters start)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest


@pytest.mark.slow
def test_two_processes_train_and_write_one_adapter(tmp_path, tiny_path):
    launcher = shutil.which("accelerate", path=os.path.dirname(sys.executable))
    assert launcher, "accelerate's launcher is installed beside the interpreter"
    output = tmp_path / "run"
    result = subprocess.run(
        [launcher, "launch", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
         "--dynamo_backend", "no", "--cpu", "-m", "sdtune", "train", "--model", "tiny-random", "--steps", "4",
         "--output", str(output)],
        capture_output=True, text=True, env=dict(os.environ), timeout=600,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    records = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert (output / "adapter.safetensors").exists() and (output / "config.toml").exists()
