"""How long a large photo folder takes before training starts: `sdtune train --dry-run`, and a real run to its
first step, on a generated folder of PNGs (a screenshot or export folder) and large JPEGs (a camera's).

    python benchmarks/photo_startup.py --pngs 300 --jpegs 50 [--folder /tmp/photos] [--repeats 2] [--cores 1] [--rows decoding]

The folder is generated once (kept, reused when it holds the images asked for). Each timing is a fresh
`sdtune train` process (tiny-random model, torch on one thread; the images decoded on as many threads as the
process has cores, `--cores N` the first N of them), so imports are counted too; the model-free `sdtune --help`
start is printed beside them, and the machine's load before and after.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def photo(width: int, height: int, seed: int):
    """A photo-like image: smooth gradients with mild noise (compresses as a photo does, not as noise)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    channels = [127 + 100 * np.sin(x / rng.uniform(40, 200) + rng.uniform(0, 6)) * np.cos(y / rng.uniform(40, 200)) for _ in range(3)]
    pixels = np.stack(channels, -1) + rng.normal(0, 6, (height, width, 3))
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def make_folder(folder: Path, pngs: int, jpegs: int) -> None:
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    base_png, base_jpeg = photo(1024, 768, 0), photo(4032, 3024, 1)
    for index in range(pngs):
        path = folder / f"shot-{index:04d}.png"
        if not path.exists():  # shifted copies: same cost to decode, different bytes (no duplicate warning)
            Image.fromarray(np.roll(np.asarray(base_png), index, axis=1)).save(path)
    for index in range(jpegs):
        path = folder / f"IMG_{index:04d}.jpg"
        if not path.exists():
            exif = Image.Exif()
            exif[0x0112] = 6 if index % 2 else 1  # half stored turned, as a phone stores portrait photos
            Image.fromarray(np.roll(np.asarray(base_jpeg), index, axis=0)).save(path, quality=90, exif=exif)


# the dry run's checks alone, in a fresh process whose imports (torch, diffusers, peft) are done first: what the
# photos cost, apart from the imports that dominate a dry run of a small folder
PLAN_ONLY = """
import sys, time, warnings
warnings.simplefilter("ignore")
from sdtune.config import TrainConfig
from sdtune.training import plan_run
config = TrainConfig(model="tiny-random", method="lora", concept="castle", images=sys.argv[1], output=sys.argv[2],
                     steps=1, buckets=sys.argv[3] == "buckets")
plan_run(TrainConfig(model="tiny-random", method="lora", output=sys.argv[2], steps=1))  # imports and the model's configs, once
start = time.perf_counter()
plan_run(config)
print(time.perf_counter() - start)
"""

# decoding the images alone, as a run's start does once the model is loaded (each decoded, converted to sRGB, resized
# and cropped to 64 px), on the threads given (an older sdtune without threads: its one)
DECODE_ONLY = """
import inspect, sys, time, warnings
warnings.simplefilter("ignore")
from sdtune.data import list_images, load_framed_images, readable_images
paths = readable_images(list_images(sys.argv[1]))
threads = {"threads": int(sys.argv[2])} if "threads" in inspect.signature(load_framed_images).parameters else {}
start, cpu = time.perf_counter(), time.process_time()
load_framed_images(paths, 64, **threads)
print(f"{time.process_time() - cpu:.2f}", time.perf_counter() - start)
"""


def timed(arguments: list[str], output: Path, cores: int | None = None) -> float:
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore"}
    start = time.perf_counter()
    scripts = {"plan": PLAN_ONLY, "decode": DECODE_ONLY}
    command = [sys.executable, "-c", scripts[arguments[0]], *arguments[1:]] if arguments[0] in scripts else [sys.executable, "-m", "sdtune", *arguments]
    on_cores = sorted(os.sched_getaffinity(0))[:cores] if cores else None
    done = subprocess.run(command, env=environment, capture_output=True, text=True,
                          preexec_fn=(lambda: os.sched_setaffinity(0, on_cores)) if on_cores else None)
    seconds = time.perf_counter() - start
    if done.returncode:
        raise SystemExit(f"sdtune {' '.join(arguments)} failed:\n{done.stderr[-2000:]}")
    if arguments[0] == "decode":  # its process's CPU seconds beside: over the wall's where threads overlapped
        CPU_SECONDS.append(float(done.stdout.split()[-2]))
    return float(done.stdout.split()[-1]) if arguments[0] in scripts else seconds


CPU_SECONDS: list[float] = []


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pngs", type=int, default=300)
    parser.add_argument("--jpegs", type=int, default=50)
    parser.add_argument("--folder", default=str(Path(tempfile.gettempdir()) / "sdtune-photo-startup"))
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--cores", type=int, help="run sdtune on this many of the process's cores (1: one decoding thread)")
    parser.add_argument("--rows", default="", help="only the rows whose name holds this text (decoding, train, ...)")
    args = parser.parse_args()
    folder = Path(args.folder)
    make_folder(folder, args.pngs, args.jpegs)
    cores = len(os.sched_getaffinity(0)) if not args.cores else min(args.cores, len(os.sched_getaffinity(0)))
    with tempfile.TemporaryDirectory() as scratch:
        train = ["train", "--concept", "castle", "--images", str(folder), "--model", "tiny-random", "--method", "lora",
                 "--steps", "1"]
        rows = {"`plan_run` alone (the dry run's checks, imports done)": ["plan", str(folder), f"{scratch}/plan", "square"],
                "`plan_run --buckets` alone": ["plan", str(folder), f"{scratch}/plan", "buckets"],
                "`sdtune --help` (imports only)": ["--help"],
                "decoding the images alone (`load_framed_images`, 64 px), one thread": ["decode", str(folder), "1"],
                f"decoding the images alone, {cores} threads": ["decode", str(folder), str(cores)],
                "`sdtune train --dry-run`": [*train, "--output", f"{scratch}/dry", "--dry-run"],
                "`sdtune train --dry-run --buckets`": [*train, "--output", f"{scratch}/dry", "--dry-run", "--buckets"],
                "`sdtune train --steps 1` (start to step 1, saved)": [*train, "--output", f"{scratch}/run", "--overwrite"]}
        print(f"{args.pngs} PNGs 1024x768 and {args.jpegs} JPEGs 4032x3024 in {folder}; best of {args.repeats}; {cores} core(s); "
              f"load average {os.getloadavg()[0]:.1f}\n")
        print("| | seconds |\n| --- | ---: |")
        for name, arguments in ((name, arguments) for name, arguments in rows.items() if args.rows in name):
            CPU_SECONDS.clear()
            seconds = [timed(arguments, Path(scratch), args.cores) for _ in range(args.repeats)]
            best = seconds.index(min(seconds))
            cpu = f" (CPU {CPU_SECONDS[best]:.1f} s)" if CPU_SECONDS else ""
            print(f"| {name} | {seconds[best]:.1f}{cpu} |", flush=True)
        print(f"\nload average after: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
