"""Stage 9 — the product's map against the real sky: full-sky spectra beside the IRIS mosaic.

One definition of the real-sky reference, used by the validation and the benchmarks:

- analysis mask: |b| > 30 deg (5 deg smoothstep), without the LMC and SMC (their discs of
  `cutouts.EXTRAGALACTIC_DISCS`) and without the mosaic's missing data grown by 3 deg (2 deg
  smoothstep on the holes);
- IRIS's zero level: IRIS = a T + delta regressed at 1 deg on that mask (T the bundled
  template), the reference is IRIS - delta (`iris.zero_level`, `iris.analysis_mask`; the
  training recipe can cut its targets from the same IRIS - delta: `TrainConfig.zero_level`);
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

import numpy as np

from .data import DustMap, fit_dust_law, gaussian_beam, shared_data_dir
from .iris import analysis_mask, iris_mosaic, subtract_zero_level

#: IRIS's effective beam FWHM at 100 um measured on the mosaic's bright patches (arcmin); nominal 4.3'
IRIS_BEAM_ARCMIN = 5.1
#: ln-I comparisons only where the 30'-smoothed IRIS - delta exceeds this (MJy/sr)
BRIGHT_MJYSR = 1.5
#: bands of the comparison with IRIS (ell)
IRIS_BANDS = ((300, 600), (600, 1000), (1000, 1500))
#: nside of the IRIS mosaic the reference is read at
IRIS_NSIDE = 2048


def iris_reference(template: np.ndarray) -> tuple[DustMap, np.ndarray, np.ndarray]:
    """(IRIS - delta (`iris.subtract_zero_level` against `template`, intensity of any nside), the
    mosaic's missing pixels (npix,) bool, the analysis mask (npix,)), all at IRIS_NSIDE; the mosaic
    is the cached one (`pysm_vaedust-mosaic`)."""
    mosaic = iris_mosaic(IRIS_NSIDE, shared_data_dir() / "iris_100um")
    missing = ~np.isfinite(mosaic.intensity)
    return subtract_zero_level(mosaic, template), missing, analysis_mask(IRIS_NSIDE, missing)


def dust_law(fit: dict, lmax: int) -> np.ndarray:
    """IRIS's dust A l^alpha (lmax + 1,) of a `fit_dust_law` fit (l = 0 taken as 1)."""
    return fit["A"] * np.maximum(np.arange(lmax + 1), 1.0) ** fit["alpha"]


def dust_scale(cl_map: np.ndarray, law: np.ndarray) -> float:
    """The factor on a map's C_l that puts it on IRIS's dust law `law` at ell 100-300 (units and
    SED cancel)."""
    return band_mean(law, 100, 300) / band_mean(cl_map, 100, 300)


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
    law = dust_law(fit, lmax)
    b2 = gaussian_beam(lmax, beam_fwhm_arcmin) ** 2
    k = dust_scale(cl_map, law)
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
