"""Stage 9 statistics against closed forms: Gaussian random fields, white noise, exact shapes.

Statistical tolerances are the estimator's bias plus about 4 standard deviations of the test's
own realization scatter, both measured once over 100-200 other seeds of the same generators
(50 for HEALPix MFs); the measured numbers are quoted next to each check.
"""

import healpy as hp
import numpy as np
import pytest

from pysm_vaedust.statistics import (
    apodization_window,
    bootstrap_band,
    default_ell_edges,
    flat_power_spectrum,
    gaussian_minkowski_functionals,
    healpix_minkowski_functionals,
    healpix_power_spectrum,
    minkowski_functionals,
    pixel_histogram,
)

NPIX, PIXEL_DEG = 256, 0.05
NU = np.linspace(-2.5, 2.5, 11)


def mode_ells(npix=NPIX, pixel_deg=PIXEL_DEG):
    """(npix, npix) multipole of each FFT mode of a patch."""
    k = np.fft.fftfreq(npix, d=1.0 / npix)
    return 2 * np.pi / (npix * np.radians(pixel_deg)) * np.hypot(k[:, None], k[None, :])


def flat_grf(spectrum, n_real, seed, npix=NPIX, pixel_deg=PIXEL_DEG):
    """(n_real, npix, npix) periodic Gaussian fields with C_ell = spectrum(ell) (sr units)."""
    ell = mode_ells(npix, pixel_deg)
    noise = np.random.default_rng(seed).standard_normal((n_real, npix, npix))
    amplitude = np.sqrt(spectrum(ell) / np.radians(pixel_deg) ** 2)
    return np.fft.ifft2(np.fft.fft2(noise) * amplitude).real


def mode_averaged(spectrum, edges):
    """spectrum averaged over the Fourier modes of each bin (what an unbiased estimator returns)."""
    ell = mode_ells().ravel()
    index = np.searchsorted(edges, ell, side="right") - 1
    index[ell == edges[-1]] = len(edges) - 2  # the last bin is closed
    return np.array([spectrum(ell[index == b]).mean() for b in range(len(edges) - 1)])


def smooth_spectrum(ell):
    """Dust-like: flat below ell0 = 5 fundamentals, ell^-2.5 above."""
    ell0 = 5 * 2 * np.pi / (NPIX * np.radians(PIXEL_DEG))
    return (1 + (ell / ell0) ** 2) ** -1.25


def random_alm(cl, rng):
    """Gaussian alm of spectrum cl from an explicit Generator (hp.synalm uses global state)."""
    lmax = len(cl) - 1
    ell, m = hp.Alm.getlm(lmax)
    re, im = rng.standard_normal((2, ell.size))
    alm = np.where(m == 0, re, (re + 1j * im) / np.sqrt(2))
    return alm * np.sqrt(cl[ell])


def assert_matches_closed_form(measured, expected, per_threshold_tol, amplitude_tol):
    """Each of v0, v1, v2 within tol x max|closed form| per threshold; v1, v2 amplitudes (least
    squares of measured on closed form) within amplitude_tol of 1."""
    for name, tol in zip(("v0", "v1", "v2"), per_threshold_tol):
        closed = expected[name]
        error = np.abs(measured[name] - closed).max() / np.abs(closed).max()
        assert error < tol, (name, measured[name] / closed)
    for name, tol in zip(("v1", "v2"), amplitude_tol):
        closed = expected[name]
        amplitude = measured[name] @ closed / (closed @ closed)
        assert abs(amplitude - 1) < tol, (name, amplitude)


def test_apodization_window():
    w = apodization_window(64, 8)
    assert w.shape == (64, 64) and np.allclose(w, w.T) and np.allclose(w, w[::-1, ::-1])
    assert np.all(w[8:-8, 8:-8] == 1) and w[0, 0] < 0.01 and w.min() >= 0
    assert np.all(apodization_window(16, 0) == 1)
    with pytest.raises(ValueError):
        apodization_window(16, 9)


def test_default_ell_edges_span_fundamental_to_nyquist():
    edges = default_ell_edges(NPIX, PIXEL_DEG)
    fundamental = 2 * np.pi / np.radians(NPIX * PIXEL_DEG)
    assert np.isclose(edges[0], fundamental)
    assert np.isclose(edges[-1], np.pi / np.radians(PIXEL_DEG))
    assert np.allclose(np.diff(edges), 2 * fundamental, rtol=0.02)
    for npix in (8, 12, 32):  # every default bin holds modes, even for tiny patches
        ell, cl = flat_power_spectrum(np.ones((npix, npix)), 1.0, default_ell_edges(npix, 1.0))
        assert len(ell) == len(cl) >= 1


def test_flat_spectrum_recovers_gaussian_random_field():
    # 16 bins 8 fundamentals wide. Over 800 realizations: bias <= 1.1 % in every bin; scatter of
    # one realization 12 % (lowest bin), 6.6 %, then <= 4.9 %; for the mean of 16: 3, 1.7, 1.2 %.
    edges = default_ell_edges(NPIX, PIXEL_DEG, nbins=16)
    ell, cl = flat_power_spectrum(flat_grf(smooth_spectrum, 16, seed=1), PIXEL_DEG, edges)
    assert cl.shape == (16, 16) and np.all((ell > edges[:-1]) & (ell < edges[1:]))
    ratio = cl.mean(axis=0) / mode_averaged(smooth_spectrum, edges)
    assert np.all(np.abs(ratio - 1) < 0.12), ratio
    assert np.all(np.abs(ratio[2:] - 1) < 0.06), ratio


def test_white_noise_spectrum_is_variance_times_pixel_area():
    # Mean of 8 realizations, over 100 seeds: bias <= 1.2 %, scatter <= 3.6 % per bin of 16 bins;
    # averaged over all 64 default bins, bias 0.1 % and scatter 0.4 %.
    s = 3.0
    noise = s * np.random.default_rng(2).standard_normal((8, NPIX, NPIX))
    expected = s**2 * np.radians(PIXEL_DEG) ** 2
    _, coarse = flat_power_spectrum(noise, PIXEL_DEG, default_ell_edges(NPIX, PIXEL_DEG, 16))
    assert np.all(np.abs(coarse.mean(axis=0) / expected - 1) < 0.15)
    _, fine = flat_power_spectrum(noise, PIXEL_DEG, default_ell_edges(NPIX, PIXEL_DEG))
    assert abs(fine.mean() / expected - 1) < 0.02


def test_cross_spectrum_identities():
    a, b = flat_grf(smooth_spectrum, 2, seed=3, npix=64)
    edges = default_ell_edges(64, PIXEL_DEG)
    _, auto_a = flat_power_spectrum(a, PIXEL_DEG, edges)
    _, auto_b = flat_power_spectrum(b, PIXEL_DEG, edges)
    _, cross_aa = flat_power_spectrum(a, PIXEL_DEG, edges, other=a)
    _, cross_ab = flat_power_spectrum(a, PIXEL_DEG, edges, other=b)
    _, cross_ba = flat_power_spectrum(b, PIXEL_DEG, edges, other=a)
    _, auto_sum = flat_power_spectrum(a + b, PIXEL_DEG, edges)
    np.testing.assert_allclose(cross_aa, auto_a, rtol=1e-12)
    np.testing.assert_allclose(cross_ab, cross_ba, rtol=1e-12)
    np.testing.assert_allclose(auto_sum, auto_a + auto_b + 2 * cross_ab, rtol=1e-10)


def test_flat_spectrum_rejects_bad_input():
    patch, edges = np.zeros((16, 16)), default_ell_edges(16, 0.1)
    with pytest.raises(ValueError, match="square"):
        flat_power_spectrum(np.zeros((16, 12)), 0.1, default_ell_edges(16, 0.1))
    with pytest.raises(ValueError, match="other shape"):
        flat_power_spectrum(patch, 0.1, edges, other=np.zeros((2, 16, 16)))
    with pytest.raises(ValueError, match="window"):
        flat_power_spectrum(patch, 0.1, edges, window=np.ones((8, 8)))
    with pytest.raises(ValueError, match="ell bin 1"):  # narrower than the mode spacing
        flat_power_spectrum(patch, 0.1, edges[0] * np.array([1.0, 1.2, 1.21, 4.0]))
    with pytest.raises(ValueError, match="pixel_size_deg"):
        flat_power_spectrum(patch, 0.0, edges)


def test_pixel_histogram_of_gaussian_samples():
    values = np.random.default_rng(4).standard_normal(200_000)
    centres, density = pixel_histogram(values, np.linspace(-3, 3, 25))
    assert centres.shape == density.shape == (24,)
    pdf = np.exp(-centres**2 / 2) / np.sqrt(2 * np.pi)
    assert np.all(np.abs(density - pdf) < 0.03 * pdf.max())


def test_minkowski_functionals_of_disc_and_annulus():
    y, x = np.mgrid[:128, :128] - 63.5
    r = np.hypot(x, y)
    disc = minkowski_functionals(40 - r, [0.0])  # disc of radius 40 px
    cells = 127**2
    assert abs(disc["v0"][0] * 128**2 / (np.pi * 40**2) - 1) < 0.01
    assert abs(disc["v1"][0] * 4 * cells / (2 * np.pi * 40) - 1) < 0.01
    assert np.isclose(disc["v2"][0] * cells, 1)
    ring = minkowski_functionals(-np.abs(r - 30), [-10.0])  # annulus 20 < r < 40: chi = 0
    assert abs(ring["v1"][0] * 4 * cells / (2 * np.pi * 60) - 1) < 0.01
    assert np.isclose(ring["v2"][0], 0, atol=1e-12)
    y, x = np.mgrid[:64, :128]  # a disc and, apart, an annulus: chi = 1 + 0
    blobs = np.fmax(12 - np.hypot(x - 32, y - 32), np.fmin(15 - np.hypot(x - 96, y - 32),
                                                          np.hypot(x - 96, y - 32) - 5))
    assert np.isclose(minkowski_functionals(blobs, [0.0])["v2"][0] * 63 * 127, 1)


def test_minkowski_saddles_follow_the_mean_of_the_cell():
    # one cell, corners 1 0 / 0 1: above 0.4 the mean (0.5) is above, the two "1" corners connect
    # and the contour cuts off the "0" corners; above 0.6 it cuts off the "1" corners. Either way
    # two segments of 0.4 sqrt(2); Euler share -1/2 (bridge) or +1/2 (two pieces).
    cell = np.array([[1.0, 0.0], [0.0, 1.0]])
    mf = minkowski_functionals(cell, [0.4, 0.6])
    np.testing.assert_allclose(mf["v1"], [0.2 * np.sqrt(2)] * 2)
    np.testing.assert_allclose(mf["v2"], [-0.5, 0.5])
    # whole sets: two diagonal peaks joined through a saddle cell whose mean is above 0 or not
    for bridge, chi in ((-0.5, 1), (-1.5, 2)):
        u = -np.ones((4, 4))
        u[1, 1] = u[2, 2] = 1.0
        u[1, 2] = u[2, 1] = bridge
        assert np.isclose(minkowski_functionals(u, [0.0])["v2"][0] * 9, chi)


def test_minkowski_functionals_of_gaussian_random_field():
    # P(k) = exp(-k^2 s^2), s = 4 px, on 256^2 px of 0.05 deg. Over 200 realizations, in units of
    # the closed form's maximum: bias per threshold <= 0.24 % (v0), 0.9 % (v1), 1.6 % (v2); scatter
    # of one realization <= 2.5 %, 4.3 %, 13 %, i.e. 0.6 %, 1.1 %, 3.2 % for the mean of 16.
    # Amplitudes: 0.994 +- 0.013 (v1) and 0.997 +- 0.040 (v2) per realization, /4 for 16.
    s, pixel_rad = 4.0, np.radians(PIXEL_DEG)
    fields = flat_grf(lambda ell: np.exp(-(ell * pixel_rad * s) ** 2), 16, seed=5)
    k = 2 * np.pi * np.fft.fftfreq(NPIX) / pixel_rad  # rad^-1
    power = np.exp(-((k[:, None] ** 2 + k[None, :] ** 2) * (s * pixel_rad) ** 2))
    sigma0 = np.sqrt(power.mean()) / pixel_rad
    sigma1 = np.sqrt(((k[:, None] ** 2 + k[None, :] ** 2) * power).mean()) / pixel_rad
    assert np.isclose(fields.std(), sigma0, rtol=0.02)
    measured = minkowski_functionals(fields, NU * sigma0, pixel_size_deg=PIXEL_DEG)
    assert all(v.shape == (16, len(NU)) for v in measured.values())
    assert_matches_closed_form({name: v.mean(axis=0) for name, v in measured.items()},
                               gaussian_minkowski_functionals(NU, sigma0, sigma1),
                               per_threshold_tol=(0.025, 0.045, 0.15), amplitude_tol=(0.02, 0.045))
    # exact duality cell by cell: the set below -t of -f is the complement of the set above t
    flipped = minkowski_functionals(-fields[:2], -NU * sigma0, pixel_size_deg=PIXEL_DEG)
    np.testing.assert_allclose(flipped["v0"], 1 - measured["v0"][:2], atol=1e-12)
    np.testing.assert_allclose(flipped["v1"], measured["v1"][:2], rtol=1e-10)
    np.testing.assert_allclose(flipped["v2"], -measured["v2"][:2], rtol=1e-10, atol=1e-6)


def test_gaussian_minkowski_functionals_limits():
    mf = gaussian_minkowski_functionals(np.array([-40.0, 0.0, 40.0]), 2.0, 1.0)
    np.testing.assert_allclose(mf["v0"], [1, 0.5, 0], atol=1e-12)
    assert np.isclose(mf["v1"][1], np.sqrt(1 / 8) / 8) and mf["v2"][1] == 0


def test_healpix_power_spectrum_matches_input():
    # Bins of 16 multipoles from ell = 32, over 100 seeds: full sky bias 0.7 %, scatter 3.9 %;
    # with the |b| > 20 deg cut (f_sky = 0.66), bias of pseudo-C_l / f_sky 2.7 %, scatter 4.2 %.
    nside, lmax = 64, 127
    ell = np.arange(lmax + 1)
    cl = 1 / (1 + ell / 30.0) ** 2
    m = hp.alm2map(random_alm(cl, np.random.default_rng(6)), nside, lmax=lmax)
    _, lat = hp.pix2ang(nside, np.arange(m.size), lonlat=True)
    for mask, tol in ((None, 0.18), ((np.abs(lat) > 20).astype(float), 0.22)):
        # the offset would leak ~3 (100^2 x 3e-4 of C_l) into these bins through the cut's edges
        out_ell, out = healpix_power_spectrum(m + 100.0, lmax=lmax, mask=mask)
        assert np.array_equal(out_ell, ell)
        ratio = out[32:].reshape(-1, 16).sum(axis=1) / cl[32:].reshape(-1, 16).sum(axis=1)
        assert np.all(np.abs(ratio - 1) < tol), ratio
    with pytest.raises(ValueError, match="mask"):
        healpix_power_spectrum(m, mask=np.zeros(m.size))


def test_healpix_minkowski_functionals_of_quadrupole_field():
    # u = (n.d)^2: above nu lie two caps |n.d| > sqrt(nu), whose boundary circles give
    # v0 = 1 - sqrt(nu), v1 = sqrt(1 - nu) / 4, v2 = sqrt(nu) / (2 pi) (geodesic curvature).
    # The Hessian is anisotropic, so this checks the curvature term beyond its isotropic part.
    nside = 64
    d = np.array([0.3, -0.5, 0.8]) / np.linalg.norm([0.3, -0.5, 0.8])
    u = (np.array(hp.pix2vec(nside, np.arange(hp.nside2npix(nside)))).T @ d) ** 2
    nu = np.array([0.1, 0.3, 0.5, 0.7, 0.9])
    mf = healpix_minkowski_functionals(u, nu, delta=0.05)
    np.testing.assert_allclose(mf["v0"], 1 - np.sqrt(nu), rtol=0.01)
    np.testing.assert_allclose(mf["v1"], np.sqrt(1 - nu) / 4, rtol=0.03)
    np.testing.assert_allclose(mf["v2"], np.sqrt(nu) / (2 * np.pi), rtol=0.03)
    # the band-count noise is common to v1 and v2; their ratio isolates the curvature (< 0.3 %)
    np.testing.assert_allclose(mf["v2"] / mf["v1"], 2 * np.sqrt(nu / (1 - nu)) / np.pi, rtol=0.01)


def test_healpix_minkowski_functionals_of_gaussian_random_field():
    # White noise smoothed by a 4-pixel FWHM beam at nside 128. Over 50 seeds, full sky (|b| > 30):
    # bias <= 0.02 (0.09) %, 0.2 (0.4) %, 0.6 (0.9) % of the closed form's maximum for v0, v1, v2;
    # scatter <= 0.17 (0.6) %, 1.3 (1.7) %, 3.4 (4.4) %. Amplitudes 1.000 +- 0.006 (0.009) for v1,
    # 1.000 +- 0.011 (1.003 +- 0.017) for v2.
    nside, lmax = 128, 383
    ell = np.arange(lmax + 1)
    cl = hp.gauss_beam(4 * hp.nside2resol(nside), lmax) ** 2
    cl[:2] = 0
    sigma0 = np.sqrt(np.sum((2 * ell + 1) * cl) / (4 * np.pi))
    sigma1 = np.sqrt(np.sum((2 * ell + 1) * ell * (ell + 1) * cl) / (4 * np.pi))
    m = hp.alm2map(random_alm(cl, np.random.default_rng(7)), nside, lmax=lmax)
    _, lat = hp.pix2ang(nside, np.arange(m.size), lonlat=True)
    expected = gaussian_minkowski_functionals(NU, sigma0, sigma1)
    for mask, per_threshold, amplitude in ((None, (0.01, 0.055, 0.15), (0.025, 0.045)),
                                           (np.abs(lat) > 30, (0.025, 0.075, 0.19), (0.04, 0.07))):
        assert_matches_closed_form(healpix_minkowski_functionals(m, NU * sigma0, mask=mask),
                                   expected, per_threshold, amplitude)


def test_bootstrap_band():
    samples = np.random.default_rng(8).normal(3.0, 2.0, size=(400, 5))
    mean, lo, hi = bootstrap_band(samples, n_boot=400, seed=1)
    assert mean.shape == lo.shape == hi.shape == (5,)
    assert np.all((lo < mean) & (mean < hi))
    # the 16-84 % band of the mean is +- sigma / sqrt(N) = +- 0.1
    np.testing.assert_allclose((hi - lo) / 2, 2.0 / np.sqrt(400), rtol=0.2)
    np.testing.assert_array_equal(bootstrap_band(samples, n_boot=400, seed=1)[1], lo)
    assert not np.array_equal(bootstrap_band(samples, n_boot=400, seed=2)[1], lo)
    with pytest.raises(ValueError):
        bootstrap_band(samples[:1])
