"""Stage 8 — conditioning: MAP latents, posterior samples and constrained realizations.

Patch level (normalised units; an observation `d` is (n, n), (B, n, n) or (B, 1, n, n), `mask`
the same shape, True = observed, `sigma` a scalar or a map of d's shape). With the decoder
p(x|z) = N(mu(z), C), C the decoder noise (stationary and coloured, times exp((a_p + a_q) / 2)
for a model with a noise modulation a(z), which the fits hold fixed — see map_fit), and white
noise of variance sigma^2 on the observed pixels o::

    -2 log p(z | d) = |z|^2 + r_o^T (C_oo + diag sigma_o^2)^-1 r_o + const,   r = d - mu(z)

(noise_model='exact', the default: C_oo + diag sigma^2 is inverted once per patch, dense
1024 x 1024 at most). noise_model='white' is the white approximation
|z|^2 + sum_o r_o^2 / (sigma_o^2 + sigma_dec^2 exp(a_o)), sigma_dec^2 = mean_k exp(noise_logvar_k)
the stationary noise's pixel variance; both coincide when the learned noise spectrum is flat (as for
probabilistic-PCA weights). The sky level uses the white approximation for the latents (see
condition_sky). Given z, the decoder noise is Gaussian and drawn exactly (e ~ p(e | z, d)) in the
constrained realizations. With a learned latent prior (`weights.prior`, a flow g: z -> eps)
|z|^2 becomes its density, -2 log p(z) = |g(z)|^2 - 2 log|det dg/dz| + const. (Optimising the
flow's normals eps = g(z) with |eps|^2 instead, i.e. the MAP in eps coordinates, lets the fit
use directions the flow stretches: measured on test patches with a briefly trained flow, 4x
the masked-pixel error of the N(0, I) fit; the density in z gave 0.89-0.99x.)

* `map_fit`: L-BFGS (or Adam) from several starts — 0, the encoder mean q(z|d) of d with masked
  pixels filled by the observed mean, the closed-form solution for the decoder linearised about
  z = 0, prior draws — all restarts and patches optimised together as one batch.
* `posterior_samples`: Laplace (Gauss-Newton precision G^T G + J^T P J, or the exact Hessian) and
  optionally MALA / unadjusted Langevin steps preconditioned by it; constrained realizations
  mu(z_s) + e_s with e_s ~ p(e | z_s, d), their mean and per-pixel standard deviation;
  `conditional_mean`: the point estimate mu(z_map) + E[e | z_map, d].
* `StationaryGaussian`: the Gaussian baseline (covariance from the 2D power spectrum, i.e. the
  lag-autocovariance, of training patches) with the same Wiener filter / constrained realizations.

Sky level: `condition_sky` converts an observed intensity map to the normalised field delta of
`VAEDust` (I = T exp(s delta - s^2 V / 2), modified black body to the reference frequency),
fits the latents of every level-0 tile touching an observed pixel **jointly through the blend**
(`SkyForwardModel`, a sparse matrix of the tiling's bilinear interpolation and blend weights —
per-patch fits on tangent-plane resamplings would ignore that overlapping patches add up as
sum(w v) / sqrt(sum w^2)), and draws the decoder noise of those tiles given the residual.
`FittedLatents` stores the result (HDF5, atomic write); `ConditionedVAEDust` is a `VAEDust` that
renders it: the observed region follows the data, unobserved tiles stay prior draws of `seed`.

`forward_model` / `SkyForwardModel`: the differentiable latent -> patch -> sky-pixel map in torch.

Weights with a marginal transform (model.py: samples x = f(mu(z) + e), e added in the Gaussian
space) are conditioned in data space with f linearised about the decoder mean: mu(z) above reads
f(mu(z)) and the noise modulation a(z) + 2 log f'(mu(z)) (`fitted_log_amplitude`), so each fit
stays Gaussian given z; constrained realizations start from the exact (skewed) prior draws
f(mu + e) - f(mu) and add the linear correction towards the data. The patch-level
decoder-noise covariance is the aperiodic one (`decoder_noise_covariance(periodic=False)`); the
sky level keeps the periodic FFT form.
"""

from __future__ import annotations

import json
import math
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import healpy as hp
import numpy as np
import pysm3.units as u
import torch

from . import __version__
from .checks import (check_bandpass, check_bool, check_choice, check_frequency, check_int, check_nside,
                     check_path, check_real, check_seed)
from .component import VAEDust, _mbb_intensity, interpolate_at_pixels
from .data import BETA_DUST, T_DUST_K, atomic_write, file_digest
from .model import VAE
from .tiling import CascadeLevel, Footprints, band_filter, blend_torch, footprints

METHODS = ("lbfgs", "adam")
SAMPLERS = ("laplace", "mala", "ula")
NOISE_MODELS = ("exact", "white")
FITTED_FORMAT_VERSION = 1


# ----------------------------------------------------------------------------- helpers

def _as_tensor(x, dtype=torch.float32) -> torch.Tensor:
    if torch.is_tensor(x):
        return x.detach().to("cpu", dtype)
    return torch.as_tensor(np.asarray(x), dtype=dtype)


def _check_patch_inputs(npix: int, d, mask, sigma):
    """Validate a patch observation. Returns (d, m, sigma2), each (B, 1, n, n) float32 tensors
    (masked pixels of d set to 0, sigma2 = 1 there); raises ValueError on bad input."""
    d_np = d.detach().cpu().numpy() if torch.is_tensor(d) else np.asarray(d)
    m_np = mask.detach().cpu().numpy() if torch.is_tensor(mask) else np.asarray(mask)
    shape = d_np.shape
    if len(shape) not in (2, 3, 4) or shape[-2:] != (npix, npix) or (len(shape) == 4 and shape[1] != 1):
        raise ValueError(f"observation has shape {shape}; expected ({npix}, {npix}), (B, {npix}, {npix}) "
                         f"or (B, 1, {npix}, {npix}) for this model")
    if m_np.shape != shape:
        raise ValueError(f"mask has shape {m_np.shape} but the observation has shape {shape}; "
                         "they must be equal (mask True = observed pixel)")
    if m_np.dtype != bool:
        if not np.all((m_np == 0) | (m_np == 1)):
            raise ValueError("mask must be boolean (or 0/1): True/1 = observed pixel")
        m_np = m_np.astype(bool)
    s_np = sigma.detach().cpu().numpy() if torch.is_tensor(sigma) else np.asarray(sigma, dtype=np.float64)
    if s_np.ndim == 0:
        if not np.isfinite(s_np) or s_np <= 0:
            raise ValueError(f"sigma={float(s_np)!r}: expected a finite noise level > 0 (normalised units)")
        s_np = np.full(shape, float(s_np))
    elif s_np.shape != shape:
        raise ValueError(f"sigma has shape {s_np.shape}; expected a scalar or the observation's shape {shape}")
    bad_s = m_np & ~(np.isfinite(s_np) & (s_np > 0))
    if bad_s.any():
        first = tuple(int(i) for i in np.argwhere(bad_s)[0])
        raise ValueError(f"sigma has {int(bad_s.sum())} non-positive or non-finite values at observed pixels "
                         f"(first at {first}: {s_np[first]!r}); expected sigma > 0 where mask is True")
    bad_d = m_np & ~np.isfinite(d_np)
    if bad_d.any():
        first = tuple(int(i) for i in np.argwhere(bad_d)[0])
        raise ValueError(f"observation has {int(bad_d.sum())} NaN/inf values at observed pixels (first at "
                         f"{first}); set mask False there or give finite values")
    b = int(np.prod(shape[:-2])) if len(shape) > 2 else 1
    d_t = torch.from_numpy(np.where(m_np, d_np, 0.0).reshape(b, 1, npix, npix).astype(np.float32))
    m_t = torch.from_numpy(m_np.reshape(b, 1, npix, npix).astype(np.float32))
    s2 = torch.from_numpy(np.where(m_np, s_np, 1.0).reshape(b, 1, npix, npix).astype(np.float64) ** 2).float()
    if (m_t.flatten(1).sum(1) == 0).any():
        warnings.warn(f"{int((m_t.flatten(1).sum(1) == 0).sum())} patch(es) have no observed pixel: "
                      "their posterior is the prior", stacklevel=3)
    return d_t, m_t, s2


def decoder_pixel_variance(vae: VAE) -> float:
    """Per-pixel variance of the stationary decoder noise before modulation (normalised
    units^2): the mean over orthonormal-FFT modes of exp(noise_logvar)."""
    return float(vae.noise_logvar().detach().exp().mean())


def decoder_noise_covariance(vae: VAE, log_amplitude: torch.Tensor | None = None,
                             periodic: bool = False) -> torch.Tensor:
    """(n^2, n^2) float64 covariance of the decoder noise of one patch, pixels in row-major
    order, times exp((a_p + a_q) / 2) for a modulation log-amplitude a (n, n) or (1, n, n).
    periodic=True: circulant, the training likelihood's noise (correlations wrap around the patch
    edges); periodic=False (conditioning): the same spectrum without wrap-around, the covariance
    of `vae.decoder_noise(periodic=False)` (a corner of a field twice the patch size)."""
    n = vae.config.npix
    logvar = vae.noise_logvar() if periodic else vae.embedded_noise_logvar()
    acf = torch.fft.ifft2(logvar.detach().double().exp()).real  # C[p, q] = acf[p - q mod grid]
    grid = acf.shape[0]
    r = torch.arange(n, device=acf.device).repeat_interleave(n)
    c = torch.arange(n, device=acf.device).repeat(n)
    cov = acf[(r[:, None] - r[None, :]) % grid, (c[:, None] - c[None, :]) % grid]
    return cov if log_amplitude is None else _modulate(cov, log_amplitude)


def _modulate(cov: torch.Tensor, log_amplitude: torch.Tensor) -> torch.Tensor:
    """cov[p, q] exp((a_p + a_q) / 2) for one patch's log-amplitude a (any shape with n^2 values)."""
    amp = (0.5 * log_amplitude.detach().double().flatten()).exp()
    return cov * amp[:, None] * amp[None, :]


def _observed_system(stationary, log_amplitude, m, s2, i):
    """For patch i: (observed pixel indices, its decoder-noise covariance C (n^2, n^2) — the
    stationary one modulated by log_amplitude[i] when given — and the Cholesky factor of
    C_oo + diag sigma_o^2), or None when no pixel is observed."""
    idx = torch.nonzero(m[i].flatten() > 0).flatten()
    if len(idx) == 0:
        return None
    cov = stationary if log_amplitude is None else _modulate(stationary, log_amplitude[i])
    return idx, cov, torch.linalg.cholesky(cov[idx][:, idx] + torch.diag(s2[i].flatten()[idx].double()))


@torch.no_grad()
def fitted_log_amplitude(vae: VAE, z: torch.Tensor) -> torch.Tensor | None:
    """Data-space decoder-noise log-amplitude (B, 1, n, n) at latents z (B, D): a(z), plus
    2 log f'(mu(z)) with a marginal transform (the noise e added to mu in the Gaussian space is
    f'(mu) e in data space, to first order); None without modulation or transform.
    The fits hold it fixed: first at z = 0 (the prior mean), then at the fitted latents (map_fit:
    the best restart's)."""
    mean = vae.decode(z)
    return _data_log_amplitude(vae, mean, vae.noise_log_amplitude(z, mean))


def _data_log_amplitude(vae: VAE, mean: torch.Tensor, log_amplitude: torch.Tensor | None):
    """Gaussian-space log-amplitude a (or None) at decoder mean mu -> data space, a + 2 log f'(mu)."""
    if not vae.marginal.active:
        return log_amplitude
    slope = 2 * vae.marginal.data_log_derivative(mean)
    return slope if log_amplitude is None else log_amplitude + slope


def prior_mean_noise_level(vae: VAE) -> float:
    """Mean over pixels of exp(a(0)) (a the data-space log-amplitude of `fitted_log_amplitude`):
    the factor by which the modulation at the prior mean z = 0 scales the stationary
    decoder-noise variance (1 without modulation or transform) — the level used where the noise
    is approximated as stationary."""
    a0 = fitted_log_amplitude(vae, torch.zeros(1, vae.config.latent_dim, device=vae.device))
    return 1.0 if a0 is None else float(a0.exp().mean())


def _decoder_is_affine(vae: VAE, rtol: float = 1e-6) -> bool:
    """True when the data-space decoder mean is affine: no marginal transform, and the decoder's
    convolutional branch negligible (its last layer is zero, as straight after `init_from_pca`,
    or its output on 64 fixed prior draws is below rtol times the linear branch's): mu(z) = W z + b
    then holds to float32 precision."""
    if vae.marginal.active:
        return False
    last = vae.decoder_conv[-1]
    if bool(torch.all(last.weight == 0) and torch.all(last.bias == 0)):
        return True
    z = torch.randn((64, vae.config.latent_dim), generator=torch.Generator().manual_seed(0)).to(vae.device)
    with torch.no_grad():
        lin = vae.decoder_linear(z).view(len(z), 1, vae.config.npix, vae.config.npix)
        conv = vae.decode(z) - lin
    return float(conv.abs().max()) <= rtol * float(lin.abs().max())


class _DataTerm:
    """-2 log p(d | z) + const of B patches as a function of the residual r = mu(z) - d:
    sum_i w_i r_i^2 (white: w = m / sigma_eff^2) or r^T K^-1 r with K = C + diag(sigma^2) over the
    observed pixels (exact: C the coloured decoder-noise covariance, modulated by a fixed
    log-amplitude a (B, 1, n, n) when given; masked pixels get zero rows).
    `repeats`: the residuals hold that many stacked copies (restarts / chains) of the B patches."""

    def __init__(self, weight: torch.Tensor, precision: torch.Tensor | None = None, repeats: int = 1):
        self.weight = weight              # (B, 1, n, n): m / sigma_eff^2 (white) or m / sigma^2 (exact)
        self.precision = precision        # (B, n^2, n^2) K^-1 embedded in the full pixel space, or None
        self.repeats = int(repeats)

    @classmethod
    def build(cls, vae, m, s2, decoder_noise: bool, noise_model: str,
              log_amplitude: torch.Tensor | None = None) -> "_DataTerm":
        logvar = vae.noise_logvar().detach()
        if not decoder_noise or noise_model == "white" or bool(torch.all(logvar == logvar.flatten()[0])):
            # (a flat decoder-noise spectrum makes the white form exact)
            sigma_dec2 = decoder_pixel_variance(vae) if decoder_noise else 0.0
            if decoder_noise and log_amplitude is not None:
                sigma_dec2 = sigma_dec2 * log_amplitude.detach().exp()
            return cls(m / (s2 + sigma_dec2))
        stationary = decoder_noise_covariance(vae)
        prec = torch.zeros(len(m), stationary.shape[0], stationary.shape[0])
        for i in range(len(m)):
            system = _observed_system(stationary, log_amplitude, m, s2, i)
            if system is not None:
                idx, _, chol = system
                inv = torch.cholesky_inverse(chol).float()
                prec[i].index_put_((idx[:, None].expand(-1, len(idx)), idx[None, :].expand(len(idx), -1)), inv)
        return cls(m / s2, prec)

    def repeat(self, r: int) -> "_DataTerm":
        if self.precision is None:
            return _DataTerm(self.weight.repeat(r, 1, 1, 1))
        return _DataTerm(self.weight, self.precision, self.repeats * r)

    def __call__(self, resid: torch.Tensor) -> torch.Tensor:
        """(N,) float64 for residuals (N, 1, n, n), N = repeats * B."""
        if self.precision is None:
            return (self.weight * resid.square()).double().sum((1, 2, 3))
        b = self.precision.shape[0]
        flat = resid.reshape(self.repeats, b, -1).permute(1, 2, 0)          # (B, n^2, R)
        quad = (flat * torch.bmm(self.precision, flat)).double().sum(1)      # (B, R)
        return quad.T.reshape(-1)


def _prior_term(z: torch.Tensor, prior=None, centre: torch.Tensor | None = None) -> torch.Tensor:
    """-2 log p(z) + const, (N,) float64: |z - c|^2 for N(0, I); for a learned flow prior
    |g(z) - c|^2 - 2 log|det dg/dz| with g = prior.to_normals (the flow's own density in z, so
    the fit cannot exploit directions the flow stretches). c: optional perturbed prior mean."""
    if prior is None:
        dz = z if centre is None else z - centre
        return dz.square().double().sum(1)
    eps, logdet = prior.to_normals(z)
    de = eps if centre is None else eps - centre
    return de.square().double().sum(1) - 2 * logdet.double()


def _batched_jacobian(f, x: torch.Tensor, chunk: int = 256) -> torch.Tensor:
    """(B, M, D) Jacobians of f: (K, D) -> (K, M) (row-wise) at the rows of x (B, D), by
    forward-mode AD with `chunk` tangents at a time."""
    b, dim = x.shape
    eye = torch.eye(dim, dtype=x.dtype, device=x.device)
    out = None
    with torch.no_grad():
        for i in range(b):
            for start in range(0, dim, chunk):
                tang = eye[start:start + chunk]
                _, jv = torch.func.jvp(f, (x[i].expand(len(tang), dim).contiguous(),), (tang,))
                if out is None:
                    out = torch.empty(b, jv.shape[1], dim, dtype=jv.dtype, device=jv.device)
                out[i, :, start:start + len(tang)] = jv.T
    return out


def latent_jacobian(vae: VAE, z: torch.Tensor, chunk: int = 256) -> torch.Tensor:
    """(B, n^2, D) Jacobian d f(mu(z)) / dz of the data-space decoder mean at z (B, D), by
    forward-mode AD (the linear branch's weight, exactly, when the decoder is affine)."""
    if _decoder_is_affine(vae):
        return vae.decoder_linear.weight.detach().expand(len(z), -1, -1).clone()
    return _batched_jacobian(lambda x: vae.decode_data(x).flatten(1), z, chunk)


def _objective(vae: VAE, z: torch.Tensor, d: torch.Tensor, data_term: _DataTerm, prior=None) -> torch.Tensor:
    """Per-problem -2 log p(z | d) + const, (N,) float64."""
    return _prior_term(z, prior) + data_term(vae.decode_data(z) - d)


def _linearisation(vae: VAE):
    """Data-space decoder mean linearised about z = 0: (J0 (n^2, D), mu0 (n^2,)),
    f(mu(z)) ~ mu0 + J0 z (the linear branch (W, b) exactly when the decoder is affine)."""
    zero = torch.zeros(1, vae.config.latent_dim, device=vae.device)
    with torch.no_grad():
        mu0 = vae.decode_data(zero).flatten()
    return latent_jacobian(vae, zero)[0], mu0


def _linear_solution(vae: VAE, d: torch.Tensor, data_term: _DataTerm) -> torch.Tensor:
    """argmin_z |z|^2 + data_term(mu0 + J0 z - d), decoder linearised about 0, N(0, I) prior: (B, D)."""
    jac, mu0 = _linearisation(vae)
    W = jac.double()
    resid = d.flatten(1).double() - mu0.double()
    if data_term.precision is None:
        wf = data_term.weight.flatten(1).double()
        a = torch.einsum("pi,bp,pj->bij", W, wf, W)
        rhs = torch.einsum("pi,bp->bi", W, wf * resid)
    else:
        pw = data_term.precision.double() @ W                 # (B, n^2, D)
        a = torch.einsum("pi,bpj->bij", W, pw)
        rhs = torch.einsum("bpi,bp->bi", pw, resid)
    a = a + torch.eye(W.shape[1], dtype=torch.float64)
    # symmetric positive definite: Cholesky (batched LU solves fail inside MKL with > 1 thread, torch 2.13)
    return torch.cholesky_solve(rhs[..., None], torch.linalg.cholesky(a))[..., 0].float()


# ----------------------------------------------------------------------------- MAP fit

@dataclass
class MapFit:
    """Result of `map_fit` for B patches (R restarts each).

    z_map (B, D) latents; loss (B,) -2 log p(z_map | d) + const of the final fit;
    restart_losses (R, B), restart_labels (R,), best_restart (B,): the first pass over the
    restarts (with a noise modulation its data term holds a(0), so these losses are not
    comparable with `loss`, which holds a at the best restart); n_iter / n_eval: optimiser
    iterations / objective evaluations (all restarts run as one batch); grad_norm (B,)
    |d loss / dz| at z_map; converged (B,) grad_norm < gtol; mean (B, 1, n, n) data-space decoder
    mean f(mu(z_map)) (mu(z_map) without a marginal transform); data (B, 1, n, n) the validated
    observation (0 at masked pixels); mask, sigma2
    (B, 1, n, n); noise_model 'exact' | 'white' | 'none'; sigma_dec2: decoder-noise pixel
    variance before modulation; prior: the learned latent prior used (None: N(0, I));
    log_amplitude (B, 1, n, n): the data-space decoder-noise log-amplitude the final fit held
    fixed, `fitted_log_amplitude` at the best restart's latents (None without modulation and
    marginal transform).
    """

    z_map: torch.Tensor
    loss: torch.Tensor
    restart_losses: torch.Tensor
    restart_labels: list
    best_restart: torch.Tensor
    n_iter: int
    n_eval: int
    grad_norm: torch.Tensor
    converged: torch.Tensor
    mean: torch.Tensor
    data: torch.Tensor
    mask: torch.Tensor
    sigma2: torch.Tensor
    noise_model: str
    sigma_dec2: float
    data_term: _DataTerm = field(repr=False, default=None)
    method: str = "lbfgs"
    prior: object = field(repr=False, default=None)
    log_amplitude: torch.Tensor | None = field(repr=False, default=None)


def _starts(vae, d, m, data_term, n_restarts, generator, prior):
    """Initial points (R, B, D) and their labels."""
    b, dim = d.shape[0], vae.config.latent_dim
    labels = ["zero", "encoder", "linear"][:n_restarts]
    labels += [f"prior{k}" for k in range(n_restarts - len(labels))]
    out = []
    with torch.no_grad():
        for label in labels:
            if label == "zero":
                out.append(torch.zeros(b, dim))
            elif label == "encoder":
                count = m.flatten(1).sum(1).clamp_min(1)
                fill = (d * m).flatten(1).sum(1) / count
                filled = torch.where(m > 0, d, fill[:, None, None, None])
                out.append(vae.encode(filled)[0])
            elif label == "linear":
                out.append(_linear_solution(vae, d, data_term))
            else:
                eps = torch.randn((b, dim), generator=generator)
                out.append(eps if prior is None else prior.sample_from_normals(eps))
    return torch.stack(out), labels


def map_fit(vae: VAE, d, mask, sigma, n_restarts: int = 4, steps: int = 200, method: str = "lbfgs",
            generator: torch.Generator | None = None, decoder_noise: bool = True, noise_model: str = "exact",
            prior=None, gtol: float = 0.05, lr: float = 0.05) -> MapFit:
    """MAP latents of B patches given a partial noisy observation (normalised units, CPU).

    Minimises -2 log p(z | d) = -2 log p(z) + data term: |z|^2 for the N(0, I) prior, or the
    learned flow's density (`prior`, e.g. weights.prior: |g(z)|^2 - 2 log|det dg/dz|). Data term
    with `decoder_noise`: 'exact' — r^T (C_oo + diag sigma^2)^-1 r over the observed pixels (C the
    coloured decoder-noise covariance, dense per patch); 'white' — the white approximation
    sum m r^2 / (sigma^2 + sigma_dec^2). Without it: sum m r^2 / sigma^2.
    Starts: 0, encoder mean of the mean-filled d, the exact solution for the decoder linearised
    about 0 (N(0, I) prior), then prior draws (`n_restarts` of them in that order). method:
    'lbfgs' (strong-Wolfe line search, at most `steps` iterations) or 'adam' (`steps` steps of
    rate `lr`). converged: |grad| < gtol (the loss is then within ~gtol^2 / 4 of the optimum:
    the N(0, I) prior alone makes the Hessian >= 2 I). A decoder-noise modulation a(z) is held
    fixed: at z = 0 for the restarts, then at the best restart's latents for a final refit.
    """
    check_choice(method, "method", METHODS)
    check_choice(noise_model, "noise_model", NOISE_MODELS)
    n_restarts, steps = check_int(n_restarts, "n_restarts", 1), check_int(steps, "steps", 1)
    decoder_noise = check_bool(decoder_noise, "decoder_noise")
    gtol, lr = check_real(gtol, "gtol", positive=True), check_real(lr, "lr", positive=True)
    generator = generator if generator is not None else torch.Generator().manual_seed(0)
    d, m, s2 = _check_patch_inputs(vae.config.npix, d, mask, sigma)
    dim = vae.config.latent_dim
    log_amplitude = fitted_log_amplitude(vae, torch.zeros(len(d), dim)) if decoder_noise else None
    data_term = _DataTerm.build(vae, m, s2, decoder_noise, noise_model, log_amplitude)
    starts, labels = _starts(vae, d, m, data_term, n_restarts, generator, prior)
    z, restart_losses, grad, n_iter, n_eval = _optimise(vae, starts, d, data_term, prior, method, steps,
                                                        gtol, lr)
    best = restart_losses.argmin(0)
    rows = torch.arange(len(d))
    z_best, loss, g_best = z[best, rows], restart_losses[best, rows], grad[best, rows]
    if log_amplitude is not None:  # refit with the modulation at the best restart's latents
        log_amplitude = fitted_log_amplitude(vae, z_best)
        data_term = _DataTerm.build(vae, m, s2, decoder_noise, noise_model, log_amplitude)
        z, losses, grad, it2, ev2 = _optimise(vae, z_best[None], d, data_term, prior, method, steps, gtol, lr)
        z_best, loss, g_best, n_iter, n_eval = z[0], losses[0], grad[0], n_iter + it2, n_eval + ev2
    with torch.no_grad():
        mean = vae.decode_data(z_best)
    return MapFit(z_map=z_best, loss=loss, restart_losses=restart_losses,
                  restart_labels=labels, best_restart=best, n_iter=int(n_iter),
                  n_eval=int(n_eval), grad_norm=g_best, converged=g_best < gtol, mean=mean, data=d, mask=m,
                  sigma2=s2, noise_model=noise_model if decoder_noise else "none",
                  sigma_dec2=decoder_pixel_variance(vae) if decoder_noise else 0.0,
                  data_term=data_term, method=method, prior=prior, log_amplitude=log_amplitude)


def _optimise(vae, starts, d, data_term, prior, method, steps, gtol, lr):
    """Minimise the objective from starts (R, B, D), all R x B problems as one batch: returns
    z (R, B, D), losses (R, B), |grad| (R, B), iterations, objective evaluations."""
    r, b, dim = starts.shape
    dd, term = d.repeat(r, 1, 1, 1), data_term.repeat(r)
    z = starts.reshape(r * b, dim).clone().requires_grad_(True)
    n_iter = n_eval = 0
    if method == "lbfgs":
        def closure():
            z.grad = None
            loss = _objective(vae, z, dd, term, prior).sum()
            loss.backward()
            return loss

        while n_iter < steps:  # a fresh history when the line search stalls before convergence
            opt = torch.optim.LBFGS([z], lr=1.0, max_iter=steps - n_iter, history_size=20,
                                    tolerance_change=1e-12, tolerance_grad=gtol / math.sqrt(dim),
                                    line_search_fn="strong_wolfe")
            opt.step(closure)
            state = opt.state[z]
            n_iter += state["n_iter"]
            n_eval += state["func_evals"]
            if state["n_iter"] <= 1 or z.grad.abs().max() <= gtol / math.sqrt(dim):
                break
    else:
        opt = torch.optim.Adam([z], lr=lr)
        for _ in range(steps):
            opt.zero_grad()
            _objective(vae, z, dd, term, prior).sum().backward()
            opt.step()
        n_iter = n_eval = steps
    z.grad = None
    loss_all = _objective(vae, z, dd, term, prior)
    loss_all.sum().backward()
    grad = z.grad.detach().reshape(r, b, dim).norm(dim=2)
    return z.detach().reshape(r, b, dim), loss_all.detach().reshape(r, b), grad, n_iter, n_eval


# ----------------------------------------------------------------------------- posterior samples

def laplace_precision(vae: VAE, fit: MapFit, hessian: str = "gauss-newton") -> torch.Tensor:
    """(B, D, D) float64 posterior precision of z at the MAP: Gauss-Newton G^T G + J^T P J (J the
    decoder Jacobian, P the data term's precision, G = dg/dz of the flow prior, I for N(0, I)),
    or half the exact Hessian of -2 log p(z | d) (eigenvalues floored at 1e-6)."""
    prior = fit.prior
    if hessian == "gauss-newton":
        jac = latent_jacobian(vae, fit.z_map).double()
        if fit.data_term.precision is None:
            wf = fit.data_term.weight.flatten(1).double()
            jpj = torch.einsum("bpi,bp,bpj->bij", jac, wf, jac)
        else:
            jpj = jac.mT @ (fit.data_term.precision.double() @ jac)
        if prior is None:
            return torch.eye(jac.shape[2], dtype=torch.float64) + jpj
        g = _batched_jacobian(lambda x: prior.to_normals(x)[0], fit.z_map).double()
        return g.mT @ g + jpj
    if hessian != "exact":
        raise ValueError(f"hessian={hessian!r}: expected 'gauss-newton' or 'exact'")
    out = []
    for i in range(len(fit.z_map)):
        term = _DataTerm(fit.data_term.weight[i:i + 1],
                         None if fit.data_term.precision is None else fit.data_term.precision[i:i + 1])
        h = torch.autograd.functional.hessian(
            lambda x: 0.5 * _objective(vae, x[None], fit.data[i:i + 1], term, prior)[0], fit.z_map[i].clone())
        vals, vecs = torch.linalg.eigh(0.5 * (h + h.T).double())
        out.append((vecs * vals.clamp_min(1e-6)) @ vecs.T)
    return torch.stack(out)


@dataclass
class Posterior:
    """Posterior draws for B patches.

    z (S, B, D) latents; realizations (S, B, 1, n, n) constrained realizations f(mu(z_s)) + e_s
    (e_s the data-space decoder noise drawn given z_s and the data; f(mu(z_s)) alone without
    decoder noise; f the marginal transform, or the identity);
    mean / std (B, 1, n, n) over the realizations; fit: the MapFit used; acceptance: MALA
    acceptance rate after adaptation (None for 'laplace' / 'ula').
    """

    z: torch.Tensor
    realizations: torch.Tensor
    mean: torch.Tensor
    std: torch.Tensor
    fit: MapFit
    method: str
    acceptance: float | None = None

    def interval(self, level: float = 0.68):
        """Per-pixel central credible interval (lo, hi), each (B, 1, n, n)."""
        q = torch.tensor([0.5 - level / 2, 0.5 + level / 2])
        lo, hi = torch.quantile(self.realizations, q, dim=0)
        return lo, hi


def _data_space_noise(vae, mean, log_amplitude, generator, periodic: bool) -> torch.Tensor:
    """Prior draws f(mu + e) - f(mu) (N, 1, n, n) of the decoder noise in data space: e the
    Gaussian-space noise modulated by log_amplitude (N, 1, n, n) or None, mu (N, 1, n, n) the
    Gaussian-space decoder mean (without a marginal transform f is the identity: e itself). With a
    transform the draws keep the sky's skewness where the data do not constrain them."""
    e = vae.decoder_noise(len(mean), generator, log_amplitude=log_amplitude, periodic=periodic)
    return vae.to_data(mean + e) - vae.to_data(mean)


def _conditional_decoder_noise(vae, residual, m, s2, log_amplitude=None, prior_draws=None, generator=None):
    """Decoder noise e given r = d - mu = A e + n on the observed pixels, residual (S, B, 1, n, n),
    in data space with covariance C (the aperiodic stationary covariance modulated by the
    data-space log_amplitude (B, 1, n, n) when given): with prior_draws e0 (S, B, 1, n, n) (see
    `_data_space_noise`), draws e = e0 + C A^T (A C A^T + N)^-1 (r - A e0 - n0) (exact for a
    Gaussian e0; n0 drawn from `generator`); without, the conditional mean C A^T (A C A^T + N)^-1 r."""
    s, b = residual.shape[:2]
    n = vae.config.npix
    stationary = decoder_noise_covariance(vae)
    r = residual.reshape(s, b, n * n).double()
    if prior_draws is None:
        e0 = n0 = torch.zeros_like(r)
    else:
        e0 = prior_draws.reshape(s, b, n * n).double()
        n0 = torch.randn((s, b, n * n), generator=generator, dtype=torch.float64) * s2.flatten(1).double().sqrt()
    out = e0.clone()
    for i in range(b):
        system = _observed_system(stationary, log_amplitude, m, s2, i)
        if system is None:
            continue
        idx, cov, chol = system
        rhs = (r[:, i, idx] - e0[:, i, idx] - n0[:, i, idx]).T      # (n_obs, S)
        out[:, i] += (cov[:, idx] @ torch.cholesky_solve(rhs, chol)).T
    return out.reshape(s, b, 1, n, n).float()


def conditional_mean(vae: VAE, fit: MapFit) -> torch.Tensor:
    """Point estimate (B, 1, n, n) of the patches: f(mu(z_map)) + E[e | z_map, d], the data-space
    decoder mean plus the Wiener mean of the decoder noise given the residual (denoises the observed
    pixels and extrapolates the noise's short-range correlations into masked ones)."""
    if fit.noise_model == "none":
        return fit.mean.clone()
    with torch.no_grad():
        return fit.mean + _conditional_decoder_noise(vae, (fit.data - fit.mean)[None], fit.mask, fit.sigma2,
                                                     fit.log_amplitude)[0]


def posterior_samples(vae: VAE, d, mask, sigma, n_samples: int = 64, method: str = "laplace",
                      fit: MapFit | None = None, generator: torch.Generator | None = None,
                      decoder_noise: bool = True, noise_model: str = "exact", prior=None,
                      hessian: str = "gauss-newton", mala_steps: int = 100, step_size: float | None = None,
                      **fit_kwargs) -> Posterior:
    """Posterior draws of z and constrained realizations for B patches.

    method: 'laplace' — z_s = z_map + L^-T xi with L L^T the Laplace precision (`hessian`:
    'gauss-newton' or 'exact'); 'mala' / 'ula' — `mala_steps` (Metropolis-adjusted /
    unadjusted) Langevin steps preconditioned by the Laplace covariance, started from the
    Laplace draws (MALA adapts its step size towards 57 % acceptance during the first half).
    Realizations: mu(z_s) + e_s, e_s drawn exactly from p(e | z_s, d) (coloured decoder noise and
    the observation noise), so observed pixels follow the data and masked pixels get the decoder
    noise of the prior (correlated with the observed residual), modulated by the fit's
    log_amplitude for every draw (the modulation the final fit held fixed). `fit`: a MapFit of the same data
    (skips the MAP step; its noise model and prior are used); other keywords go to map_fit.
    """
    check_choice(method, "method", SAMPLERS)
    check_choice(hessian, "hessian", ("gauss-newton", "exact"))
    n_samples, mala_steps = check_int(n_samples, "n_samples", 1), check_int(mala_steps, "mala_steps", 0)
    if step_size is not None:
        step_size = check_real(step_size, "step_size", positive=True)
    generator = generator if generator is not None else torch.Generator().manual_seed(0)
    if fit is None:
        fit = map_fit(vae, d, mask, sigma, generator=generator, decoder_noise=decoder_noise,
                      noise_model=noise_model, prior=prior, **fit_kwargs)
    else:
        d_c, m_c, s2_c = _check_patch_inputs(vae.config.npix, d, mask, sigma)
        if not (torch.equal(m_c, fit.mask) and torch.allclose(d_c * m_c, fit.data * fit.mask)
                and torch.allclose(s2_c * m_c, fit.sigma2 * m_c)):
            raise ValueError("fit= was computed from another observation (d, mask or sigma differ): "
                             "pass the data of the fit, or fit=None")
    d_t, m, s2, prior = fit.data, fit.mask, fit.sigma2, fit.prior
    chol = torch.linalg.cholesky(laplace_precision(vae, fit, hessian))   # (B, D, D)
    b, dim = fit.z_map.shape
    xi = torch.randn((b, dim, n_samples), generator=generator, dtype=torch.float64)
    z_s = fit.z_map.double()[:, :, None] + torch.linalg.solve_triangular(chol.mT, xi, upper=True)
    z_s = z_s.permute(2, 0, 1).float().contiguous()                            # (S, B, D)
    acceptance = None
    if method in ("mala", "ula"):
        z_s, acceptance = _langevin(vae, z_s, d_t, fit.data_term, chol, prior, mala_steps, step_size,
                                    generator, adjust=method == "mala")
    with torch.no_grad():
        mu_gaussian = vae.decode(z_s.reshape(-1, dim))
        shape = (z_s.shape[0], b, 1, *d_t.shape[-2:])
        mu = vae.to_data(mu_gaussian).reshape(shape)
        real = mu
        if fit.noise_model != "none":  # prior noise with the modulation held at z_map, as in the fit
            a_map = vae.noise_log_amplitude(fit.z_map, vae.decode(fit.z_map))
            draws = _data_space_noise(vae, mu_gaussian, None if a_map is None else a_map.repeat(shape[0], 1, 1, 1),
                                      generator, periodic=False).reshape(shape)
            real = mu + _conditional_decoder_noise(vae, d_t[None] - mu, m, s2, fit.log_amplitude, draws, generator)
    return Posterior(z=z_s, realizations=real, mean=real.mean(0), std=real.std(0), fit=fit, method=method,
                     acceptance=acceptance)


def _langevin(vae, z0, d, data_term, chol, prior, steps, step_size, generator, adjust=True):
    """Preconditioned (MALA / ULA) Langevin chains z0 (S, B, D) targeting p(z | d) = exp(-objective / 2);
    preconditioner Sigma = P^-1 with P = chol chol^T (B, D, D)."""
    s, b, dim = z0.shape
    dd, term = d.repeat(s, 1, 1, 1), data_term.repeat(s)
    chol_f = chol.float()

    def logpi_grad(x):
        x = x.detach().reshape(s * b, dim).requires_grad_(True)
        lp = -0.5 * _objective(vae, x, dd, term, prior)
        g, = torch.autograd.grad(lp.sum(), x)
        return lp.detach().reshape(s, b).float(), g.reshape(s, b, dim)

    def precond(g):  # Sigma g for g (S, B, D)
        return torch.cholesky_solve(g.permute(1, 2, 0), chol_f).permute(2, 0, 1)

    def sqrt_sigma(xi):  # L^-T xi
        return torch.linalg.solve_triangular(chol_f.mT, xi.permute(1, 2, 0), upper=True).permute(2, 0, 1)

    def log_q(to, mean, h):  # log N(to; mean, h^2 Sigma) up to a constant
        diff = (to - mean).permute(1, 2, 0)                                      # (B, D, S)
        return -0.5 * (chol_f.mT @ diff).square().sum(1).T / (h * h)

    h = 1.65 / dim ** (1 / 6) if step_size is None else float(step_size)
    x = z0.clone()
    lp, g = logpi_grad(x)
    accepted = total = 0
    for step in range(steps):
        mean_fwd = x + 0.5 * h * h * precond(g)
        prop = mean_fwd + h * sqrt_sigma(torch.randn((s, b, dim), generator=generator))
        lp_p, g_p = logpi_grad(prop)
        if adjust:
            mean_bwd = prop + 0.5 * h * h * precond(g_p)
            log_alpha = lp_p - lp + log_q(x, mean_bwd, h) - log_q(prop, mean_fwd, h)
            accept = torch.log(torch.rand((s, b), generator=generator)) < log_alpha
        else:
            accept = torch.ones((s, b), dtype=torch.bool)
        x = torch.where(accept[..., None], prop, x)
        lp = torch.where(accept, lp_p, lp)
        g = torch.where(accept[..., None], g_p, g)
        if adjust and step < steps // 2:
            h *= math.exp(0.5 * (float(accept.float().mean()) - 0.574))
        elif adjust:
            accepted += int(accept.sum())
            total += accept.numel()
    return x.detach(), (accepted / total if total else None)


# ----------------------------------------------------------------------------- Gaussian baseline

class StationaryGaussian:
    """Gaussian patch model N(mean, C) with a stationary covariance C[p, q] = acf(q - p): the
    lag-autocovariance (the Fourier pair of the 2D power spectrum, estimated without wrap-around)
    of a set of patches, symmetrised over the 8 dihedral transforms. The baseline the VAE prior
    must beat: its conditional mean is the Wiener filter."""

    def __init__(self, mean: float, acf: np.ndarray):
        self.mean = float(mean)
        self.acf = np.asarray(acf, dtype=np.float64)          # (2n - 1, 2n - 1), lag 0 at [n - 1, n - 1]
        self.npix = (self.acf.shape[0] + 1) // 2
        self._cov = None

    @classmethod
    def fit(cls, patches, periodic: bool = False) -> "StationaryGaussian":
        """From patches (N, 1, n, n) or (N, n, n) (normalised units). periodic=False: the
        autocovariance at lags |a|, |b| < n averaged over the pixel pairs each patch really has
        (zero-padded FFT); periodic=True: the inverse FFT of the mean periodogram |FFT|^2 (a
        circulant covariance: correlations wrap around the patch edges)."""
        x = _as_tensor(patches, torch.float64).cpu().numpy()
        x = x.reshape(-1, x.shape[-2], x.shape[-1])
        n = x.shape[-1]
        mean = x.mean()
        if periodic:
            power = (np.abs(np.fft.fft2(x - mean)) ** 2).mean(0) / n**2
            acf = np.fft.fftshift(np.fft.ifft2(power).real)                      # lags -n/2 .. n/2 - 1
            full = np.empty((2 * n - 1, 2 * n - 1))
            lags = np.arange(-(n - 1), n)
            full[:] = acf[(lags[:, None] % n + n // 2) % n, (lags[None, :] % n + n // 2) % n]
            acf = full
        else:
            pad = np.zeros((len(x), 2 * n, 2 * n))
            pad[:, :n, :n] = x - mean
            acf = np.fft.ifft2((np.abs(np.fft.fft2(pad)) ** 2).sum(0)).real
            ones = np.zeros((2 * n, 2 * n))
            ones[:n, :n] = 1
            counts = np.fft.ifft2(np.abs(np.fft.fft2(ones)) ** 2).real
            acf = np.fft.fftshift(acf / (len(x) * np.maximum(np.round(counts), 1)))[1:, 1:]  # lags -(n-1)..n-1
        sym = sum(np.rot90(acf, k) for k in range(4)) + sum(np.rot90(acf.T, k) for k in range(4))
        return cls(mean, sym / 8)

    def covariance(self) -> np.ndarray:
        """(n^2, n^2) covariance, row-major pixels (symmetric; the lag estimate is not guaranteed
        positive semi-definite: `condition` floors its eigenvalues at 0 only if a Cholesky fails)."""
        if self._cov is None:
            n = self.npix
            r = np.repeat(np.arange(n), n)
            c = np.tile(np.arange(n), n)
            cov = self.acf[r[None, :] - r[:, None] + n - 1, c[None, :] - c[:, None] + n - 1]
            self._cov = 0.5 * (cov + cov.T)
        return self._cov

    def _psd(self) -> torch.Tensor:
        vals, vecs = torch.linalg.eigh(torch.from_numpy(self.covariance()))
        return vecs, vals.clamp_min(0)

    def condition(self, d, mask, sigma, n_samples: int = 0, generator: torch.Generator | None = None,
                  std: bool = False):
        """Wiener filter (and optionally constrained realizations, per-pixel posterior std) of B
        patches. Returns (mean (B, 1, n, n), std (B, 1, n, n) or None, samples (S, B, 1, n, n) or None)."""
        n = self.npix
        d_t, m, s2 = _check_patch_inputs(n, d, mask, sigma)
        cov = torch.from_numpy(self.covariance())
        b = len(d_t)
        mean = torch.empty(b, n * n, dtype=torch.float64)
        var = torch.empty(b, n * n, dtype=torch.float64) if std else None
        samples = root = None
        if n_samples:
            generator = generator if generator is not None else torch.Generator().manual_seed(0)
            vecs, vals = self._psd()
            root = vecs * vals.sqrt()
            samples = torch.empty(n_samples, b, n * n, dtype=torch.float64)
        for i in range(b):
            idx = torch.nonzero(m[i].flatten() > 0).flatten()
            a = cov[idx][:, idx] + torch.diag(s2[i].flatten()[idx].double())
            chol, info = torch.linalg.cholesky_ex(a)
            if int(info):  # not positive definite: floor the covariance's eigenvalues at 0
                vecs, vals = self._psd()
                cov = (vecs * vals) @ vecs.T
                chol = torch.linalg.cholesky(cov[idx][:, idx] + torch.diag(s2[i].flatten()[idx].double()))
            k = cov[:, idx]
            resid = d_t[i].flatten()[idx].double() - self.mean
            mean[i] = self.mean + k @ torch.cholesky_solve(resid[:, None], chol)[:, 0]
            if std:
                var[i] = (torch.diag(cov) - (k * torch.cholesky_solve(k.T, chol).T).sum(1)).clamp_min(0)
            if n_samples:
                x0 = (root @ torch.randn((n * n, n_samples), generator=generator, dtype=torch.float64)).T
                n0 = torch.randn((n_samples, len(idx)), generator=generator, dtype=torch.float64) \
                    * s2[i].flatten()[idx].double().sqrt()
                rhs = (resid[None] - x0[:, idx] - n0).T
                samples[:, i] = self.mean + x0 + (k @ torch.cholesky_solve(rhs, chol)).T
        shape = (b, 1, n, n)
        return (mean.reshape(shape).float(), var.sqrt().reshape(shape).float() if std else None,
                samples.reshape(n_samples, *shape).float() if n_samples else None)


def block_mask(fraction: float, rng: np.random.Generator, n: int = 32, block: int = 4) -> np.ndarray:
    """(n, n) bool observation mask, True = observed, with round(fraction * (n / block)^2) random
    block x block squares masked (4 x 4 pixels = 1 degree on the default patches): the holes of the
    inpainting tests and benchmark."""
    per_side = n // block
    mask = np.ones((n, n), bool)
    for j in rng.choice(per_side**2, int(round(fraction * per_side**2)), replace=False):
        r, c = divmod(int(j), per_side)
        mask[r * block:(r + 1) * block, c * block:(c + 1) * block] = False
    return mask


# ----------------------------------------------------------------------------- forward model

def forward_model(vae: VAE, z: torch.Tensor, fp: Footprints | None = None, n_out: int | None = None,
                  level: CascadeLevel | None = None, noise: torch.Tensor | None = None) -> torch.Tensor:
    """Differentiable latents -> patch pixels -> sky pixels (torch; gradients flow to z).

    z: (P, D) latents. Without `fp`: the patches (P, 1, n, n) = decoder mean (+ `noise`
    (P, 1, n, n), e.g. decoder noise), normalised units. With `fp`
    (`tiling.footprints(nside, level, tile_ids, lookup)`, whose patch index k refers to row k of
    z) and `n_out`: the blended sky field delta (n_out,) of `VAEDust` — the level's band filter
    and amplitude applied when `level` is given, then bilinear interpolation and the
    sum(w v) / sqrt(sum w^2) blend (`tiling.blend_torch`). Sky intensity at the reference
    frequency: T exp(s delta - s^2 V / 2) (SkyForwardModel.log_intensity). With a learned latent
    prior, pass z = weights.prior.sample_from_normals(eps) to work in its standard normals.
    """
    x = vae.decode(z)
    x = vae.to_data(x if noise is None else x + noise)
    if fp is None:
        return x
    if n_out is None:
        raise ValueError("forward_model: n_out (number of output pixels) is required with fp")
    x = x[:, 0]
    if level is not None:
        filt = torch.from_numpy(band_filter(level)).to(x)
        if not bool(torch.all(filt == 1)):
            x = torch.fft.ifft2(torch.fft.fft2(x) * filt).real
        x = x * level.amplitude
    return blend_torch(x, fp, int(n_out))


class _SparseApply(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, matrix, matrix_t):
        ctx.matrix_t = matrix_t
        return matrix @ x

    @staticmethod
    def backward(ctx, grad):
        return ctx.matrix_t @ grad, None, None


class BlendOperator:
    """The tiling's patch -> sky map as a sparse matrix B (n_out, P n^2): bilinear interpolation of
    each patch at its footprint pixels, weights w / sqrt(sum w^2). Same numbers as
    `tiling.blend_torch` (to 1e-6), ~5x faster forward + backward, with an explicit adjoint."""

    def __init__(self, fp: Footprints, n_patches: int, npix: int, n_out: int):
        n = int(npix)
        row = np.clip(fp.row.astype(np.float64), 0, n - 1)
        col = np.clip(fp.col.astype(np.float64), 0, n - 1)
        r0 = np.minimum(np.floor(row).astype(np.int64), n - 2)
        c0 = np.minimum(np.floor(col).astype(np.int64), n - 2)
        fr, fc = row - r0, col - c0
        den = np.bincount(fp.pixel, weights=fp.weight.astype(np.float64) ** 2, minlength=n_out)
        scale = fp.weight / np.sqrt(np.maximum(den[fp.pixel], 1e-24))
        base = fp.patch.astype(np.int64) * n * n
        cols = np.concatenate([base + r0 * n + c0, base + r0 * n + c0 + 1,
                               base + (r0 + 1) * n + c0, base + (r0 + 1) * n + c0 + 1])
        vals = np.concatenate([scale * (1 - fr) * (1 - fc), scale * (1 - fr) * fc,
                               scale * fr * (1 - fc), scale * fr * fc])
        rows = np.tile(fp.pixel.astype(np.int64), 4)
        shape = (int(n_out), int(n_patches) * n * n)
        with warnings.catch_warnings():  # torch: "sparse CSR support is in beta"
            warnings.simplefilter("ignore", UserWarning)
            coo = torch.sparse_coo_tensor(torch.from_numpy(np.stack([rows, cols])),
                                          torch.from_numpy(vals.astype(np.float32)), shape,
                                          check_invariants=False).coalesce()
            self.matrix = coo.to_sparse_csr()
            self.matrix_t = coo.t().coalesce().to_sparse_csr()
        self.n_out, self.n_patches, self.npix = shape[0], int(n_patches), n
        sq = coo.values().double().square()
        self.row_sq_sum = torch.zeros(shape[0], dtype=torch.float64).index_add_(0, coo.indices()[0], sq)

    def __call__(self, patches: torch.Tensor) -> torch.Tensor:
        """(P, n, n) -> (n_out,), differentiable."""
        return _SparseApply.apply(patches.reshape(-1), self.matrix, self.matrix_t)

    def adjoint(self, y: torch.Tensor) -> torch.Tensor:
        """(n_out,) -> (P, n, n)."""
        return (self.matrix_t @ y).reshape(self.n_patches, self.npix, self.npix)


class SkyForwardModel:
    """Differentiable latents -> sky field of the level-0 tiles `tile_ids` at `pixels` of `nside`.

    delta(z, noise) = B[a F(mu(z) + noise)] (normalised units), with B the blend (BlendOperator),
    F the level's band filter and a its amplitude (both trivial unless finer cascade levels
    exist at this nside); log_intensity(delta) = log T + s delta - s^2 V / 2 (uK_RJ at the
    reference frequency) — what `VAEDust` renders for these latents and decoder-noise patches
    (plus its finer cascade levels, if this nside has any). z (P, D) rows follow `tile_ids`;
    every tile covering `pixels` must be in `tile_ids` (as for the tiles touching them).
    """

    def __init__(self, model: VAEDust, tile_ids, pixels, level_index: int = 0):
        self.model = model
        self.vae = model.weights.vae
        self.prior = model.generator.prior
        nside = model.nside
        levels = model.generator.levels(nside, model.cascade)
        self.level = levels[level_index]
        self.tile_ids = np.asarray(tile_ids, dtype=np.int64)
        self.pixels = np.asarray(pixels, dtype=np.int64)
        lookup = np.full(hp.nside2npix(nside), -1, dtype=np.int64)
        lookup[self.pixels] = np.arange(len(self.pixels))
        self.footprints = footprints(nside, self.level, self.tile_ids, lookup)
        self.operator = BlendOperator(self.footprints, len(self.tile_ids), self.vae.config.npix, len(self.pixels))
        filt = torch.from_numpy(band_filter(self.level)).float()
        self.filter = None if bool(torch.all(filt == 1)) else filt
        self.amplitude = float(self.level.amplitude)
        self.s = model.weights.log_scale
        self.variance = float(sum(model.generator.level_variance(lv) for lv in levels))
        self.fine_variance = float(sum(model.generator.level_variance(lv) for lv in levels[level_index + 1:]))
        self.log_template = torch.from_numpy(interpolate_at_pixels(model.log_template, nside, self.pixels))

    def band(self, x: torch.Tensor) -> torch.Tensor:
        """Band filter and amplitude of patches (P, n, n) (self-adjoint)."""
        if self.filter is not None:
            x = torch.fft.ifft2(torch.fft.fft2(x) * self.filter).real
        return x * self.amplitude

    def patches(self, z: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
        """Data-space decoder mean f(mu(z)) (f(mu(z) + noise) with Gaussian-space noise patches) of
        latents z (P, D), band-filtered: (P, n, n)."""
        x = self.vae.decode(z)[:, 0]
        return self.band(self.vae.to_data(x if noise is None else x + noise))

    def delta(self, z: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
        """Sky field (n_pixels,) of latents z (P, D) (+ decoder noise patches (P, n, n))."""
        return self.operator(self.patches(z, noise))

    def log_intensity(self, delta: torch.Tensor) -> torch.Tensor:
        """log(I / uK_RJ) at the reference frequency, float64, from delta (n_pixels,)."""
        return self.log_template + self.s * delta.double() - 0.5 * self.s ** 2 * self.variance

    def intensity(self, z: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
        """I (uK_RJ at the reference frequency) at the pixels, differentiable in z."""
        return self.log_intensity(self.delta(z, noise)).exp()


# ----------------------------------------------------------------------------- sky level

@dataclass
class FittedLatents:
    """Conditioned latents of level-0 tiles: tile_ids (P,), z (P, D), noise (P, n, n) or None
    (the decoder-noise patches drawn given the data), metadata (JSON-able dict)."""

    tile_ids: np.ndarray
    z: np.ndarray
    noise: np.ndarray | None = None
    level: int = 0
    metadata: dict = field(default_factory=dict)

    def __post_init__(self):
        self.tile_ids = np.asarray(self.tile_ids, dtype=np.int64)
        self.z = np.asarray(self.z, dtype=np.float32)
        if self.z.ndim != 2 or len(self.z) != len(self.tile_ids):
            raise ValueError(f"z has shape {self.z.shape}; expected ({len(self.tile_ids)}, latent_dim)")
        if self.noise is not None:
            self.noise = np.asarray(self.noise, dtype=np.float32)
            if self.noise.ndim != 3 or len(self.noise) != len(self.tile_ids):
                raise ValueError(f"noise has shape {self.noise.shape}; expected ({len(self.tile_ids)}, n, n)")

    def as_dict(self) -> dict:
        """{level: {tile id: z}}: the `fixed_latents` argument of VAEDust."""
        return {self.level: {int(t): z for t, z in zip(self.tile_ids, self.z)}}

    def noise_dict(self) -> dict:
        """{level: {tile id: noise patch (n, n)}} (empty without noise)."""
        if self.noise is None:
            return {}
        return {self.level: {int(t): e for t, e in zip(self.tile_ids, self.noise)}}

    def save(self, path) -> Path:
        """Write an HDF5 file atomically (datasets tile_ids, z[, noise]; attrs level, metadata JSON)."""
        def write(tmp):
            with h5py.File(tmp, "w") as f:
                f.create_dataset("tile_ids", data=self.tile_ids)
                f.create_dataset("z", data=self.z, compression="gzip", shuffle=True)
                if self.noise is not None:
                    f.create_dataset("noise", data=self.noise, compression="gzip", shuffle=True)
                f.attrs["format_version"] = FITTED_FORMAT_VERSION
                f.attrs["kind"] = "pysm_vaedust.FittedLatents"
                f.attrs["level"] = int(self.level)
                f.attrs["metadata"] = json.dumps(self.metadata, sort_keys=True)

        return atomic_write(path, write)

    @classmethod
    def load(cls, path) -> "FittedLatents":
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"fitted latents file {str(path)!r} does not exist")
        try:
            with h5py.File(path, "r") as f:
                if f.attrs.get("kind") != "pysm_vaedust.FittedLatents":
                    raise KeyError("kind attribute is not pysm_vaedust.FittedLatents")
                version = int(f.attrs["format_version"])
                if version != FITTED_FORMAT_VERSION:
                    raise ValueError(f"format version {version}, this code reads {FITTED_FORMAT_VERSION}")
                return cls(tile_ids=f["tile_ids"][()], z=f["z"][()],
                           noise=f["noise"][()] if "noise" in f else None, level=int(f.attrs["level"]),
                           metadata=json.loads(str(f.attrs["metadata"])))
        except (OSError, KeyError) as err:
            raise ValueError(f"{str(path)!r} is not a pysm_vaedust fitted-latents file: {err}") from err


def _cg(apply_a, b, precond=None, tol: float = 1e-4, max_iter: int = 500):
    """Preconditioned conjugate gradients for a symmetric positive-definite operator; tensors of
    any shape. Returns (x, iterations, relative residual |r| / |b|)."""
    x = torch.zeros_like(b)
    r = b.clone()
    z = precond(r) if precond else r
    p = z.clone()
    rz = torch.sum(r * z)
    norm_b = float(b.norm()) or 1.0
    it = 0
    for it in range(1, max_iter + 1):
        ap = apply_a(p)
        alpha = rz / torch.sum(p * ap)
        x += alpha * p
        r -= alpha * ap
        if float(r.norm()) <= tol * norm_b:
            break
        z = precond(r) if precond else r
        rz_new = torch.sum(r * z)
        p = z + (rz_new / rz) * p
        rz = rz_new
    return x, it, float(r.norm()) / norm_b


def _mbb_ratio(model: VAEDust, freq, bandpass_weights, pixels) -> np.ndarray:
    """I_nu / I_ref of the model's modified black body at `pixels` (bandpass-integrated)."""
    freqs, weights = check_bandpass(freq, bandpass_weights, "freq", "bandpass_weights")
    ones = np.ones(len(pixels))
    out = np.zeros(len(pixels))

    def at(p):
        return float(p) if np.ndim(p) == 0 else np.ascontiguousarray(np.asarray(p)[pixels])

    index, temperature = at(model.mbb_index), at(model.mbb_temperature)
    if np.ndim(index) or np.ndim(temperature):
        index = np.broadcast_to(index, ones.shape).copy()
        temperature = np.broadcast_to(temperature, ones.shape).copy()
    _mbb_intensity(freqs, weights, ones, model.freq_ref, index, temperature, out)
    return out


def _map_values(values, name, npix, freq) -> np.ndarray:
    """A map (Quantity in brightness units, or array in uK_RJ) as a float64 uK_RJ array."""
    if isinstance(values, u.Quantity):
        try:
            values = values.to_value(u.uK_RJ, equivalencies=u.cmb_equivalencies(check_frequency(freq, "freq").mean()))
        except u.UnitConversionError as err:
            raise ValueError(f"{name} has unit {values.unit}; expected a brightness unit (uK_RJ, uK_CMB, "
                             f"MJy/sr)") from err
    try:
        arr = np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError):
        raise TypeError(f"{name} of type {type(values).__name__}: expected a number or a map array") from None
    if arr.ndim == 0:
        return np.full(npix, float(arr))
    if arr.shape != (npix,):
        raise ValueError(f"{name} has shape {arr.shape}; expected ({npix},) (a RING map at this nside)")
    return arr


def condition_sky(observed_map, mask, noise, freq, nside, weights=None, seed: int = 0, template=None,
                  template_freq=None, mbb_temperature=T_DUST_K, mbb_index=BETA_DUST, prior: str = "standard",
                  cascade: bool = True, bandpass_weights=None, sample: bool = True, decoder_noise: bool = True,
                  steps: int = 10, cg_tol: float = 1e-4, cg_max_iter: int = 1000, chunk: int = 256,
                  progress: bool = False) -> FittedLatents:
    """Fit the level-0 latents of `VAEDust` to an observed dust intensity map (CPU).

    observed_map: (12 nside^2,) Galactic RING intensity at `freq` (Quantity in a brightness unit,
    or an array in uK_RJ); mask: bool (12 nside^2,), True = observed (other pixels may hold
    anything); noise: per-pixel (or scalar) noise standard deviation, same units. The map is
    brought to the reference frequency with the model's modified black body (`mbb_*`, scalars or
    maps; `bandpass_weights` as pysm3) and turned into the normalised field
    delta = (log(I / T) + s^2 V / 2) / s, noise sigma_delta = sigma_I / (I s) (log-space
    linearisation: keep sigma_I / I small). template / template_freq / mbb_* / weights / prior /
    cascade: as VAEDust — pass the same ones to ConditionedVAEDust (which takes the fit's prior).
    prior defaults to 'standard': on test patches the N(0, I) prior inpaints better than the
    flow and its 68 % intervals cover (benchmarks/conditioning_vs_wiener.py).

    Every level-0 tile touching an observed pixel is fitted jointly through the blend
    (`SkyForwardModel`): 1) the decoder linearised about z = 0 (one Jacobian shared by all tiles)
    by conjugate gradients — the global optimum of that quadratic problem, and the exact answer
    for an affine decoder; 2) `steps` L-BFGS iterations with the full decoder (skipped when the
    decoder is affine and there is no learned prior; the flow prior enters through its density
    in z, as in map_fit); 3) the decoder noise of the tiles given the
    residual, by conjugate gradients (exact coloured covariance). In 1-2 the decoder noise enters
    in the white approximation (its blended pixel variance added to sigma_delta^2). Where VAEDust
    adds finer cascade levels at this nside (nside >= 512 for 15' base pixels) only the level-0
    band (ell below ~2/3 of its Nyquist) follows the data: the finer levels stay stochastic and
    enter the fit as white noise of their variance. `sample` (default): a constrained realization
    (randomize-then-optimize: prior mean and data perturbed by draws of `seed` — an exact
    posterior draw for the linear-Gaussian part), else the MAP and the Wiener mean of the noise.
    decoder_noise=False fits the decoder mean alone and stores no noise patches: the rendered
    map then carries fresh decoder noise everywhere and matches the data only to that level.
    Tiles touching no observed pixel keep their prior draws (a warning says how many).
    Cost: memory ~ 100 bytes per (observed pixel, covering tile) pair (~0.3 GB at nside 256,
    |b| > 20 deg); time dominated by step 2 (each iteration decodes every fitted tile twice).
    Returns FittedLatents; render it with ConditionedVAEDust.
    """
    start_time = time.time()
    nside = check_nside(nside)
    npix = hp.nside2npix(nside)
    check_bandpass(freq, bandpass_weights, "freq", "bandpass_weights")
    seed, steps = check_seed(seed), check_int(steps, "steps", 0)
    cg_max_iter, chunk = check_int(cg_max_iter, "cg_max_iter", 1), check_int(chunk, "chunk", 1)
    cg_tol = check_real(cg_tol, "cg_tol", positive=True)
    sample, decoder_noise = check_bool(sample, "sample"), check_bool(decoder_noise, "decoder_noise")
    m_np = np.asarray(mask)
    if m_np.shape != (npix,):
        raise ValueError(f"mask has shape {m_np.shape}; expected ({npix},) for nside={nside}")
    if m_np.dtype != bool:
        if not np.all((m_np == 0) | (m_np == 1)):
            raise ValueError("mask must be boolean (True = observed)")
        m_np = m_np.astype(bool)
    i_obs = _map_values(observed_map, "observed_map", npix, freq)
    sig = _map_values(noise, "noise", npix, freq)
    obs = np.flatnonzero(m_np)
    if len(obs) == 0:
        raise ValueError("mask selects no observed pixel")
    bad = ~np.isfinite(i_obs[obs]) | (i_obs[obs] <= 0)
    if bad.any():
        raise ValueError(f"observed_map has {int(bad.sum())} non-finite or non-positive values at observed "
                         f"pixels (first: pixel {int(obs[bad][0])}); the log needs intensities > 0")
    bad = ~np.isfinite(sig[obs]) | (sig[obs] <= 0)
    if bad.any():
        raise ValueError(f"noise has {int(bad.sum())} non-positive or non-finite values at observed pixels "
                         f"(first: pixel {int(obs[bad][0])}); expected sigma > 0")

    def log(msg):
        if progress:
            print(f"[condition_sky {time.time() - start_time:6.1f} s] {msg}", file=sys.stderr)

    model = VAEDust(nside=nside, seed=seed, template=template, template_freq=template_freq,
                    mbb_temperature=mbb_temperature, mbb_index=mbb_index, weights=weights, prior=prior,
                    device="cpu", cascade=cascade)
    vae, flow = model.weights.vae, model.generator.prior
    n, dim = vae.config.npix, vae.config.latent_dim
    ratio = _mbb_ratio(model, freq, bandpass_weights, obs)
    level = model.generator.levels(nside, cascade)[0]
    lookup = np.full(npix, -1, dtype=np.int64)
    lookup[obs] = np.arange(len(obs))
    touched = np.unique(footprints(nside, level, np.arange(level.n_tiles), lookup).patch)
    if len(touched) < level.n_tiles:
        warnings.warn(f"{level.n_tiles - len(touched)} of {level.n_tiles} level-0 tiles touch no observed "
                      "pixel: they keep their prior latents (stochastic, seeded by VAEDust's seed)", stacklevel=2)
    fwd = SkyForwardModel(model, touched, obs)
    op = fwd.operator
    s = fwd.s
    i_ref = i_obs[obs] / ratio
    delta = torch.from_numpy(((np.log(i_ref) - fwd.log_template.numpy()) / s + 0.5 * s * fwd.variance))
    sigma_delta2 = torch.from_numpy((sig[obs] / (i_obs[obs] * s)) ** 2)
    # pixel variance of the decoder noise, with the modulation at z = 0
    sigma_dec2 = decoder_pixel_variance(vae) * prior_mean_noise_level(vae) if decoder_noise else 0.0
    white = sigma_delta2 + fwd.fine_variance                        # noise of step 3 (delta units^2)
    n_eff = white + sigma_dec2 * fwd.amplitude ** 2 * op.row_sq_sum  # white approximation (steps 1-2)
    inv_n = (1.0 / n_eff).float()
    delta = delta.float()
    log(f"{len(obs)} observed pixels, {len(touched)} tiles, V={fwd.variance:.3f}, "
        f"median sigma_delta={float(sigma_delta2.sqrt().median()):.3g}, sigma_dec^2={sigma_dec2:.3g}")

    gen = torch.Generator().manual_seed(seed * 7919 + 17)
    p_count = len(touched)
    centre = torch.randn((p_count, dim), generator=gen) if sample else torch.zeros(p_count, dim)
    target = delta + (torch.randn(len(obs), generator=gen) * n_eff.sqrt().float() if sample else 0)

    # 1) decoder linearised about z = 0, mu ~ mu0 + J0 z (the linear branch W z + b for an affine
    #    decoder), N(0, I) prior centred on c (on f(c) for a flow prior: only a starting point then):
    #    conjugate gradients on (I + J0^T B^T N^-1 B J0) z = c + J0^T B^T N^-1 (t - B mu0)
    jac0, mu0 = _linearisation(vae)
    with torch.no_grad():
        centre_z = centre if flow is None else flow.sample_from_normals(centre)

    def lin_fwd(v):
        return op(fwd.band((v @ jac0.T).reshape(-1, n, n)))

    def lin_adj(y):
        return fwd.band(op.adjoint(y)).reshape(-1, n * n) @ jac0

    with torch.no_grad():
        offset = op(fwd.band(mu0.reshape(n, n).expand(p_count, n, n)))
        rhs = centre_z + lin_adj(inv_n * (target - offset))
        z_lin, it_lin, res_lin = _cg(lambda v: v + lin_adj(inv_n * lin_fwd(v)), rhs, tol=cg_tol,
                                     max_iter=cg_max_iter)
    log(f"linearised decoder: {it_lin} CG iterations (relative residual {res_lin:.1e})")

    # 2) full decoder and prior: L-BFGS on -2 log p(z) (centred on c) + |B mu(z) - t|^2_N, the
    #    decoder's gradients computed in chunks of tiles
    z_fit = z_lin.clone()
    n_iter = 0
    nonlinear = flow is not None or not _decoder_is_affine(vae)
    if nonlinear and steps > 0:
        z_fit.requires_grad_(True)

        def closure():
            with torch.no_grad():
                patches = torch.cat([fwd.patches(z_fit[k:k + chunk]) for k in range(0, p_count, chunk)])
                resid = op(patches) - target
                data = (inv_n * resid.square()).double().sum()
                cot = fwd.band(op.adjoint(2 * inv_n * resid))          # d data / d decoder mean
            zd = z_fit.detach().requires_grad_(True)
            prior_loss = _prior_term(zd, flow, centre).sum()
            grad, = torch.autograd.grad(prior_loss, zd)
            for k in range(0, p_count, chunk):
                zk = zd.detach()[k:k + chunk].requires_grad_(True)
                g, = torch.autograd.grad(vae.decode_data(zk)[:, 0], zk, cot[k:k + chunk])
                grad[k:k + chunk] += g
            z_fit.grad = grad
            return prior_loss.detach() + data

        opt = torch.optim.LBFGS([z_fit], lr=1.0, max_iter=int(steps), history_size=10, tolerance_change=1e-12,
                                tolerance_grad=1e-5, line_search_fn="strong_wolfe")
        opt.step(closure)
        n_iter = int(opt.state[z_fit]["n_iter"])
        z_fit = z_fit.detach()
        log(f"full decoder{' and flow prior' if flow is not None else ''}: {n_iter} L-BFGS iterations")
    with torch.no_grad():
        mean_patches = torch.cat([fwd.patches(z_fit[k:k + chunk]) for k in range(0, p_count, chunk)])
        resid = delta - op(mean_patches)

    # 3) decoder noise of the tiles given the residual: e = e0 + C B'^T (B' C B'^T + N)^-1 (r - B' e0 - n0)
    noise_patches, it_noise, res_noise = None, 0, 0.0
    if decoder_noise:
        spectrum = vae.noise_logvar().detach().exp()
        with torch.no_grad():  # Gaussian-space mean and modulation, held at the fitted latents
            mu = torch.cat([vae.decode(z_fit[k:k + chunk]) for k in range(0, p_count, chunk)])
            a_gauss = (None if not vae.config.noise_modulation else torch.cat(
                [vae.noise_log_amplitude(z_fit[k:k + chunk], mu[k:k + chunk]) for k in range(0, p_count, chunk)]))
            log_amp = _data_log_amplitude(vae, mu, a_gauss)
        amp = 1.0 if log_amp is None else (0.5 * log_amp[:, 0]).exp()

        def cov(x):  # C x for patches (P, n, n)
            return amp * torch.fft.ifft2(torch.fft.fft2(amp * x, norm="ortho") * spectrum, norm="ortho").real

        def b_c_bt(y):
            return op(fwd.band(cov(fwd.band(op.adjoint(y)))))

        white_f = white.float()
        with torch.no_grad():
            if sample:  # prior draws in data space, f(mu + e) - f(mu)
                e0 = _data_space_noise(vae, mu, a_gauss, gen, periodic=True)[:, 0]
                n0 = torch.randn(len(obs), generator=gen) * white_f.sqrt()
            else:
                e0, n0 = torch.zeros(p_count, n, n), torch.zeros(len(obs))
            y = resid - op(fwd.band(e0)) - n0
            diag = (sigma_dec2 * fwd.amplitude ** 2 * op.row_sq_sum).float() + white_f
            a, it_noise, res_noise = _cg(lambda v: b_c_bt(v) + white_f * v, y, precond=lambda v: v / diag,
                                         tol=cg_tol, max_iter=cg_max_iter)
            noise_patches = e0 + cov(fwd.band(op.adjoint(a)))
            if vae.marginal.active:  # data-space noise e -> Gaussian-space g(f(mu) + e) - mu
                mu = mu[:, 0]
                noise_patches = vae.marginal.to_gaussian(vae.to_data(mu) + noise_patches) - mu
        log(f"decoder noise: {it_noise} CG iterations (relative residual {res_noise:.1e})")
    with torch.no_grad():
        final = op(mean_patches if noise_patches is None
                   else torch.cat([fwd.patches(z_fit[k:k + chunk], noise_patches[k:k + chunk])
                                   for k in range(0, p_count, chunk)]))
        chi2_final = float(((final - delta).double().square() / sigma_delta2).mean())
        chi2_mean = float((resid.double().square() / sigma_delta2).mean())
    weights_path = model.weights.path
    metadata = {
        "package_version": __version__, "nside": nside, "level": 0, "seed": seed,
        "freq_GHz": [float(f) for f in np.atleast_1d(check_frequency(freq, "freq").value)],
        "freq_ref_GHz": float(model.freq_ref), "prior": model.prior, "cascade": bool(cascade),
        "sample": bool(sample), "decoder_noise": bool(decoder_noise),
        "weights_path": str(weights_path), "weights_sha256": file_digest(weights_path),
        "template": template if isinstance(template, (str, type(None))) else "array",
        "n_observed_pixels": int(len(obs)), "n_tiles_fitted": int(p_count), "n_tiles": int(level.n_tiles),
        "log_scale": s, "variance_V": fwd.variance,
        "cg_iterations_linear": int(it_lin), "cg_residual_linear": res_lin, "lbfgs_iterations": n_iter,
        "decoder_affine": not nonlinear,
        "cg_iterations_noise": int(it_noise), "cg_residual_noise": res_noise,
        "chi2_per_pixel_mean_only": chi2_mean, "chi2_per_pixel": chi2_final,
        "wall_time_s": time.time() - start_time,
    }
    log(f"done: chi2/pixel {chi2_final:.3f} (decoder mean only {chi2_mean:.3f})")
    return FittedLatents(tile_ids=touched, z=z_fit.numpy(), level=0, metadata=metadata,
                         noise=None if noise_patches is None else noise_patches.numpy())


class ConditionedVAEDust(VAEDust):
    """A VAEDust whose level-0 tiles listed in `fitted` (FittedLatents or a path) use the fitted
    latents and decoder-noise patches: the map follows the observation where observed (at the
    observation's resolution) and keeps prior draws of `seed` elsewhere. Other keyword
    arguments as VAEDust (pass the same template / mbb_* as to condition_sky); `weights`
    defaults to the file the latents were fitted with, and must be that file (sha256 checked);
    `prior` defaults to the one of the fit (it sets the variance V of I = T exp(s delta - s^2 V/2)).
    A config entry: {class = "pysm_vaedust.conditioning.ConditionedVAEDust", fitted = "fit.h5"}."""

    def __init__(self, fitted, nside=2048, seed=0, weights=None, **kwargs):
        if not isinstance(fitted, FittedLatents):
            fitted = FittedLatents.load(check_path(fitted, "fitted", optional=False))
        if "fixed_latents" in kwargs or "fixed_noise" in kwargs:
            raise TypeError("ConditionedVAEDust takes its fixed latents and noise from `fitted`")
        fitted_prior = fitted.metadata.get("prior")
        if fitted_prior and kwargs.get("prior", "auto") not in ("auto", fitted_prior):
            warnings.warn(f"prior={kwargs['prior']!r} differs from the fit's {fitted_prior!r}: the observed "
                          "region will be off by the change of the variance term", stacklevel=2)
        elif fitted_prior:
            kwargs["prior"] = fitted_prior
        for key, value in (("nside", nside), ("cascade", kwargs.get("cascade", True))):
            if key in fitted.metadata and fitted.metadata[key] != value:
                warnings.warn(f"{key}={value!r} differs from the fit's {fitted.metadata[key]!r}: the variance "
                              "term V changes, so the observed region follows the data only approximately",
                              stacklevel=2)
        if weights is None and fitted.metadata.get("weights_path") and Path(fitted.metadata["weights_path"]).is_file():
            weights = fitted.metadata["weights_path"]
        super().__init__(nside=nside, seed=seed, weights=weights, fixed_latents=fitted.as_dict(),
                         fixed_noise=fitted.noise_dict(), **kwargs)
        want = fitted.metadata.get("weights_sha256")
        if want and file_digest(self.weights.path) != want:
            raise ValueError(f"the latents were fitted with weights sha256 {want[:16]}..., but "
                             f"{self.weights.path!r} differs: pass weights= the file used by condition_sky")
        if fitted.z.shape[1] != self.weights.vae.config.latent_dim:
            raise ValueError(f"fitted latents have dimension {fitted.z.shape[1]}, the weights "
                             f"{self.weights.vae.config.latent_dim}")
        self.fitted = fitted


__all__ = ["map_fit", "MapFit", "conditional_mean", "posterior_samples", "Posterior", "laplace_precision",
           "latent_jacobian", "StationaryGaussian", "forward_model", "BlendOperator", "SkyForwardModel",
           "condition_sky", "FittedLatents", "ConditionedVAEDust", "decoder_pixel_variance",
           "decoder_noise_covariance", "fitted_log_amplitude", "prior_mean_noise_level", "block_mask"]
