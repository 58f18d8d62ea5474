"""Stage 1 — data, IRIS: 100 um plates -> point sources masked and filled -> one Galactic HEALPix mosaic.

IRIS (Miville-Deschenes & Lagache 2005, ApJS 157, 302) is the reprocessed IRAS survey; the shared
copy (``../shared/data/iris_100um``) holds 430 gnomonic plates of 250 x 250 pixels of 3.0' in FK4
B1950 equatorial coordinates, MJy/sr, 4.3' FWHM, NaN where no data, point sources still in.

``iris_mosaic(nside)`` returns the mosaic as a :class:`pysm_vaedust.data.DustMap` (Galactic,
RING, MJy/sr, NaN where no plate has data), building it on first use and caching it outside the
repository (``$PYSM_VAEDUST_CACHE``, else ``~/.cache/pysm_vaedust``) next to a JSON provenance
record with the input checksums and the file's own sha256. A cache whose inputs, parameters or
bytes do not match is rebuilt (with a warning when the bytes are corrupt); concurrent builders
serialise on a lock file; every file is written under a temporary name and renamed.
Command line: ``pysm_vaedust-mosaic --nside 2048``.
"""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import json
import os
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import healpy as hp
import numpy as np
from astropy import units as u
from astropy.coordinates import SkyCoord
from astropy.io import fits
from astropy.wcs import WCS
from scipy import ndimage
from tqdm.auto import tqdm

from . import sources
from .checks import check_nside, check_real
from .cutouts import EXTRAGALACTIC_DISCS
from .data import DustMap, atomic_write, file_digest, shared_data_dir, smoothstep

IRIS_DIR_NAME = "iris_100um"
MANIFEST = "SHA256SUMS"
BEAM_FWHM_ARCMIN = 4.3
#: bump when the mosaic code changes: caches built by another version are rebuilt
MOSAIC_VERSION = 2
#: mosaic blending: plate weights rise as sin^2 from 0 at the plate edge to 1 this far inside (pixels)
EDGE_TAPER_PIX = 20.0
#: point sources: median-filter width of the diffuse level, window of the local robust scatter,
#: least Hessian eigenvalue ratio of a source, detection passes, diffusion-fill iterations
BACKGROUND_PIX, SCATTER_PIX, MIN_ROUNDNESS, DETECTION_PASSES, FILL_ITERATIONS = 9, 31, 0.5, 3, 200


# ------------------------------------------------------------------------------------ plates
@dataclass(frozen=True)
class Plate:
    """One IRIS plate: values (ny, nx) float64 MJy/sr (NaN = no data) and its celestial WCS."""

    name: str
    values: np.ndarray
    wcs: WCS
    pixel_arcmin: float

    def galactic_lonlat(self) -> tuple[np.ndarray, np.ndarray]:
        """Galactic (lon, lat) in degrees of every pixel centre, each (ny, nx)."""
        rows, cols = np.indices(self.values.shape)
        coords = self.wcs.pixel_to_world(cols, rows).galactic
        return coords.l.deg, coords.b.deg

    def pixel_of(self, lon_deg, lat_deg) -> tuple[np.ndarray, np.ndarray]:
        """Plate pixel coordinates (col, row) (0-based, float) of Galactic directions (degrees)."""
        coords = SkyCoord(np.asarray(lon_deg) * u.deg, np.asarray(lat_deg) * u.deg, frame="galactic")
        col, row = self.wcs.world_to_pixel(coords)
        return np.asarray(col), np.asarray(row)


def read_plate(path) -> Plate:
    """Read an IRIS plate; ValueError naming the file if it has no usable celestial TAN WCS in a
    known frame (FK4 B1950, FK5 or ICRS), no 2D image, or units other than MJy/sr."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"IRIS plate {str(path)!r} does not exist")
    try:
        with fits.open(path) as hdus:
            header, data = hdus[0].header, hdus[0].data
            if data is None or data.ndim != 2:
                raise ValueError(f"expected a 2D image in the primary HDU, got {None if data is None else data.shape}")
            values = np.asarray(data, dtype=np.float64)
        with warnings.catch_warnings():  # IRIS headers carry non-standard keys astropy warns about
            warnings.simplefilter("ignore")
            wcs = WCS(header).celestial
    except (OSError, ValueError, TypeError, KeyError) as err:
        raise ValueError(f"cannot read IRIS plate {str(path)!r}: {err}") from err
    if not any(key in header for key in ("RADESYS", "EQUINOX", "EPOCH")):
        raise ValueError(f"IRIS plate {str(path)!r}: no RADESYS, EQUINOX or EPOCH keyword: its celestial frame "
                         f"is unknown (IRIS plates are FK4 B1950)")
    ctypes = tuple(wcs.wcs.ctype)
    if wcs.naxis != 2 or not all(c.endswith("-TAN") for c in ctypes):
        raise ValueError(f"IRIS plate {str(path)!r}: expected a gnomonic celestial WCS (RA---TAN, DEC--TAN), "
                         f"got CTYPE {ctypes}")
    frame = (wcs.wcs.radesys or "").strip().upper()
    if frame not in ("FK4", "FK5", "ICRS"):
        raise ValueError(f"IRIS plate {str(path)!r}: unknown celestial frame RADESYS={frame!r}; "
                         f"expected 'FK4' (IRIS B1950), 'FK5' or 'ICRS'")
    unit = str(header.get("BUNIT", "")).strip().upper().replace(" ", "")
    if unit != "MJY/SR":
        raise ValueError(f"IRIS plate {str(path)!r}: BUNIT={header.get('BUNIT')!r}, expected 'MJy/sr'")
    pixel_arcmin = 60.0 * float(np.sqrt(abs(np.linalg.det(wcs.pixel_scale_matrix))))
    return Plate(name=path.name, values=values, wcs=wcs, pixel_arcmin=pixel_arcmin)


def iris_directory(directory=None) -> Path:
    """The IRIS plate folder: `directory`, else <shared data>/iris_100um."""
    path = Path(directory) if directory is not None else shared_data_dir() / IRIS_DIR_NAME
    if not (path / MANIFEST).is_file():
        raise FileNotFoundError(f"no IRIS plates at {str(path)!r}: expected a folder with {MANIFEST} and the plates")
    return path


def plate_checksums(directory, names=None) -> dict[str, str]:
    """{plate file name: sha256} of the plates listed in the folder's SHA256SUMS (or `names` of
    them), each checked against the manifest: ValueError naming a corrupted or missing plate."""
    directory = iris_directory(directory)
    manifest = {}
    for number, line in enumerate((directory / MANIFEST).read_text().splitlines(), 1):
        if line.strip():
            fields = line.split()
            if len(fields) != 2 or len(fields[0]) != 64:
                raise ValueError(f"{str(directory / MANIFEST)!r} line {number}: expected '<sha256> <file name>', "
                                 f"got {line!r}")
            manifest[fields[1].lstrip("*")] = fields[0].lower()
    names = sorted(manifest) if names is None else list(names)
    if not names:
        raise ValueError(f"no IRIS plates requested from {str(directory)!r}")
    checked = {}
    for name in names:
        if name not in manifest:
            raise ValueError(f"IRIS plate {name!r} is not listed in {str(directory / MANIFEST)!r}")
        path = directory / name
        if not path.is_file():
            raise FileNotFoundError(f"IRIS plate {str(path)!r} is listed in {MANIFEST} but missing")
        actual = file_digest(path)
        if actual != manifest[name]:
            raise ValueError(f"IRIS plate {str(path)!r} is corrupted: sha256 {actual}, "
                             f"{MANIFEST} says {manifest[name]}")
        checked[name] = actual
    return checked


# ----------------------------------------------------------------------------- point sources
@dataclass(frozen=True)
class PointSources:
    """Detections on one image: peak (row, col) (K, 2) int, matched-filter S/N (K,), mask (ny, nx)."""

    peaks: np.ndarray
    snr: np.ndarray
    mask: np.ndarray


def matched_filter(image, beam_fwhm_pix: float, background_pix: int = BACKGROUND_PIX,
                   scatter_pix: int = SCATTER_PIX) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(S/N, local scatter sigma, filled image), each (ny, nx), of a beam-shaped source at each pixel.

    image (ny, nx), NaN = no data (filled from the nearest valid pixel, so the edges of missing
    regions make no steps). The diffuse level is a `background_pix` median filter; the residual is
    matched-filtered with the beam (Gaussian, `beam_fwhm_pix` FWHM: a source of peak A gives ~A/2)
    and divided by its local robust scatter sigma (1.4826 x the median absolute matched residual in
    `scatter_pix` windows, on a 3x coarser grid)."""
    image = np.asarray(image, dtype=np.float64)
    valid = np.isfinite(image)
    nearest = ndimage.distance_transform_edt(~valid, return_distances=False, return_indices=True)
    filled = image[tuple(nearest)]
    residual = filled - ndimage.median_filter(filled, size=background_pix, mode="reflect")
    matched = ndimage.gaussian_filter(residual, beam_fwhm_pix / np.sqrt(8 * np.log(2)), mode="reflect")
    coarse = ndimage.median_filter(np.abs(matched)[::3, ::3], size=max(scatter_pix // 3, 3), mode="reflect")
    scatter = 1.4826 * ndimage.zoom(coarse, np.divide(image.shape, coarse.shape), order=1, mode="nearest")
    with np.errstate(over="ignore"):
        return matched / np.maximum(scatter, np.finfo(float).tiny), scatter, filled


def find_point_sources(image, beam_fwhm_pix: float, threshold: float = 5.0, background_pix: int = BACKGROUND_PIX,
                       scatter_pix: int = SCATTER_PIX, min_roundness: float = MIN_ROUNDNESS) -> PointSources:
    """Compact sources above the local diffuse level: local maxima of matched_filter's S/N above
    `threshold` whose beam-scale Hessian of the image is round (eigenvalue ratio > `min_roundness`,
    rotation-invariant Gaussian derivatives: elongated dust ridges are not sources). Each masks
    the disc where its matched profile (sigma_beam sqrt 2) exceeds half the local scatter, plus
    one pixel. image (ny, nx), NaN = no data (never masked)."""
    image = np.asarray(image, dtype=np.float64)
    if image.ndim != 2:
        raise ValueError(f"image: expected a 2D array, got shape {image.shape}")
    if not beam_fwhm_pix > 0 or not threshold > 0:
        raise ValueError(f"beam_fwhm_pix={beam_fwhm_pix!r}, threshold={threshold!r}: expected positive numbers")
    valid = np.isfinite(image)
    if not valid.any():
        return PointSources(np.zeros((0, 2), int), np.zeros(0), np.zeros(image.shape, bool))
    snr, _, filled = matched_filter(image, beam_fwhm_pix, background_pix, scatter_pix)
    beam_sigma = beam_fwhm_pix / np.sqrt(8 * np.log(2))
    peak = (snr > threshold) & (snr == ndimage.maximum_filter(snr, size=3)) & valid
    rows, cols = np.nonzero(peak)
    # roundness: ratio of the Hessian eigenvalues of the beam-smoothed image at the peak (1 for a point source)
    d_rr, d_cc, d_rc = (ndimage.gaussian_filter(filled, beam_sigma, order=order, mode="reflect")[rows, cols]
                        for order in ((2, 0), (0, 2), (1, 1)))
    half_trace, root = 0.5 * (d_rr + d_cc), np.sqrt(0.25 * (d_rr - d_cc) ** 2 + d_rc ** 2)
    lam_strong, lam_weak = half_trace - root, half_trace + root  # both < 0 at a round maximum
    with np.errstate(invalid="ignore", divide="ignore"):
        round_enough = (lam_strong < 0) & (lam_weak < 0) & (lam_weak / lam_strong > min_roundness)
    rows, cols, ratio = rows[round_enough], cols[round_enough], snr[rows, cols][round_enough]
    mask = np.zeros(image.shape, bool)
    profile_sigma = np.sqrt(2) * beam_sigma  # beam convolved with the matched filter
    radius = 1.0 + profile_sigma * np.sqrt(2 * np.log(np.maximum(2 * ratio, 1.0)))
    for r0, c0, rad in zip(rows, cols, radius):
        k = int(np.ceil(rad))
        r_lo, r_hi = max(r0 - k, 0), min(r0 + k + 1, image.shape[0])
        c_lo, c_hi = max(c0 - k, 0), min(c0 + k + 1, image.shape[1])
        rr, cc = np.ogrid[r_lo:r_hi, c_lo:c_hi]
        mask[r_lo:r_hi, c_lo:c_hi] |= (rr - r0) ** 2 + (cc - c0) ** 2 <= rad ** 2
    return PointSources(np.stack([rows, cols], 1), ratio, mask & valid)


def diffusion_fill(image, mask, iterations: int = FILL_ITERATIONS) -> np.ndarray:
    """Fill the masked pixels of image (ny, nx) by diffusion (Jacobi iterations of Laplace's
    equation from the unmasked pixels around them, starting from a 9-pixel median); unmasked and
    NaN pixels are returned as they are."""
    image = np.asarray(image, dtype=np.float64)
    mask = np.asarray(mask, bool) & np.isfinite(image)
    if not mask.any():
        return image.copy()
    known = np.isfinite(image) & ~mask
    out = np.where(known, image, 0.0)
    out[mask] = ndimage.median_filter(np.where(known, image, np.nanmedian(image[known]) if known.any() else 0.0),
                                      size=9)[mask]
    weight = (known | mask).astype(float)
    w = np.pad(weight, 1)
    count = w[:-2, 1:-1] + w[2:, 1:-1] + w[1:-1, :-2] + w[1:-1, 2:]
    update = mask & (count > 0)  # a pixel with no neighbour holding data keeps its start value
    for _ in range(iterations):
        padded = np.pad(out * weight, 1)
        total = padded[:-2, 1:-1] + padded[2:, 1:-1] + padded[1:-1, :-2] + padded[1:-1, 2:]
        out[update] = (total / np.maximum(count, 1))[update]
    return np.where(np.isfinite(image), out, np.nan)


def clean_plate(plate: Plate, threshold: float = 5.0) -> tuple[np.ndarray, PointSources]:
    """Plate values with the point sources masked and filled by diffusion, and the detections.
    Detection is repeated on the filled image (at most DETECTION_PASSES passes) until no new source
    appears, so residuals at the edges of a first mask are caught too."""
    beam_pix = BEAM_FWHM_ARCMIN / plate.pixel_arcmin
    found = find_point_sources(plate.values, beam_pix, threshold)
    cleaned = diffusion_fill(plate.values, found.mask)
    for _ in range(DETECTION_PASSES - 1):
        again = find_point_sources(cleaned, beam_pix, threshold)
        if not again.snr.size:
            break
        found = PointSources(np.concatenate([found.peaks, again.peaks]), np.concatenate([found.snr, again.snr]),
                             found.mask | again.mask)
        cleaned = diffusion_fill(plate.values, found.mask)
    return cleaned, found


# ------------------------------------------------------------------------------------ mosaic
def plate_edge_distance(col, row, shape) -> np.ndarray:
    """Distance (plate pixels) of plate pixel coordinates (col, row) inside the plate's edge
    (the outer edges of its first and last pixels); negative outside."""
    ny, nx = shape
    return np.minimum.reduce([col + 0.5, nx - 0.5 - col, row + 0.5, ny - 0.5 - row])


def edge_weight(col, row, shape, taper_pix: float = EDGE_TAPER_PIX) -> np.ndarray:
    """Blending weight of plate pixel coordinates: sin^2 from 0 at the plate edge to 1 at
    `taper_pix` inside; 0 outside the plate."""
    return np.sin(0.5 * np.pi * np.clip(plate_edge_distance(col, row, shape) / taper_pix, 0.0, 1.0)) ** 2


def plate_footprint(plate: Plate, nside: int) -> np.ndarray:
    """RING pixels (nside) whose centres may fall on the plate (a disc about its centre)."""
    ny, nx = plate.values.shape
    corners = plate.wcs.pixel_to_world(np.array([-0.5, nx - 0.5, -0.5, nx - 0.5, 0.5 * (nx - 1)]),
                                       np.array([-0.5, -0.5, ny - 0.5, ny - 0.5, 0.5 * (ny - 1)])).galactic
    vec = hp.ang2vec(corners.l.deg, corners.b.deg, lonlat=True)
    radius = np.max(np.arccos(np.clip(vec[:4] @ vec[4], -1, 1)))
    return hp.query_disc(nside, vec[4], radius + 2 * hp.nside2resol(nside), inclusive=False)


def plate_coordinates(plate: Plate, nside: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(RING pixels of the plate's footprint, their plate (col, row) coordinates, each (K,))."""
    pix = plate_footprint(plate, nside)
    col, row = plate.pixel_of(*hp.pix2ang(nside, pix, lonlat=True))
    return pix, col, row


def add_plate(sum_wv: np.ndarray, sum_w: np.ndarray, values: np.ndarray, plate: Plate,
              taper_pix: float = EDGE_TAPER_PIX) -> None:
    """Accumulate one plate's bilinear samples at the mosaic's pixel centres, weighted by
    edge_weight, into sum_wv and sum_w (RING, nside from their size). NaN samples weigh 0."""
    pix, col, row = plate_coordinates(plate, hp.npix2nside(sum_w.size))
    weight = edge_weight(col, row, values.shape, taper_pix)
    keep = weight > 0
    pix, col, row, weight = pix[keep], col[keep], row[keep], weight[keep]
    good = np.isfinite(values)
    sample = ndimage.map_coordinates(np.where(good, values, 0.0), [row, col], order=1, mode="nearest")
    coverage = ndimage.map_coordinates(good.astype(float), [row, col], order=1, mode="nearest")
    weight = np.where(coverage > 1 - 1e-6, weight, 0.0)  # all four neighbours hold data
    sum_wv[pix] += weight * sample  # query_disc pixels are unique: no np.add.at needed
    sum_w[pix] += weight


def seam_statistic(mosaic: np.ndarray, plates, edge_pix: float = 1.0) -> dict:
    """How much a mosaic (RING (npix,), NaN = no data) jumps at plate borders: the mean
    |m - mean of its 8 neighbours| / m over pixels within `edge_pix` plate pixels of an edge of one
    of `plates` that another plate also covers, over the same mean at the other covered pixels
    (1 = no seams; a 1-pixel step of 3 % between plates gives ~1.3 at nside 1024)."""
    nside = hp.npix2nside(mosaic.size)
    covered = np.flatnonzero(np.isfinite(mosaic))
    neighbours = hp.get_all_neighbours(nside, covered)
    values = np.where(neighbours >= 0, mosaic[np.maximum(neighbours, 0)], np.nan)
    complete = np.isfinite(values).all(0)
    jump = np.abs(mosaic[covered] - values.mean(0)) / mosaic[covered]
    index = np.full(mosaic.size, -1)
    index[covered] = np.arange(covered.size)
    on_plates, at_edge = np.zeros(covered.size, int), np.zeros(covered.size, bool)
    for plate in plates:
        pix, col, row = plate_coordinates(plate, nside)
        distance = plate_edge_distance(col, row, plate.values.shape)
        where = index[pix]
        inside = (where >= 0) & (distance > 0)
        on_plates[where[inside]] += 1
        at_edge[where[(where >= 0) & (np.abs(distance) < edge_pix)]] = True
    border = at_edge & (on_plates >= 2) & complete
    interior = ~at_edge & complete
    if not border.any():
        raise ValueError("no plate border lies inside another plate: nothing to measure seams on")
    return {"mean_jump_border": float(jump[border].mean()), "mean_jump_elsewhere": float(jump[interior].mean()),
            "ratio": float(jump[border].mean() / jump[interior].mean()), "border_pixels": int(border.sum())}


def _recipe(nside: int, threshold: float) -> dict:
    """Every setting the mosaic depends on besides its input plates (the cache key holds them all)."""
    return {"nside": int(nside), "threshold": float(threshold), "mosaic_version": MOSAIC_VERSION,
            "beam_fwhm_arcmin": BEAM_FWHM_ARCMIN, "edge_taper_pix": EDGE_TAPER_PIX,
            "background_pix": BACKGROUND_PIX, "scatter_pix": SCATTER_PIX, "min_roundness": MIN_ROUNDNESS,
            "detection_passes": DETECTION_PASSES, "fill_iterations": FILL_ITERATIONS}


def build_mosaic(directory=None, nside: int = 2048, names=None, threshold: float = 5.0,
                 progress: bool = True) -> tuple[np.ndarray, dict]:
    """Mosaic of the cleaned plates: (12 nside^2,) float32 MJy/sr, Galactic RING, NaN where no
    plate has data; and a provenance dict (inputs' sha256, recipe, point-source statistics, timing)."""
    nside = check_nside(nside)
    tic = time.time()
    directory = iris_directory(directory)
    checksums = plate_checksums(directory, names)
    sum_wv, sum_w = np.zeros(hp.nside2npix(nside)), np.zeros(hp.nside2npix(nside))
    n_sources, n_masked, n_valid = 0, 0, 0
    for name in tqdm(sorted(checksums), desc=f"IRIS mosaic nside {nside}", disable=not progress, unit="plate"):
        plate = read_plate(directory / name)
        cleaned, found = clean_plate(plate, threshold)
        add_plate(sum_wv, sum_w, cleaned, plate)
        n_sources += len(found.snr)
        n_masked += int(found.mask.sum())
        n_valid += int(np.isfinite(plate.values).sum())
    with np.errstate(invalid="ignore", divide="ignore"):
        mosaic = np.where(sum_w > 0, sum_wv / sum_w, np.nan).astype(np.float32)
    info = {"inputs": checksums, **_recipe(nside, threshold), "ordering": "RING", "frame": "G", "units": "MJy/sr",
            "wavelength_um": 100.0,
            "point_sources": {"count": n_sources, "masked_pixel_fraction": n_masked / max(n_valid, 1)},
            "nan_fraction": float(np.mean(np.isnan(mosaic))), "build_time_s": time.time() - tic,
            "reference": "Miville-Deschenes & Lagache 2005, ApJS 157, 302 (IRIS)"}
    return mosaic, info


# ------------------------------------------------------------------------------------- cache
def default_cache_dir() -> Path:
    """Cache of derived data: $PYSM_VAEDUST_CACHE, else the downloads' cache (sources.default_cache_dir:
    $XDG_CACHE_HOME/pysm_vaedust, ~/.cache/pysm_vaedust)."""
    env = os.environ.get("PYSM_VAEDUST_CACHE")
    return Path(env) if env else sources.default_cache_dir()


def _trusted(fits_path: Path, record_path: Path, key: str) -> dict | None:
    """The provenance record when the cached mosaic is complete and matches `key`, else None
    (warning when the file is there but its bytes differ from the record)."""
    if not (fits_path.is_file() and record_path.is_file()):
        return None
    try:
        record = json.loads(record_path.read_text())
    except (OSError, ValueError):
        warnings.warn(f"unreadable mosaic record {str(record_path)!r}: rebuilding", stacklevel=3)
        return None
    if record.get("cache_key") != key:
        return None
    if file_digest(fits_path) != record.get("sha256"):
        warnings.warn(f"cached mosaic {str(fits_path)!r} is truncated or corrupted (sha256 differs from "
                      f"its record): rebuilding", stacklevel=3)
        return None
    return record


def iris_mosaic(nside: int = 2048, directory=None, cache_dir=None, names=None, threshold: float = 5.0,
                rebuild: bool = False, progress: bool = True) -> DustMap:
    """The cached IRIS mosaic as a DustMap (intensity (12 nside^2,) float64 MJy/sr at 100 um,
    NaN = no data), built (and cached) when missing, stale or corrupt. Concurrent callers wait on
    a lock and build it once; a killed build's temporary file is removed by the next builder."""
    nside = check_nside(nside)
    threshold = check_real(threshold, "threshold", positive=True)
    directory = iris_directory(directory)
    checksums = plate_checksums(directory, names)
    key = hashlib.sha256(json.dumps({"inputs": checksums, **_recipe(nside, threshold)},
                                    sort_keys=True).encode()).hexdigest()[:16]
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    fits_path = cache / f"iris100_mosaic_nside{nside}_{key}.fits"
    record_path = fits_path.with_suffix(".json")
    record = None if rebuild else _trusted(fits_path, record_path, key)
    if record is None:
        with open(cache / f".{fits_path.name}.lock", "w") as lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                print(f"waiting for another process building {fits_path.name} ...", file=sys.stderr)
                fcntl.flock(lock, fcntl.LOCK_EX)
            record = None if rebuild else _trusted(fits_path, record_path, key)  # built while we waited?
            if record is None:
                for stale in cache.glob(f".{fits_path.stem}.*.tmp"):  # left by a killed build (we hold the lock)
                    stale.unlink(missing_ok=True)
                record = _build_cache(directory, nside, names, threshold, fits_path, record_path, key, progress)
    values = hp.read_map(fits_path, dtype=np.float64)
    return DustMap(intensity=values, frame="G", nside=nside, source=f"{IRIS_DIR_NAME} mosaic ({fits_path.name})",
                   sha256=record["sha256"], quantity="intensity_MJysr_100um",
                   extra={"iris_manifest_sha256": file_digest(directory / MANIFEST), "wavelength_um": 100.0,
                          "mosaic": {k: record[k] for k in ("cache_key", "point_sources", "nan_fraction",
                                                            "build_time_s")}})


def _build_cache(directory, nside, names, threshold, fits_path: Path, record_path: Path, key: str,
                 progress: bool) -> dict:
    mosaic, info = build_mosaic(directory, nside, names, threshold, progress)
    header = [("BUNIT", "MJy/sr"), ("TELESCOP", "IRAS"), ("INSTRUME", "IRIS"), ("WAVELEN", 100.0),
              ("BEAMFWHM", BEAM_FWHM_ARCMIN), ("CACHEKEY", key)]
    atomic_write(fits_path, lambda tmp: hp.write_map(tmp, mosaic, coord="G", column_units="MJy/sr",
                                                     extra_header=header, overwrite=True, dtype=np.float32))
    record = {**info, "cache_key": key, "file": fits_path.name, "sha256": file_digest(fits_path)}
    atomic_write(record_path, lambda tmp: Path(tmp).write_text(json.dumps(record, indent=1)))
    return record


#: IRIS - delta is floored here before logs (MJy/sr; IRIS's pixel noise at nside 2048 is ~0.06):
#: 0.03 % of the pixels at |b| > 15 fall below 0 after the subtraction
ZERO_LEVEL_FLOOR_MJYSR = 0.05


def distance_to(nside: int, bad: np.ndarray) -> np.ndarray:
    """Angular distance (deg) from every pixel of `nside` to the nearest True pixel of `bad`
    ((npix,) bool at the same nside; at least one True)."""
    from scipy.spatial import cKDTree

    vec = np.stack(hp.pix2vec(nside, np.arange(hp.nside2npix(nside))), 1)
    chord, _ = cKDTree(vec[bad]).query(vec)
    return np.degrees(2 * np.arcsin(np.clip(chord / 2, 0, 1)))


def analysis_mask(nside: int, missing: np.ndarray | None = None, lat_min_deg: float = 30.0,
                  lat_taper_deg: float = 5.0, hole_grow_deg: float = 3.0, hole_taper_deg: float = 2.0) -> np.ndarray:
    """Apodised analysis mask (npix,) float64 in [0, 1]: |b| > lat_min (smoothstep over
    lat_taper above it), times 0 inside the LMC / SMC discs and within hole_grow of `missing`
    (bool (npix,) at `nside`, e.g. the mosaic's NaN), rising as a smoothstep over hole_taper."""
    _, lat = hp.pix2ang(nside, np.arange(hp.nside2npix(nside)), lonlat=True)
    mask = smoothstep((np.abs(lat) - lat_min_deg) / lat_taper_deg)
    bad = np.zeros(hp.nside2npix(nside), dtype=bool) if missing is None else np.asarray(missing, dtype=bool).copy()
    for name, lon0, lat0, radius in EXTRAGALACTIC_DISCS:
        if name in ("LMC", "SMC"):
            bad[hp.query_disc(nside, hp.ang2vec(lon0, lat0, lonlat=True), np.radians(radius))] = True
    if bad.any():
        # distances on a coarser grid (the taper is degrees wide), interpolated
        work = min(nside, 256)
        bad_work = hp.ud_grade(bad.astype(float), work) > 0
        dist = hp.get_interp_val(distance_to(work, bad_work), *hp.pix2ang(nside, np.arange(hp.nside2npix(nside))))
        mask *= smoothstep((dist - hole_grow_deg) / hole_taper_deg)
        mask[bad] = 0.0
    return mask


def zero_level(iris: np.ndarray, template: np.ndarray, mask: np.ndarray, fwhm_deg: float = 1.0,
               work_nside: int = 256) -> dict:
    """The intercept delta of IRIS = a T + delta, fitted at `fwhm_deg` (both maps smoothed,
    `work_nside`) on the pixels where `mask` > 0.5 (IRIS NaN left out): {delta, a, correlation,
    delta_halves (the fit on the northern and southern Galactic halves)}."""
    def smooth(x):
        x = hp.ud_grade(np.where(np.isfinite(x), x, hp.UNSEEN), work_nside)
        ok = x != hp.UNSEEN
        filled = np.where(ok, x, np.median(x[ok]))
        return hp.smoothing(filled, fwhm=np.radians(fwhm_deg), iter=1), ok

    i_s, ok_i = smooth(iris)
    t_s, _ = smooth(template)
    m = (hp.ud_grade(mask, work_nside) > 0.5) & ok_i
    _, lat = hp.pix2ang(work_nside, np.arange(hp.nside2npix(work_nside)), lonlat=True)

    def fit(sel):
        a, delta = np.polyfit(t_s[sel], i_s[sel], 1)
        return float(a), float(delta)

    a, delta = fit(m)
    return {"delta": delta, "a": a, "correlation": float(np.corrcoef(t_s[m], i_s[m])[0, 1]),
            "delta_halves": [fit(m & (lat > 0))[1], fit(m & (lat < 0))[1]], "fwhm_deg": fwhm_deg}


def subtract_zero_level(dust: DustMap, template: np.ndarray) -> DustMap:
    """IRIS - delta (`zero_level` against `template`, any nside, on the `analysis_mask` of the
    map's missing data), floored at ZERO_LEVEL_FLOOR_MJYSR: the map whose logs carry dust's own
    contrast (the CIB monopole and the plates' offsets removed); the fit goes into the provenance."""
    missing = ~np.isfinite(dust.intensity)
    fit = zero_level(dust.intensity, hp.ud_grade(template, dust.nside), analysis_mask(dust.nside, missing))
    values = np.where(missing, np.nan, np.maximum(dust.intensity - fit["delta"], ZERO_LEVEL_FLOOR_MJYSR))
    return DustMap(values, dust.frame, dust.nside, dust.source, dust.sha256, dust.quantity,
                   {**dust.extra, "zero_level": {**fit, "floor_MJysr": ZERO_LEVEL_FLOOR_MJYSR,
                                                 "template": "bundled (pysm_vaedust.template)"}})


def main(argv=None) -> int:
    """pysm_vaedust-mosaic: build (or check) the cached IRIS mosaic and print its provenance."""
    parser = argparse.ArgumentParser(prog="pysm_vaedust-mosaic", description=main.__doc__)
    parser.add_argument("--nside", type=int, default=2048, help="HEALPix nside (default 2048: 1.7' pixels)")
    parser.add_argument("--plates", type=Path, default=None, help="IRIS plate folder (default: shared data)")
    parser.add_argument("--cache-dir", type=Path, default=None, help="cache folder (default: $PYSM_VAEDUST_CACHE "
                                                                     "or ~/.cache/pysm_vaedust)")
    parser.add_argument("--rebuild", action="store_true", help="rebuild even when a valid cache exists")
    args = parser.parse_args(argv)
    try:
        dust = iris_mosaic(args.nside, args.plates, args.cache_dir, rebuild=args.rebuild)
    except (ValueError, FileNotFoundError) as err:
        parser.error(str(err))
    print(json.dumps({"source": dust.source, "sha256": dust.sha256, **dust.extra["mosaic"]}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
