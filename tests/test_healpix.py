"""The numba / ducc0 HEALPix kernels give healpy's numbers (interpolation, discs, transforms)."""

import healpy as hp
import numpy as np
import pytest

import pysm_vaedust.healpix as healpix
from pysm_vaedust.healpix import (BandMap, RingBand, alm2map_spin, discs_pixels, interpolate_at_pixels,
                                  interpolate_on_grids, interpolation_pixels, map2alm, mirror_bands, ring_pix2vec)


@pytest.mark.parametrize("nside_in, nside_out", [(1, 4), (2, 16), (16, 64), (64, 32), (8, 2), (128, 512)])
def test_interpolation_is_healpys_bilinear_interpolation(nside_in, nside_out):
    rng = np.random.default_rng(nside_in * 1000 + nside_out)
    values = rng.normal(size=hp.nside2npix(nside_in))
    pixels = rng.permutation(hp.nside2npix(nside_out))
    expected = hp.get_interp_val(values, *hp.pix2ang(nside_out, pixels))
    np.testing.assert_allclose(interpolate_at_pixels(values, nside_out, pixels), expected, rtol=0, atol=1e-11)
    full = interpolate_at_pixels(values.astype(np.float32), nside_out, None, np.float32)
    assert full.dtype == np.float32
    np.testing.assert_allclose(full[pixels], expected, rtol=0, atol=1e-5)
    basis = rng.normal(size=(6, 3, 3))
    basis[:5, 0] = [[0, 0, 1], [0, 0, -1], [1, 0, 0], [0, -1, 0], [1, -1e-17, 0.54]]   # poles, phi = 0, 3 pi / 2,
    basis[4, 1:] = [[0, 1, 0], [0, 0, 1]]                                                # phi rounding to 2 pi
    basis /= np.linalg.norm(basis, axis=2)[:, :, None]
    offsets = np.linspace(-0.2, 0.2, 9)
    directions = (basis[:, None, None, 0] + offsets[None, None, :, None] * basis[:, None, None, 1]
                  + offsets[None, :, None, None] * basis[:, None, None, 2])
    np.testing.assert_allclose(interpolate_on_grids(values, basis, offsets).ravel(),
                               hp.get_interp_val(values, *hp.vec2ang(directions.reshape(-1, 3))), rtol=0, atol=1e-11)


def test_interpolation_at_the_maps_own_nside_returns_its_values():
    values = np.random.default_rng(0).normal(size=hp.nside2npix(16))
    out = interpolate_at_pixels(values, 16, np.array([5, 3, 3000]))
    np.testing.assert_array_equal(out, values[[5, 3, 3000]])
    assert interpolate_at_pixels(values, 16) is not values


@pytest.mark.parametrize("nside_in, nside_out", [(16, 64), (64, 32), (32, 32), (8, 256)])
def test_a_band_of_rings_interpolates_as_the_full_map_where_it_holds_the_pixels(nside_in, nside_out):
    """A BandMap holding only the pixels `interpolation_pixels` names gives the full map's
    interpolation bit for bit (poles included); outside them NaN, or at its own nside an error."""
    rng = np.random.default_rng(nside_in + nside_out)
    values = rng.normal(size=hp.nside2npix(nside_in))
    for first, last in ((1, 9), (20, 4 * nside_out - 1), (nside_out, 3 * nside_out)):
        band = RingBand(nside_out, first, last)
        pixels = band.pixels()
        assert pixels[0] == band.first_pixel and len(pixels) == band.n_pixels
        assert hp.pix2ang(nside_out, pixels[[0, -1]])[0] == pytest.approx(band.colatitudes)
        needed = interpolation_pixels(nside_in, nside_out, pixels)
        span = np.full(needed[-1] - needed[0] + 1, np.nan)
        span[needed - needed[0]] = values[needed]    # NaN wherever the interpolation must not read
        part = BandMap(span, nside_in, int(needed[0]))
        full = interpolate_at_pixels(values, nside_out, pixels)
        np.testing.assert_array_equal(interpolate_at_pixels(part, nside_out, pixels), full)
        np.testing.assert_array_equal(interpolate_at_pixels(part, nside_out, band), full)
    inner = RingBand.covering(nside_in, 1.0, 1.2)
    part = BandMap(values[inner.pixels()], nside_in, inner.first_pixel)
    outside = interpolate_at_pixels(part, 4 * nside_in, RingBand.covering(4 * nside_in, 0.5, 0.6))
    assert np.all(np.isnan(outside))
    if nside_in != nside_out:
        return
    with pytest.raises(ValueError, match="outside the band"):
        interpolate_at_pixels(part, nside_in, np.array([0]))


def test_ring_bands_are_checked_and_clamped_at_the_poles():
    assert RingBand.covering(8, -0.3, 4.0) == RingBand.full(8)
    assert RingBand.full(8).n_pixels == hp.nside2npix(8)
    with pytest.raises(ValueError, match="rings 5..4"):
        RingBand(8, 5, 4)
    with pytest.raises(TypeError, match="full-sky"):
        map2alm(BandMap(np.zeros(10), 8, 0), 8)


def test_interpolation_refuses_what_is_not_a_map():
    with pytest.raises(ValueError, match="HEALPix map"):
        interpolate_at_pixels(np.zeros(100), 4)
    with pytest.raises(ValueError, match="pixels outside"):
        interpolate_at_pixels(np.zeros(12), 4, np.array([0, 192]))


@pytest.mark.parametrize("nside", [1, 4, 64, 2048])
def test_discs_are_query_discs(nside):
    rng = np.random.default_rng(nside)
    centres = rng.normal(size=(20, 3))
    centres[:3] = [[0, 0, 1], [0, 0, -1], [1, 0, 0]]
    centres /= np.linalg.norm(centres, axis=1)[:, None]
    for radius in (0.004, 0.05, 0.3, 1.2):
        if nside * radius > 300:
            continue
        pixels, disc = discs_pixels(nside, centres, radius)
        for i, centre in enumerate(centres):
            np.testing.assert_array_equal(np.sort(pixels[disc == i]), np.sort(hp.query_disc(nside, centre, radius)))


def test_pixel_centres_are_healpys():
    nside = 8
    pixels = np.arange(hp.nside2npix(nside))
    ours = np.array([ring_pix2vec(nside, p) for p in pixels])
    np.testing.assert_allclose(ours, np.array(hp.pix2vec(nside, pixels)).T, atol=1e-14)


@pytest.mark.parametrize("nside, max_pixels", [(1, 1), (2, 7), (2, 10**9), (4, 33), (8, 100), (32, 1500), (32, 6145)])
def test_mirror_bands_hold_every_ring_once_with_its_mirror(nside, max_pixels):
    bands = mirror_bands(nside, max_pixels)
    rings = [r for band in bands for rb in band for r in range(rb.first_ring, rb.last_ring + 1)]
    assert sorted(rings) == list(range(1, 4 * nside))
    for band in bands:
        held = {r for rb in band for r in range(rb.first_ring, rb.last_ring + 1)}
        assert held == {4 * nside - r for r in held}
        assert sum(rb.n_pixels for rb in band) <= max_pixels + 8 * nside
    assert (len(bands) == 1) == (max_pixels >= 12 * nside**2)
    with pytest.raises(ValueError, match="max_pixels"):
        mirror_bands(nside, 0)


@pytest.mark.parametrize("analysis_band_pixels", [healpix.ANALYSIS_BAND_PIXELS, 1000])
def test_transforms_are_healpys(analysis_band_pixels, monkeypatch):
    monkeypatch.setattr(healpix, "ANALYSIS_BAND_PIXELS", analysis_band_pixels)
    nside, lmax = 32, 64
    rng = np.random.default_rng(3)
    values = rng.normal(size=hp.nside2npix(nside))
    np.testing.assert_allclose(map2alm(values, lmax), hp.map2alm(values, lmax=lmax, iter=0), rtol=0, atol=1e-12)
    np.testing.assert_allclose(map2alm(values.astype(np.float32), lmax),
                               hp.map2alm(values.astype(np.float32).astype(float), lmax=lmax, iter=0), rtol=0, atol=1e-12)
    intensity = np.exp(values).astype(np.float32)
    np.testing.assert_allclose(map2alm(intensity, lmax, log=True),
                               hp.map2alm(np.log(intensity.astype(float)), lmax=lmax, iter=0), rtol=0, atol=1e-12)
    size = hp.Alm.getsize(lmax)
    alms = rng.normal(size=(2, size)) + 1j * rng.normal(size=(2, size))
    alms[:, :lmax + 1] = alms[:, :lmax + 1].real
    np.testing.assert_allclose(alm2map_spin(alms, nside, lmax), np.array(hp.alm2map_spin(list(alms), nside, 2, lmax)),
                               rtol=0, atol=1e-10)
