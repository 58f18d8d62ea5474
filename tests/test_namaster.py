"""flat_power_spectrum against NaMaster's flat-sky pseudo-C_l (pymaster) on the same patch and bins."""

import numpy as np
import pytest

from pysm_vaedust.statistics import apodization_window, default_ell_edges, flat_power_spectrum

nmt = pytest.importorskip("pymaster")


def test_flat_power_spectrum_matches_namaster_coupled_pseudo_cl():
    """NaMaster's coupled pseudo-C_l of window * (x - mean) is, per top-hat bin, the mean of the
    modes' |FFT|^2 (times pixel area / npix^2); flat_power_spectrum divides that by mean(window^2).
    The bins are [l0, lf) in both, except that flat_power_spectrum closes the last one (so it also
    counts the Nyquist modes on the axes)."""
    n, pixel_deg = 64, 0.125
    rng = np.random.default_rng(0)
    k = np.hypot(*np.meshgrid(np.fft.fftfreq(n), np.fft.fftfreq(n), indexing="ij"))
    colour = np.where(k > 0, k, 1.0) ** -1.3
    x, y = (np.fft.ifft2(np.fft.fft2(rng.standard_normal((n, n))) * colour).real + 5.0 for _ in range(2))
    y = 0.5 * x + y  # correlated, for the cross-spectrum
    window = apodization_window(n, n / 8)  # flat_power_spectrum's default taper
    edges = default_ell_edges(n, pixel_deg)
    size_rad = np.radians(n * pixel_deg)
    bins = nmt.NmtBinFlat(edges[:-1], edges[1:])
    fx, fy = (nmt.NmtFieldFlat(size_rad, size_rad, window, [m - m.mean()]) for m in (x, y))
    for other, f_other in ((None, fx), (y, fy)):
        _, cl = flat_power_spectrum(x, pixel_deg, edges, other=other)
        cl_nmt = nmt.compute_coupled_cell_flat(fx, f_other, bins)[0] / np.mean(window**2)
        assert np.allclose(cl, cl_nmt, rtol=0.01, atol=0)
        assert np.allclose(cl[:-1], cl_nmt[:-1], rtol=1e-6, atol=0)  # identical bins: identical modes
