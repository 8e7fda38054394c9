"""Peak resident memory of `sdtune.load_adapters` above the loaded pipeline (benchmarks/RESULTS.md, "Stacked
adapters' memory").

    python benchmarks/stack_memory.py train DIR          # three adapters on tiny-random: LoRA and OFT on every target, filter atoms
    MALLOC_MMAP_THRESHOLD_=4096 python benchmarks/stack_memory.py measure DIR   # one run: the peak above the pipeline
    MALLOC_MMAP_THRESHOLD_=4096 python benchmarks/stack_memory.py measure-kohya DIR   # the same adapters exported as kohya files

Stacking the same adapters once first leaves out what importing peft and the methods costs (16 MB).
`MALLOC_MMAP_THRESHOLD_=4096` makes glibc return every freed block of 4 KB or more, so resident memory follows
what is live; a thread samples it every 0.5 ms. Run `measure` with PYTHONPATH set to each checkout to compare.
"""

from __future__ import annotations

import sys
import threading
import time
from pathlib import Path

ADAPTERS = (("lora", "lora", {"targets": "all"}), ("oft", "oft", {"targets": "all"}), ("atoms", "atoms", {}))


def resident_bytes() -> int:
    with open("/proc/self/statm") as statm:
        import os

        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def train_adapters(folder: Path) -> None:
    from sdtune.config import TrainConfig
    from sdtune.export import export_adapter
    from sdtune.training import train

    for name, method, options in ADAPTERS:
        config = TrainConfig(output=str(folder / name), method=method, options=options, lr=1e-2, steps=2,
                             model="tiny-random", log_with="none", overwrite=True)
        train(config, progress=False)
        export_adapter(folder / name, "kohya", folder / f"{name}-kohya.safetensors", overwrite=True)


def measure(folder: Path, kohya: bool = False) -> float:
    import gc

    from sdtune.adapter import load_adapters
    from sdtune.models import load_pipeline

    paths = [folder / (f"{name}-kohya.safetensors" if kohya else name) for name, _, _ in ADAPTERS]
    load_adapters(paths, load_pipeline("tiny-random"))  # once before: what importing peft and the methods costs
    pipe = load_pipeline("tiny-random")
    gc.collect()
    before, peak, done = resident_bytes(), [0], threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], resident_bytes())
            time.sleep(0.0005)

    sampler = threading.Thread(target=sample)
    sampler.start()
    load_adapters(paths, pipe)
    done.set()
    sampler.join()
    weights = sum(p.numel() * p.element_size() for p in pipe.unet.parameters())
    print(f"UNet weights {weights / 1e6:.1f} MB; peak above the pipeline {(max(peak[0], resident_bytes()) - before) / 1e6:.1f} MB")
    return peak[0] - before


if __name__ == "__main__":
    command, folder = sys.argv[1], Path(sys.argv[2])
    train_adapters(folder) if command == "train" else measure(folder, kohya=command == "measure-kohya")
