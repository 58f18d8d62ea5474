"""Inpainting and posterior coverage of a weights file on real test-split patches, against the
Wiener filter of the training split's stationary covariance (the Gaussian baseline of issue 4).

For each masked fraction: `--patches` test patches spread over the split, random 1-degree blocks
masked (`pysm_vaedust.conditioning.block_mask`, seeded), white noise at 10 % of each patch's rms.
Prints and writes (JSON) the masked-pixel mean squared error of the VAE conditional mean (MAP
latents + Wiener mean of the decoder noise) for the N(0, I) and the learned prior, of the Wiener
filter, their ratios, and the 68 % coverage of Laplace constrained realizations.

    python benchmarks/conditioning_vs_wiener.py [--weights W] [--patches 16] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

from pysm_vaedust.conditioning import StationaryGaussian, block_mask, conditional_mean, map_fit, posterior_samples
from pysm_vaedust.train import TrainConfig, build_datasets
from pysm_vaedust.weights import default_weights_path, load_weights

NOISE_FRACTION = 0.1


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--weights", default=str(default_weights_path()))
    parser.add_argument("--patches", type=int, default=16)
    parser.add_argument("--fractions", type=float, nargs="+", default=[0.3, 0.5])
    parser.add_argument("--samples", type=int, default=64, help="Laplace draws for the coverage")
    parser.add_argument("--json", default=None, help="write the numbers here")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    start = time.time()
    weights = load_weights(args.weights)
    vae = weights.vae
    sets, _ = build_datasets(TrainConfig.of_weights(weights.metadata))
    test = sets["test"]
    x = test[np.linspace(0, len(test) - 1, args.patches).astype(int)]
    wiener = StationaryGaussian.fit(sets["train"])
    priors = {"standard": None} | ({"flow": weights.prior} if weights.prior is not None else {})
    results = {"weights": args.weights, "patches": args.patches, "noise_fraction": NOISE_FRACTION, "rows": []}
    print(f"{args.patches} test patches, noise {NOISE_FRACTION:.0%} of each patch rms, 1-degree block holes")
    print(f"{'masked':>6} {'prior':>8} | {'MSE VAE':>8} {'MSE Wiener':>10} {'ratio':>6} | cover all / holes / observed")
    for k, frac in enumerate(args.fractions):
        rng = np.random.default_rng(100 + k)
        mask = np.stack([block_mask(frac, rng) for _ in range(args.patches)])[:, None]
        sigma = NOISE_FRACTION * x.flatten(1).std(1)[:, None, None, None].numpy() * np.ones(mask.shape)
        d = (x.numpy() + rng.standard_normal(x.shape) * sigma).astype(np.float32)
        hole = ~mask
        mse_w = float(((wiener.condition(d, mask, sigma)[0] - x).numpy()[hole] ** 2).mean())
        for name, prior in priors.items():
            fit = map_fit(vae, d, mask, sigma, n_restarts=3, prior=prior, generator=torch.Generator().manual_seed(1))
            mse_v = float(((conditional_mean(vae, fit) - x).numpy()[hole] ** 2).mean())
            post = posterior_samples(vae, d, mask, sigma, n_samples=args.samples, fit=fit,
                                     generator=torch.Generator().manual_seed(5))
            lo, hi = post.interval(0.68)
            inside = ((x >= lo) & (x <= hi)).numpy()
            cover = (float(inside.mean()), float(inside[hole].mean()), float(inside[mask].mean()))
            results["rows"].append({"masked_fraction": frac, "prior": name, "mse_vae": mse_v, "mse_wiener": mse_w,
                                    "ratio": mse_v / mse_w, "coverage_all_holes_observed": cover})
            print(f"{frac:6.0%} {name:>8} | {mse_v:8.4f} {mse_w:10.4f} {mse_v / mse_w:6.3f} | "
                  + " / ".join(f"{c:.2f}" for c in cover))
    results["seconds"] = time.time() - start
    print(f"{results['seconds']:.0f} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
