"""The same sky at every resolution (issue 21): seed s at nside N and at 2N cross-correlate.

For each N and seed, `pysm3.Sky(nside, component_objects=[VAEDust(nside, seed)])` at 545 GHz for
nside = N and 2N; on the analysis mask of `pysm_vaedust.iris.analysis_mask` (|b| > 30 deg, LMC and
SMC out, apodised; the same function at both nsides) the correlation per band

    r = sum C_l(N x 2N) / sqrt(sum C_l(N) sum C_l(2N))   over Delta l = 50 bands from l = 50 up to 1.5 N,

for linear I and ln I. Target: r >= 0.95 in every band up to l = N and >= 0.9 up to 1.5 N (N =
512, 1024). The ceiling beside it: one Gaussian field with a C_l ~ l^-2.7 spectrum to l = 4 N,
point-sampled at both nsides (HEALPix pixels of N are not among those of 2N: point sampling
aliases power from above l ~ 2 N onto both maps differently; a reference level, not a bound:
the maps carry the renderer's band limit, this field none).

    python benchmarks/resolution_consistency.py --nside 512 1024 --seeds 0 --json benchmarks/resolution_consistency.json
"""

from __future__ import annotations

import argparse
import json
import time
import warnings

import healpy as hp
import numpy as np
import pysm3
import pysm3.units as u

from pysm_vaedust import VAEDust
from pysm_vaedust.data import masked_alm
from pysm_vaedust.iris import analysis_mask

BAND = 50


def band_width(nside: int) -> int:
    """Delta l of the bands: BAND, narrower for N < 8 BAND (smoke runs)."""
    return min(BAND, nside // 8)


def band_correlation(alm_low: np.ndarray, alm_high: np.ndarray, lmax: int, width: int) -> tuple[list, list]:
    """(band starts, r per band of `width` multipoles from l = width) of two maps' masked
    coefficients (`masked_alm`, both to lmax)."""
    cross, low, high = hp.alm2cl(alm_low, alm_high), hp.alm2cl(alm_low), hp.alm2cl(alm_high)
    starts = list(range(width, lmax + 1 - width + 1, width))
    return starts, [float(cross[b:b + width].sum() / np.sqrt(low[b:b + width].sum() * high[b:b + width].sum()))
                    for b in starts]


def verdict(starts: list, r: list, nside: int) -> dict:
    """The worst r up to l = N and over N .. 1.5 N against the targets 0.95 and 0.9."""
    width = band_width(nside)
    below = [v for b, v in zip(starts, r) if b + width <= nside]
    above = [v for b, v in zip(starts, r) if b + width > nside]
    return {"min_to_N": min(below), "min_N_to_1.5N": min(above),
            "pass": bool(min(below) >= 0.95 and min(above) >= 0.9)}


def emission(nside: int, seed: int) -> np.ndarray:
    """VAEDust's intensity (npix,) at 545 GHz as a user makes it, float64."""
    sky = pysm3.Sky(nside=nside, component_objects=[VAEDust(nside=nside, seed=seed, polarization=False)])
    return np.asarray(sky.get_emission(545 * u.GHz))[0].astype(np.float64)


def gaussian_ceiling(nside: int, masks: dict, seed: int = 0, slope: float = -2.7) -> dict:
    """`band_correlation` of one power-law Gaussian field point-sampled at nside and 2 nside, on
    `masks` {nside: analysis mask}."""
    lmax_field = 4 * nside
    ell = np.arange(lmax_field + 1, dtype=np.float64)
    cl = np.where(ell > 0, np.maximum(ell, 1.0) ** slope, 0.0)
    np.random.seed(seed)
    alm = hp.synalm(cl, lmax=lmax_field)
    lmax = int(1.5 * nside)
    alms = [masked_alm(hp.alm2map(alm, n, lmax=lmax_field), masks[n], lmax) for n in (nside, 2 * nside)]
    starts, r = band_correlation(*alms, lmax, band_width(nside))
    return {"band_start": starts, "r": r, **verdict(starts, r, nside)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nside", type=int, nargs="+", default=[512, 1024], help="N (maps at N and 2N)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    warnings.simplefilter("ignore")
    out = {"band_width": {str(n): band_width(n) for n in args.nside}, "target": "r >= 0.95 up to l = N, >= 0.9 up to 1.5 N", "results": {}}
    maps = {}
    for nside in args.nside:
        lmax = int(1.5 * nside)
        masks = {n: analysis_mask(n) for n in (nside, 2 * nside)}
        ceiling = gaussian_ceiling(nside, masks)
        print(f"N {nside}: Gaussian l^-2.7 field point-sampled at N and 2N: min r {ceiling['min_to_N']:.3f} to N, "
              f"{ceiling['min_N_to_1.5N']:.3f} to 1.5 N", flush=True)
        for seed in args.seeds:
            start = time.time()
            for n in (nside, 2 * nside):
                if (n, seed) not in maps:
                    maps[(n, seed)] = emission(n, seed)
            result = {"gaussian_ceiling": ceiling, "map_seconds": time.time() - start}
            for kind in ("linear", "ln"):
                alms = []
                for n in (nside, 2 * nside):
                    m = maps[(n, seed)]
                    alms.append(masked_alm(m if kind == "linear" else np.log(m), masks[n], lmax))
                starts, r = band_correlation(*alms, lmax, band_width(nside))
                result[kind] = {"band_start": starts, "r": r, **verdict(starts, r, nside)}
                print(f"N {nside} seed {seed} {kind} I: min r {result[kind]['min_to_N']:.3f} to l = N, "
                      f"{result[kind]['min_N_to_1.5N']:.3f} to 1.5 N: {'PASS' if result[kind]['pass'] else 'MISS'}; "
                      f"r per band {np.round(r, 3).tolist()}", flush=True)
            out["results"][f"N{nside}_seed{seed}"] = result
            maps.pop((nside, seed), None)   # the 2N map is the next N's
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
