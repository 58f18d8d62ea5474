"""Inpainting when the data must supply the large scales too: the conditional VAE with its
condition's structure channel fitted along with the latents (`posterior.StructureFitting`)
against the Gaussian with the same structure prior (issue 14, item 1).

Full fields f = x + a up(s) of IRIS test patches (x the small scales, s their condition's
structure channel, a = coarse_scale / log_scale; exact by construction), masked (1° holes or
random pixels) with white noise 10 % of f's rms; the brightness channel is given. VAE:
`map_fit` (starts: zero, encoder, the linearised solution) and Laplace `posterior_samples` of
StructureFitting(vae, prior) with prior the StationaryGaussian of the training split's structure
channels. Baseline, the same model made Gaussian: s ~ that prior, x | s ~
`wiener.ConditionalGaussian` (mean linear in s), an offset of rms 3 — its exact Wiener filter;
beside it the StationaryGaussian of the training full fields (lag estimate, no structure).
Prints masked-pixel MSE, the VAE / Gaussian ratio, the coverage of the 68 % intervals and the
fits' convergence.

    python benchmarks/structure_fitting.py [--patches 4] [--masks pixels holes] [--steps 100]
        [--sets-cache runs/bench/sets_default.pt] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np
import torch

from conditioning_vs_wiener import HOLE_DEG, make_masks, mse, observe
from pysm_vaedust.model import up
from pysm_vaedust.posterior import StructureFitting, conditional_mean, map_fit, posterior_samples
from pysm_vaedust.train import datasets_of_weights
from pysm_vaedust.weights import default_weights_path, load_weights
from pysm_vaedust.wiener import ConditionalGaussian, StationaryGaussian


class DenseGaussian(StationaryGaussian):
    """A Gaussian of patches with a given dense covariance (StationaryGaussian's Wiener filter)."""

    def __init__(self, mean: float, cov: np.ndarray, npix: int):
        super().__init__(mean, np.zeros((2 * npix - 1, 2 * npix - 1)))
        self._cov = cov


def joint_gaussian(fitting: StructureFitting, cond: ConditionalGaussian, offset_var: float) -> DenseGaussian:
    """f = a up(s) + m(s) + r + b with s ~ the structure prior, m, r of `cond`, b ~ N(0, offset_var)."""
    m, n = fitting.config.condition_npix, fitting.config.npix
    basis = torch.eye(m * m, dtype=torch.float64).reshape(-1, 1, m, m)
    linear = fitting.gain * up(basis) + cond.mean_of(torch.cat([basis, torch.zeros_like(basis)], 1)).double()
    lift = (linear - cond.offset).reshape(m * m, n * n).T @ fitting.root.double()       # (n^2, m^2)
    cov = lift @ lift.T + torch.from_numpy(cond.residual.covariance()) + offset_var
    flat = torch.full((1, 1, m, m), fitting.prior_mean, dtype=torch.float64)    # the prior mean of s
    mean = float(fitting.gain * fitting.prior_mean + cond.mean_of(torch.cat([flat, torch.zeros_like(flat)], 1)).mean())
    return DenseGaussian(mean, cov.numpy(), n)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--weights", default=str(default_weights_path()))
    parser.add_argument("--patches", type=int, default=4)
    parser.add_argument("--masks", nargs="+", default=["pixels", "holes"], choices=["holes", "pixels"])
    parser.add_argument("--fraction", type=float, default=0.3)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--sets-cache", default=None)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    start = time.time()
    weights = load_weights(args.weights)
    vae, meta = weights.vae, weights.metadata
    sets = datasets_of_weights(meta, args.sets_cache)
    (x_train, c_train), (x_test, c_test) = sets["train"], sets["test"]
    fitting = StructureFitting(vae, StationaryGaussian.fit(c_train[:, :1]), meta["normalisation"])
    joint = joint_gaussian(fitting, ConditionalGaussian.fit(x_train, c_train), fitting.offset_scale**2)
    plain = StationaryGaussian.fit(x_train + fitting.gain * up(c_train[:, :1]))
    n = vae.config.npix
    block = int(round(HOLE_DEG / meta["geometry"]["size_deg"] * n))
    pick = np.unique(np.linspace(0, len(x_test) - 1, args.patches).round().astype(int))
    x, c = x_test[pick], c_test[pick]
    f = (x + fitting.gain * up(c[:, :1])).numpy()
    c_known = c.clone()
    c_known[:, 0] = 0                                   # the structure channel is not known
    out = {"command": "python benchmarks/structure_fitting.py " + " ".join(argv if argv is not None else sys.argv[1:]),
           "patch_indices": pick.tolist(), "fraction": args.fraction, "cases": []}
    for k, kind in enumerate(args.masks):
        tic = time.time()
        rng = np.random.default_rng(100 + k)
        mask = make_masks(kind, args.fraction, rng, len(pick), n, block)
        d, sigma = observe(f, mask, rng)
        hole = ~mask
        fit = map_fit(fitting, d, mask, sigma, c_known, n_restarts=3, steps=args.steps)
        post = posterior_samples(fitting, d, mask, sigma, c_known, n_samples=args.samples, fit=fit)
        lo, hi = post.interval(0.68)
        inside = (f >= lo.numpy()) & (f <= hi.numpy())
        g_mean, g_std, _ = joint.condition(d, mask, sigma, std=True)
        inside_g = np.abs(f - g_mean.numpy()) <= 0.9944578832097535 * g_std.numpy()
        row = {"mask": kind, "mse_vae_posterior_mean": mse(post.mean.numpy(), f, hole),
               "mse_vae_map": mse(conditional_mean(fitting, fit).numpy(), f, hole),
               "mse_joint_gaussian": mse(g_mean.numpy(), f, hole),
               "mse_full_field_stationary": mse(plain.condition(d, mask, sigma)[0].numpy(), f, hole),
               "coverage_vae_holes": float(inside[hole].mean()), "coverage_vae_observed": float(inside[mask].mean()),
               "coverage_gaussian_holes": float(inside_g[hole].mean()),
               "coverage_gaussian_observed": float(inside_g[mask].mean()),
               "map_converged": fit.converged.tolist(), "best_start": [fit.restart_labels[i] for i in fit.best_restart],
               "seconds": time.time() - tic}
        row["ratio"] = row["mse_vae_posterior_mean"] / row["mse_joint_gaussian"]
        out["cases"].append(row)
        print(f"{kind} {args.fraction:.0%}: masked-pixel MSE VAE posterior mean {row['mse_vae_posterior_mean']:.4f} "
              f"(MAP {row['mse_vae_map']:.4f}), Gaussian with the same structure prior {row['mse_joint_gaussian']:.4f}, "
              f"ratio {row['ratio']:.3f}; stationary full-field Gaussian {row['mse_full_field_stationary']:.4f}; "
              f"coverage holes / observed VAE {row['coverage_vae_holes']:.2f} / {row['coverage_vae_observed']:.2f}, "
              f"Gaussian {row['coverage_gaussian_holes']:.2f} / {row['coverage_gaussian_observed']:.2f}; "
              f"converged {sum(row['map_converged'])} of {len(pick)}, best start {row['best_start']}; "
              f"{row['seconds']:.0f} s", flush=True)
    out["seconds"] = time.time() - start
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(out, fh, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
