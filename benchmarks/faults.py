"""Fault injection: training runs and commands killed, disks filled, files corrupted must lose nothing.

Every trial runs `sdtune` (the embedded tiny model with random weights, `--model tiny-random`) as its own
process, with its own cache folder, and checks afterwards that nothing was lost, that no temporary file is
left, and that any error is one line. The kinds of fault (`--faults`, comma-separated, or `all`):

- `kill`: `sdtune train --checkpoint-every K` (K drawn from 1..5) gets SIGKILL, SIGTERM or SIGINT at a
  random moment of its training (once its metrics show a random number of finished steps, after a uniform
  delay of up to one step's time, checkpoint included). SIGTERM and SIGINT must end it with exit code 143 or
  130 and the one line "interrupted", leaving no temporary; after any signal the adapter is absent (killed
  before the first save) or a complete adapter of a saved step, every `checkpoints/step-N` folder is
  complete, and `--resume latest` finishes with the same adapter bytes (raw and EMA) and the same per-step
  losses as one uninterrupted run, leaving no temporary and no lock.
- `corrupt`: a finished run's newest checkpoint is damaged in one of `DAMAGES`' ways (state.json edited,
  a file truncated, removed or holding NaN). Resuming it by name must be refused in one line naming the
  file (exit 2); `--resume latest` must fall back to the checkpoint before it, with one warning line, and
  end with the uninterrupted run's adapter bytes and losses.
- `cache`: an entry of sdtune's cache is damaged (`CACHE_DAMAGES`: the filter-atom decomposition, the
  tiny-random model, a demo image); a fresh run must rebuild it with one warning line and train the
  uninterrupted run's adapter.
- `fill` (needs root, for a small tmpfs): the run folder's disk is filled by another process at a random
  moment of training. The run must stop with exit code 1 and one line naming the file and the room left,
  keep its last adapter and checkpoints whole, leave no temporary, and, once there is room again,
  `--resume latest` must end with the uninterrupted run's adapter.
- `commands`: `sdtune merge` or `sdtune sample` gets SIGKILL, SIGTERM or SIGINT at a random moment; run
  again (with `--overwrite` where the first one finished), it must leave a complete output and no
  temporary (SIGTERM and SIGINT: none already after the signal).
- `lines`: `sdtune train --checkpoint-every K`, `merge`, `sample`, `export --format kohya`, `evaluate`, `compare`,
  `extract` or a two-run `sweep` gets SIGTERM or SIGINT as it runs a line of sdtune's or Accelerate's code, drawn
  uniformly from the distinct lines an uninterrupted run of the same command executes once it enters the command's
  module (set-up, loop, saves, validation, the end; found by a trace function), at a uniformly drawn one of the times
  it runs that line. Moments too short for a timed signal to hit (a tracker starting, a file being renamed, a lock
  just taken) are drawn as often as any. Checked as `kill` (train) and `commands` (merge, sample, export: run again,
  a complete output) are; each trial names its line. The commands users run at experiment scale read copies of the
  uninterrupted training run, tiny random CLIP and DINO models (every metric runs, offline) and a plan of two
  four-step runs (atoms, LoRA) that are trained, sampled and measured; run again (extract with `--overwrite` where
  its output exists; evaluate and compare rewrite theirs, a sweep resumes), each must write what its uninterrupted
  run wrote: evaluate's eval.json and samples, compare's table, plots and grid, extract's LoRA and summary, a sweep's
  adapters, losses, samples, eval.json, run markers and report (timings, the report's date and paths of the trial's
  folder aside). Right after the signal, an extract's LoRA and summary are both there or neither, every image and
  JSON file is whole, and a sweep's runs have whole checkpoints and none is marked failed. `--commands` picks the
  commands drawn; `--at FILE:LINE[:N]` signals at a given line (its Nth run) instead, to find a window again.

    python benchmarks/faults.py --trials 20                  # kills of training runs
    python benchmarks/faults.py --faults all --trials 5      # five trials of each kind
    python benchmarks/faults.py --faults lines --commands evaluate,sweep --trials 10 --steps 4
    python benchmarks/faults.py --faults lines --commands extract --at sdtune/extraction.py:200 --trials 1

prints one line per trial, then "N trials, N recovered, 0 lost".
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# Settings whose state crosses steps, so an inexact resume would show in the bytes.
TRAIN_ARGS = ["--model", "tiny-random", "--seed", "7", "--lr-scheduler", "cosine", "--lr-warmup-steps", "2", "--ema-decay", "0.9",
              "--validate-every", "3"]
ADAPTERS = ("adapter.safetensors", "adapter-ema.safetensors")
SIGNALS = {"KILL": signal.SIGKILL, "TERM": signal.SIGTERM, "INT": signal.SIGINT}
INTERRUPTED_CODES = {signal.SIGTERM: 143, signal.SIGINT: 130}
FAULTS = ("kill", "corrupt", "cache", "fill", "commands", "lines")


def train_command(output: Path, steps: int, *extra: str) -> list[str]:
    return [sys.executable, "-m", "sdtune", "train", *TRAIN_ARGS, "--steps", str(steps), "--output", str(output), *extra]


REPO = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}


def start(command: list[str], log: Path, env: dict | None = None) -> subprocess.Popen:
    with open(log, "w") as handle:  # the child keeps its own copy of the descriptor
        return subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT, env=env or ENV)


def wait_for_training(process: subprocess.Popen, output: Path) -> float:
    """Wait until the run has begun training (its metrics file exists); returns that moment."""
    while not (output / "metrics.jsonl").exists() and process.poll() is None:
        time.sleep(0.02)
    return time.perf_counter()


def run(command: list[str], env: dict | None = None) -> subprocess.CompletedProcess:
    result = subprocess.run(command, capture_output=True, text=True, env=env or ENV)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed: {result.stderr.strip().splitlines()[-1:]}")
    return result


def losses(output: Path) -> list[tuple]:
    lines = (output / "metrics.jsonl").read_text().splitlines()
    return [(r["step"], r["loss"], r["lr"], r["grad_norm"]) for r in map(json.loads, lines)]


def losses_so_far(output: Path) -> list[str]:
    return [line for line in (output / "metrics.jsonl").read_text().splitlines() if line.endswith("}")]


def messages(text: str) -> list[str]:
    """The lines a command said, without its progress bars."""
    lines = [line.strip() for chunk in text.splitlines() for line in chunk.split("\r")]
    return [line for line in lines if line and "it/s]" not in line and "step/s" not in line and "prompt/s" not in line
            and not line.startswith(("train ", "sample", "class images"))]


def one_line(text: str, prefix: str, *needles: str) -> str | None:
    """What is wrong with a command's output that should end in one `prefix` line holding `needles`."""
    said = messages(text)
    if "Traceback" in text:
        return "a traceback"
    found = [line for line in said if line.startswith(prefix)]
    if len(found) != 1:
        return f"{len(found)} '{prefix}' lines: {said[-3:]}"
    missing = [needle for needle in needles if needle not in found[0]]
    return f"'{found[0]}' lacks {missing}" if missing else None


def leftovers(*folders: Path) -> list[str]:
    """Temporaries, staging folders and locks left under `folders`."""
    from sdtune.fileio import temporary_target

    found = []
    for folder in folders:
        if folder.is_dir():
            for path in folder.rglob(".*"):
                if temporary_target(path.name) or path.name.endswith((".partial", ".lock")):
                    found.append(str(path.relative_to(folder)))
    return sorted(found)


def interrupted_problems(name: str, code: int, log: Path, folder: Path) -> list[str]:
    """What is wrong after SIG`name` interrupted a command: its exit code, its message (one line) and what it left."""
    found = []
    if code != INTERRUPTED_CODES[SIGNALS[name]]:
        found.append(f"exit code {code} after SIG{name}")
    problem = one_line(log.read_text(), "interrupted")
    if problem:
        found.append(f"after SIG{name}: {problem}")
    if leftovers(folder):
        found.append(f"left after SIG{name}: {', '.join(leftovers(folder))}")
    return found


def problems_after_kill(output: Path, checkpoint_every: int, steps: int, ema: bool = True) -> list[str]:
    """What is wrong with a killed run's folder (trained with an EMA unless `ema` is False): truncated or
    half-written files under their final names."""
    from safetensors import safe_open

    from sdtune.adapter import read_adapter
    from sdtune.checkpoints import EMA_FILE, TRAINABLE_FILE, check_checkpoint, list_checkpoints
    from sdtune.errors import SdtuneError

    found = []
    for name in ADAPTERS:
        path = output / name
        if not path.exists():
            continue
        try:
            info, _ = read_adapter(path)
        except SdtuneError as error:
            found.append(f"{name}: {error}")
            continue
        step = int(info.extra["step"])
        if step % checkpoint_every and step != steps:  # adapters are written at checkpoints and at the end
            found.append(f"{name} is of step {step}, neither a checkpoint step nor the last")
    for step, folder in list_checkpoints(output):
        try:
            state = check_checkpoint(folder).state
            assert state["step"] == step, f"state.json says step {state['step']}"
            for name in (TRAINABLE_FILE, EMA_FILE) if ema else (TRAINABLE_FILE,):
                with safe_open(str(folder / name), framework="pt") as handle:
                    [handle.get_tensor(key) for key in handle.keys()]
            for name in ("optimizer.bin", "scheduler.bin"):
                assert (folder / name).stat().st_size > 0, f"{name} is empty"
        except Exception as error:  # any unreadable file is a loss
            found.append(f"{folder.name}: {str(error)[:160]}")
    return found


def same_as_reference(output: Path, reference: Path) -> list[str]:
    found = [f"{name} differs from the uninterrupted run's" for name in ADAPTERS
             if (output / name).read_bytes() != (reference / name).read_bytes()]
    if losses(output) != losses(reference):
        found.append("metrics differ from the uninterrupted run's")
    return found


# ---------------------------------------------------------------------------------------------
# kill: signals during training


def finished_run(output: Path, steps: int) -> bool:
    """Whether a run wrote its last adapter (a signal after that lands on the exiting interpreter)."""
    from safetensors import safe_open

    try:
        with safe_open(str(output / ADAPTERS[0]), framework="pt") as handle:
            return handle.metadata()["step"] == str(steps)
    except Exception:
        return False


def trial(work: Path, index: int, rng: random.Random, steps: int, reference: Path, step_seconds: float) -> tuple[bool, str]:
    checkpoint_every = rng.randint(1, 5)
    name = rng.choice(list(SIGNALS))
    output = work / f"trial-{index:02d}"
    log = work / f"trial-{index:02d}.log"
    shutil.rmtree(output, ignore_errors=True)
    command = train_command(output, steps, "--checkpoint-every", str(checkpoint_every))
    process = start(command, log)
    began = wait_for_training(process, output)
    # a random moment: during a random step (its compute, or the checkpoint and adapter writes before it)
    logged = rng.randrange(steps)
    while len(losses_so_far(output)) < logged and process.poll() is None:
        time.sleep(0.005)
    time.sleep(rng.uniform(0, step_seconds))
    delay = time.perf_counter() - began
    killed = process.poll() is None
    if killed:
        os.kill(process.pid, SIGNALS[name])
    code = process.wait()
    root = output / "checkpoints"
    staging = sorted(p.name for p in root.iterdir() if p.name.startswith(".")) if root.is_dir() else []
    saved = [p.name for p in sorted(root.iterdir())] if root.is_dir() else []
    found = problems_after_kill(output, checkpoint_every, steps)
    finished = code == 0 or (code == -SIGNALS[name] and finished_run(output, steps))
    if killed and name != "KILL" and not finished:  # it may have finished between the check and the signal
        found += interrupted_problems(name, code, log, output)
    run(train_command(output, steps, "--checkpoint-every", str(checkpoint_every), "--resume", "latest"))
    found += same_as_reference(output, reference)
    if leftovers(output):
        found.append(f"left after the resume: {', '.join(leftovers(output))}")
    moment = f"SIG{name} {delay:.2f} s into training" if killed else "finished before the signal"
    hit = f", mid-write of {', '.join(staging)}" if staging else ""
    detail = f"checkpoint every {checkpoint_every}, {moment}{hit}; checkpoints then: {', '.join(saved) or 'none'}"
    return not found, detail + ("" if not found else "; LOST: " + "; ".join(found))


# ---------------------------------------------------------------------------------------------
# corrupt: a damaged checkpoint


def _edit_state(**changes):
    def damage(folder: Path) -> str:
        path = folder / "state.json"
        state = json.loads(path.read_text())
        state.update(changes)
        path.write_text(json.dumps(state))
        return "state.json"

    return damage


def _truncate(name: str, keep: float = 0.5):
    def damage(folder: Path) -> str:
        path = folder / name
        path.write_bytes(path.read_bytes()[: int(path.stat().st_size * keep)])
        return name

    return damage


def _remove(name: str):
    def damage(folder: Path) -> str:
        (folder / name).unlink()
        return name

    return damage


def _nan_tensor(name: str):
    def damage(folder: Path) -> str:
        path = folder / name
        data = bytearray(path.read_bytes())
        (length,) = struct.unpack("<Q", data[:8])
        data[8 + length : 8 + length + 4] = struct.pack("<f", float("nan"))  # the first value of the first tensor
        path.write_bytes(bytes(data))
        return name

    return damage


def _nan_optimizer(folder: Path) -> str:
    import torch

    path = folder / "optimizer.bin"
    state = torch.load(path, weights_only=True)
    state["state"][0]["exp_avg"].view(-1)[0] = float("nan")
    torch.save(state, path)
    return "optimizer.bin"


DAMAGES = {
    "step edited to 999": _edit_state(step=999),
    "negative step": _edit_state(step=-2),
    "micro-batches edited": _edit_state(micro_batches=0),
    "state.json truncated": _truncate("state.json"),
    "optimizer.bin truncated": _truncate("optimizer.bin"),
    "optimizer.bin removed": _remove("optimizer.bin"),
    "optimizer moment NaN": _nan_optimizer,
    "scheduler.bin truncated": _truncate("scheduler.bin", 0.9),
    "trainable.safetensors truncated": _truncate("trainable.safetensors", 0.9),
    "trainable tensor NaN": _nan_tensor("trainable.safetensors"),
    "ema.safetensors removed": _remove("ema.safetensors"),
    "RNG state truncated": _truncate("random_states_0.pkl"),
}


def corrupt_trial(work: Path, index: int, rng: random.Random, steps: int, reference: Path) -> tuple[bool, str]:
    kind = rng.choice(sorted(DAMAGES))
    output = work / f"corrupt-{index:02d}"
    shutil.rmtree(output, ignore_errors=True)
    shutil.copytree(reference, output)
    newest = output / "checkpoints" / f"step-{steps}"
    damaged = DAMAGES[kind](newest)
    found = []
    named = subprocess.run(train_command(output, steps, "--checkpoint-every", "1", "--resume", str(newest)),
                           capture_output=True, text=True, env=ENV)
    if named.returncode != 2:
        found.append(f"resuming it by name: exit code {named.returncode}")
    problem = one_line(named.stderr, "error: ", damaged, str(newest))
    if problem:
        found.append(f"resuming it by name: {problem}")
    latest = subprocess.run(train_command(output, steps, "--checkpoint-every", "1", "--resume", "latest"),
                            capture_output=True, text=True, env=ENV)
    if latest.returncode != 0:
        found.append(f"--resume latest: exit code {latest.returncode}: {messages(latest.stderr)[-1:]}")
    else:
        problem = one_line(latest.stderr, "warning: damaged checkpoint", damaged, f"resuming from step-{steps - 1}")
        if problem:
            found.append(f"--resume latest: {problem}")
        found += same_as_reference(output, reference)
        found += [f"after the resume: {p}" for p in problems_after_kill(output, 1, steps)]
    if leftovers(output):
        found.append(f"left: {', '.join(leftovers(output))}")
    return not found, f"step-{steps}: {kind}" + ("" if not found else "; LOST: " + "; ".join(found))


# ---------------------------------------------------------------------------------------------
# cache: a damaged cache entry


def _damage_decomposition(cache: Path, rng: random.Random) -> str:
    path = sorted((cache / "decompositions").glob("*.safetensors"))[0]
    _nan_tensor(path.name)(path.parent) if rng.random() < 0.5 else _flip_body_byte(path, rng)
    return "cached decomposition"


def _flip_body_byte(path: Path, rng: random.Random) -> None:
    data = bytearray(path.read_bytes())
    (length,) = struct.unpack("<Q", data[:8])
    position = rng.randrange(8 + length, len(data))
    data[position] ^= 0x10
    path.write_bytes(bytes(data))


def _damage_model(cache: Path, rng: random.Random) -> str:
    folder = next((cache / "models").glob("tiny-v*"))
    if rng.random() < 0.5:
        (folder / "model_index.json").unlink()
    else:
        _flip_body_byte(folder / "unet" / "diffusion_pytorch_model.safetensors", rng)
    return "cached model"


def _damage_demo_image(cache: Path, rng: random.Random) -> str:
    path = rng.choice(sorted((cache / "concepts").glob("*/*.png")))
    path.write_bytes(path.read_bytes()[: rng.randrange(20, path.stat().st_size - 100)])
    return "cached demo image"


CACHE_DAMAGES = {"decomposition": _damage_decomposition, "tiny model": _damage_model, "demo image": _damage_demo_image}


def cache_trial(work: Path, index: int, rng: random.Random, steps: int, reference: Path) -> tuple[bool, str]:
    kind = rng.choice(sorted(CACHE_DAMAGES))
    cache, output = work / f"cache-{index:02d}-cache", work / f"cache-{index:02d}"
    for stale in (cache, output):
        shutil.rmtree(stale, ignore_errors=True)
    shutil.copytree(work / "cache", cache)
    what = CACHE_DAMAGES[kind](cache, rng)
    result = subprocess.run(train_command(output, steps, "--checkpoint-every", "1"), capture_output=True, text=True,
                            env={**ENV, "SDTUNE_CACHE": str(cache)})
    found = []
    if result.returncode != 0:
        found.append(f"exit code {result.returncode}: {messages(result.stderr)[-1:]}")
    else:
        problem = one_line(result.stderr, f"warning: {what}", "damaged")
        if problem:
            found.append(problem)
        found += same_as_reference(output, reference)
    if leftovers(output, cache):
        found.append(f"left: {', '.join(leftovers(output, cache))}")
    return not found, f"{kind}" + ("" if not found else "; LOST: " + "; ".join(found))


# ---------------------------------------------------------------------------------------------
# fill: the disk fills during training


def can_mount_tmpfs(folder: Path) -> bool:
    folder.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0 or shutil.which("mount") is None:
        return False
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(folder)], capture_output=True).returncode == 0
    if mounted:
        subprocess.run(["umount", str(folder)], check=True)
    return mounted


def fill_trial(work: Path, index: int, rng: random.Random, steps: int, reference: Path) -> tuple[bool, str]:
    checkpoint_every = rng.randint(1, 3)
    disk, moved = work / f"fill-{index:02d}-disk", work / f"fill-{index:02d}"
    shutil.rmtree(moved, ignore_errors=True)
    disk.mkdir(exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(disk)], check=True)
    try:
        output, log = disk / "run", work / f"fill-{index:02d}.log"
        process = start(train_command(output, steps, "--checkpoint-every", str(checkpoint_every)), log)
        wait_for_training(process, output)
        logged = rng.randrange(steps)
        while len(losses_so_far(output)) < logged and process.poll() is None:
            time.sleep(0.005)
        with open(disk / "filler", "wb", buffering=0) as filler:  # another program takes all the room left
            try:
                while True:
                    filler.write(b"\0" * 4096)
                    filler.flush()
            except OSError:
                pass
        code = process.wait()
        found = []
        if code not in (0, 1):
            found.append(f"exit code {code}")
        if code == 1:
            problem = one_line(log.read_text(), "error: ", "No space left on device", "free in")
            if problem:
                found.append(problem)
        found += problems_after_kill(output, checkpoint_every, steps)
        if leftovers(output):
            found.append(f"left after the full disk: {', '.join(leftovers(output))}")
        said = [line for line in messages(log.read_text()) if line.startswith("error: ")]
        (disk / "filler").unlink()
        shutil.copytree(output, moved)  # resumed where there is room
    finally:
        subprocess.run(["umount", str(disk)], check=False)
    run(train_command(moved, steps, "--checkpoint-every", str(checkpoint_every), "--resume", "latest"))
    found += same_as_reference(moved, reference)
    detail = f"checkpoint every {checkpoint_every}, filled after {logged} steps: {said[0] if said else 'finished first'}"
    return not found, detail + ("" if not found else "; LOST: " + "; ".join(found))


# ---------------------------------------------------------------------------------------------
# commands: merge and sample killed


def command_args(kind: str, reference: Path, output: Path) -> list[str]:
    """The command of `kind` (merge, export, sample; in `lines` trials also evaluate, compare, extract, sweep),
    reading the uninterrupted training run `reference` or the inputs made from it (`prepare_inputs`)."""
    sdtune = [sys.executable, "-m", "sdtune"]
    inputs = inputs_of(reference)
    if kind == "merge":
        return [*sdtune, "merge", str(reference), "--output", str(output)]
    if kind == "export":
        return [*sdtune, "export", str(reference), "--format", "kohya", "--output", str(output)]
    if kind == "extract":
        return [*sdtune, "extract", str(reference), "--rank", "4", "--output", str(output)]
    if kind == "evaluate":  # the run is a copy in the trial's folder (`prepare_output`): eval.json goes there
        return [*sdtune, "evaluate", "--run", str(output), "--num-images", "2", "--steps", "2", *metric_model_args(inputs)]
    if kind == "compare":
        return [*sdtune, "compare", str(inputs / "measured"), str(inputs / "plain"), "--steps", "2", "--output", str(output)]
    if kind == "sweep":
        return [*sdtune, "sweep", str(inputs / "plan.toml"), "--output", str(output)]
    return [*sdtune, "sample", "--adapter", str(reference), "--prompt", "a <castle>",
            "--prompt", "a <castle> in the snow", "--num-images", "8", "--steps", "4", "--output", str(output)]


def complete_output(kind: str, output: Path) -> list[str]:
    from PIL import Image

    from sdtune.models import cached_model_problem

    if kind == "merge":
        if not (output / "sdtune_merge.json").is_file():
            return ["no sdtune_merge.json"]
        problem = cached_model_problem(output)
        return [problem] if problem else []
    if kind in ("export", "extract"):
        from safetensors import safe_open

        found = [] if kind == "export" or summary_of(output).is_file() else [f"no {summary_of(output).name}"]
        try:
            with safe_open(str(output), framework="pt") as handle:
                return found + ([] if [handle.get_tensor(key) for key in handle.keys()] else ["an empty kohya file"])
        except Exception as error:  # any unreadable file is a loss
            return found + [f"{output.name}: {str(error)[:160]}"]
    found = []
    images = sorted((output / "images").glob("*.png"))
    if len(images) != 16:
        found.append(f"{len(images)} images of 16")
    for path in images + [output / "grid.png"]:
        try:
            with Image.open(path) as image:
                image.load()
        except Exception as error:
            found.append(f"{path.name}: {error}")
    return found


def problems_run_again(kind: str, reference: Path, output: Path, expected: dict | None = None) -> list[str]:
    """Run an interrupted command again (`--overwrite` where the first one's output exists and the command refuses
    it; evaluate, compare and sweep rewrite or resume theirs): what is wrong then. `expected`: the uninterrupted
    command's output (`output_contents`), which the new kinds must give again."""
    exists = output.exists() or (kind == "extract" and summary_of(output).exists())
    again = command_args(kind, reference, output) + (["--overwrite"] if exists and kind in OVERWRITTEN else [])
    result = subprocess.run(again, capture_output=True, text=True, env=ENV)
    found = [] if result.returncode == 0 else [f"run again: exit code {result.returncode}: {messages(result.stderr)[-1:]}"]
    if expected is None:
        return found + complete_output(kind, output)
    return found + differences(output_contents(kind, output), expected)


OVERWRITTEN = ("merge", "export", "extract", "sample")  # commands that refuse an existing output without --overwrite


# ---------------------------------------------------------------------------------------------
# the commands users run at experiment scale: evaluate, compare, extract, sweep

SWEEP_STEPS, SWEEP_CHECKPOINT_EVERY = 4, 2


def metric_model_args(inputs: Path) -> list[str]:
    """Tiny random CLIP and DINO (made by `make_metric_models`): every metric runs, offline; FID and KID on DINO features."""
    return ["--clip-model", str(inputs / "clip"), "--dino-model", str(inputs / "dino"), "--fid-features", "dino"]


def inputs_of(reference: Path) -> Path:
    return reference.parent / "inputs"


def summary_of(output: Path) -> Path:
    """`sdtune extract`'s per-layer summary beside its LoRA file."""
    return output.with_name(output.stem + ".extract.json")


def make_metric_models(folder: Path) -> None:
    """A tiny random CLIP (with the tiny model's BPE tokenizer) and a tiny ViT as DINO, saved as model folders."""
    import torch
    from transformers import (CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer, ViTConfig,
                              ViTImageProcessor, ViTModel)

    from sdtune.models import _tiny_tokenizer_files

    vocab, merges = _tiny_tokenizer_files()
    tokenizer = CLIPTokenizer(vocab=vocab, merges=merges)
    tokenizer.model_max_length = 77
    text = dict(vocab_size=len(vocab), hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                max_position_embeddings=77, bos_token_id=vocab["<|startoftext|>"], eos_token_id=vocab["<|endoftext|>"],
                pad_token_id=vocab["<|endoftext|>"])
    vision = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4, image_size=32, patch_size=8)
    torch.manual_seed(0)
    CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)).save_pretrained(folder / "clip")
    image_processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(folder / "clip")
    ViTModel(ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37, image_size=32,
                       patch_size=8), add_pooling_layer=False).save_pretrained(folder / "dino")
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(folder / "dino")


RUN_COPY = ("adapter.safetensors", "config.toml", "metrics.jsonl")  # what evaluate and compare read of a run


def copy_run(reference: Path, folder: Path) -> None:
    folder.mkdir(parents=True)
    for name in RUN_COPY:
        shutil.copy2(reference / name, folder / name)


def prepare_inputs(reference: Path) -> Path:
    """What evaluate, compare and sweep read, made once per campaign: the metric models, two copies of the
    uninterrupted training run (one measured by `sdtune evaluate`) and a two-run sweep plan."""
    inputs = inputs_of(reference)
    if (inputs / "plan.toml").is_file():
        return inputs
    shutil.rmtree(inputs, ignore_errors=True)
    inputs.mkdir()
    make_metric_models(inputs)
    copy_run(reference, inputs / "plain")
    copy_run(reference, inputs / "measured")
    run(command_args("evaluate", reference, inputs / "measured"))
    models = dict(zip(("clip_model", "dino_model", "fid_features"), metric_model_args(inputs)[1::2]))
    plan = f"""name = "faults"
description = "Two short runs on the tiny model with random weights, trained, sampled and measured."
metrics = "standard"

[train]
model = "tiny-random"
steps = {SWEEP_STEPS}
checkpoint_every = {SWEEP_CHECKPOINT_EVERY}
seed = 7

[axes]
method = ["atoms", {{ name = "lora-r2", method = "lora", options = {{ rank = 2 }} }}]

[sample]
prompt = ["a <castle>"]
num_images = 2
steps = 2

[evaluate]
{chr(10).join(f'{key} = "{value}"' for key, value in models.items())}
"""
    (inputs / "plan.toml").write_text(plan)
    return inputs


def prepare_output(kind: str, reference: Path, output: Path) -> None:
    """What a command's output holds before it runs: evaluate measures (and writes into) its own copy of the run."""
    if kind == "evaluate":
        copy_run(reference, output)


def _png(path, folder: Path) -> tuple:
    """An image (a path or a file object) as what it shows and says (its text chunks name the folder it was drawn in)."""
    from PIL import Image

    with Image.open(path) as image:
        text = {key: value.replace(str(folder), "FOLDER") for key, value in image.text.items()}
        return image.mode, image.size, image.tobytes(), text


def _without_column(rows: list[list[str]], column: str) -> list[list[str]]:
    if not rows or column not in rows[0]:
        return rows
    index = rows[0].index(column)
    return [row[:index] + row[index + 1:] for row in rows]


def _steady(name: str, text: str, folder: Path) -> object:
    """A text file's content without what differs between two uninterrupted runs: timings and the moment written."""
    import base64
    import csv
    import hashlib
    import io
    import re
    import tomllib

    if name == "sweep-run.json":  # the run's times: this invocation's, and its training's over every invocation
        return {key: value for key, value in json.loads(text).items() if key not in ("seconds", "train_seconds")}
    if name == "config.toml":  # a resumed run's config names its resume
        from sdtune.training import RUN_CONTROL

        return {key: value for key, value in tomllib.loads(text).items() if key not in RUN_CONTROL}
    if name == "comparison.csv":
        return _without_column(list(csv.reader(io.StringIO(text))), "train_seconds_per_step")
    if name == "comparison.md":  # the s/step column, found by its title (the columns before it depend on the runs)
        rows = [[cell.strip() for cell in line.strip().strip("|").split("|")] if line.startswith("|") else line
                for line in text.splitlines()]
        header = next((row for row in rows if isinstance(row, list)), [])
        if "s/step" not in header:
            return rows
        column = header.index("s/step")
        return [row[:column] + row[column + 1:] if isinstance(row, list) else row for row in rows]
    if name == "index.html":  # the sweep report: when written, the total training time, the s/step and train time cells
        text = re.sub(r"Written [^<]*? from", "Written from", text)
        text = re.sub(r"<p>Training took [^<]*? in all,", "<p>Training took in all,", text)
        text = re.sub(r"data:image/png;base64,([A-Za-z0-9+/=]+)",  # sampled images name their run's folder
                      lambda match: hashlib.sha256(repr(_png(io.BytesIO(base64.b64decode(match.group(1))), folder)).encode()).hexdigest(),
                      text)
        keys = re.findall(r'<th class="sortable" data-key="([^"]+)"', text)
        timed = {keys.index(key) for key in ("train_seconds_per_step", "train_seconds") if key in keys}
        if timed:

            def steady_row(match: re.Match) -> str:
                cells = re.findall(r"<td.*?</td>", match.group(0))
                return "".join(cell for column, cell in enumerate(cells) if column not in timed)

            text = re.sub(r"<tr class=[^>]*>.*?</tr>", steady_row, text)
        return text
    return text


# files that differ between two uninterrupted runs, compared otherwise: timings (losses compares metrics.jsonl),
# TensorBoard's events (wall times), checkpoints (the resumed run's differ in what is kept of the states)
UNSTEADY = ("metrics.jsonl", "logs", "checkpoints")


def output_contents(kind: str, output: Path) -> dict[str, object]:
    """What a command wrote, as two uninterrupted runs of it agree on: every file under its output (an extract's
    LoRA file and summary), paths of the trial's folder as FOLDER, images decoded, the losses of training runs."""
    folder = output.parent
    files = [output, summary_of(output)] if kind == "extract" else sorted(p for p in output.rglob("*") if p.is_file())
    contents: dict[str, object] = {}
    for path in files:
        relative = path.relative_to(folder)
        if not path.is_file() or any(part.startswith(".") for part in relative.parts) or (kind == "evaluate" and path.name in RUN_COPY):
            continue
        if any(part in UNSTEADY for part in relative.parts):
            if path.name == "metrics.jsonl":
                contents[str(relative)] = losses(path.parent)
            continue
        if path.suffix == ".png":
            contents[str(relative)] = _png(path, folder)
        elif path.suffix in (".json", ".md", ".csv", ".html", ".toml", ".txt"):
            contents[str(relative)] = _steady(path.name, path.read_text(encoding="utf-8").replace(str(folder), "FOLDER"), folder)
        else:
            contents[str(relative)] = path.read_bytes()
    return contents


def differences(found: dict, expected: dict) -> list[str]:
    missing = sorted(set(expected) - set(found))
    extra = sorted(set(found) - set(expected))
    changed = sorted(name for name in set(found) & set(expected) if found[name] != expected[name])
    return ([f"missing {', '.join(missing)}"] if missing else []) + ([f"not in the uninterrupted output: {', '.join(extra)}"] if extra else []) \
        + ([f"differs from the uninterrupted output: {', '.join(changed)}"] if changed else [])


def problems_after_interrupt(kind: str, output: Path) -> list[str]:
    """What an interrupted evaluate, compare, extract or sweep must not leave: half an output, a broken file, a
    damaged run, or a run marked failed by the interrupt."""
    from PIL import Image

    found = []
    if kind == "extract" and output.exists() != summary_of(output).exists():
        found.append(f"{output.name if output.exists() else summary_of(output).name} without "
                     f"{summary_of(output).name if output.exists() else output.name}")
    if kind in ("evaluate", "compare", "sweep") and output.is_dir():
        for path in output.rglob("*"):
            try:
                if path.suffix == ".png" and not path.name.startswith("."):
                    with Image.open(path) as image:
                        image.load()
                elif path.suffix == ".json" and not path.name.startswith("."):
                    json.loads(path.read_text())
            except Exception as error:  # any unreadable file is a loss
                found.append(f"{path.relative_to(output)}: {str(error)[:160]}")
    if kind == "sweep":
        from sdtune.sweep import read_marker

        for run_folder in sorted((output / "runs").glob("*")):
            found += [f"{run_folder.name}: {problem}" for problem in
                      problems_after_kill(run_folder, SWEEP_CHECKPOINT_EVERY, SWEEP_STEPS, ema=False)]
            marker = read_marker(run_folder) or {}
            if marker.get("state") == "failed":
                found.append(f"{run_folder.name} marked failed: {marker.get('error')}")
    return found


def lock_of(kind: str, output: Path) -> Path:
    """The lock a command holds while it works (taken once its imports are done)."""
    return output.parent / f".{output.name}.sdtune.lock" if kind == "merge" else output / ".sdtune.lock"


def command_trial(work: Path, index: int, rng: random.Random, reference: Path, seconds: dict) -> tuple[bool, str]:
    kind = rng.choice(["merge", "sample"])
    name = rng.choice(list(SIGNALS))
    folder = work / f"command-{index:02d}"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir()
    output, log = folder / "out", work / f"command-{index:02d}.log"
    process = start(command_args(kind, reference, output), log)
    while not lock_of(kind, output).exists() and process.poll() is None:
        time.sleep(0.005)
    delay = rng.uniform(0, seconds[kind])
    time.sleep(delay)
    killed = process.poll() is None
    if killed:
        os.kill(process.pid, SIGNALS[name])
    code = process.wait()
    found = []
    if killed and name != "KILL" and code != 0 and not (code == -SIGNALS[name] and not complete_output(kind, output)):
        found += interrupted_problems(name, code, log, folder)
    found += problems_run_again(kind, reference, output)
    if leftovers(folder):
        found.append(f"left after running again: {', '.join(leftovers(folder))}")
    moment = f"SIG{name} {delay:.2f} s into its work" if killed else "finished before the signal"
    return not found, f"{kind}, {moment}" + ("" if not found else "; LOST: " + "; ".join(found))


def working_seconds(kind: str, reference: Path, output: Path) -> float:
    """How long a command works once it holds its lock."""
    process = start(command_args(kind, reference, output), output.parent / f"{kind}.log")
    while not lock_of(kind, output).exists() and process.poll() is None:
        time.sleep(0.005)
    began = time.perf_counter()
    if process.wait() != 0:
        raise RuntimeError(f"sdtune {kind} failed; see {output.parent / f'{kind}.log'}")
    return time.perf_counter() - began


# ---------------------------------------------------------------------------------------------
# lines: a signal at a chosen line of sdtune's code

# Runs `sdtune ARGS` tracing the lines of sdtune's and Accelerate's files that the main thread executes once it has
# entered sdtune/ENTRY (the command's module, `LINE_ENTRIES`). With AT ("sdtune/file.py:line") and NTH > 0 it sends itself SIG`SIGNAL` as it runs
# that line for the NTH time; with AT = "-" it writes, at exit, how often it ran each line to the JSON file WHERE.
LINE_DRIVER = """
import atexit, json, os, signal, sys
entry, at, nth, where, name, args = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4], sys.argv[5], sys.argv[6:]
import accelerate, sdtune
roots = {os.path.dirname(module.__file__) + os.sep: module.__name__ + "/" for module in (sdtune, accelerate)}
entry = os.path.dirname(sdtune.__file__) + os.sep + entry
shown, counts, entered = {}, {}, [False]

def line(frame, event, arg):
    if event == "line":
        key = shown[frame.f_code.co_filename] + ":" + str(frame.f_lineno)
        counts[key] = counts.get(key, 0) + 1
        if key == at and counts[key] == nth:
            sys.settrace(None)
            frame.f_trace = None
            os.kill(os.getpid(), getattr(signal, "SIG" + name))
            return None
    return line

def call(frame, event, arg):
    filename = frame.f_code.co_filename
    if filename not in shown:
        root = next((root for root in roots if filename.startswith(root)), None)
        shown[filename] = roots[root] + filename[len(root):] if root else None
    if filename == entry:
        entered[0] = True
    return line if entered[0] and shown[filename] else None

if at == "-":
    atexit.register(lambda: open(where, "w").write(json.dumps(counts)))
sys.settrace(call)
# as from a terminal: a job started in the background by a non-interactive shell inherits SIGINT ignored
signal.signal(signal.SIGINT, signal.default_int_handler)
sys.argv = ["sdtune", *args]
from sdtune.cli import main
main()
"""


LINE_ENTRIES = {"train": "training.py", "merge": "merging.py", "sample": "sampling.py", "export": "export.py",
                "evaluate": "evaluation.py", "compare": "comparison.py", "extract": "extraction.py", "sweep": "sweep.py"}
# the commands whose uninterrupted output a trial's must equal once run again (`output_contents`)
MEASURED = ("evaluate", "compare", "extract", "sweep")


def line_command(kind: str, at: str, nth: int, where: Path, name: str, output: Path, reference: Path, steps: int,
                 checkpoint_every: int) -> list[str]:
    """`sdtune train` (checkpointing every `checkpoint_every` steps) or another command of `reference` under the driver."""
    command = (train_command(output, steps, "--checkpoint-every", str(checkpoint_every)) if kind == "train"
               else command_args(kind, reference, output))
    return [sys.executable, "-c", LINE_DRIVER, LINE_ENTRIES[kind], at, str(nth), str(where), name, *command[3:]]


def command_output(folder: Path, kind: str) -> Path:
    return folder / ("out.safetensors" if kind in ("export", "extract") else "out")


def counted_lines(work: Path, kind: str, reference: Path, steps: int, checkpoint_every: int, counts: dict) -> dict[str, int]:
    """How often an uninterrupted command runs each line of sdtune and Accelerate from its entry into its module
    (kept in `counts`, with, for the MEASURED commands, what that run wrote: `counts[kind, "output"]`)."""
    key = (kind, checkpoint_every if kind == "train" else None)
    if key not in counts:
        if kind in MEASURED:
            prepare_inputs(reference)
        output, where = command_output(work / f"line-count-{kind}", kind), work / f"line-count-{kind}.json"
        shutil.rmtree(output.parent, ignore_errors=True)
        output.parent.mkdir(parents=True)
        prepare_output(kind, reference, output)
        run(line_command(kind, "-", 0, where, "TERM", output, reference, steps, checkpoint_every))
        counts[key] = json.loads(where.read_text())
        if kind in MEASURED:
            counts[kind, "output"] = output_contents(kind, output)
    return counts[key]


def line_trial(work: Path, index: int, rng: random.Random, steps: int, reference: Path, counts: dict,
               commands: tuple[str, ...] = tuple(LINE_ENTRIES), line: str | None = None) -> tuple[bool, str]:
    """One signal at a line drawn uniformly (or at `line`, FILE:LINE or FILE:LINE:N, its Nth run: a window found again)."""
    kind = rng.choice(list(commands))
    checkpoint_every = rng.randint(1, 5)
    name = rng.choice(["TERM", "INT"])
    ran = counted_lines(work, kind, reference, steps, checkpoint_every, counts)
    at = rng.choice(sorted(ran))  # every line alike, however often it runs
    nth = rng.randint(1, ran[at])
    if line is not None:
        filename, number, *given = line.split(":")
        at, nth = f"{filename}:{number}", int(given[0]) if given else 1
        if at not in ran:
            raise RuntimeError(f"--at {line}: an uninterrupted {kind} does not run {at}")
    folder, log = work / f"line-{index:02d}", work / f"line-{index:02d}.log"
    output = command_output(folder, kind)
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir()
    prepare_output(kind, reference, output)
    with open(log, "w") as handle:
        command = line_command(kind, at, nth, log.with_suffix(".json"), name, output, reference, steps, checkpoint_every)
        code = subprocess.run(command, stdout=handle, stderr=subprocess.STDOUT, env=ENV).returncode
    found = []
    if code != 0:  # 0: the signal came on a line after the last the command needed, or the line ran fewer times
        found += interrupted_problems(name, code, log, folder)
    if kind in MEASURED:
        found += [f"after SIG{name}: {problem}" for problem in problems_after_interrupt(kind, output)]
    if kind == "train":
        found += problems_after_kill(output, checkpoint_every, steps)
        run(train_command(output, steps, "--checkpoint-every", str(checkpoint_every), "--resume", "latest"))
        found += same_as_reference(output, reference)
    else:
        found += problems_run_again(kind, reference, output, counts.get((kind, "output")))
    if leftovers(folder):
        found.append(f"left after {'the resume' if kind == 'train' else 'running again'}: {', '.join(leftovers(folder))}")
    setting = f"train, checkpoint every {checkpoint_every}" if kind == "train" else kind
    detail = f"{setting}, SIG{name} at {at} (run {nth} of {ran[at]} times)" + ("" if code else ", finished")
    return not found, detail + ("" if not found else "; LOST: " + "; ".join(found))


# ---------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> str:
    # Started in the background by a non-interactive shell, this process (and so every sdtune it starts)
    # would ignore SIGINT; a caught signal is reset to its default in the children, as from a terminal.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=20, help="trials of each kind of fault")
    parser.add_argument("--faults", default="kill", help=f"comma-separated: {', '.join(FAULTS)}, or all")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0, help="seed of the fault schedule")
    parser.add_argument("--work", type=Path, default=None, help="folder for the runs (default: a temporary one)")
    parser.add_argument("--commands", default=",".join(LINE_ENTRIES),
                        help=f"the commands `lines` trials draw from, comma-separated: {', '.join(LINE_ENTRIES)}")
    parser.add_argument("--at", default=None, help="`lines` trials signal at this line (FILE:LINE, or FILE:LINE:N for its Nth run) "
                                                  "instead of a drawn one: a window found again")
    args = parser.parse_args(argv)
    commands = tuple(args.commands.split(","))
    if sorted(set(commands) - set(LINE_ENTRIES)) or not commands:
        parser.error(f"--commands {args.commands}: choose from {', '.join(LINE_ENTRIES)}")
    if args.at and (len(args.at.split(":")) not in (2, 3) or not all(part.isdigit() for part in args.at.split(":")[1:])):
        parser.error(f"--at {args.at}: give FILE:LINE or FILE:LINE:N, as trials name them (sdtune/fileio.py:523)")
    faults = FAULTS if args.faults == "all" else tuple(args.faults.split(","))
    unknown = sorted(set(faults) - set(FAULTS))
    if unknown:
        parser.error(f"unknown fault kind(s) {', '.join(unknown)}; choose from {', '.join(FAULTS)}")
    sys.path.insert(0, str(REPO))
    work = (args.work or Path(tempfile.mkdtemp(prefix="sdtune-faults-"))).resolve()
    work.mkdir(parents=True, exist_ok=True)
    ENV["SDTUNE_CACHE"] = str(work / "cache")  # every run's own, so cache faults damage no one else's
    rng = random.Random(args.seed)

    # the uninterrupted run, with the most checkpoints (every step), gives the length of a run's training
    reference = work / "uninterrupted"
    shutil.rmtree(reference, ignore_errors=True)
    process = start(train_command(reference, args.steps, "--checkpoint-every", "1"), work / "uninterrupted.log")
    began = wait_for_training(process, reference)
    while len(losses_so_far(reference)) < args.steps and process.poll() is None:
        time.sleep(0.02)  # until the last step is logged (the interpreter's exit afterwards is not training)
    train_seconds = time.perf_counter() - began
    if process.wait() != 0:
        raise RuntimeError(f"the uninterrupted run failed; see {work / 'uninterrupted.log'}")
    step_seconds = train_seconds / args.steps
    print(f"uninterrupted run: {args.steps} steps in {train_seconds:.1f} s of training, checkpoint every step", flush=True)

    trials: list = []
    if "kill" in faults:
        print(f"kill: each trial gets SIGKILL, SIGTERM or SIGINT once its metrics show a random number of steps "
              f"(0 to {args.steps - 1}), after a uniform delay of up to {step_seconds:.2f} s (one step with its checkpoint)", flush=True)
        trials += [("kill", lambda i: trial(work, i, rng, args.steps, reference, step_seconds))] * args.trials
    if "corrupt" in faults:
        trials += [("corrupt", lambda i: corrupt_trial(work, i, rng, args.steps, reference))] * args.trials
    if "cache" in faults:
        trials += [("cache", lambda i: cache_trial(work, i, rng, args.steps, reference))] * args.trials
    if "fill" in faults:
        if can_mount_tmpfs(work / "probe-disk"):
            trials += [("fill", lambda i: fill_trial(work, i, rng, args.steps, reference))] * args.trials
        else:
            print("fill: skipped (filling a disk needs root, to mount a small tmpfs)", flush=True)
    if "commands" in faults:
        probe = work / "probe"
        shutil.rmtree(probe, ignore_errors=True)
        probe.mkdir()
        seconds = {kind: working_seconds(kind, reference, probe / kind) for kind in ("merge", "sample")}
        print(f"commands: merge works {seconds['merge']:.1f} s, sample {seconds['sample']:.1f} s once they hold their lock; "
              "each trial signals one of them after a uniform delay of up to that", flush=True)
        trials += [("command", lambda i: command_trial(work, i, rng, reference, seconds))] * args.trials

    if "lines" in faults:
        interval = " (train: with the trial's checkpoint interval)" if "train" in commands else ""
        print("lines: each trial gets SIGTERM or SIGINT at one of the distinct lines of sdtune and Accelerate that an "
              f"uninterrupted {', '.join(commands)} runs once in its module"
              f"{interval}, drawn uniformly", flush=True)
        line_counts: dict = {}
        trials += [("lines", lambda i: line_trial(work, i, rng, args.steps, reference, line_counts, commands, args.at))] * args.trials

    recovered, counts = 0, {}
    for label, run_trial in trials:
        index = counts[label] = counts.get(label, -1) + 1
        ok, detail = run_trial(index)
        recovered += ok
        print(f"{label} {index + 1:2d}: {'recovered' if ok else 'LOST'}: {detail}", flush=True)
    summary = f"{len(trials)} trials, {recovered} recovered, {len(trials) - recovered} lost"
    print(summary, flush=True)
    if args.work is None:
        shutil.rmtree(work, ignore_errors=True)
    return summary


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    summary = main()
    sys.exit(0 if summary.endswith(" 0 lost") else 1)
