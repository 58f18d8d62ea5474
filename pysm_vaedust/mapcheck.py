"""Stage 9 — the product's map against the real sky: full-sky spectra beside the IRIS mosaic.

One definition of the real-sky reference, used by the validation and the benchmarks:

- analysis mask: |b| > 30 deg (5 deg smoothstep), without the LMC and SMC (their discs of
  `cutouts.EXTRAGALACTIC_DISCS`) and without the mosaic's missing data grown by 3 deg (2 deg
  smoothstep on the holes);
- IRIS's zero level: IRIS = a T + delta regressed at 1 deg on that mask (T the map it is compared
  with, or the template), the reference is IRIS - delta (`zero_level`);
- IRIS's spectrum on the mask is fitted over ell 100-3000 as B_l^2 (A l^alpha + F) (`fit_dust_law`):
  A l^alpha its dust, F its noise + CIB floor (the CIB is sky, beamed like dust), B its effective
  beam. The map, scaled to IRIS's dust at ell 100-300 (units and SED cancel), is compared as
  B_l^2 (C_l(map) + F) against IRIS: the map carries dust only, the floor is added explicitly;
- in ln I only the sky where the 30'-smoothed IRIS - delta > 1.5 MJy/sr ("bright") is targeted,
  the rest ("faint") reported.

Spectra are pseudo-C_l of the apodised mask divided by its mean square (no deconvolution: the
mask is smooth and the spectra steep only where the comparison is a ratio of like with like).
"""

from __future__ import annotations

import healpy as hp
import numpy as np

from .cutouts import EXTRAGALACTIC_DISCS

#: IRIS's effective beam FWHM at 100 um measured on the mosaic's bright patches (arcmin); nominal 4.3'
IRIS_BEAM_ARCMIN = 5.1
#: ln-I comparisons only where the 30'-smoothed IRIS - delta exceeds this (MJy/sr)
BRIGHT_MJYSR = 1.5
#: bands of the comparison with IRIS (ell)
IRIS_BANDS = ((300, 600), (600, 1000), (1000, 1500))


def smoothstep(x: np.ndarray) -> np.ndarray:
    """0 below 0, 1 above 1, 3x^2 - 2x^3 between."""
    x = np.clip(x, 0.0, 1.0)
    return x * x * (3 - 2 * x)


def distance_to(nside: int, bad: np.ndarray) -> np.ndarray:
    """Angular distance (deg) from every pixel of `nside` to the nearest True pixel of `bad`
    ((npix,) bool at the same nside; at least one True)."""
    from scipy.spatial import cKDTree

    vec = np.stack(hp.pix2vec(nside, np.arange(hp.nside2npix(nside))), 1)
    chord, _ = cKDTree(vec[bad]).query(vec)
    return np.degrees(2 * np.arcsin(np.clip(chord / 2, 0, 1)))


def analysis_mask(nside: int, missing: np.ndarray | None = None, lat_min_deg: float = 30.0,
                  lat_taper_deg: float = 5.0, hole_grow_deg: float = 3.0, hole_taper_deg: float = 2.0) -> np.ndarray:
    """Apodised analysis mask (npix,) float64 in [0, 1]: |b| > lat_min (smoothstep over
    lat_taper above it), times 0 inside the LMC / SMC discs and within hole_grow of `missing`
    (bool (npix,) at `nside`, e.g. the mosaic's NaN), rising as a smoothstep over hole_taper."""
    _, lat = hp.pix2ang(nside, np.arange(hp.nside2npix(nside)), lonlat=True)
    mask = smoothstep((np.abs(lat) - lat_min_deg) / lat_taper_deg)
    bad = np.zeros(hp.nside2npix(nside), dtype=bool) if missing is None else np.asarray(missing, dtype=bool).copy()
    for name, lon0, lat0, radius in EXTRAGALACTIC_DISCS:
        if name in ("LMC", "SMC"):
            bad[hp.query_disc(nside, hp.ang2vec(lon0, lat0, lonlat=True), np.radians(radius))] = True
    if bad.any():
        # distances on a coarser grid (the taper is degrees wide), interpolated
        work = min(nside, 256)
        bad_work = hp.ud_grade(bad.astype(float), work) > 0
        dist = hp.get_interp_val(distance_to(work, bad_work), *hp.pix2ang(nside, np.arange(hp.nside2npix(nside))))
        mask *= smoothstep((dist - hole_grow_deg) / hole_taper_deg)
        mask[bad] = 0.0
    return mask


def masked_spectrum(m: np.ndarray, mask: np.ndarray, lmax: int) -> np.ndarray:
    """Pseudo-C_l (lmax + 1,) of map m on the apodised mask, its weighted mean removed, divided
    by the mask's mean square."""
    m = np.where(mask > 0, m, 0.0)
    w = np.sum(mask)
    mean = np.sum(m * mask) / w
    return hp.anafast((m - mean) * mask, lmax=lmax, use_pixel_weights=False, iter=1) / np.mean(mask**2)


def gaussian_beam(lmax: int, fwhm_arcmin: float) -> np.ndarray:
    """B_l (lmax + 1,) of a Gaussian beam."""
    return hp.gauss_beam(np.radians(fwhm_arcmin / 60), lmax=lmax)


def zero_level(iris: np.ndarray, template: np.ndarray, mask: np.ndarray, fwhm_deg: float = 1.0,
               work_nside: int = 256) -> dict:
    """The intercept delta of IRIS = a T + delta, fitted at `fwhm_deg` (both maps smoothed,
    `work_nside`) on the pixels where `mask` > 0.5 (IRIS NaN left out): {delta, a, correlation,
    delta_halves (the fit on the northern and southern Galactic halves)}."""
    def smooth(x):
        x = hp.ud_grade(np.where(np.isfinite(x), x, hp.UNSEEN), work_nside)
        ok = x != hp.UNSEEN
        filled = np.where(ok, x, np.median(x[ok]))
        return hp.smoothing(filled, fwhm=np.radians(fwhm_deg), iter=1), ok

    i_s, ok_i = smooth(iris)
    t_s, _ = smooth(template)
    m = (hp.ud_grade(mask, work_nside) > 0.5) & ok_i
    _, lat = hp.pix2ang(work_nside, np.arange(hp.nside2npix(work_nside)), lonlat=True)

    def fit(sel):
        a, delta = np.polyfit(t_s[sel], i_s[sel], 1)
        return float(a), float(delta)

    a, delta = fit(m)
    return {"delta": delta, "a": a, "correlation": float(np.corrcoef(t_s[m], i_s[m])[0, 1]),
            "delta_halves": [fit(m & (lat > 0))[1], fit(m & (lat < 0))[1]], "fwhm_deg": fwhm_deg}


def fit_dust_law(cl: np.ndarray, beam_fwhm_arcmin: float, ell_range=(100, 3000)) -> dict:
    """Fit C_l = B_l^2 (A l^alpha + F) over ell_range (log least squares on Delta ell = 20 bins,
    alpha scanned): {A, alpha, F, rms (fractional rms of the fit)}."""
    lmax = len(cl) - 1
    b2 = gaussian_beam(lmax, beam_fwhm_arcmin) ** 2
    edges = np.arange(ell_range[0], min(ell_range[1], lmax) + 1, 20)
    centre = 0.5 * (edges[1:] + edges[:-1])
    data = np.array([cl[lo:hi].mean() for lo, hi in zip(edges[:-1], edges[1:])])
    beam = np.array([b2[lo:hi].mean() for lo, hi in zip(edges[:-1], edges[1:])])
    best = None
    for alpha in np.arange(-4.0, -1.5, 0.005):
        design = np.stack([beam * centre**alpha, beam], 1) / data[:, None]
        coef, *_ = np.linalg.lstsq(design, np.ones(len(data)), rcond=None)
        if coef[0] <= 0 or coef[1] < 0:
            continue
        rms = float(np.sqrt(np.mean((design @ coef - 1) ** 2)))
        if best is None or rms < best["rms"]:
            best = {"A": float(coef[0]), "alpha": float(alpha), "F": float(coef[1]), "rms": rms}
    if best is None:
        raise ValueError("no positive power law + floor fits the spectrum")
    return best


def band_mean(cl: np.ndarray, lo: float, hi: float) -> float:
    """Mean of C_l over lo <= l < hi."""
    return float(np.mean(cl[int(lo):int(hi)]))


def log_bands(lo: float, hi: float, step: float = 0.4) -> list[tuple[int, int]]:
    """Bands of Delta ln l = step from lo up to hi (the last one ends at hi)."""
    edges = np.exp(np.arange(np.log(lo), np.log(hi), step))
    edges = np.append(edges, hi).astype(int)
    return [(int(a), int(b)) for a, b in zip(edges[:-1], edges[1:]) if b > a]


def compare_spectra(cl_map: np.ndarray, cl_iris: np.ndarray, beam_fwhm_arcmin: float, nside: int,
                    iris_fit: dict | None = None) -> dict:
    """The map's spectrum (its own pixels, no beam) against IRIS's on the same mask: IRIS fitted
    as B^2 (A l^alpha + F); the map scaled to A l^alpha at ell 100-300, seen as B^2 (k C_map + F):
    ratios to IRIS in IRIS_BANDS (with the floor's share of IRIS's power there), and k C_map over
    A l^alpha in bands of Delta ln l = 0.4 from 600 to 1.5 nside."""
    fit = iris_fit or fit_dust_law(cl_iris, beam_fwhm_arcmin)
    lmax = min(len(cl_map), len(cl_iris)) - 1
    ell = np.maximum(np.arange(lmax + 1), 1.0)
    law = fit["A"] * ell ** fit["alpha"]
    b2 = gaussian_beam(lmax, beam_fwhm_arcmin) ** 2
    k = band_mean(law, 100, 300) / band_mean(cl_map, 100, 300)
    seen = b2 * (k * cl_map[:lmax + 1] + fit["F"])
    iris = {}
    for lo, hi in IRIS_BANDS:
        if hi > lmax + 1:
            continue
        iris[f"{lo}-{hi}"] = {"ratio": band_mean(seen, lo, hi) / band_mean(cl_iris, lo, hi),
                              "floor_share": band_mean(b2 * fit["F"], lo, hi) / band_mean(cl_iris, lo, hi)}
    top = min(int(1.5 * nside), lmax)
    law_ratio = {f"{lo}-{hi}": band_mean(k * cl_map, lo, hi) / band_mean(law, lo, hi) for lo, hi in log_bands(600, top)}
    return {"iris_fit": fit, "scale": k, "vs_iris": iris, "vs_power_law": law_ratio}
