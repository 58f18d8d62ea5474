"""Stage 8 — patch-level conditioning: MAP latents and posterior samples of the conditional VAE.

Normalised units (the weights' "normalisation"); an observation `d` is (n, n), (B, n, n) or
(B, 1, n, n), `mask` the same shape (True = observed), `sigma` a scalar or a map of d's shape,
`c` the patches' known conditions (B, 2, n/2, n/2) (`cutouts.condition_input`; (2, n/2, n/2)
for one patch). With the decoder p(x | eps, c) = N(mu(eps, c), C), C the stationary periodic
decoder noise, and white noise sigma^2 on the observed pixels o::

    -2 log p(eps | d, c) = |eps|^2 + r_o^T (C_oo + diag sigma_o^2)^-1 r_o + const,   r = d - mu(eps, c)

(noise_model='exact'; 'white' replaces C_oo by its pixel variance on the diagonal, exact for a
flat noise spectrum). eps are the whitened latents (N(0, I) prior).

Holds `map_fit` -> `MapFit`, `posterior_samples` -> `Posterior` (Laplace, MALA, ULA),
`laplace_precision`, `conditional_mean`, `latent_jacobian`, the decoder-noise covariance, and
`StructureFitting` (the VAE with its condition's structure channel as extra latents, for data
that must supply their large scales too: pass it to map_fit / posterior_samples as the model).
Imports `wiener`, never `conditioning`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch

from .checks import check_bool, check_choice, check_int, check_real
from .model import CONDITION_CHANNELS, ConditionalVAE, up
from .wiener import _check_patch_inputs, torus_covariance

METHODS = ("lbfgs", "adam")
SAMPLERS = ("laplace", "mala", "ula")
NOISE_MODELS = ("exact", "white")
HESSIANS = ("gauss-newton", "exact")


# ----------------------------------------------------------------------------- inputs and noise model

def _check_condition(vae: ConditionalVAE, c, batch: int) -> torch.Tensor:
    """Validate conditions for `batch` patches: (B, 2, n/2, n/2) float32 tensor; ValueError otherwise."""
    m = vae.config.condition_npix
    arr = c.detach().cpu().numpy() if torch.is_tensor(c) else np.asarray(c, dtype=np.float32)
    if arr.shape == (CONDITION_CHANNELS, m, m):
        arr = arr[None]
    want = (batch, CONDITION_CHANNELS, m, m)
    if arr.shape != want:
        raise ValueError(f"condition c has shape {arr.shape}; expected {want} (one per observed patch, "
                         "see cutouts.condition_input)")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"condition c has {int(np.sum(~np.isfinite(arr)))} NaN/inf values: expected finite numbers")
    return torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32))


def decoder_pixel_variance(vae: ConditionalVAE, gain=1.0):
    """Per-pixel variance of the decoder noise of a patch of `noise_gain` `gain` (float, or a
    (B,) tensor for B patches; normalised units^2): the mean over orthonormal-FFT modes of its
    per-mode variance (on the torus of `decoder_noise_covariance`: its diagonal)."""
    var = vae.noise_logvar(torus=2).detach().exp().double()
    gained = float((var * vae.noise_gain_mask(torus=2).detach()).mean())
    return float(var.mean()) + (gain - 1) * gained


def noise_gain(vae: ConditionalVAE, c: torch.Tensor) -> torch.Tensor:
    """(B,) float64 factor on the decoder-noise covariance of patches with conditions c."""
    return vae.log_noise_gain(c).detach().double().exp().cpu()


def decoder_noise_covariance(vae: ConditionalVAE, gain: float = 1.0) -> torch.Tensor:
    """(n^2, n^2) float64 covariance of the decoder noise of a patch of `noise_gain` `gain`,
    pixels in row-major order: the
    stationary field of the decoder's noise spectrum seen through the patch, not periodic (the
    corner of a torus of twice the side: `vae.decoder_noise` of (B, 1, 2n, 2n) white noise). The
    periodic covariance would couple opposite patch edges: on the IRIS test split the Wiener
    filter about the decoder mean at eps = 0 then had 1.00-1.10x the masked-pixel MSE of the
    Gaussian baseline with the same c, against 0.91-0.94x without the wrap-around."""
    var = vae.noise_logvar(torus=2).detach().exp()
    return torus_covariance(var * (1 + vae.noise_gain_mask(torus=2).detach() * (gain - 1)), vae.config.npix)


def _observed_system(cov, m, s2, i):
    """For patch i: (observed pixel indices, Cholesky factor of C_oo + diag sigma_o^2), or None
    when no pixel is observed; cov (n^2, n^2) is patch i's decoder-noise covariance."""
    idx = torch.nonzero(m[i].flatten() > 0).flatten()
    if len(idx) == 0:
        return None
    return idx, torch.linalg.cholesky(cov[idx][:, idx] + torch.diag(s2[i].flatten()[idx].double()))


class _DataTerm:
    """-2 log p(d | eps, c) + const of B patches as a function of the residual r = mu - d:
    sum w r^2 (white: w = m / (sigma^2 + sigma_dec^2)) or r^T K^-1 r, K = C_oo + diag sigma_o^2
    (exact; masked pixels get zero rows; sigma_dec^2 and C the patch's, of its `noise_gain`).
    `repeats`: the residuals hold that many stacked copies (restarts / chains) of the B patches."""

    def __init__(self, weight: torch.Tensor, precision: torch.Tensor | None = None, repeats: int = 1):
        self.weight = weight              # (B, 1, n, n)
        self.precision = precision        # (B, n^2, n^2) K^-1 embedded in the full pixel space, or None
        self.repeats = int(repeats)

    @classmethod
    def build(cls, vae, m, s2, c, decoder_noise: bool, noise_model: str) -> "_DataTerm":
        logvar = vae.noise_logvar().detach()
        gain = noise_gain(vae, c)
        if not decoder_noise or noise_model == "white" or bool(torch.all(logvar == logvar.flatten()[0])):
            dec = decoder_pixel_variance(vae, gain).float()[:, None, None, None] if decoder_noise else 0.0
            return cls(m / (s2 + dec))
        n2 = vae.config.npix ** 2
        prec = torch.zeros(len(m), n2, n2)
        for i in range(len(m)):
            system = _observed_system(decoder_noise_covariance(vae, float(gain[i])).cpu(), m, s2, i)
            if system is not None:
                idx, chol = system
                prec[i].index_put_((idx[:, None].expand(-1, len(idx)), idx[None, :].expand(len(idx), -1)),
                                   torch.cholesky_inverse(chol).float())
        return cls(m / s2, prec)

    def repeat(self, r: int) -> "_DataTerm":
        if self.precision is None:
            return _DataTerm(self.weight.repeat(r, 1, 1, 1))
        return _DataTerm(self.weight, self.precision, self.repeats * r)

    def select(self, i: int) -> "_DataTerm":
        """The data term of patch i alone."""
        return _DataTerm(self.weight[i:i + 1], None if self.precision is None else self.precision[i:i + 1])

    def __call__(self, resid: torch.Tensor) -> torch.Tensor:
        """(N,) float64 for residuals (N, 1, n, n), N = repeats * B."""
        if self.precision is None:
            return (self.weight * resid.square()).double().sum((1, 2, 3))
        b = self.precision.shape[0]
        flat = resid.reshape(self.repeats, b, -1).permute(1, 2, 0)          # (B, n^2, R)
        quad = (flat * torch.bmm(self.precision, flat)).double().sum(1)      # (B, R)
        return quad.T.reshape(-1)


def _objective(vae, eps, c, d, data_term: _DataTerm) -> torch.Tensor:
    """Per-problem -2 log p(eps | d, c) + const, (N,) float64."""
    return eps.square().double().sum(1) + data_term(vae.decode(eps, c) - d)


def latent_jacobian(vae: ConditionalVAE, eps: torch.Tensor, c: torch.Tensor, chunk: int = 256) -> torch.Tensor:
    """(B, n^2, D) Jacobians d mu(eps, c) / d eps of the decoder mean at eps (B, D), conditions c
    (B, 2, n/2, n/2), by forward-mode AD with `chunk` tangents at a time."""
    b, dim = eps.shape
    eye = torch.eye(dim, dtype=eps.dtype, device=eps.device)
    out = torch.empty(b, vae.config.npix ** 2, dim, dtype=eps.dtype, device=eps.device)
    with torch.no_grad():
        for i in range(b):
            for start in range(0, dim, chunk):
                tang = eye[start:start + chunk]
                ci = c[i:i + 1].expand(len(tang), -1, -1, -1)
                _, jv = torch.func.jvp(lambda x: vae.decode(x, ci).flatten(1),
                                       (eps[i].expand(len(tang), dim).contiguous(),), (tang,))
                out[i, :, start:start + len(tang)] = jv.T
    return out


def _gauss_newton(jac: torch.Tensor, data_term: _DataTerm) -> torch.Tensor:
    """(B, D, D) float64 I + J^T P J for Jacobians (B, n^2, D) and the data term's precision P."""
    jac = jac.double()
    if data_term.precision is None:
        jpj = torch.einsum("bpi,bp,bpj->bij", jac, data_term.weight.flatten(1).double(), jac)
    else:
        jpj = jac.mT @ (data_term.precision.double() @ jac)
    return torch.eye(jac.shape[2], dtype=torch.float64) + jpj


def _linear_solution(vae, d, c, data_term: _DataTerm) -> torch.Tensor:
    """argmin |eps|^2 + data_term(mu0 + J0 eps - d) for the decoder linearised about eps = 0: (B, D)."""
    zero = torch.zeros(len(d), vae.latent_dim)
    jac = latent_jacobian(vae, zero, c)
    with torch.no_grad():
        resid = (d - vae.decode(zero, c)).flatten(1).double()
    if data_term.precision is None:
        rhs = torch.einsum("bpi,bp->bi", jac.double(), data_term.weight.flatten(1).double() * resid)
    else:
        rhs = torch.einsum("bpi,bp->bi", jac.double(), (data_term.precision.double() @ resid[..., None])[..., 0])
    # symmetric positive definite: Cholesky (batched LU solves fail inside MKL with > 1 thread, torch 2.13)
    return torch.cholesky_solve(rhs[..., None], torch.linalg.cholesky(_gauss_newton(jac, data_term)))[..., 0].float()


# ----------------------------------------------------------------------------- condition fitted too

class StructureFitting(torch.nn.Module):
    """The conditional VAE with its condition's structure channel fitted along with the latents,
    for patches whose data must supply their large scales too (no template). Pass it to `map_fit`
    / `posterior_samples` in place of the VAE, with c holding the known brightness channel
    (c[:, 1]; c[:, 0] is ignored) and d the **full** field f = x + a up(s) in x's normalised units
    (s the structure channel, a = coarse_scale / log_scale of the weights' normalisation, up the
    bilinear upsampling of `model.up`; f's patch mean is free: an offset b is fitted too).

    Latents theta = (eps (D), u (m^2), b) ~ N(0, I): s = mean + R u with (mean, R R^T) the
    Gaussian of the training conditions' structure channels (`prior`, a `StationaryGaussian` of
    (N, 1, m, m) maps), offset `offset_scale` b; decode(theta, c) = mu(eps, [s, c_1]) + a up(s)
    + offset_scale b. Decoder noise as the VAE's."""

    def __init__(self, vae: ConditionalVAE, prior, normalisation: dict, offset_scale: float = 3.0):
        super().__init__()
        self.vae, self.config = vae, vae.config
        m = vae.config.condition_npix
        if prior.npix != m:
            raise ValueError(f"prior is a Gaussian of {prior.npix}^2 maps; expected the condition grid {m}^2")
        vals, vecs = torch.linalg.eigh(torch.from_numpy(prior.covariance()))
        self.register_buffer("root", (vecs * vals.clamp_min(0).sqrt()).float())        # (m^2, m^2)
        self.prior_mean = float(prior.mean)
        self.gain = float(normalisation["coarse_scale"]) / float(normalisation["log_scale"])
        self.offset_scale = float(offset_scale)
        self.latent_dim = vae.latent_dim + m * m + 1

    @property
    def device(self):
        return self.root.device

    def structure(self, theta: torch.Tensor) -> torch.Tensor:
        """Structure channels (B, 1, m, m) of latents theta (B, latent_dim)."""
        m = self.config.condition_npix
        u = theta[:, self.vae.latent_dim:self.vae.latent_dim + m * m]
        return (self.prior_mean + u @ self.root.T).reshape(-1, 1, m, m)

    def condition(self, theta: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """The VAE's conditions (B, 2, m, m): the fitted structure, the given brightness c[:, 1]."""
        return torch.cat([self.structure(theta), c[:, 1:]], 1)

    def decode(self, theta: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        cond = self.condition(theta, c)
        mu = self.vae.decode(theta[:, :self.vae.latent_dim], cond)
        return mu + self.gain * up(cond[:, :1]) + self.offset_scale * theta[:, -1:, None, None]

    def encode(self, f: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """A start: u = 0, b = 0 and the VAE's encoding of f minus the prior-mean large scales."""
        theta = torch.zeros(len(f), self.latent_dim, device=f.device)
        large = self.gain * up(self.structure(theta))
        theta[:, :self.vae.latent_dim] = self.vae.encode(f - large, self.condition(theta, c))
        return theta

    def noise_logvar(self, torus: int = 1) -> torch.Tensor:
        return self.vae.noise_logvar(torus)

    def log_noise_gain(self, c: torch.Tensor) -> torch.Tensor:
        return self.vae.log_noise_gain(c)

    def noise_gain_mask(self, torus: int = 1) -> torch.Tensor:
        return self.vae.noise_gain_mask(torus)

    def decoder_noise(self, white: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        return self.vae.decoder_noise(white, c)


# ----------------------------------------------------------------------------- MAP fit

@dataclass
class MapFit:
    """Result of `map_fit` for B patches (R restarts each).

    eps_map (B, D) whitened latents; loss (B,) -2 log p(eps_map | d, c) + const;
    restart_losses (R, B), restart_labels (R,), best_restart (B,); n_iter / n_eval: optimiser
    iterations / objective evaluations (all restarts run as one batch); grad_norm (B,)
    |d loss / d eps| at eps_map; converged (B,) grad_norm < gtol; mean (B, 1, n, n) decoder mean
    mu(eps_map, c); data (B, 1, n, n) the validated observation (0 at masked pixels); mask, sigma2
    (B, 1, n, n); condition (B, 2, n/2, n/2); noise_model 'exact' | 'white' | 'none';
    sigma_dec2: (B,) decoder-noise pixel variance of each patch (0 for 'none').
    """

    eps_map: torch.Tensor
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
    condition: torch.Tensor
    noise_model: str
    sigma_dec2: torch.Tensor
    data_term: _DataTerm = field(repr=False, default=None)
    method: str = "lbfgs"


def _starts(vae, d, c, m, data_term, n_restarts, generator):
    """Initial points (R, B, D) and their labels: 0, the encoder mean of the mean-filled d, the
    linearised solution, then prior draws."""
    labels = ["zero", "encoder", "linear"][:n_restarts]
    labels += [f"prior{k}" for k in range(n_restarts - len(labels))]
    out = []
    with torch.no_grad():
        for label in labels:
            if label == "zero":
                out.append(torch.zeros(len(d), vae.latent_dim))
            elif label == "encoder":
                fill = (d * m).flatten(1).sum(1) / m.flatten(1).sum(1).clamp_min(1)
                out.append(vae.encode(torch.where(m > 0, d, fill[:, None, None, None]), c))
            elif label == "linear":
                out.append(_linear_solution(vae, d, c, data_term))
            else:
                out.append(torch.randn((len(d), vae.latent_dim), generator=generator))
    return torch.stack(out), labels


def map_fit(vae: ConditionalVAE, d, mask, sigma, c, n_restarts: int = 4, steps: int = 200, method: str = "lbfgs",
            generator: torch.Generator | None = None, decoder_noise: bool = True, noise_model: str = "exact",
            gtol: float = 0.05, lr: float = 0.05) -> MapFit:
    """MAP whitened latents of B patches given a partial noisy observation and their conditions
    c (normalised units, CPU).

    Minimises |eps|^2 + data term. With `decoder_noise`: 'exact' — r^T (C_oo + diag sigma^2)^-1 r
    over the observed pixels (C the decoder-noise covariance, dense per patch); 'white' —
    sum m r^2 / (sigma^2 + sigma_dec^2). Without: sum m r^2 / sigma^2.
    Starts: 0, the encoder mean of the mean-filled d, the exact solution for the decoder
    linearised about 0, then prior draws (`n_restarts` of them in that order). method: 'lbfgs'
    (strong-Wolfe line search, at most `steps` iterations) or 'adam' (`steps` steps of rate
    `lr`). converged: |grad| < gtol (the loss is then within ~gtol^2 / 4 of the optimum: the
    prior alone makes the Hessian >= 2 I).
    """
    check_choice(method, "method", METHODS)
    check_choice(noise_model, "noise_model", NOISE_MODELS)
    n_restarts, steps = check_int(n_restarts, "n_restarts", 1), check_int(steps, "steps", 1)
    decoder_noise = check_bool(decoder_noise, "decoder_noise")
    gtol, lr = check_real(gtol, "gtol", positive=True), check_real(lr, "lr", positive=True)
    generator = generator if generator is not None else torch.Generator().manual_seed(0)
    d, m, s2 = _check_patch_inputs(vae.config.npix, d, mask, sigma)
    c = _check_condition(vae, c, len(d))
    data_term = _DataTerm.build(vae, m, s2, c, decoder_noise, noise_model)
    starts, labels = _starts(vae, d, c, m, data_term, n_restarts, generator)
    eps, restart_losses, grad, n_iter, n_eval = _optimise(vae, starts, c, d, data_term, method, steps, gtol, lr)
    best = restart_losses.argmin(0)
    rows = torch.arange(len(d))
    eps_best, g_best = eps[best, rows], grad[best, rows]
    with torch.no_grad():
        mean = vae.decode(eps_best, c)
    return MapFit(eps_map=eps_best, loss=restart_losses[best, rows], restart_losses=restart_losses,
                  restart_labels=labels, best_restart=best, n_iter=int(n_iter), n_eval=int(n_eval),
                  grad_norm=g_best, converged=g_best < gtol, mean=mean, data=d, mask=m, sigma2=s2, condition=c,
                  noise_model=noise_model if decoder_noise else "none",
                  sigma_dec2=decoder_pixel_variance(vae, noise_gain(vae, c)) * decoder_noise, data_term=data_term,
                  method=method)


def _optimise(vae, starts, c, d, data_term, method, steps, gtol, lr):
    """Minimise the objective from starts (R, B, D), all R x B problems as one batch: returns
    eps (R, B, D), losses (R, B), |grad| (R, B), iterations, objective evaluations."""
    r, b, dim = starts.shape
    cc, dd, term = c.repeat(r, 1, 1, 1), d.repeat(r, 1, 1, 1), data_term.repeat(r)
    eps = starts.reshape(r * b, dim).clone().requires_grad_(True)
    n_iter = n_eval = 0
    if method == "lbfgs":
        def closure():
            eps.grad = None
            loss = _objective(vae, eps, cc, dd, term).sum()
            loss.backward()
            return loss

        while n_iter < steps:  # a fresh history when the line search stalls before convergence
            # the R x B problems share one history: 20 pairs left a problem of 12 stalled at |grad| 0.06-0.2
            # (the line search then finds no decrease), 50 brought all to < 0.01 in the same iterations
            opt = torch.optim.LBFGS([eps], lr=1.0, max_iter=steps - n_iter, history_size=50,
                                    tolerance_change=1e-12, tolerance_grad=gtol / math.sqrt(dim),
                                    line_search_fn="strong_wolfe")
            opt.step(closure)
            state = opt.state[eps]
            n_iter += state["n_iter"]
            n_eval += state["func_evals"]
            if state["n_iter"] <= 1 or eps.grad.abs().max() <= gtol / math.sqrt(dim):
                break
    else:
        opt = torch.optim.Adam([eps], lr=lr)
        for _ in range(steps):
            opt.zero_grad()
            _objective(vae, eps, cc, dd, term).sum().backward()
            opt.step()
        n_iter = n_eval = steps
    eps.grad = None
    loss_all = _objective(vae, eps, cc, dd, term)
    loss_all.sum().backward()
    grad = eps.grad.detach().reshape(r, b, dim).norm(dim=2)
    return eps.detach().reshape(r, b, dim), loss_all.detach().reshape(r, b), grad, n_iter, n_eval


# ----------------------------------------------------------------------------- posterior samples

def laplace_precision(vae: ConditionalVAE, fit: MapFit, hessian: str = "gauss-newton") -> torch.Tensor:
    """(B, D, D) float64 posterior precision of eps at the MAP (conditions: fit.condition):
    Gauss-Newton I + J^T P J (J the decoder Jacobian, P the data term's precision), or half the
    exact Hessian of -2 log p(eps | d, c) (eigenvalues floored at 1e-6)."""
    check_choice(hessian, "hessian", HESSIANS)
    if hessian == "gauss-newton":
        return _gauss_newton(latent_jacobian(vae, fit.eps_map, fit.condition), fit.data_term)
    out = []
    for i in range(len(fit.eps_map)):
        term, ci, di = fit.data_term.select(i), fit.condition[i:i + 1], fit.data[i:i + 1]
        h = torch.autograd.functional.hessian(lambda x: 0.5 * _objective(vae, x[None], ci, di, term)[0],
                                              fit.eps_map[i].clone())
        vals, vecs = torch.linalg.eigh(0.5 * (h + h.T).double())
        out.append((vecs * vals.clamp_min(1e-6)) @ vecs.T)
    return torch.stack(out)


@dataclass
class Posterior:
    """Posterior draws for B patches.

    eps (S, B, D) whitened latents; realizations (S, B, 1, n, n) constrained realizations
    mu(eps_s, c) + e_s (e_s the decoder noise drawn given eps_s and the data; mu alone without
    decoder noise); mean / std (B, 1, n, n) over the realizations; fit: the MapFit used;
    acceptance: MALA acceptance rate after adaptation (None for 'laplace' / 'ula').
    """

    eps: torch.Tensor
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


def _conditional_decoder_noise(vae, residual, m, s2, c, prior_draws=None, generator=None):
    """Decoder noise e given r = d - mu = A e + n on the observed pixels, residual (S, B, 1, n, n),
    covariance C (patch b's, of its `noise_gain` under conditions c): with
    prior_draws e0 (S, B, 1, n, n), draws e = e0 + C A^T (A C A^T + N)^-1 (r - A e0 - n0) (n0
    drawn from `generator`); without, the mean C A^T (A C A^T + N)^-1 r."""
    s, b = residual.shape[:2]
    n = vae.config.npix
    gain = noise_gain(vae, c)
    r = residual.reshape(s, b, n * n).double()
    if prior_draws is None:
        e0 = n0 = torch.zeros_like(r)
    else:
        e0 = prior_draws.reshape(s, b, n * n).double()
        n0 = torch.randn((s, b, n * n), generator=generator, dtype=torch.float64) * s2.flatten(1).double().sqrt()
    out = e0.clone()
    for i in range(b):
        cov = decoder_noise_covariance(vae, float(gain[i])).cpu()
        system = _observed_system(cov, m, s2, i)
        if system is None:
            continue
        idx, chol = system
        rhs = (r[:, i, idx] - e0[:, i, idx] - n0[:, i, idx]).T      # (n_obs, S)
        out[:, i] += (cov[:, idx] @ torch.cholesky_solve(rhs, chol)).T
    return out.reshape(s, b, 1, n, n).float()


def conditional_mean(vae: ConditionalVAE, fit: MapFit) -> torch.Tensor:
    """Point estimate (B, 1, n, n) of the patches: mu(eps_map, c) + E[e | eps_map, d], the decoder
    mean plus the Wiener mean of the decoder noise given the residual (denoises the observed
    pixels and extrapolates the noise's correlations into masked ones)."""
    if fit.noise_model == "none":
        return fit.mean.clone()
    with torch.no_grad():
        return fit.mean + _conditional_decoder_noise(vae, (fit.data - fit.mean)[None], fit.mask, fit.sigma2,
                                                     fit.condition)[0]


def _check_same_observation(vae, fit: MapFit, d, mask, sigma, c) -> None:
    d_c, m_c, s2_c = _check_patch_inputs(vae.config.npix, d, mask, sigma)
    c_c = _check_condition(vae, c, len(d_c))
    if not (torch.equal(m_c, fit.mask) and torch.allclose(d_c * m_c, fit.data * fit.mask)
            and torch.allclose(s2_c * m_c, fit.sigma2 * m_c) and torch.allclose(c_c, fit.condition)):
        raise ValueError("fit= was computed from another observation (d, mask, sigma or c differ): "
                         "pass the data of the fit, or fit=None")


def posterior_samples(vae: ConditionalVAE, d, mask, sigma, c, n_samples: int = 64, method: str = "laplace",
                      fit: MapFit | None = None, generator: torch.Generator | None = None,
                      decoder_noise: bool = True, noise_model: str = "exact", hessian: str = "gauss-newton",
                      mala_steps: int = 100, step_size: float | None = None, **fit_kwargs) -> Posterior:
    """Posterior draws of eps and constrained realizations for B patches of conditions c.

    method: 'laplace' — eps_s = eps_map + L^-T xi with L L^T the Laplace precision (`hessian`:
    'gauss-newton' or 'exact'); 'mala' / 'ula' — `mala_steps` (Metropolis-adjusted /
    unadjusted) Langevin steps preconditioned by the Laplace covariance, started from the
    Laplace draws (MALA adapts its step size towards 57 % acceptance during the first half).
    Realizations: mu(eps_s, c) + e_s, e_s drawn exactly from p(e | eps_s, d) (decoder noise and
    observation noise), so observed pixels follow the data and masked pixels get decoder noise
    correlated with the observed residual. `fit`: a MapFit of the same data (skips the MAP
    step; its noise model is used); other keywords go to map_fit.
    """
    check_choice(method, "method", SAMPLERS)
    check_choice(hessian, "hessian", HESSIANS)
    n_samples, mala_steps = check_int(n_samples, "n_samples", 1), check_int(mala_steps, "mala_steps", 0)
    if step_size is not None:
        step_size = check_real(step_size, "step_size", positive=True)
    generator = generator if generator is not None else torch.Generator().manual_seed(0)
    if fit is None:
        fit = map_fit(vae, d, mask, sigma, c, generator=generator, decoder_noise=decoder_noise,
                      noise_model=noise_model, **fit_kwargs)
    else:
        _check_same_observation(vae, fit, d, mask, sigma, c)
    chol = torch.linalg.cholesky(laplace_precision(vae, fit, hessian))   # (B, D, D)
    b, dim = fit.eps_map.shape
    xi = torch.randn((b, dim, n_samples), generator=generator, dtype=torch.float64)
    eps = fit.eps_map.double()[:, :, None] + torch.linalg.solve_triangular(chol.mT, xi, upper=True)
    eps = eps.permute(2, 0, 1).float().contiguous()                            # (S, B, D)
    acceptance = None
    if method in ("mala", "ula"):
        eps, acceptance = _langevin(vae, eps, fit, chol, mala_steps, step_size, generator, adjust=method == "mala")
    with torch.no_grad():
        shape = (n_samples, b, 1, *fit.data.shape[-2:])
        real = vae.decode(eps.reshape(-1, dim), fit.condition.repeat(n_samples, 1, 1, 1)).reshape(shape)
        if fit.noise_model != "none":
            white = torch.randn((n_samples * b, 1, 2 * shape[-2], 2 * shape[-1]), generator=generator)
            draws = vae.decoder_noise(white, fit.condition.repeat(n_samples, 1, 1, 1)).reshape(shape)  # not periodic
            real = real + _conditional_decoder_noise(vae, fit.data[None] - real, fit.mask, fit.sigma2, fit.condition,
                                                     draws, generator)
    return Posterior(eps=eps, realizations=real, mean=real.mean(0), std=real.std(0), fit=fit, method=method,
                     acceptance=acceptance)


def _langevin(vae, eps0, fit: MapFit, chol, steps, step_size, generator, adjust=True):
    """Preconditioned (MALA / ULA) Langevin chains eps0 (S, B, D) targeting
    p(eps | d, c) = exp(-objective / 2); preconditioner Sigma = P^-1, P = chol chol^T (B, D, D)."""
    s, b, dim = eps0.shape
    cc, dd, term = fit.condition.repeat(s, 1, 1, 1), fit.data.repeat(s, 1, 1, 1), fit.data_term.repeat(s)
    chol_f = chol.float()

    def logpi_grad(x):
        x = x.detach().reshape(s * b, dim).requires_grad_(True)
        lp = -0.5 * _objective(vae, x, cc, dd, term)
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
    x = eps0.clone()
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


__all__ = ["map_fit", "MapFit", "conditional_mean", "posterior_samples", "Posterior", "laplace_precision",
           "latent_jacobian", "decoder_pixel_variance", "decoder_noise_covariance", "noise_gain", "StructureFitting"]
