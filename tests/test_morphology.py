"""Wavelet phase harmonics and filament statistics on analytic images."""

import numpy as np
import pytest
import torch

from pysm_vaedust.morphology import (
    max_wph_scales,
    ridge_length_edges,
    ridge_statistics,
    structure_tensor_statistics,
    wph_coefficients,
)
from pysm_vaedust.statistics import bootstrap_band

torch.set_num_threads(1)
N = 64


def gaussian_patches(rng, count, slope=-2.8, n=N):
    """(count, n, n) non-periodic isotropic Gaussian patches: P(k) ~ k^slope fields of 4n x 4n px
    cut into 16 patches each."""
    big = 4 * n
    k = np.hypot(*np.meshgrid(np.fft.fftfreq(big), np.fft.fftfreq(big), indexing="ij"))
    amp = np.where(k > 0, np.maximum(k, 1 / big) ** (slope / 2), 0.0)
    fields = np.fft.ifft2(np.fft.fft2(rng.standard_normal((count // 16, big, big))) * amp).real
    return fields.reshape(-1, 4, n, 4, n).transpose(0, 1, 3, 2, 4).reshape(-1, n, n)


def segment_patches(rng, count, segments=12, length=20, n=N):
    """(count, n, n) images of thin (1 px) straight segments of `length` px at random places and angles."""
    img = np.zeros((count, n, n))
    t = np.linspace(0, length, 4 * length)
    for b in range(count):
        for x0, y0, angle in zip(*rng.uniform(0, n, (2, segments)), rng.uniform(0, np.pi, segments)):
            img[b, (y0 + t * np.sin(angle)).astype(int) % n, (x0 + t * np.cos(angle)).astype(int) % n] = 1.0
    return img


def parallel_lines(angle_deg, spacing=10.0, width=1.0, n=N):
    """(n, n) parallel lines of Gaussian profile (`width` px) every `spacing` px, running at
    `angle_deg` counter-clockwise from the +x (column) axis."""
    y, x = np.mgrid[:n, :n].astype(float)
    a = np.radians(angle_deg)
    across = (-np.sin(a) * x + np.cos(a) * y) % spacing - spacing / 2
    return np.exp(-across**2 / (2 * width**2))


def band_z(coefficients, reference):
    """(K,) distance of each coefficient's set mean from `reference`, in half-widths of its 68 %
    bootstrap band."""
    mean, lo, hi = bootstrap_band(coefficients, n_boot=200, seed=0)
    return (mean - reference) / ((hi - lo) / 2)


@pytest.fixture(scope="module")
def gaussian_wph():
    return wph_coefficients(gaussian_patches(np.random.default_rng(0), 64))


def test_wph_of_gaussian_fields_match_their_gaussian_values(gaussian_wph):
    coefficients, labels, gaussian = gaussian_wph
    J = max_wph_scales(N)
    assert coefficients.shape == (64, 4 * J + J * (J - 1) // 2) and len(labels) == coefficients.shape[1]
    tested = np.isfinite(gaussian)
    assert tested.sum() == coefficients.shape[1] - J - 2  # all but power_fraction and the aliased j=0 pair
    z = band_z(coefficients[:, tested], gaussian[tested])
    assert np.all(np.abs(z) < 4), dict(zip(np.array(labels)[tested], np.round(z, 1)))
    power = coefficients[:, [label.startswith("power_fraction") for label in labels]]
    assert np.allclose(power.sum(1), 1.0)
    assert np.all(np.diff(power.mean(0)) > 0)  # a red spectrum: more power at coarser scales


def test_wph_of_line_segments_are_not_gaussian():
    coefficients, labels, gaussian = wph_coefficients(segment_patches(np.random.default_rng(1), 32))
    tested = np.isfinite(gaussian)
    z = dict(zip(np.array(labels)[tested], band_z(coefficients[:, tested], gaussian[tested])))
    assert all(abs(v) > 5 for v in z.values()), z
    # sparse (modulus below Rayleigh), bright (s01 > 0), coupled across scales and orientations
    assert all((v < 0) == k.startswith("modulus_ratio") for k, v in z.items()), z


def test_wph_ignore_amplitude_and_offset():
    x = gaussian_patches(np.random.default_rng(2), 16, n=32)
    base, _, _ = wph_coefficients(x)
    scaled, _, _ = wph_coefficients(7.0 * x + 3.0)
    assert np.allclose(scaled, base, atol=1e-9)


def test_wph_patch_sizes_that_do_not_fit_give_one_clear_error():
    x = np.zeros((2, 32, 32))
    with pytest.raises(ValueError, match=r"J=4.*32x32.*2 <= J <= 3"):
        wph_coefficients(x, J=4)
    with pytest.raises(ValueError, match=r"J=3.*16x16"):
        wph_coefficients(np.zeros((2, 16, 16)), J=3)
    with pytest.raises(ValueError, match="L=1"):
        wph_coefficients(x, L=1)
    with pytest.raises(ValueError, match="square"):
        wph_coefficients(np.zeros((2, 32, 16)))


@pytest.mark.parametrize("angle", [0.0, 30.0, 72.5, 90.0, 135.0])
def test_structure_tensor_recovers_line_angles(angle):
    stats = structure_tensor_statistics(parallel_lines(angle))
    recovered = stats["orientation_deg"][0]
    assert abs((recovered - angle + 90) % 180 - 90) < 2.0
    assert stats["coherence"][0] > 0.95 and stats["global_coherence"][0] > 0.95
    assert stats["coherence_hist"][0, -1] > 5  # density in the top bin, 0.9..1 (uniform: 1)


def test_structure_tensor_of_an_isotropic_gaussian_field():
    stats = structure_tensor_statistics(gaussian_patches(np.random.default_rng(3), 32))
    assert np.all(stats["coherence"] < 0.7) and stats["coherence"].mean() < 0.6
    assert stats["global_coherence"].mean() < 0.2
    assert np.allclose(np.sum(stats["coherence_hist"] * 0.1, 1), 1.0)
    angles = stats["orientation_deg"]
    assert np.all((angles >= 0) & (angles < 180))


def test_ridges_of_lines_and_of_a_gaussian_field():
    lines = ridge_statistics(parallel_lines(30.0)[None])
    interior = N - 2 * 3  # border ceil(3 sigma_ridge) on each side
    # each line is one ridge crossing the interior (short ones clip its corners); ridge pixels ~ its area share
    assert lines["median_ridge_length_px"][0] > 0.8 * interior
    assert lines["ridge_length_fraction"][0, -1] > 0.75 * lines["ridge_fraction"][0]  # ridges >= 32 px
    assert 0.05 < lines["ridge_fraction"][0] < 0.35
    gauss = ridge_statistics(gaussian_patches(np.random.default_rng(4), 32))
    assert np.nanmedian(gauss["median_ridge_length_px"]) < 0.3 * interior
    assert np.allclose(gauss["ridge_length_fraction"].sum(1), gauss["ridge_fraction"])
    assert ridge_length_edges(64).tolist() == [1, 2, 4, 8, 16, 32, np.inf]


def test_ridge_length_of_one_segment():
    img = np.zeros((2, 48, 48))
    img[0, 24, 10:31] = 1.0  # 21 px along x
    img[1, 10:41, 24] = 1.0  # 31 px along y
    length = ridge_statistics(img)["median_ridge_length_px"]
    # one ridge, a few px longer than the segment (the smoothed ridge runs past its ends)
    assert 21 <= length[0] <= 21 + 8 and length[1] - length[0] == pytest.approx(10, abs=1)
    assert ridge_statistics(np.zeros((1, 48, 48)))["ridge_fraction"][0] == 0
