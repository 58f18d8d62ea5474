"""The large-scale template: a smoothed 545 GHz dust intensity map in Galactic coordinates.

The bundled template is derived by `build_template` from the Planck 2013 E(B-V) map in
../shared/data (ICRS; the 5' map point-sampled on nside-256 pixel centres): log-intensity,
rotated to Galactic in harmonic space, its white floor (noise, CIB and the power above the
nside-256 grid's band that point sampling folds back: the E(B-V) map's ln-I spectrum flattens
from l ~ 300 at high latitude) scaled away by `floor_filter`, smoothed by a Gaussian of sqrt(30'^2 - 5'^2) so
that it has the weights' conditioning resolution (30' FWHM), stored as uK_RJ at 545 GHz, nside 256, RING.
Rebuild it with ``python -m pysm_vaedust.template``.
"""

from __future__ import annotations

import argparse
import json
from importlib import resources
from pathlib import Path

import healpy as hp
import numpy as np
from astropy.io import fits

from . import __version__
from .data import (FREQ_REF_GHZ, MJysr_to_uK_RJ, atomic_write, check_positive_finite, fit_dust_law, gaussian_beam,
                   load_dust_map, masked_spectrum, shared_data_dir, smoothstep)

DEFAULT_TEMPLATE_NAME = "template_545GHz_fwhm30arcmin_nside256.fits"
TEMPLATE_NSIDE = 256
#: resolution of the bundled template (the conditioning FWHM of the shipped weights), deg
TEMPLATE_FWHM_DEG = 0.5
#: beam of the Planck 2013 E(B-V) map (Planck 2013 XI: 5'), deg. The shared file point-samples the
#: native nside-2048 map on nside-256 centres (../shared/data/README.md): its 13.7' pixels are no
#: beam. Taking them for one made the template 27' instead of 30' (1.5x the power at l 500 of a
#: 30' template over l 100-200)
PLANCK_EBV_FWHM_DEG = 5.0 / 60


def default_template_path() -> Path:
    """Path of the template shipped as package data."""
    return Path(str(resources.files("pysm_vaedust") / "package_data" / DEFAULT_TEMPLATE_NAME))


def smooth_log_map(log_map: np.ndarray, fwhm_deg: float, nside_out: int, coord: tuple | None = None,
                   ell_filter: np.ndarray | None = None, lmax: int | None = None) -> np.ndarray:
    """Gaussian-smoothed (and optionally rotated, coord=('C', 'G')) log map at `nside_out`, RING;
    `ell_filter` (>= lmax + 1,): a further isotropic filter of the harmonic coefficients; `lmax`:
    at most this multipole (default: all that both grids hold)."""
    nside_in = hp.npix2nside(len(log_map))
    lmax = min(3 * nside_in - 1, 3 * nside_out - 1, 3 * nside_in - 1 if lmax is None else int(lmax))
    alm = hp.map2alm(log_map, lmax=lmax, iter=1)
    if ell_filter is not None:
        alm = hp.almxfl(alm, ell_filter[:lmax + 1])
    if coord is not None and coord[0] != coord[1]:
        hp.Rotator(coord=list(coord)).rotate_alm(alm, lmax=lmax, inplace=True)
    hp.smoothalm(alm, fwhm=np.radians(fwhm_deg), inplace=True)
    return hp.alm2map(alm, nside_out, lmax=lmax)


def floor_filter(log_map: np.ndarray, frame: str, beam_deg: float, lat_min_deg: float = 30.0,
                 ell_range=(60, 700)) -> tuple[np.ndarray, dict]:
    """What a dust map's own spectrum says is dust: its ln-I spectrum at |b| > lat_min (5 deg
    smoothstep) fitted over ell_range as B_l^2 A l^alpha + N (`data.fit_dust_law`, N a white
    floor: noise, CIB, pixelisation), and the filter sqrt(S / (S + N)), S = B_l^2 A l^alpha,
    that scales each multipole's power to the dust's alone: (filter (3 nside,), fit). The
    model's conditions were made from sky without that floor."""
    nside = hp.npix2nside(len(log_map))
    theta, phi = hp.pix2ang(nside, np.arange(len(log_map)))
    if frame != "G":
        theta, phi = hp.Rotator(coord=[frame, "G"])(theta, phi)
    mask = smoothstep((np.abs(90 - np.degrees(theta)) - lat_min_deg) / 5.0)
    lmax = 3 * nside - 1
    fit = fit_dust_law(masked_spectrum(log_map, mask, lmax), 60 * beam_deg, ell_range, floor_beamed=False)
    ell = np.maximum(np.arange(lmax + 1), 1)
    dust = gaussian_beam(lmax, 60 * beam_deg) ** 2 * fit["A"] * ell ** fit["alpha"]
    return np.sqrt(dust / (dust + fit["F"])), fit


def build_template(dust_path, fwhm_deg: float = TEMPLATE_FWHM_DEG, nside_out: int = TEMPLATE_NSIDE,
                   input_fwhm_deg: float = PLANCK_EBV_FWHM_DEG) -> tuple[np.ndarray, dict]:
    """Large-scale template at resolution `fwhm_deg` from a dust map of beam `input_fwhm_deg`:
    (uK_RJ at 545 GHz, Galactic RING (12 nside_out^2,)), provenance dict."""
    if not 0 <= input_fwhm_deg < fwhm_deg:
        raise ValueError(f"input_fwhm_deg={input_fwhm_deg}: expected 0 <= input beam < fwhm_deg={fwhm_deg}")
    dust = load_dust_map(dust_path)
    kernel = float(np.sqrt(fwhm_deg**2 - input_fwhm_deg**2))
    log_map = np.log(dust.intensity)
    ell_filter, floor = floor_filter(log_map, dust.frame, input_fwhm_deg)
    log_smooth = smooth_log_map(log_map, kernel, nside_out, coord=(dust.frame, "G"), ell_filter=ell_filter)
    template = np.exp(log_smooth) * MJysr_to_uK_RJ(FREQ_REF_GHZ)
    provenance = {**dust.provenance(), "fwhm_deg": fwhm_deg, "input_fwhm_deg": input_fwhm_deg,
                  "smoothing_kernel_fwhm_deg": kernel, "nside": nside_out, "frame": "G",
                  "unit": "uK_RJ", "freq_GHz": FREQ_REF_GHZ, "package_version": __version__,
                  "smoothing": "Gaussian in log intensity, harmonic-space rotation to Galactic",
                  "floor_filter": {"fit": floor, "filter": "sqrt(S / (S + N)) of the |b| > 30 ln-I spectrum"},
                  "command": "python -m pysm_vaedust.template"}
    return template, provenance


def write_template(path, template: np.ndarray, provenance: dict) -> Path:
    """Write a template FITS (healpy layout, TUNIT1 uK_RJ) with its provenance as a header card
    and a JSON sidecar, atomically."""
    header = [("FREQREF", provenance["freq_GHz"], "GHz"), ("FWHMDEG", provenance["fwhm_deg"]),
              ("SRCSHA", provenance["sha256"][:64])]
    atomic_write(path, lambda tmp: hp.write_map(tmp, template.astype(np.float32), coord="G",
                                                column_units="uK_RJ", extra_header=header,
                                                overwrite=True, dtype=np.float32))
    sidecar = Path(str(path) + ".json")
    atomic_write(sidecar, lambda tmp: Path(tmp).write_text(json.dumps(provenance, indent=1)))
    return Path(path)


def read_template(path) -> tuple[np.ndarray, float | None, float | None]:
    """Read a template FITS: (map uK_RJ RING float64, reference frequency GHz or None when the
    file has no FREQREF card, FWHM deg or None). The unit must be uK_RJ (TUNIT1)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"template {str(path)!r} does not exist")
    values = hp.read_map(path, field=0, dtype=np.float64)
    with fits.open(path) as hdus:
        header = hdus[1].header if len(hdus) > 1 else hdus[0].header
    unit = str(header.get("TUNIT1", "")).strip()
    if unit not in ("uK_RJ", "uK RJ"):
        raise ValueError(f"template {str(path)!r} has unit {unit!r}; expected uK_RJ")
    check_positive_finite(values, f"template {str(path)!r}")
    freq = header.get("FREQREF")
    return values, None if freq is None else float(freq), header.get("FWHMDEG")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pysm_vaedust.template",
                                     description="Rebuild the bundled large-scale template from a dust map.")
    parser.add_argument("--input", default=str(shared_data_dir() / "planck_ebv_nside256_ring_icrs.fits.gz"))
    parser.add_argument("--fwhm_deg", type=float, default=TEMPLATE_FWHM_DEG)
    parser.add_argument("--input_fwhm_deg", type=float, default=PLANCK_EBV_FWHM_DEG)
    parser.add_argument("--nside", type=int, default=TEMPLATE_NSIDE)
    parser.add_argument("--output", default=str(default_template_path()))
    args = parser.parse_args(argv)
    template, provenance = build_template(args.input, args.fwhm_deg, args.nside, args.input_fwhm_deg)
    print(f"wrote {write_template(args.output, template, provenance)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
