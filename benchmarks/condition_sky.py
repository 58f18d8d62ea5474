"""Sky-level conditioning on the real IRIS 100 um sky over the weights' test regions (issue 14,
item 3, at any nside): time, how closely the conditioned component follows the data, and
whether it stays seamless where the observation ends.

The cached IRIS mosaic (the training data's map) averaged to `--nside` (pixels whose sub-pixels
all hold data), observed inside the weights' test-split patches (discs of half the patch side
around their centres; `--patches N`: N of them spread over the split) at |b| > `--bmin`, with
white noise of `--noise` times the intensity added (seeded). `condition_sky` fits every level-0
tile touching an observed pixel (one thread by default); the fitted latents are saved and loaded
back, and `ConditionedVAEDust` renders them at the same nside. Templates (`--templates`): 'iris' — the IRIS map itself (missing pixels
filled from their neighbours, smoothed to the conditioning FWHM by VAEDust), so the condition
and the observation agree on the large scales; 'bundled' — the shipped 545 GHz template,
scaled to 100 um by the model's modified black body (what a user of the default component
gets: the large scales of template and observation differ where T_d does).

Per template: wall time of the fit and of each render, fit chi^2 per observed pixel, Gauss-Newton
/ CG history, and where observed the rms of (map - observation) / sigma for the conditioned
component, for a plain VAEDust draw of the same template (the prior), and for the truth (1 by
construction); the rms of (conditioned - truth) / sigma (below 1: denoised); the rms of
ln(seed 1 / seed 2) of two conditioned renders where observed and elsewhere (small where the data
pin the map, the prior's scatter elsewhere). Seams: the rms difference of ln I between
neighbouring pixels (`roughness`), in bins of signed distance to the observed region's edge
(negative inside), for the conditioned map, the prior draw and the truth: a seam would show as a
peak at the edge. `--figure`: gnomonic zooms across an edge (observation, truth, two
conditioned renders, the prior draw) at one colour scale.

    python benchmarks/condition_sky.py --weights W [--nside 256] [--bmin 20] [--noise 0.01]
        [--patches 0] [--templates iris bundled] [--steps 5] [--json out.json] [--figure out.png]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import warnings
from pathlib import Path

import healpy as hp
import numpy as np
import pysm3.units as u
import torch

from pysm_vaedust.component import VAEDust
from pysm_vaedust.conditioning import ConditionedVAEDust, FittedLatents, condition_sky
from pysm_vaedust.cutouts import fill_invalid
from pysm_vaedust.data import file_digest
from pysm_vaedust.realsky import split_centres
from pysm_vaedust.train import TrainConfig, load_training_map
from pysm_vaedust.weights import default_weights_path, load_weights

#: 100 um in GHz
FREQ_100UM = 2997.92458 * u.GHz


def downgrade(values: np.ndarray, nside_out: int) -> np.ndarray:
    """RING map -> RING map at nside_out: means of the sub-pixels, NaN where any is NaN."""
    nside_in = hp.npix2nside(values.size)
    nest = hp.reorder(values, r2n=True).reshape(hp.nside2npix(nside_out), (nside_in // nside_out) ** 2)
    return hp.reorder(nest.mean(1), n2r=True)


def observed_region(nside: int, lon, lat, radius_deg: float, bmin: float, valid: np.ndarray) -> np.ndarray:
    mask = np.zeros(hp.nside2npix(nside), bool)
    for vec in hp.ang2vec(lon, lat, lonlat=True):
        mask[hp.query_disc(nside, vec, np.radians(radius_deg))] = True
    _, b = hp.pix2ang(nside, np.arange(len(mask)), lonlat=True)
    return mask & (np.abs(b) > bmin) & valid


def iris_observation(meta: dict, weights_path, nside: int, patches: int, bmin: float, noise: float,
                     rng: np.random.Generator):
    """The benchmark's observation: the weights' IRIS map at `nside` (uK_RJ at 100 um, NaN where
    not all sub-pixels hold data) observed in discs of half the patch side around `patches` test
    centres (0: all) at |b| > bmin, white noise `noise` x I drawn from `rng`. Returns (truth, observation
    (0 where unobserved), sigma (1 where unobserved), mask, valid, number of test patches)."""
    cfg = TrainConfig.of_weights(meta)
    iris = load_training_map(cfg.data_map, cfg.map_quantity, cfg.map_frame, cfg.mosaic_nside)
    truth_mjy = downgrade(iris.intensity, nside)
    valid = np.isfinite(truth_mjy) & (truth_mjy > 0)
    lon, lat = split_centres(meta, "test", repr(weights_path))
    if 0 < patches < len(lon):
        keep = np.unique(np.linspace(0, len(lon) - 1, patches).round().astype(int))
        lon, lat = lon[keep], lat[keep]
    mask = observed_region(nside, lon, lat, 0.5 * float(meta["geometry"]["size_deg"]), bmin, valid)
    to_uk = (1 * u.MJy / u.sr).to_value(u.uK_RJ, equivalencies=u.cmb_equivalencies(FREQ_100UM))
    truth = np.where(valid, truth_mjy, np.nan) * to_uk
    sigma = np.where(mask, noise * truth, 1.0)
    obs = np.where(mask, truth + sigma * rng.standard_normal(len(truth)), 0.0)
    print(f"IRIS at nside {nside}: {int(mask.sum())} observed pixels ({mask.mean():.1%} of the sky) in "
          f"{len(lon)} test patches at |b| > {bmin:g}, noise {noise:.0%} of I", file=sys.stderr)
    return truth, obs, sigma, mask, valid, len(lon)


#: signed distance to the observed region's edge (degrees, negative inside) of the roughness bins
EDGE_BINS_DEG = (-3.0, -1.0, -0.3, 0.0, 0.3, 1.0, 3.0, 10.0)


def edge_distance(nside: int, mask: np.ndarray, pixels: np.ndarray, nside_max: int = 512) -> np.ndarray:
    """Signed angular distance (degrees) of `pixels` to the nearest pixel on the other side of
    the mask's edge: negative inside the observed region, positive outside (the mask taken at
    nside <= `nside_max`, majority of sub-pixels, to keep the search small)."""
    from scipy.spatial import cKDTree

    vec = np.stack(hp.pix2vec(nside, pixels), 1)
    nside_d = min(nside, nside_max)
    coarse = hp.ud_grade(mask.astype(np.float64), nside_d) > 0.5 if nside_d < nside else mask
    out = np.empty(len(pixels))
    for side in (True, False):
        sel = mask[pixels] == side
        other = np.stack(hp.pix2vec(nside_d, np.flatnonzero(coarse != side)), 1)
        chord, _ = cKDTree(other).query(vec[sel])
        out[sel] = np.degrees(2 * np.arcsin(np.clip(chord / 2, 0, 1))) * (-1 if side else 1)
    return out


def roughness_by_edge_distance(nside: int, maps: dict, pixels: np.ndarray, distance: np.ndarray) -> dict:
    """{name: [rms of ln I(p) - ln I(east neighbour of p) per EDGE_BINS_DEG bin]} for maps (RING)."""
    east = hp.get_all_neighbours(nside, pixels)[4]
    out = {}
    for name, values in maps.items():
        diff = np.log(values[pixels]) - np.log(values[east])
        rows = []
        for lo, hi in zip(EDGE_BINS_DEG[:-1], EDGE_BINS_DEG[1:]):
            sel = (distance >= lo) & (distance < hi) & np.isfinite(diff)
            rows.append(float(np.sqrt(np.mean(diff[sel] ** 2))) if sel.any() else None)
        out[name] = rows
    return out


def zoom_figure(path: Path, nside: int, maps: dict, mask: np.ndarray, centre_pix: int, title: str) -> None:
    """Gnomonic 12 deg zooms of `maps` (RING, uK_RJ at 100 um) around `centre_pix`, one colour
    scale (the truth's 1-99 %), the observed region's edge drawn."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lon, lat = hp.pix2ang(nside, centre_pix, lonlat=True)
    proj = hp.projector.GnomonicProj(rot=(lon, lat), xsize=400, reso=12 * 60 / 400)
    images = {k: np.log10(proj.projmap(v, lambda x, y, z: hp.vec2pix(nside, x, y, z))) for k, v in maps.items()}
    edge = proj.projmap(mask.astype(float), lambda x, y, z: hp.vec2pix(nside, x, y, z))
    vmin, vmax = np.nanpercentile(images["truth"], [1, 99])
    fig, axes = plt.subplots(1, len(images), figsize=(3.2 * len(images), 3.6), constrained_layout=True)
    for ax, (name, img) in zip(axes, images.items()):
        im = ax.imshow(img, origin="lower", cmap="inferno", vmin=vmin, vmax=vmax, extent=(-6, 6, -6, 6))
        ax.contour(edge, levels=[0.5], colors="cyan", linewidths=0.7, extent=(-6, 6, -6, 6))
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("deg")
    fig.colorbar(im, ax=axes, shrink=0.8, label="log10 I (uK_RJ at 100 um)")
    fig.suptitle(title, fontsize=9)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--weights", default=str(default_weights_path()))
    parser.add_argument("--nside", type=int, default=256)
    parser.add_argument("--bmin", type=float, default=20.0, help="observed only where |b| > bmin (degrees)")
    parser.add_argument("--noise", type=float, default=0.01, help="noise rms as a fraction of the intensity")
    parser.add_argument("--patches", type=int, default=0,
                        help="observe only this many test patches, spread over the split (0: all)")
    parser.add_argument("--templates", nargs="+", default=["iris", "bundled"], choices=["iris", "bundled"])
    parser.add_argument("--steps", type=int, default=5, help="Gauss-Newton steps of condition_sky at most")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None)
    parser.add_argument("--figure", default=None, help="zooms across the observed edge (PNG; first template)")
    parser.add_argument("--roughness-pixels", type=int, default=400_000,
                        help="random pixels at |b| > bmin for the seam statistic")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    start = time.time()
    nside = args.nside
    meta = load_weights(args.weights).metadata
    rng = np.random.default_rng(args.seed)
    truth, obs, sigma, mask, valid, n_patches = iris_observation(meta, args.weights, nside, args.patches, args.bmin,
                                                                 args.noise, rng)
    filled = fill_invalid(np.where(valid, truth, 0.0), valid)
    filled = np.maximum(filled, 1e-3 * np.median(filled[valid]))
    templates = {"iris": {"template": filled, "template_freq": FREQ_100UM}, "bundled": {}}
    result = {"weights": str(args.weights), "weights_sha256": file_digest(args.weights), "nside": nside,
              "command": "python benchmarks/condition_sky.py " + " ".join(argv if argv is not None
                                                                                   else sys.argv[1:]),
              "bmin_deg": args.bmin, "noise_fraction": args.noise, "test_patches": n_patches,
              "gauss_newton_steps": args.steps,
              "observed_pixels": int(mask.sum()), "threads": args.threads, "templates": {}}
    obs_pix = np.flatnonzero(mask)
    outside = np.flatnonzero(~mask & (np.abs(hp.pix2ang(nside, np.arange(len(mask)), lonlat=True)[1]) > args.bmin))

    high = np.flatnonzero((np.abs(hp.pix2ang(nside, np.arange(len(mask)), lonlat=True)[1]) > args.bmin) & valid)
    sample = rng.choice(high, min(args.roughness_pixels, len(high)), replace=False)
    distance = edge_distance(nside, mask, sample)
    result["edge_bins_deg"] = list(EDGE_BINS_DEG)

    def chi(m):
        return float(np.sqrt(np.mean(((m[obs_pix] - obs[obs_pix]) / sigma[obs_pix]) ** 2)))

    for name in args.templates:
        kw = templates[name]
        tic = time.time()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            fitted = condition_sky(obs * u.uK_RJ, mask, sigma * u.uK_RJ, FREQ_100UM, nside, weights=args.weights,
                                   seed=args.seed, steps=args.steps, progress=True, **kw)
        fit_s = time.time() - tic
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "fitted.h5"
            fitted.save(path)
            fitted = FittedLatents.load(path)
        renders, render_s = {}, {}
        for label, make in (("conditioned_seed1", lambda: ConditionedVAEDust(fitted, nside=nside, seed=1, **kw)),
                            ("conditioned_seed2", lambda: ConditionedVAEDust(fitted, nside=nside, seed=2, **kw)),
                            ("prior_seed1", lambda: VAEDust(nside=nside, seed=1, weights=args.weights, **kw))):
            t = time.time()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                renders[label] = np.asarray(make().get_emission(FREQ_100UM)[0].value, dtype=np.float64)
            render_s[label] = time.time() - t
        cond, cond2, prior = renders["conditioned_seed1"], renders["conditioned_seed2"], renders["prior_seed1"]
        ln_diff = np.log(cond / cond2)
        row = {
            "fit_seconds": fit_s, "render_seconds": render_s,
            "tiles_fitted": fitted.metadata["n_tiles_fitted"], "tiles": fitted.metadata["n_tiles"],
            "n_levels": fitted.metadata["n_levels"],
            "chi2_per_pixel_fit": fitted.metadata["chi2_per_pixel"],
            "chi2_per_pixel_fit_mean_only": fitted.metadata["chi2_per_pixel_mean_only"],
            "gauss_newton": fitted.metadata["gauss_newton"],
            "rms_chi_conditioned": chi(cond), "rms_chi_conditioned_seed2": chi(cond2), "rms_chi_prior": chi(prior),
            "rms_chi_truth": chi(truth),
            "rms_conditioned_minus_truth_over_sigma": float(np.sqrt(np.mean(
                ((cond[obs_pix] - truth[obs_pix]) / sigma[obs_pix]) ** 2))),
            "rms_ln_seed1_over_seed2_observed": float(np.sqrt(np.mean(ln_diff[obs_pix] ** 2))),
            "rms_ln_seed1_over_seed2_elsewhere_above_bmin": float(np.sqrt(np.mean(ln_diff[outside] ** 2))),
            "warnings": sorted({str(w.message)[:200] for w in caught}),
            "roughness_by_edge_distance": roughness_by_edge_distance(
                nside, {"conditioned": cond, "prior": prior, "truth": np.where(valid, truth, np.nan)}, sample, distance),
        }
        if args.figure and name == args.templates[0]:
            zoom_figure(Path(args.figure), nside,
                        {"observation (masked)": np.where(mask, obs, np.nan), "truth": truth,
                         "conditioned, seed 1": cond, "conditioned, seed 2": cond2, "prior draw": prior},
                        mask, int(sample[np.argmin(np.abs(distance))]),
                        f"condition_sky at nside {nside} ({name} template), noise {args.noise:.0%} of I; cyan: "
                        "edge of the observed region")
        result["templates"][name] = row
        cg = [(h.get("cg_iterations"), h.get("cg_residual")) for h in row["gauss_newton"][1:]]
        print(f"[{name} template] condition_sky nside {nside}: {row['tiles_fitted']} of {row['tiles']} tiles, "
              f"{fit_s:.0f} s ({args.threads} thread(s)); CG (iterations, relative residual) per Gauss-Newton "
              f"step {cg}")
        print(f"[{name} template] rms (I - obs) / sigma where observed: conditioned {row['rms_chi_conditioned']:.2f} "
              f"(seed 2: {row['rms_chi_conditioned_seed2']:.2f}), prior draw {row['rms_chi_prior']:.1f}, truth "
              f"{row['rms_chi_truth']:.2f}; (conditioned - truth) / sigma "
              f"{row['rms_conditioned_minus_truth_over_sigma']:.2f}; "
              f"fit chi2/pixel {row['chi2_per_pixel_fit']:.2f}; rms ln(seed1/seed2) observed "
              f"{row['rms_ln_seed1_over_seed2_observed']:.4f}, elsewhere "
              f"{row['rms_ln_seed1_over_seed2_elsewhere_above_bmin']:.4f}", flush=True)
        print(f"[{name} template] roughness (rms ln I difference of neighbours) by distance to the edge, bins "
              f"{EDGE_BINS_DEG} deg (negative inside):")
        for label, values in row["roughness_by_edge_distance"].items():
            print(f"    {label:>12}: " + " ".join("-" if v is None else f"{v:.4f}" for v in values), flush=True)
    result["seconds"] = time.time() - start
    print(f"{result['seconds']:.0f} s")
    if args.json:
        tmp = Path(args.json).with_suffix(".json.tmp")
        tmp.write_text(json.dumps(result, indent=1))
        tmp.replace(args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
