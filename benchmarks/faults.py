"""Kill -9 fault injection: training runs killed at random moments must lose nothing.

Each trial starts `sdtune train --model tiny-random` (the embedded tiny model, random weights) with
`--checkpoint-every K` (K drawn from 1..5) as its own process and kills it with SIGKILL at a random
moment of its training: once its metrics show a random number of finished steps, after a uniform
delay of up to one step's time (checkpoint included). Then it checks the run folder: the adapter is
absent (killed before the first save) or a complete adapter of a saved step, every
`checkpoints/step-N` folder is complete, and `--resume latest` finishes with the same adapter bytes
(raw and EMA) and the same per-step losses as one uninterrupted run.

    python benchmarks/faults.py --trials 20

prints one line per trial, then "N trials, N recovered, 0 lost".
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# Settings whose state crosses steps, so an inexact resume would show in the bytes.
TRAIN_ARGS = ["--model", "tiny-random", "--seed", "7", "--lr-scheduler", "cosine", "--lr-warmup-steps", "2", "--ema-decay", "0.9"]
ADAPTERS = ("adapter.safetensors", "adapter-ema.safetensors")


def train_command(output: Path, steps: int, *extra: str) -> list[str]:
    return [sys.executable, "-m", "sdtune", "train", *TRAIN_ARGS, "--steps", str(steps), "--output", str(output), *extra]


REPO = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}


def start(command: list[str], log: Path) -> subprocess.Popen:
    with open(log, "w") as handle:  # the child keeps its own copy of the descriptor
        return subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT, env=ENV)


def wait_for_training(process: subprocess.Popen, output: Path) -> float:
    """Wait until the run has begun training (its metrics file exists); returns that moment."""
    while not (output / "metrics.jsonl").exists() and process.poll() is None:
        time.sleep(0.02)
    return time.perf_counter()


def run(command: list[str]) -> None:
    result = subprocess.run(command, capture_output=True, text=True, env=ENV)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed: {result.stderr.strip().splitlines()[-1:]}")


def losses(output: Path) -> list[tuple]:
    lines = (output / "metrics.jsonl").read_text().splitlines()
    return [(r["step"], r["loss"], r["lr"], r["grad_norm"]) for r in map(json.loads, lines)]


def losses_so_far(output: Path) -> list[str]:
    return [line for line in (output / "metrics.jsonl").read_text().splitlines() if line.endswith("}")]


def problems_after_kill(output: Path, checkpoint_every: int, steps: int) -> list[str]:
    """What is wrong with a killed run's folder: truncated or half-written files under their final names."""
    from safetensors import safe_open

    from sdtune.adapter import read_adapter
    from sdtune.checkpoints import EMA_FILE, TRAINABLE_FILE, list_checkpoints, read_state
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
            state = read_state(folder)
            assert state["step"] == step, f"state.json says step {state['step']}"
            for name in (TRAINABLE_FILE, EMA_FILE):
                with safe_open(str(folder / name), framework="pt") as handle:
                    [handle.get_tensor(key) for key in handle.keys()]
            for name in ("optimizer.bin", "scheduler.bin"):
                assert (folder / name).stat().st_size > 0, f"{name} is empty"
        except Exception as error:  # any unreadable file is a loss
            found.append(f"{folder.name}: {str(error)[:120]}")
    return found


def trial(work: Path, index: int, rng: random.Random, steps: int, reference: Path, step_seconds: float) -> tuple[bool, str]:
    checkpoint_every = rng.randint(1, 5)
    output = work / f"trial-{index:02d}"
    command = train_command(output, steps, "--checkpoint-every", str(checkpoint_every))
    process = start(command, work / f"trial-{index:02d}.log")
    began = wait_for_training(process, output)
    # a random moment: during a random step (its compute, or the checkpoint and adapter writes before it)
    logged = rng.randrange(steps)
    while len(losses_so_far(output)) < logged and process.poll() is None:
        time.sleep(0.005)
    time.sleep(rng.uniform(0, step_seconds))
    delay = time.perf_counter() - began
    killed = process.poll() is None
    if killed:
        os.kill(process.pid, signal.SIGKILL)
    process.wait()
    root = output / "checkpoints"
    staging = sorted(p.name for p in root.iterdir() if p.name.startswith(".")) if root.is_dir() else []
    saved = [p.name for p in sorted(root.iterdir())] if root.is_dir() else []
    found = problems_after_kill(output, checkpoint_every, steps)
    run(train_command(output, steps, "--checkpoint-every", str(checkpoint_every), "--resume", "latest"))
    for name in ADAPTERS:
        if (output / name).read_bytes() != (reference / name).read_bytes():
            found.append(f"{name} after resume differs from the uninterrupted run")
    if losses(output) != losses(reference):
        found.append("metrics after resume differ from the uninterrupted run")
    moment = f"killed {delay:.2f} s into training" if killed else "finished before the kill"
    hit = f", mid-write of {', '.join(staging)}" if staging else ""
    detail = f"checkpoint every {checkpoint_every}, {moment}{hit}; checkpoints then: {', '.join(saved) or 'none'}"
    return not found, detail + ("" if not found else "; LOST: " + "; ".join(found))


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0, help="seed of the kill schedule")
    parser.add_argument("--work", type=Path, default=None, help="folder for the runs (default: a temporary one)")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(REPO))
    work = args.work or Path(tempfile.mkdtemp(prefix="sdtune-faults-"))
    work.mkdir(parents=True, exist_ok=True)
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
    print(f"uninterrupted run: {args.steps} steps in {train_seconds:.1f} s of training, checkpoint every step; each "
          f"trial is killed once its metrics show a random number of steps (0 to {args.steps - 1}), after a uniform "
          f"delay of up to {step_seconds:.2f} s (one step with its checkpoint)", flush=True)

    recovered = 0
    for index in range(args.trials):
        shutil.rmtree(work / f"trial-{index:02d}", ignore_errors=True)
        ok, detail = trial(work, index, rng, args.steps, reference, step_seconds)
        recovered += ok
        print(f"trial {index + 1:2d}: {'recovered' if ok else 'LOST'}: {detail}", flush=True)
    summary = f"{args.trials} trials, {recovered} recovered, {args.trials - recovered} lost"
    print(summary, flush=True)
    if args.work is None:
        shutil.rmtree(work, ignore_errors=True)
    return summary


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    summary = main()
    sys.exit(0 if summary.endswith(" 0 lost") else 1)
