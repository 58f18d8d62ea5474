"""The validation command end to end on a tiny freshly trained model, and its helpers."""

import json
import math

import numpy as np
import pytest
import torch

from pysm_vaedust.statistics import flat_power_spectrum, default_ell_edges
from pysm_vaedust.train import TrainConfig, build_datasets
from pysm_vaedust.validate import (
    FIGURE_NAMES,
    first_crossing,
    gaussian_baseline,
    gaussian_power_2d,
    main,
    normalised_patches,
    patch_histograms,
    per_patch_moments,
    pooled_moments,
    slerp,
)
from pysm_vaedust.weights import load_weights, save_weights

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def validation_run(tiny_weights, tmp_path_factory):
    out = tmp_path_factory.mktemp("validation")
    code = main(["--weights", str(tiny_weights), "--split", "test", "--out", str(out), "--n-samples", "64",
                 "--n-recon", "2", "--n-boot", "50", "--seed", "3", "--prior", "flow", "--quiet"])
    return code, out


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
    code, out = validation_run
    assert code == 0
    metrics = json.loads((out / "metrics.json").read_text())
    leaves = list(_leaves(metrics))
    numbers = [v for _, v in leaves if isinstance(v, (int, float)) and not isinstance(v, bool)]
    assert len(numbers) > 1000 and all(math.isfinite(v) for v in numbers)
    # non-finite values are written as null: only a crossing that never happens, or a WPH coefficient
    # without a spectrum-independent Gaussian value, may be null
    nulls = {path for path, v in leaves if v is None}
    assert nulls <= {"/settings/data_map", "/reconstruction/ell_cross_crosses_level",
                     "/reconstruction/ell_auto_crosses_level", "/wph/gaussian_values"}
    meta = load_weights(tiny_weights).metadata
    assert metrics["counts"]["split"] == meta["split"]["counts"]["test"]
    assert metrics["counts"]["train"] == meta["split"]["counts"]["train"]
    assert metrics["counts"]["prior"] == 64
    assert metrics["settings"]["prior"] == "flow"
    nbins = len(metrics["ell"]["centres"])
    for key in ("prior/split", "prior/train", "train/split", "grf/split"):
        assert len(metrics["ratios"][key]) == nbins
    for key in ("split", "train", "prior", "grf"):
        band = metrics["power_spectra"][key]
        assert np.all(np.asarray(band["lo"]) <= np.asarray(band["hi"]))
        assert len(metrics["minkowski"][key]["v2"]["mean"]) == len(metrics["minkowski"]["nu"])
    # morphology: every WPH coefficient and filament statistic with its band, fractions inside in [0, 1]
    wph, filaments = metrics["wph"], metrics["filaments"]
    J = wph["scales_J"]
    assert len(wph["labels"]) == len(wph["gaussian_values"]) == 4 * J + J * (J - 1) // 2
    for key in ("split", "train", "prior", "grf"):
        assert len(wph[key]["mean"]) == len(wph["labels"])
        assert np.all(np.asarray(wph[key]["lo"]) <= np.asarray(wph[key]["hi"]))
        assert len(filaments[key]["coherence_hist"]["mean"]) == len(filaments["coherence_edges"]) - 1
        assert len(filaments[key]["ridge_length_fraction"]["mean"]) == len(filaments["ridge_length_lower_edges_px"])
        assert 0 <= filaments[key]["coherence"]["mean"] <= 1 and 0 <= filaments[key]["ridge_fraction"]["mean"] < 1
    for other in ("prior", "grf"):
        inside = metrics["band_inside_fraction"][f"{other}_in_split_band"]
        assert all(0 <= inside[k] <= 1 for k in ("wph", "coherence_hist", "ridge_length_fraction", "coherence"))
    # the reported crossing ells lie in the measured range (or None: never crosses)
    for key in ("ell_cross_crosses_level", "ell_auto_crosses_level"):
        ell = metrics["reconstruction"][key]
        assert ell is None or metrics["ell"]["centres"][0] <= ell <= metrics["ell"]["centres"][-1]
    assert len(metrics["weights"]["sha256_file"]) == 64
    assert sorted(metrics["figures"]) == sorted(FIGURE_NAMES)
    for name in FIGURE_NAMES:
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(out.glob("*.tmp"))


def test_bad_input_gives_one_clear_error(tiny_weights, tmp_path, capsys):
    weights = load_weights(tiny_weights)
    no_prior = save_weights(tmp_path / "no_prior.h5", {"vae": weights.vae},
                            {k: v for k, v in weights.metadata.items() if k != "prior"})
    with pytest.raises(SystemExit) as err:
        main(["--weights", str(tmp_path / "missing.h5"), "--out", str(tmp_path)])
    assert err.value.code == 2 and "missing.h5" in capsys.readouterr().err
    with pytest.raises(SystemExit) as err:
        main(["--weights", str(tiny_weights), "--split", "holdout", "--out", str(tmp_path)])
    message = capsys.readouterr().err
    assert err.value.code == 2 and "holdout" in message and "test" in message
    with pytest.raises(SystemExit) as err:
        main(["--weights", str(no_prior), "--prior", "flow", "--out", str(tmp_path)])
    assert err.value.code == 2 and "no learned prior" in capsys.readouterr().err
    assert not (tmp_path / "metrics.json").exists()


def test_data_map_patches_match_the_training_split(tiny_weights):
    """Another map goes through the same cutting and normalisation: the training map itself must
    give back exactly the training run's split."""
    meta = load_weights(tiny_weights).metadata
    cfg = TrainConfig.of_weights(meta)
    sets, _ = build_datasets(cfg)
    patches, info = normalised_patches(cfg.data_map, meta, "test")
    assert torch.equal(patches, sets["test"])
    assert info["count"] == len(sets["test"])
    with pytest.raises(ValueError, match="holdout"):
        normalised_patches(cfg.data_map, meta, "holdout")


def test_slerp_endpoints_and_norms():
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(16, generator=gen), 3 * torch.randn(16, generator=gen)
    path = slerp(a, b, 8).double()
    assert path.shape == (8, 16)
    assert torch.allclose(path[0], a.double()) and torch.allclose(path[-1], b.double())
    t = torch.linspace(0, 1, 8, dtype=torch.float64)
    assert torch.allclose(path.norm(dim=1), (1 - t) * a.norm() + t * b.norm(), rtol=1e-5)
    # the direction moves at constant angular speed on the great circle through a and b
    cos = (path @ a.double()) / (path.norm(dim=1) * a.norm())
    omega = torch.arccos((a @ b) / (a.norm() * b.norm())).double()
    assert torch.allclose(torch.arccos(cos.clamp(-1, 1)), t * omega, atol=1e-4)


def test_gaussian_baseline_matches_target_spectrum():
    """Non-periodic dust-like patches (cut from larger power-law fields): the GRF coloured by
    gaussian_power_2d has their windowed binned spectrum within 4 sigma of sampling error."""
    rng = np.random.default_rng(1)
    big, n, pix = 128, 32, 0.25
    k = np.hypot(*np.meshgrid(np.fft.fftfreq(big), np.fft.fftfreq(big), indexing="ij"))
    amp = np.where(k > 0, np.maximum(k, 1e-3) ** -1.4, 0.0)
    fields = np.fft.ifft2(np.fft.fft2(rng.standard_normal((20, big, big))) * amp).real
    patches = fields.reshape(20, 4, n, 4, n).transpose(0, 1, 3, 2, 4).reshape(-1, n, n)  # 320 patches
    grf = gaussian_baseline(gaussian_power_2d(patches), 2000, rng, mean=patches.mean())
    edges = default_ell_edges(n, pix)
    _, cl_data = flat_power_spectrum(patches, pix, edges)
    _, cl_grf = flat_power_spectrum(grf, pix, edges)
    sem = np.hypot(cl_data.std(0) / np.sqrt(len(cl_data)), cl_grf.std(0) / np.sqrt(len(cl_grf)))
    assert np.all(np.abs(cl_grf.mean(0) - cl_data.mean(0)) < 4 * sem)
    assert abs(grf.var() / patches.var() - 1) < 0.1
    moments = pooled_moments(grf, n_boot=20)
    assert abs(moments["skewness"]) < 0.05 and abs(moments["kurtosis"]) < 0.1


def test_small_helpers():
    x = np.random.default_rng(0).standard_normal((10, 8, 8))
    edges = np.linspace(-6, 6, 25)
    density, _ = np.histogram(x, edges, density=True)
    assert np.allclose(patch_histograms(x, edges).mean(0), density)
    ell = np.array([100.0, 200.0, 300.0])
    assert first_crossing(ell, np.array([0.05, 0.15, 0.5])) == pytest.approx(150.0)
    assert first_crossing(ell, np.array([0.2, 0.3, 0.5])) == 100.0
    assert first_crossing(ell, np.array([0.01, 0.02, 0.05])) is None


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
