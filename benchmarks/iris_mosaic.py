"""The IRIS data stage, measured: mosaic build time, seams, point sources, noise floor of the cutouts.

    python benchmarks/iris_mosaic.py [--nside 2048] [--rebuild]

Loads (or, with --rebuild or no valid cache, builds and times) the cached IRIS mosaic; measures
the seam statistic (pysm_vaedust.iris.seam_statistic) over every plate border;
cuts the IRIS recipe's patches (training/iris.toml) and reports what is left out (missing data,
noise floor) with the ell_floor distribution. Writes benchmarks/iris_mosaic.json and
docs/figures/iris_mosaic.png (the mosaic, two zooms, one plate before and after source cleaning).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import healpy as hp
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
from tqdm import tqdm

from pysm_vaedust.cutouts import PatchGeometry, cut_patches, near_extragalactic, noise_floor_ell, patch_centres
from pysm_vaedust.iris import clean_plate, iris_directory, iris_mosaic, plate_checksums, read_plate, seam_statistic
from pysm_vaedust.train import TrainConfig

HERE = Path(__file__).resolve().parent


def figure(dust, directory, ell_floor: np.ndarray, floor_ell_min: float, path: Path) -> None:
    log_map = np.log10(np.where(dust.intensity > 0, dust.intensity, np.nan))
    fig = plt.figure(figsize=(16, 9))
    hp.mollview(hp.ud_grade(log_map, 256), fig=fig.number, sub=(2, 3, 1), min=-0.2, max=2.5, cmap="inferno",
                title="IRIS 100 um mosaic, log10(I / MJy sr^-1) -0.2 .. 2.5\n(grey: withheld)", cbar=False)
    for k, (lon, lat) in enumerate([(228.0, -50.0), (90.0, 60.0)]):
        hp.gnomview(log_map, rot=[lon, lat], reso=1.5, xsize=500, fig=fig.number, sub=(2, 3, 2 + k),
                    cmap="inferno", title=f"zoom ({lon:.0f}, {lat:.0f}), 12.5 deg", notext=True, cbar=False)
    plate = read_plate(directory / "I100B4H0.fits")
    cleaned, found = clean_plate(plate)
    lo, hi = np.nanpercentile(plate.values, [1, 99.5])
    for k, (image, title) in enumerate([(plate.values, f"plate {plate.name} as delivered"),
                                        (cleaned, f"{len(found.snr)} point sources masked and filled")]):
        ax = fig.add_subplot(2, 3, 4 + k)
        ax.imshow(image, origin="lower", vmin=lo, vmax=hi, cmap="inferno")
        ax.set_title(title)
        ax.set_xticks([])
        ax.set_yticks([])
    ax = fig.add_subplot(2, 3, 6)
    ax.hist(ell_floor, bins=np.arange(0, 3700, 180), color="0.4")
    ax.axvline(floor_ell_min, color="C3", label=f"floor_ell_min = {floor_ell_min:.0f}: patches left of it left out")
    ax.set_xlabel("ell where the patch power meets 2x its noise + CIB floor")
    ax.set_ylabel("patches (IRIS recipe)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nside", type=int, default=2048)
    parser.add_argument("--rebuild", action="store_true")
    args = parser.parse_args()
    directory = iris_directory()
    tic = time.time()
    dust = iris_mosaic(args.nside, rebuild=args.rebuild)
    load_s = time.time() - tic
    result = {"nside": args.nside, "load_or_build_s": load_s, "mosaic": dust.extra["mosaic"]}
    plates = [read_plate(directory / name) for name in tqdm(sorted(plate_checksums(directory)), desc="plates")]
    result["seams"] = seam_statistic(dust.intensity, plates)
    cfg = TrainConfig.from_toml(HERE.parent / "training" / "iris.toml")
    lon, lat = patch_centres(cfg.lat_min_deg, cfg.spacing_deg)
    galactic = ~near_extragalactic(lon, lat, PatchGeometry(cfg.npix, cfg.size_deg))
    lon, lat = lon[galactic], lat[galactic]
    tic = time.time()
    cutouts = cut_patches(dust, lon, lat, PatchGeometry(cfg.npix, cfg.size_deg), cfg.template_fwhm_deg,
                          fine_spectra=True)
    floor = noise_floor_ell(cutouts)
    usable = cutouts.usable
    ell_floor = floor["ell_floor"][usable]
    result["cutouts"] = {
        "candidates": int(len(galactic)), "extragalactic": int(np.sum(~galactic)), "missing_data": int(np.sum(~usable)), "cut_s": time.time() - tic,
        "effective_beam_fwhm_arcmin": floor["beam_fwhm_arcmin"], "dust_slope_alpha_linear_I": floor["alpha"],
        "ell_floor_percentiles_5_16_50_84": np.percentile(ell_floor, [5, 16, 50, 84]).tolist(),
        "fraction_ell_floor_below": {str(e): float(np.mean(ell_floor < e)) for e in (600, 1000, 1200, 1440, 2000)}}
    out = HERE / "iris_mosaic.json"
    out.write_text(json.dumps(result, indent=1))
    figure(dust, directory, ell_floor, cfg.floor_ell_min, HERE.parent / "docs" / "figures" / "iris_mosaic.png")
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
