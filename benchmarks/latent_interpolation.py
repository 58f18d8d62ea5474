"""Semantic interpolation (issue 22; the DustVAEder seed's figure): two test patches' whitened
latents (`ConditionalVAE.encode`, the posterior means) joined by a spherical linear interpolation
(slerp), each step decoded under the first patch's condition c. Shows how much of a patch the
latents hold: with weights whose latents carry little, every column looks alike.

Each row is one pair of test patches: the real patch A, the decoded steps t = 0 ... 1, the real
patch B (its own condition), in ln I small scales (normalised units, one colour scale per row).
Also prints, per row, the rms of the change between t = 0 and t = 1 over the rms of the decoded
patch at t = 0.

    python benchmarks/latent_interpolation.py [--weights W.h5] [--pairs 3] [--steps 7]
        [--sets-cache ~/.cache/pysm_vaedust/sets_0.049704.pt] [--figure docs/figures/latent_slerp.png]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from pysm_vaedust.figures import save_png
from pysm_vaedust.train import datasets_of_weights
from pysm_vaedust.weights import default_weights_path, load_weights


def slerp(a: torch.Tensor, b: torch.Tensor, t: float) -> torch.Tensor:
    """Spherical linear interpolation between latent vectors a and b (D,) at t in [0, 1]."""
    cos = torch.clamp(torch.dot(a, b) / (a.norm() * b.norm()), -1.0, 1.0)
    omega = torch.arccos(cos)
    if float(omega) < 1e-6:
        return (1 - t) * a + t * b
    return (torch.sin((1 - t) * omega) * a + torch.sin(t * omega) * b) / torch.sin(omega)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--weights", default=str(default_weights_path()))
    parser.add_argument("--pairs", type=int, default=3)
    parser.add_argument("--steps", type=int, default=7)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--sets-cache", default=None)
    parser.add_argument("--figure", default="docs/figures/latent_slerp.png")
    args = parser.parse_args(argv)
    weights = load_weights(args.weights)
    vae = weights.vae.eval()
    x, c = datasets_of_weights(weights.metadata, args.sets_cache)["test"]
    rows = np.random.default_rng(args.seed).choice(len(x), 2 * args.pairs, replace=False).reshape(-1, 2)
    ts = np.linspace(0.0, 1.0, args.steps)
    from matplotlib.figure import Figure

    fig = Figure(figsize=(1.15 * (args.steps + 2), 1.3 * args.pairs + 0.3), constrained_layout=True)
    axes = fig.subplots(args.pairs, args.steps + 2, squeeze=False)
    with torch.no_grad():
        for r, (i, j) in enumerate(rows):
            z = vae.encode(torch.cat([x[[i]], x[[j]]]), torch.cat([c[[i]], c[[i]]]))
            path = torch.cat([vae.decode(slerp(z[0], z[1], float(t))[None], c[[i]]) for t in ts])[:, 0].numpy()
            change = np.sqrt(np.mean((path[-1] - path[0]) ** 2)) / np.sqrt(np.mean(path[0] ** 2))
            print(f"pair {r}: test patches {i} / {j}: rms change t 0 -> 1 over rms at t 0: {change:.2f}")
            panels = [x[i, 0].numpy(), *path, x[j, 0].numpy()]
            limit = np.percentile(np.abs(np.concatenate([p.ravel() for p in panels])), 99)
            titles = ["real A"] + [f"t = {t:.2f}" for t in ts] + ["real B (own c)"]
            for ax, image, title in zip(axes[r], panels, titles):
                ax.imshow(image, origin="lower", cmap="inferno", vmin=-limit, vmax=limit, interpolation="nearest")
                ax.set_xticks([])
                ax.set_yticks([])
                if r == 0:
                    ax.set_title(title, fontsize=7)
    fig.suptitle("slerp between two test patches' whitened latents, decoded under patch A's condition "
                 "(ln I small scales, 8 deg)", fontsize=8)
    print(f"wrote {save_png(fig, Path(args.figure))}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
