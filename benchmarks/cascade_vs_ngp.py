"""Check VAEDust's cascade (learned level 0 + extrapolated finer levels) against the real 2.37'
north-Galactic-pole image.

The conditional VAE learns one level: 64-pixel patches of 7.5' (8 deg) conditioned on the field
at the weights' conditioning FWHM F (`normalisation.template_fwhm_deg`, 30'), so ell up to the
patch Nyquist ~1440. Finer levels (patches 4x smaller, 1.875' pixels at nside 2048, conditioned on
the field so far smoothed at F/4 = 7.5') apply the same model again by scale invariance: that is
extrapolation. The NGP image (../shared/data/planck_dust_ngp_500px.npy, ~5' beam, signal to
ell ~1500-2000) is the only real data here that resolves ell > 1500.

What is compared, on the NGP's own 500 x 500 grid of 2.37' (gnomonic about b = +90):
* VAEDust at `--nside` (2048), computed only on the pixels within ~15 deg of the pole
  (pysm3.MapDistribution), sampled (bilinearly) on a 3x finer copy of that grid, smoothed *in
  intensity* by the NGP's beam (`--beam-arcmin`, 5'), taken in log and decimated to the NGP grid;
* both images reduced the same way: ln I minus its Gaussian smoothing of F (the weights'
  normalisation), 2 pixels cut from each side (496 = 8 x 62);
* flat-sky spectra (cosine taper over 1/8 of the side): VAEDust / NGP per bin and in bands: the
  learned band 300-1440, split at ell 900 (above it the cascade's level 1 already carries most of
  the power: level 0 enters the map smoothed at F/4, a share exp(-ell^2 sigma^2) of it, 1/2 at
  ell ~900), and the extrapolated band 1440-2000 where the NGP still has signal; slopes of
  C_ell ~ ell^-a in each band; the same for VAEDust's level 0 alone (cascade=False) and for the
  unsmoothed VAEDust map (what the cascade adds beyond the NGP's beam);
* 64 non-overlapping 62-pixel (2.45 deg) cutouts of each field: per-cutout moments (rms spread,
  skewness, excess kurtosis), per-cutout band-power ratio to the NGP cutout at the same place and
  the correlation of their log band powers (does the model put power where the sky has it?), and
  Minkowski functionals V0, V1, V2 at thresholds nu x each set's std, against the NGP cutouts'
  68 % bootstrap band, beside Gaussian fields with the NGP image's own 2D power spectrum.

The NGP image file states no orientation: it is turned (one of 8 rotations / reflections) to
the one whose F-smoothing correlates best with the template VAEDust is conditioned on (r = 0.996;
the template is made from the same Planck data), so that structure can be compared in place: the
cross-correlation coefficient VAEDust x NGP per bin says how much of the real small scales the
conditional map reproduces. Caveat on the NGP at high ell: its beam-deconvolved spectrum flattens
beyond ell ~1000 (noise / CIB, or a beam narrower than 5'), so part of its power there is not dust;
`ngp_dust_share_estimate` (a power law fitted at ell 100-450 and continued: an estimate, not a
measurement) puts the dust share at ~0.3 in 1440-2000, which would make VAEDust / dust there about
3x the VAEDust / NGP ratio.

Writes <out>/cascade_vs_ngp.json and <out>/cascade_vs_ngp.png; caches nothing (~3.5 min on 2
busy cores at nside 2048 with 2 seeds: each seed's level 0 is decoded on the whole sky).

    python benchmarks/cascade_vs_ngp.py --weights runs/probe/c/w.h5      # development weights
    python benchmarks/cascade_vs_ngp.py                                   # shipped weights
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import argparse  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import healpy as hp  # noqa: E402
import numpy as np  # noqa: E402
from scipy.ndimage import gaussian_filter  # noqa: E402

from pysm3 import MapDistribution  # noqa: E402
from pysm_vaedust.fidelity import per_patch_moments as fidelity_moments  # noqa: E402
from pysm_vaedust import VAEDust  # noqa: E402
from pysm_vaedust.cutouts import flat_small_scales, tangent_basis  # noqa: E402
from pysm_vaedust.data import NGP_PIXEL_ARCMIN, file_digest, load_ngp_image, shared_data_dir  # noqa: E402
from pysm_vaedust.statistics import bootstrap_band, flat_power_spectrum, minkowski_functionals  # noqa: E402
from pysm_vaedust.weights import default_weights_path, read_weights_file  # noqa: E402

CROP = 2                 # pixels cut from each side: 500 -> 496 = 8 x 62
CUTOUT_PIXELS = 62       # 64 cutouts of 2.45 deg
OVERSAMPLE = 3           # VAEDust is sampled on a 3x finer grid, beam-smoothed, then decimated
EDGES = np.array([100, 150, 215, 300, 420, 600, 900, 1200, 1440, 1700, 2000, 2500, 3200, 4000, 4500.0])
BANDS = {"learned_300_1440": (300.0, 1440.0), "learned_level0_dominated_300_900": (300.0, 900.0),
         "learned_level1_dominated_900_1440": (900.0, 1440.0), "extrapolated_1440_2000": (1440.0, 2000.0)}
SLOPE_BANDS = {"learned_300_1440": (300.0, 1440.0), "extrapolated_1440_2000": (1440.0, 2000.0)}
SLOPE_EDGES = np.unique(np.concatenate([np.geomspace(300, 1440, 13), np.geomspace(1440, 2000, 5)]))
THRESHOLDS_NU = np.linspace(-3, 3, 13)
ZOOM = (slice(90, 190), slice(90, 190))   # 4 deg box of the 496-px images (rows, columns) for the zoom panels
N_GAUSSIAN = 4           # Gaussian fields with the NGP's own spectrum (x 64 cutouts each)


def fwhm_to_sigma(fwhm):
    return fwhm / np.sqrt(8 * np.log(2))


def grid_directions(npix: int, pixel_deg: float) -> np.ndarray:
    """Unit vectors (npix, npix, 3) of a gnomonic grid centred on b = +90 (rows along 'north',
    i.e. away from l = 180, columns along 'east'), pixel centres symmetric about the pole."""
    n0, east, north = (b[0] for b in tangent_basis(0.0, 90.0))
    off = np.radians((np.arange(npix) + 0.5 - npix / 2) * pixel_deg)
    vec = n0 + off[None, :, None] * east + off[:, None, None] * north
    return vec / np.linalg.norm(vec, axis=-1, keepdims=True)


def cutouts(image: np.ndarray, size: int = CUTOUT_PIXELS) -> np.ndarray:
    """Non-overlapping (size, size) cutouts of a square image: (k^2, size, size), k = n // size."""
    k = image.shape[0] // size
    return image[:k * size, :k * size].reshape(k, size, k, size).swapaxes(1, 2).reshape(k * k, size, size)


def reduce(log_image: np.ndarray, fwhm_deg: float) -> np.ndarray:
    """ln I minus its Gaussian smoothing of `fwhm_deg`, cropped to 496 x 496 (both fields alike)."""
    return flat_small_scales(log_image, NGP_PIXEL_ARCMIN, fwhm_deg)[CROP:-CROP, CROP:-CROP]


def vaedust_on_ngp_grid(nside: int, seed: int, npix: int, weights: str, beam_arcmin: float,
                        cascade: bool = True, progress: bool = True) -> dict:
    """VAEDust ln I on the NGP grid (npix x npix of 2.37'): {'beam': smoothed in intensity by the
    NGP beam, 'native': without}, plus the level list and timing."""
    fine_pixel = NGP_PIXEL_ARCMIN / 60 / OVERSAMPLE
    vec = grid_directions(npix * OVERSAMPLE, fine_pixel)
    radius = np.radians(0.75 * npix * NGP_PIXEL_ARCMIN / 60)   # > half-diagonal of the grid + margin
    disc = hp.query_disc(nside, np.array([0.0, 0.0, 1.0]), radius)
    start = time.time()
    component = VAEDust(nside=nside, seed=seed, weights=weights, cascade=cascade, progress=progress,
                        map_dist=MapDistribution(pixel_indices=disc, nside=nside), polarization=False)
    full = np.zeros(hp.nside2npix(nside))
    full[disc] = component.reference_map()
    seconds = time.time() - start
    fine = hp.get_interp_val(full, *hp.vec2ang(vec.reshape(-1, 3))).reshape(vec.shape[:2])
    if not fine.min() > 0:
        raise RuntimeError("the VAEDust disc does not cover the NGP grid")
    smoothed = gaussian_filter(fine, fwhm_to_sigma(beam_arcmin) / (NGP_PIXEL_ARCMIN / OVERSAMPLE), mode="reflect")
    mid = OVERSAMPLE // 2   # fine pixel whose centre is the NGP pixel's
    levels = component.renderer.levels(nside, cascade)
    coarse = grid_directions(npix, NGP_PIXEL_ARCMIN / 60).reshape(-1, 3)
    template = hp.get_interp_val(component.log_template, *hp.vec2ang(coarse)).reshape(npix, npix)
    return {"condition": pole_condition(component) if cascade else None, "log_template": template,
            "beam": np.log(smoothed[mid::OVERSAMPLE, mid::OVERSAMPLE]),
            "native": np.log(fine[mid::OVERSAMPLE, mid::OVERSAMPLE]),
            "levels": [{"index": lv.index, "factor": lv.factor, "pixel_arcmin": 60 * lv.geometry.pixel_size_deg,
                        "patch_deg": lv.geometry.size_deg, "amplitude": lv.amplitude} for lv in levels],
            "seconds": seconds}


def dihedral(image: np.ndarray, k: int, transpose: bool) -> np.ndarray:
    return np.rot90(image.T if transpose else image, k)


def orient_ngp(log_ngp: np.ndarray, log_template: np.ndarray, fwhm_deg: float) -> tuple[np.ndarray, dict]:
    """The NGP image turned (one of the 8 rotations / reflections) to match VAEDust's grid: the
    one whose smoothing at F correlates best with the template VAEDust is conditioned on (the
    image file states no orientation; the conditional model puts structure where the template
    has it, so the per-cutout comparison needs the same one)."""
    smooth = gaussian_filter(log_ngp, fwhm_to_sigma(fwhm_deg * 60) / NGP_PIXEL_ARCMIN, mode="reflect")
    inner = (slice(30, -30),) * 2
    scores = {(k, t): float(np.corrcoef(dihedral(smooth, k, t)[inner].ravel(), log_template[inner].ravel())[0, 1])
              for k in range(4) for t in (False, True)}
    (k, t), best = max(scores.items(), key=lambda kv: kv[1])
    return dihedral(log_ngp, k, t), {"rot90": k, "transposed_first": t, "correlation_with_template": best,
                                     "next_best_correlation": sorted(scores.values())[-2]}


def pole_condition(component) -> dict:
    """Where the NGP sits in the model's condition space: the level-0 condition's brightness
    plane at the pole (in the training set's standard deviations) and the share of |b| > 15 deg
    level-0 tiles that are fainter; the rms of the condition's structure plane there."""
    gen, level = component.renderer, component.renderer.levels(component.nside)[0]
    lat = hp.pix2ang(level.tile_nside, np.arange(level.n_tiles), lonlat=True)[1]
    tiles = np.flatnonzero(np.abs(lat) > 15)
    cond = gen.conditions(level, component.log_template, tiles)
    pole = gen.conditions(level, component.log_template, np.array([hp.ang2pix(level.tile_nside, 0.0, 90.0, lonlat=True)]))
    return {"brightness_sigma": float(pole[0, 1, 0, 0]),
            "fraction_of_high_latitude_tiles_fainter": float(np.mean(cond[:, 1, 0, 0] < pole[0, 1, 0, 0])),
            "structure_rms": float(pole[0, 0].std()),
            "structure_rms_high_latitude_median": float(np.median(cond[:, 0].std(axis=(1, 2))))}


def gaussian_like(image: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """(n, N, N) Gaussian fields whose expected periodogram is the image's (random phases)."""
    amplitude = np.abs(np.fft.fft2(image - image.mean()))
    white = rng.standard_normal((n,) + image.shape)
    return np.fft.ifft2(np.fft.fft2(white, norm="ortho") * amplitude).real  # Hermitian product: real


def spectrum(fields, edges) -> np.ndarray:
    """Mean binned flat-sky C_ell over fields (..., N, N)."""
    cl = flat_power_spectrum(np.asarray(fields), NGP_PIXEL_ARCMIN / 60, edges)[1]
    return cl.reshape(-1, len(edges) - 1).mean(0)


def slope(fields, lo: float, hi: float, beam_arcmin: float = 0.0) -> float:
    """a of C_ell ~ ell^-a fitted to the mean spectrum of `fields` on SLOPE_EDGES within [lo, hi]
    (divided by a Gaussian beam's B_ell^2 when `beam_arcmin`)."""
    ell, cl = flat_power_spectrum(np.asarray(fields), NGP_PIXEL_ARCMIN / 60, SLOPE_EDGES)
    cl = cl.reshape(-1, len(ell)).mean(0) * np.exp((ell * np.radians(fwhm_to_sigma(beam_arcmin) / 60)) ** 2)
    sel = (ell >= lo) & (ell <= hi)
    return float(-np.polyfit(np.log(ell[sel]), np.log(cl[sel]), 1)[0])


def dust_share_estimate(log_ngp: np.ndarray, beam_arcmin: float, fit=(100.0, 450.0)) -> dict:
    """An *estimate*, not a measurement, of the dust share of the NGP image's power per EDGES bin:
    a power law fitted to its (unfiltered, beam-deconvolved) ln-image spectrum over `fit`, where
    dust dominates, continued to high ell and re-beamed, over the measured spectrum (capped at 1).
    Beyond ell ~1000 the deconvolved spectrum flattens (noise, CIB, or a beam narrower than
    assumed): the rest is what this estimate calls non-dust."""
    edges = np.geomspace(fit[0], fit[1], 7)
    ell, cl = flat_power_spectrum(log_ngp, NGP_PIXEL_ARCMIN / 60, edges)
    sigma = np.radians(fwhm_to_sigma(beam_arcmin) / 60)
    a, log_amp = np.polyfit(np.log(ell), np.log(cl * np.exp((ell * sigma) ** 2)), 1)
    ell_b, cl_b = flat_power_spectrum(log_ngp, NGP_PIXEL_ARCMIN / 60, EDGES)
    model = np.exp(log_amp) * ell_b ** a * np.exp(-(ell_b * sigma) ** 2)
    return {"fit_ell": list(fit), "slope": float(-a), "share": np.minimum(model / cl_b, 1.0)}


def band_powers(fields) -> dict:
    """{band: mean C_ell over the band's modes} of the mean over fields."""
    return {name: float(spectrum(fields, np.array(b))[0]) for name, b in BANDS.items()}


def per_patch_moments(patches: np.ndarray, n_boot: int = 200, seed: int = 0) -> dict:
    """rms_cv, skewness_mean, kurtosis_median of the cutouts with their 16-84 % bootstrap bands
    (`pysm_vaedust.fidelity.per_patch_moments`), bands as lists for the JSON."""
    return {key: {"value": entry["value"], "band": [float(v) for v in entry["band"]]}
            for key, entry in fidelity_moments(patches, n_boot, seed).items()}


def minkowski(patches: np.ndarray) -> dict:
    """Per-cutout V0, V1 (1/rad), V2 (1/sr) at THRESHOLDS_NU x the set's std (set mean removed)."""
    x = np.asarray(patches, dtype=float)
    return minkowski_functionals(x - x.mean(), THRESHOLDS_NU * x.std(), NGP_PIXEL_ARCMIN / 60)


def compare_minkowski(mf: dict, reference_band: dict) -> dict:
    """Share of thresholds where the set's mean MF lies inside the NGP's 68 % bootstrap band, and
    the rms over thresholds of (mean - NGP mean) / half-width of that band."""
    out = {}
    for k, (ref_mean, lo, hi) in reference_band.items():
        mean = mf[k].mean(0)
        half = np.maximum((hi - lo) / 2, 1e-30)
        out[k] = {"inside_fraction": float(np.mean((mean >= lo) & (mean <= hi))),
                  "rms_z": float(np.sqrt(np.mean(((mean - ref_mean) / half) ** 2)))}
    return out


def cutout_amplitudes(model_cutouts: np.ndarray, ngp_cutouts: np.ndarray, n_seeds: int) -> dict:
    """Per-cutout band power of the model over that of the NGP cutout at the same place: median,
    16-84 % range, and the Pearson correlation of log band powers (model vs NGP) over cutouts."""
    bands = {k: BANDS[k] for k in ("learned_300_1440", "extrapolated_1440_2000")}
    out = {}
    for name, (lo, hi) in bands.items():
        edges = np.array([lo, hi])
        p_ngp = flat_power_spectrum(ngp_cutouts, NGP_PIXEL_ARCMIN / 60, edges)[1][:, 0]
        p_mod = flat_power_spectrum(model_cutouts, NGP_PIXEL_ARCMIN / 60, edges)[1][:, 0]
        ratio = p_mod / np.tile(p_ngp, n_seeds)
        corr = np.corrcoef(np.log(p_mod), np.log(np.tile(p_ngp, n_seeds)))[0, 1]
        out[name] = {"median_ratio": float(np.median(ratio)),
                     "ratio_16_84": [float(v) for v in np.percentile(ratio, (16, 84))],
                     "log_power_correlation": float(corr)}
    return out


def make_figure(path: Path, r: dict, images: dict, mfs: dict, mf_band: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ell = np.array(r["ell"])
    cl = {k: np.array(v) for k, v in r["cl"].items()}
    from matplotlib.ticker import FixedLocator, NullFormatter, ScalarFormatter

    fig = plt.figure(figsize=(18, 8.6))
    upper, lower = fig.subfigures(2, 1, height_ratios=[1, 0.78])
    top = list(upper.subplots(1, 3, gridspec_kw={"wspace": 0.3}))
    bottom = list(lower.subplots(1, len(images), gridspec_kw={"wspace": 0.25}))

    def ell_axis(a):
        a.set_xscale("log")
        a.xaxis.set_major_locator(FixedLocator([100, 300, 1000, 3000]))
        a.xaxis.set_major_formatter(ScalarFormatter())
        a.xaxis.set_minor_formatter(NullFormatter())
        a.set_xlabel(r"$\ell$")

    a = top[0]
    a.loglog(ell, cl["ngp"], "k.-", lw=2, label="NGP image (real, ~5' beam)")
    a.loglog(ell, cl["vaedust"], "r.-", label=f"VAEDust nside {r['nside']}, x {r['beam_arcmin']:g}' beam")
    a.loglog(ell, cl["vaedust_native"], "r:", label="VAEDust, no beam")
    if "vaedust_level0" in cl:
        a.loglog(ell, cl["vaedust_level0"], "m--", label="VAEDust level 0 only, x beam")
    a.loglog(ell, cl["gaussian"], "c-", alpha=0.5, label="Gaussian, NGP's spectrum")
    for x in (300, 1440, 2000):
        a.axvline(x, color="grey", ls=":")
    ell_axis(a)
    a.set_ylabel(r"$C_\ell$ of ln I $-$ [ln I]$_{%g'}$ (sr)" % (60 * r["template_fwhm_deg"]))
    a.set_title("flat-sky spectra on the NGP grid (19.6 deg)")
    a.legend(fontsize=8)
    a = top[1]
    a.semilogx(ell, np.array(r["ratio_per_bin"]["vaedust"]), "r.-", label="VAEDust (cascade) / NGP")
    if "vaedust_level0" in r["ratio_per_bin"]:
        a.semilogx(ell, np.array(r["ratio_per_bin"]["vaedust_level0"]), "m.--", label="level 0 only / NGP")
    d = r["ngp_dust_share_estimate"]
    shown = np.array(d["per_bin"]) >= 0.15   # where the estimate still leaves the dust a fair share
    a.semilogx(ell[shown], np.array(d["vaedust_ratio_to_dust_estimate"])[shown], "r:", alpha=0.7,
               label=f"VAEDust / NGP's dust if ell^-{d['power_law_slope']:.1f} goes on (an estimate)")
    a.axhline(1, color="k", lw=0.8)
    a.axhspan(0.9, 1.1, color="g", alpha=0.15)
    a.axvspan(300, 1440, color="y", alpha=0.2, label="learned (level-0 patch Nyquist 1440)")
    a.axvspan(1440, 2000, color="orange", alpha=0.2, label="extrapolated, NGP has signal")
    a.axvline(900, color="grey", ls="--", lw=0.8)
    a.text(910, 0.97, "level 1 > level 0 ->", fontsize=7, color="grey", va="top", transform=a.get_xaxis_transform())
    a.set_yscale("log")
    ell_axis(a)
    a.set_ylabel(r"$C_\ell$ / $C_\ell$(NGP), both with the NGP beam")
    b = r["band_ratio"]["vaedust"]
    a.set_title(f"ratio: learned {b['learned_300_1440']:.2f}, extrapolated {b['extrapolated_1440_2000']:.2f}")
    a.legend(fontsize=8)
    a = top[2]
    nu = THRESHOLDS_NU
    ref_mean, lo, hi = mf_band["v2"]
    a.fill_between(nu, lo, hi, color="k", alpha=0.25, label="NGP cutouts, 68 % bootstrap")
    a.plot(nu, ref_mean, "k-")
    a.plot(nu, mfs["vaedust"]["v2"].mean(0), "r.-", label="VAEDust cutouts")
    a.plot(nu, mfs["gaussian"]["v2"].mean(0), "c.-", label="Gaussian, NGP's spectrum")
    a.set_xlabel(r"threshold $\nu$ (x set std)")
    a.set_ylabel("V2 (1/sr)")
    a.set_title("Euler characteristic density, 64 cutouts of 2.45 deg")
    a.legend(fontsize=8)
    lim = np.percentile(np.abs(next(iter(images.values()))), 99.5)   # the NGP sets the scale
    for a, (name, img) in zip(bottom, images.items()):
        box = ZOOM if name.startswith("zoom") else (slice(None),) * 2
        x = (np.array([box[1].start or 0, box[1].stop or img.shape[1]]) - img.shape[1] / 2) * NGP_PIXEL_ARCMIN / 60
        y = (np.array([box[0].start or 0, box[0].stop or img.shape[0]]) - img.shape[0] / 2) * NGP_PIXEL_ARCMIN / 60
        im = a.imshow(img[box], origin="lower", cmap="RdBu_r", vmin=-lim, vmax=lim, extent=[*x, *y])
        a.set_title(name, fontsize=9)
        a.set_xlabel("deg")
        if a is bottom[0]:
            a.add_patch(plt.Rectangle(((ZOOM[1].start - img.shape[1] / 2) * NGP_PIXEL_ARCMIN / 60,
                                       (ZOOM[0].start - img.shape[0] / 2) * NGP_PIXEL_ARCMIN / 60),
                                      (ZOOM[1].stop - ZOOM[1].start) * NGP_PIXEL_ARCMIN / 60,
                                      (ZOOM[0].stop - ZOOM[0].start) * NGP_PIXEL_ARCMIN / 60, fill=False, ec="k"))
        if 0 < bottom.index(a) and box[0].start is None:
            a.tick_params(labelleft=False)
    lower.colorbar(im, ax=bottom, shrink=0.8, pad=0.01, label="ln I - [ln I]_F (one colour scale: the NGP's)")
    fig.suptitle(f"VAEDust cascade vs the 2.37' NGP image: weights {r['weights']['path']}", fontsize=11, y=1.01)
    fig.savefig(path, dpi=80, bbox_inches="tight")
    plt.close(fig)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nside", type=int, default=2048)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--weights", default=None, help="weights file (default: the shipped weights)")
    parser.add_argument("--beam-arcmin", type=float, default=5.0, help="the NGP image's beam, applied to VAEDust")
    parser.add_argument("--no-level0", action="store_true", help="skip the level-0-only (cascade=False) map")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default="benchmarks/cascade_vs_ngp")
    args = parser.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    start = time.time()
    weights = str(args.weights or default_weights_path())
    meta = read_weights_file(weights)[0]
    fwhm = float(meta["normalisation"]["template_fwhm_deg"])
    ngp_raw = np.log(load_ngp_image())
    npix = ngp_raw.shape[0]
    runs = [vaedust_on_ngp_grid(args.nside, s, npix, weights, args.beam_arcmin) for s in args.seeds]
    ngp_raw, orientation = orient_ngp(ngp_raw, runs[0]["log_template"], fwhm)
    ngp = reduce(ngp_raw, fwhm)
    fields = {"vaedust": np.stack([reduce(r["beam"], fwhm) for r in runs]),
              "vaedust_native": np.stack([reduce(r["native"], fwhm) for r in runs])}
    level0 = None
    if not args.no_level0:
        level0 = vaedust_on_ngp_grid(args.nside, args.seeds[0], npix, weights, args.beam_arcmin, cascade=False)
        fields["vaedust_level0"] = reduce(level0["beam"], fwhm)[None]
    fields["gaussian"] = gaussian_like(ngp, N_GAUSSIAN, np.random.default_rng(0))

    ell, cl_ngp = flat_power_spectrum(ngp, NGP_PIXEL_ARCMIN / 60, EDGES)
    cl = {"ngp": cl_ngp, **{k: spectrum(v, EDGES) for k, v in fields.items()}}
    bp_ngp = band_powers(ngp)
    # the NGP is the sky the template was made from: how much of its actual small scales does the
    # conditional map reproduce, per bin (r = C_ell^cross / sqrt(C_ell^model C_ell^NGP), mean over seeds)
    cross = {}
    for k in ("vaedust", "vaedust_level0"):
        if k in fields:
            c_x = flat_power_spectrum(fields[k], NGP_PIXEL_ARCMIN / 60, EDGES, other=np.broadcast_to(ngp, fields[k].shape))[1]
            c_m = flat_power_spectrum(fields[k], NGP_PIXEL_ARCMIN / 60, EDGES)[1]
            cross[k] = (c_x / np.sqrt(c_m * cl_ngp)).mean(0).tolist()
    band_ratio = {k: {b: band_powers(v)[b] / bp_ngp[b] for b in BANDS} for k, v in fields.items() if k != "gaussian"}
    band_ratio["vaedust_per_seed"] = [{b: band_powers(f)[b] / bp_ngp[b] for b in BANDS} for f in fields["vaedust"]]
    for v in [*band_ratio.values(), *band_ratio["vaedust_per_seed"]]:
        if isinstance(v, dict):
            v["extrapolated_over_learned"] = v["extrapolated_1440_2000"] / v["learned_300_1440"]
    slopes = {k: {b: slope(v, *lim) for b, lim in SLOPE_BANDS.items()} for k, v in [("ngp", ngp), *fields.items()]}
    # without the F high-pass (which flattens C_ell below ~600): what the cascade's slope should be
    crop = (slice(CROP, -CROP),) * 2
    unfiltered = {"ngp": ngp_raw[crop], "vaedust": np.stack([r["beam"][crop] for r in runs])}
    slopes_unfiltered = {k: {b: slope(v, *lim) for b, lim in SLOPE_BANDS.items()} for k, v in unfiltered.items()}
    dust = dust_share_estimate(unfiltered["ngp"], args.beam_arcmin)
    slopes_unfiltered["ngp_beam_deconvolved"] = {b: slope(unfiltered["ngp"], *lim, args.beam_arcmin)
                                                 for b, lim in SLOPE_BANDS.items()}

    ngp_cut = cutouts(ngp)
    sets = {"ngp": ngp_cut, "vaedust": np.concatenate([cutouts(f) for f in fields["vaedust"]]),
            "gaussian": np.concatenate([cutouts(f) for f in fields["gaussian"]])}
    if level0 is not None:
        sets["vaedust_level0"] = cutouts(fields["vaedust_level0"][0])
    moments = {k: per_patch_moments(v) for k, v in sets.items()}
    mfs = {k: minkowski(v) for k, v in sets.items()}
    mf_band = {k: bootstrap_band(v, n_boot=200, seed=0) for k, v in mfs["ngp"].items()}
    mf_compare = {k: compare_minkowski(mfs[k], mf_band) for k in sets if k != "ngp"}
    amplitudes = {"vaedust": cutout_amplitudes(sets["vaedust"], ngp_cut, len(args.seeds))}
    if level0 is not None:
        amplitudes["vaedust_level0"] = cutout_amplitudes(sets["vaedust_level0"], ngp_cut, 1)
    amplitudes["gaussian"] = cutout_amplitudes(sets["gaussian"], ngp_cut, N_GAUSSIAN)

    ngp_path = shared_data_dir() / "planck_dust_ngp_500px.npy"
    result = {
        "command": " ".join([Path(sys.argv[0]).name] + (argv if argv is not None else sys.argv[1:])),
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "weights": {"path": weights, "sha256": file_digest(weights),
                    "spectral_slope": meta["spectral_slope"]["slope"],
                    "best_epoch": meta.get("metrics", {}).get("best_epoch")},
        "ngp": {"file": ngp_path.name, "sha256": file_digest(ngp_path), "pixel_arcmin": NGP_PIXEL_ARCMIN,
                "grid": [npix - 2 * CROP] * 2, "orientation": orientation},
        "nside": args.nside, "seeds": args.seeds, "levels": runs[0]["levels"],
        "template_fwhm_deg": fwhm, "beam_arcmin": args.beam_arcmin,
        "reduction": (f"ln I minus its Gaussian smoothing of {60 * fwhm:g}' (the weights' template_fwhm_deg); "
                      f"VAEDust smoothed in intensity by a {args.beam_arcmin:g}' Gaussian (the NGP's beam) "
                      f"before the log; 'vaedust_native' without; cosine taper over 1/8 of the side"),
        "level0_share_note": "in the cascade map level 0 enters smoothed at F/4 = 7.5': its share of the power "
                             "is exp(-ell^2 sigma^2) (1/2 at ell ~ 900); above, level 1 (extrapolated) dominates",
        "ell": ell.tolist(), "ell_edges": EDGES.tolist(),
        "cl": {k: v.tolist() for k, v in cl.items()},
        "ratio_per_bin": {k: (cl[k] / cl_ngp).tolist() for k in fields},
        "ratio_note": "vaedust, vaedust_level0, gaussian: like for like (the NGP's beam applied); vaedust_native "
                      "is the map without the beam over the beam-smoothed NGP: what the cascade adds, not a match",
        "minkowski_note": "thresholds nu x each set's own std: V0-V2 compare morphology, not amplitude",
        "cross_correlation_with_ngp": cross,
        "ngp_dust_share_estimate": {"per_bin": dust["share"].tolist(), "power_law_slope": dust["slope"],
                                    "fit_ell": dust["fit_ell"],
                                    "vaedust_ratio_to_dust_estimate": (cl["vaedust"] / cl_ngp / dust["share"]).tolist(),
                                    "note": "an estimate: a power law fitted to the NGP's beam-deconvolved ln-image "
                                            "spectrum at ell 100-450, continued; not a measurement of the dust"},
        "bands": {k: list(v) for k, v in BANDS.items()},
        "band_power_ngp": bp_ngp, "band_ratio": band_ratio, "slopes": slopes,
        "slopes_unfiltered_ln_I": slopes_unfiltered,
        "cascade_slope_in_weights": meta["spectral_slope"],
        "condition_at_pole": runs[0]["condition"],
        "cutouts": {"pixels": CUTOUT_PIXELS, "count": {k: len(v) for k, v in sets.items()},
                    "moments": moments, "band_power_vs_ngp_cutout": amplitudes,
                    "minkowski_thresholds_nu": THRESHOLDS_NU.tolist(),
                    "minkowski_ngp_band": {k: {"mean": m.tolist(), "lo": lo.tolist(), "hi": hi.tolist()}
                                           for k, (m, lo, hi) in mf_band.items()},
                    "minkowski_mean": {s: {k: v.mean(0).tolist() for k, v in mfs[s].items()} for s in mfs},
                    "minkowski_vs_ngp": mf_compare},
        "seconds": {"vaedust_per_seed": [r["seconds"] for r in runs],
                    "level0": None if level0 is None else level0["seconds"], "total": time.time() - start},
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result["seconds"]["total"] = time.time() - start
    (out / "cascade_vs_ngp.json").write_text(json.dumps(result, indent=1))
    images = {"NGP (real), ln I - [ln I]_30'": ngp,
              f"VAEDust seed {args.seeds[0]}, nside {args.nside}, x {args.beam_arcmin:g}' beam": fields["vaedust"][0],
              "Gaussian field, NGP's own spectrum": fields["gaussian"][0],
              "zoom (box): NGP": ngp,
              f"zoom: VAEDust seed {args.seeds[0]}, no beam": fields["vaedust_native"][0]}
    make_figure(out / "cascade_vs_ngp.png", result, images, mfs, mf_band)

    print(f"NGP orientation {orientation}")
    print(f"weights {weights}; F = {60 * fwhm:g}'; levels "
          + ", ".join(f"{lv['index']}: {lv['pixel_arcmin']:.3g}' x{lv['amplitude']:.3f}" for lv in result["levels"]))
    print("   ell " + " ".join(f"{k:>15s}" for k in result["ratio_per_bin"]) + "  r(vaedust, NGP)  NGP dust share (est.)")
    for i, e in enumerate(ell):
        print(f"{e:6.0f} " + " ".join(f"{result['ratio_per_bin'][k][i]:15.3f}" for k in result["ratio_per_bin"])
              + f"  {cross['vaedust'][i]:15.3f}  {dust['share'][i]:10.2f}")
    print(f"NGP power-law fit ell {dust['fit_ell']}: slope {dust['slope']:.2f} (beam-deconvolved, unfiltered ln I)")
    for k, v in band_ratio.items():
        for i, row in enumerate(v if isinstance(v, list) else [v]):
            print(f"{k}{f' seed {args.seeds[i]}' if isinstance(v, list) else ''}: band ratio to NGP "
                  + ", ".join(f"{b} {x:.3f}" for b, x in row.items()))
    for k, v in slopes.items():
        print(f"slope {k}: " + ", ".join(f"{b} {x:.2f}" for b, x in v.items()))
    for k, v in slopes_unfiltered.items():
        print(f"slope of ln I without the {60 * fwhm:g}' high-pass, {k}: " + ", ".join(f"{b} {x:.2f}" for b, x in v.items()))
    print(f"cascade slope in the weights {meta['spectral_slope']['slope']:.3f}; condition at the pole {runs[0]['condition']}")
    for name in ("rms_cv", "skewness_mean", "kurtosis_median"):
        e = moments["ngp"][name]
        print(f"{name}: NGP {e['value']:.3f} [{e['band'][0]:.3f}, {e['band'][1]:.3f}]  "
              + "  ".join(f"{k} {moments[k][name]['value']:.3f}" for k in sets if k != "ngp"))
    for k, v in mf_compare.items():
        print(f"MF inside NGP band, {k}: " + ", ".join(f"{m} {x['inside_fraction']:.2f} (rms z {x['rms_z']:.1f})"
                                                       for m, x in v.items()))
    for k, v in amplitudes.items():
        print(f"cutout band power / NGP cutout, {k}: " + "; ".join(
            f"{b} median {x['median_ratio']:.2f} [{x['ratio_16_84'][0]:.2f}, {x['ratio_16_84'][1]:.2f}] "
            f"corr {x['log_power_correlation']:.2f}" for b, x in v.items()))
    print(f"seconds {result['seconds']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
