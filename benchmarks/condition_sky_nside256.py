"""Time a full-sky conditioning on the real Planck map and check the rendered component.

The 545 GHz intensity of the bundled Planck 2013 map, rotated to Galactic coordinates at
`--nside` (default 256), observed at |b| > `--bmin` degrees with noise `--noise` times the
intensity; `condition_sky` with the shipped weights (one thread), then `ConditionedVAEDust`
rendered at the same nside. Prints the time, the fit's chi^2 per observed pixel and the rms of
(I - observed) / sigma where observed for the conditioned component and for the plain prior.

    python benchmarks/condition_sky_nside256.py [--nside 256] [--bmin 20] [--noise 0.01] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import time

import healpy as hp
import numpy as np
import pysm3.units as u
import torch

from pysm_vaedust.component import VAEDust
from pysm_vaedust.conditioning import ConditionedVAEDust, condition_sky
from pysm_vaedust.data import MJysr_to_uK_RJ, load_dust_map, shared_data_dir


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nside", type=int, default=256)
    parser.add_argument("--bmin", type=float, default=20.0, help="observed where |b| > bmin (degrees)")
    parser.add_argument("--noise", type=float, default=0.01, help="noise rms as a fraction of the intensity")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    nside = args.nside
    dust = load_dust_map(shared_data_dir() / "planck_ebv_nside256_ring_icrs.fits.gz")
    vec = np.array(hp.pix2vec(nside, np.arange(hp.nside2npix(nside))))
    obs = hp.get_interp_val(dust.intensity, *hp.vec2ang(hp.Rotator(coord=["G", "C"])(vec).T)) * MJysr_to_uK_RJ(545.0)
    _, lat = hp.pix2ang(nside, np.arange(len(obs)), lonlat=True)
    mask = np.abs(lat) > args.bmin
    noise = args.noise * obs
    start = time.time()
    fitted = condition_sky(obs, mask, noise, 545 * u.GHz, nside, seed=0, progress=True)
    seconds = time.time() - start
    conditioned = ConditionedVAEDust(fitted, nside=nside, seed=1).get_emission(545 * u.GHz)[0].value
    prior = VAEDust(nside=nside, seed=1, prior=fitted.metadata["prior"]).get_emission(545 * u.GHz)[0].value

    def chi(m):
        return float(np.sqrt(np.mean(((m - obs)[mask] / noise[mask]) ** 2)))

    result = {"nside": nside, "observed_pixels": int(mask.sum()), "tiles_fitted": fitted.metadata["n_tiles_fitted"],
              "tiles": fitted.metadata["n_tiles"], "seconds": seconds, "chi2_per_pixel_fit": fitted.metadata["chi2_per_pixel"],
              "rms_chi_conditioned": chi(conditioned), "rms_chi_prior": chi(prior), "prior": fitted.metadata["prior"]}
    print(f"condition_sky nside {nside}: {result['observed_pixels']} observed pixels, "
          f"{result['tiles_fitted']} of {result['tiles']} tiles, {seconds:.1f} s (one thread)")
    print(f"rms (I - obs) / sigma where observed: conditioned {result['rms_chi_conditioned']:.2f}, "
          f"prior draw {result['rms_chi_prior']:.1f}; fit chi2/pixel {result['chi2_per_pixel_fit']:.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
