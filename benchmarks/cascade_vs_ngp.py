"""Check the self-similar cascade against the real 2.37' north-Galactic-pole image.

The shipped model learns ell < ~480 from the 13.7'-pixel full-sky map; finer scales come from the
cascade. The NGP image (../shared/data/planck_dust_ngp_500px.npy, ~5' resolution) is the only real
data resolving ell ~ 500-2000. Both are reduced the same way: log intensity minus its 2-deg
Gaussian smoothing, flat-sky power spectrum on the same 500 x 500, 2.37' gnomonic grid at b = +90.
Because the NGP is one faint region, the comparison is of shape: both spectra are normalised in
the learned band and the ratio is reported per bin beyond it. Non-Gaussianity at these scales:
both fields are cut into 8 x 8 non-overlapping 62-pixel (2.45-deg) cutouts and compared with the
per-patch moments of `pysm_vaedust-validate` (rms spread between cutouts, within-cutout skewness
and kurtosis, 68 % bootstrap bands of the NGP cutouts).

    python benchmarks/cascade_vs_ngp.py --nside 2048 --out benchmarks/cascade_vs_ngp
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import healpy as hp
import numpy as np

from pysm3 import MapDistribution
from pysm_vaedust import VAEDust
from pysm_vaedust.cutouts import PatchGeometry, flat_small_scales, gnomonic_directions
from pysm_vaedust.data import NGP_PIXEL_ARCMIN, load_ngp_image
from pysm_vaedust.statistics import flat_power_spectrum
from pysm_vaedust.validate import per_patch_moments

LEARNED = (150.0, 450.0)
CUTOUT_PIXELS = 62   # 496 = 8 x 62: 64 cutouts of 2.45 deg


def cutouts(image: np.ndarray, size: int = CUTOUT_PIXELS) -> np.ndarray:
    """Non-overlapping (size, size) cutouts of a square image: (k^2, size, size), k = n // size."""
    k = image.shape[0] // size
    return image[:k * size, :k * size].reshape(k, size, k, size).swapaxes(1, 2).reshape(k * k, size, size)


def vaedust_on_ngp_grid(nside: int, seed: int, npix: int) -> np.ndarray:
    """VAEDust's log(I / T) (its small scales) sampled on the NGP image grid."""
    geometry = PatchGeometry(npix, npix * NGP_PIXEL_ARCMIN / 60)
    disc = hp.query_disc(nside, np.array([0.0, 0.0, 1.0]), np.radians(0.75 * geometry.size_deg))
    component = VAEDust(nside=nside, seed=seed, progress=True,
                        map_dist=MapDistribution(pixel_indices=disc, nside=nside))
    full = np.zeros(hp.nside2npix(nside))
    full[disc] = np.log(component.reference_map()) - component.template_at_pixels()
    vec = gnomonic_directions(0.0, 90.0, geometry)[0]
    return hp.get_interp_val(full, *hp.vec2ang(vec.reshape(-1, 3))).reshape(npix, npix)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nside", type=int, default=2048)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--out", default="benchmarks/cascade_vs_ngp")
    args = parser.parse_args(argv)
    start = time.time()
    ngp = flat_small_scales(np.log(load_ngp_image()), NGP_PIXEL_ARCMIN, 2.0)[2:-2, 2:-2]  # 496 = 8 x 62 px
    npix = ngp.shape[0]
    edges = np.geomspace(100, 4000, 19)
    ell, cl_ngp = flat_power_spectrum(ngp, NGP_PIXEL_ARCMIN / 60, edges)
    fields = [vaedust_on_ngp_grid(args.nside, s, npix) for s in args.seeds]
    cl_model = np.mean([flat_power_spectrum(f, NGP_PIXEL_ARCMIN / 60, edges)[1] for f in fields], axis=0)
    moments = {"ngp": per_patch_moments(cutouts(ngp)),
               "vaedust": per_patch_moments(np.concatenate([cutouts(f) for f in fields]))}
    learned = (ell >= LEARNED[0]) & (ell <= LEARNED[1])
    norm = np.exp(np.mean(np.log(cl_model[learned] / cl_ngp[learned])))
    ratio = cl_model / cl_ngp / norm

    def slope(cl, lo, hi):
        sel = (ell >= lo) & (ell <= hi)
        return float(-np.polyfit(np.log(ell[sel]), np.log(cl[sel]), 1)[0])

    result = {"nside": args.nside, "seeds": args.seeds, "ell": ell.tolist(), "cl_ngp": cl_ngp.tolist(),
              "cl_vaedust": cl_model.tolist(), "shape_ratio_normalised_in_learned_band": ratio.tolist(),
              "amplitude_ratio_in_learned_band": float(norm),
              "slope_ngp_500_1500": slope(cl_ngp, 500, 1500), "slope_vaedust_500_1500": slope(cl_model, 500, 1500),
              "slope_ngp_150_450": slope(cl_ngp, 150, 450), "slope_vaedust_150_450": slope(cl_model, 150, 450),
              "cutout_moments": {k: {name: {"value": e["value"], "band": list(e["band"])} for name, e in v.items()}
                                 for k, v in moments.items()},
              "seconds": time.time() - start}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "cascade_vs_ngp.json").write_text(json.dumps(result, indent=1))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    a.loglog(ell, cl_ngp * norm, "k.-", label="NGP image (2.37', real), x amplitude ratio")
    a.loglog(ell, cl_model, "r.-", label=f"VAEDust nside {args.nside} (learned + cascade)")
    for x in (480, 1920):
        a.axvline(x, color="grey", ls=":")
    a.set_xlabel(r"$\ell$")
    a.set_ylabel(r"$C_\ell$ of log-intensity small scales")
    a.legend(fontsize=8)
    b.semilogx(ell, ratio, "b.-")
    b.axhspan(0.9, 1.1, color="g", alpha=0.15)
    b.axvspan(*LEARNED, color="y", alpha=0.2, label="normalisation band (learned)")
    b.set_xlabel(r"$\ell$")
    b.set_ylabel("VAEDust / NGP (shape)")
    b.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "cascade_vs_ngp.png", dpi=90)
    for e, r in zip(ell, ratio):
        print(f"ell {e:7.0f}  VAEDust/NGP shape ratio {r:6.3f}")
    for name in ("rms_cv", "skewness_mean", "kurtosis_median"):
        ngp_entry, model_entry = moments["ngp"][name], moments["vaedust"][name]
        print(f"{CUTOUT_PIXELS}-px cutouts, {name}: NGP {ngp_entry['value']:.2f} "
              f"(68 % band {ngp_entry['band'][0]:.2f}..{ngp_entry['band'][1]:.2f}), VAEDust {model_entry['value']:.2f}")
    print({k: v for k, v in result.items() if not isinstance(v, (list, dict))})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
