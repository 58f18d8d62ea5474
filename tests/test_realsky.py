"""The real-sky comparison (pysm_vaedust.realsky): end to end through the validation command on the
tiny conditional model at nside 256 with the Planck E(B-V) map as the 'real' sky, a controlled
comparison, and bad input."""

import json

import healpy as hp
import numpy as np
import pytest
import torch

from pysm_vaedust.cutouts import PatchGeometry
from pysm_vaedust.data import DustMap, load_dust_map
from pysm_vaedust.realsky import BANDS, CLASSES, FIGURE_NAME, MODELS, compare, pixel_fwhm_arcmin, split_centres
from pysm_vaedust.validate import main, summary
from pysm_vaedust.weights import load_weights

from conftest import EBV_MAP

torch.set_num_threads(1)
GEOMETRY = PatchGeometry(32, 8.0)


@pytest.fixture(scope="module")
def planck(data_dir):
    return load_dust_map(data_dir / EBV_MAP)


@pytest.fixture(scope="module")
def centres(tiny_weights):
    """(lon, lat) (341,) each, degrees: the test split of the tiny model."""
    return split_centres(load_weights(tiny_weights).metadata, "test")


def _scaled_contrast(dust: DustMap, factor: float) -> DustMap:
    """The same map with its log intensity multiplied by `factor` (contrast power x factor^2)."""
    return DustMap(dust.intensity ** factor, dust.frame, dust.nside, f"{dust.source} ^ {factor}", dust.sha256,
                   dust.quantity)


@pytest.fixture(scope="module")
def north_cap_map(data_dir, tmp_path_factory):
    """The Planck E(B-V) map with data only at Galactic b > 40 deg (FITS path): few patches, fast."""
    from pysm_vaedust.data import read_healpix_map

    values, frame, _ = read_healpix_map(data_dir / EBV_MAP)
    theta, phi = hp.pix2ang(hp.npix2nside(values.size), np.arange(values.size))
    lat = 90 - np.degrees(hp.Rotator(coord=[frame, "G"])(theta, phi)[0])
    path = tmp_path_factory.mktemp("maps") / "planck_ebv_north_cap.fits"
    hp.write_map(path, np.where(lat > 40, values, np.nan), coord=frame, extra_header=[("QUANT", "E(B-V)")], dtype=float)
    return path


def test_validate_writes_the_real_sky_section(tiny_weights, north_cap_map, tmp_path):
    """Through the command line: the test split of another map (--data-map, the northern cap) and the
    real-sky comparison against that map (patches on missing data dropped in both)."""
    cap = str(north_cap_map)
    code = main(["--weights", str(tiny_weights), "--out", str(tmp_path), "--data-map", cap, "--n-draws", "3",
                 "--n-mean", "2", "--n-boot", "20", "--train-patches", "16", "--real-sky", cap,
                 "--real-sky-nside", "256", "--quiet"])
    assert code == 0
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    real = metrics["real_sky"]
    assert FIGURE_NAME in metrics["figures"] and (tmp_path / FIGURE_NAME).stat().st_size > 10_000
    assert real["bands_ell"] == [list(b) for b in BANDS[:2]]  # 15' pixels: Nyquist ell 720
    assert real["beams_fwhm_arcmin"]["common"] == pytest.approx(pixel_fwhm_arcmin(256))
    assert set(real["classes"]) == set(CLASSES) | {"all"}
    counts = [real["classes"][c]["count"] for c in CLASSES]
    assert sum(counts) == real["counts"]["usable"] == real["classes"]["all"]["count"] and max(counts) - min(counts) <= 1
    assert real["counts"]["usable"] == metrics["counts"]["split"] < real["counts"]["centres"]  # the same cap patches
    assert metrics["data"]["data"]["source"] == north_cap_map.name and metrics["counts"]["split"] >= 16
    level1 = metrics["amplitude"]["extrapolated_level"]  # at 7.5' the nside-256 cap's edge rings through it
    assert ("vae" in level1) == (level1["count"] >= 2) and ("not measured" in level1["note"]) == (level1["count"] < 2)
    faint, bright = real["classes"]["faint"]["intensity_range_MJysr"], real["classes"]["bright"]["intensity_range_MJysr"]
    assert faint[1] <= bright[0]
    n_wph = len(real["wph_labels"])
    for c in real["classes"].values():
        for model in MODELS:
            bp = c[model]["band_power"]
            assert len(bp["median_ratio"]) == len(bp["fraction_in_range"]) == 2
            assert all(0 <= v <= 1 for v in c[model]["inside_fraction"].values())
    assert n_wph == 15
    table = summary(metrics)
    assert "real sky" in table and all(f"| {c} (" in table for c in CLASSES)


def test_gaussian_field_with_the_patches_own_spectra_matches_their_band_power(planck, centres):
    """The d11-like field reproduces each real patch's band power (median ratio ~1, most patches in
    0.7-1.4) while a map with twice the log contrast is seen 4x too strong, class by class."""
    lon, lat = centres
    beam = pixel_fwhm_arcmin(planck.nside)
    metrics, images = compare(planck, _scaled_contrast(planck, 2.0), lon[:90], lat[:90], GEOMETRY, 2.0, beam, beam,
                              n_boot=200, seed=1)  # enough resamplings for percentile bands holding their mean
    for name in CLASSES + ("all",):
        d11, doubled = metrics["classes"][name]["d11_like"], metrics["classes"][name]["vaedust"]
        assert np.all(np.abs(d11["band_power"]["median_ratio"] - 1) < 0.15)
        assert np.all(d11["band_power"]["fraction_in_range"] >= 0.75)
        assert np.allclose(doubled["band_power"]["median_ratio"], 4, rtol=0.02)
        assert np.all(doubled["band_power"]["fraction_in_range"] == 0)
        assert doubled["std_median_ratio"] == pytest.approx(2, rel=0.01)
        # standardised patches: twice the contrast has the same morphology
        assert doubled["inside_fraction"]["minkowski"] == 1 and doubled["inside_fraction"]["wph"] == 1
    assert set(images) == set(CLASSES)
    assert all(img["real"].shape == (32, 32) for img in images.values())


def test_bad_input_raises_one_clear_error(planck, centres):
    lon, lat = centres
    with pytest.raises(ValueError, match="no stored split 'test'"):
        split_centres({"geometry": {}}, "test")
    with pytest.raises(ValueError, match="npix >= 16"):
        compare(planck, planck, lon, lat, PatchGeometry(8, 2.0), 2.0, 13.7, 13.7)
    # the real map's data withheld around every centre
    theta, phi = hp.pix2ang(planck.nside, np.arange(planck.intensity.size))
    north = hp.Rotator(coord=[planck.frame, "G"])(theta, phi)[0] < np.pi / 2
    holes = DustMap(np.where(north, np.nan, planck.intensity), planck.frame, planck.nside, "holes", "", "intensity_MJysr")
    with pytest.raises(ValueError, match="0 of .* hold data .* the region lies on missing data"):
        compare(holes, planck, lon[lat > 20], lat[lat > 20], GEOMETRY, 2.0, 13.7, 13.7)
