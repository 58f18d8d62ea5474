"""HEALPix on all cores: RING geometry kernels (numba) and spherical harmonic transforms (ducc0).

- `interpolate_at_vectors` / `interpolate_at_pixels` give healpy's `get_interp_val` numbers (the
  same four pixels and weights, Healpix_Base::get_interpol) to float64 rounding, in parallel and
  without the (theta, phi) and weight arrays healpy allocates.
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
    npix = 12 * nside * nside
    ncap = 2 * nside * (nside - 1)
    if pix < ncap:
        iring = (1 + np.int64(np.sqrt(1 + 2 * pix))) >> 1
        iphi = pix + 1 - 2 * iring * (iring - 1)
        z = 1.0 - iring * iring * 4.0 / npix
        phi = (iphi - 0.5) * 0.5 * np.pi / iring
    elif pix < npix - ncap:
        ip = pix - ncap
        tmp = ip // (4 * nside)
        iring = tmp + nside
        iphi = ip - tmp * 4 * nside + 1
        z = (2 * nside - iring) * 8.0 * nside / npix
        fodd = 1.0 if (iring + nside) & 1 else 0.5
        phi = (iphi - fodd) * 0.5 * np.pi / nside
    else:
        ip = npix - pix
        iring = (1 + np.int64(np.sqrt(2 * ip - 1))) >> 1
        iphi = 4 * iring + 1 - (ip - 2 * iring * (iring - 1))
        z = iring * iring * 4.0 / npix - 1.0
        phi = (iphi - 0.5) * 0.5 * np.pi / iring
    sth = np.sqrt((1.0 - z) * (1.0 + z))
    return sth * np.cos(phi), sth * np.sin(phi), z


@njit(cache=True, inline="always")
def _ring_info(nside, ring):
    """(first pixel, pixels in the ring, colatitude, shifted) of RING ring index `ring` (1..4 nside - 1)."""
    npix = 12 * nside * nside
    northring = 4 * nside - ring if ring > 2 * nside else ring
    if northring < nside:
        tmp = northring * northring * 4.0 / npix
        theta = np.arctan2(np.sqrt(tmp * (2.0 - tmp)), 1.0 - tmp)
        ringpix = 4 * northring
        shifted = True
        startpix = 2 * northring * (northring - 1)
    else:
        theta = np.arccos((2 * nside - northring) * (8.0 * nside / npix))
        ringpix = 4 * nside
        shifted = ((northring - nside) & 1) == 0
        startpix = 2 * nside * (nside - 1) + (northring - nside) * ringpix
    if northring != ring:
        theta = np.pi - theta
        startpix = npix - startpix - ringpix
    return startpix, ringpix, theta, shifted


@njit(cache=True, inline="always")
def _ring_pair(nside, ring, phi):
    """The two pixels of ring `ring` around longitude `phi` and the weight of the second; with the ring's colatitude."""
    start, count, theta, shifted = _ring_info(nside, ring)
    dphi = 2 * np.pi / count
    tmp = phi / dphi - 0.5 * shifted
    i1 = np.int64(np.floor(tmp))
    w = (phi - (i1 + 0.5 * shifted) * dphi) / dphi
    i2 = i1 + 1
    if i1 < 0:
        i1 += count
    if i2 >= count:
        i2 -= count
    return start + i1, start + i2, w, theta


@njit(cache=True, inline="always")
def _interpolate(values, nside, x, y, z):
    """healpy's bilinear interpolation (Healpix_Base::get_interpol) of a RING map at a unit vector."""
    npix = 12 * nside * nside
    theta = np.arctan2(np.sqrt(x * x + y * y), z)
    phi = np.arctan2(y, x)
    if phi < 0.0:
        phi += 2 * np.pi
    az = abs(z)
    if az <= 2.0 / 3.0:
        ir1 = np.int64(nside * (2.0 - 1.5 * z))
    else:
        ir1 = np.int64(nside * np.sqrt(3.0 * (1.0 - az)))
        if z <= 0.0:
            ir1 = 4 * nside - ir1 - 1
    ir2 = ir1 + 1
    p0 = p1 = p2 = p3 = np.int64(0)
    w0 = w1 = w2 = w3 = 0.0
    theta1 = theta2 = 0.0
    if ir1 > 0:
        p0, p1, f, theta1 = _ring_pair(nside, ir1, phi)
        w0, w1 = 1.0 - f, f
    if ir2 < 4 * nside:
        p2, p3, f, theta2 = _ring_pair(nside, ir2, phi)
        w2, w3 = 1.0 - f, f
    if ir1 == 0:
        wtheta = theta / theta2
        w2 *= wtheta
        w3 *= wtheta
        fac = (1.0 - wtheta) * 0.25
        w0, w1, w2, w3 = fac, fac, w2 + fac, w3 + fac
        p0, p1 = (p2 + 2) & 3, (p3 + 2) & 3
    elif ir2 == 4 * nside:
        wtheta = (theta - theta1) / (np.pi - theta1)
        fac = wtheta * 0.25
        w0, w1 = w0 * (1.0 - wtheta) + fac, w1 * (1.0 - wtheta) + fac
        w2 = w3 = fac
        p2, p3 = ((p0 + 2) & 3) + npix - 4, ((p1 + 2) & 3) + npix - 4
    else:
        wtheta = (theta - theta1) / (theta2 - theta1)
        w0, w1 = w0 * (1.0 - wtheta), w1 * (1.0 - wtheta)
        w2, w3 = w2 * wtheta, w3 * wtheta
    return w0 * values[p0] + w1 * values[p1] + w2 * values[p2] + w3 * values[p3]


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
def disc_pixels(nside, centre, radius, out):
    """RING pixels whose centres lie within `radius` (rad, < pi / 2) of unit vector `centre`,
    ring by ring (north first), written to `out` (at least `disc_capacity` long); returns their
    count."""
    theta_c = np.arctan2(np.sqrt(centre[0] ** 2 + centre[1] ** 2), centre[2])
    phi_c = np.arctan2(centre[1], centre[0])
    cos_r = np.cos(radius)
    ring_lo = max(_ring_above(nside, np.cos(max(theta_c - radius, 0.0))), 1)
    ring_hi = min(_ring_above(nside, np.cos(min(theta_c + radius, np.pi))) + 1, 4 * nside - 1)
    count = 0
    for ring in range(ring_lo, ring_hi + 1):
        start, length, theta, shifted = _ring_info(nside, ring)
        # phi - phi_c within dphi: cos(dphi) = (cos r - cos theta cos theta_c) / (sin theta sin theta_c)
        numerator = cos_r - np.cos(theta) * np.cos(theta_c)
        denominator = np.sin(theta) * np.sin(theta_c)
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
        for i in range(first, last + 1):
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
def _interpolate_vectors(values, nside, vectors, out):
    for m in prange(vectors.shape[0]):
        out[m] = _interpolate(values, nside, vectors[m, 0], vectors[m, 1], vectors[m, 2])


@njit(cache=True, parallel=True)
def _interpolate_pixels(values, nside_in, nside_out, pixels, out):
    for m in prange(pixels.size):
        x, y, z = ring_pix2vec(nside_out, pixels[m])
        out[m] = _interpolate(values, nside_in, x, y, z)


@njit(cache=True, parallel=True)
def _interpolate_all_pixels(values, nside_in, nside_out, out):
    for m in prange(out.size):
        x, y, z = ring_pix2vec(nside_out, m)
        out[m] = _interpolate(values, nside_in, x, y, z)


def _map_nside(values: np.ndarray) -> tuple[np.ndarray, int]:
    values = np.ascontiguousarray(values, dtype=None if np.asarray(values).dtype in (np.float32, np.float64)
                                  else np.float64)
    if values.ndim != 1 or not hp.isnpixok(values.size):
        raise ValueError(f"a HEALPix map of shape {values.shape}: expected one RING map of 12 nside^2 pixels")
    return values, hp.npix2nside(values.size)


def interpolate_at_vectors(values: np.ndarray, vectors: np.ndarray) -> np.ndarray:
    """Bilinear samples (float64, shape vectors.shape[:-1]) of a RING map at unit vectors (..., 3)."""
    values, nside = _map_nside(values)
    flat = np.ascontiguousarray(np.asarray(vectors, dtype=np.float64).reshape(-1, 3))
    out = np.empty(len(flat))
    _interpolate_vectors(values, nside, flat, out)
    return out.reshape(np.shape(vectors)[:-1])


def interpolate_at_pixels(values: np.ndarray, nside: int, pixels: np.ndarray | None = None,
                          dtype=np.float64) -> np.ndarray:
    """Bilinear samples of a RING map `values` (any nside) at the centres of RING `pixels` of
    `nside` (None = all), as `dtype`."""
    values, nside_in = _map_nside(values)
    if pixels is None:
        out = np.empty(hp.nside2npix(nside), dtype=dtype)
        _interpolate_all_pixels(values, nside_in, int(nside), out)
    else:
        pixels = np.ascontiguousarray(pixels, dtype=np.int64)
        out = np.empty(len(pixels), dtype=dtype)
        _interpolate_pixels(values, nside_in, int(nside), pixels, out)
    return out


def map2alm(values: np.ndarray, lmax: int) -> np.ndarray:
    """healpy's `map2alm(values, lmax, iter=0)` (complex128, healpy order) of a RING map."""
    values, nside = _map_nside(values)
    geometry = ducc0.healpix.Healpix_Base(nside, "RING").sht_info()
    alm = ducc0.sht.adjoint_synthesis(map=values[None].astype(np.float64), lmax=int(lmax), spin=0, nthreads=0,
                                      **geometry)[0]
    alm *= 4 * np.pi / values.size
    return alm


def alm2map_spin(alms, nside: int, lmax: int) -> np.ndarray:
    """healpy's `alm2map_spin(alms, nside, 2, lmax)`: (2, 12 nside^2) float64 Q, U of E, B alms."""
    geometry = ducc0.healpix.Healpix_Base(int(nside), "RING").sht_info()
    return ducc0.sht.synthesis(alm=np.asarray(alms, dtype=np.complex128), lmax=int(lmax), spin=2, nthreads=0,
                               **geometry)


__all__ = ["alm2map_spin", "map2alm", "disc_capacity", "disc_pixels", "discs_pixels", "interpolate_at_pixels", "interpolate_at_vectors", "ring_pix2vec"]
