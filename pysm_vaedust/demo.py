"""``pysm_vaedust-demo``: a full-sky VAEDust I, Q, U map to FITS plus a PNG (Mollweide, zooms of I and P, spectra)."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import healpy as hp
import numpy as np
import pysm3
import pysm3.units as u

from .data import atomic_write



def plot_map(path, emission: np.ndarray, template: np.ndarray, nside: int, freq_GHz: float,
             zoom_lonlat=(70.0, 60.0), zoom_deg: float = 20.0) -> None:
    """PNG: log10 I Mollweide view, gnomonic zooms of I and of the polarized intensity P, and C_ell
    (TT of map and template; EE, BB of the map) at |b| > 30 deg (cos^2-apodised over 30-40 deg to
    keep the Galactic plane from leaking into high ell). emission: (3, npix) I, Q, U."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig = plt.figure(figsize=(20, 4.6))
    log_map = np.log10(emission[0])
    hp.mollview(log_map, fig=fig, sub=(1, 4, 1), title=f"VAEDust I, {freq_GHz:g} GHz, nside {nside}",
                unit="log10(uK_RJ)", cmap="inferno")
    reso = hp.nside2resol(nside, arcmin=True)  # one map pixel per image pixel
    xsize = int(min(1200, zoom_deg * 60 / reso))
    title = f"(l, b) = {zoom_lonlat}, {xsize * reso / 60:.0f} deg"
    hp.gnomview(log_map, rot=zoom_lonlat, xsize=xsize, reso=reso, fig=fig, sub=(1, 4, 2), cmap="inferno",
                title=f"I, {title}", unit="log10(uK_RJ)")
    hp.gnomview(np.hypot(emission[1], emission[2]), rot=zoom_lonlat, xsize=xsize, reso=reso, fig=fig,
                sub=(1, 4, 3), cmap="viridis", title=f"P, {title}", unit="uK_RJ")
    ax = fig.add_subplot(1, 4, 4)
    lmax = 3 * nside - 1
    abs_b = np.abs(hp.pix2ang(nside, np.arange(emission.shape[1]), lonlat=True)[1])
    mask = np.sin(0.5 * np.pi * np.clip((abs_b - 30) / 10, 0, 1)) ** 2
    ell = np.arange(2, lmax + 1)
    masked = [mask * (values - np.sum(mask * values) / np.sum(mask)) for values in (*emission, template)]
    spectra = hp.anafast(masked[:3], lmax=lmax, pol=True) / np.mean(mask**2)
    template_cl = hp.anafast(masked[3], lmax=lmax) / np.mean(mask**2)
    for cl, label in [(spectra[0], "VAEDust TT"), (template_cl, "large-scale template TT"),
                      (spectra[1], "VAEDust EE"), (spectra[2], "VAEDust BB")]:
        ax.loglog(ell, ell * (ell + 1) * cl[2:] / (2 * np.pi), label=label)
    ax.set_xlabel(r"$\ell$")
    ax.set_ylabel(r"$\ell(\ell+1)C_\ell/2\pi$ [uK$_{RJ}^2$]")
    ax.set_title(r"|b| > 30$^\circ$ (apodised)")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.subplots_adjust(wspace=0.35, top=0.85)
    # tight: healpy's views place their titles above the subplot grid and leave blank margins
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=90, format="png", bbox_inches="tight", pad_inches=0.15))
    plt.close(fig)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="pysm_vaedust-demo", description=__doc__)
    parser.add_argument("--nside", type=int, default=512, help="output HEALPix nside (default 512)")
    parser.add_argument("--freq", type=float, default=545.0, help="frequency in GHz (default 545)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--weights", default=None, help="weights file (default: shipped)")
    parser.add_argument("--output-dir", default="out", help="folder for the FITS and PNG (default out/)")
    parser.add_argument("--no-plot", action="store_true")
    args = parser.parse_args(argv)
    from .component import VAEDust

    start = time.time()
    try:
        component = VAEDust(nside=args.nside, seed=args.seed, weights=args.weights, progress=True)
        sky = pysm3.Sky(nside=args.nside, component_objects=[component])
        emission = sky.get_emission(args.freq * u.GHz).value
    except (ValueError, TypeError, FileNotFoundError) as err:
        parser.error(str(err))  # one line, exit code 2
    elapsed = time.time() - start
    out = Path(args.output_dir)
    stem = f"vaedust_nside{args.nside}_{args.freq:g}GHz_seed{args.seed}"
    fits_path = atomic_write(out / f"{stem}.fits", lambda tmp: hp.write_map(
        tmp, emission.astype(np.float32), coord="G", column_units="uK_RJ", column_names=["I_STOKES", "Q_STOKES", "U_STOKES"],
        extra_header=[("POLCCONV", "COSMO")], overwrite=True, dtype=np.float32))
    print(f"wrote {fits_path} ({elapsed:.1f} s)", file=sys.stderr)
    if not args.no_plot:
        template = np.exp(component.template_at_pixels())
        template *= (emission[0].mean() / template.mean())  # same frequency scaling (constant SED)
        plot_map(out / f"{stem}.png", emission, template, args.nside, args.freq)
        print(f"wrote {out / f'{stem}.png'}", file=sys.stderr)
    return 0
