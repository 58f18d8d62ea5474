"""Stage 9 — statistics: power spectra, pixel histograms, Minkowski functionals, bootstrap bands.

Flat-sky functions take square patches (..., n, n) with pixels of `pixel_size_deg`; HEALPix
functions take RING maps. Minkowski functionals follow Schmalzing & Gorski 1998 (MNRAS 297, 355):
per unit area, v0 = area fraction above the threshold, v1 = boundary length / 4, v2 = integrated
(geodesic) boundary curvature / 2 pi (the Euler characteristic for flat patches).
"""

from __future__ import annotations

import healpy as hp
import numpy as np
from scipy.special import erfc


def apodization_window(npix: int, apod_pixels: float) -> np.ndarray:
    """(npix, npix) separable cosine taper: 0 at the patch edge, rising to 1 over `apod_pixels`."""
    if int(npix) != npix or npix < 1:
        raise ValueError(f"npix={npix!r}: expected a positive integer")
    if not 0 <= apod_pixels <= npix / 2:
        raise ValueError(f"apod_pixels={apod_pixels!r}: expected 0 <= apod_pixels <= npix/2")
    edge_distance = np.minimum(np.arange(npix) + 0.5, npix - 0.5 - np.arange(npix))
    taper = np.ones(npix)
    if apod_pixels > 0:
        ramp = edge_distance < apod_pixels
        taper[ramp] = 0.5 * (1 - np.cos(np.pi * edge_distance[ramp] / apod_pixels))
    return np.outer(taper, taper)


def default_ell_edges(npix: int, pixel_size_deg: float, nbins: int | None = None) -> np.ndarray:
    """(nbins + 1,) linear multipole edges from the fundamental 2 pi / size to Nyquist pi / pixel.

    The default `nbins` makes bins about two fundamentals wide, so each bin holds modes."""
    if int(npix) != npix or npix < 4:
        raise ValueError(f"npix={npix!r}: expected an integer >= 4")
    if nbins is None:
        nbins = max(1, round((npix / 2 - 1) / 2))
    if int(nbins) != nbins or nbins < 1:
        raise ValueError(f"nbins={nbins!r}: expected a positive integer")
    return _fundamental_ell(npix, pixel_size_deg) * np.linspace(1, npix / 2, int(nbins) + 1)


def flat_power_spectrum(patch, pixel_size_deg: float, ell_edges, other=None, window=None):
    """Binned flat-sky (cross-)power spectrum of square patches (..., n, n).

    Each patch is mean-subtracted and multiplied by `window` (default: a cosine taper over n/8
    pixels); C_l = Re(F_a F_b*) * pixel_area_sr / n^2 / mean(window^2), so white noise of variance
    s^2 gives s^2 * pixel_area_sr. Modes with ell = 2 pi |k| / size_rad are averaged in the bins
    [ell_edges[i], ell_edges[i+1]) (the last bin closed). Returns ell_centres (nbins,), the mean
    ell of each bin's modes, and cl (..., nbins) in [patch units]^2 sr.
    """
    patch = np.asarray(patch, dtype=float)
    if patch.ndim < 2 or patch.shape[-1] != patch.shape[-2]:
        raise ValueError(f"patch shape {patch.shape}: expected square patches (..., n, n)")
    npix = patch.shape[-1]
    if other is not None:
        other = np.asarray(other, dtype=float)
        if other.shape != patch.shape:
            raise ValueError(f"other shape {other.shape} != patch shape {patch.shape}")
    if window is None:
        window = apodization_window(npix, npix / 8)
    window = np.asarray(window, dtype=float)
    if window.shape != (npix, npix):
        raise ValueError(f"window shape {window.shape}: expected ({npix}, {npix})")
    edges = np.asarray(ell_edges, dtype=float)
    if edges.ndim != 1 or len(edges) < 2 or np.any(np.diff(edges) <= 0):
        raise ValueError(f"ell_edges={edges}: expected at least two increasing values")

    def fft(x):
        return np.fft.fft2((x - x.mean(axis=(-2, -1), keepdims=True)) * window)

    f_a = fft(patch)
    f_b = f_a if other is None else fft(other)
    pixel_area = np.radians(pixel_size_deg) ** 2
    power = (f_a * f_b.conj()).real * pixel_area / npix**2 / np.mean(window**2)

    k = np.fft.fftfreq(npix, d=1.0 / npix)  # integer wavenumbers, cycles per patch
    ell = _fundamental_ell(npix, pixel_size_deg) * np.hypot(k[:, None], k[None, :]).ravel()
    nbins = len(edges) - 1
    index = np.searchsorted(edges, ell, side="right") - 1
    index[ell == edges[-1]] = nbins - 1
    valid = np.flatnonzero((index >= 0) & (index < nbins))
    counts = np.bincount(index[valid], minlength=nbins)
    if np.any(counts == 0):
        b = int(np.argmin(counts))
        raise ValueError(f"ell bin {b} [{edges[b]:.4g}, {edges[b + 1]:.4g}) holds no Fourier mode "
                         f"of a {npix}-pixel patch of {pixel_size_deg} deg pixels")
    order = valid[np.argsort(index[valid], kind="stable")]
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    power = power.reshape(power.shape[:-2] + (-1,))[..., order]
    cl = np.add.reduceat(power, starts, axis=-1) / counts
    ell_centres = np.add.reduceat(ell[order], starts) / counts
    return ell_centres, cl


def healpix_power_spectrum(m, lmax: int | None = None, mask=None):
    """Angular power spectrum (ell (lmax+1,), cl (lmax+1,)) of a RING map, [map units]^2.

    With `mask` (weights in [0, 1], same shape as m) the map's masked mean is removed and the
    pseudo-C_l of mask * m is divided by f_sky = mean(mask^2)."""
    m = np.asarray(m, dtype=float)
    nside = hp.get_nside(m)
    lmax = 3 * nside - 1 if lmax is None else int(lmax)
    if mask is None:
        cl = hp.anafast(m, lmax=lmax)
    else:
        mask = np.asarray(mask, dtype=float)
        if mask.shape != m.shape or np.any(mask < 0) or not np.any(mask > 0):
            raise ValueError(f"mask of shape {mask.shape}: expected non-negative weights, not all"
                             f" 0, of the map's shape {m.shape}")
        mean = np.sum(mask * m) / np.sum(mask)
        cl = hp.anafast(mask * (m - mean), lmax=lmax) / np.mean(mask**2)
    return np.arange(lmax + 1), cl


def pixel_histogram(values, bins):
    """(bin_centres, density) of all `values`, with np.histogram(bins=bins, density=True)."""
    density, edges = np.histogram(np.ravel(values), bins=bins, density=True)
    return 0.5 * (edges[1:] + edges[:-1]), density


def gaussian_minkowski_functionals(thresholds_in_sigma, sigma0: float, sigma1: float) -> dict:
    """Expected v0, v1, v2 of a 2D Gaussian random field, each shaped like `thresholds_in_sigma`.

    sigma0^2 is the field variance, sigma1^2 = <|grad f|^2> (units [f]^2 / length^2); with
    tau = sigma1^2 / (2 sigma0^2): v0 = erfc(nu / sqrt 2) / 2, v1 = sqrt(tau) exp(-nu^2/2) / 8
    (1/length), v2 = tau nu exp(-nu^2/2) / (2 pi)^(3/2) (1/length^2)."""
    nu = np.asarray(thresholds_in_sigma, dtype=float)
    tau = sigma1**2 / (2 * sigma0**2)
    gauss = np.exp(-nu**2 / 2)
    return {"v0": 0.5 * erfc(nu / np.sqrt(2)),
            "v1": np.sqrt(tau) * gauss / 8,
            "v2": tau * nu * gauss / (2 * np.pi) ** 1.5}


def minkowski_functionals(patch, thresholds, pixel_size_deg: float | None = None) -> dict:
    """Minkowski functionals v0, v1, v2 of patches (..., ny, nx), each (..., n_thresholds).

    v0 counts pixels above each threshold (in patch units). v1 and v2 are densities over the
    (ny-1)(nx-1) cells between pixel centres: marching-squares contour length (linear interpolation
    along cell edges) / 4, and the Euler characteristic from cell-corner configurations (the
    bit-quad count); saddle cells are resolved by the mean of their four corners, for both.
    Units: 1/pixel and 1/pixel^2, or 1/rad and 1/sr when `pixel_size_deg` is given.
    """
    patch = np.asarray(patch, dtype=float)
    if patch.ndim < 2 or min(patch.shape[-2:]) < 2:
        raise ValueError(f"patch shape {patch.shape}: expected (..., ny, nx) with ny, nx >= 2")
    thresholds = np.atleast_1d(np.asarray(thresholds, dtype=float))
    flat = patch.reshape((-1,) + patch.shape[-2:])
    chunk = max(1, 2**21 // flat[0].size)  # bounds the per-cell temporaries to ~ 100 MB
    mfs = np.concatenate([_patch_minkowski(flat[i:i + chunk], thresholds)
                          for i in range(0, len(flat), chunk)], axis=1)
    scale = 1.0 if pixel_size_deg is None else 1.0 / np.radians(pixel_size_deg)
    return {name: mfs[k].reshape(patch.shape[:-2] + thresholds.shape) * scale**k
            for k, name in enumerate(("v0", "v1", "v2"))}


def healpix_minkowski_functionals(m, thresholds, mask=None, lmax: int | None = None,
                                  delta: float | None = None) -> dict:
    """Minkowski functionals v0 (-), v1 (1/rad), v2 (1/sr) of a RING map, each (n_thresholds,).

    v0 is the fraction of (unmasked) pixels above each threshold. v1 = <delta(u-t) |grad u|> / 4
    and v2 = <delta(u-t) kappa |grad u|> / 2 pi (kappa: geodesic curvature of the level line)
    average over pixels, with spherical-harmonic derivatives up to `lmax` (default 2 nside: beyond
    it map2alm aliases and the derivatives ring near the poles, so the map should carry no power
    there) and delta(.) a box of width `delta` (map units; default 0.1 x the map's rms).
    `mask`: pixels with mask > 0 enter the averages.
    """
    u = np.asarray(m, dtype=float)
    nside = hp.get_nside(u)
    if not np.all(np.isfinite(u)) or np.any(u == hp.UNSEEN):
        raise ValueError("m: expected a full-sky map without NaN or UNSEEN pixels (mask instead)")
    lmax = 2 * nside if lmax is None else int(lmax)
    keep = np.ones(u.shape, bool) if mask is None else np.asarray(mask) > 0
    if keep.shape != u.shape or not np.any(keep):
        raise ValueError(f"mask: expected the map's shape {u.shape} with some pixels > 0")
    if delta is None:
        delta = 0.1 * np.std(u[keep])
    if not delta > 0:
        raise ValueError(f"delta={delta!r}: expected a positive smoothing width in map units")

    # gradient g in the (e_theta, e_phi) basis and its Cartesian components G
    _, g_theta, g_phi = hp.alm2map_der1(hp.map2alm(u, lmax=lmax), nside, lmax=lmax)
    theta, phi = hp.pix2ang(nside, np.arange(u.size))
    e_theta = np.stack([np.cos(theta) * np.cos(phi), np.cos(theta) * np.sin(phi), -np.sin(theta)])
    e_phi = np.stack([-np.sin(phi), np.cos(phi), np.zeros_like(phi)])
    grad_cartesian = g_theta * e_theta + g_phi * e_phi
    perp = -g_phi * e_theta + g_theta * e_phi  # g rotated by 90 degrees, tangent to the level line
    # covariant Hessian H(perp, perp) = perp . (perp . grad) G, each G_i a smooth scalar field
    hess_perp = np.zeros_like(u)
    for g_i, perp_i in zip(grad_cartesian, perp):
        _, d_theta, d_phi = hp.alm2map_der1(hp.map2alm(g_i, lmax=lmax), nside, lmax=lmax)
        hess_perp += perp_i * (-g_phi * d_theta + g_theta * d_phi)
    grad2 = g_theta**2 + g_phi**2
    curvature = -np.divide(hess_perp, grad2, out=np.zeros_like(u), where=grad2 > 0)  # kappa |g|

    u, grad, curvature = u[keep], np.sqrt(grad2[keep]), curvature[keep]
    thresholds = np.atleast_1d(np.asarray(thresholds, dtype=float))
    out = {name: np.empty(len(thresholds)) for name in ("v0", "v1", "v2")}
    for i, t in enumerate(thresholds):
        in_band = np.abs(u - t) < delta / 2
        out["v0"][i] = np.mean(u > t)
        out["v1"][i] = np.sum(grad[in_band]) / (u.size * delta * 4)
        out["v2"][i] = np.sum(curvature[in_band]) / (u.size * delta * 2 * np.pi)
    return out


def bootstrap_band(stat_samples, n_boot: int = 200, seed: int = 0, q=(16, 84)):
    """Sample mean and the percentiles `q` of its bootstrap distribution, over axis 0 of (N, ...).

    Returns (mean, lo, hi), each of shape (...); resampling uses numpy Generator(seed)."""
    samples = np.asarray(stat_samples, dtype=float)
    if samples.ndim < 1 or samples.shape[0] < 2:
        raise ValueError(f"stat_samples shape {samples.shape}: expected (N, ...) with N >= 2")
    n = samples.shape[0]
    rng = np.random.default_rng(seed)
    weights = rng.multinomial(n, np.full(n, 1.0 / n), size=n_boot) / n  # (n_boot, N)
    boot_means = (weights @ samples.reshape(n, -1)).reshape((n_boot,) + samples.shape[1:])
    lo, hi = np.percentile(boot_means, q, axis=0)
    return samples.mean(axis=0), lo, hi


def _fundamental_ell(npix: int, pixel_size_deg: float) -> float:
    """Multipole 2 pi / size_rad of the patch's fundamental mode."""
    if not pixel_size_deg > 0:
        raise ValueError(f"pixel_size_deg={pixel_size_deg!r}: expected > 0")
    return 2 * np.pi / (npix * np.radians(pixel_size_deg))


def _patch_minkowski(patches, thresholds):
    """(3, B, n_thresholds) v0, v1 (1/pixel), v2 (1/pixel^2) of patches (B, ny, nx)."""
    # cell corners counter-clockwise from the lower left: (x, y) = (0,0), (1,0), (1,1), (0,1)
    corners = np.stack([patches[:, :-1, :-1], patches[:, :-1, 1:],
                        patches[:, 1:, 1:], patches[:, 1:, :-1]])
    centre = corners.mean(axis=0)
    out = np.empty((3, len(patches), len(thresholds)))
    for j, t in enumerate(thresholds):
        length, euler = _marching_square_cells(corners, centre, t)
        out[:, :, j] = [np.mean(patches > t, axis=(1, 2)), np.mean(length, axis=(1, 2)) / 4,
                        np.mean(euler, axis=(1, 2))]
    return out


def _marching_square_cells(corners, centre, threshold):
    """Per-cell contour length (pixels) and Euler-characteristic share of the set above threshold.

    corners: (4, B, ny-1, nx-1) values counter-clockwise from (0,0); centre: their mean."""
    above = corners > threshold
    n_above = above.sum(axis=0)
    # crossing point on edge i (corner i -> corner i+1) by linear interpolation, in cell units
    start = np.array([[0, 0], [1, 0], [1, 1], [0, 1]], float)
    step = np.roll(start, -1, axis=0) - start
    nxt = np.roll(corners, -1, axis=0)
    crossed = above != np.roll(above, -1, axis=0)
    with np.errstate(divide="ignore", invalid="ignore"):
        frac = np.where(crossed, (threshold - corners) / (nxt - corners), 0.0)
    points = start[:, :, None, None, None] + frac[:, None] * step[:, :, None, None, None]

    def dist(i, j):
        return np.hypot(*(points[i] - points[j]))

    # corner c is isolated (cut off by a segment joining edges c-1 and c) when its state differs
    # from both neighbours; saddles (two diagonal corners above) cut off the two corners whose state
    # differs from the centre's
    saddle = (n_above == 2) & (above[0] == above[2])
    centre_above = centre > threshold
    length = np.zeros(n_above.shape)
    for c in range(4):
        cut = crossed[c] & crossed[c - 1] & (~saddle | (above[c] != centre_above))
        length += cut * dist(c, c - 1)
    straight = (n_above == 2) & ~saddle  # two adjacent corners above: segment across the cell
    length += straight * np.where(crossed[0], dist(0, 2), dist(1, 3))
    euler = np.select([n_above == 1, n_above == 3, saddle],
                      [0.25, -0.25, np.where(centre_above, -0.5, 0.5)], 0.0)
    return length, euler
