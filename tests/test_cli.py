"""The command line end to end on the tiny model, and its one-line errors."""

from __future__ import annotations

import json
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
from PIL import Image
from typer.testing import CliRunner

from sdtune.cli import app
from sdtune.sampling import grid_size

runner = CliRunner()


def invoke(*args: str):
    return runner.invoke(app, [str(a) for a in args])


def assert_one_line_error(result, code: int, pattern: str):
    assert result.exit_code == code, (result.exit_code, result.output, result.exception)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1 and lines[-1] == errors[0], result.stderr  # progress bars may come before it
    assert pattern in errors[0], errors[0]
    assert "Traceback" not in result.output


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, private_cache):
    output = tmp_path_factory.mktemp("run") / "castle-atoms"
    result = invoke("train", "--model", "tiny-random", "--steps", 3, "--output", output, "--seed", 1)
    assert result.exit_code == 0, result.output
    return output


def test_help_does_not_import_torch():
    code = "import sys, sdtune.cli; sys.exit(1 if 'torch' in sys.modules or 'diffusers' in sys.modules else 0)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0
    assert "train" in invoke("--help").output


def test_every_help_text_is_shown_whole():
    """Typer renders help through rich, whose markup takes `[name]` for a style and drops it: every bracket
    a help text means as text is escaped, so nothing of it is lost on the screen."""
    import typer
    from rich.markup import render

    group = typer.main.get_command(app)
    commands = {name: command for name, command in group.commands.items()}
    for name, command in list(commands.items()):
        commands.update({f"{name} {sub}": child for sub, child in getattr(command, "commands", {}).items()})
    checked = 0
    for name, command in commands.items():
        for text in [command.help or "", *(getattr(param, "help", None) or "" for param in command.params)]:
            assert render(text).plain == text.replace("\\[", "["), f"{name}: {text}"
            checked += 1
    assert checked > 100


def test_paths_under_home_are_expanded_where_no_shell_did(tmp_path, monkeypatch):
    """`--output=~/runs/x` reaches sdtune unexpanded (no shell expands after `=`), as do TOML values: `~` is the
    home folder there too, never a folder named `~` in the working directory."""
    from sdtune.config import SampleConfig, TrainConfig

    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    (tmp_path / "home").mkdir()
    result = invoke("train", "--model", "tiny-random", "--dry-run", "--output=~/runs/x")
    assert result.exit_code == 0, result.output
    assert f"output: {tmp_path / 'home' / 'runs' / 'x'} (a new run)" in result.output
    config = TrainConfig(output="~/runs/y", images=["~/a", "b"], class_prompt="~ a prompt")
    assert config.output == str(tmp_path / "home" / "runs" / "y") and config.images == [str(tmp_path / "home" / "a"), "b"]
    assert config.class_prompt == "~ a prompt"  # text, not a path
    sample = SampleConfig(adapter="~/x.safetensors", prompt=["~/x"])
    assert sample.adapter == str(tmp_path / "home" / "x.safetensors") and sample.prompt == ["~/x"]
    assert not (tmp_path / "~").exists()


def test_train_writes_adapter_config_and_metrics(trained_run):
    from safetensors import safe_open

    assert sorted(p.name for p in trained_run.iterdir()) == ["adapter.safetensors", "config.toml", "logs", "metrics.jsonl"]
    records = [json.loads(line) for line in (trained_run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3] and all(r["loss"] > 0 for r in records)
    with safe_open(str(trained_run / "adapter.safetensors"), framework="pt") as handle:
        meta = handle.metadata()
    assert meta["method"] == "atoms" and meta["base_model"] == "tiny-random" and meta["token"] == "sks castle"
    assert meta["placeholder"] == "<castle>" and len(meta["fingerprint"]) == 16 and len(meta["structure"]) == 16


def test_config_replays(trained_run, tmp_path):
    result = invoke("train", "--config", trained_run / "config.toml", "--steps", 2, "--output", tmp_path / "replay")
    assert result.exit_code == 0, result.output
    assert "seed = 1" in (tmp_path / "replay" / "config.toml").read_text()


def test_output_into_a_closed_pipe_ends_quietly(tmp_path):
    """`sdtune sweep PLAN --dry-run | head -1`: the reader leaves early; no error line, the status of a SIGPIPE."""
    plan = tmp_path / "plan.toml"
    plan.write_text('name = "many"\n[train]\nmodel = "tiny-random"\nsteps = 1\n[axes]\nseed = ' + str(list(range(2000))) + "\n")
    reader = subprocess.Popen([sys.executable, "-m", "sdtune", "sweep", str(plan), "--output", str(tmp_path / "out"), "--dry-run"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert reader.stdout.readline().startswith(b"plan many: 2000 runs")
    reader.stdout.close()  # as head does after its line
    assert reader.wait(timeout=120) == 141 and reader.stderr.read() == b""
    assert not (tmp_path / "out").exists()


def test_train_resume_with_more_steps_says_it_extends_the_run(tmp_path, private_cache):
    """As a sweep whose plan raised its steps: the dry run and the run say the run is extended, not changed."""
    output = tmp_path / "run"
    assert invoke("train", "--model", "tiny-random", "--steps", 1, "--checkpoint-every", 1, "--output", output).exit_code == 0
    more = ("train", "--model", "tiny-random", "--steps", 2, "--checkpoint-every", 1, "--resume", "latest", "--output", output)
    dry = invoke(*more, "--dry-run")
    assert f"output: {output} (extends a run of 1 step to 2 from {output / 'checkpoints' / 'step-1'}" in dry.output, dry.output
    result = invoke(*more)
    assert result.exit_code == 0 and f"(extended a run of 1 step to 2, from {output / 'checkpoints' / 'step-1'})" in result.output, result.output


def test_train_dry_run_says_what_would_train_without_loading_or_writing(trained_run, tmp_path, monkeypatch):
    import sdtune.models
    from sdtune import methods

    counted = methods.create("atoms")
    counted.inject(sdtune.models.load_pipeline("tiny-random").unet)
    monkeypatch.setattr(sdtune.models, "load_pipeline", lambda *a, **k: pytest.fail("loaded the model"))

    result = invoke("train", "--model", "tiny-random", "--dry-run", "--steps", 40, "--batch-size", 2, "--output", tmp_path / "new")
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0].startswith("atoms (m=9,") and f": {counted.num_parameters():,} trained parameters" in lines[0]
    assert lines[1] == "8 training images of castle; prompts like 'photo of a sks castle.'"
    assert lines[2].startswith("40 steps at batch size 2: 80 images drawn, 10.0 epochs; lr 0.001 (constant), adamw")
    assert lines[3].startswith("memory: at least ") and lines[4] == f"output: {tmp_path / 'new'} (a new run)"
    assert not (tmp_path / "new").exists()

    before = sorted(p.name for p in trained_run.iterdir())
    refused = invoke("train", "--model", "tiny-random", "--dry-run", "--output", trained_run)
    assert refused.exit_code == 2 and "holds an earlier run" in refused.output
    replaced = invoke("train", "--model", "tiny-random", "--dry-run", "--overwrite", "--output", trained_run)
    assert replaced.exit_code == 0 and f"output: {trained_run} (replaces an earlier run: adapter.safetensors" in replaced.output
    assert sorted(p.name for p in trained_run.iterdir()) == before
    assert invoke("train", "--model", "tiny-random", "--dry-run", "--steps", 0).exit_code == 2

    one = tmp_path / "one-photo"
    one.mkdir()
    Image.new("RGB", (64, 64), (200, 40, 40)).save(one / "castle.png")
    single = invoke("train", "--model", "tiny-random", "--dry-run", "--images", one, "--steps", 1, "--output", tmp_path / "single")
    assert single.exit_code == 0, single.output
    assert single.output.splitlines()[1:3] == [
        "1 training image of castle; prompts like 'photo of a sks castle.'",
        "1 step at batch size 1: 1 image drawn, 1.0 epochs; lr 0.001 (constant), adamw, mixed precision no",
    ]

    # several concepts: each one's count and a prompt of each, in the order given (a caption of its own counted)
    other = tmp_path / "canal-photos"
    other.mkdir()
    for index in range(2):
        Image.new("RGB", (64, 64), (30, 60 + 40 * index, 200)).save(other / f"{index}.png")
    (other / "1.txt").write_text("a <canal> at night")
    several = invoke("train", "--model", "tiny-random", "--dry-run", "--concept", "castle", "--images", one, "--concept",
                     "canal", "--images", other, "--steps", 1, "--output", tmp_path / "several")
    assert several.exit_code == 0, several.output
    assert several.output.splitlines()[1] == ("3 training images (1 of castle, 2 of canal; 1 with a caption of their own); "
                                              "prompts like 'photo of a sks castle.', 'photo of a sks canal.'")


def test_train_dry_run_says_the_model_is_v_prediction_and_the_schedule_rescaled(tmp_path):
    plain = invoke("train", "--model", "tiny-random", "--dry-run", "--steps", 1, "--output", tmp_path / "plain")
    assert plain.exit_code == 0, plain.output
    assert "v-prediction" not in plain.output and "zero terminal SNR" not in plain.output
    result = invoke("train", "--model", "tiny-sd2-random", "--dry-run", "--zero-terminal-snr", "--steps", 1, "--output", tmp_path / "v")
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert " on tiny-sd2-random (v-prediction) at 64 px: " in lines[0]
    assert lines[1] == "zero terminal SNR: the noise schedule's betas rescaled so its last timestep is pure noise (SNR 0)"
    without = invoke("train", "--model", "tiny-sd2-random", "--dry-run", "--steps", 1, "--output", tmp_path / "v")
    assert "(v-prediction)" in without.output and "zero terminal SNR" not in without.output


def test_resuming_a_finished_run_says_there_is_nothing_to_train(tmp_path):
    args = ("train", "--model", "tiny-random", "--steps", 2, "--checkpoint-every", 2, "--output", tmp_path / "run")
    assert invoke(*args).exit_code == 0
    adapter = (tmp_path / "run" / "adapter.safetensors").read_bytes()
    result = invoke(*args, "--resume", "latest")
    assert result.exit_code == 0, result.output
    assert result.stdout.endswith(
        f"nothing to train: {tmp_path / 'run' / 'checkpoints' / 'step-2'} holds all 2 steps\n"
        f"adapter: {tmp_path / 'run' / 'adapter.safetensors'}\n"
    )
    assert (tmp_path / "run" / "adapter.safetensors").read_bytes() == adapter


def test_sample_writes_images_and_grid_reproducibly(trained_run, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("photo of a <castle>.\n# skipped\nThe <castle> at dawn.\n")
    args = ("sample", "--adapter", trained_run, "--prompts", prompts, "--num-images", 2, "--steps", 2)
    first = invoke(*args, "--output", tmp_path / "a")
    assert first.exit_code == 0, first.output
    invoke(*args, "--output", tmp_path / "b")
    grid = Image.open(tmp_path / "a" / "grid.png")
    assert grid.size == grid_size(rows=2, columns=2, image_size=(64, 64))
    names = sorted(p.name for p in (tmp_path / "a" / "images").iterdir())
    assert names == ["000-seed0.png", "000-seed1.png", "001-seed0.png", "001-seed1.png"]
    for name in names:
        assert (tmp_path / "a" / "images" / name).read_bytes() == (tmp_path / "b" / "images" / name).read_bytes()


def test_sample_without_a_prompt_draws_the_adapters_training_prompt(trained_run, tmp_path):
    """A run of one concept: its one training prompt, the images those `--prompt` draws; stacked adapters have no one
    prompt to draw, and without an adapter there is none (refused, as before)."""
    result = invoke("sample", "--adapter", trained_run, "--num-images", 2, "--steps", 1, "--output", tmp_path / "a")
    assert result.exit_code == 0, result.output
    assert "note: no prompt given: drew the adapter's training prompt 'photo of a <castle>.', 2 images\n" in result.stdout
    asked = invoke("sample", "--adapter", trained_run, "--prompt", "photo of a <castle>.", "--num-images", 2, "--steps", 1,
                   "--output", tmp_path / "b")
    assert asked.exit_code == 0 and "no prompt given" not in asked.stdout
    for name in ("000-seed0.png", "000-seed1.png", "grid.png"):
        path = Path("images", name) if name != "grid.png" else Path(name)
        assert (tmp_path / "a" / path).read_bytes() == (tmp_path / "b" / path).read_bytes()
    assert not (tmp_path / "a" / "images" / "001-seed0.png").exists()
    stacked = invoke("sample", "--adapter", trained_run, "--adapter", trained_run / "adapter.safetensors", "--output", tmp_path / "c")
    assert_one_line_error(stacked, 2, "(--dataset NAME): stacked adapters have no one training prompt to draw")


def test_sample_base_model_without_adapter(tmp_path, private_cache):
    result = invoke("sample", "--model", "tiny-random", "--prompt", "a <castle>", "--num-images", 1, "--steps", 1, "--output", tmp_path)
    assert result.exit_code == 0, result.output
    assert (tmp_path / "grid.png").exists()
    assert f"wrote 1 image and {tmp_path / 'grid.png'} (fp32; " in result.stdout


def test_sample_draws_at_any_aspect_ratio(tmp_path, private_cache):
    """--width and --height: images of that size, grid cells of their aspect (not squashed into squares), the
    PNG text's Size width x height; --width/--height win over --resolution, which sets the other side."""
    common = ("sample", "--model", "tiny-random", "--prompt", "a castle", "--steps", 1)
    result = invoke(*common, "--num-images", 2, "--width", 64, "--height", 128, "--output", tmp_path / "portrait")
    assert result.exit_code == 0, result.output
    for seed in (0, 1):
        with Image.open(tmp_path / "portrait" / "images" / f"000-seed{seed}.png") as image:
            assert image.size == (64, 128)
            assert ", Size: 64x128, " in image.text["parameters"]
            settings = json.loads(image.text["sdtune"])
            assert (settings["width"], settings["height"]) == (64, 128)
            drawn = image.convert("RGB")
    # two cells of 128x256 (enlarged until the smaller side is 128), padded, with a caption under the row
    assert grid_size(rows=1, columns=2, image_size=(64, 128)) == (2 * 128 + 3 * 4, 256 + 2 * 14 + 2 * 4)
    grid = Image.open(tmp_path / "portrait" / "grid.png").convert("RGB")
    assert grid.size == (268, 292)
    second_cell = grid.crop((4 + 128 + 4, 4, 4 + 128 + 4 + 128, 4 + 256))
    assert second_cell.tobytes() == drawn.resize((128, 256), Image.Resampling.NEAREST).tobytes()

    result = invoke(*common, "--num-images", 1, "--resolution", 64, "--width", 128, "--output", tmp_path / "landscape")
    assert result.exit_code == 0, result.output
    with Image.open(tmp_path / "landscape" / "images" / "000-seed0.png") as image:
        assert image.size == (128, 64) and ", Size: 128x64, " in image.text["parameters"]
    assert Image.open(tmp_path / "landscape" / "grid.png").size == grid_size(rows=1, columns=1, image_size=(128, 64))


def test_a_grid_keeps_every_images_aspect_in_rows_and_columns_of_mixed_sizes():
    """Runs or prompts of other sizes side by side (`compare`'s grid): a row as tall as its tallest cell, each image
    scaled to that height keeping its aspect, each column as wide as its widest cell."""
    from sdtune.sampling import make_grid

    square, wide, tall = Image.new("RGB", (64, 64), "red"), Image.new("RGB", (128, 64), "blue"), Image.new("RGB", (32, 64), "green")
    grid = make_grid([[square, wide], [tall, square]], ["first", "second"])
    # row 1: cells 128x128 and 256x128; row 2: the tall one 64x128 (enlarged until its smaller side is 128: 128x256), so
    # the row is 256 tall and the square beside it 256x256; columns 128 and 256 wide
    assert grid.size == (4 + 128 + 4 + 256 + 4, 4 + 128 + 28 + 4 + 256 + 28 + 4)
    cells = {(4, 4, 132, 132): "red", (136, 4, 392, 132): "blue", (4, 164, 132, 420): "green", (136, 164, 392, 420): "red"}
    for box, colour in cells.items():
        assert set(grid.crop(box).getdata()) == {Image.new("RGB", (1, 1), colour).getpixel((0, 0))}, box


def test_sample_refuses_bad_widths_and_heights_before_the_model_loads(tmp_path, monkeypatch):
    import sdtune.models

    def never(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(sdtune.models, "load_pipeline", never)
    common = ("sample", "--model", "tiny-random", "--prompt", "a castle", "--output", tmp_path / "out")
    assert_one_line_error(invoke(*common, "--width", 60), 2, "--width must be a positive multiple of 8, got 60")
    assert_one_line_error(invoke(*common, "--height", 0), 2, "--height must be a positive multiple of 8, got 0")
    # the smaller side decides, named by the flag that set it
    too_small = "is too small for tiny-random: at least 24 (below it, a GroupNorm of the UNet block 1"
    assert_one_line_error(invoke(*common, "--width", 256, "--height", 16), 2, f"--height 16 {too_small}")
    assert_one_line_error(invoke(*common, "--width", 16), 2, f"--width 16 {too_small}")
    assert_one_line_error(invoke(*common, "--resolution", 16, "--height", 64), 2, f"--resolution 16 {too_small}")
    assert_one_line_error(invoke("evaluate", "--run", tmp_path, "--width", 12), 2, "--width must be a positive multiple of 8, got 12")
    assert not (tmp_path / "out").exists()


def test_a_prompt_files_lines_draw_with_their_own_settings(tmp_path, private_cache, monkeypatch):
    """kohya-ss' options after a prompt (--n, --w, --h, --d, --s, --l) win over the command's for that prompt, exactly
    as the command's own flags would draw it; prompts of one setting still share a pipeline call; each image's PNG
    text holds its own settings; the grid's rows keep their sizes; options sdtune does not read are named."""
    import sdtune.sampling as sampling

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a castle at dusk --n blurry --w 64 --h 128 --d 42 --s 2 --l 5\n"
                       "a plain castle\n"
                       "a wide castle --W 128 --ss euler_a\n"
                       "a plain tower\n")
    calls = []
    original = sampling.draw

    def spy(pipe, prompts, **settings):
        calls.append((list(prompts), settings["width"], settings["height"], settings["num_inference_steps"],
                      settings["guidance_scale"], settings["negative_prompt"]))
        return original(pipe, prompts, **settings)

    monkeypatch.setattr(sampling, "draw", spy)
    common = ("sample", "--model", "tiny-random", "--num-images", 2)
    with pytest.warns(UserWarning, match=f"^prompt file {prompts}: ignored --ss \\(line 3\\); sdtune reads --n \\(negative prompt\\)"):
        result = invoke(*common, "--prompts", prompts, "--steps", 1, "--negative-prompt", "ugly", "--output", tmp_path / "file")
    assert result.exit_code == 0, result.output
    assert calls == [
        (["a castle at dusk"], 64, 128, 2, 5.0, ["blurry"]),
        (["a plain castle", "a plain tower"], 64, 64, 1, 7.5, ["ugly", "ugly"]),
        (["a wide castle"], 128, 64, 1, 7.5, ["ugly"]),
    ]
    images = tmp_path / "file" / "images"
    assert sorted(p.name for p in images.iterdir()) == [
        "000-seed42.png", "000-seed43.png", "001-seed0.png", "001-seed1.png", "002-seed0.png", "002-seed1.png",
        "003-seed0.png", "003-seed1.png"]
    with Image.open(images / "000-seed43.png") as image:
        assert image.size == (64, 128)
        assert image.text["parameters"].startswith("a castle at dusk\nNegative prompt: blurry\nSteps: 2, Sampler: PLMS, "
                                                   "CFG scale: 5.0, Seed: 43, Size: 64x128, ")
        settings = json.loads(image.text["sdtune"])
        assert (settings["negative_prompt"], settings["width"], settings["height"], settings["seed"], settings["steps"],
                settings["guidance"]) == ("blurry", 64, 128, 43, 2, 5.0)
    with Image.open(images / "002-seed0.png") as image:
        assert image.size == (128, 64)
        assert json.loads(image.text["sdtune"])["negative_prompt"] == "ugly" and ", Size: 128x64, " in image.text["parameters"]
    # cells of 128x256, 128x128, 256x128, 128x128 (enlarged until the smaller side is 128), columns as wide as the widest
    expected = grid_size(rows=4, columns=2, image_size=(64, 64), row_sizes=[(64, 128), (64, 64), (128, 64), (64, 64)])
    assert expected == (2 * 256 + 3 * 4, 256 + 3 * 128 + 4 * (2 * 14 + 4) + 4)
    grid = Image.open(tmp_path / "file" / "grid.png").convert("RGB")
    assert grid.size == expected
    with Image.open(images / "002-seed1.png") as wide:
        cell = grid.crop((4 + 256 + 4, 4 + 256 + 32 + 128 + 32, 4 + 256 + 4 + 256, 4 + 256 + 32 + 128 + 32 + 128))
        assert cell.tobytes() == wide.convert("RGB").resize((256, 128), Image.Resampling.NEAREST).tobytes()

    # the line's options draw what the command's own flags draw
    alone = invoke(*common, "--prompt", "a castle at dusk", "--negative-prompt", "blurry", "--width", 64, "--height", 128,
                   "--seed", 42, "--steps", 2, "--guidance", 5, "--output", tmp_path / "flags")
    assert alone.exit_code == 0, alone.output
    for seed in (42, 43):
        assert pixels_of(images / f"000-seed{seed}.png") == pixels_of(tmp_path / "flags" / "images" / f"000-seed{seed}.png")


def test_a_prompt_files_bad_options_are_refused_before_the_model_loads(tmp_path, monkeypatch):
    import sdtune.models

    def never(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(sdtune.models, "load_pipeline", never)
    prompts = tmp_path / "prompts.txt"
    common = ("sample", "--model", "tiny-random", "--prompts", prompts, "--output", tmp_path / "out")
    for lines, message in (
        ("a castle\na castle --w abc\n", f"{prompts} line 2: --w takes the width in pixels, a positive multiple of 8, got 'abc'"),
        ("a castle --h 100\n", f"{prompts} line 1: --h takes the height in pixels, a positive multiple of 8, got '100'"),
        ("a castle --w 16\n", f"{prompts} line 1: --width 16 is too small for tiny-random: at least 24"),
        ("a castle\n\na castle --s 5000\n", f"{prompts} line 3: --steps 5,000: tiny-random's scheduler has 1000 timesteps"),
    ):
        prompts.write_text(lines)
        assert_one_line_error(invoke(*common), 2, message)
    assert not (tmp_path / "out").exists()


def pixels_of(path) -> bytes:
    """An image's pixels, without its PNG text (which names the adapter and its strength)."""
    with Image.open(path) as image:
        return image.convert("RGB").tobytes()


def test_sample_and_evaluate_read_their_settings_from_a_config_file(trained_run, tmp_path):
    """`--config` takes the TOML keys of SampleConfig/EvaluateConfig (a sweep plan's [sample], [evaluate]);
    flags override the file, and a file without --prompt keeps its prompts."""
    settings = tmp_path / "sample.toml"
    settings.write_text(f'adapter = "{trained_run}"\nprompt = ["a <castle>", "the <castle> at dawn"]\nnum_images = 1\nsteps = 1\n')
    result = invoke("sample", "--config", settings, "--output", tmp_path / "from-file")
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in (tmp_path / "from-file" / "images").iterdir()) == ["000-seed0.png", "001-seed0.png"]
    result = invoke("sample", "--config", settings, "--num-images", 2, "--prompt", "a <castle>", "--output", tmp_path / "flags")
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in (tmp_path / "flags" / "images").iterdir()) == ["000-seed0.png", "000-seed1.png"]

    measure = tmp_path / "evaluate.toml"
    measure.write_text(
        f'images = "{tmp_path / "from-file"}"\nprompt = ["a <castle>", "the <castle> at dawn"]\n'
        f'output = "{tmp_path / "eval.json"}"\nclip_model = "nobody/no-such-clip"\n'
        f'dino_model = "nobody/no-such-dino"\nfid_features = "none"\n'
    )
    result = invoke("evaluate", "--config", measure)
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "eval.json").read_text())
    assert report["generated_images"] == 2 and report["models"]["clip"] == "nobody/no-such-clip"
    assert report["prompts"] == ["a <castle>", "the <castle> at dawn"]

    settings.write_text("num_imagez = 1\n")
    assert_one_line_error(invoke("sample", "--config", settings), 2, f"unknown setting(s) in {settings}: num_imagez")
    assert_one_line_error(invoke("evaluate", "--config", tmp_path / "missing.toml"), 2, "config file not found")


def test_sample_negative_prompt_scheduler_and_adapter_scale(trained_run, tmp_path):
    common = ("--prompt", "a <castle>", "--num-images", 1, "--steps", 3)

    def image(name, *extra):
        result = invoke("sample", *common, *extra, "--output", tmp_path / name)
        assert result.exit_code == 0, result.output
        return (tmp_path / name / "images" / "000-seed0.png").read_bytes()

    plain = image("plain", "--adapter", trained_run)
    assert image("negative", "--adapter", trained_run, "--negative-prompt", "a blurry <castle>") != plain
    ancestral = image("ancestral", "--adapter", trained_run, "--scheduler", "euler-ancestral")
    assert ancestral != plain  # another sampler, and still seeded image by image
    assert image("ancestral-again", "--adapter", trained_run, "--scheduler", "euler-ancestral") == ancestral
    image("base", "--model", "tiny-random", "--token", "sks castle")
    image("scale-0", "--adapter", trained_run, "--adapter-scale", 0)
    assert pixels_of(tmp_path / "scale-0" / "images" / "000-seed0.png") == pixels_of(tmp_path / "base" / "images" / "000-seed0.png")


def test_sample_sweeps_adapter_strengths(trained_run, tmp_path):
    common = ("--prompt", "a <castle>", "--num-images", 2, "--steps", 2)
    result = invoke("sample", *common, "--adapter", trained_run, "--adapter-scale", "1,0", "--output", tmp_path / "sweep")
    assert result.exit_code == 0, result.output
    images = tmp_path / "sweep" / "images"
    names = sorted(p.name for p in images.iterdir())
    assert names == ["000-scale0-seed0.png", "000-scale0-seed1.png", "000-scale1-seed0.png", "000-scale1-seed1.png"]
    assert Image.open(tmp_path / "sweep" / "grid.png").size == grid_size(rows=1, columns=4, image_size=(64, 64), header=True)
    # each strength draws what a run at that one strength draws; 0 after 1 is the base model again
    assert invoke("sample", *common, "--adapter", trained_run, "--output", tmp_path / "plain").exit_code == 0
    assert invoke("sample", *common, "--model", "tiny-random", "--token", "sks castle", "--output", tmp_path / "base").exit_code == 0
    for seed in (0, 1):
        adapted = (images / f"000-scale1-seed{seed}.png").read_bytes()
        assert adapted == (tmp_path / "plain" / "images" / f"000-seed{seed}.png").read_bytes()
        assert pixels_of(images / f"000-scale0-seed{seed}.png") == pixels_of(tmp_path / "base" / "images" / f"000-seed{seed}.png")
        assert adapted != (images / f"000-scale0-seed{seed}.png").read_bytes()


def test_sampled_images_carry_their_settings_as_the_web_ui_writes_them(trained_run, tmp_path):
    from pathlib import Path

    result = invoke("sample", "--adapter", trained_run, "--prompt", "a <castle>, at dawn", "--prompt", "ein Schloß ☃",
                    "--negative-prompt", "blurry", "--num-images", 2, "--seed", 7, "--steps", 2, "--scheduler", "dpm++-karras",
                    "--adapter-scale", "0.5,1", "--output", tmp_path / "out")
    assert result.exit_code == 0, result.output
    run_name = Path(trained_run).name
    with Image.open(tmp_path / "out" / "images" / "000-scale0.5-seed8.png") as image:
        parameters, settings = image.text["parameters"], json.loads(image.text["sdtune"])
    assert parameters.splitlines() == [
        "a sks castle, at dawn",
        "Negative prompt: blurry",
        f"Steps: 2, Sampler: DPM++ 2M Karras, CFG scale: 7.5, Seed: 8, Size: 64x64, Model: tiny-random, "
        f"Adapter: {run_name}, Adapter strength: 0.5, Dtype: fp32, Version: sdtune {sdtune_version()}",
    ]
    assert settings == {
        "prompt": "a sks castle, at dawn", "negative_prompt": "blurry", "seed": 8, "steps": 2, "guidance": 7.5,
        "guidance_rescale": 0.0, "sampler": "DPM++ 2M Karras", "width": 64, "height": 64, "model": "tiny-random",
        "adapter": run_name, "adapter_scale": 0.5, "dtype": "fp32", "version": f"sdtune {sdtune_version()}",
    }
    with Image.open(tmp_path / "out" / "images" / "001-scale1-seed7.png") as image:
        assert json.loads(image.text["sdtune"])["prompt"] == "ein Schloß ☃" and "Adapter strength: 1," in image.text["parameters"]
    assert str(tmp_path) not in parameters and str(Path(trained_run).parent) not in image.text["sdtune"]  # names, not paths


def sdtune_version() -> str:
    from sdtune import __version__

    return __version__


def test_sample_in_half_precision_draws_the_same_pictures(trained_run, tmp_path):
    import numpy as np

    common = ("--prompt", "a <castle>", "--num-images", 2, "--steps", 2, "--adapter", trained_run)

    def pixels(name, *extra):
        result = invoke("sample", *common, *extra, "--output", tmp_path / name)
        assert result.exit_code == 0, result.output
        return result.output, [np.asarray(Image.open(tmp_path / name / "images" / f"000-seed{s}.png"), dtype=float) for s in (0, 1)]

    output, full = pixels("fp32")  # the default on a CPU
    assert "(fp32; start-up " in output and " s an image)" in output
    for dtype in ("bf16", "fp16"):
        output, half = pixels(dtype, "--dtype", dtype)
        assert f"({dtype}; " in output
        assert all(0 < np.abs(a - b).mean() < 20 for a, b in zip(full, half))  # the same pictures, rounded otherwise
    # a sweep in half precision draws, at each strength, what a single-strength run draws
    sweep = invoke("sample", *common, "--dtype", "bf16", "--adapter-scale", "0,1", "--output", tmp_path / "sweep")
    assert sweep.exit_code == 0, sweep.output
    for seed in (0, 1):
        assert (tmp_path / "sweep" / "images" / f"000-scale1-seed{seed}.png").read_bytes() == (
            tmp_path / "bf16" / "images" / f"000-seed{seed}.png"
        ).read_bytes()
    assert_one_line_error(invoke("sample", *common, "--dtype", "fp64", "--output", tmp_path / "x"), 2, "--dtype must be one of")


def test_sampling_pipeline_dtypes(tiny_pipe):
    import torch

    from sdtune.precision import cast_pipeline, sampling_dtype, vae_dtype

    assert sampling_dtype(None, "cpu") == torch.float32 and sampling_dtype(None, "cuda") == torch.float16
    assert sampling_dtype("bf16", "cpu") == torch.bfloat16
    # an SD v1 VAE decodes in fp16 as diffusers' pipeline does (the images that overflow are decoded again in fp32)
    assert vae_dtype(torch.float16, tiny_pipe) == torch.float16
    assert vae_dtype(torch.bfloat16, tiny_pipe) == torch.bfloat16
    vae_weights = [parameter.detach().clone() for parameter in tiny_pipe.vae.parameters()]
    cast_pipeline(tiny_pipe, torch.float16)
    assert tiny_pipe.unet.dtype == tiny_pipe.text_encoder.dtype == tiny_pipe.vae.dtype == torch.float16
    cast_pipeline(tiny_pipe, torch.float32)  # as a strength sweep merges: the VAE gets its own fp32 weights back
    assert all(torch.equal(kept, parameter) for kept, parameter in zip(vae_weights, tiny_pipe.vae.parameters()))


def test_adapter_scale_takes_one_number_or_a_list(tmp_path):
    from sdtune.config import SampleConfig
    from sdtune.errors import SdtuneError

    settings = tmp_path / "sample.toml"
    settings.write_text('prompt = ["x"]\nadapter = "run"\nadapter_scale = [0, 0.5, 1]\n')
    assert SampleConfig.load(settings).adapter_scales == [0.0, 0.5, 1.0]
    assert SampleConfig.load(None, prompt=["x"], adapter="run", adapter_scale="0.25").adapter_scale == 0.25
    assert SampleConfig.load(None, prompt=["x"], adapter="run", adapter_scale="0, 0.5").adapter_scales == [0.0, 0.5]
    with pytest.raises(SdtuneError, match="adapter_scale must be a number or a list of numbers"):
        SampleConfig(prompt=["x"], adapter="run", adapter_scale=["strong"])


def test_every_scheduler_is_built_from_the_model_config():
    from diffusers import PNDMScheduler

    from sdtune.config import SCHEDULERS
    from sdtune.sampling import make_scheduler

    config = PNDMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012).config
    built = {name: make_scheduler(name, config) for name in SCHEDULERS if name != "default"}
    assert len({type(s).__name__ for s in built.values()}) == len(built) - 1  # dpm++ twice, with and without Karras
    assert built["dpm++-karras"].config.use_karras_sigmas and not built["dpm++"].config.use_karras_sigmas
    assert all(s.config.beta_schedule == "scaled_linear" and s.config.beta_end == 0.012 for s in built.values())


def test_methods_table_counts_sd14():
    result = invoke("methods")
    assert result.exit_code == 0, result.output
    assert "4,212" in result.output
    tunes_encoder = {line.split(":")[0] for line in result.output.splitlines() if "--train-text-encoder" in line}
    assert tunes_encoder == {"atoms", "lora", "loha", "lokr", "oft"}
    # the kohya-ss and LyCORIS families for every method that takes them: (method, family) → (trainable, layers)
    rows = {tuple(line.split()[:2]): tuple(line.split()[2:4]) for line in result.output.splitlines() if "targets=" in line}
    for name in ("lora", "loha", "lokr", "oft"):
        assert {family: rows[(name, f"targets={family}")][1] for family in ("transformer", "locon", "full")} == {
            "transformer": "192", "locon": "278", "full": "282"}
    assert rows[("lora", "targets=transformer")][0] == "1,695,744" and rows[("lora", "targets=locon")][0] == "4,203,264"
    assert rows[("loha", "targets=transformer")][0] == "3,391,488" and rows[("loha", "targets=locon")][0] == "8,406,528"


def test_methods_counts_a_models_unet_from_its_config_without_loading_weights(tiny_path, monkeypatch):
    """`--model` a pipeline: the counts come from its UNet's config built on the meta device (none of its weights read),
    and equal those of the method injected into the loaded UNet."""
    import sdtune.models
    from sdtune import methods

    expected = {}
    for name in ("atoms", "lora"):
        method = methods.create(name)
        method.inject(sdtune.models.load_pipeline("tiny-random").unet)
        expected[name] = (f"{method.num_parameters():,}", str(len(method.target_names)))

    def no_weights(*args, **kwargs):
        raise AssertionError("sdtune methods loaded a pipeline")

    monkeypatch.setattr(sdtune.models, "load_pipeline", no_weights)
    monkeypatch.setattr(methods, "available", lambda: ["atoms", "lora"])
    result = invoke("methods", "--model", "tiny-random")
    assert result.exit_code == 0, result.output
    rows = {line.split()[0]: tuple(line.split()[2:4]) for line in result.stdout.splitlines() if line.split()[1:2] == ["defaults"]}
    assert rows == expected


@pytest.mark.parametrize(
    "args,pattern",
    [
        (("train", "--method", "nope", "--model", "tiny-random"), "unknown method 'nope'"),
        (("train", "--model", "tiny-random", "--images", "/no/such/dir"), "image folder not found"),
        (("train", "--model", "tiny-random", "--steps", 0), "--steps must be at least 1"),
        (("train", "--model", "tiny-random", "--lr", -1), "--lr must be positive"),
        (("train", "--model", "/no/such/model"), "use --model tiny"),
        (("train", "--method", "atoms", "--option", "rank=4"), "has no option(s) rank"),
        (("sample", "--adapter", "/no/adapter.safetensors", "--prompt", "x"), "adapter not found"),
        (("sample", "--model", "tiny-random"), "give a prompt file"),
        (("sample", "--model", "tiny-random", "--prompt", "x", "--scheduler", "nope"), "--scheduler must be one of"),
        (("sample", "--model", "tiny-random", "--prompt", "x", "--adapter-scale", 0.5), "--adapter-scale needs --adapter"),
        (("sample", "--model", "tiny-random", "--prompt", "x", "--adapter-scale", "nan"), "--adapter-scale must be a finite"),
        (("sample", "--model", "tiny-random", "--prompt", "x", "--adapter-scale", "0,1"), "--adapter-scale needs --adapter"),
        (("sample", "--adapter", "run", "--prompt", "x", "--adapter-scale", "0,strong"), "--adapter-scale takes numbers separated by commas"),
        (("sample", "--adapter", "run", "--prompt", "x", "--adapter-scale", "0.5,0.5"), "lists a strength twice (to 6 digits): 0.5,0.5"),
        (("sample", "--adapter", "run", "--prompt", "x", "--adapter-scale", "0,inf"), "--adapter-scale must be a finite number, got 0,inf"),
    ],
)
def test_bad_input_is_one_line_exit_2(args, pattern):
    assert_one_line_error(invoke(*args), 2, pattern)


@pytest.mark.parametrize("flag,instead", [
    ("--network_dim", "--rank"),
    ("--network-dim", "--rank"),  # kohya-ss' flag spelled with dashes
    ("--max_train_steps", "--steps"),  # click's own guess was --max-timestep
    ("--network_weights", "--init-weights"),
    ("--enable_wildcard", "nothing: a caption file's lines are always read as variants"),  # kohya-ss reads the first alone
])
def test_a_kohya_ss_flag_is_refused_saying_what_sdtune_takes_instead(flag, instead):
    """kohya-ss' training flags that sdtune spells otherwise: the one-line refusal says which flag to give, from the
    README's "Coming from kohya-ss" table, in place of click's guess at a near spelling; another unknown flag keeps it."""
    result = invoke("train", "--model", "tiny-random", flag, "8")
    spelled = "--" + flag[2:].replace("-", "_")
    assert_one_line_error(result, 2, f"No such option: {flag}; for kohya-ss' {spelled}, sdtune takes {instead}")
    assert "Possible options" not in result.stderr and "Coming from kohya-ss" in result.stderr
    assert_one_line_error(invoke("train", "--model", "tiny-random", "--max_timestepz", "8"), 2,
                          "No such option: --max_timestepz (Possible options: --max-timestep")
    assert_one_line_error(invoke("export", "run", "--format", "kohya", "--output", "x.safetensors", "--save_precision", "fp16"),
                          2, "for kohya-ss' --save_precision, sdtune takes --dtype of `sdtune export`")


def test_empty_image_folder_and_prompt_file(tmp_path, trained_run):
    (tmp_path / "empty").mkdir()
    assert_one_line_error(invoke("train", "--model", "tiny-random", "--images", tmp_path / "empty"), 2, "has no images")
    (tmp_path / "empty.txt").write_text("\n# nothing\n")
    assert_one_line_error(invoke("sample", "--adapter", trained_run, "--prompts", tmp_path / "empty.txt"), 2, "has no prompts")


def test_unknown_toml_setting(tmp_path):
    config = tmp_path / "run.toml"
    config.write_text('method = "atoms"\nstepz = 3\n')
    assert_one_line_error(invoke("train", "--config", config), 2, "unknown setting(s)")


def test_a_kohya_ss_config_file_is_refused_saying_what_sdtune_takes_instead(tmp_path):
    """A kohya-ss config file's keys (its --config_file) and a kohya-ss dataset config (its [general] and
    [[datasets]] tables) given to --config: the refusal names sdtune's settings for the keys it knows of, as flags on
    the command line and as Python spells them from Python; other unknown keys get no such words."""
    from sdtune.config import TrainConfig
    from sdtune.errors import SdtuneError

    arguments = tmp_path / "kohya.toml"
    arguments.write_text('network_dim = 8\nlearning_rate = 1e-4\n')
    assert_one_line_error(invoke("train", "--config", arguments), 2, "unknown setting(s) in "
                          f"{arguments}: learning_rate, network_dim; kohya-ss' learning_rate is --lr, network_dim --rank (the README's")
    dataset = tmp_path / "dataset_config.toml"
    dataset.write_text('[general]\nenable_bucket = true\n[[datasets]]\nresolution = 512\n')
    assert_one_line_error(invoke("train", "--config", dataset), 2,
                          "datasets, general; a kohya-ss dataset config is not read: give its image folders as --images and --class-images")
    with pytest.raises(SdtuneError, match=r"""network_dim, stepz; kohya-ss' network_dim is options\["rank"\] \(the README's"""):
        TrainConfig(network_dim=8, stepz=3)
    with pytest.raises(SdtuneError, match=r"^unknown setting\(s\): stepz$"):
        TrainConfig(stepz=3)


def test_adapter_for_another_base_model_is_refused(trained_run, tmp_path):
    from sdtune.models import build_tiny_pipeline

    other = tmp_path / "other-model"
    build_tiny_pipeline(seed=5).save_pretrained(other)
    result = invoke("sample", "--adapter", trained_run, "--model", other, "--prompt", "x", "--steps", 1)
    assert_one_line_error(result, 2, "was trained on base model 'tiny-random'")


def test_non_finite_loss_stops_with_exit_1_and_keeps_last_adapter(tmp_path):
    from safetensors import safe_open

    output = tmp_path / "nan"
    result = invoke("train", "--model", "tiny-random", "--steps", 6, "--lr", "1e30", "--save-every", 1, "--output", output)
    assert_one_line_error(result, 1, "loss is")
    step = int(result.stderr.split("at step ")[1].split(";")[0])
    assert step > 1
    with safe_open(str(output / "adapter.safetensors"), framework="pt") as handle:
        assert int(handle.metadata()["step"]) == step - 1
    assert not [p for p in output.iterdir() if p.name.endswith(".tmp")]


def test_method_option_flags_show_the_option_fields_help_and_default():
    import dataclasses

    from sdtune import methods

    for flag, spec in methods.OPTION_FLAGS.items():
        for name in spec.methods:
            options = {f.name: f for f in dataclasses.fields(methods.method_class(name).Options)}
            assert options[spec.option].metadata["help"], (flag, name)
    assert methods.option_flag_help("--rank") == "lora/loha/lokr: rank r (default: 4)."
    shown = " ".join(invoke("train", "--help").output.replace("│", " ").split())  # rich wraps the help column
    assert "--atoms-m <int> atoms: number of filter atoms per convolution (default: 9)." in shown
    assert "--alpha <float> lora/loha/lokr: alpha; the update is scaled by alpha/rank (default: the rank)." in shown


@pytest.mark.parametrize("rank, printed", [("0", True), ("1", False)])
def test_only_the_main_process_prints_warnings(rank, printed, monkeypatch):
    """Under `accelerate launch` every process runs the command; a warning is said once, by rank 0."""
    import warnings

    from sdtune.cli import handle_errors

    monkeypatch.setenv("RANK", rank)

    @handle_errors
    def command():
        warnings.warn("a damaged checkpoint was passed over")

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        command()
    assert [str(w.message) for w in caught] == (["a damaged checkpoint was passed over"] if printed else [])


def test_a_warning_prints_on_its_own_line_above_a_progress_bar():
    import io

    from tqdm import tqdm

    from sdtune.cli import _show_warning

    stream = io.StringIO()
    with tqdm(total=3, file=stream, ascii=True, mininterval=0) as bar:
        bar.update(1)
        _show_warning(UserWarning("the VAE overflowed in fp16"), UserWarning, "sampling.py", 1, file=stream)
        bar.update(1)
    shown = [line.split("\r")[-1] for line in stream.getvalue().split("\n")]  # what a terminal leaves on each line
    assert "warning: the VAE overflowed in fp16" in shown


def _names_path(annotation) -> bool:
    """Whether a command parameter's annotation is a Path, or holds one (Optional[List[Path]])."""
    import pathlib
    import typing

    if isinstance(annotation, type) and issubclass(annotation, pathlib.PurePath):
        return True
    return any(_names_path(inner) for inner in typing.get_args(annotation))


def test_every_path_parameter_of_every_command_refuses_an_empty_value(tmp_path, monkeypatch):
    """typer reads `--output ''` as "." (the current folder): each Path option and argument, of every command, says
    so in one line and exits 2 before the command runs, nothing written where it was started."""
    import inspect

    import typer

    monkeypatch.chdir(tmp_path)
    group = typer.main.get_command(app)
    checked = []
    for info in app.registered_commands:
        name = info.name or info.callback.__name__.replace("_", "-")
        annotations = {p.name: p.annotation for p in inspect.signature(info.callback, eval_str=True).parameters.values()}
        command = group.commands[name]
        for param in command.params:
            if not _names_path(annotations[param.name]):
                continue
            is_option = param.opts[0].startswith("--")
            label = param.opts[0] if is_option else param.name.upper()
            others = []
            for other in command.params:  # the command's other required values, given so only the empty one is wrong
                if other is not param and other.required:
                    value = "kohya" if other.name == "export_format" else str(tmp_path / "given")
                    others += [other.opts[0], value] if other.opts[0].startswith("--") else [value]
            given = [param.opts[0], ""] if is_option else [""]
            result = invoke(name, *given, *others)
            assert_one_line_error(result, 2, f"error: {label} must not be empty")
            checked.append(f"{name} {label}")
    assert {"train --output", "train --images", "sample --adapter", "merge SOURCE", "compare RUNS", "sweep PLAN",
            "evaluate --reference", "train --config", "extract --output", "train --init-weights"} <= set(checked), checked
    assert len(checked) >= 30, checked
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("command", ["train", "sample", "evaluate"])
def test_an_empty_path_setting_says_the_same_from_a_flag_and_toml(command, tmp_path):
    """Path settings typed as text (`--model ''`, `--init-weights ''`) and TOML's empty strings are refused as the
    Path flags are, in the same words; Python code is told the setting's own name."""
    import dataclasses

    from sdtune.config import NOT_FLAGS, PATH_SETTINGS, EvaluateConfig, SampleConfig, TrainConfig

    config_class = {"train": TrainConfig, "sample": SampleConfig, "evaluate": EvaluateConfig}[command]
    names = sorted({f.name for f in dataclasses.fields(config_class)} & PATH_SETTINGS - NOT_FLAGS)
    assert len(names) >= 4, names
    for name in names:
        flag = "--" + name.replace("_", "-")
        toml = tmp_path / f"{name}.toml"
        toml.write_text(f'{name} = ""\n')
        said = [invoke(command, *args) for args in ([flag, ""], ["--config", toml])]
        for result in said:
            assert_one_line_error(result, 2, f"error: {flag} must not be empty")
        assert said[0].stderr == said[1].stderr
        with pytest.raises(Exception, match=f"^{name} must not be empty$"):
            config_class(**{name: ""})


def test_save_every_not_below_steps_says_no_step_file_is_written_and_the_ema_saves_are_listed(tmp_path, private_cache):
    run = tmp_path / "castle"
    for every in (3, 5):
        with pytest.warns(UserWarning, match=f"^--save-every {every} is not below --steps 3: no adapter-step-N file is written$"):
            dry = invoke("train", "--model", "tiny-random", "--steps", 3, "--save-every", every, "--output", run, "--dry-run")
        assert dry.exit_code == 0, dry.output
        assert f"saves every {every} steps: no adapter-step-N file is written, as the run ends at step 3 first" in dry.output
        assert "0 adapter-step-N" not in dry.output and "at least 0 B" not in dry.output, dry.output
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert invoke("train", "--model", "tiny-random", "--steps", 3, "--save-every", 2, "--output", run, "--dry-run").exit_code == 0
    assert not [w for w in caught if "--save-every" in str(w.message)]  # a save before the last step is written
    result = invoke("train", "--model", "tiny-random", "--steps", 5, "--save-every", 2, "--ema-decay", 0.9, "--output", run)
    assert result.exit_code == 0, result.output
    assert "saves: 2 files, adapter-step-000002.safetensors to adapter-step-000004.safetensors\n" in result.output
    assert "saves: 2 files, adapter-ema-step-000002.safetensors to adapter-ema-step-000004.safetensors" in result.output


def test_a_runs_step_files_are_sampled_evaluated_compared_and_exported_beside_its_adapter(tmp_path, private_cache):
    from safetensors import safe_open

    run = tmp_path / "castle"
    dry = invoke("train", "--model", "tiny-random", "--steps", 5, "--save-every", 2, "--output", run, "--dry-run")
    assert "saves every 2 steps: 2 adapter-step-N files at the end (all kept), at least " in dry.output, dry.output
    dry = invoke("train", "--model", "tiny-random", "--steps", 5, "--save-every", 2, "--keep-saves", 1, "--ema-decay", 0.9,
                 "--output", run, "--dry-run")  # each save's EMA file counted apart, not as more step files
    assert ("saves every 2 steps: 1 adapter-step-N file and 1 adapter-ema-step-N file at the end (the newest 1 kept), "
            "at least ") in dry.output, dry.output
    result = invoke("train", "--model", "tiny-random", "--steps", 5, "--save-every", 2, "--output", run)
    assert result.exit_code == 0, result.output
    assert "saves: 2 files, adapter-step-000002.safetensors to adapter-step-000004.safetensors" in result.output
    step = run / "adapter-step-000002.safetensors"

    # drawn into a folder of its own: the run's samples/ stays the final adapter's
    assert invoke("sample", "--adapter", step, "--prompt", "a <concept>", "--steps", 2, "--num-images", 1).exit_code == 0
    assert invoke("sample", "--adapter", run, "--prompt", "a <concept>", "--steps", 2, "--num-images", 1).exit_code == 0
    assert (run / "samples-step-000002" / "grid.png").is_file() and (run / "samples" / "grid.png").is_file()
    with Image.open(next((run / "samples-step-000002" / "images").glob("*.png"))) as image:
        assert "castle/adapter-step-000002.safetensors" in image.text["parameters"]

    # measured into eval-step-N.json: the run's eval.json is the final adapter's
    result = invoke("evaluate", "--run", step, "--steps", 2, "--num-images", 2, "--prompt", "a <concept>")
    assert result.exit_code == 0, result.output
    report = json.loads((run / "eval-step-000002.json").read_text())
    assert report["adapter"] == step.name and not (run / "eval.json").exists()
    assert (run / "eval-samples-step-000002").is_dir()

    # compared with the run as RUN-step-N, with the losses up to its step, each drawn into a folder of its own
    result = invoke("compare", step, run, "--output", tmp_path / "cmp", "--steps", 2)
    assert result.exit_code == 0, result.output
    rows = (tmp_path / "cmp" / "comparison.csv").read_text().splitlines()
    assert [row.split(",")[0] for row in rows[1:]] == ["castle-step-000002", "castle"]
    assert sorted(p.name for p in (tmp_path / "cmp" / "samples").iterdir()) == ["castle", "castle-step-000002"]
    from sdtune.comparison import summarize_run

    assert [at for at, _ in summarize_run(step).losses] == [1, 2] and len(summarize_run(run).losses) == 5

    exported = tmp_path / "castle-200.safetensors"
    assert invoke("export", step, "--format", "kohya", "--output", exported).exit_code == 0
    with safe_open(str(exported), framework="pt") as handle:
        assert handle.metadata()["ss_steps"] == "2"
