"""HEALPix on all cores: RING geometry kernels (numba) and spherical harmonic transforms (ducc0).

- `interpolate_at_pixels` / `interpolate_on_grids` (gnomonic patch grids, directions made on
  the fly) give healpy's `get_interp_val` numbers (the same four pixels and weights,
  Healpix_Base::get_interpol) to float64 rounding, in parallel and without the direction,
  (theta, phi) and weight arrays healpy needs.
  Both read a whole map or a `BandMap` (the map on a band of whole rings: what a chunk of the
  sky needs, so that no full-sky array of a fine nside is ever made).
- `disc_pixels` / `discs_pixels`: `hp.query_disc`'s pixel sets, callable inside numba kernels.
- `map2alm` / `alm2map_spin`: healpy's `map2alm(iter=0)` / `alm2map_spin` (same alm layout,
  agreement to 1e-11), multithreaded; `alm2map_spin` also on the rings of `mirror_bands` (a
  ring and its mirror together, as ducc0 computes them: a band costs its share of the sky).
"""

from __future__ import annotations

from dataclasses import dataclass

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
def _interpolation_weights(nside, ring_theta, theta, phi):
    """healpy's bilinear interpolation (Healpix_Base::get_interpol) at (theta, phi), 0 <= phi <
    2 pi: its four RING pixels and weights (p0, p1, p2, p3, w0, w1, w2, w3); ring_theta =
    `_ring_colatitudes(nside)`."""
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
    return p0, p1, p2, p3, w0, w1, w2, w3


@njit(cache=True, inline="always")
def _interpolate(values, first, nside, ring_theta, theta, phi):
    """The bilinear interpolation (`_interpolation_weights`) of a RING map at (theta, phi);
    `values` holds pixels first, first + 1, ... (a `BandMap`): NaN where a pixel it needs is not
    among them."""
    p0, p1, p2, p3, w0, w1, w2, w3 = _interpolation_weights(nside, ring_theta, theta, phi)
    p0, p1, p2, p3 = p0 - first, p1 - first, p2 - first, p3 - first
    n = values.size
    if min(p0, p1, p2, p3) < 0 or max(p0, p1, p2, p3) >= n:
        return np.nan
    return w0 * values[p0] + w1 * values[p1] + w2 * values[p2] + w3 * values[p3]


@njit(cache=True, inline="always")
def _pixel_centre(nside, out_theta, pix):
    """(theta, phi) of the centre of RING pixel `pix` of `nside` (out_theta: its ring colatitudes)."""
    ring, i = _pixel_ring(nside, pix)
    _, length, _, _, shifted = ring_info(nside, ring)
    return out_theta[ring], (i + 0.5 * shifted) * (2 * np.pi / length)


@njit(cache=True, inline="always")
def _interpolate_at_pixel(values, first, nside_in, ring_theta, nside, out_theta, pix):
    """`_interpolate` at the centre of RING pixel `pix` of `nside` (out_theta: its ring colatitudes)."""
    theta, phi = _pixel_centre(nside, out_theta, pix)
    return _interpolate(values, first, nside_in, ring_theta, theta, phi)


@njit(cache=True, inline="always")
def _ring_above(nside, z):
    """Index of the ring just north of (or at) z = cos(theta): 0 (north pole) ... 4 nside - 1."""
    az = abs(z)
    if az <= 2.0 / 3.0:
        return np.int64(nside * (2.0 - 1.5 * z))
    iring = np.int64(nside * np.sqrt(3.0 * (1.0 - az)))
    return iring if z > 0 else 4 * nside - iring - 1


@njit(cache=True, inline="always")
def _ring_range(nside, theta_min, theta_max):
    """(first, last) RING ring index from the ring north of colatitude `theta_min` (rad) to the
    one south of `theta_max`, clamped to 1 .. 4 nside - 1: every ring a point in between can
    touch (or interpolate from)."""
    first = max(_ring_above(nside, np.cos(max(theta_min, 0.0))), 1)
    last = min(_ring_above(nside, np.cos(min(theta_max, np.pi))) + 1, 4 * nside - 1)
    return first, last


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
    ring_lo, ring_hi = _ring_range(nside, theta_c - radius, theta_c + radius)
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


@njit(cache=True)
def _mark_interpolation_pixels(nside_in, nside, pixels, needed):
    ring_theta, out_theta = _ring_colatitudes(nside_in), _ring_colatitudes(nside)
    for m in range(pixels.size):
        theta, phi = _pixel_centre(nside, out_theta, pixels[m])
        p0, p1, p2, p3, _, _, _, _ = _interpolation_weights(nside_in, ring_theta, theta, phi)
        needed[p0] = needed[p1] = needed[p2] = needed[p3] = True


def interpolation_pixels(nside_in: int, nside: int, pixels: np.ndarray) -> np.ndarray:
    """Sorted RING pixels of `nside_in` that `interpolate_at_pixels` reads to interpolate a map of
    `nside_in` at `pixels` of `nside`."""
    needed = np.zeros(hp.nside2npix(nside_in), dtype=bool)
    _mark_interpolation_pixels(int(nside_in), int(nside), np.ascontiguousarray(pixels, dtype=np.int64), needed)
    return np.flatnonzero(needed)


@njit(cache=True, parallel=True)
def _interpolate_pixels(values, first, nside_in, nside, pixels, out):
    ring_theta, out_theta = _ring_colatitudes(nside_in), _ring_colatitudes(nside)
    for m in prange(pixels.size):
        out[m] = _interpolate_at_pixel(values, first, nside_in, ring_theta, nside, out_theta, pixels[m])


@njit(cache=True, parallel=True)
def _interpolate_pixel_range(values, first, nside_in, nside, start, out):
    ring_theta, out_theta = _ring_colatitudes(nside_in), _ring_colatitudes(nside)
    for m in prange(out.size):
        out[m] = _interpolate_at_pixel(values, first, nside_in, ring_theta, nside, out_theta, start + m)


@njit(cache=True, parallel=True)
def _interpolate_grids(values, first, nside, basis, offsets, out):
    ring_theta = _ring_colatitudes(nside)
    n = offsets.size
    for k in prange(basis.shape[0] * n):
        p, row = k // n, k % n
        for col in range(n):
            x = basis[p, 0, 0] + offsets[col] * basis[p, 1, 0] + offsets[row] * basis[p, 2, 0]
            y = basis[p, 0, 1] + offsets[col] * basis[p, 1, 1] + offsets[row] * basis[p, 2, 1]
            z = basis[p, 0, 2] + offsets[col] * basis[p, 1, 2] + offsets[row] * basis[p, 2, 2]
            phi = np.arctan2(y, x)
            out[p, row, col] = _interpolate(values, first, nside, ring_theta, np.arctan2(np.sqrt(x * x + y * y), z),
                                            phi + 2 * np.pi if phi < 0.0 else phi)


@dataclass(frozen=True)
class RingBand:
    """Whole rings first_ring..last_ring (1 .. 4 nside - 1) of a RING grid of `nside`: the pixels
    first_pixel .. first_pixel + n_pixels - 1."""

    nside: int
    first_ring: int
    last_ring: int

    def __post_init__(self):
        if not 1 <= self.first_ring <= self.last_ring <= 4 * self.nside - 1:
            raise ValueError(f"rings {self.first_ring}..{self.last_ring}: expected 1 <= first <= last <= "
                             f"{4 * self.nside - 1} (nside {self.nside})")

    @classmethod
    def full(cls, nside: int) -> "RingBand":
        return cls(int(nside), 1, 4 * int(nside) - 1)

    @classmethod
    def covering(cls, nside: int, theta_min: float, theta_max: float) -> "RingBand":
        """The rings from the one north of colatitude `theta_min` (rad) to the one south of
        `theta_max`: what a bilinear interpolation anywhere in between reads."""
        first, last = _ring_range(int(nside), float(theta_min), float(theta_max))
        return cls(int(nside), int(first), int(last))

    @property
    def first_pixel(self) -> int:
        return int(ring_info(self.nside, self.first_ring)[0])

    @property
    def n_pixels(self) -> int:
        start, length = ring_info(self.nside, self.last_ring)[:2]
        return int(start + length) - self.first_pixel

    @property
    def colatitudes(self) -> tuple[float, float]:
        """Colatitudes (rad) of the first and last rings' centres."""
        _, _, z_first, sin_first, _ = ring_info(self.nside, self.first_ring)
        _, _, z_last, sin_last, _ = ring_info(self.nside, self.last_ring)
        return float(np.arctan2(sin_first, z_first)), float(np.arctan2(sin_last, z_last))

    def pixels(self) -> np.ndarray:
        return np.arange(self.first_pixel, self.first_pixel + self.n_pixels, dtype=np.int64)


@dataclass
class BandMap:
    """A RING map of `nside` known on a band of whole rings: values[i] is pixel first_pixel + i."""

    values: np.ndarray
    nside: int
    first_pixel: int = 0


def _band(values) -> tuple[np.ndarray, int, int]:
    """(values float32/float64 contiguous, nside, first pixel) of a RING map or a `BandMap`."""
    if isinstance(values, BandMap):
        values, nside, first = values.values, values.nside, values.first_pixel
    else:
        values = np.asarray(values)
        if values.ndim != 1 or not hp.isnpixok(values.size):
            raise ValueError(f"a HEALPix map of shape {values.shape}: expected one RING map of 12 nside^2 pixels")
        nside, first = hp.npix2nside(values.size), 0
    values = np.ascontiguousarray(values, dtype=None if values.dtype in (np.float32, np.float64) else np.float64)
    return values, int(nside), int(first)


def interpolate_on_grids(values, basis: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """Bilinear samples (P, n, n) float64 of a RING map (or `BandMap`) on gnomonic grids: point
    (row, col) of grid p is the direction of basis[p, 0] + offsets[col] basis[p, 1] + offsets[row]
    basis[p, 2] (basis (P, 3, 3): centre, x and y unit vectors; offsets (n,) tangent-plane
    coordinates). NaN where a band lacks the pixels a sample needs."""
    values, nside, first = _band(values)
    basis = np.ascontiguousarray(basis, dtype=np.float64)
    offsets = np.ascontiguousarray(offsets, dtype=np.float64)
    out = np.empty((len(basis), len(offsets), len(offsets)))
    _interpolate_grids(values, first, nside, basis, offsets, out)
    return out


def interpolate_at_pixels(values, nside: int, pixels=None, dtype=np.float64) -> np.ndarray:
    """Bilinear samples of a RING map (any nside) or `BandMap` at the centres of `pixels` of
    `nside`: an array of RING pixel indices, a `RingBand` of `nside` or None (all), as `dtype` (a
    new array); at its own nside the map's values themselves (ValueError where a band lacks
    them), else NaN where a band lacks the pixels a sample needs."""
    values, nside_in, first = _band(values)
    if pixels is None:
        pixels = RingBand.full(nside)
    if isinstance(pixels, RingBand) and pixels.nside != nside:
        raise ValueError(f"a band of nside {pixels.nside} for pixels of nside {nside}")
    if isinstance(pixels, RingBand):
        lo, hi = pixels.first_pixel, pixels.first_pixel + pixels.n_pixels - 1
    else:
        pixels = np.ascontiguousarray(pixels, dtype=np.int64)
        lo, hi = (int(pixels.min()), int(pixels.max())) if pixels.size else (first, first)
        if lo < 0 or hi >= hp.nside2npix(nside):
            raise ValueError(f"pixels outside 0..{hp.nside2npix(nside) - 1} (nside {nside})")
    if nside_in == nside:   # at its own pixel centres a map interpolates to itself
        own = slice(lo - first, hi - first + 1) if isinstance(pixels, RingBand) else pixels - first
        if lo < first or hi >= first + values.size:
            raise ValueError(f"pixels {lo}..{hi} outside the band's {first}..{first + values.size - 1}")
        return values[own].astype(dtype, copy=True)
    if isinstance(pixels, RingBand):
        out = np.empty(pixels.n_pixels, dtype=dtype)
        _interpolate_pixel_range(values, first, nside_in, int(nside), pixels.first_pixel, out)
    else:
        out = np.empty(len(pixels), dtype=dtype)
        _interpolate_pixels(values, first, nside_in, int(nside), pixels, out)
    return out


#: pixels of the bands of mirror rings `map2alm` analyses one after the other (float64 copies of
#: 2^24 pixels, not of the whole sky: 6.4 GB at nside 8192)
ANALYSIS_BAND_PIXELS = 1 << 24


def _geometry(nside: int, bands: tuple[RingBand, ...] | None = None) -> dict:
    """ducc0's ring geometry (theta, phi0, nphi, ringstart) of the whole sky (None) or of `bands`
    (RingBands of `nside` in ring order, their pixels one band after the other)."""
    geometry = ducc0.healpix.Healpix_Base(int(nside), "RING").sht_info()
    if bands is None:
        return geometry
    rings = np.concatenate([np.arange(b.first_ring - 1, b.last_ring) for b in bands])
    nphi = geometry["nphi"][rings]
    return {"theta": geometry["theta"][rings], "phi0": geometry["phi0"][rings], "nphi": nphi,
            "ringstart": np.concatenate([[0], np.cumsum(nphi)[:-1]]).astype(geometry["ringstart"].dtype)}


def map2alm(values: np.ndarray, lmax: int, log: bool = False) -> np.ndarray:
    """healpy's `map2alm(values, lmax, iter=0)` (complex128, healpy order) of a RING map (float32
    or float64), or of ln(values) with `log`, analysed in float64 on the bands
    `mirror_bands(nside, ANALYSIS_BAND_PIXELS)` one after the other (their sum in that order):
    no full-sky float64 copy is made."""
    if isinstance(values, BandMap):
        raise TypeError("map2alm needs a full-sky map, not a BandMap")
    values, nside, _ = _band(values)
    bands = mirror_bands(nside, ANALYSIS_BAND_PIXELS)
    buffer = np.empty(max(band_size(band) for band in bands))
    alm = part = None   # the sum, and each further band's transform (one buffer: memory written once)
    for band in bands:
        pixels = buffer[:band_size(band)]
        np.concatenate([values[sky] for sky, _ in band_spans(band)], out=pixels)
        if log:
            np.log(pixels, out=pixels)
        part = ducc0.sht.adjoint_synthesis(map=pixels[None], lmax=int(lmax), spin=0, nthreads=0, alm=part,
                                           **_geometry(nside, band))
        if alm is None:
            alm, part = part, None
        else:
            alm += part
    del buffer, part
    alm = alm[0]
    alm *= 4 * np.pi / values.size
    return alm


def alm2map_spin(alms, nside: int, lmax: int, bands: tuple[RingBand, ...] | None = None,
                 buffer: np.ndarray | None = None) -> np.ndarray:
    """healpy's `alm2map_spin(alms, nside, 2, lmax)`: (2, n) float64 Q, U of E, B alms (2, n_alm)
    on the whole sky (None) or at the pixels of `bands` (RingBands of `nside` in ring order, their
    pixels one band after the other), written into the first 2 n of `buffer` (1-D float64) when
    given. Pass alms as one complex128 array: a list is copied."""
    geometry = _geometry(nside, bands)
    n = int(np.sum(geometry["nphi"], dtype=np.int64))
    out = np.empty((2, n)) if buffer is None else buffer[:2 * n].reshape(2, n)
    return ducc0.sht.synthesis(alm=np.asarray(alms, dtype=np.complex128), lmax=int(lmax), spin=2, nthreads=0,
                               map=out, **geometry)


def band_size(band: tuple[RingBand, ...]) -> int:
    """The number of pixels of a band of ranges of rings (`mirror_bands`)."""
    return sum(rings.n_pixels for rings in band)


def band_spans(band: tuple[RingBand, ...]) -> list[tuple[slice, slice]]:
    """(its RING pixels on the sky, their place among the band's pixels) of each range of rings of
    `band`, in order: how a band's transform (its pixels one range after the other) maps to a map."""
    spans, offset = [], 0
    for rings in band:
        spans.append((slice(rings.first_pixel, rings.first_pixel + rings.n_pixels),
                      slice(offset, offset + rings.n_pixels)))
        offset += rings.n_pixels
    return spans


def mirror_bands(nside: int, max_pixels: int) -> list[tuple[RingBand, ...]]:
    """The sphere cut into bands of whole rings that hold each ring with its mirror (the ring at
    pi - theta), north to south by their northern rings: (north rings a..b, south rings 4 nside - b
    .. 4 nside - a), the band at the equator as one range; each of at most max_pixels + 8 nside
    pixels (one ring pair over the budget; at least one ring pair). A spherical harmonic transform
    on such a band costs its share of the sky's (ducc0 computes a ring and its mirror together),
    and its values at a pixel depend only on the band, so a fixed cut gives the same values to any
    subset of pixels."""
    nside = int(nside)
    if int(max_pixels) < 1:
        raise ValueError(f"max_pixels={max_pixels}: expected >= 1")
    north = np.arange(1, 2 * nside + 1)
    pair_pixels = np.where(north < 2 * nside, 2, 1) * 4 * np.minimum(north, nside)
    ends = np.cumsum(pair_pixels)
    n_bands = max(1, -(-int(ends[-1]) // int(max_pixels)))
    lasts = np.unique(np.searchsorted(ends, np.arange(1, n_bands) * ends[-1] / n_bands) + 1)
    lasts = np.r_[lasts[(lasts >= 1) & (lasts < 2 * nside)], 2 * nside]
    bands = []
    for first, last in zip(np.r_[1, lasts[:-1] + 1], lasts):
        first, last = int(first), int(last)
        bands.append((RingBand(nside, first, 4 * nside - first),) if last == 2 * nside else
                     (RingBand(nside, first, last), RingBand(nside, 4 * nside - last, 4 * nside - first)))
    return bands


__all__ = ["ANALYSIS_BAND_PIXELS", "BandMap", "RingBand", "alm2map_spin", "band_size", "band_spans", "disc_capacity", "disc_pixels", "disc_runs", "discs_pixels",
           "interpolate_at_pixels", "interpolation_pixels",
           "interpolate_on_grids", "map2alm", "mirror_bands", "ring_info", "ring_pix2vec"]
