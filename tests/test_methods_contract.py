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
from helpers import run_unet

# (method name, options, learning rate for the loss check)
CASES = [
    ("atoms", {}, 1e-2),
    ("atoms", {"m": 4}, 1e-2),
    ("atoms", {"include_1x1": True}, 1e-2),
    ("bitfit", {}, 1e-2),
    ("bitfit", {"targets": "attn,ff"}, 1e-2),
    ("difffit", {}, 1e-2),
    ("difffit", {"resnet_gamma": True}, 1e-2),
    ("full", {}, 1e-3),
    ("gift", {}, 3e-2),  # at 1e-2 the loss falls by only 1-7 % in 15 steps on the random tiny model
    ("gift", {"generator": "simple"}, 3e-2),  # Δω scales with ω·φ, small on the tiny model: needs a larger step
    ("gift", {"targets": "attn1.to_out.0,attn2.to_out.0", "blocks": 2, "clusters": 8}, 1e-2),
    ("lora", {}, 1e-3),
    ("lora", {"targets": "conv", "rank": 2, "alpha": 1.0}, 1e-3),
    ("lora", {"targets": "transformer"}, 1e-3),  # kohya-ss' LoRA layers: proj_in/out and ff too
    ("loha", {"targets": "locon"}, 1e-2),  # kohya-ss' LoCon layers: the resnets' and resamplers' too
    ("lokr", {"targets": "full"}, 1e-2),  # LyCORIS' full preset: conv_in, conv_out and the time embedding too
    ("oft", {"targets": "full"}, 1e-2),
    ("lora", {"dora": True}, 1e-3),
    ("lora", {"targets": "conv", "rank": 2, "alpha": 1.0, "dora": True}, 1e-3),
    ("loha", {}, 1e-2),
    ("loha", {"targets": "conv", "tucker": True}, 1e-2),
    ("lokr", {}, 1e-2),
    ("lokr", {"targets": "attn", "factor": 16, "decompose_both": True}, 1e-2),
    ("lokr", {"targets": "conv", "rank": 2, "tucker": True}, 1e-2),
    ("lora", {"dropout": 0.2}, 1e-3),  # dropout acts in training only: every check here runs the UNet in eval mode
    ("lora", {"rank_dropout": 0.2, "module_dropout": 0.2}, 1e-3),
    ("loha", {"rank_dropout": 0.2, "module_dropout": 0.2}, 1e-2),
    ("lokr", {"rank_dropout": 0.2, "module_dropout": 0.2}, 1e-2),
    # LoCon's own rank and alpha on the 3x3 convs (kohya-ss' conv_dim, conv_alpha); 1x1 convs keep --rank
    ("lora", {"targets": "locon", "rank": 8, "alpha": 4.0, "conv_rank": 2, "conv_alpha": 1.0}, 1e-3),
    ("loha", {"targets": "all", "rank": 2, "conv_rank": 4, "conv_alpha": 2.0}, 1e-2),
    ("lokr", {"targets": "full", "rank": 2, "alpha": 1.0, "conv_rank": 8}, 1e-2),
    ("atoms", {"kernel": "weight"}, 1e-2),  # the tiny model's feature maps are small: auto takes the tap side
    ("atoms", {"m1": 2}, 1e-2),
    ("atoms", {"kc": 2}, 1e-2),
    ("atoms", {"m1": 2, "kc": 2}, 1e-2),
    ("atoms", {"init": "sparse", "m": 4}, 1e-2),
    ("atoms", {"linear": True}, 1e-2),
    ("oft", {}, 1e-2),  # the convolutions; conv_in (D = 4·3·3 = 36) takes b = 36
    ("oft", {"targets": "all", "block_share": True}, 1e-2),
    ("oft", {"targets": "attn", "block_size": 16, "cayley_neumann": True}, 1e-2),
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
    if name == "bitfit":
        wanted = [t for t in options.get("targets", "").split(",") if t]
        return sum(
            p.numel()
            for n, p in unet.named_parameters()
            if n.endswith(".bias") and (not wanted or any(t in n.rpartition(".")[0] for t in wanted))
        )
    if name == "difffit":
        from diffusers.models.attention import BasicTransformerBlock
        from diffusers.models.resnet import ResnetBlock2D

        biases = sum(p.numel() for n, p in unet.named_parameters() if n.endswith(".bias"))
        norm_weights = sum(m.weight.numel() for m in unet.modules() if isinstance(m, (torch.nn.GroupNorm, torch.nn.LayerNorm)))
        gammas = 0
        for block in unet.modules():
            if isinstance(block, BasicTransformerBlock):
                width = block.norm1.normalized_shape[0]
                gammas += 3 * width  # attn1, attn2 and ff branches
                for attention in (block.attn1, block.attn2):  # q, k, v and out projections
                    gammas += sum(lin.out_features for lin in (attention.to_q, attention.to_k, attention.to_v, attention.to_out[0]))
            if isinstance(block, ResnetBlock2D) and options.get("resnet_gamma"):
                gammas += block.conv2.out_channels
        return biases + norm_weights + gammas
    if name == "full":
        return sum(p.numel() for p in unet.parameters())
    if name == "gift":
        r, clusters, blocks = options.get("rank", 16), options.get("clusters", 64), options.get("blocks", 1)
        suffixes = options.get("targets", "attn1.to_out.0").split(",")
        widths = {
            module.in_features
            for module_name, module in unet.named_modules()
            if isinstance(module, torch.nn.Linear)
            and ".transformer_blocks." in module_name
            and any(module_name.endswith("." + s) for s in suffixes)
        }
        # per PaCa block: assignment r->M with bias, q/k/v/out r->r with bias, FFN r->2r->r with biases
        block = (r * clusters + clusters) + 4 * (r * r + r) + (r * 2 * r + 2 * r) + (2 * r * r + r)
        hyper = blocks * block if options.get("generator", "paca") == "paca" else 0
        return sum(2 * d * r + hyper for d in widths)  # one (φ, H, ψ) per input width
    if name in ("lora", "loha", "lokr"):
        return sum(low_rank_count(name, options, layer) for layer in low_rank_targets(options.get("targets", "all"), unet))
    if name == "oft":
        return sum(oft_count(options, layer) for layer in low_rank_targets(options.get("targets", "conv"), unet))
    raise AssertionError(f"no formula for {name}")


def low_rank_targets(targets: str, unet) -> list:
    """conv: the 3x3 and 1x1 convolutions (conv3x3: only the 3x3); attn: to_q, to_k, to_v, to_out.0; transformer:
    every Linear and Conv2d under a down/mid/up block's `attentions`; locon: those and every one under its `resnets`,
    `downsamplers` and `upsamplers` (kohya-ss' LoRA and LoCon: all but conv_in, conv_out and the time embedding);
    full (LyCORIS' preset): every Linear and Conv2d of the UNet."""
    def under(*parts: str) -> list:
        return [module for name, module in unet.named_modules()
                if type(module) in (torch.nn.Linear, torch.nn.Conv2d) and any(f".{part}." in name for part in parts)]

    if targets == "full":
        return [module for module in unet.modules() if type(module) in (torch.nn.Linear, torch.nn.Conv2d)]
    if targets in ("transformer", "locon"):
        return under("attentions") if targets == "transformer" else under("attentions", "resnets", "downsamplers", "upsamplers")
    convs = [conv for _, conv in named_convs(unet, {3, 1})]
    convs3 = [conv for _, conv in named_convs(unet, {3})]
    projections = [
        module for name, module in unet.named_modules()
        if type(module) is torch.nn.Linear and (name.rsplit(".", 1)[-1] in ("to_q", "to_k", "to_v") or name.endswith(".to_out.0"))
    ]
    return {"conv": convs, "conv3x3": convs3, "attn": projections, "all": convs + projections}[targets]


def kronecker_split(dim: int, factor: int) -> tuple[int, int]:
    """LyCORIS' split of a channel count into (m, n), m*n = dim: m = factor when it divides dim,
    else the largest divisor m <= sqrt(dim) that is at most factor (any, for factor -1)."""
    if factor > 0 and dim % factor == 0:
        return factor, dim // factor
    limit = dim if factor == -1 else factor
    m = max(d for d in range(1, int(dim**0.5) + 1) if dim % d == 0 and d <= limit)
    return m, dim // m


def low_rank_count(name: str, options: dict, layer) -> int:
    """Trainable numbers for one layer, from its shape: out x in (x k x k)."""
    tucker = options.get("tucker", False)
    is_conv = isinstance(layer, torch.nn.Conv2d)
    d_out, d_in = layer.weight.shape[:2]
    k = layer.kernel_size[0] if is_conv else 1
    r = options.get("rank", 4)
    if k > 1:  # a 3x3 conv: conv_rank (default: the rank), as kohya-ss' conv_dim; a 1x1 one is a linear to kohya-ss
        r = options.get("conv_rank", r)
    if name == "lora":  # A: d_in*k*k -> r, B: r -> d_out; DoRA: a magnitude per output channel
        return r * (d_in * k * k + d_out) + (d_out if options.get("dora") else 0)
    if name == "loha":  # two low-rank pairs, each with an r x r x k x k core under tucker
        if tucker and k > 1:
            return 2 * (r * r * k * k + r * d_out + r * d_in)
        return 2 * r * (d_in * k * k + d_out)
    # lokr: ΔW = W1 (a x c) ⊗ W2 (b x d [x k x k]), a*b = d_out, c*d = d_in
    a, b = kronecker_split(d_out, options.get("factor", -1))
    c, d = kronecker_split(d_in, options.get("factor", -1))
    w1 = r * (a + c) if options.get("decompose_both", False) and r < max(a, c) / 2 else a * c
    if r >= max(b, d) / 2:  # small enough to keep W2 full
        w2 = b * d * k * k
    elif tucker and k > 1:
        w2 = r * r * k * k + r * b + r * d
    else:
        w2 = b * r + r * d * k * k
    return w1 + w2


def oft_count(options: dict, layer) -> int:
    """OFT on one layer: D/b rotation blocks (one with block_share) of b(b−1)/2 numbers each, D = the weight's
    input side (c_in·k·k), b the divisor of D nearest the block size (the smaller on a tie), as peft picks it."""
    dim = layer.weight[0].numel()
    wanted = options.get("block_size", 32)
    b = min((d for d in range(1, dim + 1) if dim % d == 0), key=lambda d: (abs(d - wanted), d))
    return (1 if options.get("block_share") else dim // b) * b * (b - 1) // 2


@pytest.fixture(scope="module")
def base_unet(tiny_path):
    """The base model's UNet, loaded once for the module: tests only run it and read its layout, never change it."""
    from sdtune.models import load_pipeline

    return load_pipeline("tiny-random").unet


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
    torch.manual_seed(0)  # methods initialise from the global RNG: the outcome must not depend on test order
    unet = tiny_pipe.unet
    method = methods.create(name, **options)
    optimizer = torch.optim.AdamW(method.inject(unet), lr=lr)
    target = torch.randn(unet_inputs[0].shape, generator=torch.Generator().manual_seed(3))

    def loss():
        return torch.nn.functional.mse_loss(unet(*unet_inputs).sample, target)

    with torch.no_grad():
        before = loss().item()
    for _ in range(10):  # every case is below 0.97x by step 10; the slowest-learning ones need about 8
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
def test_save_load_and_merge_reproduce_outputs(name, options, lr, tiny_pipe, base_unet, unet_inputs, tmp_path):
    from sdtune.models import load_pipeline

    # 16x16 latents: at 8x8 the tiny UNet's last down block runs at 1x1, where each GroupNorm
    # normalises 2 numbers and amplifies float32 rounding ~1000x; a merged W + ΔW rounds
    # differently from W·x + ΔW·x (up to 1e-2 apart at 8x8, ~2e-6 at 16x16).
    latents = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(5))
    unet_inputs = (latents, *unet_inputs[1:])
    method = methods.create(name, **options)
    method.inject(tiny_pipe.unet)
    perturb(method)
    tuned = run_unet(tiny_pipe.unet, unet_inputs)
    base = run_unet(base_unet, unet_inputs)
    assert (tuned - base).abs().max() > 1e-4, "the perturbed update should change the outputs"

    path = save_adapter(tmp_path / "adapter.safetensors", method, "tiny-random", placeholder="<castle>", token="sks castle")
    fresh = load_pipeline("tiny-random")
    unmerged = load_adapter(path, fresh, merge=False)
    torch.testing.assert_close(run_unet(fresh.unet, unet_inputs), tuned, rtol=0, atol=1e-5)

    merged_pipe = load_pipeline("tiny-random")
    load_adapter(path, merged_pipe, merge=True)
    torch.testing.assert_close(run_unet(merged_pipe.unet, unet_inputs), tuned, rtol=0, atol=1e-5)
    assert unmerged.num_parameters() == method.num_parameters()
    # strength 0 leaves every weight the base's: the method's merge touches only its targets
    unscaled = load_pipeline("tiny-random")
    load_adapter(path, unscaled, scale=0.0)
    torch.testing.assert_close(run_unet(unscaled.unet, unet_inputs), base, rtol=0, atol=0)

    # merging in place: the UNet keeps only plain diffusers modules and the same outputs
    method.merge()
    torch.testing.assert_close(run_unet(tiny_pipe.unet, unet_inputs), tuned, rtol=0, atol=1e-5)
    assert all(type(m).__module__.startswith(("torch.", "diffusers.")) for m in tiny_pipe.unet.modules())
    # ... the base's very modules, parameters and buffers, and no hooks: merged sampling costs what the base costs
    reference = base_unet
    for merged_unet in (tiny_pipe.unet, merged_pipe.unet):
        assert [(n, type(m)) for n, m in merged_unet.named_modules()] == [(n, type(m)) for n, m in reference.named_modules()]
        assert [(n, p.shape) for n, p in merged_unet.named_parameters()] == [(n, p.shape) for n, p in reference.named_parameters()]
        assert [n for n, _ in merged_unet.named_buffers()] == [n for n, _ in reference.named_buffers()]
        assert not any(m._forward_hooks or m._forward_pre_hooks or getattr(m, "parametrizations", None) for m in merged_unet.modules())


@pytest.mark.parametrize("name,halved", [("atoms", "delta_atoms"), ("lora", "lora_B")])
def test_adapter_scale_scales_the_update(name, halved, tiny_pipe, unet_inputs, tmp_path):
    """ΔW is linear in atoms' ΔD and in LoRA's B: halving them is the adapter at scale 0.5."""
    from sdtune.models import load_pipeline

    latents = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(5))
    unet_inputs = (latents, *unet_inputs[1:])
    method = methods.create(name)
    method.inject(tiny_pipe.unet)
    perturb(method)
    full = save_adapter(tmp_path / "full.safetensors", method, "tiny-random", placeholder="<castle>", token="sks castle")
    state = method.state_dict()
    assert any(halved in key for key in state)
    method.load_state_dict({key: value * 0.5 if halved in key else value for key, value in state.items()})
    half = save_adapter(tmp_path / "half.safetensors", method, "tiny-random", placeholder="<castle>", token="sks castle")

    scaled, reference = load_pipeline("tiny-random"), load_pipeline("tiny-random")
    load_adapter(full, scaled, scale=0.5)
    load_adapter(half, reference)
    torch.testing.assert_close(run_unet(scaled.unet, unet_inputs), run_unet(reference.unet, unet_inputs), rtol=0, atol=1e-5)
    unmerged = load_pipeline("tiny-random")
    load_adapter(full, unmerged, merge=False, scale=0.5)  # the layers compute the half-strength update
    torch.testing.assert_close(run_unet(unmerged.unet, unet_inputs), run_unet(reference.unet, unet_inputs), rtol=0, atol=1e-5)


@pytest.mark.parametrize("name,options,lr", CASES, ids=IDS)
def test_merging_at_strength_zero_unloads_to_the_exact_base(name, options, lr, tiny_pipe):
    """set_scale(0) and a one-way merge leave the plain UNet with its base weights bit for bit: peft's unload()."""
    base = {key: value.clone() for key, value in tiny_pipe.unet.state_dict().items()}
    method = methods.create(name, **options)
    method.inject(tiny_pipe.unet)
    perturb(method)
    method.set_scale(0.0)
    method.merge(keep_base=False)
    after = tiny_pipe.unet.state_dict()
    assert after.keys() == base.keys() and all(torch.equal(after[key], value) for key, value in base.items())


@pytest.mark.parametrize("name,options,lr", CASES, ids=IDS)
def test_strength_merge_and_unmerge(name, options, lr, tiny_pipe, base_unet, unet_inputs):
    """set_scale acts alike merged and unmerged, and unmerge gives back the exact base weights and layers."""
    latents = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(5))
    unet_inputs = (latents, *unet_inputs[1:])
    base = run_unet(base_unet, unet_inputs)
    method = methods.create(name, **options)
    method.inject(tiny_pipe.unet)
    perturb(method)
    state = {key: value.clone() for key, value in method.state_dict().items()}
    unet_state = {key: value.clone() for key, value in tiny_pipe.unet.state_dict().items()}
    tuned = run_unet(tiny_pipe.unet, unet_inputs)

    method.set_scale(0.5)
    half = run_unet(tiny_pipe.unet, unet_inputs)
    assert (half - tuned).abs().max() > 1e-4 and (half - base).abs().max() > 1e-4
    assert all(torch.equal(value, state[key]) for key, value in method.state_dict().items()), "the state is the full-strength one"
    method.merge()
    assert all(type(m).__module__.startswith(("torch.", "diffusers.")) for m in tiny_pipe.unet.modules())
    torch.testing.assert_close(run_unet(tiny_pipe.unet, unet_inputs), half, rtol=0, atol=1e-5)
    with pytest.raises(SdtuneError, match="unmerge"):
        method.set_scale(1.0)
    method.unmerge()
    torch.testing.assert_close(run_unet(tiny_pipe.unet, unet_inputs), half, rtol=0, atol=1e-5)

    method.set_scale(0.0)
    torch.testing.assert_close(run_unet(tiny_pipe.unet, unet_inputs), base, rtol=0, atol=1e-5)
    method.set_scale(1.0)
    after = tiny_pipe.unet.state_dict()
    assert after.keys() == unet_state.keys() and all(torch.equal(after[k], unet_state[k]) for k in unet_state)
    torch.testing.assert_close(run_unet(tiny_pipe.unet, unet_inputs), tuned, rtol=0, atol=0)
    assert [p.data_ptr() for p in method.trainable_parameters()] and all(p.requires_grad for p in method.trainable_parameters())
    with pytest.raises(SdtuneError, match="finite"):
        method.set_scale(float("nan"))
    method.merge(keep_base=False)
    with pytest.raises(SdtuneError, match="keep_base=False"):
        method.unmerge()


@pytest.mark.parametrize("name,options,lr", CASES, ids=IDS)
def test_parameter_count_matches_formula(name, options, lr, tiny_pipe, base_unet):
    method = methods.create(name, **options)
    method.inject(tiny_pipe.unet)
    assert method.num_parameters() == expected_count(name, options, base_unet)
    # what `sdtune train` counts before the model loads: the method injected into a meta-device UNet
    from sdtune.limits import count_parameters
    from sdtune.models import read_model_configs

    frozen, trained = count_parameters(read_model_configs("tiny-random"), method)
    assert trained == method.num_parameters()
    assert frozen + trained == sum(p.numel() for p in tiny_pipe.unet.parameters())


@pytest.mark.parametrize("name,options,lr", CASES, ids=IDS)
def test_adapter_refuses_another_base_model(name, options, lr, tiny_pipe, tmp_path):
    from sdtune.models import build_tiny_pipeline

    method = methods.create(name, **options)
    method.inject(tiny_pipe.unet)
    path = save_adapter(tmp_path / "adapter.safetensors", method, "tiny-random")
    other = build_tiny_pipeline(seed=99)  # same shapes, other weights
    with pytest.raises(SdtuneError, match="was trained on base model 'tiny-random'"):
        load_adapter(path, other)


SD14_COUNTS = [
    ("atoms", {}, 4_212),
    ("bitfit", {}, 343_684),  # every UNet bias
    # biases 343,684 + norm weights 100,160 + γ 137,280 (11 x width in each of the 16 transformer blocks)
    ("difffit", {}, 581_124),
    ("difffit", {"resnet_gamma": True}, 601_284),  # + conv2 output channels of the 22 ResnetBlock2D
    ("full", {}, 859_520_964),
    # attn1.to_out.0 at widths 320, 640, 1280: φ and ψ per width, plus one PaCa block (r=16, M=64) per width
    ("gift", {}, 2 * 16 * (320 + 640 + 1280) + 3 * ((16 * 64 + 64) + 4 * (16 * 16 + 16) + (16 * 32 + 32) + (32 * 16 + 16))),
    ("gift", {"generator": "simple"}, 2 * 16 * (320 + 640 + 1280)),
    ("lora", {"targets": "conv3x3"}, 2_188_960),
    ("lora", {"targets": "attn"}, 797_184),
    # kohya-ss' LoRA: per transformer of width c, Σ r·(c_in + c_out) = 4·(32c + 2·768) (q/k/v/out of both attentions,
    # proj_in, proj_out, ff.net.0.proj c→8c, ff.net.2 4c→c), over 5 transformers at 320 and 640 and 6 at 1280
    ("lora", {"targets": "transformer"}, 4 * (5 * (32 * 320 + 1536) + 5 * (32 * 640 + 1536) + 6 * (32 * 1280 + 1536))),
    # kohya-ss' LoCon: + the 3x3 convs but conv_in (4→320) and conv_out (320→4), the 22 time_emb_proj (1280 → c_out,
    # Σ c_out = 20,160) and the 14 conv_shortcut 1x1 convs (Σ c_in + c_out = 84,480 of the 46 1x1 convs less proj_in's
    # and proj_out's 49,920)
    ("lora", {"targets": "locon"}, 1_695_744 + 2_188_960 - 4 * (4 * 9 + 320) - 4 * (320 * 9 + 4)
     + 4 * (22 * 1280 + 20_160) + 4 * (84_480 - 49_920)),
    # LyCORIS' full preset: + conv_in (3x3, 4→320), conv_out (3x3, 320→4), time_embedding.linear_1 (320→1280), linear_2
    ("lora", {"targets": "full"}, 4_203_264 + 4 * (4 * 9 + 320) + 4 * (320 * 9 + 4) + 4 * (320 + 1280) + 4 * (1280 + 1280)),
    # LoHa: two LoRA-sized pairs on every layer of a family
    ("loha", {"targets": "transformer"}, 2 * 1_695_744),
    ("loha", {"targets": "locon"}, 2 * 4_203_264),
    ("loha", {"targets": "full"}, 2 * 4_232_864),
    # the 46 1x1 convolutions add r·(c_in + c_out) each: 337,920 at rank 4
    ("lora", {"targets": "conv"}, 2_188_960 + 337_920),
    ("lora", {}, 2_188_960 + 337_920 + 797_184),
    # DoRA: + one magnitude per output channel of the 226 layers, 183,364 on SD v1.4
    ("lora", {"dora": True}, 2_188_960 + 337_920 + 797_184 + 183_364),
    ("loha", {}, 2 * (2_188_960 + 337_920 + 797_184)),  # two LoRA-sized pairs
    ("lokr", {}, 261_440),  # low_rank_count's LoKr formula on SD v1.4's shapes
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


@pytest.mark.parametrize("name", ["lora", "loha", "lokr", "oft"])
@pytest.mark.parametrize("targets,layers", [("transformer", 192), ("locon", 278), ("full", 282)])
def test_every_method_that_takes_a_family_counts_it_on_sd14_by_its_formula(name, targets, layers):
    """The kohya-ss and LyCORIS families on SD v1.4 for each method that takes `targets`, as `sdtune methods` lists
    them (each method's variants): the layer count and its formula over the family's layers' shapes."""
    from sdtune.models import build_sd14_unet

    assert {"targets": targets} in methods.method_class(name).variants
    unet = build_sd14_unet("meta")
    method = methods.create(name, targets=targets)
    expected = expected_count(name, {"targets": targets}, unet)
    method.inject(unet)
    assert len(method.target_names) == layers and method.num_parameters() == expected


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_adapter_loads_into_the_same_base_in_another_precision(dtype, tiny_pipe, tmp_path):
    from sdtune.models import load_pipeline

    method = methods.create("atoms")
    method.inject(tiny_pipe.unet)
    perturb(method)
    path = save_adapter(tmp_path / "adapter.safetensors", method, "tiny-random")
    low_precision = load_pipeline("tiny-random", dtype=dtype)
    load_adapter(path, low_precision)  # merged into the fp16/bf16 weights
    assert low_precision.unet.conv_in.weight.dtype == dtype


@pytest.mark.parametrize("first,second", [("atoms", "lora"), ("lora", "loha"), ("difffit", "difffit"), ("gift", "bitfit")])
def test_a_unet_carries_one_unmerged_method_at_a_time(first, second, tiny_pipe):
    carried = methods.create(first)
    carried.inject(tiny_pipe.unet)
    with pytest.raises(SdtuneError, match=f"this UNet already carries {first} \\(unmerged\\).*before injecting {second}"):
        methods.create(second).inject(tiny_pipe.unet)
    carried.merge()  # plain again: the next method goes on top of the merged weights
    methods.create(second).inject(tiny_pipe.unet)


def test_an_adapter_is_refused_by_name_on_a_unet_carrying_an_unmerged_method(tiny_pipe, tmp_path):
    """The README's sequence: inject, merge, unmerge, then open an adapter on the same pipeline. The refusal names
    the carried method, not a base-model mismatch (the wrapped layers have other names than the base model's)."""
    from sdtune import load_adapters, open_adapter
    from sdtune.export import export_adapter

    trained = methods.create("lora")
    trained.inject(tiny_pipe.unet)
    perturb(trained)
    path = save_adapter(tmp_path / "adapter.safetensors", trained, "tiny-random")
    trained.merge()
    kohya = tmp_path / "kohya.safetensors"
    export_adapter(path, "kohya", kohya)
    carried = methods.create("atoms")
    carried.inject(tiny_pipe.unet)
    carried.merge()
    carried.unmerge()  # the wrappers are back: the UNet carries atoms again
    for load in (lambda: load_adapter(path, tiny_pipe), lambda: open_adapter(kohya, tiny_pipe),
                 lambda: load_adapters([path, kohya], tiny_pipe)):
        with pytest.raises(SdtuneError, match="this UNet already carries atoms \\(unmerged\\).*before loading"):
            load()
    carried.merge()
    load_adapter(path, tiny_pipe)


def test_describe_shows_options_only_where_there_are_some(tiny_pipe):
    """BitFit's default (no targets: every bias) and full have nothing to show: no empty `targets=` or `()`."""
    assert methods.create("bitfit").describe() == "bitfit"
    assert methods.create("full").describe() == "full"
    assert methods.create("bitfit", targets="attn1").describe() == "bitfit (targets=attn1)"
    assert methods.create("lora").describe() == "lora (rank=4, alpha=4.0, targets=all)"
    injected = methods.create("bitfit")
    injected.inject(tiny_pipe.unet)
    assert injected.describe() == f"bitfit, {injected.num_parameters():,} trainable parameters in {len(injected.target_names)} layers"
