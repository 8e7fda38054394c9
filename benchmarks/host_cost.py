"""What one tuned convolution costs the host: forward and backward of a layer whose arithmetic is negligible.

On a GPU whose training step is bound by the host (SD v1.4 at 512 px on an H200: the frozen step costs the same at
batch 1 and 4, and its kernels keep the GPU busy a quarter of the time), each layer's calls, autograd nodes and
Python cost step time that the GPU's speed cannot win back. This measures that cost on the CPU, where a 16-channel
convolution on a 4x4 map does next to no arithmetic: the frozen layer (the floor), each filter-atom route, and peft's
LoRA (rank 4) on the same layer, one thread, microseconds per forward and backward (median of rounds, the layers
timed in turns).

    python benchmarks/host_cost.py [--channels 16] [--size 4] [--calls 300] [--rounds 7]
"""

from __future__ import annotations

import argparse
import statistics
import time


def per_call_us(layers: dict, x, calls: int, rounds: int) -> dict[str, float]:
    """Median microseconds a forward and backward of each layer, the layers timed in turns within every round (so
    that a slow spell of a shared machine falls on all of them alike)."""
    for layer in layers.values():
        for _ in range(20):
            layer(x).sum().backward()
    seconds = {name: [] for name in layers}
    for _ in range(rounds):
        for name, layer in layers.items():
            started = time.perf_counter()
            for _ in range(calls):
                layer(x).sum().backward()
            seconds[name].append((time.perf_counter() - started) / calls)
    return {name: statistics.median(values) * 1e6 for name, values in seconds.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--channels", type=int, default=16)
    parser.add_argument("--size", type=int, default=4, help="the input map's side")
    parser.add_argument("--calls", type=int, default=300, help="forward and backward calls a round")
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()

    import torch
    from peft import LoraConfig, inject_adapter_in_model
    from torch import nn

    from sdtune.methods.atoms import FilterAtomConv2d

    torch.set_num_threads(1)
    torch.manual_seed(0)
    channels = args.channels

    def frozen_conv() -> nn.Conv2d:
        return nn.Conv2d(channels, channels, 3, padding=1).requires_grad_(False)

    class Holder(nn.Module):  # peft injects by module name
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(channels, channels, 3, padding=1)

        def forward(self, x):
            return self.conv(x)

    lora = inject_adapter_in_model(LoraConfig(r=4, target_modules=["conv"]), Holder())
    for name, parameter in lora.named_parameters():
        parameter.requires_grad_("lora_" in name)
    atoms = torch.linalg.qr(torch.randn(9, 9))[0]
    layers = {"floor (frozen)": frozen_conv()}
    for kernel in ("auto", "weight", "autograd", "tap-unfold", "tap-depthwise"):
        layers[f"atoms[{kernel}]"] = FilterAtomConv2d(frozen_conv(), atoms, kernel=kernel)
    layers["peft LoRA r4"] = lora
    x = torch.randn(1, channels, args.size, args.size, requires_grad=True)
    times = per_call_us(layers, x, args.calls, args.rounds)
    floor = times["floor (frozen)"]
    print(f"one {channels}-channel 3x3 convolution on a {args.size}x{args.size} map, forward and backward, CPU, one thread, "
          f"torch {torch.__version__}, median of {args.rounds} rounds of {args.calls} calls, the layers in turns")
    print()
    print("| layer | µs a call | over the floor µs |")
    print("| --- | ---: | ---: |")
    for name, value in times.items():
        print(f"| {name} | {value:.1f} | {value - floor:+.1f} |")


if __name__ == "__main__":
    main()
