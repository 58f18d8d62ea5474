"""Stage 2 — cutouts: gnomonic patches, region split, dihedral augmentation, normalisation.

Tangent-plane convention (used by every stage): a patch of `npix` x `npix` pixels of
`pixel_size_deg` centred at Galactic (lon0, lat0). Pixel centre offsets are
x_j = ((j + 0.5) - npix / 2) * pixel_size (radians); the direction of pixel [row, col] is
normalise(n0 + x_col e_east + y_row e_north): array rows run north, columns run east.
"""

from __future__ import annotations

from dataclasses import dataclass

import healpy as hp
import numpy as np

from .checks import check_choice, check_lonlat, check_real
from .data import DustMap
from .healpix import interpolate_on_grids
from .statistics import default_ell_edges, flat_power_spectrum


@dataclass(frozen=True)
class PatchGeometry:
    """Square gnomonic patch: `npix` pixels across `size_deg` degrees."""

    npix: int = 32
    size_deg: float = 8.0

    def __post_init__(self):
        if int(self.npix) != self.npix or self.npix < 8 or self.npix % 8:
            raise ValueError(f"npix={self.npix!r}: expected a multiple of 8, >= 8")
        if not 0 < self.size_deg <= 40:
            raise ValueError(f"size_deg={self.size_deg!r}: expected 0 < size_deg <= 40")

    @property
    def pixel_size_deg(self) -> float:
        return self.size_deg / self.npix

    def offsets_rad(self) -> np.ndarray:
        """(npix,) tangent-plane pixel-centre offsets in radians."""
        return np.radians((np.arange(self.npix) + 0.5 - self.npix / 2) * self.pixel_size_deg)

    def halved(self) -> "PatchGeometry":
        """Same patch, half the pixels across (the grid of the model's condition)."""
        return PatchGeometry(self.npix // 2, self.size_deg)

    def scaled(self, factor: float) -> "PatchGeometry":
        """Same pixel count, `factor` times smaller angular size (cascade levels)."""
        return PatchGeometry(self.npix, self.size_deg / factor)


def tangent_basis(lon_deg, lat_deg):
    """Unit vectors (n0, e_east, e_north), each (N, 3), at Galactic (lon, lat) in degrees."""
    lon, lat = np.radians(np.atleast_1d(lon_deg)), np.radians(np.atleast_1d(lat_deg))
    n0 = np.stack([np.cos(lat) * np.cos(lon), np.cos(lat) * np.sin(lon), np.sin(lat)], -1)
    east = np.stack([-np.sin(lon), np.cos(lon), np.zeros_like(lon)], -1)
    north = np.stack([-np.sin(lat) * np.cos(lon), -np.sin(lat) * np.sin(lon), np.cos(lat)], -1)
    return n0, east, north


def gnomonic_coordinates(vec: np.ndarray, lon_deg: float, lat_deg: float):
    """Tangent-plane (x, y) in radians of unit vectors (..., 3) about one centre; NaN behind it."""
    n0, east, north = (b[0] for b in tangent_basis(lon_deg, lat_deg))
    depth = vec @ n0
    with np.errstate(divide="ignore", invalid="ignore"):
        depth = np.where(depth > 0, depth, np.nan)
        return (vec @ east) / depth, (vec @ north) / depth


def patch_centres(lat_min_deg: float = 15.0, spacing_deg: float = 3.7):
    """Centres (lon, lat) in degrees on rings every `spacing_deg` in latitude with |b| >= lat_min,
    spaced `spacing_deg / cos b` in longitude (the DustVAEder layout). 3.7 deg gives ~2250 patches."""
    lats = np.arange(-90 + spacing_deg / 2, 90, spacing_deg)
    lats = lats[np.abs(lats) >= lat_min_deg]
    lon, lat = [], []
    for b in lats:
        n = max(int(round(360 * np.cos(np.radians(b)) / spacing_deg)), 1)
        lon.append((np.arange(n) + 0.5 * (len(lon) % 2)) * 360.0 / n)
        lat.append(np.full(n, b))
    return np.concatenate(lon), np.concatenate(lat)


def oversampling(nside: int, geometry: PatchGeometry) -> int:
    """Sub-pixels per patch pixel (per axis) so that sampling keeps up with the map's pixels:
    round(patch pixel / map pixel), at least 1 (1 for the nside-256 Planck map at 15')."""
    return max(int(round(np.radians(geometry.pixel_size_deg) / hp.nside2resol(nside))), 1)


def sample_patches(values: np.ndarray, frame: str, lon_deg, lat_deg, geometry: PatchGeometry,
                   oversample: int = 1) -> np.ndarray:
    """Fine samples (N, npix k, npix k), k = oversample: bilinear samples of a RING map on the
    patch grid refined k times (NaN in the map propagates to the samples it touches)."""
    basis = np.stack(tangent_basis(lon_deg, lat_deg), 1)   # (N, 3: centre, east, north, 3)
    if frame != "G":   # a rotation carries the grid's directions with the basis (norms kept)
        basis = np.asarray(hp.Rotator(coord=["G", frame])(basis.reshape(-1, 3).T)).T.reshape(basis.shape)
    return interpolate_on_grids(values, basis, PatchGeometry(geometry.npix * oversample, geometry.size_deg).offsets_rad())


def box_average(fine: np.ndarray, oversample: int) -> np.ndarray:
    """(N, n, n) means of the oversample x oversample blocks of fine samples (N, n k, n k): a box
    filter against aliasing when the map is finer than the patch pixel."""
    n = fine.shape[-1] // oversample
    return fine.reshape(len(fine), n, oversample, n, oversample).mean(axis=(2, 4))


def fill_invalid(values: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """A RING map with its invalid pixels set to the mean of the valid ones around them: the
    means of the valid pixels at each coarser nside (a push-pull pyramid in NESTED ordering),
    taken from the finest level that has any. Smooth enough for harmonic smoothing."""
    nest = hp.reorder(np.where(valid, values, 0.0), r2n=True)
    weight = hp.reorder(valid.astype(float), r2n=True)
    levels = [(nest, weight)]
    while levels[-1][0].size > 12:
        total, count = levels[-1]
        levels.append((total.reshape(-1, 4).sum(1), count.reshape(-1, 4).sum(1)))
    filled = np.where(levels[-1][1] > 0, levels[-1][0] / np.maximum(levels[-1][1], 1e-300),
                      np.sum(levels[-1][0]) / max(np.sum(levels[-1][1]), 1e-300))
    for total, count in reversed(levels[:-1]):
        parent = np.repeat(filled, 4)
        filled = np.where(count > 0, total / np.maximum(count, 1e-300), parent)
    return hp.reorder(filled, n2r=True)


def smoothing_lmax(nside: int, fwhm_deg: float) -> int:
    """lmax of the harmonic smoothing: 3 nside - 1, or where the Gaussian beam falls below 1e-8."""
    sigma = np.radians(fwhm_deg) / np.sqrt(8 * np.log(2))
    return int(min(3 * nside - 1, np.ceil(np.sqrt(2 * np.log(1e8)) / sigma)))


def log_intensity(dust: DustMap) -> tuple[np.ndarray, np.ndarray]:
    """(ln(I / 1 MJy/sr) with NaN where I is not finite or <= 0, valid mask), both RING (npix,)."""
    valid = np.isfinite(dust.intensity) & (dust.intensity > 0)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(valid, np.log(np.where(valid, dust.intensity, 1.0)), np.nan), valid


def large_scale_log_map(dust: DustMap, fwhm_deg: float) -> np.ndarray:
    """log(I / 1 MJy/sr) smoothed by a Gaussian of `fwhm_deg` (the template resolution), RING.
    Pixels without data (NaN, I <= 0) are filled (fill_invalid) before smoothing and are NaN in the
    result; so are pixels where the beam-weighted fraction of valid pixels is below 99.9 %."""
    log_map, valid = log_intensity(dust)
    if not valid.any():
        raise ValueError(f"dust map {dust.source!r} has no finite positive pixel")
    lmax = smoothing_lmax(dust.nside, fwhm_deg)
    if valid.all():
        return hp.smoothing(log_map, fwhm=np.radians(fwhm_deg), lmax=lmax, iter=1)
    smooth = hp.smoothing(fill_invalid(log_map, valid), fwhm=np.radians(fwhm_deg), lmax=lmax, iter=1)
    coverage = hp.smoothing(valid.astype(float), fwhm=np.radians(fwhm_deg), lmax=lmax, iter=1)
    return np.where(valid & (coverage > 0.999), smooth, np.nan)


@dataclass(frozen=True)
class Cutouts:
    """Patches cut from a dust map.

    small_scales: (N, n, n) float32 ln I - [ln I]_smooth, NaN throughout for a patch that touches
    missing data or lies where the smoothed template would feel it; coarse: (N, n/2, n/2) float32
    [ln I]_smooth on the grid of half the patch's pixels (the part a template at that resolution
    holds: the model's condition); fine_ell (nb,) and fine_cl
    (N, nb): binned flat-sky power of the intensity sampled at the map's own resolution,
    (MJy/sr)^2 sr (NaN rows for unusable patches; empty when not asked for); level (N,): mean
    intensity, MJy/sr."""

    small_scales: np.ndarray
    coarse: np.ndarray
    fine_ell: np.ndarray
    fine_cl: np.ndarray
    level: np.ndarray

    @property
    def usable(self) -> np.ndarray:
        """(N,) bool: the patches free of NaN."""
        return np.isfinite(self.small_scales).all(axis=(1, 2))


def cut_patches(dust: DustMap, lon_deg, lat_deg, geometry: PatchGeometry, template_fwhm_deg: float,
                fine_spectra: bool = False, missing: str = "nan", chunk: int = 32) -> Cutouts:
    """Small-scale log-intensity patches of any HEALPix dust map (Planck E(B-V), the IRIS mosaic,
    GNILC). A map finer than the patch pixel is sampled `oversampling` times finer and
    box-averaged; the smooth template part is sampled at the pixel centres. With `fine_spectra`,
    the power of the fine samples (for noise_floor_ell) comes from the same pass. A patch on
    missing data is NaN (missing="nan") or raises ValueError naming its centre (missing="raise")."""
    if not isinstance(geometry, PatchGeometry):
        raise TypeError(f"geometry={geometry!r}: expected a PatchGeometry")
    check_choice(missing, "missing", ("nan", "raise"))
    check_real(template_fwhm_deg, "template_fwhm_deg", positive=True)
    lon_deg, lat_deg = check_lonlat(lon_deg, lat_deg)
    log_map, _ = log_intensity(dust)
    smooth = large_scale_log_map(dust, template_fwhm_deg)
    k = oversampling(dust.nside, geometry)
    fine_pixel_deg = geometry.pixel_size_deg / k
    edges = default_ell_edges(geometry.npix * k, fine_pixel_deg, nbins=geometry.npix * k // 8)
    n = len(lon_deg)
    out = np.empty((n, geometry.npix, geometry.npix), dtype=np.float32)
    coarse = np.empty((n, geometry.npix // 2, geometry.npix // 2), dtype=np.float32)
    level = np.empty(n)
    fine_cl = np.full((n, len(edges) - 1) if fine_spectra else (n, 0), np.nan)
    fine_ell = np.zeros(0)
    for start in range(0, n, chunk):
        sl = slice(start, start + chunk)
        fine_log = sample_patches(log_map, dust.frame, lon_deg[sl], lat_deg[sl], geometry, k)
        coarse[sl] = sample_patches(smooth, dust.frame, lon_deg[sl], lat_deg[sl], geometry.halved())
        out[sl] = box_average(fine_log, k) - sample_patches(smooth, dust.frame, lon_deg[sl], lat_deg[sl], geometry)
        ok = np.isfinite(fine_log).all(axis=(1, 2))
        intensity = np.exp(np.where(ok[:, None, None], fine_log, 0.0))
        level[sl] = np.where(ok, intensity.mean(axis=(1, 2)), np.nan)
        if fine_spectra:
            fine_ell, cl = flat_power_spectrum(intensity, fine_pixel_deg, edges)
            fine_cl[sl] = np.where(ok[:, None], cl, np.nan)
    bad = ~np.isfinite(out).all(axis=(1, 2))
    if missing == "raise" and bad.any():
        i = int(np.argmax(bad))
        raise ValueError(f"the patch at Galactic (lon, lat) = ({lon_deg[i]:.2f}, {lat_deg[i]:.2f}) deg ({bad.sum()} of "
                         f"{n} requested) falls on missing data of {dust.source!r} (NaN or I <= 0 within it or "
                         f"within the {template_fwhm_deg} deg template beam)")
    out[bad] = np.nan
    coarse[bad] = np.nan
    return Cutouts(small_scales=out, coarse=coarse, fine_ell=fine_ell, fine_cl=fine_cl, level=level)


#: multipoles where the beam-corrected power of IRIS patches is flat (white noise + CIB shot noise);
#: beyond ~3600 the pixel windows and aliasing take over
FLOOR_TAIL_ELL = (2500.0, 3600.0)


def noise_floor_ell(cutouts: Cutouts, tail_ell=FLOOR_TAIL_ELL, bright_fraction: float = 0.1,
                    window_fit_ell=(200.0, 2600.0)) -> dict:
    """Per patch, the multipole where the data's power falls to twice its noise + CIB floor.

    From the fine spectra of cut_patches(..., fine_spectra=True). The noise is smoothed like the
    dust (beam, plate and HEALPix pixels, interpolation), so no measured spectrum has a flat
    tail: the brightest `bright_fraction` of the patches, dust-dominated, give the common
    effective beam by a fit of their mean log spectrum to c - alpha ln ell - sigma^2 ell^2 in
    `window_fit_ell`. Divided by that beam, each patch's spectrum R_ell is a falling dust power
    law plus a flat floor: the floor is the median of R_ell in `tail_ell` (an upper bound: faint
    dust is in it too) and ell_floor the first bin where R_ell < 2 floor. Returns {"ell_floor":
    (N,) (NaN for unusable patches), "floor": (N,) (MJy/sr)^2 sr, "beam_fwhm_arcmin", "alpha"}.
    ValueError when the spectra do not reach `tail_ell` (a map too coarse) or too few patches hold data.
    """
    ell, cl = cutouts.fine_ell, cutouts.fine_cl
    if ell.size == 0 or ell[-1] < tail_ell[1]:
        top = f"{ell[-1]:.0f}" if ell.size else "none (cut with fine_spectra=False)"
        raise ValueError(f"no noise floor can be measured: the fine spectra reach ell {top}, below the floor's "
                         f"tail ell {tail_ell[1]:g} (the map does not resolve it)")
    usable = cutouts.usable & np.isfinite(cl).all(axis=1)
    if usable.sum() < 10:
        raise ValueError(f"only {int(usable.sum())} patches hold data: need 10 to fit the beam")
    level = np.where(usable, cutouts.level, np.nan)
    bright = usable & (level >= np.nanquantile(level, 1 - bright_fraction))
    log_shape = np.mean(np.log(cl[bright] / cl[bright][:, :1]), axis=0)
    fit = (ell >= window_fit_ell[0]) & (ell <= window_fit_ell[1])
    design = np.stack([np.ones(fit.sum()), -np.log(ell[fit]), -ell[fit] ** 2], axis=1)
    _, alpha, sigma2 = np.linalg.lstsq(design, log_shape[fit], rcond=None)[0]
    sigma2 = max(sigma2, 0.0)  # a beam, never a sharpening
    ratio = cl / np.exp(-sigma2 * ell ** 2)
    tail = (ell >= tail_ell[0]) & (ell <= tail_ell[1])
    floor = np.median(ratio[:, tail], axis=1)
    below = ratio < 2 * floor[:, None]
    ell_floor = np.where(usable, ell[np.argmax(below, axis=1)], np.nan)  # the tail itself is below: always found
    return {"ell_floor": ell_floor, "floor": floor, "alpha": float(alpha),
            "beam_fwhm_arcmin": float(np.degrees(np.sqrt(sigma2)) * 60 * np.sqrt(8 * np.log(2)))}


def condition_input(coarse: np.ndarray, normalisation: dict, amplitude: float = 1.0,
                    log_offset: float = 0.0) -> np.ndarray:
    """The model's condition (B, 2, m, m) float32 from coarse parts (B, m, m) of ln I on the
    condition grid (m = n/2): [coarse minus its patch mean] / (coarse_scale * amplitude) and a
    constant plane of the patch-mean (ln I + log_offset - level_mean) / level_scale.

    normalisation: the weights' (coarse_scale, level_mean, level_scale; ln of 100 um MJy/sr);
    amplitude: a cascade level's amplitude factor (1 at the trained level); log_offset: ln of the
    factor that turns the map's intensity unit into 100 um MJy/sr (0 for IRIS itself)."""
    coarse = np.asarray(coarse, dtype=np.float64)
    mean = coarse.mean(axis=(1, 2), keepdims=True)
    structure = (coarse - mean) / (normalisation["coarse_scale"] * amplitude)
    level = (mean + log_offset - normalisation["level_mean"]) / normalisation["level_scale"]
    return np.stack([structure, np.broadcast_to(level, structure.shape)], 1).astype(np.float32)


def flat_small_scales(log_image: np.ndarray, pixel_arcmin: float, fwhm_deg: float) -> np.ndarray:
    """A flat log-intensity image minus its Gaussian smoothing of `fwhm_deg` (the flat-sky
    analogue of cut_patches, for the 2.37' north-pole image), (n, n) float64."""
    from scipy.ndimage import gaussian_filter

    sigma_pix = fwhm_deg * 60 / np.sqrt(8 * np.log(2)) / pixel_arcmin
    return log_image - gaussian_filter(log_image, sigma_pix, mode="reflect")


#: Galaxies whose own dust is bright and resolved at |b| > 15 deg: (name, Galactic lon, lat, radius),
#: degrees (centres from NED; radii cover their far-infrared extent). Not Galactic dust: left out.
EXTRAGALACTIC_DISCS = (("LMC", 280.47, -32.89, 6.0), ("SMC", 302.80, -44.30, 3.0),
                       ("M31", 121.17, -21.57, 2.0), ("M33", 133.61, -31.33, 1.0))


def near_extragalactic(lon_deg, lat_deg, geometry: PatchGeometry) -> np.ndarray:
    """(N,) bool: patches (centres in degrees) whose footprint may reach an EXTRAGALACTIC_DISCS disc."""
    vec = hp.ang2vec(np.atleast_1d(lon_deg), np.atleast_1d(lat_deg), lonlat=True)
    half_diagonal = np.degrees(np.arctan(np.sqrt(2) * np.tan(np.radians(0.5 * geometry.size_deg))))
    near = np.zeros(len(vec), bool)
    for _, lon0, lat0, radius in EXTRAGALACTIC_DISCS:
        distance = np.degrees(np.arccos(np.clip(vec @ hp.ang2vec(lon0, lat0, lonlat=True), -1, 1)))
        near |= distance < radius + half_diagonal
    return near


def region_split(lon_deg, lat_deg, geometry: PatchGeometry, fractions=(0.7, 0.15, 0.15),
                 seed: int = 0, region_nside: int = 2, strata=None):
    """Deterministic train/val/test split by sky region.

    Patches are grouped by the HEALPix pixel (nside `region_nside`) of their centre and whole
    regions are assigned to splits. Without `strata`, regions are taken in a seeded random order
    and filled into test, then val, then train until each split's share of patches reaches
    `fractions`. With `strata` (N,) (one number per patch, e.g. its small-scale variance), regions
    are sorted by their mean value and cut into consecutive strata of ceil(1 / min(fractions))
    regions; inside each stratum (seeded order) each region goes to the split furthest below its
    share, so every split spans faint and bright sky alike.
    Patches whose footprint could overlap a patch of a later split (whatever the relative
    orientation of the two squares) are dropped from the earlier split (train loses border patches to val/test, val to
    test), so no sky pixel is seen by two splits. Returns labels (N,) int: 0 train, 1 val, 2 test,
    -1 dropped.
    """
    fractions = np.asarray(fractions, dtype=float)
    if fractions.shape != (3,) or np.any(fractions <= 0) or not np.isclose(fractions.sum(), 1):
        raise ValueError(f"fractions={tuple(fractions)}: expected three positive numbers summing to 1")
    regions = hp.ang2pix(region_nside, lon_deg, lat_deg, lonlat=True)
    unique = np.unique(regions)
    counts = {r: int(np.sum(regions == r)) for r in unique}
    rng = np.random.default_rng(seed)
    split_of_region = {}
    if strata is None:
        filled, total = 0, len(lon_deg)
        for r in rng.permutation(unique):  # fill test first, then val, rest train
            share = filled / total
            split = 2 if share < fractions[2] else (1 if share < fractions[2] + fractions[1] else 0)
            split_of_region[r] = split
            filled += counts[r]
    else:
        strata = np.asarray(strata, dtype=float)
        if strata.shape != regions.shape or not np.all(np.isfinite(strata)):
            raise ValueError(f"strata: expected {regions.shape[0]} finite values, one per patch, "
                             f"got shape {strata.shape}")
        by_value = unique[np.argsort([strata[regions == r].mean() for r in unique], kind="stable")]
        size = int(np.ceil(1 / fractions.min() - 1e-9))
        deficit = np.zeros(3)  # patches each split is owed, carried from stratum to stratum
        for start in range(0, len(by_value), size):
            stratum = rng.permutation(by_value[start:start + size])
            deficit += fractions * sum(counts[r] for r in stratum)
            for r in stratum:
                split = int(np.argmax(deficit))
                split_of_region[r] = split
                deficit[split] -= counts[r]
    labels = np.array([split_of_region[r] for r in regions])
    vec = hp.ang2vec(lon_deg, lat_deg, lonlat=True)
    half_width = np.tan(np.radians(0.5 * geometry.size_deg))
    for later in (2, 1):
        later_vec = vec[labels == later]
        for i in np.flatnonzero((labels >= 0) & (labels < later)):
            x, y = gnomonic_coordinates(later_vec, lon_deg[i], lat_deg[i])
            # the other square, of any orientation, lies within its circumscribed circle of
            # radius sqrt(2) h: no overlap once its centre is beyond (1 + sqrt 2) h along an axis
            # (factor 2.5: a 4 % margin for the gnomonic distortion)
            if np.any(np.fmax(np.abs(x), np.abs(y)) < 2.5 * half_width):
                labels[i] = -1
    return labels


def dihedral(images, k: int):
    """The k-th (0..7) dihedral transform of the last two axes: rot90 k%4 times, then a flip if k>=4.

    Works on numpy arrays and torch tensors."""
    if not 0 <= int(k) < 8:
        raise ValueError(f"dihedral index k={k!r}: expected 0..7")
    if hasattr(images, "rot90"):
        out = images.rot90(int(k) % 4, dims=(-2, -1))
        return out.flip(-1) if k >= 4 else out
    out = np.rot90(images, int(k) % 4, axes=(-2, -1))
    return out[..., ::-1] if k >= 4 else out


def random_dihedral(batches: tuple, generator) -> tuple:
    """An independent random dihedral transform per row, the same for every torch batch of
    `batches` (each (B, C, n_i, n_i)): e.g. a patch and its condition."""
    import torch

    ks = torch.randint(0, 8, (batches[0].shape[0],), generator=generator)
    return tuple(torch.stack([dihedral(img, int(k)) for img, k in zip(batch, ks)]) for batch in batches)
