"""`sdtune explain`: GIFT cluster maps, atom tiles, update norms, and its errors."""

from __future__ import annotations

import math

import pytest
import torch
from PIL import Image

from sdtune import methods
from sdtune.adapter import save_adapter
from sdtune.config import ExplainConfig
from sdtune.errors import SdtuneError
from sdtune.explain import GRID_PAD, HEADER, cluster_maps, explain, gift_cluster_maps, heat_colours, minmax_per_map, token_grid

IMAGE = 64  # the tiny model's native image size: 8x8 latents, VAE factor 8


def make_run(tmp_path, name, options, scale=0.05):
    """A run folder with a perturbed (as if trained) adapter for the tiny model."""
    from sdtune.models import load_pipeline

    method = methods.create(name, **options)
    method.inject(load_pipeline("tiny-random").unet)
    generator = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for parameter in method.trainable_parameters():
            parameter.add_(torch.randn(parameter.shape, generator=generator) * scale)
    run = tmp_path / f"run-{name}"
    save_adapter(run / "adapter.safetensors", method, "tiny-random", placeholder="<castle>", token="sks castle")
    return run, method


def test_minmax_and_heat_colours_literal():
    maps = torch.tensor([[[1.0, 3.0], [5.0, 2.0]], [[-2.0, -2.0], [-2.0, -2.0]]])
    out = minmax_per_map(maps)
    torch.testing.assert_close(out[0], (maps[0] - 1.0) / 4.0)
    torch.testing.assert_close(out[1], torch.zeros(2, 2))  # a constant map has no contrast
    colours = heat_colours(torch.tensor([0.0, 0.5, 1.0]).numpy())
    assert colours.shape == (3, 3)
    assert colours[0].tolist() == [0.0, 0.0, 0.5]  # dark blue
    assert colours[1].tolist() == [0.5, 1.0, 0.5]  # green
    assert colours[2].tolist() == [0.5, 0.0, 0.0]  # dark red


def test_token_grid():
    assert token_grid(64, 8, 8) == (8, 8)
    assert token_grid(16, 64, 64) == (4, 4)
    assert token_grid(8, 4, 8) == (2, 4)
    assert token_grid(77, 8, 8) is None  # text tokens (cross-attention keys) are not an image
    # a latent of another aspect (--width/--height, a prompt line's --w/--h), at every stride-2 level of the UNet
    assert token_grid(96, 12, 8) == (12, 8) and token_grid(24, 12, 8) == (6, 4) and token_grid(6, 12, 8) == (3, 2)
    assert token_grid(70, 13, 20) == (7, 10)  # odd sides round up, as a stride-2 convolution with padding 1 does
    assert token_grid(6, 4, 5) == (2, 3)
    assert token_grid(12, 8, 8) is None and token_grid(12, 2, 6) == (2, 6)


def expected_grid_size(maps: int, cell: int) -> tuple[int, int]:
    columns = math.ceil(math.sqrt(maps))
    rows = math.ceil(maps / columns)
    return columns * cell + (columns + 1) * GRID_PAD, HEADER + rows * cell + (rows + 1) * GRID_PAD


def test_gift_explain_writes_one_grid_per_layer(tmp_path):
    run, method = make_run(tmp_path, "gift", {"clusters": 6})
    result = explain(run, prompt="photo of a <castle>", steps=2)
    assert result.output == run / "explain"
    names = {p.name for p in result.files}
    assert names == {"image.png", "update-norms.png"} | {f"{name}.png" for name in method.target_names}
    assert Image.open(result.image).size == (IMAGE, IMAGE)
    for name in method.target_names:
        grid = Image.open(result.output / f"{name}.png")
        assert grid.size == expected_grid_size(6, IMAGE)  # 2 rows x 3 columns


def test_gift_explain_one_layer_simple_generator(tmp_path):
    run, method = make_run(tmp_path, "gift", {"generator": "simple", "rank": 5})
    layer = method.target_names[3]
    result = explain(run, prompt="a castle", layer=layer, step=1, steps=3, output=tmp_path / "out")
    assert sorted(p.name for p in result.files) == sorted(["image.png", f"{layer}.png", "update-norms.png"])
    # H = identity: the maps are read through ω·φ, one per rank direction
    assert Image.open(tmp_path / "out" / f"{layer}.png").size == expected_grid_size(5, IMAGE)


def test_maps_use_the_conditional_half_at_the_chosen_step(tmp_path):
    """Capture the layer output independently and compare: step K's call, second half of the CFG batch."""
    from sdtune.adapter import load_adapter
    from sdtune.models import load_pipeline

    run, _ = make_run(tmp_path, "gift", {"clusters": 4})
    pipe = load_pipeline("tiny-random")
    method = load_adapter(run, pipe, merge=False)
    # 32 wide, 8x8 tokens; the second block, so the text (through the first block's cross-attention)
    # already makes the two halves differ
    name = method.target_names[1]
    calls = []
    handle = method.layers[name].register_forward_hook(lambda m, a, out: calls.append(out.detach().clone()))
    _, maps, _ = gift_cluster_maps(pipe, method, [name], "a castle", step=2, steps=3, guidance=7.5, seed=0, resolution=None)
    handle.remove()
    # PNDM (the tiny model's and SD v1.4's scheduler) evaluates the UNet once more than the step count;
    # each evaluation holds [unconditional, conditional]
    assert len(calls) == 4 and calls[2].shape[0] == 2
    expected = cluster_maps(calls[2][1], method.layers[name].clusters(), 8, 8)
    torch.testing.assert_close(maps[name], expected)
    assert not torch.allclose(maps[name], cluster_maps(calls[2][0], method.layers[name].clusters(), 8, 8))

    _, mean_maps, timing = gift_cluster_maps(pipe, method, [name], "a castle", None, 3, 7.5, 0, None)
    assert timing == "mean over 4 steps"
    torch.testing.assert_close(
        mean_maps[name], cluster_maps(sum(c[1] for c in calls) / 4, method.layers[name].clusters(), 8, 8)
    )


def test_cluster_maps_of_a_non_square_image_lie_on_its_latent_grid(tmp_path):
    """An image taller than wide (--width 64 --height 96: 12 x 8 latents): each layer's tokens are read on its own
    level's grid of that shape, and the overlays keep the image's aspect."""
    from sdtune.adapter import load_adapter
    from sdtune.models import load_pipeline

    run, _ = make_run(tmp_path, "gift", {"clusters": 4})
    pipe = load_pipeline("tiny-random")
    method = load_adapter(run, pipe, merge=False)
    calls = {}
    handles = [method.layers[name].register_forward_hook(lambda m, a, out, name=name: calls.setdefault(name, out.detach().clone()))
               for name in method.target_names]
    image, maps, _ = gift_cluster_maps(pipe, method, method.target_names, "a castle", step=0, steps=2, guidance=7.5, seed=0,
                                       resolution=None, width=64, height=96)
    for handle in handles:
        handle.remove()
    assert image.size == (64, 96)
    levels = [(12, 8), (6, 4), (3, 2), (2, 1)]  # each side halved, rounded up, by the UNet's stride-2 downsamplings
    assert {tuple(found.shape[1:]) for found in maps.values()} <= set(levels)
    assert {(12, 8), (6, 4)} <= {tuple(found.shape[1:]) for found in maps.values()}
    for name, found in maps.items():
        tokens = calls[name][1]  # step 0's conditional half
        torch.testing.assert_close(found, cluster_maps(tokens, method.layers[name].clusters(), *found.shape[1:]))

    result = explain(run, prompt="a castle", steps=2, width=64, height=96, output=tmp_path / "tall")
    assert Image.open(result.image).size == (64, 96)
    name = method.target_names[0]
    columns = rows = 2  # four clusters
    assert Image.open(result.output / f"{name}.png").size == (
        columns * 64 + (columns + 1) * GRID_PAD, HEADER + rows * 96 + (rows + 1) * GRID_PAD)


def test_atoms_explain_draws_tiles_and_norms(tmp_path):
    from sdtune.explain import update_norms
    from sdtune.models import load_pipeline

    run, method = make_run(tmp_path, "atoms", {}, scale=0.01)
    result = explain(run)
    assert sorted(p.name for p in result.files) == ["atoms.png", "update-norms.png"]
    tiles = Image.open(result.output / "atoms.png")
    layers = len(method.target_names)  # 52 3x3 convs, 9 atoms of 3x3 taps each
    row = 3 * 12  # 12 pixels per tap
    assert tiles.size[1] == HEADER + layers * (row + GRID_PAD) + GRID_PAD
    assert tiles.size[0] > 9 * (row + GRID_PAD)
    norms_png = Image.open(result.output / "update-norms.png")
    assert norms_png.size[1] == HEADER + layers * (12 + GRID_PAD) + GRID_PAD  # one bar per changed conv

    # the norms are ‖W_merged - W_base‖ per conv, for exactly the tuned convs
    base = load_pipeline("tiny-random").unet
    method.merge()
    norms = update_norms(dict(base.named_parameters()), method.unet)
    assert set(norms) == set(method.target_names)
    for name in method.target_names:
        diff = method.unet.get_submodule(name).weight - base.get_submodule(name).weight
        assert norms[name] == pytest.approx(diff.norm().item(), rel=1e-5)


def test_sub_atom_explain_draws_the_sub_atoms(tmp_path):
    """The D1 variant has no ΔD of its own: its tiles are the m·m1 sub-atoms D1 of each layer."""
    run, method = make_run(tmp_path, "atoms", {"m1": 2, "m": 3}, scale=0.01)
    result = explain(run)
    tiles = Image.open(result.output / "atoms.png")
    assert tiles.size[0] > 6 * (3 * 12 + GRID_PAD)
    first = method.target_names[0]
    assert torch.equal(method.update_tiles(first), method.layers[first].sub_atoms.detach().reshape(6, 3, 3))


def test_explain_errors(tmp_path):
    run, method = make_run(tmp_path, "gift", {"clusters": 4})
    with pytest.raises(SdtuneError, match="unknown layer 'down_blocks.0.nothing'"):
        explain(run, prompt="x", layer="down_blocks.0.nothing", steps=1)
    with pytest.raises(SdtuneError, match="a gift run needs prompt: "):
        explain(run)
    with pytest.raises(SdtuneError, match="step must be between 0 and 2; 2 steps take 3 UNet evaluations"):
        explain(run, prompt="x", steps=2, step=3)
    with pytest.raises(SdtuneError, match="step counts denoising steps from 0"):
        explain(run, prompt="x", step=-1)
    (tmp_path / "empty").mkdir()
    with pytest.raises(SdtuneError, match="adapter not found"):
        explain(tmp_path / "empty", prompt="x")
    with pytest.raises(SdtuneError, match=r"unknown setting\(s\): colour"):
        explain(run, prompt="x", colour=3)
    with pytest.raises(SdtuneError, match="not both"):
        explain(ExplainConfig(run=str(run)), prompt="x")


def test_explain_cli(tmp_path):
    from typer.testing import CliRunner

    from sdtune.cli import app

    run, _ = make_run(tmp_path, "atoms", {"m": 2}, scale=0.01)
    runner = CliRunner()
    result = runner.invoke(app, ["explain", str(run), "--output", str(tmp_path / "pictures")])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "pictures" / "atoms.png").is_file() and (tmp_path / "pictures" / "update-norms.png").is_file()
    assert result.stdout == f"wrote 2 pictures to {tmp_path / 'pictures'}\n"
    lora, _ = make_run(tmp_path / "lora", "lora", {}, scale=0.01)  # its update norms alone
    result = runner.invoke(app, ["explain", str(lora), "--output", str(tmp_path / "one")])
    assert result.exit_code == 0, result.output
    assert result.stdout == f"wrote 1 picture to {tmp_path / 'one'}\n"
    bad = runner.invoke(app, ["explain", str(run), "--layer", "nowhere"])
    assert bad.exit_code == 2 and bad.output.startswith("error: unknown layer 'nowhere'")
    # a step file's pictures go to a folder of their own, beside the run's explain/
    import shutil

    shutil.copy(lora / "adapter.safetensors", lora / "adapter-step-000002.safetensors")
    for source, folder in ((lora / "adapter-step-000002.safetensors", "explain-step-000002"), (lora, "explain")):
        result = runner.invoke(app, ["explain", str(source)])
        assert result.exit_code == 0 and result.stdout == f"wrote 1 picture to {lora / folder}\n", result.output
    assert (lora / "explain-step-000002" / "update-norms.png").is_file() and (lora / "explain" / "update-norms.png").is_file()


def test_a_second_explanation_into_a_folder_in_use_is_refused(tmp_path, monkeypatch):
    """`sdtune explain` into a folder another explanation is writing is refused in one line (exit 2) before the model
    loads, the other's pictures untouched; a picture half-written by a killed explanation is swept by the next."""
    import os

    from typer.testing import CliRunner

    import sdtune.models
    from sdtune.cli import app
    from sdtune.fileio import LOCK_FILE, OutputLock, temp_path
    from test_cli import assert_one_line_error

    run, _ = make_run(tmp_path, "atoms", {"m": 2}, scale=0.01)
    output = tmp_path / "pictures"
    output.mkdir()
    (output / "atoms.png").write_bytes(b"the other explanation's")
    with monkeypatch.context() as patched, OutputLock(output):
        patched.setattr(sdtune.models, "load_pipeline", lambda *args, **kwargs: pytest.fail("the model was loaded"))
        result = CliRunner().invoke(app, ["explain", str(run), "--output", str(output)])
    assert_one_line_error(result, 2, f"output folder {output} is in use by another sdtune run (pid {os.getpid()}")
    assert [path.name for path in output.iterdir()] == ["atoms.png"] and (output / "atoms.png").read_bytes() == b"the other explanation's"
    killed = temp_path(output / "update-norms.png")
    killed.write_bytes(b"half a picture")
    os.utime(killed, (0, 0))  # older than the next command's lock
    result = CliRunner().invoke(app, ["explain", str(run), "--output", str(output)])
    assert result.exit_code == 0, result.output
    assert sorted(path.name for path in output.iterdir()) == ["atoms.png", "update-norms.png"]
    assert (output / "atoms.png").read_bytes() != b"the other explanation's" and not (output / LOCK_FILE).exists()

def test_explain_config_checks_its_settings():
    from sdtune.config import ExplainConfig

    assert ExplainConfig.load(None, run="runs/castle-gift").steps == 30
    with pytest.raises(SdtuneError, match="^steps must be at least 1, got 0$"):
        ExplainConfig.load(None, run="runs/castle-gift", steps=0)
    with pytest.raises(SdtuneError, match="^resolution must be a positive multiple of 8, got 12$"):
        ExplainConfig.load(None, run="runs/castle-gift", resolution=12)
    with pytest.raises(SdtuneError, match="^height must be a positive multiple of 8, got 100$"):
        ExplainConfig.load(None, run="runs/castle-gift", height=100)
    with pytest.raises(SdtuneError, match="unknown setting"):
        ExplainConfig.load(None, run="runs/castle-gift", strength=2)


def test_update_norms_cover_the_text_encoders_an_adapter_trained(tmp_path, monkeypatch):
    """An SDXL LoRA on the UNet and both text encoders: the bars are every changed layer's, the encoders' too."""
    import sdtune.explain as explaining
    from sdtune.models import load_pipeline

    pipe = load_pipeline("tiny-sdxl-random")
    method = methods.create("lora")
    method.inject(pipe.unet, [pipe.text_encoder, pipe.text_encoder_2])
    with torch.no_grad():
        for parameter in method.trainable_parameters():
            parameter.add_(torch.randn(parameter.shape, generator=torch.Generator().manual_seed(3)) * 0.05)
    run = tmp_path / "run-xl"
    save_adapter(run / "adapter.safetensors", method, "tiny-sdxl-random", placeholder="<castle>", token="sks castle")
    drawn = {}
    monkeypatch.setattr(explaining, "bar_chart", lambda values, title: drawn.update(values) or Image.new("RGB", (1, 1)))
    explain(run)
    assert set(drawn) == set(method.target_names)
    assert any(name.startswith("text_encoder_2.") for name in drawn) and any(name.startswith("text_encoder.") for name in drawn)


def test_a_run_trained_on_a_base_adapter_is_explained_on_it(tmp_path, monkeypatch):
    """Filter atoms trained on a LoRA merged at 0.7 (named in their config.toml): the LoRA is merged first, with no
    warning that it is missing, and the bars are the atoms' own update on the weights it leaves, as stacking takes it."""
    import warnings

    import sdtune.explain as explaining
    from sdtune.adapter import load_adapters
    from sdtune.config import TrainConfig
    from sdtune.explain import update_norms
    from sdtune.models import load_pipeline
    from sdtune.training import train

    def trained(name, **changes):
        config = TrainConfig(output=str(tmp_path / name), concept="castle", model="tiny-random", log_with="none", seed=3,
                             **{"steps": 2, "lr": 1e-2, **changes})
        return train(config, progress=False).output

    lora = trained("lora", method="lora", options={"rank": 2}, steps=4, lr=5e-2)  # a change the atoms' norms show
    run = trained("atoms", method="atoms", base_adapters=[f"{lora}:0.7"])
    drawn = {}
    monkeypatch.setattr(explaining, "bar_chart", lambda values, title: drawn.update(values) or Image.new("RGB", (1, 1)))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        explain(run)
    beneath, stacked = load_pipeline("tiny-random"), load_pipeline("tiny-random")
    load_adapters([str(lora)], beneath, [0.7])
    load_adapters([str(lora), str(run)], stacked, [0.7, 1.0])
    expected = update_norms(dict(beneath.unet.named_parameters()), stacked.unet)
    assert drawn.keys() == expected.keys()
    assert all(drawn[name] == pytest.approx(expected[name], rel=1e-5, abs=1e-7) for name in expected)
    alone = load_pipeline("tiny-random")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # without its base adapter
        load_adapters([str(run)], alone)
    plain = update_norms(dict(load_pipeline("tiny-random").unet.named_parameters()), alone.unet)
    assert max(abs(plain[name] - expected[name]) / expected[name] for name in expected) > 1e-3  # the LoRA changes them
