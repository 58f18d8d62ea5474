"""Patch-level inpainting with the conditional VAE against the Gaussian (Wiener) baseline with the
same coarse input, on the IRIS test split (issue 14, item 2).

Cases: masks of random 1-degree holes (`wiener.block_mask` on the 8 x 8 grid of 1-degree cells of
a 64 px patch of 7.5') and of random pixels, each at the masked fractions `--fractions`; white
noise at 10 % of each patch's rms (of x, the normalised small scales). `--patches` test-split
patches spread over the split (the same ones in every case), each seeded case drawing its own
masks and noise. Per case:

* VAE: `map_fit` (restarts: zero and the encoder), the MAP point estimate
  `conditional_mean` (decoder mean + Wiener mean of the decoder noise), and the posterior mean
  of `--samples` constrained realizations from `posterior_samples` (`--sampler` laplace or
  mala, from that fit), their central 68 % interval per pixel;
* Wiener: `wiener.ConditionalGaussian` fitted on the training split (x | c Gaussian, mean
  linear in c's structure channel through an 11 x 11 kernel, residual stationary covariance),
  its Wiener mean and posterior std (68 % interval: mean +- 0.994 std); the plain
  `StationaryGaussian` (no c) beside it for reference;
* the two models' predictions from c alone: the VAE decoder mean at eps = 0 and m(c).

Numbers: masked-pixel MSE (normalised units) of each predictor, pooled over the patches; the
ratio VAE / conditional Wiener with a 68 % bootstrap range over patches (target < 0.9); the
coverage of the truth by the 68 % intervals in the holes and in the observed pixels (target
55-80 %). Figure: of the test patches in the top decile of structure-tensor coherence, the one
with the strongest bright ridge, a 1-degree hole centred on it (plus the 30 % hole mask): truth,
data, VAE posterior mean, two posterior draws, conditional Wiener, one colour scale.

    python benchmarks/conditioning_vs_wiener.py --weights W [--patches 12] [--json out.json]
        [--figure docs/figures/inpainting.png] [--sets-cache runs/bench/sets.pt] [--vae-cache runs/bench]

The test and training splits come from `train.datasets_of_weights` (minutes from the cached IRIS
mosaic); `--sets-cache` keeps them in a file, reused only when its normalisation and split counts
are the weights'.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from pysm_vaedust.conditioning import block_mask, conditional_mean, map_fit, posterior_samples
from pysm_vaedust.data import file_digest
from pysm_vaedust.morphology import structure_tensor_statistics
from pysm_vaedust.train import datasets_of_weights
from pysm_vaedust.weights import default_weights_path, load_weights
from pysm_vaedust.wiener import ConditionalGaussian, StationaryGaussian

NOISE_FRACTION = 0.1
HOLE_DEG = 1.0
#: half-width of a Gaussian 68 % interval in standard deviations
Z68 = 0.9944578832097535


def pixel_mask(fraction: float, rng: np.random.Generator, n: int) -> np.ndarray:
    """(n, n) bool, True = observed, with round(fraction n^2) random pixels masked."""
    mask = np.ones(n * n, bool)
    mask[rng.choice(n * n, int(round(fraction * n * n)), replace=False)] = False
    return mask.reshape(n, n)


def make_masks(kind: str, fraction: float, rng, count: int, n: int, block: int) -> np.ndarray:
    if kind == "holes":
        return np.stack([block_mask(fraction, rng, n, block) for _ in range(count)])[:, None]
    return np.stack([pixel_mask(fraction, rng, n) for _ in range(count)])[:, None]


def observe(x: np.ndarray, mask: np.ndarray, rng) -> tuple[np.ndarray, np.ndarray]:
    """(d, sigma) of patches x (B, 1, n, n): white noise of NOISE_FRACTION x each patch's rms."""
    sigma = NOISE_FRACTION * x.reshape(len(x), -1).std(1)[:, None, None, None] * np.ones(mask.shape)
    d = (x + rng.standard_normal(x.shape) * sigma).astype(np.float32)
    return np.where(mask, d, np.nan).astype(np.float32), sigma


def run_vae(vae, d, mask, sigma, c, args, seed: int) -> dict:
    """MAP estimate, posterior mean, 68 % interval and two draws of B patches, in batches."""
    out = {key: [] for key in ("map", "mean", "lo", "hi", "draws", "converged", "acceptance")}
    for start in range(0, len(d), args.batch):
        sl = slice(start, start + args.batch)
        gen = torch.Generator().manual_seed(seed + start)
        fit = map_fit(vae, d[sl], mask[sl], sigma[sl], c[sl], n_restarts=args.restarts, steps=args.steps,
                      generator=gen)
        post = posterior_samples(vae, d[sl], mask[sl], sigma[sl], c[sl], n_samples=args.samples,
                                 method=args.sampler, fit=fit, mala_steps=args.mala_steps, generator=gen)
        lo, hi = post.interval(0.68)
        for key, value in (("map", conditional_mean(vae, fit)), ("mean", post.mean), ("lo", lo), ("hi", hi),
                           ("draws", post.realizations[:2].transpose(0, 1)), ("converged", fit.converged)):
            out[key].append(value.numpy())
        out["acceptance"].append(post.acceptance)
    res = {key: np.concatenate(value) for key, value in out.items() if key != "acceptance"}
    acc = [a for a in out["acceptance"] if a is not None]
    res["acceptance"] = float(np.mean(acc)) if acc else None
    return res


def cached_vae(cache_dir, key: str, compute) -> dict:
    """run_vae's output, from `cache_dir`/`key`.npz when there (so that a rerun that changes only
    the baselines skips the VAE), else computed and stored there."""
    if not cache_dir:
        return compute()
    path = Path(cache_dir) / f"{key}.npz"
    if path.is_file():
        with np.load(path) as f:
            out = {name: f[name] for name in f.files}
        out["acceptance"] = None if np.isnan(out["acceptance"]) else float(out["acceptance"])
        print(f"VAE results from {path}", file=sys.stderr)
        return out
    out = compute()
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, **{k: v for k, v in out.items() if k != "acceptance"},
             acceptance=np.nan if out["acceptance"] is None else out["acceptance"])
    return out


def mse(pred, x, where) -> float:
    return float(((pred - x)[where] ** 2).mean())


def per_patch_sse(pred, x, where) -> np.ndarray:
    return (((pred - x) ** 2) * where).reshape(len(x), -1).sum(1)


def bootstrap_ratio(num: np.ndarray, den: np.ndarray, seed: int, n_boot: int = 2000) -> list[float]:
    """16th / 84th percentiles of sum(num) / sum(den) over patches resampled with replacement."""
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(num), (n_boot, len(num)))
    ratios = num[idx].sum(1) / den[idx].sum(1)
    return [float(v) for v in np.percentile(ratios, [16, 84])]


def ridge_strength(images: np.ndarray, sigma_px: float = 1.5) -> np.ndarray:
    """-(most negative Hessian eigenvalue) x sigma^2 of images (B, n, n): large on bright ridges."""
    from scipy import ndimage

    images = np.asarray(images, dtype=np.float64)
    sig = (0, sigma_px, sigma_px)
    hyy = ndimage.gaussian_filter(images, sig, order=(0, 2, 0))
    hxx = ndimage.gaussian_filter(images, sig, order=(0, 0, 2))
    hxy = ndimage.gaussian_filter(images, sig, order=(0, 1, 1))
    return -sigma_px**2 * ((hxx + hyy) / 2 - np.hypot((hxx - hyy) / 2, hxy))


def filament_case(x_all: np.ndarray, block: int, rng) -> tuple[int, np.ndarray, tuple[int, int]]:
    """The figure's patch and mask: among the test patches in the top decile of structure-tensor
    coherence (elongated structure), the one with the longest bright ridge (8-connected pixels
    of `ridge_strength` above twice its patch rms, away from the edges); its 30 % hole mask plus
    a block x block hole centred on that ridge's pixel nearest its centroid, so the filament
    runs through the hole; that centre (row, col)."""
    from scipy import ndimage

    coherence = structure_tensor_statistics(x_all[:, 0])["coherence"]
    candidates = np.flatnonzero(coherence >= np.quantile(coherence, 0.9))
    n = x_all.shape[-1]
    margin = block
    strength = ridge_strength(x_all[candidates, 0])
    best = (0, -1, (n // 2, n // 2))
    for j, img in enumerate(strength):
        on = img > 2 * np.sqrt(np.mean(img**2))
        on[:margin], on[-margin:], on[:, :margin], on[:, -margin:] = False, False, False, False
        labels, count = ndimage.label(on, structure=np.ones((3, 3)))
        if count == 0:
            continue
        sizes = np.bincount(labels.ravel())[1:]
        rows, cols = np.nonzero(labels == 1 + int(np.argmax(sizes)))
        if sizes.max() > best[0]:
            near = int(np.argmin((rows - rows.mean()) ** 2 + (cols - cols.mean()) ** 2))
            best = (int(sizes.max()), j, (int(rows[near]), int(cols[near])))
    k, (r, col) = int(candidates[best[1]]), best[2]
    mask = block_mask(0.3, rng, n, block)
    mask[r - block // 2:r + block // 2, col - block // 2:col + block // 2] = False
    return k, mask, (r, col)


def make_figure(path: Path, panels: dict, mask: np.ndarray, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    truth = panels["truth"]
    vmin, vmax = np.percentile(truth, [1, 99])
    fig, axes = plt.subplots(2, 3, figsize=(12, 8.4), constrained_layout=True)
    for ax, (name, img) in zip(axes.flat, panels.items()):
        shown = np.ma.masked_invalid(img)
        cmap = matplotlib.colormaps["inferno"].copy()
        cmap.set_bad("0.6")
        im = ax.imshow(shown, origin="lower", cmap=cmap, vmin=vmin, vmax=vmax, interpolation="nearest")
        ax.contour(~mask, levels=[0.5], colors="cyan", linewidths=0.6)
        ax.set_title(name, fontsize=10)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.colorbar(im, ax=axes, shrink=0.8, label="x (normalised small scales of ln I)")
    fig.suptitle(title, fontsize=10)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--weights", default=str(default_weights_path()))
    parser.add_argument("--patches", type=int, default=12, help="test-split patches per case")
    parser.add_argument("--fractions", type=float, nargs="+", default=[0.3, 0.5])
    parser.add_argument("--masks", nargs="+", default=["holes", "pixels"], choices=["holes", "pixels"])
    parser.add_argument("--sampler", default="laplace", choices=["laplace", "mala"])
    parser.add_argument("--samples", type=int, default=64, help="posterior draws per patch")
    parser.add_argument("--mala-steps", type=int, default=100)
    parser.add_argument("--restarts", type=int, default=2, help="map_fit starts (zero, encoder, linear, prior...)")
    parser.add_argument("--steps", type=int, default=100, help="L-BFGS iterations of map_fit")
    parser.add_argument("--batch", type=int, default=4, help="patches per fit (memory: ~0.3 GB each)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--sets-cache", default=None, help="keep the rebuilt splits in this file")
    parser.add_argument("--vae-cache", default=None, help="keep each case's VAE results in this folder")
    parser.add_argument("--figure", default=None, help="write the filament figure here (PNG)")
    parser.add_argument("--no-cases", action="store_true", help="only the figure")
    parser.add_argument("--json", default=None, help="write the numbers here")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    start = time.time()
    weights = load_weights(args.weights)
    vae = weights.vae.to(memory_format=torch.channels_last)   # as the component: ~2x faster CPU Jacobians
    n = vae.config.npix
    block = int(round(HOLE_DEG / weights.metadata["geometry"]["size_deg"] * n))
    sets = datasets_of_weights(weights.metadata, args.sets_cache)
    x_train, c_train = sets["train"]
    x_test, c_test = sets["test"]
    t0 = time.time()
    cond_wiener = ConditionalGaussian.fit(x_train, c_train)
    plain_wiener = StationaryGaussian.fit(x_train)
    explained = 1 - float((x_test - cond_wiener.mean_of(c_test)).var() / x_test.var())
    print(f"Wiener models fitted on {len(x_train)} training patches in {time.time() - t0:.0f} s; "
          f"the conditional mean explains {explained:.1%} of the test variance", file=sys.stderr)
    pick = np.unique(np.linspace(0, len(x_test) - 1, args.patches).round().astype(int))
    x, c = x_test[pick].numpy(), c_test[pick]
    results = {
        "weights": str(args.weights), "weights_sha256": file_digest(args.weights),
        "command": "python benchmarks/conditioning_vs_wiener.py "
                   + " ".join(argv if argv is not None else sys.argv[1:]),
        "test_split_patches": len(x_test), "patches": int(len(pick)), "patch_indices": pick.tolist(),
        "noise_fraction": NOISE_FRACTION, "hole_px": block, "sampler": args.sampler, "samples": args.samples,
        "mala_steps": args.mala_steps if args.sampler == "mala" else None, "restarts": args.restarts,
        "lbfgs_steps": args.steps, "conditional_mean_explained_variance": explained, "cases": [],
    }
    header = (f"{'mask':>6} {'masked':>6} | {'MSE post':>8} {'MSE MAP':>8} {'Wiener|c':>8} {'Wiener':>7} | "
              f"{'post/W|c':>8} {'68% range':>11} {'MAP/W|c':>7} | c alone: VAE, W|c | cover holes / obs: VAE, Wiener|c | s")
    lines = [f"{len(pick)} of {len(x_test)} test patches; noise {NOISE_FRACTION:.0%} of each patch rms; "
             f"{args.sampler} posterior, {args.samples} draws", header]
    if not args.no_cases:
        print(lines[0])
        print(header)
    cases = [] if args.no_cases else [(kind, frac) for kind in args.masks for frac in args.fractions]
    for k, (kind, frac) in enumerate(cases):
        t_case = time.time()
        rng = np.random.default_rng(1000 * args.seed + 100 + k)
        mask = make_masks(kind, frac, rng, len(pick), n, block)
        d, sigma = observe(x, mask, rng)
        hole = ~mask
        w_mean, w_std, _ = cond_wiener.condition(d, mask, sigma, c, std=True)
        w_mean, w_std = w_mean.numpy(), w_std.numpy()
        p_mean = plain_wiener.condition(d, mask, sigma)[0].numpy()
        w_prior = cond_wiener.mean_of(c).numpy()
        key = (f"{results['weights_sha256'][:12]}_{kind}{frac:g}_seed{args.seed}_{'-'.join(map(str, pick[:3]))}"
               f"_{len(pick)}_{args.sampler}{args.samples}_{args.mala_steps}_{args.restarts}x{args.steps}")
        vae_out = cached_vae(args.vae_cache, key,
                             lambda: run_vae(vae, d, mask, sigma, c, args, seed=1000 * args.seed + 10 * k))
        with torch.no_grad():
            vae_prior = vae.decode(torch.zeros(len(c), vae.latent_dim), c).numpy()
        inside_v = (x >= vae_out["lo"]) & (x <= vae_out["hi"])
        inside_w = np.abs(x - w_mean) <= Z68 * w_std
        sse_post, sse_w = per_patch_sse(vae_out["mean"], x, hole), per_patch_sse(w_mean, x, hole)
        row = {
            "mask": kind, "masked_fraction": frac, "masked_pixels": int(hole.sum()),
            "mse_vae_posterior_mean": mse(vae_out["mean"], x, hole), "mse_vae_map": mse(vae_out["map"], x, hole),
            "mse_wiener_conditional": mse(w_mean, x, hole), "mse_wiener_plain": mse(p_mean, x, hole),
            "mse_vae_decoder_mean_at_eps0": mse(vae_prior, x, hole),
            "mse_wiener_prior_mean": mse(w_prior, x, hole),
            "mse_prior_variance": float((x[hole] ** 2).mean()),
        }
        row["ratio_posterior_mean"] = row["mse_vae_posterior_mean"] / row["mse_wiener_conditional"]
        row["ratio_posterior_mean_68"] = bootstrap_ratio(sse_post, sse_w, seed=k)
        row["ratio_map"] = row["mse_vae_map"] / row["mse_wiener_conditional"]
        row["ratio_conditional_over_plain_wiener"] = row["mse_wiener_conditional"] / row["mse_wiener_plain"]
        row["patches_vae_better"] = int(np.sum(sse_post < sse_w))
        row["coverage_vae_holes"] = float(inside_v[hole].mean())
        row["coverage_vae_observed"] = float(inside_v[mask].mean())
        row["coverage_wiener_holes"] = float(inside_w[hole].mean())
        row["coverage_wiener_observed"] = float(inside_w[mask].mean())
        row["map_converged_fraction"] = float(vae_out["converged"].mean())
        row["mala_acceptance"] = vae_out["acceptance"]
        row["seconds"] = time.time() - t_case
        results["cases"].append(row)
        line = (f"{kind:>6} {frac:6.0%} | {row['mse_vae_posterior_mean']:8.4f} {row['mse_vae_map']:8.4f} "
                f"{row['mse_wiener_conditional']:8.4f} {row['mse_wiener_plain']:7.4f} | "
                f"{row['ratio_posterior_mean']:8.3f} {row['ratio_posterior_mean_68'][0]:5.2f}-"
                f"{row['ratio_posterior_mean_68'][1]:<5.2f} {row['ratio_map']:7.3f} | "
                f"{row['mse_vae_decoder_mean_at_eps0']:.3f}, {row['mse_wiener_prior_mean']:.3f} | "
                f"{row['coverage_vae_holes']:.2f} / {row['coverage_vae_observed']:.2f}, "
                f"{row['coverage_wiener_holes']:.2f} / {row['coverage_wiener_observed']:.2f} | {row['seconds']:.0f}")
        lines.append(line)
        print(line, flush=True)
    if args.figure:
        t_fig = time.time()
        rng = np.random.default_rng(1000 * args.seed + 7)
        k, fmask, centre = filament_case(x_test.numpy(), block, rng)
        xf, cf, mf = x_test[k:k + 1].numpy(), c_test[k:k + 1], fmask[None, None]
        d, sigma = observe(xf, mf, rng)
        vae_out = run_vae(vae, d, mf, sigma, cf, args, seed=1000 * args.seed + 99)
        w_mean = cond_wiener.condition(d, mf, sigma, cf)[0].numpy()
        hole = ~mf
        fig_row = {"test_index": k, "hole_centre_rc": centre,
                   "coherence": float(structure_tensor_statistics(xf[:, 0])["coherence"][0]),
                   "mse_vae_posterior_mean": mse(vae_out["mean"], xf, hole),
                   "mse_vae_map": mse(vae_out["map"], xf, hole),
                   "mse_wiener_conditional": mse(w_mean, xf, hole)}
        panels = {"truth": xf[0, 0], "data (masked: grey)": d[0, 0],
                  f"VAE posterior mean ({args.sampler}, {args.samples} draws)": vae_out["mean"][0, 0],
                  "VAE posterior draw 1": vae_out["draws"][0, 0, 0], "VAE posterior draw 2": vae_out["draws"][0, 1, 0],
                  "Wiener filter given c (training spectrum)": w_mean[0, 0]}
        make_figure(Path(args.figure), panels, fmask,
                    f"test patch {k} (structure-tensor coherence {fig_row['coherence']:.2f}), 30 % in 1° holes + "
                    f"one on the filament, noise 10 % rms; masked-pixel MSE: VAE mean "
                    f"{fig_row['mse_vae_posterior_mean']:.3f}, Wiener|c {fig_row['mse_wiener_conditional']:.3f}")
        fig_row["seconds"] = time.time() - t_fig
        fig_row["path"] = args.figure
        results["figure"] = fig_row
        print(f"figure {args.figure}: test patch {k}, masked-pixel MSE VAE mean "
              f"{fig_row['mse_vae_posterior_mean']:.3f} / Wiener|c {fig_row['mse_wiener_conditional']:.3f}")
    results["seconds"] = time.time() - start
    results["table"] = lines
    print(f"{results['seconds']:.0f} s")
    if args.json:
        tmp = Path(args.json).with_suffix(".json.tmp")
        tmp.write_text(json.dumps(results, indent=1))
        tmp.replace(args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
