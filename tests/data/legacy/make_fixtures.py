"""Write the legacy adapter fixtures and what they must reproduce (run once, with the sdtune that wrote them).

    python tests/data/legacy/make_fixtures.py

Each adapter is the tiny-random model's method with every trainable tensor perturbed (seed 7).
`expected.json` records, per adapter, the merged UNet's outputs on fixed inputs and a summary of its
kohya export (per tensor: shape, sum, absolute sum), which later versions must reproduce.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import torch

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE.parents[2]))

# (file stem, method, options): one of every update kind, kept small
FIXTURES = [
    ("atoms", "atoms", {}),
    ("atoms-m1-kc", "atoms", {"m1": 2, "kc": 2, "m": 4}),
    ("atoms-linear", "atoms", {"linear": True, "m": 4}),
    ("bitfit", "bitfit", {"targets": "attn"}),
    ("difffit", "difffit", {"resnet_gamma": True}),
    ("gift", "gift", {"clusters": 8}),
    ("gift-simple", "gift", {"generator": "simple"}),
    ("lora", "lora", {"targets": "attn", "rank": 1, "alpha": 2.0}),
    ("loha", "loha", {"targets": "attn", "rank": 1}),
    ("lokr", "lokr", {"targets": "attn", "factor": 16, "decompose_both": True}),
    ("oft", "oft", {"targets": "attn", "block_size": 8}),
]


def fixed_inputs():
    generator = torch.Generator().manual_seed(5)
    latents = torch.randn(1, 4, 16, 16, generator=generator)
    embeddings = torch.randn(1, 77, 32, generator=generator)
    return latents, torch.tensor([500]), embeddings


def merged_outputs(path: Path) -> torch.Tensor:
    from sdtune.adapter import load_adapter
    from sdtune.models import load_pipeline

    pipe = load_pipeline("tiny-random")
    load_adapter(path, pipe)
    with torch.no_grad():
        return pipe.unet(*fixed_inputs()).sample


def export_summary(path: Path) -> dict:
    from safetensors.torch import load_file

    from sdtune.export import export_adapter

    with tempfile.TemporaryDirectory() as folder:
        output = Path(folder) / "kohya.safetensors"
        export_adapter(path, "kohya", output)
        tensors = load_file(output)
    return {
        key: [list(t.shape), float(t.double().sum()), float(t.double().abs().sum())] for key, t in sorted(tensors.items())
    }


def main() -> None:
    from sdtune import methods
    from sdtune.adapter import save_adapter
    from sdtune.models import load_pipeline

    expected = {}
    for stem, name, options in FIXTURES:
        pipe = load_pipeline("tiny-random")
        method = methods.create(name, **options)
        method.inject(pipe.unet)
        generator = torch.Generator().manual_seed(7)
        with torch.no_grad():
            for parameter in method.trainable_parameters():
                parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.05)
        path = HERE / f"{stem}.safetensors"
        save_adapter(path, method, "tiny-random", placeholder="<castle>", token="sks castle")
        expected[stem] = {
            "outputs": merged_outputs(path).flatten()[::16].tolist(),
            "kohya": export_summary(path),
        }
    (HERE / "expected.json").write_text(json.dumps(expected, indent=1) + "\n")


if __name__ == "__main__":
    main()
