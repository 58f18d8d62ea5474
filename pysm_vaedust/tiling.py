"""Stage 6 — tiling and reprojection: patches of a fixed sphere tiling onto HEALPix pixels.

A cascade level n tiles the whole sphere (poles included) with gnomonic patches centred on the
pixels of a HEALPix grid of `tile_nside`; the patch side is 2.18 tile spacings, so patches
overlap by about half. Each patch's latent is drawn from a counter-based generator keyed by
(seed, level, tile index): any subset of patches, in any order, gets the same latents.

Reprojection: every HEALPix pixel inside a patch footprint receives the bilinear interpolation
of the decoded patch at its tangent-plane position, weighted by w = c(x) c(y) with
c(t) = cos^2(pi t / 2) over the half-width. Overlaps are blended as sum(w v) / sqrt(sum(w^2)),
which keeps the variance of independent unit-variance patches uniform over the sky.
"""

from __future__ import annotations

from dataclasses import dataclass

import healpy as hp
import numpy as np
import torch
from numba import njit

from .cutouts import PatchGeometry, tangent_basis

#: tile_nside of level 0 (3.66 deg spacing for 8 deg patches); level n uses BASE_TILE_NSIDE * factor.
BASE_TILE_NSIDE = 16


@dataclass(frozen=True)
class CascadeLevel:
    """One level of the self-similar cascade.

    factor: pixel scale = base pixel / factor; geometry: patch of this level;
    ell_lo / ell_hi: multipole band this level supplies (ell_hi = inf for the last level);
    amplitude: relative amplitude factor**(-(slope - 2) / 2) of a C_ell ~ ell^-slope field.
    """

    index: int
    factor: int
    geometry: PatchGeometry
    tile_nside: int
    ell_lo: float
    ell_hi: float
    amplitude: float

    @property
    def n_tiles(self) -> int:
        return hp.nside2npix(self.tile_nside)


def cascade_factors(base_pixel_arcmin: float, nside: int) -> list[int]:
    """Scale factors of the cascade levels needed to reach the pixel size of `nside`.

    Factors grow by 4 while below r = base pixel / HEALPix pixel, then one last power of two <= r.
    """
    ratio = base_pixel_arcmin / (hp.nside2resol(nside, arcmin=True))
    factors = [1]
    while 4 * factors[-1] < ratio:
        factors.append(4 * factors[-1])
    last = 2 ** int(np.floor(np.log2(max(ratio, 1.0))))
    if last > factors[-1]:
        factors.append(last)
    return factors


def cascade_levels(nside: int, base: PatchGeometry, slope: float, ell_cut_fraction: float = 2 / 3):
    """The cascade for an output `nside`: levels with their bands and amplitudes.

    Level n supplies ell in [ell_hi(n-1), ell_hi(n)], ell_hi(n) = ell_cut_fraction * Nyquist(n).
    """
    levels, ell_lo = [], 0.0
    factors = cascade_factors(60 * base.pixel_size_deg, nside)
    for n, f in enumerate(factors):
        geometry = base.scaled(f)
        nyquist = 180.0 / geometry.pixel_size_deg
        ell_hi = ell_cut_fraction * nyquist if n < len(factors) - 1 else np.inf
        levels.append(CascadeLevel(n, f, geometry, BASE_TILE_NSIDE * f, ell_lo, ell_hi,
                                   float(f ** (-(slope - 2) / 2))))
        ell_lo = ell_hi
    return levels


def smooth_step(x):
    """0 for x <= 2/3, 1 for x >= 3/2, cos^2 taper in log x between (a smooth low-pass edge)."""
    t = np.clip((np.log(np.asarray(x, dtype=np.float64)) - np.log(2 / 3)) / (np.log(1.5) - np.log(2 / 3)), 0, 1)
    return np.sin(0.5 * np.pi * t) ** 2


def band_filter(level: CascadeLevel) -> np.ndarray:
    """Fourier multiplier (npix, npix) selecting the level's band (smooth edges), for np.fft.fft2."""
    g = level.geometry
    k = np.fft.fftfreq(g.npix, d=1.0 / g.npix)
    ell = 2 * np.pi * np.hypot(*np.meshgrid(k, k, indexing="ij")) / np.radians(g.size_deg)
    ell = np.maximum(ell, 1e-3)
    keep = np.ones_like(ell)
    if np.isfinite(level.ell_hi):
        keep *= 1 - smooth_step(ell / level.ell_hi)
    if level.ell_lo > 0:
        keep *= smooth_step(ell / level.ell_lo)
    return keep


def tile_centres(level: CascadeLevel, ids: np.ndarray):
    """Galactic (lon, lat) in degrees of the tiles `ids` (RING pixels of tile_nside)."""
    return hp.pix2ang(level.tile_nside, ids, lonlat=True)


def patch_normals(seed: int, level: int, ids: np.ndarray, size: int) -> np.ndarray:
    """Standard normals (len(ids), size) float32, one Philox stream per (seed, level, tile id):
    a patch gets the same numbers whatever subset or order of patches is computed."""
    out = np.empty((len(ids), size), dtype=np.float32)
    for row, tile in enumerate(np.asarray(ids, dtype=np.int64)):
        key = (int(seed) & 0xFFFFFFFF) | (int(level) << 32), int(tile)
        out[row] = np.random.Generator(np.random.Philox(key=key)).standard_normal(size, dtype=np.float32)
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


@njit(cache=True)
def _project(vx, vy, vz, patch, basis, half, pix_rad, npix, row, col, weight):
    """Tangent-plane grid coordinates and blending weight of each (pixel, patch) pair;
    weight 0 marks points outside the patch."""
    for m in range(vx.size):
        p = patch[m]
        depth = vx[m] * basis[p, 0, 0] + vy[m] * basis[p, 0, 1] + vz[m] * basis[p, 0, 2]
        x = (vx[m] * basis[p, 1, 0] + vy[m] * basis[p, 1, 1] + vz[m] * basis[p, 1, 2]) / depth
        y = (vx[m] * basis[p, 2, 0] + vy[m] * basis[p, 2, 1] + vz[m] * basis[p, 2, 2]) / depth
        if abs(x) < half and abs(y) < half:
            weight[m] = (np.cos(0.5 * np.pi * x / half) * np.cos(0.5 * np.pi * y / half)) ** 2
        else:
            weight[m] = 0.0
        # the grid is uniform in x = tan(angle): pixel j is centred at (j + 0.5 - n/2) pix_rad
        row[m] = y / pix_rad + npix / 2 - 0.5
        col[m] = x / pix_rad + npix / 2 - 0.5


def footprints(nside: int, level: CascadeLevel, ids: np.ndarray, pixel_lookup: np.ndarray | None = None) -> Footprints:
    """Pixels of `nside` (RING) inside each patch `ids` of a level.

    pixel_lookup: optional (12 nside^2,) int64 map from global pixel to output position (-1 =
    not computed here, e.g. another MPI rank's pixel); default identity (full sky).
    """
    g = level.geometry
    half = np.tan(np.radians(0.5 * g.size_deg))
    basis = np.stack(tangent_basis(*tile_centres(level, ids)), 1)  # (P, 3 [n0, east, north], 3)
    radius = np.arctan(half * np.sqrt(2)) * 1.01
    lists = [hp.query_disc(nside, basis[i, 0], radius) for i in range(len(ids))]
    pixels = np.concatenate(lists) if lists else np.empty(0, np.int64)
    patch = np.repeat(np.arange(len(ids), dtype=np.int32), [len(p) for p in lists])
    if pixel_lookup is not None:
        position = pixel_lookup[pixels]
        keep = position >= 0
        pixels, patch, position = pixels[keep], patch[keep], position[keep]
    else:
        position = pixels
    row, col, weight = (np.empty(len(pixels), np.float32) for _ in range(3))
    _project(*hp.pix2vec(nside, pixels), patch, basis, half, np.radians(g.pixel_size_deg), g.npix,
             row, col, weight)
    inside = weight > 0
    return Footprints(pixel=position[inside].astype(np.int64), patch=patch[inside],
                      row=row[inside], col=col[inside], weight=weight[inside])


@njit(cache=True)
def _accumulate(values, pixel, patch, row, col, weight, num, den):
    n = values.shape[1]
    for m in range(pixel.size):
        r = min(max(row[m], 0.0), n - 1.0)
        c = min(max(col[m], 0.0), n - 1.0)
        r0 = min(int(r), n - 2)
        c0 = min(int(c), n - 2)
        fr, fc = r - r0, c - c0
        p = patch[m]
        v = ((1 - fr) * ((1 - fc) * values[p, r0, c0] + fc * values[p, r0, c0 + 1])
             + fr * ((1 - fc) * values[p, r0 + 1, c0] + fc * values[p, r0 + 1, c0 + 1]))
        w = weight[m]
        num[pixel[m]] += w * v
        den[pixel[m]] += w * w


def accumulate(values: np.ndarray, fp: Footprints, num: np.ndarray, den: np.ndarray) -> None:
    """Add patches `values` (P, n, n) into num += w v, den += w^2 at their footprint pixels."""
    _accumulate(np.ascontiguousarray(values, dtype=np.float32), fp.pixel, fp.patch, fp.row, fp.col,
                fp.weight, num, den)


def bilinear_torch(values: torch.Tensor, fp: Footprints) -> torch.Tensor:
    """Differentiable bilinear samples (M,) of patches `values` (P, n, n) at the footprint points."""
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


def blend_torch(values: torch.Tensor, fp: Footprints, n_out: int) -> torch.Tensor:
    """Differentiable blend of patches (P, n, n) onto n_out pixels: sum(w v) / sqrt(sum w^2).

    Pixels no patch covers are 0."""
    w = torch.from_numpy(fp.weight).to(values.device)
    idx = torch.from_numpy(fp.pixel).to(values.device)
    num = torch.zeros(n_out, dtype=values.dtype, device=values.device).index_add(0, idx, w * bilinear_torch(values, fp))
    den = torch.zeros(n_out, dtype=values.dtype, device=values.device).index_add(0, idx, w * w)
    return num / den.clamp_min(1e-12).sqrt()
