"""Stage 1 — data: read HEALPix dust maps, convert to 545 GHz intensity, handle frames.

Conventions: maps are returned RING-ordered float64 numpy arrays; frames are healpy
letters ("G" Galactic, "C" ICRS/equatorial, "E" ecliptic); intensity in MJy/sr.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import warnings
from dataclasses import dataclass, field as dataclass_field
from pathlib import Path

import healpy as hp
import numpy as np
from astropy import constants as const
from astropy import units as u
from astropy.io import fits

#: Planck 2013 XI (A&A 571, A11): E(B-V) = 1.49e4 * tau_353 (extragalactic calibration).
EBV_PER_TAU353 = 1.49e4
#: All-sky mean modified-black-body parameters of Planck 2013 XI.
T_DUST_K = 19.7
BETA_DUST = 1.62
#: Reference frequency of the product (the seed trained on GNILC 545 GHz).
FREQ_REF_GHZ = 545.0

_FRAME_ALIASES = {
    "G": "G", "GALACTIC": "G",
    "C": "C", "ICRS": "C", "EQUATORIAL": "C", "FK5": "C", "CELESTIAL": "C",
    "E": "E", "ECLIPTIC": "E",
}
_QUANTITIES = ("ebv", "tau353", "intensity_MJysr")


def file_digest(path, algorithm: str = "sha256") -> str:
    """Hex digest (sha256 by default) of a file's bytes."""
    digest = hashlib.new(algorithm)
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def atomic_write(path, write_fn) -> Path:
    """Call write_fn(tmp_path) then rename tmp_path to `path`; no partial file on failure."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write_fn(tmp)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return path


def normalize_frame(frame: str) -> str:
    """Map a frame name ('icrs', 'galactic', 'G', ...) to a healpy coordinate letter."""
    key = str(frame).strip().upper()
    if key not in _FRAME_ALIASES:
        raise ValueError(f"unknown coordinate frame {frame!r}; expected one of {sorted(_FRAME_ALIASES)}")
    return _FRAME_ALIASES[key]


@dataclass(frozen=True)
class DustMap:
    """A full-sky dust intensity map: at 545 GHz when converted from E(B-V) or tau353, at the
    map's own frequency otherwise (the IRIS mosaic: 100 um; see provenance()).

    intensity: (12 nside^2,) float64, MJy/sr, RING ordering, in `frame`; NaN = no data where the
    map was loaded with allow_missing.
    """

    intensity: np.ndarray
    frame: str
    nside: int
    source: str
    sha256: str
    quantity: str
    extra: dict = dataclass_field(default_factory=dict)  # JSON-able provenance of derived maps (e.g. the IRIS mosaic)

    def provenance(self) -> dict:
        """JSON-able description of where the map came from (with the modified black body and
        frequency for maps converted from E(B-V) or tau353)."""
        converted = {"T_dust_K": T_DUST_K, "beta_dust": BETA_DUST, "freq_GHz": FREQ_REF_GHZ} \
            if self.quantity in ("ebv", "tau353") else {}
        return {"source": self.source, "sha256": self.sha256, "frame": self.frame,
                "nside": self.nside, "input_quantity": self.quantity, **converted, **self.extra}


def read_healpix_map(path, frame: str | None = None, nest: bool | None = None, field: int = 0):
    """Read one field of a HEALPix FITS map.

    Ordering and frame come from the header (NESTED/ORDERING, COORDSYS/FRAME) unless given.
    Returns (map RING float64 (npix,), frame letter, header dict).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"HEALPix map {str(path)!r} does not exist")
    try:
        with fits.open(path) as hdus:
            hdu = next((h for h in hdus if h.data is not None), None)
            if hdu is None:
                raise ValueError("no HDU holds data")
            header = dict(hdu.header)
            if isinstance(hdu, fits.BinTableHDU):
                data = np.asarray(hdu.data.field(field), dtype=np.float64).ravel()
            else:
                data = np.asarray(hdu.data, dtype=np.float64)
                data = data[field] if data.ndim == 2 else data.ravel()
    except (OSError, ValueError, TypeError, IndexError, KeyError) as err:
        raise ValueError(f"cannot read a HEALPix map from {str(path)!r}: {err}") from err
    if not hp.isnpixok(data.size):
        raise ValueError(f"{str(path)!r} holds {data.size} values, not a HEALPix pixel count 12*nside^2")
    if nest is None:
        ordering = str(header.get("ORDERING", "")).upper()
        nest = bool(header.get("NESTED", False)) or ordering.startswith("NEST")
    if frame is None:
        frame = header.get("COORDSYS") or header.get("FRAME")
        if frame is None:
            raise ValueError(f"{str(path)!r} has no COORDSYS/FRAME header key: pass frame=... explicitly")
    if nest:
        data = hp.reorder(data, n2r=True)
    return data, normalize_frame(frame), header


def check_positive_finite(values: np.ndarray, what: str) -> None:
    """Raise ValueError if `values` holds NaN/inf or non-positive entries (before a log)."""
    bad = ~np.isfinite(values) | (values <= 0)
    if bad.any():
        first = int(np.flatnonzero(bad)[0])
        raise ValueError(
            f"{what} has {int(bad.sum())} non-finite or non-positive values "
            f"(first at index {first}: {values.flat[first]!r}); expected finite values > 0 before a log")


def planck_nu(freq_GHz, T_K) -> np.ndarray:
    """Planck function B_nu(T) in MJy/sr."""
    nu = np.asarray(freq_GHz, dtype=np.float64) * 1e9
    x = const.h.value * nu / (const.k_B.value * np.asarray(T_K, dtype=np.float64))
    b_si = 2 * const.h.value * nu**3 / const.c.value**2 / np.expm1(x)  # W m^-2 Hz^-1 sr^-1
    return b_si * 1e20  # 1 MJy = 1e-20 W m^-2 Hz^-1


def tau353_to_intensity(tau353, freq_GHz=FREQ_REF_GHZ, T_K=T_DUST_K, beta=BETA_DUST):
    """Modified black body I_nu = tau353 B_nu(T) (nu / 353 GHz)^beta, in MJy/sr."""
    return np.asarray(tau353) * planck_nu(freq_GHz, T_K) * (np.asarray(freq_GHz) / 353.0) ** beta


#: IRIS / IRAS 100 um band centre, GHz (the intensity unit the conditional model learned)
IRIS_FREQ_GHZ = 2997.92


def log_offset_to_100um(freq_GHz: float, T_K: float = T_DUST_K, beta: float = BETA_DUST) -> float:
    """ln of the factor turning dust intensity in uK_RJ at `freq_GHz` into MJy/sr at 100 um
    (modified black body of T_K, beta: an approximation, used only for the condition's
    patch-mean brightness)."""
    with np.errstate(over="ignore", divide="ignore", invalid="ignore"):
        log_sed = (beta * np.log(IRIS_FREQ_GHZ / freq_GHz) + np.log(planck_nu(IRIS_FREQ_GHZ, T_K))
                   - np.log(planck_nu(freq_GHz, T_K)))
    if not np.isfinite(log_sed):
        raise ValueError(f"mbb_temperature={T_K!r} K, mbb_index={beta!r}: the modified black body from {freq_GHz} GHz "
                         "to 100 um over- or underflows float64; expected a dust-like temperature and index")
    return float(log_sed - np.log(MJysr_to_uK_RJ(freq_GHz)))


def MJysr_to_uK_RJ(freq_GHz=FREQ_REF_GHZ) -> float:
    """Factor converting MJy/sr to uK_RJ at `freq_GHz`."""
    return float((1 * u.MJy / u.sr).to_value(u.uK, equivalencies=u.brightness_temperature(freq_GHz * u.GHz)))


def load_dust_map(path, quantity: str | None = None, frame: str | None = None,
                  nest: bool | None = None, allow_missing: bool = False) -> DustMap:
    """Load a dust map and convert it to 545 GHz intensity in MJy/sr.

    quantity: 'ebv' (E(B-V), mag), 'tau353' or 'intensity_MJysr'; default from the QUANT header.
    allow_missing: keep NaN and HEALPix UNSEEN pixels as NaN (the cutout stage leaves out the
    patches on them) instead of refusing the map; a map with no finite positive pixel is refused.
    """
    values, frame, header = read_healpix_map(path, frame=frame, nest=nest)
    if allow_missing:
        values = np.where(values == hp.UNSEEN, np.nan, values)
        if not np.any(np.isfinite(values) & (values > 0)):
            raise ValueError(f"dust map {str(path)!r} has no finite positive pixel")
    if quantity is None:
        quant = str(header.get("QUANT", "")).upper().replace(" ", "")
        quantity = {"E(B-V)": "ebv", "EBV": "ebv", "TAU353": "tau353"}.get(quant)
        if quantity is None:
            raise ValueError(f"{str(path)!r}: cannot tell the quantity from QUANT={quant!r}; "
                             f"pass quantity= one of {_QUANTITIES}")
    if quantity not in _QUANTITIES:
        raise ValueError(f"unknown quantity {quantity!r}; expected one of {_QUANTITIES}")
    if not allow_missing:
        check_positive_finite(values, f"dust map {str(path)!r}")
    if quantity == "ebv":
        intensity = tau353_to_intensity(values / EBV_PER_TAU353)
    elif quantity == "tau353":
        intensity = tau353_to_intensity(values)
    else:
        intensity = values
    return DustMap(intensity=intensity, frame=frame, nside=hp.npix2nside(values.size),
                   source=os.path.basename(str(path)), sha256=file_digest(path), quantity=quantity)


def shared_data_dir() -> Path:
    """Folder of the real data: $PYSM_VAEDUST_DATA, else ../shared/data beside the repository."""
    env = os.environ.get("PYSM_VAEDUST_DATA")
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[2] / "shared" / "data"


def load_ngp_image(path=None) -> np.ndarray:
    """The 500x500 north-Galactic-pole image (E(B-V)-like, 2.37' pixels) as 545 GHz MJy/sr, float64."""
    path = Path(path) if path is not None else shared_data_dir() / "planck_dust_ngp_500px.npy"
    if not path.is_file():
        raise FileNotFoundError(f"north-pole image {str(path)!r} does not exist")
    with warnings.catch_warnings():  # the file was saved by Python 2: numpy warns, then reads it fine
        warnings.filterwarnings("ignore", message="Reading `.npy` or `.npz` file required additional")
        image = np.asarray(np.load(path), dtype=np.float64)
    if image.ndim != 2 or image.shape[0] != image.shape[1]:
        raise ValueError(f"{str(path)!r}: expected a square 2D image, got shape {image.shape}")
    check_positive_finite(image, f"north-pole image {str(path)!r}")
    return tau353_to_intensity(image / EBV_PER_TAU353)


NGP_PIXEL_ARCMIN = 2.37


def smoothstep(x: np.ndarray) -> np.ndarray:
    """0 below 0, 1 above 1, 3x^2 - 2x^3 between."""
    x = np.clip(x, 0.0, 1.0)
    return x * x * (3 - 2 * x)


def masked_alm(m: np.ndarray, mask: np.ndarray, lmax: int) -> np.ndarray:
    """Harmonic coefficients (healpy's layout, up to lmax) of map m on the apodised mask, its
    weighted mean removed."""
    m = np.where(mask > 0, m, 0.0)
    mean = np.sum(m * mask) / np.sum(mask)
    return hp.map2alm((m - mean) * mask, lmax=lmax, use_pixel_weights=False, iter=1)


def masked_spectrum(m: np.ndarray, mask: np.ndarray, lmax: int) -> np.ndarray:
    """Pseudo-C_l (lmax + 1,) of map m on the apodised mask (`masked_alm`), divided by the mask's
    mean square."""
    return hp.alm2cl(masked_alm(m, mask, lmax)) / np.mean(mask**2)


def gaussian_beam(lmax: int, fwhm_arcmin: float) -> np.ndarray:
    """B_l (lmax + 1,) of a Gaussian beam."""
    return hp.gauss_beam(np.radians(fwhm_arcmin / 60), lmax=lmax)


def fit_dust_law(cl: np.ndarray, beam_fwhm_arcmin: float, ell_range=(100, 3000), floor_beamed: bool = True) -> dict:
    """Fit C_l = B_l^2 (A l^alpha + F) (or B_l^2 A l^alpha + F when not `floor_beamed`: noise
    or pixelisation after the beam) over ell_range (log least squares on Delta ell = 20 bins,
    alpha scanned): {A, alpha, F, rms (fractional rms of the fit)}."""
    lmax = len(cl) - 1
    b2 = gaussian_beam(lmax, beam_fwhm_arcmin) ** 2
    edges = np.arange(int(ell_range[0]), int(min(ell_range[1], lmax)) + 1, 20)
    centre = 0.5 * (edges[1:] + edges[:-1])
    data = np.array([cl[lo:hi].mean() for lo, hi in zip(edges[:-1], edges[1:])])
    beam = np.array([b2[lo:hi].mean() for lo, hi in zip(edges[:-1], edges[1:])])
    best = None
    for alpha in np.arange(-4.0, -1.5, 0.005):
        design = np.stack([beam * centre**alpha, beam if floor_beamed else np.ones(len(data))], 1) / data[:, None]
        coef, *_ = np.linalg.lstsq(design, np.ones(len(data)), rcond=None)
        if coef[0] <= 0 or coef[1] < 0:
            continue
        rms = float(np.sqrt(np.mean((design @ coef - 1) ** 2)))
        if best is None or rms < best["rms"]:
            best = {"A": float(coef[0]), "alpha": float(alpha), "F": float(coef[1]), "rms": rms}
    if best is None:
        raise ValueError("no positive power law + floor fits the spectrum")
    return best
