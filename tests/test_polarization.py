"""Polarization (stage 6b): Q, U beside an unchanged I, P < I, the SED shared with I, the
spin-2 synthesis (a pure-E field stays E), the small scales' spectra and their T-E correlation."""

import healpy as hp
import numpy as np
import pysm3.units as u
import pytest

from pysm_vaedust import VAEDust
from pysm_vaedust.polarization import (ALPHA_BB, ALPHA_EE, P_MAX, TE_CORRELATION, PolarizationTemplate,
                                       default_pol_template_path, read_pol_template, unit_alm)

NSIDE = 128


@pytest.fixture(scope="module")
def bundled():
    return PolarizationTemplate(*read_pol_template(default_pol_template_path())[:2])


@pytest.fixture(scope="module")
def pair():
    """The same seed with and without polarization (no cascade)."""
    return [VAEDust(nside=NSIDE, seed=3, cascade=False, polarization=p) for p in (True, False)]


def test_intensity_is_the_same_bit_for_bit_and_q_u_follow_its_sed(pair):
    polarized, intensity_only = pair
    for freq in (100 * u.GHz, 353 * u.GHz):
        m, m0 = polarized.get_emission(freq).value, intensity_only.get_emission(freq).value
        assert np.array_equal(m[0], m0[0]) and np.all(m0[1:] == 0)
        assert np.all(np.hypot(m[1], m[2]) < P_MAX * m[0])
    low, high = polarized.get_emission(100 * u.GHz).value, polarized.get_emission(353 * u.GHz).value
    np.testing.assert_allclose(low[1:] / low[0], high[1:] / high[0], rtol=1e-12)


def test_polarization_fraction_is_planck_like_at_high_latitude(pair):
    """P / I at 1 deg: median at |b| > 30 within 0.05-0.15 (Planck 2018 XII), 99.9 % <= 0.25 at |b| > 15
    (bounded by p_max = 0.22 at the pixel; smoothing only lowers it)."""
    m = pair[0].get_emission(353 * u.GHz).value
    smooth = hp.smoothing(m, fwhm=np.radians(1.0), pol=True, iter=1)
    frac = np.hypot(smooth[1], smooth[2]) / smooth[0]
    lat = hp.pix2ang(NSIDE, np.arange(len(frac)), lonlat=True)[1]
    median = np.median(frac[np.abs(lat) > 30])
    print(f"\nP/I at 1 deg: median |b| > 30 {median:.3f}, 99.9 % at |b| > 15 {np.percentile(frac[np.abs(lat) > 15], 99.9):.3f}")
    assert 0.05 < median < 0.15
    assert np.percentile(frac[np.abs(lat) > 15], 99.9) <= 0.25


def test_seeds_reproduce_and_partial_skies_equal_the_full_sky(pair):
    again = VAEDust(nside=NSIDE, seed=3, cascade=False).get_emission(353 * u.GHz).value
    full = pair[0].get_emission(353 * u.GHz).value
    assert np.array_equal(again, full)
    other = VAEDust(nside=NSIDE, seed=4, cascade=False).get_emission(353 * u.GHz).value
    assert np.std(other[1] - full[1]) > 0.1 * np.std(full[1])
    pixels = np.arange(1000, 90000, 37)
    part = VAEDust(nside=NSIDE, seed=3, cascade=False,
                   map_dist=type("D", (), {"pixel_indices": pixels, "nside": NSIDE})())
    assert np.array_equal(part.get_emission(353 * u.GHz).value, full[:, pixels])


def test_the_field_gives_every_subset_of_pixels_the_same_values(bundled, monkeypatch):
    """w is synthesized on fixed bands of mirror rings: any pixel subset (sorted or not, one band or
    several) gets the full sky's values bit for bit, and the full sky equals healpy's synthesis."""
    import pysm_vaedust.polarization as polarization

    nside = 32
    monkeypatch.setattr(polarization, "POL_BAND_PIXELS", 1500)   # 9 bands
    log_i = np.random.default_rng(4).standard_normal(hp.nside2npix(nside))
    field = bundled.field(np.exp(log_i), seed=1)
    assert len(field.bands()) > 5
    full = field.tensor_field()
    expected = hp.alm2map_spin(list(field.alms), nside, 2, field.lmax)
    np.testing.assert_allclose(full, expected, rtol=0, atol=1e-12 * np.abs(expected).max())
    fractions = field.fractions()
    assert fractions.dtype == np.float32 and np.all(np.hypot(*fractions.astype(float)) < P_MAX)
    rng = np.random.default_rng(0)
    for pixels in (np.arange(100, 400), np.sort(rng.choice(len(log_i), 900, replace=False)),
                   rng.choice(len(log_i), 900, replace=False)):
        assert np.array_equal(field.tensor_field(pixels), full[:, pixels])
        assert np.array_equal(field.fractions(pixels), fractions[:, pixels])
    assert field.fractions(np.zeros(0, dtype=int)).shape == (2, 0)
    for bad in ([-1, 5], [len(log_i)], [1.5, 2.0]):
        with pytest.raises(ValueError, match="pixels"):
            field.fractions(np.array(bad))


def test_a_pure_e_field_stays_e():
    """A pure-E fraction tensor (no B in the template, none drawn) on a uniform sky comes out of
    the spin-2 synthesis with BB / EE < 1 % (small |w|: tanh is linear there)."""
    lmax = 3 * NSIDE - 1
    ell = np.arange(lmax + 1)
    e = hp.almxfl(unit_alm(np.random.default_rng(0), lmax), np.where(ell > 1, 0.01 * ell ** -1.2, 0))
    q, u_ = hp.alm2map_spin([e, 0 * e], NSIDE, 2, lmax)
    template = PolarizationTemplate(np.stack([np.ones_like(q), q, u_]), 2.0)
    assert template.fit["a_B"] < 1e-6 * template.fit["a_E"]
    fractions = template.field(np.ones(hp.nside2npix(NSIDE)), seed=0, te_correlation=0.0, lmax=lmax).fractions()
    _, ee, bb = hp.anafast(np.stack([np.ones_like(q), *fractions]), lmax=lmax)[:3]
    assert bb[2:].sum() / ee[2:].sum() < 0.01


def test_the_template_scales_are_the_templates_own(bundled):
    """Below the fit's first multipole (l < 8) the tensor field's E / B are the template's exactly:
    no seed-dependent quadrupole or octupole is drawn."""
    nside, lmax = 32, 64
    log_i = np.random.default_rng(2).standard_normal(hp.nside2npix(nside))
    for seed in (0, 5):
        w = bundled.field(np.exp(log_i), seed=seed, te_correlation=0.36, lmax=lmax).tensor_field()
        e, b = hp.map2alm_spin(w, 2, lmax=7)
        ell = hp.Alm.getlm(7)[0]
        for drawn, template in ((e, bundled.e_alm), (b, bundled.b_alm)):
            own = template[hp.Alm.getlm(hp.Alm.getlmax(len(template)))[0] <= 7]
            np.testing.assert_allclose(drawn[ell >= 2], own[ell >= 2], atol=1e-3 * np.abs(own).max())


def test_small_scales_continue_the_power_laws_and_follow_ln_i(bundled):
    """With a white ln I, the tensor field's E / B spectra at l 80-150 follow a_X l^alpha_X
    (within 10 %, the draw's scatter) and its E correlates with ln I by te_correlation."""
    nside, rho = 128, 0.5
    rng = np.random.default_rng(1)
    log_i = rng.standard_normal(hp.nside2npix(nside))
    w = bundled.field(np.exp(log_i), seed=0, te_correlation=rho, lmax=2 * nside).tensor_field()
    cl = hp.anafast(np.stack([log_i, *w]), lmax=2 * nside)
    ell = np.arange(80, 151)
    for spectrum, a, alpha in ((cl[1], bundled.fit["a_E"], ALPHA_EE), (cl[2], bundled.fit["a_B"], ALPHA_BB)):
        ratio = spectrum[ell].mean() / (a * ell.astype(float) ** alpha).mean()
        assert 0.9 < ratio < 1.1, ratio
    r_te = cl[3][ell].sum() / np.sqrt(cl[0][ell].sum() * cl[1][ell].sum())
    assert r_te == pytest.approx(rho, abs=0.06)


@pytest.mark.parametrize("kwargs, match", [
    (dict(te_correlation=1.5), "te_correlation"),
    (dict(pol_template=np.ones((2, 12 * 16**2)), pol_template_fwhm=2.0, pol_template_freq="353 GHz"), "shape"),
    (dict(pol_template=np.ones((3, 12 * 16**2))), "pol_template_fwhm"),
    (dict(pol_template=np.ones((3, 12 * 16**2)) * u.K_CMB, pol_template_fwhm=2.0, pol_template_freq="353 GHz"), "uK_RJ"),
    (dict(pol_template=np.stack([np.ones(12 * 16**2), np.full(12 * 16**2, np.nan), np.zeros(12 * 16**2)]),
          pol_template_fwhm=2.0, pol_template_freq="353 GHz"), "finite"),
    (dict(pol_template="/nonexistent/pol.fits"), "does not exist"),
    (dict(pol_template=__file__), "HEALPix FITS"),
    (dict(pol_template=np.ones((3, 12 * 16**2)), pol_template_fwhm=0.2, pol_template_freq="353 GHz"), "finer"),
    (dict(polarization=False, pol_template_fwhm=2.0), "polarization=False"),
])
def test_bad_polarization_arguments_are_refused(kwargs, match):
    with pytest.raises((ValueError, TypeError, FileNotFoundError), match=match):
        VAEDust(nside=16, cascade=False, **kwargs)


def test_the_polarization_angles_carry_no_tiles():
    """A regression guard: with te_correlation = 0, Q / I and U / I are drawn on the sphere from
    the template and the seed alone, so one tile's latents changed leaves them identical bit for
    bit (no tile edge or pole of the tiling reaches them); with the default (0.36) they follow
    the changed ln I (so the change did reach the intensity)."""
    from pysm_vaedust.weights import load_weights

    changed = {0: {5: np.full(load_weights().vae.latent_dim, 2.0)}}
    fractions = {(rho, name): VAEDust(nside=64, seed=2, cascade=False, te_correlation=rho,
                                      fixed_latents=latents).polarization_fractions()
                 for rho in (0.0, TE_CORRELATION) for name, latents in (("drawn", None), ("changed", changed))}
    assert np.array_equal(fractions[0.0, "drawn"], fractions[0.0, "changed"])
    assert not np.array_equal(fractions[TE_CORRELATION, "drawn"], fractions[TE_CORRELATION, "changed"])
