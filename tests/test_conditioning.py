"""Stage 8 conditioning with the tiny conditional model of conftest (`tiny_weights`).

Patch level: conditions of real level-0 tiles (the bundled template), observations drawn from
the model itself, so that the posterior the samplers must reproduce is the model's own; a
decoder made affine by construction (`AffineDecoder`) gives an exactly Gaussian posterior to
check the MAP, the Laplace precision, MALA and the coverage of the draws against. Sky level: a
realization of the same model at nside 128, observed in a 12-degree disc with 0.2 % noise, fitted
and rendered end to end.

Numbers measured with these fixtures are quoted next to the bounds.
"""

import copy
import warnings

import h5py
import healpy as hp
import numpy as np
import pysm3
import pysm3.units as u
import pytest
import torch
from torch.nn import functional as F

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
    decoder_noise_covariance,
    decoder_pixel_variance,
    forward_model,
    laplace_precision,
    latent_jacobian,
    map_fit,
    posterior_samples,
)
from pysm_vaedust.model import radial_bins, up
from pysm_vaedust.posterior import StructureFitting, noise_gain
from pysm_vaedust.weights import load_weights, save_weights
from pysm_vaedust.wiener import ConditionalGaussian

torch.set_num_threads(1)

N_PATCHES = 4
SKY_NSIDE = 128
SKY_NOISE = 0.002   # relative


@pytest.fixture(scope="module")
def weights(tiny_weights):
    """The tiny model with a decoder-noise gain that differs from patch to patch on its finer half
    of radial bins, so that every per-patch covariance below is exercised."""
    w = load_weights(tiny_weights)
    with torch.no_grad():
        w.vae.noise_gain.copy_(torch.tensor([0.2, 0.6, 0.4]))
        w.vae.noise_gain_range.copy_(torch.tensor([[-5.0, 5.0], [-5.0, 5.0]]))
        bins = w.vae.noise_gain_bins
        bins.copy_((torch.arange(len(bins)) >= len(bins) // 2).float())
    return w


@pytest.fixture(scope="module")
def conditions(tiny_weights):
    """Conditions (N_PATCHES, 2, n/2, n/2) of level-0 tiles spread over the sky, from the template."""
    model = VAEDust(nside=32, weights=tiny_weights, device="cpu")
    level = model.renderer.levels(32)[0]
    ids = np.linspace(0, level.n_tiles - 1, N_PATCHES).astype(int)
    return torch.from_numpy(model.renderer.conditions(level, model.log_template, ids))


@pytest.fixture(scope="module")
def masks():
    rng = np.random.default_rng(3)
    return np.stack([block_mask(0.3, rng) for _ in range(N_PATCHES)])[:, None]


def noise_covariance(vae, c) -> torch.Tensor:
    """(n^2, n^2) covariance of vae.decoder_noise on (2n)^2 white noise (not periodic) of a patch of
    condition c (1, 2, m, m), built from its action on unit vectors."""
    n = vae.config.npix
    basis = torch.eye(4 * n * n, dtype=torch.float32).reshape(-1, 1, 2 * n, 2 * n)
    a = vae.decoder_noise(basis, c.expand(len(basis), -1, -1, -1)).reshape(4 * n * n, n * n).double()
    return a.T @ a   # row k of a: the response to unit vector k


def exact_loss(vae, fit) -> torch.Tensor:
    """|eps|^2 + r_o^T (C_oo + diag sigma^2)^-1 r_o of a fit, computed independently (dense)."""
    out = []
    for i in range(len(fit.eps_map)):
        o = fit.mask[i].flatten() > 0
        r = (fit.data[i] - vae.decode(fit.eps_map[i:i + 1], fit.condition[i:i + 1])[0]).flatten()[o].double()
        cov = noise_covariance(vae, fit.condition[i:i + 1])
        k = cov[o][:, o] + torch.diag(fit.sigma2[i].flatten()[o].double())
        out.append(fit.eps_map[i].double().square().sum() + r @ torch.linalg.solve(k, r))
    return torch.stack(out)


class AffineDecoder(torch.nn.Module):
    """The tiny model with its decoder mean replaced by mu(eps, c) = W eps + up(c_0): W the tiny
    decoder's Jacobian at eps = 0 (first condition) times `gain`, so that the data constrain
    many directions; same decoder noise. p(eps | d, c) is exactly Gaussian."""

    def __init__(self, vae, c, gain: float = 10.0):
        super().__init__()
        self.inner, self.config, self.latent_dim = vae, vae.config, vae.latent_dim
        self.register_buffer("weight", gain * latent_jacobian(vae, torch.zeros(1, vae.latent_dim), c[:1])[0])

    @property
    def device(self):
        return self.inner.device

    def decode(self, eps, c):
        n = self.config.npix
        return (eps @ self.weight.T).reshape(-1, 1, n, n) + F.interpolate(c[:, :1], scale_factor=2)

    def encode(self, x, c):
        return torch.zeros(len(x), self.latent_dim)

    def noise_logvar(self, torus=1):
        return self.inner.noise_logvar(torus)

    def log_noise_gain(self, c):
        return self.inner.log_noise_gain(c)

    def noise_gain_mask(self, torus=1):
        return self.inner.noise_gain_mask(torus)

    def decoder_noise(self, white, c):
        return self.inner.decoder_noise(white, c)


@pytest.fixture(scope="module")
def affine(weights, conditions, masks):
    """(model, truth eps, truth x, d, sigma, exact posterior means (B, D) and precisions (B, D, D))."""
    model = AffineDecoder(weights.vae, conditions)
    gen = torch.Generator().manual_seed(11)
    eps = torch.randn((N_PATCHES, model.latent_dim), generator=gen)
    x = model.decode(eps, conditions) + model.decoder_noise(torch.randn((N_PATCHES, 1, 64, 64), generator=gen), conditions)
    sigma = 0.05
    d = (x + sigma * torch.randn(x.shape, generator=gen)).numpy()
    w = model.weight.double()
    means, precisions = [], []
    for i in range(N_PATCHES):
        cov = noise_covariance(weights.vae, conditions[i:i + 1])
        o = torch.from_numpy(masks[i].flatten())
        k_inv = torch.linalg.inv(cov[o][:, o] + sigma**2 * torch.eye(int(o.sum()), dtype=torch.float64))
        b = model.decode(torch.zeros(1, model.latent_dim), conditions[i:i + 1]).flatten()[o].double()
        prec = torch.eye(model.latent_dim, dtype=torch.float64) + w[o].T @ k_inv @ w[o]
        resid = torch.from_numpy(d[i].flatten()[o.numpy()]).double() - b
        means.append(torch.linalg.solve(prec, w[o].T @ k_inv @ resid))
        precisions.append(prec)
    return model, eps, x, d, sigma, torch.stack(means), torch.stack(precisions)


def test_decoder_noise_covariance_is_not_periodic(weights, conditions):
    """The conditioning's decoder-noise covariance (times each patch's gain) is that of the
    (2n)^2-torus draws and does not couple opposite patch edges as the periodic draws do (a red
    spectrum: correlated neighbours)."""
    vae = copy.deepcopy(weights.vae)
    n = vae.config.npix
    with torch.no_grad():
        vae.decoder_logvar.copy_(-0.3 * torch.arange(len(vae.decoder_logvar), dtype=torch.float32))
    gains = noise_gain(vae, conditions)
    assert float(gains.max() / gains.min()) > 1.2        # the patches' gains differ
    c = conditions[:1]
    cov = decoder_noise_covariance(vae, float(gains[0]))
    torch.testing.assert_close(cov, noise_covariance(vae, c), rtol=1e-4, atol=1e-6)
    periodic = vae.decoder_noise(torch.eye(n * n).reshape(-1, 1, n, n), c.expand(n * n, -1, -1, -1))
    periodic = periodic.reshape(n * n, n * n).double()
    periodic = periodic.T @ periodic
    left, right, neighbour = 0, n - 1, 1                  # pixels (0, 0), (0, n - 1), (0, 1)
    assert abs(float(periodic[left, right] - periodic[left, neighbour])) < 1e-5    # wraps around
    assert abs(float(cov[left, right])) < 0.1 * abs(float(cov[left, neighbour]))
    assert float(cov[left, left]) == pytest.approx(decoder_pixel_variance(vae, float(gains[0])), rel=1e-5)
    with pytest.raises(ValueError, match="white noise of shape"):
        vae.decoder_noise(torch.zeros(1, 1, n + 1, n + 1), c)


def test_structure_fitting_recovers_the_large_scales(weights, masks):
    """With the condition's structure channel unknown, map_fit of StructureFitting on a full field
    drawn from that model recovers the structure far better than its prior mean; decode is
    mu(eps, [s, c_1]) + a up(s) + offset."""
    vae = weights.vae
    n, m = vae.config.npix, vae.config.condition_npix
    gen = torch.Generator().manual_seed(5)
    taper = torch.exp(-(radial_bins(m).float() / 3) ** 2)
    smooth = torch.fft.ifft2(torch.fft.fft2(torch.randn((300, 1, m, m), generator=gen)) * taper).real
    prior = StationaryGaussian.fit(smooth / smooth.std())
    fitting = StructureFitting(vae, prior, {"coarse_scale": 2.0, "log_scale": 1.0})
    assert fitting.latent_dim == vae.latent_dim + m * m + 1
    theta = torch.randn((N_PATCHES, fitting.latent_dim), generator=gen)
    c = torch.zeros(N_PATCHES, 2, m, m)
    c[:, 1] = 0.3
    s_true = fitting.structure(theta)
    with torch.no_grad():
        direct = (vae.decode(theta[:, :vae.latent_dim], torch.cat([s_true, c[:, 1:]], 1)) + 2.0 * up(s_true)
                  + fitting.offset_scale * theta[:, -1:, None, None])
        torch.testing.assert_close(fitting.decode(theta, c), direct)
        f = direct + vae.decoder_noise(torch.randn((N_PATCHES, 1, 2 * n, 2 * n), generator=gen), c)
    d = (f + 0.05 * torch.randn(f.shape, generator=gen)).numpy()
    fit = map_fit(fitting, d, masks, 0.05, c, n_restarts=3, steps=50)
    err_fit = float((fitting.structure(fit.eps_map) - s_true).square().mean())
    err_prior = float((s_true - prior.mean).square().mean())
    print(f"\nstructure mse: fitted {err_fit:.4f}, prior mean {err_prior:.4f}")
    assert err_fit < 0.1 * err_prior                     # measured 0.048 against 1.14
    with pytest.raises(ValueError, match="condition grid"):
        StructureFitting(vae, StationaryGaussian.fit(torch.zeros(3, 1, 8, 8)), {"coarse_scale": 1, "log_scale": 1})


# ----------------------------------------------------------------------------- bad input

def test_bad_patch_input_raises(weights, conditions):
    vae, c = weights.vae, conditions[0]
    d = np.zeros((32, 32), np.float32)
    m = np.ones((32, 32), bool)
    with pytest.raises(ValueError, match="mask has shape"):
        map_fit(vae, d, m[:16], 0.1, c)
    with pytest.raises(ValueError, match="observation has shape"):
        map_fit(vae, np.zeros((16, 16)), np.ones((16, 16), bool), 0.1, c)
    with pytest.raises(ValueError, match="sigma=0.0"):
        map_fit(vae, d, m, 0.0, c)
    with pytest.raises(ValueError, match="sigma=-1.0"):
        posterior_samples(vae, d, m, -1.0, c)
    with pytest.raises(ValueError, match="sigma=nan"):
        map_fit(vae, d, m, float("nan"), c)
    bad_sigma = np.full((32, 32), 0.1)
    bad_sigma[3, 4] = 0
    with pytest.raises(ValueError, match=r"sigma has 1 non-positive .* \(3, 4\)"):
        map_fit(vae, d, m, bad_sigma, c)
    bad_d = d.copy()
    bad_d[5, 6] = np.nan
    with pytest.raises(ValueError, match=r"1 NaN/inf values at observed pixels \(first at \(5, 6\)\)"):
        map_fit(vae, bad_d, m, 0.1, c)
    with pytest.raises(ValueError, match=r"condition c has shape \(2, 2, 16, 16\)"):
        map_fit(vae, d, m, 0.1, conditions[:2])
    bad_c = c.clone()
    bad_c[0, 1, 2] = float("nan")
    with pytest.raises(ValueError, match="condition c has 1 NaN"):
        map_fit(vae, d, m, 0.1, bad_c)
    with pytest.raises(ValueError, match="method="):
        map_fit(vae, d, m, 0.1, c, method="newton")
    # NaN where the mask is False is fine (those pixels are not observed)
    m_hole = m.copy()
    m_hole[5, 6] = False
    fit = map_fit(vae, bad_d, m_hole, 0.1, c, n_restarts=1, steps=5)
    assert torch.isfinite(fit.eps_map).all()
    for other in ((bad_d + 1.0, m_hole, 0.1, c), (bad_d, m_hole, 0.2, c), (bad_d, m_hole, 0.1, conditions[1])):
        with pytest.raises(ValueError, match="another observation"):
            posterior_samples(vae, *other, n_samples=2, fit=fit)
    # a patch with no observed pixel: its posterior is the prior, with a warning
    with pytest.warns(UserWarning, match="1 patch\\(es\\) have no observed pixel"):
        empty = map_fit(vae, d, np.zeros_like(m), 0.1, c, n_restarts=1)
    assert float(empty.eps_map.abs().max()) < 1e-3


def test_bad_sky_input_raises(tiny_weights):
    nside = 8
    npix = hp.nside2npix(nside)
    obs, mask, noise = np.full(npix, 100.0), np.ones(npix, bool), np.full(npix, 1.0)
    freq = 545 * u.GHz
    with pytest.raises(ValueError, match="mask has shape"):
        condition_sky(obs, mask[:-1], noise, freq, nside, weights=tiny_weights)
    with pytest.raises(ValueError, match="observed_map has shape"):
        condition_sky(obs[:-1], mask, noise, freq, nside, weights=tiny_weights)
    with pytest.raises(ValueError, match="noise has 1 non-positive"):
        condition_sky(obs, mask, np.where(np.arange(npix) == 7, -1.0, 1.0), freq, nside, weights=tiny_weights)
    with pytest.raises(ValueError, match="noise has 1 non-positive or non-finite"):
        condition_sky(obs, mask, np.where(np.arange(npix) == 7, np.nan, 1.0), freq, nside, weights=tiny_weights)
    bad = obs.copy()
    bad[3] = np.nan
    with pytest.raises(ValueError, match="observed_map has 1 non-finite"):
        condition_sky(bad, mask, noise, freq, nside, weights=tiny_weights)
    with pytest.raises(ValueError, match="mask selects no observed pixel"):
        condition_sky(obs, np.zeros(npix, bool), noise, freq, nside, weights=tiny_weights)
    with pytest.raises(TypeError, match="no units"):
        condition_sky(obs, mask, noise, 545.0, nside, weights=tiny_weights)


# ----------------------------------------------------------------------------- patch level, tiny model

def test_map_fit_follows_the_data(weights, conditions, masks):
    """Decoder means of the model observed with little noise: the MAP beats the truth's objective
    and the prior mean's by far and fits the observed pixels to the noise level."""
    vae, c = weights.vae, conditions
    gen = torch.Generator().manual_seed(1)
    eps_true = torch.randn((N_PATCHES, vae.latent_dim), generator=gen)
    truth = vae.decode(eps_true, c)
    sigma = 0.02          # the latents move the tiny decoder's mean by ~0.03 rms
    d = (truth + sigma * torch.randn(truth.shape, generator=gen)).numpy()
    fit = map_fit(vae, d, masks, sigma, c, n_restarts=3, decoder_noise=False)
    assert fit.restart_labels == ["zero", "encoder", "linear"] and fit.noise_model == "none"
    assert torch.equal(fit.best_restart, fit.restart_losses.argmin(0))
    assert fit.converged.all(), fit.grad_norm
    spread = fit.restart_losses.max(0).values - fit.restart_losses.min(0).values
    assert float(spread.max()) < 0.1                        # measured < 1e-3: all starts reach one optimum
    m = torch.from_numpy(masks)
    with torch.no_grad():
        at_truth = eps_true.square().sum(1) + (fit.data - truth).square().mul(m).sum((1, 2, 3)) / sigma**2
        prior_mean = vae.decode(torch.zeros(N_PATCHES, vae.latent_dim), c)
        at_zero = (fit.data - prior_mean).square().mul(m).sum((1, 2, 3)) / sigma**2
    assert torch.all(fit.loss < at_zero / 2)                    # measured 0.24-0.31
    assert torch.all(fit.loss < at_truth)                        # the MAP beats the truth
    chi2 = ((fit.mean - fit.data).square() * m).sum() / m.sum() / sigma**2
    assert 0.3 < float(chi2) < 1.2                               # measured 0.6
    hole = torch.from_numpy(~masks)
    assert (fit.mean - truth)[hole].square().mean() < 0.5 * (prior_mean - truth)[hole].square().mean()


def test_exact_and_white_data_terms(weights, conditions, masks):
    """The 'exact' loss is |eps|^2 + r^T (C_oo + sigma^2)^-1 r (checked against a dense solve
    with the noise covariance built from vae.decoder_noise), the 'white' one
    |eps|^2 + sum r^2 / (sigma^2 + sigma_dec^2); the conditional mean follows the observed pixels."""
    vae, c = weights.vae, conditions
    x = vae.sample(c, generator=torch.Generator().manual_seed(2))
    d = (x + 0.05 * torch.randn(x.shape, generator=torch.Generator().manual_seed(3))).numpy()
    fit = map_fit(vae, d, masks, 0.05, c, n_restarts=2)
    assert fit.converged.all() and fit.data_term.precision is not None
    np.testing.assert_allclose(fit.loss.numpy(), exact_loss(vae, fit).numpy(), rtol=1e-4)
    white = map_fit(vae, d, masks, 0.05, c, n_restarts=1, noise_model="white")
    assert white.data_term.precision is None
    pixel_variance = torch.stack([torch.diagonal(noise_covariance(vae, c[i:i + 1])).mean() for i in range(len(c))])
    torch.testing.assert_close(white.sigma_dec2, pixel_variance, rtol=1e-5, atol=0)
    with torch.no_grad():
        resid = (white.mean - white.data).square() * white.mask / (white.sigma2 + white.sigma_dec2[:, None, None, None])
    np.testing.assert_allclose(white.loss.numpy(), (white.eps_map.double().square().sum(1)
                                                    + resid.double().sum((1, 2, 3))).numpy(), rtol=1e-5)
    m = torch.from_numpy(masks)
    estimate = conditional_mean(vae, fit)
    err_mean = float(((fit.mean - fit.data) * m).square().sum() / m.sum())
    err_estimate = float(((estimate - fit.data) * m).square().sum() / m.sum())
    assert err_estimate < 0.1 * err_mean          # measured 0.02: the decoder noise explains the residual
    hole = torch.from_numpy(~masks)
    assert float((estimate - x)[hole].square().mean()) < float((fit.mean - x)[hole].square().mean())


def test_adam_reaches_the_lbfgs_optimum(weights, conditions, masks):
    vae = weights.vae
    x = vae.sample(conditions[:2], generator=torch.Generator().manual_seed(4)).numpy()
    lbfgs = map_fit(vae, x, masks[:2], 0.1, conditions[:2], n_restarts=1, noise_model="white")
    adam = map_fit(vae, x, masks[:2], 0.1, conditions[:2], n_restarts=1, steps=150, method="adam", lr=0.05,
                   noise_model="white")
    assert torch.all(adam.loss < lbfgs.loss + 0.5)      # measured within 1e-4 of ~650


def test_mala_on_the_tiny_model(weights, conditions, masks):
    vae = weights.vae
    x = vae.sample(conditions[:2], generator=torch.Generator().manual_seed(5)).numpy()
    fit = map_fit(vae, x, masks[:2], 0.05, conditions[:2], n_restarts=1)
    post = posterior_samples(vae, x, masks[:2], 0.05, conditions[:2], n_samples=16, method="mala", fit=fit,
                             mala_steps=20, generator=torch.Generator().manual_seed(6))
    assert 0.3 < post.acceptance <= 1.0                  # measured 0.58
    lap = posterior_samples(vae, x, masks[:2], 0.05, conditions[:2], n_samples=16, fit=fit)
    ratio = float(post.std.mean() / lap.std.mean())
    assert 0.8 < ratio < 1.25                            # measured ~1: Laplace is already close
    assert post.realizations.shape == (16, 2, 1, 32, 32) and torch.isfinite(post.realizations).all()


# ----------------------------------------------------------------------------- patch level, exact Gaussian posterior

def test_affine_decoder_map_and_laplace_are_exact(affine, conditions, masks):
    model, _, _, d, sigma, mean, precision = affine
    fit = map_fit(model, d, masks, sigma, conditions, n_restarts=3)
    linear = fit.restart_labels.index("linear")
    assert torch.all(fit.restart_losses[linear] <= fit.restart_losses.min(0).values + 1e-3)
    np.testing.assert_allclose(fit.eps_map.numpy(), mean.numpy(), atol=2e-3)
    np.testing.assert_allclose(laplace_precision(model, fit).numpy(), precision.numpy(), rtol=1e-4, atol=1e-4)
    exact = laplace_precision(model, fit, hessian="exact")
    np.testing.assert_allclose(exact.numpy(), precision.numpy(), rtol=1e-3, atol=1e-2)


def informative_variances(eps, mean, precision, k: int = 8):
    """Sample variances / exact posterior variances along the k most constrained directions, and
    the squared Mahalanobis distances of the draws' mean, per patch."""
    out = []
    for i in range(len(precision)):
        vals, vecs = torch.linalg.eigh(precision[i])
        top = vecs[:, -k:]                                    # largest precision: variance 1 / vals
        proj = (eps[:, i].double() - mean[i]) @ top
        out.append(proj.var(0) * vals[-k:])
    return torch.stack(out)


@pytest.mark.parametrize("method", ["laplace", "mala"])
def test_affine_decoder_posterior_draws(affine, conditions, masks, method):
    """Draws of eps have the exact posterior's covariance along its best-constrained directions
    (variances there are ~1/50 of the prior's), and 68 % intervals of the realizations cover the
    truth x = mu + decoder noise at 68 %."""
    model, eps_true, x, d, sigma, mean, precision = affine
    n_samples = 256 if method == "laplace" else 64
    post = posterior_samples(model, d, masks, sigma, conditions, n_samples=n_samples, method=method,
                             mala_steps=30, generator=torch.Generator().manual_seed(7))
    ratios = informative_variances(post.eps, mean, precision)
    print(f"\n{method}: sample / exact variance along the constrained directions "
          f"{float(ratios.min()):.2f}..{float(ratios.max()):.2f}, acceptance {post.acceptance}")
    assert float(torch.linalg.eigvalsh(precision).max()) > 20    # measured 52: informative directions
    assert 0.75 < float(ratios.mean()) < 1.3 and float(ratios.max()) < 2.5 and float(ratios.min()) > 0.35
    if method == "mala":
        assert 0.4 < post.acceptance < 0.8                     # adapted towards 0.574
    lo, hi = post.interval(0.68)
    inside = ((x >= lo) & (x <= hi)).numpy()
    print(f"coverage of the realizations: all {inside.mean():.3f}, masked {inside[~masks].mean():.3f}")
    assert 0.6 < inside.mean() < 0.76 and 0.58 < inside[~masks].mean() < 0.78     # measured ~0.68


# ----------------------------------------------------------------------------- Gaussian baseline

def test_stationary_gaussian_on_a_known_gaussian(weights, conditions, masks):
    """Fitted on draws of the decoder noise of one condition (a known stationary Gaussian), the
    periodic model recovers its covariance and its constrained realizations cover held-out draws
    at 68 %."""
    vae, c = weights.vae, conditions[:1]
    gen = torch.Generator().manual_seed(8)
    draws = vae.decoder_noise(torch.randn((2000, 1, 32, 32), generator=gen), c.expand(2000, -1, -1, -1))
    g = StationaryGaussian.fit(draws, periodic=True)
    cov = noise_covariance(vae, c).numpy()
    assert np.abs(g.covariance() - cov).max() < 0.1 * cov.max()
    truth = vae.decoder_noise(torch.randn((N_PATCHES, 1, 32, 32), generator=gen), c.expand(N_PATCHES, -1, -1, -1))
    d = truth + 0.05 * torch.randn(truth.shape, generator=gen)
    mean, std, samples = g.condition(d.numpy(), masks, 0.05, n_samples=64, std=True)
    assert torch.all(std[torch.from_numpy(~masks)] > std[torch.from_numpy(masks)].mean())
    lo, hi = torch.quantile(samples, torch.tensor([0.16, 0.84]), dim=0)
    inside = ((truth >= lo) & (truth <= hi)).float().mean()
    assert 0.6 < float(inside) < 0.76


def test_conditional_gaussian_on_a_known_linear_model():
    """Pairs x = K * up(c_0) + b + white noise of known kernel K and offset b: the fit recovers
    the mean K * up(c_0) + b and the white residual; its Wiener filter is the prior mean m(c) at masked pixels and the
    precision-weighted mean of data and m(c) at observed ones; wrong conditions are refused."""
    n, count, radius, s_res, s_obs = 16, 400, 2, 0.3, 0.1
    gen = torch.Generator().manual_seed(4)
    c = torch.randn((count, 2, n // 2, n // 2), generator=gen, dtype=torch.float64)
    u = F.pad(F.interpolate(c[:, :1], scale_factor=2, mode="bilinear", align_corners=False), (radius,) * 4,
              mode="replicate")
    kernel = torch.randn((2 * radius + 1, 2 * radius + 1), generator=gen, dtype=torch.float64)
    clean = F.conv2d(u, kernel[None, None]) + 0.2                # conv2d is a correlation, as unfold
    x = clean + s_res * torch.randn(clean.shape, generator=gen, dtype=torch.float64)
    g = ConditionalGaussian.fit(x, c, radius=radius, pixel_fraction=1.0)
    # the mean, not the kernel: bilinear upsampling leaves some kernels nearly equivalent
    prior = g.mean_of(c[:2]).double()
    assert torch.allclose(prior, clean[:2], atol=0.05)                            # measured 0.015
    assert abs(g.offset - 0.2) < 0.02                                             # measured 0.001
    assert abs(g.residual.acf[n - 1, n - 1] - s_res**2) < 0.05 * s_res**2         # measured 0.4 %
    rng = np.random.default_rng(0)
    mask = np.stack([block_mask(0.3, rng, n, 4) for _ in range(2)])[:, None]
    d = (x[:2] + s_obs * torch.randn((2, 1, n, n), generator=gen, dtype=torch.float64)).numpy()
    mean, std, samples = g.condition(np.where(mask, d, np.nan), mask, s_obs, c[:2], n_samples=4, std=True)
    hole = torch.from_numpy(~mask)
    assert torch.allclose(mean.double()[hole], prior[hole], atol=0.1)   # white residual: the prior mean (0.05)
    var = g.residual.acf[n - 1, n - 1]
    blend = (var * torch.from_numpy(d) + s_obs**2 * prior) / (var + s_obs**2)
    assert torch.allclose(mean.double()[~hole], blend[~hole], atol=0.02)           # measured 0.005
    assert samples.shape == (4, 2, 1, n, n) and float(std[hole].mean()) > float(std[~hole].mean())
    with pytest.raises(ValueError, match="condition c has shape"):
        g.condition(d, mask, s_obs, c[:2, :, :4])
    with pytest.raises(ValueError, match="one per patch"):
        g.condition(d, mask, s_obs, c[:3])


# ----------------------------------------------------------------------------- sky level

@pytest.fixture(scope="module")
def sky(tiny_weights):
    """A realization (seed 5) of the tiny model's VAEDust at nside 128, a 12-degree disc observed
    with 0.2 % noise, and its constrained fit."""
    truth = VAEDust(nside=SKY_NSIDE, seed=5, weights=tiny_weights).get_emission(545 * u.GHz)[0].value
    vec = np.array(hp.pix2vec(SKY_NSIDE, np.arange(hp.nside2npix(SKY_NSIDE))))
    centre = hp.ang2vec(60.0, 60.0, lonlat=True)
    mask = np.zeros(len(truth), bool)
    mask[hp.query_disc(SKY_NSIDE, centre, np.radians(12.0))] = True
    distance = np.degrees(np.arccos(np.clip(centre @ vec, -1, 1)))
    noise = SKY_NOISE * truth
    obs = truth + noise * np.random.default_rng(0).standard_normal(len(truth))
    with pytest.warns(UserWarning, match="touch no observed pixel"):
        fitted = condition_sky(obs, mask, noise, 545 * u.GHz, SKY_NSIDE, weights=tiny_weights, seed=0)
    return obs, mask, noise, distance, fitted


def test_conditioned_sky_matches_where_observed_and_varies_elsewhere(tiny_weights, sky, tmp_path):
    obs, mask, noise, distance, fitted = sky
    fitted.save(tmp_path / "fit.h5")
    assert list(tmp_path.iterdir()) == [tmp_path / "fit.h5"]    # atomic write: no temporary left
    loaded = FittedLatents.load(tmp_path / "fit.h5")
    for name in ("tile_ids", "eps", "noise", "conditions"):
        np.testing.assert_array_equal(getattr(loaded, name), getattr(fitted, name))
    assert loaded.weights_sha256 == fitted.weights_sha256 and loaded.metadata == fitted.metadata
    components = [ConditionedVAEDust(tmp_path / "fit.h5", nside=SKY_NSIDE, seed=seed) for seed in (1, 2)]
    maps = [c.get_emission(545 * u.GHz)[0].value for c in components]
    sky_map = pysm3.Sky(nside=SKY_NSIDE, component_objects=[components[0]]).get_emission(545 * u.GHz)[0].value
    np.testing.assert_allclose(sky_map, maps[0], rtol=1e-12)   # usable in pysm3.Sky like VAEDust
    prior = VAEDust(nside=SKY_NSIDE, seed=1, weights=tiny_weights).get_emission(545 * u.GHz)[0].value
    chi = [float(np.sqrt(np.mean(((m - obs)[mask] / noise[mask]) ** 2))) for m in maps + [prior]]
    far = distance > 30
    spread = float(np.sqrt(np.mean(((maps[0] - maps[1])[far] / maps[1][far]) ** 2)))
    print(f"\nsky: rms (I - obs)/sigma where observed: conditioned {chi[0]:.2f}, {chi[1]:.2f}; prior {chi[2]:.1f}; "
          f"relative rms difference of two seeds beyond 30 deg: {spread:.3f}; fit {fitted.metadata['gauss_newton']}")
    assert chi[0] < 1.5 and chi[1] < 1.5                       # measured 1.0
    assert chi[2] > 5                                          # measured 6.0 (nside 128)
    assert spread > 0.005                                      # the prior's small-scale scatter, measured 0.012
    np.testing.assert_array_equal(maps[0][far], prior[far])   # far from the data: the prior draw of seed 1
    assert fitted.metadata["chi2_per_pixel"] < 2 < fitted.metadata["chi2_per_pixel_mean_only"]
    assert loaded.as_dict()[0].keys() == set(int(t) for t in fitted.tile_ids)


def test_forward_model_is_what_vaedust_renders(tiny_weights, sky):
    """SkyForwardModel (sparse), forward_model (tiling.blend_torch) and the rendered component
    agree at the observed pixels, and gradients reach the latents and the noise."""
    obs, mask, noise, distance, fitted = sky
    component = ConditionedVAEDust(fitted, nside=SKY_NSIDE, seed=3, weights=tiny_weights)
    pixels = np.flatnonzero(mask)
    fwd = SkyForwardModel(component, fitted.tile_ids, pixels)
    assert isinstance(fwd.operator, BlendOperator) and fwd.next_fwhm_deg == 0 and fwd.fine_variance == 0
    np.testing.assert_array_equal(fwd.conditions.numpy(), fitted.conditions)
    eps = torch.from_numpy(fitted.eps).requires_grad_(True)
    e = torch.from_numpy(fitted.noise).requires_grad_(True)
    intensity = fwd.intensity(eps, e)
    np.testing.assert_allclose(intensity.detach().numpy(), component.reference_map()[pixels], rtol=2e-5)
    via_blend = forward_model(fwd.vae, eps, fwd.conditions, fwd.level, fwd.normalisation, noise=e,
                              resampler=fwd.resampler, fp=fwd.footprints, n_out=len(pixels))
    np.testing.assert_allclose(via_blend.detach().numpy(), fwd.delta(eps, e).detach().numpy(), atol=2e-6)
    intensity.sum().backward()
    for grad in (eps.grad, e.grad):
        assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0
    # the pieces of condition_sky's Gauss-Newton solve: adjoint pairs, and J v against finite differences
    gen = torch.Generator().manual_seed(9)
    at = eps.detach()
    v, g = torch.randn(at.shape, generator=gen), torch.randn(e.shape, generator=gen)
    y = torch.randn(len(pixels), generator=gen)
    jv = fwd.jvp(at, v)
    assert float((jv * g).sum()) == pytest.approx(float((v * fwd.vjp(at, g)).sum()), rel=1e-4)
    assert float((fwd.blend(g) * y).sum()) == pytest.approx(float((g * fwd.blend_adjoint(y)).sum()), rel=1e-4)
    with torch.no_grad():
        h = 1e-2
        fd = (fwd.decode(at + h * v) - fwd.decode(at - h * v)) / (2 * h)
    assert float((fd - jv).norm()) < 0.02 * float(jv.norm()) and float(jv.norm()) > 0


def test_forward_model_with_finer_levels(tiny_weights):
    """At nside 512 the tiny model's cascade has two levels: SkyForwardModel's delta of the prior
    draws of some tiles is level 0 as the component passes it on (what it keeps beside level 1)."""
    model = VAEDust(nside=512, seed=4, weights=tiny_weights, device="cpu")
    gen = model.renderer
    levels = gen.levels(512)
    assert len(levels) == 2
    pixels = hp.query_disc(512, hp.ang2vec(30.0, 45.0, lonlat=True), np.radians(1.0))
    lookup = np.full(hp.nside2npix(512), -1)
    lookup[pixels] = np.arange(len(pixels))
    from pysm_vaedust.tiling import PatchSet, patch_normals

    tiles = PatchSet(512, levels[0], np.arange(levels[0].n_tiles), lookup).used
    fwd = SkyForwardModel(model, tiles, pixels)
    assert fwd.next_fwhm_deg > 0 and fwd.fine_variance > 0
    normals = torch.from_numpy(patch_normals(4, 0, tiles, gen.normals_size))
    d, n = fwd.vae.latent_dim, fwd.vae.config.npix
    noise = fwd.vae.decoder_noise(normals[:, d:].reshape(-1, 1, n, n), fwd.conditions)[:, 0]
    with torch.no_grad():
        delta = fwd.delta(normals[:, :d], noise).numpy()
    fwhm = float(gen.normalisation["template_fwhm_deg"]) / levels[1].factor
    kept, _ = gen.level_field(levels[0], 512, 4, pixels, model.log_template, fwhm)
    np.testing.assert_allclose(delta, kept, atol=2e-5 * float(np.abs(kept).max()) + 1e-6)


def test_fitted_latents_refuse_other_weights_and_conditions(weights, tiny_weights, sky, tmp_path):
    fitted = sky[4]
    other = save_weights(tmp_path / "other.h5", {"vae": weights.vae}, dict(weights.metadata, note="a copy"))
    with pytest.raises(ValueError, match="fitted with weights of sha256"):
        ConditionedVAEDust(fitted, nside=SKY_NSIDE, weights=other)
    with pytest.raises(ValueError, match="conditions differ"):
        ConditionedVAEDust(fitted, nside=SKY_NSIDE, weights=tiny_weights, mbb_temperature=25.0)
    anonymous = FittedLatents(tile_ids=fitted.tile_ids, eps=fitted.eps)
    with pytest.raises(ValueError, match="record no weights_sha256"):
        ConditionedVAEDust(anonymous, nside=SKY_NSIDE, weights=tiny_weights)
    with pytest.warns(UserWarning, match="renders 2 cascade level"):
        ConditionedVAEDust(fitted, nside=512, weights=tiny_weights)


def test_fitted_latents_file_errors(tmp_path):
    bad = tmp_path / "bad.h5"
    bad.write_bytes(b"not hdf5")
    with pytest.raises(ValueError, match="not a pysm_vaedust fitted-latents file"):
        FittedLatents.load(bad)
    with pytest.raises(FileNotFoundError):
        FittedLatents.load(tmp_path / "missing.h5")
    old = tmp_path / "old.h5"
    with h5py.File(old, "w") as f:
        f.attrs["kind"] = "pysm_vaedust.FittedLatents"
        f.attrs["format_version"] = 1
    with pytest.raises(ValueError, match="format version 1"):
        FittedLatents.load(old)
    with pytest.raises(ValueError, match="eps has shape"):
        FittedLatents(tile_ids=np.arange(3), eps=np.zeros((2, 4)))
    with pytest.raises(ValueError, match="noise has shape"):
        FittedLatents(tile_ids=np.arange(2), eps=np.zeros((2, 4)), noise=np.zeros((3, 8, 8)))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        FittedLatents(tile_ids=np.arange(2), eps=np.zeros((2, 4))).save(tmp_path / "ok.h5")
    assert FittedLatents.load(tmp_path / "ok.h5").noise is None
