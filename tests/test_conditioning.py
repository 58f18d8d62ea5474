"""Stage 8 conditioning on real data: test-split patches and a real Planck sky region.

A VAE of the default architecture is trained in a module fixture on the real training split
(2 epochs from the probabilistic-PCA initialisation, no flow prior; ~10 s of the module's ~60 s
on one thread). After 2 epochs it is essentially the PPCA model. Observations: 8 test-split
patches, seeded masks of random 4x4-pixel (1 degree) blocks covering 30 % / 50 % of the pixels,
white noise at 10 % of each patch's rms.

Numbers measured with this fixture are quoted next to each bound.
"""

import math
import warnings

import healpy as hp
import numpy as np
import pysm3
import pysm3.units as u
import pytest
import torch

from pysm_vaedust import train as train_module
from pysm_vaedust.component import VAEDust
from pysm_vaedust.conditioning import (
    BlendOperator,
    ConditionedVAEDust,
    FittedLatents,
    SkyForwardModel,
    StationaryGaussian,
    block_mask,
    condition_sky,
    conditional_mean,
    forward_model,
    map_fit,
    posterior_samples,
)
from pysm_vaedust.data import MJysr_to_uK_RJ, load_dust_map, shared_data_dir
from pysm_vaedust.tiling import blend_torch
from pysm_vaedust.weights import load_weights

torch.set_num_threads(1)

N_PATCHES = 8
FRACTIONS = (0.3, 0.5)
NOISE_FRACTION = 0.1


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(Weights, {split: patches}, weights path) of a small VAE trained on the real data."""
    out = tmp_path_factory.mktemp("vae")
    cfg = train_module.TrainConfig(epochs=2, prior_epochs=0, threads=1,
                                   checkpoint_dir=str(out / "ckpt"), output=str(out / "w.h5"))
    sets, info = train_module.build_datasets(cfg)
    with pytest.MonkeyPatch.context() as mp:  # reuse the datasets instead of cutting them twice
        mp.setattr(train_module, "build_datasets", lambda c, progress=True: (sets, info))
        path = train_module.train(cfg, progress=False)
    return load_weights(path), sets, path


@pytest.fixture(scope="module")
def observations(trained):
    """Per masked fraction: truth x, data d, mask, sigma (B, 1, n, n) of real test patches."""
    _, sets, _ = trained
    test = sets["test"]
    x = test[np.linspace(0, len(test) - 1, N_PATCHES).astype(int)]
    out = {}
    for k, frac in enumerate(FRACTIONS):
        rng = np.random.default_rng(100 + k)
        mask = np.stack([block_mask(frac, rng) for _ in range(N_PATCHES)])[:, None]
        sigma = NOISE_FRACTION * x.flatten(1).std(1)[:, None, None, None].numpy() * np.ones(mask.shape)
        d = x.numpy() + rng.standard_normal(x.shape) * sigma
        out[frac] = (x, d.astype(np.float32), mask, sigma)
    return out


@pytest.fixture(scope="module")
def fits(trained, observations):
    weights, _, _ = trained
    return {frac: map_fit(weights.vae, d, mask, sigma, n_restarts=3, generator=torch.Generator().manual_seed(1))
            for frac, (x, d, mask, sigma) in observations.items()}


@pytest.fixture(scope="module")
def wiener(trained, observations):
    """Wiener filters of the stationary Gaussian baselines: lag autocovariance and periodic."""
    _, sets, _ = trained
    models = {"acf": StationaryGaussian.fit(sets["train"]),
              "periodic": StationaryGaussian.fit(sets["train"], periodic=True)}
    return {frac: {name: g.condition(d, mask, sigma)[0] for name, g in models.items()}
            for frac, (x, d, mask, sigma) in observations.items()}


def hole_mse(pred, x, mask):
    return float(((pred - x).numpy()[~mask] ** 2).mean())


# ----------------------------------------------------------------------------- bad input

def test_bad_patch_input_raises(trained):
    vae = trained[0].vae
    d = np.zeros((32, 32), np.float32)
    m = np.ones((32, 32), bool)
    with pytest.raises(ValueError, match="mask has shape"):
        map_fit(vae, d, m[:16], 0.1)
    with pytest.raises(ValueError, match="observation has shape"):
        map_fit(vae, np.zeros((16, 16)), np.ones((16, 16), bool), 0.1)
    with pytest.raises(ValueError, match="sigma=0.0"):
        map_fit(vae, d, m, 0.0)
    with pytest.raises(ValueError, match="sigma=-1.0"):
        posterior_samples(vae, d, m, -1.0)
    bad_sigma = np.full((32, 32), 0.1)
    bad_sigma[3, 4] = 0
    with pytest.raises(ValueError, match=r"sigma has 1 non-positive .* \(3, 4\)"):
        map_fit(vae, d, m, bad_sigma)
    bad_d = d.copy()
    bad_d[5, 6] = np.nan
    with pytest.raises(ValueError, match=r"1 NaN/inf values at observed pixels \(first at \(5, 6\)\)"):
        map_fit(vae, bad_d, m, 0.1)
    # NaN where the mask is False is fine (those pixels are not observed)
    m_hole = m.copy()
    m_hole[5, 6] = False
    fit = map_fit(vae, bad_d, m_hole, 0.1, n_restarts=1, steps=5)
    assert torch.isfinite(fit.z_map).all()
    with pytest.raises(ValueError, match="another observation"):
        posterior_samples(vae, bad_d + 1.0, m_hole, 0.1, n_samples=2, fit=fit)
    with pytest.raises(ValueError, match="another observation"):
        posterior_samples(vae, bad_d, m_hole, 0.2, n_samples=2, fit=fit)
    with pytest.raises(ValueError, match="method="):
        map_fit(vae, d, m, 0.1, method="newton")


def test_bad_sky_input_raises(trained):
    path = trained[2]
    nside = 8
    npix = hp.nside2npix(nside)
    obs, mask, noise = np.full(npix, 100.0), np.ones(npix, bool), np.full(npix, 1.0)
    with pytest.raises(ValueError, match="mask has shape"):
        condition_sky(obs, mask[:-1], noise, 545 * u.GHz, nside, weights=path)
    with pytest.raises(ValueError, match="observed_map has shape"):
        condition_sky(obs[:-1], mask, noise, 545 * u.GHz, nside, weights=path)
    with pytest.raises(ValueError, match="noise has 1 non-positive"):
        condition_sky(obs, mask, np.where(np.arange(npix) == 7, -1.0, 1.0), 545 * u.GHz, nside, weights=path)
    bad = obs.copy()
    bad[3] = np.nan
    with pytest.raises(ValueError, match="observed_map has 1 non-finite"):
        condition_sky(bad, mask, noise, 545 * u.GHz, nside, weights=path)
    with pytest.raises(TypeError, match="Quantity"):
        condition_sky(obs, mask, noise, 545.0, nside, weights=path)


# ----------------------------------------------------------------------------- patch level

def test_map_fit_converges_from_every_start(trained, fits):
    for fit in fits.values():
        assert fit.restart_labels == ["zero", "encoder", "linear"]
        assert fit.restart_losses.shape == (3, N_PATCHES)
        assert torch.equal(fit.best_restart, fit.restart_losses.argmin(0))
        assert fit.converged.all(), fit.grad_norm
        # all starts reach the same optimum (the model is near-linear): measured spread < 1e-4
        spread = fit.restart_losses.max(0).values - fit.restart_losses.min(0).values
        assert float(spread.max()) < 0.5
        # the final refit holds the noise modulation at the best restart's latents, not at z = 0
        assert fit.log_amplitude is not None and fit.log_amplitude.shape == (N_PATCHES, 1, 32, 32)


def test_adam_reaches_the_lbfgs_optimum(trained, observations, fits):
    vae = trained[0].vae
    x, d, mask, sigma = observations[0.3]
    adam = map_fit(vae, d[:2], mask[:2], sigma[:2], n_restarts=1, steps=300, method="adam", lr=0.05)
    # measured: within 1e-4 of the L-BFGS loss (~530)
    assert torch.all(adam.loss < fits[0.3].loss[:2] + 1.0)


@pytest.mark.parametrize("frac", FRACTIONS)
def test_inpainting_against_gaussian_wiener(trained, observations, fits, wiener, frac):
    """Masked-region MSE of the VAE estimate vs the stationary-Gaussian Wiener filters.

    Measured (8 patches): ratio to the lag-autocovariance Wiener filter 1.10 (30 %) / 1.07 (50 %),
    to the periodic 2D-power-spectrum one 0.94 / 1.02. A PPCA-like VAE loses to the stationary
    Gaussian: its 1024 x 1024 covariance is estimated from ~1000 patches (x 8 dihedral copies),
    the stationary one pools every pixel pair of every patch.
    """
    x, d, mask, sigma = observations[frac]
    vae_mse = hole_mse(conditional_mean(trained[0].vae, fits[frac]), x, mask)
    acf_mse = hole_mse(wiener[frac]["acf"], x, mask)
    per_mse = hole_mse(wiener[frac]["periodic"], x, mask)
    prior_mean_mse = float((x.numpy()[~mask] ** 2).mean())   # filling the holes with the prior mean, 0
    print(f"\ninpainting {frac:.0%}: masked MSE VAE {vae_mse:.4f}, Wiener(acf) {acf_mse:.4f} "
          f"(ratio {vae_mse / acf_mse:.3f}), Wiener(periodic) {per_mse:.4f} (ratio {vae_mse / per_mse:.3f}), "
          f"zero fill {prior_mean_mse:.4f}")
    assert vae_mse < 0.9 * prior_mean_mse    # measured 0.78 (30 %), 0.79 (50 %)
    assert vae_mse / acf_mse < 1.25


@pytest.mark.xfail(reason="the fixture VAE (2 epochs from PPCA, ~linear) is a worse prior than the "
                          "stationary Gaussian: ratios 1.07-1.10 measured; expected to pass only with a "
                          "model trained well beyond the PPCA start; strict, so a pass is reported", strict=True)
@pytest.mark.parametrize("frac", FRACTIONS)
def test_inpainting_beats_gaussian_wiener(trained, observations, fits, wiener, frac):
    x, d, mask, sigma = observations[frac]
    assert hole_mse(conditional_mean(trained[0].vae, fits[frac]), x, mask) < hole_mse(wiener[frac]["acf"], x, mask)


def test_denoising_lowers_the_error(trained, observations):
    vae = trained[0].vae
    x, d, mask, sigma = observations[0.3]
    full = np.ones_like(mask)
    noisy = d                                  # the noise is drawn at every pixel
    fit = map_fit(vae, noisy, full, sigma, n_restarts=2)
    est = conditional_mean(vae, fit)
    err_est = float((est - x).square().mean())
    err_noisy = float(((torch.from_numpy(noisy) - x) ** 2).mean())
    print(f"\ndenoising: MSE noisy {err_noisy:.5f}, VAE estimate {err_est:.5f} (ratio {err_est / err_noisy:.3f})")
    assert err_est < err_noisy


def test_posterior_coverage(trained, observations, fits):
    """68 % intervals of Laplace constrained realizations cover the truth 55-80 % of the time.

    Measured: 0.69 / 0.71 (all pixels), 0.74 / 0.77 (masked), 0.67 / 0.65 (observed) at 30 / 50 %."""
    vae = trained[0].vae
    rates, skews = [], []
    for frac in FRACTIONS:
        x, d, mask, sigma = observations[frac]
        post = posterior_samples(vae, d, mask, sigma, n_samples=64, fit=fits[frac],
                                 generator=torch.Generator().manual_seed(5))
        lo, hi = post.interval(0.68)
        inside = ((x >= lo) & (x <= hi)).numpy()
        rates.append((inside.mean(), inside[~mask].mean(), inside[mask].mean()))
        assert post.realizations.shape == (64, N_PATCHES, 1, 32, 32)
        assert torch.all(post.std > 0)
        # masked pixels keep the sky's skewed one-point distribution: the decoder-noise part of the
        # realizations, f(mu + e) - f(mu) + its data correction, standardised pixel by pixel
        noise = post.realizations - vae.decode_data(post.z.reshape(-1, post.z.shape[-1])).reshape(post.realizations.shape)
        noise = ((noise - noise.mean(0)) / noise.std(0)).numpy()[:, ~mask]
        skews.append(float((noise ** 3).mean()))
    print("\ncoverage (all, masked, observed):", [tuple(round(float(v), 3) for v in r) for r in rates],
          "skewness of the realizations in the holes:", [round(v, 2) for v in skews])
    assert min(skews) > 0.15   # measured 0.23 / 0.27; linearised Gaussian draws f'(mu) e give -0.03 / -0.01
    for all_px, masked, observed in rates:
        assert 0.55 <= all_px <= 0.80
        assert 0.55 <= masked <= 0.80
        assert 0.55 <= observed <= 0.80


def test_mala_refines_laplace(trained, observations, fits):
    vae = trained[0].vae
    x, d, mask, sigma = observations[0.5]
    fit = map_fit(vae, d[:2], mask[:2], sigma[:2], n_restarts=1)
    post = posterior_samples(vae, d[:2], mask[:2], sigma[:2], n_samples=16, method="mala", fit=fit,
                             mala_steps=20, generator=torch.Generator().manual_seed(2))
    assert 0.3 < post.acceptance <= 1.0          # measured 0.65
    lap = posterior_samples(vae, d[:2], mask[:2], sigma[:2], n_samples=16, fit=fit)
    ratio = float(post.std.mean() / lap.std.mean())
    assert 0.8 < ratio < 1.25                    # measured 1.02: Laplace is already close


def test_learned_prior_enters_as_its_density(trained, observations):
    """With a flow prior the objective is -2 log p_flow(z) + data term (not |eps|^2 in the flow's
    normals). A data-initialised flow (affine standardisation of the encoder means; couplings at
    their zero initialisation) is a Gaussian prior N(shift, scale^2), enough to check the path."""
    from pysm_vaedust.prior import LatentFlow

    vae, sets = trained[0].vae, trained[1]
    with torch.no_grad():
        flow = LatentFlow(vae.config.latent_dim, n_layers=2, hidden=32)
        flow.initialise(vae.encode(sets["train"])[0])
    flow.eval().requires_grad_(False)
    x, d, mask, sigma = observations[0.3]
    fit = map_fit(vae, d[:2], mask[:2], sigma[:2], n_restarts=2, prior=flow, noise_model="white")
    assert fit.converged.all()
    assert fit.data_term.precision is None  # white noise: the data term is the quadratic form below
    with torch.no_grad():
        prior_part = -2 * flow.log_prob(fit.z_map).double() - vae.config.latent_dim * math.log(2 * math.pi)
        sigma_dec2 = fit.sigma_dec2 * fit.log_amplitude.exp()  # white: modulated decoder-noise variance
        data_part = ((fit.mean - fit.data).square() * fit.mask / (fit.sigma2 + sigma_dec2)).double().sum((1, 2, 3))
    np.testing.assert_allclose(fit.loss.numpy(), (prior_part + data_part).numpy(), rtol=1e-5)
    post = posterior_samples(vae, d[:2], mask[:2], sigma[:2], n_samples=16, fit=fit)
    assert torch.isfinite(post.realizations).all() and post.fit.prior is flow


# ----------------------------------------------------------------------------- sky level

@pytest.fixture(scope="module")
def sky(trained):
    """Real Planck intensity at nside 64 (Galactic), a 12-degree disc observed with 1 % noise."""
    nside = 64
    dust = load_dust_map(shared_data_dir() / "planck_ebv_nside256_ring_icrs.fits.gz")
    vec = np.array(hp.pix2vec(nside, np.arange(hp.nside2npix(nside))))
    vec_icrs = hp.Rotator(coord=["G", "C"])(vec)
    obs = hp.get_interp_val(dust.intensity, *hp.vec2ang(vec_icrs.T)) * MJysr_to_uK_RJ(545.0)
    centre = hp.ang2vec(60.0, 60.0, lonlat=True)
    mask = np.zeros(len(obs), bool)
    mask[hp.query_disc(nside, centre, np.radians(12.0))] = True
    distance = np.degrees(np.arccos(np.clip(centre @ vec, -1, 1)))
    noise = 0.01 * obs
    with pytest.warns(UserWarning, match="touch no observed pixel"):
        fitted = condition_sky(obs, mask, noise, 545 * u.GHz, nside, weights=trained[2], seed=0)
    return nside, obs, mask, noise, distance, fitted


def test_conditioned_sky_matches_where_observed_and_varies_elsewhere(trained, sky, tmp_path):
    nside, obs, mask, noise, distance, fitted = sky
    path = trained[2]
    fitted.save(tmp_path / "fit.h5")
    loaded = FittedLatents.load(tmp_path / "fit.h5")
    assert list(tmp_path.iterdir()) == [tmp_path / "fit.h5"]    # atomic write: no temporary left
    components = [ConditionedVAEDust(loaded, nside=nside, seed=seed, weights=path) for seed in (1, 2)]
    maps = [c.get_emission(545 * u.GHz)[0].value for c in components]
    sky_map = pysm3.Sky(nside=nside, component_objects=[components[0]]).get_emission(545 * u.GHz)[0].value
    np.testing.assert_allclose(sky_map, maps[0], rtol=1e-12)   # usable in pysm3.Sky like VAEDust
    prior = VAEDust(nside=nside, seed=1, weights=path).get_emission(545 * u.GHz)[0].value
    chi = [float(np.sqrt(np.mean(((m - obs)[mask] / noise[mask]) ** 2))) for m in maps + [prior]]
    far = distance > 30
    spread = float(np.sqrt(np.mean(((maps[0] - maps[1])[far] / maps[1][far]) ** 2)))
    print(f"\nsky: rms (I - obs)/sigma where observed: conditioned {chi[0]:.2f}, {chi[1]:.2f}; prior {chi[2]:.1f}; "
          f"relative rms difference of two seeds beyond 30 deg: {spread:.3f}")
    # measured: 0.96 (a constrained realization differs from the data by ~the noise), prior 16
    assert chi[0] < 2 and chi[1] < 2
    assert chi[2] > 5
    assert spread > 0.05                    # measured 0.18: the prior's small-scale scatter
    np.testing.assert_array_equal(maps[0][far], prior[far])   # far from the data: the prior draw of seed 1
    assert loaded.metadata["chi2_per_pixel"] < 3
    assert loaded.as_dict()[0].keys() == set(int(t) for t in fitted.tile_ids)


def test_forward_model_is_what_vaedust_renders(trained, sky):
    """SkyForwardModel (sparse), forward_model (tiling.blend_torch) and the rendered component
    agree at the observed pixels, and gradients reach the latents."""
    nside, obs, mask, noise, distance, fitted = sky
    path = trained[2]
    component = ConditionedVAEDust(fitted, nside=nside, seed=3, weights=path)
    pixels = np.flatnonzero(mask)
    fwd = SkyForwardModel(component, fitted.tile_ids, pixels)
    z = torch.from_numpy(fitted.z).requires_grad_(True)
    e = torch.from_numpy(fitted.noise)
    intensity = fwd.intensity(z, e)
    np.testing.assert_allclose(intensity.detach().numpy(), component.reference_map()[pixels], rtol=2e-5)
    via_blend = forward_model(fwd.vae, z, fwd.footprints, len(pixels), fwd.level, noise=e[:, None])
    np.testing.assert_allclose(via_blend.detach().numpy(), fwd.delta(z, e).detach().numpy(), atol=2e-5)
    intensity.sum().backward()
    assert z.grad is not None and torch.isfinite(z.grad).all() and z.grad.abs().sum() > 0
    assert isinstance(fwd.operator, BlendOperator)


def test_fitted_latents_file_errors(tmp_path):
    bad = tmp_path / "bad.h5"
    bad.write_bytes(b"not hdf5")
    with pytest.raises(ValueError, match="not a pysm_vaedust fitted-latents file"):
        FittedLatents.load(bad)
    with pytest.raises(FileNotFoundError):
        FittedLatents.load(tmp_path / "missing.h5")
    with pytest.raises(ValueError, match="z has shape"):
        FittedLatents(tile_ids=np.arange(3), z=np.zeros((2, 4)))
