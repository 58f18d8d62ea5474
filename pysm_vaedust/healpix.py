"""HEALPix on all cores: RING geometry kernels (numba) and spherical harmonic transforms (ducc0).

- `interpolate_at_pixels` / `interpolate_on_grids` (gnomonic patch grids, directions made on
  the fly) give healpy's `get_interp_val` numbers (the same four pixels and weights,
  Healpix_Base::get_interpol) to float64 rounding, in parallel and without the direction,
  (theta, phi) and weight arrays healpy needs.
- `disc_pixels` / `discs_pixels`: `hp.query_disc`'s pixel sets, callable inside numba kernels.
- `map2alm` / `alm2map_spin`: healpy's `map2alm(iter=0)` / `alm2map_spin` (same alm layout,
  agreement to 1e-11), multithreaded.
"""

from __future__ import annotations

import ducc0
import healpy as hp
import numpy as np
from numba import njit, prange


@njit(cache=True, inline="always")
def ring_pix2vec(nside, pix):
    """Unit vector (x, y, z) of a RING pixel centre (HEALPix pix2loc, Gorski et al. 2005)."""
    ring, i = _pixel_ring(nside, pix)
    _, length, z, sin_theta, shifted = ring_info(nside, ring)
    phi = (i + 0.5 * shifted) * (2 * np.pi / length)
    return sin_theta * np.cos(phi), sin_theta * np.sin(phi), z


@njit(cache=True, inline="always")
def ring_info(nside, ring):
    """(first pixel, pixels in the ring, cos theta, sin theta, shifted) of RING ring index `ring`
    (1..4 nside - 1); pixel i of the ring is centred at phi = (i + shifted / 2) 2 pi / length."""
    npix = 12 * nside * nside
    northring = 4 * nside - ring if ring > 2 * nside else ring
    if northring < nside:
        tmp = northring * northring * 4.0 / npix
        z, sin_theta = 1.0 - tmp, np.sqrt(tmp * (2.0 - tmp))
        ringpix = 4 * northring
        shifted = True
        startpix = 2 * northring * (northring - 1)
    else:
        z = (2 * nside - northring) * (8.0 * nside / npix)
        sin_theta = np.sqrt((1.0 - z) * (1.0 + z))
        ringpix = 4 * nside
        shifted = ((northring - nside) & 1) == 0
        startpix = 2 * nside * (nside - 1) + (northring - nside) * ringpix
    if northring != ring:
        z = -z
        startpix = npix - startpix - ringpix
    return startpix, ringpix, z, sin_theta, shifted


@njit(cache=True)
def _ring_colatitudes(nside):
    """(4 nside,) colatitude of every RING ring index 1..4 nside - 1 (entry 0 unused)."""
    theta = np.zeros(4 * nside)
    for ring in range(1, 4 * nside):
        _, _, z, sin_theta, _ = ring_info(nside, ring)
        theta[ring] = np.arctan2(sin_theta, z)
    return theta


@njit(cache=True, inline="always")
def _pixel_ring(nside, pix):
    """(ring index, position i in the ring) of RING pixel `pix`."""
    npix = 12 * nside * nside
    ncap = 2 * nside * (nside - 1)
    if pix < ncap:
        ring = (1 + np.int64(np.sqrt(1 + 2 * pix))) >> 1
        return ring, pix - 2 * ring * (ring - 1)
    if pix < npix - ncap:
        ip = pix - ncap
        return ip // (4 * nside) + nside, ip % (4 * nside)
    ip = npix - pix
    iring = (1 + np.int64(np.sqrt(2 * ip - 1))) >> 1
    return 4 * nside - iring, 4 * iring - (ip - 2 * iring * (iring - 1))


@njit(cache=True, inline="always")
def _ring_pair(nside, ring, phi):
    """The two pixels of ring `ring` around longitude `phi` and the weight of the second."""
    start, count, _, _, shifted = ring_info(nside, ring)
    dphi = 2 * np.pi / count
    tmp = phi / dphi - 0.5 * shifted
    i1 = np.int64(np.floor(tmp))
    w = (phi - (i1 + 0.5 * shifted) * dphi) / dphi
    i2 = i1 + 1
    if i1 < 0:
        i1 += count
    if i1 >= count:      # phi rounded to 2 pi
        i1 -= count
    if i2 >= count:
        i2 -= count
    return start + i1, start + i2, w


@njit(cache=True, inline="always")
def _interpolate(values, nside, ring_theta, theta, phi):
    """healpy's bilinear interpolation (Healpix_Base::get_interpol) of a RING map at (theta, phi),
    0 <= phi < 2 pi; ring_theta = `_ring_colatitudes(nside)`."""
    npix = 12 * nside * nside
    ir1 = _ring_above(nside, np.cos(theta))
    ir2 = ir1 + 1
    p0 = p1 = p2 = p3 = np.int64(0)
    w0 = w1 = w2 = w3 = 0.0
    if ir1 > 0:
        p0, p1, f = _ring_pair(nside, ir1, phi)
        w0, w1 = 1.0 - f, f
    if ir2 < 4 * nside:
        p2, p3, f = _ring_pair(nside, ir2, phi)
        w2, w3 = 1.0 - f, f
    if ir1 == 0:
        wtheta = theta / ring_theta[ir2]
        w2 *= wtheta
        w3 *= wtheta
        fac = (1.0 - wtheta) * 0.25
        w0, w1, w2, w3 = fac, fac, w2 + fac, w3 + fac
        p0, p1 = (p2 + 2) & 3, (p3 + 2) & 3
    elif ir2 == 4 * nside:
        theta1 = ring_theta[ir1]
        wtheta = (theta - theta1) / (np.pi - theta1)
        fac = wtheta * 0.25
        w0, w1 = w0 * (1.0 - wtheta) + fac, w1 * (1.0 - wtheta) + fac
        w2 = w3 = fac
        p2, p3 = ((p0 + 2) & 3) + npix - 4, ((p1 + 2) & 3) + npix - 4
    else:
        theta1 = ring_theta[ir1]
        wtheta = (theta - theta1) / (ring_theta[ir2] - theta1)
        w0, w1 = w0 * (1.0 - wtheta), w1 * (1.0 - wtheta)
        w2, w3 = w2 * wtheta, w3 * wtheta
    return w0 * values[p0] + w1 * values[p1] + w2 * values[p2] + w3 * values[p3]


@njit(cache=True, inline="always")
def _interpolate_at_pixel(values, nside_in, ring_theta, nside, out_theta, pix):
    """`_interpolate` at the centre of RING pixel `pix` of `nside` (out_theta: its ring colatitudes)."""
    ring, i = _pixel_ring(nside, pix)
    _, length, _, _, shifted = ring_info(nside, ring)
    return _interpolate(values, nside_in, ring_theta, out_theta[ring], (i + 0.5 * shifted) * (2 * np.pi / length))


@njit(cache=True, inline="always")
def _ring_above(nside, z):
    """Index of the ring just north of (or at) z = cos(theta): 0 (north pole) ... 4 nside - 1."""
    az = abs(z)
    if az <= 2.0 / 3.0:
        return np.int64(nside * (2.0 - 1.5 * z))
    iring = np.int64(nside * np.sqrt(3.0 * (1.0 - az)))
    return iring if z > 0 else 4 * nside - iring - 1


@njit(cache=True)
def disc_capacity(nside, radius):
    """An upper bound on the number of RING pixels of `nside` within `radius` (rad) of a point."""
    pixel_area = 4 * np.pi / (12 * nside * nside)
    return int(4 * np.pi * (1 - np.cos(radius)) / pixel_area) + 8 * (int(radius / np.sqrt(pixel_area)) + 2) + 64


@njit(cache=True)
def disc_runs(nside, centre, radius, runs):
    """The RING pixels whose centres lie within `radius` (rad, < pi / 2) of unit vector `centre`
    as runs (ring, first, last) written to `runs` (at least 4 nside rows), north first: pixels
    i = first..last of the ring (i modulo the ring's length); returns the number of runs."""
    z_c = centre[2]
    sin_c = np.sqrt(centre[0] ** 2 + centre[1] ** 2)
    theta_c = np.arctan2(sin_c, z_c)
    phi_c = np.arctan2(centre[1], centre[0])
    cos_r = np.cos(radius)
    ring_lo = max(_ring_above(nside, np.cos(max(theta_c - radius, 0.0))), 1)
    ring_hi = min(_ring_above(nside, np.cos(min(theta_c + radius, np.pi))) + 1, 4 * nside - 1)
    count = 0
    for ring in range(ring_lo, ring_hi + 1):
        start, length, z, sin_theta, shifted = ring_info(nside, ring)
        # phi - phi_c within dphi: cos(dphi) = (cos r - cos theta cos theta_c) / (sin theta sin theta_c)
        numerator = cos_r - z * z_c
        denominator = sin_theta * sin_c
        if numerator > denominator:                 # |theta - theta_c| > r: the ring misses the disc
            continue
        if numerator <= -denominator:               # the whole ring is inside (the disc holds a pole)
            first, last = 0, length - 1
        else:
            dphi = np.arccos(numerator / denominator)
            step = 2 * np.pi / length
            first = np.int64(np.ceil((phi_c - dphi) / step - 0.5 * shifted))
            last = np.int64(np.floor((phi_c + dphi) / step - 0.5 * shifted))
            if last - first + 1 > length:
                first, last = 0, length - 1
            if last < first:
                continue
        runs[count, 0], runs[count, 1], runs[count, 2] = ring, first, last
        count += 1
    return count


@njit(cache=True)
def disc_pixels(nside, centre, radius, out):
    """RING pixels whose centres lie within `radius` (rad, < pi / 2) of unit vector `centre`,
    ring by ring (north first), written to `out` (at least `disc_capacity` long); returns their
    count."""
    runs = np.empty((4 * nside, 3), dtype=np.int64)
    count = 0
    for r in range(disc_runs(nside, centre, radius, runs)):
        start, length, _, _, _ = ring_info(nside, runs[r, 0])
        if count + runs[r, 2] - runs[r, 1] + 1 > out.size:
            raise ValueError("disc_pixels: the output buffer is shorter than the disc")
        for i in range(runs[r, 1], runs[r, 2] + 1):
            out[count] = start + (i % length)
            count += 1
    return count


@njit(cache=True)
def discs_pixels(nside, centres, radius):
    """(pixels int64, disc index int32) of the RING pixels within `radius` (rad) of each unit
    vector of `centres` (P, 3), disc after disc (query_disc's sets; ring order within a disc)."""
    buffer = np.empty(disc_capacity(nside, radius), dtype=np.int64)
    counts = np.empty(centres.shape[0], dtype=np.int64)
    for p in range(centres.shape[0]):
        counts[p] = disc_pixels(nside, centres[p], radius, buffer)
    pixels = np.empty(counts.sum(), dtype=np.int64)
    disc = np.empty(counts.sum(), dtype=np.int32)
    at = 0
    for p in range(centres.shape[0]):
        disc_pixels(nside, centres[p], radius, buffer)
        pixels[at:at + counts[p]] = buffer[:counts[p]]
        disc[at:at + counts[p]] = p
        at += counts[p]
    return pixels, disc


@njit(cache=True, parallel=True)
def _interpolate_pixels(values, nside_in, nside, pixels, out):
    ring_theta, out_theta = _ring_colatitudes(nside_in), _ring_colatitudes(nside)
    for m in prange(pixels.size):
        out[m] = _interpolate_at_pixel(values, nside_in, ring_theta, nside, out_theta, pixels[m])


@njit(cache=True, parallel=True)
def _interpolate_all_pixels(values, nside_in, nside, out):
    ring_theta, out_theta = _ring_colatitudes(nside_in), _ring_colatitudes(nside)
    for m in prange(out.size):
        out[m] = _interpolate_at_pixel(values, nside_in, ring_theta, nside, out_theta, m)


@njit(cache=True, parallel=True)
def _interpolate_grids(values, nside, basis, offsets, out):
    ring_theta = _ring_colatitudes(nside)
    n = offsets.size
    for k in prange(basis.shape[0] * n):
        p, row = k // n, k % n
        for col in range(n):
            x = basis[p, 0, 0] + offsets[col] * basis[p, 1, 0] + offsets[row] * basis[p, 2, 0]
            y = basis[p, 0, 1] + offsets[col] * basis[p, 1, 1] + offsets[row] * basis[p, 2, 1]
            z = basis[p, 0, 2] + offsets[col] * basis[p, 1, 2] + offsets[row] * basis[p, 2, 2]
            phi = np.arctan2(y, x)
            out[p, row, col] = _interpolate(values, nside, ring_theta, np.arctan2(np.sqrt(x * x + y * y), z),
                                            phi + 2 * np.pi if phi < 0.0 else phi)


def _map_nside(values: np.ndarray) -> tuple[np.ndarray, int]:
    values = np.ascontiguousarray(values, dtype=None if np.asarray(values).dtype in (np.float32, np.float64)
                                  else np.float64)
    if values.ndim != 1 or not hp.isnpixok(values.size):
        raise ValueError(f"a HEALPix map of shape {values.shape}: expected one RING map of 12 nside^2 pixels")
    return values, hp.npix2nside(values.size)


def interpolate_on_grids(values: np.ndarray, basis: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """Bilinear samples (P, n, n) float64 of a RING map on gnomonic grids: point (row, col) of grid
    p is the direction of basis[p, 0] + offsets[col] basis[p, 1] + offsets[row] basis[p, 2]
    (basis (P, 3, 3): centre, x and y unit vectors; offsets (n,) tangent-plane coordinates)."""
    values, nside = _map_nside(values)
    basis = np.ascontiguousarray(basis, dtype=np.float64)
    offsets = np.ascontiguousarray(offsets, dtype=np.float64)
    out = np.empty((len(basis), len(offsets), len(offsets)))
    _interpolate_grids(values, nside, basis, offsets, out)
    return out


def interpolate_at_pixels(values: np.ndarray, nside: int, pixels: np.ndarray | None = None,
                          dtype=np.float64) -> np.ndarray:
    """Bilinear samples of a RING map `values` (any nside) at the centres of RING `pixels` of
    `nside` (None = all), as `dtype` (a new array); at its own nside the map's values themselves."""
    values, nside_in = _map_nside(values)
    if nside_in == nside:   # at its own pixel centres a map interpolates to itself
        return (values if pixels is None else values[pixels]).astype(dtype, copy=True)
    if pixels is None:
        out = np.empty(hp.nside2npix(nside), dtype=dtype)
        _interpolate_all_pixels(values, nside_in, int(nside), out)
    else:
        pixels = np.ascontiguousarray(pixels, dtype=np.int64)
        if pixels.size and (pixels.min() < 0 or pixels.max() >= hp.nside2npix(nside)):
            raise ValueError(f"pixels outside 0..{hp.nside2npix(nside) - 1} (nside {nside})")
        out = np.empty(len(pixels), dtype=dtype)
        _interpolate_pixels(values, nside_in, int(nside), pixels, out)
    return out


def map2alm(values: np.ndarray, lmax: int) -> np.ndarray:
    """healpy's `map2alm(values, lmax, iter=0)` (complex128, healpy order) of a RING map."""
    values, nside = _map_nside(values)
    geometry = ducc0.healpix.Healpix_Base(nside, "RING").sht_info()
    alm = ducc0.sht.adjoint_synthesis(map=np.asarray(values, dtype=np.float64)[None], lmax=int(lmax), spin=0,
                                      nthreads=0, **geometry)[0]
    alm *= 4 * np.pi / values.size
    return alm


def alm2map_spin(alms, nside: int, lmax: int) -> np.ndarray:
    """healpy's `alm2map_spin(alms, nside, 2, lmax)`: (2, 12 nside^2) float64 Q, U of E, B alms."""
    geometry = ducc0.healpix.Healpix_Base(int(nside), "RING").sht_info()
    return ducc0.sht.synthesis(alm=np.asarray(alms, dtype=np.complex128), lmax=int(lmax), spin=2, nthreads=0,
                               **geometry)


__all__ = ["alm2map_spin", "disc_capacity", "disc_pixels", "disc_runs", "discs_pixels", "interpolate_at_pixels",
           "interpolate_on_grids", "map2alm", "ring_info", "ring_pix2vec"]
