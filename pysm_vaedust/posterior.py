"""Stage 8 — patch-level conditioning: MAP latents and posterior samples of the VAE.

Normalised units; an observation `d` is (n, n), (B, n, n) or (B, 1, n, n), `mask` the same shape,
True = observed, `sigma` a scalar or a map of d's shape. With the decoder p(x|z) = N(mu(z), C), C
the coloured decoder noise (times exp((a_p + a_q) / 2) for a noise modulation a(z), held fixed),
and white noise sigma^2 on the observed pixels o::

    -2 log p(z | d) = |z|^2 + r_o^T (C_oo + diag sigma_o^2)^-1 r_o + const,   r = d - mu(z)

(noise_model='exact'; 'white' replaces C_oo by sigma_dec^2 exp(a_o) on the diagonal, exact for a
flat noise spectrum, and is what the sky level uses for the latents). A flow prior g: z -> eps
enters by its density |g(z)|^2 - 2 log|det dg/dz| (the MAP in eps coordinates instead gave 4x the
masked-pixel error of the N(0, I) fit on test patches, the density in z 0.89-0.99x). With a
marginal transform f (model.py) the fits work in data space, f linearised about the decoder mean;
constrained realizations start from the skewed prior draws f(mu + e) - f(mu). The decoder-noise
covariance is the aperiodic one here, the periodic FFT form at sky level.

Holds `map_fit` -> `MapFit`, `posterior_samples` -> `Posterior` (Laplace, MALA, ULA),
`laplace_precision`, `conditional_mean`, and the decoder-noise model and linearisation that the sky
level shares (`decoder_pixel_variance`, `decoder_noise_covariance`, `fitted_log_amplitude`,
`prior_mean_noise_level`, `latent_jacobian`). Imports `wiener`, never `conditioning`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from .checks import check_bool, check_choice, check_int, check_real
from .model import VAE
from .wiener import _check_patch_inputs

METHODS = ("lbfgs", "adam")
SAMPLERS = ("laplace", "mala", "ula")
NOISE_MODELS = ("exact", "white")


# ----------------------------------------------------------------------------- decoder noise model

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


__all__ = ["map_fit", "MapFit", "conditional_mean", "posterior_samples", "Posterior", "laplace_precision",
           "latent_jacobian", "decoder_pixel_variance", "decoder_noise_covariance", "fitted_log_amplitude",
           "prior_mean_noise_level"]
