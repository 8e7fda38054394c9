"""The whole `sdtune train` step against the bare UNet step of the same method and batch, and `sdtune sample`
against the plain diffusers pipeline: how much the loop and the sampler add to the model's own time.

    python benchmarks/loop.py                                        # CPU: tiny model, atoms and lora, batch 1 and 4
    python benchmarks/loop.py --model sd14 --latent 16               # CPU: SD v1.4 architecture, 16x16 latents
    python benchmarks/loop.py --model sd14 --latent 8 --sampling-only --sample-prompts 2 --sample-steps 4
    python benchmarks/loop.py --device cuda --model sd14 --mixed-precision bf16 --sampling   # the GPU tables

Training: for each method and batch size, one `Trainer` is set up exactly as `sdtune train` sets it up (default
settings: cached latents, TensorBoard when installed, metrics.jsonl, progress bar off) on the castle demo set,
and three things are timed:
- whole: one `Trainer.advance()`, everything the loop does for a step (data, noise, forward, loss, backward,
  optimizer, reading the values, finiteness, logs);
- bare: the bare UNet step of the same method on the trainer's own UNet (speed.py's step: fixed inputs,
  forward under autocast, MSE, backward, AdamW step, synchronised);
- floor: the same bare step on a plain UNet with nothing trainable (backward still runs to the input).
On a CPU the three are timed in turns, one of each per round (the first rotating), and the ratios are medians
of the per-round ratios, so a slow spell on a shared machine falls on all three alike. On a GPU the loop runs
`--warmup + --steps` steps on end, as in training, and the whole step is the median of the last `--steps`
`step_seconds` of metrics.jsonl (the time between the host reading one step and the next: the loop's pace);
then the bare and floor steps run on end, synchronised and timed one by one.

Sampling (`--sampling`): in fresh processes, so imports count, `sdtune.sample` with an adapter trained for
one step and the plain diffusers pipeline (`StableDiffusionPipeline.from_pretrained(..., torch_dtype)`, one
call per prompt, as a script would) draw the same prompts and seeds in the same dtype, writing PNGs.
start-up: from before the first import until the pipeline can draw (sdtune: libraries, load, adapter
injected and merged, cast; diffusers: libraries, from_pretrained, to the device); per image: the drawing
time (first call included, for both) over the images. Both load the weights' file lazily: the merge reads
(and writes) sdtune's weights at start-up, the plain pipeline's first call reads its own, so the last column,
start-up plus drawing, is the time a user waits for all the images.

Models: `tiny` (the embedded tiny-random), `sd14` (SD v1.4's architecture at full size with random weights,
built once into sdtune's cache, `sdtune.models.sd14_random_path`) or a diffusers folder.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from speed import StoppedEarly, stop_early, synchronize, timed_step  # noqa: E402 - the bare step is speed.py's


def model_folder(name: str, device: str) -> str:
    from sdtune.models import sd14_random_path, tiny_random_path

    if name == "tiny":
        return str(tiny_random_path())
    if name == "sd14":
        if device.startswith("cuda"):
            try:
                return str(sd14_random_path("cuda"))  # random weights are drawn in a moment there
            except Exception as error:  # noqa: BLE001 - the CPU builds the same architecture, more slowly
                progress(f"building on the GPU failed ({type(error).__name__}: {error}); building on the CPU")
        return str(sd14_random_path("cpu"))
    return name


def half_dtype(name: str):
    import torch

    return {"no": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[name]


# ---------------------------------------------------------------------------------------------
# Training


def bare_step(unet, parameters, batch: int, latent: int, embeddings, device: str, mixed_precision: str, floor: bool):
    """speed.py's bare UNet step on `unet`: returns a function that runs one and gives its seconds."""
    import torch

    dtype = half_dtype(mixed_precision)
    weight_dtype = dtype  # inputs in the autocast dtype, as speed.py's
    generator = torch.Generator().manual_seed(0)
    channels = unet.config.in_channels
    latents = torch.randn(batch, channels, latent, latent, generator=generator).to(device, weight_dtype)
    timesteps = torch.randint(0, 1000, (batch,), generator=generator).to(device)
    embeddings = embeddings.expand(batch, -1, -1).to(device, weight_dtype).contiguous()
    target = torch.randn_like(latents)
    optimizer = torch.optim.AdamW(parameters, lr=1e-9, foreach=True) if parameters else None  # as the trainer's
    if floor:
        latents.requires_grad_(True)
    return timed_step(unet, latents, timesteps, embeddings, target, optimizer, device, dtype)


def plain_unet(folder: str, device: str, mixed_precision: str):
    """The floor's UNet: the same weights, nothing trainable, frozen weights in the run's half dtype."""
    import torch
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(folder, subfolder="unet", use_safetensors=True)
    unet.requires_grad_(False)
    from sdtune.precision import cast_frozen_parameters

    # stored as the loop stores frozen weights: in the half dtype where it autocasts (bf16; fp16 on a GPU)
    if mixed_precision == "bf16" or (mixed_precision == "fp16" and torch.device(device).type == "cuda"):
        cast_frozen_parameters(unet, half_dtype(mixed_precision), ())
    return unet.to(device).train()


def measure_training(method: str, batch: int, folder: str, args, floor_unet, work: Path) -> dict:
    import torch

    from sdtune.config import TrainConfig
    from sdtune.tracking import read_metrics_log
    from sdtune.training import open_trainer

    rounds = args.warmup + args.steps
    config = TrainConfig(
        model=folder, method=method, batch_size=batch, steps=rounds, seed=0, resolution=args.latent * 8,
        mixed_precision=args.mixed_precision, output=str(work / f"{method}-batch{batch}"), compile=args.compile,
        compile_mode=args.compile_mode,
    )
    with open_trainer(config, progress=False) as trainer:
        embeddings = trainer.prompt_embeddings([trainer.config.prompt], trainer.device).encoder_hidden_states  # SD 1.x models
        unet = trainer.accelerator.unwrap_model(trainer.unet)
        bare = bare_step(unet, trainer.parameters, batch, args.latent, embeddings, args.device, args.mixed_precision, False)
        floor = bare_step(floor_unet, [], batch, args.latent, embeddings, args.device, args.mixed_precision, True)
        trainer.open_logs()
        times = {"whole": [], "bare": [], "floor": []}
        try:
            if args.interleave:
                def whole() -> float:
                    start = time.perf_counter()
                    trainer.advance()
                    return time.perf_counter() - start

                runs = {"whole": whole, "bare": bare, "floor": floor}
                names = list(runs)
                for round_ in range(rounds):
                    first = round_ % len(names)
                    spent = {name: runs[name]() for name in names[first:] + names[:first]}
                    if round_ >= args.warmup:
                        for name, seconds in spent.items():
                            times[name].append(seconds)
                    progress(f"{method} batch {batch} round {round_ + 1}/{rounds}: " + ", ".join(f"{k} {v:.3f} s" for k, v in spent.items()))
                trainer.finish_pending()
            else:
                synchronize(args.device)
                start = time.perf_counter()
                while trainer.global_step < rounds:
                    trainer.advance()
                    if trainer.global_step == args.warmup:
                        trainer.finish_pending()
                        synchronize(args.device)
                        start = time.perf_counter()
                trainer.finish_pending()
                synchronize(args.device)
                wall = (time.perf_counter() - start) / args.steps
                records = read_metrics_log(trainer.output / "metrics.jsonl")
                times["whole"] = [r["step_seconds"] for r in records if r["step"] > args.warmup]
                for name, run in (("bare", bare), ("floor", floor)):
                    measured = [run() for _ in range(rounds)]
                    times[name] = measured[args.warmup :]
        finally:
            trainer.close_logs()
        peak = torch.cuda.max_memory_allocated() / 2**30 if args.device.startswith("cuda") else None
    result = {"method": method, "batch": batch, **{name: statistics.median(t) for name, t in times.items()}}
    if args.interleave:
        result["whole_bare"] = statistics.median(w / b for w, b in zip(times["whole"], times["bare"]))
        result["whole_floor"] = statistics.median(w / f for w, f in zip(times["whole"], times["floor"]))
        result["bare_floor"] = statistics.median(b / f for b, f in zip(times["bare"], times["floor"]))
    else:
        result["wall"] = wall
        result["whole_bare"] = result["whole"] / result["bare"]
        result["whole_floor"] = result["whole"] / result["floor"]
        result["bare_floor"] = result["bare"] / result["floor"]
    if peak is not None:
        result["peak_gb"] = peak
    return result


def training_table(results: list[dict], interleaved: bool) -> list[str]:
    peak = any("peak_gb" in r for r in results)
    lines = [
        "| method | batch | whole step s | bare step s | floor s | whole ×bare | whole ×floor | bare ×floor |" + (" peak GB |" if peak else ""),
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |" + (" ---: |" if peak else ""),
    ]
    for r in results:
        if "error" in r:
            lines.append(f"| {r['method']} | {r['batch']} | failed: {r['error']} | | | | | |" + (" |" if peak else ""))
            continue
        lines.append(
            f"| {r['method']} | {r['batch']} | {r['whole']:.4f} | {r['bare']:.4f} | {r['floor']:.4f} | "
            f"{r['whole_bare']:.3f} | {r['whole_floor']:.3f} | {r['bare_floor']:.3f} |"
            + (f" {r.get('peak_gb', 0):.1f} |" if peak else "")
        )
    how = (
        "whole, bare and floor timed in turns in one process; ratios are medians of the per-round ratios"
        if interleaved else
        "whole: median step_seconds of metrics.jsonl over the timed steps, run on end; bare and floor: medians of "
        "synchronised steps on end"
    )
    if peak:  # the floor's own UNet stays on the device through every row
        how += ("; peak GB: torch.cuda.max_memory_allocated over the row (the trainer, the bare and floor steps, and the "
                "floor's UNet, held throughout)")
    return lines + ["", f"({how})"]


# ---------------------------------------------------------------------------------------------
# Sampling


PROMPTS = ("photo of a <castle>.", "a <castle> in the snow", "an oil painting of a <castle>", "a <castle> at dawn",
           "a <castle> by a lake", "a watercolour of a <castle>", "a <castle> in the fog", "a <castle> on a hill")


def sample_child(args) -> dict:
    """In a fresh process: `sdtune.sample` (kind "sdtune") or the plain pipeline (kind "diffusers")."""
    started = time.perf_counter()
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(args.sample_prompts)]
    seeds = list(range(args.sample_images))
    resolution = args.latent * 8
    output = Path(args.child_output)
    if args.child == "sdtune":
        from sdtune.config import SampleConfig
        from sdtune.sampling import sample

        called = time.perf_counter()
        result = sample(SampleConfig(
            adapter=args.child_adapter, prompt=prompts, num_images=len(seeds), steps=args.sample_steps,
            resolution=resolution, output=str(output), dtype=args.sample_dtype,
        ), progress=False)
        return {"kind": "sdtune", "startup": called - started + result.startup_seconds, "draw": result.draw_seconds,
                "images": result.images_drawn, "dtype": result.dtype}

    import torch
    from diffusers import StableDiffusionPipeline

    from sdtune.data import fill_placeholders

    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[args.sample_dtype]
    imported = time.perf_counter()
    pipe = StableDiffusionPipeline.from_pretrained(
        args.child_model, torch_dtype=dtype, safety_checker=None, feature_extractor=None, requires_safety_checker=False
    ).to(args.device)
    pipe.set_progress_bar_config(disable=True)
    synchronize(args.device)
    ready = time.perf_counter()
    (output / "images").mkdir(parents=True, exist_ok=True)
    for index, prompt in enumerate(prompts):
        generators = [torch.Generator(args.device).manual_seed(seed) for seed in seeds]
        images = pipe(fill_placeholders(prompt, "sks castle"), num_images_per_prompt=len(seeds), generator=generators,
                      num_inference_steps=args.sample_steps, guidance_scale=7.5, height=resolution, width=resolution).images
        for seed, image in zip(seeds, images):
            image.save(output / "images" / f"{index:03d}-seed{seed}.png")
    draw = time.perf_counter() - ready
    return {"kind": "diffusers", "startup": ready - started, "from_pretrained": ready - imported, "draw": draw,
            "images": len(prompts) * len(seeds), "dtype": args.sample_dtype}


def run_child(kind: str, args, model: str, adapter: str, output: Path) -> dict:
    command = [sys.executable, __file__, "--child", kind, "--child-model", model, "--child-adapter", adapter,
               "--child-output", str(output), "--device", args.device, "--latent", str(args.latent),
               "--sample-prompts", str(args.sample_prompts), "--sample-images", str(args.sample_images),
               "--sample-steps", str(args.sample_steps), "--sample-dtype", args.sample_dtype]
    env = dict(os.environ, PYTHONPATH=f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        return {"kind": kind, "error": (done.stderr.strip().splitlines() or ["?"])[-1][:200]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def measure_sampling(folder: str, args, work: Path, results: list[dict]) -> list[dict]:
    from sdtune.config import TrainConfig
    from sdtune.training import train

    run = train(TrainConfig(model=folder, steps=1, resolution=min(args.latent, 16) * 8, output=str(work / "sampling-adapter"),
                            log_with="none"), progress=False)
    for round_ in range(args.sample_rounds):
        for kind in ("sdtune", "diffusers") if round_ % 2 == 0 else ("diffusers", "sdtune"):
            result = run_child(kind, args, folder, str(run.adapter), work / f"samples-{kind}-{round_}")
            progress(f"sampling {kind} round {round_ + 1}: {result}")
            results.append(result)
    return results


def sampling_table(results: list[dict]) -> list[str]:
    lines = ["| sampler | dtype | start-up s | per image s | images | start-up + drawing s |",
             "| --- | --- | ---: | ---: | ---: | ---: |"]
    summary = {}
    for kind in ("sdtune", "diffusers"):
        mine = [r for r in results if r["kind"] == kind and "error" not in r]
        failed = [r for r in results if r["kind"] == kind and "error" in r]
        if failed:
            lines.append(f"| {kind} | | failed: {failed[0]['error']} | | | |")
        if not mine:
            continue
        startup = statistics.median(r["startup"] for r in mine)
        per_image = statistics.median(r["draw"] / r["images"] for r in mine)
        total = statistics.median(r["startup"] + r["draw"] for r in mine)
        summary[kind] = (startup, per_image, total)
        label = "sdtune sample" if kind == "sdtune" else "plain diffusers"
        lines.append(f"| {label} | {mine[0]['dtype']} | {startup:.2f} | {per_image:.3f} | {mine[0]['images']} | {total:.2f} |")
    if len(summary) == 2:
        (s_start, s_image, s_total), (d_start, d_image, d_total) = summary["sdtune"], summary["diffusers"]
        lines += ["", f"sdtune start-up − plain: {s_start - d_start:+.2f} s; per image sdtune/plain: {s_image / d_image:.3f}; "
                  f"start-up + drawing sdtune − plain: {s_total - d_total:+.2f} s (medians of {len(results) // 2} fresh "
                  "processes each)"]
    return lines


# ---------------------------------------------------------------------------------------------


def free_memory(device: str) -> None:
    import gc

    import torch

    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def progress(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def device_name(device: str) -> str:
    import platform

    import torch

    if device.startswith("cuda"):
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--model", default="tiny", help="tiny, sd14 or a diffusers folder")
    parser.add_argument("--latent", type=int, help="latent size (default: the model's: 8 for tiny, 64 for SD v1.4 = 512 px)")
    parser.add_argument("--methods", default="atoms,lora")
    parser.add_argument("--batches", default="1,4")
    parser.add_argument("--mixed-precision", default="no", choices=["no", "bf16", "fp16"])
    parser.add_argument("--compile", action="store_true", help="train with --compile (the bare step then runs compiled too)")
    parser.add_argument("--compile-mode", default="default",
                        help="with --compile: train with this --compile-mode (default, reduce-overhead: CUDA graphs on a "
                        "GPU, max-autotune or max-autotune-no-cudagraphs)")
    parser.add_argument("--steps", type=int, default=20, help="timed steps (rounds, on a CPU)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--interleave", action=argparse.BooleanOptionalAction, default=None,
                        help="time whole, bare and floor in turns (default: on a CPU)")
    parser.add_argument("--sampling", action="store_true", help="also time sampling against plain diffusers")
    parser.add_argument("--sampling-only", action="store_true")
    parser.add_argument("--sample-dtype", help="fp16, bf16 or fp32 (default: fp16 on a GPU, fp32 on a CPU)")
    parser.add_argument("--sample-prompts", type=int, default=8)
    parser.add_argument("--sample-images", type=int, default=2, help="images per prompt")
    parser.add_argument("--sample-steps", type=int, default=30)
    parser.add_argument("--sample-rounds", type=int, default=2, help="fresh processes of each sampler")
    parser.add_argument("--work", type=Path, help="a new folder for this call's runs goes in here (default: the temporary folder)")
    parser.add_argument("--markdown", type=Path, help="append the tables to this Markdown file")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--child-model", help=argparse.SUPPRESS)
    parser.add_argument("--child-adapter", help=argparse.SUPPRESS)
    parser.add_argument("--child-output", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.sample_dtype is None:
        args.sample_dtype = "fp16" if args.device.startswith("cuda") else "fp32"
    if args.child:
        print(json.dumps(sample_child(args)))
        return ""
    from sdtune.config import check_compile_mode  # not before a sampling child's clock starts
    from sdtune.errors import SdtuneError

    try:
        check_compile_mode(args.compile, args.compile_mode)
    except SdtuneError as error:
        parser.error(str(error))

    import torch

    from sdtune.models import quiet_libraries

    with quiet_libraries():
        if args.interleave is None:
            args.interleave = not args.device.startswith("cuda")
        folder = model_folder(args.model, args.device)
        if args.latent is None:
            args.latent = 8 if args.model == "tiny" else 64
        if args.work is not None:
            args.work.mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(prefix="sdtune-loop-", dir=args.work))  # each call's own: runs are never overwritten
        name = {"tiny": "tiny", "sd14": "SD v1.4 architecture (random weights)"}.get(args.model, args.model)
        header = (
            f"{name}, {args.latent}x{args.latent} latents ({args.latent * 8} px), {device_name(args.device)}, "
            f"torch {torch.__version__}, "
            + (f"sampling in {args.sample_dtype}" if args.sampling_only else f"mixed precision {args.mixed_precision}")
            + ((", compiled" + (f" ({args.compile_mode})" if args.compile_mode != "default" else "")) if args.compile else "")
        )
        progress(header)
        lines = [f"**{header}**", ""]
        signal.signal(signal.SIGTERM, stop_early)  # `timeout` ends a run with SIGTERM: keep the rows measured so far
        results, sampled, cut = [], [], False
        try:
            if not args.sampling_only:
                floor_unet = plain_unet(folder, args.device, args.mixed_precision)
                for method in [m.strip() for m in args.methods.split(",") if m.strip()]:
                    for batch in [int(b) for b in args.batches.split(",") if b.strip()]:
                        free_memory(args.device)
                        try:
                            results.append(measure_training(method, batch, folder, args, floor_unet, work))
                        except Exception as error:  # noqa: BLE001 - one failed row (out of memory, say) must not end the table
                            results.append({"method": method, "batch": batch, "error": f"{type(error).__name__}: {str(error)[:150]}"})
                        progress(json.dumps(results[-1]))
                del floor_unet
            if args.sampling or args.sampling_only:
                measure_sampling(folder, args, work, sampled)
        except StoppedEarly:
            cut = True
        if results:
            lines += training_table(results, args.interleave) + [""]
            lines.append(f"(median of {args.steps} steps after {args.warmup}; default settings: cached latents, "
                         f"logs on, `sdtune train --method M --batch-size B --mixed-precision {args.mixed_precision}`)")
        if sampled:
            lines += ["", f"Sampling, {args.sample_prompts} prompts × {args.sample_images} images, {args.sample_steps} steps, "
                      f"{args.latent * 8} px:", ""]
            lines += sampling_table(sampled)
        if cut:
            lines += ["", "(stopped early by SIGTERM: the rows not shown were not measured)"]
        text = "\n".join(lines)
        print(text, flush=True)
        if args.markdown and (results or sampled or not cut):
            with open(args.markdown, "a", encoding="utf-8") as handle:
                handle.write("\n" + text + "\n")
        if cut:
            sys.exit(124)
        return text


if __name__ == "__main__":
    main()
