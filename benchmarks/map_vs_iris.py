"""The product's map, made as a user makes it, against the real IRIS 100 um sky (issue 21).

For each nside and seed: `pysm3.Sky(nside, component_objects=[VAEDust(nside, seed)])` at 545 GHz;
its spectrum on the analysis mask of `pysm_vaedust.mapcheck` (|b| > 30, LMC / SMC and the
mosaic's holes out) against the cached IRIS mosaic (nside 2048, `pysm_vaedust-mosaic`) minus its
zero level: linear I on the whole mask, ln I on the sky where the 30'-smoothed IRIS - delta >
1.5 MJy/sr (bright; the faint rest reported). IRIS is fitted as B^2 (A l^alpha + F); the map is
scaled to A l^alpha at ell 100-300 and seen as B^2 (C + F). Also the map over A l^alpha in
Delta ln l = 0.4 bands from 600 to 1.5 nside. JSON + a figure of the spectra.

    python benchmarks/map_vs_iris.py --nside 1024 2048 --seeds 0 1 --json benchmarks/map_vs_iris.json \
        --figure docs/figures/map_vs_iris.png
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
from pysm_vaedust.data import fit_dust_law, masked_spectrum
from pysm_vaedust.iris import analysis_mask
from pysm_vaedust.mapcheck import BRIGHT_MJYSR, IRIS_BEAM_ARCMIN, IRIS_NSIDE, compare_spectra, iris_reference


def bright_sky(values: np.ndarray, nside_out: int) -> np.ndarray:
    """(npix of nside_out,) bool: where `values` (MJy/sr, nside 2048, NaN = none) smoothed to 30'
    exceeds BRIGHT_MJYSR."""
    low = hp.ud_grade(np.where(np.isfinite(values), values, hp.UNSEEN), 512)
    ok = low != hp.UNSEEN
    smooth = hp.smoothing(np.where(ok, low, np.median(low[ok])), fwhm=np.radians(0.5), iter=1)
    return hp.get_interp_val(smooth, *hp.pix2ang(nside_out, np.arange(hp.nside2npix(nside_out)))) > BRIGHT_MJYSR


def spectra(values: np.ndarray, mask: np.ndarray, bright: np.ndarray, lmax: int) -> dict:
    """Linear-I spectrum on the mask, ln-I spectra on its bright and faint parts."""
    logs = np.log(np.where(values > 0, values, 1.0))
    return {"linear": masked_spectrum(values, mask, lmax),
            "ln_bright": masked_spectrum(logs, mask * bright, lmax),
            "ln_faint": masked_spectrum(logs, mask * ~bright, lmax)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nside", type=int, nargs="+", default=[2048])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--weights", default=None, help="a weights file (default: the shipped weights)")
    parser.add_argument("--json", default=None)
    parser.add_argument("--figure", default=None)
    args = parser.parse_args(argv)
    warnings.simplefilter("ignore")
    reference_map, missing, mask_iris = iris_reference(np.exp(VAEDust(nside=64, seed=0).log_template))
    zero = reference_map.extra["zero_level"]
    reference = reference_map.intensity
    bright_iris = bright_sky(reference, IRIS_NSIDE)
    lmax_iris = int(1.5 * IRIS_NSIDE)
    ref_cl = spectra(np.where(missing, 0.0, reference), mask_iris, bright_iris, lmax_iris)
    fits = {k: fit_dust_law(cl, IRIS_BEAM_ARCMIN) for k, cl in ref_cl.items()}
    fits_43 = {k: fit_dust_law(cl, 4.3) for k, cl in ref_cl.items()}
    print(f"IRIS zero level: delta {zero['delta']:.3f} MJy/sr, a {zero['a']:.4g}, r {zero['correlation']:.4f}, "
          f"halves {zero['delta_halves'][0]:.3f} / {zero['delta_halves'][1]:.3f}")
    for k, f in fits.items():
        print(f"IRIS {k}: alpha {f['alpha']:.3f}, floor share of A l^alpha at l 1000 {f['F'] / (f['A'] * 1000**f['alpha']):.3f}, "
              f"fit rms {f['rms']:.3f} (beam 4.3': alpha {fits_43[k]['alpha']:.3f}, rms {fits_43[k]['rms']:.3f})")
    out = {"iris": {"zero_level": zero, "fits_beam_5.1": fits, "fits_beam_4.3": fits_43,
                    "bright_fraction_of_mask": float(np.sum(mask_iris * bright_iris) / np.sum(mask_iris))},
           "maps": {}}
    curves = {}
    for nside in args.nside:
        mask = analysis_mask(nside, hp.ud_grade(missing.astype(float), nside) > 0)
        bright = bright_sky(reference, nside)
        for seed in args.seeds:
            start = time.time()
            sky = pysm3.Sky(nside=nside, component_objects=[VAEDust(nside=nside, seed=seed, weights=args.weights)])
            m = np.asarray(sky.get_emission(545 * u.GHz))[0].astype(np.float64)
            seconds = time.time() - start
            cl = spectra(m, mask, bright, int(1.5 * nside))
            result = {k: compare_spectra(cl[k], ref_cl[k], IRIS_BEAM_ARCMIN, nside, fits[k]) for k in cl}
            out["maps"][f"nside{nside}_seed{seed}"] = {"seconds": seconds, **result}
            curves[(nside, seed)] = cl
            for k, r in result.items():
                vs = ", ".join(f"{b} {v['ratio']:.2f} (floor {v['floor_share']:.2f})" for b, v in r["vs_iris"].items())
                law = ", ".join(f"{b} {v:.2f}" for b, v in r["vs_power_law"].items())
                print(f"nside {nside} seed {seed} {k}: vs IRIS {vs}; vs power law {law}")
            print(f"  (map made in {seconds:.0f} s)", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    if args.figure:
        make_figure(args.figure, ref_cl, fits, curves)
    return 0


def make_figure(path: str, ref_cl: dict, fits: dict, curves: dict) -> None:
    """Spectra of the maps (scaled to IRIS's dust at ell 100-300, beam and floor added) beside
    IRIS, per intensity kind, and their ratio to IRIS's dust power law."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from pysm_vaedust.data import gaussian_beam
    from pysm_vaedust.mapcheck import dust_law, dust_scale

    kinds = ("linear", "ln_bright")
    fig, axes = plt.subplots(2, len(kinds), figsize=(6 * len(kinds), 8), sharex=True, constrained_layout=True)
    for col, kind in enumerate(kinds):
        fit, cl_ref = fits[kind], ref_cl[kind]
        ell = np.arange(len(cl_ref))
        law = dust_law(fit, len(cl_ref) - 1)
        b2 = gaussian_beam(len(cl_ref) - 1, IRIS_BEAM_ARCMIN) ** 2
        top, bottom = axes[0, col], axes[1, col]
        top.loglog(ell[30:], cl_ref[30:], color="k", lw=1.2, label="IRIS - delta (mosaic)")
        top.loglog(ell[30:], (b2 * (law + fit["F"]))[30:], "k--", lw=0.8, label=f"fit B^2 (A l^{fit['alpha']:.2f} + F)")
        top.loglog(ell[30:], law[30:], "k:", lw=0.8, label="IRIS dust law A l^alpha")
        for (nside, seed), cl in curves.items():
            c = cl[kind]
            k = dust_scale(c, law)
            n = len(c)
            top.loglog(ell[30:n], (b2[:n] * (k * c + fit["F"]))[30:], lw=0.8, label=f"VAEDust nside {nside} seed {seed} (beam + F)")
            bottom.semilogx(ell[30:n], (k * c / law[:n])[30:], lw=0.8, label=f"nside {nside} seed {seed}")
        top.set_title(f"{kind.replace('_', ' ')}: spectrum on the analysis mask")
        top.set_ylabel("C_l")
        top.legend(fontsize=7)
        bottom.axhline(1, color="k", lw=0.6)
        for y in (0.75, 1.33):
            bottom.axhline(y, color="gray", lw=0.5, ls="--")
        bottom.set_ylim(0, 2)
        bottom.set_xlabel("ell")
        bottom.set_ylabel("VAEDust / IRIS dust power law")
        bottom.legend(fontsize=7)
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    raise SystemExit(main())
