"""Non-Gaussianity recovered (issue 22's metric) on fields whose answer is known."""

import numpy as np
import pytest

from pysm_vaedust.fidelity import gaussian_baseline
from pysm_vaedust.nongaussianity import (STATISTICS, band_power_budget, departures, ngr, ngr_report,
                                         standardise, statistic_vectors)

N, NPIX = 12, 32


def smooth_gaussian(rng, n=N, npix=NPIX):
    """Gaussian fields with a red spectrum (correlated over a few pixels)."""
    k = np.fft.fftfreq(npix)
    power = 1.0 / (1e-3 + np.hypot(k[:, None], k[None, :]) ** 2.5)
    power[0, 0] = 0.0
    return gaussian_baseline(power, n, rng)


@pytest.fixture(scope="module")
def fields():
    rng = np.random.default_rng(1)
    g = standardise(smooth_gaussian(rng))
    return {"gauss": g, "lognormal": np.exp(1.2 * g), "regions": np.repeat(np.arange(4), N // 4),
            "brightness": rng.uniform(size=N)}


@pytest.fixture(scope="module")
def dep(fields):
    return {key: departures(fields[key], seed=0) for key in ("gauss", "lognormal")}


def test_statistics_shapes_and_standardisation(fields):
    s = statistic_vectors(fields["lognormal"])
    assert set(s) == set(STATISTICS)
    assert all(v.shape[0] == N and v.ndim == 2 for v in s.values())
    # statistics of standardised fields: an affine change of the field changes nothing
    t = statistic_vectors(3.0 * fields["lognormal"] + 7.0)
    for key in s:
        np.testing.assert_allclose(s[key], t[key], atol=1e-9)


def test_twins_keep_each_mode_amplitude_and_randomise_phases():
    """A twin of a periodic field has the field's deconvolved power at every mode (amplitudes
    kept), not a random draw about it, and its phases differ."""
    from pysm_vaedust.fidelity import gaussian_power_2d
    from pysm_vaedust.nongaussianity import phase_twins

    f = smooth_gaussian(np.random.default_rng(5), n=3)
    twins = phase_twins(f, np.random.default_rng(6), 2)
    assert twins.shape == (3, 2, NPIX, NPIX) and np.isrealobj(twins)
    power = gaussian_power_2d(f, each=True)
    np.testing.assert_allclose(np.abs(np.fft.fft2(twins, norm="ortho")) ** 2, np.repeat(power[:, None], 2, 1),
                               rtol=1e-8, atol=1e-12 * power.max())
    assert np.corrcoef(twins[0, 0].ravel(), twins[0, 1].ravel())[0, 1] < 0.5


def test_a_gaussian_field_does_not_depart_from_its_twins():
    """Gaussian fields (not periodic: cut from larger ones) against their own twins: every
    statistic's mean departure is within noise (|<Delta>| < 4 standard errors per component)."""
    big = smooth_gaussian(np.random.default_rng(7), n=24, npix=2 * NPIX)
    dep = departures(big[:, :NPIX, :NPIX], seed=1)
    for key, d in dep.items():
        keep = d.std(0) > 0
        z = np.abs(d.mean(0)[keep]) / (d.std(0)[keep] / np.sqrt(len(d)))
        assert np.all(z < 4), (key, z.max())


def test_lognormal_departs_and_gaussian_does_not(dep):
    scale = dep["lognormal"]["skewness"].std()
    assert dep["lognormal"]["skewness"].mean() > 5 * scale / np.sqrt(N)      # right-skewed, unlike its twins
    assert abs(dep["gauss"]["skewness"].mean()) < dep["lognormal"]["skewness"].mean() / 5
    assert abs(dep["gauss"]["kurtosis"].mean()) < dep["lognormal"]["kurtosis"].mean() / 5


def test_ngr_is_one_for_the_real_set_and_zero_for_a_gaussian_model(dep):
    real, gauss = dep["lognormal"], dep["gauss"]
    for key in ("skewness", "v2", "wph"):
        scale = real[key].std(0) + 1e-12
        assert ngr(real[key], real[key], scale) == pytest.approx(1.0)
        assert ngr(np.zeros_like(real[key]), real[key], scale) == pytest.approx(0.0)
        assert ngr(gauss[key], real[key], scale) < 0.5


def test_report_paired_and_unpaired(fields, dep):
    real = dep["lognormal"]
    twice = {k: np.repeat(v, 2, axis=0) for k, v in real.items()}           # two identical "draws" per patch
    report = ngr_report(twice, real, fields["regions"], fields["brightness"], n_boot=20)
    for key in STATISTICS:
        assert report[key]["ngr"] == pytest.approx(1.0)
        assert report[key]["boot_lo"] == pytest.approx(1.0) and report[key]["boot_hi"] == pytest.approx(1.0)
    assert report["skewness"]["significance"] > 3
    unpaired = ngr_report(dep["gauss"], real, fields["regions"], fields["brightness"],
                          model_brightness=fields["brightness"], n_boot=20)
    assert unpaired["skewness"]["ngr"] < 0.5
    with pytest.raises(ValueError, match="multiple"):
        ngr_report({k: v[:-1] for k, v in twice.items()}, real, fields["regions"], fields["brightness"])


def test_power_budget_recovers_known_parts():
    rng = np.random.default_rng(3)
    n, draws, npix = 64, 8, 32
    shared = rng.normal(0, 1.0, (n, 1, npix, npix))
    latent = rng.normal(0, 0.5, (n, draws, npix, npix))        # white: power 0.25 per mode
    x = shared[:, 0] + rng.normal(0, 0.5, (n, npix, npix))
    floor = np.full((n, npix, npix), 0.01)
    budget = band_power_budget(x, shared + latent, np.full((n, npix, npix), 0.02), floor, 8.0 / 64, [(300, 1000)])
    row = budget["300-1000"]
    assert row["latents"] == pytest.approx(0.25, rel=0.05)
    assert row["real_about_mean"] == pytest.approx(0.25 - 0.01, rel=0.05)
    assert row["noise_over_floor"] == pytest.approx(2.0)
