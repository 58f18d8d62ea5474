"""The validation command end to end on a tiny freshly trained conditional model, and its statistics."""

import json
import math

import numpy as np
import pytest
import torch

from pysm_vaedust.fidelity import (RATIO_RANGE, band_powers, conditional_structure, first_crossing, fraction_explained,
                                   gaussian_baseline, gaussian_power_2d, own_spectrum_gaussian, per_patch_moments,
                                   ratio_summary, resolved_bands, windowed_modes)
from pysm_vaedust.figures import FIGURE_NAMES, GALLERY_ROWS, GALLERY_SAMPLES, gallery_images
from pysm_vaedust.statistics import default_ell_edges, flat_power_spectrum
from pysm_vaedust.train import TrainConfig, build_datasets, load_training_map
from pysm_vaedust.validate import main, split_patches, summary
from pysm_vaedust.weights import load_weights

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def validation_run(tiny_weights, tmp_path_factory):
    out = tmp_path_factory.mktemp("validation")
    code = main(["--weights", str(tiny_weights), "--split", "test", "--out", str(out), "--n-draws", "3",
                 "--n-mean", "4", "--n-boot", "20", "--train-patches", "100", "--seed", "3", "--quiet"])
    return code, out, json.loads((out / "metrics.json").read_text())


def _leaves(obj, path=""):
    """(path, value) of every scalar in a JSON tree."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _leaves(v, f"{path}/{k}")
    elif isinstance(obj, list):
        for v in obj:
            yield from _leaves(v, path)
    else:
        yield path, obj


def test_end_to_end_writes_finite_metrics_and_figures(validation_run, tiny_weights):
    code, out, metrics = validation_run
    assert code == 0
    leaves = list(_leaves(metrics))
    numbers = [v for _, v in leaves if isinstance(v, (int, float)) and not isinstance(v, bool)]
    assert len(numbers) > 1000 and all(math.isfinite(v) for v in numbers)
    # non-finite values are written as null: only a crossing that never happens, or a WPH coefficient
    # without a spectrum-independent Gaussian value, may be null
    nulls = {path for path, v in leaves if v is None}
    assert nulls <= {"/settings/data_map", "/reconstruction/ell_cross_crosses_level",
                     "/reconstruction/ell_auto_crosses_level", "/morphology/wph/gaussian_values"}
    meta = load_weights(tiny_weights).metadata
    assert metrics["counts"]["split"] == meta["split"]["counts"]["test"]
    assert metrics["counts"]["train"] == 100 and metrics["counts"]["train_wiener_fit"] == meta["split"]["counts"]["train"]
    assert sorted(metrics["figures"]) == sorted(FIGURE_NAMES)
    for name in FIGURE_NAMES:
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(out.glob("*.tmp")) and not list(out.glob(".*"))
    assert len(metrics["weights"]["sha256_file"]) == 64
    text = summary(metrics)
    assert "extrapolated" in text and "Wiener" in text and "V2" in text


def test_local_amplitude_rows(validation_run, tiny_weights):
    """Every row and band has a median and a share in [0, 1]; the Gaussian field with each patch's
    own spectrum reproduces the patch's band power (median ~1, most patches in range) at both
    levels: the ratio machinery compares like with like."""
    _, _, metrics = validation_run
    amp = metrics["amplitude"]
    assert amp["ratio_range"] == list(RATIO_RANGE)
    trained, level1 = amp["trained_level"], amp["extrapolated_level"]
    assert trained["bands_ell"] == [[300.0, 600.0]]  # 15' pixels: Nyquist ell 720
    assert level1["bands_ell"] == [[1200.0, 2000.0]] and level1["extrapolated"] is True
    assert level1["factor"] == 4 and level1["patch_deg"] == 2.0 and level1["condition_fwhm_arcmin"] == 7.5
    assert level1["count"] + level1["centres_missing_data"] == metrics["counts"]["split"]
    assert level1["beam_fwhm_arcmin"] == pytest.approx(13.74, abs=0.01)  # the Planck map's nside-256 pixel
    slope = load_weights(tiny_weights).metadata["spectral_slope"]["slope"]
    assert level1["amplitude"] == pytest.approx(4 ** (-(slope - 2) / 2))  # tiling.cascade_levels' level 1
    for level, rows in ((trained, ("vae", "gaussian", "vae_on_train")), (level1, ("vae", "gaussian"))):
        for row in rows:
            s = level[row]
            assert len(s["median_ratio"]) == len(s["fraction_in_range"]) == len(level["bands_ell"])
            assert all(0 <= f <= 1 for f in s["fraction_in_range"]) and all(r > 0 for r in s["median_ratio"])
            lo, hi = np.asarray(s["ratio_percentiles_16_84"])
            assert np.all(lo <= np.asarray(s["median_ratio"])) and np.all(np.asarray(s["median_ratio"]) <= hi)
        assert abs(level["gaussian"]["median_ratio"][0] - 1) < 0.1
    assert trained["gaussian"]["fraction_in_range"][0] > 0.9


def test_morphology_prediction_and_reconstruction_sections(validation_run):
    _, _, metrics = validation_run
    mo = metrics["morphology"]
    J = mo["wph"]["scales_J"]
    assert len(mo["wph"]["labels"]) == len(mo["wph"]["gaussian_values"]) == 4 * J + J * (J - 1) // 2
    for key in ("split", "train", "vae", "gaussian"):
        for k in ("v0", "v1", "v2"):
            band = mo["minkowski"][key][k]
            assert len(band["mean"]) == len(mo["thresholds_nu"]) and np.all(np.asarray(band["lo"]) <= band["hi"])
        assert len(mo["wph"][key]["mean"]) == len(mo["wph"]["labels"])
        fil = mo["filaments"][key]
        assert len(fil["coherence_hist"]["mean"]) == len(mo["filaments"]["coherence_edges"]) - 1
        assert 0 <= fil["coherence"]["mean"] <= 1 and 0 <= fil["ridge_fraction"]["mean"] < 1
    for row in ("vae", "gaussian", "train"):
        inside = mo["inside_split_band"][row]
        assert set(inside) >= {"v0", "v1", "v2", "wph", "coherence", "coherence_hist", "ridge_length_fraction"}
        assert all(0 <= v <= 1 for v in inside.values())
    # the real train patches are the same kind of sky: their mean V0 lies closer to the test band
    # than the tiny (barely trained) model's samples do
    v0 = {k: np.asarray(mo["minkowski"][k]["v0"]["mean"]) for k in ("split", "train", "vae")}
    assert np.abs(v0["train"] - v0["split"]).mean() < np.abs(v0["vae"] - v0["split"]).mean()
    cs = metrics["conditional_structure"]
    assert cs["octave_ell"] == [384.0, 768.0] and cs["n_mean"] == 4
    for key in ("vae_conditional_mean", "wiener"):
        assert cs["fraction_explained"][key] <= 1
        assert len(cs["per_bin"][key]) == len(cs["per_bin"]["ell"])
    r = metrics["reconstruction"]
    for key in ("ell_cross_crosses_level", "ell_auto_crosses_level"):
        assert r[key] is None or r["ell"][0] <= r[key] <= r["ell"][-1]
    assert len(r["cross_ratio"]) == len(r["ell"]) == len(metrics["power_spectra"]["ell"])


def test_bad_input_gives_one_clear_error(tiny_weights, tmp_path, capsys):
    with pytest.raises(SystemExit) as err:
        main(["--weights", str(tmp_path / "missing.h5"), "--out", str(tmp_path)])
    assert err.value.code == 2 and "missing.h5" in capsys.readouterr().err
    for argv, message in ((["--split", "holdout"], "holdout"), (["--n-draws", "2"], "--n-draws 2"),
                          (["--n-mean", "1"], "--n-mean 1"), (["--split", "all"], "--data-map"),
                          (["--train-patches", "-1"], "--train-patches")):
        with pytest.raises(SystemExit) as err:
            main(["--weights", str(tiny_weights), "--out", str(tmp_path), *argv])
        assert err.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "metrics.json").exists()


def test_split_patches_match_the_training_split(tiny_weights):
    """The training map cut at the stored centres gives back exactly the training run's splits
    (x and c), and another split name is refused."""
    meta = load_weights(tiny_weights).metadata
    cfg = TrainConfig.of_weights(meta)
    sets, _ = build_datasets(cfg, progress=False)
    dust = load_training_map(cfg.data_map)
    for split in ("test", "train"):
        x, c, info = split_patches(dust, meta, split)
        assert torch.equal(x, sets[split][0]) and torch.equal(c, sets[split][1])
        assert info["count"] == len(x) and info["centres_lonlat_deg"].shape == (len(x), 2)
    with pytest.raises(ValueError, match="holdout"):
        split_patches(dust, meta, "holdout")


def _power_law_patches(rng, count=20, big=128, n=32, slope=1.4):
    """(16 count, n, n) non-periodic dust-like patches cut from larger power-law fields."""
    k = np.hypot(*np.meshgrid(np.fft.fftfreq(big), np.fft.fftfreq(big), indexing="ij"))
    amp = np.where(k > 0, np.maximum(k, 1e-3) ** -slope, 0.0)
    fields = np.fft.ifft2(np.fft.fft2(rng.standard_normal((count, big, big))) * amp).real
    return fields.reshape(count, big // n, n, big // n, n).transpose(0, 1, 3, 2, 4).reshape(-1, n, n)


def test_gaussian_baseline_matches_target_spectrum():
    """The GRF coloured by gaussian_power_2d has the patches' windowed binned spectrum within 4
    sigma of sampling error; with each=True every field has its own patch's band power."""
    rng = np.random.default_rng(1)
    patches, pix = _power_law_patches(rng), 0.25
    grf = gaussian_baseline(gaussian_power_2d(patches), 2000, rng, mean=patches.mean())
    edges = default_ell_edges(32, pix)
    _, cl_data = flat_power_spectrum(patches, pix, edges)
    _, cl_grf = flat_power_spectrum(grf, pix, edges)
    sem = np.hypot(cl_data.std(0) / np.sqrt(len(cl_data)), cl_grf.std(0) / np.sqrt(len(cl_grf)))
    assert np.all(np.abs(cl_grf.mean(0) - cl_data.mean(0)) < 4 * sem)
    assert abs(grf.var() / patches.var() - 1) < 0.1
    scaled = patches * np.repeat([1.0, 3.0], len(patches) // 2)[:, None, None]  # two amplitudes
    own = own_spectrum_gaussian(scaled, rng, draws=8)
    assert own.shape == (len(scaled), 8, 32, 32)
    assert np.allclose(own.mean(axis=(2, 3)), scaled.mean(axis=(1, 2))[:, None])  # each patch's own mean
    ratio = band_powers(own, pix, [(60.0, 120.0), (120.0, 240.0)]).mean(1) / band_powers(
        scaled, pix, [(60.0, 120.0), (120.0, 240.0)])  # one spectrum for all would be off by 9 or 1/9
    assert np.all(np.abs(np.median(ratio, 0) - 1) < 0.15)
    assert np.all(ratio_summary(ratio)["fraction_in_range"] > 0.9)


def test_wiener_prediction_from_the_condition():
    """x = a field f plus independent noise g, c = f averaged over 2x2 pixels (the condition grid):
    the Wiener prediction explains var f / var x of the band c resolves; for x independent of c
    it explains nothing; a perfect prediction explains everything and none explains 0."""
    rng = np.random.default_rng(2)
    f = _power_law_patches(rng, count=30, n=32, slope=1.0)
    n, pix = f.shape[-1], 0.25
    c = np.stack([f.reshape(len(f), n // 2, 2, n // 2, 2).mean((2, 4)), np.zeros((len(f), n // 2, n // 2))], 1)
    band = (50.0, 300.0)  # below the condition grid's Nyquist, ell 360
    half = len(f) // 2
    for noise, expected in ((0.0, 1.0), (1.0, None)):
        x = f + noise * f.std() * rng.standard_normal(f.shape)
        out = conditional_structure(x[:half], c[:half], x[half:], c[half:], np.zeros_like(x[half:]), pix, band)
        if expected is None:  # white noise of f's variance: the share of f in the band
            modes_f, modes_x = windowed_modes(f[half:]), windowed_modes(x[half:])
            expected = 1 - fraction_explained(modes_x, modes_x - modes_f, pix, band)
        assert out["fraction_explained"]["wiener"] == pytest.approx(expected, abs=0.05)
        assert out["fraction_explained"]["vae_conditional_mean"] == 0.0
    independent = conditional_structure(f[:half], c[half:], f[half:], c[:half], np.zeros_like(f[half:]), pix, band)
    assert abs(independent["fraction_explained"]["wiener"]) < 0.05
    modes = windowed_modes(f)
    assert fraction_explained(modes, modes, pix, band) == 1.0


def test_small_helpers():
    ell = np.array([100.0, 200.0, 300.0])
    assert first_crossing(ell, np.array([0.05, 0.15, 0.5])) == pytest.approx(150.0)
    assert first_crossing(ell, np.array([0.2, 0.3, 0.5])) == 100.0
    assert first_crossing(ell, np.array([0.01, 0.02, 0.05])) is None
    assert resolved_bands(((300, 600), (600, 1200), (1200, 2000)), 64, 7.5 / 60) == [(300.0, 600.0), (600.0, 1200.0)]
    s = ratio_summary(np.array([[0.5, 1.0], [1.0, 1.0], [1.3, 2.0], [1.5, 1.0]]))
    assert np.allclose(s["median_ratio"], [1.15, 1.0]) and np.allclose(s["fraction_in_range"], [0.5, 0.75])


def test_gallery_full_ln_i_is_the_condition_on_the_patch_grid_plus_the_small_scales():
    """A condition that is a plane in ln I comes out on the patch's pixels as the same plane
    (bilinear is exact on it away from the edge); the full images add the small scales in ln I."""
    rng = np.random.default_rng(0)
    n, count = 16, 12
    norm = {"coarse_scale": 0.2, "level_scale": 0.5, "level_mean": 1.4, "log_scale": 0.05, "log_mean": 0.01}
    fine = np.arange(n) + 0.5                      # patch pixel centres; the condition's are 2 x 2 of them
    coarse_centres = 2 * np.arange(n // 2) + 1.0
    c = np.zeros((count, 2, n // 2, n // 2))
    c[:, 0] = 0.03 * coarse_centres[None, :, None] - 0.02 * coarse_centres[None, None, :]
    c[:, 1] = np.linspace(-1, 1, count)[:, None, None]
    x, samples = rng.normal(size=(count, n, n)), rng.normal(size=(count, 4, n, n))
    g = gallery_images(x, c, samples, rng.uniform(size=(count, 2)), norm)
    assert g["full_real"].shape == (GALLERY_ROWS, n, n) and g["full_samples"].shape == (GALLERY_ROWS, GALLERY_SAMPLES, n, n)
    coarse = g["full_real"] - g["real"]
    level = g["condition"].mean((-2, -1)) - norm["coarse_scale"] * c[0, 0].mean()
    plane = norm["coarse_scale"] * (0.03 * fine[:, None] - 0.02 * fine[None, :])
    inner = slice(1, -1)
    assert np.allclose(coarse[:, inner, inner], level[:, None, None] + plane[inner, inner], atol=1e-12)
    assert np.allclose(g["full_samples"] - g["samples"], coarse[:, None])


def test_per_patch_moments_on_known_fields():
    """Gaussian white patches with amplitudes 1 or 3 (half each): rms spread std/mean = 1/2, within-patch
    skewness ~0 and excess kurtosis ~0; exponential patches: skewness 2, excess kurtosis 6."""
    rng = np.random.default_rng(1)
    amp = np.repeat([1.0, 3.0], 200)[:, None, None]
    gauss = per_patch_moments(amp * rng.standard_normal((400, 64, 64)), n_boot=50)
    assert gauss["rms_cv"]["value"] == pytest.approx(0.5, abs=0.01)
    assert abs(gauss["skewness_mean"]["value"]) < 0.01
    assert abs(gauss["kurtosis_median"]["value"]) < 0.05
    lo, hi = gauss["rms_cv"]["band"]
    assert lo <= gauss["rms_cv"]["value"] <= hi
    expo = per_patch_moments(rng.exponential(size=(100, 64, 64)), n_boot=50)
    assert expo["skewness_mean"]["value"] == pytest.approx(2.0, rel=0.05)
    assert expo["kurtosis_median"]["value"] == pytest.approx(6.0, rel=0.15)
