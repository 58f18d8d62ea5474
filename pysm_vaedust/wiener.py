"""Stage 8 — the Gaussian baseline of patch-level conditioning, and the patch observation check.

* `StationaryGaussian`: a Gaussian patch model (covariance from the 2D power spectrum, i.e. the
  lag-autocovariance, of training patches) with the Wiener filter as its conditional mean,
  constrained realizations and per-pixel posterior standard deviations. It ignores the
  condition.
* `ConditionalGaussian`: the Gaussian baseline the conditional VAE must beat, x | c ~
  N(K * up(c_0) + b, C_r): a mean linear in the condition's structure channel (a convolution
  kernel fitted by least squares on training pairs) and a `StationaryGaussian` of the
  residuals; its Wiener filter uses the same coarse input as the VAE.
* `block_mask`: masks of random square holes, used by the inpainting tests and benchmark.
* `_check_patch_inputs`: validates a patch observation (d, mask, sigma) for this module and for
  the VAE fits in `posterior` (which also validate the condition).

Imports neither `posterior` nor `conditioning` (the public entry, which re-exports these names).
"""

from __future__ import annotations

import warnings

import numpy as np
import torch
from torch.nn import functional as F



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


# ----------------------------------------------------------------------------- Gaussian baseline

class StationaryGaussian:
    """Gaussian patch model N(mean, C) with a stationary covariance C[p, q] = acf(q - p): the
    lag-autocovariance (the Fourier pair of the 2D power spectrum, estimated without wrap-around)
    of a set of patches, symmetrised over the 8 dihedral transforms; its conditional mean is the
    Wiener filter."""

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


class ConditionalGaussian:
    """Gaussian patch model of the small scales x given their condition c:
    x | c ~ N(m(c), C_r) with m(c) = b + K * up(c_0): c_0 the structure channel of c upsampled
    to the patch grid (bilinear, as the VAE's encoder sees it, edges replicated), K a
    (2r + 1) x (2r + 1) convolution kernel and b an offset fitted by least squares on training
    pairs (a local linear deconvolution of the coarse part: what of the scales finer than the
    conditioning FWHM a linear filter reads off c), and C_r the `StationaryGaussian` of the
    residuals x - m(c). `condition` is the Wiener filter of x - m(c) plus m(c): the Gaussian
    baseline with the same coarse input as the VAE. (A per-radial-Fourier-bin regression, the
    periodic alternative, explained 10 % of the IRIS test variance against 59 % for this kernel
    at r = 5: the patches' edges smear their FFTs.)"""

    def __init__(self, kernel: np.ndarray, offset: float, residual: StationaryGaussian):
        self.kernel = np.asarray(kernel, dtype=np.float64)            # (2r + 1, 2r + 1)
        self.offset = float(offset)
        self.residual = residual
        self.npix = residual.npix

    @staticmethod
    def _columns(c, npix: int, radius: int) -> torch.Tensor:
        """(B, (2r + 1)^2, n^2) float64 neighbourhoods of up(c_0) around each pixel."""
        c = _as_tensor(c, torch.float64)
        if c.ndim == 3:
            c = c[None]
        if c.ndim != 4 or c.shape[1] < 1 or 2 * c.shape[-1] != npix or c.shape[-2] != c.shape[-1]:
            raise ValueError(f"condition c has shape {tuple(c.shape)}; expected (B, 2, {npix // 2}, {npix // 2})")
        if not bool(torch.isfinite(c).all()):
            raise ValueError("condition c has NaN/inf values: expected finite numbers")
        u = F.interpolate(c[:, :1], scale_factor=2, mode="bilinear", align_corners=False)
        return F.unfold(F.pad(u, (radius,) * 4, mode="replicate"), 2 * radius + 1)

    @classmethod
    def fit(cls, patches, conditions, radius: int = 5, periodic: bool = False, pixel_fraction: float = 0.25,
            seed: int = 0) -> "ConditionalGaussian":
        """From training pairs: patches (N, 1, n, n) and their conditions (N, 2, n/2, n/2)
        (normalised units). The kernel's normal equations use a random `pixel_fraction` of the
        pixels of each patch (seeded); `periodic`: the residual covariance's estimator
        (StationaryGaussian.fit)."""
        x = _as_tensor(patches, torch.float64)
        x = x.reshape(-1, 1, x.shape[-2], x.shape[-1])
        n = x.shape[-1]
        if len(_as_tensor(conditions)) != len(x):
            raise ValueError(f"{len(x)} patches but {len(_as_tensor(conditions))} conditions: expected one "
                             "condition per patch")
        k = (2 * radius + 1) ** 2
        gram = torch.zeros(k + 1, k + 1, dtype=torch.float64)
        rhs = torch.zeros(k + 1, dtype=torch.float64)
        gen = torch.Generator().manual_seed(seed)
        for start in range(0, len(x), 64):
            cols = cls._columns(conditions[start:start + 64], n, radius)
            cols = torch.cat([cols, torch.ones_like(cols[:, :1])], 1)            # (B, k + 1, n^2)
            keep = torch.randperm(n * n, generator=gen)[:max(1, int(pixel_fraction * n * n))]
            cols, y = cols[..., keep], x[start:start + 64].flatten(1)[:, keep]
            gram += (cols @ cols.mT).sum(0)
            rhs += (cols @ y[..., None]).sum(0)[:, 0]
        weights = torch.linalg.solve(gram, rhs)
        kernel, offset = weights[:k].reshape(2 * radius + 1, 2 * radius + 1).numpy(), float(weights[k])
        resid = x - cls._mean(kernel, offset, conditions, n)
        return cls(kernel, offset, StationaryGaussian.fit(resid, periodic=periodic))

    @classmethod
    def _mean(cls, kernel: np.ndarray, offset: float, c, n: int) -> torch.Tensor:
        cols = cls._columns(c, n, kernel.shape[0] // 2)
        return (torch.einsum("bkp,k->bp", cols, torch.from_numpy(kernel).flatten()) + offset).reshape(-1, 1, n, n)

    def mean_of(self, c) -> torch.Tensor:
        """Prior mean m(c) (B, 1, n, n) float32 of patches with conditions c (B, 2, n/2, n/2)."""
        return self._mean(self.kernel, self.offset, c, self.npix).float()

    def condition(self, d, mask, sigma, c, n_samples: int = 0, generator: torch.Generator | None = None,
                  std: bool = False):
        """Wiener filter given the conditions c (and optionally constrained realizations, per-pixel
        posterior std) of B patches, as `StationaryGaussian.condition`: returns (mean (B, 1, n, n),
        std or None, samples (S, B, 1, n, n) or None)."""
        n = self.npix
        d_t, m, s2 = _check_patch_inputs(n, d, mask, sigma)   # s2: sigma^2, 1 at masked pixels
        prior = self.mean_of(c)
        if len(prior) != len(d_t):
            raise ValueError(f"{len(d_t)} observed patches but {len(prior)} conditions: expected one per patch")
        resid = torch.where(m > 0, d_t - prior, torch.zeros_like(d_t))
        mean, sd, samples = self.residual.condition(resid, m > 0, s2.sqrt(), n_samples, generator, std)
        return mean + prior, sd, (None if samples is None else samples + prior[None])


def torus_covariance(mode_variance: torch.Tensor, npix: int) -> torch.Tensor:
    """(npix^2, npix^2) float64 pixel covariance (row-major) of an npix x npix corner of a
    stationary periodic field on the (m, m) torus with orthonormal-FFT per-mode variance
    `mode_variance` (m >= npix; m = npix: circulant over the patch, m = 2 npix: no wrap-around)."""
    m = mode_variance.shape[-1]
    acf = torch.fft.ifft2(mode_variance.double()).real                     # C[p, q] = acf[p - q mod m]
    r = torch.arange(npix, device=acf.device).repeat_interleave(npix)
    col = torch.arange(npix, device=acf.device).repeat(npix)
    return acf[(r[:, None] - r[None, :]) % m, (col[:, None] - col[None, :]) % m]


def block_mask(fraction: float, rng: np.random.Generator, n: int = 32, block: int = 4) -> np.ndarray:
    """(n, n) bool observation mask, True = observed, with round(fraction * (n / block)^2) random
    block x block squares masked (on a grid of block-pixel cells): the holes of the inpainting
    tests and benchmark."""
    per_side = n // block
    mask = np.ones((n, n), bool)
    for j in rng.choice(per_side**2, int(round(fraction * per_side**2)), replace=False):
        r, c = divmod(int(j), per_side)
        mask[r * block:(r + 1) * block, c * block:(c + 1) * block] = False
    return mask


__all__ = ["StationaryGaussian", "ConditionalGaussian", "block_mask"]
