"""Filter atoms: every variant's ΔW against its literal formula, decompositions, fallbacks, cache."""

from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn

from sdtune import methods
from sdtune.errors import SdtuneError
from sdtune.methods import atoms as A


def svd_factors(rows: torch.Tensor, m: int):
    """α = U·S and D = Vh from torch.linalg.svd, the m leading terms."""
    u, s, vh = torch.linalg.svd(rows, full_matrices=False)
    return u[:, :m] * s[:m], vh[:m]


def generator(seed=0):
    return torch.Generator().manual_seed(seed)


def randn(*shape, seed=0):
    return torch.randn(*shape, generator=generator(seed), dtype=torch.float64)


# ---------------------------------------------------------------------------------------------
# Pure functions against literal formulas (float64)


@pytest.mark.parametrize("m", [9, 4])
def test_d_variant_is_alpha_times_delta_atoms(m):
    weight = randn(6, 5, 3, 3)
    alpha, atoms = svd_factors(weight.reshape(30, 9), m)
    delta = randn(m, 3, 3, seed=1)
    expected = (alpha @ delta.reshape(m, 9)).reshape(weight.shape)
    assert (A.weight_diff(weight, atoms, delta) - expected).abs().max() < 1e-10
    # svd_atoms finds the same atoms (up to sign; float32 result)
    found = A.svd_atoms(weight.float(), m).double()
    assert (found.abs() - atoms.abs()).abs().max() < 1e-5


def test_kc_variant_uses_channel_block_atoms():
    kc, k, m = 2, 3, 4
    weight = randn(8, 10, k, k)
    # the block view written out: one row per 2×2 channel block, entries (p, h, q, w)
    rows = torch.tensor(
        [
            [weight[bo * kc + p, bi * kc + q, h, w].item() for p in range(kc) for h in range(k) for q in range(kc) for w in range(k)]
            for bo in range(4) for bi in range(5)
        ],
        dtype=torch.float64,
    )
    assert torch.equal(A.to_blocks(weight, kc), rows)
    num_atoms = m * kc * kc
    alpha, atoms = svd_factors(rows, num_atoms)
    delta = randn(num_atoms, k * kc, k * kc, seed=1)
    expected = torch.zeros_like(weight)
    for bo, bi, p, q, h, w in itertools.product(range(4), range(5), range(kc), range(kc), range(k), range(k)):
        expected[bo * kc + p, bi * kc + q, h, w] = alpha[bo * 5 + bi] @ delta[:, p * k + h, q * k + w]
    assert (A.weight_diff(weight, atoms, delta, kc=kc) - expected).abs().max() < 1e-10
    assert torch.equal(A.from_blocks(A.to_blocks(weight, kc), weight.shape, kc), weight)


@pytest.mark.parametrize("m", [9, 4])
def test_d1_variant_is_alpha_times_channel_atom_updates(m):
    c_out, c_in, m1 = 3, 4, 2
    weight = randn(c_out, c_in, 3, 3)
    alpha, atoms = svd_factors(weight.reshape(-1, 9), m)
    alpha = alpha.reshape(c_out, c_in, m)
    beta, sub_atoms = randn(c_in, m, m1, seed=1), randn(m, m1, 3, 3, seed=2)
    expected = torch.zeros_like(weight)
    for o, c in itertools.product(range(c_out), range(c_in)):
        for j in range(m):
            channel_atom = sum(beta[c, j, s] * sub_atoms[j, s] for s in range(m1))
            expected[o, c] += alpha[o, c, j] * channel_atom
    assert (A.sub_atom_weight_diff(weight, atoms, beta, sub_atoms) - expected).abs().max() < 1e-10


@pytest.mark.parametrize("kernel", ["tap-unfold", "tap-depthwise", "weight", "auto"])
@pytest.mark.parametrize("stride,batch,height,width", [(1, 2, 7, 5), (2, 3, 6, 6), (1, 1, 2, 3)])
def test_d1_layer_through_the_tap_kernels_equals_its_formed_weight(kernel, stride, batch, height, width):
    # 5 -> 7 channels (no tile's multiple), padding 1, stride 2, batch > 1; scale 0.7 for strength
    torch.manual_seed(0)
    conv = nn.Conv2d(5, 7, 3, stride=stride, padding=1).double().requires_grad_(False)
    _, atoms = svd_factors(conv.weight.reshape(-1, 9), 4)
    layer = A.SubAtomConv2d(conv, atoms, m1=2, kernel=kernel).double()
    layer.scale = 0.7
    with torch.no_grad():
        layer.sub_atoms.copy_(randn(*layer.sub_atoms.shape, seed=3))
    x = randn(batch, 5, height, width, seed=4).requires_grad_(True)

    def through_the_layer(x, beta, sub_atoms):
        return torch.func.functional_call(layer, {"beta": beta, "sub_atoms": sub_atoms}, (x,))

    beta = layer.beta.detach().clone().requires_grad_(True)
    sub_atoms = layer.sub_atoms.detach().clone().requires_grad_(True)
    assert torch.autograd.gradcheck(through_the_layer, (x, beta, sub_atoms))
    delta = A.sub_atom_weight_diff(conv.weight, layer.atoms, beta, sub_atoms, projector=layer.projector)
    expected = conv._conv_forward(x, conv.weight + 0.7 * delta, conv.bias)
    torch.testing.assert_close(through_the_layer(x, beta, sub_atoms), expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("m", [9, 4])
def test_d1_dc_variant_rebases_block_coefficients(m):
    c_out, c_in, m1, kc = 4, 6, 2, 2
    weight = randn(c_out, c_in, 3, 3)
    alpha, atoms = svd_factors(weight.reshape(-1, 9), m)
    alpha = alpha.reshape(c_out, c_in, m)
    beta, sub_atoms = randn(c_in, m, m1, seed=1), randn(m, m1, 3, 3, seed=2)
    size = kc * kc * m
    bases = randn(size, size, seed=3) * 0.1
    new_alpha = torch.zeros_like(alpha)
    for bo, bi in itertools.product(range(c_out // kc), range(c_in // kc)):
        a = torch.stack([alpha[bo * kc + p, bi * kc + q, j] for p in range(kc) for q in range(kc) for j in range(m)])
        a = a @ (torch.eye(size, dtype=torch.float64) + bases)
        for index, (p, q, j) in enumerate(itertools.product(range(kc), range(kc), range(m))):
            new_alpha[bo * kc + p, bi * kc + q, j] = a[index]
    tuned = torch.zeros_like(weight)
    for o, c in itertools.product(range(c_out), range(c_in)):
        residual = weight[o, c] - sum(alpha[o, c, j] * atoms[j].reshape(3, 3) for j in range(m))
        tuned[o, c] = residual + sum(
            new_alpha[o, c, j] * (atoms[j].reshape(3, 3) + sum(beta[c, j, s] * sub_atoms[j, s] for s in range(m1)))
            for j in range(m)
        )
    got = A.sub_atom_weight_diff(weight, atoms, beta, sub_atoms, bases, kc=kc)
    assert (got - (tuned - weight)).abs().max() < 1e-10


def test_linear_atoms_over_weight_blocks():
    kc, m = 4, 9
    weight = randn(16, 12)
    rows = torch.stack([weight[bo * kc:(bo + 1) * kc, bi * kc:(bi + 1) * kc].reshape(-1) for bo in range(4) for bi in range(3)])
    alpha, atoms = svd_factors(rows, m)
    delta = randn(m, kc, kc, seed=1)
    expected = torch.zeros_like(weight)
    for bo, bi in itertools.product(range(4), range(3)):
        expected[bo * kc:(bo + 1) * kc, bi * kc:(bi + 1) * kc] = torch.einsum("j,jpq->pq", alpha[bo * 3 + bi], delta)
    assert (A.weight_diff(weight, atoms, delta, kc=kc) - expected).abs().max() < 1e-10


def test_sparse_atoms_use_least_squares_coefficients():
    weight = randn(5, 4, 3, 3)
    atoms = A.sparse_atoms(weight.float(), 4).double()
    projector = A.atom_projector(atoms, orthonormal=False)
    delta = randn(4, 3, 3, seed=1)
    flat = weight.reshape(-1, 9)
    alpha = torch.linalg.lstsq(atoms.T, flat.T).solution.T  # argmin ‖W_r − α·D‖
    expected = (alpha @ delta.reshape(4, 9)).reshape(weight.shape)
    assert (A.weight_diff(weight, atoms, delta, projector=projector) - expected).abs().max() < 1e-8


# ---------------------------------------------------------------------------------------------
# Sparse coding


def lasso_objective(rows, atoms, steps=300):
    codes = A.lasso_codes(rows, atoms, A.SPARSE_PENALTY, steps)
    return (0.5 * (rows - codes @ atoms).pow(2).sum() + A.SPARSE_PENALTY * codes.abs().sum()).item(), codes


def test_sparse_coding_is_deterministic_and_learns_sparse_atoms():
    # rows made of 2 of 6 unit atoms each: the learned dictionary codes them more sparsely than
    # the SVD's atoms and than where it started, and here finds the atoms themselves
    g = generator(5)
    true_atoms = nn.functional.normalize(torch.randn(6, 9, generator=g), dim=1)
    codes = torch.zeros(4000, 6)
    picks = torch.stack([torch.randperm(6, generator=g)[:2] for _ in range(4000)])
    codes.scatter_(1, picks, torch.randn(4000, 2, generator=g).sign() * (1 + torch.rand(4000, 2, generator=g)))
    rows = codes @ true_atoms

    atoms = A.sparse_atoms(rows, 6, seed=0)
    assert torch.equal(atoms, A.sparse_atoms(rows, 6, seed=0))
    assert not torch.equal(atoms, A.sparse_atoms(rows, 6, seed=1))
    torch.testing.assert_close(atoms.norm(dim=1), torch.ones(6))

    rows = rows / rows.pow(2).mean().sqrt()  # the scale sparse_atoms codes at
    learned, found = lasso_objective(rows, atoms)
    start = torch.linalg.qr(torch.randn(9, 9, generator=generator(0), dtype=torch.float64)).Q.T[:6].float()
    assert learned < 0.85 * lasso_objective(rows, A.svd_atoms(rows, 6))[0]
    assert learned < 0.5 * lasso_objective(rows, start)[0]
    assert (found == 0).float().mean() > 0.5
    assert (rows - found @ atoms).norm() / rows.norm() < 0.15
    assert (true_atoms @ atoms.T).abs().max(dim=1).values.min() > 0.95


def test_sparse_reconstruction_of_a_filter_bank():
    # filters that live near a 3-dimensional tap subspace: 4 atoms reach them, like the SVD's
    g = generator(2)
    weight = (torch.randn(256, 3, generator=g) @ torch.randn(3, 9, generator=g)).reshape(16, 16, 3, 3)
    weight += 0.01 * torch.randn(weight.shape, generator=g)

    def error(weight, atoms, orthonormal):
        rows, projector = weight.reshape(-1, 9).double(), A.atom_projector(atoms.double(), orthonormal)
        return ((rows - rows @ projector @ atoms.double()).norm() / rows.norm()).item()

    assert error(weight, A.svd_atoms(weight, 4), True) < 0.02
    assert error(weight, A.sparse_atoms(weight, 4), False) < 0.05
    # m = k² atoms of generic filters: α = W_r·D⁺ reconstructs them exactly
    weight = torch.randn(16, 16, 3, 3, generator=g)
    assert error(weight, A.sparse_atoms(weight, 9), False) < 1e-5


# ---------------------------------------------------------------------------------------------
# Layers, fallbacks, cache, options


class TwoConvs(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.odd = nn.Conv2d(3, 6, 3, padding=1)  # c_in = 3: no 2×2 channel blocks
        self.even = nn.Conv2d(6, 4, 3, padding=1)

    def forward(self, x):
        return self.even(self.odd(x))


@pytest.mark.parametrize("m1", [0, 2])
def test_kc_falls_back_to_1_where_channels_do_not_divide(m1):
    model, x = TwoConvs(), torch.randn(1, 3, 5, 5, generator=generator())
    base = model(x).detach()
    method = methods.create("atoms", kc=2, m1=m1)
    method.inject(model)
    assert method.layers["odd"].kc == 1 and method.layers["even"].kc == 2
    if m1:
        assert method.layers["odd"].delta_coeff_bases.shape == (9, 9)
        assert method.layers["even"].delta_coeff_bases.shape == (36, 36)
        expected = (3 * 9 * 2 + 9 * 2 * 9 + 81) + (6 * 9 * 2 + 9 * 2 * 9 + 36 * 36)
    else:
        assert method.layers["odd"].delta_atoms.shape == (9, 3, 3)
        assert method.layers["even"].delta_atoms.shape == (36, 6, 6)
        expected = 9 * 9 + 36 * 36
    assert method.num_parameters() == expected
    torch.testing.assert_close(model(x), base, rtol=0, atol=1e-6)
    with torch.no_grad():
        for parameter in method.trainable_parameters():
            parameter.add_(0.1 * torch.randn(parameter.shape, generator=generator(3)))
    tuned = model(x).detach()
    assert (tuned - base).abs().max() > 1e-3
    method.merge()
    torch.testing.assert_close(model(x), tuned, rtol=0, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("layer_kind", ["conv", "linear", "conv_transposed_weight"])
def test_merging_in_place_adds_exactly_the_scaled_update(layer_kind, dtype, monkeypatch):
    """The in-place merge (W_b += W_b·mixing a few filters at a time, chunks not dividing the rows) leaves
    W + scale·ΔW, ΔW as `delta_weight` forms it; a weight that is no view of W_b takes the formed update."""
    monkeypatch.setattr(A, "MERGE_CHUNK_ROWS", 7)
    torch.manual_seed(0)
    base = nn.Linear(6, 5) if layer_kind == "linear" else nn.Conv2d(5, 4, 3)
    base = base.to(dtype)
    if layer_kind == "conv_transposed_weight":  # channels-last storage: W_b is not a view of W
        base.weight.data = base.weight.data.to(memory_format=torch.channels_last)
    rows = A.to_blocks(base.weight.detach(), 1)
    atoms = torch.linalg.svd(rows.double(), full_matrices=False)[2][:3]
    layer = (A.FilterAtomLinear if layer_kind == "linear" else A.FilterAtomConv2d)(base, atoms.to(dtype))
    with torch.no_grad():
        layer.delta_atoms.copy_(torch.randn(layer.delta_atoms.shape))
    layer.scale = 0.7
    expected = base.weight.detach() + layer.scaled_delta()
    before = base.weight.detach().clone()
    layer.merge_into_base()
    tolerance = 1e-12 if dtype == torch.float64 else 1e-6
    torch.testing.assert_close(base.weight.detach(), expected, rtol=0, atol=tolerance)
    assert (base.weight.detach() - before).abs().max() > 1e-3  # it changed


def test_forward_runs_one_convolution(monkeypatch):
    model, x = TwoConvs(), torch.randn(1, 3, 5, 5)
    methods.create("atoms", m1=2, kc=2).inject(model)
    calls = []
    original = nn.functional.conv2d
    monkeypatch.setattr(nn.functional, "conv2d", lambda *a, **k: calls.append(1) or original(*a, **k))
    model(x)
    assert len(calls) == 2  # one per layer


def test_adapter_atoms_define_the_update(tiny_pipe, unet_inputs):
    """Loading replaces the locally computed atoms (and the projector derived from them)."""
    from sdtune.models import load_pipeline

    method = methods.create("atoms", init="sparse", m=4)
    method.inject(tiny_pipe.unet)
    with torch.no_grad():
        for parameter in method.trainable_parameters():
            parameter.add_(0.05 * torch.randn(parameter.shape, generator=generator(4)))
        expected = tiny_pipe.unet(*unet_inputs).sample
    state = method.state_dict()

    other = methods.create("atoms", init="sparse", m=4)
    fresh = load_pipeline("tiny-random")
    other.inject(fresh.unet)
    for layer in other.layers.values():
        layer.set_atoms(torch.randn(layer.atoms.shape, generator=generator(9)))
    other.load_state_dict(state)
    with torch.no_grad():
        torch.testing.assert_close(fresh.unet(*unet_inputs).sample, expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("init,function", [("svd", "svd_atoms"), ("sparse", "sparse_atoms")])
def test_decomposition_is_cached_per_base_model(init, function, tiny_path, monkeypatch):
    from sdtune.models import load_pipeline

    methods.create("atoms", init=init).inject(load_pipeline("tiny-random").unet)

    def fail(*args, **kwargs):
        raise AssertionError("decomposition recomputed")

    monkeypatch.setattr(A, function, fail)
    methods.create("atoms", init=init).inject(load_pipeline("tiny-random").unet)  # from the cache
    with pytest.raises(AssertionError, match="recomputed"):  # other atoms: not the same entry
        methods.create("atoms", init=init, kc=2).inject(load_pipeline("tiny-random").unet)
    with pytest.raises(AssertionError, match="recomputed"):  # other weights: not the same entry
        from sdtune.models import build_tiny_pipeline

        methods.create("atoms", init=init).inject(build_tiny_pipeline(seed=99).unet)


@pytest.mark.parametrize(
    "options,message",
    [
        ({"init": "pca"}, "--atoms-init 'pca' is not available"),
        ({"m1": -1}, "--atoms-m1 must be an integer of at least 0"),
        ({"kc": 0}, "--atoms-kc must be an integer of at least 1"),
        ({"m": "4"}, "--atoms-m must be an integer"),
        ({"linear": "yes"}, "--atoms-linear must be true or false"),
        ({"linear_kc": 0}, "linear_kc must be an integer of at least 1"),
    ],
)
def test_bad_options_are_one_line_errors(options, message):
    with pytest.raises(SdtuneError, match=message) as error:
        methods.create("atoms", **options)
    assert "\n" not in str(error.value)


def test_variants_and_default_targets():
    from sdtune.models import build_sd14_unet

    cases = [({}, "D", 52), ({"m1": 4}, "D1", 52), ({"kc": 2}, "kc", 98), ({"m1": 4, "kc": 2}, "D1+Dc", 98),
             ({"kc": 2, "include_1x1": False}, "kc", 52), ({"linear": True}, "D", 52 + 128)]
    for options, variant, layers in cases:
        method = methods.create("atoms", **options)
        method.inject(build_sd14_unet("meta"))
        assert (method.variant, len(method.target_names)) == (variant, layers), options


def test_cli_flags_reach_the_method(tiny_path, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from sdtune.adapter import read_adapter
    from sdtune.cli import app

    sparse_calls = []  # sparse coding of 226 layers is slow; this test is about the flags
    monkeypatch.setattr(A, "sparse_atoms", lambda rows, m, seed=0: sparse_calls.append(m) or A.svd_atoms(rows, m))

    result = CliRunner().invoke(app, [
        "train", "--model", "tiny-random", "--method", "atoms", "--steps", "1", "--output", str(tmp_path / "run"),
        "--atoms-m1", "2", "--atoms-kc", "2", "--atoms-init", "sparse", "--atoms-linear",
    ])
    assert result.exit_code == 0, result.output
    assert sparse_calls
    info, tensors = read_adapter(tmp_path / "run")
    assert {k: info.options[k] for k in ("m1", "kc", "init", "linear")} == {"m1": 2, "kc": 2, "init": "sparse", "linear": True}
    assert any(k.endswith(".delta_coeff_bases") for k in tensors) and any(k.endswith("to_q.delta_atoms") for k in tensors)

    bad = CliRunner().invoke(app, ["train", "--model", "tiny-random", "--atoms-init", "pca", "--output", str(tmp_path / "bad")])
    assert bad.exit_code == 2 and "--atoms-init 'pca' is not available" in bad.output


def test_the_description_shows_whether_1x1_convolutions_are_tuned():
    from sdtune import methods

    assert "include_1x1=False" in methods.create("atoms").describe()
    assert "include_1x1=True" in methods.create("atoms", kc=2).describe()
    assert methods.create("atoms", kc=2).options_dict()["include_1x1"] is None  # what the adapter file keeps
