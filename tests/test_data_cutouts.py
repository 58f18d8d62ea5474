"""Stage 1-2 on real data: map reading, frames, MBB conversion, gnomonic cutouts, split, augmentation."""

import gzip

import healpy as hp
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pysm_vaedust.cutouts import (Cutouts, PatchGeometry, dihedral, cut_patches, fill_invalid,
                                  near_extragalactic, noise_floor_ell, patch_centres, random_dihedral, region_split,
                                  sample_patches, tangent_basis)
from pysm_vaedust.data import (MJysr_to_uK_RJ, load_dust_map, planck_nu, read_healpix_map,
                               tau353_to_intensity)

from conftest import EBV_MAP


def galactic_latitude_map(nside, frame):
    """Map whose value is the Galactic latitude (deg) of each pixel, pixelised in `frame`."""
    vec = np.stack(hp.pix2vec(nside, np.arange(hp.nside2npix(nside))))
    if frame != "G":
        vec = np.asarray(hp.Rotator(coord=[frame, "G"])(vec))
    return np.degrees(np.arcsin(np.clip(vec[2], -1, 1)))


def gnomonic_latitude(lat0, x, y):
    """Textbook inverse gnomonic projection (Calabretta & Greisen 2002), latitude only (deg)."""
    rho = np.hypot(x, y)
    c = np.arctan(rho)
    b0 = np.radians(lat0)
    return np.degrees(np.arcsin(np.cos(c) * np.sin(b0) + y * np.sin(c) * np.cos(b0) / rho))


@pytest.mark.parametrize("frame", ["G", "C"])
def test_cutout_of_latitude_map_has_right_corners_and_centre(frame):
    geometry = PatchGeometry(32, 8.0)
    values = galactic_latitude_map(256, frame)
    lon0, lat0 = np.array([40.0, 200.0]), np.array([45.0, -30.0])
    patches = sample_patches(values, frame, lon0, lat0, geometry)
    off = geometry.offsets_rad()
    for k in range(2):
        # centre: mean of the 4 central pixels = lat0 to second order
        centre = patches[k, 15:17, 15:17].mean()
        assert abs(centre - lat0[k]) < 0.02
        for row, col in [(0, 0), (0, 31), (31, 0), (31, 31)]:
            expected = gnomonic_latitude(lat0[k], off[col], off[row])
            assert abs(patches[k, row, col] - expected) < 0.05, (row, col)
    # rows run north: the top row is at higher latitude than the bottom one
    assert np.all(patches[:, -1].mean(1) > patches[:, 0].mean(1) + 7)


@pytest.mark.parametrize("stratified", [False, True])
def test_region_split_is_disjoint_in_sky_area(stratified):
    geometry = PatchGeometry(32, 8.0)
    lon, lat = patch_centres(15.0, 3.7)
    strata = np.abs(lat) if stratified else None
    labels = region_split(lon, lat, geometry, seed=0, strata=strata)
    counts = [np.sum(labels == k) for k in range(3)]
    assert 2000 < len(lon) < 2500 and min(counts) > 150
    # regions are assigned 70/15/15 over all centres; train then loses its border patches
    assert abs(counts[2] / len(lon) - 0.15) < 0.03 and abs(counts[1] / len(lon) - 0.15) < 0.06
    assert counts[0] > counts[1] + counts[2]
    nside = 256  # 13.7' pixels, well below the 5 % (0.4 deg) safety margin of the split
    covered = np.zeros((3, hp.nside2npix(nside)), bool)
    half = np.tan(np.radians(geometry.size_deg / 2))
    signs = np.array([[-1, -1], [1, -1], [1, 1], [-1, 1]])
    for k in range(3):
        sel = np.flatnonzero(labels == k)
        n0, east, north = tangent_basis(lon[sel], lat[sel])
        for c, e, n in zip(n0, east, north):  # the true patch edges (corners of the outer pixels)
            corners = c + half * (signs[:, :1] * e + signs[:, 1:] * n)
            covered[k, hp.query_polygon(nside, corners, inclusive=False)] = True
    for a, b in [(0, 1), (0, 2), (1, 2)]:
        assert not np.any(covered[a] & covered[b]), f"splits {a} and {b} share sky pixels"
    assert np.array_equal(labels, region_split(lon, lat, geometry, seed=0, strata=strata))


def test_split_stratified_by_variance_spans_bright_and_faint_sky(data_dir):
    """On the real map, a random draw of the ~48 regions gives splits whose mean small-scale power
    differs by up to a factor 1.8 (seed 4); stratifying by variance keeps them within 20 %."""
    geometry = PatchGeometry(32, 8.0)
    lon, lat = patch_centres(15.0, 3.7)
    residual = cut_patches(load_dust_map(data_dir / EBV_MAP), lon, lat, geometry, 2.0).small_scales
    variance = residual.reshape(len(residual), -1).var(1)
    labels = region_split(lon, lat, geometry, seed=0, strata=variance)
    split_power = np.array([variance[labels == k].mean() for k in range(3)])
    assert split_power.max() / split_power.min() < 1.2, split_power
    with pytest.raises(ValueError, match="strata"):
        region_split(lon, lat, geometry, strata=variance[:10])


def test_dihedral_transforms_are_the_eight_exact_symmetries():
    image = np.arange(16.0).reshape(4, 4)
    outs = [dihedral(image, k) for k in range(8)]
    assert len({o.tobytes() for o in outs}) == 8
    assert np.array_equal(outs[1], np.rot90(image))
    assert np.array_equal(outs[4], image[:, ::-1])
    for k in range(8):  # group closure: each transform's inverse is one of them, torch == numpy
        assert any(np.array_equal(dihedral(outs[k], j), image) for j in range(8))
        assert np.array_equal(dihedral(torch.tensor(image), k).numpy(), outs[k])
    batch = torch.arange(2 * 16.0).reshape(2, 1, 4, 4)
    flipped = random_dihedral(batch, torch.Generator().manual_seed(0))
    for img, out in zip(batch, flipped):  # each output is some exact dihedral image of its input
        assert any(torch.equal(dihedral(img, k), out) for k in range(8))
    with pytest.raises(ValueError, match="dihedral index"):
        dihedral(image, 8)


def test_real_map_loads_in_icrs_and_converts_with_mbb(data_dir):
    dust = load_dust_map(data_dir / EBV_MAP)
    assert dust.frame == "C" and dust.nside == 256 and dust.quantity == "ebv"
    # 545 GHz: I = tau B_nu(19.7 K) (545/353)^1.62, tau = E(B-V) / 1.49e4
    raw, _, _ = read_healpix_map(data_dir / EBV_MAP)
    expected = raw[:10] / 1.49e4 * planck_nu(545.0, 19.7) * (545 / 353) ** 1.62
    assert np.allclose(dust.intensity[:10], expected)
    assert 0.3 < np.median(dust.intensity) < 3  # MJy/sr, typical high-latitude 545 GHz
    # Rayleigh-Jeans: 1 MJy/sr at 545 GHz is c^2 / (2 k nu^2) * 1e-20 K
    assert MJysr_to_uK_RJ(545.0) == pytest.approx(2.998e8**2 / (2 * 1.380649e-23 * 545e9**2) * 1e-20 * 1e6, rel=1e-3)
    assert tau353_to_intensity(1.0, 353.0) == pytest.approx(planck_nu(353.0, 19.7))


def test_bad_maps_are_refused(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_dust_map(tmp_path / "missing.fits")
    corrupt = tmp_path / "corrupt.fits.gz"
    corrupt.write_bytes(gzip.compress(b"not a fits file" * 100))
    with pytest.raises(ValueError, match="cannot read"):
        load_dust_map(corrupt)
    values = np.ones(hp.nside2npix(8))
    values[5] = np.nan
    path = tmp_path / "nan.fits"
    hp.write_map(path, values, coord="G")
    with pytest.raises(ValueError, match="non-finite or non-positive.*index 5"):
        load_dust_map(path, quantity="ebv")
    values[5] = -1.0
    hp.write_map(path, values, coord="G", overwrite=True)
    with pytest.raises(ValueError, match="non-positive"):
        load_dust_map(path, quantity="ebv")
    hp.write_map(path, np.ones(hp.nside2npix(8)), overwrite=True)
    with pytest.raises(ValueError, match="no COORDSYS"):
        load_dust_map(path, quantity="ebv")
    with pytest.raises(ValueError, match="unknown quantity"):
        load_dust_map(path, quantity="magic", frame="G")


def test_nested_map_is_reordered(tmp_path):
    ring = galactic_latitude_map(16, "G")
    path = tmp_path / "nest.fits"
    hp.write_map(path, hp.reorder(ring, r2n=True), nest=True, coord="G")
    values, frame, _ = read_healpix_map(path)
    assert frame == "G" and np.allclose(values, ring)


def test_patches_reaching_nearby_galaxies_are_found():
    geometry = PatchGeometry(32, 8.0)
    lon = np.array([280.47, 280.47, 121.17 + 7.0, 0.0])
    lat = np.array([-32.89, -32.89 + 14.0, -21.57, 60.0])
    # on the LMC; 14 deg away (beyond its 6 deg disc + the 5.7 deg half-diagonal); M31 within 2 + 5.7; far away
    assert near_extragalactic(lon, lat, geometry).tolist() == [True, False, True, False]


def test_noise_floor_ell_recovers_the_crossing_and_the_beam():
    """Spectra D ell^-3 + N, both through a 5' Gaussian beam: the bright patches (N = 0) give the
    beam; each patch's ell_floor is where D ell^-3 falls to N (R = C / beam < 2 N) when the tail
    ell 3000-3600 is floor-dominated."""
    ell = np.linspace(100, 3600, 40)
    sigma = np.radians(5.0 / 60) / np.sqrt(8 * np.log(2))
    crossing = np.linspace(600, 2400, 30)  # where dust power equals the floor
    dust_amp = crossing ** 3  # D with D crossing^-3 = N = 1
    floor = np.r_[np.ones(27), np.zeros(3)]  # the three brightest patches: no floor
    level = np.r_[np.linspace(1, 2, 27), [10, 11, 12]]
    cl = (dust_amp[:, None] * ell ** -3.0 + floor[:, None]) * np.exp(-sigma ** 2 * ell ** 2)
    cut = Cutouts(small_scales=np.zeros((30, 4, 4), np.float32), coarse=np.zeros((30, 2, 2), np.float32),
                  fine_ell=ell, fine_cl=cl, level=level)
    result = noise_floor_ell(cut, tail_ell=(3000, 3600), bright_fraction=0.1, window_fit_ell=(200, 2600))
    assert abs(result["beam_fwhm_arcmin"] - 5.0) < 0.05 and abs(result["alpha"] - 3.0) < 0.01
    step = ell[1] - ell[0]
    found, truth = result["ell_floor"][:27], crossing[:27]
    # never later than the truth (the floor is an upper bound: dust left in the tail raises it) ...
    assert np.all(found <= truth + step + 1e-6)
    # ... and within a bin of it where the tail holds little dust (crossing <= 1500: < 13 % of the floor)
    faint = truth <= 1500
    assert faint.sum() > 8 and np.all(found[faint] >= truth[faint] - step - 1e-6)
    with pytest.raises(ValueError, match="does not resolve"):
        noise_floor_ell(Cutouts(cut.small_scales, cut.coarse, ell[:10], cl[:, :10], level))


def test_fill_invalid_keeps_valid_pixels_and_fills_holes_smoothly():
    nside = 64
    theta, phi = hp.pix2ang(nside, np.arange(hp.nside2npix(nside)))
    values = np.cos(theta) + 0.1 * np.sin(phi)  # smooth
    valid = np.ones(values.size, bool)
    hole = hp.query_disc(nside, hp.ang2vec(0.3, 45.0, lonlat=True), np.radians(5))
    valid[hole] = False
    filled = fill_invalid(np.where(valid, values, np.nan), valid)
    assert np.array_equal(filled[valid], values[valid])
    assert np.all(np.isfinite(filled)) and np.max(np.abs(filled[hole] - values[hole])) < 0.1


@pytest.fixture(scope="module")
def small_map():
    """An nside-32 dust map with a hole of missing data (NaN) and one non-positive pixel."""
    nside = 32
    theta, phi = hp.pix2ang(nside, np.arange(hp.nside2npix(nside)))
    intensity = np.exp(np.cos(theta) + 0.3 * np.sin(3 * phi))
    intensity[hp.query_disc(nside, hp.ang2vec(40.0, 50.0, lonlat=True), np.radians(6))] = np.nan
    intensity[hp.ang2pix(nside, 200.0, -50.0, lonlat=True)] = 0.0
    from pysm_vaedust.data import DustMap
    return DustMap(intensity=intensity, frame="G", nside=nside, source="small test map", sha256="", quantity="intensity_MJysr")


@settings(max_examples=40, deadline=None, database=None)
@given(lon=st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.lists(st.floats(-400, 400), max_size=3),
                     st.text(max_size=3), st.none()),
       lat=st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.lists(st.floats(-100, 100), max_size=3)),
       fwhm=st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.integers(-2, 3)),
       missing=st.sampled_from(["nan", "raise", "skip", 3]))
def test_cut_patches_works_or_names_the_bad_argument(small_map, lon, lat, fwhm, missing):
    """Any centres, beam and mode: finite patches (or NaN patches on missing data), or one
    ValueError/TypeError naming the argument or the place (never a traceback from inside numpy)."""
    try:
        cut = cut_patches(small_map, lon, lat, PatchGeometry(8, 8.0), fwhm, missing=missing)
    except (ValueError, TypeError) as err:
        assert any(word in str(err) for word in ("lon_deg", "lat_deg", "template_fwhm_deg", "missing", "npix",
                                                 "falls on missing data")), str(err)
        return
    assert cut.small_scales.shape[1:] == (8, 8)
    assert np.all(np.isfinite(cut.small_scales[cut.usable])) and np.all(np.isnan(cut.small_scales[~cut.usable]))
