"""benchmarks/targets.py reads the tables loop.py, speed.py and atom_kernels.py write and says which targets hold."""

import importlib.util
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def script(name: str):
    spec = importlib.util.spec_from_file_location(f"benchmark_{name}", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def scripts():
    return script("loop"), script("speed"), script("targets")


def training_row(method, batch, whole_bare):
    return {"method": method, "batch": batch, "whole": 0.2 * whole_bare, "bare": 0.2, "floor": 0.15,
            "whole_bare": whole_bare, "whole_floor": 1.3, "bare_floor": 1.3}


def speed_row(row, seconds, peak_gb):
    return {"row": row, "trainable": 4212, "seconds": seconds, "peak_gb": peak_gb}


def write_run(folder: Path, scripts, lora_b4=1.04, atoms_b4_seconds=0.100, sdtune_image=0.09, check="PASS"):
    loop, speed, _ = scripts
    lines = ["**sd14, 64x64 latents (512 px), NVIDIA H200, torch 2.13, mixed precision bf16**", ""]
    lines += loop.training_table([training_row("atoms", 1, 1.03), training_row("atoms", 4, 1.02),
                                  training_row("lora", 1, 1.06), training_row("lora", 4, lora_b4)], interleaved=False)
    lines += ["", "**sd14, 64x64 latents (512 px), NVIDIA H200, torch 2.13, mixed precision no**", ""]
    lines += loop.sampling_table([{"kind": "sdtune", "startup": 9.0, "draw": sdtune_image * 16, "images": 16, "dtype": "fp16"},
                                  {"kind": "diffusers", "startup": 7.5, "draw": 0.1 * 16, "images": 16, "dtype": "fp16"}])
    (folder / "loop.md").write_text("\n".join(lines) + "\n")
    tables = []
    for batch, atoms_seconds in ((1, 0.080), (4, atoms_b4_seconds)):
        tables += [f"**sd14 UNet, 64x64 latents, batch {batch}, bf16, NVIDIA H200, median of 10 steps after 3**", ""]
        tables += speed.training_table([speed_row("floor", 0.075 * batch ** 0.3, 2.69), speed_row("atoms", atoms_seconds, 2.70),
                                        speed_row("lora", 0.117 * batch ** 0.1, 2.79)])
        tables.append("")
    (folder / "speed.md").write_text("\n".join(tables))
    (folder / "kernels.md").write_text(f"== atom_kernels.py --check --dtype bf16 --batch 2 (400 s left)\n| a |\n| --- |\n"
                                       f"check: {check}\n== atom_kernels.py --check --dtype bf16 --batch 2 --per-channel\ncheck: PASS\n")


def verdicts(text: str) -> dict:
    text = text.split("\n\nFilter atoms' routes")[0]  # the verdicts' table alone
    rows = [line.split(" | ") for line in text.splitlines() if line.startswith("| ") and "---" not in line][1:]
    return {row[0].lstrip("| "): row[3].rstrip(" |") for row in rows}


def test_every_target_read_and_judged(tmp_path, scripts):
    targets = scripts[2]
    write_run(tmp_path, scripts)
    judged = verdicts(targets.report(tmp_path))
    assert judged["whole train step ×bare, lora, batch 1, bf16"] == "met"  # 1.06 ≤ 1.10 on a GPU
    assert set(judged.values()) == {"met"}, judged
    assert len(judged) == 13
    assert verdicts(targets.report(tmp_path, cpu=True))["whole train step ×bare, lora, batch 1, bf16"] == "NOT MET"


def test_targets_missed_are_said(tmp_path, scripts):
    targets = scripts[2]
    write_run(tmp_path, scripts, lora_b4=1.12, atoms_b4_seconds=0.150, sdtune_image=0.11, check="FAIL: 320->320 x 3e-2")
    judged = verdicts(targets.report(tmp_path))
    missed = {name for name, verdict in judged.items() if verdict != "met"}
    assert missed == {
        "whole train step ×bare, lora, batch 4, bf16",
        "sampling time per image ×plain diffusers, fp16",
        "filter atoms' step ×floor, batch 4, bf16",
        "filter atoms' step ×peft LoRA r4, batch 4, bf16",
        "the Triton kernel's bf16 gradients against float64",
    }, judged


def test_a_run_cut_short_is_not_measured(tmp_path, scripts):
    loop, _, targets = scripts
    (tmp_path / "loop.md").write_text("\n".join(["**sd14, mixed precision bf16**", ""] + loop.training_table(
        [{"method": "atoms", "batch": 1, "error": "OutOfMemoryError: CUDA out of memory"}], interleaved=False)))
    text = targets.report(tmp_path)
    judged = verdicts(text)
    assert set(judged.values()) == {"NOT MEASURED"}, judged
    assert "failed: OutOfMemoryError" in text
    assert "0 of 12 targets met; 0 not met, 12 not measured" in text


def test_every_atom_route_of_every_bf16_table_is_held_to_the_limits(tmp_path, scripts):
    """Which route CUDA's default could take: each `atoms[route]` row of each bf16 step table, compiled ones included,
    against ×floor ≤ 1.10, ×LoRA ≤ 0.85 and peak ×floor ≤ 1.02; the variants' rows are left out."""
    _, speed, targets = scripts
    write_run(tmp_path, scripts)
    tables = (tmp_path / "speed.md").read_text().splitlines()
    for title, fold_seconds in (("batch 1, bf16, NVIDIA H200, median of 10 steps after 3, compiled (reduce-overhead)", 0.070),
                                ("batch 4, bf16, NVIDIA H200, median of 10 steps after 3, channels-last", 0.200)):
        tables += ["", f"**sd14 UNet, 64x64 latents, {title}**", ""]
        tables += speed.training_table([
            speed_row("floor", 0.075, 2.69), speed_row("atoms[tap-triton-fold]", fold_seconds, 2.70),
            speed_row("atoms{m1=4}", 0.070, 2.70), speed_row("lora", 0.117, 2.79)])
    (tmp_path / "speed.md").write_text("\n".join(tables) + "\n")
    text = targets.report(tmp_path)
    routes = [line.strip("|").split(" | ") for line in text.split("Filter atoms' routes")[1].splitlines()
              if line.startswith("| ") and "---" not in line][1:]
    found = {(row[0].strip(), row[1]): row[-1].strip() for row in routes}
    assert found == {
        ("batch 1", "atoms"): "yes",  # 0.080 s against the floor's 0.075 and LoRA's 0.117
        ("batch 4", "atoms"): "yes",
        ("batch 1, compiled (reduce-overhead)", "atoms[tap-triton-fold]"): "yes",
        ("batch 4, channels-last", "atoms[tap-triton-fold]"): "no",  # 2.67x the floor
    }, found
    assert len(verdicts(text)) == 13  # the verdicts are the same
