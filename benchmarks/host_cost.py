"""What one tuned convolution costs the host: forward and backward of a layer whose arithmetic is negligible.

On a GPU whose training step is bound by the host (SD v1.4 at 512 px on an H200: the frozen step costs the same at
batch 1 and 4, and its kernels keep the GPU busy a quarter of the time), each layer's calls, autograd nodes and
Python cost step time that the GPU's speed cannot win back. This measures that cost on the CPU, where a 16-channel
convolution on a 4x4 map does next to no arithmetic: the frozen layer (the floor), each filter-atom route, and peft's
LoRA (rank 4) on the same layer, one thread, microseconds per forward and backward (median of rounds, the layers
timed in turns), and the aten operations one forward and backward dispatches to kernels (counted once per layer,
outside the timing: exact where the times are noisy; views, which cost a dispatch but no kernel, counted apart), with
every call the dispatcher sees (composite operations and calls made inside kernels too) and the backward's autograd
nodes as torch's profiler records them.

`--autocast bf16` runs the forward under autocast with the frozen weights stored in bf16, as `sdtune train
--mixed-precision bf16` does on a GPU (the trainable tensors stay fp32): where the casts a layer adds show.

    python benchmarks/host_cost.py [--channels 16] [--size 4] [--calls 300] [--rounds 7] [--autocast bf16]
                                   [--clock cpu|wall] [--ops-only] [--show-ops "atoms[weight]"]
"""

from __future__ import annotations

import argparse
import collections
import statistics
import time

AUTOCAST_DTYPES = {"bf16": "bfloat16", "fp16": "float16"}
CLOCKS = {"cpu": time.thread_time, "wall": time.perf_counter}


def forward_backward(layer, x, autocast_dtype=None) -> None:
    """One forward (under autocast in `autocast_dtype` if given) and backward of `layer`, as a training step runs it:
    backward outside autocast."""
    import torch

    if autocast_dtype is None:
        layer(x).sum().backward()
        return
    with torch.autocast(x.device.type, dtype=autocast_dtype):
        total = layer(x).sum()
    total.backward()


def aten_ops(layer, x, autocast_dtype=None) -> list:
    """The aten operations (`OpOverload`s, in order) that one forward and backward of `layer` dispatches to kernels:
    after autograd, autocast and composite operations' decomposition, views included. Counted on a second call, so that
    gradients exist and accumulate as in every later step."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Recorder(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.append(func)
            return func(*args, **(kwargs or {}))

    forward_backward(layer, x, autocast_dtype)
    with Recorder() as recorder:
        forward_backward(layer, x, autocast_dtype)
    return recorder.ops


def dispatcher_calls(layer, x, autocast_dtype=None) -> tuple[int, int]:
    """(aten calls, backward nodes) of one forward and backward of `layer` as torch's profiler records them: every call
    that enters the dispatcher, composite operations and the calls kernels make included (so more than `aten_ops`), and
    the autograd nodes the backward runs, gradient accumulation included. A second call, as `aten_ops`."""
    from torch.profiler import ProfilerActivity, profile

    forward_backward(layer, x, autocast_dtype)
    with profile(activities=[ProfilerActivity.CPU]) as recorded:
        forward_backward(layer, x, autocast_dtype)
    names = [event.name for event in recorded.events()]
    return (sum(name.startswith("aten::") for name in names),
            sum(name.startswith("autograd::engine::evaluate_function") for name in names))


def per_call_us(layers: dict, x, calls: int, rounds: int, autocast_dtype=None, clock=time.thread_time) -> dict[str, float]:
    """Median microseconds a forward and backward of each layer, the layers timed in turns within every round (so
    that a slow spell of a shared machine falls on all of them alike), by `clock`: by default the CPU time of this
    thread, which leaves out the time other processes hold the core."""
    for layer in layers.values():
        for _ in range(20):
            forward_backward(layer, x, autocast_dtype)
    seconds = {name: [] for name in layers}
    for _ in range(rounds):
        for name, layer in layers.items():
            started = clock()
            for _ in range(calls):
                forward_backward(layer, x, autocast_dtype)
            seconds[name].append((clock() - started) / calls)
    return {name: statistics.median(values) * 1e6 for name, values in seconds.items()}


def make_layers(channels: int, frozen_dtype=None) -> dict:
    """The frozen convolution, filter atoms on it by each route, and peft's LoRA r4 on it; with `frozen_dtype`, the
    frozen weights stored in it as mixed-precision training stores them."""
    import torch
    from peft import LoraConfig, inject_adapter_in_model
    from torch import nn

    from sdtune.methods.atoms import FilterAtomConv2d
    from sdtune.precision import cast_frozen_parameters

    torch.manual_seed(0)

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
    if frozen_dtype is not None:
        for layer in layers.values():
            cast_frozen_parameters(layer, frozen_dtype, [p for p in layer.parameters() if p.requires_grad])
    return layers


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--channels", type=int, default=16)
    parser.add_argument("--size", type=int, default=4, help="the input map's side")
    parser.add_argument("--calls", type=int, default=300, help="forward and backward calls a round")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--autocast", choices=sorted(AUTOCAST_DTYPES), help="forward under autocast, frozen weights in it")
    parser.add_argument("--clock", choices=sorted(CLOCKS), default="cpu",
                        help="this thread's CPU time (default: steadier beside other work) or wall time")
    parser.add_argument("--ops-only", action="store_true", help="count the operations, time nothing")
    parser.add_argument("--show-ops", metavar="LAYER", help="also list that layer's aten operations in order")
    args = parser.parse_args()

    import torch

    torch.set_num_threads(1)
    autocast_dtype = getattr(torch, AUTOCAST_DTYPES[args.autocast]) if args.autocast else None
    layers = make_layers(args.channels, autocast_dtype)
    if args.show_ops and args.show_ops not in layers:
        parser.error(f"--show-ops {args.show_ops!r} is none of: {', '.join(layers)}")
    x = torch.randn(1, args.channels, args.size, args.size, requires_grad=True)
    ops = {name: aten_ops(layer, x, autocast_dtype) for name, layer in layers.items()}
    calls = {name: dispatcher_calls(layer, x, autocast_dtype) for name, layer in layers.items()}
    precision = f"autocast {args.autocast}, frozen weights in {args.autocast}" if args.autocast else "fp32"
    if args.ops_only:
        times = None
        print(f"one {args.channels}-channel 3x3 convolution on a {args.size}x{args.size} map, forward and backward, "
              f"{precision}, torch {torch.__version__}")
    else:
        times = per_call_us(layers, x, args.calls, args.rounds, autocast_dtype, CLOCKS[args.clock])
        print(f"one {args.channels}-channel 3x3 convolution on a {args.size}x{args.size} map, forward and backward, "
              f"{precision}, CPU, one thread ({args.clock} time), torch {torch.__version__}, median of {args.rounds} rounds "
              f"of {args.calls} calls, the layers in turns")
    print()
    timed = "" if times is None else " µs a call | over the floor µs |"
    print(f"| layer |{timed} aten ops a call | of them views | dispatcher calls | backward nodes |")
    print("| --- |" + ("" if times is None else " ---: | ---: |") + " ---: | ---: | ---: | ---: |")
    for name, layer_ops in ops.items():
        counts = f"{len(layer_ops)} | {sum(op.is_view for op in layer_ops)} | {calls[name][0]} | {calls[name][1]} |"
        if times is None:
            print(f"| {name} | {counts}")
        else:
            value = times[name]
            print(f"| {name} | {value:.1f} | {value - times['floor (frozen)']:+.1f} | {counts}")
    if args.show_ops:
        print()
        print(f"{args.show_ops}, in order: " + ", ".join(str(op).removeprefix("aten.") for op in ops[args.show_ops]))
        counts = collections.Counter(str(op).removeprefix("aten.") for op in ops[args.show_ops])
        print("by operation: " + ", ".join(f"{name} {count}" for name, count in counts.most_common()))


if __name__ == "__main__":
    main()
