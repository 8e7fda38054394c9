"""Time the filter-atom decompositions (svd, sparse) on SD v1.4's UNet and report how well they
reconstruct the weights.

    PYTHONPATH=. python benchmarks/atoms_decomposition.py [--m 9 4] [--kc 1 2] [--weights random|DIR]

Random weights (the default) need no download; reconstruction on them says little about trained
weights, whose taps are far from isotropic. Reported per setting: seconds for all targeted layers,
relative error ‖W − α·D‖/‖W‖ over all of them with the adapter's α = W_b·P, and for sparse coding
the lasso code's own error and its fraction of zeros (on each layer's dictionary-learning sample).
Then, what `sdtune train` pays: `method.inject` on the whole UNet with the default options, once with
an empty decomposition cache (decompose every layer, write the cache) and once more (read it back).
"""

from __future__ import annotations

import argparse
import time

import torch

from sdtune.methods import atoms as A
from sdtune.methods.base import named_convs


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--m", type=int, nargs="+", default=[9, 4])
    parser.add_argument("--kc", type=int, nargs="+", default=[1])
    parser.add_argument("--weights", default="random", help="'random' or a diffusers UNet folder")
    parser.add_argument("--skip-inject", action="store_true", help="only the per-setting table")
    args = parser.parse_args()

    from sdtune.models import build_sd14_unet

    if args.weights == "random":
        torch.manual_seed(0)
        unet = build_sd14_unet("cpu")
    else:
        from diffusers import UNet2DConditionModel

        unet = UNet2DConditionModel.from_pretrained(args.weights)
    convs = [conv for _, conv in named_convs(unet, {3})]
    print(f"{len(convs)} 3x3 convs, {sum(c.weight.numel() for c in convs):,} weights")
    for kc in args.kc:
        for m in args.m:
            for init in A.INITS:
                error = total = lasso_error = zeros = sample_total = 0.0
                seconds = 0.0
                for conv in convs:
                    b = kc if conv.in_channels % kc == 0 and conv.out_channels % kc == 0 else 1
                    rows = A.to_blocks(conv.weight.detach(), b)
                    start = time.perf_counter()
                    atoms = A.decompose(rows, min(m, 9) * b * b, init, seed=0)
                    seconds += time.perf_counter() - start
                    projector = A.atom_projector(atoms, orthonormal=init == "svd").double()
                    data = rows.double()
                    error += (data - data @ projector @ atoms.double()).pow(2).sum().item()
                    total += data.pow(2).sum().item()
                    if init == "sparse":
                        generator = torch.Generator().manual_seed(0)
                        index = torch.randint(data.shape[0], (A.SPARSE_SAMPLE_ROWS,), generator=generator).sort().values
                        sample = data[index].float() / data[index].float().pow(2).mean().sqrt()
                        codes = A.lasso_codes(sample, atoms, A.SPARSE_PENALTY, A.SPARSE_LASSO_STEPS * (A.SPARSE_ROUNDS + 1))
                        lasso_error += (sample - codes @ atoms).pow(2).sum().item()
                        sample_total += sample.pow(2).sum().item()
                        zeros += (codes == 0).double().mean().item() / len(convs)
                line = f"kc={kc} m={m} {init:6s}: {seconds:6.2f} s, rel. error (α = W·P) {(error / total) ** 0.5:.2e}"
                if init == "sparse":
                    line += f"; lasso code: rel. error {(lasso_error / sample_total) ** 0.5:.3f}, {zeros:.0%} zeros"
                print(line, flush=True)
    if not args.skip_inject:
        time_injection(unet)


def time_injection(unet) -> None:
    """inject() with an empty cache, then with the cache it wrote, for each init at the default options."""
    import copy
    import os
    import tempfile

    from sdtune import methods

    with tempfile.TemporaryDirectory() as cache:
        previous = os.environ.get("SDTUNE_CACHE")
        os.environ["SDTUNE_CACHE"] = cache
        try:
            for init in A.INITS:
                seconds = []
                for _ in range(2):
                    fresh = copy.deepcopy(unet)
                    start = time.perf_counter()
                    methods.create("atoms", init=init).inject(fresh)
                    seconds.append(time.perf_counter() - start)
                    del fresh
                print(f"inject atoms (init={init}, defaults): {seconds[0]:.2f} s with an empty cache, "
                      f"{seconds[1]:.2f} s from the cache", flush=True)
        finally:
            if previous is None:
                os.environ.pop("SDTUNE_CACHE")
            else:
                os.environ["SDTUNE_CACHE"] = previous


if __name__ == "__main__":
    main()
