"""Metrics against a direct computation on tiny random CLIP and DINO models; comparison files of two runs."""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
import statistics
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

import sdtune
from sdtune.cli import app
from sdtune.config import EvaluateConfig, TrainConfig
from sdtune.evaluation import MetricUnavailable, evaluate, pair_prompts
from sdtune.sampling import grid_size

runner = CliRunner()
IMAGE_SIZE = 48
PROMPT = "photo of a <castle>."


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def metric_models(tmp_path_factory):
    """A tiny random CLIP (with the tiny BPE tokenizer) and a tiny ViT, saved as model folders."""
    from transformers import (
        CLIPConfig,
        CLIPImageProcessor,
        CLIPModel,
        CLIPProcessor,
        CLIPTokenizer,
        ViTConfig,
        ViTImageProcessor,
        ViTModel,
    )

    from sdtune.models import _tiny_tokenizer_files

    root = tmp_path_factory.mktemp("metric-models")
    vocab, merges = _tiny_tokenizer_files()
    tokenizer = CLIPTokenizer(vocab=vocab, merges=merges)
    tokenizer.model_max_length = 77
    text = dict(
        vocab_size=len(vocab), hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=77, bos_token_id=vocab["<|startoftext|>"], eos_token_id=vocab["<|endoftext|>"],
        pad_token_id=vocab["<|endoftext|>"],
    )
    vision = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4, image_size=32, patch_size=8)
    torch.manual_seed(0)
    CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)).save_pretrained(root / "clip")
    image_processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(root / "clip")
    vit = ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37, image_size=32, patch_size=8)
    ViTModel(vit, add_pooling_layer=False).save_pretrained(root / "dino")
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(root / "dino")
    return root / "clip", root / "dino"


def _draw(folder, count, seed):
    """Images with some shared structure (a gradient) and some noise, so similarities are not trivial."""
    folder.mkdir()
    rng = np.random.default_rng(seed)
    ramp = np.linspace(0, 200, IMAGE_SIZE)[None, :, None]
    for k in range(count):
        pixels = ramp * rng.uniform(0.3, 1.0, size=3) + rng.normal(0, 40, size=(IMAGE_SIZE, IMAGE_SIZE, 3))
        Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(folder / f"{k:03d}-seed{k}.png")
    return folder


@pytest.fixture(scope="module")
def image_sets(tmp_path_factory):
    root = tmp_path_factory.mktemp("image-sets")
    return _draw(root / "generated", 4, seed=1), _draw(root / "reference", 4, seed=2)


def _pil(folder):
    return [Image.open(path).convert("RGB") for path in sorted(folder.iterdir())]


def _unit(x):
    return torch.nn.functional.normalize(x.double(), dim=-1)


@torch.no_grad()
def test_metrics_match_a_direct_computation(metric_models, image_sets, tmp_path):
    from scipy import linalg
    from transformers import AutoImageProcessor, CLIPModel, CLIPProcessor, ViTModel

    clip_path, dino_path = metric_models
    generated, reference = image_sets

    # CLIP by hand: the vision and text towers and their projections, not get_*_features.
    clip = CLIPModel.from_pretrained(clip_path).eval()
    processor = CLIPProcessor.from_pretrained(clip_path)

    def clip_image(images):
        pixels = processor(images=images, return_tensors="pt")["pixel_values"]
        return _unit(clip.visual_projection(clip.vision_model(pixel_values=pixels).pooler_output))

    def clip_text(text):
        tokens = processor(text=[text], return_tensors="pt", padding=True)
        return _unit(clip.text_projection(clip.text_model(**tokens).pooler_output))

    g_clip, r_clip = clip_image(_pil(generated)), clip_image(_pil(reference))
    # CLIPScore floors the mean of 100 x cosine at 0: take a prompt this random CLIP scores above 0.
    scores = {text: (100 * g_clip @ clip_text(text).T).mean().item() for text in ("photo of a castle.", "a castle", "a dog", "snow")}
    prompt, clip_t = max(scores.items(), key=lambda item: item[1])
    assert clip_t > 0

    result = evaluate(
        EvaluateConfig(
            images=str(generated), reference=str(reference), prompt=[prompt], output=str(tmp_path / "eval.json"),
            clip_model=str(clip_path), dino_model=str(dino_path), fid_features="dino",
        ),
        progress=False,
    )
    assert result.unavailable == {}
    assert json.loads((tmp_path / "eval.json").read_text())["metrics"] == result.metrics
    assert result.metrics["clip_t"] == pytest.approx(clip_t, rel=1e-4)
    assert result.metrics["clip_i"] == pytest.approx((g_clip @ r_clip.T).mean().item(), rel=1e-5)

    # DINO by hand: the class token.
    vit = ViTModel.from_pretrained(dino_path, add_pooling_layer=False).eval()
    vit_processor = AutoImageProcessor.from_pretrained(dino_path)

    def cls(images):
        return vit(pixel_values=vit_processor(images=images, return_tensors="pt")["pixel_values"]).last_hidden_state[:, 0]

    g_raw, r_raw = cls(_pil(generated)).double(), cls(_pil(reference)).double()
    g, r = _unit(g_raw), _unit(r_raw)
    assert result.metrics["dino"] == pytest.approx((g @ r.T).mean().item(), rel=1e-5)
    n = len(g)
    off_diagonal = (g @ g.T).sum() - (g @ g.T).diagonal().sum()
    assert result.metrics["diversity"] == pytest.approx(1 - off_diagonal.item() / (n * (n - 1)), rel=1e-5)

    # FID by hand on the raw class tokens: |mu1 - mu2|^2 + tr(S1 + S2 - 2 sqrt(S1 S2)).
    def moments(x):
        return x.mean(0).numpy(), np.cov(x.numpy(), rowvar=False)

    (mu_g, s_g), (mu_r, s_r) = moments(g_raw), moments(r_raw)
    fid = np.sum((mu_g - mu_r) ** 2) + np.trace(s_g + s_r) - 2 * np.trace(linalg.sqrtm(s_r @ s_g)).real
    assert result.metrics["fid"] == pytest.approx(fid, rel=1e-3, abs=1e-3)

    # KID by hand: unbiased MMD^2 with the cubic polynomial kernel; equal set sizes make one subset, std 0.
    d = g_raw.shape[1]
    kernel = lambda a, b: (a @ b.T / d + 1) ** 3
    k_gg, k_rr, k_gr = kernel(g_raw, g_raw), kernel(r_raw, r_raw), kernel(r_raw, g_raw)
    m = len(g_raw)
    mmd = ((k_gg.sum() - k_gg.diagonal().sum()) + (k_rr.sum() - k_rr.diagonal().sum())) / (m * (m - 1)) - 2 * k_gr.mean()
    assert result.metrics["kid"] == pytest.approx(mmd.item(), rel=1e-4, abs=1e-6)
    # every subset is a permutation of the same sets: the std is the float32 rounding of MMD², a
    # difference of kernel means (~1 here) summed in another order per subset
    assert result.metrics["kid_std"] == pytest.approx(0, abs=1e-5 * k_gg.abs().mean().item())


def test_missing_models_leave_the_other_metrics(metric_models, image_sets, tmp_path):
    clip_path, dino_path = metric_models
    generated, reference = image_sets
    not_a_model = tmp_path / "empty"
    not_a_model.mkdir()

    result = evaluate(
        EvaluateConfig(
            images=str(generated), reference=str(reference), prompt=[PROMPT], output=str(tmp_path / "a.json"),
            clip_model="nobody/no-such-clip", dino_model=str(dino_path), fid_features="clip",
        ),
        progress=False,
    )
    offline = "--clip-model nobody/no-such-clip: not in the local Hugging Face cache and the hub is offline"
    assert result.unavailable == {name: offline for name in ("clip_t", "clip_i", "fid", "kid", "kid_std")}
    assert set(result.metrics) == {"dino", "diversity"}

    result = evaluate(
        EvaluateConfig(
            images=str(generated), reference=str(reference), prompt=[PROMPT], output=str(tmp_path / "b.json"),
            clip_model=str(clip_path), dino_model=str(not_a_model), fid_features="inception",
        ),
        progress=False,
    )
    assert result.unavailable["dino"] == result.unavailable["diversity"] == f"--dino-model {not_a_model}: not a model folder (no config.json)"
    assert set(result.metrics) == {"clip_t", "clip_i"}
    try:
        import torch_fidelity  # noqa: F401
    except ModuleNotFoundError:
        assert "torch-fidelity" in result.unavailable["fid"]
    assert result.unavailable["kid"] == result.unavailable["fid"] and "\n" not in result.unavailable["fid"]
    assert "unavailable" in result.table() and "CLIP-I" in result.table()


def test_reasons_returned_to_python_name_settings_as_python_spells_them(image_sets, tmp_path):
    """Why a metric is unavailable, returned to Python code by `sdtune.evaluate`, names settings as the code gives them;
    eval.json, which the command line reads too, and `sdtune evaluate`'s table keep the flags."""
    settings = {"images": str(image_sets[0]), "reference": str(image_sets[1]), "prompt": [PROMPT], "clip_model": "nobody/no-such-clip",
                "dino_model": "nobody/no-such-dino", "fid_features": "none"}
    result = sdtune.evaluate(EvaluateConfig(output=str(tmp_path / "python.json"), **settings))
    assert result.metrics == {}
    assert result.unavailable["clip_t"] == 'clip_model="nobody/no-such-clip": not in the local Hugging Face cache and the hub is offline'
    assert result.unavailable["fid"] == 'fid_features="none"'
    assert json.loads((tmp_path / "python.json").read_text())["unavailable"]["fid"] == "--fid-features none"
    flags = [part for name, value in settings.items() for part in (f"--{name.replace('_', '-')}", *([value] if isinstance(value, str) else value))]
    result = invoke("evaluate", *flags, "--output", tmp_path / "cli.json")
    assert result.exit_code == 0, result.output
    assert "--fid-features none" in result.output and "--clip-model nobody/no-such-clip: not in" in result.output
    assert "fid_features" not in result.output and "clip_model" not in result.output


def test_without_reference_only_text_alignment_and_diversity(metric_models, image_sets, tmp_path):
    clip_path, dino_path = metric_models
    result = evaluate(
        EvaluateConfig(images=str(image_sets[0]), output=str(tmp_path / "eval.json"), clip_model=str(clip_path),
                       dino_model=str(dino_path), fid_features="dino"),
        progress=False,
    )
    assert set(result.metrics) == {"diversity"}
    assert result.unavailable["clip_i"].startswith("no reference images")
    assert result.unavailable["clip_t"].startswith("no prompts")


def test_eval_json_is_written_by_one_evaluation_at_a_time(metric_models, image_sets, tmp_path):
    """An evaluation finishing while another writes the same eval.json is refused in one line, the other's file
    untouched; what a killed one left of the file (an atomic write's temporary) is swept by the next."""
    from sdtune.errors import SdtuneError
    from sdtune.fileio import OutputLock, file_lock_name, temp_path

    clip_path, dino_path = metric_models
    output = tmp_path / "eval.json"
    config = EvaluateConfig(images=str(image_sets[0]), output=str(output), clip_model=str(clip_path),
                            dino_model=str(dino_path), fid_features="none")
    output.write_text("the other evaluation's\n")
    with OutputLock(tmp_path, file_lock_name("eval.json")), pytest.raises(SdtuneError, match="is in use by another sdtune run"):
        evaluate(config, progress=False)
    assert output.read_text() == "the other evaluation's\n"
    leftover = temp_path(output)  # as a killed evaluation's atomic write leaves it
    leftover.write_text("{")
    os.utime(leftover, (0, 0))  # older than the next lock
    evaluate(config, progress=False)
    assert "diversity" in json.loads(output.read_text())["metrics"]
    assert sorted(path.name for path in tmp_path.iterdir() if path.name.startswith(".")) == []


def test_an_evaluation_of_a_run_whose_eval_json_is_in_use_is_refused_before_it_draws(two_runs, metric_models, tmp_path):
    """The eval.json's lock is held for the whole evaluation: a second one of the same run is refused in one line
    (exit 2) at once, drawing nothing over the samples the other measures and leaving its eval.json as it was."""
    from test_cli import assert_one_line_error

    from sdtune.evaluation import SAMPLES_FOLDER
    from sdtune.fileio import OutputLock, file_lock_name

    clip_path, dino_path = metric_models
    run = tmp_path / "run"
    shutil.copytree(two_runs[1], run, ignore=shutil.ignore_patterns("eval*"))
    (run / "eval.json").write_text("the other evaluation's\n")
    (run / SAMPLES_FOLDER).mkdir()  # the other's, being drawn
    before = {path: path.read_bytes() if path.is_file() else None for path in run.rglob("*")}
    with OutputLock(run, file_lock_name("eval.json")):
        result = invoke("evaluate", "--run", run, "--num-images", 1, "--steps", 1, "--clip-model", clip_path,
                        "--dino-model", dino_path, "--fid-features", "none")
    assert_one_line_error(result, 2, f"--output {run / 'eval.json'} is in use by another sdtune run (pid {os.getpid()}")
    assert "sample:" not in result.stderr  # refused before drawing
    assert {path: path.read_bytes() if path.is_file() else None for path in run.rglob("*")} == before


def test_evaluations_of_one_run_with_different_outputs_draw_apart(two_runs, metric_models, tmp_path):
    """An evaluation with its own --output draws into its own samples folder while the run's default evaluation draws
    into eval-samples/: neither waits for nor mixes with the other's images; a rerun draws its own folder again; two
    evaluations that would draw into one folder are refused in one line before drawing."""
    from test_cli import assert_one_line_error

    from sdtune.evaluation import SAMPLES_FOLDER
    from sdtune.fileio import OutputLock, file_lock_name

    clip_path, dino_path = metric_models
    run = tmp_path / "run"
    shutil.copytree(two_runs[1], run, ignore=shutil.ignore_patterns("eval*"))
    default_samples = run / SAMPLES_FOLDER
    (default_samples / "images").mkdir(parents=True)
    (default_samples / "images" / "000-seed0.png").write_bytes(b"the default evaluation's, being drawn")
    before = {path: path.read_bytes() for path in default_samples.rglob("*") if path.is_file()}
    args = ("evaluate", "--run", run, "--num-images", 1, "--steps", 1, "--clip-model", clip_path,
            "--dino-model", dino_path, "--fid-features", "none")
    output = tmp_path / "other.json"
    # the run's default evaluation, drawing: it holds eval.json's lock, its samples folder's and (sample's) the folder's own
    with OutputLock(run, file_lock_name("eval.json")), OutputLock(run, file_lock_name(SAMPLES_FOLDER)), OutputLock(default_samples):
        for _ in range(2):  # a rerun draws into the same folder again
            result = invoke(*args, "--output", output)
            assert result.exit_code == 0, result.output
            assert sorted(path.name for path in (tmp_path / "other-samples" / "images").iterdir()) == ["000-seed0.png"]
    report = json.loads(output.read_text())
    assert report["images"] == str(tmp_path / "other-samples" / "images") and report["generated_images"] == 1
    assert {path: path.read_bytes() for path in default_samples.rglob("*") if path.is_file()} == before
    assert not (run / "eval.json").exists()
    # other.txt would draw into other-samples/ too: refused while other.json's evaluation holds it, nothing drawn
    drawn = {path: path.read_bytes() for path in (tmp_path / "other-samples").rglob("*") if path.is_file()}
    with OutputLock(tmp_path, file_lock_name("other-samples")):
        result = invoke(*args, "--output", tmp_path / "other.txt")
    assert_one_line_error(result, 2, f"samples folder {tmp_path / 'other-samples'} is in use by another sdtune run (pid {os.getpid()}")
    assert "sample:" not in result.stderr and not (tmp_path / "other.txt").exists()
    assert {path: path.read_bytes() for path in (tmp_path / "other-samples").rglob("*") if path.is_file()} == drawn


def test_images_pair_with_prompts_by_sample_index(tmp_path):
    files = [tmp_path / name for name in ("000-seed0.png", "000-seed1.png", "001-seed0.png")]
    assert pair_prompts(files, ["a", "b"]) == ["a", "a", "b"]
    assert pair_prompts(files, ["only"]) == ["only"] * 3
    with pytest.raises(MetricUnavailable, match="cannot tell 005-seed0.png's prompt among 2"):
        pair_prompts([tmp_path / "005-seed0.png"], ["a", "b"])
    with pytest.raises(MetricUnavailable, match="cannot tell photo.png's prompt"):
        pair_prompts([tmp_path / "photo.png"], ["a", "b"])


def test_a_strength_sweep_folder_is_measured_one_strength_at_a_time(metric_models, image_sets, tmp_path):
    from sdtune.errors import SdtuneError
    from sdtune.evaluation import one_strength

    clip_path, dino_path = metric_models
    sweep = tmp_path / "sweep" / "images"
    sweep.mkdir(parents=True)
    originals = sorted(image_sets[0].iterdir())  # four different images
    for strength, pair in (("0", originals[:2]), ("0.5", originals[2:])):
        for seed, source in enumerate(pair):
            (sweep / f"000-scale{strength}-seed{seed}.png").write_bytes(source.read_bytes())
    files = sorted(sweep.iterdir())
    assert [p.name for p in one_strength(files, 0.5, "sweep")] == ["000-scale0.5-seed0.png", "000-scale0.5-seed1.png"]
    assert pair_prompts(files, ["a", "b"]) == ["a"] * 4  # NNN still names the prompt
    with pytest.raises(SdtuneError, match="sweep holds images drawn at adapter strengths 0, 0.5: pick one with --adapter-scale"):
        one_strength(files, 1.0, "sweep")

    def diversity(strength):
        config = EvaluateConfig(images=str(sweep.parent), output=str(tmp_path / f"{strength}.json"), adapter_scale=strength,
                                clip_model=str(clip_path), dino_model=str(dino_path), fid_features="none")
        result = evaluate(config, progress=False)
        assert result.report["adapter_scale"] == strength
        return result.metrics["diversity"]

    plain = tmp_path / "plain"
    plain.mkdir()
    for source in originals[2:]:
        (plain / source.name).write_bytes(source.read_bytes())
    expected = evaluate(EvaluateConfig(images=str(plain), output=str(tmp_path / "plain.json"), clip_model=str(clip_path),
                                       dino_model=str(dino_path), fid_features="none"), progress=False)
    assert "adapter_scale" not in expected.report
    expected = expected.metrics["diversity"]
    assert diversity(0.5) == expected != diversity(0)


# ---------------------------------------------------------------------------------------------
# Runs: evaluate and compare end to end


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory, private_cache):
    from sdtune.training import train

    root = tmp_path_factory.mktemp("runs")
    runs = []
    for method, options in (("atoms", {}), ("lora", {"rank": 2})):
        run = train(TrainConfig(model="tiny-random", method=method, options=options, steps=3, output=str(root / method)), progress=False)
        runs.append(run.output)
    return runs


@pytest.fixture(scope="module")
def evaluated_run(two_runs, metric_models):
    """The atoms run measured through the library: two sampled images, FID on DINO features."""
    clip_path, dino_path = metric_models
    result = sdtune.evaluate(
        EvaluateConfig(run=str(two_runs[0]), num_images=2, steps=1, clip_model=str(clip_path),
                       dino_model=str(dino_path), fid_features="dino")
    )
    assert result.output == two_runs[0] / "eval.json" and result.unavailable == {}
    return two_runs[0]


def test_evaluate_command_samples_the_run_and_writes_eval_json(two_runs, metric_models):
    clip_path, dino_path = metric_models
    run = two_runs[1]
    result = invoke(
        "evaluate", "--run", run, "--num-images", 2, "--steps", 1, "--clip-model", clip_path,
        "--dino-model", dino_path, "--fid-features", "clip", "--scheduler", "ddim", "--adapter-scale", 0.5,
        "--negative-prompt", "blurry",
    )
    assert result.exit_code == 0, result.output
    report = json.loads((run / "eval.json").read_text())
    assert (report["scheduler"], report["adapter_scale"], report["negative_prompt"]) == ("ddim", 0.5, "blurry")
    (run / "eval.json").unlink()  # the comparison below needs one run without measurements
    assert report["method"] == "lora" and report["num_parameters"] > 0
    assert report["prompts"] == [PROMPT] and report["generated_images"] == 2 and report["reference_images"] == 8
    assert set(report["metrics"]) == {"clip_t", "clip_i", "dino", "fid", "kid", "kid_std", "diversity"}
    assert len(list((run / "eval-samples" / "images").iterdir())) == 2
    for title in ("CLIP-T", "CLIP-I", "DINO", "FID", "KID", "diversity"):
        assert title in result.stdout


def test_evaluate_samples_at_width_and_height_and_frames_the_reference_alike(two_runs, metric_models, tmp_path):
    from sdtune.evaluation import read_images, run_reference

    clip_path, dino_path = metric_models
    run = shutil.copytree(two_runs[0], tmp_path / "run", ignore=shutil.ignore_patterns("eval*"))
    output = tmp_path / "eval.json"
    result = invoke("evaluate", "--run", run, "--num-images", 1, "--steps", 1, "--width", 64, "--height", 32,
                    "--clip-model", clip_path, "--dino-model", dino_path, "--fid-features", "none", "--output", output)
    assert result.exit_code == 0, result.output
    report = json.loads(output.read_text())
    assert (report["width"], report["height"]) == (64, 32) and {"clip_i", "dino"} <= set(report["metrics"])
    # drawn beside the results file it was given: the run's own eval-samples/ are its default evaluation's
    assert [Image.open(path).size for path in (tmp_path / "eval-samples" / "images").iterdir()] == [(64, 32)]
    assert not (run / "eval-samples").exists()
    # the reference images as the metrics see them: covering 64x32 and center-cropped to it, not squares
    reference = read_images(run_reference(run), size=(64, 32))
    assert {tuple(image.shape) for image in reference} == {(3, 32, 64)}


@pytest.mark.parametrize(
    "args,pattern",
    [
        ((), "give a run to sample from"),
        (("--images", "/no/such/folder"), "image folder not found"),
        (("--run", "/no/run"), "adapter not found"),
        (("--images", ".", "--fid-features", "pixels"), "--fid-features must be one of"),
        (("--images", ".", "--scheduler", "fast"), "--scheduler must be one of"),
    ],
)
def test_evaluate_bad_input_is_one_line_exit_2(args, pattern):
    result = invoke("evaluate", *args)
    assert result.exit_code == 2, result.output
    assert result.stderr.strip().splitlines()[-1].startswith("error: ") and pattern in result.stderr


def test_compare_writes_table_csv_plots_and_grid(two_runs, evaluated_run, tmp_path):
    from sdtune.adapter import read_adapter

    evaluated, plain = two_runs
    report = json.loads((evaluated / "eval.json").read_text())
    assert not (plain / "eval.json").exists()

    result = sdtune.compare([str(evaluated), str(plain)], str(tmp_path / "cmp"), prompt=[PROMPT, "a <castle> at night"], steps=1, progress=False)
    out = tmp_path / "cmp"
    assert callable(sdtune.compare) and callable(sdtune.evaluate)  # the submodules do not shadow the functions
    metric_names = ["clip_t", "clip_i", "dino", "fid", "kid", "diversity"]
    expected = {"comparison.md", "comparison.csv", "training-loss-vs-step.png", "grid.png"} | {f"{m}-vs-trainable-parameters.png" for m in metric_names}
    assert expected <= {p.name for p in out.iterdir()}
    assert {p.name for p in result.files} == expected

    with open(out / "comparison.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [row["run"] for row in rows] == ["atoms", "lora"] and [row["method"] for row in rows] == ["atoms", "lora"]
    assert list(rows[0]) == [
        "run", "method", "variant", "settings", "model", "resolution", "trainable_parameters", "adapter_bytes", "train_seconds_per_step",
        "peak_memory_mb",
        "clip_t", "clip_i", "dino", "fid", "kid", "kid_std", "diversity",
        "digit_fidelity", "style_fidelity", "preservation",
    ]
    for row, run in zip(rows, two_runs):
        info = read_adapter(run)[0]
        assert int(row["trainable_parameters"]) == int(info.extra["num_parameters"])
        assert int(row["adapter_bytes"]) == (run / "adapter.safetensors").stat().st_size
        seconds = [json.loads(line)["step_seconds"] for line in (run / "metrics.jsonl").read_text().splitlines()]
        assert float(row["train_seconds_per_step"]) == pytest.approx(statistics.median(seconds))
        assert row["peak_memory_mb"] == ""
    assert rows[0]["variant"] == "defaults" and "rank=2" in rows[1]["variant"]
    for name, value in report["metrics"].items():
        assert float(rows[0][name]) == pytest.approx(value)
    assert all(rows[1][name] == "" for name in metric_names + ["kid_std", "digit_fidelity", "preservation"])

    table = re.sub(" +", " ", (out / "comparison.md").read_text())
    assert "| atoms | atoms | defaults | lr=0.001 | 4,212 |" in table and "lora: not evaluated" in table
    assert "![grid](grid.png)" in table and "![training-loss-vs-step](training-loss-vs-step.png)" in table
    grid = Image.open(out / "grid.png")
    assert grid.size == grid_size(rows=2, columns=2, image_size=(64, 64), header=True)


def test_compare_grid_column_labels_show_whole_run_names_within_their_columns():
    """A tiny model's 64 px images leave narrow columns: each run's label is wrapped to its column's width, in as many
    lines as it needs (the label band grows), never cut short nor running into the next column."""
    from PIL import ImageFont

    from sdtune.sampling import CAPTION_LINE_HEIGHT, CAPTION_LINES, GRID_PAD, fitted_lines, make_grid

    labels = ["castle-lora-rank-8-alpha-8-dropout-0.1-conv-seed-3 (lora, 1,234,567)",
              "WWWWWWWWWWWWWWWWWWWWWWWWWWWWWWWWWWWWWWWWWWWWWWWWWWWWWWWW (atoms, 4,212)"]
    images = [Image.new("RGB", (64, 64), "white"), Image.new("RGB", (64, 64), "white")]
    grid = np.asarray(make_grid([images], ["a castle"], column_labels=labels).convert("L"))
    font = ImageFont.load_default(size=11)
    column = 128  # a 64 px image is shown at MIN_CELL
    wrapped = [fitted_lines(label, column, font) for label in labels]
    for label, lines in zip(labels, wrapped):
        assert " ".join(lines).replace(" ", "") == label.replace(" ", "") and all(font.getlength(l) <= column for l in lines)
    header = max(map(len, wrapped))
    assert header > CAPTION_LINES  # more lines than the band had: a whole label needs them
    assert grid.shape[0] == GRID_PAD + header * CAPTION_LINE_HEIGHT + 128 + CAPTION_LINES * CAPTION_LINE_HEIGHT + GRID_PAD
    for index, lines in enumerate(wrapped):
        left = GRID_PAD + index * (column + GRID_PAD)
        inked = [(grid[GRID_PAD + k * CAPTION_LINE_HEIGHT: GRID_PAD + (k + 1) * CAPTION_LINE_HEIGHT, left:left + column] < 128).any()
                 for k in range(header)]
        assert inked == [k < len(lines) for k in range(header)], (index, inked)
    between = grid[: GRID_PAD + header * CAPTION_LINE_HEIGHT, GRID_PAD + column: 2 * GRID_PAD + column]
    assert (between >= 128).all()  # the first label stays in its column


def test_compare_grid_draws_prompt_lines_with_their_options_keeping_each_images_aspect(two_runs, tmp_path):
    """A --prompts line's --w, --h, --d, ... are drawn alike for every run (as `sdtune sample` draws them); the grid lays
    rows of other aspects out as they are; a line's size the model cannot take is refused, naming it, before anything
    is written."""
    from sdtune.comparison import GRID_PROMPTS_FILE
    from sdtune.data import read_prompt_lines
    from sdtune.errors import SdtuneError

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("# grid\na <castle> --w 128 --h 64 --d 3 --n fog --l 4.5\na <castle> at night --h 96\n")
    out = tmp_path / "cmp"
    sdtune.compare([str(run) for run in two_runs], str(out), prompt=["plain <castle>"], prompts=str(prompts), steps=1, progress=False)
    grid = Image.open(out / "grid.png")
    assert grid.size == grid_size(rows=3, columns=2, image_size=(64, 64), header=True, row_sizes=[(64, 64), (128, 64), (64, 96)])
    for run in two_runs:
        drawn = sorted((out / "samples" / run.name / "images").iterdir())
        assert [path.name for path in drawn] == ["000-seed0.png", "001-seed3.png", "002-seed0.png"]
        assert [Image.open(path).size for path in drawn] == [(64, 64), (128, 64), (64, 96)]
    written = read_prompt_lines(out / "samples" / GRID_PROMPTS_FILE)
    assert [(line.prompt, line.width, line.height, line.seed, line.negative_prompt, line.guidance) for line in written] == [
        ("a <castle>", 128, 64, 3, "fog", 4.5), ("a <castle> at night", None, 96, None, None, None)]

    prompts.write_text("a castle\na tower --w 8\n")
    with pytest.raises(SdtuneError, match=f"^{prompts} line 2: --width 8 is too small for tiny-random"):
        sdtune.compare([str(run) for run in two_runs], str(tmp_path / "refused"), prompts=str(prompts), steps=1, progress=False)
    assert not (tmp_path / "refused").exists()


def test_a_run_trained_on_base_adapters_is_compared_and_evaluated_on_them(two_runs, metric_models, tmp_path, monkeypatch):
    """compare and evaluate take no adapters to stack: a run whose config.toml names base adapters, found with the digests
    its adapter recorded, is drawn stacked on them, as it trained; without them it is drawn alone, with a warning."""
    from sdtune.training import train

    monkeypatch.chdir(tmp_path)  # config.toml names the base adapter as given, relative to where the run started
    shutil.copy(two_runs[1] / "adapter.safetensors", tmp_path / "style.safetensors")
    on_top = train(TrainConfig(model="tiny-random", method="lora", steps=1, base_adapters=["style.safetensors:0.5"],
                               output=str(tmp_path / "on-top"), log_with="none"), progress=False).output

    def drawn(folder):
        settings = json.loads(Image.open(next(folder.iterdir())).text["sdtune"])
        return settings["adapter"], settings["adapter_scale"]

    sdtune.compare([str(on_top)], str(tmp_path / "cmp"), prompt=["a <castle>"], steps=1, progress=False)
    assert drawn(tmp_path / "cmp" / "samples" / "on-top" / "images") == (["style.safetensors", "on-top"], [0.5, 1.0])
    clip_path, dino_path = metric_models
    sdtune.evaluate(EvaluateConfig(run=str(on_top), num_images=1, steps=1, adapter_scale=0.8, clip_model=str(clip_path),
                                   dino_model=str(dino_path), fid_features="none"))
    assert drawn(on_top / "eval-samples" / "images") == (["style.safetensors", "on-top"], [0.5, 0.8])
    (tmp_path / "style.safetensors").unlink()
    with pytest.warns(UserWarning, match="on-top was trained on top of base adapters that are not loaded with it"):
        sdtune.compare([str(on_top)], str(tmp_path / "cmp"), prompt=["a <castle>"], steps=1, progress=False)
    assert drawn(tmp_path / "cmp" / "samples" / "on-top" / "images") == ("on-top", 1.0)


def test_compare_command_without_grid_and_bad_run(two_runs, tmp_path):
    result = invoke("compare", *two_runs, "--output", tmp_path / "cmp", "--no-grid")
    assert result.exit_code == 0, result.output
    names = {p.name for p in (tmp_path / "cmp").iterdir()}
    assert {"comparison.md", "comparison.csv", "training-loss-vs-step.png"} <= names and "grid.png" not in names
    (tmp_path / "not-a-run").mkdir()
    result = invoke("compare", tmp_path / "not-a-run", "--output", tmp_path / "cmp2")
    assert result.exit_code == 2 and "not a run folder" in result.stderr


def test_a_second_comparison_into_a_folder_in_use_is_refused(two_runs, tmp_path):
    """Two `sdtune compare` into one folder: the one that finds the other's lock is refused in one line (exit 2) and
    changes nothing the other wrote; the temporary of a comparison killed mid-write is swept by the next, a person's
    own file that looks like one is not."""
    from test_cli import assert_one_line_error

    from sdtune.fileio import LOCK_FILE, OutputLock, temp_path

    out = tmp_path / "cmp"
    sdtune.compare([str(run) for run in two_runs], str(out), grid=False, progress=False)
    written = {path: path.read_bytes() for path in out.rglob("*") if path.is_file()}
    with OutputLock(out):
        result = invoke("compare", two_runs[0], "--output", out, "--no-grid")
    assert_one_line_error(result, 2, f"output folder {out} is in use by another sdtune run (pid {os.getpid()}")
    assert {path: path.read_bytes() for path in out.rglob("*") if path.is_file()} == written
    killed, foreign = temp_path(out / "comparison.csv"), temp_path(out / "notes.txt")
    for leftover in (killed, foreign):
        leftover.write_text("run,method\n")
        os.utime(leftover, (0, 0))  # older than the next command's lock
    result = invoke("compare", two_runs[0], "--output", out, "--no-grid")
    assert result.exit_code == 0, result.output
    assert not killed.exists() and foreign.exists() and not (out / LOCK_FILE).exists()
    assert [row["run"] for row in csv.DictReader(open(out / "comparison.csv", newline=""))] == ["atoms"]

def test_compare_reads_the_quality_benchmark_metrics(two_runs, tmp_path):
    """benchmarks/quality.py writes digit fidelity, style fidelity and preservation into eval.json."""
    import shutil

    from sdtune.evaluation import FORMAT

    run = tmp_path / "atoms"
    shutil.copytree(two_runs[1], run)
    metrics = {"digit_fidelity": 0.91, "style_fidelity": 0.42, "preservation": 0.75}
    (run / "eval.json").write_text(json.dumps({"format": FORMAT, "metrics": metrics, "unavailable": {}}))
    result = sdtune.compare([str(run)], str(tmp_path / "cmp"), grid=False, progress=False)
    with open(tmp_path / "cmp" / "comparison.csv", newline="") as handle:
        row = next(csv.DictReader(handle))
    assert {name: float(row[name]) for name in metrics} == metrics
    assert "| digit fidelity | style fidelity | preservation |" in result.table
    assert {"digit_fidelity-vs-trainable-parameters.png", "preservation-vs-trainable-parameters.png"} <= {p.name for p in result.files}


def test_read_evaluation_of_missing_damaged_and_foreign_files(tmp_path):
    from sdtune.errors import SdtuneError
    from sdtune.evaluation import read_evaluation

    assert read_evaluation(tmp_path) is None
    (tmp_path / "eval.json").write_text('{"metrics": ')
    with pytest.raises(SdtuneError, match="eval.json: not valid JSON"):
        read_evaluation(tmp_path)
    (tmp_path / "eval.json").write_text('{"metrics": {}}')
    with pytest.raises(SdtuneError, match="not an sdtune evaluation"):
        read_evaluation(tmp_path)


def test_reference_images_come_from_the_runs_data_root(tmp_path):
    """A run trained on ROOT/NAME (--data-root) is measured against those images, not the demo set."""
    from sdtune.evaluation import run_reference

    folder = tmp_path / "photos" / "castle"
    folder.mkdir(parents=True)
    for index in range(2):
        Image.new("RGB", (8, 8), (index * 100, 0, 0)).save(folder / f"{index}.png")
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.toml").write_text(f'concept = "castle"\ndata_root = "{tmp_path / "photos"}"\n')
    assert sorted(p.name for p in run_reference(run)) == ["0.png", "1.png"]


def test_a_dataset_runs_reference_and_prompts_are_its_dataset(tmp_path):
    """A run trained with --dataset is measured against its dataset's images (its classes only) with one caption
    a class, not against a concept's folder that does not exist with its training prompt."""
    from sdtune.evaluation import read_images, reference_source, run_prompts, run_reference
    from sdtune.config import EvaluateConfig

    root = tmp_path / "shapes"
    for name in ("red_ball", "blue_box", "green_cone"):
        (root / name).mkdir(parents=True)
        for index in range(2):
            Image.new("RGB", (8, 8), (index * 100, 0, 0)).save(root / name / f"{index}.png")
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.toml").write_text(
        f'concept = "castle"\ntemplate = "photo of a {{token}}."\ndataset = "imagefolder"\ndata_root = "{root}"\n'
        'classes = ["red ball", "green_cone"]\nmax_per_class = 0\nseed = 0\n'
    )
    assert sorted(str(p.relative_to(root)) for p in run_reference(run)) == [
        "green_cone/0.png", "green_cone/1.png", "red_ball/0.png", "red_ball/1.png"]
    assert run_prompts(run, "<castle>") == ["a photo of a red ball.", "a photo of a green cone."]
    assert reference_source(EvaluateConfig(run=str(run)), run, run_reference(run)) == f"dataset imagefolder ({root})"

    # digits lives in memory: its examples come as images, read like files
    (run / "config.toml").write_text('dataset = "digits"\nclasses = ["three"]\nmax_per_class = 3\nseed = 0\n')
    images = read_images(run_reference(run), size=(16, 16))
    assert len(images) == 3 and all(tuple(image.shape) == (3, 16, 16) for image in images)
    assert run_prompts(run, "") == ["This is a picture of the handwritten digit three."]

    # all 5,000 digits: at most MAX_DATASET_REFERENCE, as many of each class
    from sdtune.evaluation import MAX_DATASET_REFERENCE, run_dataset

    (run / "config.toml").write_text('dataset = "digits"\nseed = 0\n')
    labels = [example.label for example in run_dataset(run).examples]
    assert len(labels) == MAX_DATASET_REFERENCE == 2000 and {labels.count(label) for label in set(labels)} == {200}


def test_a_concept_runs_prompt_is_its_training_template_read_once(tmp_path, monkeypatch):
    """With no prompt given, a concept run is measured with its training prompt: config.toml's template, the file
    read once; a run without one has the default template."""
    import sdtune.config
    from sdtune.evaluation import run_prompts

    run = tmp_path / "run"
    run.mkdir()
    (run / "config.toml").write_text('concept = "castle"\ntemplate = "a painting of {token}"\n')
    reads = []
    read_toml = sdtune.config.read_toml
    monkeypatch.setattr(sdtune.config, "read_toml", lambda path: reads.append(path) or read_toml(path))
    assert run_prompts(run, "<castle>") == ["a painting of <castle>"]
    assert reads == [run / "config.toml"]
    (run / "config.toml").unlink()
    assert run_prompts(run, "<castle>") == ["photo of a <castle>."]


def test_missing_metrics_are_one_line_a_reason_not_a_line_a_metric_and_run(tmp_path):
    from sdtune.comparison import RunSummary, unavailable_notes

    offline = "--clip-model x: not in the local Hugging Face cache and the hub is offline"
    runs = [RunSummary(name, tmp_path / name, "lora", "defaults", 1, 1,
                       unavailable={"clip_t": offline, "clip_i": offline, "fid": "--fid-features none"}) for name in ("a", "b")]
    runs.append(RunSummary("c", tmp_path / "c", "atoms", "defaults", 1, 1, unavailable={"fid": "--fid-features none"}))
    assert unavailable_notes(runs) == [
        f"- CLIP-T, CLIP-I unavailable for a, b: {offline}",
        "- FID unavailable for every run: --fid-features none",
    ]
    assert unavailable_notes(runs[2:]) == ["- FID unavailable for c: --fid-features none"]


def test_a_run_whose_adapter_is_not_of_its_last_step_is_named_unfinished(tmp_path):
    """compare and evaluate say when a run's adapter is of an earlier step than its --steps: training now (its lock's
    holder alive) or stopped early; a finished run, or one without config.toml, says nothing."""
    import socket
    import subprocess

    from sdtune.adapter import unfinished_run

    (tmp_path / "config.toml").write_text("steps = 40\n")
    assert unfinished_run(tmp_path, "40") == ""
    assert unfinished_run(tmp_path, "16") == "step 16 of 40, stopped early"
    trainer = subprocess.Popen(["sleep", "60"])
    try:
        (tmp_path / ".sdtune.lock").write_text(f"{trainer.pid} {socket.gethostname()}\n")
        assert unfinished_run(tmp_path, "16") == f"step 16 of 40, training now (pid {trainer.pid} on {socket.gethostname()})"
    finally:
        trainer.kill()
        trainer.wait()
    assert unfinished_run(tmp_path, "16") == "step 16 of 40, stopped early"  # a killed run's lock file tells nothing
    assert unfinished_run(tmp_path, "") == "" and unfinished_run(tmp_path / "none", "16") == ""


def test_the_comparison_shows_base_model_and_size_where_the_runs_differ_in_them(tmp_path):
    from sdtune.comparison import RunSummary, markdown_table

    same = [RunSummary(name, tmp_path / name, "lora", "defaults", 1, 1, model="tiny") for name in ("a", "b")]
    assert markdown_table(same, []).splitlines()[0] == "| run | method | variant  | trainable | adapter | s/step |"
    mixed = same + [RunSummary("c", tmp_path / "c", "atoms", "defaults", 1, 1, model="tiny-sdxl-random", resolution=32)]
    lines = markdown_table(mixed, []).splitlines()
    assert lines[0] == "| run | method | variant  | model            | px     | trainable | adapter | s/step |"
    assert lines[1] == "|-----|--------|----------|------------------|--------|----------:|--------:|-------:|"
    assert lines[2] == "| a   | lora   | defaults | tiny             | native |         1 |     1 B |        |"
    assert lines[4] == "| c   | atoms  | defaults | tiny-sdxl-random | 32     |         1 |     1 B |        |"
    assert mixed[2].row()["model"] == "tiny-sdxl-random" and mixed[2].row()["resolution"] == 32 and mixed[0].row()["resolution"] == ""
    mixed[1].peak_memory_mb, mixed[1].seconds_per_step = 12345.6, 0.5  # peak MB: a column where any run logged it
    lines = markdown_table(mixed, ["clip_t"]).splitlines()
    assert lines[0].endswith("| s/step | peak MB | CLIP-T |") and lines[3].endswith("|  0.500 |  12,346 |        |")
    assert len({len(line) for line in lines}) == 1  # every column one width: it reads aligned as printed
    assert len({tuple(i for i, c in enumerate(line) if c == "|") for line in lines}) == 1


def test_runs_of_the_same_name_are_named_by_the_folders_that_tell_them_apart(tmp_path):
    """Two sweeps' runs/lora-seed0 are told apart by their sweep's folder, not both named runs-lora-seed0."""
    from sdtune.comparison import RunSummary, _unique_names

    paths = [tmp_path / "sweep-a" / "runs" / "lora-seed0", tmp_path / "sweep-b" / "runs" / "lora-seed0",
             tmp_path / "sweep-a" / "runs" / "lora-seed0", tmp_path / "other" / "atoms"]
    runs = [RunSummary(path.name, path, "lora", "defaults", 1, 1) for path in paths]
    _unique_names(runs)
    assert [run.name for run in runs] == [
        "sweep-a-runs-lora-seed0", "sweep-b-runs-lora-seed0", "sweep-a-runs-lora-seed0-2", "atoms"]
    # step files: their run folders' names told apart, then the step (not the file's name)
    steps = [path / "adapter-step-000200.safetensors" for path in paths[:3]]
    runs = [RunSummary("lora-seed0-step-000200", path, "lora", "defaults", 1, 1) for path in steps]
    _unique_names(runs)
    assert [run.name for run in runs] == [
        "sweep-a-runs-lora-seed0-step-000200", "sweep-b-runs-lora-seed0-step-000200", "sweep-a-runs-lora-seed0-step-000200-2"]


def test_compare_says_why_a_folder_has_no_adapter_where_it_can_tell(tmp_path):
    import socket
    import subprocess

    from sdtune.comparison import summarize_run
    from sdtune.errors import SdtuneError

    failed = tmp_path / "failed"
    failed.mkdir()
    (failed / "sweep-run.json").write_text('{"state": "failed", "error": "out of memory"}')
    with pytest.raises(SdtuneError, match=r"failed: not a run folder \(no adapter.safetensors; its sweep run failed: out of memory\)$"):
        summarize_run(failed)
    from sdtune.adapter import adapter_path  # what sample, evaluate, export... say of it

    with pytest.raises(SdtuneError, match=r"adapter not found: .*failed/adapter.safetensors \(its sweep run failed: out of memory\)$"):
        adapter_path(failed)
    training = tmp_path / "training"
    training.mkdir()
    trainer = subprocess.Popen(["sleep", "60"])
    try:
        (training / ".sdtune.lock").write_text(f"{trainer.pid} {socket.gethostname()}\n")
        with pytest.raises(SdtuneError, match=rf"it is training now \(pid {trainer.pid} on .*\) and has saved no adapter yet\)$"):
            summarize_run(training)
    finally:
        trainer.kill()
        trainer.wait()
    with pytest.raises(SdtuneError, match=r"training: not a run folder \(no adapter.safetensors\)$"):
        summarize_run(training)
    # a step file --keep-saves pruned: not found, naming the ones kept (not "not a run folder")
    (training / "adapter-step-000004.safetensors").write_bytes(b"")
    for refused in (summarize_run, adapter_path):
        with pytest.raises(SdtuneError, match=r"^adapter not found: .*training/adapter-step-000002.safetensors "
                                              r"\(the run's step files: adapter-step-000004.safetensors\)$"):
            refused(training / "adapter-step-000002.safetensors")


def _captured_figures(monkeypatch):
    import sdtune.comparison as comparison

    figures = []
    monkeypatch.setattr(comparison, "_save", lambda figure, path: figures.append(figure) or path)
    return figures


def test_the_loss_plot_colours_runs_by_method_and_keeps_its_legend_off_the_curves(tmp_path, monkeypatch):
    """Eleven runs: the atoms run does not take the first LoRA run's colour (a ten-colour palette cycled by run
    did), runs of one method differ in line style, and the legend stands outside the axes."""
    import sdtune.comparison as comparison

    figures = _captured_figures(monkeypatch)
    runs = [comparison.RunSummary(f"lora-{i}", tmp_path / f"lora-{i}", "lora", "defaults", 1, 1, losses=[(1, 0.5), (2, 0.4)]) for i in range(10)]
    runs.append(comparison.RunSummary("atoms-0", tmp_path / "atoms-0", "atoms", "defaults", 1, 1, losses=[(1, 0.5), (2, 0.3)]))
    comparison.plot_losses(runs, tmp_path / "loss.png")
    axes = figures[0].axes[0]
    labelled = {line.get_label(): line for line in axes.get_lines() if not line.get_label().startswith("_")}
    lora_colours = {labelled[f"lora-{i} (lora)"].get_color() for i in range(10)}
    assert len(lora_colours) == 1 and labelled["atoms"].get_color() not in lora_colours
    assert labelled["lora-0 (lora)"].get_linestyle() != labelled["lora-1 (lora)"].get_linestyle()
    legend = figures[0].legends[0]
    anchor = legend.get_bbox_to_anchor().transformed(axes.transAxes.inverted())
    assert anchor.x0 > 1  # right of the plot
    ticks = [tick for tick in axes.get_xticks() if 1 <= tick <= 2]
    assert ticks and all(tick == int(tick) for tick in ticks)  # whole steps, not 1.25, 1.5, ...
    assert axes.get_xlabel() == "training step" and "loss" in axes.get_ylabel()


def _sweep_like_runs(tmp_path):
    """Two methods × three seeds on castle and LoRA × three seeds on dog, with a sweep's long run names."""
    from sdtune.comparison import RunSummary, describe_differences

    runs = []
    for concept, methods in (("castle", ("lora", "atoms")), ("dog", ("lora",))):
        for method in methods:
            for seed in range(3):
                name = f"concept-{concept}-method-{method}-with-a-rather-long-variant-label-seed{seed}"
                settings = {"concept": concept, "method": method, "seed": seed, "lr": 1e-3, "steps": 4, "output": name}
                runs.append(RunSummary(name, tmp_path / name, method, "defaults", 4212 if method == "atoms" else 22980, 1,
                                       metrics={"clip_i": 0.8 + 0.01 * seed + (0.1 if concept == "dog" else 0)},
                                       losses=[(1, 0.5 + 0.01 * seed), (2, 0.4)], settings=settings, model="tiny-random"))
    describe_differences(runs)
    return runs


def test_the_metric_plot_has_a_panel_per_reference_and_one_error_bar_per_seed_group(tmp_path, monkeypatch):
    """CLIP-I of castle runs and of dog runs is measured against different images: two panels, titled by concept.
    Three seeds are one point with an error bar (± their sample standard deviation), not three labelled points;
    the legend names each group once, wrapped, beside the panels, and no run name is written into a panel."""
    import statistics

    import sdtune.comparison as comparison

    figures = _captured_figures(monkeypatch)
    path = comparison.plot_metric(_sweep_like_runs(tmp_path), "clip_i", tmp_path / comparison.metric_plot_name("clip_i"))
    assert path.name == "clip_i-vs-trainable-parameters.png"
    figure = figures[0]
    panels = [axes for axes in figure.axes if axes.get_visible()]
    assert [axes.get_title() for axes in panels] == ["concept=castle", "concept=dog"]
    castle, dog = panels
    assert len(castle.containers) == 2 and len(dog.containers) == 1  # one error bar per method and concept
    bar = castle.containers[0]
    (segment,) = bar.lines[2][0].get_segments()
    assert segment[1][1] - segment[0][1] == pytest.approx(2 * statistics.stdev([0.8, 0.81, 0.82]))
    assert not castle.texts and not dog.texts
    assert castle.get_xlabel() == "trainable parameters (count, log scale)" and castle.get_ylabel() == "CLIP-I (cosine similarity)"
    texts = [text.get_text() for text in figure.legends[0].get_texts()]
    assert texts == ["lora [3 seeds]", "atoms [3 seeds]"]
    figure.canvas.draw()  # the legend's lines are wrapped: none longer than LEGEND_WIDTH
    long = comparison.SeedGroup("x" * 100, "lora", [])
    assert max(len(line) for line in comparison._wrapped(long.label).splitlines()) <= comparison.LEGEND_WIDTH


def test_the_loss_plot_draws_one_curve_per_seed_group_in_a_panel_per_reference(tmp_path, monkeypatch):
    import sdtune.comparison as comparison

    figures = _captured_figures(monkeypatch)
    comparison.plot_losses(_sweep_like_runs(tmp_path), tmp_path / comparison.LOSS_PLOT)
    castle, dog = [axes for axes in figures[0].axes if axes.get_visible()]
    labelled = [line for line in castle.get_lines() if not line.get_label().startswith("_")]
    assert [line.get_label() for line in labelled] == ["lora [3 seeds]", "atoms [3 seeds]"]
    assert list(labelled[0].get_ydata())[0] == pytest.approx(0.51)  # the seeds' mean at step 1
    assert len(castle.collections) == 2  # each group's ± std band
    assert dog.get_title() == "concept=dog" and comparison.LOSS_PLOT == "training-loss-vs-step.png"


def test_a_copied_run_is_no_seed_more_but_a_point_of_its_own(tmp_path):
    """Two runs of the same settings and seed (a run folder copied, or given twice) are not two seeds: the copy is a
    group of its own, named by its run, and the seeds' group keeps its own three."""
    import dataclasses

    from sdtune.comparison import seed_groups

    castle_lora = _sweep_like_runs(tmp_path)[:3]
    copied = dataclasses.replace(castle_lora[0], name="copy", path=tmp_path / "copy", settings=dict(castle_lora[0].settings))
    groups = seed_groups([*castle_lora, copied])
    assert [[run.name for run in group.runs] for group in groups] == [[run.name for run in castle_lora], ["copy"]]
    assert [group.label for group in groups] == [f"{castle_lora[0].name} (lora) [3 seeds]", "copy (lora)"]
    twice = seed_groups([castle_lora[1], castle_lora[1], castle_lora[2]])  # the same folder given twice
    assert [[run.name for run in group.runs] for group in twice] == [[castle_lora[1].name, castle_lora[2].name], [castle_lora[1].name]]


def test_runs_on_two_models_are_panels_of_their_own_and_one_reference_is_one_panel(tmp_path):
    from sdtune.comparison import RunSummary, panels

    runs = [RunSummary(f"r{i}", tmp_path, "lora", "defaults", 1, 1, settings={"concept": "castle"}, model=model)
            for i, model in enumerate(["tiny-random", "tiny-sdxl", "tiny-random"])]
    assert [(title, [run.name for run in members]) for title, members in panels(runs)] == [
        ("model=tiny-random", ["r0", "r2"]), ("model=tiny-sdxl", ["r1"])]
    assert [title for title, _ in panels(runs[:1] + runs[2:])] == [""]


def test_an_evaluation_of_an_earlier_adapter_is_not_read_as_the_runs(tmp_path, monkeypatch):
    """eval.json records the digest of the adapter it measured: a run trained again (or resumed, or extended) after
    its evaluation has stale metrics, which compare leaves out; an eval.json of before the digest falls back to the
    method and options; one that measured the EMA adapter is not the run's adapter.safetensors's."""
    import sdtune.evaluation as evaluation

    (tmp_path / "adapter.safetensors").write_bytes(b"first training" * 100)
    digest = evaluation.adapter_digest(tmp_path / "adapter.safetensors")
    report = {"method": "lora", "options": {"rank": 4}, "adapter": "adapter.safetensors", "adapter_digest": digest}
    assert evaluation.stale_evaluation(report, tmp_path, "lora", {"rank": 4}) == ""
    (tmp_path / "adapter.safetensors").write_bytes(b"second training" * 100)
    assert "measured an earlier adapter.safetensors" in evaluation.stale_evaluation(report, tmp_path, "lora", {"rank": 4})
    older = {"method": "lora", "options": {"rank": 4}}
    assert evaluation.stale_evaluation(older, tmp_path, "lora", {"rank": 4}) == ""
    assert "measured an adapter trained with lora, not this one of atoms" in evaluation.stale_evaluation(older, tmp_path, "atoms", {"m": 9})
    assert "measured adapter-ema.safetensors" in evaluation.stale_evaluation({**report, "adapter": "adapter-ema.safetensors"}, tmp_path, "lora", {"rank": 4})

    # a full fine-tune's adapter is hashed by windows: a change anywhere in one is seen, and the file not read whole
    from sdtune import adapter

    monkeypatch.setattr(adapter, "DIGEST_WHOLE", 1000)
    monkeypatch.setattr(adapter, "DIGEST_WINDOW", 100)
    monkeypatch.setattr(adapter, "DIGEST_WINDOWS", 3)
    big = bytearray(5000)
    (tmp_path / "big.safetensors").write_bytes(bytes(big))
    before = adapter.adapter_digest(tmp_path / "big.safetensors")
    big[4999] = 1  # in the last window
    (tmp_path / "big.safetensors").write_bytes(bytes(big))
    assert adapter.adapter_digest(tmp_path / "big.safetensors") != before


@pytest.fixture
def digest_opens(monkeypatch):
    """adapter_digest with an empty cache: the files it opens, in order."""
    from sdtune import adapter

    opened = []

    def counting_open(path, *args, **kwargs):
        opened.append(Path(path).name)
        return open(path, *args, **kwargs)

    monkeypatch.setattr(adapter, "_DIGESTS", {})
    monkeypatch.setattr(adapter, "open", counting_open, raising=False)
    return opened


def test_an_adapter_is_hashed_once_per_version(tmp_path, monkeypatch, digest_opens):
    """A settled file is read once however often its digest is asked for, by any spelling of its path; a rewrite,
    atomic (a new inode) or in place of the same size with its modification time put back (new change time), is
    hashed again."""
    from sdtune import adapter
    from sdtune.fileio import atomic_write

    monkeypatch.setattr(adapter, "DIGEST_SETTLED_S", 0.0)
    monkeypatch.chdir(tmp_path)
    file = tmp_path / "adapter.safetensors"
    file.write_bytes(b"first training" * 100)
    first = adapter.adapter_digest(file)
    assert adapter.adapter_digest(file) == adapter.adapter_digest(Path("adapter.safetensors")) == first
    assert digest_opens == ["adapter.safetensors"]

    times = file.stat()
    with atomic_write(file) as tmp:
        tmp.write_bytes(b"other training" * 100)
    os.utime(file, ns=(times.st_atime_ns, times.st_mtime_ns))
    second = adapter.adapter_digest(file)
    assert second != first and len(digest_opens) == 2

    time.sleep(0.05)  # past the kernel's clock tick, as any rewrite after the digest was kept is
    times = file.stat()
    with open(file, "r+b") as handle:
        handle.write(b"third")
    os.utime(file, ns=(times.st_atime_ns, times.st_mtime_ns))
    assert file.stat().st_size == times.st_size and file.stat().st_ino == times.st_ino
    third = adapter.adapter_digest(file)
    assert third not in (first, second) and adapter.adapter_digest(file) == third and len(digest_opens) == 3

    monkeypatch.setattr(adapter, "DIGESTS_KEPT", 1)  # bounded: the oldest version is forgotten first
    (tmp_path / "other.safetensors").write_bytes(b"x")
    adapter.adapter_digest(tmp_path / "other.safetensors")
    assert len(adapter._DIGESTS) == 1
    adapter.adapter_digest(file)
    assert digest_opens[-1] == "adapter.safetensors" and len(digest_opens) == 5


def test_a_file_just_written_is_hashed_on_every_call(tmp_path, digest_opens):
    """Within DIGEST_SETTLED_S of its last change a file is not kept: a rewrite in place of the same size within the
    clock's tick keeps its size, times and inode, and must still give a new digest (eval.json's and the sweep's
    "written again" checks)."""
    from sdtune import adapter

    file = tmp_path / "adapter.safetensors"
    file.write_bytes(b"first training" * 100)
    first = adapter.adapter_digest(file)
    times = file.stat()
    with open(file, "r+b") as handle:
        handle.write(b"again")
    os.utime(file, ns=(times.st_atime_ns, times.st_mtime_ns))
    assert adapter.adapter_digest(file) != first
    assert adapter.adapter_digest(file) == adapter.adapter_digest(file)
    assert len(digest_opens) == 4 and adapter._DIGESTS == {}


def test_compare_leaves_out_the_metrics_of_an_earlier_training(tmp_path):
    """A run trained again with --overwrite after `sdtune evaluate`: compare blanks the old numbers and says why."""
    from sdtune.comparison import summarize_run
    from sdtune.config import TrainConfig
    from sdtune.training import train

    run = tmp_path / "run"
    train(TrainConfig(model="tiny-random", method="lora", steps=1, output=str(run)), progress=False)
    from sdtune.adapter import adapter_digest

    report = {"format": "sdtune-eval/1", "metrics": {"dino": 0.9}, "unavailable": {}, "method": "lora",
              "adapter": "adapter.safetensors", "adapter_digest": adapter_digest(run / "adapter.safetensors")}
    (run / "eval.json").write_text(json.dumps(report))
    assert summarize_run(run).metrics == {"dino": 0.9}
    train(TrainConfig(model="tiny-random", method="lora", steps=1, seed=1, output=str(run), overwrite=True), progress=False)
    with pytest.warns(UserWarning, match="measured an earlier adapter.safetensors"):
        summary = summarize_run(run)
    assert summary.metrics == {} and "trained again" in summary.stale_evaluation


def test_an_evaluation_of_before_the_adapter_digest_is_read_by_the_files_times(tmp_path, recwarn):
    """An eval.json an earlier sdtune wrote records no digest: compare and the model card take its metrics as the
    adapter's where the adapter is older than it (evaluate wrote it after reading the adapter), and keep them with a
    warning where the adapter was written after it (trained again since, or only copied: times cannot tell)."""
    import warnings

    from sdtune.adapter import read_adapter_info
    from sdtune.comparison import summarize_run
    from sdtune.config import TrainConfig
    from sdtune.evaluation import METRICS
    from sdtune.model_card import evaluation_lines
    from sdtune.training import train

    run = tmp_path / "run"
    train(TrainConfig(model="tiny-random", method="lora", steps=1, output=str(run)), progress=False)
    report = {"format": "sdtune-eval/1", "metrics": {"dino": 0.9}, "unavailable": {}, "method": "lora",
              "options": read_adapter_info(run)[0].options}
    (run / "eval.json").write_text(json.dumps(report))
    adapter_time = (run / "adapter.safetensors").stat().st_mtime_ns
    os.utime(run / "eval.json", ns=(adapter_time + 10**9, adapter_time + 10**9))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning: the evaluation is of this adapter
        assert summarize_run(run).metrics == {"dino": 0.9}
        assert any(line.startswith(f"| {METRICS['dino'][0]} |") for line in evaluation_lines(run, read_adapter_info(run)[0]))
    os.utime(run / "eval.json", ns=(adapter_time - 10**9, adapter_time - 10**9))
    with pytest.warns(UserWarning, match="records no digest of the adapter it measured .* was written after it"):
        summary = summarize_run(run)
    assert summary.metrics == {"dino": 0.9} and summary.stale_evaluation == ""
    (run / "eval.json").write_text(json.dumps({**report, "method": "atoms"}))  # another method: left out, as before
    with pytest.warns(UserWarning, match="not this one of lora"):
        assert summarize_run(run).metrics == {}


def test_evaluate_reads_prompt_files_without_their_kohya_options_and_compare_with_them(metric_models, image_sets, tmp_path):
    """Where one setting draws every prompt, a line's --n, --w, ... are left unused with one warning saying why; CLIP-T
    scores the prompt alone, as given without them. Compare's grid draws every run with a line's own options."""
    from types import SimpleNamespace

    from sdtune.comparison import grid_prompts

    clip_path, dino_path = metric_models
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a castle --n blurry --w 512\na tower\na bridge --D 3\na gate\n")  # one an image
    common = dict(images=str(image_sets[0]), clip_model=str(clip_path), dino_model=str(dino_path), fid_features="none")
    with pytest.warns(UserWarning, match=f"^prompt file {prompts}: 2 lines give --d, --n, --w \\(kohya-ss' options\\), left unused: evaluate draws"):
        result = evaluate(EvaluateConfig(prompts=str(prompts), output=str(tmp_path / "file.json"), **common), progress=False)
    plain = evaluate(EvaluateConfig(prompt=["a castle", "a tower", "a bridge", "a gate"], output=str(tmp_path / "plain.json"), **common), progress=False)
    assert result.report["prompts"] == ["a castle", "a tower", "a bridge", "a gate"]
    assert result.metrics["clip_t"] == plain.metrics["clip_t"]

    lines = grid_prompts(SimpleNamespace(prompt=["first"], prompts=str(prompts)), [])  # compare's grid draws a line's options
    assert [line.prompt for line in lines] == ["first", "a castle", "a tower", "a bridge", "a gate"]
    assert (lines[1].negative_prompt, lines[1].width, lines[3].seed) == ("blurry", 512, 3)


def test_the_comparison_says_which_settings_tell_the_runs_apart(tmp_path):
    """Runs of one method and variant that differ in their starting file, base adapters, prompt reading, schedule or
    seed: the table and CSV name only the settings the runs differ in, each where a run's is not the default, files by
    their short names (a run's adapter by its run), strengths as given."""
    from sdtune.comparison import RunSummary, describe_differences, markdown_table, run_settings

    common = 'method = "lora"\nmodel = "tiny-random"\nlr = 3e-05\nsteps = 2\nseed = 0\nlog_with = "none"\n'
    written = {
        "plain": "",
        "started": 'init_weights = "runs/earlier/adapter.safetensors"\n',
        "stacked": 'base_adapters = ["styles/a/style.safetensors:0.50", "styles/b/style.safetensors"]\n',
        "read": "clip_skip = 2\nmax_token_length = 150\n",
        "snr": "zero_terminal_snr = true\nseed = 1\n",
    }
    runs = []
    for name, extra in written.items():
        folder = tmp_path / name
        folder.mkdir()
        (folder / "config.toml").write_text(common.replace("seed = 0\n", "") + ("" if "seed" in extra else "seed = 0\n")
                                            + f'output = "runs/{name}"\n' + extra)
        runs.append(RunSummary(name, folder, "lora", "defaults", 1, 1, settings=run_settings(folder)))
    describe_differences(runs)
    assert [", ".join(run.differences.values()) for run in runs] == [
        "", "init_weights=earlier", "base_adapters=a/style.safetensors:0.50+b/style.safetensors",
        "clip_skip=2, max_token_length=150", "seed=1, zero_terminal_snr"]
    lines = [re.sub(" +", " ", line) for line in markdown_table(runs, []).splitlines()]
    assert lines[0] == "| run | method | variant | settings | trainable | adapter | s/step |"
    assert lines[2].startswith("| plain | lora | defaults | | 1 |") and lines[5].startswith("| read | lora | defaults | clip_skip=2, max_token_length=150 | 1 |")
    assert runs[4].row()["settings"] == "seed=1, zero_terminal_snr"
    alike = [RunSummary(run.name, run.path, "lora", "defaults", 1, 1, settings=run_settings(run.path)) for run in runs[:1] * 2]
    describe_differences(alike)  # runs that differ in nothing but their folder: no settings column
    assert re.sub(" +", " ", markdown_table(alike, []).splitlines()[0]) == "| run | method | variant | trainable | adapter | s/step |"
    from sdtune.comparison import setting_differences, with_defaults  # where the model is not a column of its own

    models = [with_defaults({"model": "runwayml/stable-diffusion-v1-5"}), with_defaults({"model": "stabilityai/stable-diffusion-2-1"})]
    assert setting_differences(models, frozenset()) == [{"model": "model=runwayml/stable-diffusion-v1-5"},
                                                        {"model": "model=stabilityai/stable-diffusion-2-1"}]  # hub ids whole
    edited = [with_defaults({"base_adapters": ["style.safetensors:inf"]}), with_defaults({})]  # a config.toml edited by hand
    assert setting_differences(edited) == [{"base_adapters": "base_adapters=style.safetensors:inf"}, {}]


def test_a_comparison_written_again_leaves_no_earlier_runs_samples_nor_grid_nor_plots(two_runs, tmp_path):
    """A run dropped from a comparison written again into the same folder loses its samples there; --no-grid drops the
    grid; a metric no run has now loses its plot. Nothing compare did not write goes: a person's file in a dropped run's
    samples keeps that folder (with a warning), a folder compare never drew stays, and a folder that holds no
    comparison is left alone."""
    runs = []
    for run in two_runs:
        shutil.copytree(run, tmp_path / "runs" / run.name, ignore=shutil.ignore_patterns("eval.json"))
        runs.append(str(tmp_path / "runs" / run.name))
    out = tmp_path / "cmp"
    sdtune.compare(runs, str(out), prompt=["a <castle>"], steps=1, progress=False)
    assert sorted(p.name for p in (out / "samples").iterdir()) == ["atoms", "lora"]
    (out / "samples" / "mine").mkdir()
    (out / "samples" / "mine" / "000-seed0.png").write_bytes(b"a person's own")
    (out / "fid-vs-trainable-parameters.png").write_bytes(b"an earlier evaluation's plot")
    (out / "fid-vs-parameters.png").write_bytes(b"an earlier version's plot, named as it named them")

    sdtune.compare(runs[:1], str(out), prompt=["a <castle>"], steps=1, progress=False)
    assert sorted(p.name for p in (out / "samples").iterdir()) == ["atoms", "mine"]
    assert not (out / "fid-vs-trainable-parameters.png").exists() and not (out / "fid-vs-parameters.png").exists() and (out / "grid.png").is_file()

    sdtune.compare(runs, str(out), prompt=["a <castle>"], steps=1, progress=False)
    (out / "samples" / "lora" / "notes.txt").write_text("lora looked washed out")
    with pytest.warns(UserWarning, match=r"samples/lora is kept: an earlier comparison drew lora there, but it also holds "
                                         r"notes.txt, which compare did not write; lora is not in this comparison$"):
        sdtune.compare(runs[:1], str(out), grid=False, progress=False)
    assert sorted(p.name for p in (out / "samples").iterdir()) == ["lora", "mine"] and not (out / "grid.png").exists()
    assert (out / "samples" / "lora" / "notes.txt").is_file() and (out / "samples" / "lora" / "images" / "000-seed0.png").is_file()

    foreign = tmp_path / "mine"  # a folder of the same layout that holds no comparison
    (foreign / "samples" / "lora" / "images").mkdir(parents=True)
    (foreign / "samples" / "lora" / "images" / "000-seed0.png").write_bytes(b"png")
    (foreign / "grid.png").write_bytes(b"png")
    sdtune.compare(runs[:1], str(foreign), grid=False, progress=False)
    assert (foreign / "samples" / "lora" / "images" / "000-seed0.png").is_file() and (foreign / "grid.png").is_file()


def test_runs_none_of_which_was_evaluated_are_said_so_once(two_runs, tmp_path):
    """Six runs without eval.json are one line, not six; a comparison asked for no metrics (a sweep's metrics = "none")
    says that instead; where some runs were measured, the others are named each."""
    from sdtune.comparison import compare, missing_evaluations, summarize_run

    runs = []
    for index in range(6):
        shutil.copytree(two_runs[index % 2], tmp_path / f"run{index}", ignore=shutil.ignore_patterns("eval.json"))
        runs.append(str(tmp_path / f"run{index}"))
    compare(runs, str(tmp_path / "cmp"), grid=False, progress=False)
    text = (tmp_path / "cmp" / "comparison.md").read_text()
    assert "not evaluated" not in text
    assert text.count("- No run was evaluated (no eval.json): run `sdtune evaluate --run RUN` on each to measure it.") == 1
    config = tmp_path / "run5" / "config.toml"  # an unfinished run: its section follows the notes on the table
    config.write_text(re.sub(r"(?m)^steps = \d+$", "steps = 40", config.read_text()))
    with pytest.warns(UserWarning, match="run5 is unfinished"):
        compare(runs, str(tmp_path / "cmp"), grid=False, progress=False, metrics_asked=False)
    text = (tmp_path / "cmp" / "comparison.md").read_text()
    assert "## Missing metrics" not in text and "evaluated" not in text
    assert '- Metrics: none were asked for (the sweep\'s metrics = "none").' in text
    assert text.index("- Metrics: none") < text.index("## Unfinished runs")
    summaries = [summarize_run(run) for run in runs[:2]]
    summaries[0].metrics = {"clip_t": 30.0}
    assert missing_evaluations(summaries) == [f"- run1: not evaluated (no eval.json; run `sdtune evaluate --run {runs[1]}`)"]


def test_the_evaluate_command_counts_one_image_as_one(metric_models, tmp_path):
    clip_path, dino_path = metric_models
    generated, reference = _draw(tmp_path / "generated", 1, seed=1), _draw(tmp_path / "reference", 1, seed=2)
    result = invoke("evaluate", "--images", generated, "--prompt", "a castle", "--reference", reference, "--clip-model", clip_path,
                    "--dino-model", dino_path, "--fid-features", "none", "--output", tmp_path / "eval.json")
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines()[0] == "1 generated image, 1 reference image"


# ---------------------------------------------------------------------------------------------
# How the metrics average: diversity within each prompt, fidelity to each image's own class


def _solid(path, colour, prompt=None):
    """A one-colour image, with `sdtune sample`'s PNG text recording `prompt` where given."""
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    if prompt is not None:
        info.add_text("sdtune", json.dumps({"prompt": prompt}))
    Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), colour).save(path, pnginfo=info)


@pytest.fixture
def colour_embeddings(monkeypatch):
    """CLIP and DINO image embeddings replaced by each image's mean colour: similarities worked out by hand."""
    from sdtune import evaluation

    features = lambda model, processor: (lambda batch: batch.double().mean(dim=(2, 3)))
    monkeypatch.setattr(evaluation, "clip_features", features)
    monkeypatch.setattr(evaluation, "dino_features", features)


def _cosine(a, b):
    a, b = np.asarray(a, float), np.asarray(b, float)
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


# two prompts, each drawn twice alike: little variety within a prompt, much between the prompts
REDS, GREENS = [(250, 10, 0), (200, 60, 0)], [(0, 250, 10), (0, 200, 60)]


def test_diversity_is_measured_within_each_prompt_and_averaged_over_prompts(metric_models, colour_embeddings, tmp_path):
    clip_path, dino_path = metric_models
    folder = tmp_path / "images"
    folder.mkdir()
    for index, colours in enumerate((REDS, GREENS)):
        for seed, colour in enumerate(colours):
            _solid(folder / f"{index:03d}-seed{seed}.png", colour)
    within = statistics.fmean(1 - _cosine(*colours) for colours in (REDS, GREENS))
    everything = REDS + GREENS
    pooled = 1 - statistics.fmean(_cosine(a, b) for i, a in enumerate(everything) for j, b in enumerate(everything) if i != j)
    assert pooled - within > 0.3  # the prompts differ far more than their images do

    def diversity(images, prompts, name):
        result = evaluate(EvaluateConfig(images=str(images), prompt=prompts, output=str(tmp_path / f"{name}.json"),
                                         clip_model=str(clip_path), dino_model=str(dino_path), fid_features="none"),
                          progress=False)
        return result

    result = diversity(folder, ["a red thing", "a green thing"], "named")
    assert result.metrics["diversity"] == pytest.approx(within, rel=1e-9)
    assert result.report["metrics_version"] == 3

    # the prompt each image's PNG text records tells them apart where the names do not, whatever prompts are given
    recorded = tmp_path / "recorded"
    recorded.mkdir()
    for prompt, colours in (("a red thing", REDS), ("a green thing", GREENS)):
        for seed, colour in enumerate(colours):
            _solid(recorded / f"{prompt.split()[1]}-{seed}.png", colour, prompt=prompt)
    assert diversity(recorded, ["a thing"], "recorded").metrics["diversity"] == pytest.approx(within, rel=1e-9)

    # one image a prompt: nothing to measure, and said so
    single = tmp_path / "single"
    single.mkdir()
    for index, colour in enumerate((REDS[0], GREENS[0])):
        _solid(single / f"{index:03d}-seed0.png", colour)
    result = diversity(single, ["a red thing", "a green thing"], "single")
    assert "diversity" not in result.metrics
    assert result.unavailable["diversity"] == "needs 2 or more images drawn for one prompt, and each of the 2 prompts has one"

    # images neither named nor recorded with their prompt, among several prompts: which share one cannot be told
    unnamed = tmp_path / "unnamed"
    unnamed.mkdir()
    for seed, colour in enumerate(REDS):
        _solid(unnamed / f"photo{seed}.png", colour)
    result = diversity(unnamed, ["a red thing", "a green thing"], "unnamed")
    assert result.unavailable["diversity"].startswith("cannot tell which images share a prompt: photo0.png records none")
    # of one prompt they are all that prompt's
    assert diversity(unnamed, ["a red thing"], "one").metrics["diversity"] == pytest.approx(1 - _cosine(*REDS), rel=1e-9)


def test_an_earlier_eval_json_s_redefined_metrics_are_not_read_as_todays(tmp_path):
    """eval.json of before metrics_version 2: its diversity over several prompts (pooled then) and a dataset run's
    CLIP-I and DINO (against every class then) are moved to `unavailable`, saying why; what did not change stays."""
    from sdtune.evaluation import EVALUATE_AGAIN, read_evaluation

    base = {"format": "sdtune-eval/1", "metrics": {"clip_t": 30.0, "clip_i": 0.8, "dino": 0.7, "diversity": 0.4},
            "unavailable": {"fid": "--fid-features none"}, "reference": "photos/castle"}

    def read(**report):
        (tmp_path / "eval.json").write_text(json.dumps({**base, **report}))
        return read_evaluation(tmp_path)

    several = read(prompts=["a", "b"], num_images=4)
    assert several["metrics"] == {"clip_t": 30.0, "clip_i": 0.8, "dino": 0.7}
    assert several["unavailable"]["diversity"] == (
        f"an earlier sdtune measured diversity over every prompt's images pooled (now within each prompt): {EVALUATE_AGAIN}")
    assert several["unavailable"]["fid"] == "--fid-features none"
    # one prompt sampled: the images were that prompt's alone, pooled alike
    assert read(prompts=["a"], num_images=4)["metrics"] == base["metrics"]
    # a folder of images (--images): which prompt each was of was not looked at
    assert "diversity" not in read(prompts=["a"])["metrics"]
    dataset = read(prompts=["a"], num_images=4, reference="dataset imagefolder (shapes)")
    assert set(dataset["metrics"]) == {"clip_t", "diversity"}
    assert "every class's reference images" in dataset["unavailable"]["clip_i"]
    # measured as now: kept as it is
    assert read(prompts=["a", "b"], metrics_version=2, reference="dataset x")["metrics"] == base["metrics"]


def test_a_dataset_runs_fidelity_is_to_each_images_own_class(metric_models, colour_embeddings, tmp_path):
    """CLIP-I and DINO of a run trained on a dataset: each class's images against that class's reference images,
    averaged over the classes (not against every class's); other prompts than its class captions: every pair."""
    from sdtune.training import train

    clip_path, dino_path = metric_models
    root = tmp_path / "shapes"
    references = {"red ball": [(255, 0, 0), (220, 40, 0)], "green cone": [(0, 255, 0), (0, 220, 40)]}
    for name, colours in references.items():
        (root / name.replace(" ", "_")).mkdir(parents=True)
        for index, colour in enumerate(colours):
            _solid(root / name.replace(" ", "_") / f"{index}.png", colour)
    run = tmp_path / "run"
    train(TrainConfig(model="tiny-random", method="lora", steps=1, dataset="imagefolder", data_root=str(root),
                      output=str(run)), progress=False)
    images = tmp_path / "images"
    images.mkdir()
    drawn = {"green cone": [(0, 240, 20), (30, 200, 0)], "red ball": [(240, 20, 0), (200, 0, 30)]}
    captions = ["a photo of a green cone.", "a photo of a red ball."]
    for index, name in enumerate(drawn):
        for seed, colour in enumerate(drawn[name]):
            _solid(images / f"{index:03d}-seed{seed}.png", colour)
    own = statistics.fmean(statistics.fmean(_cosine(g, r) for g in drawn[name] for r in references[name]) for name in drawn)
    every = statistics.fmean(_cosine(g, r) for gs in drawn.values() for g in gs for rs in references.values() for r in rs)
    assert own - every > 0.3

    def measured(**settings):
        return evaluate(EvaluateConfig(run=str(run), images=str(images), output=str(tmp_path / "eval.json"), clip_model=str(clip_path),
                                       dino_model=str(dino_path), fid_features="none", **settings), progress=False)

    result = measured()  # the run's prompts: its class captions, one a class (images 000-* are green cones)
    assert result.report["prompts"] == captions and result.report["fidelity_pairs"] == "own class"
    assert result.metrics["clip_i"] == pytest.approx(own, rel=1e-9) and result.metrics["dino"] == pytest.approx(own, rel=1e-9)
    result = measured(prompt=["a ball on a beach", "a cone in snow"])
    assert result.report["fidelity_pairs"] == "all"
    assert result.metrics["dino"] == pytest.approx(every, rel=1e-9)


def _captured_clip_texts(monkeypatch):
    """The texts CLIP-T scores each image with, as evaluate pairs them (the score itself still computed)."""
    from sdtune import evaluation

    texts = []
    real = evaluation.clip_score

    def capturing(model, processor, images, paired):
        texts.append(list(paired))
        return real(model, processor, images, paired)

    monkeypatch.setattr(evaluation, "clip_score", capturing)
    return texts


def test_clip_t_and_diversity_pair_images_with_the_prompt_their_png_text_records(metric_models, colour_embeddings,
                                                                                  monkeypatch, tmp_path):
    """Renamed images (000-* drawn for the second prompt): CLIP-T scores each with the prompt it records, as diversity
    groups them, not with the prompt its name indexes; an image recording none is paired by its name."""
    clip_path, dino_path = metric_models
    texts = _captured_clip_texts(monkeypatch)
    folder = tmp_path / "images"
    folder.mkdir()
    prompts = ["a red thing", "a green thing"]
    for index, (colours, prompt) in enumerate(((REDS, prompts[1]), (GREENS, prompts[0]))):
        for seed, colour in enumerate(colours):
            _solid(folder / f"{index:03d}-seed{seed}.png", colour, prompt=prompt)
    _solid(folder / "001-seed7.png", GREENS[0])  # records no prompt: its name's

    result = evaluate(EvaluateConfig(images=str(folder), prompt=prompts, output=str(tmp_path / "eval.json"),
                                     clip_model=str(clip_path), dino_model=str(dino_path), fid_features="none"), progress=False)
    assert texts == [[prompts[1], prompts[1], prompts[0], prompts[0], prompts[1]]]
    # the same pairing groups diversity: 001-seed7 is drawn with the reds' prompt
    reds = [*REDS, GREENS[0]]
    pairs = [(a, b) for i, a in enumerate(reds) for b in reds[i + 1:]]
    within = statistics.fmean([1 - statistics.fmean(_cosine(a, b) for a, b in pairs), 1 - _cosine(*GREENS)])
    assert result.metrics["diversity"] == pytest.approx(within, rel=1e-9)
    # no prompts given: the recorded ones are scored (before, CLIP-T was unavailable without --prompt)
    (folder / "001-seed7.png").unlink()
    texts.clear()
    result = evaluate(EvaluateConfig(images=str(folder), output=str(tmp_path / "eval.json"), clip_model=str(clip_path),
                                     dino_model=str(dino_path), fid_features="none"), progress=False)
    assert "clip_t" in result.metrics and texts == [[prompts[1], prompts[1], prompts[0], prompts[0]]]


# unlike in colour and in how many images each has: pooled pairs weigh jade's three, the concepts' means weigh alike
CONCEPT_COLOURS = {"snow": [(240, 240, 235)], "jade": [(0, 255, 0), (0, 220, 40), (30, 240, 0)]}


@pytest.fixture
def two_concept_run(tmp_path):
    """A 1-step tiny-random run of two concepts, snow and jade, each trained on images of its own colour."""
    from sdtune.training import train

    folders = []
    for name, colours in CONCEPT_COLOURS.items():
        folders.append(tmp_path / name)
        folders[-1].mkdir()
        for index, colour in enumerate(colours):
            _solid(folders[-1] / f"{index}.png", colour)
    run = tmp_path / "run"
    train(TrainConfig(model="tiny-random", method="lora", steps=1, concept=list(CONCEPT_COLOURS),
                      images=[str(folder) for folder in folders], output=str(run)), progress=False)
    return run


def _pixels_mean(path):
    return np.asarray(Image.open(path).convert("RGB"), dtype=float).mean(axis=(0, 1))


def test_a_run_of_several_concepts_is_drawn_and_measured_concept_by_concept_by_default(
        metric_models, colour_embeddings, two_concept_run, monkeypatch):
    """Without prompts, evaluate draws each concept's training prompt in turn, in the order the run trained them; each
    image's PNG text says which concept it is of, and eval.json and the table hold CLIP-T, CLIP-I and DINO per concept."""
    from sdtune.evaluation import recorded_prompt, run_prompts

    clip_path, dino_path = metric_models
    run = two_concept_run
    texts = _captured_clip_texts(monkeypatch)
    result = evaluate(EvaluateConfig(run=str(run), clip_model=str(clip_path), dino_model=str(dino_path),
                                     fid_features="none", num_images=2, steps=1), progress=False)
    report = result.report
    assert report["prompts"] == ["photo of a <snow>.", "photo of a <jade>."]
    drawn = sorted((run / "eval-samples" / "images").glob("*.png"))
    assert [recorded_prompt(path) for path in drawn] == ["photo of a sks snow."] * 2 + ["photo of a sks jade."] * 2
    assert report["fidelity_pairs"] == "own concept"
    assert report["reference"] == f"{run.parent / 'snow'}, {run.parent / 'jade'}"  # both folders measured, not the first alone
    assert list(report["per_concept"]) == ["snow", "jade"]
    means = [_pixels_mean(path) for path in drawn]
    for k, (name, colours) in enumerate(CONCEPT_COLOURS.items()):
        own = statistics.fmean(_cosine(g, r) for g in means[2 * k: 2 * k + 2] for r in colours)
        values = report["per_concept"][name]
        assert values["images"] == 2
        assert values["clip_i"] == pytest.approx(own, rel=1e-9) and values["dino"] == pytest.approx(own, rel=1e-9)
    # each concept's CLIP-T scores its own images with its own prompt; the run's metrics average the concepts alike
    assert texts[1:] == [["photo of a snow."] * 2, ["photo of a jade."] * 2]
    per_concept = report["per_concept"].values()
    assert result.metrics["clip_i"] == pytest.approx(statistics.fmean(v["clip_i"] for v in per_concept), rel=1e-9)
    assert result.metrics["clip_t"] == pytest.approx(statistics.fmean(v["clip_t"] for v in per_concept), rel=1e-6)
    table = result.table().splitlines()
    assert "per concept (each against its own images):" in table
    assert re.match(r"^concept\s+images\s+CLIP-T\s+CLIP-I\s+DINO$", table[-3])
    assert table[-2].split()[:2] == ["snow", "2"] and table[-1].split()[:2] == ["jade", "2"]
    # compare's grid: a row per concept, from the run's evaluation prompts or, never evaluated, its training prompts
    from sdtune.comparison import summarize_run

    compared = sdtune.compare([str(run)], str(run.parent / "compared"), steps=1)
    grid_images = sorted((run.parent / "compared" / "samples" / "run" / "images").glob("*.png"))
    assert [recorded_prompt(path) for path in grid_images] == ["photo of a sks snow.", "photo of a sks jade."]
    assert run.parent / "compared" / "grid.png" in compared.files
    (run / "eval.json").unlink()
    assert summarize_run(run).eval_prompts == [] and run_prompts(run, "<snow>") == report["prompts"]
    # an adapter file apart from its run (no config.toml): its recorded tokens name the concepts, in order
    alone = run.parent / "alone"
    alone.mkdir()
    shutil.copy(run / "adapter.safetensors", alone / "castle-canal.safetensors")
    from sdtune.adapter import adapter_info

    tokens = adapter_info(alone / "castle-canal.safetensors").placeholder_tokens()
    assert run_prompts(alone, "<snow>", tokens) == ["photo of a <snow>.", "photo of a <jade>."]


def test_a_single_concept_run_is_drawn_with_its_one_training_prompt(tmp_path):
    from sdtune.evaluation import run_prompts

    run = tmp_path / "run"
    run.mkdir()
    (run / "config.toml").write_text('concept = "castle"\ntemplate = "a {token} at dusk"\n')
    assert run_prompts(run, "<castle>", "sks castle") == ["a <castle> at dusk"]
    (run / "config.toml").write_text('concept = ["castle"]\ntemplate = "a {token} at dusk"\n')  # a list of one
    assert run_prompts(run, "<castle>", "sks castle") == ["a <castle> at dusk"]


def test_a_run_of_several_concepts_is_measured_against_each_images_own_concept(
        metric_models, colour_embeddings, two_concept_run, monkeypatch, tmp_path):
    """CLIP-I and DINO of a run of two concepts: each image against the reference images of the concept its prompt
    names (by placeholder or token), averaged over the concepts; an image naming none or both against every one."""
    from sdtune.evaluation import EVALUATE_AGAIN, read_evaluation

    clip_path, dino_path = metric_models
    run = two_concept_run
    references = [colour for colours in CONCEPT_COLOURS.values() for colour in colours]

    def measured(**settings):
        return evaluate(EvaluateConfig(run=str(run), clip_model=str(clip_path), dino_model=str(dino_path),
                                       fid_features="none", **settings), progress=False)

    # drawn now, one prompt a concept: its images against its own colour
    result = measured(prompt=["photo of a <snow>.", "photo of a <jade>."], num_images=2, steps=1)
    assert result.report["fidelity_pairs"] == "own concept" and result.report["metrics_version"] == 3
    drawn = sorted((run / "eval-samples" / "images").glob("*.png"))
    means = [_pixels_mean(path) for path in drawn]
    own = statistics.fmean(statistics.fmean(_cosine(g, r) for g in means[2 * k: 2 * k + 2] for r in colours)
                           for k, colours in enumerate(CONCEPT_COLOURS.values()))
    every = statistics.fmean(_cosine(g, r) for g in means for r in references)
    assert abs(own - every) > 0.02
    assert result.metrics["clip_i"] == pytest.approx(own, rel=1e-9) and result.metrics["dino"] == pytest.approx(own, rel=1e-9)

    # images of a folder, renamed: each by the prompt its PNG text records (the token written out), scored by CLIP-T as
    # given (<snow> read as `snow`); one naming both concepts against every reference image
    texts = _captured_clip_texts(monkeypatch)
    images = tmp_path / "images"
    images.mkdir()
    _solid(images / "000-seed0.png", (250, 250, 250), prompt="photo of a sks snow.")
    _solid(images / "000-seed1.png", (0, 250, 10), prompt="photo of a sks jade.")
    _solid(images / "001-seed0.png", (10, 240, 0), prompt="photo of a sks jade.")
    _solid(images / "001-seed1.png", (120, 120, 0), prompt="sks snow beside sks jade")
    result = measured(images=str(images), prompt=["photo of a <jade>.", "photo of a <snow>."])
    assert texts[0] == ["photo of a snow.", "photo of a jade.", "photo of a jade.", "sks snow beside sks jade"]
    assert result.report["fidelity_pairs"] == "own concept, else all"
    # each concept alone too; the image naming both is in no concept's
    assert texts[1:] == [["photo of a snow."], ["photo of a jade."] * 2]
    assert {name: values["images"] for name, values in result.report["per_concept"].items()} == {"snow": 1, "jade": 2}
    snow, jade = CONCEPT_COLOURS.values()
    expected = statistics.fmean([
        statistics.fmean(_cosine((250, 250, 250), r) for r in snow),
        statistics.fmean(_cosine(g, r) for g in [(0, 250, 10), (10, 240, 0)] for r in jade),
        statistics.fmean(_cosine((120, 120, 0), r) for r in references),
    ])
    assert result.metrics["dino"] == pytest.approx(expected, rel=1e-9)
    # prompts naming no concept: every pair counts
    result = measured(prompt=["a photo of a gem"], num_images=2, steps=1)
    assert result.report["fidelity_pairs"] == "all" and "per_concept" not in result.report
    assert "per concept" not in result.table()
    means = [_pixels_mean(path) for path in sorted((run / "eval-samples" / "images").glob("*.png"))]
    assert result.metrics["clip_i"] == pytest.approx(statistics.fmean(_cosine(g, r) for g in means for r in references), rel=1e-9)

    # an eval.json of before (version 2) measured this run against every concept's images: not read as today's
    report = json.loads((run / "eval.json").read_text())
    assert report["reference"] == f"{tmp_path / 'snow'}, {tmp_path / 'jade'}"
    # (which named the first concept's folder alone)
    (run / "eval.json").write_text(json.dumps({**report, "metrics_version": 2, "reference": str(tmp_path / "snow")}))
    earlier = read_evaluation(run)
    assert "clip_i" not in earlier["metrics"] and "clip_t" in earlier["metrics"]
    assert earlier["unavailable"]["dino"] == (
        f"an earlier sdtune measured this run's DINO against every concept's reference images (now its own concept's): {EVALUATE_AGAIN}")
    # measured against a --reference folder of its own: the same then as now
    (run / "eval.json").write_text(json.dumps({**report, "metrics_version": 2, "reference": str(tmp_path / "elsewhere")}))
    assert read_evaluation(run)["metrics"] == report["metrics"]
