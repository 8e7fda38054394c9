"""GIFT's maths against the literal formulas, its sharing of one generator per input width, its options."""

from __future__ import annotations

import math

import pytest
import torch
from typer.testing import CliRunner

from sdtune import methods
from sdtune.errors import SdtuneError
from sdtune.explain import cluster_maps
from sdtune.methods.gift import Generator, cluster_assignment, gift_delta


def randomise(module, seed=0, scale=0.3):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * scale)


def literal_paca_generator(g: Generator, weight: torch.Tensor) -> torch.Tensor:
    """Δω written out step by step from the paper's equations, with einsum over explicit indices."""

    def l2(x):
        return x / x.pow(2).sum(-1, keepdim=True).sqrt()

    def lin(layer, x):
        return torch.einsum("nk,jk->nj", x, layer.weight) + layer.bias

    w = torch.einsum("oi,ri->or", weight, g.phi.weight)  # P = ω·φ
    for block in g.blocks:
        a = block.attention
        u = l2(w)
        n = u.shape[0]
        c = torch.sigmoid(torch.einsum("nr,mr->nm", u, a.assign.weight) + a.assign.bias) / n
        z = l2(torch.einsum("nm,nr->mr", c, u))
        q, k, v = lin(a.query, u), lin(a.key, z), lin(a.value, z)
        scores = torch.einsum("nr,mr->nm", q, k) / math.sqrt(q.shape[1])
        attention = scores.exp() / scores.exp().sum(1, keepdim=True)
        w = w + lin(a.proj, torch.einsum("nm,mr->nr", attention, v))
        hidden = lin(block.ffn[0], l2(w))
        hidden = 0.5 * hidden * (1 + torch.erf(hidden / math.sqrt(2)))  # exact GELU
        w = w + lin(block.ffn[2], hidden)
    return torch.einsum("or,ir->oi", w, g.psi.weight)  # Δω = P'·ψ


def test_simple_delta_is_omega_phi_psi():
    gen = torch.Generator().manual_seed(0)
    weight, phi, psi = torch.randn(5, 7, generator=gen), torch.randn(3, 7, generator=gen), torch.randn(7, 3, generator=gen)
    expected = torch.zeros(5, 7)
    for o in range(5):
        for i in range(7):
            expected[o, i] = sum(weight[o, j] * phi[k, j] * psi[i, k] for j in range(7) for k in range(3))
    torch.testing.assert_close(gift_delta(weight, phi, psi), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("blocks", [1, 2])
def test_paca_generator_matches_the_equations(blocks):
    g = Generator(width=12, rank=4, kind="paca", clusters=5, blocks=blocks)
    randomise(g)
    weight = torch.randn(9, 12, generator=torch.Generator().manual_seed(1))  # d_out != d_in
    torch.testing.assert_close(g.delta(weight), literal_paca_generator(g, weight), rtol=1e-4, atol=1e-5)


def test_cluster_assignment_and_maps_literal():
    gen = torch.Generator().manual_seed(2)
    u, a_weight, a_bias = torch.randn(6, 3, generator=gen), torch.randn(4, 3, generator=gen), torch.randn(4, generator=gen)
    c = cluster_assignment(u, a_weight, a_bias)
    for n in range(6):
        for m in range(4):
            logit = sum(u[n, k] * a_weight[m, k] for k in range(3)) + a_bias[m]
            assert c[n, m].item() == pytest.approx(1 / (1 + math.exp(-logit.item())) / 6, rel=1e-5)

    outputs, clusters = torch.randn(2 * 3, 5, generator=gen), torch.randn(5, 4, generator=gen)
    maps = cluster_maps(outputs, clusters, 2, 3)
    assert maps.shape == (4, 2, 3)
    for m in range(4):
        for i in range(2):
            for j in range(3):
                value = sum(outputs[i * 3 + j, d] * clusters[d, m] for d in range(5))
                assert maps[m, i, j].item() == pytest.approx(value.item(), abs=1e-5)


def test_layer_forward_is_one_linear_with_the_generated_weight(tiny_pipe):
    method = methods.create("gift")
    method.inject(tiny_pipe.unet)
    name, layer = next(iter(method.layers.items()))
    randomise(method.generators, seed=3, scale=0.1)
    x = torch.randn(2, 10, layer.base_layer.in_features)
    weight = layer.base_layer.weight.detach()
    expected = x @ (weight + literal_paca_generator(layer.generator, weight)).T + layer.base_layer.bias
    torch.testing.assert_close(layer(x), expected, rtol=1e-4, atol=1e-5)


def test_one_generator_per_input_width(tiny_pipe):
    method = methods.create("gift", targets="attn1.to_out.0,attn2.to_k")
    method.inject(tiny_pipe.unet)
    widths = {}
    for name, layer in method.layers.items():
        widths.setdefault(layer.base_layer.in_features, set()).add(id(layer.generator))
    # tiny model: attention widths 32 and 64; attn2.to_k reads the 32-wide text embeddings
    assert sorted(widths) == [32, 64]
    assert all(len(ids) == 1 for ids in widths.values())
    assert len({next(iter(ids)) for ids in widths.values()}) == 2
    assert sorted(method.generators) == ["32", "64"]
    # attn2.to_k maps 32 -> 64 in some blocks: a d_out != d_in layer shares the 32-wide generator
    to_k = [layer for name, layer in method.layers.items() if name.endswith("attn2.to_k")]
    assert {layer.base_layer.out_features for layer in to_k} == {32, 64}
    assert all(layer.generator is method.generators["32"] for layer in to_k)
    # each generator counted once although many layers hold it
    assert method.num_parameters() == sum(p.numel() for p in method.generators.parameters())
    assert len(method.trainable_parameters()) == len({id(p) for p in method.trainable_parameters()})


def test_the_hyper_transformer_learns(tiny_pipe, unet_inputs):
    """ψ starts at zero, so only ψ gets a gradient at first; after a step H's parameters must train too."""
    method = methods.create("gift", clusters=8)
    parameters = method.inject(tiny_pipe.unet)
    block = method.generators["64"].blocks[0]
    before = {n: p.detach().clone() for n, p in block.named_parameters()}
    optimizer = torch.optim.Adam(parameters, lr=1e-2)
    target = torch.randn(unet_inputs[0].shape, generator=torch.Generator().manual_seed(5))
    for _ in range(3):
        optimizer.zero_grad()
        torch.nn.functional.mse_loss(tiny_pipe.unet(*unet_inputs).sample, target).backward()
        optimizer.step()
    changed = [n for n, p in block.named_parameters() if not torch.equal(p, before[n])]
    assert "attention.assign.weight" in changed and "ffn.0.weight" in changed, changed


@pytest.mark.parametrize(
    "options,message",
    [
        ({"generator": "mlp"}, "--gift-generator must be one of simple, paca"),
        ({"rank": 0}, "--gift-rank must be"),
        ({"clusters": -2}, "--gift-clusters must be"),
        ({"blocks": 1.5}, "--gift-blocks must be"),
        ({"targets": " , "}, "gift targets must name"),
        ({"heads": 2}, "has no option"),
    ],
)
def test_bad_options_are_one_line_errors(options, message):
    with pytest.raises(SdtuneError, match=message) as error:
        methods.create("gift", **options)
    assert "\n" not in str(error.value)


def test_unknown_target_is_an_error(tiny_pipe):
    method = methods.create("gift", targets="attn1.to_out.0,attn3.to_v")
    with pytest.raises(SdtuneError, match="'attn3.to_v' matches no Linear layer"):
        method.inject(tiny_pipe.unet)


def test_targets_from_a_toml_array():
    assert methods.create("gift", targets=["attn1.to_out.0", "attn2.to_out.0"]).options.targets == "attn1.to_out.0,attn2.to_out.0"


def test_cli_flags_reach_the_method(tmp_path, tiny_path):
    from sdtune.adapter import read_adapter
    from sdtune.cli import app

    runner = CliRunner()
    wrong = runner.invoke(app, ["train", "--method", "atoms", "--gift-rank", "4", "--output", str(tmp_path / "x")])
    assert wrong.exit_code == 2 and "--gift-rank applies to --method gift, not atoms" in wrong.output

    args = ["train", "--model", "tiny-random", "--method", "gift", "--steps", "1", "--output", str(tmp_path / "run")]
    args += ["--gift-generator", "paca", "--gift-rank", "4", "--gift-clusters", "5", "--gift-blocks", "2"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    info = read_adapter(tmp_path / "run")[0]
    assert info.method == "gift"
    assert {k: info.options[k] for k in ("generator", "rank", "clusters", "blocks")} == {
        "generator": "paca", "rank": 4, "clusters": 5, "blocks": 2,
    }
