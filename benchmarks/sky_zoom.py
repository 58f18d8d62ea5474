"""A full-sky VAEDust map zoomed on test regions, beside the real IRIS 100 um sky at the same place.

For each centre (test-split patch centres of the weights, or --centres), a 10-deg gnomonic view at
the map's own pixel: the real sky (IRIS mosaic) and VAEDust (two seeds) on the bundled template,
each as its small scales ln I - [ln I]_30' (IRIS: its own 30' smoothing; VAEDust: ln I - ln T, T
the 30' template), at one colour scale per row; the template's ln I beside. VAEDust is computed
only on the pixels of the views (map_dist), so a few centres at nside 2048 take minutes.

    python benchmarks/sky_zoom.py --nside 2048 --out docs/figures/sky_zoom.png
"""

from __future__ import annotations

import argparse
import time

import healpy as hp
import numpy as np
import pysm3
import pysm3.units as u

from pysm_vaedust import VAEDust
from pysm_vaedust.cutouts import large_scale_log_map, log_intensity
from pysm_vaedust.iris import iris_mosaic
from pysm_vaedust.data import shared_data_dir
from pysm_vaedust.realsky import split_centres
from pysm_vaedust.weights import default_weights_path, load_weights

VIEW_DEG = 10.0


def view(values: np.ndarray, lon: float, lat: float, nside: int) -> np.ndarray:
    """Gnomonic (xsize, xsize) view of a RING map at one map pixel per image pixel."""
    reso = hp.nside2resol(nside, arcmin=True)
    return hp.gnomview(values, rot=(lon, lat), xsize=int(VIEW_DEG * 60 / reso), reso=reso,
                       return_projected_map=True, no_plot=True).filled(np.nan)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nside", type=int, default=2048)
    parser.add_argument("--weights", default=str(default_weights_path()))
    parser.add_argument("--centres", type=int, default=3, help="how many test-split centres (spread in brightness)")
    parser.add_argument("--out", default="docs/figures/sky_zoom.png")
    args = parser.parse_args(argv)
    weights = load_weights(args.weights)
    fwhm = float(weights.metadata["normalisation"]["template_fwhm_deg"])
    iris = iris_mosaic(args.nside, shared_data_dir() / "iris_100um")
    real_log, _ = log_intensity(iris)
    real_small = real_log - large_scale_log_map(iris, fwhm)
    lon, lat = split_centres(weights.metadata, "test")
    # centres spread over the test split's brightness: faint, median, bright
    level = hp.get_interp_val(np.nan_to_num(real_log, nan=0.0), lon, lat, lonlat=True)
    order = np.argsort(level)
    picks = order[np.linspace(0, len(order) - 1, args.centres).round().astype(int)]
    pixels = np.unique(np.concatenate([hp.query_disc(args.nside, hp.ang2vec(lon[i], lat[i], lonlat=True),
                                                     np.radians(0.75 * VIEW_DEG)) for i in picks]))
    maps = {}
    start = time.time()
    for seed in (0, 1):
        dist = pysm3.MapDistribution(pixel_indices=pixels, nside=args.nside)
        model = VAEDust(nside=args.nside, seed=seed, weights=args.weights, map_dist=dist, polarization=False)
        small = np.full(hp.nside2npix(args.nside), np.nan)
        small[pixels] = np.log(model.get_emission(545 * u.GHz)[0].value) - model.template_at_pixels()
        maps[f"VAEDust seed {seed}"] = small
        template = np.full(hp.nside2npix(args.nside), np.nan)
        template[pixels] = model.template_at_pixels()
    seconds = time.time() - start
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = ["IRIS 100 um (real)"] + list(maps) + ["template ln T (30')"]
    fig, axes = plt.subplots(len(picks), len(columns), figsize=(3.6 * len(columns), 3.6 * len(picks)), squeeze=False)
    for row, i in enumerate(picks):
        images = [view(real_small, lon[i], lat[i], args.nside)] + [view(m, lon[i], lat[i], args.nside)
                                                                    for m in maps.values()]
        limit = 3 * np.nanstd(images[0])
        for col, image in enumerate(images):
            axes[row, col].imshow(image, origin="lower", cmap="RdBu_r", vmin=-limit, vmax=limit)
        axes[row, -1].imshow(view(template, lon[i], lat[i], args.nside), origin="lower", cmap="inferno")
        axes[row, 0].set_ylabel(f"(l, b) = ({lon[i]:.0f}, {lat[i]:.0f}), ln I = {level[i]:.1f}")
        for col, name in enumerate(columns):
            axes[row, col].set_xticks([])
            axes[row, col].set_yticks([])
            if row == 0:
                axes[row, col].set_title(name + ("" if col == len(columns) - 1 else ": ln I - [ln I]_30'"))
    fig.suptitle(f"{VIEW_DEG:.0f} deg views at nside {args.nside} ({hp.nside2resol(args.nside, arcmin=True):.1f}' "
                 f"pixels), test-split centres; one colour scale per row (+-3 sigma of the real sky)")
    fig.tight_layout()
    fig.savefig(args.out, dpi=80)
    print(f"wrote {args.out}: {len(picks)} centres, VAEDust on {len(pixels)} pixels x 2 seeds in {seconds:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
