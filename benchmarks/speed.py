"""Training-step and sampling speed and peak memory of every method, measured side by side.

    python benchmarks/speed.py                                  # SD v1.4 architecture, 32x32 latents, CPU
    python benchmarks/speed.py --latent 64 --batch 1 --steps 3
    python benchmarks/speed.py --arch tiny --latent 8           # seconds, for a quick look
    python benchmarks/speed.py --device cuda --dtype bf16 --latent 64 --batch 4
    python benchmarks/speed.py --sampling                       # also time inference: base, merged, unmerged
    python benchmarks/speed.py --sampling-only --rows atoms,lora,loha,lokr,difffit,bitfit,gift,full
    python benchmarks/speed.py --interleave --rows floor,atoms,lora   # steps in turns, in one process
    python benchmarks/speed.py --arch tiny --latent 8 --interleave --load 2 --rows floor,atoms,lora  # beside 2 busy processes
    python benchmarks/speed.py --arch sdxl --device cuda --dtype bf16 --latent 128 --rows floor,atoms,lora,loha,lokr,difffit,bitfit,gift,full

The UNet is built from SD v1.4's config (`--arch sd2`: SD 2.1's, `--arch sdxl`: SDXL base 1.0's, with
its pooled-embedding and time-id inputs filled in) with random weights (no download). Each configuration runs
in a fresh process on CPU, so its peak memory is its own max RSS; on a GPU the rows share one
process and the peak is torch.cuda.max_memory_allocated over the steps after the first (the first step's own peak,
which one-time work such as `--cudnn-benchmark`'s algorithm search can raise, is its own column). One training step = forward, MSE loss, backward, AdamW step; the time is the median of
`--steps` steps after `--warmup` steps. Rows:

- floor: nothing trainable; backward still runs to the input (the least any method can cost)
- atoms: sdtune's filter atoms (kernel chosen per layer); atoms[tap], atoms[weight], atoms[autograd]
  force one formulation (autograd: plain autograd on the formed weight W + ΔW), atoms[tap-unfold],
  atoms[tap-depthwise], atoms[tap-triton] the tap side with one backward (`atom_kernels.MODES`);
  atoms{m1=4}, atoms{kc=2}, atoms{include_1x1=true}, ... a variant (options as `key=value;key=value`,
  combinable with a kernel: atoms{include_1x1=true}[tap-triton])
- atoms-reference: the reference code's formulation, the frozen conv plus a second conv with ΔW
- lora / loha / lokr: peft on the same 52 3x3 convolutions, rank 4
- others: the method with its defaults; any row takes options as atoms' do (oft{targets=attn}, lora{targets=attn});
  oft[input] and oft[weight] put every OFT layer on one route (`oft.ROUTE`: the rotated input, or the formed weight)

`--load N` starts N busy processes (a pure-Python spin loop each, or with `--load-kind torch` torch's
elementwise kernels on two threads) for the whole measurement and stops them after it: a training step
on a machine whose cores other work keeps busy, where every parallel region of a multi-threaded kernel
waits for its threads to be scheduled. With `--interleave`,
each round runs every row once with the busy processes stopped (SIGSTOP) and once with them running,
and the table adds each row's slow-down (median per-round loaded/unloaded ratio) and that slow-down
over LoRA's: the rows' own noise and the machine's drift fall on both halves of a round alike.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_ROWS = "floor,atoms,atoms[tap],atoms[weight],atoms[autograd],atoms-reference,lora,full"


def build(arch: str, device: str):
    """The UNet in fp32 with seed-0 random weights, initialised on the device itself."""
    import torch

    from sdtune.models import build_arch_unet, build_tiny_pipeline, quiet_libraries

    with quiet_libraries():
        torch.manual_seed(0)
        unet = build_tiny_pipeline().unet if arch == "tiny" else build_arch_unet(ARCHES[arch], device)
        if unet.config.addition_embed_type == "text_time":
            fill_sdxl_conditions(unet)
        return unet.to(device)


ARCHES = {"sd14": "sd14", "sd2": "sd2-arch", "sdxl": "sdxl-arch"}  # --arch -> sdtune.models.ARCHITECTURES


def fill_sdxl_conditions(unet) -> None:
    """Give an SDXL UNet called as unet(latents, timesteps, embeddings) a pooled embedding (zeros) and the
    time ids of an uncropped image of the latents' size, as its text_time conditioning needs."""
    import torch

    config = unet.config
    pooled_width = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim

    def add(module, args, kwargs):
        if kwargs.get("added_cond_kwargs") is not None:
            return None
        latents = args[0]
        batch, side = latents.shape[0], [latents.shape[-2] * 8, latents.shape[-1] * 8]
        time_ids = torch.tensor([side + [0, 0] + side], device=latents.device, dtype=latents.dtype).repeat(batch, 1)
        text_embeds = torch.zeros(batch, pooled_width, device=latents.device, dtype=latents.dtype)
        return args, {**kwargs, "added_cond_kwargs": {"text_embeds": text_embeds, "time_ids": time_ids}}

    unet.register_forward_pre_hook(add, with_kwargs=True)


def torch_dtype(name: str):
    import torch

    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[name]


def apply_row(row: str, unet):
    """Inject the row's method; returns (method or None, trainable parameters)."""
    from sdtune import methods

    if row == "floor":
        unet.requires_grad_(False)
        return None, []
    if row.startswith("atoms"):
        from sdtune.methods.atom_kernels import MODES
        from sdtune.methods.atoms import KERNELS

        kernel = row[row.index("[") + 1 : row.index("]")] if "[" in row else "auto"
        options = atoms_options(row[row.index("{") + 1 : row.index("}")]) if "{" in row else {}
        if kernel not in MODES:
            raise ValueError(f"unknown atoms kernel {kernel!r}; choose from {', '.join(MODES)}")
        options["kernel"] = "autograd" if row == "atoms-reference" else kernel if kernel in KERNELS else "auto"
        method = methods.create("atoms", **options)
        params = method.inject(unet)
        if kernel not in KERNELS:  # one tap-side backward: set on the layers, the option only names the sides
            for layer in method.layers.values():
                if hasattr(layer, "kernel"):
                    layer.kernel = kernel
        if row == "atoms-reference":
            use_two_convolutions(method)
        return method, params
    name = row.split("{")[0].split("[")[0]
    options = {"rank": 4, "targets": "conv3x3"} if name in ("lora", "loha", "lokr") else {}
    options.update(atoms_options(row[row.index("{") + 1 : row.index("}")]) if "{" in row else {})
    method = methods.create(name, **options)
    params = method.inject(unet)
    if "[" in row:  # oft[input], oft[weight]: every layer on that route
        route = row[row.index("[") + 1 : row.index("]")]
        if name != "oft" or route not in ("input", "weight"):
            raise ValueError(f"unknown route {route!r} for {name}; oft takes [input] or [weight]")
        for layer in method.layers.values():
            layer.route = route
    return method, params


def atoms_options(text: str) -> dict:  # any method's options, as a row's {...} gives them
    """`m1=4;kc=2;include_1x1=true` -> {"m1": 4, "kc": 2, "include_1x1": True}."""
    options = {}
    for item in filter(None, text.split(";")):
        key, value = item.split("=")
        lowered = value.strip().lower()
        options[key.strip()] = {"true": True, "false": False}.get(lowered, int(value) if value.strip().isdigit() else value)
    return options


def use_two_convolutions(method) -> None:
    """The reference implementation: y = conv(x, W) + conv(x, α·ΔD), with α stored per layer."""
    import torch

    for layer in method.layers.values():
        taps = layer.atoms.shape[1]
        alpha = layer.base_layer.weight.detach().reshape(-1, taps) @ layer.atoms.T  # as big as W

        def forward(x, layer=layer, alpha=alpha):
            delta = (alpha @ layer.delta_atoms.reshape(-1, taps)).reshape(layer.base_layer.weight.shape)
            return layer.base_layer(x) + torch.nn.functional.conv2d(
                x, delta.to(x.dtype), None, layer.base_layer.stride, layer.base_layer.padding
            )

        layer.forward = forward


def inputs(unet, args, device, dtype):
    import torch

    generator = torch.Generator().manual_seed(0)
    channels = unet.config.in_channels
    latents = torch.randn(args.batch, channels, args.latent, args.latent, generator=generator)
    embeddings = torch.randn(args.batch, 77, unet.config.cross_attention_dim, generator=generator)
    timesteps = torch.randint(0, 1000, (args.batch,), generator=generator)
    return latents.to(device, dtype), timesteps.to(device), embeddings.to(device, dtype)


def peak_memory_gb(device: str) -> float:
    import torch

    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def synchronize(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def training_setup(row: str, args):
    """The row's model, ready to train: returns (one training step as a function, trainable parameter count)."""
    import torch

    dtype = torch_dtype(args.dtype)
    unet = build(args.arch, args.device)
    method, params = apply_row(row, unet)
    if dtype != torch.float32:  # frozen weights in low precision, trainable ones kept in fp32
        trainable = {id(p) for p in params}
        for p in unet.parameters():
            if id(p) not in trainable:
                p.data = p.data.to(dtype)
    latents, timesteps, embeddings = inputs(unet, args, args.device, dtype)
    if args.channels_last:
        unet.to(memory_format=torch.channels_last)
        latents = latents.contiguous(memory_format=torch.channels_last)
    if args.compile != "none":
        unet.compile(mode=None if args.compile == "default" else args.compile)
    target = torch.randn_like(latents)
    optimizer = torch.optim.AdamW(params, lr=1e-4, foreach=True) if params else None  # as sdtune train's
    if row == "floor":
        latents.requires_grad_(True)
    return timed_step(unet, latents, timesteps, embeddings, target, optimizer, args.device, dtype), sum(p.numel() for p in params)


def timed_step(unet, latents, timesteps, embeddings, target, optimizer, device: str, dtype):
    """One bare training step as a function that runs it and gives its seconds: forward under autocast to `dtype`,
    MSE against `target`, backward, and the optimizer's step (None: the floor, whose latents require grad)."""
    import torch

    kind = torch.device(device).type

    def step() -> float:
        synchronize(device)
        start = time.perf_counter()
        with torch.autocast(kind, dtype=dtype, enabled=dtype != torch.float32):
            prediction = unet(latents, timesteps, embeddings).sample
        loss = torch.nn.functional.mse_loss(prediction.float(), target.float())
        loss.backward()
        if optimizer:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        latents.grad = None
        synchronize(device)
        return time.perf_counter() - start

    return step


# What a busy process runs (`--load-kind`): a pure-Python spin loop on one core, or torch's elementwise
# kernels on two threads, one OpenMP parallel region per call, as a test worker or another training run does.
LOAD_CODE = {
    "spin": "while True:\n    pass",
    "torch": "import torch\ntorch.set_num_threads(2)\na = torch.randn(1 << 17)\nwhile True:\n    a.mul_(1.0)",
}


class BusyProcesses:
    """`count` CPU-bound processes for the duration of a `with` block (`speed.py --load`)."""

    def __init__(self, count: int, kind: str = "spin"):
        self.count = count
        self.kind = kind
        self.processes: list[subprocess.Popen] = []

    def __enter__(self):
        self.processes = [subprocess.Popen([sys.executable, "-c", LOAD_CODE[self.kind]]) for _ in range(self.count)]
        return self

    def pause(self):
        for process in self.processes:
            process.send_signal(signal.SIGSTOP)

    def resume(self):
        for process in self.processes:
            process.send_signal(signal.SIGCONT)

    def __exit__(self, *exc):
        for process in self.processes:
            process.kill()
        for process in self.processes:
            process.wait()
        return False


def measure_training(row: str, args) -> dict:
    """On a GPU the peak is that of the steps after the first: the first step's one-time work (cuDNN's algorithm
    search under `--cudnn-benchmark`) is not a step's cost; its own peak is `first_peak_gb`."""
    import torch

    step, trainable = training_setup(row, args)
    memory_before = peak_memory_gb(args.device)
    times = [step()]
    first_peak = peak_memory_gb(args.device)
    if args.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times += [step() for _ in range(args.warmup + args.steps - 1)]
    peak = peak_memory_gb(args.device)
    return {
        "row": row,
        "seconds": statistics.median(times[args.warmup :]),
        "peak_gb": peak,
        "first_peak_gb": first_peak,
        "model_gb": memory_before,
        "trainable": trainable,
        "gpu_busy": gpu_busy_seconds(step) if args.device == "cuda" else None,
    }


def gpu_busy_seconds(step) -> float | None:
    """The seconds the GPU spends in kernels during one more step (torch.profiler): beside the step's own time it
    says how far the step is bound by the host (launching kernels) rather than by the GPU."""
    try:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CUDA]) as profiler:
            step()
        events = profiler.key_averages()
        return sum(getattr(event, "self_device_time_total", 0) for event in events) / 1e6
    except Exception as error:  # noqa: BLE001 - a profiler that does not run here leaves the column empty
        print(f"no GPU busy time: {type(error).__name__}: {error}", file=sys.stderr)
        return None


def measure_interleaved(rows: list[str], args, busy: "BusyProcesses | None" = None) -> list[dict]:
    """Every row's model in one process, one training step each in turns per round (the first rotating).

    Ratios to the floor and to LoRA are medians of the per-round ratios, so a slow spell on a shared
    machine falls on every row of that round alike. No peak memory: the rows share one process.
    With busy processes (`--load`), every round runs the rows twice, once with the busy processes
    stopped (SIGSTOP) and once with them running, in alternating order: each row's slow-down is the
    median of its per-round loaded/unloaded ratios, measured minutes apart at most.
    """
    setups = {row: training_setup(row, args) for row in rows}
    phases = ["unloaded", "loaded"] if busy and busy.count else ["unloaded"]
    times = {(phase, row): [] for phase in phases for row in rows}
    for round_ in range(args.warmup + args.steps):
        first = round_ % len(rows)
        spent = {}
        for phase in phases if round_ % 2 == 0 else phases[::-1]:
            if busy and busy.count and phase == "unloaded":
                busy.pause()
            elif busy and busy.count:
                busy.resume()
            for row in rows[first:] + rows[:first]:
                spent[phase, row] = setups[row][0]()
                if round_ >= args.warmup:
                    times[phase, row].append(spent[phase, row])
        label = "warm-up" if round_ < args.warmup else f"round {round_ - args.warmup + 1}"
        print(f"{label}: " + ", ".join(f"{row}{'' if phase == 'unloaded' else ' loaded'} {seconds:.3f} s"
                                       for (phase, row), seconds in spent.items()), file=sys.stderr, flush=True)
    if busy and busy.count:
        busy.resume()
    results = []
    for row in rows:
        result = {"row": row, "seconds": statistics.median(times["unloaded", row]), "trainable": setups[row][1]}
        for phase in phases:
            prefix = "" if phase == "unloaded" else "loaded_"
            for reference in ("floor", "lora", "atoms-reference"):
                if reference in rows:
                    ratios = (t / b for t, b in zip(times[phase, row], times[phase, reference]))
                    result[f"{prefix}{reference}_ratio"] = statistics.median(ratios)
        if "loaded" in phases:
            result["loaded_seconds"] = statistics.median(times["loaded", row])
            result["slowdown"] = statistics.median(t / b for t, b in zip(times["loaded", row], times["unloaded", row]))
        results.append(result)
    if "loaded" in phases and "lora" in rows:
        lora = next(r for r in results if r["row"] == "lora")
        for result in results:
            result["slowdown_lora_ratio"] = result["slowdown"] / lora["slowdown"]
    return results


def measure_sampling(row: str, args) -> dict:
    """UNet evaluations as in sampling with guidance (batch 2): the base, the adapted UNet, the merged one,
    each wholly in `--dtype`.

    The three are separate models timed in turns within each round (rotating which goes first), and the
    ratios are medians of the per-round ratios, so load on a shared machine falls on all three alike.
    FLOPs of one call of each are counted too.
    """
    import torch

    def adapted(merge: bool):
        unet = build(args.arch, args.device)
        method, params = apply_row(row, unet)
        generator = torch.Generator().manual_seed(1)  # the same update for the merged and unmerged copies
        with torch.no_grad():
            for p in params:
                p.add_(torch.randn(p.shape, generator=generator).to(p) * 1e-3)
        if merge:
            method.merge()
        return unet.to(dtype)

    dtype = torch_dtype(args.dtype)
    models = {"base": build(args.arch, args.device).to(dtype), "unmerged": adapted(False), "merged": adapted(True)}
    latents, timesteps, embeddings = inputs(models["base"], args, args.device, dtype)
    latents, timesteps, embeddings = (torch.cat([t, t]) for t in (latents, timesteps, embeddings))
    names = list(models)
    times = {name: [] for name in names}
    with torch.no_grad():
        for round_ in range(args.warmup + args.steps):
            first = round_ % len(names)
            for name in names[first:] + names[:first]:
                synchronize(args.device)
                start = time.perf_counter()
                models[name](latents, timesteps, embeddings)
                synchronize(args.device)
                if round_ >= args.warmup:
                    times[name].append(time.perf_counter() - start)
    result = {"row": row, **{name: statistics.median(values) for name, values in times.items()}}
    flops = {name: count_flops(model, latents, timesteps, embeddings) for name, model in models.items()}
    result["base_gflop"] = flops["base"] / 1e9
    for name in ("unmerged", "merged"):
        result[f"{name}_ratio"] = statistics.median(t / b for t, b in zip(times[name], times["base"]))
        result[f"{name}_flop_ratio"] = flops[name] / flops["base"]
    return result


def count_flops(model, *inputs) -> int:
    """The matmul, convolution and attention FLOPs of one call (torch's FlopCounterMode): a cost that,
    unlike time, has no noise."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(*inputs)
    return counter.get_total_flops()


def run_in_process(kind: str, row: str, args) -> dict:
    """On a GPU the peak is reset per row, so rows share one process (no import per row)."""
    import gc

    import torch

    measure = measure_training if kind == "train" else measure_sampling
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    try:
        return measure(row, args)
    except Exception as error:  # noqa: BLE001 - one failed row (e.g. out of memory) must not end the table
        return {"row": row, "error": f"{type(error).__name__}: {str(error).splitlines()[0][:120]}"}
    finally:
        gc.collect()
        torch.cuda.empty_cache()


def run_child(kind: str, row: str, args) -> dict:
    if args.device.startswith("cuda"):
        return run_in_process(kind, row, args)
    passed = {k: v for k, v in vars(args).items()
              if k not in ("child", "row", "rows", "sampling", "sampling_only", "markdown", "cudnn_benchmark", "interleave", "load", "load_kind")}
    command = [sys.executable, __file__, "--child", kind, "--row", row] + [
        f"--{k.replace('_', '-')}" + ("" if isinstance(v, bool) else f"={v}") for k, v in passed.items() if v is not False
    ]
    env = dict(os.environ, PYTHONPATH=f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    result = subprocess.run(command, capture_output=True, text=True, env=env)
    if result.returncode != 0:
        tail = (result.stderr.strip().splitlines() or ["?"])[-1]
        return {"row": row, "error": tail}
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", choices=["sd14", "sd2", "sdxl", "tiny"], default="sd14")
    parser.add_argument("--latent", type=int, default=32, help="latent size (64 = 512 px images)")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default="fp32")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--rows", default=DEFAULT_ROWS, help="comma-separated rows (methods) to measure")
    parser.add_argument("--sampling", action="store_true", help="also time inference: base, unmerged, merged")
    parser.add_argument("--sampling-only", action="store_true", help="time inference only (no training table)")
    parser.add_argument(
        "--interleave", action="store_true",
        help="train every row's model in one process, a step each in turn: steadier ratios on a shared machine, no peak memory",
    )
    parser.add_argument(
        "--load", type=int, default=0, metavar="N",
        help="run beside N busy processes (a loaded machine: each spins on one core); with --interleave, every round also runs each row with them stopped, for its slow-down",
    )
    parser.add_argument(
        "--load-kind", choices=sorted(LOAD_CODE), default="spin",
        help="what each busy process runs: a Python spin loop (spin) or torch kernels on two threads (torch)",
    )
    parser.add_argument("--markdown", type=Path, help="append the tables to this Markdown file")
    parser.add_argument(
        "--cudnn-benchmark", action="store_true",
        help="let cuDNN autotune every convolution first (off by default, as in sdtune training; the autotuning "
        "of each row's shapes can take minutes)",
    )
    parser.add_argument(
        "--channels-last", action="store_true",
        help="the UNet's weights and the latents in channels-last memory format (cuDNN's NHWC kernels)",
    )
    parser.add_argument(
        "--compile", choices=["none", "default", "reduce-overhead", "max-autotune"], default="none",
        help="torch.compile every row's UNet in this mode (reduce-overhead: CUDA graphs, the host out of the step); "
        "its first steps compile, so give --warmup 3 or more",
    )
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--row", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.child:
        measure = measure_training if args.child == "train" else measure_sampling
        print(json.dumps(measure(args.row, args)))
        return

    import torch

    torch.backends.cudnn.benchmark = args.cudnn_benchmark
    header = (
        f"{args.arch} UNet, {args.latent}x{args.latent} latents, batch {args.batch}, {args.dtype}, "
        f"{device_name(args.device)}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"median of {args.steps} steps after {args.warmup}" + (", cuDNN autotuned" if args.cudnn_benchmark else "")
        + (", channels-last" if args.channels_last else "") + (f", compiled ({args.compile})" if args.compile != "none" else "")
        + (f", beside {args.load} busy processes ({args.load_kind})" if args.load else "")
    )
    print(header, flush=True)
    rows = [r.strip() for r in args.rows.split(",") if r.strip()]
    signal.signal(signal.SIGTERM, stop_early)  # `timeout` ends a run with SIGTERM: keep the rows measured so far
    lines, results, sampled, cut = [], [], [], False
    try:
        with BusyProcesses(args.load, args.load_kind) as busy:
            if args.interleave and not args.sampling_only:
                results = measure_interleaved(rows, args, busy)
            elif not args.sampling_only:
                for row in rows:
                    results.append(timed(run_child, "train", row, args))
            if args.sampling or args.sampling_only:
                for row in rows:
                    if row not in ("floor", "atoms-reference") and "[" not in row:
                        sampled.append(timed(run_child, "sample", row, args))
    except StoppedEarly:
        cut = True
    if results:
        lines = interleaved_table(results) if args.interleave else training_table(results)
    if sampled:
        lines += [""] + sampling_table(sampled)
    if cut:
        lines += ["", "(stopped early by SIGTERM: the rows not shown were not measured)"]
    text = "\n".join([f"**{header}**", ""] + lines)
    print(text, flush=True)
    if args.markdown:
        with open(args.markdown, "a", encoding="utf-8") as handle:
            handle.write("\n" + text + "\n")
    if cut:
        sys.exit(124)


class StoppedEarly(BaseException):
    """Raised by SIGTERM; a BaseException, so a row's own error handling does not swallow it."""


def stop_early(signum, frame) -> None:
    raise StoppedEarly


def timed(run, kind: str, row: str, args) -> dict:
    """Run one row and say on stderr how long it took in all (a cut-off run's log shows where time went)."""
    start = time.perf_counter()
    result = run(kind, row, args)
    outcome = f"failed: {result['error']}" if "error" in result else "done"
    print(f"  {kind} {row}: {outcome} in {time.perf_counter() - start:.1f} s", file=sys.stderr, flush=True)
    return result


def device_name(device: str) -> str:
    import torch

    return torch.cuda.get_device_name(device) if device.startswith("cuda") else device


def training_table(results: list[dict]) -> list[str]:
    by_row = {r["row"]: r for r in results if "error" not in r}
    floor, lora = by_row.get("floor"), by_row.get("lora")
    busy = any(r.get("gpu_busy") is not None for r in by_row.values())
    lines = [
        "| method | trainable | s/step | peak GB | ×floor | ×LoRA | peak ×floor | peak ×LoRA | first step's peak GB |"
        + (" GPU busy s |" if busy else ""),
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |" + (" ---: |" if busy else ""),
    ]
    for r in results:
        if "error" in r:
            lines.append(f"| {r['row']} | failed: {r['error']} | | | | | | | |" + (" |" if busy else ""))
            continue
        ratio = lambda base, key, digits=2: f"{r[key] / base[key]:.{digits}f}" if base else "–"  # noqa: E731
        lines.append(
            f"| {r['row']} | {r['trainable']:,} | {r['seconds']:.3f} | {r['peak_gb']:.3f} | "
            f"{ratio(floor, 'seconds')} | {ratio(lora, 'seconds')} | {ratio(floor, 'peak_gb', 3)} | {ratio(lora, 'peak_gb')} | "
            f"{r.get('first_peak_gb', r['peak_gb']):.3f} |"
            + ((f" {r['gpu_busy']:.3f} |" if r.get("gpu_busy") is not None else " – |") if busy else "")
        )
    if "atoms" in by_row and "atoms-reference" in by_row:
        lines.append("")
        lines.append(f"atoms / atoms-reference step time: {by_row['atoms']['seconds'] / by_row['atoms-reference']['seconds']:.2f}")
    return lines


def interleaved_table(results: list[dict]) -> list[str]:
    loaded = any("slowdown" in r for r in results)
    lines = [
        "| method | trainable | s/step | ×floor | ×LoRA |" + (" loaded s/step | loaded ×floor | loaded ×LoRA | slow-down | slow-down ×LoRA's |" if loaded else ""),
        "| --- | ---: | ---: | ---: | ---: |" + (" ---: | ---: | ---: | ---: | ---: |" if loaded else ""),
    ]
    for r in results:
        ratio = lambda key: f"{r[key]:.2f}" if key in r else "–"  # noqa: E731
        line = f"| {r['row']} | {r['trainable']:,} | {r['seconds']:.3f} | {ratio('floor_ratio')} | {ratio('lora_ratio')} |"
        if loaded:
            line += (
                f" {r['loaded_seconds']:.3f} | {ratio('loaded_floor_ratio')} | {ratio('loaded_lora_ratio')} |"
                f" {ratio('slowdown')} | {ratio('slowdown_lora_ratio')} |"
            )
        lines.append(line)
    atoms = next((r for r in results if r["row"] == "atoms"), None)
    if atoms and "atoms-reference_ratio" in atoms:
        lines += ["", f"atoms / atoms-reference step time: {atoms['atoms-reference_ratio']:.2f}"]
    lines += ["", "(rows timed in turns in one process; ratios are medians of the per-round ratios"
              + ("; each round also runs every row beside the busy processes, and a row's slow-down is the median"
                 " of its per-round loaded/unloaded ratios)" if loaded else ")")]
    return lines


def sampling_table(results: list[dict]) -> list[str]:
    lines = [
        "| method | base s | unmerged s | merged s | merged ×base | unmerged ×base | base GFLOP | merged FLOP ×base | unmerged FLOP ×base |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in results:
        if "error" in r:
            lines.append(f"| {r['row']} | failed: {r['error']} | | | | | | | |")
            continue
        lines.append(
            f"| {r['row']} | {r['base']:.3f} | {r['unmerged']:.3f} | {r['merged']:.3f} | "
            f"{r['merged_ratio']:.3f} | {r['unmerged_ratio']:.3f} | {r['base_gflop']:.1f} | "
            f"{r['merged_flop_ratio']:.4f} | {r['unmerged_flop_ratio']:.4f} |"
        )
    return lines


if __name__ == "__main__":
    main()
