"""Nothing on disk is trusted, nothing is lost, nothing stale is left.

Checkpoints are checked before a resume (a damaged one is refused by name, or passed over by
`--resume latest`); a command never writes onto its input nor over an existing output without
`--overwrite`; killed commands leave no temporary for long (SIGTERM is handled as SIGINT, and every
command sweeps the temporaries of the files it writes); a full disk names the file and the room left;
files get the umask's modes; caches heal. Each case checks the exit code, that the error is one line
with no traceback, and that the files that were there are still whole.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from test_cli import assert_one_line_error, invoke

from sdtune.checkpoints import check_checkpoint
from sdtune.config import TrainConfig
from sdtune.errors import SdtuneError
from sdtune.training import train

ROOT = Path(__file__).resolve().parents[1]
SETTINGS = dict(model="tiny-random", steps=4, checkpoint_every=2, keep_checkpoints=2, ema_decay=0.9, seed=3, log_with="none")
TRAIN_ARGS = (
    "--model", "tiny-random", "--steps", 4, "--checkpoint-every", 2, "--keep-checkpoints", 2, "--ema-decay", 0.9,
    "--seed", 3, "--log-with", "none",
)  # fmt: skip


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under `folder`, by relative path, with its bytes."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def leftovers(folder: Path) -> list[str]:
    """Temporaries, staging folders and locks under `folder`."""
    from sdtune.fileio import temporary_target

    return sorted(
        str(p.relative_to(folder)) for p in folder.rglob(".*")
        if temporary_target(p.name) or p.name.endswith((".partial", ".lock"))
    )


@pytest.fixture(scope="module")
def finished(tmp_path_factory, private_cache):
    """A finished 4-step atoms run with an EMA and checkpoints at steps 2 and 4."""
    output = tmp_path_factory.mktemp("finished") / "run"
    train(TrainConfig(output=str(output), **SETTINGS), progress=False)
    return output


@pytest.fixture
def run_copy(finished, tmp_path):
    output = tmp_path / "run"
    shutil.copytree(finished, output)
    return output


# ---------------------------------------------------------------------------------------------
# Checkpoints: every field checked, a damaged one refused by name or passed over


def _edit_state(change):
    def damage(folder: Path) -> None:
        path = folder / "state.json"
        state = json.loads(path.read_text())
        change(state)
        path.write_text(json.dumps(state))

    return damage


def _set(**values):
    return _edit_state(lambda state: state.update(values))


def _edit_tensors(name: str, change):
    def damage(folder: Path) -> None:
        from safetensors import safe_open

        path = folder / name
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata()
        tensors = load_file(str(path))
        change(tensors, metadata)
        save_file(tensors, str(path), metadata=metadata)

    return damage


def _edit_torch(name: str, change):
    def damage(folder: Path) -> None:
        state = torch.load(folder / name, weights_only=True)
        change(state)
        torch.save(state, folder / name)

    return damage


def _truncate(name: str, keep: float = 0.5):
    def damage(folder: Path) -> None:
        path = folder / name
        path.write_bytes(path.read_bytes()[: int(path.stat().st_size * keep)])

    return damage


def _remove(name: str):
    return lambda folder: (folder / name).unlink()


def _renumber(tensors, metadata):
    tensors["00099"] = tensors.pop("00051")


def _set_counters(tensors, metadata):
    counters = json.loads(metadata["counters"])
    metadata["counters"] = json.dumps({**counters, "optimization_step": 3})


# case: (damage of step-4, the file named, what the error says)
DAMAGED_CHECKPOINTS = {
    "step edited to 999": (_set(step=999), "state.json", "step 999 disagrees with the folder's name step-4"),
    "negative step": (_set(step=-2), "state.json", "step is -2, not a whole number of at least 1"),
    "step not a number": (_set(step="four"), "state.json", "step is 'four'"),
    "too few micro-batches": (_set(micro_batches=1), "state.json", "micro_batches is 1, not a whole number of at least 4"),
    "no processes": (_set(num_processes=0), "state.json", "num_processes is 0"),
    "no configuration": (_edit_state(lambda s: s.pop("config")), "state.json", "holds no run configuration"),
    "invalid configuration": (_edit_state(lambda s: s["config"].update(lr=-1.0)), "state.json", "its run configuration is not valid (--lr must be positive"),
    "step past the run's steps": (_edit_state(lambda s: s["config"].update(steps=3)), "state.json", "step 4 is past the run's 3 steps"),
    "another format": (_set(format="other"), "step-4", "is not a complete sdtune checkpoint"),
    "state.json removed": (_remove("state.json"), "step-4", "is not an sdtune checkpoint (no state.json)"),
    "state.json not JSON": (_truncate("state.json"), "state.json", "damaged checkpoint state"),
    "trainable truncated": (_truncate("trainable.safetensors", 0.9), "trainable.safetensors", "not a valid safetensors file"),
    "trainable NaN": (_edit_tensors("trainable.safetensors", lambda t, m: t["00000"].view(-1).__setitem__(0, float("nan"))), "trainable.safetensors", "tensor 0 holds NaN or infinite values"),
    "trainable float64": (_edit_tensors("trainable.safetensors", lambda t, m: t.update({"00000": t["00000"].double()})), "trainable.safetensors", "trained tensors are F32"),
    "trainable tensor missing": (_edit_tensors("trainable.safetensors", lambda t, m: t.pop("00051")), "ema.safetensors", "52 tensors whose shapes differ from the 51 trained ones"),
    "trainable renumbered": (_edit_tensors("trainable.safetensors", _renumber), "trainable.safetensors", "its tensors are not numbered 00000 to 00051"),
    "EMA removed": (_remove("ema.safetensors"), "ema.safetensors", "missing"),
    "EMA counters": (_edit_tensors("ema.safetensors", _set_counters), "ema.safetensors", "the EMA has 3 updates, the checkpoint 4 steps"),
    "optimizer truncated": (_truncate("optimizer.bin"), "optimizer.bin", "unreadable"),
    "optimizer removed": (_remove("optimizer.bin"), "optimizer.bin", "missing"),
    "optimizer moment NaN": (_edit_torch("optimizer.bin", lambda s: s["state"][0]["exp_avg"].view(-1).__setitem__(0, float("nan"))), "optimizer.bin", "exp_avg of parameter 0 holds NaN"),
    "optimizer moment reshaped": (_edit_torch("optimizer.bin", lambda s: s["state"][0].update(exp_avg=s["state"][0]["exp_avg"].flatten())), "optimizer.bin", "exp_avg of parameter 0 has shape (81,)"),
    "optimizer past the step": (_edit_torch("optimizer.bin", lambda s: s["state"][0].update(step=torch.tensor(999.0))), "optimizer.bin", "has taken 999.0 steps, past the checkpoint's 4"),
    "optimizer of fewer parameters": (_edit_torch("optimizer.bin", lambda s: s["param_groups"][0]["params"].pop()), "optimizer.bin", "the state of 51 parameters, the checkpoint trains 52"),
    "schedule behind": (_edit_torch("scheduler.bin", lambda s: s.update(last_epoch=1)), "scheduler.bin", "the learning-rate schedule is at step 1, behind the checkpoint's step 4"),
    "schedule removed": (_remove("scheduler.bin"), "scheduler.bin", "missing"),
    "RNG state truncated": (_truncate("random_states_0.pkl"), "random_states_0.pkl", "unreadable"),
}


@pytest.mark.parametrize("case", list(DAMAGED_CHECKPOINTS))
def test_a_damaged_checkpoint_is_refused_by_name_and_passed_over_by_resume_latest(run_copy, finished, case):
    damage, named, pattern = DAMAGED_CHECKPOINTS[case]
    newest = run_copy / "checkpoints" / "step-4"
    damage(newest)
    before = snapshot(run_copy)

    result = invoke("train", *TRAIN_ARGS, "--output", run_copy, "--resume", newest)
    assert_one_line_error(result, 2, pattern)
    assert named in result.stderr.strip().splitlines()[-1]
    assert snapshot(run_copy) == before, "a refused resume changes nothing"

    with pytest.warns(UserWarning) as record:
        result = invoke("train", *TRAIN_ARGS, "--output", run_copy, "--resume", "latest")
    assert result.exit_code == 0, result.output
    said = [str(w.message) for w in record if "damaged checkpoint" in str(w.message)]
    assert len(said) == 1 and pattern in said[0] and said[0].endswith("resuming from step-2"), said
    assert "(resumed from" in result.stdout and "step-2)" in result.stdout
    for name in ("adapter.safetensors", "adapter-ema.safetensors", "checkpoints/step-4/trainable.safetensors"):
        assert (run_copy / name).read_bytes() == (finished / name).read_bytes(), name
    assert losses(run_copy) == losses(finished)
    check_checkpoint(newest)  # written again, whole
    assert leftovers(run_copy) == []


def losses(output: Path) -> list[tuple]:
    records = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"], r["lr"], r["grad_norm"]) for r in records]


def test_a_checkpoint_of_another_method_or_more_steps_is_refused_by_name(run_copy):
    before = snapshot(run_copy)
    cases = [
        (("--method", "lora"), "checkpoints/step-4 is a checkpoint of --method atoms; this run trains lora: resume with --method atoms"),
        (("--steps", 2), "checkpoints/step-4 has trained 4 steps; --steps 2 asks for fewer: give --steps 4 or more"),
        (("--option", "m=4"), "trainable.safetensors: tensor 0 has shape (9, 3, 3), this run needs (4, 3, 3); resume with the same method options"),
        (("--optimizer", "sgd"), "holds the state of --optimizer adamw; resume with it, not sgd"),
        (("--overwrite",), "give --resume to continue a run or --overwrite to replace it, not both"),
    ]
    for args, pattern in cases:
        result = invoke("train", *TRAIN_ARGS, "--output", run_copy, "--resume", "latest", *args)
        assert_one_line_error(result, 2, pattern)
    assert snapshot(run_copy) == before


def test_no_intact_checkpoint_is_refused(run_copy):
    for step in (2, 4):
        _truncate("optimizer.bin")(run_copy / "checkpoints" / f"step-{step}")
    before = snapshot(run_copy)
    result = invoke("train", *TRAIN_ARGS, "--output", run_copy, "--resume", "latest")
    assert_one_line_error(result, 2, "no intact checkpoint to resume from: ")
    assert "step-4/optimizer.bin: unreadable" in result.stderr and "(and 1 older, also damaged)" in result.stderr
    assert snapshot(run_copy) == before


def test_a_resumed_run_that_asks_for_its_own_steps_trains_nothing_and_keeps_the_adapter(run_copy, finished):
    result = invoke("train", *TRAIN_ARGS, "--output", run_copy, "--resume", "latest")
    assert result.exit_code == 0, result.output
    assert (run_copy / "adapter.safetensors").read_bytes() == (finished / "adapter.safetensors").read_bytes()


# ---------------------------------------------------------------------------------------------
# A fresh run into an earlier run's folder


def test_a_fresh_run_into_a_finished_run_without_checkpoints_is_refused_unless_overwrite(tmp_path, private_cache):
    output = tmp_path / "run"
    assert invoke("train", "--model", "tiny-random", "--steps", 1, "--output", output).exit_code == 0
    (output / "class-images").mkdir()
    (output / "class-images" / "class-0000.png").write_bytes(b"kept")
    (output / "notes.txt").write_text("the user's own")
    before = snapshot(output)
    result = invoke("train", "--model", "tiny-random", "--steps", 2, "--output", output)
    assert_one_line_error(result, 2, f"{output} holds an earlier run (adapter.safetensors, config.toml, metrics.jsonl, logs): add --overwrite")
    assert snapshot(output) == before

    result = invoke("train", "--model", "tiny-random", "--steps", 2, "--output", output, "--overwrite")
    assert result.exit_code == 0, result.output
    assert len((output / "metrics.jsonl").read_text().splitlines()) == 2
    assert len(list((output / "logs").rglob("events.out.tfevents.*"))) == 1, "one run's TensorBoard log, not two"
    assert (output / "notes.txt").read_text() == "the user's own" and (output / "class-images" / "class-0000.png").read_bytes() == b"kept"
    assert "overwrite" not in (output / "config.toml").read_text()


def test_a_fresh_run_over_checkpoints_with_overwrite_starts_again(run_copy):
    result = invoke("train", *TRAIN_ARGS, "--output", run_copy)
    assert_one_line_error(result, 2, "holds checkpoints of an earlier run: add --resume latest to continue it, --overwrite to replace it")
    result = invoke("train", *TRAIN_ARGS[:2], "--steps", 1, "--output", run_copy, "--overwrite")
    assert result.exit_code == 0, result.output
    assert not (run_copy / "checkpoints").exists() and not (run_copy / "adapter-ema.safetensors").exists()


# ---------------------------------------------------------------------------------------------
# Outputs: never the input, never an existing one without --overwrite


def _output_cases(run: Path, tmp: Path) -> dict:
    adapter = run / "adapter.safetensors"
    sample = ("sample", "--adapter", run, "--prompt", "a <castle>", "--num-images", 1, "--steps", 1)
    return {
        "export onto its adapter": (("export", adapter, "--format", "kohya", "--output", adapter), "is where the input"),
        "export onto its adapter, --overwrite": (("export", adapter, "--format", "kohya", "--output", adapter, "--overwrite"), "is where the input"),
        "export onto the run folder": (("export", run, "--format", "kohya", "--output", run, "--overwrite"), "is where the input"),
        "merge onto the run folder": (("merge", run, "--output", run, "--overwrite"), "is where the input"),
        "merge onto its adapter": (("merge", run, "--output", adapter), "is where the input"),
        "sample onto its adapter": ((*sample, "--output", adapter), "is the adapter file"),
        "export over a file": (("export", run, "--format", "kohya", "--output", tmp / "taken.safetensors"), "already exists; give a new path, or --overwrite"),
        "merge over a folder": (("merge", run, "--output", tmp / "taken"), "already exists; give a new path, or --overwrite"),
        "sample over a sample": ((*sample, "--output", tmp / "sampled"), "holds an earlier sample (grid.png and 1 more): add --overwrite"),
    }


@pytest.mark.parametrize("case", list(_output_cases(Path("r"), Path("t"))))
def test_commands_refuse_their_input_and_existing_outputs(finished, tmp_path, case):
    run = tmp_path / "run"
    shutil.copytree(finished, run, ignore=shutil.ignore_patterns("checkpoints"))
    (tmp_path / "taken.safetensors").write_bytes(b"the user's")
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "file").write_bytes(b"the user's")
    (tmp_path / "sampled" / "images").mkdir(parents=True)
    (tmp_path / "sampled" / "grid.png").write_bytes(b"earlier")
    (tmp_path / "sampled" / "images" / "000-seed0.png").write_bytes(b"earlier")
    args, pattern = _output_cases(run, tmp_path)[case]
    before = snapshot(tmp_path)
    assert_one_line_error(invoke(*args), 2, pattern)
    assert snapshot(tmp_path) == before
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize("command", ["export", "merge", "sample"])
def test_overwrite_replaces_an_existing_output(finished, tmp_path, command):
    output = tmp_path / ("out.safetensors" if command == "export" else "out")
    args = {
        "export": ("export", finished, "--format", "kohya", "--output", output),
        "merge": ("merge", finished, "--output", output),
        "sample": ("sample", "--adapter", finished, "--prompt", "a <castle>", "--num-images", 1, "--steps", 1, "--output", output),
    }[command]
    assert invoke(*args).exit_code == 0
    first = snapshot(tmp_path)
    assert_one_line_error(invoke(*args), 2, "--overwrite")
    assert snapshot(tmp_path) == first
    result = invoke(*args, "--overwrite")
    assert result.exit_code == 0, result.output
    assert snapshot(tmp_path).keys() == first.keys() and leftovers(tmp_path) == []


def test_sample_overwrite_leaves_no_image_of_the_earlier_sample(finished, tmp_path):
    output = tmp_path / "sampled"
    args = ("sample", "--adapter", finished, "--prompt", "a <castle>", "--steps", 1, "--output", output)
    assert invoke(*args, "--num-images", 3).exit_code == 0
    (output / "images" / "mine.png").write_bytes(b"the user's")
    assert invoke(*args, "--num-images", 1, "--overwrite").exit_code == 0
    assert sorted(p.name for p in (output / "images").iterdir()) == ["000-seed0.png", "mine.png"]


# ---------------------------------------------------------------------------------------------
# Temporaries: swept on start; SIGTERM and SIGINT clean up


def _stale(path: Path, folder: bool = False) -> Path:
    """A temporary a killed command left an hour ago."""
    if folder:
        path.mkdir()
        (path / "weights.safetensors").write_bytes(b"\0" * 1000)
    else:
        path.write_bytes(b"\0" * 100)
    old = time.time() - 3600
    os.utime(path, (old, old))
    return path


def test_train_sweeps_the_temporaries_a_killed_run_left(run_copy):
    stale = [
        _stale(run_copy / ".adapter.safetensors.4242.1a2b3c4d.tmp"),
        _stale(run_copy / ".adapter-ema.safetensors.abcd_123.tmp"),  # named as before temporaries held a pid
        _stale(run_copy / ".adapter.safetensors.4242.1a2b3c4d.tmp.header"),
        _stale(run_copy / ".config.toml.77.00ff00ff.tmp"),
        _stale(run_copy / ".logs.77.deleting.tmp", folder=True),
        _stale(run_copy / "checkpoints" / ".step-4.77.replaced.tmp", folder=True),
        _stale(run_copy / "checkpoints" / ".step-6.partial", folder=True),
    ]
    kept = [_stale(run_copy / ".notes.txt.77.00ff00ff.tmp"), _stale(run_copy / "notes.tmp")]  # not the run's
    result = invoke("train", *TRAIN_ARGS, "--output", run_copy, "--resume", "latest")
    assert result.exit_code == 0, result.output
    assert not [p for p in stale if p.exists()] and all(p.exists() for p in kept)


def test_merge_and_sample_sweep_their_own_temporaries(finished, tmp_path):
    merged = tmp_path / "merged"
    stale = [_stale(tmp_path / ".merged.4242.1a2b3c4d.tmp", folder=True), _stale(tmp_path / ".merged.abcd_123.tmp", folder=True)]
    kept = _stale(tmp_path / ".other.4242.1a2b3c4d.tmp", folder=True)
    assert invoke("merge", finished, "--output", merged).exit_code == 0
    assert not [p for p in stale if p.exists()] and kept.exists()

    sampled = tmp_path / "sampled"
    (sampled / "images").mkdir(parents=True)
    stale = [_stale(sampled / "images" / ".000-seed0.png.4242.1a2b3c4d.tmp"), _stale(sampled / ".grid.png.abcd_123.tmp")]
    result = invoke("sample", "--adapter", finished, "--prompt", "x", "--num-images", 1, "--steps", 1, "--output", sampled)
    assert result.exit_code == 0, result.output
    assert not [p for p in stale if p.exists()] and leftovers(tmp_path) == [".other.4242.1a2b3c4d.tmp"]


def test_a_live_writers_temporary_is_not_swept(tmp_path):
    from sdtune.fileio import OutputLock, sweep_dead_temporaries

    with OutputLock(tmp_path) as lock:
        fresh = tmp_path / ".adapter.safetensors.1.1a2b3c4d.tmp"
        fresh.write_bytes(b"being written")  # after the lock was taken: the holder's own
        lock.sweep(lambda name: True)
        assert fresh.exists()
    live = tmp_path / f".x.safetensors.{os.getppid()}.1a2b3c4d.tmp"
    live.write_bytes(b"")
    dead = _stale(tmp_path / f".x.safetensors.{_dead_pid()}.1a2b3c4d.tmp")
    sweep_dead_temporaries(tmp_path, lambda name: name == "x.safetensors")
    assert live.exists() and not dead.exists()


def _dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


# Each command runs as its own process and sends itself a signal in the middle of a write.
INTERRUPTED_WRITES = {
    "train, SIGTERM while writing the adapter": ("TERM", "_sort_safetensors_metadata", 2, ("train", "--model", "tiny-random", "--steps", 3, "--save-every", 1, "--output", "{out}")),
    "train, SIGINT while writing a checkpoint": ("INT", "save_safetensors", 3, ("train", "--model", "tiny-random", "--steps", 3, "--checkpoint-every", 1, "--output", "{out}")),
    "merge, SIGTERM while writing the pipeline": ("TERM", "apply_default_modes", 1, ("merge", "{run}", "--output", "{out}")),
    "sample, SIGTERM while writing an image": ("TERM", "make_temp_file", 2, ("sample", "--adapter", "{run}", "--prompt", "x", "--num-images", 3, "--steps", 1, "--output", "{out}")),
}
SIGNAL_DRIVER = """
import os, signal, sys
import sdtune.fileio as fileio
name, call, args = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
original, calls = getattr(fileio, name), []
def interrupted(*a, **k):
    result = original(*a, **k)
    calls.append(1)
    if len(calls) == call:
        os.kill(os.getpid(), getattr(signal, "SIG" + os.environ["SIGNAL"]))
        original(*a, **k)  # the handler runs here, inside the write
    return result
setattr(fileio, name, interrupted)
# as from a terminal: a job started in the background by a non-interactive shell inherits SIGINT ignored
signal.signal(signal.SIGINT, signal.default_int_handler)
sys.argv = ["sdtune", *args]
from sdtune.cli import main
main()
"""


@pytest.mark.parametrize("case", list(INTERRUPTED_WRITES))
def test_sigterm_and_sigint_clean_up_and_say_interrupted(finished, tmp_path, case):
    name, target, call, args = INTERRUPTED_WRITES[case]
    output = tmp_path / "out"
    args = [str(a).format(out=output, run=finished) for a in args]
    env = {**os.environ, "SIGNAL": name, "PYTHONPATH": str(ROOT)}
    result = subprocess.run([sys.executable, "-c", SIGNAL_DRIVER, target, str(call), *args], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert result.returncode == (143 if name == "TERM" else 130), result.stderr[-2000:]
    lines = [line for line in result.stderr.replace("\r", "\n").splitlines() if line.strip() and "/s" not in line and "%|" not in line]
    assert lines[-1:] == ["interrupted"] and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert leftovers(tmp_path) == []


# ---------------------------------------------------------------------------------------------
# Full disks and read-only outputs


class FullDisk(Exception):
    """What safetensors' Rust writer raises when the disk fills."""


def test_a_full_disk_names_the_file_and_the_room_left(tmp_path, monkeypatch, private_cache):
    import safetensors.torch

    real, calls = safetensors.torch.save_file, []

    def fills(tensors, path, metadata=None):
        calls.append(path) if ".adapter.safetensors." in str(path) else None
        if len(calls) > 2:  # the adapters of steps 1 and 2 are written, then the disk is full
            Path(path).write_bytes(b"\0" * 100)
            raise FullDisk("Error while serializing: I/O error: No space left on device (os error 28)")
        return real(tensors, path, metadata=metadata)

    monkeypatch.setattr(safetensors.torch, "save_file", fills)
    output = tmp_path / "run"
    result = invoke("train", "--model", "tiny-random", "--steps", 3, "--save-every", 1, "--output", output)
    assert_one_line_error(result, 1, f"{output / 'adapter.safetensors'}: No space left on device (")
    assert " free in " in result.stderr
    from sdtune.adapter import read_adapter_info

    assert read_adapter_info(output)[0].extra["step"] == "2" and leftovers(output) == []


TENSORBOARD_FILLS_DRIVER = """
import errno, sys
from tensorboard.summary.writer.record_writer import RecordWriter
real, calls, records = RecordWriter.write, [], int(sys.argv[2])
def fills(self, data):  # the record after the first `records` finds the disk full
    calls.append(1)
    if len(calls) > records:
        raise OSError(errno.ENOSPC, "No space left on device")
    return real(self, data)
RecordWriter.write = fills
sys.argv = ["sdtune", "train", "--model", "tiny-random", "--steps", "4", "--log-with", "tensorboard",
            "--tracker-project", "castles", "--output", sys.argv[1]]
from sdtune.cli import main
main()
"""


@pytest.mark.parametrize("records", [0, 3])  # its first event, written as it starts; a later one, from the loop
def test_a_full_disk_under_tensorboard_names_its_log_folder_in_one_line(tmp_path, private_cache, records):
    """TensorBoard writes its events from a thread of its own; a full disk there is said once, by the main thread,
    naming the log folder and the room left: no traceback from the thread (a process of its own: the thread
    prints to the real stderr)."""
    output = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    result = subprocess.run([sys.executable, "-c", TENSORBOARD_FILLS_DRIVER, str(output), str(records)], capture_output=True, text=True,
                            env=env, timeout=300)
    assert result.returncode == 1, result.stderr[-2000:]
    lines = [line for line in result.stderr.replace("\r", "\n").splitlines() if line.strip() and "%|" not in line]
    assert lines[-1].startswith(f"error: {output / 'logs' / 'castles'}: No space left on device ("), result.stderr[-2000:]
    assert "Traceback" not in result.stderr and "Exception in thread" not in result.stderr, result.stderr[-2000:]


def test_a_full_disk_during_a_checkpoint_keeps_the_earlier_ones(tmp_path, monkeypatch, private_cache):
    import sdtune.fileio
    from accelerate import Accelerator

    real, calls = Accelerator.save_state, []

    def fills(self, folder, **kwargs):
        calls.append(folder)
        if len(calls) == 2:  # torch's zip writer says only this when the disk is full
            (Path(folder) / "optimizer.bin").write_bytes(b"\0" * 100)
            monkeypatch.setattr(sdtune.fileio, "free_bytes", lambda folder: 0)
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")
        return real(self, folder, **kwargs)

    monkeypatch.setattr(Accelerator, "save_state", fills)
    output = tmp_path / "run"
    result = invoke("train", "--model", "tiny-random", "--steps", 3, "--checkpoint-every", 1, "--output", output)
    assert_one_line_error(result, 1, f"{output / 'checkpoints' / 'step-2'}: No space left on device (0 bytes free in ")
    from sdtune.checkpoints import check_checkpoint, list_checkpoints

    assert [step for step, _ in list_checkpoints(output)] == [1]
    check_checkpoint(output / "checkpoints" / "step-1")
    assert leftovers(output) == []


def test_a_full_disk_during_a_merge_names_the_output(finished, tmp_path, monkeypatch):
    from diffusers import StableDiffusionPipeline

    def fills(self, folder, **kwargs):
        (Path(folder) / "unet").mkdir()
        (Path(folder) / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"\0" * 100)
        raise FullDisk("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(StableDiffusionPipeline, "save_pretrained", fills)
    result = invoke("merge", finished, "--output", tmp_path / "merged")
    assert_one_line_error(result, 1, f"{tmp_path / 'merged'}: No space left on device (")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("command", ["export", "merge", "train", "sample"])
def test_a_read_only_output_is_exit_2_naming_the_output(finished, tmp_path, monkeypatch, command):
    import sdtune.fileio

    def read_only(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(sdtune.fileio.tempfile, "TemporaryFile", read_only)
    output = tmp_path / ("out.safetensors" if command == "export" else "out")
    args = {
        "export": ("export", finished, "--format", "kohya", "--output", output),
        "merge": ("merge", finished, "--output", output),
        "train": ("train", "--model", "tiny-random", "--output", output),
        "sample": ("sample", "--model", "tiny-random", "--prompt", "x", "--output", output),
    }[command]
    expected = f"cannot write --output {output}" if command in ("export", "merge") else f"cannot write to output folder {output}"
    result = invoke(*args)
    assert_one_line_error(result, 2, expected)
    assert result.stderr.rstrip().endswith(": Permission denied")


# ---------------------------------------------------------------------------------------------
# Modes follow the umask


def test_files_and_folders_get_the_umask_s_modes(tmp_path, private_cache):
    previous = os.umask(0o027)
    try:
        run = tmp_path / "run"
        assert invoke("train", "--model", "tiny-random", "--steps", 2, "--checkpoint-every", 1, "--output", run).exit_code == 0
        assert invoke("export", run, "--format", "kohya", "--output", tmp_path / "kohya.safetensors").exit_code == 0
        assert invoke("merge", run, "--output", tmp_path / "merged").exit_code == 0
        sample = ("sample", "--adapter", run, "--prompt", "x", "--num-images", 1, "--steps", 1)
        assert invoke(*sample, "--output", tmp_path / "sampled").exit_code == 0
    finally:
        os.umask(previous)
    modes = {str(p.relative_to(tmp_path)): p.stat().st_mode & 0o777 for p in tmp_path.rglob("*")}
    wrong = {name: oct(mode) for name, mode in modes.items() if mode != (0o750 if (tmp_path / name).is_dir() else 0o640)}
    assert wrong == {} and len(modes) > 30


# ---------------------------------------------------------------------------------------------
# Caches heal


@pytest.fixture
def own_cache(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    monkeypatch.setenv("SDTUNE_CACHE", str(cache))
    return cache


def _flip_a_body_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    (length,) = struct.unpack("<Q", data[:8])
    data[8 + length + 5] ^= 0x10
    path.write_bytes(bytes(data))


def _nan_first_value(path: Path) -> None:
    data = bytearray(path.read_bytes())
    (length,) = struct.unpack("<Q", data[:8])
    data[8 + length : 12 + length] = struct.pack("<f", float("nan"))
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage,reason", [(_nan_first_value, "NaN or infinite values"), (_flip_a_body_byte, "its bytes are not those written")])
def test_a_damaged_cached_decomposition_is_rebuilt(own_cache, tmp_path, damage, reason):
    args = ("train", "--model", "tiny-random", "--steps", 1, "--log-with", "none")
    assert invoke(*args, "--output", tmp_path / "a").exit_code == 0
    (entry,) = (own_cache / "decompositions").glob("*.safetensors")
    damage(entry)
    with pytest.warns(UserWarning, match=rf"cached decomposition .* is damaged \({reason}\): rebuilt"):
        result = invoke(*args, "--output", tmp_path / "b")
    assert result.exit_code == 0, result.output
    assert (tmp_path / "a" / "adapter.safetensors").read_bytes() == (tmp_path / "b" / "adapter.safetensors").read_bytes()
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        assert invoke(*args, "--output", tmp_path / "c").exit_code == 0
    assert not [w for w in record if "damaged" in str(w.message)], "healed: no warning the next time"


@pytest.mark.parametrize("damage,reason", [
    (lambda folder: (folder / "model_index.json").unlink(), "no model_index.json"),
    (lambda folder: _flip_a_body_byte(folder / "unet" / "diffusion_pytorch_model.safetensors"), "unet/diffusion_pytorch_model.safetensors is not the file written"),
    (lambda folder: shutil.rmtree(folder / "vae"), "vae/config.json is missing"),
])  # fmt: skip
def test_a_damaged_cached_tiny_model_is_rebuilt(own_cache, damage, reason):
    from sdtune.models import load_pipeline, tiny_random_path

    folder = tiny_random_path()
    intact = snapshot(folder)
    damage(folder)
    with pytest.warns(UserWarning, match=rf"cached model .* is damaged \({reason}\): rebuilt"):
        assert tiny_random_path() == folder
    assert snapshot(folder) == intact and leftovers(own_cache) == []
    load_pipeline("tiny-random")


def test_a_damaged_cached_demo_image_is_drawn_again(own_cache):
    from sdtune.demo_images import demo_concept_folder

    folder = demo_concept_folder("castle")
    intact = snapshot(folder)
    path = folder / "castle-03.png"
    path.write_bytes(path.read_bytes()[:2000])
    with pytest.warns(UserWarning, match=r"cached demo image .*castle-03.png is damaged \(.*\): drawn again"):
        demo_concept_folder("castle")
    assert snapshot(folder) == intact


def test_a_damaged_class_image_is_drawn_again(tmp_path):
    from sdtune.prior import _whole_class_image

    path = tmp_path / "class-0000.png"
    Image.new("RGB", (64, 64), "red").save(path)
    assert _whole_class_image(path)
    path.write_bytes(path.read_bytes()[:60])
    with pytest.warns(UserWarning, match="class image .* is damaged"):
        assert not _whole_class_image(path)


# ---------------------------------------------------------------------------------------------
# Smaller ones


@pytest.fixture(scope="module")
def kohya_with_a_stray_key(finished, tmp_path_factory):
    from sdtune.export import export_adapter

    path = tmp_path_factory.mktemp("kohya") / "stray.safetensors"
    export_adapter(finished, "kohya", path)
    tensors = load_file(str(path))
    tensors["stray"] = torch.zeros(2)
    save_file(tensors, str(path))
    return path


def _bad_input_cases(run: Path, tmp: Path, stray: Path) -> dict:
    return {
        "atoms m above k²": (("train", "--model", "tiny-random", "--option", "m=10"), "--atoms-m 10 is more atoms than any tuned layer has (9 for 3x3 convolutions); give --atoms-m 9 or less"),
        "atoms m above the linear blocks": (("train", "--model", "tiny-random", "-o", "linear=true", "--atoms-m", 17), "(16 for 4x4 blocks of the attention projections, 9 for 3x3 convolutions)"),
        "an empty strength": (("sample", "--adapter", run, "--prompt", "x", "--adapter-scale", "0,,1"), "--adapter-scale takes numbers separated by commas, got '0,,1'"),
        "--images a file": (("train", "--model", "tiny-random", "--images", run / "config.toml"), "config.toml is a file, not a folder of images"),
        "--steps ten": (("train", "--steps", "ten"), "Invalid value for '--steps'"),
        "an unknown flag": (("train", "--stepz", 3), "No such option: --stepz"),
        "a missing option": (("export", run), "Missing option '--format'"),
        "a kohya file with a stray key": (("sample", "--adapter", stray, "--model", "tiny-random", "--prompt", "x"), "key 'stray' is not a kohya-format key"),
    }


@pytest.mark.parametrize("case", list(_bad_input_cases(Path("r"), Path("t"), Path("s"))))
def test_bad_input_is_one_line_exit_2(finished, tmp_path, kohya_with_a_stray_key, case):
    args, pattern = _bad_input_cases(finished, tmp_path, kohya_with_a_stray_key)[case]
    result = invoke(*args, "--output", tmp_path / "out") if args[0] == "train" else invoke(*args)
    assert_one_line_error(result, 2, pattern)
    assert "╭" not in result.output and "Usage:" not in result.output


def test_atoms_m_up_to_the_linear_blocks_is_accepted(tiny_pipe):
    from sdtune import methods

    method = methods.create("atoms", m=16, linear=True)
    method.inject(tiny_pipe.unet)
    assert {tuple(layer.atoms.shape)[0] for layer in method.layers.values()} == {9, 16}


def test_an_unreadable_images_folder_is_one_line_exit_2(tmp_path, monkeypatch):
    folder = tmp_path / "images"
    folder.mkdir()
    Image.new("RGB", (64, 64)).save(folder / "a.png")
    if os.geteuid() == 0:  # root reads a chmod-000 folder: make it fail as it does for others
        real = Path.iterdir

        def denied(self):
            if self == folder:
                raise PermissionError(13, "Permission denied", str(self))
            return real(self)

        monkeypatch.setattr(Path, "iterdir", denied)
    folder.chmod(0)
    try:
        result = invoke("train", "--model", "tiny-random", "--images", folder, "--output", tmp_path / "out")
    finally:
        folder.chmod(0o755)
    assert_one_line_error(result, 2, f"cannot read image folder {folder}: Permission denied")


def test_a_batch_larger_than_the_images_says_so(tmp_path, private_cache):
    with pytest.warns(UserWarning, match="--batch-size 1000000 is more than the 8 training images: each step trains on 8"):
        result = invoke("train", "--model", "tiny-random", "--steps", 1, "--batch-size", 1000000, "--output", tmp_path / "run")
    assert result.exit_code == 0, result.output


def test_validation_images_past_the_image_count_say_so():
    from sdtune.validation import hold_out

    paths = [Path(f"{i}.png") for i in range(8)]
    with pytest.warns(UserWarning, match=r"--validation-images 50 is not fewer than the 8 images \(at least 3 must stay\)"):
        assert hold_out(paths, 50, 0) == (paths, [])
    with pytest.warns(UserWarning, match="--validation-images 6 would leave 2 of 8 images to train on"):
        hold_out(paths, 6, 0)


@pytest.mark.filterwarnings("ignore:invalid value encountered in cast:RuntimeWarning")  # the black images
def test_an_adapter_of_absurd_values_warns(finished, tmp_path):
    tensors = load_file(str(finished / "adapter.safetensors"))
    from safetensors import safe_open

    with safe_open(str(finished / "adapter.safetensors"), framework="pt") as handle:
        metadata = handle.metadata()
    key = sorted(tensors)[0]
    tensors[key] = torch.full_like(tensors[key], 1e30)
    absurd = tmp_path / "absurd.safetensors"
    save_file(tensors, str(absurd), metadata=metadata)
    with pytest.warns(UserWarning, match=rf"tensor {key} holds values up to 1e\+30, far beyond a trained update's"):
        result = invoke("sample", "--adapter", absurd, "--prompt", "x", "--num-images", 1, "--steps", 1, "--output", tmp_path / "out")
    assert result.exit_code == 0, result.output


def test_merge_says_nothing_about_float32(finished, tmp_path):
    import logging

    said = []
    handler = logging.Handler()
    handler.emit = said.append
    logger = logging.getLogger("diffusers")
    logger.addHandler(handler)
    try:
        result = invoke("merge", finished, "--output", tmp_path / "merged")
    finally:
        logger.removeHandler(handler)
    assert result.exit_code == 0, result.output
    assert not [record.getMessage() for record in said if record.levelno >= logging.WARNING]


def test_gif_images_give_their_first_frame(tmp_path):
    from sdtune.data import list_images, load_images

    frames = [Image.new("RGB", (64, 64), color) for color in ("red", "blue")]
    frames[0].save(tmp_path / "anim.gif", save_all=True, append_images=frames[1:])
    Image.new("RGB", (64, 64), "green").save(tmp_path / "still.png")
    assert [p.name for p in list_images(tmp_path)] == ["anim.gif", "still.png"]
    with pytest.warns(UserWarning, match="anim.gif has 2 frames: the first is used"):
        first, _ = load_images(list_images(tmp_path), 64)
    assert first.getpixel((10, 10))[0] > 200 and first.getpixel((10, 10))[2] < 50


def test_library_refuses_resuming_with_fewer_steps(run_copy):
    with pytest.raises(SdtuneError, match="has trained 4 steps"):
        train(TrainConfig(output=str(run_copy), resume="latest", **{**SETTINGS, "steps": 3}), progress=False)
