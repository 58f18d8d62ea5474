"""Stage 6 — tiling and reprojection: patches of a fixed sphere tiling onto HEALPix pixels.

A cascade level n tiles the whole sphere (poles included) with gnomonic patches centred on the
pixels of a HEALPix grid of `tile_nside`; the patch side is 1.64 tile spacings, so a pixel lies
in 2.7 patches on average (a pixel's most central patch reaches it at weight 0.53 at the median, 0.12
at the 1 % point: `BASE_TILE_NSIDE`). Each patch's latent is drawn from a counter-based generator keyed by
(seed, level, tile index): any subset of patches, in any order, gets the same latents.

Reprojection: a decoded patch (n, n) is first resampled band-limited onto a grid UPSAMPLE times
finer (`resampling_matrix`: its symmetric (DCT-II) continuation, divided by the window the
training targets carry and by the transfer of the bilinear step, so the reprojection passes
the patch's band flat up to its Nyquist frequency); every HEALPix pixel inside the patch
footprint then receives the bilinear interpolation of that fine grid at its tangent-plane
position, weighted by w = c(x) c(y) with c(t) = cos^2(pi t / 2) over the half-width. Overlaps
blend what the overlapping patches share as sum(w m) / sum(w) and what each draws on its own as
sum(w e) / sqrt(sum(w^2)) (independent: the variance stays uniform over the sky). The blend
kernel walks each patch's disc ring by ring on all cores, threads owning whole rings, so every
pixel adds its patches in their order whatever the threads or the pixels computed; the sums live
on a window of pixels that slides with the tiles (`BlendWindow`), not on the whole sky.
"""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import healpy as hp
import numba
import numpy as np
import torch
from numba import njit, prange

from .cutouts import PatchGeometry, tangent_basis
from .healpix import RingBand, disc_capacity, disc_pixels, disc_runs, discs_pixels, ring_info, ring_pix2vec

#: tile_nside of level 0 (4.89 deg spacing for 8 deg patches); level n uses BASE_TILE_NSIDE * factor.
#: RING tilings need no power of two: 12 decodes 0.56x the patches of 16 (2.7 patches per pixel
#: against 4.8) with the map's spectrum unchanged (benchmarks/map_vs_iris.py); 11 would leave
#: pixels at the very edge of every patch (the largest weight reaching them 0.002)
BASE_TILE_NSIDE = 12
#: fine-grid points per patch pixel (per axis) of the reprojection's band-limited resampling
UPSAMPLE = 2
#: kappa = frequency x the conditions' FWHM where the blend's shared band ends (`shared_band`, per
#: axis): below 0.55 cycles per FWHM the decoding at zero latents (the prediction from the
#: condition) carries 84-98 % of a decoded patch's power, above 0.8 1-16 % (radial bins; level-1
#: tiles of the bundled template at nside 1024, shipped weights, the least structured 5 % alike)
SHARED_KAPPA = (0.55, 0.8)


@dataclass(frozen=True)
class CascadeLevel:
    """One level of the self-similar cascade.

    factor: pixel scale = base pixel / factor (1/4 for a level before the trained one); geometry:
    patch of this level; tile_nside: its
    tiling; amplitude: relative amplitude factor**(-(slope - 2) / 2) of a C_ell ~ ell^-slope
    field (the level's small scales and condition structure are in these units)."""

    index: int
    factor: float
    geometry: PatchGeometry
    tile_nside: int
    amplitude: float

    @property
    def n_tiles(self) -> int:
        return hp.nside2npix(self.tile_nside)


def cascade_factors(base_pixel_arcmin: float, nside: int) -> list[int]:
    """Scale factors of the cascade levels needed to reach the pixel size of `nside`: 1, 2, 4, ...
    up to the last power of two <= r = base pixel / HEALPix pixel.

    Steps of 2: level k + 1 is conditioned at F / f_{k+1}, whose Gaussian has fallen to 3 % at
    level k's Nyquist frequency, so level k holds what level k + 1 does not add up to where its
    own pixels end (a step of 4 would leave 41 % there: a break in the map's spectrum)."""
    ratio = base_pixel_arcmin / (hp.nside2resol(nside, arcmin=True))
    return [2**k for k in range(int(np.floor(np.log2(max(ratio, 1.0)))) + 1)]


def cascade_levels(nside: int, base: PatchGeometry, slope: float, start_factor: float = 1.0) -> list[CascadeLevel]:
    """The cascade for an output `nside`: its levels with their geometry, tiling and amplitude.
    start_factor 1/4 puts one coarser level first (4x larger patches and pixels: for a template
    coarser than the conditioning resolution)."""
    factors = cascade_factors(60 * base.pixel_size_deg, nside)
    if start_factor not in (1.0, 0.25):
        raise ValueError(f"start_factor={start_factor!r}: expected 1 or 1/4")
    if start_factor < 1:
        factors = [start_factor] + factors
    return [CascadeLevel(n, f, base.scaled(f), int(BASE_TILE_NSIDE * f), float(f ** (-(slope - 2) / 2)))
            for n, f in enumerate(factors)]


def gaussian_transfer(freq: np.ndarray, fwhm: float) -> np.ndarray:
    """Transfer function of a Gaussian of `fwhm` at frequencies `freq` (cycles per unit of fwhm)."""
    return np.exp(-2 * (np.pi * freq * fwhm / np.sqrt(8 * np.log(2))) ** 2)


def box_transfer(freq: np.ndarray, box: int) -> np.ndarray:
    """Transfer function of the mean of `box` equally spaced sub-samples per pixel (the cutouts'
    box average) at frequencies `freq` (cycles per pixel): sin(pi f) / (m sin(pi f / m))."""
    freq = np.asarray(freq, dtype=np.float64)
    return np.ones_like(freq) if box <= 1 else np.sinc(freq) / np.sinc(freq / box)


def band_limit(freq: np.ndarray, start: float) -> np.ndarray:
    """Taper 1 below `start`, cos^2 down to 0 at 1.5 `start` (same unit as `freq`; inf: all 1)."""
    freq = np.asarray(freq, dtype=np.float64)
    if np.isinf(start):
        return np.ones_like(freq)
    t = np.clip((freq - start) / (0.5 * start), 0.0, 1.0)
    return np.cos(0.5 * np.pi * t) ** 2


def shared_band(freq: np.ndarray, fwhm: float) -> np.ndarray:
    """What overlapping tiles share of a decoded patch, per axis at frequencies `freq` (cycles per
    pixel) for conditions seen through a Gaussian of `fwhm` pixels: 1 at kappa = |freq| fwhm <
    SHARED_KAPPA[0] (scales the tiles' common condition still holds, G >= 0.34), cos^2 down to 0
    at SHARED_KAPPA[1] (G = 0.10) and beyond (what each tile's latents and noise draw)."""
    start, stop = SHARED_KAPPA
    t = np.clip((np.abs(np.asarray(freq, dtype=np.float64)) * fwhm - start) / (stop - start), 0.0, 1.0)
    return np.cos(0.5 * np.pi * t) ** 2


def handover_gain(freq: np.ndarray, fwhm: float, coherence: dict | None = None) -> np.ndarray:
    """What a cascade level keeps h of its field f where the next level, conditioned on f through a
    Gaussian G of `fwhm`, adds y: the root of E|h f + y|^2 = E|f|^2, h = -a + sqrt(a^2 + 1 - s),
    a = Re<y f*> / <|f|^2> (what y repeats of f: the conditional mean's prediction of the scales
    the condition still holds), s = <|y|^2> / <|f|^2>. `coherence`: a and s measured on the model
    (`train.handover_coherence`: {"kappa", "coherent", "power"}, kappa = frequency x FWHM); None:
    levels independent, a = 0 and s = (1 - G)^2, h = sqrt(1 - (1 - G)^2). 1 everywhere for fwhm 0;
    clipped to [0, 1]. `resampling_matrix` applies it per axis, h(f_x) h(f_y): exact for the
    Gaussian default's product form near G = 1, an approximation of the radial table on diagonals."""
    if coherence is None or fwhm == 0:
        a, power = 0.0, (1 - gaussian_transfer(freq, fwhm)) ** 2
    else:
        kappa = np.abs(freq) * fwhm
        a = np.interp(kappa, coherence["kappa"], coherence["coherent"])
        power = np.interp(kappa, coherence["kappa"], coherence["power"])
    return np.clip(-a + np.sqrt(np.maximum(a * a + 1 - power, 0.0)), 0.0, 1.0)


def resampling_matrix(npix: int, window_fwhm_pix: float = 0.0, window_box: int = 1,
                      smoothing_fwhm_pix: float = 0.0, handover_fwhm_pix: float = 0.0,
                      upsample: int = UPSAMPLE, limit_cycles: float = np.inf,
                      coherence: dict | None = None, shared_fwhm_pix: float = 0.0) -> np.ndarray:
    """The reprojection's 1-D resampling operator (upsample npix, npix), float64: a patch P
    (n, n) becomes R P R^T on the fine grid of upsample x upsample points per pixel (centres at
    (i + 0.5) / upsample - 0.5 in pixel units, the same extent).

    R takes the band-limited symmetric (DCT-II) continuation of the samples, divides it by the
    window the samples carry (a Gaussian beam of `window_fwhm_pix` pixels FWHM, and the mean of
    `window_box` equally spaced sub-samples per pixel: the cutouts' box average) and by the
    transfer sinc^2(f / upsample) of bilinear interpolation on the fine grid, and multiplies it
    by a Gaussian of `smoothing_fwhm_pix` (a coarser view of the patch; 0: none), by
    `handover_gain` of `handover_fwhm_pix` and `coherence` (what the level keeps beside the next;
    0: all), by `band_limit` from `limit_cycles` (cycles per pixel: the band the output pixels can
    hold) and by `shared_band` of `shared_fwhm_pix` (the band overlapping tiles share; 0: all).
    With no window, no smoothing and upsample 1 it is the identity up to the bilinear compensation."""
    n = int(npix)
    k = np.arange(n)
    freq = k / (2 * n)  # cycles per pixel of the DCT-II modes
    box = box_transfer(freq, window_box)
    gain = (gaussian_transfer(freq, smoothing_fwhm_pix) * handover_gain(freq, handover_fwhm_pix, coherence)
            * band_limit(freq, limit_cycles) * (shared_band(freq, shared_fwhm_pix) if shared_fwhm_pix else 1.0)
            / (gaussian_transfer(freq, window_fwhm_pix) * box * np.sinc(freq / upsample) ** 2))
    analysis = np.cos(np.pi * np.outer(k, np.arange(n) + 0.5) / n) * np.where(k == 0, 1.0, 2.0)[:, None] / n
    fine = (np.arange(upsample * n) + 0.5) / upsample - 0.5
    return np.cos(np.pi * np.outer(fine + 0.5, k) / n) @ (gain[:, None] * analysis)


class Resampler:
    """Patches (..., n, n) -> (..., U n, U n) on the reprojection's fine grid, R P R^T (torch,
    differentiable), with its adjoint; R from `resampling_matrix`."""

    def __init__(self, matrix: np.ndarray, device="cpu"):
        self.matrix = torch.from_numpy(np.asarray(matrix, dtype=np.float32)).to(device)

    def __call__(self, patches: torch.Tensor) -> torch.Tensor:
        return self.matrix @ patches @ self.matrix.T

    def adjoint(self, fine: torch.Tensor) -> torch.Tensor:
        return self.matrix.T @ fine @ self.matrix


def tile_centres(level: CascadeLevel, ids: np.ndarray):
    """Galactic (lon, lat) in degrees of the tiles `ids` (RING pixels of tile_nside)."""
    return hp.pix2ang(level.tile_nside, ids, lonlat=True)


def _fill_normals(out: np.ndarray, seed: int, level: int, ids: np.ndarray) -> None:
    for row, tile in enumerate(ids):
        key = (int(seed) & 0xFFFFFFFF) | (int(level) << 32), int(tile)
        np.random.Generator(np.random.Philox(key=key)).standard_normal(dtype=np.float32, out=out[row])


def patch_normals(seed: int, level: int, ids: np.ndarray, size: int) -> np.ndarray:
    """Standard normals (len(ids), size) float32, one Philox stream per (seed, level, tile id):
    a patch gets the same numbers whatever subset or order of patches is computed (rows drawn
    on all cores: numpy fills them without the GIL)."""
    ids = np.asarray(ids, dtype=np.int64)
    out = np.empty((len(ids), size), dtype=np.float32)
    workers = numba.get_num_threads()   # the threads the kernels use (NUMBA_NUM_THREADS: one per MPI rank)
    if workers == 1:
        _fill_normals(out, seed, level, ids)
        return out
    parts = np.array_split(np.arange(len(ids)), workers)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        for done in [pool.submit(_fill_normals, out[rows[0]:rows[-1] + 1], seed, level, ids[rows])
                     for rows in parts if len(rows)]:
            done.result()
    return out


@dataclass
class Footprints:
    """(pixel, patch) pairs of a set of patches: output position, patch row in the batch,
    fractional grid coordinates (row, col) in the patch, blending weight."""

    pixel: np.ndarray   # (M,) int64 position in the output pixel array
    patch: np.ndarray   # (M,) int32 index into the batch of patches
    row: np.ndarray     # (M,) float32 fractional row (north) coordinate
    col: np.ndarray     # (M,) float32 fractional column (east) coordinate
    weight: np.ndarray  # (M,) float32 blending weight


#: Taylor coefficients of cos(pi t) in u = t^2, to u^9 (truncation < 4e-9 for |t| <= 1)
_COS_PI_SERIES = np.array([(-np.pi**2) ** k / math.factorial(2 * k) for k in range(10)])


@njit(cache=True, inline="always")
def _taper(t):
    """cos^2(pi t / 2) = (1 + cos(pi t)) / 2 for |t| <= 1, from the series (no libm call: ~35 %
    of the blend kernel with fastmath)."""
    u = t * t
    c = _COS_PI_SERIES[9]
    for k in range(8, -1, -1):
        c = c * u + _COS_PI_SERIES[k]
    return max(0.0, 0.5 * (1.0 + c))   # the series' -2e-9 at |t| = 1 must not make a weight negative


@njit(cache=True, inline="always")
def _project(vx, vy, vz, basis, p, half, pix_rad, npix):
    """(row, col, weight) of unit vector (vx, vy, vz) in patch `p`: fractional grid coordinates
    and the blending weight (0 outside the patch). The grid is uniform in x = tan(angle): pixel j
    is centred at (j + 0.5 - n/2) pix_rad."""
    depth = vx * basis[p, 0, 0] + vy * basis[p, 0, 1] + vz * basis[p, 0, 2]
    x = (vx * basis[p, 1, 0] + vy * basis[p, 1, 1] + vz * basis[p, 1, 2]) / depth
    y = (vx * basis[p, 2, 0] + vy * basis[p, 2, 1] + vz * basis[p, 2, 2]) / depth
    weight = 0.0
    if abs(x) < half and abs(y) < half:
        weight = _taper(x / half) * _taper(y / half)
    return y / pix_rad + npix / 2 - 0.5, x / pix_rad + npix / 2 - 0.5, weight


@njit(cache=True, inline="always")
def _bilinear(values, p, row, col):
    n = values.shape[1]
    r = min(max(row, 0.0), n - 1.0)
    c = min(max(col, 0.0), n - 1.0)
    r0 = min(int(r), n - 2)
    c0 = min(int(c), n - 2)
    fr, fc = r - r0, c - c0
    return ((1 - fr) * ((1 - fc) * values[p, r0, c0] + fc * values[p, r0, c0 + 1])
            + fr * ((1 - fc) * values[p, r0 + 1, c0] + fc * values[p, r0 + 1, c0 + 1]))


@njit(cache=True)
def _footprint_kernel(nside, pixels, patch, basis, half, pix_rad, npix, row, col, weight):
    for m in range(pixels.size):
        vx, vy, vz = ring_pix2vec(nside, pixels[m])
        row[m], col[m], weight[m] = _project(vx, vy, vz, basis, patch[m], half, pix_rad, npix)


@njit(cache=True, inline="always")
def _position(pixel, first, lookup, n_range):
    """Output position of RING `pixel`: lookup[pixel - first] (-1 = not computed), or with an
    empty lookup pixel - first itself; -1 outside first .. first + n_range - 1."""
    q = pixel - first
    if q < 0 or q >= n_range:
        return -1
    return q if lookup.size == 0 else lookup[q]


@njit(cache=True, parallel=True, fastmath=True)
def _blend_kernel(nside, basis, radius, half, pix_rad, first, lookup, n_range, fields, sums, offset, n_parts):
    """sums (F + 2, window) += (w f_0, ..., w f_{F-1}, w, w^2) of every patch p of `fields` (F, P,
    n, n) at the pixels of its disc whose output position q (`_position`: lookup[pixel - first],
    -1 = not computed; empty lookup: pixel - first, within n_range) lies in the window: column
    q - offset. Task t of `n_parts` owns the pixels of the rings r with r % n_parts == t; per
    pixel the patches add up in their order, so the sums do not depend on n_parts."""
    n_fields, npix, window = fields.shape[0], fields.shape[2], sums.shape[1]
    for part in prange(n_parts):
        runs = np.empty((4 * nside, 3), dtype=np.int64)
        for p in range(basis.shape[0]):
            for r in range(disc_runs(nside, basis[p, 0], radius, runs)):
                if runs[r, 0] % n_parts != part:
                    continue
                start, length, vz, sin_theta, shifted = ring_info(nside, runs[r, 0])
                step = 2 * np.pi / length
                phi = (runs[r, 1] + 0.5 * shifted) * step
                cos_phi, sin_phi = np.cos(phi), np.sin(phi)           # advanced by rotation along the run
                cos_step, sin_step = np.cos(step), np.sin(step)
                for i in range(runs[r, 1], runs[r, 2] + 1):
                    q = _position(start + (i % length), first, lookup, n_range) - offset
                    if q >= 0 and q < window:   # -1 - offset < 0: not computed
                        row, col, w = _project(sin_theta * cos_phi, sin_theta * sin_phi, vz, basis, p, half,
                                               pix_rad, npix)
                        if w > 0.0:
                            for f in range(n_fields):
                                sums[f, q] += w * _bilinear(fields[f], p, row, col)
                            sums[n_fields, q] += w
                            sums[n_fields + 1, q] += w * w
                    cos_phi, sin_phi = cos_phi * cos_step - sin_phi * sin_step, sin_phi * cos_step + cos_phi * sin_step


@njit(cache=True, parallel=True)
def _blended_kernel(sums, view, out):
    n_fields = sums.shape[0] - 2
    for q in prange(out.size):
        out[q] = sums[2 * view, q] / sums[n_fields, q] + sums[2 * view + 1, q] / np.sqrt(sums[n_fields + 1, q])


@njit(cache=True)
def _touched_kernel(nside, basis, radius, first, lookup, n_range, touched):
    buffer = np.empty(disc_capacity(nside, radius), dtype=np.int64)
    for p in range(basis.shape[0]):
        count = disc_pixels(nside, basis[p, 0], radius, buffer)
        for m in range(count):
            if _position(buffer[m], first, lookup, n_range) >= 0:
                touched[p] = True
                break


def footprint_radius(geometry: PatchGeometry) -> float:
    """Radius (rad) of the disc that holds a patch of `geometry` (its corners, 1 % to spare)."""
    return float(np.arctan(np.tan(np.radians(0.5 * geometry.size_deg)) * np.sqrt(2)) * 1.01)


def tiles_near(level: CascadeLevel, theta_min: float, theta_max: float) -> tuple[int, int]:
    """(start, stop): the tile ids (RING, so ring by ring) of every tile of `level` whose patch
    can reach colatitudes theta_min..theta_max (rad): centres within its footprint radius."""
    margin = footprint_radius(level.geometry)
    band = RingBand.covering(level.tile_nside, theta_min - margin, theta_max + margin)
    return band.first_pixel, band.first_pixel + band.n_pixels


class PatchSet:
    """The tiles `ids` of a level, their tangent bases and the disc (circumscribing each patch)
    whose `nside` RING pixels they blend into, those this process computes; `used`: the tiles
    touching any of them. Grid coordinates are on the reprojection's fine grid (UPSAMPLE points
    per patch pixel).

    The pixels computed: pixel_lookup[pixel - first_pixel] = output position, -1 = not computed
    here (another chunk's or MPI rank's); without pixel_lookup, pixels first_pixel ..
    first_pixel + n_pixels - 1 in order (default: the whole sky; n_pixels is unused with a
    lookup)."""

    def __init__(self, nside: int, level: CascadeLevel, ids: np.ndarray, pixel_lookup: np.ndarray | None = None,
                 first_pixel: int = 0, n_pixels: int | None = None):
        g = level.geometry
        self.nside, self.level, self.ids = nside, level, np.asarray(ids, dtype=np.int64)
        self.half = float(np.tan(np.radians(0.5 * g.size_deg)))
        self.pix_rad = float(np.radians(g.pixel_size_deg)) / UPSAMPLE   # fine-grid spacing
        self.npix = UPSAMPLE * g.npix
        self.basis = np.ascontiguousarray(np.stack(tangent_basis(*tile_centres(level, ids)), 1))  # (P, 3, 3)
        self.radius = footprint_radius(g)
        self.first = int(first_pixel)
        self.lookup = np.empty(0, np.int64) if pixel_lookup is None else np.asarray(pixel_lookup, dtype=np.int64)
        self.n_range = (self.lookup.size if pixel_lookup is not None else
                        hp.nside2npix(nside) - self.first if n_pixels is None else int(n_pixels))
        if pixel_lookup is None and self.first == 0 and self.n_range == hp.nside2npix(nside):
            self.used = np.arange(len(ids))
        else:
            touched = np.zeros(len(ids), dtype=bool)
            _touched_kernel(nside, self.basis, self.radius, self.first, self.lookup, self.n_range, touched)
            self.used = np.flatnonzero(touched)  # patches touching our pixels

    def accumulate(self, fields: np.ndarray, sums: np.ndarray, offset: int = 0) -> None:
        """sums (F + 2, window) += (w f_0, ..., w f_{F-1}, w, w^2) at the footprint pixels of the
        patches' fields (F, P, U n, U n) on the fine grid (all ids) whose output positions lie in
        offset .. offset + window - 1 (column = position - offset): pairs (shared part m, own part
        e) of one or more views of them (see `BlendWindow`)."""
        _blend_kernel(self.nside, self.basis, self.radius, self.half, self.pix_rad, self.first, self.lookup,
                      self.n_range, np.ascontiguousarray(fields, dtype=np.float32), sums, int(offset),
                      numba.get_num_threads())

    def pixel_reach(self) -> tuple[int, int]:
        """(start, stop): a range of RING pixels holding every pixel the patches' discs reach."""
        theta = np.arctan2(np.hypot(self.basis[:, 0, 0], self.basis[:, 0, 1]), self.basis[:, 0, 2])
        margin = self.radius + 1e-9   # beyond rounding: disc_runs computes the centres' colatitudes its own way
        band = RingBand.covering(self.nside, float(theta.min()) - margin, float(theta.max()) + margin)
        return band.first_pixel, band.first_pixel + band.n_pixels

    def footprints(self) -> Footprints:
        """The pairs inside the patches, with grid coordinates and weights (for the torch path)."""
        pixels, patch = discs_pixels(self.nside, np.ascontiguousarray(self.basis[:, 0]), self.radius)
        position = pixels - self.first
        inside = (position >= 0) & (position < self.n_range)
        if self.lookup.size:
            position[inside] = self.lookup[position[inside]]
        keep = inside & (position >= 0)
        pixels, patch, position = pixels[keep], patch[keep], position[keep]
        n = len(pixels)
        row, col, weight = np.empty(n, np.float32), np.empty(n, np.float32), np.empty(n, np.float32)
        _footprint_kernel(self.nside, pixels, patch, self.basis, self.half, self.pix_rad, self.npix, row, col, weight)
        inside = weight > 0
        return Footprints(pixel=position[inside], patch=patch[inside],
                          row=row[inside], col=col[inside], weight=weight[inside])


class BlendWindow:
    """The blend of a level's patches into `n_views` float32 arrays of n_out positions, the patches added
    (`add`) in the RING order of their tiles on a window of positions that slides with them:
    `reserve(lo, hi)` before adding patches that reach positions lo .. hi - 1, lo at most the
    lowest any later patch reaches; when the window must move, the positions below lo are final
    and blended: sum(w m) / sum(w) + sum(w e) / sqrt(sum w^2) per view, (m, e) its fields (2 v,
    2 v + 1). What overlapping patches share (predicted from the same large scales: a partition of
    unity keeps it) and what each draws on its own (independent: variance-preserving weights).
    The sums (2 V + 2 rows) span `capacity` positions (a few rows of tiles), not n_out: at
    nside 4096 ~0.35 GB instead of 4.8 GB of memory written once."""

    def __init__(self, n_views: int, n_out: int, capacity: int, label: str = ""):
        self.out, self.label = [np.empty(n_out, dtype=np.float32) for _ in range(n_views)], label
        self.sums = np.zeros((2 * n_views + 2, max(1, min(int(capacity), n_out))), dtype=np.float32)
        self.start = 0     # the output position of column 0
        self.reached = 0   # columns that may hold sums

    @staticmethod
    def bounds(reach: np.ndarray) -> tuple[np.ndarray, int]:
        """(the (lo, hi) to `reserve` for each batch, the widest of them) of batches of patches,
        in the order they are added, reaching output positions reach (B, 2) [start, stop): each
        start lowered to the lowest any later batch reaches."""
        bounds = np.array(reach, dtype=np.int64).reshape(-1, 2)
        bounds[:, 0] = np.minimum.accumulate(bounds[::-1, 0])[::-1]
        return bounds, int(np.max(bounds[:, 1] - bounds[:, 0], initial=1))

    def reserve(self, lo: int, hi: int) -> None:
        if hi - self.start > self.sums.shape[1]:
            self._finish(lo - self.start)
            if hi - self.start > self.sums.shape[1]:
                raise ValueError(f"{self.label}positions {lo}..{hi - 1} do not fit a window of {self.sums.shape[1]}")
        self.reached = max(self.reached, hi - self.start)

    def add(self, patches: PatchSet, fields: np.ndarray) -> None:
        """Accumulate `fields` (2 V, P, U n, U n) of `patches` (reserved first)."""
        patches.accumulate(fields, self.sums, self.start)

    def finish(self) -> list[np.ndarray]:
        """The views' blends (n_out,) each, every position blended (each covered by some patch, or
        RuntimeError)."""
        self._finish(len(self.out[0]) - self.start)
        return self.out

    def _finish(self, done: int) -> None:
        """Blend the first `done` columns into `out`, shift the others to the front."""
        if done <= 0:
            return
        uncovered = max(done - self.reached, 0) + int(np.count_nonzero(self.sums[-2, :min(done, self.reached)] <= 0))
        if uncovered:
            raise RuntimeError(f"{self.label}{uncovered} pixels not covered by any patch (tiling bug)")
        for view, out in enumerate(self.out):
            _blended_kernel(self.sums[:, :done], view, out[self.start:self.start + done])
        live = self.reached - done
        self.sums[:, :live] = self.sums[:, done:self.reached]
        self.sums[:, live:self.reached] = 0.0
        self.start += done
        self.reached = live


def footprints(nside: int, level: CascadeLevel, ids: np.ndarray, pixel_lookup: np.ndarray | None = None) -> Footprints:
    """Pixels of `nside` (RING) inside each patch `ids` of a level (see PatchSet)."""
    return PatchSet(nside, level, ids, pixel_lookup).footprints()


def bilinear_torch(values: torch.Tensor, fp: Footprints) -> torch.Tensor:
    """Differentiable bilinear samples (M,) of fine-grid patches `values` (P, U n, U n) at the
    footprint points."""
    n = values.shape[-1]
    row = torch.from_numpy(fp.row).to(values.device).clamp(0, n - 1)
    col = torch.from_numpy(fp.col).to(values.device).clamp(0, n - 1)
    r0 = row.floor().long().clamp(max=n - 2)
    c0 = col.floor().long().clamp(max=n - 2)
    fr, fc = row - r0, col - c0
    flat = values.reshape(values.shape[0], -1)
    p = torch.from_numpy(fp.patch.astype(np.int64)).to(values.device)

    def at(r, c):
        return flat[p, r * n + c]

    return ((1 - fr) * ((1 - fc) * at(r0, c0) + fc * at(r0, c0 + 1))
            + fr * ((1 - fc) * at(r0 + 1, c0) + fc * at(r0 + 1, c0 + 1)))


def blend_torch(values: torch.Tensor, fp: Footprints, n_out: int, shared: bool = False) -> torch.Tensor:
    """Differentiable blend of fine-grid patches (P, U n, U n) onto n_out pixels: sum(w v) / sqrt(sum w^2)
    (fields each patch draws on its own: its latents' part and decoder noise), or with `shared`
    sum(w v) / sum(w) (fields the overlapping patches share: the decoding at zero latents). Pixels
    no patch covers are 0."""
    w = torch.from_numpy(fp.weight).to(values.device)
    idx = torch.from_numpy(fp.pixel).to(values.device)
    num = torch.zeros(n_out, dtype=values.dtype, device=values.device).index_add(0, idx, w * bilinear_torch(values, fp))
    den = torch.zeros(n_out, dtype=values.dtype, device=values.device).index_add(0, idx, w if shared else w * w)
    return num / (den.clamp_min(1e-12) if shared else den.clamp_min(1e-12).sqrt())
