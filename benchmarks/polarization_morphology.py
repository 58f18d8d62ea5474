"""Is Q's small-scale structure non-Gaussian (issue 23, a diagnostic)?

Per seed, the product's map at 353 GHz (`pysm3.Sky(nside, component_objects=[VAEDust(nside, seed)])`),
Q high-passed at l > 200 (alm filter, to l = 2 nside), in the 10 regions of the ridge test (discs of
10 deg at b = +-60, l = 0, 72, ..., 288; `polarization_vs_npipe.RIDGE_REGIONS`). Minkowski functionals
(`statistics.healpix_minkowski_functionals`) at thresholds nu = -2.5 .. 2.5 in units of each region's
rms, beside a Gaussian twin of the same field in that region (the alm of the region's field, the
disc apodised over 3 deg, with random phases: a stationary Gaussian field with the region's spectrum).
Reported per region: the departure of V2 from the twin, max |V2 - V2_twin| / max |V2_twin|, beside the
same measure between two twins (their scatter) and between the two seeds' own V2 (seed-to-seed scatter).
The same for PySM's log-pol-tens form with a Gaussian fraction tensor (the component with
te_correlation = 0): the Gaussian draw beside which the product's Q is judged.

    python benchmarks/polarization_morphology.py --nside 512 --seeds 0 1
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import healpy as hp
import numpy as np
import pysm3
import pysm3.units as u

from pysm_vaedust import VAEDust
from pysm_vaedust.data import atomic_write, smoothstep
from pysm_vaedust.polarization import TE_CORRELATION
from pysm_vaedust.statistics import healpix_minkowski_functionals

sys.path.insert(0, str(Path(__file__).resolve().parent))
from polarization_vs_npipe import RIDGE_REGIONS  # noqa: E402  (the regions named before measuring)

THRESHOLDS = np.linspace(-2.5, 2.5, 11)
ELL_MIN = 200
#: the product (w's E correlated with ln I) beside PySM's log-pol-tens form with Gaussian w (the same
#: component with te_correlation = 0: Q = q I with q Gaussian, as d10-d12 draw their small scales)
DRAWS = {"vaedust": TE_CORRELATION, "log_pol_tens_gaussian": 0.0}


def small_scale_q(iqu: np.ndarray, nside: int) -> np.ndarray:
    """alm of Q's E/B content above ELL_MIN (lmax 2 nside), as a scalar map's coefficients of Q."""
    alm = hp.map2alm(iqu[1], lmax=2 * nside, iter=1)
    hp.almxfl(alm, (np.arange(2 * nside + 1) > ELL_MIN).astype(float), inplace=True)
    return alm


def twin(alm: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """The same |a_lm| with uniform random phases (m = 0 keeps a random sign)."""
    lmax = hp.Alm.getlmax(len(alm))
    out = np.abs(alm) * np.exp(2j * np.pi * rng.random(len(alm)))
    out[:lmax + 1] = np.abs(alm[:lmax + 1]) * rng.choice([-1.0, 1.0], lmax + 1)
    return out


def region_v2(m: np.ndarray, nside: int, rng: np.random.Generator | None = None) -> list[np.ndarray]:
    """V2 (n_thresholds,) in each region, thresholds in units of the region's rms; with `rng`, of
    the region's Gaussian twin instead."""
    out = []
    centres = np.stack(hp.pix2vec(nside, np.arange(len(m))))
    for lon, lat in RIDGE_REGIONS:
        mask = np.zeros(len(m))
        mask[hp.query_disc(nside, hp.ang2vec(lon, lat, lonlat=True), np.radians(10.0))] = 1.0
        field = m
        if rng is not None:
            distance = np.degrees(np.arccos(np.clip(hp.ang2vec(lon, lat, lonlat=True) @ centres, -1, 1)))
            taper = smoothstep((13.0 - distance) / 3.0)
            field = hp.alm2map(twin(hp.map2alm(m * taper, lmax=2 * nside, iter=1), rng), nside, lmax=2 * nside)
        sigma = np.std(field[mask > 0])
        out.append(healpix_minkowski_functionals(field / sigma, THRESHOLDS, mask=mask)["v2"])
    return out


def departure(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


def compare_v2(v2: dict, seeds: list[int], draw: str) -> tuple[list[dict], int]:
    """Per region the V2 departures (model vs twin, twin vs twin, seed vs seed), printed; and the
    number of regions where the model departs by more than both scatters."""
    s0, s1 = seeds
    rows = []
    for k, region in enumerate(RIDGE_REGIONS):
        rows.append({"region": list(region),
                     "model_vs_twin": [departure(v2[s][k], v2[f"twin{s}a"][k]) for s in seeds],
                     "twin_vs_twin": [departure(v2[f"twin{s}b"][k], v2[f"twin{s}a"][k]) for s in seeds],
                     "seed_vs_seed": departure(v2[s1][k], v2[s0][k])})
        r = rows[-1]
        print(f"{draw} region {region}: V2 model vs twin {r['model_vs_twin'][0]:.2f} / {r['model_vs_twin'][1]:.2f}, "
              f"twin vs twin {r['twin_vs_twin'][0]:.2f} / {r['twin_vs_twin'][1]:.2f}, seed vs seed {r['seed_vs_seed']:.2f}")
    above = sum(min(r["model_vs_twin"]) > max(max(r["twin_vs_twin"]), r["seed_vs_seed"]) for r in rows)
    print(f"{draw}: regions where Q's V2 departs from its Gaussian twin by more than the twins' and the seeds' "
          f"scatter: {above} of {len(rows)}", flush=True)
    return rows, above


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nside", type=int, default=512)
    parser.add_argument("--seeds", type=int, nargs=2, default=[0, 1])
    parser.add_argument("--json", default="benchmarks/polarization_morphology.json")
    args = parser.parse_args(argv)
    nside, rng = args.nside, np.random.default_rng(12345)
    out = {"nside": nside, "seeds": args.seeds, "ell_min": ELL_MIN, "thresholds_sigma": THRESHOLDS.tolist(), "draws": {}}
    for draw, te_correlation in DRAWS.items():
        v2 = {}
        for seed in args.seeds:
            component = VAEDust(nside=nside, seed=seed, te_correlation=te_correlation)
            iqu = np.asarray(pysm3.Sky(nside=nside, component_objects=[component]).get_emission(353 * u.GHz).value)
            q_small = hp.alm2map(small_scale_q(iqu, nside), nside, lmax=2 * nside)
            v2[seed] = region_v2(q_small, nside)
            v2[f"twin{seed}a"] = region_v2(q_small, nside, rng)
            v2[f"twin{seed}b"] = region_v2(q_small, nside, rng)
        rows, above = compare_v2(v2, args.seeds, draw)
        out["draws"][draw] = {"te_correlation": te_correlation, "regions": rows, "regions_beyond_scatter": above,
                              "v2": {str(k): [x.tolist() for x in v] for k, v in v2.items()}}
    atomic_write(args.json, lambda tmp: Path(tmp).write_text(json.dumps(out, indent=1)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
