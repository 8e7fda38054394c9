"""One contract for every method and variant, on the tiny model.

Zero update at init, the loss decreases, save → load into a fresh base reproduces the outputs,
merging reproduces them, the parameter count matches an independent formula, and an adapter
refuses a base model whose layers differ.
"""

from __future__ import annotations

import pytest
import torch

from sdtune import methods
from sdtune.adapter import load_adapter, save_adapter
from sdtune.errors import SdtuneError
from sdtune.methods.base import named_convs

# (method name, options, learning rate for the loss check)
CASES = [
    ("atoms", {}, 1e-2),
    ("atoms", {"m": 4}, 1e-2),
    ("atoms", {"include_1x1": True}, 1e-2),
    ("atoms", {"m1": 2}, 1e-2),
    ("atoms", {"kc": 2}, 1e-2),
    ("atoms", {"m1": 2, "kc": 2}, 1e-2),
    ("atoms", {"init": "sparse", "m": 4}, 1e-2),
    ("atoms", {"linear": True}, 1e-2),
]
IDS = [f"{name}-{'-'.join(f'{k}={v}' for k, v in opts.items()) or 'default'}" for name, opts, _ in CASES]


def expected_count(name: str, options: dict, unet) -> int:
    """The trainable-parameter formula of each method, computed from the UNet's layer shapes."""
    if name == "atoms":
        m, m1, kc = options.get("m", 9), options.get("m1", 0), options.get("kc", 1)
        include_1x1 = options.get("include_1x1")
        sizes = {3, 1} if include_1x1 or (include_1x1 is None and kc > 1) else {3}
        total = 0
        for _, conv in named_convs(unet, sizes):
            k, c_in, c_out = conv.kernel_size[0], conv.in_channels, conv.out_channels
            atoms = min(m, k * k)
            b = kc if c_in % kc == 0 and c_out % kc == 0 else 1
            if m1 == 0:
                total += atoms * b * b * (k * b) ** 2  # ΔD: m'·b² atoms of (k·b)²
            else:
                total += c_in * atoms * m1 + atoms * m1 * k * k  # β and D1
                total += (b * b * atoms) ** 2 if kc > 1 else 0  # Dc
        if options.get("linear"):
            lk = options.get("linear_kc", 4)
            for module_name, module in unet.named_modules():
                if isinstance(module, torch.nn.Linear) and module_name.rsplit(".", 1)[-1] in {"to_q", "to_k", "to_v"} | (
                    {"0"} if module_name.endswith("to_out.0") else set()
                ):
                    b = lk if module.in_features % lk == 0 and module.out_features % lk == 0 else 1
                    total += min(m, b * b) * b * b
        return total
    raise AssertionError(f"no formula for {name}")


def run_unet(unet, inputs):
    with torch.no_grad():
        return unet(*inputs).sample


def perturb(method, scale=0.05):
    """Give every trainable parameter a non-zero value, as training would."""
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for parameter in method.trainable_parameters():
            parameter.add_(torch.randn(parameter.shape, generator=generator) * scale)


@pytest.mark.parametrize("name,options,lr", CASES, ids=IDS)
def test_zero_update_at_init(name, options, lr, tiny_pipe, unet_inputs):
    base = run_unet(tiny_pipe.unet, unet_inputs)
    method = methods.create(name, **options)
    method.inject(tiny_pipe.unet)
    torch.testing.assert_close(run_unet(tiny_pipe.unet, unet_inputs), base, rtol=0, atol=1e-6)


@pytest.mark.parametrize("name,options,lr", CASES, ids=IDS)
def test_training_lowers_the_loss(name, options, lr, tiny_pipe, unet_inputs):
    unet = tiny_pipe.unet
    method = methods.create(name, **options)
    optimizer = torch.optim.AdamW(method.inject(unet), lr=lr)
    target = torch.randn(unet_inputs[0].shape, generator=torch.Generator().manual_seed(3))

    def loss():
        return torch.nn.functional.mse_loss(unet(*unet_inputs).sample, target)

    with torch.no_grad():
        before = loss().item()
    for _ in range(15):
        optimizer.zero_grad()
        loss().backward()
        optimizer.step()
    with torch.no_grad():
        after = loss().item()
    assert after < before * 0.98, (before, after)
    assert all(p.grad is None or p.requires_grad for p in method.trainable_parameters())
    frozen = [n for n, p in unet.named_parameters() if p.requires_grad and all(p is not q for q in method.trainable_parameters())]
    assert not frozen, f"parameters outside the method are trainable: {frozen[:3]}"


@pytest.mark.parametrize("name,options,lr", CASES, ids=IDS)
def test_save_load_and_merge_reproduce_outputs(name, options, lr, tiny_pipe, unet_inputs, tmp_path):
    from sdtune.models import load_pipeline

    method = methods.create(name, **options)
    method.inject(tiny_pipe.unet)
    perturb(method)
    tuned = run_unet(tiny_pipe.unet, unet_inputs)
    base = run_unet(load_pipeline("tiny").unet, unet_inputs)
    assert (tuned - base).abs().max() > 1e-4, "the perturbed update should change the outputs"

    path = save_adapter(tmp_path / "adapter.safetensors", method, "tiny", placeholder="<castle>", token="sks castle")
    unmerged = load_adapter(path, load_pipeline("tiny"), merge=False)
    fresh = load_pipeline("tiny")
    load_adapter(path, fresh, merge=False)
    torch.testing.assert_close(run_unet(fresh.unet, unet_inputs), tuned, rtol=0, atol=1e-5)

    merged_pipe = load_pipeline("tiny")
    load_adapter(path, merged_pipe, merge=True)
    torch.testing.assert_close(run_unet(merged_pipe.unet, unet_inputs), tuned, rtol=0, atol=1e-5)
    assert unmerged.num_parameters() == method.num_parameters()

    # merging in place: the UNet keeps only plain diffusers modules and the same outputs
    method.merge()
    torch.testing.assert_close(run_unet(tiny_pipe.unet, unet_inputs), tuned, rtol=0, atol=1e-5)
    assert all(type(m).__module__.startswith(("torch.", "diffusers.")) for m in tiny_pipe.unet.modules())


@pytest.mark.parametrize("name,options,lr", CASES, ids=IDS)
def test_parameter_count_matches_formula(name, options, lr, tiny_pipe):
    from sdtune.models import load_pipeline

    method = methods.create(name, **options)
    method.inject(tiny_pipe.unet)
    assert method.num_parameters() == expected_count(name, options, load_pipeline("tiny").unet)


@pytest.mark.parametrize("name,options,lr", CASES, ids=IDS)
def test_adapter_refuses_another_base_model(name, options, lr, tiny_pipe, tmp_path):
    from sdtune.models import build_tiny_pipeline

    method = methods.create(name, **options)
    method.inject(tiny_pipe.unet)
    path = save_adapter(tmp_path / "adapter.safetensors", method, "tiny")
    other = build_tiny_pipeline(seed=99)  # same shapes, other weights
    with pytest.raises(SdtuneError, match="was trained on base model 'tiny'"):
        load_adapter(path, other)


SD14_COUNTS = [
    ("atoms", {}, 4_212),
    # D1, m1 = 4: Σ over the 52 3×3 convs of c_in·9·4 (Σ c_in = 55,684) + 52·9·4·9
    ("atoms", {"m1": 4}, 2_021_472),
    # kc = 2: 52 3×3 convs × 9·4 atoms of 6×6, + 46 1×1 convs × 4 atoms of 2×2
    ("atoms", {"kc": 2}, 68_128),
    # D1+Dc, m1 = 4, kc = 2: the D1 count + 52·36² (Dc) + 1×1 convs: 4·Σ c_in (47,040) + 46·(4 + 16)
    ("atoms", {"m1": 4, "kc": 2}, 2_277_944),
    # linear: + 128 attention projections × 9 atoms of 4×4
    ("atoms", {"linear": True}, 22_644),
]


@pytest.mark.parametrize("name,options,count", SD14_COUNTS)
def test_sd14_parameter_counts(name, options, count):
    from sdtune.models import build_sd14_unet

    method = methods.create(name, **options)
    method.inject(build_sd14_unet("meta"))
    assert method.num_parameters() == count
