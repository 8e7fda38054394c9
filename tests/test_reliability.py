"""Runs that survive kills, NaNs, a second run into the same folder and an unwritable folder."""

from __future__ import annotations

import importlib.util
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors import safe_open
from typer.testing import CliRunner

from sdtune.cli import app
from sdtune.config import TrainConfig
from sdtune.fileio import LOCK_FILE, OutputLock
from sdtune.training import train

REPO = Path(__file__).resolve().parent.parent


def invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def one_line_error(result, code: int) -> str:
    assert result.exit_code == code, (result.exit_code, result.output)
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in result.output, result.stderr
    return errors[0]


def faults_benchmark():
    spec = importlib.util.spec_from_file_location("faults", REPO / "benchmarks" / "faults.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_second_run_into_a_locked_folder_refuses(tmp_path, tiny_path):
    output = tmp_path / "run"
    output.mkdir()
    with OutputLock(output):  # an open lock of its own, as a running process holds it
        error = one_line_error(invoke("train", "--model", "tiny", "--steps", 1, "--output", output), 2)
    assert f"output folder {output} is in use by another sdtune run (pid {os.getpid()}" in error
    assert not (output / "metrics.jsonl").exists() and not (output / LOCK_FILE).exists()


def test_stale_lock_of_a_dead_process_is_taken_over(tmp_path, tiny_path):
    output = tmp_path / "run"
    output.mkdir()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (output / LOCK_FILE).write_text(f"{dead.pid} somewhere\n")
    result = invoke("train", "--model", "tiny", "--steps", 1, "--output", output)
    assert result.exit_code == 0, result.output
    assert not (output / LOCK_FILE).exists()


def test_without_flock_the_lock_checks_the_pid(tmp_path, monkeypatch):
    import sdtune.fileio
    from sdtune.errors import SdtuneError

    def no_flock(fd):
        raise OSError(37, "No locks available")

    monkeypatch.setattr(sdtune.fileio, "_try_flock", no_flock)
    host = sdtune.fileio._hostname()
    (tmp_path / LOCK_FILE).write_text(f"{os.getppid()} {host}\n")  # a live process
    with pytest.raises(SdtuneError, match=f"pid {os.getppid()} on {host}"):
        OutputLock(tmp_path).acquire()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / LOCK_FILE).write_text(f"{dead.pid} {host}\n")
    with OutputLock(tmp_path):
        assert (tmp_path / LOCK_FILE).read_text().split()[0] == str(os.getpid())
    assert not (tmp_path / LOCK_FILE).exists()


def test_unwritable_output_fails_before_training(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    error = one_line_error(invoke("train", "--model", "tiny", "--output", blocker / "run"), 2)
    assert f"cannot write to output folder {blocker / 'run'}" in error


def test_nan_stops_naming_the_step_and_keeps_the_last_good_checkpoint(tmp_path, tiny_path):
    output = tmp_path / "nan"
    args = ("--steps", 8, "--lr", "1e30", "--checkpoint-every", 1, "--keep-checkpoints", 10, "--output", output)
    error = one_line_error(invoke("train", "--model", "tiny", *args), 1)
    step = int(error.split("at step ")[1].split(";")[0])
    assert step > 1 and ("is nan" in error or "is inf" in error or "not finite" in error)
    saved = sorted(int(p.name.split("-")[1]) for p in (output / "checkpoints").iterdir())
    assert saved == list(range(1, step))  # nothing of the failing step or later
    with safe_open(str(output / "adapter.safetensors"), framework="pt") as handle:
        assert int(handle.metadata()["step"]) == step - 1
    assert not [p for p in output.rglob("*") if p.name.startswith(".")]


def test_kill_9_during_training_then_resume_gives_the_same_adapter(tmp_path, tiny_path):
    faults = faults_benchmark()
    steps, reference, output = 6, tmp_path / "uninterrupted", tmp_path / "killed"
    settings = dict(
        model="tiny", seed=7, lr_scheduler="cosine", lr_warmup_steps=2, ema_decay=0.9, steps=steps, checkpoint_every=2
    )
    assert faults.TRAIN_ARGS == [
        "--model", "tiny", "--seed", "7", "--lr-scheduler", "cosine", "--lr-warmup-steps", "2", "--ema-decay", "0.9"
    ]
    train(TrainConfig(output=str(reference), **settings), progress=False)

    process = faults.start(faults.train_command(output, steps, "--checkpoint-every", "2"), tmp_path / "log")
    deadline = time.time() + 600
    while not (output / "checkpoints" / "step-2").exists() and process.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    os.kill(process.pid, signal.SIGKILL)  # right after the first checkpoint: mid-way through step 3
    process.wait()
    assert process.returncode == -signal.SIGKILL, (tmp_path / "log").read_text()[-2000:]
    assert faults.problems_after_kill(output, 2, steps) == []
    assert (output / LOCK_FILE).exists()  # the killed run's lock, taken over below

    run = train(TrainConfig(output=str(output), resume="latest", **settings), progress=False)
    assert run.resumed_from is not None
    for name in faults.ADAPTERS:
        assert (output / name).read_bytes() == (reference / name).read_bytes(), name
    assert faults.losses(output) == faults.losses(reference)


@pytest.mark.slow
def test_fault_benchmark_three_random_kills(tmp_path, tiny_path):
    summary = faults_benchmark().main(["--trials", "3", "--steps", "6", "--work", str(tmp_path)])
    assert summary == "3 trials, 3 recovered, 0 lost"
