"""Stage 8 — conditioning at sky level, and the public entry to all of stage 8.

Sky level: `condition_sky` brings an observed intensity map to the reference frequency (the
model's modified black body), takes y = ln I - ln T (T the template) and fits the whitened
latents and decoder-noise patches of every level-0 tile touching an observed pixel **jointly
through the blend** (`SkyForwardModel`: the renderer's band-limited resampling, then sparse
matrices of the tiling's bilinear interpolation and blend weights; what overlapping patches
share, their decoded mean at zero latents, adds up as a partition of unity, what each draws on
its own, latents' part and decoder noise, variance-preserving, as VAEDust renders them). Each tile's condition
is its coarse part seen in the template (`Renderer.conditions` on `VAEDust.log_template`),
known and fixed. `FittedLatents` stores the result (HDF5, atomic write, with the sha256 of the
weights file); `ConditionedVAEDust` is a `VAEDust` that renders it: the observed region follows
the data, the other tiles stay prior draws of `seed`.

The patch level (MAP fits, posterior samples, the decoder-noise model) lives in `posterior`, the
Gaussian baselines (`StationaryGaussian`, `ConditionalGaussian`: Wiener filters) in `wiener`; this
module imports both and re-exports their public names, so `pysm_vaedust.conditioning` is the one
entry point.
"""

from __future__ import annotations

import json
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
from .checks import (check_bandpass, check_bool, check_frequency, check_int, check_nside, check_path, check_real,
                     check_seed)
from .component import VAEDust, _mbb_intensity, trapezoid_steps
from .data import BETA_DUST, T_DUST_K, atomic_write, file_digest
from .model import ConditionalVAE
from .posterior import (MapFit, Posterior, StructureFitting, conditional_mean, decoder_noise_covariance,
                        decoder_pixel_variance, laplace_precision, latent_jacobian, map_fit, posterior_samples)
from .healpix import interpolate_at_pixels
from .tiling import UPSAMPLE, CascadeLevel, Footprints, Resampler, blend_torch, footprints
from .weights import default_weights_path
from .wiener import ConditionalGaussian, StationaryGaussian, block_mask

#: version 1 held latents of the unconditional VAE
FITTED_FORMAT_VERSION = 2
#: tolerance of the check that rendered tiles have the conditions they were fitted under
CONDITION_ATOL = 1e-4


# ----------------------------------------------------------------------------- forward model

def forward_model(vae: ConditionalVAE, eps: torch.Tensor, c: torch.Tensor, level: CascadeLevel,
                  normalisation: dict, noise: torch.Tensor | None = None, resampler: Resampler | None = None,
                  fp: Footprints | None = None, n_out: int | None = None) -> torch.Tensor:
    """Differentiable latents -> patches -> sky pixels of one cascade level (torch; gradients
    flow to eps and noise).

    eps (P, D) whitened latents, c (P, 2, n/2, n/2) conditions, noise (P, n, n) decoder-noise
    patches (normalised units) of P tiles of `level`. Patches (P, n, n): the small scales in ln I,
    a (s (mu(eps, c) + noise) + m) (a the level's amplitude, s / m the normalisation's log_scale /
    log_mean): the first part `Renderer.decode` returns (on the first level, which this fits). With `fp` (`tiling.footprints(nside, level,
    tile_ids, lookup)`, its patch k is row k of eps), `n_out` and `resampler` (the renderer's
    reprojection resampling, `Renderer.resampler`): resampled onto the fine grid and blended onto
    those pixels as the component does (`tiling.blend_torch`: a (s mu(0, c) + m) as a partition of
    unity, a s (mu(eps, c) - mu(0, c) + noise) variance-preserving), (n_out,). `SkyForwardModel`
    computes the same with a sparse blend.
    """
    scale = level.amplitude * normalisation["log_scale"]
    offset = level.amplitude * normalisation["log_mean"]
    if fp is None:
        own = vae.decode(eps, c)[:, 0]
        return scale * (own if noise is None else own + noise) + offset
    if n_out is None or resampler is None:
        raise ValueError("forward_model: n_out (number of output pixels) and resampler are required with fp")
    own, shared = (m[:, 0] for m in vae.decode_with_prediction(eps, c))
    if noise is not None:
        own = own + noise
    return (blend_torch(resampler(scale * shared + offset), fp, int(n_out), shared=True)
            + blend_torch(resampler(scale * (own - shared)), fp, int(n_out)))


class _SparseApply(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, matrix, matrix_t):
        ctx.matrix_t = matrix_t
        return matrix @ x

    @staticmethod
    def backward(ctx, grad):
        return ctx.matrix_t @ grad, None, None


class BlendOperator:
    """The tiling's fine-grid patch -> sky map as a sparse matrix B (n_out, P n^2), n the fine grid's
    side: bilinear interpolation of each patch at its footprint pixels, weights w / sqrt(sum w^2) (or, `shared`, w / sum w: for
    what the tiles share, their decoded means at zero latents). Same numbers as `tiling.blend_torch` (to 1e-6), ~5x faster forward +
    backward, with an explicit adjoint."""

    def __init__(self, fp: Footprints, n_patches: int, npix: int, n_out: int, shared: bool = False):
        n = int(npix)
        row = np.clip(fp.row.astype(np.float64), 0, n - 1)
        col = np.clip(fp.col.astype(np.float64), 0, n - 1)
        r0 = np.minimum(np.floor(row).astype(np.int64), n - 2)
        c0 = np.minimum(np.floor(col).astype(np.int64), n - 2)
        fr, fc = row - r0, col - c0
        den = np.bincount(fp.pixel, weights=fp.weight.astype(np.float64) ** (1 if shared else 2), minlength=n_out)
        scale = fp.weight / (np.maximum(den[fp.pixel], 1e-24) if shared else np.sqrt(np.maximum(den[fp.pixel], 1e-24)))
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
    """Differentiable latents -> ln I of the level-0 tiles `tile_ids` at `pixels` of the model's
    nside, as `VAEDust` renders them.

    One cascade level (the nside needs no finer one, or cascade=False): ln I = ln T + delta,
    delta = B[a s (mu(eps, c) + e)] + offset, offset = B_m[a (s mu(0, c) + m)] - B[a s mu(0, c)],
    B_m / B the partition-of-unity / variance-preserving blends (BlendOperator shared / not, see
    `forward_model`), c the tiles' conditions from the template (fixed: the offset is a constant),
    e their decoder-noise patches. With finer levels, VAEDust adds
    level 0 as much as it keeps beside the next level (`tiling.handover_gain` of the Gaussian
    of FWHM F / f_1, F the conditioning FWHM, in `resampler`), then draws the finer levels conditioned on the field so far:
    here they are left out of delta and counted as white noise of variance `fine_variance` (ln
    I^2: s^2 sum_k a_k^2 over the finer levels, the normalised small scales having unit variance);
    the component also blends level 0 at its working nside and interpolates, so delta is then
    exact only to that interpolation. eps (P, D) rows follow `tile_ids`; every tile covering
    `pixels` must be in `tile_ids`. Decoding runs in chunks of `chunk` tiles.
    """

    def __init__(self, model: VAEDust, tile_ids, pixels, chunk: int = 256):
        self.vae = model.weights.vae
        self.chunk = check_int(chunk, "chunk", 1)
        nside = model.nside
        levels = model.renderer.levels(nside, model.cascade)
        self.level, self.n_levels = levels[0], len(levels)
        self.normalisation = model.renderer.normalisation
        n = self.vae.config.npix
        self.tile_ids = np.asarray(tile_ids, dtype=np.int64)
        self.pixels = np.asarray(pixels, dtype=np.int64)
        self.conditions = torch.from_numpy(model.renderer.conditions(self.level, model.log_template, self.tile_ids))
        lookup = np.full(hp.nside2npix(nside), -1, dtype=np.int64)
        lookup[self.pixels] = np.arange(len(self.pixels))
        self.footprints = footprints(nside, self.level, self.tile_ids, lookup)
        self.operator = BlendOperator(self.footprints, len(self.tile_ids), UPSAMPLE * n, len(self.pixels))
        s = float(self.normalisation["log_scale"])
        self.scale = self.level.amplitude * s                 # ln I per normalised unit
        self.next_fwhm_deg = 0.0 if len(levels) == 1 else float(self.normalisation["template_fwhm_deg"]) / levels[1].factor
        self.resampler = model.renderer.resampler(self.level, nside, handover_fwhm_deg=self.next_fwhm_deg)
        self.fine_variance = s**2 * sum(lv.amplitude**2 for lv in levels[1:])
        self.log_template = torch.from_numpy(interpolate_at_pixels(model.log_template, nside, self.pixels))
        m = self.level.amplitude * float(self.normalisation["log_mean"])
        with torch.no_grad():
            prediction = self.scale * self.decode(torch.zeros(len(self.tile_ids), self.vae.latent_dim))
            mean_operator = BlendOperator(self.footprints, len(self.tile_ids), UPSAMPLE * n, len(self.pixels),
                                          shared=True)
            #: ln I (n_pixels,): what the tiles share blended as a partition of unity, less the
            #: variance-preserving blend of it that `blend` applies to every decoded mean
            self.offset = mean_operator(self.resampler(prediction + m)) - self.operator(self.resampler(prediction))

    def blend(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised patches x (P, n, n) (decoded means, decoder noise) -> ln I (n_pixels,),
        variance-preserving."""
        return self.operator(self.resampler(self.scale * x))

    def blend_adjoint(self, y: torch.Tensor) -> torch.Tensor:
        """Adjoint of `blend`: (n_pixels,) -> (P, n, n)."""
        return self.scale * self.resampler.adjoint(self.operator.adjoint(y))

    def _chunks(self, eps):
        for k in range(0, len(eps), self.chunk):
            yield slice(k, k + self.chunk), self.conditions[k:k + self.chunk]

    def decode(self, eps: torch.Tensor) -> torch.Tensor:
        """Decoder means (P, n, n) of latents eps (P, D), normalised units; differentiable."""
        return torch.cat([self.vae.decode(eps[k], c)[:, 0] for k, c in self._chunks(eps)])

    def jvp(self, eps: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """(d mu / d eps) v at eps: (P, D) -> (P, n, n)."""
        return torch.cat([torch.func.jvp(lambda x: self.vae.decode(x, c)[:, 0], (eps[k],), (v[k],))[1]
                          for k, c in self._chunks(eps)])

    def vjp(self, eps: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        """(d mu / d eps)^T g at eps: (P, n, n) -> (P, D)."""
        return torch.cat([torch.func.vjp(lambda x: self.vae.decode(x, c)[:, 0], eps[k])[1](g[k])[0]
                          for k, c in self._chunks(eps)])

    def delta(self, eps: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
        """Small scales in ln I (n_pixels,) of latents eps (P, D) (+ decoder-noise patches (P, n, n))."""
        patches = self.decode(eps)
        return self.blend(patches if noise is None else patches + noise) + self.offset

    def log_intensity(self, eps: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
        """ln(I / uK_RJ) at the reference frequency (n_pixels,), float64."""
        return self.log_template + self.delta(eps, noise).double()

    def intensity(self, eps: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
        """I (uK_RJ at the reference frequency) at the pixels, differentiable in eps and noise."""
        return self.log_intensity(eps, noise).exp()


# ----------------------------------------------------------------------------- fitted latents

@dataclass
class FittedLatents:
    """Conditioned level-0 tiles: tile_ids (P,); eps (P, D) whitened latents; noise (P, n, n)
    decoder-noise patches or None; conditions (P, 2, n/2, n/2) the conditions they were fitted
    under, or None; weights_sha256: sha256 of the weights file they were fitted with;
    metadata: JSON-able dict."""

    tile_ids: np.ndarray
    eps: np.ndarray
    noise: np.ndarray | None = None
    conditions: np.ndarray | None = None
    weights_sha256: str = ""
    metadata: dict = field(default_factory=dict)

    def __post_init__(self):
        self.tile_ids = np.asarray(self.tile_ids, dtype=np.int64)
        p = len(self.tile_ids)
        self.eps = np.asarray(self.eps, dtype=np.float32)
        if self.eps.ndim != 2 or len(self.eps) != p:
            raise ValueError(f"eps has shape {self.eps.shape}; expected ({p}, latent_dim)")
        for name, ndim in (("noise", 3), ("conditions", 4)):
            value = getattr(self, name)
            if value is not None:
                value = np.asarray(value, dtype=np.float32)
                if value.ndim != ndim or len(value) != p:
                    raise ValueError(f"{name} has shape {value.shape}; expected {ndim} dimensions, {p} rows")
                setattr(self, name, value)
        self.weights_sha256 = str(self.weights_sha256)

    def as_dict(self) -> dict:
        """{0: {tile id: eps}}: the `fixed_latents` argument of VAEDust."""
        return {0: {int(t): e for t, e in zip(self.tile_ids, self.eps)}}

    def noise_dict(self) -> dict:
        """{0: {tile id: noise patch (n, n)}} (empty without noise): the `fixed_noise` argument."""
        return {} if self.noise is None else {0: {int(t): e for t, e in zip(self.tile_ids, self.noise)}}

    def check_weights(self, path) -> None:
        """ValueError unless the weights file `path` is the one these latents were fitted with."""
        if not self.weights_sha256:
            raise ValueError("these fitted latents record no weights_sha256: fit them with condition_sky, or set "
                             "weights_sha256 to the sha256 of the weights file they belong to")
        actual = file_digest(path)
        if actual != self.weights_sha256:
            raise ValueError(f"the latents were fitted with weights of sha256 {self.weights_sha256[:16]}..., but "
                             f"{str(path)!r} has {actual[:16]}...: pass weights= the file used by condition_sky")

    def save(self, path) -> Path:
        """Write an HDF5 file atomically (datasets tile_ids, eps[, noise, conditions]; attrs)."""
        def write(tmp):
            with h5py.File(tmp, "w") as f:
                f.create_dataset("tile_ids", data=self.tile_ids)
                for name in ("eps", "noise", "conditions"):
                    if getattr(self, name) is not None:
                        f.create_dataset(name, data=getattr(self, name), compression="gzip", shuffle=True)
                f.attrs["format_version"] = FITTED_FORMAT_VERSION
                f.attrs["kind"] = "pysm_vaedust.FittedLatents"
                f.attrs["weights_sha256"] = self.weights_sha256
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
                    raise ValueError(f"{str(path)!r} has fitted-latents format version {version}; this pysm_vaedust "
                                     f"reads {FITTED_FORMAT_VERSION} (latents of the conditional VAE): refit with "
                                     "condition_sky")
                return cls(tile_ids=f["tile_ids"][()], eps=f["eps"][()],
                           noise=f["noise"][()] if "noise" in f else None,
                           conditions=f["conditions"][()] if "conditions" in f else None,
                           weights_sha256=str(f.attrs["weights_sha256"]),
                           metadata=json.loads(str(f.attrs["metadata"])))
        except (OSError, KeyError) as err:
            raise ValueError(f"{str(path)!r} is not a pysm_vaedust fitted-latents file: {err}") from err


# ----------------------------------------------------------------------------- sky level

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

    index, temperature = (np.atleast_1d(np.asarray(at(p), dtype=np.float64))
                          for p in (model.mbb_index, model.mbb_temperature))
    _mbb_intensity(freqs, trapezoid_steps(freqs, weights), ones, model.freq_ref, index, temperature, out)
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


def _fit_tiles(fwd: SkyForwardModel, target, n_var, eps0, e0, steps, cg_tol, cg_max_iter, log):
    """Minimise Phi = |eps - eps0|^2 + (e - e0)^T C^-1 (e - e0) + |t - L (mu(eps) + e)|^2 / N over
    latents eps (P, D) and decoder-noise patches e (P, n, n) (L = fwd.blend, C the decoder-noise
    covariance of each tile (`ConditionalVAE.noise_variance`), N = n_var (n_pixels,), t the
    target in ln I minus fwd.offset) by Gauss-Newton: at eps_k the linearised problem is solved
    exactly in data space by conjugate gradients,
    (L (J J^T + C) L^T + N) a = t - L (mu_k + J (eps0 - eps_k) + e0), then
    eps = eps0 + J^T L^T a, e = e0 + C L^T a (J the decoder Jacobian at eps_k), with step halving if Phi does not
    decrease. Returns (eps, e, [{phi, cg_iterations, cg_residual, step, accepted}], the first entry
    the start)."""
    spectrum = fwd.vae.noise_variance(fwd.conditions).detach()          # (P, n, n): each tile's

    def cov(x):
        return torch.fft.ifft2(torch.fft.fft2(x, norm="ortho") * spectrum, norm="ortho").real

    def phi(eps, e, mu):
        resid = target - fwd.blend(mu + e)
        prior_e = (torch.fft.fft2(e - e0, norm="ortho").abs().square() / spectrum).sum()
        return float((eps - eps0).double().square().sum() + prior_e.double() + (resid.double().square() / n_var).sum())

    # a fine-grid pixel's variance of resampled stationary noise, approximated as white: spectrum mean x (sum R^2 / U n)^2
    resampled = float(fwd.resampler.matrix.square().sum() / fwd.resampler.matrix.shape[0]) ** 2
    diag = (n_var + fwd.scale**2 * float(spectrum.mean()) * resampled * fwd.operator.row_sq_sum).float()
    n_var_f = n_var.float()
    eps, e = eps0.clone(), e0.clone()
    with torch.no_grad():
        mu = fwd.decode(eps)
    current = phi(eps, e, mu)
    history = [{"phi": current}]
    for step in range(steps):
        with torch.no_grad():
            shift = 0.0 if torch.equal(eps, eps0) else fwd.jvp(eps, eps0 - eps)
            rhs = target - fwd.blend(mu + shift + e0)

            def system(v):
                back = fwd.blend_adjoint(v)
                return fwd.blend(fwd.jvp(eps, fwd.vjp(eps, back)) + cov(back)) + n_var_f * v

            a, it, res = _cg(system, rhs, precond=lambda v: v / diag, tol=cg_tol, max_iter=cg_max_iter)
            back = fwd.blend_adjoint(a)
            eps_new = eps0 + fwd.vjp(eps, back)
            e_new = e0 + cov(back)
            for halving in range(6):
                lam = 0.5 ** halving
                eps_try, e_try = eps + lam * (eps_new - eps), e + lam * (e_new - e)
                mu_try = fwd.decode(eps_try)
                value = phi(eps_try, e_try, mu_try)
                if value <= current:
                    break
        history.append({"phi": value, "cg_iterations": int(it), "cg_residual": res, "step": lam,
                        "accepted": value <= current})
        log(f"Gauss-Newton step {step + 1}: Phi {current:.2f} -> {value:.2f} ({it} CG iterations, "
            f"relative residual {res:.1e}, step {lam:g})")
        if value > current:
            break
        decrease = current - value
        eps, e, mu, current = eps_try, e_try, mu_try, value
        if decrease < 1e-2:  # converged: this step changed Phi (-2 log p) by < 0.01
            break
    return eps, e, history


def condition_sky(observed_map, mask, noise, freq, nside, weights=None, seed: int = 0, template=None,
                  template_freq=None, mbb_temperature=T_DUST_K, mbb_index=BETA_DUST, cascade: bool = True,
                  bandpass_weights=None, sample: bool = True, decoder_noise: bool = True, steps: int = 5,
                  cg_tol: float = 1e-4, cg_max_iter: int = 1000, chunk: int = 256,
                  progress: bool = False) -> FittedLatents:
    """Fit the level-0 latents (and decoder-noise patches) of `VAEDust` to an observed dust
    intensity map (CPU).

    observed_map: (12 nside^2,) Galactic RING intensity at `freq` (Quantity in a brightness unit,
    or an array in uK_RJ); mask: bool (12 nside^2,), True = observed (other pixels may hold
    anything); noise: per-pixel (or scalar) noise standard deviation, same units. The map is
    brought to the reference frequency with the model's modified black body (`mbb_*`, scalars or
    maps; `bandpass_weights` as pysm3); the data are y = ln I - ln T with noise sigma / I
    (log-space linearisation: keep sigma / I small). template / template_freq / mbb_* / weights /
    cascade: as VAEDust — pass the same ones to ConditionedVAEDust (it checks the conditions).

    Every level-0 tile touching an observed pixel is fitted jointly through the blend
    (`SkyForwardModel`), its condition taken from the template: Gauss-Newton on
    -2 log p(eps, e | y) (`steps` iterations at most; the first, from eps = 0, solves the decoder
    linearised about 0 exactly, by conjugate gradients in data space, with the coloured decoder
    noise e of every tile). With `sample` (default) a constrained realization (randomize-then-
    optimize: prior means and data perturbed by draws of `seed`, an exact posterior draw for the
    linear-Gaussian part), else the MAP. decoder_noise=False stores the latents only: the
    rendered map then carries fresh decoder noise and matches the data only to that level.
    Where VAEDust adds finer cascade levels at this nside, the fit models level 0 as they see it
    and their variance as white noise (SkyForwardModel); the component then draws them
    conditioned on the fitted level 0. Tiles touching no observed pixel keep their prior draws
    (a warning says how many). Returns FittedLatents; render it with ConditionedVAEDust.
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
                    mbb_temperature=mbb_temperature, mbb_index=mbb_index, weights=weights, device="cpu",
                    cascade=cascade, polarization=False)
    vae = model.weights.vae
    level = model.renderer.levels(nside, cascade)[0]
    lookup = np.full(npix, -1, dtype=np.int64)
    lookup[obs] = np.arange(len(obs))
    touched = np.unique(footprints(nside, level, np.arange(level.n_tiles), lookup).patch)
    if len(touched) < level.n_tiles:
        warnings.warn(f"{level.n_tiles - len(touched)} of {level.n_tiles} level-0 tiles touch no observed "
                      "pixel: they keep their prior latents (stochastic, seeded by VAEDust's seed)", stacklevel=2)
    fwd = SkyForwardModel(model, touched, obs, chunk)
    log_i_ref = np.log(i_obs[obs] / _mbb_ratio(model, freq, bandpass_weights, obs))
    y = torch.from_numpy(log_i_ref - fwd.log_template.numpy()).float() - fwd.offset
    sigma_ln2 = torch.from_numpy((sig[obs] / i_obs[obs]) ** 2)
    n_var = sigma_ln2 + fwd.fine_variance
    log(f"{len(obs)} observed pixels, {len(touched)} tiles, {fwd.n_levels} cascade level(s), "
        f"median sigma/I={float(sigma_ln2.sqrt().median()):.3g}")

    gen = torch.Generator().manual_seed(seed * 7919 + 17)
    n, dim = vae.config.npix, vae.latent_dim
    p_count = len(touched)
    eps0, e0, target = torch.zeros(p_count, dim), torch.zeros(p_count, n, n), y
    if sample:
        eps0 = torch.randn((p_count, dim), generator=gen)
        e0 = vae.decoder_noise(torch.randn((p_count, 1, n, n), generator=gen), fwd.conditions)[:, 0]
        target = y + torch.randn(len(obs), generator=gen) * n_var.sqrt().float()
    eps, e, history = _fit_tiles(fwd, target, n_var, eps0, e0, steps, cg_tol, cg_max_iter, log)
    with torch.no_grad():
        chi2 = {key: float(((fwd.log_intensity(eps, noise).numpy() - log_i_ref) ** 2 / sigma_ln2.numpy()).mean())
                for key, noise in (("chi2_per_pixel", e), ("chi2_per_pixel_mean_only", None))}
    weights_path = model.weights.path
    metadata = {
        "package_version": __version__, "nside": nside, "n_levels": fwd.n_levels, "seed": seed,
        "freq_GHz": [float(f) for f in np.atleast_1d(check_frequency(freq, "freq").value)],
        "freq_ref_GHz": float(model.freq_ref), "cascade": bool(cascade), "sample": bool(sample),
        "decoder_noise": bool(decoder_noise), "weights_path": str(weights_path),
        "template": template if isinstance(template, (str, type(None))) else "array",
        "n_observed_pixels": int(len(obs)), "n_tiles_fitted": int(p_count), "n_tiles": int(level.n_tiles),
        "fine_variance": fwd.fine_variance, "gauss_newton": history, **chi2,
        "wall_time_s": time.time() - start_time,
    }
    log(f"done: chi2/pixel {chi2['chi2_per_pixel']:.3f} (decoder mean only {chi2['chi2_per_pixel_mean_only']:.3f})")
    return FittedLatents(tile_ids=touched, eps=eps.numpy(), noise=e.numpy() if decoder_noise else None,
                         conditions=fwd.conditions.numpy(), weights_sha256=file_digest(weights_path),
                         metadata=metadata)


class ConditionedVAEDust(VAEDust):
    """A VAEDust whose level-0 tiles listed in `fitted` (FittedLatents or a path) use the fitted
    latents and decoder-noise patches: the map follows the observation where observed (at the
    observation's resolution) and keeps prior draws of `seed` elsewhere. With finer cascade
    levels (a higher nside than the fit's, or one that needs them) those are drawn conditioned on
    the fitted level 0, as for any VAEDust. Other keyword arguments as VAEDust: pass the same
    template / template_freq / mbb_* as to condition_sky (ValueError if the tiles' conditions
    then differ from the fit's). `weights` defaults to the file the latents were fitted with and
    must be that file (sha256 checked, ValueError otherwise).
    A config entry: {class = "pysm_vaedust.conditioning.ConditionedVAEDust", fitted = "fit.h5"}."""

    def __init__(self, fitted, nside=2048, seed=0, weights=None, **kwargs):
        if not isinstance(fitted, FittedLatents):
            fitted = FittedLatents.load(check_path(fitted, "fitted", optional=False))
        if "fixed_latents" in kwargs or "fixed_noise" in kwargs:
            raise TypeError("ConditionedVAEDust takes its fixed latents and noise from `fitted`")
        weights = check_path(weights, "weights")
        if weights is None and fitted.metadata.get("weights_path") and Path(fitted.metadata["weights_path"]).is_file():
            weights = fitted.metadata["weights_path"]
        fitted.check_weights(default_weights_path() if weights is None else weights)
        super().__init__(nside=nside, seed=seed, weights=weights, fixed_latents=fitted.as_dict(),
                         fixed_noise=fitted.noise_dict(), **kwargs)
        levels = self.renderer.levels(self.nside, self.cascade)
        fit_levels = fitted.metadata.get("n_levels")
        if fit_levels is not None and fit_levels != len(levels):
            warnings.warn(f"nside={self.nside}, cascade={self.cascade} renders {len(levels)} cascade level(s), the "
                          f"fit modelled {fit_levels}: the observed region follows the data only approximately",
                          stacklevel=2)
        if fitted.conditions is not None:
            now = self.renderer.conditions(levels[0], self.log_template, fitted.tile_ids)
            if now.shape != fitted.conditions.shape or not np.allclose(now, fitted.conditions, atol=CONDITION_ATOL):
                raise ValueError("the fitted tiles' conditions differ from this component's (another template, "
                                 "template_freq or mbb_* than condition_sky's): pass the same ones")
        self.fitted = fitted


__all__ = ["map_fit", "MapFit", "conditional_mean", "posterior_samples", "Posterior", "laplace_precision",
           "latent_jacobian", "StationaryGaussian", "ConditionalGaussian", "forward_model", "BlendOperator",
           "SkyForwardModel", "condition_sky", "FittedLatents", "ConditionedVAEDust", "decoder_pixel_variance",
           "decoder_noise_covariance", "block_mask", "StructureFitting"]
