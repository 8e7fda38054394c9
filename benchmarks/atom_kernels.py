"""Which filter-atom kernel is fastest for each convolution of SD v1.4, on this device, and the rule it gives.

    python benchmarks/atom_kernels.py --latent 64 --batch 1
    python benchmarks/atom_kernels.py --device cuda --dtype bf16 --latent 64 --batch 4
    python benchmarks/atom_kernels.py --device cuda --dtype bf16 --check      # the Triton kernel's bf16 error
    python benchmarks/atom_kernels.py --include-1x1 --per-channel            # 1x1 layers; the D1 variant's mixing
    python benchmarks/atom_kernels.py --device cuda --dtype bf16 --triton-tiles 8x256x4,32x32x4u   # other tiles
    python benchmarks/atom_kernels.py --device cuda --dtype bf16 --fold-tiles 32x2x8,128x4x4   # the fold kernel's

Runs SD v1.4's UNet (random weights) once to record the input shape of each 3x3 convolution (and 1x1 with
`--include-1x1`), then times forward + backward of every distinct (channels in, channels out, stride, size)
with
- frozen: the library convolution with a frozen weight (only the input gradient: the floor),
- each route of `tap_mixed_conv2d` (gradients for the input and the atoms): the tap side with each of its
  backwards (tap-unfold, tap-depthwise, and tap-triton, tap-triton-fold and tap-triton-dgrad where Triton runs), the weight side,
  and autograd on the formed weight,
in turns, and prints milliseconds per call, the median per-round ratio of each to the frozen
convolution, the input positions (batch × height × width) that `TAP_SIDE_MAX_POSITIONS` compares
against and, on CUDA, each route's peak memory over the frozen convolution's and the time its kernels keep the
GPU busy (torch.profiler) against the frozen convolution's: a call's wall time on a GPU is mostly the host's
launches, which a step's other layers overlap, so the GPU time is what a layer costs a step that is not bound
by the host (CUDA graphs). `--per-channel` gives every
input channel its own mixing matrix, as the D1 variant's update is.

Below the table: the measured rule. For the device's tap-side backward (`TAP_BACKWARD`), the input-position
limit that minimises the summed time of the UNet's convolutions (each shape times its count) when the
tap side takes every layer up to the limit and the weight side the rest, against the current limit.

`--check` instead compares the tap side's backwards and the weight side with autograd on the formed weight in `--dtype` for
every distinct layer (and a strided, odd-sized one), both against a float64 reference, and fails (exit
status 1) where a route's error exceeds `--tolerance` and twice the autograd route's own error.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time


def conv_shapes(latent: int, batch: int, device: str, dtype, kernel_sizes=(3,)) -> list[tuple]:
    import torch

    from sdtune.methods.base import named_convs
    from sdtune.models import build_sd14_unet, quiet_libraries

    with quiet_libraries():
        unet = build_sd14_unet(device).to(dtype)
        seen: dict[tuple, int] = {}

        def record(module, inputs, output):
            x = inputs[0]
            key = (module.in_channels, module.out_channels, module.kernel_size[0], module.stride[0], x.shape[-2], x.shape[-1])
            seen[key] = seen.get(key, 0) + 1

        hooks = [conv.register_forward_hook(record) for _, conv in named_convs(unet, set(kernel_sizes))]
        with torch.no_grad():
            unet(
                torch.randn(batch, 4, latent, latent, device=device, dtype=dtype),
                torch.zeros(batch, dtype=torch.long, device=device),
                torch.randn(batch, 77, unet.config.cross_attention_dim, device=device, dtype=dtype),
            )
        for hook in hooks:
            hook.remove()
        del unet
        if device == "cuda":
            torch.cuda.empty_cache()
        return sorted(seen.items())


def synchronize(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def time_call(function, device: str) -> float:
    synchronize(device)
    start = time.perf_counter()
    function()
    synchronize(device)
    return (time.perf_counter() - start) * 1000


def routes_here(device: str, tiles: str = "", fold_tiles: str = "") -> list[str]:
    """The routes to time: "tap-triton@16x32x4u" is the fused Triton kernel with one tile (channels x positions
    x warps, u: the taps' gathers unrolled), "tap-triton-fold@32x2x8" the fold kernel with one (positions x warps
    x blocks a program)."""
    from sdtune.methods.atom_kernels import triton_tap_backward

    routes = ["tap-unfold", "tap-depthwise"]
    interpreted = os.environ.get("TRITON_INTERPRET") == "1"  # the Triton rows on a CPU, slowly: a check of this script
    if (device == "cuda" or interpreted) and triton_tap_backward() is not None:
        routes.append("tap-triton")
        routes += [f"tap-triton@{spec}" for spec in filter(None, tiles.split(","))]
        routes.append("tap-triton-fold")
        routes += [f"tap-triton-fold@{spec}" for spec in filter(None, fold_tiles.split(","))]
        routes.append("tap-triton-dgrad")
    return routes + ["weight", "autograd"]


def parse_fold_tile(spec: str) -> tuple[int, int, int]:
    positions, warps, blocks = (int(n) for n in spec.split("x"))
    return positions, warps, blocks


def gpu_milliseconds(call, repeats: int = 1) -> float | None:
    """The median milliseconds one call keeps the GPU busy in kernels (torch.profiler; a kernel's time varies far
    less than a call's wall time, and each profiled call costs the run tens of milliseconds), or None where the
    profiler does not run."""
    try:
        from torch.profiler import ProfilerActivity, profile

        times = []
        for _ in range(repeats):
            with profile(activities=[ProfilerActivity.CUDA]) as profiler:
                call()
            times.append(sum(getattr(e, "self_device_time_total", 0) for e in profiler.key_averages()) / 1e3)
        return statistics.median(times)
    except Exception as error:  # noqa: BLE001 - the column stays empty
        print(f"no GPU time: {type(error).__name__}: {error}", file=sys.stderr)
        return None


def parse_tile(spec: str) -> tuple[int, int, int, bool]:
    unroll = spec.endswith("u")
    channels, positions, warps = (int(n) for n in spec.rstrip("u").split("x"))
    return channels, positions, warps, unroll


def make_layer(c_in, c_out, k, stride, device, dtype, per_channel, generator):
    import torch
    from torch import nn

    conv = nn.Conv2d(c_in, c_out, k, stride=stride, padding=k // 2).to(device, dtype).requires_grad_(False)
    taps = k * k
    shape = (c_in, taps, taps) if per_channel else (taps, taps)
    mixing = (0.05 * torch.randn(shape, generator=generator)).to(device).requires_grad_()
    return conv, mixing


def table(args) -> None:
    import torch

    from sdtune.methods.atom_kernels import TAP_BACKWARD, TAP_SIDE_MAX_POSITIONS, tap_mixed_conv2d

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    routes = routes_here(args.device, args.triton_tiles, args.fold_tiles)
    device_backward = TAP_BACKWARD.get(args.device, "depthwise")
    if f"tap-{device_backward}" not in routes:
        device_backward = "depthwise"
    print(
        f"convolutions of SD v1.4, {args.latent}x{args.latent} latents, batch {args.batch}, {args.dtype}, "
        f"{torch.cuda.get_device_name() if args.device == 'cuda' else 'cpu'}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads; mixing {'per input channel' if args.per_channel else 'shared'}; "
        f"current tap-side limit {TAP_SIDE_MAX_POSITIONS}, tap-side backward {TAP_BACKWARD}",
        flush=True,
    )
    memory = args.device == "cuda"
    header = "| in | out | k | stride | size | count | input positions | frozen ms | " + " | ".join(f"{r} ×" for r in routes)
    header += " | best |" + (" " + " | ".join(f"{r} +MB" for r in routes) + " |" if memory else "")
    if memory:
        header += " frozen GPU ms | " + " | ".join(f"{r} GPU ×" for r in routes) + " | best GPU |"
    print(header)
    print("|" + " ---: |" * (8 + len(routes)) + " --- |"
          + (" ---: |" * len(routes) + " ---: |" + " ---: |" * len(routes) + " --- |" if memory else ""))
    generator = torch.Generator().manual_seed(0)
    totals = []  # (positions, count, frozen ms, {route: ms})
    gpu_totals = []  # as totals, in GPU kernel time
    for (c_in, c_out, k, stride, height, width), count in conv_shapes(
        args.latent, args.batch, args.device, dtype, (3, 1) if args.include_1x1 else (3,)
    ):
        conv, mixing = make_layer(c_in, c_out, k, stride, args.device, dtype, args.per_channel, generator)
        x = torch.randn(args.batch, c_in, height, width, device=args.device, dtype=dtype, requires_grad=True)

        def frozen():
            conv(x).sum().backward()

        def fast(mode):
            mode, _, spec = mode.partition("@")
            setting = "FOLD_TILE" if mode == "tap-triton-fold" else "TAP_TILE"  # the tile a spec sets
            tile = (parse_fold_tile(spec) if mode == "tap-triton-fold" else parse_tile(spec)) if spec else None

            def call():
                if tile:
                    from sdtune.methods import atom_triton

                    previous = getattr(atom_triton, setting)
                    setattr(atom_triton, setting, tile)
                try:
                    with torch.autocast(args.device, dtype=dtype, enabled=dtype != torch.float32):
                        out = tap_mixed_conv2d(x, conv, mixing, mode)
                    out.sum().backward()
                finally:
                    if tile:
                        setattr(atom_triton, setting, previous)

            return call

        calls = {"frozen": frozen, **{route: fast(route) for route in routes}}
        peaks = {}
        if memory:  # each call's peak above what is allocated before it
            for name, call in calls.items():
                call()
                torch.cuda.synchronize()
                x.grad = mixing.grad = None
                before = torch.cuda.memory_allocated()
                torch.cuda.reset_peak_memory_stats()
                call()
                torch.cuda.synchronize()
                peaks[name] = (torch.cuda.max_memory_allocated() - before) / 2**20
                x.grad = mixing.grad = None
        times = {name: [] for name in calls}
        for round_ in range(args.warmup + args.steps):  # in turns, so drift falls on every column alike
            for name, call in calls.items():
                milliseconds = time_call(call, args.device)
                x.grad = mixing.grad = None
                if round_ >= args.warmup:
                    times[name].append(milliseconds)
        base = statistics.median(times["frozen"])
        ratios = {route: statistics.median(t / b for t, b in zip(times[route], times["frozen"])) for route in routes}
        totals.append((args.batch * height * width, count, base, {route: base * ratios[route] for route in routes}))
        gpu = {}
        if memory:
            for name, call in calls.items():
                gpu[name] = gpu_milliseconds(call)
                x.grad = mixing.grad = None
            if None not in gpu.values() and gpu["frozen"] > 0:
                gpu_totals.append((args.batch * height * width, count, gpu["frozen"], {r: gpu[r] for r in routes}))
        best = min(ratios, key=ratios.get)
        line = (
            f"| {c_in} | {c_out} | {k} | {stride} | {height} | {count} | {args.batch * height * width} | {base:.3f} | "
            + " | ".join(f"{ratios[r]:.2f}" for r in routes)
            + f" | {best} |"
        )
        if memory:
            line += " " + " | ".join(f"{peaks[r] - peaks['frozen']:+.1f}" for r in routes) + " |"
            if None not in gpu.values() and gpu["frozen"] > 0:
                gpu_ratios = {r: gpu[r] / gpu["frozen"] for r in routes}
                line += (f" {gpu['frozen']:.3f} | " + " | ".join(f"{gpu_ratios[r]:.2f}" for r in routes)
                         + f" | {min(gpu_ratios, key=gpu_ratios.get)} |")
        print(line, flush=True)
    current = TAP_SIDE_MAX_POSITIONS.get(args.device, 0)
    backwards = [device_backward] + (["triton-fold"] if device_backward != "triton-fold" and "tap-triton-fold" in routes else [])
    for measured, what in ((totals, "ms"), (gpu_totals if len(gpu_totals) == len(totals) else [], "GPU ms")):
        for index, backward in enumerate(backwards if measured else []):
            print_rule(measured, routes if index == 0 else [], backward, current, what)


def print_rule(totals, routes, backward: str, current, what: str = "ms") -> None:
    """The tap-side limit on input positions that minimises the summed time (wall ms, or the GPU's kernel time),
    from the table's rows."""
    tap = f"tap-{backward}"

    def summed(limit):
        return sum(count * (ms[tap] if limit is None or positions <= limit else ms["weight"]) for positions, count, _, ms in totals)

    candidates = [0] + sorted({positions for positions, *_ in totals}) + [None]
    best = min(candidates, key=lambda limit: (summed(limit), -1 if limit is None else limit))
    frozen = sum(count * base for _, count, base, _ in totals)
    name = lambda limit: "at every size" if limit is None else f"up to {limit:,} input positions, the weight side above"  # noqa: E731
    print()
    print(
        f"measured rule{' by GPU time' if what != 'ms' else ''}: {tap} {name(best)}: "
        f"{summed(best):.2f} {what} of convolutions per step ({summed(best) / frozen:.2f}× the frozen {frozen:.2f} {what}); "
        f"the current rule ({tap} {name(current)}): {summed(current):.2f} {what} ({summed(current) / frozen:.2f}×)"
    )
    for route in routes:
        every = sum(count * ms[route] for _, count, _, ms in totals)  # a tile's column: that tile everywhere
        print(f"  {route} on every layer: {every:.2f} {what} ({every / frozen:.2f}×)")


def check(args) -> int:
    """The tap and weight sides' bf16/fp16 error against autograd on the formed weight, both against float64."""
    import torch

    from sdtune.methods.atom_kernels import tap_mixed_conv2d

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    routes = [r for r in routes_here(args.device) if r.startswith("tap-") or r == "weight"]
    shapes = [key for key, _ in conv_shapes(args.latent, args.batch, args.device, dtype)]
    shapes.append((37, 21, 3, 2, 13, 11))  # odd: channels off the tiles, stride 2, odd sizes
    generator = torch.Generator().manual_seed(1)
    print(f"tap side and weight side against autograd on the formed weight, {args.dtype}, {args.device}, batch {args.batch}; "
          f"relative max error against float64 (max |error| / max |reference|)")
    print("| in | out | stride | size | grad | autograd | " + " | ".join(routes) + " |")
    print("| ---: | ---: | ---: | ---: | --- | ---: |" + " ---: |" * len(routes))
    failed = []
    for c_in, c_out, k, stride, height, width in shapes:
        conv, mixing = make_layer(c_in, c_out, k, stride, args.device, dtype, args.per_channel, generator)
        mixing = (mixing.detach() * 4).requires_grad_()  # an update of a few percent of W
        x = torch.randn(args.batch, c_in, height, width, generator=generator).to(args.device, dtype)
        grad_out = None
        results = {}
        for route in ["reference", "autograd"] + routes:
            layer, inputs = conv, x
            if route == "reference":
                layer = torch.nn.Conv2d(c_in, c_out, k, stride=stride, padding=k // 2).to(args.device, torch.float64)
                layer.load_state_dict({n: t.double() for n, t in conv.state_dict().items()})
                layer.requires_grad_(False)
                inputs = x.double()
            inputs = inputs.detach().requires_grad_()
            mix = mixing.detach().double().requires_grad_() if route == "reference" else mixing.detach().requires_grad_()
            out = tap_mixed_conv2d(inputs, layer, mix, "autograd" if route in ("reference", "autograd") else route)
            if grad_out is None:
                grad_out = torch.randn(out.shape, generator=generator).to(args.device)
            results[route] = torch.autograd.grad(out, (inputs, mix), grad_out.to(out.dtype))
        for index, name in enumerate(("x", "M")):
            reference = results["reference"][index]
            scale = reference.abs().max().item() or 1.0
            errors = {r: (results[r][index].double() - reference).abs().max().item() / scale for r in ["autograd"] + routes}
            print(f"| {c_in} | {c_out} | {stride} | {height}x{width} | {name} | {errors['autograd']:.2e} | "
                  + " | ".join(f"{errors[r]:.2e}" for r in routes) + " |", flush=True)
            for route in routes:
                if errors[route] > max(args.tolerance, 2 * errors["autograd"]):
                    failed.append(f"{route} grad {name} of {c_in}->{c_out} at {height}x{width}: {errors[route]:.2e}")
    print()
    print("check: " + ("PASS" if not failed else "FAIL: " + "; ".join(failed)))
    return 1 if failed else 0


def main() -> None:
    import torch

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--latent", type=int, default=64)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default="fp32")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--include-1x1", action="store_true", help="also the 1x1 convolutions (atoms' include_1x1)")
    parser.add_argument("--per-channel", action="store_true", help="one mixing matrix per input channel (the D1 variant)")
    parser.add_argument(
        "--triton-tiles", default="", metavar="SPECS",
        help="also time the Triton kernel with these tiles, e.g. 8x256x4,32x32x4u (channels x positions x warps, u: unrolled)",
    )
    parser.add_argument(
        "--fold-tiles", default="", metavar="SPECS",
        help="also time the fold kernel with these tiles, e.g. 32x2x8,128x4x4 (positions x warps x blocks a program)",
    )
    parser.add_argument("--check", action="store_true", help="the tap side's error against autograd instead of times")
    parser.add_argument("--tolerance", type=float, default=2e-2, help="--check: largest relative error allowed")
    parser.add_argument("--cudnn-benchmark", action="store_true", help="let cuDNN autotune each convolution first")
    args = parser.parse_args()
    torch.backends.cudnn.benchmark = args.cudnn_benchmark  # off by default, as in sdtune training
    torch.manual_seed(0)
    if args.check:
        sys.exit(check(args))
    table(args)


if __name__ == "__main__":
    main()
