"""Which filter-atom kernel is fastest for each 3x3 convolution of SD v1.4, on this device.

    python benchmarks/atom_kernels.py --latent 64 --batch 1
    python benchmarks/atom_kernels.py --device cuda --dtype bf16 --latent 64 --batch 4

Runs SD v1.4's UNet (random weights) once to record the input shape of each 3x3 convolution, then
times forward + backward of every distinct (channels in, channels out, size) with
- frozen: the library convolution with a frozen weight (only the input gradient: the floor),
- tap / weight / autograd: `tap_mixed_conv2d` in each mode (gradients for the input and the atoms),
in turns, and prints milliseconds per call, the median per-round ratio of each to the frozen
convolution, and the input positions (batch × height × width) that `TAP_SIDE_MAX_POSITIONS` compares
against.
"""

from __future__ import annotations

import argparse
import statistics
import time


def conv_shapes(latent: int, batch: int, device: str, dtype) -> list[tuple]:
    import torch

    from sdtune.methods.base import named_convs
    from sdtune.models import build_sd14_unet, quiet_libraries

    quiet_libraries()
    unet = build_sd14_unet(device).to(dtype)
    seen: dict[tuple, int] = {}

    def record(module, inputs, output):
        x = inputs[0]
        key = (module.in_channels, module.out_channels, module.stride[0], x.shape[-2], x.shape[-1])
        seen[key] = seen.get(key, 0) + 1

    hooks = [conv.register_forward_hook(record) for _, conv in named_convs(unet, {3})]
    with torch.no_grad():
        unet(
            torch.randn(batch, 4, latent, latent, device=device, dtype=dtype),
            torch.zeros(batch, dtype=torch.long, device=device),
            torch.randn(batch, 77, unet.config.cross_attention_dim, device=device, dtype=dtype),
        )
    for hook in hooks:
        hook.remove()
    del unet
    return sorted(seen.items())


def time_call(function, device: str, steps: int, warmup: int) -> float:
    import torch

    times = []
    for step in range(warmup + steps):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        function()
        if device == "cuda":
            torch.cuda.synchronize()
        if step >= warmup:
            times.append(time.perf_counter() - start)
    return statistics.median(times) * 1000


def main() -> None:
    import torch
    from torch import nn

    from sdtune.methods.atom_kernels import TAP_SIDE_MAX_POSITIONS, tap_mixed_conv2d

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--latent", type=int, default=64)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default="fp32")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--cudnn-benchmark", action="store_true", help="let cuDNN autotune each convolution first")
    args = parser.parse_args()
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    torch.backends.cudnn.benchmark = args.cudnn_benchmark  # off by default, as in sdtune training
    torch.manual_seed(0)

    print(
        f"3x3 convolutions of SD v1.4, {args.latent}x{args.latent} latents, batch {args.batch}, {args.dtype}, "
        f"{torch.cuda.get_device_name() if args.device == 'cuda' else 'cpu'}, torch {torch.__version__}; "
        f"current tap-side limit {TAP_SIDE_MAX_POSITIONS}"
    )
    print("| in | out | stride | size | count | input positions | frozen ms | tap × | weight × | autograd × | best |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |")
    for (c_in, c_out, stride, height, width), count in conv_shapes(args.latent, args.batch, args.device, dtype):
        conv = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1).to(args.device, dtype).requires_grad_(False)
        x = torch.randn(args.batch, c_in, height, width, device=args.device, dtype=dtype, requires_grad=True)
        mixing = torch.zeros(9, 9, device=args.device, requires_grad=True)

        def frozen():
            conv(x).sum().backward()

        def fast(mode):
            def call():
                with torch.autocast(args.device, dtype=dtype, enabled=dtype != torch.float32):
                    out = tap_mixed_conv2d(x, conv, mixing, mode)
                out.sum().backward()

            return call

        calls = {"frozen": frozen, **{mode: fast(mode) for mode in ("tap", "weight", "autograd")}}
        times = {name: [] for name in calls}
        for round_ in range(args.warmup + args.steps):  # in turns, so drift falls on every column alike
            for name, call in calls.items():
                milliseconds = time_call(call, args.device, 1, 0)
                if round_ >= args.warmup:
                    times[name].append(milliseconds)
        base = statistics.median(times["frozen"])
        ratios = {
            mode: statistics.median(t / b for t, b in zip(times[mode], times["frozen"])) for mode in ("tap", "weight", "autograd")
        }
        positions = args.batch * height * width
        best = min(ratios, key=ratios.get)
        print(
            f"| {c_in} | {c_out} | {stride} | {height} | {count} | {positions} | {base:.3f} | "
            f"{ratios['tap']:.2f} | {ratios['weight']:.2f} | {ratios['autograd']:.2f} | {best} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
